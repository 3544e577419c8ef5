import dataclasses
import pathlib

import pytest

from roundhouse import catalogue
from roundhouse.catalogue import ConfigError

pytestmark = pytest.mark.unit


def _one(**kw):
    m = {"name": "m", "path": "models/m", "max_model_len": 1024, **kw}
    return {"models": [m]}


def test_loads_defaults_and_resolves_relative_paths(tmp_path):
    (tmp_path / "c.yaml").write_text("models:\n  - name: m\n    aliases: [chat]\n    path: models/m\n    max_model_len: 512\n    kv_cache_bytes: 64MiB\n")
    cat = catalogue.load(tmp_path / "c.yaml")
    spec = cat.resolve("chat")
    assert spec is cat.resolve("m") and spec.name == "m"
    assert spec.path == str((tmp_path / "models/m").resolve())
    assert spec.kv_cache_bytes == 64 * 2**20
    assert spec.token_limit == 512
    assert cat.resolve("nope") is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({}, "models"),
        ({"models": []}, "models"),
        ({"models": ["x"]}, "models[0]"),
        ({"models": [{"name": "m", "path": "p"}]}, "models[0].max_model_len"),
        (_one(colour="red"), "models[0].colour"),
        (_one(max_model_len="big"), "models[0].max_model_len"),
        (_one(max_model_len=0), "models[0].max_model_len"),
        (_one(aliases="chat"), "models[0].aliases"),
        (_one(kv_cache_bytes="lots"), "models[0].kv_cache_bytes"),
        (_one(default_max_tokens=2048), "models[0].default_max_tokens"),
        ({"models": [_one()["models"][0], _one()["models"][0]]}, "'m' is used twice"),
        ({**_one(), "gpus": [{"id": "cpu", "budget_bytes": "1GiB", "swap": "nap"}]}, "gpus[0].swap"),
        ({**_one(), "hosts": [{"id": "h", "sleep_budget_bytes": "lots"}]}, "hosts[0].sleep_budget_bytes"),
        ({**_one(), "hosts": [{"id": "h"}, {"id": "h"}]}, "hosts: an id is used twice"),
    ],
)
def test_errors_name_the_bad_key(raw, key):
    with pytest.raises(ConfigError) as info:
        catalogue.from_mapping(raw, pathlib.Path("/x"))
    assert key in str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        catalogue.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        catalogue.load(tmp_path / "bad.yaml")


def test_dump_round_trips(tmp_path):
    spec = catalogue.ModelSpec(name="a/b", path=str(tmp_path / "x"), max_model_len=256, aliases=("x",), kv_cache_bytes=123)
    (tmp_path / "c.yaml").write_text(catalogue.dump([spec]))
    assert catalogue.load(tmp_path / "c.yaml").models == (spec,)


def test_lora_adapters_resolve_to_their_base_model_and_round_trip(tmp_path):
    raw = _one(adapters=[{"name": "tone", "path": "adapters/tone"}], max_loras=2)
    cat = catalogue.from_mapping(raw, tmp_path)
    assert cat.resolve("tone").name == "m" and cat.adapter("tone").path == str(tmp_path / "adapters" / "tone")
    assert cat.adapter("m") is None
    again = catalogue.from_mapping(__import__("yaml").safe_load(catalogue.dump(cat.models)), tmp_path)
    assert again.models == cat.models


@pytest.mark.parametrize("adapters, key", [
    ([{"name": "m", "path": "x"}], "used twice"),
    ([{"name": "a"}], r"models\[0\].adapters\[0\].path: required"),
    ({"name": "a"}, r"models\[0\].adapters"),
])
def test_bad_adapters_are_refused(adapters, key):
    with pytest.raises(ConfigError, match=key):
        catalogue.from_mapping(_one(adapters=adapters))


def test_sleep_settings_default_and_round_trip(tmp_path):
    cat = catalogue.from_mapping({**_one(), "gpus": [{"id": "cpu", "budget_bytes": "1GiB", "swap": "sleep", "host": "box"}],
                                  "hosts": [{"id": "box", "sleep_budget_bytes": "4GiB"}]}, tmp_path)
    gpu = cat.gpus[0]
    assert gpu.swap == "sleep" and cat.host(gpu).sleep_budget_bytes == 4 * 2**30
    assert catalogue.from_mapping(_one(), tmp_path).gpus[0].swap == "auto", "auto: sleep on CUDA, stop on CPU"
    other = dataclasses.replace(gpu, host="elsewhere")
    assert cat.host(other).sleep_budget_bytes == catalogue.DEFAULT_SLEEP_BUDGET_BYTES, "a host not listed lends the default"
    text = catalogue.dump(cat.models, cat.gpus, hosts=cat.hosts)
    (tmp_path / "c.yaml").write_text(text)
    again = catalogue.load(tmp_path / "c.yaml")
    assert again.gpus == cat.gpus and again.hosts == cat.hosts


SHIPPED = [pathlib.Path(catalogue.__file__).parent / "defaults" / "cpu.yaml",
           *sorted((pathlib.Path(__file__).parents[2] / "deploy" / "config").glob("*.yaml"))]


def _schema_validator():
    import jsonschema

    schema = catalogue.schema_json()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_meets_the_json_schema_editors_get(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    assert [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _schema_validator().iter_errors(raw)] == []
    catalogue.from_mapping(raw, path.parent)   # and the loader agrees


@pytest.mark.parametrize("change, key", [
    ({"colour": "red"}, "colour"),
    ({"max_model_len": "big"}, "models[0].max_model_len"),
    ({"kv_cache_bytes": "lots"}, "models[0].kv_cache_bytes"),
    ({"max_num_seqs": 0}, "models[0].max_num_seqs"),
])
def test_the_schema_and_the_loader_refuse_the_same_mistakes(change, key):
    model = {"name": "m", "path": "models/m", "max_model_len": 1024}
    raw = {"models": [model], **change} if "colour" in change else {"models": [{**model, **change}]}
    assert list(_schema_validator().iter_errors(raw)), "an editor flags it"
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        catalogue.from_mapping(raw, pathlib.Path("/x"))


def test_config_commands(tmp_path, capsys):
    import json

    from roundhouse import cli

    assert cli.main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["required"] == ["models"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    path: m\n    max_model_len: 64\n    default_max_tokens: 100\n")
    assert cli.main(["config", "check", str(bad)]) == 1
    assert "models[0].default_max_tokens: above the model's token limit 64" in capsys.readouterr().err
    assert cli.main(["config", "check", str(SHIPPED[0])]) == 0
    assert cli.main(["nats-auth", "--config", str(bad)]) == 2, "any command's bad --config: an error, not a traceback"
    assert f"roundhouse: {bad}: models[0].default_max_tokens" in capsys.readouterr().err


def test_the_embedded_defaults_roundhouse_up_writes_load_and_point_at_their_models(tmp_path):
    """What `roundhouse up` without --config runs on (tests/integration/test_up.py runs `up` on
    a copy of it with a slow chat model, through --config)."""
    from roundhouse import stack

    path = stack.write_default(tmp_path / "var")
    assert path.read_text() == stack.DEFAULT_CONFIG.read_text()
    cat = catalogue.load(path)
    assert [m.name for m in cat.models] == ["chat", "code", "reasoning"]
    for m in cat.models:
        assert (pathlib.Path(m.path) / "config.json").exists() and (pathlib.Path(m.path) / "tokenizer.json").exists(), m.path

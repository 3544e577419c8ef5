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

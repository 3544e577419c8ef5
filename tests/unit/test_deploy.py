"""deploy/: every file parses, and everything one file names exists in another (services, ports,
config files, ConfigMaps, commands), checked with the services' own argument parsers."""
from __future__ import annotations

import pathlib
import re
import shlex
import tomllib

import pytest
import yaml

from manager_svc import config as manager_config
from roundhouse import catalogue, cli
from router_svc import config as router_config

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    """The example configs read their tenant's key from the environment, as compose and k8s set it."""
    monkeypatch.setenv("ROUNDHOUSE_API_KEY", "rh-test-key-0123456789abcdef")

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
CONTAINER_CONFIG = "/etc/roundhouse/models.yaml"


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _parse_service_command(argv: list[str], config_file: pathlib.Path):
    """Runs the real parser of the command on argv (the container's config path → the local file)."""
    assert argv[0] in SCRIPTS, f"{argv[0]} is not a console script of the package"
    args = [str(config_file) if a == CONTAINER_CONFIG else a for a in argv[1:]]
    if argv[0] == "router-svc":
        return router_config.parse(args)
    if argv[0] == "manager-svc":
        return manager_config.parse(args)
    return cli.parser().parse_args(args)


@pytest.mark.parametrize("path", sorted((DEPLOY / "config").glob("*.yaml")))
def test_example_configurations_load(path):
    cat = catalogue.load(path)
    assert cat.routing is not None, "every example shows routing"
    assert cat.routing.fallback in {m.name for m in cat.models}


def test_the_cpu_example_is_what_roundhouse_up_runs():
    from roundhouse import stack

    assert (DEPLOY / "config" / "cpu.yaml").resolve() == stack.DEFAULT_CONFIG.resolve()
    cat = catalogue.load(stack.DEFAULT_CONFIG)
    assert {m.name for m in cat.models} == {"chat", "code", "reasoning"}


def test_h100_example_is_the_seeds_line_up():
    cat = catalogue.load(DEPLOY / "config" / "h100.yaml")
    chat, code, reasoning = (cat.resolve(a) for a in ("chat", "code", "reasoning"))
    assert chat.pinned and not code.pinned and not reasoning.pinned
    assert "7B" in chat.name and "32B" in code.name and "70B" in reasoning.name
    assert all(m.gpu == "cuda:0" for m in cat.models) and cat.gpus[0].id == "cuda:0"
    assert len(chat.adapters) >= 2 and cat.resolve(chat.adapters[0].name) is chat, "a LoRA example on the chat model"


def _nats_conf_ok(text: str) -> None:
    block = re.search(r"jetstream\s*\{([^}]*)\}", text)
    assert block, "a jetstream block"
    assert re.search(r"^\s*sync_interval:\s*always\s*$", block.group(1), re.M), "fsync on every write"
    assert re.search(r"^\s*store_dir:\s*\S+", block.group(1), re.M), "file storage"


def test_nats_config_is_durable():
    _nats_conf_ok((DEPLOY / "nats" / "nats.conf").read_text())


def test_dockerfile_copies_what_exists_and_exposes_the_service_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert {50051, 50052, 8000} <= exposed


def test_compose_services_ports_volumes_and_commands_agree():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    nats_port = int(re.search(r"^port:\s*(\d+)", (DEPLOY / "nats" / "nats.conf").read_text(), re.M).group(1))
    ports: dict[str, set[int]] = {"nats": {nats_port}}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            if src.startswith("./"):
                assert (DEPLOY / src).exists(), f"{name}: {src}"
            elif not src.startswith("${"):
                assert src in doc.get("volumes", {}), f"{name}: volume {src} not declared"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        if svc.get("image", "").split(":")[0] != "roundhouse":
            continue  # nats, prometheus, grafana (monitoring: tests/unit/test_dashboard.py)
        argv = svc["command"]
        mounted = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        assert CONTAINER_CONFIG in mounted, f"{name}: the config file is mounted"
        parsed = _parse_service_command(argv, DEPLOY / mounted[CONTAINER_CONFIG])
        ports[name] = {p for p in (getattr(parsed, "port", None), getattr(parsed, "http_port", None)) if p}
        for published in svc.get("ports", []):
            host, inner = (int(x) for x in published.split(":"))
            assert inner in ports[name], f"{name} publishes {inner}, which it does not listen on"
        health = svc.get("healthcheck", {}).get("test")
        if health and health[1] == "roundhouse":
            assert int(health[-1].rsplit(":", 1)[1]) in ports[name]
    for name, svc in services.items():
        argv = svc.get("command", [])
        for flag in ("--nats-url", "--manager"):
            target = _flag(argv, flag)
            if target:
                host, port = target.removeprefix("nats://").split(":")
                assert host in services and int(port) in ports[host], f"{name} {flag} {target}"
        advertise = _flag(argv, "--advertise-host")
        if advertise:
            assert advertise == name, f"{name} advertises the name other services reach it by"
    gpu = services["gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


def _k8s_docs() -> list[dict]:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    docs = [d for r in kust["resources"] for d in yaml.safe_load_all((DEPLOY / r).read_text()) if d]
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for spec in gen["files"]:
            key, path = spec.split("=")
            data[key] = (DEPLOY / path).read_text()
        docs.append({"kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return docs


def test_kubernetes_services_probes_config_maps_and_commands_agree():
    docs = _k8s_docs()
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    workloads = {**by_kind.get("Deployment", {}), **by_kind.get("StatefulSet", {})}
    config_maps = by_kind["ConfigMap"]
    services = by_kind["Service"]
    _nats_conf_ok(config_maps["nats-config"]["data"]["nats.conf"])
    catalogue.from_mapping(yaml.safe_load(config_maps["roundhouse-models"]["data"]["models.yaml"]))
    for name, svc in services.items():
        matches = [w for w in workloads.values()
                   if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"service {name} selects exactly one workload"
        container_ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                           for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            assert target in container_ports or target in container_ports.values(), f"{name}: {target}"
    service_ports = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in services.items()}
    for wname, w in workloads.items():
        spec = w["spec"]["template"]["spec"]
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in config_maps, f"{wname}: ConfigMap {vol['configMap']['name']}"
        for c in spec["containers"]:
            named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:
                    how = c[probe].get("grpc") or c[probe].get("httpGet")
                    assert how["port"] in named or how["port"] in named.values(), f"{wname} {probe} port {how['port']}"
            argv = c.get("command", [])
            if argv[:2] == ["sh", "-c"]:
                argv = shlex.split(argv[2].replace("exec ", "", 1))
            if argv and argv[0] in SCRIPTS:
                for m in c.get("volumeMounts", []):
                    assert any(v["name"] == m["name"] for v in spec["volumes"]), f"{wname}: mount {m['name']}"
                _parse_service_command(argv, DEPLOY / "config" / "h100.yaml")
                for flag in ("--nats-url", "--manager"):
                    target = _flag(argv, flag)
                    if target:
                        host, port = target.removeprefix("nats://").split(":")
                        assert host in service_ports and int(port) in service_ports[host], f"{wname} {flag} {target}"
    assert "nvidia.com/gpu" in workloads["roundhouse-gpu0"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


_ROLE_OF = {"manager-svc": "manager", "router-svc": "router", "roundhouse": "worker"}


def _deploy_tenants() -> list[str]:
    """The tenants of the deploy configs (each gets a job-client NATS user); both configs have the same."""
    names = [[t["name"] for t in yaml.safe_load((DEPLOY / "config" / f).read_text()).get("tenants") or []]
             for f in ("h100.yaml", "h200.yaml")]
    assert names[0] == names[1]
    return names[0]


def test_nats_runs_one_user_per_role_as_roundhouse_nats_auth_writes_it():
    from roundhouse import natsauth

    written = natsauth.HEADER + natsauth.authorization(tenants=_deploy_tenants())
    assert (DEPLOY / "nats" / "auth.conf").read_text() == written, \
        "run `roundhouse nats-auth --config deploy/config/h100.yaml > deploy/nats/auth.conf`"
    assert re.search(r"^include \./auth\.conf", (DEPLOY / "nats" / "nats.conf").read_text(), re.M)
    config_map = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "nats-config")
    assert config_map["data"]["auth.conf"] == written and "include ./auth.conf" in config_map["data"]["nats.conf"]


def test_every_service_connects_to_nats_as_its_role():
    from roundhouse import natsauth

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    nats_env = doc["services"]["nats"]["environment"]
    assert {natsauth.password_variable(u) for u in natsauth.users(_deploy_tenants())} <= set(nats_env)
    for name, svc in doc["services"].items():
        if svc.get("image", "").split(":")[0] != "roundhouse":
            continue
        role = _ROLE_OF[svc["command"][0]]
        assert "--nats-url" not in svc["command"], f"{name}: credentials stay off the command line"
        url = svc["environment"][f"ROUNDHOUSE_{role.upper()}_NATS_URL"]
        assert url == f"nats://{role}:${{NATS_{role.upper()}_PASSWORD}}@nats:4222", (name, url)
    for d in _k8s_docs():
        if d["kind"] != "Deployment" and d["kind"] != "StatefulSet":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            if not c["image"].startswith("roundhouse"):
                continue
            argv = shlex.split(c["command"][-1]) if c["command"][0] == "sh" else c["command"]
            argv = argv[1:] if argv[0] == "exec" else argv
            role = _ROLE_OF[argv[0]]
            env = {e["name"]: e for e in c["env"]}
            assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "roundhouse-nats", "key": role}
            assert env[f"ROUNDHOUSE_{role.upper()}_NATS_URL"]["value"] == f"nats://{role}:$(NATS_PASSWORD)@nats:4222"
            assert "--nats-url" not in argv

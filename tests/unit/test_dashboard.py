"""deploy/grafana/roundhouse.json queries only metrics (and labels) the services really export, and
the monitoring deploy files agree with each other: Prometheus scrapes the ports the compose commands
pass, Grafana's provisioning finds the datasource and the dashboard compose mounts, and the
Kubernetes annotations / PodMonitors name the ports the pods declare."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import shlex

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

import manager_svc.metrics
import router_svc.metrics
import worker_svc.metrics
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
DASHBOARD = DEPLOY / "grafana" / "roundhouse.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
CONTAINER_CONFIG = "/etc/roundhouse/models.yaml"

METRIC = re.compile(r"(?<![A-Za-z0-9_:$])(roundhouse_[a-z_]+|vllm:[a-z_:]+)")
AGGREGATORS = r"(?:sum|avg|min|max|count|group|stddev|stdvar|topk|bottomk|quantile|count_values|limitk|limit_ratio)"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}
EXTRA_LABELS = {"_bucket": {"le"}}   # a histogram's buckets carry `le` besides the family's labels


# ---------------------------------------------------------------- what exists

def _roundhouse_series() -> dict[str, set[str] | None]:
    """Every series name the three metrics modules register → its labels (None: not learnable)."""
    labels: dict[str, tuple[str, ...]] = {}
    for mod in (router_svc.metrics, manager_svc.metrics, worker_svc.metrics):
        for obj in vars(mod).values():
            if isinstance(obj, MetricWrapperBase):      # Counter / Histogram objects: their label names
                labels[obj._name] = tuple(obj._labelnames)
    series: dict[str, set[str] | None] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("roundhouse_"):
            continue
        names = getattr(family, "_labelnames", None) or labels.get(family.name)  # custom collectors' families
        if names is None and family.samples:
            names = tuple(family.samples[0].labels)
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = None if names is None else set(names) | EXTRA_LABELS.get(suffix, set())
    return series


def _vllm_loggers() -> str:
    spec = importlib.util.find_spec("vllm")   # finds the package without importing it (slow)
    assert spec and spec.submodule_search_locations, "vllm is installed"
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics" / "loggers.py"
    return path.read_text()


def _vllm_series() -> tuple[dict[str, str], set[str] | None]:
    """vLLM's declared families (series name → its base name) and the labels its engine metrics share."""
    text = _vllm_loggers()
    series = {}
    for kind, name in re.findall(r"self\._(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[a-z_:]+)\"", text):
        base = name.removesuffix("_total") if kind == "counter" else name
        for suffix in SUFFIXES[kind]:
            series[base + suffix] = name
    common = re.search(r"labelnames = \[([^\]]*)\]", text)
    return series, ({s.strip().strip("\"'") for s in common.group(1).split(",")} | {"le"} if common else None)


ROUNDHOUSE = _roundhouse_series()
VLLM, VLLM_LABELS = _vllm_series()


# ---------------------------------------------------------------- the dashboard

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))   # a collapsed row keeps its panels inside
    return out


def _queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every query variable."""
    out = [(p["title"], t["expr"]) for p in _panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


def _unquoted(expr: str) -> str:
    """The expression with its string literals emptied: label values are never metric names."""
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def _group(s: str, start: int) -> tuple[str, int]:
    """The text inside the parenthesis opening at s[start], and the index after its closing one."""
    depth = 0
    for i in range(start, len(s)):
        depth += {"(": 1, ")": -1}.get(s[i], 0)
        if depth == 0:
            return s[start + 1:i], i + 1
    raise AssertionError(f"unbalanced parentheses in {s!r}")


def _aggregations(expr: str) -> list[tuple[list[str], str]]:
    """(labels of its by / without clause, the aggregated expression) of every aggregation in expr."""
    out = []
    for m in re.finditer(rf"\b{AGGREGATORS}\s*(?:by|without)\s*\(([^)]*)\)\s*\(", expr):   # sum by (x) (...)
        out.append(([lb.strip() for lb in m.group(1).split(",") if lb.strip()], _group(expr, m.end() - 1)[0]))
    for m in re.finditer(rf"\b{AGGREGATORS}\s*\(", expr):                                   # sum (...) by (x)
        inner, end = _group(expr, m.end() - 1)
        clause = re.match(r"\s*(?:by|without)\s*\(([^)]*)\)", expr[end:])
        if clause:
            out.append(([lb.strip() for lb in clause.group(1).split(",") if lb.strip()], inner))
    return out


def _labels_of(name: str) -> set[str] | None:
    return ROUNDHOUSE.get(name) if name.startswith("roundhouse_") else VLLM_LABELS


def test_the_label_knowledge_the_checks_rely_on_is_there():
    assert ROUNDHOUSE["roundhouse_requests_total"] == {"model", "endpoint", "status"}
    assert ROUNDHOUSE["roundhouse_model_load_seconds_bucket"] == {"model", "kind", "le"}
    assert ROUNDHOUSE["roundhouse_model_state"] == {"model", "state"}         # a custom collector's gauge
    assert "roundhouse_model_load_seconds" not in ROUNDHOUSE, "a histogram has no series of its bare name"
    assert VLLM["vllm:generation_tokens_total"] == "vllm:generation_tokens"
    assert VLLM_LABELS and "model_name" in VLLM_LABELS
    assert _aggregations("histogram_quantile(0.5, sum by (le, model) (rate(x_bucket[5m])))") == \
        [(["le", "model"], "rate(x_bucket[5m])")]
    assert _aggregations("sum(rate(y[5m])) by (gpu)") == [(["gpu"], "rate(y[5m])")]
    assert METRIC.findall(_unquoted('sum by (model) (roundhouse_x_total{rule="roundhouse_y"})')) == ["roundhouse_x_total"]


def test_dashboard_is_an_importable_grafana_dashboard():
    d = _dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"]
    assert model["datasource"]["uid"] == "${datasource}"
    assert re.fullmatch(r"label_values\(\s*roundhouse_model_state\s*,\s*model\s*\)", model["definition"])
    panels = _panels(d)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "state-timeline", "bargauge", "gauge", "table"}, p["type"]
        assert p["title"] and len(p.get("description", "")) > 20, f"{p['title']!r} says what it shows"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}", p["title"]


def test_dashboard_queries_name_only_metrics_that_exist():
    seen = set()
    for where, expr in _queries(_dashboard()):
        bare = _unquoted(expr)
        names = METRIC.findall(bare)
        assert names, f"{where}: {expr} names no Roundhouse or vLLM metric"
        for name in names:
            seen.add(name)
            if name.startswith("roundhouse_"):
                assert name in ROUNDHOUSE, f"{where}: {name} is not a series the services export"
            else:
                assert name in VLLM, f"{where}: {name} is not a series vllm/v1/metrics/loggers.py declares"
                assert f'"{VLLM[name]}"' in _vllm_loggers(), name
        # an identifier selected with {...} or [range] that is none of ours would be a typo
        for ident in re.findall(r"(?<![A-Za-z0-9_:$])([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]", bare):
            assert METRIC.fullmatch(ident), f"{where}: {ident} is not a Roundhouse or vLLM metric"
    for needed in ("roundhouse_model_tier", "roundhouse_gpu_used_bytes", "roundhouse_gpu_budget_bytes",
                   "roundhouse_model_loads_total", "roundhouse_model_load_seconds_bucket",
                   "roundhouse_model_evictions_total", "roundhouse_model_eviction_seconds_bucket",
                   "roundhouse_request_queue_seconds_bucket", "roundhouse_requests_waiting",
                   "roundhouse_model_queue_depth", "roundhouse_time_to_first_token_seconds_bucket",
                   "roundhouse_generation_tokens_total", "roundhouse_requests_total",
                   "roundhouse_model_load_failures_total", "roundhouse_worker_redeliveries_total",
                   "roundhouse_worker_naks_total", "roundhouse_worker_requests_total", "vllm:kv_cache_usage_perc"):
        assert needed in seen, f"the dashboard shows {needed}"


def test_dashboard_queries_use_only_labels_their_metrics_have():
    for where, expr in _queries(_dashboard()):
        bare = _unquoted(expr)
        for m in re.finditer(r"(?<![A-Za-z0-9_:$])(roundhouse_[a-z_]+|vllm:[a-z_:]+)\s*\{([^}]*)\}", bare):
            known = _labels_of(m.group(1))
            for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
                assert known is None or label in known, f"{where}: {m.group(1)} has no label {label!r}"
        for labels, inner in _aggregations(bare):
            for name in set(METRIC.findall(inner)):
                known = _labels_of(name)
                missing = set(labels) - known if known is not None else set()
                assert not missing, f"{where}: aggregates {name} by {sorted(missing)}, which it lacks"


def test_dashboard_quantiles_rates_and_the_model_filter_are_well_formed():
    counters = ("_total", "_bucket", "_sum", "_count")
    for where, expr in _queries(_dashboard()):
        if where.startswith("variable"):
            continue
        bare = _unquoted(expr)
        for m in re.finditer(r"\bhistogram_quantile\s*\(", bare):
            inner, _ = _group(bare, m.end() - 1)
            aggs = _aggregations(inner)
            assert aggs and "le" in aggs[0][0], f"{where}: histogram_quantile over a sum by (le, ...)"
            assert all(n.endswith("_bucket") for n in METRIC.findall(inner)), f"{where}: quantiles of _bucket series"
        for m in re.finditer(r"\b(rate|increase|irate)\s*\(", bare):
            inner, _ = _group(bare, m.end() - 1)
            for name in METRIC.findall(inner):
                assert name.endswith(counters), f"{where}: {m.group(1)}() of {name}, which is not a counter"
        # the Model picker filters every per-model series
        for m in re.finditer(r"(?<![A-Za-z0-9_:$])(roundhouse_[a-z_]+|vllm:[a-z_:]+)(\s*\{[^}]*\})?", bare):
            known = _labels_of(m.group(1)) or set()
            label = "model" if "model" in known and m.group(1).startswith("roundhouse_") else \
                "model_name" if m.group(1).startswith("vllm:") else None
            if label:
                assert re.search(rf"\b{label}=~", m.group(2) or ""), f"{where}: {m.group(1)} without {label}=~$model"
        for value in re.findall(r'\bmodel(?:_name)?\s*=~\s*"([^"]*)"', expr):
            assert value == "$model", f"{where}: filters by the Model variable, not {value!r}"


def test_dashboard_shows_residency_as_a_state_timeline_and_quantiles_of_swaps_and_ttft():
    panels = [p for p in _panels(_dashboard()) if p["type"] != "row"]
    timelines = [p for p in panels if p["type"] == "state-timeline"]
    assert any(re.search(r"roundhouse_model_(tier|state)\b", t["expr"]) for p in timelines for t in p["targets"])
    for p in timelines:
        shown = {text["text"] for mp in p["fieldConfig"]["defaults"]["mappings"] for text in mp["options"].values()}
        assert len(shown) >= 3, f"{p['title']}: its states have names"
    exprs = [t["expr"] for p in panels for t in p["targets"]]

    def quantiles(metric):
        return {float(m) for e in exprs if f"{metric}_bucket" in e for m in re.findall(r"histogram_quantile\(([\d.]+)", e)}

    assert {0.5, 0.95, 0.99} <= quantiles("roundhouse_time_to_first_token_seconds")
    assert {0.5, 0.95} <= quantiles("roundhouse_request_queue_seconds")
    assert {0.5, 0.95} <= quantiles("roundhouse_model_load_seconds")
    assert {0.5, 0.95} <= quantiles("roundhouse_model_eviction_seconds")
    assert any(re.search(r'status!="ok"', e) for e in exprs), "a panel of requests that did not end ok"


# ---------------------------------------------------------------- Prometheus and Grafana in compose

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _mounts(svc: dict) -> dict[str, str]:
    """container path → source, of a compose service's volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}


def _metrics_endpoints(name: str, svc: dict) -> set[str]:
    """host:port of every /metrics a Roundhouse compose service serves, from its real parser."""
    argv = svc["command"]
    config = DEPLOY / _mounts(svc)[CONTAINER_CONFIG]
    args = [str(config) if a == CONTAINER_CONFIG else a for a in argv[1:]]
    if argv[0] == "router-svc":
        return {f"{name}:{router_config.parse(args).http_port}"}
    if argv[0] == "manager-svc":
        port = manager_config.parse(args).metrics_port
        assert port > 0, f"{name}: a fixed --metrics-port Prometheus can scrape"
        return {f"{name}:{port}"}
    a = cli.parser().parse_args(args)
    assert a.cmd == "workers" and a.metrics_port > 0, f"{name}: a fixed --metrics-port base"
    models = [m for m in catalogue.load(config).models if a.gpu in ("", m.gpu)]
    assert models
    return {f"{name}:{a.metrics_port + i}" for i in range(len(models))}


def _seconds(duration: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m)", duration)
    assert m, duration
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[m.group(2)]


def test_prometheus_scrapes_every_metrics_port_compose_configures():
    services = _compose()["services"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert 5 <= _seconds(prom["global"]["scrape_interval"]) <= 15
    jobs = [j["job_name"] for j in prom["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), "job names are unique"
    expected: set[str] = set()
    for name, svc in services.items():
        if svc.get("image", "").split(":")[0] == "roundhouse":
            expected |= _metrics_endpoints(name, svc)
            for endpoint in _metrics_endpoints(name, svc):
                port = endpoint.rsplit(":", 1)[1]
                published = {p.split(":")[-1] for p in svc.get("ports", [])}
                assert port in set(svc.get("expose", [])) | published, f"{name} declares {port}"
    assert {"router:8000", "manager:9101", "gpu0:9102", "gpu0:9103", "gpu0:9104"} <= expected
    scraped = set()
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            for target in sc["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in services or host == "localhost", f"{job['job_name']}: {target} is no compose service"
                if host in services:
                    scraped.add(target)
    assert scraped == expected


def test_prometheus_service_reads_that_file():
    svc = _compose()["services"]["prometheus"]
    assert svc["image"].split(":")[0] == "prom/prometheus"
    config_file = next(a.split("=", 1)[1] for a in svc["command"] if a.startswith("--config.file="))
    assert _mounts(svc).get(config_file) == "./prometheus/prometheus.yml", f"{config_file} is the mounted file"
    assert "9090:9090" in svc["ports"]


def _provisioning(kind: str) -> list[dict]:
    files = sorted((PROVISIONING / kind).glob("*.y*ml"))
    assert files, f"provisioning/{kind}/ holds a YAML file"
    docs = [yaml.safe_load(f.read_text()) for f in files]
    assert all(d["apiVersion"] == 1 for d in docs)
    return docs


def test_grafana_provisioning_finds_prometheus_and_the_mounted_dashboard():
    services = _compose()["services"]
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    assert grafana["image"].split(":")[0] == "grafana/grafana" and "3000:3000" in grafana["ports"]
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert "prometheus" in grafana.get("depends_on", [])

    sources = [s for d in _provisioning("datasources") for s in d["datasources"]]
    prom = [s for s in sources if s["type"] == "prometheus"]
    assert len(prom) == 1 and prom[0].get("isDefault"), "the dashboard's ${datasource} defaults to it"
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/?", prom[0]["url"])
    assert m and m.group(1) in services, prom[0]["url"]
    listens = {p.split(":")[-1] for p in services[m.group(1)].get("ports", [])}
    assert m.group(2) in listens, f"{prom[0]['url']}: the port Prometheus listens on"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["global"]["scrape_interval"]
    assert _seconds(prom[0]["jsonData"]["timeInterval"]) == _seconds(scrape)

    providers = [p for d in _provisioning("dashboards") for p in d["providers"]]
    paths = [pathlib.PurePosixPath(p["options"]["path"]) for p in providers if p["type"] == "file"]
    dashboards = {dst: src for dst, src in mounts.items()
                  if (DEPLOY / src).resolve() == DASHBOARD.resolve()}
    assert dashboards, "compose mounts grafana/roundhouse.json into the Grafana container"
    for dst in dashboards:
        assert any(pathlib.PurePosixPath(dst).parent == p or pathlib.PurePosixPath(dst) == p for p in paths), \
            f"a dashboard provider reads {dst}"
    home = grafana.get("environment", {}).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or home in dashboards, "the home dashboard is the mounted file"


# ---------------------------------------------------------------- Kubernetes

def _workloads() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "roundhouse.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d and d["kind"] in ("Deployment", "StatefulSet")}


def _argv(container: dict) -> list[str]:
    argv = container["command"]
    return shlex.split(argv[2].replace("exec ", "", 1)) if argv[:2] == ["sh", "-c"] else argv


def test_kubernetes_pods_declare_and_annotate_their_metrics_ports():
    workloads = _workloads()
    config = DEPLOY / "config" / "h100.yaml"   # the ConfigMap's source (deploy/kustomization.yaml)
    for name, w in workloads.items():
        tmpl = w["spec"]["template"]
        notes = tmpl["metadata"].get("annotations", {})
        c = tmpl["spec"]["containers"][0]
        argv = _argv(c)
        ports = {p["containerPort"]: p["name"] for p in c.get("ports", [])}
        args = [str(config) if a == CONTAINER_CONFIG else a for a in argv[1:]]
        if argv[0] == "router-svc":
            want = {router_config.parse(args).http_port}
        elif argv[0] == "manager-svc":
            want = {manager_config.parse(args).metrics_port}
            assert ports.get(next(iter(want))) == "metrics"
        elif argv[:2] == ["roundhouse", "workers"]:
            a = cli.parser().parse_args(args)
            n = sum(1 for m in catalogue.load(config).models if a.gpu in ("", m.gpu))
            want = {a.metrics_port + i for i in range(n)}
            assert set(ports) == want, f"{name}: exactly its workers' metrics ports (scraped port by port)"
        else:
            continue
        assert notes.get("prometheus.io/scrape") == "true", name
        assert notes.get("prometheus.io/path") == "/metrics", name
        assert want <= set(ports), f"{name} declares {sorted(want)}"
        if len(want) == 1:
            assert notes.get("prometheus.io/port") == str(next(iter(want))), name
        else:
            assert "prometheus.io/port" not in notes, f"{name}: one port would hide the other workers"


def test_podmonitors_are_optional_and_cover_every_metrics_port():
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert "k8s/monitoring.yaml" not in kust["resources"], "operator CRDs stay out of the default apply"
    monitors = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "monitoring.yaml").read_text()) if d]
    assert monitors and all(m["kind"] == "PodMonitor" for m in monitors)
    covered: dict[str, set[str]] = {}
    workloads = _workloads()
    for mon in monitors:
        sel = mon["spec"]["selector"]["matchLabels"]
        matches = [n for n, w in workloads.items() if sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"{mon['metadata']['name']} selects one workload"
        c = workloads[matches[0]]["spec"]["template"]["spec"]["containers"][0]
        named = {p["name"] for p in c.get("ports", [])}
        for ep in mon["spec"]["podMetricsEndpoints"]:
            assert ep["port"] in named, f"{mon['metadata']['name']}: {ep['port']} is a port of {matches[0]}"
            assert ep.get("path", "/metrics") == "/metrics"
            covered.setdefault(matches[0], set()).add(ep["port"])
    for name, w in workloads.items():
        notes = w["spec"]["template"]["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") != "true":
            continue
        c = w["spec"]["template"]["spec"]["containers"][0]
        if "prometheus.io/port" in notes:
            port = int(notes["prometheus.io/port"])
            want = {p["name"] for p in c["ports"] if p["containerPort"] == port}
        else:
            want = {p["name"] for p in c["ports"]}
        assert want and want <= covered.get(name, set()), f"a PodMonitor scrapes {name}'s {sorted(want)}"

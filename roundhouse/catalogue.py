"""The model catalogue: which models exist, under which names, with which limits.

Loaded once from YAML at each service's edge and passed down. Every error names the bad key:

    models:
      - name: tiny-0               # required, unique across names and aliases
        aliases: [chat]
        path: var/models/tiny-0    # model directory (relative paths: to the YAML file)
        max_model_len: 1024        # context length (prompt + completion)
        max_tokens_limit: 512      # optional cap on max_tokens (default: max_model_len)
        default_max_tokens: 128    # used when a request sets none
        max_num_seqs: 64           # engine slots
        kv_cache_bytes: 256MiB     # KV-cache reservation per engine (bytes, or with KiB/MiB/GiB)
        priority: 0                # higher stays resident longer under pressure
        pinned: false              # never evicted
        min_resident_s: 30         # not evicted sooner after its load (stops thrashing)
        gpu: cpu                   # which budget it counts against
        max_queued: 1024           # waiting requests a router admits; more get RESOURCE_EXHAUSTED / 429
        adapters:                  # LoRA adapters served by this model's engine, requested by name
          - {name: support-tone, path: adapters/support-tone}
        max_loras: 4               # adapters in one engine batch
        max_lora_rank: 16
        enforce_eager: false       # true skips torch.compile (CPU) / CUDA graphs: faster load, slower steps
        logits_processors: []      # vLLM logits processor classes ("package.module:Class"), as
                                   # `vllm serve --logits-processors`; importable by the worker
        engine_metrics: true       # vLLM's own vllm:* metrics on the worker's /metrics (false: its
                                   # engine keeps no statistics, as `vllm serve --disable-log-stats`)

    gpus:                          # optional; default: one "cpu" GPU with 8GiB
      - id: cpu                    # or cuda:0, ...
        budget_bytes: 8GiB         # required on CPU; on CUDA default: total memory x utilization
        utilization: 0.85
        engine_overhead_bytes: 256MiB   # also what a sleeping engine keeps on the GPU
        swap: auto                 # evicting a model: auto (sleep on CUDA, stop on CPU) | sleep | stop.
                                   # sleep: level 1 (weights to host RAM) while its host's sleep
                                   # budget has room, else level 2 (weights discarded, process and
                                   # compiled graphs kept). On CPU vLLM's sleep frees no memory.
        host: local                # the worker host it is on

    hosts:                         # optional; a host not listed lends 32GiB
      - id: local
        sleep_budget_bytes: 32GiB  # host RAM for the weights of level-1 sleeping engines

    manager:                       # optional
      drain_timeout_s: 30          # in-flight requests of a model being evicted get this long
      load_backoff_s: 10           # after a failed load or an engine death; doubles on each, up to 300 s
      report_interval_s: 2         # workers refresh their report this often
      queue_poll_s: 0.5
      starvation_s: 30             # a waiting model may drain busy ones after waiting this long
      worker_timeout_s: 10         # a worker that has not reported this long is lost (its models: unloaded)

    routing:                       # optional; model "auto" (see roundhouse/routing.py)
      default_model: auto
      fallback: chat
      rules: [...]
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from roundhouse import routing, tenancy, tls


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key."""


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter: requests name it like a model; the base model's engine serves it."""
    name: str
    path: str


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    max_model_len: int
    aliases: tuple[str, ...] = ()
    max_tokens_limit: int = 0       # 0: max_model_len
    default_max_tokens: int = 256
    max_num_seqs: int = 64
    kv_cache_bytes: int = 256 * 2**20
    priority: int = 0
    pinned: bool = False
    min_resident_s: float = 30.0
    gpu: str = "cpu"
    max_queued: int = 1024
    adapters: tuple[AdapterSpec, ...] = ()
    max_loras: int = 4
    max_lora_rank: int = 16
    enforce_eager: bool = False     # True: no torch.compile / CUDA graphs (faster start, slower steps)
    logits_processors: tuple[str, ...] = ()   # vLLM logits processor classes loaded into its engine
    engine_metrics: bool = True     # vLLM's own `vllm:*` metrics on the worker's /metrics (as `vllm serve`)

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit or self.max_model_len


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    id: str
    budget_bytes: int = 0            # 0: detect (CUDA) — required on CPU
    utilization: float = 0.85
    engine_overhead_bytes: int = 256 * 2**20   # also what a sleeping engine keeps on it
    swap: str = "auto"               # how its models are evicted: auto (sleep on CUDA, stop on CPU) | sleep | stop
    host: str = "local"              # the worker host it is on: its GPUs share that host's sleep budget


SWAP_MODES = ("auto", "sleep", "stop")
DEFAULT_SLEEP_BUDGET_BYTES = 32 * 2**30


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """A worker host: the RAM it lends to the weights of sleeping engines (level 1)."""
    id: str
    sleep_budget_bytes: int = DEFAULT_SLEEP_BUDGET_BYTES


@dataclasses.dataclass(frozen=True)
class ManagerSpec:
    drain_timeout_s: float = 30.0
    load_backoff_s: float = 10.0
    report_interval_s: float = 2.0
    queue_poll_s: float = 0.5
    starvation_s: float = 30.0        # a waiting model may drain busy ones after this long
    worker_timeout_s: float = 10.0    # a worker silent this long is lost: its models count as unloaded


DEFAULT_GPUS = (GpuSpec(id="cpu", budget_bytes=8 * 2**30),)


@dataclasses.dataclass(frozen=True)
class Catalogue:
    models: tuple[ModelSpec, ...]
    gpus: tuple[GpuSpec, ...] = DEFAULT_GPUS
    manager: ManagerSpec = ManagerSpec()
    routing: "routing.RoutingSpec | None" = None
    hosts: tuple[HostSpec, ...] = ()
    tenants: tuple[tenancy.TenantSpec, ...] = ()   # none: the router asks for no key
    admin: tenancy.AdminSpec | None = None         # none: the manager's admin calls and reports are open
    tls: tls.TlsSpec | None = None                 # none: plaintext ports (roundhouse.tls)

    def servable(self) -> dict[str, tuple[str, ...]]:
        """What a request can name, by canonical name: each model (its name and aliases) and
        each adapter (its name)."""
        out = {m.name: (m.name, *m.aliases) for m in self.models}
        out.update((a.name, (a.name,)) for m in self.models for a in m.adapters)
        return out

    def host(self, gpu: GpuSpec) -> HostSpec:
        """The host `gpu` is on (its settings, or the defaults when `hosts` does not list it)."""
        return next((h for h in self.hosts if h.id == gpu.host), HostSpec(gpu.host))

    def __post_init__(self):
        index: dict[str, ModelSpec] = {}
        adapters: dict[str, AdapterSpec] = {}
        for m in self.models:
            for key in (m.name, *m.aliases, *(a.name for a in m.adapters)):
                if key in index:
                    raise ConfigError(f"models: name, alias or adapter {key!r} is used twice")
                index[key] = m
            adapters.update((a.name, a) for a in m.adapters)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_adapters", adapters)

    def adapter(self, name: str) -> AdapterSpec | None:
        """The LoRA adapter `name` names, or None (then it is a model name, an alias or unknown)."""
        return self._adapters.get(name)  # type: ignore[attr-defined]

    def resolve(self, name: str) -> ModelSpec | None:
        """The model a request's `model` field names (a name or an alias), or None."""
        return self._index.get(name)  # type: ignore[attr-defined]

    def get(self, name: str) -> ModelSpec:
        spec = self.resolve(name)
        if spec is None:
            raise ConfigError(f"model {name!r} is not in the catalogue")
        return spec


def _build(cls, raw: Any, where: str, required: set[str]):
    """A `cls` dataclass from a mapping, every value type-checked; errors name the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(fields))})")
    missing = required - set(raw)
    if missing:
        raise ConfigError(f"{where}.{sorted(missing)[0]}: required")
    return cls(**{key: _coerce(f"{where}.{key}", fields[key].type, value) for key, value in raw.items()})


def _positive(obj, where: str, *keys: str, allow_zero: tuple[str, ...] = ()) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < 0 or (value == 0 and key not in allow_zero):
            raise ConfigError(f"{where}.{key}: must be {'>= 0' if key in allow_zero else '> 0'}")


_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
_REQUIRED = {"name", "path", "max_model_len"}


def _model(raw: Any, where: str, base: pathlib.Path) -> ModelSpec:
    spec = _build(ModelSpec, raw, where, _REQUIRED)
    spec = dataclasses.replace(spec, path=_absolute(spec.path, base),
                               adapters=tuple(dataclasses.replace(a, path=_absolute(a.path, base)) for a in spec.adapters))
    _positive(spec, where, "max_model_len", "default_max_tokens", "max_num_seqs", "kv_cache_bytes", "max_tokens_limit",
              "min_resident_s", "max_queued", "max_loras", "max_lora_rank", allow_zero=("max_tokens_limit", "min_resident_s"))
    if spec.default_max_tokens > spec.token_limit:
        raise ConfigError(f"{where}.default_max_tokens: above the model's token limit {spec.token_limit}")
    return spec


def _absolute(path: str, base: pathlib.Path) -> str:
    p = pathlib.Path(path)
    return str(p if p.is_absolute() else (base / p).resolve())


def _gpu(raw: Any, where: str) -> GpuSpec:
    gpu = _build(GpuSpec, raw, where, {"id"})
    _positive(gpu, where, "budget_bytes", "engine_overhead_bytes", allow_zero=("budget_bytes", "engine_overhead_bytes"))
    if not 0 < gpu.utilization <= 1:
        raise ConfigError(f"{where}.utilization: must be in (0, 1]")
    if gpu.budget_bytes == 0 and not gpu.id.startswith("cuda"):
        raise ConfigError(f"{where}.budget_bytes: required for {gpu.id!r} (detected only on CUDA)")
    if gpu.swap not in SWAP_MODES:
        raise ConfigError(f"{where}.swap: must be one of {', '.join(SWAP_MODES)}, got {gpu.swap!r}")
    return gpu


def _host(raw: Any, where: str) -> HostSpec:
    host = _build(HostSpec, raw, where, {"id"})
    _positive(host, where, "sleep_budget_bytes", allow_zero=("sleep_budget_bytes",))
    return host


def _coerce(where: str, typ: str, value: Any) -> Any:
    if typ == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a non-empty string")
        return value
    if typ == "int" and where.endswith("_bytes"):
        return parse_size(where, value)
    if typ == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if typ == "tuple[AdapterSpec, ...]":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list of {{name, path}}")
        return tuple(_build(AdapterSpec, a, f"{where}[{i}]", {"name", "path"}) for i, a in enumerate(value))
    if typ == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{where}: must be a list of non-empty strings")
        return tuple(value)
    raise AssertionError(typ)


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(where: str, value: Any) -> int:
    """Bytes from an integer or a string like '256MiB' / '1.5 GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{where}: must be a size in bytes (an integer, or like '256MiB', '2GiB'), got {value!r}")


def from_mapping(raw: Any, base: pathlib.Path = pathlib.Path(".")) -> Catalogue:
    if not isinstance(raw, Mapping) or "models" not in raw:
        raise ConfigError("models: required (a list of models)")
    models = raw["models"]
    if not isinstance(models, list) or not models:
        raise ConfigError("models: must be a non-empty list")
    unknown = set(raw) - {"admin", "models", "gpus", "hosts", "manager", "routing", "tenants", "tls"}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key (known: admin, gpus, hosts, manager, models, routing, tenants, tls)")
    specs = tuple(_model(m, f"models[{i}]", base) for i, m in enumerate(models))
    gpus = DEFAULT_GPUS
    if "gpus" in raw:
        if not isinstance(raw["gpus"], list) or not raw["gpus"]:
            raise ConfigError("gpus: must be a non-empty list")
        gpus = tuple(_gpu(g, f"gpus[{i}]") for i, g in enumerate(raw["gpus"]))
        if len({g.id for g in gpus}) != len(gpus):
            raise ConfigError("gpus: an id is used twice")
    manager = _build(ManagerSpec, raw.get("manager") or {}, "manager", set())
    _positive(manager, "manager", "drain_timeout_s", "load_backoff_s", "report_interval_s", "queue_poll_s", "starvation_s",
              "worker_timeout_s", allow_zero=("drain_timeout_s",))
    if manager.worker_timeout_s <= 2 * manager.report_interval_s:
        raise ConfigError(f"manager.worker_timeout_s ({manager.worker_timeout_s}) must exceed twice report_interval_s "
                          f"({manager.report_interval_s}): one late report must not count as a lost worker")
    known = {g.id for g in gpus}
    for i, m in enumerate(specs):
        if m.gpu not in known:
            raise ConfigError(f"models[{i}].gpu: {m.gpu!r} is not in gpus ({', '.join(sorted(known))})")
    hosts: tuple[HostSpec, ...] = ()
    if "hosts" in raw:
        if not isinstance(raw["hosts"], list):
            raise ConfigError("hosts: must be a list")
        hosts = tuple(_host(h, f"hosts[{i}]") for i, h in enumerate(raw["hosts"]))
        if len({h.id for h in hosts}) != len(hosts):
            raise ConfigError("hosts: an id is used twice")
    cat = Catalogue(specs, gpus, manager, hosts=hosts)
    if raw.get("routing") is not None:
        try:
            rules = routing.parse(raw["routing"], lambda name: name if cat.adapter(name) else getattr(cat.resolve(name), "name", None))
        except routing.RoutingError as e:
            raise ConfigError(str(e)) from e
        if cat.resolve(routing.AUTO) is not None:
            raise ConfigError(f"models: {routing.AUTO!r} is reserved for classification (routing); rename that model")
        if rules.classifier is not None and rules.classifier.model_file:  # relative to this file, as model paths
            rules = dataclasses.replace(rules, classifier=dataclasses.replace(
                rules.classifier, model_file=_absolute(rules.classifier.model_file, base)))
        cat = dataclasses.replace(cat, routing=rules)
    if raw.get("tenants") is not None:
        cat = dataclasses.replace(cat, tenants=_tenants(raw["tenants"], cat, base))
    if raw.get("admin") is not None:
        try:
            admin = tenancy.parse_admin(raw["admin"])
        except tenancy.TenancyError as e:
            raise ConfigError(str(e)) from e
        cat = dataclasses.replace(cat, admin=admin.model_copy(update={
            "keys": tuple(_key_file(k, base) for k in admin.keys), "worker_key": _key_file(admin.worker_key, base)}))
    if raw.get("tls") is not None:
        try:
            cat = dataclasses.replace(cat, tls=tls.parse(raw["tls"], lambda p: _absolute(p, base)))
        except tls.TlsError as e:
            raise ConfigError(str(e)) from e
    return cat


def _tenants(raw: Any, cat: Catalogue, base: pathlib.Path) -> tuple[tenancy.TenantSpec, ...]:
    """The tenants, their key files made absolute (as model paths), every model pattern checked."""
    try:
        tenants = tenancy.parse(raw)
        servable = cat.servable()
        for t in tenants:
            tenancy.allowed_models(t, servable)
    except tenancy.TenancyError as e:
        raise ConfigError(str(e)) from e
    return tuple(t.model_copy(update={"keys": tuple(_key_file(k, base) for k in t.keys)}) for t in tenants)


def _key_file(ref: "tenancy.KeyRef | None", base: pathlib.Path) -> "tenancy.KeyRef | None":
    """`ref` with its file (if it names one) relative to the config file, as model paths."""
    return ref.model_copy(update={"file": _absolute(ref.file, base)}) if ref is not None and ref.file is not None else ref


def load(path: str | pathlib.Path) -> Catalogue:
    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return from_mapping(raw, path.parent)


def dump(models: Iterable[ModelSpec], gpus: Iterable[GpuSpec] = (), manager: ManagerSpec | None = None,
         routing_section: Mapping | None = None, hosts: Iterable[HostSpec] = ()) -> str:
    """YAML for a catalogue (used to write the embedded defaults and test catalogues)."""
    out = []
    for m in models:
        d = {k: v for k, v in dataclasses.asdict(m).items() if v != _MODEL_DEFAULTS[k] or k in _REQUIRED}
        for key in ("aliases", "logits_processors"):
            if key in d:
                d[key] = list(d[key])
        if "adapters" in d:
            d["adapters"] = [dict(a) for a in d["adapters"]]
        out.append(d)
    doc: dict[str, Any] = {"models": out}
    if gpus:
        doc["gpus"] = [dataclasses.asdict(g) for g in gpus]
    if hosts:
        doc["hosts"] = [dataclasses.asdict(h) for h in hosts]
    if manager is not None:
        doc["manager"] = dataclasses.asdict(manager)
    if routing_section is not None:
        doc["routing"] = dict(routing_section)
    return yaml.safe_dump(doc, sort_keys=False)


def weight_bytes(model_path: str) -> int:
    """Weights on disk (safetensors files): the estimate of their size in memory."""
    return sum(p.stat().st_size for p in pathlib.Path(model_path).glob("*.safetensors"))

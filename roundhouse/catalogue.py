"""The model catalogue: which models exist, under which names, with which limits.

Loaded once from YAML at each service's edge and passed down. The whole file is checked by one
pydantic schema (`ConfigFile`: the sections below, routing's, tenancy's and tls's); every error
names the bad key, and `roundhouse config schema` prints it as JSON Schema for editors
(`roundhouse config check FILE` checks a file):

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
        engine_sched_idle: false   # CPU engines: the engine's processes in SCHED_IDLE (first tokens
                                   # sooner on a small host, fewer tokens/s; see README)
        stream_interval: 1         # tokens per streamed chunk, as `vllm serve --stream-interval`: the
                                   # first and last go at once; more: fewer, larger chunks, less
                                   # host CPU per token (a request may ask for more, never fewer)

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
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass

from roundhouse import routing, schema, tenancy, tls
from roundhouse.routing import RoutingSpec
from roundhouse.tenancy import AdminSpec, Tenants
from roundhouse.tls import TlsSpec
from roundhouse.schema import ConfigPath, NonEmpty, Size


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key."""


Positive = Annotated[StrictInt, Field(gt=0)]
Count = Annotated[StrictInt, Field(ge=0)]
Seconds = Annotated[StrictFloat, Field(ge=0)]
PositiveSeconds = Annotated[StrictFloat, Field(gt=0)]


@dataclass(frozen=True, config=schema.DATA)
class AdapterSpec:
    """A LoRA adapter: requests name it like a model; the base model's engine serves it."""
    name: NonEmpty
    path: ConfigPath


@dataclass(frozen=True, config=schema.DATA)
class ModelSpec:
    name: NonEmpty = Field(description="unique across names, aliases and adapters")
    path: ConfigPath = Field(description="model directory (relative paths: to the config file)")
    max_model_len: Positive = Field(description="context length (prompt + completion)")
    aliases: tuple[NonEmpty, ...] = ()
    max_tokens_limit: Count = Field(0, description="cap on max_tokens (0: max_model_len)")
    default_max_tokens: Positive = Field(256, description="used when a request sets none")
    max_num_seqs: Positive = Field(64, description="engine slots")
    kv_cache_bytes: Size = Field(256 * 2**20, description="KV-cache reservation per engine")
    priority: StrictInt = Field(0, description="higher stays resident longer under pressure")
    pinned: StrictBool = Field(False, description="never evicted")
    min_resident_s: Seconds = Field(30.0, description="not evicted sooner after its load (stops thrashing)")
    gpu: NonEmpty = Field("cpu", description="which GPU budget it counts against (an id in gpus)")
    max_queued: Positive = Field(1024, description="waiting requests a router admits; more get 429 / RESOURCE_EXHAUSTED")
    adapters: tuple[AdapterSpec, ...] = ()
    max_loras: Positive = Field(4, description="adapters in one engine batch")
    max_lora_rank: Positive = 16
    enforce_eager: StrictBool = Field(False, description="no torch.compile / CUDA graphs: faster start, slower steps")
    logits_processors: tuple[NonEmpty, ...] = Field(
        (), description="vLLM logits processor classes (package.module:Class) loaded into its engine")
    engine_metrics: StrictBool = Field(True, description="vLLM's own vllm:* metrics on the worker's /metrics")
    engine_sched_idle: StrictBool = Field(
        False, description="CPU engines: run the engine's processes in SCHED_IDLE, so the serving path never waits "
                           "behind vLLM's busy-polling (lower time to first token on small hosts, lower throughput)")
    stream_interval: Positive = Field(
        1, description="tokens per streamed chunk, as vllm serve --stream-interval (first and last chunks go at once)")

    @property
    def token_limit(self) -> int:
        return self.max_tokens_limit or self.max_model_len

    @model_validator(mode="after")
    def _default_fits(self) -> "ModelSpec":
        if self.default_max_tokens > self.token_limit:
            raise ValueError(f"default_max_tokens: above the model's token limit {self.token_limit}")
        return self


SWAP_MODES = ("auto", "sleep", "stop")
DEFAULT_SLEEP_BUDGET_BYTES = 32 * 2**30


@dataclass(frozen=True, config=schema.DATA)
class GpuSpec:
    id: NonEmpty = Field(description="cpu, cuda:0, ...")
    budget_bytes: Size = Field(0, description="0: detected (CUDA only; required on CPU)")
    utilization: float = Field(0.85, gt=0, le=1, strict=True, description="of the detected memory, on CUDA")
    engine_overhead_bytes: Size = Field(256 * 2**20, description="also what a sleeping engine keeps on it")
    swap: Literal["auto", "sleep", "stop"] = Field(
        "auto", description="how its models are evicted: auto (sleep on CUDA, stop on CPU), sleep, stop")
    host: NonEmpty = Field("local", description="the worker host it is on: its GPUs share that host's sleep budget")

    @model_validator(mode="after")
    def _budget_known(self) -> "GpuSpec":
        if self.budget_bytes == 0 and not self.id.startswith("cuda"):
            raise ValueError(f"budget_bytes: required for {self.id!r} (detected only on CUDA)")
        return self


@dataclass(frozen=True, config=schema.DATA)
class HostSpec:
    """A worker host: the RAM it lends to the weights of sleeping engines (level 1)."""
    id: NonEmpty
    sleep_budget_bytes: Size = DEFAULT_SLEEP_BUDGET_BYTES


@dataclass(frozen=True, config=schema.DATA)
class ManagerSpec:
    drain_timeout_s: Seconds = Field(30.0, description="in-flight requests of a model being evicted get this long")
    load_backoff_s: PositiveSeconds = Field(10.0, description="after a failed load or an engine death; doubles, up to 300 s")
    report_interval_s: PositiveSeconds = Field(2.0, description="workers refresh their report this often")
    queue_poll_s: PositiveSeconds = 0.5
    starvation_s: PositiveSeconds = Field(30.0, description="a waiting model may drain busy ones after this long")
    worker_timeout_s: PositiveSeconds = Field(10.0, description="a worker silent this long is lost: its models count as unloaded")

    @model_validator(mode="after")
    def _timeout_spans_reports(self) -> "ManagerSpec":
        if self.worker_timeout_s <= 2 * self.report_interval_s:
            raise ValueError(f"worker_timeout_s ({self.worker_timeout_s}) must exceed twice report_interval_s "
                             f"({self.report_interval_s}): one late report must not count as a lost worker")
        return self


DEFAULT_GPUS = (GpuSpec(id="cpu", budget_bytes=8 * 2**30),)


class ConfigFile(schema.Strict):
    """The whole configuration file (YAML), as written: what `roundhouse config schema` describes."""
    models: tuple[ModelSpec, ...] = Field(min_length=1)
    gpus: tuple[GpuSpec, ...] = Field(DEFAULT_GPUS, min_length=1, description="default: one cpu GPU with 8GiB")
    hosts: tuple[HostSpec, ...] = Field((), description="a host not listed lends 32GiB to sleepers")
    manager: Annotated[ManagerSpec, schema.none_is({})] = ManagerSpec()
    routing: RoutingSpec | None = Field(None, description='model "auto": rules, classifier, fallback')
    tenants: Tenants = Field((), description="API keys, their models, limits and priority (none: no key asked)")
    admin: AdminSpec | None = Field(None, description="keys for the manager's admin calls and workers' reports")
    tls: TlsSpec | None = Field(None, description="mutual TLS between the services, TLS at the public ports")

    @model_validator(mode="after")
    def _references(self) -> "ConfigFile":
        # Names, aliases and adapters unique: Catalogue's own check (it indexes them).
        for section, ids in (("gpus", [g.id for g in self.gpus]), ("hosts", [h.id for h in self.hosts])):
            if len(set(ids)) != len(ids):
                raise ValueError(f"{section}: an id is used twice")
        known = {g.id for g in self.gpus}
        for i, m in enumerate(self.models):
            if m.gpu not in known:
                raise ValueError(f"models[{i}].gpu: {m.gpu!r} is not in gpus ({', '.join(sorted(known))})")
        return self


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


def from_mapping(raw: Any, base: pathlib.Path = pathlib.Path(".")) -> Catalogue:
    """The catalogue from the config file's contents: checked by one schema (ConfigFile), then
    its references (a model named in routing, a tenant's model patterns) resolved. Relative
    paths are taken from `base`. Every error names the key."""
    if not isinstance(raw, Mapping):
        raise ConfigError("models: required (a list of models)")
    doc = schema.validate(ConfigFile, raw, ConfigError, context={schema.BASE: str(base)})
    cat = Catalogue(doc.models, doc.gpus, doc.manager, hosts=doc.hosts, admin=doc.admin, tls=doc.tls)
    if doc.routing is not None:
        if cat.resolve(routing.AUTO) is not None:
            raise ConfigError(f"models: {routing.AUTO!r} is reserved for classification (routing); rename that model")
        try:
            rules = routing.resolved(doc.routing, lambda name: name if cat.adapter(name) else getattr(cat.resolve(name), "name", None))
        except routing.RoutingError as e:
            raise ConfigError(str(e)) from e
        cat = dataclasses.replace(cat, routing=rules)
    if doc.tenants:
        try:
            servable = cat.servable()
            for t in doc.tenants:
                tenancy.allowed_models(t, servable)
        except tenancy.TenancyError as e:
            raise ConfigError(str(e)) from e
        cat = dataclasses.replace(cat, tenants=doc.tenants)
    return cat


def load(path: str | pathlib.Path) -> Catalogue:
    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return from_mapping(raw, path.parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None   # every error of a file names the file


_MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelSpec)}
_REQUIRED = {"name", "path", "max_model_len"}


def schema_json() -> dict:
    """The JSON Schema of the configuration file (`roundhouse config schema`)."""
    return schema.json_schema(ConfigFile)


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

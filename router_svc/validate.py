"""Request validation and resolution: a pure function from a GenerateRequest to what gets queued.

Nothing here does I/O. Every rejection names the field, so a person can fix the request.
"""
from __future__ import annotations

import dataclasses
import math
import re
import secrets
import uuid
from collections.abc import Callable, Mapping

from protos.v1 import common_pb2, queue_pb2, router_pb2
from roundhouse import routing, subjects
from roundhouse.catalogue import Catalogue, ModelSpec
from roundhouse.errors import DeadlineExpired, InvalidRequest, ModelNotFound, PermissionDenied
from router_svc.auth import ANYONE, Tenant, check_model

ROLES = frozenset({"system", "user", "assistant", "tool"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Field bounds that no honest request reaches; past them the request is refused before anything
# reads or echoes the field (a model name goes into errors and logs; metadata into routing).
# Metadata's are OpenAI's own: 16 pairs, keys up to 64 characters, values up to 512.
MAX_MODEL_CHARS = 256
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
MAX_STOP_STRINGS = 16

BY_NAME = "requested by name"   # the route reason of a request that names its model

# The prompt's token ids as the engine will see them (router_svc.prompts), or None if unknown.
Tokenize = Callable[[ModelSpec, router_pb2.GenerateRequest], "list[int] | None"]


@dataclasses.dataclass(frozen=True)
class Admitted:
    spec: ModelSpec
    queued: queue_pb2.QueuedRequest
    prompt_tokens: int          # 0 when the model has no tokenizer the router can use
    route_reason: str = BY_NAME
    route_rule: str = ""        # for "auto": what chose the model (routing.Route.rule)
    tenant: Tenant = ANYONE     # who asked (router_svc.auth)
    priority: str = subjects.NORMAL   # its class: its tenant's, or lower if it asked (subjects.PRIORITIES)
    # Set by the gateway: which front door, when admission began (time.time_ns()), the
    # request's root span (roundhouse.tracing) and its W3C traceparent (what is handed on).
    endpoint: str = "grpc"
    admitted_ns: int = 0
    span: object = None
    traceparent: str = ""


def admit(
    req: router_pb2.GenerateRequest,
    catalogue: Catalogue,
    tokenize: Tokenize,
    *,
    now_ms: int,
    deadline_ms: int,
    reply_to: str,
    readiness: Mapping[str, routing.Readiness] | None = None,
    predictor: routing.Predictor | None = None,
    tenant: Tenant = ANYONE,
) -> Admitted:
    """Validates `req` and returns the fully resolved request to publish, or raises a RequestError.
    `readiness`: how soon each model could serve (the manager's word), for "auto" requests whose
    rule lists fallbacks. `tenant`: who asks (router_svc.auth): it may use only its models, and
    "auto" chooses only among them."""
    # 1. The deadline first: an expired request must not cost anything else.
    if deadline_ms <= now_ms:
        raise DeadlineExpired("deadline already passed when the request arrived")
    # 2. Bounded fields, before anything reads them.
    _check_bounds(req)
    # 3. The model: a name, an alias, or "auto" (classified by the routing rules).
    route = _route(req, catalogue, readiness, (deadline_ms - now_ms) / 1000, predictor)
    if tenant.models is not None and route.reason != BY_NAME:  # chosen for it: among its models
        route = within(route, tenant, catalogue)
    name, reason = route.model, route.reason
    spec = catalogue.resolve(name)
    if spec is None:
        raise ModelNotFound(f"model {name!r} not found; ListModels gives the configured names and aliases")
    adapter = catalogue.adapter(name)
    check_model(tenant, adapter.name if adapter is not None else spec.name)
    # 4. The input.
    kind = req.WhichOneof("input")
    if kind is None:
        raise InvalidRequest("prompt", "either prompt or chat messages are required")
    if kind == "prompt" and not req.prompt.strip():
        raise InvalidRequest("prompt", "must not be empty")
    if kind == "chat":
        if not req.chat.messages:
            raise InvalidRequest("messages", "at least one message is required")
        for i, m in enumerate(req.chat.messages):
            if m.role not in ROLES:
                raise InvalidRequest(f"messages[{i}].role", f"{m.role!r} is not one of {', '.join(sorted(ROLES))}")
    if req.request_id and not _REQUEST_ID.match(req.request_id):
        raise InvalidRequest("request_id", "1-128 characters of letters, digits and . _ : -")
    # 5. Sampling.
    s = req.sampling
    if s.HasField("max_tokens") and s.max_tokens <= 0:
        raise InvalidRequest("max_tokens", f"must be > 0, got {s.max_tokens}")
    if s.HasField("max_tokens") and s.max_tokens > spec.token_limit:
        raise InvalidRequest("max_tokens", f"{s.max_tokens} is above the limit of {spec.token_limit} for model {spec.name}")
    if s.HasField("temperature") and not 0 <= s.temperature <= 2:   # OpenAI's range, and vLLM's (NaN fails too)
        raise InvalidRequest("temperature", f"must be in [0, 2], got {s.temperature}")
    if s.HasField("top_p") and not (0 < s.top_p <= 1):
        raise InvalidRequest("top_p", f"must be in (0, 1], got {s.top_p}")
    if s.HasField("top_k") and s.top_k < -1:
        raise InvalidRequest("top_k", f"must be -1 (off), 0 (off) or > 0, got {s.top_k}")
    if s.HasField("stream_interval") and s.stream_interval < 1:
        raise InvalidRequest("stream_interval", f"must be >= 1 (tokens per streamed chunk), got {s.stream_interval}")
    if len(s.stop) > MAX_STOP_STRINGS or any(not x for x in s.stop):
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} non-empty stop strings")
    # 6. Length against the context.
    prompt_ids = tokenize(spec, req)
    prompt_tokens = len(prompt_ids) if prompt_ids is not None else None
    max_tokens = s.max_tokens if s.HasField("max_tokens") else spec.default_max_tokens
    if prompt_tokens is not None:
        room = spec.max_model_len - prompt_tokens
        if room <= 0:
            raise InvalidRequest(
                "prompt", f"{prompt_tokens} tokens; the context of model {spec.name} is {spec.max_model_len} tokens"
            )
        if max_tokens > room:
            if s.HasField("max_tokens"):
                raise InvalidRequest(
                    "max_tokens",
                    f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                    f"{spec.max_model_len} tokens of model {spec.name}",
                )
            max_tokens = room
    # 7. The resolved request. A sampled request gets a seed, so that a redelivery after a
    #    worker loss regenerates the same tokens and the router can continue the stream.
    sampling = common_pb2.SamplingParams()
    sampling.CopyFrom(s)
    sampling.max_tokens = max_tokens
    if not sampling.HasField("temperature"):
        sampling.temperature = 1.0
    if sampling.temperature > 0 and not sampling.HasField("seed"):
        sampling.seed = secrets.randbits(62)
    queued = queue_pb2.QueuedRequest(
        request_id=req.request_id or uuid.uuid4().hex,
        model=spec.name,
        sampling=sampling,
        deadline_unix_ms=deadline_ms,
        reply_to=reply_to,
        enqueued_unix_ms=now_ms,
    )
    if adapter is not None:
        queued.adapter = adapter.name
    if prompt_ids is not None:
        queued.prompt_token_ids.extend(prompt_ids)
    if kind == "prompt":
        queued.prompt = req.prompt
    else:
        queued.chat.messages.extend(req.chat.messages)
    return Admitted(spec, queued, prompt_tokens or 0, reason, route.rule, tenant, priority_of(req.priority, tenant))


def _check_bounds(req: router_pb2.GenerateRequest) -> None:
    if len(req.model) > MAX_MODEL_CHARS:
        raise InvalidRequest("model", f"{len(req.model)} characters; a model name has at most {MAX_MODEL_CHARS}")
    meta = req.metadata
    if len(meta) > MAX_METADATA_PAIRS:
        raise InvalidRequest("metadata", f"{len(meta)} pairs; at most {MAX_METADATA_PAIRS}")
    for key, value in meta.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequest("metadata", f"a key of {len(key)} characters; keys have at most {MAX_METADATA_KEY_CHARS}")
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(f"metadata.{key}", f"{len(value)} characters; values have at most {MAX_METADATA_VALUE_CHARS}")


def priority_of(asked: str, tenant: Tenant) -> str:
    """The class a request runs in: its tenant's, or the lower one it asked for. Asking for a
    higher one is refused (PermissionDenied), an unknown one too (InvalidRequest)."""
    if not asked:
        return tenant.priority
    if asked not in subjects.PRIORITIES:
        raise InvalidRequest("priority", f"must be one of {', '.join(subjects.PRIORITIES)} (or empty: the tenant's)")
    if subjects.PRIORITIES.index(asked) < subjects.PRIORITIES.index(tenant.priority):
        who = f"tenant {tenant.name}" if tenant.name else "a caller without a tenant"
        raise PermissionDenied(f"priority {asked!r} is above what {who} may use ({tenant.priority!r})")
    return asked


def within(route: routing.Route, tenant: Tenant, catalogue: Catalogue) -> routing.Route:
    """`route` when `tenant` may use its model; else the first of its fallbacks, the routing
    fallback, or the first model of the catalogue that the tenant may use, the reason saying so."""
    def canonical(name: str) -> str:
        adapter = catalogue.adapter(name)
        return adapter.name if adapter is not None else getattr(catalogue.resolve(name), "name", name)

    if tenant.may_use(canonical(route.model)):
        return route
    fallback = catalogue.routing.fallback if catalogue.routing is not None else ""
    candidates = (*route.fallbacks, *((fallback,) if fallback else ()), *(m.name for m in catalogue.models))
    for name in candidates:
        if tenant.may_use(canonical(name)):
            return routing.Route(name, f"{route.reason}; {route.model} is not among tenant {tenant.name}'s models: {name}",
                                 rule=route.rule)
    return route  # it may use none of them: check_model refuses it


def request_view(req: router_pb2.GenerateRequest) -> routing.RequestView:
    if req.WhichOneof("input") == "chat":
        return routing.RequestView("chat", tuple(m.content for m in req.chat.messages), dict(req.metadata))
    return routing.RequestView("completions", (req.prompt,) if req.prompt else (), dict(req.metadata))


def resolve_route(req: router_pb2.GenerateRequest, catalogue: Catalogue,
                  readiness: Mapping[str, routing.Readiness] | None = None, time_left_s: float = math.inf,
                  predictor: routing.Predictor | None = None) -> tuple[str, str]:
    """The model name the request asks for (classified when "auto") and why. A classified
    model that would take longer to load or wake than `max_swap_wait_s` or `time_left_s` gives
    way to a fallback of its rule that would not (see routing.prefer_resident)."""
    route = _route(req, catalogue, readiness, time_left_s, predictor)
    return route.model, route.reason


def _route(req: router_pb2.GenerateRequest, catalogue: Catalogue, readiness: Mapping[str, routing.Readiness] | None,
           time_left_s: float, predictor: routing.Predictor | None) -> routing.Route:
    rules = catalogue.routing
    name, reason = req.model, BY_NAME
    if not name and rules is not None and rules.default_model:
        name, reason = rules.default_model, "the configured default model"
    if not name:
        raise InvalidRequest("model", "required")
    if name != routing.AUTO:
        return routing.Route(name, reason)
    if rules is None:
        raise InvalidRequest("model", '"auto" needs a routing section in the configuration; name a model instead')
    route = routing.classify(rules, request_view(req), predictor)
    if readiness:
        budget = min(time_left_s, rules.max_swap_wait_s or math.inf)
        route = routing.prefer_resident(route, readiness, budget)
    return route

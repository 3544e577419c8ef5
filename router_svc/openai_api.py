"""OpenAI's wire format, both ways: JSON bodies → GenerateRequest, events → response JSON.

Pure functions (no I/O), so every rule is unit-tested. The HTTP handlers (router_svc/http.py)
and the NATS job API (router_svc/jobs.py, whose JSON body is the same) use them.

Accepted, as OpenAI and vLLM's server do: `model`, `messages` (string content or text parts) /
`prompt` (a string or a list of one string), `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `top_k`, `ignore_eos` and `stream_interval` (vLLM extensions), `seed`, `stop`, `n` = 1,
`stream`, `stream_options.include_usage`, `metadata` (hints for model "auto"), `service_tier`
("flex" runs in the low priority class). Fields that would
change the output and are not supported (n > 1, tools, logprobs, penalties, ...) are refused
with 400 naming the field instead of being silently ignored; other unknown fields are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from protos.v1 import common_pb2, router_pb2
from roundhouse.errors import InvalidRequest, QueueFull, RoundhouseError

FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORTED: "abort",
}

# gRPC status name → (HTTP status, OpenAI error type)
HTTP_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "CANCELLED": (499, "cancelled_error"),
}

# Fields whose non-default value changes the output and is not supported: refused, not ignored.
_UNSUPPORTED = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "best_of": (None, 1), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
}

# What a body may carry besides those: the fields read below, and ones that change nothing here
# (`user`: an end-user id for abuse tracking; `store`, `parallel_tool_calls`: the OpenAI
# platform's). Anything else is refused, as OpenAI does ("prompt_embeds" silently ignored
# would generate from the wrong input).
# OpenAI's `service_tier` as a priority class (roundhouse.tenancy): "flex" (cheaper, slower) is
# the low class; "priority" and the others are the tenant's own class (a request can lower its
# class, never raise it: a tenant configured high gets high without asking).
SERVICE_TIERS = {"auto": "", "default": "", "flex": "low", "scale": "", "priority": ""}

_KNOWN = frozenset({
    "model", "messages", "prompt", "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "ignore_eos", "stream_interval", "metadata", "stream", "stream_options", "user", "store", "service_tier",
    "parallel_tool_calls", *_UNSUPPORTED,
})


@dataclasses.dataclass(frozen=True)
class Options:
    """What the HTTP layer needs besides the GenerateRequest."""
    endpoint: str                # "chat" or "completions"
    stream: bool = False
    include_usage: bool = False


def parse(body: Any, endpoint: str, request_id: str = "", also: frozenset[str] = frozenset()) -> tuple[router_pb2.GenerateRequest, Options]:
    """A GenerateRequest from an OpenAI JSON body; InvalidRequest names the bad field. `also`:
    fields the caller reads itself (a job's `job_id`)."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("body", "must be a JSON object")
    unknown = sorted(k for k in body if k not in _KNOWN and k not in also)
    if unknown:
        raise InvalidRequest(str(unknown[0])[:64], "unknown field; leave it out (this server does not read it)")
    req = router_pb2.GenerateRequest(request_id=request_id)
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequest("model", "must be a string")
    req.model = model
    if endpoint == "chat":
        _messages(req, body.get("messages"))
    else:
        _prompt(req, body.get("prompt"))
    for key, allowed in _UNSUPPORTED.items():
        if key in body and (body[key] not in allowed if allowed is not None else body[key] is not None):
            raise InvalidRequest(key, "is not supported by this server; leave it out")
    n = body.get("n")
    if n not in (None, 1):
        raise InvalidRequest("n", "only n = 1 is supported")
    s = req.sampling
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        s.max_tokens = _int("max_tokens", max_tokens)
    if body.get("temperature") is not None:
        s.temperature = _number("temperature", body["temperature"])
    if body.get("top_p") is not None:
        s.top_p = _number("top_p", body["top_p"])
    if body.get("top_k") is not None:
        s.top_k = _int("top_k", body["top_k"])
    if body.get("seed") is not None:
        s.seed = _int("seed", body["seed"], bits=64)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise InvalidRequest("stop", "must be a string or a list of strings")
        s.stop.extend(stops)
    if body.get("ignore_eos") is not None:
        s.ignore_eos = _bool("ignore_eos", body["ignore_eos"])
    if body.get("stream_interval") is not None:
        s.stream_interval = _int("stream_interval", body["stream_interval"])
    tier = body.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in SERVICE_TIERS:  # (a list or an object is unhashable)
            raise InvalidRequest("service_tier", f"must be one of {', '.join(SERVICE_TIERS)}")
        req.priority = SERVICE_TIERS[tier]
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                                       for k, v in metadata.items()):
            raise InvalidRequest("metadata", "must be an object of string keys to string values")
        for k, v in metadata.items():
            req.metadata[k] = str(v)
    stream = _bool("stream", body.get("stream", False))
    so = body.get("stream_options") or {}
    if not isinstance(so, Mapping):
        raise InvalidRequest("stream_options", "must be an object")
    return req, Options(endpoint, stream, stream and _bool("stream_options.include_usage", so.get("include_usage", False)))


def _messages(req: router_pb2.GenerateRequest, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "a non-empty list of messages is required")
    req.chat.SetInParent()
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidRequest(f"messages[{i}]", "must be an object with a role and content")
        if m.get("tool_calls"):
            raise InvalidRequest(f"messages[{i}].tool_calls", "tool calls are not supported")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, Mapping) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content[{j}]", "only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content", "must be a string or a list of text parts")
        req.chat.messages.add(role=m["role"], content=content)


def _prompt(req: router_pb2.GenerateRequest, prompt: Any) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise InvalidRequest("prompt", "one string prompt per request (token-id and batched prompts are not supported)")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt", "a string is required")
    req.prompt = prompt


def _int(field: str, v: Any, bits: int = 32) -> int:
    """An integer that fits the request's field (int32, or int64 for `seed`): a larger one is a
    400 naming the field, not protobuf's ValueError (a 500)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(field, f"must be an integer, got {v!r}")
    if not -2 ** (bits - 1) <= v < 2 ** (bits - 1):
        raise InvalidRequest(field, f"must be an integer of at most {bits} bits, got {v}")
    return v


def _number(field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(field, f"must be a number, got {v!r}")
    return float(v)


def _bool(field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise InvalidRequest(field, f"must be true or false, got {v!r}")
    return v


# ---- responses ----------------------------------------------------------------------------------


def response_id(endpoint: str, request_id: str) -> str:
    return f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{request_id}"


def usage(u: common_pb2.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def chunk(opts: Options, rid: str, created: int, model: str, text: str | None = None,
          finish: int | None = None, first: bool = False) -> dict:
    """One streamed chunk (chat.completion.chunk or text_completion); `first` puts the assistant
    role on a chat chunk (the first one a caller gets)."""
    reason = FINISH.get(finish) if finish is not None else None
    if opts.endpoint == "chat":
        delta: dict = {"content": text} if text is not None else {}
        if first:
            delta = {"role": "assistant", "content": text or ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def text_framer(opts: Options, rid: str, created: int, model: str) -> Callable[[str], bytes]:
    """A function from a token delta's text to its whole SSE event (`data: {...}\n\n`), equal to
    `chunk(opts, rid, created, model, text=...)` serialised: the parts around the text are
    encoded once per stream, so each token costs one string encode rather than a dict and a
    whole document (the relay's per-token CPU)."""
    marker = "\x00roundhouse-text\x00"
    doc = json.dumps(chunk(opts, rid, created, model, text=marker))
    head, tail = doc.split(json.dumps(marker))
    head_b, tail_b = b"data: " + head.encode(), tail.encode() + b"\n\n"
    dumps = json.dumps
    return lambda text: head_b + dumps(text).encode() + tail_b


QUEUED_COMMENT = b": queued\n\n"


def progress_comment(event: router_pb2.GenerateEvent) -> bytes:
    """An SSE comment line for a request that waits (queued, its model loading), or b"" (the
    HTTP layer says `queued` only once a request has waited a while).

    Comment lines (`: ...`) are skipped by OpenAI clients and keep proxies from timing out."""
    kind = event.WhichOneof("event")
    if kind == "queued":
        return QUEUED_COMMENT
    if kind == "loading":
        return f": loading {event.loading.model}, about {event.loading.estimate_s:.0f} s\n\n".encode()
    return b""


def usage_chunk(opts: Options, rid: str, created: int, model: str, u: common_pb2.Usage) -> dict:
    obj = "chat.completion.chunk" if opts.endpoint == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(u)}


def complete(opts: Options, rid: str, created: int, model: str, text: str, finished: router_pb2.Finished) -> dict:
    """The whole (non-streamed) response."""
    reason = FINISH.get(finished.finish_reason, "stop")
    if opts.endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage(finished.usage)}


def error(code: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for a gRPC status name."""
    status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}


def error_from(e: RoundhouseError) -> tuple[int, dict, dict]:
    """(HTTP status, body, extra headers) for a RoundhouseError."""
    status, body = error(e.code.name, e.message, getattr(e, "field", None))
    headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))} if isinstance(e, QueueFull) else {}
    return status, body, headers

"""One trace per request, across HTTP / gRPC, JetStream and the worker (OpenTelemetry).

Every request gets a W3C trace context: the caller's `traceparent` (HTTP header, gRPC metadata,
a job's submission) when it sends one, else a new trace. It travels in the queued message's
headers to the worker, and every log line about the request, in each service, carries its
`trace_id` (see `bind`), so one request's lines can be joined across processes without a
collector.

Spans go out only when tracing is on (`configure`: `OTEL_EXPORTER_OTLP_ENDPOINT` set, or
`--otel`), through OTLP; the exporter is the optional extra `roundhouse[otel]`. When it is off
the SDK's sampler records nothing (ALWAYS_OFF) but still makes the ids: a request's root span
then costs a few microseconds and its children none (measured: ~195 us per request recorded and
dropped, against ~50 us with nothing recorded).

Spans are started with an explicit parent and explicit times, never made "current" across an
`await`: a request's spans are recorded when it ends, from timestamps taken on the way, so the
token path pays nothing per token and no context is attached in one task and detached in another.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = structlog.get_logger("tracing")

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
exporting = False


def enabled_by_env() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(service: str, export: bool | None = None) -> None:
    """Once per process, at its edge. `export`: send spans over OTLP (default: when
    OTEL_EXPORTER_OTLP_ENDPOINT is set); the endpoint and protocol come from the standard
    OTEL_EXPORTER_OTLP_* variables."""
    global _provider, exporting
    export = enabled_by_env() if export is None else export
    provider = TracerProvider(resource=Resource.create({"service.name": f"roundhouse-{service}"}),
                              **({} if export else {"sampler": ALWAYS_OFF}))
    if export:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise SystemExit("roundhouse: tracing needs the OTLP exporter: pip install 'roundhouse[otel]' "
                             f"(or unset OTEL_EXPORTER_OTLP_ENDPOINT) ({e})") from None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, exporting = provider, export


def shutdown() -> None:
    """Sends what is still buffered (a process that stops)."""
    if _provider is not None and exporting:
        _provider.shutdown()


def tracer() -> trace.Tracer:
    global _provider
    if _provider is None:  # not configured (a service under test in-process): ids, no export
        _provider = TracerProvider(sampler=ALWAYS_OFF)
    return _provider.get_tracer("roundhouse")


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The caller's trace context from headers or metadata (`traceparent`); empty if none or
    malformed (then a new trace starts)."""
    if not carrier:
        return otel_context.Context()
    return _propagator.extract(carrier, context=otel_context.Context())


def context_of(span: trace.Span) -> otel_context.Context:
    return trace.set_span_in_context(span, otel_context.Context())


def traceparent(span: trace.Span) -> str:
    """`span`'s W3C traceparent, to hand on (message headers, response headers)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context_of(span))
    return carrier.get(TRACEPARENT, "")


def trace_id(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def child(name: str, parent: trace.Span, start_ns: int, end_ns: int, **attributes) -> None:
    """Records a finished child span of `parent` from timestamps taken earlier (time.time_ns())."""
    if not parent.is_recording():
        return
    span = tracer().start_span(name, context=context_of(parent), start_time=start_ns, attributes=attributes or None)
    span.end(end_time=max(end_ns, start_ns))


def bind(span: trace.Span) -> None:
    """Every log line of this task from here on carries `span`'s trace id."""
    tid = trace_id(span)
    if tid:
        structlog.contextvars.bind_contextvars(trace_id=tid)

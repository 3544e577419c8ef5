"""What every Roundhouse gRPC server carries: grpc.health.v1, server reflection, one error mapping."""
from __future__ import annotations

import math

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from roundhouse.errors import QueueFull, RoundhouseError

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[MalformedRequests()])


class MalformedRequests(grpc.aio.ServerInterceptor):
    """A request whose bytes are not the method's message gets INVALID_ARGUMENT with a message a
    person can act on (grpc.aio would answer UNKNOWN with a DecodeError's repr, and log a
    traceback per call). Applied to this project's unary-request methods: the handler receives
    the raw bytes and parses them itself."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if (handler is None or not details.method.startswith("/roundhouse.") or handler.request_streaming
                or handler.request_deserializer is None):
            return handler
        parse = handler.request_deserializer

        async def parsed(raw: bytes, context):
            try:
                return parse(raw)
            except Exception:  # DecodeError, or a parser's own failure: the bytes are the problem
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"roundhouse: the request is not a valid message for {details.method}")

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(raw, context):
                return await inner(await parsed(raw, context), context)
            return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
        inner_stream = handler.unary_stream

        async def stream(raw, context):
            async for item in inner_stream(await parsed(raw, context), context):
                yield item
        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=handler.response_serializer)


async def add_standard_services(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Adds health (every service SERVING) and reflection; returns the health servicer."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return health_servicer


def add_standard_services_sync(server: grpc.Server, service_names: list[str]) -> health.HealthServicer:
    """add_standard_services for a synchronous grpc.server (the router's delivery port)."""
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME], server)
    return health_servicer


# Trailing metadata on a Worker.Load that failed because the model could not load (as opposed
# to a call that broke because the worker died mid-load, which is not the model's fault).
LOAD_FAILED_KEY = "roundhouse-load-failed"


async def abort_with(context: grpc.aio.ServicerContext, error: RoundhouseError):
    """Ends the call with the status that `error` maps to (never a traceback to the client); a
    refusal to retry later says when in trailing metadata `retry-after` (seconds, as HTTP's)."""
    trailing = (("retry-after", str(max(1, math.ceil(error.retry_after_s)))),) if isinstance(error, QueueFull) else ()
    await context.abort(error.code, error.message, trailing_metadata=trailing)


def status_from_name(name: str) -> grpc.StatusCode:
    """grpc.StatusCode from its name (as carried in ErrorDetail.code); INTERNAL when unknown."""
    return getattr(grpc.StatusCode, name, grpc.StatusCode.INTERNAL)

"""The request stream and the per-model consumers: declared in one place, created idempotently."""
from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from roundhouse import subjects


async def ensure_stream(js: JetStreamContext) -> None:
    """RH_REQUESTS: work-queue retention (a message lives until a worker acks it), file storage."""
    config = StreamConfig(
        name=subjects.STREAM,
        subjects=subjects.STREAM_SUBJECTS,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=120.0,  # Nats-Msg-Id = request id: a re-sent publish is stored once
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Exists with other settings (an older deployment): bring it to these.
        await js.update_stream(config)


def consumer_config(model: str, ack_wait_s: float, max_deliver: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=subjects.consumer_name(model),
        filter_subject=subjects.request_subject(model),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        max_ack_pending=10_000,
        max_waiting=512,
    )


async def ensure_consumer(js: JetStreamContext, model: str, ack_wait_s: float, max_deliver: int) -> None:
    """Creates the model's durable consumer, or updates its mutable settings (nats-server >= 2.10)."""
    await js.add_consumer(subjects.STREAM, consumer_config(model, ack_wait_s, max_deliver))


async def queued(js: JetStreamContext, model: str) -> int:
    """Requests waiting for `model` (not yet handed to a worker); 0 when no consumer exists yet."""
    try:
        info = await js.consumer_info(subjects.STREAM, subjects.consumer_name(model))
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.num_pending or 0)

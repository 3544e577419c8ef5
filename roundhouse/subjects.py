"""NATS names: the one place a model name becomes a subject token.

Model names contain '/' and '.' (`Qwen/Qwen2.5-0.5B`); in a subject '.' separates tokens and
'*' / '>' are wildcards. A name becomes a readable slug plus a short hash of the exact name, so
two names that slug alike (`a/b` and `a.b`) still get different subjects.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

STREAM = "RH_REQUESTS"
SUBJECT_PREFIX = "rh.req"
STREAM_SUBJECTS = [f"{SUBJECT_PREFIX}.>"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def model_token(model: str) -> str:
    """A subject token (and consumer name) that is safe, stable and unique for `model`."""
    if not model:
        raise ValueError("model name must not be empty")
    slug = _UNSAFE.sub("_", model).strip("_")[:48] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{slug}-{digest}"


# Priority classes (a tenant's `priority`, roundhouse.tenancy), highest first. Each has its own
# subject and its own durable consumer per model, so a worker can take the highest class first
# (worker_svc/lanes.py); "normal" keeps the plain subject and consumer (what a deployment without
# classes has always used).
PRIORITIES = ("high", "normal", "low")
NORMAL = "normal"


def _lane_suffix(priority: str) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; one of {', '.join(PRIORITIES)}")
    return "" if priority == NORMAL else f".{priority}"


def request_subject(model: str, priority: str = NORMAL) -> str:
    """Where routers queue `model`'s requests of class `priority`."""
    return f"{SUBJECT_PREFIX}.{model_token(model)}{_lane_suffix(priority)}"


HANDBACK_SUFFIX = "back"


def request_pattern(priority: str = NORMAL, handback: bool = False) -> str:
    """Every model's request subject of class `priority` (or its hand-back subject), as a NATS
    wildcard (roundhouse/natsauth.py)."""
    return f"{SUBJECT_PREFIX}.*{_lane_suffix(priority)}" + (f".{HANDBACK_SUFFIX}" if handback else "")


def handback_subject(model: str, priority: str = NORMAL) -> str:
    """Where a worker queues a handed-back copy of one of `model`'s requests (worker_svc/redelivery):
    its own subject, so that NATS can let workers hand back and never queue a request of their own
    (roundhouse/natsauth.py). Same stream, same consumer (it filters on both)."""
    return f"{request_subject(model, priority)}.{HANDBACK_SUFFIX}"


def handback_of(subject: str) -> str:
    """The hand-back subject for a request delivered from `subject` (a request subject of any
    class, or a hand-back subject already): a copy keeps its class."""
    return subject if subject.endswith(f".{HANDBACK_SUFFIX}") else f"{subject}.{HANDBACK_SUFFIX}"


def consumer_name(model: str, priority: str = NORMAL) -> str:
    """The durable pull consumer of `model`'s requests of class `priority`, shared by every worker of `model`."""
    return f"rh-worker-{model_token(model)}{_lane_suffix(priority).replace('.', '-')}"


def model_of_consumer(consumer: str, models: Iterable[str]) -> str | None:
    """The model among `models` one of whose consumers is `consumer` (consumer names hash the
    model name, so only a list of candidates turns one back); None for any other consumer."""
    return next((m for m in models if consumer in {consumer_name(m, p) for p in PRIORITIES}), None)


# JetStream's own advisory (core NATS): a message of `stream` was delivered max_deliver times to
# `consumer` without an ack, and it is not delivered again.
MAX_DELIVERIES_PREFIX = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def max_deliveries_subject(stream: str = STREAM, consumer: str = "*") -> str:
    """The advisory's subject; by default every consumer of the request stream."""
    return f"{MAX_DELIVERIES_PREFIX}.{stream}.{consumer}"


# Core NATS (not JetStream): events that may be lost without harm.
REQUEST_EVENTS = "rh.evt.request"          # routers → manager: payload is the model name
MODEL_EVENTS_PREFIX = "rh.evt.model"       # manager → routers: ModelEvent per residency change
RESIDENCY_SNAPSHOTS = "rh.evt.residency"   # manager → routers: every model's state, periodically


def model_event_subject(model: str) -> str:
    return f"{MODEL_EVENTS_PREFIX}.{model_token(model)}"


# Async jobs (router_svc/jobs.py).
JOBS_STREAM = "RH_JOBS"                    # work-queue stream of accepted jobs, run by any router
JOBS_RUN = "rh.jobs.run"
JOBS_RUNNERS = "rh-job-runners"            # its durable consumer, shared by every router
JOBS_SUBMIT = "rh.jobs.submit"             # core request-reply: a job in, its record out
JOBS_CANCEL = "rh.jobs.cancel"             # core: payload is a job id; every router listens
JOBS_BUCKET = "rh-jobs"                    # key-value bucket: job id -> Job (JSON)


def job_events_subject(job_id: str, tenant: str = "") -> str:
    """Where a job's events go: `rh.jobs.<job_id>.events`, or with tenants
    `rh.jobs.<tenant>.<job_id>.events`, so that NATS can let each tenant's job clients follow
    their own jobs and no one else's (roundhouse/natsauth.py). Job ids and tenant names are
    letters, digits, _ and -: one token each."""
    return f"rh.jobs.{tenant}.{job_id}.events" if tenant else f"rh.jobs.{job_id}.events"


def tenant_job_events(tenant: str) -> str:
    """Every job event of `tenant` (a NATS wildcard); "*" for every tenant's."""
    return job_events_subject("*", tenant)

"""NATS least privilege: one user per role, allowed only the subjects and JetStream API calls it needs.

    router    queues requests, runs jobs (RH_JOBS, the rh-jobs bucket), keeps tenants' counters
              (rh-limits), hears model events, residency snapshots and JetStream's max-deliveries
              advisory, answers job submissions
    manager   reads queue depths, hears demand, announces model events and residency
    worker    pulls requests and acks them, hands a request back (its `.back` subject only): it
              cannot queue a request, read a job or a counter, or speak for the manager
    jobs      a job client: submits jobs (request-reply) and follows their events; no JetStream
              API at all, so it cannot read the rh-jobs bucket (another tenant's job) directly
    observer  hears model events (`roundhouse up`'s progress lines)

`roundhouse up` runs its nats-server with these users and fresh passwords; `roundhouse nats-auth`
writes the same block for a deployed server (passwords from its environment).
"""
from __future__ import annotations

import json
import secrets

from roundhouse import subjects

API = "$JS.API"
ROLES = ("router", "manager", "worker", "jobs", "observer")
_REQ = subjects.STREAM
_KV = [f"KV_{b}" for b in (subjects.JOBS_BUCKET, "rh-limits")]   # router_svc/limits.BUCKET is "rh-limits"


def _stream_admin(stream: str) -> list[str]:
    """Create (idempotently), update and read a stream's settings."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.STREAM.CREATE.{stream}", f"{API}.STREAM.UPDATE.{stream}"]


def _consumer(stream: str, durable: str = "*") -> list[str]:
    """Create (idempotently) and pull from a stream's durable consumer(s), and ack what it hands out."""
    return [f"{API}.CONSUMER.CREATE.{stream}.{durable}", f"{API}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{stream}.{durable}", f"{API}.CONSUMER.INFO.{stream}.{durable}",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.{durable}", f"$JS.ACK.{stream}.>"]


def _kv(stream: str) -> list[str]:
    bucket = stream.removeprefix("KV_")
    return [*_stream_admin(stream), f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>",
            f"{API}.STREAM.MSG.GET.{stream}", f"$KV.{bucket}.>"]


def _request_subjects(handback: bool = False) -> list[str]:
    """Every model's request subjects, one per priority class (or their hand-back subjects)."""
    return [subjects.request_pattern(p, handback) for p in subjects.PRIORITIES]


def permissions() -> dict[str, dict]:
    """Each role's NATS permissions (nats-server's `permissions` block)."""
    inbox = "_INBOX.>"
    return {
        "router": {
            "publish": {"allow": [
                *_request_subjects(), f"{API}.INFO", *_stream_admin(_REQ),
                f"{API}.STREAM.MSG.DELETE.{_REQ}", f"{API}.STREAM.MSG.GET.{_REQ}", f"{API}.CONSUMER.INFO.{_REQ}.*",
                *_stream_admin(subjects.JOBS_STREAM), *_consumer(subjects.JOBS_STREAM, subjects.JOBS_RUNNERS),
                subjects.JOBS_RUN, *(s for kv in _KV for s in _kv(kv)),
                subjects.REQUEST_EVENTS, subjects.JOBS_CANCEL, subjects.job_events_subject("*"),
            ]},
            "subscribe": {"allow": [
                inbox, f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS,
                subjects.max_deliveries_subject(), subjects.JOBS_SUBMIT, subjects.JOBS_CANCEL,
            ]},
            "allow_responses": True,   # replies to job submissions
        },
        "manager": {
            "publish": {"allow": [f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS, f"{API}.INFO",
                                  *_stream_admin(_REQ), f"{API}.CONSUMER.INFO.{_REQ}.*"]},
            "subscribe": {"allow": [inbox, subjects.REQUEST_EVENTS]},
        },
        "worker": {
            "publish": {"allow": [*_request_subjects(handback=True), f"{API}.INFO",
                                  *_stream_admin(_REQ), *_consumer(_REQ)]},
            "subscribe": {"allow": [inbox]},
        },
        "jobs": {
            "publish": {"allow": [subjects.JOBS_SUBMIT]},
            "subscribe": {"allow": [inbox, subjects.job_events_subject("*")]},
        },
        "observer": {
            "publish": {"deny": [">"]},
            "subscribe": {"allow": [f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS]},
        },
    }


HEADER = ("# Written by `roundhouse nats-auth` (roundhouse/natsauth.py): one NATS user per Roundhouse role, each\n"
          "# allowed only what it needs. Passwords come from nats-server's environment (NATS_ROUTER_PASSWORD, ...);\n"
          "# each service's URL carries its role's (nats://router:PASSWORD@nats:4222).\n")


def new_passwords() -> dict[str, str]:
    return {role: secrets.token_urlsafe(24) for role in ROLES}


def authorization(passwords: dict[str, str] | None = None) -> str:
    """nats-server's `authorization` block. `passwords`: each role's; None writes `$NATS_<ROLE>_PASSWORD`
    (nats-server reads them from its environment)."""
    users = []
    for role, perms in permissions().items():
        password = json.dumps(passwords[role]) if passwords else f"$NATS_{role.upper()}_PASSWORD"
        users.append(f"    {{user: {role}, password: {password}, permissions: {json.dumps(perms)}}}")
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"


def url(base: str, role: str, password: str) -> str:
    """`base` (nats://host:port) with `role`'s credentials in it."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{role}:{password}@{rest}"

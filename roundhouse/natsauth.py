"""NATS least privilege: one user per role, allowed only the subjects and JetStream API calls it needs.

    router    queues requests, runs jobs (RH_JOBS, the rh-jobs bucket), keeps tenants' counters
              (rh-limits), hears model events, residency snapshots and JetStream's max-deliveries
              advisory, answers job submissions
    manager   reads queue depths, hears demand, announces model events and residency
    worker    pulls requests and acks them, hands a request back (its `.back` subject only): it
              cannot queue a request, read a job or a counter, or speak for the manager
    jobs      a job client: submits jobs (request-reply) and follows their events; no JetStream
              API at all, so it cannot read the rh-jobs bucket (another tenant's job) directly;
              its replies come to its own inbox prefix (`inbox_prefix`), the only inboxes it hears.
              It follows the events of jobs submitted without tenants (rh.jobs.<id>.events)
    jobs-<tenant>  one per tenant of the config: the same, following only that tenant's jobs
              (rh.jobs.<tenant>.<id>.events); no wildcard reaches another tenant's
    observer  hears model events (`roundhouse up`'s progress lines)

`roundhouse up` runs its nats-server with these users and fresh passwords; `roundhouse nats-auth`
writes the same block for a deployed server (passwords from its environment).
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Iterable

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


def inbox_prefix(user: str) -> str:
    """The inbox prefix a client of NATS user `user` connects with (nats-py
    `connect(inbox_prefix=...)`, nats.go `nats.CustomInboxPrefix`; the services do it in
    roundhouse.natsconn): its replies come there, and it may listen nowhere else, so it cannot
    overhear another role's replies or a worker's deliveries (which carry prompts) on `_INBOX.>`."""
    return f"_INBOX.{user}"


def tenant_user(tenant: str) -> str:
    """The NATS user of `tenant`'s job clients."""
    return f"jobs-{tenant}"


def users(tenants: Iterable[str] = ()) -> tuple[str, ...]:
    """Every NATS user: the roles, then one job-client user per tenant."""
    return (*ROLES, *(tenant_user(t) for t in tenants))


def permissions(tenants: Iterable[str] = ()) -> dict[str, dict]:
    """Each user's NATS permissions (nats-server's `permissions` block): the roles', and a job
    client's for each of `tenants`. Each listens only under its own inbox prefix (services
    connect with it: roundhouse.natsconn), so no role overhears another's replies."""
    def inbox(user: str) -> str:
        return f"{inbox_prefix(user)}.>"
    return {
        "router": {
            "publish": {"allow": [
                *_request_subjects(), f"{API}.INFO", *_stream_admin(_REQ),
                f"{API}.STREAM.MSG.DELETE.{_REQ}", f"{API}.STREAM.MSG.GET.{_REQ}", f"{API}.CONSUMER.INFO.{_REQ}.*",
                *_stream_admin(subjects.JOBS_STREAM), *_consumer(subjects.JOBS_STREAM, subjects.JOBS_RUNNERS),
                subjects.JOBS_RUN, *(s for kv in _KV for s in _kv(kv)),
                subjects.REQUEST_EVENTS, subjects.JOBS_CANCEL, subjects.job_events_subject("*"),
                subjects.tenant_job_events("*"),
            ]},
            "subscribe": {"allow": [
                inbox("router"), f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS,
                subjects.max_deliveries_subject(), subjects.JOBS_SUBMIT, subjects.JOBS_CANCEL,
            ]},
            "allow_responses": True,   # replies to job submissions
        },
        "manager": {
            "publish": {"allow": [f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS, f"{API}.INFO",
                                  *_stream_admin(_REQ), f"{API}.CONSUMER.INFO.{_REQ}.*"]},
            "subscribe": {"allow": [inbox("manager"), subjects.REQUEST_EVENTS]},
        },
        "worker": {
            "publish": {"allow": [*_request_subjects(handback=True), f"{API}.INFO",
                                  *_stream_admin(_REQ), *_consumer(_REQ)]},
            "subscribe": {"allow": [inbox("worker")]},
        },
        "jobs": {
            "publish": {"allow": [subjects.JOBS_SUBMIT]},
            "subscribe": {"allow": [inbox("jobs"), subjects.job_events_subject("*")]},
        },
        "observer": {
            "publish": {"deny": [">"]},
            "subscribe": {"allow": [f"{subjects.MODEL_EVENTS_PREFIX}.>", subjects.RESIDENCY_SNAPSHOTS]},
        },
        **{tenant_user(t): {
            "publish": {"allow": [subjects.JOBS_SUBMIT]},
            "subscribe": {"allow": [inbox(tenant_user(t)), subjects.tenant_job_events(t)]},
        } for t in tenants},
    }


HEADER = ("# Written by `roundhouse nats-auth --config FILE` (roundhouse/natsauth.py): one NATS user\n"
          "# per Roundhouse role, and one job-client user per tenant, each allowed only what it needs. Passwords\n"
          "# come from nats-server's environment (NATS_ROUTER_PASSWORD, ..., NATS_JOBS_DEFAULT_PASSWORD); each\n"
          "# service's URL carries its role's (nats://router:PASSWORD@nats:4222).\n")


def new_passwords(tenants: Iterable[str] = ()) -> dict[str, str]:
    return {user: secrets.token_urlsafe(24) for user in users(tenants)}


def password_variable(user: str) -> str:
    """The environment variable nats-server reads `user`'s password from (NATS_JOBS_TEAM_A_PASSWORD)."""
    return f"NATS_{user.upper().replace('-', '_')}_PASSWORD"


def authorization(passwords: dict[str, str] | None = None, tenants: Iterable[str] = ()) -> str:
    """nats-server's `authorization` block. `passwords`: each user's; None writes `$NATS_<USER>_PASSWORD`
    (nats-server reads them from its environment). `tenants`: a job-client user for each."""
    tenants = tuple(tenants)
    variables = [password_variable(u) for u in users(tenants)]
    clash = next((v for v in variables if variables.count(v) > 1), None)
    if clash:
        raise ValueError(f"two tenants' job users would share the password variable {clash}: rename one")
    lines = []
    for user, perms in permissions(tenants).items():
        password = json.dumps(passwords[user]) if passwords else f"${password_variable(user)}"
        lines.append(f"    {{user: {user}, password: {password}, permissions: {json.dumps(perms)}}}")
    return "authorization {\n  users = [\n" + "\n".join(lines) + "\n  ]\n}\n"


def url(base: str, role: str, password: str) -> str:
    """`base` (nats://host:port) with `role`'s credentials in it."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{role}:{password}@{rest}"

"""NATS least privilege (roundhouse/natsauth.py): each role connects with its own credentials and
what it must not do is refused by nats-server; a router running on its role's rights takes and
cancels a job submitted by a job client. (`roundhouse up` runs every service this way: test_up
and test_observability run on it.)"""
from __future__ import annotations

import asyncio
import json

import grpc
import nats
import nats.errors
import pytest

from protos.v1 import router_pb2, router_pb2_grpc
from roundhouse import natsauth, natsd, subjects
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.conftest import TEST_ACK_WAIT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Client:
    """One role's connection, recording the permission violations nats-server reports."""

    def __init__(self, url: str, user: str = ""):
        self.url = url
        self.violations: list[str] = []
        self.nc: nats.NATS | None = None
        # each user's replies come to its own inbox prefix (the only inboxes it may hear)
        self._inbox = natsauth.inbox_prefix(user) if user else "_INBOX"

    async def __aenter__(self) -> "Client":
        async def error(e: Exception) -> None:
            self.violations.append(str(e))
        self.nc = await nats.connect(self.url, error_cb=error, allow_reconnect=False, inbox_prefix=self._inbox)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def refused(self, action) -> bool:
        """Whether `action(nc)` is refused by the server (a violation arrives within 3 s)."""
        before = len(self.violations)
        try:
            await action(self.nc)
            await self.nc.flush(timeout=5)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            pass  # a refused request gets no answer
        try:
            await eventually(lambda: len(self.violations) > before, 3, "a violation")
        except AssertionError:
            return False
        return "ermissions" in self.violations[-1] or "iolation" in self.violations[-1]


def _publish(subject: str):
    return lambda nc: nc.publish(subject, b"x")


def _subscribe(subject: str):
    return lambda nc: nc.subscribe(subject)


def _api(subject: str):
    return lambda nc: nc.request(subject, b"", timeout=1)


async def test_each_role_may_do_only_its_part(tmp_path, models):
    tenants = ("team-a", "team-b")
    passwords = natsauth.new_passwords(tenants)
    server = await natsd.start_async(tmp_path / "js", authorization=natsauth.authorization(passwords, tenants),
                                     log_file=tmp_path / "nats.log")
    url = {user: natsauth.url(server.url, user, passwords[user]) for user in natsauth.users(tenants)}
    router = Router(RouterConfig(catalogue=models, nats_url=url["router"], port=0, http_port=-1, publish_timeout_s=30.0,
                                 job_ack_wait_s=TEST_ACK_WAIT_S))
    request_subject = subjects.request_subject("tiny-0")
    try:
        with pytest.raises(nats.errors.Error):  # no credentials, or wrong ones: no connection at all
            await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
        await router.start()  # creates the streams, buckets and consumers it needs, on its own rights

        async with Client(url["worker"], "worker") as worker:
            assert await worker.refused(_subscribe("_INBOX.router.>")), "it overhears no router's replies"
            assert await worker.refused(_publish(request_subject)), "a worker queues no request"
            assert not await worker.refused(_publish(subjects.handback_subject("tiny-0"))), "it hands one back"
            for priority in ("high", "low"):   # each priority class likewise
                assert await worker.refused(_publish(subjects.request_subject("tiny-0", priority)))
                assert not await worker.refused(_publish(subjects.handback_subject("tiny-0", priority)))
            assert await worker.refused(_api(f"$JS.API.STREAM.INFO.KV_{subjects.JOBS_BUCKET}")), "it reads no job"
            assert await worker.refused(_publish(subjects.model_event_subject("tiny-0"))), "it speaks not for the manager"
            assert await worker.refused(_publish(subjects.JOBS_RUN))
        async with Client(url["jobs-team-a"], "jobs-team-a") as client:
            assert not await client.refused(_subscribe(subjects.tenant_job_events("team-a"))), "it follows its own jobs"
            assert await client.refused(_subscribe(subjects.tenant_job_events("team-b"))), "not another tenant's"
            assert await client.refused(_subscribe(subjects.tenant_job_events("*"))), "nor every tenant's"
            assert await client.refused(_subscribe(subjects.job_events_subject("*")))
            assert await client.refused(_subscribe("_INBOX.>")), "nor other clients' replies, nor workers' deliveries"
        async with Client(url["jobs"], "jobs") as client:
            assert await client.refused(_subscribe("_INBOX.>"))
            assert await client.refused(_subscribe(subjects.tenant_job_events("*")))
            assert await client.refused(_api(f"$JS.API.DIRECT.GET.KV_{subjects.JOBS_BUCKET}.$KV.{subjects.JOBS_BUCKET}.x")), \
                "a job client reads no stored job (another tenant's)"
            assert await client.refused(_publish(request_subject))
            assert await client.refused(_subscribe(f"{subjects.MODEL_EVENTS_PREFIX}.>"))
            reply = json.loads((await client.nc.request(subjects.JOBS_SUBMIT, json.dumps(
                {"model": "code", "prompt": "waits", "max_tokens": 2, "job_id": "roles-1"}).encode(), timeout=30)).data)
            assert reply["job_id"] == "roles-1" and reply["state"] == "JOB_STATE_QUEUED", reply
        async with Client(url["manager"], "manager") as manager:
            assert await manager.refused(_subscribe("_INBOX.>"))
            assert await manager.refused(_publish(request_subject))
            assert await manager.refused(_api(f"$JS.API.STREAM.MSG.DELETE.{subjects.STREAM}"))
            assert not await manager.refused(_publish(subjects.RESIDENCY_SNAPSHOTS))
        async with Client(url["observer"], "observer") as observer:
            assert await observer.refused(_publish(subjects.REQUEST_EVENTS))

        # The router, on its own rights, runs the job (it waits: nobody serves tiny-1) and cancels it.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            job = router_pb2.JobRequest(job_id="roles-1")

            async def running() -> bool:
                return (await stub.GetJob(job, timeout=10)).state == router_pb2.JOB_STATE_RUNNING
            await eventually(running, 60, "the router pulled the job and started it")
            assert (await stub.CancelJob(job, timeout=10)).state == router_pb2.JOB_STATE_CANCELLED
        log = (tmp_path / "nats.log").read_text()
        router_violations = [line for line in log.splitlines() if "user:router" in line and "Violation" in line]
        assert not router_violations, router_violations
    finally:
        await router.stop(grace=1)
        server.stop()

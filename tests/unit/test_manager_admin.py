"""The manager's admin calls that decide before touching any worker (no processes)."""
import asyncio
import pathlib

import pytest

from manager_svc.manager import Manager
from roundhouse import catalogue
from roundhouse.errors import ModelNotFound, ModelPinned
from roundhouse.jetstream import Depth

pytestmark = pytest.mark.unit


def _normal(pending: int, acked: int) -> Depth:
    """A queue read with everything in the normal class."""
    return Depth(pending=(0, pending, 0), acked=(0, acked, 0))


CAT = catalogue.from_mapping(
    {"models": [{"name": "m", "aliases": ["chat"], "path": "nowhere", "max_model_len": 64, "pinned": True, "default_max_tokens": 8}]},
    pathlib.Path("/"),
)


async def test_evicting_a_pinned_model_is_refused_by_name_or_alias():
    manager = Manager(CAT, "nats://unused")
    for name in ("m", "chat"):
        with pytest.raises(ModelPinned, match="unpin it first"):
            await manager.evict_by_hand(name)


async def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound):
        Manager(CAT, "nats://unused").entry("other")


async def test_a_worker_that_stops_reporting_is_lost_and_its_replacement_is_used():
    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2

    now = [1000.0]
    manager = Manager(CAT, "nats://unused", clock=lambda: now[0])
    limit = CAT.manager.worker_timeout_s

    def report(address: str, state=worker_pb2.ENGINE_STATE_READY) -> None:
        manager.apply_report(manager_pb2.WorkerReport(worker_id=address, model="m", address=address, state=state, in_flight=3))

    report("10.0.0.1:7000")
    e = manager.entry("m")
    now[0] += limit - 0.5
    manager._expire_silent(now[0])
    assert e.phase is Phase.READY and e.address, "silent for less than worker_timeout_s: still there"
    now[0] += 1.0
    manager._expire_silent(now[0])
    assert e.phase is Phase.UNLOADED and not e.address and e.reported_in_flight == 0
    assert "stopped reporting" in e.residency().error
    assert not e.view(now[0]).has_worker, "nothing is loaded on a worker that is gone"
    report("10.0.0.2:7001", worker_pb2.ENGINE_STATE_UNLOADED)  # the restarted worker, on a new port
    assert e.address == "10.0.0.2:7001" and e.view(now[0]).has_worker and not e.residency().error


def test_requests_handed_to_no_engine_are_demand():
    """A message taken by a worker that died (or handed back during an eviction) is ack-pending,
    not pending, in JetStream: while the model has no engine it still asks for a load."""
    from manager_svc.policy import Phase, wants_load

    e = Manager(CAT, "nats://unused").entry("m")
    e.address = "10.0.0.1:7000"
    e.phase = Phase.UNLOADED
    e.set_queue(_normal(0, 1), 5.0)
    assert e.queue_depth == 1 and e.waiting_since == 5.0 and wants_load(e.view(6.0), 6.0)
    e.phase = Phase.READY  # resident: ack-pending messages are the engine's own work
    e.set_queue(_normal(0, 1), 7.0)
    assert e.queue_depth == 0 and e.in_flight == 1


def test_the_highest_class_waiting_reaches_the_policy_even_when_handed_to_no_engine():
    from manager_svc.policy import Phase

    e = Manager(CAT, "nats://unused").entry("m")
    e.address = "10.0.0.1:7000"
    e.phase = Phase.UNLOADED
    e.set_queue(Depth(pending=(0, 0, 2), acked=(1, 0, 0)), 5.0)
    assert e.view(5.0).lane == 0, "a high request a dead worker took is still a high request"
    e.set_queue(Depth(pending=(0, 0, 2), acked=(0, 0, 0)), 6.0)
    assert e.view(6.0).lane == 2, "only low requests wait"
    e.phase = Phase.READY
    e.set_queue(Depth(pending=(0, 1, 0), acked=(1, 0, 0)), 7.0)
    assert e.view(7.0).lane == 1, "resident: what its engine holds is no demand"

    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from manager_svc.metrics import _ManagerGauges
    gauges = _ManagerGauges()
    gauges.watch(e_manager := Manager(CAT, "nats://unused"))
    e_manager.entry("m").set_queue(Depth(pending=(2, 0, 1), acked=(0, 0, 0)), 8.0)
    registry = CollectorRegistry()
    registry.register(gauges)
    text = generate_latest(registry).decode()
    for priority, n in (("high", 2), ("normal", 0), ("low", 1)):
        assert f'roundhouse_model_queue_depth_by_priority{{model="m",priority="{priority}"}} {float(n)}' in text


@pytest.mark.parametrize("marked", [True, False])
async def test_a_load_that_breaks_because_the_worker_died_is_not_a_model_failure(marked):
    """Worker.Load failing with the worker's mark is the model's failure (FAILED, backoff); the
    same call broken by a worker that died mid-load is not: unloaded, no worker, no backoff, so
    the requests waiting for the model keep waiting for its replacement."""
    import grpc
    from grpc import aio

    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2
    from roundhouse import grpcserver

    trailing = aio.Metadata((grpcserver.LOAD_FAILED_KEY, "1")) if marked else aio.Metadata()
    details = "model m failed to load: bad weights" if marked else "Stream removed (Socket closed)"

    class DyingWorker:
        async def Load(self, request, timeout):
            raise aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), trailing, details)

    manager = Manager(CAT, "nats://unused")
    manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="10.0.0.1:7000",
                                               state=worker_pb2.ENGINE_STATE_UNLOADED))
    manager._worker = lambda e: DyingWorker()
    e = manager.entry("m")
    manager._start_load(e)
    async with asyncio.timeout(5):       # the decide loop's part: apply the Load's answer
        while e.op is not None:
            manager._apply_inbox()
            await asyncio.sleep(0)
    if marked:
        assert e.phase is Phase.FAILED and e.backoff_until > 0 and "bad weights" in e.error
    else:
        assert e.phase is Phase.UNLOADED and not e.address and e.backoff_until == 0 and not e.error


def test_an_engine_that_dies_is_reloaded_after_a_backoff_that_grows_with_each_death():
    """A worker whose engine died reports UNLOADED with the reason (not FAILED: its waiters keep
    waiting). The manager loads it again only after a backoff, doubled by each death that comes
    soon after the last load, and starts over once an engine served for DEATHS_FORGOTTEN_S."""
    from manager_svc.policy import Phase, wants_load
    from manager_svc.state import DEATHS_FORGOTTEN_S
    from protos.v1 import manager_pb2, worker_pb2

    now = [1000.0]
    manager = Manager(CAT, "nats://unused", clock=lambda: now[0])
    base = CAT.manager.load_backoff_s
    e = manager.entry("m")

    def report(state, error: str = "") -> None:
        manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="10.0.0.1:7000", state=state, error=error))

    waits = []
    for _ in range(3):
        report(worker_pb2.ENGINE_STATE_READY)
        report(worker_pb2.ENGINE_STATE_UNLOADED, "roundhouse: engine died: boom")
        assert e.phase is Phase.UNLOADED and "engine died" in e.residency().error
        e.set_queue(_normal(1, 0), now[0])
        assert not wants_load(e.view(now[0]), now[0]), "not again at once"
        waits.append(e.backoff_until - now[0])
        report(worker_pb2.ENGINE_STATE_UNLOADED, "roundhouse: engine died: boom")  # its next report: no new death
        assert e.backoff_until - now[0] == waits[-1]
        now[0] = e.backoff_until
        assert wants_load(e.view(now[0]), now[0]), "loaded again on demand once the backoff passed"
    assert waits == [base, 2 * base, 4 * base]
    report(worker_pb2.ENGINE_STATE_READY)
    now[0] += DEATHS_FORGOTTEN_S + 1
    report(worker_pb2.ENGINE_STATE_UNLOADED, "roundhouse: engine died: boom")
    assert e.backoff_until - now[0] == base, "a long life before it died: the backoff starts over"


def test_a_model_the_manager_failed_stays_failed_while_its_worker_reports_it_unloaded():
    """A model refused (broken files) or whose load failed is FAILED for the routers (they fail
    its waiters); its worker, which holds no engine, keeps reporting UNLOADED: that is no news."""
    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2

    manager = Manager(CAT, "nats://unused", clock=lambda: 1000.0)
    e = manager.entry("m")
    manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="a:1", state=worker_pb2.ENGINE_STATE_UNLOADED))
    e.failed("weights are corrupt", 1000.0, CAT.manager.load_backoff_s)
    manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="a:1", state=worker_pb2.ENGINE_STATE_UNLOADED))
    assert e.phase is Phase.FAILED and e.error == "weights are corrupt"
    manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="a:1", state=worker_pb2.ENGINE_STATE_LOADING))
    assert e.phase is Phase.LOADING, "a load under way is news"


async def test_a_report_older_than_the_last_answer_of_its_worker_is_not_its_state():
    """A wake answers in milliseconds: the report the worker sent when it started LOADING can
    arrive after the Load answer (READY). Taken as the state, it left a ready model LOADING,
    blocking every transition on its GPU until the next report."""
    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2

    manager = Manager(CAT, "nats://unused")
    e = manager.entry("m")

    def report(worker: str, state, seq: int) -> None:
        manager.apply_report(manager_pb2.WorkerReport(worker_id=worker, model="m", address="a:1", state=state, state_seq=seq))

    report("w1", worker_pb2.ENGINE_STATE_SLEEPING, 4)
    assert e.phase is Phase.SLEEPING
    e.phase, e.state_seq = Phase.READY, 6          # what the Load answer (state_seq 6) said
    report("w1", worker_pb2.ENGINE_STATE_LOADING, 5)
    assert e.phase is Phase.READY and e.reported_at, "stale: a sign of life, not the state"
    report("w1", worker_pb2.ENGINE_STATE_UNLOADED, 7)
    assert e.phase is Phase.UNLOADED, "a newer report is the state"
    report("w2", worker_pb2.ENGINE_STATE_READY, 1)
    assert e.phase is Phase.READY, "a new worker process counts from 1 again"


def test_load_and_wake_estimates_are_learned_and_say_how_soon_a_model_serves():
    import math

    from manager_svc.policy import Phase

    e = Manager(CAT, "nats://unused").entry("m")
    assert e.ready_in(0) == math.inf, "no worker: it cannot serve"
    e.address = "a:1"
    assert e.ready_in(0) == 30.0, "the configured guess until a load is measured"
    e.learn("load", 20.0)
    assert e.last_load_s == 20.0, "the first measurement replaces the guess"
    e.learn("load", 10.0)
    assert e.last_load_s == 15.0, "later ones move it halfway"
    e.phase = Phase.SLEEPING
    e.learn("wake", 0.4)
    assert e.ready_in(0) == 0.4
    e.phase, e.op_started, e.op_estimate_s = Phase.LOADING, 100.0, 15.0
    assert e.ready_in(110.0) == 5.0 and e.event(110.0).ready_in_s == 5.0
    e.phase = Phase.READY
    assert e.ready_in(0) == 0.0


def test_the_queue_ahead_counts_in_how_soon_a_model_serves():
    """Residency-aware routing's estimate: the load or wake, plus a round of the worker's
    learned request time for each full set of slots queued ahead."""
    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2

    manager = Manager(CAT, "nats://unused")
    e = manager.entry("m")
    slots = e.spec.max_num_seqs

    def report(request_s: float) -> None:
        manager.apply_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="a:1",
                                                      state=worker_pb2.ENGINE_STATE_UNLOADED, request_s=request_s))

    report(0.0)
    e.learn("load", 20.0)
    e.set_queue(_normal(3 * slots, 0), 1.0)
    assert (e.event(1.0).ready_in_s, e.event(1.0).queue_s) == (20.0, 0.0), "no request time learned yet: the load only"
    report(2.0)
    assert e.event(1.0).queue_s == 6.0 and e.event(1.0).ready_in_s == 26.0, "three full rounds ahead"
    e.set_queue(_normal(slots - 1, 0), 2.0)
    assert e.event(2.0).queue_s == 0.0, "a slot is left for it"
    report(0.0)
    assert e.request_s == 2.0, "a worker that has learned nothing (a restart) does not erase the estimate"
    e.phase = Phase.READY
    e.set_queue(_normal(0, slots), 3.0)
    assert e.event(3.0).queue_s == 2.0 and e.event(3.0).ready_in_s == 2.0, "resident, every slot busy: one round"


async def test_inputs_change_nothing_until_the_decide_loop_applies_them_in_order():
    """One writer: a report (gRPC handler) and a pin (admin call) are posted to the manager's
    inbox; the entry changes only when the decide loop applies them, in arrival order."""
    from manager_svc.policy import Phase
    from protos.v1 import manager_pb2, worker_pb2

    manager = Manager(CAT, "nats://unused")
    e = manager.entry("m")
    manager.on_report(manager_pb2.WorkerReport(worker_id="w", model="m", address="a:1", state=worker_pb2.ENGINE_STATE_READY))
    pin = asyncio.ensure_future(manager.pin("m", False))
    await asyncio.sleep(0)
    assert e.phase is Phase.UNLOADED and not e.address and e.pinned and not pin.done(), "posted, not applied"
    manager._apply_inbox()
    assert e.phase is Phase.READY and e.address == "a:1"
    assert (await asyncio.wait_for(pin, 5)) is e and not e.pinned

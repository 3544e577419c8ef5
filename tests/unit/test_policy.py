"""Table tests of the residency policy (no processes, no clock)."""
import pytest

from manager_svc.policy import Evict, Fail, Load, ModelView, Phase, evictions_for, plan

pytestmark = pytest.mark.unit

MB = 2**20
NOW = 1000.0


def m(name, phase=Phase.UNLOADED, fp=100 * MB, **kw):
    kw.setdefault("resident_since", 0.0)
    return ModelView(name=name, gpu="g", footprint=fp, phase=phase, **kw)


def ready(name, **kw):
    return m(name, Phase.READY, **kw)


def cold(name, **kw):
    kw.setdefault("queue_depth", 1)
    kw.setdefault("waiting_since", NOW - 1)
    return m(name, **kw)


BUDGET = {"g": 250 * MB}

CASES = [
    ("loads into free room", [cold("a")], [Load("a")]),
    ("nothing waiting, nothing to do", [ready("a"), m("b")], []),
    ("evicts the least recently used idle model", [ready("a", last_used=5), ready("b", last_used=9), cold("c")], [Evict("a")]),
    ("frequency beats recency", [ready("a", last_used=5, frequency=9), ready("b", last_used=9, frequency=1), cold("c")], [Evict("b")]),
    ("lower priority goes first", [ready("a", last_used=1, priority=5), ready("b", last_used=9), cold("c", priority=5)], [Evict("b")]),
    ("never a higher-priority model than the one loading", [ready("a", priority=9), ready("b", priority=9), cold("c")], []),
    ("never a pinned model", [ready("a", pinned=True, last_used=1), ready("b", last_used=9), cold("c")], [Evict("b")]),
    ("all pinned: evict nothing", [ready("a", pinned=True), ready("b", pinned=True), cold("c")], []),
    ("never a model with requests in flight", [ready("a", in_flight=2, last_used=1), ready("b", last_used=9), cold("c")], [Evict("b")]),
    ("busy models are not drained for a fresh waiter", [ready("a", in_flight=1), ready("b", queue_depth=3), cold("c")], []),
    ("busy models are drained for a starving waiter",
     [ready("a", in_flight=1, last_used=1), ready("b", queue_depth=3), cold("c", waiting_since=NOW - 31)], [Evict("a")]),
    ("minimum resident time is honoured", [ready("a", resident_since=NOW - 5, min_resident_s=30), ready("b", resident_since=NOW - 5, min_resident_s=30), cold("c")], []),
    ("a model that reloads in 1 s is protected for 4 s, not 30",
     [ready("a", resident_since=NOW - 5, min_resident_s=30, swap_s=1.0), ready("b", resident_since=NOW - 5, min_resident_s=30), cold("c")],
     [Evict("a")]),
    ("a waiter whose own wake is short starves sooner: 4 wakes of 2 s",
     [ready("a", in_flight=1), ready("b", queue_depth=3), cold("c", waiting_since=NOW - 9, swap_s=2.0)], [Evict("a")]),
    ("and not before", [ready("a", in_flight=1), ready("b", queue_depth=3), cold("c", waiting_since=NOW - 7, swap_s=2.0)], []),
    ("one transition at a time", [m("a", Phase.LOADING), cold("b"), cold("c")], []),
    ("evicting blocks new work too", [m("a", Phase.EVICTING), cold("c")], []),
    ("higher priority waiter first", [cold("a", waiting_since=NOW - 9), cold("b", priority=1)], [Load("b")]),
    ("longest waiting first", [cold("a", waiting_since=NOW - 2), cold("b", waiting_since=NOW - 9)], [Load("b")]),
    ("a high-class tenant's waiting request first (lane 0)",
     [cold("a", waiting_since=NOW - 9, priority=1), cold("b", lane=0)], [Load("b")]),
    ("a model only low-class requests wait for goes after normal ones (lane 2)",
     [cold("a", waiting_since=NOW - 9, lane=2), cold("b")], [Load("b")]),
    ("backoff after a failure", [cold("a", phase=Phase.FAILED, backoff_until=NOW + 5)], []),
    ("retry after backoff", [cold("a", phase=Phase.FAILED, backoff_until=NOW - 1)], [Load("a")]),
    ("no worker registered yet", [cold("a", has_worker=False)], []),
    ("draining models are not loaded", [cold("a", draining=True)], []),
    ("too big for the whole budget", [cold("a", fp=300 * MB)], [Fail("a", "needs 300 MiB but the budget of g is 250 MiB")]),
    ("broken weights fail before any eviction", [ready("a"), ready("b"), cold("c", broken="bad header")], [Fail("c", "bad header")]),
    ("evicts two small for one big", [ready("a", fp=100 * MB, last_used=1), ready("b", fp=100 * MB, last_used=2), cold("c", fp=200 * MB)],
     [Evict("a"), Evict("b")]),
    ("not enough even after evicting all that may go: evict nothing",
     [ready("a", fp=100 * MB), ready("b", fp=100 * MB, pinned=True), cold("c", fp=200 * MB)], []),
]


@pytest.mark.parametrize("name, models, expected", CASES, ids=[c[0] for c in CASES])
def test_plan(name, models, expected):
    assert plan(models, BUDGET, NOW) == expected


def test_gpus_are_planned_independently():
    models = [cold("a"), ModelView(name="b", gpu="h", footprint=10, phase=Phase.UNLOADED, queue_depth=1)]
    assert plan(models, {"g": 250 * MB, "h": 100}, NOW) == [Load("a"), Load("b")]


def test_eviction_for_returns_nothing_when_it_cannot_free_enough():
    assert evictions_for(cold("c"), [ready("a")], need=200 * MB, now=NOW, host_free=0) == []



# ---- sleep tiers ------------------------------------------------------------------------------

def sleepy(name, phase=Phase.READY, **kw):
    """Footprint 100 MB of which 40 MB weights; asleep it keeps 10 MB of the GPU."""
    kw.setdefault("can_sleep", True)
    kw.setdefault("residue", 10 * MB)
    return m(name, phase, weight_bytes=40 * MB, **kw)


SLEEP_CASES = [
    ("level 1 while the host has room for its weights",
     [sleepy("a"), sleepy("b", last_used=9), cold("c")], {"g": 50 * MB}, [Evict("a", 1)]),
    ("level 2 when it has not", [sleepy("a"), sleepy("b", last_used=9), cold("c")], {"g": 30 * MB}, [Evict("a", 2)]),
    ("no host figure: level 2", [sleepy("a"), sleepy("b", last_used=9), cold("c")], None, [Evict("a", 2)]),
    ("an engine that cannot sleep is stopped",
     [sleepy("a", can_sleep=False), sleepy("b", last_used=9), cold("c")], {"g": 500 * MB}, [Evict("a", 0)]),
    ("a sleeper's residue counts: 120 MB held, 140 MB more do not fit without evicting the ready one",
     [sleepy("a", Phase.SLEEPING), sleepy("b", Phase.SLEEPING), ready("c", fp=100 * MB), cold("d", fp=140 * MB)],
     {"g": 0}, [Evict("c", 0)]),
    ("without the residue it would fit",
     [sleepy("a", Phase.SLEEPING, residue=0), ready("c", fp=100 * MB), cold("d", fp=140 * MB)], {"g": 0}, [Load("d")]),
    ("a sleeper with waiting requests is woken by a Load when its rest fits",
     [sleepy("a", Phase.SLEEPING, queue_depth=2, waiting_since=NOW - 1), ready("b", fp=150 * MB)], {"g": 0}, [Load("a")]),
    ("sleepers are stopped, least recently used first, when ready models cannot make room",
     [sleepy("a", Phase.SLEEPING, last_used=1), sleepy("b", Phase.SLEEPING, last_used=2), ready("p", fp=130 * MB, pinned=True),
      cold("c", fp=110 * MB)], {"g": 0}, [Evict("a", 0)]),
    ("two evictions share what the host lends: the first sleeps at level 1, the second at 2",
     [sleepy("a", last_used=1), sleepy("b", last_used=2), cold("c", fp=200 * MB)], {"g": 50 * MB}, [Evict("a", 1), Evict("b", 2)]),
]


@pytest.mark.parametrize("models, host_free, expected", [c[1:] for c in SLEEP_CASES], ids=[c[0] for c in SLEEP_CASES])
def test_sleep_tiers(models, host_free, expected):
    assert plan(models, BUDGET, NOW, host_free=host_free) == expected


def test_a_model_whose_queue_is_being_read_after_a_request_event_is_not_idle():
    """Its requests may be on their way to its count while another model's event is read first."""
    assert plan([ready("a", counting=True), ready("b", last_used=9), cold("c")], BUDGET, NOW) == [Evict("b")]
    assert plan([ready("a", counting=True), ready("b", counting=True), cold("c")], BUDGET, NOW) == []

"""A worker's sleep and wake path (worker_svc.worker): states, counters, and the fallback to a
cold start when a woken engine fails its probe check.

The real ModelWorker; only its engine is a stand-in (this is a unit test of the worker's
lifecycle: the real engine's sleep and wake run in tests/integration/test_sleep.py)."""
import pytest

from roundhouse.catalogue import ModelSpec
from worker_svc import worker as worker_module
from worker_svc.config import WorkerConfig
from worker_svc.residency import State
from worker_svc.worker import ModelWorker

pytestmark = pytest.mark.unit


class FakeEngine:
    started: list["FakeEngine"] = []
    wake_answer = ""          # what the next wake says ("" = woke and passed its probe)

    def __init__(self):
        self.sleep_level, self.sleeps, self.stopped, self.dead, self.can_sleep = 0, [], False, False, False
        FakeEngine.started.append(self)

    @classmethod
    async def start(cls, spec):
        return cls()

    async def sleep(self, level: int) -> None:
        self.sleeps.append(level)
        self.sleep_level = level

    async def wake(self) -> str:
        self.sleep_level = 0
        return FakeEngine.wake_answer

    async def shutdown(self) -> None:
        self.stopped = True

    def unfinished(self) -> int:
        return 0


@pytest.fixture
def worker(tmp_path, monkeypatch):
    FakeEngine.started, FakeEngine.wake_answer = [], ""
    monkeypatch.setattr(worker_module, "Engine", FakeEngine)
    monkeypatch.setattr(worker_module.preflight, "check", lambda path: "")
    return ModelWorker(WorkerConfig(model=ModelSpec(name="m", path=str(tmp_path), max_model_len=64, default_max_tokens=16)))


async def test_sleep_then_wake_reuses_the_engine(worker):
    await worker.load()
    first = worker.engine
    await worker.evict(sleep_level=1)
    assert worker.residency.state is State.SLEEPING and first.sleeps == [1] and not first.stopped
    assert worker.status().sleep_level == 1 and worker.report("a:1", "").sleep_level == 1
    assert not worker.report("a:1", "").can_sleep, "a cpu model's sleep frees nothing"
    await worker.load()
    s = worker.status()
    assert worker.residency.state is State.READY and worker.engine is first
    assert (s.loads, s.wakes, s.restart_reason, s.sleep_level) == (1, 1, "", 0)


async def test_a_wake_that_fails_its_check_restarts_the_engine_and_says_why(worker):
    await worker.load()
    first = worker.engine
    await worker.evict(sleep_level=2)
    FakeEngine.wake_answer = "the wake probe gave tokens [1], not [2] as at first load"
    await worker.load()
    s = worker.status()
    assert worker.residency.state is State.READY and first.stopped and worker.engine is not first
    assert (s.loads, s.wakes) == (2, 0)
    assert s.restart_reason == FakeEngine.wake_answer, "the reason reaches the manager (WorkerStatus)"


async def test_a_sleeping_engine_evicted_again_is_stopped(worker):
    await worker.load()
    await worker.evict(sleep_level=1)
    await worker.evict(sleep_level=1)       # asleep already: nothing to do
    assert worker.residency.state is State.SLEEPING and worker.engine.sleeps == [1]
    engine = worker.engine
    await worker.evict(sleep_level=0)
    assert worker.residency.state is State.UNLOADED and engine.stopped and worker.engine is None


async def test_level_zero_stops_as_before(worker):
    await worker.load()
    engine = worker.engine
    await worker.evict()
    assert worker.residency.state is State.UNLOADED and engine.stopped and engine.sleeps == []

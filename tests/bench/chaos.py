"""Chaos run: a mixed load on a whole Roundhouse stack while workers and NATS are broken under it.

    .venv/bin/python -m tests.bench.chaos --minutes 3 [--seed N] [--clients 12] [--var DIR]

Starts its own stack on the embedded defaults, as `roundhouse up` does (nats-server on a fixed
port with a durable store, the manager, the router, one supervised worker per model), under
--var (default: a new temporary directory; logs in <var>/run, request ids `chaos-...` in them).
Models `chat` and `code` are loaded first, then --clients loops send requests for --minutes:
streamed and whole, to /v1/completions and /v1/chat/completions (aiohttp, raw SSE), max_tokens
8..400, ignore_eos, temperature 0, and async jobs (NATS `rh.jobs.submit`, then gRPC GetJob).

After a warm-up of the first 20% (the baseline), faults come at seeded random intervals until
80% of the run: SIGKILL of a worker (its supervisor restarts it), SIGSTOP of a worker for 3-15 s
then SIGCONT, and a NATS bounce (SIGKILL nats-server, start it again on the same port and store
after 1-5 s). The rest of the run has no faults; then every request still out is waited for.

Each request or job gets exactly one outcome: completed (200 and a whole body, or an SSE stream
with a finish_reason and `data: [DONE]`, and all max_tokens tokens), rejected (4xx), failed (5xx,
an SSE error chunk, a cut stream, a FAILED job) or lost (no outcome within 300 s of sending).
Printed: the counts, failures by message, TTFT p50 / p99 before and during the faults, and the
timeline of faults and restarts. Exit status 1 if anything was lost, a service died, or a
process was left behind. Not part of CI; the stack is always torn down, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import random
import re
import shlex
import signal
import sys
import tempfile
import time

import aiohttp
import grpc
import nats
import nats.errors
import psutil

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, natsd, reaper, stack, subjects
from router_svc.openai_api import HTTP_STATUS

MODELS = ("chat", "code")
TIMEOUT_S = 300.0          # each request's own client timeout; past it, the request is lost
POLL_S = 1.0               # job polling and submit-retry interval
PROMPTS = ("The roundhouse keeps the locomotives", "def fibonacci(n):", "Hello, how are you today?",
           "What is the capital of France?", "for i in range(10): print(i)", "The quick brown fox")
KINDS = {"completions-stream": 3, "completions": 2, "chat-stream": 3, "chat": 2, "job": 1}  # weights


# ---- ledger and timeline --------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    kind: str
    started: float             # seconds since the run began
    outcome: str = ""          # completed / rejected / failed / lost
    error: str = ""
    ttft: float | None = None  # streamed requests: seconds to the first data chunk with text


class Ledger:
    """One entry per request sent; each gets exactly one outcome."""

    def __init__(self) -> None:
        self.entries: dict[str, Outcome] = {}
        self.submit_retries = 0   # job submits sent again (same job_id) after no reply

    def sent(self, rid: str, kind: str, started: float) -> None:
        self.entries[rid] = Outcome(kind, started)

    def end(self, rid: str, outcome: str, error: str = "", ttft: float | None = None) -> None:
        e = self.entries[rid]
        assert not e.outcome, f"{rid} ended twice ({e.outcome}, then {outcome})"
        e.outcome, e.error, e.ttft = outcome, error, ttft

    def count(self, outcome: str, jobs: bool | None = None) -> int:
        return sum(1 for e in self.entries.values() if e.outcome == outcome and jobs in (None, e.kind == "job"))


class Timeline:
    """Faults and stack events, timestamped, printed as they happen."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str, str, str]] = []   # (monotonic, wall clock, kind, text)
        self.first_fault: float | None = None
        self.last_fault_end: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, kind: str, text: str) -> None:
        self.events.append((time.monotonic(), f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}", kind, text))
        print(self.line(self.events[-1]), flush=True)

    def line(self, event: tuple[float, str, str, str]) -> str:
        """Seconds from the run's start (negative: while the stack started), wall clock, kind, text."""
        t, wall, kind, text = event
        return f"{t - self.t0:+8.1f}s {wall} {kind:5} {text}"


# ---- the stack ------------------------------------------------------------------------------------


class Stack:
    """nats-server, manager, router and one supervised worker per model, as `roundhouse up` runs them."""

    def __init__(self, var: pathlib.Path, timeline: Timeline):
        self.var, self.run_dir, self.timeline = var, var / "run", timeline
        self.stop = asyncio.Event()
        self.nats: natsd.NatsServer | None = None
        self.services: list[stack.ServiceProcess] = []
        self.supervisors: dict[str, stack.Supervisor] = {}
        self.watchers: list[asyncio.Task] = []   # the router and the manager
        self.broken = ""         # set when the router or the manager exits on its own
        self.sessions: set[int] = set()   # each service and worker starts its own session (its engines join it)

    async def start(self) -> None:
        config = await asyncio.to_thread(stack.write_default, self.var)
        self.nats = await natsd.start_async(self.var / "jetstream", natsd.free_port(), durable=True)
        common = ["--config", str(config), "--nats-url", self.nats.url, "--log-level", "info"]
        manager = await stack.start_service("manager_svc", "manager", self.run_dir, *common, "--port", "0")
        self.services.append(manager)
        router = await stack.start_service("router_svc", "router", self.run_dir, *common, "--port", "0", "--http-port", "0")
        self.services.append(router)
        for s in self.services:
            self.sessions.add(s.process.pid)
            self.watchers.append(asyncio.create_task(self._watch(s)))
        say = functools.partial(self.timeline.log, "stack")
        for m in catalogue.load(config).models:
            start = functools.partial(self._start_worker, config, m.name, f"127.0.0.1:{manager.info['port']}")
            sup = self.supervisors[m.name] = stack.Supervisor(f"worker for {m.name}", start, say=say)
            await sup.begin(self.stop)
        self.http = f"http://127.0.0.1:{router.info['http_port']}"
        self.grpc = f"127.0.0.1:{router.info['port']}"

    async def _start_worker(self, config: pathlib.Path, model: str, manager: str) -> stack.WorkerProcess:
        w = await stack.start_worker(config, model, self.nats.url, self.run_dir, "--manager", manager,
                                     "--log-level", "info", timeout=180)
        self.sessions.add(w.process.pid)
        return w

    async def _watch(self, service: stack.ServiceProcess) -> None:
        code = await asyncio.to_thread(service.process.wait)
        if not self.stop.is_set():
            self.broken = f"{service.name} exited ({code}); log {service.log_path}"
            self.timeline.log("stack", "UNEXPECTED: " + self.broken)

    def worker_pid(self, model: str) -> int | None:
        cur = self.supervisors[model].current
        return cur.process.pid if cur is not None and cur.process.poll() is None else None

    async def teardown(self) -> None:
        """As `roundhouse up` stops: workers first (while NATS is up), then the services, then NATS."""
        self.stop.set()
        for w in self.watchers:
            w.cancel()
        await stack.stop_supervised(list(self.supervisors.values()))
        await stack.stop_all(self.services)
        if self.nats is not None:
            self.nats.stop()


# ---- faults ---------------------------------------------------------------------------------------


async def kill_worker(st: Stack, rng: random.Random, log) -> None:
    model = rng.choice(MODELS)
    pid = st.worker_pid(model)
    if pid is None:
        return log("fault", f"SIGKILL worker {model}: skipped (no worker running)")
    os.kill(pid, signal.SIGKILL)  # the worker only; its supervisor reaps the engine and restarts it
    log("fault", f"SIGKILL worker {model} (pid {pid})")


async def pause_worker(st: Stack, rng: random.Random, log) -> None:
    model, seconds = rng.choice(MODELS), rng.uniform(3, 15)
    pid = st.worker_pid(model)
    if pid is None:
        return log("fault", f"SIGSTOP worker {model}: skipped (no worker running)")
    os.kill(pid, signal.SIGSTOP)
    log("fault", f"SIGSTOP worker {model} (pid {pid}) for {seconds:.1f} s")
    try:
        await asyncio.sleep(seconds)  # the fault itself
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        log("fault", f"SIGCONT worker {model} (pid {pid})")


async def bounce_nats(st: Stack, rng: random.Random, log) -> None:
    down = rng.uniform(1, 5)
    old = st.nats
    old.process.kill()
    await asyncio.to_thread(old.process.wait)
    log("fault", f"SIGKILL nats-server (pid {old.process.pid}); down for {down:.1f} s")
    try:
        await asyncio.sleep(down)  # the fault itself
    finally:
        st.nats = await restart_nats(old, log)


async def restart_nats(old: natsd.NatsServer, log) -> natsd.NatsServer:
    for attempt in range(1, 31):
        try:
            new = await natsd.start_async(old.store_dir, old.port, durable=True)
            log("fault", f"nats-server restarted on port {old.port} (pid {new.process.pid})")
            return new
        except RuntimeError as e:
            log("fault", f"nats-server did not restart (try {attempt}): {e}")
            await asyncio.sleep(POLL_S)
    raise RuntimeError("nats-server could not be restarted on its port")


FAULTS = {"kill": kill_worker, "pause": pause_worker, "nats": bounce_nats}


async def inject_faults(st: Stack, tl: Timeline, rng: random.Random, start_s: float, end_s: float) -> None:
    """One fault at a time, from start_s to end_s of the run, seeded gaps of 5-15 s between them."""
    await asyncio.sleep(start_s - tl.now())
    while tl.now() < end_s and not st.broken:
        tl.first_fault = tl.first_fault if tl.first_fault is not None else tl.now()
        await FAULTS[rng.choice(list(FAULTS))](st, rng, tl.log)
        tl.last_fault_end = tl.now()
        await asyncio.sleep(min(rng.uniform(5, 15), max(0.0, end_s - tl.now())))


# ---- the workload ---------------------------------------------------------------------------------


def verdict(finish: str | None, usage: dict | None, max_tokens: int) -> tuple[str, str]:
    if finish is None:
        return "failed", "no finish_reason"
    if finish not in ("length", "stop"):
        return "failed", f"finish_reason {finish}"
    if usage is not None and usage.get("completion_tokens") != max_tokens:
        return "failed", f"short: {usage.get('completion_tokens')} of {max_tokens} tokens"
    return "completed", ""


async def read_sse(resp: aiohttp.ClientResponse, sent: float, max_tokens: int) -> tuple[str, str, float | None]:
    """(outcome, error, ttft) of a streamed response."""
    ttft = finish = usage = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank lines and `: queued` / `: loading` comments
        data = line[5:].strip()
        if data == b"[DONE]":
            return (*verdict(finish, usage, max_tokens), ttft)
        chunk = json.loads(data)
        if "error" in chunk:
            return "failed", f"SSE error: {chunk['error'].get('message')}", ttft
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or []:
            if ttft is None and (c.get("text") or (c.get("delta") or {}).get("content")):
                ttft = time.monotonic() - sent
            finish = c.get("finish_reason") or finish
    return "failed", "stream ended without data: [DONE]", ttft


def http_body(kind: str, model: str, rng: random.Random) -> dict:
    prompt, stream = rng.choice(PROMPTS), kind.endswith("-stream")
    body = {"model": model, "max_tokens": rng.randint(8, 400), "ignore_eos": True, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if kind.startswith("chat"):
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


async def http_request(session: aiohttp.ClientSession, base: str, rid: str, kind: str, body: dict) -> tuple[str, str, float | None]:
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    sent = time.monotonic()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            async with session.post(base + path, json=body, headers={"x-request-id": rid}) as resp:  # rid: in the logs
                if resp.status != 200:
                    text = await resp.text()
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        text = json.loads(text)["error"]["message"]
                    return ("rejected" if resp.status < 500 else "failed"), f"HTTP {resp.status}: {text}", None
                if body["stream"]:
                    return await read_sse(resp, sent, body["max_tokens"])
                whole = await resp.json()
                return (*verdict(whole["choices"][0].get("finish_reason"), whole.get("usage"), body["max_tokens"]), None)
    except TimeoutError:
        return "lost", f"no outcome within {TIMEOUT_S:.0f} s", None
    except (aiohttp.ClientError, ValueError, KeyError, IndexError) as e:
        return "failed", f"{type(e).__name__}: {e}", None


async def submit_job(nc: nats.NATS, body: dict, deadline: float, ledger: Ledger) -> dict | None:
    """The submit reply; while none comes (NATS down), the same job_id is submitted again (idempotent)."""
    while time.monotonic() < deadline:
        try:
            return json.loads((await nc.request(subjects.JOBS_SUBMIT, json.dumps(body).encode(), timeout=5)).data)
        except (nats.errors.Error, asyncio.TimeoutError):
            ledger.submit_retries += 1
            await asyncio.sleep(POLL_S)
    return None


async def run_job(nc: nats.NATS, router: router_pb2_grpc.RouterStub, jid: str, model: str, rng: random.Random,
                  ledger: Ledger) -> tuple[str, str]:
    deadline = time.monotonic() + TIMEOUT_S
    body = {"job_id": jid, "model": model, "prompt": rng.choice(PROMPTS), "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    reply = await submit_job(nc, body, deadline, ledger)
    if reply is None:
        return "lost", "submit never answered"
    if "error" in reply:
        status = HTTP_STATUS.get(reply["error"].get("code", ""), (500, ""))[0]
        return ("rejected" if status < 500 else "failed"), f"job submit: {reply['error'].get('message')}"
    last = "QUEUED"
    while time.monotonic() < deadline:
        try:
            job = await router.GetJob(router_pb2.JobRequest(job_id=jid), timeout=5)
            last = router_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
            if job.state == router_pb2.JOB_STATE_SUCCEEDED:
                ok = job.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP) and job.usage.completion_tokens == 16
                return ("completed", "") if ok else ("failed", f"job SUCCEEDED but {job.usage.completion_tokens} of 16 tokens")
            if job.state in (router_pb2.JOB_STATE_FAILED, router_pb2.JOB_STATE_CANCELLED):
                return "failed", f"job {last}: {job.error.message}"
        except grpc.aio.AioRpcError as e:
            last = f"GetJob {e.code().name}: {e.details()}"
        await asyncio.sleep(POLL_S)
    return "lost", f"not terminal after {TIMEOUT_S:.0f} s (last: {last})"


async def client_loop(i: int, st: Stack, tl: Timeline, ledger: Ledger, rng: random.Random, end_s: float,
                      session: aiohttp.ClientSession, nc: nats.NATS, router: router_pb2_grpc.RouterStub, tag: str) -> None:
    n = 0
    while tl.now() < end_s and not st.broken:
        n += 1
        kind, model = rng.choices(list(KINDS), weights=list(KINDS.values()))[0], rng.choice(MODELS)
        rid = f"chaos-{tag}-c{i}-{n}"
        ledger.sent(rid, kind, tl.now())
        if kind == "job":
            outcome, error = await run_job(nc, router, rid, model, rng, ledger)
            ledger.end(rid, outcome, error)
        else:
            ledger.end(rid, *await http_request(session, st.http, rid, kind, http_body(kind, model, rng)))


async def progress(tl: Timeline, ledger: Ledger, every_s: float = 15.0) -> None:
    while True:
        await asyncio.sleep(every_s)  # a progress line's period
        counts = collections.Counter(e.outcome or "in flight" for e in ledger.entries.values())
        print(f"{tl.now():+8.1f}s sent {len(ledger.entries)}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)


async def warm(base: str) -> None:
    """Loads the workload's models before the clock starts, so the baseline is not a cold start."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        for model in MODELS:
            async with session.post(f"{base}/v1/completions", json={"model": model, "prompt": "warm up", "max_tokens": 2}) as r:
                if r.status != 200:
                    raise RuntimeError(f"warm-up of {model}: HTTP {r.status}: {await r.text()}")


# ---- the report -----------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] * 1000:.0f}"


def by_message(entries: list[Outcome]) -> list[tuple[str, int]]:
    """Error messages counted by prefix, ids and numbers masked."""
    norm = [re.sub(r"chaos-[\w.-]+|\b[0-9a-f]{12,}\b|(?<!HTTP )\b\d+(\.\d+)?\b", "#", e.error)[:100] for e in entries]
    return collections.Counter(norm).most_common(10)


def report(a: argparse.Namespace, st: Stack, tl: Timeline, ledger: Ledger, leftover: list[str]) -> None:
    es = list(ledger.entries.values())
    print("\n" + "=" * 100)
    print("command:", shlex.join(sys.orig_argv))
    print(f"seed {a.seed}, {a.minutes:g} min, {a.clients} clients, faults +{a.minutes * 12:.0f}s..+{a.minutes * 48:.0f}s; "
          f"stack logs: {st.run_dir}")
    print(f"\n{'':10} {'http':>6} {'jobs':>6} {'total':>6}")
    print(f"{'accepted':10} {sum(e.kind != 'job' for e in es):>6} {sum(e.kind == 'job' for e in es):>6} {len(es):>6}")
    for o in ("completed", "rejected", "failed", "lost"):
        print(f"{o:10} {ledger.count(o, False):>6} {ledger.count(o, True):>6} {ledger.count(o):>6}")
    print(f"(job submits sent again with the same job_id after no reply: {ledger.submit_retries})")
    for o in ("rejected", "failed", "lost"):
        if ledger.count(o):
            print(f"\n{o}, by message:")
            for msg, n in by_message([e for e in es if e.outcome == o]):
                print(f"  {n:>5}  {msg}")
    first = tl.first_fault if tl.first_fault is not None else float("inf")
    last = tl.last_fault_end if tl.last_fault_end is not None else float("inf")
    phases = {"before faults": lambda t: t < first, "during faults": lambda t: first <= t < last, "after faults": lambda t: t >= last}
    print("\nTTFT of streamed requests (sent to first data chunk with text), ms")
    print(f"{'phase':14} {'n':>5} {'p50':>7} {'p99':>7}")
    for name, inside in phases.items():
        xs = [e.ttft for e in es if e.ttft is not None and inside(e.started)]
        print(f"{name:14} {len(xs):>5} {pct(xs, 50):>7} {pct(xs, 99):>7}")
    print("\ntimeline:")
    for event in tl.events:
        print("  " + tl.line(event))
    print(f"\nleft behind: {', '.join(leftover) or 'no process'}")
    if st.broken:
        print(f"STACK BROKE: {st.broken}")
    print(f"lost: {ledger.count('lost')} (must be 0)")


def leftovers(st: Stack, keep: set[int]) -> list[str]:
    """Processes alive after teardown: this one's descendants (the reaper aside) and any process in
    a session a service or worker started (an orphaned engine); each is listed, then killed by pid."""
    left = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            mine = p.pid != os.getpid() and p.pid not in keep and p.status() != psutil.STATUS_ZOMBIE and (
                os.getsid(p.pid) in st.sessions or os.getpid() in (q.pid for q in p.parents()))
            if mine:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
    return left


# ---- main -----------------------------------------------------------------------------------------


async def workload(a: argparse.Namespace, st: Stack, tl: Timeline, ledger: Ledger) -> None:
    """The clients and the faults, for a.minutes; then waits for every request still out."""
    duration, tag = a.minutes * 60, f"{int(time.time()):x}"  # the tag keeps job ids unique across runs
    closing = False

    async def quiet(e: Exception) -> None:  # its reconnect attempts while NATS is down: expected here
        pass

    async def lost() -> None:
        if not closing:
            tl.log("client", "chaos's NATS connection lost")

    async def back() -> None:
        tl.log("client", "chaos's NATS connection back")

    nc = await nats.connect(st.nats.url, name="chaos", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                            error_cb=quiet, disconnected_cb=lost, reconnected_cb=back)
    tasks: list[asyncio.Task] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session, \
                grpc.aio.insecure_channel(st.grpc) as ch:
            router = router_pb2_grpc.RouterStub(ch)
            faults = asyncio.create_task(inject_faults(st, tl, random.Random(a.seed), 0.2 * duration, 0.8 * duration))
            clients = [asyncio.create_task(client_loop(i, st, tl, ledger, random.Random(a.seed * 1000 + i + 1), duration,
                                                       session, nc, router, tag)) for i in range(a.clients)]
            tasks = [faults, *clients, asyncio.create_task(progress(tl, ledger))]
            await faults
            tl.log("run", "faults over; waiting for the rest of the run and every request still out")
            await asyncio.gather(*clients)
            tl.log("run", "all requests ended")
    finally:
        for t in tasks:
            t.cancel()  # ended already, unless interrupted (a paused worker gets its SIGCONT, NATS is restarted)
        await asyncio.gather(*tasks, return_exceptions=True)
        closing = True
        await nc.close()


async def chaos(a: argparse.Namespace) -> int:
    guard = reaper.guard()  # killed outright, this process takes the stack with it
    print("command:", shlex.join(sys.orig_argv), flush=True)
    var = pathlib.Path(a.var or tempfile.mkdtemp(prefix="rh-chaos-")).resolve()
    tl, ledger = Timeline(), Ledger()
    st = Stack(var, tl)
    try:
        tl.log("stack", f"starting under {var}")
        await st.start()
        await warm(st.http)
        tl.log("stack", f"ready: HTTP {st.http}, gRPC {st.grpc}, NATS {st.nats.url}; {', '.join(MODELS)} loaded")
        tl.t0 = time.monotonic()  # the run's clock starts now
        await workload(a, st, tl, ledger)
    finally:
        print("chaos: stopping the stack", flush=True)
        await st.teardown()
    left = leftovers(st, {guard.pid})
    report(a, st, tl, ledger, left)
    return 1 if ledger.count("lost") or st.broken or left else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="length of the run (faults in its middle 60%%)")
    p.add_argument("--seed", type=int, default=1, help="seeds the fault schedule and each client's requests")
    p.add_argument("--clients", type=int, default=12, help="concurrent client loops")
    p.add_argument("--var", default="", help="state directory (models, JetStream store, logs); default: a new temp dir")
    a = p.parse_args()
    try:
        sys.exit(asyncio.run(chaos(a)))
    except KeyboardInterrupt:  # the stack is down already (chaos's finally)
        sys.exit(130)


if __name__ == "__main__":
    main()

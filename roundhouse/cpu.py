"""A service's CPU priority next to a CPU-hungry engine on the same machine (`--cpu-nice`).

Why: on one machine (`roundhouse up`), vLLM's engine processes keep the cores busy: the model
runner computes, and vLLM's queues busy-poll between steps. Each time a service on a token's
way woke (the router for a request, a PubAck or a worker's batch; nats-server; the worker for
the engine's output), it waited its turn behind them: at concurrency 1 the router's JetStream
ack came 16-32 ms after admission although nats-server stores a message in 0.3 ms
(bench_publish); the router's loop thread waited 0.23-0.27 ms on the run queue per wake-up and
nats-server's threads 2-3.5 ms (/proc/PID/task/TID/schedstat). With the router, nats-server and
the worker's own process at nice -10 the ack comes 2-5 ms after admission (8-13 ms at
concurrency 32, from 45-70), and bench_openai's time to first token is within a few ms of
`vllm serve`'s (README, Tests and benchmarks). The three use 0.075-0.080 s of CPU per 1,000
tokens at concurrency 32, so the engine loses little. Where kernel autogroups are on (each
session shares CPU as one group, before a process's own nice counts), the session's autogroup
nice is what matters; elsewhere (cgroups alone) the process's nice.

That was not enough where autogroups are on (`--engine-group-nice`, `set_session_nice`). A
group that sleeps most of the time, as the router's and nats-server's do, was still kept off
the CPU for tens of ms at times when it woke beside the always-busy group of a worker and its
engine, nice -10 or not. `perf sched timehist` over a concurrency-1 run: the router's gRPC
threads waited up to 37-64 ms to run while vLLM's model runner and EngineCore (nice 0, in the
worker's group) took the cores in ~1 ms slices; that was the tail of the router's Delivery
receive (p99 60-78 ms from the worker's send, README). With the worker's session group at nice
10, any other process's wake-up takes the CPU from the engine at once: at concurrency 1 the
hops of a first token came down from 8-19 ms to 2.2-3.3 ms (means) and Roundhouse's TTFT p99
from 74-86 ms to 8-24 ms. Inside that group the worker itself runs best at its engine's nice:
at -10 it took the CPU from the EngineCore at every token, which stalled the engine's pipeline
(output tokens/s at concurrency 1: 700-800 against 767-824 with the group at 0); at 0 it
waits for the EngineCore's busy-polling to yield (775-917). `roundhouse up` therefore runs
workers with `--engine-group-nice 10` and `--cpu-nice 0` where autogroups are on, and at
`--cpu-nice -10` elsewhere. Figures for concurrency 1, 32 and 64: README, Tests and benchmarks.

Lowering nice needs CAP_SYS_NICE (root on a host; a container must be granted it, Docker's
`--cap-add SYS_NICE`): without it the service says so and runs as it was. Autogroups decide
only for processes in the root CPU cgroup (`autogroups_on`): in a container the cgroup is the
group, and the process's nice is what counts. Without CAP_SYS_ADMIN the kernel takes one
autogroup write per 100 ms on the whole machine, so a refused write is tried again. Written by
hand: no library wraps /proc/PID/autogroup.
"""
from __future__ import annotations

import os
import time

_before: int | None = None   # this process's nice before set_nice changed it


def nice_value(text: str) -> int:
    """argparse type of `--cpu-nice`: an int within -20..19."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not -20 <= value <= 19:
        raise argparse.ArgumentTypeError(f"must be within -20..19, got {value}")
    return value


def set_nice(nice: int, session: bool = True) -> str | None:
    """Sets this process's nice (its main thread's, which threads and processes started later
    inherit) and, with `session` where autogroups are on, its session's autogroup nice if it
    leads that session (`roundhouse up` starts each service in a session of its own). Returns
    None when it took, or what refused, for a log line. Call before starting threads."""
    global _before
    if nice == 0:
        return None
    problems = []
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        _before = before
    except OSError as e:
        problems.append(f"setpriority: {e.strerror}")
    if session and (refused := _set_own_group(nice)):
        problems.append(refused)
    return "; ".join(problems) or None


def set_session_nice(nice: int) -> str | None:
    """The autogroup nice of this process's session, where autogroups are on, if this process
    leads that session (else the change would reach every process that shares it). Returns
    None when it took or there was nothing to do, else why not, for a log line. A worker leads
    a session that holds its engine's processes too (`roundhouse up`, `--engine-group-nice`)."""
    return None if nice == 0 else _set_own_group(nice)


def _set_own_group(nice: int) -> str | None:
    """This process's session group at `nice`, where autogroups apply, if this process leads
    the session: a service started by hand from a shell shares the shell's session, and the
    change would reach the shell and everything else started from it."""
    if not autogroups_on():
        return None
    if os.getsid(0) != os.getpid():
        return "this process does not lead its session (its other processes would share the change): its group is left as it was"
    return _set_autogroup("self", nice)


def set_nice_of(pid: int, nice: int) -> str | None:
    """`set_nice` for another process we started in its own session (nats-server, a Go binary
    that cannot be asked): its session's autogroup nice where autogroups are on, and every
    thread it has now (threads it starts later inherit from the one that starts them). None
    when it took, else what refused."""
    problems = set()
    if refused := _set_autogroup(str(pid), nice):
        problems.add(refused)
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError as e:
        return f"/proc/{pid}/task: {e.strerror}"
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:   # a thread that just ended
            pass
        except OSError as e:
            problems.add(f"setpriority: {e.strerror}")
    return "; ".join(sorted(problems)) or None


def restore(processes) -> int:
    """Puts every thread of `processes` (psutil handles: ones this process started after
    set_nice, which inherited its nice) back at the nice this process had before; returns how
    many. Raising a nice needs no privilege. A no-op when set_nice changed nothing."""
    if _before is None:
        return 0
    before = _before
    return each_thread(processes, lambda tid: os.setpriority(os.PRIO_PROCESS, tid, before))


def each_thread(processes, fn) -> int:
    """Calls fn(tid) for every thread of `processes` (psutil handles); returns how many took.
    A process or thread that ended meanwhile is skipped."""
    import psutil

    done = 0
    for proc in processes:
        try:
            threads = proc.threads()
        except psutil.Error:
            continue
        for t in threads:
            try:
                fn(t.id)
                done += 1
            except OSError:   # a thread that just ended
                pass
    return done


AUTOGROUP_RETRIES = 4      # the kernel takes one autogroup write per 100 ms machine-wide ...
AUTOGROUP_RETRY_S = 0.11   # ... from a process without CAP_SYS_ADMIN (EAGAIN otherwise)


def _set_autogroup(pid: str, nice: int) -> str | None:
    """The autogroup nice of process `pid`'s session ("self": this one's), where autogroups
    apply to it; None when it took (or they do not apply), else what refused. Without
    CAP_SYS_ADMIN the kernel refuses a write within 100 ms of any other on the machine (another
    service starting beside this one): that is tried again, a few times."""
    if not autogroups_on(pid):
        return None
    path = f"/proc/{pid}/autogroup"
    for attempt in range(AUTOGROUP_RETRIES + 1):
        try:
            with open(path, "w") as f:
                f.write(str(nice))
            return None
        except BlockingIOError:
            if attempt == AUTOGROUP_RETRIES:
                return f"{path}: the kernel refused {AUTOGROUP_RETRIES + 1} times (one write per 100 ms)"
            time.sleep(AUTOGROUP_RETRY_S)  # the kernel's rate limit: nothing to wait on but time
        except OSError as e:
            return f"{path}: {e.strerror}"
    return None


def autogroups_on(pid: str = "self") -> bool:
    """Whether the kernel's autogroups decide process `pid`'s CPU share: the feature is on and
    the process sits in the root CPU cgroup (the kernel groups by session only there; in a
    container or a CPU-controlled systemd slice its cgroup is the group)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            if f.read().strip() != "1":
                return False
        with open(f"/proc/{pid}/cgroup") as f:
            return _in_root_cpu_cgroup(f.read())
    except OSError:
        return False


def _in_root_cpu_cgroup(cgroup_file: str) -> bool:
    """From /proc/PID/cgroup: the cgroup v1 `cpu` controller's path, else the v2 path, is "/"."""
    unified = None
    for line in cgroup_file.splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return path == "/"
        if controllers == "":
            unified = path
    return unified in (None, "/")

"""Children die with their parent, however the parent dies.

vLLM 0.32's EngineCore and its model-runner process have no parent-death rule: a worker killed
with SIGKILL (the OOM killer, `kill -9`, a crash in native code) left both running as orphans,
holding their memory (on a GPU, the memory the next load needs), and they outlived even the
stack's own shutdown. The same holds for everything `roundhouse up` starts if it is killed.

`guard()` starts a small reaper process beside the caller. While the caller lives, the reaper
notes its descendants once a second; when it exits, by any means, the reaper SIGKILLs every one
it noted that is still the same process (psutil checks pid and start time, so a reused pid is
never hit), then exits itself. A clean shutdown that already stopped its children leaves it
nothing to do. What a killed process leaves behind goes too: the shared-memory segments it had
mapped (vLLM's EngineCore and model-runner talk through `/dev/shm/psm_*` segments, which they
unlink only on a clean shutdown: SIGKILLed engines had left 300+ of them on a test machine).
Written here because no library offers a parent-death rule for processes we do
not start ourselves (PR_SET_PDEATHSIG must be set by the child, and is tied to the parent
*thread*, while vLLM starts its engine from whichever thread builds it).

    python -m roundhouse.reaper PID      # what guard() runs
"""
from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

SNAPSHOT_S = 1.0   # how often the reaper refreshes its list of descendants


def guard(pid: int | None = None) -> subprocess.Popen:
    """Starts the reaper for `pid` (this process by default) and returns once it has noted the
    descendants `pid` has now (a second or so: an interpreter start); it needs no further care."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "roundhouse.reaper", str(pid or os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # stderr: the guarded process's (its log)
        start_new_session=True,  # not in the guarded process group: a signal to that group spares it
    )
    proc.stdout.readline()  # "watching": its first look is taken (or it exited: nothing to guard)
    proc.stdout.close()
    return proc


def _wait_exit(pid: int, timeout: float, pidfd: int | None) -> bool:
    """True once `pid` has exited; waits up to `timeout`."""
    if pidfd is not None:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    select.select([], [], [], timeout)
    return False


def watch(pid: int, looked=lambda: None) -> list[int]:
    """Blocks until `pid` exits, then kills what descended from it; returns the pids killed.
    `looked()` is called once the first list of descendants is taken."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        looked()
        return []
    try:
        pidfd: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: poll instead
        pidfd = None
    known: dict[int, psutil.Process] = {}
    segments: dict[int, set[str]] = {}   # pid -> shared-memory files it has mapped (latest look)
    names: set[str] = set()              # /dev/shm as of the last reading of the maps
    me = os.getpid()  # guard() makes the reaper a child of what it guards: never count itself
    while True:
        try:  # the same Process objects for the same processes: they remember the start time
            current = {c.pid: known.get(c.pid, c) for c in parent.children(recursive=True) if c.pid != me}
        except psutil.NoSuchProcess:
            break
        # Merged, not replaced: a look taken while `pid` dies finds its children already handed
        # to init, i.e. none (measured: a killed worker's engine left running under load).
        before = known.keys()
        known = {proc.pid: proc for proc in known.values() if _alive(proc)} | current
        # The maps are read again only when /dev/shm has a name it did not have at the last
        # reading, or a process came: a segment must be named there to be mapped. Reading every
        # vLLM process's maps each second cost each reaper 9-12 ms of CPU a second at idle.
        now = shm_names()
        if now - names or known.keys() - before:
            names = now
            for p in (*known, pid):  # kept for processes gone since: one killed early leaks too
                segments[p] = segments.get(p, set()) | shared_memory(p)
        looked()
        if _wait_exit(pid, SNAPSHOT_S, pidfd):
            break
    killed = kill(list(known.values()), timeout=5.0)
    for path in set().union(*segments.values()):
        with contextlib.suppress(OSError):  # unlinked already (a clean shutdown), or not ours
            os.unlink(path)
    return killed


def kill(procs: list, timeout: float) -> list[int]:
    """SIGKILLs those of `procs` (psutil handles) still running, and their descendants; returns
    their pids once each is gone or a zombie, or once `timeout` has passed. psutil checks pid and
    start time, so a reused pid is never hit. A zombie holds no memory, and its reaping is its
    parent's (or init's): waiting on one that is not our child cost seconds."""
    import psutil

    left = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                left += [p, *p.children(recursive=True)]
    left = list({p.pid: p for p in left}.values())
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.01)  # other processes' exit, polled: they need not be our children
    return [p.pid for p in left]


def gone(p) -> bool:
    """Whether the process behind psutil handle `p` has exited (or is a zombie, which holds no
    memory and is its parent's to reap)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return p.status() == psutil.STATUS_ZOMBIE
    return True


def shm_names() -> set[str]:
    """The names under /dev/shm now (an empty set where there is none)."""
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def shared_memory(pid: int) -> set[str]:
    """The files under /dev/shm that `pid` has mapped and that still have a name (Linux; an
    empty set elsewhere, or once it is gone). Read from /proc/PID/maps: psutil's memory_maps
    parses smaps, ten times the work, once a second."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            return {line[line.index("/dev/shm/"):].rstrip("\n") for line in f
                    if "/dev/shm/" in line and not line.rstrip().endswith("(deleted)")}
    except OSError:
        return set()


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running()
    except psutil.Error:
        return False


def main() -> None:
    told = []

    def looked() -> None:
        if not told:
            told.append(True)
            with contextlib.suppress(OSError):  # the guarded process may be gone already
                print("watching", flush=True)
                sys.stdout.close()

    watch(int(sys.argv[1]), looked)


if __name__ == "__main__":
    main()

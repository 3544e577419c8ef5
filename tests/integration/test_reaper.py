"""roundhouse.reaper: what a process started dies with it when it is SIGKILLed (as a vLLM
EngineCore must die with its worker), and a clean exit leaves the reaper nothing to do."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import psutil
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# A parent with a chain child -> grandchild (like worker -> EngineCore -> model runner) that
# guards itself as a worker does, so the reaper is its own child. It guards once the chain is up:
# guard() returns after the reaper's first look, so the test needs no wait for its next one.
# The child maps a shared-memory segment (as vLLM's engine processes do) and names it once mapped.
CHILD = (
    "import mmap, os, subprocess, sys, time; subprocess.Popen(['sleep', '300']); "
    "fd = os.open(sys.argv[1] + '.tmp', os.O_CREAT | os.O_RDWR); os.ftruncate(fd, 4096); "
    "segment = mmap.mmap(fd, 4096); os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(300)"
)
PARENT = f"""
import os, subprocess, sys, time
import psutil
from roundhouse import reaper
subprocess.Popen([sys.executable, "-c", {CHILD!r}, sys.argv[1]])
while len(psutil.Process().children(recursive=True)) < 2 or not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
reaper.guard()
print("started", flush=True)
time.sleep(300)
"""


def _family(pid: int, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 20
    while len(family := psutil.Process(pid).children(recursive=True)) < n:  # the grandchild is on its way
        assert time.monotonic() < deadline, "the test's own process tree did not start"
        time.sleep(0.05)
    return family


def test_descendants_die_within_seconds_of_a_sigkilled_parent():
    """... and the shared-memory segment one of them had mapped goes with them."""
    segment = pathlib.Path(f"/dev/shm/rh-test-reaper-{os.getpid()}")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(segment)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    family = []
    try:
        assert parent.stdout.readline().strip() == "started"
        family = _family(parent.pid, 3)  # the child, the grandchild (`sleep`), the reaper
        parent.kill()
        parent.wait()
        killed_at = time.monotonic()
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"outlived their parent: {[(p.pid, p.name(), p.cmdline()) for p in alive]}"
        assert not segment.exists(), "the shared memory of a killed descendant is removed with it"
        print(f"descendants (and the reaper) gone {time.monotonic() - killed_at:.2f} s after the parent's SIGKILL")
    finally:
        segment.unlink(missing_ok=True)
        for p in family:
            if p.is_running():
                p.kill()
        if parent.poll() is None:
            parent.kill()

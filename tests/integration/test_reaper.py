"""roundhouse.reaper: what a process started dies with it when it is SIGKILLed (as a vLLM
EngineCore must die with its worker), and a clean exit leaves the reaper nothing to do."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from roundhouse import reaper

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

# A parent that starts a grandchild chain (child -> grandchild), like worker -> EngineCore -> runner.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"])
print("started", flush=True)
time.sleep(300)
"""


def _start_parent() -> tuple[subprocess.Popen, list[psutil.Process]]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 20
    while len(psutil.Process(parent.pid).children(recursive=True)) < 2:  # the grandchild is on its way
        assert time.monotonic() < deadline, "the test's own process tree did not start"
        time.sleep(0.05)
    return parent, psutil.Process(parent.pid).children(recursive=True)


def test_descendants_die_within_seconds_of_a_sigkilled_parent():
    parent, family = _start_parent()
    guard = reaper.guard(parent.pid)
    try:
        parent.kill()  # guard() returned: the reaper has noted the family
        parent.wait()
        killed_at = time.monotonic()
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, f"outlived their parent: {[(p.pid, p.name()) for p in alive]}"
        print(f"descendants gone {time.monotonic() - killed_at:.2f} s after the parent's SIGKILL")
        assert guard.wait(10) == 0, "the reaper exits once its work is done"
    finally:
        for p in family:
            if p.is_running():
                p.kill()
        guard.kill()

"""roundhouse.cpu: a service's nice, and its session's autogroup nice where autogroups are on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from roundhouse import cpu

PROBE = (
    "import os, sys; from roundhouse import cpu\n"
    "print(cpu.set_nice(int(sys.argv[1])))\n"
    "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    "print(open('/proc/self/autogroup').read().split()[-1] if cpu.autogroups_on() else 'off')\n"
)


def _probe(nice: int) -> list[str]:
    # Its own process and session: the test process's priority and autogroup are not touched.
    out = subprocess.run([sys.executable, "-c", PROBE, str(nice)], capture_output=True, text=True, timeout=60,
                         start_new_session=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_a_higher_nice_takes_for_the_process_and_its_session():
    refused, nice, group = _probe(5)     # raising nice needs no privilege
    assert refused == "None"
    assert nice == "5"
    assert group in ("5", "off")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_nice_zero_changes_nothing():
    refused, nice, group = _probe(0)
    assert (refused, nice) == ("None", "0")
    assert group in ("0", "off")


SESSION_PROBE = (
    "import sys; from roundhouse import cpu\n"
    "print(cpu.set_session_nice(int(sys.argv[1])) is None)\n"
    "print(open('/proc/self/autogroup').read().split()[-1] if cpu.autogroups_on() else 'off')\n"
)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux autogroups")
def test_a_session_leader_takes_a_session_nice_and_a_process_that_shares_its_session_does_not():
    led = subprocess.run([sys.executable, "-c", SESSION_PROBE, "10"], capture_output=True, text=True, timeout=60,
                         start_new_session=True, check=True).stdout.split()
    assert led[0] == "True"
    assert led[1] in ("10", "off")
    # In the test's own session: refused with the reason, and the session's group left as it was.
    before = open("/proc/self/autogroup").read() if cpu.autogroups_on() else "off"
    shared = subprocess.run([sys.executable, "-c", SESSION_PROBE, "10"], capture_output=True, text=True, timeout=60,
                            check=True).stdout.split()
    if cpu.autogroups_on():
        assert shared[0] == "False"
        assert open("/proc/self/autogroup").read() == before


def test_refusal_is_reported_not_raised(monkeypatch):
    def deny(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(cpu.os, "setpriority", deny)
    monkeypatch.setattr(cpu, "autogroups_on", lambda: False)
    assert cpu.set_nice(-10) == "setpriority: Operation not permitted"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_another_process_in_its_own_session_takes_a_higher_nice_on_every_thread():
    child = subprocess.Popen([sys.executable, "-c", "import threading, sys; e = threading.Event(); "
                              "threading.Thread(target=e.wait, daemon=True).start(); print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "up"
        assert cpu.set_nice_of(child.pid, 7) is None
        tids = os.listdir(f"/proc/{child.pid}/task")
        assert len(tids) >= 2
        assert {os.getpriority(os.PRIO_PROCESS, int(t)) for t in tids} == {7}
        if cpu.autogroups_on():
            assert open(f"/proc/{child.pid}/autogroup").read().split()[-1] == "7"
    finally:
        child.kill()
        child.wait(10)


@pytest.mark.parametrize("text", ["-21", "20", "x", "1.5"])
def test_a_nice_out_of_range_or_not_an_integer_is_refused_with_the_reason(text):
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="must be"):
        cpu.nice_value(text)
    assert cpu.nice_value("-10") == -10

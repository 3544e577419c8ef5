"""roundhouse.cpu: a service's nice, and its session's autogroup nice where autogroups are on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from roundhouse import cpu

# The probe's session group's nice: "root" for a process in the kernel's root autogroup (a
# descendant of init that never started a session: /proc/PID/autogroup reads empty there, as
# for the process CI runs the tests in), "off" where autogroups do not apply.
GROUP = ("(open('/proc/self/autogroup').read().split() or ['root'])[-1] if cpu.autogroups_on() else 'off'")

PROBE = (
    "import os, sys; from roundhouse import cpu\n"
    "print(cpu.set_nice(int(sys.argv[1])))\n"
    "print(os.getpriority(os.PRIO_PROCESS, 0))\n"
    f"print({GROUP})\n"
)


def _run(probe: str, nice: int, new_session: bool) -> list[str]:
    """The probe's printed lines."""
    out = subprocess.run([sys.executable, "-c", probe, str(nice)], capture_output=True, text=True, timeout=60,
                         start_new_session=new_session)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def _probe(nice: int) -> list[str]:
    # Its own process and session: the test process's priority and autogroup are not touched.
    return _run(PROBE, nice, new_session=True)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_a_higher_nice_takes_for_the_process_and_its_session():
    refused, nice, group = _probe(5)     # raising nice needs no privilege
    assert refused == "None"
    assert nice == "5"
    assert group in ("5", "off")


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_a_process_that_shares_its_session_takes_the_nice_and_leaves_the_group_as_it_was():
    # A service started by hand from a shell: the shell's session group is not the service's to change.
    before = open("/proc/self/autogroup").read() if cpu.autogroups_on() else "off"
    said, nice, _ = _run(PROBE, 5, new_session=False)
    assert nice == "5"
    if cpu.autogroups_on():
        assert "does not lead its session" in said and "setpriority" not in said
        assert open("/proc/self/autogroup").read() == before
    else:
        assert said == "None"


@pytest.mark.skipif(sys.platform != "linux", reason="Linux priorities")
def test_nice_zero_changes_nothing():
    refused, nice, group = _probe(0)
    assert (refused, nice) == ("None", "0")
    assert group in ("0", "off")


SESSION_PROBE = (
    "import sys; from roundhouse import cpu\n"
    "print(cpu.set_session_nice(int(sys.argv[1])) is None)\n"
    f"print({GROUP})\n"
)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux autogroups")
def test_a_session_leader_takes_a_session_nice_and_a_process_that_shares_its_session_does_not():
    led = _run(SESSION_PROBE, 10, new_session=True)
    assert led[0] == "True"
    assert led[1] in ("10", "off")
    # In the test's own session: refused with the reason, and the session's group left as it was.
    before = open("/proc/self/autogroup").read() if cpu.autogroups_on() else "off"
    shared = _run(SESSION_PROBE, 10, new_session=False)
    if cpu.autogroups_on():
        assert shared[0] == "False"
        assert open("/proc/self/autogroup").read() == before


def test_a_process_that_does_not_lead_its_session_leaves_the_group_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu, "autogroups_on", lambda pid="self": True)
    monkeypatch.setattr(cpu.os, "getsid", lambda pid: os.getpid() + 1)
    monkeypatch.setattr(cpu, "_set_autogroup", lambda *_: pytest.fail("the group was written"))
    assert "does not lead its session" in cpu.set_session_nice(10)


class _Refusing:
    """/proc/PID/autogroup as the kernel answers a write within 100 ms of another's: EAGAIN."""

    def __init__(self, refusals: int) -> None:
        self.refusals, self.written = refusals, []

    def __call__(self, path, mode="r"):
        outer = self

        class File:
            def __enter__(self):
                return self

            def __exit__(self, *_):
                return False

            def write(self, text):
                if outer.refusals:
                    outer.refusals -= 1
                    raise BlockingIOError(11, "Resource temporarily unavailable")
                outer.written.append(text)

        return File()


def test_a_group_write_the_kernel_rate_limits_is_tried_again(monkeypatch):
    monkeypatch.setattr(cpu, "autogroups_on", lambda pid="self": True)
    monkeypatch.setattr(cpu, "AUTOGROUP_RETRY_S", 0.0)
    refusing = _Refusing(2)
    monkeypatch.setattr("builtins.open", refusing)
    assert cpu._set_autogroup("self", 10) is None
    assert refusing.written == ["10"]
    always = _Refusing(99)
    monkeypatch.setattr("builtins.open", always)
    assert "refused 5 times" in cpu._set_autogroup("self", 10)


@pytest.mark.parametrize("text, root", [
    ("12:cpu,cpuacct:/\n0::/user.slice\n", True),          # v1 cpu controller at its root
    ("12:cpu,cpuacct:/docker/abc\n0::/\n", False),         # v1, in a container's cgroup
    ("1:cpu:/\n4:memory:/x\n", True),
    ("0::/\n", True),                                      # v2 only, root
    ("0::/system.slice/roundhouse.service\n", False),      # v2 only, in a service's cgroup
])
def test_autogroups_apply_only_in_the_root_cpu_cgroup(text, root):
    assert cpu._in_root_cpu_cgroup(text) is root


def test_refusal_is_reported_not_raised(monkeypatch):
    def deny(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(cpu.os, "setpriority", deny)
    monkeypatch.setattr(cpu, "autogroups_on", lambda pid="self": False)
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

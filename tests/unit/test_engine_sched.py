"""A CPU engine's processes give way to the serving path (worker_svc.engine.yield_cpu_to_serving),
on a real child process with threads of its own."""
import os
import subprocess
import sys

import psutil

from worker_svc.engine import yield_cpu_to_serving

_CHILD = """
import sys, threading
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
"""


def test_every_thread_of_the_engine_processes_is_put_in_sched_idle_and_nothing_else_is():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        proc = psutil.Process(child.pid)
        threads = [t.id for t in proc.threads()]
        assert len(threads) == 4
        assert yield_cpu_to_serving([proc]) == 4
        assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_IDLE}
        assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER, "the caller (the worker) keeps its class"
    finally:
        child.communicate("\n", timeout=10)


def test_a_process_that_is_gone_is_skipped():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    child.wait(10)
    assert yield_cpu_to_serving([proc]) == 0

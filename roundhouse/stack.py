"""Starting Roundhouse processes: the embedded stack of `roundhouse up`, and the tests' fixtures.

Workers run as their own processes (`python -m worker_svc`), each in its own process group, so
that a test can SIGKILL a worker together with its EngineCore the way a crash would.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import grpc

from protos.v1 import worker_pb2, worker_pb2_grpc
from roundhouse import catalogue, tinymodels, tls


def write_tiny_catalogue(root: pathlib.Path, count: int = 2, aliases: dict[str, list[str]] | None = None,
                         prefix: str = "tiny", gpus: tuple[catalogue.GpuSpec, ...] = (),
                         manager: catalogue.ManagerSpec | None = None,
                         per_model: dict[str, dict] | None = None, context: int = 1024,
                         routing: dict | None = None, **overrides) -> pathlib.Path:
    """Makes `count` tiny models under root/models and a catalogue root/<prefix>.yaml for them."""
    specs = tinymodels.default_specs(count, prefix, context)
    tinymodels.write_models(root / "models", specs)
    aliases, per_model = aliases or {}, per_model or {}
    models = [
        catalogue.ModelSpec(
            name=s.name,
            path=f"models/{s.name}",
            max_model_len=s.max_position_embeddings,
            aliases=tuple(aliases.get(s.name, ())),
            **{**overrides, **per_model.get(s.name, {})},
        )
        for s in specs
    ]
    path = root / ("models.yaml" if prefix == "tiny" else f"{prefix}.yaml")
    path.write_text(catalogue.dump(models, gpus, manager, routing))
    return path


DEFAULT_CONFIG = pathlib.Path(__file__).parent / "defaults" / "cpu.yaml"
DEFAULT_MODEL_SEEDS = {"chat": 2001, "code": 2002, "reasoning": 2003}


def write_default(var: pathlib.Path) -> pathlib.Path:
    """The embedded defaults: tiny models chat / code / reasoning under var/models (made once)
    and the packaged configuration copied next to them as var/roundhouse.yaml."""
    cat = catalogue.load(DEFAULT_CONFIG)  # validated before anything is written
    specs = [tinymodels.TinySpec(name=m.name, seed=DEFAULT_MODEL_SEEDS.get(m.name, 2000 + i),
                                 max_position_embeddings=m.max_model_len)
             for i, m in enumerate(cat.models)]
    tinymodels.write_models(var / "models", specs)
    path = var / "roundhouse.yaml"
    path.write_text(DEFAULT_CONFIG.read_text())
    return path


@dataclasses.dataclass
class ServiceProcess:
    """A Roundhouse service in its own process (and process group), started by `start_service`."""

    name: str
    process: subprocess.Popen
    info: dict            # what the service wrote to its ready file (its ports)
    log_path: pathlib.Path

    def kill(self) -> None:
        """SIGKILL the service and its children (a worker's engine processes), as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` (a worker's stop grace is 20 s, plus its engine's shutdown)."""
        if self.process.poll() is not None:
            return
        # The service alone: it stops its own children in order (a worker lets its requests
        # finish, then shuts its engine down). SIGTERM to the whole group reached vLLM's
        # EngineCore directly, which stopped at once and cut every stream short.
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:  # EngineCore children may outlive a clean exit by a moment
            self.reap()

    def reap(self) -> None:
        """After the service exited: SIGKILL what is left of its process group (a worker killed
        with SIGKILL leaves its vLLM EngineCore running, holding its memory)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def astop(self, timeout: float = 60.0) -> None:
        """stop() off the event loop: an engine's shutdown takes seconds, and a blocked loop
        stalls every other coroutine in the process (a router's streams, NATS heartbeats)."""
        await asyncio.to_thread(self.stop, timeout)


@dataclasses.dataclass
class WorkerProcess(ServiceProcess):
    model: str = ""
    internal: "tls.Internal | None" = None   # its control port's mutual TLS (the config's tls.internal)

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.aio.Channel:
        return tls.channel(self.address, self.internal)

    async def call(self, method: str, request, timeout: float = 120.0) -> worker_pb2.WorkerStatus:
        async with self.channel() as ch:
            return await getattr(worker_pb2_grpc.WorkerStub(ch), method)(request, timeout=timeout)

    async def load(self, timeout: float = 180.0) -> worker_pb2.WorkerStatus:
        return await self.call("Load", worker_pb2.LoadRequest(), timeout)

    async def status(self) -> worker_pb2.WorkerStatus:
        return await self.call("Status", worker_pb2.StatusRequest(), 30.0)


async def stop_all(services: list[ServiceProcess], timeout: float = 60.0) -> None:
    """Stops services at once rather than one after another."""
    await asyncio.gather(*(s.astop(timeout) for s in services))


def spawn(module: str, name: str, run_dir: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `python -m module --ready-file ... args` in its own session, logging to run_dir."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ready = run_dir / f"{name}-{time.monotonic_ns()}.ready"
    log_path = ready.with_suffix(".log")
    cmd = [sys.executable, "-m", module, "--ready-file", str(ready), *args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    proc.ready_file = ready  # type: ignore[attr-defined]
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


async def wait_ready(proc: subprocess.Popen, name: str, timeout: float) -> dict:
    """The service's ready-file contents once it listens; raises if it exits or takes too long."""
    ready: pathlib.Path = proc.ready_file  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not ready.exists():  # the service writes this file once; nothing to await across processes
        if proc.poll() is not None:
            raise RuntimeError(f"roundhouse: {name} exited ({proc.returncode}); log: {proc.log_path}")  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"roundhouse: {name} did not start in {timeout}s; log: {proc.log_path}")  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    return json.loads(ready.read_text())


async def start_service(module: str, name: str, run_dir: pathlib.Path, *args: str, timeout: float = 60.0,
                        env: dict[str, str] | None = None) -> ServiceProcess:
    """Starts a router or manager process (`router_svc`, `manager_svc`); returns once it listens."""
    proc = spawn(module, name, run_dir, *args, env=env)
    info = await wait_ready(proc, name, timeout)
    return ServiceProcess(name, proc, info, proc.log_path)  # type: ignore[attr-defined]


def spawn_worker(config_path: pathlib.Path, model: str, nats_url: str, run_dir: pathlib.Path,
                 *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`nats_url` "": the worker takes it from its environment (ROUNDHOUSE_WORKER_NATS_URL in `env`),
    which keeps credentials off its command line."""
    return spawn("worker_svc", model, run_dir, "--config", str(config_path), "--model", model,
                 *(["--nats-url", nats_url] if nats_url else []), *extra, env=env)


async def start_worker(config_path: pathlib.Path, model: str, nats_url: str, run_dir: pathlib.Path,
                       *extra: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> WorkerProcess:
    """Starts a worker process and returns once its gRPC server listens (not once loaded)."""
    proc = spawn_worker(config_path, model, nats_url, run_dir, *extra, env=env)
    info = await wait_ready(proc, f"worker {model}", timeout)
    internal, _ = tls.load(catalogue.load(config_path).tls)
    return WorkerProcess(model, proc, info, proc.log_path, model=model, internal=internal)  # type: ignore[attr-defined]


class Supervisor:
    """Keeps one worker running: when it exits on its own (crash, OOM kill, SIGKILL), what is left
    of its process group is killed and it is started again after a backoff that doubles on each
    quick exit (no crash loop) and starts over once a worker has run `stable_s`. Only this
    worker is touched; the others go on serving. `current` is the running process (None until
    `begin`). Stop a group of them with `stop_supervised`."""

    def __init__(self, name: str, start: Callable[[], Awaitable[WorkerProcess]], say: Callable[[str], None] = print,
                 backoff_s: tuple[float, float] = (1.0, 60.0), stable_s: float = 60.0):
        self.name = name
        self._start = start
        self._say = say
        self._first, self._cap = backoff_s
        self._stable_s = stable_s
        self.current: WorkerProcess | None = None
        self._task: asyncio.Task | None = None

    async def begin(self, stop: asyncio.Event) -> WorkerProcess:
        """Starts the worker and keeps it running until `stop` is set."""
        first = await self._start()
        self._task = asyncio.create_task(self.run(first, stop), name=f"supervise {self.name}")
        return first

    async def run(self, first: WorkerProcess, stop: asyncio.Event) -> None:
        self.current = first
        delay = self._first
        while not stop.is_set():
            started = time.monotonic()
            proc = self.current
            exited = asyncio.ensure_future(asyncio.to_thread(proc.process.wait))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                return  # whoever set `stop` stops `current`; the wait's thread ends with the process
            code = exited.result()
            proc.reap()
            if time.monotonic() - started >= self._stable_s:
                delay = self._first
            self._say(f"roundhouse: {self.name} exited ({code}); restarting it in {delay:.0f} s (log {proc.log_path})")
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()  # a backoff that ends early when the stack stops
                if stop.is_set():
                    return
                delay = min(2 * delay, self._cap)
                try:
                    self.current = await self._start()
                except RuntimeError as e:  # it did not come up: try again after a longer wait
                    self._say(f"roundhouse: {self.name} did not restart: {e}; again in {delay:.0f} s")
                    continue
                if stop.is_set():  # the stack stopped while this one was starting
                    await self.current.astop()
                    return
                self._say(f"roundhouse: {self.name} restarted (log {self.current.log_path})")
                break


async def stop_supervised(supervisors: list[Supervisor], restart_wait_s: float = 90.0) -> None:
    """Once their `stop` is set: lets a restart under way finish (bounded by `restart_wait_s`),
    then stops every supervised worker at once."""
    tasks = [s._task for s in supervisors if s._task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=restart_wait_s)
    await stop_all([s.current for s in supervisors if s.current is not None])

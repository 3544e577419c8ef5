"""Starting Roundhouse processes: the embedded stack of `roundhouse up`, and the tests' fixtures.

Workers run as their own processes (`python -m worker_svc`), each in its own process group, so
that a test can SIGKILL a worker together with its EngineCore the way a crash would.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc

from protos.v1 import worker_pb2, worker_pb2_grpc
from roundhouse import catalogue, tinymodels


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
class WorkerProcess:
    model: str
    process: subprocess.Popen
    port: int
    log_path: pathlib.Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)

    async def call(self, method: str, request, timeout: float = 120.0) -> worker_pb2.WorkerStatus:
        async with self.channel() as ch:
            return await getattr(worker_pb2_grpc.WorkerStub(ch), method)(request, timeout=timeout)

    async def load(self, timeout: float = 180.0) -> worker_pb2.WorkerStatus:
        return await self.call("Load", worker_pb2.LoadRequest(), timeout)

    async def status(self) -> worker_pb2.WorkerStatus:
        return await self.call("Status", worker_pb2.StatusRequest(), 10.0)

    def kill(self) -> None:
        """SIGKILL the worker and its engine processes, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:  # EngineCore children may outlive a clean exit by a moment
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def astop(self, timeout: float = 30.0) -> None:
        """stop() off the event loop: an engine's shutdown takes seconds, and a blocked loop
        stalls every other coroutine in the process (a router's streams, NATS heartbeats)."""
        await asyncio.to_thread(self.stop, timeout)


async def stop_all(workers: list[WorkerProcess], timeout: float = 30.0) -> None:
    """Stops workers at once rather than one after another."""
    await asyncio.gather(*(w.astop(timeout) for w in workers))


def spawn_worker(config_path: pathlib.Path, model: str, nats_url: str, run_dir: pathlib.Path,
                 *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    ready = run_dir / f"{model}-{time.monotonic_ns()}.ready"
    log_path = ready.with_suffix(".log")
    cmd = [sys.executable, "-m", "worker_svc", "--config", str(config_path), "--model", model,
           "--nats-url", nats_url, "--ready-file", str(ready), *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
    proc.ready_file = ready  # type: ignore[attr-defined]
    proc.log_path = log_path  # type: ignore[attr-defined]
    return proc


async def start_worker(config_path: pathlib.Path, model: str, nats_url: str, run_dir: pathlib.Path,
                       *extra: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> WorkerProcess:
    """Starts a worker process and returns once its gRPC server listens (not once loaded)."""
    proc = spawn_worker(config_path, model, nats_url, run_dir, *extra, env=env)
    ready: pathlib.Path = proc.ready_file  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while not ready.exists():  # the worker writes this file once; nothing to await across processes
        if proc.poll() is not None:
            raise RuntimeError(f"roundhouse: worker {model} exited ({proc.returncode}); log: {proc.log_path}")  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"roundhouse: worker {model} did not start in {timeout}s; log: {proc.log_path}")  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
    port = json.loads(ready.read_text())["port"]
    return WorkerProcess(model, proc, port, proc.log_path)  # type: ignore[attr-defined]

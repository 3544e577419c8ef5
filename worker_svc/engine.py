"""The vLLM engine behind a small interface. The only module in Roundhouse that imports vllm.

`Engine.start()` builds an `AsyncLLM` (EngineCore in its own process) off the event loop, so the
worker's gRPC server keeps answering while a model loads; `generate()` yields one `Step` per
engine step (DELTA output); `abort()` and `shutdown()` are safe to call at any time.

Where a CPU engine's start and stop went (one tiny model started and stopped in a loop, vLLM's
own log lines, compile cache warm): a start took 27.7 s, of which ~7 s spawning the EngineCore
process (a fresh interpreter importing vLLM and torch), ~8 s spawning its model-runner process
the same way (vLLM's CPU platform forces `spawn`), and ~9 s compiling again (see
VLLM_USE_AOT_COMPILE below); a stop took 5.0 s: the model-runner needed 4 s to leave after its
EngineCore, then vLLM's 5 s grace ran out and it killed the EngineCore. So on CPU:
  - EngineCores are forked from a fork server that has vLLM imported (`use_fork_server`);
  - the compile cache that loads is used;
  - a stop gives vLLM STOP_GRACE_S, then kills what is left of the engine's processes.
The model-runner was still spawned (~7 s): forked from its EngineCore it inherited an OpenMP
runtime set up before vLLM's thread binding (OMP_NUM_THREADS, GOMP_CPU_AFFINITY, read once when
libgomp loads) and ran unbound. It now forks from a second fork server that the worker starts
with the runner's own environment (see `runner_server_for`): a reload went from 12.1-12.9 s to
5.6-5.7 s (tests/bench/bench_engine_start), its threads bound to the same core as a spawned
runner's. On a GPU vLLM already forks (unless CUDA is initialised) and none of this is used.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import os
from collections.abc import AsyncIterator, Sequence

import structlog

from protos.v1 import common_pb2
from roundhouse import cpu, reaper
from roundhouse.errors import EngineDead, GenerationFailed, InvalidRequest

log = structlog.get_logger("worker.engine")

STOP_GRACE_S = 0.5   # an idle engine's processes get this long to leave before they are killed


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What an engine is started with (parsed by the worker's config, passed down)."""

    model_path: str
    served_name: str
    max_model_len: int
    max_num_seqs: int = 64
    kv_cache_bytes: int = 2**30
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    enforce_eager: bool = False        # False: torch.compile on CPU, CUDA graphs on GPU
    logits_processors: tuple[str, ...] = ()   # qualified class names, imported by vLLM
    engine_metrics: bool = True        # vLLM's Prometheus metrics in this process's registry
    sched_idle: bool = False           # CPU: its processes in SCHED_IDLE (see yield_cpu_to_serving)
    seed: int = 0
    adapters: tuple[tuple[str, str], ...] = ()   # LoRA (name, path); any enables LoRA in the engine
    max_loras: int = 4
    max_lora_rank: int = 16
    sleep_mode: bool = True            # vLLM sleep mode (CUDA only: vLLM refuses it on CPU)
    stream_interval: int = 1           # vLLM's --stream-interval: tokens per streamed output


# The fixed greedy probe run at first load and after every wake: a woken engine must give the
# same tokens, else its weights did not come back whole and it is restarted.
PROBE_PROMPT = "Roundhouse wake probe: the quick brown fox jumps over"
PROBE_TOKENS = 8
_probe_ids = itertools.count()


@dataclasses.dataclass(slots=True)
class Step:
    """What one engine step produced for one request."""

    token_ids: Sequence[int]
    text: str
    finished: bool
    finish_reason: int            # common_pb2.FinishReason
    prompt_tokens: int
    completion_tokens: int


_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORTED,
}


_NULL_ADAPTER = "roundhouse-null-adapter"


def _null_adapter(like: str) -> str:
    """Writes a LoRA adapter shaped like the one at `like` with every weight zero; returns its path.

    vLLM's CPU LoRA ops gather each token's adapter weights with its slot index, and a base-model
    token's index is -1, which selects the last slot: a base request batched beside an adapter
    request silently gets that adapter's delta (vllm-project/vllm#48421, open). On CPU every
    base-model request therefore runs through this adapter: a real slot, a delta of exactly 0.
    """
    import pathlib
    import shutil
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    src, out = pathlib.Path(like), pathlib.Path(tempfile.mkdtemp(prefix="roundhouse-null-lora-"))
    shutil.copy(src / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return str(out)


def _remove(path: str) -> None:
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _EngineProcess(multiprocessing.context.ForkServerProcess):
    """An EngineCore process forked from this worker's fork server (see `use_fork_server`), with
    the environment this process has when it starts it: a fork server's children otherwise get
    the server's own, from when it started, and vLLM sets variables for its engine just before."""

    def start(self) -> None:
        self._environ = dict(os.environ)
        super().start()

    def run(self) -> None:
        os.environ.clear()
        os.environ.update(self._environ)
        _fork_runners_from_server()
        super().run()


class _EngineContext(multiprocessing.context.ForkServerContext):
    Process = _EngineProcess


# Imported once in the fork server, so an EngineCore forked from it starts with them loaded.
_PRELOAD = ["vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor", __name__]


_fork_server: list[bool] = []   # whether use_fork_server worked, once it ran


def use_fork_server() -> bool:
    """Makes this process start its EngineCores from a fork server that has vLLM imported (and
    starts that server now; blocking, once per process). On CPU vLLM spawns each EngineCore, a
    fresh interpreter that imports vLLM and torch again: ~7-8 s of every engine start here.
    False (and vLLM spawns as before) when vLLM's launcher is not where this expects it."""
    if _fork_server:
        return _fork_server[0]
    import vllm.v1.engine.utils as launcher

    _fork_server.append(callable(getattr(launcher, "get_mp_context", None)))
    if not _fork_server[0]:
        log.warning("engine.no_fork_server", reason="vllm.v1.engine.utils.get_mp_context not found")
        return False
    context = _EngineContext()
    launcher.get_mp_context = lambda: context  # the name vLLM's engine launcher looks up
    multiprocessing.forkserver.set_forkserver_preload(_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True


# ---- The model-runner's fork server (CPU) ----------------------------------------------------
#
# vLLM's CPU platform spawns the model-runner under each EngineCore: a fresh interpreter that
# imports torch and vLLM again (~7 s of every start here). Forking it from its EngineCore was
# tried and dropped: libgomp reads OMP_NUM_THREADS / GOMP_CPU_AFFINITY and the LD_PRELOAD'ed
# allocator once, when it loads, and the EngineCore had loaded them with the worker's variables,
# not the runner's, so the runner ran unbound. Here the worker starts a second fork server whose
# interpreter starts with exactly the environment vLLM gives the runner (its platform's variables
# and the OpenMP binding vLLM computes for rank 0) and has the runner's modules imported, and no
# OpenMP thread started; each EngineCore's executor then forks its runner from that server.
# Should the environment at the runner's start differ in any variable from the server's (a
# config that binds other cores, say: the two are compared by digest), the runner is spawned as
# before and the log says so. multiprocessing's own fork server is used for the protocol (the fds, the
# pid and exit code, the pickled process); only its launch (with an environment of our choice)
# and its lookup from a process that did not start it are written here, as no library does that.

_RUNNER_PRELOAD = ["vllm.v1.executor.multiproc_executor", "vllm.v1.worker.cpu_worker",
                   "vllm.v1.worker.cpu_model_runner", "vllm.model_executor.models.llama"]
_RUNNER_SERVER = "ROUNDHOUSE_RUNNER_SERVER"    # env, for the EngineCores: "<socket> <env digest>"
_RUNNER_ENV_IGNORED = frozenset({_RUNNER_SERVER, "VLLM_DIST_IDENT"})  # set per engine or runner


def _env_digest(env) -> str:
    import hashlib

    items = sorted((k, v) for k, v in env.items() if k not in _RUNNER_ENV_IGNORED)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


class _RunnerServer(multiprocessing.forkserver.ForkServer):
    """A fork server for model-runners, started by the worker with the runner's environment
    (`launch`) or looked up by an EngineCore from _RUNNER_SERVER (`attach`)."""

    def __init__(self, address: str, alive_fd: int, digest: str, proc=None):
        super().__init__()
        self._forkserver_address = address
        self._forkserver_alive_fd = alive_fd   # the worker's: the server exits when it closes
        self.digest = digest
        self.proc = proc                       # subprocess.Popen, in the worker only

    @classmethod
    def launch(cls, env: dict) -> "_RunnerServer":
        import socket
        import subprocess
        import sys
        from multiprocessing import connection, util

        data = {"sys_path": sys.path}
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()
            cmd = ("from multiprocessing.forkserver import main; main(%d, %d, %r, **%r)"
                   % (listener.fileno(), alive_r, _RUNNER_PRELOAD, data))
            try:
                proc = subprocess.Popen([sys.executable, *util._args_from_interpreter_flags(), "-c", cmd],
                                        pass_fds=(listener.fileno(), alive_r), env=env, stdin=subprocess.DEVNULL)
            except BaseException:
                os.close(alive_w)
                raise
            finally:
                os.close(alive_r)
        return cls(address, alive_w, _env_digest(env), proc)

    @classmethod
    def attach(cls) -> "_RunnerServer | None":
        address, _, digest = os.environ.get(_RUNNER_SERVER, "").partition(" ")
        if not address:
            return None
        return cls(address, os.open(os.devnull, os.O_RDONLY), digest)

    def ensure_running(self) -> None:
        # Started by the worker, not by whoever forks from it (multiprocessing's would start its
        # own); a server that is gone makes the connect fail, and the runner is spawned.
        multiprocessing.resource_tracker.ensure_running()

    def close(self) -> None:
        os.close(self._forkserver_alive_fd)
        self.proc.wait(5)


class _RunnerPopen(multiprocessing.popen_forkserver.Popen):
    """A process forked from the runner server (multiprocessing's forkserver Popen, pointed at it)."""

    server: _RunnerServer

    def _launch(self, process_obj):
        # popen_forkserver.Popen._launch with the runner server in place of the module's own.
        import io
        from multiprocessing import reduction, spawn, util
        from multiprocessing.context import set_spawning_popen

        prep_data = spawn.get_preparation_data(process_obj._name)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = self.server.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


class _RunnerProcess(multiprocessing.context.SpawnProcess):
    """A model-runner: forked from the runner server when its environment is the server's, else
    spawned as vLLM would."""

    @staticmethod
    def _Popen(process_obj):
        server = _RunnerPopen.server
        if _env_digest(os.environ) != server.digest:
            log.warning("engine.runner_spawned", reason="its environment differs from the runner server's")
        else:
            try:
                popen = _RunnerPopen(process_obj)
                log.info("engine.runner_forked", pid=popen.pid)
                return popen
            except OSError as e:
                log.warning("engine.runner_spawned", reason=f"the runner server is unreachable: {e}")
        return multiprocessing.context.SpawnProcess._Popen(process_obj)


class _RunnerContext(multiprocessing.context.SpawnContext):
    Process = _RunnerProcess


def _fork_runners_from_server() -> None:
    """In an EngineCore: its executor's model-runners fork from the worker's runner server (see
    _RunnerProcess), if the worker named one."""
    server = _RunnerServer.attach()
    if server is None:
        return
    import vllm.v1.executor.multiproc_executor as executor

    _RunnerPopen.server = server
    vllm_context = executor.get_mp_context

    def get_mp_context():
        context = vllm_context()   # still called: it may set vLLM's variables
        return _RunnerContext() if context.get_start_method() == "spawn" else context

    executor.get_mp_context = get_mp_context


_runner_servers: list[_RunnerServer] = []   # this worker's (one, for the environment last asked)


def runner_server_for(vllm_config) -> None:
    """In the worker, before an engine starts on CPU: makes sure a runner server with the
    environment vLLM will give this engine's model-runner is running (started now, once per
    environment: it imports for ~7 s while the EngineCore starts) and tells the EngineCore where
    it is. `vllm_config` has been through the platform's config check, which sets vLLM's process
    variables in this process's environment."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    env = dict(os.environ)
    env.pop(_RUNNER_SERVER, None)
    with OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0):
        env.update(os.environ)   # the binding vLLM sets around its runner's start
    digest = _env_digest(env)
    if _runner_servers and (_runner_servers[0].digest != digest or _runner_servers[0].proc.poll() is not None):
        _runner_servers.pop().close()
    if not _runner_servers:
        _runner_servers.append(_RunnerServer.launch(env))
        log.info("engine.runner_server_started", pid=_runner_servers[0].proc.pid)
    os.environ[_RUNNER_SERVER] = f"{_runner_servers[0]._forkserver_address} {digest}"


def _helper_pids() -> set[int]:
    """multiprocessing's helpers that serve the whole worker and must live on: its fork server,
    resource tracker and the runner server."""
    from multiprocessing import forkserver, resource_tracker

    pids = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    pids.update(s.proc.pid for s in _runner_servers)
    return {p for p in pids if p}


def _descendants() -> list:
    """This process's descendants now (psutil handles: pid and start time, never a reused pid)."""
    import psutil

    return psutil.Process().children(recursive=True)


def _engine_processes(before: set[int]) -> list:
    """The descendants that a start made (not in `before`, and not the helpers that serve the
    whole worker: `_helper_pids`), with their own descendants (a runner forked from the runner
    server is that server's child)."""
    helpers = _helper_pids()
    return [p for p in _descendants() if p.pid not in before and p.pid not in helpers]


def yield_cpu_to_serving(processes) -> int:
    """Puts every thread of a CPU engine's processes in the SCHED_IDLE class; returns how many.
    Opt-in per model (`engine_sched_idle`): it trades throughput for time to first token.

    What it answers: on these 2-vCPU machines, at concurrency 1, a stream's first token reached
    the client 55-64 ms (p50) after the request although the engine made it within ~10 ms. strace
    of the worker and the router: the worker wrote the delivery batch at once, and it sat 30-40 ms
    in the router's socket before the router's gRPC thread read it. The model runner, bound by
    vLLM to one core, computes and busy-polls (vLLM's shm_broadcast spins with sched_yield for a
    second after each message). What did not help (same machine, same run, tests/bench and
    throwaway probes): the engine at nice 10 (the services run in their own sessions, and the
    kernel's autogroups share CPU between sessions before nice counts); the EngineCore alone in
    SCHED_IDLE; the router, worker, manager and nats-server pinned to the core vLLM leaves free.
    What did: the model runner in SCHED_IDLE (alone, or with the EngineCore as here): TTFT p50 55-64 -> 8-10 ms, but output tokens/s at
    concurrency 1 fell 15-25% in a probe and 18-37% in bench_openai --engine-sched-idle (every
    thread that wakes, the client's included, now preempts the runner's forward pass), and at
    concurrency 32 completions fell to 59-71% of `vllm serve`. Hence opt-in. Later, the worker's
    whole session group at nice 10 (`--engine-group-nice`, `roundhouse up`'s default; the engine
    stays in the normal class) took the time-to-first-token tail off at a smaller price: see
    roundhouse/cpu.py.
    Unprivileged (a process may always lower its own class); threads and processes started later
    inherit it. CPU engines only: a GPU engine's polling paces its kernel launches."""
    return cpu.each_thread(processes, lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0)))


class Engine:
    def __init__(self, llm, spec: EngineSpec, null_adapter: str = "", processes: list = (), on_cpu: bool = True):
        from vllm.lora.request import LoRARequest

        self._llm = llm
        self._processes = list(processes)   # the engine's processes (psutil), stopped for sure at shutdown
        # The shared memory they talk through (/dev/shm), unlinked by vLLM only on a clean exit:
        # an engine that died, or was killed at shutdown, would leave it (see roundhouse.reaper).
        self._segments = set().union(*(reaper.shared_memory(p.pid) for p in self._processes))
        self.spec = spec
        self._tokenizer = llm.get_tokenizer()
        self._loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(spec.adapters)}
        self._null_adapter = null_adapter
        # Base-model requests: no adapter, or (CPU) the all-zero one, see _null_adapter.
        self._base_lora = LoRARequest(_NULL_ADAPTER, len(spec.adapters) + 1, null_adapter) if null_adapter else None
        self.probe_tokens: list[int] = []   # the probe's tokens at first load
        self.on_cpu = on_cpu
        self.sleep_level = 0                # asleep at this level (0: awake)

    @classmethod
    async def start(cls, spec: EngineSpec) -> "Engine":
        """Builds the engine (tens of seconds on CPU) and runs one token through it."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = await asyncio.to_thread(_on_cpu)
        if on_cpu:  # see the module doc: what a CPU engine's start and stop cost, and why
            await asyncio.to_thread(use_fork_server)
            # vLLM 0.32's CPU build saves an AOT-compiled model but cannot load it back ("'function'
            # object has no attribute 'finalize_loading'"), so every start compiled again (~9 s);
            # its older compile cache does load (warm-up ~3.8 s).
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        null_adapter = await asyncio.to_thread(_null_adapter, spec.adapters[0][1]) if on_cpu and spec.adapters else ""
        # The legacy CPU variable (whole GiB) would override the exact byte budget below.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        before = {p.pid for p in await asyncio.to_thread(_descendants)}  # not the engine's
        args = AsyncEngineArgs(
            model=spec.model_path,
            served_model_name=[spec.served_name],
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            dtype="float32" if on_cpu and spec.dtype == "auto" else spec.dtype,
            enforce_eager=spec.enforce_eager,
            **({"logits_processors": list(spec.logits_processors)} if spec.logits_processors else {}),
            gpu_memory_utilization=spec.gpu_memory_utilization,
            seed=spec.seed,
            kv_cache_memory_bytes=spec.kv_cache_bytes,
            disable_log_stats=True,
            stream_interval=spec.stream_interval,
            enable_sleep_mode=spec.sleep_mode and not on_cpu,
            enable_lora=bool(spec.adapters),
            **({"max_loras": spec.max_loras + bool(null_adapter), "max_lora_rank": spec.max_lora_rank} if spec.adapters else {}),
        )
        try:
            vllm_config = await asyncio.to_thread(args.create_engine_config)
            if on_cpu and _fork_server[0]:
                await asyncio.to_thread(runner_server_for, vllm_config)
            # vLLM's own engine metrics (`vllm:*`, as `vllm serve` exports them) in this process's
            # registry, which the worker serves on its metrics port; not its periodic log lines.
            from vllm.v1.metrics.loggers import PrometheusStatLogger

            llm = await asyncio.to_thread(AsyncLLM.from_vllm_config, vllm_config, disable_log_stats=True,
                                          stat_loggers=[PrometheusStatLogger] if spec.engine_metrics else None)
        except BaseException:
            _remove(null_adapter)
            raise
        engine = cls(llm, spec, null_adapter, await asyncio.to_thread(_engine_processes, before), on_cpu)
        try:
            engine.probe_tokens = await engine.probe()   # also the warm-up (its threads exist after it)
        except BaseException:
            await engine.shutdown()
            raise
        # A worker ahead of its engine for CPU (--cpu-nice): the engine, which inherited the
        # worker's nice, goes back to the one the worker had (roundhouse/cpu.py).
        reniced = await asyncio.to_thread(cpu.restore, engine._processes)
        if reniced:
            log.info("engine.nice_restored", processes=len(engine._processes), threads=reniced)
        if on_cpu and spec.sched_idle:
            threads = await asyncio.to_thread(yield_cpu_to_serving, engine._processes)
            log.info("engine.sched_idle", processes=len(engine._processes), threads=threads)
        return engine

    async def probe(self) -> list[int]:
        """The fixed greedy probe's tokens (see PROBE_PROMPT)."""
        out: list[int] = []
        sampling = {"max_tokens": PROBE_TOKENS, "temperature": 0.0, "ignore_eos": True}
        async for step in self.generate(PROBE_PROMPT, [], f"roundhouse-probe-{next(_probe_ids)}", sampling):
            out.extend(step.token_ids)
        return out

    @property
    def can_sleep(self) -> bool:
        """Whether a sleep frees memory (vLLM sleep mode, CUDA). On CPU `sleep` still pauses the
        engine through vLLM's own call, but vLLM's CPU worker frees nothing."""
        return not self.on_cpu and self.spec.sleep_mode

    async def sleep(self, level: int) -> None:
        """Puts the idle engine to sleep: level 1 moves its weights to host RAM, level 2 drops
        them (the process and its compiled graphs stay); the KV cache is discarded either way.
        vLLM pauses its scheduler first and clears the prefix cache (on CPU, that is all)."""
        if self._llm is None:
            raise EngineDead("engine is shut down")
        await self._llm.sleep(level)
        self.sleep_level = level

    async def wake(self) -> str:
        """Wakes a sleeping engine and checks it; returns "" when it serves as it did at first
        load, else why not (then the caller restarts it). On CPU level 2 really reloads the
        weights from disk (vLLM's `reload_weights`), though its sleep had freed nothing.
        Re-registers its LoRA adapters: vLLM forgets to apply adapters loaded before a sleep
        (vllm-project/vllm#53888)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._llm is None:
            return "its engine is shut down"
        try:
            if self.sleep_level == 2:
                # Level 2 dropped the weights: bring their memory back, load them again from the
                # model's files, then the KV cache (vLLM's documented sequence; the scheduler
                # resumes only once everything is awake).
                await self._llm.wake_up(["weights"])
                await self._llm.collective_rpc("reload_weights")
                await self._llm.wake_up(["kv_cache"])
            else:
                await self._llm.wake_up()
            self.sleep_level = 0
            await self._register_adapters()
            tokens = await self.probe()
        except (EngineDeadError, EngineDead) as e:
            return f"its engine died while asleep: {e}"
        except Exception as e:  # noqa: BLE001 - any failure to wake is answered by a restart
            if self.dead or self._a_process_is_gone():
                return f"its engine died while asleep ({type(e).__name__}: {e})"
            return f"wake_up failed: {type(e).__name__}: {e}"
        if tokens != self.probe_tokens:
            return f"the wake probe gave tokens {tokens}, not {self.probe_tokens} as at first load"
        return ""

    def _a_process_is_gone(self) -> bool:
        """Whether one of the engine's processes has exited (vLLM notices a dead EngineCore
        only when it next reads from it, and reports it then as a failed call)."""
        return any(reaper.gone(p) for p in self._processes)

    async def _register_adapters(self) -> None:
        loras = [*self._loras.values(), *([self._base_lora] if self._base_lora else [])]
        if not loras:
            return
        loaded = await self._llm.list_loras()
        for lora in loras:
            if lora.lora_int_id in loaded:
                await self._llm.remove_lora(lora.lora_int_id)
            await self._llm.add_lora(lora)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's chat template applied to `messages` and tokenized (no special tokens added
        beyond what the template writes, as vLLM's OpenAI server does)."""
        return list(self._tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))

    async def generate(
        self, prompt: str, chat: list[dict[str, str]], request_id: str, sampling: dict, adapter: str = "",
        prompt_token_ids: Sequence[int] = (),
    ) -> AsyncIterator[Step]:
        """Streams one request; `sampling` holds SamplingParams fields (max_tokens, temperature, ...);
        `adapter` names one of the engine's LoRA adapters ("" = the base model). Given
        `prompt_token_ids` (the router's rendering and tokenization), the engine takes them as they
        are; else it renders `chat` with the model's template, or tokenizes `prompt`."""
        from vllm.inputs import TokensPrompt
        # Not `from vllm import SamplingParams`: vllm's lazy __getattr__ imports on every call.
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self._llm is None:
            raise EngineDead("engine is shut down")
        if prompt_token_ids:
            engine_prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        elif chat:
            engine_prompt = TokensPrompt(prompt_token_ids=self.chat_ids(chat))
        else:
            engine_prompt = prompt
        lora = self._base_lora
        if adapter:
            lora = self._loras.get(adapter)
            if lora is None:
                raise InvalidRequest("model", f"adapter {adapter!r} is not configured on model {self.spec.served_name}")
        try:
            params = SamplingParams(output_kind=RequestOutputKind.DELTA, **sampling)
        except (ValueError, TypeError, VLLMClientError) as e:  # VLLMValidationError is no ValueError (vLLM 0.32)
            raise InvalidRequest("sampling", str(e)) from e
        completion = 0
        try:
            async for out in self._llm.generate(engine_prompt, params, request_id, lora_request=lora):
                o = out.outputs[0]
                completion += len(o.token_ids)
                yield Step(
                    token_ids=o.token_ids,
                    text=o.text,
                    finished=out.finished,
                    finish_reason=_FINISH.get(o.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    completion_tokens=completion,
                )
        except EngineDeadError as e:
            raise EngineDead(f"engine died: {e}") from e
        except EngineGenerateError as e:
            raise GenerationFailed(f"generation failed: {e}") from e
        except (ValueError, VLLMClientError) as e:  # vLLM's input checks (prompt too long for the context, ...)
            raise InvalidRequest("prompt", str(e)) from e

    async def abort(self, request_ids: Sequence[str]) -> None:
        if request_ids and self._llm is not None:
            await self._llm.abort(list(request_ids))

    def unfinished(self) -> int:
        """Requests the engine still holds (vLLM's own bookkeeping, not ours); 0 once shut down."""
        return self._llm.output_processor.get_num_unfinished_requests() if self._llm else 0

    @property
    def dead(self) -> bool:
        return self._llm is None or bool(self._llm.errored)

    async def shutdown(self) -> None:
        """Stops the engine and returns once none of its processes is left; idempotent. vLLM
        gets STOP_GRACE_S (it aborts what still runs: the worker drains first when it matters)."""
        llm, self._llm = self._llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(llm.shutdown, STOP_GRACE_S)
            killed = await asyncio.to_thread(reaper.kill, self._processes, 5.0)
            if killed:
                log.info("engine.processes_killed", count=len(killed), grace_s=STOP_GRACE_S)
            for path in self._segments:
                with contextlib.suppress(OSError):  # gone already: vLLM unlinked it
                    os.unlink(path)
            _remove(self._null_adapter)

"""The `roundhouse` command.

    roundhouse up                         # the whole stack on embedded defaults (own nats-server,
                                          # tiny chat / code / reasoning models, CPU vLLM):
                                          # gRPC 127.0.0.1:50051, OpenAI HTTP 127.0.0.1:8000
    roundhouse classify --config FILE < requests.jsonl   # which model each request would get
    roundhouse workers --config FILE --manager HOST:PORT  # one worker per model of a GPU (containers)
    roundhouse make-models DIR --count 3  # deterministic tiny Llama models + DIR/models.yaml
    roundhouse generate --model chat "Hello"   # stream one generation from a router
    roundhouse models                     # the router's models and their queues
    roundhouse status                     # residency: state, footprint, queue, loads, evictions
    roundhouse pin|unpin|load|evict|drain MODEL   # the manager's admin calls
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pathlib
import sys
import time

import grpc

from protos.v1 import common_pb2, manager_pb2, manager_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2

# `up` runs every service and the engines on one machine: nats-server, the router, and each
# worker's own process (not its engine) go ahead of the engines for CPU (roundhouse/cpu.py says
# why and what it measured; without CAP_SYS_NICE they run as before).
ROUTER_NICE = -10
WORKER_NICE = -10        # where the kernel has no autogroups: the worker's own process, not its engine
ENGINE_GROUP_NICE = 10   # where it has: each worker's session group (its engine in it) yields to every other process
NATS_NICE = -10   # its PubAck is on every request's way to its first token: 22-40 -> 17-23 ms at c32


def _worker_priority() -> list[str]:
    """A worker's CPU flags under `up`. Where autogroups are on, its session's group at nice 10
    and the worker at its engine's nice within it: measured better at concurrency 1 and 32 than
    the worker at -10 in that group, and than both at their old priorities (roundhouse/cpu.py).
    Elsewhere the group has no say, and the worker's own process goes ahead of its engine."""
    from roundhouse import cpu

    if cpu.autogroups_on():
        return ["--engine-group-nice", str(ENGINE_GROUP_NICE)]
    return ["--cpu-nice", str(WORKER_NICE)]


def _cmd_make_models(a: argparse.Namespace) -> int:
    from roundhouse import stack

    path = stack.write_tiny_catalogue(pathlib.Path(a.dir), a.count)
    print(path)
    return 0


async def _up(a: argparse.Namespace, stop: asyncio.Event) -> None:
    """The whole stack as it is deployed, one process per service: nats-server, the manager, the
    router and one worker per model, each started here and stopped on SIGINT / SIGTERM."""
    import nats as nats_client

    from roundhouse import cpu, natsauth, natsd, reaper, stack, subjects
    from roundhouse.catalogue import load

    reaper.guard()  # killed outright, it takes nats-server, the services and their engines with it
    var = pathlib.Path(a.var).resolve()
    if a.config:
        config_path = pathlib.Path(a.config).resolve()
    else:
        print(f"roundhouse: making the tiny default models under {var / 'models'} (first run only)", flush=True)
        config_path = stack.write_default(var)
    cat = load(config_path)
    run_dir = var / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    # NATS with one user per role, fresh passwords each run (roundhouse.natsauth). Each service
    # gets its role's URL in its environment, never on a command line others can read.
    tenants = [t.name for t in cat.tenants]
    passwords = natsauth.new_passwords(tenants)
    nats = await natsd.start_async(var / "jetstream", a.nats_port or None, durable=True,
                                   authorization=natsauth.authorization(passwords, tenants), log_file=run_dir / "nats.log")
    refused = cpu.set_nice_of(nats.process.pid, NATS_NICE)
    if refused:
        print(f"roundhouse: nats-server runs at its old CPU priority ({refused}; needs CAP_SYS_NICE)", flush=True)
    creds = {user: natsauth.url(nats.url, user, passwords[user]) for user in natsauth.users(tenants)}
    job_urls = _write_job_urls(run_dir, {u: creds[u] for u in natsauth.users(tenants) if u.startswith("jobs")})
    common = ["--config", str(config_path), "--log-level", a.log_level]
    services: list[stack.ServiceProcess] = []
    supervisors: list[stack.Supervisor] = []
    progress = None
    try:
        manager = await stack.start_service("manager_svc", "manager", run_dir, *common, "--host", a.host,
                                            "--port", str(a.manager_port),
                                            env={"ROUNDHOUSE_MANAGER_NATS_URL": creds["manager"]})
        services.append(manager)
        manager_address = f"{a.host}:{manager.info['port']}"
        router = await stack.start_service("router_svc", "router", run_dir, *common, "--host", a.host,
                                           "--port", str(a.port), "--http-port", str(a.http_port),
                                           "--cpu-nice", str(ROUTER_NICE),
                                           *(["--insecure"] if a.insecure else []),
                                           env={"ROUNDHOUSE_ROUTER_NATS_URL": creds["router"]})
        services.append(router)
        progress = await nats_client.connect(creds["observer"], name="roundhouse-up")
        await progress.subscribe(f"{subjects.MODEL_EVENTS_PREFIX}.>", cb=_model_progress(time.monotonic))
        for m in cat.models:
            if stop.is_set():
                return
            start = functools.partial(stack.start_worker, config_path, m.name, "", run_dir, "--manager",
                                      manager_address, "--log-level", a.log_level, *_worker_priority(),
                                      env={"ROUNDHOUSE_WORKER_NATS_URL": creds["worker"]})
            supervisors.append(stack.Supervisor(f"worker for {m.name}", start, say=_say))
            first = await supervisors[-1].begin(stop)
            metrics_at = f", metrics http://{a.host}:{first.info['metrics_port']}/metrics" if first.info.get("metrics_port") else ""
            print(f"roundhouse: worker for {m.name} started (log {first.log_path}{metrics_at})", flush=True)
        models = ", ".join(m.name + (" (" + ", ".join(m.aliases) + ")" if m.aliases else "") for m in cat.models)
        web = "https" if cat.tls is not None and cat.tls.public is not None else "http"
        print(f"roundhouse: ready. gRPC {a.host}:{router.info['port']}  HTTP {web}://{a.host}:{router.info['http_port']}/v1  "
              f"manager {manager_address}  NATS {nats.url}", flush=True)
        print(f"roundhouse: metrics: {web}://{a.host}:{router.info['http_port']}/metrics (router), "
              f"http://{a.host}:{manager.info.get('metrics_port')}/metrics (manager)", flush=True)
        print(f"roundhouse: async jobs over NATS: connect with the URL in {job_urls} and inbox_prefix "
              f"{natsauth.inbox_prefix('jobs')!r} (README: Async jobs over NATS)", flush=True)
        print(f"roundhouse: models {models}{' + auto' if cat.routing else ''}; each loads on its first request "
              f"(or `roundhouse load MODEL`). Logs under {run_dir}. Ctrl-C stops everything.", flush=True)
        for s in services:
            asyncio.create_task(_watch(s, stop))
        await stop.wait()
    finally:
        print("roundhouse: stopping", flush=True)
        stop.set()
        if progress is not None:
            await progress.close()
        await stack.stop_supervised(supervisors)  # workers first: they hand requests back while NATS is up
        await stack.stop_all(services)
        nats.stop()
        print("roundhouse: stopped", flush=True)


def _write_job_urls(run_dir: pathlib.Path, urls: dict[str, str]) -> pathlib.Path:
    """Each job-client NATS user's URL (with this run's password) in run_dir/nats-<user>.url,
    readable by this user only; returns the `jobs` one's path."""
    for user, url in urls.items():
        path = run_dir / f"nats-{user}.url"
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(url + "\n")
    return run_dir / "nats-jobs.url"


def _say(line: str) -> None:
    print(line, flush=True)


async def _watch(service, stop: asyncio.Event) -> None:
    """Without the router or the manager the stack stops (workers have a Supervisor instead)."""
    code = await asyncio.to_thread(service.process.wait)
    if stop.is_set():
        return
    print(f"roundhouse: {service.name} exited ({code}); see {service.log_path}; stopping", flush=True)
    stop.set()


def _model_progress(clock):
    """A NATS callback printing each model's residency changes (loading, ready, failed)."""
    started: dict[str, float] = {}

    async def on_event(msg) -> None:
        ev = manager_pb2.ModelEvent.FromString(msg.data)
        state = worker_pb2.EngineState.Name(ev.state).removeprefix("ENGINE_STATE_").lower()
        if ev.state == worker_pb2.ENGINE_STATE_LOADING:
            started[ev.model] = clock()
            print(f"roundhouse: {ev.model}: loading (about {ev.estimate_s:.0f} s)", flush=True)
        elif ev.state == worker_pb2.ENGINE_STATE_READY and ev.model in started:
            print(f"roundhouse: {ev.model}: ready after {clock() - started.pop(ev.model):.1f} s", flush=True)
        else:
            print(f"roundhouse: {ev.model}: {state}{': ' + ev.error if ev.error else ''}", flush=True)

    return on_event


async def _workers(a: argparse.Namespace, stop: asyncio.Event) -> None:
    """One worker process per model of one GPU, in one container: how a pod or a compose service
    that holds a GPU serves many models (a GPU cannot be split between containers)."""
    from roundhouse import stack
    from roundhouse.catalogue import load

    cat = load(a.config)
    models = [m for m in cat.models if a.gpu in ("", m.gpu)]
    if not models:
        raise SystemExit(f"error: no model in {a.config} is on gpu {a.gpu!r}")
    extra = ["--manager", a.manager, "--host", a.host, *(["--advertise-host", a.advertise_host] if a.advertise_host else [])]
    supervisors: list[stack.Supervisor] = []
    try:
        for i, m in enumerate(models):
            port = ["--metrics-port", str(a.metrics_port + i if a.metrics_port > 0 else a.metrics_port)]
            from_env = a.nats_url == os.environ.get("ROUNDHOUSE_WORKER_NATS_URL")  # the workers inherit it
            start = functools.partial(stack.start_worker, pathlib.Path(a.config).resolve(), m.name, "" if from_env else a.nats_url,
                                      pathlib.Path(a.run_dir), *extra, *port, timeout=300)
            supervisors.append(stack.Supervisor(f"worker for {m.name}", start, say=_say))
            first = await supervisors[-1].begin(stop)
            print(f"roundhouse: worker for {m.name} on {first.address}", flush=True)
        await stop.wait()  # a worker that exits is restarted by its supervisor, the others untouched
    finally:
        stop.set()
        await stack.stop_supervised(supervisors, restart_wait_s=330)


async def _health(a: argparse.Namespace) -> int:
    """Exit 0 when the gRPC server at a.address reports SERVING (container health checks)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with _channel(a, a.address, public=a.public) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout)
        except grpc.aio.AioRpcError as e:
            print(f"{a.address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"{a.address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _cmd_classify(a: argparse.Namespace) -> int:
    """Runs the router's own classifier (`python -m router_svc.classify`) as its own process, as
    this command runs every service: the shared package never imports the services."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "router_svc.classify", *(["--config", a.config] if a.config else []),
                            *(["--eval", a.eval] if a.eval else [])])


def _cmd_up(a: argparse.Namespace) -> int:
    from roundhouse import entry

    entry.run("roundhouse", a.log_level, lambda stop: _up(a, stop))
    return 0


async def _generate(a: argparse.Namespace) -> int:
    req = router_pb2.GenerateRequest(model=a.model, priority=a.priority)
    if a.chat:
        req.chat.messages.add(role="user", content=a.prompt)
    else:
        req.prompt = a.prompt
    if a.max_tokens is not None:
        req.sampling.max_tokens = a.max_tokens
    if a.temperature is not None:
        req.sampling.temperature = a.temperature
    async with _channel(a, a.router, public=True) as ch:
        try:
            async for ev in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=a.timeout, metadata=_key(a)):
                kind = ev.WhichOneof("event")
                if kind == "delta":
                    print(ev.delta.text, end="", flush=True)
                elif kind == "loading":
                    print(f"[loading {ev.loading.model}, ~{ev.loading.estimate_s:.0f}s]", file=sys.stderr, flush=True)
                elif kind == "finished":
                    u = ev.finished.usage
                    print(f"\n[finished: {common_pb2.FinishReason.Name(ev.finished.finish_reason)}, "
                          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


async def _models(a: argparse.Namespace) -> int:
    async with _channel(a, a.router, public=True) as ch:
        try:
            resp = await router_pb2_grpc.RouterStub(ch).ListModels(router_pb2.ListModelsRequest(), timeout=10, metadata=_key(a))
        except grpc.aio.AioRpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    for m in resp.models:
        print(f"{m.name:24} aliases={','.join(m.aliases) or '-':16} context={m.max_model_len:6} queued={m.queued}")
    return 0


async def _status(a: argparse.Namespace) -> int:
    async with _channel(a, a.manager) as ch:
        resp = await manager_pb2_grpc.ManagerStub(ch).ListResidency(manager_pb2.ListResidencyRequest(), timeout=10)
    for g in resp.gpus:
        print(f"gpu {g.gpu}: {g.used_bytes / 2**20:.0f} / {g.budget_bytes / 2**20:.0f} MiB; evicts by {g.swap or 'stop'}; "
              f"host {g.host}: {g.host_sleep_used_bytes / 2**20:.0f} / {g.host_sleep_budget_bytes / 2**20:.0f} MiB lent to sleepers")
    print(f"{'model':20} {'state':11} {'MiB':>6} {'queue':>5} {'run':>4} {'loads':>5} {'wakes':>5} {'evict':>5} {'pin':>3}"
          "  last use / error")
    for m in resp.models:
        print(f"{m.model:20} {state_label(m):11} {m.footprint_bytes / 2**20:>6.0f} {m.queue_depth:>5} {m.in_flight:>4} "
              f"{m.loads:>5} {m.wakes:>5} {m.evictions:>5} {'yes' if m.pinned else '':>3}  {m.error or _last_use(m)}")
    if any(m.state == worker_pb2.ENGINE_STATE_SLEEPING and not m.sleep_frees_memory for m in resp.models):
        print("(sleeping*: on CPU vLLM's sleep pauses the engine and clears its prefix cache, but frees no memory)")
    return 0


def state_label(m: manager_pb2.ModelResidency) -> str:
    """The state as `status` shows it: a sleeping model with its tier (sleep-1: weights in host
    RAM, sleep-2: weights discarded), starred where the sleep frees nothing (CPU)."""
    if m.state == worker_pb2.ENGINE_STATE_SLEEPING:
        return f"sleep-{m.sleep_level}{'' if m.sleep_frees_memory else '*'}"
    return worker_pb2.EngineState.Name(m.state).removeprefix("ENGINE_STATE_").lower()


def _last_use(m: manager_pb2.ModelResidency) -> str:
    return time.strftime("%H:%M:%S", time.localtime(m.last_used_unix)) if m.last_used_unix else "-"


async def _admin(a: argparse.Namespace) -> int:
    method = {"pin": "Pin", "unpin": "Unpin", "load": "LoadModel", "evict": "EvictModel", "drain": "Drain"}[a.cmd]
    async with _channel(a, a.manager) as ch:
        try:
            m = await getattr(manager_pb2_grpc.ManagerStub(ch), method)(
                manager_pb2.ModelRequest(model=a.model), timeout=a.timeout,
                metadata=(("authorization", f"Bearer {a.admin_key}"),) if a.admin_key else ())
        except grpc.aio.AioRpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"{m.model}: {state_label(m)}{' (pinned)' if m.pinned else ''}")
    return 0


def _channel(a: argparse.Namespace, address: str, public: bool = False) -> grpc.aio.Channel:
    """A channel to `address` with the TLS of `--config`'s tls section: its public side for the
    router's public port, mutual TLS (the internal certificate) for the manager and workers."""
    from roundhouse import tls
    from roundhouse.catalogue import load

    internal, public_tls = tls.load(load(a.config).tls) if getattr(a, "config", None) else (None, None)
    return tls.channel(address, public_tls if public else internal)


def _key(a: argparse.Namespace) -> tuple:
    """gRPC metadata carrying the caller's API key, if it has one."""
    return (("authorization", f"Bearer {a.api_key}"),) if a.api_key else ()


def _cmd_key(a: argparse.Namespace) -> int:
    from roundhouse import tenancy

    key, digest = tenancy.new_key()
    if a.quiet:
        print(key)
        return 0
    print(f"key:    {key}\nsha256: {digest}\n\nGive the key to its user; put only the hash in the config:\n\n"
          f"tenants:\n  - name: my-team\n    keys: [{{sha256: {digest}}}]")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roundhouse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run the whole stack on embedded defaults")
    up.add_argument("--config", help="models YAML (default: tiny chat / code / reasoning models made under --var)")
    up.add_argument("--var", default="var", help="state directory (models, JetStream store, logs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API (0: any free port)")
    up.add_argument("--nats-port", type=int, default=0)
    up.add_argument("--manager-port", type=int, default=50052)
    up.add_argument("--log-level", default="info")
    up.add_argument("--insecure", action="store_true", help="let the router serve a non-loopback --host with no API keys")
    hl = sub.add_parser("health", help="exit 0 when a Roundhouse gRPC server is SERVING")
    hl.add_argument("address")
    hl.add_argument("--service", default="")
    hl.add_argument("--timeout", type=float, default=3)
    hl.add_argument("--config", help="models YAML whose tls section to use (internal: mutual TLS)")
    hl.add_argument("--public", action="store_true", help="the router's public port (its tls.public)")
    wk = sub.add_parser("workers", help="run one worker per model of a GPU (a container's entry point)")
    wk.add_argument("--config", required=True)
    wk.add_argument("--gpu", default="", help="only the models on this gpu id (default: all)")
    wk.add_argument("--nats-url", default=os.environ.get("ROUNDHOUSE_WORKER_NATS_URL", "nats://127.0.0.1:4222"),
                    help="with credentials when NATS asks (env ROUNDHOUSE_WORKER_NATS_URL keeps them off the command line)")
    wk.add_argument("--manager", required=True, help="host:port of the manager")
    wk.add_argument("--host", default="0.0.0.0")
    wk.add_argument("--advertise-host", default="", help="address the manager calls (e.g. the pod IP)")
    wk.add_argument("--run-dir", default="/tmp/roundhouse-run")
    wk.add_argument("--metrics-port", type=int, default=9102,
                    help="the first worker's Prometheus port; the next ones get the ports after it (0: any, -1: off)")
    wk.add_argument("--log-level", default="info")
    cl = sub.add_parser("classify", help="route JSON-lines requests from stdin offline: prints model and reason")
    cl.add_argument("--config", help="models YAML with a routing section (default: the embedded one)")
    cl.add_argument("--eval", metavar="FILE", help="labelled JSON lines (`expect`): accuracy, precision / recall, confusion, slowest")
    mm = sub.add_parser("make-models", help="write deterministic tiny models and a catalogue")
    mm.add_argument("dir")
    mm.add_argument("--count", type=int, default=3)
    gen = sub.add_parser("generate", help="stream one generation")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="chat")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--priority", default="", choices=["", "high", "normal", "low"],
                     help="its priority class (default: the tenant's); it may be lowered, never raised")
    gen.add_argument("--timeout", type=float, default=120)
    gen.add_argument("--router", default="127.0.0.1:50051")
    gen.add_argument("--config", help="models YAML whose tls.public to trust")
    gen.add_argument("--api-key", default=os.environ.get("ROUNDHOUSE_API_KEY", ""), help="env ROUNDHOUSE_API_KEY")
    models = sub.add_parser("models", help="list the router's models")
    models.add_argument("--router", default="127.0.0.1:50051")
    models.add_argument("--config", help="models YAML whose tls.public to trust")
    models.add_argument("--api-key", default=os.environ.get("ROUNDHOUSE_API_KEY", ""), help="env ROUNDHOUSE_API_KEY")
    na = sub.add_parser("nats-auth", help="nats-server's users block: one user per role, least privilege (passwords from "
                                          "its environment: NATS_ROUTER_PASSWORD, ...)")
    na.add_argument("--config", help="a config whose tenants each get a job-client user (jobs-<tenant>)")
    cfg = sub.add_parser("config", help="the configuration file: its JSON Schema, or check one")
    cfg.add_argument("action", choices=["schema", "check"],
                     help="schema: print the JSON Schema (for editors: yaml-language-server, VS Code); "
                          "check FILE: validate a config, naming the first bad key")
    cfg.add_argument("file", nargs="?", help="the config to check")
    key = sub.add_parser("key", help="API keys for the config's tenants")
    key.add_argument("action", choices=["new"], help="new: a fresh key and the SHA-256 the config holds")
    key.add_argument("--quiet", action="store_true", help="print the key alone")
    status = sub.add_parser("status", help="residency of every model (the manager's view)")
    status.add_argument("--manager", default="127.0.0.1:50052")
    status.add_argument("--config", help="models YAML whose tls.internal to use")
    for name in ("pin", "unpin", "load", "evict", "drain"):
        cmd = sub.add_parser(name, help=f"{name} a model (manager admin)")
        cmd.add_argument("model")
        cmd.add_argument("--manager", default="127.0.0.1:50052")
        cmd.add_argument("--config", help="models YAML whose tls.internal to use")
        cmd.add_argument("--timeout", type=float, default=600)
        cmd.add_argument("--admin-key", default=os.environ.get("ROUNDHOUSE_ADMIN_KEY", ""),
                         help="an admin key, when the config's admin.keys asks for one (env ROUNDHOUSE_ADMIN_KEY)")
    return p


def _cmd_config(a) -> int:
    from roundhouse import catalogue

    if a.action == "schema":
        print(json.dumps(catalogue.schema_json(), indent=2))
        return 0
    if not a.file:
        print("roundhouse config check: give the config file to check", file=sys.stderr)
        return 2
    try:
        cat = catalogue.load(a.file)
    except catalogue.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{a.file}: ok ({len(cat.models)} models, {len(cat.gpus)} GPUs, {len(cat.tenants)} tenants)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from roundhouse.catalogue import ConfigError

    a = parser().parse_args(argv)
    try:
        return _run(a)
    except ConfigError as e:  # any command's --config: the file and key, not a traceback
        print(f"roundhouse: {e}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    if a.cmd == "up":
        return _cmd_up(a)
    if a.cmd == "health":
        return asyncio.run(_health(a))
    if a.cmd == "workers":
        from roundhouse import entry

        entry.run("roundhouse", a.log_level, lambda stop: _workers(a, stop))
        return 0
    if a.cmd == "classify":
        return _cmd_classify(a)
    if a.cmd == "make-models":
        return _cmd_make_models(a)
    if a.cmd == "generate":
        return asyncio.run(_generate(a))
    if a.cmd == "status":
        return asyncio.run(_status(a))
    if a.cmd == "key":
        return _cmd_key(a)
    if a.cmd == "config":
        return _cmd_config(a)
    if a.cmd == "nats-auth":
        from roundhouse import catalogue, natsauth

        tenants = [t.name for t in catalogue.load(a.config).tenants] if a.config else []
        print(natsauth.HEADER + natsauth.authorization(tenants=tenants), end="")
        return 0
    if a.cmd in ("pin", "unpin", "load", "evict", "drain"):
        return asyncio.run(_admin(a))
    return asyncio.run(_models(a))


if __name__ == "__main__":
    sys.exit(main())

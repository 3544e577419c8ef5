"""The `roundhouse` command.

    roundhouse up                         # the whole stack on embedded defaults (own nats-server,
                                          # two tiny models, CPU vLLM), router on 127.0.0.1:50051
    roundhouse make-models DIR --count 3  # deterministic tiny Llama models + DIR/models.yaml
    roundhouse generate --model chat "Hello"   # stream one generation from a router
    roundhouse models                     # the router's models and their queues
"""
from __future__ import annotations

import argparse
import asyncio
import pathlib
import signal
import sys

import grpc

from protos.v1 import common_pb2, router_pb2, router_pb2_grpc


def _cmd_make_models(a: argparse.Namespace) -> int:
    from roundhouse import stack

    path = stack.write_tiny_catalogue(pathlib.Path(a.dir), a.count)
    print(path)
    return 0


async def _up(a: argparse.Namespace) -> None:
    from roundhouse import logs, natsd, stack
    from roundhouse.catalogue import load
    from router_svc.config import RouterConfig
    from router_svc.server import Router

    logs.configure("roundhouse", a.log_level)
    var = pathlib.Path(a.var).resolve()
    config_path = pathlib.Path(a.config).resolve() if a.config else stack.write_tiny_catalogue(
        var, 2, aliases={"tiny-0": ["chat"], "tiny-1": ["code"]}, kv_cache_bytes=64 * 2**20, default_max_tokens=64
    )
    cat = load(config_path)
    nats = await natsd.start_async(var / "jetstream", a.nats_port or None)
    router = Router(RouterConfig(catalogue=cat, nats_url=nats.url, host=a.host, port=a.port))
    workers: list[stack.WorkerProcess] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.start()
        for m in cat.models:
            workers.append(await stack.start_worker(config_path, m.name, nats.url, var / "run", "--no-load"))
        for w in workers:  # one load at a time: engines never profile memory side by side
            status = await w.load()
            print(f"roundhouse: {w.model} ready in {status.load_seconds:.1f}s (worker {w.address})", flush=True)
        print(f"roundhouse: router listening on {router.address}; models: "
              f"{', '.join(m.name + (' (' + ', '.join(m.aliases) + ')' if m.aliases else '') for m in cat.models)}", flush=True)
        await stop.wait()
    finally:
        for w in workers:
            w.stop()
        await router.stop()
        nats.stop()


def _cmd_up(a: argparse.Namespace) -> int:
    asyncio.run(_up(a))
    return 0


async def _generate(a: argparse.Namespace) -> int:
    req = router_pb2.GenerateRequest(model=a.model)
    if a.chat:
        req.chat.messages.add(role="user", content=a.prompt)
    else:
        req.prompt = a.prompt
    if a.max_tokens is not None:
        req.sampling.max_tokens = a.max_tokens
    if a.temperature is not None:
        req.sampling.temperature = a.temperature
    async with grpc.aio.insecure_channel(a.router) as ch:
        try:
            async for ev in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=a.timeout):
                kind = ev.WhichOneof("event")
                if kind == "delta":
                    print(ev.delta.text, end="", flush=True)
                elif kind == "finished":
                    u = ev.finished.usage
                    print(f"\n[finished: {common_pb2.FinishReason.Name(ev.finished.finish_reason)}, "
                          f"{u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


async def _models(a: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(a.router) as ch:
        resp = await router_pb2_grpc.RouterStub(ch).ListModels(router_pb2.ListModelsRequest(), timeout=10)
    for m in resp.models:
        print(f"{m.name:24} aliases={','.join(m.aliases) or '-':16} context={m.max_model_len:6} queued={m.queued}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="roundhouse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run the whole stack on embedded defaults")
    up.add_argument("--config", help="models YAML (default: two tiny models made under --var)")
    up.add_argument("--var", default="var", help="state directory (models, JetStream store, logs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051)
    up.add_argument("--nats-port", type=int, default=0)
    up.add_argument("--log-level", default="info")
    mm = sub.add_parser("make-models", help="write deterministic tiny models and a catalogue")
    mm.add_argument("dir")
    mm.add_argument("--count", type=int, default=3)
    gen = sub.add_parser("generate", help="stream one generation")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="chat")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--timeout", type=float, default=120)
    gen.add_argument("--router", default="127.0.0.1:50051")
    models = sub.add_parser("models", help="list the router's models")
    models.add_argument("--router", default="127.0.0.1:50051")
    a = p.parse_args(argv)
    if a.cmd == "up":
        return _cmd_up(a)
    if a.cmd == "make-models":
        return _cmd_make_models(a)
    if a.cmd == "generate":
        return asyncio.run(_generate(a))
    return asyncio.run(_models(a))


if __name__ == "__main__":
    sys.exit(main())

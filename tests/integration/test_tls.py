"""TLS on the real stack: mutual TLS between manager, worker and router (report, load, token
delivery), server TLS on the router's public gRPC and HTTPS ports; callers without a certificate
the CA signed are refused at every internal port. Certificates are made by the test (tests/certs.py)."""
from __future__ import annotations

import asyncio
import ssl
import sys

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from manager_svc.config import ManagerConfig
from manager_svc.service import ManagerService
from protos.v1 import common_pb2, router_pb2, router_pb2_grpc
from roundhouse import catalogue, natsd, stack, tls
from router_svc.config import RouterConfig
from router_svc.server import Router
from tests.certs import Authority
from tests.conftest import TEST_ACK_WAIT_S, eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def _serving(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """Whether a health check at `address` over `credentials` (None: plaintext) gets SERVING."""
    options = [("grpc.ssl_target_name_override", tls.DEFAULT_SERVER_NAME)]
    ch = grpc.aio.secure_channel(address, credentials, options=options) if credentials else grpc.aio.insecure_channel(address)
    async with ch:
        try:
            got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e  # the handshake fails: no call is made
            return False
    return got.status == health_pb2.HealthCheckResponse.SERVING


async def test_mutual_tls_inside_and_tls_at_the_public_doors(tmp_path, models_yaml):
    ca = Authority(tmp_path / "ca")
    internal = ca.issue("internal", [tls.DEFAULT_SERVER_NAME])
    public = ca.issue("public", ["127.0.0.1", "localhost"])
    rogue_ca = Authority(tmp_path / "rogue", "rogue CA")
    rogue = rogue_ca.issue("rogue", [tls.DEFAULT_SERVER_NAME])
    config = models_yaml.with_name("tls-models.yaml")
    config.write_text(models_yaml.read_text() + f"""
tls:
  internal: {{ca: {ca.ca}, cert: {internal.cert}, key: {internal.key}}}
  public: {{cert: {public.cert}, key: {public.key}, ca: {ca.ca}}}
""")
    cat = catalogue.load(config)
    server = await natsd.start_async(tmp_path / "js")
    manager = ManagerService(ManagerConfig(catalogue=cat, nats_url=server.url, port=0))
    router = Router(RouterConfig(catalogue=cat, nats_url=server.url, port=0, http_port=0, publish_timeout_s=30.0,
                                 job_ack_wait_s=TEST_ACK_WAIT_S))
    worker = None
    try:
        await manager.start()
        await router.start()
        worker = await stack.start_worker(config, "tiny-0", server.url, tmp_path / "run", "--manager", manager.address,
                                          "--ack-wait", str(TEST_ACK_WAIT_S))
        await eventually(lambda: manager.manager.entries["tiny-0"].address == worker.address, 60,
                         "the worker's report reached the manager over mutual TLS")

        # An HTTPS request: the manager loads the model over mutual TLS, the worker delivers its
        # tokens to the router's delivery port over mutual TLS.
        trust = ssl.create_default_context(cafile=str(ca.ca))
        body = {"model": "chat", "prompt": "over tls", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"https://127.0.0.1:{router.http_port}/v1/completions", json=body, ssl=trust,
                              timeout=aiohttp.ClientTimeout(total=180)) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["completion_tokens"] == 6
            with pytest.raises(aiohttp.ClientError):  # plaintext to the TLS port
                async with s.get(f"http://127.0.0.1:{router.http_port}/health", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
        async with grpc.aio.secure_channel(f"127.0.0.1:{router.port}", grpc.ssl_channel_credentials(ca.ca.read_bytes())) as ch:
            req = router_pb2.GenerateRequest(model="chat", prompt="grpc over tls",
                                             sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            events = [ev async for ev in router_pb2_grpc.RouterStub(ch).Generate(req, timeout=60)]
            assert events[-1].finished.usage.completion_tokens == 3
        assert not await _serving(f"127.0.0.1:{router.port}", None), "the public gRPC port is TLS only"

        # Every internal port: the CA's certificate gets in; none, plaintext, or another CA's does not.
        ours = grpc.ssl_channel_credentials(ca.ca.read_bytes(), internal.key.read_bytes(), internal.cert.read_bytes())
        no_cert = grpc.ssl_channel_credentials(ca.ca.read_bytes())
        theirs = grpc.ssl_channel_credentials(ca.ca.read_bytes(), rogue.key.read_bytes(), rogue.cert.read_bytes())
        for address in (manager.address, worker.address, router.delivery_address):
            assert await _serving(address, ours), address
            for creds in (None, no_cert, theirs):
                assert not await _serving(address, creds), (address, creds)

        # The command line uses the config's TLS.
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "roundhouse.cli", "health", "--config", str(config),
                                                    manager.address, stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0 and b"SERVING" in out
    finally:
        if worker is not None:
            worker.stop(timeout=15)
        await router.stop(grace=1)
        await manager.stop()
        server.stop()

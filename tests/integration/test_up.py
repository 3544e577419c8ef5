"""`roundhouse up` as a user runs it: a subprocess on embedded defaults that answers an OpenAI
request and, on SIGTERM, stops leaving no process behind."""
from __future__ import annotations

import asyncio
import re
import signal
import sys

import openai
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def _read_until(stream, pattern: str, seen: list[str], timeout: float) -> re.Match:
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("roundhouse up exited early:\n" + "".join(seen))
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m


async def test_up_serves_a_request_and_stops_cleanly(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roundhouse.cli", "up", "--var", str(tmp_path / "var"),
        "--port", "0", "--http-port", "0", "--manager-port", "0", "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    seen: list[str] = []
    family: list[psutil.Process] = []
    try:
        ready = await _read_until(proc.stdout, r"ready\. gRPC (\S+)\s+HTTP (http://\S+)", seen, 180)
        client = openai.AsyncOpenAI(base_url=ready.group(2), api_key="unused", max_retries=0, timeout=180)
        reply = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
        assert reply.model == "chat" and reply.usage.completion_tokens >= 1
        auto = await client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "hi again"}], max_tokens=3)
        assert auto.headers["x-roundhouse-model"] == "chat", "the default rules send small talk to chat"
        await _read_until(proc.stdout, r"chat: ready after", seen, 30)  # progress was shown
        assert any("chat: loading" in line for line in seen)
        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in family)
        assert "nats-server" in names and len(family) >= 4, f"nats-server, 3 workers, an engine: {names}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 90)
        code = await asyncio.wait_for(proc.wait(), 10)
    assert code == 0, "".join(seen) + rest.decode()
    assert "roundhouse: stopped" in rest.decode()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"

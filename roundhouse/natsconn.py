"""How every Roundhouse process connects to NATS: reconnect for ever, one log line per event.

nats-py's default error callback logs each failed reconnect attempt with a full traceback (a
dozen lines every 2 s while a server restarts, measured in tests/integration/test_faults.py);
these callbacks say the same in one structured line, and say when the connection is back.
"""
from __future__ import annotations

import urllib.parse

import nats
import structlog

from roundhouse import natsauth

log = structlog.get_logger("nats")


def _inbox_prefix(url: str) -> str:
    """Its NATS user's own inbox prefix (`_INBOX.<user>`: the only inboxes its role may hear,
    roundhouse.natsauth); NATS's default when the URL names no user."""
    user = urllib.parse.urlsplit(url.split(",")[0].strip()).username
    return natsauth.inbox_prefix(user) if user else "_INBOX"


async def connect(url: str, name: str) -> nats.NATS:
    async def error(e: Exception) -> None:
        log.warning("nats.error", connection=name, error=repr(e))

    async def disconnected() -> None:
        log.warning("nats.disconnected", connection=name)

    async def reconnected() -> None:
        log.info("nats.reconnected", connection=name, server=f"{nc.connected_url.hostname}:{nc.connected_url.port}" if nc.connected_url else "")  # never its password

    nc = await nats.connect(url, name=name, max_reconnect_attempts=-1, error_cb=error,
                            disconnected_cb=disconnected, reconnected_cb=reconnected, inbox_prefix=_inbox_prefix(url))
    return nc

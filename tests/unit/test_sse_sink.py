"""The HTTP stream's sink: token text straight to the connection as chunks of the chunked body."""
import pytest

from router_svc.http import SINK_BUFFER_LIMIT, _SseSink

pytestmark = pytest.mark.unit


class Transport:
    """Records writes, as an asyncio transport takes them (a fake of the one thing the sink touches)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.unsent = 0

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.unsent


def frame(text: str) -> bytes:
    return b"data: " + text.encode() + b"\n\n"


def test_it_declines_until_the_stream_is_open_then_writes_chunked_frames():
    sink, t = _SseSink(), Transport()
    assert sink("a") is False  # before the first data chunk (the role) is out: the event path writes it
    sink.open(t, frame)
    assert sink("héllo") is True
    body = frame("héllo")
    assert t.written == [b"%x\r\n" % len(body) + body + b"\r\n"]
    assert sink("") is True and len(t.written) == 1  # empty text: nothing to send, nothing left behind


def test_it_declines_for_a_closing_connection_and_for_a_caller_that_reads_slowly():
    sink, t = _SseSink(), Transport()
    sink.open(t, frame)
    t.unsent = SINK_BUFFER_LIMIT + 1
    assert sink("a") is False
    t.unsent, t.closing = 0, True
    assert sink("a") is False
    assert t.written == []

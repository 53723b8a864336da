"""assistant/hypercorn_mends.py, in process: hypercorn's handshake declines compression unless
asked to take it, and a stalled write or close is reset only when the client takes nothing (the
ping loop and the resets are tested end to end: tests/test_e2e.py, tests/test_shutdown.py,
tests/test_faults.py)."""

from __future__ import annotations

import pytest
import asyncio
import socket
import struct

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol.ws_stream import Handshake, WSStream

from assistant import hypercorn_mends
from assistant.hypercorn_mends import mend_hypercorn

OFFERS = [
    b"permessage-deflate; client_max_window_bits",
    b"x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
    b"x-unknown-extension",
]


@pytest.fixture(autouse=True)
def hypercorn_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls, name in ((Handshake, "accept"), (WSStream, "handle"), (WSStream, "_send_pings"),
                      (ASGIWrapper, "__call__"), (TCPServer, "protocol_send"), (TCPServer, "_close")):
        monkeypatch.setattr(cls, name, getattr(cls, name))


def answered_extensions(offer: bytes) -> str | None:
    _, headers, _ = Handshake([(b"sec-websocket-extensions", offer)], "1.1").accept(None, [])
    value = dict(headers).get(b"sec-websocket-extensions")
    return None if value is None else value.decode().split(";")[0]  # the extension, without its parameters


@pytest.mark.parametrize("offer", OFFERS)
def test_compression_is_declined_by_default(offer: bytes) -> None:
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    assert answered_extensions(offer) is None


def test_compression_is_taken_when_asked_for_as_hypercorn_takes_it() -> None:
    mend_hypercorn(compression=True, slow_client_timeout_seconds=30)
    assert answered_extensions(OFFERS[0]) == "permessage-deflate"
    assert answered_extensions(OFFERS[1]) == "permessage-deflate"
    assert answered_extensions(OFFERS[2]) is None  # nothing hypercorn knows


def test_calling_it_again_changes_only_the_choice() -> None:
    mend_hypercorn(compression=True, slow_client_timeout_seconds=30)
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    assert answered_extensions(OFFERS[0]) is None
    mend_hypercorn(compression=True, slow_client_timeout_seconds=30)
    assert answered_extensions(OFFERS[0]) == "permessage-deflate"


class ClosingTransport:
    """What the watch sees of a closing transport: its buffer, as the client takes from it."""

    def __init__(self, buffered: list[int]) -> None:
        self.buffered = buffered  # the buffer's size at each look
        self.aborted_with_linger: bytes | None = None
        self.sock = socket.socket()

    def get_write_buffer_size(self) -> int:
        return self.buffered.pop(0) if len(self.buffered) > 1 else self.buffered[0]

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted_with_linger = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        self.sock.close()


async def watched(transport: ClosingTransport, seconds: float) -> ClosingTransport:
    mend_hypercorn(compression=False, slow_client_timeout_seconds=0.05)
    with hypercorn_mends._ResetWhenStalled(transport):  # type: ignore[arg-type]
        await asyncio.sleep(seconds)
    return transport


@pytest.mark.anyio
async def test_a_wait_the_client_makes_no_progress_in_is_reset() -> None:
    transport = await watched(ClosingTransport([70_000, 70_000]), 0.2)
    assert transport.aborted_with_linger == struct.pack("ii", 1, 0), "not reset (SO_LINGER 0, then abort)"


@pytest.mark.anyio
async def test_a_client_that_takes_a_little_in_every_interval_is_not_reset() -> None:
    transport = await watched(ClosingTransport([70_000, 69_000, 60_000, 59_999, 30_000, 20_000, 10_000]), 0.25)
    assert transport.aborted_with_linger is None
    transport.sock.close()


@pytest.mark.anyio
async def test_a_flushed_buffer_is_left_to_close_by_itself() -> None:
    transport = await watched(ClosingTransport([70_000, 0]), 0.2)
    assert transport.aborted_with_linger is None
    transport.sock.close()

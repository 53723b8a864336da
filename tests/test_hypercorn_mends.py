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
from hypercorn.protocol.h11 import H11Protocol
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
                      (ASGIWrapper, "__call__"), (TCPServer, "protocol_send"), (TCPServer, "_close"),
                      (H11Protocol, "handle"), (H11Protocol, "_handle_events"), (WSStream, "_handle_events")):
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
    """What the watch sees of a closing transport: asyncio's buffer at each look, and a real
    loopback connection under it whose kernel queue is full (the client has read nothing yet)."""

    def __init__(self, buffered: list[int]) -> None:
        self.buffered = buffered
        self.aborted_with_linger: bytes | None = None
        listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(listener.getsockname())
        self.sock, _ = listener.accept()
        listener.close()
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.send(b"x" * 65536)
        except BlockingIOError:
            pass

    def get_write_buffer_size(self) -> int:
        return self.buffered.pop(0) if len(self.buffered) > 1 else self.buffered[0]

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted_with_linger = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        self.close()

    def close(self) -> None:
        self.sock.close()
        self.client.close()


async def watched(transport: ClosingTransport, seconds: float, *, interval: float = 0.05,
                  read_every: float | None = None) -> ClosingTransport:
    """The watch over `seconds`; the client reads 64 KiB every `read_every` seconds."""
    mend_hypercorn(compression=False, slow_client_timeout_seconds=interval)
    with hypercorn_mends._ResetWhenStalled(transport):  # type: ignore[arg-type]
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(min(left, read_every or left))
            if read_every is not None and transport.aborted_with_linger is None:
                transport.client.recv(65536)
    if transport.aborted_with_linger is None:
        transport.close()
    return transport


@pytest.mark.anyio
async def test_a_wait_the_client_takes_nothing_in_is_reset() -> None:
    transport = await watched(ClosingTransport([70_000]), 0.2)
    assert transport.aborted_with_linger == struct.pack("ii", 1, 0), "not reset (SO_LINGER 0, then abort)"


@pytest.mark.anyio
async def test_a_client_that_reads_steadily_is_not_reset_while_asyncios_buffer_stands_still() -> None:
    """asyncio's buffer shrinks only when the socket has room again, after the client took about a
    third of the kernel's send buffer (here ~1.3 MB, two intervals' reading): the kernel's queue
    shows what the client took, as its window opens."""
    transport = await watched(ClosingTransport([70_000]), 0.4, interval=0.1, read_every=0.01)
    assert transport.aborted_with_linger is None


@pytest.mark.anyio
async def test_a_buffer_asyncio_hands_on_in_every_interval_is_not_reset() -> None:
    transport = await watched(ClosingTransport([70_000, 69_000, 60_000, 59_999, 30_000, 20_000, 10_000]), 0.25)
    assert transport.aborted_with_linger is None


@pytest.mark.anyio
async def test_a_buffer_asyncio_has_flushed_is_left_to_close_by_itself() -> None:
    """All of it is the kernel's then: asyncio closes the socket, and the kernel sends or gives up."""
    transport = await watched(ClosingTransport([70_000, 0]), 0.2)
    assert transport.aborted_with_linger is None

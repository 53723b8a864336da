"""assistant/hypercorn_mends.py, in process: hypercorn's handshake declines compression unless
asked to take it, a stalled write or close is reset only when the client takes nothing, the lean
queue and event (and a connection's drain waiters) behave as asyncio's, which they replace, the
ping loop leaves nothing behind, each connection counts, as it ends, towards the next full
garbage collection, and a response's head and body are written as h11 writes them (the ping loop and the resets are also tested end to end: tests/test_e2e.py,
tests/test_shutdown.py, tests/test_faults.py)."""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import h11
import h11._connection
import h11._headers
import orjson
import pytest

from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.task_group import TaskGroup
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import EventWrapper, WorkerContext
from hypercorn.config import Config
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import Handshake, WSStream
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate

from assistant import hypercorn_mends
from assistant.hypercorn_mends import LeanEvent, LeanQueue, mend_hypercorn

OFFERS = [
    b"permessage-deflate; client_max_window_bits",
    b"x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
    b"x-unknown-extension",
]


@pytest.fixture(autouse=True)
def hypercorn_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_mends, "_ping_wakes", {})
    for cls, name in ((Handshake, "accept"), (WSStream, "handle"), (WSStream, "_send_pings"),
                      (ASGIWrapper, "__call__"), (TCPServer, "protocol_send"), (TCPServer, "_close"),
                      (H11Protocol, "handle"), (H11Protocol, "_handle_events"), (WSStream, "_handle_events"),
                      (TaskGroup, "spawn_app"), (WorkerContext, "event_class"), (TCPServer, "__init__"),
                      (TCPServer, "_idle_timeout"), (WSStream, "_send_error_response")):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    # h11's and hypercorn's own, not whatever is there: an app started by an earlier test mended
    # them for the process.
    monkeypatch.setattr(h11._connection, "set_comma_header", h11._headers.set_comma_header)
    monkeypatch.setattr(H11Protocol, "stream_send", hypercorn_mends._original_h11_stream_send)
    monkeypatch.setattr(WSStream, "_send_wsproto_event", hypercorn_mends._original_send_wsproto_event)


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


# The lean queue and event: each scenario runs on asyncio's class and on the lean one, and both
# must see the same.


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue_fifo_and_backpressure(queue: asyncio.Queue | LeanQueue) -> list[object]:
    seen: list[object] = []
    putters = [asyncio.create_task(queue.put(n)) for n in range(5)]  # maxsize 2: three wait
    await settle()
    seen.append(sum(p.done() for p in putters))
    for _ in range(5):
        seen.append(await queue.get())
        await settle()
        seen.append(sum(p.done() for p in putters))
    return seen


async def queue_getters_in_turn(queue: asyncio.Queue | LeanQueue) -> list[object]:
    got: list[object] = []

    async def getter(name: str) -> None:
        got.append((name, await queue.get()))

    tasks = [asyncio.create_task(getter(name)) for name in "abc"]
    await settle()
    for n in range(3):
        await queue.put(n)
    await asyncio.gather(*tasks)
    return got


async def queue_cancelled_as_woken(queue: asyncio.Queue | LeanQueue) -> list[object]:
    """A getter cancelled in the very step a message woke it leaves the message queued, and the
    next getter gets it: nothing is lost (a timeout firing as a body chunk arrives)."""
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await settle()
    await queue.put("chunk")
    first.cancel()  # woken, not yet run
    await settle()
    return [first.cancelled(), await asyncio.wait_for(second, 1)]


async def queue_cancelled_while_waiting(queue: asyncio.Queue | LeanQueue) -> list[object]:
    first = asyncio.create_task(queue.get())
    await settle()
    first.cancel()
    await settle()
    await queue.put("after")
    return [first.cancelled(), await asyncio.wait_for(queue.get(), 1)]


async def queue_putter_cancelled_as_woken(queue: asyncio.Queue | LeanQueue) -> list[object]:
    await queue.put(1)
    await queue.put(2)
    third = asyncio.create_task(queue.put(3))
    fourth = asyncio.create_task(queue.put(4))
    await settle()
    got = [await queue.get()]
    third.cancel()  # woken by the get, cancelled before it ran: the room passes to the next putter
    await settle()
    got += [third.cancelled(), fourth.done()]
    got += [await queue.get(), await queue.get()]
    return got


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", [queue_fifo_and_backpressure, queue_getters_in_turn, queue_cancelled_as_woken,
                                      queue_cancelled_while_waiting, queue_putter_cancelled_as_woken])
async def test_the_lean_queue_behaves_as_asyncios(scenario) -> None:
    expected = await scenario(asyncio.Queue(2))
    assert await scenario(LeanQueue(2)) == expected
    assert not hasattr(LeanQueue(2), "__dict__")


@pytest.mark.anyio
async def test_the_lean_queue_holds_no_waiter_once_none_waits() -> None:
    queue = LeanQueue(1)
    getter = asyncio.create_task(queue.get())
    await settle()
    getter.cancel()
    await settle()
    await queue.put(1)
    blocked = asyncio.create_task(queue.put(2))
    await settle()
    assert await queue.get() == 1
    await blocked
    assert queue._getters is None and queue._putters is None


async def event_scenario(event: EventWrapper | LeanEvent) -> list[object]:
    seen: list[object] = [event.is_set()]
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await settle()
    seen.append(sum(w.done() for w in waiters))
    waiters[0].cancel()
    await event.set()
    await event.clear()  # cleared at once: every waiter woken by the set still returns
    await settle()
    seen += [waiters[0].cancelled(), sum(w.done() and not w.cancelled() for w in waiters), event.is_set()]
    late = asyncio.create_task(event.wait())
    await settle()
    seen.append(late.done())
    await event.set()
    await event.set()
    await settle()
    seen += [late.done(), event.is_set()]
    await asyncio.wait_for(event.wait(), 1)  # set: returns at once
    return seen


@pytest.mark.anyio
async def test_the_lean_event_behaves_as_hypercorns() -> None:
    expected = await event_scenario(EventWrapper())
    lean = LeanEvent()
    assert await event_scenario(lean) == expected
    assert lean._waiters is None


@pytest.mark.anyio
async def test_the_mends_give_each_request_a_lean_queue_and_each_connection_a_lean_event() -> None:
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    assert isinstance(WorkerContext(None).event_class(), LeanEvent)
    received: list[object] = []

    async def app(scope, receive, send, sync_spawn, call_soon) -> None:
        assert isinstance(receive.__self__, LeanQueue)
        received.append(await receive())
        received.append(await receive())

    async with TaskGroup(asyncio.get_running_loop()) as task_group:
        put = await task_group.spawn_app(app, Config(), {"type": "http"}, lambda message: settle())
        assert isinstance(put.__self__, LeanQueue)
        await put({"type": "http.request", "body": b"x", "more_body": False})
        await put({"type": "http.disconnect"})
    assert received == [{"type": "http.request", "body": b"x", "more_body": False}, {"type": "http.disconnect"}]


async def drain_scenario(protocol: asyncio.StreamReaderProtocol) -> list[object]:
    """Writes that wait for a slow client: two wait and are let go together, then one sees the
    connection lost."""
    seen: list[object] = []
    protocol.pause_writing()
    drains = [asyncio.create_task(protocol._drain_helper()) for _ in range(2)]
    await settle()
    seen.append((len(protocol._drain_waiters), [d.done() for d in drains]))
    protocol.resume_writing()
    await asyncio.gather(*drains)
    seen.append(len(protocol._drain_waiters))
    protocol.pause_writing()
    lost = asyncio.create_task(protocol._drain_helper())
    await settle()
    protocol.connection_lost(ConnectionResetError("gone"))
    try:
        await lost
    except ConnectionResetError as exc:
        seen.append(repr(exc))
    seen.append(len(protocol._drain_waiters))
    return seen


@pytest.mark.anyio
async def test_each_connections_stream_waits_for_its_drains_in_a_list_as_in_asyncios_deque(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hypercorn_mends, "note_ended", lambda: None)  # built in the test's own task
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    here, there = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=here)
    try:
        protocol = writer.transport.get_protocol()
        assert isinstance(protocol._drain_waiters, collections.deque)  # asyncio's own
        expected = await drain_scenario(asyncio.StreamReaderProtocol(asyncio.StreamReader()))
        TCPServer(None, asyncio.get_running_loop(), Config(), WorkerContext(None), {}, reader, writer)
        assert protocol._drain_waiters == [] and type(protocol._drain_waiters) is list
        assert await drain_scenario(protocol) == expected
    finally:
        writer.close()
        there.close()


class PingedStream:
    """What the ping loop uses of a WSStream."""

    def __init__(self) -> None:
        self.closed = False
        self.config = Config()
        self.config.websocket_ping_interval = 0.02
        self.pings = 0

    async def _send_wsproto_event(self, event: object) -> None:
        self.pings += 1


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["closed", "cancelled"])
async def test_the_ping_loop_pings_until_its_socket_closes_and_leaves_nothing_behind(ending: str) -> None:
    stream = PingedStream()
    loop = asyncio.create_task(hypercorn_mends._send_pings(stream))  # type: ignore[arg-type]
    with anyio.fail_after(5):
        while stream.pings < 2:
            await asyncio.sleep(0.01)
    if ending == "closed":
        stream.closed = True
        hypercorn_mends._set_once(hypercorn_mends._ping_wakes[stream])  # what the close's handling does
        await asyncio.wait_for(loop, 1)  # at once, not after an interval
    else:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    assert stream not in hypercorn_mends._ping_wakes


@pytest.mark.anyio
async def test_each_hypercorn_connection_counts_once_as_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    ended: list[int] = []
    monkeypatch.setattr(hypercorn_mends, "note_ended", lambda: ended.append(1))
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    loop = asyncio.get_running_loop()
    config = Config()
    config.keep_alive_timeout = 0.1  # a connection that never sent a request lingers this long

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await TCPServer(None, loop, config, WorkerContext(None), {}, reader, writer)

    connections = []
    for _ in range(2):
        here, there = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=here)
        connections.append((loop.create_task(serve(reader, writer)), there))
    await asyncio.sleep(0.05)
    assert ended == []  # open connections are not counted
    for task, there in connections:
        there.close()  # the client leaves
        await asyncio.wait_for(task, 5)
    await asyncio.sleep(0)  # the task's done callbacks
    assert ended == [1, 1]


async def streamed_app(scope: dict, receive: object, send: object) -> None:
    """A response in two body messages, as a stream's."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"one ", "more_body": True})
    await send({"type": "http.response.body", "body": b"two"})


@pytest.mark.anyio
@pytest.mark.parametrize("mended", [True, False])
@pytest.mark.usefixtures("no_automatic_gc")
async def test_an_ended_connection_is_freed_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch, mended: bool
) -> None:
    """Its server and protocol go as it ends: no full collection has to find them. (Its socket
    transport's own cycle: tests/test_garbage_collection.py.)"""
    monkeypatch.setattr(hypercorn_mends, "note_ended", lambda: None)
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    if not mended:  # the control: hypercorn's own __init__, so the test shows the cycle it breaks
        monkeypatch.setattr(TCPServer, "__init__", hypercorn_mends._original_tcp_server_init)
    loop = asyncio.get_running_loop()
    here, there = socket.socketpair()
    served: list[weakref.ref] = []

    async def serve() -> None:
        reader, writer = await asyncio.open_connection(sock=here)
        server = TCPServer(ASGIWrapper(streamed_app), loop, Config(), WorkerContext(None), {}, reader, writer)
        served.append(weakref.ref(server))
        await server

    connection = loop.create_task(serve())
    client_reader, client_writer = await asyncio.open_connection(sock=there)
    try:
        client_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(client_reader.read(), 5)
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"two\r\n0\r\n\r\n")
    finally:
        client_writer.close()
        if not connection.done():
            await asyncio.wait_for(connection, 5)  # the client's close ends it
    await asyncio.sleep(0)  # the task's done callbacks
    del connection
    assert [ref() is not None for ref in served] == [not mended]


RESPONSE_HEADS = [  # (request, response headers): the framing headers h11 sets or clears
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [("Content-Type", "text/event-stream"), ("X-Correlation-ID", "abc")]),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [("content-length", "5"), ("Transfer-Encoding", "chunked")]),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", [("Content-Length", "5"), ("content-length", "5")]),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", [("Server", "hypercorn")]),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [("Connection", "keep-alive, Upgrade")]),
    (b"GET / HTTP/1.0\r\n\r\n", [("Date", "today"), ("transfer-encoding", "chunked")]),
    (b"GET / HTTP/1.0\r\n\r\n", [("Content-Length", "0")]),
]


def send_response_head(request: bytes, headers: list[tuple[str, str]]) -> tuple[bytes, object, object]:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(request)
    assert isinstance(connection.next_event(), h11.Request)
    data = connection.send(h11.Response(status_code=200, headers=headers))
    return data, connection.our_state, connection._cstate.keep_alive


@pytest.mark.parametrize(("request_head", "headers"), RESPONSE_HEADS)
def test_a_response_head_is_written_as_h11_writes_it(request_head: bytes, headers: list[tuple[str, str]]) -> None:
    """h11 validates a response's headers once, not three times, and writes the same head."""
    assert h11._connection.set_comma_header is h11._headers.set_comma_header  # h11's own, for the baseline
    expected = send_response_head(request_head, headers)
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    assert h11._connection.set_comma_header is hypercorn_mends._set_comma_header
    assert send_response_head(request_head, headers) == expected


async def quick_app(scope: dict, receive: Any, send: Any) -> None:
    """Answers at once, or after the `?wait=` seconds the request's query string gives."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(float(scope["query_string"].decode().partition("wait=")[2] or 0))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def served_connection(
    app: Any, config: Config | None = None, context: WorkerContext | None = None,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client's connection to an in-process hypercorn connection serving `app`; leaving closes
    the client's end and waits for the server's connection to end."""
    loop = asyncio.get_running_loop()
    here, there = socket.socketpair()

    async def serve() -> None:
        reader, writer = await asyncio.open_connection(sock=here)
        await TCPServer(ASGIWrapper(app), loop, config or Config(), context or WorkerContext(None), {}, reader, writer)

    connection = loop.create_task(serve())
    reader, writer = await asyncio.open_connection(sock=there)
    try:
        yield reader, writer
    finally:
        writer.close()
        await asyncio.wait_for(connection, 5)


@asynccontextmanager
async def keep_alive_connection(keep_alive_timeout: float) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, WorkerContext]]:
    """A client's connection to an in-process hypercorn connection, mended, serving `quick_app`."""
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    config = Config()
    config.keep_alive_timeout = keep_alive_timeout
    context = WorkerContext(None)
    async with served_connection(quick_app, config, context) as (reader, writer):
        yield reader, writer, context


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/") -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head + await asyncio.wait_for(reader.readexactly(2), 5)


@pytest.mark.anyio
async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout_and_not_during_a_request() -> None:
    async with keep_alive_connection(0.2) as (reader, writer, _):
        assert (await ask(reader, writer)).endswith(b"ok")
        assert (await ask(reader, writer, "/?wait=0.5")).endswith(b"ok")  # longer than the timeout: still served
        await asyncio.sleep(0.1)
        assert (await ask(reader, writer)).endswith(b"ok")  # idle for less than the timeout
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # idle: closed by the server
        assert 0.1 < time.monotonic() - started < 2


@pytest.mark.anyio
async def test_an_idle_connection_is_closed_at_once_when_the_server_shuts_down() -> None:
    async with keep_alive_connection(30) as (reader, writer, context):
        assert (await ask(reader, writer)).endswith(b"ok")
        await context.terminated.set()
        assert await asyncio.wait_for(reader.read(), 2) == b""


@pytest.mark.anyio
async def test_a_stopped_keep_alive_timer_is_not_waited_for_and_never_fires() -> None:
    """hypercorn waited for the stopped timer's task to end before it started each request's
    app: here `stop()` returns at once, and the timer's action does not run."""
    fired: list[str] = []

    async def action() -> None:
        try:
            await asyncio.sleep(0.05)
            fired.append("timed out")
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # a task slow to end: stopping does not wait for it
            raise

    timer = hypercorn_mends.KeepAliveTimer()
    async with TaskGroup(asyncio.get_running_loop()) as task_group:
        await timer.restart(task_group, action)
        await asyncio.sleep(0)  # the timer's task started
        started = time.monotonic()
        await timer.stop()
        assert time.monotonic() - started < 0.05
        await timer.restart(task_group, action)
        await timer.stop()  # before its task ever ran
    assert fired == []


@pytest.mark.anyio
async def test_the_apps_writes_wait_for_a_client_that_does_not_read() -> None:
    """The app's writes skip hypercorn's send lock while the socket takes them at once, but
    one that the client is behind on still waits for it (backpressure)."""
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    loop = asyncio.get_running_loop()
    sent: list[int] = []
    piece = b"x" * 65536

    async def flooding_app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(1000):  # 64 MiB, if nothing waited
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            sent.append(1)

    here, there = socket.socketpair()

    async def serve() -> None:
        reader, writer = await asyncio.open_connection(sock=here)
        await TCPServer(ASGIWrapper(flooding_app), loop, Config(), WorkerContext(None), {}, reader, writer)

    connection = loop.create_task(serve())
    try:
        there.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        await asyncio.sleep(0.5)
        assert 0 < len(sent) < 100, len(sent)
    finally:
        there.close()
        await asyncio.wait_for(connection, 5)


BODIES = [  # (request, response headers, the app's body messages)
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [],
     [b"data: 1\n\n", b"", "data: \u00fc\u20ac\n\n".encode(), b"x" * 70000, b"end"]),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [], [b"one", b""]),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [(b"content-length", b"6")], [b"abc", b"def"]),
    (b"GET / HTTP/1.0\r\n\r\n", [], [b"abc", b"", b"def"]),
    (b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", [], [b"abc", b"def"]),
]


async def exchange(request: bytes, headers: list[tuple[bytes, bytes]], bodies: list[bytes]) -> bytes:
    """What a client reads from an in-process hypercorn connection whose app sends `bodies`, the
    last one ending the response; the server closes the connection after it."""
    config = Config()
    config.include_date_header = False

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for number, body in enumerate(bodies, 1):
            await send({"type": "http.response.body", "body": body, "more_body": number < len(bodies)})

    async with served_connection(app, config) as (reader, writer):
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)


@pytest.mark.anyio
@pytest.mark.parametrize(("request_head", "headers", "bodies"), BODIES)
async def test_a_response_body_is_written_as_h11_writes_it(
    request_head: bytes, headers: list[tuple[bytes, bytes]], bodies: list[bytes], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked body's data is framed by the mend, not by h11 (no Data event reaches h11),
    and the client reads what h11 would have written, byte for byte; other bodies go to h11."""
    data_events = 0
    h11_send = h11.Connection.send

    def counting_send(self: h11.Connection, event: Any) -> Any:
        nonlocal data_events
        data_events += type(event) is h11.Data
        return h11_send(self, event)

    monkeypatch.setattr(h11.Connection, "send", counting_send)
    expected = await exchange(request_head, headers, bodies)
    h11_data_events = data_events
    assert h11_data_events > 0 or request_head.startswith(b"HEAD")
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    data_events = 0
    assert await exchange(request_head, headers, bodies) == expected
    chunked = request_head.startswith(b"GET / HTTP/1.1") and not headers
    assert data_events == (0 if chunked else h11_data_events)


class SendingStream:
    """What hypercorn's WSStream._send_wsproto_event uses of its stream: a wsproto connection
    and a send that records the bytes it is given."""

    def __init__(self, extensions: list[Any]) -> None:
        self.connection = Connection(ConnectionType.SERVER, extensions=extensions)
        self.stream_id = 1
        self.sent: list[bytes] = []

    async def send(self, event: Any) -> None:
        self.sent.append(bytes(event.data))


def taken_deflate() -> list[Any]:
    """permessage-deflate as a handshake that takes the client's offer leaves it: enabled."""
    extension = PerMessageDeflate()
    extension.accept("permessage-deflate")
    return [extension]


WS_MESSAGES = [
    TextMessage(data="data"), TextMessage(data=""), TextMessage(data="\u00fc\u20ac" * 40),
    TextMessage(data="x" * 125), TextMessage(data="x" * 126), TextMessage(data="x" * 65535),
    TextMessage(data="x" * 65536), TextMessage(data="part one, ", message_finished=False),
    TextMessage(data="part two"), BytesMessage(data=b"bytes"), Ping(), TextMessage(data="after"),
    CloseConnection(code=1000), TextMessage(data="after the close"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("compression", [False, True])
async def test_a_websocket_message_is_framed_as_wsproto_frames_it(
    compression: bool, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole text message on a connection without extensions is framed by the mend, not by
    wsproto, into the bytes wsproto would write; anything else goes to wsproto."""
    framed_by_wsproto = 0
    wsproto_send = Connection.send

    def counting_send(self: Connection, event: Any) -> bytes:
        nonlocal framed_by_wsproto
        framed_by_wsproto += type(event) is TextMessage
        return wsproto_send(self, event)

    monkeypatch.setattr(Connection, "send", counting_send)
    extensions = taken_deflate if compression else list
    expected = SendingStream(extensions())
    for message in WS_MESSAGES:
        await WSStream._send_wsproto_event(expected, message)  # type: ignore[arg-type]
    assert framed_by_wsproto == 11 and expected.connection.state is ConnectionState.LOCAL_CLOSING
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    framed_by_wsproto = 0
    mended = SendingStream(extensions())
    for message in WS_MESSAGES:
        await WSStream._send_wsproto_event(mended, message)  # type: ignore[arg-type]
    assert mended.sent == expected.sent
    # wsproto frames only the two parts of the message sent in two, the texts after the close
    # (it refuses them), and with compression all of them
    assert framed_by_wsproto == (11 if compression else 3)


@pytest.mark.anyio
@pytest.mark.parametrize(("ending", "status", "type"), [("raises", 500, "internal_error"),
                                                         ("returns", 500, "internal_error"),
                                                         ("closes", 403, "http_error")])
async def test_a_handshake_the_app_ends_before_accepting_gets_the_services_json_error(
    ending: str, status: int, type: str
) -> None:
    """hypercorn answers an app that fails, returns or closes before accepting a WebSocket with a
    bare status; mended, with the JSON error and the correlation ID the app's request had."""
    mend_hypercorn(compression=False, slow_client_timeout_seconds=30)
    config = Config()
    config.include_date_header = False

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        scope["state"]["correlation_id"] = "the-apps-id"  # as CorrelationIdMiddleware sets it
        await receive()  # websocket.connect
        if ending == "raises":
            raise RuntimeError("a bug")
        if ending == "closes":
            await send({"type": "websocket.close", "code": 1008})

    async with served_connection(app, config) as (reader, writer):
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.lower().partition(b"content-length: ")[2].partition(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
    assert head.startswith(b"HTTP/1.1 %d " % status) and b"x-correlation-id: the-apps-id\r\n" in head, head
    error = orjson.loads(body)
    assert (error["type"], error["correlation_id"]) == (type, "the-apps-id")

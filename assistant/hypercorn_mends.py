"""Mends to hypercorn 0.18 where it has no setting to do better: WebSocket compression, ping loops
and oversized messages; the close of a connection whose client stopped reading; writes to a
lost connection; the end of one that had a request pipelined behind a stream; and the memory
each open connection holds in asyncio's Queue and Event (`LeanQueue`, `LeanEvent`) and in its
stream's drain waiters; the answer to a request that is not valid HTTP/1.1 or to a WebSocket
handshake refused before it opens (the service's JSON error, not a bare status); the wait,
before each request's app starts, for the connection's keep-alive timer to stop
(`KeepAliveTimer`); the send lock and drain on every write, also on
the app's writes that have nothing to wait for; h11's validating a response's headers three
times over, and its state machine run for every chunk of a streamed body; wsproto's framing of
each WebSocket message. An ended connection leaves no reference cycle of hypercorn's behind (it
is broken as the connection ends), so reference counting frees it, and it counts towards the
next full garbage collection (garbage_collection.py).

Applied by the app as it starts serving (app.py), so they hold in the process that serves, also
under `hypercorn --workers 1` (hypercorn_config.py runs only in hypercorn's parent there).
Written for hypercorn 0.18.0 and applied to it only (several replace a hypercorn function with
a copy that differs where it says), the two h11 ones for h11 0.16.0, the framing for wsproto
1.3.2: tests/test_shutdown.py, tests/test_e2e.py, tests/test_faults.py,
tests/test_e2e_websocket_close.py and tests/test_hypercorn_mends.py fail if another version
leaves them out. Each is worth reporting upstream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import fcntl
import importlib.metadata
import socket
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h11
import h11._connection
from h11._headers import Headers, normalize_and_validate
from h11._writers import ChunkedWriter
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.asyncio.task_group import TaskGroup, _handle
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.asyncio.worker_context import WorkerContext
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, Data, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.protocol.ws_stream import FrameTooLargeError, Handshake, WSStream
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from .errors import ServiceError, error_body_and_headers, log_refusal
from .garbage_collection import note_ended
from .logs import correlation_id_var
from .middleware import choose_correlation_id, header_of, new_correlation_id

_compression = False  # WS_COMPRESSION: take the permessage-deflate a client offers
_stalled_seconds = 30.0  # SLOW_CLIENT_TIMEOUT_SECONDS
_original_accept = Handshake.accept
_original_handle = WSStream.handle
_original_close = TCPServer._close
_original_h11_handle = H11Protocol.handle
_original_h11_stream_send = H11Protocol.stream_send
_original_send_wsproto_event = WSStream._send_wsproto_event
_original_tcp_server_init = TCPServer.__init__
# Set in the task that ran the ASGI app once it returned: hypercorn's own writes from then on
# (a WebSocket's close frame) have no app watching them.
_app_returned: contextvars.ContextVar[bool] = contextvars.ContextVar("app_returned", default=False)
_UNWATCHED = contextlib.nullcontext()
# Each ping loop's wake, by its stream: not an attribute of the stream, which would unshare the
# stream's `__dict__` from its class's keys (~0.8 KiB more per open socket).
_ping_wakes: dict[WSStream, asyncio.Future[None]] = {}


def mend_hypercorn(*, compression: bool, slow_client_timeout_seconds: float) -> None:
    """Decline WebSocket compression unless `compression`, end each ping loop when its socket
    closes, reset a connection whose client takes nothing for `slow_client_timeout_seconds`
    while hypercorn closes it or sends what follows the app's return, and mend the rest (the
    module's docstring). Calling it again only changes the two settings."""
    global _compression, _stalled_seconds
    _compression = compression
    _stalled_seconds = slow_client_timeout_seconds
    if importlib.metadata.version("hypercorn") != "0.18.0":
        return
    Handshake.accept = _accept  # type: ignore[method-assign]
    WSStream.handle = _handle_then_wake_pings  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    ASGIWrapper.__call__ = _call_app  # type: ignore[method-assign]
    TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    TCPServer._close = _close_or_reset  # type: ignore[method-assign]
    H11Protocol.handle = _handle_then_end_a_paused_read  # type: ignore[method-assign]
    H11Protocol._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream._handle_events = _handle_websocket_events  # type: ignore[method-assign]
    WSStream._send_error_response = _refuse_websocket_handshake  # type: ignore[method-assign]
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
    WorkerContext.event_class = LeanEvent
    TCPServer.__init__ = _init_tcp_server  # type: ignore[method-assign]
    TCPServer._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    if importlib.metadata.version("h11") == "0.16.0":
        h11._connection.set_comma_header = _set_comma_header  # type: ignore[attr-defined]
        H11Protocol.stream_send = _stream_send  # type: ignore[method-assign]
    if importlib.metadata.version("wsproto") == "1.3.2":
        WSStream._send_wsproto_event = _send_wsproto_event  # type: ignore[method-assign]


def _set_comma_header(headers: Headers, name: bytes, new_values: list[bytes]) -> Headers:
    """h11's, validating only the values it adds. h11 sets a response's framing headers with it
    (content-length and transfer-encoding, twice per head) and validated the whole list again
    each time, after the response's constructor had: ~250 of a streamed turn's ~3,200 calls."""
    kept = [item for item in headers._full_items if item[1] != name]
    if new_values:
        kept += normalize_and_validate([(name.title(), value) for value in new_values])._full_items
    return Headers(kept)


async def _stream_send(self: H11Protocol, event: StreamEvent) -> None:
    """hypercorn's, with a chunk of a chunked response body framed here, as h11's writer frames
    it. h11 would first pass the chunk through its state machine, where a body's data changes no
    state (it comes only while the response is being sent, and the states it could move are
    already settled by the event that began the body): ~21 calls a delta. Anything
    else, and a body h11 frames otherwise (a content length, an HTTP/1.0 client), goes to h11."""
    if type(event) is Body:
        connection = self.connection
        if connection.our_state is h11.SEND_BODY and type(connection._writer) is ChunkedWriter:
            data = event.data
            if data:  # h11 writes nothing for no data: an empty chunk would end the body
                await self.send(RawData(data=b"%x\r\n%s\r\n" % (len(data), data)))
            return
    await _original_h11_stream_send(self, event)


async def _send_wsproto_event(self: WSStream, event: Any) -> None:
    """hypercorn's, with a whole text message framed here, as wsproto frames it for a server
    (unmasked, one frame) on a connection without extensions (the service declines compression
    unless WS_COMPRESSION=on): wsproto's way there is ~12 calls a delta. Anything
    else, and a message wsproto would frame otherwise, goes to wsproto."""
    if type(event) is TextMessage and event.message_finished:
        connection = self.connection
        frames = connection._proto
        if (connection.state is ConnectionState.OPEN and not frames.extensions and not frames.client
                and frames._outbound_opcode is None):
            await self.send(Data(stream_id=self.stream_id, data=text_frame(event.data)))
            return
    await _original_send_wsproto_event(self, event)


def text_frame(text: str) -> bytes:
    """A server's WebSocket frame (RFC 6455 section 5.2) holding one whole text message."""
    payload = text.encode()
    length = len(payload)
    if length <= 125:
        return bytes((0x81, length)) + payload  # FIN, text; the length in the second byte
    if length <= 0xFFFF:
        return struct.pack("!BBH", 0x81, 126, length) + payload
    return struct.pack("!BBQ", 0x81, 127, length) + payload


# A client that stopped reading is dropped by the service (SLOW_CLIENT_TIMEOUT_SECONDS), but
# hypercorn then waits for it to take what was already written: the close frame it sends when a
# WebSocket app returns, and a connection's close, which waits for the transport to flush. Neither
# wait has an end, so the socket, the kernel's buffers (megabytes) and the connection's tasks
# stayed until the client went away. Here such a wait that sees no progress for
# SLOW_CLIENT_TIMEOUT_SECONDS resets the connection. (Over TLS served by hypercorn itself the
# watch sees only the TLS layer's buffer, which is mostly empty, and rarely acts; behind a proxy,
# as the service is deployed, it speaks plain TCP.)


async def _call_app(self: ASGIWrapper, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
    """hypercorn's, marking the task once the app returned."""
    try:
        await self.app(scope, receive, send)
    finally:
        _app_returned.set(True)


async def _protocol_send(self: TCPServer, event: Event) -> None:
    """hypercorn's (every write goes through it), with the writes that follow the app's return
    watched: while the app runs, its own sends are (the service drops a client that stalls).
    Nothing is written to a connection already lost: asyncio logged a warning for each such
    write, and a client that flooded pings and left made thousands. The lock matters only to a
    write that waits for the client: the app's write that finds none waiting, and that the
    socket takes at once (every delta of a client that keeps up), goes without it (~8 calls a
    delta)."""
    if isinstance(event, RawData):
        transport = self.writer.transport
        data = event.data
        if not self.send_lock.locked() and not transport.is_closing() and not _app_returned.get():
            try:
                transport.write(data)
            except RuntimeError:  # written after write_eof()
                await self.protocol.handle(Closed())
                return
            if not transport.get_write_buffer_size():
                return
            data = b""  # written: what is left is to wait for the client to take it
        # The lock too: a ping stuck in its drain holds it.
        with _ResetWhenStalled(transport) if _app_returned.get() else _UNWATCHED:
            async with self.send_lock:
                try:
                    if data and not transport.is_closing():
                        self.writer.write(data)
                    await self.writer.drain()
                except (ConnectionError, RuntimeError):
                    await self.protocol.handle(Closed())
    elif isinstance(event, Closed):
        await self._close()
    elif isinstance(event, Updated):
        if event.idle:
            await self.idle_task.restart(self._task_group, self._idle_timeout)
        else:
            await self.idle_task.stop()


async def _close_or_reset(self: TCPServer) -> None:
    with _ResetWhenStalled(self.writer.transport):
        await _original_close(self)


class _ResetWhenStalled:
    """Resets the transport if, for a whole interval while this is entered, asyncio still holds
    bytes for it and the client took none of what is queued (asyncio closes the socket once its
    own buffer is empty; the kernel then sends the rest, or gives up, by itself)."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def __enter__(self) -> None:
        self._watch(self.transport.get_write_buffer_size() + self._kernel_queued())

    def __exit__(self, *exc_info: object) -> None:
        self.timer.cancel()

    def _watch(self, queued: int) -> None:
        self.queued = queued
        self.timer = asyncio.get_running_loop().call_later(_stalled_seconds, self._check)

    def _kernel_queued(self) -> int:
        """What the kernel holds unacknowledged: it shrinks with every byte the client takes,
        where asyncio's buffer shrinks only when the socket has room again (after the client
        took about a third of its send buffer: a megabyte on loopback)."""
        sock = self.transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0 or sock.type != socket.SOCK_STREAM:
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def _check(self) -> None:
        buffered = self.transport.get_write_buffer_size()
        if not buffered:
            return  # the write or the close goes on by itself
        queued = buffered + self._kernel_queued()
        if queued < self.queued:  # the client is reading, however slowly
            self._watch(queued)
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset, not a FIN queued behind data nobody takes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


async def _handle_then_end_a_paused_read(self: H11Protocol, event: Event) -> None:
    """A request pipelined behind a streamed one pauses hypercorn's reader until the stream's
    response is done. When the client goes (a write fails) mid-stream, the response never ends
    and nothing woke the reader: the connection's task, its protocol objects and the app's scope
    stayed for good (18 MB per 400 such clients), and a shutdown logged a traceback for each.
    Here the close wakes it, and `_handle_events` stops reading ahead."""
    await _original_h11_handle(self, event)
    if isinstance(event, Closed):
        self._connection_closed = True  # type: ignore[attr-defined]
        await self.can_read.set()


async def _handle_events(self: H11Protocol) -> None:
    """hypercorn's, but a read paused on a pipelined request ends once the connection closed
    (the reader then finds the socket's end, as after any close)."""
    while True:
        if self.connection.they_are_waiting_for_100_continue:
            await self._send_h11_event(
                h11.InformationalResponse(status_code=100, headers=self.config.response_headers("h11"))
            )
        try:
            event = self.connection.next_event()
        except h11.RemoteProtocolError as error:
            if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                await _refuse_malformed_request(self, error)
            await self.send(Closed())
            break
        else:
            if isinstance(event, h11.Request):
                await self.send(Updated(idle=False))
                await self._check_protocol(event)
                await self._create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
                if getattr(self, "_connection_closed", False):
                    break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                break
            elif self.stream is None:
                break
            elif isinstance(event, h11.Data):
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.stream.handle(EndBody(stream_id=STREAM_ID))
            elif isinstance(event, Data):
                # WebSocket pass through
                await self.stream.handle(event)


# A request h11 cannot read: hypercorn answered it with a bare status (no body, no correlation ID).
_MALFORMED_REQUEST_TYPES = {431: "request_headers_too_large", 501: "not_implemented"}


async def _refuse_malformed_request(self: H11Protocol, error: h11.RemoteProtocolError) -> None:
    """The service's JSON error (README "Errors") for a request that is not valid HTTP/1.1, with a
    new correlation ID in the body, the header and the log line; the connection then closes."""
    status = error.error_status_hint
    refusal = ServiceError(f"malformed HTTP request: {error}", status_code=status,
                           type=_MALFORMED_REQUEST_TYPES.get(status, "invalid_request"))
    correlation_id = new_correlation_id()
    correlation_id_var.set(correlation_id)  # the connection's task ends here: nothing else logs with it
    log_refusal(refusal)
    body, headers = error_body_and_headers(refusal, correlation_id)
    headers += [(b"connection", b"close"), (b"x-correlation-id", correlation_id.encode()),
                *self.config.response_headers("h11")]
    await self._send_h11_event(h11.Response(status_code=status, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


# What a WebSocket handshake that hypercorn refuses itself gets, by hypercorn's status for it.
_HANDSHAKE_REFUSALS = {
    400: ("invalid_request", "not a WebSocket handshake the service takes: it needs HTTP/1.1, Connection: Upgrade, "
                             "Upgrade: websocket, a Sec-WebSocket-Key and Sec-WebSocket-Version: 13"),
    404: ("not_found", "no server of this name here"),
    500: ("internal_error", "the service failed to handle this request"),
}


async def _refuse_websocket_handshake(self: WSStream, status_code: int) -> None:
    """hypercorn's answer to a WebSocket handshake it ends itself (one that is not valid, or an
    app that closed or failed before accepting), with the service's JSON error and correlation
    ID: it was a bare status. An invalid one is told the version spoken here (RFC 6455, 4.4)."""
    scope = getattr(self, "scope", None) or {"headers": [], "state": {}}
    correlation_id = scope["state"].get("correlation_id")  # the app's, when it got that far
    if correlation_id is None:
        correlation_id = choose_correlation_id(header_of(scope, b"x-correlation-id"))
        correlation_id_var.set(correlation_id)  # the connection ends here: nothing else logs with it
    type, message = _HANDSHAKE_REFUSALS.get(status_code, ("http_error", "the WebSocket handshake was refused"))  # 403
    refusal = ServiceError(message, type=type, status_code=status_code)
    if status_code < 500:
        log_refusal(refusal)  # an app's failure is logged with its traceback already
    body, headers = error_body_and_headers(refusal, correlation_id)
    headers += [(b"connection", b"close"), (b"x-correlation-id", correlation_id.encode())]
    if status_code == 400:
        headers.append((b"sec-websocket-version", b"13"))
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))
    await self.config.log.access(scope, {"status": status_code, "headers": []}, time.time() - self.start_time)


async def _handle_websocket_events(self: WSStream) -> None:
    """hypercorn's, but a message over `websocket_max_message_size` (hypercorn_config.py: twice
    MAX_BODY_BYTES) is refused once (1009) and dropped as it comes, and the frames behind it are
    read on, so that the client's answer to the close ends the connection. hypercorn stopped
    reading there, keeping the message and the socket for good when another frame followed. A
    frame that breaks the protocol gets a close frame with its code before the connection ends."""
    for event in self.connection.events():
        if isinstance(event, Message):
            if getattr(self, "_refused_too_large", False):
                continue  # the rest of the refused message, or one the client sent before it saw the close
            try:
                self.buffer.extend(event)
            except FrameTooLargeError:
                self.buffer.clear()
                self._refused_too_large = True  # type: ignore[attr-defined]
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                continue
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            elif self.connection.state == ConnectionState.OPEN:
                # Not the client's close: wsproto failed the connection on a frame that broke the
                # protocol (1002; 1007 for text that is not UTF-8). Say so before closing, as RFC
                # 6455 (7.1.7) asks; hypercorn only closed, and the client saw 1006.
                await self._send_wsproto_event(CloseConnection(code=event.code, reason=event.reason))
            await self.send(StreamClosed(stream_id=self.stream_id))


def _accept(self: Handshake, *args: Any, **kwargs: Any) -> Any:
    """hypercorn's handshake answers every offer of permessage-deflate, the one extension it
    knows, and a compressor per socket is ~100 KiB (for frames of short JSON). Forgetting the
    offer before the answer declines it, as RFC 6455 allows."""
    if not _compression:
        self.extensions = None
    return _original_accept(self, *args, **kwargs)


async def _handle_then_wake_pings(self: WSStream, event: Any) -> None:
    await _original_handle(self, event)
    wake = _ping_wakes.get(self)
    if self.closed and wake is not None:
        _set_once(wake)


async def _send_pings(self: WSStream) -> None:
    """hypercorn's ping loop (WS_PING_SECONDS) sleeps a whole interval between pings, also once
    its socket has closed, and the connection's task waits for it: every WebSocket closed in the
    last interval held its connection (~16 KiB, two tasks, its compressor: 2.1 GiB under churn),
    and a shutdown waited out `graceful_timeout`, logging a traceback for each. This one's wait
    ends when the socket closes; its first ping comes after one interval, not at once (a socket
    that lasts one turn needs none)."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            # A bare future, not an asyncio.Event (~0.8 KiB more per open socket, with its deque).
            wake = _ping_wakes[self] = loop.create_future()
            if self.closed:  # closed while the last ping was being sent: nothing set this wake
                return
            timer = loop.call_later(self.config.websocket_ping_interval, _set_once, wake)
            try:
                await wake
            finally:
                timer.cancel()
            if self.closed:
                return
            await self._send_wsproto_event(Ping())
    finally:
        _ping_wakes.pop(self, None)


def _set_once(wake: asyncio.Future[None]) -> None:
    if not wake.done():
        wake.set_result(None)


# Memory per open connection. asyncio's Queue and Event allocate their deques up front, ~760
# bytes each, and hypercorn makes a Queue (four deques) for every request and an Event for every
# connection: ~4 KiB of every open stream's ~38 KiB, mostly never used. These hold their waiters
# in a list made only while someone waits.


class LeanEvent:
    """asyncio.Event as hypercorn's EventWrapper offers it (its `event_class`)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    async def clear(self) -> None:
        self._value = False

    async def set(self) -> None:
        if not self._value:
            self._value = True
            self._waiters = _wake(self._waiters, every=True)

    def is_set(self) -> bool:
        return self._value

    async def wait(self) -> None:
        if self._value:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters = _waiting(self._waiters, waiter)
        try:
            await waiter
        finally:
            self._waiters = _done_waiting(self._waiters, waiter)


class LeanQueue:
    """asyncio.Queue's `get` and `put`, as hypercorn uses them for a request's ASGI messages:
    first in, first out, `put` waits while `maxsize` (> 0) messages are queued, and a message
    stays queued until a `get` returns it (a get cancelled as it is woken loses nothing)."""

    __slots__ = ("_items", "_maxsize", "_getters", "_putters")

    def __init__(self, maxsize: int = 0) -> None:
        self._items: list[Any] = []
        self._maxsize = maxsize
        self._getters: list[asyncio.Future[None]] | None = None
        self._putters: list[asyncio.Future[None]] | None = None

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters = _waiting(self._getters, getter)
            try:
                await getter
            except BaseException:
                self._getters = _done_waiting(self._getters, getter)
                if self._items and getter.done() and not getter.cancelled():
                    self._getters = _wake(self._getters)  # woken, but leaving: the message is the next getter's
                raise
        item = self._items.pop(0)
        self._putters = _wake(self._putters)
        return item

    async def put(self, item: Any) -> None:
        while 0 < self._maxsize <= len(self._items):
            putter = asyncio.get_running_loop().create_future()
            self._putters = _waiting(self._putters, putter)
            try:
                await putter
            except BaseException:
                self._putters = _done_waiting(self._putters, putter)
                if len(self._items) < self._maxsize and putter.done() and not putter.cancelled():
                    self._putters = _wake(self._putters)
                raise
        self._items.append(item)
        self._getters = _wake(self._getters)


class KeepAliveTimer:
    """hypercorn's AsyncioSingleTask as a connection uses it, for its keep-alive timeout
    (`_idle_timeout`), but stopping it does not wait for its task to end. hypercorn stops it as
    each request comes in, and waited: three turns of the loop (the task, asyncio.wait_for's
    inner one, then the task's end), each behind every stream's work, before it started the
    request's app. A stopped timer cannot close its connection: its task is cancelled before it
    runs again (a close already begun goes on, as in hypercorn's)."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def restart(self, task_group: TaskGroup, action: Callable[[], Awaitable[None]]) -> None:
        await self.stop()
        self._task = task_group._task_group.create_task(action())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


async def _idle_timeout(self: TCPServer) -> None:
    """hypercorn's, with asyncio.timeout for asyncio.wait_for: one task per idle connection, not
    two, and one turn of the loop to stop."""
    try:
        async with asyncio.timeout(self.config.keep_alive_timeout):
            await self.context.terminated.wait()
    except TimeoutError:
        pass
    await asyncio.shield(self._initiate_server_close())


def _init_tcp_server(self: TCPServer, *args: Any, **kwargs: Any) -> None:
    """hypercorn's, with a lean keep-alive timer (`KeepAliveTimer`), and a list for the drain
    waiters of the connection's asyncio stream: a deque (~0.7 KiB) for the writes that wait for
    a client that is slow to read, which most connections never have. asyncio only appends to
    it, removes from it and iterates over it.
    Each connection counts, as it ends, towards the next full garbage collection
    (garbage_collection.py), and its reference cycle is broken as it ends (`_end_connection`):
    hypercorn builds it in the connection's own task."""
    _original_tcp_server_init(self, *args, **kwargs)
    self.idle_task = KeepAliveTimer()  # type: ignore[assignment]
    if (task := asyncio.current_task()) is not None:
        task.add_done_callback(partial(_end_connection, self))
    protocol = self.writer.transport.get_protocol()
    if type(getattr(protocol, "_drain_waiters", None)) is collections.deque and not protocol._drain_waiters:
        protocol._drain_waiters = []


def _end_connection(server: TCPServer, task: asyncio.Task[Any]) -> None:
    """The connection's task ended: break the reference cycle hypercorn leaves in it, so that
    reference counting frees it at once, and count it towards the next full garbage collection.

    hypercorn's server and protocol refer to each other (`protocol`, and the protocol's `send`
    bound to the server). A connection that lived past a few young collections (any stream) sat
    in the oldest generation, and only a full collection, which stalls every stream, freed it:
    ~30 objects, ~8 KiB. (asyncio's own cycle in the socket transport: garbage_collection.py.)"""
    server.__dict__.pop("protocol", None)
    note_ended()


def _waiting(waiters: list[asyncio.Future[None]] | None, waiter: asyncio.Future[None]) -> list[asyncio.Future[None]]:
    if waiters is None:
        return [waiter]
    waiters.append(waiter)
    return waiters


def _done_waiting(waiters: list[asyncio.Future[None]] | None, waiter: asyncio.Future[None]) -> list[asyncio.Future[None]] | None:
    if waiters is not None and waiter in waiters:
        waiters.remove(waiter)
    return waiters or None


def _wake(waiters: list[asyncio.Future[None]] | None, every: bool = False) -> list[asyncio.Future[None]] | None:
    """Wake the first waiter still waiting (each wakes the next as it leaves), or `every` one;
    return those left waiting."""
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            if not every:
                break
    return waiters or None


async def _spawn_app(
    self: TaskGroup, app: Any, config: Any, scope: Any, send: Callable[[Any], Awaitable[None]]
) -> Callable[[Any], Awaitable[None]]:
    """hypercorn's, with a LeanQueue for its asyncio.Queue."""
    app_queue = LeanQueue(config.max_app_queue_size)

    def _call_soon(func: Callable, *args: Any) -> Any:
        future = asyncio.run_coroutine_threadsafe(func(*args), self._loop)
        return future.result()

    self.spawn(_handle, app, config, scope, app_queue.get, send, partial(self._loop.run_in_executor, None), _call_soon)
    return app_queue.put

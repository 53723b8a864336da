"""A lean HTTP/1.1 transport under the OpenAI client: one callback and at most one wakeup per network read.

The service's hot path is reading streamed events from the upstream. httpx's default transport
(httpcore, h11 and anyio streams) spends a cancel scope, an h11 event and several stream layers
on every chunk, and its pool walks every connection on each request and release. This one is an
`asyncio.Protocol` per connection: bytes are de-chunked as they arrive, and the waiting reader
is woken once; a streamed body's reader (`deliver_body`) is not woken at all: its chunk handler
runs in the read callback. The pool is a stack of idle connections per origin, so taking and
giving back a connection costs the same with 1 or 1,000 of them, and a connection the server
closes leaves the pool the moment it does (nothing is polled). When requests at once outgrow
the pool, it opens a spare connection ahead of the next one (`_open_spare`), so that a growing
number of streams does not wait for a connection (and TLS handshake) each.

It plugs in as an `httpx.AsyncBaseTransport`, so the SDK, its error mapping and every request
the service makes stay as they are. Timeouts are httpx's: connect, write, pool, and read, which
is also the longest silence allowed between two chunks of a body (one timer per connection,
re-armed lazily, not one per chunk). Failures raise httpx's exceptions.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import select
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx

MAX_HEAD_BYTES = 64 * 1024  # status line and headers
MAX_CHUNK_LINE_BYTES = 4096  # a chunk-size line, or a trailer line
WRITE_SLICE_BYTES = 64 * 1024  # a request body is written this much at a time
PAUSE_READING_BYTES = 1024 * 1024  # a body not read this far ahead stops reading from the socket

SPARE_BACKOFF_SECONDS = 5.0  # no spare connection is opened this long after one failed
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NO_BODY_STATUS = frozenset({204, 304})
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _seconds(timeout: float | None) -> str:
    return "the time the system allows" if timeout is None else f"{timeout:g} s"


def _happy_eyeballs(loop: asyncio.AbstractEventLoop, host: str) -> dict[str, float]:
    """Race a host's addresses 250 ms apart, so an unreachable one (IPv6, say) does not hold up
    the next. asyncio's own loop takes the option; uvloop's (hypercorn's `-k uvloop`) refuses it
    with a TypeError and tries the addresses in turn. An IP address is one address: asyncio's
    race would still run it in a task of its own, a turn of the loop later (and leave a
    reference cycle per connection)."""
    if not isinstance(loop, asyncio.BaseEventLoop) or _is_ip_address(host):
        return {}
    return {"happy_eyeballs_delay": 0.25}


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _raisable_in_a_task(exc: Exception) -> Exception:
    """`exc`, unless a future refuses it: a StopIteration (a bug in a chunk handler) becomes
    the RuntimeError a coroutine would have made of it."""
    if isinstance(exc, StopIteration):
        error = RuntimeError(f"the body's chunk handler raised StopIteration: {exc!r}")
        error.__cause__ = exc
        return error
    return exc


class _Body:
    """How the response body is delimited."""

    NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)


class _Chunk:
    """Where the chunked decoder is."""

    SIZE, DATA, DATA_END, TRAILER = range(4)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: writes requests, parses the response as bytes arrive."""

    # Slots, not an instance dict: past 30 attributes a dict no longer shares its keys with the
    # class's other instances and grows from ~0.3 to ~1.6 KiB, for every connection in the pool.
    __slots__ = (
        "pool", "origin", "loop", "transport", "closed", "forgotten", "idle", "requests", "idle_since",
        "last_activity", "_error", "_waiter", "_write_paused", "_drained", "_read_timeout", "_timer",
        "_reading_paused", "_deliver", "_deliver_context", "in_response", "head", "keep_alive", "no_body",
        "body_done", "_buffer", "_body_kind", "_remaining", "_chunk_state", "_chunks", "_buffered",
    )

    def __init__(self, pool: UpstreamTransport, origin: tuple[str, str, int]) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.forgotten = False  # the pool no longer counts it
        self.idle = False  # in the pool, waiting for a request
        self.requests = 0  # sent on this connection so far
        self.idle_since = 0.0  # when it went back to the pool
        self.last_activity = self.loop.time()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._read_timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        # While a body's reader waits in `deliver_body`: its chunk handler, run in its context.
        self._deliver: Callable[[bytes], bool] | None = None
        self._deliver_context: contextvars.Context | None = None
        self._reset()

    def _reset(self) -> None:
        """Ready for the next response."""
        if self._timer is not None:  # armed for the previous response's read timeout
            self._timer.cancel()
            self._timer = None
        if self._reading_paused and self.transport is not None:
            self.transport.resume_reading()
        self.in_response = False  # a request was sent and its response is not fully read
        self.head: tuple[int, bytes, list[tuple[bytes, bytes]]] | None = None
        self.keep_alive = True
        self.no_body = False  # the request was HEAD
        self.body_done = False
        self._buffer = b""
        self._body_kind = _Body.NONE
        self._remaining = 0  # bytes left in the body (LENGTH) or in the chunk (CHUNKED)
        self._chunk_state = _Chunk.SIZE
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        if not self.in_response or self.body_done:
            # Bytes nobody asked for: the connection cannot be trusted for another request.
            self._fail(httpx.RemoteProtocolError("the upstream sent data outside a response"))
            return
        try:
            if self.head is None:
                data = self._parse_head(self._buffer + data if self._buffer else data)
                if self.head is None:
                    return
            if data:
                self._parse_body(data)
        except httpx.RemoteProtocolError as exc:
            self._fail(exc)
            return
        if self._deliver is not None and self._waiter is not None and not self._waiter.done():
            # The body's reader waits in `deliver_body` (not cancelled, not timed out): the data
            # goes to it from here, and its task wakes only for the end.
            if self._chunks:
                try:
                    stop = self._deliver_context.run(self._deliver, self.take_body())  # type: ignore[union-attr]
                except Exception as exc:  # the reader's own failure (a malformed event): it raises it
                    self._deliver = None
                    self._wake(_raisable_in_a_task(exc))
                    return
                if stop:
                    self._deliver = None  # what follows is buffered, for the reader to drain
                    self._wake()
                    return
            if not self.body_done:
                return
        if self._buffered > PAUSE_READING_BYTES and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.in_response and not self.body_done:
            if self.head is not None and self._body_kind == _Body.UNTIL_CLOSE and exc is None:
                self.body_done = True  # a clean close ends such a body; a reset cuts it
            elif self._error is None:
                what = "a response" if self.head is None else "the complete response body"
                error = httpx.RemoteProtocolError(f"the upstream closed the connection without sending {what}")
                self._error = httpx.ReadError(str(exc)) if exc is not None else error
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(httpx.WriteError("the upstream closed the connection"))
        self._wake()
        self.pool._forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- parsing

    def _parse_head(self, data: bytes) -> bytes:
        """Take the status line and headers off `data`; what follows them is returned."""
        while True:
            end = data.find(b"\r\n\r\n")
            if end > MAX_HEAD_BYTES or (end < 0 and len(data) > MAX_HEAD_BYTES):
                raise httpx.RemoteProtocolError("the upstream's response headers are too large")
            if end < 0:
                self._buffer = data
                return b""
            lines = data[:end].split(b"\r\n")
            data = data[end + 4 :]
            status_line = lines[0].split(b" ", 2)
            if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1.") or not status_line[1].isdigit():
                raise httpx.RemoteProtocolError(f"the upstream sent a malformed status line: {lines[0][:100]!r}")
            status = int(status_line[1])
            if 100 <= status < 200:  # informational (100 Continue): the real head follows
                continue
            headers = []
            for line in lines[1:]:
                if line[:1] in (b" ", b"\t") and headers:  # obs-fold: RFC 9112 5.2, replaced by SP
                    name, value = headers[-1]
                    headers[-1] = (name, (value + b" " + line.strip()).strip())
                    continue
                name, sep, value = line.partition(b":")
                if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                    raise httpx.RemoteProtocolError(f"the upstream sent a malformed header line: {line[:100]!r}")
                headers.append((name, value.strip()))
            self._buffer = b""
            self._start_body(status, status_line[0] == b"HTTP/1.1", headers)
            self.head = (status, status_line[2] if len(status_line) > 2 else b"", headers)
            return data

    def _start_body(self, status: int, http11: bool, headers: list[tuple[bytes, bytes]]) -> None:
        lengths = set()
        chunked = False
        connection = b""
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                lengths.add(value)
            elif lower == b"transfer-encoding":
                if value.strip().lower() != b"chunked":  # gzip, chunked: nothing here would undo the gzip
                    raise httpx.RemoteProtocolError(f"the upstream used an unsupported transfer coding: {value[:100]!r}")
                chunked = True
            elif lower == b"connection":  # may come as several fields: their tokens add up
                connection += b"," + value.lower()
        self.keep_alive = (b"close" not in connection) if http11 else (b"keep-alive" in connection)
        if chunked and not http11:  # RFC 9112 6.1: faulty framing, close after the message
            self.keep_alive = False
        if self.no_body or status in _NO_BODY_STATUS:
            self._body_kind = _Body.NONE
        elif chunked:
            self._body_kind = _Body.CHUNKED
        elif lengths:
            if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
                raise httpx.RemoteProtocolError("the upstream sent an invalid Content-Length")
            self._body_kind = _Body.LENGTH
            self._remaining = int(lengths.pop())
        else:
            self._body_kind = _Body.UNTIL_CLOSE
            self.keep_alive = False
        if self._body_kind == _Body.NONE or (self._body_kind == _Body.LENGTH and self._remaining == 0):
            self.body_done = True

    def _parse_body(self, data: bytes) -> None:
        kind = self._body_kind
        if kind == _Body.CHUNKED:
            self._parse_chunked(self._buffer + data if self._buffer else data)
        elif kind == _Body.UNTIL_CLOSE:
            self._add(data)
        elif kind == _Body.LENGTH:
            if len(data) > self._remaining:
                raise httpx.RemoteProtocolError("the upstream sent more than its Content-Length")
            self._remaining -= len(data)
            self._add(data)
            self.body_done = self._remaining == 0
        else:
            raise httpx.RemoteProtocolError("the upstream sent a body where none was expected")

    def _parse_chunked(self, data: bytes) -> None:
        """Decode as much of a chunked body as `data` holds; keep any partial line for later."""
        pos, end = 0, len(data)
        while pos < end:
            state = self._chunk_state
            if state == _Chunk.DATA:
                take = min(self._remaining, end - pos)
                self._add(data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = _Chunk.DATA_END
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                if end - pos > MAX_CHUNK_LINE_BYTES:
                    raise httpx.RemoteProtocolError("the upstream sent a malformed chunked body")
                break
            line = data[pos:line_end]
            pos = line_end + 2
            if state == _Chunk.SIZE:
                size = line.split(b";", 1)[0].strip()
                if not size or size.translate(None, _HEX_DIGITS):
                    raise httpx.RemoteProtocolError(f"the upstream sent a malformed chunk size: {size[:20]!r}")
                self._remaining = int(size, 16)
                self._chunk_state = _Chunk.DATA if self._remaining else _Chunk.TRAILER
            elif state == _Chunk.DATA_END:
                if line:
                    raise httpx.RemoteProtocolError("the upstream sent a chunk longer than its size")
                self._chunk_state = _Chunk.SIZE
            elif not line:  # the blank line after the trailers ends the body
                self.body_done = True
                if pos < end:
                    raise httpx.RemoteProtocolError("the upstream sent data after the end of the body")
                break
        self._buffer = data[pos:] if pos < end else b""

    def _add(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)

    # -- waiting, with the read timeout

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self.keep_alive = False
        self.close()
        self._wake()

    def _wake(self, error: Exception | None = None) -> None:
        """Wake the waiting reader; with `error`, it raises that."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if waiter.done():
                pass
            elif error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def _wait(self) -> asyncio.Future[None]:
        """To await until data, the end, or an error arrives; it raises httpx.ReadTimeout after
        the read timeout of silence. A bare future, not a coroutine: the body's reader waits on
        one per delta, and an idle stream holds no frame for it."""
        waiter = self._waiter = self.loop.create_future()
        if self._read_timeout is not None and self._timer is None:
            self._timer = self.loop.call_at(self.last_activity + self._read_timeout, self._check_timeout)
        return waiter

    def _check_timeout(self) -> None:
        self._timer = None
        if self._waiter is None or self._waiter.done() or self._read_timeout is None:
            return  # nobody is waiting: the next wait arms the timer again
        deadline = self.last_activity + self._read_timeout
        if self.loop.time() >= deadline:
            self._waiter.set_exception(httpx.ReadTimeout(f"the upstream sent nothing for {self._read_timeout:g} s"))
        else:
            self._timer = self.loop.call_at(deadline, self._check_timeout)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # -- what the transport calls

    async def send_request(self, request: httpx.Request, write_timeout: float | None) -> None:
        assert self.transport is not None  # new, or reset when it went back to the pool
        self.requests += 1
        self.in_response = True
        self.no_body = request.method == "HEAD"
        self.last_activity = self.loop.time()
        target = request.url.raw_path
        lines = [request.method.encode(), b" ", target, b" HTTP/1.1\r\n"]
        chunked = False
        for name, value in request.headers.raw:
            lines += (name, b": ", value, b"\r\n")
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        lines.append(b"\r\n")
        self.transport.write(b"".join(lines))
        async for part in request.stream:  # type: ignore[union-attr]
            # In slices: over TLS, asyncio only pauses the writer once its own buffer fills, and
            # one large write goes straight to the socket transport's, so the write timeout
            # would never start. A slice written while the socket is backed up is what pauses it.
            for start in range(0, len(part), WRITE_SLICE_BYTES):
                piece = part[start : start + WRITE_SLICE_BYTES]
                self.transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                await self._drain(write_timeout)
        if chunked:
            self.transport.write(b"0\r\n\r\n")
        await self._drain(write_timeout)
        self.last_activity = self.loop.time()  # the read timeout counts from the end of the request

    async def _drain(self, timeout: float | None) -> None:
        self._raise_error()
        if self.closed:
            raise httpx.WriteError("the upstream closed the connection")
        if not self._write_paused:
            return
        self._drained = self.loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._drained
        except TimeoutError:
            raise httpx.WriteTimeout(f"the upstream did not take the request for {_seconds(timeout)}") from None
        finally:
            self._drained = None

    async def receive_head(self, read_timeout: float | None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self._read_timeout = read_timeout
        while self.head is None:
            self._raise_error()
            await self._wait()
        return self.head

    def take_body(self) -> bytes:
        """What arrived of the body since the last call (b"" if nothing)."""
        if not self._chunks:
            return b""
        chunks = self._chunks
        self._chunks = []
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def wait_body(self) -> asyncio.Future[None]:
        self._raise_error()
        return self._wait()

    async def deliver_body(self, on_chunk: Callable[[bytes], bool]) -> None:
        """Hand the body to `on_chunk` as it arrives, until it returns True or the body ends.

        While the reader's task waits here, `data_received` calls `on_chunk` itself (in the
        task's context, for its log lines): a chunk wakes no task, and the task waits once for
        the end. What arrives while the task is not waiting the task hands over itself."""
        context = contextvars.copy_context()
        while True:
            # No local keeps the chunk: an idle stream would hold its `response.created`,
            # which echoes the whole request.
            if self._chunks and on_chunk(self.take_body()):
                return
            if self.body_done:
                return
            self._raise_error()
            self._deliver, self._deliver_context = on_chunk, context
            try:
                await self._wait()
            finally:
                stopped = self._deliver is None
                self._deliver = self._deliver_context = None
            if stopped:
                return

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self._error is None and (self.body_done or not self.in_response)

    def peer_may_have_closed(self) -> bool:
        """Whether the socket holds something unread: on an idle connection, that is the
        server's close (or stray bytes) not yet seen by the event loop. Such a connection is
        not reused, since a request on it would fail and could not always be retried."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None or self.transport.is_closing():  # type: ignore[union-attr]
            return True
        poller = select.poll()  # not select.select: it cannot watch a descriptor above 1023
        try:
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        """Drop the connection now, with whatever it still had to send (nothing to wait for)."""
        if self.transport is not None and not self.closed:
            self.transport.abort()


class ResponseBody(httpx.AsyncByteStream):
    """The response body as it arrives; closing it gives the connection back (or closes it)."""

    def __init__(self, connection: Connection, pool: UpstreamTransport) -> None:
        self.connection = connection
        self.pool = pool
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self.connection
        while True:
            chunk = connection.take_body()
            if chunk:
                yield chunk
            elif connection.body_done:
                break
            else:
                await connection.wait_body()
        await self.aclose()

    def deliver(self, on_chunk: Callable[[bytes], bool]) -> Coroutine[Any, Any, None]:
        """The body to `on_chunk` as it arrives, until it returns True or the body ends
        (`Connection.deliver_body`); what is left is read with `async for`, which gives the
        connection back at the end. Not a coroutine around that one: an idle stream holds
        one frame fewer."""
        return self.connection.deliver_body(on_chunk)

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self.pool._release(self.connection)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """The connection pool: idle connections in a stack per origin, at most `max_connections` open."""

    def __init__(
        self,
        *,
        max_connections: int = 1000,
        max_idle_connections: int = 1000,
        keepalive_seconds: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_idle_connections = max_idle_connections
        self.keepalive_seconds = keepalive_seconds
        self.ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], deque[Connection]] = {}
        self._open = 0  # idle, in use, and connecting
        self.connections: set[Connection] = set()  # idle and in use
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._in_use: dict[tuple[str, str, int], int] = {}  # connections taken and not given back, per origin
        self._spares: dict[tuple[str, str, int], asyncio.Task[None]] = {}  # being opened ahead of need
        self._spare_failed_at = -SPARE_BACKOFF_SECONDS
        self._closed = False

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {url.scheme!r}")
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        connection = await self._acquire(origin, timeouts)
        try:
            try:
                await connection.send_request(request, timeouts.get("write"))
            except httpx.WriteError:
                if connection.head is None:
                    raise
                # The server answered before it took the whole request (a 413, say) and closed:
                # its answer is the one to give. The connection is not used again.
                connection.keep_alive = False
            status, reason, headers = await connection.receive_head(timeouts.get("read"))
        except BaseException:
            connection.close()
            self._release(connection)
            raise
        return httpx.Response(
            status,
            headers=headers,
            stream=ResponseBody(connection, self),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def _acquire(self, origin: tuple[str, str, int], timeouts: dict[str, float | None]) -> Connection:
        if self._closed:
            raise RuntimeError("the upstream transport is closed")
        while True:
            idle = self._idle.get(origin)
            now = time.monotonic()
            while idle:
                connection = idle.pop()  # the most recently used: the least likely to be closed by now
                connection.idle = False
                if (
                    connection.reusable
                    and now - connection.idle_since < self.keepalive_seconds
                    and not connection.peer_may_have_closed()
                ):
                    return self._taken(connection, timeouts)
                connection.close()
            if self._open < self.max_connections:
                return self._taken(await self._connect(origin, timeouts.get("connect")), timeouts)
            self._close_an_idle_connection()  # of another origin: its slot comes free when it is gone
            await self._wait_for_slot(timeouts.get("pool"))

    def _taken(self, connection: Connection, timeouts: dict[str, float | None]) -> Connection:
        origin = connection.origin
        in_use = self._in_use[origin] = self._in_use.get(origin, 0) + 1
        if in_use > 1 and not self._idle.get(origin):
            self._open_spare(origin, timeouts.get("connect"))
        return connection

    def _open_spare(self, origin: tuple[str, str, int], timeout: float | None) -> None:
        """The origin's requests at once just took its last idle connection: open one more in
        the background, for the next request. One at a time per origin, within `max_connections`,
        and none (to any origin: the service has one) for a while after one failed; the next
        request finds out for itself."""
        if (
            origin in self._spares
            or self._closed
            or self._open >= self.max_connections
            or time.monotonic() - self._spare_failed_at < SPARE_BACKOFF_SECONDS
        ):
            return
        self._spares[origin] = asyncio.get_running_loop().create_task(self._spare(origin, timeout))

    async def _spare(self, origin: tuple[str, str, int], timeout: float | None) -> None:
        try:
            if self._closed or self._open >= self.max_connections:  # a request took the last slot meanwhile
                return
            connection = await self._connect(origin, timeout)
        except Exception:  # httpx's ConnectError or ConnectTimeout
            self._spare_failed_at = time.monotonic()
            return
        finally:
            self._spares.pop(origin, None)
        self._keep(connection)

    async def _wait_for_slot(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._wake_slot_waiter()  # woken but not going to use it: pass the wakeup on
            if isinstance(exc, TimeoutError):
                raise httpx.PoolTimeout(f"no upstream connection became free in {_seconds(timeout)}") from None
            raise
        finally:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)

    def _free_slot(self) -> None:
        self._open -= 1
        self._wake_slot_waiter()

    def _wake_slot_waiter(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: tuple[str, str, int], timeout: float | None) -> Connection:
        """A new connection; it holds one of the `max_connections` slots until it is forgotten."""
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self.ssl_context is None:
                self.ssl_context = httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE: as httpx does
            tls = self.ssl_context
        made: list[Connection] = []

        def protocol() -> Connection:
            made.append(Connection(self, origin))
            return made[0]

        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    protocol, host, port, ssl=tls, server_hostname=host if tls else None, **_happy_eyeballs(loop, host)
                )
        except BaseException as exc:
            if made:
                made[0].close()
                self._forget(made[0])
            else:
                self._free_slot()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout(f"could not connect to {host}:{port} in {_seconds(timeout)}") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
                raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
            raise
        if made[0].closed:  # closed by the server before we could use it; its slot is free again
            raise httpx.ConnectError(f"{host}:{port} closed the connection as soon as it was made")
        self.connections.add(made[0])
        return made[0]

    def _close_an_idle_connection(self) -> None:
        for idle in self._idle.values():
            if idle:
                oldest = idle.popleft()
                oldest.idle = False
                oldest.close()
                return

    def _release(self, connection: Connection) -> None:
        """A response is done with its connection: keep it for the next request, or close it."""
        self._in_use[connection.origin] -= 1
        self._keep(connection)

    def _keep(self, connection: Connection) -> None:
        """Keep a connection no request uses for the next one, or close it."""
        if connection.reusable and not self._closed:  # reusable: its response was read to the end
            idle = self._idle.setdefault(connection.origin, deque())
            if len(idle) < self.max_idle_connections:
                now = time.monotonic()
                connection._reset()  # reading again if it was paused, no timer left
                connection.idle_since = now
                connection.idle = True
                idle.append(connection)
                while idle and now - idle[0].idle_since >= self.keepalive_seconds:
                    oldest = idle.popleft()  # kept too long
                    oldest.idle = False
                    oldest.close()
                self._wake_slot_waiter()  # one waiting for a connection can take this one
                return
        connection.close()  # connection_lost forgets it

    def _forget(self, connection: Connection) -> None:
        """The connection is gone (closed by either side): it leaves the pool and frees its slot."""
        if connection.forgotten:
            return
        connection.forgotten = True
        self.connections.discard(connection)
        if connection.idle:
            connection.idle = False
            self._idle[connection.origin].remove(connection)
        self._free_slot()

    async def aclose(self) -> None:
        self._closed = True
        for spare in self._spares.values():
            spare.cancel()  # one that had not started yet never runs its own clean-up
        self._spares.clear()
        for idle in self._idle.values():
            while idle:
                connection = idle.pop()
                connection.idle = False
                connection.close()

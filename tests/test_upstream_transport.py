"""Tests of the lean HTTP/1.1 transport (`UpstreamTransport`) against a scripted raw server.

Each test starts `ScriptedServer` on 127.0.0.1: for every request it reads the head (and the
body, by Content-Length or chunked), records what it got, then plays the next `Reply`: bytes to
write, with optional pauses between them, then keeps or closes the connection. The server counts
the TCP connections it accepted and the ones the client closed, so connection reuse and leaks
are seen from the other end of the socket, not only through the pool's own bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import gc
import json
import os
import random
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from assistant.responses_engine import Round
from assistant.upstream_transport import MAX_HEAD_BYTES, PAUSE_READING_BYTES, Connection, UpstreamTransport

# --------------------------------------------------------------------------------------------
# the scripted server

Write = bytes | float  # bytes to send, or seconds to wait before the next item


@dataclass
class Reply:
    """What the server does for one request: the writes, then keep or close the connection."""

    writes: Sequence[Write] = ()
    close: bool = False  # close the connection after the writes
    read_body: bool = True  # False: read the head only, then neither read nor write again (stalled)


@dataclass
class Received:
    """One request as the server read it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_body: bytes  # as on the wire (chunk framing included)
    connection: int  # which accepted connection (1, 2, ...) it came on

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class ScriptedServer:
    replies: deque[Reply]
    requests: list[Received] = field(default_factory=list)
    accepted: int = 0  # TCP connections accepted
    client_closed: int = 0  # connections on which the server read EOF where a request could start
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.client_closed += 1
                    return
                if not self.replies:  # more requests than the test scripted
                    return
                reply = self.replies.popleft()
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.append((name, value.strip()))
                received = Received(method, target, version, headers, b"", b"", number)
                self.requests.append(received)
                if not reply.read_body:
                    await asyncio.Future()  # stalled until the test ends
                if received.header("transfer-encoding") == "chunked":
                    received.body, received.raw_body = await _read_chunked(reader)
                elif received.header("content-length"):
                    length = int(received.header("content-length") or 0)
                    received.body = received.raw_body = await reader.readexactly(length)
                for item in reply.writes:
                    if isinstance(item, float):
                        await asyncio.sleep(item)
                    else:
                        writer.write(item)
                        await writer.drain()
                if reply.close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:  # the test is over (3.11's start_server logs a cancelled handler)
            return
        finally:
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    body, raw = b"", b""
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";", 1)[0], 16)
        if size == 0:
            while True:
                line = await reader.readuntil(b"\r\n")
                raw += line
                if line == b"\r\n":
                    return body, raw
        data = await reader.readexactly(size + 2)
        raw += data
        body += data[:-2]


@asynccontextmanager
async def serve(*replies: Reply) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(deque(replies))
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


def make_client(
    server: ScriptedServer | str, transport: UpstreamTransport, timeout: httpx.Timeout | None = None
) -> httpx.AsyncClient:
    url = server if isinstance(server, str) else server.url
    return httpx.AsyncClient(
        base_url=url, transport=transport, timeout=timeout or httpx.Timeout(5.0), trust_env=False
    )


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait (polling) until `condition()` holds; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def only_connection(transport: UpstreamTransport) -> Connection:
    assert len(transport.connections) == 1, transport.connections
    return next(iter(transport.connections))


def unused_port() -> int:
    """A loopback port nobody listens on (bound, then released, never listened on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# responses on the wire


def head(
    status: int = 200, headers: Sequence[tuple[str, str]] = (), reason: str = "OK", version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{version} {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def full(body: bytes = b"", status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    return head(status, [("Content-Length", str(len(body))), *headers]) + body


CHUNKED = [("Transfer-Encoding", "chunked")]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def chunked(*parts: bytes) -> bytes:
    return head(headers=CHUNKED) + b"".join(chunk(p) for p in parts) + b"0\r\n\r\n"


@dataclass
class Encoded:
    wire: bytes
    size_lines: list[tuple[int, int]]  # [start, end) of each chunk-size line (extension included)
    crlfs: list[int]  # index of every CR of a CRLF
    trailers: tuple[int, int]  # [start, end) of the trailer section (its lines, then the final CRLF)


def encode_chunked(rng: random.Random, parts: list[bytes]) -> Encoded:
    """A whole chunked response: random chunk extensions, upper/lower hex, 0-2 trailers."""
    out = bytearray(head(headers=[("Content-Type", "text/event-stream"), *CHUNKED]))
    size_lines = []
    for part in parts:
        size = f"{len(part):x}" if rng.random() < 0.5 else f"{len(part):X}"
        line = size + (";ext=1" if rng.random() < 0.3 else "")
        size_lines.append((len(out), len(out) + len(line)))
        out += line.encode() + b"\r\n" + part + b"\r\n"
    out += b"0\r\n"
    start = len(out)
    for i in range(rng.randint(0, 2)):
        out += f"X-Trailer-{i}: value {i}\r\n".encode()
    out += b"\r\n"
    wire = bytes(out)
    body_start = wire.index(b"\r\n\r\n") + 4
    crlfs = [i for i in range(body_start, len(wire) - 1) if wire[i : i + 2] == b"\r\n"]
    return Encoded(wire, size_lines, crlfs, (start, len(wire)))


def split_writes(data: bytes, points: set[int], pause: float) -> list[Write]:
    cuts = sorted(p for p in points if 0 < p < len(data))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    writes: list[Write] = []
    for piece in pieces:
        if writes:
            writes.append(pause)
        writes.append(piece)
    assert b"".join(w for w in writes if isinstance(w, bytes)) == data
    return writes


async def slow_body(parts: Sequence[bytes], pause: float) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(pause)
        yield part


# --------------------------------------------------------------------------------------------
# 1. chunked bodies, however they are cut


@pytest.mark.anyio
async def test_chunked_body_survives_random_split_points() -> None:
    """A chunked body cut at random points (inside size lines, CRLFs and trailers) decodes to the original bytes."""
    rng = random.Random(1234)
    trials = []
    for _ in range(50):
        parts = [rng.randbytes(rng.randint(1, 300)) for _ in range(rng.randint(1, 6))]
        encoded = encode_chunked(rng, parts)
        points = set(rng.sample(range(1, len(encoded.wire)), rng.randint(1, 8)))
        start, end = rng.choice(encoded.size_lines)
        points.add(rng.randint(start + 1, end - 1) if end - start > 1 else start)  # inside a size line
        points.add(rng.choice(encoded.crlfs) + 1)  # between a CR and its LF
        points.add(rng.randint(*encoded.trailers))  # in (or at the start of) the trailers
        trials.append((b"".join(parts), split_writes(encoded.wire, points, 0.001)))

    async with serve(*(Reply(writes) for _, writes in trials)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            for expected, _ in trials:
                response = await client.get("/stream")
                assert response.status_code == 200
                assert response.content == expected
                assert "x-trailer-0" not in response.headers
            connection = only_connection(transport)
            assert connection.requests == 50
    assert server.accepted == 1  # each body ended exactly where it should: the connection stayed usable


@pytest.mark.anyio
async def test_chunked_body_one_byte_per_write() -> None:
    """A chunked response written one byte at a time (head, size lines, extensions, trailers) decodes correctly."""
    parts = [b"data: one\n\n", bytes(range(256)) * 2, b"x"]
    wire = (
        head(headers=CHUNKED)
        + b"".join(b"%X;name=\"v\"\r\n%b\r\n" % (len(p), p) for p in parts)
        + b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    async with serve(Reply(split_writes(wire, set(range(len(wire))), 0.0002)), Reply([full(b"next")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            chunks = []
            async with client.stream("GET", "/") as response:
                async for piece in response.aiter_bytes():
                    chunks.append(piece)
            assert b"".join(chunks) == b"".join(parts)
            assert len(chunks) > 10  # delivered as it arrived, not all at the end
            assert (await client.get("/")).content == b"next"
    assert server.accepted == 1


# --------------------------------------------------------------------------------------------
# 2. Content-Length, empty and bodiless responses


@pytest.mark.anyio
async def test_content_length_body_split_across_writes() -> None:
    """A Content-Length body written in pieces is read whole, and the connection is reused afterwards."""
    body = random.Random(7).randbytes(5000)
    wire = full(body)
    cut = wire.index(b"\r\n\r\n") + 4
    pieces = [wire[:10], wire[10 : cut + 3], wire[cut + 3 : cut + 2000], wire[cut + 2000 :]]  # cut in the head too
    writes: list[Write] = [pieces[0], 0.005, pieces[1], 0.005, pieces[2], 0.005, pieces[3]]
    async with serve(Reply(writes), Reply([full(b"second")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            response = await client.get("/a")
            assert response.content == body
            assert response.headers["content-length"] == "5000"
            assert (await client.get("/b")).content == b"second"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_zero_length_body() -> None:
    """Content-Length: 0 gives an empty body at once and leaves the connection reusable."""
    async with serve(Reply([full(b"")]), Reply([full(b"after")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with anyio.fail_after(1):
                response = await client.get("/")
            assert response.status_code == 200
            assert response.content == b""
            assert transport.idle_connections == 1
            assert (await client.get("/")).content == b"after"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_204_304_and_head_have_no_body() -> None:
    """204, 304 and a HEAD response end at their head, even with length headers, and the connection stays in sync."""
    replies = [
        Reply([head(204, [("Content-Length", "11")], reason="No Content")]),
        Reply([head(304, [("Transfer-Encoding", "chunked")], reason="Not Modified")]),
        Reply([head(200, [("Content-Length", "11")])]),  # the answer to HEAD: the length of the GET body
        Reply([head(200, CHUNKED)]),
        Reply([full(b"hello world")]),
    ]
    async with serve(*replies) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with anyio.fail_after(2):
                no_content = await client.delete("/item")
                not_modified = await client.get("/item")
                head_response = await client.head("/item")
                head_chunked = await client.head("/item")
                after = await client.get("/item")
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert (not_modified.status_code, not_modified.content) == (304, b"")
    assert (head_response.status_code, head_response.content) == (200, b"")
    assert head_response.headers["content-length"] == "11"
    assert (head_chunked.status_code, head_chunked.content) == (200, b"")
    assert after.content == b"hello world"
    assert [r.method for r in server.requests] == ["DELETE", "GET", "HEAD", "HEAD", "GET"]
    assert server.accepted == 1


# --------------------------------------------------------------------------------------------
# 3. a body delimited by the connection's close


@pytest.mark.anyio
async def test_body_until_close_is_read_fully_and_not_reused() -> None:
    """Without Content-Length or chunked, the body runs to the server's close, and that connection is never reused."""
    replies = [
        Reply(
            [head(headers=[("Content-Type", "text/plain")]), b"part one, ", 0.01, b"part two", 0.01, b"."],
            close=True,
        ),
        Reply([full(b"fresh")]),
    ]
    async with serve(*replies) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            response = await client.get("/")
            assert response.content == b"part one, part two."
            assert transport.connections == set()
            assert transport.idle_connections == 0
            assert (await client.get("/")).content == b"fresh"
    assert server.accepted == 2


@pytest.mark.anyio
async def test_http10_response_keep_alive_only_when_asked() -> None:
    """An HTTP/1.0 response keeps the connection only with `Connection: keep-alive`."""
    http10 = head(headers=[("Content-Length", "2")], version="HTTP/1.0") + b"10"
    http10_keep = head(headers=[("Content-Length", "2"), ("Connection", "Keep-Alive")], version="HTTP/1.0") + b"ka"
    async with serve(Reply([http10]), Reply([http10_keep]), Reply([full(b"ok")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"10"
            await until(lambda: not transport.connections)
            assert (await client.get("/")).content == b"ka"
            assert transport.idle_connections == 1
            assert (await client.get("/")).content == b"ok"
    assert [r.connection for r in server.requests] == [1, 2, 2]


# --------------------------------------------------------------------------------------------
# 4. keep-alive


@pytest.mark.anyio
async def test_keep_alive_reuses_one_connection() -> None:
    """Two sequential requests travel on one TCP connection, and the pool's counters say so."""
    async with serve(Reply([full(b"one")]), Reply([chunked(b"two")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert transport.connections == set()
            assert (await client.get("/1")).content == b"one"
            connection = only_connection(transport)
            assert connection.requests == 1
            assert transport.idle_connections == 1
            assert connection.idle
            assert (await client.get("/2")).content == b"two"
            assert only_connection(transport) is connection
            assert connection.requests == 2
            assert transport.idle_connections == 1
    assert server.accepted == 1
    assert [r.connection for r in server.requests] == [1, 1]


@pytest.mark.anyio
async def test_connection_close_response_is_not_reused() -> None:
    """A `Connection: close` response closes its connection; the next request opens a new one."""
    async with serve(Reply([full(b"bye", headers=[("Connection", "close")])]), Reply([full(b"hi")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"bye"
            assert transport.idle_connections == 0
            await until(lambda: not transport.connections)
            await until(lambda: server.client_closed == 1)  # the client closed it: the server did not
            assert (await client.get("/")).content == b"hi"
            assert only_connection(transport).requests == 1
    assert server.accepted == 2


@pytest.mark.anyio
async def test_idle_connections_form_a_stack() -> None:
    """Of two idle connections, the next request takes the one given back last."""
    async with serve(Reply([full(b"a")]), Reply([full(b"b")]), Reply([full(b"c")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            first = await client.send(client.build_request("GET", "/a"), stream=True)
            second = await client.send(client.build_request("GET", "/b"), stream=True)
            assert len(transport.connections) == 2
            await second.aread()  # given back first
            await first.aread()  # given back last
            assert transport.idle_connections == 2
            await client.get("/c")
    assert [(r.target, r.connection) for r in server.requests] == [("/a", 1), ("/b", 2), ("/c", 1)]


@pytest.mark.anyio
async def test_keepalive_expiry_opens_a_new_connection() -> None:
    """An idle connection older than `keepalive_seconds` is closed, not reused."""
    async with serve(Reply([full(b"1")]), Reply([full(b"2")])) as server:
        transport = UpstreamTransport(keepalive_seconds=0.1)
        async with make_client(server, transport) as client:
            await client.get("/")
            await asyncio.sleep(0.15)
            await client.get("/")
            await until(lambda: server.client_closed == 1)
    assert server.accepted == 2


@pytest.mark.anyio
async def test_max_idle_connections_zero_closes_after_each_response() -> None:
    """With `max_idle_connections=0` no connection is kept once its response is read."""
    async with serve(Reply([full(b"1")]), Reply([full(b"2")])) as server:
        transport = UpstreamTransport(max_idle_connections=0)
        async with make_client(server, transport) as client:
            await client.get("/")
            assert transport.idle_connections == 0
            await until(lambda: not transport.connections)
            await client.get("/")
    assert server.accepted == 2


@pytest.mark.anyio
async def test_transport_aclose_closes_idle_connections() -> None:
    """Closing the client closes the pool's idle connections (the server sees them go)."""
    async with serve(Reply([full(b"1")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            await client.get("/")
            assert transport.idle_connections == 1
        await until(lambda: server.client_closed == 1)
        assert transport.idle_connections == 0
        assert transport.connections == set()
        with pytest.raises(RuntimeError):
            await transport.handle_async_request(httpx.Request("GET", server.url))


# --------------------------------------------------------------------------------------------
# 5. the server closes an idle connection


@pytest.mark.anyio
async def test_idle_connection_closed_by_server_leaves_pool_at_once() -> None:
    """A pooled connection the server closes leaves the pool at once (no request needed); the next opens another."""
    async with serve(Reply([full(b"first"), 0.05], close=True), Reply([full(b"second")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"first"
            assert transport.idle_connections == 1
            await until(lambda: transport.idle_connections == 0, timeout=1.0)
            assert transport.connections == set()
            assert (await client.get("/")).content == b"second"
            assert transport.idle_connections == 1
    assert server.accepted == 2


@pytest.mark.anyio
async def test_idle_connection_receiving_stray_bytes_is_dropped() -> None:
    """Bytes arriving on an idle connection (outside any response) make the pool drop it."""
    async with serve(Reply([full(b"first"), 0.05, b"HTTP/1.1 200 OK\r\n"]), Reply([full(b"second")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"first"
            await until(lambda: not transport.connections, timeout=1.0)
            assert (await client.get("/")).content == b"second"
    assert server.accepted == 2


# --------------------------------------------------------------------------------------------
# 6. what is sent


@pytest.mark.anyio
async def test_request_line_headers_and_json_body() -> None:
    """The request goes out with its method, path and query, Host, custom headers, and a JSON body with its length."""
    payload = {"model": "gpt", "messages": [{"role": "user", "content": "héllo"}]}
    async with serve(Reply([full(b"{}", headers=[("Content-Type", "application/json")])])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            response = await client.post(
                "/v1/chat/completions", params={"a": "1", "b": "x y"}, json=payload, headers={"X-Custom": "yes"}
            )
            assert response.json() == {}
    [request] = server.requests
    assert request.method == "POST"
    assert request.target == "/v1/chat/completions?a=1&b=x+y"
    assert request.version == "HTTP/1.1"
    assert request.header("host") == f"127.0.0.1:{server.port}"
    assert request.header("x-custom") == "yes"
    assert request.header("content-type") == "application/json"
    assert request.header("content-length") == str(len(request.body))
    assert request.header("transfer-encoding") is None
    assert json.loads(request.body) == payload


@pytest.mark.anyio
async def test_streaming_request_body_is_sent_chunked() -> None:
    """A request body from an async iterator goes out chunked (empty parts skipped, terminated by a zero chunk)."""

    async def parts() -> AsyncIterator[bytes]:
        yield b"alpha"
        yield b""
        await asyncio.sleep(0.01)
        yield b"beta" * 10

    async with serve(Reply([full(b"got it")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            response = await client.post("/upload", content=parts())
            assert response.content == b"got it"
    [request] = server.requests
    assert request.header("transfer-encoding") == "chunked"
    assert request.header("content-length") is None
    assert request.body == b"alpha" + b"beta" * 10
    assert request.raw_body == b"5\r\nalpha\r\n28\r\n" + b"beta" * 10 + b"\r\n0\r\n\r\n"


# --------------------------------------------------------------------------------------------
# 7. errors


@pytest.mark.anyio
async def test_server_closes_mid_chunked_body() -> None:
    """A close mid chunked body raises RemoteProtocolError while iterating, after the bytes that did arrive."""
    writes: list[Write] = [head(headers=CHUNKED) + chunk(b"hello"), 0.02, b"5\r\nwor"]
    async with serve(Reply(writes, close=True)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            got = b""
            async with client.stream("GET", "/") as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    async for piece in response.aiter_bytes():
                        got += piece
            assert got == b"hellowor"
            assert transport.connections == set()


@pytest.mark.anyio
async def test_server_closes_mid_content_length_body() -> None:
    """A close before Content-Length bytes arrived raises RemoteProtocolError."""
    async with serve(Reply([head(headers=[("Content-Length", "10")]) + b"12345"], close=True)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")
            assert transport.connections == set()


@pytest.mark.anyio
async def test_server_closes_before_any_response() -> None:
    """A server closing without answering makes the request raise RemoteProtocolError; the slot is free again."""
    async with serve(Reply([], close=True), Reply([full(b"ok")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(2.0, pool=0.5)) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")
            assert transport.connections == set()
            assert (await client.get("/")).content == b"ok"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 OK", b"HTTP/1.1 2x0 OK", b"HTTP/2 200 OK", b"ICY 200 OK", b"garbage", b""],
)
async def test_malformed_status_line(status_line: bytes) -> None:
    """A response whose status line is not `HTTP/1.x <digits> ...` raises RemoteProtocolError."""
    async with serve(Reply([status_line + b"\r\nContent-Length: 0\r\n\r\n"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")
            await until(lambda: not transport.connections)


@pytest.mark.anyio
@pytest.mark.parametrize("line", [b"NoColon", b"Name : space before colon", b" folded: continuation", b": no name"])
async def test_malformed_header_line(line: bytes) -> None:
    """A header line without a name and colon, or with space before the colon, raises RemoteProtocolError;
    so does a line folded onto Content-Length (an obs-fold is joined with a space: `0 folded: ...` is no length)."""
    async with serve(Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + line + b"\r\n\r\n"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


@pytest.mark.anyio
@pytest.mark.parametrize("lengths", [["abc"], ["-1"], ["+3"], ["3", "4"], ["3, 3"]])
async def test_invalid_content_length(lengths: list[str]) -> None:
    """A non-numeric, signed or conflicting Content-Length raises RemoteProtocolError."""
    async with serve(Reply([head(headers=[("Content-Length", v) for v in lengths]) + b"abc"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


@pytest.mark.anyio
async def test_more_than_content_length_is_an_error() -> None:
    """Bytes past the Content-Length in the same read raise RemoteProtocolError (the connection cannot be in sync)."""
    async with serve(Reply([head(headers=[("Content-Length", "3")]) + b"hello"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")
            await until(lambda: not transport.connections)


@pytest.mark.anyio
@pytest.mark.parametrize("size_line", [b"zz", b"-1", b"+5", b"", b"5 5", b"\xff"])
async def test_bad_chunk_size(size_line: bytes) -> None:
    """A chunk-size line that is not hexadecimal raises RemoteProtocolError while reading the body."""
    writes: list[Write] = [head(headers=CHUNKED) + chunk(b"ok"), 0.01, size_line + b"\r\nhello\r\n0\r\n\r\n"]
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            got = b""
            async with client.stream("GET", "/") as response:
                with pytest.raises(httpx.RemoteProtocolError):
                    async for piece in response.aiter_bytes():
                        got += piece
            assert got == b"ok"
            await until(lambda: not transport.connections)


@pytest.mark.anyio
async def test_chunk_longer_than_its_size() -> None:
    """Chunk data running past its declared size raises RemoteProtocolError."""
    async with serve(Reply([head(headers=CHUNKED) + b"3\r\nhello\r\n0\r\n\r\n"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


@pytest.mark.anyio
async def test_chunk_size_line_too_long() -> None:
    """A chunk-size line (extensions included) with no end in sight past 4 KiB raises RemoteProtocolError."""
    writes: list[Write] = [head(headers=CHUNKED) + b"5;" + b"x" * 3000, 0.01, b"y" * 3000]
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with anyio.fail_after(2), pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


@pytest.mark.anyio
async def test_data_after_chunked_end_drops_the_connection() -> None:
    """Bytes after the end of a chunked body (same read): the body is returned whole, the connection is not reused."""
    async with serve(Reply([head(headers=CHUNKED) + b"2\r\nok\r\n0\r\n\r\nEXTRA"]), Reply([full(b"next")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"ok"
            assert transport.idle_connections == 0
            await until(lambda: not transport.connections)
            assert (await client.get("/")).content == b"next"
    assert server.accepted == 2


@pytest.mark.anyio
async def test_too_large_headers() -> None:
    """A response head growing past MAX_HEAD_BYTES without ending raises RemoteProtocolError (not an endless buffer)."""
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    writes: list[Write] = [b"HTTP/1.1 200 OK\r\n" + line * 40, 0.01, line * 40]  # ~80 KB, never terminated
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with anyio.fail_after(2), pytest.raises(httpx.RemoteProtocolError, match="too large"):
                await client.get("/")
            await until(lambda: not transport.connections)


@pytest.mark.anyio
async def test_connection_refused_is_connect_error() -> None:
    """Connecting to a port nobody listens on raises httpx.ConnectError and holds no slot."""
    transport = UpstreamTransport(max_connections=1)
    async with make_client(f"http://127.0.0.1:{unused_port()}", transport, httpx.Timeout(2.0, pool=0.2)) as client:
        for _ in range(3):  # with max_connections=1, a leaked slot would make the second a PoolTimeout
            with pytest.raises(httpx.ConnectError):
                await client.get("/")
        assert transport.connections == set()


@pytest.mark.anyio
async def test_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that does not finish within the connect timeout raises httpx.ConnectTimeout and frees its slot."""
    loop = asyncio.get_running_loop()
    real_create_connection = loop.create_connection

    async def never_connects(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Future()

    async with serve(Reply([full(b"ok")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(2.0, connect=0.1, pool=0.2)) as client:
            monkeypatch.setattr(loop, "create_connection", never_connects)
            started = time.monotonic()
            with pytest.raises(httpx.ConnectTimeout):
                await client.get("/")
            assert time.monotonic() - started < 1.0
            monkeypatch.setattr(loop, "create_connection", real_create_connection)
            assert (await client.get("/")).content == b"ok"


@pytest.mark.anyio
async def test_unsupported_scheme() -> None:
    """A URL scheme other than http/https raises httpx.UnsupportedProtocol."""
    with pytest.raises(httpx.UnsupportedProtocol):
        await UpstreamTransport().handle_async_request(httpx.Request("GET", "ws://127.0.0.1:1/"))


# --------------------------------------------------------------------------------------------
# 8. read timeout


@pytest.mark.anyio
async def test_read_timeout_after_silence_mid_body() -> None:
    """Head and one chunk, then silence: httpx.ReadTimeout about `read` seconds after the last bytes."""
    async with serve(Reply([head(headers=CHUNKED) + chunk(b"first")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=0.3)) as client:
            async with client.stream("GET", "/") as response:
                iterator = response.aiter_bytes()
                assert await iterator.__anext__() == b"first"
                started = time.monotonic()
                with pytest.raises(httpx.ReadTimeout):
                    await iterator.__anext__()
                elapsed = time.monotonic() - started
                await iterator.aclose()
            assert 0.2 <= elapsed < 0.6, elapsed
            await until(lambda: not transport.connections)
            await until(lambda: server.client_closed == 1)


@pytest.mark.anyio
async def test_read_timeout_waiting_for_the_head() -> None:
    """A server that reads the request and never answers makes the request raise httpx.ReadTimeout."""
    async with serve(Reply([])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=0.2)) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await client.get("/")
            assert 0.15 <= time.monotonic() - started < 0.6
            await until(lambda: not transport.connections)


@pytest.mark.anyio
async def test_read_timeout_is_per_silence_not_total() -> None:
    """A chunk every 0.1 s for 1 s under a 0.3 s read timeout completes: the timeout bounds silences, not the total."""
    writes: list[Write] = [head(headers=CHUNKED)]
    for i in range(10):
        writes += [0.1, chunk(b"tick %d\n" % i)]
    writes.append(b"0\r\n\r\n")
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=0.3)) as client:
            started = time.monotonic()
            response = await client.get("/")
            assert time.monotonic() - started >= 0.9
            assert response.content == b"".join(b"tick %d\n" % i for i in range(10))


# --------------------------------------------------------------------------------------------
# 9. pool limits


@pytest.mark.anyio
async def test_max_connections_makes_second_request_wait() -> None:
    """With max_connections=1 a second request waits until the first response is closed, then reuses its connection."""
    async with serve(Reply([full(b"first")]), Reply([full(b"second")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport) as client:
            first = await client.send(client.build_request("GET", "/first"), stream=True)
            second = asyncio.create_task(client.get("/second"))
            await asyncio.sleep(0.1)
            assert not second.done()
            assert len(server.requests) == 1
            assert await first.aread() == b"first"  # reading to the end gives the connection back
            with anyio.fail_after(1):
                assert (await second).content == b"second"
    assert server.accepted == 1
    assert [r.target for r in server.requests] == ["/first", "/second"]


@pytest.mark.anyio
async def test_pool_timeout_while_connection_held() -> None:
    """With the only connection held open, another request raises httpx.PoolTimeout after the pool timeout."""
    async with serve(Reply([head(headers=CHUNKED) + chunk(b"x")]), Reply([full(b"later")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, pool=0.2)) as client:
            async with client.stream("GET", "/held"):
                started = time.monotonic()
                with pytest.raises(httpx.PoolTimeout):
                    await client.get("/waiting")
                assert 0.15 <= time.monotonic() - started < 0.6
            assert (await client.get("/after")).content == b"later"  # closing the held response freed the slot
    assert [r.target for r in server.requests] == ["/held", "/after"]


@pytest.mark.anyio
async def test_response_closed_early_closes_connection_and_frees_slot() -> None:
    """Closing a response mid-body closes its connection (never reused) and frees its slot for the next request."""
    writes: list[Write] = [head(headers=[("Content-Length", "100")]) + b"0123456789"]
    async with serve(Reply(writes), Reply([full(b"next")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, pool=0.5)) as client:
            response = await client.send(client.build_request("GET", "/"), stream=True)
            iterator = response.aiter_bytes()
            assert await iterator.__anext__() == b"0123456789"
            await iterator.aclose()
            connection = only_connection(transport)
            await response.aclose()
            assert transport.idle_connections == 0
            await until(lambda: server.client_closed == 1)
            assert transport.connections == set()
            assert connection.closed
            assert (await client.get("/")).content == b"next"
            assert only_connection(transport) is not connection
            assert transport.idle_connections == 1
    assert server.accepted == 2


@pytest.mark.anyio
async def test_waiter_gets_the_slot_of_a_closed_connection() -> None:
    """A request waiting for a slot proceeds (on a new connection) when the holder's response is closed mid-body."""
    async with serve(Reply([head(headers=CHUNKED) + chunk(b"x")]), Reply([full(b"second")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, pool=2.0)) as client:
            first = await client.send(client.build_request("GET", "/"), stream=True)
            second = asyncio.create_task(client.get("/"))
            await asyncio.sleep(0.05)
            assert not second.done()
            await first.aclose()
            with anyio.fail_after(1):
                assert (await second).content == b"second"
    assert server.accepted == 2


# --------------------------------------------------------------------------------------------
# 10. cancellation


@pytest.mark.anyio
async def test_cancel_while_reading_body_frees_slot_and_closes_connection() -> None:
    """Cancelling a task blocked on the body closes the connection and frees its slot: nothing leaks."""
    async with serve(Reply([head(headers=CHUNKED) + chunk(b"hello")]), Reply([full(b"next")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(None, pool=0.5)) as client:
            got = []
            with anyio.move_on_after(0.2) as scope:
                async with client.stream("GET", "/") as response:
                    async for piece in response.aiter_bytes():
                        got.append(piece)
            assert scope.cancelled_caught
            assert got == [b"hello"]
            await until(lambda: server.client_closed == 1)
            assert transport.connections == set()
            assert transport.idle_connections == 0
            assert (await client.get("/")).content == b"next"
    assert server.accepted == 2


@pytest.mark.anyio
async def test_cancel_while_waiting_for_head_frees_slot() -> None:
    """Cancelling a request still waiting for its response head closes the connection and frees its slot."""
    async with serve(Reply([]), Reply([full(b"next")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(None, pool=0.5)) as client:
            with anyio.move_on_after(0.1) as scope:
                await client.get("/")
            assert scope.cancelled_caught
            await until(lambda: server.client_closed == 1)
            assert transport.connections == set()
            assert (await client.get("/")).content == b"next"


@pytest.mark.anyio
async def test_cancel_while_waiting_for_slot() -> None:
    """Cancelling a request waiting for a slot leaves the pool consistent: the next waiter still gets the connection."""
    async with serve(Reply([full(b"a")]), Reply([full(b"c")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, pool=1.0)) as client:
            first = await client.send(client.build_request("GET", "/a"), stream=True)
            cancelled = asyncio.create_task(client.get("/b"))
            await asyncio.sleep(0.02)
            third = asyncio.create_task(client.get("/c"))
            await asyncio.sleep(0.02)
            cancelled.cancel()
            await asyncio.sleep(0.02)
            await first.aread()
            with anyio.fail_after(1):
                assert (await third).content == b"c"
            assert cancelled.cancelled()
    assert [r.target for r in server.requests] == ["/a", "/c"]


# --------------------------------------------------------------------------------------------
# 11. informational responses


@pytest.mark.anyio
async def test_informational_responses_are_skipped() -> None:
    """1xx heads (100 Continue, 103 Early Hints), whole or cut, are skipped; the real head and body follow."""
    final = full(b"done", headers=[("X-Final", "1")])
    early_hints = b"\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    replies = [
        Reply([b"HTTP/1.1 100 Continue\r\n\r\n" + final]),
        Reply([b"HTTP/1.1 100 Cont", 0.01, b"inue\r\n\r", 0.01, early_hints, 0.01, final]),  # cut mid-line and mid-CRLF
    ]
    async with serve(*replies) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            for _ in replies:
                response = await client.post("/", content=b"body")
                assert response.status_code == 200
                assert response.content == b"done"
                assert response.headers["x-final"] == "1"
                assert "link" not in response.headers
    assert server.accepted == 1


# --------------------------------------------------------------------------------------------
# edge cases that were bugs once: each test states the intended behaviour


@pytest.mark.anyio
async def test_slow_request_upload_does_not_count_as_read_silence() -> None:
    """Time spent uploading a streamed request body does not count against the read timeout."""
    async with serve(Reply([full(b"ok")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=0.2)) as client:
            response = await client.post("/", content=slow_body([b"a", b"b", b"c"], 0.12))
            assert response.content == b"ok"


@pytest.mark.anyio
async def test_shorter_read_timeout_on_reused_connection() -> None:
    """A short read timeout is honoured on a reused connection whose previous request had a long one."""
    async with serve(Reply([0.02, full(b"first")]), Reply([head(headers=CHUNKED)])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=3.0)) as client:
            assert (await client.get("/")).content == b"first"  # waited for the head: a 3 s timer is armed
            with anyio.fail_after(1.0), pytest.raises(httpx.ReadTimeout):
                await client.get("/", timeout=httpx.Timeout(5.0, read=0.2))


@pytest.mark.anyio
async def test_cancelled_woken_waiter_passes_the_slot_on() -> None:
    """If the waiter chosen for a freed connection is cancelled before it runs, the next waiter gets the connection."""
    async with serve(Reply([full(b"a")]), Reply([full(b"c")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, pool=0.5)) as client:
            first = await client.send(client.build_request("GET", "/a"), stream=True)
            woken = asyncio.create_task(client.get("/b"))
            await asyncio.sleep(0.02)
            other = asyncio.create_task(client.get("/c"))
            await asyncio.sleep(0.02)
            await first.aread()  # gives the connection back and resolves `woken`'s waiter, synchronously
            woken.cancel()  # ... which is cancelled before it gets to run
            with pytest.raises(asyncio.CancelledError):
                await woken
            assert (await other).content == b"c"


@pytest.mark.anyio
async def test_idle_connection_to_other_origin_makes_room() -> None:
    """With max_connections=1 and the only connection idle for origin A, a request to origin B still goes through."""
    async with serve(Reply([full(b"from a")])) as server_a, serve(Reply([full(b"from b")])) as server_b:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server_a, transport, httpx.Timeout(5.0, pool=0.3)) as client:
            assert (await client.get(server_a.url)).content == b"from a"
            assert transport.idle_connections == 1
            assert (await client.get(server_b.url)).content == b"from b"


@pytest.mark.anyio
async def test_write_timeout_frees_the_connection() -> None:
    """After a WriteTimeout (the server stopped reading) the connection is dropped and its slot freed."""
    async with serve(Reply([], read_body=False)) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport, httpx.Timeout(5.0, write=0.2)) as client:
            with pytest.raises(httpx.WriteTimeout):
                await client.post("/upload", content=b"x" * (32 * 1024 * 1024))
            await until(lambda: not transport.connections, timeout=0.5)


@pytest.mark.anyio
async def test_connection_paused_for_backpressure_is_resumed_before_reuse() -> None:
    """A response closed unread after a large body paused reading does not leave its pooled connection deaf."""
    size = PAUSE_READING_BYTES + 64
    body = b"b" * size
    writes: list[Write] = [head(headers=[("Content-Length", str(size))]) + body[:-128], 0.05, body[-128:]]
    async with serve(Reply(writes), Reply([full(b"second")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport, httpx.Timeout(5.0, read=0.5)) as client:
            response = await client.send(client.build_request("GET", "/big"), stream=True)
            connection = only_connection(transport)
            await until(lambda: connection.body_done)
            await response.aclose()  # the whole body arrived: the connection is kept
            assert transport.idle_connections == 1
            assert (await client.get("/")).content == b"second"


@pytest.mark.anyio
async def test_keepalive_zero_closes_instead_of_crashing() -> None:
    """keepalive_seconds=0 means no idle connection is kept; responses still read normally."""
    async with serve(Reply([full(b"1")]), Reply([full(b"2")])) as server:
        transport = UpstreamTransport(keepalive_seconds=0)
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"1"
            assert (await client.get("/")).content == b"2"


@pytest.mark.anyio
async def test_os_connect_timeout_without_configured_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel connect timeout (ETIMEDOUT) raises an httpx connect error even when no connect timeout is set."""
    loop = asyncio.get_running_loop()

    async def times_out(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ETIMEDOUT, "Connection timed out")  # what the kernel gives after its SYN retries

    monkeypatch.setattr(loop, "create_connection", times_out)
    transport = UpstreamTransport()
    async with make_client(f"http://127.0.0.1:{unused_port()}", transport, httpx.Timeout(None)) as client:
        with pytest.raises((httpx.ConnectTimeout, httpx.ConnectError)):
            await client.get("/")


@pytest.mark.anyio
async def test_head_over_the_limit_is_rejected_even_when_complete() -> None:
    """A response head bigger than MAX_HEAD_BYTES is rejected however it is cut into reads."""
    filler = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    first = b"HTTP/1.1 200 OK\r\n" + filler * (MAX_HEAD_BYTES // len(filler) - 2)  # under the limit
    assert len(first) < MAX_HEAD_BYTES
    writes: list[Write] = [first, 0.02, filler * 8 + b"Content-Length: 0\r\n\r\n"]  # ~72 KiB in all
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


@pytest.mark.anyio
@pytest.mark.parametrize("size_line", [b"0x5", b"0_5"])
async def test_chunk_size_must_be_plain_hex(size_line: bytes) -> None:
    """A chunk size with a 0x prefix or an underscore is rejected as malformed."""
    async with serve(Reply([head(headers=CHUNKED) + size_line + b"\r\nhello\r\n0\r\n\r\n"])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/")


# --------------------------------------------------------------------------------------------
# the service's OpenAI client


@pytest.mark.anyio
@pytest.mark.parametrize(("proxy", "lean"), [(None, True), ("http://proxy.invalid:3128", False)])
async def test_the_openai_client_uses_this_transport_unless_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch, proxy: str | None, lean: bool
) -> None:
    """HTTPS_PROXY and the like are only understood by httpx's own transport, so they switch to it."""
    from assistant.config import load_settings
    from assistant.upstream import create_openai_client

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy is not None:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    client = create_openai_client(load_settings())
    try:
        assert isinstance(client._client._transport, UpstreamTransport) is lean
    finally:
        await client.close()


@pytest.mark.anyio
async def test_a_connection_the_server_closed_is_not_reused_even_before_the_loop_saw_the_close() -> None:
    """The server answers (keep-alive) and closes at once, as one at its requests-per-connection
    limit does; the next request comes before the event loop has read the close. It must go
    out on a new connection (httpcore checks the socket the same way)."""
    async with serve(*[Reply([full(b"one")], close=True) for _ in range(10)]) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            for n in range(10):
                assert (await client.get("/")).content == b"one"
                if n % 2:
                    await asyncio.sleep(0.02)  # the close has reached the socket, unread
    assert server.accepted == 10


@pytest.mark.anyio
async def test_a_body_read_to_the_close_that_is_reset_is_an_error() -> None:
    """Without Content-Length or chunked, only a clean close ends the body: a reset cuts it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head(headers=[("Content-Type", "text/plain")]) + b"partial ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=url, transport=UpstreamTransport(), trust_env=False) as client:
            with pytest.raises(httpx.ReadError):
                await client.get("/")
    finally:
        server.close()


@pytest.mark.anyio
@pytest.mark.parametrize("coding", ["gzip, chunked", "gzip", "identity"])
async def test_a_transfer_coding_other_than_chunked_is_refused(coding: str) -> None:
    """RFC 9112 6.1: a coding the client cannot undo must not reach it as if it were the body."""
    wire = head(headers=[("Transfer-Encoding", coding)]) + chunk(b"\x1f\x8b compressed") + b"0\r\n\r\n"
    async with serve(Reply([wire])) as server:
        async with make_client(server, UpstreamTransport()) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="unsupported transfer coding"):
                await client.get("/")


@pytest.mark.anyio
async def test_an_unreachable_first_address_does_not_hold_up_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """Happy Eyeballs (RFC 8305): a name whose first address drops connection attempts (here
    [::1] with a full accept queue) and whose second answers connects through the second in
    about 250 ms, not after the whole connect timeout."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(full(b"ok"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hole = socket.socket(socket.AF_INET6, socket.SOCK_STREAM) if socket.has_ipv6 else None
    try:
        assert hole is not None
        hole.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        hole.bind(("::1", port))
    except (OSError, AssertionError):
        server.close()
        pytest.skip("no IPv6 loopback on this machine")
    fillers: list[socket.socket] = []
    try:
        hole.listen(0)
        for _ in range(3):  # fill the accept queue: later connection attempts get no answer
            filler = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("::1", port))
            fillers.append(filler)
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        resolve = loop.getaddrinfo

        async def two_addresses(host: Any, *args: Any, **kwargs: Any) -> Any:
            if host in ("upstream.test", b"upstream.test"):
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return await resolve(host, *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", two_addresses)
        timeout = httpx.Timeout(5.0, connect=3.0)
        async with httpx.AsyncClient(transport=UpstreamTransport(), trust_env=False, timeout=timeout) as client:
            assert (await client.get(f"http://upstream.test:{port}/")).content == b"ok"  # ConnectTimeout before
    finally:
        for filler in fillers:
            filler.close()
        hole.close()
        server.close()


def open_stream() -> Reply:
    """A response whose body goes on until the test ends: its connection stays in use."""
    return Reply([head(headers=CHUNKED) + chunk(b"first"), 30.0])


@asynccontextmanager
async def streams_in_use(client: httpx.AsyncClient, count: int) -> AsyncIterator[None]:
    """`count` responses open at once, each holding its connection."""
    async with AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(client.stream("GET", "/"))
        yield


@pytest.mark.anyio
async def test_requests_that_outgrow_the_pool_find_a_spare_connection_opened_ahead() -> None:
    """Requests one after another share one connection. Once two are in flight at once and the
    pool has none idle left, a spare is opened in the background: the third finds it ready."""
    async with serve(*[open_stream() for _ in range(3)]) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            async with streams_in_use(client, 1):
                await asyncio.sleep(0.1)
                assert server.accepted == 1  # one stream: no spare
                async with streams_in_use(client, 1):  # the second connects, and opens a spare
                    await until(lambda: transport.idle_connections == 1)
                    assert server.accepted == 3
                    async with streams_in_use(client, 1):
                        assert server.requests[-1].connection == 3  # the spare
                        await until(lambda: transport.idle_connections == 1)  # and the next spare
                        assert server.accepted == 4
        await transport.aclose()


@pytest.mark.anyio
async def test_no_spare_connection_beyond_the_limit() -> None:
    async with serve(*[open_stream() for _ in range(2)]) as server:
        transport = UpstreamTransport(max_connections=2)
        async with make_client(server, transport) as client:
            async with streams_in_use(client, 2):
                await asyncio.sleep(0.1)
                assert server.accepted == 2 and not transport._spares


@pytest.mark.anyio
async def test_a_spare_never_takes_a_slot_a_request_took_before_it_started() -> None:
    """A spare is opened by a task of its own: a request that connects before that task runs
    may take the last slot, and the spare then opens nothing."""
    async with serve(Reply([full(b"ok")])) as server:
        transport = UpstreamTransport(max_connections=1)
        async with make_client(server, transport) as client:
            transport._open_spare(("http", "127.0.0.1", server.port), 5.0)  # its task runs after the request's connect
            assert (await client.get("/")).content == b"ok"
            await until(lambda: not transport._spares)
            assert server.accepted == 1 and transport._open == 1
        await transport.aclose()


@pytest.mark.anyio
async def test_a_spare_connection_that_fails_is_not_tried_again_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream refusing connections is found out by the requests themselves: a spare that
    failed is quiet, and none is tried for SPARE_BACKOFF_SECONDS."""
    async with serve(*[open_stream() for _ in range(4)]) as server:
        transport = UpstreamTransport()
        connect = transport._connect
        attempts: list[int] = []

        async def third_refused(origin: Any, timeout: Any) -> Connection:
            attempts.append(len(attempts) + 1)
            if len(attempts) == 3:  # the spare the second request opens (after its own connection)
                raise httpx.ConnectError("refused")
            return await connect(origin, timeout)

        monkeypatch.setattr(transport, "_connect", third_refused)
        async with make_client(server, transport) as client:
            async with streams_in_use(client, 2):
                await until(lambda: len(attempts) == 3 and not transport._spares)
                async with streams_in_use(client, 1):  # connects for itself: no spare so soon
                    await asyncio.sleep(0.1)
                    assert len(attempts) == 4 and server.accepted == 3 and transport.idle_connections == 0
                    monkeypatch.setattr(transport, "_spare_failed_at", time.monotonic() - 60)
                    async with streams_in_use(client, 1):  # later: spares again
                        await until(lambda: transport.idle_connections == 1)
                        assert len(attempts) == 6 and server.accepted == 5
        await transport.aclose()


@pytest.mark.anyio
async def test_closing_the_pool_stops_a_spare_being_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(*[open_stream() for _ in range(2)]) as server:
        transport = UpstreamTransport()
        connect = transport._connect
        hanging: list[asyncio.Future[None]] = []

        async def connect_then_hang(origin: Any, timeout: Any) -> Any:
            if len(transport.connections) < 2:
                return await connect(origin, timeout)
            hanging.append(asyncio.get_running_loop().create_future())
            return await hanging[-1]

        monkeypatch.setattr(transport, "_connect", connect_then_hang)
        async with make_client(server, transport) as client:
            async with streams_in_use(client, 2):
                await until(lambda: bool(hanging))
                spare = next(iter(transport._spares.values()))
                await transport.aclose()
                await asyncio.sleep(0)
                assert spare.cancelled() and not transport._spares


@pytest.mark.anyio
async def test_closing_the_pool_before_a_spare_started_leaves_nothing() -> None:
    transport = UpstreamTransport()
    transport._open_spare(("http", "127.0.0.1", unused_port()), 5.0)
    await transport.aclose()
    await asyncio.sleep(0)
    assert not transport._spares and transport._open == 0 and not transport.connections


@pytest.mark.anyio
@pytest.mark.parametrize(("host", "raced"), [("127.0.0.1", False), ("localhost", True)])
async def test_only_a_name_has_its_addresses_raced(monkeypatch: pytest.MonkeyPatch, host: str, raced: bool) -> None:
    """An IP address is one address: racing it would only run the attempt in a task of its
    own, a turn of the loop later."""
    loop = asyncio.get_running_loop()
    create_connection = loop.create_connection
    delays: list[object] = []

    async def recording(*args: Any, **kwargs: Any) -> Any:
        delays.append(kwargs.get("happy_eyeballs_delay"))
        return await create_connection(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", recording)
    async with serve(Reply([full(b"ok")])) as server:
        async with httpx.AsyncClient(transport=UpstreamTransport(), trust_env=False) as client:
            assert (await client.get(f"http://{host}:{server.port}/")).content == b"ok"
    assert delays == [0.25 if raced else None]


@pytest.mark.anyio
async def test_connections_are_reused_when_their_descriptors_are_above_1023() -> None:
    """A service with ~1,000 clients holds descriptors above 1023 for its upstream sockets:
    the check for a close waiting in the socket must work there (select.select cannot)."""
    fillers = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        async with serve(*[Reply([full(b"one")]) for _ in range(5)]) as server:
            transport = UpstreamTransport()
            async with make_client(server, transport) as client:
                for _ in range(5):
                    assert (await client.get("/")).content == b"one"
                assert only_connection(transport).transport.get_extra_info("socket").fileno() > 1023
        assert server.accepted == 1
    finally:
        for fd in fillers:
            os.close(fd)


@pytest.mark.anyio
async def test_an_answer_before_the_whole_request_was_taken_is_the_answer() -> None:
    """A server refusing a large body at once (413) and closing: the client gets the 413, not a
    WriteError (httpcore does the same)."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(full(b'{"error": "too large"}', status=413, headers=[("Connection", "close")]))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    transport = UpstreamTransport()
    try:
        async with httpx.AsyncClient(base_url=url, transport=transport, trust_env=False) as client:
            response = await client.post("/", content=b"x" * (32 * 2**20))
            assert response.status_code == 413 and response.json() == {"error": "too large"}
            assert transport.connections == set()
    finally:
        server.close()


# --------------------------------------------------------------------------------------------
# RFC 9112 details, and TLS (a self-signed certificate for localhost in tests/tls/, valid until 2126)


@pytest.mark.anyio
async def test_second_connection_header_close_is_honoured() -> None:
    """`Connection` may be sent as several fields; a `close` in any of them ends the connection."""
    first = head(headers=[("Content-Length", "2"), ("Connection", "close"), ("Connection", "x-foo")]) + b"hi"
    async with serve(Reply([first]), Reply([full(b"two")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"hi"
            assert transport.idle_connections == 0


@pytest.mark.anyio
async def test_obs_fold_is_replaced_by_a_space() -> None:
    """RFC 9112 5.2: a user agent MUST replace an obs-fold in a response with SP."""
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Long: one\r\n two\r\n\r\nok"
    async with serve(Reply([wire])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            response = await client.get("/")
            assert response.content == b"ok"
            assert response.headers["x-long"] == "one two"


@pytest.mark.anyio
async def test_http10_chunked_is_not_reused() -> None:
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding: framing is faulty, close after it."""
    wire = head(headers=[("Transfer-Encoding", "chunked"), ("Connection", "keep-alive")], version="HTTP/1.0") + b"2\r\nhi\r\n0\r\n\r\n"
    async with serve(Reply([wire]), Reply([full(b"two")])) as server:
        transport = UpstreamTransport()
        async with make_client(server, transport) as client:
            assert (await client.get("/")).content == b"hi"
            assert transport.idle_connections == 0


TLS_CERT = Path(__file__).parent / "tls" / "localhost-cert.pem"
TLS_KEY = Path(__file__).parent / "tls" / "localhost-key.pem"


def _tls_listener() -> tuple[ssl.SSLContext, socket.socket]:
    """The server side's TLS context, and a listening socket on a free loopback port."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(TLS_CERT, TLS_KEY)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    return server_ctx, listener


def _tls_server(wire: bytes) -> tuple[int, ssl.SSLContext, socket.socket]:
    """A TLS server answering one request with `wire`, then closing without close_notify."""
    server_ctx, listener = _tls_listener()

    def run() -> None:
        raw, _ = listener.accept()
        tls = server_ctx.wrap_socket(raw, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            data += tls.recv(65536)
        tls.sendall(wire)
        time.sleep(0.1)
        tls.close()  # no unwrap(): TCP FIN without close_notify, as many servers do

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(TLS_CERT))
    return listener.getsockname()[1], client_ctx, listener


@pytest.mark.anyio
async def test_tls_body_until_close_without_close_notify() -> None:
    """A TLS body read to the close, the server closing without close_notify (httpcore accepts it)."""
    port, ctx, listener = _tls_server(head(headers=[("Content-Type", "text/plain")]) + b"all of it")
    transport = UpstreamTransport(ssl_context=ctx)
    try:
        async with make_client(f"https://localhost:{port}", transport) as client:
            with anyio.fail_after(5):
                response = await client.get("/")
            assert response.content == b"all of it"
    finally:
        listener.close()


@pytest.mark.anyio
async def test_tls_write_timeout_when_server_does_not_read() -> None:
    """Over TLS one large write would go straight to the socket transport's buffer, never pausing
    the writer: the body goes out in slices, so the write timeout fires (httpx's own transport
    raises it too)."""
    server_ctx, listener = _tls_listener()
    stop = threading.Event()

    def run() -> None:
        raw, _ = listener.accept()
        tls = server_ctx.wrap_socket(raw, server_side=True)
        tls.recv(100)
        stop.wait(10)  # never reads again
        raw.close()

    threading.Thread(target=run, daemon=True).start()
    ctx = ssl.create_default_context(cafile=str(TLS_CERT))
    transport = UpstreamTransport(ssl_context=ctx)
    port = listener.getsockname()[1]
    try:
        async with make_client(f"https://localhost:{port}", transport, httpx.Timeout(5.0, write=0.5)) as client:
            with anyio.fail_after(4):
                with pytest.raises(httpx.WriteTimeout):
                    await client.post("/", content=b"x" * (64 * 2**20))
    finally:
        stop.set()
        listener.close()


# --------------------------------------------------------------------------------------------
# a streamed body handed to a chunk handler (`ResponseBody.deliver`): what the Responses engine reads


async def raw_response(transport: UpstreamTransport, server: ScriptedServer, read: float = 5.0) -> httpx.Response:
    """The response as the engine gets it: straight from the transport, its stream a `ResponseBody`."""
    timeout = httpx.Timeout(5.0, read=read).as_dict()
    request = httpx.Request("GET", server.url + "/", extensions={"timeout": timeout})
    return await transport.handle_async_request(request)


class Handler:
    """A chunk handler that records each chunk, whether a task ran it and what the context held."""

    def __init__(self, stop_at: bytes = b"", fail_at: bytes = b"") -> None:
        self.got: list[tuple[bytes, bool, str]] = []
        self.stop_at = stop_at
        self.fail_at = fail_at

    def __call__(self, chunk: bytes) -> bool:
        self.got.append((chunk, asyncio.current_task() is not None, READER.get("unset")))
        if self.fail_at and self.fail_at in chunk:
            raise ValueError("a malformed event")
        return bool(self.stop_at) and self.stop_at in chunk

    @property
    def chunks(self) -> list[bytes]:
        return [chunk for chunk, _, _ in self.got]


READER: contextvars.ContextVar[str] = contextvars.ContextVar("READER")


@pytest.mark.anyio
async def test_deliver_runs_the_handler_from_the_read_callback_in_the_readers_context() -> None:
    """What came with the head is handed over by the waiting task; every later read goes to the
    handler from the connection's read callback (no task: the reader's task does not wake per
    chunk), in the reader's context. The connection goes back to the pool at the end."""
    writes: list[Write] = [head(headers=CHUNKED) + chunk(b"first")]
    for part in (b"second", b"third"):
        writes += [0.05, chunk(part)]
    writes += [0.05, b"0\r\n\r\n"]
    async with serve(Reply(writes), Reply([full(b"again")])) as server:
        transport = UpstreamTransport()
        READER.set("the run's")
        response = await raw_response(transport, server)
        handler = Handler()
        await response.stream.deliver(handler)  # type: ignore[attr-defined]
        in_the_runs_context = [(b"first", True), (b"second", False), (b"third", False)]
        assert handler.got == [(chunk, in_a_task, "the run's") for chunk, in_a_task in in_the_runs_context]
        assert [chunk async for chunk in response.stream] == []  # type: ignore[attr-defined]
        await response.aclose()
        assert transport.idle_connections == 1
        again = await raw_response(transport, server)
        assert await again.aread() == b"again"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_deliver_stops_when_the_handler_says_so_and_leaves_the_rest_to_read() -> None:
    """A handler returning True (the response has ended) gets nothing more; what follows is
    buffered for the drain, which gives the connection back."""
    writes: list[Write] = [head(headers=CHUNKED), 0.02, chunk(b"done"), 0.05, chunk(b"trailing"), b"0\r\n\r\n"]
    async with serve(Reply(writes), Reply([full(b"again")])) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        handler = Handler(stop_at=b"done")
        await response.stream.deliver(handler)  # type: ignore[attr-defined]
        assert handler.chunks == [b"done"]
        assert b"".join([chunk async for chunk in response.stream]) == b"trailing"  # type: ignore[attr-defined]
        assert handler.chunks == [b"done"]
        await response.aclose()
        assert (await (await raw_response(transport, server)).aread()) == b"again"
    assert server.accepted == 1


@pytest.mark.anyio
async def test_a_handler_that_raises_in_the_read_callback_fails_the_reader_and_drops_the_connection() -> None:
    """The handler's error (a malformed event) is raised by `deliver` in the reader's task, and
    nothing after it is handed over; the connection, mid-body, is not reused."""
    writes: list[Write] = [head(headers=CHUNKED), 0.02, chunk(b"ok"), 0.05, chunk(b"bad"), 0.05, chunk(b"after")]
    writes.append(b"0\r\n\r\n")
    async with serve(Reply(writes), Reply([full(b"again")])) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        handler = Handler(fail_at=b"bad")
        with pytest.raises(ValueError, match="a malformed event"):
            await response.stream.deliver(handler)  # type: ignore[attr-defined]
        assert handler.chunks == [b"ok", b"bad"]
        await response.aclose()
        await until(lambda: transport.connections == set())
        assert (await (await raw_response(transport, server)).aread()) == b"again"
        assert handler.chunks == [b"ok", b"bad"]
    assert server.accepted == 2


@pytest.mark.anyio
async def test_a_handlers_error_leaves_no_reference_cycle() -> None:
    """The error's traceback keeps the read callback's frame: nothing in it may lead back to
    the error, or the run's log and parser (the handler's frames) would wait for a full
    collection (every 10,000 connections: assistant/garbage_collection.py)."""
    writes: list[Write] = [head(headers=CHUNKED), 0.02, chunk(b"bad"), 0.05, b"0\r\n\r\n"]
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        handler = Handler(fail_at=b"bad")
        freed = weakref.ref(handler)
        gc.disable()
        try:
            try:
                await response.stream.deliver(handler)  # type: ignore[attr-defined]
            except ValueError:
                pass
            else:
                raise AssertionError("deliver did not raise the handler's error")
            await response.aclose()
            del response, handler
            await asyncio.sleep(0)  # the loop's handle that woke this task still holds the future
            assert freed() is None, "the handler is kept by a reference cycle"
        finally:
            gc.enable()


@pytest.mark.anyio
async def test_deliver_raises_the_read_timeout_after_a_silence_not_after_the_total() -> None:
    """The read timeout still bounds each silence while the handler is fed from the callback:
    a chunk every 0.1 s for 1 s under 0.3 s completes, then a silence raises httpx.ReadTimeout."""
    writes: list[Write] = [head(headers=CHUNKED)]
    for i in range(10):
        writes += [0.1, chunk(b"tick %d" % i)]
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server, read=0.3)
        handler = Handler()
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await response.stream.deliver(handler)  # type: ignore[attr-defined]
        elapsed = time.monotonic() - started
        assert handler.chunks == [b"tick %d" % i for i in range(10)]
        assert 1.15 <= elapsed < 2.0, elapsed
        await response.aclose()
        await until(lambda: not transport.connections)


@pytest.mark.anyio
async def test_deliver_raises_when_the_server_closes_mid_body_after_handing_over_what_came() -> None:
    async with serve(Reply([head(headers=CHUNKED), 0.02, chunk(b"part"), 0.05], close=True)) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        handler = Handler()
        with pytest.raises(httpx.RemoteProtocolError, match="complete response body"):
            await response.stream.deliver(handler)  # type: ignore[attr-defined]
        assert handler.chunks == [b"part"]
        await response.aclose()
        assert transport.connections == set()


@asynccontextmanager
async def a_waiting_reader() -> AsyncIterator[tuple[Connection, Handler, asyncio.Future[None]]]:
    """A reader in `deliver`, handed its first chunk and waiting for more: (its connection, its
    handler, its task). The server sends nothing more: the test feeds the connection itself."""
    async with serve(Reply([head(headers=CHUNKED), 0.02, chunk(b"first")])) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        connection = only_connection(transport)
        handler = Handler()
        reader = asyncio.ensure_future(response.stream.deliver(handler))  # type: ignore[attr-defined]
        await until(lambda: handler.chunks == [b"first"])
        yield connection, handler, reader
        await response.aclose()


@pytest.mark.anyio
async def test_a_cancelled_reader_is_handed_nothing_more() -> None:
    """Once the reader's task is cancelled (its run stopped), a read that comes before the task
    runs again is buffered, not handed to the handler: nothing is parsed for a stopped run."""
    async with a_waiting_reader() as (connection, handler, reader):
        reader.cancel()
        connection.data_received(chunk(b"late"))  # as the loop would, before the task runs again
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert handler.chunks == [b"first"]
        assert connection.take_body() == b"late"
    assert connection.closed or connection.transport.is_closing()  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_read_without_body_data_does_not_wake_the_reader() -> None:
    """A read that carries only chunk framing (a size line cut in two) gives the handler
    nothing and does not wake the reader's task; the end of the body does."""
    async with a_waiting_reader() as (connection, handler, reader):
        waiter = connection._waiter
        connection.data_received(b"5")
        connection.data_received(b"\r\nfifth\r\n")
        assert waiter is connection._waiter and waiter is not None and not waiter.done()
        assert handler.chunks == [b"first", b"fifth"]
        connection.data_received(b"0\r\n\r\n")
        assert waiter.done()
        await reader
        assert handler.chunks == [b"first", b"fifth"]
    assert connection.idle and not connection.closed  # back in the pool


@pytest.mark.anyio
async def test_a_handler_raising_stopiteration_fails_the_reader_instead_of_hanging_it() -> None:
    """A future refuses StopIteration: raised by a handler (a bug), it still ends the reader,
    as the RuntimeError a coroutine makes of it, instead of leaving it waiting for good."""

    def handler(chunk: bytes) -> bool:
        raise StopIteration

    writes: list[Write] = [head(headers=CHUNKED), 0.02, chunk(b"any"), 0.05, b"0\r\n\r\n"]
    async with serve(Reply(writes)) as server:
        transport = UpstreamTransport()
        response = await raw_response(transport, server)
        with anyio.fail_after(2), pytest.raises(RuntimeError, match="StopIteration"):
            await response.stream.deliver(handler)  # type: ignore[attr-defined]
        await response.aclose()


# --------------------------------------------------------------------------------------------
# the Responses engine's round on this transport (`responses_engine.Round.deliver`)


def sse_event(kind: str, **fields: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **fields}).encode())


async def a_round(transport: UpstreamTransport, server: ScriptedServer) -> Round:
    """A round whose request was sent: its response from this transport (the engine's part is
    `_create_response`, not tested here)."""
    round_ = Round(None, "conv_1", [])  # type: ignore[arg-type]
    round_._response = await raw_response(transport, server)
    return round_


class Batches:
    """A round's `on_batch`: records each batch and whether a task ran it; True at `done`."""

    def __init__(self) -> None:
        self.got: list[tuple[list[str], bool]] = []

    def __call__(self, batch: list[dict[str, Any]]) -> bool:
        self.got.append(([event["type"] for event in batch], asyncio.current_task() is not None))
        return batch[-1]["type"] == "done"


@pytest.mark.anyio
async def test_a_round_reads_a_compressed_body_in_its_task_and_a_plain_one_from_the_read_callback() -> None:
    """Nothing asks for a content coding; if one comes anyway, httpx's decoder reads it, in the
    run's task (pull). A plain body goes from the connection's read callback to the parser."""
    import gzip

    events = [sse_event("created"), sse_event("delta"), sse_event("done")]
    compressed = gzip.compress(b"".join(events))
    gzipped = [head(headers=[*CHUNKED, ("Content-Encoding", "gzip")]), chunk(compressed[:20]), 0.02,
               chunk(compressed[20:]), b"0\r\n\r\n"]
    plain: list[Write] = [head(headers=CHUNKED)]
    for event in events:
        plain += [0.02, chunk(event)]
    plain.append(b"0\r\n\r\n")
    async with serve(Reply(gzipped), Reply(plain)) as server:
        transport = UpstreamTransport()
        for expected in (
            [(["created", "delta", "done"], True)],
            [(["created"], False), (["delta"], False), (["done"], False)],
        ):
            round_ = await a_round(transport, server)
            batches = Batches()
            await round_.deliver(batches)
            await round_.__aexit__(None, None, None)
            assert batches.got == expected
        assert transport.idle_connections == 1  # each read to its end, then given back


@pytest.mark.anyio
async def test_a_waiting_round_holds_no_chunk() -> None:
    """The first event comes with the head and echoes the whole request (`response.created`):
    no frame of the waiting round keeps it, however long the stream then idles."""
    echo = sse_event("created", request="x" * 20_000)
    async with serve(Reply([head(headers=CHUNKED) + chunk(echo)])) as server:
        transport = UpstreamTransport()
        round_ = await a_round(transport, server)
        batches = Batches()
        reader = asyncio.ensure_future(round_.deliver(batches))
        await until(lambda: bool(batches.got))
        held, coro = [], reader.get_coro()  # type: ignore[attr-defined]
        while coro is not None and hasattr(coro, "cr_frame"):
            locals_ = coro.cr_frame.f_locals.items()
            held += [name for name, value in locals_ if isinstance(value, bytes) and len(value) > 1000]
            coro = coro.cr_await
        assert held == []
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await round_.__aexit__(asyncio.CancelledError, None, None)

"""The floors under the service's CPU figures: its relay, done with as little as possible.

The service's hot path is a relay: read an upstream SSE event, decode its JSON, encode the
client's event, write it. These two servers do only that, so the benchmark can price the ground
the service stands on at the same load (bench/run.py, scenario F):

  raw        plain asyncio protocols on both sides, HTTP written and parsed by hand, callbacks
             only (a task per turn just to connect upstream): the least a Python relay costs
             on this machine.
             `python bench/floor.py --upstream http://127.0.0.1:PORT [--port 0]`
  hypercorn  the same relay as a bare ASGI app under hypercorn (no framework, no run log, no
             tools): what the fixed server costs before the service does anything.
             `FLOOR_UPSTREAM=http://127.0.0.1:PORT hypercorn bench.floor:app --bind ...`

Both speak just enough of the service's API for bench/load.py: POST /threads, POST /chat (SSE:
`thread.run.created`, one `thread.message.delta` per upstream delta, `metadata`), GET /health.
They are measuring instruments, not services: no error handling beyond closing the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
CREATED = b'event: thread.run.created\ndata: {"run_id":"run_floor"}\n\n'
METADATA = b'event: metadata\ndata: {"run_id":"run_floor"}\n\n'
THREAD = orjson.dumps({"thread_id": "conv_floor"})
HEALTH = orjson.dumps({"status": "ok"})


def frame_delta(text: str) -> bytes:
    return b"event: thread.message.delta\ndata: " + orjson.dumps({"delta": {"content": text}}) + b"\n\n"


def json_response(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class UpstreamCall(asyncio.Protocol):
    """One keep-alive connection to the upstream, running one streamed response at a time.

    `sink(frames, done)` gets the client's events framed from each read: every delta decoded
    and encoded again, as the service does."""

    idle: list[UpstreamCall] = []

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sink: Callable[[bytes, bool], None] | None = None
        self.buffer = b""
        self.in_body = False

    @classmethod
    async def start(cls, origin: tuple[str, int], message: str, sink: Callable[[bytes, bool], None]) -> None:
        call = cls.idle.pop() if cls.idle else None
        if call is None:
            _, call = await asyncio.get_running_loop().create_connection(cls, *origin)
        call.sink, call.buffer, call.in_body = sink, b"", False
        body = orjson.dumps({"model": "gpt-4.1-mini", "input": message, "stream": True})
        assert call.transport is not None
        call.transport.write(b"POST /v1/responses HTTP/1.1\r\nhost: upstream\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        if not self.in_body:
            head, found, body = buffer.partition(b"\r\n\r\n")
            if not found:
                self.buffer = buffer  # the head is not all here yet
                return
            buffer = body
            self.in_body = True
        frames, done = [], False
        # Chunked body; the fast upstream writes one SSE event per chunk.
        while True:
            size_end = buffer.find(b"\r\n")
            if size_end < 0:
                break
            size = int(buffer[:size_end], 16)
            end = size_end + 2 + size + 2
            if len(buffer) < end:
                break
            if size == 0:
                done = True
                buffer = buffer[end:]
                break
            for block in buffer[size_end + 2 : end - 2].split(b"\n\n"):
                _, found, data_line = block.partition(b"\ndata: ")
                if not found:
                    continue
                event = orjson.loads(data_line)
                if event["type"] == "response.output_text.delta":
                    frames.append(frame_delta(event["delta"]))
            buffer = buffer[end:]
        self.buffer = buffer
        if frames or done:
            sink = self.sink
            if done:
                self.sink = None
                UpstreamCall.idle.append(self)
            assert sink is not None
            sink(b"".join(frames), done)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in UpstreamCall.idle:
            UpstreamCall.idle.remove(self)
        if self.sink is not None:
            self.sink(b"", True)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class ClientConnection(asyncio.Protocol):
    """The raw floor's side facing a client: one request per connection, answered by callbacks."""

    def __init__(self, origin: tuple[str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.connecting: asyncio.Task[None] | None = None  # kept: the loop holds tasks weakly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, found, body = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.split(b"\r\n")
        method, path, _ = lines[0].split(b" ", 2)
        length = next((int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:")), 0)
        if len(body) < length:
            return
        self.buffer = body[length:]
        assert self.transport is not None
        if path == b"/chat":
            self.transport.write(SSE_HEAD + chunk(CREATED))
            message = orjson.loads(body[:length])["message"]
            self.connecting = asyncio.get_running_loop().create_task(UpstreamCall.start(self.origin, message, self.relay))
            self.connecting.add_done_callback(self.connected)
        else:
            self.transport.write(json_response(HEALTH if method == b"GET" else THREAD))

    def connected(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # the upstream refused: so does this
            assert self.transport is not None
            self.transport.close()

    def relay(self, frames: bytes, done: bool) -> None:
        assert self.transport is not None
        if done:
            self.transport.write((chunk(frames) if frames else b"") + chunk(METADATA) + b"0\r\n\r\n")
            self.transport.close()
        elif frames:
            self.transport.write(chunk(frames))


class Relayed:
    """What the upstream relayed for one ASGI request and not yet sent, and its waiting sender."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.done = False
        self.waiter: asyncio.Future[None] | None = None

    def sink(self, frames: bytes, done: bool) -> None:
        self.pending.append(frames)
        self.done = self.done or done
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> bytes:
        if not self.pending and not self.done:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        frames = b"".join(self.pending)
        self.pending.clear()
        return frames


@functools.cache
def upstream_origin() -> tuple[str, int]:
    """The hypercorn floor's upstream, from FLOOR_UPSTREAM (read once)."""
    url = urlsplit(os.environ["FLOOR_UPSTREAM"])
    return url.hostname or "127.0.0.1", url.port or 80


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The hypercorn floor: the same relay as a bare ASGI app, one body message per upstream read."""
    if scope["type"] == "lifespan":
        await receive()  # lifespan.startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] != "/chat":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": HEALTH if scope["method"] == "GET" else THREAD})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
    await send({"type": "http.response.body", "body": CREATED, "more_body": True})
    relayed = Relayed()
    await UpstreamCall.start(upstream_origin(), orjson.loads(body)["message"], relayed.sink)
    while True:
        frames = await relayed.take()
        if relayed.done:
            await send({"type": "http.response.body", "body": frames + METADATA})
            return
        await send({"type": "http.response.body", "body": frames, "more_body": True})


async def serve_raw(upstream: str, host: str, port: int) -> None:
    url = urlsplit(upstream)
    origin = (url.hostname or "127.0.0.1", url.port or 80)
    server = await asyncio.get_running_loop().create_server(lambda: ClientConnection(origin), host, port,
                                                            backlog=4096)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the fast upstream's URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve_raw(args.upstream, args.host, args.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()

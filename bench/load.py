"""The benchmark's load generator: N concurrent chat clients, SSE or WebSocket, in its own process.

It runs apart from the service (and can be pinned to another core) so that its CPU is not the
service's, and it is kept cheap: plain asyncio, HTTP/1.1 requests and WebSocket frames written by
hand, chunked bodies, SSE and frames parsed incrementally, one `time.time()` per network read on
both transports. WebSocket clients offer permessage-deflate, as browsers do, unless
--ws-compression off (and inflate what the service sends compressed, if it took the offer).

Each client owns one thread (created before the measured part) and runs one turn: it connects,
sends `bench n=<deltas> rate=<rate> stall=<stall>`, and reads until `metadata`; with
--duration it runs turn after turn on its thread, each on a new connection, for that long. Per delta it
records the end-to-end latency (receive time - the send time the fake upstream wrote in the
delta text); per turn the time to first delta (first delta received - connect started, so TCP
and WebSocket set-up count as overhead on both transports). Client i starts at i * ramp / N.

Protocol with bench/run.py (stdout lines, stdin lines), so that it can measure only the turns:
  -> READY           threads are created; waits for a line on stdin before starting the turns
  <- GO
  -> OPEN            (--hold only) every stream has received its first event: idle streams
                     are open; the upstream's stall is released by run.py, not by this process
  -> {...}           the raw results, one JSON line: per-delta [send time, latency], per-turn
                     [start, TTFD, end, the upstream's own share of the TTFD], one per turn
                     (whichever client ran it), error counts,
                     this process's own CPU time
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import os
import resource
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

DELTA = b"thread.message.delta"
THREAD_SETUP_CONCURRENCY = 32


def raise_fd_limit() -> None:
    """1,000 streams are 1,000 sockets here (and more on the servers): take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TurnError(Exception):
    """A turn that did not end as it should; its message is the error's reason (counted)."""


class Turn:
    """What one client saw of its turn."""

    __slots__ = ("start", "first", "upstream_first", "end", "deltas", "error", "opened")

    def __init__(self) -> None:
        self.start = 0.0  # time.time() before connecting
        self.first: float | None = None  # first delta received
        self.upstream_first = 0.0  # of which the upstream's own time: request read -> first delta sent
        self.end: float | None = None
        self.deltas = 0
        self.error: str | None = None
        self.opened = False  # first event of the stream received (idle streams)


class TurnConnection(asyncio.Protocol):
    """One turn's connection, parsed in `data_received` as its bytes arrive, stamped once per
    network read. No task is woken per read: after a pause of the service, the burst it sends
    is stamped as fast as it arrives, not as fast as this process's tasks get their turn."""

    def __init__(self, load: Load, turn: Turn, request: bytes) -> None:
        self.load = load
        self.turn = turn
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""  # what arrived and is not parsed yet
        self.status: int | None = None  # once the response head is in
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        received = time.time()
        self.buffer += data
        try:
            if self.status is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                status_line, *lines = self.buffer[:end].split(b"\r\n")
                self.buffer = self.buffer[end + 4:]
                self.status = int(status_line.split(b" ", 2)[1])
                for line in lines:
                    name, _, value = line.partition(b":")
                    self.headers[name.strip().lower()] = value.strip()
                self.head_received()
            self.body_received(received)
        except Exception as exc:  # a TurnError, or a malformed response
            self.end(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.end(self.ended_early())

    def end(self, error: BaseException | None = None) -> None:
        if not self.ended.done():
            if error is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def ended_early(self) -> BaseException | None:
        """What the connection's end means now (None: the turn is complete)."""
        return TurnError("stream ended without metadata")

    def head_received(self) -> None:
        pass

    def body_received(self, received: float) -> None:
        raise NotImplementedError


class SSETurn(TurnConnection):
    """POST /chat with Accept: text/event-stream; the body is chunked (HTTP/1.1)."""

    events = b""  # de-chunked, not yet a whole event

    def ended_early(self) -> BaseException | None:
        if self.status is not None and self.status != 200:
            return self.refusal()
        return super().ended_early()

    def refusal(self) -> TurnError:
        kind = orjson.loads(self.buffer).get("type", "?") if self.buffer.startswith(b"{") else "?"
        return TurnError(f"HTTP {self.status} {kind}")

    def body_received(self, received: float) -> None:
        if self.status != 200:  # an error's JSON: whole once Content-Length bytes are in
            if len(self.buffer) >= int(self.headers.get(b"content-length", b"-1")) >= 0:
                raise self.refusal()
            return
        raw = self.buffer
        body = []
        while (line_end := raw.find(b"\r\n")) >= 0:
            size = int(raw[:line_end].split(b";", 1)[0], 16)
            end = line_end + 2 + size
            if len(raw) < end + 2:
                break  # the rest of this chunk comes with a later read
            body.append(raw[line_end + 2:end])
            raw = raw[end + 2:]
            if size == 0:
                break  # the last chunk: the stream ended (with or without metadata)
        self.buffer = raw
        # Events end at a blank line; the service writes "\n" line endings only.
        *events, self.events = (self.events + b"".join(body)).split(b"\n\n")
        turn = self.turn
        for block in events:
            # The service writes `event:` first and one `data:` line last (its data is single-line
            # JSON); the retry field and keepalive comments have neither.
            data_at = block.find(b"\ndata: ")
            if data_at < 0 or not block.startswith(b"event: "):
                continue
            name = block[7:block.index(b"\n")]
            payload = block[data_at + 7:]
            self.load._mark_open(turn)
            if name == DELTA:
                self.load._record_delta(turn, orjson.loads(payload)["delta"]["content"], received)
            elif name == b"metadata":
                self.load._finish(turn, True)
                self.end()
                return
            elif name == b"error":
                raise TurnError(f"error event {orjson.loads(payload).get('type')}")
            elif name == b"thread.run.failed":
                raise TurnError(f"run failed {orjson.loads(payload).get('type')}")


class WebSocketTurn(TurnConnection):
    """GET /ws/chat upgraded (RFC 6455), the chat frame, the events; then the closing handshake.
    Offers permessage-deflate when asked to, and inflates what the service compressed (RFC 7692)."""

    def __init__(self, load: Load, turn: Turn, request: bytes, message: bytes) -> None:
        super().__init__(load, turn, request)
        self.message = message
        self.fragments: list[bytes] = []
        self.compressed = False  # the message being assembled: compressed, text (not binary)
        self.text = False
        self.inflater: Any = None
        self.closing = False  # metadata came: our close went out, the service's is awaited

    def head_received(self) -> None:
        if self.status != 101:
            raise TurnError(f"WebSocket handshake answered {self.status}")
        if b"permessage-deflate" in self.headers.get(b"sec-websocket-extensions", b""):
            self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self.send(0x1, self.message)

    def send(self, opcode: int, payload: bytes) -> None:
        """A client's frames are masked (RFC 6455 5.3)."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        repeated = (mask * (size // 4 + 1))[:size]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(size, "big")
        self.transport.write(head + mask + masked)  # type: ignore[union-attr]

    def ended_early(self) -> BaseException | None:
        if self.closing:
            return None  # the service closed after our close: all done
        return super().ended_early()

    def body_received(self, received: float) -> None:
        for text in self.messages():
            if self.closing:
                continue
            frame = orjson.loads(text)
            name = frame.get("event")
            self.load._mark_open(self.turn)
            if name == "thread.message.delta":
                self.load._record_delta(self.turn, frame["data"]["delta"]["content"], received)
            elif name == "metadata":
                self.load._finish(self.turn, True)
                self.closing = True
                self.send(0x8, struct.pack("!H", 1000))
                # The service's close frame ends it; at most 2 s later, it ends anyway.
                asyncio.get_running_loop().call_later(2, self.end)
            elif name == "error":
                raise TurnError(f"error event {frame.get('type')}")
            elif name == "thread.run.failed":
                raise TurnError(f"run failed {frame['data'].get('type')}")

    def messages(self) -> list[bytes]:
        """The text messages the buffer completes; answers pings, and notes the service's close."""
        texts = []
        buffer = self.buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            size, offset = second & 0x7F, 2
            if size == 126:
                if len(buffer) < 4:
                    break
                size, offset = struct.unpack_from("!H", buffer, 2)[0], 4
            elif size == 127:
                if len(buffer) < 10:
                    break
                size, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
            if len(buffer) < offset + size:
                break
            payload, buffer = buffer[offset:offset + size], buffer[offset + size:]
            opcode = first & 0x0F
            if opcode == 0x9:  # ping
                self.send(0xA, payload)
            elif opcode == 0x8:  # close
                if not self.closing:
                    raise TurnError("the service closed the WebSocket")
                self.end()
                break
            elif opcode in (0x0, 0x1, 0x2):  # continuation, text, binary
                if opcode:  # a message's first frame
                    self.compressed, self.text = bool(first & 0x40), opcode == 0x1
                self.fragments.append(payload)
                if first & 0x80:  # the message's last frame
                    message = b"".join(self.fragments)
                    self.fragments = []
                    if self.compressed and self.inflater is not None:
                        message = self.inflater.decompress(message + b"\x00\x00\xff\xff")
                    if self.text:
                        texts.append(message)
        self.buffer = buffer
        return texts


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        url = urlsplit(args.url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.message = f"bench n={args.deltas} rate={args.rate:g} stall={args.stall:g}"
        self.samples: list[tuple[float, float]] = []  # (upstream send time, latency), every delta
        self.turns: list[Turn] = []
        self.all_open = asyncio.Event()
        self.open_count = 0

    # -- plain HTTP/1.1

    async def _request(self, method: str, path: str, body: bytes | None, accept: str = "application/json"
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[bytes, bytes]]:
        """Send one request on a new connection (Connection: close); returns the response head."""
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: {accept}\r\n"
                f"Connection: close\r\n").encode()
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        writer.write(head + b"\r\n" + (body or b""))
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return reader, writer, int(status_line.split(b" ", 2)[1]), headers

    @staticmethod
    async def _body_chunks(reader: asyncio.StreamReader, headers: dict[bytes, bytes]):
        """The response body as it arrives: chunked, sized, or delimited by the connection's end."""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif b"content-length" in headers:
            yield await reader.readexactly(int(headers[b"content-length"]))
        else:
            while data := await reader.read(65536):
                yield data

    async def _read_all(self, reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
        return b"".join([c async for c in self._body_chunks(reader, headers)])

    async def create_thread(self) -> str:
        reader, writer, status, headers = await self._request("POST", "/threads", b"")
        try:
            body = await self._read_all(reader, headers)
        finally:
            writer.close()
        if status != 200:
            raise RuntimeError(f"POST /threads answered {status}: {body[:300]!r}")
        return orjson.loads(body)["thread_id"]

    # -- one turn

    def _record_delta(self, turn: Turn, content: str, received: float) -> None:
        for piece in content.split("|"):
            if piece:
                sent, _, request_read = piece.partition("/")  # "/" on the first delta only
                self.samples.append((float(sent), received - float(sent)))
                turn.deltas += 1
                if request_read:
                    turn.upstream_first = float(sent) - float(request_read)
        if turn.first is None:
            turn.first = received

    def _mark_open(self, turn: Turn) -> None:
        if not turn.opened:
            turn.opened = True
            self.open_count += 1
            if self.open_count == self.args.streams:
                self.all_open.set()

    def _finish(self, turn: Turn, saw_metadata: bool) -> None:
        turn.end = time.time()
        if not saw_metadata:
            raise TurnError("stream ended without metadata")
        if turn.deltas != self.args.deltas:
            raise TurnError(f"received {turn.deltas} of {self.args.deltas} deltas")

    async def _run_turn(self, connection: Callable[[], TurnConnection]) -> None:
        _, protocol = await asyncio.get_running_loop().create_connection(connection, self.host, self.port)
        try:
            await protocol.ended
        finally:
            protocol.end()

    async def sse_turn(self, thread_id: str, turn: Turn) -> None:
        body = orjson.dumps({"thread_id": thread_id, "message": self.message})
        request = (f"POST /chat HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAccept: text/event-stream\r\n"
                   f"Connection: close\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        turn.start = time.time()
        await self._run_turn(lambda: SSETurn(self, turn, request.encode() + body))

    async def ws_turn(self, thread_id: str, turn: Turn) -> None:
        head = (f"GET /ws/chat HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n")
        if self.args.ws_compression == "on":
            head += "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        message = orjson.dumps({"thread_id": thread_id, "message": self.message})
        turn.start = time.time()
        await self._run_turn(lambda: WebSocketTurn(self, turn, head.encode() + b"\r\n", message))

    async def client(self, index: int, thread_id: str, go: float) -> None:
        await asyncio.sleep(max(0.0, go + index * self.args.ramp / max(1, self.args.streams) - time.monotonic()))
        while True:
            turn = Turn()
            self.turns.append(turn)
            await self.turn(thread_id, turn)
            if time.monotonic() - go >= self.args.duration:
                return

    async def turn(self, thread_id: str, turn: Turn) -> None:
        run = self.ws_turn if self.args.transport == "ws" else self.sse_turn
        try:
            await asyncio.wait_for(run(thread_id, turn), self.args.turn_timeout)
        except TurnError as exc:
            turn.error = str(exc)
        except asyncio.TimeoutError:
            turn.error = "timeout"
        except Exception as exc:  # connection refused or reset, malformed frames, ...
            turn.error = f"{type(exc).__name__}"
        if turn.error is not None:
            self._mark_open(turn)  # a failed stream is not waited for as "open"
            if turn.end is None:
                turn.end = time.time()

    # -- the whole run

    async def run(self) -> dict[str, Any]:
        args = self.args
        limit = asyncio.Semaphore(THREAD_SETUP_CONCURRENCY)

        async def new_thread() -> str:
            async with limit:
                return await self.create_thread()

        threads = await asyncio.gather(*(new_thread() for _ in range(args.streams)))
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        # No full collection here while the clients measure latency: it pauses every client at
        # once (walking 1,000 WebSocket clients: 30-90 ms), and the delay would be counted as the
        # service's. Young collections go on (well under a millisecond each). Runs that measure
        # memory under churn (--keep-full-collections) keep them, or tens of thousands of closed
        # connections would pile up.
        gc.collect()
        gc.freeze()
        if not args.keep_full_collections:
            gc.set_threshold(700, 10, 1_000_000_000)

        cpu0, t0 = cpu_seconds(), time.time()
        go = time.monotonic()
        clients = asyncio.gather(*(self.client(i, t, go) for i, t in enumerate(threads)))
        if args.hold:
            opened = asyncio.ensure_future(self.all_open.wait())
            await asyncio.wait([opened, clients], return_when=asyncio.FIRST_COMPLETED)
            opened.cancel()
            print("OPEN", flush=True)  # run.py measures, then releases the upstream's stall
        await clients
        t1 = time.time()
        errors = Counter(t.error for t in self.turns if t.error is not None)
        return {
            "transport": args.transport,
            "streams": args.streams,
            "deltas_per_stream": args.deltas,
            "rate": args.rate,
            "t_start": t0,
            "t_end": t1,
            "delta_count": len(self.samples),
            "error_count": sum(errors.values()),
            "errors": dict(errors),
            "turns": [[round(t.start, 6), None if t.first is None else round(t.first - t.start, 6),
                       None if t.end is None else round(t.end, 6), round(t.upstream_first, 6)]
                      for t in self.turns],
            "samples": [[round(s, 6), round(latency, 6)] for s, latency in self.samples],
            "load_cpu_seconds": round(cpu_seconds() - cpu0, 4),
            "load_max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--transport", choices=("sse", "ws"), default="sse")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--deltas", type=int, default=5, help="deltas per turn")
    parser.add_argument("--rate", type=float, default=0.0, help="deltas/s per stream; 0 = as fast as possible")
    parser.add_argument("--stall", type=float, default=0.0, help="upstream silence after response.created")
    parser.add_argument("--ramp", type=float, default=0.0, help="seconds over which the clients start")
    parser.add_argument("--hold", action="store_true", help="print OPEN once every stream is open (idle streams)")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="seconds each client goes on running turns (default 0: one turn each)")
    parser.add_argument("--keep-full-collections", action="store_true",
                        help="let the garbage collector make full collections while the turns run "
                             "(default: none, they would count as the service's latency)")
    parser.add_argument("--turn-timeout", type=float, default=120.0)
    parser.add_argument("--ws-compression", choices=("on", "off"), default="on")
    args = parser.parse_args()
    raise_fd_limit()
    result = asyncio.run(Load(args).run())
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

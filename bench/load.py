"""The benchmark's load generator: N concurrent chat clients, SSE or WebSocket, in its own process.

It runs apart from the service (and can be pinned to another core) so that its CPU is not the
service's, and it is kept cheap: plain asyncio, HTTP/1.1 requests written by hand, chunked bodies
and SSE parsed incrementally, one `time.time()` per network read. WebSocket clients use the
`websockets` package (it offers permessage-deflate, as browsers do, unless --ws-compression off).

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
import resource
import sys
import time
from collections import Counter
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

    async def sse_turn(self, thread_id: str, turn: Turn) -> None:
        body = orjson.dumps({"thread_id": thread_id, "message": self.message})
        turn.start = time.time()
        reader, writer, status, headers = await self._request("POST", "/chat", body, "text/event-stream")
        try:
            if status != 200:
                error = await self._read_all(reader, headers)
                kind = orjson.loads(error).get("type", "?") if error.startswith(b"{") else "?"
                raise TurnError(f"HTTP {status} {kind}")
            saw_metadata = False
            buffer = b""
            async for data in self._body_chunks(reader, headers):
                received = time.time()
                buffer += data
                # Events end at a blank line; the service writes "\n" line endings only.
                *events, buffer = buffer.split(b"\n\n")
                for block in events:
                    name = b""
                    payload = None
                    for line in block.split(b"\n"):
                        if line.startswith(b"event: "):
                            name = line[7:]
                        elif line.startswith(b"data: "):
                            payload = line[6:]
                    if payload is None:
                        continue  # retry: field or a keepalive comment
                    self._mark_open(turn)
                    if name == DELTA:
                        self._record_delta(turn, orjson.loads(payload)["delta"]["content"], received)
                    elif name == b"metadata":
                        saw_metadata = True
                    elif name == b"error":
                        raise TurnError(f"error event {orjson.loads(payload).get('type')}")
                    elif name == b"thread.run.failed":
                        raise TurnError(f"run failed {orjson.loads(payload).get('type')}")
            self._finish(turn, saw_metadata)
        finally:
            writer.close()

    async def ws_turn(self, thread_id: str, turn: Turn) -> None:
        from websockets.asyncio.client import connect

        compression = None if self.args.ws_compression == "off" else "deflate"
        url = f"ws://{self.host}:{self.port}/ws/chat"
        turn.start = time.time()
        async with connect(url, compression=compression, ping_interval=None, max_size=None,
                           open_timeout=60, close_timeout=2) as ws:
            await ws.send(orjson.dumps({"thread_id": thread_id, "message": self.message}).decode())
            saw_metadata = False
            async for text in ws:
                received = time.time()
                frame = orjson.loads(text)
                name = frame.get("event")
                self._mark_open(turn)
                if name == "thread.message.delta":
                    self._record_delta(turn, frame["data"]["delta"]["content"], received)
                elif name == "metadata":
                    saw_metadata = True
                    break
                elif name == "error":
                    raise TurnError(f"error event {frame.get('type')}")
                elif name == "thread.run.failed":
                    raise TurnError(f"run failed {frame['data'].get('type')}")
            self._finish(turn, saw_metadata)

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
    parser.add_argument("--turn-timeout", type=float, default=120.0)
    parser.add_argument("--ws-compression", choices=("on", "off"), default="on")
    args = parser.parse_args()
    raise_fd_limit()
    result = asyncio.run(Load(args).run())
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

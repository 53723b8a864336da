"""Fault-injection suite: each fault tried N times against the real service, then a table.

    .venv/bin/python scripts/fault_suite.py [--runs N]      (N defaults to 5)

It needs the development requirements (websockets, pytest's harness): run scripts/test.sh once,
or pip install -r requirements-dev.txt, first.

It starts the fake OpenAI (tests/fake_openai.py) and the service under hypercorn on loopback ports
(with tests/e2e.py's harness), then, per fault and per try, on a new thread: runs the faulty turn,
checks that the client got a proper end (a `metadata` event or JSON answer, an `error` event, or a
JSON error of a documented type; for a client that hangs up there is nothing to check beyond its
hanging up at the intended moment), then sends a plain message on the same thread, which must get
its 200 reply. Tries alternate between SSE, JSON and WebSocket clients. Exit status 1 when any row
is below 100%.

The service runs with UPSTREAM_IDLE_TIMEOUT_SECONDS=1 (a stalled upstream fails fast),
SLOW_CLIENT_TIMEOUT_SECONDS=1 and TOOL_TIMEOUT_SECONDS=5; everything else as in the e2e tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import struct
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import anyio  # noqa: E402
import httpx  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

from tests.e2e import ServerProcess, clean_environment, start_service  # noqa: E402
from tests.test_e2e import SSEParser  # noqa: E402

# Every `type` the README documents for an error (JSON body or `error` event).
KNOWN_ERROR_TYPES = frozenset({
    "invalid_request", "unauthorized", "not_found", "thread_not_found", "run_not_found", "run_expired",
    "events_dropped", "method_not_allowed", "thread_busy", "run_finished", "run_cancelled",
    "payload_too_large", "unsupported_media_type", "upstream_error", "upstream_rate_limited", "run_failed",
    "run_incomplete", "tool_rounds_exceeded", "shutting_down", "upstream_timeout",
})
TRANSPORTS = ("sse", "json", "ws")
FOLLOW_UP = "are you still there?"
TURN_TIMEOUT = 20.0
TRY_TIMEOUT = 45.0  # one try, fault and follow-up message: a hang fails the try instead of the run


@dataclass
class Outcome:
    clean: bool
    note: str = ""


def http_client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(TURN_TIMEOUT), **kwargs)


class Suite:
    def __init__(self, service: ServerProcess, upstream: ServerProcess) -> None:
        self.service = service
        self.upstream = upstream
        self.base = service.url
        self.ws_url = service.url.replace("http://", "ws://") + "/ws/chat"

    # -- one turn, however it is sent, judged by how it ended

    async def new_thread(self, client: httpx.AsyncClient) -> str:
        response = await client.post(f"{self.base}/threads")
        response.raise_for_status()
        return response.json()["thread_id"]

    async def turn(self, client: httpx.AsyncClient, thread_id: str, message: str, transport: str) -> Outcome:
        with anyio.fail_after(TURN_TIMEOUT):
            if transport == "json":
                return await self._json_turn(client, thread_id, message)
            if transport == "sse":
                return await self._sse_turn(client, thread_id, message)
            return await self._ws_turn(thread_id, message)

    async def _json_turn(self, client: httpx.AsyncClient, thread_id: str, message: str) -> Outcome:
        response = await client.post(f"{self.base}/chat", json={"thread_id": thread_id, "message": message})
        return judge_json(response.status_code, response.headers.get("content-type", ""), response.content)

    async def _sse_turn(self, client: httpx.AsyncClient, thread_id: str, message: str) -> Outcome:
        async with client.stream("POST", f"{self.base}/chat", headers={"Accept": "text/event-stream"},
                                 json={"thread_id": thread_id, "message": message}) as response:
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                return judge_json(response.status_code, content_type, await response.aread())
            parser = SSEParser()
            events = []
            async for chunk in response.aiter_raw():
                events += [i for i in parser.feed(chunk, time.monotonic()) if i.kind == "event"]
            events += [i for i in parser.close(time.monotonic()) if i.kind == "event"]
        if not events:
            return Outcome(False, "an empty stream")
        last = events[-1]
        return judge_last_event(last.name, json.loads(last.data))

    async def _ws_turn(self, thread_id: str, message: str) -> Outcome:
        async with connect(self.ws_url, proxy=None, open_timeout=5) as ws:
            await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
            while True:
                frame = json.loads(await ws.recv())
                if frame["event"] in ("metadata", "error"):
                    return judge_last_event(frame["event"], frame["data"])

    async def thread_usable(self, client: httpx.AsyncClient, thread_id: str) -> bool:
        response = await client.post(f"{self.base}/chat", json={"thread_id": thread_id, "message": FOLLOW_UP})
        return response.status_code == 200 and response.json().get("responses") == [f"You said: {FOLLOW_UP}"]

    # -- clients that hang up

    async def hang_up(self, thread_id: str, message: str, transport: str, until: Callable[[list[str]], bool]) -> Outcome:
        """Send the turn, read until `until(event names)`, then go: close the stream, reset the socket
        or close the WebSocket. Not clean if the turn ended (or broke) before that moment."""
        names: list[str] = []
        with anyio.fail_after(TURN_TIMEOUT):
            if transport == "sse":
                async with http_client() as client, client.stream(
                    "POST", f"{self.base}/chat", headers={"Accept": "text/event-stream"},
                    json={"thread_id": thread_id, "message": message},
                ) as response:
                    parser = SSEParser()
                    async for chunk in response.aiter_raw():
                        names += [i.name for i in parser.feed(chunk, time.monotonic()) if i.kind == "event"]
                        if until(names):
                            return Outcome(True)
            elif transport == "sse-raw":
                loop = asyncio.get_running_loop()
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, ("127.0.0.1", self.service.port))
                    await loop.sock_sendall(sock, raw_chat_request(self.service.port, thread_id, message))
                    data = b""
                    while chunk := await loop.sock_recv(sock, 65536):
                        data += chunk
                        names = [line[len("event: "):] for line in data.decode("utf-8", "replace").split("\n")
                                 if line.startswith("event: ")]
                        if until(names):
                            return Outcome(True)
                finally:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
            else:
                async with connect(self.ws_url, proxy=None, open_timeout=5) as ws:
                    await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
                    while not until(names):
                        names.append(json.loads(await ws.recv())["event"])
                        if names[-1] in ("metadata", "error"):
                            break
                    else:
                        return Outcome(True)
        return Outcome(False, f"the turn ended before the moment to hang up: {names[-3:]}")


def judge_json(status: int, content_type: str, body: bytes) -> Outcome:
    if not content_type.startswith("application/json"):
        return Outcome(False, f"{status} with {content_type or 'no content type'}")
    try:
        data = json.loads(body)
    except ValueError:
        return Outcome(False, f"{status} with a body that is not JSON")
    if status == 200:
        return Outcome("responses" in data, "" if "responses" in data else f"200 without responses: {data}")
    if set(data) == {"error", "type", "correlation_id"} and data["type"] in KNOWN_ERROR_TYPES:
        return Outcome(True, f"{status} {data['type']}")
    return Outcome(False, f"{status} {data}")


def judge_last_event(name: str, data: dict[str, Any]) -> Outcome:
    if name == "metadata":
        return Outcome(True)
    if name == "error" and data.get("type") in KNOWN_ERROR_TYPES and data.get("error"):
        return Outcome(True, f"error event {data['type']}")
    return Outcome(False, f"the stream ended with {name} {data}")


def raw_chat_request(port: int, thread_id: str, message: str, *, correlation_id: str = "", close: bool = False) -> bytes:
    body = json.dumps({"thread_id": thread_id, "message": message}).encode()
    headers = [f"POST /chat HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
               "Accept: text/event-stream", f"Content-Length: {len(body)}"]
    if correlation_id:
        headers.append(f"X-Correlation-ID: {correlation_id}")
    if close:
        headers.append("Connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------------------------------------
# The faults. Each takes the suite, a client, a new thread and the try's number, and says how the
# faulty turn ended; the suite then checks the thread with a plain message.

Fault = Callable[[Suite, httpx.AsyncClient, str, int], Awaitable[Outcome]]


def upstream_fault(message: str) -> Fault:
    async def run(suite: Suite, client: httpx.AsyncClient, thread_id: str, n: int) -> Outcome:
        return await suite.turn(client, thread_id, message, TRANSPORTS[n % len(TRANSPORTS)])
    return run


async def locked_conversation(suite: Suite, client: httpx.AsyncClient, thread_id: str, n: int) -> Outcome:
    """The upstream holds the conversation for 2 s after the turn; the suite's next message goes
    right away and must be retried until it is accepted (THREAD_LOCK_TIMEOUT_SECONDS, 30 s)."""
    return await suite.turn(client, thread_id, "fault:locked 2", TRANSPORTS[n % len(TRANSPORTS)])


def client_gone(message: str, until: Callable[[list[str]], bool]) -> Fault:
    async def run(suite: Suite, client: httpx.AsyncClient, thread_id: str, n: int) -> Outcome:
        return await suite.hang_up(thread_id, message, ("sse", "ws", "sse-raw")[n % 3], until)
    return run


async def concurrent_turns(suite: Suite, client: httpx.AsyncClient, thread_id: str, n: int) -> Outcome:
    """A second message on the thread while the first (~1 s of text) is answered: it waits, both succeed."""
    results: dict[str, Outcome] = {}

    async def first() -> None:
        results["first"] = await suite.turn(client, thread_id, "fault:slow 0.05 20", "sse")

    async def second() -> None:
        await anyio.sleep(0.2)
        results["second"] = await suite.turn(client, thread_id, "me next", ("json", "sse", "ws")[n % 3])

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(first)
        task_group.start_soon(second)
    notes = [f"{k}: {o.note}" for k, o in results.items() if o.note]
    return Outcome(all(o.clean and not o.note for o in results.values()), "; ".join(notes))


async def slow_reader(suite: Suite, client: httpx.AsyncClient, thread_id: str, n: int) -> Outcome:
    """A client that sends its request, then never reads (4 KB receive buffer), on a turn of ~5 MB
    of SSE (more than loopback's socket buffers): the service must drop it after 1 s (its log says
    so, and the socket sees the end once read), and meanwhile answer others (/health) promptly. The
    40,000-event run itself keeps the service busy, so the median answer time is what counts."""
    correlation_id = f"slow-reader-{uuid.uuid4().hex[:12]}"
    offset = suite.service.output_size()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # A real network's segment size: loopback's (~64 KB) exceeds the 4 KB window, and TCP then
    # crawls on zero-window probes (reading the backlog could take minutes).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.settimeout(10)
    latencies: list[float] = []
    request = raw_chat_request(suite.service.port, thread_id, "fault:slow 0 40000",
                               correlation_id=correlation_id, close=True)

    def send_request() -> None:  # blocking, in a worker thread: TRY_TIMEOUT can always cut a try short
        sock.connect(("127.0.0.1", suite.service.port))
        sock.sendall(request)

    try:
        await anyio.to_thread.run_sync(send_request, abandon_on_cancel=True)
        deadline = time.monotonic() + 8
        while not dropped(suite.service, offset, correlation_id):
            if time.monotonic() > deadline:
                return Outcome(False, "not dropped within 8 s")
            started = time.monotonic()
            if (await client.get(f"{suite.base}/health")).status_code != 200:
                return Outcome(False, "/health failed while a client was stuck")
            latencies.append(time.monotonic() - started)
            await anyio.sleep(0.1)
        ending = await anyio.to_thread.run_sync(read_to_the_end, sock, abandon_on_cancel=True)
    finally:
        sock.close()
    if latencies and (statistics.median(latencies) > 0.25 or max(latencies) > 2.0):
        return Outcome(False, f"/health was slow while a client was stuck: {[round(x, 2) for x in latencies]}")
    return Outcome(ending in ("eof", "reset"), f"the socket: {ending}")


def dropped(service: ServerProcess, offset: int, correlation_id: str) -> bool:
    mine = f'"correlation_id":"{correlation_id}"'
    return any("dropping a client" in line and mine in line for line in service.output(offset).splitlines())


def read_to_the_end(sock: socket.socket) -> str:
    """Read what is left, for at most 10 s: "eof", "reset" or "still open"."""
    sock.settimeout(2)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return "eof"
        return "still open"
    except ConnectionResetError:
        return "reset"
    except (TimeoutError, OSError):
        return "still open"


FAULTS: list[tuple[str, Fault]] = [
    ("upstream 429 twice (Retry-After 0.2 s)", upstream_fault("fault:status 429 0.2 x2")),
    ("upstream 500 once", upstream_fault("fault:status 500 x1")),
    ("upstream 401 (key refused)", upstream_fault("fault:status 401")),
    ("upstream stalls 3 s (idle timeout 1 s)", upstream_fault("fault:stall 3")),
    ("upstream cuts the stream", upstream_fault("fault:cut")),
    ("upstream sends a malformed event", upstream_fault("fault:malformed")),
    ("upstream response.failed", upstream_fault("fault:failed")),
    ("upstream error event", upstream_fault("fault:error-event")),
    ("upstream holds the conversation 2 s", locked_conversation),
    ("client gone mid-text", client_gone("fault:slow 0.05 40", lambda names: names.count("thread.message.delta") >= 3)),
    ("client gone during a tool", client_gone('tool:slow_tool {"seconds": 1}',
                                              lambda names: "thread.run.step.created" in names)),
    ("client gone during the follow-up", client_gone('tool:slow_tool {"seconds": 0.3}',
                                                     lambda names: "thread.run.step.completed" in names)),
    ("second turn on the thread at once", concurrent_turns),
    ("client stops reading", slow_reader),
]


@dataclass
class Row:
    name: str
    tries: int = 0
    clean: int = 0
    usable: int = 0

    @staticmethod
    def share(count: int, tries: int) -> str:
        return f"{count}/{tries} ({100 * count // max(tries, 1)}%)"

    @property
    def perfect(self) -> bool:
        return self.tries > 0 and self.clean == self.tries and self.usable == self.tries


async def one_try(suite: Suite, fault: Fault, n: int) -> tuple[Outcome, bool]:
    """The fault on a new thread, then a plain message on that thread."""
    async with http_client() as client:
        try:
            thread_id = await suite.new_thread(client)
        except Exception as exc:
            return Outcome(False, f"no thread: {type(exc).__name__}: {exc}"), False
        try:
            outcome = await fault(suite, client, thread_id, n)
        except Exception as exc:  # a client-side failure is a failed try, not a crash
            outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
        try:
            with anyio.fail_after(TURN_TIMEOUT):
                usable = await suite.thread_usable(client, thread_id)
        except Exception:
            usable = False
    return outcome, usable


async def run_suite(runs: int, verbose: bool) -> list[Row]:
    fake = ServerProcess("tests.fake_openai:app", clean_environment(), health_path="/_fake/health",
                         name="fake-openai").start()
    try:
        service = start_service(fake.url, name="fault-suite-service", UPSTREAM_IDLE_TIMEOUT_SECONDS="1",
                                SLOW_CLIENT_TIMEOUT_SECONDS="1", TOOL_TIMEOUT_SECONDS="5")
        try:
            suite = Suite(service, fake)
            rows = []
            for name, fault in FAULTS:
                row = Row(name)
                for n in range(runs):
                    row.tries += 1
                    outcome, usable = Outcome(False, f"no answer within {TRY_TIMEOUT:g}s"), False
                    with anyio.move_on_after(TRY_TIMEOUT):
                        outcome, usable = await one_try(suite, fault, n)
                    row.clean += outcome.clean
                    row.usable += usable
                    if verbose or not outcome.clean or not usable:
                        print(f"  {name} #{n + 1}: {'clean' if outcome.clean else 'NOT CLEAN'}"
                              f"{f' ({outcome.note})' if outcome.note else ''}, thread "
                              f"{'usable' if usable else 'NOT USABLE'}", flush=True)
                rows.append(row)
            return rows
        finally:
            service.stop()
    finally:
        fake.stop()


def print_table(rows: list[Row]) -> None:
    print("| fault | tries | turns ended cleanly | threads usable afterwards |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.tries} | {Row.share(row.clean, row.tries)} | {Row.share(row.usable, row.tries)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="tries per fault (default 5)")
    parser.add_argument("--verbose", action="store_true", help="print every try, not only failed ones")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    started = time.monotonic()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stopped like Ctrl+C: servers stopped too
    try:
        rows = anyio.run(run_suite, args.runs, args.verbose)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in list(ServerProcess.running):  # also when interrupted mid-way
            server.stop()
    print_table(rows)
    print(f"{len(rows)} faults x {args.runs} tries in {time.monotonic() - started:.0f}s")
    return 0 if all(row.perfect for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

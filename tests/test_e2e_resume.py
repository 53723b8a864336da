"""Resumable streams end to end: the real service under hypercorn, in front of the fake OpenAI.

Clients drop their connections (politely through httpx, or by closing or resetting a raw socket
mid-stream) and come back with Last-Event-ID, by GET /chat/stream/{run_id} or by sending the
same POST again; the text they assemble must be exactly that of an uninterrupted run. Also:
WebSocket resume, cancellation (HTTP and WebSocket, also mid-tool-call), and a real EventSource
in Chromium whose connection a proxy cuts mid-run.
"""

from __future__ import annotations

import asyncio
import random
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.test_browser import CHROMIUM, LAUNCH_ARGS, require_chromium
from tests.e2e import ServerProcess, running_service
from tests.e2e import dump_server_logs_on_failure, fake_upstream  # noqa: F401  (fixtures, used by name)
from tests.test_chat_api import parse_sse

pytestmark = pytest.mark.timeout(60)

RETRY_MS = 300
RUN_CREATED = "thread.run.created"
STEP_CREATED = "thread.run.step.created"
STEP_COMPLETED = "thread.run.step.completed"
DELTA = "thread.message.delta"
MESSAGE_COMPLETED = "thread.message.completed"
RUN_COMPLETED = "thread.run.completed"
RUN_CANCELLED = "thread.run.cancelled"
RESUMED = "thread.run.resumed"
METADATA = "metadata"

SLOW = "fault:slow 0.02 25"
SLOW_TEXT = " ".join(f"word{n}" for n in range(25))
TOOL = 'tool:slow_tool {"seconds": 0.5}'
TOOL_TEXT = "Tool results: slept"
STILL_THERE = "are you still there?"


@pytest.fixture(scope="module")
def service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:  # noqa: F811
    with running_service(fake_upstream.url, name="resume-service", SSE_RETRY_MS=str(RETRY_MS),
                           TOOL_TIMEOUT_SECONDS="5", SSE_HEARTBEAT_SECONDS="0.2") as server:
        yield server


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(20.0))


async def new_thread(client: httpx.AsyncClient, base: str) -> str:
    response = await client.post(f"{base}/threads")
    assert response.status_code == 200, response.text
    return response.json()["thread_id"]


async def responses_requests(client: httpx.AsyncClient, upstream: str) -> list[dict[str, Any]]:
    """Every Responses API request the fake received, in order."""
    response = await client.get(f"{upstream}/_fake/requests")
    assert response.status_code == 200
    return [r for r in response.json() if r["path"] == "/v1/responses" and isinstance(r["body"], dict)]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["delta"]["content"] for e in events if e["event"] == DELTA)


# ---------------------------------------------------------------------------------------------
# SSE over httpx or over a raw socket, with a way to hang up after k events


class SSEReader:
    """Incremental: the service frames with LF only, one blank line after each item."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk.decode("utf-8")  # chunks from the service never split a character
        *blocks, self._buffer = self._buffer.split("\n\n")
        return [item for block in blocks for item in parse_sse(block + "\n\n")]


@dataclass
class Connection:
    """One HTTP exchange: its status, what it delivered, and whether the client hung up early."""

    status: int
    content_type: str = ""
    items: list[dict[str, Any]] = field(default_factory=list)
    dropped: bool = False
    body: bytes = b""
    opened_at: float = 0.0  # when the response's headers came
    ended_at: float = 0.0  # when the client stopped reading

    @property
    def events(self) -> list[dict[str, Any]]:
        return [i for i in self.items if "event" in i]

    @property
    def with_ids(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["id"] is not None]


async def _raw_exchange(port: int, method: str, target: str, headers: dict[str, str],
                        body: bytes | None) -> tuple[Any, int, dict[str, str], bytearray]:
    stream = await anyio.connect_tcp("127.0.0.1", port)
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    await stream.send(head.encode("latin-1") + b"\r\n" + (body or b""))
    buffer = bytearray()
    while b"\r\n\r\n" not in buffer:
        buffer += await stream.receive()
    head_bytes, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    response_headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return stream, status, response_headers, bytearray(rest)


async def _raw_body(stream: Any, headers: dict[str, str], buffer: bytearray) -> AsyncIterator[bytes]:
    """The body as it comes, de-chunked; ends quietly at EOF."""

    async def more() -> bool:
        try:
            buffer.extend(await stream.receive())
            return True
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False

    if headers.get("transfer-encoding", "").lower() != "chunked":
        while True:
            if buffer:
                yield bytes(buffer)
                buffer.clear()
            if not await more():
                return
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            if not await more():
                return
        size = int(bytes(buffer[:end]).split(b";")[0], 16)
        if size == 0:
            return
        while len(buffer) < end + 2 + size + 2:
            if not await more():
                return
        yield bytes(buffer[end + 2 : end + 2 + size])
        del buffer[: end + 2 + size + 2]


async def _hang_up(stream: Any, reset: bool) -> None:
    if reset:  # RST instead of FIN: the most abrupt way a client can vanish
        raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def sse_exchange(
    service: ServerProcess,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    json_body: dict[str, Any] | None = None,
    transport: str = "httpx",
    limit: int | None = None,
    on_item: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 20.0,
) -> Connection:
    """One request; reads SSE until the end, or hangs up after `limit` events that carry an id.

    transport: "httpx" (leaves the response unread: httpx closes the connection), "raw-fin"
    (closes the socket), "raw-rst" (resets it).
    """
    headers = {"Accept": "text/event-stream", **(headers or {})}
    body = None
    if json_body is not None:
        body = orjson.dumps(json_body)
        headers["Content-Type"] = "application/json"
    reader = SSEReader()
    result = Connection(0)
    counted = 0

    def take(chunk: bytes) -> bool:
        """Feed a chunk; True once the client wants to hang up."""
        nonlocal counted
        for item in reader.feed(chunk):
            result.items.append(item)
            if on_item is not None:
                on_item(item)
            if "event" in item and item["id"] is not None:
                counted += 1
                if limit is not None and counted >= limit:
                    return True
        return False

    try:
        with anyio.fail_after(timeout):
            return await _exchange(service, method, target, headers, body, transport, take, result)
    finally:
        result.ended_at = time.monotonic()


async def _exchange(service: ServerProcess, method: str, target: str, headers: dict[str, str], body: bytes | None,
                    transport: str, take: Callable[[bytes], bool], result: Connection) -> Connection:
    if transport == "httpx":
        async with http_client() as client:
            async with client.stream(method, service.url + target, headers=headers, content=body) as response:
                result.opened_at = time.monotonic()
                result.status = response.status_code
                result.content_type = response.headers.get("content-type", "")
                if not result.content_type.startswith("text/event-stream"):
                    result.body = await response.aread()
                    return result
                async for chunk in response.aiter_raw():
                    if take(chunk):
                        result.dropped = True
                        break  # the context closes the half-read response's connection
        return result
    stream, status, response_headers, buffer = await _raw_exchange(service.port, method, target, headers, body)
    result.opened_at = time.monotonic()
    result.status = status
    result.content_type = response_headers.get("content-type", "")
    try:
        chunks = _raw_body(stream, response_headers, buffer)
        if not result.content_type.startswith("text/event-stream"):
            result.body = b"".join([c async for c in chunks])
            return result
        async for chunk in chunks:
            if take(chunk):
                result.dropped = True
                return result
    finally:
        await _hang_up(stream, reset=transport == "raw-rst" and result.dropped)
    return result


def resume_request(how: str, run_id: str, last_id: str, body: dict[str, Any]) -> tuple[str, str, dict[str, str],
                                                                                        dict[str, Any] | None]:
    """(method, target, headers, json body) of a reconnection of the given kind."""
    if how == "get-header":
        return "GET", f"/chat/stream/{run_id}", {"Last-Event-ID": last_id}, None
    if how == "get-query":
        return "GET", f"/chat/stream/{run_id}?last_event_id={quote(last_id)}", {}, None
    assert how == "repost"
    return "POST", "/chat", {"Last-Event-ID": last_id}, body


def check_connection(conn: Connection, *, resumed_after: str | None, run_id: str | None) -> None:
    assert conn.status == 200, (conn.status, conn.body)
    assert conn.content_type.startswith("text/event-stream")
    assert conn.items and conn.items[0] == {"retry": RETRY_MS}, conn.items[:2]
    events = conn.events
    if resumed_after is None:
        return
    assert run_id is not None
    if events:  # a client may hang up before even the first event
        first = events[0]
        assert first["event"] == RESUMED and first["id"] is None, first
        assert first["data"]["after"] == resumed_after and first["data"]["run_id"] == run_id
        assert first["data"]["stream_url"] == f"chat/stream/{run_id}"
        assert all(e["id"] is not None for e in events[1:]), "only the resumed event lacks an id"


# ---------------------------------------------------------------------------------------------
# Drop and resume, many ways


TRANSPORTS = ("httpx", "raw-fin", "raw-rst")
RECONNECTS = ("get-header", "repost", "get-query")


@dataclass
class Session:
    """A client that keeps hanging up and coming back until it has the whole run."""

    service: ServerProcess
    thread_id: str
    message: str
    drops: list[int]  # hang up after this many id'd events, per connection; then read to the end
    pick: int  # varies transports and reconnection kinds between sessions
    delay_before: Callable[[int], float] = lambda attempt: 0.0
    connections: list[tuple[str, str, Connection]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # every id'd event, as assembled

    @property
    def body(self) -> dict[str, Any]:
        return {"thread_id": self.thread_id, "message": self.message}

    @property
    def run_id(self) -> str:
        return self.events[0]["data"]["run_id"]

    async def run(self) -> None:
        attempt = 0
        while not self.events or self.events[-1]["event"] != METADATA:
            assert attempt < 30, "too many reconnections"
            limit = self.drops[attempt] if attempt < len(self.drops) else None
            transport = TRANSPORTS[(self.pick + attempt) % len(TRANSPORTS)]
            await anyio.sleep(self.delay_before(attempt))
            if attempt == 0:
                how = "post"
                conn = await sse_exchange(self.service, "POST", "/chat", json_body=self.body,
                                          transport=transport, limit=limit)
                check_connection(conn, resumed_after=None, run_id=None)
            else:
                how = RECONNECTS[(self.pick + attempt) % len(RECONNECTS)]
                last_id = self.events[-1]["id"]
                method, target, headers, body = resume_request(how, self.run_id, last_id, self.body)
                conn = await sse_exchange(self.service, method, target, headers=headers, json_body=body,
                                          transport=transport, limit=limit)
                check_connection(conn, resumed_after=last_id, run_id=self.run_id)
            self.connections.append((how, transport, conn))
            got = conn.with_ids
            if limit is not None and conn.dropped:
                assert len(got) == limit
            if not conn.dropped:
                assert got and got[-1]["event"] == METADATA, "a stream read to its end ends with metadata"
            self.events.extend(got)
            attempt += 1
        self.check_ids()

    def resumed_live(self) -> bool:
        """Whether a reconnection reached the service while the run was still going (not a replay)."""
        run_started = self.connections[0][2].opened_at  # the POST's headers come once the upstream answered
        run_ended = run_started + self.events[-1]["data"]["elapsed_time_seconds"]
        return any(c.opened_at < run_ended - 0.05 for _, _, c in self.connections[1:])

    def check_ids(self) -> None:
        run_id = self.run_id
        ids = [e["id"] for e in self.events]
        assert ids == [f"{run_id}:{n}" for n in range(1, len(ids) + 1)], f"gap or duplicate: {ids}"
        assert self.events[-1]["data"]["event_count"] == len(ids)

    async def assert_all_delivered_is_204(self, how: str) -> None:
        method, target, headers, body = resume_request(how, self.run_id, self.events[-1]["id"], self.body)
        conn = await sse_exchange(self.service, method, target, headers=headers, json_body=body,
                                  transport="raw-fin")
        assert conn.status == 204 and conn.body == b"" and conn.items == [], (conn.status, conn.body)


@pytest.mark.anyio
async def test_drop_and_resume_assembles_the_uninterrupted_run(
    service: ServerProcess, fake_upstream: ServerProcess  # noqa: F811
) -> None:
    async with http_client() as client:
        reference = Session(service, await new_thread(client, service.url), SLOW, drops=[], pick=0)
        await reference.run()
        assert len(reference.connections) == 1
        names = [e["event"] for e in reference.events]
        assert names == [RUN_CREATED] + [DELTA] * 25 + [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA]
        assert text_of(reference.events) == SLOW_TEXT

        sessions: list[tuple[str, Session]] = []
        for k in range(1, 25):
            rng = random.Random(k)
            later = [rng.randint(1, 8) for _ in range(rng.randint(0, 3))]
            sessions.append((f"k={k} then {later}", Session(service, await new_thread(client, service.url), SLOW,
                                                            drops=[k, *later], pick=k)))
        for seed in (101, 202, 303, 404, 505, 606):
            rng = random.Random(seed)
            drops = [rng.randint(1, 6) for _ in range(rng.randint(3, 7))]
            pauses = [rng.choice([0.0, 0.0, 0.05, 0.15]) for _ in range(len(drops) + 1)]
            sessions.append((f"seed={seed} drops={drops}", Session(
                service, await new_thread(client, service.url), SLOW, drops=drops, pick=seed,
                delay_before=lambda attempt, pauses=pauses: pauses[attempt] if attempt < len(pauses) else 0.0)))

        failures: list[str] = []
        limiter = anyio.CapacityLimiter(10)

        async def play(label: str, session: Session) -> None:
            async with limiter:
                try:
                    await session.run()
                    assert [e["event"] for e in session.events] == names
                    assert text_of(session.events) == SLOW_TEXT
                    await session.assert_all_delivered_is_204(RECONNECTS[session.pick % 3])
                except Exception as exc:  # noqa: BLE001  (collected: report every failing session at once)
                    used = [(how, transport, len(c.with_ids)) for how, transport, c in session.connections]
                    failures.append(f"{label}: {exc!r} (connections: {used})")

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                for label, session in sessions:
                    tg.start_soon(play, label, session)
        assert not failures, "\n".join(failures)

        # Every session dropped at least once, each way was used, and none made a second upstream response.
        used = {(how, transport) for _, s in sessions for how, transport, _ in s.connections}
        assert {h for h, _ in used} == {"post", *RECONNECTS} and {t for _, t in used} == set(TRANSPORTS)
        assert all(any(c.dropped for _, _, c in s.connections) for _, s in sessions)
        live = [label for label, s in sessions if s.resumed_live()]
        # Most do (the run is still streaming when the client comes back); a loaded machine may make fewer.
        assert len(live) >= 3, f"only {len(live)} sessions resumed a live run; the rest replayed"
        requests = await responses_requests(client, fake_upstream.url)
        for label, session in sessions:
            made = [r for r in requests if r["body"].get("conversation") == session.thread_id]
            assert len(made) == 1, f"{label}: {len(made)} upstream responses"


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["get-header", "repost"])
@pytest.mark.parametrize("when", ["during-the-tool", "after-the-tool"])
async def test_drop_during_a_tool_call_and_resume(service: ServerProcess, how: str, when: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    first = await sse_exchange(service, "POST", "/chat", json_body={"thread_id": thread_id, "message": TOOL},
                               transport="raw-rst", limit=2)
    started = time.monotonic()
    got = first.with_ids
    assert [e["event"] for e in got] == [RUN_CREATED, STEP_CREATED] and first.dropped
    assert got[1]["data"]["step"]["name"] == "slow_tool"
    if when == "after-the-tool":
        await anyio.sleep(0.8)
    run_id = got[0]["data"]["run_id"]
    method, target, headers, body = resume_request(how, run_id, got[-1]["id"],
                                                   {"thread_id": thread_id, "message": TOOL})
    arrivals: list[tuple[float, dict[str, Any]]] = []
    rest = await sse_exchange(service, method, target, headers=headers, json_body=body,
                              on_item=lambda item: arrivals.append((time.monotonic(), item)))
    check_connection(rest, resumed_after=got[-1]["id"], run_id=run_id)
    if when == "during-the-tool":
        # The resumed stream was open while the tool still ran: it waited live for the step's end.
        resumed_at = next(at for at, item in arrivals if item.get("event") == RESUMED)
        completed_at = next(at for at, item in arrivals if item.get("event") == STEP_COMPLETED)
        assert resumed_at - started < 0.4 and completed_at - resumed_at > 0.05, (resumed_at, completed_at, started)
    events = got + rest.with_ids
    names = [e["event"] for e in events]
    assert names.count(STEP_CREATED) == 1 and names.count(STEP_COMPLETED) == 1
    assert names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA]
    step = next(e for e in events if e["event"] == STEP_COMPLETED)["data"]["step"]
    assert step["output"] == "slept" and not step["is_error"]
    assert text_of(events) == TOOL_TEXT
    assert [e["id"] for e in events] == [f"{run_id}:{n}" for n in range(1, len(events) + 1)]


@pytest.mark.anyio
async def test_finished_run_reconnect_is_204_and_unknown_is_404(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        session = Session(service, thread_id, "hello there", drops=[], pick=0)
        await session.run()
        for how in RECONNECTS:
            await session.assert_all_delivered_is_204(how)
        # From the start, a finished run is replayed whole.
        replay = await sse_exchange(service, "GET", f"/chat/stream/{session.run_id}")
        assert replay.with_ids == session.events
        for response in (
            await client.get(f"{service.url}/chat/stream/run_unknown0123"),
            await client.get(f"{service.url}/chat/stream/run_unknown0123", headers={"Last-Event-ID": "run_unknown0123:4"}),
            await client.post(f"{service.url}/chat", json={"thread_id": thread_id, "message": "x"},
                              headers={"Accept": "text/event-stream", "Last-Event-ID": "run_unknown0123:4"}),
        ):
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/json")
            body = response.json()
            assert body["type"] == "run_not_found" and body["correlation_id"] == response.headers["x-correlation-id"]


@pytest.mark.anyio
async def test_a_message_sent_again_with_its_key_after_a_lost_connection_is_one_run(
    service: ServerProcess, fake_upstream: ServerProcess  # noqa: F811
) -> None:
    """A JSON client whose connection breaks before the answer (so before it learnt the run id)
    sends the same message with the same Idempotency-Key: it gets that run's answer, and the
    model was asked once; a streaming client gets the run replayed from its start."""
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        body = {"thread_id": thread_id, "message": SLOW}
        with pytest.raises(httpx.ReadTimeout):  # the connection is closed mid-run
            await client.post(f"{service.url}/chat", json=body, headers={"Idempotency-Key": "k-1"}, timeout=0.15)
        with anyio.fail_after(10):  # the first send reached the model (on a slow machine, after the timeout)
            while not any(r["body"].get("conversation") == thread_id
                          for r in await responses_requests(client, fake_upstream.url)):
                await anyio.sleep(0.02)
        with anyio.fail_after(15):
            again = await client.post(f"{service.url}/chat", json=body, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200, again.text
        assert again.json()["responses"] == [SLOW_TEXT]
        replay = await sse_exchange(service, "POST", "/chat", headers={"Idempotency-Key": "k-1"}, json_body=body)
        assert replay.status == 200
        assert replay.events[0]["event"] == RESUMED and replay.events[0]["data"]["run_id"] == again.json()["run_id"]
        assert text_of(replay.events) == SLOW_TEXT and replay.events[-1]["event"] == METADATA
        made = [r for r in await responses_requests(client, fake_upstream.url)
                if r["body"].get("conversation") == thread_id]
        assert len(made) == 1, [r["body"]["input"] for r in made]


@pytest.mark.anyio
async def test_the_same_keyed_message_sent_at_once_over_two_sockets_is_one_run(
    service: ServerProcess, fake_upstream: ServerProcess  # noqa: F811
) -> None:
    """Two tries of one message race (a socket thought dropped, and its replacement): one starts
    the run, the other reads it; neither is refused, and the model is asked once."""
    url = service.url.replace("http://", "ws://") + "/ws/chat"

    async def run_read(ws: ClientConnection) -> str:
        first = orjson.loads(await ws.recv())
        assert first["event"] in (RUN_CREATED, RESUMED), first
        while orjson.loads(await ws.recv())["event"] != METADATA:
            pass
        return str(first["data"]["run_id"])

    async with http_client() as client:
        threads = [await new_thread(client, service.url) for _ in range(8)]
        for thread_id in threads:
            frame = orjson.dumps({"thread_id": thread_id, "message": "fault:slow 0.02 5", "idempotency_key": f"race-{thread_id}"}).decode()
            with anyio.fail_after(15):
                async with connect(url) as one, connect(url) as other:
                    await asyncio.gather(one.send(frame), other.send(frame))
                    run_ids = await asyncio.gather(run_read(one), run_read(other))
            assert run_ids[0] == run_ids[1]
        requests = await responses_requests(client, fake_upstream.url)
        for thread_id in threads:
            assert sum(r["body"].get("conversation") == thread_id for r in requests) == 1


# ---------------------------------------------------------------------------------------------
# WebSocket resume


def ws_url(service: ServerProcess) -> str:
    return service.url.replace("http://", "ws://") + "/ws/chat"


async def ws_frames(ws: ClientConnection, *, limit: int | None = None, timeout: float = 15) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while not frames or frames[-1]["event"] not in (METADATA, "error"):
            frames.append(orjson.loads(await ws.recv()))
            if limit is not None and len(frames) >= limit:
                break
    return frames


@pytest.mark.anyio
@pytest.mark.parametrize("k", [1, 6, 17])
async def test_websocket_resume_after_a_dropped_socket(service: ServerProcess, k: int) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    first = await connect(ws_url(service))
    await first.send(orjson.dumps({"thread_id": thread_id, "message": SLOW}).decode())
    got = await ws_frames(first, limit=k)
    first.transport.abort()  # gone without a close frame
    run_id = got[0]["data"]["run_id"]
    async with connect(ws_url(service)) as second:
        await second.send(orjson.dumps({"resume": run_id, "last_event_id": got[-1]["id"]}).decode())
        resumed, *rest = await ws_frames(second)
        assert resumed["event"] == "thread.run.resumed" and resumed["id"] is None
        assert resumed["data"]["after"] == got[-1]["id"] and resumed["data"]["complete"] is False
        frames = got + rest
        assert [f["id"] for f in frames] == [f"{run_id}:{n}" for n in range(1, len(frames) + 1)]
        assert text_of(frames) == SLOW_TEXT
        assert frames[-1]["event"] == METADATA and frames[-1]["data"]["event_count"] == len(frames)
        # The same connection goes on with a new turn on the thread.
        await second.send(orjson.dumps({"thread_id": thread_id, "message": "hello"}).decode())
        assert text_of(await ws_frames(second)) == "You said: hello"


# ---------------------------------------------------------------------------------------------
# Cancel


@dataclass
class Listener:
    conn: Connection | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    ended_at: float = 0.0

    @property
    def events(self) -> list[dict[str, Any]]:
        return [i for i in self.items if "event" in i]

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e["event"] == name)


async def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


async def assert_thread_usable(client: httpx.AsyncClient, base: str, thread_id: str) -> None:
    response = await client.post(f"{base}/chat", json={"thread_id": thread_id, "message": STILL_THERE})
    assert response.status_code == 200, response.text
    assert response.json()["responses"] == [f"You said: {STILL_THERE}"]


def assert_cancelled(listener: Listener, run_id: str) -> None:
    events = listener.events
    assert [e["event"] for e in events[-2:]] == [RUN_CANCELLED, METADATA], [e["event"] for e in events]
    assert events[-2]["data"] == {"thread_id": events[-1]["data"]["thread_id"], "run_id": run_id,
                                  "reason": "cancelled by the client"}
    assert listener.count(RUN_COMPLETED) == 0 and listener.count(RUN_CANCELLED) == 1
    ids = [e["id"] for e in events if e["id"] is not None]
    assert ids == [f"{run_id}:{n}" for n in range(1, len(ids) + 1)]


@pytest.mark.anyio
async def test_cancel_reaches_every_listener_and_the_thread_goes_on(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        poster, reader = Listener(), Listener()

        async def listen(listener: Listener, method: str, target: str, body: dict[str, Any] | None) -> None:
            listener.conn = await sse_exchange(service, method, target, json_body=body, on_item=listener.items.append)
            listener.ended_at = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen, poster, "POST", "/chat", {"thread_id": thread_id, "message": "fault:slow 0.2 50"})
            await wait_for(lambda: poster.count(DELTA) >= 2)
            run_id = poster.events[0]["data"]["run_id"]
            tg.start_soon(listen, reader, "GET", f"/chat/stream/{run_id}", None)
            await wait_for(lambda: reader.count(DELTA) >= 2)
            response = await client.post(f"{service.url}/runs/{run_id}/cancel")
            cancelled_at = time.monotonic()
            assert response.status_code == 202, response.text
            body = response.json()
            assert body == {"run_id": run_id, "thread_id": thread_id, "status": "cancelling",
                            "correlation_id": response.headers["x-correlation-id"]}
        for listener in (poster, reader):
            assert_cancelled(listener, run_id)
            assert listener.ended_at - cancelled_at < 2.0
            assert listener.count(DELTA) < 50
        assert [e for e in reader.events] == [e for e in poster.events]  # the same events, the same ids

        again = await client.post(f"{service.url}/runs/{run_id}/cancel")
        assert again.status_code == 409 and again.json()["type"] == "run_finished"
        # The cancelled run stays resumable: the tail after any id, then 204.
        last = poster.events[-1]["id"]
        tail = await sse_exchange(service, "GET", f"/chat/stream/{run_id}",
                                  headers={"Last-Event-ID": poster.events[-3]["id"]})
        assert [e["event"] for e in tail.with_ids] == [RUN_CANCELLED, METADATA]
        done = await client.get(f"{service.url}/chat/stream/{run_id}", headers={"Last-Event-ID": last})
        assert done.status_code == 204
        with anyio.fail_after(10):
            await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_cancel_over_websocket(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    async with connect(ws_url(service)) as ws:
        await ws.send(orjson.dumps({"thread_id": thread_id, "message": "fault:slow 0.2 50"}).decode())
        frames: list[dict[str, Any]] = []
        while sum(1 for f in frames if f["event"] == DELTA) < 2:
            frames += await ws_frames(ws, limit=1)
        run_id = frames[0]["data"]["run_id"]
        # A second listener on the same run, over SSE.
        other = Listener()

        async def listen() -> None:
            other.conn = await sse_exchange(service, "GET", f"/chat/stream/{run_id}", on_item=other.items.append)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await wait_for(lambda: other.count(DELTA) >= 2)
            await ws.send(orjson.dumps({"cancel": run_id}).decode())
            started = time.monotonic()
            frames += await ws_frames(ws, timeout=3)
            assert time.monotonic() - started < 2.0
        listener = Listener(items=[{"event": f["event"], "id": f["id"], "data": f["data"]} for f in frames])
        assert_cancelled(listener, run_id)
        assert_cancelled(other, run_id)
        await ws.send(orjson.dumps({"cancel": run_id}).decode())
        error = orjson.loads(await ws.recv())
        assert error["event"] == "error" and error["type"] == "run_finished"
        await ws.send(orjson.dumps({"cancel": "run_unknown0123"}).decode())
        error = orjson.loads(await ws.recv())
        assert error["event"] == "error" and error["type"] == "run_not_found"
        await ws.send(orjson.dumps({"thread_id": thread_id, "message": STILL_THERE}).decode())
        with anyio.fail_after(10):
            assert text_of(await ws_frames(ws)) == f"You said: {STILL_THERE}"


@pytest.mark.anyio
async def test_cancel_during_a_tool_call_leaves_the_thread_usable(
    service: ServerProcess, fake_upstream: ServerProcess  # noqa: F811
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        poster = Listener()

        async def listen() -> None:
            poster.conn = await sse_exchange(
                service, "POST", "/chat", json_body={"thread_id": thread_id, "message": 'tool:slow_tool {"seconds": 3}'},
                on_item=poster.items.append)
            poster.ended_at = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            await wait_for(lambda: poster.count(STEP_CREATED) == 1)
            await anyio.sleep(0.1)  # the tool is running
            run_id = poster.events[0]["data"]["run_id"]
            response = await client.post(f"{service.url}/runs/{run_id}/cancel")
            cancelled_at = time.monotonic()
            assert response.status_code == 202, response.text
        assert poster.ended_at - cancelled_at < 2.0, "the cancel did not stop the tool"
        assert_cancelled(poster, run_id)
        call_id = next(e for e in poster.events if e["event"] == STEP_CREATED)["data"]["step"]["id"]
        names = [e["event"] for e in poster.events]
        ended = poster.events[names.index(STEP_COMPLETED)]["data"]["step"]  # the client sees the step end
        assert ended["id"] == call_id and ended["is_error"] is True, ended
        assert names.index(STEP_COMPLETED) < names.index(RUN_CANCELLED), names
        with anyio.fail_after(15):
            response = await client.post(f"{service.url}/chat", json={"thread_id": thread_id, "message": "next"})
        assert response.status_code == 200, response.text
        made = [r for r in await responses_requests(client, fake_upstream.url)
                if r["body"].get("conversation") == thread_id]
        assert len(made) == 2, [r["body"]["input"] for r in made]
        sent = made[1]["body"]["input"]
        assert [i["type"] for i in sent] == ["function_call_output", "message"], sent
        assert sent[0]["call_id"] == call_id  # the interrupted call was answered upstream, as an error
        assert "error" in orjson.loads(sent[0]["output"])
        # (the fake answers tool outputs before the message: it echoes them)
        assert response.json()["responses"] == [f"Tool results: {sent[0]['output']}"]
        with anyio.fail_after(15):
            await assert_thread_usable(client, service.url, thread_id)


# ---------------------------------------------------------------------------------------------
# A real EventSource, through a proxy that cuts its first stream mid-run



STREAM_REQUEST = re.compile(rb"GET /chat/stream/\S+ HTTP/1\.1\r\n(?:.*?\r\n)*?\r\n", re.S)
LAST_EVENT_ID = re.compile(rb"^last-event-id:\s*(\S+)\r$", re.I | re.M)
STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3})")


class CuttingProxy:
    """A loopback TCP proxy to the service that resets the first /chat/stream connection once it
    has forwarded `cut_after` bytes of that response; everything else passes through."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.connections: list[float] = []  # when each was accepted
        self.stream_requests: list[tuple[float, str | None]] = []  # when, and its Last-Event-ID
        self.stream_statuses: list[int] = []
        self.cuts = 0
        self._cut_pending = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections.append(time.monotonic())
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_writer, upstream_writer]
        state = {"cut": False, "stream": False, "forwarded": 0}

        async def to_service() -> None:
            try:
                while data := await client_reader.read(65536):
                    for request in STREAM_REQUEST.finditer(data):
                        found = LAST_EVENT_ID.search(request.group(0))
                        self.stream_requests.append((time.monotonic(), found.group(1).decode() if found else None))
                        state["stream"] = True
                        if self._cut_pending:
                            self._cut_pending = False
                            state["cut"] = True
                    upstream_writer.write(data)
                    await upstream_writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                upstream_writer.close()

        async def to_client() -> None:
            try:
                while data := await upstream_reader.read(65536):
                    if state["stream"] and (status := STATUS_LINE.match(data)):
                        self.stream_statuses.append(int(status.group(1)))
                    if state["cut"]:
                        room = self.cut_after - state["forwarded"]
                        if len(data) >= room:
                            client_writer.write(data[:room])
                            await client_writer.drain()
                            self.cuts += 1
                            client_writer.transport.abort()
                            upstream_writer.transport.abort()
                            return
                        state["forwarded"] += len(data)
                    client_writer.write(data)
                    await client_writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                client_writer.close()

        await asyncio.gather(to_service(), to_client())


EVENT_SOURCE_SCRIPT = """(runId) => {
  const st = { events: [], opens: 0, errors: [], metadataAt: null, closedAt: null };
  window.__es = st;
  const es = new EventSource("chat/stream/" + runId);
  window.__source = es;
  es.addEventListener("open", () => { st.opens += 1; });
  es.addEventListener("error", () => {
    st.errors.push(es.readyState);
    if (es.readyState === EventSource.CLOSED) st.closedAt = performance.now();
  });
  for (const name of ["thread.run.created", "thread.run.resumed", "thread.message.delta",
                      "thread.message.completed", "thread.run.completed", "metadata"]) {
    es.addEventListener(name, (e) => {
      st.events.push({ name, id: e.lastEventId, data: JSON.parse(e.data) });
      if (name === "metadata") st.metadataAt = performance.now();
    });
  }
}"""


@pytest.mark.anyio
async def test_browser_event_source_resumes_through_a_cut_connection(service: ServerProcess) -> None:
    require_chromium()
    from playwright.async_api import async_playwright

    words = 30
    expected = " ".join(f"word{n}" for n in range(words))
    async with CuttingProxy(service.port, cut_after=900) as proxy, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(proxy.url + "/")
            async with http_client() as client:
                thread_id = await new_thread(client, service.url)
            # Start the run on the service directly; read just its first event, then hang up.
            started = await sse_exchange(service, "POST", "/chat", limit=1,
                                         json_body={"thread_id": thread_id, "message": f"fault:slow 0.1 {words}"})
            run_id = started.with_ids[0]["data"]["run_id"]
            await page.evaluate(EVENT_SOURCE_SCRIPT, run_id)
            await page.wait_for_function("() => window.__es.metadataAt !== null", timeout=20_000)
            await page.wait_for_function("() => window.__source.readyState === 2", timeout=5_000)
            state = await page.evaluate("() => window.__es")
            settled_connections, settled_requests = len(proxy.connections), len(proxy.stream_requests)
            await anyio.sleep(5 * RETRY_MS / 1000)  # several reconnection intervals
            assert await page.evaluate("() => window.__source.readyState") == 2
            assert (len(proxy.connections), len(proxy.stream_requests)) == (settled_connections, settled_requests), \
                "EventSource kept reconnecting after the run ended"
        finally:
            await browser.close()

    assert proxy.cuts == 1
    events = state["events"]
    with_ids = [e for e in events if e["name"] != RESUMED]
    assert "".join(e["data"]["delta"]["content"] for e in with_ids if e["name"] == DELTA) == expected
    ids = [e["id"] for e in with_ids]
    assert ids == [f"{run_id}:{n}" for n in range(1, len(ids) + 1)], f"gap or duplicate: {ids}"
    assert with_ids[-1]["name"] == METADATA and with_ids[-1]["data"]["event_count"] == len(ids)
    assert state["opens"] >= 2, state
    resumed = [e for e in events if e["name"] == RESUMED]
    assert len(resumed) == state["opens"] - 1 and all(r["data"]["run_id"] == run_id for r in resumed)
    # The reconnections said where they stopped; the last one was answered 204, which stopped EventSource.
    assert proxy.stream_requests[0][1] is None
    assert all(last is not None and last.startswith(run_id + ":") for _, last in proxy.stream_requests[1:])
    assert proxy.stream_requests[-1][1] == ids[-1]
    assert int(proxy.stream_requests[1][1].rpartition(":")[2]) < len(ids) // 2  # the cut came early in the run
    assert proxy.stream_statuses[-1] == 204, proxy.stream_statuses
    assert len(proxy.stream_requests) == state["opens"] + 1

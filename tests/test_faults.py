"""Fault injection, end to end: clients that vanish or stop reading, turns that collide, an
upstream that throttles, fails, stalls or breaks its stream, and the access controls.

Everything runs against the real service under hypercorn in front of tests/fake_openai.py, except
the leak check and the connection-reuse check, which serve the app in this process to see the
event loop's tasks and the upstream connection pool. After every fault the thread must still be
usable: the next message on it gets its normal reply (README, "Limits and failure behaviour").


Services (module-scoped, shared by the tests that need the same environment):
- `service`: the e2e defaults, but TOOL_TIMEOUT_SECONDS=5 (so a 1 s tool finishes) and
  SLOW_CLIENT_TIMEOUT_SECONDS=1 (every other client here reads promptly);
- `impatient`: THREAD_LOCK_TIMEOUT_SECONDS=0.5 and UPSTREAM_IDLE_TIMEOUT_SECONDS=1, and
  SSE_HEARTBEAT_SECONDS=1 (a streamed message refused after waiting for a busy thread is a 409);
- `guarded`: SERVICE_API_KEY=secret-key and CORS_ALLOW_ORIGINS=http://app.example;
- `quick_heartbeat`: SSE_HEARTBEAT_SECONDS=0.3 and THREAD_LOCK_TIMEOUT_SECONDS=1.5 (a wait for a
  busy thread longer than the heartbeat interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import httpx
import hypercorn.asyncio
import hypercorn.config
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from app import create_app
from assistant import orchestrator
from assistant.config import load_settings
from tests.e2e import ServerProcess, free_port, running_service
# pytest finds fixtures among the module's names: these are used by name, not referenced.
from tests.e2e import dump_server_logs_on_failure, fake_upstream  # noqa: F401
from tests.test_e2e import (
    DELTA,
    ERROR,
    METADATA,
    RUN_CREATED,
    RUN_FAILED,
    STEP_COMPLETED,
    STEP_CREATED,
    SSEParser,
    SSEResult,
    assert_json_error,
    assert_thread_usable,
    chat_json,
    check_framing,
    fake_requests,
    http_client,
    new_thread,
    sse_chat,
    ws_connect,
    ws_recv,
    ws_turn_frames,
)

pytestmark = pytest.mark.timeout(60)

SERVICE_KEY = "secret-key"
ALLOWED_ORIGIN = "http://app.example"
UPSTREAM_KEY = "sk-e2e-not-a-real-key"  # what tests.e2e.service_environment gives the service
DISCONNECTED = "client disconnected from the stream"
DROPPED = "dropping a client that stopped reading"
WS_DROPPED = "dropping a WebSocket client that stopped reading"
EVENT_LINE = re.compile(rb"^event: ([\w.]+)\n", re.M)  # in a raw (chunked) HTTP response



def assert_replies(result: Any, transport: str, expected: list[str]) -> None:
    """A turn that ended well: the JSON answer, or a validly framed stream, holds these replies."""
    if transport == "json":
        assert result.status_code == 200, result.text
        assert result.json()["responses"] == expected
    else:
        check_framing(result)
        assert result.replies == expected

# ---------------------------------------------------------------------------------------------
# Services


@pytest.fixture(scope="module")
def service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(fake_upstream.url, name="fault-service", TOOL_TIMEOUT_SECONDS="5",
                           SLOW_CLIENT_TIMEOUT_SECONDS="1") as server:
        yield server


@pytest.fixture(scope="module")
def impatient(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(fake_upstream.url, name="fault-impatient", THREAD_LOCK_TIMEOUT_SECONDS="0.5",
                           UPSTREAM_IDLE_TIMEOUT_SECONDS="1", SSE_HEARTBEAT_SECONDS="1") as server:
        yield server


@pytest.fixture(scope="module")
def quick_heartbeat(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(fake_upstream.url, name="fault-quick-heartbeat", SSE_HEARTBEAT_SECONDS="0.3",
                           THREAD_LOCK_TIMEOUT_SECONDS="1.5") as server:
        yield server


@pytest.fixture(scope="module")
def guarded(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(fake_upstream.url, name="fault-guarded", SERVICE_API_KEY=SERVICE_KEY,
                           CORS_ALLOW_ORIGINS=ALLOWED_ORIGIN) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Helpers


def log_entries(server: ServerProcess, offset: int = 0) -> list[dict[str, Any]]:
    """The service's JSON log lines written since byte `offset`."""
    entries = []
    for line in server.output(offset).splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
    return entries


async def wait_for_log(
    server: ServerProcess, offset: int, message: str, correlation_id: str, timeout: float
) -> dict[str, Any] | None:
    """The first log entry with `message` for `correlation_id` written within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for entry in log_entries(server, offset):
            if entry.get("message") == message and entry.get("correlation_id") == correlation_id:
                return entry
        if time.monotonic() >= deadline:
            return None
        await anyio.sleep(0.02)


async def wait_for_upstream_posts(client: httpx.AsyncClient, upstream: str, thread_id: str, count: int,
                                  timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while len(await fake_requests(client, upstream, thread_id)) < count:
            await anyio.sleep(0.02)


async def assistant_texts(client: httpx.AsyncClient, upstream: str, thread_id: str) -> list[str]:
    """The assistant messages the fake's conversation holds (what completed responses stored)."""
    response = await client.get(f"{upstream}/v1/conversations/{thread_id}/items",
                                params={"order": "asc", "limit": 100})
    assert response.status_code == 200, response.text
    return [
        "".join(p.get("text", "") for p in item.get("content") or [])
        for item in response.json()["data"]
        if item.get("type") == "message" and item.get("role") == "assistant"
    ]


def input_types(request: dict[str, Any]) -> list[str]:
    return [item.get("type") for item in request["body"]["input"]]


def raw_chat_request(port: int, thread_id: str, message: str, correlation_id: str, *, close: bool = False) -> bytes:
    body = json.dumps({"thread_id": thread_id, "message": message}).encode()
    head = (
        f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nX-Correlation-ID: {correlation_id}\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body


def reset_and_close(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# ---------------------------------------------------------------------------------------------
# 1. Clients that disconnect at each moment of a turn


Until = Callable[[list[str]], bool]
Trigger = Callable[[], Awaitable[None]]


@dataclass
class HangUp:
    names: list[str] = field(default_factory=list)  # events the client saw before hanging up
    received: int = 0  # response bytes it had got
    closed_at: float = 0.0


async def hang_up_sse_httpx(service: ServerProcess, thread_id: str, message: str, correlation_id: str,
                            until: Until | None, trigger: Trigger | None) -> HangUp:
    """httpx streaming client: leaves the response (closing it) when `until` holds or `trigger` returns."""
    result = HangUp()
    got_headers = False
    async with http_client(headers={"X-Correlation-ID": correlation_id}) as client:

        async def read() -> None:
            nonlocal got_headers
            async with client.stream("POST", f"{service.url}/chat", headers={"Accept": "text/event-stream"},
                                     json={"thread_id": thread_id, "message": message}) as response:
                got_headers = True
                assert response.status_code == 200
                parser = SSEParser()
                async for chunk in response.aiter_raw():
                    result.received += len(chunk)
                    result.names += [i.name for i in parser.feed(chunk, time.monotonic()) if i.kind == "event"]
                    if until is not None and until(result.names):
                        return
                raise AssertionError(f"the stream ended before the moment to hang up: {result.names}")

        if trigger is None:
            await read()
        else:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(read)
                await trigger()
                task_group.cancel_scope.cancel()
            assert not got_headers, "the response had started: not a disconnect before the first byte"
        result.closed_at = time.monotonic()
    return result


async def hang_up_sse_raw(service: ServerProcess, thread_id: str, message: str, correlation_id: str,
                          until: Until | None, trigger: Trigger | None) -> HangUp:
    """A raw socket that sends the request, reads, then resets the connection."""
    result = HangUp()
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", service.port))
        await loop.sock_sendall(sock, raw_chat_request(service.port, thread_id, message, correlation_id))
        data = b""
        if trigger is not None:
            await trigger()
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                pass
            assert data == b"", f"the response had started: {data[:80]!r}"
        else:
            with anyio.fail_after(10):
                while not (until is not None and until(result.names)):
                    chunk = await loop.sock_recv(sock, 65536)
                    assert chunk, f"the stream ended before the moment to hang up: {result.names}"
                    data += chunk
                    result.names = [n.decode() for n in EVENT_LINE.findall(data)]
        result.received = len(data)
    finally:
        reset_and_close(sock)
    result.closed_at = time.monotonic()
    return result


async def hang_up_ws(service: ServerProcess, thread_id: str, message: str, correlation_id: str,
                     until: Until | None, trigger: Trigger | None, *, abort: bool = False) -> HangUp:
    """A WebSocket client: a clean close (close frame), or `abort`: the TCP connection reset."""
    result = HangUp()
    async with ws_connect(service, additional_headers={"X-Correlation-ID": correlation_id}) as ws:
        await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
        if trigger is not None:
            await trigger()
        while until is not None and not until(result.names):
            frame = await ws_recv(ws)
            result.names.append(frame["event"])
            assert frame["event"] not in (METADATA, ERROR), f"the turn ended before the hang-up: {result.names}"
        if abort:
            sock = ws.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.transport.abort()
    result.closed_at = time.monotonic()
    return result


TRANSPORTS = {
    "sse-httpx": hang_up_sse_httpx,
    "sse-raw-reset": hang_up_sse_raw,
    "ws-close": hang_up_ws,
    "ws-reset": partial(hang_up_ws, abort=True),
}


@dataclass
class Moment:
    message: str
    until: Until | None  # None: hang up before the first byte of the answer
    reply: str  # the turn's full reply, which the conversation holds once the run completed
    tool_output: str | None = None  # what the run must have sent upstream for its tool call


MOMENTS = {
    # The first request is throttled for 0.5 s, so nothing is sent back before the hang-up
    # (the service waits 0.2 s for the upstream before starting the stream).
    "before-first-byte": Moment("fault:status 429 0.5 x1", None, "recovered"),
    "mid-text": Moment("fault:slow 0.05 40", lambda names: names.count(DELTA) >= 3,
                       " ".join(f"word{n}" for n in range(40))),
    "during-tool": Moment('tool:slow_tool {"seconds": 1}', lambda names: STEP_CREATED in names,
                          "Tool results: slept", "slept"),
    # The reply to the tool's output streams slowly: the hang-up must land while it streams,
    # not after the service has sent it all (a race a fast reply loses now and then).
    "during-follow-up": Moment('tool:slow_tool {"seconds": 0.3}\nslow-follow-up 0.1', lambda names: STEP_COMPLETED in names,
                               "Tool results: slept", "slept"),
}


@pytest.mark.anyio
@pytest.mark.parametrize("transport", list(TRANSPORTS))
@pytest.mark.parametrize("moment", list(MOMENTS))
async def test_a_client_that_disconnects_costs_the_turn_nothing(
    service: ServerProcess, fake_upstream: ServerProcess, moment: str, transport: str
) -> None:
    spec = MOMENTS[moment]
    correlation_id = f"gone-{moment}-{transport}-{random.randrange(10**9)}"
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        offset = service.output_size()
        trigger: Trigger | None = None
        if spec.until is None:
            if transport.startswith("sse"):
                # Hang up once the run is under way: the upstream got its first (throttled) request.
                trigger = partial(wait_for_upstream_posts, client, fake_upstream.url, thread_id, 1)
            else:
                trigger = partial(anyio.sleep, 0)  # a WebSocket hangs up right after sending its message
        hang_up = await TRANSPORTS[transport](service, thread_id, spec.message, correlation_id, spec.until, trigger)
        assert METADATA not in hang_up.names and ERROR not in hang_up.names, hang_up.names
        if moment == "during-tool":
            assert STEP_COMPLETED not in hang_up.names, "hung up after the tool, not during it"

        if transport.startswith("sse"):
            # The service notices at once (it watches for the disconnect while it streams).
            entry = await wait_for_log(service, offset, DISCONNECTED, correlation_id, timeout=1.0)
            assert entry is not None, f"no {DISCONNECTED!r} within 1 s of closing ({transport}, {moment})"

        # The next message waits for the abandoned run, which finishes without its client.
        await assert_thread_usable(client, service.url, thread_id)
        requests = await fake_requests(client, fake_upstream.url, thread_id)
        texts = await assistant_texts(client, fake_upstream.url, thread_id)

    assert requests[-1]["body"]["input"][-1]["content"][0]["text"] == "are you still there?"
    if moment == "before-first-byte" and transport.startswith("ws"):
        # The connection may be gone before the service reads the message: then no run started.
        assert len(requests) in (1, 3), [input_types(r) for r in requests]
        if len(requests) == 3:
            assert texts[0] == spec.reply
        return
    assert texts[0] == spec.reply, f"the abandoned run did not complete: {texts}"
    if spec.tool_output is not None:
        # The tool's output reached the upstream although nobody was listening any more.
        assert len(requests) == 3, [input_types(r) for r in requests]
        assert input_types(requests[1]) == ["function_call_output"]
        assert requests[1]["body"]["input"][0]["output"] == spec.tool_output
    elif moment == "before-first-byte":
        assert len(requests) == 3, [input_types(r) for r in requests]  # the throttled try, its retry, the next
        assert requests[0]["body"]["input"] == requests[1]["body"]["input"]
    else:
        assert len(requests) == 2, [input_types(r) for r in requests]



@pytest.mark.anyio
@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_client_that_hangs_up_while_sending_its_request_is_no_service_error(
    service: ServerProcess, how: str
) -> None:
    """The moment before any other: the body is half sent. Nothing failed in the service, so its
    log must not report an error (with a traceback) for it, and it goes on serving."""
    correlation_id = f"half-sent-{how}-{random.randrange(10**9)}"
    request = raw_chat_request(service.port, "conv_0123456789abcdef", "x" * 1000, correlation_id)
    offset = service.output_size()
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    sock.sendall(request[: len(request) - 900])
    await anyio.sleep(0.2)  # the service is reading the body
    if how == "reset":
        reset_and_close(sock)
    else:
        sock.close()
    await wait_for_log(service, offset, "Error in ASGI Framework", correlation_id, timeout=0.5)
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        await assert_thread_usable(client, service.url, thread_id)
    mine = [e for e in log_entries(service, offset) if e.get("correlation_id") == correlation_id]
    errors = [(e["level"], e["logger"], e["message"]) for e in mine if e["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors
    assert not [e for e in mine if "exception" in e], "a traceback was logged for a client that went away"


# ---------------------------------------------------------------------------------------------
# 2. Two turns on one thread at once


@pytest.mark.anyio
async def test_a_second_turn_waits_for_the_first_and_their_upstream_calls_never_overlap(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        first_done = anyio.Event()
        results: dict[str, Any] = {}
        samples: list[tuple[float, float, int]] = []  # (asked at, answered at, POSTs the fake had got)

        async def first() -> None:
            results["first"] = await sse_chat(client, service.url, thread_id, "fault:slow 0.05 20")
            first_done.set()

        async def second() -> None:
            await anyio.sleep(0.25)
            results["second_sent"] = time.monotonic()
            results["second"] = await chat_json(client, service.url, thread_id, "me next")
            results["second_done"] = time.monotonic()

        async def sample() -> None:
            while not first_done.is_set():
                asked = time.monotonic()
                count = len(await fake_requests(client, fake_upstream.url, thread_id))
                samples.append((asked, time.monotonic(), count))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(first)
            task_group.start_soon(second)
            task_group.start_soon(sample)
        requests = await fake_requests(client, fake_upstream.url, thread_id)

    first_result = results["first"]
    check_framing(first_result)
    assert first_result.text == " ".join(f"word{n}" for n in range(20))
    assert results["second"].status_code == 200, results["second"].text
    assert results["second"].json()["responses"] == ["You said: me next"]
    assert results["second_done"] >= first_result.all(METADATA)[0].at
    # While the first turn's upstream response was still streaming, the second turn had not
    # reached the upstream, even though it had been sent long before.
    last_delta_at = first_result.all(DELTA)[-1].at
    during = [(a, b, n) for a, b, n in samples if a > results["second_sent"] and b < last_delta_at]
    assert len(during) >= 3, samples
    assert all(n == 1 for _, _, n in during), during
    assert len(requests) == 2
    assert requests[1]["body"]["input"][-1]["content"][0]["text"] == "me next"


@pytest.mark.anyio
async def test_a_second_turn_gets_409_after_the_thread_lock_timeout(
    impatient: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """THREAD_LOCK_TIMEOUT_SECONDS=0.5 against a first turn of ~2 s: JSON and SSE both get 409 (SSE
    waited less than SSE_HEARTBEAT_SECONDS, so its stream had not started)."""
    base = impatient.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        results: dict[str, Any] = {}

        async def first() -> None:
            results["first"] = await sse_chat(client, base, thread_id, "fault:slow 0.1 20")

        async def second() -> None:
            await anyio.sleep(0.3)
            started = time.monotonic()
            results["json"] = await chat_json(client, base, thread_id, "me next")
            results["json_waited"] = time.monotonic() - started
            results["sse"] = await sse_chat(client, base, thread_id, "me next, streamed")
            results["second_done"] = time.monotonic()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(first)
            task_group.start_soon(second)
        requests = await fake_requests(client, fake_upstream.url, thread_id)
        await assert_thread_usable(client, base, thread_id)

    assert_json_error(results["json"], 409, "thread_busy")
    assert 0.4 <= results["json_waited"] < 1.5, results["json_waited"]
    streamed = results["sse"]
    assert streamed.status == 409, streamed
    assert streamed.headers["content-type"].startswith("application/json")
    assert streamed.body["type"] == "thread_busy" and streamed.body["error"]
    assert streamed.body["correlation_id"] == streamed.headers["x-correlation-id"]
    first_result = results["first"]
    check_framing(first_result)
    assert results["second_done"] < first_result.all(METADATA)[0].at, "the refusals came after the first turn"
    # The refused turns never reached the upstream: one POST, the first turn's.
    assert len(requests) == 1, [input_types(r) for r in requests]


async def busy_thread_stream(
    service: ServerProcess, first_message: str, second_message: str, *, key: str | None = None
) -> tuple[SSEResult, SSEResult, float, str, SSEResult | None]:
    """A streamed turn, and 0.3 s into it a second streamed message on the same thread (with an
    Idempotency-Key `key`, sent again once it ended); returns both results, when the second was
    sent, and the thread."""
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        results: dict[str, Any] = {}

        async def first() -> None:
            results["first"] = await sse_chat(client, service.url, thread_id, first_message)

        async def second() -> None:
            await anyio.sleep(0.3)
            results["sent"] = time.monotonic()
            results["second"] = await sse_chat(client, service.url, thread_id, second_message,
                                               headers={"Idempotency-Key": key} if key else None)

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(first)
            task_group.start_soon(second)
        if key:
            results["again"] = await sse_chat(client, service.url, thread_id, second_message,
                                              headers={"Idempotency-Key": key})
        await assert_thread_usable(client, service.url, thread_id)
    return results["first"], results["second"], results["sent"], thread_id, results.get("again")


def first_byte_at(result: SSEResult) -> float:
    return result.items[0].at


@pytest.mark.anyio
async def test_a_streamed_message_waiting_past_the_heartbeat_gets_its_stream_then_its_reply(
    quick_heartbeat: ServerProcess,
) -> None:
    """SSE_HEARTBEAT_SECONDS=0.3, a first turn of ~1 s: the second stream's head and keepalives
    come while it waits for the thread, then its run's events, framed as any stream's."""
    first, second, sent, _, _ = await busy_thread_stream(quick_heartbeat, "fault:slow 0.1 10", "me next")
    check_framing(first)
    check_framing(second)
    assert second.replies == ["You said: me next"]
    assert first_byte_at(second) - sent < 0.3 + 0.25, "the head came about one heartbeat in"
    assert first_byte_at(second) < first.all(METADATA)[0].at, "before the thread was free"
    assert second.all(RUN_CREATED)[0].at >= first.all(METADATA)[0].at
    assert second.raw.count(b"retry: ") == 1  # the retry line once, with the head
    arrivals = [sent, *(item.at for item in second.items)]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.3 + 0.25, gaps  # never silent much longer than a heartbeat


@pytest.mark.anyio
async def test_a_message_refused_after_its_stream_started_is_refused_the_same_way_when_sent_again(
    quick_heartbeat: ServerProcess,
) -> None:
    """Its stream started while it waited for the thread, then OpenAI refused it at once: sent again
    with its Idempotency-Key it gets that run again as a stream (not a plain 502 the first send
    never got), replayed from the start."""
    _, second, _, _, again = await busy_thread_stream(quick_heartbeat, "fault:slow 0.1 10", "fault:status 400",
                                                      key="busy-then-refused")
    check_framing(second, last=ERROR)
    assert second.one(ERROR)["type"] == "upstream_error"
    assert again is not None and again.status == 200, again
    assert again.names[0] == "thread.run.resumed" and again.names[1:] == second.names, again.names
    assert again.one("thread.run.resumed")["run_id"] == second.one(RUN_CREATED)["run_id"]


@pytest.mark.anyio
async def test_a_streamed_message_waiting_past_the_heartbeat_then_thread_busy_gets_an_error_event(
    quick_heartbeat: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """A first turn of ~3 s against THREAD_LOCK_TIMEOUT_SECONDS=1.5: the second stream started
    at the first heartbeat, so its thread_busy is an `error` event, its only event."""
    offset = quick_heartbeat.output_size()
    first, second, sent, thread_id, _ = await busy_thread_stream(quick_heartbeat, "fault:slow 0.1 30", "me next")
    check_framing(first)
    assert second.status == 200 and second.headers["content-type"].startswith("text/event-stream")
    assert second.raw.startswith(b"retry: ")
    assert second.names == [ERROR], second.names
    error = second.one(ERROR)
    assert error["type"] == "thread_busy" and error["error"]
    assert error["correlation_id"] == second.headers["x-correlation-id"]
    assert 1.5 <= second.ended - sent < 2.5
    assert second.ended < first.all(METADATA)[0].at
    assert second.keepalives_between(sent, second.ended) >= 3
    async with http_client() as client:
        requests = await fake_requests(client, fake_upstream.url, thread_id)
    assert len(requests) == 2  # the first turn's and the usability check's: the refused message never went
    entries = log_entries(quick_heartbeat, offset)
    refused = [e for e in entries if "thread_busy" in e.get("message", "")]
    assert len(refused) == 1 and refused[0]["level"] == "INFO", refused
    assert not [e for e in entries if e["level"] in ("ERROR", "CRITICAL")], entries


@pytest.mark.anyio
async def test_a_streamed_message_whose_client_leaves_while_it_waits_is_dropped(
    quick_heartbeat: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """Its stream had started (heartbeats): the client hangs up, nothing goes upstream for it."""
    offset = quick_heartbeat.output_size()
    async with http_client() as client:
        thread_id = await new_thread(client, quick_heartbeat.url)
        async with anyio.create_task_group() as task_group:
            first_done = anyio.Event()

            async def first() -> None:
                await sse_chat(client, quick_heartbeat.url, thread_id, "fault:slow 0.1 10")
                first_done.set()

            task_group.start_soon(first)
            await anyio.sleep(0.3)
            async with client.stream("POST", f"{quick_heartbeat.url}/chat", json={"thread_id": thread_id,
                                     "message": "gone"}, headers={"Accept": "text/event-stream"}) as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    if b"keepalive" in chunk:
                        break  # and hang up
            await first_done.wait()
        await assert_thread_usable(client, quick_heartbeat.url, thread_id)
        requests = await fake_requests(client, fake_upstream.url, thread_id)
    assert len(requests) == 2, [input_types(r) for r in requests]
    entries = log_entries(quick_heartbeat, offset)
    assert any("hung up while its message waited" in e.get("message", "") for e in entries), entries
    assert not [e for e in entries if e["level"] in ("ERROR", "CRITICAL", "WARNING")], entries


# ---------------------------------------------------------------------------------------------
# 3. Clients that stop reading


async def stuck_reader(service: ServerProcess, thread_id: str, message: str, correlation_id: str) -> socket.socket:
    """A raw SSE client with a tiny receive buffer (set before connecting) that never reads.

    It also asks for a real network's segment size: loopback's (~64 KB) is larger than a 4 KB
    receive window, and TCP then crawls along on zero-window probes (reading what the service had
    already sent could take minutes), while the sender's buffers grow to several MB."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", service.port))
    sock.sendall(raw_chat_request(service.port, thread_id, message, correlation_id, close=True))
    return sock


def read_to_the_end(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """What the socket still delivers within `timeout`, and how it ended: "eof", "reset" or "timeout"."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not (chunk := sock.recv(1 << 20)):
                return bytes(data), "eof"
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    except TimeoutError:
        pass
    return bytes(data), "timeout"


async def health_latencies(client: httpx.AsyncClient, base: str, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        response = await client.get(f"{base}/health")
        assert response.status_code == 200
        latencies.append(time.monotonic() - started)
        await anyio.sleep(0.1)
    return latencies


def assert_prompt(latencies: list[float]) -> None:
    """/health answered promptly while a client was stuck. The turn being streamed keeps the
    service busy too (and a loaded CI machine more so), hence the median and a generous maximum: a
    send that held up the event loop would delay every request until the client is dropped."""
    assert latencies, "no /health request was made"
    assert statistics.median(latencies) < 0.25 and max(latencies) < 2.0, [round(x, 3) for x in latencies]


@pytest.mark.anyio
async def test_a_client_that_stops_reading_a_long_echo_costs_nothing(service: ServerProcess) -> None:
    """~30,000 characters of two-letter words, echoed one delta per word: ~1.1 MB of SSE, more than
    the socket buffers hold with a 4 KB receive window and 1400-byte segments, so the service is
    normally left waiting on the client and drops it. (Should the buffers take it all, the stream
    must then be complete.) Either way the connection is over within seconds, the run completes,
    and others are served meanwhile."""
    message = " ".join(["ab"] * 10_000)[:30_000]
    correlation_id = f"stuck-echo-{random.randrange(10**9)}"
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        offset = service.output_size()
        sock = await stuck_reader(service, thread_id, message, correlation_id)
        try:
            latencies = await health_latencies(client, service.url, 2.5)
            dropped = await wait_for_log(service, offset, DROPPED, correlation_id, timeout=0)
            data, ending = await anyio.to_thread.run_sync(read_to_the_end, sock, 10.0)
        finally:
            sock.close()
        assert_prompt(latencies)
        assert ending in ("eof", "reset"), f"the connection was still open ({len(data)} bytes read)"
        assert data.startswith(b"HTTP/1.1 200")
        if dropped is None:  # it all fitted in the buffers: the stream must then be complete
            assert b"event: metadata\n" in data
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_a_client_that_stops_reading_is_dropped_and_the_run_completes(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """~5 MB of SSE (40,000 deltas), more than the kernel buffers: the send blocks, and after
    SLOW_CLIENT_TIMEOUT_SECONDS (1 s) the service drops the client."""
    correlation_id = f"stuck-long-{random.randrange(10**9)}"
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        offset = service.output_size()
        sock = await stuck_reader(service, thread_id, "fault:slow 0 40000", correlation_id)
        try:
            latencies: list[float] = []
            with anyio.fail_after(8):
                while (dropped := await wait_for_log(service, offset, DROPPED, correlation_id, timeout=0)) is None:
                    latencies += await health_latencies(client, service.url, 0.1)
            data, ending = await anyio.to_thread.run_sync(read_to_the_end, sock, 10.0)
        finally:
            sock.close()
        assert dropped["timeout_seconds"] == 1.0
        assert_prompt(latencies)  # the stuck client held nobody else up
        assert ending in ("eof", "reset"), f"the connection was not closed ({len(data)} bytes read)"
        assert b"event: metadata\n" not in data, "the stream was not cut short"
        await assert_thread_usable(client, service.url, thread_id)
        texts = await assistant_texts(client, fake_upstream.url, thread_id)
    assert texts[0].startswith("word0 word1 ") and texts[0].endswith(" word39999")  # the run completed


def stuck_websocket_reader(service: ServerProcess, thread_id: str, message: str, correlation_id: str) -> socket.socket:
    """A raw WebSocket client (no compression offered) that sends one chat frame and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", service.port))
    sock.sendall(
        f"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"X-Correlation-ID: {correlation_id}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = json.dumps({"thread_id": thread_id, "message": message}).encode()
    mask = os.urandom(4)
    assert len(payload) < 126
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


@pytest.mark.anyio
async def test_a_websocket_client_that_stops_reading_is_dropped_and_the_run_completes(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """The WebSocket twin of the SSE case: the writer's send blocks, the watchdog closes the
    connection after SLOW_CLIENT_TIMEOUT_SECONDS (1 s), and the run goes on to its end."""
    correlation_id = f"stuck-ws-{random.randrange(10**9)}"
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        offset = service.output_size()
        sock = await anyio.to_thread.run_sync(
            stuck_websocket_reader, service, thread_id, "fault:slow 0 40000", correlation_id
        )
        try:
            latencies: list[float] = []
            with anyio.fail_after(8):
                while await wait_for_log(service, offset, WS_DROPPED, correlation_id, timeout=0) is None:
                    latencies += await health_latencies(client, service.url, 0.1)
            data, ending = await anyio.to_thread.run_sync(read_to_the_end, sock, 10.0)
        finally:
            sock.close()
        assert_prompt(latencies)
        assert ending in ("eof", "reset"), f"the connection was not closed ({len(data)} bytes read)"
        assert b'"event":"metadata"' not in data, "the stream was not cut short"
        await assert_thread_usable(client, service.url, thread_id)
        texts = await assistant_texts(client, fake_upstream.url, thread_id)
    assert texts[0].startswith("word0 word1 ") and texts[0].endswith(" word39999")


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_a_dropped_client_that_never_reads_again_has_its_connection_reset(
    service: ServerProcess, transport: str
) -> None:
    """Dropped, a client that still reads nothing must not keep its connection: hypercorn's close
    waits for the client to take what was already written (the kernel's buffers and the
    transport's, megabytes here), which it never does, so the socket and the connection's state
    stayed until the client went away. A close that makes no progress for
    SLOW_CLIENT_TIMEOUT_SECONDS (1 s) resets the connection (assistant/hypercorn_mends.py)."""
    correlation_id = f"never-reads-{transport}-{random.randrange(10**9)}"
    marker = DROPPED if transport == "sse" else WS_DROPPED
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        offset = service.output_size()
        if transport == "sse":
            sock = await stuck_reader(service, thread_id, "fault:slow 0 40000", correlation_id)
        else:
            sock = await anyio.to_thread.run_sync(
                stuck_websocket_reader, service, thread_id, "fault:slow 0 40000", correlation_id
            )
        try:
            with anyio.fail_after(8):
                while await wait_for_log(service, offset, marker, correlation_id, timeout=0) is None:
                    await anyio.sleep(0.1)
            await anyio.sleep(3)  # the close's 1 s without progress, with room for a loaded machine
            data, ending = await anyio.to_thread.run_sync(read_to_the_end, sock, 5.0)
        finally:
            sock.close()
        assert ending == "reset", f"the connection was still served ({ending}, {len(data)} bytes read)"
        await assert_thread_usable(client, service.url, thread_id)
    entries = log_entries(service, offset)
    assert not [e for e in entries if e["level"] in ("ERROR", "CRITICAL")], entries
    assert "Traceback" not in service.output(offset)


@pytest.mark.anyio
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_request_body_that_stops_half_way_is_a_408_and_frees_the_connection(
    service: ServerProcess, framing: str
) -> None:
    """A client that sends part of its body and then nothing (slowloris) held its connection for
    ever. After SLOW_CLIENT_TIMEOUT_SECONDS (1 s) without a byte it gets a JSON 408, and the
    connection ends."""
    correlation_id = f"half-body-{framing}-{random.randrange(10**9)}"
    head = (f"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Correlation-ID: {correlation_id}\r\n")
    if framing == "chunked":
        request = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b'8\r\n{"thread\r\n'
    else:
        request = (head + "Content-Length: 64\r\n\r\n").encode() + b'{"thread'

    def exchange() -> tuple[bytes, str]:
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.sendall(request)
            return read_to_the_end(sock, 6.0)

    started = time.monotonic()
    data, ending = await anyio.to_thread.run_sync(exchange)
    elapsed = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    payload = json.loads(data.partition(b"\r\n\r\n")[2])
    assert payload["type"] == "request_timeout" and payload["correlation_id"] == correlation_id, payload
    assert ending == "eof" and 0.9 < elapsed < 5, (ending, elapsed)


@pytest.mark.anyio
async def test_a_websocket_client_that_floods_pings_and_leaves_does_not_flood_the_log(service: ServerProcess) -> None:
    """Every ping is answered; the answers to a client that has gone were each written to the
    lost connection, and asyncio logged a warning for each (thousands from one client)."""
    offset = service.output_size()

    def flood() -> None:
        with socket.create_connection(("127.0.0.1", service.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /ws/chat HTTP/1.1\r\nHost: 127.0.0.1:{service.port}\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
            assert head.startswith(b"HTTP/1.1 101"), head
            ping = bytes([0x89, 0x80]) + os.urandom(4)  # masked, empty
            for _ in range(20):
                sock.sendall(ping * 500)
            reset_and_close(sock)

    await anyio.to_thread.run_sync(flood)
    await anyio.sleep(2.0)
    async with http_client() as client:
        assert (await client.get(f"{service.url}/health")).status_code == 200
    warnings = service.output(offset).count("socket.send() raised exception")
    assert warnings == 0, f"{warnings} log lines for one client's pings"


# ---------------------------------------------------------------------------------------------
# 4. Upstream faults, and the thread afterwards


async def turn(client: httpx.AsyncClient, base: str, thread_id: str, message: str, transport: str) -> Any:
    if transport == "json":
        return await chat_json(client, base, thread_id, message)
    return await sse_chat(client, base, thread_id, message)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_throttled_upstream_is_retried_after_retry_after(
    service: ServerProcess, fake_upstream: ServerProcess, transport: str
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        started = time.monotonic()
        result = await turn(client, service.url, thread_id, "fault:status 429 0.2 x2", transport)
        elapsed = time.monotonic() - started
        assert_replies(result, transport, ["recovered"])
        assert elapsed >= 0.4, f"Retry-After: 0.2 (twice) was not honoured ({elapsed:.2f}s)"
        assert len(await fake_requests(client, fake_upstream.url, thread_id)) == 3
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_failing_upstream_is_retried(service: ServerProcess, fake_upstream: ServerProcess, transport: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await turn(client, service.url, thread_id, "fault:status 500 x1", transport)
        assert_replies(result, transport, ["recovered"])
        assert len(await fake_requests(client, fake_upstream.url, thread_id)) == 2
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_stalled_upstream_is_an_upstream_timeout(impatient: ServerProcess, transport: str) -> None:
    """UPSTREAM_IDLE_TIMEOUT_SECONDS=1 against an upstream silent for 3 s after its first event."""
    async with http_client() as client:
        thread_id = await new_thread(client, impatient.url)
        started = time.monotonic()
        result = await turn(client, impatient.url, thread_id, "fault:stall 3", transport)
        elapsed = time.monotonic() - started
        if transport == "json":
            assert_json_error(result, 504, "upstream_timeout")
        elif result.status == 200:
            check_framing(result, last=ERROR)
            assert result.one(ERROR)["type"] == "upstream_timeout"
        else:
            assert result.status == 504 and result.body["type"] == "upstream_timeout", result
        assert 0.9 <= elapsed < 2.5, f"gave up after {elapsed:.2f}s"
        await assert_thread_usable(client, impatient.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
@pytest.mark.parametrize("message", ["fault:cut", "fault:malformed"])
async def test_a_broken_upstream_stream_is_an_upstream_error(service: ServerProcess, message: str, transport: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await turn(client, service.url, thread_id, message, transport)
        if transport == "json":
            assert_json_error(result, 502, "upstream_error")
        else:
            check_framing(result, last=ERROR)
            assert result.one(ERROR)["type"] == "upstream_error"
            assert DELTA in result.names  # it broke mid-way, after some text
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
@pytest.mark.parametrize(("message", "code"), [("fault:failed", "server_error"), ("fault:error-event", "insufficient_quota")])
async def test_a_failed_upstream_run_is_run_failed(service: ServerProcess, message: str, code: str, transport: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await turn(client, service.url, thread_id, message, transport)
        if transport == "json":
            assert_json_error(result, 502, "run_failed")
        else:
            check_framing(result)
            assert result.names[-2:] == [RUN_FAILED, METADATA], result.names
            failed = result.one(RUN_FAILED)
            assert failed["type"] == "run_failed" and failed["code"] == code and failed["error"]
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["json", "sse"])
async def test_a_conversation_the_upstream_still_holds_is_waited_for(service: ServerProcess, transport: str) -> None:
    """`fault:locked 2`: the upstream refuses the thread (conversation_locked) for 2 s after the turn."""
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        response = await chat_json(client, service.url, thread_id, "fault:locked 2")
        assert response.status_code == 200, response.text
        started = time.monotonic()
        result = await turn(client, service.url, thread_id, "right away", transport)
        waited = time.monotonic() - started
        assert_replies(result, transport, ["You said: right away"])
        assert 1.5 <= waited < 5, f"waited {waited:.2f}s for a thread locked for 2 s"
        await assert_thread_usable(client, service.url, thread_id)


# ---------------------------------------------------------------------------------------------
# 5. Access control and CORS


BAD_CREDENTIALS = [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": SERVICE_KEY},
                   {"Authorization": f"Basic {SERVICE_KEY}"}]


@pytest.mark.anyio
async def test_without_the_service_api_key_only_health_answers(guarded: ServerProcess) -> None:
    base = guarded.url
    chat_body = {"thread_id": "conv_0123456789abcdef", "message": "let me in"}
    async with http_client() as client:
        health = await client.get(f"{base}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        for headers in BAD_CREDENTIALS:
            for method, path, extra in (("POST", "/threads", {}), ("GET", "/start", {}), ("POST", "/chat", {}),
                                        ("POST", "/chat", {"Accept": "text/event-stream"})):
                response = await client.request(method, f"{base}{path}", headers={**headers, **extra},
                                                json=chat_body if path == "/chat" else None)
                assert_json_error(response, 401, "unauthorized")
                assert SERVICE_KEY not in response.text and "wrong-key" not in response.text
    for headers in BAD_CREDENTIALS[:2]:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(guarded, additional_headers={**headers, "X-Correlation-ID": "ws-refused"}):
                pass
        response = refused.value.response
        assert response.status_code == 401 and response.headers["x-correlation-id"] == "ws-refused"
        assert json.loads(response.body) == {"error": "missing or wrong API key: send 'Authorization: Bearer "
                                             "<SERVICE_API_KEY>'", "type": "unauthorized", "correlation_id": "ws-refused"}


@pytest.mark.anyio
async def test_with_the_service_api_key_every_route_works(guarded: ServerProcess) -> None:
    base = guarded.url
    good = {"Authorization": f"Bearer {SERVICE_KEY}"}
    async with http_client(headers=good) as client:
        started = await client.get(f"{base}/start")
        assert started.status_code == 200, started.text
        lowercase = await client.get(f"{base}/start", headers={"Authorization": f"bearer {SERVICE_KEY}"})
        assert lowercase.status_code == 200, lowercase.text  # the scheme is case-insensitive (RFC 9110)
        thread_id = await new_thread(client, base)
        response = await chat_json(client, base, thread_id, "let me in")
        assert response.status_code == 200, response.text
        assert response.json()["responses"] == ["You said: let me in"]
        check_framing(await sse_chat(client, base, thread_id, "streamed"))
    async with ws_connect(guarded, additional_headers=good) as ws:
        await ws.send(json.dumps({"thread_id": thread_id, "message": "over the socket"}))
        frames = await ws_turn_frames(ws)
    assert frames[-1]["event"] == METADATA, frames
    assert frames[-3]["data"]["message"]["content"] == "You said: over the socket"


@pytest.mark.anyio
async def test_cors_allows_only_the_configured_origin(guarded: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    async with http_client() as client:
        allowed = await client.options(f"{guarded.url}/chat", headers={"Origin": ALLOWED_ORIGIN, **preflight})
        other = await client.options(f"{guarded.url}/chat", headers={"Origin": "http://evil.example", **preflight})
        # An actual request from the allowed origin without the key: the browser may read the 401.
        refused = await client.post(f"{guarded.url}/threads", headers={"Origin": ALLOWED_ORIGIN})
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers, other.headers
    assert assert_json_error(other, 400, "cors_refused")["error"].startswith("Disallowed CORS origin")
    assert_json_error(refused, 401, "unauthorized")
    assert refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-correlation-id" in refused.headers["access-control-expose-headers"].lower()


@pytest.mark.anyio
async def test_a_websocket_from_an_origin_cors_does_not_allow_is_refused(guarded: ServerProcess) -> None:
    """A browser opens a WebSocket to any origin without a preflight, so CORS_ALLOW_ORIGINS is
    checked on the handshake: another site's page gets 403, before the API key is even looked at."""
    good = {"Authorization": f"Bearer {SERVICE_KEY}"}
    for headers in ({**good, "X-Correlation-ID": "ws-origin"}, {"X-Correlation-ID": "ws-origin"}):
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(guarded, origin="http://evil.example", additional_headers=headers):
                pass
        response = refused.value.response
        assert response.status_code == 403 and response.headers["x-correlation-id"] == "ws-origin"
        assert json.loads(response.body) == {
            "error": "WebSocket from origin 'http://evil.example' refused: not in CORS_ALLOW_ORIGINS",
            "type": "cors_refused", "correlation_id": "ws-origin"}
    # `null` (a sandboxed frame, a file) is no host of the service's either.
    with pytest.raises(InvalidStatus, match="403"):
        async with ws_connect(guarded, origin="null", additional_headers=good):
            pass
    # The allowed origin, the service's own host (its chat page, directly or behind a proxy that
    # passes the host on) and a client that sends no Origin all get their socket.
    host = guarded.url.removeprefix("http://")
    for origin, headers in ((ALLOWED_ORIGIN, good), (f"http://{host}", good), (f"https://{host.upper()}", good),
                            ("https://assistant.example", {**good, "X-Forwarded-Host": "assistant.example"}),
                            (None, good)):
        async with ws_connect(guarded, origin=origin, additional_headers=headers) as ws:
            await ws.send(json.dumps({"thread_id": "thread_" + "0" * 24, "message": "hi"}))
            assert (await ws_recv(ws))["event"], origin


# ---------------------------------------------------------------------------------------------
# 6. Secrets and stack traces never reach a client (or the log)


@pytest.mark.anyio
async def test_a_refused_upstream_key_never_shows_up_anywhere(service: ServerProcess) -> None:
    """The fake's 401 says "Incorrect API key provided." without echoing the key, so the check is
    that the service's own OPENAI_API_KEY appears in no client payload and nowhere in its output."""
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        as_json = await chat_json(client, service.url, thread_id, "fault:status 401")
        streamed = await sse_chat(client, service.url, thread_id, "fault:status 401")
        async with ws_connect(service) as ws:
            await ws.send(json.dumps({"thread_id": thread_id, "message": "fault:status 401"}))
            frames = await ws_turn_frames(ws)
        await assert_thread_usable(client, service.url, thread_id)
    body = assert_json_error(as_json, 502, "upstream_error")
    assert "credentials" in body["error"]
    assert streamed.status == 502 and streamed.body["type"] == "upstream_error"
    assert frames[-1]["event"] == ERROR and frames[-1]["data"]["type"] == "upstream_error"
    for payload in (as_json.text, streamed.raw.decode(), json.dumps(frames)):
        assert UPSTREAM_KEY not in payload and "not-a-real-key" not in payload
        assert "Traceback" not in payload
    output = service.output()
    assert "service ready" in output  # it is the service's whole output so far, every test's
    assert UPSTREAM_KEY not in output and "not-a-real-key" not in output  # nor any part of the key


@pytest.mark.anyio
async def test_a_tool_that_raises_shows_its_message_but_no_traceback(service: ServerProcess) -> None:
    message = "tool:failing_tool {}"
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        as_json = await chat_json(client, service.url, thread_id, message)
        streamed = await sse_chat(client, service.url, thread_id, message)
        async with ws_connect(service) as ws:
            await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
            frames = await ws_turn_frames(ws)
    assert as_json.status_code == 200, as_json.text
    (reply,) = as_json.json()["responses"]
    assert reply.startswith("Tool results: ") and "ValueError: boom" in reply
    check_framing(streamed)
    (step,) = streamed.steps_completed
    assert step["is_error"] is True and "ValueError: boom" in step["output"]
    ws_steps = [f["data"]["step"] for f in frames if f["event"] == STEP_COMPLETED]
    assert len(ws_steps) == 1 and "ValueError: boom" in ws_steps[0]["output"]
    for payload in (as_json.text, streamed.raw.decode(), json.dumps(frames)):
        assert "boom" in payload
        assert "Traceback" not in payload and 'File "' not in payload


# ---------------------------------------------------------------------------------------------
# 7. Nothing leaks: 200 disconnects at random points, served in this process


def pool_of(app: Any) -> Any:
    """The connection pool (`UpstreamTransport`) behind the service's OpenAI client."""
    return app.state.runs.engine.client._client._transport


@dataclass
class Snapshot:
    tasks: int
    busy_connections: int  # upstream connections not idle (a request or response in flight)
    connections: int

    @classmethod
    def take(cls, app: Any) -> Snapshot:
        connections = pool_of(app).connections
        busy = sum(1 for c in connections if not c.idle)
        return cls(len(asyncio.all_tasks()), busy, len(connections))


async def storm_client(base: str, ws_base: str, upstream: str, rng: random.Random, stats: dict[str, int]) -> None:
    """One client: a new thread, a turn, a hang-up at a random moment (maybe after the end).

    The thread is made at the fake directly: POST /threads through the service is not under test
    here, and it would only load the event loop the service shares with these clients."""
    async with http_client() as client:
        created = await client.post(f"{upstream}/v1/conversations", json={})
        thread_id = created.json()["id"]
        kind = rng.choice(["echo", "tool"])
        message = ("fault:slow 0.01 20" if kind == "echo"
                   else f'tool:slow_tool {{"seconds": {rng.uniform(0.05, 0.3):.2f}}}')
        transport = rng.choice(["sse-httpx", "sse-raw-reset", "ws-close", "ws-reset"])
        hang_up_after = rng.uniform(0.0, 0.5)
        stats[transport] = stats.get(transport, 0) + 1
        ended = False
        if transport == "sse-httpx":
            with anyio.move_on_after(hang_up_after):
                async with client.stream("POST", f"{base}/chat", headers={"Accept": "text/event-stream"},
                                         json={"thread_id": thread_id, "message": message}) as response:
                    async for chunk in response.aiter_raw():
                        ended = ended or b"event: metadata" in chunk
        elif transport == "sse-raw-reset":
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                with anyio.move_on_after(hang_up_after):
                    host, port = base.removeprefix("http://").split(":")
                    await loop.sock_connect(sock, (host, int(port)))
                    await loop.sock_sendall(sock, raw_chat_request(int(port), thread_id, message, "storm"))
                    while chunk := await loop.sock_recv(sock, 65536):
                        ended = ended or b"event: metadata" in chunk
            finally:
                reset_and_close(sock)
        if transport.startswith("ws"):
            # Connect and close outside the cancelled scope: only the reading is cut short.
            ws = await connect(ws_base, proxy=None, open_timeout=5)
            try:
                with anyio.move_on_after(hang_up_after):
                    await ws.send(json.dumps({"thread_id": thread_id, "message": message}))
                    while True:
                        frame = json.loads(await ws.recv())
                        ended = ended or frame["event"] == METADATA
            finally:
                if transport == "ws-reset":
                    sock = ws.transport.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    ws.transport.abort()
                await ws.close()
        stats["ended before the hang-up" if ended else "hung up mid-turn"] += 1


async def serve_in_process(app: Any, port: int, stop: asyncio.Event) -> None:
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 2.0
    await hypercorn.asyncio.serve(app, config, shutdown_trigger=stop.wait)


async def until_true(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await anyio.sleep(0.05)
    return True


@contextlib.asynccontextmanager
async def in_process_service(upstream: str) -> AsyncIterator[tuple[Any, str]]:
    """The app served by hypercorn in this event loop, in front of the fake: (app, base URL)."""
    settings = load_settings({
        "OPENAI_API_KEY": "sk-in-process-not-a-real-key",
        "OPENAI_BASE_URL": f"{upstream}/v1",
        "ASSISTANT_TOOLS": "tests.e2e_tools",
        "TOOL_TIMEOUT_SECONDS": "5",
        "SSE_HEARTBEAT_SECONDS": "0.2",
    })
    app = create_app(settings)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    # The app chains SIGTERM/SIGINT handlers when it starts in the main thread: put pytest's back after.
    saved_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        async with anyio.create_task_group() as server:
            server.start_soon(serve_in_process, app, port, stop)
            try:
                async with http_client() as client:
                    with anyio.fail_after(10):
                        while True:
                            with contextlib.suppress(httpx.TransportError):
                                if (await client.get(f"{base}/health")).status_code == 200:
                                    break
                            await anyio.sleep(0.05)
                yield app, base
            finally:
                stop.set()
    finally:
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)


@pytest.mark.anyio
@pytest.mark.timeout(90)
async def test_no_tasks_or_upstream_connections_leak_after_200_disconnects(fake_upstream: ServerProcess) -> None:
    stats: dict[str, int] = {"ended before the hang-up": 0, "hung up mid-turn": 0}
    peak = {"runs": 0, "connections": 0}
    async with in_process_service(fake_upstream.url) as (app, base):
        ws_base = base.replace("http://", "ws://") + "/ws/chat"
        async with http_client() as client:
            # Warm-up: a tool turn over SSE and an echo over a WebSocket.
            thread_id = await new_thread(client, base)
            warm_up = await sse_chat(client, base, thread_id, 'tool:slow_tool {"seconds": 0.05}')
            assert warm_up.replies == ["Tool results: slept"]
            async with connect(ws_base, proxy=None, open_timeout=5) as ws:
                await ws.send(json.dumps({"thread_id": thread_id, "message": "warm"}))
                while json.loads(await ws.recv())["event"] != METADATA:
                    pass
        runs = app.state.runs
        pool = pool_of(app)
        assert await until_true(lambda: not runs.active_runs, 5)
        await anyio.sleep(0.3)  # the warm-up's connections are closed: let their server tasks end
        baseline = Snapshot.take(app)

        rng = random.Random(2026)
        limiter = anyio.Semaphore(25)

        async def one(seed: int) -> None:
            async with limiter:
                await storm_client(base, ws_base, fake_upstream.url, random.Random(seed), stats)

        async def watch(storm_over: anyio.Event) -> None:
            while not storm_over.is_set():
                peak["runs"] = max(peak["runs"], len(runs.active_runs))
                peak["connections"] = max(peak["connections"], len(pool.connections))
                await anyio.sleep(0.01)

        started = time.monotonic()
        with anyio.fail_after(45):
            storm_over = anyio.Event()
            async with anyio.create_task_group() as watcher:
                watcher.start_soon(watch, storm_over)
                async with anyio.create_task_group() as storm:
                    for _ in range(200):
                        storm.start_soon(one, rng.randrange(2**32))
                storm_over.set()
        storm_seconds = time.monotonic() - started

        all_finished = await until_true(lambda: not runs.active_runs, 15)
        await until_true(lambda: (now := Snapshot.take(app)).tasks <= baseline.tasks
                         and now.busy_connections <= baseline.busy_connections, 5)
        after = Snapshot.take(app)
        limit = pool.max_idle_connections

    print(f"storm: {storm_seconds:.1f}s, {stats}, peak {peak}, baseline {baseline}, after {after}")
    assert stats["ended before the hang-up"] + stats["hung up mid-turn"] == 200, stats
    assert stats["hung up mid-turn"] >= 100, stats  # most clients really left in the middle of a turn
    assert peak["runs"] >= 5, f"the storm never had many turns going at once: {peak}"
    assert all_finished, "some runs never finished"
    assert after.tasks <= baseline.tasks, f"live tasks: {baseline.tasks} at the baseline, {after.tasks} after"
    assert after.busy_connections <= baseline.busy_connections, (baseline, after)
    assert after.connections <= limit, (after, limit)


def client_connections() -> list[asyncio.Task[Any]]:
    """The tasks hypercorn runs for the clients' connections, one each (served in this process)."""
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("_server_callback")]


@pytest.mark.anyio
async def test_a_client_gone_mid_stream_with_a_request_pipelined_behind_it_leaves_nothing(
    fake_upstream: ServerProcess,
) -> None:
    """hypercorn pauses its reader on a request pipelined behind a streamed one until that
    response is done; the client resetting mid-stream left the connection's task waiting for
    good (assistant/hypercorn_mends.py ends it)."""
    async with in_process_service(fake_upstream.url) as (app, base):
        async with http_client() as client:
            thread_id = await new_thread(client, base)
        # That request's connection ended: at once as a rule, but a busy machine has left one open
        # until hypercorn's keep-alive timeout (5 s) closed it.
        assert await until_true(lambda: not client_connections(), 10)
        loop = asyncio.get_running_loop()
        port = int(base.rsplit(":", 1)[1])
        for _ in range(5):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, raw_chat_request(port, thread_id, "fault:slow 0.05 40", "pipelined")
                                        + f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                received = b""
                with anyio.fail_after(5):
                    while DELTA.encode() not in received:
                        received += await loop.sock_recv(sock, 65536)
            finally:
                reset_and_close(sock)
            assert await until_true(lambda: not app.state.runs.active_runs, 10)
        settled = await until_true(lambda: not client_connections(), 5)
        left = client_connections()
    assert settled, f"{len(left)} of five such clients' connections are still served: {left}"


@pytest.mark.anyio
async def test_upstream_connections_are_reused_between_rounds(fake_upstream: ServerProcess) -> None:
    async with in_process_service(fake_upstream.url) as (app, base):
        pool = pool_of(app)
        async with http_client() as client:
            thread_id = await new_thread(client, base)
            for message in ("hello", 'tool:slow_tool {"seconds": 0.01}', "again"):  # four rounds
                response = await chat_json(client, base, thread_id, message)
                assert response.status_code == 200, response.text
        connections = [(c.requests, c.idle) for c in pool.connections]  # before the shutdown closes them
    # One connection (the fake keeps connections alive for 5 s) served the thread and all four rounds.
    assert connections == [(5, True)], connections


@pytest.mark.anyio
async def test_a_streamed_rounds_events_are_parsed_in_the_upstream_connections_read_callback(
    fake_upstream: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path (README, "Where the time goes"): on the service's own transport, each read
    of the upstream's stream is parsed into the run's log from the connection's read callback,
    so the run's task does not wake per delta. (Elsewhere, behind a proxy or under respx, the
    run's task reads the body itself; the other tests cover that.)"""
    in_a_task: list[bool] = []
    log_batch = orchestrator._log_batch

    def spy(parser: Any, log: Any, batch: list[dict[str, Any]]) -> bool:
        in_a_task.append(asyncio.current_task() is not None)
        return log_batch(parser, log, batch)

    monkeypatch.setattr(orchestrator, "_log_batch", spy)
    async with in_process_service(fake_upstream.url) as (_, base):
        async with http_client() as client:
            thread_id = await new_thread(client, base)
            response = await chat_json(client, base, thread_id, "fault:slow 0.03 8")  # 8 deltas, 30 ms apart
            assert response.status_code == 200, response.text
    assert in_a_task.count(False) >= 8, in_a_task

"""End-to-end tests: the real service under hypercorn, in front of the fake OpenAI, over sockets.

Only real clients talk to it: httpx (JSON and streamed SSE), `websockets`, and curl. The fake
upstream's behaviour is chosen by what a test types (see tests/fake_openai.py): echo replies,
`tool:` calls, `fixture:` replays of recorded OpenAI streams and `fault:` directives.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response as HandshakeResponse
from websockets.uri import parse_uri

from tests.conftest import fixtures_dir
from tests.e2e import ServerProcess, running_service
# pytest finds fixtures among the module's names: these are used by name, not referenced.
from tests.e2e import dump_server_logs_on_failure, fake_upstream, impatient_service, service  # noqa: F401

pytestmark = pytest.mark.timeout(60)

RUN_CREATED = "thread.run.created"
STEP_CREATED = "thread.run.step.created"
STEP_COMPLETED = "thread.run.step.completed"
DELTA = "thread.message.delta"
MESSAGE_COMPLETED = "thread.message.completed"
RUN_COMPLETED = "thread.run.completed"
RUN_FAILED = "thread.run.failed"
METADATA = "metadata"
ERROR = "error"

SSE_RETRY_MS = 1500  # what the `service` fixture sets
HEX_ID = re.compile(r"[0-9a-f]{32}")
SLOW_MESSAGE = "fault:slow 0.1 10"  # ten deltas, 0.1 s apart
SLOW_REPLY = " ".join(f"word{n}" for n in range(10))
MULTILINE = "hello stream,\nhow are you?\r\n: not a comment\rdata: nor a field\n\nevent: error — ünïcödé 👋"


# ---------------------------------------------------------------------------------------------
# A WHATWG-conformant Server-Sent Events parser (https://html.spec.whatwg.org/#event-stream-interpretation)


@dataclass
class SSEItem:
    """One thing the stream delivered: a dispatched event, a comment, or a retry field."""

    kind: str  # "event" | "comment" | "retry"
    at: float  # time.monotonic() when the bytes completing it arrived
    name: str = ""
    data: str = ""
    id: str = ""
    retry: int | None = None
    comment: str = ""

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental: feed it bytes as they arrive, get back what each chunk completed."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False  # a leading BOM has been dealt with
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF completes a CRLF
        self._data: list[str] = []
        self._event_type = ""
        self.last_event_id = ""
        self.reconnection_time: int | None = None

    def feed(self, chunk: bytes, at: float) -> list[SSEItem]:
        return self._feed_text(self._decoder.decode(chunk), at)

    def close(self, at: float) -> list[SSEItem]:
        """End of stream: a partial line is a line, but an event not followed by a blank line is dropped."""
        items = self._feed_text(self._decoder.decode(b"", final=True), at)
        if self._buffer:
            items += self._line(self._buffer, at)
            self._buffer = ""
        return items

    def _feed_text(self, text: str, at: float) -> list[SSEItem]:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        if self._skip_lf and text:
            text = text.removeprefix("\n")
            self._skip_lf = False
        if not text:
            return []
        buffer = self._buffer + text
        lines = re.split(r"\r\n|\r|\n", buffer)
        self._buffer = lines.pop()  # what follows the last line ending is not a line yet
        self._skip_lf = buffer.endswith("\r")
        items: list[SSEItem] = []
        for line in lines:
            items += self._line(line, at)
        return items

    def _line(self, line: str, at: float) -> list[SSEItem]:
        if line == "":
            return self._dispatch(at)
        if line.startswith(":"):
            return [SSEItem("comment", at, comment=line[1:].removeprefix(" "))]
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value and all(c in "0123456789" for c in value):
                self.reconnection_time = int(value)
                return [SSEItem("retry", at, retry=int(value))]
        # any other field is ignored
        return []

    def _dispatch(self, at: float) -> list[SSEItem]:
        data, name = self._data, self._event_type or "message"
        self._data, self._event_type = [], ""
        if not data:
            return []
        return [SSEItem("event", at, name=name, data="\n".join(data), id=self.last_event_id)]


def test_sse_parser_follows_the_whatwg_rules() -> None:
    """The parser the other tests rely on, against the spec's corner cases, fed byte by byte."""
    stream = (
        "\ufeffretry: 1500\r\n\r\n"
        ": a comment\n"
        "event: one\nid: r:1\ndata: {\"a\":\rdata:1}\r\n\r\n"  # CR, CRLF, no space after colon
        "data\n\n"  # a field with no colon: data is the empty string, still an event
        "event: ignored\n\n"  # no data: nothing is dispatched and the type is reset
        "retry: 1x\nid: bad\0id\nfoo: bar\ndata:  two spaces\n\n"
        "data: unfinished"
    ).encode()
    parser = SSEParser()
    items: list[SSEItem] = []
    for n in range(len(stream)):
        items += parser.feed(stream[n : n + 1], float(n))
    items += parser.close(float(len(stream)))
    assert [(i.kind, i.name, i.data, i.id, i.retry, i.comment) for i in items] == [
        ("retry", "", "", "", 1500, ""),
        ("comment", "", "", "", None, "a comment"),
        ("event", "one", '{"a":\n1}', "r:1", None, ""),
        ("event", "message", "", "r:1", None, ""),
        ("event", "message", " two spaces", "r:1", None, ""),
    ]


# ---------------------------------------------------------------------------------------------
# Clients


def http_client(**kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(20.0), **kwargs)


@dataclass
class SSEResult:
    status: int
    headers: httpx.Headers
    items: list[SSEItem]
    raw: bytes
    started: float
    ended: float = 0.0
    body: Any = None  # the JSON body when the answer was not a stream

    @property
    def events(self) -> list[SSEItem]:
        return [i for i in self.items if i.kind == "event"]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def all(self, name: str) -> list[SSEItem]:
        return [e for e in self.events if e.name == name]

    def one(self, name: str) -> dict[str, Any]:
        found = self.all(name)
        assert len(found) == 1, f"expected one {name} event, got {self.names}"
        return found[0].json()

    @property
    def text(self) -> str:
        return "".join(e.json()["delta"]["content"] for e in self.all(DELTA))

    @property
    def replies(self) -> list[str]:
        return [e.json()["message"]["content"] for e in self.all(MESSAGE_COMPLETED)]

    @property
    def steps_completed(self) -> list[dict[str, Any]]:
        return [e.json()["step"] for e in self.all(STEP_COMPLETED)]

    def keepalives_between(self, start: float, end: float) -> int:
        return sum(1 for i in self.items if i.kind == "comment" and i.comment == "keepalive" and start <= i.at <= end)


async def sse_chat(
    client: httpx.AsyncClient,
    base: str,
    thread_id: str,
    message: str,
    *,
    timeout: float = 20.0,
    headers: dict[str, str] | None = None,
) -> SSEResult:
    """POST /chat asking for SSE; read the stream to its end, timing every item's arrival."""
    parser = SSEParser()
    started = time.monotonic()
    with anyio.fail_after(timeout):
        async with client.stream(
            "POST",
            f"{base}/chat",
            json={"thread_id": thread_id, "message": message},
            headers={"Accept": "text/event-stream", **(headers or {})},
        ) as response:
            result = SSEResult(response.status_code, response.headers, [], b"", started)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
                result.raw = response.content
                result.body = response.json()
                result.ended = time.monotonic()
                return result
            chunks = []
            async for chunk in response.aiter_raw():
                now = time.monotonic()
                chunks.append(chunk)
                result.items += parser.feed(chunk, now)
            result.ended = time.monotonic()
            result.items += parser.close(result.ended)
            result.raw = b"".join(chunks)
    return result


def check_framing(result: SSEResult, *, last: str = METADATA) -> str:
    """The stream's framing is right; returns the run id."""
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers.get("cache-control") == "no-cache"
    assert result.headers.get("x-accel-buffering") == "no"
    assert result.raw.startswith(f"retry: {SSE_RETRY_MS}\n\n".encode()), result.raw[:80]
    assert result.items[0].kind == "retry" and result.items[0].retry == SSE_RETRY_MS
    events = result.events
    assert events and events[0].name == RUN_CREATED, result.names
    run_id = events[0].json()["run_id"]
    assert run_id.startswith("run_")
    seqs = []
    for event in events:
        assert event.kind == "event" and event.name != "message", event  # every event is named
        prefix, _, seq = event.id.rpartition(":")
        assert prefix == run_id, event.id
        seqs.append(int(seq))
        assert isinstance(event.json(), dict)
    assert seqs == sorted(set(seqs)) and seqs[0] == 1, f"ids must strictly increase: {seqs}"
    assert result.names[-1] == last, result.names
    assert sum(1 for n in result.names if n in (METADATA, ERROR)) == 1, result.names
    assert result.items[-1].kind == "event", "nothing may follow the last event"
    correlation_id = result.headers["x-correlation-id"]
    if last == METADATA:
        metadata = result.one(METADATA)
        assert metadata["run_id"] == run_id
        assert metadata["correlation_id"] == correlation_id
        assert metadata["event_count"] == len(events)
        assert metadata["elapsed_time_seconds"] >= 0
    else:
        error = result.one(ERROR)
        assert set(error) == {"error", "type", "correlation_id"}, error
        assert error["correlation_id"] == correlation_id
    return run_id


async def new_thread(client: httpx.AsyncClient, base: str) -> str:
    response = await client.post(f"{base}/threads")
    assert response.status_code == 200, response.text
    return response.json()["thread_id"]


async def chat_json(client: httpx.AsyncClient, base: str, thread_id: str, message: str) -> httpx.Response:
    return await client.post(f"{base}/chat", json={"thread_id": thread_id, "message": message})


async def assert_thread_usable(client: httpx.AsyncClient, base: str, thread_id: str) -> None:
    """A plain message on the thread gets its normal reply (the thread survived what came before)."""
    response = await chat_json(client, base, thread_id, "are you still there?")
    assert response.status_code == 200, response.text
    assert response.json()["responses"] == ["You said: are you still there?"]


def assert_json_error(response: httpx.Response, status: int, type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers.get("cache-control") == "no-store", response.headers  # README, "Errors"
    body = response.json()
    assert set(body) == {"error", "type", "correlation_id"}, body
    assert body["type"] == type, body
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    assert isinstance(body["error"], str) and body["error"]
    return body


async def fake_requests(client: httpx.AsyncClient, upstream: str, thread_id: str) -> list[dict[str, Any]]:
    """The Responses API requests the fake got for one conversation, in order."""
    response = await client.get(f"{upstream}/_fake/requests")
    assert response.status_code == 200
    return [
        r for r in response.json()
        if r["path"] == "/v1/responses" and isinstance(r["body"], dict) and r["body"].get("conversation") == thread_id
    ]


# ---------------------------------------------------------------------------------------------
# 1. Health, threads, correlation IDs, error shape


@pytest.mark.anyio
async def test_health(service: ServerProcess) -> None:
    async with http_client() as client:
        response = await client.get(f"{service.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert HEX_ID.fullmatch(response.headers["x-correlation-id"])


def test_every_line_the_service_writes_is_a_json_log_line(service: ServerProcess) -> None:
    """Started as the Procfile starts it, hypercorn's own lines ("Running on ...") are JSON log
    lines like the service's, not plain text on stderr: a log shipper parses every line."""
    lines = [line for line in service.output().splitlines() if line.strip()]
    running = [line for line in lines if "Running on" in line]
    assert len(running) == 1, lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
    assert json.loads(running[0])["logger"] == "hypercorn.error"


@pytest.mark.anyio
async def test_threads_are_created_by_post_threads_and_get_start(service: ServerProcess) -> None:
    async with http_client() as client:
        created = await client.post(f"{service.url}/threads")
        started = await client.get(f"{service.url}/start")
    ids = []
    for response in (created, started):
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"thread_id", "initial_message", "correlation_id"}
        assert body["thread_id"].startswith("conv_")
        assert body["initial_message"] == "Hello! Ask me anything."
        assert body["correlation_id"] == response.headers["x-correlation-id"]
        ids.append(body["thread_id"])
    assert ids[0] != ids[1]


@pytest.mark.anyio
async def test_safe_correlation_id_is_echoed(service: ServerProcess) -> None:
    mine = "e2e-Test_1.2:3"
    async with http_client(headers={"X-Correlation-ID": mine}) as client:
        created = await client.post(f"{service.url}/threads")
        failed = await client.post(f"{service.url}/chat", json={"thread_id": "bad id!", "message": "hi"})
    assert created.headers["x-correlation-id"] == mine
    assert created.json()["correlation_id"] == mine
    assert assert_json_error(failed, 400, "invalid_request")["correlation_id"] == mine


@pytest.mark.anyio
@pytest.mark.parametrize("junk", ["has space", "x" * 65, "semi;colon", "<script>", "a/b"])
async def test_unsafe_correlation_id_is_replaced(service: ServerProcess, junk: str) -> None:
    async with http_client() as client:
        response = await client.get(f"{service.url}/health", headers={"X-Correlation-ID": junk})
    assert response.status_code == 200
    replaced = response.headers["x-correlation-id"]
    assert replaced != junk and HEX_ID.fullmatch(replaced)


@pytest.mark.anyio
async def test_errors_are_json_with_a_type(service: ServerProcess) -> None:
    base = service.url
    async with http_client() as client:
        assert_json_error(await client.get(f"{base}/nope"), 404, "not_found")
        assert_json_error(await client.get(f"{base}/chat"), 405, "method_not_allowed")
        bad_json = await client.post(f"{base}/chat", content=b"{not json", headers={"Content-Type": "application/json"})
        assert_json_error(bad_json, 400, "invalid_request")
        assert_json_error(await client.post(f"{base}/chat", json={"thread_id": "conv_x"}), 400, "invalid_request")
        assert_json_error(await client.post(f"{base}/chat", content=b"x", headers={"Content-Type": "text/plain"}),
                          415, "unsupported_media_type")
        too_long = {"thread_id": "conv_x", "message": "x" * 32_001}  # MAX_MESSAGE_CHARS
        assert_json_error(await client.post(f"{base}/chat", json=too_long), 400, "invalid_request")
        huge = {"thread_id": "conv_x", "message": "x" * 300_000}  # MAX_BODY_BYTES
        assert_json_error(await client.post(f"{base}/chat", json=huge), 413, "payload_too_large")


def raw_http_answer(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """What the service answers to `request`, bytes as sent, read until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize(("request_bytes", "status", "type"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "invalid_request"),
    (b"BREW /chat HTCPCP/1.0\r\n\r\n", 400, "invalid_request"),
    # a head still coming past hypercorn's h11_max_incomplete_size (16 KiB), all of it read (no reset)
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000, 431, "request_headers_too_large"),
    (b"POST /chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "not_implemented"),
])
def test_a_request_that_is_not_http_gets_the_services_json_error(
    service: ServerProcess, request_bytes: bytes, status: int, type: str
) -> None:
    """h11 cannot read it, so no route sees it: hypercorn answered with a bare status and no body.
    The answer is the service's own error, with a correlation ID the log line carries too."""
    answer_status, headers, body = raw_http_answer(service.port, request_bytes)
    assert answer_status == status, (headers, body)
    assert headers["content-type"] == "application/json" and headers["cache-control"] == "no-store"
    assert headers["connection"] == "close"
    error = json.loads(body)
    assert set(error) == {"error", "type", "correlation_id"}, error
    assert error["type"] == type and error["error"].startswith("malformed HTTP request: "), error
    assert error["correlation_id"] == headers["x-correlation-id"]
    deadline = time.monotonic() + 5
    while error["correlation_id"] not in service.output():
        assert time.monotonic() < deadline, "no log line carries the error's correlation ID"
        time.sleep(0.05)


HANDSHAKE = (b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Correlation-ID: ws-refused-1\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


@pytest.mark.parametrize(("request_bytes", "status", "type", "message"), [
    # no Sec-WebSocket-Version, and one this server does not speak: hypercorn refused them itself
    (b"GET /ws/chat HTTP/1.1\r\n" + HANDSHAKE + b"\r\n", 400, "invalid_request",
     "not a WebSocket handshake the service takes: it needs HTTP/1.1, Connection: Upgrade, Upgrade: websocket, "
     "a Sec-WebSocket-Key and Sec-WebSocket-Version: 13"),
    (b"GET /ws/chat HTTP/1.1\r\n" + HANDSHAKE + b"Sec-WebSocket-Version: 8\r\n\r\n", 400, "invalid_request", None),
    # a path with no WebSocket (Starlette closed it, a bare 403), an HTTP route's and a static file's too
    (b"GET /chats HTTP/1.1\r\n" + HANDSHAKE + b"Sec-WebSocket-Version: 13\r\n\r\n", 404, "not_found",
     "no WebSocket at /chats: it is at /ws/chat"),
    (b"GET /health HTTP/1.1\r\n" + HANDSHAKE + b"Sec-WebSocket-Version: 13\r\n\r\n", 404, "not_found", None),
    (b"GET /static/chat.js HTTP/1.1\r\n" + HANDSHAKE + b"Sec-WebSocket-Version: 13\r\n\r\n", 404, "not_found", None),
])
def test_a_websocket_handshake_refused_before_the_socket_opens_gets_the_services_json_error(
    service: ServerProcess, request_bytes: bytes, status: int, type: str, message: str | None
) -> None:
    """hypercorn answered these with a bare status: no body, no correlation ID."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(request_bytes)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"content-length: (\d+)", data, re.I).group(1)):  # type: ignore[union-attr]
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"\r\ncontent-type: application/json\r\n" in head and b"\r\nx-correlation-id: ws-refused-1\r\n" in head
    assert (b"\r\nsec-websocket-version: 13\r\n" in head) is (status == 400)  # what it speaks (RFC 6455, 4.4)
    error = json.loads(body)
    assert error["type"] == type and error["correlation_id"] == "ws-refused-1", error
    assert message is None or error["error"] == message


# ---------------------------------------------------------------------------------------------
# 2. JSON replies


@pytest.mark.anyio
async def test_json_reply(service: ServerProcess) -> None:
    async with http_client(headers={"X-Correlation-ID": "json-reply-1"}) as client:
        thread_id = await new_thread(client, service.url)
        first = await chat_json(client, service.url, thread_id, "hello there")
        second = await chat_json(client, service.url, thread_id, "and again — ünïcödé 👋")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["responses"] == ["You said: hello there"]
    assert body["thread_id"] == thread_id
    assert body["run_id"].startswith("run_")
    assert body["correlation_id"] == "json-reply-1" == first.headers["x-correlation-id"]
    assert second.status_code == 200, second.text
    assert second.json()["responses"] == ["You said: and again — ünïcödé 👋"]
    assert second.json()["run_id"] != body["run_id"]


# ---------------------------------------------------------------------------------------------
# 3. and 4. SSE replies: framing, order, incremental arrival


@pytest.mark.anyio
async def test_sse_reply_framing_and_order(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        # Line breaks, and text that would be SSE syntax at the start of a line, must stay inside data.
        result = await sse_chat(client, service.url, thread_id, MULTILINE)
    run_id = check_framing(result)
    names = result.names
    assert names[0] == RUN_CREATED
    assert names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA]
    middle = names[1:-3]
    assert middle and set(middle) == {DELTA}, names
    assert result.one(RUN_CREATED) == {"thread_id": thread_id, "run_id": run_id, "stream_url": f"chat/stream/{run_id}"}
    assert result.one(RUN_COMPLETED) == {"thread_id": thread_id, "run_id": run_id}
    expected = f"You said: {MULTILINE}"
    assert result.text == expected
    message = result.one(MESSAGE_COMPLETED)["message"]
    assert message["content"] == expected and message["author"] == "assistant" and message["id"]
    assert result.one(METADATA)["thread_id"] == thread_id


@pytest.mark.anyio
async def test_sse_deltas_arrive_incrementally(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, SLOW_MESSAGE)
    check_framing(result)
    deltas = result.all(DELTA)
    assert len(deltas) == 10
    assert result.text == SLOW_REPLY == result.replies[0]
    spread = deltas[-1].at - deltas[0].at
    assert spread > 0.5, f"the deltas arrived together ({spread:.3f}s apart): the stream is buffered"
    assert result.all(METADATA)[0].at - deltas[0].at > 0.5


def test_curl_sees_deltas_incrementally(service: ServerProcess) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    with httpx.Client(trust_env=False) as client:
        thread_id = client.post(f"{service.url}/threads").json()["thread_id"]
    command = [
        curl, "-N", "-sS", "--noproxy", "*", "--max-time", "20",
        "-H", "Content-Type: application/json", "-H", "Accept: text/event-stream",
        "--data-binary", json.dumps({"thread_id": thread_id, "message": SLOW_MESSAGE}),
        f"{service.url}/chat",
    ]
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0) as proc:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.append((time.monotonic(), raw.decode().rstrip("\r\n")))
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert lines[0][1] == f"retry: {SSE_RETRY_MS}"
    deltas = [(at, text) for at, text in lines if text == f"event: {DELTA}"]
    assert len(deltas) == 10
    assert deltas[-1][0] - deltas[0][0] > 0.5, "curl got every delta at once"
    event_lines = [text for _, text in lines if text.startswith("event: ")]
    assert event_lines[-1] == f"event: {METADATA}"
    data = [json.loads(text[len("data: "):]) for _, text in lines if text.startswith("data: ")]
    assert "".join(d["delta"]["content"] for d in data if "delta" in d) == SLOW_REPLY


# ---------------------------------------------------------------------------------------------
# 5. WebSocket


def ws_url(service: ServerProcess) -> str:
    return service.url.replace("http://", "ws://") + "/ws/chat"


@asynccontextmanager
async def ws_connect(service: ServerProcess, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    async with connect(ws_url(service), proxy=None, open_timeout=5, **kwargs) as ws:
        yield ws


async def ws_recv(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        frame = await ws.recv()
    assert isinstance(frame, str), "the server sends text frames"
    return json.loads(frame)


async def ws_turn_frames(ws: ClientConnection, timeout: float = 15.0) -> list[dict[str, Any]]:
    """Frames up to the end of the current turn (metadata, or an error event of the run)."""
    frames = []
    with anyio.fail_after(timeout):
        while True:
            frame = await ws_recv(ws)
            frames.append(frame)
            if frame["event"] == METADATA or (frame["event"] == ERROR and frame["id"] is not None):
                return frames


def check_ws_turn(frames: list[dict[str, Any]], thread_id: str, reply: str) -> None:
    names = [f["event"] for f in frames]
    assert names[0] == RUN_CREATED and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA], names
    run_id = frames[0]["data"]["run_id"]
    seqs = [int(f["id"].rpartition(":")[2]) for f in frames]
    assert all(f["id"].startswith(run_id + ":") for f in frames)
    assert seqs == sorted(set(seqs))
    assert "".join(f["data"]["delta"]["content"] for f in frames if f["event"] == DELTA) == reply
    assert frames[-3]["data"]["message"]["content"] == reply
    assert frames[-1]["data"]["thread_id"] == thread_id


def check_ws_error(frame: dict[str, Any], type: str, correlation_id: str) -> None:
    assert frame["event"] == ERROR and frame["id"] is None, frame
    assert frame["type"] == frame["data"]["type"] == type, frame
    assert frame["error"] and frame["correlation_id"] == correlation_id


@pytest.mark.anyio
async def test_websocket_two_turns_on_one_connection(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    async with ws_connect(service, additional_headers={"X-Correlation-ID": "ws-e2e-1"}) as ws:
        assert ws.response is not None and ws.response.headers["x-correlation-id"] == "ws-e2e-1"
        await ws.send(json.dumps({"thread_id": thread_id, "message": "first turn"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: first turn")
        await ws.send(json.dumps({"thread_id": thread_id, "message": "second turn"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: second turn")


@pytest.mark.anyio
async def test_websocket_bad_frames_get_error_frames_and_the_connection_stays_open(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    async with ws_connect(service, additional_headers={"X-Correlation-ID": "ws-e2e-2"}) as ws:
        await ws.send("this is not JSON")
        check_ws_error(await ws_recv(ws), "invalid_request", "ws-e2e-2")
        await ws.send(b'{"thread_id": "x", "message": "binary"}')
        check_ws_error(await ws_recv(ws), "invalid_request", "ws-e2e-2")
        await ws.send(json.dumps({"thread_id": thread_id}))
        check_ws_error(await ws_recv(ws), "invalid_request", "ws-e2e-2")
        await ws.send(json.dumps({"thread_id": thread_id, "message": "after the bad frames"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: after the bad frames")


@pytest.mark.anyio
async def test_websocket_frame_over_the_limit_closes_with_1009(service: ServerProcess) -> None:
    async with ws_connect(service, additional_headers={"X-Correlation-ID": "not safe!"}) as ws:
        assert ws.response is not None and HEX_ID.fullmatch(ws.response.headers["x-correlation-id"])
        await ws.send(json.dumps({"thread_id": "conv_x", "message": "x" * 300_000}))  # MAX_BODY_BYTES
        with anyio.fail_after(10):
            await ws.wait_closed()
        assert ws.close_code == 1009


@pytest.mark.anyio
async def test_websocket_run_errors_arrive_as_events(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    async with ws_connect(service, additional_headers={"X-Correlation-ID": "ws-e2e-4"}) as ws:
        await ws.send(json.dumps({"thread_id": "conv_doesnotexist", "message": "hello?"}))
        frames = await ws_turn_frames(ws)
        assert [f["event"] for f in frames] == [RUN_CREATED, ERROR]
        error = frames[-1]
        assert error["id"] == f"{frames[0]['data']['run_id']}:2"
        assert error["data"]["type"] == "thread_not_found" and error["data"]["correlation_id"] == "ws-e2e-4"
        await ws.send(json.dumps({"thread_id": thread_id, "message": "fault:failed"}))
        frames = await ws_turn_frames(ws)
        assert [f["event"] for f in frames] == [RUN_CREATED, RUN_FAILED, METADATA]
        await ws.send(json.dumps({"thread_id": thread_id, "message": "still here"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: still here")


def ws_pings_within(service: ServerProcess, seconds: float) -> list[float]:
    """Open a WebSocket and read it for `seconds` without sending a message (answering pings, as
    browsers do); returns when each ping came."""
    protocol = ClientProtocol(parse_uri(ws_url(service)))
    protocol.send_request(protocol.connect())
    pings: list[float] = []
    accepted = False
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
        sock.sendall(b"".join(protocol.data_to_send()))
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            assert data, "the service closed the socket"
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, HandshakeResponse):
                    accepted = event.status_code == 101
                elif isinstance(event, Frame) and event.opcode == Opcode.PING:
                    pings.append(time.monotonic())
            sock.sendall(b"".join(protocol.data_to_send()))  # the pongs
    assert accepted
    return pings


@pytest.mark.anyio
async def test_an_idle_websocket_is_pinged_every_ws_ping_seconds(fake_upstream: ServerProcess) -> None:
    """So a proxy that cuts silent connections (Heroku's router after 55 s) leaves it open."""
    with running_service(fake_upstream.url, name="pinging-service", WS_PING_SECONDS="1") as pinging:
        pings = await anyio.to_thread.run_sync(ws_pings_within, pinging, 2.5)
        assert len(pings) == 2, pings  # after one second, then every second
        async with http_client() as client, ws_connect(pinging) as ws:  # and turns go on as before
            thread_id = await new_thread(client, pinging.url)
            await ws.send(json.dumps({"thread_id": thread_id, "message": SLOW_MESSAGE}))
            check_ws_turn(await ws_turn_frames(ws), thread_id, SLOW_REPLY)


@pytest.mark.anyio
async def test_websocket_compression_is_declined_unless_ws_compression_is_on(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """The client offers permessage-deflate, as browsers do: declined by default (a compressor per
    socket is ~100 KiB), taken with WS_COMPRESSION=on; turns work either way."""
    with (running_service(fake_upstream.url, name="compressing-service", WS_COMPRESSION="on") as compressing,
          running_service(fake_upstream.url, name="worker-service", hypercorn_args=("--workers", "1")) as worker):
        # Also in hypercorn's worker process (`--workers 1`), which never reads hypercorn_config.py's code.
        for server, negotiated in ((service, None), (compressing, "permessage-deflate"), (worker, None)):
            async with http_client() as client, ws_connect(server) as ws:
                assert "permessage-deflate" in ws.request.headers["sec-websocket-extensions"]
                extension = ws.response.headers.get("sec-websocket-extensions")
                assert (extension.split(";")[0] if extension else None) == negotiated, extension
                thread_id = await new_thread(client, server.url)
                await ws.send(json.dumps({"thread_id": thread_id, "message": SLOW_MESSAGE}))
                check_ws_turn(await ws_turn_frames(ws), thread_id, SLOW_REPLY)


@pytest.mark.anyio
async def test_websocket_second_turn_while_one_runs_is_refused(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
    async with ws_connect(service, additional_headers={"X-Correlation-ID": "ws-e2e-3"}) as ws:
        await ws.send(json.dumps({"thread_id": thread_id, "message": SLOW_MESSAGE}))
        first = await ws_recv(ws)
        assert first["event"] == RUN_CREATED
        await ws.send(json.dumps({"thread_id": thread_id, "message": "too early"}))
        frames = [first, *await ws_turn_frames(ws)]
        refused = [f for f in frames if f["event"] == ERROR]
        assert len(refused) == 1, frames
        check_ws_error(refused[0], "turn_in_progress", "ws-e2e-3")
        rest = [f for f in frames if f["event"] != ERROR]
        check_ws_turn(rest, thread_id, SLOW_REPLY)
        # The refused message was never run: the next turn is answered normally.
        await ws.send(json.dumps({"thread_id": thread_id, "message": "now it is my turn"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: now it is my turn")


@pytest.mark.anyio
async def test_the_service_runs_under_hypercorns_uvloop_worker(fake_upstream: ServerProcess) -> None:
    """`hypercorn -k uvloop` is hypercorn's own option: a JSON answer, a streamed tool turn and a
    WebSocket turn work on uvloop's loop too (its create_connection refuses asyncio's
    happy_eyeballs_delay, which once turned every upstream call into a 502)."""
    with running_service(fake_upstream.url, name="uvloop-service", hypercorn_args=("--worker-class", "uvloop")) as server:
        async with http_client() as client:
            thread_id = await new_thread(client, server.url)
            answer = await chat_json(client, server.url, thread_id, "hello uvloop")
            assert answer.status_code == 200, answer.text
            assert answer.json()["responses"] == ["You said: hello uvloop"]
            result = await sse_chat(client, server.url, thread_id, 'tool:calculator {"a":2,"b":3,"op":"multiply"}')
        check_framing(result)
        assert result.one(STEP_COMPLETED)["step"]["output"] == "6" and result.text == "Tool results: 6"
        async with ws_connect(server) as ws:
            await ws.send(json.dumps({"thread_id": thread_id, "message": "and over a socket"}))
            check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: and over a socket")


# ---------------------------------------------------------------------------------------------
# 6.-9. Tools


@pytest.mark.anyio
async def test_tool_round_trip(service: ServerProcess, fake_upstream: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, 'tool:calculator {"a":2,"b":3,"op":"multiply"}')
        requests = await fake_requests(client, fake_upstream.url, thread_id)
    check_framing(result)
    names = result.names
    assert names.index(STEP_CREATED) < names.index(STEP_COMPLETED) < names.index(MESSAGE_COMPLETED)
    created = result.one(STEP_CREATED)["step"]
    completed = result.one(STEP_COMPLETED)["step"]
    assert created["name"] == "calculator" and created["type"] == "tool"
    assert json.loads(created["input"]) == {"a": 2, "b": 3, "op": "multiply"}
    assert created["end"] is None and created["output"] is None
    assert completed["id"] == created["id"]
    assert completed["output"] == "6" and completed["is_error"] is False
    assert completed["end"] >= completed["start"]
    assert result.text == "Tool results: 6" and result.replies == ["Tool results: 6"]

    assert len(requests) == 2, requests
    first, follow_up = (r["body"] for r in requests)
    tools = {t["name"]: t for t in first["tools"]}
    assert set(tools) == {"calculator", "get_weather", "slow_tool", "failing_tool", "sync_sleep"}
    calculator = tools["calculator"]
    assert calculator["type"] == "function"
    assert calculator["parameters"]["type"] == "object"
    assert calculator["parameters"]["additionalProperties"] is False
    assert set(calculator["parameters"]["properties"]) == {"a", "b", "op"}
    assert set(calculator["parameters"]["required"]) == {"a", "b", "op"}
    assert first["stream"] is True
    outputs = [i for i in follow_up["input"] if i.get("type") == "function_call_output"]
    assert outputs == [{"type": "function_call_output", "call_id": created["id"], "output": "6"}]
    assert follow_up["tools"] == first["tools"]


@pytest.mark.anyio
async def test_parallel_tool_calls_run_concurrently(service: ServerProcess) -> None:
    message = 'tool:slow_tool {"seconds":0.5}\ntool:slow_tool {"seconds":0.5}'
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, message)
    check_framing(result)
    names = [n for n in result.names if n in (STEP_CREATED, STEP_COMPLETED)]
    assert names == [STEP_CREATED, STEP_CREATED, STEP_COMPLETED, STEP_COMPLETED]
    steps = result.steps_completed
    assert [s["output"] for s in steps] == ["slept", "slept"]
    assert len({s["id"] for s in steps}) == 2
    assert result.text == "Tool results: slept | slept"
    elapsed = result.all(METADATA)[0].at - result.started
    assert elapsed < 0.9, f"two 0.5 s tools took {elapsed:.2f}s: they did not run concurrently"


TOOL_FAILURES = {
    "raises": ("tool:failing_tool {}", ["ValueError: boom"]),
    "times_out": ('tool:slow_tool {"seconds":5}', ["timed out", "slow_tool"]),
    "sync_times_out": ('tool:sync_sleep {"seconds":1.5}', ["timed out", "sync_sleep"]),
    "bad_arguments": ('tool:calculator {"a":"x"}', ["invalid arguments", "calculator", "a:", "b:", "op:"]),
    "not_json": ("tool:calculator {oops", ["not valid JSON"]),
    "unknown": ("tool:nope {}", ["unknown tool 'nope'", "calculator"]),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(TOOL_FAILURES))
async def test_tool_failures_become_error_outputs_and_the_run_completes(service: ServerProcess, case: str) -> None:
    message, needles = TOOL_FAILURES[case]
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, message)
        check_framing(result)
        assert result.names[-2:] == [RUN_COMPLETED, METADATA]
        (step,) = result.steps_completed
        assert step["is_error"] is True
        output = step["output"]
        for needle in needles:
            assert needle in output, output
        assert "Traceback" not in output
        error = json.loads(output)
        assert error["correlation_id"] == result.headers["x-correlation-id"]
        # The model got exactly that output back.
        assert result.text == f"Tool results: {output}"
        if case == "raises":
            assert "boom" in result.text
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_heartbeats_flow_while_a_tool_runs(service: ServerProcess) -> None:
    # 0.9 s rather than 1.0: with TOOL_TIMEOUT_SECONDS=1 a 1.0 s tool races its own timeout.
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, 'tool:slow_tool {"seconds":0.9}')
    check_framing(result)
    created, completed = result.all(STEP_CREATED)[0], result.all(STEP_COMPLETED)[0]
    assert completed.json()["step"]["output"] == "slept"
    beats = result.keepalives_between(created.at, completed.at)
    assert beats >= 3, f"{beats} keepalives in {completed.at - created.at:.2f}s with a 0.2 s heartbeat"
    assert b": keepalive\n\n" in result.raw


@pytest.mark.anyio
async def test_a_run_outlives_an_sse_client_that_disconnects(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        parser = SSEParser()
        with anyio.fail_after(10):
            async with client.stream(
                "POST", f"{service.url}/chat", headers={"Accept": "text/event-stream"},
                json={"thread_id": thread_id, "message": 'tool:slow_tool {"seconds":0.5}'},
            ) as response:
                async for chunk in response.aiter_raw():
                    if any(i.name == STEP_CREATED for i in parser.feed(chunk, time.monotonic())):
                        break  # hang up while the tool runs
        # The next message waits for the first run, which finishes without its client.
        await assert_thread_usable(client, service.url, thread_id)
        requests = await fake_requests(client, fake_upstream.url, thread_id)
    inputs = [r["body"]["input"] for r in requests]
    assert len(inputs) == 3, inputs
    assert [i["type"] for i in inputs[1]] == ["function_call_output"] and inputs[1][0]["output"] == "slept"
    assert inputs[2][-1]["content"][0]["text"] == "are you still there?"


@pytest.mark.anyio
async def test_a_run_outlives_a_websocket_client_that_disconnects(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        async with ws_connect(service) as ws:
            await ws.send(json.dumps({"thread_id": thread_id, "message": 'tool:slow_tool {"seconds":0.5}'}))
            while (await ws_recv(ws))["event"] != STEP_CREATED:
                pass
        await assert_thread_usable(client, service.url, thread_id)
        requests = await fake_requests(client, fake_upstream.url, thread_id)
    assert [i.get("output") for i in requests[1]["body"]["input"]] == ["slept"]


@pytest.mark.anyio
async def test_a_second_message_on_a_busy_thread_waits_for_the_first(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        results: dict[str, Any] = {}

        async def first() -> None:
            results["sse"] = await sse_chat(client, service.url, thread_id, SLOW_MESSAGE)

        async def second() -> None:
            await anyio.sleep(0.3)
            results["json"] = await chat_json(client, service.url, thread_id, "me next")
            results["json_done"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            tg.start_soon(second)
    check_framing(results["sse"])
    assert results["sse"].text == SLOW_REPLY
    assert results["json"].status_code == 200, results["json"].text
    assert results["json"].json()["responses"] == ["You said: me next"]
    assert results["json_done"] >= results["sse"].all(METADATA)[0].at


# ---------------------------------------------------------------------------------------------
# 10. and 12. Upstream errors, and the thread afterwards


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("message", "status", "type"),
    [
        ("fault:status 400", 502, "upstream_error"),
        ("fault:status 401", 502, "upstream_error"),
        ("fault:status 403", 502, "upstream_error"),
        ("fault:failed", 502, "run_failed"),
        ("fault:error-event", 502, "run_failed"),
        ("fault:incomplete", 502, "run_incomplete"),
        ("fault:malformed", 502, "upstream_error"),
        ("fault:cut eof", 502, "upstream_error"),
    ],
)
async def test_upstream_failures_over_json(service: ServerProcess, message: str, status: int, type: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        response = await chat_json(client, service.url, thread_id, message)
        assert_json_error(response, status, type)
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_upstream_credentials_refused_is_reported_as_such(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        body = assert_json_error(await chat_json(client, service.url, thread_id, "fault:status 401"), 502, "upstream_error")
    assert "credentials" in body["error"]
    assert "sk-" not in body["error"]


@pytest.mark.anyio
async def test_unknown_thread_is_404(service: ServerProcess) -> None:
    async with http_client() as client:
        response = await chat_json(client, service.url, "conv_doesnotexist", "hello?")
        assert_json_error(response, 404, "thread_not_found")
        # A streamed request refused before the upstream's first answer gets the same plain error.
        result = await sse_chat(client, service.url, "conv_doesnotexist", "hello?")
    assert result.status == 404 and result.body["type"] == "thread_not_found", result
    assert result.body["correlation_id"] == result.headers["x-correlation-id"]


@pytest.mark.anyio
@pytest.mark.parametrize("message", ["fault:status 400", "fault:status 401"])
async def test_fast_upstream_refusals_over_sse_get_a_plain_http_status(service: ServerProcess, message: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, message)
        assert result.status == 502, result
        assert result.headers["content-type"].startswith("application/json")
        assert result.body["type"] == "upstream_error"
        assert result.body["correlation_id"] == result.headers["x-correlation-id"]
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_a_5xx_is_retried_when_the_conversation_did_not_take_the_input(
    service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        response = await chat_json(client, service.url, thread_id, "fault:status 503 x1")
        assert response.status_code == 200, response.text
        assert response.json()["responses"] == ["recovered"]
        attempts = await fake_requests(client, fake_upstream.url, thread_id)
        assert len(attempts) == 2
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_a_429_is_retried_after_retry_after(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        started = time.monotonic()
        response = await chat_json(client, service.url, thread_id, "fault:status 429 1 x1")
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["responses"] == ["recovered"]
        assert elapsed >= 0.9, f"Retry-After: 1 was not honoured ({elapsed:.2f}s)"
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_persistent_429_is_upstream_rate_limited(impatient_service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, impatient_service.url)
        response = await chat_json(client, impatient_service.url, thread_id, "fault:status 429 x9")
        assert_json_error(response, 502, "upstream_rate_limited")
        await assert_thread_usable(client, impatient_service.url, thread_id)


@pytest.mark.anyio
async def test_persistent_5xx_is_retried_then_reported(
    impatient_service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, impatient_service.url)
        response = await chat_json(client, impatient_service.url, thread_id, "fault:status 503")
        assert_json_error(response, 502, "upstream_error")
        assert len(await fake_requests(client, fake_upstream.url, thread_id)) == 2  # UPSTREAM_MAX_RETRIES=1
        await assert_thread_usable(client, impatient_service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("message", "failure"),
    [
        ("fault:failed", {"type": "run_failed", "code": "server_error"}),
        ("fault:error-event", {"type": "run_failed", "code": "insufficient_quota"}),
        ("fault:incomplete", {"type": "run_incomplete", "code": "max_output_tokens"}),
    ],
)
async def test_failed_runs_over_sse(service: ServerProcess, message: str, failure: dict[str, str]) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, message)
        check_framing(result)
        assert result.names[-2:] == [RUN_FAILED, METADATA], result.names
        failed = result.one(RUN_FAILED)
        assert set(failed) == {"error", "type", "code"} and failed["error"]
        assert {k: failed[k] for k in failure} == failure
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize("message", ["fault:malformed", "fault:cut eof"])
async def test_broken_upstream_over_sse_ends_with_an_error_event(service: ServerProcess, message: str) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, message)
        check_framing(result, last=ERROR)
        assert result.one(ERROR)["type"] == "upstream_error"
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
@pytest.mark.parametrize(("message", "use_impatient"), [("fault:cut", False), ("fault:stall 2", True)])
async def test_thread_survives_a_broken_upstream_connection(
    service: ServerProcess, impatient_service: ServerProcess, message: str, use_impatient: bool
) -> None:
    """A dropped upstream connection, or one silent past UPSTREAM_IDLE_TIMEOUT_SECONDS (0.5 s here)."""
    base = impatient_service.url if use_impatient else service.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        response = await chat_json(client, base, thread_id, message)
        assert response.status_code >= 500
        body = response.json()
        assert set(body) == {"error", "type", "correlation_id"} and "Traceback" not in body["error"]
        result = await sse_chat(client, base, thread_id, message)  # the same, streamed
        check_framing(result, last=ERROR)
        assert DELTA in result.names or message.startswith("fault:stall")
        await assert_thread_usable(client, base, thread_id)


@pytest.mark.anyio
async def test_upstream_connection_dropped_mid_stream_is_an_upstream_error(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        response = await chat_json(client, service.url, thread_id, "fault:cut")
        assert_json_error(response, 502, "upstream_error")


@pytest.mark.anyio
async def test_upstream_stalling_mid_stream_is_an_upstream_timeout(impatient_service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, impatient_service.url)
        response = await chat_json(client, impatient_service.url, thread_id, "fault:stall 2")
        assert_json_error(response, 504, "upstream_timeout")


REASONING = "fixture:openai-reasoning-encrypted-content.1.chunks.txt"  # three tool rounds, then text


@pytest.mark.anyio
async def test_tool_round_limit_fails_the_run_and_the_unanswered_call_is_answered_next_turn(
    impatient_service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """MAX_TOOL_ROUNDS=1: the second round's call is never run; its "interrupted" output goes upstream
    with the thread's next message, so the upstream accepts that message."""
    base = impatient_service.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        assert_json_error(await chat_json(client, base, thread_id, REASONING), 502, "tool_rounds_exceeded")
        response = await chat_json(client, base, thread_id, "next turn")
        assert response.status_code == 200, response.text
        (reply,) = response.json()["responses"]
        assert reply.startswith("Tool results: ") and "tool round limit reached" in reply
        requests = await fake_requests(client, fake_upstream.url, thread_id)
        sent = requests[-1]["body"]["input"]
        assert [i["type"] for i in sent] == ["function_call_output", "message"], sent
        assert sent[0]["call_id"] == "call_Q6pW65MUgW9vF59BmItYGos3"  # the fixture's second call
        await assert_thread_usable(client, base, thread_id)


@pytest.mark.anyio
async def test_a_call_left_unanswered_by_another_instance_is_repaired(
    service: ServerProcess, impatient_service: ServerProcess, fake_upstream: ServerProcess
) -> None:
    """The instance holding the undelivered output is not the one that gets the next message: the
    upstream refuses the message (a call has no output) and the service answers the orphan call."""
    async with http_client() as client:
        thread_id = await new_thread(client, impatient_service.url)
        response = await chat_json(client, impatient_service.url, thread_id, REASONING)
        assert_json_error(response, 502, "tool_rounds_exceeded")
        response = await chat_json(client, service.url, thread_id, "next turn")
        assert response.status_code == 200, response.text
        (reply,) = response.json()["responses"]
        assert "interrupted" in reply
        requests = await fake_requests(client, fake_upstream.url, thread_id)
        refused, repaired = requests[-2]["body"]["input"], requests[-1]["body"]["input"]
        assert [i["type"] for i in refused] == ["message"]
        assert [i["type"] for i in repaired] == ["function_call_output", "message"]
        assert repaired[0]["call_id"] == "call_Q6pW65MUgW9vF59BmItYGos3"
        await assert_thread_usable(client, service.url, thread_id)


@pytest.mark.anyio
async def test_a_thread_the_upstream_still_holds_is_waited_for(service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        response = await chat_json(client, service.url, thread_id, "fault:locked 1")
        assert response.status_code == 200, response.text
        started = time.monotonic()
        await assert_thread_usable(client, service.url, thread_id)  # refused upstream for ~1 s, retried
        assert time.monotonic() - started >= 0.5


# ---------------------------------------------------------------------------------------------
# 11. Every recorded OpenAI stream through the service


def _fixture_files() -> list[str]:
    return sorted(p.name for p in fixtures_dir().glob("*.chunks.txt"))


def _check_issue_20047(result: SSEResult) -> None:
    assert result.names[-2:] == [RUN_COMPLETED, METADATA]
    assert result.text == "OK" and result.replies == ["OK"]


def _check_issue_19493(result: SSEResult) -> None:
    assert result.names[-2:] == [RUN_COMPLETED, METADATA]
    created = result.one(STEP_CREATED)["step"]
    (step,) = result.steps_completed
    assert created["name"] == step["name"] == "get_weather"
    assert json.loads(created["input"]) == {"city": "Beijing"}
    assert step["is_error"] is False
    assert json.loads(step["output"]) == {"city": "Beijing", "temperature_c": 17, "conditions": "sunny"}
    # The fixture has one response; the fake answers the tool output by its own rules.
    assert result.replies == [f"Tool results: {step['output']}"]


def _check_reasoning(result: SSEResult) -> None:
    assert result.names[-2:] == [RUN_COMPLETED, METADATA]
    steps = result.steps_completed
    assert [s["name"] for s in steps] == ["calculator"] * 3
    assert [s["output"] for s in steps] == ["19", "57", "570"]
    assert not any(s["is_error"] for s in steps)
    assert len(result.all(STEP_CREATED)) == 3
    assert result.text == "The final result is **570**."
    assert result.replies == ["The final result is **570**."]


def _check_openai_error(result: SSEResult) -> None:
    assert result.names[-2:] == [RUN_FAILED, METADATA]
    failed = result.one(RUN_FAILED)
    assert failed["code"] == "insufficient_quota" and "quota" in failed["error"]


def _check_failed_only(result: SSEResult) -> None:
    assert result.names == [RUN_CREATED, RUN_FAILED, METADATA]
    failed = result.one(RUN_FAILED)
    assert failed["code"] == "rate_limit_exceeded" and "Request too large" in failed["error"]


def _check_parallel_wrapper(result: SSEResult) -> None:
    # Its very first line is broken, so the run usually fails within the service's wait for the
    # upstream's first answer: a plain 502 (README, "Errors"). A slower upstream read would give a
    # stream ending with the same error as an event; both are correct.
    if result.status == 200:
        assert result.names == [RUN_CREATED, ERROR]
        error = result.one(ERROR)
    else:
        assert result.status == 502 and not result.items, result
        error = result.body
        assert error["correlation_id"] == result.headers["x-correlation-id"]
    assert error["type"] == "upstream_error" and "malformed" in error["error"], error


FIXTURE_CHECKS = {  # file -> (last event of the stream, or None when it may be a plain error; check)
    "issue-20047-openai-responses.chunks.txt": (METADATA, _check_issue_20047),
    "issue-19493-gpt-5.1-tool-call.chunks.txt": (METADATA, _check_issue_19493),
    "openai-reasoning-encrypted-content.1.chunks.txt": (METADATA, _check_reasoning),
    "openai-error.1.chunks.txt": (METADATA, _check_openai_error),
    "openai-response-failed-only.1.chunks.txt": (METADATA, _check_failed_only),
    "parallel-tool-call-wrapper.1.chunks.txt": (None, _check_parallel_wrapper),
}


def test_every_recorded_fixture_has_a_check() -> None:
    assert set(_fixture_files()) == set(FIXTURE_CHECKS)


@pytest.mark.anyio
@pytest.mark.parametrize("name", _fixture_files())
async def test_recorded_stream_through_the_service(service: ServerProcess, name: str) -> None:
    last, check = FIXTURE_CHECKS.get(name, (None, None))
    async with http_client() as client:
        thread_id = await new_thread(client, service.url)
        result = await sse_chat(client, service.url, thread_id, f"fixture:{name}")
        if result.status == 200 or last is not None:
            assert result.names and result.names[-1] in (METADATA, ERROR), result
            check_framing(result, last=last or result.names[-1])
        if check is not None:
            check(result)
        await assert_thread_usable(client, service.url, thread_id)

"""The HTTP and WebSocket interface, in-process, against a respx-mocked OpenAI."""

from __future__ import annotations

import gc
import logging
import gzip
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import openai
import orjson
import pytest
import respx
from starlette.datastructures import Headers
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from app import create_app
from assistant import responses_engine, run_manager
from assistant.config import load_settings
from assistant.example_tools import calculator
from assistant.logs import JsonFormatter
from assistant.middleware import APIKeyMiddleware, CORSMiddleware, is_same_origin
from assistant.upstream import create_openai_client
from tests.conftest import fixtures_dir
from tests.upstream_mock import (
    BASE_URL,
    call_events,
    fixture_responses,
    openai_error,
    request_body,
    sse,
    sse_response,
    text_events,
    upstream,  # noqa: F401  (fixture)
)

JSON = {"content-type": "application/json"}
SSE = {"content-type": "application/json", "accept": "text/event-stream"}


async def slow_tool(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return "slept"


def failing_tool() -> str:
    """Always fails."""
    raise ValueError("boom")


TOOLS = {"calculator": calculator, "slow_tool": slow_tool, "failing_tool": failing_tool}


def make_client(**env: str) -> TestClient:
    settings = load_settings({"OPENAI_API_KEY": "sk-test-secret-key", "OPENAI_BASE_URL": BASE_URL,
                              "OPENAI_MODEL": "test-model", "ASSISTANT_INSTRUCTIONS": "Be brief.", **env})
    return TestClient(create_app(settings, tool_map=TOOLS), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client(SSE_HEARTBEAT_SECONDS="0.05", TOOL_TIMEOUT_SECONDS="0.3",
                     THREAD_LOCK_TIMEOUT_SECONDS="1") as test_client:
        yield test_client


def parse_sse(body: str) -> list[dict[str, Any]]:
    """Events and comments of an SSE body, per the WHATWG rules (fields on LF-split lines)."""
    items: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    for line in body.split("\n"):
        if line == "":
            if "data" in fields:
                items.append({"event": fields.get("event", "message"), "id": fields.get("id"),
                              "data": orjson.loads(fields["data"])})
            elif "retry" in fields:
                items.append({"retry": int(fields["retry"])})
            fields = {}
        elif line.startswith(":"):
            items.append({"comment": line[1:].strip()})
        else:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    assert fields == {}, "the stream ended in the middle of an event"
    return items


def events_of(body: str) -> list[dict[str, Any]]:
    return [item for item in parse_sse(body) if "event" in item]


def chat(client: TestClient, message: str, *, headers: dict[str, str] = JSON, thread_id: str = "conv_test") -> httpx.Response:
    return client.post("/chat", json={"thread_id": thread_id, "message": message}, headers=headers)


# --- the mocks intercept, and nothing else goes out --------------------------------------------


def test_openai_client_sends_through_httpx_which_respx_patches() -> None:
    client = create_openai_client(load_settings({"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": BASE_URL}))
    assert isinstance(client._client, httpx.AsyncClient)  # not httpx2: respx patches this one


def test_respx_routes_receive_the_service_calls(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events("hi")))
    assert chat(client, "hello").status_code == 200
    assert route.call_count == 1
    assert upstream.routes[0].call_count == 0  # /conversations was not needed


def test_an_unmocked_upstream_call_never_leaves_the_process(client: TestClient, upstream: respx.MockRouter) -> None:
    # No /responses route: respx refuses the request, and the client gets a clean 502.
    response = chat(client, "hello")
    assert response.status_code == 502
    assert response.json()["type"] == "upstream_error"
    assert not upstream.calls  # refused by respx (AllMockedAssertionError), not sent anywhere


# --- threads --------------------------------------------------------------------------------


def test_create_thread_post_and_get_start(upstream: respx.MockRouter) -> None:
    with make_client(ASSISTANT_INITIAL_MESSAGE="Hi! Ask me anything.") as client:
        for response in (client.post("/threads"), client.get("/start")):
            assert response.status_code == 200
            body = response.json()
            assert body["thread_id"] == "conv_test"
            assert body["initial_message"] == "Hi! Ask me anything."
            assert body["correlation_id"] == response.headers["x-correlation-id"]
            # A cached GET /start would hand one client's thread to the next.
            assert response.headers["cache-control"] == "no-store"


def test_head_start_makes_no_thread(client: TestClient, upstream: respx.MockRouter) -> None:
    """HEAD is GET without the body, and GET /start makes a thread upstream: a link checker or a
    monitor sending HEAD would make one each time."""
    response = client.head("/start")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert not upstream.calls


def test_the_chat_page_and_its_files_are_checked_with_the_service_on_each_use(client: TestClient) -> None:
    """no-cache (not no-store): a 304 when unchanged, and never a cached old script against a newer service."""
    page = client.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
    script = client.get("/static/chat.js")
    assert script.status_code == 200 and script.headers["cache-control"] == "no-cache"
    again = client.get("/static/chat.js", headers={"if-none-match": script.headers["etag"]})
    assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"


def test_initial_message_is_null_when_unset(client: TestClient, upstream: respx.MockRouter) -> None:
    assert client.post("/threads").json()["initial_message"] is None


def test_thread_creation_upstream_failure_is_502(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/conversations").mock(return_value=openai_error(401, "Incorrect API key provided: sk-test-s***"))
    response = client.post("/threads")
    assert response.status_code == 502
    assert "sk-test" not in response.text


def test_thread_creation_is_retried_after_a_5xx(client: TestClient, upstream: respx.MockRouter) -> None:
    """A 5xx from OpenAI is retried (README, Retries), also when creating a thread: a spare empty
    conversation harms nothing, so the client gets its thread instead of a 502."""
    route = upstream.post("/conversations").mock(side_effect=[
        openai_error(500, "server error", headers={"retry-after-ms": "10"}),
        httpx.Response(200, json={"id": "conv_test", "object": "conversation", "created_at": 1, "metadata": {}}),
    ])
    response = client.post("/threads")
    assert response.status_code == 200 and response.json()["thread_id"] == "conv_test", response.text
    assert route.call_count == 2


# --- a text reply, three ways ----------------------------------------------------------------


def test_json_reply_and_upstream_request(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events("Hello, world!")))
    response = chat(client, "hello")
    assert response.status_code == 200
    body = response.json()
    assert body["responses"] == ["Hello, world!"]
    assert body["thread_id"] == "conv_test" and body["run_id"].startswith("run_")
    assert body["correlation_id"] == response.headers["x-correlation-id"]
    sent = request_body(route.calls[0])
    assert sent["model"] == "test-model" and sent["stream"] is True and sent["truncation"] == "auto"
    assert sent["conversation"] == "conv_test" and sent["instructions"] == "Be brief."
    assert sent["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}]
    assert {t["name"] for t in sent["tools"]} == set(TOOLS)
    headers = route.calls[0].request.headers
    assert headers["authorization"] == "Bearer sk-test-secret-key"
    assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("AsyncOpenAI/Python")


def test_truncation_can_be_disabled(upstream: respx.MockRouter) -> None:
    """Then a conversation outgrowing the model's context window is refused with a 400 (OpenAI's
    default) instead of losing its oldest items."""
    route = upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    with make_client(OPENAI_TRUNCATION="disabled") as client:
        assert chat(client, "hello").status_code == 200
    assert request_body(route.calls[0])["truncation"] == "disabled"


def test_a_compressed_upstream_stream_is_decoded(client: TestClient, upstream: respx.MockRouter) -> None:
    """No content coding is asked for, but an upstream (or a proxy) may still send one."""
    body = gzip.compress(sse(text_events("Hello, gzip!")))
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    upstream.post("/responses").mock(return_value=httpx.Response(200, content=body, headers=headers))
    response = chat(client, "hello")
    assert response.status_code == 200 and response.json()["responses"] == ["Hello, gzip!"]


class CutAfterTheLastEvent(httpx.AsyncByteStream):
    """Every event of a complete response, then the connection drops before the body's end."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


@pytest.mark.parametrize("headers", [JSON, SSE])
def test_a_connection_dropped_after_the_last_event_still_answers(
    client: TestClient, upstream: respx.MockRouter, headers: dict[str, str]
) -> None:
    """The reply is complete; only the connection cannot be reused."""
    stream = CutAfterTheLastEvent(sse(text_events("All here.")))
    upstream.post("/responses").mock(return_value=httpx.Response(200, stream=stream))
    response = chat(client, "hello", headers=headers)
    assert response.status_code == 200
    if headers is JSON:
        assert response.json()["responses"] == ["All here."]
    else:
        names = [e["event"] for e in events_of(response.text)]
        assert names[-3:] == ["thread.message.completed", "thread.run.completed", "metadata"]


class HeldOpenAfterTheLastEvent(httpx.AsyncByteStream):
    """Every event of a complete response, then nothing: the body's end never comes."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body
        await anyio.sleep_forever()


@pytest.mark.parametrize("headers", [JSON, SSE])
def test_a_body_held_open_after_the_last_event_still_answers_at_once(
    client: TestClient, upstream: respx.MockRouter, headers: dict[str, str]
) -> None:
    """The reply is complete: the end of the body is waited for only DRAIN_SECONDS (0.5 s),
    not for as long as the upstream keeps the connection."""
    stream = HeldOpenAfterTheLastEvent(sse(text_events("All here.")))
    upstream.post("/responses").mock(return_value=httpx.Response(200, stream=stream))
    started = time.monotonic()
    response = chat(client, "hello", headers=headers)
    assert response.status_code == 200 and time.monotonic() - started < 3
    if headers is JSON:
        assert response.json()["responses"] == ["All here."]
    else:
        names = [e["event"] for e in events_of(response.text)]
        assert names[-3:] == ["thread.message.completed", "thread.run.completed", "metadata"]


def test_sse_reply(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("Hello, world!", chunks=4)))
    response = chat(client, "hello", headers=SSE)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    items = parse_sse(response.text)
    assert items[0] == {"retry": 5000}
    events = [i for i in items if "event" in i]
    names = [e["event"] for e in events]
    assert names[0] == "thread.run.created" and names[-3:] == ["thread.message.completed", "thread.run.completed", "metadata"]
    assert "".join(e["data"]["delta"]["content"] for e in events if e["event"] == "thread.message.delta") == "Hello, world!"
    seqs = [int(e["id"].rsplit(":", 1)[1]) for e in events]
    assert seqs == sorted(set(seqs))
    run_id = events[0]["data"]["run_id"]
    assert all(e["id"].startswith(run_id + ":") for e in events)
    metadata = events[-1]["data"]
    assert metadata["run_id"] == run_id and metadata["thread_id"] == "conv_test"
    assert metadata["event_count"] == len(events)
    assert metadata["correlation_id"] == response.headers["x-correlation-id"]


@pytest.mark.parametrize(
    "text",
    ["line one\nline two", "carriage\rreturn", "crlf\r\nend", "data: fake\n\nevent: x", "ünïcödé ✓ 🚀 \u2028 \u0085", "\x00nul"],
)
def test_sse_framing_of_tricky_text(client: TestClient, upstream: respx.MockRouter, text: str) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events(text)))
    body = chat(client, "x", headers=SSE).content
    for line in body.split(b"\n"):
        assert b"\r" not in line
    events = events_of(body.decode())
    assert "".join(e["data"]["delta"]["content"] for e in events if e["event"] == "thread.message.delta") == text
    assert [e for e in events if e["event"] == "thread.message.completed"][0]["data"]["message"]["content"] == text


def test_websocket_reply_two_turns(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(side_effect=[sse_response(text_events("first")), sse_response(text_events("second"))])
    with client.websocket_connect("/ws/chat") as ws:
        for expected in ("first", "second"):
            ws.send_json({"thread_id": "conv_test", "message": "hi"})
            frames = []
            while not frames or frames[-1]["event"] not in ("metadata", "error"):
                frames.append(ws.receive_json())
            assert frames[0]["event"] == "thread.run.created"
            assert "".join(f["data"]["delta"]["content"] for f in frames if f["event"] == "thread.message.delta") == expected
            assert all(set(f) == {"event", "id", "data"} for f in frames)


def test_websocket_bad_frames_keep_the_connection(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("fine")))
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_text("not json")
        error = ws.receive_json()
        assert error["event"] == "error" and error["type"] == "invalid_request" and error["correlation_id"]
        ws.send_bytes(b"\x00\x01")
        assert ws.receive_json()["error"].startswith("binary frames")
        ws.send_json({"thread_id": "conv_test"})
        assert "message" in ws.receive_json()["error"]
        ws.send_json({"thread_id": "conv_test", "message": "hi"})
        frames = [ws.receive_json() for _ in range(6)]
        assert frames[-1]["event"] == "metadata"


@pytest.mark.parametrize("frame", ["x" * 2000, "\u20ac" * 400, b"x" * 5000],
                         ids=["2000 characters", "1200 bytes in 400 characters", "a binary frame"])
def test_websocket_oversize_frame_closes_1009(upstream: respx.MockRouter, frame: str | bytes) -> None:
    with make_client(MAX_BODY_BYTES="1000") as client, client.websocket_connect("/ws/chat") as ws:
        if isinstance(frame, bytes):
            ws.send_bytes(frame)
        else:
            ws.send_text(frame)  # MAX_BODY_BYTES counts bytes, as over HTTP
        with pytest.raises(Exception) as info:
            ws.receive_json()
        assert getattr(info.value, "code", None) == 1009


@pytest.mark.parametrize("frame", ['"' + "x" * 998 + '"', '"' + "\u20ac" * 332 + 'xx"', b"x" * 1000],
                         ids=["1000 characters", "1000 bytes in 336 characters", "a binary frame of 1000 bytes"])
def test_websocket_frame_of_exactly_the_limit_is_answered_not_closed(upstream: respx.MockRouter, frame: str | bytes) -> None:
    """Only a frame *over* MAX_BODY_BYTES closes the socket (as a body over it is a 413): one of
    exactly that size gets its answer (here an error frame) and the connection stays open."""
    with make_client(MAX_BODY_BYTES="1000") as client, client.websocket_connect("/ws/chat") as ws:
        assert len(frame if isinstance(frame, bytes) else frame.encode()) == 1000
        if isinstance(frame, bytes):
            ws.send_bytes(frame)
        else:
            ws.send_text(frame)
        assert ws.receive_json()["type"] == "invalid_request"
        ws.send_text("not json")
        assert ws.receive_json()["type"] == "invalid_request"


# --- tools ------------------------------------------------------------------------------------


def test_tool_round_trip(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("calculator", '{"a": 2, "b": 3, "op": "multiply"}'))),
        sse_response(text_events("It is 6.")),
    ])
    events = events_of(chat(client, "2*3?", headers=SSE).text)
    names = [e["event"] for e in events]
    assert names.index("thread.run.step.created") < names.index("thread.run.step.completed") < names.index("thread.message.delta")
    step = next(e for e in events if e["event"] == "thread.run.step.completed")["data"]["step"]
    assert step["name"] == "calculator" and step["type"] == "tool" and step["output"] == "6"
    assert step["input"] == '{"a": 2, "b": 3, "op": "multiply"}' and step["end"] >= step["start"]
    follow_up = request_body(route.calls[1])
    assert follow_up["conversation"] == "conv_test"
    assert follow_up["input"] == [{"type": "function_call_output", "call_id": step["id"], "output": "6"}]


def test_parallel_tool_calls_run_concurrently(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("slow_tool", '{"seconds": 0.25}'), ("slow_tool", '{"seconds": 0.25}'),
                                 ("calculator", '{"a": 1, "b": 1, "op": "add"}'))),
        sse_response(text_events("done")),
    ])
    started = time.monotonic()
    events = events_of(chat(client, "go", headers=SSE).text)
    assert time.monotonic() - started < 0.45  # two 0.25 s tools, at the same time
    names = [e["event"] for e in events]
    assert names.count("thread.run.step.created") == 3 and names.count("thread.run.step.completed") == 3
    # Every step starts before any ends; outputs go back in the order of the calls.
    assert max(i for i, n in enumerate(names) if n == "thread.run.step.created") < names.index("thread.run.step.completed")
    outputs = [item["output"] for item in request_body(route.calls[1])["input"]]
    assert outputs == ["slept", "slept", "2"]


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("failing_tool", "{}", "ValueError: boom"),
        ("slow_tool", '{"seconds": 5}', "timed out after 0.3 s"),
        ("calculator", '{"a": "x", "b": 1, "op": "add"}', "a"),
        ("calculator", "{not json", "JSON"),
        ("no_such_tool", "{}", "no_such_tool"),
    ],
    ids=["raises", "times-out", "bad-arguments", "invalid-json", "unknown-tool"],
)
def test_tool_errors_reach_the_model_not_the_client_as_a_crash(
    client: TestClient, upstream: respx.MockRouter, name: str, arguments: str, expected: str
) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(call_events((name, arguments))), sse_response(text_events("sorry")),
    ])
    response = chat(client, "go", headers=SSE)
    events = events_of(response.text)
    step = next(e for e in events if e["event"] == "thread.run.step.completed")["data"]["step"]
    assert step["is_error"] is True and expected in step["output"] and "Traceback" not in step["output"]
    output = orjson.loads(request_body(route.calls[1])["input"][0]["output"])
    assert expected in output["error"]
    assert output["correlation_id"] == response.headers["x-correlation-id"]
    assert events[-2]["event"] == "thread.run.completed"


def test_heartbeats_flow_while_a_tool_runs(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("slow_tool", '{"seconds": 0.25}'))), sse_response(text_events("ok")),
    ])
    items = parse_sse(chat(client, "go", headers=SSE).text)
    kinds = [i.get("event") or ("keepalive" if i.get("comment") == "keepalive" else None) for i in items]
    start, end = kinds.index("thread.run.step.created"), kinds.index("thread.run.step.completed")
    assert kinds[start:end].count("keepalive") >= 2


def test_tool_rounds_are_bounded(upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(
        side_effect=lambda request: sse_response(call_events(("calculator", '{"a": 1, "b": 1, "op": "add"}')))
    )
    with make_client(MAX_TOOL_ROUNDS="2") as client:
        events = events_of(chat(client, "loop", headers=SSE).text)
        assert route.call_count == 3
        failed = next(e for e in events if e["event"] == "thread.run.failed")["data"]
        assert failed["type"] == "tool_rounds_exceeded"
        # The unanswered calls of the last round go out with the thread's next message.
        route.side_effect = None
        route.return_value = sse_response(text_events("ok"))
        assert chat(client, "again").status_code == 200
        next_input = request_body(route.calls[-1])["input"]
        assert [i["type"] for i in next_input] == ["function_call_output", "message"]


# --- upstream failures -------------------------------------------------------------------------


SECRET_IN_MESSAGE = "Incorrect API key provided: sk-abc123456789"


@pytest.mark.parametrize(
    ("status", "message", "code", "expected_status", "expected_type"),
    [
        (400, SECRET_IN_MESSAGE, None, 502, "upstream_error"),
        (401, SECRET_IN_MESSAGE, "invalid_api_key", 502, "upstream_error"),
        (404, "Conversation with id 'conv_test' not found.", None, 404, "thread_not_found"),
        # A 404 about something else (a model the key cannot use) is not the thread's.
        (404, "The model `gpt-9` does not exist or you do not have access to it. sk-abc123456789", "model_not_found",
         502, "upstream_error"),
        (422, SECRET_IN_MESSAGE, None, 502, "upstream_error"),
    ],
)
def test_upstream_4xx_mapping(client: TestClient, upstream: respx.MockRouter, status: int, message: str,
                              code: str | None, expected_status: int, expected_type: str) -> None:
    upstream.post("/responses").mock(return_value=openai_error(status, message, code=code))
    for headers in (JSON, SSE):
        response = chat(client, "hi", headers=headers)
        assert response.status_code == expected_status
        body = response.json()
        assert body["type"] == expected_type and body["correlation_id"] == response.headers["x-correlation-id"]
        assert "sk-abc" not in response.text


def test_upstream_5xx_is_retried_then_502(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=openai_error(500, "server error"))
    items = upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": [], "has_more": False})
    response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_error"
    assert route.call_count == 4  # UPSTREAM_MAX_RETRIES=3
    assert items.call_count == 3  # each retry first made sure the input was not taken


def test_a_5xx_asking_for_a_longer_wait_than_a_request_should_spend_gives_the_client_that_wait(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """A 503 with Retry-After: 25 is not waited out inside the request (20 s at most), and the
    client is told how long to wait, as for a 429, instead of retrying at once."""
    route = upstream.post("/responses").mock(return_value=openai_error(503, "overloaded", headers={"retry-after": "25"}))
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": [], "has_more": False})
    response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_error" and route.call_count == 1
    assert response.headers["retry-after"] == "25" and response.json()["retry_after_seconds"] == 25


@pytest.mark.parametrize("earlier", [[], ["earlier question", "earlier answer"]])
def test_upstream_5xx_not_retried_when_the_response_was_made(
    client: TestClient, upstream: respx.MockRouter, earlier: list[str]
) -> None:
    """A conversation takes a response's input and outputs together: ours sits under the reply."""
    route = upstream.post("/responses").mock(side_effect=[openai_error(502, "bad gateway"), sse_response(text_events("again"))])
    newest_first = [conversation_item("assistant", "the answer"), conversation_item("user", "hi")]
    newest_first += [conversation_item(role, text) for role, text in zip(("assistant", "user"), reversed(earlier))]
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": newest_first, "has_more": False})
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 1  # the message went in once


@pytest.mark.parametrize("taken", [True, False])
def test_tool_outputs_a_5xx_refused_go_with_the_next_message_unless_the_conversation_took_them(
    client: TestClient, upstream: respx.MockRouter, taken: bool
) -> None:
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(calls), *[openai_error(502, "bad gateway")] * 4, sse_response(text_events("next")),
    ])
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    newest_first = [{"type": "function_call", "id": "fc_1", "call_id": call_id, "name": "calculator", "arguments": "{}",
                     "status": "completed"}, conversation_item("user", "go")]
    if taken:
        newest_first.insert(0, {"type": "function_call_output", "id": "fco_1", "call_id": call_id, "output": "3",
                                "status": "completed"})
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": newest_first, "has_more": False})
    assert chat(client, "go").status_code == 502
    assert chat(client, "and now?").json()["responses"] == ["next"]
    sent = [i["type"] for i in request_body(route.calls[-1])["input"]]
    assert sent == (["message"] if taken else ["function_call_output", "message"])


# How the Responses API refuses tool outputs it cannot take: any input string over 10 MiB, or an
# input over the model's context window (with truncation disabled).
TOO_LONG = ("Invalid 'input[0].output': string too long. Expected a string with maximum length 10485760, "
            "but got a string with length 10485761 instead.", "string_above_max_length")
OVER_CONTEXT = ("Your input exceeds the context window of this model. Please adjust your input and try again.",
                "context_length_exceeded")


@pytest.mark.parametrize(("message", "code"), [TOO_LONG, OVER_CONTEXT], ids=["too_long", "over_context"])
def test_tool_outputs_the_upstream_refuses_are_replaced_by_an_error_the_model_can_answer(
    client: TestClient, upstream: respx.MockRouter, message: str, code: str
) -> None:
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(calls), openai_error(400, message, code=code),
        sse_response(text_events("The result did not come through.")), sse_response(text_events("next")),
    ])
    answer = chat(client, "go")
    assert answer.status_code == 200 and answer.json()["responses"] == ["The result did not come through."]
    [replaced] = request_body(route.calls[2])["input"]
    assert replaced["type"] == "function_call_output" and replaced["call_id"] == call_id
    assert orjson.loads(replaced["output"])["error"].startswith("the tool's output could not be delivered: ")
    # Nothing is left over for the thread's next message: it goes alone, and is answered.
    assert chat(client, "and now?").json()["responses"] == ["next"]
    assert [i["type"] for i in request_body(route.calls[3])["input"]] == ["message"]


def test_a_thread_whose_replaced_tool_outputs_are_refused_too_is_not_left_stuck(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """Refused again (the 400 was not about the outputs, say): the turn fails, and the thread's
    next message carries the short error outputs, not the refused ones, once."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(calls), openai_error(400, OVER_CONTEXT[0], code=OVER_CONTEXT[1]),
        openai_error(400, OVER_CONTEXT[0], code=OVER_CONTEXT[1]), sse_response(text_events("next")),
    ])
    assert chat(client, "go").status_code == 502
    assert len(route.calls) == 3  # one replacement, not a loop
    assert chat(client, "and now?").json()["responses"] == ["next"]
    held, message = request_body(route.calls[3])["input"]
    assert held["type"] == "function_call_output" and "could not be delivered" in held["output"]
    assert message["type"] == "message"


def test_upstream_5xx_retried_when_the_conversation_ends_with_an_earlier_turn(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/responses").mock(side_effect=[openai_error(502, "bad gateway"), sse_response(text_events("ok"))])
    newest_first = [conversation_item("assistant", "earlier answer"), conversation_item("user", "earlier question")]
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": newest_first, "has_more": True})
    assert chat(client, "hi").json()["responses"] == ["ok"]
    assert route.call_count == 2


def conversation_item(role: str, text: str) -> dict[str, Any]:
    part = "input_text" if role == "user" else "output_text"
    return {"type": "message", "id": f"msg_{abs(hash(text))}", "role": role, "status": "completed",
            "content": [{"type": part, "text": text}]}


def test_upstream_5xx_not_retried_when_the_input_was_taken(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=openai_error(500, "server error"))
    taken = {"type": "message", "id": "msg_1", "role": "user", "status": "completed",
             "content": [{"type": "input_text", "text": "hi"}]}
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": [taken], "has_more": False})
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 1


def test_upstream_5xx_not_retried_when_the_conversation_cannot_be_read_back(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """After a 5xx the message is sent again only once the conversation shows it was not taken:
    when the conversation cannot be read, nobody can tell, so the client gets the 502 and the
    message is not risked twice."""
    route = upstream.post("/responses").mock(side_effect=[openai_error(500, "server error"), sse_response(text_events("twice"))])
    upstream.get("/conversations/conv_test/items").mock(return_value=openai_error(500, "server error"))
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 1


def test_upstream_5xx_not_retried_when_the_newest_page_does_not_reach_the_previous_turn(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """The read-back sees one page (the newest items): a page full of a response's outputs that
    reaches neither our message nor the previous user message cannot tell whether the message
    went in (it may sit below those outputs), so it is not sent again."""
    route = upstream.post("/responses").mock(side_effect=[openai_error(500, "server error"), sse_response(text_events("twice"))])
    outputs = [conversation_item("assistant", f"part {i}") for i in range(100)]
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": outputs, "has_more": True})
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 1


def test_upstream_5xx_retried_for_a_message_that_repeats_an_older_turns(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """The read-back stops at the previous user message: an older turn with the same text ("yes"
    again, some turns later) is not taken for this one, so the message is retried and answered."""
    route = upstream.post("/responses").mock(side_effect=[openai_error(502, "bad gateway"), sse_response(text_events("ok"))])
    newest_first = [conversation_item("assistant", "Sure?"), conversation_item("user", "delete it"),
                    conversation_item("assistant", "Done."), conversation_item("user", "yes")]
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": newest_first, "has_more": False})
    assert chat(client, "yes").json()["responses"] == ["ok"]
    assert route.call_count == 2


def test_an_unknown_call_refusal_that_names_no_output_of_ours_is_not_retried_in_a_loop(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """The input is repaired only when the repair changes it: a refusal naming a call output the
    input does not hold is answered with one 502, not with a new request per possible repair."""
    route = upstream.post("/responses").mock(
        return_value=openai_error(400, "No tool call found for function call output with call_id call_elsewhere.")
    )
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 1


def test_rate_limit_honours_retry_after(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(429, "slow down", code="rate_limit_exceeded", headers={"retry-after": "0.3"}),
        sse_response(text_events("ok")),
    ])
    started = time.monotonic()
    assert chat(client, "hi").json()["responses"] == ["ok"]
    assert time.monotonic() - started >= 0.3 and route.call_count == 2


def test_timeouts_are_504(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(side_effect=httpx.ReadTimeout("timed out"))
    response = chat(client, "hi")
    assert response.status_code == 504 and response.json()["type"] == "upstream_timeout"


def test_conversation_locked_waits_then_thread_busy(client: TestClient, upstream: respx.MockRouter) -> None:
    locked = openai_error(400, "Another process is currently operating on this conversation. Please retry in a few seconds.",
                          code="conversation_locked")
    route = upstream.post("/responses").mock(return_value=locked)
    response = chat(client, "hi")
    assert response.status_code == 409 and response.json()["type"] == "thread_busy"
    assert route.call_count >= 2
    route.side_effect = [locked, sse_response(text_events("ok"))]
    assert chat(client, "hi").json()["responses"] == ["ok"]


def test_orphan_function_call_is_answered_before_the_message(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(400, "No tool output found for function call call_orphan."),
        sse_response(text_events("ok")),
    ])
    assert chat(client, "hi").json()["responses"] == ["ok"]
    retried = request_body(route.calls[1])["input"]
    assert retried[0]["type"] == "function_call_output" and retried[0]["call_id"] == "call_orphan"
    assert retried[1]["role"] == "user"


def test_every_orphan_of_many_parallel_calls_is_answered(client: TestClient, upstream: respx.MockRouter) -> None:
    """A turn cut off after eight parallel calls: each refusal names one, and each is answered."""
    orphans = [f"call_{n}" for n in range(8)]

    def respond(request: httpx.Request) -> httpx.Response:
        answered = {item.get("call_id") for item in orjson.loads(request.content)["input"]}
        missing = [call for call in orphans if call not in answered]
        if missing:
            return openai_error(400, f"No tool output found for function call {missing[0]}.")
        return sse_response(text_events("ok"))

    route = upstream.post("/responses").mock(side_effect=respond)
    assert chat(client, "hi").json()["responses"] == ["ok"]
    assert route.call_count == 9
    assert [i.get("call_id") for i in request_body(route.calls[-1])["input"]][:8] == orphans[::-1]


def test_a_crash_in_a_runs_task_ends_that_run_not_the_service(
    client: TestClient, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that escapes in one of a run's tasks (a tool's) ends that run with an error; the
    service's other runs, and the next message, go on (it used to stop the run manager: every
    later message got 503 while /health said ok)."""
    from assistant import orchestrator

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(orchestrator, "execute_tool", crash)
    upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))), sse_response(text_events("fine")),
    ])
    events = events_of(chat(client, "go", headers=SSE).text)
    assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "internal_error"
    assert "a bug" not in str(events)
    assert [e["data"]["step"]["is_error"] for e in events if e["event"] == "thread.run.step.completed"] == [True]
    assert client.get("/health").json() == {"status": "ok"}
    assert chat(client, "again").json()["responses"] == ["fine"]


def test_once_the_service_takes_no_new_turns_health_chat_and_websockets_say_so(client: TestClient) -> None:
    with client.websocket_connect("/ws/chat") as ws:
        ws.portal.call(client.app.state.runs.begin_shutdown)  # type: ignore[attr-defined]
        with pytest.raises(WebSocketDisconnect) as gone:  # no turn running: told to go away at once
            ws.receive_json()
        assert gone.value.code == 1001
    response = client.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "shutting_down"}
    assert response.headers["cache-control"] == "no-store"  # a cached health check would be a lie
    refused = chat(client, "hi")
    assert refused.status_code == 503 and refused.json()["type"] == "shutting_down"


@pytest.mark.timeout(10)  # without the close, the receive below waits for good
def test_a_websocket_opened_after_the_shutdown_began_is_told_to_go_away(client: TestClient) -> None:
    """README: WebSockets close with 1001 once no turn runs: also one that connects after the
    service stopped taking new turns (it would only get `shutting_down` errors here)."""
    client.portal.call(client.app.state.runs.begin_shutdown)  # type: ignore[attr-defined,union-attr]
    with client.websocket_connect("/ws/chat") as ws:
        with pytest.raises(WebSocketDisconnect) as gone:
            ws.receive_json()
        assert gone.value.code == 1001


def test_stream_cut_without_terminal_event(client: TestClient, upstream: respx.MockRouter) -> None:
    events = text_events("never finished")[:-1]  # no response.completed
    upstream.post("/responses").mock(return_value=sse_response(events))
    for headers in (JSON, SSE):
        response = chat(client, "hi", headers=headers)
        if headers is JSON:
            assert response.status_code == 502
        else:
            last = events_of(response.text)[-1]
            assert last["event"] == "error" and last["data"]["type"] == "upstream_error"


# --- every recorded stream ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in fixtures_dir().glob("*.chunks.txt")))
def test_recorded_stream(client: TestClient, upstream: respx.MockRouter, name: str) -> None:
    bodies = fixture_responses(fixtures_dir() / name)
    replies = [httpx.Response(200, content=b, headers={"content-type": "text/event-stream"}) for b in bodies]
    route = upstream.post("/responses").mock(side_effect=[*replies, sse_response(text_events("after the tools"))])
    response = chat(client, "go", headers=SSE)
    if name.startswith("parallel-tool-call-wrapper"):
        # Broken from its first line: a plain HTTP error, or (if the stream had started) an error event.
        if response.status_code == 200:
            last = events_of(response.text)[-1]
            assert last["event"] == "error" and "malformed" in last["data"]["error"]
        else:
            assert response.status_code == 502 and "malformed" in response.json()["error"]
        route.side_effect = None
        route.return_value = sse_response(text_events("still usable"))
        assert chat(client, "again").json()["responses"] == ["still usable"]
        return
    events = events_of(response.text)
    names = [e["event"] for e in events]
    text = "".join(e["data"]["delta"]["content"] for e in events if e["event"] == "thread.message.delta")
    steps = [e["data"]["step"] for e in events if e["event"] == "thread.run.step.completed"]
    assert names[-1] == "metadata"
    if name.startswith("issue-20047"):
        assert text == "OK" and names[-2] == "thread.run.completed"
    elif name.startswith("issue-19493"):
        # get_weather is not one of this service's tools: the model is told so, and goes on.
        assert steps[0]["name"] == "get_weather" and steps[0]["is_error"] and "unknown tool" in steps[0]["output"]
        assert text == "after the tools"
    elif name.startswith("openai-reasoning"):
        assert [s["output"] for s in steps] == ["19", "57", "570"]
        assert text == "The final result is **570**." and route.call_count == 4
        assert [request_body(c)["input"][0]["output"] for c in route.calls[1:]] == ["19", "57", "570"]
    elif name.startswith("openai-error"):
        failed = next(e for e in events if e["event"] == "thread.run.failed")["data"]
        assert failed["code"] == "insufficient_quota" and "quota" in failed["error"]
        assert names[-1] == "metadata"
    elif name.startswith("openai-response-failed-only"):
        failed = next(e for e in events if e["event"] == "thread.run.failed")["data"]
        assert failed["code"] == "rate_limit_exceeded"
    else:
        pytest.fail(f"no expectation written for the new fixture {name}")


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", JSON, 400, "not valid JSON"),
        (b"[1, 2]", JSON, 400, "JSON object"),
        (b'"text"', JSON, 400, "JSON object"),
        (b"", JSON, 400, "empty"),
        (b'{"thread_id": "conv_test"}', JSON, 400, "message"),
        (b'{"message": "hi"}', JSON, 400, "thread_id"),
        (b'{"thread_id": 5, "message": "hi"}', JSON, 400, "thread_id"),
        (b'{"thread_id": "conv_test", "message": ["hi"]}', JSON, 400, "message"),
        (b'{"thread_id": "conv_test", "message": "   "}', JSON, 400, "empty"),
        (b'{"thread_id": "../../etc", "message": "hi"}', JSON, 400, "thread id"),
        (b'{"thread_id": "conv_test", "message": "hi"}', {"content-type": "text/plain"}, 415, "application/json"),
    ],
)
def test_bad_input(client: TestClient, upstream: respx.MockRouter, body: bytes, headers: dict[str, str],
                   status: int, needle: str) -> None:
    response = client.post("/chat", content=body, headers=headers)
    assert response.status_code == status
    payload = response.json()
    assert needle in payload["error"] and payload["correlation_id"] and payload["type"]
    assert not upstream.calls


def test_message_too_long(upstream: respx.MockRouter) -> None:
    with make_client(MAX_MESSAGE_CHARS="10") as client:
        response = chat(client, "x" * 11)
        assert response.status_code == 400 and "MAX_MESSAGE_CHARS" in response.json()["error"]


def test_body_too_large_is_413_even_without_content_length(upstream: respx.MockRouter) -> None:
    with make_client(MAX_BODY_BYTES="1000") as client:
        assert client.post("/chat", content=b"x" * 2000, headers=JSON).status_code == 413

        def chunks() -> Iterator[bytes]:
            for _ in range(100):
                yield b"x" * 100

        response = client.post("/chat", content=chunks(), headers=JSON)
        assert response.status_code == 413 and response.json()["type"] == "payload_too_large"


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/merge-patch+json"],
                         ids=["no Content-Type", "application/json with a charset", "a +json type"])
def test_bodies_read_as_json(client: TestClient, upstream: respx.MockRouter, content_type: str | None) -> None:
    """README: a body without Content-Type is read as JSON, and so is any `*+json` type."""
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    headers = {} if content_type is None else {"content-type": content_type}
    request = client.build_request("POST", "/chat", content=b'{"thread_id": "conv_test", "message": "hi"}', headers=headers)
    assert ("content-type" in request.headers) is (content_type is not None)
    response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["responses"] == ["ok"]


def test_a_body_of_exactly_max_body_bytes_is_taken(upstream: respx.MockRouter) -> None:
    """Only a body *over* MAX_BODY_BYTES is a 413: with or without a Content-Length."""
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    head = b'{"thread_id": "conv_test", "message": "'
    body = head + b"x" * (1000 - len(head) - 2) + b'"}'
    assert len(body) == 1000
    with make_client(MAX_BODY_BYTES="1000") as client:
        declared = client.post("/chat", content=body, headers=JSON)
        assert declared.status_code == 200, declared.text

        def chunks() -> Iterator[bytes]:
            yield body[:500]
            yield body[500:]

        streamed = client.post("/chat", content=chunks(), headers=JSON)
        assert streamed.status_code == 200, streamed.text


@pytest.mark.anyio
async def test_a_client_that_hangs_up_while_sending_its_body_is_client_gone_not_a_bug() -> None:
    """A hang-up mid-body is the client's doing: ClientGone (logged as such), not an unhandled
    error logged with a stack trace as a bug in the service."""
    from starlette.requests import Request

    from assistant.errors import ClientGone
    from assistant.http_api import read_json_body

    messages = [{"type": "http.request", "body": b'{"thread_id": ', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/chat", "headers": [(b"content-type", b"application/json")]}
    with pytest.raises(ClientGone):
        await read_json_body(Request(scope, receive), 1000, 30)


@pytest.mark.anyio
async def test_a_body_sent_slowly_is_read_while_each_part_comes_within_the_idle_limit() -> None:
    """The idle limit is per part, not for the whole body: a slow client that keeps sending is
    read to the end; one that stops for longer than the limit is a RequestTimeout."""
    from starlette.requests import Request

    from assistant.errors import RequestTimeout
    from assistant.http_api import read_json_body

    def receiver(parts: list[bytes], pause: float) -> Any:
        async def receive() -> dict[str, Any]:
            await anyio.sleep(pause)
            body = parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(parts)}
        return receive

    scope = {"type": "http", "method": "POST", "path": "/chat", "headers": [(b"content-type", b"application/json")]}
    steady = receiver([b'{"thread_id": ', b'"conv_1", ', b'"message": ', b'"hi"}'], 0.15)
    assert await read_json_body(Request(scope, steady), 1000, 0.4) == {"thread_id": "conv_1", "message": "hi"}
    stalled = receiver([b'{"thread_id": ', b'"conv_1"}'], 0.5)
    with pytest.raises(RequestTimeout):
        await read_json_body(Request(scope, stalled), 1000, 0.3)


def test_a_trailing_slash_is_a_json_404_not_a_redirect(client: TestClient) -> None:
    """Starlette's 307 to the path without the slash has an absolute Location built from what the
    service sees: behind a proxy that strips a path prefix, it pointed outside the prefix."""
    for method, path in (("POST", "/chat/"), ("POST", "/threads/"), ("GET", "/health/")):
        response = client.request(method, path, follow_redirects=False)
        assert response.status_code == 404 and response.json()["type"] == "not_found", (method, path)


def test_the_bare_root_path_is_redirected_to_the_chat_page() -> None:
    """`hypercorn --root-path /prefix` behind a proxy that keeps the prefix: `/prefix` goes to
    `/prefix/` (the page's URLs are relative), by a Location that is a path."""
    with TestClient(create_app(load_settings({"OPENAI_API_KEY": "sk-test"})), root_path="/prefix") as client:
        bare = client.get("/prefix", follow_redirects=False)
        page = client.get("/prefix/")
        wrong = client.post("/prefix", follow_redirects=False)
    assert bare.status_code == 307 and bare.headers["location"] == "/prefix/"
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert wrong.status_code == 404 and wrong.json()["type"] == "not_found"


def test_routing_errors_are_json(client: TestClient) -> None:
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "not_found"
    wrong = client.get("/chat")
    assert wrong.status_code == 405 and wrong.json()["type"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"  # a 405 says what is allowed (RFC 9110)
    plain = client.get("/ws/chat")  # a WebSocket endpoint asked without the handshake
    assert plain.status_code == 426 and plain.json()["type"] == "upgrade_required"
    assert plain.headers["upgrade"] == "websocket"
    with client.websocket_connect("/ws/chat") as ws:  # the WebSocket itself is unaffected
        ws.send_json({"thread_id": "x"})
        assert ws.receive_json()["type"] == "invalid_request"
    assert client.get("/health").json() == {"status": "ok"}


def test_an_unexpected_error_is_a_json_500_with_the_correlation_id(client: TestClient) -> None:
    async def crash() -> str:
        raise RuntimeError("a bug")

    client.app.state.runs.engine.create_thread = crash  # type: ignore[attr-defined]
    response = client.post("/threads", headers={"x-correlation-id": "crash-1"})
    assert response.status_code == 500
    assert response.json() == {"error": "the service failed to handle this request", "type": "internal_error",
                               "correlation_id": "crash-1"}
    assert response.headers["x-correlation-id"] == "crash-1"
    assert "a bug" not in response.text


@pytest.mark.parametrize("given", ["abc\r\nx-evil: 1", "x" * 2048, "bad id with spaces"])
def test_unsafe_correlation_ids_are_replaced(client: TestClient, given: str) -> None:
    response = client.get("/health", headers={"x-correlation-id": given.encode("latin-1").decode("latin-1")} if "\n" not in given else {})
    assert response.headers["x-correlation-id"] != given
    raw = client.get("/health", headers={"x-correlation-id": "x" * 2048})
    assert len(raw.headers["x-correlation-id"]) == 32


def test_a_base_url_that_is_a_bare_host_is_taken_as_its_root() -> None:
    """`OPENAI_BASE_URL=http://host:port` (a compatible server at its root) sends to /responses;
    the service used to fail to start, asking for `http://host:portresponses`."""
    with respx.mock(base_url="http://bare.invalid:8080", using="httpx", assert_all_mocked=True) as router:
        router.post("/conversations").respond(200, json={"id": "conv_bare", "object": "conversation",
                                                         "created_at": 1, "metadata": {}})
        router.post("/responses").mock(return_value=sse_response(text_events("from the root")))
        with make_client(OPENAI_BASE_URL="http://bare.invalid:8080") as bare:
            thread_id = bare.post("/threads").json()["thread_id"]
            answer = chat(bare, "hi", thread_id=thread_id)
    assert answer.status_code == 200 and answer.json()["responses"] == ["from the root"]


def test_safe_correlation_id_is_kept(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    response = client.post("/chat", json={"thread_id": "conv_test", "message": "hi"},
                           headers={**JSON, "x-correlation-id": "req-42.a:b"})
    assert response.headers["x-correlation-id"] == "req-42.a:b"
    assert response.json()["correlation_id"] == "req-42.a:b"


def test_unknown_accept_gets_json(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    response = chat(client, "hi", headers={**JSON, "accept": "application/xml"})
    assert response.status_code == 200 and response.json()["responses"] == ["ok"]


@pytest.mark.parametrize(("accept", "streamed"), [
    ("text/event-stream, application/json;q=0.5", True),
    ("application/json, text/event-stream", True),
    ("TEXT/EVENT-STREAM", True),
    ("text/event-stream; charset=utf-8; q=0.1", True),
    ("text/event-stream;q=0, application/json", False),  # refused
    ("application/json, TEXT/Event-Stream ; Q=0.0", False),
    ("text/event-streams", False),
    ("application/json; x=text/event-stream", False),
])
def test_the_event_stream_is_chosen_by_accepts_media_ranges(
    client: TestClient, upstream: respx.MockRouter, accept: str, streamed: bool
) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    response = chat(client, "hi", headers={**JSON, "accept": accept})
    assert response.status_code == 200
    if streamed:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert events_of(response.text)[-1]["event"] == "metadata"
    else:
        assert response.json()["responses"] == ["ok"]


def test_accept_sent_on_several_lines_is_read_as_one_list(client: TestClient, upstream: respx.MockRouter) -> None:
    """RFC 9110: a list header's lines mean the same as one line joined with commas."""
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    response = client.post("/chat", json={"thread_id": "conv_test", "message": "hi"},
                           headers=[("content-type", "application/json"), ("accept", "application/json"),
                                    ("accept", "text/event-stream")])
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events_of(response.text)[-1]["event"] == "metadata"


@pytest.mark.parametrize(("name", "values"), [
    ("Content-Type", ("application/json", "text/plain")),
    ("Idempotency-Key", ("key-1", "key-2")),
    ("Last-Event-ID", ("run_" + "a" * 24 + ":1", "run_" + "b" * 24 + ":1")),
])
def test_a_one_value_header_sent_twice_with_different_values_is_refused(
    client: TestClient, upstream: respx.MockRouter, name: str, values: tuple[str, str]
) -> None:
    """Which one the client meant is unknown; the same value twice is taken."""
    route = upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    headers = [("content-type", "application/json")] if name != "Content-Type" else []
    refused = client.post("/chat", json={"thread_id": "conv_test", "message": "hi"},
                          headers=[*headers, *((name, value) for value in values)])
    assert (refused.status_code, refused.json()["type"]) == (400, "invalid_request")
    assert refused.json()["error"] == f"the {name} header was sent 2 times with different values; send it once"
    if name == "Last-Event-ID":
        resumed = client.get(f"/chat/stream/run_{'a' * 24}", headers=[(name, value) for value in values])
        assert (resumed.status_code, resumed.json()["type"]) == (400, "invalid_request")
    assert not route.called
    if name != "Last-Event-ID":
        taken = client.post("/chat", json={"thread_id": "conv_test", "message": "hi"},
                            headers=[*headers, (name, values[0]), (name, values[0])])
        assert taken.status_code == 200 and taken.json()["responses"] == ["ok"]


def test_the_longest_safe_correlation_id_is_kept_and_one_longer_is_replaced(client: TestClient) -> None:
    """README: a caller's ID is kept when it is a safe token of 1 to 64 characters."""
    longest = "a" * 64
    assert client.get("/health", headers={"x-correlation-id": longest}).headers["x-correlation-id"] == longest
    replaced = client.get("/health", headers={"x-correlation-id": longest + "b"}).headers["x-correlation-id"]
    assert replaced != longest + "b" and len(replaced) == 32


def test_a_missing_service_api_key_is_a_401_that_names_the_bearer_scheme(upstream: respx.MockRouter) -> None:
    """A 401 says how to authenticate (RFC 9110: WWW-Authenticate), in the service's JSON shape."""
    with make_client(SERVICE_API_KEY="svc-key") as client:
        refused = client.post("/threads", headers={"x-correlation-id": "no-key-1"})
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert refused.headers["cache-control"] == "no-store"
        assert refused.json() == {"error": "missing or wrong API key: send 'Authorization: Bearer <SERVICE_API_KEY>'",
                                  "type": "unauthorized", "correlation_id": "no-key-1"}
        assert client.post("/threads", headers={"authorization": "Bearer svc-key"}).status_code == 200


def test_openai_errors_are_the_sdk_types() -> None:
    # The mapping relies on the SDK raising its typed errors for statuses; keep that honest.
    assert issubclass(openai.BadRequestError, openai.APIStatusError)


def test_rate_limited_answer_passes_on_retry_after(upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": "7"}))
    with make_client(UPSTREAM_MAX_RETRIES="0") as client:
        response = chat(client, "hi")
        assert response.status_code == 502 and response.json()["type"] == "upstream_rate_limited"
        assert response.headers["retry-after"] == "7" and response.json()["retry_after_seconds"] == 7


@pytest.mark.parametrize(("given", "passed_on"), [("0.3", "1"), ("1.6", "2")])
def test_a_short_retry_after_is_passed_on_in_whole_seconds_never_as_zero(
    upstream: respx.MockRouter, given: str, passed_on: str
) -> None:
    """Retry-After is whole seconds: OpenAI's wait is rounded up, never shortened to 0 (which tells
    a client to retry at once) nor cut down by most of a second."""
    upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": given}))
    with make_client(UPSTREAM_MAX_RETRIES="0") as client:
        response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == passed_on and response.json()["retry_after_seconds"] == int(passed_on)


def test_a_retry_after_given_as_an_http_date_is_honoured(upstream: respx.MockRouter) -> None:
    """Retry-After may be an HTTP date (RFC 9110): a minute ahead is too long to wait inside a
    request, so the client gets that wait instead of retries made too early."""
    import email.utils

    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    route = upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": when}))
    with make_client() as client:
        response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_rate_limited"
    assert 55 <= int(response.headers["retry-after"]) <= 61 and route.call_count == 1


def test_an_upstream_404_naming_the_conversation_parameter_is_thread_not_found(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """A 404 is about the thread when its message names it or its `param` is the conversation."""
    body = {"error": {"message": "Not found.", "type": "invalid_request_error", "param": "conversation", "code": None}}
    upstream.post("/responses").mock(return_value=httpx.Response(404, json=body))
    response = chat(client, "hi")
    assert response.status_code == 404 and response.json()["type"] == "thread_not_found"


def test_a_connection_that_failed_before_the_request_went_out_is_retried_without_a_read_back(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """README: connections that failed before the request was sent are retried; nothing reached
    OpenAI, so the conversation is not read back first (no items route is mocked here)."""
    route = upstream.post("/responses").mock(side_effect=[httpx.ConnectError("connection refused"),
                                                          sse_response(text_events("ok"))])
    response = chat(client, "hi")
    assert response.status_code == 200 and response.json()["responses"] == ["ok"], response.text
    assert route.call_count == 2 and [call.request.method for call in upstream.calls] == ["POST", "POST"]


def test_retries_back_off_exponentially_with_jitter(
    client: TestClient, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: retries use exponential backoff with (full) jitter: each wait is drawn between 0
    and a bound that doubles with every attempt."""
    from assistant import upstream as upstream_module

    bounds: list[tuple[float, float]] = []

    class Recorded:
        @staticmethod
        def uniform(low: float, high: float) -> float:
            bounds.append((low, high))
            return 0.0

    monkeypatch.setattr(upstream_module, "random", Recorded)
    upstream.post("/responses").mock(return_value=openai_error(500, "server error"))
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": [], "has_more": False})
    assert chat(client, "hi").status_code == 502
    assert bounds == [(0, 0.5), (0, 1.0), (0, 2.0)]


def test_a_retry_after_passed_on_is_never_shorter_than_openais(upstream: respx.MockRouter) -> None:
    """Retry-After counts whole seconds: a wait of 20.4 s (too long to spend inside a request)
    is passed on as 21, not 20: a client that retries after 20 s would retry before OpenAI allows."""
    route = upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": "20.4"}))
    with make_client() as client:
        response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_rate_limited" and route.call_count == 1
    assert response.headers["retry-after"] == "21" and response.json()["retry_after_seconds"] == 21


def test_a_streamed_rate_limited_error_carries_the_wait_too(upstream: respx.MockRouter) -> None:
    """An error event has no header: the wait is in its data, for WebSocket and SSE clients alike."""
    upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": "60"}))
    with make_client() as client, client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"thread_id": "conv_test", "message": "hi"})
        frames = [ws.receive_json()]
        while frames[-1]["event"] not in ("metadata", "error"):
            frames.append(ws.receive_json())
    error = frames[-1]["data"]
    assert error["type"] == "upstream_rate_limited" and error["retry_after_seconds"] == 60


def test_a_tool_round_rate_limited_answers_as_the_first_request_would(upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))),
        openai_error(429, "slow down", headers={"retry-after": "60"}),
    ])
    with make_client() as client:
        response = chat(client, "go")
    assert (response.status_code, response.json()["type"], response.headers.get("retry-after")) == (
        502, "upstream_rate_limited", "60")


def test_a_retry_after_longer_than_a_request_should_wait_goes_to_the_client(upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=openai_error(429, "slow down", headers={"retry-after": "60"}))
    with make_client() as client:
        response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["type"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == "60" and route.call_count == 1  # not retried 20 s early


def test_retry_after_ms_is_honoured(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(429, "slow down", headers={"retry-after-ms": "300", "retry-after": "1"}), sse_response(text_events("ok")),
    ])
    started = time.monotonic()
    assert chat(client, "hi").json()["responses"] == ["ok"] and route.call_count == 2
    assert 0.3 <= time.monotonic() - started < 1.0  # the finer header wins


def test_a_step_a_failure_cuts_off_ends_before_the_outcome_with_the_failure(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    created = text_events("x")[0]
    events = [created,
              {"type": "response.output_item.added", "output_index": 0,
               "item": {"type": "web_search_call", "id": "ws_1", "status": "in_progress"}},
              {"type": "response.failed", "response": {**created["response"], "status": "failed",
                                                       "error": {"code": "server_error", "message": "The model failed."}}}]
    upstream.post("/responses").mock(return_value=sse_response(events))
    streamed = events_of(chat(client, "hi", headers=SSE).text)
    names = [e["event"] for e in streamed]
    assert names[-3:] == ["thread.run.step.completed", "thread.run.failed", "metadata"], names
    step = streamed[-3]["data"]["step"]
    assert step["is_error"] is True and "The model failed." in step["output"]


def test_a_5xx_after_a_turn_of_many_tool_calls_is_still_retried(client: TestClient, upstream: respx.MockRouter) -> None:
    """The previous turn's user message lies under 30 items (15 calls and their outputs)."""
    route = upstream.post("/responses").mock(side_effect=[openai_error(502, "bad gateway"), sse_response(text_events("ok"))])
    newest_first = [conversation_item("assistant", "all done")]
    for n in range(15):
        newest_first += [{"type": "function_call_output", "id": f"fco_{n}", "call_id": f"call_{n}", "output": "1",
                          "status": "completed"},
                         {"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}", "name": "calculator",
                          "arguments": "{}", "status": "completed"}]
    newest_first.append(conversation_item("user", "compute a lot"))

    def page(request: httpx.Request) -> httpx.Response:  # as the API pages: at most `limit` items
        limit = int(request.url.params["limit"])
        return httpx.Response(200, json={"object": "list", "data": newest_first[:limit], "has_more": True})

    upstream.get("/conversations/conv_test/items").mock(side_effect=page)
    assert chat(client, "hi").json()["responses"] == ["ok"] and route.call_count == 2


def test_a_redirect_is_not_taken_for_a_stream(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=httpx.Response(307, headers={"location": "https://elsewhere.example/"}))
    response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["error"].startswith("the upstream answered 307")


def test_an_error_page_that_is_not_json_is_not_passed_on(client: TestClient, upstream: respx.MockRouter) -> None:
    page = "<html><body><h1>502 Bad Gateway</h1><p>internal-lb-7.example.net</p></body></html>"
    upstream.post("/responses").mock(return_value=httpx.Response(502, text=page, headers={"content-type": "text/html"}))
    upstream.get("/conversations/conv_test/items").respond(200, json={"object": "list", "data": [], "has_more": False})
    response = chat(client, "hi")
    assert response.status_code == 502 and response.json()["error"] == "the upstream answered 502: no details"


def test_a_secret_in_a_failed_responses_message_is_masked(client: TestClient, upstream: respx.MockRouter) -> None:
    failed = text_events("x")[:1] + [{"type": "response.failed", "response": {
        **text_events("x")[0]["response"], "status": "failed",
        "error": {"code": "server_error", "message": "could not use key sk-proj-abcdefghijklmnop1234"}}}]
    upstream.post("/responses").mock(return_value=sse_response(failed))
    event = next(e for e in events_of(chat(client, "hi", headers=SSE).text) if e["event"] == "thread.run.failed")
    assert "abcdefghijklmnop" not in event["data"]["error"] and "[redacted]" in event["data"]["error"]


def test_unreadable_retry_after_falls_back_to_backoff(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(429, "slow down", headers={"retry-after": "soon, maybe"}), sse_response(text_events("ok")),
    ])
    assert chat(client, "hi").json()["responses"] == ["ok"] and route.call_count == 2


def test_the_service_makes_pythons_full_garbage_collections_rare_and_skips_what_start_up_built() -> None:
    """Each full collection stalls every stream (assistant/garbage_collection.py says why)."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)  # Python's default
    with make_client() as test_client:
        assert test_client.get("/health").status_code == 200
        assert gc.get_threshold() == (700, 10, 1000)
        assert gc.get_freeze_count() > 10_000


def test_each_run_counts_as_it_ends_towards_the_next_full_garbage_collection(
    client: TestClient, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[int] = []
    monkeypatch.setattr(run_manager, "note_ended", lambda: ended.append(1))
    upstream.post("/responses").mock(side_effect=[sse_response(text_events("ok")), openai_error(400, "no")])
    assert chat(client, "hi").json()["responses"] == ["ok"] and len(ended) == 1
    assert chat(client, "again").status_code == 502 and len(ended) == 2  # a run that fails ends too


def guarded_app() -> tuple[Any, list[str], Any, list[dict[str, Any]]]:
    """An inner app that records the paths it is reached with, and a `send` that records messages."""
    reached: list[str] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return inner, reached, send, sent


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "public"),
    [("/prefix/health", True), ("/prefix/", True), ("/prefix", True), ("/prefix/static/chat.js", True),
     ("/prefix/chat", False), ("/prefix/threads", False), ("/health", True), ("/prefixed/health", False)],
)
async def test_the_api_key_guard_sees_paths_as_the_routes_do_under_a_root_path(path: str, public: bool) -> None:
    """`hypercorn --root-path /prefix` behind a proxy that keeps the prefix: the public routes
    stay public, the rest still need the key."""
    inner, reached, send, sent = guarded_app()
    guard = APIKeyMiddleware(inner, api_key="secret")
    scope = {"type": "http", "path": path, "root_path": "/prefix", "headers": [], "state": {}}
    await guard(scope, None, send)
    assert bool(reached) is public
    assert public or sent[0]["status"] == 401


@pytest.mark.anyio
@pytest.mark.parametrize("guard", ["api_key", "cors"])
async def test_a_refused_handshake_is_closed_with_1008_where_the_server_cannot_answer_in_http(guard: str) -> None:
    """Without the websocket.http.response extension the refusal is a close before accept (the
    server turns it into a bare 403), never a socket that opens."""
    inner, reached, send, sent = guarded_app()
    middleware = (APIKeyMiddleware(inner, api_key="secret") if guard == "api_key"
                  else CORSMiddleware(inner, allow_origins=["http://app.example"]))
    scope = {"type": "websocket", "path": "/ws/chat", "root_path": "", "state": {}, "extensions": {},
             "headers": [(b"host", b"service.example"), (b"origin", b"http://evil.example")]}
    await middleware(scope, None, send)
    assert not reached
    assert sent == [{"type": "websocket.close", "code": 1008,
                     "reason": "unauthorized" if guard == "api_key" else "cors_refused"}]


@pytest.mark.parametrize(
    ("origin", "headers", "same"),
    [("http://service.example", {"host": "service.example"}, True),
     ("https://Service.Example:8443", {"host": "service.example:8443"}, True),
     ("https://service.example:8443", {"host": "service.example"}, False),  # another port, another origin
     ("https://public.example", {"host": "127.0.0.1:8000", "x-forwarded-host": "public.example, inner"}, True),
     ("https://inner", {"host": "127.0.0.1:8000", "x-forwarded-host": "public.example, inner"}, False),
     ("null", {"host": "null"}, False),
     ("http://", {"host": ""}, False)],
)
def test_same_origin_is_the_services_own_host(origin: str, headers: dict[str, str], same: bool) -> None:
    assert is_same_origin(origin, Headers(headers)) is same


def test_routes_keep_their_endpoints_names(client: TestClient) -> None:
    app = client.app
    assert app.url_path_for("chat") == "/chat"  # type: ignore[attr-defined]
    assert app.url_path_for("stream_run", run_id="run_x") == "/chat/stream/run_x"  # type: ignore[attr-defined]


def test_an_endpoint_must_be_async() -> None:
    from assistant.http_api import Endpoint

    def sync_endpoint(request: Any) -> Any:
        return None

    with pytest.raises(TypeError):
        Endpoint(sync_endpoint)


def test_a_request_the_client_got_wrong_leaves_one_log_line_with_its_correlation_id(client: TestClient) -> None:
    """Its error payload's correlation ID must lead to something in the logs."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # formatted now, in the request's context
            lines.append(orjson.loads(JsonFormatter().format(record)))

    handler = Collect()
    http_logger = logging.getLogger("assistant.http")
    http_logger.addHandler(handler)
    http_logger.setLevel(logging.INFO)
    try:
        bad = client.post("/chat", content=b"{not json", headers={"content-type": "application/json",
                                                                  "X-Correlation-ID": "bad-body-1"})
        missing = client.get("/no/such/route", headers={"X-Correlation-ID": "no-route-1"})
    finally:
        http_logger.removeHandler(handler)
        http_logger.setLevel(logging.NOTSET)
    assert bad.status_code == 400 and missing.status_code == 404
    refusals = [(line["message"].split(" (")[0], line.get("correlation_id")) for line in lines
                if line["message"].startswith("request refused with")]
    assert refusals == [("request refused with invalid_request", "bad-body-1"),
                        ("request refused with not_found", "no-route-1")]


# --- fault sequences found by a review of the Responses engine ----------------------------------


CONVERSATION_LOCKED = openai_error(400, "Another process is currently operating on this conversation. Please retry in a few seconds.",
                      code="conversation_locked")


def conversation_page(items: list[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": items, "has_more": False})


def test_a_5xx_then_conversation_locked_does_not_send_the_message_twice(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """The 502 came from a gateway while OpenAI went on with the response: the conversation shows
    the input only with the response's outputs (README), so the read-back right after the 502
    finds nothing and the retry meets conversation_locked. Once the lock is gone the conversation
    holds the message and its answer; sending it again makes the model answer it twice."""
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(502, "bad gateway"), CONVERSATION_LOCKED, sse_response(text_events("answered a second time")),
    ])
    earlier = [conversation_item("assistant", "earlier answer"), conversation_item("user", "earlier question")]
    later = [conversation_item("assistant", "the first answer"), conversation_item("user", "hi"), *earlier]
    reads = upstream.get("/conversations/conv_test/items").mock(side_effect=[conversation_page(earlier), conversation_page(later), conversation_page(later)])
    chat(client, "hi")
    assert reads.call_count >= 1
    # The message went in with the first POST: it must not be sent again.
    assert route.call_count == 2, [request_body(c)["input"] for c in route.calls]


def test_tool_outputs_taken_by_the_last_5xx_attempt_are_not_sent_again(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """UPSTREAM_MAX_RETRIES=3: the follow-up's three first 502s left nothing, the fourth (last)
    one took the outputs. No read-back is made after the last attempt, so the outputs are held
    and go out again with the thread's next message."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(calls), *[openai_error(502, "bad gateway")] * 4, sse_response(text_events("next")),
    ])
    call = {"type": "function_call", "id": "fc_1", "call_id": call_id, "name": "calculator", "arguments": "{}",
            "status": "completed"}
    output = {"type": "function_call_output", "id": "fco_1", "call_id": call_id, "output": "3", "status": "completed"}
    before = [call, conversation_item("user", "go")]
    after = [conversation_item("assistant", "3"), output, *before]
    upstream.get("/conversations/conv_test/items").mock(
        side_effect=[conversation_page(before), conversation_page(before), conversation_page(before), conversation_page(after), conversation_page(after)]
    )
    assert chat(client, "go").status_code == 502
    assert chat(client, "and now?").status_code == 200
    sent = request_body(route.calls[-1])["input"]
    assert [i["type"] for i in sent] == ["message"], sent  # the conversation already holds output "3"


def recorded(
    answer: Callable[[int, dict[str, Any]], httpx.Response],
) -> tuple[Callable[[httpx.Request], httpx.Response], list[list[dict[str, Any]]]]:
    """A respx side effect answering the n-th request (and its body) with `answer`, and the inputs
    it was sent, in order."""
    inputs: list[list[dict[str, Any]]] = []

    def respond(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        inputs.append(body["input"])
        return answer(len(inputs) - 1, body)

    return respond, inputs


def stop_the_running_run(runs: Any) -> None:
    """What POST /runs/{run_id}/cancel does, for the one run going on."""
    [run] = runs.active_runs
    runs.cancel(run.run_id, "cancelled by the client")


def test_tool_outputs_of_a_run_cancelled_while_the_follow_up_waits_are_not_lost(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """The tools ran; the follow-up is refused with a 429 (nothing taken) and the run is stopped
    (POST /runs/{id}/cancel) during the backoff: the outputs are kept for the thread's next
    message, as when a run is stopped while its tools run, so the model gets the tool's result
    rather than an 'interrupted' answer from repair_input."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    runs = client.app.state.runs  # type: ignore[attr-defined]

    def answer(n: int, body: dict[str, Any]) -> httpx.Response:
        if n == 0:
            return sse_response(calls)
        if n == 1:  # the follow-up: refused, and the client stops the run meanwhile
            stop_the_running_run(runs)
            return openai_error(429, "slow down", code="rate_limit_exceeded", headers={"retry-after": "0.5"})
        if not any(i.get("call_id") == call_id for i in body["input"]):
            return openai_error(400, f"No tool output found for function call {call_id}.")
        return sse_response(text_events("next"))

    respond, answered = recorded(answer)
    upstream.post("/responses").mock(side_effect=respond)
    call = {"type": "function_call", "id": "fc_1", "call_id": call_id, "name": "calculator", "arguments": "{}",
            "status": "completed"}
    upstream.get("/conversations/conv_test/items").mock(return_value=conversation_page([call, conversation_item("user", "go")]))
    response = chat(client, "go")
    assert response.status_code == 409 and response.json()["type"] == "run_cancelled", response.text
    assert chat(client, "and now?").json()["responses"] == ["next"]
    [output] = [i for i in answered[-1] if i.get("type") == "function_call_output"]
    assert output["output"] == "3", output  # the tool's result, not "interrupted"


def test_held_outputs_of_a_run_cancelled_while_the_thread_is_locked_are_not_lost(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """Outputs held for the thread's next message (the follow-up failed) are popped by that
    message's run; stopped while OpenAI still holds the conversation (nothing was taken), the run
    holds them again for the message after."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    runs = client.app.state.runs  # type: ignore[attr-defined]
    engine = runs.engine

    def answer(n: int, body: dict[str, Any]) -> httpx.Response:
        if n == 0:
            return sse_response(calls)
        if n == 1:  # the follow-up: a 401 (not retried, nothing taken): the outputs are held
            return openai_error(401, "Incorrect API key provided.")
        if n == 2:  # the next message meets a locked conversation; the client stops it
            stop_the_running_run(runs)
            return CONVERSATION_LOCKED
        if not any(i.get("call_id") == call_id for i in body["input"]):
            return openai_error(400, f"No tool output found for function call {call_id}.")
        return sse_response(text_events("next"))

    respond, answered = recorded(answer)
    upstream.post("/responses").mock(side_effect=respond)
    assert chat(client, "go").status_code == 502
    assert engine._undelivered.get("conv_test")
    assert chat(client, "second").status_code == 409
    assert engine._undelivered.get("conv_test"), "the held outputs were dropped"


def test_outputs_held_for_a_thread_that_no_longer_exists_are_dropped(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """A thread whose follow-up failed keeps its outputs (each up to 10 MiB) until its next message
    is accepted; one deleted upstream never will be, so they go (and at most MAX_HELD_THREADS
    threads' are kept)."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    engine = client.app.state.runs.engine  # type: ignore[attr-defined]
    upstream.post("/responses").mock(side_effect=[
        sse_response(calls), openai_error(401, "Incorrect API key provided."),
        *[httpx.Response(404, json={"error": {"message": "Conversation with id 'conv_test' not found.",
                                              "type": "invalid_request_error", "param": "conversation", "code": None}})] * 3,
    ])
    assert chat(client, "go").status_code == 502
    for _ in range(3):
        assert chat(client, "hello?").json()["type"] == "thread_not_found"
    assert "conv_test" not in engine._undelivered, engine._undelivered


def test_a_5xx_then_conversation_locked_with_an_unreadable_conversation_does_not_send_the_message_twice(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """As above, but once the lock is gone the conversation cannot be read back: whether the first
    POST took the message is unknown, so it is not sent again (the client gets the 502)."""
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(502, "bad gateway"), CONVERSATION_LOCKED, sse_response(text_events("answered a second time")),
    ])
    earlier = [conversation_item("assistant", "earlier answer"), conversation_item("user", "earlier question")]
    upstream.get("/conversations/conv_test/items").mock(side_effect=[
        conversation_page(earlier), *[openai_error(500, "server error")] * 3,
    ])
    assert chat(client, "hi").status_code == 502
    assert route.call_count == 2, [request_body(c)["input"] for c in route.calls]


def test_tool_outputs_a_run_stopped_during_its_follow_up_request_got_in_are_not_sent_again(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    """Stopped (POST /runs/{id}/cancel) while the follow-up request carrying the tool outputs is
    out: the conversation is read back, and outputs it already took are not sent again with the
    thread's next message."""
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    call_id = next(e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done")
    runs = client.app.state.runs  # type: ignore[attr-defined]
    inputs: list[list[dict[str, Any]]] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        inputs.append(orjson.loads(request.content)["input"])
        if len(inputs) == 1:
            return sse_response(calls)
        if len(inputs) == 2:  # the follow-up: OpenAI takes it, and the client stops the run meanwhile
            stop_the_running_run(runs)
            await anyio.sleep(5)
        return sse_response(text_events("next"))

    upstream.post("/responses").mock(side_effect=respond)
    call = {"type": "function_call", "id": "fc_1", "call_id": call_id, "name": "calculator", "arguments": "{}",
            "status": "completed"}
    output = {"type": "function_call_output", "id": "fco_1", "call_id": call_id, "output": "3", "status": "completed"}
    upstream.get("/conversations/conv_test/items").mock(
        return_value=conversation_page([output, call, conversation_item("user", "go")])
    )
    response = chat(client, "go")
    assert response.status_code == 409 and response.json()["type"] == "run_cancelled", response.text
    assert chat(client, "and now?").json()["responses"] == ["next"]
    assert [i["type"] for i in inputs[-1]] == ["message"], inputs[-1]  # the conversation holds output "3"


def test_a_run_stopped_while_its_tools_run_keeps_the_results_of_those_that_finished(
    upstream: respx.MockRouter,
) -> None:
    """Stopped while one of two parallel tools still runs: the thread's next message carries the
    finished tool's real result (it ran; the model should know what it did) and an error saying
    the other was interrupted by the stop."""
    holder: dict[str, Any] = {}

    async def press_stop() -> str:
        """A long tool during which the client presses Stop."""
        await anyio.sleep(0.3)  # the calculator's result is in by then
        stop_the_running_run(holder["runs"])
        await anyio.sleep(5)
        return "never"

    settings = load_settings({"OPENAI_API_KEY": "sk-test-secret-key", "OPENAI_BASE_URL": BASE_URL,
                              "TOOL_TIMEOUT_SECONDS": "10"})
    calls = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'), ("press_stop", "{}"))
    calc_id, stop_id = [e["item"]["call_id"] for e in calls if e["type"] == "response.output_item.done"]
    route = upstream.post("/responses").mock(side_effect=[sse_response(calls), sse_response(text_events("next"))])
    with TestClient(create_app(settings, tool_map={**TOOLS, "press_stop": press_stop}),
                    raise_server_exceptions=False) as client:
        holder["runs"] = client.app.state.runs  # type: ignore[attr-defined]
        response = chat(client, "go")
        assert response.status_code == 409 and response.json()["type"] == "run_cancelled", response.text
        assert chat(client, "and now?").json()["responses"] == ["next"]
    outputs = {i["call_id"]: i["output"] for i in request_body(route.calls[-1])["input"]
               if i["type"] == "function_call_output"}
    assert outputs[calc_id] == "3", outputs
    assert orjson.loads(outputs[stop_id]) == {"error": "cancelled by the client",
                                              "correlation_id": response.headers["x-correlation-id"]}


def test_outputs_held_for_the_newest_threads_are_kept_when_the_oldest_go(
    client: TestClient, upstream: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_HELD_THREADS threads keep undelivered tool outputs: past that, the thread held
    longest loses them (repair_input answers its calls later), not the one whose follow-up just
    failed, whose next message still carries its tool's result."""
    monkeypatch.setattr(responses_engine, "MAX_HELD_THREADS", 1)
    first = call_events(("calculator", '{"a": 1, "b": 2, "op": "add"}'))
    second = call_events(("calculator", '{"a": 2, "b": 2, "op": "add"}'))
    second_id = next(e["item"]["call_id"] for e in second if e["type"] == "response.output_item.done")
    route = upstream.post("/responses").mock(side_effect=[
        sse_response(first), openai_error(401, "Incorrect API key provided."),
        sse_response(second), openai_error(401, "Incorrect API key provided."),
        sse_response(text_events("next")),
    ])
    assert chat(client, "go", thread_id="conv_old").status_code == 502
    assert chat(client, "go", thread_id="conv_new").status_code == 502
    assert chat(client, "and now?", thread_id="conv_new").json()["responses"] == ["next"]
    sent = request_body(route.calls[-1])["input"]
    assert [(i["type"], i.get("call_id"), i.get("output")) for i in sent[:1]] == [
        ("function_call_output", second_id, "4")
    ], sent

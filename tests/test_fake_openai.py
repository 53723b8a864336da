"""Tests of the fake OpenAI itself: if it lies about OpenAI's wire format, every e2e test lies too."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest

from tests.fake_openai import create_app

REPO = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": "Bearer sk-test"}
FIXTURES = create_app().state.fake.fixtures


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://fake", headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The fake under hypercorn, so streaming and hang-ups go over a real socket."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FAKE_OPENAI_DELTA_DELAY": "0.1", "FAKE_CANCEL_DELAY": "0.1", "FAKE_ABANDONED_RUN_SECONDS": "1"}
    cmd = [sys.executable, "-m", "hypercorn", "tests.fake_openai:app", "--bind", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/_fake/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            pytest.fail(f"hypercorn did not start: {proc.stderr.read1().decode()}")  # type: ignore[union-attr]
        yield url
    finally:
        proc.terminate()
        proc.wait(5)


def parse_sse(body: str) -> list[tuple[str, str]]:
    """Events as (name, raw data); strict, so stray lines or multi-line data fail the test."""
    assert body.endswith("\n\n")
    events = []
    for block in body[:-2].split("\n\n"):
        event, data = block.split("\n")  # never str.splitlines: U+2028 may sit inside the JSON
        assert event.startswith("event: ") and data.startswith("data: ")
        events.append((event[7:], data[6:]))
    return events


async def stream(client: httpx.AsyncClient, input: Any, conversation: str | None = None, **extra: Any) -> list[dict[str, Any]]:
    body = {"model": "gpt-test", "input": input, "stream": True, **extra}
    if conversation:
        body["conversation"] = conversation
    response = await client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for name, data in parse_sse(response.text):
        event = orjson.loads(data)
        assert event["type"] == name
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


async def new_conversation(client: httpx.AsyncClient) -> str:
    return (await client.post("/v1/conversations")).json()["id"]


def deltas(events: list[dict[str, Any]], kind: str = "response.output_text.delta") -> list[str]:
    return [e["delta"] for e in events if e["type"] == kind]


def final_text(events: list[dict[str, Any]]) -> str:
    assert events[-1]["type"] == "response.completed"
    message = [i for i in events[-1]["response"]["output"] if i["type"] == "message"][-1]
    return message["content"][0]["text"]


@pytest.mark.anyio
async def test_conversations(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/conversations", json={"metadata": {"user": "u1"}, "items": [{"role": "user", "content": "a"}]})
    conversation = created.json()
    assert conversation["id"].startswith("conv_") and conversation["object"] == "conversation"
    assert isinstance(conversation["created_at"], int) and conversation["metadata"] == {"user": "u1"}
    assert (await client.get(f"/v1/conversations/{conversation['id']}")).json() == conversation

    added = (await client.post(f"/v1/conversations/{conversation['id']}/items", json={"items": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": "c"},
    ]})).json()
    assert added["object"] == "list" and [i["id"][:4] for i in added["data"]] == ["msg_", "msg_"]

    url = f"/v1/conversations/{conversation['id']}/items"
    newest = (await client.get(url)).json()
    assert [i["content"][0]["text"] for i in newest["data"]] == ["c", "b", "a"]
    assert newest["first_id"] == newest["data"][0]["id"] and newest["has_more"] is False
    page = (await client.get(url, params={"order": "asc", "limit": 2})).json()
    assert [i["content"][0]["text"] for i in page["data"]] == ["a", "b"] and page["has_more"] is True

    for missing in ("/v1/conversations/conv_nope", "/v1/conversations/conv_nope/items"):
        response = await client.get(missing)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "Conversation with id 'conv_nope' not found.",
                                             "type": "invalid_request_error", "param": None, "code": None}}


@pytest.mark.anyio
async def test_echo_stream_shapes(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    text = "hello  there\r\nline two\n\u00e9t\u00e9 \U0001f600 \u2028 \"quoted\"\t"
    events = await stream(client, [{"role": "user", "content": [{"type": "input_text", "text": text}]}], conversation,
                          instructions="Be brief.")
    assert [e["type"] for e in events[:4]] == ["response.created", "response.in_progress",
                                               "response.output_item.added", "response.content_part.added"]
    assert [e["type"] for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                                "response.output_item.done", "response.completed"]
    created = events[0]["response"]
    assert created["id"].startswith("resp_") and created["status"] == "in_progress" and created["output"] == []
    assert created["model"] == "gpt-test" and created["instructions"] == "Be brief." and created["usage"] is None

    pieces = deltas(events)
    assert len(pieces) > 3 and "".join(pieces) == f"You said: {text}"
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["item_id"].startswith("msg_") and delta["output_index"] == 0 and delta["content_index"] == 0
    assert delta["logprobs"] == []
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["text"] == f"You said: {text}"

    completed = events[-1]["response"]
    assert completed["status"] == "completed" and completed["id"] == created["id"]
    assert completed["usage"]["total_tokens"] == completed["usage"]["input_tokens"] + completed["usage"]["output_tokens"]
    assert completed["output"] == [next(e for e in events if e["type"] == "response.output_item.done")["item"]]
    assert completed["output"][0]["role"] == "assistant" and completed["output"][0]["status"] == "completed"

    items = (await client.get(f"/v1/conversations/{conversation}/items", params={"order": "asc"})).json()["data"]
    assert [(i["role"], i["content"][0]["text"]) for i in items] == [("user", text), ("assistant", f"You said: {text}")]


@pytest.mark.anyio
async def test_tool_call_then_outputs(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    events = await stream(client, 'tool:get_weather {"city": "Paris"}', conversation)
    added = next(e for e in events if e["type"] == "response.output_item.added")["item"]
    assert added["type"] == "function_call" and added["status"] == "in_progress" and added["arguments"] == ""
    assert added["id"].startswith("fc_") and added["call_id"].startswith("call_") and added["name"] == "get_weather"
    chunks = deltas(events, "response.function_call_arguments.delta")
    assert 2 <= len(chunks) <= 3 and "".join(chunks) == '{"city": "Paris"}'
    assert next(e for e in events if e["type"] == "response.function_call_arguments.done")["arguments"] == '{"city": "Paris"}'
    call = next(e for e in events if e["type"] == "response.output_item.done")["item"]
    assert call == {**added, "status": "completed", "arguments": '{"city": "Paris"}'}
    assert events[-1]["response"]["output"] == [call]

    stuck = await client.post("/v1/responses", json={"model": "m", "conversation": conversation, "input": "hi", "stream": True})
    assert stuck.status_code == 400
    assert stuck.json()["error"] == {"message": f"No tool output found for function call {call['call_id']}.",
                                     "type": "invalid_request_error", "param": "input", "code": None}

    output = [{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]
    assert final_text(await stream(client, output, conversation)) == "Tool results: sunny"
    assert final_text(await stream(client, "hi", conversation)) == "You said: hi"


@pytest.mark.anyio
async def test_parallel_tool_calls(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    events = await stream(client, 'tool:a {"x": 1}\ntool:b\nignored line', conversation)
    calls = events[-1]["response"]["output"]
    assert [(c["name"], c["arguments"]) for c in calls] == [("a", '{"x": 1}'), ("b", "{}")]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.done"] == [0, 1]

    half = [{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "one"}]
    response = await client.post("/v1/responses", json={"model": "m", "conversation": conversation, "input": half})
    assert response.status_code == 400 and calls[1]["call_id"] in response.json()["error"]["message"]

    outputs = [{"type": "function_call_output", "call_id": c["call_id"], "output": out} for c, out in zip(calls, ["one", "two"])]
    assert final_text(await stream(client, outputs, conversation)) == "Tool results: one | two"


@pytest.mark.anyio
async def test_request_errors_and_log(client: httpx.AsyncClient) -> None:
    unauthorized = await client.post("/v1/responses", json={"model": "m", "input": "hi"}, headers={"Authorization": ""})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["type"] == "invalid_request_error"
    missing = await client.post("/v1/responses", json={"model": "m", "input": "hi", "conversation": "conv_x"})
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "Conversation with id 'conv_x' not found.",
                                       "type": "invalid_request_error", "param": "conversation", "code": None}

    log = (await client.get("/_fake/requests")).json()
    assert [r["path"] for r in log] == ["/v1/responses", "/v1/responses"]
    assert log[1]["body"] == {"model": "m", "input": "hi", "conversation": "conv_x"}
    assert "authorization" not in log[1]["headers"] and log[1]["method"] == "POST"
    await client.post("/_fake/reset")
    assert (await client.get("/_fake/requests")).json() == []


@pytest.mark.anyio
async def test_non_streaming(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/responses", json={"model": "m", "input": "hi"})
    assert response.json()["status"] == "completed"
    assert response.json()["output"][0]["content"][0]["text"] == "You said: hi"


@pytest.mark.anyio
async def test_conversation_locked_while_streaming(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    body = {"model": "m", "conversation": conversation, "stream": True}
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream, client, "fault:stall 0.3", conversation)
        await anyio.sleep(0.1)
        locked = await client.post("/v1/responses", json={**body, "input": "hi"})
    assert locked.status_code == 400
    assert locked.json()["error"] == {"message": "Another process is currently operating on this conversation. "
                                      "Please retry in a few seconds.", "type": "invalid_request_error",
                                      "param": "conversation", "code": "conversation_locked"}
    assert final_text(await stream(client, "after", conversation)) == "You said: after"

    with anyio.move_on_after(0.1):  # the client gives up mid-stream: the lock goes with it
        await stream(client, "fault:stall 5", conversation)
    assert final_text(await stream(client, "after drop", conversation)) == "You said: after drop"


@pytest.mark.anyio
async def test_fault_locked_outlives_response(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    await stream(client, "fault:locked 0.3", conversation)
    again = await client.post("/v1/responses", json={"model": "m", "conversation": conversation, "input": "x"})
    assert again.json()["error"]["code"] == "conversation_locked"
    await anyio.sleep(0.35)
    assert final_text(await stream(client, "x", conversation)) == "You said: x"


@pytest.mark.anyio
async def test_fault_status(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    body = {"model": "m", "conversation": conversation, "input": "fault:status 503 2 x2", "stream": True}
    for _ in range(2):
        failed = await client.post("/v1/responses", json=body)
        assert failed.status_code == 503 and failed.headers["retry-after"] == "2"
        assert failed.json()["error"]["type"] == "server_error"
    assert final_text(await stream(client, body["input"], conversation)) == "recovered"
    items = (await client.get(f"/v1/conversations/{conversation}/items")).json()["data"]
    assert len(items) == 2  # the failed attempts left nothing behind

    always = await client.post("/v1/responses", json={"model": "m", "input": "fault:status 429"})
    assert always.status_code == 429 and "retry-after" not in always.headers
    assert always.json()["error"]["code"] == "rate_limit_exceeded"
    bad = await client.post("/v1/responses", json={"model": "m", "input": "fault:nonsense"})
    assert bad.status_code == 400


@pytest.mark.anyio
async def test_fault_stall_and_slow(client: httpx.AsyncClient) -> None:
    start = time.monotonic()
    events = await stream(client, "fault:stall 0.2")
    assert time.monotonic() - start >= 0.2 and final_text(events) == "You said: fault:stall 0.2"

    start = time.monotonic()
    events = await stream(client, "fault:slow 0.05 3")
    assert time.monotonic() - start >= 0.15
    assert deltas(events) == ["word0", " word1", " word2"] and final_text(events) == "word0 word1 word2"


@pytest.mark.anyio
async def test_fault_stream_endings(client: httpx.AsyncClient) -> None:
    events = await stream(client, "fault:cut eof please")
    assert events[-1]["type"] == "response.output_text.delta" and deltas(events)

    response = await client.post("/v1/responses", json={"model": "m", "input": "fault:malformed one two three", "stream": True})
    raw = parse_sse(response.text)
    broken = [data for _, data in raw if not data.startswith("{") or not data.endswith("}")]
    assert len(broken) == 1 and raw[-1][0] == "response.completed"

    failed = await stream(client, "fault:failed")
    assert failed[-1]["type"] == "response.failed" and failed[-1]["response"]["status"] == "failed"
    assert failed[-1]["response"]["error"] == {"code": "server_error", "message": "The model failed."}

    errored = await stream(client, "fault:error-event")
    assert [e["type"] for e in errored[-2:]] == ["error", "response.failed"]
    assert errored[-2]["error"]["code"] == "insufficient_quota"

    incomplete = await stream(client, "fault:incomplete a b c d e f")
    response = incomplete[-1]["response"]
    assert incomplete[-1]["type"] == "response.incomplete" and response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["content"][0]["text"] == "".join(deltas(incomplete))
    assert len("".join(deltas(incomplete))) < len("You said: fault:incomplete a b c d e f")


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.chunks.txt")))
async def test_fixture_replay(client: httpx.AsyncClient, name: str) -> None:
    lines = [line for line in (FIXTURES / name).read_text("utf-8").split("\n") if line.strip()]
    conversation = await new_conversation(client)
    response = await client.post("/v1/responses", json={"model": "m", "conversation": conversation,
                                                        "input": f"fixture:{name}", "stream": True})
    replayed = parse_sse(response.text)
    first = lines[: next((n for n in range(1, len(lines)) if '"type":"response.created"' in lines[n]), len(lines))]
    assert [data for _, data in replayed] == first
    for event, data in replayed:
        assert f'"type":"{event}"' in data


@pytest.mark.anyio
async def test_fixture_segments_follow_tool_rounds(client: httpx.AsyncClient) -> None:
    conversation = await new_conversation(client)
    events = await stream(client, "fixture:openai-reasoning-encrypted-content.1.chunks.txt", conversation)
    ids = [events[0]["response"]["id"]]
    for _ in range(3):
        calls = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
        assert len(calls) == 1
        outputs = [{"type": "function_call_output", "call_id": calls[0]["call_id"], "output": "42"}]
        events = await stream(client, outputs, conversation)
        ids.append(events[0]["response"]["id"])
    assert len(set(ids)) == 4 and final_text(events) == "The final result is **570**."

    broken = parse_sse((await client.post("/v1/responses", json={
        "model": "m", "input": "fixture:parallel-tool-call-wrapper.1.chunks.txt", "stream": True})).text)
    assert broken[0][0] == "response.created" and broken[-1][0] == "response.completed"


@pytest.mark.anyio
async def test_incremental_delivery_and_hang_up(server: str) -> None:
    body = {"model": "m", "input": "one two three four five", "stream": True}
    async with httpx.AsyncClient(base_url=server, headers=AUTH) as client:
        arrivals = []
        async with client.stream("POST", "/v1/responses", json=body) as response:
            async for line in response.aiter_lines():
                if line == "event: response.output_text.delta":
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 7 and arrivals[-1] - arrivals[0] >= 0.4  # FAKE_OPENAI_DELTA_DELAY=0.1

        cut = {**body, "input": "fault:cut now please"}
        seen = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", "/v1/responses", json=cut, headers={"X-Fake-Delta-Delay": "0"}) as response:
                async for line in response.aiter_lines():
                    seen.append(line)
        assert "event: response.output_text.delta" in seen and "event: response.completed" not in seen


# -- Assistants API v2 (threads, messages, runs, run steps)

BETA = {**AUTH, "OpenAI-Beta": "assistants=v2"}
ASST = "asst_test"
EVENT_OBJECTS = {  # event name prefix -> the `object` its data must have
    "thread.run.step.delta": "thread.run.step.delta",
    "thread.run.step.": "thread.run.step",
    "thread.run.": "thread.run",
    "thread.message.delta": "thread.message.delta",
    "thread.message.": "thread.message",
}
STREAM_EVENT = None  # the SDK's discriminated union of stream events, built on first use


def check_event(name: str, data: dict[str, Any]) -> None:
    """An event's data is the object itself (no event envelope) and the SDK's model accepts it."""
    global STREAM_EVENT
    from openai.types.beta import AssistantStreamEvent
    from pydantic import TypeAdapter

    STREAM_EVENT = STREAM_EVENT or TypeAdapter(AssistantStreamEvent)
    expected = next(obj for prefix, obj in EVENT_OBJECTS.items() if name.startswith(prefix))
    assert data["object"] == expected, (name, data)
    assert data.get("type") != name and "event" not in data and "data" not in data
    STREAM_EVENT.validate_python({"event": name, "data": data})


@pytest.fixture
async def beta() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(cancel_delay=0.1, abandoned_run_seconds=0.3)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake", headers=BETA) as client:
        yield client


async def new_thread(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/threads", json=body)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def run_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """A run's SSE as (event, data), checked: every event's data is its object, then `done` / [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = parse_sse(response.text)
    assert raw[-1] == ("done", "[DONE]") and all(name != "done" for name, _ in raw[:-1])
    events = [(name, orjson.loads(data)) for name, data in raw[:-1]]
    for name, data in events:
        check_event(name, data)
    return events


async def start_run(client: httpx.AsyncClient, thread: str, text: str | None = None, **body: Any) -> httpx.Response:
    body = {"assistant_id": ASST, "stream": True, **body}
    if text is not None:
        body["additional_messages"] = [{"role": "user", "content": text}]
    return await client.post(f"/v1/threads/{thread}/runs", json=body)


async def run(client: httpx.AsyncClient, thread: str, text: str | None = None, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    return run_events(await start_run(client, thread, text, **body))


async def submit(client: httpx.AsyncClient, thread: str, run_id: str, outputs: list[tuple[str, str]], **body: Any) -> httpx.Response:
    tool_outputs = [{"tool_call_id": call, "output": output} for call, output in outputs]
    return await client.post(f"/v1/threads/{thread}/runs/{run_id}/submit_tool_outputs",
                             json={"tool_outputs": tool_outputs, "stream": True, **body})


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


def text_of(events: list[tuple[str, dict[str, Any]]]) -> str:
    return "".join(d["delta"]["content"][0]["text"]["value"] for n, d in events if n == "thread.message.delta")


def last(events: list[tuple[str, dict[str, Any]]], name: str) -> dict[str, Any]:
    return [d for n, d in events if n == name][-1]


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


TEXT_RUN = [
    "thread.run.created", "thread.run.queued", "thread.run.in_progress",
    "thread.run.step.created", "thread.run.step.in_progress",
    "thread.message.created", "thread.message.in_progress",
]
TEXT_END = ["thread.message.completed", "thread.run.step.completed", "thread.run.completed"]


@pytest.mark.anyio
async def test_threads_and_messages(beta: httpx.AsyncClient) -> None:
    created = await beta.post("/v1/threads", json={"metadata": {"user": "u1"}, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]})
    thread = created.json()
    assert thread["id"].startswith("thread_") and thread["object"] == "thread" and isinstance(thread["created_at"], int)
    assert thread["metadata"] == {"user": "u1"} and thread["tool_resources"] == {}
    assert (await beta.get(f"/v1/threads/{thread['id']}")).json() == thread

    message = (await beta.post(f"/v1/threads/{thread['id']}/messages", json={"role": "user", "content": "c"})).json()
    assert message["id"].startswith("msg_") and message["object"] == "thread.message" and message["role"] == "user"
    assert message["content"] == [{"type": "text", "text": {"value": "c", "annotations": []}}]
    assert message["thread_id"] == thread["id"] and message["run_id"] is None and message["status"] == "completed"
    check_event("thread.message.completed", message)

    url = f"/v1/threads/{thread['id']}/messages"
    newest = (await beta.get(url)).json()
    assert [m["content"][0]["text"]["value"] for m in newest["data"]] == ["c", "b", "a"] and newest["has_more"] is False
    page = (await beta.get(url, params={"order": "asc", "limit": 2})).json()
    assert [m["content"][0]["text"]["value"] for m in page["data"]] == ["a", "b"] and page["has_more"] is True
    assert (await beta.get(f"{url}/{message['id']}")).json() == message

    for missing in ("/v1/threads/thread_nope", "/v1/threads/thread_nope/messages", "/v1/threads/thread_nope/runs"):
        assert error(await beta.get(missing), 404) == {"message": "No thread found with id 'thread_nope'.",
                                                         "type": "invalid_request_error", "param": None, "code": None}
    assert error(await beta.post("/v1/threads/thread_nope/runs", json={"assistant_id": ASST}), 404)["message"] == \
        "No thread found with id 'thread_nope'."
    bad = error(await beta.post(url, json={"role": "system", "content": "x"}), 400)
    assert bad["param"] == "role"
    assert error(await beta.post(url, json={"role": "user"}), 400)["code"] == "missing_required_parameter"

    no_beta = await beta.get(f"/v1/threads/{thread['id']}", headers={"OpenAI-Beta": ""})
    assert error(no_beta, 400)["code"] == "invalid_beta"
    no_key = await beta.post("/v1/threads", headers={"Authorization": ""})
    assert error(no_key, 401)["type"] == "invalid_request_error"
    log = (await beta.get("/_fake/requests")).json()
    assert log[0]["path"] == "/v1/threads" and log[0]["body"]["metadata"] == {"user": "u1"}
    assert log[0]["headers"]["openai-beta"] == "assistants=v2" and "authorization" not in log[0]["headers"]


@pytest.mark.anyio
async def test_text_run_stream_shapes(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    text = "hello  there\nline two \U0001f600 \u2028 \"quoted\""
    events = await run(beta, thread, text, metadata={"turn": "t1"}, instructions="Be brief.", model="gpt-test")
    assert names(events)[: len(TEXT_RUN)] == TEXT_RUN and names(events)[-3:] == TEXT_END
    assert set(names(events)[len(TEXT_RUN) : -3]) == {"thread.message.delta"}

    created = events[0][1]
    assert created["id"].startswith("run_") and created["status"] == "queued" and created["thread_id"] == thread
    assert created["assistant_id"] == ASST and created["metadata"] == {"turn": "t1"} and created["model"] == "gpt-test"
    assert created["instructions"] == "Be brief." and created["required_action"] is None and created["usage"] is None
    assert events[2][1]["status"] == "in_progress" and isinstance(events[2][1]["started_at"], int)

    step = events[3][1]
    message_id = step["step_details"]["message_creation"]["message_id"]
    assert step["id"].startswith("step_") and step["type"] == "message_creation" and step["status"] == "in_progress"
    assert step["step_details"]["type"] == "message_creation" and step["run_id"] == created["id"]
    message = events[5][1]
    assert message["id"] == message_id and message["status"] == "in_progress" and message["content"] == []
    assert message["role"] == "assistant" and message["run_id"] == created["id"] and message["assistant_id"] == ASST

    deltas = [d for n, d in events if n == "thread.message.delta"]
    assert len(deltas) > 3 and all(d["id"] == message_id for d in deltas)
    assert deltas[0]["delta"] == {"content": [{"index": 0, "type": "text", "text": {"value": "You", "annotations": []}}]}
    assert text_of(events) == f"You said: {text}"

    done = last(events, "thread.message.completed")
    assert done["status"] == "completed" and isinstance(done["completed_at"], int)
    assert done["content"] == [{"type": "text", "text": {"value": f"You said: {text}", "annotations": []}}]
    step_done = last(events, "thread.run.step.completed")
    assert step_done["id"] == step["id"] and step_done["status"] == "completed" and step_done["usage"]["total_tokens"] > 0
    completed = events[-1][1]
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert isinstance(completed["completed_at"], int) and completed["expires_at"] is None
    assert completed["usage"]["total_tokens"] == completed["usage"]["prompt_tokens"] + completed["usage"]["completion_tokens"]

    base = f"/v1/threads/{thread}/runs"
    assert (await beta.get(f"{base}/{created['id']}")).json() == completed
    assert error(await beta.get(f"{base}/run_nope"), 404)["message"] == "No run found with id 'run_nope'."
    steps = (await beta.get(f"{base}/{created['id']}/steps")).json()
    assert steps["object"] == "list" and steps["data"] == [step_done]
    messages = (await beta.get(f"/v1/threads/{thread}/messages")).json()["data"]
    assert [(m["role"], m["content"][0]["text"]["value"]) for m in messages] == [
        ("assistant", f"You said: {text}"), ("user", text)]
    assert messages[0] == done

    second = await run(beta, thread, "again")
    listed = (await beta.get(base, params={"limit": 1})).json()
    assert [r["id"] for r in listed["data"]] == [second[0][1]["id"]] and listed["has_more"] is True
    state = (await beta.get(f"/_fake/threads/{thread}")).json()
    assert [r["status"] for r in state["runs"]] == ["completed", "completed"] and state["active_run"] is None
    assert len(state["messages"]) == 4 and state["thread"]["id"] == thread
    assert (await beta.get("/_fake/threads/thread_nope")).status_code == 404

    non_streaming = await beta.post(base, json={"assistant_id": ASST, "additional_messages": [{"role": "user", "content": "x"}]})
    assert non_streaming.status_code == 200 and non_streaming.json()["status"] == "queued"
    check_event("thread.run.created", non_streaming.json())
    polled = (await beta.get(f"{base}/{non_streaming.json()['id']}")).json()
    assert polled["status"] == "completed"


@pytest.mark.anyio
async def test_run_validation(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    url = f"/v1/threads/{thread}/runs"
    assert error(await beta.post(url, json={"stream": True}), 400) == {
        "message": "Missing required parameter: 'assistant_id'.", "type": "invalid_request_error",
        "param": "assistant_id", "code": "missing_required_parameter"}
    assert error(await beta.post(url, json={"assistant_id": "gpt-4o"}), 404)["message"] == "No assistant found with id 'gpt-4o'."
    bad = await beta.post(url, json={"assistant_id": ASST, "additional_messages": [{"role": "user"}]})
    assert error(bad, 400)["param"] == "additional_messages[0].content"
    assert error(await start_run(beta, thread, "hosted:web_search"), 400)["message"].startswith("fake_openai: bad directive")
    assert error(await start_run(beta, thread, "fault:nonsense"), 400)["message"].startswith("fake_openai: bad directive")
    state = (await beta.get(f"/_fake/threads/{thread}")).json()
    assert state["runs"] == [] and state["messages"] == []  # refused runs leave nothing behind


@pytest.mark.anyio
async def test_function_calls_then_tool_outputs(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    events = await run(beta, thread, 'tool:get_weather {"city": "Paris"}\ntool:get_time\nignored')
    assert names(events)[:5] == TEXT_RUN[:5] and names(events)[-1] == "thread.run.requires_action"
    assert set(names(events)[5:-1]) == {"thread.run.step.delta"}
    step = events[3][1]
    assert step["type"] == "tool_calls" and step["step_details"] == {"type": "tool_calls", "tool_calls": []}

    calls: dict[int, dict[str, Any]] = {}
    for name, data in events:
        if name == "thread.run.step.delta":
            assert data["id"] == step["id"] and data["delta"]["step_details"]["type"] == "tool_calls"
            for call in data["delta"]["step_details"]["tool_calls"]:
                assert call["type"] == "function"
                if "id" in call:
                    assert call["function"] == {"name": call["function"]["name"], "arguments": "", "output": None}
                    calls[call["index"]] = {"id": call["id"], "name": call["function"]["name"], "arguments": ""}
                else:
                    calls[call["index"]]["arguments"] += call["function"]["arguments"]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    assert all(c["id"].startswith("call_") for c in calls.values())

    waiting = events[-1][1]
    assert waiting["status"] == "requires_action"
    assert waiting["required_action"] == {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls.values()]}}
    run_id, ids = waiting["id"], [c["id"] for c in calls.values()]
    assert (await beta.get(f"/v1/threads/{thread}/runs/{run_id}")).json()["status"] == "requires_action"

    # the run is active: the thread takes neither a message nor another run
    blocked = await beta.post(f"/v1/threads/{thread}/messages", json={"role": "user", "content": "hi"})
    assert error(blocked, 400) == {"message": f"Can't add messages to {thread} while a run {run_id} is active.",
                                   "type": "invalid_request_error", "param": None, "code": None}
    assert error(await start_run(beta, thread, "hi"), 400)["message"] == \
        f"Thread {thread} already has an active run {run_id}."

    for wrong in ([(ids[0], "one")], [(ids[0], "one"), ("call_other", "two")], [(ids[0], "a"), (ids[0], "b")]):
        refused = error(await submit(beta, thread, run_id, wrong), 400)
        assert refused["message"] == f"Expected tool outputs for call_ids {ids}, got {[c for c, _ in wrong]}"
    not_text = await beta.post(f"/v1/threads/{thread}/runs/{run_id}/submit_tool_outputs",
                               json={"tool_outputs": [{"tool_call_id": ids[0], "output": 1}], "stream": True})
    assert error(not_text, 400)["param"] == "tool_outputs[0].output"

    # outputs in any order; the reply lists them as given
    resumed = run_events(await submit(beta, thread, run_id, [(ids[1], "noon"), (ids[0], "sunny")]))
    assert names(resumed) == ["thread.run.queued", "thread.run.in_progress", "thread.run.step.completed",
                              *TEXT_RUN[3:], *["thread.message.delta"] * (len(resumed) - 10), *TEXT_END]
    assert resumed[0][1]["required_action"] is None and resumed[0][1]["id"] == run_id
    tool_step = resumed[2][1]
    assert tool_step["id"] == step["id"] and tool_step["status"] == "completed"
    assert [(c["id"], c["function"]) for c in tool_step["step_details"]["tool_calls"]] == [
        (ids[0], {"name": "get_weather", "arguments": '{"city": "Paris"}', "output": "sunny"}),
        (ids[1], {"name": "get_time", "arguments": "{}", "output": "noon"})]
    assert text_of(resumed) == "Tool results: noon | sunny" and resumed[-1][1]["status"] == "completed"

    again = await submit(beta, thread, run_id, [(ids[0], "x"), (ids[1], "y")])
    assert error(again, 400)["message"] == 'Runs in status "completed" do not accept tool outputs.'
    steps = (await beta.get(f"/v1/threads/{thread}/runs/{run_id}/steps", params={"order": "asc"})).json()["data"]
    assert [s["type"] for s in steps] == ["tool_calls", "message_creation"]
    assert (await beta.post(f"/v1/threads/{thread}/messages", json={"role": "user", "content": "free"})).status_code == 200


@pytest.mark.anyio
async def test_cancel(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    waiting = (await run(beta, thread, "tool:lookup"))[-1][1]
    url = f"/v1/threads/{thread}/runs/{waiting['id']}"
    cancelling = await beta.post(f"{url}/cancel")
    assert cancelling.status_code == 200 and cancelling.json()["status"] == "cancelling"
    check_event("thread.run.cancelling", cancelling.json())
    assert (await beta.get(url)).json()["status"] == "cancelling"
    assert error(await start_run(beta, thread, "hi"), 400)["message"].endswith(f"already has an active run {waiting['id']}.")
    await anyio.sleep(0.15)  # cancel_delay=0.1
    cancelled = (await beta.get(url)).json()
    assert cancelled["status"] == "cancelled" and isinstance(cancelled["cancelled_at"], int)
    assert cancelled["required_action"] is None
    step = (await beta.get(f"{url}/steps")).json()["data"][0]
    assert step["status"] == "cancelled" and isinstance(step["cancelled_at"], int)
    assert error(await beta.post(f"{url}/cancel"), 400)["message"] == "Cannot cancel run with status 'cancelled'."
    assert error(await submit(beta, thread, waiting["id"], []), 400)["message"] == \
        'Runs in status "cancelled" do not accept tool outputs.'

    done = (await run(beta, thread, "hi"))[-1][1]
    terminal = await beta.post(f"/v1/threads/{thread}/runs/{done['id']}/cancel")
    assert error(terminal, 400)["message"] == "Cannot cancel run with status 'completed'."

    # a cancel during a stream: what was open stops, the stream ends with thread.run.cancelled
    results: list[httpx.Response] = []

    async def slow() -> None:
        results.append(await start_run(beta, thread, "fault:slow 0.05 20"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow)
        await anyio.sleep(0.25)
        runs = (await beta.get(f"/v1/threads/{thread}/runs")).json()["data"]
        assert runs[0]["status"] == "in_progress"
        assert (await beta.post(f"/v1/threads/{thread}/runs/{runs[0]['id']}/cancel")).json()["status"] == "cancelling"
    events = run_events(results[0])
    assert names(events)[-4:] == ["thread.run.cancelling", "thread.message.incomplete", "thread.run.step.cancelled",
                                  "thread.run.cancelled"]
    assert 0 < len(text_of(events)) < len(" ".join(f"word{n}" for n in range(20)))
    assert last(events, "thread.message.incomplete")["incomplete_details"] == {"reason": "run_cancelled"}
    assert events[-1][1]["status"] == "cancelled"


@pytest.mark.anyio
async def test_run_fault_status(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    for _ in range(2):
        failed = await start_run(beta, thread, "fault:status 503 2 x2")
        assert error(failed, 503)["type"] == "server_error" and failed.headers["retry-after"] == "2"
    events = await run(beta, thread, "fault:status 503 2 x2")
    assert text_of(events) == "recovered" and events[-1][1]["status"] == "completed"
    state = (await beta.get(f"/_fake/threads/{thread}")).json()
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"] and len(state["runs"]) == 1

    await beta.post(f"/v1/threads/{thread}/messages", json={"role": "user", "content": "fault:status 429"})
    for _ in range(2):
        always = await beta.post(f"/v1/threads/{thread}/runs", json={"assistant_id": ASST, "stream": True})
        assert error(always, 429)["code"] == "rate_limit_exceeded" and "retry-after" not in always.headers


@pytest.mark.anyio
async def test_run_fault_endings(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    failed = await run(beta, thread, "fault:failed")
    assert names(failed) == TEXT_RUN[:3] + ["thread.run.failed"]
    assert failed[-1][1]["status"] == "failed" and isinstance(failed[-1][1]["failed_at"], int)
    assert failed[-1][1]["last_error"] == {"code": "server_error", "message": "The model failed."}

    expired = await run(beta, thread, "fault:expired")
    assert names(expired) == TEXT_RUN[:3] + ["thread.run.expired"] and expired[-1][1]["status"] == "expired"

    incomplete = await run(beta, thread, "fault:incomplete a b c d e f")
    assert names(incomplete)[-3:] == ["thread.message.incomplete", "thread.run.step.completed", "thread.run.incomplete"]
    message = last(incomplete, "thread.message.incomplete")
    assert message["status"] == "incomplete" and message["content"][0]["text"]["value"] == text_of(incomplete)
    assert 0 < len(text_of(incomplete)) < len("You said: fault:incomplete a b c d e f")
    ended = incomplete[-1][1]
    assert ended["status"] == "incomplete" and ended["incomplete_details"] == {"reason": "max_completion_tokens"}

    start = time.monotonic()
    slow = await run(beta, thread, "fault:slow 0.05 3")
    assert time.monotonic() - start >= 0.15
    assert [d["delta"]["content"][0]["text"]["value"] for n, d in slow if n == "thread.message.delta"] == \
        ["word0", " word1", " word2"]
    assert last(slow, "thread.message.completed")["content"][0]["text"]["value"] == "word0 word1 word2"

    start = time.monotonic()
    await run(beta, thread, "fault:stall 0.1")
    assert time.monotonic() - start >= 0.1


@pytest.mark.anyio
async def test_run_fault_abandoned(beta: httpx.AsyncClient) -> None:
    """fault:cut eof ends the stream like fault:cut (no run end, no `done`), minus the hang-up."""
    thread = await new_thread(beta)
    response = await start_run(beta, thread, "fault:cut eof please")
    raw = parse_sse(response.text)
    assert raw[-1][0] == "thread.message.delta" and "done" not in [n for n, _ in raw]
    run_id = orjson.loads(raw[0][1])["id"]
    state = (await beta.get(f"/_fake/threads/{thread}")).json()
    assert state["active_run"] == run_id and state["runs"][0]["status"] == "in_progress"
    assert state["messages"][-1]["status"] == "in_progress"  # partly written
    blocked = await beta.post(f"/v1/threads/{thread}/messages", json={"role": "user", "content": "hi"})
    assert error(blocked, 400)["message"] == f"Can't add messages to {thread} while a run {run_id} is active."

    await anyio.sleep(0.35)  # abandoned_run_seconds=0.3
    state = (await beta.get(f"/_fake/threads/{thread}")).json()
    assert state["active_run"] is None and state["runs"][0]["status"] == "expired"
    assert state["steps"][run_id][0]["status"] == "expired"
    assert state["messages"][-1]["incomplete_details"] == {"reason": "run_expired"}
    assert text_of(await run(beta, thread, "after")) == "You said: after"


@pytest.mark.anyio
async def test_run_fault_submit_status(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    waiting = (await run(beta, thread, "fault:submit-status 502 x2"))[-1][1]
    call = waiting["required_action"]["submit_tool_outputs"]["tool_calls"][0]
    assert call["function"] == {"name": "calculator", "arguments": '{"a":1,"b":2,"op":"add"}'}
    for _ in range(2):
        assert error(await submit(beta, thread, waiting["id"], [(call["id"], "3")]), 502)["type"] == "server_error"
        assert (await beta.get(f"/v1/threads/{thread}/runs/{waiting['id']}")).json()["status"] == "requires_action"
    resumed = run_events(await submit(beta, thread, waiting["id"], [(call["id"], "3")]))
    assert text_of(resumed) == "Tool results: 3" and resumed[-1][1]["status"] == "completed"

    waiting = (await run(beta, thread, "fault:submit-status 500"))[-1][1]
    call = waiting["required_action"]["submit_tool_outputs"]["tool_calls"][0]
    for _ in range(3):
        assert (await submit(beta, thread, waiting["id"], [(call["id"], "3")])).status_code == 500


@pytest.mark.anyio
async def test_run_fault_active(beta: httpx.AsyncClient) -> None:
    thread = await new_thread(beta)
    events = await run(beta, thread, "fault:active 5", metadata={"turn": "1"})
    assert text_of(events) == "You said: fault:active 5" and events[-1][1]["status"] == "completed"
    runs = (await beta.get(f"/v1/threads/{thread}/runs")).json()["data"]
    hidden = runs[0]
    assert hidden["id"].startswith("run_hidden_") and hidden["status"] == "in_progress" and hidden["metadata"] == {}
    assert runs[1]["id"] == events[0][1]["id"] and runs[1]["metadata"] == {"turn": "1"}
    assert error(await start_run(beta, thread, "next"), 400)["message"] == \
        f"Thread {thread} already has an active run {hidden['id']}."
    assert (await beta.post(f"/v1/threads/{thread}/runs/{hidden['id']}/cancel")).json()["status"] == "cancelling"
    await anyio.sleep(0.15)
    assert text_of(await run(beta, thread, "next")) == "You said: next"

    await run(beta, thread, "fault:active 0.2")  # unless cancelled, it ends on its own
    assert (await start_run(beta, thread, "too soon")).status_code == 400
    await anyio.sleep(0.25)
    assert (await beta.get(f"/v1/threads/{thread}/runs")).json()["data"][0]["status"] == "completed"
    assert text_of(await run(beta, thread, "later")) == "You said: later"


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["code_interpreter", "file_search"])
async def test_hosted_tool_steps(beta: httpx.AsyncClient, kind: str) -> None:
    thread = await new_thread(beta)
    response = await start_run(beta, thread, f"hosted:{kind}")
    events = run_events(response)
    tool_step = events[3][1]
    assert tool_step["type"] == "tool_calls" and names(events)[3:5] == TEXT_RUN[3:5]
    deltas = [d["delta"]["step_details"]["tool_calls"][0] for n, d in events if n == "thread.run.step.delta"]
    assert all(d["id"] == tool_step["id"] for n, d in events if n == "thread.run.step.delta")
    assert deltas[0]["index"] == 0 and deltas[0]["type"] == kind and deltas[0]["id"].startswith("call_")
    completed = next(d for n, d in events if n == "thread.run.step.completed" and d["id"] == tool_step["id"])
    assert completed["status"] == "completed" and completed["type"] == "tool_calls"
    [done] = completed["step_details"]["tool_calls"]
    assert done["id"] == deltas[0]["id"] and done["type"] == kind
    if kind == "code_interpreter":
        assert "".join(d["code_interpreter"].get("input", "") for d in deltas) == "print(1 + 2)"
        assert deltas[-1]["code_interpreter"]["outputs"] == [{"index": 0, "type": "logs", "logs": "3\n"}]
        assert done["code_interpreter"] == {"input": "print(1 + 2)", "outputs": [{"type": "logs", "logs": "3\n"}]}
    else:
        assert deltas == [{"index": 0, "id": done["id"], "type": "file_search", "file_search": {}}]
        assert done["file_search"]["results"][0]["file_name"] == "notes.txt"
    message_step = names(events).index("thread.run.step.completed") + 1
    assert names(events)[message_step : message_step + 4] == TEXT_RUN[3:]
    assert text_of(events) == "hosted tool done" and events[-1][1]["status"] == "completed"
    steps = (await beta.get(f"/v1/threads/{thread}/runs/{events[0][1]['id']}/steps", params={"order": "asc"})).json()
    assert [(s["type"], s["status"]) for s in steps["data"]] == [("tool_calls", "completed"), ("message_creation", "completed")]


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_openai_sdk_reads_the_runs() -> None:
    """The SDK's own stream helpers assemble the fake's events (text, function calls, hosted tools)."""
    import openai

    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as http:
        client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://fake/v1", http_client=http, max_retries=0)
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi there"}])
        async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=ASST) as stream:
            await stream.until_done()
            final = await stream.get_final_run()
            [message] = await stream.get_final_messages()
        assert final.status == "completed" and message.content[0].text.value == "You said: hi there"  # type: ignore[union-attr]

        await client.beta.threads.messages.create(thread.id, role="user", content='tool:add {"a": 1}\ntool:now')
        async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=ASST) as stream:
            await stream.until_done()
            waiting = await stream.get_final_run()
            [step] = await stream.get_final_run_steps()
        assert waiting.status == "requires_action" and waiting.required_action is not None
        calls = waiting.required_action.submit_tool_outputs.tool_calls
        assert [(c.function.name, c.function.arguments) for c in calls] == [("add", '{"a": 1}'), ("now", "{}")]
        assert [c.function.arguments for c in step.step_details.tool_calls] == ['{"a": 1}', "{}"]  # type: ignore[union-attr]
        outputs = [{"tool_call_id": c.id, "output": out} for c, out in zip(calls, ["2", "now"])]
        async with client.beta.threads.runs.submit_tool_outputs_stream(
                thread_id=thread.id, run_id=waiting.id, tool_outputs=outputs) as stream:
            await stream.until_done()
            final = await stream.get_final_run()
            [message] = await stream.get_final_messages()
        assert final.status == "completed" and message.content[0].text.value == "Tool results: 2 | now"  # type: ignore[union-attr]

        await client.beta.threads.messages.create(thread.id, role="user", content="hosted:code_interpreter")
        async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=ASST) as stream:
            await stream.until_done()
            steps = await stream.get_final_run_steps()
        [tool] = steps[0].step_details.tool_calls  # type: ignore[union-attr]
        assert tool.code_interpreter.input == "print(1 + 2)"  # type: ignore[union-attr]

        busy = (await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=ASST,
                                                      additional_messages=[{"role": "user", "content": "tool:x"}]))
        with pytest.raises(openai.BadRequestError, match="already has an active run"):
            await client.beta.threads.runs.create(thread_id=thread.id, assistant_id=ASST)
        cancelling = await client.beta.threads.runs.cancel(run_id=busy.id, thread_id=thread.id)
        assert cancelling.status == "cancelling"


@pytest.mark.anyio
async def test_run_hang_ups(server: str) -> None:
    """Over a real socket: fault:cut drops the connection and leaves the run blocking the thread;
    a client that hangs up by itself does not stop its run, which goes on to its end."""
    async with httpx.AsyncClient(base_url=server, headers=BETA) as client:
        thread = await new_thread(client)
        body = {"assistant_id": ASST, "stream": True, "additional_messages": [{"role": "user", "content": "fault:cut now please"}]}
        seen = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", f"/v1/threads/{thread}/runs", json=body, headers={"X-Fake-Delta-Delay": "0"}) as response:
                async for line in response.aiter_lines():
                    seen.append(line)
        assert "event: thread.message.delta" in seen and "event: done" not in seen
        run_id = orjson.loads(seen[1][len("data: "):])["id"]
        assert (await client.get(f"/v1/threads/{thread}/runs/{run_id}")).json()["status"] == "in_progress"
        blocked = await start_run(client, thread, "hi")
        assert error(blocked, 400)["message"] == f"Thread {thread} already has an active run {run_id}."
        assert (await client.post(f"/v1/threads/{thread}/runs/{run_id}/cancel")).json()["status"] == "cancelling"
        await anyio.sleep(0.15)  # FAKE_CANCEL_DELAY=0.1
        assert (await client.get(f"/v1/threads/{thread}/runs/{run_id}")).json()["status"] == "cancelled"

        with pytest.raises(httpx.RemoteProtocolError):
            async with client.stream("POST", f"/v1/threads/{thread}/runs", json=body, headers={"X-Fake-Delta-Delay": "0"}) as response:
                async for _ in response.aiter_lines():
                    pass
        await anyio.sleep(1.1)  # FAKE_ABANDONED_RUN_SECONDS=1
        assert (await client.get(f"/v1/threads/{thread}/runs")).json()["data"][0]["status"] == "expired"

        body["additional_messages"] = [{"role": "user", "content": "fault:slow 0.1 6"}]
        async with client.stream("POST", f"/v1/threads/{thread}/runs", json=body) as response:
            async for line in response.aiter_lines():
                if line == "event: thread.message.delta":
                    break  # hang up mid-message
        run = (await client.get(f"/v1/threads/{thread}/runs", params={"limit": 1})).json()["data"][0]
        assert run["status"] == "in_progress"
        for _ in range(30):
            await anyio.sleep(0.1)
            run = (await client.get(f"/v1/threads/{thread}/runs/{run['id']}")).json()
            if run["status"] != "in_progress":
                break
        assert run["status"] == "completed"
        newest = (await client.get(f"/v1/threads/{thread}/messages", params={"limit": 1})).json()["data"][0]
        assert newest["content"][0]["text"]["value"] == "word0 word1 word2 word3 word4 word5"

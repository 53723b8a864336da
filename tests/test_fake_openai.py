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
    env = {**os.environ, "FAKE_OPENAI_DELTA_DELAY": "0.1"}
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

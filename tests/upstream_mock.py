"""Builders for respx-mocked OpenAI answers in the real wire format.

The service's OpenAI client sends through `httpx.AsyncClient`, which respx patches; the
`upstream` fixture asserts every request hit a mocked route (`assert_all_mocked`), so an
unmocked call fails the test instead of leaving the machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import respx

BASE_URL = "http://upstream.invalid/v1"
_ids = itertools.count(1)


def sse(events: Iterable[dict[str, Any]]) -> bytes:
    """The SSE body OpenAI sends for these events."""
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


def sse_response(events: Iterable[dict[str, Any]]) -> httpx.Response:
    return httpx.Response(200, content=sse(events), headers={"content-type": "text/event-stream"})


def fixture_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def fixture_responses(path: Path) -> list[bytes]:
    """A recorded stream's SSE bodies, one per response (a new one at each response.created)."""
    bodies: list[list[bytes]] = []
    for line in fixture_lines(path):
        if '"type":"response.created"' in line or not bodies:
            bodies.append([])
        kind = line.split('"type":"', 1)[1].split('"', 1)[0] if '"type":"' in line else "message"
        bodies[-1].append(b"event: " + kind.encode() + b"\ndata: " + line.encode() + b"\n\n")
    return [b"".join(body) for body in bodies]


def _response(status: str, output: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": f"resp_{next(_ids)}", "object": "response", "status": status, "output": output, **extra}


def text_events(text: str, *, chunks: int = 3) -> list[dict[str, Any]]:
    """A complete streamed response that answers `text`, split into deltas."""
    item_id = f"msg_{next(_ids)}"
    size = max(1, -(-len(text) // chunks))
    deltas = [text[i : i + size] for i in range(0, len(text), size)]
    item = {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    response = _response("in_progress", [])
    seq = itertools.count()
    events: list[dict[str, Any]] = [
        {"type": "response.created", "sequence_number": next(seq), "response": response},
        {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": 0,
         "item": {**item, "status": "in_progress", "content": []}},
    ]
    events += [
        {"type": "response.output_text.delta", "sequence_number": next(seq), "item_id": item_id,
         "output_index": 0, "content_index": 0, "delta": d, "logprobs": []}
        for d in deltas
    ]
    events += [
        {"type": "response.output_text.done", "sequence_number": next(seq), "item_id": item_id,
         "output_index": 0, "content_index": 0, "text": text},
        {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": 0, "item": item},
        {"type": "response.completed", "sequence_number": next(seq),
         "response": {**response, "status": "completed", "output": [item]}},
    ]
    return events


def call_events(*calls: tuple[str, str]) -> list[dict[str, Any]]:
    """A complete streamed response making these (name, arguments) function calls."""
    seq = itertools.count()
    response = _response("in_progress", [])
    events: list[dict[str, Any]] = [{"type": "response.created", "sequence_number": next(seq), "response": response}]
    items = []
    for index, (name, arguments) in enumerate(calls):
        n = next(_ids)
        item = {"id": f"fc_{n}", "type": "function_call", "status": "completed", "arguments": arguments,
                "call_id": f"call_{n}", "name": name}
        items.append(item)
        events += [
            {"type": "response.output_item.added", "sequence_number": next(seq), "output_index": index,
             "item": {**item, "status": "in_progress", "arguments": ""}},
            {"type": "response.function_call_arguments.delta", "sequence_number": next(seq),
             "item_id": item["id"], "output_index": index, "delta": arguments},
            {"type": "response.function_call_arguments.done", "sequence_number": next(seq),
             "item_id": item["id"], "output_index": index, "arguments": arguments},
            {"type": "response.output_item.done", "sequence_number": next(seq), "output_index": index, "item": item},
        ]
    events.append({"type": "response.completed", "sequence_number": next(seq),
                   "response": {**response, "status": "completed", "output": items}})
    return events


def openai_error(status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return httpx.Response(status, json=body, headers=headers)


def request_body(call: Any) -> dict[str, Any]:
    return orjson.loads(call.request.content)


@pytest.fixture
def upstream() -> Iterator[respx.MockRouter]:
    """A respx router standing in for OpenAI; any request it has no route for fails the test."""
    with respx.mock(base_url=BASE_URL, using="httpx", assert_all_mocked=True, assert_all_called=False) as router:
        router.post("/conversations").respond(
            200, json={"id": "conv_test", "object": "conversation", "created_at": 1, "metadata": {}}
        )
        yield router


# --- the Assistants API -----------------------------------------------------------------------

ASSISTANT_ID = "asst_test"
THREAD = "thread_test"


def assistants_sse(events: Iterable[tuple[str, dict[str, Any]]], *, done: bool = True) -> httpx.Response:
    """A streamed Assistants answer: named events whose data is the object, then `done`."""
    body = b"".join(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n" for name, obj in events)
    if done:
        body += b"event: done\ndata: [DONE]\n\n"
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})


def run_object(run_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": run_id, "object": "thread.run", "status": status, "thread_id": THREAD,
            "assistant_id": ASSISTANT_ID, "required_action": None, "last_error": None,
            "incomplete_details": None, "metadata": {}, "tools": [], **extra}


def message_object(message_id: str, text: str, run_id: str) -> dict[str, Any]:
    return {"id": message_id, "object": "thread.message", "thread_id": THREAD, "role": "assistant", "run_id": run_id,
            "status": "completed", "content": [{"type": "text", "text": {"value": text, "annotations": []}}]}


def assistants_text(run_id: str, text: str, *, created: bool = True, chunks: int = 3) -> list[tuple[str, dict[str, Any]]]:
    """A run (or a run's continuation) that answers `text` and completes."""
    message_id = f"msg_{next(_ids)}"
    size = max(1, -(-len(text) // chunks))
    events = [("thread.run.created", run_object(run_id, "queued"))] if created else []
    events += [("thread.run.in_progress", run_object(run_id, "in_progress")),
               ("thread.message.created", {**message_object(message_id, "", run_id), "status": "in_progress", "content": []})]
    events += [
        ("thread.message.delta", {"id": message_id, "object": "thread.message.delta",
                                  "delta": {"content": [{"index": 0, "type": "text", "text": {"value": text[i:i + size], "annotations": []}}]}})
        for i in range(0, len(text), size)
    ]
    events += [("thread.message.completed", message_object(message_id, text, run_id)),
               ("thread.run.completed", run_object(run_id, "completed"))]
    return events


def assistants_calls(run_id: str, *calls: tuple[str, str, str]) -> list[tuple[str, dict[str, Any]]]:
    """A run that stops at requires_action for these (call id, name, arguments) calls."""
    tool_calls = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls]
    required = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": tool_calls}}
    return [("thread.run.created", run_object(run_id, "queued")),
            ("thread.run.in_progress", run_object(run_id, "in_progress")),
            ("thread.run.requires_action", run_object(run_id, "requires_action", required_action=required))]


@pytest.fixture
def assistants_upstream() -> Iterator[respx.MockRouter]:
    """A respx router standing in for an Assistants API server."""
    with respx.mock(base_url=BASE_URL, using="httpx", assert_all_mocked=True, assert_all_called=False) as router:
        router.post("/threads").respond(200, json={"id": THREAD, "object": "thread", "created_at": 1, "metadata": {}})
        router.get(f"/assistants/{ASSISTANT_ID}").respond(
            200, json={"id": ASSISTANT_ID, "object": "assistant", "model": "gpt-4o", "tools": [{"type": "code_interpreter"}]}
        )
        yield router

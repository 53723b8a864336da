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
    with respx.mock(base_url=BASE_URL, assert_all_mocked=True, assert_all_called=False) as router:
        router.post("/conversations").respond(
            200, json={"id": "conv_test", "object": "conversation", "created_at": 1, "metadata": {}}
        )
        yield router

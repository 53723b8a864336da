"""Tests of MessageParser and ToolTracker: upstream Responses events in, service events out."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from assistant.events import MESSAGE_COMPLETED, MESSAGE_DELTA, STEP_COMPLETED, STEP_CREATED, Event
from assistant.message_parser import MessageData, MessageParser, StepData, ToolTracker
from assistant.tool_executor import ToolCall, ToolResult
from tests.conftest import fixtures_dir

QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
RATE_LIMIT_MESSAGE = (
    "Request too large for gpt-4o-mini in organization on tokens per min (TPM): Limit 30000, Requested 35364."
)


@dataclass
class Round:
    """One upstream response fed through its own parser."""

    parser: MessageParser
    upstream: list[dict[str, Any]]
    produced: list[Event] = field(default_factory=list)  # the non-None results of parse

    @property
    def deltas(self) -> list[str]:
        return [e.data["delta"]["content"] for e in self.produced if e.name == MESSAGE_DELTA]


def parse_one(parser: MessageParser, event: dict[str, Any]) -> Event | None:
    """The Responses parser maps one upstream event to at most one service event."""
    produced = parser.parse(event)
    assert isinstance(produced, tuple) and len(produced) <= 1
    return produced[0] if produced else None


def load_fixture(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(fixtures_dir(), name).read_text().splitlines()]


def run_fixture(name: str, tracker: ToolTracker | None = None) -> tuple[list[Round], ToolTracker]:
    """Split at each response.created; each response gets a fresh parser, the run one tracker."""
    tracker = tracker or ToolTracker()
    rounds: list[Round] = []
    for event in load_fixture(name):
        if event["type"] == "response.created":
            rounds.append(Round(MessageParser(tracker), []))
        assert rounds, "a fixture must start with response.created"
        current = rounds[-1]
        current.upstream.append(event)
        result = parse_one(current.parser, event)
        if result is not None:
            assert isinstance(result, Event)
            current.produced.append(result)
    return rounds, tracker


def feed(parser: MessageParser, *events: dict[str, Any]) -> list[Event | None]:
    return [parse_one(parser, event) for event in events]


# --------------------------------------------------------------------------------------------
# recorded streams


def test_plain_text_reply() -> None:
    rounds, tracker = run_fixture("issue-20047-openai-responses.chunks.txt")
    assert len(rounds) == 1
    (r,) = rounds
    assert r.produced == [
        Event(MESSAGE_DELTA, {"delta": {"content": "OK"}}),
        Event(
            MESSAGE_COMPLETED,
            {"message": {"id": "msg_sanitized_streaming", "author": "assistant", "content": "OK"}},
        ),
    ]
    assert r.parser.messages == [MessageData(id="msg_sanitized_streaming", content="OK")]
    assert r.parser.response_id == "resp_sanitized_streaming"
    assert r.parser.completed is True
    assert r.parser.failure is None
    assert r.parser.ended is True
    assert r.parser.tool_calls == []
    assert tracker.steps == {}


def test_single_function_call() -> None:
    rounds, tracker = run_fixture("issue-19493-gpt-5.1-tool-call.chunks.txt")
    assert len(rounds) == 1
    (r,) = rounds
    # The call appears in output_item.done AND in response.completed's output: collected once.
    assert r.parser.tool_calls == [
        ToolCall(call_id="call_2FQdm3Br7Qb35YUBSkDR7kue", name="get_weather", arguments='{"city":"Beijing"}')
    ]
    assert r.parser.completed is True and r.parser.failure is None
    assert r.parser.messages == []
    assert r.produced == []  # no text; the step is started by whoever runs the tool
    assert tracker.steps == {}


REASONING_CALLS = [
    ("call_AB6AaRZ1FYZB2RwS6A5vbdqn", '{"a":12,"b":7,"op":"add"}'),
    ("call_Q6pW65MUgW9vF59BmItYGos3", '{"a":19,"b":3,"op":"multiply"}'),
    ("call_Zl5vIMnD7dVAjgU6FkhmiCZh", '{"a":57,"b":10,"op":"multiply"}'),
]


def test_reasoning_stream_three_tool_rounds_then_text() -> None:
    rounds, tracker = run_fixture("openai-reasoning-encrypted-content.1.chunks.txt")
    assert len(rounds) == 4
    assert len({r.parser.response_id for r in rounds}) == 4
    assert all(r.parser.response_id and r.parser.response_id.startswith("resp_") for r in rounds)
    for r, (call_id, arguments) in zip(rounds[:3], REASONING_CALLS):
        assert r.parser.tool_calls == [ToolCall(call_id=call_id, name="calculator", arguments=arguments)]
        assert r.parser.completed and r.parser.failure is None
        assert r.parser.messages == []
        assert r.produced == []
    final = rounds[3]
    assert final.parser.tool_calls == []
    assert final.parser.completed and final.parser.failure is None
    assert "".join(final.deltas) == "The final result is **570**."
    assert len(final.deltas) == 8  # one service delta per upstream delta, none merged or lost
    assert final.parser.messages == [
        MessageData(id="msg_01830d662ab3856501693c32183a488190a612c410a0a39823", content="The final result is **570**.")
    ]
    assert final.produced[-1] == Event(MESSAGE_COMPLETED, {"message": final.parser.messages[0].to_dict()})
    assert [e.name for e in final.produced] == [MESSAGE_DELTA] * 8 + [MESSAGE_COMPLETED]
    assert tracker.steps == {}


def test_reasoning_events_produce_no_service_events() -> None:
    rounds, _ = run_fixture("openai-reasoning-encrypted-content.1.chunks.txt")
    first = rounds[0]
    reasoning = [
        e
        for e in first.upstream
        if e["type"].startswith("response.reasoning") or (e.get("item") or {}).get("type") == "reasoning"
    ]
    assert len(reasoning) >= 30  # the fixture really holds reasoning summaries and items
    parser = MessageParser(ToolTracker())
    assert [parse_one(parser, e) for e in reasoning] == [None] * len(reasoning)
    assert parser.tool_calls == [] and parser.messages == [] and not parser.ended


def test_error_event_then_response_failed() -> None:
    rounds, _ = run_fixture("openai-error.1.chunks.txt")
    assert len(rounds) == 1
    (r,) = rounds
    assert r.parser.failure == (QUOTA_MESSAGE, "run_failed", "insufficient_quota")
    assert r.parser.completed is False
    assert r.parser.ended is True
    assert r.produced == []
    assert r.parser.tool_calls == [] and r.parser.messages == []


def test_error_event_ends_the_response_before_response_failed() -> None:
    events = load_fixture("openai-error.1.chunks.txt")
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error", "response.failed"]
    parser = MessageParser(ToolTracker())
    feed(parser, *events[:2])
    assert parser.ended is False
    feed(parser, events[2])
    assert parser.ended is True
    assert parser.failure == (QUOTA_MESSAGE, "run_failed", "insufficient_quota")


def test_response_failed_only() -> None:
    rounds, _ = run_fixture("openai-response-failed-only.1.chunks.txt")
    assert len(rounds) == 1
    (r,) = rounds
    assert r.parser.failure == (RATE_LIMIT_MESSAGE, "run_failed", "rate_limit_exceeded")
    assert r.parser.response_id == "resp_test_failed_001"
    assert r.parser.completed is False and r.parser.ended is True
    assert r.produced == []


# --------------------------------------------------------------------------------------------
# synthetic events


def test_first_failure_wins() -> None:
    parser = MessageParser(ToolTracker())
    feed(
        parser,
        {"type": "error", "error": {"type": "server_error", "code": "server_error", "message": "first"}},
        {"type": "response.failed", "response": {"error": {"code": "other", "message": "second"}}},
        {"type": "response.incomplete", "response": {"incomplete_details": {"reason": "content_filter"}}},
    )
    assert parser.failure == ("first", "run_failed", "server_error")


def test_response_incomplete() -> None:
    parser = MessageParser(ToolTracker())
    result = parse_one(parser, 
        {"type": "response.incomplete", "response": {"incomplete_details": {"reason": "max_output_tokens"}}}
    )
    assert result is None
    assert parser.failure == ("the response was cut short (max_output_tokens)", "run_incomplete", "max_output_tokens")
    assert parser.completed is False and parser.ended is True


def test_response_incomplete_without_reason() -> None:
    parser = MessageParser(ToolTracker())
    parse_one(parser, {"type": "response.incomplete", "response": {"incomplete_details": None}})
    assert parser.failure == ("the response was cut short (unknown)", "run_incomplete", "unknown")


def test_response_failed_without_error_details() -> None:
    parser = MessageParser(ToolTracker())
    parse_one(parser, {"type": "response.failed", "response": {"error": None}})
    assert parser.failure == ("the model failed to respond", "run_failed", None)


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {"type": "error", "error": {"type": "invalid_request_error", "code": None, "message": "bad"}},
            ("bad", "run_failed", "invalid_request_error"),
        ),
        (
            {"type": "error", "code": "server_error", "message": "old style"},
            ("old style", "run_failed", "server_error"),
        ),
        ({"type": "error", "error": {}}, ("the upstream reported an error", "run_failed", None)),
        (  # the SDK's ResponseErrorEvent: top-level fields, code nullable; "error" is the event's own type
            {"type": "error", "code": None, "message": "boom", "param": None, "sequence_number": 7},
            ("boom", "run_failed", None),
        ),
    ],
)
def test_error_event_shapes(event: dict[str, Any], expected: tuple[str, str, str | None]) -> None:
    parser = MessageParser(ToolTracker())
    assert parse_one(parser, event) is None
    assert parser.failure == expected


def test_refusal_deltas_map_to_message_deltas() -> None:
    parser = MessageParser(ToolTracker())
    results = feed(
        parser,
        {"type": "response.refusal.delta", "delta": "I can't"},
        {"type": "response.refusal.delta", "delta": " help."},
        {"type": "response.refusal.done", "refusal": "I can't help."},
        {
            "type": "response.output_item.done",
            "item": {"id": "msg_r", "type": "message", "content": [{"type": "refusal", "refusal": "I can't help."}]},
        },
    )
    assert results == [
        Event(MESSAGE_DELTA, {"delta": {"content": "I can't"}}),
        Event(MESSAGE_DELTA, {"delta": {"content": " help."}}),
        None,
        Event(MESSAGE_COMPLETED, {"message": {"id": "msg_r", "author": "assistant", "content": "I can't help."}}),
    ]


def test_empty_delta_produces_nothing() -> None:
    parser = MessageParser(ToolTracker())
    results = feed(parser, {"type": "response.output_text.delta", "delta": ""}, {"type": "response.output_text.delta"})
    assert results == [None, None]


def test_message_text_joins_output_text_parts_and_skips_others() -> None:
    parser = MessageParser(ToolTracker())
    item = {
        "id": "msg_1",
        "type": "message",
        "content": [
            {"type": "output_text", "text": "Hello, "},
            {"type": "reasoning_text", "text": "HIDDEN"},
            {"type": "output_text", "text": "world"},
            "not a part",
        ],
    }
    parse_one(parser, {"type": "response.output_item.done", "item": item})
    assert parser.messages == [MessageData(id="msg_1", content="Hello, world")]


def function_call(call_id: str, name: str = "calc", arguments: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{call_id}", "call_id": call_id, "name": name, "arguments": arguments}


def test_function_call_only_in_completed_output_is_collected() -> None:
    parser = MessageParser(ToolTracker())
    result = parse_one(parser, 
        {
            "type": "response.completed",
            "response": {
                "output": [
                    {"type": "reasoning", "id": "rs_1"},
                    function_call("call_late", "lookup", '{"q":"x"}'),
                    {"type": "message", "id": "msg_1", "content": []},
                ]
            },
        }
    )
    assert result is None
    assert parser.tool_calls == [ToolCall(call_id="call_late", name="lookup", arguments='{"q":"x"}')]
    assert parser.completed is True


def test_function_call_seen_twice_is_collected_once() -> None:
    parser = MessageParser(ToolTracker())
    feed(
        parser,
        {"type": "response.output_item.added", "item": {**function_call("call_a"), "arguments": ""}},
        {"type": "response.output_item.done", "item": function_call("call_a", arguments='{"a":1}')},
        {"type": "response.output_item.done", "item": function_call("call_a", arguments='{"a":1}')},
        {
            "type": "response.completed",
            "response": {"output": [function_call("call_a", arguments='{"a":1}'), function_call("call_b")]},
        },
    )
    assert parser.tool_calls == [
        ToolCall(call_id="call_a", name="calc", arguments='{"a":1}'),
        ToolCall(call_id="call_b", name="calc", arguments="{}"),
    ]


def test_function_call_without_call_id_is_ignored() -> None:
    parser = MessageParser(ToolTracker())
    parse_one(parser, {"type": "response.output_item.done", "item": {"type": "function_call", "name": "x"}})
    assert parser.tool_calls == []


def test_function_call_added_is_not_a_step() -> None:
    tracker = ToolTracker()
    parser = MessageParser(tracker)
    assert parse_one(parser, {"type": "response.output_item.added", "item": function_call("call_a")}) is None
    assert tracker.steps == {}


def test_hosted_tool_items_become_steps() -> None:
    tracker = ToolTracker()
    parser = MessageParser(tracker)
    before = time.time()
    created = parse_one(parser, 
        {
            "type": "response.output_item.added",
            "item": {"type": "web_search_call", "id": "ws_1", "status": "in_progress"},
        }
    )
    assert created is not None and created.name == STEP_CREATED
    step = created.data["step"]
    assert step["id"] == "ws_1"
    assert step["name"] == "web_search"
    assert step["input"] == ""
    assert step["show_input"] is False
    assert step["end"] is None and step["output"] is None and step["is_error"] is False
    assert before <= step["start"] <= time.time()

    completed = parse_one(parser, 
        {
            "type": "response.output_item.done",
            "item": {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": "search: weather"},
        }
    )
    assert completed is not None and completed.name == STEP_COMPLETED
    done = completed.data["step"]
    assert done["id"] == "ws_1" and done["name"] == "web_search"
    assert done["show_input"] is False
    assert done["output"] == "completed: search: weather"
    assert done["start"] == step["start"]
    assert done["end"] is not None and done["end"] >= done["start"]
    assert done["is_error"] is False
    assert parser.tool_calls == []  # hosted tools run upstream, never here
    assert list(tracker.steps) == ["ws_1"]
    # The created event's data is a snapshot: finishing the step does not rewrite it.
    assert created.data["step"]["end"] is None


@pytest.mark.parametrize("kind", ["file_search_call", "code_interpreter_call", "image_generation_call", "mcp_call"])
def test_other_hosted_tools_are_named_without_call_suffix(kind: str) -> None:
    parser = MessageParser(ToolTracker())
    event = parse_one(parser, {"type": "response.output_item.added", "item": {"type": kind, "id": "x_1"}})
    assert event is not None and event.data["step"]["name"] == kind.removesuffix("_call")


def test_hosted_tool_done_without_added() -> None:
    tracker = ToolTracker()
    parser = MessageParser(tracker)
    event = parse_one(parser, {"type": "response.output_item.done", "item": {"type": "file_search_call", "id": "fs_1"}})
    assert event is not None and event.name == STEP_COMPLETED
    assert event.data["step"]["id"] == "fs_1" and event.data["step"]["end"] is not None
    assert "fs_1" in tracker.steps


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.in_progress", "response": {}},
        {"type": "response.content_part.added", "part": {"type": "output_text", "text": ""}},
        {"type": "response.output_text.done", "text": "OK"},
        {"type": "response.function_call_arguments.delta", "delta": "{"},
        {"type": "response.output_item.added", "item": {"type": "message", "id": "msg_1"}},
        {"type": "response.output_item.done", "item": {"type": "reasoning", "id": "rs_1"}},
        {"type": "something.new"},
        {},
    ],
)
def test_bookkeeping_events_produce_nothing(event: dict[str, Any]) -> None:
    parser = MessageParser(ToolTracker())
    assert parse_one(parser, event) is None
    assert not parser.ended and parser.tool_calls == [] and parser.messages == []


def test_ended_property() -> None:
    parser = MessageParser(ToolTracker())
    assert parser.ended is False
    parse_one(parser, {"type": "response.created", "response": {"id": "resp_1"}})
    parse_one(parser, {"type": "response.output_text.delta", "delta": "x"})
    assert parser.ended is False
    parse_one(parser, {"type": "response.completed", "response": {"output": []}})
    assert parser.ended is True and parser.completed is True and parser.failure is None


# --------------------------------------------------------------------------------------------
# ToolTracker, StepData, MessageData


def test_tool_tracker_start_and_finish_call() -> None:
    tracker = ToolTracker()
    call = ToolCall(call_id="call_1", name="calculator", arguments='{"a":1}')
    created = tracker.start_call(call)
    assert created.name == STEP_CREATED
    assert created.data == {
        "step": {
            "id": "call_1",
            "name": "calculator",
            "type": "tool",
            "start": tracker.steps["call_1"].start,
            "end": None,
            "input": '{"a":1}',
            "output": None,
            "show_input": True,
            "is_error": False,
        }
    }
    finished = tracker.finish_call(ToolResult(tool_call_id="call_1", output="2", is_error=False))
    assert finished.name == STEP_COMPLETED
    step = tracker.steps["call_1"]
    assert step.end is not None and step.end >= step.start
    assert step.output == "2" and step.is_error is False
    assert finished.data == {"step": step.to_dict()}
    assert created.data["step"]["end"] is None and created.data["step"]["output"] is None


def test_tool_tracker_finish_with_error() -> None:
    tracker = ToolTracker()
    tracker.start("call_2", "boom", "{}")
    event = tracker.finish_call(ToolResult(tool_call_id="call_2", output='{"error":"x"}', is_error=True))
    assert event.data["step"]["is_error"] is True
    assert event.data["step"]["output"] == '{"error":"x"}'
    assert tracker.steps["call_2"].is_error is True


def test_tool_tracker_finish_unknown_step() -> None:
    tracker = ToolTracker()
    event = tracker.finish("never_started", None)
    assert event.name == STEP_COMPLETED
    step = event.data["step"]
    assert step["id"] == "never_started" and step["name"] == "unknown" and step["output"] is None
    assert step["end"] is not None and step["end"] >= step["start"]


def test_tool_tracker_keeps_steps_of_the_whole_run() -> None:
    tracker = ToolTracker()
    for i in range(3):
        tracker.start_call(ToolCall(call_id=f"c{i}", name="t", arguments="{}"))
    tracker.finish("c1", "done")
    assert list(tracker.steps) == ["c0", "c1", "c2"]
    assert [s.end is not None for s in tracker.steps.values()] == [False, True, False]


def test_step_and_message_to_dict() -> None:
    step = StepData(id="s", name="n", input="i", start=1.0, end=2.0, output="o", is_error=True, show_input=False)
    assert step.to_dict() == {
        "id": "s",
        "name": "n",
        "type": "tool",
        "start": 1.0,
        "end": 2.0,
        "input": "i",
        "output": "o",
        "show_input": False,
        "is_error": True,
    }
    assert MessageData(id="m", content="c").to_dict() == {"id": "m", "author": "assistant", "content": "c"}


def test_finish_open_ends_only_the_steps_still_open() -> None:
    tracker = ToolTracker()
    tracker.start("call_done", "calculator", "{}")
    tracker.finish("call_done", "3")
    tracker.start("call_open", "slow_tool", "{}")
    events = tracker.finish_open("cancelled by the client", "cid-1")
    assert [(e.name, e.data["step"]["id"]) for e in events] == [(STEP_COMPLETED, "call_open")]
    step = events[0].data["step"]
    assert step["is_error"] is True and step["end"] is not None
    assert json.loads(step["output"]) == {"error": "cancelled by the client", "correlation_id": "cid-1"}
    assert tracker.finish_open("again", "cid-1") == []


def test_a_hosted_tool_call_that_failed_is_an_error_step_as_on_the_assistants_engine() -> None:
    parser = MessageParser(ToolTracker())
    parser.parse({"type": "response.output_item.added",
                  "item": {"id": "ci_1", "type": "code_interpreter_call", "status": "in_progress"}})
    [done] = parser.parse({"type": "response.output_item.done",
                           "item": {"id": "ci_1", "type": "code_interpreter_call", "status": "failed", "code": "1/0"}})
    assert done.data["step"]["is_error"] is True


@pytest.mark.parametrize(("status", "is_error"), [("incomplete", True), ("failed", True), ("completed", False)])
def test_a_hosted_tool_call_cut_short_upstream_is_an_error_step_too(status: str, is_error: bool) -> None:
    """A hosted call the upstream left `incomplete` did not do its work: like a `failed` one, the
    client sees its step end with `is_error` (a completed one is not an error). Its output is the
    bare status when the item names no action."""
    parser = MessageParser(ToolTracker())
    parser.parse({"type": "response.output_item.added",
                  "item": {"id": "ws_1", "type": "web_search_call", "status": "in_progress"}})
    [done] = parser.parse({"type": "response.output_item.done",
                           "item": {"id": "ws_1", "type": "web_search_call", "status": status}})
    assert done.data["step"]["is_error"] is is_error
    assert done.data["step"]["output"] == status

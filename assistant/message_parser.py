"""Turns upstream Responses API events into the service's events: messages and tool steps.

`MessageParser` reads one upstream response (one round of a run) and keeps what the
orchestrator needs when the round ends: the function calls to run and how the response ended.
`ToolTracker` keeps the steps of a whole run, so a step's start and end are reported alike by
every engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

from .events import MESSAGE_COMPLETED, MESSAGE_DELTA, STEP_COMPLETED, STEP_CREATED, Event
from .tool_executor import ToolCall, ToolResult, error_output

# Output items the upstream runs itself (hosted tools): shown as steps, never executed here.
HOSTED_TOOL_ITEMS = frozenset(
    {
        "web_search_call",
        "file_search_call",
        "code_interpreter_call",
        "image_generation_call",
        "computer_call",
        "mcp_call",
        "local_shell_call",
    }
)


@dataclass(slots=True)
class StepData:
    """One tool step as clients see it."""

    id: str
    name: str
    input: str
    start: float
    type: str = "tool"
    show_input: bool = True
    end: float | None = None
    output: str | None = None
    is_error: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "type": self.type,
            "start": self.start,
            "end": self.end,
            "input": self.input,
            "output": self.output,
            "show_input": self.show_input,
            "is_error": self.is_error,
        }


@dataclass(slots=True)
class MessageData:
    """A complete assistant message as clients see it."""

    id: str
    content: str
    author: str = "assistant"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "author": self.author, "content": self.content}


class ToolTracker:
    """The tool steps of one run, from the call the model made to the output it got back."""

    def __init__(self) -> None:
        self.steps: dict[str, StepData] = {}

    def start(self, step_id: str, name: str, input: str, *, show_input: bool = True) -> Event:
        step = StepData(id=step_id, name=name, input=input, start=time.time(), show_input=show_input)
        self.steps[step_id] = step
        return Event(STEP_CREATED, {"step": step.to_dict()})

    def start_call(self, call: ToolCall) -> Event:
        return self.start(call.call_id, call.name, call.arguments)

    def finish(self, step_id: str, output: str | None, *, is_error: bool = False) -> Event:
        step = self.steps.get(step_id)
        if step is None:  # an item we never saw start (a hosted tool's done without added)
            step = StepData(id=step_id, name="unknown", input="", start=time.time())
            self.steps[step_id] = step
        step.end = time.time()
        step.output = output
        step.is_error = is_error
        return Event(STEP_COMPLETED, {"step": step.to_dict()})

    def finish_call(self, result: ToolResult) -> Event:
        return self.finish(result.tool_call_id, result.output, is_error=result.is_error)

    def finish_open(self, reason: str, correlation_id: str) -> list[Event]:
        """End every step still open (the run was stopped or failed): a client sees each end."""
        output = error_output(reason, correlation_id)
        return [self.finish(step.id, output, is_error=True) for step in list(self.steps.values()) if step.end is None]


def _message_text(item: dict[str, Any]) -> str:
    parts = item.get("content") or []
    return "".join(
        part.get("text") or part.get("refusal") or ""
        for part in parts
        if isinstance(part, dict) and part.get("type") in ("output_text", "refusal")
    )


def _hosted_tool_summary(item: dict[str, Any]) -> str:
    """What a hosted tool did, in a line: its action or query, and its status."""
    action = item.get("action") or item.get("queries") or item.get("code") or ""
    if not isinstance(action, str):
        action = str(action)
    return f"{item.get('status', 'completed')}: {action}".strip().rstrip(":")


class MessageParser:
    """Reads the events of one upstream response.

    `parse` returns the service events an upstream event maps to: most often none (reasoning
    summaries and content part bookkeeping are not shown to clients), or one.
    """

    def __init__(self, tracker: ToolTracker) -> None:
        self.tracker = tracker
        self.response_id: str | None = None
        self.tool_calls: list[ToolCall] = []
        self.messages: list[MessageData] = []
        self.completed = False
        # (message, type, code) of the first failure reported, if any.
        self.failure: tuple[str, str, str | None] | None = None

    @property
    def ended(self) -> bool:
        """True once the response reached a terminal event (completed, failed, incomplete)."""
        return self.completed or self.failure is not None

    def parse(self, event: dict[str, Any]) -> Sequence[Event]:
        kind = event.get("type")
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            delta = event.get("delta")
            if delta:
                return (Event(MESSAGE_DELTA, {"delta": {"content": delta}}),)
            return ()
        if kind == "response.output_item.done":
            done = self._item_done(event.get("item") or {})
            return () if done is None else (done,)
        if kind == "response.output_item.added":
            item = event.get("item") or {}
            if item.get("type") in HOSTED_TOOL_ITEMS:
                name = item["type"].removesuffix("_call")
                return (self.tracker.start(str(item.get("id")), name, "", show_input=False),)
            return ()
        if kind == "response.created":
            self.response_id = (event.get("response") or {}).get("id")
            return ()
        if kind == "response.completed":
            self.completed = True
            self._collect_missed_calls(event.get("response") or {})
            return ()
        if kind == "response.failed":
            error = (event.get("response") or {}).get("error") or {}
            self._fail(error.get("message") or "the model failed to respond", "run_failed", error.get("code"))
            return ()
        if kind == "response.incomplete":
            details = (event.get("response") or {}).get("incomplete_details") or {}
            reason = details.get("reason") or "unknown"
            self._fail(f"the response was cut short ({reason})", "run_incomplete", reason)
            return ()
        if kind == "error":
            # Real streams nest the details under "error"; older ones put them at the top level,
            # where "type" is the event's own ("error"), not the kind of error.
            nested = event.get("error")
            error = nested if isinstance(nested, dict) else event
            self._fail(
                error.get("message") or "the upstream reported an error",
                "run_failed",
                error.get("code") or (error.get("type") if error is nested else None),
            )
            return ()
        return ()

    def _item_done(self, item: dict[str, Any]) -> Event | None:
        kind = item.get("type")
        if kind == "message":
            message = MessageData(id=str(item.get("id")), content=_message_text(item))
            self.messages.append(message)
            return Event(MESSAGE_COMPLETED, {"message": message.to_dict()})
        if kind == "function_call":
            self._add_call(item)
            return None
        if kind in HOSTED_TOOL_ITEMS:
            # A hosted call that failed upstream is an error step, as with the Assistants engine.
            return self.tracker.finish(str(item.get("id")), _hosted_tool_summary(item),
                                       is_error=item.get("status") in ("failed", "incomplete"))
        return None

    def _add_call(self, item: dict[str, Any]) -> None:
        call_id = item.get("call_id")
        if not call_id or any(c.call_id == call_id for c in self.tool_calls):
            return
        self.tool_calls.append(
            ToolCall(call_id=call_id, name=str(item.get("name") or ""), arguments=item.get("arguments") or "")
        )

    def _collect_missed_calls(self, response: dict[str, Any]) -> None:
        """A function call in the final output whose item events we missed still needs an answer."""
        for item in response.get("output") or ():
            if isinstance(item, dict) and item.get("type") == "function_call":
                self._add_call(item)

    def _fail(self, message: str, type: str, code: str | None) -> None:
        if self.failure is None:
            self.failure = (message, type, code)

"""One run: the upstream rounds, the tool loop between them, and how the run ends.

`run_rounds` is the core loop and appends the service's events to the run's log (the pipeline's
only writer, with the run's tools); `execute_run` gives it its cancel scope and ends the log
whatever happens; `run_answer` and `wait_until_accepted` are what the JSON and streaming
handlers wait on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .config import Settings
from .errors import RunCancelled, UpstreamError, ServiceError
from .events import (
    ERROR,
    METADATA,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_CREATED,
    RUN_FAILED,
    Event,
    stream_path,
)
from .logs import redact, run_id_var, thread_id_var
from .message_parser import ToolTracker
from .run_log import RunLog
from .timeouts import MoveOn
from .tool_executor import ToolCall, ToolRegistry, ToolResult, cancelled_from_outside, error_output, execute_tool
from .upstream_sse import DeliverEvents

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

logger = logging.getLogger("assistant.orchestrator")

# Settling an abandoned round (answering its calls, or cancelling it upstream) may take this long.
SETTLE_TIMEOUT_SECONDS = 15.0


class Parser(Protocol):
    """Reads one upstream round; what the orchestrator needs of `MessageParser` and its kin."""

    tool_calls: list[ToolCall]
    failure: tuple[str, str, str | None] | None

    @property
    def ended(self) -> bool: ...

    def parse(self, event: dict[str, Any]) -> Sequence[Event]: ...


class Engine(Protocol):
    """What the orchestrator needs of an upstream API (Responses or Assistants)."""

    name: str

    async def create_thread(self) -> str: ...

    def new_parser(self, tracker: ToolTracker) -> Parser: ...

    def first_input(self, thread_id: str, message: str) -> Any: ...

    def next_input(self, parser: Any, results: list[ToolResult]) -> Any: ...

    def open_round(self, thread_id: str, turn_input: Any) -> AbstractAsyncContextManager[DeliverEvents]:
        """The round's upstream request, sent; it gives what hands its events over, in batches."""

    async def abandon_round(self, thread_id: str, parser: Any, results: list[ToolResult]) -> None:
        """The round will not go on: leave the thread so that its next message is accepted."""


async def _run_tool(
    registry: ToolRegistry, call: ToolCall, log: RunLog, tracker: ToolTracker, results: dict[str, ToolResult]
) -> None:
    """One tool call; its step ends in the log as soon as it returns, whatever the others do."""
    result = await execute_tool(registry, call, correlation_id=log.correlation_id)
    results[call.call_id] = result
    log.append(tracker.finish_call(result))


def _log_batch(parser: Parser, log: RunLog, batch: list[dict[str, Any]]) -> bool:
    """A batch of the round's upstream events, parsed into the run's log; True once the round
    has ended. Called for each network read, from the upstream connection's read callback:
    outside any task, so nothing under it may await or ask anyio for the current task."""
    for upstream_event in batch:
        for event in parser.parse(upstream_event):
            log.append(event)
    return parser.ended


def _interrupted(call: ToolCall, reason: str, correlation_id: str) -> ToolResult:
    return ToolResult(tool_call_id=call.call_id, output=error_output(reason, correlation_id), is_error=True)


async def run_rounds(
    engine: Engine,
    registry: ToolRegistry,
    settings: Settings,
    log: RunLog,
    message: str,
    tracker: ToolTracker,
) -> None:
    """The run's events, from `thread.run.created` to its outcome (completed or failed), appended
    to its log as they come.

    Service errors (upstream down, timeouts, broken streams) are raised, not logged as events.
    A round's tools run in a task group of their own, open while they run (the run holds none
    while it streams: ~0.4 KiB per open stream). A round that cannot go on (an error, the run
    stopped, too many rounds) is handed back to the engine to settle, so the thread's next
    message is accepted upstream.
    """
    thread_id, run_id = log.thread_id, log.run_id
    log.append(Event(RUN_CREATED, {"thread_id": thread_id, "run_id": run_id, "stream_url": stream_path(run_id)}))
    turn_input = engine.first_input(thread_id, message)
    for round_number in range(1, settings.max_tool_rounds + 2):
        parser = engine.new_parser(tracker)
        results: dict[str, ToolResult] = {}
        reason = ""
        settled = False
        try:
            async with engine.open_round(thread_id, turn_input) as deliver:
                log.mark_upstream_answered()
                await deliver(functools.partial(_log_batch, parser, log))
            if parser.failure is not None:
                # Not settled: what failed may still hold the thread (an Assistants run that an
                # `error` event broke off is still going), and the engine lets go of it.
                error, type, code = parser.failure
                error = redact(error)
                reason = "the upstream run failed"
                for event in tracker.finish_open(f"the run failed: {error}", log.correlation_id):
                    log.append(event)  # a step the failure cut off (a hosted tool's) ends before the outcome
                log.append(Event(RUN_FAILED, {"error": error, "type": type, "code": code}))
                return
            if not parser.ended:
                raise UpstreamError("the upstream stream ended before the response was complete")
            calls = parser.tool_calls
            if not calls:
                settled = True
                log.append(Event(RUN_COMPLETED, {"thread_id": thread_id, "run_id": run_id}))
                return
            if round_number > settings.max_tool_rounds:
                limit = settings.max_tool_rounds
                reason = "tool round limit reached"
                log.append(Event(
                    RUN_FAILED,
                    {
                        "error": f"the model kept calling tools after {limit} rounds (MAX_TOOL_ROUNDS)",
                        "type": "tool_rounds_exceeded",
                        "code": None,
                    },
                ))
                return

            for call in calls:
                log.append(tracker.start_call(call))
            async with anyio.create_task_group() as tools:
                for call in calls:
                    tools.start_soon(_run_tool, registry, call, log, tracker, results)
            turn_input = engine.next_input(parser, [results[c.call_id] for c in calls])
            settled = True
        finally:
            if not settled:
                log.ending = True
                reason = reason or log.cancel_reason or "the run was stopped"
                answers = [results.get(c.call_id) or _interrupted(c, reason, log.correlation_id) for c in parser.tool_calls]
                with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT_SECONDS):
                    await engine.abandon_round(thread_id, parser, answers)


async def execute_run(
    engine: Engine, registry: ToolRegistry, settings: Settings, log: RunLog, message: str
) -> None:
    """Drive one run to its end, writing every event to its log. Never raises.

    The log always ends with `metadata` (the run reached an outcome) or `error` (it could not).
    """
    thread_id_var.set(log.thread_id)
    run_id_var.set(log.run_id)
    tracker = ToolTracker()
    scope = log.cancel_scope = anyio.CancelScope()  # stopping the run cancels its tools too
    try:
        with scope:
            if log.cancel_reason is not None or log.error is not None:
                scope.cancel()  # stopped (or shut down) before its task started
            try:
                await run_rounds(engine, registry, settings, log, message, tracker)
            except ServiceError as exc:
                # Kept with the log for its retention: without the tracebacks, whose frames hold
                # the run's tool inputs and outputs, its message and its next input (the events'
                # caps bound what a retained run holds; these would not be counted).
                log.error = _without_frames(exc)
    except BaseException as exc:  # a bug, here or in a task of the run's (a tool's): this run ends, not the service
        if isinstance(exc, anyio.get_cancelled_exc_class()) and cancelled_from_outside():
            # The manager's task group itself is going: still end the log, so no reader waits for good.
            if not log.finished:
                # Also log.error: run_answer (a JSON client) must not read the cut-off run as completed.
                log.error = log.error or ServiceError("the service stopped while running this message")
                _end_open_steps(log, tracker, log.error.message)
                log.append(Event(ERROR, log.error.payload(log.correlation_id)))
            raise
        # Anything else (a BaseException subclass, a CancelledError a library raised by itself)
        # would leave the log unended and, out of the run's task, cancel every other run.
        logger.exception("run crashed")
        log.error = ServiceError("the service failed while running this message")
    reason = log.cancel_reason or "the run was cancelled"
    _end_open_steps(log, tracker, log.error.message if log.error is not None else reason)
    if log.error is not None:  # the run failed, or the service's shutdown stopped it
        logger.warning("run ended with %s: %s", log.error.type, log.error.message)
        log.append(Event(ERROR, log.error.payload(log.correlation_id)))
        return
    if scope.cancelled_caught and log.outcome is None:
        log.append(Event(RUN_CANCELLED, {"thread_id": log.thread_id, "run_id": log.run_id, "reason": reason}))
    log.append(metadata_event(log))
    logger.info("run finished", extra={"events": log.last_seq, "elapsed_seconds": _elapsed(log)})


def _end_open_steps(log: RunLog, tracker: ToolTracker, reason: str) -> None:
    """A client sees every step it saw start end, also when the run did not complete."""
    if log.outcome != RUN_COMPLETED:
        for event in tracker.finish_open(reason, log.correlation_id):
            log.append(event)


def _without_frames(error: ServiceError) -> ServiceError:
    """`error`, and the errors it came from, with no traceback (it is logged without one)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return error


def _elapsed(log: RunLog) -> float:
    return round(time.monotonic() - log.started, 3)


def metadata_event(log: RunLog) -> Event:
    return Event(
        METADATA,
        {
            "correlation_id": log.correlation_id,
            "thread_id": log.thread_id,
            "run_id": log.run_id,
            "event_count": log.last_seq + 1,
            "elapsed_time_seconds": _elapsed(log),
            "stream_url": stream_path(log.run_id),
        },
    )


async def run_answer(log: RunLog, correlation_id: str) -> dict[str, Any]:
    """The JSON answer of a run, once it has ended (also for a client asking again)."""
    await log.wait_finished()
    if log.error is not None:
        raise log.error
    outcome = log.outcome_event
    if outcome is not None and outcome.name == RUN_FAILED and outcome.data["type"] == "run_cancelled":
        raise RunCancelled(outcome.data["error"])  # cancelled upstream: 409, as the README lists it
    if outcome is not None and outcome.name == RUN_FAILED:
        raise UpstreamError(outcome.data["error"], type=outcome.data["type"])
    if outcome is not None and outcome.name == RUN_CANCELLED:
        raise RunCancelled(outcome.data["reason"])
    return {"responses": list(log.messages), "thread_id": log.thread_id, "run_id": log.run_id,
            "correlation_id": correlation_id}


def nothing_but_an_error(log: RunLog) -> bool:
    """Whether the run failed with nothing to show before its error (refused upstream, say)."""
    return log.error is not None and log.last_seq <= 2 and all(e.name in (RUN_CREATED, ERROR) for e in log.events())


async def wait_until_accepted(log: RunLog, head_deadline: float) -> None:
    """Wait (until `head_deadline`) for the upstream to accept a streaming run's first request,
    so that a run refused at once (unknown thread, bad credentials, busy thread) is raised and
    answered with a plain HTTP error status instead of a 200 stream holding only an error. The
    client then reads the run with `RunLog.follow`.

    The first streamed request's deadline is kept on the log: a message sent again with its
    Idempotency-Key waits until the same moment, so it gets the answer the first send got.
    """
    if log.head_deadline is None:
        log.head_deadline = head_deadline
    deadline = log.head_deadline
    async with MoveOn(deadline):
        await log.wait_upstream_answered()
    if nothing_but_an_error(log) and (log.finished_at or 0.0) <= deadline:
        raise log.error  # type: ignore[misc]  # nothing but the error to show: a plain HTTP error says it best

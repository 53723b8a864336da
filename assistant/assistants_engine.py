"""The second engine: OpenAI's Assistants API (threads, messages, runs, run steps).

Every call this engine makes to OpenAI is in this module. A turn is one run: created with the
user's message, it streams until it completes or stops at `requires_action`; then the tools'
outputs are submitted and the same run streams on. Clients see the same events as with the
Responses engine: `AssistantsParser` maps this API's events onto them.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import openai

from .config import Settings
from .errors import ThreadBusy, UpstreamError, UpstreamTimeout
from .events import MESSAGE_COMPLETED, MESSAGE_DELTA, Event
from .message_parser import MessageData, ToolTracker
from .tool_executor import MAX_TOOLS, ToolCall, ToolRegistry, ToolResult
from .upstream import (
    call_with_retries,
    is_thread_busy,
    map_upstream_error,
    may_have_taken_effect,
    retry_delay,
    waits_too_long,
)
from .upstream_sse import DeliverEvents, decode_named_events, deliver_batches, iterate_sse_events

# The SDK marks this API deprecated on every call; using it is this engine's whole point.
warnings.filterwarnings("ignore", message="The Assistants API is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=__name__)

logger = logging.getLogger("assistant.assistants")

ACTIVE = frozenset({"queued", "in_progress", "requires_action", "cancelling"})
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "incomplete"})
SUBMIT_ATTEMPTS = 3
_POLL_SECONDS = 0.25
_RUN_ID = re.compile(r"\brun_[A-Za-z0-9_-]*[A-Za-z0-9]")


@dataclass(frozen=True, slots=True)
class NewMessage:
    text: str


@dataclass(frozen=True, slots=True)
class ToolOutputs:
    run_id: str
    results: list[ToolResult]


def _text_of(content: Any) -> str:
    """The text of a message's (or a message delta's) content parts: its text, or a refusal."""
    return "".join(_part_text(part) for part in content or () if isinstance(part, dict))


def _part_text(part: dict[str, Any]) -> str:
    if part.get("type") == "text":
        return (part.get("text") or {}).get("value") or ""
    if part.get("type") == "refusal":
        return part.get("refusal") or ""
    return ""


def _hosted_output(call: dict[str, Any]) -> str:
    kind = call.get("type")
    if kind == "code_interpreter":
        details = call.get("code_interpreter") or {}
        logs = [o.get("logs", "") for o in details.get("outputs") or () if o.get("type") == "logs"]
        return "\n".join(logs) or "done"
    if kind == "file_search":
        results = (call.get("file_search") or {}).get("results")
        return f"{len(results)} results" if isinstance(results, list) else "done"
    return "done"


def _hosted_input(call: dict[str, Any]) -> str:
    if call.get("type") == "code_interpreter":
        return str((call.get("code_interpreter") or {}).get("input") or "")
    return ""


class AssistantsParser:
    """Reads the events of one stream of a run (its start, or a continuation after tool outputs)."""

    def __init__(self, tracker: ToolTracker) -> None:
        self.tracker = tracker
        self.run_id: str | None = None
        self.status: str | None = None
        self.tool_calls: list[ToolCall] = []
        self.messages: list[MessageData] = []
        self.failure: tuple[str, str, str | None] | None = None
        self._completed_messages: set[str] = set()

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def ended(self) -> bool:
        """True at a terminal run status, or when the run waits for tool outputs."""
        return self.status in TERMINAL or self.status == "requires_action" or self.failure is not None

    def parse(self, event: dict[str, Any]) -> Sequence[Event]:
        kind: str = event["type"]
        data = event.get("data")
        if not isinstance(data, dict):
            return ()
        if kind == "thread.message.delta":
            text = _text_of((data.get("delta") or {}).get("content"))
            return (Event(MESSAGE_DELTA, {"delta": {"content": text}}),) if text else ()
        if kind.startswith("thread.run.step."):
            return self._step(kind, data)
        if kind == "thread.message.completed" or kind == "thread.message.incomplete":
            message_id = str(data.get("id"))
            if message_id in self._completed_messages:
                return ()
            self._completed_messages.add(message_id)
            message = MessageData(id=message_id, content=_text_of(data.get("content")))
            self.messages.append(message)
            return (Event(MESSAGE_COMPLETED, {"message": message.to_dict()}),)
        if kind.startswith("thread.run."):
            self._run(kind, data)
            return ()
        if kind == "error":
            error = data.get("error") if isinstance(data.get("error"), dict) else data
            self._fail(error.get("message") or "the upstream reported an error", "run_failed", error.get("code"))
        return ()

    def _run(self, kind: str, run: dict[str, Any]) -> None:
        self.run_id = run.get("id") or self.run_id
        status = run.get("status") or kind.removeprefix("thread.run.")
        self.status = status
        if status == "requires_action":
            action = (run.get("required_action") or {}).get("submit_tool_outputs") or {}
            for call in action.get("tool_calls") or ():
                function = call.get("function") or {}
                if call.get("type", "function") == "function" and not any(c.call_id == call["id"] for c in self.tool_calls):
                    self.tool_calls.append(ToolCall(call["id"], str(function.get("name") or ""), function.get("arguments") or ""))
        elif status == "failed":
            error = run.get("last_error") or {}
            self._fail(error.get("message") or "the run failed", "run_failed", error.get("code"))
        elif status == "expired":
            self._fail("the run expired before it finished", "run_expired", "expired")
        elif status == "cancelled":
            self._fail("the run was cancelled upstream", "run_cancelled", "cancelled")
        elif status == "incomplete":
            reason = (run.get("incomplete_details") or {}).get("reason") or "unknown"
            self._fail(f"the response was cut short ({reason})", "run_incomplete", reason)

    def _step(self, kind: str, step: dict[str, Any]) -> Sequence[Event]:
        """Hosted tool calls (code interpreter, file search) become steps; they run upstream."""
        self.run_id = step.get("run_id") or self.run_id
        details = (step.get("delta") or {}).get("step_details") if kind == "thread.run.step.delta" else step.get("step_details")
        if not isinstance(details, dict) or details.get("type") != "tool_calls":
            return ()
        events = []
        finished = kind == "thread.run.step.completed" or kind == "thread.run.step.failed"
        for call in details.get("tool_calls") or ():
            call_id = call.get("id")
            if not call_id or call.get("type") == "function":
                continue
            step_data = self.tracker.steps.get(call_id)
            if step_data is None:
                events.append(self.tracker.start(call_id, str(call.get("type")), _hosted_input(call), show_input=False))
            if finished and (step_data is None or step_data.end is None):
                events.append(self.tracker.finish(call_id, _hosted_output(call), is_error=kind.endswith("failed")))
        return events

    def _fail(self, message: str, type: str, code: str | None) -> None:
        if self.failure is None:
            self.failure = (message, type, code)


class AssistantsEngine:
    name = "assistants"

    def __init__(self, client: openai.AsyncOpenAI, settings: Settings, registry: ToolRegistry) -> None:
        assert settings.assistant_id is not None
        self.client = client
        self.settings = settings
        self.registry = registry
        # Marks the runs this process starts, so a conflicting run can be told apart.
        self.instance_id = uuid.uuid4().hex
        self._live_runs: set[str] = set()  # runs a turn of this process is driving right now
        # The messages each live run has shown so far: reading a run back (its stream broke, or
        # its tool outputs went in without one) must not show an earlier round's messages again.
        self._shown_messages: dict[str, set[str]] = {}
        self._tools: list[dict[str, Any]] | None = None
        # A thread's round in flight, until its stream names its run (the parser knows it then),
        # so that a round given up before that still has its run cancelled.
        self._continuing: dict[str, str] = {}  # thread id -> the run a tool-outputs round continues
        self._attempts: dict[str, str] = {}  # thread id -> the marker of the run being created

    @property
    def runs(self) -> Any:
        return self.client.beta.threads.runs

    async def create_thread(self) -> str:
        try:
            thread = await call_with_retries(
                self.client.beta.threads.create,
                max_retries=self.settings.upstream_max_retries,
                what="threads.create",
                retry_if=_always,  # a spare empty thread harms nothing
            )
        except Exception as exc:
            raise map_upstream_error(exc) from exc
        return thread.id

    def new_parser(self, tracker: ToolTracker) -> AssistantsParser:
        return AssistantsParser(tracker)

    def first_input(self, thread_id: str, message: str) -> NewMessage:
        return NewMessage(message)

    def next_input(self, parser: AssistantsParser, results: list[ToolResult]) -> ToolOutputs:
        assert parser.run_id is not None
        return ToolOutputs(parser.run_id, results)

    async def abandon_round(self, thread_id: str, parser: AssistantsParser, results: list[ToolResult]) -> None:
        """A run this turn gives up on is cancelled, so it does not hold the thread."""
        run_id = parser.run_id or self._continuing.get(thread_id)
        marker = self._attempts.pop(thread_id, None)
        self._continuing.pop(thread_id, None)
        if run_id is None and marker is not None:  # stopped before the new run's stream named it
            run_id = await self._find_attempt(thread_id, marker)
        if run_id is not None:
            self._forget(run_id)
            if parser.status not in TERMINAL:
                await self._cancel_run_safely(thread_id, run_id)

    async def _find_attempt(self, thread_id: str, marker: str) -> str | None:
        """The run created with this `service_attempt` marker; None if none was (or cannot tell)."""
        try:
            page = await self.runs.list(thread_id, limit=5)
        except Exception:
            return None
        return next((run.id for run in page.data if (run.metadata or {}).get("service_attempt") == marker), None)

    # --- the rounds ---------------------------------------------------------------------------

    @asynccontextmanager
    async def open_round(
        self, thread_id: str, turn_input: NewMessage | ToolOutputs
    ) -> AsyncIterator[DeliverEvents]:
        if isinstance(turn_input, NewMessage):
            response = await self._create_run(thread_id, turn_input.text)
            run_id = None
        else:
            run_id = turn_input.run_id
            self._continuing[thread_id] = run_id
            response = await self._submit_tool_outputs_with_backoff(thread_id, run_id, turn_input.results)
            if response is None:  # a failed attempt delivered them after all: no stream to read
                yield functools.partial(deliver_batches, self._poll(thread_id, run_id))
                return
        try:
            yield functools.partial(deliver_batches, self._events(thread_id, run_id, response))
        finally:
            with anyio.CancelScope(shield=True):  # also when the run is being cancelled
                await response.http_response.aclose()

    async def _events(self, thread_id: str, run_id: str | None, response: Any) -> AsyncIterator[list[dict[str, Any]]]:
        """The stream's events; when it breaks off, the run's state is read back to finish the round."""
        status = None
        try:
            async for batch in iterate_sse_events(response.http_response.aiter_bytes(), decode_named_events):
                for event in batch:
                    kind = event["type"]
                    if kind.startswith("thread.run.") and not kind.startswith("thread.run.step"):
                        run_id = event["data"].get("id") or run_id
                        status = event["data"].get("status")
                        self._attempts.pop(thread_id, None)  # the parser knows the run now
                        self._continuing.pop(thread_id, None)
                        self._track(run_id, status)
                    elif kind in ("thread.message.completed", "thread.message.incomplete") and run_id is not None:
                        self._shown_messages.setdefault(run_id, set()).add(str(event["data"].get("id")))
                yield batch
                if status in TERMINAL or status == "requires_action":
                    return
        except (UpstreamError, UpstreamTimeout) as exc:
            if run_id is None:
                raise
            recovered = await self._recover(thread_id, run_id, exc)
            if recovered:
                yield recovered
            return
        if run_id is not None:
            recovered = await self._recover(thread_id, run_id, UpstreamError("the upstream stream ended early"))
            if recovered:
                yield recovered

    async def _poll(self, thread_id: str, run_id: str) -> AsyncIterator[list[dict[str, Any]]]:
        """The round of a run that took its tool outputs with no stream to show for it: the run
        is read back until it waits for tools again or ends (its messages come whole, no deltas)."""
        self._track(run_id, "in_progress")
        deadline = anyio.current_time() + self.settings.upstream_idle_timeout_seconds
        while True:
            try:
                run = await self._retrieve_run(thread_id, run_id)
            except Exception as exc:  # an upstream failure, not a bug of the service
                raise map_upstream_error(exc, thread_id=thread_id) from exc
            if run.status in TERMINAL | {"requires_action"}:
                break
            if anyio.current_time() > deadline:
                raise UpstreamTimeout("the run did not go on after its tool outputs were delivered")
            await anyio.sleep(_POLL_SECONDS)
        yield await self._round_read_back(thread_id, run_id, run.model_dump())

    def _forget(self, run_id: str) -> None:
        """The run is over for this process (ended, or given up)."""
        self._live_runs.discard(run_id)
        self._shown_messages.pop(run_id, None)

    def _track(self, run_id: str | None, status: str | None) -> None:
        if run_id is None:
            return
        if status in TERMINAL:
            self._forget(run_id)
        else:
            self._live_runs.add(run_id)

    async def _recover(self, thread_id: str, run_id: str, cause: UpstreamError | UpstreamTimeout) -> list[dict[str, Any]]:
        """Finish a round whose stream broke off, from the run as the upstream has it now.

        A run that went on to wait for tool outputs, or to its end, loses nothing: its state and
        its messages are read back. For one still going the error stands, and the orchestrator's
        `abandon_round` cancels it, so the thread is usable again.
        """
        logger.warning("reading run %s back (%s)", run_id, cause.message)
        try:
            run = (await self._retrieve_run(thread_id, run_id)).model_dump()
        except Exception:
            raise cause from None
        if run.get("status") not in TERMINAL and run.get("status") != "requires_action":
            raise cause
        return await self._round_read_back(thread_id, run_id, run)

    async def _round_read_back(self, thread_id: str, run_id: str, run: dict[str, Any]) -> list[dict[str, Any]]:
        """The events a stream would have ended the round with, for a run that has stopped (to
        wait for tool outputs, or at its end): its new messages, then its status."""
        status = run.get("status")
        events: list[dict[str, Any]] = []
        if status in ("completed", "requires_action", "incomplete"):  # what the round wrote stands
            try:
                events = await self._round_steps_read_back(thread_id, run_id)
            except Exception as exc:  # an upstream failure, not a bug of the service
                raise map_upstream_error(exc, thread_id=thread_id) from exc
        events.append({"type": f"thread.run.{status}", "data": run})
        self._continuing.pop(thread_id, None)  # the parser learns the run from these events
        self._track(run_id, status)
        return events

    async def _round_steps_read_back(self, thread_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's messages not shown yet, and its (hosted) tool steps, so a step shown started ends."""
        events: list[dict[str, Any]] = []
        shown = self._shown_messages.setdefault(run_id, set())
        for step in await self._list_run_steps(thread_id, run_id):
            details = step.get("step_details") or {}
            if details.get("type") == "tool_calls":
                events.append({"type": f"thread.run.step.{step.get('status')}", "data": step})
            message_id = (details.get("message_creation") or {}).get("message_id")
            if message_id and message_id not in shown:
                message = (await call_with_retries(
                    lambda message_id=message_id: self.client.beta.threads.messages.retrieve(message_id, thread_id=thread_id),
                    max_retries=self.settings.upstream_max_retries,
                    what="messages.retrieve",
                    retry_if=_always,
                )).model_dump()
                if message.get("status") == "in_progress":
                    continue
                shown.add(message_id)
                events.append({"type": f"thread.message.{message.get('status') or 'completed'}", "data": message})
        return events

    async def _create_run(self, thread_id: str, text: str) -> Any:
        """Start a streamed run with the message; a conflicting run is dealt with first."""
        if self._tools is None:
            self._tools = await self._run_tools()
        attempt_marker = uuid.uuid4().hex
        params: dict[str, Any] = {
            "assistant_id": self.settings.assistant_id,
            "additional_messages": [{"role": "user", "content": text}],
            "metadata": {"service_instance": self.instance_id, "service_attempt": attempt_marker},
            "stream": True,
        }
        if self._tools:
            params["tools"] = self._tools
        if self.settings.instructions:
            params["instructions"] = self.settings.instructions

        async def create() -> Any:
            return await self.runs.with_streaming_response.create(thread_id, **params).__aenter__()

        async def not_applied(exc: BaseException) -> bool:
            # After a 5xx: retry only when no run of this attempt exists upstream.
            try:
                page = await self.runs.list(thread_id, limit=3)
            except Exception:
                return False
            return not any((run.metadata or {}).get("service_attempt") == attempt_marker for run in page.data)

        deadline = anyio.current_time() + self.settings.thread_lock_timeout_seconds
        self._attempts[thread_id] = attempt_marker
        while True:
            try:
                return await call_with_retries(
                    create, max_retries=self.settings.upstream_max_retries, what="runs.create", retry_if=not_applied
                )
            except Exception as exc:
                if not is_thread_busy(exc) or anyio.current_time() >= deadline:
                    self._attempts.pop(thread_id, None)
                    raise map_upstream_error(exc, thread_id=thread_id) from exc
                try:
                    await self._clear_active_run(thread_id, exc, deadline)
                except ThreadBusy:
                    self._attempts.pop(thread_id, None)
                    raise
                except Exception as clear_exc:  # a failed look-up is an upstream error, not a crash
                    self._attempts.pop(thread_id, None)
                    raise map_upstream_error(clear_exc, thread_id=thread_id) from clear_exc

    async def _clear_active_run(self, thread_id: str, exc: BaseException, deadline: float) -> None:
        """The thread has an active run: wait for ours, cancel an orphan's."""
        match = _RUN_ID.search(str(exc))
        run_id = match[0] if match else None
        if run_id is None:
            page = await self.runs.list(thread_id, limit=20)
            run_id = next((run.id for run in page.data if run.status in ACTIVE), None)
        if run_id is None:
            await anyio.sleep(_POLL_SECONDS)
            return
        if run_id in self._live_runs:
            raise ThreadBusy("another message on this thread is still being answered") from exc
        run = await self._retrieve_run(thread_id, run_id)
        owner = (run.metadata or {}).get("service_instance")
        if owner and owner != self.instance_id:
            # Another instance's turn (streaming, or running its tools): wait for it, never cancel it.
            while anyio.current_time() < deadline:
                if run.status in TERMINAL:
                    return
                await anyio.sleep(_POLL_SECONDS)
                run = await self._retrieve_run(thread_id, run_id)
            raise ThreadBusy("another instance of the service is still answering on this thread") from exc
        # A run whose turn no longer exists (crashed, or its client left before this service
        # kept runs going): it would hold the thread until it expires.
        logger.warning("cancelling orphaned run %s on the thread", run_id)
        await self._cancel_run_safely(thread_id, run_id)
        while anyio.current_time() < deadline:
            run = await self._retrieve_run(thread_id, run_id)
            if run.status in TERMINAL:
                return
            await anyio.sleep(_POLL_SECONDS)
        raise ThreadBusy("the thread's previous run did not end in time; retry shortly") from exc

    async def _run_tools(self) -> list[dict[str, Any]]:
        """The assistant's own hosted tools plus this service's functions, read once."""
        try:
            assistant = await call_with_retries(
                lambda: self.client.beta.assistants.retrieve(self.settings.assistant_id),
                max_retries=self.settings.upstream_max_retries,
                what="assistants.retrieve",
                retry_if=_always,
            )
        except Exception as exc:
            raise map_upstream_error(exc) from exc
        hosted = [tool.model_dump(exclude_none=True) for tool in assistant.tools or () if tool.type != "function"]
        tools = hosted + self.registry.assistants_tools
        if len(tools) > MAX_TOOLS:  # OpenAI would refuse every run with a 400
            raise UpstreamError(  # the upstream's limit, as its own 400 would say
                f"the assistant's {len(hosted)} hosted tools and this service's "
                f"{len(self.registry.assistants_tools)} functions make {len(tools)} tools; "
                f"OpenAI takes at most {MAX_TOOLS} in a run"
            )
        return tools

    # --- the resilient helpers ----------------------------------------------------------------

    async def _retrieve_run(self, thread_id: str, run_id: str) -> Any:
        return await call_with_retries(
            lambda: self.runs.retrieve(run_id, thread_id=thread_id),
            max_retries=self.settings.upstream_max_retries,
            what="runs.retrieve",
            retry_if=_always,
        )

    async def _list_run_steps(self, thread_id: str, run_id: str) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        after: dict[str, str] = {}
        while True:
            page = await call_with_retries(
                lambda: self.runs.steps.list(run_id, thread_id=thread_id, order="asc", limit=100, **after),
                max_retries=self.settings.upstream_max_retries,
                what="runs.steps.list",
                retry_if=_always,
            )
            steps += [step.model_dump() for step in page.data]
            if not page.has_more or not page.data:
                return steps
            after = {"after": page.data[-1].id}

    async def _submit_tool_outputs_with_backoff(self, thread_id: str, run_id: str, results: list[ToolResult]) -> Any:
        """Deliver the outputs (3 attempts), and give the stream of the run going on; None when
        a failed attempt delivered them after all. If they cannot be delivered, cancel the run so
        the thread is free."""
        outputs = [{"tool_call_id": r.tool_call_id, "output": r.output} for r in results]
        error: BaseException | None = None
        for attempt in range(SUBMIT_ATTEMPTS):
            try:
                return await self.runs.with_streaming_response.submit_tool_outputs(
                    run_id, thread_id=thread_id, tool_outputs=outputs, stream=True
                ).__aenter__()
            except (openai.APIStatusError, openai.APIConnectionError) as exc:
                error = exc
                if isinstance(exc, openai.APIStatusError) and exc.status_code < 500 and exc.status_code != 429:
                    # The run will not take them: it ended (expired, cancelled), an earlier attempt
                    # delivered them after all (it went on: follow it), or they are wrong.
                    if await self._took_outputs(thread_id, run_id, results):
                        logger.warning("the run no longer waits for these tool outputs; reading it back")
                        return None
                    break  # no point retrying
                if may_have_taken_effect(exc) and await self._took_outputs(thread_id, run_id, results):
                    logger.warning("the tool outputs went in despite %s", type(exc).__name__)
                    return None
                if waits_too_long(exc):
                    break
                if attempt + 1 < SUBMIT_ATTEMPTS:
                    await anyio.sleep(retry_delay(attempt, exc))
        logger.warning("could not submit tool outputs; cancelling the run", extra={"upstream_run_id": run_id})
        self._forget(run_id)
        self._continuing.pop(thread_id, None)  # settled here
        await self._cancel_run_safely(thread_id, run_id)
        mapped = map_upstream_error(error) if error is not None else UpstreamError("no attempt made")
        # The same type and status as the Responses engine gives the same failure (429, timeout).
        raise UpstreamError(
            f"the tool outputs could not be delivered, so the run was cancelled ({mapped.message})",
            type=mapped.type, status_code=mapped.status_code, retry_after=mapped.retry_after,
        ) from error

    async def _took_outputs(self, thread_id: str, run_id: str, results: list[ToolResult]) -> bool:
        """Whether the run no longer waits for these outputs (so a failed submit delivered them)."""
        try:
            run = await self._retrieve_run(thread_id, run_id)
        except Exception:
            return False  # cannot tell: the next attempt, refused if they went in, will say
        if run.status != "requires_action":
            return True  # it went on, or ended: reading it back tells how
        if run.required_action is None:
            return False
        waiting = {call.id for call in run.required_action.submit_tool_outputs.tool_calls}
        return not waiting & {r.tool_call_id for r in results}  # it asks for other calls now

    async def _cancel_run_safely(self, thread_id: str, run_id: str) -> None:
        """Cancel a run unless it already ended; never raises (it is itself a clean-up step)."""
        try:
            run = await self._retrieve_run(thread_id, run_id)
            if run.status in TERMINAL or run.status == "cancelling":
                return
            await self.runs.cancel(run_id, thread_id=thread_id)
        except Exception as exc:
            logger.warning("could not cancel run %s: %s", run_id, type(exc).__name__)


async def _always(exc: BaseException) -> bool:
    return True

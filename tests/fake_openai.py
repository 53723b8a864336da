"""A fake OpenAI (Responses + Conversations API, Assistants API v2) for end-to-end tests.

The service under test talks to this instead of api.openai.com. "The model" is deterministic:
what it answers depends on the last user message (echo, `tool:`, `fixture:`, `fault:` directives,
and for Assistants runs `hosted:`), so a test picks the upstream behaviour it needs by what it
types. Run it with `hypercorn tests.fake_openai:app --bind 127.0.0.1:PORT` from the repo root.
A `slow-follow-up <delay>` line under `tool:` lines streams the reply to the tool outputs with
that delay before each delta (so a client can hang up while it streams; Responses API only).

Responses faults: `fault:slow <delay> <n>` (n words, each after `delay` seconds: a run slow
enough to cancel or resume), `fault:stall <s>`, `fault:cut [eof]`, `fault:malformed`,
`fault:failed`, `fault:error-event`, `fault:incomplete`, `fault:locked <s>` (the conversation
stays locked that long), `fault:status <code> [retry-after] [xN]`.

Assistants flavour (threads, messages, runs, run steps under /v1/threads): a run answers the
thread's last user message with the same echo / `tool:` rules; `hosted:code_interpreter` and
`hosted:file_search` make the fake "run" a hosted tool itself. Run faults: `fault:status <code>
[retry-after] [xN]`, `fault:failed`, `fault:expired`, `fault:incomplete`, `fault:cut [eof]`,
`fault:submit-status <code> [retry-after] [xN]`, `fault:slow <delay> <n>`, `fault:stall <s>`,
`fault:active <seconds>`. Timings: FAKE_CANCEL_DELAY (cancelling -> cancelled, default 0.2 s),
FAKE_ABANDONED_RUN_SECONDS (a `fault:cut` run stays in_progress, then expires; default 30 s).
The state is visible at GET /_fake/threads/{id}.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

Event = tuple[str, bytes]  # SSE event name, data line
CUT = object()  # yielded by a stream to hang up without finishing the HTTP body
Stream = AsyncIterator[Event | object]
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
LOCKED = "Another process is currently operating on this conversation. Please retry in a few seconds."
BAD_JSON = "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
QUOTA = (  # as in openai-error.1.chunks.txt
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
STATUS_ERRORS = {  # status -> (type, code, message) as OpenAI sends them
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country not supported."),
    404: ("invalid_request_error", None, "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 1s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
TYPE_IN_RAW_LINE = re.compile(rb'"type"\s*:\s*"([^"]+)"')

# Assistants API
BETA = (
    "You must provide the 'OpenAI-Beta' header to access the Assistants API. "
    "Please try again by setting the header 'OpenAI-Beta: assistants=v2'."
)
ACTIVE = frozenset({"queued", "in_progress", "requires_action", "cancelling"})  # a thread takes no new run
RUN_TTL = 600  # seconds from creation to a run's expires_at, as OpenAI sets it
DEFAULT_RUN_MODEL = "gpt-4o"  # the fake has no assistants store to take a model from
HOSTED = ("code_interpreter", "file_search")
CODE = "print(1 + 2)"  # what hosted:code_interpreter "runs", and its logs
CODE_LOGS = "3\n"
SUBMIT_FAULT_CALL = ("calculator", '{"a":1,"b":2,"op":"add"}')
DONE: Event = ("done", b"[DONE]")
FILE_SEARCH_CONTENT = "step_details.tool_calls[*].file_search.results[*].content"


class APIError(Exception):
    """An HTTP error in OpenAI's shape; raised anywhere in a handler."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.headers = status, headers
        self.error = {"message": message, "type": type, "param": param, "code": code}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _json({"error": exc.error}, exc.status, exc.headers)


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def _item(item: Any) -> dict[str, Any]:
    """An input item as a conversation stores it: typed, with an id, content as parts."""
    if isinstance(item, str):
        item = {"role": "user", "content": item}
    if not isinstance(item, dict):
        raise APIError(400, "Invalid input item.", param="input")
    item = {"type": "message", **item} if "type" not in item and "role" in item else dict(item)
    kind = item.get("type")
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item["content"] = [{"type": part, "text": item["content"]}]
    if kind in ID_PREFIXES:
        item.setdefault("status", "completed")
    return {"id": item.pop("id", None) or _id(ID_PREFIXES.get(kind, "item")), **item}


def _user_text(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content or [] if isinstance(p, dict) and p.get("type") == "input_text")


def _pieces(text: str) -> list[str]:
    """Word-sized deltas that join back to exactly `text` (spaces lead, as OpenAI's do)."""
    return [p for p in re.split(r"(?= )", text) if p] or [text]


def _chunks(text: str) -> list[str]:
    """Two or three argument deltas: a client must never assume arguments arrive whole."""
    size = max(1, -(-len(text) // 3))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _event_name(line: bytes) -> str:
    """The event name OpenAI would have sent with a recorded line, even a broken one."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        match = TYPE_IN_RAW_LINE.search(line)
        return match.group(1).decode() if match else "message"
    return data["type"] if isinstance(data, dict) and isinstance(data.get("type"), str) else "message"


def _default_fixtures() -> Path:
    if "FIXTURES_DIR" in os.environ:
        return Path(os.environ["FIXTURES_DIR"])
    candidates = [Path(__file__).resolve().parents[1].parent / "shared" / "fixtures", Path("/work/shared/fixtures")]
    return next((p for p in candidates if p.is_dir()), candidates[-1])


class Turn:
    """One response being produced: its events, and freeing its conversation however it ends."""

    def __init__(self, fake: FakeOpenAI, body: dict[str, Any], conversation: str | None, delay: float) -> None:
        self.fake, self.body, self.conversation, self.delay = fake, body, conversation, delay
        self.id = _id("resp")
        self.created_at = int(time.time())
        self.hold = 0.0  # seconds the conversation stays locked after the end (fault:locked)
        self.seq = 0
        self._released = False

    def release(self) -> None:
        if self._released or not self.conversation:
            return
        self._released = True
        if self.hold:
            self.fake.busy[self.conversation] = time.monotonic() + self.hold
        else:
            self.fake.busy.pop(self.conversation, None)

    def response(self, status: str, output: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": int(time.time()) if status == "completed" else None,
            "conversation": {"id": self.conversation} if self.conversation else None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": body.get("max_tool_calls"),
            "model": body["model"],
            "output": output or [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
            "safety_identifier": None,
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1),
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1),
            "truncation": body.get("truncation", "disabled"),
            "usage": None,
            "user": None,
            "metadata": body.get("metadata") or {},
            **extra,
        }

    def event(self, type: str, **fields: Any) -> Event:
        data = orjson.dumps({"type": type, **fields, "sequence_number": self.seq})
        self.seq += 1
        return type, data

    def end(self, type: str, status: str, output: list[dict[str, Any]] | None = None, **extra: Any) -> Event:
        """The terminal event. The conversation holds the output and is free before the client hears of it."""
        if self.conversation and status in ("completed", "incomplete"):
            self.fake.items[self.conversation].extend(output or [])
        self.release()
        return self.event(type, response=self.response(status, output, **extra))

    def usage(self, output: list[dict[str, Any]]) -> dict[str, Any]:
        used_in, used_out = len(orjson.dumps(self.body.get("input"))) // 4, len(orjson.dumps(output)) // 4
        return {
            "input_tokens": used_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": used_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used_in + used_out,
        }

    async def model(self, text: str | None = None, calls: list[tuple[str, str]] | None = None, *,
                    stall: float = 0, fault: str | None = None) -> Stream:
        """A generated response: function calls, then a text message, bent by an optional fault."""
        yield self.event("response.created", response=self.response("in_progress"))
        await anyio.sleep(stall)
        yield self.event("response.in_progress", response=self.response("in_progress"))
        if fault == "failed":
            yield self.end("response.failed", "failed", error={"code": "server_error", "message": "The model failed."})
            return
        if fault == "error-event":
            error = {"type": "insufficient_quota", "code": "insufficient_quota", "message": QUOTA, "param": None}
            yield self.event("error", error=error)
            yield self.end("response.failed", "failed", error={"code": "insufficient_quota", "message": QUOTA})
            return

        output: list[dict[str, Any]] = []
        for index, (name, arguments) in enumerate(calls or []):
            item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": "call_" + secrets.token_hex(12), "name": name}
            where = {"item_id": item["id"], "output_index": index}
            yield self.event("response.output_item.added", item=item, output_index=index)
            for chunk in _chunks(arguments):
                await anyio.sleep(self.delay)
                yield self.event("response.function_call_arguments.delta", delta=chunk, **where)
            yield self.event("response.function_call_arguments.done", arguments=arguments, **where)
            item = {**item, "status": "completed", "arguments": arguments}
            yield self.event("response.output_item.done", item=item, output_index=index)
            output.append(item)

        if text is not None:
            index, item_id = len(output), _id("msg")
            where = {"item_id": item_id, "output_index": index}
            item = {"id": item_id, "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
            yield self.event("response.output_item.added", item=item, output_index=index)
            part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            yield self.event("response.content_part.added", content_index=0, **where, part=part)
            pieces = _pieces(text)
            if fault in ("cut", "eof", "incomplete"):
                pieces = pieces[: max(1, len(pieces) // 2)]
            for n, piece in enumerate(pieces):
                if fault == "malformed" and n == len(pieces) // 2:
                    yield "response.output_text.delta", b'{"type":"response.output_text.delta","delta":"'
                await anyio.sleep(self.delay)
                yield self.event("response.output_text.delta", content_index=0, delta=piece, **where, logprobs=[])
            if fault == "cut":
                yield CUT
            if fault in ("cut", "eof"):
                return
            text = "".join(pieces)
            part = {**part, "text": text}
            yield self.event("response.output_text.done", content_index=0, **where, logprobs=[], text=text)
            yield self.event("response.content_part.done", content_index=0, **where, part=part)
            status = "incomplete" if fault == "incomplete" else "completed"
            item = {**item, "status": status, "content": [part]}
            yield self.event("response.output_item.done", item=item, output_index=index)
            output.append(item)

        if fault == "incomplete":
            details = {"reason": "max_output_tokens"}
            yield self.end("response.incomplete", "incomplete", output, incomplete_details=details)
        else:
            yield self.end("response.completed", "completed", output, usage=self.usage(output))

    async def replay(self, events: list[Event]) -> Stream:
        """A recorded response, line for line; its completed output joins the conversation."""
        for name, data in events:
            if name.endswith(".delta"):
                await anyio.sleep(self.delay)
            if name in TERMINAL:
                try:
                    output = orjson.loads(data)["response"]["output"] if name == "response.completed" else []
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    output = []
                if self.conversation and isinstance(output, list):
                    self.fake.items[self.conversation].extend(output)
                self.release()
            yield name, data


class EventStream(StreamingResponse):
    """SSE, flushed per event; frees the conversation however the stream ends, and can hang up."""

    media_type = "text/event-stream"

    def __init__(self, turn: Turn, events: Stream) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache"})
        self.turn = turn

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for event in self.body_iterator:
            if event is CUT:
                return  # no end of body: the server drops the connection mid-response
            name, data = event  # type: ignore[misc]
            chunk = b"event: %s\ndata: %s\n\n" % (name.encode(), data)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await anyio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.release()


class RunCancelled(Exception):
    """A cancel request reached the run a stream is producing."""


def _text_block(value: str) -> dict[str, Any]:
    return {"type": "text", "text": {"value": value, "annotations": []}}


def _message_text(content: list[dict[str, Any]]) -> str:
    return "".join(p["text"]["value"] for p in content if p.get("type") == "text")


def _message_input(body: Any, param: str = "") -> dict[str, Any]:
    """A message to add to a thread, as `new_message` takes it; `param` prefixes error params."""
    if not isinstance(body, dict):
        raise APIError(400, f"Invalid type for '{param.rstrip('.') or 'body'}': expected an object.",
                       param=param.rstrip(".") or None, code="invalid_type")
    role, content = body.get("role"), body.get("content")
    for name, value in (("role", role), ("content", content)):
        if value is None:
            raise APIError(400, f"Missing required parameter: '{param}{name}'.", param=f"{param}{name}",
                           code="missing_required_parameter")
    if role not in ("user", "assistant"):
        raise APIError(400, f"Invalid value: {role!r}. Supported values are: 'user' and 'assistant'.",
                       param=f"{param}role", code="invalid_value")
    if isinstance(content, str):
        parts = [_text_block(content)]
    elif isinstance(content, list):
        parts = []
        for n, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(_text_block(part["text"]))
            elif kind in ("image_file", "image_url"):
                parts.append(part)
            else:
                raise APIError(400, f"Invalid content part at '{param}content[{n}]'.", param=f"{param}content[{n}]")
    else:
        raise APIError(400, f"Invalid type for '{param}content': expected a string or an array.",
                       param=f"{param}content", code="invalid_type")
    return {"role": role, "content": parts, "attachments": body.get("attachments") or [],
            "metadata": body.get("metadata") or {}}


class RunTurn:
    """One stretch of an Assistants run: from its creation, or from a tool-output submission, to
    requires_action or an end. It changes the fake's state as it goes (what a GET shows mid-stream
    is what OpenAI would show), and notices a cancel request at every delta."""

    def __init__(self, fake: FakeOpenAI, run: dict[str, Any], delay: float, include: list[str] | None = None) -> None:
        self.fake, self.run, self.delay, self.include = fake, run, delay, include or []
        self.step: dict[str, Any] | None = None  # the run step being produced
        self.message: dict[str, Any] | None = None  # the assistant message being written
        self.hung_up = False  # the stream ends without `done` (fault:cut)

    def release(self) -> None:
        """EventStream's hook: a run does not depend on its HTTP connection, so nothing to free."""

    @staticmethod
    def event(name: str, data: dict[str, Any]) -> Event:
        return name, orjson.dumps(data)  # a snapshot: later changes to `data` do not reach it

    def run_event(self, name: str) -> Event:
        return self.event(f"thread.run.{name}", self.run)

    def set(self, status: str, **fields: Any) -> Event:
        self.run.update(status=status, **fields)
        return self.run_event(status)

    def check(self) -> None:
        self.fake.settle()
        if self.run["status"] in ("cancelling", "cancelled"):
            raise RunCancelled

    async def pause(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self.check()

    def end(self, status: str, **fields: Any) -> Event:
        self.check()
        self.fake.finish(self.run, status, **fields)
        return self.run_event(status)

    def new_step(self, kind: str, details: dict[str, Any]) -> list[Event]:
        run = self.run
        self.step = {
            "id": _id("step"), "object": "thread.run.step", "created_at": int(time.time()),
            "run_id": run["id"], "assistant_id": run["assistant_id"], "thread_id": run["thread_id"],
            "type": kind, "status": "in_progress", "cancelled_at": None, "completed_at": None,
            "expired_at": None, "failed_at": None, "last_error": None, "step_details": details, "usage": None,
        }
        self.fake.steps[run["id"]].append(self.step)
        return [self.event("thread.run.step.created", self.step), self.event("thread.run.step.in_progress", self.step)]

    def step_delta(self, tool_call: dict[str, Any]) -> Event:
        assert self.step is not None
        delta = {"step_details": {"type": "tool_calls", "tool_calls": [tool_call]}}
        return self.event("thread.run.step.delta", {"id": self.step["id"], "object": "thread.run.step.delta", "delta": delta})

    def complete_step(self) -> Event:
        step = self.step
        assert step is not None
        self.check()
        step.update(status="completed", completed_at=int(time.time()), usage=self.fake.usage(self.run, step))
        return self.event("thread.run.step.completed", step)

    async def script(self, text: str | None = None, calls: list[tuple[str, str]] | None = None, *,
                     hosted: str | None = None, fault: str | None = None, stall: float = 0,
                     hidden: float | None = None, outputs: dict[str, str] | None = None) -> Stream:
        """The turn's events, bent by an optional fault; then `done`, unless the connection drops.

        `outputs` (tool call id -> output) makes it the continuation after submit_tool_outputs."""
        try:
            if outputs is None:
                yield self.run_event("created")
                yield self.run_event("queued")
            else:
                yield self.set("queued")
            await self.pause(stall)
            yield self.set("in_progress", started_at=self.run["started_at"] or int(time.time()))
            if outputs is not None:
                assert self.step is not None
                for call in self.step["step_details"]["tool_calls"]:
                    call["function"]["output"] = outputs[call["id"]]
                yield self.complete_step()
            if fault == "failed":
                yield self.end("failed", last_error={"code": "server_error", "message": "The model failed."})
            elif fault == "expired":
                yield self.end("expired")
            elif calls:
                async for event in self.function_calls(calls):
                    yield event
            else:
                if hosted:
                    async for event in self.hosted_tool(hosted):
                        yield event
                async for event in self.reply(text or "", fault):
                    yield event
                if self.hung_up:
                    return
                if fault == "incomplete":
                    yield self.end("incomplete", incomplete_details={"reason": "max_completion_tokens"})
                else:
                    completed = self.end("completed")
                    if hidden is not None:  # in place before the client can hear the run is over
                        self.fake.hidden_run(self.run, hidden)
                    yield completed
        except RunCancelled:
            async for event in self.cancelled():
                yield event
        yield DONE

    async def reply(self, text: str, fault: str | None = None) -> Stream:
        """A message_creation step and its assistant message, streamed word by word."""
        run, message_id = self.run, _id("msg")
        for event in self.new_step("message_creation", {"type": "message_creation", "message_creation": {"message_id": message_id}}):
            yield event
        self.message = message = self.fake.new_message(run["thread_id"], "assistant", [], id=message_id,
                                                        status="in_progress", run=run)
        yield self.event("thread.message.created", message)
        yield self.event("thread.message.in_progress", message)
        pieces = _pieces(text)
        if fault in ("cut", "eof", "incomplete"):
            pieces = pieces[: max(1, len(pieces) // 2)]
        written = ""
        for piece in pieces:
            await self.pause(self.delay)
            written += piece
            message["content"] = [_text_block(written)]
            delta = {"content": [{"index": 0, "type": "text", "text": {"value": piece, "annotations": []}}]}
            yield self.event("thread.message.delta", {"id": message_id, "object": "thread.message.delta", "delta": delta})
        if fault in ("cut", "eof"):  # the run is left in_progress: it blocks the thread until it expires
            self.fake.abandon(run)
            self.hung_up = True
            if fault == "cut":
                yield CUT
            return
        self.check()
        now = int(time.time())
        if fault == "incomplete":
            message.update(status="incomplete", incomplete_at=now, incomplete_details={"reason": "max_tokens"})
            yield self.event("thread.message.incomplete", message)
        else:
            message.update(status="completed", completed_at=now)
            yield self.event("thread.message.completed", message)
        yield self.complete_step()

    async def function_calls(self, calls: list[tuple[str, str]]) -> Stream:
        """A tool_calls step whose function calls the client must run: the run ends up requires_action."""
        for event in self.new_step("tool_calls", {"type": "tool_calls", "tool_calls": []}):
            yield event
        assert self.step is not None
        made = self.step["step_details"]["tool_calls"]
        for index, (name, arguments) in enumerate(calls):
            call = {"id": "call_" + secrets.token_hex(12), "type": "function",
                    "function": {"name": name, "arguments": "", "output": None}}
            made.append(call)
            yield self.step_delta({"index": index, **call})
            for chunk in _chunks(arguments):
                await self.pause(self.delay)
                call["function"]["arguments"] += chunk
                yield self.step_delta({"index": index, "type": "function", "function": {"arguments": chunk}})
        self.check()
        required = [{"id": c["id"], "type": "function",
                     "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in made]
        action = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": required}}
        yield self.set("requires_action", required_action=action)

    async def hosted_tool(self, kind: str) -> Stream:
        """A tool_calls step with a tool OpenAI runs itself (code_interpreter, file_search)."""
        for event in self.new_step("tool_calls", {"type": "tool_calls", "tool_calls": []}):
            yield event
        assert self.step is not None
        call: dict[str, Any] = {"id": "call_" + secrets.token_hex(12), "type": kind}
        self.step["step_details"]["tool_calls"].append(call)
        if kind == "code_interpreter":
            call["code_interpreter"] = {"input": "", "outputs": []}
            yield self.step_delta({"index": 0, **call})
            for chunk in _chunks(CODE):
                await self.pause(self.delay)
                call["code_interpreter"]["input"] += chunk
                yield self.step_delta({"index": 0, "type": kind, "code_interpreter": {"input": chunk}})
            await self.pause(self.delay)
            call["code_interpreter"]["outputs"] = [{"type": "logs", "logs": CODE_LOGS}]
            outputs = [{"index": 0, "type": "logs", "logs": CODE_LOGS}]
            yield self.step_delta({"index": 0, "type": kind, "code_interpreter": {"outputs": outputs}})
        else:
            call["file_search"] = {}
            yield self.step_delta({"index": 0, **call})
            await self.pause(self.delay)
            result: dict[str, Any] = {"file_id": "file-fake0notes", "file_name": "notes.txt", "score": 0.9}
            if FILE_SEARCH_CONTENT in self.include:
                result["content"] = [{"type": "text", "text": "Notes the fake found."}]
            ranking = {"ranker": "default_2024_08_21", "score_threshold": 0.0}
            call["file_search"] = {"ranking_options": ranking, "results": [result]}
        yield self.complete_step()

    async def cancelled(self) -> Stream:
        """How a stream ends when its run is cancelled: what was open stops, then `cancelled`."""
        if self.run["status"] == "cancelling":
            yield self.run_event("cancelling")
        now = int(time.time())  # (if the cancel has already gone through, `finish` closed them: say so all the same)
        if self.message and self.message["status"] == "in_progress":
            self.message.update(status="incomplete", incomplete_at=now, incomplete_details={"reason": "run_cancelled"})
        if self.message and self.message["status"] == "incomplete":
            yield self.event("thread.message.incomplete", self.message)
        if self.step and self.step["status"] == "in_progress":
            self.step.update(status="cancelled", cancelled_at=now)
        if self.step and self.step["status"] == "cancelled":
            yield self.event("thread.run.step.cancelled", self.step)
        while self.run["status"] == "cancelling":
            timer = self.fake.timers.get(self.run["id"])
            if timer is None:
                self.fake.finish(self.run, "cancelled")
                break
            await anyio.sleep(max(0.0, timer[0] - time.monotonic()))
            self.fake.settle()
        yield self.run_event(self.run["status"])


class RunStream(EventStream):
    """A run's SSE. The run is produced by its own task, as on OpenAI's side: if the client hangs
    up, the run still goes on to its end (the handler waits for it, shielded from cancellation)."""

    def __init__(self, turn: RunTurn, events: Stream) -> None:
        self.source = events
        self.sink, receive = anyio.create_memory_object_stream[Any](math.inf)
        super().__init__(turn, receive)  # type: ignore[arg-type]

    async def produce(self) -> None:
        with anyio.CancelScope(shield=True):
            async with self.sink:
                async for event in self.source:
                    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                        self.sink.send_nowait(event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.produce)
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.body_iterator.close()  # type: ignore[attr-defined]


class FakeOpenAI:
    """In-memory state and the endpoints."""

    def __init__(self, fixtures: Path, delta_delay: float, cancel_delay: float = 0.2,
                 abandoned_run_seconds: float = 30.0) -> None:
        self.fixtures, self.delta_delay = fixtures, delta_delay
        self.cancel_delay, self.abandoned_run_seconds = cancel_delay, abandoned_run_seconds
        self.reset()

    def reset(self) -> None:
        self.conversations: dict[str, dict[str, Any]] = {}
        self.items: dict[str, list[dict[str, Any]]] = {}
        self.busy: dict[str, float] = {}  # conversation id -> locked until (time.monotonic)
        self.failures: dict[tuple[Any, ...], int] = {}  # fault:status turn -> errors served
        self.requests: list[dict[str, Any]] = []
        # Assistants API
        self.threads: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, list[dict[str, Any]]] = {}  # thread id -> its messages, oldest first
        self.runs: dict[str, dict[str, Any]] = {}  # run id -> run, oldest first
        self.steps: dict[str, list[dict[str, Any]]] = {}  # run id -> its steps, oldest first
        self.timers: dict[str, tuple[float, str, int]] = {}  # run id -> (monotonic deadline, status, at)
        self.submit_faults: dict[str, list[str]] = {}  # run id -> fault:submit-status arguments

    async def receive(self, request: Request, auth: bool = False) -> dict[str, Any]:
        """Record the request, check its key if asked; return its JSON object body ({} when empty)."""
        raw = await request.body()
        try:
            body, bad = (orjson.loads(raw) if raw else None), False
        except orjson.JSONDecodeError:
            body, bad = raw.decode("utf-8", "replace"), True
        self.requests.append({
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "headers": {k: v for k, v in request.headers.items() if k != "authorization"},
            "body": body,
        })
        key = request.headers.get("authorization", "")
        if auth and (not key.startswith("Bearer ") or not key[7:].strip()):
            raise APIError(401, NO_KEY)
        if bad or not isinstance(body, dict | None):
            raise APIError(400, BAD_JSON)
        return body or {}

    def delay(self, request: Request) -> float:
        """Seconds before each streamed delta: X-Fake-Delta-Delay, else FAKE_OPENAI_DELTA_DELAY."""
        try:
            return float(request.headers.get("x-fake-delta-delay", self.delta_delay))
        except ValueError:
            raise APIError(400, "fake_openai: bad X-Fake-Delta-Delay header") from None

    def conversation(self, conversation_id: Any, param: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(conversation_id, str) or conversation_id not in self.items:
            raise APIError(404, f"Conversation with id '{conversation_id}' not found.", param=param)
        return self.items[conversation_id]

    # -- Conversations API

    async def create_conversation(self, request: Request) -> Response:
        body = await self.receive(request)
        conversation = {"id": _id("conv"), "object": "conversation", "created_at": int(time.time()),
                        "metadata": body.get("metadata") or {}}
        self.items[conversation["id"]] = [_item(i) for i in body.get("items") or []]
        self.conversations[conversation["id"]] = conversation
        return _json(conversation)

    async def get_conversation(self, request: Request) -> Response:
        await self.receive(request)
        self.conversation(request.path_params["id"])
        return _json(self.conversations[request.path_params["id"]])

    async def list_items(self, request: Request) -> Response:
        await self.receive(request)
        return _paginate(self.conversation(request.path_params["id"]), request)

    async def add_items(self, request: Request) -> Response:
        body = await self.receive(request)
        items = self.conversation(request.path_params["id"])
        added = [_item(i) for i in body.get("items") or []]
        items.extend(added)
        return _page(added)

    # -- Responses API

    async def create_response(self, request: Request) -> Response:
        body = await self.receive(request, auth=True)
        if not body.get("model"):
            missing = "Missing required parameter: 'model'."
            raise APIError(400, missing, param="model", code="missing_required_parameter")
        conversation_id = body.get("conversation")
        if isinstance(conversation_id, dict):
            conversation_id = conversation_id.get("id")
        history = self.conversation(conversation_id, "conversation") if conversation_id else []
        if conversation_id and self.busy.get(conversation_id, 0) > time.monotonic():
            raise APIError(400, LOCKED, param="conversation", code="conversation_locked")
        given = body.get("input", [])
        if not isinstance(given, str | list):
            raise APIError(400, "Invalid type for 'input'.", param="input")
        new = [_item(given)] if isinstance(given, str) else [_item(i) for i in given]
        seen = history + new
        answered = {i.get("call_id") for i in seen if i.get("type") == "function_call_output"}
        for item in seen:
            if item.get("type") == "function_call" and item.get("call_id") not in answered:
                raise APIError(400, f"No tool output found for function call {item.get('call_id')}.", param="input")
        turn = Turn(self, body, conversation_id, self.delay(request))
        plan = self.plan(turn, seen, new)  # raises for fault:status, so a failed attempt leaves no input behind
        if conversation_id:
            history.extend(new)
            self.busy[conversation_id] = math.inf
        if body.get("stream"):
            return EventStream(turn, plan)
        try:
            final = None
            async for event in plan:
                if event is not CUT and event[0] in TERMINAL:  # type: ignore[index]
                    final = event[1]  # type: ignore[index]
        finally:
            turn.release()
        try:
            return _json(orjson.loads(final)["response"])  # type: ignore[arg-type]
        except (TypeError, orjson.JSONDecodeError, KeyError):
            raise APIError(500, STATUS_ERRORS[500][2], type="server_error") from None

    def plan(self, turn: Turn, seen: list[dict[str, Any]], new: list[dict[str, Any]]) -> Stream:
        """What "the model" does, from the last user message and this request's tool outputs."""
        users = [n for n, i in enumerate(seen) if i.get("type") == "message" and i.get("role") == "user"]
        user_at = users[-1] if users else -1
        text = _user_text(seen[user_at]) if user_at >= 0 else ""
        since = [i.get("type") == "function_call_output" for i in seen[user_at + 1 :]]
        rounds = sum(1 for n, out in enumerate(since) if out and (n == 0 or not since[n - 1]))
        outputs = [i for i in new if i.get("type") == "function_call_output"]

        if text.startswith("fixture:"):
            segments = self.fixture(text.splitlines()[0][len("fixture:") :].strip())
            if rounds < len(segments):
                return turn.replay(segments[rounds])
        if outputs:
            results = [o["output"] if isinstance(o.get("output"), str) else orjson.dumps(o.get("output")).decode()
                       for o in outputs]
            for line in text.splitlines():
                if line.startswith("slow-follow-up "):
                    try:
                        turn.delay = float(line.split()[1])
                    except (ValueError, IndexError):
                        raise APIError(400, f"fake_openai: bad directive {line!r}") from None
            return turn.model("Tool results: " + " | ".join(results))
        if text.startswith("tool:"):
            calls = [line[len("tool:") :].partition(" ") for line in text.splitlines() if line.startswith("tool:")]
            return turn.model(calls=[(name, args.strip() or "{}") for name, _, args in calls])
        if text.startswith("fault:"):
            try:
                return self.fault(turn, text, (turn.conversation, user_at, text))
            except (ValueError, IndexError):
                raise APIError(400, f"fake_openai: bad directive {text.splitlines()[0]!r}") from None
        return turn.model(f"You said: {text}")

    def fault(self, turn: Turn, text: str, key: tuple[Any, ...]) -> Stream:
        name, *args = text.splitlines()[0][len("fault:") :].split()
        echo = f"You said: {text}"
        if name == "status":
            self.status_fault(key, args)
            return turn.model("recovered")
        if name == "stall":
            return turn.model(echo, stall=float(args[0]))
        if name == "cut":
            return turn.model(echo, fault="eof" if args[:1] == ["eof"] else "cut")
        if name in ("malformed", "failed", "error-event", "incomplete"):
            return turn.model(echo, fault=name)
        if name == "slow":
            turn.delay = float(args[0])
            return turn.model(" ".join(f"word{n}" for n in range(int(args[1]))))
        if name == "locked":
            turn.hold = float(args[0])
            return turn.model(echo)
        raise ValueError(name)

    def status_fault(self, key: tuple[Any, ...], args: list[str], *, check_only: bool = False) -> None:
        """`<code> [retry-after] [xN]`: raise that HTTP error the first N times for `key` (or always)."""
        status = int(args[0])
        times = next((int(a[1:]) for a in args[1:] if a.startswith("x")), None)
        retry_after = next((a for a in args[1:] if not a.startswith("x")), None)
        float(retry_after or 0)  # a typo here must not pass silently
        if check_only:
            return
        if times is None or self.failures.get(key, 0) < times:
            self.failures[key] = self.failures.get(key, 0) + 1
            default = ("server_error" if status >= 500 else "invalid_request_error", None, f"Simulated {status}.")
            kind, code, message = STATUS_ERRORS.get(status, default)
            headers = {"Retry-After": retry_after} if retry_after else None
            raise APIError(status, message, type=kind, code=code, headers=headers)

    def fixture(self, name: str) -> list[list[Event]]:
        """A recorded stream as SSE events, split into responses (each starts at response.created)."""
        path = self.fixtures / Path(name).name
        if not name or not path.is_file():
            raise APIError(400, f"fake_openai: no fixture {name!r} in {self.fixtures}")
        segments: list[list[Event]] = []
        for line in path.read_bytes().split(b"\n"):
            line = line.rstrip(b"\r")
            if not line.strip():
                continue
            event = _event_name(line)
            if event == "response.created" or not segments:
                segments.append([])
            segments[-1].append((event, line))
        return segments

    # -- Assistants API (v2): threads, messages, runs, run steps

    async def receive_beta(self, request: Request) -> dict[str, Any]:
        """`receive` with the key and the `OpenAI-Beta: assistants=v2` header checked; timers settled."""
        body = await self.receive(request, auth=True)
        if "assistants=v2" not in request.headers.get("openai-beta", ""):
            raise APIError(400, BETA, code="invalid_beta")
        self.settle()
        return body

    def settle(self) -> None:
        """Apply the delayed status changes that are due (cancelling -> cancelled, abandoned -> expired...)."""
        now = time.monotonic()
        for run_id, (deadline, status, at) in list(self.timers.items()):
            if deadline <= now and run_id in self.runs:
                self.finish(self.runs[run_id], status, at=at)

    def later(self, run: dict[str, Any], seconds: float, status: str) -> None:
        self.timers[run["id"]] = (time.monotonic() + seconds, status, int(time.time() + seconds))

    def finish(self, run: dict[str, Any], status: str, at: int | None = None, **fields: Any) -> None:
        """A run's end, and the end of whatever of it was still open (steps, its message)."""
        at = at or int(time.time())
        self.timers.pop(run["id"], None)
        run.update(status=status, expires_at=None, required_action=None, **fields)
        stamp = {"completed": "completed_at", "failed": "failed_at", "cancelled": "cancelled_at"}.get(status)
        if stamp:
            run[stamp] = at
        if status in ("completed", "incomplete"):
            run["usage"] = self.usage(run)
        step_status = status if status in ("cancelled", "expired", "failed") else "completed"
        for step in self.steps.get(run["id"], []):
            if step["status"] == "in_progress":
                step.update(status=step_status, **{f"{step_status}_at": at})
        reason = {"cancelled": "run_cancelled", "expired": "run_expired", "failed": "run_failed"}.get(status)
        for message in self.messages.get(run["thread_id"], []):
            if message["run_id"] == run["id"] and message["status"] == "in_progress":
                if reason:
                    message.update(status="incomplete", incomplete_at=at, incomplete_details={"reason": reason})
                else:
                    message.update(status="completed", completed_at=at)

    def usage(self, run: dict[str, Any], step: dict[str, Any] | None = None) -> dict[str, int]:
        """Rough token counts (a quarter of the JSON's length) of the thread before the run and of what it made."""
        messages = self.messages[run["thread_id"]]
        prompt = len(orjson.dumps([m["content"] for m in messages if m["run_id"] != run["id"]])) // 4
        if step is None:
            made: Any = [m["content"] for m in messages if m["run_id"] == run["id"]]
            made += [s["step_details"] for s in self.steps.get(run["id"], []) if s["type"] == "tool_calls"]
        elif step["type"] == "message_creation":
            made = [m["content"] for m in messages if m["id"] == step["step_details"]["message_creation"]["message_id"]]
        else:
            made = step["step_details"]
        completion = len(orjson.dumps(made)) // 4
        return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}

    def abandon(self, run: dict[str, Any]) -> None:
        """A turn that crashed mid-stream: its run stays in_progress (blocking the thread), then expires."""
        self.later(run, self.abandoned_run_seconds, "expired")

    def hidden_run(self, beside: dict[str, Any], seconds: float) -> dict[str, Any]:
        """fault:active: another run, never streamed, active on the thread for `seconds` (unless cancelled)."""
        run = self.new_run(beside["thread_id"], beside["assistant_id"], {}, "run_hidden_" + secrets.token_hex(12))
        run.update(status="in_progress", started_at=int(time.time()))
        self.later(run, seconds, "completed")
        return run

    def thread(self, thread_id: str) -> dict[str, Any]:
        if thread_id not in self.threads:
            raise APIError(404, f"No thread found with id '{thread_id}'.")
        return self.threads[thread_id]

    def find_run(self, request: Request) -> dict[str, Any]:
        thread_id, run_id = request.path_params["thread_id"], request.path_params["run_id"]
        self.thread(thread_id)
        run = self.runs.get(run_id)
        if run is None or run["thread_id"] != thread_id:
            raise APIError(404, f"No run found with id '{run_id}'.")
        return run

    def active_run(self, thread_id: str) -> dict[str, Any] | None:
        return next((r for r in self.runs.values() if r["thread_id"] == thread_id and r["status"] in ACTIVE), None)

    def new_message(self, thread_id: str, role: str, content: list[dict[str, Any]], *, id: str | None = None,
                    status: str = "completed", run: dict[str, Any] | None = None,
                    attachments: list[Any] | None = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        message = {
            "id": id or _id("msg"), "object": "thread.message", "created_at": int(time.time()),
            "assistant_id": run["assistant_id"] if run else None, "thread_id": thread_id,
            "run_id": run["id"] if run else None, "role": role, "content": content,
            "attachments": attachments or [], "metadata": metadata or {}, "status": status,
            "incomplete_details": None, "completed_at": None, "incomplete_at": None,
        }
        self.messages[thread_id].append(message)
        return message

    def new_run(self, thread_id: str, assistant_id: str, body: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
        now = int(time.time())

        def given(name: str, default: Any) -> Any:
            return default if body.get(name) is None else body[name]

        instructions = "\n\n".join(i for i in (body.get("instructions"), body.get("additional_instructions")) if i)
        run = {
            "id": run_id or _id("run"), "object": "thread.run", "created_at": now,
            "assistant_id": assistant_id, "thread_id": thread_id, "status": "queued",
            "started_at": None, "expires_at": now + RUN_TTL, "cancelled_at": None, "failed_at": None,
            "completed_at": None, "required_action": None, "last_error": None, "incomplete_details": None,
            "model": given("model", DEFAULT_RUN_MODEL), "instructions": instructions,
            "tools": given("tools", []), "metadata": given("metadata", {}),
            "temperature": given("temperature", 1.0), "top_p": given("top_p", 1.0),
            "max_completion_tokens": body.get("max_completion_tokens"),
            "max_prompt_tokens": body.get("max_prompt_tokens"),
            "truncation_strategy": given("truncation_strategy", {"type": "auto", "last_messages": None}),
            "response_format": given("response_format", "auto"), "tool_choice": given("tool_choice", "auto"),
            "parallel_tool_calls": given("parallel_tool_calls", True),
            "reasoning_effort": body.get("reasoning_effort"), "usage": None,
        }
        self.runs[run["id"]] = run
        self.steps[run["id"]] = []
        return run

    async def create_thread(self, request: Request) -> Response:
        body = await self.receive_beta(request)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise APIError(400, "Invalid type for 'messages': expected an array.", param="messages")
        given = [_message_input(m, f"messages[{n}].") for n, m in enumerate(messages)]
        thread = {"id": _id("thread"), "object": "thread", "created_at": int(time.time()),
                  "metadata": body.get("metadata") or {}, "tool_resources": body.get("tool_resources") or {}}
        self.threads[thread["id"]] = thread
        self.messages[thread["id"]] = []
        for message in given:
            self.new_message(thread["id"], **message)
        return _json(thread)

    async def get_assistant(self, request: Request) -> Response:
        """Any `asst_...` exists, with a code interpreter as its own (hosted) tool."""
        await self.receive_beta(request)
        assistant_id = request.path_params["assistant_id"]
        if not assistant_id.startswith("asst_"):
            raise APIError(404, f"No assistant found with id '{assistant_id}'.")
        return _json({
            "id": assistant_id, "object": "assistant", "created_at": int(time.time()), "name": "fake",
            "description": None, "model": "gpt-4o", "instructions": None, "tools": [{"type": "code_interpreter"}],
            "tool_resources": {}, "metadata": {}, "temperature": 1.0, "top_p": 1.0, "response_format": "auto",
        })

    async def get_thread(self, request: Request) -> Response:
        await self.receive_beta(request)
        return _json(self.thread(request.path_params["thread_id"]))

    async def create_message(self, request: Request) -> Response:
        body = await self.receive_beta(request)
        thread_id = request.path_params["thread_id"]
        self.thread(thread_id)
        given = _message_input(body)
        if run := self.active_run(thread_id):
            raise APIError(400, f"Can't add messages to {thread_id} while a run {run['id']} is active.")
        return _json(self.new_message(thread_id, **given))

    async def list_messages(self, request: Request) -> Response:
        await self.receive_beta(request)
        thread_id = request.path_params["thread_id"]
        self.thread(thread_id)
        messages = self.messages[thread_id]
        if run_id := request.query_params.get("run_id"):
            messages = [m for m in messages if m["run_id"] == run_id]
        return _paginate(messages, request)

    async def get_message(self, request: Request) -> Response:
        await self.receive_beta(request)
        thread_id, message_id = request.path_params["thread_id"], request.path_params["message_id"]
        self.thread(thread_id)
        message = next((m for m in self.messages[thread_id] if m["id"] == message_id), None)
        if message is None:
            raise APIError(404, f"No message found with id '{message_id}'.")
        return _json(message)

    async def create_run(self, request: Request) -> Response:
        body = await self.receive_beta(request)
        thread_id = request.path_params["thread_id"]
        self.thread(thread_id)
        assistant_id = body.get("assistant_id")
        if not assistant_id:
            missing = "Missing required parameter: 'assistant_id'."
            raise APIError(400, missing, param="assistant_id", code="missing_required_parameter")
        if not isinstance(assistant_id, str) or not assistant_id.startswith("asst_"):
            raise APIError(404, f"No assistant found with id '{assistant_id}'.", param="assistant_id")
        extra = body.get("additional_messages") or []
        if not isinstance(extra, list):
            raise APIError(400, "Invalid type for 'additional_messages': expected an array.", param="additional_messages")
        new = [_message_input(m, f"additional_messages[{n}].") for n, m in enumerate(extra)]
        if run := self.active_run(thread_id):
            raise APIError(400, f"Thread {thread_id} already has an active run {run['id']}.")

        seen = [(m["role"], _message_text(m["content"])) for m in self.messages[thread_id]]
        seen += [(m["role"], _message_text(m["content"])) for m in new]
        include = request.query_params.getlist("include[]") + request.query_params.getlist("include")
        delay = self.delay(request)
        run: dict[str, Any] = self.new_run(thread_id, assistant_id, body)
        turn = RunTurn(self, run, delay, include)
        try:
            plan = self.run_plan(turn, seen)
        except APIError:  # fault:status, a bad directive: the failed attempt leaves nothing behind
            del self.runs[run["id"]], self.steps[run["id"]]
            raise
        for message in new:
            self.new_message(thread_id, **message)
        return await self.run_response(body, turn, plan, "thread.run.created")

    def run_plan(self, turn: RunTurn, seen: list[tuple[str, str]]) -> Stream:
        """What "the model" does in a new run, from the thread's last user message."""
        users = [n for n, (role, _) in enumerate(seen) if role == "user"]
        user_at = users[-1] if users else -1
        text = seen[user_at][1] if users else ""
        line = text.splitlines()[0] if text else ""
        if text.startswith("fixture:"):
            raise APIError(400, "fake_openai: fixture: replays Responses API streams; runs cannot replay them")
        if text.startswith("tool:"):
            calls = [line[len("tool:") :].partition(" ") for line in text.splitlines() if line.startswith("tool:")]
            return turn.script(calls=[(name, args.strip() or "{}") for name, _, args in calls])
        if text.startswith("hosted:"):
            kind = line[len("hosted:") :].strip()
            if kind not in HOSTED:
                raise APIError(400, f"fake_openai: bad directive {line!r}")
            return turn.script("hosted tool done", hosted=kind)
        if text.startswith("fault:"):
            try:
                return self.run_fault(turn, text, ("run", turn.run["thread_id"], user_at, text))
            except (ValueError, IndexError):
                raise APIError(400, f"fake_openai: bad directive {line!r}") from None
        return turn.script(f"You said: {text}")

    def run_fault(self, turn: RunTurn, text: str, key: tuple[Any, ...]) -> Stream:
        name, *args = text.splitlines()[0][len("fault:") :].split()
        echo = f"You said: {text}"
        if name == "status":
            self.status_fault(key, args)
            return turn.script("recovered")
        if name == "submit-status":
            self.status_fault(key, args, check_only=True)
            self.submit_faults[turn.run["id"]] = args
            return turn.script(calls=[SUBMIT_FAULT_CALL])
        if name in ("failed", "expired", "incomplete"):
            return turn.script(echo, fault=name)
        if name == "cut":
            return turn.script(echo, fault="eof" if args[:1] == ["eof"] else "cut")
        if name == "slow":
            turn.delay = float(args[0])
            return turn.script(" ".join(f"word{n}" for n in range(int(args[1]))))
        if name == "stall":
            return turn.script(echo, stall=float(args[0]))
        if name == "active":
            return turn.script(echo, hidden=float(args[0]))
        raise ValueError(name)

    async def run_response(self, body: dict[str, Any], turn: RunTurn, plan: Stream, first: str) -> Response:
        """SSE if asked to stream; else the run goes to its end first and the answer is the run as
        `first` showed it (queued), as OpenAI answers before it works on the run."""
        if body.get("stream"):
            return RunStream(turn, plan)
        snapshot = None
        async for event in plan:
            if event is not CUT and snapshot is None and event[0] == first:  # type: ignore[index]
                snapshot = event[1]  # type: ignore[index]
        return Response(snapshot, media_type="application/json")

    async def list_runs(self, request: Request) -> Response:
        await self.receive_beta(request)
        thread_id = request.path_params["thread_id"]
        self.thread(thread_id)
        return _paginate([r for r in self.runs.values() if r["thread_id"] == thread_id], request)

    async def get_run(self, request: Request) -> Response:
        await self.receive_beta(request)
        return _json(self.find_run(request))

    async def list_steps(self, request: Request) -> Response:
        await self.receive_beta(request)
        return _paginate(self.steps[self.find_run(request)["id"]], request)

    async def get_step(self, request: Request) -> Response:
        await self.receive_beta(request)
        step_id = request.path_params["step_id"]
        step = next((s for s in self.steps[self.find_run(request)["id"]] if s["id"] == step_id), None)
        if step is None:
            raise APIError(404, f"No run step found with id '{step_id}'.")
        return _json(step)

    async def submit_tool_outputs(self, request: Request) -> Response:
        body = await self.receive_beta(request)
        run = self.find_run(request)
        if run["status"] != "requires_action":
            raise APIError(400, f'Runs in status "{run["status"]}" do not accept tool outputs.')
        if run["id"] in self.submit_faults:
            self.status_fault(("submit", run["id"]), self.submit_faults[run["id"]])
        outputs = body.get("tool_outputs")
        if not isinstance(outputs, list):
            missing = "Missing required parameter: 'tool_outputs'."
            raise APIError(400, missing, param="tool_outputs", code="missing_required_parameter")
        for n, output in enumerate(outputs):
            if not isinstance(output, dict) or not isinstance(output.get("output"), str):
                raise APIError(400, f"Invalid type for 'tool_outputs[{n}].output': expected a string.",
                               param=f"tool_outputs[{n}].output", code="invalid_type")
        required = [c["id"] for c in run["required_action"]["submit_tool_outputs"]["tool_calls"]]
        got = [o.get("tool_call_id") for o in outputs]
        if len(got) != len(set(got)) or set(got) != set(required):
            raise APIError(400, f"Expected tool outputs for call_ids {required}, got {got}", param="tool_outputs")

        turn = RunTurn(self, run, self.delay(request))
        turn.step = next(s for s in reversed(self.steps[run["id"]]) if s["type"] == "tool_calls")
        run.update(status="queued", required_action=None)
        text = "Tool results: " + " | ".join(o["output"] for o in outputs)
        plan = turn.script(text, outputs={o["tool_call_id"]: o["output"] for o in outputs})
        return await self.run_response(body, turn, plan, "thread.run.queued")

    async def cancel_run(self, request: Request) -> Response:
        await self.receive_beta(request)
        run = self.find_run(request)
        if run["status"] not in ACTIVE:
            raise APIError(400, f"Cannot cancel run with status '{run['status']}'.")
        if run["status"] != "cancelling":
            run["status"] = "cancelling"
            self.later(run, self.cancel_delay, "cancelled")
        return _json(run)

    # -- test controls

    async def list_requests(self, request: Request) -> Response:
        return _json(self.requests)

    async def thread_state(self, request: Request) -> Response:
        """A thread as the fake holds it: the thread, its messages and runs (oldest first), their steps."""
        self.settle()
        thread_id = request.path_params["thread_id"]
        if thread_id not in self.threads:
            return _json({"error": {"message": f"No thread found with id '{thread_id}'.", "type": "invalid_request_error",
                                    "param": None, "code": None}}, 404)
        runs = [r for r in self.runs.values() if r["thread_id"] == thread_id]
        active = self.active_run(thread_id)
        return _json({"thread": self.threads[thread_id], "messages": self.messages[thread_id], "runs": runs,
                      "steps": {r["id"]: self.steps[r["id"]] for r in runs},
                      "active_run": active["id"] if active else None})

    async def reset_state(self, request: Request) -> Response:
        self.reset()
        return _json({"ok": True})

    async def health(self, request: Request) -> Response:
        return _json({"ok": True})


def _paginate(items: list[dict[str, Any]], request: Request) -> Response:
    """A list endpoint's page: `order` (desc by default), `after`, `before`, `limit` (20)."""
    query = request.query_params
    data = items[::-1] if query.get("order", "desc") == "desc" else list(items)
    if after := query.get("after"):
        ids = [i["id"] for i in data]
        data = data[ids.index(after) + 1 :] if after in ids else []
    if before := query.get("before"):
        ids = [i["id"] for i in data]
        data = data[: ids.index(before)] if before in ids else []
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        raise APIError(400, "Invalid 'limit': expected an integer.", param="limit") from None
    return _page(data[:limit], has_more=len(data) > limit)


def _page(data: list[dict[str, Any]], has_more: bool = False) -> Response:
    return _json({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    })


def create_app(fixtures_dir: str | Path | None = None, delta_delay: float | None = None,
               cancel_delay: float | None = None, abandoned_run_seconds: float | None = None) -> Starlette:
    """A fresh fake with empty state; defaults come from FIXTURES_DIR, FAKE_OPENAI_DELTA_DELAY,
    FAKE_CANCEL_DELAY (0.2) and FAKE_ABANDONED_RUN_SECONDS (30)."""
    if delta_delay is None:
        delta_delay = float(os.environ.get("FAKE_OPENAI_DELTA_DELAY", "0"))
    if cancel_delay is None:
        cancel_delay = float(os.environ.get("FAKE_CANCEL_DELAY", "0.2"))
    if abandoned_run_seconds is None:
        abandoned_run_seconds = float(os.environ.get("FAKE_ABANDONED_RUN_SECONDS", "30"))
    fake = FakeOpenAI(Path(fixtures_dir) if fixtures_dir else _default_fixtures(), delta_delay,
                      cancel_delay, abandoned_run_seconds)
    routes = [
        Route("/v1/conversations", fake.create_conversation, methods=["POST"]),
        Route("/v1/conversations/{id}", fake.get_conversation, methods=["GET"]),
        Route("/v1/conversations/{id}/items", fake.list_items, methods=["GET"]),
        Route("/v1/conversations/{id}/items", fake.add_items, methods=["POST"]),
        Route("/v1/responses", fake.create_response, methods=["POST"]),
        Route("/v1/assistants/{assistant_id}", fake.get_assistant, methods=["GET"]),
        Route("/v1/threads", fake.create_thread, methods=["POST"]),
        Route("/v1/threads/{thread_id}", fake.get_thread, methods=["GET"]),
        Route("/v1/threads/{thread_id}/messages", fake.create_message, methods=["POST"]),
        Route("/v1/threads/{thread_id}/messages", fake.list_messages, methods=["GET"]),
        Route("/v1/threads/{thread_id}/messages/{message_id}", fake.get_message, methods=["GET"]),
        Route("/v1/threads/{thread_id}/runs", fake.create_run, methods=["POST"]),
        Route("/v1/threads/{thread_id}/runs", fake.list_runs, methods=["GET"]),
        Route("/v1/threads/{thread_id}/runs/{run_id}", fake.get_run, methods=["GET"]),
        Route("/v1/threads/{thread_id}/runs/{run_id}/cancel", fake.cancel_run, methods=["POST"]),
        Route("/v1/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", fake.submit_tool_outputs, methods=["POST"]),
        Route("/v1/threads/{thread_id}/runs/{run_id}/steps", fake.list_steps, methods=["GET"]),
        Route("/v1/threads/{thread_id}/runs/{run_id}/steps/{step_id}", fake.get_step, methods=["GET"]),
        Route("/_fake/threads/{thread_id}", fake.thread_state, methods=["GET"]),
        Route("/_fake/requests", fake.list_requests, methods=["GET"]),
        Route("/_fake/reset", fake.reset_state, methods=["POST"]),
        Route("/_fake/health", fake.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error})
    app.state.fake = fake
    return app


app = create_app()

"""A fake OpenAI (Responses + Conversations API) for end-to-end tests.

The service under test talks to this instead of api.openai.com. "The model" is deterministic:
what it answers depends on the last user message (echo, `tool:`, `fixture:`, `fault:` directives),
so a test picks the upstream behaviour it needs by what it types. Run it with
`hypercorn tests.fake_openai:app --bind 127.0.0.1:PORT` from the repo root.
"""

from __future__ import annotations

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


class FakeOpenAI:
    """In-memory state and the endpoints."""

    def __init__(self, fixtures: Path, delta_delay: float) -> None:
        self.fixtures, self.delta_delay = fixtures, delta_delay
        self.reset()

    def reset(self) -> None:
        self.conversations: dict[str, dict[str, Any]] = {}
        self.items: dict[str, list[dict[str, Any]]] = {}
        self.busy: dict[str, float] = {}  # conversation id -> locked until (time.monotonic)
        self.failures: dict[tuple[Any, ...], int] = {}  # fault:status turn -> errors served
        self.requests: list[dict[str, Any]] = []

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
        items = self.conversation(request.path_params["id"])
        query = request.query_params
        data = items[::-1] if query.get("order", "desc") == "desc" else list(items)
        if after := query.get("after"):
            ids = [i["id"] for i in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        try:
            limit = int(query.get("limit", 20))
        except ValueError:
            raise APIError(400, "Invalid 'limit': expected an integer.", param="limit") from None
        return _page(data[:limit], has_more=len(data) > limit)

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
        try:
            delay = float(request.headers.get("x-fake-delta-delay", self.delta_delay))
        except ValueError:
            raise APIError(400, "fake_openai: bad X-Fake-Delta-Delay header") from None

        turn = Turn(self, body, conversation_id, delay)
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
            status = int(args[0])
            times = next((int(a[1:]) for a in args[1:] if a.startswith("x")), None)
            retry_after = next((a for a in args[1:] if not a.startswith("x")), None)
            float(retry_after or 0)  # a typo here must not pass silently
            if times is None or self.failures.get(key, 0) < times:
                self.failures[key] = self.failures.get(key, 0) + 1
                default = ("server_error" if status >= 500 else "invalid_request_error", None, f"Simulated {status}.")
                kind, code, message = STATUS_ERRORS.get(status, default)
                headers = {"Retry-After": retry_after} if retry_after else None
                raise APIError(status, message, type=kind, code=code, headers=headers)
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

    # -- test controls

    async def list_requests(self, request: Request) -> Response:
        return _json(self.requests)

    async def reset_state(self, request: Request) -> Response:
        self.reset()
        return _json({"ok": True})

    async def health(self, request: Request) -> Response:
        return _json({"ok": True})


def _page(data: list[dict[str, Any]], has_more: bool = False) -> Response:
    return _json({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    })


def create_app(fixtures_dir: str | Path | None = None, delta_delay: float | None = None) -> Starlette:
    """A fresh fake with empty state; defaults come from FIXTURES_DIR and FAKE_OPENAI_DELTA_DELAY."""
    if delta_delay is None:
        delta_delay = float(os.environ.get("FAKE_OPENAI_DELTA_DELAY", "0"))
    fake = FakeOpenAI(Path(fixtures_dir) if fixtures_dir else _default_fixtures(), delta_delay)
    routes = [
        Route("/v1/conversations", fake.create_conversation, methods=["POST"]),
        Route("/v1/conversations/{id}", fake.get_conversation, methods=["GET"]),
        Route("/v1/conversations/{id}/items", fake.list_items, methods=["GET"]),
        Route("/v1/conversations/{id}/items", fake.add_items, methods=["POST"]),
        Route("/v1/responses", fake.create_response, methods=["POST"]),
        Route("/_fake/requests", fake.list_requests, methods=["GET"]),
        Route("/_fake/reset", fake.reset_state, methods=["POST"]),
        Route("/_fake/health", fake.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error})
    app.state.fake = fake
    return app


app = create_app()

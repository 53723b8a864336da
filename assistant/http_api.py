"""The HTTP endpoints and the JSON shape of every error they give."""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from .chat_request import THREAD_ID, check_idempotency_key, check_run_id, parse_chat_request
from .errors import (
    BadRequest,
    ClientGone,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    UnsupportedMediaType,
    log_refusal,
)
from .middleware import is_bare_root_path, send_refusal
from .orchestrator import run_answer, wait_until_accepted
from .run_log import RunLog
from .sse_stream_handler import KEEPALIVE, SSE_HEADERS, SSEResponse, frame_error, frame_retry
from .timeouts import MoveOn

logger = logging.getLogger("assistant.http")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: object) -> bytes:
        return orjson.dumps(content)


class Endpoint:
    """An endpoint as a plain ASGI app (what Starlette's `Route` and `WebSocketRoute` make of a
    function, less their per-route exception layer). The app-wide layer (ExceptionMiddleware)
    maps errors with the same handlers; a second one would wrap every send of a stream, each
    delta's, and hold ~1.7 KiB more per open stream (~1 KiB per open WebSocket).

    An HTTP endpoint takes the Request and returns the Response; a WebSocket one takes the
    WebSocket and returns when the connection is done."""

    def __init__(self, func: Callable[[Request], Awaitable[Response]] | Callable[[WebSocket], Awaitable[None]]) -> None:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"{func!r} is not an async function")  # no thread pool behind this
        self.func = func
        self.__name__ = func.__name__  # the route's name, for url_path_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.func(WebSocket(scope, receive, send))  # type: ignore[arg-type]
            return
        response = await self.func(Request(scope, receive, send))  # type: ignore[arg-type]
        await response(scope, receive, send)  # type: ignore[misc]


def correlation_id(request: Request) -> str:
    return request.scope["state"]["correlation_id"]


# For what must never be reused from a cache: a thread id handed out by GET /start (one
# client's thread served to the next), a health or an error from another moment, a 204 "all sent".
NO_STORE = {"cache-control": "no-store"}
# For what may be kept but must be checked with the service first (a 304 when unchanged).
NO_CACHE = {"cache-control": "no-cache"}


def error_response(error: ServiceError, request: Request) -> JSONResponse:
    headers = dict(NO_STORE)
    if error.retry_after_seconds is not None:
        headers["retry-after"] = str(error.retry_after_seconds)
    return JSONResponse(error.payload(correlation_id(request)), status_code=error.status_code, headers=headers)


def log_service_error(error: ServiceError) -> None:
    if isinstance(error, ClientGone):
        logger.info(error.message)
    elif error.status_code >= 500:
        logger.warning("request failed with %s: %s", error.type, error.message)
    else:
        log_refusal(error)


async def handle_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    log_service_error(exc)
    return error_response(exc, request)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404 and request.method in ("GET", "HEAD") and is_bare_root_path(request.scope):
        # `/prefix` under `--root-path /prefix`: the chat page is at `/prefix/` (its URLs are relative).
        return RedirectResponse(request.scope["root_path"] + "/", headers=NO_STORE)
    if exc.status_code == 404:
        error: ServiceError = NotFound(f"no route for {request.method} {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = ServiceError(str(exc.detail), type="http_error", status_code=exc.status_code)
    log_refusal(error)
    response = error_response(error, request)
    response.headers.update(exc.headers or {})  # a 405's Allow
    return response


async def handle_unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    response = error_response(ServiceError("the service failed to handle this request"), request)
    # Starlette answers from its outermost layer, outside the middleware that adds this header.
    response.headers["x-correlation-id"] = correlation_id(request)
    return response


def one_header(request: Request, name: str) -> str | None:
    """A header that takes one value. Sent again with another value, which one the client meant
    is unknown (and a proxy may read the other), so the request is refused."""
    values = request.headers.getlist(name)
    if len(set(values)) > 1:
        raise BadRequest(f"the {name} header was sent {len(values)} times with different values; send it once")
    return values[0] if values else None


async def read_json_body(request: Request, max_bytes: int, idle_seconds: float) -> object:
    """The request's JSON body, read no further than `max_bytes`, from a client that never goes
    `idle_seconds` without sending some of it (one that stops half-way would hold its connection
    for ever: hypercorn's own read timeout would also cut every open stream)."""
    content_type = (one_header(request, "Content-Type") or "").split(";")[0].strip().lower()
    if content_type and content_type != "application/json" and not content_type.endswith("+json"):
        raise UnsupportedMediaType(f"send the body as application/json, not {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the body is {declared} bytes; the limit is {max_bytes} (MAX_BODY_BYTES)")
    chunks = []
    size = 0
    try:
        async with MoveOn(time.monotonic() + idle_seconds) as idle:  # moved on with each chunk
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"the body is over the limit of {max_bytes} bytes (MAX_BODY_BYTES)")
                chunks.append(chunk)
                idle.reschedule(time.monotonic() + idle_seconds)
    except ClientDisconnect:
        raise ClientGone("the client hung up while sending its request") from None
    if idle.expired():
        raise RequestTimeout(f"the client sent none of the rest of its body for {idle_seconds:g} s "
                             "(SLOW_CLIENT_TIMEOUT_SECONDS)")
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("the body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None


STATIC_DIR = Path(__file__).parent / "static"


class RevalidatedStaticFiles(StaticFiles):
    """The chat page's script and styles, checked with the service on each use (a 304 when
    unchanged): a browser never runs a cached old script against a newer service."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


async def chat_page(request: Request) -> Response:
    """The reference chat client; its URLs are relative, so it works under a path prefix."""
    return FileResponse(STATIC_DIR / "index.html", headers=NO_CACHE)


async def health(request: Request) -> Response:
    """503 once the service takes no new turns (shutting down), so a load balancer moves on."""
    if not request.app.state.runs.accepting:
        return JSONResponse({"status": "shutting_down"}, status_code=503, headers=NO_STORE)
    return JSONResponse({"status": "ok"}, headers=NO_STORE)


async def create_thread(request: Request) -> Response:
    if request.method == "HEAD":  # Starlette adds HEAD to a GET route: a link checker would make threads
        raise HTTPException(405, headers={"Allow": "GET"})
    state = request.app.state
    thread_id = await state.runs.engine.create_thread()
    return JSONResponse(
        {
            "thread_id": thread_id,
            "initial_message": state.settings.initial_message,
            "correlation_id": correlation_id(request),
        },
        headers=NO_STORE,
    )


def wants_event_stream(request: Request) -> bool:
    """`text/event-stream` among the Accept header's media ranges (in any case), unless its
    `q=0` says the client refuses it."""
    for media_range in ",".join(request.headers.getlist("accept")).split(","):  # one list, however many lines
        media_type, *parameters = media_range.split(";")
        if media_type.strip().lower() != "text/event-stream":
            continue
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                return value.strip() not in ("0", "0.", "0.0", "0.00", "0.000")
        return True
    return False


EVENT_POSITION = re.compile(r"[0-9]{1,18}")


def parse_event_id(value: str) -> tuple[str, int]:
    """`<run_id>:<n>`, as the service's event ids are written."""
    run_id, _, position = value.strip().rpartition(":")
    if not THREAD_ID.fullmatch(run_id) or not EVENT_POSITION.fullmatch(position):
        # Echo only a prefix: a WebSocket client that does not read would otherwise have
        # MAX_NOTICES error frames each holding its whole (MAX_BODY_BYTES) value kept for it.
        shown = value if len(value) <= 160 else value[:160] + "..."
        raise BadRequest(f"{shown!r} is not an event id of this service (they look like 'run_...:12')")
    return run_id, int(position)


def event_stream(
    request: Request, log: RunLog, after: int = 0, *, resumed: bool = False, head_sent: bool = False
) -> SSEResponse:
    settings = request.app.state.settings
    return SSEResponse(
        log,
        after=after,
        resumed=resumed,
        heartbeat_seconds=settings.sse_heartbeat_seconds,
        retry_ms=settings.sse_retry_ms,
        slow_client_timeout_seconds=settings.slow_client_timeout_seconds,
        head_sent=head_sent,
    )


async def chat(request: Request) -> Response:
    state = request.app.state
    settings = state.settings
    data = await read_json_body(request, settings.max_body_bytes, settings.slow_client_timeout_seconds)
    thread_id, message = parse_chat_request(data, max_message_chars=settings.max_message_chars)
    last_event_id = one_header(request, "Last-Event-ID")
    if last_event_id:
        return await resume_chat(request, thread_id, last_event_id)
    key = one_header(request, "Idempotency-Key")
    if key is not None:
        key = check_idempotency_key(key)
        earlier = state.runs.keyed_run(thread_id, key, message)
        if earlier is not None:  # sent again: the run the first one started, from its start
            if wants_event_stream(request):  # a run refused at once answers as it did the first time
                await wait_until_accepted(earlier, earlier.started + settings.sse_heartbeat_seconds)
                return resumed_stream(request, state.runs.resumable(earlier.run_id, 0), 0, resumed=True)
            return JSONResponse(await run_answer(earlier, correlation_id(request)))
    if wants_event_stream(request) and state.runs.thread_busy(thread_id):
        return StreamAfterThreadWait(request, thread_id, message, key)  # type: ignore[return-value]
    log = await start_run(request, thread_id, message, key)
    if wants_event_stream(request):
        await wait_until_accepted(log, log.started + settings.sse_heartbeat_seconds)
        return event_stream(request, log)  # type: ignore[return-value]
    return JSONResponse(await run_answer(log, correlation_id(request)))


class StreamAfterThreadWait:
    """A streamed message on a busy thread. It waits for the thread as any message does, but
    its client never goes without a byte for longer than SSE_HEARTBEAT_SECONDS (a proxy or a
    platform's router cuts a response whose head is late; curl would show nothing): from then
    on the stream's head and keepalive comments go out while it waits, and a wait that fails
    (`thread_busy` after THREAD_LOCK_TIMEOUT_SECONDS, `shutting_down`) ends the stream with an
    `error` event instead of a plain HTTP error. A shorter wait is answered as on a free thread."""

    def __init__(self, request: Request, thread_id: str, message: str, key: str | None) -> None:
        self.request = request
        self.thread_id = thread_id
        self.message = message
        self.key = key
        self.head_sent = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self.request
        settings = request.app.state.settings
        head_due = time.monotonic() + settings.sse_heartbeat_seconds

        async def keep_alive() -> None:
            body = frame_retry(settings.sse_retry_ms) + KEEPALIVE
            while True:
                await anyio.sleep(settings.sse_heartbeat_seconds)
                with anyio.CancelScope(shield=True):  # a head or comment goes out whole
                    if not self.head_sent:
                        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                        self.head_sent = True
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                body = KEEPALIVE

        try:
            log = await start_run(request, self.thread_id, self.message, self.key, while_waiting=keep_alive)
        except ServiceError as error:
            if not self.head_sent:
                raise
            log_service_error(error)
            if not isinstance(error, ClientGone):
                await send({"type": "http.response.body", "body": frame_error(error, correlation_id(request)),
                            "more_body": False})
            return
        if self.head_sent:
            log.head_deadline = log.started  # the head went out before the run began
        else:
            await wait_until_accepted(log, head_due)
        await event_stream(request, log, head_sent=self.head_sent)(scope, receive, send)


async def start_run(
    request: Request,
    thread_id: str,
    message: str,
    key: str | None = None,
    *,
    while_waiting: Callable[[], Awaitable[None]] | None = None,
) -> RunLog:
    """Start the message's run. While it waits for a busy thread, `while_waiting` runs beside
    it, and a client that hangs up gets no run: nothing goes upstream for a client that could
    neither read nor stop it."""
    runs = request.app.state.runs
    if not runs.thread_busy(thread_id):
        return await runs.start_run(thread_id, message, correlation_id(request), key)
    started: RunLog | ServiceError | None = None
    client_left = False

    async def watch_client() -> None:
        nonlocal client_left
        while (await request.receive())["type"] != "http.disconnect":
            pass
        client_left = True
        task_group.cancel_scope.cancel()

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(watch_client)
        if while_waiting is not None:
            task_group.start_soon(while_waiting)
        try:
            started = await runs.start_run(thread_id, message, correlation_id(request), key)
        except ServiceError as exc:  # raised in the task group, it would come out wrapped in a group
            started = exc
        task_group.cancel_scope.cancel()
    # The disconnect can come in the very step the thread is handed over: the run then started,
    # but the one disconnect message is taken, and a stream would not see its client leave.
    if started is None or client_left:
        raise ClientGone("the client hung up while its message waited for the thread")
    if isinstance(started, ServiceError):
        raise started
    return started


async def resume_chat(request: Request, thread_id: str, last_event_id: str) -> Response:
    """The same POST sent again with Last-Event-ID: the run it started, not a new one."""
    run_id, after = parse_event_id(last_event_id)
    log = request.app.state.runs.resumable(run_id, after)
    if log.thread_id != thread_id:
        raise BadRequest(f"run {run_id!r} belongs to another thread")
    if wants_event_stream(request):
        return resumed_stream(request, log, after, resumed=True)
    return JSONResponse(await run_answer(log, correlation_id(request)))


def resumed_stream(request: Request, log: RunLog, after: int, *, resumed: bool) -> Response:
    if log.finished and after >= log.last_seq:
        return Response(status_code=204, headers=NO_STORE)  # all delivered: this also stops EventSource reconnecting
    return event_stream(request, log, after, resumed=resumed)  # type: ignore[return-value]


async def stream_run(request: Request) -> Response:
    """GET /chat/stream/{run_id}: a run's events, from the start or after Last-Event-ID (EventSource)."""
    run_id = check_run_id(request.path_params["run_id"])
    after = 0
    last_event_id = one_header(request, "Last-Event-ID") or request.query_params.get("last_event_id")
    if last_event_id:
        resumed_run, after = parse_event_id(last_event_id)
        if resumed_run != run_id:
            raise BadRequest(f"Last-Event-ID {last_event_id!r} is not an event of run {run_id!r}")
    return resumed_stream(request, request.app.state.runs.resumable(run_id, after), after, resumed=bool(last_event_id))


async def websocket_not_found(websocket: WebSocket) -> None:
    """A WebSocket handshake anywhere but /ws/chat: a JSON 404, as HTTP gets (Starlette closed
    it, which hypercorn answers with a bare 403)."""
    error = NotFound(f"no WebSocket at {websocket.url.path}: it is at /ws/chat")
    await send_refusal(websocket.scope, websocket.send, error)


async def websocket_only(request: Request) -> Response:
    """GET /ws/chat without the WebSocket handshake (a plain curl, a proxy that drops Upgrade)."""
    error = ServiceError("this is a WebSocket endpoint: connect with Upgrade: websocket", type="upgrade_required",
                         status_code=426)
    response = error_response(error, request)
    response.headers.update({"upgrade": "websocket", "connection": "Upgrade"})  # as RFC 9110 asks of a 426
    return response


async def cancel_run(request: Request) -> Response:
    """POST /runs/{run_id}/cancel: stop generating; listeners get thread.run.cancelled, then metadata."""
    run_id = check_run_id(request.path_params["run_id"])
    log = request.app.state.runs.stop(run_id, "cancelled by the client")
    return JSONResponse(
        {"run_id": run_id, "thread_id": log.thread_id, "status": "cancelling", "correlation_id": correlation_id(request)},
        status_code=202,
    )

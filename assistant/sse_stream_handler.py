"""Frames a run's events as Server-Sent Events, written by hand (WHATWG rules).

The request's task sends: whatever the run's log holds past what was sent, framed together into
one body message, or a keepalive comment when nothing was sent for the heartbeat interval (so
comments flow while a tool runs for minutes). Callbacks watch the client: gone away (its next
ASGI message), due a keepalive or no longer reading (one timer).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Message, Receive, Scope, Send

from .errors import ServiceError
from .events import ERROR, RUN_RESUMED, Event, stream_path
from .run_log import EventsDropped, RunLog, Wakeup
from .timeouts import MoveOn

logger = logging.getLogger("assistant.sse")

KEEPALIVE = b": keepalive\n\n"
# A body goes out in sends of at most this much (asyncio's write high-water mark), so the
# slow-client timeout measures how long the client took no data, not how long one large batch
# (a replay, a resume from early on, a big tool input or output) takes to cross a slow link.
SEND_PIECE_BYTES = 64 * 1024
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def event_id(run_id: str, seq: int) -> str:
    """Ids name the run and the position, so a reconnecting client says where it stopped."""
    return f"{run_id}:{seq}"


def body_pieces(body: bytes) -> list[bytes]:
    """`body` cut into sends of at most SEND_PIECE_BYTES, never inside a UTF-8 character."""
    if len(body) <= SEND_PIECE_BYTES:
        return [body]
    pieces = []
    start = 0
    while start < len(body):
        end = min(start + SEND_PIECE_BYTES, len(body))
        while end < len(body) and body[end] & 0xC0 == 0x80:  # a continuation byte: back to the character's start
            end -= 1
        pieces.append(body[start:end])
        start = end
    return pieces


def frame_event(run_id: str, seq: int, event: Event) -> bytes:
    """One SSE event; the data is the event's single-line JSON."""
    return b"".join(
        (b"event: ", event.name.encode(), b"\nid: ", event_id(run_id, seq).encode(), b"\ndata: ", event.encoded, b"\n\n")
    )


def frame_batch(log: RunLog, batch: list[tuple[int, Event]]) -> bytes:
    run_id = log.run_id
    return b"".join(frame_event(run_id, seq, event) for seq, event in batch)


def frame_error(error: ServiceError, correlation_id: str | None) -> bytes:
    """An `error` event. It has no id, so the client's Last-Event-ID stays where it was."""
    return b"event: error\ndata: " + Event(ERROR, error.payload(correlation_id)).encoded + b"\n\n"


def frame_retry(retry_ms: int) -> bytes:
    """A stream's first line: how long EventSource waits before it reconnects."""
    return f"retry: {retry_ms}\n\n".encode()


def frame_resumed(log: RunLog, after: int) -> bytes:
    """The first event of a resumed stream. It has no id, so it leaves Last-Event-ID as it was."""
    data = {"thread_id": log.thread_id, "run_id": log.run_id, "stream_url": stream_path(log.run_id),
            "after": event_id(log.run_id, after)}
    return b"event: " + RUN_RESUMED.encode() + b"\ndata: " + Event(RUN_RESUMED, data).encoded + b"\n\n"


class SSEResponse:
    """An ASGI response streaming one run's log from position `after`.

    One task, the sender, sends. The client is watched without a task of its own (an anyio
    task, its task group and a timer scope held ~4 KiB per open stream): a bare asyncio task
    waits for the client's next ASGI message, and one loop timer asks the sender for a
    keepalive comment when nothing was sent for the heartbeat interval, or drops the client
    when one send has waited longer than the slow-client timeout. Either ends the stream by
    moving the sender's `MoveOn` (an `asyncio.timeout`) to now (anyio's CancelScope, with its two sets, held
    ~0.5 KiB more per open stream).
    The sender waits on one `Wakeup` per wait, with no timeout of its own: that keeps the path
    of each delta free of timers.
    """

    _stop: MoveOn  # the sender's: no deadline until the stream is ended from outside
    _receive: Receive
    _next_message: asyncio.Task[Message]  # the client's next ASGI message
    _timer: asyncio.TimerHandle

    def __init__(
        self,
        log: RunLog,
        *,
        heartbeat_seconds: float,
        retry_ms: int,
        slow_client_timeout_seconds: float,
        after: int = 0,
        resumed: bool = False,
        status_code: int = 200,
        head_sent: bool = False,
    ) -> None:
        self.log = log
        self.heartbeat_seconds = heartbeat_seconds
        self.retry_ms = retry_ms
        self.slow_client_timeout_seconds = slow_client_timeout_seconds
        self.after = after
        self.resumed = resumed  # a Last-Event-ID was given: the stream opens with `thread.run.resumed`
        self.status_code = status_code
        self.head_sent = head_sent  # the head and the retry line went out before (while the message waited)
        self.done = False  # set once the stream's last byte is sent: a disconnect after it is normal
        self._last_sent = time.monotonic()
        self._sending_since: float | None = None
        self._keepalive_due = False
        self._wakeup: Wakeup | None = None
        self._watching = False
        self._finishing = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.head_sent:
            await send({"type": "http.response.start", "status": self.status_code, "headers": SSE_HEADERS})
        if scope.get("method") == "HEAD":  # the GET's head, no body: following the run would hold the connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.done = True
            return
        async with MoveOn(None) as self._stop:
            self._receive = receive
            self._watching = True
            self._watch_next_message()
            first = min(self.heartbeat_seconds, self.slow_client_timeout_seconds)
            self._timer = asyncio.get_running_loop().call_later(first, self._on_timer)
            try:
                # An error this stream sends itself carries the ID of the request reading it.
                await self._stream(send, scope.get("state", {}).get("correlation_id") or self.log.correlation_id)
                self.done = True
            finally:
                self._watching = False
                self._timer.cancel()
                self._next_message.remove_done_callback(self._client_said)
                self._next_message.cancel()

    def _end(self) -> None:
        """End the stream: the sender is cancelled on the loop's next iteration."""
        if not self._stop.expired():
            self._stop.reschedule(0)  # a deadline in the past

    def _watch_next_message(self) -> None:
        self._next_message = asyncio.get_running_loop().create_task(self._receive())
        self._next_message.add_done_callback(self._client_said)

    def _client_said(self, task: asyncio.Task[Message]) -> None:
        """The client's next message: a disconnect ends the stream; anything else (the request's
        own empty body on a GET) is read past."""
        error = None if task.cancelled() else task.exception()  # retrieved, so asyncio does not log it
        if not self._watching:  # queued before __call__ left its scope: remove_done_callback was too late
            return
        if error is not None:
            logger.warning("the server's receive failed (%r): ending the stream", error,
                           extra={"run_id": self.log.run_id})
        elif task.cancelled() or task.result()["type"] == "http.disconnect":
            if not self._finishing:  # else hypercorn closed the connection after the last byte
                logger.info("client disconnected from the stream", extra={"run_id": self.log.run_id})
        else:
            self._watch_next_message()
            return
        self._end()

    def _on_timer(self) -> None:
        """The heartbeat timer and the watchdog of a client that stopped reading, in one timer."""
        now = time.monotonic()
        if self._sending_since is not None:
            waited = now - self._sending_since
            if waited >= self.slow_client_timeout_seconds:
                logger.warning(
                    "dropping a client that stopped reading",
                    extra={"run_id": self.log.run_id, "timeout_seconds": self.slow_client_timeout_seconds},
                )
                self._end()
                return
            delay = min(self.slow_client_timeout_seconds - waited, self.heartbeat_seconds)
        else:
            delay = self._last_sent + self.heartbeat_seconds - now
            if delay <= 0:
                self._keepalive_due = True
                if self._wakeup is not None:
                    self._wakeup.set()
                delay = self.heartbeat_seconds
            # A send that starts stalling before the next tick is caught within the timeout.
            delay = min(delay, self.slow_client_timeout_seconds)
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    async def _send_body(self, send: Send, body: bytes) -> None:
        for piece in body_pieces(body):
            self._sending_since = time.monotonic()  # the watch restarts with each piece the client took
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        self._last_sent = time.monotonic()
        self._sending_since = None

    async def _stream(self, send: Send, correlation_id: str) -> None:
        log = self.log
        seq = self.after
        pending = b"" if self.head_sent else frame_retry(self.retry_ms)
        if self.resumed:
            pending += frame_resumed(log, self.after)
        while True:
            try:
                batch = log.events_after(seq)
            except EventsDropped as exc:
                # The client fell further behind than the log keeps: it cannot be made whole.
                logger.warning(str(exc))
                pending += frame_error(ServiceError(str(exc), type="events_dropped"), correlation_id)
                break
            if batch:
                seq = batch[-1][0]
                await self._send_body(send, pending + frame_batch(log, batch))
                pending = b""
                continue
            if log.finished:
                break
            if pending or self._keepalive_due:
                self._keepalive_due = False
                await self._send_body(send, pending or KEEPALIVE)
                pending = b""
                continue
            self._wakeup = Wakeup()
            await log.wait_next_or(self._wakeup)
        self._finishing = True  # hypercorn queues http.disconnect inside this send, after the last byte
        self._sending_since = time.monotonic()  # the last send is watched too
        await send({"type": "http.response.body", "body": pending, "more_body": False})
        self._sending_since = None

"""Frames a run's events as Server-Sent Events, written by hand (WHATWG rules).

A task of the response's own, the sender, sends: whatever the run's log holds past what was sent,
framed together into one body message, or a keepalive comment when nothing was sent for the
heartbeat interval (so comments flow while a tool runs for minutes). The request's task watches
the client for its disconnect; one timer says when a keepalive is due or the client stopped
reading.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Receive, Scope, Send

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
    return b"".join([frame_event(run_id, seq, event) for seq, event in batch])  # a list: join makes one anyway


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

    A bare asyncio task, the sender, sends. It runs beside the request's task rather than in it
    because it wakes at every delta, and a wake-up resumes the task's whole chain of awaits: in
    the request's task that is hypercorn's, Starlette's and the service's ~13 frames, in its own
    task two. The request's task watches the client meanwhile, waiting for its next ASGI message
    (a disconnect ends the sender), and one loop timer asks the sender for a keepalive comment
    when nothing was sent for the heartbeat interval, or ends it when one send has waited longer
    than the slow-client timeout. The sender's end ends the watch (its `MoveOn` moved to now, or,
    once the client's disconnect came, the future it then waits on set), and the request's task
    takes the sender's outcome: an error the sender raised goes on from there, as from any
    response.
    The sender waits on one `Wakeup` per wait, with no timeout of its own: that keeps the path
    of each delta free of timers.
    """

    _watch: MoveOn  # the request task's wait for the client: moved to now when the sender ends
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
        self._finishing = False
        self._sender: asyncio.Task[None] | None = None  # while the request's task watches the client
        self._sender_done: asyncio.Future[None] | None = None  # the watch's wait once the client is gone

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.head_sent:
            await send({"type": "http.response.start", "status": self.status_code, "headers": SSE_HEADERS})
        if scope.get("method") == "HEAD":  # the GET's head, no body: following the run would hold the connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.done = True
            return
        # An error this stream sends itself carries the ID of the request reading it.
        correlation_id = scope.get("state", {}).get("correlation_id") or self.log.correlation_id
        loop = asyncio.get_running_loop()
        sender = self._sender = loop.create_task(self._stream(send, correlation_id))
        sender.add_done_callback(self._on_sender_end)
        try:
            async with MoveOn(None) as self._watch:
                first = min(self.heartbeat_seconds, self.slow_client_timeout_seconds)
                self._timer = loop.call_later(first, self._on_timer)
                try:
                    await self._watch_client(receive, sender)
                finally:
                    self._timer.cancel()
                    if not sender.done():  # this task was cancelled, or its watch failed
                        sender.remove_done_callback(self._on_sender_end)
                        sender.cancel()
                        await asyncio.wait((sender,))  # nothing of the response outlives it
        except BaseException:
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                # The sender failed as this task was cancelled: its error would go unseen.
                logger.error("the stream's sender failed", exc_info=sender.exception(),
                             extra={"run_id": self.log.run_id})
            raise
        finally:
            # A sender that ended by an error or a cancellation keeps it, and its traceback keeps
            # this response: with the task kept here too, that is a cycle, which only a full
            # garbage collection (every 10,000 connections: garbage_collection.py) would free.
            self._sender = None
        if not sender.cancelled():
            sender.result()  # the sender's error, if it raised one, goes on from here

    def _on_sender_end(self, sender: asyncio.Task[None]) -> None:
        if self._sender_done is not None:
            if not self._sender_done.done():  # else the request's task was cancelled as it waited
                self._sender_done.set_result(None)
        elif self._sender is not None:  # else the watch ended as the sender did, and left `_watch`
            self._watch.reschedule(0)  # a deadline in the past: the wait for the client ends

    def _end(self) -> None:
        """End the stream: the sender is cancelled at its next await."""
        if self._sender is not None:
            self._sender.cancel()

    async def _watch_client(self, receive: Receive, sender: asyncio.Task[None]) -> None:
        """Wait for the client's disconnect, which ends the stream (anything else, the request's
        own empty body on a GET, is read past), then for the sender's end, which ends the first
        wait too."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as error:
            logger.warning("the server's receive failed (%r): ending the stream", error,
                           extra={"run_id": self.log.run_id})
            self._end()
        else:
            if not self._finishing:
                logger.info("client disconnected from the stream", extra={"run_id": self.log.run_id})
                self._end()
            # else hypercorn closed the stream after the last byte, as usual, inside the last send
        if not sender.done():
            self._sender_done = asyncio.get_running_loop().create_future()
            await self._sender_done

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
        self.done = True

"""Frames a run's events as Server-Sent Events, written by hand (WHATWG rules).

One task sends: whatever the run's log holds past what was sent, framed together into one body
message, or a keepalive comment when nothing was sent for the heartbeat interval (so comments
flow while a tool runs for minutes). A second task watches for the client going away.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import Message, Receive, Scope, Send

from .errors import ServiceError
from .events import ERROR, RUN_RESUMED, Event, stream_path
from .run_log import EventsDropped, RunLog

logger = logging.getLogger("assistant.sse")

KEEPALIVE = b": keepalive\n\n"
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def event_id(run_id: str, seq: int) -> str:
    """Ids name the run and the position, so a reconnecting client says where it stopped."""
    return f"{run_id}:{seq}"


def frame_event(run_id: str, seq: int, event: Event) -> bytes:
    """One SSE event; the data is the event's single-line JSON."""
    return b"".join(
        (b"event: ", event.name.encode(), b"\nid: ", event_id(run_id, seq).encode(), b"\ndata: ", event.encoded, b"\n\n")
    )


def frame_batch(log: RunLog, batch: list[tuple[int, Event]]) -> bytes:
    run_id = log.run_id
    return b"".join(frame_event(run_id, seq, event) for seq, event in batch)


def frame_resumed(log: RunLog, after: int) -> bytes:
    """The first event of a resumed stream. It has no id, so it leaves Last-Event-ID as it was."""
    data = {"thread_id": log.thread_id, "run_id": log.run_id, "stream_url": stream_path(log.run_id),
            "after": event_id(log.run_id, after)}
    return b"event: " + RUN_RESUMED.encode() + b"\ndata: " + Event(RUN_RESUMED, data).encoded + b"\n\n"


class SSEResponse:
    """An ASGI response streaming one run's log from position `after`."""

    def __init__(
        self,
        log: RunLog,
        *,
        heartbeat_seconds: float,
        retry_ms: int,
        slow_client_timeout_seconds: float,
        after: int = 0,
        status_code: int = 200,
    ) -> None:
        self.log = log
        self.heartbeat_seconds = heartbeat_seconds
        self.retry_ms = retry_ms
        self.slow_client_timeout_seconds = slow_client_timeout_seconds
        self.after = after
        self.status_code = status_code
        self.done = False  # set once the stream's last byte is sent: a disconnect after it is normal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": SSE_HEADERS})
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._watch_disconnect, receive, task_group.cancel_scope)
            await self._stream(send)
            self.done = True
            task_group.cancel_scope.cancel()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                if not self.done:
                    logger.info("client disconnected from the stream", extra={"run_id": self.log.run_id})
                scope.cancel()
                return

    async def _send_body(self, send: Send, body: bytes) -> bool:
        """Send one chunk; False when the client has not taken it in time (it is dropped)."""
        with anyio.move_on_after(self.slow_client_timeout_seconds):
            await send({"type": "http.response.body", "body": body, "more_body": True})
            return True
        logger.warning(
            "dropping a client that stopped reading",
            extra={"run_id": self.log.run_id, "timeout_seconds": self.slow_client_timeout_seconds},
        )
        return False

    async def _stream(self, send: Send) -> None:
        log = self.log
        seq = self.after
        pending = f"retry: {self.retry_ms}\n\n".encode()
        if self.after:
            pending += frame_resumed(log, self.after)
        while True:
            try:
                batch = log.events_after(seq)
            except EventsDropped as exc:
                # The client fell further behind than the log keeps: it cannot be made whole. The
                # error has no id, so the client's Last-Event-ID stays where it was.
                logger.warning(str(exc))
                error = ServiceError(str(exc), type="events_dropped")
                pending += b"event: error\ndata: " + Event(ERROR, error.payload(log.correlation_id)).encoded + b"\n\n"
                break
            if batch:
                seq = batch[-1][0]
                if not await self._send_body(send, pending + frame_batch(log, batch)):
                    return
                pending = b""
                continue
            if log.finished:
                break
            if pending:
                if not await self._send_body(send, pending):
                    return
                pending = b""
            with anyio.move_on_after(self.heartbeat_seconds):
                await log.wait_beyond(seq)
                continue
            if not await self._send_body(send, KEEPALIVE):
                return
        await send({"type": "http.response.body", "body": pending, "more_body": False})

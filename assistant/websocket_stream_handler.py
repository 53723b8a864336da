"""Chat over a WebSocket: many turns per connection, one at a time.

Two tasks: the reader takes the client's frames (so a bad frame or a second turn is answered
at once, even mid-turn) and, while it waits for them, drops a client whose one send has waited
longer than the slow-client timeout; the writer is the only one that sends: the connection's
notices (error frames, a resume's first frame), then whatever the current turn's log holds past
what was sent, and the close frame when the reader ends the connection.
The writer reads the run's log directly, as the SSE handler does: a slow client holds up only
its own writer, never the run, and a delta costs no queue hop.
They are asyncio tasks in an asyncio task group, timed by `MoveOn` (an `asyncio.timeout`): anyio's task (its
own cancel scope and event), task group and per-wait cancel scope held ~4 KiB more per open
socket, and every full garbage collection walks each open socket's objects.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.types import Message
from starlette.websockets import WebSocket

from .chat_request import ChatRequest, check_idempotency_key, check_run_id, parse_chat_request
from .config import Settings
from .errors import BadRequest, ServiceError
from .events import RUN_RESUMED, Event, stream_path
from .http_api import parse_event_id
from .run_log import EventsDropped, RunLog, Wakeup
from .run_manager import RunManager
from .sse_stream_handler import SEND_PIECE_BYTES, event_id
from .timeouts import MoveOn

logger = logging.getLogger("assistant.websocket")

MAX_NOTICES = 256  # error frames waiting to be sent: more, and the client is not reading
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001


def error_frame(error: ServiceError, correlation_id: str) -> str:
    """An error the client caused or should know of; the connection stays open."""
    logger.info("error frame %s: %s", error.type, error.message)
    payload = error.payload(correlation_id)
    return orjson.dumps({"event": "error", "id": None, "data": payload, **payload}).decode()


def websocket_frame(run_id: str, seq: int, event: Event) -> str:
    """`{"event", "id", "data"}`, reusing the event's encoded data (names and ids need no escaping)."""
    return f'{{"event":"{event.name}","id":"{event_id(run_id, seq)}","data":{event.encoded.decode()}}}'


class ChatConnection:
    def __init__(self, websocket: WebSocket, manager: RunManager, settings: Settings, correlation_id: str) -> None:
        self.websocket = websocket
        self.manager = manager
        self.settings = settings
        self.correlation_id = correlation_id
        self.turn_running = False  # from a chat frame until the turn's last event is on its way
        # Frames to send before any more of the turn's events (a list: a deque allocates ~0.7 KiB
        # up front, and there are seldom any).
        self._notices: list[str] = []
        self._following: tuple[RunLog, int] | None = None  # the turn's log, and the last event sent
        self._wakeup: Wakeup | None = None
        self._send_deadline: float | None = None  # while a send is under way: when it counts as stuck
        self._close_with: tuple[int, str] | None = None  # the writer's last frame (a bad client, or going away)
        self._going_away = False  # the service is shutting down: close once no turn is running
        self._client_gone = False  # the client's disconnect came (its close frame, or the socket's end)
        self._tasks: asyncio.TaskGroup | None = None
        self._starting: asyncio.Task[None] | None = None  # a turn's start, waiting for its thread

    def go_away(self) -> None:
        """The service is shutting down: a client told so (1001) reconnects elsewhere at once,
        rather than when the server's graceful timeout cuts the socket."""
        self._going_away = True
        self._wake_writer()

    async def serve(self) -> None:
        await self.websocket.accept()
        async with asyncio.TaskGroup() as self._tasks:
            writer = self._tasks.create_task(self._write_frames())
            try:
                await self._read_frames()
                if self._close_with is not None and not self._client_gone:
                    await self._await_close()
            finally:
                writer.cancel()
                if self._starting is not None:
                    self._starting.cancel()

    async def _await_close(self) -> None:
        """The writer sends the close frame after the frame it may be sending, and sends nothing
        after it; the connection ends (a turn still starting included) when the client answers
        it, at the latest at the slow-client timeout."""
        deadline = self._send_deadline or time.monotonic() + self.settings.slow_client_timeout_seconds
        self._wake_writer()
        async with MoveOn(deadline):
            # The client's frames are still taken (and dropped) until then: hypercorn queues at
            # most 10 for the app and, once it is full, blocks on the disconnect it puts after
            # the app returned, and never closes the socket.
            while (await self.websocket.receive())["type"] != "websocket.disconnect":
                pass

    def _notify(self, frame: str) -> None:
        self._notices.append(frame)
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _write_frames(self) -> None:
        """The only task that sends: notices first, then the turn's events past the last sent;
        when the reader asks for a close, the close frame, and then it ends the connection."""
        while True:
            if self._going_away and self._close_with is None and not self.turn_running and not self._notices:
                self._close_with = (CLOSE_GOING_AWAY, "the service is shutting down")  # the turn's end went out
            if self._close_with is not None:
                # A close that cannot go out is watched too; so is the client's answer to it (the
                # reader ends the connection then, or at the slow-client timeout).
                self._send_deadline = time.monotonic() + self.settings.slow_client_timeout_seconds
                await self.websocket.close(*self._close_with)
                return
            if self._notices:
                await self._send(self._notices.pop(0))
                continue
            if self._following is not None:
                log, seq = self._following
                try:
                    batch = log.events_after(seq)
                except EventsDropped as exc:
                    self._end_turn()
                    self._notify(error_frame(ServiceError(str(exc), type="events_dropped"), self.correlation_id))
                    continue
                if batch:
                    last = batch[-1][0]
                    if log.finished and last == log.last_seq:
                        self._end_turn()  # before the last event goes out: the client may answer it at once
                    else:
                        self._following = (log, last)
                    for seq, event in batch:
                        if self._close_with is not None:
                            break  # the close goes next, not after the rest of a long batch
                        await self._send(websocket_frame(log.run_id, seq, event))
                    continue
                if log.finished:
                    self._end_turn()
                    continue
            self._wakeup = Wakeup()
            if self._following is not None:
                await self._following[0].wait_next_or(self._wakeup)
            else:
                await self._wakeup

    def _end_turn(self) -> None:
        self._following = None
        self.turn_running = False

    async def _send(self, frame: str) -> None:
        """Send one frame, watched by `_receive`. A frame cannot be cut as an SSE body is, so a large
        one gets the slow-client timeout once for each SEND_PIECE_BYTES: a client reading steadily
        over a slow link is held to the same least rate over both transports, not dropped mid-frame."""
        allowed = self.settings.slow_client_timeout_seconds
        if len(frame) > SEND_PIECE_BYTES // 4:  # may be over SEND_PIECE_BYTES once encoded
            allowed *= max(1.0, len(frame.encode()) / SEND_PIECE_BYTES)
        self._send_deadline = time.monotonic() + allowed  # asyncio's clock
        await self.websocket.send_text(frame)
        self._send_deadline = None

    async def _receive(self) -> Message | None:
        """The client's next message; None once a send is past its deadline (see `_send`).

        The watchdog lives here rather than in a task of its own (~4 KiB per open socket): the
        wait for the client is cut short whenever a send may have been stuck for that long.
        """
        while True:
            deadline = self._send_deadline
            left = self.settings.slow_client_timeout_seconds if deadline is None else deadline - time.monotonic()
            if left <= 0:
                logger.warning("dropping a WebSocket client that stopped reading")
                return None
            # At most the timeout: the next send's deadline may come sooner than this one's.
            async with MoveOn(time.monotonic() + min(left, self.settings.slow_client_timeout_seconds)):
                return await self.websocket.receive()

    async def _read_frames(self) -> None:
        while True:
            message = await self._receive()
            if message is None:
                return
            if message["type"] == "websocket.disconnect":
                self._client_gone = True
                return
            if len(self._notices) >= MAX_NOTICES:
                logger.warning("closing a WebSocket whose client sends bad frames and reads no answers")
                self._close_with = (CLOSE_POLICY, "too many unanswered bad frames")
                return
            text = message.get("text")
            limit = self.settings.max_body_bytes
            if text is None:
                if len(message.get("bytes") or b"") > limit:
                    self._close_with = (CLOSE_TOO_BIG, "frame too large")
                    return
                self._notify(error_frame(BadRequest("binary frames are not accepted; send JSON text"), self.correlation_id))
                continue
            if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):  # bytes, as over HTTP
                self._close_with = (CLOSE_TOO_BIG, "frame too large")
                return
            try:
                frame = orjson.loads(text)
            except orjson.JSONDecodeError:
                self._notify(error_frame(BadRequest("the frame is not valid JSON"), self.correlation_id))
                continue
            self._handle_frame(frame)

    def _handle_frame(self, frame: Any) -> None:
        """A chat message (with an optional `idempotency_key`), `{"resume": run_id, "last_event_id": id}`
        or `{"cancel": run_id}`."""
        try:
            if isinstance(frame, dict) and "cancel" in frame:
                self._cancel(frame["cancel"])
                return
            if self.turn_running:
                raise BadRequest("a turn is already running on this connection; wait for its metadata (or error) event",
                                 type="turn_in_progress")
            if isinstance(frame, dict) and "resume" in frame:
                log, after = self._resumable(frame)
                self.turn_running = True
                self._resume(log, after)
                return
            request = parse_chat_request(frame, max_message_chars=self.settings.max_message_chars)
            key = frame.get("idempotency_key")
            if key is not None:
                key = check_idempotency_key(key, "'idempotency_key'")
        except ServiceError as exc:
            self._notify(error_frame(exc, self.correlation_id))
            return
        self.turn_running = True
        assert self._tasks is not None
        self._starting = self._tasks.create_task(self._start_turn(request, key))

    def _cancel(self, run_id: Any) -> None:
        self.manager.stop(check_run_id(run_id, "'cancel'"), "cancelled by the client")

    def _resumable(self, frame: dict[str, Any]) -> tuple[RunLog, int]:
        run_id = check_run_id(frame["resume"], "'resume'")
        after = 0
        if frame.get("last_event_id"):
            resumed_run, after = parse_event_id(str(frame["last_event_id"]))
            if resumed_run != run_id:
                raise BadRequest("'last_event_id' is not an event of that run")
        return self.manager.resumable(run_id, after), after

    def _resume(self, log: RunLog, after: int) -> None:
        """Say so first, and whether anything is left to come; then follow the log from `after`."""
        data = {"thread_id": log.thread_id, "run_id": log.run_id, "stream_url": stream_path(log.run_id),
                "after": event_id(log.run_id, after), "complete": log.finished and after >= log.last_seq}
        self._following = (log, after)
        self._notify(orjson.dumps({"event": RUN_RESUMED, "id": None, "data": data}).decode())

    async def _start_turn(self, request: ChatRequest, key: str | None) -> None:
        """One at a time (`turn_running`); cancelled with the connection while its thread is busy."""
        try:
            # keyed_run and start_run with no await between: a key cannot be taken in the gap
            earlier = None if key is None else self.manager.keyed_run(request.thread_id, key, request.message)
            if earlier is not None:  # sent again: the run the first one started, from its start
                self._resume(self.manager.resumable(earlier.run_id, 0), 0)
                return
            log = await self.manager.start_run(request.thread_id, request.message, self.correlation_id, key)
        except ServiceError as exc:
            self.turn_running = False
            self._notify(error_frame(exc, self.correlation_id))
            return
        finally:
            self._starting = None  # a finished task is not kept for the life of the connection
        self._following = (log, 0)
        self._wake_writer()


async def websocket_chat(websocket: WebSocket) -> None:
    state = websocket.app.state
    correlation_id = websocket.scope["state"]["correlation_id"]
    connection = ChatConnection(websocket, state.runs, state.settings, correlation_id)
    state.runs.on_shutdown.add(connection.go_away)
    if not state.runs.accepting:  # connected as the shutdown began
        connection.go_away()
    try:
        await connection.serve()
    finally:
        state.runs.on_shutdown.discard(connection.go_away)

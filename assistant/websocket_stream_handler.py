"""Chat over a WebSocket: many turns per connection, one at a time.

Three tasks joined by one bounded stream of outgoing frames: the reader takes the client's
frames (so a bad frame or a second turn is answered at once, even mid-turn), the turn task
copies the run's log into the outbox, and the writer is the only one that sends, so a slow
client fills the outbox and then is dropped, and never holds up the run.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import orjson
from anyio.abc import ObjectSendStream, TaskGroup
from starlette.websockets import WebSocket, WebSocketDisconnect

from .chat_request import ChatRequest, check_run_id, parse_chat_request
from .config import Settings
from .errors import BadRequest, ServiceError
from .events import RUN_RESUMED, Event, stream_path
from .http_api import parse_event_id
from .run_log import EventsDropped, RunLog
from .run_manager import RunManager
from .sse_stream_handler import event_id

logger = logging.getLogger("assistant.websocket")

OUTBOX_FRAMES = 256
CLOSE_TOO_BIG = 1009
CLOSE_POLICY = 1008


def error_frame(error: ServiceError, correlation_id: str) -> str:
    """An error the client caused or should know of; the connection stays open."""
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
        self.turn_running = False

    async def serve(self) -> None:
        await self.websocket.accept()
        outbox, outgoing = anyio.create_memory_object_stream[str](OUTBOX_FRAMES)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(self._write_frames, outgoing, task_group.cancel_scope)
            async with outbox:
                await self._read_frames(outbox, task_group)
            task_group.cancel_scope.cancel()

    async def _write_frames(self, outgoing: Any, scope: anyio.CancelScope) -> None:
        async with outgoing:
            async for frame in outgoing:
                with anyio.move_on_after(self.settings.slow_client_timeout_seconds):
                    await self.websocket.send_text(frame)
                    continue
                logger.warning("dropping a WebSocket client that stopped reading")
                scope.cancel()
                return

    async def _read_frames(self, outbox: ObjectSendStream[str], task_group: TaskGroup) -> None:
        while True:
            try:
                message = await self.websocket.receive()
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await outbox.send(error_frame(BadRequest("binary frames are not accepted; send JSON text"), self.correlation_id))
                continue
            if len(text) > self.settings.max_body_bytes:
                await self.websocket.close(CLOSE_TOO_BIG, "frame too large")
                return
            try:
                frame = orjson.loads(text)
            except orjson.JSONDecodeError:
                await outbox.send(error_frame(BadRequest("the frame is not valid JSON"), self.correlation_id))
                continue
            await self._handle_frame(frame, outbox, task_group)

    async def _handle_frame(self, frame: Any, outbox: ObjectSendStream[str], task_group: TaskGroup) -> None:
        """A chat message, `{"resume": run_id, "last_event_id": id}` or `{"cancel": run_id}`."""
        try:
            if isinstance(frame, dict) and "cancel" in frame:
                self._cancel(frame["cancel"])
                return
            if self.turn_running:
                raise BadRequest("a turn is already running on this connection; wait for its metadata event",
                                 type="turn_in_progress")
            if isinstance(frame, dict) and "resume" in frame:
                log, after = self._resumable(frame)
                start = None
            else:
                request = parse_chat_request(frame, max_message_chars=self.settings.max_message_chars)
                log, after = None, 0
                start = request
        except ServiceError as exc:
            await outbox.send(error_frame(exc, self.correlation_id))
            return
        self.turn_running = True
        task_group.start_soon(self._turn, start, log, after, outbox.clone())

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

    async def _turn(
        self, request: ChatRequest | None, log: RunLog | None, after: int, outbox: ObjectSendStream[str]
    ) -> None:
        async with outbox:
            try:
                if log is None:
                    assert request is not None
                    log = await self.manager.start_run(request.thread_id, request.message, self.correlation_id)
                else:  # a resume: say so first, and whether anything is left to come
                    data = {"thread_id": log.thread_id, "run_id": log.run_id, "stream_url": stream_path(log.run_id),
                            "after": event_id(log.run_id, after), "complete": log.finished and after >= log.last_seq}
                    await outbox.send(orjson.dumps({"event": RUN_RESUMED, "id": None, "data": data}).decode())
                async for batch in log.follow(after):
                    for seq, event in batch:
                        await outbox.send(websocket_frame(log.run_id, seq, event))
            except ServiceError as exc:
                await outbox.send(error_frame(exc, self.correlation_id))
            except EventsDropped as exc:
                await outbox.send(error_frame(ServiceError(str(exc), type="events_dropped"), self.correlation_id))
            finally:
                self.turn_running = False


async def websocket_chat(websocket: WebSocket) -> None:
    state = websocket.app.state
    correlation_id = websocket.scope["state"]["correlation_id"]
    await ChatConnection(websocket, state.runs, state.settings, correlation_id).serve()

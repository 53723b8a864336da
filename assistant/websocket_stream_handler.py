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

from .chat_request import parse_chat_request
from .config import Settings
from .errors import BadRequest, ServiceError
from .run_log import EventsDropped
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
        try:
            request = parse_chat_request(frame, max_message_chars=self.settings.max_message_chars)
            if self.turn_running:
                raise BadRequest("a turn is already running on this connection; wait for its metadata event",
                                 type="turn_in_progress")
        except ServiceError as exc:
            await outbox.send(error_frame(exc, self.correlation_id))
            return
        self.turn_running = True
        task_group.start_soon(self._turn, request.thread_id, request.message, outbox.clone())

    async def _turn(self, thread_id: str, message: str, outbox: ObjectSendStream[str]) -> None:
        async with outbox:
            try:
                log = await self.manager.start_run(thread_id, message, self.correlation_id)
            except ServiceError as exc:
                await outbox.send(error_frame(exc, self.correlation_id))
                self.turn_running = False
                return
            try:
                async for batch in log.follow():
                    for seq, event in batch:
                        frame = {"event": event.name, "id": event_id(log.run_id, seq), "data": event.data}
                        await outbox.send(orjson.dumps(frame).decode())
            except EventsDropped as exc:
                await outbox.send(error_frame(ServiceError(str(exc), type="events_dropped"), self.correlation_id))
            finally:
                self.turn_running = False


async def websocket_chat(websocket: WebSocket) -> None:
    state = websocket.app.state
    correlation_id = websocket.scope["state"]["correlation_id"]
    await ChatConnection(websocket, state.runs, state.settings, correlation_id).serve()

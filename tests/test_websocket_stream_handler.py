"""The WebSocket handler against a client that does not read: its sends block forever.

(Turns over a real socket are in test_chat_api, test_e2e and test_faults.)
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from assistant.config import Settings
from assistant.websocket_stream_handler import CLOSE_POLICY, MAX_NOTICES, ChatConnection


class UnreadWebSocket:
    """Hands out the client's frames, then waits; every send blocks (nothing is read)."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.sends_started = 0
        self.closed: tuple[int, str] | None = None

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        if self.frames:
            await anyio.sleep(0)
            return {"type": "websocket.receive", "text": self.frames.pop(0)}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_text(self, text: str) -> None:
        self.sends_started += 1
        await anyio.sleep_forever()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def settings(**overrides: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **{"slow_client_timeout_seconds": 60.0, **overrides})


@pytest.mark.anyio
async def test_a_client_flooding_bad_frames_without_reading_is_closed_1008() -> None:
    websocket = UnreadWebSocket(["not json"] * (MAX_NOTICES + 50))
    connection = ChatConnection(websocket, manager=None, settings=settings(), correlation_id="cid")  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await connection.serve()
    assert websocket.closed == (CLOSE_POLICY, "too many unanswered bad frames")
    assert websocket.sends_started == 1  # the first error frame, stuck; the rest were held, then dropped


@pytest.mark.anyio
async def test_a_send_stuck_past_the_slow_client_timeout_ends_the_connection() -> None:
    websocket = UnreadWebSocket(["not json"])
    connection = ChatConnection(
        websocket, manager=None, settings=settings(slow_client_timeout_seconds=0.2), correlation_id="cid"  # type: ignore[arg-type]
    )
    started = anyio.current_time()
    with anyio.fail_after(5):
        await connection.serve()
    assert 0.2 <= anyio.current_time() - started < 1.0
    assert websocket.sends_started == 1 and websocket.closed is None

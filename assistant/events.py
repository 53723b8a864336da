"""The service's own events: what SSE and WebSocket clients receive, whichever engine runs."""

from __future__ import annotations

from typing import Any

import orjson

RUN_CREATED = "thread.run.created"
STEP_CREATED = "thread.run.step.created"
STEP_COMPLETED = "thread.run.step.completed"
MESSAGE_DELTA = "thread.message.delta"
MESSAGE_COMPLETED = "thread.message.completed"
RUN_COMPLETED = "thread.run.completed"
RUN_FAILED = "thread.run.failed"
RUN_CANCELLED = "thread.run.cancelled"
RUN_RESUMED = "thread.run.resumed"
METADATA = "metadata"
ERROR = "error"

# After one of these a run has ended; `metadata` or `error` is the last event of every stream.
RUN_OUTCOMES = frozenset({RUN_COMPLETED, RUN_FAILED, RUN_CANCELLED})
STREAM_END = frozenset({METADATA, ERROR})


def stream_path(run_id: str) -> str:
    """Where a client reads (or, with Last-Event-ID, resumes) a run's events, relative to the service."""
    return f"chat/stream/{run_id}"


class Event:
    """One event: its name, and its data, JSON-encoded once however many clients it goes to."""

    __slots__ = ("name", "data", "_encoded")

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name = name
        self.data = data
        self._encoded: bytes | None = None

    @property
    def encoded(self) -> bytes:
        """The data as one line of JSON (orjson escapes CR and LF inside strings)."""
        if self._encoded is None:
            # A copy: orjson's own result keeps a 4 KiB allocation however short the JSON, and a
            # run's log keeps every event (for resumes).
            self._encoded = memoryview(orjson.dumps(self.data)).tobytes()
        return self._encoded

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.name, self.data) == (other.name, other.data)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r})"

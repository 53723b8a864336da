"""The service's own events: what SSE and WebSocket clients receive, whichever engine runs."""

from __future__ import annotations

from typing import Any, cast

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
    """One event: its name, and its data as one line of JSON, encoded once however many clients
    it goes to (orjson escapes CR and LF inside strings)."""

    __slots__ = ("name", "encoded")

    def __init__(self, name: str, data: dict[str, Any]) -> None:
        self.name = name
        # A copy: orjson's own result keeps a 4 KiB allocation however short the JSON, and a
        # run's log keeps every event (for resumes).
        self.encoded = memoryview(orjson.dumps(data)).tobytes()

    @classmethod
    def from_json(cls, name: str, encoded: bytes) -> Event:
        """An event as a run's log keeps it: no data to encode again."""
        event = cls.__new__(cls)
        event.name = name
        event.encoded = encoded
        return event

    @property
    def data(self) -> dict[str, Any]:
        """The data, decoded anew: only a JSON answer and tests read it."""
        return cast(dict[str, Any], orjson.loads(self.encoded))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and (self.name, self.data) == (other.name, other.data)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r})"

"""The service's own events: what SSE and WebSocket clients receive, whichever engine runs."""

from __future__ import annotations

from typing import Any, NamedTuple

RUN_CREATED = "thread.run.created"
STEP_CREATED = "thread.run.step.created"
STEP_COMPLETED = "thread.run.step.completed"
MESSAGE_DELTA = "thread.message.delta"
MESSAGE_COMPLETED = "thread.message.completed"
RUN_COMPLETED = "thread.run.completed"
RUN_FAILED = "thread.run.failed"
RUN_CANCELLED = "thread.run.cancelled"
METADATA = "metadata"
ERROR = "error"

# After one of these a run has ended; `metadata` or `error` is the last event of every stream.
RUN_OUTCOMES = frozenset({RUN_COMPLETED, RUN_FAILED, RUN_CANCELLED})
STREAM_END = frozenset({METADATA, ERROR})


class Event(NamedTuple):
    name: str
    data: dict[str, Any]

"""The events of one run, kept in order for any number of readers.

A run writes its events here and never waits for a client; the SSE and WebSocket handlers read
from here at their own pace. That is what lets a slow or vanished client cost the run nothing,
and what a reconnecting client resumes from.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator
from typing import Any

import anyio

from .errors import ServiceError
from .events import MESSAGE_COMPLETED, RUN_OUTCOMES, STREAM_END, Event


class EventsDropped(Exception):
    """A reader asked for events that were already dropped to keep memory bounded."""


class Wakeup:
    """Wakes one waiting reader, once: the next event, or whoever else holds it (a heartbeat, an
    error frame to send). A bare asyncio future: readers make one per wait, that is per delta,
    and an anyio.Event costs ~8x more to make and twice as much to wait on (the service is
    asyncio-only already: its upstream transport is an asyncio.Protocol)."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def set(self) -> None:
        if not self._future.done():
            self._future.set_result(None)

    def __await__(self) -> Generator[Any, None, None]:
        """`await wakeup`: the future's own wait, with no coroutine frame of its own to enter and
        resume on every delta."""
        return self._future.__await__()


class RunLog:
    def __init__(
        self,
        run_id: str,
        thread_id: str,
        correlation_id: str,
        *,
        max_events: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.correlation_id = correlation_id
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.size_bytes = 0  # the encoded data of the events kept
        # Each event as a plain (name, JSON) tuple, not the Event: the garbage collector stops
        # tracking tuples of strings and bytes, so a full collection never walks the events that
        # open and retained runs keep (with 1,000 runs of 600 deltas that walk stalled every
        # stream for 380 ms).
        self._events: list[tuple[str, bytes]] = []
        self._first_seq = 1  # sequence number of self._events[0]; grows when old events are dropped
        self._waiters: list[Wakeup] = []  # set, and forgotten, at the next append
        # True once the upstream accepted the run's first request (or the run ended without it). A
        # flag and the log's own waiters, not an Event: each Event is ~0.9 KiB, kept by every run.
        self.upstream_answered = False
        # When a streamed answer's head was due (`orchestrator.wait_until_accepted`): the same
        # message sent again with its Idempotency-Key waits until then too, and so gets the
        # answer the first send got. None until a streamed request set it.
        self.head_deadline: float | None = None
        # Set by the run itself: how to stop it, why it was stopped, and the error it ended with.
        self.cancel_scope: anyio.CancelScope | None = None
        self.cancel_reason: str | None = None
        # True once the run is ending without an outcome of its own (an error, a stop) and settles
        # its round upstream: a stop then has nothing left to stop.
        self.ending = False
        self.error: ServiceError | None = None
        self.outcome_event: Event | None = None  # completed, failed or cancelled, once the run has one
        # The text of each message the run completed: a JSON answer gives them all, even once old
        # events were dropped to keep the log's memory bounded.
        self.messages: list[str] = []

    @property
    def outcome(self) -> str | None:
        return self.outcome_event.name if self.outcome_event is not None else None

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def last_seq(self) -> int:
        return self._first_seq + len(self._events) - 1

    def append(self, event: Event) -> int:
        """Add an event and wake the readers; returns its sequence number (1, 2, ...). Also
        called from the upstream connection's read callback (`orchestrator._log_batch`), outside
        any task: nothing here may await or ask anyio for the current task."""
        if self.finished:
            raise RuntimeError(f"run {self.run_id} has already ended")
        self._events.append((event.name, event.encoded))
        self.size_bytes += len(event.encoded)
        if event.name in RUN_OUTCOMES:
            self.outcome_event = event
        elif event.name == MESSAGE_COMPLETED:
            self.messages.append(event.data["message"]["content"])
        if len(self._events) > self.max_events or self.size_bytes > self.max_bytes:
            self._drop_oldest()
        if event.name in STREAM_END:
            self.finished_at = time.monotonic()
            self.upstream_answered = True
        self._wake()
        return self.last_seq

    def _drop_oldest(self) -> None:
        """Keep memory bounded: the oldest events go (readers that still need them are told)."""
        drop = 0
        size = self.size_bytes
        while len(self._events) - drop > 1 and (
            len(self._events) - drop > self.max_events or size > self.max_bytes
        ):
            size -= len(self._events[drop][1])
            drop += 1
        del self._events[:drop]
        self._first_seq += drop
        self.size_bytes = size

    def mark_upstream_answered(self) -> None:
        if not self.upstream_answered:
            self.upstream_answered = True
            self._wake()

    async def wait_upstream_answered(self) -> None:
        while not self.upstream_answered:
            await self.wait_next_or(Wakeup())

    def _wake(self) -> None:
        if self._waiters:
            for waiter in self._waiters:
                waiter.set()
            self._waiters.clear()

    async def wait_next_or(self, wakeup: Wakeup) -> None:
        """Return at the next event, or once someone else sets `wakeup` (a heartbeat timer, an
        error frame to send). `wakeup` is forgotten either way: a quiet run does not collect
        one per wake-up of its readers."""
        self._waiters.append(wakeup)
        try:
            await wakeup
        finally:
            if wakeup in self._waiters:  # not woken by an event: the list still holds it
                self._waiters.remove(wakeup)

    def events_after(self, seq: int) -> list[tuple[int, Event]]:
        """Every event after `seq` that is here now, with its sequence number."""
        if seq + 1 < self._first_seq:
            raise EventsDropped(f"events of run {self.run_id} after {seq} are no longer kept")
        start = seq + 1 - self._first_seq
        first = self._first_seq
        return [(first + i, Event.from_json(*e)) for i, e in enumerate(self._events[start:], start)]

    async def wait_beyond(self, seq: int) -> None:
        """Return once there is an event after `seq` or the run has ended."""
        while self.last_seq <= seq and not self.finished:
            await self.wait_next_or(Wakeup())

    async def wait_finished(self) -> None:
        while not self.finished:
            await self.wait_beyond(self.last_seq)

    async def follow(self, after: int = 0) -> AsyncIterator[list[tuple[int, Event]]]:
        """Yield the events after `after` in batches, live, until the run's last event."""
        seq = after
        while True:
            batch = self.events_after(seq)
            if batch:
                seq = batch[-1][0]
                yield batch
            elif self.finished:
                return
            else:
                await self.wait_beyond(seq)

    @property
    def first_seq(self) -> int:
        """The oldest event still kept."""
        return self._first_seq

    def events(self) -> list[Event]:
        return [Event.from_json(*e) for e in self._events]

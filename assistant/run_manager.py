"""Runs outlive the requests that start them: this keeps them, one at a time per thread.

A run is a task in the manager's task group (open for the life of the app), so a client that
disconnects stops reading but never stops the run half-way: the tools finish, their outputs
reach the upstream, and the thread stays usable. Finished runs' logs are kept for a while so
clients can read them again.

That task group is asyncio's, not anyio's: an anyio task carries a cancel scope, an event and a
handle of its own (~2 KiB per run, so per open stream), and a run needs none of them. It has its
own cancel scope (`RunLog.cancel_scope`), and its end is its log's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

import anyio

from .config import Settings
from .errors import BadRequest, NotFound, ServiceError, ShuttingDown, ThreadBusy
from .garbage_collection import note_ended
from .orchestrator import Engine, execute_run, nothing_but_an_error
from .run_log import RunLog
from .tool_executor import ToolRegistry

logger = logging.getLogger("assistant.runs")

_FORGOTTEN_IDS = 10_000  # how many dropped run ids are remembered, for a clearer 404
_KEPT_KEYS = 10_000  # how many Idempotency-Keys are remembered (the oldest ended runs' go first)
# A run refused with one of these had not reached the model: its key may start it again.
_REFUSALS_TO_RETRY = frozenset({"upstream_rate_limited", "thread_busy", "shutting_down"})
_NOT_ACCEPTING = "the service is shutting down; retry on another instance"  # a message it will not run


def message_digest(message: str) -> bytes:
    """What a key remembers of its message: enough to tell another message, not the text."""
    return hashlib.sha256(message.encode("utf-8", "surrogatepass")).digest()


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex}"


class RunManager:
    def __init__(self, engine: Engine, registry: ToolRegistry, settings: Settings) -> None:
        self.engine = engine
        self.registry = registry
        self.settings = settings
        self.accepting = True
        self._runs: dict[str, RunLog] = {}
        self._finished: deque[RunLog] = deque()  # in the order they finished, for expiry
        self._forgotten: OrderedDict[str, None] = OrderedDict()  # recently dropped run ids
        # (thread id, Idempotency-Key) -> the message's digest and the run it started (None while
        # that message still waits for its thread)
        self._keys: OrderedDict[tuple[str, str], tuple[bytes, str | None]] = OrderedDict()
        # thread id -> the queue of messages waiting for it, made only once one waits (a semaphore
        # with its deque is ~0.8 KiB, and most runs have no one waiting)
        self._busy_threads: dict[str, anyio.Semaphore | None] = {}
        self._waits: set[anyio.CancelScope] = set()  # of the messages waiting for a thread, ended by a shutdown
        self._task_group: asyncio.TaskGroup | None = None
        self._shutdown_requested = anyio.Event()
        # Called when the shutdown begins: open WebSockets, which then close once their turn ends.
        self.on_shutdown: set[Callable[[], None]] = set()

    async def __aenter__(self) -> RunManager:
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._task_group.create_task(self._shutdown_when_requested(), name="shutdown on request")
        self._task_group.create_task(self._expire_until_shutdown(), name="expire finished runs")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self.begin_shutdown()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, tb)

    @property
    def active_runs(self) -> list[RunLog]:
        return [log for log in self._runs.values() if not log.finished]

    def get(self, run_id: str) -> RunLog | None:
        self._expire()
        return self._runs.get(run_id)

    def lookup(self, run_id: str) -> RunLog:
        """The run's log, or `NotFound` saying whether it never existed or is no longer kept."""
        log = self.get(run_id)
        if log is not None:
            return log
        if run_id in self._forgotten:
            raise NotFound(
                f"run {run_id!r} ended too long ago: its events are no longer kept "
                "(STREAM_RETENTION_SECONDS, STREAM_MAX_RUNS)",
                type="run_expired",
            )
        raise NotFound(f"no run {run_id!r} is known here", type="run_not_found")

    def thread_busy(self, thread_id: str) -> bool:
        """Whether a message on the thread would wait for an earlier one's run to end."""
        return thread_id in self._busy_threads

    def keyed_run(self, thread_id: str, key: str, message: str) -> RunLog | None:
        """The run a message sent earlier with this Idempotency-Key started (None: no such message).

        A client that lost its connection before it learnt the run id sends the message again
        with the same key, and reads that run instead of asking the model twice.
        """
        kept = self._keys.get((thread_id, key))
        if kept is None:
            return None
        digest, run_id = kept
        if digest != message_digest(message):
            raise ServiceError(f"Idempotency-Key {key!r} was already used on this thread with another message",
                               type="idempotency_key_reused", status_code=422)
        if run_id is None:
            raise ServiceError(f"the message sent with Idempotency-Key {key!r} is still waiting for its thread",
                               type="idempotency_key_in_use", status_code=409)
        log = self._runs.get(run_id)
        if log is None:
            raise NotFound(
                f"the run Idempotency-Key {key!r} started ({run_id!r}) ended too long ago: its events are "
                "no longer kept (STREAM_RETENTION_SECONDS, STREAM_MAX_RUNS)",
                type="run_expired",
            )
        return log

    async def start_run(self, thread_id: str, message: str, correlation_id: str, key: str | None = None) -> RunLog:
        """Start a run on the thread once the thread is free (or raise `ThreadBusy`).

        With an Idempotency-Key (`key`), call `keyed_run` first, with no await in between: the key
        is taken from the start, so the same message sent again while this one waits for the
        thread is refused (409), not run twice.
        """
        if not self.accepting or self._task_group is None:
            raise ShuttingDown(_NOT_ACCEPTING)
        if key is not None:
            if self.keyed_run(thread_id, key, message) is not None:  # a caller that did not ask first
                raise ServiceError(f"the message sent with Idempotency-Key {key!r} has already started a run",
                                   type="idempotency_key_in_use", status_code=409)
            self._keys[(thread_id, key)] = (message_digest(message), None)
            self._bound_keys()
        try:
            await self._take_thread(thread_id)
        except BaseException:
            self._forget_key(thread_id, key)  # never started: the same message may be sent again
            raise
        if not self.accepting:
            self._release_thread(thread_id)
            self._forget_key(thread_id, key)
            raise ShuttingDown(_NOT_ACCEPTING)
        self._expire()
        log = RunLog(
            new_run_id(),
            thread_id,
            correlation_id,
            max_events=self.settings.stream_max_events_per_run,
            max_bytes=self.settings.stream_max_bytes_per_run,
        )
        self._runs[log.run_id] = log
        if key is not None and (thread_id, key) in self._keys:
            self._keys[(thread_id, key)] = (self._keys[(thread_id, key)][0], log.run_id)
        self._task_group.create_task(self._run(log, message, key), name=f"run {log.run_id}")
        return log

    def _bound_keys(self) -> None:
        """Forget the oldest keys beyond _KEPT_KEYS whose runs have ended: forgetting one whose
        message still waits or runs would let it be sent again as new, the double answer keys prevent."""
        while len(self._keys) > _KEPT_KEYS:
            for entry, (_, run_id) in self._keys.items():
                if run_id is not None and (run_id not in self._runs or self._runs[run_id].finished):
                    del self._keys[entry]
                    break
            else:
                return  # every key kept is a message still waiting or running

    def _forget_key(self, thread_id: str, key: str | None) -> None:
        if key is not None and (thread_id, key) in self._keys and self._keys[(thread_id, key)][1] is None:
            del self._keys[(thread_id, key)]

    async def _run(self, log: RunLog, message: str, key: str | None) -> None:
        try:
            await execute_run(self.engine, self.registry, self.settings, log, message)
        finally:
            self._release_thread(log.thread_id)
            if key is not None and self._keys.get((log.thread_id, key), (b"", None))[1] == log.run_id:
                # Refused before it reached the model, for a reason that passes (OpenAI's rate
                # limit, a busy conversation, a shutdown): the message may be sent again as new.
                if log.error is not None and log.error.type in _REFUSALS_TO_RETRY and nothing_but_an_error(log):
                    del self._keys[(log.thread_id, key)]
            self._finished.append(log)
            self._expire()
            note_ended()  # towards the next full garbage collection

    async def _take_thread(self, thread_id: str) -> None:
        """Wait until the thread is this message's, in the order messages came; `ThreadBusy`
        after THREAD_LOCK_TIMEOUT_SECONDS, `ShuttingDown` at once when the shutdown begins (the
        message would not run, so its client may send it elsewhere now). A run's end hands the
        thread straight to the message that waited longest, so one arriving in that moment
        cannot take it first."""
        if thread_id not in self._busy_threads:
            self._busy_threads[thread_id] = None
            return
        waiting = self._busy_threads[thread_id]
        if waiting is None:
            waiting = self._busy_threads[thread_id] = anyio.Semaphore(0)
        try:
            with anyio.move_on_after(self.settings.thread_lock_timeout_seconds) as wait:
                self._waits.add(wait)
                await waiting.acquire()
                return
        finally:
            self._waits.discard(wait)
            # Handed the thread just as it gave up (timed out, its client left, the shutdown),
            # it passed it on; with no one else waiting the thread is free.
            if waiting.value and self._busy_threads.get(thread_id) is waiting:
                del self._busy_threads[thread_id]
        if not self.accepting:
            raise ShuttingDown(_NOT_ACCEPTING)
        raise ThreadBusy("another message on this thread is still being answered")

    def _release_thread(self, thread_id: str) -> None:
        """The thread's run ended: the next waiting message gets the thread, or it is free."""
        waiting = self._busy_threads[thread_id]
        if waiting is not None and waiting.statistics().tasks_waiting:
            waiting.release()
        else:
            del self._busy_threads[thread_id]

    def resumable(self, run_id: str, after: int) -> RunLog:
        """The run's log, if every event after position `after` is still kept."""
        log = self.lookup(run_id)
        if after > log.last_seq:  # never sent: resuming there would skip what was not
            raise BadRequest(f"run {run_id!r} has no event {after} yet (its last is {log.last_seq})")
        if after < log.first_seq - 1:
            raise NotFound(
                f"events after {after} of run {run_id!r} are no longer kept (STREAM_MAX_EVENTS_PER_RUN, "
                "STREAM_MAX_BYTES_PER_RUN)",
                type="events_dropped",
            )
        return log

    def stop(self, run_id: str, reason: str) -> RunLog:
        """A client's "stop generating": `cancel`, or the error saying why it cannot be."""
        log = self.lookup(run_id)
        if not self.cancel(run_id, reason):
            raise ServiceError(f"run {run_id!r} has already ended", type="run_finished", status_code=409)
        return log

    def cancel(self, run_id: str, reason: str) -> bool:
        """Stop a run that is still going; False when it is unknown, over or already ending."""
        log = self._runs.get(run_id)
        if log is None or log.finished or log.outcome is not None:
            return False
        if log.cancel_reason is not None:
            return True  # already being stopped: a second stop gets the same answer
        if log.ending:
            return False  # ending on its own (an error): nothing left to stop
        log.cancel_reason = reason
        if log.cancel_scope is not None:  # else its task has not started: it stops on starting
            log.cancel_scope.cancel()
        return True

    def _expire(self) -> None:
        """Drop finished runs past their retention time, and the oldest beyond STREAM_MAX_RUNS."""
        cutoff = time.monotonic() - self.settings.stream_retention_seconds
        while self._finished and (
            (self._finished[0].finished_at or 0) <= cutoff or len(self._finished) > self.settings.stream_max_runs
        ):
            run_id = self._finished.popleft().run_id
            self._runs.pop(run_id, None)
            self._forgotten[run_id] = None
            if len(self._forgotten) > _FORGOTTEN_IDS:
                self._forgotten.popitem(last=False)

    async def _expire_until_shutdown(self) -> None:
        """Expiry on a timer as well, so a service gone quiet after a burst frees the burst's
        logs (up to STREAM_MAX_RUNS of them) instead of holding them until its next request."""
        period = min(max(self.settings.stream_retention_seconds, 0.05), 60.0)
        while self.accepting:
            with anyio.move_on_after(period):
                await self._shutdown_requested.wait()
            self._expire()

    def begin_shutdown(self) -> None:
        """Take no new runs from now on, and end the running ones after the grace period.

        A plain function, so a signal handler can call it through the event loop.
        """
        self.accepting = False
        self._shutdown_requested.set()
        for wait in self._waits:
            wait.cancel()
        for callback in list(self.on_shutdown):
            callback()

    async def _shutdown_when_requested(self) -> None:
        await self._shutdown_requested.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Take no new runs; give running ones the grace period, then end them with an error."""
        self.accepting = False
        running = self.active_runs
        if not running:
            return
        logger.info("waiting for %d running runs to finish", len(running))
        with anyio.move_on_after(self.settings.shutdown_grace_seconds):
            for log in running:
                await log.wait_finished()
        for log in self.active_runs:
            if log.outcome is None and not log.ending:  # else it ends as it was ending
                log.error = ShuttingDown("the service is shutting down; send the message again")
            if log.cancel_scope is not None:
                log.cancel_scope.cancel()


def on_termination_signal(callback: Callable[[], None]) -> None:
    """Call `callback` (in the event loop) on SIGTERM or SIGINT, before the server's own handling.

    hypercorn handles these itself and tells the app only after it stopped waiting for open
    connections; chaining in front of its handler lets runs end cleanly within that time. (Under
    `--workers 1` or more, its worker sees the signal when it is sent to the whole process group,
    as Heroku, systemd and a terminal's Ctrl+C do; a signal to hypercorn's parent process alone is
    not passed on. The Procfile's hypercorn is one process: hypercorn_config.py.)
    """
    if threading.current_thread() is not threading.main_thread():
        return  # signals can only be handled there (not the case under a test client)
    loop = asyncio.get_running_loop()
    # In hypercorn's worker (`--workers 1` or more) the parent owns the shutdown and installs no
    # handler here: a signal to the worker alone would leave it refusing turns for good, so it is
    # passed on to the parent, whose shutdown then stops this worker as a group signal does.
    parent = multiprocessing.parent_process()
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        owner = parent.pid if parent is not None and not callable(previous) else None

        def handle(signum: int, frame: FrameType | None, previous: Any = previous, owner: int | None = owner) -> None:
            loop.call_soon_threadsafe(callback)
            if callable(previous):
                previous(signum, frame)
            elif owner is not None:
                with contextlib.suppress(OSError):
                    os.kill(owner, signum)

        signal.signal(signum, handle)

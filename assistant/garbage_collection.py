"""When the garbage collector walks every object: once every 10,000 connections and runs ended,
not when Python's own rule says.

A full collection walks every object the collector tracks, ~0.15-0.2 ms per open stream (1,000
streams: 140-230 ms with no delta sent meanwhile): each one stalls every stream. What it would
free is what is left in reference cycles that outlived a few young collections; short-lived
cycles go in the young collections. Ended connections and runs leave none (hypercorn's cycle in
each connection is broken as it ends, hypercorn_mends.py; asyncio's in each socket transport as
its connection is lost, here): with 1,000 streams coming and going, a full collection found
42-500 objects where it had found 16,000-20,000, and still stalled every stream for 0.2 s
(bench/RESULTS.md, "Session 21"). So it is made rarely, for garbage from anywhere else (a
cancelled task's traceback, an error's).
Python starts one after so many collections of the middle generation, once the objects promoted
to the oldest since the last one are a quarter of those it holds; with many streams open those
are mostly the streams' current waits, promoted by the young collections they happen to outlive
and freed a moment later, so the quarter is always reached: 1,000 streams x 10 deltas/s got a
full collection every 20-40 s that found next to nothing (bench/RESULTS.md, "Session 19").
Counted by connections and runs ended, they leave long streams alone, and come as the service's
traffic makes new objects. Python's rule stays, 20 times rarer, as a backstop.
"""

from __future__ import annotations

import gc
from asyncio import selector_events

# Connections and runs ended between two full collections: under churn (a new connection and a
# run per turn), one every 5,000 turns.
FULL_COLLECTION_EVERY = 10_000
# Python's rule, kept as a backstop: a full collection after this many collections of the middle
# generation (its default is 10).
_PYTHON_FULL_THRESHOLD = 1000

_ended = 0


def tune_garbage_collector() -> None:
    """Take what start-up built out of every collection, make Python's own full collections
    rare (`note_ended` starts them), and have closed socket transports freed without one."""
    gc.collect()  # what start-up left as garbage is freed, not frozen
    # What start-up built (modules, the SDK's models, the tool schemas) lives as long as the
    # process: the collector need not walk it again.
    gc.freeze()
    gc.set_threshold(700, 10, _PYTHON_FULL_THRESHOLD)
    if _count_from_full_collections not in gc.callbacks:
        gc.callbacks.append(_count_from_full_collections)
    free_closed_transports()


def free_closed_transports() -> None:
    """Free each asyncio socket transport as its connection is lost, not in a full collection.

    A socket transport refers to itself through a bound method (`_read_ready_cb`; since Python
    3.12 also `_write_ready`), so a closed one, with its socket, waited for a full collection
    once it had lived past a few young ones: every long stream's connection, and every pooled
    upstream connection. Python 3.12 drops them in `close()` (gh-100348); this drops them once
    the connection is lost, which an aborted transport reaches too, on every version."""
    selector_events._SelectorSocketTransport._call_connection_lost = (  # type: ignore[method-assign]
        _call_connection_lost_then_free
    )


_asyncio_call_connection_lost = selector_events._SelectorSocketTransport._call_connection_lost


def _call_connection_lost_then_free(self: selector_events._SelectorSocketTransport, exc: BaseException | None) -> None:
    """asyncio's, then the self-references dropped: by now the loop calls no reader or writer of it."""
    try:
        _asyncio_call_connection_lost(self, exc)
    finally:
        self._read_ready_cb = None
        if "_write_ready" in vars(self):
            self._write_ready = None


def note_ended() -> None:
    """A connection or a run ended: after every FULL_COLLECTION_EVERY of them (counted from the
    last full collection, whoever made it), a full collection. Counted as they end, not as they
    begin: 1,000 streams opened together would otherwise set one off just as they all wait."""
    global _ended
    _ended += 1
    if _ended >= FULL_COLLECTION_EVERY:
        _ended = 0
        gc.collect()


def _count_from_full_collections(phase: str, info: dict[str, int]) -> None:
    global _ended
    if phase == "stop" and info["generation"] == 2:
        _ended = 0

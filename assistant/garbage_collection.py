"""When the garbage collector walks every object: once every 1,000 connections and runs ended,
not when Python's own rule says.

A full collection walks every object the collector tracks, ~0.15-0.2 ms per open stream (1,000
streams: 140-230 ms with no delta sent meanwhile): each one stalls every stream. What it frees
here is mostly what ended connections and runs leave in reference cycles (hypercorn's connection,
~8 KiB each; a run's tasks and exceptions); short-lived cycles go in the young collections.
Python starts one after so many collections of the middle generation, once the objects promoted
to the oldest since the last one are a quarter of those it holds; with many streams open those
are mostly the streams' current waits, promoted by the young collections they happen to outlive
and freed a moment later, so the quarter is always reached: 1,000 streams x 10 deltas/s got a
full collection every 20-40 s that found next to nothing (bench/RESULTS.md, "Session 19").
Counted by connections and runs ended, they leave long streams alone, and under connection churn
(bench scenario E) they come more often than Python's rule made them, each much shorter, and
memory grows less. Python's rule stays, 20 times rarer, for garbage from anywhere else.
"""

from __future__ import annotations

import gc

# Connections and runs ended between two full collections: under churn (a new connection and a
# run per turn), one every 500 turns.
FULL_COLLECTION_EVERY = 1000
# Python's rule, kept as a backstop: a full collection after this many collections of the middle
# generation (its default is 10).
_PYTHON_FULL_THRESHOLD = 1000

_ended = 0


def tune_garbage_collector() -> None:
    """Take what start-up built out of every collection and make Python's own full collections
    rare: `note_ended` starts them."""
    gc.collect()  # what start-up left as garbage is freed, not frozen
    # What start-up built (modules, the SDK's models, the tool schemas) lives as long as the
    # process: the collector need not walk it again.
    gc.freeze()
    gc.set_threshold(700, 10, _PYTHON_FULL_THRESHOLD)
    if _count_from_full_collections not in gc.callbacks:
        gc.callbacks.append(_count_from_full_collections)


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

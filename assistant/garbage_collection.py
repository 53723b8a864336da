"""When the garbage collector walks every object: once every 1,000 connections and runs ended,
not when Python's own count says.

A full collection walks every object the collector tracks, ~0.15-0.2 ms per open stream (1,000
streams: 150-200 ms with no delta sent meanwhile): each one stalls every stream. What it frees
here is mostly what ended connections and runs leave in reference cycles (hypercorn's connection,
~8 KiB each; a run's tasks and exceptions); short-lived cycles go in the young collections.
Python starts one by counting the objects that reach its oldest generation, and with many
streams open those are mostly the streams' current waits, promoted by the young collections they
happen to outlive and freed a moment later: 1,000 streams x 10 deltas/s got a full collection
every 20-40 s that found next to nothing (bench/RESULTS.md, "Session 19"). Counted by
connections and runs ended, full collections come as often as before under connection churn
(bench scenario E), where they keep memory level, and leave long streams alone. Python's own
trigger stays, 20 times rarer, for garbage from anywhere else.
"""

from __future__ import annotations

import gc

# Connections and runs ended between two full collections. Under churn (a new connection and a
# run per turn) that is one every 500 turns: about as often as Python's own trigger made them.
FULL_COLLECTION_EVERY = 1000
# Python's trigger, kept as a backstop: a full collection after this many collections of the
# middle generation (its default is 10; the service had 50 until session 19).
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

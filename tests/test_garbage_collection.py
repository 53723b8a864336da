"""assistant/garbage_collection.py: a full collection after every FULL_COLLECTION_EVERY
connections and runs ended, counted from the last full collection whoever made it (how
connections and runs are counted: tests/test_hypercorn_mends.py, tests/test_chat_api.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import sys
import weakref
from asyncio import selector_events
from collections.abc import Iterator

import pytest

from assistant import garbage_collection


@pytest.fixture
def full_collections(monkeypatch: pytest.MonkeyPatch, no_automatic_gc: None) -> Iterator[list[int]]:
    """The full collections made from here on (what each found), every third ending counted;
    no automatic collection in between (gc.collect works)."""
    transport_class = selector_events._SelectorSocketTransport
    monkeypatch.setattr(transport_class, "_call_connection_lost", transport_class._call_connection_lost)
    monkeypatch.setattr(garbage_collection, "FULL_COLLECTION_EVERY", 3)
    monkeypatch.setattr(garbage_collection, "_ended", 0)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # the rest of the test process stays walked
    threshold = gc.get_threshold()
    registered = garbage_collection._count_from_full_collections in gc.callbacks
    made: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            made.append(info["collected"])

    gc.callbacks.append(seen)
    try:
        yield made
    finally:
        gc.callbacks.remove(seen)
        if not registered and garbage_collection._count_from_full_collections in gc.callbacks:
            gc.callbacks.remove(garbage_collection._count_from_full_collections)
        gc.set_threshold(*threshold)


def test_every_third_ending_makes_one_full_collection(full_collections: list[int]) -> None:
    for _ in range(2):
        garbage_collection.note_ended()
    assert full_collections == []
    garbage_collection.note_ended()
    assert len(full_collections) == 1
    for _ in range(5):
        garbage_collection.note_ended()
    assert len(full_collections) == 2


def test_what_the_full_collection_frees_is_the_cycles_left_behind(full_collections: list[int]) -> None:
    class Connection:
        pass

    for _ in range(3):
        left = Connection()
        left.itself = left  # a reference cycle, as hypercorn's ended connections leave
        del left
        garbage_collection.note_ended()
    assert len(full_collections) == 1 and full_collections[0] >= 3


def test_a_full_collection_made_elsewhere_starts_the_count_again(full_collections: list[int]) -> None:
    garbage_collection.tune_garbage_collector()
    garbage_collection.tune_garbage_collector()  # every app's start-up calls it: one callback
    assert gc.callbacks.count(garbage_collection._count_from_full_collections) == 1
    garbage_collection.note_ended()
    garbage_collection.note_ended()
    gc.collect()  # Python's own trigger, or anyone's
    full_collections.clear()
    garbage_collection.note_ended()
    garbage_collection.note_ended()
    assert full_collections == []
    garbage_collection.note_ended()
    assert len(full_collections) == 1


def test_young_collections_do_not_start_the_count_again(full_collections: list[int]) -> None:
    garbage_collection.tune_garbage_collector()
    full_collections.clear()
    garbage_collection.note_ended()
    garbage_collection.note_ended()
    gc.collect(1)
    garbage_collection.note_ended()
    assert len(full_collections) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["close", "abort"])
@pytest.mark.parametrize("mended", [True, False])
@pytest.mark.usefixtures("no_automatic_gc")
async def test_a_closed_socket_transport_is_freed_without_the_garbage_collector(
    monkeypatch: pytest.MonkeyPatch, mended: bool, ending: str
) -> None:
    """asyncio's socket transport refers to itself: a long connection's waited for a full
    collection once closed or aborted."""
    transport_class = selector_events._SelectorSocketTransport
    monkeypatch.setattr(transport_class, "_call_connection_lost", garbage_collection._asyncio_call_connection_lost)
    if mended:
        garbage_collection.free_closed_transports()
        garbage_collection.free_closed_transports()  # every app's start-up calls it: applied once
        assert transport_class._call_connection_lost is garbage_collection._call_connection_lost_then_free
    here, there = socket.socketpair()
    try:
        reader, writer = await asyncio.open_connection(sock=here)
        transport = weakref.ref(writer.transport)
        there.sendall(b"hello")
        assert await reader.readexactly(5) == b"hello"  # it has read
        if ending == "close":
            writer.close()
        else:
            writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        del reader, writer
        await asyncio.sleep(0)
        alive = transport() is not None
    finally:
        there.close()
    # Python 3.12 frees a closed one itself (gh-100348), not an aborted one.
    freed_by_asyncio = ending == "close" and sys.version_info >= (3, 12)
    assert alive is not (mended or freed_by_asyncio)

"""Tests of RunLog: one writer, any number of live readers, bounded memory."""

from __future__ import annotations

import gc
import tracemalloc

import anyio
import pytest

from assistant.errors import RunCancelled, UpstreamError
from assistant.events import (
    ERROR,
    MESSAGE_COMPLETED,
    MESSAGE_DELTA,
    METADATA,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_FAILED,
    Event,
)
from assistant.orchestrator import run_answer
from assistant.run_log import EventsDropped, RunLog, Wakeup

TIMEOUT = 2  # seconds; a hung reader fails the test instead of the suite


def delta(i: int) -> Event:
    return Event(MESSAGE_DELTA, {"delta": {"content": str(i)}})


def new_log(**kwargs: int) -> RunLog:
    return RunLog("run_1", "thread_1", "corr_1", **kwargs)


async def collect(log: RunLog, after: int = 0) -> list[tuple[int, Event]]:
    out: list[tuple[int, Event]] = []
    async for batch in log.follow(after):
        assert batch, "follow must never yield an empty batch"
        out.extend(batch)
        assert len(out) <= 1000, "follow repeats events"  # every test here writes far fewer
    return out


async def write(log: RunLog, count: int, *, pause: float = 0.002, end: Event | None = Event(METADATA, {})) -> None:
    for i in range(1, count + 1):
        await anyio.sleep(pause)
        log.append(delta(i))
    if end is not None:
        await anyio.sleep(pause)
        log.append(end)


def contents(items: list[tuple[int, Event]]) -> list[str]:
    return [e.data["delta"]["content"] if e.name == MESSAGE_DELTA else e.name for _, e in items]


# --------------------------------------------------------------------------------------------
# synchronous API


def test_attributes() -> None:
    log = RunLog("run_x", "thread_y", "corr_z", max_events=7)
    assert (log.run_id, log.thread_id, log.correlation_id, log.max_events) == ("run_x", "thread_y", "corr_z", 7)
    assert log.finished is False and log.finished_at is None
    assert log.last_seq == 0
    assert log.events() == [] and log.events_after(0) == []


def test_sequence_numbers_start_at_one_and_increase() -> None:
    log = new_log()
    assert [log.append(delta(i)) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    assert log.last_seq == 5
    assert log.events() == [delta(i) for i in range(1, 6)]


def test_events_after() -> None:
    log = new_log()
    for i in range(1, 6):
        log.append(delta(i))
    assert log.events_after(0) == [(i, delta(i)) for i in range(1, 6)]
    assert log.events_after(3) == [(4, delta(4)), (5, delta(5))]
    assert log.events_after(5) == []
    assert log.events_after(9) == []


def test_events_returns_a_copy() -> None:
    log = new_log()
    log.append(delta(1))
    log.events().clear()
    assert log.events() == [delta(1)]


@pytest.mark.parametrize("last", [METADATA, ERROR])
def test_stream_end_finishes_the_log_and_append_then_raises(last: str) -> None:
    log = new_log()
    log.append(delta(1))
    assert log.append(Event(last, {"x": 1})) == 2
    assert log.finished is True and log.finished_at is not None
    with pytest.raises(RuntimeError, match="run_1"):
        log.append(delta(3))
    assert log.last_seq == 2 and len(log.events()) == 2


@pytest.mark.parametrize("outcome", [RUN_COMPLETED, RUN_FAILED, RUN_CANCELLED, MESSAGE_DELTA])
def test_run_outcomes_do_not_end_the_stream(outcome: str) -> None:
    # A run outcome is followed by `metadata` or `error`: only those end the stream.
    log = new_log()
    log.append(Event(outcome, {}))
    assert log.finished is False
    assert log.append(Event(METADATA, {})) == 2
    assert log.finished is True


def test_max_events_drops_the_oldest() -> None:
    log = new_log(max_events=3)
    assert [log.append(delta(i)) for i in range(1, 6)] == [1, 2, 3, 4, 5]  # numbering is unaffected
    assert log.last_seq == 5
    assert log.events() == [delta(3), delta(4), delta(5)]
    assert log.events_after(2) == [(3, delta(3)), (4, delta(4)), (5, delta(5))]
    assert log.events_after(4) == [(5, delta(5))]
    for behind in (0, 1):
        with pytest.raises(EventsDropped, match="run_1"):
            log.events_after(behind)


def test_max_events_one() -> None:
    log = new_log(max_events=1)
    for i in range(1, 4):
        log.append(delta(i))
    assert log.events_after(2) == [(3, delta(3))]
    with pytest.raises(EventsDropped):
        log.events_after(1)


# --------------------------------------------------------------------------------------------
# follow


@pytest.mark.anyio
async def test_follow_finished_log_from_zero_and_from_k() -> None:
    log = new_log()
    for i in range(1, 6):
        log.append(delta(i))
    log.append(Event(METADATA, {}))
    with anyio.fail_after(TIMEOUT):
        assert await collect(log) == log.events_after(0)
        assert [seq for seq, _ in await collect(log, 3)] == [4, 5, 6]
        assert await collect(log, 6) == []


@pytest.mark.anyio
@pytest.mark.parametrize("last", [METADATA, ERROR])
async def test_follow_ends_after_stream_end(last: str) -> None:
    log = new_log()
    results: list[list[tuple[int, Event]]] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                results.append(await collect(log))

            tg.start_soon(reader)
            await write(log, 3, end=Event(last, {"done": True}))
    assert contents(results[0]) == ["1", "2", "3", last]
    assert [seq for seq, _ in results[0]] == [1, 2, 3, 4]


@pytest.mark.anyio
async def test_live_reader_gets_every_event_in_order_without_duplicates() -> None:
    log = new_log()
    count = 40
    results: list[list[tuple[int, Event]]] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                results.append(await collect(log))

            tg.start_soon(reader)
            await write(log, count)
    (got,) = results
    assert [seq for seq, _ in got] == list(range(1, count + 2))
    assert contents(got) == [str(i) for i in range(1, count + 1)] + [METADATA]


@pytest.mark.anyio
async def test_live_reader_sees_events_as_they_arrive() -> None:
    # Not only at the end: each batch is handed over while the writer is still writing.
    log = new_log()
    seen_at: list[tuple[int, int]] = []  # (seq received, last_seq at that moment)
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                async for batch in log.follow(0):
                    seen_at.extend((seq, log.last_seq) for seq, _ in batch)

            tg.start_soon(reader)
            await write(log, 10, pause=0.01)
    assert [seq for seq, _ in seen_at] == list(range(1, 12))
    assert all(seq == last for seq, last in seen_at)  # received before the next one was written


@pytest.mark.anyio
async def test_reader_joining_midway_from_k() -> None:
    log = new_log()
    for i in range(1, 6):
        log.append(delta(i))
    results: list[list[tuple[int, Event]]] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                results.append(await collect(log, after=3))

            tg.start_soon(reader)
            for i in range(6, 11):
                await anyio.sleep(0.002)
                log.append(delta(i))
            log.append(Event(METADATA, {}))
    assert [seq for seq, _ in results[0]] == list(range(4, 12))
    assert contents(results[0]) == [str(i) for i in range(4, 11)] + [METADATA]


@pytest.mark.anyio
async def test_concurrent_readers_all_get_the_full_sequence() -> None:
    log = new_log()
    count = 30
    results: dict[str, list[tuple[int, Event]]] = {}
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader(name: str, after: int, start_delay: float) -> None:
                await anyio.sleep(start_delay)
                results[name] = await collect(log, after)

            for n in range(5):
                tg.start_soon(reader, f"early{n}", 0, 0)
            tg.start_soon(reader, "late", 0, 0.03)  # joins while the writer is mid-way
            tg.start_soon(reader, "late_from_10", 10, 0.03)
            await write(log, count)
    expected = list(range(1, count + 2))
    for name in [f"early{n}" for n in range(5)] + ["late"]:
        assert [seq for seq, _ in results[name]] == expected, name
        assert results[name] == results["early0"], name
    assert [seq for seq, _ in results["late_from_10"]] == expected[10:]


@pytest.mark.anyio
async def test_reader_behind_the_window_gets_events_dropped() -> None:
    log = new_log(max_events=3)
    log.append(delta(1))
    follower = log.follow(0)
    with anyio.fail_after(TIMEOUT):
        assert await follower.__anext__() == [(1, delta(1))]
        for i in range(2, 8):  # the reader is paused while six more events arrive
            log.append(delta(i))
        with pytest.raises(EventsDropped):
            await follower.__anext__()


@pytest.mark.anyio
async def test_follow_from_a_dropped_position_raises_at_once() -> None:
    log = new_log(max_events=2)
    for i in range(1, 5):
        log.append(delta(i))
    with anyio.fail_after(TIMEOUT):
        with pytest.raises(EventsDropped):
            await collect(log, 1)
        assert [seq for seq, _ in (await log.follow(2).__anext__())] == [3, 4]


@pytest.mark.anyio
async def test_reader_keeping_up_with_a_small_window_gets_everything() -> None:
    log = new_log(max_events=2)
    results: list[list[tuple[int, Event]]] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                results.append(await collect(log))

            tg.start_soon(reader)
            await write(log, 15)
    assert [seq for seq, _ in results[0]] == list(range(1, 17))


# --------------------------------------------------------------------------------------------
# waiting


@pytest.mark.anyio
async def test_wait_finished_returns_only_after_stream_end() -> None:
    log = new_log()
    observed: list[tuple[bool, int]] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                await log.wait_finished()
                observed.append((log.finished, log.last_seq))

            tg.start_soon(waiter)
            tg.start_soon(waiter)
            for i in range(1, 6):
                await anyio.sleep(0.003)
                log.append(delta(i))
                await anyio.sleep(0)
                assert observed == []  # ordinary events do not release the waiters
            log.append(Event(RUN_COMPLETED, {}))
            await anyio.sleep(0.01)
            assert observed == []
            log.append(Event(ERROR, {"error": "x"}))
    assert observed == [(True, 7), (True, 7)]


@pytest.mark.anyio
async def test_wait_finished_on_a_finished_log_returns_at_once() -> None:
    log = new_log()
    log.append(Event(METADATA, {}))
    with anyio.fail_after(0.5):
        await log.wait_finished()


@pytest.mark.anyio
async def test_wait_beyond() -> None:
    log = new_log()
    log.append(delta(1))
    with anyio.fail_after(TIMEOUT):
        await log.wait_beyond(0)  # already there: returns at once
        woke: list[int] = []
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                await log.wait_beyond(1)
                woke.append(log.last_seq)

            tg.start_soon(waiter)
            await anyio.sleep(0.01)
            assert woke == []
            log.append(delta(2))
        assert woke == [2]
        # A finished log never blocks, even when asked about a position beyond its end.
        log.append(Event(METADATA, {}))
        await log.wait_beyond(100)


def test_a_kept_event_costs_its_size_not_a_serializer_buffer() -> None:
    """orjson's result keeps a 4 KiB allocation however short the JSON; a log keeps every event."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [Event("thread.message.delta", {"delta": {"content": f"word{i} "}}).encoded for i in range(200)]
        per_event = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_event < 512, f"{per_event:.0f} bytes per encoded event"


def test_kept_events_are_not_walked_by_the_garbage_collector() -> None:
    """A full collection walks every tracked object and stalls every stream meanwhile: the events
    that open and retained runs keep (hundreds of thousands) must not be among them."""
    log = new_log()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2000):
        log.append(delta(i))
    gc.collect()  # untracks what it can; tracked objects stay listed
    added = len(gc.get_objects()) - before
    assert added < 20, f"{added} more objects for the collector to walk after 2,000 events"
    assert log.events_after(1998) == [(1999, delta(1998)), (2000, delta(1999))]


def test_a_logged_event_costs_its_json_not_its_data() -> None:
    log = new_log()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(500):
            log.append(Event(MESSAGE_DELTA, {"delta": {"content": f"word{i} "}}))
        per_event = (tracemalloc.get_traced_memory()[0] - before) / 500
    finally:
        tracemalloc.stop()
    # The JSON is ~35 bytes (+33 for the bytes object); the data's two dicts would add ~400.
    assert per_event < 160, f"{per_event:.0f} bytes per logged event"


@pytest.mark.anyio
async def test_readers_cancelled_while_waiting_leave_no_waiters() -> None:
    """JSON clients waiting for a long run and leaving (a timeout, a disconnect) cost it nothing."""
    log = new_log()
    log.append(delta(1))
    for _ in range(50):
        with anyio.move_on_after(0.001):
            await log.wait_finished()
    assert log._waiters == []


@pytest.mark.anyio
@pytest.mark.parametrize("answer", ["marked", "run ended"])
async def test_wait_upstream_answered_returns_once_marked_or_once_the_run_ended(answer: str) -> None:
    log = new_log()
    woke: list[bool] = []
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                await log.wait_upstream_answered()
                woke.append(log.upstream_answered)

            tg.start_soon(waiter)
            log.append(delta(1))
            await anyio.sleep(0.01)
            assert woke == []  # events alone do not answer
            if answer == "marked":
                log.mark_upstream_answered()
            else:
                log.append(Event(ERROR, {"error": "x"}))
        assert woke == [True]
        await log.wait_upstream_answered()  # at once from now on
    assert log._waiters == []


@pytest.mark.anyio
async def test_a_wakeup_wakes_once_and_setting_it_again_or_after_a_cancelled_wait_is_harmless() -> None:
    with anyio.fail_after(TIMEOUT):
        early = Wakeup()
        early.set()
        early.set()
        await early  # set before the wait: returns at once
        abandoned = Wakeup()
        with anyio.move_on_after(0.01):
            await abandoned
        abandoned.set()  # the reader left (its wait was cancelled): nothing to wake, no error
        later = Wakeup()
        woke = []

        async def wait_later() -> None:
            await later
            woke.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_later)
            await anyio.sleep(0.01)
            assert woke == []
            later.set()
    assert woke == [True]


@pytest.mark.anyio
async def test_a_json_answer_has_every_message_though_old_events_were_dropped() -> None:
    log = RunLog("run_1", "thread_1", "corr", max_events=2)
    log.append(Event("thread.run.created", {}))
    for text in ("Let me check.", "It is sunny."):
        log.append(Event(MESSAGE_DELTA, {"delta": {"content": text}}))
        log.append(Event(MESSAGE_COMPLETED, {"message": {"id": "msg", "content": text}}))
    log.append(Event(RUN_COMPLETED, {}))
    log.append(Event(METADATA, {}))
    assert log.first_seq > 5  # both messages' events are gone from the log
    answer = await run_answer(log, "corr")
    assert answer["responses"] == ["Let me check.", "It is sunny."]


@pytest.mark.anyio
@pytest.mark.parametrize(("outcome", "error"), [(RUN_FAILED, UpstreamError), (RUN_CANCELLED, RunCancelled)])
async def test_a_json_answer_knows_the_outcome_though_its_event_was_dropped(
    outcome: str, error: type[Exception]
) -> None:
    log = RunLog("run_1", "thread_1", "corr", max_events=1)
    log.append(Event(MESSAGE_COMPLETED, {"message": {"id": "msg", "content": "partial"}}))
    log.append(Event(outcome, {"error": "it broke", "type": "run_failed", "reason": "cancelled by the client"}))
    log.append(Event(METADATA, {}))
    assert [e.name for e in log.events()] == [METADATA]
    with pytest.raises(error):
        await run_answer(log, "corr")

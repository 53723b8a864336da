"""Resumable streams, fast: RunLog, RunManager retention, and the HTTP/WebSocket resume API in-process.

The end-to-end counterpart (real hypercorn, dropped sockets, a real EventSource) is
tests/test_e2e_resume.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest
import respx
from starlette.testclient import TestClient

from assistant import run_manager
from assistant.config import load_settings
from assistant.errors import NotFound, ServiceError, UpstreamError
from assistant.events import (
    ERROR,
    MESSAGE_DELTA,
    METADATA,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_CREATED,
    RUN_FAILED,
    Event,
)
from assistant.run_log import EventsDropped, RunLog
from assistant.run_manager import RunManager
from assistant.sse_stream_handler import SSEResponse
from assistant.tool_executor import ToolCall, ToolRegistry
from assistant.upstream_sse import DeliverEvents, deliver_batches
from tests.test_chat_api import JSON, SSE, chat, events_of, make_client, parse_sse
from tests.upstream_mock import sse_response, text_events, upstream  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5  # seconds: a hung reader fails its test, not the suite
RESUMED = "thread.run.resumed"


def delta(i: int, size: int = 0) -> Event:
    return Event(MESSAGE_DELTA, {"delta": {"content": str(i) + "x" * size}})


def new_log(**caps: int) -> RunLog:
    return RunLog("run_r", "thread_r", "corr_r", **caps)


def seqs(batch: list[tuple[int, Event]]) -> list[int]:
    return [seq for seq, _ in batch]


async def collect(log: RunLog, after: int = 0) -> list[tuple[int, Event]]:
    got: list[tuple[int, Event]] = []
    with anyio.fail_after(TIMEOUT):
        async for batch in log.follow(after):
            assert batch, "follow yielded an empty batch"
            got.extend(batch)
    return got


# ==============================================================================================
# RunLog


def test_runlog_sequence_numbers_and_order() -> None:
    log = new_log()
    assert [log.append(delta(i)) for i in range(1, 8)] == list(range(1, 8))
    assert log.first_seq == 1 and log.last_seq == 7
    assert log.events_after(0) == [(i, delta(i)) for i in range(1, 8)]
    assert log.events_after(4) == [(5, delta(5)), (6, delta(6)), (7, delta(7))]
    assert log.events_after(7) == [] and log.events_after(50) == []
    assert not log.finished
    assert log.append(Event(METADATA, {})) == 8
    assert log.finished and log.finished_at is not None
    with pytest.raises(RuntimeError):
        log.append(delta(9))


def test_runlog_event_cap_drops_the_oldest() -> None:
    log = new_log(max_events=5)
    for i in range(1, 13):
        assert log.append(delta(i)) == i
        assert len(log.events()) == min(i, 5)
        assert log.first_seq == max(1, i - 4)  # the window moves with every append past the cap
    assert log.events() == [delta(i) for i in range(8, 13)]
    assert log.last_seq == 12
    assert seqs(log.events_after(7)) == [8, 9, 10, 11, 12]  # exactly at the edge: still whole
    for behind in (0, 3, 6):
        with pytest.raises(EventsDropped):
            log.events_after(behind)
    assert log.size_bytes == sum(len(e.encoded) for e in log.events())


def test_runlog_byte_cap_drops_the_oldest_but_never_the_last() -> None:
    size = len(delta(1, 90).encoded)
    assert all(len(delta(i, 90).encoded) == size for i in range(1, 10))
    log = new_log(max_bytes=3 * size)
    for i in range(1, 8):
        log.append(delta(i, 90))
        assert log.size_bytes <= 3 * size
    assert log.events() == [delta(i, 90) for i in (5, 6, 7)]
    assert log.first_seq == 5 and log.size_bytes == 3 * size
    with pytest.raises(EventsDropped):
        log.events_after(3)
    # One event bigger than the whole cap: everything else goes, but it stays (never the last).
    big = Event(MESSAGE_DELTA, {"delta": {"content": "y" * (5 * size)}})
    assert log.append(big) == 8
    assert log.events() == [big] and log.first_seq == 8 and log.last_seq == 8
    assert log.size_bytes == len(big.encoded)
    assert log.events_after(7) == [(8, big)]
    # The next small event pushes the big one out.
    assert log.append(delta(9, 90)) == 9
    assert log.events() == [delta(9, 90)] and log.first_seq == 9 and log.size_bytes == size


def test_runlog_both_caps_and_the_terminal_event_is_kept() -> None:
    log = new_log(max_events=3, max_bytes=10_000)
    for i in range(1, 6):
        log.append(delta(i))
    log.append(Event(METADATA, {"end": True}))
    assert log.finished and log.first_seq == 4
    assert [e.name for e in log.events()][-1] == METADATA
    assert seqs(log.events_after(3)) == [4, 5, 6]


@pytest.mark.anyio
async def test_runlog_reader_behind_the_window_gets_events_dropped() -> None:
    log = new_log(max_events=5)
    follower = log.follow(0)
    log.append(delta(1))
    log.append(delta(2))
    with anyio.fail_after(TIMEOUT):
        assert seqs(await follower.__anext__()) == [1, 2]
        for i in range(3, 15):  # the reader does not run while these are written
            log.append(delta(i))
        with pytest.raises(EventsDropped):
            await follower.__anext__()
    # A reader asking from inside the window still gets everything it asks for.
    log.append(Event(METADATA, {}))
    assert seqs(await collect(log, after=log.first_seq - 1)) == list(range(11, 16))
    with pytest.raises(EventsDropped):
        await collect(log, after=0)


@pytest.mark.anyio
async def test_runlog_live_reader_falls_behind_while_waiting_is_told() -> None:
    """A reader that is parked waiting and then slow to come back sees EventsDropped, never a gap."""
    log = new_log(max_events=4)
    got: list[int] = []
    failure: list[BaseException] = []

    async def slow_reader() -> None:
        try:
            async for batch in log.follow(0):
                got.extend(seqs(batch))
                await anyio.sleep(0.05)  # meanwhile far more than the cap is written
        except EventsDropped as exc:
            failure.append(exc)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_reader)
            await anyio.sleep(0.01)
            log.append(delta(1))
            await anyio.sleep(0.01)
            for i in range(2, 20):
                log.append(delta(i))
            log.append(Event(METADATA, {}))
    assert failure, f"the reader was not told it fell behind; it got {got}"
    assert got == list(range(1, len(got) + 1))  # whatever it got had no gap


@pytest.mark.anyio
async def test_runlog_concurrent_readers_each_get_every_event_once_in_order() -> None:
    log = new_log()
    total = 150
    results: dict[str, list[tuple[int, Event]]] = {}

    async def reader(name: str, start_after_events: int, pause: float) -> None:
        while log.last_seq < start_after_events:
            await anyio.sleep(0.001)
        got: list[tuple[int, Event]] = []
        async for batch in log.follow(0):
            got.extend(batch)
            if pause:
                await anyio.sleep(pause)
        results[name] = got

    async def writer() -> None:
        for i in range(1, total + 1):
            log.append(delta(i))
            if i % 3 == 0:
                await anyio.sleep(0.001)
            elif i % 7 == 0:
                await anyio.sleep(0)
        log.append(Event(METADATA, {}))

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for n, (start, pause) in enumerate([(0, 0), (0, 0.003), (10, 0), (60, 0.002), (120, 0), (0, 0.0)]):
                tg.start_soon(reader, f"r{n}", start, pause)
            await anyio.sleep(0.005)
            tg.start_soon(writer)
    expected = [(i, delta(i)) for i in range(1, total + 1)] + [(total + 1, Event(METADATA, {}))]
    assert set(results) == {f"r{n}" for n in range(6)}
    for name, got in results.items():
        assert seqs(got) == list(range(1, total + 2)), name
        assert got == expected, name


@pytest.mark.anyio
async def test_runlog_follow_after_k_resumes_exactly_after_k() -> None:
    finished = new_log()
    for i in range(1, 11):
        finished.append(delta(i))
    finished.append(Event(METADATA, {}))
    for k in range(0, 12):
        assert seqs(await collect(finished, after=k)) == list(range(k + 1, 12)), k
    assert await collect(finished, after=40) == []

    # Live: readers that join at k while the writer is still writing.
    live = new_log()
    out: dict[int, list[int]] = {}

    async def join_at(k: int) -> None:
        while live.last_seq < k:
            await anyio.sleep(0.001)
        out[k] = seqs(await collect(live, after=k))

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for k in (0, 1, 5, 13, 29):
                tg.start_soon(join_at, k)
            for i in range(1, 30):
                live.append(delta(i))
                await anyio.sleep(0.002)
            live.append(Event(METADATA, {}))
    for k, got in out.items():
        assert got == list(range(k + 1, 31)), k


# ==============================================================================================
# The SSE handler alone


async def run_sse(response: SSEResponse, scope: dict[str, Any] | None = None) -> bytes:
    body: list[bytes] = []
    done = anyio.Event()

    async def receive() -> dict[str, Any]:
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    with anyio.fail_after(TIMEOUT):
        await response(scope or {"type": "http"}, receive, send)
    return b"".join(body)


def sse_response_for(log: RunLog, after: int = 0) -> SSEResponse:
    return SSEResponse(log, after=after, resumed=after > 0, heartbeat_seconds=1, retry_ms=300, slow_client_timeout_seconds=1)


@pytest.mark.anyio
async def test_sse_handler_frames_a_resumed_stream() -> None:
    log = new_log()
    for i in range(1, 6):
        log.append(delta(i))
    log.append(Event(METADATA, {}))
    items = parse_sse((await run_sse(sse_response_for(log, after=2))).decode())
    assert items[0] == {"retry": 300}
    assert items[1] == {"event": RESUMED, "id": None, "data": {
        "thread_id": "thread_r", "run_id": "run_r", "stream_url": "chat/stream/run_r", "after": "run_r:2"}}
    assert [(i["event"], i["id"]) for i in items[2:]] == [(MESSAGE_DELTA, f"run_r:{n}") for n in (3, 4, 5)] + [
        (METADATA, "run_r:6")]


@pytest.mark.anyio
async def test_sse_stream_that_fell_behind_the_cap_ends_with_an_events_dropped_error() -> None:
    log = new_log(max_events=10)
    for i in range(1, 16):  # the reader (after=0) is already behind the window
        log.append(delta(i))
    log.append(Event(METADATA, {}))
    scope = {"type": "http", "state": {"correlation_id": "the-reader"}}
    items = parse_sse((await run_sse(sse_response_for(log, after=0), scope)).decode())
    events = [i for i in items if "event" in i]
    assert events, f"the stream ended with nothing at all: {items}"
    assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "events_dropped", events[-1:]
    assert events[-1]["data"]["correlation_id"] == "the-reader"  # the request's, not the run's


@pytest.mark.anyio
async def test_head_on_a_live_runs_stream_answers_the_headers_at_once() -> None:
    """HEAD /chat/stream/{run_id} (Starlette answers HEAD on every GET route) gets the GET's status
    and headers, then ends: the server sends no body for HEAD, so following the live run would only
    hold the response open until the run ends, and with it the keep-alive connection, on which the
    client's next request (the GET it checked for) then waits for the run's end instead of streaming."""
    log = new_log()
    log.append(delta(1))
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    with anyio.fail_after(1):
        await sse_response_for(log, after=1)({"type": "http", "method": "HEAD"}, receive, send)
    assert not log.finished
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    assert dict(messages[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert [m["type"] for m in messages[1:]] == ["http.response.body"]
    assert messages[-1].get("body", b"") == b"" and not messages[-1].get("more_body", False)


# ==============================================================================================
# RunManager retention, with a stub engine


class StubParser:
    failure = None

    def __init__(self) -> None:
        self.tool_calls: list[Any] = []
        self.ended = False

    def parse(self, event: dict[str, Any]) -> list[Event]:
        if event["type"] == "end":
            self.ended = True
            return []
        return [Event(MESSAGE_DELTA, {"delta": {"content": event["text"]}})]


class StubEngine:
    """Answers every message with itself; a message in `gates` waits for its gate first."""

    name = "stub"

    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}

    async def create_thread(self) -> str:
        return "thread_stub"

    def new_parser(self, tracker: Any) -> StubParser:
        return StubParser()

    def first_input(self, thread_id: str, message: str) -> str:
        return message

    def next_input(self, parser: Any, results: Any) -> Any:
        raise AssertionError("the stub makes no tool calls")

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: str) -> AsyncIterator[DeliverEvents]:
        async def batches() -> AsyncIterator[list[dict[str, Any]]]:
            if turn_input in self.gates:
                await self.gates[turn_input].wait()
            yield [{"type": "text", "text": turn_input}, {"type": "end"}]

        yield functools.partial(deliver_batches, batches())

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        pass


class SettlingEngine(StubEngine):
    """Every round ends in a tool call, or fails (`fails`); settling one waits for `settled`."""

    def __init__(self, *, fails: bool = False) -> None:
        super().__init__()
        self.fails = fails
        self.settling = anyio.Event()
        self.settled = anyio.Event()

    def next_input(self, parser: Any, results: Any) -> str:
        return "results"

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: str) -> AsyncIterator[DeliverEvents]:
        async def batches() -> AsyncIterator[list[dict[str, Any]]]:
            if self.fails:
                raise UpstreamError("the upstream stream broke")
            yield [{"type": "call"}, {"type": "end"}]

        yield functools.partial(deliver_batches, batches())

    def new_parser(self, tracker: Any) -> StubParser:
        parser = StubParser()
        parse = parser.parse

        def parse_calls(event: dict[str, Any]) -> list[Event]:
            if event["type"] == "call":
                parser.tool_calls.append(ToolCall(call_id=f"call_{len(parser.tool_calls)}", name="nope", arguments="{}"))
                return []
            return parse(event)

        parser.parse = parse_calls  # type: ignore[method-assign]
        return parser

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        self.settling.set()
        await self.settled.wait()


@asynccontextmanager
async def manager(engine: StubEngine | None = None, **env: str) -> AsyncIterator[tuple[RunManager, StubEngine]]:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", **env})
    engine = engine or StubEngine()
    async with RunManager(engine, ToolRegistry({}, timeout=1), settings) as runs:  # type: ignore[arg-type]
        yield runs, engine
        for gate in engine.gates.values():
            gate.set()
        if isinstance(engine, SettlingEngine):
            engine.settled.set()


async def finished_run(runs: RunManager, thread_id: str, message: str = "hi") -> RunLog:
    log = await runs.start_run(thread_id, message, "corr")
    with anyio.fail_after(TIMEOUT):
        await log.wait_finished()
    assert [e.name for e in log.events()] == [RUN_CREATED, MESSAGE_DELTA, RUN_COMPLETED, METADATA]
    return log


def expect_not_found(runs: RunManager, run_id: str, type: str) -> None:
    with pytest.raises(NotFound) as caught:
        runs.lookup(run_id)
    assert caught.value.type == type
    assert caught.value.status_code == 404


@pytest.mark.anyio
async def test_finished_runs_expire_after_the_retention_time() -> None:
    async with manager(STREAM_RETENTION_SECONDS="0.3") as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        running = await runs.start_run("thread_running", "slow", "corr")
        log = await finished_run(runs, "thread_a")
        assert runs.lookup(log.run_id) is log
        await anyio.sleep(0.1)
        assert runs.lookup(log.run_id) is log  # still within the retention time
        await anyio.sleep(0.3)
        expect_not_found(runs, log.run_id, "run_expired")
        expect_not_found(runs, "run_never_seen", "run_not_found")
        assert runs.lookup(running.run_id) is running  # running runs are never dropped
        engine.gates["slow"].set()
        with anyio.fail_after(TIMEOUT):
            await running.wait_finished()
        assert runs.lookup(running.run_id) is running  # its retention starts when it ends
        await anyio.sleep(0.35)
        expect_not_found(runs, running.run_id, "run_expired")


@pytest.mark.anyio
async def test_a_quiet_service_frees_finished_runs_without_waiting_for_a_request() -> None:
    async with manager(STREAM_RETENTION_SECONDS="0.2") as (runs, engine):
        log = await finished_run(runs, "thread_a")
        assert log.run_id in runs._runs
        await anyio.sleep(0.6)  # nothing asks the manager anything meanwhile
        assert log.run_id not in runs._runs and log.run_id in runs._forgotten


@pytest.mark.anyio
async def test_the_most_recently_dropped_runs_are_the_ones_still_reported_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids of dropped runs are remembered, within a bound, for a clearer 404: past the bound
    the oldest are forgotten, so a run dropped just now is still `run_expired`, and only one
    dropped long before reads as never known (`run_not_found`)."""
    monkeypatch.setattr(run_manager, "_FORGOTTEN_IDS", 2)
    async with manager(STREAM_RETENTION_SECONDS="0") as (runs, _engine):
        dropped = [(await finished_run(runs, f"thread_{i}")).run_id for i in range(3)]
        expect_not_found(runs, dropped[0], "run_not_found")
        for run_id in dropped[1:]:
            expect_not_found(runs, run_id, "run_expired")


@pytest.mark.anyio
async def test_zero_retention_drops_a_run_as_soon_as_it_ends_but_never_a_running_one() -> None:
    async with manager(STREAM_RETENTION_SECONDS="0") as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        running = await runs.start_run("thread_running", "slow", "corr")
        await anyio.sleep(0.05)
        log = await finished_run(runs, "thread_a")
        expect_not_found(runs, log.run_id, "run_expired")
        assert runs.lookup(running.run_id) is running
        engine.gates["slow"].set()
        with anyio.fail_after(TIMEOUT):
            await running.wait_finished()
        expect_not_found(runs, running.run_id, "run_expired")


@pytest.mark.anyio
async def test_beyond_max_runs_the_oldest_finished_go_first_and_running_runs_stay() -> None:
    async with manager(STREAM_MAX_RUNS="2") as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        running = await runs.start_run("thread_g", "slow", "corr")
        a = await finished_run(runs, "thread_a")
        b = await finished_run(runs, "thread_b")
        assert runs.lookup(a.run_id) is a and runs.lookup(b.run_id) is b
        c = await finished_run(runs, "thread_c")
        expect_not_found(runs, a.run_id, "run_expired")
        assert runs.lookup(b.run_id) is b and runs.lookup(c.run_id) is c
        for n in range(4):  # many more finished runs: the running one is never a candidate
            await finished_run(runs, f"thread_more{n}")
        assert runs.lookup(running.run_id) is running
        expect_not_found(runs, b.run_id, "run_expired")
        expect_not_found(runs, c.run_id, "run_expired")
        engine.gates["slow"].set()
        with anyio.fail_after(TIMEOUT):
            await running.wait_finished()
        assert runs.lookup(running.run_id) is running  # now the newest finished run
        expect_not_found(runs, "run_never_seen", "run_not_found")


@pytest.mark.anyio
async def test_cancel_of_a_running_run_ends_it_with_cancelled_then_metadata() -> None:
    async with manager() as (runs, engine):
        engine.gates["wait"] = anyio.Event()
        log = await runs.start_run("thread_c", "wait", "corr")
        await anyio.sleep(0.02)
        assert runs.cancel(log.run_id, "cancelled by the client") is True
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        assert [e.name for e in log.events()] == [RUN_CREATED, "thread.run.cancelled", METADATA]
        assert log.events()[1].data == {"thread_id": "thread_c", "run_id": log.run_id, "reason": "cancelled by the client"}
        assert runs.cancel(log.run_id, "again") is False  # over: the API answers 409 run_finished
        assert runs.cancel("run_unknown", "x") is False
        await finished_run(runs, "thread_c")  # the thread takes its next message


@pytest.mark.anyio
async def test_an_accepted_cancel_always_ends_the_run_cancelled() -> None:
    """A listener that cancels on seeing the outcome hits the window between it and `metadata`."""
    async with manager() as (runs, engine):
        engine.gates["go"] = anyio.Event()
        log = await runs.start_run("thread_late", "go", "corr")
        accepted: list[bool] = []

        async def cancel_on_outcome() -> None:
            async for batch in log.follow(0):
                if any(e.name == RUN_COMPLETED for _, e in batch) and not accepted:
                    accepted.append(runs.cancel(log.run_id, "cancelled by the client"))

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on_outcome)
                await anyio.sleep(0.01)
                engine.gates["go"].set()
        names = [e.name for e in log.events()]
        assert accepted, names
        # Either the cancel is refused (the run is over: 409 run_finished) or listeners hear of it.
        assert accepted == [False] or "thread.run.cancelled" in names, (accepted, names)


@pytest.mark.anyio
async def test_a_cancel_before_the_runs_task_starts_stops_it_as_it_starts() -> None:
    async with manager() as (runs, engine):
        engine.gates["wait"] = anyio.Event()
        log = await runs.start_run("thread_early", "wait", "corr")
        assert log.cancel_scope is None  # its task has not run yet
        assert runs.cancel(log.run_id, "cancelled by the client") is True
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        assert [e.name for e in log.events()] == [RUN_CREATED, RUN_CANCELLED, METADATA]
        assert log.events()[1].data["reason"] == "cancelled by the client"
        await finished_run(runs, "thread_early")


@pytest.mark.anyio
async def test_a_stop_while_a_failed_round_settles_is_refused_and_the_run_keeps_its_error() -> None:
    engine = SettlingEngine(fails=True)
    async with manager(engine) as (runs, _):
        log = await runs.start_run("thread_err", "hi", "corr")
        with anyio.fail_after(TIMEOUT):
            await engine.settling.wait()
        assert runs.cancel(log.run_id, "cancelled by the client") is False  # the API answers 409
        engine.settled.set()
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        assert [e.name for e in log.events()] == [RUN_CREATED, ERROR]
        assert log.events()[1].data["type"] == "upstream_error"


@pytest.mark.anyio
async def test_a_second_stop_while_the_first_settles_gets_the_same_answer() -> None:
    """A double click, or a retried POST /runs/{id}/cancel: the run is being stopped, not over."""
    engine = SettlingEngine()
    async with manager(engine, MAX_TOOL_ROUNDS="5") as (runs, _):
        log = await runs.start_run("thread_twice", "hi", "corr")
        await anyio.sleep(0)
        assert runs.cancel(log.run_id, "cancelled by the client") is True
        with anyio.fail_after(TIMEOUT):
            await engine.settling.wait()
        assert runs.stop(log.run_id, "cancelled again") is log  # 202 again, not 409
        engine.settled.set()
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        cancelled = [e for e in log.events() if e.name == RUN_CANCELLED]
        assert [e.data["reason"] for e in cancelled] == ["cancelled by the client"]
        with pytest.raises(ServiceError) as over:
            runs.stop(log.run_id, "too late")
        assert over.value.status_code == 409


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["tool round limit", "stopped by the client"])
async def test_a_shutdown_while_a_run_settles_its_round_leaves_the_runs_own_end(ending: str) -> None:
    engine = SettlingEngine()
    async with manager(engine, MAX_TOOL_ROUNDS="1", SHUTDOWN_GRACE_SECONDS="0") as (runs, _):
        log = await runs.start_run("thread_limit", "hi", "corr")
        if ending == "stopped by the client":
            await anyio.sleep(0)
            assert runs.cancel(log.run_id, "cancelled by the client") is True
        with anyio.fail_after(TIMEOUT):
            await engine.settling.wait()
            await runs.shutdown()
        engine.settled.set()
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        names = [e.name for e in log.events()]
        expected = RUN_FAILED if ending == "tool round limit" else RUN_CANCELLED
        ends = [n for n in names if n in (RUN_FAILED, RUN_CANCELLED, ERROR, METADATA)]
        assert ends == [expected, METADATA], names


@pytest.mark.anyio
async def test_a_run_on_the_same_thread_pushes_out_the_oldest() -> None:
    async with manager(STREAM_MAX_RUNS="1") as (runs, _):
        first = await finished_run(runs, "thread_a", "one")
        second = await finished_run(runs, "thread_a", "two")
        expect_not_found(runs, first.run_id, "run_expired")
        assert runs.lookup(second.run_id) is second


class FailingFollowUpEngine(SettlingEngine):
    """Round 1 calls the `big` tool; the round with its output breaks upstream."""

    def next_input(self, parser: Any, results: Any) -> list[str]:
        return [result.output for result in results]  # as the real engines send the outputs on

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: Any) -> AsyncIterator[DeliverEvents]:
        async def batches() -> AsyncIterator[list[dict[str, Any]]]:
            if turn_input != "hi":
                raise UpstreamError("the upstream stream broke")
            yield [{"type": "call"}, {"type": "end"}]

        yield functools.partial(deliver_batches, batches())

    def new_parser(self, tracker: Any) -> StubParser:
        parser = super().new_parser(tracker)
        parse = parser.parse

        def call_big(event: dict[str, Any]) -> list[Event]:
            if event["type"] == "call":
                call = ToolCall(call_id="call_big", name="big", arguments="{}")
                parser.tool_calls.append(call)
                return [tracker.start_call(call)]
            return parse(event)

        parser.parse = call_big  # type: ignore[method-assign]
        return parser

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        pass


@pytest.mark.anyio
async def test_a_failed_run_kept_for_resuming_holds_no_more_than_its_capped_events() -> None:
    """A run that failed is kept for STREAM_RETENTION_SECONDS like any other, and the README bounds
    what it keeps by STREAM_MAX_BYTES_PER_RUN: its error must not hold the run's frames (its tool
    outputs, message and next input) alive beside the log for all that time."""
    import gc
    import tracemalloc

    async def big() -> str:
        """A tool with a large output."""
        return "x" * 4_000_000

    settings = load_settings({"OPENAI_API_KEY": "sk-test", "STREAM_MAX_BYTES_PER_RUN": "1024"})
    engine = FailingFollowUpEngine()
    async with RunManager(engine, ToolRegistry({"big": big}, timeout=5), settings) as runs:  # type: ignore[arg-type]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            log = await runs.start_run("thread_big", "hi", "corr")
            with anyio.fail_after(TIMEOUT):
                await log.wait_finished()
                while log not in runs._finished:  # its task has ended
                    await anyio.sleep(0.01)
            await anyio.sleep(0.05)
            gc.collect()
            kept = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert log.events()[-1].name == ERROR and runs.lookup(log.run_id) is log  # kept, for resuming
        assert log.size_bytes <= 1024 + 200
        assert kept < 1_000_000, f"the failed run keeps {kept} bytes beside its {log.size_bytes} bytes of events"


# ==============================================================================================
# HTTP, in-process


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client(SSE_HEARTBEAT_SECONDS="0.05", THREAD_LOCK_TIMEOUT_SECONDS="1") as test_client:
        yield test_client


TEXT = "The quick brown fox jumps over the lazy dog."


def sse_run(client: TestClient, upstream: respx.MockRouter, text: str = TEXT, chunks: int = 6,
            message: str = "hello") -> tuple[str, list[dict[str, Any]]]:
    """A whole run over SSE; its run id and events."""
    upstream.post("/responses").mock(return_value=sse_response(text_events(text, chunks=chunks)))
    response = chat(client, message, headers=SSE)
    assert response.status_code == 200
    events = events_of(response.text)
    assert events[-1]["event"] == METADATA
    run_id = events[0]["data"]["run_id"]
    assert [e["id"] for e in events] == [f"{run_id}:{n}" for n in range(1, len(events) + 1)]
    return run_id, events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["delta"]["content"] for e in events if e["event"] == MESSAGE_DELTA)


def assert_resumed(body: str, run_id: str, after: int, expected: list[dict[str, Any]],
                   thread_id: str = "conv_test") -> None:
    items = parse_sse(body)
    assert items[0] == {"retry": 5000}, items[:2]
    assert items[1] == {"event": RESUMED, "id": None, "data": {
        "thread_id": thread_id, "run_id": run_id, "stream_url": f"chat/stream/{run_id}", "after": f"{run_id}:{after}"}}
    assert [i for i in items[2:] if "event" in i] == expected


def assert_error(response: Any, status: int, type: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == type, body
    assert body["correlation_id"] == response.headers["x-correlation-id"] and body["error"]


def test_stream_url_is_announced(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    assert events[0]["data"]["stream_url"] == f"chat/stream/{run_id}"
    assert events[-1]["data"]["stream_url"] == f"chat/stream/{run_id}"


def test_get_stream_replays_the_whole_run(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    response = client.get(f"/chat/stream/{run_id}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    items = parse_sse(response.text)
    assert items[0] == {"retry": 5000}
    assert [i for i in items if "event" in i] == events  # same names, ids and data; no resumed event
    assert text_of(events) == TEXT


@pytest.mark.parametrize("how", ["header", "query"])
def test_get_stream_after_k_gives_exactly_the_rest(client: TestClient, upstream: respx.MockRouter, how: str) -> None:
    run_id, events = sse_run(client, upstream)
    for k in range(0, len(events)):  # from 0 too: any Last-Event-ID makes a resumed stream
        last_event_id = f"{run_id}:{k}"
        if how == "header":
            response = client.get(f"/chat/stream/{run_id}", headers={"last-event-id": last_event_id})
        else:
            response = client.get(f"/chat/stream/{run_id}", params={"last_event_id": last_event_id})
        assert response.status_code == 200, (k, response.text)
        assert_resumed(response.text, run_id, k, events[k:])
        assert text_of(events[:k]) + text_of(events_of(response.text)) == TEXT


def test_header_wins_over_query(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    response = client.get(f"/chat/stream/{run_id}", params={"last_event_id": f"{run_id}:1"},
                          headers={"last-event-id": f"{run_id}:3"})
    assert_resumed(response.text, run_id, 3, events[3:])


def test_repost_with_last_event_id_replays_without_a_new_upstream_response(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    run_id, events = sse_run(client, upstream)
    calls_before = len(upstream.calls)
    for k in (1, 2, len(events) // 2, len(events) - 1):
        response = chat(client, "hello", headers={**SSE, "last-event-id": f"{run_id}:{k}"})
        assert response.status_code == 200
        assert_resumed(response.text, run_id, k, events[k:])
    assert len(upstream.calls) == calls_before  # no new upstream response was created


def test_repost_with_json_accept_gives_the_same_answer(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
    first = chat(client, "hello")
    assert first.status_code == 200
    answer = first.json()
    run_id = answer["run_id"]
    assert route.call_count == 1
    for k in (1, 3):
        again = chat(client, "hello", headers={**JSON, "last-event-id": f"{run_id}:{k}"})
        assert again.status_code == 200
        body = again.json()
        assert {key: body[key] for key in ("responses", "thread_id", "run_id")} == {
            key: answer[key] for key in ("responses", "thread_id", "run_id")}
        assert body["responses"] == [TEXT]
        assert body["correlation_id"] == again.headers["x-correlation-id"]
    assert route.call_count == 1


def test_repost_json_of_a_run_started_over_sse(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    calls = len(upstream.calls)
    body = chat(client, "hello", headers={**JSON, "last-event-id": events[-1]["id"]}).json()
    assert body["responses"] == [TEXT] and body["run_id"] == run_id
    assert len(upstream.calls) == calls


def test_204_when_everything_was_delivered(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    last_event_id = events[-1]["id"]
    for response in (
        client.get(f"/chat/stream/{run_id}", headers={"last-event-id": last_event_id}),
        client.get(f"/chat/stream/{run_id}", params={"last_event_id": last_event_id}),
        chat(client, "hello", headers={**SSE, "last-event-id": last_event_id}),
    ):
        assert response.status_code == 204, response.text
        assert response.content == b""
        assert response.headers["cache-control"] == "no-store"  # 204 is cacheable by default (RFC 9110)


def test_unknown_run_is_404_run_not_found(client: TestClient, upstream: respx.MockRouter) -> None:
    response = client.get("/chat/stream/run_doesnotexist")
    assert_error(response, 404, "run_not_found")
    assert response.headers["cache-control"] == "no-store"  # a 404 is cacheable by default too
    assert_error(client.get("/chat/stream/run_doesnotexist", headers={"last-event-id": "run_doesnotexist:3"}),
                 404, "run_not_found")
    assert_error(chat(client, "hello", headers={**SSE, "last-event-id": "run_doesnotexist:3"}), 404, "run_not_found")
    assert_error(chat(client, "hello", headers={**JSON, "last-event-id": "run_doesnotexist:3"}), 404, "run_not_found")
    assert not upstream.calls


@pytest.mark.parametrize("cap", [{"STREAM_MAX_EVENTS_PER_RUN": "10"}, {"STREAM_MAX_BYTES_PER_RUN": "1024"}],
                         ids=["events", "bytes"])
def test_dropped_events_are_404_events_dropped(upstream: respx.MockRouter, cap: dict[str, str]) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ab" * 40, chunks=40)))
    with make_client(**cap) as client:
        answer = chat(client, "long")
        assert answer.status_code == 200 and answer.json()["responses"] == ["ab" * 40]
        run_id = answer.json()["run_id"]
        log = client.app.state.runs.lookup(run_id)  # type: ignore[attr-defined]
        first, last = log.first_seq, log.last_seq
        assert first > 2 and last == 44  # created, 40 deltas, completed message, outcome, metadata
        assert_error(client.get(f"/chat/stream/{run_id}"), 404, "events_dropped")
        for after in (1, first - 2):
            assert_error(client.get(f"/chat/stream/{run_id}", headers={"last-event-id": f"{run_id}:{after}"}),
                         404, "events_dropped")
            assert_error(chat(client, "long", headers={**SSE, "last-event-id": f"{run_id}:{after}"}),
                         404, "events_dropped")
        # Right at the edge of the window: the rest is all there.
        response = client.get(f"/chat/stream/{run_id}", headers={"last-event-id": f"{run_id}:{first - 1}"})
        assert response.status_code == 200
        events = events_of(response.text)
        assert events[0]["event"] == RESUMED
        assert [e["id"] for e in events[1:]] == [f"{run_id}:{n}" for n in range(first, last + 1)]
        assert events[-1]["event"] == METADATA and events[-1]["data"]["event_count"] == last
        # Everything delivered is still a 204, even with the window moved.
        assert client.get(f"/chat/stream/{run_id}", headers={"last-event-id": f"{run_id}:{last}"}).status_code == 204


def test_expired_run_is_404_run_expired(upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ok")))
    with make_client(STREAM_RETENTION_SECONDS="0.5") as client:
        run_id = chat(client, "hi").json()["run_id"]
        assert client.get(f"/chat/stream/{run_id}").status_code == 200
        time.sleep(0.6)
        assert_error(client.get(f"/chat/stream/{run_id}"), 404, "run_expired")
        assert_error(client.get(f"/chat/stream/{run_id}", headers={"last-event-id": f"{run_id}:1"}), 404, "run_expired")
        assert_error(chat(client, "hi", headers={**SSE, "last-event-id": f"{run_id}:1"}), 404, "run_expired")
        assert_error(client.post(f"/runs/{run_id}/cancel"), 404, "run_expired")
        assert_error(client.get("/chat/stream/run_nope"), 404, "run_not_found")


def test_max_runs_expires_the_oldest_over_http(upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(side_effect=lambda request: sse_response(text_events("ok")))
    with make_client(STREAM_MAX_RUNS="2") as client:
        ids = [chat(client, f"hi {n}").json()["run_id"] for n in range(3)]
        assert_error(client.get(f"/chat/stream/{ids[0]}"), 404, "run_expired")
        assert all(client.get(f"/chat/stream/{i}").status_code == 200 for i in ids[1:])


MALFORMED = ["garbage", "run_x", "run_x:", ":5", "run_x:abc", "run_x:-1", "run_x:1.5", "run x:1", "run_x:+3",
             "run/x:1", "run_x:1 2"]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_last_event_id_is_400(client: TestClient, upstream: respx.MockRouter, value: str) -> None:
    run_id, _ = sse_run(client, upstream)
    calls = len(upstream.calls)
    value = value.replace("run_x", run_id)
    assert_error(client.get(f"/chat/stream/{run_id}", headers={"last-event-id": value}), 400, "invalid_request")
    assert_error(client.get(f"/chat/stream/{run_id}", params={"last_event_id": value}), 400, "invalid_request")
    assert_error(chat(client, "hello", headers={**SSE, "last-event-id": value}), 400, "invalid_request")
    assert_error(chat(client, "hello", headers={**JSON, "last-event-id": value}), 400, "invalid_request")
    assert len(upstream.calls) == calls  # a bad resume never starts a new run


def test_a_last_event_id_beyond_the_runs_last_event_is_400(client: TestClient, upstream: respx.MockRouter) -> None:
    """An id the service never sent: resuming there would skip the events up to it."""
    run_id, events = sse_run(client, upstream)
    value = f"{run_id}:{len(events) + 1}"  # the run is over: beyond its end is no 204 either
    assert_error(client.get(f"/chat/stream/{run_id}", headers={"last-event-id": value}), 400, "invalid_request")
    assert_error(chat(client, "hello", headers={**SSE, "last-event-id": value}), 400, "invalid_request")
    assert_error(chat(client, "hello", headers={**JSON, "last-event-id": value}), 400, "invalid_request")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"resume": run_id, "last_event_id": value})
        frame = ws.receive_json()
        assert frame["event"] == "error" and frame["type"] == "invalid_request"


@pytest.mark.parametrize("position", ["\u00b2", "9" * 5000], ids=["superscript-two", "5000-digits"])
def test_malformed_last_event_id_with_odd_digits_is_400(
    client: TestClient, upstream: respx.MockRouter, position: str
) -> None:
    run_id, _ = sse_run(client, upstream)
    value = f"{run_id}:{position}"
    assert_error(client.get(f"/chat/stream/{run_id}", params={"last_event_id": value}), 400, "invalid_request")
    if position.isascii():
        assert_error(client.get(f"/chat/stream/{run_id}", headers={"last-event-id": value}), 400, "invalid_request")
        assert_error(chat(client, "hello", headers={**SSE, "last-event-id": value}), 400, "invalid_request")
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"resume": run_id, "last_event_id": value})
        frame = ws.receive_json()
        assert frame["event"] == "error" and frame["type"] == "invalid_request"


def test_last_event_id_of_another_threads_run_is_400(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    calls = len(upstream.calls)
    for headers in (SSE, JSON):
        response = chat(client, "hello", thread_id="conv_other", headers={**headers, "last-event-id": events[2]["id"]})
        assert_error(response, 400, "invalid_request")
        assert "another thread" in response.json()["error"]
    assert len(upstream.calls) == calls


def test_last_event_id_of_another_run_on_get_is_400(client: TestClient, upstream: respx.MockRouter) -> None:
    first, _ = sse_run(client, upstream)
    second, _ = sse_run(client, upstream)
    assert_error(client.get(f"/chat/stream/{second}", headers={"last-event-id": f"{first}:2"}), 400, "invalid_request")
    assert_error(client.get(f"/chat/stream/{second}", params={"last_event_id": f"{first}:2"}), 400, "invalid_request")


def test_invalid_run_id_in_path_is_400(client: TestClient) -> None:
    assert_error(client.get("/chat/stream/run%20bad"), 400, "invalid_request")


def test_cancel_finished_run_is_409_and_unknown_is_404(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, _ = sse_run(client, upstream)
    assert_error(client.post(f"/runs/{run_id}/cancel"), 409, "run_finished")
    assert_error(client.post("/runs/run_unknown/cancel"), 404, "run_not_found")
    # The run is untouched: still replayable, still complete.
    assert events_of(client.get(f"/chat/stream/{run_id}").text)[-2]["event"] == RUN_COMPLETED


# --- WebSocket, in-process ----------------------------------------------------------------------


def ws_resumed(ws: Any) -> list[dict[str, Any]]:
    """A resume's frames: first thread.run.resumed (no id), then the events up to the end."""
    resumed = ws.receive_json()
    assert resumed["event"] == "thread.run.resumed" and resumed["id"] is None, resumed
    return ws_until_end(ws)


def ws_until_end(ws: Any) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["event"] not in (METADATA, "error"):
        frames.append(ws.receive_json())
    return frames


def test_websocket_resume_and_its_errors(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:3"})
        frames = ws_resumed(ws)
        assert [(f["event"], f["id"], f["data"]) for f in frames] == [(e["event"], e["id"], e["data"]) for e in events[3:]]
        ws.send_json({"resume": run_id})  # no last_event_id: from the start
        assert [f["id"] for f in ws_resumed(ws)] == [e["id"] for e in events]
        for frame, type in [
            ({"resume": "run_unknown", "last_event_id": "run_unknown:1"}, "run_not_found"),
            ({"resume": run_id, "last_event_id": "run_other:1"}, "invalid_request"),
            ({"resume": run_id, "last_event_id": "nonsense"}, "invalid_request"),
            ({"resume": 5}, "invalid_request"),
            ({"cancel": run_id}, "run_finished"),
            ({"cancel": "run_unknown"}, "run_not_found"),
            ({"cancel": ["x"]}, "invalid_request"),
        ]:
            ws.send_json(frame)
            error = ws.receive_json()
            assert error["event"] == "error" and error["type"] == type, (frame, error)
        ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:{len(events) - 1}"})
        assert [f["event"] for f in ws_resumed(ws)] == [METADATA]  # the connection survived the errors


def test_websocket_resume_says_whether_anything_is_left_to_send(client: TestClient, upstream: respx.MockRouter) -> None:
    """README: the resume's first frame has `complete` true when nothing is left to send (the
    client had the run's last event); then nothing follows it, and the connection takes the
    next frame."""
    run_id, events = sse_run(client, upstream)
    last = len(events)
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:{last - 1}"})
        resumed = ws.receive_json()
        assert resumed["event"] == "thread.run.resumed" and resumed["data"]["complete"] is False
        assert [f["event"] for f in ws_until_end(ws)] == [METADATA]
        ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:{last}"})
        resumed = ws.receive_json()
        assert resumed["event"] == "thread.run.resumed" and resumed["data"]["complete"] is True, resumed
        ws.send_text("not json")  # the next frame the connection sends is the answer to this one
        assert ws.receive_json()["type"] == "invalid_request"


def test_websocket_resume_of_dropped_events(upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events("ab" * 40, chunks=40)))
    with make_client(STREAM_MAX_EVENTS_PER_RUN="10") as client:
        run_id = chat(client, "long").json()["run_id"]
        with client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:2"})
            error = ws.receive_json()
            assert error["event"] == "error" and error["type"] == "events_dropped"
            ws.send_json({"resume": run_id, "last_event_id": f"{run_id}:34"})
            frames = ws_resumed(ws)
            assert [f["id"] for f in frames] == [f"{run_id}:{n}" for n in range(35, 45)]


def test_event_ids_are_the_same_over_every_transport(client: TestClient, upstream: respx.MockRouter) -> None:
    run_id, events = sse_run(client, upstream)
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"resume": run_id, "last_event_id": ""})
        frames = ws_resumed(ws)
    assert [orjson.dumps(f["data"]) for f in frames] == [orjson.dumps(e["data"]) for e in events]
    assert [f["id"] for f in frames] == [e["id"] for e in events]

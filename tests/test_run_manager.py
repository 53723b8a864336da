"""RunManager: one run at a time per thread, the next messages waiting their turn."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from starlette.requests import Request

from assistant import http_api, run_manager
from assistant.config import Settings
from assistant.errors import ClientGone, ServiceError, ShuttingDown, ThreadBusy
from assistant.events import METADATA, Event
from assistant.message_parser import MessageParser
from assistant.orchestrator import execute_run, run_answer, wait_until_accepted
from assistant.run_log import RunLog
from assistant.run_manager import RunManager
from assistant.tool_executor import ToolRegistry
from assistant.upstream_sse import deliver_batches


@pytest.fixture
def runs_released_by_hand(monkeypatch: pytest.MonkeyPatch) -> dict[str, anyio.Event]:
    """Each run waits until the test sets its message's event, then ends with `metadata`."""
    releases: dict[str, anyio.Event] = {}

    async def execute_run(engine: Any, registry: Any, settings: Any, log: RunLog, message: str) -> None:
        await releases.setdefault(message, anyio.Event()).wait()
        log.append(Event(METADATA, {}))

    monkeypatch.setattr(run_manager, "execute_run", execute_run)
    return releases


def release(releases: dict[str, anyio.Event], message: str) -> None:
    """Let the run of `message` end (before or after it started)."""
    releases.setdefault(message, anyio.Event()).set()


async def release_soon(releases: dict[str, anyio.Event], message: str) -> None:
    """`release`, once whoever is waiting for the run's thread waits."""
    await anyio.sleep(0.05)
    release(releases, message)


def sender(manager: RunManager, started: list[str]) -> Callable[[str], Awaitable[None]]:
    """Sends a message on conv_1 and notes when its run has started."""

    async def send(message: str) -> None:
        await manager.start_run("conv_1", message, "corr")
        started.append(message)

    return send


@pytest.mark.anyio
async def test_messages_on_a_busy_thread_wait_and_run_in_the_order_they_came(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    started: list[str] = []
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]

        send = sender(manager, started)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                await send("first")
                for message in ("second", "third", "fourth"):
                    tg.start_soon(send, message)
                    await anyio.sleep(0.02)
                assert started == ["first"]
                for done, expected in (("first", "second"), ("second", "third"), ("third", "fourth")):
                    release(runs_released_by_hand, done)
                    while started[-1] == done:
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.02)
                    assert started[-1] == expected  # the one that waited longest, and only it
            release(runs_released_by_hand, "fourth")
            while manager.active_runs:
                await anyio.sleep(0.01)
        assert started == ["first", "second", "third", "fourth"]
        assert manager._busy_threads == {}


@pytest.mark.anyio
async def test_a_message_arriving_as_a_run_ends_queues_behind_those_waiting(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    """The run's end hands the thread to the longest waiting message: one that arrives in the
    same moment does not take it first."""
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    started: list[str] = []
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]

        send = sender(manager, started)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                await send("first")
                tg.start_soon(send, "waiting")
                await anyio.sleep(0.05)
                release(runs_released_by_hand, "first")  # the first run ends in the next moment...
                tg.start_soon(send, "late")  # ...and this message arrives right behind it
                while len(started) < 2:
                    await anyio.sleep(0.01)
                await anyio.sleep(0.05)
                assert started == ["first", "waiting"]
                release(runs_released_by_hand, "waiting")
                release(runs_released_by_hand, "late")
        assert started == ["first", "waiting", "late"]


@pytest.mark.anyio
async def test_a_message_cancelled_as_the_thread_is_handed_to_it_leaves_the_thread_free(
    runs_released_by_hand: dict[str, anyio.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain task.cancel() (a server cancelling the request's task) landing between the hand-on
    and the waiter's resumption: the waiter passes the thread on, here to no one."""
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        first = await manager.start_run("conv_1", "first", "corr")
        waiter: asyncio.Task[None] | None = None
        hand_on = manager._release_thread

        def hand_on_then_cancel(thread_id: str) -> None:
            hand_on(thread_id)  # the first run's end hands the thread on...
            assert waiter is not None
            waiter.cancel()  # ...and the waiting message's task is cancelled before it resumes

        async def send() -> None:
            await manager.start_run("conv_1", "cancelled", "corr")
            raise AssertionError("it started a run")

        monkeypatch.setattr(manager, "_release_thread", hand_on_then_cancel)
        with anyio.fail_after(3):
            waiter = asyncio.get_running_loop().create_task(send())
            await anyio.sleep(0.05)
            release(runs_released_by_hand, "first")
            await first.wait_finished()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert manager._busy_threads == {} and not manager.thread_busy("conv_1")
            monkeypatch.undo()
            third = await manager.start_run("conv_1", "third", "corr")  # at once: the thread is free
            assert manager.active_runs == [third]
            release(runs_released_by_hand, "third")
            await third.wait_finished()
        assert manager._busy_threads == {}


@pytest.mark.anyio
async def test_a_message_waiting_past_the_thread_lock_timeout_is_thread_busy(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=0.1)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        await manager.start_run("conv_1", "first", "corr")
        with anyio.fail_after(3), pytest.raises(ThreadBusy):
            await manager.start_run("conv_1", "second", "corr")
        await manager.start_run("conv_2", "elsewhere", "corr")  # other threads are free
        for message in ("first", "elsewhere"):
            release(runs_released_by_hand, message)
        with anyio.fail_after(3):
            while manager.active_runs:
                await anyio.sleep(0.01)
        assert manager._busy_threads == {}


@pytest.mark.anyio
async def test_a_message_waiting_for_a_thread_is_refused_at_once_when_the_shutdown_begins(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    """It would not run: its client hears so at the signal (and may send it elsewhere), not at the
    running turn's end or after THREAD_LOCK_TIMEOUT_SECONDS as a misleading `thread_busy`."""
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5, shutdown_grace_seconds=5)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        first = await manager.start_run("conv_1", "first", "corr")
        refused: list[tuple[ServiceError, float]] = []

        async def second() -> None:
            with pytest.raises(ShuttingDown) as caught:
                await manager.start_run("conv_1", "second", "corr", "key-2")
            refused.append((caught.value, anyio.current_time()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.1)
            assert manager._keys  # the waiting message's key
            signalled = anyio.current_time()
            manager.begin_shutdown()
        [(error, at)] = refused
        assert at - signalled < 0.5 and not first.finished
        assert manager._keys == {}  # freed: the message never started
        assert manager.active_runs == [first]
        release(runs_released_by_hand, "first")
        with anyio.fail_after(3):
            await first.wait_finished()
        assert manager._busy_threads == {}


async def client_stays() -> dict[str, str]:
    """An HTTP client's `receive` once its request was read, while the client keeps waiting."""
    await anyio.sleep_forever()
    raise AssertionError


def request_to(manager: RunManager, receive: Any) -> Request:
    app = SimpleNamespace(state=SimpleNamespace(runs=manager))
    return Request({"type": "http", "app": app, "state": {"correlation_id": "corr"}, "headers": []}, receive)


@pytest.mark.anyio
async def test_an_http_message_waiting_for_a_busy_thread_is_dropped_when_its_client_hangs_up(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        first = await manager.start_run("conv_1", "first", "corr")

        async def hang_up_soon() -> dict[str, str]:
            await anyio.sleep(0.05)
            return {"type": "http.disconnect"}

        with anyio.fail_after(3), pytest.raises(ClientGone):
            await http_api.start_run(request_to(manager, hang_up_soon), "conv_1", "second")
        assert manager.active_runs == [first]  # nothing was started for the client that left
        release(runs_released_by_hand, "first")
        with anyio.fail_after(3):
            await first.wait_finished()
        assert manager._busy_threads == {}


@pytest.mark.anyio
async def test_an_http_message_whose_client_stays_gets_the_thread_once_it_is_free(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        await manager.start_run("conv_1", "first", "corr")

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_soon, runs_released_by_hand, "first")
                second = await http_api.start_run(request_to(manager, client_stays), "conv_1", "second")
        assert second.thread_id == "conv_1" and manager.active_runs == [second]
        release(runs_released_by_hand, "second")
        with anyio.fail_after(3):
            await second.wait_finished()


@pytest.mark.anyio
async def test_an_http_message_whose_client_leaves_in_the_step_it_gets_the_thread_is_client_gone(
    runs_released_by_hand: dict[str, anyio.Event], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disconnect is the client's only one: taken by the wait's watcher just as the thread is
    handed over, a stream started now would never see its client leave."""
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        await manager.start_run("conv_1", "first", "corr")
        disconnect: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        hand_over = manager._release_thread

        def hand_over_as_the_client_leaves(thread_id: str) -> None:
            hand_over(thread_id)  # wakes the waiting message...
            if not disconnect.done():  # ...and, in the same step, its client's watcher
                disconnect.set_result({"type": "http.disconnect"})

        monkeypatch.setattr(manager, "_release_thread", hand_over_as_the_client_leaves)

        async def leave_at_the_hand_over() -> dict[str, str]:
            return await disconnect

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_soon, runs_released_by_hand, "first")
                with pytest.raises(ClientGone):
                    await http_api.start_run(request_to(manager, leave_at_the_hand_over), "conv_1", "second")
        # The message had got the thread: its run goes on, as a run does when its client leaves mid-stream.
        (second,) = manager.active_runs
        release(runs_released_by_hand, "second")
        with anyio.fail_after(3):
            await second.wait_finished()
        assert manager._busy_threads == {}


@pytest.mark.anyio
async def test_an_http_message_whose_client_stays_past_the_thread_lock_timeout_is_thread_busy(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=0.1)
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        await manager.start_run("conv_1", "first", "corr")

        with anyio.fail_after(3), pytest.raises(ThreadBusy):  # itself, as the API answers it: 409
            await http_api.start_run(request_to(manager, client_stays), "conv_1", "second")
        release(runs_released_by_hand, "first")


# --- a run's task lets nothing out: one run's crash is that run's end, not the service's -----------


class Boom(BaseException):
    """A BaseException subclass raised by a bug or a library (not a cancellation)."""


class FakeEngine:
    name = "fake"

    def __init__(self, fail: dict[str, BaseException]) -> None:
        self.fail = fail
        self.slow = anyio.Event()

    def new_parser(self, tracker: Any) -> MessageParser:
        return MessageParser(tracker)

    def first_input(self, thread_id: str, message: str) -> Any:
        return message

    def next_input(self, parser: Any, results: Any) -> Any:
        return None

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: Any):  # type: ignore[no-untyped-def]
        await anyio.sleep(0.05)
        if thread_id in self.fail:
            raise self.fail[thread_id]
        await self.slow.wait()  # the other thread's run: long, healthy
        raise AssertionError("not reached")
        yield  # pragma: no cover

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        pass


async def _scenario(exc: BaseException) -> tuple[Any, Any, BaseException | None]:
    settings = Settings(openai_api_key="sk-test", shutdown_grace_seconds=0.2)
    engine = FakeEngine({"conv_bad": exc})
    escaped: BaseException | None = None
    healthy = bad = None
    try:
        async with RunManager(engine, None, settings) as manager:  # type: ignore[arg-type]
            healthy = await manager.start_run("conv_ok", "hi", "corr")
            bad = await manager.start_run("conv_bad", "hi", "corr")
            with anyio.move_on_after(1):
                await bad.wait_finished()
            with anyio.move_on_after(0.5):
                await healthy.wait_finished()
    except BaseException as e:
        escaped = e
    return healthy, bad, escaped


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_base_exception_in_one_run_ends_that_run_only(anyio_backend: str) -> None:
    healthy, bad, escaped = await _scenario(Boom("engine bug"))
    # The failing run ends with `error`, the service (the task group, the other run) goes on.
    assert bad is not None and bad.finished, "the failing run's log never ends: its readers hang"
    assert bad.events()[-1].name == "error"
    assert escaped is None, f"the run's exception took the manager's task group down: {escaped!r}"
    assert healthy is not None and healthy.finished and healthy.events()[-1].name == "error"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stray_cancelled_error_in_a_run_still_ends_its_log(anyio_backend: str) -> None:
    # e.g. a library raising CancelledError of its own (a future it awaited was cancelled)
    healthy, bad, escaped = await _scenario(asyncio.CancelledError())
    assert bad is not None and bad.finished, "the run's log never ends: its readers hang for good"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_run_cancelled_from_outside_is_an_error_to_its_json_client(anyio_backend: str) -> None:
    # The manager's task group is cancelled (the service stops) while a run waits upstream:
    # execute_run ends the log with an `error` event, but run_answer (POST /chat without
    # streaming) must not answer 200 as if the run had completed.
    settings = Settings(openai_api_key="sk-test")
    log = RunLog("run_x", "conv_ok", "corr", max_events=1000, max_bytes=10**6)
    engine = FakeEngine({})  # conv_ok: a long healthy round
    async with anyio.create_task_group() as tg:
        tg.start_soon(execute_run, engine, None, settings, log, "hi")
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()
    assert log.finished and log.events()[-1].name == "error"
    with pytest.raises(ServiceError):
        await run_answer(log, "corr")


class ToolCallingEngine(FakeEngine):
    """Its round asks for one call of `slow_lookup`, which takes longer than the test; settling
    the round takes `settle` s (the Assistants engine submits outputs or cancels upstream)."""

    def __init__(self, settle: float = 0.0) -> None:
        super().__init__({})
        self.settle = settle

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: Any):  # type: ignore[no-untyped-def]
        async def batches():  # type: ignore[no-untyped-def]
            call = {"type": "function_call", "call_id": "call_1", "name": "slow_lookup", "arguments": "{}"}
            yield [{"type": "response.created", "response": {"id": "resp_1"}},
                   {"type": "response.output_item.done", "item": call},
                   {"type": "response.completed", "response": {"output": []}}]

        yield functools.partial(deliver_batches, batches())

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        await anyio.sleep(self.settle)


async def slow_lookup() -> str:
    """Look something up, slowly."""
    await anyio.sleep(30)
    return "found"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("shut_down_first", [False, True], ids=["group-cancelled", "after-the-shutdown-grace"])
async def test_a_run_cancelled_from_outside_ends_every_step_it_started(anyio_backend: str, shut_down_first: bool) -> None:
    # README: every step that starts ends, also when the run is cancelled or fails. Here the
    # manager's task group is cancelled while a tool runs: at once, or, as a shutdown goes,
    # after the grace period stopped the run and while its round was still being settled.
    registry = ToolRegistry({"slow_lookup": slow_lookup}, timeout=60)
    log = RunLog("run_x", "conv_1", "corr", max_events=1000, max_bytes=10**6)
    async with anyio.create_task_group() as tg:
        tg.start_soon(execute_run, ToolCallingEngine(settle=1.0), registry, Settings(openai_api_key="sk-test"), log, "hi")
        await anyio.sleep(0.2)  # the tool runs
        if shut_down_first:  # what RunManager.shutdown does once SHUTDOWN_GRACE_SECONDS are over
            log.error = ShuttingDown("the service is shutting down")
            assert log.cancel_scope is not None
            log.cancel_scope.cancel()
            await anyio.sleep(0.1)  # the round is being settled
        tg.cancel_scope.cancel()
    names = [event.name for event in log.events()]
    assert names[-1] == "error"
    assert names.count("thread.run.step.created") == 1
    completed = [event.data["step"] for event in log.events() if event.name == "thread.run.step.completed"]
    assert len(completed) == 1 and completed[0]["id"] == "call_1" and completed[0]["is_error"], names


class HeldRoundEngine(FakeEngine):
    """A round the upstream answered at once and that then goes on (a long answer, a tool):
    it streams one delta, then waits until the test lets it end; settling it takes `settle` s."""

    def __init__(self, settle: float = 0.0) -> None:
        super().__init__({})
        self.settle = settle
        self.settled = False

    @asynccontextmanager
    async def open_round(self, thread_id: str, turn_input: Any):  # type: ignore[no-untyped-def]
        async def batches():  # type: ignore[no-untyped-def]
            yield [{"type": "response.created", "response": {"id": "resp_1"}},
                   {"type": "response.output_text.delta", "delta": "Hel"}]
            await self.slow.wait()
            yield [{"type": "response.completed", "response": {"output": []}}]

        yield functools.partial(deliver_batches, batches())

    async def abandon_round(self, thread_id: str, parser: Any, results: Any) -> None:
        await anyio.sleep(self.settle)
        self.settled = True


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_streamed_run_is_accepted_as_soon_as_the_upstream_answers(anyio_backend: str) -> None:
    """A streaming client waits (at most SSE_HEARTBEAT_SECONDS) for the upstream to accept the
    run, only to answer an early refusal with a plain HTTP error: once the upstream answers, the
    stream starts at once and its events flow live, long before the run ends or that time is up."""
    settings = Settings(openai_api_key="sk-test")
    log = RunLog("run_x", "conv_ok", "corr", max_events=1000, max_bytes=10**6)
    engine = HeldRoundEngine()
    async with anyio.create_task_group() as tg:
        tg.start_soon(execute_run, engine, None, settings, log, "hi")
        with anyio.fail_after(2):
            await wait_until_accepted(log, log.started + 30)
        assert not log.finished
        engine.slow.set()
    assert [e.name for e in log.events()][-2:] == ["thread.run.completed", "metadata"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_run_the_shutdown_stopped_keeps_shutting_down_when_the_server_cancels_it_while_it_settles(
    anyio_backend: str,
) -> None:
    """After the grace the shutdown ends a run with `shutting_down`; if the server then cancels
    the runs' task group while that run still settles its round upstream, the run's clients still
    get `shutting_down` (send the message again), not a generic service failure."""
    settings = Settings(openai_api_key="sk-test")
    log = RunLog("run_x", "conv_ok", "corr", max_events=1000, max_bytes=10**6)
    engine = HeldRoundEngine(settle=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(execute_run, engine, None, settings, log, "hi")
        with anyio.fail_after(2):
            await wait_until_accepted(log, log.started + 30)
        # What RunManager.shutdown does once the grace is over...
        log.error = ShuttingDown("the service is shutting down; send the message again")
        assert log.cancel_scope is not None
        log.cancel_scope.cancel()
        await anyio.sleep(0.1)
        tg.cancel_scope.cancel()  # ...and the server stops waiting while the round settles
    assert engine.settled
    assert log.finished and log.events()[-1].name == "error"
    assert log.events()[-1].data["type"] == "shutting_down"
    with pytest.raises(ShuttingDown):
        await run_answer(log, "corr")


@pytest.mark.anyio
async def test_a_message_waiting_for_its_thread_when_the_shutdown_begins_is_not_started(
    runs_released_by_hand: dict[str, anyio.Event],
) -> None:
    """No new turn once the shutdown began: a message that was waiting for its thread is refused
    with `shutting_down` when the thread frees up, and nothing is started (or sent upstream) for it."""
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5, shutdown_grace_seconds=2)
    outcome: list[BaseException] = []
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]
        first = await manager.start_run("conv_1", "first", "corr")

        async def send_second() -> None:
            try:
                await manager.start_run("conv_1", "second", "corr")
            except ServiceError as exc:
                outcome.append(exc)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_second)
                await anyio.sleep(0.05)
                manager.begin_shutdown()
                release(runs_released_by_hand, "first")  # ends within the grace: the thread frees up
                await first.wait_finished()
        started = "second" in runs_released_by_hand  # its run, had one started, waits there
        release(runs_released_by_hand, "second")  # (so a run wrongly started ends too)
        assert not started, "a run was started after the shutdown began"
        assert [type(e) for e in outcome] == [ShuttingDown]
        assert [log.run_id for log in manager._runs.values()] == [first.run_id]

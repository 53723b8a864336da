"""RunManager: one run at a time per thread, the next messages waiting their turn."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from assistant import run_manager
from assistant.config import Settings
from assistant.errors import ThreadBusy
from assistant.events import METADATA, Event
from assistant.run_log import RunLog
from assistant.run_manager import RunManager


@pytest.fixture
def runs_released_by_hand(monkeypatch: pytest.MonkeyPatch) -> dict[str, anyio.Event]:
    """Each run waits until the test sets its message's event, then ends with `metadata`."""
    releases: dict[str, anyio.Event] = {}

    async def execute_run(engine: Any, registry: Any, settings: Any, log: RunLog, message: str) -> None:
        await releases.setdefault(message, anyio.Event()).wait()
        log.append(Event(METADATA, {}))

    monkeypatch.setattr(run_manager, "execute_run", execute_run)
    return releases


@pytest.mark.anyio
async def test_messages_on_a_busy_thread_wait_and_run_in_turn(runs_released_by_hand: dict[str, anyio.Event]) -> None:
    settings = Settings(openai_api_key="sk-test", thread_lock_timeout_seconds=5)
    started: list[str] = []
    async with RunManager(None, None, settings) as manager:  # type: ignore[arg-type]

        async def send(message: str) -> None:
            await manager.start_run("conv_1", message, "corr")
            started.append(message)

        with anyio.fail_after(3):
            async with anyio.create_task_group() as tg:
                await send("first")
                tg.start_soon(send, "second")
                await anyio.sleep(0.05)
                tg.start_soon(send, "third")
                await anyio.sleep(0.05)
                assert started == ["first"]
                runs_released_by_hand.setdefault("first", anyio.Event()).set()
                while len(started) < 2:
                    await anyio.sleep(0.01)
                assert started[1] in ("second", "third")  # one of the waiting two, the other still waits
                await anyio.sleep(0.05)
                assert len(started) == 2
                runs_released_by_hand.setdefault(started[1], anyio.Event()).set()
            last = ({"second", "third"} - set(started[1:2])).pop()
            assert started[2] == last
            runs_released_by_hand.setdefault(last, anyio.Event()).set()
            while manager.active_runs:
                await anyio.sleep(0.01)
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
        for release in ("first", "elsewhere"):
            runs_released_by_hand.setdefault(release, anyio.Event()).set()
        with anyio.fail_after(3):
            while manager.active_runs:
                await anyio.sleep(0.01)
        assert manager._busy_threads == {}

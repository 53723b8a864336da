"""`MoveOn`: its own expiry ends the block quietly; anything else goes on."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from assistant.timeouts import MoveOn


@pytest.mark.anyio
async def test_its_own_deadline_ends_the_block_quietly() -> None:
    reached = False
    async with MoveOn(time.monotonic() + 0.01) as scope:
        await asyncio.sleep(5)
        reached = True
    assert scope.expired() and not reached


@pytest.mark.anyio
async def test_moved_to_now_from_outside_ends_the_block() -> None:
    async with MoveOn(None) as scope:
        asyncio.get_running_loop().call_later(0.01, scope.reschedule, 0)
        await asyncio.sleep(5)
    assert scope.expired()


@pytest.mark.anyio
async def test_a_timeout_error_not_its_own_goes_on() -> None:
    with pytest.raises(TimeoutError):
        async with MoveOn(None) as scope:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
    assert not scope.expired()


@pytest.mark.anyio
async def test_a_cancellation_from_outside_goes_on() -> None:
    async def wait() -> None:
        async with MoveOn(time.monotonic() + 5):
            await asyncio.sleep(5)

    task = asyncio.get_running_loop().create_task(wait())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_an_anyio_cancellation_in_the_same_turn_as_its_deadline_goes_on() -> None:
    """The deadline cancels the task first; anyio's scope, cancelled in the same turn of the
    loop, delivers at the next await. The block must not end as if it had only timed out."""
    loop = asyncio.get_running_loop()
    after_the_block = False
    with anyio.CancelScope() as outer:
        deadline = loop.time() + 0.01
        async with MoveOn(deadline):
            loop.call_at(deadline, outer.cancel)  # after the deadline's own timer: it runs second
            await loop.create_future()
        after_the_block = True
    assert outer.cancelled_caught and not after_the_block

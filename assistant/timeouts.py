"""`MoveOn`: asyncio's timeout that ends its block quietly when it expires, as anyio's
`move_on_at`, without anyio's cancel scope (two sets and a host task per scope, held for as long
as an open stream waits in one)."""

from __future__ import annotations

import asyncio
from types import TracebackType


class MoveOn(asyncio.Timeout):
    """`async with MoveOn(deadline)`: past `deadline` (asyncio's clock, `time.monotonic()`; None:
    none until `reschedule`) the block is cancelled and left as if it had ended. A TimeoutError
    that is not this one's own goes on."""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            return await super().__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if self.expired():
                # An anyio scope around this one that was cancelled in the same turn of the loop
                # found the task already cancelled (by this deadline) and delivers at the task's
                # next await: this one, so the block does not end as if it had only timed out.
                await asyncio.sleep(0)
                return True
            raise

"""Two mends to hypercorn 0.18's WebSockets, where it has no setting to do better.

Applied by the app as it starts serving (app.py), so they hold in the process that serves,
also under `hypercorn --workers 1` (hypercorn_config.py runs only in hypercorn's parent there).
Written for hypercorn 0.18.0 and applied to it only: tests/test_shutdown.py and
tests/test_e2e.py fail if another version leaves them out.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

from hypercorn.protocol.ws_stream import Handshake, WSStream
from wsproto.events import Ping

_compression = False  # WS_COMPRESSION: take the permessage-deflate a client offers
_original_accept = Handshake.accept
_original_handle = WSStream.handle


def mend_hypercorn_websockets(*, compression: bool) -> None:
    """Decline WebSocket compression unless `compression`, and end each ping loop when its
    socket closes. Calling it again only changes `compression`."""
    global _compression
    _compression = compression
    if importlib.metadata.version("hypercorn") != "0.18.0":
        return
    Handshake.accept = _accept  # type: ignore[method-assign]
    WSStream.handle = _handle_then_wake_pings  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings  # type: ignore[method-assign]


def _accept(self: Handshake, *args: Any, **kwargs: Any) -> Any:
    """hypercorn's handshake answers every offer of permessage-deflate, the one extension it
    knows, and a compressor per socket is ~100 KiB (for frames of short JSON). Forgetting the
    offer before the answer declines it, as RFC 6455 allows."""
    if not _compression:
        self.extensions = None
    return _original_accept(self, *args, **kwargs)


async def _handle_then_wake_pings(self: WSStream, event: Any) -> None:
    await _original_handle(self, event)
    wake = getattr(self, "_wake_pings", None)
    if self.closed and wake is not None:
        wake.set()


async def _send_pings(self: WSStream) -> None:
    """hypercorn's ping loop (WS_PING_SECONDS) sleeps a whole interval between pings, also once
    its socket has closed, and the connection's task waits for it: every WebSocket closed in the
    last interval held its connection (~16 KiB, two tasks, its compressor: 2.1 GiB under churn),
    and a shutdown waited out `graceful_timeout`, logging a traceback for each. This one's wait
    ends when the socket closes; its first ping comes after one interval, not at once (a socket
    that lasts one turn needs none)."""
    loop = asyncio.get_running_loop()
    while True:
        wake = self._wake_pings = asyncio.Event()  # type: ignore[attr-defined]
        if self.closed:  # closed while the last ping was being sent: nothing set this wake
            return
        timer = loop.call_later(self.config.websocket_ping_interval, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()
        if self.closed:
            return
        await self._send_wsproto_event(Ping())

"""hypercorn's settings for the service: the Procfile runs `hypercorn --config file:hypercorn_config.py`.

hypercorn reads this file before it imports the app, and without the project on `sys.path`,
so it uses only the standard library (and hypercorn).

Left at hypercorn's default on purpose: `websocket_max_message_size` (16 MiB). Set to
MAX_BODY_BYTES, hypercorn would close oversized messages itself, but hypercorn 0.18 then keeps
the message in its buffer and stops reading the client's frames, its close answer included:
a client that sent another frame behind the oversized one kept the socket open for good. The
app closes those (1009) and reads on until the client answers.
"""

import asyncio
import errno
import importlib.metadata
import logging
import math
import os
import sys
import traceback
import types

# hypercorn's own lines ("Running on ...", its errors) through the service's JSON log handler.
# Given a name instead, hypercorn would give this logger a plain-text handler of its own.
errorlog = logging.getLogger("hypercorn.error")

# One process, serving itself (as `--workers 0`), not hypercorn's parent with one worker under it:
# - the parent exits 0 whatever its worker's exit code (a bad setting, a crash, an OOM kill), so a
#   crash loop would look like clean exits to systemd's Restart=on-failure or Docker's restart policy;
# - a SIGTERM to the parent alone (`docker stop`, Kubernetes: PID 1 only) never reaches the app,
#   so streams were cut by hypercorn without their `shutting_down` end; and one to the worker
#   alone left it refusing every turn while the parent kept it up.
workers = 0


# hypercorn cuts open connections this long after SIGTERM: past SHUTDOWN_GRACE_SECONDS, so that
# running turns end with `shutting_down` and their streams close before that. (Plain values only:
# hypercorn takes every name in this file as a setting, and sends them to its workers.)
try:
    _grace = float(os.environ.get("SHUTDOWN_GRACE_SECONDS", "2"))
except ValueError:  # the app refuses the value at start-up, saying why
    _grace = 2.0
graceful_timeout = max(3.0, _grace + 1.0) if math.isfinite(_grace) else 3.0
del _grace

# A WebSocket ping this often: an idle socket (between turns, or while a tool runs for minutes)
# then still carries data, so a proxy or router that cuts silent connections (Heroku's after
# 55 s, an AWS load balancer's after 60 s) leaves it open. Browsers answer pings themselves.
try:
    _ping = float(os.environ.get("WS_PING_SECONDS", "20"))
except ValueError:  # the app refuses the value at start-up, saying why
    _ping = 20.0
websocket_ping_interval = _ping if math.isfinite(_ping) and _ping >= 1 else None
del _ping


# WebSocket compression (permessage-deflate), which browsers always offer and hypercorn always
# accepts, only with WS_COMPRESSION=on: a compressor per socket is ~100 KiB (an idle socket cost
# 151 KiB instead of 49) and compressing each short JSON frame ~25 % of the service's CPU.
_compress_websockets = os.environ.get("WS_COMPRESSION", "").strip().lower() == "on"
_hypercorn_0_18 = importlib.metadata.version("hypercorn") == "0.18.0"  # what the two mends below were written for


def _decline_compression() -> None:
    """hypercorn 0.18 has no setting for it: its handshake answers every offer of the one
    extension it knows. Forgetting the offer before the answer declines it, as RFC 6455 allows."""
    from hypercorn.protocol.ws_stream import Handshake

    accept = Handshake.accept

    def accept_uncompressed(self: Handshake, *args: object, **kwargs: object) -> object:
        self.extensions = None
        return accept(self, *args, **kwargs)

    Handshake.accept = accept_uncompressed


if _hypercorn_0_18 and not _compress_websockets:
    _decline_compression()
del _decline_compression, _compress_websockets


def _ping_until_closed() -> None:
    """hypercorn 0.18's ping loop sleeps a whole interval between pings, also once its socket
    has closed, and the connection's task waits for it: every WebSocket closed in the last
    WS_PING_SECONDS held its connection (~16 KiB, two tasks, its compressor), and a shutdown
    waited out `graceful_timeout`, logging a traceback for each. The loop here ends its wait
    when the socket closes, and pings first after one interval, not at once (a socket that
    lasts one turn needs none). Only for the version it was written against: another one is
    checked by tests/test_shutdown.py (a shutdown after a WebSocket turn is prompt)."""
    from hypercorn.protocol.ws_stream import WSStream
    from wsproto.events import Ping

    handle = WSStream.handle

    async def handle_then_wake_pings(self: WSStream, event: object) -> None:
        await handle(self, event)
        wake = getattr(self, "_wake_pings", None)
        if self.closed and wake is not None:
            wake.set()

    async def send_pings(self: WSStream) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wake = self._wake_pings = asyncio.Event()
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

    WSStream.handle = handle_then_wake_pings
    WSStream._send_pings = send_pings


if _hypercorn_0_18:
    _ping_until_closed()
del _ping_until_closed, _hypercorn_0_18


def _cannot_listen(kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
    """A port already taken (or not ours to take) stops the service as a bad setting does: one
    line and exit code 2, not hypercorn's traceback. (hypercorn binds before it imports the app.)"""
    binding = [frame for frame, _ in traceback.walk_tb(tb) if frame.f_code.co_name == "_create_sockets"]
    if isinstance(exc, OSError) and binding:
        bind = binding[-1].f_locals.get("bind", "the bound address")  # the one that failed
        hint = " (another server holds it: stop that one or set PORT)" if exc.errno == errno.EADDRINUSE else ""
        sys.stderr.write(f"configuration error: cannot listen on {bind}: {exc.strerror or exc}{hint}\n")
        sys.stderr.flush()
        os._exit(2)
    sys.__excepthook__(kind, exc, tb)


sys.excepthook = _cannot_listen
del _cannot_listen

"""hypercorn's settings for the service: the Procfile runs `hypercorn --config file:hypercorn_config.py`.

hypercorn reads this file before it imports the app, and without the project on `sys.path`,
so it uses only the standard library. (What hypercorn has no setting for, the app mends:
assistant/hypercorn_mends.py.)

"""

import errno
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
    _grace = float(os.environ.get("SHUTDOWN_GRACE_SECONDS", "").strip() or "2")
except ValueError:  # the app refuses the value at start-up, saying why
    _grace = 2.0
graceful_timeout = max(3.0, _grace + 1.0) if math.isfinite(_grace) else 3.0
del _grace

# A WebSocket ping this often: an idle socket (between turns, or while a tool runs for minutes)
# then still carries data, so a proxy or router that cuts silent connections (Heroku's after
# 55 s, an AWS load balancer's after 60 s) leaves it open. Browsers answer pings themselves.
try:
    _ping = float(os.environ.get("WS_PING_SECONDS", "").strip() or "20")
except ValueError:  # the app refuses the value at start-up, saying why
    _ping = 20.0
websocket_ping_interval = _ping if math.isfinite(_ping) and _ping >= 1 else None
del _ping

# The most of one WebSocket message hypercorn holds before the app sees it: twice MAX_BODY_BYTES
# (in characters, so up to 8x in bytes), where its default, 16 Mi characters, let one socket hold
# up to 64 MiB. A message over MAX_BODY_BYTES but under this reaches the app, which closes with
# 1009 saying why; over it, hypercorn closes with 1009 itself (assistant/hypercorn_mends.py reads
# on until the client answers: hypercorn 0.18 stopped reading there).
try:
    _body = int(os.environ.get("MAX_BODY_BYTES", "").strip() or "262144")
except ValueError:  # the app refuses the value at start-up, saying why
    _body = 262144
websocket_max_message_size = 2 * max(_body, 1)
del _body


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

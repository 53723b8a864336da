"""hypercorn's settings for the service: the Procfile runs `hypercorn --config file:hypercorn_config.py`.

hypercorn reads this file before it imports the app, and without the project on `sys.path`,
so it uses only the standard library.

Left at hypercorn's default on purpose: `websocket_max_message_size` (16 MiB). Set to
MAX_BODY_BYTES, hypercorn would close oversized messages itself, but hypercorn 0.18 then keeps
the message in its buffer and stops reading the client's frames, its close answer included:
a client that sent another frame behind the oversized one kept the socket open for good. The
app closes those (1009) and reads on until the client answers.
"""

import logging

# hypercorn's own lines ("Running on ...", its errors) through the service's JSON log handler.
# Given a name instead, hypercorn would give this logger a plain-text handler of its own.
errorlog = logging.getLogger("hypercorn.error")

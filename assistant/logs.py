"""One JSON object per log line on stdout, carrying the request's correlation, thread and run IDs.

The IDs live in context variables: set once where they become known, they follow the request
into every task it starts (anyio copies the context), so no call needs to pass them around.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from contextvars import ContextVar

import anyio
import orjson

correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)
thread_id_var: ContextVar[str | None] = ContextVar("thread_id", default=None)
run_id_var: ContextVar[str | None] = ContextVar("run_id", default=None)

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

# Anything shaped like an OpenAI or bearer secret is masked wherever it appears in a log line.
_SECRET = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{6,})")
# The service's own keys, whatever their shape (OPENAI_API_KEY of a compatible server, SERVICE_API_KEY).
_KNOWN_SECRETS: set[str] = set()
# A message or traceback longer than this loses its middle: an exception can quote megabytes (a
# tool's whole input), and log pipelines cut or drop lines far shorter than that.
MAX_LOGGED_CHARS = 16384


def register_secrets(*values: str | None) -> None:
    """Mask these exact values wherever they appear, as well as anything shaped like a key."""
    _KNOWN_SECRETS.update(v for v in values if v and len(v) >= 6)


def redact(text: str) -> str:
    """Mask API keys and bearer tokens in free text (upstream error bodies, exception messages)."""
    for secret in _KNOWN_SECRETS:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return _SECRET.sub("[redacted]", text)


def _bounded(text: str) -> str:
    """`text`, or its head and its tail (a traceback's last line says what was raised)."""
    if len(text) <= MAX_LOGGED_CHARS:
        return text
    half = MAX_LOGGED_CHARS // 2
    return f"{text[:half]} ... ({len(text) - 2 * half} characters left out) ... {text[-half:]}"


def _loggable(value: object) -> object:
    """A field's value with secrets masked and long text cut, into lists and dicts: an ID or an
    `extra=` field can carry text a client or the upstream chose."""
    if isinstance(value, str):
        return _bounded(redact(value))
    if isinstance(value, (list, tuple)):
        return [_loggable(item) for item in value]
    if isinstance(value, dict):
        return {key: _loggable(item) for key, item in value.items()}
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _loggable(record.getMessage()),
        }
        for key, var in (
            ("correlation_id", correlation_id_var),
            ("thread_id", thread_id_var),
            ("run_id", run_id_var),
        ):
            value = var.get()
            if value is not None:
                entry[key] = _loggable(value)
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = _loggable(value)
        if record.exc_info:
            entry["exception"] = _loggable(self.formatException(record.exc_info))
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    """Route the service's and the servers' loggers through the JSON formatter on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The HTTP clients log every request at INFO/DEBUG; that is noise on the hot path.
    for noisy in ("httpx", "httpcore", "openai", "hpack"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


async def adopt_server_loggers() -> None:
    """Send hypercorn's own records through the JSON handler instead of its plain-text one.

    Started as the Procfile does, hypercorn installs none (hypercorn_config.py). Started without
    that file, it installs them when it starts listening, just after the app's start-up, so this
    waits (briefly) for them to appear and then removes them.
    """
    if not any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        return  # logging was not configured by the service (embedded, or under tests)
    server_loggers = [logging.getLogger(name) for name in ("hypercorn.error", "hypercorn.access")]
    for _ in range(100):
        if any(server_logger.handlers for server_logger in server_loggers):
            break
        await anyio.sleep(0.02)
    for server_logger in server_loggers:
        server_logger.handlers.clear()
        server_logger.propagate = True

"""Settings read once from the environment at start-up.

Every value is checked here so that a bad deployment stops with one clear line instead of
failing on the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit


DEFAULT_MODEL = "gpt-4.1-mini"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message is meant for the operator."""


@dataclass(frozen=True, slots=True)
class Settings:
    openai_api_key: str = field(repr=False)
    openai_base_url: str | None = None
    openai_model: str = DEFAULT_MODEL
    truncation: str = "auto"
    engine: str = "responses"
    assistant_id: str | None = None
    instructions: str | None = None
    initial_message: str | None = None
    tools_module: str | None = None
    tool_timeout_seconds: float = 30.0
    max_tool_rounds: int = 10
    sse_heartbeat_seconds: float = 15.0
    sse_retry_ms: int = 5000
    ws_ping_seconds: float = 20.0  # checked here; hypercorn_config.py reads WS_PING_SECONDS itself
    ws_compression: bool = False  # take the permessage-deflate a client offers (assistant/hypercorn_mends.py)
    log_level: str = "INFO"
    upstream_max_retries: int = 3
    upstream_connect_timeout_seconds: float = 10.0
    upstream_idle_timeout_seconds: float = 120.0
    thread_lock_timeout_seconds: float = 30.0
    max_message_chars: int = 32_000
    max_body_bytes: int = 256 * 1024
    slow_client_timeout_seconds: float = 30.0
    shutdown_grace_seconds: float = 2.0
    stream_retention_seconds: float = 300.0
    stream_max_events_per_run: int = 20_000
    stream_max_bytes_per_run: int = 4 * 1024 * 1024
    stream_max_runs: int = 1000
    service_api_key: str | None = field(default=None, repr=False)
    cors_allow_origins: tuple[str, ...] = ()


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_ENGINES = ("responses", "assistants")
_TRUNCATIONS = ("auto", "disabled")


def _is_http_url(value: str) -> bool:
    """An http:// or https:// URL with a host (and, if given, a valid port)."""
    try:
        parts = urlsplit(value)
        parts.port  # raises ValueError when it is not a number in range
    except ValueError:  # a malformed [IPv6] host, or port
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_origin(value: str) -> bool:
    """What a browser sends as Origin: scheme://host[:port] in lower case, nothing before or after."""
    if not _is_http_url(value):
        return False
    parts = urlsplit(value)
    return value == f"{parts.scheme}://{parts.netloc}" == value.lower() and "@" not in parts.netloc


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from environment variables, raising `ConfigError` on bad values."""
    env = os.environ if environ is None else environ

    def text(name: str) -> str | None:
        value = env.get(name, "").strip()
        return value or None

    def number(name: str, default: float, *, minimum: float, integer: bool = False) -> float:
        raw = text(name)
        if raw is None:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
        if value != value or value == float("inf"):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
        return value

    api_key = text("OPENAI_API_KEY")
    if api_key is None:
        raise ConfigError("OPENAI_API_KEY is required (the key the service uses to call OpenAI)")

    base_url = text("OPENAI_BASE_URL")
    if base_url is not None and not _is_http_url(base_url):
        raise ConfigError(f"OPENAI_BASE_URL must be an http:// or https:// URL with a host, got {base_url!r}")

    log_level = (text("LOG_LEVEL") or "INFO").upper()
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {log_level!r}")

    truncation = (text("OPENAI_TRUNCATION") or "auto").lower()
    if truncation not in _TRUNCATIONS:
        raise ConfigError(f"OPENAI_TRUNCATION must be one of {', '.join(_TRUNCATIONS)}, got {truncation!r}")

    engine = (text("ASSISTANT_ENGINE") or "responses").lower()
    if engine not in _ENGINES:
        raise ConfigError(f"ASSISTANT_ENGINE must be one of {', '.join(_ENGINES)}, got {engine!r}")
    assistant_id = text("OPENAI_ASSISTANT_ID")
    if engine == "assistants" and assistant_id is None:
        raise ConfigError("ASSISTANT_ENGINE=assistants needs OPENAI_ASSISTANT_ID (the asst_... to run)")

    origins = tuple(o.strip() for o in (text("CORS_ALLOW_ORIGINS") or "").split(",") if o.strip())
    for origin in origins:  # Starlette compares them with the browser's Origin as strings
        if origin != "*" and not _is_origin(origin):
            raise ConfigError(f"CORS_ALLOW_ORIGINS takes origins like https://app.example.com or *, got {origin!r}")

    ws_ping_seconds = number("WS_PING_SECONDS", 20.0, minimum=0)
    if 0 < ws_ping_seconds < 1:  # a ping every few milliseconds would keep a core busy for one idle socket
        raise ConfigError(f"WS_PING_SECONDS must be 0 (no pings) or at least 1, got {ws_ping_seconds:g}")

    ws_compression = (text("WS_COMPRESSION") or "off").lower()
    if ws_compression not in ("on", "off"):
        raise ConfigError(f"WS_COMPRESSION must be on or off, got {ws_compression!r}")

    return Settings(
        openai_api_key=api_key,
        openai_base_url=base_url,
        openai_model=text("OPENAI_MODEL") or DEFAULT_MODEL,
        truncation=truncation,
        engine=engine,
        assistant_id=assistant_id,
        instructions=text("ASSISTANT_INSTRUCTIONS"),
        initial_message=text("ASSISTANT_INITIAL_MESSAGE"),
        tools_module=text("ASSISTANT_TOOLS"),
        tool_timeout_seconds=number("TOOL_TIMEOUT_SECONDS", 30.0, minimum=0.001),
        max_tool_rounds=int(number("MAX_TOOL_ROUNDS", 10, minimum=1, integer=True)),
        sse_heartbeat_seconds=number("SSE_HEARTBEAT_SECONDS", 15.0, minimum=0.01),
        sse_retry_ms=int(number("SSE_RETRY_MS", 5000, minimum=0, integer=True)),
        ws_ping_seconds=ws_ping_seconds,
        ws_compression=ws_compression == "on",
        log_level=log_level,
        upstream_max_retries=int(number("UPSTREAM_MAX_RETRIES", 3, minimum=0, integer=True)),
        upstream_connect_timeout_seconds=number(
            "UPSTREAM_CONNECT_TIMEOUT_SECONDS", 10.0, minimum=0.01
        ),
        upstream_idle_timeout_seconds=number("UPSTREAM_IDLE_TIMEOUT_SECONDS", 120.0, minimum=0.01),
        thread_lock_timeout_seconds=number("THREAD_LOCK_TIMEOUT_SECONDS", 30.0, minimum=0),
        max_message_chars=int(number("MAX_MESSAGE_CHARS", 32_000, minimum=1, integer=True)),
        max_body_bytes=int(number("MAX_BODY_BYTES", 256 * 1024, minimum=64, integer=True)),
        slow_client_timeout_seconds=number("SLOW_CLIENT_TIMEOUT_SECONDS", 30.0, minimum=0.01),
        shutdown_grace_seconds=number("SHUTDOWN_GRACE_SECONDS", 2.0, minimum=0),
        stream_retention_seconds=number("STREAM_RETENTION_SECONDS", 300.0, minimum=0),
        stream_max_events_per_run=int(number("STREAM_MAX_EVENTS_PER_RUN", 20_000, minimum=10, integer=True)),
        stream_max_bytes_per_run=int(
            number("STREAM_MAX_BYTES_PER_RUN", 4 * 1024 * 1024, minimum=1024, integer=True)
        ),
        stream_max_runs=int(number("STREAM_MAX_RUNS", 1000, minimum=1, integer=True)),
        service_api_key=text("SERVICE_API_KEY"),
        cors_allow_origins=origins,
    )

"""What every engine shares about talking to OpenAI: the client, retries, and error mapping."""

from __future__ import annotations

import email.utils
import logging
import random
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import httpx
import openai

from .config import Settings
from .errors import NotFound, ServiceError, ThreadBusy, UpstreamError, UpstreamTimeout
from .logs import redact
from .upstream_transport import UpstreamTransport

logger = logging.getLogger("assistant.upstream")

T = TypeVar("T")

MAX_CONNECTIONS = 1000  # to the upstream, at once: one per streaming run
# Statuses that say "not processed, try later"; anything else is answered at once.
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_MAX_BACKOFF_SECONDS = 20.0


def uses_proxy() -> bool:
    """Whether the environment names an HTTP proxy (the variables httpx reads)."""
    return any(key in ("http", "https", "all") for key in urllib.request.getproxies())


def create_openai_client(settings: Settings) -> openai.AsyncOpenAI:
    """One client, one connection pool, for the life of the process.

    It sends through an `httpx.AsyncClient` (the legacy client openai 3.x still accepts) over
    the lean `UpstreamTransport`, whose read timeout doubles as the idle timeout between
    upstream events at no cost per event.
    The SDK's own retries are off: the engines retry where they know it is safe.
    """
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout_seconds,
        read=settings.upstream_idle_timeout_seconds,
        write=30.0,
        pool=settings.upstream_connect_timeout_seconds,
    )
    if uses_proxy():
        # httpx's own transport honours HTTPS_PROXY and the like; the lean one does not.
        logger.info("an HTTP proxy is configured: the upstream is reached through httpx's own transport")
        http_client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=MAX_CONNECTIONS))
    else:
        http_client = httpx.AsyncClient(timeout=timeout, transport=UpstreamTransport(max_connections=MAX_CONNECTIONS))
    return openai.AsyncOpenAI(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        http_client=http_client,
        max_retries=0,
        timeout=timeout,
    )


def error_message(exc: openai.APIStatusError) -> str:
    """OpenAI's own message; a body that is not JSON (a proxy's HTML page) is not passed on."""
    body = exc.body
    message = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        message = inner.get("message")
    return redact(str(message or "no details"))[:500]


def error_code(exc: openai.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        code = inner.get("code")
        return str(code) if code else None
    return None


def is_thread_busy(exc: BaseException) -> bool:
    """The upstream is still working on an earlier turn of this thread."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 409):
        return False
    if error_code(exc) == "conversation_locked":
        return True
    message = error_message(exc).lower()
    return "already has an active run" in message or "while a run" in message


def _is_about(exc: openai.APIStatusError, thread_id: str) -> bool:
    """Whether a 404 is the thread's own (not an unknown model or assistant, say)."""
    return thread_id in error_message(exc) or exc.param in ("conversation", "thread_id")


def map_upstream_error(exc: BaseException, *, thread_id: str | None = None) -> ServiceError:
    """The service error a client should see for an exception raised while calling OpenAI."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return UpstreamTimeout("the upstream did not answer in time")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = error_message(exc)
        if is_thread_busy(exc):
            return ThreadBusy("the thread is still busy with an earlier message; retry shortly")
        if status == 404 and thread_id is not None and _is_about(exc, thread_id):
            return NotFound(f"thread {thread_id!r} was not found", type="thread_not_found")
        if status in (401, 403):
            return UpstreamError(f"the upstream refused the service's credentials ({status})")
        if status == 429:
            return UpstreamError(
                f"the upstream is rate limiting: {message}", type="upstream_rate_limited", retry_after=retry_after(exc)
            )
        # A 5xx's wait (a 503's Retry-After, say) is the client's to keep, as a 429's is.
        wait = retry_after(exc) if status >= 500 else None
        return UpstreamError(f"the upstream answered {status}: {message}", retry_after=wait)
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)):
        return UpstreamError("the upstream connection failed")
    if isinstance(exc, openai.OpenAIError):
        return UpstreamError(f"the upstream call failed: {redact(str(exc))[:300]}")
    return UpstreamError("the upstream call failed unexpectedly")


def retry_after(exc: BaseException) -> float | None:
    """The upstream's wait before a retry (`retry-after-ms`, or Retry-After in seconds or as an
    HTTP date); None when absent or unreadable."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    try:
        return max(float(headers.get("retry-after-ms", "")) / 1000, 0.0)
    except ValueError:
        pass
    header = headers.get("retry-after")
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(header).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0)


def retry_delay(attempt: int, exc: BaseException | None = None) -> float:
    """Exponential backoff with full jitter, or the upstream's Retry-After when it gave one."""
    delay = retry_after(exc) if exc is not None else None
    if delay is not None:
        return min(delay, _MAX_BACKOFF_SECONDS)
    return random.uniform(0, min(_MAX_BACKOFF_SECONDS, 0.5 * 2**attempt))


def waits_too_long(exc: BaseException) -> bool:
    """OpenAI asks for a longer wait than a request should spend: the client gets it instead."""
    return (retry_after(exc) or 0.0) > _MAX_BACKOFF_SECONDS


def may_have_taken_effect(exc: BaseException) -> bool:
    """Whether a failed POST may have been processed upstream (so a blind retry could repeat it)."""
    if isinstance(exc, (openai.APIConnectionError, httpx.TransportError)) and not isinstance(
        exc, openai.APITimeoutError
    ):
        cause = exc.__cause__ or exc
        return not isinstance(cause, (httpx.ConnectError, httpx.ConnectTimeout))
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500
    return True


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    max_retries: int,
    what: str,
    retry_if: Callable[[BaseException], Awaitable[bool]] | None = None,
) -> T:
    """Run `call`, retrying throttling and transient failures with backoff.

    A failure that may have taken effect upstream (a 5xx after the request was sent) is retried
    only when `retry_if` says it is safe; without it, such failures are raised at once.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            retryable = (
                isinstance(exc, openai.APIStatusError) and exc.status_code in RETRYABLE_STATUS
            ) or isinstance(exc, (openai.APIConnectionError, httpx.TransportError))
            if not retryable or attempt >= max_retries:
                raise
            if may_have_taken_effect(exc) and (retry_if is None or not await retry_if(exc)):
                raise
            if waits_too_long(exc):
                raise
            delay = retry_delay(attempt, exc)
            logger.warning(
                "retrying %s after %s", what, type(exc).__name__,
                extra={"attempt": attempt + 1, "delay_seconds": round(delay, 3)},
            )
            await anyio.sleep(delay)
            attempt += 1

"""The service's errors: one class per kind a client can tell apart, each with its HTTP status.

Every failure a client sees is one of these, as JSON `{"error", "type", "correlation_id"}` or as
an `error` event with the same fields, so clients branch on `type`, never on message text.
"""

from __future__ import annotations

import logging
import math

import orjson


class ServiceError(Exception):
    status_code = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        if type is not None:
            self.type = type
        if status_code is not None:
            self.status_code = status_code
        self.retry_after = retry_after

    @property
    def retry_after_seconds(self) -> int | None:
        """The wait to pass on, in whole seconds as a Retry-After header gives it: rounded up, so a
        client never retries before the upstream allows."""
        return None if self.retry_after is None else max(1, math.ceil(self.retry_after))

    def payload(self, correlation_id: str | None) -> dict[str, object]:
        payload: dict[str, object] = {"error": self.message, "type": self.type, "correlation_id": correlation_id}
        if self.retry_after is not None:  # also in an error event, which has no header to carry it
            payload["retry_after_seconds"] = self.retry_after_seconds
        return payload


class BadRequest(ServiceError):
    status_code = 400
    type = "invalid_request"


class Unauthorized(ServiceError):
    status_code = 401
    type = "unauthorized"


class NotFound(ServiceError):
    status_code = 404
    type = "not_found"


class MethodNotAllowed(ServiceError):
    status_code = 405
    type = "method_not_allowed"


class ThreadBusy(ServiceError):
    status_code = 409
    type = "thread_busy"


class RunCancelled(ServiceError):
    status_code = 409
    type = "run_cancelled"


class PayloadTooLarge(ServiceError):
    status_code = 413
    type = "payload_too_large"


class RequestTimeout(ServiceError):
    status_code = 408
    type = "request_timeout"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    type = "unsupported_media_type"


class ClientGone(ServiceError):
    """The client hung up before its request was read: nobody is left to answer."""

    status_code = 499
    type = "client_disconnected"


class UpstreamError(ServiceError):
    """OpenAI answered with an error, broke the stream, or the run failed there."""

    status_code = 502
    type = "upstream_error"


class UpstreamTimeout(ServiceError):
    status_code = 504
    type = "upstream_timeout"


class ShuttingDown(ServiceError):
    status_code = 503
    type = "shutting_down"


def error_body_and_headers(error: ServiceError, correlation_id: str | None) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An error answered below Starlette (raw ASGI or hypercorn's own HTTP events): its JSON body
    and the headers every error carries."""
    body = orjson.dumps(error.payload(correlation_id))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
               (b"cache-control", b"no-store")]
    return body, headers


def log_refusal(error: ServiceError) -> None:
    """A request the client got wrong: one INFO line, so the correlation ID of its error
    payload leads to something in the logs."""
    logging.getLogger("assistant.http").info(
        "request refused with %s (%d): %s", error.type, error.status_code, error.message
    )

"""ASGI middleware: the correlation ID every request carries, the service's API key, and CORS."""

from __future__ import annotations

import hmac
import re
import uuid

import orjson
from starlette.datastructures import Headers
from starlette.middleware import cors
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import BadRequest, ServiceError, Unauthorized, error_body_and_headers, log_refusal
from .logs import correlation_id_var

# A caller's own ID is kept only when it is a short token that is safe in headers and logs.
SAFE_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


PUBLIC_PATHS = frozenset({"/health", "/"})


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def choose_correlation_id(given: bytes | None) -> str:
    """The caller's `X-Correlation-ID` if it is safe, else a new one."""
    candidate = given.decode("latin-1") if given is not None else ""
    return candidate if SAFE_CORRELATION_ID.fullmatch(candidate) else new_correlation_id()


def header_of(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


class CorrelationIdMiddleware:
    """Gives every request an ID: the caller's `X-Correlation-ID` if safe, else a new one.

    It is put in `scope["state"]`, in the logging context, and on the response's headers
    (for WebSockets, on the handshake's accept).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        correlation_id = choose_correlation_id(header_of(scope, b"x-correlation-id"))
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        correlation_id_var.set(correlation_id)
        header = (b"x-correlation-id", correlation_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def is_bare_root_path(scope: Scope) -> bool:
    root = scope.get("root_path", "")
    return bool(root) and scope["path"] == root


def route_path(scope: Scope) -> str:
    """The path the routes see: under `hypercorn --root-path /prefix` a proxy that keeps the
    prefix sends `/prefix/health`, which routing matches as `/health` (Starlette's rule; the
    bare prefix is "/" here: it is redirected to `/prefix/`, which is public)."""
    path, root = scope["path"], scope.get("root_path", "")
    if is_bare_root_path(scope):
        return "/"
    if root and path.startswith(root + "/"):
        return path[len(root) :]
    return path


class APIKeyMiddleware:
    """With SERVICE_API_KEY set, every route but /health needs `Authorization: Bearer <key>`.

    The chat page and its static files stay public: they hold no data, and a browser cannot
    send a bearer token when it opens a page.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan has no path
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in PUBLIC_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        scheme, _, given = (header_of(scope, b"authorization") or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        error = Unauthorized("missing or wrong API key: send 'Authorization: Bearer <SERVICE_API_KEY>'")
        await send_refusal(scope, send, error, [(b"www-authenticate", b"Bearer")])


async def send_refusal(scope: Scope, send: Send, error: ServiceError,
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answers a request refused before any route with the service's JSON error, and logs it.

    A WebSocket handshake gets the same HTTP answer where the server can send one (hypercorn
    can: the websocket.http.response extension); no socket is opened.
    """
    log_refusal(error)
    answer = "http.response"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": error.type})  # a bare 403
            return
        answer = "websocket.http.response"
    body, error_headers = error_body_and_headers(error, scope.get("state", {}).get("correlation_id"))
    await send({"type": f"{answer}.start", "status": error.status_code, "headers": [*error_headers, *(headers or ())]})
    await send({"type": f"{answer}.body", "body": body})


def is_same_origin(origin: str, headers: Headers) -> bool:
    """A page of the service's own host (its chat page), directly or through a proxy that passes
    the host on (`Host` or `X-Forwarded-Host`, as `deploy/nginx.conf` does)."""
    host = origin.partition("://")[2].lower()
    forwarded = headers.get("x-forwarded-host", "").partition(",")[0].strip().lower()
    return bool(host) and host in (headers.get("host", "").lower(), forwarded)


class CORSMiddleware(cors.CORSMiddleware):
    """Starlette's, with a refused preflight answered in the service's JSON error shape, and the
    same origins checked on a WebSocket handshake.

    A browser opens a WebSocket to any origin without asking (no preflight, and the page reads
    every frame), so a handshake whose `Origin` is neither allowed nor the service's own host is
    refused with 403. Clients that are not browsers send no `Origin` and are let through.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or self.is_allowed_origin(origin) or is_same_origin(origin, headers):
            await self.app(scope, receive, send)
            return
        error = ServiceError(f"WebSocket from origin {origin!r} refused: not in CORS_ALLOW_ORIGINS",
                             type="cors_refused", status_code=403)
        await send_refusal(scope, send, error)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode()  # "Disallowed CORS origin, headers"
        error = BadRequest(f"{reason} (CORS_ALLOW_ORIGINS and the headers the service takes)", type="cors_refused")
        log_refusal(error)
        headers = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
        headers["cache-control"] = "no-store"  # as every error
        return Response(orjson.dumps(error.payload(correlation_id_var.get())), status_code=400, headers=headers,
                        media_type="application/json")

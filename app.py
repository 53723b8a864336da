"""The Starlette application: configuration, routes and middleware wired together.

Run it with `hypercorn app:app` (see Procfile). Bad configuration stops start-up with one line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute

from assistant.assistants_engine import AssistantsEngine
from assistant.config import ConfigError, Settings, load_settings
from assistant.errors import ServiceError
from assistant.garbage_collection import tune_garbage_collector
from assistant.http_api import (
    STATIC_DIR,
    Endpoint,
    RevalidatedStaticFiles,
    cancel_run,
    chat,
    chat_page,
    create_thread,
    handle_http_exception,
    handle_service_error,
    handle_unexpected_error,
    health,
    stream_run,
    websocket_not_found,
    websocket_only,
)
from assistant.hypercorn_mends import mend_hypercorn
from assistant.logs import adopt_server_loggers, configure_logging, register_secrets
from assistant.middleware import APIKeyMiddleware, CORSMiddleware, CorrelationIdMiddleware
from assistant.responses_engine import ResponsesEngine
from assistant.run_manager import RunManager, on_termination_signal
from assistant.tool_executor import ToolConfigError, ToolRegistry, load_tool_map
from assistant.upstream import create_openai_client
from assistant.websocket_stream_handler import websocket_chat

logger = logging.getLogger("assistant")


def create_app(settings: Settings | None = None, tool_map: Mapping[str, Callable[..., Any]] | None = None) -> Starlette:
    """The service as an ASGI app; `tool_map` overrides ASSISTANT_TOOLS when embedding it."""
    settings = settings or load_settings()
    register_secrets(settings.openai_api_key, settings.service_api_key)
    if tool_map is None:
        tool_map = load_tool_map(settings.tools_module)
    registry = ToolRegistry(tool_map, timeout=settings.tool_timeout_seconds)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client = create_openai_client(settings)
        engine_class = AssistantsEngine if settings.engine == "assistants" else ResponsesEngine
        engine = engine_class(client, settings, registry)
        async with RunManager(engine, registry, settings) as runs, anyio.create_task_group() as task_group:
            app.state.runs = runs
            on_termination_signal(runs.begin_shutdown)
            task_group.start_soon(adopt_server_loggers)
            logger.info(
                "service ready",
                extra={"engine": engine.name, "model": settings.openai_model, "tools": list(registry.names)},
            )
            tune_garbage_collector()
            mend_hypercorn(compression=settings.ws_compression,
                           slow_client_timeout_seconds=settings.slow_client_timeout_seconds)
            try:
                yield
            finally:
                logger.info("shutting down")
                task_group.cancel_scope.cancel()
        await client.close()

    middleware = [Middleware(CorrelationIdMiddleware)]
    if settings.cors_allow_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_allow_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "X-Correlation-ID", "Last-Event-ID", "Idempotency-Key"],
                expose_headers=["X-Correlation-ID"],
            )
        )
    if settings.service_api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=settings.service_api_key))

    app = Starlette(
        routes=[
            # Every WebSocket handshake is taken by one of these two; HTTP never matches them.
            WebSocketRoute("/ws/chat", Endpoint(websocket_chat)),
            WebSocketRoute("/{path:path}", Endpoint(websocket_not_found)),
            Route("/", Endpoint(chat_page), methods=["GET"]),
            Mount("/static", RevalidatedStaticFiles(directory=STATIC_DIR), name="static"),
            Route("/health", Endpoint(health), methods=["GET"]),
            Route("/threads", Endpoint(create_thread), methods=["POST"]),
            Route("/start", Endpoint(create_thread), methods=["GET"]),
            Route("/chat", Endpoint(chat), methods=["POST"]),
            Route("/chat/stream/{run_id}", Endpoint(stream_run), methods=["GET"]),
            Route("/runs/{run_id}/cancel", Endpoint(cancel_run), methods=["POST"]),
            Route("/ws/chat", Endpoint(websocket_only), methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={
            ServiceError: handle_service_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected_error,
        },
        lifespan=lifespan,
    )
    # `POST /chat/` is a JSON 404, not Starlette's 307 to `/chat`: its Location is absolute and
    # built from what the service sees, so behind a proxy that strips a path prefix it points
    # outside the prefix.
    app.router.redirect_slashes = False
    app.state.settings = settings
    return app


def _app_from_environment() -> Starlette:
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        return create_app(settings)
    except (ConfigError, ToolConfigError) as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


app = _app_from_environment()

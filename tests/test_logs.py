"""Correlation IDs and secrets in logs and in what clients see: the service's own keys are masked
whatever their shape, and every line of a WebSocket's turns carries its handshake's ID."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import respx
from starlette.testclient import TestClient

from app import create_app
from assistant.config import load_settings
from assistant.logs import MAX_LOGGED_CHARS, JsonFormatter, correlation_id_var, redact, register_secrets
from tests.upstream_mock import (
    BASE_URL,
    call_events,
    openai_error,
    sse_response,
    text_events,
    upstream,  # noqa: F401  (fixture)
)

SERVICE_KEY = "svc_0123456789abcdef"  # a SERVICE_API_KEY is any string, not sk- shaped
OPENAI_KEY = "0123456789abcdef0123456789abcdef"  # an OpenAI-compatible server's key (Azure-style)


def leaky_tool(url: str) -> str:
    """Fetch a URL."""
    # what a client library says when the call it made with the service's header fails
    raise RuntimeError(f"GET {url} failed; sent authorization: bearer {SERVICE_KEY}")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:  # formatted now, in the emitting context
        self.lines.append(orjson.loads(JsonFormatter().format(record)))


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    handler = Collect()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def make_client(**env: str) -> TestClient:
    settings = load_settings({"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": BASE_URL, "OPENAI_MODEL": "m",
                              "SERVICE_API_KEY": SERVICE_KEY, **env})
    return TestClient(create_app(settings, tool_map={"leaky_tool": leaky_tool}), raise_server_exceptions=False)


AUTH = {"authorization": f"Bearer {SERVICE_KEY}", "content-type": "application/json"}


def test_redact_masks_bearer_tokens_whatever_their_case_and_alphabet() -> None:
    assert SERVICE_KEY not in redact(f"authorization: bearer {SERVICE_KEY}")
    assert "Zm9v+YmFy/YmF6" not in redact("Authorization: Bearer abcdef+Zm9v+YmFy/YmF6==")


def test_a_tool_exception_never_shows_the_service_api_key(upstream: respx.MockRouter, logs: list[dict[str, Any]]) -> None:
    upstream.post("/responses").mock(side_effect=[
        sse_response(call_events(("leaky_tool", '{"url": "http://x.example/"}'))),
        sse_response(text_events("done")),
    ])
    with make_client() as client:
        response = client.post("/chat", json={"thread_id": "conv_t", "message": "hi"},
                               headers={**AUTH, "X-Correlation-ID": "leak-1"})
    assert response.status_code == 200
    sent_upstream = [c.request.content.decode() for c in upstream.calls]
    dumped = "\n".join(orjson.dumps(line).decode() for line in logs)
    assert SERVICE_KEY not in dumped, [line for line in logs if SERVICE_KEY in orjson.dumps(line).decode()]
    assert not any(SERVICE_KEY in body for body in sent_upstream)


def test_an_upstream_error_body_never_shows_the_openai_api_key(upstream: respx.MockRouter, logs: list[dict[str, Any]]) -> None:
    upstream.post("/responses").mock(return_value=openai_error(400, f"Invalid API key format: '{OPENAI_KEY}'"))
    with make_client() as client:
        response = client.post("/chat", json={"thread_id": "conv_t", "message": "hi"},
                               headers={**AUTH, "X-Correlation-ID": "leak-2"})
    assert response.status_code == 502
    assert OPENAI_KEY not in response.text, response.text
    assert OPENAI_KEY not in "\n".join(orjson.dumps(line).decode() for line in logs)


def test_websocket_turns_log_and_answer_with_the_handshake_id(upstream: respx.MockRouter, logs: list[dict[str, Any]]) -> None:
    upstream.post("/responses").mock(side_effect=[sse_response(text_events("one")), sse_response(text_events("two"))])
    with make_client() as client:
        with client.websocket_connect("/ws/chat", headers={**AUTH, "X-Correlation-ID": "ws-1"}) as ws:
            for text in ("a", "b"):
                ws.send_text(orjson.dumps({"thread_id": "conv_w", "message": text}).decode())
                while (frame := orjson.loads(ws.receive_text()))["event"] != "metadata":
                    pass
                assert frame["data"]["correlation_id"] == "ws-1"
            ws.send_text("{not json")
            frame = orjson.loads(ws.receive_text())
            assert frame["correlation_id"] == "ws-1"
    ours = [line for line in logs
            if line["logger"].startswith("assistant") and line["message"] not in ("service ready", "shutting down")]
    assert ours and all(line.get("correlation_id") == "ws-1" for line in ours), ours


def test_a_huge_message_or_traceback_is_logged_as_its_head_and_tail() -> None:
    """An exception can quote megabytes (a tool's whole input): a log line keeps the head and the
    tail of each, the tail being what was raised, masked before the cut."""
    key = "sk-proj-abcdefghijklmnop1234"
    try:
        raise ValueError(f"{key} " + "x" * 1_000_000 + " the end")
    except ValueError as exc:
        record = logging.LogRecord("assistant.tools", logging.ERROR, __file__, 1, "raised: %s", (exc,), None)
        record.exc_info = (type(exc), exc, exc.__traceback__)
    entry = orjson.loads(JsonFormatter().format(record))
    limit = MAX_LOGGED_CHARS
    for field in ("message", "exception"):
        text = entry[field]
        assert len(text) < limit + 100 and "characters left out" in text, field
        assert text.endswith(" the end") and "abcdefghijklmnop" not in text, field
    assert entry["message"].startswith("raised: [redacted] xxx")
    assert entry["exception"].startswith("Traceback (most recent call last):")
    short = logging.LogRecord("assistant", logging.INFO, __file__, 1, "%s", ("y" * limit,), None)
    assert orjson.loads(JsonFormatter().format(short))["message"] == "y" * limit


def test_every_field_of_a_line_is_masked_not_only_the_message() -> None:
    """The correlation ID is the client's token, and `extra=` fields can carry what the upstream
    or a client sent: the service's keys are masked there too, in lists and dicts as well."""
    register_secrets(SERVICE_KEY)
    record = logging.LogRecord("assistant", logging.INFO, __file__, 1, "plain", (), None)
    record.upstream_run_id = f"run_{SERVICE_KEY}"
    record.details = {"sent": [f"Bearer {OPENAI_KEY}", 3], "note": "x" * (2 * MAX_LOGGED_CHARS)}
    token = correlation_id_var.set(SERVICE_KEY)
    try:
        line = JsonFormatter().format(record)
    finally:
        correlation_id_var.reset(token)
    assert SERVICE_KEY not in line and OPENAI_KEY not in line
    entry = orjson.loads(line)
    assert entry["correlation_id"] == "[redacted]" and entry["upstream_run_id"] == "run_[redacted]"
    assert entry["details"]["sent"][0].endswith("[redacted]") and entry["details"]["sent"][1] == 3
    assert "characters left out" in entry["details"]["note"]

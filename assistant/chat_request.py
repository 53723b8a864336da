"""Checks a chat message from a client (HTTP body or WebSocket frame) before any upstream call."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from .errors import BadRequest

# OpenAI ids (conv_..., thread_...) are short tokens of this alphabet; anything else is a typo
# or an attack, and is refused before it reaches a URL path upstream.
THREAD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# An Idempotency-Key: printable ASCII, as a header can carry it (a UUID is the usual choice).
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")


class ChatRequest(NamedTuple):
    thread_id: str
    message: str


def check_thread_id(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"'thread_id' must be a string, got {_json_type(value)}")
    if not THREAD_ID.fullmatch(value):
        raise BadRequest("'thread_id' is not a valid thread id (letters, digits, '_' and '-', at most 128)")
    return value


def check_run_id(value: Any, field: str = "run id") -> str:
    if not isinstance(value, str) or not THREAD_ID.fullmatch(value):
        raise BadRequest(f"{field} is not a valid run id (run_...)")
    return value


def check_idempotency_key(value: Any, field: str = "Idempotency-Key") -> str:
    if not isinstance(value, str) or not IDEMPOTENCY_KEY.fullmatch(value):
        raise BadRequest(f"{field} must be 1 to 255 printable ASCII characters (a UUID, say)")
    return value


def parse_chat_request(data: Any, *, max_message_chars: int) -> ChatRequest:
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, got {_json_type(data)}")
    missing = [name for name in ("thread_id", "message") if name not in data]
    if missing:
        raise BadRequest(f"missing field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    thread_id = check_thread_id(data["thread_id"])
    message = data["message"]
    if not isinstance(message, str):
        raise BadRequest(f"'message' must be a string, got {_json_type(message)}")
    if not message.strip():
        raise BadRequest("'message' is empty")
    if len(message) > max_message_chars:
        raise BadRequest(
            f"'message' is {len(message)} characters long; the limit is {max_message_chars} (MAX_MESSAGE_CHARS)"
        )
    return ChatRequest(thread_id, message)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"

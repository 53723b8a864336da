"""Tests of the chat request check: every bad input is refused with a message naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from assistant.chat_request import ChatRequest, check_thread_id, parse_chat_request
from assistant.errors import BadRequest

LIMIT = 50


def parse(data: Any) -> ChatRequest:
    return parse_chat_request(data, max_message_chars=LIMIT)


def refused(data: Any) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse(data)
    error = info.value
    assert error.status_code == 400 and error.type == "invalid_request"
    assert str(error) == error.message
    return error


@pytest.mark.parametrize(
    ("body", "kind"),
    [(None, "null"), (True, "a boolean"), (False, "a boolean"), (0, "a number"), (1.5, "a number"),
     ("hello", "a string"), ("", "a string"), ([], "an array"), ([{"thread_id": "t", "message": "m"}], "an array")],
)
def test_non_object_bodies(body: Any, kind: str) -> None:
    assert refused(body).message == f"the body must be a JSON object, got {kind}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "missing fields: thread_id, message"),
        ({"message": "hi"}, "missing field: thread_id"),
        ({"thread_id": "conv_1"}, "missing field: message"),
        ({"threadId": "conv_1", "text": "hi"}, "missing fields: thread_id, message"),
    ],
)
def test_missing_fields(body: dict[str, Any], message: str) -> None:
    assert refused(body).message == message


@pytest.mark.parametrize(
    ("value", "kind"),
    [(None, "null"), (True, "a boolean"), (12, "a number"), (1.0, "a number"), ([], "an array"),
     (["conv_1"], "an array"), ({}, "an object"), ({"id": "conv_1"}, "an object")],
)
def test_thread_id_wrong_type(value: Any, kind: str) -> None:
    assert refused({"thread_id": value, "message": "hi"}).message == f"'thread_id' must be a string, got {kind}"


@pytest.mark.parametrize(
    ("value", "kind"),
    [(None, "null"), (False, "a boolean"), (3, "a number"), (2.5, "a number"), (["hi"], "an array"),
     ({"text": "hi"}, "an object")],
)
def test_message_wrong_type(value: Any, kind: str) -> None:
    assert refused({"thread_id": "conv_1", "message": value}).message == f"'message' must be a string, got {kind}"


BAD_THREAD_IDS = [
    "",
    "a" * 129,
    "../x",
    "..",
    "a/b",
    "a b",
    " conv_1",
    "conv_1 ",
    "conv_1\n",
    "\nconv_1",
    "conv_1\r\n",
    "conv.1",
    "conv?x=1",
    "conv%2F1",
    "conv\x00",
    "cönv_1",
    "conv_１",  # fullwidth digit
    "ｃｏｎｖ",  # fullwidth letters
    "conv\u200b1",  # zero-width space
    "conv_😀",
    "\u212a",  # Kelvin sign, which case-folds to "k"
]


@pytest.mark.parametrize("thread_id", BAD_THREAD_IDS, ids=[repr(t)[:20] for t in BAD_THREAD_IDS])
def test_bad_thread_ids(thread_id: str) -> None:
    error = refused({"thread_id": thread_id, "message": "hi"})
    assert error.message.startswith("'thread_id' is not a valid thread id")
    with pytest.raises(BadRequest, match="thread_id"):
        check_thread_id(thread_id)


@pytest.mark.parametrize("thread_id", ["a", "conv_1", "thread_abc123", "A-b_C-9", "_", "-", "a" * 128, "0" * 128])
def test_good_thread_ids(thread_id: str) -> None:
    assert check_thread_id(thread_id) == thread_id
    assert parse({"thread_id": thread_id, "message": "hi"}) == ChatRequest(thread_id, "hi")


def test_check_thread_id_wrong_type() -> None:
    with pytest.raises(BadRequest, match=r"^'thread_id' must be a string, got a number$"):
        check_thread_id(7)


@pytest.mark.parametrize("message", ["", " ", "   ", "\n", "\t\r\n ", "\u3000", "\u00a0\u2003"])
def test_empty_or_blank_message(message: str) -> None:
    assert refused({"thread_id": "conv_1", "message": message}).message == "'message' is empty"


def test_over_long_message() -> None:
    error = refused({"thread_id": "conv_1", "message": "x" * (LIMIT + 1)})
    assert error.message == f"'message' is {LIMIT + 1} characters long; the limit is {LIMIT} (MAX_MESSAGE_CHARS)"


def test_limit_counts_characters_not_bytes() -> None:
    text = "é😀" * (LIMIT // 2)  # LIMIT characters, far more than LIMIT bytes in UTF-8
    assert len(text) == LIMIT
    assert parse({"thread_id": "conv_1", "message": text}).message == text
    assert "'message' is 51 characters long" in refused({"thread_id": "conv_1", "message": text + "é"}).message


def test_message_at_limit_passes() -> None:
    assert parse({"thread_id": "conv_1", "message": "x" * LIMIT}) == ChatRequest("conv_1", "x" * LIMIT)


def test_thread_id_is_checked_before_message() -> None:
    assert refused({"thread_id": "bad id", "message": ""}).message.startswith("'thread_id'")


@pytest.mark.parametrize(
    "message", ["hi", "  padded  ", "multi\nline\r\ntext", "😀 emoji", "<b>html</b>", '{"json": true}', "\x00nul"]
)
def test_good_messages_pass_unchanged(message: str) -> None:
    request = parse({"thread_id": "conv_abc", "message": message})
    assert request == ChatRequest(thread_id="conv_abc", message=message)
    assert request.thread_id == "conv_abc" and request.message == message


def test_extra_fields_are_ignored() -> None:
    assert parse({"thread_id": "conv_1", "message": "hi", "stream": True, "extra": [1]}) == ChatRequest("conv_1", "hi")


def test_limit_comes_from_the_argument() -> None:
    assert parse_chat_request({"thread_id": "t", "message": "abc"}, max_message_chars=3).message == "abc"
    with pytest.raises(BadRequest, match=r"the limit is 2 "):
        parse_chat_request({"thread_id": "t", "message": "abc"}, max_message_chars=2)

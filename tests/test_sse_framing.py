"""Tests of the SSE framing: whatever text an event carries, a conformant client reads it back."""

from __future__ import annotations

import random
import re
from typing import Any

import orjson
import pytest

from assistant.events import MESSAGE_DELTA, METADATA, STEP_COMPLETED, Event
from assistant.run_log import RunLog
from assistant.sse_stream_handler import KEEPALIVE, event_id, frame_batch, frame_event

# --------------------------------------------------------------------------------------------
# A small SSE parser following the WHATWG "event stream interpretation" algorithm
# (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

_LINE_END = re.compile(r"\r\n|\r|\n")  # the only line terminators SSE knows (not U+2028, U+0085)


def parse_sse(stream: bytes) -> tuple[list[dict[str, str]], list[str], int | None]:
    """Returns (dispatched events, comments, retry). Each event: type, data, last_event_id."""
    text = stream.decode("utf-8")  # strict: a frame that is not UTF-8 fails the test
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _LINE_END.split(text)
    lines.pop()  # what follows the last line terminator is an incomplete line: discarded
    events: list[dict[str, str]] = []
    comments: list[str] = []
    data = ""
    event_type = ""
    last_event_id = ""
    retry: int | None = None
    for line in lines:
        if line == "":
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append({"type": event_type or "message", "data": data, "last_event_id": last_event_id})
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        if ":" in line:
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_event_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                retry = int(value)
    return events, comments, retry


def test_reference_parser_itself() -> None:
    # The parser the other tests rely on must follow the spec, or they prove nothing.
    stream = (
        b"\xef\xbb\xbfretry: 250\r\n: hi\r"
        b"event: a\nid: 1\ndata: x\ndata:y\r\n\r\n"  # two data lines
        b"data: \xe2\x80\xa8z\n\n"  # U+2028 is not a line terminator
        b"event: ignored\n\n"  # no data: nothing dispatched, type reset
        b"id: bad\x00id\ndata\n\n"  # an id containing NUL is ignored; "data" alone is empty data
        b"data: incomplete\n"  # no blank line: never dispatched
    )
    events, comments, retry = parse_sse(stream)
    assert events == [
        {"type": "a", "data": "x\ny", "last_event_id": "1"},
        {"type": "message", "data": "\u2028z", "last_event_id": "1"},
        {"type": "message", "data": "", "last_event_id": "1"},
    ]
    assert comments == [" hi"]
    assert retry == 250


# --------------------------------------------------------------------------------------------
# the strings

NASTY = [
    "",
    "plain",
    "\n",
    "\r",
    "\r\n",
    "\n\r",
    "\r\r\n\n",
    "line one\nline two\r\nline three\rline four",
    "\n\n",  # a blank line inside the text: would dispatch early if it reached the wire raw
    "\u2028",
    "\u2029",
    "\u0085",
    "a\u2028b\u2029c\u0085d",
    "\x0b\x0c\x1c\x1d\x1e",  # VT, FF and the separators str.splitlines() breaks on
    "😀",
    "👩\u200d👩\u200d👧\u200d👦 family",
    "\U0010ffff\ufffe\uffff",
    "\ufeffstarts with a BOM",
    '"quoted"',
    "'single'",
    "\\",
    "\\n is not a newline",
    '\\"',
    '{"type":"fake","data":1}',
    "\x00",
    "nul\x00inside",
    "\x01\x02\x1f\x7f",
    "data: x",
    "\ndata: x\n\n",
    "\r\nevent: error\r\ndata: {}\r\n\r\n",
    ": comment",
    "\n: comment\n",
    "id: 999",
    "retry: 1",
    "   leading and trailing spaces   ",
    "\t",
    "</script><script>alert(1)</script>",
    "x" * 10_240,
    ("0123456789\n\r" * 900)[:10_240],
    "héllo wörld ñ 中文 العربية עברית",
]

EVENT_NAMES = [MESSAGE_DELTA, STEP_COMPLETED, METADATA, "error", "thread.run.created"]


def random_strings(count: int, seed: int = 20240601) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("\n\r\u2028\u2029\u0085\x00\"\\:/ ") + ["data: ", "\r\n", "event:", "😀", "é"]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            roll = rng.random()
            if roll < 0.5:
                parts.append(rng.choice(alphabet))
            elif roll < 0.8:
                parts.append(chr(rng.randint(0x20, 0x7E)))
            else:
                code = rng.randint(0x80, 0x10FFFF)
                if 0xD800 <= code <= 0xDFFF:  # lone surrogates are not text (see the surrogate test below)
                    code = 0xFFFD
                parts.append(chr(code))
        out.append("".join(parts))
    return out


RANDOM = random_strings(300)


def payloads(text: str) -> list[dict[str, Any]]:
    """The text where real events carry it: a delta, a step's input and output, a key."""
    return [
        {"delta": {"content": text}},
        {"step": {"id": "call_1", "name": "calc", "input": text, "output": text, "is_error": False}},
        {"message": {"id": "msg_1", "author": "assistant", "content": text}, text: [text, {"k": text}]},
    ]


# --------------------------------------------------------------------------------------------
# the tests


def check_frame(run_id: str, seq: int, event: Event) -> None:
    frame = frame_event(run_id, seq, event)
    # Exactly three field lines and a blank line; no CR anywhere, so no line can be cut short.
    assert b"\r" not in frame
    assert frame.endswith(b"\n\n")
    lines = frame.split(b"\n")
    assert len(lines) == 5 and lines[3:] == [b"", b""], frame[:200]
    assert lines[0] == b"event: " + event.name.encode()
    assert lines[1] == f"id: {run_id}:{seq}".encode()
    assert lines[2].startswith(b"data: ")
    events, comments, _ = parse_sse(frame)
    assert comments == []
    assert len(events) == 1
    parsed = events[0]
    assert parsed["type"] == event.name
    assert parsed["last_event_id"] == f"{run_id}:{seq}"
    assert orjson.loads(parsed["data"]) == event.data


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_nasty_text_round_trips(text: str) -> None:
    for index, data in enumerate(payloads(text)):
        check_frame("run_abc", index + 1, Event(EVENT_NAMES[index % len(EVENT_NAMES)], data))


def test_random_text_round_trips() -> None:
    for index, text in enumerate(RANDOM):
        for data in payloads(text):
            check_frame("run_rand", index + 1, Event(EVENT_NAMES[index % len(EVENT_NAMES)], data))


def test_large_text_survives_byte_for_byte() -> None:
    text = "".join(NASTY) * 3
    assert len(text) > 60_000
    frame = frame_event("run_big", 7, Event(MESSAGE_DELTA, {"delta": {"content": text}}))
    events, _, _ = parse_sse(frame)
    assert orjson.loads(events[0]["data"])["delta"]["content"] == text


def test_non_string_values_round_trip() -> None:
    data = {"n": 1, "f": 1.5, "neg": -0.25, "t": True, "f2": False, "none": None, "list": [], "obj": {}}
    check_frame("run_1", 1, Event(METADATA, data))


@pytest.mark.parametrize(("run_id", "seq"), [("run_abc", 1), ("run_abc", 42), ("r", 10**12), ("a-b_c", 0)])
def test_event_id_names_run_and_position(run_id: str, seq: int) -> None:
    assert event_id(run_id, seq) == f"{run_id}:{seq}"
    frame = frame_event(run_id, seq, Event(MESSAGE_DELTA, {"delta": {"content": "x"}}))
    assert parse_sse(frame)[0][0]["last_event_id"] == f"{run_id}:{seq}"


def test_event_id_splits_back_into_run_and_seq() -> None:
    run_id, _, seq = event_id("run_7f3a", 123).rpartition(":")
    assert (run_id, int(seq)) == ("run_7f3a", 123)


def test_frame_batch_concatenates_frames_in_order() -> None:
    log = RunLog("run_batch", "thread_1", "corr_1")
    texts = NASTY[:12]
    for text in texts:
        log.append(Event(MESSAGE_DELTA, {"delta": {"content": text}}))
    log.append(Event(METADATA, {"done": True}))
    batch = log.events_after(0)
    body = frame_batch(log, batch)
    assert body == b"".join(frame_event("run_batch", seq, event) for seq, event in batch)
    events, _, _ = parse_sse(body)
    assert [e["last_event_id"] for e in events] == [f"run_batch:{i}" for i in range(1, len(texts) + 2)]
    assert [e["type"] for e in events] == [MESSAGE_DELTA] * len(texts) + [METADATA]
    assert [orjson.loads(e["data"]) for e in events] == [e.data for _, e in batch]


def test_frame_batch_from_a_later_position() -> None:
    log = RunLog("run_later", "thread_1", "corr_1")
    for i in range(5):
        log.append(Event(MESSAGE_DELTA, {"delta": {"content": str(i)}}))
    events, _, _ = parse_sse(frame_batch(log, log.events_after(3)))
    assert [(e["last_event_id"], orjson.loads(e["data"])["delta"]["content"]) for e in events] == [
        ("run_later:4", "3"),
        ("run_later:5", "4"),
    ]


def test_frame_batch_of_nothing_is_empty() -> None:
    assert frame_batch(RunLog("r", "t", "c"), []) == b""


def test_keepalive_is_a_comment_that_dispatches_nothing() -> None:
    events, comments, _ = parse_sse(KEEPALIVE)
    assert events == [] and comments == [" keepalive"]


def test_keepalive_between_frames_changes_nothing() -> None:
    first = frame_event("r", 1, Event(MESSAGE_DELTA, {"delta": {"content": "a\n"}}))
    second = frame_event("r", 2, Event(MESSAGE_DELTA, {"delta": {"content": "\rb"}}))
    events, _, _ = parse_sse(b"retry: 5000\n\n" + first + KEEPALIVE + second)
    assert [orjson.loads(e["data"])["delta"]["content"] for e in events] == ["a\n", "\rb"]


@pytest.mark.anyio
async def test_lone_surrogate_in_a_tool_output_does_not_break_the_stream() -> None:
    # Tool outputs are the only text that does not come from JSON: the executor makes it valid
    # UTF-8, so the step (and the model's input) can be framed.
    from assistant.tool_executor import ToolCall, ToolRegistry, execute_tool

    def read_name() -> str:
        """A file name decoded with surrogateescape."""
        return "name: \udcff.txt"

    registry = ToolRegistry({"read_name": read_name}, timeout=5)
    result = await execute_tool(registry, ToolCall("call_1", "read_name", "{}"), correlation_id="c")
    step = {"id": "call_1", "name": "read_name", "input": "{}", "output": result.output, "is_error": False}
    frame = frame_event("run_s", 3, Event(STEP_COMPLETED, {"step": step}))
    events, _, _ = parse_sse(frame)
    assert orjson.loads(events[0]["data"])["step"]["output"] == "name: \ufffd.txt"
"""Tests of the upstream SSE decoder: bytes from OpenAI in, JSON events out."""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from assistant.errors import UpstreamError
from assistant import upstream_sse
from assistant.upstream_sse import SSEDecoder, SSEEventReader, decode_events, iterate_sse_events
from tests.conftest import fixtures_dir

# --------------------------------------------------------------------------------------------
# helpers


def random_chunks(data: bytes, seed: int, max_size: int = 40) -> list[bytes]:
    rng = random.Random(seed)
    chunks = []
    i = 0
    while i < len(data):
        size = rng.randint(1, max_size)
        chunks.append(data[i : i + size])
        i += size
    assert b"".join(chunks) == data
    return chunks


def byte_chunks(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def feed_all(chunks: Iterable[bytes]) -> list[tuple[bytes, bytes]]:
    decoder = SSEDecoder()
    pairs: list[tuple[bytes, bytes]] = []
    for chunk in chunks:
        pairs.extend(decoder.feed(chunk))
    return pairs


def chunkings(data: bytes) -> list[tuple[str, list[bytes]]]:
    """The same bytes cut in many ways: whole, byte by byte, and random sizes."""
    cuts = [("whole", [data]), ("bytes", byte_chunks(data))]
    for seed, max_size in enumerate([3, 17, 64, 500]):
        cuts.append((f"random-{seed}", random_chunks(data, seed, max_size=max_size)))
    return cuts


async def aiter_chunks(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


# A stream using every feature the decoder must handle; joined below with each line ending.
STREAM_LINES = [
    ": keepalive",
    "",
    "event: response.created",
    'data: {"type":"response.created","response":{"id":"resp_1"}}',
    "",
    "event: response.output_text.delta",
    'data:{"delta":"a b"}',  # no space after the colon; no "type": it comes from the event name
    "",
    ": a comment between events",
    "event: orphan",  # an event without data: ignored, and its name must not leak to the next one
    "",
    'data: {"type":"multi",',  # data on two lines, joined with "\n"
    'data: "text":"x\\ny"}',
    "",
    "id: 7",
    "retry: 1000",
    "event: response.completed",
    'data: {"type":"response.completed","response":{"status":"completed"}}',
    "",
    "data: [DONE]",
    "",
]

EXPECTED_PAIRS = [
    (b"response.created", b'{"type":"response.created","response":{"id":"resp_1"}}'),
    (b"response.output_text.delta", b'{"delta":"a b"}'),
    (b"", b'{"type":"multi",\n"text":"x\\ny"}'),
    (b"response.completed", b'{"type":"response.completed","response":{"status":"completed"}}'),
    (b"", b"[DONE]"),
]

EXPECTED_EVENTS = [
    {"type": "response.created", "response": {"id": "resp_1"}},
    {"type": "response.output_text.delta", "delta": "a b"},
    {"type": "multi", "text": "x\ny"},
    {"type": "response.completed", "response": {"status": "completed"}},
]

# The trailing comment keeps a CR-only stream from ending on its event's blank line: see
# test_cr_terminated_event_is_dispatched_without_waiting_for_more_bytes for that case.
TRAILER = ": keepalive"


def stream_with(terminator: str) -> bytes:
    return terminator.join([*STREAM_LINES, TRAILER, ""]).encode()


def mixed_stream(seed: int) -> bytes:
    rng = random.Random(seed)
    out = []
    previous = ""
    for line in [*STREAM_LINES, TRAILER]:
        choices = ["\n", "\r\n", "\r"]
        if previous == "\r" and not line:
            choices.remove("\n")  # CR then an empty line ended by LF is one CRLF, not two line ends
        previous = rng.choice(choices)
        out.append(line + previous)
    return "".join(out).encode()


# --------------------------------------------------------------------------------------------
# SSEDecoder


@pytest.mark.parametrize("terminator", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_every_chunking_and_line_ending_gives_the_same_events(terminator: str) -> None:
    data = stream_with(terminator)
    for label, chunks in chunkings(data):
        assert feed_all(chunks) == EXPECTED_PAIRS, (terminator, label)


@pytest.mark.parametrize("seed", range(5))
def test_mixed_line_endings_in_one_stream(seed: int) -> None:
    data = mixed_stream(seed)
    for label, chunks in chunkings(data):
        assert feed_all(chunks) == EXPECTED_PAIRS, (seed, label)


def test_decoded_events_of_the_feature_stream() -> None:
    assert decode_events(feed_all([stream_with("\n")])) == EXPECTED_EVENTS


def test_crlf_split_between_two_chunks_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    # If the CR and the LF counted as two line endings, the empty line between them would
    # dispatch "a" on its own and "b" would become a second event.
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    # A CR ending a chunk may be dispatched at once or once the next chunk shows it was not a
    # CRLF; either way exactly one event, "a\nb", comes out.
    assert decoder.feed(b"\n\r") + decoder.feed(b"\n") == [(b"", b"a\nb")]
    assert decoder.feed(b"\r\n") == []  # a lone blank line: nothing to dispatch


def test_crlf_split_after_blank_line_gives_no_spurious_event() -> None:
    decoder = SSEDecoder()
    out = decoder.feed(b"event: x\r\ndata: 1\r\n\r")
    out += decoder.feed(b"\nevent: y\r\ndata: 2\r\n\r")
    out += decoder.feed(b"\n: keepalive\r\n")
    assert out == [(b"x", b"1"), (b"y", b"2")]


def test_lone_cr_followed_by_text_in_next_chunk_is_a_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\r") == []
    # The held CR was not the start of a CRLF: it ended "data: 1", and "\r" + "\r" is a blank line.
    assert decoder.feed(b"\rdata: 2\n\n") == [(b"", b"1"), (b"", b"2")]


def test_cr_terminated_event_is_dispatched_without_waiting_for_more_bytes() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'event: a\rdata: {"x":1}\r\r') == [(b"a", b'{"x":1}')]


@pytest.mark.anyio
async def test_cr_only_stream_yields_its_last_event() -> None:
    lines = STREAM_LINES[:-2]  # without the [DONE] event: the stream ends on response.completed
    data = "\r".join([*lines, ""]).encode()
    assert data.endswith(b'"completed"}}\r\r')
    events = [e async for batch in iterate_sse_events(aiter_chunks([data])) for e in batch]
    assert events == EXPECTED_EVENTS


@pytest.mark.parametrize(
    ("line", "expected_data"),
    [
        ("data: x", b"x"),
        ("data:x", b"x"),
        ("data:  x", b" x"),  # only one space is removed
        ("data:", None),  # an empty data buffer dispatches nothing (WHATWG)
        ("data: ", None),  # nor does one whose only space is the separator's
        ("data", None),  # a field name without colon: the whole line is the name, the value empty
        ("data:\ndata:", b"\n"),  # two empty lines are a line break: dispatched
        ("data: a: b", b"a: b"),  # only the first colon separates
        ("data: \ttab", b"\ttab"),
    ],
)
def test_data_field_value(line: str, expected_data: bytes | None) -> None:
    expected = [] if expected_data is None else [(b"", expected_data)]
    assert feed_all([f"{line}\n\n".encode()]) == expected
    assert feed_all([f"event: ping\n{line}\n\n".encode()]) == [(b"ping", d) for _, d in expected]


def test_a_leading_byte_order_mark_is_not_part_of_the_stream() -> None:
    assert feed_all([b"\xef\xbb\xbfevent: a\ndata: {}\n\n"]) == [(b"a", b"{}")]
    # Only the stream's first bytes: later, a BOM makes a line's field name something else.
    assert feed_all([b"data: 1\n\n", b"\xef\xbb\xbfdata: 2\n\n"]) == [(b"", b"1")]


@pytest.mark.parametrize("split", [1, 2])
def test_a_byte_order_mark_split_across_reads_is_still_dropped(split: int) -> None:
    stream = b"\xef\xbb\xbfevent: a\ndata: {}\n\n"
    assert feed_all([stream[:split], stream[split:]]) == [(b"a", b"{}")]
    assert feed_all([stream[:1], stream[1:2], stream[2:3], stream[3:]]) == [(b"a", b"{}")]
    # Bytes that only begin like a BOM are the stream's own: here they spoil the first field's name.
    assert feed_all([b"\xef\xbb", b"data: 1\n\ndata: 2\n\n"]) == [(b"", b"2")]


def test_a_large_event_in_many_reads_is_joined_once() -> None:
    """Each read is kept as it came, not appended to a growing buffer (16 MiB in 16 KiB reads
    took ~10 s that way: the copy grew with every read)."""
    decoder = SSEDecoder()
    assert decoder.feed(b"event: big\ndata: ") == []
    for _ in range(1024):
        assert decoder.feed(b"x" * 16384) == []
    assert len(decoder._pending) == 1025
    [(name, data)] = decoder.feed(b"\n\n")
    assert name == b"big" and data == b"x" * (16 * 2**20)
    assert decoder._pending == []


def test_an_event_over_the_limit_is_an_upstream_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_sse, "MAX_EVENT_BYTES", 1000)
    decoder = SSEDecoder()
    decoder.feed(b"data: " + b"x" * 900)
    with pytest.raises(UpstreamError, match="an event over"):
        decoder.feed(b"x" * 200)


@pytest.mark.parametrize(
    "lines",
    [
        ["event: ping"],
        [": keepalive"],
        [":"],
        ["id: 5", "retry: 10"],
        ["event: a", "unknown: field", "Data: capitalised is another field"],
        ["data : x"],  # "data " is not "data"
    ],
)
def test_blocks_without_data_dispatch_nothing(lines: list[str]) -> None:
    assert feed_all(["\n".join([*lines, "", ""]).encode()]) == []


def test_comment_lines_do_not_break_an_event_in_progress() -> None:
    data = b'event: e\n: keepalive\ndata: 1\n: another\ndata: 2\n\n'
    assert feed_all([data]) == [(b"e", b"1\n2")]


def test_a_named_event_with_several_data_lines_joins_them() -> None:
    """WHATWG: each `data:` line adds a line to the data, also after an `event:` line."""
    assert feed_all([b"event: e\ndata: 1\ndata: 2\n\n"]) == [(b"e", b"1\n2")]
    assert feed_all([b"event: e\ndata: 1\ndata:2\n\n"]) == [(b"e", b"1\n2")]


def test_the_event_size_limit_is_per_event_not_per_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long stream of small events, read in pieces that each end inside an event, never
    trips the limit on one event's size."""
    monkeypatch.setattr(upstream_sse, "MAX_EVENT_BYTES", 1000)
    stream = b"".join(b'event: e\ndata: {"i": %d}\n\n' % i for i in range(200))  # ~6 KB
    pairs = feed_all(random_chunks(stream, seed=1, max_size=17))
    assert len(pairs) == 200 and pairs[-1] == (b"e", b'{"i": 199}')


def test_event_name_is_reset_after_each_dispatch() -> None:
    assert feed_all([b"event: first\ndata: 1\n\ndata: 2\n\n"]) == [(b"first", b"1"), (b"", b"2")]


def test_incomplete_event_at_end_is_not_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\n") == [(b"", b"1")]  # no blank line after "data: 2" yet
    assert decoder.feed(b"\n") == [(b"", b"2")]


def test_many_events_in_one_chunk_keep_their_order() -> None:
    data = b"".join(b"event: e%d\ndata: %d\n\n" % (i, i) for i in range(50))
    assert feed_all([data]) == [(b"e%d" % i, b"%d" % i) for i in range(50)]


def test_utf8_split_inside_a_character() -> None:
    payload = json.dumps({"type": "t", "text": "héllo 😀 世界"}, ensure_ascii=False).encode()
    data = b"data: " + payload + b"\n\n"
    for label, chunks in chunkings(data):
        assert decode_events(feed_all(chunks)) == [{"type": "t", "text": "héllo 😀 世界"}], label


# --------------------------------------------------------------------------------------------
# decode_events


def test_done_marker_is_skipped() -> None:
    pairs = [(b"", b'{"type":"a"}'), (b"", b"[DONE]"), (b"done", b"[DONE]"), (b"", b'{"type":"b"}')]
    assert decode_events(pairs) == [{"type": "a"}, {"type": "b"}]


def test_missing_type_is_filled_from_the_event_name() -> None:
    assert decode_events([(b"response.output_text.delta", b'{"delta":"hi"}')]) == [
        {"type": "response.output_text.delta", "delta": "hi"}
    ]


def test_type_in_data_wins_over_the_event_name() -> None:
    assert decode_events([(b"other", b'{"type":"response.completed"}')]) == [{"type": "response.completed"}]


def test_no_type_and_no_name_leaves_type_absent() -> None:
    assert decode_events([(b"", b'{"a":1}')]) == [{"a": 1}]


@pytest.mark.parametrize(
    "data",
    [b'{"type":', b"{'type': 'x'}", b"not json", b"", b'{"a":1}{"b":2}', b"\xff\xfe", b'{"a":NaN}'],
)
def test_malformed_json_raises_upstream_error(data: bytes) -> None:
    with pytest.raises(UpstreamError) as info:
        decode_events([(b"response.output_text.delta", data)])
    assert info.value.message == (
        "the upstream sent a malformed event (response.output_text.delta): its data is not valid JSON"
    )
    assert info.value.type == "upstream_error"
    assert info.value.status_code == 502
    assert info.value.__cause__ is None  # the orjson error is not chained into logs/clients


def test_malformed_json_in_unnamed_event_says_unnamed() -> None:
    with pytest.raises(UpstreamError, match=r"malformed event \(unnamed\).*not valid JSON"):
        decode_events([(b"", b"{oops")])


def test_malformed_event_after_good_ones_still_raises() -> None:
    with pytest.raises(UpstreamError):
        decode_events([(b"a", b'{"type":"a"}'), (b"b", b"{")])


@pytest.mark.parametrize("data", [b"[1,2]", b'"text"', b"3", b"3.5", b"null", b"true", b"[]"])
def test_non_object_json_raises_upstream_error(data: bytes) -> None:
    with pytest.raises(UpstreamError) as info:
        decode_events([(b"response.created", data)])
    assert info.value.message == "the upstream sent an event whose data is not a JSON object"


# --------------------------------------------------------------------------------------------
# iterate_sse_events


READS = [
    b'event: a\ndata: {"x":1}\n\nevent: b\ndata: {"x":2}\n\n',
    b": keepalive\n\n",  # no event: no (empty) batch
    b'data: {"type":"c"}\n',
    b"\n",
    b"data: [DONE]\n\n",  # only [DONE]: no batch either
]
BATCHES = [[{"type": "a", "x": 1}, {"type": "b", "x": 2}], [{"type": "c"}]]


@pytest.mark.anyio
async def test_iterate_yields_one_batch_per_read_with_events() -> None:
    batches = [batch async for batch in iterate_sse_events(aiter_chunks(READS))]
    assert batches == BATCHES


@pytest.mark.anyio
async def test_iterate_raises_upstream_error_on_bad_data() -> None:
    chunks = [b'data: {"type":"a"}\n\n', b"event: b\ndata: {bad\n\n", b'data: {"type":"c"}\n\n']
    seen = []
    with pytest.raises(UpstreamError, match=r"\(b\)"):
        async for batch in iterate_sse_events(aiter_chunks(chunks)):
            seen.append(batch)
    assert seen == [[{"type": "a"}]]


# --------------------------------------------------------------------------------------------
# SSEEventReader: the same, fed chunk by chunk (from the upstream connection's read callback)


def test_sse_event_reader_hands_over_one_batch_per_chunk_with_events() -> None:
    batches: list[list[dict[str, object]]] = []
    on_chunk = SSEEventReader(lambda batch: batches.append(batch) or False)
    assert [on_chunk(chunk) for chunk in READS] == [False] * len(READS)
    assert batches == BATCHES


def test_sse_event_reader_returns_what_the_batch_handler_answers() -> None:
    on_chunk = SSEEventReader(lambda batch: batch[-1]["type"] == "end")
    assert on_chunk(b'data: {"type":"a"}\n\n') is False
    assert on_chunk(b'data: {"type":"end"}\n\n') is True


def test_sse_event_reader_hands_over_the_events_before_a_broken_one_then_raises() -> None:
    batches: list[list[dict[str, object]]] = []
    on_chunk = SSEEventReader(lambda batch: batches.append(batch) or False)
    with pytest.raises(UpstreamError, match=r"\(b\)"):
        on_chunk(b'data: {"type":"a"}\n\nevent: b\ndata: {bad\n\ndata: {"type":"c"}\n\n')
    assert batches == [[{"type": "a"}]]


def test_sse_event_reader_does_not_raise_for_a_broken_event_after_the_end() -> None:
    """The handler said the response ended: what follows in the same read is not its concern."""
    on_chunk = SSEEventReader(lambda batch: batch[-1]["type"] == "end")
    assert on_chunk(b'data: {"type":"end"}\n\nevent: b\ndata: {bad\n\n') is True


# --------------------------------------------------------------------------------------------
# the recorded OpenAI streams

VALID_FIXTURES = [
    "issue-19493-gpt-5.1-tool-call.chunks.txt",
    "issue-20047-openai-responses.chunks.txt",
    "openai-error.1.chunks.txt",
    "openai-reasoning-encrypted-content.1.chunks.txt",
    "openai-response-failed-only.1.chunks.txt",
]
BROKEN_FIXTURE = "parallel-tool-call-wrapper.1.chunks.txt"
TYPE_RE = re.compile(rb'^\{"type":"([^"]+)"')


def fixture_lines(name: str) -> list[bytes]:
    lines = Path(fixtures_dir(), name).read_bytes().splitlines()
    assert lines and all(lines), name
    return lines


def wire(lines: list[bytes], terminator: bytes = b"\n") -> bytes:
    out = []
    for line in lines:
        match = TYPE_RE.match(line)
        assert match, line[:80]
        out.append(b"event: " + match.group(1) + terminator + b"data: " + line + terminator + terminator)
    return b"".join(out)


def test_every_fixture_is_covered() -> None:
    names = sorted(p.name for p in fixtures_dir().glob("*.chunks.txt"))
    assert names == sorted([*VALID_FIXTURES, BROKEN_FIXTURE])


@pytest.mark.parametrize("name", VALID_FIXTURES)
@pytest.mark.parametrize("terminator", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_recorded_stream_round_trips_in_any_chunking(name: str, terminator: bytes) -> None:
    lines = fixture_lines(name)
    expected = [json.loads(line) for line in lines]
    data = wire(lines, terminator)
    for label, chunks in chunkings(data):
        pairs = feed_all(chunks)
        assert [data for _, data in pairs] == lines, label  # the data bytes exactly
        assert [event for event, _ in pairs] == [e["type"].encode() for e in expected], label
        assert decode_events(pairs) == expected, label


@pytest.mark.anyio
@pytest.mark.parametrize("name", VALID_FIXTURES)
async def test_recorded_stream_through_iterate_sse_events(name: str) -> None:
    lines = fixture_lines(name)
    chunks = random_chunks(wire(lines), seed=len(name), max_size=300)
    events = [e async for batch in iterate_sse_events(aiter_chunks(chunks)) for e in batch]
    assert events == [json.loads(line) for line in lines]


@pytest.mark.parametrize("seed", range(4))
def test_broken_recorded_stream_raises_upstream_error(seed: int) -> None:
    lines = fixture_lines(BROKEN_FIXTURE)
    for index in (0, 5):  # lines 1 and 6 are not valid JSON
        with pytest.raises(ValueError):
            json.loads(lines[index])
    decoder = SSEDecoder()
    with pytest.raises(UpstreamError, match=r"malformed event \(response\.created\).*not valid JSON"):
        for chunk in random_chunks(wire(lines), seed, max_size=64):
            decode_events(decoder.feed(chunk))


def test_broken_recorded_stream_last_line_also_rejected() -> None:
    lines = fixture_lines(BROKEN_FIXTURE)
    pairs = feed_all([wire(lines)])
    assert len(pairs) == 6
    assert decode_events(pairs[1:5]) == [json.loads(line) for line in lines[1:5]]
    with pytest.raises(UpstreamError, match=r"\(response\.completed\)"):
        decode_events(pairs[5:])


@pytest.mark.parametrize("name", VALID_FIXTURES)
def test_recorded_stream_through_SSEEventReader(name: str) -> None:
    lines = fixture_lines(name)
    events: list[dict[str, object]] = []
    on_chunk = SSEEventReader(lambda batch: events.extend(batch) or False)
    for chunk in random_chunks(wire(lines), seed=len(name), max_size=300):
        assert on_chunk(chunk) is False
    assert events == [json.loads(line) for line in lines]


def test_broken_recorded_stream_through_SSEEventReader() -> None:
    on_chunk = SSEEventReader(lambda batch: False)
    with pytest.raises(UpstreamError, match="not valid JSON"):
        for chunk in random_chunks(wire(fixture_lines(BROKEN_FIXTURE)), seed=3, max_size=100):
            on_chunk(chunk)


@pytest.mark.anyio
async def test_broken_recorded_stream_through_iterate_sse_events() -> None:
    chunks = random_chunks(wire(fixture_lines(BROKEN_FIXTURE)), seed=3, max_size=100)
    with pytest.raises(UpstreamError, match="not valid JSON"):
        async for _ in iterate_sse_events(aiter_chunks(chunks)):
            pass


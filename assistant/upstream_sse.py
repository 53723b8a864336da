"""Reads the upstream's Server-Sent Events straight from the response bytes.

The SDK would build a typed object per event; the service only needs a few fields of a few
event types, so it decodes the SSE lines itself and parses each data line with orjson.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson

from .errors import UpstreamError
from .upstream import map_upstream_error


MAX_EVENT_BYTES = 32 * 1024 * 1024  # one event (a `response.completed` echoes the whole response)
_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Incremental SSE parser (WHATWG rules): bytes in, complete (event, data) pairs out.

    It keeps the pieces of the event still arriving (joined once it is complete, so a large
    event costs its size, not its size squared) and splits complete events at blank lines; an
    event of exactly one `event:` and one `data:` line (what OpenAI sends) takes a short path,
    anything else the general one.
    """

    __slots__ = ("_pending", "_pending_bytes", "_started", "_head", "_skip_lf")  # one per open stream

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # the event still arriving: no blank line in it yet
        self._pending_bytes = 0
        self._started = False  # the stream's first bytes were checked for a byte-order mark
        self._head = b""  # the first bytes while they could still be the start of one
        self._skip_lf = False  # the last chunk ended with CR: an LF opening the next one ends nothing

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes]]:
        if not self._started and chunk:
            chunk = self._head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._head = chunk  # a read can end inside it
                return []
            self._started = True
            if chunk.startswith(_BOM):  # one leading byte-order mark is not part of the stream
                chunk = chunk[3:]
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        pending = self._pending
        if b"\n\n" not in chunk and not (pending and pending[-1][-1:] == b"\n" and chunk[:1] == b"\n"):
            if chunk:
                pending.append(chunk)
                self._pending_bytes += len(chunk)
                if self._pending_bytes > MAX_EVENT_BYTES:
                    raise UpstreamError(f"the upstream sent an event over {MAX_EVENT_BYTES // 2**20} MiB")
            return []
        buffer = b"".join((*pending, chunk)) if pending else chunk
        *blocks, rest = buffer.split(b"\n\n")
        self._pending = [rest] if rest else []
        self._pending_bytes = len(rest)
        out: list[tuple[bytes, bytes]] = []
        for block in blocks:
            if block[:7] == b"event: ":
                name, _, data = block.partition(b"\n")
                if data[:6] == b"data: " and b"\n" not in data:
                    if len(data) > 6:  # an empty data buffer dispatches nothing
                        out.append((name[7:], data[6:]))
                    continue
            event = _parse_block(block)
            if event is not None:
                out.append(event)
        return out


def _parse_block(block: bytes) -> tuple[bytes, bytes] | None:
    """The general case of one event's lines: comments, several data lines, fields without a space."""
    name = b""
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # blank (from extra newlines) or a ":" comment, e.g. a keepalive
            continue
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value
    joined = b"\n".join(data)
    return (name, joined) if joined else None  # an empty data buffer dispatches nothing (WHATWG)


def _load(kind: str, data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(
            f"the upstream sent a malformed event ({kind or 'unnamed'}): its data is not valid JSON"
        ) from None


def decode_events(pairs: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """JSON-decode each event's data; the event name falls back into `type` when data lacks it."""
    events = []
    for name, data in pairs:
        if data == b"[DONE]":
            continue
        event = _load(name.decode(errors="replace"), data)
        if not isinstance(event, dict):
            raise UpstreamError("the upstream sent an event whose data is not a JSON object")
        if "type" not in event and name:
            event["type"] = name.decode(errors="replace")
        events.append(event)
    return events


def decode_named_events(pairs: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """For APIs whose data objects do not name their event (Assistants): `{"type", "data"}`."""
    events = []
    for name, data in pairs:
        kind = name.decode(errors="replace")
        if kind == "done" or data == b"[DONE]":
            continue
        events.append({"type": kind, "data": _load(kind, data)})
    return events


# A round's events go to the orchestrator's handler a batch at a time (one per network read);
# it returns True once it needs no more (the response ended).
OnBatch = Callable[[list[dict[str, Any]]], bool]
# How a round hands its events over: awaited until the handler returns True or the stream ends.
DeliverEvents = Callable[[OnBatch], Awaitable[None]]


class SSEEventReader(SSEDecoder):
    """A chunk handler for an upstream SSE body: called with each chunk, it hands the chunk's
    complete events to `on_batch` as one batch and returns its answer. Plain calls, no task:
    the connection calls it from its own read callback (`upstream_transport.Connection.deliver_body`).
    One object with slots, not a closure: an open stream holds it for as long as it streams."""

    __slots__ = ("_on_batch", "_decode")

    def __init__(
        self, on_batch: OnBatch, decode: Callable[[list[tuple[bytes, bytes]]], list[dict[str, Any]]] = decode_events
    ) -> None:
        super().__init__()
        self._on_batch = on_batch
        self._decode = decode

    def __call__(self, chunk: bytes) -> bool:
        pairs = self.feed(chunk)
        try:
            events = self._decode(pairs)
        except UpstreamError:
            # The events before the broken one still count: deliver them, then fail.
            events = _decodable_prefix(pairs, self._decode)
            if events and self._on_batch(events):
                return True
            raise
        return self._on_batch(events) if events else False


def _decodable_prefix(
    pairs: list[tuple[bytes, bytes]], decode: Callable[[list[tuple[bytes, bytes]]], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """The events of `pairs` up to the first one `decode` refuses."""
    events: list[dict[str, Any]] = []
    for pair in pairs:
        try:
            events += decode([pair])
        except UpstreamError:
            break
    return events


async def deliver_batches(batches: AsyncIterator[list[dict[str, Any]]], on_batch: OnBatch) -> None:
    """A round read by pulling (the Assistants engine's): each batch to `on_batch`, until it
    returns True. The orchestrator gets it as `functools.partial(deliver_batches, batches)`."""
    async for batch in batches:
        if on_batch(batch):
            return
        del batch  # an idle stream holds no batch (a `response.created` echoes the request)


async def iterate_sse_events(
    chunks: AsyncIterator[bytes],
    decode: Callable[[list[tuple[bytes, bytes]]], list[dict[str, Any]]] = decode_events,
) -> AsyncIterator[list[dict[str, Any]]]:
    """Yield the events of an upstream SSE body, in batches: one batch per network read."""
    decoder = SSEDecoder()
    try:
        async for chunk in chunks:
            pairs = decoder.feed(chunk)
            try:
                events = decode(pairs)
            except UpstreamError:
                # The events before the broken one still count: deliver them, then fail.
                events = _decodable_prefix(pairs, decode)
                if events:
                    yield events
                raise
            if events:
                yield events
            # An idle stream holds no batch: a `response.created` echoes the whole request.
            del chunk, pairs, events
    except httpx.TransportError as exc:  # cut off (RemoteProtocolError, ReadError) or silent (ReadTimeout)
        raise map_upstream_error(exc) from exc

"""The SSE response's timer: keepalives when idle, and dropping a client that stopped reading."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from starlette.types import Receive, Send

from assistant.events import MESSAGE_DELTA, METADATA, RUN_CREATED, RUN_RESUMED, Event
from assistant.run_log import RunLog
from assistant.sse_stream_handler import KEEPALIVE, SEND_PIECE_BYTES, SSEResponse


async def never_disconnects() -> dict[str, Any]:
    await anyio.sleep(3600)
    raise AssertionError("unreachable")


async def discard(message: dict[str, Any]) -> None:
    """A server's send to a client that reads everything at once."""


async def never_takes_the_bytes(message: dict[str, Any]) -> None:
    """A server's send to a client that stopped reading: the body never goes out."""
    if message["type"] == "http.response.body":
        await anyio.sleep(3600)


def pending_tasks_of_the_response() -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks() if "SSEResponse" in task.get_coro().__qualname__]


def closed_inside_the_last_send(
    then: Callable[[], None] = lambda: None, *, pause: float = 0.05,
) -> tuple[Receive, Send]:
    """hypercorn's receive and send on a connection it closes inside the response's last send
    (`Connection: close`, or shutting down): it queues http.disconnect before that send
    returns, `pause` seconds later (0: without waiting, as hypercorn's send to a client that
    keeps up). `then` runs as the last send returns."""
    gone = anyio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()
            if pause:
                await anyio.sleep(pause)
            then()

    return receive, send


@contextlib.contextmanager
def loop_errors() -> Iterator[list[dict[str, Any]]]:
    """What the loop's exception handler is given meanwhile: an error in a callback, or a task's
    exception that nobody retrieved."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(None)


def new_log() -> RunLog:
    log = RunLog("run_t", "conv_t", "corr")
    log.append(Event(RUN_CREATED, {}))
    return log


@pytest.mark.anyio
async def test_keepalives_while_idle_and_after_a_slow_send() -> None:
    log = new_log()
    bodies: list[tuple[float, bytes]] = []
    started = time.monotonic()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body", b"").startswith(b"retry"):
            await anyio.sleep(0.3)  # the first send is slow: the timer must not lose track
        bodies.append((time.monotonic() - started, message.get("body", b"")))

    async def end_later() -> None:
        await anyio.sleep(0.8)
        log.append(Event(METADATA, {}))

    response = SSEResponse(log, heartbeat_seconds=0.05, retry_ms=1, slow_client_timeout_seconds=5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(end_later)
        await response({"type": "http"}, never_disconnects, send)
    keepalives = [at for at, body in bodies if body == KEEPALIVE]
    assert len(keepalives) >= 6  # about one per 0.05 s in the 0.5 s after the slow send
    assert all(b - a < 0.15 for a, b in zip(keepalives, keepalives[1:]))
    assert bodies[-2][1].startswith(b"event: metadata") and bodies[-1] == (bodies[-1][0], b"")


async def stalls_at_the_end(message: dict[str, Any]) -> None:
    if message["type"] == "http.response.body" and not message.get("more_body"):
        await anyio.sleep(3600)


@pytest.mark.anyio
@pytest.mark.parametrize(("ended", "send"), [(False, never_takes_the_bytes), (True, stalls_at_the_end)],
                         ids=["mid-stream", "at-the-last-send"])
async def test_a_client_that_stops_reading_is_dropped(ended: bool, send: Any) -> None:
    """Every send is watched, the one that ends the response too: a client that takes none of
    it is dropped at SLOW_CLIENT_TIMEOUT_SECONDS, not held for good."""
    log = new_log()
    if ended:
        log.append(Event(METADATA, {}))

    response = SSEResponse(log, heartbeat_seconds=0.05, retry_ms=1, slow_client_timeout_seconds=0.3)
    started = time.monotonic()
    with anyio.fail_after(3):
        await response({"type": "http"}, never_disconnects, send)
    assert 0.25 < time.monotonic() - started < 1.0
    assert not response.done


@pytest.mark.anyio
async def test_heartbeats_on_a_quiet_run_leave_no_waiters_on_its_log() -> None:
    """Each heartbeat wakes the sender; it must not leave its used event on the log each time."""
    log = new_log()

    response = SSEResponse(log, heartbeat_seconds=0.01, retry_ms=1, slow_client_timeout_seconds=5)
    with anyio.fail_after(3):
        await response({"type": "http"}, disconnects_after(0.5), discard)
    assert log._waiters == []


def disconnects_after(seconds: float) -> Any:
    """A server's receive: a queue (waits on it can be cancelled) that holds the disconnect from
    `seconds` on."""
    deadline = time.monotonic() + seconds

    async def receive() -> dict[str, Any]:
        await anyio.sleep(max(0.0, deadline - time.monotonic()))
        return {"type": "http.disconnect"}

    return receive


@pytest.mark.anyio
async def test_the_disconnect_ends_the_stream_at_once_between_heartbeats() -> None:
    """The watcher's wait for the client is cut short by each timer; the disconnect still ends
    the stream when it comes, not at the next heartbeat."""
    log = new_log()
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    response = SSEResponse(log, heartbeat_seconds=0.2, retry_ms=1, slow_client_timeout_seconds=5)
    started = time.monotonic()
    with anyio.fail_after(3):
        await response({"type": "http"}, disconnects_after(0.5), send)
    assert 0.45 < time.monotonic() - started < 0.6
    assert sent.count(KEEPALIVE) == 2  # at 0.2 and 0.4 s
    assert not response.done


@pytest.mark.anyio
async def test_the_requests_own_body_message_is_read_past_not_taken_for_a_disconnect() -> None:
    """On a GET nobody reads the (empty) request body: the client's first ASGI message is
    `http.request`. The stream goes on until the real disconnect."""
    log = new_log()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    later = disconnects_after(0.3)

    async def receive() -> dict[str, Any]:
        return messages.pop() if messages else await later()

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    started = time.monotonic()
    with anyio.fail_after(3):
        await response({"type": "http"}, receive, discard)
    assert 0.25 < time.monotonic() - started < 0.5
    assert not response.done


@pytest.mark.anyio
async def test_a_receive_that_fails_ends_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    log = new_log()

    async def receive() -> dict[str, Any]:
        await anyio.sleep(0.1)
        raise OSError("the server's receive broke")

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with caplog.at_level("WARNING", logger="assistant.sse"), anyio.fail_after(3):
        await response({"type": "http"}, receive, discard)
    assert not response.done
    assert "the server's receive failed" in caplog.text


@pytest.mark.anyio
async def test_the_stream_ending_ends_the_wait_for_the_clients_next_message() -> None:
    """The request's task waits for the client's next message while the sender sends; when the
    sender ends, that wait ends too (cancelled, not left pending) and nothing of the response
    outlives it."""
    log = new_log()
    calls = 0
    waits_cancelled = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls, waits_cancelled
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}  # a GET's own body message
        try:
            await anyio.sleep(3600)
        except BaseException:
            waits_cancelled += 1
            raise
        raise AssertionError("unreachable")

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    asyncio.get_running_loop().call_soon(log.append, Event(METADATA, {}))
    with anyio.fail_after(3):
        await response({"type": "http"}, receive, discard)
    assert response.done and calls == 2 and waits_cancelled == 1
    assert response._sender is None and not pending_tasks_of_the_response()


@pytest.mark.anyio
async def test_a_sender_that_fails_raises_its_error_from_the_response() -> None:
    """An error in the sender's task goes on from the request's task, as from any response
    (Starlette and hypercorn log it and close the connection)."""
    log = new_log()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            raise RuntimeError("the send broke")

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with pytest.raises(RuntimeError, match="the send broke"), anyio.fail_after(3):
        await response({"type": "http"}, never_disconnects, send)
    assert not response.done
    assert response._sender is None and not pending_tasks_of_the_response()


@pytest.mark.anyio
async def test_a_sender_that_fails_as_the_response_is_cancelled_has_its_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cancellation goes on from the request's task, so the sender's error cannot: it is
    logged with the run's id, not left to asyncio's "never retrieved" (which names no run)."""
    log = new_log()
    response_task: asyncio.Task[None] | None = None

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            assert response_task is not None
            response_task.cancel()  # in the step the sender fails in
            raise RuntimeError("the send broke")

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with loop_errors() as errors, caplog.at_level("ERROR", logger="assistant.sse"):
        response_task = asyncio.get_running_loop().create_task(response({"type": "http"}, never_disconnects, send))
        with anyio.fail_after(3):
            await asyncio.wait((response_task,))
        await anyio.sleep(0.01)
        gc.collect()  # a task whose exception was never retrieved says so as it is freed
        await anyio.sleep(0.01)
    assert response_task.cancelled()
    assert "the stream's sender failed" in caplog.text and "the send broke" in caplog.text
    assert errors == []


@pytest.mark.anyio
async def test_a_response_cancelled_from_outside_cancels_its_sender() -> None:
    log = new_log()
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with anyio.move_on_after(0.2):
        await response({"type": "http"}, never_disconnects, discard)
    assert not response.done
    assert response._sender is None and not pending_tasks_of_the_response()


@pytest.mark.anyio
async def test_a_first_send_that_stalls_is_dropped_at_the_slow_client_timeout_even_below_the_heartbeat() -> None:
    log = new_log()

    response = SSEResponse(log, heartbeat_seconds=2, retry_ms=1, slow_client_timeout_seconds=0.3)
    started = time.monotonic()
    with anyio.fail_after(3):
        await response({"type": "http"}, never_disconnects, never_takes_the_bytes)
    assert 0.25 < time.monotonic() - started < 0.6


@pytest.mark.anyio
async def test_a_disconnect_during_the_last_send_is_not_logged_as_a_client_leaving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """hypercorn closes a `Connection: close` (or shutting down) connection inside the final
    send and queues http.disconnect before it returns: the client had every byte."""
    log = new_log()
    log.append(Event(METADATA, {}))
    receive, send = closed_inside_the_last_send()
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with caplog.at_level("INFO", logger="assistant.sse"), anyio.fail_after(3):
        await response({"type": "http"}, receive, send)
    assert "client disconnected from the stream" not in caplog.text


@pytest.mark.anyio
async def test_a_disconnect_queued_by_a_last_send_that_did_not_wait_leaves_no_error() -> None:
    """The usual end of a stream: the last send queues the disconnect and returns at once, so
    the request's task takes the disconnect, finds the sender done and leaves its watch before
    the sender's end is told, which must then leave the watch alone."""
    log = new_log()
    log.append(Event(METADATA, {}))
    receive, send = closed_inside_the_last_send(pause=0)
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with loop_errors() as errors:
        with anyio.fail_after(3):
            await response({"type": "http"}, receive, send)
        await anyio.sleep(0.05)
    assert response.done and errors == []


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["the client's disconnect", "a stalled client", "a normal end"])
async def test_an_ended_stream_is_freed_without_the_garbage_collector(ending: str) -> None:
    """A sender cancelled by the stream's end keeps its CancelledError, whose traceback keeps
    the response: the response must not keep the sender in turn (a reference cycle that only a
    full collection, every 10,000 connections, would free, with the run's log in it)."""
    log = new_log()
    if ending == "a normal end":
        log.append(Event(METADATA, {}))
    gone = anyio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    if ending == "the client's disconnect":
        asyncio.get_running_loop().call_later(0.05, gone.set)
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=0.1)
    freed = weakref.ref(response)
    send = never_takes_the_bytes if ending == "a stalled client" else discard
    gc.collect()
    gc.disable()
    try:
        with anyio.fail_after(3):
            await response({"type": "http"}, receive, send)
        del response
        await anyio.sleep(0.01)  # the sender's done callbacks
        assert freed() is None
    finally:
        gc.enable()


@pytest.mark.anyio
async def test_a_response_cancelled_as_its_sender_ends_after_the_disconnect_leaves_no_error() -> None:
    """The request's task waits for the sender's end once the disconnect came. Cancelled in the
    loop iteration the sender ends in, its wait is cancelled before the sender's end is told:
    that must not try to set the cancelled wait (asyncio would log an InvalidStateError)."""
    log = new_log()
    log.append(Event(METADATA, {}))
    response_task: asyncio.Task[None] | None = None

    def cancel_the_response() -> None:
        assert response_task is not None and response._sender_done is not None  # it waits
        response_task.cancel()  # in the step the sender ends in

    receive, send = closed_inside_the_last_send(then=cancel_the_response)
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with loop_errors() as errors:
        response_task = asyncio.get_running_loop().create_task(response({"type": "http"}, receive, send))
        with anyio.fail_after(3):
            await asyncio.wait((response_task,))
        await anyio.sleep(0.05)
    assert response_task.cancelled() and response.done
    assert errors == []


@pytest.mark.anyio
async def test_a_send_that_stalls_later_is_dropped_at_the_slow_client_timeout_even_below_the_heartbeat() -> None:
    log = new_log()
    sends = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal sends
        if message["type"] == "http.response.body":
            sends += 1
            if sends == 2:
                await anyio.sleep(3600)

    response = SSEResponse(log, heartbeat_seconds=3, retry_ms=1, slow_client_timeout_seconds=0.3)

    async def append_later() -> None:
        await anyio.sleep(0.5)
        log.append(Event(RUN_CREATED, {}))  # the second send, at 0.5 s, never returns

    started = time.monotonic()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(append_later)
            await response({"type": "http"}, never_disconnects, send)
    assert 0.75 < time.monotonic() - started < 1.5


def steady_reader(rate_bytes_per_second: float, received: list[bytes]) -> Any:
    """hypercorn's send over asyncio, to a client that reads all the time at a steady rate: the
    body goes into the transport's buffer and the send returns once that buffer is back under
    asyncio's high-water mark (StreamWriter.drain, 64 KiB), as the client takes the bytes."""
    high_water = 64 * 1024
    state = {"buffered": 0, "at": time.monotonic()}

    def take() -> None:
        now = time.monotonic()
        state["buffered"] = max(0, state["buffered"] - int((now - state["at"]) * rate_bytes_per_second))
        state["at"] = now

    async def send(message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        take()
        state["buffered"] += len(message.get("body", b""))
        received.append(message.get("body", b""))
        while state["buffered"] > high_water:
            await anyio.sleep(0.01)
            take()

    return send


@pytest.mark.anyio
async def test_a_client_reading_steadily_is_not_dropped_while_a_large_batch_goes_out() -> None:
    """README: a client that *takes no data* for SLOW_CLIENT_TIMEOUT_SECONDS is dropped. A replay
    (or a resume from early on, or one big tool output) is one batch of up to
    STREAM_MAX_BYTES_PER_RUN; a client taking it at 400 KB/s without pause must get it all."""
    log = new_log()
    for i in range(40):
        log.append(Event("thread.message.delta", {"delta": {"content": f"{i}" + "x" * 20_000}}))  # ~800 KB
    log.append(Event(METADATA, {}))
    received: list[bytes] = []
    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=1)
    with anyio.fail_after(10):
        await response({"type": "http"}, never_disconnects, steady_reader(400_000, received))
    assert response.done, "a client that never stopped reading was dropped as a slow client"
    assert b"".join(received).endswith(b"event: metadata\nid: run_t:42\ndata: {}\n\n")


@pytest.mark.anyio
async def test_a_resumed_stream_opens_with_its_resumed_event_at_once_while_the_run_is_quiet() -> None:
    """A client resuming a running run at its newest event gets `retry:` and
    `thread.run.resumed` straight away, not only when the run's next event or the next
    keepalive comes (up to SSE_HEARTBEAT_SECONDS later)."""
    log = new_log()
    log.append(Event(MESSAGE_DELTA, {"delta": {"content": "a"}}))  # the client saw both events
    sent: list[tuple[float, bytes]] = []
    started = time.monotonic()

    async def send(message: dict[str, Any]) -> None:
        sent.append((time.monotonic() - started, message.get("body", b"")))

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5, after=2, resumed=True)
    with anyio.fail_after(3):
        await response({"type": "http"}, disconnects_after(0.3), send)
    bodies = [(at, body) for at, body in sent if body]
    assert bodies, "nothing was sent in 0.3 s on a resumed stream"
    at, body = bodies[0]
    assert at < 0.2 and body.startswith(b"retry: 1\n\nevent: " + RUN_RESUMED.encode() + b"\n"), bodies


@pytest.mark.anyio
async def test_no_keepalive_comments_while_events_keep_flowing() -> None:
    """README: a keepalive goes out when nothing was sent for SSE_HEARTBEAT_SECONDS, not on a
    stream that sends an event every few milliseconds."""
    log = new_log()
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message.get("body", b""))

    async def run() -> None:
        for i in range(25):  # an event every 20 ms for 0.5 s
            await anyio.sleep(0.02)
            log.append(Event(MESSAGE_DELTA, {"delta": {"content": str(i)}}))
        log.append(Event(METADATA, {}))

    response = SSEResponse(log, heartbeat_seconds=0.1, retry_ms=1, slow_client_timeout_seconds=5)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run)
            await response({"type": "http"}, never_disconnects, send)
    assert response.done and KEEPALIVE not in sent


@pytest.mark.anyio
async def test_a_finished_stream_stops_watching_its_client() -> None:
    """Once the stream has ended, its wait for the client's next message is cancelled and its
    timer gone: nothing of it (nor of the run's log it holds) stays alive on the event loop."""
    log = new_log()
    receive_cancelled = anyio.Event()

    async def receive() -> dict[str, Any]:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            receive_cancelled.set()
            raise
        raise AssertionError("unreachable")

    response = SSEResponse(log, heartbeat_seconds=0.05, retry_ms=1, slow_client_timeout_seconds=5)
    asyncio.get_running_loop().call_later(0.1, log.append, Event(METADATA, {}))  # the client is watched by then
    with anyio.fail_after(3):
        await response({"type": "http"}, receive, discard)
        await receive_cancelled.wait()
    assert response.done
    ref = weakref.ref(response)
    del response
    await anyio.sleep(0.1)  # two heartbeat intervals: a live timer would have rescheduled itself
    gc.collect()
    assert ref() is None, "the finished stream is still referenced (by its timer)"


@pytest.mark.anyio
async def test_a_large_batch_is_sent_in_pieces_cut_between_characters() -> None:
    """A batch over SEND_PIECE_BYTES goes out in several sends; each is valid UTF-8 on its own, so
    a client decoding each chunk it reads never sees a character cut in two."""
    log = new_log()
    log.append(Event(MESSAGE_DELTA, {"delta": {"content": "\u20ac" * 50_000}}))  # 150 KB of 3-byte characters
    log.append(Event(METADATA, {}))
    sent: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            sent.append(message["body"])

    response = SSEResponse(log, heartbeat_seconds=5, retry_ms=1, slow_client_timeout_seconds=5)
    with anyio.fail_after(3):
        await response({"type": "http"}, never_disconnects, send)
    assert len(sent) >= 3 and all(len(piece) <= SEND_PIECE_BYTES for piece in sent)
    for piece in sent:
        piece.decode("utf-8")  # raises on a piece that starts or ends inside a character
    assert "\u20ac" * 50_000 in b"".join(sent).decode()

"""The WebSocket handler against a client that does not read: its sends block forever.

(Turns over a real socket are in test_chat_api, test_e2e and test_faults.)
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest

from assistant.config import Settings
from assistant.errors import ThreadBusy
from assistant.events import MESSAGE_DELTA, METADATA, RUN_CREATED, RUN_RESUMED, Event
from assistant.run_log import RunLog
from assistant.websocket_stream_handler import CLOSE_POLICY, CLOSE_TOO_BIG, MAX_NOTICES, ChatConnection


class UnreadWebSocket:
    """Hands out the client's frames, then waits; every send blocks (nothing is read)."""

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.sends_started = 0
        self.closed: tuple[int, str] | None = None
        self.close_answered = anyio.Event()  # the client got the close frame and answered it

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        if self.frames:
            await anyio.sleep(0)
            return {"type": "websocket.receive", "text": self.frames.pop(0)}
        await self.close_answered.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, text: str) -> None:
        self.sends_started += 1
        await anyio.sleep_forever()

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def settings(**overrides: Any) -> Settings:
    return Settings(openai_api_key="sk-test", **{"slow_client_timeout_seconds": 60.0, **overrides})


async def seconds_served(websocket: UnreadWebSocket, *, slow_client_timeout_seconds: float) -> float:
    """How long the connection lasted (at most 5 s)."""
    connection = ChatConnection(
        websocket, manager=None, settings=settings(slow_client_timeout_seconds=slow_client_timeout_seconds),  # type: ignore[arg-type]
        correlation_id="cid",
    )
    started = anyio.current_time()
    with anyio.fail_after(5):
        await connection.serve()
    return anyio.current_time() - started


@pytest.mark.anyio
async def test_a_client_flooding_bad_frames_without_reading_is_dropped_at_the_slow_client_timeout() -> None:
    """The reader decides to close (1008), but the close frame would wait behind the stuck error
    frame: the connection ends at the slow-client timeout instead."""
    websocket = UnreadWebSocket(["not json"] * (MAX_NOTICES + 50))
    assert 0.3 <= await seconds_served(websocket, slow_client_timeout_seconds=0.3) < 1.0
    assert websocket.sends_started == 1  # the first error frame, stuck; the rest were held, then dropped


class SlowReadingWebSocket(UnreadWebSocket):
    """Reads each frame after `send_seconds`; records what was sent and closed, in order."""

    def __init__(self, frames: list[str], close_takes_forever: bool = False, send_seconds: float = 0.001) -> None:
        super().__init__(frames)
        self.close_takes_forever = close_takes_forever
        self.send_seconds = send_seconds
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        self.sends_started += 1
        await anyio.sleep(self.send_seconds)
        self.sent.append("frame")

    async def close(self, code: int, reason: str) -> None:
        self.sent.append("close")
        self.closed = (code, reason)
        if self.close_takes_forever:
            await anyio.sleep_forever()
        self.close_answered.set()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (["not json"] * (MAX_NOTICES + 50), (CLOSE_POLICY, "too many unanswered bad frames")),
        (["not json", "x" * 2_000_000], (CLOSE_TOO_BIG, "frame too large")),
    ],
)
async def test_the_close_frame_goes_last_after_the_frame_being_sent(frames: list[str], expected: tuple[int, str]) -> None:
    """Only the writer sends: nothing may follow the close frame (Starlette refuses it, and the
    error would end the connection with a stack trace)."""
    websocket = SlowReadingWebSocket(frames)
    assert await seconds_served(websocket, slow_client_timeout_seconds=5) < 1.0
    assert websocket.closed == expected
    assert websocket.sent[-1] == "close" and websocket.sent.count("close") == 1
    assert "frame" in websocket.sent  # the error frame being sent when the reader decided went out first


@pytest.mark.anyio
async def test_a_close_frame_that_never_goes_ends_the_connection_at_the_slow_client_timeout() -> None:
    websocket = SlowReadingWebSocket(["not json"] * (MAX_NOTICES + 50), close_takes_forever=True)
    assert 0.3 <= await seconds_served(websocket, slow_client_timeout_seconds=0.3) < 1.0
    assert websocket.closed == (CLOSE_POLICY, "too many unanswered bad frames")


class TimedWebSocket(SlowReadingWebSocket):
    """Hands out each frame after its own delay; each send takes 10 ms."""

    def __init__(self, frames: list[tuple[str, float]]) -> None:
        super().__init__([], send_seconds=0.01)
        self.timed_frames = frames

    async def receive(self) -> dict[str, Any]:
        if self.timed_frames:
            frame, delay = self.timed_frames.pop(0)
            await anyio.sleep(delay)
            return {"type": "websocket.receive", "text": frame}
        return await super().receive()


class BusyThreads:
    """A manager whose thread stays busy until `free` is set; records the runs it starts."""

    def __init__(self) -> None:
        self.free = anyio.Event()
        self.started: list[str] = []

    async def start_run(self, thread_id: str, message: str, correlation_id: str, key: str | None = None) -> RunLog:
        await self.free.wait()
        self.started.append(message)
        return RunLog("run_late", thread_id, correlation_id)


@pytest.mark.anyio
async def test_the_close_frame_ends_the_connection_and_a_turn_still_waiting_for_its_thread() -> None:
    """Nothing runs for a connection closed with 1009: a turn waiting for a busy thread is dropped."""
    chat = orjson.dumps({"thread_id": "conv_1", "message": "hi"}).decode()
    websocket = TimedWebSocket([(chat, 0.0), ("x" * 100, 0.01)])
    manager = BusyThreads()
    connection = ChatConnection(websocket, manager, settings(max_body_bytes=64), correlation_id="cid")  # type: ignore[arg-type]
    started = anyio.current_time()
    with anyio.fail_after(5):
        await connection.serve()
    assert anyio.current_time() - started < 0.5  # not at the slow-client timeout (60 s)
    manager.free.set()
    await anyio.sleep(0.05)
    assert websocket.sent == ["close"] and websocket.closed == (CLOSE_TOO_BIG, "frame too large")
    assert manager.started == []


class LeavesAfterFrames(TimedWebSocket):
    """Hands out its timed frames, then disconnects (no close frame from the service)."""

    async def receive(self) -> dict[str, Any]:
        if self.timed_frames:
            return await super().receive()
        await anyio.sleep(0.01)
        return {"type": "websocket.disconnect", "code": 1001}


@pytest.mark.anyio
async def test_a_client_leaving_while_its_turn_waits_for_a_busy_thread_starts_no_run() -> None:
    chat = orjson.dumps({"thread_id": "conv_1", "message": "hi"}).decode()
    websocket = LeavesAfterFrames([(chat, 0.0)])
    manager = BusyThreads()
    connection = ChatConnection(websocket, manager, settings(), correlation_id="cid")  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await connection.serve()
    manager.free.set()
    await anyio.sleep(0.05)
    assert manager.started == [] and websocket.sent == []


@pytest.mark.anyio
async def test_a_started_turn_keeps_no_task_of_its_start_for_the_life_of_the_connection() -> None:
    """An idle socket holds only what it waits with: the finished start task is let go."""
    chat = orjson.dumps({"thread_id": "conv_1", "message": "hi"}).decode()
    websocket = LeavesAfterFrames([(chat, 0.0)])
    manager = BusyThreads()
    manager.free.set()
    connection = ChatConnection(websocket, manager, settings(), correlation_id="cid")  # type: ignore[arg-type]
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(connection.serve)
        with anyio.fail_after(5):
            while not manager.started:
                await anyio.sleep(0.001)
        await anyio.sleep(0)
        assert connection._starting is None and connection._following is not None
    assert manager.started == ["hi"]


class ResumableRun:
    def __init__(self, log: RunLog) -> None:
        self.log = log

    def resumable(self, run_id: str, after: int) -> RunLog:
        return self.log


@pytest.mark.anyio
async def test_the_close_frame_does_not_wait_behind_a_long_batch() -> None:
    """A client reading a 201-event resume sends a frame too large: the close goes after the frame
    being sent, not after the whole batch (which would outlast the slow-client timeout)."""
    log = RunLog("run_" + "a" * 32, "conv_1", "cid")
    for i in range(200):
        log.append(Event(MESSAGE_DELTA, {"i": i}))
    log.append(Event(METADATA, {}))
    resume = orjson.dumps({"resume": log.run_id}).decode()
    websocket = TimedWebSocket([(resume, 0.0), ("x" * 100, 0.1)])
    connection = ChatConnection(
        websocket, ResumableRun(log), settings(max_body_bytes=64, slow_client_timeout_seconds=0.5),  # type: ignore[arg-type]
        correlation_id="cid",
    )
    with anyio.fail_after(5):
        await connection.serve()
    assert websocket.closed == (CLOSE_TOO_BIG, "frame too large")
    assert websocket.sent.count("frame") < 50 and websocket.sent[-1] == "close"


@pytest.mark.anyio
async def test_a_send_stuck_past_the_slow_client_timeout_ends_the_connection() -> None:
    websocket = UnreadWebSocket(["not json"])
    assert 0.2 <= await seconds_served(websocket, slow_client_timeout_seconds=0.2) < 1.0
    assert websocket.sends_started == 1 and websocket.closed is None


class ReadingWebSocket(UnreadWebSocket):
    """A client that sends its next frame once the last was answered, then hangs up."""

    def __init__(self, frames: list[str]) -> None:
        super().__init__(frames)
        self.sent: list[str] = []
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        while len(self.sent) < self.received:
            await anyio.sleep(0)
        if not self.frames:
            return {"type": "websocket.disconnect"}
        self.received += 1
        return await super().receive()

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await anyio.sleep(0)


@pytest.mark.anyio
async def test_bad_frames_during_a_quiet_turn_leave_one_waiter_on_its_log() -> None:
    """Each error frame wakes the writer; it must not leave a waiter on the turn's log each time."""
    websocket = ReadingWebSocket(["not json"] * 2000)
    connection = ChatConnection(websocket, manager=None, settings=settings(), correlation_id="cid")  # type: ignore[arg-type]
    log = RunLog("run_quiet", "conv_quiet", "cid")  # a turn whose upstream sends nothing for now
    connection._following, connection.turn_running = (log, 0), True
    with anyio.fail_after(10):
        await connection.serve()
    assert len(websocket.sent) == 2000 and all('"type":"invalid_request"' in frame for frame in websocket.sent)
    assert len(log._waiters) <= 1


class QuietClient(UnreadWebSocket):
    """Reads whatever comes (nothing does), sends nothing, hangs up soon."""

    async def receive(self) -> dict[str, Any]:
        await anyio.sleep(0.001)
        return {"type": "websocket.disconnect"}

    async def send_text(self, text: str) -> None:
        pass


@pytest.mark.anyio
async def test_clients_leaving_a_quiet_turn_leave_no_waiters_on_its_log() -> None:
    log = RunLog("run_quiet", "conv_quiet", "cid")
    for _ in range(20):  # clients following the same quiet run hang up mid-wait
        connection = ChatConnection(QuietClient([]), manager=None, settings=settings(), correlation_id="cid")  # type: ignore[arg-type]
        connection._following, connection.turn_running = (log, 0), True
        with anyio.fail_after(5):
            await connection.serve()
    assert log._waiters == []


@pytest.mark.anyio
async def test_error_frames_held_for_a_client_that_does_not_read_are_bounded_in_bytes() -> None:
    """A client that does not read, sending resume frames whose last_event_id is a large string:
    up to MAX_NOTICES error frames wait for it until the slow-client timeout, and each quotes only
    the start of that string (it would be in each twice: `data.error` and `error`)."""
    limit = 262_144  # MAX_BODY_BYTES' default
    frame = '{"resume":"run_x","last_event_id":"' + "a" * (limit - 64) + '"}'
    assert len(frame) <= limit
    websocket = UnreadWebSocket([frame] * (MAX_NOTICES + 10))
    connection = ChatConnection(websocket, manager=None,  # type: ignore[arg-type]
                                settings=settings(slow_client_timeout_seconds=1.0), correlation_id="cid")
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sum(len(notice) for notice in connection._notices))
            await anyio.sleep(0.01)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(watch)
            await connection.serve()
            task_group.cancel_scope.cancel()
    # A few KiB per error frame would be plenty; 256 frames of ~1 KiB is 256 KiB.
    assert peak < 4 * limit, f"{peak:,} bytes held for one client that sent {MAX_NOTICES} frames"


CHAT = orjson.dumps({"thread_id": "conv_1", "message": "hi"}).decode()


def finished_run(run_id: str, correlation_id: str = "cid") -> RunLog:
    log = RunLog(run_id, "conv_1", correlation_id)
    log.append(Event(RUN_CREATED, {}))
    log.append(Event(METADATA, {}))
    return log


class Runs:
    """A manager whose first `refused` messages are refused as the given error, and whose runs
    otherwise end at once; it can also resume one given run."""

    def __init__(self, refused: list[Exception] | None = None, resumable_log: RunLog | None = None) -> None:
        self.refused = list(refused or [])
        self.resumable_log = resumable_log
        self.started: list[str] = []

    async def start_run(self, thread_id: str, message: str, correlation_id: str, key: str | None = None) -> RunLog:
        if self.refused:
            raise self.refused.pop(0)
        self.started.append(message)
        return finished_run(f"run_{len(self.started)}", correlation_id)

    def resumable(self, run_id: str, after: int) -> RunLog:
        assert self.resumable_log is not None
        return self.resumable_log


async def serve(websocket: ScriptedClient, runs: Runs) -> list[dict[str, Any]]:
    """Serve the scripted client to its end; the frames it got."""
    connection = ChatConnection(websocket, runs, settings(), correlation_id="cid")  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await connection.serve()
    return frames_of(websocket.sent)


def frames_of(sent: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(text) for text in sent]


@pytest.mark.anyio
async def test_a_message_that_could_not_start_gets_an_error_frame_and_the_connection_takes_the_next() -> None:
    """A message refused before its run starts (a busy thread, say) is answered with an error
    frame carrying the connection's correlation ID; it is not a turn still running, so the
    client's next message is taken."""
    websocket = ScriptedClient([(CHAT, 0), (CHAT, 1)], total=3)
    runs = Runs(refused=[ThreadBusy("the thread is still busy")])
    connection = ChatConnection(websocket, runs, settings(), correlation_id="cid")  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await connection.serve()
    frames = frames_of(websocket.sent)
    assert frames[0]["event"] == "error" and frames[0]["data"]["type"] == "thread_busy"
    assert frames[0]["data"]["correlation_id"] == "cid" == frames[0]["correlation_id"]
    assert frames[1]["event"] == RUN_CREATED, frames  # not an error: turn_in_progress
    assert runs.started == ["hi"]


class AnswersAtOnce(UnreadWebSocket):
    """A client that sends its next message as soon as it has a turn's metadata, while the
    server's send of that frame has not returned yet (hypercorn's send returns after the write)."""

    def __init__(self, turns: int) -> None:
        super().__init__([])
        self.turns = turns
        self.handed = 0
        self.sent: list[str] = []
        self.metadata = 0
        self.new_metadata = anyio.Event()

    async def _wait_for_metadata(self, count: int) -> None:
        while self.metadata < count:
            await self.new_metadata.wait()
            self.new_metadata = anyio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._wait_for_metadata(self.handed)  # the last turn's end
        if self.handed < self.turns:
            self.handed += 1
            return {"type": "websocket.receive", "text": CHAT}
        await anyio.sleep(0.05)  # whatever else comes
        return {"type": "websocket.disconnect"}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        if '"event":"metadata"' in text:
            self.metadata += 1
            self.new_metadata.set()
            await anyio.sleep(0.02)  # the frame is on the wire, the send not yet back


class ScriptedClient(UnreadWebSocket):
    """Sends each frame once the server has sent `after` frames; then, once it has `total`
    frames (or after a while), hangs up."""

    def __init__(self, script: list[tuple[str, int]], total: int) -> None:
        super().__init__([])
        self.script = script
        self.total = total
        self.sent: list[str] = []

    async def _until_sent(self, count: int) -> None:
        while len(self.sent) < count:
            await anyio.sleep(0.001)

    async def receive(self) -> dict[str, Any]:
        if self.script:
            frame, after = self.script.pop(0)
            await self._until_sent(after)
            return {"type": "websocket.receive", "text": frame}
        with anyio.move_on_after(0.5):
            await self._until_sent(self.total)
        return {"type": "websocket.disconnect"}

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await anyio.sleep(0)


@pytest.mark.anyio
async def test_the_next_message_sent_as_soon_as_the_metadata_arrives_is_taken() -> None:
    """A turn is over for the connection once its last event is on its way: a client that
    answers the metadata at once (before the server's send returned) starts its next turn."""
    websocket = AnswersAtOnce(turns=3)
    runs = Runs()
    connection = ChatConnection(websocket, runs, settings(), correlation_id="cid")  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await connection.serve()
    events = [frame["event"] for frame in frames_of(websocket.sent)]
    assert "error" not in events, frames_of(websocket.sent)
    assert events == [RUN_CREATED, METADATA] * 3 and runs.started == ["hi"] * 3


@pytest.mark.anyio
async def test_a_message_while_a_resumed_run_streams_is_refused_as_turn_in_progress() -> None:
    """A resumed run is the connection's turn: a chat message before its end is refused and
    starts nothing, and the resumed run's events go on."""
    log = RunLog("run_live", "conv_1", "cid")
    log.append(Event(RUN_CREATED, {}))  # still running
    resume = orjson.dumps({"resume": "run_live", "last_event_id": "run_live:1"}).decode()
    websocket = ScriptedClient([(resume, 0), (CHAT, 1)], total=2)
    runs = Runs(resumable_log=log)
    frames = await serve(websocket, runs)
    assert frames[0]["event"] == RUN_RESUMED and frames[0]["data"]["complete"] is False
    assert frames[1]["event"] == "error" and frames[1]["data"]["type"] == "turn_in_progress", frames
    assert runs.started == []


@pytest.mark.anyio
async def test_after_an_events_dropped_error_the_connection_takes_the_next_message() -> None:
    """A client that fell further behind a run than its log keeps gets `events_dropped`; that
    ends its turn, so it can resume from a later event or send a message."""
    log = RunLog("run_long", "conv_1", "cid", max_events=3)
    for i in range(10):
        log.append(Event(MESSAGE_DELTA, {"i": i}))
    log.append(Event(METADATA, {}))
    from_start = orjson.dumps({"resume": "run_long"}).decode()  # its first events are gone by now
    websocket = ScriptedClient([(from_start, 0), (CHAT, 2)], total=4)
    runs = Runs(resumable_log=log)
    frames = await serve(websocket, runs)
    assert [f["event"] for f in frames[:2]] == [RUN_RESUMED, "error"] and frames[1]["data"]["type"] == "events_dropped"
    assert frames[2]["event"] == RUN_CREATED, frames  # the message was taken: no turn_in_progress
    assert runs.started == ["hi"]


class BigFrameThenStuck(UnreadWebSocket):
    """Takes the first frames (the resume notice, a big one in 0.3 s), then reads nothing; sends
    nothing after its own frames, nor a disconnect."""

    stuck_at = 0.0

    async def receive(self) -> dict[str, Any]:
        if self.frames:
            return await super().receive()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_text(self, text: str) -> None:
        self.sends_started += 1
        if self.sends_started == 1:
            return
        if len(text) > 100_000:
            await anyio.sleep(0.3)  # past the timeout, within a big frame's allowance
            return
        self.stuck_at = anyio.current_time()
        await anyio.sleep_forever()


@pytest.mark.anyio
async def test_a_small_frame_stuck_after_a_big_one_is_dropped_at_the_timeout_not_the_big_ones() -> None:
    """A frame over 64 KiB gets the timeout once per 64 KiB; the watchdog must not keep waiting
    on that long allowance once the next, small, send is the one stuck."""
    log = RunLog("run_" + "a" * 32, "conv_1", "cid")
    log.append(Event(MESSAGE_DELTA, {"text": "x" * (20 * 64 * 1024)}))  # ~20 timeouts' allowance
    log.append(Event(MESSAGE_DELTA, {"text": "small"}))
    log.append(Event(METADATA, {}))
    websocket = BigFrameThenStuck([orjson.dumps({"resume": log.run_id}).decode()])
    connection = ChatConnection(websocket, ResumableRun(log), settings(slow_client_timeout_seconds=0.2),  # type: ignore[arg-type]
                                correlation_id="cid")
    with anyio.fail_after(5):
        await connection.serve()
    assert anyio.current_time() - websocket.stuck_at < 0.5

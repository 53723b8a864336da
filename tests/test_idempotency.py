"""Idempotency-Key: a message sent again with the key it was first sent with reads the run that
first send started, instead of asking the model a second time (README, "Sending a message again").

The end-to-end case (a real connection lost before the answer) is in tests/test_e2e_resume.py.
"""

from __future__ import annotations

import anyio
import httpx
import pytest
import respx
from starlette.testclient import TestClient

from assistant import run_manager
from assistant.errors import NotFound, ServiceError, ThreadBusy
from assistant.events import ERROR, METADATA, RUN_CREATED, RUN_FAILED
from tests.test_chat_api import JSON, SSE, chat, events_of, make_client
from tests.test_resume import (
    RESUMED,
    TEXT,
    TIMEOUT,
    assert_error,
    assert_resumed,
    client,  # noqa: F401  (fixture)
    finished_run,
    manager,
    ws_resumed,
    ws_until_end,
)
from tests.upstream_mock import openai_error, sse_response, text_events, upstream  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(30)

KEY = "8c1f7a52-1d6e-4c55-9a43-2f0b6c1e9d00"


def with_key(headers: dict[str, str], key: str = KEY) -> dict[str, str]:
    return {**headers, "idempotency-key": key}


# --- RunManager ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_key_names_its_first_run_on_its_thread_for_the_same_message_only() -> None:
    async with manager() as (runs, engine):
        assert runs.keyed_run("thread_a", KEY, "hi") is None
        log = await runs.start_run("thread_a", "hi", "corr", KEY)
        assert runs.keyed_run("thread_a", KEY, "hi") is log  # still running: the same run
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
        assert runs.keyed_run("thread_a", KEY, "hi") is log  # ended: still the same run
        assert runs.keyed_run("thread_b", KEY, "hi") is None  # a key is a thread's own
        with pytest.raises(ServiceError) as reused:
            runs.keyed_run("thread_a", KEY, "hi!")
        assert (reused.value.status_code, reused.value.type) == (422, "idempotency_key_reused")
        unkeyed = await finished_run(runs, "thread_a")  # a message without a key is always new
        assert unkeyed is not log


@pytest.mark.anyio
async def test_a_key_whose_message_still_waits_for_the_thread_is_in_use_and_freed_if_it_gives_up() -> None:
    async with manager(THREAD_LOCK_TIMEOUT_SECONDS="0.3") as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        await runs.start_run("thread_a", "slow", "corr")
        gave_up = anyio.Event()

        async def waits_then_gives_up() -> None:
            with pytest.raises(ThreadBusy):
                await runs.start_run("thread_a", "next", "corr", KEY)
            gave_up.set()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(waits_then_gives_up)
            await anyio.sleep(0.05)  # waiting for the thread
            with pytest.raises(ServiceError) as in_use:
                runs.keyed_run("thread_a", KEY, "next")
            assert (in_use.value.status_code, in_use.value.type) == (409, "idempotency_key_in_use")
            with pytest.raises(ServiceError) as reused:
                runs.keyed_run("thread_a", KEY, "other")
            assert reused.value.type == "idempotency_key_reused"
            with anyio.fail_after(TIMEOUT):
                await gave_up.wait()  # after THREAD_LOCK_TIMEOUT_SECONDS
        # It never started: the same message may be sent again with its key.
        assert runs.keyed_run("thread_a", KEY, "next") is None
        engine.gates["slow"].set()


@pytest.mark.anyio
async def test_start_run_refuses_a_key_that_already_names_a_run() -> None:
    """A caller that did not ask keyed_run first (the endpoints do, with no await between) is
    refused rather than starting a second run."""
    async with manager() as (runs, engine):
        log = await runs.start_run("thread_a", "hi", "corr", KEY)
        with pytest.raises(ServiceError) as twice:
            await runs.start_run("thread_a", "hi", "corr", KEY)
        assert (twice.value.status_code, twice.value.type) == (409, "idempotency_key_in_use")
        with pytest.raises(ServiceError) as reused:
            await runs.start_run("thread_a", "bye", "corr", KEY)
        assert reused.value.type == "idempotency_key_reused"
        assert runs.keyed_run("thread_a", KEY, "hi") is log and list(runs._runs) == [log.run_id]


@pytest.mark.anyio
async def test_keys_beyond_the_bound_go_oldest_ended_first_never_one_still_waiting_or_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_manager, "_KEPT_KEYS", 3)
    async with manager() as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        running = await runs.start_run("thread_a", "slow", "corr", "running")
        ended_keyed = await runs.start_run("thread_b", "hi", "corr", "ended")
        with anyio.fail_after(TIMEOUT):
            await ended_keyed.wait_finished()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(runs.start_run, "thread_a", "next", "corr", "waiting")
            await anyio.sleep(0.05)  # waiting for the thread
            for i in range(2):  # other messages' keys push the oldest ended one out, and no other
                await runs.start_run(f"thread_{i}", "x", "corr", f"other-{i}")
            assert runs.keyed_run("thread_b", "ended", "hi") is None
            assert runs.keyed_run("thread_a", "running", "slow") is running
            with pytest.raises(ServiceError) as waiting:
                runs.keyed_run("thread_a", "waiting", "next")
            assert waiting.value.type == "idempotency_key_in_use"
            engine.gates["slow"].set()


@pytest.mark.anyio
async def test_a_key_taken_while_the_service_stops_is_freed() -> None:
    async with manager() as (runs, engine):
        engine.gates["slow"] = anyio.Event()
        await runs.start_run("thread_a", "slow", "corr")
        async with anyio.create_task_group() as task_group:

            async def waits_then_is_refused() -> None:
                with pytest.raises(ServiceError) as refused:
                    await runs.start_run("thread_a", "next", "corr", KEY)
                assert refused.value.type == "shutting_down"

            task_group.start_soon(waits_then_is_refused)
            await anyio.sleep(0.05)
            runs.accepting = False  # stops taking turns while the message waits
            engine.gates["slow"].set()
        assert runs.keyed_run("thread_a", KEY, "next") is None


@pytest.mark.anyio
async def test_the_key_of_a_run_no_longer_kept_answers_run_expired_not_a_new_run() -> None:
    async with manager(STREAM_RETENTION_SECONDS="0") as (runs, engine):
        log = await runs.start_run("thread_a", "hi", "corr", KEY)
        with anyio.fail_after(TIMEOUT):
            await log.wait_finished()
            while log.run_id in runs._runs:
                await anyio.sleep(0.01)
        with pytest.raises(NotFound) as expired:
            runs.keyed_run("thread_a", KEY, "hi")
        assert expired.value.type == "run_expired" and log.run_id in expired.value.message


# --- HTTP ------------------------------------------------------------------------------------


def test_a_json_message_sent_again_with_its_key_gets_the_first_runs_answer(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
    first = chat(client, "hello", headers=with_key(JSON))
    assert first.status_code == 200, first.text
    again = chat(client, "hello", headers=with_key(JSON))
    assert again.status_code == 200, again.text
    assert again.json()["run_id"] == first.json()["run_id"] and again.json()["responses"] == [TEXT]
    assert again.json()["correlation_id"] == again.headers["x-correlation-id"] != first.headers["x-correlation-id"]
    assert route.call_count == 1  # the model was asked once
    fresh = chat(client, "hello", headers=with_key(JSON, "another-key"))
    assert fresh.json()["run_id"] != first.json()["run_id"] and route.call_count == 2


def test_a_streamed_message_sent_again_with_its_key_replays_its_run_from_the_start(
    client: TestClient, upstream: respx.MockRouter
) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT, chunks=6)))
    first = chat(client, "hello", headers=with_key(SSE))
    events = events_of(first.text)
    run_id = events[0]["data"]["run_id"]
    calls = len(upstream.calls)
    again = chat(client, "hello", headers=with_key(SSE))
    assert again.status_code == 200, again.text
    assert_resumed(again.text, run_id, 0, events)
    as_json = chat(client, "hello", headers=with_key(JSON))  # the key names the run, whatever the Accept
    assert as_json.json()["run_id"] == run_id and as_json.json()["responses"] == [TEXT]
    assert len(upstream.calls) == calls


def test_last_event_id_wins_over_the_key(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT, chunks=6)))
    events = events_of(chat(client, "hello", headers=with_key(SSE)).text)
    run_id = events[0]["data"]["run_id"]
    again = chat(client, "hello", headers={**with_key(SSE), "last-event-id": f"{run_id}:3"})
    assert_resumed(again.text, run_id, 3, events[3:])


def test_a_key_sent_with_another_message_is_422_and_a_bad_key_400(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
    assert chat(client, "hello", headers=with_key(JSON)).status_code == 200
    reused = chat(client, "goodbye", headers=with_key(JSON))
    assert_error(reused, 422, "idempotency_key_reused")
    assert_error(chat(client, "goodbye", headers=with_key(SSE)), 422, "idempotency_key_reused")
    for bad in ("x" * 256, "kéy"):
        response = client.post("/chat", json={"thread_id": "conv_test", "message": "hello"},
                               headers={"content-type": "application/json", "idempotency-key": bad.encode("utf-8")})
        assert_error(response, 400, "invalid_request")
        assert "Idempotency-Key" in response.json()["error"]
    assert route.call_count == 1


def test_a_key_on_another_thread_is_another_message(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
    first = chat(client, "hello", headers=with_key(JSON))
    other = chat(client, "hello", headers=with_key(JSON), thread_id="conv_other")
    assert other.json()["run_id"] != first.json()["run_id"] and route.call_count == 2


@pytest.mark.parametrize("accept", [JSON, SSE], ids=["json", "sse"])
def test_a_run_refused_at_once_is_refused_the_same_way_when_sent_again(
    client: TestClient, upstream: respx.MockRouter, accept: dict[str, str]
) -> None:
    """Same key, same answer: a run that failed is its failure (send again with a new key)."""
    route = upstream.post("/responses").mock(return_value=openai_error(404, "Conversation with id 'conv_test' not found."))
    for _ in range(2):
        assert_error(chat(client, "hello", headers=with_key(accept)), 404, "thread_not_found")
    assert route.call_count == 1


def test_a_streamed_run_that_failed_after_its_stream_began_is_streamed_again(upstream: respx.MockRouter) -> None:
    """Refused only after SSE_HEARTBEAT_SECONDS, the first send got a 200 stream holding the
    error: so does the same message sent again (not a plain 404 it never got)."""
    async def late_refusal(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.3)
        return openai_error(404, "Conversation with id 'conv_test' not found.")

    route = upstream.post("/responses").mock(side_effect=late_refusal)
    with make_client(SSE_HEARTBEAT_SECONDS="0.05") as test_client:
        first = chat(test_client, "hello", headers=with_key(SSE))
        assert first.status_code == 200 and [e["event"] for e in events_of(first.text)] == [RUN_CREATED, ERROR]
        again = chat(test_client, "hello", headers=with_key(SSE))
        assert again.status_code == 200, again.text
        assert_resumed(again.text, events_of(first.text)[0]["data"]["run_id"], 0, events_of(first.text))
    assert route.call_count == 1


def test_a_json_answer_is_given_again_after_the_runs_first_events_were_dropped(upstream: respx.MockRouter) -> None:
    """A JSON answer needs only the run's messages, which are kept whole; a replay from the
    start needs the events, and says they are gone."""
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT, chunks=18)))
    with make_client(STREAM_MAX_EVENTS_PER_RUN="10") as test_client:
        first = chat(test_client, "hello", headers=with_key(JSON))
        again = chat(test_client, "hello", headers=with_key(JSON))
        assert again.status_code == 200 and again.json()["responses"] == first.json()["responses"] == [TEXT]
        assert_error(chat(test_client, "hello", headers=with_key(SSE)), 404, "events_dropped")
        with test_client.websocket_connect("/ws/chat") as ws:
            ws.send_json({"thread_id": "conv_test", "message": "hello", "idempotency_key": KEY})
            error = ws.receive_json()
            assert error["event"] == "error" and error["type"] == "events_dropped", error
    assert route.call_count == 1


@pytest.mark.parametrize("accept", [JSON, SSE], ids=["json", "sse"])
def test_a_run_refused_for_a_reason_that_passes_is_sent_again_as_new(
    client: TestClient, upstream: respx.MockRouter, accept: dict[str, str]
) -> None:
    """OpenAI's rate limit: the model was not asked, and the answer says to try again later. The
    same key then starts the message afresh, instead of replaying the refusal for good."""
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(429, "Rate limit reached.", headers={"retry-after": "60"}),
        sse_response(text_events(TEXT)),
    ])
    refused = chat(client, "hello", headers=with_key(accept))
    assert_error(refused, 502, "upstream_rate_limited")
    assert refused.headers["retry-after"] == "60"
    again = chat(client, "hello", headers=with_key(accept))
    assert again.status_code == 200, again.text
    assert TEXT in again.text and route.call_count == 2
    assert chat(client, "hello", headers=with_key(JSON)).json()["run_id"] == (
        again.json()["run_id"] if accept is JSON else events_of(again.text)[0]["data"]["run_id"])
    assert route.call_count == 2


def test_a_rate_limited_runs_key_is_free_even_once_the_run_is_no_longer_kept(upstream: respx.MockRouter) -> None:
    """The key is freed as the refused run ends, not when it is asked for: a client that waited
    out a long Retry-After finds it free, not 404 run_expired."""
    route = upstream.post("/responses").mock(side_effect=[
        openai_error(429, "Rate limit reached.", headers={"retry-after": "60"}),
        sse_response(text_events("other")),
        sse_response(text_events(TEXT)),
    ])
    with make_client(STREAM_MAX_RUNS="1") as test_client:
        assert_error(chat(test_client, "hello", headers=with_key(JSON)), 502, "upstream_rate_limited")
        assert chat(test_client, "meanwhile", thread_id="conv_other").status_code == 200  # pushes the refusal out
        again = chat(test_client, "hello", headers=with_key(JSON))
        assert again.status_code == 200 and again.json()["responses"] == [TEXT], again.text
    assert route.call_count == 3


def test_a_run_that_failed_midway_replays_its_failure(client: TestClient, upstream: respx.MockRouter) -> None:
    failed = [{"type": "response.failed", "sequence_number": 1, "response": {
        "id": "resp_f", "object": "response", "status": "failed", "output": [],
        "error": {"code": "server_error", "message": "The model broke."}}}]
    route = upstream.post("/responses").mock(return_value=sse_response(failed))
    first = events_of(chat(client, "hello", headers=with_key(SSE)).text)
    assert RUN_FAILED in [e["event"] for e in first]
    assert_resumed(chat(client, "hello", headers=with_key(SSE)).text, first[0]["data"]["run_id"], 0, first)
    assert route.call_count == 1
    assert chat(client, "hello", headers=with_key(JSON)).status_code == 502


def test_a_key_that_waits_for_a_busy_thread_is_409_in_use(upstream: respx.MockRouter) -> None:
    with make_client(THREAD_LOCK_TIMEOUT_SECONDS="5") as test_client:
        portal = test_client.portal
        assert portal is not None
        runs = test_client.app.state.runs  # type: ignore[attr-defined]
        upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
        portal.call(runs._take_thread, "conv_test")  # the thread is busy
        waiting = portal.start_task_soon(runs.start_run, "conv_test", "hello", "corr", KEY)
        try:
            for _ in range(100):
                if ("conv_test", KEY) in runs._keys:
                    break
                portal.call(anyio.sleep, 0.01)
            assert_error(chat(test_client, "hello", headers=with_key(JSON)), 409, "idempotency_key_in_use")
        finally:
            portal.call(runs._release_thread, "conv_test")
        log = waiting.result(TIMEOUT)
        assert chat(test_client, "hello", headers=with_key(JSON)).json()["run_id"] == log.run_id
        assert len(upstream.calls) == 1


# --- WebSocket -------------------------------------------------------------------------------


def test_a_websocket_message_sent_again_with_its_key_replays_its_run(client: TestClient, upstream: respx.MockRouter) -> None:
    route = upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT, chunks=4)))
    message = {"thread_id": "conv_test", "message": "hello", "idempotency_key": KEY}
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json(message)
        first = ws_until_end(ws)
    assert first[-1]["event"] == METADATA
    with client.websocket_connect("/ws/chat") as ws:  # a new socket, as after a dropped one
        ws.send_json(message)
        again = ws_resumed(ws)
        assert [(f["event"], f["id"], f["data"]) for f in again] == [(f["event"], f["id"], f["data"]) for f in first]
        for frame, type in [
            ({**message, "message": "other"}, "idempotency_key_reused"),
            ({**message, "idempotency_key": 7}, "invalid_request"),
            ({**message, "idempotency_key": ""}, "invalid_request"),
        ]:
            ws.send_json(frame)
            error = ws.receive_json()
            assert error["event"] == "error" and error["type"] == type, (frame, error)
        ws.send_json({**message, "idempotency_key": None})  # null: no key, a new message
        assert ws_until_end(ws)[-1]["event"] == METADATA
    assert route.call_count == 2


def test_a_key_given_over_http_names_the_run_over_the_websocket_too(client: TestClient, upstream: respx.MockRouter) -> None:
    upstream.post("/responses").mock(return_value=sse_response(text_events(TEXT)))
    run_id = chat(client, "hello", headers=with_key(JSON)).json()["run_id"]
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"thread_id": "conv_test", "message": "hello", "idempotency_key": KEY})
        resumed = ws.receive_json()
        assert resumed["event"] == RESUMED and resumed["data"]["run_id"] == run_id
        assert ws_until_end(ws)[-1]["event"] == METADATA
    assert len(upstream.calls) == 1


def test_cors_lets_a_browser_send_the_key(upstream: respx.MockRouter) -> None:
    with make_client(CORS_ALLOW_ORIGINS="https://app.example") as test_client:
        preflight = test_client.options("/chat", headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, idempotency-key"})
    assert preflight.status_code == 200, preflight.text
    assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()


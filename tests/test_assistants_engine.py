"""The Assistants engine behind the same public interface, against a respx-mocked Assistants API."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import httpx
import orjson
import pytest
import respx
from starlette.testclient import TestClient

from app import create_app
from assistant.assistants_engine import AssistantsEngine
from assistant.config import load_settings
from assistant.run_manager import RunManager
from assistant.tool_executor import ToolRegistry
from assistant.upstream import create_openai_client
from tests.test_chat_api import JSON, SSE, TOOLS, chat, events_of, parse_sse
from tests.test_chat_api import make_client as make_responses_client
from tests.upstream_mock import (
    ASSISTANT_ID,
    BASE_URL,
    THREAD,
    assistants_calls,
    assistants_sse,
    assistants_text,
    assistants_upstream,  # noqa: F401  (fixture)
    message_object,
    openai_error,
    request_body,
    run_object,
    sse_response,
    text_events,
)

RUNS = f"/threads/{THREAD}/runs"


def make_client(**env: str) -> TestClient:
    settings = load_settings({"OPENAI_API_KEY": "sk-test-secret-key", "OPENAI_BASE_URL": BASE_URL,
                              "ASSISTANT_ENGINE": "assistants", "OPENAI_ASSISTANT_ID": ASSISTANT_ID,
                              "SSE_HEARTBEAT_SECONDS": "0.05", "THREAD_LOCK_TIMEOUT_SECONDS": "2", **env})
    return TestClient(create_app(settings, tool_map=TOOLS), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as test_client:
        yield test_client


def text_of(events: list[dict]) -> str:
    return "".join(e["data"]["delta"]["content"] for e in events if e["event"] == "thread.message.delta")


def test_thread_creation(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    body = client.post("/threads").json()
    assert body["thread_id"] == THREAD


def test_json_reply_and_run_request(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    route = assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_text("run_1", "Hello there!")))
    response = chat(client, "hi", thread_id=THREAD)
    assert response.status_code == 200
    assert response.json()["responses"] == ["Hello there!"]
    sent = request_body(route.calls[0])
    assert sent["assistant_id"] == ASSISTANT_ID and sent["stream"] is True
    assert sent["additional_messages"] == [{"role": "user", "content": "hi"}]
    # The assistant's hosted tools are kept, and this service's functions added.
    assert sent["tools"][0] == {"type": "code_interpreter"}
    assert {t["function"]["name"] for t in sent["tools"][1:]} == set(TOOLS)
    assert sent["metadata"]["service_instance"]
    assert route.calls[0].request.headers["openai-beta"] == "assistants=v2"


def test_sse_reply_same_events_as_responses_engine(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_text("run_1", "Hello there!")))
    response = chat(client, "hi", headers=SSE, thread_id=THREAD)
    items = parse_sse(response.text)
    assert items[0] == {"retry": 5000}
    events = [i for i in items if "event" in i]
    names = [e["event"] for e in events]
    assert names[0] == "thread.run.created" and names[-3:] == ["thread.message.completed", "thread.run.completed", "metadata"]
    assert set(names) <= {"thread.run.created", "thread.message.delta", "thread.message.completed", "thread.run.completed", "metadata"}
    assert text_of(events) == "Hello there!"
    assert events[0]["data"]["run_id"].startswith("run_") and events[0]["data"]["thread_id"] == THREAD


def test_websocket_reply(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_text("run_1", "Over the socket")))
    with client.websocket_connect("/ws/chat") as ws:
        ws.send_json({"thread_id": THREAD, "message": "hi"})
        frames = [ws.receive_json()]
        while frames[-1]["event"] != "metadata":
            frames.append(ws.receive_json())
        assert "".join(f["data"]["delta"]["content"] for f in frames if f["event"] == "thread.message.delta") == "Over the socket"


def test_requires_action_with_two_parallel_calls(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls(
        "run_1", ("call_a", "slow_tool", '{"seconds": 0.2}'), ("call_b", "calculator", '{"a": 6, "b": 7, "op": "multiply"}'),
    )))
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=assistants_sse(assistants_text("run_1", "Slept; 42.", created=False))
    )
    started = time.monotonic()
    events = events_of(chat(client, "go", headers=SSE, thread_id=THREAD).text)
    names = [e["event"] for e in events]
    assert names.count("thread.run.step.created") == 2 and names.count("thread.run.step.completed") == 2
    steps = {e["data"]["step"]["id"]: e["data"]["step"] for e in events if e["event"] == "thread.run.step.completed"}
    assert steps["call_a"]["output"] == "slept" and steps["call_b"]["output"] == "42"
    assert text_of(events) == "Slept; 42." and names[-2] == "thread.run.completed"
    sent = request_body(submit.calls[0])
    assert sent["stream"] is True
    assert sent["tool_outputs"] == [{"tool_call_id": "call_a", "output": "slept"}, {"tool_call_id": "call_b", "output": "42"}]
    assert time.monotonic() - started < 2


def test_submit_failure_cancels_the_run(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(return_value=openai_error(500, "server error"))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "requires_action"))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    events = events_of(chat(client, "go", headers=SSE, thread_id=THREAD).text)
    assert events[-1]["event"] == "error"
    assert "cancelled" in events[-1]["data"]["error"] and events[-1]["data"]["type"] == "upstream_error"
    assert submit.call_count == 3  # _submit_tool_outputs_with_backoff: three attempts
    assert cancel.call_count == 1


def test_submit_refused_is_not_retried(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=openai_error(400, 'Runs in status "expired" do not accept tool outputs.'))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "expired"))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    response = chat(client, "go", thread_id=THREAD)
    assert response.status_code == 502
    assert submit.call_count == 1 and cancel.call_count == 0  # already terminal: nothing to cancel


def test_orphaned_active_run_is_cancelled_and_the_turn_goes_on(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    busy = openai_error(400, "Thread thread_test already has an active run run_orphan.")
    create = assistants_upstream.post(RUNS).mock(side_effect=[busy, assistants_sse(assistants_text("run_2", "fresh"))])
    states = iter(["requires_action", "requires_action", "cancelling", "cancelled"])
    assistants_upstream.get(f"{RUNS}/run_orphan").mock(side_effect=lambda request: httpx.Response(200, json=run_object("run_orphan", next(states, "cancelled"))))
    cancel = assistants_upstream.post(f"{RUNS}/run_orphan/cancel").respond(200, json=run_object("run_orphan", "cancelling"))
    response = chat(client, "hi", thread_id=THREAD)
    assert response.json()["responses"] == ["fresh"]
    assert cancel.call_count == 1 and create.call_count == 2


def test_active_run_of_another_instance_is_thread_busy(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post(RUNS).mock(return_value=openai_error(400, "Can't add messages to thread_test while a run run_other is active."))
    assistants_upstream.get(f"{RUNS}/run_other").respond(
        200, json=run_object("run_other", "in_progress", metadata={"service_instance": "another-process"}))
    cancel = assistants_upstream.post(f"{RUNS}/run_other/cancel").respond(200, json=run_object("run_other", "cancelling"))
    response = chat(client, "hi", thread_id=THREAD)
    assert response.status_code == 409 and response.json()["type"] == "thread_busy"
    assert cancel.call_count == 0


def test_active_run_of_a_live_turn_here_is_thread_busy(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    engine = client.app.state.runs.engine
    engine._live_runs.add("run_live")  # a turn of this process is driving run_live
    assistants_upstream.post(RUNS).mock(return_value=openai_error(400, "Thread thread_test already has an active run run_live."))
    response = chat(client, "hi", thread_id=THREAD)
    assert response.status_code == 409 and response.json()["type"] == "thread_busy"


@pytest.mark.parametrize(
    ("status", "extra", "type", "code"),
    [
        ("failed", {"last_error": {"code": "server_error", "message": "The model failed."}}, "run_failed", "server_error"),
        ("expired", {}, "run_expired", "expired"),
        ("incomplete", {"incomplete_details": {"reason": "max_completion_tokens"}}, "run_incomplete", "max_completion_tokens"),
    ],
)
def test_run_failed_expired_incomplete(client: TestClient, assistants_upstream: respx.MockRouter,
                                       status: str, extra: dict, type: str, code: str) -> None:
    events = [("thread.run.created", run_object("run_1", "queued")), (f"thread.run.{status}", run_object("run_1", status, **extra))]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events))
    streamed = events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)
    failed = next(e for e in streamed if e["event"] == "thread.run.failed")["data"]
    assert failed["type"] == type and failed["code"] == code
    assert streamed[-1]["event"] == "metadata"
    response = chat(client, "hi", thread_id=THREAD)
    assert response.status_code == 502 and response.json()["type"] == type


def test_hosted_tool_calls_are_shown_not_run(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    step = {"id": "step_1", "object": "thread.run.step", "run_id": "run_1", "type": "tool_calls", "status": "in_progress",
            "step_details": {"type": "tool_calls", "tool_calls": []}}
    call = {"index": 0, "id": "ci_1", "type": "code_interpreter", "code_interpreter": {"input": "print(6*7)", "outputs": []}}
    done_call = {**call, "code_interpreter": {"input": "print(6*7)", "outputs": [{"type": "logs", "logs": "42"}]}}
    events = [
        ("thread.run.created", run_object("run_1", "queued")),
        ("thread.run.step.created", step),
        ("thread.run.step.delta", {"id": "step_1", "object": "thread.run.step.delta", "run_id": "run_1",
                                   "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}}),
        ("thread.run.step.completed", {**step, "status": "completed", "step_details": {"type": "tool_calls", "tool_calls": [done_call]}}),
        *assistants_text("run_1", "It printed 42.", created=False),
    ]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events))
    streamed = events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)
    created = [e["data"]["step"] for e in streamed if e["event"] == "thread.run.step.created"]
    completed = [e["data"]["step"] for e in streamed if e["event"] == "thread.run.step.completed"]
    assert [s["name"] for s in created] == ["code_interpreter"] and created[0]["show_input"] is False
    assert completed[0]["output"] == "42"
    assert text_of(streamed) == "It printed 42."


def test_cut_stream_at_requires_action_is_recovered_from_the_run(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    # The stream breaks off before requires_action arrives; the run, read back, is waiting for outputs.
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", "{}"))[:2], done=False))
    required = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "calculator", "arguments": '{"a": 2, "b": 2, "op": "add"}'}}]}}
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "requires_action", required_action=required))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": []})
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=assistants_sse(assistants_text("run_1", "Four.", created=False)))
    assert chat(client, "2+2", thread_id=THREAD).json()["responses"] == ["Four."]
    assert orjson.loads(submit.calls[0].request.content)["tool_outputs"] == [{"tool_call_id": "call_a", "output": "4"}]


def test_cut_stream_of_a_finished_run_reads_its_messages(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    events = assistants_text("run_1", "Complete answer")
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events[:3], done=False))  # cut after message.created
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "completed"))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "data": [
        {"id": "step_1", "object": "thread.run.step", "type": "message_creation", "status": "completed", "run_id": "run_1",
         "step_details": {"type": "message_creation", "message_creation": {"message_id": "msg_full"}}}], "has_more": False})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_full").respond(
        200, json={"id": "msg_full", "object": "thread.message", "role": "assistant", "thread_id": THREAD,
                   "content": [{"type": "text", "text": {"value": "Complete answer", "annotations": []}}]})
    assert chat(client, "hi", thread_id=THREAD).json()["responses"] == ["Complete answer"]


def test_cut_stream_of_a_running_run_cancels_it(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    events = assistants_text("run_1", "never finished")
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events[:4], done=False))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "in_progress"))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    streamed = events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)
    assert streamed[-1]["event"] == "error" and streamed[-1]["data"]["type"] == "upstream_error"
    assert cancel.call_count == 1


def test_refusal_is_the_answer(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    refusal = "I can't help with that."
    message = {**message_object("msg_r", "", "run_1"), "content": [{"type": "refusal", "refusal": refusal}]}
    delta = {"id": "msg_r", "object": "thread.message.delta",
             "delta": {"content": [{"index": 0, "type": "refusal", "refusal": refusal}]}}
    events = [("thread.run.created", run_object("run_1", "queued")),
              ("thread.run.in_progress", run_object("run_1", "in_progress")),
              ("thread.message.created", {**message, "status": "in_progress", "content": []}),
              ("thread.message.delta", delta),
              ("thread.message.completed", message),
              ("thread.run.completed", run_object("run_1", "completed"))]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events))
    assert text_of(events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)) == refusal
    assert chat(client, "hi", thread_id=THREAD).json()["responses"] == [refusal]


def test_an_error_event_cancels_the_run_so_the_thread_takes_the_next_message(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    events = [("thread.run.created", run_object("run_1", "queued")),
              ("thread.run.in_progress", run_object("run_1", "in_progress")),
              ("error", {"code": "server_error", "message": "Sorry, something went wrong."})]
    create = assistants_upstream.post(RUNS).mock(side_effect=[assistants_sse(events, done=False),
                                                               assistants_sse(assistants_text("run_2", "fresh"))])
    states = iter(["in_progress"])
    assistants_upstream.get(f"{RUNS}/run_1").mock(
        side_effect=lambda request: httpx.Response(200, json=run_object("run_1", next(states, "cancelled"))))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    first = events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)
    assert [e["event"] for e in first][-2:] == ["thread.run.failed", "metadata"]
    assert cancel.call_count == 1  # the run the error broke off no longer holds the thread
    assert chat(client, "again", thread_id=THREAD).json()["responses"] == ["fresh"]
    assert create.call_count == 2


@pytest.mark.parametrize("then", ["completed", "requires_action"])
def test_a_failed_submit_that_went_in_follows_the_run(
    client: TestClient, assistants_upstream: respx.MockRouter, then: str
) -> None:
    """A 5xx on submit_tool_outputs that the upstream processed anyway: the run went on, so the
    outputs are not sent again and the run is not cancelled; it is read back to its next stop."""
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(side_effect=[
        openai_error(502, "bad gateway"), assistants_sse(assistants_text("run_1", "3.", created=False))])
    asked_again = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [
        {"id": "call_b", "type": "function", "function": {"name": "calculator", "arguments": '{"a": 3, "b": 1, "op": "add"}'}}]}}
    last = run_object("run_1", "requires_action", required_action=asked_again) if then == "requires_action" \
        else run_object("run_1", "completed")
    states = iter([run_object("run_1", "in_progress")])
    assistants_upstream.get(f"{RUNS}/run_1").mock(side_effect=lambda request: httpx.Response(200, json=next(states, last)))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": [
        {"id": "step_1", "object": "thread.run.step", "run_id": "run_1", "type": "message_creation", "status": "completed",
         "step_details": {"type": "message_creation", "message_creation": {"message_id": "msg_done"}}}]})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_done").respond(200, json=message_object("msg_done", "It is 3.", "run_1"))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    answer = chat(client, "go", thread_id=THREAD).json()
    assert cancel.call_count == 0
    if then == "completed":
        assert answer["responses"] == ["It is 3."] and submit.call_count == 1
    else:  # the run wrote a message, asked for another call, whose output went in (the second submit): it answered
        assert answer["responses"] == ["It is 3.", "3."] and submit.call_count == 2
        assert [o["tool_call_id"] for o in request_body(submit.calls[1])["tool_outputs"]] == ["call_b"]


def test_reading_a_run_back_does_not_show_an_earlier_rounds_message_again(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    """Round 1 says "Let me add." and calls a tool; its outputs go in despite a 502, so the run
    is read back to its end: every message of the run is listed, and only the new one is shown."""
    tool_calls = [{"id": "call_a", "type": "function",
                   "function": {"name": "calculator", "arguments": '{"a": 1, "b": 2, "op": "add"}'}}]
    required = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": tool_calls}}
    first_round = [("thread.run.created", run_object("run_1", "queued")),
                   ("thread.run.in_progress", run_object("run_1", "in_progress")),
                   ("thread.message.created", {**message_object("msg_pre", "", "run_1"), "status": "in_progress", "content": []}),
                   ("thread.message.completed", message_object("msg_pre", "Let me add.", "run_1")),
                   ("thread.run.requires_action", run_object("run_1", "requires_action", required_action=required))]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(first_round))
    assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(return_value=openai_error(502, "bad gateway"))
    states = iter([run_object("run_1", "in_progress")])
    assistants_upstream.get(f"{RUNS}/run_1").mock(
        side_effect=lambda request: httpx.Response(200, json=next(states, run_object("run_1", "completed"))))

    def message_step(step_id: str, message_id: str) -> dict[str, object]:
        return {"id": step_id, "object": "thread.run.step", "run_id": "run_1", "type": "message_creation",
                "status": "completed",
                "step_details": {"type": "message_creation", "message_creation": {"message_id": message_id}}}

    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": [
        message_step("step_0", "msg_pre"), message_step("step_1", "msg_done")]})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_pre").respond(200, json=message_object("msg_pre", "Let me add.", "run_1"))
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_done").respond(200, json=message_object("msg_done", "It is 3.", "run_1"))
    assert chat(client, "go", thread_id=THREAD).json()["responses"] == ["Let me add.", "It is 3."]


def test_engine_configuration_errors() -> None:
    from assistant.config import ConfigError

    with pytest.raises(ConfigError, match="OPENAI_ASSISTANT_ID"):
        load_settings({"OPENAI_API_KEY": "k", "ASSISTANT_ENGINE": "assistants"})
    with pytest.raises(ConfigError, match="ASSISTANT_ENGINE"):
        load_settings({"OPENAI_API_KEY": "k", "ASSISTANT_ENGINE": "chat"})


def test_unknown_thread_is_404(client: TestClient, assistants_upstream: respx.MockRouter) -> None:
    assistants_upstream.post("/threads/thread_nope/runs").mock(return_value=openai_error(404, "No thread found with id 'thread_nope'."))
    for headers in (JSON, SSE):
        response = chat(client, "hi", headers=headers, thread_id="thread_nope")
        assert response.status_code == 404 and response.json()["type"] == "thread_not_found"


# --------------------------------------------------------------------------------------------
# Found by a conformance review against the Assistants API's streaming behaviour


def _required(*calls: tuple[str, str, str]) -> dict:
    return {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": args}} for cid, name, args in calls]}}


def _message_step(step_id: str, message_id: str) -> dict:
    return {"id": step_id, "object": "thread.run.step", "run_id": "run_1", "type": "message_creation",
            "status": "completed", "step_details": {"type": "message_creation", "message_creation": {"message_id": message_id}}}


def _tool_step(step_id: str, call_id: str) -> dict:
    return {"id": step_id, "object": "thread.run.step", "run_id": "run_1", "type": "tool_calls", "status": "completed",
            "step_details": {"type": "tool_calls", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": "{}", "output": "4"}}]}}


# A round read back at requires_action keeps the message the run wrote before its tool call.
def test_cut_stream_at_requires_action_keeps_the_message_written_before_the_call(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    cut = [("thread.run.created", run_object("run_1", "queued")),
           ("thread.run.in_progress", run_object("run_1", "in_progress")),
           ("thread.message.created", {**message_object("msg_pre", "", "run_1"), "status": "in_progress", "content": []}),
           ("thread.message.delta", {"id": "msg_pre", "object": "thread.message.delta", "delta": {"content": [
               {"index": 0, "type": "text", "text": {"value": "Let me ", "annotations": []}}]}})]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(cut, done=False))  # the stream breaks off
    call = ("call_a", "calculator", '{"a": 2, "b": 2, "op": "add"}')
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "requires_action", required_action=_required(call)))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": [
        _message_step("step_1", "msg_pre"),
        {**_tool_step("step_2", "call_a"), "status": "in_progress"}]})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_pre").respond(200, json=message_object("msg_pre", "Let me add.", "run_1"))
    assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=assistants_sse(assistants_text("run_1", "Four.", created=False)))
    # The upstream thread now holds both messages of the run; the client must get both.
    assert chat(client, "2+2", thread_id=THREAD).json()["responses"] == ["Let me add.", "Four."]


# Reading a finished run back reads every page of its steps (the API's default page is 20).
def test_read_back_of_a_long_run_reads_every_page_of_its_steps(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(
        [("thread.run.created", run_object("run_1", "queued")), ("thread.run.in_progress", run_object("run_1", "in_progress"))],
        done=False))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "completed"))
    first_page = [_tool_step(f"step_{n:02d}", f"call_{n}") for n in range(1, 21)]  # the API's default page: 20

    def steps(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("after") == "step_20":
            return httpx.Response(200, json={"object": "list", "has_more": False, "first_id": "step_21", "last_id": "step_21",
                                             "data": [_message_step("step_21", "msg_final")]})
        return httpx.Response(200, json={"object": "list", "has_more": True, "first_id": "step_01", "last_id": "step_20",
                                         "data": first_page})

    assistants_upstream.get(f"{RUNS}/run_1/steps").mock(side_effect=steps)
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_final").respond(200, json=message_object("msg_final", "Final answer", "run_1"))
    assert chat(client, "hi", thread_id=THREAD).json()["responses"] == ["Final answer"]


# submit_tool_outputs refused (400) because the run expired: the client gets the run's real outcome.
def test_submit_refused_because_the_run_expired_is_reported_as_run_expired(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=openai_error(400, 'Runs in status "expired" do not accept tool outputs.'))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "expired"))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": []})
    events = events_of(chat(client, "go", headers=SSE, thread_id=THREAD).text)
    names = [e["event"] for e in events]
    # As when the stream itself says thread.run.expired: thread.run.failed {type: run_expired}, then metadata.
    assert names[-2:] == ["thread.run.failed", "metadata"], events[-1]
    assert events[-2]["data"]["type"] == "run_expired"
    response = chat(client, "go", thread_id=THREAD)
    assert response.status_code == 502 and response.json()["type"] == "run_expired"


# A retried submit refused because the first (5xx) attempt went in after all: the run that
# took the outputs is followed, not cancelled.
def test_retried_submit_refused_because_the_first_attempt_went_in_does_not_cancel_the_run(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    submit = assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(side_effect=[
        openai_error(504, "gateway timeout"),  # the upstream processed it anyway, a moment later
        openai_error(400, 'Runs in status "in_progress" do not accept tool outputs.'),
    ])
    states = iter([run_object("run_1", "requires_action", required_action=_required(("call_a", "calculator", "{}"))),
                   run_object("run_1", "in_progress")])
    assistants_upstream.get(f"{RUNS}/run_1").mock(side_effect=lambda request: httpx.Response(200, json=next(states, run_object("run_1", "completed"))))
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": [
        _message_step("step_1", "msg_done")]})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_done").respond(200, json=message_object("msg_done", "It is 3.", "run_1"))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    response = chat(client, "go", thread_id=THREAD)
    assert cancel.call_count == 0  # the run took the outputs and answered: it must not be cancelled
    assert submit.call_count == 2
    assert response.status_code == 200 and response.json()["responses"] == ["It is 3."]


# thread.message.incomplete (a message cut short: max tokens, the run cancelled or failed) ends
# the message for the client, as the Responses engine does.
def test_incomplete_message_ends_as_with_the_responses_engine() -> None:
    # The Responses engine: the message item is done with status "incomplete", then response.incomplete.
    events = text_events("You are")
    *head, _text_done, item_done, completed = events
    item = {**item_done["item"], "status": "incomplete"}
    responses_stream = [*head, {**item_done, "item": item},
                        {**completed, "type": "response.incomplete",
                         "response": {**completed["response"], "status": "incomplete",
                                      "incomplete_details": {"reason": "max_output_tokens"}}}]
    with respx.mock(base_url=BASE_URL, using="httpx", assert_all_mocked=True, assert_all_called=False) as router:
        router.post("/responses").mock(return_value=sse_response(responses_stream))
        with make_responses_client(SSE_HEARTBEAT_SECONDS="0.05") as responses_client:
            via_responses = [e["event"] for e in events_of(chat(responses_client, "hi", headers=SSE).text)]

    # The Assistants engine: the same turn as the Assistants API streams it.
    message = {**message_object("msg_1", "You are", "run_1"), "status": "incomplete",
               "incomplete_details": {"reason": "max_tokens"}}
    assistants_stream = [
        ("thread.run.created", run_object("run_1", "queued")),
        ("thread.run.in_progress", run_object("run_1", "in_progress")),
        ("thread.message.created", {**message, "status": "in_progress", "content": []}),
        ("thread.message.delta", {"id": "msg_1", "object": "thread.message.delta", "delta": {"content": [
            {"index": 0, "type": "text", "text": {"value": "You are", "annotations": []}}]}}),
        ("thread.message.incomplete", message),
        ("thread.run.incomplete", run_object("run_1", "incomplete", incomplete_details={"reason": "max_completion_tokens"})),
    ]
    with respx.mock(base_url=BASE_URL, using="httpx", assert_all_mocked=True, assert_all_called=False) as router:
        router.get("/assistants/asst_test").respond(200, json={"id": "asst_test", "object": "assistant", "model": "m", "tools": []})
        router.post(RUNS).mock(return_value=assistants_sse(assistants_stream))
        with make_client() as assistants_client:
            via_assistants = [e["event"] for e in events_of(chat(assistants_client, "hi", headers=SSE, thread_id=THREAD).text)]

    def shape(names: list[str]) -> list[str]:  # the number of deltas does not matter
        return [n for i, n in enumerate(names) if n != "thread.message.delta" or names[i - 1] != n]

    assert shape(via_responses) == ["thread.run.created", "thread.message.delta", "thread.message.completed",
                                    "thread.run.failed", "metadata"]
    assert shape(via_assistants) == shape(via_responses)


# A round finished by reading the run back: a hosted tool step the client saw start ends too.
def test_read_back_ends_the_hosted_step_the_cut_stream_started(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    step = {"id": "step_1", "object": "thread.run.step", "run_id": "run_1", "type": "tool_calls", "status": "in_progress",
            "step_details": {"type": "tool_calls", "tool_calls": []}}
    call = {"index": 0, "id": "ci_1", "type": "code_interpreter", "code_interpreter": {"input": "print(6*7)", "outputs": []}}
    cut = [("thread.run.created", run_object("run_1", "queued")),
           ("thread.run.in_progress", run_object("run_1", "in_progress")),
           ("thread.run.step.created", step),
           ("thread.run.step.delta", {"id": "step_1", "object": "thread.run.step.delta",
                                      "delta": {"step_details": {"type": "tool_calls", "tool_calls": [call]}}})]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(cut, done=False))  # breaks off mid-step
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "completed"))
    done_call = {"id": "ci_1", "type": "code_interpreter",
                 "code_interpreter": {"input": "print(6*7)", "outputs": [{"type": "logs", "logs": "42"}]}}
    assistants_upstream.get(f"{RUNS}/run_1/steps").respond(200, json={"object": "list", "has_more": False, "data": [
        {**step, "status": "completed", "step_details": {"type": "tool_calls", "tool_calls": [done_call]}},
        _message_step("step_2", "msg_done")]})
    assistants_upstream.get(f"/threads/{THREAD}/messages/msg_done").respond(200, json=message_object("msg_done", "It printed 42.", "run_1"))
    events = events_of(chat(client, "hi", headers=SSE, thread_id=THREAD).text)
    names = [e["event"] for e in events]
    assert names[-2:] == ["thread.run.completed", "metadata"]
    started = {e["data"]["step"]["id"] for e in events if e["event"] == "thread.run.step.created"}
    ended = {e["data"]["step"]["id"] for e in events if e["event"] == "thread.run.step.completed"}
    assert started == {"ci_1"}
    assert ended == started  # README: "every step that starts ends"


# A tool-outputs round that breaks before its first thread.run.* event (its parser never learns
# the run id): the run is still cancelled and forgotten, so it does not hold the thread.
@pytest.mark.parametrize("broken", ["error_event", "cut"])
def test_submit_stream_broken_before_its_first_run_event_cancels_the_run(
    client: TestClient, assistants_upstream: respx.MockRouter, broken: str
) -> None:
    assistants_upstream.post(RUNS).mock(side_effect=[
        assistants_sse(assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))),
        openai_error(400, "Thread thread_test already has an active run run_1."),
        assistants_sse(assistants_text("run_2", "fresh")),
    ])
    error = ("error", {"code": "server_error", "message": "Sorry, something went wrong.", "param": None, "type": "server_error"})
    assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(
        return_value=assistants_sse([error] if broken == "error_event" else [], done=False))
    cancelled = []
    assistants_upstream.get(f"{RUNS}/run_1").mock(side_effect=lambda request: httpx.Response(
        200, json=run_object("run_1", "cancelled" if cancelled else "in_progress")))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").mock(
        side_effect=lambda request: cancelled.append(1) or httpx.Response(200, json=run_object("run_1", "cancelling")))
    first = events_of(chat(client, "go", headers=SSE, thread_id=THREAD).text)
    assert first[-1]["event"] == ("metadata" if broken == "error_event" else "error")
    second = chat(client, "again", thread_id=THREAD)
    assert (second.status_code, second.json().get("type")) == (200, None), second.json()
    assert cancel.call_count == 1  # the run the error broke off no longer holds the thread


# A turn cancelled (POST /runs/{id}/cancel) while its run is being created: the run the upstream
# created is found by its marker and cancelled, so it does not go on generating.
@pytest.mark.anyio
async def test_cancel_while_the_run_is_being_created_cancels_the_upstream_run(assistants_upstream: respx.MockRouter) -> None:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": BASE_URL, "ASSISTANT_ENGINE": "assistants",
                              "OPENAI_ASSISTANT_ID": ASSISTANT_ID})
    received = anyio.Event()
    created: dict = {}

    async def create(request: httpx.Request) -> httpx.Response:
        created["run"] = run_object("run_1", "queued", metadata=orjson.loads(request.content)["metadata"])
        received.set()  # the upstream has the run now; its answer is on its way
        await anyio.sleep(30)
        return assistants_sse(assistants_text("run_1", "never read"))

    assistants_upstream.post(RUNS).mock(side_effect=create)
    assistants_upstream.get(RUNS).mock(side_effect=lambda request: httpx.Response(
        200, json={"object": "list", "has_more": False, "data": [created["run"]]}))
    assistants_upstream.get(f"{RUNS}/run_1").mock(side_effect=lambda request: httpx.Response(200, json=created["run"]))
    cancel = assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    engine = AssistantsEngine(create_openai_client(settings), settings, ToolRegistry(TOOLS, timeout=1))
    async with RunManager(engine, ToolRegistry(TOOLS, timeout=1), settings) as runs:
        log = await runs.start_run(THREAD, "hi", "corr")
        with anyio.fail_after(5):
            await received.wait()
            assert runs.cancel(log.run_id, "cancelled by the client") is True
            await log.wait_finished()
    assert [e.name for e in log.events()][-2:] == ["thread.run.cancelled", "metadata"]
    assert cancel.call_count == 1  # "stop generating": the run it started must not go on upstream


# A run cancelled upstream (by anyone but this service's POST /runs/{id}/cancel): the JSON
# answer is one the README's error table lists (run_cancelled is a 409).
def test_run_cancelled_upstream_answers_with_a_documented_status(
    client: TestClient, assistants_upstream: respx.MockRouter
) -> None:
    events = [("thread.run.created", run_object("run_1", "queued")),
              ("thread.run.in_progress", run_object("run_1", "in_progress")),
              ("thread.run.cancelling", run_object("run_1", "cancelling")),
              ("thread.run.cancelled", run_object("run_1", "cancelled"))]
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events))
    response = chat(client, "hi", thread_id=THREAD)
    documented = {409: {"thread_busy", "run_finished", "run_cancelled"},
                  502: {"upstream_error", "upstream_rate_limited", "run_failed", "run_incomplete", "run_expired",
                        "tool_rounds_exceeded"}}
    assert response.json()["type"] in documented.get(response.status_code, set()), (response.status_code, response.json())


# Reading a run back after a broken stream: an upstream failure of that read (runs.steps.list,
# messages.retrieve) is an upstream error (502), not a service bug (500).
def test_an_upstream_failure_while_reading_a_run_back_is_an_upstream_error(
    assistants_upstream: respx.MockRouter,
) -> None:
    events = assistants_text("run_1", "Complete answer")
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(events[:3], done=False))  # cut after message.created
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "completed"))
    assistants_upstream.get(f"{RUNS}/run_1/steps").mock(return_value=openai_error(500, "server error"))
    with make_client(UPSTREAM_MAX_RETRIES="0") as test_client:
        response = chat(test_client, "hi", thread_id=THREAD)
        assert (response.status_code, response.json()["type"]) == (502, "upstream_error")


# --------------------------------------------------------------------------------------------
# Found by a review of the README's contract: the same failure answers as on the Responses engine


def tool_round_then_submit(assistants_upstream: respx.MockRouter, **submit: object) -> respx.Route:
    """A run asks for a calculator call; submitting its output answers as `submit` says."""
    assistants_upstream.post(RUNS).mock(return_value=assistants_sse(
        assistants_calls("run_1", ("call_a", "calculator", '{"a": 1, "b": 2, "op": "add"}'))))
    assistants_upstream.get(f"{RUNS}/run_1").respond(200, json=run_object("run_1", "requires_action"))
    assistants_upstream.post(f"{RUNS}/run_1/cancel").respond(200, json=run_object("run_1", "cancelling"))
    return assistants_upstream.post(f"{RUNS}/run_1/submit_tool_outputs").mock(**submit)


def test_a_rate_limited_submit_is_upstream_rate_limited(assistants_upstream: respx.MockRouter) -> None:
    tool_round_then_submit(assistants_upstream, return_value=openai_error(429, "slow down", headers={"retry-after-ms": "10"}))
    with make_client() as client:
        response = chat(client, "go", thread_id=THREAD)
    assert (response.status_code, response.json()["type"], response.headers.get("retry-after")) == (
        502, "upstream_rate_limited", "1")


def test_a_submit_asked_to_wait_longer_than_a_request_should_is_not_waited_for(
    assistants_upstream: respx.MockRouter,
) -> None:
    submit = tool_round_then_submit(assistants_upstream, return_value=openai_error(429, "slow down", headers={"retry-after": "60"}))
    started = time.monotonic()
    with make_client() as client:
        response = chat(client, "go", thread_id=THREAD)
    assert time.monotonic() - started < 10 and submit.call_count == 1
    assert (response.json()["type"], response.headers.get("retry-after")) == ("upstream_rate_limited", "60")


def test_a_submit_that_times_out_is_upstream_timeout(assistants_upstream: respx.MockRouter) -> None:
    tool_round_then_submit(assistants_upstream, side_effect=httpx.ReadTimeout("silent"))
    with make_client() as client:
        response = chat(client, "go", thread_id=THREAD)
    assert (response.status_code, response.json()["type"]) == (504, "upstream_timeout")


def test_a_failed_read_of_a_run_that_took_its_outputs_is_an_upstream_error(assistants_upstream: respx.MockRouter) -> None:
    tool_round_then_submit(assistants_upstream, return_value=openai_error(500, "server error"))
    # The first read (did the outputs go in?) says the run went on; reading it on then fails.
    assistants_upstream.get(f"{RUNS}/run_1").mock(side_effect=[
        httpx.Response(200, json=run_object("run_1", "in_progress")),
        openai_error(500, "server error"), openai_error(500, "server error"),
        httpx.Response(200, json=run_object("run_1", "in_progress")),  # before cancelling it
    ])
    with make_client(UPSTREAM_MAX_RETRIES="0") as client:
        response = chat(client, "go", thread_id=THREAD)
    assert (response.status_code, response.json()["type"]) == (502, "upstream_error")

"""End-to-end tests of the Assistants engine (ASSISTANT_ENGINE=assistants, OPENAI_ASSISTANT_ID=asst_e2e).

The real service under hypercorn, in front of the fake OpenAI's Assistants API (threads, runs,
tool-output submission, cancel, `tool:` / `hosted:` / `fault:` directives), over real sockets:
httpx for JSON and streamed SSE, `websockets` for the WebSocket. Clients must see exactly what
they see with the default engine (same endpoints, events, JSON answers); on top of that these
tests check, through the fake's `/_fake/threads/{id}` and `/_fake/requests`, what the service
did upstream: which runs it created, which tool outputs it submitted, which runs it cancelled.

The fake's assistants (`GET /v1/assistants/{id}`) have a code interpreter as their own hosted
tool, which the engine keeps beside the service's functions in every run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import fixtures_dir
from tests.e2e import ServerProcess, clean_environment, running_service
# pytest finds fixtures among the module's names: this one is used by name (autouse), not referenced.
from tests.e2e import dump_server_logs_on_failure  # noqa: F401
from tests.test_e2e import (
    DELTA,
    ERROR,
    MESSAGE_COMPLETED,
    METADATA,
    MULTILINE,
    RUN_COMPLETED,
    RUN_CREATED,
    RUN_FAILED,
    STEP_COMPLETED,
    STEP_CREATED,
    SSEParser,
    SSEResult,
    assert_json_error,
    assert_thread_usable,
    chat_json,
    check_framing,
    check_ws_turn,
    http_client,
    new_thread,
    sse_chat,
    ws_connect,
    ws_turn_frames,
)

pytestmark = pytest.mark.timeout(30)

ASSISTANT_ID = "asst_e2e"
ASSISTANT_TOOLS = [{"type": "code_interpreter"}]  # the fake assistant's own (hosted) tools
E2E_TOOLS = {"calculator", "get_weather", "slow_tool", "failing_tool", "sync_sleep"}  # tests.e2e_tools
API_KEY = "sk-e2e-not-a-real-key"  # what start_service gives the service
BETA = {"Authorization": f"Bearer {API_KEY}", "OpenAI-Beta": "assistants=v2"}
ACTIVE = {"queued", "in_progress", "requires_action", "cancelling"}
CANCEL_DELAY = 0.1  # FAKE_CANCEL_DELAY: cancelling -> cancelled
SLOW_TURN = "fault:slow 0.2 20"  # twenty deltas 0.2 s apart: a turn of about 4 s
SLOW_TURN_REPLY = " ".join(f"word{n}" for n in range(20))
SHORT_SLOW_TURN = "fault:slow 0.1 20"  # about 2 s
TWO_CALLS = 'tool:calculator {"a": 6, "b": 7, "op": "multiply"}\ntool:get_weather {"city": "Paris"}'


# ---------------------------------------------------------------------------------------------
# Fixtures: one fake, the service, and a second service that gives up on a busy thread after 0.5 s

ENGINE = {
    "ASSISTANT_ENGINE": "assistants",
    "OPENAI_ASSISTANT_ID": ASSISTANT_ID,
    # start_service's 1 s would race `tool:slow_tool {"seconds": 1}` (no tool timeouts are tested here).
    "TOOL_TIMEOUT_SECONDS": "3",
}


@pytest.fixture(scope="module")
def fake_assistants_api() -> Iterator[ServerProcess]:
    env = clean_environment(
        FIXTURES_DIR=str(fixtures_dir()),
        FAKE_ABANDONED_RUN_SECONDS="300",  # a run left in_progress stays active for the whole module
        FAKE_CANCEL_DELAY=str(CANCEL_DELAY),
    )
    with ServerProcess("tests.fake_openai:app", env, health_path="/_fake/health", name="fake-openai-assistants") as fake:
        yield fake


@pytest.fixture(scope="module")
def assistants_service(fake_assistants_api: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(fake_assistants_api.url, name="assistants-service", **ENGINE) as server:
        yield server


@pytest.fixture(scope="module")
def impatient_assistants_service(fake_assistants_api: ServerProcess) -> Iterator[ServerProcess]:
    with running_service(
        fake_assistants_api.url, name="impatient-assistants-service", THREAD_LOCK_TIMEOUT_SECONDS="0.5",
        SSE_HEARTBEAT_SECONDS="1",  # longer than the wait: a refused stream is a plain 409
        **ENGINE
    ) as server:
        yield server


# ---------------------------------------------------------------------------------------------
# What the fake holds


async def fake_thread(client: httpx.AsyncClient, fake: ServerProcess, thread_id: str) -> dict[str, Any]:
    """The thread as the fake has it: thread, messages, runs (oldest first), steps, active_run."""
    response = await client.get(f"{fake.url}/_fake/threads/{thread_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def fake_requests(client: httpx.AsyncClient, fake: ServerProcess, thread_id: str) -> list[dict[str, Any]]:
    """The requests the fake got about one thread, in order."""
    response = await client.get(f"{fake.url}/_fake/requests")
    assert response.status_code == 200
    prefix = f"/v1/threads/{thread_id}/"
    return [r for r in response.json() if r["path"].startswith(prefix)]


def run_creations(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in requests if r["method"] == "POST" and r["path"].endswith("/runs")]


def submissions(requests: list[dict[str, Any]], run_id: str | None = None) -> list[dict[str, Any]]:
    return [r for r in requests if r["path"].endswith("/submit_tool_outputs") and (run_id is None or f"/runs/{run_id}/" in r["path"])]


def cancels(requests: list[dict[str, Any]]) -> list[str]:
    """The upstream run ids the service asked to cancel."""
    return [r["path"].split("/runs/")[1].split("/")[0] for r in requests if r["path"].endswith("/cancel")]


def message_texts(state: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], "".join(p["text"]["value"] for p in m["content"] if p.get("type") == "text")) for m in state["messages"]]


async def wait_for_run(
    client: httpx.AsyncClient, fake: ServerProcess, thread_id: str, statuses: set[str], *, timeout: float = 10.0
) -> dict[str, Any]:
    """The thread's newest run, once it is in one of `statuses`."""
    with anyio.fail_after(timeout):
        while True:
            runs = (await fake_thread(client, fake, thread_id))["runs"]
            if runs and runs[-1]["status"] in statuses:
                return runs[-1]
            await anyio.sleep(0.02)


async def wait_for_status(
    client: httpx.AsyncClient, fake: ServerProcess, thread_id: str, run_id: str, status: str, *, timeout: float = 5.0
) -> None:
    with anyio.fail_after(timeout):
        while True:
            runs = {r["id"]: r for r in (await fake_thread(client, fake, thread_id))["runs"]}
            if runs[run_id]["status"] == status:
                return
            await anyio.sleep(0.02)


async def sse_until(
    client: httpx.AsyncClient, base: str, thread_id: str, message: str, stop_at: str, *, timeout: float = 10.0
) -> list[str]:
    """Stream a turn and hang up as soon as the event `stop_at` arrives; the event names seen."""
    parser, names = SSEParser(), []
    with anyio.fail_after(timeout):
        async with client.stream(
            "POST", f"{base}/chat", headers={"Accept": "text/event-stream"},
            json={"thread_id": thread_id, "message": message},
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                names += [i.name for i in parser.feed(chunk, time.monotonic()) if i.kind == "event"]
                if stop_at in names:
                    return names
    raise AssertionError(f"the stream ended before {stop_at}: {names}")


def check_reply(result: SSEResult, thread_id: str, reply: str) -> str:
    """A plain text turn: framing, then created -> deltas -> message.completed -> run.completed -> metadata."""
    run_id = check_framing(result)
    names = result.names
    assert names[0] == RUN_CREATED and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA], names
    assert names[1:-3] and set(names[1:-3]) == {DELTA}, names
    created = result.one(RUN_CREATED)
    assert created["thread_id"] == thread_id and created["run_id"] == run_id
    completed = result.one(RUN_COMPLETED)
    assert completed["thread_id"] == thread_id and completed["run_id"] == run_id
    assert result.text == reply == result.replies[0]
    message = result.one(MESSAGE_COMPLETED)["message"]
    assert message["author"] == "assistant" and message["id"]
    assert result.one(METADATA)["thread_id"] == thread_id
    return run_id


# ---------------------------------------------------------------------------------------------
# 1. Threads and plain replies: JSON, SSE, WebSocket


@pytest.mark.anyio
async def test_threads_are_assistants_threads(assistants_service: ServerProcess, fake_assistants_api: ServerProcess) -> None:
    async with http_client() as client:
        created = await client.post(f"{assistants_service.url}/threads")
        started = await client.get(f"{assistants_service.url}/start")
        ids = []
        for response in (created, started):
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"thread_id", "initial_message", "correlation_id"}
            assert body["thread_id"].startswith("thread_")
            assert body["initial_message"] == "Hello! Ask me anything."
            assert body["correlation_id"] == response.headers["x-correlation-id"]
            ids.append(body["thread_id"])
            state = await fake_thread(client, fake_assistants_api, body["thread_id"])
            assert state["messages"] == [] and state["runs"] == []
    assert ids[0] != ids[1]


@pytest.mark.anyio
async def test_json_reply_and_the_run_behind_it(assistants_service: ServerProcess, fake_assistants_api: ServerProcess) -> None:
    base = assistants_service.url
    async with http_client(headers={"X-Correlation-ID": "asst-json-1"}) as client:
        thread_id = await new_thread(client, base)
        first = await chat_json(client, base, thread_id, "hello there")
        second = await chat_json(client, base, thread_id, "and again — ünïcödé 👋")
        state = await fake_thread(client, fake_assistants_api, thread_id)
        requests = await fake_requests(client, fake_assistants_api, thread_id)
    assert first.status_code == 200, first.text
    body = first.json()
    assert set(body) == {"responses", "thread_id", "run_id", "correlation_id"}
    assert body["responses"] == ["You said: hello there"]
    assert body["thread_id"] == thread_id and body["run_id"].startswith("run_")
    assert body["correlation_id"] == "asst-json-1" == first.headers["x-correlation-id"]
    assert second.status_code == 200, second.text
    assert second.json()["responses"] == ["You said: and again — ünïcödé 👋"]
    assert second.json()["run_id"] != body["run_id"]

    # Upstream: one streamed run per message, the user's message added by the run itself.
    assert message_texts(state) == [
        ("user", "hello there"), ("assistant", "You said: hello there"),
        ("user", "and again — ünïcödé 👋"), ("assistant", "You said: and again — ünïcödé 👋"),
    ]
    assert [r["status"] for r in state["runs"]] == ["completed", "completed"] and state["active_run"] is None
    creations = run_creations(requests)
    assert len(creations) == 2 and cancels(requests) == []
    sent = creations[0]["body"]
    assert creations[0]["headers"]["openai-beta"] == "assistants=v2"
    assert sent["assistant_id"] == ASSISTANT_ID and sent["stream"] is True
    assert sent["additional_messages"] == [{"role": "user", "content": "hello there"}]
    # The assistant's hosted tools are kept, and the service's functions added.
    assert sent["tools"][: len(ASSISTANT_TOOLS)] == ASSISTANT_TOOLS
    functions = {t["function"]["name"]: t["function"] for t in sent["tools"] if t["type"] == "function"}
    assert set(functions) == E2E_TOOLS
    assert set(functions["calculator"]["parameters"]["properties"]) == {"a", "b", "op"}
    instance = sent["metadata"]["service_instance"]
    assert instance and all(r["metadata"]["service_instance"] == instance for r in state["runs"])


@pytest.mark.anyio
async def test_sse_reply_framing_and_order(assistants_service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, assistants_service.url)
        # Line breaks, and text that would be SSE syntax at the start of a line, stay inside data.
        result = await sse_chat(client, assistants_service.url, thread_id, MULTILINE)
    check_reply(result, thread_id, f"You said: {MULTILINE}")
    assert len(result.all(DELTA)) > 1  # streamed, not one lump


@pytest.mark.anyio
async def test_websocket_text_and_tool_turns(assistants_service: ServerProcess) -> None:
    async with http_client() as client:
        thread_id = await new_thread(client, assistants_service.url)
    async with ws_connect(assistants_service, additional_headers={"X-Correlation-ID": "asst-ws-1"}) as ws:
        await ws.send(json.dumps({"thread_id": thread_id, "message": "over the socket"}))
        check_ws_turn(await ws_turn_frames(ws), thread_id, "You said: over the socket")
        await ws.send(json.dumps({"thread_id": thread_id, "message": 'tool:calculator {"a": 2, "b": 3, "op": "add"}'}))
        frames = await ws_turn_frames(ws)
        check_ws_turn(frames, thread_id, "Tool results: 5")
        steps = [f["data"]["step"] for f in frames if f["event"] == STEP_COMPLETED]
        assert [(s["name"], s["output"], s["is_error"]) for s in steps] == [("calculator", "5", False)]


# ---------------------------------------------------------------------------------------------
# 2. requires_action: two parallel function calls, their outputs submitted to the same run


@pytest.mark.anyio
async def test_two_parallel_tool_calls_round_trip(assistants_service: ServerProcess, fake_assistants_api: ServerProcess) -> None:
    base = assistants_service.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        result = await sse_chat(client, base, thread_id, TWO_CALLS)
        state = await fake_thread(client, fake_assistants_api, thread_id)
        requests = await fake_requests(client, fake_assistants_api, thread_id)
        as_json = await chat_json(client, base, thread_id, TWO_CALLS)  # the same over JSON

    check_framing(result)
    names = result.names
    assert [n for n in names if n in (STEP_CREATED, STEP_COMPLETED)] == [STEP_CREATED, STEP_CREATED, STEP_COMPLETED, STEP_COMPLETED]
    assert names.index(STEP_COMPLETED) < names.index(DELTA) and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA]
    created = [e.json()["step"] for e in result.all(STEP_CREATED)]
    assert [(s["name"], s["type"], s["show_input"], s["end"]) for s in created] == [
        ("calculator", "tool", True, None), ("get_weather", "tool", True, None)]
    assert json.loads(created[0]["input"]) == {"a": 6, "b": 7, "op": "multiply"}
    assert json.loads(created[1]["input"]) == {"city": "Paris"}
    completed = {s["id"]: s for s in result.steps_completed}
    assert set(completed) == {s["id"] for s in created}
    calculator, weather = (completed[s["id"]] for s in created)
    assert calculator["output"] == "42" and not calculator["is_error"]
    assert json.loads(weather["output"]) == {"city": "Paris", "temperature_c": 15, "conditions": "sunny"}
    assert not weather["is_error"]
    reply = f"Tool results: 42 | {weather['output']}"
    assert result.text == reply and result.replies == [reply]

    # Upstream: one run, stopped at requires_action, given both outputs in one submission, completed.
    (run,) = state["runs"]
    assert run["status"] == "completed" and state["active_run"] is None
    (tool_step,) = [s for s in state["steps"][run["id"]] if s["type"] == "tool_calls"]
    calls = tool_step["step_details"]["tool_calls"]
    assert [c["id"] for c in calls] == [s["id"] for s in created]  # the steps are the upstream's calls
    assert [c["function"]["output"] for c in calls] == ["42", weather["output"]]
    (submitted,) = submissions(requests, run["id"])
    assert submitted["body"]["stream"] is True
    assert submitted["body"]["tool_outputs"] == [
        {"tool_call_id": calls[0]["id"], "output": "42"}, {"tool_call_id": calls[1]["id"], "output": weather["output"]}]
    assert len(run_creations(requests)) == 1 and cancels(requests) == []
    assert message_texts(state)[-1] == ("assistant", reply)

    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["responses"] == [reply]


# ---------------------------------------------------------------------------------------------
# 3. Hosted tools: shown as steps, run upstream


@pytest.mark.anyio
async def test_hosted_code_interpreter_is_shown_not_run(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    from tests.fake_openai import CODE_LOGS

    async with http_client() as client:
        thread_id = await new_thread(client, assistants_service.url)
        result = await sse_chat(client, assistants_service.url, thread_id, "hosted:code_interpreter")
        state = await fake_thread(client, fake_assistants_api, thread_id)
        requests = await fake_requests(client, fake_assistants_api, thread_id)
    check_framing(result)
    names = result.names
    assert names[:3] == [RUN_CREATED, STEP_CREATED, STEP_COMPLETED], names
    assert set(names[3:-3]) == {DELTA} and names[-3:] == [MESSAGE_COMPLETED, RUN_COMPLETED, METADATA], names
    created, completed = result.one(STEP_CREATED)["step"], result.one(STEP_COMPLETED)["step"]
    assert created["name"] == "code_interpreter" and created["type"] == "tool"
    assert created["show_input"] is False and created["end"] is None
    assert completed["id"] == created["id"] and completed["show_input"] is False
    assert completed["output"] == CODE_LOGS and completed["is_error"] is False and completed["end"] >= completed["start"]
    assert result.text == "hosted tool done" == result.replies[0]

    (run,) = state["runs"]
    assert run["status"] == "completed"
    (tool_step,) = [s for s in state["steps"][run["id"]] if s["type"] == "tool_calls"]
    assert [c["id"] for c in tool_step["step_details"]["tool_calls"]] == [created["id"]]
    assert submissions(requests) == [] and len(run_creations(requests)) == 1  # nothing for the service to run


# ---------------------------------------------------------------------------------------------
# 4. Tool outputs that cannot be delivered: the run is cancelled, the thread stays usable


@pytest.mark.anyio
async def test_submit_failure_cancels_the_run(assistants_service: ServerProcess, fake_assistants_api: ServerProcess) -> None:
    base, fake = assistants_service.url, fake_assistants_api
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        result = await sse_chat(client, base, thread_id, "fault:submit-status 500")
        check_framing(result, last=ERROR)
        error = result.one(ERROR)
        assert error["type"] == "upstream_error" and "cancelled" in error["error"], error
        (step,) = result.steps_completed
        assert step["name"] == "calculator" and step["output"] == "3"
        assert MESSAGE_COMPLETED not in result.names and RUN_COMPLETED not in result.names

        run = (await fake_thread(client, fake, thread_id))["runs"][-1]
        assert run["status"] in ("cancelling", "cancelled")
        await wait_for_status(client, fake, thread_id, run["id"], "cancelled")
        requests = await fake_requests(client, fake, thread_id)
        assert len(submissions(requests, run["id"])) == 3  # three attempts, then the cancel
        assert cancels(requests) == [run["id"]]

        response = await chat_json(client, base, thread_id, "fault:submit-status 500")
        body = assert_json_error(response, 502, "upstream_error")
        assert "cancelled" in body["error"]
        second = (await fake_thread(client, fake, thread_id))["runs"][-1]
        assert second["id"] != run["id"] and second["status"] in ("cancelling", "cancelled")

        await assert_thread_usable(client, base, thread_id)
        state = await fake_thread(client, fake, thread_id)
    assert [r["status"] for r in state["runs"]] == ["cancelled", "cancelled", "completed"]


# ---------------------------------------------------------------------------------------------
# 5a. A run left active upstream by a turn that no longer exists


@pytest.mark.anyio
async def test_a_run_left_active_by_a_cut_stream_is_cancelled(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    base, fake = assistants_service.url, fake_assistants_api
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        assert_json_error(await chat_json(client, base, thread_id, "fault:cut"), 502, "upstream_error")
        result = await sse_chat(client, base, thread_id, "fault:cut")  # the same, streamed
        check_framing(result, last=ERROR)
        assert DELTA in result.names and result.one(ERROR)["type"] == "upstream_error"
        await assert_thread_usable(client, base, thread_id)
        state = await fake_thread(client, fake, thread_id)
        requests = await fake_requests(client, fake, thread_id)
    cut = state["runs"][:2]
    assert [r["status"] for r in state["runs"]] == ["cancelled", "cancelled", "completed"]
    assert sorted(cancels(requests)) == sorted(r["id"] for r in cut)
    assert message_texts(state)[-1] == ("assistant", "You said: are you still there?")


@pytest.mark.anyio
async def test_a_run_of_a_crashed_turn_of_this_instance_is_cancelled(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    """A run the service started and then lost track of (its turn crashed): in_progress upstream,
    marked with this instance's id, but driven by no turn here. The next message cancels it."""
    base, fake = assistants_service.url, fake_assistants_api
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        assert (await chat_json(client, base, thread_id, "hello")).status_code == 200
        instance = (await fake_thread(client, fake, thread_id))["runs"][0]["metadata"]["service_instance"]
        orphan = await client.post(
            f"{fake.url}/v1/threads/{thread_id}/runs", headers=BETA,
            json={"assistant_id": ASSISTANT_ID, "metadata": {"service_instance": instance},
                  "additional_messages": [{"role": "user", "content": "fault:cut"}]},
        )
        assert orphan.status_code == 200, orphan.text
        orphan_id = orphan.json()["id"]
        assert (await fake_thread(client, fake, thread_id))["active_run"] == orphan_id
        await assert_thread_usable(client, base, thread_id)
        state = await fake_thread(client, fake, thread_id)
        requests = await fake_requests(client, fake, thread_id)
    runs = {r["id"]: r for r in state["runs"]}
    assert runs[orphan_id]["status"] == "cancelled"
    assert cancels(requests) == [orphan_id]
    assert [r["status"] for r in state["runs"]] == ["completed", "cancelled", "completed"]


@pytest.mark.anyio
async def test_a_hidden_active_run_is_cancelled_and_the_next_message_goes_on(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    """`fault:active 30`: once the reply is done, another run (empty metadata, never streamed) is
    active on the thread for 30 s. The next message cancels it and is answered."""
    base, fake = assistants_service.url, fake_assistants_api
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        response = await chat_json(client, base, thread_id, "fault:active 30")
        assert response.status_code == 200, response.text
        assert response.json()["responses"] == ["You said: fault:active 30"]
        state = await fake_thread(client, fake, thread_id)
        hidden = state["runs"][-1]
        assert state["active_run"] == hidden["id"] and hidden["metadata"] == {} and hidden["status"] == "in_progress"
        await assert_thread_usable(client, base, thread_id)
        state = await fake_thread(client, fake, thread_id)
        requests = await fake_requests(client, fake, thread_id)
    runs = {r["id"]: r for r in state["runs"]}
    assert runs[hidden["id"]]["status"] == "cancelled"
    assert cancels(requests) == [hidden["id"]]


# ---------------------------------------------------------------------------------------------
# 5b. A run of a turn still running: waited for, never cancelled


@pytest.mark.anyio
async def test_a_second_message_waits_for_the_running_turn(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    base, fake = assistants_service.url, fake_assistants_api
    results: dict[str, Any] = {}
    async with http_client() as first_client, http_client() as second_client:
        thread_id = await new_thread(first_client, base)

        async def first() -> None:
            results["sse"] = await sse_chat(first_client, base, thread_id, SLOW_TURN)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_for_run(second_client, fake, thread_id, {"in_progress"})
            results["json"] = await chat_json(second_client, base, thread_id, "me next")
            results["json_done"] = time.monotonic()
        state = await fake_thread(first_client, fake, thread_id)
        requests = await fake_requests(first_client, fake, thread_id)
    check_reply(results["sse"], thread_id, SLOW_TURN_REPLY)
    assert results["json"].status_code == 200, results["json"].text
    assert results["json"].json()["responses"] == ["You said: me next"]
    assert results["json_done"] >= results["sse"].all(METADATA)[0].at
    # The second run was created once the first had ended: no conflict upstream, nothing cancelled.
    assert [r["status"] for r in state["runs"]] == ["completed", "completed"]
    assert len(run_creations(requests)) == 2 and cancels(requests) == []


@pytest.mark.anyio
async def test_a_second_message_gets_409_after_thread_lock_timeout(
    impatient_assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    base, fake = impatient_assistants_service.url, fake_assistants_api
    results: dict[str, Any] = {}
    async with http_client() as first_client, http_client() as second_client:
        thread_id = await new_thread(first_client, base)

        async def first() -> None:
            results["sse"] = await sse_chat(first_client, base, thread_id, SHORT_SLOW_TURN)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_for_run(second_client, fake, thread_id, {"in_progress"})
            started = time.monotonic()
            refused = await chat_json(second_client, base, thread_id, "me next")
            waited = time.monotonic() - started
            refused_stream = await sse_chat(second_client, base, thread_id, "me next")
            refused_done = time.monotonic()
        state = await fake_thread(first_client, fake, thread_id)
        requests = await fake_requests(first_client, fake, thread_id)

        assert_json_error(refused, 409, "thread_busy")
        assert 0.4 <= waited < 1.5, f"THREAD_LOCK_TIMEOUT_SECONDS=0.5, refused after {waited:.2f}s"
        # Streamed, it is refused with the same plain HTTP error before any stream starts (it waited
        # less than SSE_HEARTBEAT_SECONDS).
        assert refused_stream.status == 409 and refused_stream.body["type"] == "thread_busy", refused_stream
        assert refused_done < results["sse"].all(METADATA)[0].at
        check_reply(results["sse"], thread_id, " ".join(f"word{n}" for n in range(20)))
        (run,) = state["runs"]
        assert run["status"] == "completed"
        assert len(run_creations(requests)) == 1 and cancels(requests) == []
        await assert_thread_usable(first_client, base, thread_id)


@pytest.mark.anyio
async def test_a_busy_run_of_another_instance_is_left_alone(
    assistants_service: ServerProcess, impatient_assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    """Two instances, one thread: a message to one while the other's run streams must not touch
    that run. (Whether it should then wait for it is the xfail test below.)"""
    fake = fake_assistants_api
    results: dict[str, Any] = {}
    async with http_client() as first_client, http_client() as second_client:
        thread_id = await new_thread(first_client, impatient_assistants_service.url)

        async def first() -> None:
            results["sse"] = await sse_chat(first_client, impatient_assistants_service.url, thread_id, SHORT_SLOW_TURN)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            busy = await wait_for_run(second_client, fake, thread_id, {"in_progress"})
            results["other"] = await chat_json(second_client, assistants_service.url, thread_id, "me next")
        state = await fake_thread(first_client, fake, thread_id)
        requests = await fake_requests(first_client, fake, thread_id)
    check_reply(results["sse"], thread_id, " ".join(f"word{n}" for n in range(20)))
    other = results["other"]
    if other.status_code == 409:
        assert_json_error(other, 409, "thread_busy")
    else:
        assert other.status_code == 200 and other.json()["responses"] == ["You said: me next"], other.text
    runs = {r["id"]: r for r in state["runs"]}
    assert runs[busy["id"]]["status"] == "completed"
    assert cancels(requests) == []


@pytest.mark.anyio
async def test_a_message_on_another_instance_waits_for_its_run(
    assistants_service: ServerProcess, impatient_assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    fake = fake_assistants_api
    results: dict[str, Any] = {}
    async with http_client() as first_client, http_client() as second_client:
        thread_id = await new_thread(first_client, impatient_assistants_service.url)

        async def first() -> None:
            results["sse"] = await sse_chat(first_client, impatient_assistants_service.url, thread_id, SHORT_SLOW_TURN)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_for_run(second_client, fake, thread_id, {"in_progress"})
            # assistants_service has THREAD_LOCK_TIMEOUT_SECONDS=30: plenty for a 2 s turn.
            results["other"] = await chat_json(second_client, assistants_service.url, thread_id, "me next")
            results["other_done"] = time.monotonic()
        state = await fake_thread(first_client, fake, thread_id)
    check_reply(results["sse"], thread_id, " ".join(f"word{n}" for n in range(20)))
    assert results["other"].status_code == 200, results["other"].text
    assert results["other"].json()["responses"] == ["You said: me next"]
    assert results["other_done"] >= results["sse"].all(METADATA)[0].at
    assert [r["status"] for r in state["runs"]] == ["completed", "completed"]


@pytest.mark.anyio
async def test_a_run_waiting_for_another_instances_tool_outputs_is_not_cancelled(
    assistants_service: ServerProcess, impatient_assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    fake = fake_assistants_api
    results: dict[str, Any] = {}
    async with http_client() as first_client, http_client() as second_client:
        thread_id = await new_thread(first_client, impatient_assistants_service.url)

        async def first() -> None:
            results["sse"] = await sse_chat(
                first_client, impatient_assistants_service.url, thread_id, 'tool:slow_tool {"seconds": 1}')

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            busy = await wait_for_run(second_client, fake, thread_id, {"requires_action"})  # its tool is running
            results["other"] = await chat_json(second_client, assistants_service.url, thread_id, "me next")
        state = await fake_thread(first_client, fake, thread_id)
        requests = await fake_requests(first_client, fake, thread_id)
    result = results["sse"]
    check_framing(result)
    assert result.text == "Tool results: slept", result.names
    runs = {r["id"]: r for r in state["runs"]}
    assert runs[busy["id"]]["status"] == "completed"
    assert cancels(requests) == []
    other = results["other"]
    assert other.status_code in (200, 409), other.text


# ---------------------------------------------------------------------------------------------
# 6. Runs that end badly upstream


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("message", "status", "type", "code"),
    [
        ("fault:failed", "failed", "run_failed", "server_error"),
        ("fault:expired", "expired", "run_expired", "expired"),
        ("fault:incomplete", "incomplete", "run_incomplete", "max_completion_tokens"),
    ],
)
async def test_failed_expired_incomplete_runs(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess, message: str, status: str, type: str, code: str
) -> None:
    base = assistants_service.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        result = await sse_chat(client, base, thread_id, message)
        check_framing(result)
        assert result.names[-2:] == [RUN_FAILED, METADATA], result.names
        assert RUN_COMPLETED not in result.names
        # A message cut short ends (thread.message.incomplete upstream), as with the Responses engine.
        assert (MESSAGE_COMPLETED in result.names) == (status == "incomplete"), result.names
        failed = result.one(RUN_FAILED)
        assert set(failed) == {"error", "type", "code"} and failed["error"]
        assert (failed["type"], failed["code"]) == (type, code)
        if status == "incomplete":
            assert result.text == "You"  # the part written before the run stopped

        assert_json_error(await chat_json(client, base, thread_id, message), 502, type)
        state = await fake_thread(client, fake_assistants_api, thread_id)
        assert [r["status"] for r in state["runs"]] == [status, status]
        await assert_thread_usable(client, base, thread_id)


# ---------------------------------------------------------------------------------------------
# 7. Upstream errors


@pytest.mark.anyio
async def test_unknown_thread_is_404(assistants_service: ServerProcess) -> None:
    async with http_client() as client:
        response = await chat_json(client, assistants_service.url, "thread_doesnotexist", "hello?")
        assert_json_error(response, 404, "thread_not_found")
        # Streamed, refused before the upstream's first answer: the same plain HTTP error.
        result = await sse_chat(client, assistants_service.url, "thread_doesnotexist", "hello?")
    assert result.status == 404 and result.headers["content-type"].startswith("application/json"), result
    assert result.body["type"] == "thread_not_found"
    assert result.body["correlation_id"] == result.headers["x-correlation-id"]
    async with ws_connect(assistants_service, additional_headers={"X-Correlation-ID": "asst-ws-404"}) as ws:
        await ws.send(json.dumps({"thread_id": "thread_doesnotexist", "message": "hello?"}))
        frames = await ws_turn_frames(ws)
        assert [f["event"] for f in frames] == [RUN_CREATED, ERROR]
        assert frames[-1]["data"]["type"] == "thread_not_found"
        assert frames[-1]["data"]["correlation_id"] == "asst-ws-404"


@pytest.mark.anyio
@pytest.mark.parametrize(("message", "min_elapsed"), [("fault:status 429 0.5 x1", 0.45), ("fault:status 503 x1", 0.0)])
async def test_throttled_or_failed_run_creation_is_retried(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess, message: str, min_elapsed: float
) -> None:
    base = assistants_service.url
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        started = time.monotonic()
        response = await chat_json(client, base, thread_id, message)
        elapsed = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["responses"] == ["recovered"]
        assert elapsed >= min_elapsed, f"Retry-After was not honoured ({elapsed:.2f}s)"
        state = await fake_thread(client, fake_assistants_api, thread_id)
        requests = await fake_requests(client, fake_assistants_api, thread_id)
        # Two attempts, one run, and the message in the thread once.
        assert len(run_creations(requests)) == 2
        assert [r["status"] for r in state["runs"]] == ["completed"]
        assert [text for role, text in message_texts(state) if role == "user"] == [message]
        await assert_thread_usable(client, base, thread_id)


# ---------------------------------------------------------------------------------------------
# 8. A client that disconnects while a tool runs costs the run nothing


@pytest.mark.anyio
async def test_a_run_outlives_an_sse_client_that_disconnects_mid_tool_call(
    assistants_service: ServerProcess, fake_assistants_api: ServerProcess
) -> None:
    base, fake = assistants_service.url, fake_assistants_api
    async with http_client() as client:
        thread_id = await new_thread(client, base)
        names = await sse_until(client, base, thread_id, 'tool:slow_tool {"seconds": 1}', STEP_CREATED)
        assert names[-1] == STEP_CREATED and STEP_COMPLETED not in names
        run = (await fake_thread(client, fake, thread_id))["runs"][-1]
        assert run["status"] == "requires_action"  # hung up while the tool runs
        # The next message waits for that turn, which finishes without its client.
        await assert_thread_usable(client, base, thread_id)
        state = await fake_thread(client, fake, thread_id)
        requests = await fake_requests(client, fake, thread_id)
    runs = {r["id"]: r for r in state["runs"]}
    assert runs[run["id"]]["status"] == "completed"
    (submitted,) = submissions(requests, run["id"])
    (call,) = run["required_action"]["submit_tool_outputs"]["tool_calls"]
    assert submitted["body"]["tool_outputs"] == [{"tool_call_id": call["id"], "output": "slept"}]
    assert cancels(requests) == []
    assert message_texts(state) == [
        ("user", 'tool:slow_tool {"seconds": 1}'), ("assistant", "Tool results: slept"),
        ("user", "are you still there?"), ("assistant", "You said: are you still there?"),
    ]

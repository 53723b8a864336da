"""The chat page in a real browser (Debian's Chromium, driven by Playwright) against the real server.

Never a browser download: Playwright drives /usr/bin/chromium. Without it the tests skip locally
and fail under CI (where .ci/run installs it).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e import REPO, ServerProcess, fake_upstream, start_service  # noqa: F401  (fixture)
from tests.nginx_proxy import NginxProxy, nginx_binary, nginx_proxy, nginx_service  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        message = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page_service(fake_upstream: ServerProcess) -> Iterator[ServerProcess]:
    service = start_service(fake_upstream.url, name="browser-service", ASSISTANT_INITIAL_MESSAGE="Hello from the test!")
    yield service
    service.stop()


@pytest.fixture
def page(browser: object, page_service: ServerProcess) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1000, "height": 800})  # type: ignore[attr-defined]
    page = context.new_page()
    page.goto(page_service.url + "/")
    page.wait_for_selector("#thread:has-text('thread')")
    yield page
    context.close()


def send(page: object, message: str, transport: str) -> None:
    page.select_option("#transport", transport)  # type: ignore[attr-defined]
    page.fill("#message", message)  # type: ignore[attr-defined]
    page.click("#send")  # type: ignore[attr-defined]


def last_reply(page: object) -> str:
    return page.locator(".turn.assistant .bubble").last.inner_text()  # type: ignore[attr-defined]


def wait_idle(page: object) -> None:
    page.wait_for_selector("#send:not([disabled])", timeout=15_000)  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_text_streams_in(page: object, transport: str) -> None:
    assert "Hello from the test!" in page.locator(".turn.assistant .bubble").first.inner_text()  # type: ignore[attr-defined]
    send(page, "fault:slow 0.15 12", transport)
    started = time.monotonic()
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word0')"
    )
    first_words = time.monotonic() - started
    assert "word11" not in last_reply(page)  # the first words show before the last arrived
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word11')"
    )
    last_words = time.monotonic() - started
    wait_idle(page)
    assert last_words - first_words > 1.0
    assert last_reply(page) == " ".join(f"word{i}" for i in range(12))


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_tool_step_block(page: object, transport: str) -> None:
    send(page, 'tool:calculator {"a": 19, "b": 3, "op": "multiply"}', transport)
    wait_idle(page)
    step = page.locator("details.step").last  # type: ignore[attr-defined]
    assert "calculator" in step.locator("summary").inner_text() and " s)" in step.locator("summary").inner_text()
    step.locator("summary").click()
    assert "output: 57" in step.inner_text()
    assert '"a": 19' in step.inner_text()
    assert last_reply(page) == "Tool results: 57"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"chat-tool-turn-{transport}.png"), full_page=True)  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_upstream_error_shows_plainly(page: object, transport: str) -> None:
    send(page, "fault:failed", transport)
    wait_idle(page)
    error = page.locator(".error").last  # type: ignore[attr-defined]
    assert "The run failed: The model failed." in error.inner_text()
    # The reply bubble that got no text no longer shows "…", as if the turn still ran.
    assert not page.locator(".turn.assistant .bubble").last.is_visible()  # type: ignore[attr-defined]
    send(page, "still there?", transport)  # the page and the thread carry on
    wait_idle(page)
    assert last_reply(page) == "You said: still there?"


def test_refused_request_shows_the_service_error(page: object) -> None:
    send(page, "x" * 40_000, "sse")  # over MAX_MESSAGE_CHARS: a plain 400 from the service
    wait_idle(page)
    assert "invalid_request" in page.locator(".error").last.inner_text()  # type: ignore[attr-defined]


def test_a_thread_that_cannot_be_started_says_so(page: object) -> None:
    """A proxy's HTML error page (the service restarting) instead of JSON: a message, not a dead page."""
    page.route("**/threads", lambda route: route.fulfill(  # type: ignore[attr-defined]
        status=502, content_type="text/html", body="<html><body>502 Bad Gateway</body></html>"))
    page.click("#new-thread")  # type: ignore[attr-defined]
    page.wait_for_selector(".error")  # type: ignore[attr-defined]
    assert "Could not start a thread (http_error): 502" in page.locator(".error").last.inner_text()  # type: ignore[attr-defined]
    send(page, "hello?", "sse")
    page.wait_for_selector(".error:has-text('no thread yet')")  # type: ignore[attr-defined]
    page.unroute("**/threads")  # type: ignore[attr-defined]
    page.click("#new-thread")  # type: ignore[attr-defined]
    page.wait_for_selector("#thread:has-text('thread')")  # type: ignore[attr-defined]
    assert page.locator(".error").count() == 0  # type: ignore[attr-defined]


def test_a_cancelled_run_says_it_stopped(page: object) -> None:
    stream = "".join(f"event: {name}\ndata: {data}\n\n" for name, data in (
        ("thread.run.created", '{"thread_id": "t", "run_id": "run_1", "stream_url": "chat/stream/run_1"}'),
        ("thread.message.delta", '{"delta": {"content": "Half an ans"}}'),
        ("thread.run.cancelled", '{"thread_id": "t", "run_id": "run_1", "reason": "cancelled by the client"}'),
        ("metadata", '{"run_id": "run_1"}'),
    ))
    page.route("**/chat", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))  # type: ignore[attr-defined]
    send(page, "go on", "sse")
    wait_idle(page)
    assert last_reply(page) == "Half an ans"
    assert page.locator(".error").last.inner_text() == "Stopped: cancelled by the client"  # type: ignore[attr-defined]


def test_new_thread_button(page: object) -> None:
    first = page.inner_text("#thread")  # type: ignore[attr-defined]
    page.click("#new-thread")  # type: ignore[attr-defined]
    page.wait_for_function(f"() => document.querySelector('#thread').textContent !== {first!r}")  # type: ignore[attr-defined]
    assert page.locator(".turn.user").count() == 0  # type: ignore[attr-defined]


def reload(page: object) -> None:
    page.reload()  # type: ignore[attr-defined]
    page.wait_for_selector("#thread:has-text('thread')")  # type: ignore[attr-defined]


def test_a_reload_keeps_the_thread_and_what_the_page_showed(page: object, fake_upstream: ServerProcess) -> None:  # noqa: F811
    """The page keeps its thread and transcript in the tab's sessionStorage: a reload goes on
    with the same thread, and New thread starts afresh, for reloads too."""
    thread = page.inner_text("#thread")  # type: ignore[attr-defined]
    thread_id = page.evaluate("() => state.threadId")  # type: ignore[attr-defined]
    send(page, "fault:slow 0.05 3", "ws")
    assert_whole_reply_without_error(page, 3)
    shown = page.inner_text("#log")  # type: ignore[attr-defined]
    reload(page)
    assert page.inner_text("#thread") == thread  # type: ignore[attr-defined]
    assert page.inner_text("#log") == shown  # type: ignore[attr-defined]
    assert page.input_value("#transport") == "ws"  # type: ignore[attr-defined]
    send(page, "fault:slow 0.05 2", "sse")
    assert_whole_reply_without_error(page, 2)
    assert page.inner_text("#thread") == thread  # type: ignore[attr-defined]
    assert responses_made(fake_upstream, thread_id) == 2
    page.click("#new-thread")  # type: ignore[attr-defined]
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => !['', {thread!r}].includes(document.querySelector('#thread').textContent)"  # cleared, then the new one
    )
    new_thread = page.inner_text("#thread")  # type: ignore[attr-defined]
    reload(page)
    assert page.inner_text("#thread") == new_thread  # type: ignore[attr-defined]
    assert page.locator(".turn.user").count() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_reply_still_coming_at_a_reload_is_read_again_in_full(
    page: object, fake_upstream: ServerProcess, transport: str  # noqa: F811
) -> None:
    """The run goes on while the page reloads; the page reads its reply again from the run's
    start, over the transport it used: the whole reply, once, and the model asked once."""
    thread_id = page.evaluate("() => state.threadId")  # type: ignore[attr-defined]
    send(page, "fault:slow 0.2 16", transport)
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word2')"
    )
    reload(page)
    assert_whole_reply_without_error(page, 16)
    assert page.locator(".turn.user").count() == 1  # type: ignore[attr-defined]
    assert page.locator(".turn.assistant").count() == 2  # the greeting and the reply  # type: ignore[attr-defined]
    assert page.evaluate("() => state.ws !== null") == (transport == "ws")  # type: ignore[attr-defined]
    assert responses_made(fake_upstream, thread_id) == 1


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_message_waiting_for_its_thread_at_a_reload_is_answered_once(
    page: object, page_service: ServerProcess, fake_upstream: ServerProcess, transport: str  # noqa: F811
) -> None:
    """Reloaded before its run id came (the thread was busy), the page sends the message again
    with the same key. The reload drops the first send (its client went away while it waited for
    the thread), so this send starts the run: answered once, and the model asked once."""
    thread_id = page.evaluate("() => state.threadId")  # type: ignore[attr-defined]
    busy = threading.Thread(target=httpx.post, args=(f"{page_service.url}/chat",), kwargs={
        "json": {"thread_id": thread_id, "message": "fault:slow 0.1 15"}, "timeout": 30, "trust_env": False})
    busy.start()
    time.sleep(0.3)  # the thread is busy for ~1.5 s
    send(page, "fault:slow 0.05 8", transport)
    time.sleep(0.3)
    assert page.evaluate("() => state.turn !== null && state.turn.runId === null")  # type: ignore[attr-defined]
    reload(page)
    assert_whole_reply_without_error(page, 8)
    busy.join()
    assert page.locator(".turn.user").count() == 1  # type: ignore[attr-defined]
    assert responses_made(fake_upstream, thread_id) == 2  # the busy turn's, and this message's once


def test_a_run_the_page_gave_up_on_is_still_stopped_after_a_reload(page: object) -> None:
    """A run the page could not stop yet (the service unreachable) is stopped before the next
    message, also when a reload came in between."""
    page.evaluate("() => { state.abandonedRunId = 'run_abandoned1'; save(); }")  # type: ignore[attr-defined]
    reload(page)
    assert page.evaluate("() => state.abandonedRunId") == "run_abandoned1"  # type: ignore[attr-defined]
    stops = []
    page.on("request", lambda request: stops.append(request.url) if request.url.endswith("/cancel") else None)  # type: ignore[attr-defined]
    send(page, "hello", "sse")
    wait_idle(page)
    assert stops == [page.url + "runs/run_abandoned1/cancel"]  # type: ignore[attr-defined]
    assert page.evaluate("() => state.abandonedRunId") is None  # the service answered (404): nothing left to stop  # type: ignore[attr-defined]


# Run once before the page's own script on every load: its run's stream is gone (the service
# restarted, or the run's events expired).
RUN_STREAMS_EXPIRED = """(() => {
    const original = window.fetch;
    window.fetch = async (url, options) => String(url).startsWith("chat/stream/")
        ? new Response(JSON.stringify({ error: "no longer kept", type: "run_expired", correlation_id: "c" }),
                       { status: 404, headers: { "Content-Type": "application/json" } })
        : original(url, options);
})()"""


def test_a_reply_that_cannot_be_read_again_after_a_reload_keeps_what_it_showed(page: object) -> None:
    send(page, "fault:slow 0.2 16", "sse")
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word2')"
    )
    shown = last_reply(page)
    page.add_init_script(RUN_STREAMS_EXPIRED)  # type: ignore[attr-defined]
    reload(page)
    wait_idle(page)
    assert page.locator(".error").last.inner_text() == "Error (run_expired): no longer kept"  # type: ignore[attr-defined]
    assert shown in page.inner_text("#log")  # type: ignore[attr-defined]
    reload(page)  # and it stays, without a reply still coming
    assert shown in page.inner_text("#log")  # type: ignore[attr-defined]
    wait_idle(page)


# Run before the page's own script: what the page saved is made an hour old.
SAVED_LONG_AGO = """(() => {
    const saved = JSON.parse(sessionStorage.getItem("assistant-chat") || "null");
    if (saved) sessionStorage.setItem("assistant-chat", JSON.stringify({ ...saved, savedAt: Date.now() - 3600e3 }));
})()"""


def test_a_message_reloaded_long_before_its_answer_began_is_not_sent_again(
    page: object, page_service: ServerProcess, fake_upstream: ServerProcess  # noqa: F811
) -> None:
    """Past RESUME_FOR_MS the service may have forgotten the message's key, so sending it again
    could answer it twice: the page says so instead, and the thread goes on."""
    thread_id = page.evaluate("() => state.threadId")  # type: ignore[attr-defined]
    busy = threading.Thread(target=httpx.post, args=(f"{page_service.url}/chat",), kwargs={
        "json": {"thread_id": thread_id, "message": "fault:slow 0.1 15"}, "timeout": 30, "trust_env": False})
    busy.start()
    time.sleep(0.3)
    send(page, "fault:slow 0.05 8", "sse")
    time.sleep(0.3)
    assert page.evaluate("() => state.turn !== null && state.turn.runId === null")  # type: ignore[attr-defined]
    page.add_init_script(SAVED_LONG_AGO)  # type: ignore[attr-defined]
    reload(page)
    wait_idle(page)
    assert "too long ago to send it again safely" in page.locator(".error").last.inner_text()  # type: ignore[attr-defined]
    busy.join()
    time.sleep(0.5)
    assert responses_made(fake_upstream, thread_id) == 1  # the busy turn's alone
    send(page, "fault:slow 0.05 2", "sse")
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent === 'word0 word1'"
    )
    wait_idle(page)


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_page_behind_nginx_under_a_prefix(browser: object, nginx_proxy: NginxProxy, transport: str) -> None:
    context = browser.new_context()  # type: ignore[attr-defined]
    page = context.new_page()
    try:
        page.goto(nginx_proxy.prefixed_url + "/")
        page.wait_for_selector("#thread:has-text('thread')")
        send(page, "fault:slow 0.15 8", transport)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word0')"
        )
        assert "word7" not in last_reply(page)  # streamed through nginx, not delivered in one lump
        wait_idle(page)
        assert last_reply(page) == " ".join(f"word{i}" for i in range(8))
        send(page, 'tool:calculator {"a": 2, "b": 5, "op": "power"}', transport)
        wait_idle(page)
        step = page.locator("details.step").last
        step.locator("summary").click()
        assert "output: 32" in step.inner_text()
    finally:
        context.close()


# --- the page against the protocol: resume, stop, messages, a turn given up ---------------------


def _sse(*events: tuple[str, str]) -> str:
    return "".join(f"event: {name}\ndata: {data}\n\n" for name, data in events)


def test_two_messages_of_one_run_stay_apart(page: object) -> None:
    """A run that says something, calls a tool, then answers: two messages (the JSON answer's
    `responses` has two). The page glues them into one bubble: 'Let me compute.The answer is 57.'"""
    step = '{"id": "call_1", "name": "calculator", "type": "tool", "start": 1.0, "end": %s, "input": "{}", "show_input": true, "output": %s, "is_error": false}'
    stream = _sse(
        ("thread.run.created", '{"thread_id": "t", "run_id": "run_1", "stream_url": "chat/stream/run_1"}'),
        ("thread.message.delta", '{"delta": {"content": "Let me compute."}}'),
        ("thread.message.completed", '{"message": {"id": "msg_1", "author": "assistant", "content": "Let me compute."}}'),
        ("thread.run.step.created", '{"step": %s}' % (step % ("null", "null"))),
        ("thread.run.step.completed", '{"step": %s}' % (step % ("1.5", '"57"'))),
        ("thread.message.delta", '{"delta": {"content": "The answer is 57."}}'),
        ("thread.message.completed", '{"message": {"id": "msg_2", "author": "assistant", "content": "The answer is 57."}}'),
        ("thread.run.completed", '{"thread_id": "t", "run_id": "run_1"}'),
        ("metadata", '{"run_id": "run_1"}'),
    )
    page.route("**/chat", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream))  # type: ignore[attr-defined]
    send(page, "19 times 3?", "sse")
    wait_idle(page)
    turn = page.locator(".turn.assistant").last.inner_text()  # type: ignore[attr-defined]
    assert "Let me compute.The answer is 57." not in turn


def test_enter_while_composing_does_not_send(page: object) -> None:
    """Enter that confirms an IME composition (Japanese, Chinese...) is not a send."""
    page.fill("#message", "にほん")  # type: ignore[attr-defined]
    page.evaluate("""() => document.querySelector('#message').dispatchEvent(
        new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}))""")  # type: ignore[attr-defined]
    page.wait_for_timeout(300)  # type: ignore[attr-defined]
    assert page.locator(".turn.user").count() == 0  # type: ignore[attr-defined]
    assert page.input_value("#message") == "にほん"  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_new_thread_mid_turn_leaves_a_usable_page(page: object, transport: str) -> None:
    """New thread while a reply streams: the new thread's composer stays disabled (no hint why)
    until the old run ends, and nothing can stop it."""
    send(page, "fault:slow 0.5 30", transport)  # ~15 s
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word0')"
    )
    first = page.inner_text("#thread")  # type: ignore[attr-defined]
    page.click("#new-thread")  # type: ignore[attr-defined]
    page.wait_for_function(f"() => document.querySelector('#thread').textContent !== {first!r}")  # type: ignore[attr-defined]
    page.wait_for_selector("#send:not([disabled])", timeout=3_000)  # type: ignore[attr-defined]
    send(page, "hello new thread", transport)
    wait_idle(page)
    assert last_reply(page) == "You said: hello new thread"


def on_the_first_chat_answer(handling: str) -> str:
    """A page script: the answer (`response`) to the page's first POST /chat goes through
    `handling` (JavaScript that returns what the page gets, or throws)."""
    return """() => {
    const original = window.fetch;
    let used = false;
    window.fetch = async (url, options) => {
        const response = await original(url, options);
        if (used || String(url) !== "chat") return response;
        used = true;
        HANDLING
    };
}""".replace("HANDLING", handling)


# The body breaks (as a dropped connection does) before the chunk with word2.
CUT_AFTER_WORD1 = on_the_first_chat_answer("""
        const reader = response.body.getReader();
        const body = new ReadableStream({ async pull(controller) {
            const { value, done } = await reader.read();
            if (done) return controller.close();
            if (new TextDecoder().decode(value).includes("word2")) {
                reader.cancel();
                return controller.error(new TypeError("network error"));
            }
            controller.enqueue(value);
        } });
        return new Response(body, { status: response.status, headers: response.headers });""")


# Every event stream the page opens (the POST and each resume), the first CUTS times, breaks right
# after the first chunk that carries a delta.
CUT_EACH_STREAM_AFTER_A_DELTA = """() => {
    const original = window.fetch;
    window.cutsLeft = CUTS;
    window.fetch = async (url, options) => {
        const response = await original(url, options);
        if (window.cutsLeft <= 0 || !response.headers.get("content-type")?.startsWith("text/event-stream")) return response;
        window.cutsLeft--;
        const reader = response.body.getReader();
        let cut = false;
        const body = new ReadableStream({ async pull(controller) {
            if (cut) {
                reader.cancel();
                return controller.error(new TypeError("network error"));
            }
            const { value, done } = await reader.read();
            if (done) return controller.close();
            controller.enqueue(value);
            cut = new TextDecoder().decode(value).includes("thread.message.delta");
        } });
        return new Response(body, { status: response.status, headers: response.headers });
    };
}"""


def assert_whole_reply_without_error(page: object, words: int) -> None:
    """`fault:slow`'s whole reply arrives (word0 ... word<n-1>), and no error shows."""
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word{words - 1}')",
        timeout=15_000,
    )
    wait_idle(page)
    assert last_reply(page) == " ".join(f"word{i}" for i in range(words))
    assert page.locator(".error").count() == 0  # type: ignore[attr-defined]


def test_a_dropped_sse_stream_is_resumed(page: object) -> None:
    """The connection drops mid-reply: the run goes on (README: runs outlive connections, resume
    with Last-Event-ID from thread.run.created's stream_url), but the page shows 'network error',
    the rest of the reply is lost, and the thread stays busy until the run ends."""
    page.evaluate(CUT_AFTER_WORD1)  # type: ignore[attr-defined]
    send(page, "fault:slow 0.3 16", "sse")
    assert_whole_reply_without_error(page, 16)


def test_an_sse_stream_broken_again_and_again_is_resumed_each_time(page: object) -> None:
    """Seven breaks in one turn, each after the page got a delta (a flaky mobile link): every
    resume that got somewhere starts the count afresh (the page gave up after five in all)."""
    page.evaluate(CUT_EACH_STREAM_AFTER_A_DELTA.replace("CUTS", "7"))  # type: ignore[attr-defined]
    send(page, "fault:slow 0.3 16", "sse")
    assert_whole_reply_without_error(page, 16)
    assert page.evaluate("() => window.cutsLeft") == 0  # type: ignore[attr-defined]


def test_a_websocket_broken_again_and_again_is_resumed_each_time(page: object) -> None:
    """Seven breaks while the run goes on (12 s), each on a socket that had delivered a word live
    (a resumed socket first delivers what was missed, all at once)."""
    send(page, "fault:slow 0.4 30", "ws")
    for _ in range(7):
        words = len(last_reply(page).split())
        page.wait_for_function(  # type: ignore[attr-defined]
            f"() => state.ws.readyState === WebSocket.OPEN && "
            f"[...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word{words + 1}')"
        )
        page.evaluate("() => state.ws.close()")  # type: ignore[attr-defined]
    assert_whole_reply_without_error(page, 30)


def test_a_run_the_page_gives_up_on_is_stopped_so_the_next_message_is_not_held_up(
    browser: object, page_service: ServerProcess
) -> None:
    """The link stays down longer than the page resumes for (RESUME_FOR_MS, five minutes: the
    page's clock is moved on): the page says so, and stops the run it can no longer show, which
    would otherwise hold the thread (20 s here) and make the next message wait."""
    context = browser.new_context()  # type: ignore[attr-defined]
    try:
        page = context.new_page()
        page.clock.install()
        page.goto(page_service.url + "/")
        page.wait_for_selector("#thread:has-text('thread')")
        page.evaluate(CUT_EACH_STREAM_AFTER_A_DELTA.replace("CUTS", "1"))
        page.evaluate("""() => {
            const cutting = window.fetch;
            window.fetch = (url, options) => String(url).startsWith("chat/stream/")  // down from now on
                ? Promise.reject(new TypeError("network error")) : cutting(url, options);
        }""")
        send(page, "fault:slow 0.5 40", "sse")
        page.wait_for_function("() => state.turn && state.turn.brokenSince !== null", timeout=10_000)
        page.clock.fast_forward("06:00")
        wait_idle(page)
        assert "network error" in page.locator(".error").last.inner_text()
        started = time.monotonic()
        send(page, "still there?", "sse")
        wait_idle(page)
        assert last_reply(page) == "You said: still there?"
        assert time.monotonic() - started < 5, "the next message waited for the run the page had given up on"
    finally:
        context.close()


def test_the_page_follows_the_reply_only_while_the_reader_is_at_the_bottom(page: object) -> None:
    page.evaluate("""() => { for (let i = 0; i < 60; i++) addTurn("user", `filler ${i}`); }""")  # type: ignore[attr-defined]
    send(page, "fault:slow 0.2 20", "sse")
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word1')"
    )
    assert page.evaluate("() => atBottom()")  # type: ignore[attr-defined]  # sending brought it down
    page.evaluate("() => { $('log').scrollTop = 0; }")  # type: ignore[attr-defined]  # the reader scrolls up
    time.sleep(1.0)  # five deltas
    assert page.evaluate("() => $('log').scrollTop") == 0  # type: ignore[attr-defined]
    page.evaluate("() => { $('log').scrollTop = $('log').scrollHeight; }")  # type: ignore[attr-defined]
    wait_idle(page)
    assert page.evaluate("() => atBottom()")  # type: ignore[attr-defined]  # back at the bottom, it follows again


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_stop_button_cancels_the_run(page: object, transport: str) -> None:
    """README: a client stops a run with POST /runs/{run_id}/cancel; the page had no way to."""
    send(page, "fault:slow 0.5 30", transport)
    page.wait_for_selector("#stop:not([hidden])", timeout=5_000)  # type: ignore[attr-defined]
    page.click("#stop")  # type: ignore[attr-defined]
    wait_idle(page)
    assert "Stopped:" in page.locator(".error").last.inner_text()  # type: ignore[attr-defined]


def test_a_dropped_websocket_is_resumed(page: object) -> None:
    """The socket drops mid-reply: the page opens a new one and resumes the run after the last
    event id it got (README: `{"resume": run_id, "last_event_id": id}`), instead of showing
    'the WebSocket closed' and losing the rest of the reply."""
    send(page, "fault:slow 0.3 16", "ws")
    page.wait_for_function(  # type: ignore[attr-defined]
        "() => [...document.querySelectorAll('.turn.assistant .bubble')].pop().textContent.includes('word1')"
    )
    page.evaluate("() => state.ws.close()")  # type: ignore[attr-defined]  # as a dropped connection ends it
    assert_whole_reply_without_error(page, 16)
    send(page, "still there?", "ws")  # the resumed socket carries the next turn
    wait_idle(page)
    assert last_reply(page) == "You said: still there?"


# The request reaches the service, but its answer is lost before the first event (as when the
# connection drops): the page knows no run id to resume.
LOSE_THE_FIRST_ANSWER = on_the_first_chat_answer("""
        response.body.cancel();
        throw new TypeError("network error");""")

CLOSE_AFTER_THE_FIRST_MESSAGE = """() => {
    // The socket drops right after the message went out, before thread.run.created came back.
    const original = WebSocket.prototype.send;
    let used = false;
    WebSocket.prototype.send = function (data) {
        original.call(this, data);
        if (!used && JSON.parse(data).message) { used = true; this.close(); }
    };
}"""


def responses_made(fake_upstream: ServerProcess, thread_id: str) -> int:
    requests = httpx.get(f"{fake_upstream.url}/_fake/requests", trust_env=False).json()
    return sum(1 for r in requests if r["path"] == "/v1/responses" and isinstance(r["body"], dict)
               and r["body"].get("conversation") == thread_id)


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_message_whose_answer_was_lost_is_sent_again_and_answered_once(
    page: object, fake_upstream: ServerProcess, transport: str  # noqa: F811
) -> None:
    """Lost before the run id came, the page cannot resume: it sends the message again with the
    same Idempotency-Key and reads the run the first send started (the model asked once)."""
    page.evaluate(LOSE_THE_FIRST_ANSWER if transport == "sse" else CLOSE_AFTER_THE_FIRST_MESSAGE)  # type: ignore[attr-defined]
    send(page, "fault:slow 0.05 8", transport)
    assert_whole_reply_without_error(page, 8)
    assert responses_made(fake_upstream, page.evaluate("() => state.threadId")) == 1  # type: ignore[attr-defined]


ABANDON_THE_FIRST_TRY = """() => {
    // The first POST /chat goes out, and the page gives up on it at once (as on a dropped
    // connection the service has not noticed yet: the request stays open).
    const original = window.fetch;
    let used = false;
    window.fetch = async (url, options) => {
        if (used || String(url) !== "chat") return original(url, options);
        used = true;
        original(url, options).catch(() => {});
        throw new TypeError("network error");
    };
}"""


ABANDON_THE_FIRST_SOCKET = """() => {
    // The first message goes out on a socket of its own that stays open (a connection the page
    // lost and the service has not noticed yet), and the page's socket closes.
    const original = WebSocket.prototype.send;
    let used = false;
    WebSocket.prototype.send = function (data) {
        if (used || !JSON.parse(data).message) return original.call(this, data);
        used = true;
        const lost = new WebSocket(this.url);
        window.lostSocket = lost;
        lost.onopen = () => { original.call(lost, data); this.close(); };
    };
}"""


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_a_message_sent_again_while_its_first_try_waits_for_the_thread_is_answered_once(
    page: object, page_service: ServerProcess, fake_upstream: ServerProcess, transport: str  # noqa: F811
) -> None:
    """The first try waits for a busy thread, so the same key is 409 idempotency_key_in_use: the
    page asks again until the first try's run has started, then reads that run."""
    thread_id = page.evaluate("() => state.threadId")  # type: ignore[attr-defined]
    busy = threading.Thread(target=httpx.post, args=(f"{page_service.url}/chat",), kwargs={
        "json": {"thread_id": thread_id, "message": "fault:slow 0.1 15"}, "timeout": 30, "trust_env": False})
    busy.start()
    time.sleep(0.3)  # the thread is busy for ~1.5 s
    page.evaluate(ABANDON_THE_FIRST_TRY if transport == "sse" else ABANDON_THE_FIRST_SOCKET)  # type: ignore[attr-defined]
    send(page, "fault:slow 0.05 8", transport)
    assert_whole_reply_without_error(page, 8)
    busy.join()
    assert responses_made(fake_upstream, thread_id) == 2  # the busy turn's, and this message's once


def test_a_rate_limited_turn_says_when_to_try_again(page: object) -> None:
    """OpenAI asked to wait longer than the service waits itself: the error's
    `retry_after_seconds` is shown, so the user knows when to send again."""
    send(page, "fault:status 429 60 x1", "sse")
    wait_idle(page)
    error = page.locator(".error").last.inner_text()  # type: ignore[attr-defined]
    assert "upstream_rate_limited" in error and "Try again in 60 s." in error

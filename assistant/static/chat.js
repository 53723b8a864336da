// The reference client: a thread, messages streamed over SSE (fetch) or a WebSocket, tool steps.
// Plain JavaScript, no build step; every URL is relative, so it works under a proxy's path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { threadId: null, turn: null, ws: null, wsReady: null, abandonedRunId: null };
// A broken stream is resumed until it has been down this long: about as long as the service
// keeps a finished run's events (STREAM_RETENTION_SECONDS, 300 s by default).
const RESUME_FOR_MS = 300_000;

// --- scrolling: follow the reply only while the reader is at the bottom --------------------------

function atBottom() {
  const log = $("log");
  return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
}

function follow(el, wasAtBottom) {
  if (wasAtBottom) el.scrollIntoView({ block: "end" });
}

// --- rendering ----------------------------------------------------------------------------------

function addTurn(role, text) {
  const wasAtBottom = atBottom();
  const el = document.createElement("div");
  el.className = `turn ${role}`;
  const steps = document.createElement("div");
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text || "";
  el.append(steps, bubble);
  $("log").append(el);
  follow(el, wasAtBottom || role === "user" || !text);  // a message just sent, and its reply, bring the reader down
  return { el, steps, bubble, stepEls: new Map(), sealed: false, runId: null, streamUrl: null, lastEventId: null,
           brokenSince: null, retries: 0 };
}

// Each message of a run gets its own bubble, in order with the steps between them.
function openBubble(turn) {
  if (turn.sealed) {
    turn.bubble = document.createElement("div");
    turn.bubble.className = "bubble";
    turn.el.append(turn.bubble);
    turn.sealed = false;
  }
  return turn.bubble;
}

function showError(turn, message) {
  const wasAtBottom = atBottom();
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = message;
  (turn ? turn.el : $("log")).append(box);
  follow(box, wasAtBottom);
}

function pre(label, text) {
  const el = document.createElement("pre");
  el.textContent = `${label}: ${text}`;
  return el;
}

function showStep(turn, step, done) {
  let el = turn.stepEls.get(step.id);
  if (!el) {
    el = document.createElement("details");
    el.className = "step running";
    el.dataset.stepId = step.id;
    const summary = document.createElement("summary");
    summary.textContent = `Tool: ${step.name}`;
    el.append(summary);
    if (step.show_input) el.append(pre("input", step.input));
    if (turn.bubble.textContent) { turn.el.append(el); turn.sealed = true; }  // after the text so far
    else turn.bubble.before(el);
    turn.stepEls.set(step.id, el);
  }
  if (done) {
    el.classList.remove("running");
    if (step.is_error) el.classList.add("failed");
    const seconds = step.end && step.start ? (step.end - step.start).toFixed(2) : "?";
    el.querySelector("summary").textContent = `Tool: ${step.name} (${seconds} s)`;
    el.append(pre("output", step.output ?? ""));
  }
}

// One handler for both transports: they carry the same events.
function handleEvent(turn, name, data) {
  if (turn !== state.turn) return; // a turn given up (New thread): its late events go nowhere
  if (turn.before && name !== "error") {  // the reply read again after a reload replaces what it showed before
    turn.before.remove();
    turn.before = null;
  }
  const wasAtBottom = atBottom();
  switch (name) {
    case "thread.run.created":
      turn.runId = data.run_id;
      turn.streamUrl = data.stream_url;
      $("stop").hidden = false;
      save();
      break;
    case "thread.message.delta":
      openBubble(turn).textContent += data.delta.content;
      follow(turn.el, wasAtBottom);
      break;
    case "thread.message.completed":
      if (!turn.bubble.textContent || turn.sealed) openBubble(turn).textContent = data.message.content;
      turn.sealed = true;
      break;
    case "thread.run.step.created":
      showStep(turn, data.step, false);
      break;
    case "thread.run.step.completed":
      showStep(turn, data.step, true);
      break;
    case "thread.run.failed":
      showError(turn, `The run failed: ${data.error}`);
      break;
    case "thread.run.cancelled":
      showError(turn, `Stopped: ${data.reason}`);
      break;
    case "error":
      showError(turn, `Error (${data.type}): ${data.error}` +
        (data.retry_after_seconds ? ` Try again in ${Math.ceil(data.retry_after_seconds)} s.` : "") +
        (data.type === "thread_not_found" ? " Press New thread to start another." : ""));
      break;
  }
  if (name === "metadata" || name === "error" || (name === "thread.run.resumed" && data.complete)) endTurn();
}

function endTurn() {
  state.turn?.abort?.abort();
  state.turn?.el.classList.add("ended");  // an empty reply bubble no longer shows "…"
  keepShownBeforeReload(state.turn?.before);
  state.turn = null;
  $("send").disabled = false;
  $("stop").hidden = true;
  save();
}

// --- SSE over fetch (EventSource cannot POST) ----------------------------------------------------

// WHATWG event-stream parsing: lines end in CRLF, CR or LF; `data` lines join with LF.
function createSSEParser(onEvent) {
  let buffer = "", data = [], event = "", skipLF = false, lastId = null;
  return (chunk) => {
    if (skipLF && chunk.startsWith("\n")) chunk = chunk.slice(1); // the LF of a CRLF split in two
    skipLF = chunk.endsWith("\r");
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(event || "message", data.join("\n"), lastId);
        data = []; event = "";
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") event = value;
        else if (field === "id" && !value.includes("\0")) lastId = value;
      }
    }
  };
}

function isEventStream(response) {
  return response.ok && response.headers.get("content-type")?.startsWith("text/event-stream");
}

async function readStream(turn, response) {
  const parse = createSSEParser((name, data, id) => {
    if (id) turn.lastEventId = id;
    handleEvent(turn, name, JSON.parse(data));
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    heardFrom(turn);
    parse(value);
  }
}

// --- a broken stream: resumed, with a growing pause, until it has been down for RESUME_FOR_MS ----

function heardFrom(turn) {
  turn.brokenSince = null;
  turn.retries = 0;
}

// Whether to try again; the pause before it (0.5 s more each time, at most 5 s; at once when the
// browser comes back online).
async function retryAfterBreak(turn) {
  turn.brokenSince ??= Date.now();
  if (Date.now() - turn.brokenSince > RESUME_FOR_MS) {
    if (turn.runId) abandonRun(turn.runId);
    return false;
  }
  const pause = Math.min(500 * ++turn.retries, 5000);
  await new Promise((resolve) => {
    const done = () => { clearTimeout(timer); window.removeEventListener("online", done); resolve(); };
    const timer = setTimeout(done, pause);
    window.addEventListener("online", done);
  });
  return state.turn === turn;
}

// The page gives up reading a run that goes on: it is stopped (or, unreachable now, before the
// next message), so that it does not hold the thread nobody can see it answer.
function abandonRun(runId) {
  state.abandonedRunId = runId;
  stopAbandonedRun();
}

async function stopAbandonedRun() {
  const runId = state.abandonedRunId;
  if (!runId) return;
  try {
    await fetch(`runs/${encodeURIComponent(runId)}/cancel`, { method: "POST" });
    if (state.abandonedRunId === runId) state.abandonedRunId = null;  // stopped, or already over (409)
  } catch {
    // still unreachable: the next message tries again
  }
}

// A key of the message's own, the same on every try: sent again, it is the run the first try
// started, not a second answer (README "Sending a message again"). Not crypto.randomUUID(): that
// exists only on https and localhost.
function newIdempotencyKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// `message` is sent with `key`, unless the turn knows its run's stream already (a reply read again
// after a reload): then that is read.
async function sendOverSSE(turn, message, key) {
  turn.abort = new AbortController();
  const signal = turn.abort.signal;
  const post = () => fetch("chat", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", "Idempotency-Key": key },
    body: JSON.stringify({ thread_id: state.threadId, message }),
    signal,
  });
  const resume = () => {
    const headers = { Accept: "text/event-stream" };
    if (turn.lastEventId) headers["Last-Event-ID"] = turn.lastEventId;
    return fetch(turn.streamUrl, { headers, signal });
  };
  let response = null, failure = null;
  try {
    response = await (turn.streamUrl ? resume() : post());
  } catch (error) {
    failure = error;
  }
  for (;;) {
    if (response?.status === 204) return endTurn(); // a resume with nothing left to send
    if (response && !isEventStream(response)) {
      const body = await response.json().catch(() => ({ error: `${response.status} ${response.statusText}`.trim(), type: "http_error" }));
      // The first try still waits for the thread (the service has not yet seen it go): ask again.
      if (body.type !== "idempotency_key_in_use") return handleEvent(turn, "error", body);
      response = null;
    }
    if (response) {
      failure = null;
      try {
        await readStream(turn, response);
      } catch (error) {
        failure = error;
      }
    }
    if (state.turn !== turn || failure?.name === "AbortError") return;
    // The run goes on without us (README "Resuming a stream"): read on after the last id seen,
    // or, lost before the run id came, send the message again with its key.
    if (!(await retryAfterBreak(turn))) {
      if (state.turn !== turn) return;
      if (failure) throw failure;
      return handleEvent(turn, "error", { type: "disconnected", error: "the stream ended early" });
    }
    response = null;
    try {
      response = await (turn.streamUrl ? resume() : post());
    } catch (error) {
      failure = error;
    }
  }
}

// --- WebSocket --------------------------------------------------------------------------------

function openSocket() {
  if (state.ws && state.ws.readyState <= WebSocket.OPEN) return state.wsReady;
  const url = new URL("ws/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(url);
  state.ws = ws;
  state.wsReady = new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("the WebSocket could not connect"));
  });
  ws.onmessage = (message) => {
    if (ws !== state.ws) return; // a socket given up (New thread)
    const frame = JSON.parse(message.data);
    const turn = state.turn;
    if (turn && frame.id) turn.lastEventId = frame.id;
    if (turn && !turn.runId && frame.event === "error" && frame.data.type === "idempotency_key_in_use")
      return resumeOverWebSocket(turn); // the first try still waits for its thread (the service has not seen it go)
    if (turn) heardFrom(turn);
    if (turn) handleEvent(turn, frame.event, frame.data);
    else if (frame.event === "error") showError(null, `Error (${frame.data.type}): ${frame.data.error}`);
  };
  ws.onclose = (event) => {
    if (ws !== state.ws) return; // an old socket's close must not end the turn of a new one
    const turn = state.turn;
    if (!turn) return;
    // The run goes on without us (README "Resuming a stream"): a new socket reads on after the last id.
    if (turn.runId || turn.message) return resumeOverWebSocket(turn, event);
    closedOn(turn, event);
  };
  return state.wsReady;
}

function closedOn(turn, event) {
  const why = `the WebSocket closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`;
  handleEvent(turn, "error", { type: "disconnected", error: why });
}

async function resumeOverWebSocket(turn, closed) {
  if (!(await retryAfterBreak(turn))) {
    if (state.turn === turn) closedOn(turn, closed ?? { code: 1006 });
    return;
  }
  try {
    await openSocket();
  } catch {
    return; // its close comes next, and tries again
  }
  sendTurnFrame(turn);
}

// The run read on after the last event seen (from its start after a reload), or, the run id not
// known yet, the message again with its key (README "Sending a message again").
function sendTurnFrame(turn) {
  state.ws.send(JSON.stringify(turn.runId ? { resume: turn.runId, last_event_id: turn.lastEventId } : turn.message));
}

async function sendOverWebSocket(turn, message, key) {
  await openSocket();
  turn.message = { thread_id: state.threadId, message, idempotency_key: key };
  sendTurnFrame(turn);
}

// --- threads and the form ---------------------------------------------------------------------

async function newThread() {
  if (state.turn) {
    // Give up reading the running turn (it goes on server-side, on its own thread).
    if (state.ws && state.ws.readyState <= WebSocket.OPEN) { state.ws.close(); state.ws = null; }
    endTurn();
  }
  $("log").replaceChildren();
  state.threadId = null;
  state.abandonedRunId = null;  // a run of the old thread holds no one up now
  $("thread").textContent = "";
  save();
  let response, body;
  try {
    response = await fetch("threads", { method: "POST" });
    // A proxy's error page (the service restarting, say) is not JSON.
    body = await response.json().catch(() => ({ type: "http_error", error: `${response.status} ${response.statusText}` }));
  } catch (error) {
    return showError(null, `Could not start a thread: ${error.message}`);
  }
  if (!response.ok) return showError(null, `Could not start a thread (${body.type}): ${body.error}`);
  state.threadId = body.thread_id;
  $("thread").textContent = `thread ${body.thread_id}`;
  if (body.initial_message) addTurn("assistant", body.initial_message);
  save();
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value;
  if (!message.trim() || state.turn) return;
  if (!state.threadId) return showError(null, "There is no thread yet: press New thread.");
  $("message").value = "";
  $("send").disabled = true;
  await stopAbandonedRun();
  addTurn("user", message);
  await startTurn(message, newIdempotencyKey());
}

// The reply to `message`, over the transport chosen; with `run`, the reply of that run, read
// from its start (after a reload).
async function startTurn(message, key, run = null) {
  $("send").disabled = true;
  const turn = (state.turn = addTurn("assistant"));
  Object.assign(turn, { text: message, key }, run);
  $("stop").hidden = !turn.runId;
  save();
  try {
    await ($("transport").value === "ws" ? sendOverWebSocket : sendOverSSE)(turn, message, key);
  } catch (error) {
    if (error.name !== "AbortError") handleEvent(turn, "error", { type: "network_error", error: error.message });
  }
}

// --- a reload: the thread, what the page showed, and a reply still coming ---------------------
// Kept in sessionStorage (this tab's, until it closes), saved as a turn starts, as its run id
// comes, as it ends and as the page is hidden or left. A reply still coming is read again from its
// run's start (README "Resuming a stream"); what it showed before the reload stays until the
// first event comes, and for good if it cannot be read again. If its run id had not come yet, its
// message is sent again with the same key (the run the first send started, not a second answer),
// but only within RESUME_FOR_MS: later the service may have forgotten the key.

const SAVED = "assistant-chat";

function save() {
  if (!state.threadId) return sessionStorage.removeItem(SAVED);
  const log = $("log").cloneNode(true);
  const turn = state.turn;
  let coming = null;
  if (turn) {
    const el = log.children[[...$("log").children].indexOf(turn.el)];
    if (turn.before) el?.remove();  // nothing came since the last reload: what showed before it stays
    else el?.classList.add("before-reload");
    coming = { message: turn.text, key: turn.key, run: turn.streamUrl ? { runId: turn.runId, streamUrl: turn.streamUrl } : null };
  }
  try {
    sessionStorage.setItem(SAVED, JSON.stringify({ threadId: state.threadId, log: log.innerHTML, coming,
                                                   transport: $("transport").value, savedAt: Date.now(),
                                                   abandonedRunId: state.abandonedRunId }));
  } catch {
    sessionStorage.removeItem(SAVED);  // storage full or refused: a reload starts a new thread, not an older state
  }
}

// The reply could not be read again: what it showed before the reload stays.
function keepShownBeforeReload(el) {
  el?.classList.remove("before-reload");
  el?.classList.add("ended");
}

function restore() {
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(SAVED));
  } catch {
    // nothing usable kept
  }
  if (!saved?.threadId) return false;
  state.threadId = saved.threadId;
  state.abandonedRunId = saved.abandonedRunId ?? null;  // still to stop before the next message
  $("thread").textContent = `thread ${saved.threadId}`;
  if (saved.transport) $("transport").value = saved.transport;
  $("log").innerHTML = saved.log;  // the page's own markup: every text in it was set as text
  $("log").lastElementChild?.scrollIntoView({ block: "end" });
  const coming = saved.coming;
  const before = $("log").querySelector(".before-reload");
  if (coming?.run || (coming && Date.now() - saved.savedAt < RESUME_FOR_MS)) {
    startTurn(coming.message, coming.key, { ...coming.run, before });
  } else if (coming) {
    keepShownBeforeReload(before);
    showError(before ? { el: before } : null, "The page was reloaded before this message was answered, too long " +
      "ago to send it again safely (it could be answered twice): send it again if no answer comes.");
    save();
  }
  return true;
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
});
$("stop").addEventListener("click", () => {
  const turn = state.turn;
  if (!turn?.runId) return;
  if ($("transport").value === "ws" && state.ws?.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ cancel: turn.runId }));
  else fetch(`runs/${encodeURIComponent(turn.runId)}/cancel`, { method: "POST" })
    .then((r) => (r.ok ? null : r.json().then((b) => showError(turn, `Could not stop (${b.type}): ${b.error}`))))
    .catch(() => {});
});
$("new-thread").addEventListener("click", newThread);
window.addEventListener("pagehide", save);  // a reply still coming is kept as such
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") save(); });
if (!restore()) newThread();

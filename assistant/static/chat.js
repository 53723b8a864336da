// The reference client: a thread, messages streamed over SSE (fetch) or a WebSocket, tool steps.
// Plain JavaScript, no build step; every URL is relative, so it works under a proxy's path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { threadId: null, turn: null, ws: null, wsReady: null };

// --- rendering ----------------------------------------------------------------------------------

function addTurn(role, text) {
  const el = document.createElement("div");
  el.className = `turn ${role}`;
  const steps = document.createElement("div");
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  bubble.textContent = text || "";
  el.append(steps, bubble);
  $("log").append(el);
  el.scrollIntoView({ block: "end" });
  return { el, steps, bubble, stepEls: new Map() };
}

function showError(turn, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.textContent = message;
  (turn ? turn.el : $("log")).append(box);
  box.scrollIntoView({ block: "end" });
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
    turn.steps.append(el);
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
  switch (name) {
    case "thread.message.delta":
      turn.bubble.textContent += data.delta.content;
      turn.el.scrollIntoView({ block: "end" });
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
      showError(turn, `Error (${data.type}): ${data.error}`);
      break;
  }
  if (name === "metadata" || name === "error") endTurn();
}

function endTurn() {
  state.turn = null;
  $("send").disabled = false;
}

// --- SSE over fetch (EventSource cannot POST) ----------------------------------------------------

// WHATWG event-stream parsing: lines end in CRLF, CR or LF; `data` lines join with LF.
function createSSEParser(onEvent) {
  let buffer = "", data = [], event = "", skipLF = false;
  return (chunk) => {
    if (skipLF && chunk.startsWith("\n")) chunk = chunk.slice(1); // the LF of a CRLF split in two
    skipLF = chunk.endsWith("\r");
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(event || "message", data.join("\n"));
        data = []; event = "";
      } else if (!line.startsWith(":")) {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "event") event = value;
      }
    }
  };
}

async function sendOverSSE(turn, message) {
  const response = await fetch("chat", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({ thread_id: state.threadId, message }),
  });
  if (!response.ok || !response.headers.get("content-type")?.startsWith("text/event-stream")) {
    const body = await response.json().catch(() => ({ error: response.statusText, type: "http_error" }));
    return handleEvent(turn, "error", body);
  }
  const parse = createSSEParser((name, data) => handleEvent(turn, name, JSON.parse(data)));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parse(value);
  }
  if (state.turn === turn) handleEvent(turn, "error", { type: "disconnected", error: "the stream ended early" });
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
    const frame = JSON.parse(message.data);
    if (state.turn) handleEvent(state.turn, frame.event, frame.data);
    else if (frame.event === "error") showError(null, `Error (${frame.type}): ${frame.error}`);
  };
  ws.onclose = () => {
    if (state.turn) handleEvent(state.turn, "error", { type: "disconnected", error: "the WebSocket closed" });
  };
  return state.wsReady;
}

async function sendOverWebSocket(turn, message) {
  await openSocket();
  state.ws.send(JSON.stringify({ thread_id: state.threadId, message }));
}

// --- threads and the form ---------------------------------------------------------------------

async function newThread() {
  $("log").replaceChildren();
  state.threadId = null;
  $("thread").textContent = "";
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
}

async function send(event) {
  event.preventDefault();
  const message = $("message").value;
  if (!message.trim() || state.turn) return;
  if (!state.threadId) return showError(null, "There is no thread yet: press New thread.");
  $("message").value = "";
  $("send").disabled = true;
  addTurn("user", message);
  const turn = (state.turn = addTurn("assistant"));
  try {
    await ($("transport").value === "ws" ? sendOverWebSocket : sendOverSSE)(turn, message);
  } catch (error) {
    handleEvent(turn, "error", { type: "network_error", error: error.message });
  }
}

$("composer").addEventListener("submit", send);
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) send(event);
});
$("new-thread").addEventListener("click", newThread);
newThread();

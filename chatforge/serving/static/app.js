// chatforge chat page: streams replies from /v1/chat/completions (fetch + ReadableStream of the SSE),
// and in A/B mode (when the server collects feedback) shows two blinded replies from /api/comparisons and
// records the user's choice. With an API key the browser asks for it (HTTP Basic) and sends it with every call.
"use strict";

const $ = (id) => document.getElementById(id);
const conversationView = $("conversation");
const statusLine = $("status");
const messages = []; // the conversation sent with every request: {role, content}
let busy = false;
let comparison = null; // {id, replies: {A, B}} while the user has not chosen

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function setBusy(value) {
  busy = value;
  $("send").disabled = value;
}

function addBubble(role, text) {
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  bubble.textContent = text; // never innerHTML: model output is untrusted text
  conversationView.appendChild(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

function settings() {
  return {
    model: $("model").value,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(await errorMessage(response));
  const { data } = await response.json();
  for (const model of data) {
    $("model").add(new Option(model.id, model.id));
    $("model-b").add(new Option(model.id, model.id));
  }
  if (data.length > 1) $("model-b").selectedIndex = 1;
  const health = await (await fetch("/health")).json();
  // A/B compares two different models, and only a server that collects feedback records the choice
  $("ab-toggle").hidden = !health.collect_feedback || data.length < 2;
}

// Parses "data: ..." server-sent events out of the byte stream; calls onEvent with each JSON payload.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onEvent(JSON.parse(payload));
      }
    }
  }
}

async function streamReply() {
  const bubble = addBubble("assistant", "");
  bubble.dataset.state = "streaming";
  bubble.dataset.chunks = "0";
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...settings(), messages, stream: true }),
  });
  if (!response.ok) {
    bubble.remove();
    throw new Error(await errorMessage(response));
  }
  let finish = null;
  await readEvents(response, (chunk) => {
    if (chunk.error) throw new Error(chunk.error.message);
    const choice = chunk.choices[0];
    if (!choice) return;
    if (choice.delta.content) {
      bubble.textContent += choice.delta.content;
      bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
      bubble.scrollIntoView({ block: "end" });
    }
    if (choice.finish_reason) finish = choice.finish_reason;
  });
  bubble.dataset.state = "done";
  messages.push({ role: "assistant", content: bubble.textContent });
  setStatus(`${settings().model}: ${finish === "length" ? "stopped at max tokens" : "done"}`);
}

async function startComparison() {
  const models = [$("model").value, $("model-b").value];
  setStatus("Generating two replies…");
  const { temperature, max_tokens } = settings();
  const before = messages.slice(0, -1); // the new user message goes as `prompt`
  const prompt = messages[messages.length - 1].content;
  const response = await fetch("/api/comparisons", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages: before, prompt, models, temperature, max_tokens }),
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  comparison = await response.json();
  $("reply-a").textContent = comparison.replies.A;
  $("reply-b").textContent = comparison.replies.B;
  $("ab-panel").hidden = false;
  setStatus("Pick the better reply.");
}

async function choose(choice) {
  const response = await fetch(`/api/comparisons/${encodeURIComponent(comparison.id)}/choice`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ choice, annotator: $("annotator").value }),
  });
  if (!response.ok) {
    setStatus(await errorMessage(response), true);
    return;
  }
  const result = await response.json();
  const kept = choice === "tie" ? "A" : choice;
  const bubble = addBubble("assistant", comparison.replies[kept]);
  bubble.dataset.state = "done";
  messages.push({ role: "assistant", content: comparison.replies[kept] });
  const written = result.written.length ? `recorded in ${result.written.join(" and ")}` : "nothing to record";
  setStatus(`Thanks! A was ${result.key.A}, B was ${result.key.B}; ${written}.`);
  statusLine.dataset.recorded = result.id;
  comparison = null;
  $("ab-panel").hidden = true;
  setBusy(false);
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || busy) return;
  setBusy(true);
  setStatus("");
  messages.push({ role: "user", content: text });
  addBubble("user", text);
  $("prompt").value = "";
  try {
    if ($("ab-mode").checked) {
      await startComparison(); // stays busy until the user chooses
      return;
    }
    await streamReply();
  } catch (error) {
    messages.pop(); // the turn did not happen: let the user edit and resend
    setStatus(error.message, true);
  }
  setBusy(false);
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) send(event);
});
$("ab-mode").addEventListener("change", () => {
  $("ab-settings").hidden = !$("ab-mode").checked;
});
for (const button of document.querySelectorAll("#ab-panel button")) {
  button.addEventListener("click", () => choose(button.dataset.choice));
}
$("annotator").value = localStorage.getItem("chatforge-annotator") || "anonymous";
$("annotator").addEventListener("change", () => localStorage.setItem("chatforge-annotator", $("annotator").value));
$("clear").addEventListener("click", () => {
  messages.length = 0;
  conversationView.replaceChildren();
  $("ab-panel").hidden = true;
  comparison = null;
  setBusy(false);
  setStatus("");
});
loadModels().catch((error) => setStatus(`cannot list models: ${error.message}`, true));

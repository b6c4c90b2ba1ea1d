// The chat page of `hybridmoe serve`: OpenAI chat completions streamed with fetch() and rendered as they arrive.
//
// The conversation is kept as OpenAI messages (assistant turns with their reasoning_content and tool_calls) and sent
// whole with each request, with the system prompt in front. Streams are server-sent events read from the response
// body: `data: {chunk}` lines whose choices[0].delta holds reasoning_content, content or tool_calls, an error event
// `data: {"error": {...}}` if generation fails midway, then `data: [DONE]`. Stop aborts the fetch; the server sees
// the connection close and cancels the request in the engine. Model output is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "hybridmoe.apiKey";

let conversation = []; // OpenAI messages of this chat, without the system prompt (a new array for a new chat)
let pendingCalls = []; // tool calls of the last assistant turn still waiting for their result
let modelName = null; // from /v1/models
let controller = null; // the AbortController of the generation in progress

// ------------------------------------------------------------------------------------------ talking to the server

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// One line saying what went wrong, from an OpenAI error body ({"error": {"message": ...}}) when there is one.
function errorText(body, status) {
  const message = body?.error?.message;
  return message ? `${message} (HTTP ${status})` : `the server answered HTTP ${status}`;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(errorText(body, r.status));
    modelName = body.data[0].id;
    $("model").textContent = modelName;
    document.querySelectorAll(".error.models").forEach((el) => el.remove());
  } catch (e) {
    modelName = null;
    $("model").textContent = "no model";
    showError(`cannot list the models: ${e.message}`, "models");
  }
}

function requestBody(history) {
  const system = $("system-prompt").value.trim();
  const body = {
    model: modelName,
    messages: system ? [{ role: "system", content: system }, ...history] : history,
    stream: true,
    chat_template_kwargs: { enable_thinking: $("reasoning").checked },
  };
  // Empty fields are left out, so the server's defaults apply; the server checks the values and says what is wrong.
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  body.temperature = number("temperature");
  body.max_tokens = number("max-tokens");
  if ($("reasoning").checked) body.reasoning_budget = number("reasoning-budget");
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch (e) {
      throw new Error(`the Tools field is not valid JSON (${e.message})`);
    }
  }
  return body;
}

// The JSON objects of a server-sent event stream, until `data: [DONE]`.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop(); // the last line may still be arriving
    for (const line of lines) {
      if (!line.startsWith("data:")) continue; // blank lines between events, comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ------------------------------------------------------------------------------------------ rendering

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function append(el) {
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.append(el);
  if (atBottom) box.scrollTop = box.scrollHeight; // follow the stream unless the reader scrolled up
  return el;
}

function showError(text, kind) {
  const el = element("div", `error ${kind ?? ""}`, text);
  el.setAttribute("role", "alert");
  return append(el);
}

function showUser(message, call) {
  const el = element("div", `message ${message.role}`);
  if (call) el.append(element("div", "label", `result of ${call.function.name}`));
  el.append(element("div", "text", message.content));
  return append(el);
}

function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text; // not JSON (yet): shown as it came
  }
}

// One assistant turn being streamed: its reasoning (a <details> block, open while the model thinks), its answer and
// its tool calls.
class AssistantView {
  constructor() {
    this.el = append(element("div", "message assistant"));
    this.reasoning = null;
    this.content = null;
    this.calls = [];
  }

  addReasoning(text) {
    if (!this.reasoning) {
      const details = element("details", "reasoning thinking");
      details.open = true;
      details.append(element("summary", "", "Thinking…"), element("div", "text"));
      this.el.prepend(details);
      this.reasoning = details;
    }
    this.reasoning.lastChild.append(text); // a text node: never parsed as HTML
    this.scroll();
  }

  addContent(text) {
    this.closeReasoning();
    if (!this.content) this.content = this.el.appendChild(element("div", "text"));
    this.content.append(text);
    this.scroll();
  }

  showCall(index, call) {
    this.closeReasoning();
    if (!this.calls[index]) {
      const box = this.el.appendChild(element("div", "tool-call"));
      box.append(element("span", "label", "tool call"), element("span", "name"), element("pre", "arguments"));
      this.calls[index] = box;
    }
    this.calls[index].querySelector(".name").textContent = call.function.name;
    this.calls[index].querySelector(".arguments").textContent = prettyArguments(call.function.arguments);
    this.scroll();
  }

  note(text, className = "note") {
    this.el.append(element("div", className, text));
    this.scroll();
  }

  closeReasoning() {
    if (this.reasoning?.classList.contains("thinking")) {
      this.reasoning.classList.remove("thinking");
      this.reasoning.open = false;
      this.reasoning.firstChild.textContent = "Reasoning";
    }
  }

  scroll() {
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function updatePlaceholder() {
  const call = pendingCalls[0];
  $("input").placeholder = call
    ? `Result of ${call.function.name}(${call.function.arguments}), sent back as the tool's answer`
    : "Message (Enter sends, Shift+Enter a new line)";
}

// ------------------------------------------------------------------------------------------ a turn

// Streams one assistant turn into the page and onto `history` (the conversation it answers). Returns whether
// anything was generated.
async function generate(history) {
  const view = new AssistantView();
  const reply = { role: "assistant", content: "", reasoning_content: "" };
  const calls = [];
  let failure = null;
  controller = new AbortController();
  setBusy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(history)),
      signal: controller.signal,
    });
    if (!r.ok) throw new Error(errorText(await r.json().catch(() => null), r.status));
    for await (const event of sseEvents(r)) {
      if (event.error) throw new Error(event.error.message ?? "the generation failed");
      const delta = event.choices?.[0]?.delta ?? {};
      if (delta.reasoning_content) {
        reply.reasoning_content += delta.reasoning_content;
        view.addReasoning(delta.reasoning_content);
      }
      if (delta.content) {
        reply.content += delta.content;
        view.addContent(delta.content);
      }
      // A streamed call comes in pieces keyed by its index: id and name, then arguments (OpenAI's format).
      for (const piece of delta.tool_calls ?? []) {
        calls[piece.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
        const call = calls[piece.index];
        call.id = piece.id ?? call.id;
        call.function.name += piece.function?.name ?? "";
        call.function.arguments += piece.function?.arguments ?? "";
        view.showCall(piece.index, call);
      }
    }
  } catch (e) {
    failure = e;
  } finally {
    controller = null;
    view.closeReasoning();
    setBusy(false);
  }
  const made = Boolean(reply.content || reply.reasoning_content || calls.length);
  if (!made) view.el.remove(); // an empty turn is not shown; its error is, on its own
  if (failure?.name === "AbortError") {
    if (made) view.note("stopped");
  } else if (failure) {
    if (made) view.note(failure.message, "error");
    else showError(failure.message);
  }
  if (history !== conversation) return made; // "New chat" was pressed meanwhile
  if (made) {
    // What arrived stays in the conversation, also when stopped, so the next turn builds on what the reader saw.
    const message = { role: "assistant", content: reply.content };
    if (reply.reasoning_content) message.reasoning_content = reply.reasoning_content;
    if (calls.length) message.tool_calls = calls.filter(Boolean);
    history.push(message);
    pendingCalls = message.tool_calls ? [...message.tool_calls] : [];
  }
  updatePlaceholder();
  $("input").focus();
  return made;
}

// The text in the box goes into the conversation (as the user's turn, or as the result of the tool call waiting for
// one), and the model answers once no call is left without its result. A turn that produced nothing (an error, say)
// is taken back: the text returns to the box.
async function send() {
  const text = $("input").value;
  if (controller || !text.trim()) return;
  if (!modelName) await loadModel();
  if (!modelName) return;
  const call = pendingCalls.shift();
  const message = call ? { role: "tool", tool_call_id: call.id, content: text } : { role: "user", content: text };
  const history = conversation;
  history.push(message);
  const bubble = showUser(message, call);
  $("input").value = "";
  if (pendingCalls.length) return updatePlaceholder();
  if (!(await generate(history)) && history === conversation) {
    history.pop();
    bubble.remove();
    if (call) pendingCalls.unshift(call);
    $("input").value = text;
    updatePlaceholder();
  }
}

function newChat() {
  controller?.abort();
  conversation = [];
  pendingCalls = [];
  $("messages").replaceChildren();
  updatePlaceholder();
  $("input").focus();
}

// ------------------------------------------------------------------------------------------ wiring

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", newChat);
$("reasoning").addEventListener("change", () => ($("reasoning-budget").disabled = !$("reasoning").checked));
$("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadModel();
});
loadModel();

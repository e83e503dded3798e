// quadrant's chat page: streams /v1/chat/completions (SSE) into the conversation. No dependencies.
"use strict";
const $ = (id) => document.getElementById(id);
let history = [];
let controller = null;

function headers() {
  const h = { "content-type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.authorization = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("model").innerHTML = "";
    for (const m of body.data) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      $("model").appendChild(option);
    }
  } catch (e) {
    $("error").textContent = "could not list models: " + e.message;
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  $("error").textContent = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top_p").value),
    max_tokens: Number($("max_tokens").value),
  };
  controller = new AbortController();
  setBusy(true);
  let answer = "", tokens = 0, first = null;
  const start = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            answer += piece;
            bubble.textContent = answer;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    setBusy(false);
    controller = null;
    history.push({ role: "assistant", content: answer });
    const seconds = first === null ? 0 : (performance.now() - first) / 1000;
    const ttft = first === null ? 0 : (first - start) / 1000;
    $("stats").textContent = tokens && seconds > 0
      ? `${tokens} tokens, ${(tokens / seconds).toFixed(1)} tokens/s, first token after ${ttft.toFixed(2)} s`
      : "";
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new_chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("messages").innerHTML = "";
  $("stats").textContent = $("error").textContent = "";
});
$("api_key").value = localStorage.getItem("quadrant_api_key") || "";
$("api_key").addEventListener("change", () => { localStorage.setItem("quadrant_api_key", $("api_key").value); loadModels(); });
loadModels();

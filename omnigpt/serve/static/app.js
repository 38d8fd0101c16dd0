// omnigpt web chat: plain JavaScript, no build step. Talks to the same OpenAI-compatible API as any client:
// GET /v1/models for the picker, POST /v1/chat/completions with stream=true, read as server-sent events.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  messages: [],        // the conversation as sent to the API (without the system prompt)
  image: null,         // {dataUrl, name} of the attached image, sent with the next message
  abort: null,         // AbortController of the answer being streamed
};

// ---- settings, remembered across visits --------------------------------------------------------------------
const SETTINGS = ["system", "temperature", "top-p", "max-tokens", "seed", "api-key"];

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem("omnigpt." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("input", () => {
      localStorage.setItem("omnigpt." + id, $(id).value);
      showSliderValues();
    });
  }
  showSliderValues();
}

function showSliderValues() {
  $("temperature-value").textContent = $("temperature").value;
  $("top-p-value").textContent = $("top-p").value;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- model picker ------------------------------------------------------------------------------------------
async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const select = $("model");
    select.replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
    const saved = localStorage.getItem("omnigpt.model");
    if (saved && body.data.some((m) => m.id === saved)) select.value = saved;
    setStatus(`${body.data.length} model(s) available`);
  } catch (e) {
    setStatus("could not list models: " + e.message);
  }
}

// ---- conversation view -------------------------------------------------------------------------------------
function addBubble(role, text, imageUrl) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "attached image";
    div.appendChild(img);
  }
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;  // never innerHTML: model output is untrusted text
  div.appendChild(body);
  $("messages").appendChild(div);
  scrollDown();
  return div;
}

function scrollDown() {
  const m = $("messages");
  m.scrollTop = m.scrollHeight;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---- image attachment --------------------------------------------------------------------------------------
function attachImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    setStatus("not an image: " + file.name);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    state.image = { dataUrl: reader.result, name: file.name };
    $("attachment-preview").src = reader.result;
    $("attachment-name").textContent = file.name;
    $("attachment").hidden = false;
  };
  reader.readAsDataURL(file);  // sent inline as a data URL: the server fetches nothing
}

function clearImage() {
  state.image = null;
  $("image").value = "";
  $("attachment").hidden = true;
  $("attachment-preview").removeAttribute("src");
}

// ---- sending and streaming ---------------------------------------------------------------------------------
function requestBody() {
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = parseInt(seed, 10);
  return body;
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() && !state.image) return;
  const content = state.image
    ? [{ type: "text", text }, { type: "image_url", image_url: { url: state.image.dataUrl } }]
    : text;
  addBubble("user", text, state.image && state.image.dataUrl);
  state.messages.push({ role: "user", content });
  $("prompt").value = "";
  clearImage();
  localStorage.setItem("omnigpt.model", $("model").value);

  const bubble = addBubble("assistant", "");
  bubble.classList.add("streaming");
  bubble.dataset.chunks = "0";
  const out = bubble.querySelector(".text");
  state.abort = new AbortController();
  setBusy(true);
  const started = performance.now();
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.abort.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `${r.status} ${r.statusText}`);
    }
    for await (const event of serverSentEvents(r.body)) {
      if (event.error) throw new Error(event.error.message);
      for (const choice of event.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          answer += delta;
          out.textContent = answer;
          bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
          scrollDown();
        }
        if (choice.finish_reason) bubble.dataset.finish = choice.finish_reason;
      }
      if (event.usage) {
        const secs = (performance.now() - started) / 1000;
        const meta = document.createElement("span");
        meta.className = "meta";
        meta.textContent = `${event.usage.completion_tokens} tokens in ${secs.toFixed(1)} s · ${bubble.dataset.finish || ""}`;
        bubble.appendChild(meta);
      }
    }
    state.messages.push({ role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") {
      state.messages.push({ role: "assistant", content: answer });
    } else {
      state.messages.pop();  // the failed turn is not part of the conversation
      if (!answer) bubble.remove();
      addBubble("error", "Error: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.dataset.done = "true";
    state.abort = null;
    setBusy(false);
    $("prompt").focus();
  }
}

// Parse a text/event-stream body into JSON events, stopping at `data: [DONE]`.
async function* serverSentEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- wiring ------------------------------------------------------------------------------------------------
function init() {
  loadSettings();
  loadModels();
  $("api-key").addEventListener("change", loadModels);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("image").addEventListener("change", (e) => attachImage(e.target.files[0]));
  $("attachment-remove").addEventListener("click", clearImage);
  $("prompt").addEventListener("paste", (e) => {
    const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
    if (item) attachImage(item.getAsFile());
  });
  $("new-chat").addEventListener("click", () => {
    if (state.abort) state.abort.abort();
    state.messages = [];
    $("messages").replaceChildren();
    clearImage();
  });
  $("toggle-settings").addEventListener("click", () => {
    const aside = $("settings");
    aside.hidden = !aside.hidden;
    $("toggle-settings").setAttribute("aria-expanded", String(!aside.hidden));
  });
  $("prompt").focus();
}

init();

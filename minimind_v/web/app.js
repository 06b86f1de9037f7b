// The chat page of `minimind-v serve`, in plain JavaScript.
//
// State: one picture (base64, sent with every request: the server keeps no conversation) and the
// messages so far. Asking POSTs {image, messages, temperature, top_p, max_new_tokens, stream: true}
// to /api/chat and reads the reply as server-sent events from the response body:
//   event: queue  {"ahead": n}       waiting in line behind n requests
//   event: start  {...}              this request's turn: the model is generating
//   event: text   {"text": piece}    the next piece of the answer
//   event: done   {"tokens", "seconds", "tokens_per_s"}
// Stop aborts the request; the server notices the closed connection and stops generating.
"use strict";

const $ = (id) => document.getElementById(id);
let picture = null;          // base64 of the chosen image file, or null
let messages = [];           // [{role, content}], the conversation about the current picture
let controller = null;       // AbortController of the request in flight

function setState(state) {
  document.body.dataset.state = state;
  $("send").disabled = state === "busy";
  $("stop").disabled = state !== "busy";
}

function status(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("transcript").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function newChat() {
  messages = [];
  $("transcript").textContent = "";
  status(picture ? "ask about the picture" : "choose a picture, then ask");
}

// ---------------------------------------------------------------- the picture
function usePicture(blob, chosen) {
  const reader = new FileReader();
  reader.onload = () => {
    picture = reader.result.split(",")[1];           // drop the "data:image/png;base64," prefix
    $("preview").src = reader.result;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    document.querySelectorAll("#examples img").forEach((img) => img.classList.toggle("chosen", img === chosen));
    if (chosen) $("file").value = "";                 // the file box no longer names the picture shown
    newChat();                                        // a new picture starts a new conversation
  };
  reader.readAsDataURL(blob);
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) usePicture(e.target.files[0], null); });
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  if (e.dataTransfer.files[0]) usePicture(e.dataTransfer.files[0], null);
});

async function loadInfo() {
  const info = await (await fetch("/api/info")).json();
  $("model").textContent = `${info.name} · ${info.parameters.toLocaleString("en")} parameters` +
    (info.image_size ? ` · ${info.image_size} px pictures` : " · text only");
  $("queue").textContent = info.queue ? `${info.queue} in line` : "";
  if (info.examples.length) {
    $("examples-box").hidden = false;
    for (const name of info.examples) {
      const img = document.createElement("img");
      img.src = "/examples/" + encodeURIComponent(name);
      img.title = name;
      img.addEventListener("click", async () => usePicture(await (await fetch(img.src)).blob(), img));
      $("examples").appendChild(img);
    }
  }
}

// ---------------------------------------------------------------- asking
function settings() {
  const num = (id) => Number($(id).value);
  const topP = num("top-p");
  return { temperature: num("temperature"), top_p: topP >= 1 ? null : topP, max_new_tokens: num("max-tokens") };
}

async function ask(question) {
  messages.push({ role: "user", content: question });
  addMessage("user", question);
  const answer = addMessage("assistant streaming", "");
  const meta = document.createElement("div");
  meta.className = "meta";
  answer.after(meta);
  setState("busy");
  status("sending…");
  controller = new AbortController();
  let text = "";
  try {
    const res = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image: picture, messages, stream: true, ...settings() }),
      signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({ error: res.statusText }));
      throw new Error(err.error || res.statusText);
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {      // one event per blank-line-terminated block
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = (block.match(/^event: (.*)$/m) || [])[1];
        const data = JSON.parse((block.match(/^data: (.*)$/m) || [])[1] || "{}");
        if (event === "queue") {
          status(`waiting: ${data.ahead} ahead of you`);
          $("queue").textContent = `${data.ahead + 1} in line`;
        } else if (event === "start") {
          status("generating…");
        } else if (event === "text") {
          text += data.text;
          answer.textContent = text;
        } else if (event === "done") {
          meta.textContent = `${data.tokens} token${data.tokens === 1 ? "" : "s"} · ` +
            `${data.tokens_per_s.toFixed(1)} tokens/s · ${data.seconds.toFixed(2)} s`;
          status("");
          $("queue").textContent = "";
        }
      }
    }
    messages.push({ role: "assistant", content: text });
  } catch (e) {
    messages.pop();                                      // the question stays unanswered: ask again
    if (e.name === "AbortError") {
      meta.textContent = "stopped";
      messages.push({ role: "user", content: question }, { role: "assistant", content: text });
    } else {
      answer.classList.add("error");
      answer.textContent = e.message;
    }
    status("");
  } finally {
    answer.classList.remove("streaming");
    controller = null;
    setState("idle");
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || document.body.dataset.state === "busy") return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", newChat);

loadInfo().then(() => { newChat(); setState("idle"); },
                (e) => { status("cannot reach the server: " + e.message); setState("idle"); });

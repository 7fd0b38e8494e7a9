// The TwoTower playground: streams POST /v1/completions with stream_steps and draws each block as S
// cells. Masked cells are hatched and empty, cells committed at the current denoiser step are
// highlighted, committed blocks are appended as text. Server events are drawn in order through one
// queue, at most one step per `pace` milliseconds (pace 0: as they arrive).
"use strict";

const $ = (id) => document.getElementById(id);

// What a test (or a curious person) can read: every step drawn, the final state.
window.playground = { log: [], done: false, error: null, summary: null };

let controller = null;
let queue = [];
let draining = false;
let stats = null;

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

function requestBody() {
  const mode = $("mode").value;
  const body = {
    prompt: $("prompt").value,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    mode,
    block_size: Number($("block-size").value),
    confidence_threshold: Number($("threshold").value),
    stream: true,
    stream_steps: true,
    stream_options: { include_usage: true },
  };
  if (mode === "diffusion") {
    body.steps_per_block = Number($("steps").value);
    body.anchor = $("anchor").checked;
  }
  return body;
}

// ---- drawing --------------------------------------------------------------------------------------
function row(index) {
  let el = document.querySelector(`.row[data-block="${index}"]`);
  if (el) return el;
  el = document.createElement("div");
  el.className = "row";
  el.dataset.block = String(index);
  const label = document.createElement("span");
  label.className = "label";
  const cells = document.createElement("span");
  cells.className = "cells";
  for (let i = 0; i < stats.size; i++) {
    const c = document.createElement("span");
    c.className = "cell slot";
    c.textContent = " ";
    cells.appendChild(c);
  }
  el.append(label, cells);
  $("blocks").appendChild(el);
  return el;
}

function shown(text) {
  return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

function paint(step, before) {
  const size = stats.size;
  // what the previous step committed is no longer new
  $("blocks").querySelectorAll(".cell.new").forEach((el) => (el.className = "cell done"));
  step.cells.forEach((cell, i) => {
    const pos = step.position + i;
    const el = row(Math.floor(pos / size)).querySelector(".cells").children[pos % size];
    const masked = cell.masked || (before && cell.new);
    el.className = "cell " + (masked ? "masked" : cell.new ? "new" : "done");
    el.textContent = masked ? " " : shown(cell.text);
    el.title = masked ? "masked" : JSON.stringify(cell.text);
  });
  const label = row(step.block).querySelector(".label");
  label.textContent =
    stats.mode === "diffusion" ? `block ${step.block} · step ${before ? "–" : step.step + 1}` : `forward ${step.step + 1}`;
}

function record(step) {
  const masked = step.cells.filter((c) => c.masked).length;
  window.playground.log.push({ block: step.block, step: step.step, cells: step.cells.length, masked });
}

// ---- events in order, at the chosen pace ---------------------------------------------------------
function enqueue(item) {
  queue.push(item);
  if (!draining) drain();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function drain() {
  draining = true;
  while (queue.length) {
    const item = queue.shift();
    const pace = Number($("pace").value);
    if (item.kind === "step") {
      const step = item.data;
      const fresh = stats.mode === "diffusion" && !document.querySelector(`.row[data-block="${step.block}"]`);
      if (fresh && pace > 0) {
        paint(step, true); // the block as it started: every position to fill still masked
        await sleep(pace);
      }
      paint(step, false);
      record(step);
      if (stats.mode !== "speculative") stats.forwards += 1; // a speculative round drafts in several forwards
      $("stat-forwards").textContent = String(stats.forwards);
      const tokens = $("blocks").querySelectorAll(".cell.new, .cell.done").length;
      $("stat-tokens").textContent = String(tokens);
      if (stats.mode === "diffusion") $("stat-tpf").textContent = (tokens / stats.forwards).toFixed(2);
      if (pace > 0) await sleep(pace);
    } else if (item.kind === "chunk") {
      const choice = item.data.choices && item.data.choices[0];
      if (choice) {
        $("output").textContent += choice.text;
        if (choice.finish_reason) $("stat-finish").textContent = choice.finish_reason;
        stats.blocks += 1;
        $("stat-blocks").textContent = String(stats.blocks);
      }
      if (item.data.usage) $("stat-tokens").textContent = String(item.data.usage.completion_tokens);
    } else if (item.kind === "summary") {
      showSummary(item.data);
    } else if (item.kind === "error") {
      showError(item.data);
    } else if (item.kind === "end") {
      finish();
    }
  }
  draining = false;
}

function showSummary(s) {
  window.playground.summary = s;
  $("stat-tokens").textContent = String(s.completion_tokens);
  $("stat-forwards").textContent = String(s.forwards);
  $("stat-tpf").textContent = s.tokens_per_forward === null ? "–" : s.tokens_per_forward.toFixed(2);
  $("stat-blocks").textContent = String(s.blocks);
  $("stat-time").textContent = `${s.seconds.toFixed(2)} s`;
  $("stat-finish").textContent = s.finish_reason;
  $("blocks").querySelectorAll(".cell.new").forEach((el) => (el.className = "cell done"));
  $("blocks").querySelectorAll(".cell.masked, .cell.slot").forEach((el) => (el.className = "cell unused"));
}

function showError(message) {
  window.playground.error = message;
  $("error").textContent = message;
  $("error").hidden = false;
}

function finish() {
  controller = null;
  $("run").disabled = false;
  $("stop").disabled = true;
  window.playground.done = true;
  document.body.dataset.state = window.playground.error ? "error" : "done";
}

// ---- the request ---------------------------------------------------------------------------------
function reset() {
  queue = [];
  stats = { mode: $("mode").value, size: Number($("block-size").value), forwards: 0, blocks: 0 };
  window.playground = { log: [], done: false, error: null, summary: null };
  $("blocks").replaceChildren();
  $("output").textContent = "";
  $("prompt-echo").textContent = $("prompt").value;
  $("error").hidden = true;
  for (const id of ["stat-tokens", "stat-forwards", "stat-blocks"]) $(id).textContent = "0";
  for (const id of ["stat-tpf", "stat-time", "stat-finish"]) $(id).textContent = "–";
  $("stat-forwards-label").firstChild.textContent =
    stats.mode === "ar" ? "forwards " : "denoiser forwards (NFE) ";
  $("stat-blocks-label").firstChild.textContent = stats.mode === "diffusion" ? "blocks " : "commits ";
}

async function run(event) {
  event.preventDefault();
  if (controller) return;
  reset();
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  document.body.dataset.state = "running";
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST",
      headers: apiHeaders(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      if (resp.status === 401) $("key-row").hidden = false;
      enqueue({ kind: "error", data: (body.error && body.error.message) || `HTTP ${resp.status}` });
    } else {
      await readEvents(resp.body);
    }
  } catch (err) {
    if (err.name !== "AbortError") enqueue({ kind: "error", data: String(err) });
  }
  enqueue({ kind: "end" });
}

async function readEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      handle(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
}

function handle(raw) {
  let name = null;
  const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  const text = data.join("\n");
  if (!text || text === "[DONE]") return;
  const body = JSON.parse(text);
  if (name === "step") enqueue({ kind: "step", data: body });
  else if (name === "summary") enqueue({ kind: "summary", data: body });
  else if (body.error) enqueue({ kind: "error", data: body.error.message });
  else enqueue({ kind: "chunk", data: body });
}

function stop() {
  if (controller) controller.abort(); // the server sees the disconnect and cancels the request
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: apiHeaders() });
    if (resp.status === 401) {
      $("key-row").hidden = false;
      $("model-name").textContent = "(API key needed)";
      return;
    }
    const body = await resp.json();
    $("model-name").textContent = body.data[0].id;
  } catch (err) {
    $("model-name").textContent = "(unreachable)";
  }
}

function syncControls() {
  const diffusion = $("mode").value === "diffusion";
  $("steps").disabled = !diffusion;
  $("anchor").disabled = !diffusion;
  $("threshold").disabled = $("mode").value === "ar";
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

$("controls").addEventListener("submit", run);
$("stop").addEventListener("click", stop);
$("mode").addEventListener("change", syncControls);
$("threshold").addEventListener("input", syncControls);
$("api-key").addEventListener("change", loadModel);
syncControls();
loadModel();

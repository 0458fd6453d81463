// halos-server dashboard: plain JS on the public /v1 API (no build step).
//
// The API key is asked once and kept in sessionStorage (this tab only). A run's rounds are listed
// with their status and lineage; loss, reward accuracy and margin are plotted over the run's
// cumulative steps, round boundaries as dashed lines, eval points as dots. While a round runs,
// its job's Server-Sent Events stream (/v1/jobs/{id}/events/stream) adds points and status live.
// What is plotted is exposed as window.halosPlotData (tests compare it with the API).
"use strict";

const KEY_STORE = "halos.apiKey";
const METRICS = [
  { key: "loss", title: "loss" },
  { key: "rewards/accuracy", title: "reward accuracy" },
  { key: "rewards/margin", title: "reward margin" },
];
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

const state = { run: null, points: new Map(), charts: [], stream: null, redraw: null };
window.halosPlotData = null;

const $ = (sel) => document.querySelector(sel);

function apiKey() { return sessionStorage.getItem(KEY_STORE); }

async function api(path) {
  const resp = await fetch(path, { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (resp.status === 401) { showLogin("this key was refused (401)"); throw new Error("unauthorized"); }
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

function showLogin(message) {
  sessionStorage.removeItem(KEY_STORE);
  $("#login").hidden = false; $("#app").hidden = true; $("#logout").hidden = true;
  $("#login-error").textContent = message || "";
}

async function start() {
  if (!apiKey()) { showLogin(); return; }
  $("#login").hidden = true; $("#app").hidden = false; $("#logout").hidden = false;
  $("#who").textContent = `key ${apiKey().slice(0, 8)}…`;
  await loadRuns();
  const wanted = new URLSearchParams(location.hash.slice(1)).get("run");
  if (wanted) await selectRun(wanted);
}

async function loadRuns() {
  const items = [];
  let cursor = null;
  for (let page = 0; page < 20; page++) {
    const q = cursor ? `?limit=200&cursor=${encodeURIComponent(cursor)}` : "?limit=200";
    const body = await api(`/v1/runs${q}`);
    items.push(...body.items);
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  const ul = $("#runs");
  ul.replaceChildren(...items.map((run) => {
    const li = document.createElement("li");
    li.dataset.runId = run.id;
    li.innerHTML = `${escapeHtml(run.name || "(unnamed)")} <small>${run.id} · ${escapeHtml(run.loss?.name || "")}</small>`;
    li.addEventListener("click", () => { location.hash = `run=${run.id}`; selectRun(run.id); });
    return li;
  }));
  if (!items.length) ul.innerHTML = "<li>no runs yet</li>";
}

async function selectRun(runId) {
  stopStream();
  for (const li of document.querySelectorAll("#runs li")) li.classList.toggle("selected", li.dataset.runId === runId);
  const run = await api(`/v1/runs/${encodeURIComponent(runId)}`);
  state.run = run;
  state.points = new Map();
  for (const rnd of run.rounds) {
    let after = null;
    for (let page = 0; page < 1000; page++) {
      const q = after === null ? "?limit=10000" : `?limit=10000&after_step=${after}`;
      const series = await api(`/v1/jobs/${rnd.job_id}/metrics${q}`);
      for (const p of series.items) addPoint(rnd.job_id, p);
      after = series.next_after_step;
      if (after === null || after === undefined) break;
    }
  }
  $("#run").hidden = false;
  $("#run-title").textContent = `${run.name || "(unnamed run)"} — ${run.id}`;
  $("#run-meta").textContent = `model ${run.model_id} · loss ${JSON.stringify(run.loss)}`;
  renderRounds();
  render();
  followLive();
}

// One point per (job, step, split): a retried attempt's point replaces the earlier attempt's.
function addPoint(jobId, p) {
  const key = `${jobId}|${p.step}|${p.split}`;
  const old = state.points.get(key);
  if (!old || old.attempt <= p.attempt) state.points.set(key, { job_id: jobId, ...p });
}

function renderRounds() {
  const tbody = $("#rounds tbody");
  tbody.replaceChildren(...state.run.rounds.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.jobId = r.job_id;
    const steps = roundSteps(r.job_id);
    tr.innerHTML = `<td>${r.index}</td><td class="status status-${r.status}">${r.status}</td>` +
      `<td>${steps ? `${steps.first}–${steps.last}` : ""}</td><td>${r.job_id}</td>` +
      `<td>${r.parent_checkpoint_id || "SFT model"}</td><td>${r.checkpoint_id || ""}</td>` +
      `<td class="error">${escapeHtml(r.error || "")}</td>`;
    return tr;
  }));
}

function roundSteps(jobId) {
  const steps = [...state.points.values()].filter((p) => p.job_id === jobId && p.split === "train").map((p) => p.step);
  return steps.length ? { first: Math.min(...steps), last: Math.max(...steps) } : null;
}

// The plotted data, built from state.points: x = the run's cumulative step.
function plotData() {
  const rounds = state.run.rounds.map((r) => ({ index: r.index, job_id: r.job_id, status: r.status,
    ...(roundSteps(r.job_id) || { first: null, last: null }) }));
  const series = {};
  for (const m of METRICS) {
    const pick = (split) => [...state.points.values()]
      .filter((p) => p.split === split && typeof p.data[m.key] === "number")
      .map((p) => [p.step, p.data[m.key]])
      .sort((a, b) => a[0] - b[0]);
    series[m.key] = { train: pick("train"), eval: pick("eval") };
  }
  const boundaries = rounds.filter((r) => r.last !== null).map((r) => ({ round: r.index, step: r.last }));
  return { run_id: state.run.id, rounds, series, boundaries };
}

function render() {
  const data = plotData();
  window.halosPlotData = data;
  document.body.dataset.plotted = String(Object.values(data.series).reduce((n, s) => n + s.train.length + s.eval.length, 0));
  for (const chart of state.charts) chart.destroy();
  state.charts = [];
  const host = $("#charts");
  host.replaceChildren();
  for (const m of METRICS) {
    const { train, eval: ev } = data.series[m.key];
    const xs = [...new Set([...train.map((p) => p[0]), ...ev.map((p) => p[0])])].sort((a, b) => a - b);
    const trainY = new Map(train), evalY = new Map(ev);
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.metric = m.key;
    box.innerHTML = `<h3>${m.title}</h3>`;
    host.appendChild(box);
    const opts = {
      width: 460, height: 260,
      scales: { x: { time: false } },
      axes: [{ label: "step (cumulative over the run)" }, {}],
      series: [
        { label: "step" },
        { label: "train", stroke: "#0b5cad", width: 1.5, spanGaps: true, points: { show: false } },
        { label: "eval", stroke: "#d9480f", width: 0, points: { show: true, size: 9, fill: "#d9480f" } },
      ],
      hooks: { draw: [(u) => drawBoundaries(u, data.boundaries)] },
    };
    state.charts.push(new uPlot(opts, [xs, xs.map((x) => trainY.get(x) ?? null), xs.map((x) => evalY.get(x) ?? null)], box));
  }
}

// Dashed vertical line after each round's last step, labelled with the round.
function drawBoundaries(u, boundaries) {
  const ctx = u.ctx;
  ctx.save();
  ctx.strokeStyle = "#888"; ctx.fillStyle = "#555"; ctx.setLineDash([5, 4]); ctx.lineWidth = 1;
  ctx.font = `${Math.round(11 * devicePixelRatio)}px sans-serif`;
  for (const b of boundaries) {
    const x = Math.round(u.valToPos(b.step, "x", true));
    if (!(x >= u.bbox.left && x <= u.bbox.left + u.bbox.width)) continue;
    ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
    ctx.fillText(`round ${b.round}`, x - 48 * devicePixelRatio, u.bbox.top + 12 * devicePixelRatio);
  }
  ctx.restore();
}

// ---------------------------------------------------------------- live: the job's SSE stream
// fetch() rather than EventSource: EventSource cannot send the Authorization header.

function followLive() {
  const live = state.run.rounds.find((r) => !TERMINAL.has(r.status));
  $("#live").textContent = live ? `live: round ${live.index} is ${live.status}` : "";
  if (live) openStream(live);
}

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

async function openStream(rnd) {
  stopStream();
  const controller = new AbortController();
  state.stream = controller;
  let lastId = null;
  while (!controller.signal.aborted) {
    try {
      const headers = { Authorization: `Bearer ${apiKey()}`, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const resp = await fetch(`/v1/jobs/${rnd.job_id}/events/stream`, { headers, signal: controller.signal });
      if (!resp.ok) throw new Error(`stream: HTTP ${resp.status}`);
      const ended = await readSse(resp.body, (msg) => {
        if (msg.id) lastId = msg.id;
        onMessage(rnd, msg);
      });
      if (ended) {  // the job finished: reload the run (statuses, checkpoints) and follow the next round
        if (state.stream === controller) { state.stream = null; await selectRun(state.run.id); }
        return;
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      $("#live").textContent = `stream interrupted (${err.message}); reconnecting…`;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

// Parse text/event-stream; returns true when the server sent `event: end`.
async function readSse(body, onMsg) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const msg = { event: "message", data: "", id: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;  // heartbeat comment
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "data") msg.data += (msg.data ? "\n" : "") + val;
        else if (field === "event") msg.event = val;
        else if (field === "id") msg.id = val;
      }
      if (!msg.data && msg.event === "message") continue;
      if (msg.event === "end") { onMsg(msg); return true; }
      onMsg(msg);
    }
  }
}

function onMessage(rnd, msg) {
  const data = msg.data ? JSON.parse(msg.data) : {};
  if (msg.event === "metric") {
    addPoint(rnd.job_id, data);
    scheduleRedraw();
  } else if (msg.event.startsWith("job.") && data.status) {
    rnd.status = data.status;
    if (data.data && data.data.error) rnd.error = data.data.error;
    $("#live").textContent = `live: round ${rnd.index} ${msg.event} (${data.status})`;
    renderRounds();
  }
}

function scheduleRedraw() {
  if (state.redraw) return;
  state.redraw = setTimeout(() => { state.redraw = null; renderRounds(); render(); }, 300);
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("#key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  start().catch((err) => console.error(err));
});
$("#logout").addEventListener("click", () => { stopStream(); showLogin(); });
start().catch((err) => console.error(err));

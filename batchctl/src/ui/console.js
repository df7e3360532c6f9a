// batchq console: the live parts of server-rendered pages. No framework, no build step.
"use strict";

// Forms that ask first (Cancel).
document.addEventListener("submit", (event) => {
  const question = event.target.dataset && event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});

// Pages whose parts marked data-live refresh themselves: the page is fetched again and
// each such element replaced by its namesake, every 2 s while the tab is visible.
function refreshLiveParts() {
  const live = document.querySelectorAll("[data-live][id]");
  if (live.length === 0) return;
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const element of document.querySelectorAll("[data-live][id]")) {
        const replacement = fresh.getElementById(element.id);
        if (replacement) element.replaceWith(document.importNode(replacement, true));
      }
    } catch (_) {
      // The next round tries again.
    }
  }, 2000);
}

// A page waiting for something (a job not accepted yet) reloads itself.
function reloadWhenAsked() {
  const waiting = document.querySelector("[data-reload-every]");
  if (waiting) {
    setTimeout(() => window.location.reload(), Number(waiting.dataset.reloadEvery) || 2000);
  }
}

function formatRate(rate) {
  if (!isFinite(rate) || rate <= 0) return "?";
  return rate < 10 ? rate.toFixed(1) : grouped(Math.round(rate));
}

function formatDuration(secs) {
  if (!isFinite(secs) || secs < 0) return "?";
  if (secs >= 3600) return `${Math.floor(secs / 3600)}h${String(Math.floor((secs % 3600) / 60)).padStart(2, "0")}m`;
  if (secs >= 60) return `${Math.floor(secs / 60)}m${String(Math.floor(secs % 60)).padStart(2, "0")}s`;
  return `${secs.toFixed(1)}s`;
}

function grouped(n) {
  return Number(n).toLocaleString("en-US");
}

function setText(id, text) {
  const element = document.getElementById(id);
  if (element) element.textContent = text;
}

// A job's page follows the job through Server-Sent Events until it ends, then reloads once
// to show its final failures and drop the Cancel button.
function followJob() {
  const live = document.getElementById("live");
  if (!live || live.dataset.terminal === "true" || !window.EventSource) return;
  // The chart starts at the job's start with what the page was rendered with; each event
  // adds a point.
  const counts = document.getElementById("counts");
  const samples = [];
  if (live.dataset.startedMs) samples.push([Number(live.dataset.startedMs), 0]);
  samples.push([Date.now(), Number(counts.dataset.succeeded) + Number(counts.dataset.failed)]);
  const chart = document.getElementById("chart");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  if (chart) chart.appendChild(line);
  const events = new EventSource(live.dataset.events);
  events.addEventListener("status", (event) => {
    const s = JSON.parse(event.data);
    const done = s.ops_succeeded + s.ops_failed;
    counts.dataset.succeeded = s.ops_succeeded;
    counts.dataset.failed = s.ops_failed;
    counts.dataset.total = s.ops_total;
    const state = document.getElementById("state");
    state.textContent = s.state;
    state.className = `badge state-${s.state}`;
    const progress = document.getElementById("progress");
    progress.className = `state-${s.state}`;
    progress.max = Math.max(s.ops_total, 1);
    progress.value = s.ops_total === 0 ? 1 : done;
    setText("done", grouped(done));
    setText("total", grouped(s.ops_total));
    setText("percent", `${(s.ops_total === 0 ? 100 : (done * 100) / s.ops_total).toFixed(1)}%`);
    setText("succeeded", grouped(s.ops_succeeded));
    setText("failed", grouped(s.ops_failed));
    setText("in-flight", grouped(s.fragments_in_flight));
    setText("fragments-done", grouped(s.fragments_done));
    if (s.started_at) {
      const until = s.finished_at ? Date.parse(s.finished_at) : Date.now();
      const rate = done / ((until - Date.parse(s.started_at)) / 1000);
      setText("rate", formatRate(rate));
      setText("eta", formatDuration((s.ops_total - done) / rate));
    }
    samples.push([Date.now(), done]);
    if (chart) draw();
    if (["succeeded", "failed", "cancelled", "rejected"].includes(s.state)) {
      events.close();
      setTimeout(() => window.location.reload(), 800);
    }
  });
  // The job was deleted (or never known): say so once, rather than reconnecting forever.
  events.addEventListener("gone", (event) => {
    events.close();
    setText("state", "gone");
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = event.data;
    live.prepend(note);
  });
  function draw() {
    if (samples.length > 1) {
      const [t0] = samples[0];
      const span = Math.max(samples[samples.length - 1][0] - t0, 1);
      const total = Math.max(Number(counts.dataset.total), 1);
      line.setAttribute("points", samples
        .map(([t, d]) => `${(((t - t0) / span) * 600).toFixed(1)},${(120 - (d / total) * 116 - 2).toFixed(1)}`)
        .join(" "));
    }
  }
  if (chart) draw();
}

refreshLiveParts();
reloadWhenAsked();
followJob();

// The console's only script: live job progress, and gold labelling through the public gold API.
"use strict";

const ACTIVE = new Set(["queued", "running"]);

function percent(value) {
  return (100 * value).toFixed(1) + "%";
}

async function api(path, options = {}) {
  const response = await fetch(path, {headers: {"Content-Type": "application/json"}, ...options});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function setField(scope, name, text) {
  scope.querySelectorAll(`[data-field="${name}"]`).forEach((el) => { el.textContent = text; });
}

function showJob(scope, job) {
  scope.dataset.status = job.status;
  scope.querySelectorAll('[data-field="status"]').forEach((el) => {
    el.textContent = job.status;
    el.className = `badge status-${job.status}`;
  });
  scope.querySelectorAll('[data-field="bar"]').forEach((el) => { el.style.width = percent(job.progress); });
  setField(scope, "progress", percent(job.progress));
  setField(scope, "done", `${job.done} / ${job.total}`);
  setField(scope, "failed", job.failed);
  setField(scope, "abstained", job.abstained);
  setField(scope, "docs_per_s", job.docs_per_s == null ? "–" : job.docs_per_s.toFixed(1));
  setField(scope, "eta", job.eta_s == null ? "–" : `${Math.round(job.eta_s)} s`);
}

// Poll every job shown while it is queued or running; a job page reloads once its job ends.
function followJobs() {
  const scopes = [...document.querySelectorAll("[data-job-id][data-status]")];
  const ids = [...new Set(scopes.map((el) => el.dataset.jobId))];
  ids.forEach((id) => {
    const mine = scopes.filter((el) => el.dataset.jobId === id);
    if (!ACTIVE.has(mine[0].dataset.status)) return;
    const timer = setInterval(async () => {
      try {
        const job = await api(`/v1/jobs/${id}`);
        mine.forEach((el) => showJob(el, job));
        if (!ACTIVE.has(job.status)) {
          clearInterval(timer);
          if (document.body.dataset.page !== "jobs") location.reload();
        }
      } catch (error) { /* the next tick tries again */ }
    }, 1000);
  });
}

// The jobs page reloads when a job it does not show yet appears.
function watchForNewJobs() {
  if (document.body.dataset.page !== "jobs") return;
  const shown = new Set([...document.querySelectorAll("tr.job")].map((el) => el.dataset.jobId));
  setInterval(async () => {
    try {
      const newest = await api("/v1/jobs?limit=5");
      if (newest.some((job) => !shown.has(job.job_id))) location.reload();
    } catch (error) { /* try again */ }
  }, 2000);
}

// Gold labelling: one document at a time; each answer is saved at once, never showing the LLM's label.
function labelGold() {
  const root = document.getElementById("labeller");
  if (!root) return;
  const data = JSON.parse(document.getElementById("gold-data").textContent);
  const answers = data.answers;
  let queue = data.documents.filter((doc) => !(doc.doc_id in answers));
  let busy = false;
  const keys = new Map([...root.querySelectorAll("[data-key]")].map((el) => [el.dataset.key, el]));

  function render() {
    const answered = data.documents.filter((doc) => doc.doc_id in answers).length;
    setField(root, "answered", answered);
    root.querySelector('[data-field="bar"]').style.width = percent(answered / Math.max(1, data.documents.length));
    const finished = queue.length === 0;
    root.querySelector('[data-field="done"]').hidden = !finished;
    root.querySelector('[data-field="document"]').hidden = finished;
    root.querySelector(".choices").hidden = finished;
    if (finished) return;
    const doc = queue[0];
    setField(root, "doc-id", doc.doc_id);
    setField(root, "text", doc.text);
    setField(root, "position", `${queue.length} left`);
    root.dataset.current = doc.doc_id;
  }

  async function answer(label) {
    if (busy || queue.length === 0) return;
    busy = true;
    const doc = queue[0];
    setField(root, "status", "saving…");
    try {
      await api(`/v1/jobs/${root.dataset.jobId}/gold`, {
        method: "POST",
        body: JSON.stringify({annotator: root.dataset.annotator, labels: [{doc_id: doc.doc_id, label}]}),
      });
      answers[doc.doc_id] = label;
      queue = queue.filter((queued) => queued !== doc);
      setField(root, "status", `saved “${label}” for ${doc.doc_id}`);
    } catch (error) {
      setField(root, "status", `not saved: ${error.message}`);
    } finally {
      busy = false;
      render();
    }
  }

  function choose(el) {
    if (busy) return;
    if (el.dataset.action === "skip") {
      if (queue.length > 1) queue.push(queue.shift());
      setField(root, "status", "skipped");
      render();
    } else {
      answer(el.dataset.label);
    }
  }

  root.querySelectorAll(".choice").forEach((el) => el.addEventListener("click", () => choose(el)));
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.target.matches("input, select, textarea")) return;
    const el = keys.get(event.key.toLowerCase());
    if (el) {
      event.preventDefault();
      choose(el);
    }
  });
  render();
}

function drawSample() {
  const form = document.getElementById("draw-sample");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const fields = new FormData(form);
    try {
      await api(`/v1/jobs/${form.dataset.jobId}/gold-sample`, {
        method: "POST", body: JSON.stringify({size: Number(fields.get("size")), design: fields.get("design")}),
      });
      location.reload();
    } catch (error) {
      setField(form, "error", error.message);
    }
  });
}

// The quality page reads the stored report; this button computes it anew (a write: POST .../report).
function computeReport() {
  const button = document.querySelector("button[data-compute-report]");
  if (!button) return;
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api(`/v1/jobs/${button.dataset.computeReport}/report`, {method: "POST"});
      location.reload();
    } catch (error) {
      setField(button.parentElement, "error", error.message);
      button.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  followJobs();
  watchForNewJobs();
  labelGold();
  drawSample();
  computeReport();
});

// Jobs tab: the list of training jobs with state and progress, one job's live view (progress,
// throughput, loss curve; polled every second while it runs), the form that submits a job, and
// the bulk indexing jobs (POST /index-jobs) with state, progress and tallies, and the
// re-embedding of the stored items that an activation starts (one per activation, GET /models).

import { json } from "./api.js";
import { lossChart } from "./chart.js";
import { announce, details, duration, el, fmt, guarded, showError, when } from "./ui.js";

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);
const JOB_POLL_MS = 1000;
const LIST_POLL_MS = 2000;
let timer = null;
let shownJob = null; // id of the job in view, null on the list

function stopPolling() {
  clearTimeout(timer);
  timer = null;
}

function poll(fn, ms) {
  stopPolling();
  timer = setTimeout(fn, ms);
}

function progressBar(job, label, unit = "steps") {
  const p = job.progress || {};
  const total = p.total_steps || 0;
  const step = job.state === "succeeded" && total ? total : p.step || 0;
  const bar = el("progress", { max: total || 1, value: total ? step : 0, "aria-label": label, dataset: { step, total } });
  const pct = total ? Math.round((100 * step) / total) : 0;
  return el("div", { class: "progress" }, bar, el("span", { class: "muted" }, total ? `${step} / ${total} ${unit} (${pct}%)` : "waiting"));
}

function stateBadge(state) {
  return el("span", { class: `state state-${state}`, dataset: { state } }, state);
}

// -- the list -----------------------------------------------------------------------------

async function loadList() {
  const page = await json("/train-jobs?limit=50");
  $("jobs-body").replaceChildren(...page.items.map((job) => el("tr", { dataset: { id: job.id, state: job.state } },
    el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id)),
    el("td", {}, stateBadge(job.state)),
    el("td", {}, progressBar(job, `progress of job ${job.name || job.id}`)),
    el("td", {}, when(job.created_at)),
    el("td", {}, job.model_id || "–"),
  )));
  $("jobs-empty").hidden = page.total > 0;
  const indexing = await loadIndexJobs();
  return indexing || page.items.some((job) => ACTIVE.has(job.state));
}

// A bulk indexing job's tallies (service/jobs/store.py IndexCounts), in words.
function tallies(job) {
  const c = (job.progress || {}).index;
  if (!c) return "–";
  const parts = [`${c.added} added`, `${c.replaced} replaced`, `${c.skipped} unchanged`];
  if (c.failed) parts.push(`${c.failed} unreadable`);
  if (c.vanished) parts.push(`${c.vanished} vanished${c.deleted ? ` (${c.deleted} deleted)` : ""}`);
  return parts.join(", ");
}

// The active model's re-embedding as a row of the indexing table: the same bar and badge.
function reembeddingRow(job) {
  const asJob = { state: job.state, progress: { step: job.done, total_steps: job.total } };
  return el("tr", { dataset: { id: "reembedding", state: job.state } },
    el("td", { title: job.owner }, `Re-embedding for ${job.space}`),
    el("td", {}, stateBadge(job.state)),
    el("td", {}, progressBar(asJob, `progress of the re-embedding for ${job.space}`, "items")),
    el("td", { class: "tallies" }, job.error ? el("span", { class: "job-error" }, job.error) : `${job.done} of ${job.total} items embedded`),
    el("td", {}, when(new Date(job.started * 1000).toISOString())),
    el("td", {}),
  );
}

async function loadIndexJobs() {
  const [page, models] = await Promise.all([json("/index-jobs?limit=50"), json("/models")]);
  const reembedding = models.reembedding;
  $("index-jobs-body").replaceChildren(...(reembedding ? [reembeddingRow(reembedding)] : []), ...page.items.map((job) => {
    const active = ACTIVE.has(job.state);
    const cancel = el("button", { type: "button", class: "secondary", onclick: (e) => guarded(e.currentTarget, () => cancelIndexJob(job.id)) }, "Cancel");
    return el("tr", { dataset: { id: job.id, state: job.state } },
      el("td", { title: job.id }, job.name || job.dataset),
      el("td", {}, stateBadge(job.state)),
      el("td", {}, progressBar(job, `progress of indexing job ${job.name || job.id}`, "images")),
      el("td", { class: "tallies" }, job.error ? el("span", { class: "job-error" }, job.error) : tallies(job)),
      el("td", {}, when(job.created_at)),
      el("td", {}, active ? cancel : null),
    );
  }));
  $("index-jobs-empty").hidden = page.total > 0 || Boolean(reembedding);
  return page.items.some((job) => ACTIVE.has(job.state)) || reembedding?.state === "running";
}

async function cancelIndexJob(id) {
  await json(`/index-jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  announce(`Cancel requested for indexing job ${id}.`);
  await loadList();
}

async function refreshList() {
  let active = false;
  try {
    active = await loadList();
  } catch (err) {
    showError(err);
  }
  if (shownJob === null && active && !document.hidden) poll(refreshList, LIST_POLL_MS);
}

// -- one job ------------------------------------------------------------------------------

// The defaults the run decided at its start (service/contract/defaults.py), each with its source.
function decidedDefaults(defaults) {
  const names = Object.keys(defaults);
  if (!names.length) return el("p", { class: "muted", id: "job-defaults" }, "Defaults: decided when the run starts.");
  return el("table", { id: "job-defaults" },
    el("caption", {}, "Defaults decided for this run"),
    el("thead", {}, el("tr", {}, el("th", {}, "Setting"), el("th", {}, "Value"), el("th", {}, "Source"))),
    el("tbody", {}, ...names.map((name) => el("tr", {},
      el("td", {}, name), el("td", {}, String(defaults[name].value)), el("td", { class: "muted" }, defaults[name].source)))),
  );
}

function renderJob(job) {
  const p = job.progress || {};
  const title = job.name ? `${job.name} (${job.id})` : job.id;
  const active = ACTIVE.has(job.state);
  const view = $("job-view");
  view.replaceChildren(
    el("p", {}, el("a", { href: "#/jobs" }, "← All jobs")),
    el("div", { class: "row" },
      el("h2", { id: "job-title" }, `Job ${title}`), stateBadge(job.state),
      active ? el("button", { type: "button", id: "job-cancel", class: "secondary", onclick: (e) => guarded(e.currentTarget, () => cancel(job.id)) }, "Cancel job") : null,
    ),
    progressBar(job, "training progress"),
  );
  if (job.error) view.append(el("p", { class: "job-error" }, el("strong", {}, "Failed: "), job.error));
  view.append(el("div", { class: "job-body" }, details([
      ["Epoch", fmt(p.epoch)],
      ["Step", p.total_steps ? `${p.step} of ${p.total_steps}` : "–"],
      ["Loss", fmt(p.loss)],
      ["Learning rate", fmt(p.lr, 3)],
      ["Throughput", p.images_per_s ? `${p.images_per_s.toFixed(1)} images/s` : "–"],
      ["Time left", active ? duration(p.eta_s) : "–"],
      ["kNN top-1", p.knn_top1 == null ? "– (set knn_every_epochs on labeled data)" : `${(100 * p.knn_top1).toFixed(1)}%`],
      ["Dataset", job.dataset],
      ["Method", job.request.method === "write_back"
        ? `write-back of classifier ${job.request.classifier_id} into ${job.request.label_field}, ${job.request.probability_field}`
        : `${job.request.method || "simclr"}, ${job.request.backbone || "resnet18"}, ${job.request.image_size || "?"} px`],
      ["Created", when(job.created_at)],
      ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)],
      ["Model", job.model_id ? el("a", { href: "#/models" }, job.model_id) : "–"],
      ["Skipped images", p.masked_images ? `${p.masked_images} batch slots masked (files that failed to decode)` : "none"],
    ]),
    el("figure", {}, el("figcaption", {}, "Loss by step"), lossChart(job.loss_history || [])),
  ), decidedDefaults(p.defaults || {}));
  view.dataset.state = job.state;
}

async function refreshJob(id) {
  if (shownJob !== id) return;
  try {
    const job = await json(`/train-jobs/${encodeURIComponent(id)}`);
    if (shownJob !== id) return;
    renderJob(job);
    if (ACTIVE.has(job.state)) poll(() => refreshJob(id), JOB_POLL_MS);
    else if (job.state === "succeeded") announce(`Job ${id} succeeded${job.model_id ? `: model ${job.model_id}` : ""}.`);
  } catch (err) {
    showError(err);
    if (err.status === 0 || err.status >= 500) poll(() => refreshJob(id), 5 * JOB_POLL_MS); // keep trying through outages
  }
}

async function cancel(id) {
  await json(`/train-jobs/${encodeURIComponent(id)}`, { method: "DELETE" });
  announce(`Cancel requested for job ${id}.`);
  await refreshJob(id);
}

// -- submitting ---------------------------------------------------------------------------

function jobRequest() {
  const number = (id) => Number($(id).value);
  const body = {
    dataset: $("job-dataset").value.trim(),
    method: $("job-method").value,
    backbone: $("job-backbone").value,
    image_size: number("job-image-size"),
    epochs: number("job-epochs"),
    batch_size: number("job-batch-size"),
    base_lr: number("job-base-lr"),
    activate: $("job-activate").checked,
  };
  if ($("job-name").value.trim()) body.name = $("job-name").value.trim();
  if ($("job-temperature").value !== "") body.temperature = number("job-temperature");
  const extra = $("job-extra").value.trim();
  if (extra) {
    let parsed;
    try {
      parsed = JSON.parse(extra);
    } catch (err) {
      throw Object.assign(new Error(`"More options" is not valid JSON: ${err.message}`), { code: "invalid_options" });
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
      throw Object.assign(new Error('"More options" must be a JSON object, e.g. {"max_steps": 100}'), { code: "invalid_options" });
    }
    Object.assign(body, parsed);
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  const created = await json("/train-jobs", { method: "POST", body: jobRequest() });
  announce(`Job ${created.id} queued.`);
  window.location.hash = `#/jobs/${encodeURIComponent(created.id)}`;
}

// -- tab life cycle -----------------------------------------------------------------------

export function init() {
  $("job-form").addEventListener("submit", (e) => guarded($("job-submit"), () => submit(e)));
  $("jobs-refresh").addEventListener("click", (e) => guarded(e.currentTarget, loadList));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null && shownJob === null && !$("panel-jobs").hidden) refreshList();
  });
}

/** `#/jobs` (no id) shows the list and the form; `#/jobs/<id>` one job. */
export function show(id = null) {
  stopPolling();
  shownJob = id;
  $("job-view").hidden = id === null;
  $("job-list-view").hidden = id !== null;
  if (id === null) return refreshList();
  $("job-view").replaceChildren(el("p", { class: "muted" }, `Loading job ${id}…`));
  return refreshJob(id);
}

export function hide() {
  stopPolling();
  shownJob = null;
}

// Models tab: the registry's cards, which one is served, and activation.

import { json } from "./api.js";
import { announce, details, el, guarded, when } from "./ui.js";

const $ = (id) => document.getElementById(id);

function metricsView(metrics) {
  const entries = Object.entries(metrics || {});
  if (entries.length === 0) return "–";
  return el("ul", { class: "plain" }, entries.map(([k, v]) => el("li", {}, `${k}: ${typeof v === "number" ? Number(v.toPrecision(4)) : JSON.stringify(v)}`)));
}

function short(hash) {
  return hash ? el("code", { title: hash }, hash.slice(0, 12)) : "–";
}

function card(model) {
  const id = model.model_id;
  return el("article", { class: `card model${model.active ? " active" : ""}`, dataset: { id, active: model.active } },
    el("div", { class: "row" },
      el("h3", {}, id),
      model.active ? el("span", { class: "state state-succeeded" }, "active") : null,
    ),
    details([
      ["Method", model.method],
      ["Backbone", model.backbone],
      ["Input", `${model.input_size} px`],
      ["Embedding", `${model.embedding_dim} dims`],
      ["Dataset", short(model.dataset_fingerprint)],
      ["Created", when(model.created_at)],
      ["Metrics", metricsView(model.metrics)],
      ["Size", model.size_bytes ? `${(model.size_bytes / 1e6).toFixed(1)} MB` : "–"],
    ]),
    model.active
      ? el("button", { type: "button", disabled: true }, "Active", el("span", { class: "visually-hidden" }, ` (${id})`))
      : el("button", { type: "button", class: "activate", onclick: (e) => guarded(e.currentTarget, () => activate(id)) },
        "Activate", el("span", { class: "visually-hidden" }, ` ${id}`)),
  );
}

async function load() {
  const answer = await json("/models");
  $("models").replaceChildren(...answer.models.map(card));
  $("models-summary").textContent = answer.models.length
    ? `${answer.models.length} model${answer.models.length === 1 ? "" : "s"}; serving ${answer.active ?? "none"}.`
    : "No model yet: train one on the Jobs tab.";
  const job = answer.reembedding;
  $("models-summary").textContent += job && job.state !== "succeeded"
    ? ` Re-embedding into ${job.space}: ${job.state}, ${job.done} of ${job.total} items.`
    : "";
}

async function activate(id) {
  const answer = await json(`/models/${encodeURIComponent(id)}/activate`, { method: "POST" });
  announce(`Model ${answer.active} is now active.`);
  await load();
}

export function init() {
  $("models-refresh").addEventListener("click", (e) => guarded(e.currentTarget, load));
}

export function show() {
  return guarded(null, load);
}

export function hide() {}

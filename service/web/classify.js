// Classify tab: create a classifier on the frozen embeddings (from a metadata field, or from
// labels typed here as "item id, label" lines), see its cross-validated accuracy and confusion
// matrix, and classify an image (picked or dropped).

import { json } from "./api.js";
import { announce, details, el, fmt, guarded, when } from "./ui.js";

const $ = (id) => document.getElementById(id);
let classifiers = [];

function selected() {
  return classifiers.find((c) => c.id === $("classifier-select").value) || null;
}

/** "id, label" lines -> [{item_id, label}]; a label of digits only is sent as an integer. */
function parseLabels(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean).map((line, i) => {
    const cut = line.search(/[,\t]/);
    if (cut < 1) {
      throw Object.assign(new Error(`line ${i + 1}: write "item id, label"`), { code: "invalid_labels" });
    }
    const label = line.slice(cut + 1).trim();
    return { item_id: line.slice(0, cut).trim(), label: /^-?\d+$/.test(label) ? Number(label) : label };
  });
}

function confusionTable(c) {
  const labels = c.classes.map((k) => String(k.label));
  return el("table", { id: "confusion", class: "confusion", "aria-label": "confusion matrix (rows: true class, columns: predicted)" },
    el("caption", {}, `Confusion matrix, ${c.cv.kind === "validation" ? "validation images" : `out-of-fold predictions (${c.cv.n_folds}-fold)`}: rows are the true class, columns the predicted one`),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "true \\ predicted"), labels.map((l) => el("th", { scope: "col" }, l)))),
    el("tbody", {}, c.cv.confusion.map((row, i) => el("tr", {},
      el("th", { scope: "row" }, labels[i]),
      row.map((n, j) => el("td", { class: i === j ? "diag" : n ? "off" : null }, String(n))),
    ))),
  );
}

function renderSelected() {
  const c = selected();
  $("classifier-delete").hidden = !c;
  $("predict-submit").disabled = !c;
  if (!c) {
    $("classifier-details").replaceChildren(el("p", { class: "muted" }, "No classifier yet: create one above."));
    return;
  }
  const pct = (v) => `${(100 * v).toFixed(1)}%`;
  $("classifier-details").replaceChildren(
    details([
      ["Method", { logreg: "logistic regression", knn: "kNN", finetune: "fine-tuned network" }[c.method] || c.method],
      ["Examples", c.label_key ? `${c.examples} (metadata field "${c.label_key}")` : String(c.examples)],
      ["Model", c.model_id],
      ["Fitted", when(c.fits.find((f) => f.fit_id === c.fit_id)?.fitted_at)],
      [c.cv.kind === "validation" ? "Validation accuracy" : "CV accuracy",
        el("span", { id: "cv-accuracy", dataset: { value: c.cv.accuracy } }, c.cv.std === null ? pct(c.cv.accuracy) : `${pct(c.cv.accuracy)} ± ${pct(c.cv.std)}`)],
      ["Regularisation C", c.cv.C === null ? "–" : fmt(c.cv.C, 3)],
      ["Classes", c.classes.map((k) => `${k.label} (${k.count})`).join(", ")],
    ]),
    confusionTable(c),
  );
}

async function load(selectId) {
  classifiers = (await json("/classifiers")).classifiers;
  const keep = selectId || $("classifier-select").value;
  $("classifier-select").replaceChildren(...classifiers.map((c) => el("option", { value: c.id }, `${c.name} (${c.method})`)));
  if (classifiers.some((c) => c.id === keep)) $("classifier-select").value = keep;
  renderSelected();
}

async function create(event) {
  event.preventDefault();
  const body = { name: $("classifier-name").value.trim(), method: $("classifier-method").value };
  if ($("source-key").checked) body.label_key = $("classifier-label-key").value.trim();
  else body.examples = parseLabels($("classifier-labels").value);
  const made = await json("/classifiers", { method: "POST", body });
  if (made.classifier_id) { // 202: more examples than the synchronous limit, fitted as a job
    announce(`Fitting ${made.examples} examples as job ${made.id} (Jobs tab); classifier ${made.name} is listed here once it succeeds.`);
    return;
  }
  announce(`Created classifier ${made.name}: cross-validated accuracy ${(100 * made.cv.accuracy).toFixed(1)}%.`);
  await load(made.id);
}

async function remove() {
  const c = selected();
  if (!c || !window.confirm(`Delete classifier ${c.name}?`)) return;
  await json(`/classifiers/${encodeURIComponent(c.id)}`, { method: "DELETE" });
  announce(`Deleted classifier ${c.name}.`);
  await load();
}

function setFile(file) {
  const preview = $("classify-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

async function classify(event) {
  event.preventDefault();
  const c = selected();
  const file = $("classify-file").files[0];
  if (!file) throw Object.assign(new Error("choose or drop an image to classify"), { code: "no_image" });
  const form = new FormData();
  form.append("files", file);
  form.append("top_k", "3");
  const answer = await json(`/classifiers/${encodeURIComponent(c.id)}/predict`, { method: "POST", body: form });
  const p = answer.predictions[0];
  $("prediction").replaceChildren(
    el("p", {}, "Predicted class ", el("strong", { id: "predicted-label" }, String(p.label)),
      ` with probability ${(100 * p.probability).toFixed(1)}%`),
    el("ol", { id: "prediction-top", class: "plain" }, p.top_k.map((t) => el("li", { dataset: { label: t.label } },
      `${t.label}: ${(100 * t.probability).toFixed(1)}%`))),
    el("p", { class: "muted" }, `model ${answer.model_id}, fit ${answer.fit_id}`),
  );
  announce(`${file.name}: ${p.label}.`);
}

function wireSource() {
  const sync = () => {
    const byKey = $("source-key").checked;
    $("label-key-field").hidden = !byKey;
    $("labels-field").hidden = byKey;
    $("classifier-label-key").required = byKey;
    $("classifier-labels").required = !byKey;
  };
  $("source-key").addEventListener("change", sync);
  $("source-labels").addEventListener("change", sync);
  sync();
}

function wireDrop() {
  const zone = $("classify-drop");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (!file) return;
    const transfer = new DataTransfer();
    transfer.items.add(file);
    $("classify-file").files = transfer.files;
    setFile(file);
  });
}

export function init() {
  wireSource();
  wireDrop();
  $("classifier-form").addEventListener("submit", (e) => guarded($("classifier-submit"), () => create(e)));
  $("classifier-select").addEventListener("change", renderSelected);
  $("classifier-delete").addEventListener("click", (e) => guarded(e.currentTarget, remove));
  $("classify-file").addEventListener("change", () => { if ($("classify-file").files[0]) setFile($("classify-file").files[0]); });
  $("classify-form").addEventListener("submit", (e) => guarded($("predict-submit"), () => classify(e)));
}

export function show() {
  return guarded(null, () => load());
}

export function hide() {}

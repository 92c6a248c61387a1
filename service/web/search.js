// Search tab: query by image (picked or dropped) or by indexed item, show the neighbours as
// thumbnails with score, id and metadata; add images to the index; browse indexed items.

import { forgetImages, itemImageUrl, json } from "./api.js";
import { announce, el, guarded } from "./ui.js";

const $ = (id) => document.getElementById(id);
const PAGE = 48;
let nextOffset = 0;

function thumbnail(id) {
  const img = el("img", { alt: `item ${id}`, loading: "lazy", width: 96, height: 96 });
  itemImageUrl(id).then((url) => { img.src = url; }, () => { img.alt = `item ${id} (image unavailable)`; });
  return img;
}

function metadataView(metadata) {
  if (!metadata || Object.keys(metadata).length === 0) return null;
  return el("dl", { class: "meta" }, Object.entries(metadata).flatMap(([k, v]) => [
    el("dt", {}, k), el("dd", {}, typeof v === "string" ? v : JSON.stringify(v)),
  ]));
}

function renderResults(answer, what) {
  const list = $("results");
  list.replaceChildren(...answer.results.map((hit, rank) => el("li", { class: "tile", dataset: { id: hit.id, score: hit.score } },
    thumbnail(hit.id),
    el("div", { class: "caption" },
      el("span", { class: "rank" }, `#${rank + 1}`),
      el("span", { class: "id" }, hit.id),
      el("span", { class: "score" }, `score ${hit.score.toFixed(4)}`),
    ),
    metadataView(hit.metadata),
  )));
  const n = answer.results.length;
  $("results-summary").textContent = n
    ? `${n} nearest to ${what}, best first (model ${answer.model_id}).`
    : $("search-filter").value.trim()
      ? `No indexed item matches the filter (model ${answer.model_id}).`
      : `The index is empty for model ${answer.model_id}: add images first.`;
  announce(`Found ${n} neighbour${n === 1 ? "" : "s"}.`);
}

function setQueryFile(file) {
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
}

async function searchByImage(event) {
  event.preventDefault();
  const file = $("search-file").files[0];
  if (!file) {
    $("search-file").focus();
    throw Object.assign(new Error("choose or drop an image to search with"), { code: "no_image" });
  }
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("search-k").value);
  const filter = $("search-filter").value.trim();
  if (filter) form.append("filter", filter);
  renderResults(await json("/search", { method: "POST", body: form }), `image ${file.name}`);
}

/** The filter box as an object (undefined when empty); the server names a bad field. */
function filterValue() {
  const text = $("search-filter").value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    $("search-filter").focus();
    throw Object.assign(new Error(`the filter is not valid JSON: ${err.message}`), { code: "invalid_filter" });
  }
}

export async function searchByItem(id) {
  const k = Number($("search-k").value) || 10;
  const body = { item_id: id, k, filter: filterValue() };
  renderResults(await json("/search", { method: "POST", body }), `item ${id}`);
  $("results-title").scrollIntoView({ block: "nearest" });
}

function fileStem(name) {
  return name.replace(/\.[^.]*$/, "") || name;
}

function addRows() {
  const rows = [...$("add-files").files].map((file, i) => el("fieldset", { class: "add-row" },
    el("legend", {}, file.name),
    el("label", { for: `add-id-${i}` }, `Id for ${file.name}`),
    el("input", { type: "text", id: `add-id-${i}`, class: "add-id", value: fileStem(file.name), required: true }),
    el("label", { for: `add-meta-${i}` }, `Metadata for ${file.name} (JSON object, optional)`),
    el("input", { type: "text", id: `add-meta-${i}`, class: "add-meta", placeholder: '{"label": "cat"}' }),
  ));
  $("add-rows").replaceChildren(...rows);
}

async function addItems(event) {
  event.preventDefault();
  const files = [...$("add-files").files];
  const ids = [...document.querySelectorAll(".add-id")].map((input) => input.value.trim());
  const metas = [...document.querySelectorAll(".add-meta")].map((input) => input.value.trim());
  const form = new FormData();
  files.forEach((file, i) => {
    form.append("files", file);
    form.append("ids", ids[i]);
  });
  if (metas.some(Boolean)) metas.forEach((m) => form.append("metadata", m));
  const replace = $("add-replace").checked;
  const answer = await json(`/items${replace ? "?replace=true" : ""}`, { method: "POST", body: form });
  forgetImages(answer.ids);
  $("add-form").reset();
  $("add-rows").replaceChildren();
  announce(`Added ${answer.count} item${answer.count === 1 ? "" : "s"}: ${answer.ids.join(", ")}.`);
  await loadItems(true);
}

async function deleteItem(id) {
  if (!window.confirm(`Delete item ${id} from the index?`)) return;
  await json(`/items/${encodeURIComponent(id)}`, { method: "DELETE" });
  forgetImages([id]);
  announce(`Deleted item ${id}.`);
  await loadItems(true);
}

function itemTile(item) {
  return el("li", { class: "tile", dataset: { id: item.id } },
    thumbnail(item.id),
    el("div", { class: "caption" }, el("span", { class: "id" }, item.id)),
    metadataView(item.metadata),
    el("div", { class: "row" },
      el("button", { type: "button", class: "small", onclick: (e) => guarded(e.currentTarget, () => searchByItem(item.id)) },
        "Find similar", el("span", { class: "visually-hidden" }, ` to ${item.id}`)),
      el("button", { type: "button", class: "small secondary", onclick: (e) => guarded(e.currentTarget, () => deleteItem(item.id)) },
        "Delete", el("span", { class: "visually-hidden" }, ` ${item.id}`)),
    ),
  );
}

/** Load the indexed items (from the start when `reset`, else the next page). */
export async function loadItems(reset = false) {
  if (reset) nextOffset = 0;
  const page = await json(`/items?offset=${nextOffset}&limit=${PAGE}`);
  const tiles = page.items.map(itemTile);
  if (reset) $("items").replaceChildren(...tiles);
  else $("items").append(...tiles);
  if (reset) $("item-ids").replaceChildren(...page.items.map((i) => el("option", { value: i.id })));
  $("items-total").textContent = `(${page.total})`;
  nextOffset = page.next_offset ?? nextOffset;
  $("items-more").hidden = page.next_offset === null;
}

function wireDrop() {
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/")) || e.dataTransfer.files[0];
    if (!file) return;
    const transfer = new DataTransfer();
    transfer.items.add(file);
    $("search-file").files = transfer.files;
    setQueryFile(file);
  });
}

export function init() {
  wireDrop();
  $("search-file").addEventListener("change", () => { if ($("search-file").files[0]) setQueryFile($("search-file").files[0]); });
  $("search-form").addEventListener("submit", (e) => guarded($("search-submit"), () => searchByImage(e)));
  $("item-search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    guarded(e.submitter, () => searchByItem($("item-search-id").value.trim()));
  });
  $("add-files").addEventListener("change", addRows);
  $("add-form").addEventListener("submit", (e) => guarded($("add-submit"), () => addItems(e)));
  $("items-more").addEventListener("click", (e) => guarded(e.currentTarget, () => loadItems(false)));
}

export function show() {
  return guarded(null, () => loadItems(true));
}

export function hide() {}

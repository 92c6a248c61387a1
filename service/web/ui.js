// Small DOM helpers and the page's two live regions (notices and errors).

/** el("p", {class: "x", onclick: fn}, "text", child) -> HTMLElement */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const notice = () => document.getElementById("notice");
const error = () => document.getElementById("error");

/** Tell the user something went well (polite live region); clears the last error. */
export function announce(message) {
  error().textContent = "";
  notice().textContent = message;
}

/** Show an error's message (the API's error.message) in the alert region. */
export function showError(err) {
  notice().textContent = "";
  const box = error();
  box.replaceChildren(el("strong", {}, "Error: "), err.message || String(err));
  if (err.code) box.append(el("span", { class: "muted" }, ` (${err.code})`));
  box.dataset.code = err.code || "";
}

/** Run an async action for a button or form: busy state while it runs, errors shown. */
export async function guarded(button, action) {
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (err) {
    if (err.name !== "AbortError") showError(err);
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(digits);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/** A <dl> from [term, value] pairs. */
export function details(pairs, className = "facts") {
  return el("dl", { class: className }, pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

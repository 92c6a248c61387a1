// The loss curve: an inline SVG line chart of [step, loss] pairs, with its own scales and ticks.

const SVG = "http://www.w3.org/2000/svg";
const PAD = { left: 56, right: 16, top: 12, bottom: 32 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

/** `count` round tick values covering [lo, hi]. */
function ticks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

/** history: [[step, loss], ...] oldest first -> an <svg> (role img, described in words). */
export function lossChart(history, { width = 640, height = 240 } = {}) {
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-labelledby": "chart-title chart-desc" });
  root.append(svg("title", { id: "chart-title" }, "Training loss"));
  const desc = svg("desc", { id: "chart-desc" });
  root.append(desc);
  const points = history.filter(([, loss]) => Number.isFinite(loss));
  if (points.length === 0) {
    desc.textContent = "No loss recorded yet.";
    root.append(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis" }, "No loss recorded yet"));
    return root;
  }
  const steps = points.map(([s]) => s);
  const losses = points.map(([, l]) => l);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  let [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const x = (s) => PAD.left + (x1 === x0 ? plotW / 2 : ((s - x0) / (x1 - x0)) * plotW);
  const y = (l) => PAD.top + (1 - (l - y0) / (y1 - y0)) * plotH;

  for (const v of ticks(y0, y1, 4)) {
    root.append(svg("line", { x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, String(v)));
  }
  for (const v of x1 === x0 ? [x0] : ticks(x0, x1, 5).filter(Number.isInteger)) {
    root.append(svg("text", { x: x(v), y: height - PAD.bottom + 18, "text-anchor": "middle", class: "axis" }, String(v)));
  }
  root.append(svg("text", { x: width - PAD.right, y: height - 4, "text-anchor": "end", class: "axis" }, "step"));
  root.append(svg("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + plotH, class: "frame" }));
  root.append(svg("line", { x1: PAD.left, x2: width - PAD.right, y1: PAD.top + plotH, y2: PAD.top + plotH, class: "frame" }));
  const path = points.map(([s, l], i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" ");
  root.append(svg("path", { d: path, class: "line" }));
  if (points.length === 1) root.append(svg("circle", { cx: x(x0), cy: y(losses[0]), r: 3, class: "dot" }));

  const first = points[0];
  const last = points[points.length - 1];
  desc.textContent = `Loss ${first[1].toPrecision(4)} at step ${first[0]}, ${last[1].toPrecision(4)} at step ${last[0]} ` +
    `(${points.length} points, lowest ${Math.min(...losses).toPrecision(4)}).`;
  return root;
}

// The graph page: draws /api/graph as SVG (rows: blocks, columns: positions), pins nodes into a subgraph, groups
// them into supernodes, steers from feature nodes. Every bit of state lives in the URL (history.replaceState), so a
// reload or a copied link restores it.
"use strict";
const $ = (s) => document.querySelector(s);
const SVGNS = "http://www.w3.org/2000/svg";
const MAX_COL_W = 150;
const MIN_COL_W = 44, NODE_GAP = 22, LOGIT_GAP = 44, LEFT = 48, TOP = 64, BOTTOM = 40;
let ROW_H = 78; // shrinks for deep models, so the whole graph fits about 600 px

const state = readState();
let graph = null; // the JSON of /api/graph
let byId = new Map(); // node id -> node (an error and a feature can share an id: the feature wins)

function readState() {
  const q = new URLSearchParams(location.search);
  const groups = q.getAll("group").map((g) => {
    const cut = g.indexOf("|");
    const ids = (cut < 0 ? g : g.slice(0, cut)).split(",").filter(Boolean);
    return { ids, label: cut < 0 ? "group" : g.slice(cut + 1) };
  });
  const steers = q.getAll("steer").map((s) => {
    const [id, mode, value] = s.split(":");
    return { id, mode: mode === "abs" ? "abs" : "x", value: value ?? "1" };
  });
  return {
    prompt: q.get("prompt") || "", targets: q.getAll("target").filter((t) => t !== ""), pins: q.getAll("pin"),
    groups, steers, seed: q.get("seed") || $("#seed").value, temp: q.get("temp") || $("#temp").value,
    max_new_tokens: q.get("max_new_tokens") || $("#max-new").value,
  };
}

function graphQuery() {
  const q = new URLSearchParams({ prompt: state.prompt });
  for (const t of state.targets) q.append("target", t);
  return q;
}

function fullQuery() {
  const q = graphQuery();
  for (const p of state.pins) q.append("pin", p);
  for (const g of state.groups) q.append("group", `${g.ids.join(",")}|${g.label}`);
  for (const s of state.steers) q.append("steer", `${s.id}:${s.mode}:${s.value}`);
  q.set("seed", state.seed); q.set("temp", state.temp); q.set("max_new_tokens", state.max_new_tokens);
  return q;
}

function sync() {
  history.replaceState(null, "", `/graph?${fullQuery()}`);
  const q = graphQuery();
  for (const p of state.pins) q.append("pin", p);
  for (const g of state.groups) q.append("group", `${g.ids.join(",")}|${g.label}`);
  $("#download").href = `/graph/download.json?${q}`;
}

// targets typed as text: space-separated, a quoted one may hold spaces (' Austin')
function parseTargets(text) {
  const out = [], re = /'([^']*)'|"([^"]*)"|(\S+)/g;
  let m;
  while ((m = re.exec(text))) out.push(m[1] ?? m[2] ?? m[3]);
  return out;
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function showError(msg) {
  const box = $("#graph-error");
  box.textContent = msg;
  box.hidden = !msg;
}

async function load() {
  if (!state.prompt) return;
  $("#graph-status").textContent = "tracing…";
  document.body.dataset.graph = "loading";
  const resp = await fetch(`/api/graph?${graphQuery()}`, { headers: { accept: "application/json" } });
  const body = await resp.json().catch(() => ({ error: resp.statusText, status: resp.status }));
  if (!resp.ok) {
    showError(`${resp.status}: ${body.error}`);
    $("#graph-status").textContent = "";
    document.body.dataset.graph = "error";
    return;
  }
  showError("");
  graph = body;
  byId = new Map();
  for (const n of graph.nodes) if (!byId.has(n.id) || n.kind === "feature") byId.set(n.id, n);
  const sc = graph.scores;
  $("#graph-status").textContent = `${graph.counts.nodes} of ${graph.counts.of_nodes} nodes and ${graph.counts.links}`
    + ` edges drawn · replacement ${fmt(sc.replacement)} · completeness ${fmt(sc.completeness)} · ${graph.seconds} s`;
  draw();
  drawPins();
  drawSteers();
  document.body.dataset.graph = "ready";
}

function fmt(x, d = 3) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(d);
}

// columns as wide as their fullest cell needs (NODE_GAP px a node) up to MAX_COL_W, past which a crowded cell's
// nodes shrink and overlap (the strongest first), so a graph of hundreds of nodes still fits the page
function layout() {
  const cells = new Map(); // "row:pos" -> nodes
  for (const n of graph.nodes) {
    const key = `${n.row}:${n.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const nRows = graph.n_layers + 2, nPos = graph.tokens.length;
  ROW_H = Math.max(18, Math.min(78, Math.floor(600 / nRows)));
  const widths = new Array(nPos).fill(MIN_COL_W);
  for (const list of cells.values()) {
    const gap = list[0].kind === "logit" ? LOGIT_GAP : NODE_GAP;
    widths[list[0].pos] = Math.min(MAX_COL_W, Math.max(widths[list[0].pos], list.length * gap));
  }
  const left = [LEFT];
  for (let p = 0; p < nPos; p++) left.push(left[p] + widths[p]);
  const maxInf = Math.max(1e-12, ...graph.nodes.filter((n) => n.kind !== "logit").map((n) => n.influence));
  for (const list of cells.values()) {
    list.sort((a, b) => b.influence - a.influence);
    const step = widths[list[0].pos] / list.length;
    list.forEach((n, j) => {
      const share = n.kind === "logit" ? n.influence : n.influence / maxInf;
      n.r = Math.max(1.5, Math.min(3 + 9 * Math.sqrt(Math.max(0, share)), step / 2 - 1, ROW_H / 2 - 2));
      n.x = left[n.pos] + (j + 0.5) * step;
      n.y = TOP + (nRows - 1 - n.row) * ROW_H;
    });
  }
  const centres = widths.map((w, p) => left[p] + w / 2);
  return { w: left[nPos] + 56, h: TOP + nRows * ROW_H + BOTTOM, nRows, centres };  // room for the last slanted label
}

// a token as text a person can see: spaces as ␣, a newline as ⏎, nothing as ∅
function shown(t) {
  return t ? t.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") : "∅";
}

function rowName(r) {
  if (r === 0) return "emb";
  if (r === graph.n_layers + 1) return "logit";
  return `L${r - 1}`;
}

function draw() {
  const svg = $("#graph");
  svg.replaceChildren();
  const { w, h, nRows, centres } = layout();
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("width", "100%");  // scaled to the box, never wider than its own size
  svg.style.maxWidth = `${w}px`;
  svg.removeAttribute("height");
  for (let r = 0; r < nRows; r++) {
    const y = TOP + (nRows - 1 - r) * ROW_H;
    el("line", { x1: LEFT, x2: w, y1: y, y2: y, class: "grid" }, svg);
    el("text", { x: 4, y: y + 4, class: "row-label" }, svg).textContent = rowName(r);
  }
  graph.tokens.forEach((t, p) => {
    const tx = el("text", { x: centres[p], y: h - 12, class: "tok", "text-anchor": "middle" }, svg);
    tx.textContent = shown(t);
  });
  const maxW = Math.max(1e-12, ...graph.links.map((l) => Math.abs(l.weight)));
  const edges = el("g", { class: "edges" }, svg);
  for (const l of graph.links) {
    const a = byId.get(l.source), b = byId.get(l.target);
    if (!a || !b) continue;
    el("line", {
      x1: a.x, y1: a.y, x2: b.x, y2: b.y, "stroke-width": (0.4 + 5 * Math.abs(l.weight) / maxW).toFixed(2),
      class: l.weight >= 0 ? "edge pos" : "edge neg", "data-source": l.source, "data-target": l.target,
    }, edges);
  }
  const nodes = el("g", { class: "nodes" }, svg);
  for (const n of graph.nodes) {
    const shape = n.kind === "error" ? "rect" : "circle";
    const attrs = shape === "rect"
      ? { x: n.x - n.r, y: n.y - n.r, width: 2 * n.r, height: 2 * n.r }
      : { cx: n.x, cy: n.y, r: n.r };
    const c = el(shape, { ...attrs, class: `node ${n.kind}`, "data-id": n.id, "data-kind": n.kind }, nodes);
    c.classList.toggle("pinned", state.pins.includes(n.id));
    c.addEventListener("mouseenter", (e) => tip(n, e));
    c.addEventListener("mouseleave", () => { $("#graph-tip").hidden = true; highlight(null); });
    c.addEventListener("click", (e) => clickNode(n, e));
    if (n.kind === "logit") {
      // slanted, so the labels of a crowded logit row do not run into each other
      const y = n.y - n.r - 3;
      const label = el("text", { x: n.x, y, class: "logit-tok", transform: `rotate(-50 ${n.x} ${y})` }, nodes);
      label.textContent = shown(n.token).slice(0, 10);
    }
  }
}

function highlight(id) {
  for (const e of document.querySelectorAll("#graph .edge")) {
    const on = id && (e.dataset.source === id || e.dataset.target === id);
    e.classList.toggle("lit", !!on);
  }
}

function tip(n, ev) {
  const box = $("#graph-tip");
  box.replaceChildren();
  const add = (tag, text, cls) => {
    const e = document.createElement(tag);
    e.textContent = text;
    if (cls) e.className = cls;
    box.appendChild(e);
    return e;
  };
  if (n.kind === "feature") {
    add("b", `feature ${n.feature} · block ${n.layer} · position ${n.pos}`);
    add("div", n.label || "no explanation", n.label ? "tip-label" : "tip-label muted");
    add("div", `activation ${fmt(n.activation)} · influence ${fmt(n.influence)}`, "small");
    for (const c of n.contexts || []) {
      const d = add("div", "", "tip-ctx small");
      d.append(document.createTextNode(c.before));
      const m = document.createElement("mark");
      m.textContent = c.token;
      d.append(m, document.createTextNode(` (${fmt(c.act)})`));
    }
    add("div", n.page ? "click: its feature page · shift-click: pin" : "click: its strongest edges · shift-click: pin",
        "small muted");
  } else {
    add("b", n.kind === "error" ? `error · block ${n.layer} · position ${n.pos}` : n.kind);
    add("div", n.label || "", "tip-label");
    add("div", `influence ${fmt(n.influence)}`, "small");
  }
  const host = $("#graph-box").getBoundingClientRect();
  box.style.left = `${ev.clientX - host.left + 14}px`;
  box.style.top = `${ev.clientY - host.top + 14}px`;
  box.hidden = false;
  highlight(n.id);
}

function clickNode(n, ev) {
  if (ev.shiftKey || ev.ctrlKey || ev.metaKey) {
    togglePin(n.id);
    return;
  }
  if (n.kind === "feature" && n.page) {
    location.href = n.page;
    return;
  }
  showEdges(n);
}

async function showEdges(n) {
  const panel = $("#node-panel");
  panel.hidden = false;
  panel.replaceChildren();
  const h = document.createElement("h3");
  h.textContent = n.kind === "feature" ? `feature ${n.feature} · block ${n.layer} · position ${n.pos}` : n.label;
  const pin = document.createElement("button");
  pin.type = "button";
  pin.id = "pin-this";
  pin.textContent = state.pins.includes(n.id) ? "Unpin" : "Pin";
  pin.addEventListener("click", () => { togglePin(n.id); pin.textContent = state.pins.includes(n.id) ? "Unpin" : "Pin"; });
  panel.append(h, pin);
  if (n.kind === "feature") {
    const p = document.createElement("p");
    p.className = "small";
    p.textContent = `${n.label || "no explanation"} · activation ${fmt(n.activation)}`;
    panel.append(p);
  }
  const resp = await fetch(`/api/graph/node?${graphQuery()}&node=${encodeURIComponent(n.id)}&kind=${n.kind}`);
  const body = await resp.json();
  if (!resp.ok) { panel.append(document.createTextNode(body.error)); return; }
  for (const [key, title] of [["in", "strongest inputs"], ["out", "strongest outputs"]]) {
    const t = document.createElement("h4");
    t.textContent = title;
    const ul = document.createElement("ul");
    ul.className = `edges-list edges-${key}`;
    for (const r of body[key]) {
      const li = document.createElement("li");
      li.textContent = `${r.weight >= 0 ? "+" : ""}${fmt(r.weight)} ${r.kind} ${r.id}${r.label ? ` (${r.label})` : ""}`
        + (r.drawn ? "" : " · pruned");
      li.className = r.weight >= 0 ? "pos" : "neg";
      ul.appendChild(li);
    }
    if (!body[key].length) ul.textContent = "none";
    panel.append(t, ul);
  }
}

function togglePin(id) {
  const i = state.pins.indexOf(id);
  if (i >= 0) {
    state.pins.splice(i, 1);
    for (const g of state.groups) g.ids = g.ids.filter((x) => x !== id);
    state.groups = state.groups.filter((g) => g.ids.length);
  } else {
    state.pins.push(id);
  }
  for (const c of document.querySelectorAll("#graph .node")) c.classList.toggle("pinned", state.pins.includes(c.dataset.id));
  drawPins();
  sync();
}

function nodeName(id) {
  const n = byId.get(id);
  if (!n) return id;
  if (n.kind === "feature") return `${id}${n.label ? ` · ${n.label}` : ""}`;
  return `${id} · ${n.label || n.kind}`;
}

function drawPins() {
  const ul = $("#pins");
  ul.replaceChildren();
  const grouped = new Set(state.groups.flatMap((g) => g.ids));
  for (const id of state.pins) {
    const li = document.createElement("li");
    li.dataset.id = id;
    const cb = document.createElement("input");
    cb.type = "checkbox";
    cb.className = "pick";
    cb.disabled = grouped.has(id);
    const span = document.createElement("span");
    span.textContent = nodeName(id);
    li.append(cb, span);
    const n = byId.get(id);
    if (n && n.kind === "feature") {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "steer-add";
      b.textContent = "steer";
      b.addEventListener("click", () => addSteer(id));
      li.append(b);
    }
    const rm = document.createElement("button");
    rm.type = "button";
    rm.className = "unpin";
    rm.textContent = "×";
    rm.title = "unpin";
    rm.addEventListener("click", () => togglePin(id));
    li.append(rm);
    ul.appendChild(li);
  }
  const gl = $("#groups");
  gl.replaceChildren();
  state.groups.forEach((g, k) => {
    const li = document.createElement("li");
    li.className = "group";
    const b = document.createElement("b");
    b.textContent = g.label;
    const span = document.createElement("span");
    span.className = "small muted";
    span.textContent = ` ${g.ids.join(", ")} `;
    const un = document.createElement("button");
    un.type = "button";
    un.textContent = "ungroup";
    un.addEventListener("click", () => { state.groups.splice(k, 1); drawPins(); sync(); });
    li.append(b, span, un);
    gl.appendChild(li);
  });
  drawSubgraph();
}

function group() {
  const ids = [...document.querySelectorAll("#pins li")].filter((li) => li.querySelector(".pick").checked)
    .map((li) => li.dataset.id);
  const label = $("#group-label").value.trim() || `group ${state.groups.length + 1}`;
  if (!ids.length) return;
  state.groups.push({ ids, label });
  $("#group-label").value = "";
  drawPins();
  sync();
}

// the pinned nodes with each supernode as one node; an edge's weight is the sum of the drawn edges between members
function drawSubgraph() {
  const svg = $("#subgraph");
  svg.replaceChildren();
  if (!graph || !state.pins.length) { svg.setAttribute("height", 0); return; }
  const owner = new Map();
  const units = state.groups.map((g) => ({ key: `g:${g.label}`, label: g.label, ids: g.ids, group: true }));
  for (const u of units) for (const id of u.ids) owner.set(id, u);
  for (const id of state.pins) if (!owner.has(id)) {
    const u = { key: id, label: id, ids: [id], group: false };
    units.push(u);
    owner.set(id, u);
  }
  const row = (u) => Math.max(...u.ids.map((id) => (byId.get(id) || { row: 0 }).row));
  const rows = [...new Set(units.map(row))].sort((a, b) => b - a);
  const W = 300, RH = 56;
  svg.setAttribute("viewBox", `0 0 ${W} ${rows.length * RH + 10}`);
  svg.setAttribute("height", rows.length * RH + 10);
  for (const r of rows) {
    const inRow = units.filter((u) => row(u) === r);
    inRow.forEach((u, j) => { u.x = ((j + 0.5) * W) / inRow.length; u.y = 22 + rows.indexOf(r) * RH; });
  }
  const sums = new Map();
  for (const l of graph.links) {
    const a = owner.get(l.source), b = owner.get(l.target);
    if (!a || !b || a === b) continue;
    const k = `${a.key}→${b.key}`;
    sums.set(k, { a, b, w: (sums.get(k)?.w || 0) + l.weight });
  }
  const maxW = Math.max(1e-12, ...[...sums.values()].map((s) => Math.abs(s.w)));
  for (const s of sums.values()) {
    el("line", { x1: s.a.x, y1: s.a.y, x2: s.b.x, y2: s.b.y, class: s.w >= 0 ? "edge pos" : "edge neg",
                 "stroke-width": (0.6 + 4 * Math.abs(s.w) / maxW).toFixed(2) }, svg);
  }
  for (const u of units) {
    const g = el("g", { class: u.group ? "sub supernode" : "sub", "data-key": u.key }, svg);
    el(u.group ? "rect" : "circle", u.group ? { x: u.x - 9, y: u.y - 9, width: 18, height: 18, rx: 4 }
      : { cx: u.x, cy: u.y, r: 7 }, g);
    el("text", { x: u.x, y: u.y + 20, "text-anchor": "middle", class: "sub-label" }, g).textContent = u.label;
  }
}

function addSteer(id) {
  if (!state.steers.some((s) => s.id === id)) state.steers.push({ id, mode: "x", value: "2" });
  drawSteers();
  sync();
}

function drawSteers() {
  const body = $("#steers");
  body.replaceChildren();
  $("#steer-hint").hidden = state.steers.length > 0;
  state.steers.forEach((s, k) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    const name = document.createElement("td");
    name.textContent = nodeName(s.id);
    const mode = document.createElement("select");
    mode.className = "steer-mode";
    for (const [v, t] of [["x", "× its activation"], ["abs", "absolute"]]) {
      const o = document.createElement("option");
      o.value = v;
      o.textContent = t;
      o.selected = s.mode === v;
      mode.appendChild(o);
    }
    mode.addEventListener("change", () => { s.mode = mode.value; sync(); });
    const val = document.createElement("input");
    val.type = "number";
    val.step = "0.1";
    val.className = "steer-value";
    val.value = s.value;
    val.addEventListener("input", () => { s.value = val.value; sync(); });
    const rm = document.createElement("button");
    rm.type = "button";
    rm.textContent = "×";
    rm.addEventListener("click", () => { state.steers.splice(k, 1); drawSteers(); sync(); });
    const cells = [name, mode, val, rm].map((x) => {
      const td = x.tagName === "TD" ? x : document.createElement("td");
      if (td !== x) td.appendChild(x);
      return td;
    });
    tr.append(...cells);
    body.appendChild(tr);
  });
}

// the steered and unsteered lanes from one seed (stream.js reads the events)
async function generate() {
  const button = $("#generate"), status = $("#run-status");
  for (const lane of ["steered", "unsteered"]) $(`#lane-${lane}`).textContent = "";
  button.disabled = true;
  status.textContent = "generating…";
  document.body.dataset.run = "running";
  try {
    const q = graphQuery();
    for (const s of state.steers) q.append("steer", `${s.id}:${s.mode}:${s.value}`);
    q.set("seed", state.seed); q.set("temp", state.temp); q.set("max_new_tokens", state.max_new_tokens);
    await streamLanes(`/graph/steer/stream?${q}`, ["steered", "unsteered"], status);
  } catch (e) {
    status.textContent = `stream failed: ${e}`;
  } finally {
    button.disabled = false;
    document.body.dataset.run = "done";
  }
}

$("#graph-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = e.target.elements.prompt.value;
  const targets = parseTargets(e.target.elements.targets.value);
  const changed = prompt !== state.prompt || targets.join("\u0000") !== state.targets.join("\u0000");
  state.prompt = prompt;
  state.targets = targets;
  if (changed) { state.pins = []; state.groups = []; state.steers = []; }
  sync();
  load();
});
$("#group-button").addEventListener("click", group);
$("#generate").addEventListener("click", generate);
for (const [sel, key] of [["#seed", "seed"], ["#temp", "temp"], ["#max-new", "max_new_tokens"]]) {
  $(sel).value = state[key];
  $(sel).addEventListener("input", () => { state[key] = $(sel).value; sync(); });
}
$("#copy-link").addEventListener("click", async (e) => {
  e.preventDefault();
  try { await navigator.clipboard.writeText(location.href); } catch (_) { /* the address bar has it too */ }
});
drawSteers();
sync();
load();

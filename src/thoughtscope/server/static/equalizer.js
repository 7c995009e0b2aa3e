// The equalizer: sliders <-> URL (replaceState), and one server-sent-events stream that fills three columns.
// Feature sliders are logarithmic: position t in [-100, 100] means strength sign(t) * (101^(|t|/100) - 1) / 10,
// so the first half of the travel covers 0..0.9x max (the max stored with the SAE) and the rest reaches 10x.

const form = document.getElementById("mixer");
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

export const toStrength = (t) => Math.sign(t) * (Math.pow(101, Math.abs(t) / 100) - 1) / 10;
export const toPosition = (v) => Math.sign(v) * 100 * Math.log(1 + 10 * Math.min(Math.abs(v), 10)) / Math.log(101);
const round = (x) => Math.round(x * 100) / 100;

function state() {
  const q = new URLSearchParams();
  q.set("prompt", $("#prompt").value);
  for (const row of $$(".slider.feature", $("#sliders"))) {
    const op = $(".op", row).value;
    q.append("f", `${row.dataset.feature}:${op}:${op === "ablate" ? 0 : Number($(".val", row).value) || 0}`);
  }
  for (const row of $$(".slider.vector")) {
    const v = Number($(".val", row).value) || 0;
    if (v !== 0) q.append("v", `${row.dataset.key}:${v}`);
  }
  for (const row of $$(".slider.preset")) {
    const v = Number($(".val", row).value) || 0;
    if (v !== 0) q.append("p", `${row.dataset.preset}:${v}`);
  }
  for (const name of ["strength", "seed", "temp", "max_new_tokens", "where"]) q.set(name, form.elements[name].value);
  const base = $("#baseline").value.trim();
  if (base) q.set("baseline", base);
  return q.toString();
}

function sync() {
  const q = state();
  history.replaceState(null, "", `/steer?${q}`);
  $("#save-preset").href = `/steer/preset.json?${q}`;
}

function wire(row) {
  const range = $("input[type=range]", row), box = $(".val", row), op = $(".op", row);
  const log = range.classList.contains("log");
  const show = () => { range.value = log ? toPosition(Number(box.value) || 0) : box.value; };
  show();
  range.addEventListener("input", () => { box.value = log ? round(toStrength(Number(range.value))) : range.value; sync(); });
  box.addEventListener("change", () => { show(); sync(); });
  if (op) op.addEventListener("change", () => { row.classList.toggle("ablated", op.value === "ablate"); sync(); });
  if (op) row.classList.toggle("ablated", op.value === "ablate");
  const rm = $(".remove", row);
  if (rm) rm.addEventListener("click", () => { row.remove(); sync(); });
}

function addFeature() {
  const n = $("#add-feature").value.trim();
  if (!/^\d+$/.test(n)) return;
  const html = $("#slider-template").innerHTML.replaceAll("__N__", n);
  const holder = document.createElement("div");
  holder.innerHTML = html.trim();
  const row = holder.firstElementChild;
  $("#sliders").appendChild(row);
  wire(row);
  $("#add-feature").value = "";
  sync();
}

// The three lanes from one seed (stream.js reads the events).
async function generate() {
  const button = $("#generate"), status = $("#run-status");
  for (const lane of ["steered", "unsteered", "baseline"]) $(`#lane-${lane}`).textContent = "";
  if (!$("#baseline").value.trim()) $("#lane-baseline").textContent = "(no baseline instruction given)";
  button.disabled = true;
  status.textContent = "generating…";
  document.body.dataset.run = "running";
  try {
    await streamLanes(`/steer/stream?${state()}`, ["steered", "unsteered", "baseline"], status);
  } catch (e) {
    status.textContent = `stream failed: ${e}`;
  } finally {
    button.disabled = false;
    document.body.dataset.run = "done";
  }
}

async function upload(file) {
  const resp = await fetch(`/steer/preset?${state()}`, { method: "POST", body: await file.text(),
                                              headers: { "content-type": "application/json" } });
  const body = await resp.json();
  if (resp.ok) location.href = body.url; else $("#run-status").textContent = `${resp.status}: ${body.error}`;
}

if (form) {
  $$(".slider").forEach(wire);
  form.addEventListener("change", sync);
  form.addEventListener("input", (e) => { if (e.target.matches("textarea, input[name=baseline]")) sync(); });
  $("#add-button").addEventListener("click", addFeature);
  $("#add-feature").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); addFeature(); } });
  $("#generate").addEventListener("click", generate);
  $("#copy-link").addEventListener("click", async () => {
    sync();
    try { await navigator.clipboard.writeText(location.href); $("#run-status").textContent = "link copied"; }
    catch { $("#run-status").textContent = location.href; }
  });
  const load = $("#load-preset");
  if (load) load.addEventListener("change", () => {
    // the whole mixer goes along: the server keeps the prompt, seed ... and a baseline the user wrote
    if (load.value) location.href = `/steer/load?name=${encodeURIComponent(load.value)}&${state()}`;
  });
  $("#upload-preset").addEventListener("change", (e) => { if (e.target.files[0]) upload(e.target.files[0]); });
  sync();
}

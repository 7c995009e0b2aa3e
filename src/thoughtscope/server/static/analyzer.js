// Analyzer token panel: a click on a token shows its strongest features (with explanations), its reconstruction
// error and, when an NLA is loaded, asks the server for the NLA's reading of that token (htmx fragment).
// The heatmap shows pieces of text, whole characters: a character split over several byte tokens is one piece
// (data-positions lists its tokens); the click opens its strongest token, and buttons open each of the others.

const detailNode = document.getElementById("detail");
if (detailNode) {
  const detail = JSON.parse(detailNode.textContent);
  const meta = JSON.parse(document.getElementById("analyzer-meta").textContent);
  const panel = document.getElementById("token-panel");
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const DISTRUST = ` <span class="pill warn below-control" title="its detection AUROC is at or below that of another feature's explanation on the same contexts">at or below its shuffled control: do not trust it</span>`;
  const fmt = (x) => (Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3));

  function show(span, i = Number(span.dataset.i)) {
    document.querySelectorAll("#heatmap .t.sel").forEach((s) => s.classList.remove("sel"));
    span.classList.add("sel");
    const d = detail[i];
    const positions = (span.dataset.positions || String(i)).split(",").map(Number);
    const rows = d.top.map(([f, a, rel, label, below]) =>
      `<li><a href="/features/${f}">#${f}</a> <span class="bar small"><i style="width:${Math.min(100, 100 * rel).toFixed(1)}%"></i></span>` +
      ` <b>${fmt(a)}</b> <span class="muted">${esc(label)}</span>` + (below ? DISTRUST : "") +
      ` <a class="small recolour" href="/analyze?feature=${f}&text=${encodeURIComponent(meta.text)}">colour by this</a></li>`).join("");
    let html = `<h3>Token <code>${esc(span.textContent)}</code> <span class="muted small">position ${i}</span></h3>`;
    if (positions.length > 1) {
      html += `<p class="small piece-tokens">one character over ${positions.length} tokens: ` + positions.map((q) =>
        `<button type="button" class="ghost small${q === i ? " on" : ""}" data-q="${q}">position ${q}</button>`).join(" ") + `</p>`;
    }
    html += d.excluded ? `<p class="muted small">The SAE does not read this position (attention sink).</p>` : "";
    html += `<p class="small">reconstruction error <b>${fmt(d.err)}</b> <span class="muted">(‖x − x̂‖² / ‖x‖²)</span></p>`;
    html += rows ? `<ul class="neighbours token-features">${rows}</ul>` : `<p class="muted">no feature fires here</p>`;
    if (d.probes && d.probes.length) {
      html += `<h3>Probes</h3><ul class="neighbours probe-scores">` + d.probes.map(([name, score, fires]) =>
        `<li>${esc(name)} <b>${fmt(score)}</b> <span class="pill">${fires ? "above" : "below"} threshold</span></li>`).join("") + `</ul>`;
    }
    if (meta.nla && i > 0) html += `<div id="nla-panel"><button type="button" class="ghost" id="nla-explain">Explain with the NLA</button></div>`;
    else if (meta.nla) html += `<p class="muted small" id="nla-panel">The NLA does not explain position 0 (attention sink).</p>`;
    html += `<div id="causal-panel"><button type="button" class="ghost" id="lens-here">What each layer says here</button>` +
      (meta.jacobian ? ` <label class="small"><input type="checkbox" id="lens-jacobian"> Jacobian lens</label>` : "") + `</div>`;
    panel.innerHTML = html;
    wireCausal(i);
    panel.querySelectorAll(".piece-tokens button").forEach((b) => b.addEventListener("click", () => show(span, Number(b.dataset.q))));
    const btn = document.getElementById("nla-explain");
    if (btn) btn.addEventListener("click", () => {
      btn.disabled = true; btn.textContent = "explaining…";
      htmx.ajax("GET", `/nla/token?pos=${i}&text=${encodeURIComponent(meta.text)}`, { target: "#nla-panel" });
    });
  }
  async function getJSON(url) {
    const r = await fetch(url);
    const d = await r.json();
    if (!r.ok) throw new Error(d.error || r.statusText);
    return d;
  }
  const q = (params) => Object.entries(params).map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");

  function wireCausal(i) {
    const box = document.getElementById("causal-panel");
    const btn = document.getElementById("lens-here");
    btn.addEventListener("click", async () => {
      btn.disabled = true; btn.textContent = "reading every layer…";
      const jac = document.getElementById("lens-jacobian");
      const kind = jac && jac.checked ? "jacobian" : "logit";
      try {
        const d = await getJSON(`/api/analyze/lens?${q({ text: meta.text, pos: i, kind })}`);
        const rows = d.layers.map((top, layer) => `<tr><td class="muted">${layer}</td><td>` +
          top.map(([, p], j) => `<code>${esc(d.shown.layers[layer][j])}</code> <span class="muted">${(100 * p).toFixed(0)}%</span>`).join(" ") + `</td></tr>`).join("");
        box.innerHTML = `<h3>What each layer says here <span class="muted small">${esc(d.kind)} lens</span></h3>` +
          `<table class="hits lens-column"><tbody>${rows}</tbody></table>` +
          `<p class="small">The model's next token: <code>${esc(d.shown.model_top1)}</code> ` +
          `<button type="button" class="ghost small" id="why-here">Why this token?</button></p><div id="why-panel"></div>`;
        document.getElementById("why-here").addEventListener("click", () => why(i, d.model_top1_id, d.shown.model_top1, 0));
      } catch (e) {
        box.innerHTML = `<p class="bad small">${esc(e.message)}</p>`;
      }
    });
  }

  async function why(i, target, shown, check) {
    const out = document.getElementById("why-panel");
    out.innerHTML = `<p class="muted small">${check ? "ablating the top features in the model…" : "crediting features…"}</p>`;
    try {
      const d = await getJSON(`/api/analyze/why?${q({ text: meta.text, pos: i, target_id: target, check })}`);
      const rows = d.features.map((f) => `<li><a href="/features/${f.feature}">#${f.feature}</a> <b>${f.attribution >= 0 ? "+" : ""}${fmt(f.attribution)}</b>` +
        (f.ablated !== null && f.ablated !== undefined ? ` <span class="small ablated">ablated: ${f.ablated >= 0 ? "+" : ""}${fmt(f.ablated)}</span>` : "") +
        ` <span class="muted">${esc(f.label || "")}</span>${f.below_control ? DISTRUST : ""}</li>`).join("");
      out.innerHTML = `<h3>Why <code>${esc(shown)}</code>? <span class="muted small">activation × gradient of its logit at ${esc(d.site)}</span></h3>` +
        `<ul class="neighbours why-features">${rows}</ul>` +
        `<p class="small muted">SAE error term at this position: ${fmt(d.error_last)}` +
        (d.spearman !== null && d.spearman !== undefined ? `; attribution vs measured ablation, Spearman ${d.spearman.toFixed(2)}` : "") + `</p>` +
        (check ? "" : `<button type="button" class="ghost small" id="why-check">Check by ablating them in the model</button>`);
      const c = document.getElementById("why-check");
      if (c) c.addEventListener("click", () => why(i, target, shown, 12));
    } catch (e) {
      out.innerHTML = `<p class="bad small">${esc(e.message)}</p>`;
    }
  }

  document.getElementById("heatmap").addEventListener("click", (e) => {
    const span = e.target.closest(".t");
    if (span) show(span);
  });
}

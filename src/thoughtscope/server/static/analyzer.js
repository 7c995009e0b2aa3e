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
    panel.innerHTML = html;
    panel.querySelectorAll(".piece-tokens button").forEach((b) => b.addEventListener("click", () => show(span, Number(b.dataset.q))));
    const btn = document.getElementById("nla-explain");
    if (btn) btn.addEventListener("click", () => {
      btn.disabled = true; btn.textContent = "explaining…";
      htmx.ajax("GET", `/nla/token?pos=${i}&text=${encodeURIComponent(meta.text)}`, { target: "#nla-panel" });
    });
  }
  document.getElementById("heatmap").addEventListener("click", (e) => {
    const span = e.target.closest(".t");
    if (span) show(span);
  });
}

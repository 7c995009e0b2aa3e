"""A self-contained HTML report of an atlas (inline CSS, plots as base64 PNGs) plus the PNG files themselves.

It shows the whole SAE, not its best side: the density histogram over all features, dead/alive counts,
the distribution of explanation scores over a *random* sample of features, and cards for random features.
"""

from __future__ import annotations

import base64
import html
import io
import os
import random
import time
from pathlib import Path

import numpy as np

from .._io import atomic_write_bytes, atomic_write_text
from ..display import lone_token_text, window_pieces
from .cards import load_tokenizer, logit_scale, score_line
from .db import Atlas

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{padding:2px 8px;text-align:left}
.card{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}
.ctx{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap;margin:2px 0}
.ctx span{border-radius:2px}.peak{outline:1px solid #a00}.dim{color:#888}.meta{color:#666;font-size:.9em}
.grid{display:flex;gap:1em;flex-wrap:wrap}.grid img{max-width:520px}
"""


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(atlas: Atlas, sample_scores: list[dict]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = atlas.stats()
    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    d = st["density"][st["density"] > 0]
    if len(d):
        ax.hist(np.log10(d), bins=50, color="#4a7")
    n_dead = int((st["n_active"] == 0).sum())
    ax.set_xlabel("log10 activation density (share of tokens where the feature is active)")
    ax.set_ylabel("features")
    ax.set_title(f"feature density: {len(d)} alive, {n_dead} dead")
    out["density.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    keys = [
        ("detection_auroc", "detection AUROC"),
        ("shuffled_detection_auroc", "shuffled control AUROC"),
        ("detection_bacc", "detection bal. acc."),
        ("fuzz_auroc", "fuzzing AUROC"),
    ]
    bins = np.linspace(0, 1, 21)
    for k, label in keys:
        v = [r[k] for r in sample_scores if r.get(k) is not None]
        if v:
            ax.hist(v, bins=bins, alpha=0.5, label=f"{label} (mean {np.mean(v):.2f}, n={len(v)})")
    ax.axvline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xlabel("score (0.5 = chance)")
    ax.set_ylabel("features")
    ax.set_title("explanation scores, random sample of features")
    if sample_scores:
        ax.legend(fontsize=7)
    out["scores.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    mx = st["max_act"][st["n_active"] > 0]
    if len(mx):
        ax.hist(np.log10(mx), bins=50, color="#47a")
    ax.set_xlabel("log10 maximum activation")
    ax.set_ylabel("features")
    ax.set_title("maximum activation per alive feature")
    out["max_act.png"] = _png(fig)
    plt.close(fig)
    return out


def _tok(tokenizer, tid: int) -> str:
    return lone_token_text(tokenizer, tid) if tokenizer is not None else f"[{tid}]"


def _units(items: list[tuple[int, int, float]], tokens, tokenizer) -> list[tuple[str, list[int], list[float]]]:
    """(text, positions, each token's activation) per shown piece of text: a token, or the tokens that spell one
    character together (`thoughtscope.display`), coloured by its strongest token."""
    acts = {p: a for p, _, a in items}
    if not acts:
        return []
    if tokenizer is None:
        return [(_tok(None, t), [p], [a]) for p, t, a in items]
    out = []
    for pc in window_pieces(tokenizer, tokens, min(acts), max(acts)):
        where = list(pc.positions)
        out.append((pc.text, where, [acts[q] for q in where if q in acts]))
    return out


def _ctx_html(ex, tokenizer, max_act: float, left: int = 12, right: int = 4) -> str:
    spans = []
    items = [(p, tid, a) for p, tid, a in ex.token_acts() if p >= 1 and ex.pos - left <= p <= ex.pos + right]
    for text, where, vals in _units(items, ex.tokens, tokenizer):
        s = html.escape(text).replace("\n", "⏎")
        cls = ' class="peak"' if ex.pos in where else ""
        a = max(vals, default=0.0)
        if a > 0:
            lvl = min(1.0, a / max_act) if max_act > 0 else 0
            tip = f"{a:.3g}" if len(vals) == 1 else f"{a:.3g} (one character over {len(vals)} tokens: "
            tip += "" if len(vals) == 1 else ", ".join(f"{v:.3g}" for v in vals) + ")"
            spans.append(
                f'<span{cls} style="background:rgba(230,80,20,{0.15 + 0.75 * lvl:.2f})" title="{tip}">{s}</span>'
            )
        else:
            spans.append(f"<span{cls}>{s}</span>")
    return f'<div class="ctx"><span class="dim">{ex.act:7.3g} </span>{"".join(spans)}</div>'


def _card_html(atlas: Atlas, n: int, tokenizer) -> str:
    f = atlas.feature(n)
    ex = f.explanation
    h = [
        f'<div class="card"><b>feature {n}</b> <span class="meta">density {f.density:.2e} · max {f.max_act:.3g} · '
        f"active on {f.n_active:,} tokens</span>"
    ]
    if ex and ex["status"] == "ok":
        h.append(
            f"<div><b>explanation:</b> {html.escape(ex['explanation'] or '')}<br>"
            f'<span class="meta">{html.escape(score_line(ex))}</span></div>'
        )
    elif ex:
        h.append(f'<div class="meta">explanation failed: {html.escape(str(ex.get("error")))}</div>')
    if f.dead:
        h.append('<div class="meta">dead: never active on the atlas corpus</div>')
    else:
        h.append("<div><b>top</b></div>")
        h += [_ctx_html(e, tokenizer, f.max_act) for e in atlas.examples(n, "top", limit=6)]
        q = atlas.examples(n, "quantile")
        if q:
            h.append("<div><b>rank-quantile sample</b> (weak to strong)</div>")
            h += [_ctx_html(e, tokenizer, f.max_act) for e in q[:: max(1, len(q) // 4)][:4]]
    scale = logit_scale(atlas, n)
    s, unit = (scale, "x typical") if scale else (1.0, "raw logits")
    pos = ", ".join(f"{html.escape(repr(_tok(tokenizer, t)))} {v / s:+.2f}" for t, v in f.logits_pos[:8])
    neg = ", ".join(f"{html.escape(repr(_tok(tokenizer, t)))} {v / s:+.2f}" for t, v in f.logits_neg[:8])
    nb = ", ".join(f"{a} ({c:.2f})" for a, c in f.neighbours[:6])
    h.append(f'<div class="meta">promotes ({unit}): {pos}<br>suppresses: {neg}<br>nearest features: {nb}</div></div>')
    return "".join(h)


def write_report(
    atlas: Atlas | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    tokenizer=None,
    n_cards: int = 12,
    n_score_sample: int = 200,
    seed: int = 0,
) -> Path:
    """Write report.html (+ density.png, scores.png, max_act.png) next to the atlas or into `out`.

    Tokens are decoded with `tokenizer`, or, when it is None, with the atlas's own model tokenizer (loaded
    alone, see cards.load_tokenizer); ids are shown only when neither is available."""
    own = not isinstance(atlas, Atlas)
    at = Atlas.open(atlas) if own else atlas
    try:
        if tokenizer is None:
            tokenizer = load_tokenizer(at)
        out_dir = Path(out) if out is not None else at.path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        explained = sorted(at.explained("ok"))
        rng = random.Random(seed)
        scores = at.scores(sorted(rng.sample(explained, min(n_score_sample, len(explained)))))
        pngs = _plots(at, scores)
        for name, data in pngs.items():
            atomic_write_bytes(out_dir / name, data)
        cards = at.random_features(n_cards, seed=seed, alive_only=True)
        body = [
            f"<h1>Feature atlas: {html.escape(str(at.meta.get('model')))} {html.escape(str(at.meta.get('site')))}</h1>",
            _table(_overview_rows(at, len(explained))),
            "<h2>Density and activation</h2><div class='grid'>"
            + "".join(_img(pngs, n) for n in ("density.png", "max_act.png"))
            + "</div>",
            f"<h2>Explanation scores (random sample of {len(scores)} explained features)</h2>",
            _img(pngs, "scores.png", alt="scores"),
            _score_summary(scores, seed),
            f"<h2>Random features ({len(cards)}, uniformly sampled among alive features, seed {seed})</h2>",
            *(_card_html(at, n, tokenizer) for n in cards),
            f"<p class='meta'>written {time.strftime('%Y-%m-%d %H:%M')} by thoughtscope atlas report</p>",
        ]
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>atlas {html.escape(str(at.meta.get('model')))}"
            f"</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>"
        )
        return atomic_write_text(out_dir / "report.html", page)
    finally:
        if own:
            at.close()


def _overview_rows(at: Atlas, n_explained: int) -> list[tuple[str, object]]:
    """What the atlas was built from and how much of the SAE is alive and explained."""
    m = at.meta
    n_dead = int((at.stats()["n_active"] == 0).sum())
    return [
        ("model", m.get("model")),
        ("site", m.get("site")),
        ("SAE", m.get("sae_path") or "(in memory)"),
        ("architecture", m.get("sae_config", {}).get("arch")),
        ("features", at.n_features),
        ("alive / dead", f"{at.n_features - n_dead} / {n_dead}"),
        ("tokens read", f"{m.get('n_tokens'):,}"),
        ("corpus", m["corpus"].get("spec") if isinstance(m.get("corpus"), dict) else m.get("corpus")),
        ("explained features", n_explained),
        ("position 0 excluded", m.get("exclude_bos")),
    ]


def _table(rows: list[tuple[str, object]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _img(pngs: dict[str, bytes], name: str, alt: str | None = None) -> str:
    return f'<img alt="{alt or name}" src="data:image/png;base64,{base64.b64encode(pngs[name]).decode()}">'


SCORE_KEYS = (
    "detection_auroc",
    "shuffled_detection_auroc",
    "detection_bacc",
    "shuffled_detection_bacc",
    "fuzz_auroc",
    "fuzz_bacc",
)


def _score_summary(scores: list[dict], seed: int) -> str:
    """Mean scores with bootstrap CIs over the sampled features, and who wrote and scored them."""
    if not scores:
        return "<p class='meta'>No explanations yet: run <code>thoughtscope atlas explain</code>.</p>"
    from .scoring import mean_ci

    def mean(k):
        c = mean_ci([r[k] for r in scores if r.get(k) is not None], seed=seed)
        return f"{c['mean']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] (n={c['n']})" if c["n"] else "–"

    methods = sorted(
        {f"{r.get('method') or 'not recorded'} / {r.get('scorer_method') or 'not recorded'}" for r in scores}
    )
    return (
        "<table>"
        + "".join(f"<tr><th>{k}</th><td>{mean(k)}</td></tr>" for k in SCORE_KEYS)
        + f"<tr><th>written by / scored by</th><td>{html.escape('; '.join(methods))}</td></tr>"
        + "</table><p class='meta'>Scores are measured on held-out contexts the explanation was not "
        "written from; the shuffled control scores each feature with another feature's "
        "explanation (chance, measured). Means with 95% bootstrap CIs over features.</p>"
    )

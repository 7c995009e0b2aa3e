"""Feature explorer: one page per feature and random browsing (search lives in pages_search.py)."""

from __future__ import annotations

import random

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import RedirectResponse

from ..atlas.best import at_or_below_control
from ..display import lone_token_text
from .context import feature_id, need_atlas, page, wb_of
from .render import context_pieces

router = APIRouter()

SCORE_KEYS = (
    "score",
    "detection_auroc",
    "detection_bacc",
    "fuzz_auroc",
    "fuzz_bacc",
    "shuffled_detection_auroc",
    "shuffled_detection_bacc",
)
WHO_KEYS = ("method", "scorer_method", "explainer", "scorer")


def _need_atlas(wb):
    return need_atlas(wb)  # 503 with the build's progress while the first-start atlas is built


KIND_LABELS = {"input": "where it fires", "output": "what it says", "nla": "NLA reading"}
KIND_SCORE_KEYS = ("detection_auroc", "shuffled_detection_auroc", "detection_bacc", "own_score")


def _kind_view(r: dict, best: str | None) -> dict:
    """One kind of explanation as the page shows it: its text, scores, whether it is best, and a warning when its
    detection AUROC is at or below its shuffled control's."""
    scores = [(k, r[k]) for k in KIND_SCORE_KEYS if r.get(k) is not None]
    if r.get("own_score") is not None and r.get("own_effect") is not None:
        scores.append(("own_effect_nats", r["own_effect"]))
        if r.get("own_control_effect") is not None:
            scores.append(("own_control_effect_nats", r["own_control_effect"]))
    warn = None
    if r.get("at_or_below_control"):
        warn = (
            f"scores at or below its shuffled control (detection AUROC {r['detection_auroc']:.2f} vs "
            f"{r['shuffled_detection_auroc']:.2f} for another feature's explanation): do not trust this reading"
        )
    return {
        "kind": r["kind"],
        "label": KIND_LABELS.get(r["kind"], r["kind"]),
        "text": r.get("explanation") or "",
        "ok": r.get("status") == "ok",
        "error": r.get("error"),
        "scores": scores,
        "best": r["kind"] == best,
        "warn": warn,
        "method": r.get("method"),
        "own_method": r.get("own_method"),
    }


def explanation_view(ex: dict | None, kinds: dict | None = None) -> dict | None:
    """The explanation and whatever scores and methods the atlas stores for it (measured scores first, then the
    shuffled-explanation control, then any other number), None where not measured. With `kinds`
    (`Atlas.explanation_kinds`): every kind of explanation with its scores ("kinds"), the best ("best"), a
    warning on each at or below its shuffled control, and why there is no NLA reading ("nla")."""
    rows = (kinds or {}).get("kinds") or []
    if not ex and not rows:
        return None
    missing = not ex  # other kinds only: no input-side explanation
    ex = ex or {"status": "missing"}
    skip = {"feature", "explanation", "status", "error", "details", "seconds", "created", *SCORE_KEYS, *WHO_KEYS}
    scores = [(k, ex[k]) for k in SCORE_KEYS if ex.get(k) is not None]
    scores += [
        (k, v)
        for k, v in ex.items()
        if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None
    ]
    best = (kinds or {}).get("best")
    return {
        "text": ex.get("explanation") or "",
        "ok": ex.get("status", "ok") == "ok",
        "error": ex.get("error"),
        "scores": scores,
        "below_control": bool(at_or_below_control(ex)),  # warned wherever the explanation is shown
        **{k: ex.get(k) for k in WHO_KEYS},
        "missing": missing,
        "kinds": [_kind_view(r, best) for r in rows],
        "best": best,
        "best_rule": (kinds or {}).get("best_rule"),
        "nla": ((kinds or {}).get("nla") or {}).get("note"),
    }


def feature_data(wb, n: int, n_top: int = 12, n_quantile: int = 10) -> dict:
    at = _need_atlas(wb)
    tok = wb.tokenizer
    with wb.db_lock:
        f = at.feature(n)
        kinds = at.explanation_kinds(n)
        top = at.examples(n, "top", limit=n_top)
        quant = at.examples(n, "quantile")
    step = max(1, len(quant) // n_quantile)
    quant = quant[::-1][::step][:n_quantile] if f.n_active > len(quant) else []

    def ctx(e):
        ta = [(p, a) for p, _, a in e.token_acts() if p >= 1]  # a contiguous range of positions
        if not ta:
            return {"act": e.act, "pos": e.pos, "bin": e.bin, "tokens": [], "pieces": []}
        pieces = context_pieces(tok, e.tokens, dict(ta), e.pos)
        texts = {pc["positions"][-1]: pc["text"] for pc in pieces}  # a piece's last token carries its text
        tokens = [(p, texts.get(p, ""), a) for p, a in ta]  # one per token: joined, they give the text
        return {"act": e.act, "pos": e.pos, "bin": e.bin, "tokens": tokens, "pieces": pieces}

    def decode(t):
        return lone_token_text(tok, t)

    return {
        "id": n,
        "f": f,
        "explanation": explanation_view(f.explanation, kinds),
        "top": [ctx(e) for e in top],
        "quantile": [ctx(e) for e in quant],
        "logits_pos": [(decode(t), v) for t, v in f.logits_pos],
        "logits_neg": [(decode(t), v) for t, v in f.logits_neg],
        "logit_typical": float(wb.logit_typical[n]) or 1.0,  # pages show effects in x this (never 0: a zero row)
        "neighbours": [(int(i), c, wb.label(int(i))) for i, c in f.neighbours],
        "edges": at.hist_edges,
        "sweep": wb.sweeps.get(n),
        "baseline": wb.baseline_for(n),
        "slider_max": float(wb.slider_max[n]) if wb.slider_max is not None else None,
        "slider_source": wb.slider_source,
    }


@router.get("/features/random")
def random_feature(request: Request, seed: int | None = None):
    """A uniformly random alive feature: unbiased browsing, not only the features a search turns up."""
    wb = wb_of(request)
    alive = wb.alive.nonzero()[0]
    if not len(alive):
        raise HTTPException(404, "no feature of this SAE fired on the atlas corpus")
    n = int(random.Random(seed).choice(alive.tolist()))
    return RedirectResponse(f"/features/{n}", status_code=303)


@router.get("/features/{n}")
def feature_page(request: Request, n: str):
    wb = wb_of(request)
    return page(request, "feature.html", nav="features", d=feature_data(wb, feature_id(request, n)))


@router.get("/api/features/{n}")
def feature_json(request: Request, n: str):
    wb = wb_of(request)
    d = feature_data(wb, feature_id(request, n))
    f = d["f"]
    return {
        "id": f.id,
        "density": f.density,
        "max_act": f.max_act,
        "mean_act": f.mean_act,
        "n_active": f.n_active,
        "explanation": d["explanation"],
        "histogram": {"counts": f.hist.tolist(), "edges": d["edges"].tolist()},
        "top": d["top"],
        "quantile": d["quantile"],
        "logits_pos": d["logits_pos"],
        "logits_neg": d["logits_neg"],
        "logit_typical": d["logit_typical"],
        "neighbours": d["neighbours"],
    }

"""Finding features: by a concept's meaning, by the features firing on a text, by contrast of two prompt sets."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from ..analyzer import analyze_text
from ..atlas import AtlasError, contrast, search_concept
from ..atlas.search import SIGNALS
from .context import cfg_of, page, run_model, text_param, wb_of
from .pages_features import _need_atlas, explanation_view

router = APIRouter()


def _search_words(wb, q: str, k: int = 30) -> list[dict]:
    """Features for a concept by meaning (`atlas.search_concept`: the word's tokens, its embedding neighbours,
    sentences with it, what features write, explanation words), each hit with every signal's evidence."""
    at = _need_atlas(wb)
    with wb.db_lock:
        try:
            hits = search_concept(wb.lm, wb.sae, at, q, k=k)
        except AtlasError as e:
            raise HTTPException(422, str(e)) from None
        return [
            {
                **h.to_dict(),
                "evidence": [
                    {"signal": s, "score": round(h.signals[s], 3), "tokens": h.tokens.get(s, [])}
                    for s in SIGNALS
                    if h.signals[s] > 0
                ],
                "max_act": float(wb.atlas_max[h.feature]),
                "explanation": explanation_view(at.explanation(h.feature)),
            }
            for h in hits
        ]


@router.get("/search")
async def search(
    request: Request,
    q: str | None = None,
    text: str | None = None,
    prompts: str | None = None,
    controls: str | None = None,
    mode: str = "words",
):
    """Three searches on one page: a concept by meaning (mode "words", also "meaning"), features firing on a text,
    contrast of two prompt sets."""
    wb, cfg = wb_of(request), cfg_of(request)
    ctx: dict = {
        "q": q or "",
        "text": text or "",
        "prompts": prompts or "",
        "controls": controls or "",
        "mode": mode,
        "hits": None,
        "kind": None,
    }
    if mode == "meaning":
        ctx["mode"] = mode = "words"
    if mode not in ("words", "text", "contrast"):
        raise HTTPException(422, f"mode must be words (or meaning), text or contrast, got {mode!r}")
    if mode == "words" and q is not None:
        ctx.update(hits=await run_model(request, _search_words, wb, text_param(q, "search words", cfg)), kind="words")
    elif mode == "text" and text is not None:
        ctx.update(hits=await run_model(request, _by_text, wb, text_param(text, "text", cfg), cfg), kind="text")
    elif mode == "contrast" and (prompts is not None or controls is not None):
        P, C = _lines(prompts, "prompts", cfg), _lines(controls, "controls", cfg)
        ctx.update(hits=await run_model(request, _by_contrast, wb, P, C), kind="contrast")
    return page(request, "search.html", nav="search", **ctx)


@router.get("/api/search")
async def search_json(request: Request, q: str | None = None, text: str | None = None):
    wb, cfg = wb_of(request), cfg_of(request)
    if text is not None:
        return {"hits": await run_model(request, _by_text, wb, text_param(text, "text", cfg), cfg)}
    return {"hits": await run_model(request, _search_words, wb, text_param(q, "q", cfg))}


def _lines(raw: str | None, name: str, cfg) -> list[str]:
    lines = [ln.strip() for ln in text_param(raw, name, cfg).splitlines() if ln.strip()]
    if len(lines) > 64:
        raise HTTPException(422, f"{name}: {len(lines)} lines; the limit is 64")
    return lines


def _by_text(wb, text: str, cfg) -> list[dict]:
    a = analyze_text(wb.lm, wb.sae, text, k=5, max_text_tokens=cfg.max_prompt_tokens)
    return wb.with_labels(
        [
            {
                "feature": n,
                "peak": v,
                "at": a.piece_at(p).text,  # the whole character, where the peak token holds part of one
                "pos": p,
                "rel": v / float(wb.atlas_max[n]),
            }
            for n, v, p in a.peaks[:30]
        ]
    )


def _by_contrast(wb, prompts: list[str], controls: list[str]) -> list[dict]:
    with wb.db_lock:
        rows = contrast(wb.lm, wb.sae, prompts, controls, k=20, atlas=wb.atlas)
    return wb.with_labels(rows)

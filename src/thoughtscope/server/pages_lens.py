"""Lens view: what each layer is about to say at every position (the logit lens, or the Jacobian lens where one
was fitted for this model), with a tracked token's rank across layers; click a token to track it."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from ..causal.lens import JacobianLens, lens_view
from ..errors import CausalError
from .context import cfg_of, page, run_model, text_param, wb_of

router = APIRouter()
KINDS = ("logit", "jacobian")


def _lens_for(wb):
    """The shipped Jacobian lens when it was fitted for this model, else None (the page offers the logit lens)."""
    if not hasattr(wb, "_jlens"):
        try:
            wb._jlens = JacobianLens.load("default", wb.lm)
        except CausalError:
            wb._jlens = None
    return wb._jlens


def _view(wb, text: str, kind: str, track: str | None, cfg):
    ids, _ = wb.lm.tokenize(text)
    if ids.shape[1] > min(cfg.max_prompt_tokens, 64):
        raise HTTPException(422, f"text has {ids.shape[1]} tokens; the lens view shows at most 64")
    lens = _lens_for(wb) if kind == "jacobian" else None
    if kind == "jacobian" and lens is None:
        raise HTTPException(422, f"no Jacobian lens is fitted for {wb.lm.name}: fit one with 'thoughtscope lens fit'")
    try:
        return lens_view(wb.lm, text, lens=lens, track=track or None, k=3)
    except CausalError as e:
        raise HTTPException(422, str(e)) from None


@router.get("/lens")
async def lens_page(request: Request, text: str | None = None, kind: str = "logit", track: str | None = None):
    wb, cfg = wb_of(request), cfg_of(request)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ctx = {"text": text or "", "kind": kind, "track": track or "", "view": None, "has_jacobian": False}
    ctx["has_jacobian"] = _lens_for(wb) is not None
    if text is not None:
        ctx["view"] = await run_model(request, _view, wb, text_param(text, "text", cfg), kind, track, cfg)
    return page(request, "lens.html", nav="lens", **ctx)


@router.get("/api/lens")
async def lens_json(request: Request, text: str, kind: str = "logit", track: str | None = None):
    wb, cfg = wb_of(request), cfg_of(request)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    view = await run_model(request, _view, wb, text_param(text, "text", cfg), kind, track, cfg)
    return view.to_dict()

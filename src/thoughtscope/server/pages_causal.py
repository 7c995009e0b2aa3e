"""The causal pages: the lens view (what each layer is about to say, a tracked token's rank, which SAE features
pushed the next token) and activation patching (which layers and positions carry an answer)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from ..causal.lens import lens_view
from ..errors import CausalError
from .context import cfg_of, page, run_model, text_param, wb_of
from .render import show_lone_token

router = APIRouter()
KINDS = ("logit", "jacobian")


def _lens_for(wb):
    return wb.jacobian_lens()


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


def _why(wb, text: str, target: str | int, cfg, *, pos: int | None = None, check: int = 20, limit: int = 64) -> dict:
    """Feature attribution for `target` as the next token (after position `pos`), the top `check` features
    checked by ablating them in the model (0: the first-order view only, the cheap request)."""
    from ..causal.attribution import attribute

    ids, _ = wb.lm.tokenize(text)
    if ids.shape[1] > min(cfg.max_prompt_tokens, limit):
        raise HTTPException(422, f"text has {ids.shape[1]} tokens; this view reads at most {limit}")
    try:
        res = attribute(wb.lm, wb.sae, text, target, check=check, pos=pos, cache=wb.residual_cache)
    except CausalError as e:
        raise HTTPException(422, str(e)) from None
    top = sorted(res.total.items(), key=lambda kv: -abs(kv[1]))[:12]
    feats = wb.with_labels([{"feature": f, "attribution": a, "ablated": res.ablation.get(f)} for f, a in top])
    from ..display import lone_token_text

    shown = lone_token_text(wb.tokenizer, target) if isinstance(target, int) else target
    return {"target": shown, "metric": res.metric, "site": res.site, "features": feats, "spearman": res.spearman,
            "error_last": res.error[-1]}  # fmt: skip


@router.get("/lens")
async def lens_page(
    request: Request,
    text: str | None = None,
    kind: str = "logit",
    track: str | None = None,
    why: str | None = None,
    why_id: int | None = None,
):
    """`why` (a token's text) or `why_id` (its id): the next token whose SAE features are credited."""
    wb, cfg = wb_of(request), cfg_of(request)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ctx = {"text": text or "", "kind": kind, "track": track or "", "view": None, "has_jacobian": False, "why": None}
    ctx["has_jacobian"] = _lens_for(wb) is not None
    if text is not None:
        text = text_param(text, "text", cfg)
        ctx["view"] = await run_model(request, _view, wb, text, kind, track, cfg)
        if why or why_id is not None:
            ctx["why"] = await run_model(request, _why, wb, text, why_id if why_id is not None else why, cfg)
    return page(request, "lens.html", nav="lens", **ctx)


@router.get("/api/attribute")
async def attribute_json(request: Request, text: str, target: str):
    wb, cfg = wb_of(request), cfg_of(request)
    return await run_model(request, _why, wb, text_param(text, "text", cfg), target, cfg)


def _column(wb, text: str, pos: int, kind: str, cfg) -> dict:
    from ..causal.lens import lens_column

    lens = _lens_for(wb) if kind == "jacobian" else None
    if kind == "jacobian" and lens is None:
        raise HTTPException(422, f"no Jacobian lens is fitted for {wb.lm.name}: fit one with 'thoughtscope lens fit'")
    try:
        col = lens_column(wb.lm, text, pos, lens=lens, k=3, cache=wb.residual_cache)
    except CausalError as e:
        raise HTTPException(422, str(e)) from None
    # what the page writes in each cell (a token of only spaces would look empty): the display rule's one home
    col["shown"] = {
        "layers": [[show_lone_token(t) for t, _ in row] for row in col["layers"]],
        "model_top1": show_lone_token(col["model_top1"]),
    }
    return col


@router.get("/api/analyze/lens")
async def analyze_lens_json(request: Request, text: str, pos: int, kind: str = "logit"):
    """The analyzer's token panel: what every layer says at one position (the text read up to there)."""
    wb, cfg = wb_of(request), cfg_of(request)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return await run_model(request, _column, wb, text_param(text, "text", cfg), pos, kind, cfg)


@router.get("/api/analyze/why")
async def analyze_why_json(request: Request, text: str, pos: int, target_id: int, check: int = 0):
    """The analyzer's "why this token": which SAE features pushed the model's next token after `pos`, first
    order (check=0, the view) or with the top `check` features (at most 20) ablated in the model."""
    wb, cfg = wb_of(request), cfg_of(request)
    if not 0 <= check <= 20:
        raise HTTPException(422, f"check must be between 0 and 20 features, got {check}")
    text = text_param(text, "text", cfg)
    return await run_model(request, _why, wb, text, target_id, cfg, pos=pos, check=check, limit=cfg.max_prompt_tokens)


@router.get("/api/lens")
async def lens_json(request: Request, text: str, kind: str = "logit", track: str | None = None):
    wb, cfg = wb_of(request), cfg_of(request)
    if kind not in KINDS:
        raise HTTPException(422, f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    view = await run_model(request, _view, wb, text_param(text, "text", cfg), kind, track, cfg)
    return view.to_dict()


PATCH_MAX_TOKENS = 32


def _patch(wb, pair, stream: str) -> dict:
    from ..causal.patching import activation_patching, attribution_patching

    ids, _ = wb.lm.tokenize(pair.clean)
    if ids.shape[1] > PATCH_MAX_TOKENS:
        raise HTTPException(422, f"the prompts have {ids.shape[1]} tokens; the patching page takes at most 32")
    try:
        act = activation_patching(wb.lm, pair, [stream])
        atp = attribution_patching(wb.lm, pair, [stream])
    except CausalError as e:
        raise HTTPException(422, str(e)) from None
    act.attributed = atp.attributed
    act.seconds.update(atp.seconds)
    return {"res": act, "grid": act.patched[stream].tolist(), "spearman": act.spearman(stream)}


def _cell(wb, pair, stream: str, layer: int, pos: int) -> dict:
    from ..causal.patching import patched_next_tokens

    try:
        return patched_next_tokens(wb.lm, pair, stream, layer, pos)
    except CausalError as e:
        raise HTTPException(422, str(e)) from None


@router.get("/patch")
async def patch_page(
    request: Request,
    clean: str | None = None,
    corrupt: str | None = None,
    target: str | None = None,
    against: str | None = None,
    stream: str = "resid",
    layer: int | None = None,
    pos: int | None = None,
):
    """Two prompts of the same length -> the patching map of one stream; `layer` and `pos` show that cell's run."""
    from ..causal import STREAMS, PatchPair

    wb, cfg = wb_of(request), cfg_of(request)
    if stream not in STREAMS:
        raise HTTPException(422, f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    ctx = {"clean": clean or "", "corrupt": corrupt or "", "target": target or "", "against": against or ""}
    ctx |= {"stream": stream, "streams": STREAMS, "out": None, "cell": None, "layer": layer, "pos": pos}
    if clean is not None and corrupt is not None and target:
        pair = PatchPair(text_param(clean, "clean", cfg), text_param(corrupt, "corrupt", cfg), target, against or None)
        ctx["out"] = await run_model(request, _patch, wb, pair, stream)
        if layer is not None and pos is not None:
            if not 0 <= layer < wb.lm.n_layers:
                raise HTTPException(422, f"layer {layer} is out of range: 0..{wb.lm.n_layers - 1}")
            ctx["cell"] = await run_model(request, _cell, wb, pair, stream, layer, pos)
    return page(request, "patch.html", nav="patch", **ctx)

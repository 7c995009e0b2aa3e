"""NLA view: explain any token of a text in words (the greedy explanation and its round-trip FVE; sampled ones on
request, the best by the true vector labelled as an oracle pick); edit an
explanation and steer the model with the reconstructor's difference AR(edited) − AR(original), side by side."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from ..display import token_pieces
from ..nla import explain_text, steer_from_words
from .context import cfg_of, float_param, int_param, page, run_model, text_param, wb_of

router = APIRouter()


def _need_nla(wb):
    if wb.nla is None:
        raise HTTPException(404, "no NLA is loaded: start the server with --nla default (or an NLA folder)")
    return wb.nla


def _tokens(wb, text: str, cfg) -> list[str]:
    ids, _ = wb.lm.tokenize(text)
    if ids.shape[1] > cfg.max_prompt_tokens:
        raise HTTPException(422, f"text has {ids.shape[1]} tokens; the limit is {cfg.max_prompt_tokens}")
    return [wb.tokenizer.decode([int(t)]) for t in ids[0]]


def _explain(wb, text: str, pos: int, samples: int) -> dict:
    return explain_text(wb.nla, text, positions=[pos], samples=samples, temperature=1.0)[0]


@router.get("/nla")
async def nla_page(
    request: Request,
    text: str | None = None,
    pos: str | None = None,
    samples: str = "1",
    prompt: str | None = None,
    original: str | None = None,
    edited: str | None = None,
    strength: str | None = None,
    scale: str | None = None,
):
    """`strength` multiplies the steering difference Δ (`scale` is its name in links made before the rename)."""
    wb, cfg = wb_of(request), cfg_of(request)
    nla = _need_nla(wb)
    ctx: dict = {
        "text": text or "",
        "pos": None,
        "tokens": [],
        "pieces": [],
        "res": None,
        "steer": None,
        "prompt": prompt or "",
        "original": original or "",
        "edited": edited or "",
        "strength": strength if strength is not None else (scale if scale is not None else "1"),
        "samples": samples,
        "site": nla.cfg.site,
    }
    if text is not None:
        text = text_param(text, "text", cfg)
        ctx["tokens"] = _tokens(wb, text, cfg)
        ctx["pieces"] = token_pieces(wb.tokenizer, wb.lm.tokenize(text)[0][0].tolist())
        n = len(ctx["tokens"])
        if pos not in (None, ""):
            p = int_param(pos, "pos", -n, n - 1)
            k = int_param(samples, "samples", 1, 8)
            ctx["pos"] = p % n
            ctx["res"] = await run_model(request, _explain, wb, text, p % n, k)
            if not ctx["original"]:
                ctx["original"] = ctx["edited"] = ctx["res"]["explanation"]
    if edited is not None and original is not None:
        s = float_param(ctx["strength"], "strength", -20, 20)
        steer_prompt = text_param(prompt, "prompt", cfg)
        _tokens(wb, steer_prompt, cfg)
        ctx["steer"] = await run_model(
            request,
            steer_from_words,
            nla,
            steer_prompt,
            text_param(original, "original", cfg),
            text_param(edited, "edited", cfg),
            strength=s,
            max_new_tokens=min(32, cfg.max_new_tokens),
            seed=0,
            temperature=0.0,
        )
    return page(request, "nla.html", nav="nla", **ctx)


@router.get("/nla/token")
async def nla_token(request: Request, text: str, pos: str, samples: str = "1"):
    """The analyzer's token panel asks for this fragment (htmx): the NLA's words for one token, with FVE."""
    wb, cfg = wb_of(request), cfg_of(request)
    _need_nla(wb)
    text = text_param(text, "text", cfg)
    n = len(_tokens(wb, text, cfg))
    p = int_param(pos, "pos", 1, n - 1)  # 0 is the attention sink
    res = await run_model(request, _explain, wb, text, p, int_param(samples, "samples", 1, 8))
    return page(request, "_nla_token.html", res=res, text=text)

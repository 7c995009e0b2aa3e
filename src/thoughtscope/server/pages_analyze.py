"""Analyzer: a text's tokens coloured by feature activation or reconstruction error; compare two texts."""

from __future__ import annotations

import json
from urllib.parse import quote, urlencode

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from ..analyzer import analyze_text, chat_text, compare_texts
from ..errors import ThoughtscopeError
from .context import cfg_of, form_fields, int_param, page, run_model, text_param, wb_of
from .render import piece_title

router = APIRouter()


def _piece_view(pc, tokens: list[dict]) -> dict:
    """One piece of the heatmap (whole characters) over its tokens: in each view (feature activation, error) it is
    coloured by its strongest token, which a click opens first, and its tooltip gives each token's value."""
    pos = list(pc.positions)
    i = max(pos, key=lambda q: (tokens[q]["rel"], -q))
    i_err = max(pos, key=lambda q: (tokens[q]["err"], -q))
    lead = tokens[i]["lead"]
    return {
        "s": pc.text,
        "positions": pos,
        "i": i,
        "rel": tokens[i]["rel"],
        "title": piece_title([tokens[q]["act"] for q in pos], f"#{lead}") if lead is not None else "",
        "i_err": i_err,
        "err": tokens[i_err]["err"],
        "title_err": piece_title([tokens[q]["err"] for q in pos], "error"),
        "excluded": all(tokens[q]["excluded"] for q in pos),
    }


def analysis_view(wb, a, feature: int | None) -> dict:
    """Tokens with their colouring value, the pieces of text they show (whole characters, coloured by their
    strongest token), plus per-token detail (features with labels, error, probes) as JSON."""
    ids = sorted({n for t in a.top for n, _ in t} | ({feature} if feature is not None else set()))
    labels, distrusted = wb.labels(ids), wb.distrusted(ids)
    maxes = {n: float(wb.atlas_max[n]) for n in ids}
    errs = [e for i, e in enumerate(a.recon_error) if i not in a.excluded]
    err_scale = sorted(errs)[int(0.95 * (len(errs) - 1))] if errs else 1.0
    tokens = []
    for i, (s, top) in enumerate(zip(a.tokens, a.top)):
        if feature is not None:
            act = a.chosen[feature][i]
            rel, lead = act / maxes[feature], feature
        else:
            lead, act = top[0] if top else (None, 0.0)
            rel = act / maxes[lead] if lead is not None else 0.0
        tokens.append(
            {
                "i": i,
                "s": s,
                "act": act,
                "rel": min(rel, 1.0),
                "lead": lead,
                "err": a.recon_error[i],
                "excluded": i in a.excluded,
            }
        )
    pieces = [_piece_view(pc, tokens) for pc in a.pieces]
    detail = [
        {
            "top": [[n, v, v / maxes[n], labels.get(n, ""), n in distrusted] for n, v in t],
            "err": a.recon_error[i],
            "excluded": i in a.excluded,
            "probes": [
                [name, sc[i], sc[i] > float(getattr(wb.probes[name], "threshold", 0.0))]
                for name, sc in a.probe_scores.items()
            ],
        }
        for i, t in enumerate(a.top)
    ]
    peaks = wb.with_labels(
        [
            {"feature": n, "peak": v, "rel": v / float(wb.atlas_max[n]), "at": a.piece_at(p).text}
            for n, v, p in a.peaks[:12]
        ]
    )
    safe_json = json.dumps(detail).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return {
        "tokens": tokens,
        "pieces": pieces,
        "detail_json": safe_json,
        "peaks": peaks,
        "err_scale": err_scale or 1.0,
        "mean_err": sum(errs) / len(errs) if errs else 0.0,
    }


def _analyze(wb, text: str, feature: int | None, cfg, chat: bool = False):
    if chat:
        text = chat_text(wb.lm, text)
    with wb.residual_cache.record(wb.lm):  # the token panel's lens and "why" start from this pass's blocks
        a = analyze_text(
            wb.lm,
            wb.sae,
            text,
            k=8,
            features=[feature] if feature is not None else [],
            max_text_tokens=cfg.max_prompt_tokens,
            probes=wb.probes,
        )
    return text, analysis_view(wb, a, feature)


def share_link(cfg, text: str, feature: int | None, view: str, chat: bool) -> tuple[str | None, str]:
    """The GET address that reproduces an analysis, or None with the reason when its query string would be over
    the server's limit (`max_query_chars`: such a link would be refused with a 414)."""
    q = [("text", text)] + ([("feature", str(feature))] if feature is not None else []) + [("view", view)]
    query = urlencode(q + ([("chat", "1")] if chat else []), quote_via=quote)
    if len(query) > cfg.max_query_chars:
        return None, (
            f"No link to this result: the text needs {len(query):,} characters in an address, over the limit of "
            f"{cfg.max_query_chars:,}; the address stays /analyze (send the text again to see it)."
        )
    return f"/analyze?{query}", ""


async def _analyze_page(request: Request, text: str | None, feature: str | None, view: str, chat: bool = False):
    """The analyzer page; a text it cannot read (too long, too many tokens, the model busy) comes back in the form
    with the reason above it and the status (422, 429), so what was typed is never lost; a program (no text/html
    in its accept header) gets the JSON error."""
    wb, cfg = wb_of(request), cfg_of(request)
    if view not in ("features", "error"):
        raise HTTPException(422, f"view must be 'features' or 'error', got {view!r}")
    feat = int_param(feature, "feature", 0, wb.n_features - 1) if feature not in (None, "") else None
    ctx = {
        "text": text or "",
        "feature": feat,
        "view": view,
        "res": None,
        "chat": chat,
        "analyzed": text or "",
        "feature_label": wb.label(feat) if feat is not None else "",
        "feature_below_control": feat is not None and feat in wb.distrusted([feat]),
        "error": "",
        "share": None,
        "share_note": "",
        "has_jacobian": wb.jacobian_lens() is not None,
    }
    status, headers = 200, {}
    if text is not None:
        try:
            ctx["analyzed"], ctx["res"] = await run_model(
                request, _analyze, wb, text_param(text, "text", cfg), feat, cfg, chat
            )
            ctx["share"], ctx["share_note"] = share_link(cfg, text, feat, view, chat)
        except (HTTPException, ThoughtscopeError) as e:  # e.g. more tokens than max_prompt_tokens: a 422
            if "text/html" not in request.headers.get("accept", ""):
                raise  # a program asking: the JSON error
            status = e.status_code if isinstance(e, HTTPException) else 422
            headers = dict(getattr(e, "headers", None) or {})
            ctx["error"] = str(e.detail) if isinstance(e, HTTPException) else str(e)
    resp = page(request, "analyze.html", status_code=status, nav="analyze", **ctx)
    resp.headers.update(headers)
    return resp


@router.get("/analyze")
async def analyze_get(
    request: Request, text: str | None = None, feature: str | None = None, view: str = "features", chat: bool = False
):
    return await _analyze_page(request, text, feature, view, chat)


@router.post("/analyze")
async def analyze_post(request: Request):
    form = await form_fields(request)
    return await _analyze_page(
        request,
        form.get("text"),
        form.get("feature"),
        str(form.get("view") or "features"),
        form.get("chat") in ("1", "on", "true"),
    )


class AnalyzeRequest(BaseModel):
    text: str = Field(..., description="the text (or a transcript) to analyze")
    k: int = Field(8, ge=1, le=64)
    features: list[int] = Field(default_factory=list, max_length=16)


@router.post("/api/analyze")
async def analyze_json(request: Request, body: AnalyzeRequest):
    wb, cfg = wb_of(request), cfg_of(request)
    text = text_param(body.text, "text", cfg)
    a = await run_model(
        request,
        analyze_text,
        wb.lm,
        wb.sae,
        text,
        k=body.k,
        features=body.features,
        max_text_tokens=cfg.max_prompt_tokens,
        probes=wb.probes,
    )
    return {
        "tokens": a.tokens,
        "pieces": [{"text": pc.text, "positions": list(pc.positions)} for pc in a.pieces],
        "top": a.top,
        "recon_error": a.recon_error,
        "peaks": a.peaks,
        "excluded": a.excluded,
        "chosen": {str(k): v for k, v in a.chosen.items()},
        "probes": a.probe_scores,
    }


def _compare(wb, a: str, b: str, cfg):
    rows = compare_texts(
        wb.lm,
        wb.sae,
        a,
        b,
        k=25,
        max_act=wb.atlas_max if wb.atlas is not None else None,
        max_text_tokens=cfg.max_prompt_tokens,
    )
    return wb.with_labels(rows)


@router.get("/compare")
async def compare_page(request: Request, a: str | None = None, b: str | None = None):
    wb, cfg = wb_of(request), cfg_of(request)
    rows = None
    if a is not None or b is not None:
        rows = await run_model(request, _compare, wb, text_param(a, "text A", cfg), text_param(b, "text B", cfg), cfg)
    return page(request, "compare.html", nav="analyze", a=a or "", b=b or "", rows=rows)

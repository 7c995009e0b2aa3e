"""Feature pages while the first-start atlas is still being built (see atlas_job.py).

A feature's page needs the atlas for its contexts, histogram and explanation, but what the feature writes (its
decoder's direct logit effects) comes from the SAE and the model alone. While the atlas is built these routes
answer /features/{n} and /api/features/{n} with that, and with how far the build is; once the atlas is attached
they no longer match and the feature explorer's own routes (pages_features.py) answer the same addresses.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

from .context import AtlasPending, feature_id, page, wb_of

N_LOGITS = 10


class WhileAtlasBuilds(APIRoute):
    """A route that matches only while the workbench is loaded and its first-start atlas is not yet attached."""

    def matches(self, scope):
        app = scope.get("app")
        wb = getattr(getattr(app, "state", None), "wb", None)
        if wb is None or not wb.atlas_pending:
            return Match.NONE, {}
        return super().matches(scope)


router = APIRouter(route_class=WhileAtlasBuilds)


def sae_side(wb, n: int) -> dict:
    """What feature n writes, from its decoder row: the tokens whose logits it raises and lowers most, in
    multiples of a typical token's change (`Workbench.logit_typical`)."""
    from ..features import logit_effects

    pos_i, pos_v, neg_i, neg_v = logit_effects(wb.lm, wb.sae.W_dec[n : n + 1], k=N_LOGITS)
    typical = float(wb.logit_typical[n]) or 1.0  # never 0: a zero decoder row

    def tokens(ids, vals):
        return [(wb.tokenizer.decode([int(t)]), float(v)) for t, v in zip(ids[0].tolist(), vals[0].tolist())]

    return {
        "id": n,
        "logits_pos": tokens(pos_i, pos_v),
        "logits_neg": tokens(neg_i, neg_v),
        "logit_typical": typical,
        "slider_max": float(wb.slider_max[n]) if wb.slider_max is not None else None,
    }


@router.get("/features/{n}")
def feature_page_while_building(request: Request, n: str):
    wb = wb_of(request)
    d = sae_side(wb, feature_id(request, n))
    return page(request, "feature_building.html", nav="features", d=d, job=wb.atlas_build)


@router.get("/api/features/{n}")
def feature_json_while_building(request: Request, n: str):
    """503 (retry later) with the build's progress and what the SAE alone says about the feature."""
    wb = wb_of(request)
    d = sae_side(wb, feature_id(request, n))
    pending = AtlasPending(wb.atlas_build)
    body = {"error": pending.detail, "status": 503, "atlas": wb.atlas_build.to_dict(), **d}
    return JSONResponse(body, status_code=503, headers=pending.headers)

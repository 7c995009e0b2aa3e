"""What every route needs: the workbench (or a "still building" answer), the model gate, page rendering, input caps."""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from .guard import Busy


class NotReady(Exception):
    """The workbench is still loading (model, SAE, atlas build): answered with the building page."""


async def form_fields(request: Request) -> dict[str, str]:
    """An url-encoded form body (what a plain HTML form posts), without needing a multipart parser."""
    from urllib.parse import parse_qsl

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/x-www-form-urlencoded"):
        raise HTTPException(415, f"expected an url-encoded form, got content-type {ctype!r}")
    try:
        return dict(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise HTTPException(422, "the form is not valid UTF-8") from None


def wb_of(request: Request):
    wb = request.app.state.wb
    if wb is None:
        raise NotReady()
    return wb


def atlas_progress_words(job) -> str:
    """The first-start atlas build in a few words: "writing offline explanations, step 2 of 2: 41% (3,780 of 9,216
    features), about 2 min 05 s left", or what stopped it."""
    from .atlas_job import eta_words

    if job.error:
        return f"the atlas build failed: {job.error}"
    d = job.to_dict()
    words = f"{job.stage}, step {max(1, d['step'])} of {d['n_steps']}"
    if d["percent"] is not None:
        words += f": {d['percent']:.0f}% ({job.done:,} of {job.total:,} {job.unit})"
    eta = eta_words(job.eta_s())
    return f"{words}, {eta}" if eta else words


class AtlasPending(HTTPException):
    """What a page that needs the atlas answers while the first-start atlas is built (503, retry later), or after
    its build failed (503 too: the rest of the workbench works; a restart builds it again)."""

    def __init__(self, job):
        if job.error:
            msg = (
                f"this page needs the feature atlas, and building it failed ({job.error}); the analyzer, the "
                f"equalizer and the NLA view work without it, and restarting the server tries the build again"
            )
        else:
            msg = (
                "this page needs the feature atlas, which is still being built in the background ("
                f"{atlas_progress_words(job)}); the analyzer, the equalizer and the NLA view work meanwhile"
            )
        super().__init__(503, msg, headers={"retry-after": "10"})
        self.job = job


def need_atlas(wb):
    """The workbench's atlas; AtlasPending (503 with the build's progress) while the first-start atlas is built,
    404 where the server has none at all."""
    if wb.atlas is not None:
        return wb.atlas
    if getattr(wb, "atlas_build", None) is not None:
        raise AtlasPending(wb.atlas_build)
    raise HTTPException(404, "no atlas is loaded: start the server with --atlas DIR (or without it to build one)")


def cfg_of(request: Request):
    return request.app.state.cfg


def page(request: Request, template: str, status_code: int = 200, **ctx) -> HTMLResponse:
    app = request.app
    wb = app.state.wb
    body = app.state.env.get_template(template).render(
        request=request, wb=wb, cfg=app.state.cfg, nav=ctx.pop("nav", ""), status=app.state.status, **ctx
    )
    return HTMLResponse(body, status_code=status_code, headers={"cache-control": "no-store"})


async def run_model(request: Request, fn, *args, **kwargs):
    """Run model work in a worker thread, one job at a time per model; 429 when the queue is full."""
    try:
        async with request.app.state.gate.slot():
            return await run_in_threadpool(fn, *args, **kwargs)
    except Busy as e:
        raise HTTPException(429, str(e), headers={"retry-after": "2"}) from None


def text_param(value: str | None, name: str, cfg, *, required: bool = True) -> str:
    """A text field within the character cap; the token cap is checked by the library call that tokenises it."""
    if value is None or not value.strip():
        if required:
            raise HTTPException(422, f"{name} is empty: give some text")
        return ""
    if len(value) > cfg.max_text_chars:
        raise HTTPException(422, f"{name} has {len(value):,} characters; the limit is {cfg.max_text_chars:,}")
    return value


def int_param(value, name: str, lo: int | None = None, hi: int | None = None, *, status: int = 422) -> int:
    try:
        v = int(str(value).strip())
    except (TypeError, ValueError):
        raise HTTPException(status, f"{name} must be an integer, got {value!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise HTTPException(status, f"{name} must be in {lo}..{hi}, got {v}")
    return v


def float_param(value, name: str, lo: float, hi: float) -> float:
    try:
        v = float(str(value).strip())
    except (TypeError, ValueError):
        raise HTTPException(422, f"{name} must be a number, got {value!r}") from None
    if not lo <= v <= hi:  # also rejects nan
        raise HTTPException(422, f"{name} must be in {lo:g}..{hi:g}, got {value!r}")
    return v


def feature_id(request: Request, raw) -> int:
    """A feature index of this SAE; 404 for anything else (the page does not exist)."""
    wb = wb_of(request)
    return int_param(raw, "feature id", 0, wb.n_features - 1, status=404)

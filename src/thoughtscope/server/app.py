"""The FastAPI application: `create_app(config, workbench)` or `create_app(config, loader=...)` for a background load.

    from thoughtscope.server import ServerConfig, create_app, load_workbench
    app = create_app(ServerConfig(), load_workbench(atlas="my-atlas/"))   # any ASGI server, or app.mount(...)

No CORS middleware on purpose; the Guard in front refuses foreign hosts, cross-site requests and big bodies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ThoughtscopeError
from .atlas_job import eta_words
from .config import ServerConfig
from .context import NotReady, page, wb_of
from .guard import BodyTooLarge, Busy, Gate, Guard
from .render import HERE, make_env
from .workbench import LoadStatus, Workbench

log = logging.getLogger("thoughtscope.server")


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", "")


def _error(request: Request, status: int, message: str, headers: dict | None = None):
    if _wants_json(request):
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)
    resp = page(request, "error.html", status_code=status, code=status, message=message)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def create_app(config: ServerConfig | None = None, workbench: Workbench | None = None, *, loader=None) -> FastAPI:
    """The workbench app. Give a loaded `workbench`, or a `loader(status) -> Workbench` run in a thread at start
    (pages answer with the building page until it returns)."""
    cfg = config or ServerConfig()
    if (workbench is None) == (loader is None):
        raise ThoughtscopeError("create_app needs exactly one of workbench= or loader=")
    app = FastAPI(title="thoughtscope workbench", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.cfg = cfg
    app.state.wb = workbench
    app.state.status = LoadStatus(stage="ready" if workbench else "starting", ready=workbench is not None)
    app.state.gate = Gate(cfg.queue_size)
    app.state.stream_outcomes = Counter()  # how generation streams ended: completed, client gone, deadline ...
    app.state.env = make_env()
    app.state.env.globals["eta_words"] = eta_words  # the atlas build's ETA in words (_atlas_status.html)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    if loader is not None:
        _load_in_background(app, loader)
    _error_pages(app)
    _home_and_status(app)
    from . import pages_analyze, pages_building, pages_causal, pages_features, pages_nla, pages_search, pages_steer
    from .pages_graph import router as graph_router

    # pages_building first: its routes answer feature addresses only while the first-start atlas is built
    for mod in (pages_building, pages_features, pages_search, pages_analyze, pages_steer, pages_nla, pages_causal):
        app.include_router(mod.router)
    app.include_router(graph_router)
    return _guarded(app, cfg)


def _load_in_background(app: FastAPI, loader) -> None:
    """Run `loader(status)` in a thread; the workbench appears on `app.state.wb` when it returns."""

    def load() -> None:
        st = app.state.status
        try:
            app.state.wb = loader(st)
            st.set("ready")
            st.ready = True
        except Exception as e:  # noqa: BLE001 - shown on the building page and in the terminal
            st.error = f"{type(e).__name__}: {e}"
            log.error("loading the workbench failed: %s", st.error)

    threading.Thread(target=load, name="thoughtscope-loader", daemon=True).start()


def _error_pages(app: FastAPI) -> None:
    """Every error as an HTML page for browsers or {"error", "status"} JSON for the API, with its 4xx status."""

    @app.exception_handler(NotReady)
    async def _not_ready(request: Request, exc: NotReady):
        st = app.state.status
        if _wants_json(request):
            return JSONResponse(
                {"error": "the workbench is still loading", **st.to_dict()},
                status_code=503,
                headers={"retry-after": "5"},
            )
        return page(request, "building.html", status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return _error(request, 422, msgs or "invalid request")

    @app.exception_handler(ThoughtscopeError)
    async def _library(request: Request, exc: ThoughtscopeError):
        return _error(request, 422, str(exc))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return _error(request, 413, str(exc))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return _error(request, 429, str(exc), {"retry-after": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected error on %s: %s", request.url.path, "".join(traceback.format_exception(exc)))
        return _error(
            request, 500, f"internal error ({type(exc).__name__}); the terminal running the server has the details"
        )


def _home_and_status(app: FastAPI) -> None:
    """The home page, the loader's status as JSON, and the building page's server-sent status stream."""

    @app.get("/")
    def home(request: Request):
        wb = wb_of(request)
        meta = wb.atlas.meta if wb.atlas is not None else {}
        n_explained = 0
        if wb.atlas is not None:
            with wb.db_lock:  # one SQLite connection serves every worker thread
                n_explained = len(wb.atlas.explained())
        return page(request, "home.html", nav="home", meta=meta, n_alive=int(wb.alive.sum()), n_explained=n_explained)

    @app.get("/api/status")
    def status():
        """The loader's progress, and the model's load: jobs admitted (running and queued), generation threads
        alive, and how the generation streams served so far ended."""
        from .pages_steer import generation_threads

        gate = app.state.gate
        wb = app.state.wb
        build = wb.atlas_build if wb is not None else None
        return {
            **app.state.status.to_dict(),
            **({"atlas": build.to_dict()} if build is not None else {}),
            "model_jobs": gate.admitted,
            "generation_threads": generation_threads(),
            "streams": dict(app.state.stream_outcomes),
        }

    @app.get("/status/stream")
    async def status_stream(request: Request):
        """Server-sent status for the building page (htmx SSE extension): one event a second until ready."""

        async def events():
            for _ in range(3600):
                st = app.state.status
                html = app.state.env.get_template("_status.html").render(status=st)
                data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
                yield f"event: status\n{data}\n\n"
                if st.ready or st.error or await request.is_disconnected():
                    yield "event: ready\ndata: ready\n\n" if st.ready else ""
                    return
                await asyncio.sleep(1.0)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-store"})

    @app.get("/status/atlas/stream")
    async def atlas_stream(request: Request):
        """Server-sent progress of the first-start atlas build (the banner on every page): one `status` event a
        second while it runs, then `attached` when feature pages work (pages showing the build reload on it) and
        a last `status` when it is done or failed."""
        return StreamingResponse(
            _atlas_events(app, request), media_type="text/event-stream", headers={"cache-control": "no-store"}
        )


async def _atlas_events(app: FastAPI, request: Request):
    attached = False
    for _ in range(3600):  # an hour; the browser's EventSource connects again after that
        wb = app.state.wb
        job = wb.atlas_build if wb is not None else None
        html = app.state.env.get_template("_atlas_status.html").render(job=job, wb=wb)
        data = "\n".join(f"data: {line}" for line in html.splitlines() or [""])
        yield f"event: status\n{data}\n\n"
        if job is not None and job.attached and not attached:
            attached = True
            yield "event: attached\ndata: attached\n\n"
        if (wb is not None and job is None) or (job is not None and job.finished) or await request.is_disconnected():
            return
        await asyncio.sleep(1.0)


def _guarded(app: FastAPI, cfg: ServerConfig) -> FastAPI:
    """Put the Guard outermost (before routing and body reads) while still returning the FastAPI object."""
    app.add_middleware(Guard, config=cfg)
    return app

"""Equalizer: feature and vector sliders in the URL, steered / unsteered / prompt-only answers in one SSE stream.

The mixer state is the query string (`f=1234:clamp:4` per feature slider, its strength in × the feature's max
stored with the SAE, the reference the library and the CLI use, or in raw activation units when the SAE stores
none; `v=preset.2:0.5` per vector slider, `p=preset:1` per preset slider, the master `strength`, seed, temp,
max_new_tokens, prompt, baseline), so a copied link reproduces the mixer; links written before the renames (`gain`,
`max`) still open. Interventions are built with the library's constructors; generation is
`steer.stream_lanes`, which gives each lane exactly what `generate` would with the same seed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from ..documents import parse_json
from ..steer import (
    GenerationConfig,
    Lane,
    Preset,
    SteerError,
    ablate,
    add_feature,
    clamp,
    stream_lanes,
)
from ..steer.presets import preset_from_interventions
from .context import cfg_of, float_param, int_param, page, text_param, wb_of

log = logging.getLogger("thoughtscope.server")
router = APIRouter()
OPS = ("clamp", "add", "ablate")
SLIDER_MAX = 10.0  # a feature slider's reach: ± this many × max (or raw activation units)
DEFAULT_PROMPT = "Write a short note about your day."
OLD_PARAMS = {"gain": "strength", "max": "max_new_tokens"}  # query names of links made before the renames
STOP_WAIT_S = 30.0  # how long a finished or abandoned stream waits for its worker to stop (one token is far less)


@dataclass
class Mixer:
    prompt: str = DEFAULT_PROMPT
    features: list = field(default_factory=list)  # (feature, op, strength in the workbench's slider unit)
    vectors: list = field(default_factory=list)  # (slider key, strength)
    presets: list = field(default_factory=list)  # (preset name, strength: a multiple of its saved strengths)
    strength: float = 1.0  # the master strength: multiplies every slider
    seed: int = 16
    temp: float = 0.5
    max_new_tokens: int = 48
    baseline: str = ""
    where: str = "all"

    def query(self) -> str:
        q = [("prompt", self.prompt)] + [("f", f"{n}:{op}:{v:g}") for n, op, v in self.features]
        q += [("v", f"{k}:{v:g}") for k, v in self.vectors] + [("p", f"{k}:{v:g}") for k, v in self.presets]
        q += [
            ("strength", f"{self.strength:g}"),
            ("seed", str(self.seed)),
            ("temp", f"{self.temp:g}"),
            ("max_new_tokens", str(self.max_new_tokens)),
            ("where", self.where),
        ]
        if self.baseline:
            q.append(("baseline", self.baseline))
        return urlencode(q)


def _param(qp, name: str, default):
    """A query parameter under its name, or under the name links used before the rename."""
    old = next((o for o, n in OLD_PARAMS.items() if n == name), None)
    return qp.get(name, qp.get(old, default) if old else default)


def _slider(raw: str, known: dict, what: str, bounds) -> tuple[str, float]:
    """`NAME:STRENGTH` of a vector or preset slider, NAME one of those loaded at start, the strength within
    `bounds(NAME)`."""
    name, _, val = raw.rpartition(":")
    if name not in known:
        loaded = ", ".join(known) or "none"
        raise HTTPException(422, f"{what} slider {name!r} is not one of the {what}s loaded at start ({loaded})")
    return name, float_param(val, f"{what} slider {name}", *bounds(name))


def _feature_slider(raw: str, wb) -> tuple[int, str, float]:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[1] not in OPS:
        raise HTTPException(
            422, f"feature slider {raw!r}: expected FEATURE:OP[:STRENGTH] with OP one of {', '.join(OPS)}"
        )
    n = int_param(parts[0], f"feature slider {raw!r}: feature", 0, wb.n_features - 1)
    v = float_param(parts[2] if len(parts) == 3 else 0, f"feature slider {raw!r}: strength", -SLIDER_MAX, SLIDER_MAX)
    return n, parts[1], v


def _vector_bounds(range_: tuple[float, float]) -> tuple[float, float]:
    """A vector slider takes either sign up to its range's larger end."""
    lo, hi = range_
    return min(lo, -abs(hi)), max(hi, abs(lo))


def parse_mixer(request: Request) -> Mixer:
    """The mixer from the query string; every bad value is a 422 that names it."""
    wb, cfg = wb_of(request), cfg_of(request)
    qp = request.query_params
    m = Mixer(
        prompt=text_param(qp.get("prompt", DEFAULT_PROMPT), "prompt", cfg),
        baseline=text_param(qp.get("baseline", ""), "baseline", cfg, required=False),
    )
    fs, vs, ps = qp.getlist("f"), qp.getlist("v"), qp.getlist("p")
    if len(fs) + len(vs) + len(ps) > cfg.max_sliders:
        raise HTTPException(422, f"{len(fs) + len(vs) + len(ps)} sliders; the limit is {cfg.max_sliders}")
    m.presets = [_slider(raw, wb.preset_ivs, "preset", lambda _: (0, SLIDER_MAX)) for raw in ps]
    m.features = [_feature_slider(raw, wb) for raw in fs]
    m.vectors = [_slider(raw, wb.vectors, "vector", lambda k: _vector_bounds(wb.vectors[k].range)) for raw in vs]
    m.strength = float_param(_param(qp, "strength", 1), "strength", 0, 10)
    m.seed = int_param(qp.get("seed", 16), "seed", 0, 2**31 - 1)
    m.temp = float_param(qp.get("temp", 0.5), "temp", 0, 2)
    new = _param(qp, "max_new_tokens", cfg.default_new_tokens)
    m.max_new_tokens = int_param(new, "max_new_tokens", 1, cfg.max_new_tokens)
    m.where = qp.get("where", "all")
    if m.where not in ("all", "generated"):
        raise HTTPException(422, f"where must be 'all' or 'generated', got {m.where!r}")
    return m


def feature_edit(wb, n: int, op: str, strength: float, where: str = "all"):
    """The library intervention of one feature slider: `clamp(sae, n, strength, unit="max")` with the max the
    SAE stores (the library looks it up itself), or a raw-unit clamp when the SAE stores none."""
    label = wb.label(n)[:60]
    if op == "ablate":
        return ablate(wb.sae, n, positions=where, label=label)
    make = clamp if op == "clamp" else add_feature
    return make(wb.sae, n, strength, unit=wb.slider_unit, positions=where, label=label)


def interventions(wb, m: Mixer) -> list:
    """Library interventions for the mixer: every slider's strength times the master strength."""
    out = []
    for n, op, v in m.features:
        if op in ("ablate", "clamp") or v * m.strength != 0:
            out.append(feature_edit(wb, n, op, v * m.strength, m.where))
    for key, v in m.vectors:
        s = wb.vectors[key]
        if v == 0 and s.op == "add":
            continue
        out.append(replace(s.edit, strength=s.edit.strength * v * m.strength, label=s.label))
    for name, v in m.presets:
        if v * m.strength != 0:
            out += [scaled(iv, v * m.strength) for iv in wb.preset_ivs[name]]
    return out


def scaled(iv, k: float):
    """A copy of a library intervention with its strength (clamp target, amount, scale, projection) times k."""
    return replace(iv, strength=iv.strength * k)


def _gen_config(m: Mixer) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=m.max_new_tokens, temperature=m.temp, top_p=0.9, seed=m.seed)


@router.get("/steer")
def steer_page(request: Request, feature: str | None = None):
    wb = wb_of(request)
    m = parse_mixer(request)
    if feature not in (None, ""):  # "steer with this" from a feature page
        n = int_param(feature, "feature", 0, wb.n_features - 1)
        if all(f[0] != n for f in m.features):
            m.features.append((n, "clamp", 2.0))
        return RedirectResponse(f"/steer?{m.query()}", status_code=303)
    if not m.baseline and m.features:
        m.baseline = wb.baseline_for(m.features[0][0])
    sliders = [feature_slider_view(wb, n, op, v) for n, op, v in m.features]
    strengths = dict(m.vectors)
    vectors = [
        {
            "key": k,
            "label": s.label,
            "preset": s.preset,
            "op": s.op,
            "strength": strengths.get(k, 0.0),
            "range": s.range,
        }
        for k, s in wb.vectors.items()
    ]
    pstrengths = dict(m.presets)
    preset_sliders = [
        {"name": n, "strength": pstrengths.get(n, 0.0), "n_items": len(ivs), "description": wb.presets[n].description}
        for n, ivs in wb.preset_ivs.items()
    ]
    return page(
        request,
        "steer.html",
        nav="steer",
        m=m,
        sliders=sliders,
        vectors=vectors,
        preset_sliders=preset_sliders,
        presets=sorted(wb.presets),
        query=m.query(),
        unit=slider_unit_view(wb),
    )


def slider_unit_view(wb) -> dict:
    """What a feature slider's number means, for the page: × the max stored with the SAE, or raw units."""
    if wb.slider_unit == "max":
        return {"short": "× max", "long": f"× the feature's max, measured on {wb.slider_source}"}
    return {"short": "raw", "long": "raw activation units: the SAE stores no feature maxima"}


def feature_slider_view(wb, n: int, op: str, strength: float) -> dict:
    """One feature slider for the template: its strength, what 1 unit is in activation, the atlas's max as
    information, and a calibration curve when a sweep of it was loaded."""
    one = float(wb.slider_max[n]) if wb.slider_max is not None else 1.0
    info = f"1 {'× max' if wb.slider_unit == 'max' else 'unit'} = activation {one:.4g}"
    if wb.atlas is not None:
        info += f"; the largest activation in this atlas is {float(wb.atlas_max[n]):.4g} (shown, never used to scale)"
    return {"feature": n, "op": op, "strength": strength, "label": wb.label(n), "info": info, "sweep": wb.sweeps.get(n)}


def _lanes(wb, m: Mixer, cfg) -> list[Lane]:
    from ..steer import format_prompt

    n = len(format_prompt(wb.lm, m.prompt))
    if n > cfg.max_prompt_tokens:
        raise HTTPException(422, f"prompt has {n} tokens; the limit is {cfg.max_prompt_tokens}")
    lanes = [Lane("steered", interventions(wb, m)), Lane("unsteered")]
    if m.baseline:
        lanes.append(Lane("baseline", system=m.baseline))
    return lanes


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


GENERATION_THREAD = "thoughtscope-generation"  # the name of every generation's worker thread


def generation_threads() -> int:
    """Generation worker threads alive in this process (each stops between two tokens once its stream ends)."""
    return sum(t.name == GENERATION_THREAD for t in threading.enumerate())


class GenerationStream(StreamingResponse):
    """The SSE answer of one generation. Its gate ticket was taken before the 200 went out; whatever ends the
    response (the last event, the deadline, the client going away) closes the event generator, which stops the
    worker thread and waits for it; then the ticket goes back and the outcome is counted in `tally`."""

    def __init__(self, content, ticket, outcome: dict, tally: Counter, **kwargs):
        super().__init__(content, **kwargs)
        self.ticket, self.outcome, self.tally = ticket, outcome, tally

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.ticket.release()
            state = self.outcome["state"]
            self.tally["client gone" if state in ("queued", "running") else state] += 1


@router.get("/steer/stream")
async def steer_stream(request: Request):
    """One SSE stream: `steered`, `unsteered` and `baseline` events ({text, done}), then `end` (or `error`).

    Over the queue limit the answer is a 429 (with retry-after) before any event; a closed page stops the
    generation between two tokens."""
    wb, cfg = wb_of(request), cfg_of(request)
    m = parse_mixer(request)
    return lanes_stream(request, m, _lanes(wb, m, cfg), m.prompt, _gen_config(m))


def lanes_stream(request: Request, run, lanes, prompt: str, gen) -> GenerationStream:
    """The SSE answer that streams `lanes` of `prompt` (the equalizer's, and the graph page's steering): the
    generation validated first, the gate's ticket taken before the 200 (Busy -> 429 here). `run` is what the
    `start` event reports (seed, max_new_tokens, query)."""
    wb, cfg = wb_of(request), cfg_of(request)
    stop = threading.Event()
    it = stream_lanes(wb.lm, prompt, lanes, gen, should_stop=stop.is_set)  # validates first
    ticket = request.app.state.gate.ticket()
    outcome = {"state": "queued"}
    return GenerationStream(
        _events(request, run, lanes, it, stop, ticket, outcome, cfg),
        ticket,
        outcome,
        request.app.state.stream_outcomes,
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


async def _events(request: Request, m: Mixer, lanes, it, stop: threading.Event, ticket, outcome: dict, cfg):
    """The stream's events; the generation runs in its own thread once the model is ours. `outcome["state"]`
    goes queued -> running -> completed, deadline or error (or "stuck" when a worker ignores the stop)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    finished = asyncio.Event()
    produced = [0]

    def call(fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            stop.set()

    def work() -> None:
        try:
            for name, ev in it:
                produced[0] += 1
                call(queue.put_nowait, (name, {"text": ev.text, "done": ev.done}))
        except SteerError as e:
            call(queue.put_nowait, ("error", {"message": str(e)}))
        except Exception as e:  # noqa: BLE001 - reported to the page instead of a broken stream
            log.error("generation failed: %s: %s", type(e).__name__, e)
            call(queue.put_nowait, ("error", {"message": f"{type(e).__name__}: {e}"}))
        finally:
            call(queue.put_nowait, None)
            call(finished.set)

    counts = {ln.name: 0 for ln in lanes}
    async with request.app.state.gate.slot(ticket):  # held while the answers stream; the worker starts once ours
        t0 = time.perf_counter()
        threading.Thread(target=work, name=GENERATION_THREAD, daemon=True).start()
        outcome["state"] = "running"
        try:
            yield _sse("start", {"lanes": list(counts), "seed": m.seed, "query": m.query()})
            async for ev in _relay(request, queue, counts, t0, cfg.deadline_s, stop, outcome):
                yield ev
        finally:
            stop.set()  # checked by the worker between two tokens
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_WAIT_S) as waited:
                await finished.wait()
            if waited.cancelled_caught:
                outcome["state"] = "stuck"
                log.warning("a generation did not stop within %g s of being asked to", STOP_WAIT_S)
            elif outcome["state"] == "running":
                log.info(
                    "generation stopped after %d of at most %d lane tokens: the client went away",
                    produced[0],
                    len(lanes) * m.max_new_tokens,
                )


async def _relay(request: Request, queue: asyncio.Queue, counts: dict, t0: float, deadline_s: float, stop, outcome):
    """Lane events from the worker until it ends, the deadline passes or the page goes away."""
    deadline = t0 + deadline_s
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            stop.set()
            outcome["state"] = "deadline"
            yield _sse("error", {"message": f"deadline of {deadline_s:g} s reached; the answers stop here"})
            return
        try:
            item = await asyncio.wait_for(queue.get(), timeout=min(left, 1.0))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                stop.set()
                return
            continue
        if item is None:
            outcome["state"] = "error" if outcome["state"] == "error" else "completed"
            yield _sse("end", {"tokens": counts, "seconds": round(time.perf_counter() - t0, 3)})
            return
        name, data = item
        if name in counts:
            counts[name] += 1
        elif name == "error":
            outcome["state"] = "error"
        yield _sse(name, data)


@router.get("/steer/preset.json")
def preset_download(request: Request, name: str = "mixer"):
    """The mixer as a preset file (the format `thoughtscope steer --preset` reads)."""
    wb = wb_of(request)
    m = parse_mixer(request)
    if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 64:
        raise HTTPException(422, f"preset name {name!r}: use letters, digits, '-' and '_' (at most 64)")
    ivs = interventions(wb, m)
    p = preset_from_interventions(name, ivs, sae_paths={id(wb.sae): wb.sae_spec or "default"})
    p.description = f"saved from the thoughtscope workbench (master strength {m.strength:g} folded into the strengths)"
    return JSONResponse(p.to_dict(), headers={"content-disposition": f'attachment; filename="{name}.json"'})


def mixer_from_preset(wb, p: Preset, base: Mixer) -> Mixer:
    """Slider state from a preset: feature items of this SAE (any unit, converted to the slider unit so the
    absolute clamp is the one the preset applies) and its vectors. The prompt, seed, temperature, length and a
    baseline the user wrote come from `base`; a baseline the page filled in for one of `base`'s features is
    dropped, so the page fills it in again for the preset's features."""
    auto = {wb.baseline_for(n) for n, _, _ in base.features}
    m = Mixer(
        prompt=base.prompt,
        seed=base.seed,
        temp=base.temp,
        max_new_tokens=base.max_new_tokens,
        baseline="" if base.baseline in auto else base.baseline,
    )
    for i, it in enumerate(p.items):
        if it.type == "feature":
            if it.feature is None or not 0 <= it.feature < wb.n_features or it.op not in OPS:
                raise HTTPException(
                    422,
                    f"preset {p.name!r}, item {i}: feature {it.feature} with op {it.op!r} cannot "
                    f"be shown on this SAE's sliders (ops: {', '.join(OPS)})",
                )
            v = 0.0 if it.op == "ablate" else wb.to_slider(it.feature, it.strength, it.unit, it.max_act)
            m.features.append((int(it.feature), it.op, max(-SLIDER_MAX, min(SLIDER_MAX, round(float(v), 6)))))
            m.where = it.positions if it.positions in ("all", "generated") else m.where
        else:
            key = f"{p.name}.{i}"
            if key not in wb.vectors:
                raise HTTPException(
                    422,
                    f"preset {p.name!r}, item {i}: a vector can only come from a preset loaded "
                    f"at start (files are never read from a request)",
                )
            lo, hi = _vector_bounds(wb.vectors[key].range)  # as a feature's: within what the slider reaches
            m.vectors.append((key, max(lo, min(hi, float(it.strength)))))
    return m


def refuse_files(wb, p: Preset) -> None:
    """A request never names a file the server would open: an uploaded item whose vector is a path, or whose SAE
    is anything but the one this workbench serves, is refused (422) without touching the file system."""
    ours = {posixpath.normpath(wb.sae_spec or "default")}
    for i, it in enumerate(p.items):
        if it.type == "vector" and isinstance(it.vector, str):
            raise HTTPException(
                422,
                f"uploaded preset, item {i}: vector {it.vector!r} names a file, and the server never opens a file "
                f"a request names: put the preset in a preset folder the server reads at start",
            )
        if it.type == "feature" and posixpath.normpath(str(it.sae)) not in ours:
            raise HTTPException(
                422,
                f"uploaded preset, item {i}: SAE {it.sae!r} is not the one this workbench serves "
                f"({wb.sae_spec or 'default'!r}), and the server never opens a file a request names",
            )


@router.get("/steer/load")
def preset_load(request: Request, name: str):
    wb = wb_of(request)
    if name not in wb.presets:
        loaded = ", ".join(sorted(wb.presets)) or "none"
        raise HTTPException(404, f"no preset named {name!r}; loaded at start: {loaded}")
    m = mixer_from_preset(wb, wb.presets[name], parse_mixer(request))
    return RedirectResponse(f"/steer?{m.query()}", status_code=303)


@router.post("/steer/preset")
async def preset_upload(request: Request):
    """A preset JSON in the body, the page's mixer in the query string (its prompt, seed, temperature, length and
    baseline are kept): answered with the mixer URL it sets (the page then goes there)."""
    wb = wb_of(request)
    raw = await request.body()
    try:
        d = parse_json(raw)  # bad JSON, over-long numbers and deep nesting are all ValueErrors
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"preset is not valid JSON ({e})") from None
    p = Preset.from_dict(d, source="uploaded preset")  # SteerError -> 422 with the item at fault
    refuse_files(wb, p)
    m = mixer_from_preset(wb, p, parse_mixer(request))  # the page's prompt, seed ... come in the query string
    url = f"/steer?{m.query()}"
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(url, status_code=303)
    return {"url": url}

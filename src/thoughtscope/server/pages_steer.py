"""Equalizer: feature and vector sliders in the URL, steered / unsteered / prompt-only answers in one SSE stream.

The mixer state is the query string (`f=1234:clamp:4` per feature slider in units of the feature's max
activation, `v=preset.2:0.5` per vector slider, gain, seed, temp, max, prompt, baseline), so a copied link
reproduces the mixer. Interventions are built with the library's constructors; generation is
`steer.stream_lanes`, which gives each lane exactly what `generate` would with the same seed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from ..steer import (
    GenerationConfig,
    Lane,
    Preset,
    SteerError,
    VectorEdit,
    ablate,
    add_feature,
    clamp,
    stream_lanes,
)
from ..steer.presets import preset_from_interventions
from .context import cfg_of, float_param, int_param, page, text_param, wb_of
from .guard import Busy

router = APIRouter()
OPS = ("clamp", "add", "ablate")
SLIDER_MAX = 10.0
DEFAULT_PROMPT = "Write a short note about your day."


@dataclass
class Mixer:
    prompt: str = DEFAULT_PROMPT
    features: list = field(default_factory=list)  # (feature, op, value in × max activation)
    vectors: list = field(default_factory=list)  # (slider key, value)
    presets: list = field(default_factory=list)  # (preset name, multiple of its saved values)
    gain: float = 1.0
    seed: int = 16
    temp: float = 0.5
    max_new: int = 48
    baseline: str = ""
    where: str = "all"

    def query(self) -> str:
        q = [("prompt", self.prompt)] + [("f", f"{n}:{op}:{v:g}") for n, op, v in self.features]
        q += [("v", f"{k}:{v:g}") for k, v in self.vectors] + [("p", f"{k}:{v:g}") for k, v in self.presets]
        q += [
            ("gain", f"{self.gain:g}"),
            ("seed", str(self.seed)),
            ("temp", f"{self.temp:g}"),
            ("max", str(self.max_new)),
            ("where", self.where),
        ]
        if self.baseline:
            q.append(("baseline", self.baseline))
        return urlencode(q)


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
    for raw in ps:
        name, _, val = raw.rpartition(":")
        if name not in wb.preset_ivs:
            raise HTTPException(
                422,
                f"preset slider {name!r} is not one of the presets loaded at start "
                f"({', '.join(wb.preset_ivs) or 'none'})",
            )
        m.presets.append((name, float_param(val, f"preset slider {name}", 0, SLIDER_MAX)))
    for raw in fs:
        parts = raw.split(":")
        if len(parts) not in (2, 3) or parts[1] not in OPS:
            raise HTTPException(
                422, f"feature slider {raw!r}: expected FEATURE:OP[:VALUE] with OP one of {', '.join(OPS)}"
            )
        n = int_param(parts[0], f"feature slider {raw!r}: feature", 0, wb.n_features - 1)
        v = float_param(parts[2] if len(parts) == 3 else 0, f"feature slider {raw!r}: value", -SLIDER_MAX, SLIDER_MAX)
        m.features.append((n, parts[1], v))
    for raw in vs:
        key, _, val = raw.rpartition(":")
        if key not in wb.vectors:
            raise HTTPException(
                422,
                f"vector slider {key!r} is not one of the vectors loaded at start ({', '.join(wb.vectors) or 'none'})",
            )
        lo, hi = wb.vectors[key].range
        m.vectors.append((key, float_param(val, f"vector slider {key}", min(lo, -abs(hi)), max(hi, abs(lo)))))
    m.gain = float_param(qp.get("gain", 1), "gain", 0, 10)
    m.seed = int_param(qp.get("seed", 16), "seed", 0, 2**31 - 1)
    m.temp = float_param(qp.get("temp", 0.5), "temp", 0, 2)
    m.max_new = int_param(qp.get("max", cfg.default_new_tokens), "max (new tokens)", 1, cfg.max_new_tokens)
    m.where = qp.get("where", "all")
    if m.where not in ("all", "generated"):
        raise HTTPException(422, f"where must be 'all' or 'generated', got {m.where!r}")
    return m


def interventions(wb, m: Mixer) -> list:
    """Library interventions for the mixer: feature values × max activation × gain, vector values × gain."""
    out = []
    for n, op, v in m.features:
        kw = {"unit": "max", "max_act": float(wb.max_acts[n]), "positions": m.where, "label": wb.label(n)[:60]}
        if op == "ablate":
            out.append(ablate(wb.sae, n, positions=m.where, label=kw["label"]))
        elif v * m.gain != 0 or op == "clamp":
            out.append((clamp if op == "clamp" else add_feature)(wb.sae, n, v * m.gain, **kw))
    for key, v in m.vectors:
        s = wb.vectors[key]
        e = s.edit
        if v == 0 and s.op == "add":
            continue
        out.append(
            VectorEdit(
                e.vector,
                e.site,
                s.op,
                scale=e.scale * v * m.gain if s.op == "add" else 1.0,
                value=v * m.gain if s.op == "clamp_projection" else 0.0,
                positions=e.positions,
                label=s.label,
            )
        )
    for name, v in m.presets:
        if v * m.gain != 0:
            out += [scaled(iv, v * m.gain) for iv in wb.preset_ivs[name]]
    return out


def scaled(iv, k: float):
    """A copy of a library intervention with its strength (clamp target, amount, scale, projection) times k."""
    if isinstance(iv, VectorEdit):
        return VectorEdit(
            iv.vector,
            iv.site,
            iv.op,
            scale=iv.scale * k if iv.op == "add" else 1.0,
            value=iv.value * k,
            positions=iv.positions,
            label=iv.label,
        )
    return type(iv)(
        iv.sae,
        iv.feature,
        iv.op,
        iv.value * k if iv.op != "ablate" else 0.0,
        unit=iv.unit,
        max_act=iv.max_act,
        positions=iv.positions,
        site=iv.site,
        label=iv.label,
    )


def _gen_config(m: Mixer) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=m.max_new, temperature=m.temp, top_p=0.9, seed=m.seed)


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
    sliders = [
        {
            "feature": n,
            "op": op,
            "value": v,
            "label": wb.label(n),
            "max_act": float(wb.max_acts[n]),
            "sweep": wb.sweeps.get(n),
        }
        for n, op, v in m.features
    ]
    values = dict(m.vectors)
    vectors = [
        {"key": k, "label": s.label, "preset": s.preset, "op": s.op, "value": values.get(k, 0.0), "range": s.range}
        for k, s in wb.vectors.items()
    ]
    pvalues = dict(m.presets)
    preset_sliders = [
        {"name": n, "value": pvalues.get(n, 0.0), "n_items": len(ivs), "description": wb.presets[n].description}
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
    )


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


@router.get("/steer/stream")
async def steer_stream(request: Request):
    """One SSE stream: `steered`, `unsteered` and `baseline` events ({text, done}), then `end` (or `error`)."""
    wb, cfg = wb_of(request), cfg_of(request)
    m = parse_mixer(request)
    lanes = _lanes(wb, m, cfg)
    stop = threading.Event()
    it = stream_lanes(wb.lm, m.prompt, lanes, _gen_config(m), should_stop=stop.is_set)  # validates first
    gate = request.app.state.gate
    if gate.full():
        raise HTTPException(
            429,
            f"the model is busy and {gate.waiting} requests are waiting; try again shortly",
            headers={"retry-after": "2"},
        )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    t0 = time.perf_counter()

    def work() -> None:
        try:
            for name, ev in it:
                loop.call_soon_threadsafe(queue.put_nowait, (name, {"text": ev.text, "done": ev.done}))
        except SteerError as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", {"message": str(e)}))
        except Exception as e:  # noqa: BLE001 - reported to the page instead of a broken stream
            loop.call_soon_threadsafe(queue.put_nowait, ("error", {"message": f"{type(e).__name__}: {e}"}))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    async def events():
        counts = {ln.name: 0 for ln in lanes}
        try:
            async with gate.slot():  # held while the answers stream; the worker starts only once it is ours
                worker = loop.run_in_executor(None, work)
                try:
                    yield _sse("start", {"lanes": list(counts), "seed": m.seed, "query": m.query()})
                    async for ev in _relay(request, queue, counts, t0, cfg.deadline_s, stop):
                        yield ev
                finally:
                    stop.set()
                    await worker
        except Busy as e:
            yield _sse("error", {"message": str(e)})

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"cache-control": "no-store", "x-accel-buffering": "no"}
    )


async def _relay(request: Request, queue: asyncio.Queue, counts: dict, t0: float, deadline_s: float, stop):
    """Lane events from the worker until it ends, the deadline passes or the page goes away."""
    deadline = t0 + deadline_s
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            stop.set()
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
            yield _sse("end", {"tokens": counts, "seconds": round(time.perf_counter() - t0, 3)})
            return
        name, data = item
        if name in counts:
            counts[name] += 1
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
    p.description = f"saved from the thoughtscope workbench (gain {m.gain:g} folded into the values)"
    return JSONResponse(p.to_dict(), headers={"content-disposition": f'attachment; filename="{name}.json"'})


def mixer_from_preset(wb, p: Preset, base: Mixer) -> Mixer:
    """Slider state from a preset: feature items of this SAE (any unit, shown × max activation) and its vectors."""
    m = Mixer(prompt=base.prompt, seed=base.seed, temp=base.temp, max_new=base.max_new, baseline=base.baseline)
    for i, it in enumerate(p.items):
        if it.type == "feature":
            if it.feature is None or not 0 <= it.feature < wb.n_features or it.op not in OPS:
                raise HTTPException(
                    422,
                    f"preset {p.name!r}, item {i}: feature {it.feature} with op {it.op!r} cannot "
                    f"be shown on this SAE's sliders (ops: {', '.join(OPS)})",
                )
            v = it.value if it.unit == "max" or it.op == "ablate" else it.value / float(wb.max_acts[it.feature])
            m.features.append((int(it.feature), it.op, max(-SLIDER_MAX, min(SLIDER_MAX, float(v)))))
            m.where = it.positions if it.positions in ("all", "generated") else m.where
        else:
            key = f"{p.name}.{i}"
            if key not in wb.vectors:
                raise HTTPException(
                    422,
                    f"preset {p.name!r}, item {i}: a vector can only come from a preset loaded "
                    f"at start (files are never read from a request)",
                )
            m.vectors.append((key, float(it.value)))
    return m


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
    """A preset JSON in the body: answered with the mixer URL it sets (the page then goes there)."""
    wb = wb_of(request)
    raw = await request.body()
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPException(422, f"preset is not valid JSON ({e})") from None
    p = Preset.from_dict(d, source="uploaded preset")  # SteerError -> 422 with the item at fault
    m = mixer_from_preset(wb, p, Mixer())
    url = f"/steer?{m.query()}"
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(url, status_code=303)
    return {"url": url}

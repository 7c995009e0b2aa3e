"""A soak of the web workbench: the real server (uvicorn on 127.0.0.1) under a fixed mix of page loads, analyzer
requests and generation streams, at a fixed concurrency for a fixed time.

The workbench is a tiny random one built in-process (seconds, nothing downloaded, so a fresh clone runs it), or
with --default the default model, SAE and atlas (`thoughtscope serve`'s own; the first start builds the atlas).
Everything stays on loopback; the request loops are bounded by the time and by --max-requests, every request by
its own timeout; the server stops by itself at the end.

Each of --concurrency clients runs the same cycle of ten requests: four page loads (home, a feature page, a word
search, the equalizer, a stylesheet, a random-feature redirect, in turn), three analyzer requests (the analyzer
page, /api/analyze, a search by text, a comparison, in turn) and three generation streams (three lanes each), one
of which the client closes after its first lane event, as a reader closing the page would.

Figures: requests (answered or failed), errors_5xx, errors (anything else that went wrong: a timeout, a dropped
connection, an unexpected status, a stream without its end event or with an error event), busy_429, p50_ms and
p99_ms over the finished requests (a stream until its end event; cancelled ones left out), rss_growth_mb (this
process's resident memory at the end minus after the warm-up; server and clients share the process),
streams_cancelled (streams the client closed on purpose) and streams_cancelled_cleanly (of those, the ones the
server reports as stopped with their generation thread ended: its "client gone" count from /api/status), and
what was left after the run (generation threads, model jobs). The exit status is 1 when a 5xx was seen or a
generation thread outlived the run.

    python benchmarks/soak.py --quick --json out.json        (30 s of load; under 60 s in all)
    python benchmarks/soak.py --seconds 600 --concurrency 8  (a longer soak; --default for the real model)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.browser import LiveServer  # noqa: E402  (the test suite's live server: uvicorn on a loopback port)

TEXT = "The keeper climbed the stairs of the quiet lighthouse every evening, and a queen's ship passed far out at sea."
OTHER = "In the morning the fog rolled in over the harbour and the gulls cried above the boats."
PROMPTS = ("Tell me about the sea.", "Write a short note about your day.", "What is a lighthouse for?")
CYCLE = ("page", "analyzer", "stream", "page", "analyzer", "page", "stream_cancel", "analyzer", "page", "stream")
REQUEST_TIMEOUT_S = 120.0
WARMUP_FRACTION = 0.2  # RSS growth is measured from the end of the first fifth of the run


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def workbench(default: bool, device: str = "cpu"):
    """(workbench, feature to steer with, stream lengths (whole, cancelled), temporary folder or None), with the
    model and SAE on `device` (load_workbench takes no device: both are moved once loaded)."""
    if default:
        from thoughtscope.server import load_workbench

        print("loading the default model, SAE and atlas (the first start builds the atlas: minutes)", flush=True)
        wb, found = load_workbench(progress=False), (3448, (8, 64), None)
    else:
        import torch
        from helpers.server_fixtures import PLANT, build_tiny

        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and leaves a core to the clients
        root = Path(tempfile.mkdtemp(prefix="thoughtscope-soak-"))
        wb, found = build_tiny(root, nla=False), (PLANT, (12, 200), root)
    wb.lm.model.to(device)
    wb.sae.to(device)
    return (wb, *found)


class Tally:
    def __init__(self):
        self.lat: dict[str, list[float]] = {}
        self.requests = self.errors_5xx = self.errors = self.busy = self.cancelled = 0
        self.first_errors: list[str] = []

    def error(self, what: str, five: bool = False) -> None:
        self.errors_5xx += five
        self.errors += not five
        if len(self.first_errors) < 5:
            self.first_errors.append(what)


def requests_for(wb, feature: int, lengths: tuple[int, int]) -> dict[str, list]:
    """The requests each kind cycles through: (method, path, query or form, expected status)."""
    alive = [int(i) for i in wb.alive.nonzero()[0][:8]] or [0]
    whole, cancel = lengths
    pages = [("GET", "/", None, 200), ("GET", "/search", {"mode": "words", "q": "the"}, 200)]
    pages += [("GET", f"/features/{n}", None, 200) for n in alive[:3]] if wb.atlas is not None else []
    pages += [
        ("GET", "/steer", {"f": f"{feature}:clamp:2"}, 200),
        ("GET", "/static/style.css", None, 200),
        ("GET", "/features/random", None, 303),
    ]
    analyzer = [
        ("POST", "/analyze", {"text": TEXT}, 200),
        ("POST", "/api/analyze", {"text": TEXT, "features": [feature]}, 200),
        ("GET", "/api/search", {"text": OTHER}, 200),
        ("GET", "/compare", {"a": TEXT, "b": OTHER}, 200),
    ]
    streams = [
        {"prompt": p, "f": f"{feature}:clamp:2", "max_new_tokens": whole, "baseline": "Talk about the sea."}
        for p in PROMPTS
    ]
    cancels = [{"prompt": p, "max_new_tokens": cancel} for p in PROMPTS]
    return {"page": pages, "analyzer": analyzer, "stream": streams, "stream_cancel": cancels}


async def _one(c, url: str, kind: str, req, seed: int, t: Tally) -> None:
    t0 = time.perf_counter()
    if kind in ("page", "analyzer"):
        method, path, data, want = req
        if method == "GET":
            r = await c.get(url + path, params=data, headers={"accept": "text/html"})
        elif path.startswith("/api/"):
            r = await c.post(url + path, json=data)
        else:
            r = await c.post(url + path, data=data, headers={"accept": "text/html"})
        await r.aread()
        status, ok = r.status_code, r.status_code == want
    else:
        q = {**req, "seed": seed}
        events: list[str] = []
        left = False
        async with c.stream("GET", f"{url}/steer/stream", params=q) as r:
            status = r.status_code
            if status == 200:
                async for line in r.aiter_lines():
                    if line.startswith("event: "):
                        events.append(line[7:])
                        if kind == "stream_cancel" and events[-1] not in ("start", "end", "error"):
                            left = True  # leave in the middle of the answers, as a closed page does
                            break
            else:
                await r.aread()
        if left:
            t.requests += 1
            t.cancelled += 1
            return
        ok = status == 200 and events[-1:] == ["end"] and "error" not in events
    t.requests += 1
    if status == 429:
        t.busy += 1
    elif status >= 500:
        t.error(f"{kind} {status}", five=True)
    elif not ok:
        t.error(f"{kind}: status {status}" + (f", events {events[-3:]}" if kind.startswith("stream") else ""))
    else:
        t.lat.setdefault(kind, []).append(time.perf_counter() - t0)


async def _client(i: int, url: str, reqs: dict, end: float, budget: list[int], t: Tally) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as c:
        k = 0
        while time.perf_counter() < end and budget[0] > 0:
            budget[0] -= 1
            kind = CYCLE[(i + k) % len(CYCLE)]
            pool = reqs[kind]
            req = pool[(i + k // len(CYCLE)) % len(pool)]
            k += 1
            try:
                await asyncio.wait_for(_one(c, url, kind, req, 1000 * i + k, t), REQUEST_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - every failure is counted and the first few reported
                t.requests += 1
                t.error(f"{kind}: {type(e).__name__}: {e}")


async def _soak(url: str, reqs: dict, seconds: float, conc: int, max_requests: int, t: Tally) -> dict:
    start = time.perf_counter()
    end = start + seconds
    budget = [max_requests]
    rss: dict[str, float] = {}

    async def sample():
        peak = 0.0
        while time.perf_counter() < end:
            peak = max(peak, rss_mb())
            if "warm" not in rss and time.perf_counter() >= start + WARMUP_FRACTION * seconds:
                gc.collect()
                rss["warm"] = rss_mb()
            await asyncio.sleep(0.5)
        rss["peak"] = peak

    await asyncio.gather(sample(), *(_client(i, url, reqs, end, budget, t) for i in range(conc)))
    rss["wall"] = time.perf_counter() - start
    return rss


def _settle(url: str, timeout: float = 30.0) -> dict:
    """/api/status once no model job runs or waits and no generation thread is alive (or after `timeout`)."""
    import httpx

    deadline = time.perf_counter() + timeout
    with httpx.Client(timeout=30) as c:
        while True:
            st = c.get(f"{url}/api/status").json()
            if (st["model_jobs"] == 0 and st["generation_threads"] == 0) or time.perf_counter() > deadline:
                return st
            time.sleep(0.1)


def run(args) -> dict:
    from thoughtscope.server import ServerConfig, create_app

    t_build = time.perf_counter()
    wb, feature, lengths, tmp = workbench(args.default, args.device)
    try:
        build_s = time.perf_counter() - t_build
        reqs = requests_for(wb, feature, lengths)
        cfg = ServerConfig(queue_size=max(8, args.concurrency), max_new_tokens=max(lengths))
        t = Tally()
        with LiveServer(create_app(cfg, wb)) as url:
            assert url.startswith("http://127.0.0.1:"), "the soak only ever targets loopback"
            print(
                f"soak: {wb.lm.name}, {args.concurrency} clients for {args.seconds:g} s against {url} "
                f"(workbench ready in {build_s:.1f} s)",
                flush=True,
            )
            rss = asyncio.run(_soak(url, reqs, args.seconds, args.concurrency, args.max_requests, t))
            st = _settle(url)
            gc.collect()
            rss_end = rss_mb()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    lat = [x for xs in t.lat.values() for x in xs]
    return {
        "model": wb.lm.name,
        "device": args.device,
        "quick": args.quick,
        "seconds": args.seconds,
        "wall_s": round(rss["wall"], 1),
        "concurrency": args.concurrency,
        "workbench_build_s": round(build_s, 1),
        "requests": t.requests,
        "requests_per_s": round(t.requests / rss["wall"], 1),
        "errors_5xx": t.errors_5xx,
        "errors": t.errors,
        "busy_429": t.busy,
        "first_errors": t.first_errors,
        "p50_ms": round(1e3 * pct(lat, 0.5), 1),
        "p99_ms": round(1e3 * pct(lat, 0.99), 1),
        "latency_ms": {
            k: {"n": len(v), "p50": round(1e3 * statistics.median(v), 1), "p99": round(1e3 * pct(v, 0.99), 1)}
            for k, v in sorted(t.lat.items())
        },
        "rss_warm_mb": round(rss.get("warm", rss_end), 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_peak_mb": round(max(rss.get("peak", 0.0), rss_end), 1),
        "rss_growth_mb": round(rss_end - rss.get("warm", rss_end), 1),
        "streams_cancelled": t.cancelled,
        "streams_cancelled_cleanly": min(t.cancelled, st["streams"].get("client gone", 0)),
        "stream_outcomes": st["streams"],
        "generation_threads_left": st["generation_threads"],
        "model_jobs_left": st["model_jobs"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 s of load (under 60 s in all on the tiny workbench)")
    ap.add_argument("--default", action="store_true", help="the default model, SAE and atlas instead of a tiny one")
    ap.add_argument("--seconds", type=float, default=None, help="how long the load runs (default 300, --quick 30)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients sending requests at the same time")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="a cap on requests, whatever the time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="torch device for the model and SAE: cpu (default), cuda, ...")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 30.0 if args.quick else 300.0
    if args.seconds <= 0 or args.concurrency < 1 or args.max_requests < 1:
        ap.error("--seconds, --concurrency and --max-requests must be positive")
    res = run(args)
    print(
        f"{res['requests']} requests in {res['wall_s']} s ({res['requests_per_s']}/s): errors_5xx {res['errors_5xx']}, "
        f"other errors {res['errors']}, 429 {res['busy_429']}; p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms; "
        f"RSS {res['rss_warm_mb']} -> {res['rss_end_mb']} MB (growth {res['rss_growth_mb']} MB); streams cancelled "
        f"{res['streams_cancelled']}, cleanly {res['streams_cancelled_cleanly']}; left: "
        f"{res['generation_threads_left']} generation threads, {res['model_jobs_left']} model jobs"
    )
    for e in res["first_errors"]:
        print(f"  error: {e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    if res["errors_5xx"] or res["generation_threads_left"]:
        raise SystemExit("soak failed: a 5xx answer, or a generation thread outlived the run")


if __name__ == "__main__":
    main()

"""Web workbench overheads on the default model, and a bounded loopback load test.

1. Analyzer: the server-side time of POST /analyze (the HTML page: features, labels, reconstruction error)
   for a 256-token text, measured by an ASGI timer around the app, versus the bare work it needs (tokenize,
   one early-exit forward to the SAE's site, SAE encode). `analyzer_overhead_ratio` = bare / server
   (target >= 0.8). Repeats alternate, medians compared.
2. First token: time from sending GET /steer/stream (three lanes: steered with one feature clamp, unsteered,
   prompt-only baseline) over real loopback HTTP to the first `steered` event, versus plain `generate`'s
   first token (same prompt, seed, settings, the same clamp). `first_token_ratio` = plain / stream (target >= 0.8).
2b. Token panel: the analyzer's causal views for one position (`measure_token_views`): the lens column, feature
   attribution of the next token, and the same checked by ablation, each as a multiple of the analyzer request.
3. Load (--load): N mixed requests (half analyzer pages, half streams), C concurrent, in rounds; errors, p50/p99
   latency and the server process's RSS after each round.
4. First start (not with --tiny; --first-start-only runs just this): `thoughtscope serve` (default model, SAE and
   NLA, no --atlas) launched as a subprocess on a fresh $THOUGHTSCOPE_HOME. Fresh means what `setup.sh` leaves in
   the home and nothing else: the converted default model (`models/`, linked from the real home, see
   `models.cache_dir`), the default corpus (`corpus/default`, linked) and the model hash cache (`hashes.json`,
   copied); no `atlases/`, so the server has to build the first-start atlas (paths.home lays the home out).
   `first_page_seconds`: from launching the process to the first 200 of a useful page, the analyzer page
   (POST /analyze) answering a short text with its features (goal <= 60 s). Then, from /api/status, while the
   atlas is built in the background: `atlas_attached_seconds` (feature pages with contexts work) and
   `atlas_ready_seconds` (its offline explanations written too), each from the launch; these are waited for up to
   --atlas-timeout seconds (default: 0 with --quick, so a quick run stops after the first page, else 1800).
   The machine's load average (1 min) before and after is reported beside them: the build shares the CPUs.

    python benchmarks/web.py --quick --json out.json        (--tiny: a random tiny model instead)
    python benchmarks/web.py --first-start-only --json out.json
    python benchmarks/web.py --token-panel-only --threads 1 --json out.json    (1. and 2b. only)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TEXT_WORDS = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passed far out "
    "at sea, and the keeper wrote their names in a book. def add(a, b): return a + b  # a small function "
    "In the morning the fog rolled in over the harbour and the gulls cried above the fishing boats. "
)


def text_of(lm, n_tokens: int) -> str:
    """A text of exactly n_tokens tokens (BOS included) cut from repeated prose and code."""
    ids = lm.tokenizer(TEXT_WORDS * 20, add_special_tokens=False)["input_ids"][: n_tokens - 1]
    return lm.tokenizer.decode(ids)


def rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Timed:
    """ASGI wrapper: seconds from the request's arrival to the end of its response body, per path."""

    def __init__(self, app):
        self.app, self.times = app, {}

    async def __call__(self, scope, receive, send):
        t0 = time.perf_counter()

        async def timed_send(msg):
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                self.times.setdefault(scope.get("path"), []).append(time.perf_counter() - t0)

        await self.app(scope, receive, timed_send)


class Live:
    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def workbench(tiny: bool, device: str = "cpu"):
    from thoughtscope.server import Workbench

    if tiny:
        from helpers.server_fixtures import build_tiny

        wb = build_tiny(Path(tempfile.mkdtemp()), nla=False)
        wb.lm.model.to(device)
        wb.sae.to(device)
        return wb, 3
    from thoughtscope.atlas import Atlas
    from thoughtscope.models import load_model
    from thoughtscope.sae import load_sae
    from thoughtscope.server.workbench import default_atlas_dir

    lm = load_model("default", device=device)
    sae = load_sae("default", device=device).eval().requires_grad_(False)
    at = default_atlas_dir(sae) / "atlas.sqlite"
    return Workbench(lm=lm, sae=sae, sae_spec="default", atlas=Atlas.open(at) if at.is_file() else None), 3448


def bare_analyzer(wb, text: str) -> float:
    from thoughtscope.models import Site, capture

    sync(wb.lm.device)
    t0 = time.perf_counter()
    ids, mask = wb.lm.tokenize(text)
    site = Site.parse(wb.sae.cfg.site)
    x = capture(wb.lm, [site], ids, mask)[site][0]
    with torch.inference_mode():
        wb.sae.encode(x)
    sync(wb.lm.device)
    return time.perf_counter() - t0


def measure_analyzer(wb, app, timer, reps: int) -> dict:
    from fastapi.testclient import TestClient

    text = text_of(wb.lm, 256)
    bare, server = [], []
    with TestClient(timer, base_url="http://127.0.0.1") as c:
        for i in range(reps + 1):
            b = bare_analyzer(wb, text)
            r = c.post("/analyze", data={"text": text}, headers={"accept": "text/html"})
            assert r.status_code == 200, r.text[:300]
            if i:  # the first round warms both paths up
                bare.append(b)
                server.append(timer.times["/analyze"][-1])
    b, s = statistics.median(bare), statistics.median(server)
    return {
        "analyzer_tokens": len(wb.lm.tokenize(text)[0][0]),
        "analyzer_bare_s": b,
        "analyzer_server_s": s,
        "analyzer_overhead_ratio": b / s,
    }


def measure_token_views(wb, timer, reps: int) -> dict:
    """The analyzer token panel's causal views at the last position of the analyzer's text, each request's server
    time beside the analyzer request's on the same text, alternating, medians, in the order the page offers them
    (the "why" button appears under the lens column): `lens_column_vs_analyzer` (the first click after the
    analyzer: the blocks above the SAE's site run, with the SAE spliced in), `lens_column_next_vs_analyzer` (a
    second click on the same text: only the readouts run), `why_vs_analyzer` (feature attribution of the model's
    next token, first order: one backward pass through that reading), `why_checked_vs_analyzer` (the top 12
    features also ablated in the model). Cold, with nothing held (another text read in between):
    `lens_column_cold_vs_analyzer`, `why_cold_vs_analyzer`. Goal <= 1.5 for the views."""
    from fastapi.testclient import TestClient

    text = text_of(wb.lm, 256)
    pos = len(wb.lm.tokenize(text)[0][0]) - 1
    keys = ("analyzer", "lens", "lens_next", "why", "checked", "lens_cold", "why_cold")
    got: dict[str, list[float]] = {k: [] for k in keys}
    with TestClient(timer, base_url="http://127.0.0.1") as c:

        def get(path: str, key: str | None, **params) -> dict:
            r = c.get(path, params={"text": text, **params})
            assert r.status_code == 200, r.text[:300]
            if key is not None:
                got[key].append(timer.times[path][-1])
            return r.json()

        for i in range(reps + 1):
            r = c.post("/analyze", data={"text": text}, headers={"accept": "text/html"})
            assert r.status_code == 200, r.text[:300]
            warm = i > 0  # the first round warms every path up
            if warm:
                got["analyzer"].append(timer.times["/analyze"][-1])
            target = get("/api/analyze/lens", "lens" if warm else None, pos=pos)["model_top1_id"]
            get("/api/analyze/lens", "lens_next" if warm else None, pos=pos // 2)
            get("/api/analyze/why", "why" if warm else None, pos=pos, target_id=target, check=0)
            get("/api/analyze/why", "checked" if warm else None, pos=pos, target_id=target, check=12)
            wb.residual_cache.clear()
            get("/api/analyze/lens", "lens_cold" if warm else None, pos=pos)
            wb.residual_cache.clear()
            get("/api/analyze/why", "why_cold" if warm else None, pos=pos, target_id=target, check=0)
    med = {k: statistics.median(v) for k, v in got.items()}
    return {
        "token_views_tokens": pos + 1,
        "token_views_analyzer_s": med["analyzer"],
        "lens_column_s": med["lens"],
        "why_s": med["why"],
        "why_checked_s": med["checked"],
        "lens_column_next_s": med["lens_next"],
        "lens_column_vs_analyzer": med["lens"] / med["analyzer"],
        "lens_column_next_vs_analyzer": med["lens_next"] / med["analyzer"],
        "why_vs_analyzer": med["why"] / med["analyzer"],
        "why_checked_vs_analyzer": med["checked"] / med["analyzer"],
        "lens_column_cold_s": med["lens_cold"],
        "why_cold_s": med["why_cold"],
        "lens_column_cold_vs_analyzer": med["lens_cold"] / med["analyzer"],
        "why_cold_vs_analyzer": med["why_cold"] / med["analyzer"],
    }


def measure_first_token(wb, url: str, feature: int, reps: int, n_new: int) -> dict:
    import httpx

    from thoughtscope.steer import GenerationConfig, clamp, generate

    prompt = "Tell me about your favourite place."
    cfg = GenerationConfig(max_new_tokens=n_new, temperature=0.5, top_p=0.9, seed=16)
    ivs = [clamp(wb.sae, feature, 2.0, unit="max")]
    q = {
        "prompt": prompt,
        "f": f"{feature}:clamp:2",
        "seed": 16,
        "temp": 0.5,
        "max_new_tokens": n_new,
        "baseline": "Talk about the sea.",
    }
    plain, streamed = [], []
    with httpx.Client(timeout=120) as c:
        for i in range(reps + 1):
            first: list[float] = []
            start = time.perf_counter()

            def on_token(ev, first=first, start=start):
                if not first:
                    first.append(time.perf_counter() - start)

            generate(wb.lm, [prompt], ivs, cfg, on_token=on_token)
            t0 = time.perf_counter()
            got = None
            with c.stream("GET", f"{url}/steer/stream", params=q) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if got is None and line == "event: steered":
                        got = time.perf_counter() - t0
            if i:
                plain.append(first[0])
                streamed.append(got)
    p, s = statistics.median(plain), statistics.median(streamed)
    return {"first_token_plain_s": p, "first_token_stream_s": s, "first_token_ratio": p / s}


async def _load_round(url: str, n: int, conc: int, text: str, n_new: int) -> tuple[list[float], list[str]]:
    import httpx

    assert url.startswith("http://127.0.0.1:"), "the load test only ever targets loopback"
    sem = asyncio.Semaphore(conc)
    lat, errors = [], []

    async def one(i: int, c):
        async with sem:
            t0 = time.perf_counter()
            try:
                if i % 2:
                    r = await asyncio.wait_for(
                        c.post(f"{url}/analyze", data={"text": text}, headers={"accept": "text/html"}), 120
                    )
                    ok = r.status_code == 200
                else:
                    ok = False
                    async with c.stream(
                        "GET", f"{url}/steer/stream", params={"prompt": "hi", "max_new_tokens": n_new, "seed": i}
                    ) as r:
                        async for line in r.aiter_lines():
                            ok = ok or line == "event: end"
                if not ok:
                    errors.append(f"request {i}: status {r.status_code}")
            except Exception as e:  # noqa: BLE001 - counted, reported
                errors.append(f"request {i}: {type(e).__name__}: {e}")
            lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=120) as c:
        await asyncio.gather(*(one(i, c) for i in range(n)))
    return lat, errors


def load_test(url: str, text: str, n: int, conc: int, rounds: int, n_new: int) -> dict:
    out = {"load_requests_per_round": n, "load_concurrency": conc, "load_rounds": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        lat, errors = asyncio.run(_load_round(url, n, conc, text, n_new))
        lat.sort()
        row = {
            "errors": len(errors),
            "p50_s": lat[len(lat) // 2],
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "wall_s": time.perf_counter() - t0,
            "rss_mb": rss_mb(),
            "first_errors": errors[:3],
        }
        out["load_rounds"].append(row)
        print(
            f"  load round: {n} requests, {conc} concurrent: errors {row['errors']}, p50 {row['p50_s']:.3f} s, "
            f"p99 {row['p99_s']:.3f} s, RSS {row['rss_mb']:.0f} MB"
        )
    return out


FIRST_TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp."


def fresh_home(root: Path) -> Path:
    """A $THOUGHTSCOPE_HOME as `setup.sh` leaves it (see the module docstring): the real home's converted models
    and default corpus linked in, its hash cache copied, no atlas."""
    from thoughtscope.paths import home

    real = home()
    for need in (real / "models", real / "corpus" / "default"):
        if not need.is_dir():
            sys.exit(f"first start: {need} is missing; run setup.sh first (it converts the model, builds the corpus)")
    dst = root / "home"
    (dst / "corpus").mkdir(parents=True)
    (dst / "models").symlink_to(real / "models", target_is_directory=True)
    (dst / "corpus" / "default").symlink_to(real / "corpus" / "default", target_is_directory=True)
    if (real / "hashes.json").is_file():
        shutil.copy2(real / "hashes.json", dst / "hashes.json")
    return dst


def _serve_command(port: int) -> list[str]:
    exe = shutil.which("thoughtscope")
    return [*([exe] if exe else [sys.executable, "-m", "thoughtscope"]), "serve", "--port", str(port)]


def _first_useful_page(c, proc, t0: float, log: Path, timeout: float = 600.0) -> float:
    """Seconds from t0 to the first 200 of the analyzer page with features for FIRST_TEXT."""
    import httpx

    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"thoughtscope serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            r = c.post("/analyze", data={"text": FIRST_TEXT}, headers={"accept": "text/html"})
            if r.status_code == 200 and "/features/" in r.text:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    sys.exit(f"no useful page within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _atlas_times(c, proc, t0: float, timeout: float) -> dict:
    """Seconds from t0 until the atlas is attached and until its explanations are written (None: not within
    `timeout`), and the build's status when the wait ended."""
    out = {"atlas_attached_seconds": None, "atlas_ready_seconds": None}
    atlas = {}
    end = time.perf_counter() + timeout
    while proc.poll() is None:
        atlas = c.get("/api/status").json().get("atlas") or {}
        if atlas.get("attached") and out["atlas_attached_seconds"] is None:
            out["atlas_attached_seconds"] = time.perf_counter() - t0
        if atlas.get("finished") and not atlas.get("error"):
            out["atlas_ready_seconds"] = time.perf_counter() - t0
        if atlas.get("finished") or time.perf_counter() >= end:
            break
        time.sleep(1.0)
    out["atlas_status_at_end"] = atlas
    return out


def measure_first_start(atlas_timeout: float) -> dict:
    """`thoughtscope serve` on a fresh home: first_page_seconds, atlas_attached_seconds, atlas_ready_seconds."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="thoughtscope-fresh-") as tmp:
        env = {**os.environ, "THOUGHTSCOPE_HOME": str(fresh_home(Path(tmp)))}
        log = Path(tmp) / "serve.log"
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(_serve_command(port), env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                res = {"first_page_seconds": _first_useful_page(c, proc, t0, log)}
                res["atlas_at_first_page"] = c.get("/api/status").json().get("atlas")
                print(f"first start: first useful page after {res['first_page_seconds']:.1f} s", flush=True)
                res.update(_atlas_times(c, proc, t0, atlas_timeout))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    res |= {"first_start_loadavg_1min_before": load_before, "first_start_loadavg_1min_after": os.getloadavg()[0]}
    res["first_start_cpus"] = os.cpu_count()
    return res


def report_first_start(res: dict) -> None:
    def s(k):
        return "not within the wait" if res.get(k) is None else f"{res[k]:.1f} s"

    print(
        f"first start (fresh home): first useful page {s('first_page_seconds')} (goal <= 60 s), atlas attached "
        f"{s('atlas_attached_seconds')}, atlas and explanations ready {s('atlas_ready_seconds')}; load average "
        f"{res['first_start_loadavg_1min_before']:.2f} -> {res['first_start_loadavg_1min_after']:.2f} on "
        f"{res['first_start_cpus']} CPUs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a random tiny model (no embedded weights needed)")
    ap.add_argument("--load", action="store_true", help="also run the load test")
    ap.add_argument("--load-requests", type=int, default=200)
    ap.add_argument("--load-concurrency", type=int, default=8)
    ap.add_argument("--load-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--first-start-only", action="store_true", help="only the first-start measure (4.)")
    ap.add_argument("--skip-first-start", action="store_true", help="leave the first-start measure (4.) out")
    ap.add_argument("--token-panel-only", action="store_true", help="only the analyzer (1.) and the token panel (2b.)")
    ap.add_argument(
        "--atlas-timeout", type=float, default=None, help="seconds to wait for the first-start atlas (see 4.)"
    )
    add_device_arg(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    first_start = not args.tiny and not args.skip_first_start
    atlas_timeout = args.atlas_timeout if args.atlas_timeout is not None else (0.0 if args.quick else 1800.0)
    if args.first_start_only:
        res = {"quick": args.quick, **measure_first_start(atlas_timeout)}
        report_first_start(res)
        return write_json(res, args.json)
    from thoughtscope.server import ServerConfig, create_app

    wb, feature = workbench(args.tiny, args.device)
    app = create_app(ServerConfig(queue_size=max(8, args.load_concurrency)), wb)
    timer = Timed(app)
    reps = 3 if args.quick else 9
    res = {"model": wb.lm.name, "quick": args.quick, "threads": torch.get_num_threads(), "atlas": wb.atlas is not None}
    res |= device_info(args.device)
    res.update(measure_analyzer(wb, app, timer, reps))
    print(
        f"analyzer, {res['analyzer_tokens']} tokens: bare {res['analyzer_bare_s'] * 1e3:.0f} ms, server "
        f"{res['analyzer_server_s'] * 1e3:.0f} ms, analyzer_overhead_ratio {res['analyzer_overhead_ratio']:.3f}"
    )
    res.update(measure_token_views(wb, timer, reps))
    print(
        f"token panel, {res['token_views_tokens']} tokens: lens column {res['lens_column_vs_analyzer']:.2f}x "
        f"(next click {res['lens_column_next_vs_analyzer']:.2f}x), why "
        f"{res['why_vs_analyzer']:.2f}x, why checked {res['why_checked_vs_analyzer']:.2f}x the analyzer request; "
        f"cold (nothing held): lens {res['lens_column_cold_vs_analyzer']:.2f}x, why {res['why_cold_vs_analyzer']:.2f}x"
    )
    if args.token_panel_only:
        return write_json(res, args.json)
    with Live(timer) as url:
        res.update(measure_first_token(wb, url, feature, reps, 8 if args.quick else 24))
        print(
            f"first token: plain generate {res['first_token_plain_s'] * 1e3:.0f} ms, stream "
            f"{res['first_token_stream_s'] * 1e3:.0f} ms, first_token_ratio {res['first_token_ratio']:.3f}"
        )
        if args.load:
            res.update(
                load_test(url, text_of(wb.lm, 64), args.load_requests, args.load_concurrency, args.load_rounds, 8)
            )
    if first_start:
        res.update(measure_first_start(atlas_timeout))
        report_first_start(res)
    write_json(res, args.json)


def write_json(res: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""SAE training race: thoughtscope vs SAELens (and EleutherAI's sparsify for TopK) on the same rows, same rules.

Data: the default model's residual stream (resid.15) harvested by thoughtscope itself into a store cached under
the thoughtscope home (built on first use; see _data.py), with the product's exclusion rule (position 0 and tokens
above 10x the median norm), cut at document boundaries into train / validation / test.

Race (per architecture): for every learning-rate multiplier of the shared grid, all contenders train in one process,
taking turns batch by batch on the same batch sequence (lr = multiplier x each tool's documented default). Each
contender's winner is the grid point with the lowest validation FVU; every reported quality figure is on the test
documents. A winner whose test FVU is >= 1 or whose dead share is >= 50 % stops the benchmark (sanity rule).

Figures (topk): ``speed_ratio_vs_saelens`` (steady-state tokens/s), ``fvu_ratio_vs_saelens`` (test FVU at equal
tokens), ``time_to_peer_fvu_ratio`` (compute seconds thoughtscope needs to reach the peer's final test FVU over the
peer's whole run; below 1 = faster to the same quality), FVU of each side at equal compute time, and
``ceiling_fraction`` (achieved FLOP/s of a thoughtscope step over the machine's matmul FLOP/s, measured in the same
run). relu-l1: the same, with thoughtscope's FVU taken at SAELens' L0 (_matched_l0.py). Every winner also gets
``loss_recovered_vs_mean``: its reconstruction spliced into the model on held-out text after the store's (the same
tokens for all; ``--loss-tokens``), the figure FVU can hide.

    python benchmarks/sae_train.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars would interleave

import _ceiling
import torch
from _contenders import CONTENDERS
from _data import ShuffledBatches, race_data
from _matched_l0 import match_l0
from _race import Curve, check_sane, eval_steps, evaluate, run_turns, spliced_recovery

from thoughtscope._io import atomic_write_json


class _Solo:
    """A stand-in for the Baton when thoughtscope is retrained alone (untimed matched-L0 runs)."""

    @staticmethod
    def feed(name, batches, evaluate_at=None):
        return iter(batches)


def sizes(args) -> dict:
    quick = {
        "store_tokens": 131_072,
        "n_features": 2304,
        "batch_size": 2048,
        "steps": 16,
        "grid": "1,4,16",
        "relu_grid": "6,24",
        "eval_points": 3,
        "curve_rows": 4096,
        "match_runs": 2,
        "ttq_mult": 2,
        "loss_tokens": 2048,
    }
    full = {
        "store_tokens": 131_072,
        "n_features": 9216,
        "batch_size": 4096,
        "steps": 24,
        "grid": "1,4,16",
        "relu_grid": "6,24",
        "eval_points": 5,
        "curve_rows": 4096,
        "match_runs": 3,
        "ttq_mult": 3,
        "loss_tokens": 8192,
    }
    base = quick if args.quick else full
    return {key: (getattr(args, key) if getattr(args, key, None) is not None else v) for key, v in base.items()}


def available(names: list[str], arch: str) -> tuple[list[str], dict]:
    """Contenders that can run here (sparsify: TopK only, and only when installed); why the others cannot."""
    out, skipped = [], {}
    for n in names:
        if n == "sparsify" and arch != "topk":
            continue
        try:
            __import__({"saelens": "sae_lens", "sparsify": "sparsify"}.get(n, "thoughtscope"))
        except ImportError as e:
            skipped[n] = f"not installed ({e}); pip install -e '.[bench]' and eai-sparsify"
            continue
        out.append(n)
    return out, skipped


def warm_up(arch: str, names: list[str], d: int) -> None:
    """One tiny untimed fit per contender, so imports and first-call set-up are not charged to the race."""
    x = torch.randn(4 * 256, d)
    tiny = [x[i * 256 : (i + 1) * 256] for i in range(4)]
    for name in names:
        extra = {"first_batch": tiny[0], "mean_norm": float(x.norm(dim=1).mean())} if name == "saelens" else {}
        c = CONTENDERS[name](arch, d, 64, k=4, l1=5.0, batch_size=256, n_steps=4, **extra)
        c.fit(_Solo.feed(name, tiny), c.default_lr())
        evaluate(c.current(), x[:256])


def race_once(arch, names, mult, rows, batches, sz, d, args, ceilings) -> dict:
    """One grid point: every contender at lr = mult x its default, taking turns; curves on the test rows."""
    n, B, m = len(batches), sz["batch_size"], sz["n_features"]
    mean_norm = float(rows.train[:65536].norm(dim=1).mean())
    made = {}
    for name in names:
        extra = {"first_batch": batches[0], "mean_norm": mean_norm} if name == "saelens" else {}
        made[name] = CONTENDERS[name](arch, d, m, k=args.k, l1=args.l1, batch_size=B, n_steps=n, **extra)
    curve_x = rows.test[: sz["curve_rows"]]
    at = eval_steps(n, sz["eval_points"] * max(1, round(n / sz["steps"])))
    curves = {name: Curve() for name in names}

    def job(name):
        c = made[name]
        lr = mult * c.default_lr()

        def fn(baton):
            def evaluate_at(i):
                if i in at:  # the contender's clock is stopped meanwhile
                    curves[name].add(i, baton.busy[name], evaluate(c.current(), curve_x)["fvu"])

            c.fit(baton.feed(name, batches, evaluate_at), lr)
            return lr

        return fn

    W_gemm = torch.randn(m, d)

    def matmul_job(baton):
        """The machine's ceiling, taking turns with the contenders: the encoder GEMM alone on the same batches."""
        for xb in baton.feed("matmul", batches):
            torch.nn.functional.linear(xb, W_gemm)

    lrs, baton = run_turns({**{name: job(name) for name in names}, "matmul": matmul_job})
    gemm = baton.segments["matmul"][1:n]
    gflops = 2 * B * d * m / statistics.median(gemm) / 1e9
    ceilings.append(gflops)
    out = {}
    for name, c in made.items():  # (the "matmul" turn-taker is not a contender)
        fn = c.current()
        seg = baton.segments[name]
        steady = seg[max(1, len(seg) // 4) : n - 1] or seg  # skip set-up / warm-up steps and the end-of-fit segment
        curves[name].add(n, baton.busy[name], evaluate(fn, curve_x)["fvu"])
        out[name] = {
            "lr": lrs[name],
            "lr_multiplier": mult,
            "val": evaluate(fn, rows.val),
            "test": evaluate(fn, rows.test),
            "tokens_per_s": B / statistics.median(steady),
            "seconds": baton.busy[name],
            "tokens_per_s_whole_run": n * B / baton.busy[name],
            "curve": curves[name].as_dict(),
            "gemm_gflops": gflops,
            "settings": c.settings(),
            "_contender": c,
        }
        print(
            f"  lr x{mult:g} {name:12s} lr {lrs[name]:.3g}: val FVU {out[name]['val']['fvu']:.4f}  test FVU "
            f"{out[name]['test']['fvu']:.4f}  L0 {out[name]['test']['l0']:.1f}  "
            f"dead {out[name]['test']['dead_frac']:.1%}"
            f"  {out[name]['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )
    return out


def summarise_topk(win: dict, long: dict | None, names: list[str], d, m, k, B, gflops: float) -> dict:
    """Ratios against each peer. Time to quality uses thoughtscope's longer run (``long``) when there is one; its
    seconds and the peer's are compared in units of the GEMM time measured in each one's own race (seconds x
    GFLOP/s of that race), so a change of load between the two races does not tilt the ratio."""
    ours = win["thoughtscope"]
    src = long or ours
    ours_curve = Curve(**src["curve"])
    g_ours = src["gemm_gflops"]
    row = {}
    for peer in [n for n in names if n != "thoughtscope"]:
        p = win[peer]
        p_curve = Curve(**p["curve"])
        target = p_curve.fvu[-1]
        peer_work = p["seconds"] * p["gemm_gflops"]  # GFLOP of encoder GEMMs the peer's time was worth
        t_ours = ours_curve.seconds_to_reach(target)
        t_equal = peer_work / g_ours  # the peer's whole run, in thoughtscope's race seconds
        row[peer] = {
            "speed_ratio": ours["tokens_per_s"] / p["tokens_per_s"],
            "fvu_ratio_equal_tokens": ours["test"]["fvu"] / p["test"]["fvu"],
            "time_to_peer_fvu_ratio": (t_ours * g_ours / peer_work) if t_ours is not None else None,
            "peer_final_fvu_curve_rows": target,
            "fvu_at_equal_wallclock": {
                "thoughtscope": ours_curve.fvu_at_seconds(t_equal),
                peer: target,
                "at_peer_seconds": p["seconds"],
                # thoughtscope's run may end before the peer's time: its final FVU is used
                "thoughtscope_run_ended_sooner": ours_curve.seconds[-1] < t_equal,
            },
            "fvu_at_equal_tokens": {"thoughtscope": ours["test"]["fvu"], peer: p["test"]["fvu"]},
        }
    flops = _ceiling.topk_flops_per_token(d, m, k, B)
    achieved = flops["total"] * ours["tokens_per_s"] / 1e9
    out = {
        "flop_per_token": flops,
        "achieved_gflops": achieved,
        "matmul_gflops": ours["gemm_gflops"],
        "ceiling_fraction": achieved / ours["gemm_gflops"],
        "vs": row,
        "time_to_quality_run": None
        if long is None
        else {
            "steps": long["curve"]["steps"][-1],
            "lr": long["lr"],
            "curve": long["curve"],
            "test": long["test"],
            "seconds": long["seconds"],
            "gemm_gflops": long["gemm_gflops"],
        },
    }
    if "saelens" in row:
        s = row["saelens"]
        out.update(
            speed_ratio_vs_saelens=s["speed_ratio"],
            fvu_ratio_vs_saelens=s["fvu_ratio_equal_tokens"],
            time_to_peer_fvu_ratio=s["time_to_peer_fvu_ratio"],
        )
    if "sparsify" in row:
        out.update(
            speed_ratio_vs_sparsify=row["sparsify"]["speed_ratio"],
            fvu_ratio_vs_sparsify=row["sparsify"]["fvu_ratio_equal_tokens"],
            time_to_sparsify_fvu_ratio=row["sparsify"]["time_to_peer_fvu_ratio"],
        )
    return out


def matched_l0(win, rows, batches, sz, d, args) -> dict:
    """relu-l1: thoughtscope's test FVU at SAELens' test L0 (retrained untimed at other lambdas, same lr)."""
    ours, peer = win["thoughtscope"], win["saelens"]

    def train_at(l1):
        c = CONTENDERS["thoughtscope"](
            "relu-l1", d, sz["n_features"], l1=l1, batch_size=sz["batch_size"], n_steps=sz["steps"]
        )
        c.fit(_Solo.feed("thoughtscope", batches), ours["lr"])
        return {"l1": l1, **evaluate(c.current(), rows.test)}

    first = {"l1": args.l1, **ours["test"]}
    points, at = match_l0(train_at, first, peer["test"]["l0"], sz["match_runs"], 0.1)
    return {
        "target_l0": peer["test"]["l0"],
        "points": sorted(points, key=lambda p: p["l1"]),
        **at,
        "fvu_ratio_vs_saelens": at["fvu"] / peer["test"]["fvu"],
    }


_LM = {}


def add_loss_recovered(win: dict, store, n_tokens: int) -> None:
    """Each winner's ``loss_recovered_vs_mean`` and spliced figures, on the same held-out tokens (model loaded once)."""
    if n_tokens <= 0:
        return
    from thoughtscope.models import load_recorded

    if "lm" not in _LM:
        _LM["lm"] = load_recorded((store.manifest.get("extra") or {}).get("model_source") or store.model)
    t0 = time.perf_counter()
    fns = {n: w["_contender"].current() for n, w in win.items()}
    rec = spliced_recovery(fns, store, lm=_LM["lm"], n_tokens=n_tokens)
    for n, r in rec.items():
        win[n]["loss_recovered_vs_mean"] = r["loss_recovered_vs_mean"]
        win[n]["spliced"] = r
    print(
        f"  loss recovered vs mean ablation ({rec[next(iter(rec))]['n_tokens']:.0f} held-out tokens, "
        f"{time.perf_counter() - t0:.0f} s): "
        + "  ".join(f"{n} {r['loss_recovered_vs_mean']:.3f}" for n, r in rec.items()),
        flush=True,
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (about 3 minutes on 2 cores, data cached)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--archs", default="topk,relu-l1")
    p.add_argument("--contenders", default="thoughtscope,saelens,sparsify")
    p.add_argument("--store-tokens", dest="store_tokens", type=int, help="tokens harvested into the cached store")
    p.add_argument("--n-features", dest="n_features", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--steps", type=int, help="training steps of every contender (same batches)")
    p.add_argument("--grid", help="topk: learning-rate multipliers of each tool's documented default, e.g. 1,4")
    p.add_argument(
        "--relu-grid",
        dest="relu_grid",
        help="relu-l1: the same for both tools' documented 5e-5 (tuned for ~30k steps, so higher here)",
    )
    p.add_argument("--eval-points", dest="eval_points", type=int, help="test-FVU samples along each run")
    p.add_argument("--curve-rows", dest="curve_rows", type=int, help="test rows used for the curves")
    p.add_argument("--match-runs", dest="match_runs", type=int, help="relu-l1: extra untimed runs to match L0")
    p.add_argument(
        "--ttq-mult",
        dest="ttq_mult",
        type=int,
        help="topk: thoughtscope's time-to-quality run is this many times the race's steps (1 = none)",
    )
    p.add_argument(
        "--loss-tokens",
        dest="loss_tokens",
        type=int,
        help="held-out tokens of the spliced loss (loss_recovered_vs_mean of each winner; 0: skip)",
    )
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=5.0, help="relu-l1 lambda (both tools' documented default 5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sz = sizes(args)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    store, rows, batches = race_data(sz["store_tokens"], sz["batch_size"], sz["steps"], seed=args.seed)
    d = rows.train.shape[1]
    grids = {
        "topk": [float(x) for x in sz["grid"].split(",")],
        "relu-l1": [float(x) for x in sz["relu_grid"].split(",")],
    }
    print(
        f"data: {rows.info['store']}: {rows.info['kept_rows']:,} rows kept of {rows.info['store_tokens']:,} "
        f"(train {rows.info['train_rows']:,} / val {rows.info['val_rows']:,} / test {rows.info['test_rows']:,}); "
        f"d={d} m={sz['n_features']} batch {sz['batch_size']} x {sz['steps']} steps = {batches.epochs:.2f} epochs; "
        f"lr grids {grids}; threads {torch.get_num_threads()}",
        flush=True,
    )
    figures: dict = {
        "quick": args.quick,
        "data": rows.info,
        "sizes": sz,
        "epochs": batches.epochs,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "lr_grid": {
            "multipliers_of_each_tools_default": grids,
            "chosen_by": "lowest validation FVU; reported figures on test documents",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "note": "timings alternate contenders batch by batch in one "
            "process, so load from other processes falls on all alike",
        },
    }
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        names, skipped = available([n.strip() for n in args.contenders.split(",")], arch)
        if "thoughtscope" not in names:
            raise SystemExit("thoughtscope must be one of the contenders")
        print(f"\n{arch}: contenders {', '.join(names)}", flush=True)
        ceilings: list[float] = []
        warm_up(arch, names, d)
        grid = grids[arch]
        runs = {mult: race_once(arch, names, mult, rows, batches, sz, d, args, ceilings) for mult in grid}
        win = {n: min((runs[mlt][n] for mlt in grid), key=lambda r: r["val"]["fvu"]) for n in names}
        for n in names:
            check_sane(n, win[n]["test"])
        add_loss_recovered(win, store, sz["loss_tokens"])
        gflops = statistics.median(ceilings)
        key = arch.replace("-", "_")
        row = {
            "contenders": {n: {k_: v for k_, v in w.items() if k_ != "_contender"} for n, w in win.items()},
            "grid_runs": {
                n: [
                    {
                        "lr": runs[mlt][n]["lr"],
                        "val_fvu": runs[mlt][n]["val"]["fvu"],
                        "test_fvu": runs[mlt][n]["test"]["fvu"],
                        "test_l0": runs[mlt][n]["test"]["l0"],
                    }
                    for mlt in grid
                ]
                for n in names
            },
            "skipped": skipped,
            "steps": sz["steps"],
            "train_tokens": sz["steps"] * sz["batch_size"],
            "lr_multipliers": grid,
            "matmul_gflops_samples": ceilings,
            "matmul_gflops_method": "the encoder GEMM [batch, d] x [d, m] alone, taking turns with the "
            "contenders on the same batches (median step)",
        }
        if arch == "topk":
            long = None
            if sz["ttq_mult"] > 1 and len(names) > 1:  # thoughtscope alone, longer, at its winning lr
                mult = win["thoughtscope"]["lr_multiplier"]
                print(
                    f"  time to quality: thoughtscope alone for {sz['ttq_mult']}x the steps at lr x{mult:g}", flush=True
                )
                long_batches = ShuffledBatches(
                    rows.train, sz["batch_size"], sz["steps"] * sz["ttq_mult"], seed=args.seed
                )
                long = race_once(arch, ["thoughtscope"], mult, rows, long_batches, sz, d, args, [])["thoughtscope"]
                long.pop("_contender", None)
            row.update(summarise_topk(win, long, names, d, sz["n_features"], args.k, sz["batch_size"], gflops))
        else:
            l0 = win["thoughtscope"]["test"]["l0"]
            flops = _ceiling.relu_flops_per_token(d, sz["n_features"], l0, sz["batch_size"])
            achieved = flops["total"] * win["thoughtscope"]["tokens_per_s"] / 1e9
            row.update(
                flop_per_token=flops, achieved_gflops=achieved, matmul_gflops=gflops, ceiling_fraction=achieved / gflops
            )
            if "saelens" in win:
                row["speed_ratio_vs_saelens"] = win["thoughtscope"]["tokens_per_s"] / win["saelens"]["tokens_per_s"]
                row["matched_l0"] = matched_l0(win, rows, batches, sz, d, args)
                row["fvu_ratio_vs_saelens"] = row["matched_l0"]["fvu_ratio_vs_saelens"]
        figures[key] = row
        _print_summary(arch, row)
    figures["wall_seconds"] = time.perf_counter() - t_start
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, figures, default=_jsonable)
    return figures


def _jsonable(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _print_summary(arch: str, row: dict) -> None:
    print(
        f"{arch}: winners (test) "
        + "; ".join(
            f"{n} lr {c['lr']:.3g} FVU {c['test']['fvu']:.4f} "
            f"recovered vs mean {c.get('loss_recovered_vs_mean', float('nan')):.3f} L0 {c['test']['l0']:.1f} "
            f"dead {c['test']['dead_frac']:.1%} {c['tokens_per_s']:,.0f} tok/s"
            for n, c in row["contenders"].items()
        )
    )
    keys = (
        "speed_ratio_vs_saelens",
        "fvu_ratio_vs_saelens",
        "time_to_peer_fvu_ratio",
        "speed_ratio_vs_sparsify",
        "fvu_ratio_vs_sparsify",
        "time_to_sparsify_fvu_ratio",
        "ceiling_fraction",
        "matmul_gflops",
    )
    print(
        "  "
        + "  ".join(
            f"{k}={row[k]:.3f}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in keys if k in row
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
    sys.exit(0)

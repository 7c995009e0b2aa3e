"""SAE training speed and quality: thoughtscope vs SAELens on the same cached activations, one process.

For each architecture (topk k=32, relu-l1) both trainers see the same in-memory, shuffled batches of the
default model's residual stream (store ``--store``, position 0 = attention sink excluded for both) and
train a dictionary of ``--n-features`` latents with batch ``--batch-size``. Each trainer runs its own
unmodified ``fit()``; the two runs are interleaved step by step (a baton handed over inside the data
iterators, one trainer computing at a time), so load from other processes on a shared machine falls on
both alike. The baton is handed over once per batch, so each trainer's time is recorded per step.

What is timed: the headline tokens/s (and ``speed_ratio_vs_saelens``) is steady-state throughput over a
window of the last ``--timed-steps`` steps before the final one (both trainers past set-up and past
thoughtscope's lambda / LR warm-up); earlier steps are a warm-up that is trained but not timed. The
whole-run figure (set-up inside fit, every step, logging and weight folding at the end) is reported too
(``*_whole_run``).

Quality is measured on held-out tokens (the last shard of the store, never trained on): FVU with the
held-out mean, mean L0, and the dead fraction (latents that never fire on the held-out set).

Same-setup choices (everything else is each tool's default for the architecture):
  * both get inputs scaled so the mean norm is sqrt(d_model) (SAELens: ``expected_average_only_in`` with
    the scale set to ours, so it does not spend 1000 batches estimating it), folded back after training;
  * SAELens' dead-latent window (in steps) is set to our dead-token rule for the run length, otherwise
    its 1000-step default means AuxK never runs in a short benchmark;
  * relu-l1: SAELens trains at its lambda (``--l1-saelens``), thoughtscope at ``--l1-ours`` in the timed run;
    both use the same lr. thoughtscope starts sparse (``--init-density-ours``: encoder bias set so each latent
    fires on that share of the first batch); SAELens keeps its own init.

relu-l1 quality at matched L0: one lambda gives a different L0 for each tool, and FVU falls as L0 rises, so
FVUs at unequal L0 do not compare. After the timed run, thoughtscope is retrained (untimed, same batches, same
settings) at further lambdas chosen by a secant search in (log lambda, log L0) until SAELens' held-out L0 is
bracketed and the nearest point is within ``--l0-tol`` of it (at most ``--match-runs`` extra runs). Our FVU at
SAELens' L0 is then interpolated linearly in log L0 between the two bracketing points; ``fvu_ratio_vs_saelens``
is that FVU over SAELens' FVU. Every point (lambda, L0, FVU, dead) is printed and stored, and the raw ratio of
the timed run is kept as ``fvu_ratio_vs_saelens_timed_run``. If no bracket is found the nearest point is used
and ``matched_l0.bracketed`` is false.

    python benchmarks/sae_train.py --quick --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens' progress bar would interleave with ours

from thoughtscope.sae import SAEConfig, TrainConfig, Trainer  # noqa: E402
from thoughtscope.sae.architectures import DEFAULT_DEAD_TOKENS  # noqa: E402
from thoughtscope.store import ActivationStore  # noqa: E402

DEFAULT_STORE = "/work/data/acts-resid15"
L1_SAELENS_DEFAULT = 20.0  # SAELens' held-out L0 ~150 in the quick run (5.0 leaves it at ~1000)
# thoughtscope's timed-run lambda: its L0 lands near SAELens' at lambda 20 (the matched-L0 search corrects the rest)
L1_OURS_QUICK = 5.5
L1_OURS_FULL = 5.5


# ----------------------------------------------------------------------------- data
def load_tokens(store_path: str, n_train: int, n_eval: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train rows (shuffled) from the first shards, held-out rows from the last shard; position 0 dropped."""
    st = ActivationStore.open(store_path)
    n_sh = st.n_shards
    if n_sh == 0:
        raise SystemExit(f"store {store_path} has no committed shards yet")

    def rows(i: int) -> torch.Tensor:
        acts, meta = st.shard(i)
        return acts[meta["position"] != 0].float()

    if n_sh >= 2:
        ev = rows(n_sh - 1)[:n_eval]
        train = torch.cat([rows(i) for i in range(n_sh - 1)])
    else:  # a store still being written: hold out the tail of its only shard (later contexts, other documents)
        only = rows(0)
        if len(only) < 2 * n_eval:
            raise SystemExit(f"store {store_path} has {len(only)} usable rows; need at least {2 * n_eval}")
        ev, train = only[-n_eval:], only[:-n_eval]
    g = torch.Generator().manual_seed(seed)
    train = train[torch.randperm(len(train), generator=g)]
    info = {"store": str(store_path), "store_tokens": st.n_tokens, "store_complete": bool(st.manifest.get("complete")),
            "train_rows_available": len(train), "eval_tokens": len(ev), "model": st.model, "site": st.site,
            "d_model": st.d_model}
    return train, ev, info


def batch_list(train: torch.Tensor, n_steps: int, batch: int) -> list[torch.Tensor]:
    """n_steps batches; cycles over the rows (reported as epochs) when the store is smaller than the run."""
    out, pos = [], 0
    for _ in range(n_steps):
        if pos + batch > len(train):
            pos = 0
        out.append(train[pos:pos + batch].contiguous())
        pos += batch
    return out


# ----------------------------------------------------------------------------- interleaving
class Baton:
    """Lets exactly one trainer compute at a time, in turn, and adds up each one's time holding it."""

    def __init__(self, names: list[str]):
        self.names = names
        self.cv = threading.Condition()
        self.turn = 0
        self.done: set[str] = set()
        self.busy = {n: 0.0 for n in names}
        self.segments: dict[str, list[float]] = {n: [] for n in names}  # seconds per baton hold (~ per step)
        self._t = 0.0

    def _advance(self) -> None:
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.done:
                return

    def acquire(self, name: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.names[self.turn] == name)
            self._t = time.perf_counter()

    def release(self, name: str, finished: bool = False) -> None:
        with self.cv:
            dt = time.perf_counter() - self._t
            self.busy[name] += dt
            self.segments[name].append(dt)
            if finished:
                self.done.add(name)
            if len(self.done) < len(self.names):
                self._advance()
            self.cv.notify_all()

    def feed(self, name: str, batches: list[torch.Tensor]):
        """Data iterator for one trainer: hands the baton over before every batch after the first."""
        for i, b in enumerate(batches):
            if i:
                self.release(name)
                self.acquire(name)
            yield b


class _Solo:
    """A stand-in for Baton when one trainer runs alone (untimed extra runs)."""

    @staticmethod
    def feed(name: str, batches: list[torch.Tensor]):
        return iter(batches)


def run_interleaved(jobs: dict) -> tuple[dict, dict]:
    """jobs: name -> callable(feed_iter) returning a result. Runs them in threads, turn by turn."""
    baton = Baton(list(jobs))
    results, errors = {}, {}

    def worker(name, fn):
        baton.acquire(name)
        try:
            results[name] = fn(baton)
        except BaseException as e:  # noqa: BLE001 - reported, the other trainer must still finish
            errors[name] = e
        finally:
            baton.release(name, finished=True)

    threads = [threading.Thread(target=worker, args=(n, f), daemon=True) for n, f in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, e in errors.items():
        raise RuntimeError(f"{n} failed: {type(e).__name__}: {e}") from e
    return results, baton


# ----------------------------------------------------------------------------- trainers
def ours_job(arch: str, d: int, m: int, k: int, l1: float, batches: list[torch.Tensor], lr: float | None,
             init_density: float | None = None):
    extra = {"init_density": init_density} if arch == "relu-l1" else {}
    cfg = SAEConfig(arch=arch, d_model=d, n_features=m, k=k, l1_coeff=l1, **extra)
    tc = TrainConfig(batch_size=batches[0].shape[0], steps=len(batches), lr=lr, progress=False, checkpoint_every=0)

    def fn(baton: Baton):
        return Trainer([cfg], tc).fit(baton.feed("ours", batches))[0]
    return fn


def saelens_job(arch: str, d: int, m: int, k: int, l1: float, batches: list[torch.Tensor], scale: float,
                dead_steps: int, lr: float | None):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    B = batches[0].shape[0]
    if arch == "topk":
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, normalize_activations="expected_average_only_in"))
    else:
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=m, l1_coefficient=l1,
                                                            normalize_activations="expected_average_only_in"))
    lr = SAETrainerConfig.lr if lr is None else lr
    # lr_end: the runner config's default (lr / 10; used only by cosine schedules) which its post-init fills in
    tcfg = SAETrainerConfig(total_training_samples=B * len(batches), train_batch_size_samples=B,
                            dead_feature_window=dead_steps, lr=lr, lr_end=lr / 10)

    def fn(baton: Baton):
        tr = SAETrainer(cfg=tcfg, sae=sae, data_provider=baton.feed("saelens", batches))
        tr.activation_scaler.scaling_factor = scale
        return tr.fit()
    return fn


# ----------------------------------------------------------------------------- metrics
@torch.no_grad()
def held_out(encode, decode, ev: torch.Tensor, chunk: int = 4096) -> dict:
    """FVU (held-out mean), mean L0 and the share of latents that never fire, for any encode/decode pair."""
    sse, l0, fired = 0.0, 0.0, None
    for i in range(0, len(ev), chunk):
        x = ev[i:i + chunk]
        f = encode(x)
        f = f.to_dense() if f.is_sparse else f
        xh = decode(f)
        sse += float((x - xh).double().pow(2).sum())
        act = f > 0
        l0 += float(act.sum())
        fired = act.any(0) if fired is None else fired | act.any(0)
    var = float((ev.double() - ev.double().mean(0)).pow(2).sum())
    return {"fvu": sse / var, "l0": l0 / len(ev), "dead_frac": float((~fired).float().mean())}


# ----------------------------------------------------------------------------- matched L0 (relu-l1)
def _log_ratio(l0: float, target: float) -> float:
    return math.log(max(l0, 1e-9) / max(target, 1e-9))


def _bracket(points: list[dict], target: float) -> tuple[dict | None, dict | None]:
    """The point with the largest L0 <= target and the one with the smallest L0 >= target (None if absent)."""
    below = [p for p in points if p["l0"] <= target]
    above = [p for p in points if p["l0"] >= target]
    return (max(below, key=lambda p: p["l0"]) if below else None,
            min(above, key=lambda p: p["l0"]) if above else None)


def next_l1(points: list[dict], target: float) -> float:
    """Next lambda to try: secant in (log lambda, log L0), inside the bracket when there is one.

    L0 falls as lambda rises. With one point the local slope d log L0 / d log lambda is taken as -2 (short runs
    measure -1 to -4); steps are kept between 10% and 4x so a flat stretch cannot send lambda to 0 or infinity.
    """
    lo, hi = _bracket(points, target)
    if lo is not None and hi is not None and lo is not hi:
        a, b = hi, lo  # hi has the larger L0, hence the smaller lambda
    else:
        near = sorted(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
        if len(near) == 1:
            p = near[0]
            f = math.exp(_log_ratio(p["l0"], target) / 2.0)
            f = min(4.0, max(0.25, f))
            if abs(math.log(f)) < math.log(1.1):
                f = 1.1 if f >= 1 else 1 / 1.1
            return p["l1"] * f
        a, b = near[0], near[1]
    la, lb = math.log(a["l1"]), math.log(b["l1"])
    ya, yb = _log_ratio(a["l0"], target), _log_ratio(b["l0"], target)
    if ya == yb or la == lb:
        x = (la + lb) / 2 if (lo is not None and hi is not None) else la + math.copysign(math.log(2.0), ya)
    else:
        x = la - ya * (lb - la) / (yb - ya)
    if lo is not None and hi is not None and lo is not hi:  # stay strictly inside the bracket
        l_lo, l_hi = sorted((la, lb))
        x = min(max(x, l_lo + 0.1 * (l_hi - l_lo)), l_hi - 0.1 * (l_hi - l_lo))
    else:
        base = la
        x = min(max(x, base - math.log(4.0)), base + math.log(4.0))
    return math.exp(x)


def fvu_at_l0(points: list[dict], target: float) -> dict:
    """Our FVU at the target L0: linear in log L0 between the bracketing points, else the nearest point."""
    lo, hi = _bracket(points, target)
    nearest = min(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
    if lo is not None and hi is not None:
        if lo is hi or hi["l0"] == lo["l0"]:
            fvu = lo["fvu"]
        else:
            t = _log_ratio(target, lo["l0"]) / _log_ratio(hi["l0"], lo["l0"])
            fvu = lo["fvu"] + t * (hi["fvu"] - lo["fvu"])
        return {"fvu": fvu, "bracketed": True, "between_l1": [lo["l1"], hi["l1"]], "nearest_l1": nearest["l1"],
                "nearest_l0_rel_gap": nearest["l0"] / target - 1}
    return {"fvu": nearest["fvu"], "bracketed": False, "between_l1": None, "nearest_l1": nearest["l1"],
            "nearest_l0_rel_gap": nearest["l0"] / target - 1}


def match_l0(train_at, first: dict, target: float, max_runs: int, tol: float) -> tuple[list[dict], dict]:
    """Retrain ours at new lambdas (train_at(l1) -> point dict) until the target L0 is bracketed and the nearest
    point is within tol of it, or max_runs extra runs are spent."""
    points = [first]
    for _ in range(max_runs):
        lo, hi = _bracket(points, target)
        nearest = min(points, key=lambda p: abs(_log_ratio(p["l0"], target)))
        if lo is not None and hi is not None and abs(nearest["l0"] / target - 1) <= tol:
            break
        l1 = next_l1(points, target)
        if any(abs(math.log(l1 / p["l1"])) < 1e-3 for p in points):
            break
        points.append(train_at(l1))
        p = points[-1]
        print(f"  matched-L0 search: lambda {p['l1']:.4g} -> L0 {p['l0']:.1f}, FVU {p['fvu']:.4f}, "
              f"dead {p['dead_frac']:.2%}", flush=True)
    return points, fvu_at_l0(points, target)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (under ~3 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--store", default=DEFAULT_STORE, help="activation store of the default model (resid.15)")
    p.add_argument("--tokens", type=int, default=None,
                   help="training tokens per SAE (default 300k; quick 32k topk, 48k relu-l1)")
    p.add_argument("--timed-steps", type=int, default=None,
                   help="steady-state window: the last N steps before the final one (default 20; quick 4)")
    p.add_argument("--init-density-ours", type=float, default=0.01,
                   help="relu-l1: thoughtscope's encoder-bias init density (0 = b_enc starts at 0)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 16k; quick 8k)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--n-features", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1-ours", type=float, default=None,
                   help=f"relu-l1 lambda for thoughtscope's timed run (default {L1_OURS_QUICK} quick, {L1_OURS_FULL} "
                        "full: near SAELens' L0 there)")
    p.add_argument("--match-runs", type=int, default=4,
                   help="relu-l1: at most this many untimed extra runs of thoughtscope to bracket SAELens' L0")
    p.add_argument("--l0-tol", type=float, default=0.1,
                   help="relu-l1: stop the matched-L0 search once a point is within this relative L0 gap")
    p.add_argument("--l1-saelens", type=float, default=L1_SAELENS_DEFAULT, help="relu-l1 lambda for SAELens")
    p.add_argument("--lr-ours", type=float, default=None,
                   help="lr for thoughtscope except relu-l1 (default: its per-architecture default)")
    p.add_argument("--lr-ours-relu-l1", type=float, default=3e-4,
                   help="relu-l1 lr for thoughtscope (default SAELens' 3e-4: same step size for both in short runs; "
                        "0 = thoughtscope's own 5e-5)")
    p.add_argument("--lr-saelens", type=float, default=None, help="default: SAELens' default (3e-4)")
    p.add_argument("--archs", default="topk,relu-l1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]

    def tokens_for(arch: str) -> int:
        # relu-l1 needs a few more steps in the quick run so the timed window starts after the warm-up
        return args.tokens or ((49_152 if arch == "relu-l1" else 32_768) if args.quick else 300_000)
    n_eval = args.eval_tokens or (8192 if args.quick else 16384)
    B = args.batch_size
    max_steps = max(max(1, tokens_for(a) // B) for a in archs)

    train, ev, info = load_tokens(args.store, max_steps * B, n_eval, args.seed)
    d = train.shape[1]
    all_batches = batch_list(train, max_steps, B)
    scale = float(math.sqrt(d) / all_batches[0].norm(dim=1).mean())  # what our trainer computes from its first batch
    print(f"data: {info['store']} ({info['store_tokens']:,} tokens, complete={info['store_complete']}), "
          f"{len(train):,} training rows, held-out {len(ev):,}; batch {B}, d={d} m={args.n_features} "
          f"threads={torch.get_num_threads()}", flush=True)

    figures: dict = {"data": info, "batch_size": B, "n_features": args.n_features, "d_model": d,
                     "threads": torch.get_num_threads(), "quick": args.quick,
                     "timing": "tokens_per_s / speed_ratio_vs_saelens: steady state over the timed window (steps "
                               "listed per architecture; warm-up steps before it trained but not timed); "
                               "*_whole_run: all steps incl. set-up and final weight folding"}
    import sae_lens
    figures["saelens_version"] = sae_lens.__version__
    figures["torch_version"] = torch.__version__
    for arch in archs:
        key = arch.replace("-", "_")
        n_steps = max(1, tokens_for(arch) // B)
        batches = all_batches[:n_steps]
        epochs = n_steps * B / len(train)
        dead_tokens = int(min(DEFAULT_DEAD_TOKENS, max(B, n_steps * B // 10)))
        dead_steps = max(1, dead_tokens // B)
        n_timed = min(args.timed_steps or (4 if args.quick else 20), max(1, n_steps - 2))
        w0 = n_steps - 1 - n_timed  # window = segments w0 .. n_steps-2 (0-based); the last holds the folding
        init_density = args.init_density_ours if args.init_density_ours > 0 else None
        t0 = time.perf_counter()
        l1_ours = args.l1_ours if args.l1_ours is not None else (L1_OURS_QUICK if args.quick else L1_OURS_FULL)
        lr_ours = (args.lr_ours_relu_l1 or None) if arch == "relu-l1" else args.lr_ours
        jobs = {
            "ours": ours_job(arch, d, args.n_features, args.k, l1_ours, batches, lr_ours, init_density),
            "saelens": saelens_job(arch, d, args.n_features, args.k, args.l1_saelens, batches, scale, dead_steps,
                                   args.lr_saelens),
        }
        res, baton = run_interleaved(jobs)
        wall = time.perf_counter() - t0
        ours, theirs = res["ours"], res["saelens"]
        theirs.eval()
        q_ours = held_out(ours.encode, ours.decode, ev)
        q_theirs = held_out(theirs.encode, theirs.decode, ev)
        row: dict = {"steps": n_steps, "train_tokens": n_steps * B, "epochs": epochs, "dead_tokens": dead_tokens,
                     "timed_steps": [w0 + 1, n_steps - 1], "warmup_steps": w0}
        for name, q in (("ours", q_ours), ("saelens", q_theirs)):
            seg = baton.segments[name]
            win = seg[w0:n_steps - 1] if len(seg) >= n_steps else seg
            row[name] = {"tokens_per_s": len(win) * B / sum(win), "step_seconds_timed": win,
                         "tokens_per_s_whole_run": n_steps * B / baton.busy[name],
                         "train_seconds": baton.busy[name], **q}
        row["speed_ratio_vs_saelens"] = row["ours"]["tokens_per_s"] / row["saelens"]["tokens_per_s"]
        row["speed_ratio_vs_saelens_whole_run"] = (row["ours"]["tokens_per_s_whole_run"]
                                                   / row["saelens"]["tokens_per_s_whole_run"])
        row["fvu_ratio_vs_saelens"] = q_ours["fvu"] / q_theirs["fvu"]
        if arch == "relu-l1":
            def train_at(l1: float, _b=batches, _lr=lr_ours, _dens=init_density) -> dict:
                fn = ours_job(arch, d, args.n_features, args.k, l1, _b, _lr, _dens)
                sae = fn(_Solo())
                return {"l1": l1, **held_out(sae.encode, sae.decode, ev)}

            first = {"l1": l1_ours, **q_ours}
            points, at = match_l0(train_at, first, q_theirs["l0"], args.match_runs, args.l0_tol)
            row["matched_l0"] = {
                "method": "thoughtscope retrained (untimed, same batches and settings) at lambdas from a secant search "
                          "in (log lambda, log L0) until SAELens' held-out L0 is bracketed and a point is within "
                          f"{args.l0_tol:.0%}; FVU interpolated linearly in log L0 between the bracketing points",
                "target_l0": q_theirs["l0"], "points": sorted(points, key=lambda p: p["l1"]), **at}
            row["fvu_ours_at_saelens_l0"] = at["fvu"]
            row["fvu_ratio_vs_saelens_timed_run"] = row["fvu_ratio_vs_saelens"]
            row["fvu_ratio_vs_saelens"] = at["fvu"] / q_theirs["fvu"]
        row["l0_ratio_vs_saelens"] = q_ours["l0"] / max(q_theirs["l0"], 1e-12)
        row["l0_ours"], row["l0_saelens"] = q_ours["l0"], q_theirs["l0"]
        row["wall_seconds"] = wall
        if arch == "topk":
            row["k"] = args.k
        else:
            row["l1_ours"], row["l1_saelens"] = l1_ours, args.l1_saelens
            row["init_density_ours"] = init_density
        figures[key] = row
        print(f"\n{arch} (d={d}, m={args.n_features}, batch {B}, {n_steps} steps = {n_steps * B:,} tokens, "
              f"{epochs:.2f} epochs; timed window: steps {w0 + 1}-{n_steps - 1} after {w0} warm-up steps)")
        print(f"{'trainer':10s} {'tok/s timed':>12s} {'tok/s all':>10s} {'FVU':>8s} {'L0':>8s} {'dead':>7s}")
        for name in ("ours", "saelens"):
            r = row[name]
            print(f"{name:10s} {r['tokens_per_s']:12,.0f} {r['tokens_per_s_whole_run']:10,.0f} {r['fvu']:8.4f} "
                  f"{r['l0']:8.1f} {r['dead_frac']:7.2%}")
        print(f"ratio      {row['speed_ratio_vs_saelens']:11.2f}x {row['speed_ratio_vs_saelens_whole_run']:9.2f}x "
              f"{row['fvu_ratio_vs_saelens' if arch != 'relu-l1' else 'fvu_ratio_vs_saelens_timed_run']:8.3f} "
              f"{row['l0_ratio_vs_saelens']:8.3f}   (ours / SAELens)", flush=True)
        if arch == "relu-l1":
            mt = row["matched_l0"]
            how = (f"interpolated in log L0 between lambda {mt['between_l1'][0]:.4g} and {mt['between_l1'][1]:.4g}"
                   if mt["bracketed"] else
                   f"NOT bracketed: nearest point lambda {mt['nearest_l1']:.4g} ({mt['nearest_l0_rel_gap']:+.0%} L0)")
            print(f"matched L0 {mt['target_l0']:.1f} (SAELens'): ours FVU {mt['fvu']:.4f} vs SAELens "
                  f"{q_theirs['fvu']:.4f} -> fvu_ratio_vs_saelens {row['fvu_ratio_vs_saelens']:.3f} ({how})")
            for pt in mt["points"]:
                print(f"  ours lambda {pt['l1']:7.4g}: L0 {pt['l0']:7.1f}  FVU {pt['fvu']:.4f}  dead {pt['dead_frac']:.2%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(figures, indent=2))
        os.replace(tmp, args.json)
    return figures


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

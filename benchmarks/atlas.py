"""Cost of building a feature atlas against harvesting the same tokens, on the default model.

Both runs read the same context batches of the default corpus through the same early-exit forward
pass; the harvest writes activations to an on-disk store, the atlas build encodes them with the SAE and
keeps its per-feature statistics. Reported:

  cost_ratio_vs_harvest      fastest streaming atlas time / fastest harvest time (per-token cost: target <= 1.3)
  paired_ratios              atlas / harvest within each back-to-back repeat
  end_to_end_ratio           including the one-off finalisation (logit effects over the vocabulary,
                             decoder neighbours, SQLite writes), which does not grow with the token count
  finalize_s                 that one-off cost in seconds

The default SAE (`load_sae("default")`, shipped in src/thoughtscope/assets/default_sae) is used when it
exists; otherwise a freshly initialised topk SAE of the same shape (9216 features, k=32), which costs the same per token.

    python benchmarks/atlas.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from thoughtscope.atlas import AtlasConfig, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import load_model
from thoughtscope.sae import SAE, SAEConfig, load_sae


def get_sae(lm, site: str):
    """The shipped default SAE (load_sae("default")) when it exists; otherwise a fresh one of the same shape."""
    try:
        from thoughtscope.sae.formats import default_sae_path

        if (default_sae_path() / "cfg.json").is_file():
            return load_sae("default"), "default"
    except ImportError:
        pass
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=9216, k=32, model=lm.name, site=site)
    return SAE.from_config(cfg, seed=0), "fresh topk 9216 (default SAE not shipped yet)"


def time_harvest(lm, corpus, site, n_tokens, bs, ctx, tmp: Path) -> float:
    out = tmp / f"h{time.perf_counter_ns()}"
    t = time.perf_counter()
    harvest(lm, corpus, [site], out, HarvestConfig(n_tokens=n_tokens, ctx_len=ctx, batch_size=bs), progress=False)
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return dt


def time_atlas(lm, sae, corpus, n_tokens, bs, ctx, tmp: Path) -> dict:
    out = tmp / f"a{time.perf_counter_ns()}"
    tm: dict = {}
    t = time.perf_counter()
    build_atlas(lm, sae, corpus, out, AtlasConfig(n_tokens=n_tokens, ctx_len=ctx, batch_size=bs), progress=False,
                timings=tm)
    tm["total_s"] = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return tm


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (a few minutes on 2 busy cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--site", default="resid.15")
    p.add_argument("--batches", type=int, default=None, help="forward batches per contender")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="alternating runs of each; the fastest is kept")
    args = p.parse_args(argv)
    n_batches = args.batches or (6 if args.quick else 48)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.manual_seed(0)
    lm = load_model("default")
    sae, sae_kind = get_sae(lm, args.site)
    corpus = Corpus("default")
    n_tokens = n_batches * args.batch_size * args.ctx_len
    tmp = Path(tempfile.mkdtemp(prefix="ts-bench-atlas-"))
    try:
        bs, ctx = args.batch_size, args.ctx_len
        time_harvest(lm, corpus, args.site, bs * ctx, bs, ctx, tmp)  # warm-up: corpus reader, model, allocator
        h, a = [], []
        for _ in range(repeats):
            h.append(time_harvest(lm, corpus, args.site, n_tokens, bs, ctx, tmp))
            a.append(time_atlas(lm, sae, corpus, n_tokens, bs, ctx, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best_h = min(h)
    best_a = min(a, key=lambda x: x["stream_s"])
    res = {
        "n_tokens": n_tokens, "sae": sae_kind, "n_features": sae.cfg.n_features, "site": args.site,
        "threads": torch.get_num_threads(), "harvest_s": best_h, "atlas_stream_s": best_a["stream_s"],
        "finalize_s": best_a["finalize_s"], "atlas_total_s": best_a["total_s"],
        "harvest_tok_s": n_tokens / best_h, "atlas_tok_s": n_tokens / best_a["stream_s"],
        "cost_ratio_vs_harvest": best_a["stream_s"] / best_h,
        "end_to_end_ratio": best_a["total_s"] / best_h,
        "all_harvest_s": h, "all_atlas": a,
        # each repeat runs harvest then atlas back to back: on a shared machine whose load drifts, these
        # paired ratios are the fairer comparison
        "paired_ratios": [x["stream_s"] / y for x, y in zip(a, h)],
    }
    print(f"{n_tokens:,} tokens, SAE: {sae_kind}")
    print(f"harvest        {best_h:8.1f} s  ({res['harvest_tok_s']:,.0f} tok/s)")
    print(f"atlas stream   {best_a['stream_s']:8.1f} s  ({res['atlas_tok_s']:,.0f} tok/s)")
    print(f"atlas finalize {best_a['finalize_s']:8.1f} s  (one-off: logit effects, neighbours, SQLite)")
    print(f"cost_ratio_vs_harvest {res['cost_ratio_vs_harvest']:.2f}  (target <= 1.3); "
          f"end to end {res['end_to_end_ratio']:.2f}; paired per repeat "
          + ", ".join(f"{r:.2f}" for r in res["paired_ratios"]))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
    sys.exit(0)

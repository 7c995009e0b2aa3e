"""Probe reading and pair-direction fitting on the default model, against a bare forward pass and repeng.

1. Sweep reading: `read_activations` at every block's output plus the embeddings (one forward pass per batch,
   last token, sinks excluded, nothing cached) versus a bare `model(..., output_hidden_states=True)` over the
   same batches. `sweep_ratio_vs_forward` = bare seconds / reading seconds (target >= 0.9); interleaved
   repeats, median of the per-round ratios.
2. Pair direction: repeng's `read_representations(method="pca_diff")` versus ours on the same pairs and site
   (reading + fit). Ours: LAT (PCA of orientation-shuffled differences, the thoughtscope default for pairs) and
   repeng's own method re-done in torch (centred PCA of unshuffled differences, majority sign).
   `fit_speed_ratio_vs_repeng` = repeng seconds / our LAT seconds; `cosine_vs_repeng` = |cos| between our LAT
   direction and repeng's; `cosine_same_method_vs_repeng` for the re-done pca_diff. repeng 0.4 pins numpy<2
   and names `np.float_`; installed with `pip install --no-deps repeng` and that alias it runs beside numpy 2.
   If it is missing, the JSON says so and carries no repeng numbers.

    python benchmarks/probe.py --quick --json out.json      (--tiny for a random tiny model)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync
from _repeng import repeng_direction

from thoughtscope.models import load_model, tiny_model
from thoughtscope.probes.datasets import from_pairs
from thoughtscope.probes.fitters import fit_lat
from thoughtscope.probes.generators import comparisons, honesty
from thoughtscope.probes.read import ReadConfig, read_activations
from thoughtscope.steer.vectors import pca_of_differences


def bare_forward(lm, texts, batch_size):
    sync(lm.device)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            ids, mask = lm.tokenize(texts[i : i + batch_size])
            lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    sync(lm.device)
    return time.perf_counter() - t


def our_reading(lm, ds, sites, batch_size):
    sync(lm.device)
    t = time.perf_counter()
    read_activations(lm, ds, sites, ReadConfig(texts_per_batch=batch_size), cache=False)
    sync(lm.device)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=None)
    add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = tiny_model("llama", d_model=64, n_layers=4) if args.tiny else load_model(args.model, device=args.device)
    lm.model.to(args.device)
    sites = ["embed"] + [f"resid.{i}" for i in range(lm.n_layers)]
    ds = comparisons(n=64 if args.quick else 256)
    bs = 16
    rounds = 2 if args.quick else 3
    our_reading(lm, ds.subset(range(16)), sites, bs)  # warm-up
    ratios, t_read, t_bare = [], [], []
    for r in range(rounds):  # alternate which goes first, so drifting machine load favours neither
        if r % 2 == 0:
            a, b = our_reading(lm, ds, sites, bs), bare_forward(lm, ds.texts, bs)
        else:
            b, a = bare_forward(lm, ds.texts, bs), our_reading(lm, ds, sites, bs)
        t_read.append(a)
        t_bare.append(b)
        ratios.append(b / a)
    res = {
        "model": lm.name,
        "threads": torch.get_num_threads(),
        **device_info(args.device),
        "texts": len(ds),
        "sites": len(sites),
        "rounds": rounds,
        "read_seconds": t_read,
        "bare_forward_seconds": t_bare,
        "sweep_ratio_vs_forward": statistics.median(ratios),
        "sweep_ratios": ratios,
    }
    print(
        f"reading {len(ds)} texts at {len(sites)} sites: {statistics.median(t_read):.2f} s, bare forward with all "
        f"hidden states {statistics.median(t_bare):.2f} s -> sweep_ratio_vs_forward "
        f"{res['sweep_ratio_vs_forward']:.3f} (target >= 0.9)"
    )

    layer = min(15, lm.n_layers - 2)
    hon = honesty(n=24 if args.quick else 96)
    pairs = [(hon.texts[a], hon.texts[b]) for a, b in hon.pairs()]
    pset = from_pairs(pairs, "honesty-pairs")
    rc = ReadConfig(add_bos=False)  # read the texts exactly as repeng's tokenizer call encodes them
    t = time.perf_counter()
    X = read_activations(lm, pset, [f"resid.{layer}"], rc, cache=False)[f"resid.{layer}"]
    W, _ = fit_lat(X, pset.y, pairs=pset.pairs())
    t_ours = time.perf_counter() - t
    ours = W[0] / W[0].norm()
    same = pca_of_differences(X[0::2] - X[1::2])
    res.update(pair_site=f"resid.{layer}", n_pairs=len(pairs), fit_seconds_ours=t_ours)
    try:
        ref, t_ref = repeng_direction(lm, layer, pairs)
        import importlib.metadata as md

        res.update(
            reference=f"repeng {md.version('repeng')} read_representations(method='pca_diff')",
            fit_seconds_repeng=t_ref,
            fit_speed_ratio_vs_repeng=t_ref / t_ours,
            cosine_vs_repeng=abs(float(torch.nn.functional.cosine_similarity(ours, ref, dim=0))),
            cosine_same_method_vs_repeng=abs(float(torch.nn.functional.cosine_similarity(same, ref, dim=0))),
        )
        print(
            f"pair direction ({len(pairs)} pairs at resid.{layer}): ours (LAT) {t_ours:.2f} s, repeng {t_ref:.2f} s "
            f"-> fit_speed_ratio_vs_repeng {res['fit_speed_ratio_vs_repeng']:.2f}; |cos| LAT vs repeng "
            f"{res['cosine_vs_repeng']:.4f}, same method (centred PCA of differences) vs repeng "
            f"{res['cosine_same_method_vs_repeng']:.4f}"
        )
    except Exception as e:  # repeng missing or not runnable beside this numpy
        res.update(
            reference=None,
            repeng_unavailable=f"{type(e).__name__}: {e}",
            fit_speed_ratio_vs_repeng=None,
            cosine_vs_repeng=None,
        )
        print(f"repeng unavailable ({type(e).__name__}: {e}); no comparison made")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

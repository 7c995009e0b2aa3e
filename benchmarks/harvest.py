"""Harvest throughput on the default model: thoughtscope vs the bare forward pass vs a peer, one process.

Measures tokens/s of
  ours      `thoughtscope.harvest.harvest` end to end (tokenising, early-exit capture, store writes)
  bare      `model.model` with its block list cut after the site (the floor no harvester can beat)
  full      a full forward with output_hidden_states=True (what naive harvesting does)
  nnsight   nnsight's LanguageModel.trace saving the same site and stopping there (if installed)
on the same context batches, and prints ratios against `bare`.

    python benchmarks/harvest.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import Site, load_model


def _batches(lm, n_batches, batch_size, ctx_len):
    out = []
    for i, b in enumerate(Corpus("default").batches(lm.tokenizer, ctx_len, batch_size)):
        if i >= n_batches:
            break
        out.append(b.input_ids.to(lm.device))
    return out


def time_bare(lm, batches, layer):
    base = lm.model.model
    full_layers = base.layers
    base.layers = torch.nn.ModuleList(list(full_layers)[: layer + 1])
    try:
        with torch.inference_mode():
            base(input_ids=batches[0], use_cache=False)  # warm-up
            sync(lm.device)
            t = time.perf_counter()
            for ids in batches:
                h = base(input_ids=ids, use_cache=False).last_hidden_state
                h.reshape(-1, h.shape[-1]).to("cpu", copy=True)  # a harvester's rows end on the host
            sync(lm.device)
            return time.perf_counter() - t
    finally:
        base.layers = full_layers


def time_full(lm, batches, layer):
    with torch.inference_mode():
        sync(lm.device)
        t = time.perf_counter()
        for ids in batches:
            hs = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            hs[layer + 1].reshape(-1, hs[layer + 1].shape[-1]).to("cpu", copy=True)
        sync(lm.device)
        return time.perf_counter() - t


def time_ours(lm, n_tokens, batch_size, ctx_len, site):
    tmp = Path(tempfile.mkdtemp(prefix="ts-bench-"))
    try:
        cfg = HarvestConfig(n_tokens=n_tokens, ctx_len=ctx_len, contexts_per_batch=batch_size)
        sync(lm.device)
        t = time.perf_counter()
        harvest(lm, Corpus("default"), [site], tmp / "acts", cfg, progress=False)
        sync(lm.device)
        return time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def time_nnsight(lm, batches, layer):
    try:
        from nnsight import LanguageModel
    except ImportError:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nn_model = LanguageModel(lm.model, tokenizer=lm.tokenizer)
    block = nn_model.model.layers[layer]

    def run(ids):
        with nn_model.trace(ids) as tracer:
            h = block.output.save()
            tracer.stop()  # nnsight's own early exit: nothing past the site runs
        h = h[0] if isinstance(h, tuple) else h
        return h.reshape(-1, h.shape[-1]).to("cpu", copy=True)

    with torch.inference_mode():
        run(batches[0])
        sync(lm.device)
        t = time.perf_counter()
        for ids in batches:
            run(ids)
        sync(lm.device)
        return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (under ~3 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--site", default="resid.15")
    p.add_argument("--batches", type=int, default=None, help="forward batches per contender")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 2 quick, 3 full)")
    add_device_arg(p)
    args = p.parse_args(argv)
    n_batches = args.batches or (4 if args.quick else 20)
    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device)
    site = lm.check_site(Site.parse(args.site))
    batches = _batches(lm, n_batches, args.batch_size, args.ctx_len)
    n_tokens = sum(b.numel() for b in batches)

    # warm the corpus reader and the model before the first timed contender
    time_ours(lm, args.batch_size * args.ctx_len, args.batch_size, args.ctx_len, site)
    # Contenders alternate in rounds and each ratio is taken within a round, so a change in machine load
    # between rounds does not favour whoever ran first; the reported ratio is the median over rounds.
    rounds = args.rounds or (2 if args.quick else 3)
    per_round: list[dict] = []
    nnsight_ok = True
    for _ in range(rounds):
        r = {
            "ours": n_tokens / time_ours(lm, n_tokens, args.batch_size, args.ctx_len, site),
            "bare_forward": n_tokens / time_bare(lm, batches, site.layer),
            "full_forward_hidden_states": n_tokens / time_full(lm, batches, site.layer),
        }
        if nnsight_ok:
            try:
                t = time_nnsight(lm, batches, site.layer)
            except Exception as e:  # a peer failure is reported, not fatal
                print(f"nnsight failed: {type(e).__name__}: {e}", file=sys.stderr)
                t = None
            nnsight_ok = t is not None
            if t is not None:
                r["nnsight"] = n_tokens / t
        per_round.append(r)
    med = statistics.median
    results = {k: med(r[k] for r in per_round if k in r) for k in per_round[0]}
    ratio = {k: med(r[k] / r["bare_forward"] for r in per_round if k in r) for k in per_round[0]}

    figures = {
        "model": lm.name,
        "site": str(site),
        "tokens": n_tokens,
        "batch_size": args.batch_size,
        "ctx_len": args.ctx_len,
        "threads": torch.get_num_threads(),
        **device_info(args.device),
        "quick": args.quick,
        "rounds": rounds,
        "tokens_per_s": results,
        "per_round_tokens_per_s": per_round,
        "ratios_vs_bare_forward": ratio,
        "ratio_vs_bare_forward": ratio["ours"],
        "ratio_vs_full_forward": med(r["ours"] / r["full_forward_hidden_states"] for r in per_round),
    }
    if "nnsight" in results:
        figures["ratio_vs_nnsight"] = med(r["ours"] / r["nnsight"] for r in per_round if "nnsight" in r)
    print(f"{'contender':32s} {'tokens/s':>10s} {'vs bare':>8s}   (median of {rounds} alternating rounds)")
    for name, v in results.items():
        print(f"{name:32s} {v:10,.0f} {ratio[name]:8.2f}x")
    print(f"ratio_vs_bare_forward = {figures['ratio_vs_bare_forward']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()

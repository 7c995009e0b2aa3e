"""Free against unit decoder norms (SAEConfig.decoder_norm) on the real model: one SAE trained both ways.

The top-k family's default is free decoder norms, ranked by pre-activation x norm and folded into the encoder when
training ends (SAELens' rescale_acts_by_decoder_norm); "unit" holds every decoder row at norm 1 throughout, the
earlier rule. Here both train on the same batch sequence of the default model's residual stream (resid.15 rows
harvested into the cached benchmark store, cut at document boundaries, the product's exclusion rule: _data.py),
with every other setting at its default; each is scored on the test documents (FVU, L0, dead share) and spliced
into the model on held-out text after the store's (``spliced_loss``, ``loss_recovered_vs_mean``). The synthetic
side, where the true features are known, is benchmarks/sae_quality.py (its contenders train with the default).

Figures: ``real.<free|unit>.{fvu, l0, dead_frac, spliced_loss, loss_recovered_vs_mean, seconds}``,
``fvu_free_minus_unit`` and ``spliced_loss_free_minus_unit`` (below 0: free is better).

Sizes. ``--quick`` (about 3 minutes on 2 cores once the 131,072-token store is cached; harvesting it takes about
8 more): 4x latents, batch 2,048 x 64 steps, 2,048 loss tokens. Full: a 262,144-token store, 8x latents (4,608),
k 32, batch 4,096 x 384 steps (6 epochs), 8,192 loss tokens.

    python benchmarks/sae_decoder_norm.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from _contenders import _dense_fn
from _data import race_data
from _device import add_device_arg, device_info
from _race import check_sane, evaluate, spliced_recovery

from thoughtscope._io import atomic_write_json
from thoughtscope.models import load_recorded
from thoughtscope.sae import SAEConfig, TrainConfig, Trainer

MODES = ("free", "unit")


def sizes(args) -> dict:
    quick = {"store_tokens": 131_072, "expansion": 4, "batch_size": 2048, "steps": 64, "loss_tokens": 2048}
    full = {"store_tokens": 262_144, "expansion": 8, "batch_size": 4096, "steps": 384, "loss_tokens": 8192}
    base = quick if args.quick else full
    return {key: (getattr(args, key) if getattr(args, key, None) is not None else v) for key, v in base.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small run (about 3 minutes on 2 cores, data cached)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--arch", default="topk", help="topk, batchtopk or matryoshka")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--store-tokens", dest="store_tokens", type=int, help="tokens harvested into the cached store")
    p.add_argument("--expansion", type=int, help="latents / d_model")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--steps", type=int, help="training steps of each run (the same batches for both)")
    p.add_argument("--loss-tokens", dest="loss_tokens", type=int, help="held-out tokens of the spliced loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    add_device_arg(p)  # where the SAEs train; they are scored and spliced on the CPU
    args = p.parse_args(argv)
    sz = sizes(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    store, rows, batches = race_data(sz["store_tokens"], sz["batch_size"], sz["steps"], seed=args.seed)
    d = rows.train.shape[1]
    fig: dict = {"quick": args.quick, "sizes": sz, "arch": args.arch, "k": args.k, "data": rows.info}
    fig["threads"], fig["torch_version"] = torch.get_num_threads(), torch.__version__
    fig.update(device_info(args.device))
    fns, real = {}, {}
    for mode in MODES:
        cfg = SAEConfig(arch=args.arch, d_model=d, n_features=d * sz["expansion"], k=args.k, decoder_norm=mode)
        tc = TrainConfig(
            batch_size=sz["batch_size"],
            steps=sz["steps"],
            progress=False,
            checkpoint_every=0,
            seed=args.seed,
            device=args.device,
        )
        t0 = time.perf_counter()
        sae = Trainer([cfg], tc).fit(iter(batches[i] for i in range(len(batches))))[0].eval()
        seconds = time.perf_counter() - t0
        fns[mode] = _dense_fn(sae.encode, sae.decode)
        real[mode] = {**evaluate(fns[mode], rows.test), "val_fvu": evaluate(fns[mode], rows.val)["fvu"]}
        real[mode]["seconds"] = seconds
        check_sane(f"thoughtscope-{args.arch} ({mode} decoder norms)", real[mode])
        print(f"{mode}: test FVU {real[mode]['fvu']:.4f} L0 {real[mode]['l0']:.1f} ({seconds:.0f} s)", flush=True)
    if sz["loss_tokens"]:
        lm = load_recorded((store.manifest.get("extra") or {}).get("model_source") or store.model)
        spliced = spliced_recovery(fns, store, lm=lm, n_tokens=sz["loss_tokens"], progress=False)
        for mode in MODES:
            s = spliced[mode]
            real[mode].update(spliced_loss=s["loss"], loss_recovered_vs_mean=s["loss_recovered_vs_mean"])
            real[mode].update(loss_clean=s["loss_clean"], loss_mean_ablated=s["loss_mean_ablated"], loss_text=s["text"])
        fig["spliced_loss_free_minus_unit"] = real["free"]["spliced_loss"] - real["unit"]["spliced_loss"]
    fig["real"] = real
    fig["fvu_free_minus_unit"] = real["free"]["fvu"] - real["unit"]["fvu"]
    fig["wall_seconds"] = time.perf_counter() - t_start
    print(
        f"fvu_free_minus_unit {fig['fvu_free_minus_unit']:+.4f}, spliced_loss_free_minus_unit "
        f"{fig.get('spliced_loss_free_minus_unit', float('nan')):+.4f}; {fig['wall_seconds']:.0f} s",
        flush=True,
    )
    if args.json:
        atomic_write_json(args.json, fig)
    return fig


if __name__ == "__main__":
    main()

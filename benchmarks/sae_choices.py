"""One SAE training choice made each way on the real model: the same SAE, the same batches, only that setting differs.

Choices are settings of SAEConfig or TrainConfig (``--choice NAME=A,B[,C]``, the first value the one compared):

* ``decoder_norm=free,unit`` (the default): free decoder norms, ranked by pre-activation x norm and folded into the
  encoder when training ends (SAELens' rescale_acts_by_decoder_norm, the top-k family's default), against every
  decoder row held at norm 1 throughout (the earlier rule);
* ``b_dec_init=geometric_median,zero,mean``: where the decoder bias starts;
* ``decay_frac=0.2,0`` (or ``warmup_frac``, ``grad_clip``, ``k``...): the learning-rate schedule and the rest.

Every run trains on the same batch sequence of the default model's residual stream (resid.15 rows harvested into
the cached benchmark store, cut at document boundaries, the product's exclusion rule: _data.py), with every other
setting at its default; each is scored on the test documents (FVU, L0, dead share) and spliced into the model on
held-out text after the store's (``spliced_loss``, ``loss_recovered_vs_mean``). The synthetic side, where the true
features are known, is benchmarks/sae_quality.py (its contenders train with the defaults).

Figures: ``choice``, ``values``, ``real.<value>.{fvu, l0, dead_frac, spliced_loss, loss_recovered_vs_mean,
seconds}``, and for the first value A against each other value B ``fvu_<A>_minus_<B>`` and
``spliced_loss_<A>_minus_<B>`` (below 0: A is better).

Sizes. ``--quick`` (about 3 minutes on 2 cores once the 131,072-token store is cached; harvesting it takes about
8 more): 4x latents, batch 2,048 x 64 steps, 2,048 loss tokens. Full: a 262,144-token store, 8x latents (4,608),
k 32, batch 4,096 x 384 steps (6 epochs), 8,192 loss tokens.

    python benchmarks/sae_choices.py --quick --json out.json
    python benchmarks/sae_choices.py --quick --choice b_dec_init=geometric_median,zero --json out.json
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import _settings
import torch
from _contenders import _dense_fn
from _data import race_data
from _device import add_device_arg, device_info
from _race import check_sane, evaluate, spliced_recovery

from thoughtscope._io import atomic_write_json
from thoughtscope.models import load_recorded
from thoughtscope.sae import SAEConfig, TrainConfig, Trainer

DEFAULT_CHOICE = "decoder_norm=free,unit"


def parse_choice(text: str) -> tuple[str, str, list]:
    """``NAME=A,B[,C]`` -> (name, "sae" or "train", values typed as the field's default): a clear error otherwise."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    values = [v.strip() for v in rest.split(",") if v.strip()]
    if not sep or len(values) < 2 or len(set(values)) < len(values):
        raise SystemExit(f"--choice {text!r}: expected NAME=A,B[,C] with two or more different values")
    try:
        return name, _settings.where(name), _settings.typed(name, values)
    except SystemExit as e:
        raise SystemExit(f"--choice {text!r}: {e}") from None


def _tag(value) -> str:
    return str(value).replace(".", "p").replace("-", "m")


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
    p.add_argument("--choice", default=DEFAULT_CHOICE, help=f"NAME=A,B[,C] (default {DEFAULT_CHOICE})")
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
    name, where, values = parse_choice(args.choice)
    fig["choice"], fig["values"] = name, values
    fns, real = {}, {}
    for value in values:
        on_sae = {name: value} if where == "sae" else {}
        on_train = {name: value} if where == "train" else {}
        kw = {"arch": args.arch, "d_model": d, "n_features": d * sz["expansion"], "k": args.k, **on_sae}
        cfg = SAEConfig(**kw)
        tc = TrainConfig(
            batch_size=sz["batch_size"],
            steps=sz["steps"],
            progress=False,
            checkpoint_every=0,
            seed=args.seed,
            device=args.device,
            **on_train,
        )
        t0 = time.perf_counter()
        sae = Trainer([cfg], tc).fit(iter(batches[i] for i in range(len(batches))))[0].eval()
        seconds = time.perf_counter() - t0
        key = str(value)
        fns[key] = _dense_fn(sae.encode, sae.decode)
        real[key] = {**evaluate(fns[key], rows.test), "val_fvu": evaluate(fns[key], rows.val)["fvu"]}
        real[key]["seconds"] = seconds
        check_sane(f"thoughtscope-{args.arch} ({name}={value})", real[key])
        print(f"{name}={value}: test FVU {real[key]['fvu']:.4f} L0 {real[key]['l0']:.1f} ({seconds:.0f} s)", flush=True)
    if sz["loss_tokens"]:
        lm = load_recorded((store.manifest.get("extra") or {}).get("model_source") or store.model)
        # named "<choice>=<value>": a bare value such as "zero" or "mean" is a reference condition's name there
        named = {f"{name}={key}": fn for key, fn in fns.items()}
        spliced = spliced_recovery(named, store, lm=lm, n_tokens=sz["loss_tokens"], progress=False)
        for key in fns:
            s = spliced[f"{name}={key}"]
            real[key].update(spliced_loss=s["loss"], loss_recovered_vs_mean=s["loss_recovered_vs_mean"])
            real[key].update(loss_clean=s["loss_clean"], loss_mean_ablated=s["loss_mean_ablated"], loss_text=s["text"])
    fig["real"] = real
    first = str(values[0])
    for other in map(str, values[1:]):
        pair = f"{_tag(first)}_minus_{_tag(other)}"
        fig[f"fvu_{pair}"] = real[first]["fvu"] - real[other]["fvu"]
        if sz["loss_tokens"]:
            fig[f"spliced_loss_{pair}"] = real[first]["spliced_loss"] - real[other]["spliced_loss"]
    fig["wall_seconds"] = time.perf_counter() - t_start
    diffs = ", ".join(f"{k} {v:+.4f}" for k, v in fig.items() if "_minus_" in k)
    print(f"{diffs}; {fig['wall_seconds']:.0f} s", flush=True)
    if args.json:
        atomic_write_json(args.json, fig)
    return fig


if __name__ == "__main__":
    main()

"""The Jacobian lens against the logit lens on held-out text: at each layer, the share of positions where the
lens's top-1 token is the model's own final top-1. `jlens_top1_vs_logit_lens` is the Jacobian lens minus the logit
lens, averaged over the layers in the 38-92 % depth band, with a bootstrap 95 % interval over held-out contexts
(goal > 0); `fit_seconds` is the fit's time (goal <= 10 min for the default model on 2 cores). The fit reads the
first corpus contexts; the held-out contexts come after everything it read. Per-layer figures go to the JSON and
a PNG.

    python benchmarks/lens.py --quick --json out.json   (--tiny: a random tiny model; --lens DIR reuses a fit)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _device import add_device_arg, device_info

from thoughtscope.causal.lens import JacobianLens, LensFitConfig, _fit_batches, fit_jacobian_lens
from thoughtscope.causal.residuals import read_residuals, readout
from thoughtscope.stats import bootstrap, percentile_ci

BAND = (0.38, 0.92)


def agreement(lm, lens: JacobianLens, contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[contexts, layers] top-1 agreement with the final top-1, for the logit lens and the Jacobian lens."""
    logit, jac = [], []
    for ids in contexts.split(8):
        hs = read_residuals(lm, ids.to(lm.device), grad=False)
        with torch.inference_mode():
            final = readout(lm, hs[-1]).argmax(-1)
            lo = [(readout(lm, h).argmax(-1) == final).float().mean(-1) for h in hs]
            ja = [
                (readout(lm, (h.float() @ lens.J[i].T.to(h.device)).to(h.dtype)).argmax(-1) == final).float().mean(-1)
                for i, h in enumerate(hs)
            ]
        logit.append(torch.stack(lo, 1).cpu())
        jac.append(torch.stack(ja, 1).cpu())
    return torch.cat(logit), torch.cat(jac)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="a quarter of the fit (32 positions a row), 32 held-out contexts"
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--model", default="default")
    ap.add_argument("--lens", default=None, help="a fitted lens folder to reuse (fit_seconds is then not measured)")
    ap.add_argument("--threads", type=int, default=None)
    add_device_arg(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from thoughtscope.models import load_model, tiny_model

    lm = (
        tiny_model("llama", d_model=32, n_layers=4, seed=1) if args.tiny else load_model(args.model, device=args.device)
    )
    if args.tiny:
        cfg = LensFitConfig(n_contexts=1, ctx_len=32, contexts_per_batch=1, rows_per_batch=32, n_validation=2)
    elif args.quick:  # every row measured on one context (32 positions) instead of eight
        cfg = LensFitConfig(n_contexts=18, contexts_per_batch=1)
    else:
        cfg = LensFitConfig()  # what `thoughtscope lens fit` does
    t0 = time.perf_counter()
    lens = JacobianLens.load(args.lens, lm) if args.lens else fit_jacobian_lens(lm, cfg)
    fit_seconds = None if args.lens else time.perf_counter() - t0
    used = LensFitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lens.config.items()})
    read = used.skip_tokens + (used.n_contexts + used.n_validation) * used.ctx_len  # fitting + validation text
    n_held = 8 if args.tiny else (32 if args.quick else 128)
    held_cfg = LensFitConfig(n_contexts=n_held, ctx_len=64, contexts_per_batch=n_held, skip_tokens=read + 4096)
    held = next(iter(_fit_batches(lm, held_cfg)))
    lo, ja = agreement(lm, lens, held)
    n = lm.n_layers
    band = [i for i in range(n) if BAND[0] <= (i + 1) / n <= BAND[1]]
    diff = (ja[:, band] - lo[:, band]).mean(1)
    boots = bootstrap(lambda idx: diff[idx].mean(), len(diff), n_boot=2000, seed=0)
    lo_ci, hi_ci = percentile_ci(boots)
    res = {
        "jlens_top1_vs_logit_lens": float(diff.mean()),
        "jlens_top1_vs_logit_lens_ci": [float(lo_ci), float(hi_ci)],
        "fit_seconds": fit_seconds,
        "band_layers": band,
        "logit_lens_top1": lo.mean(0).tolist(),
        "jacobian_lens_top1": ja.mean(0).tolist(),
        "fit": lens.config,
        "rank": lens.rank,
        "shrink": lens.shrink,
        "validation": lens.validation,
        "heldout_contexts": n_held,
        "model": lm.name,
        "quick": args.quick,
        **device_info(args.device),
    }
    gain = res["jlens_top1_vs_logit_lens"]
    print(f"Jacobian lens - logit lens, top-1 agreement over layers {band[0]}-{band[-1]}: {gain:+.3f} ", end="")
    print(f"[{lo_ci:+.3f}, {hi_ci:+.3f}]; fit {fit_seconds or 0:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        _png(res, args.png or str(Path(args.json).with_suffix(".png")))
    return 0


def _png(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(res["logit_lens_top1"], label="logit lens")
    ax.plot(res["jacobian_lens_top1"], label="Jacobian lens")
    b = res["band_layers"]
    ax.axvspan(b[0], b[-1], alpha=0.1, color="grey", label="38-92 % depth")
    ax.set_xlabel("layer")
    ax.set_ylabel("top-1 = final top-1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

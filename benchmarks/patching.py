"""Attribution patching against real activation patching on the held-out prompt pairs, and TransformerLens's own
patching utilities on the same sweep, in one process.

For each held-out pair (indirect object, factual recall, addition; `thoughtscope.causal.load_pairs(split=
"heldout")`) and each stream (the residual stream after every block, every attention output, every MLP output):
  activation   `thoughtscope.causal.activation_patching`: every (layer, position) cell patched for real
  attribution  `thoughtscope.causal.attribution_patching`: one clean forward, one corrupted forward + backward
  peer         TransformerLens, offline on the same weights (SmolLM2 is not among its official model names):
               `bridge`, TL 3.x's TransformerBridge booted with `hf_model=` on a copy of the loaded HF model (its
               documented way for any HF model), and `hooked_transformer`, the classic HookedTransformer with its
               config read by TL from the model's own config.json and its weights converted by TL's Llama
               converter, nothing folded or centred. Each has its logits checked against the HF model's, then runs
               `transformer_lens.patching.generic_activation_patch` with `layer_pos_patch_setter` on hook_resid_post
               / hook_attn_out / hook_mlp_out over the same cells ours computes (positions from the first one where
               the prompts differ: before it the model is causal and every effect is exactly 0), its clean cache
               restricted to those hooks, no autograd; its maps are checked against ours.

Figures: `atp_spearman` (mean over pairs of the residual-stream Spearman of the two maps over all cells, as
`PatchResult.spearman` defines it, with a 95 % bootstrap CI), `atp_spearman_attn`, `atp_spearman_mlp`; the same
over only the cells from the first differing position (`*_differing_cells`: the cells before it are exactly 0 in
both maps, a block of ties that moves the all-cell figure either way); per-family means; `atp_speedup` (activation
÷ attribution seconds, summed over the same pairs); `transformer_lens_ratio` (TL's seconds ÷ ours for activation
patching, summed over the same pairs; the faster TL model is the one reported, every one timed is in
`transformer_lens_paths`). Everything runs on one torch thread (torch.set_num_threads(1)), each contender warmed up
first on the shortest pair (its residual stream; two layers of it for TL, whose sweep costs the most); per pair the
order is ours, attribution, TL, so a change in machine load hits all of them alike. Full size: all 30 held-out
pairs, both TL models, every stream. --quick: the held-out pair of each family with the fewest positions to patch;
the peer is the bridge alone (the faster TL model in our runs) on the residual stream alone, against ours on that
same sweep timed on its own (`ours_peer_sweep_seconds`): TL's one forward per cell is most of the run's time.

    python benchmarks/patching.py --quick --json out.json      (--tiny for a random tiny model)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _device import add_device_arg, device_info, sync

from thoughtscope.causal import PatchPair, activation_patching, attribution_patching, load_pairs
from thoughtscope.causal.patching import STREAMS, one_token
from thoughtscope.models import load_model, tiny_model
from thoughtscope.stats import mean_ci, spearman

FAMILIES = ("indirect_object", "factual_recall", "arithmetic")
TL_HOOKS = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}  # our block L output = TL's resid_post L


def tiny_form(pair: PatchPair) -> PatchPair | None:
    """A held-out pair for the tiny byte-level model (one token per character): the same prompts when they have
    the same length, the target and the other answer cut to their last character; None when that cannot align."""
    t, a = pair.target[-1], (pair.against or " ")[-1]
    if len(pair.clean) != len(pair.corrupt) or t == a:
        return None
    return PatchPair(pair.clean, pair.corrupt, t, a)


def select_pairs(
    lm, per_family: int | None, tiny: bool, fewest_cells: bool, families=FAMILIES
) -> list[tuple[str, PatchPair]]:
    """The held-out pairs, `per_family` of each family (all when None): the first ones, or with `fewest_cells`
    those with the fewest positions to patch (the quick run's choice: a sweep's cost grows with them)."""
    out = []
    for fam in families:
        pairs = load_pairs(fam, "heldout")
        if tiny:
            pairs = [q for q in map(tiny_form, pairs) if q is not None]
        if fewest_cells:
            pairs = sorted(pairs, key=lambda q: (lambda f, T: T - f)(*first_differing(lm, q)))
        out += [(fam, p) for p in pairs[:per_family]]
    return out


def first_differing(lm, pair: PatchPair) -> tuple[int, int]:
    clean, _ = lm.tokenize([pair.clean])
    corrupt, _ = lm.tokenize([pair.corrupt])
    differ = (clean[0] != corrupt[0]).nonzero()
    return (int(differ[0]) if len(differ) else clean.shape[1]), clean.shape[1]


def timed(device, fn, *a, **kw):
    sync(device)
    t = time.perf_counter()
    out = fn(*a, **kw)
    sync(device)
    return out, time.perf_counter() - t


def _peer_tokenizer(lm):
    tok = copy.deepcopy(lm.tokenizer)  # TL sets padding side and special tokens on the tokenizer it gets
    if "name_or_path" not in tok.init_kwargs:  # a tokenizer built in memory (the tiny model's byte tokenizer):
        # TL would reload it by name to make it prepend BOS; every id sequence here already starts with BOS
        tok.init_kwargs |= {"name_or_path": lm.name, "add_bos_token": True}
    return tok


def boot_bridge(lm, device):
    """TL 3.x's documented way for any HF model: a TransformerBridge around a copy of the loaded model (the bridge
    wraps the model's modules, so it gets its own copy and ours stays untouched); offline, nothing is fetched."""
    from transformer_lens.model_bridge import TransformerBridge

    with contextlib.redirect_stdout(io.StringIO()):
        return TransformerBridge.boot_transformers(
            lm.name, hf_model=copy.deepcopy(lm.model), tokenizer=_peer_tokenizer(lm), device=str(device)
        )


def boot_hooked(lm, device):
    """TL's classic HookedTransformer on the same weights: its config read by TL from the model's own config.json
    (a local folder, which `get_pretrained_model_config` accepts where `from_pretrained` wants an official name),
    its weights converted by TL's Llama converter from the loaded model, without folding or centring anything (so
    the residual stream is the HF model's)."""
    import tempfile

    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="ts-tl-config-") as tmp:
        config = copy.deepcopy(lm.model.config)
        config.architectures = config.architectures or [type(lm.model).__name__]  # unset on a from_config model
        config.save_pretrained(tmp)
        cfg = loading.get_pretrained_model_config(tmp, fold_ln=False, device=str(device), dtype=torch.float32)
        state = loading.get_pretrained_state_dict(tmp, cfg, hf_model=lm.model)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3 points new code at the bridge (timed beside it)
        model = HookedTransformer(cfg, tokenizer=_peer_tokenizer(lm), move_to_device=True)
        model.load_and_process_state_dict(
            {k: v.detach().clone() for k, v in state.items()},
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
        )
    return model


TL_PATHS = {"bridge": boot_bridge, "hooked_transformer": boot_hooked}


class TransformerLensPeer:
    """One TransformerLens model on the same weights, and TL's own patching utilities over the same cells."""

    def __init__(self, lm, model):
        from transformer_lens import patching

        self.lm, self.model, self.patching = lm, model, patching
        self.model.eval()

    def logit_check(self, texts: list[str]) -> dict:
        """Max |TL logit − HF logit| over every position of the given prompts (same token ids to both)."""
        worst, scale = 0.0, 0.0
        with torch.inference_mode():
            for text in texts:
                ids, _ = self.lm.tokenize([text])
                ours = self.lm.model(input_ids=ids, use_cache=False).logits.float()
                theirs = self.model(ids, return_type="logits").float()
                worst = max(worst, float((ours - theirs).abs().max()))
                scale = max(scale, float(ours.abs().max()))
        return {"max_abs_logit_diff": worst, "max_abs_logit": scale, "prompts": len(texts)}

    def sweep(self, pair: PatchPair, first: int, streams=STREAMS, layers=None) -> dict[str, torch.Tensor]:
        """TL's raw patched metric per stream, [layers, positions from `first`], for the same cells as ours (only
        the given layers when `layers`: the warm-up)."""
        import pandas as pd
        from transformer_lens.utilities import get_act_name

        t, a = one_token(self.lm, pair.target), one_token(self.lm, pair.against) if pair.against else None
        clean, _ = self.lm.tokenize([pair.clean])
        corrupt, _ = self.lm.tokenize([pair.corrupt])
        n, T = self.model.cfg.n_layers, corrupt.shape[1]

        def metric(logits):
            last = logits[:, -1].float()
            return (last[:, t] - (last[:, a] if a is not None else 0)).sum()

        layers = range(n) if layers is None else layers
        names = {get_act_name(TL_HOOKS[s], layer) for s in streams for layer in layers}
        cells = pd.DataFrame([(layer, p) for layer in layers for p in range(first, T)], columns=["layer", "pos"])
        out = {}
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):  # TL's per-call tqdm bars
            _, cache = self.model.run_with_cache(clean, names_filter=lambda name: name in names)
            for s in streams:
                flat = self.patching.generic_activation_patch(
                    self.model, corrupt, cache, metric, self.patching.layer_pos_patch_setter, TL_HOOKS[s],
                    index_df=cells,
                )  # fmt: skip
                out[s] = flat.float().cpu().reshape(len(layers), T - first)
        return out


def boot_peers(lm, device, texts, paths) -> tuple[dict[str, TransformerLensPeer], dict]:
    """Every TL path that runs this model offline, each with its logit check; a path that fails is noted."""
    peers, info = {}, {"transformer_lens_logit_check": {}}
    notes = []
    for name in paths:
        boot = TL_PATHS[name]
        try:
            peer = TransformerLensPeer(lm, boot(lm, device))
            info["transformer_lens_logit_check"][name] = peer.logit_check(texts)
            peers[name] = peer
        except Exception as e:  # a peer that cannot run is reported, not fatal
            notes.append(f"TransformerLens {name} could not run {lm.name} offline: {type(e).__name__}: {e}")
    if notes:
        info["peer_note"] = "; ".join(notes)
    return peers, info


def measure_pair(lm, peers, fam, pair, device, peer_streams=STREAMS) -> dict:
    act, t_act = timed(device, activation_patching, lm, pair)
    atp, t_atp = timed(device, attribution_patching, lm, pair)
    first, T = first_differing(lm, pair)
    row = {
        "family": fam,
        "clean": pair.clean,
        "corrupt": pair.corrupt,
        "target": pair.target,
        "against": pair.against,
        "tokens": T,
        "first_differing_position": first,
        "cells_per_stream": lm.n_layers * T,
        "cells_patched_per_stream": lm.n_layers * (T - first),
        "clean_metric": act.clean_metric,
        "corrupt_metric": act.corrupt_metric,
        "activation_seconds": t_act,
        "attribution_seconds": t_atp,
        "atp_speedup": t_act / t_atp,
    }
    for s in STREAMS:
        p, a = act.patched[s], atp.attributed[s]
        row[f"spearman_{s}"] = spearman(p.flatten(), a.flatten())
        row[f"spearman_{s}_differing_cells"] = spearman(p[:, first:].flatten(), a[:, first:].flatten())
    act.attributed = atp.attributed
    row["top_resid_cells"] = [
        {"layer": layer, "position": pos, "patched": v, "attributed": w} for layer, pos, v, w in act.top_cells()
    ]
    denom = act.clean_metric - act.corrupt_metric
    if peers:  # ours on the very sweep the peer runs (the one above when that is every stream)
        same = tuple(peer_streams) == STREAMS
        row["ours_peer_sweep_seconds"] = (
            t_act if same else timed(device, activation_patching, lm, pair, peer_streams)[1]
        )
    for name, peer in peers.items():
        raw, t_tl = timed(device, peer.sweep, pair, first, peer_streams)
        row[f"tl_{name}_seconds"] = t_tl
        row[f"tl_{name}_max_abs_diff_vs_ours"] = max(
            float(((raw[s] - act.corrupt_metric) / denom - act.patched[s][:, first:]).abs().max()) for s in raw
        )
    if peers:
        best = min(peers, key=lambda name: row[f"tl_{name}_seconds"])
        row["transformer_lens_seconds"] = row[f"tl_{best}_seconds"]
        row["transformer_lens_ratio"] = row["transformer_lens_seconds"] / row["ours_peer_sweep_seconds"]
    return row


def summarise(rows: list[dict]) -> dict:
    fig: dict = {}
    for s, key in (("resid", "atp_spearman"), ("attn", "atp_spearman_attn"), ("mlp", "atp_spearman_mlp")):
        stat = mean_ci([r[f"spearman_{s}"] for r in rows])
        fig[key], fig[f"{key}_ci"] = stat["mean"], stat["ci"]
        cells = mean_ci([r[f"spearman_{s}_differing_cells"] for r in rows])
        fig[f"{key}_differing_cells"], fig[f"{key}_differing_cells_ci"] = cells["mean"], cells["ci"]
    fig["per_family"] = {
        fam: {
            "pairs": len(sub),
            **{
                f"atp_spearman_{s}": statistics.fmean(r[f"spearman_{s}"] for r in sub)
                for s in STREAMS
                if all(r[f"spearman_{s}"] == r[f"spearman_{s}"] for r in sub)  # no nan (a constant map)
            },
        }
        for fam in FAMILIES
        if (sub := [r for r in rows if r["family"] == fam])
    }
    act, atp = sum(r["activation_seconds"] for r in rows), sum(r["attribution_seconds"] for r in rows)
    fig |= {"activation_seconds": act, "attribution_seconds": atp, "atp_speedup": act / atp}
    paths = sorted({k[3:-8] for r in rows for k in r if k.startswith("tl_") and k.endswith("_seconds")})
    if rows and paths:
        ours = sum(r["ours_peer_sweep_seconds"] for r in rows)
        per_path = {
            name: {
                "seconds": (t := sum(r[f"tl_{name}_seconds"] for r in rows)),
                "ratio_vs_ours": t / ours,
                "max_abs_diff_vs_ours": max(r[f"tl_{name}_max_abs_diff_vs_ours"] for r in rows),
            }
            for name in paths
        }
        best = min(per_path, key=lambda name: per_path[name]["seconds"])  # the peer at its fastest
        fig |= {
            "transformer_lens_ratio": per_path[best]["ratio_vs_ours"],
            "transformer_lens_path": best,
            "transformer_lens_seconds": per_path[best]["seconds"],
            "ours_peer_sweep_seconds": ours,
            "transformer_lens_ratio_median_over_pairs": statistics.median(
                r[f"tl_{best}_seconds"] / r["ours_peer_sweep_seconds"] for r in rows
            ),  # fmt: skip
            "transformer_lens_max_abs_diff_vs_ours": per_path[best]["max_abs_diff_vs_ours"],
            "transformer_lens_paths": per_path,
        }
    else:
        fig["transformer_lens_ratio"] = None
    return fig


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one held-out pair per family (under ~3 minutes on 2 cores)")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2)")
    p.add_argument("--pairs", type=int, default=None, help="held-out pairs per family (default: 1 quick, all full)")
    p.add_argument("--tiny", action="store_true", help="a random tiny model (a smoke test of the script)")
    p.add_argument("--families", default=",".join(FAMILIES), help="prompt-pair families, comma-separated")
    p.add_argument("--no-peer", action="store_true", help="skip TransformerLens")
    p.add_argument(
        "--tl-streams",
        default=None,
        help="streams the peer ratio is measured on, comma-separated (default: resid with --quick, all otherwise)",
    )
    p.add_argument(
        "--tl-paths",
        default=None,
        help="TransformerLens models to time, comma-separated: bridge, hooked_transformer (default: bridge with "
        "--quick, both otherwise; the fastest gives transformer_lens_ratio)",
    )
    add_device_arg(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # every contender on one thread: timings comparable on a shared machine
    load_start = os.getloadavg()
    lm = tiny_model("llama", d_model=64, n_layers=4) if args.tiny else load_model(args.model, device=args.device)
    if args.tiny:
        lm.model.to(args.device)
    families = args.families.split(",")
    if bad := set(families) - set(FAMILIES):
        p.error(f"--families: unknown {', '.join(sorted(bad))}; expected some of {', '.join(FAMILIES)}")
    pairs = select_pairs(lm, args.pairs or (1 if args.quick else None), args.tiny, args.quick, families)
    paths = (args.tl_paths or ("bridge" if args.quick else ",".join(TL_PATHS))).split(",")
    if bad := set(paths) - set(TL_PATHS):
        p.error(f"--tl-paths: unknown {', '.join(sorted(bad))}; expected some of {', '.join(TL_PATHS)}")
    tl_streams = tuple((args.tl_streams or ("resid" if args.quick else ",".join(STREAMS))).split(","))
    if bad := set(tl_streams) - set(STREAMS):
        p.error(f"--tl-streams: unknown {', '.join(sorted(bad))}; expected some of {', '.join(STREAMS)}")
    peers, peer_info = ({}, {"peer_note": "skipped (--no-peer)"}) if args.no_peer else boot_peers(
        lm, args.device, [p.clean for _, p in pairs], paths
    )  # fmt: skip

    # warm every contender on the shortest pair before any clock runs
    _, warm = min(pairs, key=lambda fp: len(fp[1].clean))
    activation_patching(lm, warm, ["resid"])
    attribution_patching(lm, warm)
    for peer in peers.values():
        peer.sweep(warm, first_differing(lm, warm)[0], ["resid"], layers=[0, lm.n_layers - 1])
    rows = []
    for fam, pair in pairs:
        rows.append(measure_pair(lm, peers, fam, pair, args.device, tl_streams))
        r = rows[-1]
        tl = f"  TL {r['transformer_lens_seconds']:.2f}s" if "transformer_lens_seconds" in r else ""
        print(
            f"{fam:16s} T={r['tokens']:2d} rho resid {r['spearman_resid']:.3f} attn {r['spearman_attn']:.3f} "
            f"mlp {r['spearman_mlp']:.3f}  act {r['activation_seconds']:.2f}s atp {r['attribution_seconds']:.3f}s{tl}",
            file=sys.stderr,
        )
    figures = {
        "model": lm.name,
        "split": "heldout",
        "pairs": len(rows),
        "streams": list(STREAMS),
        "threads": torch.get_num_threads(),
        "threads_note": "torch.set_num_threads(1) for every contender",
        **device_info(args.device),
        "quick": args.quick,
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
        **summarise(rows),
        "transformer_lens_streams": list(tl_streams) if peers else None,
        **peer_info,
        "per_pair": rows,
    }
    tl = figures.get("transformer_lens_ratio")
    print(
        f"atp_spearman {figures['atp_spearman']:.3f} {figures['atp_spearman_ci']}  attn "
        f"{figures['atp_spearman_attn']:.3f}  mlp {figures['atp_spearman_mlp']:.3f}  atp_speedup "
        f"{figures['atp_speedup']:.1f}x  transformer_lens_ratio {'-' if tl is None else f'{tl:.2f}'}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()

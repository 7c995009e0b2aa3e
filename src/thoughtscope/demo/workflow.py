"""`thoughtscope demo`: the main workflow on the embedded default model, offline, in a few minutes.

One stage after another: harvest, the shipped SAE on fresh text, a small feature atlas (demo/atlas.py), steering
(demo/steer.py), the shipped NLA, a probe sweep (demo/probes.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .atlas import SAE_TOKENS_SEEN


def run_demo(out: Path, site: str = "resid.15", tokens: int = 16_384, console: Console | None = None) -> dict:
    from ..corpus import Corpus
    from ..harvest import HarvestConfig, harvest
    from ..models import Site, load_model

    console = console or Console()
    out = Path(out)
    console.rule("[bold]thoughtscope demo")
    t0 = time.perf_counter()
    lm = load_model("default")
    console.print(f"model: {lm!r}  (loaded in {time.perf_counter() - t0:.1f} s)")
    corpus = Corpus("default")
    site_obj = lm.check_site(Site.parse(site))

    console.rule(f"1. harvest {tokens:,} tokens at {site_obj}")
    t1 = time.perf_counter()
    # Start past the text the shipped SAE was trained (262,144 tokens) and validated (16,384) on.
    cfg = HarvestConfig(n_tokens=tokens, skip_tokens=SAE_TOKENS_SEEN)
    store = harvest(lm, corpus, [site_obj], out / "acts", cfg, overwrite=True)[site_obj]
    dt = time.perf_counter() - t1
    summary = summarise_store(store)
    summary["harvest_seconds"] = dt
    _print_store_summary(console, lm, store, summary)

    if site_obj == Site(15):
        console.rule("2. the shipped SAE on these activations")
        summary["sae"] = _sae_stage(console, lm, store)
        for _name, stage in _LATER_STAGES:
            stage(console, lm, out, summary)
    else:
        console.print(f"(the shipped SAE reads resid.15; skipping the SAE stages for {site_obj})")
    console.print(f"\nartefacts in [bold]{out}[/bold]")
    console.print(
        'next: why did the model say that? [bold]thoughtscope graph "The Eiffel Tower is in the city of"[/bold] '
        "(an attribution graph over the shipped transcoders, about half a minute), or the Graph page of "
        "[bold]thoughtscope serve[/bold]"
    )
    return summary


def _sae_stage(console: Console, lm, store) -> dict:
    """Measure the packaged SAE on the freshly harvested tokens (text it was not trained on)."""
    from ..sae import evaluate_sae, load_sae

    sae = load_sae("default")
    metrics = evaluate_sae(
        sae, store.batches(4096, shuffle=False, exclude_bos=sae.cfg.exclude_bos, max_norm_ratio=sae.cfg.max_norm_ratio)
    )
    t = Table(title=f"default SAE: {sae.cfg.arch}, {sae.cfg.n_features} features, k={sae.cfg.k}", show_header=False)
    t.add_row("tokens (position 0 and sinks > 10× median norm excluded)", f"{metrics['n_tokens']:,}")
    t.add_row("fraction of variance unexplained (FVU)", f"{metrics['fvu']:.3f}")
    t.add_row("mean active features per token (L0)", f"{metrics['l0']:.1f}")
    t.add_row("features that never fired here", f"{metrics['n_dead']:,} of {sae.cfg.n_features:,}")
    console.print(t)
    return metrics


def _feature_stage(console: Console, lm, out: Path, summary: dict) -> None:
    from .atlas import demo_feature_cards

    demo_feature_cards(lm, out, console)


def _steer_stage(console: Console, lm, out: Path, summary: dict) -> None:
    from .steer import default_demo

    console.rule("4. steering: unsteered vs steered, same seed")
    default_demo(lm, console)


# Long enough that the explained tokens sit past position 50, where the NLA's training rows were sampled.
NLA_DEMO_TEXT = (
    "The ship left the harbour at dawn. For three days the crew saw nothing but grey water and "
    "gulls, and the cook rationed the last of the bread. On the fourth morning the wind turned, "
    "the fog lifted, and by noon the captain could see the green hills of the island"
)


def _nla_stage(console: Console, lm, out: Path, summary: dict) -> None:
    """The shipped NLA writes a few tokens' activations as words and reads them back (round-trip FVE)."""
    from ..nla import explain_text, load_nla

    console.rule("5. natural-language explanations of activations")
    t0 = time.perf_counter()
    nla = load_nla("default", lm=lm)
    rows = explain_text(nla, NLA_DEMO_TEXT, positions=[-9, -5, -1])
    t = Table(
        title=f"default NLA at {nla.cfg.site}: explanation of each token's activation, and how much of "
        "the activation the words give back",
        show_lines=True,
    )
    t.add_column("token")
    t.add_column("explanation")
    t.add_column("round-trip FVE", justify="right")
    for r in rows:
        t.add_row(repr(r["token"]), r["explanation"].strip(), f"{r['fve']:.2f}")
    console.print(f"text: {NLA_DEMO_TEXT!r}")
    console.print(t)
    console.print(
        "FVE = 1 − ‖reconstruction − activation‖² / variance (0 = no better than the mean vector); "
        "held-out figures and baselines: `thoughtscope nla eval --model default --quick`, docs/nla.md"
    )
    summary["nla"] = {"rows": rows, "seconds": time.perf_counter() - t0}


def _probe_stage(console: Console, lm, out: Path, summary: dict) -> None:
    """Where is "is this comparison true?" linearly readable? A quick layer sweep beside its controls."""
    from .probes import probe_demo

    console.rule("6. probes: where the model reads 'is this comparison true?'")
    res = probe_demo(lm, out / "probes", console)
    summary["probes"] = {k: res[k] for k in ("best_site", "best_auroc", "best_selectivity", "seconds")}


_LATER_STAGES = [("features", _feature_stage), ("steer", _steer_stage), ("nla", _nla_stage), ("probes", _probe_stage)]


def summarise_store(store) -> dict:
    """Norm statistics that matter before training anything: attention sinks dominate raw MSE."""
    acts, meta = [], []
    for a, m in store.iter_shards():
        acts.append(a.float())
        meta.append(m)
    x = torch.cat(acts)
    pos = torch.cat([m["position"] for m in meta]).long()
    tok = torch.cat([m["token_id"] for m in meta]).long()
    norms = x.norm(dim=1)
    median = norms.median().item()
    sink = pos == 0
    outliers = norms > 10 * median
    return {
        "tokens": int(x.shape[0]),
        "median_norm": median,
        "position0_median_norm": norms[sink].median().item() if sink.any() else float("nan"),
        "share_above_10x_median": outliers.float().mean().item(),
        "share_dropped_by_default_rule": (sink | outliers).float().mean().item(),
        "top_norm_tokens": tok[norms.argsort(descending=True)[:5]].tolist(),
    }


def _print_store_summary(console: Console, lm, store, s: dict) -> None:
    t = Table(title=f"activation store {store.path}", show_header=False)
    t.add_row("tokens", f"{s['tokens']:,}")
    t.add_row("harvest speed", f"{s['tokens'] / s['harvest_seconds']:,.0f} tokens/s")
    t.add_row("median token norm", f"{s['median_norm']:,.1f}")
    t.add_row("median norm at position 0 (attention sink)", f"{s['position0_median_norm']:,.1f}")
    t.add_row("tokens above 10× median norm", f"{100 * s['share_above_10x_median']:.2f}%")
    t.add_row(
        "dropped by the default rule (position 0 + >10× median)", f"{100 * s['share_dropped_by_default_rule']:.2f}%"
    )
    names = [repr(lm.tokenizer.decode([i])) for i in s["top_norm_tokens"]]
    t.add_row("largest-norm tokens", ", ".join(names))
    console.print(t)

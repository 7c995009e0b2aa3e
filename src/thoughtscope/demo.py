"""`thoughtscope demo`: the main workflow on the embedded default model, offline, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def run_demo(out: Path, site: str = "resid.15", tokens: int = 16_384, console: Console | None = None) -> dict:
    from .corpus import Corpus
    from .harvest import HarvestConfig, harvest
    from .models import Site, load_model

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
    store = harvest(lm, corpus, [site_obj], out / "acts", HarvestConfig(n_tokens=tokens))[site_obj]
    dt = time.perf_counter() - t1
    summary = summarise_store(store)
    summary["harvest_seconds"] = dt
    _print_store_summary(console, lm, store, summary)
    console.print(f"\nartefacts in [bold]{out}[/bold]")
    return summary


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
    t.add_row("dropped by the default rule (position 0 + >10× median)",
              f"{100 * s['share_dropped_by_default_rule']:.2f}%")
    names = [repr(lm.tokenizer.decode([i])) for i in s["top_norm_tokens"]]
    t.add_row("largest-norm tokens", ", ".join(names))
    console.print(t)

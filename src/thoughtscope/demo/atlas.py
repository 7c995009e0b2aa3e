"""The feature-atlas stage of `thoughtscope demo`: a small atlas, two random feature cards and one searched one.

The demo must finish in a minute or two on a 2-core machine, so it builds an atlas of ~12k tokens only
(a full atlas reads 100k+ tokens; see docs/atlas.md). It reads text past the range the shipped SAE was
trained and validated on, so the cards show the SAE on text it has not seen. Random cards come first on
purpose: browsing only the features a search turned up would show the SAE at its best.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..atlas.build import AtlasConfig, build_atlas
from ..atlas.cards import feature_card
from ..atlas.db import Atlas
from ..atlas.query import contrast

# Text the shipped SAE has seen: 262,144 training tokens, then 16,384 held-out tokens.
SAE_TOKENS_SEEN = 262_144 + 16_384

# A concept for contrastive search: Python source against plain English about similar things.
PYTHON_PROMPTS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nfiles = os.listdir('.')\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "if x is None:\n    raise ValueError('x is required')\n",
    "with open('data.txt') as f:\n    lines = f.readlines()\n",
]
ENGLISH_CONTROLS = [
    "You add the two numbers and give back the result.",
    "She counted from one to ten and wrote each number down.",
    "He looked through the folder to see which files were there.",
    "A point on a map has a position from east to west.",
    "If nobody answers, the form cannot be sent.",
    "She opened the letter and read every line of it.",
]


def demo_feature_cards(
    lm,
    out: Path,
    console,
    *,
    sae=None,
    corpus=None,
    tokens: int = 12_288,
    skip_tokens: int = SAE_TOKENS_SEEN,
    n_random: int = 2,
    seed: int = 0,
    prompts=PYTHON_PROMPTS,
    controls=ENGLISH_CONTROLS,
    concept: str = "Python code",
) -> dict:
    """Build a small atlas under `out/atlas`, print `n_random` random alive feature cards and the top feature of a
    contrastive search (`prompts` vs `controls`) with its card. Defaults: the shipped SAE and the default corpus."""
    from ..corpus import Corpus
    from ..sae import load_sae

    console.rule("3. feature atlas")
    shipped = sae is None
    sae = sae if sae is not None else load_sae("default")
    corpus = corpus if corpus is not None else Corpus("default")
    cfg = AtlasConfig(
        n_tokens=tokens,
        skip_tokens=skip_tokens,
        top_k=10,
        n_bins=5,
        per_bin=4,
        n_random_contexts=32,
        checkpoint_every=10_000,
    )
    t0 = time.perf_counter()
    path = build_atlas(
        lm, sae, corpus, Path(out) / "atlas", cfg, sae_path="default" if shipped else None, progress=True
    )
    dt = time.perf_counter() - t0
    res: dict = {"atlas": str(path), "build_seconds": dt}
    with Atlas.open(path) as at:
        st = at.stats()
        alive = int((st["n_active"] > 0).sum())
        res.update(n_tokens=int(at.meta["n_tokens"]), alive=alive, n_features=at.n_features)
        console.print(
            f"atlas of {res['n_tokens']:,} tokens (past the SAE's training and held-out text) in {dt:.1f} s: "
            f"{alive:,} of {at.n_features:,} features fired at least once.  A full atlas reads far more "
            f"text: [bold]thoughtscope atlas build --sae default --corpus default --tokens 262144 --out "
            f"atlas/[/bold]"
        )
        rand = at.random_features(n_random, seed=seed, alive_only=True)
        res["random"] = rand
        console.print(f"\n[bold]{len(rand)} random alive features[/bold] (seed {seed}; random, not hand-picked)")
        for n in rand:
            console.print(feature_card(at, n, lm.tokenizer, n_top=5, n_quantile=3))
        hits = contrast(lm, sae, prompts, controls, k=3, atlas=at)
        best = hits[0]
        res["contrast"] = hits
        console.print(
            f"\n[bold]contrastive search for {concept}[/bold]: {len(prompts)} prompts vs {len(controls)} "
            f"controls; score = (mean peak on prompts − mean peak on controls) / feature max"
        )
        console.print(
            "  "
            + ",  ".join(
                f"#{h['feature']} score {h['score']:+.2f} (fires on {100 * h['prompt_fire_rate']:.0f}% of prompts)"
                for h in hits
            )
        )
        console.print(feature_card(at, best["feature"], lm.tokenizer, n_top=5, n_quantile=3))
    return res

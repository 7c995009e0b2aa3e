"""The prompt pairs the causal checks read, shipped in the package (assets/causal_pairs.json, written by
scripts/causal_pairs.py): indirect object, factual recall and one-digit addition, each with a held-out split."""

from __future__ import annotations

from importlib import resources

from .._io import read_json
from ..errors import CausalError
from .patching import PatchPair

SPLITS = ("tuning", "heldout")


def pair_families() -> dict[str, list[dict]]:
    with resources.as_file(resources.files("thoughtscope") / "assets" / "causal_pairs.json") as path:
        return read_json(path, CausalError)["families"]


def load_pairs(family: str | None = None, split: str | None = None) -> list[PatchPair]:
    """Pairs of one family (or all), of one split (or both); CausalError naming what exists otherwise."""
    fams = pair_families()
    if family is not None and family not in fams:
        raise CausalError(f"no prompt-pair family {family!r}: there are {', '.join(sorted(fams))}")
    if split is not None and split not in SPLITS:
        raise CausalError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [
        PatchPair(p["clean"], p["corrupt"], p["target"], p["against"])
        for name, pairs in sorted(fams.items())
        if family in (None, name)
        for p in pairs
        if split in (None, p["split"])
    ]

"""The third kind of explanation, an NLA's reading, and why an atlas may have none: an NLA reads one site of the
model, and its reading only explains a feature of an SAE at that same site. The shipped default NLA reads
resid.20 while the default SAE (and so the default atlas) is at resid.15, so the default atlas has no NLA kind;
`nla_note` says so in words for the CLI and the feature page, reading the NLA's site from its config file
(no model, no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

from .._io import read_json
from ..errors import AtlasError


def nla_site(path: str | os.PathLike | None = None) -> str | None:
    """The site the NLA at `path` (default: the shipped one) reads, None when there is no readable NLA there."""
    if path is None:
        from ..paths import asset

        path = asset("default_nla")
    cfg = Path(path) / "nla_config.json"
    if not cfg.is_file():
        return None
    try:
        site = read_json(cfg, AtlasError).get("site")
    except AtlasError:
        return None
    return site if isinstance(site, str) else None


def nla_note(sae_site: str | None, path: str | os.PathLike | None = None) -> dict:
    """Whether an NLA reading can explain this atlas's features: {"available", "nla_site", "sae_site", "note"}."""
    site = nla_site(path)
    if site is None:
        note = "no NLA is installed, so there is no NLA reading of these features"
    elif sae_site is not None and site != sae_site:
        note = (
            f"no NLA reading: the NLA reads {site}, this SAE is at {sae_site} (an NLA only reads its own site; "
            f"a feature's direction at {sae_site} is not an activation at {site})"
        )
    else:
        note = f"the NLA reads {site}, the SAE's own site"
    return {"available": site is not None and site == sae_site, "nla_site": site, "sae_site": sae_site, "note": note}

"""Where things live: the thoughtscope home folder (converted weights, default corpus, caches) and the
assets shipped inside the package (default SAE, NLA, steering calibration, probe data)."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"


def home() -> Path:
    """$THOUGHTSCOPE_HOME, else ~/.cache/thoughtscope."""
    root = os.environ.get("THOUGHTSCOPE_HOME")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "thoughtscope"


def asset(name: str) -> Path:
    """A file or folder shipped in the package, e.g. asset("default_sae")."""
    return ASSETS / name

"""Architecture name -> SAE class: the one thing the config, the base class and the file formats share.

Torch-free, below all three: SAEConfig validates its ``arch`` here, the base class builds from here, and
formats.load_sae builds a loaded folder's class from here, so none of them imports another to find a class.
The built-in architectures register themselves when their module is imported; ``architectures()`` imports
them by name on first use (they sit above this module, so that is a plugin load, not an arrow down).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import SAEError

if TYPE_CHECKING:
    from .base import SAE

SAE_CLASSES: dict[str, type[SAE]] = {}
BUILTIN = {  # name: module
    "relu-l1": "relu_l1",
    "topk": "topk",
    "batchtopk": "batchtopk",
    "jumprelu": "jumprelu",
    "matryoshka": "matryoshka",
    "transcoder": "transcoder",
    "jumprelu-transcoder": "transcoder",
}


def register_sae_class(cls: type[SAE]) -> type[SAE]:
    """Class decorator: make ``cls`` buildable and loadable under ``cls.arch``."""
    if not cls.arch:
        raise SAEError(f"{cls.__name__} has no arch name")
    SAE_CLASSES[cls.arch] = cls
    return cls


def architectures() -> tuple[str, ...]:
    """Every registered architecture name, the built-ins first (they are imported on first use)."""
    for module in BUILTIN.values():
        importlib.import_module(f"{__package__}.{module}")
    order = list(BUILTIN)
    return tuple(sorted(SAE_CLASSES, key=lambda a: order.index(a) if a in order else len(order)))


def sae_class(arch: str) -> type[SAE]:
    """The class registered under arch."""
    if arch not in SAE_CLASSES and arch in BUILTIN:
        architectures()
    if arch not in SAE_CLASSES:
        raise SAEError(
            f"SAEConfig.arch: unknown SAE architecture {arch!r}; expected one of {', '.join(architectures())}"
        )
    return SAE_CLASSES[arch]

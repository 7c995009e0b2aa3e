"""Dtype names: the one table of what each name and alias means, for models, stores and SAE training.

Torch-free at import (the CLI and `plans.py` read the names for their defaults and checks); torch is imported
only when a name is turned into a `torch.dtype`.
"""

from __future__ import annotations

from typing import Any

from .errors import ThoughtscopeError

#: aliases users type, each to its canonical name
ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}
#: what an activation store may hold (and a model may run in)
STORE_DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = STORE_DTYPES
#: what SAE training may run in: bfloat16 is autocast, float64 is exact (e.g. for DDP tests)
TRAIN_DTYPES = ("float32", "bfloat16", "float64")


def canonical(dtype: Any) -> str:
    """'bf16', 'torch.bfloat16' or torch.bfloat16 -> 'bfloat16'; an unknown name comes back as typed (lower-cased)."""
    name = str(dtype).strip().lower().removeprefix("torch.")
    return ALIASES.get(name, name)


def check(dtype: Any, allowed: tuple[str, ...], error: type[Exception], what: str = "dtype") -> str:
    """The canonical name of `dtype`, or `error` naming the value and the names allowed."""
    name = canonical(dtype)
    if name not in allowed:
        raise error(f"{what}={dtype!r} is not supported; expected one of {', '.join(allowed)}")
    return name


def torch_dtype(dtype: Any):
    """The torch.dtype of a name or alias (a torch.dtype is returned as it is)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = canonical(dtype)
    out = getattr(torch, name, None) if name in (*STORE_DTYPES, *TRAIN_DTYPES) else None
    if not isinstance(out, torch.dtype):
        raise ThoughtscopeError(f"unknown dtype {dtype!r}: expected one of {', '.join((*STORE_DTYPES, 'float64'))}")
    return out

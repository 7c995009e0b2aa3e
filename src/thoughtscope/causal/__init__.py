"""The causal half: which activations carry an answer (patching), what each layer is about to say (lenses),
which features pushed a token (attribution), and why the model said what it said (attribution graphs over
transcoders), each checked against what the model does when it is intervened on.

Names load on first use (PEP 562), so `thoughtscope.causal.config` (what the CLI reads its defaults and help from)
does not pull in torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

#: exported name -> the module it lives in (relative to this package)
_WHERE = {
    "GraphConfig": ".config",
    "JacobianLens": ".lens",
    "LensFitConfig": ".lens",
    "LensView": ".lens",
    "fit_jacobian_lens": ".lens",
    "lens_view": ".lens",
    "STREAMS": ".patching",
    "PatchPair": ".patching",
    "PatchResult": ".patching",
    "activation_patching": ".patching",
    "attribution_patching": ".patching",
    "load_pairs": ".datasets",
    "pair_families": ".datasets",
    "one_token": ".patching",
    "patch": ".patching",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)

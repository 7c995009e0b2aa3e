"""The causal half: which activations carry an answer (patching), what each layer is about to say (lenses), and
which features pushed a token (attribution), each checked against what the model does when it is intervened on."""

from .datasets import load_pairs, pair_families
from .lens import JacobianLens, LensFitConfig, LensView, fit_jacobian_lens, lens_view
from .patching import STREAMS, PatchPair, PatchResult, activation_patching, attribution_patching, one_token, patch

__all__ = [
    "JacobianLens",
    "LensFitConfig",
    "LensView",
    "fit_jacobian_lens",
    "lens_view",
    "STREAMS",
    "PatchPair",
    "PatchResult",
    "activation_patching",
    "attribution_patching",
    "load_pairs",
    "pair_families",
    "one_token",
    "patch",
]

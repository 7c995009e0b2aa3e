"""Feature atlas: for every SAE feature, what activates it, what it does, its neighbours, and a scored explanation."""

from .build import AtlasConfig, build_atlas, build_atlas_from
from .cards import feature_card, load_tokenizer, show_feature, text_card
from .db import Atlas, AtlasError, Example, Feature
from .encode import check_sae_matches
from .explain import (
    ExplainConfig,
    ExplainerError,
    HTTPChatClient,
    LocalChatClient,
    auroc,
    balanced_accuracy,
    client_from_env,
    estimate,
    explain_atlas,
)
from .geometry import logit_effects, nearest_features
from .offline_explain import OfflineExplainer, OfflineOptions, explain_offline
from .query import activations_on_texts, contrast, open_with_model, top_features_for_text
from .run_explain import run_explain
from .scoring import LexicalScorer, parse_cues
from .search import Hit, search_concept

__all__ = [
    "Atlas",
    "AtlasConfig",
    "AtlasError",
    "Example",
    "Feature",
    "ExplainConfig",
    "ExplainerError",
    "HTTPChatClient",
    "Hit",
    "LexicalScorer",
    "LocalChatClient",
    "OfflineExplainer",
    "OfflineOptions",
    "activations_on_texts",
    "auroc",
    "balanced_accuracy",
    "build_atlas",
    "build_atlas_from",
    "check_sae_matches",
    "client_from_env",
    "contrast",
    "estimate",
    "explain_atlas",
    "explain_offline",
    "feature_card",
    "load_tokenizer",
    "logit_effects",
    "nearest_features",
    "open_with_model",
    "parse_cues",
    "run_explain",
    "search_concept",
    "show_feature",
    "text_card",
    "top_features_for_text",
]


def write_report(*args, **kwargs):
    """See thoughtscope.atlas.report.write_report (imported lazily: it needs matplotlib)."""
    from .report import write_report as _w

    return _w(*args, **kwargs)

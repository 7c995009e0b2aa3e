"""Natural Language Autoencoders: explain an activation in words, and measure how true the words are.

An NLA is a verbalizer (AV: vector → explanation) and a reconstructor (AR: explanation → vector) for
one target model and site. The public API, as used by `thoughtscope nla data|train|explain|eval`:

    build_dataset(model, out, **DataConfig fields) -> Path          # nla data
    train_stage(nla_dir, data_dir, TrainConfig(stage=...)) -> dict   # nla train --stage ar-sft|…|ar-refit-warm
    load_nla(spec="default") -> NLA                                  # shipped, a folder, or a released pair
    explain_text(nla, text, positions=(-1,), samples=1) -> list[dict]   # nla explain
    evaluate_nla(nla, data=None, quick=True, json_path=None) -> dict    # nla eval
    steer_from_words(nla, prompt, original, edited) -> dict          # steering from edited words
"""

from .bundle import NLA, config_for
from .core import NLAConfig, NLAError, nla_loss, normalise
from .data import DataConfig, NLARows, build_dataset, harvest_rows, vector_stats
from .evaluate import bootstrap_ci, evaluate_nla, format_table, fve, fve_parts
from .explain import default_nla_path, explain_text, load_nla, steer_from_words, steering_delta
from .interop import load_released, read_sidecar
from .reconstructor import Reconstructor
from .train import TrainConfig, grpo_step, train_stage
from .verbalizer import Verbalizer, pick_marker

__all__ = [
    "NLA",
    "NLAConfig",
    "NLAError",
    "DataConfig",
    "NLARows",
    "TrainConfig",
    "Verbalizer",
    "Reconstructor",
    "build_dataset",
    "harvest_rows",
    "train_stage",
    "grpo_step",
    "load_nla",
    "explain_text",
    "evaluate_nla",
    "format_table",
    "steer_from_words",
    "steering_delta",
    "load_released",
    "read_sidecar",
    "fve",
    "fve_parts",
    "bootstrap_ci",
    "nla_loss",
    "normalise",
    "config_for",
    "pick_marker",
    "vector_stats",
    "default_nla_path",
]

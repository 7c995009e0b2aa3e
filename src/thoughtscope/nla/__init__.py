"""Natural Language Autoencoders: explain an activation in words, and measure how true the words are.

An NLA is a verbalizer (AV: vector → explanation) and a reconstructor (AR: explanation → vector) for
one target model and site. The public API, as used by `thoughtscope nla data|train|explain|eval`:

    build_dataset(model, out, **DataConfig fields) -> Path             # nla data
    train_stage(nla_dir, data_dir, NLATrainConfig(stage=...)) -> dict  # nla train --stage ar-sft|…|ar-refit-warm
    load_nla(spec="default") -> NLA                                    # shipped, a folder, or a released pair
    explain_text(nla, text, positions=(-1,), samples=1) -> list[dict]  # nla explain
    evaluate_nla(nla, data=None, quick=True, json_path=None) -> dict   # nla eval
    steer_from_words(nla, prompt, original, edited) -> dict            # steering from edited words

Names load on first use (PEP 562), so `thoughtscope.nla.config` (where the command line reads its options'
help) does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

_WHERE = {
    "NLA": "bundle",
    "config_for": "bundle",
    "DataConfig": "config",
    "NLAConfig": "config",
    "NLATrainConfig": "config",
    "NLAError": "core",
    "nla_loss": "core",
    "normalise": "core",
    "NLARows": "data",
    "build_dataset": "data",
    "harvest_rows": "data",
    "vector_stats": "data",
    "bootstrap_ci": "evaluate",
    "evaluate_nla": "evaluate",
    "format_table": "evaluate",
    "fve": "evaluate",
    "fve_parts": "evaluate",
    "default_nla_path": "explain",
    "explain_text": "explain",
    "load_nla": "explain",
    "steer_from_words": "explain",
    "steering_delta": "explain",
    "load_released": "interop",
    "read_sidecar": "interop",
    "Reconstructor": "reconstructor",
    "grpo_step": "train",
    "train_stage": "train",
    "Verbalizer": "verbalizer",
    "pick_marker": "verbalizer",
}

__all__ = [
    "NLA",
    "NLAConfig",
    "NLAError",
    "DataConfig",
    "NLARows",
    "NLATrainConfig",
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

if TYPE_CHECKING:
    from .bundle import NLA, config_for
    from .config import DataConfig, NLAConfig, NLATrainConfig
    from .core import NLAError, nla_loss, normalise
    from .data import NLARows, build_dataset, harvest_rows, vector_stats
    from .evaluate import bootstrap_ci, evaluate_nla, format_table, fve, fve_parts
    from .explain import default_nla_path, explain_text, load_nla, steer_from_words, steering_delta
    from .interop import load_released, read_sidecar
    from .reconstructor import Reconstructor
    from .train import grpo_step, train_stage
    from .verbalizer import Verbalizer, pick_marker


__getattr__, __dir__ = lazy_names(__name__, _WHERE, renamed={"TrainConfig": "NLATrainConfig"})

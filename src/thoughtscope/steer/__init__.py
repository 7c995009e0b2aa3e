"""Steering: SAE-feature and direction interventions, presets, seeded generation, vectors, calibration.

from thoughtscope.steer import clamp, add_vector, steering, generate, compare, GenerationConfig
with steering(lm, [clamp(sae, 1234, 40.0)]):
    logits = lm.model(ids).logits
compare(lm, ["Tell me about yourself."], [clamp(sae, 1234, 2.0, unit="max")], GenerationConfig(seed=0))

Names load on first use (PEP 562), so `thoughtscope.steer.config` (what the CLI reads its defaults and help
from) does not pull in torch.
"""

from __future__ import annotations

from .._lazy import lazy_names

#: exported name -> the module it lives in (relative to this package)
_WHERE = {
    "ChatSession": ".chat",
    "Comparison": ".generate",
    "FEATURE_OPS": ".interventions",
    "FeatureEdit": ".interventions",
    "FeatureScore": "..features",
    "Generation": ".generate",
    "GenerationConfig": ".config",
    "Lane": ".lanes",
    "METHODS": ".vectors",
    "NEUTRAL_PROMPTS": ".calibrate",
    "POSITIONS": ".interventions",
    "Preset": ".presets",
    "PresetItem": ".presets",
    "SCORES": "..features",
    "SteerError": ".interventions",
    "Steerer": ".interventions",
    "SteeringVector": ".vectors",
    "StepContext": ".interventions",
    "SweepFiles": ".run",
    "SweepPoint": ".calibrate",
    "SweepResult": ".calibrate",
    "TokenEvent": ".generate",
    "VECTOR_OPS": ".interventions",
    "VectorEdit": ".interventions",
    "ablate": ".interventions",
    "add_feature": ".interventions",
    "add_vector": ".interventions",
    "chat_loop": ".chat",
    "clamp": ".interventions",
    "clamp_projection": ".interventions",
    "compare": ".generate",
    "contrast_features": "..features",
    "default_sae_path": ".presets",
    "encode_prompts": ".generate",
    "evaluate": ".calibrate",
    "feature_acts": ".interventions",
    "feature_max_acts": "..features",
    "feature_preset": ".presets",
    "features_contrast": ".run",
    "find_preset": ".presets",
    "find_to_files": ".run",
    "fit_vector": ".vectors",
    "format_prompt": ".generate",
    "generate": ".generate",
    "last_token_acts": ".vectors",
    "mentions": ".calibrate",
    "pca_of_differences": ".vectors",
    "perplexity": ".calibrate",
    "plot_sweep": ".calibrate",
    "preset_from_interventions": ".presets",
    "print_comparisons": ".report",
    "print_contrast": ".report",
    "project_out": ".interventions",
    "read_lines": ".run",
    "swap": ".interventions",
    "read_pairs": ".run",
    "read_questions": ".calibrate",
    "repetition_rate": ".calibrate",
    "sae_spec": ".presets",
    "sample": ".generate",
    "save_sweep": ".calibrate",
    "scale_feature": ".interventions",
    "site_norm": ".vectors",
    "steer_with_preset": ".run",
    "steering": ".interventions",
    "stream": ".generate",
    "stream_lanes": ".lanes",
    "suggest": ".calibrate",
    "sweep": ".calibrate",
    "sweep_preset": ".calibrate",
    "sweep_to_files": ".run",
    "token_features": "..features",
    "top_features_at": "..features",
    "validate": ".interventions",
    "vector_fit": ".run",
}

__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_names(__name__, _WHERE)

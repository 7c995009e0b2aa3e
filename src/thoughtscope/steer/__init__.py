"""Steering: SAE-feature and direction interventions, presets, seeded generation, vectors, calibration.

    from thoughtscope.steer import clamp, add_vector, steering, generate, compare, GenerationConfig
    with steering(lm, [clamp(sae, 1234, 40.0)]):
        logits = lm.model(ids).logits
    compare(lm, ["Tell me about yourself."], [clamp(sae, 1234, 40.0)], GenerationConfig(seed=0))
"""
from .calibrate import (NEUTRAL_PROMPTS, SweepPoint, SweepResult, evaluate, mentions, perplexity, plot_sweep,
                        repetition_rate, save_sweep, suggest, sweep, sweep_preset)
from .chat import ChatSession, chat_loop
from .generate import (Comparison, Generation, GenerationConfig, TokenEvent, compare, encode_prompts, format_prompt,
                       generate, sample, stream)
from .lanes import Lane, stream_lanes
from .interventions import (FEATURE_OPS, POSITIONS, VECTOR_OPS, FeatureEdit, Steerer, SteerError, StepContext,
                            VectorEdit, ablate, add_feature, add_vector, clamp, clamp_projection, feature_acts,
                            project_out, scale_feature, steering, validate)
from .presets import Preset, PresetItem, default_sae_path, find_preset, preset_from_interventions
from .search import SCORES, FeatureScore, contrast_features, feature_max_acts, token_features, top_features_at
from .vectors import METHODS, SteeringVector, fit_vector, last_token_acts, pca_of_differences, site_norm

__all__ = [n for n in dir() if not n.startswith("_")]
from .run import (features_contrast, print_comparisons, print_contrast, read_lines, read_pairs, steer_with_preset,
                  vector_fit)

__all__ = [n for n in dir() if not n.startswith("_")]

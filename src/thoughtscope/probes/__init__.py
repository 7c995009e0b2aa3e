"""Probes: read a concept at a site, find where it lives, monitor it, steer with it, erase it.

from thoughtscope.probes import builtin, sweep, fit_probe, erase_check
out = sweep(lm, builtin("comparisons"), [f"resid.{i}" for i in range(30)])   # held-out AUROC + controls
probe = fit_probe(lm, builtin("cities"), out["best_site"])                    # artefact folder via .save()
with steering(lm, [probe.to_intervention(1.0)]): ...                          # one class gap along it
"""

from .causal import causal_check
from .datasets import ProbeSet, Split, control_labels, from_pairs, group_split, load_dataset
from .erase import EraseEdit, erase_check, fit_eraser, lm_loss, random_eraser
from .fitters import DEFAULT_FITTERS, FITTERS, fit, logistic_raw
from .generators import BUILTIN, builtin, resolve, tag_known_cities
from .metrics import auroc, bootstrap_auroc, recall_at_fpr, threshold_at_fpr
from .monitor import TokenScores, calibrate, neutral_texts, score_texts
from .probe import Probe, ProbeConfig, fit_probe, load_probe
from .read import EMBED, ReadConfig, read_activations, token_activations
from .sweep import SweepConfig, plot, save_json, sweep, sweep_arrays, transfer
from .weights import probe_alignment, weight_atlas

__all__ = [
    "BUILTIN",
    "DEFAULT_FITTERS",
    "EMBED",
    "EraseEdit",
    "FITTERS",
    "Probe",
    "ProbeConfig",
    "ProbeSet",
    "ReadConfig",
    "Split",
    "SweepConfig",
    "TokenScores",
    "auroc",
    "bootstrap_auroc",
    "builtin",
    "calibrate",
    "causal_check",
    "control_labels",
    "erase_check",
    "fit",
    "fit_eraser",
    "fit_probe",
    "from_pairs",
    "group_split",
    "lm_loss",
    "load_dataset",
    "load_probe",
    "logistic_raw",
    "neutral_texts",
    "plot",
    "probe_alignment",
    "random_eraser",
    "read_activations",
    "recall_at_fpr",
    "resolve",
    "save_json",
    "score_texts",
    "sweep",
    "sweep_arrays",
    "tag_known_cities",
    "threshold_at_fpr",
    "token_activations",
    "transfer",
    "weight_atlas",
]

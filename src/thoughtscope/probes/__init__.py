"""Probes: read a concept at a site, find where it lives, monitor it, steer with it, erase it.

from thoughtscope.probes import builtin, sweep, fit_probe, erase_check
out = sweep(lm, builtin("comparisons"), [f"resid.{i}" for i in range(30)])   # held-out AUROC + controls
probe = fit_probe(lm, builtin("cities"), out["best_site"])                    # artefact folder via .save()
with steering(lm, [probe.to_intervention(1.0)]): ...                          # one class gap along it

Names load on first use (PEP 562), so `thoughtscope.probes.config` (what the CLI reads its defaults from)
does not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

_WHERE = {
    "causal_check": "causal",
    "ProbeSet": "datasets",
    "Split": "datasets",
    "control_labels": "datasets",
    "from_pairs": "datasets",
    "group_split": "datasets",
    "load_dataset": "datasets",
    "EraseEdit": "erase",
    "erase_check": "erase",
    "fit_eraser": "erase",
    "lm_loss": "erase",
    "random_eraser": "erase",
    "DEFAULT_FITTERS": "fitters",
    "FITTERS": "fitters",
    "fit": "fitters",
    "logistic_raw": "fitters",
    "BUILTIN": "generators",
    "builtin": "generators",
    "resolve": "generators",
    "tag_known_cities": "generators",
    "auroc": "metrics",
    "bootstrap_auroc": "metrics",
    "recall_at_fpr": "metrics",
    "threshold_at_fpr": "metrics",
    "TokenScores": "monitor",
    "calibrate": "monitor",
    "neutral_texts": "monitor",
    "score_texts": "monitor",
    "Probe": "probe",
    "ProbeConfig": "probe",
    "fit_probe": "probe",
    "load_probe": "probe",
    "EMBED": "read",
    "ReadConfig": "read",
    "read_activations": "read",
    "token_activations": "read",
    "SweepConfig": "sweep",
    "plot": "sweep",
    "save_json": "sweep",
    "sweep": "sweep",
    "sweep_arrays": "sweep",
    "transfer": "sweep",
    "probe_alignment": "weights",
    "weight_atlas": "weights",
}

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


__getattr__, __dir__ = lazy_names(__name__, _WHERE)


if TYPE_CHECKING:
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

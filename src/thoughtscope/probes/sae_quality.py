"""An SAE's quality on the real model beyond FVU, CPU-sized: the community's metrics as one function the SAE-quality
benchmark calls for each SAE.

    from thoughtscope.probes.sae_quality import real_quality
    q = real_quality("default", "default", seed=0)      # or an SAE and a LoadedModel
    q["sparse_probing_auc"], q["absorption"], q["detection_auroc"], q["spliced_loss"]

Each part reuses the library's own path: sparse probing (`sparse_probing.py`), first-letter absorption
(`absorption.py`), the offline explanation detection AUROC of a small atlas (`atlas.build_atlas` then
`atlas.explain_offline`, the `atlas build` + `atlas explain --offline` path) and the spliced LM loss on held-out
text (`sae.run.heldout_loss`, what `sae eval` reports).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ProbeError
from .absorption import AbsorptionConfig, first_letter_absorption
from .sparse_probing import DATASETS, KS, sparse_probing


@dataclass(frozen=True)
class RealQualityConfig:
    """What `real_quality` reads and how much of it (the defaults fit a few minutes of one CPU core per part)."""

    datasets: tuple[str, ...] = DATASETS
    """Built-in probe datasets of the sparse probing (names)."""
    ks: tuple[int, ...] = KS
    """Numbers of latents (or residual coordinates) of the k-sparse probes (latents)."""
    probe_test_fraction: float = 0.25
    """Share of each probe dataset's groups held out (fraction, 0 to 1)."""
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    """First-letter absorption settings (see AbsorptionConfig; words, thresholds)."""
    corpus: str = "default"
    """Corpus of the atlas and the spliced loss (a corpus spec, as --corpus takes)."""
    atlas_tokens: int = 32_768
    """Tokens the detection atlas reads, BOS included (tokens)."""
    explain_features: int = 64
    """Alive features of the atlas explained offline and scored (features)."""
    loss_tokens: int = 8_192
    """Held-out tokens of the spliced loss (tokens)."""

    def validate(self) -> None:
        if not self.datasets or not self.ks or any(isinstance(k, bool) or int(k) < 1 for k in self.ks):
            raise ProbeError(f"RealQualityConfig needs datasets and positive ks, got {self.datasets!r}, {self.ks!r}")
        for name in ("atlas_tokens", "explain_features", "loss_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProbeError(f"RealQualityConfig.{name} must be a positive int, got {v!r}")
        self.absorption.validate()


def _training_end(sae) -> tuple[dict | None, int]:
    """The SAE's training-text record (None when its folder has none) and the token where that text ends."""
    from ..sae.run import training_text

    text = training_text(sae.source_dir) if getattr(sae, "source_dir", None) else None
    try:
        end = int(text["skip_tokens"]) + int(text["n_tokens"]) if text else 0
    except (KeyError, TypeError, ValueError):
        end = 0
    return text, end


def detection(lm, sae, cfg: RealQualityConfig, *, seed: int, folder: Path, progress: bool = False) -> dict:
    """Mean offline detection AUROC (and its shuffled control) of `explain_features` alive features of an atlas of
    `atlas_tokens` tokens of the corpus, read after the SAE's training text when its folder records it."""
    from ..atlas import AtlasConfig, build_atlas, explain_offline
    from ..atlas.heldout import ExplainConfig
    from ..corpus import Corpus

    _, end = _training_end(sae)
    plan = AtlasConfig(n_tokens=cfg.atlas_tokens, ctx_len=128, contexts_per_batch=16, seed=seed)
    skip = math.ceil(end / plan.batch_tokens) * plan.batch_tokens
    plan = AtlasConfig(n_tokens=cfg.atlas_tokens, ctx_len=128, contexts_per_batch=16, seed=seed, skip_tokens=skip)
    path = build_atlas(lm, sae, Corpus(cfg.corpus), folder / "atlas", plan, progress=progress)
    summary = explain_offline(
        path,
        tokenizer=lm.tokenizer,
        sample=cfg.explain_features,
        config=ExplainConfig(seed=seed),
        workers=1,
        progress=progress,
        kinds=("input",),
    )
    return {
        "detection_auroc": summary.get("detection_auroc_mean"),
        "detection_auroc_ci": summary.get("detection_auroc_ci"),
        "detection_auroc_shuffled": summary.get("shuffled_auroc_mean"),
        "detection_features": summary.get("ok"),
        "atlas_skip_tokens": skip,
    }


def spliced(lm, sae, cfg: RealQualityConfig) -> dict:
    """The spliced LM loss of `loss_tokens` held-out tokens (`sae.run.heldout_loss`, after the training text)."""
    from ..sae.run import heldout_loss

    text, _ = _training_end(sae)
    r, where = heldout_loss(lm, sae, cfg.corpus, cfg.loss_tokens, text)
    return {
        "spliced_loss": r["loss_sae"],
        "loss_clean": r["loss_clean"],
        "loss_recovered": r["loss_recovered"],
        "loss_recovered_vs_mean": r["loss_recovered_vs_mean"],
        "kl_sae": r["kl_sae"],
        "loss_text": where["text"],
    }


def _load(sae, model):
    from ..models import LoadedModel, load_model
    from ..sae import load_sae

    sae = load_sae(sae) if isinstance(sae, (str, Path)) else sae
    lm = model if isinstance(model, LoadedModel) else load_model(str(model))
    return sae.to(lm.device).eval(), lm


def real_quality(
    sae,
    model,
    *,
    tokens: int | None = None,
    seed: int = 0,
    config: RealQualityConfig | None = None,
    workdir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Quality of `sae` (an SAE, or a folder / "default") on `model` (a LoadedModel, or a name / "default") beyond
    FVU. `tokens`, when given, sets both the atlas's and the spliced loss's token budgets; `workdir` keeps the
    atlas (default: a temporary folder, removed). Keys (floats unless said):

    - sparse_probing_auc: held-out AUROC of k-sparse probes on mean-pooled SAE latents, mean over the ks
      (1, 2, 5, 20) and the built-in datasets (cities, translations, sentiment) — SAEBench's sparse probing;
    - sparse_probing_auc_residual: the same on the raw residual's coordinates (the baseline);
      sparse_probing_auc_residual_full: a probe on the whole residual (the ceiling);
      sparse_probing_auc_by_k / sparse_probing_auc_residual_by_k: {k: AUROC}; sparse_probing_accuracy: SAEBench's
      accuracy figure, mean over ks; sparse_probing: per dataset and k (chosen latents included);
    - absorption: SAEBench's mean absorption fraction of first-letter features, 0 (none) to 1; absorption_full:
      its full-absorption rate; absorption_centered: the same fraction with the probe projection of x − b_dec
      (what the latents carry; SAEBench projects x); absorption_detail: per letter, main latents, probe F1;
    - detection_auroc: mean offline detection AUROC of explained features of a small atlas (0.5 = chance);
      detection_auroc_shuffled: the shuffled-explanation control; detection_features: features scored;
    - spliced_loss: next-token loss with the SAE's reconstruction spliced in (nats/token), loss_clean beside it;
      loss_recovered: (L_zero − L_sae) / (L_zero − L_clean) against zero ablation (SAEBench's CE-loss score);
      loss_recovered_vs_mean: the same against mean ablation;
    - seconds: wall time of each part and the total, and the process's CPU time of each (<part>_cpu); config:
      the settings used.
    """
    cfg = config or RealQualityConfig()
    if tokens is not None:
        cfg = RealQualityConfig(**{**_shallow(cfg), "atlas_tokens": int(tokens), "loss_tokens": int(tokens)})
    cfg.validate()
    sae, lm = _load(sae, model)
    t_all, c_all = time.perf_counter(), time.process_time()
    sec: dict[str, float] = {}
    out: dict = {}

    t, c = time.perf_counter(), time.process_time()
    sp = sparse_probing(lm, sae, datasets=cfg.datasets, ks=cfg.ks, seed=seed, test_fraction=cfg.probe_test_fraction)
    out.update(
        sparse_probing_auc=sp["auc"],
        sparse_probing_auc_residual=sp["residual_auc"],
        sparse_probing_auc_residual_full=sp["residual_full_auc"],
        sparse_probing_auc_by_k=sp["auc_by_k"],
        sparse_probing_auc_residual_by_k=sp["residual_auc_by_k"],
        sparse_probing_accuracy=sp["accuracy"],
        sparse_probing=sp["datasets"],
    )
    sec["sparse_probing"], sec["sparse_probing_cpu"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    ab = first_letter_absorption(lm, sae, cfg.absorption, seed=seed)
    out.update(absorption=ab.pop("absorption"), absorption_full=ab.pop("absorption_full"))
    out.update(absorption_centered=ab.pop("absorption_centered"), absorption_detail=ab)
    sec["absorption"], sec["absorption_cpu"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="sae-quality-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        out.update(detection(lm, sae, cfg, seed=seed, folder=folder, progress=progress))
    sec["detection"], sec["detection_cpu"] = time.perf_counter() - t, time.process_time() - c

    t, c = time.perf_counter(), time.process_time()
    out.update(spliced(lm, sae, cfg))
    sec["spliced_loss"], sec["spliced_loss_cpu"] = time.perf_counter() - t, time.process_time() - c

    sec["total"] = time.perf_counter() - t_all
    sec["total_cpu"] = time.process_time() - c_all
    out["seconds"] = {k: round(v, 2) for k, v in sec.items()}
    out["config"] = asdict(cfg)
    return out


def _shallow(cfg: RealQualityConfig) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}

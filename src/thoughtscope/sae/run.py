"""`thoughtscope sae train` and `sae eval` as library calls: a data source (an activation store, or a model read
on the fly), a grid of SAE configs (every combination of the swept values) trained on one pass of it, and the
measurements of one SAE folder. The CLI parses its flags, calls `train_grid` or `evaluate_folder` and prints.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SAEError
from .config import SAEConfig, TrainConfig
from .registry import sae_class

# `evaluate_folder` reads the store in batches of EVAL_ROWS rows and the corpus for the spliced loss in batches of
# LOSS_CONTEXTS contexts of LOSS_CTX_LEN tokens; sizes only (the metrics are sums over all batches).
EVAL_ROWS = 4096
LOSS_CTX_LEN, LOSS_CONTEXTS = 128, 8


@dataclass(frozen=True)
class Source:
    """Training data and what it says about itself: an ActivationStore, or `f(start_batch)` reading a model."""

    data: Any
    d_model: int
    model: str
    site: str


@dataclass(frozen=True)
class Trained:
    """One SAE of a grid: its run name, the folder it was saved to, the SAE."""

    name: str
    folder: Path
    sae: Any


def open_source(store=None, model: str | None = None, *, site: str, corpus: str, train_cfg: TrainConfig) -> Source:
    """The store at `store`, or activations of `model` at `site` on `corpus`, computed as training reads them
    (`train_cfg.n_tokens` tokens in batches of `train_cfg.batch_size` rows, shuffled with `train_cfg.seed`)."""
    if store is not None:
        from ..store import ActivationStore

        st = ActivationStore.open(store)
        return Source(st, st.d_model, st.model, st.site)
    from ..corpus import Corpus
    from ..harvest import stream_activations
    from ..models import load_model

    lm = load_model(model)
    tc = train_cfg
    data = stream_activations(lm, Corpus(corpus), site, n_tokens=tc.n_tokens, batch_size=tc.batch_size, seed=tc.seed)
    return Source(data, lm.d_model, lm.name, str(lm.check_site(site)))


def config_grid(
    source: Source,
    *,
    arch: Sequence[str],
    k: Sequence[int],
    expansion: Sequence[int],
    l1_coeff: Sequence[float],
    l0_coeff: Sequence[float],
    max_norm_ratio: float | None = SAEConfig.max_norm_ratio,
) -> tuple[list[SAEConfig], list[str]]:
    """One SAEConfig per combination of the swept values (expansion = n_features / d_model), with its run name;
    combinations that give the same run (a value its architecture ignores) are kept once."""
    cfgs: list[SAEConfig] = []
    names: list[str] = []
    for a, kk, e, l1, l0 in itertools.product(arch, k, expansion, l1_coeff, l0_coeff):
        cfg = SAEConfig(
            arch=a,
            d_model=source.d_model,
            n_features=source.d_model * e,
            k=kk,
            l1_coeff=l1,
            l0_coeff=l0,
            model=source.model,
            site=source.site,
            max_norm_ratio=max_norm_ratio,
        )
        name = sae_class(a).run_name(cfg)
        if name not in names:
            cfgs.append(cfg)
            names.append(name)
    return cfgs, names


def train_grid(
    out: str | Path,
    *,
    store=None,
    model: str | None = None,
    site: str = "resid.15",
    corpus: str = "default",
    grid: dict[str, Sequence],
    max_norm_ratio: float | None = SAEConfig.max_norm_ratio,
    train_cfg: TrainConfig,
) -> tuple[list[Trained], float]:
    """Train every config of `grid` (keys of `config_grid`) on one pass over the source and save each SAE: one
    SAE goes to `out`, a grid to one subfolder per run. Resumable from `out/.checkpoint` unless `train_cfg`
    names its own checkpoint folder. Returns the SAEs and the training time in seconds."""
    from .train import train_saes

    out = Path(out)
    if train_cfg.checkpoint_dir is None:
        train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out / ".checkpoint"))
    source = open_source(store, model, site=site, corpus=corpus, train_cfg=train_cfg)
    cfgs, names = config_grid(source, max_norm_ratio=max_norm_ratio, **grid)
    folders = [out] if len(cfgs) == 1 else [out / n for n in names]
    t0 = time.perf_counter()
    saes = train_saes(cfgs, source.data, train_cfg, out_dirs=folders)
    seconds = time.perf_counter() - t0
    return [Trained(n, f, s) for n, f, s in zip(names, folders, saes)], seconds


def evaluate_folder(
    path: str | Path,
    *,
    store=None,
    model: str | None = None,
    corpus: str = "default",
    n_tokens: int = 200_000,
    loss_tokens: int = 16_384,
    skip_contexts: int = 0,
) -> dict:
    """Reconstruction metrics of the SAE at `path` on at most `n_tokens` store tokens, and/or its spliced
    language-model loss on `loss_tokens` corpus tokens after skipping `skip_contexts` contexts (held-out text)."""
    from .formats import load_sae
    from .metrics import evaluate_sae, spliced_lm_loss

    sae = load_sae(path)
    result: dict = {
        "sae": str(path),
        "arch": sae.cfg.arch,
        "n_features": sae.cfg.n_features,
        "excluded": "position 0 of every context (attention sink)" if sae.cfg.exclude_bos else "none",
    }
    if store is not None:
        from ..store import ActivationStore

        st = ActivationStore.open(store)
        if st.d_model != sae.cfg.d_model:
            raise SAEError(f"store {store} has d_model {st.d_model} but the SAE expects {sae.cfg.d_model}")
        batches = st.batches(
            EVAL_ROWS, shuffle=False, exclude_bos=sae.cfg.exclude_bos, max_norm_ratio=sae.cfg.max_norm_ratio
        )
        result["reconstruction"] = evaluate_sae(sae, batches, max_batches=max(1, n_tokens // EVAL_ROWS))
    if model is not None:
        from ..corpus import Corpus
        from ..models import load_model

        lm = load_model(model)
        if sae.cfg.model and sae.cfg.model != lm.name:
            raise SAEError(f"the SAE was trained on {sae.cfg.model!r}, not {lm.name!r}")
        site = lm.check_site(sae.cfg.site or "resid.15")
        ctx = Corpus(corpus).batches(lm.tokenizer, LOSS_CTX_LEN, LOSS_CONTEXTS)
        ids = (b.input_ids for i, b in enumerate(ctx) if i >= skip_contexts // LOSS_CONTEXTS)
        per_batch = LOSS_CTX_LEN * LOSS_CONTEXTS
        result["spliced"] = spliced_lm_loss(lm, sae, site, ids, max_batches=max(1, loss_tokens // per_batch))
    return result

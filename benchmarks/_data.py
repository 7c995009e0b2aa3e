"""Benchmark data: activation stores harvested with the product's own harvest, cached under the thoughtscope home.

A benchmark never names a path on somebody else's machine: it asks for "N tokens of the default model at
resid.15" and gets a store under ``$THOUGHTSCOPE_HOME/bench`` (default ``~/.cache/thoughtscope/bench``), built on
first use by :func:`thoughtscope.harvest.harvest` (so an interrupted build resumes) and reused afterwards.

Rows handed to SAE contenders follow the product's exclusion rule, the defaults of ``thoughtscope sae train``:
position 0 of every context (the attention sink) and every token whose norm is above 10x the store's median norm
(the other sinks, e.g. ``<|endoftext|>`` separators, norm ~25,000 against a median ~175) are dropped, through the
store's own filter (:meth:`ActivationStore.batches`). Train / validation / test are cut in store order at document
boundaries, so no document is split between them and the test documents are never seen in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thoughtscope.corpus import Corpus
from thoughtscope.harvest import HarvestConfig, harvest
from thoughtscope.models import DEFAULT_MODEL_NAME, LoadedModel, Site, cache_dir, load_model
from thoughtscope.store import MANIFEST_NAME, ActivationStore, StoreError

# The product's rule (``thoughtscope sae train``: exclude_bos=True, --max-norm-ratio 10).
EXCLUSION = {"exclude_bos": True, "max_norm_ratio": 10.0}


def bench_home() -> Path:
    """Where benchmark stores are cached: ``<thoughtscope home>/bench``."""
    return cache_dir() / "bench"


def store_path(model_name: str, site: str, n_tokens: int, *, ctx_len: int = 128, root: Path | None = None) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-") or "model"
    return Path(root or bench_home()) / slug / f"{site}-ctx{ctx_len}-{n_tokens}"


def ensure_store(
    n_tokens: int,
    *,
    site: str = "resid.15",
    model: str = "default",
    lm: LoadedModel | None = None,
    corpus: Corpus | None = None,
    ctx_len: int = 128,
    batch_size: int = 16,
    root: Path | None = None,
    progress: bool = True,
) -> ActivationStore:
    """The cached store of ``n_tokens`` tokens of ``model`` at ``site``, harvested (or resumed) when missing.

    ``lm`` and ``corpus`` default to ``load_model(model)`` and the default corpus; the model is loaded only when
    the store still has to be (partly) harvested.
    """
    name = lm.name if lm is not None else (DEFAULT_MODEL_NAME if model == "default" else model)
    path = store_path(name, site, n_tokens, ctx_len=ctx_len, root=root)
    if (path / MANIFEST_NAME).is_file():
        st = ActivationStore.open(path)
        if st.complete:
            return st
    lm = lm if lm is not None else load_model(model)
    cfg = HarvestConfig(n_tokens=n_tokens, ctx_len=ctx_len, contexts_per_batch=batch_size)
    if progress:
        print(
            f"building benchmark store {path} ({n_tokens:,} tokens of {lm.name} at {site}) with thoughtscope's "
            "harvest; later runs reuse it",
            flush=True,
        )
    return harvest(lm, corpus or Corpus("default"), [Site.parse(site)], path, cfg, progress=progress)[Site.parse(site)]


@dataclass
class Rows:
    """The rows every contender gets: train (store order), validation (LR choice) and test (reported figures)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    info: dict = field(default_factory=dict)


def _doc_cut(doc_ids: torch.Tensor, at: int) -> int:
    """The first document boundary at or after row ``at`` (rows of one document are contiguous in a store)."""
    n = doc_ids.shape[0]
    if at <= 0 or at >= n:
        return max(0, min(at, n))
    change = (doc_ids[at:] != doc_ids[at - 1]).nonzero()
    return at + int(change[0]) if change.numel() else n


def split_rows(store: ActivationStore, *, val_frac: float = 0.1, test_frac: float = 0.1) -> Rows:
    """All rows the product's rule keeps, cut into train / validation / test by whole documents."""
    parts, docs = [], []
    for acts, meta in store.batches(65536, shuffle=False, with_meta=True, **EXCLUSION):
        parts.append(acts.float())
        docs.append(meta["doc_id"].long())
    if not parts:
        raise StoreError(f"store {store.path} has no rows left after the exclusion rule {EXCLUSION}")
    x, doc = torch.cat(parts), torch.cat(docs)
    n = x.shape[0]
    c_val = _doc_cut(doc, round(n * (1 - val_frac - test_frac)))
    c_test = _doc_cut(doc, round(n * (1 - test_frac)))
    if not 0 < c_val < c_test < n:
        raise StoreError(
            f"store {store.path}: its {n} kept rows come from too few documents to cut train / "
            f"validation / test at whole documents (cuts at rows {c_val}, {c_test}); harvest more tokens"
        )
    median = store.median_norm
    info = {
        "store": str(store.path),
        "model": store.model,
        "site": store.site,
        "store_tokens": store.n_tokens,
        "kept_rows": n,
        "excluded_rows": store.n_tokens - n,
        "median_norm": median,
        "exclusion": {**EXCLUSION, "norm_threshold": EXCLUSION["max_norm_ratio"] * median},
        "split": "store order, cut at document boundaries",
        "train_rows": c_val,
        "val_rows": c_test - c_val,
        "test_rows": n - c_test,
        "docs": {
            "train": int(doc[:c_val].unique().numel()),
            "val": int(doc[c_val:c_test].unique().numel()),
            "test": int(doc[c_test:].unique().numel()),
        },
    }
    return Rows(x[:c_val], x[c_val:c_test], x[c_test:], info)


class ShuffledBatches:
    """The one batch sequence every contender trains on: a seeded shuffle per epoch, whole batches only.

    Batches are gathered on access (a 4096 x 576 copy costs a few ms, the same for every contender) so a run of
    several epochs does not hold every batch in memory twice.
    """

    def __init__(self, train: torch.Tensor, batch_size: int, n_steps: int, seed: int = 0):
        self.per_epoch = train.shape[0] // batch_size
        if self.per_epoch == 0:
            raise StoreError(f"{train.shape[0]} training rows are fewer than one batch of {batch_size}")
        self.train, self.batch_size, self.n_steps = train, batch_size, n_steps
        g = torch.Generator().manual_seed(seed)
        n_epochs = -(-n_steps // self.per_epoch)
        self.perms = [torch.randperm(train.shape[0], generator=g) for _ in range(n_epochs)]

    @property
    def epochs(self) -> float:
        return self.n_steps * self.batch_size / self.train.shape[0]

    def __len__(self) -> int:
        return self.n_steps

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n_steps:
            raise IndexError(i)
        e, j = divmod(i, self.per_epoch)
        return self.train[self.perms[e][j * self.batch_size : (j + 1) * self.batch_size]]

    def __iter__(self):
        return (self[i] for i in range(self.n_steps))


def race_data(
    n_tokens: int, batch_size: int, n_steps: int, *, seed: int = 0
) -> tuple[ActivationStore, Rows, ShuffledBatches]:
    """The cached store of the default model (built on first use), its train / validation / test rows, and the one
    batch sequence every run of a real-data benchmark trains on."""
    store = ensure_store(n_tokens)
    rows = split_rows(store)
    return store, rows, ShuffledBatches(rows.train, batch_size, n_steps, seed=seed)

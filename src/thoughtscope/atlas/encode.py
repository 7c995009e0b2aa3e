"""The SAE side of an atlas build: which SAE fits which model and site, and its sparse code of a batch.

The build only ever needs the non-zero (row, feature, value) triples of the code, so the dense
[tokens, n_features] matrix is never kept (for a topk SAE it is never even built).
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..models import LoadedModel, Site
from .db import AtlasError


def check_sae_matches(lm: LoadedModel, sae, site: Site | str | None = None) -> Site:
    """The SAE must have been trained on this model at this site; returns the site to read."""
    cfg = sae.cfg
    if cfg.d_model != lm.d_model:
        raise AtlasError(
            f"the SAE expects d_model={cfg.d_model} but {lm.name} has d_model={lm.d_model}: "
            f"it was trained on another model"
        )
    sae_site = Site.parse(cfg.site) if cfg.site else None
    site = Site.parse(site) if site is not None else sae_site
    if site is None:
        raise AtlasError("the SAE config names no site (cfg.site is empty); name the site to read explicitly")
    if sae_site is not None and site != sae_site:
        raise AtlasError(
            f"the SAE was trained at site {sae_site} but the atlas was asked to read {site}; "
            f"read {sae_site} or use the SAE trained for {site}"
        )
    lm.check_site(site)
    if cfg.model and not _same_content(cfg.model_source, lm.source):
        from ..sae.pretrained import same_model

        if not same_model(cfg.model, lm):  # aliases: gemma3-270m = google/gemma-3-270m = gemma-3-270m-q4_k_m
            raise AtlasError(
                f"the SAE was trained on model {cfg.model!r} but the atlas was asked to use {lm.name!r}; "
                f"load {cfg.model!r} or use an SAE trained on {lm.name}"
            )
    return site


def _same_content(recorded: dict | None, source: dict) -> bool:
    """The SAE's recorded model and the loaded one have the same content hash (a file that was moved or renamed)."""
    digest = (recorded or {}).get("sha256")
    return bool(digest) and digest == source.get("sha256")


def sae_fingerprint(sae) -> str:
    h = hashlib.sha256()
    for t in (sae.W_dec, sae.enc, sae.b_enc, sae.b_dec):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def encode_sparse(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero activations of x [N, d] as (rows, feature ids, values), row-major.

    A topk SAE never materialises its [N, n_features] code: k (value, index) pairs per row come straight
    from the encoder; other architectures encode densely and keep the non-zeros.
    """
    v, idx = sae.encode_sparse(x)  # per architecture (SAE.encode_sparse)
    return _triples(v, idx)


def _triples(v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask = v > 0
    rows = torch.arange(v.shape[0], device=v.device)[:, None].expand_as(idx)[mask]
    return rows, idx[mask], v[mask]


class SparseEncoder:
    """encode_sparse for a stream of equal-sized batches.

    For an SAE whose sparse code comes straight from its pre-activations (`sparse_native`, e.g. topk) on CPU, the
    pre-activations go into one reused [N, n_features] buffer (bit-identical to a fresh one): a fresh tensor per
    batch would cost page faults and zeroing on every batch. Any other SAE goes through `encode_sparse`.
    """

    def __init__(self, sae):
        self.sae = sae
        self.fast = sae.sparse_native and sae.W_dec.device.type == "cpu"  # e.g. topk: see SAE.sparse_native
        self.buf: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sae = self.sae
        if not self.fast or x.device.type != "cpu" or x.dtype != sae.enc.dtype:
            return encode_sparse(sae, x)
        shape = (x.shape[0], sae.cfg.n_features)
        if self.buf is None or self.buf.shape != shape:
            self.buf = torch.empty(shape, dtype=x.dtype)
        return _triples(*sae.encode_sparse(x, pre_out=self.buf))

"""NLA training rows: (activation vector, context, document id, warm-start explanation).

Positions are drawn uniformly among a document's tokens at index ≥ ``min_position`` (50 in the
published recipe, so the model has context to think about) with an RNG keyed by the document, and
the train / val / test split is by document, so held-out numbers never share a document with
training. The warm-start explanations are written from the *text* (and the target's own next-token
prediction), never from the vector (warm_start.py): they teach the AV the format and the AR a first mapping.

A dataset is a folder: ``vectors.safetensors`` (raw vectors and integer columns), ``rows.jsonl``
(explanations and context text) and ``meta.json`` (model, site, ‖μ‖², mean norm, injection_scale,
warm-start source, corpus description).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._io import atomic_save_tensors, atomic_write_text
from ..models import pad_batch, pad_id
from ..progress import ProgressBar
from .config import DataConfig
from .core import NLAError, normalise, round_scale
from .warm_start import LLM_PROMPT, llm_explanation, offline_explanation, salient_words

__all__ = [
    "CONTEXT_KEEP",
    "LLM_PROMPT",
    "SPLITS",
    "DataConfig",
    "NLARows",
    "build_dataset",
    "harvest_rows",
    "llm_explanation",
    "offline_explanation",
    "salient_words",
    "split_of",
    "vector_stats",
]

SPLITS = {"train": 0, "val": 1, "test": 2}
CONTEXT_KEEP = 16  # last tokens of context kept per row (ridge / oracle baselines)


@dataclass
class NLARows:
    """In-memory NLA rows; `vectors` are raw activations at the site."""

    vectors: torch.Tensor  # [N, d] float32
    doc_id: torch.Tensor  # [N] long
    position: torch.Tensor  # [N] index inside the document
    token_id: torch.Tensor  # [N]
    split: torch.Tensor  # [N] 0 train, 1 val, 2 test
    context_ids: torch.Tensor  # [N, CONTEXT_KEEP] last tokens up to and including the token,
    # -1 padded left
    explanations: list[str]
    contexts: list[str]  # text of the document up to and including the token (tail only)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def subset(self, which: str | torch.Tensor) -> NLARows:
        idx = (self.split == SPLITS[which]).nonzero().flatten() if isinstance(which, str) else which
        il = idx.tolist()
        return NLARows(
            self.vectors[idx],
            self.doc_id[idx],
            self.position[idx],
            self.token_id[idx],
            self.split[idx],
            self.context_ids[idx],
            [self.explanations[i] for i in il],
            [self.contexts[i] for i in il],
            dict(self.meta),
        )

    # ---------------------------------------------------------------- disk
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_tensors(
            {
                "vectors": self.vectors.float(),
                "doc_id": self.doc_id,
                "position": self.position,
                "token_id": self.token_id,
                "split": self.split,
                "context_ids": self.context_ids,
            },
            folder / "vectors.safetensors",
        )
        lines = [
            json.dumps({"explanation": e, "context": c}, ensure_ascii=False)
            for e, c in zip(self.explanations, self.contexts)
        ]
        atomic_write_text(folder / "rows.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(folder / "meta.json", json.dumps(self.meta, indent=2, sort_keys=True, default=str))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> NLARows:
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in ("vectors.safetensors", "rows.jsonl", "meta.json"):
            if not (folder / name).is_file():
                raise NLAError(
                    f"{folder / name} is missing: an NLA dataset folder holds vectors.safetensors, "
                    f"rows.jsonl and meta.json (made by `thoughtscope nla data`)"
                )
        t = load_file(str(folder / "vectors.safetensors"))
        rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
        if len(rows) != t["vectors"].shape[0]:
            raise NLAError(
                f"{folder}: rows.jsonl has {len(rows)} rows but vectors.safetensors has {t['vectors'].shape[0]}"
            )
        return cls(
            t["vectors"],
            t["doc_id"],
            t["position"],
            t["token_id"],
            t["split"],
            t["context_ids"],
            [r["explanation"] for r in rows],
            [r["context"] for r in rows],
            json.loads((folder / "meta.json").read_text()),
        )


# -------------------------------------------------------------------- statistics


def vector_stats(vectors: torch.Tensor) -> dict:
    """‖μ‖² of the unit-normalised vectors (Var = 1 − ‖μ‖²), mean norm and the injection scale it implies."""
    v = vectors.float()
    unit = normalise(v) / v.shape[-1] ** 0.5
    mu = unit.mean(0)
    norms = v.norm(dim=-1)
    mean_norm = float(norms.mean())
    return {
        "mu_sq": float(mu.pow(2).sum()),
        "var": float(1 - mu.pow(2).sum()),
        "mean_norm": mean_norm,
        "median_norm": float(norms.median()),
        "max_norm": float(norms.max()),
        "injection_scale": round_scale(mean_norm),
        "n": int(v.shape[0]),
    }


# -------------------------------------------------------------------- document split


def _doc_key(seed: int, doc_index: int) -> str:
    return hashlib.sha256(f"{seed}:{doc_index}".encode()).hexdigest()


def split_of(seed: int, doc_index: int, fractions=(0.8, 0.1, 0.1)) -> int:
    """Document-keyed split: the same document always lands in the same split."""
    u = int(_doc_key(seed, doc_index)[:8], 16) / 0xFFFFFFFF
    if u < fractions[0]:
        return 0
    return 1 if u < fractions[0] + fractions[1] else 2


# -------------------------------------------------------------------- harvesting


def _doc_token_stream(corpus, tokenizer, cfg: DataConfig) -> Iterator[tuple[int, list[int]]]:
    for i, doc in enumerate(corpus.documents()):
        if cfg.ascii_only and sum(c.isascii() for c in doc[:2000]) < 0.97 * min(len(doc), 2000):
            continue
        if len(doc) < cfg.min_position:  # quick reject: a token is at least one character
            continue
        ids = tokenizer(doc[: cfg.max_position * 12], add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.min_position:
            yield i, ids[: cfg.max_position]


def _explanation_writer(cfg: DataConfig, explain_fn: Callable[[str], str] | None):
    """(the writer's record for meta.json, write(tokenizer, context_ids, next_ids) -> explanation)."""
    if cfg.warm_start not in ("offline", "prose", "llm"):
        raise NLAError(f"warm_start must be 'offline', 'prose' or 'llm', got {cfg.warm_start!r}")
    style = "prose" if cfg.warm_start == "prose" else "fields"
    if cfg.warm_start == "llm" and explain_fn is None:
        if not (cfg.llm_endpoint and cfg.llm_model):
            raise NLAError("warm_start='llm' needs llm_endpoint and llm_model (an OpenAI-compatible server)")

        def explain_fn(text):
            return llm_explanation(
                text, endpoint=cfg.llm_endpoint, model=cfg.llm_model, api_key_env=cfg.llm_api_key_env
            )

    if cfg.warm_start in ("offline", "prose") and explain_fn is None:
        record = {
            "kind": "offline-extractive" if style == "fields" else "offline-extractive-prose",
            "recipe": "salient prefix words, model's top next tokens, quoted last words, current token"
            + (" (as sentences)" if style == "prose" else ""),
        }
    elif cfg.warm_start == "llm":
        record = {"kind": "llm", "endpoint": cfg.llm_endpoint, "model": cfg.llm_model}
    else:
        record = {"kind": "custom-function"}

    def write(tok, ctx_ids: list[int], next_ids: list[int]) -> str:
        if explain_fn is not None:
            return explain_fn(tok.decode(ctx_ids))
        return offline_explanation(
            tok, ctx_ids, next_ids, max_explanation_tokens=cfg.max_explanation_tokens, style=style
        )

    return record, write


def _read_contexts(lm, site, batch: list, cfg: DataConfig, write, out: dict[str, list]) -> None:
    """One forward pass over a batch of (doc index, context ids, positions): the site vector and the model's own
    top next tokens (the logits computed only at the chosen positions), then each row's explanation."""
    tok = lm.tokenizer
    bos = tok.bos_token_id
    x, m = pad_batch([[bos] + ids if bos is not None else ids for _, ids, _ in batch], pad_id(tok))
    off = 1 if bos is not None else 0
    with torch.inference_mode():
        base = getattr(lm.model, lm.model.base_model_prefix)
        o = base(input_ids=x.to(lm.device), attention_mask=m.to(lm.device), output_hidden_states=True, use_cache=False)
        hs = o.hidden_states[site.layer + 1]
        last = o.last_hidden_state
    for j, (doc_i, ids, positions) in enumerate(batch):
        for p in positions:
            q = p + off
            with torch.inference_mode():
                logits = lm.unembed(last[j, q][None].to(lm.unembed.weight.dtype))[0]
            ctx_ids = ids[: p + 1]
            expl = write(tok, ctx_ids, logits.topk(3).indices.tolist())
            keep = ctx_ids[-CONTEXT_KEEP:]
            out["vec"].append(hs[j, q].float().cpu())
            out["doc"].append(doc_i)
            out["pos"].append(p)
            out["tok"].append(ids[p])
            out["split"].append(split_of(cfg.seed, doc_i, cfg.split))
            out["ctx"].append([-1] * (CONTEXT_KEEP - len(keep)) + keep)
            out["expl"].append(expl)
            out["text"].append(tok.decode(ctx_ids[-48:]))


def _harvest(lm, site, corpus, cfg: DataConfig, write, progress: bool) -> dict[str, list]:
    """Rows from the corpus's documents, `cfg.contexts_per_batch` contexts per forward pass, until n_rows."""
    out: dict[str, list] = {k: [] for k in ("vec", "doc", "pos", "tok", "split", "ctx", "expl", "text")}
    bar = ProgressBar("nla data", cfg.n_rows, unit="rows", enabled=progress)
    batch: list = []
    for doc_i, ids in _doc_token_stream(corpus, lm.tokenizer, cfg):
        if cfg.only_split is not None and split_of(cfg.seed, doc_i, cfg.split) != cfg.only_split:
            continue
        rng = random.Random(_doc_key(cfg.seed, doc_i))
        cands = list(range(cfg.min_position, len(ids)))
        positions = sorted(rng.sample(cands, min(cfg.positions_per_doc, len(cands))))
        need = cfg.n_rows - len(out["vec"]) - sum(len(b[2]) for b in batch)
        if need <= 0:
            break
        positions = positions[:need]
        batch.append((doc_i, ids[: positions[-1] + 1], positions))
        if len(batch) >= cfg.contexts_per_batch:
            _read_contexts(lm, site, batch, cfg, write, out)
            batch = []
            bar.update(len(out["vec"]))
    if batch:
        _read_contexts(lm, site, batch, cfg, write, out)
    bar.update(len(out["vec"]))
    bar.close()
    return out


def harvest_rows(
    lm, cfg: DataConfig, *, corpus=None, progress: bool = True, explain_fn: Callable[[str], str] | None = None
) -> NLARows:
    """Run the target over documents and collect rows with warm-start explanations.

    One forward pass per batch of contexts gives both the site vector (``hidden_states[K+1]``) and the
    model's own next-token prediction at the chosen positions (the logits are computed only there).
    """
    from thoughtscope.corpus import Corpus

    from .core import default_site

    site = lm.check_site(cfg.site or default_site(lm.n_layers))
    corpus = corpus if corpus is not None else Corpus(cfg.corpus)
    warm, write = _explanation_writer(cfg, explain_fn)
    t0 = time.time()
    out = _harvest(lm, site, corpus, cfg, write, progress)
    if not out["vec"]:
        raise NLAError(f"no document in corpus {cfg.corpus!r} has more than {cfg.min_position} tokens")
    vectors = torch.stack(out["vec"])
    stats = vector_stats(vectors[torch.tensor(out["split"]) == 0] if 0 in out["split"] else vectors)
    meta = {
        "model": lm.name,
        "model_source": lm.source.get("spec"),
        "site": str(site),
        "d_model": lm.d_model,
        "n_layers": lm.n_layers,
        "data_config": asdict(cfg),
        "stats": stats,
        "warm_start": warm,
        "corpus": corpus.describe() if hasattr(corpus, "describe") else str(corpus),
        "harvest_seconds": round(time.time() - t0, 1),
    }
    return NLARows(
        vectors,
        torch.tensor(out["doc"]),
        torch.tensor(out["pos"]),
        torch.tensor(out["tok"]),
        torch.tensor(out["split"]),
        torch.tensor(out["ctx"]),
        out["expl"],
        out["text"],
        meta,
    )


def build_dataset(model: str = "default", out: str | os.PathLike = "nla_data", *, lm=None, **data_kwargs) -> Path:
    """`thoughtscope nla data`: harvest rows from a corpus and save them (with ‖μ‖², mean norm, injection_scale)."""
    from thoughtscope.models import load_model

    lm = lm or load_model(model)
    rows = harvest_rows(lm, DataConfig(**data_kwargs))
    return rows.save(out)

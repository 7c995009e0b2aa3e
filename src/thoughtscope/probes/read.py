"""Read a dataset's activations at every requested site in ONE forward pass per batch, cached on disk.

Which token is read is explicit (``ReadConfig.read``): the last token of the text, the mean over its tokens,
or the mean over a marked character span. With ``chat=True`` the text becomes the user turn of the model's
chat template and only the text's own tokens are read, never the template's. Position 0 and attention-sink
tokens (norm above ``sink_ratio`` × the median token norm at that site, the rule the SAE and harvest use) are
never read: "last" steps back to the previous ordinary token, "mean" leaves them out.

The cache is one activation store per site (``thoughtscope.store``; ``doc_id`` = row, ``position`` = the token
read, -1 for a mean) under a key that hashes the model, the dataset content and the read settings, so a sweep
over 30 layers and 5 fitters reads each text once, and a second sweep reads nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ProbeError
from ..models import LoadedModel, Site, cache_dir, capture, pad_batch, parse_sites
from .config import READS, ReadConfig, old_keyword  # noqa: F401  (ReadConfig: its old home)
from .datasets import ProbeSet

EMBED = "embed"  # the token embeddings (hidden_states[0]): the "layer 0" control of a sweep


def site_names(lm: LoadedModel, sites: str | Sequence[str], embed: bool = False) -> list[str]:
    """Validate sites against the model (before any forward pass) and return their names, 'embed' first."""
    if isinstance(sites, str):
        sites = [s for s in sites.split(",") if s.strip()]
    sites = list(sites)
    want_embed = embed or EMBED in sites
    rest = [s for s in sites if s != EMBED]
    names = [str(lm.check_site(s)) for s in parse_sites(rest)] if rest else []
    return ([EMBED] if want_embed else []) + names


# --------------------------------------------------------------------------- tokenising with offsets


@dataclass
class Encoded:
    ids: list[int]
    content: list[int]  # token indices that belong to the text (or its marked span), position 0 never


def _template(lm: LoadedModel, text: str) -> tuple[str, int]:
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ProbeError(f"chat=True but {lm.name}'s tokenizer has no chat template; read without chat")
    marker = "\u2063PROBE\u2063"
    full = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=False)
    start = full.index(marker)
    return full.replace(marker, text), start


def encode(lm: LoadedModel, ds: ProbeSet, cfg: ReadConfig) -> list[Encoded]:
    """Token ids per row (BOS added as `LoadedModel.tokenize` does) and the token indices of the text to read."""
    tok = lm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ProbeError(f"{lm.name}'s tokenizer is not a fast tokenizer; reading spans needs character offsets")
    bos = tok.bos_token_id
    out = []
    for i, text in enumerate(ds.texts):
        full, start = _template(lm, text) if cfg.chat else (text, 0)
        lo, hi = (start, start + len(text))
        if cfg.read == "span":
            if ds.spans[i] is None:
                raise ProbeError(f"{ds.source} row {i + 1}: read position 'span' needs a 'span' [start, end) field")
            lo, hi = start + ds.spans[i][0], start + ds.spans[i][1]
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = list(enc["input_ids"]), list(enc["offset_mapping"])
        if cfg.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids, offs = [bos] + ids, [(0, 0)] + offs
        ids, offs = ids[: cfg.max_length], offs[: cfg.max_length]
        content = [j for j, (a, b) in enumerate(offs) if j > 0 and b > a and a < hi and b > lo]
        if not content:
            raise ProbeError(
                f"{ds.source} row {i + 1}: no readable token (position 0 is never read, and the "
                f"text must fit in max_length={cfg.max_length} tokens): {text[:60]!r}"
            )
        out.append(Encoded(ids, content))
    return out


def _batch(lm: LoadedModel, rows: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_batch([r.ids for r in rows], lm.pad_id)
    return ids.to(lm.device), mask.to(lm.device)


# --------------------------------------------------------------------------- one forward pass, all sites


@contextmanager
def _embed_hook(lm: LoadedModel, out: dict):
    emb = lm.model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, o: out.__setitem__(EMBED, o.detach()))
    try:
        yield
    finally:
        handle.remove()


def forward_all(lm: LoadedModel, names: list[str], ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, T, d] at every named site from one forward pass (stopping after the deepest block needed)."""
    out: dict[str, torch.Tensor] = {}
    resid = [n for n in names if n != EMBED]
    if EMBED in names:
        with _embed_hook(lm, out):
            if resid:
                out.update({str(s): h for s, h in capture(lm, resid, ids, mask).items()})
            else:
                with torch.inference_mode():
                    lm.model.get_input_embeddings()(ids)
    else:
        out.update({str(s): h for s, h in capture(lm, resid, ids, mask).items()})
    return out


def sink_mask(h: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where a token may be read: real, not position 0, and norm <= ratio × the median ordinary norm."""
    ok = mask.bool().clone()
    ok[:, 0] = False
    norms = h.float().norm(dim=-1)
    if ok.any():
        ok &= norms <= ratio * norms[ok].median()
    return ok


def pool(h: torch.Tensor, rows: list[Encoded], ok: torch.Tensor, read: str) -> tuple[torch.Tensor, list[int]]:
    """One vector per row from [B, T, d]: the last readable content token, or the mean of readable ones."""
    vecs, pos = [], []
    for b, r in enumerate(rows):
        keep = [j for j in r.content if ok[b, j]]
        if not keep:  # every content token is a sink: fall back to the content itself rather than fail
            keep = r.content
        if read == "last":
            vecs.append(h[b, keep[-1]])
            pos.append(keep[-1])
        else:
            vecs.append(h[b, keep].float().mean(0))
            pos.append(-1)
    return torch.stack(vecs).float(), pos


# --------------------------------------------------------------------------- cache


def cache_key(lm: LoadedModel, ds: ProbeSet, cfg: ReadConfig) -> str:
    info = {
        "model": lm.name,
        "source": lm.source.get("spec"),
        "d_model": lm.d_model,
        "n_layers": lm.n_layers,
        "dataset": ds.sha256,
        # texts per pass change no number; the key keeps the old field name so existing caches still match
        "read": {
            **{k: v for k, v in asdict(cfg).items() if k != "texts_per_batch" and not (k == "add_bos" and v)},
            "batch_size": None,
        },
    }
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:20]


def _load_cached(folder: Path, names: list[str], n: int) -> dict[str, torch.Tensor]:
    from ..store import MANIFEST_NAME, ActivationStore

    got = {}
    for name in names:
        p = folder / name
        if (p / MANIFEST_NAME).is_file():
            st = ActivationStore.open(p)
            if st.complete and st.n_tokens == n:
                x, meta = st.tokens(dtype=torch.float32, with_meta=True)
                got[name] = x[meta["doc_id"].argsort()]
    return got


def read_activations(
    lm: LoadedModel,
    ds: ProbeSet,
    sites: str | Sequence[str],
    cfg: ReadConfig | None = None,
    *,
    cache: str | Path | None | bool = None,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{site name: [N, d] float32} for every site, from one forward pass per batch over the missing sites.

    cache: a folder (default $THOUGHTSCOPE_HOME/probe_acts), or False to keep nothing on disk.
    """
    from ..progress import ProgressBar
    from ..store import StoreWriter

    cfg = cfg or ReadConfig()
    names = site_names(lm, sites)
    encoded = encode(lm, ds, cfg)  # validates every row before any forward pass
    folder = None
    got: dict[str, torch.Tensor] = {}
    if cache is not False:
        folder = Path(cache) if cache not in (None, True) else cache_dir() / "probe_acts"
        folder = folder / cache_key(lm, ds, cfg)
        got = _load_cached(folder, names, len(ds))
    todo = [n for n in names if n not in got]
    if not todo:
        return {n: got[n] for n in names}
    writers = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "read.json").write_text(
            json.dumps({"model": lm.name, "dataset": ds.name, "sha256": ds.sha256, "read": asdict(cfg)}, indent=1)
        )
        for n in todo:
            if (folder / n).exists():
                shutil.rmtree(folder / n)
            writers[n] = StoreWriter(
                folder / n,
                model=lm.name,
                site=n,
                d_model=lm.d_model,
                overwrite=True,
                extra={"probe_read": asdict(cfg), "dataset_sha256": ds.sha256},
            )
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in todo}
    total = sum(len(e.ids) for e in encoded)
    bar = ProgressBar(f"reading {ds.name} at {len(todo)} sites", total, unit="tok", enabled=progress)
    done = 0
    try:
        for s in range(0, len(encoded), cfg.texts_per_batch):
            rows = encoded[s : s + cfg.texts_per_batch]
            ids, mask = _batch(lm, rows)
            acts = forward_all(lm, todo, ids, mask)
            for n in todo:
                ok = sink_mask(acts[n], mask, cfg.sink_ratio)
                vec, pos = pool(acts[n], rows, ok, cfg.read)
                vec = vec.cpu()
                parts[n].append(vec)
                if n in writers:
                    tok_ids = [r.ids[p] if p >= 0 else -1 for r, p in zip(rows, pos)]
                    writers[n].add(
                        vec,
                        {
                            "doc_id": torch.arange(s, s + len(rows)),
                            "position": torch.tensor(pos),
                            "token_id": torch.tensor(tok_ids),
                        },
                    )
            done += sum(len(r.ids) for r in rows)
            bar.update(done)
        for w in writers.values():
            w.finish()
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    got.update({n: torch.cat(v) for n, v in parts.items()})
    return {n: got[n] for n in names}


def token_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    sites: str | Sequence[str],
    *,
    texts_per_batch: int = 16,
    sink_ratio: float = 10.0,
    max_length: int = 512,
    batch_size: int | None = None,
):
    """Per text: (token ids [T], {site: [T, d]}, readable mask [T]) from one pass per `texts_per_batch` texts (for
    monitoring; `batch_size` is its old name, deprecated)."""
    per_batch = old_keyword(
        texts_per_batch, batch_size, old="batch_size", new="texts_per_batch", where="token_activations"
    )
    names = site_names(lm, sites)
    out = []
    texts = list(texts)
    for s in range(0, len(texts), per_batch):
        chunk = texts[s : s + per_batch]
        ids, mask = lm.tokenize(chunk, max_length=max_length)
        acts = forward_all(lm, names, ids, mask)
        oks = {n: sink_mask(acts[n], mask, sink_ratio) for n in names}
        for b in range(len(chunk)):
            T = int(mask[b].sum())
            ok = torch.stack([oks[n][b, :T] for n in names]).all(0)
            out.append((ids[b, :T].cpu(), {n: acts[n][b, :T].float().cpu() for n in names}, ok.cpu()))
    return out


__all__ = [
    "EMBED",
    "ReadConfig",
    "read_activations",
    "token_activations",
    "site_names",
    "forward_all",
    "sink_mask",
    "encode",
    "Site",
]

"""Search by meaning, offline: a concept word or phrase -> the features that stand for it, each hit with the evidence
of every signal and the tokens that made it match.

Signals (each a number in [0, 1] per feature; `Hit.signals`, `Hit.tokens`):

* ``tokens``: the feature fires on the query's own tokens in the atlas. The token index (`token_index`, built once
  per atlas file and kept in memory) holds, for every feature, the tokens its stored examples (top and quantile)
  fire on: every position of an example's window whose activation is at least half the example's peak, once per
  (context, position), weighted by activation / the feature's max. The score is the feature's weight on the query
  tokens over its total weight plus one (so a single weak example does not make a perfect match).
  Query tokens: the words with and without a leading space, lower case and capitalised, and simple inflections
  (-s, -es, -ies, -ed, -ing); a form that splits into several tokens gives its first piece, at half weight, when
  it starts a word and has four letters or more.
* ``neighbours``: the same index read at the query tokens' nearest tokens in the model's own input embedding
  (cosine, `n_neighbours` per token, at least `min_cosine`), each weighted by its cosine: "ocean" also finds
  features that fire on " sea" or " oceans". No second model.
* ``templates``: the model reads a few short built-in sentences with the word (`TEMPLATES`) and the same sentences
  with neutral words (`NEUTRAL`); the score is (mean peak on the word's tokens - mean peak on the neutral words'
  tokens) / the feature's max. Needs no atlas text, so it finds features for words the atlas never saw.
* ``output``: the feature's decoder direction, read through the final norm and unembedding, writes the query
  tokens: the largest z-score of a query token's logit within the feature's own logits over the vocabulary
  (`features.output_scores`), mapped to [0, 1] linearly between `OUT_Z` (0 at the first, 1 at the second).
* ``text``: the feature's stored explanation contains the word (or an inflection) as a whole word (`Atlas.search`).

Combined score = the weighted sum of the signals (`WEIGHTS`); features the atlas never saw fire are left out.
Ties go to the lower id. The weights were checked only on the tuning half of benchmarks/data/search_words.txt
(`benchmarks/search.py --tune`, a grid of 54 settings, on the full default atlas): the best tuning-half rate,
0.667, is the ceiling that held-out slice allows (no feature meets the rule for the other 8 tuning words), and
the starting weights reached it, so they were kept.

Costs: the token index is built from the examples table on first use (about 2 s for the 163,840-token default
atlas, 0.6 M examples) and kept in memory, keyed by the file's identity and modification time, so it is never
stale; it is not written beside the atlas, which is opened read-only. The embedding's hubness, the neutral
template pass and the decoder read-out are built once per model and SAE (`warm_up` builds them all). After
that a search reads the index (a millisecond), the embedding (a matrix-vector product) and runs the model once
on three short sentences; `templates=False` leaves that pass out.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AtlasError
from .db import Atlas
from .heldout import piece

__all__ = [
    "NEUTRAL",
    "OUT_Z",
    "SIGNALS",
    "TEMPLATES",
    "WEIGHTS",
    "Hit",
    "Signals",
    "TokenIndex",
    "concept_signals",
    "search_atlas",
    "search_concept",
    "token_index",
    "warm_up",
]

SIGNALS = ("tokens", "neighbours", "templates", "output", "text")
#: weight of each signal in the combined score (checked on the tuning half of the benchmark's words only)
WEIGHTS = {"tokens": 1.0, "neighbours": 0.5, "templates": 1.0, "output": 1.0, "text": 0.5}
#: output z-scores mapped to [0, 1]: OUT_Z[0] -> 0, OUT_Z[1] -> 1 (z: standard deviations of the feature's logits)
OUT_Z = (3.0, 12.0)
TEMPLATES = (
    "I saw a {w} today.",
    "We talked about the {w} for hours.",
    "She wrote a short note about the {w} and",
)
#: the nouns the templates are contrasted with (the query's own words are left out)
NEUTRAL = (
    "thing",
    "table",
    "idea",
    "person",
    "number",
    "city",
    "door",
    "paper",
    "system",
    "car",
    "music",
    "money",
    "friend",
    "hand",
    "week",
    "road",
)
MAX_QUERY_CHARS = 200


@dataclass
class Hit:
    """One feature found for a query: its combined score, every signal's score and the tokens behind each."""

    feature: int
    score: float
    signals: dict[str, float]
    tokens: dict[str, list[str]] = field(default_factory=dict)
    label: str | None = None

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "score": round(self.score, 4),
            "signals": {k: round(v, 4) for k, v in self.signals.items()},
            "tokens": self.tokens,
            "label": self.label,
        }


# ----------------------------------------------------------------------------- the token -> feature index
@dataclass
class TokenIndex:
    """For every (token, feature) pair the summed weight of the feature's examples firing on that token."""

    tok: np.ndarray  # [pairs] token ids, sorted
    feat: np.ndarray  # [pairs] feature ids
    mass: np.ndarray  # [pairs] summed activation / feature max
    total: np.ndarray  # [n_features] each feature's total weight
    alive: np.ndarray  # [n_features] bool: fired at least once in the atlas

    def scores(self, weights: dict[int, float]) -> tuple[np.ndarray, dict[int, dict[int, float]]]:
        """(score per feature, feature -> {token: contribution}) for query tokens with weights."""
        acc = np.zeros(len(self.total))
        contrib: dict[int, dict[int, float]] = {}
        for t, w in weights.items():
            lo, hi = np.searchsorted(self.tok, [t, t + 1])
            if hi <= lo:
                continue
            f, m = self.feat[lo:hi], self.mass[lo:hi] * w
            acc[f] += m
            for fi, mi in zip(f.tolist(), m.tolist()):
                contrib.setdefault(fi, {})[t] = mi
        return acc / (self.total + 1.0), contrib


_INDEX: dict[tuple, TokenIndex] = {}
_INDEX_LOCK = threading.Lock()


def _file_key(at: Atlas) -> tuple:
    st = os.stat(at.path)
    return (str(at.path), st.st_ino, st.st_mtime_ns, st.st_size, at.meta.get("created"))


def token_index(at: Atlas) -> TokenIndex:
    """The atlas's token index, built on first use (about a second per 600,000 stored examples) and kept in memory,
    keyed by the file's identity and modification time, so a rebuilt atlas gets a new one."""
    key = _file_key(at)
    with _INDEX_LOCK:
        if key not in _INDEX:
            for k in [k for k in _INDEX if k[0] == key[0]]:
                del _INDEX[k]
            _INDEX[key] = _build_index(at)
        return _INDEX[key]


def _build_index(at: Atlas) -> TokenIndex:
    with at._reading("the examples for the search index"):
        rows = at.con.execute("SELECT feature, ctx, pos, act, window FROM examples").fetchall()
        ctx_rows = at.con.execute("SELECT id, tokens FROM contexts").fetchall()
        maxes = np.asarray([r[0] for r in at.con.execute("SELECT max_act FROM features ORDER BY id")], np.float64)
        n_active = np.asarray([r[0] for r in at.con.execute("SELECT n_active FROM features ORDER BY id")])
    n = at.n_features
    if not rows:
        e = np.zeros(0, np.int64)
        return TokenIndex(e, e, np.zeros(0), np.zeros(n), n_active > 0)
    ctx_len = max(len(b) // 4 for _, b in ctx_rows)
    ctx_ids = {c: i for i, (c, _) in enumerate(ctx_rows)}
    toks = np.stack([np.frombuffer(b, np.int32) for _, b in ctx_rows])
    with at._reading("the stored example windows"):
        f = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        c = np.fromiter((ctx_ids[r[1]] for r in rows), np.int64, len(rows))
        pos = np.fromiter((r[2] for r in rows), np.int64, len(rows))
        act = np.fromiter((r[3] for r in rows), np.float64, len(rows))
        win = np.frombuffer(b"".join(r[4] for r in rows), np.float16).reshape(len(rows), -1).astype(np.float64)
    p = pos[:, None] - at.window_left + np.arange(win.shape[1])[None, :]
    keep = (p >= 0) & (p < ctx_len) & (win > 0) & (win >= 0.5 * act[:, None])
    ri, wi = np.nonzero(keep)
    ff, cc, pp, aa = f[ri], c[ri], p[ri, wi], win[ri, wi]
    _, first = np.unique((ff * len(ctx_rows) + cc) * ctx_len + pp, return_index=True)  # once per (ctx, position)
    ff, cc, pp, aa = ff[first], cc[first], pp[first], aa[first]
    w = aa / np.where(maxes[ff] > 0, maxes[ff], 1.0)
    tt = toks[cc, pp].astype(np.int64)
    pair, inv = np.unique(tt * n + ff, return_inverse=True)
    mass = np.bincount(inv, weights=w)
    return TokenIndex(pair // n, pair % n, mass, np.bincount(ff, weights=w, minlength=n), n_active > 0)


# ----------------------------------------------------------------------------- the query's tokens
def _forms(word: str) -> list[tuple[str, float]]:
    """The word's surface forms with their weight: itself 1, its inflections 0.8."""
    w = word.strip()
    low = w.lower()
    infl = [low + "s", low + "es", low + "ed", low + "ing", low + "d"]
    if low.endswith("y") and len(low) > 2:
        infl.append(low[:-1] + "ies")
    if low.endswith("e"):
        infl.append(low[:-1] + "ing")
    out = [(w, 1.0), (low, 1.0), (low[:1].upper() + low[1:], 1.0)]
    out += [(x, 0.8) for x in infl] + [(x[:1].upper() + x[1:], 0.8) for x in infl]
    return list(dict.fromkeys(out))


def query_tokens(tokenizer, query: str) -> dict[int, float]:
    """Token id -> weight for the query's words (see the module doc); a phrase's words each give theirs."""
    out: dict[int, float] = {}
    words = query.split() or [query]
    for word in words:
        for form, wt in _forms(word):
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) == 1:
                    out[int(ids[0])] = max(out.get(int(ids[0]), 0.0), wt)
                    continue
                first = tokenizer.decode([ids[0]]) if ids else ""
                if text.startswith(" ") and sum(ch.isalpha() for ch in first) >= 4:  # a word-start piece
                    out[int(ids[0])] = max(out.get(int(ids[0]), 0.0), 0.5 * wt)
    return out


_EMB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _unit_embedding(lm) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit-norm input embeddings [V, d], each token's hubness [V]: the mean of its 10 highest cosines to a fixed
    sample of 1,024 tokens), cached per model. Built once (a second or two for a 49k vocabulary)."""
    got = _EMB.get(lm.model)
    if got is None:
        E = lm.model.get_input_embeddings().weight.detach().float().cpu()
        E = E / E.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sample = torch.randint(0, E.shape[0], (min(1024, E.shape[0]),), generator=torch.Generator().manual_seed(0))
        hub = (E @ E[sample].T).topk(min(10, len(sample)), dim=1).values.mean(1)
        got = _EMB[lm.model] = (E, hub)
    return got


def _wordlike(s: str, min_letters: int = 3) -> bool:
    return sum(ch.isalpha() for ch in s) >= min_letters and all(ch.isalpha() or ch in " -'" for ch in s.strip())


def embedding_neighbours(
    lm, token_ids: dict[int, float], n_neighbours: int = 8, min_cosine: float = 0.3, min_letters: int = 3
) -> dict[int, float]:
    """Nearest word-like tokens of the query's whole-word tokens in the model's input embedding, not the query
    tokens themselves: token id -> cosine × the query token's weight. Ranked by 2·cos - hubness (CSLS), so tokens
    close to everything (untrained or rare pieces) do not crowd out the real neighbours; kept when cos >= min_cosine
    and the token is letters (a space, - or ' allowed) with at least `min_letters` of them."""
    E, hub = _unit_embedding(lm)
    base = [t for t, w in token_ids.items() if w >= 1.0 and t < E.shape[0]]
    if not base:
        return {}
    cos = E[torch.as_tensor(base)] @ E.T  # [b, V]
    _, order = (2 * cos - hub[None, :]).topk(min(n_neighbours * 4 + len(token_ids), E.shape[0]), dim=1)
    out: dict[int, float] = {}
    for r, (row_i, t) in enumerate(zip(order.tolist(), base)):
        kept = 0
        for j in row_i:
            c = float(cos[r, j])
            if kept >= n_neighbours:
                break
            if j in token_ids or c < min_cosine or not _wordlike(piece(lm.tokenizer, j), min_letters):
                continue
            kept += 1
            out[j] = max(out.get(j, 0.0), c * token_ids[t])
    return out


# ----------------------------------------------------------------------------- the signals that run the model
def _word_positions(tokenizer, bos: bool, template: str, word: str) -> tuple[str, list[int]]:
    """The template up to and with the word (a causal model's activations on the word do not depend on what
    follows, so the rest is not read), and the positions of the word's tokens (BOS counted when added). The space
    before the word goes with it, as the tokenizer reads it."""
    prefix = template.split("{w}")[0]
    lead = " " if prefix.endswith(" ") else ""
    prefix = prefix[: len(prefix) - len(lead)]
    n0 = len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
    n1 = len(tokenizer(prefix + lead + word, add_special_tokens=False)["input_ids"])
    shift = 1 if bos else 0
    return prefix + lead + word, list(range(n0 + shift, max(n1, n0 + 1) + shift))


def _template_peaks(lm, sae, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(peak [words, templates, n_features] of each feature on the word's tokens in each template, the token id
    at that peak [words, templates, n_features]), one batched pass."""
    from ..features import features_on_texts

    tok = lm.tokenizer
    bos = tok.bos_token_id is not None
    rows = [_word_positions(tok, bos, t, w) for w in words for t in TEMPLATES]
    peaks, at = [], []
    for t, (_, ps) in zip(features_on_texts(lm, sae, [r[0] for r in rows], texts_per_batch=32), rows):
        ps = [p for p in ps if p < len(t.token_ids)] or [len(t.token_ids) - 1]
        v, i = t.acts[ps].float().cpu().max(0)
        peaks.append(v.numpy())
        at.append(np.asarray(t.token_ids)[np.asarray(ps)[i.numpy()]])
    shape = (len(words), len(TEMPLATES), -1)
    return np.stack(peaks).reshape(shape), np.stack(at).reshape(shape)


_NEUTRAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _neutral_means(lm, sae) -> np.ndarray:
    """[NEUTRAL, n_features]: each feature's mean peak over the templates on each neutral noun, cached per SAE."""
    got = _NEUTRAL.get(sae)
    if got is None or got[0] is not lm.model:
        got = _NEUTRAL[sae] = (lm.model, _template_peaks(lm, sae, list(NEUTRAL))[0].mean(1))
    return got[1]


@torch.no_grad()
def template_scores(lm, sae, query: str, maxes: np.ndarray) -> tuple[np.ndarray, dict[int, list[str]]]:
    """(score per feature, feature -> the word's tokens it fired on) from the built-in template sentences: the
    feature's mean peak on the word minus the 75th percentile over the neutral nouns (the query's own words left
    out) of its mean peak on each, over the feature's max."""
    P, at = _template_peaks(lm, sae, [query])
    word = P[0].mean(0)
    qw = {w.lower() for w in query.split()}
    keep = [i for i, nw in enumerate(NEUTRAL) if nw not in qw]
    base = np.percentile(_neutral_means(lm, sae)[keep], 75, axis=0)
    scale = np.maximum(maxes[: len(word)], P[0].max(0))
    s = np.clip((word - base) / np.where(scale > 0, scale, 1.0), 0.0, 1.0)
    fired: dict[int, list[str]] = {}
    for f in np.nonzero(s > 0)[0].tolist():
        ids = {int(at[0, j, f]) for j in range(len(TEMPLATES)) if P[0, j, f] > 0}
        fired[f] = sorted({piece(lm.tokenizer, i) for i in ids})
    return s, fired


_OUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def _readout(lm, sae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W read through the final norm, vocab mean of each feature's logits, their std, the unembedding), cached."""
    from ..features import norm_scale

    got = _OUT.get(sae)
    if got is not None and got[0] is lm.unembed.weight:
        return got[1]
    U = lm.unembed.weight.detach().float().cpu()
    mu = U.mean(0)
    Uc = U - mu
    cov = Uc.T @ Uc / U.shape[0]
    g = norm_scale(lm.final_norm)
    W = sae.W_dec.detach().float().cpu()
    W = W * g.cpu() if g is not None else W
    mean = W @ mu
    std = ((W @ cov) * W).sum(1).clamp_min(1e-12).sqrt()
    _OUT[sae] = (lm.unembed.weight, (W, mean, std, U))
    return W, mean, std, U


def output_scores(lm, sae, token_ids: dict[int, float]) -> tuple[np.ndarray, dict[int, list[str]]]:
    """(score per feature, feature -> the query tokens it writes at z >= OUT_Z[0]) from the decoder directions."""
    W, mean, std, U = _readout(lm, sae)
    ids = [t for t in token_ids if t < U.shape[0]]
    if not ids:
        return np.zeros(W.shape[0]), {}
    z = ((W @ U[torch.as_tensor(ids)].T - mean[:, None]) / std[:, None]).numpy()  # [n_features, c]
    zw = z * np.asarray([token_ids[t] for t in ids])[None, :]
    best = zw.max(1)
    s = np.clip((best - OUT_Z[0]) / (OUT_Z[1] - OUT_Z[0]), 0.0, 1.0)
    writes: dict[int, list[str]] = {}
    for f in np.nonzero(s > 0)[0].tolist():
        order = np.argsort(-zw[f])
        writes[f] = [piece(lm.tokenizer, ids[j]) for j in order[:4] if zw[f, j] >= OUT_Z[0]]
    return s, writes


def _variants_re(query: str) -> re.Pattern:
    alts = [re.escape(f) for w in query.split() for f, _ in _forms(w)]
    return re.compile(r"(?<![\w])(" + "|".join(sorted(set(alts), key=len, reverse=True)) + r")(?![\w])", re.I)


def text_scores(at: Atlas, query: str, n: int) -> tuple[np.ndarray, dict[int, list[str]]]:
    """1 for features whose explanation holds the query's words (or inflections) as whole words."""
    s = np.zeros(n)
    found: dict[int, list[str]] = {}
    pat = _variants_re(query)
    terms = " ".join(dict.fromkeys(f for w in query.split() for f, _ in _forms(w)))
    rows = at.search(terms, limit=200) or at.search(query, limit=200)
    for f, expl in rows:
        m = sorted({x.lower() for x in pat.findall(expl)})
        if m:
            s[f], found[f] = 1.0, m
    return s, found


# ----------------------------------------------------------------------------- the search
def check_query(query) -> str:
    """The query stripped; a clear error for anything that is not a word or a short phrase."""
    if not isinstance(query, str):
        raise AtlasError(f"the search query must be text, got {type(query).__name__}")
    q = " ".join(query.split())
    if not q:
        raise AtlasError("the search query is empty: give a word or a short phrase, e.g. 'ocean'")
    if len(q) > MAX_QUERY_CHARS:
        raise AtlasError(f"the search query has {len(q)} characters; the limit is {MAX_QUERY_CHARS} (a word or phrase)")
    return q


@dataclass
class Signals:
    """Every signal's score for every feature for one query, and the tokens behind each (`concept_signals`)."""

    query: str
    scores: dict[str, np.ndarray]  # signal -> [n_features] in [0, 1]
    evidence: dict[str, dict]  # signal -> feature -> {token id: contribution} (index signals) or [token texts]
    alive: np.ndarray  # [n_features] fired at least once in the atlas

    def combined(self, weights: dict[str, float] | None = None) -> np.ndarray:
        """The combined score of every feature: the weighted sum of the signals, 0 for features never seen firing."""
        w = {**WEIGHTS, **(weights or {})}
        return np.where(self.alive, sum(w[s] * self.scores[s] for s in SIGNALS), 0.0)

    def top(self, k: int, weights: dict[str, float] | None = None) -> list[tuple[int, float]]:
        """(feature, combined score) of the k best with a positive score; ties to the lower id."""
        total = self.combined(weights)
        order = np.lexsort((np.arange(len(total)), -total))[:k]
        return [(int(f), float(total[f])) for f in order if total[f] > 0]


def concept_signals(
    lm, sae, atlas: Atlas, query: str, *, templates: bool = True, n_neighbours: int = 8, tokenizer=None
) -> Signals:
    """Every signal of the module doc for `query` (`templates=False` skips the one model pass). With `lm` and
    `sae` None (an atlas whose SAE cannot be loaded), only the atlas's own signals, tokens (the query read with
    `tokenizer`) and text; the others are 0."""
    q = check_query(query)
    n = atlas.n_features
    tok = lm.tokenizer if lm is not None else tokenizer
    if tok is None:
        raise AtlasError(f"searching {atlas.path} needs its model's tokenizer, and none was found")
    if sae is not None and int(sae.W_dec.shape[0]) != n:
        raise AtlasError(f"the atlas {atlas.path} has {n} features but the SAE has {int(sae.W_dec.shape[0])}")
    idx = token_index(atlas)
    qt = query_tokens(tok, q)
    model = lm is not None and sae is not None
    nb = embedding_neighbours(lm, qt, n_neighbours) if model and n_neighbours else {}
    s_tok, c_tok = idx.scores(qt)
    s_nb, c_nb = idx.scores(nb)
    s_tpl, t_tpl = template_scores(lm, sae, q, _maxima(atlas)) if model and templates else (np.zeros(n), {})
    s_out, t_out = output_scores(lm, sae, {**nb, **qt}) if model else (np.zeros(n), {})
    s_txt, t_txt = text_scores(atlas, q, n)
    return Signals(
        q,
        {"tokens": s_tok, "neighbours": s_nb, "templates": s_tpl, "output": s_out, "text": s_txt},
        {"tokens": c_tok, "neighbours": c_nb, "templates": t_tpl, "output": t_out, "text": t_txt},
        idx.alive,
    )


def search_concept(
    lm,
    sae,
    atlas: Atlas,
    query: str,
    k: int = 20,
    *,
    templates: bool = True,
    weights: dict[str, float] | None = None,
    n_neighbours: int = 8,
    tokenizer=None,
) -> list[Hit]:
    """The k features that best stand for the concept `query`, best first (see the module doc for the signals and
    the rule that combines them). `templates=False` skips the one model pass (the other signals read only the
    atlas and the weights). `weights` overrides `WEIGHTS` per signal. `lm` and `sae` None: the atlas's own
    signals only (see `concept_signals`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise AtlasError(f"k must be a positive integer, got {k!r}")
    sig = concept_signals(lm, sae, atlas, query, templates=templates, n_neighbours=n_neighbours, tokenizer=tokenizer)
    tok = lm.tokenizer if lm is not None else tokenizer

    def shown(ev) -> list[str]:
        if isinstance(ev, list):
            return ev
        return [piece(tok, t) for t, _ in sorted(ev.items(), key=lambda x: -x[1])[:4]]

    hits = []
    for f, score in sig.top(k, weights):
        per = {s: float(sig.scores[s][f]) for s in SIGNALS}
        tokens = {s: shown(sig.evidence[s].get(f, [])) for s in SIGNALS if per[s] > 0}
        hits.append(Hit(f, score, per, tokens, _label(atlas, f)))
    return hits


_MAX: dict[tuple, np.ndarray] = {}


def _maxima(at: Atlas) -> np.ndarray:
    key = _file_key(at)
    if key not in _MAX:
        with at._reading("the features' maxima"):
            _MAX[key] = np.asarray([r[0] for r in at.con.execute("SELECT max_act FROM features ORDER BY id")], float)
    return _MAX[key]


def _label(at: Atlas, f: int) -> str | None:
    e = at.explanation(f)
    return e["explanation"] if e and e.get("status") == "ok" else None


def search_atlas(path, query: str, k: int = 20, *, templates: bool = True) -> tuple[Atlas, list[Hit], str | None]:
    """(atlas, hits, note) for the atlas folder at `path`: with its model and SAE (`query.open_with_model`) when
    it records where its SAE is, else with its own signals only and a note saying so (what `features search` does)."""
    from .cards import load_tokenizer
    from .query import open_with_model

    q = check_query(query)
    at = Atlas.open(path)
    if at.meta.get("sae_path"):
        at.close()
        at, lm, sae = open_with_model(path)
        return at, search_concept(lm, sae, at, q, k=k, templates=templates), None
    note = f"{at.path} records no SAE (built from one in memory): only its own signals, tokens and text, were used"
    return at, search_concept(None, None, at, q, k=k, tokenizer=load_tokenizer(at)), note


def warm_up(lm, sae, atlas: Atlas | None = None) -> None:
    """Build every cache a first search would (the atlas's token index, the embedding's hubness, the neutral
    template pass, the decoder read-out), so a server can pay for them in the background before the first query."""
    if atlas is not None:
        token_index(atlas)
        _maxima(atlas)
    _unit_embedding(lm)
    _neutral_means(lm, sae)
    _readout(lm, sae)

"""SAE features seen from both sides: what fires on a text, and what a feature writes.

Input side: `token_features` (every kept token's activations), `top_features_at` (one token),
`contrast_features` (a concept's prompts against controls). Output side: `logit_effects` (each decoder
row read through the final norm and unembedding) and `output_features` (features whose decoder writes a
concept's tokens). In small models the two sides often disagree: a feature that fires on bridge text
need not make the model write about bridges, which is why steering searches rank by both.

The "× max" unit: `feature_max` returns the one reference used by sliders, presets and the web page: an
atlas's max when one is given, else the maxima stored with the SAE (`sae.stats`, measured over a corpus
by `measure_feature_stats`). `feature_max_acts` measures a max on a few texts and is labelled as such.

"Features on a text" has one path, `features_on_texts` (`features_on_text` for one text): the model's own
tokenisation (`LoadedModel.tokenize`: BOS prepended once where the model has one, no truncation), one forward
pass to the SAE's site, one encode. The analyzer, the atlas's text queries, the CLI and every function here
read features through it. Its position-0 rule (`excludes_position_0`) follows the SAE's config: position 0
(the BOS token, or the text's first token where the model has no BOS: the attention sink either way) is not
read when `sae.cfg.exclude_bos` is true, the training default and what an SAE whose config records nothing is
taken to do; its features are zero there, per-text summaries skip it, and so they skip padding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .documents import read_prompts
from .errors import FeatureError  # noqa: F401  (re-exported: their old home)
from .models import LoadedModel, Site, capture
from .progress import ProgressBar
from .renamed import warn_renamed
from .sae.stats import FeatureStats

SCORES = {
    "z": "(mean max-activation on prompts - mean on controls) / (pooled std + eps), per-text maxima",
    "freq": "fraction of prompts where the feature fires - fraction of controls where it fires",
    "max": "(mean max-activation on prompts - mean on controls) / the feature's max activation",
}


@dataclass
class FeatureScore:
    feature: int
    score: float
    mean_prompts: float = 0.0
    mean_controls: float = 0.0
    freq_prompts: float = 0.0
    freq_controls: float = 0.0


def _site(lm: LoadedModel, sae, site) -> Site:
    site = site or getattr(getattr(sae, "cfg", None), "site", None)
    if not site:
        raise FeatureError("no site given and the SAE's config names none")
    return lm.check_site(site)


def _texts(name: str, texts) -> list[str]:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise FeatureError(f"{name} must be a non-empty list of strings")
    return list(texts)


# ----------------------------------------------------------------------------- features on a text
def excludes_position_0(sae) -> bool:
    """The one position-0 rule: the SAE does not read position 0 when its config says it was trained without it
    (`cfg.exclude_bos`; SAELens folders record it as `exclude_special_tokens`). A config that records nothing
    counts as excluding it, the training default."""
    return bool(getattr(getattr(sae, "cfg", None), "exclude_bos", True))


@dataclass
class TextFeatures:
    """One text as the SAE reads it (`features_on_texts`)."""

    token_ids: list[int]
    """Every token the model read, BOS first where the model has one; no padding."""
    x: torch.Tensor
    """[T, d_model] activations at the SAE's site, in the SAE's dtype and on its device."""
    encoded: torch.Tensor
    """[T, n_features] the SAE's encoding of every position, excluded ones too (what its reconstruction uses)."""
    excluded: list[int]
    """Positions the SAE does not read (`excludes_position_0`): [0] or []."""
    sites: dict[Site, torch.Tensor] = field(default_factory=dict)
    """[T, d_model] activations at each of the other sites asked for (`also_sites`), as captured."""

    @functools.cached_property
    def acts(self) -> torch.Tensor:
        """[T, n_features] float32 on the SAE's device: the features that fire, zero at the excluded positions."""
        a = self.encoded.float().clone()
        a[self.excluded] = 0
        return a

    @property
    def kept(self) -> list[int]:
        """The positions the SAE reads."""
        return [p for p in range(len(self.token_ids)) if p not in self.excluded]


def _check_lengths(lm: LoadedModel, n_tokens: torch.Tensor, first: int, max_text_tokens: int | None) -> None:
    for j, n in enumerate(n_tokens.tolist()):
        which = "text" if first == 0 and len(n_tokens) == 1 else f"text {first + j}"
        if max_text_tokens is not None and n > max_text_tokens:
            raise FeatureError(f"{which} has {n} tokens; the limit is {max_text_tokens}: shorten it")
        if n > lm.max_context:
            raise FeatureError(f"{which} has {n} tokens but {lm.name} reads at most {lm.max_context}")


def features_on_texts(
    lm: LoadedModel,
    sae,
    texts: Sequence[str],
    *,
    site: str | Site | None = None,
    texts_per_batch: int = 8,
    max_text_tokens: int | None = None,
    also_sites: Sequence[str | Site] = (),
) -> Iterator[TextFeatures]:
    """The one path from text to SAE features: one `TextFeatures` per text, in order, `texts_per_batch` texts per
    forward pass (padding masked, then dropped). `site` defaults to the SAE's; `also_sites` are captured in the
    same pass. A text over `max_text_tokens` tokens, or over the model's context, raises FeatureError (checked
    before any forward pass of its batch), as does a blank one."""
    site = _site(lm, sae, site)
    texts = _texts("texts", texts)
    for i, t in enumerate(texts):
        if not t.strip():
            raise FeatureError(f"text {i} is empty")
    if isinstance(texts_per_batch, bool) or not isinstance(texts_per_batch, int) or texts_per_batch < 1:
        raise FeatureError(f"texts_per_batch must be a positive int, got {texts_per_batch!r}")
    extra = [lm.check_site(s) for s in also_sites]
    return _encode_batches(lm, sae, site, texts, texts_per_batch, max_text_tokens, extra)


@torch.no_grad()
def _encode_batches(lm, sae, site: Site, texts, texts_per_batch, max_text_tokens, extra) -> Iterator[TextFeatures]:
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    sites = sorted({site, *extra}, key=str)
    for i in range(0, len(texts), texts_per_batch):
        ids, mask = lm.tokenize(texts[i : i + texts_per_batch])
        keep = mask.bool()
        _check_lengths(lm, keep.sum(1), i, max_text_tokens)
        acts = capture(lm, sites, ids, mask)
        for b in range(ids.shape[0]):
            x = acts[site][b][keep[b]].to(dev, dt)
            yield TextFeatures(
                token_ids=ids[b][keep[b]].tolist(),
                x=x,
                encoded=sae.encode(x),
                excluded=[0] if excludes_position_0(sae) else [],
                sites={s: acts[s][b][keep[b]] for s in extra},
            )


def features_on_text(
    lm: LoadedModel,
    sae,
    text: str,
    *,
    site: str | Site | None = None,
    max_text_tokens: int | None = None,
    also_sites: Sequence[str | Site] = (),
) -> TextFeatures:
    """`features_on_texts` for one text."""
    if not isinstance(text, str):
        raise FeatureError(f"text must be a string, got {type(text).__name__}")
    return next(features_on_texts(lm, sae, [text], site=site, max_text_tokens=max_text_tokens, also_sites=also_sites))


# ----------------------------------------------------------------------------- input side
def token_features(
    lm: LoadedModel,
    sae,
    site: str | Site | None,
    texts: Sequence[str],
    *,
    texts_per_batch: int = 8,
    contexts_per_batch: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per text: (activations [T, n_features] of the positions the SAE reads, their ids [T]), on the CPU:
    `features_on_texts` without the excluded position. `contexts_per_batch` is the deprecated name of
    `texts_per_batch`."""
    if contexts_per_batch is not None:
        warn_renamed("contexts_per_batch", "texts_per_batch", "token_features")
        texts_per_batch = contexts_per_batch
    out = []
    for t in features_on_texts(lm, sae, texts, site=site, texts_per_batch=texts_per_batch):
        kept = torch.tensor(t.kept, dtype=torch.long)
        out.append((t.acts.cpu()[kept], torch.tensor(t.token_ids, dtype=torch.long)[kept]))
    return out


def per_text_max(lm: LoadedModel, sae, site, texts: Sequence[str]) -> torch.Tensor:
    """[n_texts, n_features]: each feature's largest activation in each text."""
    n = int(sae.W_dec.shape[0])
    return torch.stack([f.max(0).values if len(f) else torch.zeros(n) for f, _ in token_features(lm, sae, site, texts)])


def contrast_features(
    lm: LoadedModel,
    sae,
    site: str | Site | None,
    prompts: Sequence[str],
    controls: Sequence[str],
    *,
    score: str = "z",
    top: int = 20,
    max_control_rate: float = 0.5,
    maxima: torch.Tensor | None = None,
) -> list[FeatureScore]:
    """Features most active on `prompts` and least on `controls`, best first (scores: `SCORES`).

    A feature that fires on more than `max_control_rate` of the controls is not ranked: it responds to
    something every text has (a format, a position), and with few texts a z-score can still favour it.
    score="max" divides by `maxima` (default: `feature_max(sae)`), at least the max seen on these texts.
    """
    if score not in SCORES:
        raise FeatureError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if not 0 <= max_control_rate <= 1:
        raise FeatureError(f"max_control_rate must be in [0, 1], got {max_control_rate}")
    a = per_text_max(lm, sae, site, _texts("prompts", prompts))
    c = per_text_max(lm, sae, site, _texts("controls", controls))
    ma, mc = a.mean(0), c.mean(0)
    fa, fc = (a > 0).float().mean(0), (c > 0).float().mean(0)
    if score == "z":
        both = torch.cat([a, c])
        fired = both[both > 0]
        eps = max(0.01 * float(fired.median()) if fired.numel() else 1e-6, 1e-12)
        s = (ma - mc) / ((a.var(0, unbiased=False) + c.var(0, unbiased=False)) / 2).sqrt().add(eps)
    elif score == "freq":
        span = float((ma - mc).abs().max()) or 1.0
        s = (fa - fc) + 1e-3 * (ma - mc) / span
    else:
        m = maxima
        if m is None:
            ref = feature_max(sae)
            m = ref.values if ref is not None else None
        seen = torch.maximum(a.max(0).values, c.max(0).values)
        m = seen if m is None else torch.maximum(torch.as_tensor(m, dtype=torch.float32).cpu(), seen)
        s = (ma - mc) / m.clamp_min(1e-12) + 1e-6 * fa
    s = torch.where(fc > max_control_rate, torch.full_like(s, -math.inf), s)
    order = [int(i) for i in s.argsort(descending=True)[:top] if math.isfinite(float(s[i]))]
    return [FeatureScore(i, float(s[i]), float(ma[i]), float(mc[i]), float(fa[i]), float(fc[i])) for i in order]


def contrast_prompt_files(
    lm: LoadedModel,
    sae,
    prompts: str | Path,
    controls: str | Path,
    *,
    site: str | Site | None = None,
    atlas=None,
    score: str | None = None,
    top: int = 20,
    max_control_rate: float = 0.5,
) -> tuple[str, list[FeatureScore]]:
    """`contrast_features` on two prompt files (`documents.read_prompts`: a .json list, .jsonl, or one prompt per
    line), with the reference maxima of `feature_max(sae, atlas)`. `score` defaults to "max" when an atlas is
    given, else "z". Returns (the score used, the ranked features)."""
    score = score or ("max" if atlas is not None else "z")
    ref = feature_max(sae, atlas)
    rows = contrast_features(
        lm,
        sae,
        site,
        read_prompts(prompts),
        read_prompts(controls),
        score=score,
        top=top,
        max_control_rate=max_control_rate,
        maxima=ref.values if ref is not None else None,
    )
    return score, rows


def top_features_at(
    lm: LoadedModel, sae, site: str | Site | None, text: str, token: int | str = -1, *, top: int = 10
) -> tuple[str, list[tuple[int, float]]]:
    """The strongest features at one token: an index (negative from the end; BOS not counted) or a
    substring (the last token containing it). Returns (the token's text, [(feature, activation)]).
    A token at a position the SAE does not read (`excludes_position_0`) raises FeatureError."""
    t = features_on_text(lm, sae, text, site=site)
    shift = len(t.token_ids) - len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # 1: a BOS prepended
    from .display import piece_of_position, token_texts

    own = t.token_ids[shift:]
    pieces = token_texts(lm.tokenizer, own)  # whole characters, on the last token of each (the others "")
    if isinstance(token, str):
        hits = [i for i, p in enumerate(pieces) if token.strip() and token.strip() in p]
        if not hits:
            raise FeatureError(f"no token of the text contains {token!r}; tokens are {pieces}")
        idx = hits[-1]
    else:
        if not -len(pieces) <= token < len(pieces):
            raise FeatureError(f"token index {token} is out of range for a text of {len(pieces)} tokens")
        idx = token % len(pieces)
    if idx + shift in t.excluded:
        raise FeatureError(
            f"token {idx} ({pieces[idx]!r}) is position 0, the attention sink, which this SAE does not read"
        )
    f = t.acts[idx + shift].cpu()
    vals, fi = f.topk(min(top, f.numel()))
    return piece_of_position(lm.tokenizer, own, idx).text, [(int(i), float(v)) for i, v in zip(fi, vals) if v > 0]


# ----------------------------------------------------------------------------- output side
def norm_scale(final_norm) -> torch.Tensor | None:
    """The per-dimension scale the final norm applies (Gemma-style norms scale by 1 + weight)."""
    w = getattr(final_norm, "weight", None) if final_norm is not None else None
    if w is None:
        return None
    w = w.detach().float()
    return 1.0 + w if "gemma" in type(final_norm).__name__.lower() else w


def _read_out(lm: LoadedModel, W: torch.Tensor) -> torch.Tensor:
    g = norm_scale(lm.final_norm)
    W = W.detach().float().cpu()
    return W * g.cpu() if g is not None else W


@torch.no_grad()
def logit_effects(lm: LoadedModel, W_dec: torch.Tensor, k: int = 10, chunk: int = 512):
    """Top-k positive and negative direct logit effects of each decoder row (through the norm's scale)."""
    U = lm.unembed.weight.detach().float().cpu()  # [V, d]
    W = _read_out(lm, W_dec)
    pos_v, pos_i, neg_v, neg_i = [], [], [], []
    k = min(k, U.shape[0])
    for s in range(0, W.shape[0], chunk):
        L = W[s : s + chunk] @ U.T
        v, i = L.topk(k, dim=1)
        pos_v.append(v), pos_i.append(i)
        v, i = L.topk(k, dim=1, largest=False)
        neg_v.append(v), neg_i.append(i)
    return torch.cat(pos_i), torch.cat(pos_v), torch.cat(neg_i), torch.cat(neg_v)


def concept_token_ids(tokenizer, keywords: Sequence[str]) -> list[int]:
    """Token ids a model emits to start writing any keyword: with and without a leading space, lower
    case and capitalised. A keyword that splits into pieces contributes its first piece when that piece
    has at least 3 letters (" bri" for " bridges"), so it is not a generic fragment."""
    out: list[int] = []
    for kw in keywords:
        kw = kw.strip()
        if not kw:
            continue
        for form in dict.fromkeys((kw, kw.lower(), kw[:1].upper() + kw[1:])):  # ordered: the same in any process
            for text in (form, " " + form):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if not ids:
                    continue
                first = tokenizer.decode([ids[0]]).strip()
                if (len(ids) == 1 or sum(ch.isalpha() for ch in first) >= 3) and ids[0] not in out:
                    out.append(int(ids[0]))
    return out


@torch.no_grad()
def output_scores(lm: LoadedModel, directions: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """How strongly each direction [n, d] writes the tokens: the mean, over the tokens, of the token's
    direct logit as a z-score within that direction's logits over the whole vocabulary.

    Exact without forming the [n, vocab] logits: for w read through the final norm, the vocabulary mean
    is w·ū and the variance wᵀΣw, with ū and Σ the mean and covariance of the unembedding rows.
    """
    if not len(token_ids):
        raise FeatureError("no concept tokens to score against (the keywords produced no token ids)")
    U = lm.unembed.weight.detach().float().cpu()
    mu = U.mean(0)
    Uc = U - mu
    cov = Uc.T @ Uc / U.shape[0]
    W = _read_out(lm, directions)
    mean = W @ mu
    std = ((W @ cov) * W).sum(1).clamp_min(1e-12).sqrt()
    tok = U[torch.as_tensor(list(token_ids), dtype=torch.long)]  # [c, d]
    return ((W @ tok.T - mean[:, None]) / std[:, None]).mean(1)


def output_features(lm: LoadedModel, sae, token_ids: Sequence[int], *, top: int = 20) -> list[FeatureScore]:
    """Features whose decoder direction most promotes the tokens, best first (score: `output_scores`)."""
    s = output_scores(lm, sae.W_dec, token_ids)
    v, i = s.topk(min(top, s.numel()))
    return [FeatureScore(int(n), float(x)) for n, x in zip(i, v)]


# ----------------------------------------------------------------------------- the "× max" reference
@dataclass
class FeatureMax:
    values: torch.Tensor  # [n_features]
    source: str  # where the maxima come from, in words


def feature_max(sae, atlas=None) -> FeatureMax | None:
    """The reference max of every feature: the atlas's when given, else the one stored with the SAE."""
    n = int(sae.W_dec.shape[0])
    if atlas is not None:
        if atlas.n_features != n:
            raise FeatureError(f"the atlas has {atlas.n_features} features but the SAE has {n}")
        vals = torch.tensor([r[0] for r in atlas.con.execute("SELECT max_act FROM features ORDER BY id")])
        return FeatureMax(vals.float(), f"atlas {atlas.path}")
    st: FeatureStats | None = getattr(sae, "feature_stats", None)
    if st is not None:
        return FeatureMax(st.max_act, f"{st.n_tokens:,} tokens of {st.source} (stored with the SAE)")
    return None


def feature_max_acts(
    lm: LoadedModel, sae, site: str | Site | None, texts: Sequence[str], features: Sequence[int] | None = None
) -> torch.Tensor:
    """Each feature's max over these texts only (position 0 as `excludes_position_0`): a local measurement, not
    the reference max (`feature_max`); it is often well below the corpus max."""
    m = per_text_max(lm, sae, site, texts).max(0).values
    return m if features is None else m[torch.as_tensor(list(features), dtype=torch.long)]


@torch.no_grad()
def measure_feature_stats(
    lm: LoadedModel,
    sae,
    corpus,
    *,
    n_tokens: int = 200_000,
    ctx_len: int = 128,
    contexts_per_batch: int = 16,
    max_norm_ratio: float | None = 10.0,
    progress: bool = True,
) -> FeatureStats:
    """Max activation and firing frequency of every feature over `n_tokens` of a corpus.

    Tokens follow the SAE training rule: position 0 dropped where the SAE does not read it
    (`excludes_position_0`), and (with `max_norm_ratio`) tokens whose norm exceeds that multiple of the batch's
    median norm, the other attention sinks.
    """
    if n_tokens <= 0:
        raise FeatureError(f"n_tokens must be positive, got {n_tokens}")
    site = _site(lm, sae, None)
    n = int(sae.W_dec.shape[0])
    mx, fires, seen = torch.zeros(n), torch.zeros(n), 0
    dev, dt = sae.W_dec.device, sae.W_dec.dtype
    first = 1 if excludes_position_0(sae) else 0
    with ProgressBar("feature stats", n_tokens, unit="tokens", enabled=progress) as bar:
        for ctx in corpus.batches(lm.tokenizer, ctx_len, contexts_per_batch):
            h = capture(lm, [site], ctx.input_ids.to(lm.device))[site][:, first:].reshape(-1, lm.d_model).float()
            if max_norm_ratio is not None and h.shape[0]:
                norms = h.norm(dim=-1)
                h = h[norms <= max_norm_ratio * norms.median()]
            h = h[: n_tokens - seen]
            f = sae.encode(h.to(dev, dt)).float().cpu()
            mx = torch.maximum(mx, f.max(0).values) if len(f) else mx
            fires += (f > 0).sum(0).float()
            seen += h.shape[0]
            bar.update(seen)
            if seen >= n_tokens:
                break
    if seen == 0:
        raise FeatureError(f"the corpus {corpus} gave no tokens")
    src = getattr(corpus, "spec", None) or str(corpus)
    return FeatureStats(
        mx,
        fires / seen,
        f"corpus {src} at {site} (ctx {ctx_len}, {'sink and ' if first else ''}>{max_norm_ratio}x median-norm tokens"
        " excluded)",
        seen,
    )

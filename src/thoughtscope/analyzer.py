"""The analyzer: which SAE features fire where in a text, and where the SAE fails to explain the activation.

One early-exit forward pass to the SAE's site and one encode (`features.features_on_text`, the one path from
text to features, with its one position-0 rule) give everything: per token its strongest features, the
activation of any chosen feature, and the relative reconstruction error ‖x − x̂‖² / ‖x‖² (an anomaly signal:
tokens the dictionary cannot express). The decode only touches the features that fired somewhere in the text,
so it costs a fraction of the encode.

    from thoughtscope.analyzer import analyze_text, compare_texts
    a = analyze_text(lm, sae, "The Golden Gate Bridge at dusk", k=5)
    a.tokens[3], a.top[3], a.recon_error[3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .display import Piece, piece_index, piece_texts, token_pieces, token_texts  # noqa: F401 (token_texts: its old home)
from .errors import AnalyzerError, FeatureError
from .features import TextFeatures, features_on_text
from .models import LoadedModel, Site
from .renamed import renamed_keyword


@dataclass
class TextAnalysis:
    """Per-token results for one text; position 0 is flagged as excluded when the SAE does not read it
    (`features.excludes_position_0`): no feature fires there, though its reconstruction error is still given."""

    token_ids: list[int]
    tokens: list[str]
    top: list[list[tuple[int, float]]]  # per token: (feature, activation), strongest first, only > 0
    recon_error: list[float]  # per token, excluded ones too: ‖x − x̂‖² / ‖x‖² of the SAE's own reconstruction
    peaks: list[tuple[int, float, int]]  # over the text: (feature, peak activation, position of the peak)
    excluded: list[int] = field(default_factory=list)  # positions the SAE does not read (BOS sink)
    chosen: dict[int, list[float]] = field(default_factory=dict)  # feature -> activation per token
    probe_scores: dict[str, list[float]] = field(default_factory=dict)  # probe name -> score per token
    pieces: list[Piece] = field(default_factory=list)  # the text as read: whole characters over token positions

    def piece_at(self, pos: int) -> Piece:
        """The piece of text (whole characters, `thoughtscope.display`) that covers token position `pos`."""
        return self.pieces[piece_index(self.pieces)[pos]]

    def strongest(self) -> list[tuple[int, float] | None]:
        """The strongest feature of every token (None where nothing fires)."""
        return [t[0] if t else None for t in self.top]


ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "bot": "assistant",
    "system": "system",
}


def chat_text(lm: LoadedModel, transcript: str) -> str:
    """A pasted transcript ("User: …" / "Assistant: …" / "System: …" turns) in the model's chat template, so the
    analyzer reads it the way the model reads a conversation. Lines before the first role name belong to the
    user; a role line continues until the next one."""
    tok = lm.tokenizer
    if not getattr(tok, "chat_template", None):
        raise AnalyzerError(f"{lm.name} has no chat template: analyze the transcript as plain text")
    turns: list[dict] = []
    for line in transcript.splitlines():
        head, sep, rest = line.partition(":")
        role = ROLES.get(head.strip().lower()) if sep and len(head) < 20 else None
        if role is not None:
            turns.append({"role": role, "content": rest.strip()})
        elif turns:
            turns[-1]["content"] += "\n" + line
        elif line.strip():
            turns.append({"role": "user", "content": line})
    turns = [t for t in turns if t["content"].strip()]
    if not turns:
        raise AnalyzerError("the transcript has no turns: write lines such as 'User: …' and 'Assistant: …'")
    return tok.apply_chat_template(turns, tokenize=False)


def _text_tokens(max_text_tokens: int | None, max_tokens: int | None, fn: str) -> int | None:
    """`max_text_tokens`, or its deprecated name `max_tokens` (with a warning)."""
    return renamed_keyword(
        max_text_tokens,
        max_tokens,
        new="max_text_tokens",
        old="max_tokens",
        where=fn,
        error=AnalyzerError,
        stacklevel=5,
    )


def _encode_text(
    lm: LoadedModel, sae, text: str, max_text_tokens: int | None, probes: dict | None = None
) -> tuple[TextFeatures, dict[str, list[float]]]:
    """The text's features (`features_on_text`) and each probe's score per token, from one forward pass."""
    if not isinstance(text, str) or not text.strip():
        raise AnalyzerError("text is empty: paste some text to analyze")
    probes = probes or {}
    try:
        tf = features_on_text(
            lm, sae, text, max_text_tokens=max_text_tokens, also_sites=[p.cfg.site for p in probes.values()]
        )
    except FeatureError as e:
        raise AnalyzerError(str(e)) from None
    with torch.inference_mode():
        scores = {name: p.score(tf.sites[Site.parse(p.cfg.site)]).float().tolist() for name, p in probes.items()}
    return tf, scores


def analyze_text(
    lm: LoadedModel,
    sae,
    text: str,
    *,
    k: int = 8,
    features: Sequence[int] = (),
    max_text_tokens: int | None = None,
    probes: dict | None = None,
    max_tokens: int | None = None,
) -> TextAnalysis:
    """Per token: the k strongest features, the relative reconstruction error; `features` also get full tracks.

    A text over `max_text_tokens` tokens raises AnalyzerError (`max_tokens` is its deprecated name). `probes`
    ({name: probe}, each with `cfg.site` and `score(x)`, as thoughtscope.probes' Probe) are scored on every token
    from the same forward pass.
    """
    max_text_tokens = _text_tokens(max_text_tokens, max_tokens, "analyze_text")
    n_feat = int(sae.W_dec.shape[0])
    for i in features:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_feat:
            raise AnalyzerError(f"feature {i!r} is out of range: this SAE has features 0..{n_feat - 1}")
    tf, probe_scores = _encode_text(lm, sae, text, max_text_tokens, probes)
    x, code = tf.x, tf.encoded
    with torch.inference_mode():
        active = (code > 0).any(0).nonzero().squeeze(1)
        x_hat = code[:, active] @ sae.W_dec[active] + sae.b_dec
        err = (x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-12)
    f = tf.acts
    kk = min(k, f.shape[1])
    v, i = f.topk(kk, dim=-1)
    peak, where = f.max(0)
    pv, pi = peak.topk(min(4 * kk, f.shape[1]))
    v, i = v.tolist(), i.tolist()
    top = [[(b, a) for b, a in zip(ii, vv) if a > 0] for ii, vv in zip(i, v)]
    where = where.tolist()
    peaks = [(int(n), float(a), int(where[n])) for n, a in zip(pi.tolist(), pv.tolist()) if a > 0]
    pieces = token_pieces(lm.tokenizer, tf.token_ids)
    return TextAnalysis(
        token_ids=tf.token_ids,
        tokens=piece_texts(pieces),
        top=top,
        recon_error=[float(e) for e in err.tolist()],
        peaks=peaks,
        excluded=list(tf.excluded),
        chosen={int(n): f[:, n].tolist() for n in features},
        probe_scores=probe_scores,
        pieces=pieces,
    )


def compare_texts(
    lm: LoadedModel,
    sae,
    text_a: str,
    text_b: str,
    *,
    k: int = 20,
    max_act: Sequence[float] | None = None,
    max_text_tokens: int | None = None,
    max_tokens: int | None = None,
) -> list[dict]:
    """Features whose peak activation differs most between two texts, largest |difference| first.

    diff = (peak on A − peak on B) / M with M the feature's max activation (`max_act`, e.g. the atlas's, when
    given; else the larger of the two peaks), so a number in [-1, 1] comparable across features; ties are broken
    by the raw difference of the peaks. Peaks skip the position the SAE does not read; a text over
    `max_text_tokens` tokens raises AnalyzerError (`max_tokens` is its deprecated name).
    """
    max_text_tokens = _text_tokens(max_text_tokens, max_tokens, "compare_texts")
    a, b = (_encode_text(lm, sae, t, max_text_tokens)[0].acts.max(0).values.cpu() for t in (text_a, text_b))
    scale = torch.maximum(a, b)
    if max_act is not None:
        m = torch.as_tensor(list(max_act), dtype=torch.float32)
        if m.numel() != a.numel():
            raise AnalyzerError(f"max_act has {m.numel()} entries but the SAE has {a.numel()} features")
        scale = torch.maximum(scale, m)
    diff = (a - b) / scale.clamp_min(1e-12)
    raw = (a - b).abs()
    key = diff.abs() + 1e-6 * raw / raw.max().clamp_min(1e-12)  # ties (features on one text only): larger gap first
    v, i = key.topk(min(k, diff.numel()))
    return [
        {"feature": int(n), "diff": float(diff[n]), "peak_a": float(a[n]), "peak_b": float(b[n])}
        for n, x in zip(i.tolist(), v.tolist())
        if x > 0
    ]

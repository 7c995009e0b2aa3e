"""Questions answered by running the model on new text: which features fire here, and which tell two sets apart."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..features import features_on_texts
from ..models import LoadedModel, Site
from .db import Atlas, AtlasError


def activations_on_texts(
    lm: LoadedModel, sae, texts: Sequence[str], *, site: Site | str | None = None
) -> list[tuple[list[int], torch.Tensor]]:
    """(token ids, activations [T, n_features]) per text, through the one text-to-features path
    (`features.features_on_texts`): position 0 zeroed when the SAE excludes it."""
    return [
        (t.token_ids, t.acts.float().cpu()) for t in features_on_texts(lm, sae, texts, site=site, texts_per_batch=1)
    ]


@dataclass
class TokenFeatures:
    pos: int
    token_id: int
    token: str
    features: list[tuple[int, float]]


def top_features_for_text(lm: LoadedModel, sae, text: str, *, k: int = 5, site=None) -> dict:
    """Per token, the k most active features; overall, the features with the highest peak on the text."""
    ids, f = activations_on_texts(lm, sae, [text], site=site)[0]
    from ..display import token_texts

    texts = token_texts(lm.tokenizer, ids)  # whole characters (a character's earlier byte tokens read "")
    per_token = []
    for p, tid in enumerate(ids):
        v, i = f[p].topk(min(k, f.shape[1]))
        feats = [(int(a), float(b)) for a, b in zip(i, v) if b > 0]
        per_token.append(TokenFeatures(p, tid, texts[p], feats))
    peak, where = f.max(0)
    v, i = peak.topk(min(k * 4, f.shape[1]))
    overall = [(int(a), float(b), int(where[a])) for a, b in zip(i, v) if b > 0]
    return {"tokens": per_token, "overall": overall}


def contrast(
    lm: LoadedModel,
    sae,
    prompts: Sequence[str],
    controls: Sequence[str],
    *,
    k: int = 20,
    atlas: Atlas | None = None,
    site=None,
    max_control_rate: float = 0.5,
) -> list[dict]:
    """Features most active on `prompts` and least on `controls`, with the atlas's maxima as the scale.

    Score = (mean over prompts of the feature's peak activation − mean over controls of it) / M, M the
    feature's reference max (`features.feature_max`: the atlas's when given, at least the max on these
    texts): a number in [-1, 1] on which rare, strong features and common, weak ones compare. One search
    (`features.contrast_features`, score "max"), so the web page, the CLI and the library agree.
    """
    from ..features import FeatureError, contrast_features, feature_max

    try:
        ref = feature_max(sae, atlas)
        rows = contrast_features(
            lm,
            sae,
            site,
            prompts,
            controls,
            score="max",
            top=k,
            max_control_rate=max_control_rate,
            maxima=ref.values if ref else None,
        )
    except FeatureError as e:
        raise AtlasError(f"contrastive search: {e}") from None
    return [
        {
            "feature": r.feature,
            "score": r.score,
            "prompt_mean": r.mean_prompts,
            "control_mean": r.mean_controls,
            "prompt_fire_rate": r.freq_prompts,
            "control_fire_rate": r.freq_controls,
            "normalised": atlas is not None,
        }
        for r in rows
    ]


def open_with_model(
    atlas_path,
    *,
    device: str | None = None,
    sae_path: str | None = None,
    model: str | None = None,
    lm: LoadedModel | None = None,
):
    """(atlas, lm, sae) for commands that need the model again: both are found from the atlas's own metadata.

    The SAE is loaded from `sae_path` or the path recorded at build time, and checked against the atlas by
    fingerprint, so a card never shows statistics of one SAE next to activations of another.
    """
    from ..models import load_recorded
    from ..sae import load_sae
    from .encode import check_sae_matches, sae_fingerprint

    at = Atlas.open(atlas_path)
    spath = sae_path or at.meta.get("sae_path")
    if not spath:
        raise AtlasError(f"{at.path} does not record where its SAE is (built from an in-memory SAE); pass --sae")
    sae = load_sae(spath, device=device)
    if sae_fingerprint(sae.cpu()) != at.meta.get("sae_fingerprint"):
        raise AtlasError(
            f"the SAE at {spath} is not the one {at.path} was built from (weights differ); "
            f"pass the original --sae or rebuild the atlas"
        )
    if lm is None:
        lm = load_recorded(at.meta.get("model_source") or at.meta.get("model"), model, device=device)
    check_sae_matches(lm, sae, at.meta.get("site"))
    return at, lm, sae.to(lm.device)

"""The output-side explanation's own score, measured in the real model: does adding the feature make the model
more likely to say the words its explanation names, more than adding a random other feature does?

For each feature with an output-side explanation (`output_explain.py`: 'says "ocean", "sea"'):

1. a few neutral prompts (NEUTRAL_PROMPTS, cut to the same length) run once unsteered, and once per feature
   with the feature's decoder direction added at the SAE's site on each prompt's last token (the prompts'
   prefix is run once and its key/value cache reused, so a direction costs one token per prompt);
2. the effect is the mean, over prompts and named words, of the gain in log-probability that the next token
   starts the word (every case and space variant of it, `features.concept_token_ids`), in nats;
3. the control: the same words' gain when another feature's direction is added instead. Features are sorted by
   the norm of the vector they add (max activation in the atlas x decoder norm) and run in batches of
   neighbours in that order; within a batch every direction is scaled to the batch's median norm, so a
   feature and its controls (the other features of its batch: random with respect to its words) add vectors
   of exactly the same norm. The batch's norm spread is reported.

own_score is the share of controls whose gain is below the feature's (ties count half): 0.5 is chance, 1.0
means its words rise more under it than under every same-norm control. One forward pass per batch serves the
feature and all its controls.
"""

from __future__ import annotations

import copy
import inspect
import os
import time

import numpy as np
import torch

from ..progress import ProgressBar
from ..sites import Site, edit
from .db import Atlas, AtlasError

OWN_METHOD = "clamp-logprob-v1"
# neutral prompts, cut to the same number of tokens (their last ones) so one cached prefix serves every direction
NEUTRAL_PROMPTS = (
    "Here is what happened next, and",
    "She looked at it for a while and said",
    "In the morning, we went out and",
    "This is a short story about the",
    "We talked for a long time about",
    "The best thing about it was the",
    "He opened the door and saw the",
    "My favourite part of the day is",
)


def _word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    from ..features import concept_token_ids

    ids = [sorted(set(concept_token_ids(tokenizer, [w]))) for w in words]
    return [i for i in ids if i]


class _Runner:
    """The prompts' prefix run once (its key/value cache kept); each call runs only their last token, for every
    direction at once, with the direction added at the site: the next-token log-probabilities [B, C, V]."""

    def __init__(self, lm, site: Site, prompts: tuple[str, ...]):
        rows = [lm.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        n = min(len(r) for r in rows)
        if n < 2:
            raise AtlasError("score_output_causal: every prompt needs at least two tokens")
        bos = [lm.tokenizer.bos_token_id] if lm.tokenizer.bos_token_id is not None else []
        ids = torch.tensor([bos + r[-n:] for r in rows], device=lm.device)
        self.lm, self.site, self.C = lm, site, ids.shape[0]
        # the keyword the model's forward takes its cache by (`cache` in newer transformers)
        self.cache_arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
        self.last = ids[:, -1:]
        with torch.inference_mode():
            out = lm.model(input_ids=ids[:, :-1], use_cache=True)
            self.prefix = getattr(out, "cache", None) or out.past_key_values
        self.base = self(torch.zeros(1, lm.d_model, device=lm.device))[0]  # [C, V]

    @torch.inference_mode()
    def __call__(self, dirs: torch.Tensor) -> torch.Tensor:
        B, C = dirs.shape[0], self.C
        cache = copy.deepcopy(self.prefix)
        cache.batch_repeat_interleave(B)  # rows prompt-major: row r is prompt r // B, direction r % B
        vec = dirs.repeat(C, 1)

        def add(h):
            h = h.clone()
            h[:, -1] += vec.to(h.dtype)
            return h

        with edit(self.lm, self.site, add):
            logits = self.lm.model(
                input_ids=self.last.repeat_interleave(B, dim=0), **{self.cache_arg: cache}, use_cache=True
            ).logits[:, -1]
        return torch.log_softmax(logits.float(), dim=-1).view(C, B, -1).transpose(0, 1)


def _gains(lp: torch.Tensor, base: torch.Tensor, word_ids: list[list[int]]) -> np.ndarray:
    """[directions] mean over prompts and words of the log-probability gain of the words (lp: [B, C, V])."""
    out = np.zeros(lp.shape[0])
    for w in word_ids:
        steered = torch.logsumexp(lp[:, :, w], dim=2)  # [B, C]
        unsteered = torch.logsumexp(base[:, w], dim=1)  # [C]
        out += (steered - unsteered).mean(1).cpu().numpy()
    return out / max(1, len(word_ids))


def score_output_causal(
    atlas: str | os.PathLike,
    *,
    features: list[int] | None = None,
    sample: int | None = None,
    batch: int = 32,
    seed: int = 0,
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS,
    progress: bool = True,
) -> dict:
    """Measure the own score of the stored output-side explanations (all, `features`, or a seeded `sample`) in
    the atlas's model and store it (own_method, own_score, own_effect, own_control_effect). Returns counts,
    means, the share beating their controls (own_score > 0.5), the norm spread and the time."""
    from .explain import select_features
    from .query import open_with_model

    if batch < 2:
        raise AtlasError(f"score_output_causal: batch must be >= 2 (a feature's controls are its batch), got {batch}")
    t0 = time.perf_counter()
    at, lm, sae = open_with_model(atlas)
    try:
        todo = select_features(at, features, sample, seed)
        out = score_output_loaded(at, lm, sae, todo, batch=batch, prompts=prompts, progress=progress)
    finally:
        at.close()
    out["seconds"] = round(time.perf_counter() - t0, 1)  # model loading included
    out["seconds_per_feature"] = round(out["seconds"] / out["features"], 4)
    return out


def score_output_loaded(
    at: Atlas,
    lm,
    sae,
    features: list[int],
    *,
    batch: int = 32,
    prompts: tuple[str, ...] = NEUTRAL_PROMPTS,
    progress: bool = False,
) -> dict:
    """`score_output_causal` on an open atlas with its model and SAE, for those of `features` that have an 'ok'
    output-side explanation; stores the scores and returns the summary (no loading time)."""
    t0 = time.perf_counter()
    recs = at.kind_records("output")
    todo = [f for f in features if recs.get(f, {}).get("status") == "ok"]
    if len(todo) < 2:
        raise AtlasError(f"{at.path}: fewer than two of these features have an output-side explanation to score")
    stats = at.stats()
    W = sae.W_dec.detach().float()
    norms = {f: float(stats["max_act"][f]) * float(W[f].norm()) for f in todo}
    order = sorted(todo, key=lambda f: (norms[f], f))
    run = _Runner(lm, Site.parse(at.meta["site"]), prompts)
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # a lone feature has no control: it joins the batch before
        chunks[-2] += chunks.pop()
    spreads: list[float] = []
    results: dict[int, dict] = {}
    with ProgressBar("output side in the model", len(order), unit="features", enabled=progress) as bar:
        for fb in chunks:
            results.update(_score_batch(run, W, fb, norms, recs, spreads))
            bar.advance(len(fb))
    for f, r in results.items():
        recs[f].update(r)
    at.save_explanation_kinds({f: {"output": recs[f]} for f in results})
    own = [r["own_score"] for r in results.values()]
    seconds = time.perf_counter() - t0
    return {
        "own_method": OWN_METHOD,
        "features": len(results),
        "own_score_mean": float(np.mean(own)) if own else None,
        "beats_controls_share": float(np.mean([x > 0.5 for x in own])) if own else None,
        "own_effect_mean": float(np.mean([r["own_effect"] for r in results.values()])) if own else None,
        "own_control_effect_mean": float(np.mean([r["own_control_effect"] for r in results.values()])) if own else None,
        "batch_norm_spread_max": float(max(spreads)),
        "prompts": run.C,
        "threads": torch.get_num_threads(),
        "scoring_seconds": round(seconds, 1),
        "scoring_seconds_per_feature": round(seconds / max(1, len(results)), 4),
    }


def _score_batch(run: _Runner, W, fb, norms, recs, spreads) -> dict[int, dict]:
    ref = float(np.median([norms[f] for f in fb]))
    lo, hi = min(norms[f] for f in fb), max(norms[f] for f in fb)
    spreads.append(hi / lo if lo > 0 else float("inf"))
    dirs = W[fb].to(run.lm.device)
    lp = run(dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12) * ref)
    out = {}
    for j, f in enumerate(fb):
        words = recs[f]["details"]["words"]
        word_ids = _word_ids(run.lm.tokenizer, words)
        if not word_ids:
            continue
        g = _gains(lp, run.base, word_ids)
        others = np.delete(g, j)
        score = float(((others < g[j]).sum() + 0.5 * (others == g[j]).sum()) / len(others))
        details = dict(recs[f]["details"])
        details["own"] = {"norm": round(ref, 4), "batch": len(fb), "prompts": run.C, "controls": [int(x) for x in fb]}
        out[f] = {
            "own_method": OWN_METHOD,
            "own_score": score,
            "own_effect": float(g[j]),
            "own_control_effect": float(others.mean()),
            "details": details,
        }
    return out

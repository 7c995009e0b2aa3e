"""Explain an atlas with whatever explainer and scorer the options name: the offline explainer (no language model,
the default with no endpoint), an OpenAI-compatible endpoint, or the atlas's own model. `thoughtscope atlas
explain` is this function."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from ..llm import ENV_URL, client_from_env
from .cards import load_tokenizer
from .db import Atlas
from .explain import explain_atlas
from .heldout import ExplainConfig, ExplainerError
from .offline_explain import explain_offline
from .query import open_with_model
from .scoring import LexicalScorer

SCORERS = ("auto", "lexical", "llm")
CONFIRM_ABOVE = 200  # features asked of an LLM above which `confirm` is asked first


def run_explain(
    atlas: str | os.PathLike,
    *,
    offline: bool = False,
    local: bool = False,
    url: str | None = None,
    explainer_model: str | None = None,
    api_key: str | None = None,
    scorer_url: str | None = None,
    scorer_model: str | None = None,
    scorer: str = "auto",
    features: Sequence[int] | None = None,
    sample: int | None = None,
    config: ExplainConfig | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    console=None,
    confirm: Callable[[], bool] | None = None,
    kinds: Sequence[str] = ("input", "output"),
) -> dict | None:
    """Explain and score features of the atlas at `atlas`; returns the run's summary.

    Offline (`offline`, or neither an endpoint, from `url` or $THOUGHTSCOPE_EXPLAINER_URL, nor `local`): the
    offline explainer and the lexical scorer (`overwrite`, `workers` and `kinds` as in `explain_offline`).
    Otherwise an LLM explains: the endpoint's, or the atlas's own model with `local`; `scorer` "auto" or "llm"
    scores with an LLM (`scorer_url` / `scorer_model`, default the explainer's), "lexical" with the lexical
    scorer. Before asking an LLM about more than CONFIRM_ABOVE features, `confirm()` is called if given; None is
    returned when it says no.
    """
    if scorer not in SCORERS:
        raise ExplainerError(f"--scorer must be auto, lexical or llm, got {scorer!r}")
    endpoint = url or os.environ.get(ENV_URL)
    with Atlas.open(atlas) as at:
        tok = None if local and not endpoint else load_tokenizer(at)
    if offline or not (endpoint or local):
        if scorer == "llm":
            raise ExplainerError(
                "--scorer llm needs an explainer endpoint (--url) or --local; offline scoring is lexical"
            )
        if tok is None:
            raise ExplainerError(
                f"cannot load the tokenizer of the model {atlas} was built with; offline explanations need it"
            )
        return explain_offline(
            atlas,
            tokenizer=tok,
            features=features,
            sample=sample,
            config=config,
            overwrite=overwrite,
            console=console,
            workers=workers,
            kinds=tuple(kinds),
        )
    lm = None
    if not endpoint:
        at, lm, _ = open_with_model(atlas)
        at.close()
    explainer = client_from_env(url, explainer_model, api_key, lm=lm)
    if scorer == "lexical":
        sc = LexicalScorer()
    else:
        sc = client_from_env(scorer_url or url, scorer_model or explainer_model, api_key, scorer=True, lm=lm)
    if confirm is not None and (sample or 0) + len(features or []) > CONFIRM_ABOVE and not confirm():
        return None
    tok = lm.tokenizer if lm is not None else tok
    return explain_atlas(
        atlas, explainer, sc, tokenizer=tok, features=features, sample=sample, config=config, console=console
    )

"""`thoughtscope atlas build | explain | report`: map every feature of an SAE, explain and score it, report on it.

`build` reads its option defaults from AtlasConfig (plans.py, torch-free); `explain` and `report` leave an option
unset unless it is given, so ExplainConfig and write_report supply their own defaults.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ..plans import AtlasConfig
from .common import _csv, _fail, _load, _open_atlas, console

atlas_app = typer.Typer(no_args_is_help=True, help="Build, explain and report a feature atlas for an SAE.")


def _sae_folder(spec: str) -> Path:
    from ..sae.formats import default_sae_path

    return default_sae_path() if spec == "default" else Path(spec)


def _given(**kw) -> dict:
    """The options the user set (the rest keep the library's defaults)."""
    return {k: v for k, v in kw.items() if v is not None}


@atlas_app.command("build")
def atlas_build(
    sae: str = typer.Option("default", help="SAE folder, or 'default' (the shipped SmolLM2 SAE)"),
    out: Path = typer.Option(..., help="atlas folder (atlas.sqlite); re-run to resume"),
    model: str | None = typer.Option(None, help="model (default: the one the SAE was trained on, or 'default')"),
    corpus: str = typer.Option("default"),
    tokens: int = typer.Option(AtlasConfig.n_tokens, help="token budget: tokens to read"),
    ctx_len: int = typer.Option(AtlasConfig.ctx_len, help="tokens per context"),
    contexts_per_batch: int = typer.Option(
        AtlasConfig.contexts_per_batch,
        "--contexts-per-batch",
        "--batch-size",
        help="contexts per forward pass (--batch-size: its old name)",
    ),
    skip_tokens: int = typer.Option(
        AtlasConfig.skip_tokens, help="start this many tokens into the corpus (e.g. past the SAE's training text)"
    ),
    top_k: int = typer.Option(AtlasConfig.top_k, help="top activating contexts per feature"),
    quiet: bool = typer.Option(False),
) -> None:
    """One streaming pass: top and quantile contexts, density, histogram, logit effects, neighbours."""
    from ..atlas import build_atlas
    from ..corpus import Corpus
    from ..errors import ThoughtscopeError
    from ..models import DEFAULT_MODEL_NAME
    from ..sae import load_sae

    folder = _sae_folder(sae)
    try:
        cfg = AtlasConfig(
            n_tokens=tokens,
            ctx_len=ctx_len,
            contexts_per_batch=contexts_per_batch,
            skip_tokens=skip_tokens,
            top_k=top_k,
        )
        sae_obj = load_sae(folder)
        lm = _load(
            model or ("default" if sae_obj.cfg.model in ("", DEFAULT_MODEL_NAME) else sae_obj.cfg.model), None, None
        )
        t0 = time.perf_counter()
        path = build_atlas(lm, sae_obj, Corpus(corpus), out, cfg, sae_path=str(folder.resolve()), progress=not quiet)
    except (ThoughtscopeError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


@atlas_app.command("explain")
def atlas_explain(
    atlas: Path = typer.Argument(..., help="atlas folder"),
    offline: bool = typer.Option(
        False,
        "--offline",
        help="no language model: token / n-gram explanations, scored "
        "by the lexical scorer (the default with no endpoint)",
    ),
    local: bool = typer.Option(
        False, "--local", help="the atlas's own model explains and scores itself (slow; at chance for the 135M default)"
    ),
    url: str | None = typer.Option(None, help="OpenAI-compatible base URL (or THOUGHTSCOPE_EXPLAINER_URL)"),
    explainer_model: str | None = typer.Option(None, help="model name at that endpoint"),
    api_key: str | None = typer.Option(None, help="key (or OPENAI_API_KEY)"),
    scorer_url: str | None = typer.Option(None, help="scorer endpoint (default: same as the explainer)"),
    scorer_model: str | None = typer.Option(None),
    scorer: str = typer.Option("auto", help="auto (the explaining LLM; lexical offline) | lexical | llm"),
    sample: int | None = typer.Option(None, help="explain a uniform random sample of this many alive features"),
    features: str | None = typer.Option(None, help="or these feature ids (comma-separated)"),
    seed: int | None = typer.Option(
        None, help="seed of the sample, the held-out split and the shuffled control [default: ExplainConfig.seed]"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the summary (mean scores, CIs) here"),
    overwrite: bool = typer.Option(False, help="offline: also replace explanations another method wrote"),
    concurrency: int | None = typer.Option(None, help="requests in flight [default: ExplainConfig.concurrency]"),
    workers: int | None = typer.Option(
        None, help="offline: processes sharing the features [default: one per core when there are over 500]"
    ),
    yes: bool = typer.Option(False, "--yes", help="skip the confirmation after the cost/time estimate"),
) -> None:
    """Write an explanation for each feature and score it on held-out contexts, with a shuffled control; resumable."""
    import os

    from .._io import atomic_write_json
    from ..atlas import (
        ExplainConfig,
        LexicalScorer,
        client_from_env,
        explain_atlas,
        explain_offline,
        open_with_model,
    )
    from ..atlas.cards import load_tokenizer
    from ..errors import ThoughtscopeError

    if scorer not in ("auto", "lexical", "llm"):
        _fail(f"--scorer must be auto, lexical or llm, got {scorer!r}")
    endpoint = url or os.environ.get("THOUGHTSCOPE_EXPLAINER_URL")
    ids = _csv(features, int) if features else None
    try:
        cfg = ExplainConfig(**_given(concurrency=concurrency, seed=seed))
        with _open_atlas(atlas) as at:
            tok = None if local and not endpoint else load_tokenizer(at)
        if offline or not (endpoint or local):
            if scorer == "llm":
                _fail("--scorer llm needs an explainer endpoint (--url) or --local; offline scoring is lexical")
            if tok is None:
                _fail(f"cannot load the tokenizer of the model {atlas} was built with; offline explanations need it")
            summary = explain_offline(
                atlas,
                tokenizer=tok,
                features=ids,
                sample=sample,
                config=cfg,
                overwrite=overwrite,
                console=console,
                workers=workers,
            )
        else:
            lm = None if endpoint else open_with_model(atlas)[1]
            explainer = client_from_env(url, explainer_model, api_key, lm=lm)
            if scorer == "lexical":
                sc = LexicalScorer()
            else:
                sc = client_from_env(scorer_url or url, scorer_model or explainer_model, api_key, scorer=True, lm=lm)
            if not yes and (sample or 0) + len(ids or []) > 200 and not typer.confirm("go ahead?", default=True):
                raise typer.Exit(1)
            tok = lm.tokenizer if lm is not None else tok
            summary = explain_atlas(
                atlas, explainer, sc, tokenizer=tok, features=ids, sample=sample, config=cfg, console=console
            )
    except (ThoughtscopeError, ValueError) as e:
        _fail(str(e))
    console.print_json(json.dumps(summary, default=str))
    if json_out is not None:
        atomic_write_json(json_out, summary, default=str)


@atlas_app.command("report")
def atlas_report(
    atlas: Path = typer.Argument(...),
    out: Path | None = typer.Option(None),
    cards: int | None = typer.Option(None, help="random feature cards [default: write_report's n_cards]"),
) -> None:
    """A self-contained HTML report: density, dead/alive, score distribution, random feature cards."""
    from ..atlas import AtlasError, write_report

    try:
        path = write_report(atlas, out, **_given(n_cards=cards))
    except AtlasError as e:
        _fail(str(e))
    console.print(f"wrote {path}")

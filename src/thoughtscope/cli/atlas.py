"""`thoughtscope atlas build | explain | report`: map every feature of an SAE, explain and score it, report on it.

`build` reads its option defaults from AtlasConfig (plans.py, torch-free); `explain` and `report` leave an option
unset unless it is given, so ExplainConfig and write_report supply their own defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..configdoc import field_help
from ..plans import AtlasConfig
from .common import _csv, _fail, console, renamed
from .harvest import FORCE_HELP, PLAN_HELP, _plan_gate

atlas_app = typer.Typer(no_args_is_help=True, help="Build, explain and report a feature atlas for an SAE.")


def _given(**kw) -> dict:
    """The options the user set (the rest keep the library's defaults)."""
    return {k: v for k, v in kw.items() if v is not None}


@atlas_app.command("build")
def atlas_build(
    sae: str = typer.Option("default", help="SAE folder, or 'default' (the shipped SmolLM2 SAE)"),
    out: Path = typer.Option(..., help="atlas folder (atlas.sqlite); re-run to resume"),
    model: str | None = typer.Option(None, help="model (default: the one the SAE was trained on, or 'default')"),
    corpus: str = typer.Option("default"),
    tokens: int = typer.Option(AtlasConfig.n_tokens, help=field_help(AtlasConfig, "n_tokens")),
    ctx_len: int = typer.Option(AtlasConfig.ctx_len, help=field_help(AtlasConfig, "ctx_len")),
    contexts_per_batch: int = typer.Option(
        AtlasConfig.contexts_per_batch, "--contexts-per-batch", help=field_help(AtlasConfig, "contexts_per_batch")
    ),
    batch_size: int | None = typer.Option(None, "--batch-size", hidden=True),
    skip_tokens: int = typer.Option(AtlasConfig.skip_tokens, help=field_help(AtlasConfig, "skip_tokens")),
    top_k: int = typer.Option(AtlasConfig.top_k, help=field_help(AtlasConfig, "top_k")),
    quiet: bool = typer.Option(False),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """One streaming pass: top and quantile contexts, density, histogram, logit effects, neighbours."""
    from ..atlas import build_atlas_from
    from ..errors import ThoughtscopeError
    from ..estimates import atlas_estimate

    per_batch = renamed(
        contexts_per_batch,
        batch_size,
        new="--contexts-per-batch",
        old="--batch-size",
        default=AtlasConfig.contexts_per_batch,
    )
    timings: dict = {}
    try:
        cfg = AtlasConfig(
            n_tokens=tokens, ctx_len=ctx_len, contexts_per_batch=per_batch, skip_tokens=skip_tokens, top_k=top_k
        )
        _plan_gate(atlas_estimate(sae, cfg, model=model, corpus=corpus), plan=plan, force=force, quiet=quiet)
        path = build_atlas_from(sae, out, cfg, model=model, corpus=corpus, progress=not quiet, timings=timings)
    except (ThoughtscopeError, ValueError) as e:
        _fail(str(e))
    console.print(f"wrote {path} in {timings['stream_s'] + timings['finalize_s']:.0f} s")


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
    kinds: str = typer.Option(
        "input,output",
        help="offline: kinds of explanation written, 'input' (where it fires) and 'output' (the whole words it "
        "promotes); the summary gives each kind's detection AUROC and the cross-fitted best kind's",
    ),
) -> None:
    """Write an explanation for each feature and score it on held-out contexts, with a shuffled control; resumable."""
    from .._io import atomic_write_json
    from ..atlas import ExplainConfig, run_explain
    from ..errors import ThoughtscopeError

    try:
        summary = run_explain(
            atlas,
            offline=offline,
            local=local,
            url=url,
            explainer_model=explainer_model,
            api_key=api_key,
            scorer_url=scorer_url,
            scorer_model=scorer_model,
            scorer=scorer,
            features=_csv(features, int) if features else None,
            sample=sample,
            config=ExplainConfig(**_given(concurrency=concurrency, seed=seed)),
            overwrite=overwrite,
            workers=workers,
            console=console,
            confirm=None if yes else lambda: typer.confirm("go ahead?", default=True),
            kinds=_csv(kinds, str),
        )
    except (ThoughtscopeError, ValueError) as e:
        _fail(str(e))
    if summary is None:
        raise typer.Exit(1)
    console.print_json(json.dumps(summary, default=str))
    if json_out is not None:
        atomic_write_json(json_out, summary, default=str)


@atlas_app.command("score-output")
def atlas_score_output(
    atlas: Path = typer.Argument(..., help="atlas folder whose output-side explanations `atlas explain` wrote"),
    sample: int | None = typer.Option(None, help="score a uniform random sample of this many features (else all)"),
    features: str | None = typer.Option(None, help="or these feature ids (comma-separated)"),
    batch: int = typer.Option(32, help="features per forward pass; each feature's controls are its batch-mates"),
    seed: int = typer.Option(0, help="seed of the sample"),
    json_out: Path | None = typer.Option(None, "--json", help="write the summary here"),
    quiet: bool = typer.Option(False),
) -> None:
    """In the model: does adding each feature raise the probability of the words its output-side explanation
    names, more than adding other features of the same norm does? Stores each feature's own score."""
    from .._io import atomic_write_json
    from ..atlas.output_score import score_output_causal
    from ..errors import ThoughtscopeError

    try:
        summary = score_output_causal(
            atlas,
            features=_csv(features, int) if features else None,
            sample=sample,
            batch=batch,
            seed=seed,
            progress=not quiet,
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

"""The `thoughtscope` command: one subcommand per verb."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Read, map and steer what an open language model is thinking.")
console = Console()
err = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {message}")
    raise typer.Exit(code)


def _load(model: str, device: str | None, dtype: str | None):
    from ..models import ModelError, load_model

    try:
        return load_model(model, device=device, dtype=dtype)
    except ModelError as e:
        _fail(str(e))


def _csv(value: str, cast):
    return [cast(v) for v in str(value).split(",") if v.strip()]


from .harvest import harvest_cmd, model_info, store_info  # noqa: E402  (needs _fail, _load, console)
from .sae import sae_app  # noqa: E402  (needs _csv, _fail, _load and console above)

app.command("harvest")(harvest_cmd)
app.command("store")(store_info)
app.command("model")(model_info)

app.add_typer(sae_app, name="sae")


steer_app = typer.Typer(no_args_is_help=False, invoke_without_command=True,
                        help="Steer generation with presets of feature clamps and vectors; calibrate sliders.")
app.add_typer(steer_app, name="steer")


def _gen_config(max_new_tokens: int, temperature: float, top_p: float, seed: int):
    from ..steer import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


@steer_app.callback()
def steer(
    ctx: typer.Context,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="prompt(s) to answer (repeat for several)"),
    preset: str | None = typer.Option(None, help="preset name or JSON file (see examples/presets)"),
    model: str = typer.Option("default"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
    top_p: float = typer.Option(0.9),
    seed: int = typer.Option(0, help="steered and unsteered answers share this seed"),
) -> None:
    """Answer prompts unsteered and steered by a preset, side by side from the same seed."""
    if ctx.invoked_subcommand is not None:
        return
    from ..steer import SteerError, print_comparisons, steer_with_preset

    if preset is None or not prompt:
        _fail("give --preset and at least one --prompt (or a subcommand: sweep)")
    lm = _load(model, None, None)
    try:
        comps = steer_with_preset(lm, preset, prompt, _gen_config(max_new_tokens, temperature, top_p, seed))
    except SteerError as e:
        _fail(str(e))
    print_comparisons(comps, console, title=f"preset {preset}")


@steer_app.command("sweep")
def steer_sweep(
    preset: str = typer.Option(..., help="preset whose intervention gets swept"),
    strengths: str = typer.Option(..., help="comma-separated slider values, e.g. 0,2,4,8"),
    keywords: str = typer.Option(..., help="comma-separated words that show the concept in an answer"),
    index: int = typer.Option(0, help="which intervention of the preset"),
    ppl_bound: float = typer.Option(2.0, help="allowed perplexity, as a multiple of unsteered"),
    out: Path = typer.Option(Path("sweep"), help="writes OUT.json, OUT.png and OUT.preset.json"),
    model: str = typer.Option("default"),
    max_new_tokens: int = typer.Option(48),
    seed: int = typer.Option(0),
) -> None:
    """Calibrate a slider: concept rate and coherence over strengths, on 20 neutral prompts."""
    from ..steer import Preset, SteerError, plot_sweep, save_sweep, sweep_preset

    lm = _load(model, None, None)
    try:
        result, calibrated = sweep_preset(lm, Preset.load(preset), _csv(strengths, float), index=index,
                                          keywords=_csv(keywords, str), ppl_bound=ppl_bound,
                                          config=_gen_config(max_new_tokens, 0.7, 0.9, seed))
    except SteerError as e:
        _fail(str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_sweep(result, out.with_suffix(".json"))
    png = plot_sweep(result, out.with_suffix(".png"))
    calibrated.save(out.with_suffix(".preset.json"))
    table = Table(title=f"sweep of {preset} item {index} (concept measured by {result.concept_method}; "
                        f"unsteered perplexity {result.baseline.perplexity:.1f})")
    for col in ("strength", "concept rate", "perplexity", "× unsteered", "repetition"):
        table.add_column(col)
    for row in result.table():
        table.add_row(f"{row['strength']:g}", f"{row['concept_rate']:.2f}", f"{row['perplexity']:.1f}",
                      f"{row['ppl_ratio']:.2f}", f"{row['repetition']:.2f}")
    console.print(table)
    console.print(f"suggested strength: {result.suggested}  (files: {out.with_suffix('.json')}, {png})")


@app.command()
def chat(
    preset: str | None = typer.Option(None, help="start with this preset"),
    sae: str = typer.Option("default", help="SAE whose features /set changes"),
    model: str = typer.Option("default"),
    max_new_tokens: int = typer.Option(96),
    temperature: float = typer.Option(0.7),
    seed: int = typer.Option(0),
) -> None:
    """Interactive chat; change sliders between turns: /set 1234 8.0, /preset name, /off, /show, /quit."""
    from ..sae import load_sae
    from ..steer import SteerError, chat_loop

    lm = _load(model, None, None)
    try:
        chat_loop(lm, sae=load_sae(sae), preset=preset, config=_gen_config(max_new_tokens, temperature, 0.9, seed),
                  stream_fn=lambda piece: console.print(piece, end=""))
    except SteerError as e:
        _fail(str(e))


vector_app = typer.Typer(no_args_is_help=True, help="Steering vectors from contrastive pairs.")
app.add_typer(vector_app, name="vector")


@vector_app.command("fit")
def vector_fit_cmd(
    pairs: Path = typer.Argument(..., help=".jsonl/.json with {positive, negative} or a two-column TSV"),
    out: Path = typer.Option(..., help="output .safetensors"),
    site: str = typer.Option("resid.15"),
    method: str = typer.Option("mean", help="mean (CAA mean difference) or pca (first PC of paired differences)"),
    model: str = typer.Option("default"),
) -> None:
    """Fit a steering vector from contrastive prompt pairs."""
    from ..steer import SteerError, vector_fit

    lm = _load(model, None, None)
    try:
        v = vector_fit(lm, site, pairs, out, method=method)
    except SteerError as e:
        _fail(str(e))
    console.print(f"wrote {out}: {v}")


features_app = typer.Typer(no_args_is_help=True, help="Find SAE features to read or steer.")
app.add_typer(features_app, name="features")


@features_app.command("contrast")
def features_contrast_cmd(
    prompts: Path = typer.Option(..., help="text file, one prompt per line, where the concept is present"),
    controls: Path = typer.Option(..., help="text file, one prompt per line, without it"),
    sae: str = typer.Option("default"),
    model: str = typer.Option("default"),
    score: str = typer.Option("z", help="z (standardised mean difference of per-text max) or freq"),
    top: int = typer.Option(20),
) -> None:
    """Features most active on the prompts and least on the controls, ranked by a stated score."""
    from ..sae import load_sae
    from ..steer import SteerError, features_contrast, print_contrast

    lm = _load(model, None, None)
    sae_obj = load_sae(sae)
    try:
        scores = features_contrast(lm, sae_obj, sae_obj.cfg.site, prompts, controls, score=score, top=top)
    except SteerError as e:
        _fail(str(e))
    print_contrast(scores, score, console)


@features_app.command("at")
def features_at_cmd(
    text: str = typer.Argument(...),
    token: str = typer.Option("-1", help="token index, or a substring of the text"),
    sae: str = typer.Option("default"),
    model: str = typer.Option("default"),
    top: int = typer.Option(10),
) -> None:
    """The strongest features at one token of a text."""
    from ..sae import load_sae
    from ..steer import SteerError, top_features_at

    lm = _load(model, None, None)
    sae_obj = load_sae(sae)
    tok = int(token) if token.lstrip("-").isdigit() else token
    try:
        rows = top_features_at(lm, sae_obj, sae_obj.cfg.site, text, tok, top=top)
    except SteerError as e:
        _fail(str(e))
    for r in rows:
        console.print(r)


feature_app = typer.Typer(no_args_is_help=True, help="Look up features in an atlas.")
app.add_typer(feature_app, name="feature")


def _open_atlas(path: Path):
    from ..atlas import Atlas, AtlasError

    try:
        return Atlas.open(path)
    except AtlasError as e:
        _fail(str(e))


@feature_app.command("show")
def feature_show(n: int = typer.Argument(...), atlas: Path = typer.Option(..., help="atlas folder")) -> None:
    """A feature's card: statistics, explanation and score, logit effects, neighbours, contexts as a heatmap."""
    from ..atlas import AtlasError, show_feature
    from ..atlas.cards import load_tokenizer

    at = _open_atlas(atlas)
    try:
        show_feature(at, n, load_tokenizer(at), console)
    except AtlasError as e:
        _fail(str(e))


@feature_app.command("random")
def feature_random(atlas: Path = typer.Option(...), n: int = typer.Option(3), seed: int | None = None) -> None:
    """Cards for uniformly random alive features: the unbiased way to browse."""
    from ..atlas import show_feature
    from ..atlas.cards import load_tokenizer

    at = _open_atlas(atlas)
    tok = load_tokenizer(at)
    for i in at.random_features(n, seed=seed):
        show_feature(at, i, tok, console)


@feature_app.command("search")
def feature_search(text: str = typer.Argument(...), atlas: Path = typer.Option(...),
                   limit: int = typer.Option(20)) -> None:
    """Features whose explanation matches the text."""
    from ..atlas import AtlasError

    at = _open_atlas(atlas)
    try:
        hits = at.search(text, limit=limit)
    except AtlasError as e:
        _fail(str(e))
    from ..atlas.cards import score_line

    for i, expl in hits:
        console.print(f"[bold]{i}[/bold]  {expl}")
        console.print(f"      [dim]{score_line(at.explanation(i) or {})}[/dim]", highlight=False)


@feature_app.command("top")
def feature_top(text: str = typer.Option(..., "--text"), atlas: Path = typer.Option(...),
                k: int = typer.Option(5)) -> None:
    """The features most active on a text, per token."""
    from ..atlas import open_with_model, text_card, top_features_for_text

    at, lm, sae = open_with_model(atlas)
    console.print(text_card(top_features_for_text(lm, sae, text, k=k)))


@feature_app.command("contrast")
def feature_contrast(prompts: Path = typer.Option(..., help="one prompt per line with the concept"),
                     controls: Path = typer.Option(..., help="one prompt per line without it"),
                     atlas: Path = typer.Option(...), k: int = typer.Option(20)) -> None:
    """Features most active on the prompts and least on the controls (score in [-1, 1], see docs/atlas.md)."""
    from ..atlas import contrast, open_with_model

    at, lm, sae = open_with_model(atlas)
    read = lambda p: [line.strip() for line in Path(p).read_text().splitlines() if line.strip()]  # noqa: E731
    rows = contrast(lm, sae, read(prompts), read(controls), k=k, atlas=at)
    table = Table(title="contrastive search: (mean peak on prompts − mean peak on controls) / max activation")
    cols = list(rows[0].keys()) if rows else []
    for c in cols:
        table.add_column(str(c))
    for r in rows:
        table.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(table)


@app.command()
def demo(
    tokens: int = typer.Option(16_384, help="tokens to harvest for the demo store"),
    out: Path = typer.Option(Path("demo-out"), help="where the demo writes its artefacts"),
    site: str = typer.Option("resid.15", help="site to study"),
) -> None:
    """Run the main workflow on the embedded SmolLM2-135M-Instruct, offline."""
    from ..demo import run_demo

    run_demo(out=out, site=site, tokens=tokens, console=console)


# Areas with a module of their own in this package register their typer sub-app here, one line each.
from .atlas import atlas_app  # noqa: E402
from .corpus import corpus_app  # noqa: E402
from .nla import nla_app  # noqa: E402
from .serve import serve  # noqa: E402

app.add_typer(atlas_app, name="atlas")
app.add_typer(nla_app, name="nla")
app.add_typer(corpus_app, name="corpus")
app.command("serve")(serve)
from .probe import probe_app  # noqa: E402

app.add_typer(probe_app, name="probe")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: any ThoughtscopeError ends the command with one error line, never a traceback."""
    from ..errors import ThoughtscopeError

    try:
        app(args=argv, standalone_mode=True)
    except ThoughtscopeError as e:
        err.print(f"[bold red]error:[/bold red] {e}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()

"""`thoughtscope steer ...`, `chat` and `vector fit`: steer generation, find and calibrate sliders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import _csv, _fail, _load, console, one_line_errors, read_lines

steer_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Steer generation with presets of feature clamps and vectors; find and calibrate sliders.",
)
vector_app = typer.Typer(no_args_is_help=True, help="Steering vectors from contrastive pairs.")


def _gen_config(max_new_tokens: int, temperature: float, top_p: float, seed: int):
    from ..steer import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _questions(path: Path | None) -> list[str]:
    from ..steer.calibrate import NEUTRAL_PROMPTS

    if path is None:
        return list(NEUTRAL_PROMPTS)
    try:
        qs = [q.strip() for q in Path(path).read_text().splitlines() if q.strip()]
    except OSError as e:
        _fail(f"cannot read the questions file {path}: {e}")
    if len(qs) < 2:
        _fail(f"{path}: expected at least 2 neutral questions, one per line; found {len(qs)}")
    return qs


@steer_app.callback()
@one_line_errors
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
    from ..steer import print_comparisons, steer_with_preset

    if preset is None or not prompt:
        _fail("give --preset and at least one --prompt (or a subcommand: sweep, find)")
    lm = _load(model, None, None)
    comps = steer_with_preset(lm, preset, prompt, _gen_config(max_new_tokens, temperature, top_p, seed))
    print_comparisons(comps, console, title=f"preset {preset}")


@steer_app.command("sweep")
@one_line_errors
def steer_sweep(
    strengths: str = typer.Option(..., help="comma-separated slider values, e.g. 0.5,1,2 (x max for --feature)"),
    keywords: str = typer.Option(..., help="comma-separated words that show the concept in an answer"),
    preset: str | None = typer.Option(None, help="preset whose intervention gets swept"),
    feature: int | None = typer.Option(None, help="sweep a clamp of this SAE feature instead (x its reference max)"),
    sae: str = typer.Option("default", help="the SAE of --feature"),
    positions: str = typer.Option("all", help="--feature: all, prompt or generated tokens"),
    index: int = typer.Option(0, help="which intervention of the preset"),
    questions: Path | None = typer.Option(None, help="neutral questions, one per line (default: 20 built in)"),
    ppl_bound: float = typer.Option(2.0, help="allowed perplexity, as a multiple of unsteered"),
    out: Path = typer.Option(Path("sweep"), help="writes OUT.json, OUT.png and OUT.preset.json"),
    model: str = typer.Option("default"),
    max_new_tokens: int = typer.Option(48),
    seed: int = typer.Option(0),
) -> None:
    """Calibrate a slider: concept rate and coherence over strengths, on neutral questions (every answer kept)."""
    from ..features import feature_max
    from ..sae import load_sae
    from ..steer import Preset, PresetItem, plot_sweep, save_sweep, sweep_preset
    from ..steer.find import _sae_spec

    if (preset is None) == (feature is None):
        _fail("give either --preset or --feature")
    lm = _load(model, None, None)
    if feature is not None:
        sae_obj = load_sae(sae)
        ref = feature_max(sae_obj)
        if ref is None:
            _fail(f"the SAE {sae} stores no feature maxima for 'x max'; run 'thoughtscope features stats --sae {sae}'")
        n = ref.values.numel()
        if not 0 <= feature < n:
            _fail(f"feature {feature} is out of range: the SAE has {n} features (0..{n - 1})")
        out.parent.mkdir(parents=True, exist_ok=True)
        p = Preset(
            f"feature-{feature}",
            [
                PresetItem(
                    "feature",
                    "clamp",
                    sae_obj.cfg.site,
                    1.0,
                    feature=feature,
                    sae=_sae_spec(sae_obj, out.parent.resolve()),
                    unit="max",
                    max_act=float(ref.values[feature]),
                    positions=positions,
                )
            ],
            f"clamp of feature {feature} in x its max ({ref.source})",
        )
        p.path = out.parent.resolve() / "_"
        index = 0
        console.print(f"feature {feature}: x max = {float(ref.values[feature]):.4g} ({ref.source})")
    else:
        p = Preset.load(preset)
    result, calibrated = sweep_preset(
        lm,
        p,
        _csv(strengths, float),
        index=index,
        keywords=_csv(keywords, str),
        ppl_bound=ppl_bound,
        prompts=_questions(questions),
        config=_gen_config(max_new_tokens, 0.7, 0.9, seed),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_sweep(result, out.with_suffix(".json"))
    png = plot_sweep(result, out.with_suffix(".png"))
    calibrated.save(out.with_suffix(".preset.json"))
    what = f"feature {feature}" if feature is not None else f"{preset} item {index}"
    table = Table(
        title=f"sweep of {what} on {result.n_prompts} questions (concept measured by "
        f"{result.concept_method}; unsteered perplexity {result.baseline.perplexity:.1f})"
    )
    for col in ("strength", "concept rate", "perplexity", "x unsteered", "repetition"):
        table.add_column(col)
    for row in result.table():
        table.add_row(
            f"{row['strength']:g}",
            f"{row['concept_rate']:.2f}",
            f"{row['perplexity']:.1f}",
            f"{row['ppl_ratio']:.2f}",
            f"{row['repetition']:.2f}",
        )
    console.print(table)
    console.print(f"suggested strength: {result.suggested}  (files: {out.with_suffix('.json')}, {png})")


@steer_app.command("find")
@one_line_errors
def steer_find(
    concept: str = typer.Argument(..., help="the concept's name, or a concept JSON file (name, keywords, prompts)"),
    keywords: str = typer.Option("", help="comma-separated words that show the concept (default: the name)"),
    prompts: Path | None = typer.Option(None, help="texts with the concept, one per line (default: from keywords)"),
    controls: Path | None = typer.Option(None, help="texts without it, one per line (default: built in)"),
    questions: Path | None = typer.Option(None, help="neutral questions to calibrate on, one per line"),
    sae: str = typer.Option("default", help="SAE whose features are candidates ('none': vectors only)"),
    model: str = typer.Option("default"),
    ppl_bound: float = typer.Option(2.0, help="allowed perplexity, as a multiple of unsteered"),
    n_features: int = typer.Option(4, help="feature candidates per ranking (input contrast, output effect)"),
    n_calibrate: int = typer.Option(2, help="handles that get the full calibration"),
    sites: str = typer.Option("", help="comma-separated sites for CAA vectors (default: SAE site, 1/3 and 2/3 depth)"),
    logit_sites: str = typer.Option(
        "", help="sites for the concept tokens' logit direction (default: 5/6 depth; 'none' for none)"
    ),
    positions: str = typer.Option("all", help="where handles apply: all, prompt or generated tokens"),
    loop_repetition: float = typer.Option(
        0.25, help="an answer repeating more of its token 3-grams loops and never counts (1: count loops)"
    ),
    max_new_tokens: int = typer.Option(64),
    seed: int = typer.Option(0),
    confirm_seeds: int = typer.Option(
        2, help="fresh seeds the winner is re-measured on; the reported figures come from them (0: none)"
    ),
    preset: Path | None = typer.Option(None, help="save the winner as this preset (default: steer-find-NAME.json)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the whole search here"),
) -> None:
    """Find the handle (SAE feature, CAA vector or logit direction) that makes the model write about a concept,
    calibrated."""
    from ..sae import load_sae
    from ..steer.find import Concept, FindConfig, find_handle, save_preset

    if Path(concept).suffix == ".json" and Path(concept).is_file():
        c = Concept.load(concept)
        if keywords:
            c.keywords = _csv(keywords, str)
    else:
        c = Concept(
            concept,
            _csv(keywords, str) or [concept],
            read_lines(prompts) if prompts else [],
            read_lines(controls) if controls else [],
        )
    if prompts and Path(concept).suffix == ".json":
        c.prompts = read_lines(prompts)
    if controls and Path(concept).suffix == ".json":
        c.controls = read_lines(controls)
    cfg = FindConfig(
        n_features=n_features if sae != "none" else 0,
        n_calibrate=n_calibrate,
        ppl_bound=ppl_bound,
        caa_sites=_csv(sites, str) or None,
        logit_sites=[] if logit_sites == "none" else (_csv(logit_sites, str) or None),
        positions=positions,
        loop_repetition=loop_repetition,
        max_new_tokens=max_new_tokens,
        seed=seed,
        confirm_seeds=confirm_seeds,
    )
    lm = _load(model, None, None)
    sae_obj = None if sae == "none" else load_sae(sae).eval().requires_grad_(False)
    res = find_handle(lm, sae_obj, c, questions=_questions(questions), config=cfg)
    if json_out is not None:
        res.save(json_out)
    table = Table(
        title=f"steer find {c.name!r}: calibrated handles on {len(res.questions)} questions "
        f"(unsteered concept rate {res.baseline['concept_rate']:.0%})"
    )
    for col in ("handle", "strength", "concept rate", "x perplexity", "repetition"):
        table.add_column(col)
    for p in res.frontier:
        table.add_row(
            p["handle"],
            f"{p['strength']:g}",
            f"{p['concept_rate']:.0%}",
            f"{p['perplexity_ratio']:.2f}",
            f"{p['repetition']:.2f}",
        )
    po = res.prompt_only
    table.add_row(
        "prompt-only", "-", f"{po['concept_rate']:.0%}", f"{po['perplexity_ratio']:.2f}", f"{po['repetition']:.2f}"
    )
    console.print(table)
    dropped = sum(h["status"].startswith("dropped") for h in res.handles)
    console.print(f"{len(res.handles)} candidates, {dropped} dropped at screening; {res.seconds:.0f} s")
    if res.best is None:
        console.print(f"no handle raised the concept rate within {ppl_bound}x perplexity")
        raise typer.Exit(1)
    b = res.best
    path = save_preset(res, sae_obj, preset or Path(f"steer-find-{c.name.replace(' ', '_')}.json"))
    conf = b["confirmation"]
    where = (
        f"on {conf['n_answers']} answers of fresh seeds {conf['seeds']}, 95 % CI "
        f"{b['concept_rate_ci'][0]:.0%}-{b['concept_rate_ci'][1]:.0%}; the search's seed: "
        f"{b['search']['concept_rate']:.0%}"
        if conf
        else f"on the search's seed {b['search']['seed']}, not re-measured"
    )
    console.print(
        f"best: {b['id']} at {b['strength']:g} {b['unit']}: {b['concept_rate']:.0%} of answers at "
        f"{b['perplexity_ratio']:.2f}x perplexity ({where}); preset {path}"
    )
    if json_out is not None:
        console.print(f"wrote {json_out}")


@one_line_errors
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
    from ..steer import chat_loop

    lm = _load(model, None, None)
    chat_loop(
        lm,
        sae=load_sae(sae),
        preset=preset,
        config=_gen_config(max_new_tokens, temperature, 0.9, seed),
        stream_fn=lambda piece: console.print(piece, end=""),
    )


@vector_app.command("fit")
@one_line_errors
def vector_fit_cmd(
    pairs: Path = typer.Argument(..., help=".jsonl/.json with {positive, negative} or a two-column TSV"),
    out: Path = typer.Option(..., help="output .safetensors"),
    site: str = typer.Option("resid.15"),
    method: str = typer.Option("mean", help="mean (CAA mean difference) or pca (first PC of paired differences)"),
    model: str = typer.Option("default"),
) -> None:
    """Fit a steering vector from contrastive prompt pairs."""
    from ..steer import vector_fit

    lm = _load(model, None, None)
    v = vector_fit(lm, site, pairs, out, method=method)
    console.print(f"wrote {out}: {v}")

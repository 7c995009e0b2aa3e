"""`thoughtscope steer ...`, `chat` and `vector fit`: steer generation, find and calibrate sliders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..configdoc import field_help
from .common import _csv, _fail, _load, _load_recorded, console, one_line_errors, renamed

_MODEL_HELP = "model (default: the one the SAE or preset was made with; 'default' when none is recorded)"

steer_app = typer.Typer(
    no_args_is_help=False,
    invoke_without_command=True,
    help="Steer generation with presets of feature clamps and vectors; find and calibrate sliders.",
)
vector_app = typer.Typer(no_args_is_help=True, help="Steering vectors from contrastive pairs.")


def _gen_config(max_new_tokens: int, temperature: float, top_p: float, seed: int, **kw):
    from ..steer import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, **kw)


def _gen_help(name: str, extra: str = "") -> str:
    from ..steer.config import GenerationConfig

    return field_help(GenerationConfig, name, extra)


def _find_help(name: str, extra: str = "") -> str:
    from ..steer.config import FindConfig

    return field_help(FindConfig, name, extra)


@steer_app.callback()
@one_line_errors
def steer(
    ctx: typer.Context,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="prompt(s) to answer (repeat for several)"),
    preset: str | None = typer.Option(None, help="preset name or JSON file (see examples/presets)"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    max_new_tokens: int = typer.Option(64, help=_gen_help("max_new_tokens")),
    temperature: float = typer.Option(0.7, help=_gen_help("temperature")),
    top_p: float = typer.Option(0.9, help=_gen_help("top_p")),
    seed: int = typer.Option(0, help=_gen_help("seed", "Steered and unsteered answers share it.")),
    decoder: str | None = typer.Option(None, help=_gen_help("decoder")),
    weights: str = typer.Option("exact", help=_gen_help("weights")),
    export_control_vector: Path | None = typer.Option(
        None, help="write the preset as a llama.cpp control vector (GGUF; additive items only)"
    ),
    export_checkpoint: Path | None = typer.Option(
        None, help="write a transformers checkpoint with the preset baked in (loads with from_pretrained)"
    ),
    abliterate: bool = typer.Option(
        False, help="--export-checkpoint: bake project_out directions out of every residual write"
    ),
) -> None:
    """Answer prompts unsteered and steered by a preset, side by side from the same seed; or export the preset."""
    if ctx.invoked_subcommand is not None:
        return
    from ..steer import print_comparisons, steer_with_preset
    from ..steer.run import recorded_model

    exporting = export_control_vector is not None or export_checkpoint is not None
    if preset is None or not (prompt or exporting):
        _fail("give --preset and at least one --prompt or an --export-... path (or a subcommand: sweep, find)")
    lm = _load_recorded(model, None if model else recorded_model(preset=preset))
    if exporting:
        from ..steer.export import export_preset

        for line in export_preset(
            lm, preset, control_vector_path=export_control_vector, checkpoint=export_checkpoint, abliterate=abliterate
        ):
            console.print(line)
        if not prompt:
            return
    how = {"weights": weights, **({"decoder": decoder} if decoder else {})}
    comps = steer_with_preset(lm, preset, prompt, _gen_config(max_new_tokens, temperature, top_p, seed, **how))
    print_comparisons(comps, console, title=f"preset {preset}")


@steer_app.command("import-control-vector")
@one_line_errors
def steer_import_control_vector(
    path: Path = typer.Argument(..., help="a llama.cpp / repeng control vector (.gguf)"),
    out: Path = typer.Option(..., help="the preset JSON to write"),
    model: str = typer.Option("default", help="the model it must fit (layers and width are checked)"),
) -> None:
    """Turn a llama.cpp control vector into a preset of additive vectors (usable in steer, serve and chat)."""
    from ..steer.export import import_control_vector

    written, notes = import_control_vector(_load(model, None, None), path, out)
    for n in notes:
        console.print(f"note: {n}")
    console.print(f"preset {written}")


@steer_app.command("sweep")
@one_line_errors
def steer_sweep(
    strengths: str = typer.Option(..., help="comma-separated slider strengths, e.g. 0.5,1,2 (x max for --feature)"),
    keywords: str = typer.Option(..., help="comma-separated words that show the concept in an answer"),
    preset: str | None = typer.Option(None, help="preset whose intervention gets swept"),
    feature: int | None = typer.Option(
        None, help="sweep a clamp of this SAE feature instead (x its max stored with the SAE)"
    ),
    sae: str = typer.Option("default", help="the SAE of --feature"),
    positions: str = typer.Option("all", help="--feature: all, prompt or generated tokens"),
    index: int = typer.Option(0, help="which intervention of the preset"),
    questions: Path | None = typer.Option(None, help="neutral questions: a prompt file (default: 20 built in)"),
    ppl_bound: float = typer.Option(2.0, help="allowed perplexity, as a multiple of unsteered"),
    out: Path = typer.Option(Path("sweep"), help="writes OUT.json, OUT.png and OUT.preset.json"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    max_new_tokens: int = typer.Option(48, help=_gen_help("max_new_tokens")),
    seed: int = typer.Option(0, help=_gen_help("seed")),
) -> None:
    """Calibrate a slider: concept rate and coherence over strengths, on neutral questions (every answer kept)."""
    from ..sae import load_sae
    from ..steer import Preset
    from ..steer.calibrate import read_questions
    from ..steer.presets import feature_preset
    from ..steer.run import recorded_model, sweep_to_files

    if (preset is None) == (feature is None):
        _fail("give either --preset or --feature")
    sae_obj = load_sae(sae) if feature is not None else None
    lm = _load_recorded(model, None if model else recorded_model(sae=sae_obj, preset=preset))
    if feature is not None:
        p, index = feature_preset(sae_obj, feature, out.parent, positions=positions), 0
        console.print(f"feature {feature}: x max = {p.items[0].max_act:.4g} ({p.description})")
    else:
        p = Preset.load(preset)
    files = sweep_to_files(
        lm,
        p,
        _csv(strengths, float),
        out,
        index=index,
        keywords=_csv(keywords, str),
        ppl_bound=ppl_bound,
        prompts=read_questions(questions),
        config=_gen_config(max_new_tokens, 0.7, 0.9, seed),
    )
    _print_sweep(files, f"feature {feature}" if feature is not None else f"{preset} item {index}")


def _print_sweep(files, what: str) -> None:
    result = files.result
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
    console.print(f"suggested strength: {result.suggested}  (files: {files.json}, {files.png})")


@steer_app.command("find")
@one_line_errors
def steer_find(
    concept: str = typer.Argument(..., help="the concept's name, or a concept JSON file (name, keywords, prompts)"),
    keywords: str = typer.Option("", help="comma-separated words that show the concept (default: the name)"),
    prompts: Path | None = typer.Option(None, help="texts with the concept: a prompt file (default: from keywords)"),
    controls: Path | None = typer.Option(None, help="texts without it: a prompt file (default: built in)"),
    questions: Path | None = typer.Option(None, help="neutral questions to calibrate on: a prompt file"),
    sae: str = typer.Option("default", help="SAE whose features are candidates ('none': vectors only)"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    ppl_bound: float = typer.Option(2.0, help=_find_help("ppl_bound")),
    ppl_margin: float = typer.Option(0.95, help=_find_help("ppl_margin")),
    n_features: int = typer.Option(4, help=_find_help("n_features")),
    n_calibrate: int = typer.Option(2, help=_find_help("n_calibrate")),
    sites: str = typer.Option("", help=_find_help("caa_sites", "Comma-separated.")),
    logit_sites: str = typer.Option("", help=_find_help("logit_sites", "Comma-separated; 'none' for none.")),
    positions: str = typer.Option("all", help=_find_help("positions")),
    loop_repetition: float = typer.Option(0.25, help=_find_help("loop_repetition")),
    max_new_tokens: int = typer.Option(64, help=_find_help("max_new_tokens")),
    seed: int = typer.Option(0, help=_find_help("seed")),
    confirm_seeds: int = typer.Option(2, help=_find_help("confirm_seeds")),
    answers_per_question: int = typer.Option(2, help=_find_help("answers_per_question")),
    weights: str = typer.Option("auto", help=_find_help("weights")),
    preset: Path | None = typer.Option(None, help="save the winner as this preset (default: steer-find-NAME.json)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the whole search here"),
    minutes: float | None = typer.Option(
        None,
        help="time budget in minutes, kept on any model: the first answers are timed and the search is cut to fit "
        "(fewer candidates, grid points, questions; what was cut is printed)",
    ),
) -> None:
    """Find the handle (SAE feature, CAA vector or logit direction) that makes the model write about a concept,
    calibrated."""
    from ..sae import load_sae
    from ..steer.calibrate import read_questions
    from ..steer.find import Concept, FindConfig
    from ..steer.run import find_to_files, recorded_model

    c = Concept.from_spec(concept, _csv(keywords, str), prompts, controls)
    cfg = FindConfig(
        n_features=n_features if sae != "none" else 0,
        n_calibrate=n_calibrate,
        ppl_bound=ppl_bound,
        ppl_margin=ppl_margin,
        caa_sites=_csv(sites, str) or None,
        logit_sites=[] if logit_sites == "none" else (_csv(logit_sites, str) or None),
        positions=positions,
        loop_repetition=loop_repetition,
        max_new_tokens=max_new_tokens,
        seed=seed,
        confirm_seeds=confirm_seeds,
        answers_per_question=answers_per_question,
        weights=weights,
    )
    sae_obj = None if sae == "none" else load_sae(sae).eval().requires_grad_(False)
    lm = _load_recorded(model, None if model or sae_obj is None else recorded_model(sae=sae_obj))
    res, path = find_to_files(
        lm,
        sae_obj,
        c,
        questions=read_questions(questions),
        config=cfg,
        preset=preset,
        json_out=json_out,
        minutes=minutes,
    )
    _print_find(res, path)
    if json_out is not None:
        console.print(f"wrote {json_out}")
    if path is None:
        raise typer.Exit(1)


def _print_find(res, path: Path | None) -> None:
    """The calibration frontier beside the prompt-only baseline, then the winner and its preset."""
    table = Table(
        title=f"steer find {res.concept.name!r}: calibrated handles on {len(res.questions)} questions "
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
    budget = res.config.get("budget")
    if budget:
        console.print(
            f"budget {budget['minutes']:g} min (the uncut search: ~{budget['predicted_minutes_uncut']:.1f} min); "
            f"cut: {'; '.join(budget['cuts']) or 'nothing'}",
            markup=False,
        )
    b = res.best
    if b is None:
        console.print(f"no handle raised the concept rate within {res.config['ppl_bound']}x perplexity")
        return
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
    from ..steer.report import find_notes

    for line in find_notes(res):
        console.print(line, markup=False)


@one_line_errors
def chat(
    preset: str | None = typer.Option(None, help="start with this preset"),
    sae: str = typer.Option("default", help="SAE whose features /set changes"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    max_new_tokens: int = typer.Option(96, help=_gen_help("max_new_tokens")),
    temperature: float = typer.Option(0.7, help=_gen_help("temperature")),
    seed: int = typer.Option(0, help=_gen_help("seed")),
) -> None:
    """Interactive chat; change sliders between turns: /set 1234 8.0, /set 1234 2x (x its max), /preset name,
    /off, /show, /quit."""
    from ..sae import load_sae
    from ..steer import chat_loop
    from ..steer.run import recorded_model

    sae_obj = load_sae(sae)
    lm = _load_recorded(model, None if model else recorded_model(sae=sae_obj))
    chat_loop(
        lm,
        sae=sae_obj,
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
    texts_per_batch: int | None = typer.Option(None, help="texts per forward pass (default 16)"),
    batch_size: int | None = typer.Option(None, "--batch-size", hidden=True),
) -> None:
    """Fit a steering vector from contrastive prompt pairs."""
    from ..steer import vector_fit

    n = renamed(texts_per_batch, batch_size, new="--texts-per-batch", old="--batch-size", default=16)
    lm = _load(model, None, None)
    v = vector_fit(lm, site, pairs, out, method=method, texts_per_batch=n)
    console.print(f"wrote {out}: {v.summary()}")

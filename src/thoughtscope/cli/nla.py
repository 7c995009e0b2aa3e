"""`thoughtscope nla ...`: data, train (one stage, resumable, torchrun-aware), explain, eval and the full recipe."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..configdoc import field_help
from ..nla.config import STAGES, DataConfig, NLATrainConfig
from .common import console, err, one_line_errors
from .harvest import FORCE_HELP, PLAN_HELP, _plan_gate

RECIPE = "(default: the shipped recipe's)"

nla_app = typer.Typer(
    no_args_is_help=True,
    help="Natural Language Autoencoders: data | train --stage ar-sft|av-sft|rl|rl-continue|ar-refit|ar-refit-warm "
    "| explain | eval | recipe.",
)


@nla_app.callback()
def _threads(threads: int = typer.Option(1, help="torch threads (1 is fastest on a busy 2-core machine)")) -> None:
    import torch

    torch.set_num_threads(threads)


@nla_app.command()
def data(
    out: Path = typer.Option(..., help="folder for the rows (vectors, warm-start explanations, meta.json)"),
    model: str = typer.Option("default", help="target model: 'default', a hub id, a folder or a .gguf file"),
    corpus: str = typer.Option(DataConfig.corpus, help=field_help(DataConfig, "corpus")),
    site: str | None = typer.Option(None, help=field_help(DataConfig, "site")),
    n_rows: int | None = typer.Option(None, help=field_help(DataConfig, "n_rows", RECIPE)),
    positions_per_doc: int | None = typer.Option(None, help=field_help(DataConfig, "positions_per_doc", RECIPE)),
    min_position: int | None = typer.Option(None, help=field_help(DataConfig, "min_position", RECIPE)),
    max_position: int | None = typer.Option(None, help=field_help(DataConfig, "max_position", RECIPE)),
    warm_start: str = typer.Option(DataConfig.warm_start, help=field_help(DataConfig, "warm_start")),
    llm_endpoint: str | None = typer.Option(None, help=field_help(DataConfig, "llm_endpoint")),
    llm_model: str | None = typer.Option(None, help=field_help(DataConfig, "llm_model")),
) -> None:
    """Harvest rows and warm-start explanations (sizes default to the shipped recipe's)."""
    from ..nla.recipe import build_recipe_dataset

    path = build_recipe_dataset(
        model,
        out,
        corpus=corpus,
        site=site,
        warm_start=warm_start,
        llm_endpoint=llm_endpoint,
        llm_model=llm_model,
        n_rows=n_rows,
        positions_per_doc=positions_per_doc,
        min_position=min_position,
        max_position=max_position,
    )
    console.print(path)


@nla_app.command()
def train(
    nla: Path = typer.Option(..., help="the NLA folder (created, or resumed where it stopped)"),
    data: Path = typer.Option(..., help="an `nla data` folder"),
    stage: str = typer.Option(
        ...,
        help=field_help(
            NLATrainConfig,
            "stage",
            "rl-continue: a second GRPO run from where rl ended, before ar-refit; ar-refit-warm: the control, the "
            "same refit for the warm start, written to warm_refit_ar.safetensors.",
        ),
    ),
    steps: int | None = typer.Option(None, help=field_help(NLATrainConfig, "steps", "(default: the recipe's)")),
    batch_size: int | None = typer.Option(
        None, help=field_help(NLATrainConfig, "batch_size", "(default: the recipe's)")
    ),
    lr: float | None = typer.Option(None, help=field_help(NLATrainConfig, "lr", "(default: the recipe's)")),
    time_budget_s: float | None = typer.Option(None, help=field_help(NLATrainConfig, "time_budget_s")),
    train_rows: int | None = typer.Option(None, help=field_help(NLATrainConfig, "train_rows")),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 … (default: this rank's GPU if any, else cpu)"),
    plan: bool = typer.Option(False, "--plan", help=PLAN_HELP),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """One training stage, resumable; several processes when started by torchrun."""
    from ..estimates import nla_estimate
    from ..nla.recipe import run_stage

    if stage not in STAGES:
        raise typer.BadParameter(f"{stage!r} is not a stage; expected one of {', '.join(STAGES)}", param_hint="--stage")
    given = dict(steps=steps, batch_size=batch_size, lr=lr, time_budget_s=time_budget_s, train_rows=train_rows)
    if plan or int(os.environ.get("WORLD_SIZE", "1")) == 1:  # under torchrun only an explicit --plan probes
        _plan_gate(nla_estimate(nla, data, stage, device=device, **given), plan=plan, force=force)
    r = run_stage(nla, data, stage, device=device, **given)
    if r["rank"] == 0:
        console.print(f"stage {stage}: step {r['step']}, done={r['done']}")


POSITION_HELP = (
    "token position(s) to explain, repeatable. Positions index the tokens the model reads: the tokenizer's BOS token, "
    "when it prepends one (<|im_start|> on the default model), is position 0 and the text's first token is 1; "
    "negative positions count from the end (-1, the default, is the last token). Position 0 is refused: it is the "
    "attention sink. A position outside those the NLA was trained on (51-72 for the shipped NLA) gets a warning."
)


@nla_app.command()
@one_line_errors
def explain(
    text: str = typer.Option(..., help="the text whose tokens are explained"),
    nla: str = typer.Option("default", help="'default' (shipped), an NLA folder, or a released checkpoint pair"),
    position: list[int] | None = typer.Option(None, help=POSITION_HELP),
    samples: int = typer.Option(
        1,
        min=1,
        help="1: the greedy explanation only. N > 1: also N sampled ones, and the one that reconstructs the true "
        "vector best, labelled as an oracle pick (it needs the answer, so its score is not the NLA's FVE)",
    ),
    seed: int = typer.Option(0, help="seed for --samples (the same seed gives the same samples)"),
    temperature: float = typer.Option(1.0, help="sampling temperature for --samples"),
) -> None:
    """Explain tokens of a text in words: the greedy explanation and its round-trip FVE."""
    from ..nla import explain_text, load_nla

    def one_line(e: str) -> str:
        return e.replace("\n", "\\n")

    rows = explain_text(load_nla(nla), text, position or [-1], samples=samples, temperature=temperature, seed=seed)
    for row in rows:
        if row["warning"]:
            err.print(f"warning: {row['warning']}", markup=False, highlight=False, soft_wrap=True)
        console.print(
            f"[{row['position']}] {row['token']!r}  FVE {row['fve']:+.2f}  (greedy)  {one_line(row['explanation'])}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        if row["oracle"] is None:
            continue
        for j, s in enumerate(row["samples"], 1):
            console.print(
                f"    sample {j}/{samples}  round trip {s['fve']:+.2f}  {one_line(s['explanation'])}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        o = row["oracle"]
        console.print(
            f"    oracle pick: sample {o['sample']} of {o['of']}, chosen by its reconstruction of the true vector "
            f"({o['score']:+.2f}); a ceiling that needs the answer, not the NLA's FVE",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@nla_app.command("eval")
def evaluate(
    nla: str = typer.Option(
        "default", "--nla", "--model", help="'default' (the shipped NLA for the default model) or an NLA folder"
    ),
    data: Path | None = typer.Option(None, help="an `nla data` folder (default: rows shipped with the NLA)"),
    quick: bool = typer.Option(False, "--quick", help="48 held-out rows, a few minutes on 2 cores (the default)"),
    full: bool = typer.Option(False, "--full", help="the whole test split instead of the quick 48 rows"),
    n_test: int | None = typer.Option(None, help="this many held-out rows (narrower CIs, longer run)"),
    compare: list[str] | None = typer.Option(
        None, metavar="NAME=FOLDER", help="another NLA evaluated on the same held-out vectors as a rung"
    ),
    json_path: Path | None = typer.Option(None, "--json", help="write every figure here"),
) -> None:
    """Held-out round-trip FVE with bootstrap CIs and the whole baseline ladder."""
    from ..nla import evaluate_nla, format_table

    if sum([quick, full, n_test is not None]) > 1:
        raise typer.BadParameter("give at most one of --quick, --full and --n-test")
    rungs = {}
    for item in compare or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"takes NAME=FOLDER, got {item!r}", param_hint="--compare")
        rungs[name] = folder
    res = evaluate_nla(nla, data, quick=not (full or n_test), n_test=n_test, json_path=json_path, compare=rungs)
    console.print(format_table(res), markup=False, highlight=False)


@nla_app.command()
def recipe(
    work: Path = typer.Option(..., help="folder for data, checkpoints and the eval json (resumable)"),
    export: Path | None = typer.Option(None, help="copy the final adapters here (e.g. the assets folder)"),
    recipe: str = typer.Option(
        "default", help="default (the shipped NLA, 2 CPU cores) or scaled (20,000 vectors, long RL: one GPU)"
    ),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 … (default: this rank's GPU if any, else cpu)"),
) -> None:
    """Reproduce the shipped default NLA end to end (or run the scaled recipe)."""
    from ..nla import format_table
    from ..nla.recipe import run_recipe

    res = run_recipe(work, export, recipe=recipe, device=device)
    console.print(format_table(res), markup=False, highlight=False)

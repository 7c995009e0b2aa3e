"""The `thoughtscope` command: one subcommand per verb."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .atlas import atlas_app
from .causal import analyze_cmd, attribute_cmd, lens_cmd, patch_cmd
from .common import console, err
from .corpus import corpus_app
from .features import features_app
from .graph import graph_cmd, transcoders_app
from .harvest import harvest_cmd, model_info, store_info
from .nla import nla_app
from .probe import probe_app
from .sae import sae_app
from .serve import serve
from .steer import chat, steer_app, vector_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Read, map and steer what an open language model is thinking."
)

app.command("harvest")(harvest_cmd)
app.command("store")(store_info)
app.command("model")(model_info)

app.add_typer(sae_app, name="sae")


app.add_typer(steer_app, name="steer")
app.command("chat")(chat)
app.add_typer(vector_app, name="vector")
app.add_typer(features_app, name="features")
app.add_typer(features_app, name="feature", hidden=True)  # the old name of the same group


@app.command()
def demo(
    tokens: int = typer.Option(16_384, help="tokens to harvest for the demo store"),
    out: Path = typer.Option(Path("demo-out"), help="where the demo writes its artefacts"),
    site: str = typer.Option("resid.15", help="site to study"),
) -> None:
    """Run the main workflow on the embedded SmolLM2-135M-Instruct, offline."""
    from ..demo import run_demo

    run_demo(out=out, site=site, tokens=tokens, console=console)


app.add_typer(atlas_app, name="atlas")
app.add_typer(nla_app, name="nla")
app.add_typer(corpus_app, name="corpus")
app.command("serve")(serve)
app.command("patch")(patch_cmd)
app.command("lens")(lens_cmd)
app.command("attribute")(attribute_cmd)
app.command("analyze")(analyze_cmd)
app.command("graph")(graph_cmd)
app.add_typer(transcoders_app, name="transcoders")

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

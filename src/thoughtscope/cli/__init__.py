"""The `thoughtscope` command: one subcommand per verb."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Read, map and steer what an open language model is thinking."
)
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


def one_line_errors(fn):
    """A command whose ThoughtscopeError ends it with one error line and exit code 2, also when typer's
    test runner calls it directly (main() does the same for every command)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from ..errors import ThoughtscopeError

        try:
            return fn(*args, **kwargs)
        except ThoughtscopeError as e:
            _fail(str(e))

    return run


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text file (one prompt per line), or one error line naming the file."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        _fail(f"cannot read {path}: {e}")


def _csv(value: str, cast):
    return [cast(v) for v in str(value).split(",") if v.strip()]


def _open_atlas(path: Path):
    from ..atlas import Atlas

    return Atlas.open(path)  # an AtlasError ends the command with one line (main)


from .harvest import harvest_cmd, model_info, store_info  # noqa: E402  (needs _fail, _load, console)
from .sae import sae_app  # noqa: E402  (needs _csv, _fail, _load and console above)

app.command("harvest")(harvest_cmd)
app.command("store")(store_info)
app.command("model")(model_info)

app.add_typer(sae_app, name="sae")

from .features import features_app  # noqa: E402
from .steer import chat, steer_app, vector_app  # noqa: E402

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

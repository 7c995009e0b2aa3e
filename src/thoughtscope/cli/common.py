"""What every command module shares: the consoles, one-line errors, loading a model, and renamed flags (the old
name still works for one release, with a warning). Prompt files are read by `documents.read_prompts`."""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console

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


def _load_recorded(model: str | None, recorded, device: str | None = None, dtype: str | None = None):
    """The model --model names, else the one an artefact recorded (`models.load_recorded`: its registered name, its
    file or folder if still there, or an error saying it moved and how to pass --model)."""
    from ..models import ModelError, load_recorded

    try:
        return load_recorded(recorded, model, device=device, dtype=dtype)
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


def _csv(value: str, cast):
    return [cast(v) for v in str(value).split(",") if v.strip()]


def _open_atlas(path: Path):
    from ..atlas import Atlas

    return Atlas.open(path)  # an AtlasError ends the command with one line (main)


def renamed(new_value, old_value, *, new: str, old: str, default=None):
    """The value of a flag given under its new name, or under its old one (accepted for one release, hidden, with a
    warning on stderr). The new option may show its real default: when the old flag is given and the new one is
    absent or at its default, the old flag's value is used. `default` is used when neither is given."""
    if old_value is not None:
        err.print(f"[yellow]warning:[/yellow] {old} is deprecated here; use {new} (it means the same)")
        if new_value is None or new_value == default:
            return old_value
    return default if new_value is None else new_value


def _model_and_sae(model: str | None, sae: str, atlas: Path | None):
    """(atlas or None, lm, sae): from the atlas's own records when one is given, else the named SAE and the model
    --model names or the SAE recorded."""
    if atlas is not None:
        from ..atlas import open_with_model

        return open_with_model(atlas, model=model)
    from ..atlas.build import sae_model_source
    from ..sae import load_sae

    sae_obj = load_sae(sae)
    return None, _load_recorded(model, sae_model_source(sae_obj)), sae_obj

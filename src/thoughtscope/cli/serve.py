"""`thoughtscope serve`: the local web workbench on the embedded defaults, or on the model / SAE / atlas named here."""

from __future__ import annotations

import secrets
from pathlib import Path

import typer

from ..configdoc import field_help
from .common import console, err


def _help(name: str, extra: str = "") -> str:
    from ..server.config import ServerConfig

    return field_help(ServerConfig, name, extra)


def _check_folders(named) -> None:
    """Fail here, not later on the building page, when a folder named on the command line is missing."""
    from ..errors import ServerError

    for flag, path in named:
        if path is not None and not Path(path).exists():
            raise ServerError(f"{flag} {path}: no such folder")


def _load_transcoders(wb, status, folder: Path | str | None, atlases) -> None:
    """The graph page's transcoder set and the atlases of its layers: --transcoders, else the shipped set when the
    model is the default one it was trained for (without either, the graph page says how to get one)."""
    from ..sae.transcoder_set import default_transcoders_path
    from ..server.pages_graph import load_transcoders

    if folder is None and (wb.lm.source or {}).get("registered") == "default" and default_transcoders_path().is_dir():
        folder = "default"  # shown as such on the graph page
    if folder is not None:
        status.set("loading the transcoder set", str(folder))
        load_transcoders(wb, folder, atlases or ())


def serve(
    model: str | None = typer.Option(
        None,
        help="model: a registered name ('default': embedded SmolLM2, 'gemma3-270m'), a hub id, a folder or a .gguf "
        "(default: the one the atlas or SAE was made with)",
    ),
    sae: str = typer.Option("default", help="SAE folder, or 'default' (the shipped SmolLM2 SAE)"),
    atlas: Path | None = typer.Option(
        None, help="atlas folder of that SAE; none: build a small one on first start and reuse it"
    ),
    nla: str = typer.Option("default", help="NLA: 'default' (shipped, for the default model), a folder, or 'none'"),
    probe: list[Path] | None = typer.Option(None, help="probe folder (repeatable)"),
    transcoders: Path | None = typer.Option(
        None, help="transcoder set folder (one per block; ours, circuit-tracer's or Gemma Scope's): the graph page"
    ),
    transcoder_atlas: list[Path] | None = typer.Option(
        None, help="atlas of one transcoder of the set (repeatable): the graph page's explanations of its block"
    ),
    host: str = typer.Option("127.0.0.1", help=_help("host")),
    port: int = typer.Option(8765, help=_help("port")),
    token: str | None = typer.Option(None, help=_help("token", "--token auto makes a random one.")),
    threads: int | None = typer.Option(None, help="torch threads (default: torch's choice)"),
    build_tokens: int = typer.Option(32_768, help="tokens read by the first-start atlas build"),
    wait_for_atlas: bool = typer.Option(
        False,
        "--wait-for-atlas",
        help="on first start, build the atlas before serving any page (default: serve as soon as the model and SAE "
        "are loaded and build it in the background)",
    ),
    queue: int = typer.Option(8, help=_help("queue_size")),
    deadline: float = typer.Option(60.0, help=_help("deadline_s")),
) -> None:
    """The local web workbench at http://localhost:8765/: feature explorer, analyzer, equalizer and NLA view
    (pages answer once the model and SAE are loaded; a first start builds the atlas in the background, and every
    page shows its progress)."""
    import uvicorn

    from ..server import ServerConfig, create_app, load_workbench
    from ..server.workbench import FIRST_START_TOKENS

    named = (
        [("--atlas", atlas)]
        + [("--probe", p) for p in probe or ()]
        + [("--transcoders", transcoders)]
        + [("--transcoder-atlas", p) for p in transcoder_atlas or ()]
        + ([("--sae", Path(sae))] if sae != "default" and not sae.startswith("saelens:") else [])
        + ([("--nla", Path(nla))] if nla not in ("default", "none") and "," not in nla else [])
    )
    _check_folders(named)
    if token == "auto":
        token = secrets.token_urlsafe(18)
    cfg = ServerConfig(host=host, port=port, token=token, queue_size=queue, deadline_s=deadline)
    if threads:
        import torch

        torch.set_num_threads(threads)
    nla_spec = None if nla == "none" or (nla == "default" and model not in (None, "default")) else nla
    if nla == "default" and model not in (None, "default"):
        err.print("[dim]the shipped NLA is for the default model: no NLA view (pass --nla FOLDER for yours)[/dim]")

    def loader(status):
        wb = load_workbench(
            model,
            sae,
            str(atlas) if atlas else None,
            nla_spec,
            probe or (),
            status=status,
            build_tokens=build_tokens or FIRST_START_TOKENS,
            atlas_in_background=not wait_for_atlas,
        )
        _load_transcoders(wb, status, transcoders, transcoder_atlas)
        where = wb.atlas.path if wb.atlas is not None else f"being built in {wb.atlas_build.out}"
        console.print(f"[green]ready[/green]: {wb.lm.name}, {wb.n_features} features, atlas {where}")
        for note in wb.notes:
            err.print(f"[yellow]note:[/yellow] {note}")
        return wb

    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    console.print(f"thoughtscope workbench at [bold]{url}[/bold]  (Ctrl+C stops it)")
    uvicorn.run(create_app(cfg, loader=loader), host=host, port=port, log_level="warning")

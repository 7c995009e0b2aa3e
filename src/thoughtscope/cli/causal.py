"""`thoughtscope patch`: which layers and positions carry an answer, measured and estimated side by side."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import _csv, _load, console, one_line_errors


@one_line_errors
def patch_cmd(
    clean: str = typer.Option(..., help="the prompt whose answer is the target"),
    corrupt: str = typer.Option(..., help="the same prompt changed (same number of tokens) so the answer changes"),
    target: str = typer.Option(..., help="the token the clean prompt leads to (one token, e.g. ' Paris')"),
    against: str | None = typer.Option(None, help="metric = logit(target) - logit(against) (default: target's logit)"),
    streams: str = typer.Option("resid,attn,mlp", help="comma-separated: resid, attn, mlp"),
    model: str = typer.Option("default", help="model name, hub id, folder or GGUF"),
    device: str | None = typer.Option(None, help="cpu, cuda, ..."),
    json_out: Path | None = typer.Option(None, "--json", help="write both maps, their Spearman and timings here"),
    png: Path | None = typer.Option(None, help="write the heatmaps here"),
    top: int = typer.Option(8, help="cells to print"),
) -> None:
    """Activation patching of every (layer, position) and attribution patching, with their agreement."""
    from ..causal import PatchPair
    from ..causal.report import patch_to_files

    lm = _load(model, device, None)
    res = patch_to_files(
        lm, PatchPair(clean, corrupt, target, against), streams=_csv(streams, str), json_path=json_out, png_path=png
    )
    console.print(
        f"metric: clean {res.clean_metric:.3f}, corrupted {res.corrupt_metric:.3f} (maps: 0 = corrupted, 1 = clean)"
    )
    for s in res.patched:
        console.print(f"[bold]{s}[/]: attribution vs activation patching, Spearman {res.spearman(s):.3f}")
        for layer, pos, p, a in res.top_cells(s, top):
            console.print(
                f"  layer {layer:>3}  pos {pos:>3} {res.tokens[pos]!r:<14} patched {p:+.3f}  attributed {a:+.3f}"
            )
    secs = res.seconds
    console.print(
        f"activation patching {secs['activation']:.1f} s, attribution {secs['attribution']:.2f} s "
        f"({secs['activation'] / secs['attribution']:.0f}x)"
    )
    for p in (json_out, png):
        if p is not None:
            console.print(f"wrote {p}")

"""`thoughtscope patch` and `lens`: which layers and positions carry an answer, and what each layer is about to say."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import _csv, _fail, _load, _model_and_sae, console, one_line_errors


def _write_json(path: Path | None, obj) -> None:
    if path is not None:
        from .._io import atomic_write_json

        atomic_write_json(path, obj)
        console.print(f"wrote {path}")


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


@one_line_errors
def lens_cmd(
    args: list[str] = typer.Argument(..., help="TEXT to read, or 'fit' to fit a Jacobian lens"),
    track: str | None = typer.Option(None, help="a token whose rank and probability are followed across layers"),
    lens: str | None = typer.Option(
        None, help="a fitted Jacobian lens folder, or 'default' (shipped for the default model); none: the logit lens"
    ),
    k: int = typer.Option(5, help="top tokens per layer and position"),
    model: str = typer.Option("default", help="model name, hub id, folder or GGUF"),
    device: str | None = typer.Option(None, help="cpu, cuda, ..."),
    json_out: Path | None = typer.Option(None, "--json", help="write every layer and position here"),
    out: Path | None = typer.Option(
        None, help="fit: the lens folder to write (resumes a killed fit); vector / swap: the file"
    ),
    contexts: int = typer.Option(144, help="fit: corpus contexts read"),
    token: str | None = typer.Option(None, help="vector / swap: the token whose lens direction is written"),
    toward: str | None = typer.Option(None, help="swap: the token it is exchanged with"),
    layer: int | None = typer.Option(None, help="vector: the block whose output (resid.L) it is read at"),
) -> None:
    """What each layer is about to say: `lens TEXT [--track TOKEN] [--lens DIR]`; `lens fit --out DIR`; and
    `lens vector --token T --layer L --out v.safetensors`, a steering vector toward what the lens reads as T;
    `lens swap --token A --toward B --layer L --out swap.json`, a preset that exchanges what layer L says about
    A and B."""
    from ..causal.lens import JacobianLens, LensFitConfig, fit_jacobian_lens, lens_view

    lm = _load(model, device, None)
    if args == ["vector"]:
        from ..steer.vectors import lens_vector

        if token is None or layer is None or out is None:
            _fail("lens vector needs --token, --layer and --out FILE.safetensors")
        sv = lens_vector(lm, token, layer, JacobianLens.load(lens, lm) if lens else None)
        console.print(f"wrote {sv.save(out)}: {sv.summary()} (use it in a preset with op add or project_out)")
        return
    if args == ["swap"]:
        from ..steer import preset_from_interventions
        from ..steer.vectors import lens_swap

        if token is None or toward is None or layer is None or out is None:
            _fail("lens swap needs --token, --toward, --layer and --out FILE.json")
        edit = lens_swap(lm, token, toward, layer, JacobianLens.load(lens, lm) if lens else None)
        saved = preset_from_interventions(out.stem, [edit]).save(out)
        console.print(f"wrote {saved}: a preset that swaps {token!r} and {toward!r} at resid.{layer}")
        return
    if args == ["fit"]:
        if out is None:
            _fail("lens fit needs --out FOLDER")
        fitted = fit_jacobian_lens(lm, LensFitConfig(n_contexts=contexts), out=out)
        console.print(f"wrote {out}: Jacobian lens of {fitted.model}, {fitted.J.shape[0]} layers")
        return
    view = lens_view(lm, " ".join(args), lens=JacobianLens.load(lens, lm) if lens else None, track=track, k=k)
    console.print(f"{view.kind} lens; the model's next token at the last position: {view.final_top1[-1]!r}")
    for layer, rows in enumerate(view.top):
        best = ", ".join(f"{t!r} {p:.2f}" for t, p in rows[-1][:3])
        extra = ""
        if view.track:
            extra = f"  {view.track['token']!r}: rank {view.track['rank'][layer][-1]}"
        console.print(f"  layer {layer:>3}  agrees {view.agreement[layer]:.2f}  last: {best}{extra}")
    _write_json(json_out, view.to_dict())


@one_line_errors
def attribute_cmd(
    text: str = typer.Argument(..., help="the text whose next token is explained"),
    target: str = typer.Option(..., help="the next token to explain (one token, e.g. ' Paris')"),
    against: str | None = typer.Option(None, help="explain logit(target) - logit(against) instead"),
    sae: str = typer.Option("default", help="the SAE whose features are credited (its site is where)"),
    model: str | None = typer.Option(None, help="model (default: the one the SAE records)"),
    check: int = typer.Option(50, help="top features whose attribution is checked by ablating them"),
    json_out: Path | None = typer.Option(None, "--json", help="write per-position attributions and the check here"),
) -> None:
    """Which SAE features pushed the next token: activation x gradient per position, checked by ablation."""
    from ..causal.attribution import attribute

    _, lm, sae_obj = _model_and_sae(model, sae, None)
    res = attribute(lm, sae_obj.to(lm.device), text, target, against, check=check)
    console.print(f"metric {res.metric:.3f} at {res.site}; SAE error term at the last position {res.error[-1]:+.3f}")
    for f, a in sorted(res.total.items(), key=lambda kv: -abs(kv[1]))[:10]:
        measured = res.ablation.get(f)
        shown = f"  ablated: {measured:+.3f}" if measured is not None else ""
        console.print(f"  feature {f:>6}  attribution {a:+.3f}{shown}")
    if res.spearman is not None:
        console.print(f"attribution vs ablation of the top {len(res.ablation)}: Spearman {res.spearman:.3f}")
    _write_json(json_out, res.to_dict())


@one_line_errors
def analyze_cmd(
    text: str = typer.Argument(..., help="the text to read token by token"),
    lens: bool = typer.Option(False, "--lens", help="add the logit lens (or --lens-dir's) at every layer and position"),
    lens_dir: str | None = typer.Option(None, help="a fitted Jacobian lens folder, or 'default'"),
    target: str | None = typer.Option(
        None, help="a next token: track it in the lens and credit the features that pushed it"
    ),
    sae: str = typer.Option("default", help="the SAE whose features are read"),
    model: str | None = typer.Option(None, help="model (default: the one the SAE records)"),
    json_out: Path | None = typer.Option(None, "--json", help="write everything here"),
) -> None:
    """Features per token, and with --lens / --target what each layer is about to say and why the next token."""
    from ..causal.lens import JacobianLens
    from ..causal.report import analyze_report

    _, lm, sae_obj = _model_and_sae(model, sae, None)
    jl = JacobianLens.load(lens_dir, lm) if lens_dir else None
    out = analyze_report(lm, sae_obj.to(lm.device), text, lens=jl, with_lens=lens, target=target)
    for pos, (tok, feats) in enumerate(zip(out["tokens"], out["features"])):
        console.print(f"  {pos:>3} {tok!r:<16} " + ", ".join(f"{f}:{v:.2f}" for f, v in feats[:4]))
    if "lens" in out:
        v = out["lens"]
        first = next((i for i, row in enumerate(v["top"]) if row[-1][0][0] == v["final_top1"][-1]), None)
        console.print(f"{v['kind']} lens: the next token {v['final_top1'][-1]!r} is on top from layer {first}")
    if "why" in out:
        top = ", ".join(f"{f} {a:+.2f}" for f, a in out["why"]["top"][:5])
        rho = out["why"]["attribution_vs_ablation_spearman"]
        console.print(f"why {target!r}: {top} (attribution vs ablation: Spearman {rho:.2f})")
    _write_json(json_out, out)

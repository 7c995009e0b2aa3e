"""`thoughtscope graph` and `thoughtscope transcoders`: why the model said what it said, and the dictionaries the
answer is read from."""

from __future__ import annotations

from pathlib import Path

import typer

from ..causal.config import GraphConfig
from ..configdoc import field_help
from .common import _load, console, one_line_errors

transcoders_app = typer.Typer(no_args_is_help=True, help="Transcoders: a sparse dictionary for every block's MLP.")


@one_line_errors
def graph_cmd(
    prompt: str = typer.Argument(..., help="the prompt whose next token the graph explains"),
    target: list[str] = typer.Option([], "--target", help="a target token (repeat for more; default: the likely ones)"),
    transcoders: str = typer.Option("default", help="transcoder set folder (ours, circuit-tracer's or Gemma Scope's)"),
    model: str = typer.Option("default", help="model name, hub id, folder or GGUF"),
    device: str | None = typer.Option(None, help="cpu, cuda, ..."),
    max_feature_nodes: int = typer.Option(
        GraphConfig.max_feature_nodes, help=field_help(GraphConfig, "max_feature_nodes")
    ),
    targets_per_batch: int = typer.Option(
        GraphConfig.targets_per_batch, help=field_help(GraphConfig, "targets_per_batch")
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write circuit-tracer's graph JSON (pruned) here"),
    graph_file: Path | None = typer.Option(None, "--save", help="write the whole graph (safetensors) here"),
    node_threshold: float = typer.Option(0.8, help="the JSON keeps nodes up to this share of influence"),
    edge_threshold: float = typer.Option(0.98, help="the JSON keeps edges up to this share of influence"),
    paths: int = typer.Option(5, help="strongest paths to print"),
    atlas: list[Path] = typer.Option(
        [], "--atlas", help="the atlas of a block's transcoder: its explanations label nodes"
    ),
    force: bool = typer.Option(False, "--force", help="run even when the estimate is over the memory budget"),
) -> None:
    """The attribution graph of a prompt: which features carried it to its next token."""
    from ..causal.attribution_graph import MEMORY_SHARE, build, estimate
    from ..causal.graph_files import save_graph, to_circuit_tracer_json
    from ..causal.report import graph_text
    from ..estimates import available_memory
    from ..sae.transcoder_set import load_transcoder_set

    lm = _load(model, device, None)
    ts = load_transcoder_set(transcoders, lm=lm)
    cfg = GraphConfig(max_feature_nodes=max_feature_nodes, targets_per_batch=targets_per_batch)
    est = estimate(lm, ts, prompt, cfg, budget=None if force else int(MEMORY_SHARE * available_memory()))
    console.print(f"estimate: {est['memory_mb']:.0f} MB, about {est['seconds']:.0f} s on this machine")
    graph = build(lm, ts, prompt, targets=target or None, cfg=cfg, progress=True, source=str(ts.source))
    labels = _labels(graph, ts, atlas)
    for line in graph_text(graph, lm, labels, n_paths=paths):
        console.print(line, markup=False, highlight=False)
    if graph_file is not None:
        console.print(f"wrote {save_graph(graph, graph_file)}")
    if json_out is not None:
        names = [lm.tokenizer.decode([int(t)]) for t in graph.logit_tokens]
        slug = json_out.stem
        to_circuit_tracer_json(graph, json_out, labels=labels, node_threshold=node_threshold,
                               edge_threshold=edge_threshold, slug=slug, scan=lm.name, logit_strs=names)  # fmt: skip
        console.print(f"wrote {json_out}")


def _labels(graph, ts, atlas_dirs) -> dict:
    """(block, feature) -> explanation from the atlases given for blocks of the set, for the graph's feature nodes."""
    if not atlas_dirs:
        return {}
    from ..atlas import Atlas
    from ..atlas.db import atlases_by_block, block_labels

    by_block = atlases_by_block([Atlas.open(a) for a in atlas_dirs], ts)
    rows = graph.active_features[graph.selected_features]
    return block_labels(by_block, [(int(r[0]), int(r[2])) for r in rows])


@transcoders_app.command("train")
@one_line_errors
def transcoders_train(
    out: Path = typer.Option(..., help="output folder: the set (out/set) and each block's training folder"),
    model: str = typer.Option("default", help="model name, hub id, folder or GGUF"),
    layers: str = typer.Option("all", help="blocks: all, 3, 0-5 or 0,4,8"),
    corpus: str = typer.Option("default", help="corpus read on the fly"),
    tokens: int = typer.Option(409_600, help="tokens read (one pass feeds every block's transcoder)"),
    features: int = typer.Option(2048, help="latents per transcoder"),
    k: int = typer.Option(32, help="active latents per token (TopK)"),
    arch: str = typer.Option("topk", help="topk or jumprelu"),
    skip_connection: bool = typer.Option(True, help="a linear skip path beside the sparse code"),
    batch_size: int = typer.Option(4096, help="rows per optimiser step"),
    quantize: str = typer.Option("int8", help="how the set is stored: int8, float16 or none"),
    seed: int = typer.Option(0, help="seed of initialisation and shuffle"),
    device: str = typer.Option("cpu", help="torch device for the model and the transcoders, e.g. cuda"),
) -> None:
    """Train a transcoder for every chosen block from one pass over the corpus (resumable), then save the set."""
    from ..sae import TrainConfig
    from ..sae.run import train_transcoders
    from ..sae.transcoder_set import TranscoderSet, save_transcoder_set

    tc = TrainConfig(n_tokens=tokens, batch_size=batch_size, seed=seed, checkpoint_every=20, device=device)
    runs, seconds = train_transcoders(
        out / "layers", model=model, layers=layers, corpus=corpus, n_features=features, k=k, arch=arch,
        skip_connection=skip_connection, train_cfg=tc,
    )  # fmt: skip
    for r in runs:
        m = getattr(r.sae, "train_metrics", {})
        console.print(f"{r.name}: fvu {m.get('fvu', float('nan')):.3f}  L0 {m.get('l0', float('nan')):.1f}")
    blocks = [int(r.sae.cfg.site.rsplit(".", 1)[1]) for r in runs]
    if blocks != list(range(len(blocks))):  # a set is indexed by block from 0: a few blocks are SAE folders only
        console.print(
            f"trained in {seconds:.0f} s; block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))} "
            f"saved under {out / 'layers'}, one SAE folder each (sae eval, atlas build --sae); no set was written, "
            "since a set (for graphs) holds blocks 0 to N-1"
        )
        return
    ts = TranscoderSet([r.sae for r in runs], model=runs[0].sae.cfg.model_source or {}, source=str(out / "set"))
    console.print(f"trained in {seconds:.0f} s; wrote {save_transcoder_set(ts, out / 'set', quantize=quantize)}")


@transcoders_app.command("eval")
@one_line_errors
def transcoders_eval(
    transcoders: str = typer.Option("default", help="transcoder set folder"),
    model: str = typer.Option("default", help="model name, hub id, folder or GGUF"),
    corpus: str = typer.Option("default", help="held-out text: read after --skip-tokens"),
    tokens: int = typer.Option(16_384, help="held-out tokens"),
    skip_tokens: int = typer.Option(2_000_000, help="corpus tokens skipped first (past the training text)"),
    json_out: Path | None = typer.Option(None, "--json", help="write the figures here"),
) -> None:
    """Per-block FVU of the MLP output and the replacement model's loss beside clean and ablated MLPs."""
    from .._io import atomic_write_json
    from ..sae.transcoder_set import evaluate_set, load_transcoder_set

    lm = _load(model, device=None, dtype=None)
    ts = load_transcoder_set(transcoders, lm=lm)
    res = evaluate_set(lm, ts, corpus=corpus, n_tokens=tokens, skip_tokens=skip_tokens)
    for i, f in enumerate(res["fvu"]):
        console.print(f"block {i:>2}: fvu {f:.3f}  L0 {res['l0'][i]:.1f}")
    r = res["loss"]
    console.print(
        f"loss: clean {r['loss_clean']:.3f}, replaced {r['loss_replaced']:.3f}, MLPs zero-ablated "
        f"{r['loss_zero_ablated']:.3f}, mean-ablated {r['loss_mean_ablated']:.3f}; recovered {r['loss_recovered']:.3f} "
        f"(vs mean {r['loss_recovered_vs_mean']:.3f})"
    )
    if json_out is not None:
        atomic_write_json(json_out, res)
        console.print(f"wrote {json_out}")

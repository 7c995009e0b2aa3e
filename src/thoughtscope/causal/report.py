"""Patching maps as files a person reads: JSON with both maps and their agreement, and a PNG heatmap per stream."""

from __future__ import annotations

from pathlib import Path

from .._io import atomic_write, atomic_write_json
from ..models import LoadedModel
from .patching import STREAMS, PatchPair, PatchResult, patch


def write_patch_png(res: PatchResult, path: str | Path) -> Path:
    """Per stream, activation patching beside attribution patching (layers down, the prompt's tokens across)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = list(res.patched)
    T = len(res.tokens)
    fig, axes = plt.subplots(len(streams), 2, figsize=(2 + 0.45 * T * 2, 1 + 2.6 * len(streams)), squeeze=False)
    for row, s in enumerate(streams):
        lim = max(float(res.patched[s].abs().max()), float(res.attributed[s].abs().max()), 1e-6)
        for col, (name, grid) in enumerate(
            (("activation patching", res.patched[s]), ("attribution", res.attributed[s]))
        ):
            ax = axes[row][col]
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            title = f"{s}: {name}" + (f" (Spearman {res.spearman(s):.2f})" if col else "")
            ax.set_title(title, fontsize=9)
            ax.set_xticks(range(T), [repr(t)[1:-1] for t in res.tokens], rotation=90, fontsize=7)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def patch_to_files(
    lm: LoadedModel,
    pair: PatchPair,
    *,
    streams=STREAMS,
    json_path: str | Path | None = None,
    png_path: str | Path | None = None,
) -> PatchResult:
    """Patch one pair both ways and write what was asked for; the result for printing."""
    res = patch(lm, pair, streams)
    if json_path is not None:
        atomic_write_json(json_path, {"pair": vars(pair), **res.to_dict()})
    if png_path is not None:
        write_patch_png(res, png_path)
    return res


def analyze_report(lm: LoadedModel, sae, text: str, *, lens=None, with_lens: bool = False, target=None, k: int = 5):
    """One token-by-token reading for `thoughtscope analyze`: the SAE features per token, and optionally the lens
    at every layer and position and, for `target` as the next token, the features that pushed it (checked). The
    three share one reading of the text (`residuals.ResidualCache`): the lens runs only the blocks above the SAE's
    site, with the SAE spliced in, and the attribution is one backward pass through them."""
    from ..analyzer import analyze_text
    from .attribution import attribute
    from .lens import lens_view
    from .residuals import ResidualCache

    cache = ResidualCache(sae)
    with cache.record(lm):
        a = analyze_text(lm, sae, text, k=k)
    out = {
        "tokens": a.tokens,
        "pieces": [{"text": pc.text, "positions": list(pc.positions)} for pc in a.pieces],
        "features": a.top,
        "recon_error": a.recon_error,
        "peaks": a.peaks,
    }
    if with_lens or lens is not None:
        out["lens"] = lens_view(lm, text, lens=lens, track=target, k=k, cache=cache).to_dict()
    if target is not None:
        out["why"] = attribute(lm, sae, text, target, cache=cache).to_dict()
    return out


def node_name(graph, node: int, lm=None, labels: dict | None = None) -> str:
    """One graph node as a person reads it: a feature (block, index, position, token, label), an error, a token or
    a logit."""
    toks = graph.token_strs
    if node < graph.error_start:
        layer, pos, feat = (int(v) for v in graph.active_features[graph.selected_features[node]])
        label = (labels or {}).get((layer, feat))
        return f"L{layer} #{feat} @{pos} {toks[pos]!r}" + (f" ({label})" if label else "")
    if node < graph.token_start:
        layer, pos = divmod(node - graph.error_start, graph.n_pos)
        return f"L{layer} error @{pos} {toks[pos]!r}"
    if node < graph.logit_start:
        return f"token {toks[node - graph.token_start]!r} @{node - graph.token_start}"
    i = node - graph.logit_start
    tid = int(graph.logit_tokens[i])
    text = lm.tokenizer.decode([tid]) if lm is not None else str(tid)
    return f"logit {text!r} (p={float(graph.logit_probabilities[i]):.2f})"


def graph_text(graph, lm=None, labels: dict | None = None, n_paths: int = 5) -> list[str]:
    """The graph as lines of text: targets, scores, and the strongest paths into the first target."""
    from .influence import graph_scores, top_paths

    rep, comp = graph_scores(graph)
    lines = [
        f"{graph.n_pos} tokens, {int(graph.config.get('n_active', len(graph.active_features)))} active features, "
        f"{graph.n_selected} nodes; replacement {rep:.3f}, completeness {comp:.3f}; "
        f"{graph.config.get('seconds', 0):.1f} s",
        "targets: " + ", ".join(node_name(graph, graph.logit_node(i), lm) for i in range(graph.n_logits)),
        f"strongest paths from the prompt's tokens into {node_name(graph, graph.logit_node(0), lm)}:",
    ]
    target = "the target" if lm is None else repr(lm.tokenizer.decode([int(graph.logit_tokens[0])]))
    for score, path in top_paths(graph, n_paths):
        lines.append(f"  {score:.3g}: " + " -> ".join([*(node_name(graph, n, lm, labels) for n in path[:-1]), target]))
    return lines

"""Feature cards for the terminal: what activates a feature (token heatmaps), what it does, who its neighbours are."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..display import lone_token_text, window_pieces
from ..values import is_finite
from .best import at_or_below_control
from .db import Atlas, Example

BARS = " ▁▂▃▄▅▆▇█"


def _tok(tokenizer, tid: int) -> str:
    if tokenizer is None:
        return f"[{tid}]"
    return lone_token_text(tokenizer, tid).replace("\n", "⏎")


def _shade(a: float, scale: float, peak: bool) -> str:
    if a <= 0:
        return "" if peak else "dim"
    g = int(255 - 200 * min(1.0, a / scale))
    return f"black on rgb(255,{g},{int(g * 0.6)})" + (" bold underline" if peak else "")


def heat_line(ex: Example, tokenizer, max_act: float, *, left: int = 10, right: int = 4) -> Text:
    """One context as text shaded by the feature's activation: each piece of text (a token, or the tokens that
    spell one character together: `thoughtscope.display`) by its strongest token."""
    line = Text()
    scale = max_act if max_act > 0 else 1.0
    acts = {p: a for p, _, a in ex.token_acts() if p >= 1 and ex.pos - left <= p <= ex.pos + right}
    if not acts:
        return line
    if tokenizer is None:
        for p, a in acts.items():
            line.append(f"[{ex.tokens[p]}]", style=_shade(a, scale, p == ex.pos))
        return line
    for pc in window_pieces(tokenizer, ex.tokens, min(acts), max(acts)):
        a = max((acts[q] for q in pc.positions if q in acts), default=0.0)
        line.append(pc.text.replace("\n", "⏎"), style=_shade(a, scale, ex.pos in pc.positions))
    return line


def sparkline(hist) -> str:
    m = max(1, int(max(hist))) if len(hist) else 1
    nz = [i for i, h in enumerate(hist) if h > 0]
    if not nz:
        return "(never active)"
    lo, hi = nz[0], nz[-1]
    return "".join(BARS[min(8, int(round(8 * h / m)))] for h in hist[lo : hi + 1])


def score_line(ex: dict) -> str:
    """How far to trust an explanation, in one line: its held-out scores, the shuffled control, who wrote and
    who scored it (the same words in cards, the report and search results)."""

    if not ex.get("explanation"):
        return "no explanation yet (thoughtscope atlas explain)"

    def f(k: str) -> str:
        return f"{ex[k]:.2f}" if ex.get(k) is not None else "–"

    parts = [
        f"detection AUROC {f('detection_auroc')} (shuffled control {f('shuffled_detection_auroc')})",
        f"bal. acc. {f('detection_bacc')}",
    ]
    if ex.get("fuzz_auroc") is not None:
        parts.append(f"fuzzing AUROC {f('fuzz_auroc')}")
    method = ex.get("method") or "method not recorded"
    by = (
        f"{method} ({ex.get('explainer')})"
        if ex.get("explainer") and ex.get("explainer") != f"offline:{method}"
        else method
    )
    scored = ex.get("scorer_method") or ex.get("scorer") or "not scored"
    warn = "; at or below its shuffled control: do not trust it" if at_or_below_control(ex) else ""
    return ", ".join(parts) + f"; written by {by}, scored by {scored}{warn}"


def feature_card(atlas: Atlas, n: int, tokenizer=None, *, n_top: int = 8, n_quantile: int = 5):
    """A rich renderable for feature n."""
    f = atlas.feature(n)
    head = Text()
    head.append(f"feature {n}", style="bold")
    head.append(
        f"   density {f.density:.2e}   max {f.max_act:.3g}   mean {f.mean_act:.3g}   active on {f.n_active:,} tokens"
    )
    parts: list = [head]
    ex = f.explanation
    if ex:
        t = Text()
        if ex["status"] == "ok":
            t.append("explanation: ", style="bold cyan")
            t.append(ex["explanation"] or "")
            t.append(f"\n  {score_line(ex)}", style="dim")
        else:
            t.append(f"explanation failed: {ex.get('error')}", style="red")
        parts.append(t)
    if f.dead:
        parts.append(Text("dead: never active on the atlas corpus", style="yellow"))
    else:
        parts.append(Text(f"activation histogram (log bins): {sparkline(f.hist)}", style="dim"))
        parts.append(Text("top activations", style="bold"))
        for e in atlas.examples(n, "top", limit=n_top):
            line = Text(f"{e.act:8.3g}  ", style="dim")
            line.append_text(heat_line(e, tokenizer, f.max_act))
            parts.append(line)
        q = atlas.examples(n, "quantile")
        if q and f.n_active > len(q):  # with fewer activations than that, the sample just repeats the top list
            parts.append(Text("weaker activations (rank-quantile sample)", style="bold"))
            step = max(1, len(q) // n_quantile)
            for e in q[::step][:n_quantile]:
                line = Text(f"{e.act:8.3g}  ", style="dim")
                line.append_text(heat_line(e, tokenizer, f.max_act))
                parts.append(line)
    parts += _effects_table(atlas, f, n, tokenizer)
    return Panel(Group(*parts), title=f"[bold]{atlas.meta.get('model')} {atlas.meta.get('site')} #{n}", expand=True)


def logit_scale(atlas: Atlas, n: int) -> float | None:
    """Feature n's typical |logit change| (what its logit effects are divided by to be shown in x typical), or
    None for an atlas built before it was recorded (its effects are shown in raw logits)."""
    typical = atlas.meta.get("logit_typical")
    if not isinstance(typical, list) or not 0 <= n < len(typical):
        return None
    v = typical[n]
    return float(v) if is_finite(v) and v > 0 else None


def _effects_table(atlas: Atlas, f, n: int, tokenizer) -> list:
    """Promoted and suppressed tokens (in x typical when the atlas records the scale, else raw logits) and the
    nearest features."""
    scale = logit_scale(atlas, n)
    unit = "x typical" if scale else "raw logits"
    tbl = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    tbl.add_column("promotes")
    tbl.add_column(unit)
    tbl.add_column("suppresses")
    tbl.add_column(unit)
    tbl.add_column("neighbours (cos)")

    def shown(v: float) -> str:
        return f"{v / scale:+.1f}" if scale else f"{v:+.3f}"

    for i in range(max(len(f.logits_pos), len(f.neighbours))):
        p = f.logits_pos[i] if i < len(f.logits_pos) else None
        q_ = f.logits_neg[i] if i < len(f.logits_neg) else None
        nb = f.neighbours[i] if i < len(f.neighbours) else None
        tbl.add_row(
            repr(_tok(tokenizer, p[0])) if p else "",
            shown(p[1]) if p else "",
            repr(_tok(tokenizer, q_[0])) if q_ else "",
            shown(q_[1]) if q_ else "",
            f"{nb[0]} ({nb[1]:.2f})" if nb else "",
        )
    note = (
        "logit effects in x typical: multiples of the median |logit change| a random direction of the same norm makes"
        if scale
        else "logit effects in raw logits (an atlas built before the typical scale was recorded)"
    )
    return [tbl, Text(note, style="dim")]


def show_feature(atlas: Atlas, n: int, tokenizer=None, console=None, **kw) -> None:
    from rich.console import Console

    (console or Console()).print(feature_card(atlas, n, tokenizer, **kw))


def text_card(result: dict, *, max_shown_tokens: int = 64):
    """Render top_features_for_text: per token, its most active features (the first `max_shown_tokens` tokens)."""
    tbl = Table(title="features per token", box=None)
    tbl.add_column("pos", justify="right")
    tbl.add_column("token")
    tbl.add_column("top features (activation)")
    for tf in result["tokens"][:max_shown_tokens]:
        tbl.add_row(str(tf.pos), repr(tf.token), ", ".join(f"{n} ({a:.2f})" for n, a in tf.features))
    return tbl


def load_tokenizer(atlas: Atlas):
    """The tokenizer of the atlas's model, loaded alone (never the weights); None if it cannot be found.

    Tried in order: the converted folder and the spec the atlas recorded (a folder or hub id in the local
    cache), the GGUF file of the default / a .gguf model (its tokenizer is read from the GGUF metadata),
    and for a test model ('tiny:<arch>') the byte-level tokenizer it was built with. Without one, cards and
    reports show token ids.
    """
    src = atlas.meta.get("model_source") or {}
    spec = str(src.get("spec") or atlas.meta.get("model") or "")
    if spec.startswith("tiny:"):
        from ..models import byte_tokenizer

        return byte_tokenizer(int((src.get("config") or {}).get("vocab_size", 256)))
    from transformers import AutoTokenizer

    for cand in (src.get("converted"), src.get("path"), spec):
        if not cand or cand == "default" or cand.endswith(".gguf"):
            continue
        try:
            return AutoTokenizer.from_pretrained(str(cand), local_files_only=True)
        except Exception:  # noqa: BLE001, S112 - any failure means "try the next source"
            continue
    gguf = src.get("gguf")
    if not gguf and (spec == "default" or spec.endswith(".gguf")):
        from ..models import default_gguf_path

        gguf = str(default_gguf_path()) if spec == "default" else spec
    if gguf and Path(gguf).is_file():
        try:
            return AutoTokenizer.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name)
        except Exception:  # noqa: BLE001 - fall through to token ids
            return None
    return None

"""`thoughtscope features ...`: which features fire on a text, which separate a concept, what each writes,
their reference max, and atlas cards. (`feature` is kept as a hidden alias of this group.)"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import _fail, _model_and_sae, _open_atlas, console, one_line_errors

_MODEL_HELP = "model (default: the one the SAE or atlas was made with; 'default' when none is recorded)"

features_app = typer.Typer(
    no_args_is_help=True,
    help="SAE features: what fires on a text, concept search, output effects, reference maxima, atlas cards.",
)


@features_app.command("contrast")
@one_line_errors
def contrast_cmd(
    prompts: Path = typer.Option(
        ..., help="prompt file where the concept is present: a .json list, .jsonl, or one prompt per line"
    ),
    controls: Path = typer.Option(..., help="prompt file without it (same formats)"),
    sae: str = typer.Option("default"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    atlas: Path | None = typer.Option(None, help="take model, SAE and feature maxima from this atlas"),
    score: str = typer.Option(
        "",
        help="z (standardised mean difference of per-text max), freq, or max (mean "
        "difference / the feature's reference max); default: max with --atlas, else z",
    ),
    max_control_rate: float = typer.Option(0.5, help="skip features that fire on more than this share of controls"),
    top: int = typer.Option(20, "--top", "--k", help="how many features to list"),
) -> None:
    """Features most active on the prompts and least on the controls, ranked by a stated score."""
    from ..features import SCORES, contrast_prompt_files

    at, lm, sae_obj = _model_and_sae(model, sae, atlas)
    score, rows = contrast_prompt_files(
        lm, sae_obj, prompts, controls, atlas=at, score=score or None, top=top, max_control_rate=max_control_rate
    )
    table = Table(title=f"contrastive search, score {score}: {SCORES[score]}")
    for c in ("feature", "score", "mean on prompts", "mean on controls", "fires on prompts", "fires on controls"):
        table.add_column(c)
    for r in rows:
        table.add_row(
            str(r.feature),
            f"{r.score:.3f}",
            f"{r.mean_prompts:.3f}",
            f"{r.mean_controls:.3f}",
            f"{r.freq_prompts:.0%}",
            f"{r.freq_controls:.0%}",
        )
    console.print(table)


@features_app.command("output")
@one_line_errors
def output_cmd(
    keywords: str = typer.Argument(..., help="comma-separated words the features should make the model write"),
    sae: str = typer.Option("default"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    top: int = typer.Option(20),
) -> None:
    """Features whose decoder direction, read through the final norm and unembedding, promotes the words."""
    from ..features import concept_token_ids, output_features

    _, lm, sae_obj = _model_and_sae(model, sae, None)
    words = [w.strip() for w in keywords.split(",") if w.strip()]
    toks = concept_token_ids(lm.tokenizer, words)
    if not toks:
        _fail(f"none of {words} gives a token id to score against")
    table = Table(
        title="output effect: mean z-score of the words' logits within each feature's logit row; tokens "
        + ", ".join(repr(lm.tokenizer.decode([t])) for t in toks)
    )
    table.add_column("feature")
    table.add_column("z")
    for r in output_features(lm, sae_obj, toks, top=top):
        table.add_row(str(r.feature), f"{r.score:.2f}")
    console.print(table)


@features_app.command("at")
@one_line_errors
def at_cmd(
    text: str = typer.Argument(...),
    token: str = typer.Option("-1", help="token index, or a substring of the text"),
    sae: str = typer.Option("default"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
    top: int = typer.Option(10),
) -> None:
    """The strongest features at one token of a text."""
    from ..features import top_features_at

    _, lm, sae_obj = _model_and_sae(model, sae, None)
    tok = int(token) if token.lstrip("-").isdigit() else token
    piece, rows = top_features_at(lm, sae_obj, None, text, tok, top=top)
    console.print(f"token {piece!r}:")
    for f, v in rows:
        console.print(f"  {f:>6}  {v:.3f}")


@features_app.command("max")
@one_line_errors
def max_cmd(
    features: str = typer.Argument(..., help="comma-separated feature ids"),
    sae: str = typer.Option("default"),
    atlas: Path | None = typer.Option(None, help="read the maxima from this atlas instead of the SAE folder"),
) -> None:
    """A feature's reference max activation (the "x max" unit of sliders) and where it came from."""
    from ..features import FeatureError, feature_max
    from ..sae import load_sae

    sae_obj = load_sae(sae)
    ref = feature_max(sae_obj, _open_atlas(atlas) if atlas is not None else None)
    if ref is None:
        raise FeatureError(
            f"the SAE at {sae_obj.source_dir} stores no feature maxima; measure them with "
            f"'thoughtscope features stats --sae {sae}' or pass --atlas"
        )
    n = ref.values.numel()
    for f in [int(x) for x in features.split(",") if x.strip()]:
        if not 0 <= f < n:
            raise FeatureError(f"feature {f} is out of range: the SAE has {n} features (0..{n - 1})")
        console.print(f"feature {f}: max {float(ref.values[f]):.4g}  (source: {ref.source})")


@features_app.command("stats")
@one_line_errors
def stats_cmd(
    sae: str = typer.Option("default", help="SAE folder; the statistics are written into it"),
    corpus: str = typer.Option("default", help="corpus to measure on"),
    tokens: int = typer.Option(200_000, help="token budget"),
    model: str | None = typer.Option(None, help=_MODEL_HELP),
) -> None:
    """Measure every feature's max activation and frequency over a corpus and store them with the SAE."""
    from ..corpus import Corpus
    from ..features import measure_feature_stats
    from ..sae.stats import save_feature_stats

    _, lm, sae_obj = _model_and_sae(model, sae, None)
    st = measure_feature_stats(lm, sae_obj, Corpus(corpus), n_tokens=tokens)
    path = save_feature_stats(st, sae_obj.source_dir)
    console.print(
        f"wrote {path}: {st.n_tokens:,} tokens of {st.source}; median max {float(st.max_act.median()):.3f}, "
        f"{int((st.frequency > 0).sum())} of {st.max_act.numel()} features fired"
    )


@features_app.command("top")
@one_line_errors
def top_cmd(
    text: str = typer.Option(..., "--text"),
    atlas: Path = typer.Option(..., help="atlas folder"),
    k: int = typer.Option(5),
) -> None:
    """The features most active on a text, per token, with their atlas labels."""
    from ..atlas import open_with_model, text_card, top_features_for_text

    at, lm, sae = open_with_model(atlas)
    console.print(text_card(top_features_for_text(lm, sae, text, k=k)))


@features_app.command("show")
@one_line_errors
def show_cmd(n: int = typer.Argument(...), atlas: Path = typer.Option(..., help="atlas folder")) -> None:
    """A feature's card: statistics, explanation and score, logit effects, neighbours, contexts as a heatmap."""
    from ..atlas import show_feature
    from ..atlas.cards import load_tokenizer

    at = _open_atlas(atlas)
    show_feature(at, n, load_tokenizer(at), console)


@features_app.command("random")
@one_line_errors
def random_cmd(
    atlas: Path = typer.Option(...),
    n: int = typer.Option(3, "-n", "--n", help="how many features"),
    seed: int | None = None,
) -> None:
    """Cards for uniformly random alive features: the unbiased way to browse."""
    from ..atlas import show_feature
    from ..atlas.cards import load_tokenizer

    at = _open_atlas(atlas)
    tok = load_tokenizer(at)
    for i in at.random_features(n, seed=seed):
        show_feature(at, i, tok, console)


@features_app.command("search")
@one_line_errors
def search_cmd(
    query: str = typer.Argument(..., help="a concept: a word or a short phrase, e.g. ocean"),
    atlas: Path | None = typer.Option(None, help="atlas folder (default: the first-start atlas of the default SAE)"),
    k: int = typer.Option(20, "--k", "--limit", help="how many features to list"),
    templates: bool = typer.Option(True, help="also run the model on built-in sentences with the word"),
    as_json: bool = typer.Option(False, "--json", help="print the hits as JSON"),
) -> None:
    """Features for a concept by meaning: what they fire on (the word, its embedding neighbours, sentences with
    it), what they write, and their explanation; every hit with each signal's score and the tokens behind it."""
    import json

    from ..atlas.search import SIGNALS, check_query, search_atlas

    query = check_query(query)
    if atlas is None:
        from ..sae import load_sae
        from ..server.workbench import default_atlas_dir

        atlas = default_atlas_dir(load_sae("default"))
    at, hits, note = search_atlas(atlas, query, k=k, templates=templates)
    if as_json:
        out = {"query": query, "atlas": str(at.path), "hits": [h.to_dict() for h in hits]}
        typer.echo(json.dumps(out | ({"note": note} if note else {})))
        return
    if not hits:
        console.print(f"no feature found for {query!r}")
    from rich.markup import escape

    from ..atlas.cards import score_line

    for h in hits:  # the feature first on its line: scripts and tests read it there
        label = escape(h.label or "(no explanation)")
        console.print(f"[bold]{h.feature}[/bold]  {h.score:.3f}  {label}", highlight=False)
        ev = "; ".join(f"{s} {h.signals[s]:.2f} {h.tokens.get(s, [])}" for s in SIGNALS if h.signals[s] > 0)
        console.print(f"      [dim]{escape(ev)}[/dim]", highlight=False)
        if h.label:
            console.print(f"      [dim]{score_line(at.explanation(h.feature) or {})}[/dim]", highlight=False)
    if note:  # after the hits, so the first line is still the best feature
        console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False)

"""`thoughtscope corpus info [SPEC]`: what a corpus spec resolves to (files, documents, manifest checksum)."""

from __future__ import annotations

import json

import typer

from .common import console

corpus_app = typer.Typer(no_args_is_help=True, help="Describe the text corpora that harvests and atlases read.")


@corpus_app.command()
def info(
    spec: str = typer.Argument("default", help="'default', a file, a folder, a .jsonl file or hf:<dataset>"),
    text_field: str = typer.Option("text", help="JSONL / dataset field holding the text"),
) -> None:
    """Print a corpus description as JSON (the default corpus is built by scripts/build_corpus.sh)."""
    from ..corpus import Corpus

    console.print_json(json.dumps(Corpus(spec, text_field=text_field).describe(), ensure_ascii=False))

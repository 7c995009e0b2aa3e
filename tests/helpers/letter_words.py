"""A tiny model whose vocabulary is whole words and whose residual knows each word's first letter: the identity-block
llama (resid.L == token embedding) over a word-level tokenizer, word embeddings = a letter direction + noise; for
the real-model SAE-quality tests (sparse probing, first-letter absorption, the whole `real_quality`)."""

from __future__ import annotations

import functools
import random
import string
from pathlib import Path

import torch

from thoughtscope.models import LoadedModel, tiny_model

TEMPLATE_WORDS = ["has", "the", "first", "letter"]
D_MODEL = 32


def pseudo_words(letters: str = "abcdefgh", per_letter: int = 24, seed: int = 0) -> list[str]:
    """Distinct lowercase pseudo-words, `per_letter` starting with each letter."""
    rng = random.Random(seed)
    out: list[str] = []
    for ch in letters:
        got: set[str] = set()
        while len(got) < per_letter:
            got.add(ch + "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 5))))
        out += sorted(got)
    return [w for w in out if w not in TEMPLATE_WORDS]


def word_level_tokenizer(words: list[str]):
    """Byte symbols, then every word bare and with a leading space (Ġ), the template's pieces and capitals."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"])}
    extra = [":", "."] + ["Ġ" + c for c in string.ascii_uppercase]
    for w in [*sorted(pre_tokenizers.ByteLevel.alphabet()), *extra]:
        table.setdefault(w, len(table))
    for w in [*TEMPLATE_WORDS, *words]:
        table.setdefault(w, len(table))
        table.setdefault("Ġ" + w, len(table))
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return tok, table


@functools.cache
def letter_model(seed: int = 0) -> LoadedModel:
    """The identity-block tiny llama over the word-level tokenizer; a word's embedding (bare or with its space) is
    3 × its first letter's direction (orthonormal directions) + noise of norm about 0.5."""
    words = pseudo_words(seed=seed)
    tok, table = word_level_tokenizer(words)
    lm = tiny_model("llama", d_model=D_MODEL, n_layers=2, vocab=len(table), seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    basis = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=g))[0].T  # rows: orthonormal
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        E = lm.model.get_input_embeddings().weight
        E.copy_(0.1 * torch.randn(E.shape, generator=g))
        for t, i in table.items():
            w = t[1:] if t.startswith("Ġ") else t
            if len(w) >= 2 and w.isalpha():
                E[i] = 3.0 * basis[(ord(w[0].lower()) - 97) % D_MODEL] + 0.1 * torch.randn(D_MODEL, generator=g)
    return LoadedModel(lm.model, tok, f"letters-{D_MODEL}-seed{seed}", {"spec": "tiny:letters"})


def write_word_corpus(path: Path, n_docs: int = 400, seed: int = 0) -> Path:
    """Documents of the tiny model's words (a corpus for its atlas and spliced loss)."""
    rng = random.Random(seed)
    words = pseudo_words(seed=0) + TEMPLATE_WORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".\n\n\n")
    return path

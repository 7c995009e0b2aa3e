"""Builders shared by several test files (importable because pyproject puts tests/ on pytest's path)."""

from __future__ import annotations

import contextlib

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny corpus",
    "der schnelle braune Fuchs springt",
    "packing documents into fixed length contexts",
    "alpha beta gamma delta epsilon zeta eta theta",
]


def tiny_bpe_tokenizer(sentences: list[str] = SENTENCES, vocab_size: int = 400):
    """A byte-level BPE trained in memory: no download, has <bos> and <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    t.train_from_iterator(sentences * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>")


def make_store_rows(n: int, d: int, seed: int = 0, *, doc_position: bool = True):
    """Random store rows; row i carries the tag i in acts[:, 0] and token_id (exact in float32/16/bf16 for i<256)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n, d, generator=g)
    acts[:, 0] = torch.arange(n, dtype=torch.float32)
    idx = torch.arange(n)
    meta = {
        "doc_id": idx // 50,
        "position": (idx % 16).to(torch.int32),
        "token_id": idx.to(torch.int32),
    }
    if doc_position:
        meta["doc_position"] = (idx % 50).to(torch.int32)
    return acts, meta


def env_with_tests_on_path() -> dict:
    """The environment for a child Python process that imports the tests/helpers package."""
    import os
    from pathlib import Path

    here = str(Path(__file__).parent.parent)  # tests/, where the helpers package lives
    old = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + old if old else "")}


@contextlib.contextmanager
def single_thread():
    """Tiny matmuls are far faster single-threaded on a loaded 2-core machine than with a contended pool."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

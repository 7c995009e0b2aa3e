"""Builders shared by several test files (importable because pyproject puts tests/ on pytest's path)."""

from __future__ import annotations

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

"""A download-free byte-level tokenizer with whole-word, sub-word and lone-byte tokens, as a BPE model's vocabulary
has them: for the output-side explanation's tests (which tokens read as words)."""

from __future__ import annotations

WORDS = ["Ġocean", "ocean", "ĠOcean", "Ġsea", "ĠSea", "Ġwaves", "Ġmiscon", "asgow", "ĠNeander", "Ġthe", "'):", "Ġ("]


def word_tokenizer():
    """(tokenizer, {token string: id}): the 256 byte symbols, then WORDS (Ġ is a leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    table = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        table[ch] = len(table)
    for w in WORDS:
        table[w] = len(table)
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return tok, table

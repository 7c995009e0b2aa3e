"""Using a trained NLA: explain any token's activation, score the words, steer by editing the words.

from thoughtscope.nla import load_nla, explain_text
nla = load_nla("default")                      # the NLA shipped for SmolLM2-135M-Instruct
for row in explain_text(nla, "The cat sat on the", positions=[-1]):
    print(row["token"], row["explanation"], row["fve"])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .bundle import NLA
from .core import CONFIG_NAME, NLAError, normalise


def default_nla_path() -> Path:
    """The NLA shipped inside the package (src/thoughtscope/assets/default_nla)."""
    from ..paths import asset

    return asset("default_nla")


def load_nla(spec: str | os.PathLike = "default", *, lm=None, which: str = "final") -> NLA:
    """Load an NLA: "default" (shipped), a thoughtscope NLA folder, or a released checkpoint pair.

    A released pair (folders with nla_meta.yaml) is given as "AV_DIR" when the AR sits beside it as
    "<name>-ar" / "ar", or as "AV_DIR,AR_DIR".
    """
    from .interop import SIDECAR, load_released

    spec = str(spec)
    if spec == "default":
        path = default_nla_path()
        if not (path / CONFIG_NAME).is_file():
            raise NLAError(
                f"the shipped NLA is missing at {path}: reinstall thoughtscope or train one with "
                f"`thoughtscope nla train` (see docs/nla.md)"
            )
        return NLA.load(path, lm=lm, which=which)
    if "," in spec:
        av_dir, ar_dir = spec.split(",", 1)
        return load_released(av_dir, ar_dir, target=lm)
    path = Path(spec)
    if (path / CONFIG_NAME).is_file():
        return NLA.load(path, lm=lm, which=which)
    if (path / SIDECAR).is_file():
        return load_released(path, None, target=lm)
    raise NLAError(
        f"{path} is not an NLA: expected a folder with {CONFIG_NAME} (thoughtscope) or "
        f"{SIDECAR} (a released checkpoint)"
    )


def explain_text(
    nla: NLA, text: str, positions: Sequence[int] = (-1,), *, samples: int = 1, temperature: float = 1.0
) -> list[dict]:
    """For each position: the token, its explanation(s) and the round-trip FVE of each explanation.

    FVE here is per vector, 1 − ‖p̂ − ĝ‖²/(d·Var) with Var = 1 − ‖μ‖² of the NLA's training data, so it
    is on the same scale as `nla eval`'s held-out number.
    """
    vecs, pos, toks = nla.activations(text, positions)
    out = []
    for i in range(vecs.shape[0]):
        expl = nla.explain(vecs[i : i + 1], samples=samples, do_sample=samples > 1, temperature=temperature)
        nla.ar.eval()
        rec = nla.ar.predict(expl, allow_empty=True, truncate=True)
        f = nla.fve_of(rec, vecs[i : i + 1].expand(len(expl), -1))
        cos = torch.nn.functional.cosine_similarity(rec, vecs[i : i + 1].expand_as(rec), dim=-1)
        best = int(f.argmax())
        out.append(
            {
                "position": pos[i],
                "token": toks[i],
                "explanation": expl[best],
                "fve": float(f[best]),
                "cos": float(cos[best]),
                "samples": [{"explanation": e, "fve": float(x)} for e, x in zip(expl, f)],
            }
        )
    return out


def steering_delta(nla: NLA, original: str, edited: str, *, norm: float | None = None) -> torch.Tensor:
    """Δ = AR(edited) − AR(original), on the activation scale (√d-normalised outputs × norm/√d).

    norm defaults to the data's mean activation norm at the site.
    """
    pred = nla.reconstruct([original, edited])
    p = normalise(pred)
    d = p.shape[-1]
    scale = (norm or nla.cfg.mean_norm or nla.cfg.injection_scale) / d**0.5
    return (p[1] - p[0]) * scale


def steer_from_words(
    nla: NLA,
    prompt: str,
    original: str,
    edited: str,
    *,
    scale: float = 1.0,
    max_new_tokens: int = 24,
    seed: int = 0,
    temperature: float = 0.0,
) -> dict:
    """Edit an explanation and add Δ = AR(edited) − AR(original) at the NLA's site while generating.

    Uses the steering module's add-vector intervention, so the edit is the same object a user would
    build by hand with `thoughtscope.steer.add_vector`.
    """
    from thoughtscope.steer import GenerationConfig, add_vector, compare

    delta = steering_delta(nla, original, edited)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=False)
    cmp = compare(nla.lm, [prompt], [add_vector(delta, nla.cfg.site, scale=scale)], cfg)[0]
    return {
        "prompt": prompt,
        "original": original,
        "edited": edited,
        "delta_norm": float(delta.norm()),
        "unsteered": cmp.unsteered,
        "steered": cmp.steered,
    }

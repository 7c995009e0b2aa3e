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

from ..display import piece_index, token_pieces
from ..renamed import warn_renamed
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


def training_positions(nla: NLA) -> tuple[int, int] | None:
    """The token positions (counted as `explain_text` counts them, a prepended BOS included) the NLA's training
    vectors were read at, from the data recipe recorded in its config; None when the config does not say."""
    dc = nla.cfg.extra.get("data_config") or {}
    if "min_position" not in dc or "max_position" not in dc:
        return None
    off = 1 if nla.lm.tokenizer.bos_token_id is not None else 0  # `nla data` reads documents after a BOS too
    return int(dc["min_position"]) + off, int(dc["max_position"]) - 1 + off


def explain_text(
    nla: NLA,
    text: str,
    positions: Sequence[int] = (-1,),
    *,
    samples: int = 1,
    temperature: float = 1.0,
    seed: int | None = 0,
) -> list[dict]:
    """For each position: the token, the NLA's greedy explanation and its round-trip FVE.

    `token` is the text the position shows whole: where a byte-level tokenizer splits a character over several
    tokens it is that character (`thoughtscope.display`), and `token_positions` lists the tokens it spans.

    Positions index the tokens the model reads, so with a BOS-prepending tokenizer (SmolLM2 prepends
    <|im_start|>) position 0 is that token and the text's first token is 1; negative positions count from the
    end. Position 0 is refused: it is the attention sink, whose activation says nothing about the text.

    samples=N > 1 also samples N explanations (seeded by `seed` and the position; None leaves the global RNG
    alone), lists them in `samples` (else `samples` holds the greedy one) and reports the one that reconstructs
    the true vector best as `oracle` (`sample` is its 1-based number): a pick that needs the answer, so its score
    is a ceiling, never the NLA's FVE. `fve` is always the greedy explanation's. `warning` says when a position
    lies outside those the NLA was trained on.

    FVE here is per vector, 1 − ‖p̂ − ĝ‖²/(d·Var) with Var = 1 − ‖μ‖² of the NLA's training data, so it
    is on the same scale as `nla eval`'s held-out number.
    """
    if samples < 1:
        raise NLAError(f"samples must be at least 1, got {samples}")
    ids, att = nla.lm.tokenize(text)
    n = int(att[0].sum())
    sink = [p for p in positions if (p + n if p < 0 else p) == 0]
    if sink:
        bos = nla.lm.tokenizer.bos_token_id
        what = f"BOS {nla.lm.tokenizer.convert_ids_to_tokens(bos)}" if bos is not None else "the first token"
        which = "position 0" if sink[0] == 0 else f"position {sink[0]} (= 0)"
        # short enough for one line of an 80-column terminal
        raise NLAError(f"{which} is the attention sink ({what}); use 1..{n - 1} or -1")
    vecs, pos, _ = nla.activations(text, positions)
    pieces = token_pieces(nla.lm.tokenizer, ids[0][att[0].bool()].tolist())
    piece_at = piece_index(pieces)
    trained = training_positions(nla)
    out = []
    for i in range(vecs.shape[0]):
        v = vecs[i : i + 1]
        expl = nla.explain(v, do_sample=False)
        if samples > 1:
            cuda = [nla.av.device.index or 0] if nla.av.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed * 1_000_003 + pos[i])
                expl += nla.explain(v, samples=samples, do_sample=True, temperature=temperature)
        nla.ar.eval()
        rec = nla.ar.predict(expl, allow_empty=True, truncate=True)
        f = nla.fve_of(rec, v.expand(len(expl), -1))
        cos = torch.nn.functional.cosine_similarity(rec, v.expand_as(rec), dim=-1)
        row = {
            "position": pos[i],
            # the whole character(s) the token belongs to, and their positions (one character may span tokens)
            "token": pieces[piece_at[pos[i]]].text,
            "token_positions": list(pieces[piece_at[pos[i]]].positions),
            "explanation": expl[0],
            "fve": float(f[0]),
            "cos": float(cos[0]),
            # every explanation written here: the greedy one, or with samples=N > 1 the N sampled ones
            "samples": [
                {"explanation": e, "fve": float(x), "greedy": j == 0}
                for j, (e, x) in enumerate(zip(expl, f))
                if (j == 0) == (samples == 1)
            ],
            "oracle": None,
            "warning": None,
        }
        if samples > 1:
            best = 1 + int(f[1:].argmax())
            row["oracle"] = {"explanation": expl[best], "score": float(f[best]), "of": samples, "sample": best}
        if trained is not None and not trained[0] <= pos[i] <= trained[1]:
            row["warning"] = (
                f"position {pos[i]} is outside the positions this NLA was trained on ({trained[0]}–{trained[1]}): "
                f"its explanation there is untested"
            )
        out.append(row)
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
    strength: float = 1.0,
    max_new_tokens: int = 24,
    seed: int = 0,
    temperature: float = 0.0,
    scale: float | None = None,
    chat: bool | None = None,
) -> dict:
    """Edit an explanation and add strength · Δ, Δ = AR(edited) − AR(original), at the NLA's site while generating.

    Uses the steering module's add-vector intervention, so the edit is the same object a user would
    build by hand with `thoughtscope.steer.add_vector`. `scale` is the old, deprecated name of `strength`.
    The prompt is read as `generate` reads it: through the chat template when the model has one (`chat=None`),
    so an instruction such as "Tell me a short story." is a user turn the model answers; `chat=False` reads it
    as raw text to continue.
    """
    from thoughtscope.steer import GenerationConfig, add_vector, compare

    if scale is not None:
        warn_renamed("scale", "strength", "steer_from_words")
        strength = scale
    delta = steering_delta(nla, original, edited)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat)
    cmp = compare(nla.lm, [prompt], [add_vector(delta, nla.cfg.site, strength)], cfg)[0]
    return {
        "prompt": prompt,
        "original": original,
        "edited": edited,
        "delta_norm": float(delta.norm()),
        "unsteered": cmp.unsteered,
        "steered": cmp.steered,
    }

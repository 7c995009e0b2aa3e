"""An NLA on disk and in memory: config + AV adapter + AR adapter/head, for one target model and site.

Folder layout (loadable by path, like a transformers folder)::

    nla_config.json        NLAConfig: site, marker, injection_scale, templates, ‖μ‖², warm-start source
    av.safetensors         LoRA weights of the verbalizer
    ar.safetensors         LoRA weights of the reconstructor + its d×d head ("head.weight")
    warm_av.safetensors    (optional) the AV after supervised warm start, the RL reference
    warm_ar.safetensors    (optional) the AR after supervised warm start
    rl_ar.safetensors      (optional) the AR as the RL stage left it, before `ar-refit`
    warm_refit_ar.safetensors  (optional) the warm AR after `ar-refit-warm`: the same refit run on the warm
                           AV's explanations (the control `nla eval` compares the final NLA with)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_save_tensors
from ..errors import ThoughtscopeError
from .config import CONFIG_NAME
from .core import NLAConfig, NLAError, check_vectors, nla_loss, normalise

AV_FILE, AR_FILE = "av.safetensors", "ar.safetensors"
WARM_AV_FILE, WARM_AR_FILE = "warm_av.safetensors", "warm_ar.safetensors"
RL_AR_FILE = "rl_ar.safetensors"  # the AR as the RL stage left it, before `ar-refit`
WARM_REFIT_AR_FILE = "warm_refit_ar.safetensors"  # the warm AR refitted on the warm AV's explanations
WEIGHTS = {
    "final": (AV_FILE, AR_FILE),
    "warm": (WARM_AV_FILE, WARM_AR_FILE),
    "rl": (AV_FILE, RL_AR_FILE),
    "warm_refit": (WARM_AV_FILE, WARM_REFIT_AR_FILE),
}


def config_for(
    lm, *, site: str | None = None, injection_scale: float = 0.0, marker: str | None = None, **overrides
) -> NLAConfig:
    """A config that matches this target model (marker picked from its tokenizer, default site at 2/3 depth)."""
    from .core import default_site
    from .verbalizer import pick_marker

    if marker is None:
        marker, marker_id = pick_marker(lm.tokenizer)
    else:
        ids = lm.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise NLAError(f"marker {marker!r} is {len(ids)} tokens in this tokenizer; it must be exactly one")
        marker_id = ids[0]
    site = str(lm.check_site(site or default_site(lm.n_layers)))
    return NLAConfig(
        model=lm.source.get("spec", lm.name),
        site=site,
        d_model=lm.d_model,
        n_layers=lm.n_layers,
        marker=marker,
        marker_id=marker_id,
        injection_scale=injection_scale,
        **overrides,
    ).check()


def save_weights(state: dict[str, torch.Tensor], path: Path, dtype=torch.float16) -> None:
    """Adapters are stored in half precision: it halves the shipped size and LoRA deltas lose nothing visible."""
    atomic_save_tensors({k: v.to(dtype) for k, v in state.items()}, path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file as float32; NLAError naming the file when it is missing, unreadable, or
    holds a non-numeric or non-finite tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise NLAError(f"{path} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise NLAError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: _finite(v, k, path) for k, v in tensors.items()}


def _finite(v: Any, key: str, where: Path) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise NLAError(f"{where}: {key!r} is a {type(v).__name__}, expected a tensor")
    if not v.is_floating_point():
        raise NLAError(f"{where}: tensor {key!r} has dtype {v.dtype}, expected floating point")
    v = v.float()
    if not bool(torch.isfinite(v).all()):
        raise NLAError(f"{where}: tensor {key!r} holds NaN or Inf values")
    return v


def check_adapter_state(module, state: Any, where: Path, label: str) -> dict[str, torch.Tensor]:
    """state as float32 tensors with exactly the names and shapes of module's adapter (the AV or the AR), or an
    NLAError naming `where`: an adapter file or state written for another model, config or version."""
    if not isinstance(state, dict):
        raise NLAError(f"{where}: the {label} weights are a {type(state).__name__}, expected named tensors")
    want = {k: tuple(v.shape) for k, v in module.adapter_state().items()}
    unexpected = sorted(map(str, set(state) - set(want)))
    missing = sorted(set(want) - set(state))
    if unexpected or missing:
        raise NLAError(
            f"{where}: the {label} weights do not fit this NLA ({len(missing)} of its tensors missing"
            + (f", e.g. {missing[0]}" if missing else "")
            + f"; {len(unexpected)} unknown"
            + (f", e.g. {unexpected[0]}" if unexpected else "")
            + ")"
        )
    out = {}
    for k, shape in want.items():
        v = _finite(state[k], k, where)
        if tuple(v.shape) != shape:
            raise NLAError(f"{where}: {label} tensor {k!r} has shape {tuple(v.shape)}, this NLA needs {shape}")
        out[k] = v
    return out


def load_adapter(module, path: Path, label: str) -> None:
    """Load an adapter file (av.safetensors, ar.safetensors, ...) into the AV or the AR, checked first."""
    module.load_adapter_state(check_adapter_state(module, load_weights(path), path, label))


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Errors of building an NLA from a file's settings, as one NLAError naming that file."""
    try:
        yield
    except ThoughtscopeError as e:
        if str(path) in str(e):
            raise
        raise NLAError(f"{path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:  # peft or torch refusing the settings
        raise NLAError(f"{path}: cannot build the NLA it describes ({type(e).__name__}: {e})") from None


class NLA:
    """Target model + AV + AR. `explain`, `reconstruct` and `fve` are the everyday calls."""

    def __init__(self, lm, cfg: NLAConfig, *, lora: bool = True):
        from .reconstructor import Reconstructor
        from .verbalizer import Verbalizer

        cfg.check()
        if cfg.d_model != lm.d_model or cfg.n_layers != lm.n_layers:
            from ..models import DEFAULT_MODEL_NAME

            made_for = DEFAULT_MODEL_NAME if cfg.model == "default" else cfg.model or "another model"
            raise NLAError(
                f"this NLA was trained for {made_for} (d_model={cfg.d_model}, {cfg.n_layers} blocks) and cannot read "
                f"{lm.name} (d_model={lm.d_model}, {lm.n_layers} blocks): an NLA explains one model's activations; "
                f"train one for {lm.name} with `thoughtscope nla data` and `thoughtscope nla train` (docs/nla.md)"
            )
        lm.check_site(cfg.site)
        self.lm, self.cfg = lm, cfg.check()
        # LoRA's A matrices start random: seed them so two runs (or a run and its resume) start identical
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.extra.get("init_seed", 0)))
            self.av = Verbalizer(lm, cfg, lora=lora)
            self.ar = Reconstructor(lm, cfg, lora=lora)
        self.path: Path | None = None

    # ------------------------------------------------------------------ disk
    @classmethod
    def load(cls, path: str | os.PathLike, lm=None, *, which: str = "final") -> NLA:
        """Load a folder; which='warm' loads the warm-start weights instead of the final ones, which='rl' the
        final AV with the AR as the RL stage left it (before `ar-refit`), which='warm_refit' the warm AV with
        the warm AR refitted on its explanations (`nla train --stage ar-refit-warm`). Other than 'final'
        (where a fresh folder may have no weights yet), a missing weights file is an error."""
        from thoughtscope.models import load_model

        path = Path(path)
        if which not in WEIGHTS:
            raise NLAError(f"unknown weights {which!r}: expected one of {', '.join(WEIGHTS)}")
        av_f, ar_f = WEIGHTS[which]
        if which != "final":
            for f in (av_f, ar_f):
                if not (path / f).is_file():
                    raise NLAError(f"{path / f} not found: the {which!r} weights need it")
        cfg = NLAConfig.load(path)
        with _naming(path / CONFIG_NAME):
            lm = lm or load_model(cfg.model)
            nla = cls(lm, cfg)
        for module, f, label in ((nla.av, av_f, "AV"), (nla.ar, ar_f, "AR")):
            if (path / f).is_file():
                load_adapter(module, path / f, label)
        nla.path = path
        return nla

    def save(self, path: str | os.PathLike, *, av: bool = True, ar: bool = True, warm: bool = False) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.save(path)
        if av:
            save_weights(self.av.adapter_state(), path / (WARM_AV_FILE if warm else AV_FILE))
        if ar:
            save_weights(self.ar.adapter_state(), path / (WARM_AR_FILE if warm else AR_FILE))
        self.path = path
        return path

    # ------------------------------------------------------------------ use
    def activations(self, text: str, positions=(-1,)) -> tuple[torch.Tensor, list[int], list[str]]:
        """Site vectors of `text` at the given token positions (negative counts from the end)."""
        from thoughtscope.models import capture

        ids, att = self.lm.tokenize(text)
        n = int(att[0].sum())
        if n < 1:
            raise NLAError("empty text: nothing to explain")
        pos = []
        for p in positions:
            q = p + n if p < 0 else p
            if not 0 <= q < n:
                raise NLAError(f"position {p} is outside the text's {n} tokens")
            pos.append(q)
        acts = capture(self.lm, self.cfg.site, ids, att)
        h = next(iter(acts.values()))[0]
        toks = [self.lm.tokenizer.decode(ids[0, q : q + 1]) for q in pos]
        return h[pos].float().cpu(), pos, toks

    def vectors_per_batch(self, on_cpu: int) -> int:
        """Vectors per greedy-explanation forward pass for bulk work (the refit's cache, the eval): `on_cpu` on a CPU,
        where a few dozen rows already keep the matrix products busy; 256 on a GPU, which needs a few hundred."""
        return 256 if self.av.device.type == "cuda" else on_cpu

    def explain(
        self, vectors: torch.Tensor, *, samples: int = 1, do_sample: bool | None = None, temperature: float = 1.0
    ) -> list[str]:
        v = check_vectors(vectors, self.cfg.d_model)
        do_sample = samples > 1 if do_sample is None else do_sample
        self.av.model.eval()
        return self.av.explain(v, samples=samples, do_sample=do_sample, temperature=temperature)

    def reconstruct(self, explanations: list[str], *, truncate: bool = False) -> torch.Tensor:
        self.ar.eval()
        return self.ar.predict(list(explanations), truncate=truncate)

    def round_trip(self, vectors: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Explanations, reconstructions and per-row loss 2(1 − cos) for vectors."""
        v = check_vectors(vectors, self.cfg.d_model)
        expl = self.explain(v)
        self.ar.eval()
        rec = self.ar.predict(expl, allow_empty=True, truncate=True)
        return expl, rec, nla_loss(rec, v, reduction="none")

    def fve_of(self, pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        """Per-vector FVE against the training data's variance: 1 − MSE / (1 − ‖μ‖²)."""
        var = 1.0 - self.cfg.mu_sq
        mse = (normalise(pred) - normalise(gold)).pow(2).mean(-1)
        return 1 - mse / var

"""What is the model about to say at layer l? The logit lens and the Jacobian lens, per layer and position.

The logit lens reads a residual h_l through the model's own final norm and unembedding, as if the remaining blocks
did nothing. The Jacobian lens first maps h_l by J_l, the expected Jacobian of the final residual at the same
position with respect to h_l (averaged over corpus contexts and positions): lens_l(h) = unembed(norm(J_l h)). It
keeps what the later blocks do to a direction on average, which the logit lens ignores.

Fitting J_l needs one backward pass per row of J (d of them, every layer at once): each batch of contexts measures
a slice of rows, and the slices cycle, so every row sees different contexts at no extra cost; partial sums are
checkpointed after every batch, so a killed fit resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_save_tensors, atomic_torch_save, read_json
from ..errors import CausalError
from ..models import LoadedModel
from .patching import one_token
from .residuals import ResidualCache, read_residuals, readout


@dataclass
class LensFitConfig:
    """How a Jacobian lens is fitted (saved beside it)."""

    n_contexts: int = 144
    """Corpus contexts read in all (contexts)."""
    ctx_len: int = 32
    """Tokens per context (tokens)."""
    contexts_per_batch: int = 8
    """Contexts in one forward pass (contexts)."""
    rows_per_batch: int = 32
    """Rows of every layer's Jacobian measured per batch (one backward pass each, batched)."""
    corpus: str = "default"
    """Corpus spec the contexts come from."""
    skip_tokens: int = 0
    """Corpus tokens skipped first (so held-out text can come after the fitting text)."""
    n_validation: int = 8
    """Contexts read after the fitting ones, on which the shrinkage and rank of the lens are chosen (contexts)."""
    ranks: tuple = (32, 128)
    """Ranks of J - I tried (each layer's change from the identity kept to its top singular directions)."""
    shrinks: tuple = (0.25, 0.5, 0.75, 1.0)
    """Shrinkage toward the identity tried: J' = I + s (J - I); 1 is the raw Jacobian, 0 the logit lens."""

    def __post_init__(self) -> None:
        for name in ("n_contexts", "ctx_len", "contexts_per_batch", "rows_per_batch"):
            if int(getattr(self, name)) < 1:
                raise CausalError(f"LensFitConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class JacobianLens:
    J: torch.Tensor  # [n_layers, d, d]: J[l] maps h_l to the expected final residual (as shrunk and truncated)
    model: str
    model_source: dict | str | None = None
    config: dict = field(default_factory=dict)
    positions_per_row: list[int] = field(default_factory=list)
    rank: int | None = None  # J - I has this rank per layer (stored as factors), None: full
    shrink: float = 1.0
    validation: list = field(default_factory=list)  # [(rank, shrink, top-1 agreement)] the choice was made on

    def check_fits(self, lm: LoadedModel) -> None:
        n, d = lm.n_layers, lm.d_model
        if tuple(self.J.shape) != (n, d, d):
            raise CausalError(
                f"this Jacobian lens was fitted for {self.model} ({self.J.shape[0]} layers, width {self.J.shape[1]}) "
                f"but {lm.name} has {n} layers of width {d}: fit one with 'thoughtscope lens fit --model ...'"
            )
        if self.model != lm.name:
            raise CausalError(f"this Jacobian lens was fitted for {self.model}, not {lm.name}")

    def save(self, folder: str | Path) -> Path:
        """float16; a low-rank lens as the factors of J - I (a few MB), a full one as J."""
        meta = {"model": self.model, "model_source": self.model_source, "config": self.config}
        meta |= {"positions_per_row": self.positions_per_row, "rank": self.rank, "shrink": self.shrink}
        meta["validation"] = self.validation
        if self.rank is not None:
            eye = torch.eye(self.J.shape[1])
            U, S, Vh = torch.linalg.svd(self.J.float() - eye)
            r = self.rank
            tensors = {"US": (U[..., :r] * S[:, None, :r]).contiguous(), "V": Vh[:, :r].contiguous()}
        else:
            tensors = {"J": self.J.contiguous()}
        with atomic_dir(folder) as tmp:
            atomic_save_tensors({k: v.to(torch.float16) for k, v in tensors.items()}, tmp / "lens.safetensors")
            (tmp / "lens.json").write_text(json.dumps(meta, indent=1))
        return Path(folder)

    @classmethod
    def load(cls, folder: str | Path, lm: LoadedModel | None = None) -> JacobianLens:
        from safetensors.torch import load_file

        folder = default_lens_path() if str(folder) == "default" else Path(folder)
        if not (folder / "lens.safetensors").is_file():
            raise CausalError(f"{folder} holds no lens.safetensors: not a fitted lens (thoughtscope lens fit)")
        meta = read_json(folder / "lens.json", CausalError)
        t = {k: v.float() for k, v in load_file(str(folder / "lens.safetensors")).items()}
        J = t["J"] if "J" in t else torch.eye(t["US"].shape[1]) + t["US"] @ t["V"]
        lens = cls(
            J, meta["model"], meta.get("model_source"), meta.get("config", {}), meta.get("positions_per_row", [])
        )
        lens.rank, lens.shrink, lens.validation = meta.get("rank"), meta.get("shrink", 1.0), meta.get("validation", [])
        if lm is not None:
            lens.check_fits(lm)
        return lens


def default_lens_path() -> Path:
    """The Jacobian lens shipped for the default model (`thoughtscope lens fit` with its defaults)."""
    from importlib import resources

    return Path(str(resources.files("thoughtscope") / "assets" / "default_lens"))


@dataclass
class LensView:
    """Per layer and position, the lens's top tokens; and where a tracked token ranks at each layer."""

    kind: str
    tokens: list[str]
    top: list[list[list[tuple[str, float]]]]  # [layer][position] -> [(token, probability)]
    final_top1: list[str]
    final_top1_ids: list[int]
    agreement: list[float]  # per layer: share of positions whose lens top-1 is the model's final top-1
    track: dict | None = None  # {"token", "rank": [layer][pos], "prob": [layer][pos]}

    def to_dict(self) -> dict:
        return asdict(self)


def _lens_probs(lm: LoadedModel, h: torch.Tensor, layer: int, lens: JacobianLens | None) -> torch.Tensor:
    """Next-token probabilities the lens reads from residuals h [..., d] after block `layer`."""
    x = h.float()
    if lens is not None:
        x = x @ lens.J[layer].T.to(x.device)
    return torch.softmax(readout(lm, x.to(h.dtype)), -1)


def lens_column(
    lm: LoadedModel,
    text: str,
    pos: int,
    *,
    lens: JacobianLens | None = None,
    k: int = 3,
    cache: ResidualCache | None = None,
) -> dict[str, object]:
    """What every layer says at one position of `text` (the analyzer's click): one row per layer goes through the
    unembedding, not the [layers x positions x vocab] grid of `lens_view`. Without a cache the text is read only
    up to `pos`; with one, the whole text is read once and every later position of it is a lookup. Keys: position,
    token, kind, layers ([layer] -> [(token, probability)]), model_top1 (the model's own next token there)."""
    from ..display import lone_token_text, token_texts

    ids, _ = lm.tokenize([text])
    if not 0 <= pos < ids.shape[1]:
        raise CausalError(f"position {pos} is out of range: the text has positions 0..{ids.shape[1] - 1}")
    if cache is not None:
        hs = [h[:, : pos + 1] for h in cache.residuals(lm, ids)]
    else:
        hs = read_residuals(lm, ids[:, : pos + 1], grad=False)
    ids = ids[:, : pos + 1]
    with torch.inference_mode():
        rows = torch.stack([h[0, -1].float() for h in hs])  # [layers, d]: the unembedding is read once, not per layer
        if lens is not None:
            rows = torch.einsum("lij,lj->li", lens.J.to(rows), rows)
        logits = readout(lm, rows.to(hs[0].dtype))
        v, i = torch.softmax(logits, -1).topk(k, -1)
        layers = [[(lone_token_text(lm.tokenizer, int(a)), float(b)) for a, b in zip(ii, vv)] for ii, vv in zip(i, v)]
        top1 = int(readout(lm, hs[-1][0, -1]).argmax()) if lens is not None else int(logits[-1].argmax())
    return {
        "position": pos,
        "token": token_texts(lm.tokenizer, ids[0].tolist())[-1],
        "kind": "jacobian" if lens is not None else "logit",
        "layers": layers,
        "model_top1": lone_token_text(lm.tokenizer, top1),
        "model_top1_id": top1,
    }


def lens_view(
    lm: LoadedModel,
    text: str,
    *,
    lens: JacobianLens | None = None,
    track: str | None = None,
    k: int = 5,
    cache: ResidualCache | None = None,
) -> LensView:
    """Read `text` through the logit lens (or `lens`, a Jacobian lens) at every layer and position (with `cache`,
    through its reading of the text: the blocks it holds are not run again)."""
    ids, _ = lm.tokenize([text])
    hs = cache.residuals(lm, ids) if cache is not None else read_residuals(lm, ids, grad=False)
    tid = one_token(lm, track, "tracked token") if track else None
    final = readout(lm, hs[-1][0]).argmax(-1)
    top, agree, ranks, probs = [], [], [], []
    from ..display import lone_token_text, token_texts

    def dec(tid: int) -> str:
        return lone_token_text(lm.tokenizer, int(tid))

    with torch.inference_mode():
        for layer, h in enumerate(hs):
            p = _lens_probs(lm, h[0], layer, lens)
            v, i = p.topk(k, -1)
            top.append([[(dec(a), float(b)) for a, b in zip(ii, vv)] for ii, vv in zip(i, v)])
            agree.append(float((p.argmax(-1) == final).float().mean()))
            if tid is not None:
                ranks.append(((p > p[:, tid : tid + 1]).sum(-1) + 1).tolist())
                probs.append(p[:, tid].tolist())
    return LensView(
        "jacobian" if lens is not None else "logit",
        token_texts(lm.tokenizer, ids[0].tolist()),
        top,
        [dec(t) for t in final],
        [int(t) for t in final],
        agree,
        {"token": track, "rank": ranks, "prob": probs} if tid is not None else None,
    )


def _fit_batches(lm: LoadedModel, cfg: LensFitConfig):
    """The fitting contexts, [contexts_per_batch, ctx_len] at a time, after `skip_tokens` corpus tokens."""
    from ..corpus import Corpus

    skip = cfg.skip_tokens // cfg.ctx_len
    n = 0
    rows: list[torch.Tensor] = []
    for i, c in enumerate(Corpus(cfg.corpus).contexts(lm.tokenizer, cfg.ctx_len)):
        if i < skip:
            continue
        rows.append(torch.as_tensor(c.input_ids))
        n += 1
        if len(rows) == cfg.contexts_per_batch or n == cfg.n_contexts:
            yield torch.stack(rows)
            rows = []
        if n == cfg.n_contexts:
            return
    raise CausalError(f"the corpus {cfg.corpus!r} has fewer than {cfg.n_contexts} contexts after the skipped tokens")


def _rows_of_batch(b: int, d: int, per: int) -> torch.Tensor:
    """Batch b measures rows [s, s+per) of every Jacobian, the slices cycling through all d rows."""
    start = (b * per) % d
    return (torch.arange(per) + start) % d


def fit_jacobian_lens(
    lm: LoadedModel, cfg: LensFitConfig | None = None, *, out: str | Path | None = None, progress: bool = True
) -> JacobianLens:
    """Fit J_l for every layer (see the module docstring); resumes from `out`'s checkpoint when there is one."""
    from ..progress import ProgressBar

    cfg = cfg or LensFitConfig()
    n, d = lm.n_layers, lm.d_model
    ckpt = Path(out).with_name(Path(out).name + ".fit.ckpt") if out is not None else None
    state = {"sums": torch.zeros(n, d, d, dtype=torch.float64), "counts": torch.zeros(d), "done": 0, "cfg": asdict(cfg)}
    if ckpt is not None and ckpt.is_file():
        old = torch.load(ckpt, weights_only=True)
        if old.get("cfg") == asdict(cfg):
            state = old
    for p in lm.model.parameters():
        p.requires_grad_(False)
    batches = list(_fit_batches(lm, cfg))
    with ProgressBar("jacobian lens", len(batches), start=state["done"], unit="batches", enabled=progress) as bar:
        for b, ids in enumerate(batches):
            if b < state["done"]:
                continue
            rows = _rows_of_batch(b, d, min(cfg.rows_per_batch, d))
            _measure_rows(lm, ids.to(lm.device), rows, state, seed=b)
            state["done"] = b + 1
            if ckpt is not None:
                atomic_torch_save(state, ckpt)
            bar.update(completed=b + 1)
    seen = state["counts"]
    if bool((seen == 0).any()):
        missing = int((seen == 0).sum())
        raise CausalError(
            f"{missing} of {d} Jacobian rows were never measured: give at least "
            f"{-(-d // cfg.rows_per_batch) * cfg.contexts_per_batch} contexts (n_contexts) or more rows_per_batch"
        )
    J = (state["sums"] / seen[None, :, None]).float()
    lens = JacobianLens(J, lm.name, lm.source, asdict(cfg), seen.long().tolist())
    if cfg.n_validation:
        regularise(lm, lens, cfg)
    if out is not None:
        lens.save(out)
        ckpt.unlink(missing_ok=True)
    return lens


def _measure_rows(lm: LoadedModel, ids: torch.Tensor, rows: torch.Tensor, state: dict, seed: int = 0) -> None:
    """Add rows `rows` of ∂h_final[t]/∂h_l[t] (same position), summed over the batch's positions, to every layer's
    running sum.

    One backward pass per row serves every position at once: the probe at position t carries a random sign s_t,
    and the gradient read at t is multiplied by s_t again, so the terms from later positions (which read h_l[t]
    through attention) have random signs and average out, leaving the same-position Jacobian unbiased.
    """
    hs = read_residuals(lm, ids, grad=True)
    B, T, d = hs[-1].shape
    g = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (B, T), generator=g) * 2 - 1).to(hs[-1].dtype).to(hs[-1].device)
    probes = torch.zeros(len(rows), B, T, d, dtype=hs[-1].dtype, device=hs[-1].device)
    probes[torch.arange(len(rows)), :, :, rows] = signs
    grads = torch.autograd.grad(hs[-1], hs[:-1], grad_outputs=probes, is_grads_batched=True)
    for layer, gr in enumerate(grads):
        state["sums"][layer, rows] += (gr * signs[None, :, :, None]).double().sum((1, 2)).cpu()
    state["sums"][len(hs) - 1, rows, rows] += B * T  # the last layer's lens is the identity
    state["counts"][rows] += B * T


def _shrunk(J: torch.Tensor, rank: int | None, shrink: float) -> torch.Tensor:
    """I + shrink · (J - I), the change from the identity kept to its top `rank` singular directions."""
    eye = torch.eye(J.shape[-1])
    D = J - eye
    if rank is not None and rank < J.shape[-1]:
        U, S, Vh = torch.linalg.svd(D)
        D = (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]
    return eye + shrink * D


def regularise(lm: LoadedModel, lens: JacobianLens, cfg: LensFitConfig) -> None:
    """Choose the rank and shrinkage of J - I on validation contexts read after the fitting ones.

    J is estimated from a few hundred positions per row, so its change from the identity is noisy: keeping its top
    singular directions and shrinking it toward the identity trades that noise against bias. The grid point with
    the best top-1 agreement with the model's final top-1 (every other layer but the last, validation contexts
    only; the benchmark's held-out contexts come after these) is kept, and the grid is recorded with the lens.
    """
    val_cfg = replace(cfg, n_contexts=cfg.n_validation, contexts_per_batch=cfg.n_validation)
    val_cfg.skip_tokens = cfg.skip_tokens + cfg.n_contexts * cfg.ctx_len
    ids = next(iter(_fit_batches(lm, val_cfg)))
    hs = read_residuals(lm, ids.to(lm.device), grad=False)
    layers = list(range(0, lm.n_layers - 1, 2))
    with torch.inference_mode():
        final = readout(lm, hs[-1]).argmax(-1)
        grid = []
        eye = torch.eye(lm.d_model)
        for rank in [*cfg.ranks, None]:
            Js = _shrunk(lens.J[layers], rank, 1.0)
            for shrink in cfg.shrinks:
                agree = []
                for J, i in zip(Js, layers):
                    lensed = hs[i].float() @ (eye + shrink * (J - eye)).T
                    agree.append(float((readout(lm, lensed.to(hs[i].dtype)).argmax(-1) == final).float().mean()))
                grid.append((rank, shrink, sum(agree) / len(agree)))
    rank, shrink, _ = max(grid, key=lambda g: g[2])
    lens.J = _shrunk(lens.J, rank, shrink)
    lens.rank, lens.shrink, lens.validation = rank, shrink, grid


def token_direction(lm: LoadedModel, token: str | int, layer: int, lens: JacobianLens | None = None) -> torch.Tensor:
    """The unit direction at the residual after block `layer` that the lens reads as `token`: J_l^T (g ⊙ W_U[t]),
    g the final norm's weight (J = I for the logit lens). Added, it steers toward the token; projected out, it
    removes what that layer says about it (a lens-space steering vector for presets and the equalizer)."""
    if not 0 <= layer < lm.n_layers:
        raise CausalError(f"layer {layer} is out of range: {lm.name} has blocks 0..{lm.n_layers - 1}")
    t = one_token(lm, token, "token")
    from ..features import norm_scale

    w = lm.unembed.weight[t].detach().float().cpu()
    g = norm_scale(lm.final_norm)  # the one rule for what the final norm multiplies by (Gemma: 1 + weight)
    if g is not None:
        w = w * g.detach().float().cpu()
    d = lens.J[layer].T @ w if lens is not None else w
    return d / d.norm()

"""SAE quality metrics: reconstruction (MSE, FVU, L0, dead fraction) and spliced language-model loss."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .base import SAE
from .config import SAEError


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterable[torch.Tensor], *, max_batches: int | None = None) -> dict[str, Any]:
    """Reconstruction metrics over raw-activation batches [B, d] (or [B, T, d]).

    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 with the mean over the whole eval set (computed in one
    pass from running sums). dead_frac = share of features that never fired on the eval set.
    """
    d = sae.cfg.d_model
    dev = sae.device
    sse = 0.0
    n = 0
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros((), dtype=torch.float64, device=dev)
    l0 = 0.0
    fired = torch.zeros(sae.cfg.n_features, dtype=torch.bool, device=dev)
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(x, (tuple, list)):
            x = x[0]
        x = x.reshape(-1, x.shape[-1]).to(dev, torch.float32)
        if x.shape[-1] != d:
            raise SAEError(f"eval batch {i} has d={x.shape[-1]} but the SAE expects d_model={d}")
        if not bool(torch.isfinite(x).all()):
            raise SAEError(f"eval batch {i} contains NaN/Inf")
        f, xh = sae(x)
        sse += float((x - xh).double().pow(2).sum())
        s1 += x.double().sum(0)
        s2 += x.double().pow(2).sum()
        act = f > 0
        l0 += float(act.sum())
        fired |= act.any(0)
        n += x.shape[0]
    if n == 0:
        raise SAEError("evaluate_sae got no batches")
    total_var = float(s2 - s1.pow(2).sum() / n)
    return {
        "n_tokens": n,
        "mse": sse / (n * d),
        "mse_per_token": sse / n,
        "fvu": sse / max(total_var, 1e-30),
        "explained_variance": 1 - sse / max(total_var, 1e-30),
        "l0": l0 / n,
        "dead_frac": float((~fired).float().mean()),
        "n_dead": int((~fired).sum()),
    }


# ----------------------------------------------------------------------------- spliced language-model loss
# The spliced loss never builds [tokens, vocab] logits for a whole batch: each condition's forward stops at the
# final hidden state (the model's body, final norm included), and the unembedding, log-softmax, loss and KL run on
# `chunk_tokens` positions at a time. LOGITS_BUDGET sets the default chunk: about this many logit numbers per chunk
# (64 MB in float32: 64 positions of a 262,144-token vocabulary, 341 of SmolLM2's 49,152).
LOGITS_BUDGET = 1 << 24
HEAD_CHECK_POSITIONS = 16  # positions of the one full forward that checks the chunked head against the model's own

Replace = Callable[[torch.Tensor], torch.Tensor]


def default_chunk_tokens(vocab_size: int, budget: int = LOGITS_BUDGET) -> int:
    """Positions per chunk of logits so one chunk holds about `budget` numbers."""
    return max(1, int(budget) // max(1, int(vocab_size)))


class _Head:
    """The model's output as final hidden state → logits on a slice of positions: its body (blocks and final norm,
    as `base_model` runs them), then the unembedding and any final logit soft-cap on each chunk only."""

    def __init__(self, lm: Any):
        self.lm = lm
        self.body = lm.model.base_model
        if self.body is lm.model or lm.unembed is None:
            raise SAEError(
                f"{lm.name}: the spliced loss needs a model with a separate body and output head "
                f"(a transformers *ForCausalLM); {type(lm.model).__name__} has none"
            )
        self.checked = False

    def hidden(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.body(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.head_logits(h)

    def check(self, ids: torch.Tensor, mask: torch.Tensor | None, h: torch.Tensor, chunk: int) -> None:
        """Once: the model's own logits on the first few positions of one row equal this head's (a model whose
        head does more than norm + unembedding + soft-cap is refused rather than measured wrongly)."""
        if self.checked:
            return
        n = min(ids.shape[1], chunk, HEAD_CHECK_POSITIONS)
        m = None if mask is None else mask[:1, :n]
        ref = self.lm.model(input_ids=ids[:1, :n], attention_mask=m, use_cache=False).logits.float()
        ours = self.logits(h[:1, :n])
        tol = 1e-3 * max(1.0, float(ref.abs().max()))
        if not torch.allclose(ours, ref, rtol=1e-3, atol=tol):
            raise SAEError(
                f"{self.lm.name}: logits computed from its final hidden state differ from the model's own by up to "
                f"{float((ours - ref).abs().max()):.3g}; its output head does more than the final norm, the "
                "unembedding and a soft-cap, so the chunked spliced loss cannot reproduce it"
            )
        self.checked = True


def _make_edit(kind: str, replace: Replace | None, mean_act: torch.Tensor | None, exclude_first: bool) -> Replace:
    def fn(acts: torch.Tensor) -> torch.Tensor:
        a = acts.float()
        if kind == "zero":
            new = torch.zeros_like(a)
        elif kind == "mean":
            new = mean_act.to(a).expand_as(a).clone()
        else:
            new = replace(a).to(a)
        if exclude_first:
            new[:, 0] = a[:, 0]
        return new.to(acts.dtype)

    return fn


@torch.no_grad()
def site_mean(lm: Any, site: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """Mean activation at `site` over every real token except position 0 (the attention sink) of `batches`: the
    mean that mean ablation writes. One pass that stops after the site's block."""
    from thoughtscope.models import capture

    total, count = None, 0.0
    for ids, mask in batches:
        a = next(iter(capture(lm, site, ids, mask, early_exit=True).values())).double()[:, 1:]
        w = torch.ones(a.shape[:2], dtype=a.dtype, device=a.device) if mask is None else mask[:, 1:].to(a)
        s = (a * w[..., None]).sum((0, 1))
        total = s if total is None else total + s
        count += float(w.sum())
    if total is None or count == 0:
        raise SAEError("no tokens to take the mean activation over (every context is one token long)")
    return (total / count).float()


def _chunk_terms(head: _Head, hs: dict[str, torch.Tensor], tgt: torch.Tensor, w: torch.Tensor, chunk: int) -> dict:
    """Summed next-token loss of every condition and summed KL(clean || condition), chunk by chunk of positions."""
    loss = dict.fromkeys(hs, 0.0)
    kl = {k: 0.0 for k in hs if k != "clean"}
    for s in range(0, tgt.shape[0], chunk):
        sl = slice(s, s + chunk)
        t, ws = tgt[sl, None], w[sl]
        clean = head.logits(hs["clean"][sl]).log_softmax(-1)
        loss["clean"] += float((-clean.gather(1, t)[:, 0] * ws).sum())
        p = clean.exp()
        for k in kl:
            lp = head.logits(hs[k][sl]).log_softmax(-1)
            loss[k] += float((-lp.gather(1, t)[:, 0] * ws).sum())
            kl[k] += float(((p * (clean - lp)).sum(-1) * ws).sum())
            del lp
    return {"loss": loss, "kl": kl}


def _batch_terms(head: _Head, site: Any, edits: dict[str, Replace], ids, mask, chunk: int) -> dict:
    """One batch: a forward per condition to the final hidden state, then the chunked loss and KL terms."""
    from thoughtscope.models import edit

    hs = {"clean": head.hidden(ids, mask)}
    head.check(ids, mask, hs["clean"], chunk)
    for name, fn in edits.items():
        with edit(head.lm, site, fn):
            hs[name] = head.hidden(ids, mask)
    d = hs["clean"].shape[-1]
    hs = {k: v[:, :-1].reshape(-1, d) for k, v in hs.items()}
    tgt = ids[:, 1:].reshape(-1)
    w = torch.ones(tgt.shape, device=tgt.device) if mask is None else mask[:, 1:].reshape(-1).float()
    return {**_chunk_terms(head, hs, tgt, w, chunk), "n": float(w.sum())}


def _as_pairs(token_batches: Iterable, max_batches: int | None, device) -> list:
    pairs = []
    for i, batch in enumerate(token_batches):
        if max_batches is not None and i >= max_batches:
            break
        ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        pairs.append((ids.to(device), None if mask is None else mask.to(device)))
    return pairs


def _recovered(bad: float, spliced: float, clean: float) -> float:
    """(L_bad - L_spliced) / (L_bad - L_clean): 1 = as good as clean, 0 = no better than the ablation."""
    denom = bad - clean
    return (bad - spliced) / denom if abs(denom) > 1e-12 else float("nan")


@torch.no_grad()
def spliced_losses(
    lm: Any,
    site: Any,
    token_batches: Iterable,
    replace: dict[str, Replace],
    *,
    mean_act: torch.Tensor | None = None,
    exclude_first: bool = True,
    max_batches: int | None = None,
    chunk_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Next-token loss with the activation at `site` replaced by each of `replace` (name → fn([B, T, d]) -> [B, T, d])
    against the clean model and the zero- and mean-ablated one, on the same tokens.

    Per replacement: loss, KL(clean || replaced) per token, loss_recovered (vs zero ablation) and
    loss_recovered_vs_mean = (L_mean - L_replaced) / (L_mean - L_clean). Position 0 (the attention sink) keeps its
    activation in every variant when `exclude_first`. `mean_act` defaults to the mean over the same tokens
    (position 0 left out), from one pass that stops after the site's block. Logits are computed `chunk_tokens`
    positions at a time (default: `default_chunk_tokens(vocab)`), so memory does not grow with vocabulary × tokens.
    token_batches: LongTensor [B, T] or (input_ids, attention_mask) pairs.
    """
    from thoughtscope.progress import ProgressBar

    pairs = _as_pairs(token_batches, max_batches, lm.device)
    if not pairs:
        raise SAEError("the spliced loss got no token batches")
    clash = {"clean", "zero", "mean"} & set(replace)
    if clash:
        raise SAEError(f"replacement names {sorted(clash)} are taken by the reference conditions")
    chunk = int(chunk_tokens or default_chunk_tokens(lm.vocab_size))
    head = _Head(lm)
    mean = site_mean(lm, site, pairs) if mean_act is None else mean_act
    edits = {"zero": _make_edit("zero", None, None, exclude_first)}
    edits["mean"] = _make_edit("mean", None, mean, exclude_first)
    edits.update({name: _make_edit("replace", fn, None, exclude_first) for name, fn in replace.items()})
    loss = dict.fromkeys(["clean", *edits], 0.0)
    kl = dict.fromkeys(edits, 0.0)
    n_tok = 0.0
    first = next(iter(replace), None)
    total = sum(int(ids.shape[0] * (ids.shape[1] - 1)) for ids, _ in pairs)
    with ProgressBar("spliced loss", total, unit="tok", enabled=progress) as bar:
        for ids, mask in pairs:
            part = _batch_terms(head, site, edits, ids, mask, chunk)
            for k in loss:
                loss[k] += part["loss"][k]
            for k in kl:
                kl[k] += part["kl"][k]
            n_tok += part["n"]
            info = "" if first is None else f"{first}: {_recovered(loss['mean'], loss[first], loss['clean']):.3f}"
            bar.advance(int(ids.shape[0] * (ids.shape[1] - 1)), info=info + " recovered vs mean")
    if n_tok == 0:
        raise SAEError("the spliced loss got no predicted tokens (every position is padding)")
    L = {k: v / n_tok for k, v in loss.items()}
    return {
        "loss_clean": L["clean"],
        "loss_zero_ablated": L["zero"],
        "loss_mean_ablated": L["mean"],
        "kl_zero": kl["zero"] / n_tok,
        "kl_mean": kl["mean"] / n_tok,
        "replaced": {
            name: {
                "loss": L[name],
                "kl": kl[name] / n_tok,
                "loss_recovered": _recovered(L["zero"], L[name], L["clean"]),
                "loss_recovered_vs_mean": _recovered(L["mean"], L[name], L["clean"]),
            }
            for name in replace
        },
        "n_tokens": n_tok,
        "chunk_tokens": chunk,
        "first_position_excluded": exclude_first,
    }


def spliced_lm_loss(
    lm: Any,
    sae: SAE,
    site: Any,
    token_batches: Iterable,
    *,
    mean_act: torch.Tensor | None = None,
    exclude_first: bool = True,
    max_batches: int | None = None,
    chunk_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """LM loss with the SAE's reconstruction spliced in at `site` vs clean, zero- and mean-ablated (see
    `spliced_losses`): loss_recovered_vs_mean, loss_recovered (vs zero), the four losses and the KLs per token."""
    dev = sae.device

    def reconstruct(a: torch.Tensor) -> torch.Tensor:
        return sae(a.to(dev))[1]

    r = spliced_losses(
        lm,
        site,
        token_batches,
        {"sae": reconstruct},
        mean_act=mean_act,
        exclude_first=exclude_first,
        max_batches=max_batches,
        chunk_tokens=chunk_tokens,
        progress=progress,
    )
    return spliced_record(r, "sae")


def spliced_record(r: dict[str, Any], name: str) -> dict[str, Any]:
    """One replacement's figures from `spliced_losses` in the keys every reader of an SAE's figures reads
    (loss_sae is the loss with the replacement in place)."""
    s = r["replaced"][name]
    return {
        "loss_recovered_vs_mean": s["loss_recovered_vs_mean"],
        "loss_recovered": s["loss_recovered"],
        "loss_clean": r["loss_clean"],
        "loss_sae": s["loss"],
        "loss_zero_ablated": r["loss_zero_ablated"],
        "loss_mean_ablated": r["loss_mean_ablated"],
        "kl_sae": s["kl"],
        "kl_zero": r["kl_zero"],
        "kl_mean": r["kl_mean"],
        "n_tokens": r["n_tokens"],
        "chunk_tokens": r["chunk_tokens"],
        "first_position_excluded": r["first_position_excluded"],
    }

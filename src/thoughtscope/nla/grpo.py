"""The `rl` stage of NLA training: a GRPO update of the AV rewarded by the live AR, and the AR step on the rollouts.

Why our own GRPO loop instead of TRL's GRPOTrainer: the AV sees its vector through an embedding
hook, which TRL can only be made to arm by overriding its private `_generate_and_score_completions`
and log-prob passes (pinned to one TRL version), and the reward model (the AR) must keep training on
the rollouts, which TRL has no place for. The loop below is the whole algorithm: G samples per vector,
reward −2(1 − cos) from the live AR (−2 for malformed or truncated answers), group-normalised
advantages, a clipped ratio loss, a k3 KL estimate to the warm-started AV, and one AR step on the
well-formed (explanation, vector) pairs.

Two code paths compute the same step: the cached one (default; `rollout.py`: each vector's prompt run
once for its group, logits on the explanation tokens only, one AR pass) and the plain one it replaced,
kept so tests and `benchmarks/nla.py` can hold the two side by side on the same batch and seed."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch

from ..distributed import average_gradients, rank_and_world
from .bundle import NLA
from .config import NLATrainConfig
from .core import nla_loss
from .rollout import completion_logprobs, dropout_free, reference_weights, sample_group, valid_mask


def _phase(timings: dict | None, name: str):
    """Adds the block's wall time to timings[name] (the benchmark's profile); a no-op without timings."""

    @contextmanager
    def timed():
        t = time.perf_counter()
        try:
            yield
        finally:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t

    return timed() if timings is not None else nullcontext()


def _cached_logprobs(av, vectors: torch.Tensor, comp: torch.Tensor, G: int, timings: dict | None):
    """(valid, mask, reference log-probs, policy log-probs) on the explanation tokens, a prompt run once a group."""
    valid = valid_mask(av, comp.to(av.device))
    mask = valid.float()
    with _phase(timings, "reference"), torch.no_grad(), reference_weights(av):
        ref = completion_logprobs(av, vectors, comp, valid, G)
    with _phase(timings, "policy_forward"):
        av.model.train()
        new = completion_logprobs(av, vectors, comp, valid, G)
    return valid, mask, ref, new


def _plain_logprobs(av, v_rep: torch.Tensor, comp: torch.Tensor, timings: dict | None):
    """The same four on full sequences = prompt + completion; a completion counts up to and including its first
    end token."""
    P = len(av.prompt)
    prompt = torch.tensor([av.prompt] * comp.shape[0], device=av.device)
    ids = torch.cat([prompt, comp.to(av.device)], 1)
    valid = torch.ones_like(comp, dtype=torch.bool)
    for i, row in enumerate(comp.tolist()):
        for j, t in enumerate(row):
            if t in av.end_ids:
                valid[i, j + 1 :] = False
                break
    att = torch.cat([torch.ones_like(prompt), valid.long()], 1)
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, P:] = valid.float()
    mask = mask[:, 1:]
    with _phase(timings, "reference"), torch.no_grad(), av.reference():
        ref = av.token_logprobs(v_rep, ids, att)
    with _phase(timings, "policy_forward"):
        av.model.train()
        new = av.token_logprobs(v_rep, ids, att)
    return valid, mask, ref, new


def _policy_loss(
    new: torch.Tensor, ref: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *, clip: float, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped-ratio loss plus kl_coef × the k3 KL to the reference, per sequence then averaged; (loss, kl)."""
    old = new.detach()  # one update per batch: the ratio starts at 1 and the clip bounds the step
    ratio = torch.exp(new - old)
    A = adv[:, None]
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    log_r = ref - new
    kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy ‖ reference), ≥ 0
    per_tok = pg + kl_coef * kl
    per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_seq.mean(), kl


def grpo_step(
    av,
    vectors: torch.Tensor,
    reward_fn: Callable,
    opt: torch.optim.Optimizer,
    *,
    group_size: int = 4,
    temperature: float = 1.0,
    kl_coef: float = 0.01,
    clip: float = 0.2,
    max_new_tokens: int | None = None,
    before_step: Callable[[], None] | None = None,
    cached: bool = True,
    timings: dict | None = None,
) -> dict:
    """One GRPO update of the AV on a batch of vectors.

    reward_fn(parsed, vectors_rep, completion_ids) -> rewards [N·G], where parsed is a list of
    (explanation, well_formed). Returns the step's statistics and the rollouts for the AR step.
    before_step runs between backward and the optimiser step (the gradient all-reduce of several ranks).
    cached=True runs each vector's prompt once for its whole group and the LM head on the explanation tokens
    only (`rollout.py`); cached=False is the plain path (HF generate, full-sequence passes), kept to check
    and time the cached one against. Both compute the same numbers.
    """
    G = group_size
    av.model.eval()  # no dropout: sampling and the loss see the same function
    with _phase(timings, "sample"):
        if cached:
            comp = sample_group(av, vectors, group=G, temperature=temperature, max_new_tokens=max_new_tokens)
        else:
            comp = av.generate_ids(
                vectors, samples=G, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens
            )
        parsed = av.decode(comp)
    v_rep = vectors.repeat_interleave(G, 0)
    with _phase(timings, "reward"):
        rewards = torch.as_tensor(reward_fn(parsed, v_rep, comp), dtype=torch.float32).flatten()
    r = rewards.view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten().to(av.device)
    if cached:
        valid, mask, ref, new = _cached_logprobs(av, vectors, comp, G, timings)
    else:
        valid, mask, ref, new = _plain_logprobs(av, v_rep, comp, timings)
    with _phase(timings, "policy_forward"):
        loss, kl = _policy_loss(new, ref, adv, mask, clip=clip, kl_coef=kl_coef)
    with _phase(timings, "policy_backward"):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        opt.step()
    av.model.eval()
    lengths = valid.sum(1).float()
    return {
        "loss": float(loss.detach()),
        "reward": float(rewards.mean()),
        "reward_std": float(r.std(1).mean()),
        "kl": float((kl.detach() * mask).sum() / mask.sum().clamp_min(1)),
        "length": float(lengths.mean()),
        "well_formed": float(sum(ok for _, ok in parsed) / len(parsed)),
        "parsed": parsed,
        "vectors": v_rep,
    }


def rl_step(
    nla: NLA,
    vectors: torch.Tensor,
    opt,
    ar_opt,
    cfg: NLATrainConfig,
    *,
    cached: bool = True,
    timings: dict | None = None,
) -> dict:
    """One GRPO step on the AV, rewarded by the live AR, then one AR step on the well-formed rollouts.

    cached=True (see `grpo_step`) also runs the AR once per step rather than twice: the reward is read off the
    forward pass the AR step then back-propagates, which is the same function when the AR has no dropout.
    """
    ar = nla.ar
    one_pass = cached and ar_opt is not None and dropout_free(ar)
    kept: dict = {}

    def fits(e: str) -> bool:
        return len(ar.tokenizer(e, add_special_tokens=False)["input_ids"]) <= ar.cfg.max_explanation_tokens

    def usable(parsed) -> list[int]:
        # malformed, truncated, empty or over-long answers get the orthogonal reward and stay out of AR training
        return [i for i, (e, good) in enumerate(parsed) if good and e.strip() and fits(e)]

    def reward_fn(parsed, v_rep, comp):
        ok = kept["ok"] = usable(parsed)
        r = torch.full((len(parsed),), cfg.malformed_reward)
        if ok:
            if one_pass:
                ar.train()
                kept["pred"] = ar([parsed[i][0] for i in ok])
                pred = kept["pred"].detach()
            else:
                ar.eval()
                with torch.no_grad():
                    pred = ar([parsed[i][0] for i in ok])
            r[ok] = -nla_loss(pred, v_rep[ok].to(pred.device), reduction="none").cpu()
        return r

    st = grpo_step(
        nla.av,
        vectors,
        reward_fn,
        opt,
        group_size=cfg.group_size,
        temperature=cfg.temperature,
        kl_coef=cfg.kl_coef,
        clip=cfg.clip,
        max_new_tokens=cfg.max_new_tokens,
        before_step=lambda: average_gradients(nla.av.trainable_parameters()),
        cached=cached,
        timings=timings,
    )
    parsed, v_rep = st.pop("parsed"), st.pop("vectors")
    ok = kept["ok"]
    with _phase(timings, "ar_step"):
        if ar_opt is not None and (ok or rank_and_world()[1] > 1):
            # with several ranks every rank takes part in the all-reduce, contributing zero if it has no usable pair
            ar.train()
            ar_opt.zero_grad(set_to_none=True)
            if ok:
                if one_pass:
                    loss = nla_loss(kept.pop("pred"), v_rep[ok].to(ar.device))
                else:
                    loss = ar.loss([parsed[i][0] for i in ok], v_rep[ok])
                loss.backward()
                st["ar_loss"] = float(loss.detach())
            params = ar.trainable_parameters()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_gradients(params)
            ar_opt.step()
    return st

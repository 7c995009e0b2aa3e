"""The `rl` stage of NLA training: a GRPO update of the AV rewarded by the live AR, and the AR step on the rollouts.

Why our own GRPO loop instead of TRL's GRPOTrainer: the AV sees its vector through an embedding
hook, which TRL can only be made to arm by overriding its private `_generate_and_score_completions`
and log-prob passes (pinned to one TRL version), and the reward model (the AR) must keep training on
the rollouts, which TRL has no place for. The loop below is the whole algorithm in ~80 lines: G
samples per vector, reward −2(1 − cos) from the live AR (−2 for malformed or truncated answers),
group-normalised advantages, a clipped ratio loss, a k3 KL estimate to the warm-started AV, and one
AR step on the well-formed (explanation, vector) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..distributed import average_gradients, rank_and_world
from .bundle import NLA
from .core import nla_loss

if TYPE_CHECKING:
    from .train import TrainConfig


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
) -> dict:
    """One GRPO update of the AV on a batch of vectors.

    reward_fn(parsed, vectors_rep, completion_ids) -> rewards [N·G], where parsed is a list of
    (explanation, well_formed). Returns the step's statistics and the rollouts for the AR step.
    before_step runs between backward and the optimiser step (the gradient all-reduce of several ranks).
    """
    G = group_size
    av.model.eval()  # no dropout: sampling and the loss see the same function
    comp = av.generate_ids(vectors, samples=G, do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens)
    parsed = av.decode(comp)
    v_rep = vectors.repeat_interleave(G, 0)
    rewards = torch.as_tensor(reward_fn(parsed, v_rep, comp), dtype=torch.float32).flatten()
    r = rewards.view(-1, G)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten().to(av.device)
    # sequences = prompt + completion; the completion counts up to and including its first end token
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
    with torch.no_grad(), av.reference():
        ref = av.token_logprobs(v_rep, ids, att)
    av.model.train()
    new = av.token_logprobs(v_rep, ids, att)
    old = new.detach()  # one update per batch: the ratio starts at 1 and the clip bounds the step
    ratio = torch.exp(new - old)
    A = adv[:, None]
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - clip, 1 + clip) * A)
    log_r = ref - new
    kl = torch.exp(log_r) - log_r - 1  # k3 estimator of KL(policy ‖ reference), ≥ 0
    per_tok = pg + kl_coef * kl
    per_seq = (per_tok * mask).sum(1) / mask.sum(1).clamp_min(1)
    loss = per_seq.mean()
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


def rl_step(nla: NLA, vectors: torch.Tensor, opt, ar_opt, cfg: TrainConfig) -> dict:
    """One GRPO step on the AV, rewarded by the live AR, then one AR step on the well-formed rollouts."""
    ar = nla.ar

    def fits(e: str) -> bool:
        return len(ar.tokenizer(e, add_special_tokens=False)["input_ids"]) <= ar.cfg.max_explanation_tokens

    def usable(parsed) -> list[int]:
        # malformed, truncated, empty or over-long answers get the orthogonal reward and stay out of AR training
        return [i for i, (e, good) in enumerate(parsed) if good and e.strip() and fits(e)]

    def reward_fn(parsed, v_rep, comp):
        ok = usable(parsed)
        r = torch.full((len(parsed),), cfg.malformed_reward)
        if ok:
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
    )
    parsed, v_rep = st.pop("parsed"), st.pop("vectors")
    ok = usable(parsed)
    if ar_opt is not None and (ok or rank_and_world()[1] > 1):
        # with several ranks every rank takes part in the all-reduce, contributing zero if it has no usable pair
        ar.train()
        ar_opt.zero_grad(set_to_none=True)
        if ok:
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

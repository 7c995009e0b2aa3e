"""The cached GRPO path computes what the plain one does: same sampled tokens as HF generate for a seed, same
log-probs, rewards, loss, KL and gradients, on tiny models whose AV favours a few characters so that some answers
close their tag (the AR step runs) and some end early (padding is exercised)."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.models import tiny_model
from thoughtscope.nla import NLA, NLATrainConfig, config_for
from thoughtscope.nla.grpo import dropout_free, grpo_step, rl_step
from thoughtscope.nla.rollout import (
    completion_logprobs,
    reference_weights,
    sample_group,
    unreproduced_settings,
    valid_mask,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAVOURED = "ab ."  # "." closes an answer (response_suffix below)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "qwen2", "gemma"])
def lm(request):
    """GPT-2's dropout is switched off, as the default model has none: with it the policy pass is random."""
    lm = tiny_model(request.param, d_model=32, n_layers=3, seed=0)
    for m in lm.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(lm.model.config, k):
            setattr(lm.model.config, k, 0.0)
    return lm


def shaped_nla(lm) -> NLA:
    """A tiny NLA whose AV moved away from its reference and whose LM head favours FAVOURED and the end token."""
    cfg = config_for(lm, site="resid.1", injection_scale=6.0, lora_rank=4, max_new_tokens=12, response_suffix=".")
    nla = NLA(lm, cfg)
    nla.av.set_reference()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in nla.av.trainable_parameters() + nla.ar.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    bias = torch.zeros(lm.vocab_size)
    for ch in FAVOURED:
        bias[lm.tokenizer(ch, add_special_tokens=False)["input_ids"][0]] = 3.0
    bias[lm.tokenizer.eos_token_id] = 2.5
    nla.av.model.get_output_embeddings().register_forward_hook(lambda m, a, out: out + bias)
    return nla


def vectors(n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_draws_the_tokens_hf_generate_draws(lm, temperature):
    av = shaped_nla(lm).av
    assert unreproduced_settings(av) == []  # the hand-written sampler runs, not HF generate
    v = vectors(3, lm.d_model)
    for seed in range(3):
        torch.manual_seed(seed)
        hf = av.generate_ids(v, samples=4, do_sample=True, temperature=temperature)
        torch.manual_seed(seed)
        ours = sample_group(av, v, group=4, temperature=temperature)
        assert torch.equal(ours, hf), (seed, ours, hf)
    lengths = valid_mask(av, ours).sum(1)
    assert lengths.min() < lengths.max()  # some rows ended early: padding after the end token is exercised
    torch.manual_seed(0)
    assert torch.equal(sample_group(av, v, do_sample=False), av.generate_ids(v))


def test_valid_mask_keeps_tokens_up_to_the_first_end(lm):
    av = shaped_nla(lm).av
    e, x = av.end_ids[0], 40
    comp = torch.tensor([[x, e, x, e], [x, x, x, x], [e, e, e, e]])
    want = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(valid_mask(av, comp), want)


def test_cached_logprobs_and_their_gradients_equal_the_full_sequence_pass(lm):
    av = shaped_nla(lm).av
    v = vectors(2, lm.d_model)
    torch.manual_seed(0)
    comp = sample_group(av, v, group=3)
    valid = valid_mask(av, comp)
    P = len(av.prompt)
    ids = torch.cat([torch.tensor([av.prompt] * comp.shape[0]), comp], 1)
    att = torch.cat([torch.ones(comp.shape[0], P, dtype=torch.long), valid.long()], 1)
    params = av.trainable_parameters()

    def value_and_grads(fn):
        for p in params:
            p.grad = None
        lp = fn()
        (lp * valid).sum().backward()
        return lp.detach(), [p.grad.clone() for p in params]

    full, g_full = value_and_grads(lambda: av.token_logprobs(v.repeat_interleave(3, 0), ids, att)[:, P - 1 :])
    cached, g_cached = value_and_grads(lambda: completion_logprobs(av, v, comp, valid, 3))
    torch.testing.assert_close(cached[valid], full[valid], rtol=1e-5, atol=1e-5)
    assert sum(float(g.abs().sum()) for g in g_full) > 0
    for a, b in zip(g_cached, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_weights_are_the_reference_and_are_put_back(lm):
    av = shaped_nla(lm).av
    v = vectors(1, lm.d_model)
    ids = torch.tensor([av.prompt + [40, 41]])
    att = torch.ones_like(ids)
    before = [p.detach().clone() for p in av.trainable_parameters()]
    with torch.no_grad():
        with av.reference():
            slow = av.token_logprobs(v, ids, att)
        with reference_weights(av):
            fast = av.token_logprobs(v, ids, att)
        policy = av.token_logprobs(v, ids, att)
    assert torch.equal(fast, slow) and not torch.equal(fast, policy)
    assert all(torch.equal(p, b) for p, b in zip(av.trainable_parameters(), before))


def _step(nla, cached: bool, tc: NLATrainConfig, v: torch.Tensor):
    opt = torch.optim.SGD(nla.av.trainable_parameters(), lr=1.0)
    ar_opt = torch.optim.SGD(nla.ar.trainable_parameters(), lr=1.0)
    seen = []
    decode = nla.av.decode
    nla.av.decode = lambda comp: seen.append(decode(comp)) or seen[-1]
    torch.manual_seed(5)
    st = rl_step(nla, v, opt, ar_opt, tc, cached=cached)
    del nla.av.decode
    grads = [p.grad for p in nla.av.trainable_parameters() + nla.ar.trainable_parameters()]
    return st, seen[0], grads


def test_rl_step_cached_equals_plain(lm):
    tc = NLATrainConfig(stage="rl", group_size=4, kl_coef=0.5)
    v = vectors(3, lm.d_model)
    plain, cached = shaped_nla(lm), shaped_nla(lm)
    st_p, rollouts_p, g_p = _step(plain, False, tc, v)
    st_c, rollouts_c, g_c = _step(cached, True, tc, v)
    assert rollouts_c == rollouts_p
    assert 0 < st_p["well_formed"] < 1 and "ar_loss" in st_p and st_p["kl"] > 0  # every part of the step ran
    for k in ("loss", "reward", "reward_std", "kl", "length", "well_formed", "ar_loss"):
        assert st_c[k] == pytest.approx(st_p[k], rel=1e-4, abs=1e-6), k
    assert all(g is not None for g in g_p + g_c)
    for a, b in zip(g_c, g_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grpo_step_on_a_custom_reward_is_the_same_on_both_paths(lm):
    """grpo_step alone (no AR), the reward a function of the sampled ids."""
    v = vectors(2, lm.d_model)
    out = []
    for cached in (False, True):
        av = shaped_nla(lm).av
        opt = torch.optim.SGD(av.trainable_parameters(), lr=1.0)
        torch.manual_seed(3)
        st = grpo_step(av, v, lambda parsed, v_rep, comp: comp[:, 0].float(), opt, group_size=3, cached=cached)
        out.append((st, [p.grad.clone() for p in av.trainable_parameters()]))
    (a, ga), (b, gb) = out
    assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_dropout_free_tells_when_one_ar_pass_is_the_same_function():
    assert dropout_free(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))
    assert not dropout_free(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    llama = tiny_model("llama", d_model=32, n_layers=2)
    assert dropout_free(llama.model)
    llama.model.config.attention_dropout = 0.1
    assert not dropout_free(llama.model)

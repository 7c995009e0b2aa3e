"""NLA tests on tiny random models: injection, AR head, loss, training stages, GRPO, FVE, baselines, resume."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from thoughtscope.models import tiny_model
from thoughtscope.nla import (
    NLA,
    DataConfig,
    NLAError,
    NLATrainConfig,
    bootstrap_ci,
    config_for,
    fve,
    fve_parts,
    grpo_step,
    harvest_rows,
    nla_loss,
    normalise,
    train_stage,
)
from thoughtscope.nla.bundle import save_weights
from thoughtscope.nla.data import vector_stats
from thoughtscope.nla.evaluate import quote_analysis, ridge_predict, strip_quotes, token_mean_predict
from thoughtscope.nla.reconstructor import Reconstructor
from thoughtscope.nla.verbalizer import Verbalizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread beats a contended pool


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=32, n_layers=3, seed=0)


@pytest.fixture(scope="module")
def cfg(lm):
    return config_for(lm, site="resid.1", injection_scale=6.0, lora_rank=4, max_new_tokens=12)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = random.Random(0)
    words = "alpha beta gamma delta apple river stone cloud music paper".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(16))}) for _ in range(40)))
    return path


def row_config(corpus_file, **overrides) -> dict:
    """The tiny rows every test here reads (80 rows of the fixture corpus at resid.1)."""
    base = dict(
        corpus=str(corpus_file),
        site="resid.1",
        n_rows=80,
        positions_per_doc=2,
        max_position=70,
        max_explanation_tokens=60,
        split=(0.6, 0.2, 0.2),
    )
    return {**base, **overrides}


@pytest.fixture(scope="module")
def rows(lm, corpus_file):
    return harvest_rows(lm, DataConfig(**row_config(corpus_file)), progress=False)


# ----------------------------------------------------------------------------- injection


def _embeddings(av, ids, vectors=None):
    seen = {}
    emb = av.model.get_input_embeddings()
    h = emb.register_forward_hook(lambda m, a, o: seen.__setitem__("e", o.detach().clone()))
    try:
        with torch.no_grad():
            if vectors is None:
                av.model(input_ids=ids)
            else:
                with av.injecting(vectors):
                    av.model(input_ids=ids)
    finally:
        h.remove()
    return seen["e"]


def test_injection_replaces_exactly_the_marker(lm, cfg):
    av = Verbalizer(lm, cfg)
    ids = torch.tensor([av.prompt, av.prompt])
    v = torch.randn(2, cfg.d_model)
    # our hook is registered first, so the probe (registered later) sees the injected output
    before = _embeddings(av, ids)
    after = _embeddings(av, ids, v)
    p = av.prompt.index(cfg.marker_id)
    changed = (before != after).any(-1)
    assert changed[:, p].all() and changed.sum() == 2
    expected = v * (cfg.injection_scale / v.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(after[:, p], expected)


def test_injection_raises_on_missing_or_repeated_marker(lm, cfg):
    av = Verbalizer(lm, cfg)
    no_marker = torch.tensor([[t for t in av.prompt if t != cfg.marker_id]])
    twice = torch.tensor([av.prompt + [cfg.marker_id]])
    for ids in (no_marker, twice):
        with pytest.raises(NLAError, match="exactly once"), av.injecting(torch.randn(1, cfg.d_model)):
            av.model(input_ids=ids)
    bad = config_for(lm, site="resid.1", injection_scale=6.0)
    bad.av_template = "no marker here"
    with pytest.raises(NLAError, match="marker"):
        bad.check()


def test_bad_inputs_give_clear_errors(lm, cfg):
    av = Verbalizer(lm, cfg)
    with pytest.raises(NLAError, match=r"expected \[32\]"), av.injecting(torch.randn(3, 31)):
        pass
    with pytest.raises(Exception, match="beyond"):
        config_for(lm, site="resid.7")
    ar = Reconstructor(lm, cfg)
    with pytest.raises(NLAError, match="empty explanation"):
        ar(["   "])
    with pytest.raises(NLAError, match="at most"):
        ar(["x" * (cfg.max_explanation_tokens + 5)])
    other = tiny_model("llama", d_model=48, n_layers=3)
    with pytest.raises(NLAError, match="d_model"):
        NLA(other, cfg)


# ----------------------------------------------------------------------------- AR


def test_identity_head_reproduces_truncated_model(lm, cfg):
    ar = Reconstructor(lm, cfg)
    ids, att = ar.encode(["hello world", "hi"])
    with torch.no_grad():
        out = ar.forward_ids(ids, att)
        hs = lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[cfg.layer + 1]
    last = att.sum(1) - 1
    torch.testing.assert_close(out, hs[torch.arange(2), last])


def test_normalised_loss_is_two_one_minus_cos():
    p, g = torch.randn(5, 64) * 7, torch.randn(5, 64) * 0.1
    cos = torch.nn.functional.cosine_similarity(p, g, dim=-1)
    torch.testing.assert_close(nla_loss(p, g, reduction="none"), 2 * (1 - cos))
    assert math.isclose(float(normalise(p).norm(dim=-1)[0]), 8.0, rel_tol=1e-5)


def test_ar_regression_lowers_validation_loss(lm, cfg):
    torch.manual_seed(0)
    words = ["apple", "river", "stone", "cloud", "music", "paper"]
    targets = {w: torch.randn(cfg.d_model) for w in words}
    ar = Reconstructor(lm, cfg)
    train = [f"the {w}" for w in words]
    val = [f"one {w}" for w in words]
    y = torch.stack([targets[w] for w in words])
    with torch.no_grad():
        before = float(ar.loss(val, y))
    opt = torch.optim.AdamW(ar.trainable_parameters(), lr=2e-2)
    for _ in range(40):
        loss = ar.loss(train, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(ar.loss(val, y))
    assert after < 0.7 * before


# ----------------------------------------------------------------------------- GRPO


def test_grpo_step_raises_expected_reward(lm, cfg):
    """Toy task with a known best answer: reward = −|first token − target| / 100; expected reward is exact."""
    torch.manual_seed(0)
    av = Verbalizer(lm, cfg)
    av.set_reference()
    v = torch.randn(2, cfg.d_model)
    target = 120
    ids = torch.tensor([av.prompt] * 2)
    vocab = torch.arange(lm.vocab_size, dtype=torch.float32)
    reward_of = -(vocab - target).abs() / 100

    def expected():
        with torch.no_grad(), av.injecting(v):
            p = torch.softmax(av.model(input_ids=ids).logits[:, -1].float(), -1)
        return float((p * reward_of).sum(-1).mean())

    def reward_fn(parsed, v_rep, comp):
        return reward_of[comp[:, 0]]

    opt = torch.optim.SGD(av.trainable_parameters(), lr=0.5)
    before = expected()
    for _ in range(3):
        grpo_step(av, v, reward_fn, opt, group_size=8, max_new_tokens=2, kl_coef=0.01)
    assert expected() > before


# ----------------------------------------------------------------------------- metrics and baselines


def test_fve_and_bootstrap_on_known_answers():
    torch.manual_seed(0)
    g = torch.randn(400, 16) + 2.0
    gn = normalise(g)
    mu = gn.mean(0)
    assert abs(fve(mu.expand_as(g), g, renormalise=False)) < 1e-6
    assert abs(fve(g * 3.0, g) - 1.0) < 1e-9  # scale does not matter
    parts = fve_parts(g, g)
    assert math.isclose(parts["var"], 1 - float((mu / 4).pow(2).sum()), rel_tol=1e-6)
    # a prediction halfway to the mean: MSE = Var/4 before renormalisation; check against the formula
    p = mu + 0.5 * (gn - mu)  # halfway to the mean: FVE = 1 - 1/4
    assert math.isclose(fve(p, g, renormalise=False), 0.75, rel_tol=1e-5)
    mse = float((normalise(p) - gn).pow(2).mean())
    assert math.isclose(fve(p, g), 1 - mse / parts["var"], rel_tol=1e-5)
    noisy = p + 0.5 * torch.randn_like(p)
    f = fve(noisy, g, renormalise=False)
    lo, hi = bootstrap_ci(noisy, g, torch.arange(400) // 4, n_boot=200, renormalise=False)
    assert lo < f < hi and hi - lo < 0.3


def test_paired_bootstrap_separates_close_predictions_that_separate_cis_cannot():
    torch.manual_seed(0)
    g = torch.randn(200, 16) + 1.0
    gn = normalise(g)
    mu = gn.mean(0)
    groups = torch.arange(200) // 4
    # two predictions whose per-document difficulty is shared, one slightly better everywhere
    shared = torch.randn_like(gn) * (torch.rand(200, 1) * 2)
    a = mu + 0.55 * (gn - mu) + 0.3 * shared
    b = mu + 0.50 * (gn - mu) + 0.3 * shared
    fa, fb = fve(a, g, renormalise=False), fve(b, g, renormalise=False)
    ca = bootstrap_ci(a, g, groups, n_boot=300, renormalise=False)
    cb = bootstrap_ci(b, g, groups, n_boot=300, renormalise=False)
    lo, hi = bootstrap_ci(a, g, groups, n_boot=300, renormalise=False, minus=b)
    assert fa > fb and ca[0] < cb[1]  # the separate CIs overlap ...
    assert 0 < lo <= fa - fb <= hi  # ... the paired CI of the difference excludes 0
    lo0, hi0 = bootstrap_ci(a, g, groups, n_boot=100, renormalise=False, minus=a)
    assert lo0 == hi0 == 0.0


def test_token_mean_and_ridge_recover_a_known_mapping():
    torch.manual_seed(0)
    d, V = 16, 20
    table = torch.randn(V, d)
    ctx = torch.randint(0, V, (300, 16))
    tok = ctx[:, -1]
    y = table[tok]
    pred = token_mean_predict(tok[:200], y[:200], tok[200:])
    assert fve(pred, y[200:], renormalise=False) > 0.99
    # the vector is a sum over the last 4 tokens: ridge k=4 explains it, k=1 only partly
    y4 = sum(table[ctx[:, -j]] for j in range(1, 5))
    p4, _ = ridge_predict(ctx[:200], y4[:200], ctx[200:], 4, lambdas=(0.01,))
    p1, _ = ridge_predict(ctx[:200], y4[:200], ctx[200:], 1, lambdas=(0.01,))
    assert fve(p4, normalise(y4[200:]), renormalise=False) > 0.8 > fve(p1, y4[200:], renormalise=False)


def test_quote_analysis():
    qa = quote_analysis(['Context: "the cat sat". Next: "zzz".'], ["yesterday the cat sat on"])
    assert qa["n_quotes"] == 2 and qa["quote_verbatim_share"] == 0.5
    assert strip_quotes('say "hello there" now') == 'say "" now'


# ----------------------------------------------------------------------------- data, stages, resume


def test_harvest_rows_split_by_document(rows, lm):
    assert len(rows) == 80
    assert (rows.position >= 50).all()
    for s in range(3):
        docs = set(rows.doc_id[rows.split == s].tolist())
        others = set(rows.doc_id[rows.split != s].tolist())
        assert not docs & others
    st = rows.meta["stats"]
    assert st["injection_scale"] > st["mean_norm"] and 0 < st["mu_sq"] < 1
    assert rows.meta["warm_start"]["kind"] == "offline-extractive"
    assert all(e.split("Token:")[-1] for e in rows.explanations)


def test_dataset_roundtrip(rows, tmp_path):
    rows.save(tmp_path / "d")
    from thoughtscope.nla import NLARows

    back = NLARows.load(tmp_path / "d")
    torch.testing.assert_close(back.vectors, rows.vectors)
    assert back.explanations == rows.explanations


def _final_weights(path):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def _assert_resume_equals_uninterrupted(lm, rows, a, b, tc, weights="ar.safetensors"):
    """Run `tc` in folder a uninterrupted, and in folder b stopped at step 3 then resumed: same final AR (`weights`)."""
    train_stage(a, rows, NLATrainConfig(**tc), lm=lm, progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise Stop

    with pytest.raises(Stop):
        train_stage(b, rows, NLATrainConfig(**tc), lm=lm, progress=False, log=stop_at_3)
    # the checkpoint of step 3 is written after the log call, so the resume restarts from step 2
    r = train_stage(b, rows, NLATrainConfig(**tc), lm=lm, progress=False)
    assert r["done"]
    wa, wb = _final_weights(a / weights), _final_weights(b / weights)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k])


def test_resume_equals_uninterrupted(lm, rows, tmp_path):
    tc = dict(stage="ar-sft", steps=6, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=1, warmup=2)
    _assert_resume_equals_uninterrupted(lm, rows, tmp_path / "a", tmp_path / "b", tc)
    # the curve beside the NLA is drawn from the checkpointed history, so a resumed run has the same one
    a, b = (json.loads((d / "curves" / "ar-sft.json").read_text()) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["steps"] == 6 and [p[0] for p in a["series"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert a["series"].keys() == b["series"].keys()
    for k in a["series"]:
        assert [p[0] for p in a["series"][k]] == [p[0] for p in b["series"][k]]
        assert [p[1] for p in a["series"][k]] == pytest.approx([p[1] for p in b["series"][k]], rel=1e-4, abs=1e-6)


def test_train_rows_runs_the_stage_as_if_the_dataset_held_only_those_rows(lm, rows, tmp_path):
    """The recipe's early stages read the first rows of a larger dataset: same weights and config as on those rows."""
    k = 12
    train_idx, other = (rows.split == 0).nonzero().flatten(), (rows.split != 0).nonzero().flatten()
    small = rows.subset(torch.cat([train_idx[:k], other]).sort().values)
    small.meta["stats"] = vector_stats(small.subset("train").vectors)
    tc = dict(stage="ar-sft", steps=4, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=2, warmup=1)
    train_stage(tmp_path / "small", small, NLATrainConfig(**tc), lm=lm, progress=False)
    train_stage(tmp_path / "first", rows, NLATrainConfig(**tc, train_rows=k), lm=lm, progress=False)
    train_stage(tmp_path / "all", rows, NLATrainConfig(**tc), lm=lm, progress=False)
    config = {d: json.loads((tmp_path / d / "nla_config.json").read_text()) for d in ("small", "first", "all")}
    assert config["first"]["mean_norm"] == config["small"]["mean_norm"] != config["all"]["mean_norm"]
    ws, wf, wa = (_final_weights(tmp_path / d / "ar.safetensors") for d in ("small", "first", "all"))
    for key in ws:
        torch.testing.assert_close(wf[key], ws[key])
    assert any(not torch.allclose(wa[key], ws[key]) for key in ws)  # every row drawn: another trajectory
    with pytest.raises(NLAError, match="train_rows"):
        NLATrainConfig(train_rows=0).check()


def test_rl_curve_of_reward_kl_length_and_validation_fve_is_saved_beside_the_nla(lm, rows, tmp_path):
    d = tmp_path / "nla"
    common = dict(steps=2, batch_size=2, checkpoint_every=1, val_rows=4, max_new_tokens=8)
    for stage in ("ar-sft", "av-sft"):
        train_stage(d, rows, NLATrainConfig(stage=stage, eval_every=0, **common), lm=lm, progress=False)
    r = train_stage(d, rows, NLATrainConfig(stage="rl", eval_every=2, **{**common, "steps": 4}), lm=lm, progress=False)
    curve = json.loads((d / "curves" / "rl.json").read_text())
    assert curve["panels"] == ["reward", "kl", "length", "val_fve_round_trip"] and curve["steps"] == 4
    for key in ("reward", "kl", "length"):
        assert curve["series"][key] == [[h["step"], pytest.approx(h[key])] for h in r["history"]]
    assert [p[0] for p in curve["series"]["val_fve_round_trip"]] == [2, 4]
    assert (d / "curves" / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (d / "curves" / "ar-sft.png").is_file() and (d / "curves" / "av-sft.json").is_file()


def test_all_stages_run_and_save(lm, rows, tmp_path):
    d = tmp_path / "nla"
    for stage in ("ar-sft", "av-sft", "rl"):
        r = train_stage(
            d,
            rows,
            NLATrainConfig(
                stage=stage, steps=2, batch_size=2, eval_every=2, checkpoint_every=1, val_rows=4, max_new_tokens=8
            ),
            lm=lm,
            progress=False,
        )
        assert r["done"]
    hist = r["history"][-1]
    assert {"reward", "kl", "length", "well_formed"} <= hist.keys()
    names = {p.name for p in d.iterdir()}
    assert {"nla_config.json", "av.safetensors", "ar.safetensors", "warm_av.safetensors"} <= names
    assert "rl_ar.safetensors" not in names
    nla = NLA.load(d, lm=lm)
    expl, rec, loss = nla.round_trip(rows.vectors[:2])
    assert len(expl) == 2 and rec.shape == (2, lm.d_model)
    cos = torch.nn.functional.cosine_similarity(rec, rows.vectors[:2].to(rec.dtype), dim=-1)
    assert torch.allclose(loss, 2 * (1 - cos), atol=1e-5)  # the loss is the normalised 2(1 - cos), per row
    with pytest.raises(NLAError, match="rl"):
        train_stage(tmp_path / "fresh", rows, NLATrainConfig(stage="rl", steps=1), lm=lm, progress=False)


def _through_rl(lm, rows, d):
    for stage in ("ar-sft", "av-sft", "rl"):
        train_stage(
            d,
            rows,
            NLATrainConfig(stage=stage, steps=2, batch_size=2, eval_every=0, checkpoint_every=1, max_new_tokens=8),
            lm=lm,
            progress=False,
        )


def test_rl_continue_starts_where_rl_ended_with_the_warm_av_as_reference(lm, rows, tmp_path):
    d = tmp_path / "nla"
    with pytest.raises(NLAError, match="before rl-continue"):
        train_stage(d, rows, NLATrainConfig(stage="rl-continue", steps=1), lm=lm, progress=False)
    common = dict(steps=2, batch_size=2, eval_every=0, checkpoint_every=1, max_new_tokens=8)
    for stage in ("ar-sft", "av-sft"):
        train_stage(d, rows, NLATrainConfig(stage=stage, **common), lm=lm, progress=False)
    first = train_stage(d, rows, NLATrainConfig(stage="rl", **common), lm=lm, progress=False)
    assert first["history"][0]["kl"] == 0.0  # rl starts at its reference
    # where a longer rl would have moved the policy away from the warm AV
    g = torch.Generator().manual_seed(0)
    av_rl = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in _final_weights(d / "av.safetensors").items()}
    save_weights(av_rl, d / "av.safetensors")
    av_rl = _final_weights(d / "av.safetensors")  # as stored
    ar_rl = _final_weights(d / "ar.safetensors")
    # with nothing learnt (lr 0) the second run publishes exactly the weights rl ended with ...
    frozen = NLATrainConfig(stage="rl-continue", lr=0.0, ar_lr=0.0, **common)
    r = train_stage(d, rows, frozen, lm=lm, progress=False)
    for path, before in (("av.safetensors", av_rl), ("ar.safetensors", ar_rl)):
        for k, v in _final_weights(d / path).items():
            torch.testing.assert_close(v, before[k])
    # ... and its KL is measured from the warm AV, not from where it starts
    assert r["history"][0]["kl"] > 0 and (d / "curves" / "rl-continue.png").is_file()
    (d / "train_state" / "rl-continue.pt").unlink()
    r = train_stage(d, rows, NLATrainConfig(stage="rl-continue", lr=3e-2, ar_lr=1e-2, **common), lm=lm, progress=False)
    assert r["done"] and any(not torch.equal(_final_weights(d / "av.safetensors")[k], av_rl[k]) for k in av_rl)
    ar_continued = _final_weights(d / "ar.safetensors")
    train_stage(d, rows, NLATrainConfig(stage="ar-refit", steps=1, batch_size=2, val_rows=2), lm=lm, progress=False)
    for k, v in _final_weights(d / "rl_ar.safetensors").items():  # the AR the refit starts from is the continued one
        torch.testing.assert_close(v, ar_continued[k])
    (d / "train_state" / "rl-continue.pt").unlink()
    with pytest.raises(NLAError, match="before ar-refit"):
        train_stage(d, rows, NLATrainConfig(stage="rl-continue", steps=1), lm=lm, progress=False)


def test_ar_refit_trains_the_ar_on_the_avs_own_explanations(lm, rows, tmp_path):
    d = tmp_path / "nla"
    with pytest.raises(NLAError, match="before ar-refit"):
        train_stage(d, rows, NLATrainConfig(stage="ar-refit", steps=1), lm=lm, progress=False)
    _through_rl(lm, rows, d)
    rl_ar = _final_weights(d / "ar.safetensors")
    av_before = _final_weights(d / "av.safetensors")
    tc = dict(stage="ar-refit", steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=1, warmup=1, val_rows=4)
    r = train_stage(d, rows, NLATrainConfig(**tc), lm=lm, progress=False)
    assert r["done"] and "val_fve_round_trip" in r["history"][-1]
    # the AR it started from is kept, the AV is untouched, the final AR moved
    for k, v in _final_weights(d / "rl_ar.safetensors").items():
        torch.testing.assert_close(v, rl_ar[k])
    for k, v in _final_weights(d / "av.safetensors").items():
        torch.testing.assert_close(v, av_before[k])
    after = _final_weights(d / "ar.safetensors")
    assert any(not torch.equal(after[k], rl_ar[k]) for k in after)
    # the explanations it trained on are the AV's greedy ones, one per training / validation vector
    cache = json.loads((d / "train_state" / "ar-refit.explanations.json").read_text())
    nla = NLA.load(d, lm=lm, which="rl")
    train = rows.subset("train")
    assert len(cache["sets"]["train"]) == len(train) and len(cache["sets"]["val"]) == 4
    assert cache["sets"]["train"][:3] == nla.explain(train.vectors[:3])
    from thoughtscope.nla import evaluate_nla

    res = evaluate_nla(str(d), rows, quick=True, n_boot=20, lm=lm, progress=False)
    assert "rl_before_refit" in res["baselines"] and "rl_before_refit" in res["nla_minus_baseline"]
    gap = res["rl_before_refit_minus_warm_start"]
    assert math.isclose(gap["diff"], res["baselines"]["rl_before_refit"] - res["baselines"]["warm_start"])
    assert gap["ci"][0] <= gap["ci"][1] and "rl_stage_beats_warm_start_outside_paired_ci" in res["bar"]
    # no warm_refit_ar.safetensors yet: the control's key is there and says how to make it
    missing = res["rl_vs_warm_start_refit"]
    assert missing["diff"] is None and missing["ci"] is None and "warm_start_refit" not in res["baselines"]
    assert "warm_refit_ar.safetensors not in the NLA folder" in missing["missing"]
    assert "--stage ar-refit-warm" in missing["missing"]
    assert res["bar"]["rl_beats_warm_start_refit_outside_paired_ci"] is None
    # a cache written by other AV weights is refused
    cache["av_sha256"] = "0" * 64
    (d / "train_state" / "ar-refit.explanations.json").write_text(json.dumps(cache))
    (d / "train_state" / "ar-refit.pt").unlink()
    with pytest.raises(NLAError, match="other AV weights"):
        train_stage(d, rows, NLATrainConfig(**tc), lm=lm, progress=False)
    with pytest.raises(NLAError, match="unknown weights"):
        NLA.load(d, lm=lm, which="best")


def test_ar_refit_resume_equals_uninterrupted(lm, rows, tmp_path):
    import shutil

    _through_rl(lm, rows, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    tc = dict(stage="ar-refit", steps=5, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=1, warmup=1)
    _assert_resume_equals_uninterrupted(lm, rows, tmp_path / "a", tmp_path / "b", tc)


def _nla_ddp_worker(rank, world_size, port, lm, rows, folder, stages, out):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for tc in stages:
            r = train_stage(folder, rows, NLATrainConfig(**tc), lm=lm, progress=False)
        nla = r["nla"]
        torch.save(
            {"av": nla.av.adapter_state(), "ar": nla.ar.adapter_state(), "history": r["history"]}, f"{out}.{rank}"
        )
    finally:
        dist.destroy_process_group()


def _run_two_ranks(lm, rows, folder, stages, out):
    import socket
    import sys

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(
        _nla_ddp_worker, args=(2, port, lm, rows, folder, stages, out), nprocs=2, join=True, start_method=method
    )
    return [torch.load(f"{out}.{r}") for r in range(2)]


def test_two_processes_follow_the_single_process_trajectory(lm, rows, tmp_path):
    """2 gloo ranks × 2 rows must train the AR as 1 process × 4 rows does (gradients averaged over ranks)."""
    tc = dict(stage="ar-sft", steps=4, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=1, warmup=1)
    single = train_stage(tmp_path / "one", rows, NLATrainConfig(**tc), lm=lm, progress=False)["nla"].ar.adapter_state()
    from thoughtscope.nla.core import NLAConfig

    start = NLA(lm, NLAConfig.load(tmp_path / "one")).ar.adapter_state()
    got = _run_two_ranks(lm, rows, tmp_path / "two", [tc], str(tmp_path / "w"))
    moved = sum(float((single[k] - start[k]).norm()) for k in single)
    assert moved > 0
    for rank_state in (got[0]["ar"], got[1]["ar"]):
        off = sum(float((rank_state[k] - single[k]).norm()) for k in single)
        assert off < 0.02 * moved, (off, moved)  # each rank alone on its half would be off by ~moved
    # the losses logged are the mean over ranks, i.e. the single process's loss of the same batch
    for a, b in zip(
        got[0]["history"], train_stage(tmp_path / "one", rows, NLATrainConfig(**tc), lm=lm, progress=False)["history"]
    ):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3)


def test_rl_and_refit_on_two_processes_keep_the_ranks_in_step(lm, rows, tmp_path):
    d = tmp_path / "nla"
    for stage in ("ar-sft", "av-sft"):
        train_stage(d, rows, NLATrainConfig(stage=stage, steps=2, batch_size=2, eval_every=0), lm=lm, progress=False)
    stages = [
        dict(
            stage="rl",
            steps=2,
            batch_size=2,
            group_size=2,
            eval_every=2,
            val_rows=2,
            checkpoint_every=1,
            max_new_tokens=8,
        ),
        dict(stage="ar-refit", steps=2, batch_size=4, eval_every=2, val_rows=4, checkpoint_every=1),
    ]
    got = _run_two_ranks(lm, rows, d, stages, str(tmp_path / "w"))
    for part in ("av", "ar"):
        for k, v in got[0][part].items():
            torch.testing.assert_close(got[1][part][k], v)
    assert (d / "rl_ar.safetensors").is_file() and (d / "train_state" / "ar-refit.pt").is_file()
    with pytest.raises(Exception, match="split evenly"):  # raised inside the ranks
        _run_two_ranks(lm, rows, tmp_path / "odd", [dict(stage="ar-sft", steps=1, batch_size=3)], str(tmp_path / "x"))


def test_evaluate_quick_on_tiny(lm, rows, tmp_path):
    from thoughtscope.nla import evaluate_nla, format_table

    d = tmp_path / "nla"
    train_stage(d, rows, NLATrainConfig(stage="ar-sft", steps=2, batch_size=2, eval_every=0), lm=lm, progress=False)
    nla = NLA.load(d, lm=lm)
    res = evaluate_nla(nla, rows, quick=True, n_boot=50, json_path=tmp_path / "e.json", progress=False)
    for k in ("mean", "empty", "shuffled", "token_mean", "ridge_k1", "ridge_k4", "ridge_k16", "oracle"):
        assert k in res["baselines"]
    assert abs(res["baselines"]["mean"]) < 1e-9
    assert res["fve_ci"][0] <= res["fve_ci"][1]
    saved = json.loads((tmp_path / "e.json").read_text())
    assert {"fve", "fve_ci", "baselines"} <= saved.keys()
    assert "NLA round trip" in format_table(res)
    assert set(res["nla_minus_baseline"]) == set(res["baselines"])
    d = res["nla_minus_baseline"]["token_mean"]
    assert math.isclose(d["diff"], res["fve"] - res["baselines"]["token_mean"]) and d["ci"][0] <= d["ci"][1]
    assert set(res["bar"]["beats_outside_paired_ci"]) == {
        "mean",
        "empty",
        "shuffled",
        "token_mean",
        "token_only",
        "ridge_k1",
        "ridge_k4",
        "ridge_k16",
    }
    # token_only: the AR reading just the token clause the warm-start text ends with
    assert "token_only" in res["nla_minus_baseline"] and "| token_only |" in format_table(res)
    assert 0 <= res["prose_share"] <= 1 and res["oracle_prose_share"] == 0.0  # the oracle text is a field template
    assert (
        saved["rl_vs_warm_start_refit"]["diff"] is None
        and "no warm start" in saved["rl_vs_warm_start_refit"]["missing"]
    )


def test_eval_examples_are_random_rows_not_the_best(lm, rows, tmp_path):
    from thoughtscope.nla import evaluate_nla
    from thoughtscope.nla.prose import is_prose

    d = tmp_path / "nla"
    train_stage(d, rows, NLATrainConfig(stage="ar-sft", steps=1, batch_size=2, eval_every=0), lm=lm, progress=False)
    test = rows.subset("test")
    res = evaluate_nla(str(d), rows, quick=False, n_boot=5, lm=lm, progress=False, warm=False, n_examples=5)
    ex = res["examples"]
    picked = [e["row"] for e in ex]
    assert len(ex) == min(5, len(test)) and picked == sorted(set(picked))
    # a seeded draw: the same rows for the same seed, other rows for another, whatever the scores
    want = torch.randperm(len(test), generator=torch.Generator().manual_seed(7))[:5].sort().values.tolist()
    assert picked == want
    again = evaluate_nla(str(d), rows, quick=False, n_boot=5, lm=lm, progress=False, warm=False, n_examples=5, seed=3)
    assert [e["row"] for e in again["examples"]] != picked or len(test) <= 5
    for e in ex:
        i = e["row"]
        assert e["context"] == test.contexts[i][-120:] and e["token"] == lm.tokenizer.decode([int(test.token_id[i])])
        assert e["prose"] == is_prose(e["explanation"]) and -1 <= e["cos"] <= 1


def test_token_clause_is_how_the_warm_start_text_ends(rows, lm):
    from thoughtscope.nla.warm_start import token_clause

    for expl, tok in zip(rows.explanations, rows.token_id.tolist()):
        assert expl.endswith(" " + token_clause(lm.tokenizer.decode([tok])))
    assert token_clause(" island") == "Token: island" and token_clause("island") == "Token: island"
    assert token_clause('"\n') == "Token: '\\n"


def _files(d):
    return {p.name: _final_weights(p) for p in d.glob("*.safetensors")}


def test_ar_refit_warm_writes_only_the_control_ar(lm, rows, tmp_path):
    from thoughtscope.nla import evaluate_nla

    d = tmp_path / "nla"
    tc = dict(stage="ar-refit-warm", steps=3, batch_size=4, lr=1e-2, eval_every=3, checkpoint_every=1, warmup=1)
    train_stage(d, rows, NLATrainConfig(stage="ar-sft", steps=2, batch_size=2, eval_every=0), lm=lm, progress=False)
    with pytest.raises(NLAError, match="before ar-refit-warm"):
        train_stage(d, rows, NLATrainConfig(**tc), lm=lm, progress=False)
    _through_rl(lm, rows, d)
    train_stage(d, rows, NLATrainConfig(**{**tc, "stage": "ar-refit", "eval_every": 0}), lm=lm, progress=False)
    before = _files(d)
    r = train_stage(d, rows, NLATrainConfig(**tc, val_rows=4), lm=lm, progress=False)
    assert r["done"] and "val_fve_round_trip" in r["history"][-1]
    after = _files(d)
    # av, ar, the warm weights and rl_ar are as they were; the new file is the warm AR, moved by the refit
    assert set(after) == set(before) | {"warm_refit_ar.safetensors"}
    for name, w in before.items():
        for k, v in w.items():
            torch.testing.assert_close(after[name][k], v)
    refit, warm_ar = after["warm_refit_ar.safetensors"], before["warm_ar.safetensors"]
    assert any(not torch.equal(refit[k], warm_ar[k]) for k in refit)
    # it trained on the warm AV's greedy explanations, cached apart from ar-refit's
    cache = json.loads((d / "train_state" / "ar-refit-warm.explanations.json").read_text())
    control = NLA.load(d, lm=lm, which="warm_refit")
    train = rows.subset("train")
    assert cache["sets"]["train"][:3] == NLA.load(d, lm=lm, which="warm").explain(train.vectors[:3])
    for k, v in control.ar.adapter_state().items():
        torch.testing.assert_close(v, refit[k].to(v.dtype), atol=1e-3, rtol=1e-3)
    res = evaluate_nla(str(d), rows, quick=True, n_boot=20, lm=lm, progress=False)
    gap = res["rl_vs_warm_start_refit"]
    assert "warm_start_refit" in res["baselines"] and "missing" not in gap
    assert math.isclose(gap["diff"], res["fve"] - res["baselines"]["warm_start_refit"])
    assert gap["ci"][0] <= gap["ci"][1] and gap == {
        **res["nla_minus_baseline"]["warm_start_refit"],
        "from": gap["from"],
    }
    assert res["bar"]["rl_beats_warm_start_refit_outside_paired_ci"] == (gap["ci"][0] > 0)
    assert {"token_only", "warm_start_refit"} <= res["nla_minus_baseline"].keys()
    assert 0 <= res["prose_share"] <= 1 and 0 <= res["warm_start_prose_share"] <= 1
    (d / "warm_refit_ar.safetensors").unlink()
    with pytest.raises(NLAError, match="warm_refit_ar.safetensors not found"):
        NLA.load(d, lm=lm, which="warm_refit")


def test_ar_refit_warm_resume_equals_uninterrupted(lm, rows, tmp_path):
    import shutil

    for stage in ("ar-sft", "av-sft"):
        train_stage(
            tmp_path / "a",
            rows,
            NLATrainConfig(stage=stage, steps=2, batch_size=2, eval_every=0),
            lm=lm,
            progress=False,
        )
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    tc = dict(stage="ar-refit-warm", steps=5, batch_size=4, lr=1e-2, eval_every=0, checkpoint_every=1, warmup=1)
    _assert_resume_equals_uninterrupted(lm, rows, tmp_path / "a", tmp_path / "b", tc, "warm_refit_ar.safetensors")


def test_evaluate_compares_other_nlas_on_the_same_vectors(lm, rows, tmp_path):
    from thoughtscope.nla import evaluate_nla
    from thoughtscope.nla.__main__ import main

    d = tmp_path / "nla"
    train_stage(d, rows, NLATrainConfig(stage="ar-sft", steps=2, batch_size=2, eval_every=0), lm=lm, progress=False)
    res = evaluate_nla(str(d), rows, quick=True, n_boot=30, lm=lm, progress=False, compare={"itself": str(d)})
    # the same NLA as a rung: identical predictions, so the paired difference is exactly zero
    assert math.isclose(res["baselines"]["itself"], res["fve"], abs_tol=1e-9)
    assert res["nla_minus_baseline"]["itself"]["ci"] == [0.0, 0.0]
    with pytest.raises(NLAError, match="already a rung"):
        evaluate_nla(str(d), rows, quick=True, n_boot=5, lm=lm, progress=False, compare={"oracle": str(d)})
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--compare", "no-equals-sign"])
    assert exit_.value.code == 2


def test_explain_text_and_steering_from_words(lm, cfg):
    from thoughtscope.nla import explain_text, steer_from_words, steering_delta

    nla = NLA(lm, cfg)
    out = explain_text(nla, "alpha beta gamma", positions=[-1, 2], samples=2)
    # positions count the BOS token (index 0) and len(out[0]["samples"]) == 2
    assert [o["position"] for o in out] == [16, 2]
    assert all(isinstance(o["fve"], float) for o in out)
    delta = steering_delta(nla, "the river", "the stone", norm=10.0)
    assert delta.shape == (lm.d_model,) and float(delta.norm()) > 0
    res = steer_from_words(nla, "alpha beta", "the river", "the stone", strength=50.0, max_new_tokens=6)
    assert res["steered"] != res["unsteered"]
    with pytest.warns(DeprecationWarning, match="strength"):  # the old name of strength
        old = steer_from_words(nla, "alpha beta", "the river", "the stone", scale=50.0, max_new_tokens=6)
    assert old["steered"] == res["steered"]
    with pytest.raises(NLAError, match="outside"):
        explain_text(nla, "abc", positions=[10])


def test_quick_eval_of_an_exported_nla(lm, rows, tmp_path):
    """`nla eval --quick` path: the exported folder carries its baseline rows; only test rows are harvested."""
    from thoughtscope.nla import evaluate_nla
    from thoughtscope.nla.evaluate import BASELINE_FILE
    from thoughtscope.nla.recipe import export

    rows.save(tmp_path / "data")
    train_stage(
        tmp_path / "nla",
        rows,
        NLATrainConfig(stage="ar-sft", steps=1, batch_size=2, eval_every=0),
        lm=lm,
        progress=False,
    )
    export(tmp_path / "nla", tmp_path / "shipped", tmp_path / "data")
    assert (tmp_path / "shipped" / BASELINE_FILE).is_file()
    res = evaluate_nla(str(tmp_path / "shipped"), lm=lm, quick=True, n_test=8, n_boot=20, progress=False)
    assert res["data"]["baseline_rows"] == "shipped with the NLA"
    assert res["n_test"] == 8 and "oracle" in res["baselines"] and "ridge_k16" in res["baselines"]


# ----------------------------------------------------------------------------- the shipped NLA on the real model


@pytest.mark.slow
def test_demo_ends_with_the_shipped_nla_explaining_tokens(tmp_path):
    """`thoughtscope demo`'s last stage: the shipped NLA explains tokens of the sample text and reads them back."""
    from rich.console import Console

    from thoughtscope.demo import _nla_stage
    from thoughtscope.models import load_model

    summary: dict = {}
    with open(os.devnull, "w") as devnull:
        _nla_stage(Console(file=devnull), load_model("default"), tmp_path, summary)
    rows = summary["nla"]["rows"]
    assert len(rows) == 3
    for r in rows:
        assert "Token:" in r["explanation"] and r["explanation"].strip()
        assert r["fve"] > 0  # the words give back more of the activation than the mean vector does


@pytest.mark.slow
def test_cli_eval_of_the_shipped_nla_writes_the_named_keys(tmp_path):
    from thoughtscope.nla.__main__ import main

    out = tmp_path / "eval.json"
    assert main(["--threads", "2", "eval", "--model", "default", "--n-test", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_test"] == 8 and res["fve_ci"][0] <= res["fve"] <= res["fve_ci"][1]
    assert {"mean", "ridge_k1", "token_mean", "token_only", "oracle", "warm_start", "rl_before_refit"} <= res[
        "baselines"
    ].keys()
    assert 0 <= res["prose_share"] <= 1 and res["oracle_prose_share"] == 0.0
    refit = res["rl_vs_warm_start_refit"]  # the shipped NLA carries warm_refit_ar.safetensors
    assert "warm_start_refit" in res["baselines"] and refit["from"] == "warm_refit_ar.safetensors"
    assert refit["ci"][0] <= refit["diff"] <= refit["ci"][1]
    assert res["warm_start"]["kind"] == "offline-extractive"


def test_prose_warm_start_says_the_same_facts_as_sentences(lm, corpus_file, rows):
    """`warm_start="prose"` writes the field layout's facts as sentences: same rows and vectors, the current
    token still last (the AR's last position reads it), and the text passes the prose rule where the
    field layout never does."""
    from thoughtscope.nla.prose import prose_share
    from thoughtscope.nla.warm_start import offline_explanation, token_clause

    prose_rows = harvest_rows(lm, DataConfig(**row_config(corpus_file, warm_start="prose")), progress=False)
    assert torch.equal(prose_rows.vectors, rows.vectors) and prose_rows.contexts == rows.contexts
    assert prose_rows.meta["warm_start"]["kind"] == "offline-extractive-prose"
    for fields, prose, tok in zip(rows.explanations, prose_rows.explanations, prose_rows.token_id.tolist()):
        assert prose.endswith(" now reads" + token_clause(lm.tokenizer.decode([tok]))[len("Token:") :])
        # the sentences are longer, so the token budget may trim more (quote first, then topic, then next)
        topic = fields.split("Topic: ", 1)[1].split(".", 1)[0].split(", ") if fields.startswith("Topic: ") else []
        said = prose.split("The text is about ", 1)[1].split(".", 1)[0].split(" and ") if "about" in prose else []
        assert set(said) <= set(topic)
        quote = fields.split('Context: "', 1)[1].split('".', 1)[0] if 'Context: "' in fields else ""
        read = prose.split('just read "', 1)[1].split('" and now', 1)[0] if "just read" in prose else ""
        assert quote.endswith(read)
    # with room for everything, both layouts carry exactly the same facts
    ids = lm.tokenizer(" ".join(["river stone cloud"] * 5), add_special_tokens=False)["input_ids"]
    nxt = ids[:2]
    full = dict(max_explanation_tokens=10_000)
    fields = offline_explanation(lm.tokenizer, ids, nxt, **full)
    prose = offline_explanation(lm.tokenizer, ids, nxt, style="prose", **full)
    topic, rest = fields[len("Topic: ") :].split(". Next: ", 1)
    nexts, rest = rest.split(". Context: ", 1)
    quote, token = rest.split(". Token:", 1)
    assert prose == (
        f"The text is about {' and '.join(topic.split(', '))}. Next it expects {nexts.replace(' / ', ' or ')}. "
        f"It has just read {quote} and now reads{token}"
    )
    assert prose_share(rows.explanations) == 0.0 and prose_share(prose_rows.explanations) > 0.5
    with pytest.raises(NLAError, match="style"):
        offline_explanation(lm.tokenizer, [5, 6, 7], [8], style="bullets")
    with pytest.raises(NLAError, match="warm_start"):
        harvest_rows(lm, DataConfig(corpus=str(corpus_file), warm_start="poem"), progress=False)


def test_recipe_runs_every_stage_then_the_eval_and_resumes(lm, corpus_file, tmp_path):
    """run_recipe on a miniature recipe: data, the six stages, the eval JSON; a second call finds every
    stage finished and leaves the weights as they were. The scaled recipe is well formed and sized as #15
    asks (>= 20,000 vectors from >= 5,000 documents, positions that cover short texts)."""
    from thoughtscope.nla.recipe import DEFAULT_RECIPE, SCALED_RECIPE, export, run_recipe

    tiny = dict(batch_size=2, eval_every=0, checkpoint_every=1, val_rows=4, max_new_tokens=8)
    mini = {
        "data": row_config(corpus_file, n_rows=40),
        "stages": [
            dict(stage=s, steps=2, **tiny)
            for s in ("ar-sft", "av-sft", "rl", "rl-continue", "ar-refit", "ar-refit-warm")
        ],
    }
    first = []
    res = run_recipe(tmp_path / "w", recipe=mini, lm=lm, log=first.append)
    assert len(first) >= 5  # the stages logged their steps
    assert (tmp_path / "w" / "eval.json").is_file() and "fve" in res and "oracle" in res["baselines"]
    nla_dir = tmp_path / "w" / "nla"
    before = _files(nla_dir)
    assert {"av.safetensors", "ar.safetensors", "warm_refit_ar.safetensors", "rl_ar.safetensors"} <= before.keys()
    steps = []
    run_recipe(tmp_path / "w", recipe=mini, lm=lm, log=steps.append)
    assert steps == []  # nothing trained again
    after = _files(nla_dir)
    for name in before:
        for k in before[name]:
            torch.testing.assert_close(before[name][k], after[name][k])
    shipped = tmp_path / "shipped"
    export(nla_dir, shipped, tmp_path / "w" / "data")
    assert (shipped / "curves" / "rl.png").is_file() and (shipped / "curves" / "rl-continue.json").is_file()
    assert (shipped / "av.safetensors").is_file()
    with pytest.raises(NLAError, match="unknown recipe"):
        run_recipe(tmp_path / "x", recipe="huge", lm=lm)
    assert [s["stage"] for s in SCALED_RECIPE["stages"]] == [s["stage"] for s in DEFAULT_RECIPE["stages"]]
    for st in SCALED_RECIPE["stages"]:
        NLATrainConfig(**st).check()
        assert "train_rows" not in st  # the default recipe's early-stage row count stays with its own dataset
    d = SCALED_RECIPE["data"]
    assert d["n_rows"] >= 20_000 and d["n_rows"] / d["positions_per_doc"] >= 5_000 and 1 <= d["min_position"] < 10
    DataConfig(**d)


def test_renamed_settings_still_read_their_old_names(lm):
    """One name per meaning: the NLA's train config is NLATrainConfig, documents per forward pass are
    contexts_per_batch, the offline explanation's budget is max_explanation_tokens. The old names still work, with
    a warning, so scripts and the data recipe saved in the shipped NLA's config keep loading."""
    import dataclasses

    import thoughtscope.nla as nla_pkg
    import thoughtscope.nla.train as nla_train
    from thoughtscope.nla.config import NLAConfig
    from thoughtscope.nla.explain import default_nla_path
    from thoughtscope.nla.warm_start import offline_explanation

    for module in (nla_pkg, nla_train):
        with pytest.warns(DeprecationWarning, match="NLATrainConfig"):
            assert module.TrainConfig is NLATrainConfig
    saved = NLAConfig.load(default_nla_path()).extra["data_config"]
    assert saved["batch_docs"] == 8
    with pytest.warns(DeprecationWarning, match="contexts_per_batch"):
        dc = DataConfig(**saved)
    assert dc.contexts_per_batch == 8 and "batch_docs" not in dataclasses.asdict(dc)
    ids = lm.tokenizer(" ".join(["river stone cloud"] * 5), add_special_tokens=False)["input_ids"]
    with pytest.warns(DeprecationWarning, match="max_explanation_tokens"):
        old = offline_explanation(lm.tokenizer, ids, ids[:2], max_tokens=12)
    assert old == offline_explanation(lm.tokenizer, ids, ids[:2], max_explanation_tokens=12)


def test_the_settings_load_without_torch():
    """The configs live in torch-free nla/config.py (and the package loads its names on first use), so the
    command line reads each option's help from the fields' docstrings without loading torch."""
    import subprocess
    import sys

    code = "import sys, thoughtscope.nla.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("lo, hi", [(96, 96), (100, 50), (-1, 10), ("5", 10)])
def test_data_config_refuses_an_empty_position_range(lo, hi):
    from thoughtscope.errors import NLAError
    from thoughtscope.nla.config import DataConfig

    with pytest.raises(NLAError, match="min_position"):
        DataConfig(min_position=lo, max_position=hi)


def test_lean_sampler_gives_generates_ids(lm, cfg, monkeypatch):
    """The verbalizer's sampler (`rollout.sample_group`, used by explain and the RL step) runs on the lean decoder
    with transformers' rules (marker suppressed, temperature, draws from the global generator, rows padded with
    the end id after they end): the ids `generate` gives, with a trained LoRA adapter; in training mode (where
    the lean decoder does not run) transformers' cached forward gives them too."""
    from thoughtscope.decoding import lean_reason
    from thoughtscope.nla import rollout

    av = Verbalizer(lm, cfg)
    with torch.no_grad():  # a trained adapter, so the LoRA path is not a zero update
        for name, p in av.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    v = torch.randn(3, cfg.d_model, generator=torch.Generator().manual_seed(0))
    av.model.eval()
    assert lean_reason(av.model.get_base_model()) is None
    used = []
    real = rollout._LeanSteps.__init__
    monkeypatch.setattr(rollout._LeanSteps, "__init__", lambda self, *a: used.append(1) or real(self, *a))
    for mode in ("eval", "train"):
        av.model.train(mode == "train")
        for kw in (
            {"do_sample": False},
            {"do_sample": True, "temperature": 1.0, "group": 2},
            {"do_sample": True, "temperature": 0.7},
        ):
            group = kw.pop("group", 1)
            torch.manual_seed(5)
            ref = av.generate_ids(v, samples=group, **kw).tolist()
            torch.manual_seed(5)
            assert rollout.sample_group(av, v, group=group, **kw).tolist() == ref, (mode, kw)
    assert len(used) == 3  # eval mode ran lean, training mode did not
    av.model.eval()
    assert av.explain(v) == [e for e, _ in av.decode(av.generate_ids(v))]  # explain samples through it too

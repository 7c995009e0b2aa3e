"""Atlas build and queries on a tiny model with a planted feature that fires on exactly one token."""

from __future__ import annotations

import sqlite3
import time

import pytest
import torch
from helpers.atlas_fixtures import (
    OUT_CHAR,
    PLANT,
    PLANT_CHAR,
    identity_model,
    one_thread,
    planted_sae,
    token_id,
    write_corpus,
)

from thoughtscope.atlas import (
    Atlas,
    AtlasConfig,
    AtlasError,
    build_atlas,
    contrast,
    feature_card,
    top_features_for_text,
)
from thoughtscope.corpus import Corpus

CFG = dict(
    n_tokens=6000,
    ctx_len=32,
    contexts_per_batch=8,
    top_k=8,
    n_bins=5,
    per_bin=4,
    window_left=6,
    window_right=3,
    checkpoint_every=2,
)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory, _threads):
    d = tmp_path_factory.mktemp("atlas")
    lm = identity_model()
    sae = planted_sae(lm)
    corpus = Corpus(str(write_corpus(d / "corpus.txt", n_docs=120)))
    path = build_atlas(lm, sae, corpus, d / "atlas", AtlasConfig(**CFG), progress=False)
    return lm, sae, corpus, d, path


def _corpus_ids(lm, corpus, n_contexts):
    rows = []
    for b in corpus.batches(lm.tokenizer, CFG["ctx_len"], CFG["contexts_per_batch"]):
        rows.append(b.input_ids)
    return torch.cat(rows)[:n_contexts]


def test_planted_feature_top_contexts_density_and_logits(setup):
    lm, sae, corpus, d, path = setup
    q = token_id(lm, PLANT_CHAR)
    with Atlas.open(path) as at:
        f = at.feature(PLANT)
        top = at.examples(PLANT, "top")
        assert len(top) == CFG["top_k"]
        assert all(e.tokens[e.pos] == q for e in top)  # every top context peaks on the planted token
        assert all(e.window[CFG["window_left"]] == pytest.approx(e.act, rel=1e-2) for e in top)
        quant = at.examples(PLANT, "quantile")
        assert len(quant) == CFG["n_bins"] * CFG["per_bin"]
        assert all(e.tokens[e.pos] == q for e in quant)
        assert sorted(e.bin for e in quant) == [b for b in range(CFG["n_bins"]) for _ in range(CFG["per_bin"])]
        # density = frequency of the token outside position 0
        ids = _corpus_ids(lm, corpus, at.meta["n_contexts"])[:, 1:]
        assert at.meta["n_tokens"] == ids.numel()
        assert f.n_active == int((ids == q).sum())
        assert f.density == pytest.approx(int((ids == q).sum()) / ids.numel(), rel=1e-12)
        assert f.max_act == pytest.approx(40.0, rel=1e-3)
        assert sum(f.hist) == f.n_active
        # top positive logit effect is the planted output token, values equal (W_dec * g) @ U^T
        expected = (sae.W_dec[PLANT].detach() * lm.final_norm.weight.detach()) @ lm.unembed.weight.detach().T
        assert f.logits_pos[0][0] == token_id(lm, OUT_CHAR)
        top_ids = expected.topk(10).indices.tolist()
        assert [t for t, _ in f.logits_pos] == top_ids
        assert f.logits_pos[0][1] == pytest.approx(float(expected.max()), rel=1e-3)
        assert [t for t, _ in f.logits_neg] == (-expected).topk(10).indices.tolist()
        # neighbours by decoder cosine
        W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
        cos = W @ W[PLANT]
        cos[PLANT] = -2
        assert [n for n, _ in f.neighbours] == cos.topk(10).indices.tolist()
        # random sample: planted fires only on q
        for ctx, acts in at.random_activations(PLANT).items():
            toks = at.context(ctx)
            assert all(toks[p] == q for p in acts)


def test_feature_page_is_fast_and_errors_are_clear(setup):
    lm, sae, corpus, d, path = setup
    with Atlas.open(d / "atlas") as at:
        t = time.perf_counter()
        for _ in range(20):
            at.feature(PLANT), at.examples(PLANT)
        assert (time.perf_counter() - t) / 20 < 0.05
        with pytest.raises(AtlasError, match="out of range"):
            at.feature(sae.cfg.n_features)
        with pytest.raises(AtlasError, match="out of range"):
            at.examples(-1)
        ids = at.random_features(5, seed=1)
        assert ids == at.random_features(5, seed=1) and len(ids) == 5
        from rich.console import Console

        con = Console(record=True, width=140)
        con.print(feature_card(at, PLANT, lm.tokenizer))
        assert f"feature {PLANT}" in con.export_text()
    bad = d / "corrupt.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AtlasError, match="not a readable atlas"):
        Atlas.open(bad)
    with pytest.raises(AtlasError, match="no atlas"):
        Atlas.open(d / "missing")


def test_wrong_model_or_site_is_refused(setup, tmp_path):
    lm, sae, corpus, d, path = setup
    other = planted_sae(lm, site="resid.0")
    with pytest.raises(AtlasError, match="trained at site resid.0"):
        build_atlas(lm, other, corpus, tmp_path / "a", AtlasConfig(**CFG), site="resid.1", progress=False)
    other.cfg.site, other.cfg.model = "resid.1", "SmolLM2-135M-Instruct"
    with pytest.raises(AtlasError, match="trained on model 'SmolLM2-135M-Instruct'"):
        build_atlas(lm, other, corpus, tmp_path / "a", AtlasConfig(**CFG), progress=False)


def _dump(path):
    con = sqlite3.connect(str(path))
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("features", "contexts", "examples")}
    out["random_acts"] = sorted(con.execute("SELECT * FROM random_acts").fetchall())
    con.close()
    return out


def test_resume_equals_uninterrupted(setup, tmp_path):
    lm, sae, corpus, d, path = setup
    out = tmp_path / "resumed"
    ck = build_atlas(lm, sae, corpus, out, AtlasConfig(**CFG), progress=False, stop_after_batches=5)
    assert ck.name == "build.ckpt" and ck.is_file() and not (out / "atlas.sqlite").exists()
    with pytest.raises(AtlasError, match="different build"):
        build_atlas(lm, sae, corpus, out, AtlasConfig(**dict(CFG, top_k=5)), progress=False)
    p2 = build_atlas(lm, sae, corpus, out, AtlasConfig(**CFG), progress=False)
    assert not ck.exists()
    assert _dump(p2) == _dump(path)


def test_contrast_and_text_queries(setup):
    lm, sae, corpus, d, path = setup
    prompts = ["a quiet queen", "the quest is equal", "quick squad"]
    controls = ["the sun is up", "run under a blue sun", "a unit of rum"]  # "u" follows "q" in every prompt
    with Atlas.open(path) as at:
        res = contrast(lm, sae, prompts, controls, atlas=at, k=5)
        assert res[0]["feature"] == PLANT and res[0]["normalised"]
        assert res[0]["score"] == pytest.approx(1.0, abs=0.05) and res[0]["prompt_fire_rate"] == 1.0
    raw = contrast(lm, sae, prompts, controls, k=3)
    assert raw[0]["feature"] == PLANT
    r = top_features_for_text(lm, sae, "a quiet cat", k=3)
    q_pos = [t.pos for t in r["tokens"] if t.token == PLANT_CHAR]
    assert q_pos and all(t.features and t.features[0][0] == PLANT for t in r["tokens"] if t.pos in q_pos)
    assert r["overall"][0][0] == PLANT


def test_report_is_self_contained(setup, tmp_path):
    pytest.importorskip("matplotlib")
    from thoughtscope.atlas.report import write_report

    lm, sae, corpus, d, path = setup
    html_path = write_report(path, tmp_path / "rep", tokenizer=lm.tokenizer, n_cards=4)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "alive / dead" in page and page.count('class="card"') == 4
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    for n in ("density.png", "scores.png", "max_act.png"):
        assert (tmp_path / "rep" / n).stat().st_size > 1000


def test_open_with_model_checks_the_sae(setup, tmp_path):
    from thoughtscope.atlas import open_with_model
    from thoughtscope.sae import save_sae

    lm, sae, corpus, d, path = setup
    save_sae(sae, tmp_path / "sae")
    out = build_atlas(
        lm,
        sae,
        corpus,
        tmp_path / "a",
        AtlasConfig(**dict(CFG, n_tokens=600)),
        progress=False,
        sae_path=str(tmp_path / "sae"),
    )
    at, lm2, sae2 = open_with_model(out, lm=lm)
    assert lm2 is lm and at.meta["sae_path"] == str(tmp_path / "sae")
    at.close()
    other = planted_sae(lm)
    with torch.no_grad():
        other.W_dec[0] += 1
    save_sae(other, tmp_path / "other")
    with pytest.raises(AtlasError, match="not the one"):
        open_with_model(out, lm=lm, sae_path=str(tmp_path / "other"))


@pytest.mark.slow
def test_default_model_smoke(tmp_path):
    """The embedded SmolLM2 with a fresh small SAE: build, offline explain (chat template), card, report."""
    from rich.console import Console

    from thoughtscope.atlas import ExplainConfig, LocalChatClient, explain_atlas
    from thoughtscope.models import load_model
    from thoughtscope.sae import SAE, SAEConfig

    lm = load_model("default")
    sae = SAE.from_config(
        SAEConfig(arch="topk", d_model=lm.d_model, n_features=256, k=8, model=lm.name, site="resid.15")
    )
    corpus = Corpus("default")
    path = build_atlas(
        lm, sae, corpus, tmp_path / "a", AtlasConfig(n_tokens=1024, ctx_len=64, contexts_per_batch=8), progress=False
    )
    local = LocalChatClient(lm)
    with Atlas.open(path) as at:
        feats = at.random_features(2, seed=0)
        s = explain_atlas(
            at,
            local,
            local,
            tokenizer=lm.tokenizer,
            features=feats,
            config=ExplainConfig(n_score_pos=4, n_score_neg=4, explain_max_new_tokens=30),
            progress=False,
        )
        assert s["ok"] + s["failed"] == 2
        con = Console(record=True, width=140)
        con.print(feature_card(at, feats[0], lm.tokenizer))
        text = con.export_text()
        assert f"feature {feats[0]}" in text
        print(text)
        print([at.explanation(f) for f in feats])


def test_streaming_topk_and_reservoir_match_exact_answers():
    """RunningFeatureStats alone on synthetic activations: exact top-k, uniform quantile sample, exact counts."""
    from thoughtscope.atlas.stats import RunningFeatureStats

    cfg = AtlasConfig(ctx_len=16, contexts_per_batch=4, top_k=5, n_bins=4, per_bin=5, window_left=2, window_right=1)
    m, T, B = 3, 16, 4
    st = RunningFeatureStats(m, cfg)
    g = torch.Generator().manual_seed(0)
    all_vals = {i: [] for i in range(m)}
    for b in range(40):
        f = torch.zeros(B * T, m)
        f[:, 0] = torch.rand(B * T, generator=g) * 10  # dense, uniform on [0, 10)
        f[torch.randint(0, B * T, (3,), generator=g), 1] = torch.rand(3, generator=g) + 1  # sparse
        rows, feats = (f > 0).nonzero(as_tuple=True)
        vals = f[rows, feats]
        for i in range(m):
            all_vals[i] += f[:, i][f[:, i] > 0].tolist()
        st.update(f, torch.zeros(B, T, dtype=torch.long), b * B, b, rows=rows, feats=feats, vals=vals, random_stride=7)
    t = st.t
    for i in range(2):
        exact = sorted(all_vals[i], reverse=True)[:5]
        assert sorted(t["top_val"][i].tolist(), reverse=True) == pytest.approx(exact)
        assert int(t["count"][i]) == len(all_vals[i])
        assert float(t["max"][i]) == pytest.approx(max(all_vals[i]))
    assert int(t["count"][2]) == 0 and not torch.isfinite(t["top_val"][2]).any()
    # the reservoir of the dense feature is a uniform sample: its values spread over the whole range
    res = sorted(t["res_val"][0].tolist())
    assert len(res) == 20 and res[0] < 2.0 and res[-1] > 8.0 and 3.0 < res[10] < 7.0
    # each kept top window holds the activation at its peak
    for k in range(5):
        assert t["top_win"][0, k, 2] == pytest.approx(float(t["top_val"][0, k]))


def test_sparse_bookkeeping_equals_dense_path():
    """The build's path (windows read from the sparse triples) keeps exactly the state of the dense reference
    (windows gathered from the full [B*T, m] matrix), including exact ties and windows cut at context edges."""
    from thoughtscope.atlas.stats import RunningFeatureStats

    cfg = AtlasConfig(ctx_len=12, contexts_per_batch=3, top_k=4, n_bins=3, per_bin=2, window_left=4, window_right=2)
    m, T, B, k = 10, 12, 3, 3
    sparse, dense = RunningFeatureStats(m, cfg), RunningFeatureStats(m, cfg)
    g = torch.Generator().manual_seed(1)
    for b in range(25):
        idx = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(B * T)])
        v = torch.rand(B * T, k, generator=g) * 4
        v[v < 0.6] = 0  # some of the k slots inactive, as after a ReLU
        v[:, 0] = torch.where(torch.rand(B * T, generator=g) < 0.3, 2.5, v[:, 0])  # exact ties
        f = torch.zeros(B * T, m).scatter_(1, idx, v)
        f.view(B, T, m)[:, 0] = 0  # position 0 excluded
        mask = v > 0
        rows = torch.arange(B * T)[:, None].expand_as(idx)[mask]
        feats, vals = idx[mask], v[mask]
        keep = rows % T != 0
        rows, feats, vals = rows[keep], feats[keep], vals[keep]
        ids = torch.randint(0, 50, (B, T), generator=g)
        for st, dense_f in ((sparse, None), (dense, f)):
            st.update(dense_f, ids, b * B, b, rows=rows, feats=feats, vals=vals, random_stride=4)
    for name, a in sparse.t.items():
        assert torch.equal(a, dense.t[name]), name
    assert torch.isfinite(sparse.t["top_val"]).all() and (sparse.t["top_win"] != 0).any()


def test_sparse_encoder_matches_encode_sparse():
    """The buffer-reusing encoder of the build gives exactly sae.encode_sparse's non-zeros, batch after batch."""
    from thoughtscope.atlas.encode import SparseEncoder, encode_sparse
    from thoughtscope.sae import SAE, SAEConfig

    sae = SAE.from_config(SAEConfig(arch="topk", d_model=16, n_features=40, k=5), seed=0)
    enc = SparseEncoder(sae)
    assert enc.fast
    g = torch.Generator().manual_seed(0)
    for n in (64, 64, 30):  # the last batch of a build may be shorter
        x = torch.randn(n, 16, generator=g)
        for a, b in zip(enc(x), encode_sparse(sae, x)):
            assert torch.equal(a, b)
    relu = SAE.from_config(SAEConfig(arch="relu-l1", d_model=16, n_features=40), seed=0)
    assert not SparseEncoder(relu).fast

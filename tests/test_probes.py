"""Probes on planted data and tiny random models: fitters, controls, splits, reading, artefact, erasure, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from thoughtscope.errors import ProbeError, ThoughtscopeError
from thoughtscope.models import tiny_model
from thoughtscope.probes.config import ReadConfig
from thoughtscope.probes.datasets import ProbeSet, control_labels, from_pairs, group_split, load_dataset
from thoughtscope.probes.fitters import FITTERS, fit, logistic_raw
from thoughtscope.probes.generators import BUILTIN, builtin
from thoughtscope.probes.metrics import auroc, best_threshold, threshold_at_fpr
from thoughtscope.probes.sweep import SweepConfig, sweep_arrays

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n=400, d=32, strength=2.0, seed=0, pairs=False):
    """Rows with a concept along a unit vector u (class 1 at +s, class 0 at -s) and isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    if pairs:  # each pair shares a base point and differs only along u (plus small noise)
        base = torch.randn(n // 2, d, generator=g).repeat_interleave(2, 0)
        y = torch.tensor([1, 0] * (n // 2))
        X = base + strength * (2 * y[:, None].float() - 1) * u + 0.3 * torch.randn(n, d, generator=g)
    else:
        y = torch.randint(0, 2, (n,), generator=g)
        X = torch.randn(n, d, generator=g) + strength * (2 * y[:, None].float() - 1) * u
    return X, y, u


def ds_for(y, groups=None, pair_ids=None, entities=None):
    n = len(y)
    return ProbeSet(
        [f"text {i}" for i in range(n)],
        [int(v) for v in y],
        groups or [f"g{i // 2}" for i in range(n)],
        entities=entities,
        pair_ids=pair_ids,
    )


@pytest.mark.parametrize("method", FITTERS)
def test_each_fitter_recovers_a_planted_direction(method):
    # CCS (the opt-in comparison, unsupervised) lands at cosine ~0.83 here: its consistency loss also bends away
    # from the pair's shared base; it is held to 0.8 and to the same AUROC bar.
    X, y, u = planted(pairs=method in ("lat", "ccs"))
    tr, te = torch.arange(0, 300), torch.arange(300, 400)
    kw = {"pairs": [(i, i + 1) for i in range(0, 300, 2)]} if method in ("lat", "ccs") else {}
    if method == "logistic":  # the penalty chosen by cross-validation on the training rows, as in a sweep
        kw["folds"] = [([i for i in range(300) if i % 4 != f], [i for i in range(300) if i % 4 == f]) for f in range(4)]
    W, b, info = fit(method, X[tr], y[tr], **kw)
    cos = float(torch.nn.functional.cosine_similarity(W[0], u, dim=0))
    assert cos >= (0.8 if method == "ccs" else 0.95), (method, cos)
    assert float(auroc(X[te] @ W[0] + b[0], y[te])) >= 0.95


def test_fitters_are_batched_over_layers_and_match_one_layer_at_a_time():
    X1, y, _ = planted(seed=1)
    X2, _, _ = planted(seed=2)
    X2 = X2[:, torch.randperm(X2.shape[1], generator=torch.Generator().manual_seed(0))]
    both = torch.stack([X1, X2])
    for method in ("mean", "lda", "logistic"):
        W, b, _ = fit(method, both, y, C=1.0)
        W1, b1, _ = fit(method, X1, y, C=1.0)
        assert torch.allclose(W[0], W1[0], atol=1e-4, rtol=1e-3), method


def test_no_signal_stays_near_chance_and_the_shuffle_null_agrees():
    g = torch.Generator().manual_seed(3)
    n, d = 800, 16
    y = torch.randint(0, 2, (n,), generator=g)
    acts = {"resid.0": torch.randn(n, d, generator=g)}
    out = sweep_arrays(
        acts,
        ds_for(y, entities=[f"e{i % 12}" for i in range(n)]),
        SweepConfig(fitters=("mean", "logistic"), n_random=50, n_shuffle=8, n_boot=50),
    )
    for m in ("mean", "logistic"):
        r = out["results"][m]["resid.0"]
        assert abs(r["test_auroc"] - 0.5) < 0.1, r
        assert abs(r["shuffle_mean"] - 0.5) < 0.1, r
        assert r["test_auroc"] <= r["shuffle_p95"] + 0.05 and r["shuffle_p"] > 0.05, r
    assert abs(out["random_directions"]["resid.0"]["mean"] - 0.5) < 0.1


def test_sweep_finds_the_site_with_signal_and_reports_every_control():
    X0, y, _ = planted(n=240, strength=0.0, seed=4)
    X1, _, _ = planted(n=240, strength=2.0, seed=4)
    out = sweep_arrays(
        {"embed": X0, "resid.0": X0, "resid.1": X1},
        ds_for(y, entities=[f"e{i % 12}" for i in range(240)]),
        SweepConfig(fitters=("mean", "lda"), n_random=40, n_shuffle=4, n_boot=40),
    )
    assert out["best_site"] == "resid.1" and out["best_is_selective"]
    assert out["best_auroc"] > 0.95 and out["best_selectivity"] > 0.3
    row = out["results"]["mean"]["resid.1"]
    for key in ("test_auroc_ci", "balanced_accuracy", "shuffle_p95", "shuffle_p", "control_auroc", "cv_auroc"):
        assert key in row
    json.dumps(out)


def test_group_splits_never_share_a_group_and_control_labels_follow_entities():
    for name in BUILTIN:
        if name == "cities_known":
            continue
        ds = builtin(name)
        sp = group_split(ds, 0.25, seed=1)
        assert not {ds.groups[i] for i in sp.train} & {ds.groups[i] for i in sp.test}, name
        assert sorted(sp.train + sp.test) == list(range(len(ds)))
        ctrl = control_labels(ds)
        by = {}
        for e, c in zip(ds.entities, ctrl):
            assert by.setdefault(e, c) == c


def test_logistic_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(5)
    for n, d in ((300, 16), (80, 120)):
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = (
            (X @ torch.randn(d, generator=g, dtype=torch.float64)) + torch.randn(n, generator=g, dtype=torch.float64)
            > 0
        ).long()
        for C in (0.05, 1.0):
            w, b = logistic_raw(X, y, C)
            ref = sk.LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(X.numpy(), y.numpy())
            cos = torch.nn.functional.cosine_similarity(w[0], torch.tensor(ref.coef_[0]), dim=0)
            assert float(cos) >= 0.999 and abs(float(b[0]) - ref.intercept_[0]) < 1e-3


def test_auroc_matches_scikit_learn_with_ties():
    skm = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(6)
    s = torch.randint(0, 5, (200,), generator=g).float()
    y = torch.randint(0, 2, (200,), generator=g)
    assert abs(float(auroc(s, y)) - skm.roc_auc_score(y.numpy(), s.numpy())) < 1e-12
    t = best_threshold(s[None], y)
    assert t.shape == (1,)
    assert threshold_at_fpr(torch.arange(100.0), 0.05) == pytest.approx(94.05)


def test_leace_makes_a_planted_concept_unreadable_and_keeps_orthogonal_information():
    from thoughtscope.probes.erase import fit_eraser
    from thoughtscope.steer.interventions import StepContext

    g = torch.Generator().manual_seed(7)
    n, d = 2000, 32
    y = torch.randint(0, 2, (n,), generator=g)
    z = torch.randint(0, 2, (n,), generator=g)  # a second, independent concept
    X = torch.randn(n, d, generator=g) * 3 + 10
    X[:, 0] += 3 * (2 * y.float() - 1)
    X[:, 1] += 3 * (2 * z.float() - 1)
    tr, te = torch.arange(0, 1500), torch.arange(1500, n)
    er = fit_eraser(X[tr], y[tr], "resid.0")
    Xe = er.apply(X[None], StepContext(offset=5))[0]  # offset 5: no position-0 column in this pass
    for m in ("mean", "logistic"):
        W, b, _ = fit(m, Xe[tr], y[tr], C=1.0)
        a = float(auroc(Xe[te] @ W[0] + b[0], y[te]))
        assert 0.42 <= a <= 0.55, (m, a)  # a fresh probe, trained on erased rows, reads nothing held-out
    W, b, _ = fit("mean", Xe[tr], z[tr])
    assert float(auroc(Xe[te] @ W[0] + b[0], z[te])) > 0.9
    assert torch.allclose(Xe[tr][y[tr] == 1].mean(0), Xe[tr][y[tr] == 0].mean(0), atol=1e-3)


def test_bad_datasets_name_file_and_row(tmp_path):
    def write(name, rows):
        p = tmp_path / name
        p.write_text("\n".join(json.dumps(r) for r in rows))
        return p

    cases = [
        ([{"text": "a", "label": 1}, {"text": "b", "label": 1}], "both classes"),
        ([{"text": "a", "label": 1}, {"text": " ", "label": 0}], "row 2: empty text"),
        ([{"text": "a", "label": 1}, {"text": "a", "label": 0}], "row 2: duplicate text"),
        ([{"text": "a", "label": 1}, {"text": "b", "label": 2}], "row 2: label 2"),
        ([{"positive": "a", "negative": "b"}, {"positive": "c"}], "row 2: pair has no negative"),
        ([{"text": "a"}], "row 1: missing label"),
    ]
    for k, (rows, msg) in enumerate(cases):
        p = write(f"bad{k}.jsonl", rows)
        with pytest.raises(ProbeError, match=msg) as e:
            load_dataset(p)
        assert str(p) in str(e.value)
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(ProbeError, match="row 2: not valid JSON"):
        load_dataset(tmp_path / "broken.jsonl")
    small = ProbeSet(["a", "b", "c", "d"], [1, 0, 1, 0], ["g1", "g1", "g2", "g2"], source="small.jsonl")
    with pytest.raises(ProbeError, match="too small for a held-out split"):
        group_split(small, 0.5)
    assert issubclass(ProbeError, ThoughtscopeError)
    with pytest.raises(ProbeError, match="pair 1"):
        from_pairs([("only one",)])


def test_csv_and_pairs_files_load(tmp_path):
    (tmp_path / "d.csv").write_text(
        "text,label,group,difficulty\nyes it is,1,a,easy\nno it is not,0,a,hard\nsure,true,b,\nnever,false,b,\n"
    )
    ds = load_dataset(tmp_path / "d.csv")
    assert ds.labels == [1, 0, 1, 0] and ds.groups == ["a", "a", "b", "b"] and ds.difficulty[0] == "easy"
    (tmp_path / "p.jsonl").write_text(
        '{"positive": "I love it", "negative": "I hate it"}\n{"positive": "great", "negative": "awful", "group": "g"}\n'
    )
    ps = load_dataset(tmp_path / "p.jsonl")
    assert ps.labels == [1, 0, 1, 0] and ps.pairs() == [(0, 1), (2, 3)] and ps.groups[2] == "g"
    ps.to_jsonl(tmp_path / "round.jsonl")
    assert load_dataset(tmp_path / "round.jsonl").sha256 == ps.sha256


def test_shipped_generators_are_balanced_and_valid():
    for name in ("comparisons", "cities", "cities_negated", "translations", "arithmetic", "sentiment", "honesty"):
        ds = builtin(name)
        assert 0.4 < sum(ds.labels) / len(ds) < 0.6, name
        assert len(set(ds.entities)) >= (2 if name == "honesty" else 10), name
    assert builtin("comparisons").texts[0][0].isupper()
    assert {d for d in builtin("arithmetic").difficulty} == {"easy", "hard"}
    assert len(builtin("honesty").pairs()) == 200
    known = builtin("cities_known")
    assert 0 < len(known) < len(builtin("cities"))


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=64, n_layers=3)


def tiny_set(n=24):
    words = ["red", "blue", "green", "black", "white", "pink"]
    texts, labels, groups = [], [], []
    for i in range(n):
        w = words[i % len(words)]
        texts.append(f"the {w} box number {i} is {'open' if i % 2 else 'shut'}")
        labels.append(i % 2)
        groups.append(f"g{i // 2}")
    return ProbeSet(texts, labels, groups, "tiny", "tiny.jsonl", entities=[t.split()[1] for t in texts])


def count_forwards(lm):
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    return calls, handle


def test_reading_is_one_forward_per_batch_for_all_sites_and_cached(lm, tmp_path):
    from thoughtscope.probes.read import ReadConfig, read_activations

    ds = tiny_set()
    calls, h = count_forwards(lm)
    try:
        cfg = ReadConfig(texts_per_batch=8)
        a = read_activations(lm, ds, ["embed", "resid.0", "resid.1", "resid.2"], cfg, cache=tmp_path)
        assert len(calls) == 3  # 24 rows / 8 per batch, every site from the same pass
        b = read_activations(lm, ds, ["resid.2", "resid.0", "embed"], cfg, cache=tmp_path)
        assert len(calls) == 3  # all from the on-disk stores
        assert torch.equal(a["resid.2"], b["resid.2"]) and list(b) == ["embed", "resid.0", "resid.2"]
    finally:
        h.remove()
    ids, mask = lm.tokenize(ds.texts[:3])
    with torch.no_grad():
        hs = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    last = mask.sum(1) - 1
    for k in range(3):
        assert torch.allclose(a["resid.0"][k], hs[1][k, last[k]], atol=1e-5)
        assert torch.allclose(a["embed"][k], hs[0][k, last[k]], atol=1e-6)


def test_mean_and_span_reads_never_include_position_zero(lm):
    from thoughtscope.probes.read import ReadConfig, read_activations

    ds = tiny_set(4)
    ds.spans[0] = (4, 7)  # "red"
    for i in range(1, 4):
        ds.spans[i] = (0, 3)
    span = read_activations(lm, ds, ["resid.1"], ReadConfig(read="span"), cache=False)["resid.1"]
    mean = read_activations(lm, ds, ["resid.1"], ReadConfig(read="mean"), cache=False)["resid.1"]
    ids, mask = lm.tokenize(ds.texts[:1])
    with torch.no_grad():
        h = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2][0]
    assert torch.allclose(mean[0], h[1:].mean(0), atol=1e-5)  # BOS at position 0 left out
    assert torch.allclose(span[0], h[5:8].mean(0), atol=1e-5)  # byte tokens 4..6 sit after the BOS
    with pytest.raises(ProbeError, match="row 1: read position 'span' needs"):
        read_activations(lm, tiny_set(4), ["resid.1"], ReadConfig(read="span"), cache=False)


def test_bad_site_and_bad_data_fail_before_any_forward_pass(lm, tmp_path):
    from thoughtscope.models import SiteError
    from thoughtscope.probes.read import ReadConfig, read_activations
    from thoughtscope.probes.sweep import sweep

    calls, h = count_forwards(lm)
    try:
        with pytest.raises(SiteError, match="resid.7 is beyond"):
            sweep(lm, tiny_set(), "resid.0,resid.7")
        small = ProbeSet(["a b", "c d", "e f", "g h"], [1, 0, 1, 0], ["x", "x", "y", "y"], source="small.jsonl")
        with pytest.raises(ProbeError, match="small.jsonl: too small"):
            sweep(lm, small, "resid.0", cfg=SweepConfig(n_random=5, n_shuffle=1, n_boot=10))
        with pytest.raises(ProbeError, match="read position must be"):
            ReadConfig(read="first")
        assert calls == []
    finally:
        h.remove()
    with pytest.raises(ProbeError):
        read_activations(lm, tiny_set(), ["resid.0"], ReadConfig(read="span"), cache=False)


def test_probe_artefact_round_trips_and_refuses_another_model_or_site(lm, tmp_path):
    from thoughtscope.probes.probe import Probe, fit_probe

    pr = fit_probe(lm, tiny_set(48), "resid.1", "mean", cache=tmp_path / "c")
    pr.save(tmp_path / "p")
    back = Probe.load(tmp_path / "p", lm, "resid.1")
    assert torch.equal(back.weight, pr.weight) and back.bias == pr.bias and back.threshold == pr.threshold
    assert back.cfg == pr.cfg and back.cfg.dataset_sha256 == tiny_set(48).sha256
    other = tiny_model("llama", d_model=64, n_layers=3, seed=1)
    with pytest.raises(ProbeError, match="fitted on tiny-llama-64x3-seed0"):
        Probe.load(tmp_path / "p", other)
    with pytest.raises(ProbeError, match="reads resid.1 but was applied at resid.0"):
        Probe.load(tmp_path / "p", lm, "resid.0")
    with pytest.raises(ProbeError, match="not a probe folder"):
        Probe.load(tmp_path)


def test_to_vector_moves_the_probe_score_by_class_gaps(lm, tmp_path):
    from thoughtscope.models import capture
    from thoughtscope.probes.probe import fit_probe
    from thoughtscope.steer.interventions import steering

    pr = fit_probe(lm, tiny_set(48), "resid.1", "mean", cache=False)
    vec = pr.to_vector()
    assert vec.site == "resid.1" and abs(float(vec.vector.norm()) - abs(pr.cfg.class_gap)) < 1e-5
    ids, mask = lm.tokenize(["the red box is open"])
    base = pr.score(next(iter(capture(lm, "resid.1", ids, mask).values()))[0])
    with steering(lm, [pr.to_intervention(2.0)]):
        moved = pr.score(next(iter(capture(lm, "resid.1", ids, mask).values()))[0])
    expect = 2.0 * pr.cfg.class_gap * float(pr.weight.norm())
    assert torch.allclose(moved - base, torch.full_like(base, expect), rtol=1e-3, atol=1e-3)


def test_erasure_intervention_is_removed_cleanly_and_leaves_position_zero(lm):
    from thoughtscope.models import capture
    from thoughtscope.probes.erase import fit_eraser
    from thoughtscope.probes.read import ReadConfig, read_activations
    from thoughtscope.steer.interventions import steering

    ds = tiny_set(48)
    X = read_activations(lm, ds, ["resid.1"], ReadConfig(), cache=False)["resid.1"]
    er = fit_eraser(X, ds.y, "resid.1")
    ids, mask = lm.tokenize(ds.texts[:4])
    with torch.no_grad():
        before = lm.model(input_ids=ids, attention_mask=mask).logits
        with steering(lm, [er]):
            during = lm.model(input_ids=ids, attention_mask=mask).logits
            h = next(iter(capture(lm, "resid.1", ids, mask).values()))
        after = lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after) and not torch.equal(before, during)
    raw = next(iter(capture(lm, "resid.1", ids, mask).values()))
    assert torch.equal(h[:, 0], raw[:, 0])  # the sink position is never edited
    with steering(lm, [er]):
        reread = read_activations(lm, ds, ["resid.1"], ReadConfig(), cache=False)["resid.1"]
    from thoughtscope.steer.interventions import StepContext

    direct = er.apply(X[None], StepContext(offset=1))[0]
    assert torch.allclose(reread, direct, atol=1e-5)  # erasing cached rows == reading under the hook


def test_monitor_thresholds_and_scores(lm, tmp_path):
    from thoughtscope.probes.monitor import calibrate, score_texts
    from thoughtscope.probes.probe import fit_probe

    pr = fit_probe(lm, tiny_set(48), "resid.1", "mean", cache=False)
    rows = score_texts(lm, pr, ["the pink box is open", "hello"])
    assert rows[0].scores.isnan()[0] and not rows[0].scores[1:].isnan().any()
    cal = calibrate(
        lm,
        pr,
        neutral=["some neutral words here", "and more text to read", "a third line"],
        positives=["the red box number 3 is open"],
        negatives=["the red box number 2 is shut"],
    )
    assert set(cal["thresholds"]) == {"1%", "5%"} and cal["thresholds"]["1%"] >= cal["thresholds"]["5%"]
    assert 0 <= cal["recall"]["1%"] <= 1


def test_erase_check_and_causal_check_run_on_a_tiny_model(lm, tmp_path):
    from thoughtscope.probes.causal import causal_check
    from thoughtscope.probes.erase import erase_check
    from thoughtscope.probes.probe import fit_probe

    ds = tiny_set(48)
    res = erase_check(
        lm, ds, "resid.1", fitters=("mean",), loss_texts=ds.texts[:8], n_contexts=8, cache=False, reread=False
    )
    assert res["rank"] == 1 and set(res["lm_loss"]) >= {"none", "leace", "random", "delta_leace"}
    assert res["after_leace"]["mean"] <= res["before"]["mean"]
    pr = fit_probe(lm, ds, "resid.1", "mean", cache=False)
    out = causal_check(lm, pr, ds.texts[:4], strengths=(-1, 0, 1), words=(" t", " f"), n_random=2)
    assert [r["strength"] for r in out["sweep"]] == [-1, 0, 1] and out["sweep"][1]["probe"] == 0.0


def test_weights_read_through_the_unembedding(lm):
    from thoughtscope.probes.weights import probe_alignment, weight_atlas

    rows = weight_atlas(lm, [0, 2], top=2, probe_direction=torch.randn(64))
    comps = {r["component"] for r in rows}
    assert "mlp" in comps and "head0" in comps and all(len(r["tokens_plus"]) == 6 for r in rows)
    svals = [r["singular_value"] for r in rows if r["layer"] == 0 and r["component"] == "mlp"]
    assert svals == sorted(svals, reverse=True)
    al = probe_alignment(lm, torch.randn(64), [1], top=64)
    assert all(abs(r["share"] - 1.0) < 1e-3 for r in al if r["component"] == "mlp")  # full rank span holds it all


def test_sweep_end_to_end_on_a_tiny_model_writes_json_and_plot(lm, tmp_path):
    from thoughtscope.probes.sweep import plot, save_json, sweep

    out = sweep(
        lm,
        tiny_set(48),
        "resid.0,resid.2",
        cfg=SweepConfig(fitters=("mean", "lat"), n_random=10, n_shuffle=2, n_boot=10),
        cache=tmp_path,
    )
    assert out["sites"] == ["embed", "resid.0", "resid.2"]
    for key in ("best_site", "best_auroc", "best_selectivity"):
        assert key in out
    save_json(out, tmp_path / "s.json")
    plot(out, tmp_path / "s.png")
    assert json.loads((tmp_path / "s.json").read_text())["best_site"] == out["best_site"]
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_transfer_matrix_diagonal_matches_a_plain_fit():
    from thoughtscope.probes.sweep import transfer

    X, y, _ = planted(n=200, seed=9)
    a = ds_for(y)
    b = ProbeSet([f"b{i}" for i in range(200)], [int(v) for v in y], [f"h{i // 2}" for i in range(200)], "b")
    out = transfer({"a": {"resid.0": X}, "b": {"resid.0": -X}}, {"a": a, "b": b}, "resid.0")
    assert out["auroc"]["a"]["a"] > 0.95 and out["auroc"]["a"]["b"] < 0.05 and out["recovered"]["b"]["b"] == 1.0


@pytest.mark.slow
def test_probe_demo_on_the_default_model(tmp_path):
    from thoughtscope.demo.probes import probe_demo
    from thoughtscope.models import load_model

    res = probe_demo(load_model("default"), tmp_path, cache=tmp_path / "cache")
    assert {"best_site", "best_auroc", "best_selectivity"} <= set(res)
    assert (tmp_path / "probe_sweep.png").is_file() and (tmp_path / "probe_sweep.json").is_file()
    assert res["results"]["lda"]["embed"]["test_auroc"] == pytest.approx(0.5)  # every row ends in the same "."


def test_lda_at_full_width_survives_a_thread_count_change():
    """MKL's batched LU solve fails once the process has changed its thread count (the demo's atlas stage does);
    the LDA fitter must still solve 11 layers of width 576 and find the planted direction."""
    from thoughtscope.probes.fitters import fit_lda

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(max(n, 2))
    try:
        g = torch.Generator().manual_seed(0)
        d, rows = 576, 400
        y = (torch.arange(rows) % 2).long()
        direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
        X = torch.randn(11, rows, d, generator=g) + 3.0 * (y.float() * 2 - 1)[None, :, None] * direction
        W, _ = fit_lda(X, y)
        assert torch.isfinite(W).all()
        cos = torch.nn.functional.cosine_similarity(W, direction[None], dim=-1)
        assert (cos > 0.9).all()
    finally:
        torch.set_num_threads(n)


def test_sweep_reports_easy_to_hard_when_the_data_has_difficulty():
    X, y, _ = planted(n=240, strength=2.0, seed=11)
    ds = ds_for(y)
    cfg = SweepConfig(fitters=("mean",), n_random=10, n_shuffle=2, n_boot=10)
    assert "easy_to_hard" not in sweep_arrays({"resid.0": X}, ds, cfg)["results"]["mean"]["resid.0"]
    ds.difficulty = ["easy" if (i // 2) % 2 else "hard" for i in range(240)]
    row = sweep_arrays({"resid.0": X}, ds, cfg)["results"]["mean"]["resid.0"]
    assert row["easy_to_hard"] > 0.95 and row["hard_to_hard"] > 0.95  # the planted concept transfers


def test_chat_reads_only_the_texts_own_tokens_inside_the_template(lm):
    from thoughtscope.probes.read import ReadConfig, read_activations

    ds = tiny_set(8)
    with pytest.raises(ProbeError, match="no chat template"):
        read_activations(lm, ds, "resid.1", ReadConfig(chat=True))
    lm.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end]{% endfor %}"
    try:
        plain = read_activations(lm, ds, "resid.1", ReadConfig(read="mean"))["resid.1"]
        chat = read_activations(lm, ds, "resid.1", ReadConfig(read="mean", chat=True))["resid.1"]
    finally:
        lm.tokenizer.chat_template = None
    assert plain.shape == chat.shape and not torch.allclose(plain, chat)  # same tokens read, in another context


def test_cli_sweep_prints_and_writes_the_suggested_site(lm, tmp_path):
    from typer.testing import CliRunner

    from thoughtscope.cli import app

    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    ds = tiny_set(48)
    rows = [{"text": t, "label": y, "group": g} for t, y, g in zip(ds.texts, ds.labels, ds.groups)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(
        app,
        [
            "probe",
            "sweep",
            "--data",
            str(tmp_path / "d.jsonl"),
            "--sites",
            "resid.0,resid.2",
            "--model",
            str(tmp_path / "m"),
            "--fitters",
            "mean",
            "--n-random",
            "10",
            "--n-shuffle",
            "2",
            "--json",
            str(tmp_path / "s.json"),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "s.json").read_text())
    assert {"best_site", "best_auroc", "best_selectivity"} <= out.keys()
    assert out["best_site"] in r.output and (tmp_path / "s.png").is_file()
    assert out["read"]["texts_per_batch"] == ReadConfig.texts_per_batch
    # texts per forward pass: --texts-per-batch; the old --batch-size still sets it, with a warning, hidden
    args = ["probe", "sweep", "--data", str(tmp_path / "d.jsonl"), "--sites", "resid.0", "--model", str(tmp_path / "m")]
    args += ["--fitters", "mean", "--n-random", "10", "--n-shuffle", "2", "--quiet"]
    r = CliRunner().invoke(app, [*args, "--batch-size", "5", "--json", str(tmp_path / "old.json")])
    assert r.exit_code == 0, r.output
    assert "--batch-size is deprecated" in r.output + (getattr(r, "stderr", "") or "")
    assert json.loads((tmp_path / "old.json").read_text())["read"]["texts_per_batch"] == 5
    r = CliRunner().invoke(app, [*args, "--texts-per-batch", "7", "--json", str(tmp_path / "new.json")])
    assert r.exit_code == 0 and "deprecated" not in r.output, r.output
    assert json.loads((tmp_path / "new.json").read_text())["read"]["texts_per_batch"] == 7
    helptext = CliRunner().invoke(app, ["probe", "sweep", "--help"]).output
    assert "--texts-per-batch" in helptext and "--batch-size" not in helptext
    r = CliRunner().invoke(
        app,
        ["probe", "sweep", "--data", str(tmp_path / "d.jsonl"), "--sites", "resid.9", "--model", str(tmp_path / "m")],
    )
    assert r.exit_code != 0

"""Feature attribution is the first-order effect of each feature (checked against a small real ablation), leaves the
forward pass unchanged, and reports its agreement with full ablations."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.causal.attribution import _spliced, attribute
from thoughtscope.causal.patching import PatchPair, _last_logits, _metric_fn
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def lm_sae():
    lm = tiny_model("llama", n_layers=3, seed=2)
    torch.manual_seed(0)
    sae = SAE.from_config(
        SAEConfig(d_model=lm.d_model, n_features=64, arch="topk", k=6, site="resid.1", exclude_bos=True)
    )
    return lm, sae.eval()


def test_attribution_is_the_derivative_of_removing_a_feature(lm_sae):
    lm, sae = lm_sae
    text = "hello there you"
    res = attribute(lm, sae, text, "q", "z", check=10)
    ids, _ = lm.tokenize([text])
    metric = _metric_fn(lm, PatchPair(text, text, "q", "z"))
    with torch.inference_mode():
        assert res.metric == pytest.approx(float(metric(_last_logits(lm, ids))), abs=1e-4)  # splicing changes nothing
    assert res.per_position[0] == []  # position 0 is excluded by the SAE: all error
    eps = 1e-3
    top = sorted(res.total, key=lambda k: -abs(res.total[k]))[:5]
    mask = torch.zeros(len(top), 64)
    mask[torch.arange(len(top)), torch.tensor(top)] = eps
    moved = _spliced(lm, sae, lm.check_site("resid.1"), ids, metric, ablate=mask)
    for k, m_eps in zip(top, moved):
        assert (res.metric - float(m_eps)) / eps == pytest.approx(res.total[k], rel=0.05, abs=1e-3)
    assert len(res.ablation) == min(10, len(res.total)) and res.spearman is not None
    d = res.to_dict()
    assert set(d) >= {"tokens", "per_position", "error", "top", "ablation", "attribution_vs_ablation_spearman"}


def test_analyze_report_reads_features_lens_and_why(lm_sae):
    from thoughtscope.causal.report import analyze_report

    lm, sae = lm_sae
    out = analyze_report(lm, sae, "hello there", with_lens=True, target="e")
    assert len(out["tokens"]) == len(out["features"]) == len(out["recon_error"])
    assert out["lens"]["kind"] == "logit" and len(out["lens"]["top"]) == lm.n_layers
    assert out["lens"]["track"]["token"] == "e" and out["why"]["top"]
    assert "lens" not in analyze_report(lm, sae, "hello there")
    # one reading serves the three: the same answers as reading the text for each
    from thoughtscope.causal.lens import lens_view

    fresh = lens_view(lm, "hello there", track="e", k=5).to_dict()
    assert [[[t for t, _ in c] for c in row] for row in out["lens"]["top"]] == [
        [[t for t, _ in c] for c in row] for row in fresh["top"]
    ]
    alone = attribute(lm, sae, "hello there", "e").to_dict()
    assert [f for f, _ in out["why"]["top"]] == [f for f, _ in alone["top"]]
    assert [a for _, a in out["why"]["top"]] == pytest.approx([a for _, a in alone["top"]], rel=1e-4, abs=1e-5)
    assert out["why"]["ablation"] == pytest.approx(alone["ablation"], rel=1e-4, abs=1e-5)

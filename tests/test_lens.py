"""The logit lens reads the model's own output at the last layer; the Jacobian lens fit measures every row of
∂h_final/∂h_l exactly as separate backward passes would, and refuses a model it was not fitted for."""

from __future__ import annotations

import pytest
import torch

from thoughtscope.causal.lens import JacobianLens, LensFitConfig, fit_jacobian_lens, lens_view
from thoughtscope.causal.residuals import read_residuals
from thoughtscope.errors import CausalError
from thoughtscope.models import tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", d_model=16, n_layers=3, n_heads=2, seed=4)


def test_logit_lens_last_layer_is_the_model_and_tracks_a_token(lm):
    v = lens_view(lm, "hello there", track="e", k=3)
    assert v.kind == "logit" and len(v.top) == lm.n_layers and len(v.top[0]) == len(v.tokens)
    assert v.agreement[-1] == 1.0
    ids, _ = lm.tokenize(["hello there"])
    with torch.inference_mode():
        final = lm.model(ids).logits[0].argmax(-1)
    from thoughtscope.display import lone_token_text

    assert v.final_top1_ids == final.tolist()
    assert v.final_top1 == [lone_token_text(lm.tokenizer, int(t)) for t in final]  # bytes written out, never �
    assert "\ufffd" not in "".join(v.final_top1)
    assert len(v.track["rank"]) == lm.n_layers and all(r >= 1 for r in v.track["rank"][0])
    with pytest.raises(CausalError, match="tracked token 'ee' is 2 tokens"):
        lens_view(lm, "hello", track="ee")


def test_jacobian_lens_estimates_the_same_position_jacobian(lm, tmp_path):
    """The random-sign estimator against the exact same-position Jacobian (one backward pass per position and row),
    averaged over the same contexts; the sum over later positions is a different matrix, which it must not be."""
    cfg = LensFitConfig(n_contexts=16, ctx_len=8, contexts_per_batch=4, rows_per_batch=16, n_validation=0)
    lens = fit_jacobian_lens(lm, cfg, out=tmp_path / "lens", progress=False)
    assert lens.J.shape == (3, 16, 16)
    torch.testing.assert_close(lens.J[-1], torch.eye(16))
    from thoughtscope.causal.lens import _fit_batches

    same, later = torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)
    n = 0
    for ids in _fit_batches(lm, cfg):
        hs = read_residuals(lm, ids, grad=True)
        for t in range(ids.shape[1]):
            for i in range(16):
                gs = torch.autograd.grad(hs[-1][:, t, i].sum(), hs[:-1], retain_graph=True)
                for layer in range(2):
                    same[layer, i] += gs[layer][:, t].sum(0)
                    later[layer, i] += gs[layer].sum((0, 1))
        n += ids.numel()
    same, later = same / n, later / n
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(lens.J[:2], same) < 0.05 < 0.1 < rel(lens.J[:2], later)
    back = JacobianLens.load(tmp_path / "lens", lm)
    torch.testing.assert_close(back.J, lens.J, atol=1e-3, rtol=1e-2)  # stored as float16
    v = lens_view(lm, "hello there", lens=back)
    assert v.kind == "jacobian" and v.agreement[-1] == 1.0
    assert not (tmp_path / "lens.fit.ckpt").exists()


def test_rows_cycle_across_batches_and_a_short_fit_is_refused(lm):
    cfg = LensFitConfig(n_contexts=4, ctx_len=8, contexts_per_batch=1, rows_per_batch=4)
    lens = fit_jacobian_lens(lm, cfg, progress=False)  # 4 batches x 4 rows: every row once
    assert set(lens.positions_per_row) == {8}
    with pytest.raises(CausalError, match="8 of 16 Jacobian rows were never measured"):
        fit_jacobian_lens(
            lm, LensFitConfig(n_contexts=2, ctx_len=8, contexts_per_batch=1, rows_per_batch=4), progress=False
        )


def test_lens_for_another_model_is_refused(lm, tmp_path):
    other = tiny_model("llama", d_model=32, n_layers=2)
    lens = fit_jacobian_lens(
        other, LensFitConfig(n_contexts=1, ctx_len=8, contexts_per_batch=1, rows_per_batch=32), progress=False
    )
    lens.save(tmp_path / "o")
    with pytest.raises(CausalError, match="fitted for tiny-llama-32x2-seed0 .*2 layers, width 32"):
        JacobianLens.load(tmp_path / "o", lm)
    with pytest.raises(CausalError, match="not a fitted lens"):
        JacobianLens.load(tmp_path, lm)


def test_rank_and_shrinkage_are_chosen_on_validation_contexts_and_saved_small(lm, tmp_path):
    cfg = LensFitConfig(
        n_contexts=4, ctx_len=8, contexts_per_batch=4, rows_per_batch=16, ranks=(2, 4), shrinks=(0.5, 1.0)
    )
    lens = fit_jacobian_lens(lm, cfg, out=tmp_path / "lens", progress=False)
    assert len(lens.validation) == 6  # ranks 2, 4 and full, x two shrinks
    best = max(lens.validation, key=lambda g: g[2])
    assert (lens.rank, lens.shrink) == (best[0], best[1])
    back = JacobianLens.load(tmp_path / "lens", lm)
    torch.testing.assert_close(back.J, lens.J, atol=2e-3, rtol=1e-2)
    assert (back.rank, back.shrink) == (lens.rank, lens.shrink)
    if lens.rank is not None:
        eye = torch.eye(16)
        assert int(torch.linalg.matrix_rank(lens.J[0] - eye, atol=1e-4)) <= lens.rank


def test_the_shipped_lens_loads_for_the_default_model_and_refuses_another(lm):
    lens = JacobianLens.load("default")
    assert lens.J.shape == (30, 576, 576) and lens.model == "SmolLM2-135M-Instruct"
    assert lens.rank is not None and 0 < lens.shrink <= 1 and lens.validation
    with pytest.raises(CausalError, match="fitted for SmolLM2-135M-Instruct"):
        lens.check_fits(lm)


def test_a_lens_direction_steers_toward_its_token(lm, tmp_path):
    """Adding the logit lens's direction for a token at the last block raises that token's logit, more with more
    strength; projecting it out lowers it; the vector file works in a preset."""
    from thoughtscope.steer import Preset
    from thoughtscope.steer.interventions import VectorEdit, steering
    from thoughtscope.steer.vectors import lens_vector

    sv = lens_vector(lm, "q", lm.n_layers - 1)
    assert sv.site == f"resid.{lm.n_layers - 1}" and abs(float(sv.vector.norm()) - 1) < 1e-5
    ids, _ = lm.tokenize(["hello there"])
    t = lm.tokenizer("q", add_special_tokens=False)["input_ids"][0]

    def logit(ivs):
        with torch.inference_mode(), steering(lm, ivs):
            return float(lm.model(ids).logits[0, -1, t])

    base = logit([])
    up = [logit([VectorEdit(sv.vector, sv.site, "add", s)]) for s in (0.5, 1.0, 2.0)]
    assert base < up[0] < up[1] < up[2]
    path = sv.save(tmp_path / "q.safetensors")
    p = Preset.from_dict({"name": "q", "interventions": [{"type": "vector", "op": "add", "site": sv.site,
                                                          "vector": str(path), "strength": 1.0}]})  # fmt: skip
    assert logit(p.build(lm)) == pytest.approx(up[1], abs=1e-4)

"""What `nla explain` shows is honest: the greedy explanation and its FVE by default, sampled ones only on request,
seeded, with the true-vector pick labelled as an oracle; positions explained, the attention sink refused, and a
warning for positions the NLA was not trained on. On a tiny NLA saved as a folder the CLI loads like any other."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from thoughtscope.cli import app
from thoughtscope.models import tiny_model
from thoughtscope.nla import NLA, NLAError, config_for, explain_text, load_nla
from thoughtscope.nla.explain import training_positions

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
TEXT = "alpha beta gamma"  # 16 bytes: with the BOS the model reads 17 tokens, positions 0..16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An NLA folder whose target is a tiny model saved beside it, trained (says its config) on positions 6..12."""
    lm = tiny_model("llama", d_model=32, n_layers=3, seed=0)
    root = tmp_path_factory.mktemp("nla")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    cfg = config_for(lm, site="resid.1", injection_scale=6.0, lora_rank=4, max_new_tokens=8)
    cfg.model = str(root / "model")
    cfg.extra["data_config"] = {"min_position": 5, "max_position": 12}
    nla = NLA(lm, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an AV that is not the base model, so samples differ from the greedy answer
        for p in nla.av.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    nla.save(root / "nla")
    return root / "nla"


@pytest.fixture(scope="module")
def nla(folder):
    return load_nla(str(folder))


def test_greedy_by_default_and_sampling_never_changes_the_reported_fve(nla):
    (greedy,) = explain_text(nla, TEXT, [8])
    vec = nla.activations(TEXT, [8])[0]
    assert greedy["explanation"] == nla.explain(vec)[0] and greedy["oracle"] is None
    assert [s["greedy"] for s in greedy["samples"]] == [True]
    (row,) = explain_text(nla, TEXT, [8], samples=4, seed=3)
    assert (row["explanation"], row["fve"]) == (greedy["explanation"], greedy["fve"])
    sampled = row["samples"]
    assert len(sampled) == 4 and not any(s["greedy"] for s in sampled)
    best = max(sampled, key=lambda s: s["fve"])
    assert row["oracle"]["score"] == best["fve"] and row["oracle"]["explanation"] == best["explanation"]
    assert row["oracle"]["of"] == 4 and sampled[row["oracle"]["sample"] - 1]["explanation"] == best["explanation"]


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(nla):
    torch.manual_seed(0)
    a = explain_text(nla, TEXT, [8], samples=3, seed=7)[0]["samples"]
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the seeded sampling ran on a forked generator
    assert explain_text(nla, TEXT, [8], samples=3, seed=7)[0]["samples"] == a
    others = [explain_text(nla, TEXT, [8], samples=3, seed=s)[0]["samples"] for s in (8, 9, 10)]
    assert any(o != a for o in others)


def test_position_zero_is_refused_and_positions_count_the_bos(nla):
    for p in (0, -17):
        with pytest.raises(NLAError, match="attention sink"):
            explain_text(nla, TEXT, [p])
    (row,) = explain_text(nla, TEXT, [1])
    assert row["token"] == "a"  # position 1 is the text's first token; 0 is the prepended <s>
    with pytest.raises(NLAError, match="samples"):
        explain_text(nla, TEXT, [1], samples=0)


def test_warning_outside_the_training_positions(nla):
    assert training_positions(nla) == (6, 12)  # data positions 5..11 of the text, shifted by the BOS
    inside, outside = explain_text(nla, TEXT, [8, -1])
    assert inside["warning"] is None
    assert outside["position"] == 16 and "outside the positions this NLA was trained on (6–12)" in outside["warning"]
    nla.cfg.extra.pop("data_config")
    try:
        assert training_positions(nla) is None and explain_text(nla, TEXT, [-1])[0]["warning"] is None
    finally:
        nla.cfg.extra["data_config"] = {"min_position": 5, "max_position": 12}


def test_cli_prints_greedy_fve_and_warns_outside_training(folder, nla):
    r = runner.invoke(app, ["nla", "explain", "--nla", str(folder), "--text", TEXT])
    assert r.exit_code == 0, r.output
    want = explain_text(nla, TEXT, [-1])[0]
    assert f"[16] 'a'  FVE {want['fve']:+.2f}  (greedy)" in r.output
    assert "warning: position 16 is outside the positions this NLA was trained on (6–12)" in r.output
    assert "oracle" not in r.output and "sample" not in r.output


def test_cli_labels_the_oracle_pick_and_is_reproducible(folder, nla):
    args = ["nla", "explain", "--nla", str(folder), "--text", TEXT, "--position", "8", "--samples", "3"]
    r = runner.invoke(app, [*args, "--seed", "5"])
    assert r.exit_code == 0, r.output
    row = explain_text(nla, TEXT, [8], samples=3, seed=5)[0]
    lines = r.output.splitlines()
    assert lines[0].startswith(f"[8] 'e'  FVE {row['fve']:+.2f}  (greedy)")  # the reported FVE is the greedy one
    assert [line.strip().split("  ")[0] for line in lines[1:4]] == ["sample 1/3", "sample 2/3", "sample 3/3"]
    assert "oracle pick" in lines[4] and "true vector" in lines[4] and "not the NLA's FVE" in lines[4]
    assert f"({row['oracle']['score']:+.2f})" in lines[4]
    assert "warning" not in r.output
    assert runner.invoke(app, [*args, "--seed", "5"]).output == r.output


def test_cli_refuses_the_sink_in_one_line_and_help_explains_positions(folder):
    r = runner.invoke(app, ["nla", "explain", "--nla", str(folder), "--text", TEXT, "--position", "0"])
    assert r.exit_code == 2 and r.output.strip() == "error: position 0 is the attention sink (BOS <s>); use 1..16 or -1"
    assert "Traceback" not in r.output
    h = runner.invoke(app, ["nla", "explain", "--help"], terminal_width=200)
    flat = " ".join(h.output.replace("│", " ").split())
    assert "BOS token" in flat and "<|im_start|>" in flat and "Position 0 is refused" in flat
    assert "oracle" in flat and "--seed" in flat

"""The spliced language-model loss in bounded chunks, held-out text by default, and `sae eval` finding its model."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from thoughtscope.models import tiny_model
from thoughtscope.sae import SAEConfig, build_sae
from thoughtscope.sae.metrics import default_chunk_tokens, spliced_lm_loss, spliced_losses
from thoughtscope.sites import edit

VOCAB = 300


@torch.no_grad()
def _reference(lm, site, ids, mask, fn, exclude_first=True):
    """Whole-batch logits, the plain formula: summed next-token loss over real targets and summed KL."""
    kw = {} if mask is None else {"attention_mask": mask}
    clean = lm.model(ids, **kw).logits.float()

    def hooked(acts):
        a = acts.float()
        new = fn(a)
        if exclude_first:
            new[:, 0] = a[:, 0]
        return new

    with edit(lm, site, hooked):
        spliced = lm.model(ids, **kw).logits.float()
    w = torch.ones(ids.shape[0], ids.shape[1] - 1) if mask is None else mask[:, 1:].float()
    tgt = ids[:, 1:]
    ce = F.cross_entropy(spliced[:, :-1].transpose(1, 2), tgt, reduction="none")
    ce0 = F.cross_entropy(clean[:, :-1].transpose(1, 2), tgt, reduction="none")
    lp0, lp = clean[:, :-1].log_softmax(-1), spliced[:, :-1].log_softmax(-1)
    kl = (lp0.exp() * (lp0 - lp)).sum(-1)
    n = float(w.sum())
    return float((ce * w).sum()) / n, float((ce0 * w).sum()) / n, float((kl * w).sum()) / n


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_chunked_loss_equals_whole_batch_logits(arch):
    lm = tiny_model(arch, d_model=32, n_layers=2, vocab=VOCAB)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 14:] = 0  # a padded row: its padding is never a target
    sae = build_sae(SAEConfig(arch="topk", d_model=32, n_features=64, k=4))
    mean = torch.randn(32, generator=g)
    got = spliced_lm_loss(lm, sae, "resid.0", [(ids, mask)], mean_act=mean, chunk_tokens=7)

    l_sae, l_clean, kl_sae = _reference(lm, "resid.0", ids, mask, lambda a: sae(a)[1])
    l_mean, _, kl_mean = _reference(lm, "resid.0", ids, mask, lambda a: mean.expand_as(a).clone())
    l_zero, _, _ = _reference(lm, "resid.0", ids, mask, torch.zeros_like)
    assert got["loss_clean"] == pytest.approx(l_clean, rel=1e-5)
    assert got["loss_sae"] == pytest.approx(l_sae, rel=1e-5)
    assert got["loss_mean_ablated"] == pytest.approx(l_mean, rel=1e-5)
    assert got["loss_zero_ablated"] == pytest.approx(l_zero, rel=1e-5)
    assert got["kl_sae"] == pytest.approx(kl_sae, rel=1e-4, abs=1e-6)
    assert got["kl_mean"] == pytest.approx(kl_mean, rel=1e-4, abs=1e-6)
    assert got["loss_recovered_vs_mean"] == pytest.approx((l_mean - l_sae) / (l_mean - l_clean), rel=1e-4)
    assert got["n_tokens"] == float(mask[:, 1:].sum())
    assert list(got)[0] == "loss_recovered_vs_mean"  # the headline figure comes first


def test_logits_never_exceed_one_chunk():
    """Every call of the unembedding sees at most chunk_tokens positions: no [tokens, vocab] tensor for a batch."""
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=VOCAB)
    ids = torch.randint(3, VOCAB, (4, 40), generator=torch.Generator().manual_seed(1))
    seen = []
    handle = lm.unembed.register_forward_hook(lambda m, a, out: seen.append(out.shape[:-1].numel()))
    try:
        r = spliced_losses(lm, "resid.1", [ids], {"id": lambda a: a.clone()}, chunk_tokens=9)
    finally:
        handle.remove()
    assert seen and max(seen) <= 9
    assert len(seen) >= 4 * math.ceil(4 * 39 / 9)  # four conditions (clean, zero, mean, id), every chunk
    assert r["replaced"]["id"]["loss_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["replaced"]["id"]["kl"] < 1e-6
    assert default_chunk_tokens(262_144) * 262_144 <= 1 << 24


def test_mean_defaults_to_the_tokens_own_mean_without_position_zero():
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=VOCAB)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    from thoughtscope.sites import capture

    acts = next(iter(capture(lm, "resid.0", ids).values()))
    mean = acts[:, 1:].reshape(-1, 32).mean(0)
    sae = build_sae(SAEConfig(arch="topk", d_model=32, n_features=64, k=4))
    auto = spliced_lm_loss(lm, sae, "resid.0", [ids[:1], ids[1:]])
    given = spliced_lm_loss(lm, sae, "resid.0", [ids], mean_act=mean)
    assert auto["loss_mean_ablated"] == pytest.approx(given["loss_mean_ablated"], rel=1e-5)


# ----------------------------------------------------------------------------- held-out text, the recorded model
TEXT = "\n\n\n".join(
    f"Note {i}: cats and dogs {i} play in the garden near {i * 3} trees. " * (2 + i % 4) for i in range(300)
)
GRID = {"arch": ["topk"], "k": [4], "expansion": [2], "l1_coeff": [5.0], "l0_coeff": [1.0]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model saved as a folder, a store of its first 4,096 corpus tokens, and an SAE trained on the store
    with the spliced loss measured right after training."""
    from thoughtscope.corpus import Corpus
    from thoughtscope.harvest import HarvestConfig, harvest
    from thoughtscope.models import load_model
    from thoughtscope.sae import TrainConfig
    from thoughtscope.sae.run import train_grid

    root = tmp_path_factory.mktemp("saeeval")
    tiny = tiny_model("llama", n_layers=2, d_model=32)
    tiny.model.save_pretrained(root / "model")
    tiny.tokenizer.save_pretrained(root / "model")
    (root / "docs.txt").write_text(TEXT)
    lm = load_model(str(root / "model"))
    cfg = HarvestConfig(n_tokens=4096, ctx_len=32, contexts_per_batch=8)
    (store,) = harvest(lm, Corpus(str(root / "docs.txt")), ["resid.1"], root / "acts", cfg, progress=False).values()
    tc = TrainConfig(batch_size=256, steps=6, progress=False, checkpoint_every=0)
    runs, _ = train_grid(root / "sae", store=store.path, grid=GRID, train_cfg=tc, loss_tokens=256)
    return root, runs[0], store.path


def _metrics(folder):
    import json

    return json.loads((folder / "metrics.json").read_text())


def test_training_records_text_and_model_and_measures_heldout_loss(trained):
    root, run, _ = trained
    m = _metrics(root / "sae")
    assert m["data"]["skip_tokens"] == 0 and m["data"]["n_tokens"] == 4096 and m["data"]["ctx_len"] == 32
    assert m["data"]["corpus"]["spec"] == str(root / "docs.txt")
    assert run.sae.cfg.model_source["path"] == str((root / "model").resolve()) or "model" in str(
        run.sae.cfg.model_source
    )
    held = m["heldout"]
    assert math.isfinite(held["spliced"]["loss_recovered_vs_mean"])
    # 4,096 tokens in contexts of 32 hold 128 x 31 text tokens: 32 contexts of 128 (127 text tokens each)
    assert held["spliced_text"]["skip_contexts"] == math.ceil(128 * 31 / 127) == 32
    assert "held-out" in held["spliced_text"]["text"] and "final" in m  # train.py's own figures are kept


def test_eval_without_model_loads_the_recorded_one_on_heldout_text(trained):
    from thoughtscope.sae.run import evaluate_folder

    root, _, acts = trained
    r = evaluate_folder(root / "sae", store=acts, loss_tokens=256)
    assert list(r)[:2] == ["loss_recovered_vs_mean", "fvu"]
    assert r["spliced_text"]["skip_contexts"] == 32 and r["spliced"]["n_tokens"] == 2 * 127
    assert r["spliced_text"]["corpus"] == str(root / "docs.txt")
    early = evaluate_folder(root / "sae", loss_tokens=256, skip_contexts=0)
    assert early["spliced_text"]["skip_contexts"] == 0 and "fvu" not in early
    assert early["spliced"]["loss_clean"] != r["spliced"]["loss_clean"]  # other text
    by_tokens = evaluate_folder(root / "sae", loss_tokens=256, skip_tokens=128 * 32)
    assert by_tokens["spliced"]["loss_clean"] == pytest.approx(r["spliced"]["loss_clean"])


def test_eval_says_when_the_model_has_moved_and_keeps_reconstruction(trained, tmp_path):
    import shutil

    from thoughtscope.errors import ModelError
    from thoughtscope.sae import load_sae, save_sae
    from thoughtscope.sae.run import evaluate_folder

    root, _, acts = trained
    sae = load_sae(root / "sae")
    shutil.copytree(root / "model", tmp_path / "model")
    sae.cfg.model_source = {**sae.cfg.model_source, "path": str(tmp_path / "gone"), "spec": str(tmp_path / "gone")}
    save_sae(sae, tmp_path / "sae")
    with pytest.raises(ModelError, match="moved"):
        evaluate_folder(tmp_path / "sae", loss_tokens=128)
    r = evaluate_folder(tmp_path / "sae", store=acts, loss_tokens=128)
    assert "moved" in r["spliced_skipped"] and r["fvu"] < 1
    given = evaluate_folder(
        tmp_path / "sae", model=str(tmp_path / "model"), loss_tokens=128, corpus=str(root / "docs.txt")
    )
    assert math.isfinite(given["loss_recovered_vs_mean"])
    # the folder saved here has no training-text record: measured from the start of the corpus, and said so
    assert given["spliced_text"]["skip_contexts"] == 0 and "does not record" in given["spliced_text"]["text"]


def test_eval_without_any_model_gives_reconstruction(trained, tmp_path):
    from thoughtscope.sae import load_sae, save_sae
    from thoughtscope.sae.run import evaluate_folder

    root, _, acts = trained
    sae = load_sae(root / "sae")
    sae.cfg.model_source, sae.cfg.model = None, "an-unregistered-name"  # never tried on the hub
    save_sae(sae, tmp_path / "sae")
    t0 = time.perf_counter()
    r = evaluate_folder(tmp_path / "sae", store=acts)
    assert "fvu" in r and "spliced" not in r and "no model given" in r["spliced_skipped"]
    assert time.perf_counter() - t0 < 10


def test_cli_eval_prints_recovery_first_and_writes_it(trained):
    import json

    from typer.testing import CliRunner

    from thoughtscope.cli import app

    root, _, acts = trained
    res = CliRunner().invoke(
        app, ["sae", "eval", str(root / "sae"), "--loss-tokens", "128", "--write", "--quiet", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.lstrip().startswith("loss recovered vs mean ablation:")
    assert "held-out text" in res.output
    m = json.loads((root / "sae" / "metrics.json").read_text())
    assert m["heldout"]["spliced"]["n_tokens"] == 127 and "data" in m


def test_race_scores_every_contender_on_the_same_heldout_tokens(trained):
    """benchmarks/_race.spliced_recovery: one clean / zero / mean run, each contender spliced in on the text after the
    store's; a perfect reconstruction recovers everything, the mean row recovers nothing."""
    from _race import spliced_recovery

    from thoughtscope.models import load_model
    from thoughtscope.store import ActivationStore

    root, _, acts = trained
    store = ActivationStore.open(acts)
    lm = load_model(str(root / "model"))
    fns = {
        "perfect": lambda x: (x.clone(), torch.ones(4, dtype=torch.bool), 0),
        "half": lambda x: (0.5 * x, torch.ones(4, dtype=torch.bool), 0),
    }
    r = spliced_recovery(fns, store, lm=lm, n_tokens=256, progress=False)
    assert r["perfect"]["loss_recovered_vs_mean"] == pytest.approx(1.0, abs=1e-5)
    assert r["half"]["loss_clean"] == r["perfect"]["loss_clean"] and r["half"]["n_tokens"] == 2 * 127
    assert r["half"]["loss_recovered_vs_mean"] < 1 and "held-out" in r["half"]["text"]


def test_heldout_start_follows_the_training_record(tmp_path):
    """Text read on the fly is whole forward passes from the corpus start; another corpus needs no skip; a damaged
    record is refused by name."""
    from thoughtscope.corpus import Corpus
    from thoughtscope.errors import SAEError
    from thoughtscope.sae.run import heldout_contexts, streamed_text

    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "b.txt").write_text(TEXT[::-1])
    a, b = Corpus(str(tmp_path / "a.txt")), Corpus(str(tmp_path / "b.txt"))
    rec = streamed_text(a, 1000)  # 1,000 rows of 127 per context: 8 contexts, one forward pass of 16
    assert rec["n_tokens"] == 16 * 128 and rec["skip_tokens"] == 0
    assert heldout_contexts(rec, a)[0] == 16
    skip, said = heldout_contexts(rec, b)
    assert skip == 0 and "not the corpus the SAE trained on" in said
    with pytest.raises(SAEError, match="damaged"):
        heldout_contexts({**rec, "n_tokens": "many"}, a)


def test_fvu_says_whether_the_store_is_training_text(trained, tmp_path):
    from thoughtscope.corpus import Corpus
    from thoughtscope.harvest import HarvestConfig, harvest
    from thoughtscope.models import load_model
    from thoughtscope.sae.run import evaluate_folder

    root, _, acts = trained
    same = evaluate_folder(root / "sae", store=acts, loss_tokens=0)
    assert same["reconstruction"]["text"].startswith("training text") and "loss_tokens is 0" in same["spliced_skipped"]
    lm = load_model(str(root / "model"))
    cfg = HarvestConfig(n_tokens=1024, ctx_len=32, contexts_per_batch=8, skip_tokens=4096)
    (held,) = harvest(lm, Corpus(str(root / "docs.txt")), ["resid.1"], tmp_path / "held", cfg, progress=False).values()
    other = evaluate_folder(root / "sae", store=held.path, loss_tokens=0)
    assert other["reconstruction"]["text"].startswith("held out")

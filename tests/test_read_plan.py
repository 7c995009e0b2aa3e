"""The read plan harvest and atlas configs share: validation on construction, errors naming field and value."""

import pytest
from helpers import tiny_bpe_tokenizer

from thoughtscope.atlas import AtlasConfig, AtlasError
from thoughtscope.atlas.build import _renamed_fields
from thoughtscope.corpus import Corpus, CorpusError, ReadPlan
from thoughtscope.harvest import HarvestConfig, HarvestError


@pytest.mark.parametrize(
    "cls, err", [(ReadPlan, CorpusError), (HarvestConfig, HarvestError), (AtlasConfig, AtlasError)]
)
@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(n_tokens=0), "n_tokens must be a positive int, got 0"),
        (dict(ctx_len=1), "ctx_len must be an int >= 2, got 1"),
        (dict(contexts_per_batch=2.5), "contexts_per_batch must be a positive int, got 2.5"),
        (
            dict(ctx_len=16, contexts_per_batch=4, skip_tokens=100),
            "skip_tokens must be a non-negative multiple of contexts_per_batch × ctx_len = 64, got 100",
        ),
        (dict(add_bos="yes"), "add_bos must be True or False, got 'yes'"),
    ],
)
def test_plan_errors_name_field_value_and_expectation(cls, err, kw, message):
    with pytest.raises(err) as e:
        cls(**kw)
    assert str(e.value) == f"{cls.__name__}.{message}"
    assert isinstance(e.value, ValueError)


def test_each_config_checks_its_own_fields():
    with pytest.raises(
        HarvestError,
        match=r"HarvestConfig.shard_tokens must be None or a positive multiple of "
        r"contexts_per_batch × ctx_len = 2048, got 1000",
    ):
        HarvestConfig(shard_tokens=1000)
    with pytest.raises(AtlasError, match="AtlasConfig.top_k must be a positive int, got 0"):
        AtlasConfig(top_k=0)
    with pytest.raises(AtlasError, match="AtlasConfig.window_left must be an int >= 0, got -1"):
        AtlasConfig(window_left=-1)
    cfg = HarvestConfig()
    cfg.n_tokens = -5  # changed after construction: the consumer's validate() still catches it
    with pytest.raises(HarvestError, match="n_tokens"):
        cfg.validate()
    # each config owns its budget; the plan fields are shared
    assert (HarvestConfig().n_tokens, AtlasConfig().n_tokens) == (200_000, 1_000_000)
    assert HarvestConfig().batch_tokens == AtlasConfig().batch_tokens == 128 * 16


def test_plan_batches_skip_whole_batches(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n\n".join(f"document {i} " + "word " * (5 + i % 7) for i in range(60)))
    tok = tiny_bpe_tokenizer()
    corpus = Corpus(str(path))
    every = list(corpus.batches(tok, 8, 3))
    plan = ReadPlan(n_tokens=10**6, ctx_len=8, contexts_per_batch=3, skip_tokens=2 * 24)
    got = list(plan.batches(corpus, tok, start=1))
    assert [b for b, _ in got] == list(range(1, len(every) - 2))
    assert all((x.input_ids == y.input_ids).all() for (_, x), y in zip(got, every[3:]))


def test_corpus_batches_old_keyword_still_works_with_a_warning(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n\n".join(f"document {i} " + "word " * 9 for i in range(20)))
    tok = tiny_bpe_tokenizer()
    with pytest.warns(DeprecationWarning, match="contexts_per_batch"):
        old = list(Corpus(str(path)).batches(tok, 8, batch_size=3))
    new = list(Corpus(str(path)).batches(tok, 8, contexts_per_batch=3))
    assert [b.input_ids.tolist() for b in old] == [b.input_ids.tolist() for b in new]


def test_atlas_checkpoint_from_before_the_rename_still_matches():
    ident = {"model": "m", "config": {"n_tokens": 10, "batch_size": 4, "ctx_len": 8}}
    assert _renamed_fields(ident)["config"] == {"n_tokens": 10, "contexts_per_batch": 4, "ctx_len": 8}
    same = {"model": "m", "config": {"contexts_per_batch": 4}}
    assert _renamed_fields(same) is same


def test_cli_defaults_are_the_configs():
    import typer.main

    from thoughtscope.cli import app

    cmd = typer.main.get_command(app)
    h = {p.name: p.default for p in cmd.commands["harvest"].params}
    assert (h["tokens"], h["ctx_len"], h["contexts_per_batch"], h["dtype"], h["shard_tokens"], h["skip_tokens"]) == (
        HarvestConfig.n_tokens,
        HarvestConfig.ctx_len,
        HarvestConfig.contexts_per_batch,
        HarvestConfig.dtype,
        HarvestConfig.shard_tokens,
        HarvestConfig.skip_tokens,
    )
    b = {p.name: p.default for p in cmd.commands["atlas"].commands["build"].params}
    assert (b["tokens"], b["ctx_len"], b["contexts_per_batch"], b["skip_tokens"], b["top_k"]) == (
        AtlasConfig.n_tokens,
        AtlasConfig.ctx_len,
        AtlasConfig.contexts_per_batch,
        AtlasConfig.skip_tokens,
        AtlasConfig.top_k,
    )
    opts = {o for p in cmd.commands["harvest"].params for o in p.opts}
    assert {"--contexts-per-batch", "--batch-size"} <= opts  # the old name still works


def test_the_torch_free_dtype_names_are_the_stores():
    from thoughtscope.dtypes import STORE_DTYPES, torch_dtype
    from thoughtscope.store.format import NPY_DTYPES

    assert set(STORE_DTYPES) == set(NPY_DTYPES) and all(torch_dtype(n) for n in STORE_DTYPES)

"""A tiny workbench whose atlas reads Chinese, Polish and emoji text through a byte tokenizer (every byte a token),
with features planted on bytes *inside* characters: the text-display tests (tests/test_display*.py).

The model's residual stream at resid.1 is its token embedding (attention and MLP outputs zeroed), so a feature
planted on one byte token fires on exactly that byte wherever it occurs: on the middle byte of 中 (E4 B8 AD), the
second byte of an emoji (F0 9F ..), the lead byte of ł, ś, ź, ż, ń (C5 ..).
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

from helpers import single_thread
from helpers.server_fixtures import ATLAS_CFG
from thoughtscope.models import tiny_model
from thoughtscope.sae import SAE, SAEConfig, save_sae

CHINESE = "中文世界上下不是中国人中间"
POLISH = "zażółć gęślą jaźń łódź śnieg źródło żółw"
EMOJI = "😀 🙂 👍 👍🏽 👩‍👩‍👧 🇵🇱"
# feature -> the byte it fires on, and the characters (pieces) of the corpus that byte can sit in
PLANTS = {
    5: (0xB8, set("中世上下不")),
    6: (0x9F, {"😀", "🙂", "👍", "👍🏽", "👩\u200d👩\u200d👧", "🇵🇱"}),
    7: (0xC5, set("łśźżń")),
}
SAMPLE = f"{CHINESE} {POLISH} {EMOJI} and plain ASCII"
ATLAS = {**ATLAS_CFG, "n_tokens": 1536}  # the shared small-atlas settings, on less text


def byte_id(lm, b: int) -> int:
    """The token id of one byte in the byte tokenizer (its character in GPT-2's byte-level alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return int(lm.tokenizer.convert_tokens_to_ids(bytes_to_unicode()[b]))


@functools.cache
def byte_model(seed: int = 0):
    """A tiny llama with every one of the 256 bytes a token (vocab 259: pad, bos, eos, bytes); resid.1 == embedding."""
    lm = tiny_model("llama", d_model=32, n_layers=2, vocab=259, seed=seed)
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return lm


def byte_sae(lm, n_features: int = 16, k: int = 4) -> SAE:
    """A TopK SAE at resid.1 whose PLANTS features fire (at 40) on exactly their byte."""
    cfg = SAEConfig(arch="topk", d_model=lm.d_model, n_features=n_features, k=k, model=lm.name, site="resid.1")
    sae = SAE.from_config(cfg, seed=0)
    E = lm.model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        sae.enc.mul_(0.01)
        for f, (b, _) in PLANTS.items():
            e = E[byte_id(lm, b)]
            sae.enc[f] = 100.0 * e / e.pow(2).sum()
            sae.b_enc[f] = -60.0
    return sae


def write_unicode_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    pools = [list(CHINESE), POLISH.split(), EMOJI.split(), "the cat sat on a mat".split()]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            words = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(6, 16))]
            f.write(" ".join(words) + "\n\n\n")
    return path


def build_unicode_workbench(root: Path):
    """(Workbench, lm): the byte model, the planted SAE (saved with its maxima) and an atlas of the unicode corpus."""
    from helpers.server_fixtures import store_feature_maxima
    from thoughtscope.atlas import Atlas, AtlasConfig, build_atlas
    from thoughtscope.corpus import Corpus
    from thoughtscope.server import Workbench

    with single_thread():
        lm = byte_model()
        sae = byte_sae(lm)
        save_sae(sae, root / "sae")
        corpus = Corpus(str(write_unicode_corpus(root / "corpus.txt")))
        path = build_atlas(
            lm, sae, corpus, root / "atlas", AtlasConfig(**ATLAS), progress=False, sae_path=str(root / "sae")
        )
    at = Atlas.open(path)
    store_feature_maxima(sae, root / "sae", at)
    return Workbench(lm=lm, sae=sae, sae_spec=str(root / "sae"), atlas=at), lm


@functools.cache
def shared_unicode():
    """One unicode workbench per test process (the tests only read it)."""
    root = Path(tempfile.mkdtemp(prefix="thoughtscope-unicode-"))
    atexit.register(shutil.rmtree, root, True)
    return build_unicode_workbench(root)[0]

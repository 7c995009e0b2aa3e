"""A tiny workbench for the server and browser tests: identity model, planted SAE, a small atlas, an NLA, presets.

The planted feature 3 fires on exactly the token "q" and its decoder promotes "z", so clamping it high makes
the steered answer differ from the unsteered one in a way a test can see. The SAE stores feature maxima (the
"× max" reference of every slider) of 1.25 × the atlas's, as a larger corpus would give, so a test can tell
which of the two a slider uses.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from helpers.atlas_fixtures import (
    PLANT,
    identity_model,
    planted_sae,
    single_thread,
    write_corpus,
)
from thoughtscope.atlas import Atlas, AtlasConfig, build_atlas
from thoughtscope.corpus import Corpus
from thoughtscope.sae import save_sae

ATLAS_CFG = {
    "n_tokens": 3000,
    "ctx_len": 32,
    "contexts_per_batch": 8,
    "top_k": 8,
    "n_bins": 5,
    "per_bin": 4,
    "window_left": 6,
    "window_right": 3,
    "n_random_contexts": 8,
}
PLANT_LABEL = "the letter q in words like queen and quiet"


def build_tiny(root: Path, *, nla: bool = True):
    """(Workbench, lm) on the tiny model; the atlas carries one stored explanation (feature PLANT)."""
    from thoughtscope.nla import NLA, config_for
    from thoughtscope.server import Workbench
    from thoughtscope.server.workbench import load_presets

    with single_thread():
        lm = identity_model()
        sae = planted_sae(lm)
        save_sae(sae, root / "sae")
        corpus = Corpus(str(write_corpus(root / "corpus.txt", n_docs=80)))
        path = build_atlas(
            lm, sae, corpus, root / "atlas", AtlasConfig(**ATLAS_CFG), progress=False, sae_path=str(root / "sae")
        )
    at = Atlas.open(path)
    store_feature_maxima(sae, root / "sae", at)
    at.save_explanation(
        PLANT,
        {
            "explanation": PLANT_LABEL,
            "status": "ok",
            "explainer": "test",
            "scorer": "test",
            "detection_bacc": 0.9,
            "fuzz_bacc": 0.8,
        },
    )
    presets = root / "presets"
    presets.mkdir(exist_ok=True)
    vec = [0.0] * lm.d_model
    vec[0] = 1.0
    (presets / "tilt.json").write_text(
        json.dumps(
            {
                "format": "thoughtscope-preset-1",
                "name": "tilt",
                "interventions": [
                    {
                        "type": "vector",
                        "op": "add",
                        "site": "resid.1",
                        "vector": vec,
                        "value": 0.5,  # the old name of strength: presets written before the rename load
                        "unit": "raw",
                        "label": "tilt",
                    },
                    {
                        "type": "feature",
                        "op": "clamp",
                        "site": "resid.1",
                        "sae": str(root / "sae"),
                        "feature": PLANT,
                        "strength": 3.0,
                        "unit": "max",
                        "max_act": 40.0,
                        "label": "q",
                    },
                ],
            }
        )
    )
    # a calibration sweep as `thoughtscope steer sweep --out presets/q` writes it: q.json beside q.preset.json
    from thoughtscope.steer import Preset, PresetItem, SweepPoint, SweepResult, save_sweep

    Preset(
        "q-calibrated",
        [
            PresetItem(
                "feature",
                "clamp",
                "resid.1",
                2.0,
                feature=PLANT,
                sae=str(root / "sae"),
                unit="max",
                max_act=40.0,
                range=[0.0, 4.0],
                suggested=2.0,
            )
        ],
    ).save(presets / "q.preset.json")
    save_sweep(
        SweepResult(
            [SweepPoint(s, min(1.0, s / 4), 10 + 3 * s, 0.0) for s in (0.0, 1.0, 2.0, 4.0)],
            SweepPoint(0.0, 0.0, 10.0, 0.0),
            2.0,
            2.0,
            "keywords",
            ["q"],
            4,
            {},
        ),
        presets / "q.json",
    )
    wb = Workbench(lm=lm, sae=sae, sae_spec=str(root / "sae"), atlas=at)
    if nla:
        wb.nla = NLA(lm, config_for(lm, site="resid.1", injection_scale=6.0, lora_rank=4, max_new_tokens=6))
    load_presets(wb, [presets])
    return wb


STORED_OVER_ATLAS = 1.25  # the SAE's stored maxima over the atlas's


def store_feature_maxima(sae, folder: Path, atlas) -> None:
    """The SAE's "× max" reference, saved in its folder and attached (as load_sae would)."""
    import torch

    from thoughtscope.sae.stats import FeatureStats, save_feature_stats

    st = atlas.stats()
    stats = FeatureStats(
        torch.tensor(st["max_act"], dtype=torch.float32) * STORED_OVER_ATLAS,
        torch.tensor(st["n_active"], dtype=torch.float32) / ATLAS_CFG["n_tokens"],
        f"test: {STORED_OVER_ATLAS} x the atlas's maxima",
        ATLAS_CFG["n_tokens"],
    )
    save_feature_stats(stats, folder)
    sae.feature_stats = stats


@functools.cache
def shared_tiny():
    """One tiny workbench per test process (the server, browser and load tests only read it)."""
    root = Path(tempfile.mkdtemp(prefix="thoughtscope-web-"))
    atexit.register(shutil.rmtree, root, True)
    return build_tiny(root)

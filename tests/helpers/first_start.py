"""A first start on a fresh home, in small: a tiny model saved as a folder, a planted SAE that recorded it, a corpus
file and a tiny atlas config, for `load_workbench` without --atlas (tests/test_first_start*.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from helpers.atlas_fixtures import identity_model, planted_sae, single_thread, write_corpus
from helpers.server_fixtures import ATLAS_CFG
from thoughtscope.models import load_model
from thoughtscope.plans import AtlasConfig
from thoughtscope.sae import save_sae


def first_start_inputs(root: Path) -> dict:
    """load_workbench's arguments for a first start: model and SAE folders, the corpus, the atlas config."""
    root.mkdir(parents=True, exist_ok=True)
    with single_thread():
        tiny = identity_model()
        folder = root / "model"
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
        lm = load_model(str(folder))
        save_sae(planted_sae(lm), root / "sae")
        write_corpus(root / "corpus.txt", n_docs=80)
    return {
        "model": str(folder),
        "sae": str(root / "sae"),
        "corpus": str(root / "corpus.txt"),
        "build_config": AtlasConfig(**ATLAS_CFG),
        "nla": None,
        "preset_dirs": [],
        "progress": False,
    }


class Gate:
    """An `on_atlas_progress` that holds the build once it has made progress in step `step`, until `release()`:
    the window in which a test looks at the pages of a half-built atlas."""

    def __init__(self, step: int = 1, timeout: float = 60.0):
        self.step, self.timeout = step, timeout
        self.held, self.go = threading.Event(), threading.Event()
        self.seen: list[dict] = []

    def __call__(self, job) -> None:
        self.seen.append(job.to_dict())
        if job.step == self.step and job.done > 0 and not job.finished and not self.go.is_set():
            self.held.set()
            self.go.wait(self.timeout)

    def release(self) -> None:
        self.go.set()


def wait_until(cond, timeout: float = 30.0) -> bool:
    """Poll cond() every 50 ms until it holds (True) or the timeout passes (False)."""
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False

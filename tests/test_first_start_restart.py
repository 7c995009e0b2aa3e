"""A first start that did not finish: a server killed while reading the corpus leaves no atlas that could load as
complete, and the next start resumes the build from its checkpoint (the same atlas as an uninterrupted build); a
build stopped between the database and its explanations serves the atlas at once on the next start."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import env_with_tests_on_path
from helpers.first_start import first_start_inputs, wait_until

from thoughtscope.sae import load_sae
from thoughtscope.server.workbench import default_atlas_dir, load_workbench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return first_start_inputs(tmp_path_factory.mktemp("in"))


@pytest.fixture
def inputs(made, tmp_path, monkeypatch):
    monkeypatch.setenv("THOUGHTSCOPE_HOME", str(tmp_path / "home"))  # a fresh home: no atlas yet
    return dict(made)


KILL_CHILD = """
import json, os, signal, sys
from thoughtscope.plans import AtlasConfig
from thoughtscope.server.workbench import load_workbench

kw = json.loads(sys.argv[1])
kw["build_config"] = AtlasConfig(**kw["build_config"])

def kill_midway(job):
    if job.step == 1 and job.done >= 3 * kw["build_config"].batch_tokens:
        os.kill(os.getpid(), signal.SIGKILL)  # as a killed server: no cleanup of any kind

load_workbench(**kw, on_atlas_progress=kill_midway)
"""


def test_a_killed_build_leaves_no_atlas_and_the_next_start_resumes_it(inputs, tmp_path):
    env = {**env_with_tests_on_path(), "THOUGHTSCOPE_HOME": os.environ["THOUGHTSCOPE_HOME"]}
    args = json.dumps({**inputs, "build_config": dataclasses.asdict(inputs["build_config"])})
    p = subprocess.run([sys.executable, "-c", KILL_CHILD, args], env=env, capture_output=True)
    assert p.returncode == -9, p.stderr.decode()[-2000:]
    out = default_atlas_dir(load_sae(inputs["sae"]))
    assert (out / "build.ckpt").is_file() and not (out / "atlas.sqlite").exists()
    seen = []
    wb = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=lambda j: seen.append(j.to_dict()))
    assert wb.atlas_pending  # the half-built folder is never opened as an atlas
    assert wait_until(lambda: wb.atlas_build.finished, 60) and wb.atlas_build.error is None, wb.atlas_build.to_dict()
    assert not (out / "build.ckpt").exists() and wb.atlas is not None
    # the same atlas as an uninterrupted build
    os.environ["THOUGHTSCOPE_HOME"] = str(tmp_path / "home2")
    ref = load_workbench(**inputs)
    a, b = wb.atlas.stats(), ref.atlas.stats()
    assert np.array_equal(a["n_active"], b["n_active"]) and np.allclose(a["max_act"], b["max_act"])
    assert len(wb.atlas.explained("ok")) == len(ref.atlas.explained("ok")) > 0


def test_a_build_stopped_before_its_explanations_serves_the_atlas_at_once_on_the_next_start(inputs):
    def stop_in_step_2(job):
        if job.step == 2:
            raise RuntimeError("server stopped")  # as a server stopped between the database and the explanations

    first = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=stop_in_step_2)
    assert wait_until(lambda: first.atlas_build.finished) and "server stopped" in first.atlas_build.error
    assert first.atlas is not None and not first.atlas.explained(None)  # attached, no explanation yet
    seen = []
    again = load_workbench(**inputs, atlas_in_background=True, on_atlas_progress=lambda j: seen.append(j.to_dict()))
    assert again.atlas is not None and not again.atlas_pending  # the atlas on disk is whole: served at once
    assert wait_until(lambda: again.atlas_build.finished) and again.atlas_build.error is None
    assert {s["step"] for s in seen} == {2} and again.atlas.explained("ok")

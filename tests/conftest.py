"""Fixtures every test module may use: one torch thread for tiny problems, headless Chromium, the planted-letters
atlas. Builders and shared data live in the `helpers` package."""

from __future__ import annotations

import os

import pytest
from helpers import single_thread
from helpers.browser import browser, page  # noqa: F401  (headless Chromium and a checked page, for browser tests)
from helpers.letters_atlas import planted  # noqa: F401  (the planted-letters atlas fixture)
from hypothesis import HealthCheck, settings

# Property-based tests (tests/test_fuzz_*.py): the "ci" profile is the default (few, derandomized examples, so the
# fast suite stays quick and a failure re-runs the same); HYPOTHESIS_PROFILE=long for a local hunt.
settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` for modules of tiny problems."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def device() -> str:
    """The torch device the slow real-model tests load their model on: $THOUGHTSCOPE_TEST_DEVICE (set by
    scripts/gpu_check.sh to cuda), else the CPU."""
    return os.environ.get("THOUGHTSCOPE_TEST_DEVICE", "cpu")

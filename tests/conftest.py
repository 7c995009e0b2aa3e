"""Fixtures every test module may use: one torch thread for tiny problems, headless Chromium, the planted-letters
atlas. Builders and shared data live in the `helpers` package."""

from __future__ import annotations

import pytest
from helpers import single_thread
from helpers.browser import browser  # noqa: F401  (the headless Chromium fixture, for every browser test)
from helpers.letters_atlas import planted  # noqa: F401  (the planted-letters atlas fixture)


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` for modules of tiny problems."""
    with single_thread():
        yield

"""Shared test helpers."""

from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def single_thread():
    """Tiny matmuls are far faster single-threaded on a loaded 2-core machine than with a contended pool."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Use with `pytestmark = pytest.mark.usefixtures("one_thread")` for modules of tiny problems."""
    with single_thread():
        yield

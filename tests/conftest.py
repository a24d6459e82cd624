"""Shared test configuration. Tiny models live in ``tests/zoo.py``; ``tests/`` is on
``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so helper modules are
imported by name and no test file imports another."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep torch on one thread: CI has two cores and tests run beside each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

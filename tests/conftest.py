"""Shared test configuration. Tiny models live in ``tests/zoo.py``."""

from __future__ import annotations

import os
import sys

import pytest

pytest_plugins = ["pytester"]

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep torch on one thread: CI has two cores and tests run beside each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

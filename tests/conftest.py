"""Shared test configuration. Tiny models live in ``tests/zoo.py``; ``tests/`` is on
``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so helper modules are
imported by name and no test file imports another."""

from __future__ import annotations

import faulthandler
import os
from typing import IO, Any

import pytest

pytest_plugins = ["pytester"]

#: A test that runs this long ends the run: every thread's stack goes to the real stderr and
#: the process exits. A deadlock in a thread that holds the GIL cannot be interrupted from
#: Python (pytest's ``faulthandler_timeout`` only prints, and a Python timer thread would need
#: the GIL), and would otherwise hold CI until its own limit. The whole suite takes minutes.
HANG_SECONDS = 300

_real_stderr: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Keep a handle on the real stderr: during a test, fd 2 is pytest's capture file."""
    global _real_stderr
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        fd = os.dup(2)
    else:
        with capture.global_and_fixture_disabled():
            fd = os.dup(2)
    _real_stderr = os.fdopen(fd, "w")


def pytest_unconfigure(config: pytest.Config) -> None:
    global _real_stderr
    faulthandler.cancel_dump_traceback_later()
    if _real_stderr is not None:
        _real_stderr.close()
        _real_stderr = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    if _real_stderr is not None:
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=_real_stderr)
    try:
        return (yield)
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep torch on one thread: CI has two cores and tests run beside each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

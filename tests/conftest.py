"""Shared test configuration. Tiny models live in ``tests/zoo.py``; ``tests/`` is on
``sys.path`` through pytest's ``pythonpath`` setting (pyproject.toml), so helper modules are
imported by name and no test file imports another."""

from __future__ import annotations

import faulthandler
import os
import signal
from typing import IO, Any

import pytest

pytest_plugins = ["pytester"]

#: A test that runs this long ends its process: every thread's stack goes to the real stderr
#: and the process exits (under xdist, the worker; xdist reports the test as crashed). A
#: deadlock in a thread that holds the GIL cannot be interrupted from Python, and pytest's
#: ``faulthandler_timeout`` only prints (its timer is also cancelled whenever a test fails,
#: in a nested pytester session too), so a hung test would hold CI until its own limit.
#: Here an interval timer sends SIGALRM, whose handler is faulthandler's (C code, no GIL
#: needed), chained to the default action (exit). The whole suite takes minutes.
HANG_SECONDS = float(os.environ.get("BNCHECK_TEST_HANG_SECONDS", "300"))

_real_stderr: IO[str] | None = None
_ALARM = getattr(signal, "SIGALRM", None) if hasattr(signal, "setitimer") else None


def pytest_configure(config: pytest.Config) -> None:
    """Keep a handle on the real stderr (during a test, fd 2 is pytest's capture file) and
    let SIGALRM dump every thread's stack to it before the process ends."""
    global _real_stderr
    if _ALARM is None:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        fd = os.dup(2)
    else:
        with capture.global_and_fixture_disabled():
            fd = os.dup(2)
    _real_stderr = os.fdopen(fd, "w")
    faulthandler.register(_ALARM, file=_real_stderr, all_threads=True, chain=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _real_stderr
    if _ALARM is None or _real_stderr is None:
        return
    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.unregister(_ALARM)
    _real_stderr.close()
    _real_stderr = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    if _real_stderr is not None:
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        return (yield)
    finally:
        if _real_stderr is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Keep torch on one thread: CI has two cores and tests run beside each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""The test suite's own guard (tests/conftest.py): a hung test ends its process with every
thread's stack on stderr, even after a failing test (pytest cancels its own timeout there)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from zoo import env_with_tests

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(__import__("signal"), "setitimer"), reason="no setitimer"),
]


def test_a_hung_test_after_a_failing_one_ends_the_run_with_its_stack(tmp_path):
    (tmp_path / "test_hangs.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_fails():
                assert False

            def test_hangs_here():
                time.sleep(120)
            """
        )
    )
    # long enough for the failing test's report on a loaded machine (3 s was not, with
    # 16 xdist workers), well short of the hanging test's sleep
    env = env_with_tests(BNCHECK_TEST_HANG_SECONDS="10")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode not in (0, 1), done.stdout + done.stderr  # killed, not finished
    assert "most recent call first" in done.stderr
    assert "in test_hangs_here" in done.stderr

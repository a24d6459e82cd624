"""Smoke tests of the runnable examples in ``examples/``.

Each example runs in a subprocess with ``--quick`` (a few seconds: tiny data, one epoch), the
way a user runs it, and must exit 0 and print its key output. The examples check their own
claims and exit 1 when one does not hold (the frozen-backbone bug not caught, a checkpoint
audit with the wrong exit code), so exit 0 means more than "it did not crash".

They are marked ``slow`` (several seconds each, mostly importing torch and scikit-learn in a
fresh interpreter): ``pytest -m "not slow"`` leaves them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.slow


def run_example(name: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name> --quick ARGS`` on one thread; fail with its output if it fails."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0"
    )
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=EXAMPLES.parent,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{name} exited {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}"
            f"\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def test_seed_walkthrough_writes_markdown_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("sklearn", reason="the walkthrough trains on scikit-learn's digits")
    pytest.importorskip("matplotlib", reason="the walkthrough writes a PNG plot")
    result = run_example("seed_walkthrough.py", "--out", str(tmp_path))
    markdown = (tmp_path / "walkthrough.md").read_text(encoding="utf-8")
    assert result.stdout.startswith(markdown.splitlines()[0])  # the table is printed too
    for section in (
        "## 1. Scaled (0-1) vs raw 0-255 inputs",
        "## 2. With vs without BN: convergence",
        "## 3. Batch size: noisy statistics",
        "## 4. BN before vs after the ReLU",
        "## 5. Running (EMA) statistics vs batch statistics at inference",
        "## 6. Repairing broken statistics: `bncheck.recalibrate`",
    ):
        assert section in markdown
    lines = markdown.splitlines()
    raw_row = next(line for line in lines if line.startswith("| BN, raw 0-255 pixels"))
    assert "**warning**" in raw_row  # input-not-normalized found on the raw-pixel batch
    scaled_row = next(
        line
        for line in lines  # section 1's table has five columns
        if line.startswith("| BN before ReLU, scaled 0-1, batch 64 | ") and line.count("|") == 6
    )
    assert "not found" in scaled_row  # ... and not on the 0-1 batch
    after_row = next(
        line
        for line in lines  # section 4's table has four columns
        if line.startswith("| BN after ReLU") and line.count("|") == 5
    )
    assert "**info**" in after_row  # bn-after-activation
    batch2_row = next(line for line in lines if line.startswith("| 2 | "))
    assert "**warning**" in batch2_row  # small-batch at batch size 2
    for bs in (2, 8, 64):  # values per channel in features.1: N x 32 x 32, never 0
        row = next(line for line in lines if line.startswith(f"| {bs} | "))
        assert row.split(" | ")[2] == str(bs * 32 * 32), row
    nan_row = next(line for line in lines if line.startswith("| NaN in half the channels"))
    assert "`nonfinite-stats`" in nan_row and nan_row.endswith("| none |")  # repaired
    ema_row = next(line for line in lines if line.startswith("| EMA copy"))
    assert "`untrained-stats`" in ema_row and "13 of 13" in ema_row
    assert "bncheck recalibrate: " in markdown  # the before/after tables
    for png in ("walkthrough.png", "monitor_batch64.png", "monitor_batch2.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_checkpoint_shows_exit_codes() -> None:
    result = run_example("audit_checkpoint.py")
    out = result.stdout
    assert "$ bncheck audit" in out
    assert "nonfinite-stats" in out  # the NaN checkpoint is caught ...
    assert "untrained-stats" in out  # ... and so is the untrained one
    assert '"findings"' in out  # the JSON report from Python
    for name, code in (
        ("healthy", 0),
        ("nan_stats", 1),
        ("untrained --fail-on warning", 1),
        ("not a checkpoint", 2),
    ):
        assert f"{name}: {code}" in out
    assert "Traceback" not in out + result.stderr  # bad files get one line, not a traceback


def test_finetune_frozen_backbone_catches_drift_and_passes_the_fix() -> None:
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    out = run_example("finetune_frozen_backbone.py").stdout
    for claim in (
        "[ok] buggy run: backbone outputs changed",
        "[ok] buggy run: Monitor reports frozen-bn-drift",
        "[ok] buggy run: audit reports frozen-bn-in-train-mode",
        "[ok] fixed run: backbone outputs identical",
        "[ok] fixed run: Monitor reports nothing",
    ):
        assert claim in out
    assert "FAILED" not in out


def test_model_repo_test_file_passes_under_pytest() -> None:
    """``examples/test_model_repo.py``, the model repo's test file using the plugin, passes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(EXAMPLES / "test_model_repo.py"),
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
    assert "bncheck" in result.stdout  # the plugin's report header / summary section

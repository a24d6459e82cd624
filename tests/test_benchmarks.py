"""The benchmark that reaches into bncheck's internals still runs against them.

``benchmarks/audit_parts.py`` switches parts of the train-mode pass off by replacing
functions of ``bncheck.probes`` and wraps ``bncheck.state`` / ``bncheck.engine`` functions to
time the audit's phases. A rename there would break it silently until someone needs the
figures; this runs it once, tiny, and checks that every part it measures was found and
timed. No timing is asserted (the figures are the script's business).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_audit_parts_runs_and_measures_every_part() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "audit_parts.py"),
            "--only",
            "shuffle",
            "--repeats",
            "1",
            "--batch",
            "4",
            "--size",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = dict(
        (label.strip(), float(value))
        for label, value in re.findall(r"^\s+(\S[^\n]*?)\s+([+-]?\d+\.\d+)$", proc.stdout, re.M)
    )
    for label in (
        "train-mode forward",
        "+ tracer",
        "+ BN hooks (calls only)",
        "whole train-mode pass",
        "without bn-reused",
        "with held inputs (eval passes after it)",
        "without buffer copies",
        "without gamma/beta copies",
        "without finishing statistics",
        "without statistics (kernel's or read)",
        "snapshot taken",
        "snapshot restored",
        "train-mode pass",
        "eval passes",
        "rules",
        "whole audit",
    ):
        assert label in figures, (label, proc.stdout)
        assert math.isfinite(figures[label]) and figures[label] >= 0, (label, proc.stdout)
    # the phases were timed inside the audit: each is a part of it
    for phase in ("snapshot taken", "train-mode pass", "eval passes", "rules"):
        assert 0 < figures[phase] < figures["whole audit"], (phase, proc.stdout)

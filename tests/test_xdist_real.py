"""The plugin under real pytest-xdist (``-n 2``): audits made on the workers reach the
controller's summary, with their suppression and baseline counts."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("xdist") is None, reason="needs pytest-xdist"),
]

REPO = Path(__file__).resolve().parent.parent

TESTS = """
import pytest
from torch import nn


def keras():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=0.9))


def zero_eps():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=0.0))


@pytest.mark.parametrize("i", range(4))
def test_keras(bncheck, i):
    bncheck.assert_ok(keras(), fail_on="warning")


def test_zero_eps(bncheck):
    bncheck.assert_ok(zero_eps())
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch) -> pytest.Pytester:
    pytester.makepyfile(test_models=TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return pytester


def test_summary_collects_audits_from_two_workers(project: pytest.Pytester) -> None:
    result = project.runpytest_subprocess("-n", "2", "-p", "xdist", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=0, failed=5)
    result.stdout.fnmatch_lines(
        [
            "*created: 2/2 workers*",
            "*= bncheck =*",
            "5 audits in 5 tests: 1 error(s), 4 warning(s)*",
        ]
    )


def test_per_layer_ignores_and_baseline_under_xdist(project: pytest.Pytester) -> None:
    project.makepyprojecttoml(
        """
        [tool.bncheck]
        per-layer-ignores = { "1" = ["invalid-eps"], "stem.*" = ["all"] }
        baseline = "bncheck-baseline.json"
        """
    )
    args = ("-n", "2", "-p", "xdist", "-p", "no:cacheprovider")
    first = project.runpytest_subprocess(*args, "--bncheck-update-baseline")
    first.assert_outcomes(passed=5)  # recording the baseline fails no audit
    first.stdout.fnmatch_lines(["*wrote 4 finding(s) of 5 test(s) to the baseline*"])
    stored = json.loads((project.path / "bncheck-baseline.json").read_text())
    assert {e["rule"] for e in stored["findings"]} == {"keras-momentum"}
    assert len({e["source"] for e in stored["findings"]}) == 4  # one per test node
    gated = project.runpytest_subprocess(*args)
    gated.assert_outcomes(passed=5)
    gated.stdout.fnmatch_lines(
        [
            "1 suppressed by per-layer ignores ('1': 1)",
            "warning: per-layer ignore 'stem.*' matched no finding in this session*",
            "baseline *bncheck-baseline.json: 4 findings in the baseline, 0 new, 0 fixed*",
        ]
    )

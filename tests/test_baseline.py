"""Baselines: stable fingerprints, the file format, and the CLI gate (new findings only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_run import ARCH, SELECT, run
from hypothesis import given
from hypothesis import strategies as st

from bncheck import baseline
from bncheck.report import Finding, Severity


# ---- fingerprints ------------------------------------------------------------------------------
def test_cause_drops_the_layer_label_and_every_measured_number():
    a = Finding(
        "keras-momentum",
        Severity.WARNING,
        "features.1",
        "features.1 (BatchNorm2d): its input comes from features.0 (Conv2d); momentum = 0.9 > "
        "0.5: each update keeps only 10% of the running statistics - use momentum=0.1 (= 1 - 0.9)",
    )
    b = Finding(
        "keras-momentum",
        Severity.WARNING,
        "features.1",
        "features.1 (BatchNorm2d): its input comes from features.0 (Conv2d); momentum = 0.99 > "
        "0.5: each update keeps only 1% of the running statistics - use momentum=0.01 "
        "(= 1 - 0.99)",
    )
    assert baseline.cause_of(a) == baseline.cause_of(b)
    assert baseline.cause_of(a) == (
        "its input comes from features.0 (Conv2d); momentum = # > #: each update keeps only # "
        "of the running statistics - use momentum=# (= # - #)"
    )  # names with digits (features.0, Conv2d) are kept: they are not measurements
    assert baseline.fingerprint(a, "m.pt") == baseline.fingerprint(b, "m.pt")
    assert baseline.fingerprint(a, "m.pt") != baseline.fingerprint(a, "other.pt")


def test_a_rules_own_cause_wins_over_the_message():
    f = Finding(
        "eval-batch-dependence", Severity.INFO, "g.1", "g.1: 3.2x ...", {"cause": "non-BN op"}
    )
    assert baseline.cause_of(f) == "non-BN op"


@given(
    numbers=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(min_value=-(10**12), max_value=10**12),
        ),
        min_size=2,
        max_size=2,
    )
)
def test_measured_numbers_never_change_a_fingerprint(numbers):
    # the oracle: the same template with two different measurements
    template = "layer.3 (BatchNorm1d): running_var is {} where the batch gave {} - recompute it"
    first = Finding("ema-update", Severity.ERROR, "layer.3", template.format(*numbers))
    second = Finding("ema-update", Severity.ERROR, "layer.3", template.format(1.5e-7, 42))
    assert baseline.fingerprint(first) == baseline.fingerprint(second)


# ---- the file ----------------------------------------------------------------------------------
def test_file_is_sorted_versioned_json_and_round_trips(tmp_path):
    findings = [
        Finding("keras-momentum", Severity.WARNING, "z.1", "z.1 (BN): momentum = 0.9"),
        Finding("invalid-eps", Severity.ERROR, "a.1", "a.1 (BN): eps = 0"),
        Finding("invalid-eps", Severity.ERROR, "a.1", "a.1 (BN): eps = 0"),
    ]
    stored = baseline.Baseline.from_findings(findings, "m.pt")
    path = tmp_path / "b.json"
    baseline.write(stored, path)
    doc = json.loads(path.read_text())
    assert doc["bncheck_baseline"] == baseline.VERSION
    assert [(e["rule"], e["layer"], e["count"]) for e in doc["findings"]] == [
        ("invalid-eps", "a.1", 2),
        ("keras-momentum", "z.1", 1),
    ]
    assert path.read_text() == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    again = baseline.load(path)
    assert again.entries == stored.entries
    result = again.compare(findings[:2], "m.pt")
    assert len(result.known) == 2 and result.new == [] and len(result.fixed) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[]", "not a bncheck baseline"),
        ('{"bncheck_baseline": 99, "findings": []}', "format version 99"),
        ('{"bncheck_baseline": 1, "findings": [{"rule": "x"}]}', "entry 0 needs rule"),
    ],
)
def test_bad_baseline_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "b.json"
    path.write_text(text)
    code, out, err = run(capsys, "audit", "--arch", ARCH, "--baseline", str(path))
    assert code == 2 and out == "" and message in err and len(err.splitlines()) == 1


def test_missing_baseline_says_how_to_create_it(tmp_path, capsys):
    code, _, err = run(capsys, "audit", "--arch", ARCH, "--baseline", str(tmp_path / "b.json"))
    assert code == 2 and "no such file; create it with --update-baseline" in err


def test_update_baseline_needs_a_file(capsys):
    code, _, err = run(capsys, "audit", "--arch", ARCH, "--update-baseline")
    assert code == 2 and "--update-baseline needs --baseline FILE" in err


# ---- the CLI gate ------------------------------------------------------------------------------
def test_cli_fails_only_on_new_findings_and_reports_fixed_ones(tmp_path, capsys):
    path = tmp_path / "bncheck-baseline.json"
    base = ("audit", "--arch", ARCH, "--select", SELECT)
    code, _, err = run(capsys, *base, "--baseline", str(path), "--update-baseline")
    assert code == 0
    assert f"wrote 2 finding(s) of {ARCH} to the baseline {path} (2 added, 0 dropped" in err
    # the same findings: accepted, exit 0, nothing reported
    code, out, err = run(capsys, *base, "--baseline", str(path), "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["findings"] == []
    assert "2 findings in the baseline, 0 new, 0 fixed (no longer found)" in err
    assert any(n.startswith("baseline: 2 findings in the baseline") for n in doc["notes"])
    # a different measured value of the same cause is still the accepted finding
    code, out, err = run(
        capsys,
        *base,
        "--arch-arg",
        "momentum=0.95",
        "--baseline",
        str(path),
        "--fail-on",
        "warning",
    )
    assert code == 0, out
    # a new problem fails; the fixed one is counted (the baseline went stale)
    code, out, err = run(
        capsys,
        "audit",
        "--arch",
        ARCH,
        "--select",
        SELECT + ",dead-channels",
        "--arch-arg",
        "eps=1e-5",
        "--baseline",
        str(path),
        "--format",
        "json",
    )
    assert "1 finding in the baseline, 0 new, 1 fixed (no longer found)" in err
    assert code == 0


def test_one_baseline_file_serves_several_sources(tmp_path, capsys):
    path = tmp_path / "b.json"
    run(
        capsys,
        "audit",
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--baseline",
        str(path),
        "--update-baseline",
    )
    run(
        capsys,
        "audit",
        "--arch",
        "cli_factories:eps_3",
        "--select",
        "all",
        "--baseline",
        str(path),
        "--update-baseline",
    )
    sources = {e["source"] for e in json.loads(path.read_text())["findings"]}
    assert ARCH in sources  # the second update kept the first source's entries
    code, _, err = run(capsys, "audit", "--arch", ARCH, "--select", SELECT, "--baseline", str(path))
    assert code == 0 and "2 findings in the baseline, 0 new, 0 fixed" in err


def test_new_error_fails_with_a_baseline(tmp_path, capsys):
    path = tmp_path / "b.json"
    run(
        capsys,
        "audit",
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--arch-arg",
        "eps=1e-5",
        "--baseline",
        str(path),
        "--update-baseline",
    )
    code, out, err = run(
        capsys, "audit", "--arch", ARCH, "--select", SELECT, "--baseline", str(path)
    )
    assert code == 1
    assert "invalid-eps" in out and "keras-momentum" not in out  # only the new one shown
    assert "1 finding in the baseline, 1 new, 0 fixed" in err


def test_outputs_may_not_overwrite_the_baseline(tmp_path, capsys):
    path = tmp_path / "b.json"
    run(capsys, "audit", "--arch", ARCH, "--baseline", str(path), "--update-baseline")
    before = path.read_text()
    code, _, err = run(
        capsys, "audit", "--arch", ARCH, "--baseline", str(path), "--output-format", f"json={path}"
    )
    assert code == 2 and "would overwrite the baseline" in err
    assert path.read_text() == before


@pytest.mark.slow
def test_baseline_workflow_through_the_console_script(tmp_path):
    """The documented CI sequence, as a user runs it (subprocess, real entry point)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.path.dirname(__file__)])}

    def bncheck(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bncheck", "audit", "--arch", ARCH, "--select", SELECT, *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )

    first = bncheck("--baseline", "bncheck-baseline.json", "--update-baseline")
    assert first.returncode == 0, first.stderr
    gate = bncheck("--baseline", "bncheck-baseline.json", "--format", "github")
    assert gate.returncode == 0, gate.stderr
    assert "::notice title=bncheck::baseline: 2 findings in the baseline, 0 new" in gate.stdout
    assert "::error" not in gate.stdout

"""No gate passes without a check (issue 10 section 6): a report whose requested checks could
not run is not ``complete``, never ``ok``, and fails every ``fail_on`` but ``never``; the
assertion helpers, the CLI exit code and the pytest summary follow it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bncheck
from bncheck import Finding, Report
from bncheck.plugin import _summary_lines
from bncheck.testing import BNCheckFailure, assert_bn_ok


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in the head")


def test_a_report_with_a_forward_error_is_incomplete_and_not_ok() -> None:
    report = Report(forward_error="RuntimeError: boom")
    assert not report.complete and not report.ok
    assert report.incomplete == [
        "the model's forward pass failed (RuntimeError: boom), so the forward rules that read "
        "that pass did not run (skipped lists them)"
    ]
    for fail_on in ("error", "warning", "info"):
        assert report.failed(fail_on)
    assert not report.failed("never")
    assert "INCOMPLETE" in report.headline()
    assert "incomplete: the model's forward pass failed" in str(report)
    assert "**Incomplete:**" in report.to_markdown()
    (invocation,) = json.loads(report.to_sarif())["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    assert "forward pass failed" in invocation["toolExecutionNotifications"][0]["message"]["text"]
    (ok_run,) = json.loads(Report().to_sarif())["runs"][0]["invocations"]
    assert ok_run == {"executionSuccessful": True, "toolExecutionNotifications": []}


def test_complete_and_incomplete_round_trip_through_json_and_merge() -> None:
    report = Report([], forward_error="RuntimeError: boom", incomplete=["targets missing"])
    doc = json.loads(report.to_json())
    assert doc["complete"] is False and doc["forward_error"] == "RuntimeError: boom"
    again = Report.from_json(report.to_json())
    assert again.incomplete == report.incomplete and not again.ok
    merged = Report.merge([Report(), again])
    assert not merged.complete and merged.forward_error == "RuntimeError: boom"
    assert json.loads(Report().to_json())["complete"] is True


def test_a_complete_report_without_errors_is_ok() -> None:
    report = Report([Finding("bias-before-bn", "info", "bn", "bn: bias")])
    assert report.complete and report.ok and not report.failed("warning")


def test_an_audit_whose_forward_fails_is_not_ok() -> None:
    report = bncheck.audit(Broken(), torch.randn(2, 3, 4, 4))
    assert report.forward_error is not None
    assert not report.complete and not report.ok and report.failed()
    assert "normalization" in report.skipped


def test_an_audit_without_input_is_complete() -> None:
    report = bncheck.audit(nn.Sequential(nn.BatchNorm2d(3)))
    assert report.complete and report.ok
    assert "normalization" in report.skipped  # skipped for want of an input: not a failure


def test_assert_bn_ok_fails_when_the_forward_fails_whatever_fail_on() -> None:
    for fail_on in ("error", "info", "never"):
        with pytest.raises(BNCheckFailure, match=r"incomplete: the model's forward pass failed"):
            assert_bn_ok(Broken(), torch.randn(2, 3, 4, 4), fail_on=fail_on)


def test_the_pytest_summary_counts_and_names_incomplete_audits() -> None:
    record = {
        "audits": 1,
        "findings": [],
        "incomplete": ["the model's forward pass failed (RuntimeError: boom), so ..."],
    }
    lines = _summary_lines([("t::x", record), ("t::y", {"audits": 1, "findings": []})], False)
    assert lines[0] == (
        "2 audits in 2 tests: 0 error(s), 0 warning(s), 0 info, 1 incomplete (checks did not run)"
    )
    assert lines[1:] == [
        "t::x",
        "  INCOMPLETE the model's forward pass failed (RuntimeError: boom), so ...",
    ]


def test_the_fixture_audit_of_a_broken_model_is_incomplete_in_the_summary(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("""
        import torch
        from torch import nn

        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm2d(3)

            def forward(self, x):
                raise RuntimeError("boom")

        def test_audit(bncheck):
            report = bncheck.audit(Broken(), torch.randn(2, 3, 4, 4))
            assert not report.ok
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "1 audit in 1 test: 0 error(s), 0 warning(s), 0 info, 1 incomplete*",
            "*INCOMPLETE the model's forward pass failed (RuntimeError: boom)*",
        ]
    )


@pytest.mark.parametrize(("fail_on", "code"), [("error", 1), ("info", 1), ("never", 0)])
def test_the_cli_exits_1_on_an_incomplete_report(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fail_on: str,
    code: int,
) -> None:
    from bncheck import cli

    incomplete = Report(forward_error="RuntimeError: boom", source="m.pt")
    monkeypatch.setattr(cli, "audit_command", lambda *args: incomplete)
    assert cli.main(["audit", "--arch", "vgg16_bn_small", "--fail-on", fail_on]) == code
    assert "INCOMPLETE" in capsys.readouterr().out

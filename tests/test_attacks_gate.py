"""No gate passes without a check, and no raw control character reaches a terminal or a CI
log: the members of issue 10's classes found by reviewing the merged code."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import bncheck
from bncheck.annotate import to_github
from bncheck.cli import main


class ExitsInForward(nn.Module):
    def __init__(self, code: object = 0) -> None:
        super().__init__()
        self.code = code
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        sys.exit(self.code)
        return y  # pragma: no cover


@pytest.mark.parametrize("code", [0, 3, None])
def test_a_forward_that_calls_sys_exit_is_a_failed_forward_not_a_pass(code):
    model = ExitsInForward(code)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bncheck.audit(model, torch.randn(4, 3, 8, 8))
    assert not report.ok and not report.complete
    assert "SystemExit" in (report.forward_error or "")
    assert report.failed("never") is False and report.failed("error") is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class CatchesItsOwnError(nn.Module):
    """A forward that swallows an error and returns without calling any BN layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.bn(self.conv(x[:, :2]))  # wrong channel count: conv raises
        except RuntimeError:
            return x.mean()


def test_a_forward_that_reaches_no_bn_layer_is_incomplete():
    report = bncheck.audit(CatchesItsOwnError(), torch.randn(4, 3, 8, 8))
    assert not report.complete and not report.ok
    assert any("no BN layer" in reason for reason in report.incomplete)


class SkipsOneBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
        self.aux = nn.BatchNorm2d(4)  # only used in some configurations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_a_bn_layer_the_forward_never_calls_is_named_in_a_note_not_failed():
    report = bncheck.audit(SkipsOneBranch(), torch.randn(8, 3, 8, 8))
    assert report.complete
    assert any("were not called" in n and "aux" in n for n in report.notes)


def test_a_meta_model_is_never_a_complete_pass_from_python():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    report = bncheck.audit(model, torch.randn(2, 3, 8, 8))
    assert not report.complete and not report.ok
    assert any("meta device" in reason for reason in report.incomplete)


HOSTILE = "bn\x1b[2J\u202e\u2028::error::fake\x85"


def _finding_report() -> bncheck.Report:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3, bias=True))
    model.add_module(HOSTILE, nn.BatchNorm2d(4, momentum=0.99))
    return bncheck.audit(model, select=["keras-momentum"])


def test_github_annotations_show_control_characters_as_escapes():
    text = to_github(_finding_report())
    lines = text.splitlines()
    assert lines and all(line.startswith("::") for line in lines)  # no line injected
    for raw in ("\x1b", "\u202e", "\u2028", "\x85"):
        assert raw not in text
    assert "\\x1b" in text


def test_cli_error_lines_show_control_characters_in_paths(capsys, tmp_path):
    missing = tmp_path / "ckpt\x1b[2J.pt"
    assert main(["audit", str(missing), "--arch", "vgg16_bn_small"]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err
    assert len(err.strip().splitlines()) == 1

"""Which forward passes an audit runs comes from the rules' catalogue entries (``stage``).

A forward rule whose stage is missing would silently check nothing (its pass would not run):
these tests tie every forward rule to a pass and check, rule by rule, that selecting the rule
alone runs that pass and finds a planted bug.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from bn_mutants import BatchStatsInEvalBN, EvalUpdatingBN, NoUpdateBN, UnbiasedNormBN
from torch import nn
from zoo import ConvBNReLU, image_batch

import bncheck
from bncheck import probes
from bncheck.checks.catalogue import CATALOGUE, STAGES, info_for
from bncheck.engine import FORWARD_NEEDS, forward_stages

FORWARD_RULES = [info.id for info in CATALOGUE if info.needs in FORWARD_NEEDS]


def test_every_forward_rule_maps_to_a_stage() -> None:
    assert FORWARD_RULES, "no forward rule in the catalogue"
    for info in CATALOGUE:
        if info.needs in FORWARD_NEEDS:
            assert info.stage in STAGES, f"{info.id} has no audit stage"
        else:
            assert info.stage is None, f"{info.id} needs {info.needs!r} but names a stage"


def test_the_data_rules_read_the_data_stage() -> None:
    for info in CATALOGUE:
        assert (info.needs == "data") == (info.stage == "data"), info.id


def test_collect_takes_no_rule_ids() -> None:
    params = inspect.signature(probes.collect).parameters
    assert list(params) == ["ctx", "stages"]
    assert not hasattr(probes, "TRAIN_RULES") and not hasattr(probes, "EVAL_RULES")


def test_forward_stages_are_derived_from_the_selection() -> None:
    assert forward_stages(["normalization", "bn-reused"]) == {"train"}
    assert forward_stages(["eval-nondeterminism", "invalid-eps"]) == {"eval"}
    assert forward_stages(["stat-drift", "small-batch"]) == {"data", "train"}
    assert forward_stages(["keras-momentum"]) == set()


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passes an audit runs, in order (the probes' stage functions, wrapped)."""
    ran: list[str] = []
    for stage, name in (
        ("train", "_train_pass"),
        ("eval", "_eval_passes"),
        ("data", "_drift_pass"),
    ):
        original = getattr(probes, name)

        def wrapped(*args: object, _original=original, _stage=stage, **kwargs: object) -> object:
            ran.append(_stage)
            return _original(*args, **kwargs)

        monkeypatch.setattr(probes, name, wrapped)
    return ran


@pytest.mark.parametrize("rule", FORWARD_RULES)
def test_selecting_one_rule_runs_exactly_its_stage(rule: str, passes: list[str]) -> None:
    data = [image_batch(8, seed=s) for s in range(2)]
    report = bncheck.audit(ConvBNReLU(), image_batch(8), data=data, select=[rule])
    assert rule not in report.skipped
    assert set(passes) == {info_for(rule).stage}


#: One planted bug per rule read from a stage (the rules that judge a BN layer's numbers).
PLANTED = {
    "normalization": UnbiasedNormBN,
    "ema-update": NoUpdateBN,
    "eval-batch-dependence": BatchStatsInEvalBN,
    "eval-updates-stats": EvalUpdatingBN,
}


class PlantedNet(nn.Module):
    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = bn
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("rule", sorted(PLANTED))
def test_a_rule_selected_alone_finds_its_planted_bug(rule: str) -> None:
    # the bug of issue 11: a rule whose pass was not run reported nothing and skipped nothing
    report = bncheck.audit(PlantedNet(PLANTED[rule](8)), image_batch(8), select=[rule])
    assert [f.layer for f in report.findings if f.rule == rule] == ["bn"]


def test_a_failed_stage_skips_exactly_the_rules_of_that_stage() -> None:
    class TrainFails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvBNReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                raise RuntimeError("no train forward here")
            return self.net(x)

    report = bncheck.audit(TrainFails(), image_batch(8))
    train_rules = {i.id for i in CATALOGUE if i.stage == "train"}
    eval_rules = {i.id for i in CATALOGUE if i.stage == "eval"}
    assert train_rules <= set(report.skipped)
    assert not eval_rules & set(report.skipped)
    assert all("no train forward here" in report.skipped[r] for r in train_rules)

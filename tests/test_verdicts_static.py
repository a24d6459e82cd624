"""Static verdicts: momentum=0, zero-initialised gamma, track_running_stats=False."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ConvBNReLU, TwoBlock, image_batch, trained
from zoo_families import build, train_steps

import bncheck


def found(model: nn.Module, rule: str, x: torch.Tensor | None = None, **kw) -> list:
    return bncheck.audit(model, x, select=[rule], **kw).filter(rules=[rule])


# ---- momentum = 0 ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_momentum_zero_statistics_that_never_moved_are_caught(mode: str) -> None:
    model = trained(TwoBlock(), image_batch())
    model.block1[1].momentum = 0.0
    model.block1[1].reset_running_stats()
    trained(model, image_batch(seed=2))  # counts 3 forwards, statistics stay at 0 and 1
    assert int(model.block1[1].num_batches_tracked) == 3
    model.train(mode == "train")
    (f,) = found(model, "untrained-stats")
    assert f.layer == "block1.1" and f.severity == "warning"
    assert "momentum=0" in f.message and "never move" in f.message
    assert "after 3 train-mode forwards" in f.message
    assert f.details["num_batches_tracked"] == 3


def test_momentum_zero_from_construction_is_caught_before_any_training() -> None:
    (f,) = found(ConvBNReLU(momentum=0.0).train(), "untrained-stats")
    assert "momentum=0" in f.message and "num_batches_tracked" in f.details


def test_momentum_zero_on_trained_statistics_is_a_deliberate_freeze() -> None:
    model = trained(ConvBNReLU(), image_batch())
    model.bn.momentum = 0.0  # freeze the statistics for fine-tuning
    assert found(model.train(), "untrained-stats") == []
    assert found(model.eval(), "untrained-stats") == []
    assert found(model, "keras-momentum") == []


# ---- dead-channels judges learned gamma only -------------------------------------------------
def test_zero_init_residual_gamma_after_forwards_without_a_step_is_not_dead() -> None:
    """timm's zero_init_last / torchvision's zero_init_residual after one forward and no
    optimizer step: the statistics moved, gamma is still the deliberate all-zero init."""
    model = build("resnet_zero_init_residual")
    trained(model, image_batch(hw=16))
    assert int(model.layer1[0].bn2.num_batches_tracked) == 3
    assert bool((model.layer1[0].bn2.weight == 0).all())
    assert found(model, "dead-channels") == []


def test_zero_init_residual_gamma_after_training_steps_is_not_dead() -> None:
    model = build("resnet_zero_init_residual")
    train_steps(model, image_batch(hw=16))
    assert not bool((model.layer1[0].bn2.weight == 0).any())
    assert found(model, "dead-channels") == []


def test_learned_zero_gamma_next_to_live_channels_is_still_dead() -> None:
    model = build("resnet_zero_init_residual")
    train_steps(model, image_batch(hw=16))
    with torch.no_grad():
        model.layer1[0].bn2.weight[[1, 3]] = 0.0
    (f,) = found(model, "dead-channels")
    assert f.layer == "layer1.0.bn2" and "channels 1, 3" in f.message


def test_a_whole_layer_collapsed_near_zero_by_training_is_dead() -> None:
    model = trained(ConvBNReLU(), image_batch())
    with torch.no_grad():
        model.bn.weight.fill_(1e-8)  # learned (not exactly zero): e.g. weight decay
    (f,) = found(model, "dead-channels")
    assert f.details["count"] == 8


# ---- track_running_stats=False: one finding --------------------------------------------------
class BN1dHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8, track_running_stats=False)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_track_running_stats_false_gives_one_warning_and_no_error(mode: str) -> None:
    torch.manual_seed(0)
    model = BN1dHead().train(mode == "train")
    report = bncheck.audit(model, torch.randn(32, 6))
    assert report.ok
    assert [(f.rule, f.layer) for f in report.findings] == [("no-running-stats", "bn")]
    assert "eval-batch-dependence" in report.settings["rules"]


def test_statistics_at_initial_values_after_counted_forwards_are_not_called_untrained() -> None:
    """The counter is evidence of training even when the statistics read 0 and 1 again (a
    reset of the statistics alone, then a checkpoint); only a layer whose counter is 0 too
    is reported, and the judgement is per layer."""
    model = trained(TwoBlock(), image_batch())
    for bn in (model.block1[1], model.block2[1]):
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    model.block1[1].num_batches_tracked.fill_(0)
    model.block2[1].num_batches_tracked.fill_(7)
    (f,) = found(model.eval(), "untrained-stats")
    assert f.layer == "block1.1"


class _AuxHeadNet(nn.Module):
    """An auxiliary head that runs in training only (GoogLeNet / Inception style)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training:
            return y + self.aux(y)
        return y


class _ReadInEval(nn.Module):
    """Reads its BN's statistics without calling it in eval: both (a conv-BN folded for
    speed), or only the variance (a scale)."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads = reads
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training:
            return self.bn(y)
        scale = torch.rsqrt(self.bn.running_var + self.bn.eps)[:, None, None]
        if self.reads == "variance":
            return y * scale
        mean = self.bn.running_mean[:, None, None]
        return (y - mean) * scale * self.bn.weight[:, None, None] + self.bn.bias[:, None, None]


def test_initial_statistics_of_a_head_eval_never_uses_are_noted_not_reported() -> None:
    """GoogLeNet with aux_logits and pretrained weights: the auxiliary heads keep their
    initial statistics, and eval never runs them. Moving those statistics changes no eval
    output, so inference does not normalise with them: a note, not a warning. The audit
    leaves their buffers bit for bit as they were."""
    model = trained(_AuxHeadNet(), image_batch())
    model.aux[1].reset_running_stats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bncheck.audit(model.eval(), image_batch())
    assert not [f for f in report.findings if f.rule in ("untrained-stats", "eval-updates-stats")]
    assert any("aux.1" in note and "not used by the eval forward" in note for note in report.notes)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("reads", ["mean and variance", "variance"])
def test_initial_statistics_read_without_a_call_are_still_reported(reads: str) -> None:
    """A layer eval does not call but whose statistics it reads (both, or the variance
    alone) changes the outputs when they move: still reported."""
    report = bncheck.audit(_ReadInEval(reads).eval(), image_batch())
    assert [f.layer for f in report.findings if f.rule == "untrained-stats"] != []

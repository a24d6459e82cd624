"""The Monitor's rules: a training-loop mutant for each, and its correct twin.

Every mutant must produce its rule's finding, naming the layer and the step where the problem
started; every twin must produce none of the training-run findings.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import MLPBN, ConvBNReLU, TwoBlock, image_batch

import bncheck
from bncheck.checks.registry import resolve_tolerances
from bncheck.checks.training import (
    C_EVAL,
    C_MINBATCH,
    C_MINSAMPLES,
    C_NOGRAD,
    C_TRAIN,
    COUNT_COLUMNS,
    S_MOVED,
    S_UPDATES,
    STAT_COLUMNS,
    step_conditions,
)

RUN_RULES = {
    "frozen-bn-drift",
    "stats-not-updating",
    "stats-updated-without-grad",
    "multiple-updates-per-step",
    "nonfinite-stats",
    "small-batch",
    "stat-drift",
}


def batches(n: int, size: int = 8, hw: int = 8, seed: int = 0, classes: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, hw, hw, generator=gen),
            torch.randint(0, classes, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def run_findings(report: bncheck.Report) -> list[bncheck.Finding]:
    return [f for f in report.findings if f.rule in RUN_RULES]


def only(report: bncheck.Report, rule: str) -> list[bncheck.Finding]:
    return [f for f in report.findings if f.rule == rule]


# ---- frozen-bn-drift ------------------------------------------------------------------------
def frozen_backbone_loop(reapply_eval: bool) -> bncheck.Report:
    torch.manual_seed(0)
    model = TwoBlock()
    for p in model.block1.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for epoch in range(2):
            model.train()
            if reapply_eval:
                model.block1.eval()
            for x, y in batches(3, seed=epoch):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    return monitor.report()


def test_frozen_backbone_bn_in_train_mode_drifts():
    report = frozen_backbone_loop(reapply_eval=False)
    [finding] = only(report, "frozen-bn-drift")
    assert finding.layer == "block1.1"
    assert finding.details["step"] == 1
    assert finding.details["steps_affected"] == 6
    assert "requires_grad=False" in finding.message and "step 1" in finding.message
    assert finding.severity is bncheck.Severity.ERROR
    assert not report.ok


def test_frozen_backbone_with_eval_reapplied_is_clean():
    report = frozen_backbone_loop(reapply_eval=True)
    assert run_findings(report) == []


def test_bn_params_missing_from_optimizer_count_as_frozen():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(list(model.conv.parameters()) + list(model.fc.parameters()), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    [finding] = only(monitor.report(), "frozen-bn-drift")
    assert "no optimizer param group" in finding.message


# ---- stats-updated-without-grad -------------------------------------------------------------
def validation_loop(val_mode: str, grad_context=torch.no_grad) -> bncheck.Report:
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train, val = batches(4, seed=1), batches(2, seed=2)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(2):
            model.train()
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            if val_mode == "eval":
                model.eval()
            with grad_context():
                for x, _ in val:
                    model(x)
    return monitor.report()


def test_validation_in_train_mode_under_no_grad_is_found():
    report = validation_loop("train")
    [finding] = only(report, "stats-updated-without-grad")
    assert finding.layer == "bn"
    assert finding.details["step"] == 5  # the validation ran after optimizer step 4
    assert finding.details["updates_without_grad"] == 2
    assert "torch.no_grad()" in finding.message
    # the validation forwards are not counted as extra training updates
    assert only(report, "multiple-updates-per-step") == []


def test_validation_in_train_mode_under_inference_mode_is_found():
    report = validation_loop("train", torch.inference_mode)
    [finding] = only(report, "stats-updated-without-grad")
    assert "inference_mode" in finding.message


def test_validation_in_eval_mode_is_clean():
    report = validation_loop("eval")
    assert run_findings(report) == []


# ---- stats-not-updating ---------------------------------------------------------------------
def eval_left_on_loop(call_train: bool) -> bncheck.Report:
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for epoch in range(3):
            if call_train:
                model.train()
            for x, y in batches(2, seed=epoch):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                model(image_batch(4))
    return monitor.report()


def test_training_that_never_returns_to_train_mode_is_found():
    report = eval_left_on_loop(call_train=False)
    [finding] = only(report, "stats-not-updating")
    assert finding.layer == "bn"
    assert finding.details["step"] == 3  # epoch 1's first optimizer step
    assert finding.details["steps_affected"] == 4
    assert "eval mode" in finding.message and "step 3" in finding.message


def test_training_that_calls_train_after_validation_is_clean():
    assert run_findings(eval_left_on_loop(call_train=True)) == []


# ---- multiple-updates-per-step --------------------------------------------------------------
def accumulation_loop(micro_batches: int) -> bncheck.Report:
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(3 * micro_batches)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for i, (x, y) in enumerate(data):
            (F.cross_entropy(model(x), y) / micro_batches).backward()
            if (i + 1) % micro_batches == 0:
                opt.step()
                opt.zero_grad()
    return monitor.report()


def test_gradient_accumulation_of_four_micro_batches_is_found():
    report = accumulation_loop(4)
    [finding] = only(report, "multiple-updates-per-step")
    assert finding.details["updates"] == 4
    assert finding.details["step"] == 1 and finding.details["steps_affected"] == 3
    assert "4 running-statistics updates per optimizer step" in finding.message


def test_plain_steps_are_clean():
    assert run_findings(accumulation_loop(1)) == []


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(checkpoint(self.block, x, use_reentrant=False).mean((2, 3)))


def test_activation_checkpoint_recomputation_is_found():
    torch.manual_seed(0)
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    [finding] = only(monitor.report(), "multiple-updates-per-step")
    assert finding.layer == "block.1" and finding.details["updates"] == 2


# ---- nonfinite-stats ------------------------------------------------------------------------
def test_nan_in_a_batch_is_reported_at_its_step():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(5)
    data[2][0][0, 0, 0, 0] = float("nan")
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    report = monitor.report()
    found = only(report, "nonfinite-stats")
    assert [f.layer for f in found] == ["block1.1", "block2.1"]
    assert all(f.details["step"] == 3 for f in found)
    assert "step 3" in found[0].message and "NaN/Inf" in found[0].message
    assert found[0].details["channels"] >= 1
    # the end-of-run buffer check is folded in, not reported a second time
    assert "running_mean" in found[0].details["at_end"]


def test_finite_batches_give_no_nonfinite_finding():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert run_findings(monitor.report()) == []


# ---- small-batch ----------------------------------------------------------------------------
@pytest.mark.parametrize("size, expected", [(2, True), (8, False)])
def test_small_real_batches(size, expected):
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(3, size=size):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    found = only(monitor.report(), "small-batch")
    assert bool(found) is expected
    if expected:
        assert found[0].details["batch_size"] == 2 and found[0].details["step"] == 1
        assert "small-batch" not in monitor.report().skipped


def test_small_batch_counts_values_per_channel():
    torch.manual_seed(0)
    model = MLPBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            opt.zero_grad()
            x = torch.randn(16, 6, generator=gen)
            F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=gen)).backward()
            opt.step()
    [finding] = only(monitor.report(), "small-batch")
    assert finding.details["samples_per_channel"] == 16
    # BN on (N, C): no feature maps to blame, the batch is the count
    assert "the batch is large enough" not in finding.message
    assert "one value per sample and channel" in finding.message
    assert "batches of 32 or more" in finding.message


def test_a_batch_too_small_for_every_layer_is_one_finding():
    """As the audit: one model-wide finding for the batch, not one per layer (a detector at
    2 images a GPU would get one per BN layer)."""
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(3, size=4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    [finding] = only(monitor.report(), "small-batch")
    assert finding.layer is None
    assert finding.details["layers"] == ["block1.1", "block2.1"]
    assert finding.details["batch_size"] == 4 and finding.details["step"] == 1
    assert "batches of 4 sample(s) in 2 BN layers" in finding.message


class _Detector(nn.Module):
    """A backbone (two BN2d) and a head of two BN1d that sees 3 samples of each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.h1, self.hb1 = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.h2, self.hb2 = nn.Linear(8, 8), nn.BatchNorm1d(8)

    head_samples = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x)))))).mean((2, 3))
        f = f[: self.head_samples]
        return self.hb2(self.h2(F.relu(self.hb1(self.h1(f)))))


def test_layers_with_other_small_batches_at_other_steps_are_not_merged():
    # the backbone sees 32 samples but 4 at each epoch's last batch, the head 3 every step:
    # two findings, each with its own hint, not one for all four layers
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = _Detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for n in ([32] * 9 + [4]) * 2:
            model(torch.randn(n, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    found = sorted(only(monitor.report(), "small-batch"), key=lambda f: f.details["batch_size"])
    assert [f.details["layers"] for f in found] == [["hb1", "hb2"], ["b1", "b2"]]
    assert [f.details["steps_affected"] for f in found] == [20, 2]
    assert "one value per sample and channel" in found[0].message
    assert "drop_last=True" in found[1].message and "drop_last" not in found[0].message


def test_layers_on_n_c_features_are_grouped_apart_for_their_own_hint():
    # one batch of 4 for all four layers, every step: the two BN2d and the two BN1d on (N, C)
    # get one finding each, each with its hint
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = _Detector()
    model.head_samples = 4
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
    found = {tuple(f.details["layers"]): f for f in only(monitor.report(), "small-batch")}
    assert set(found) == {("b1", "b2"), ("hb1", "hb2")}
    assert "one value per sample and channel" in found["hb1", "hb2"].message
    assert "one value per sample and channel" not in found["b1", "b2"].message


# ---- stat-drift -----------------------------------------------------------------------------
def drift_loop(
    momentum: float,
    *,
    steps: int = 40,
    size: int = 8,
    scale: float = 3.0,
    shift: float = 5.0,
    lr: float = 0.01,
    counted: int = 0,
) -> bncheck.Report:
    """Train ConvBNReLU at ``momentum`` on batches ``x * scale + shift``; ``counted``: the
    layer's counter at the start (statistics loaded from a run that long)."""
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=momentum)
    model.bn.num_batches_tracked.fill_(counted)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(steps, size=size):
            opt.zero_grad()
            F.cross_entropy(model(x * scale + shift), y).backward()
            opt.step()
    return monitor.report()


def test_a_run_that_ends_before_its_average_warms_up_is_a_warning():
    # momentum 0.001: after 40 updates 96% of the starting values (0 and 1) remain, so the
    # batches (mean 5, var 9) are far from the average to the last step: the model leaves
    # training with statistics near their start
    [finding] = only(drift_loop(0.001), "stat-drift")
    assert finding.details["step"] == 31  # judged after the 30-update warm-up
    assert finding.details["drift_z"] > 0.5
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["starting_share"] > 0.9
    assert "follows the data after about 3000 updates, more than the run gave it" in (
        finding.message
    )


def test_a_young_average_at_yolos_momentum_on_fixed_weights_is_not_a_lag():
    # momentum 0.03 (YOLO's), weights fixed, i.i.d. batches: the statistics need about 100
    # updates to forget their starting values; the drift seen before that is no warning
    report = drift_loop(0.03, steps=100, size=16, scale=0.5, shift=0.0, lr=0.0)
    assert [f for f in report.findings if f.severity is not bncheck.Severity.INFO] == []
    [finding] = only(report, "stat-drift")
    assert finding.severity is bncheck.Severity.INFO
    assert "expected early in training" in finding.message
    assert finding.details["last_step"] < 100
    assert finding.details["starting_share"] >= math.exp(-3)


@pytest.mark.parametrize("counted", [0, 1, 1000])
def test_loaded_statistics_far_from_the_data_are_a_warm_up_whatever_their_counter(counted):
    # statistics (mean 0, var 1) far from the batches (mean 5, var 9) at momentum 0.01, as
    # loaded from another run with a counter of 0, 1 or 1000: the batches agree with the
    # average once the share of the values it started from is taken out, and the drift
    # ends before the run does (one verdict, whatever the counter the checkpoint held)
    [finding] = only(drift_loop(0.01, counted=counted), "stat-drift")
    assert finding.severity is bncheck.Severity.INFO
    assert finding.details["step"] == (31 if counted == 0 else 1 if counted == 1000 else 30)
    assert finding.details["last_step"] < 40
    assert "expected early in training" in finding.message
    assert finding.details["starting_share"] > 0.6  # 0.99 ** 36, about 0.7


def test_loaded_statistics_still_far_at_the_last_step_are_a_warning():
    # the same statistics, counter 1000, and a run that ends while they still drift
    [finding] = only(drift_loop(0.01, counted=1000, steps=20), "stat-drift")
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["last_step"] == 20
    assert "the values they started from are far from the data" in finding.message
    assert "too slowly for the run" in finding.message


def test_converged_running_statistics_do_not_drift():
    assert only(drift_loop(0.1), "stat-drift") == []


def test_starting_values_far_from_the_data_are_a_warm_up_not_a_lag():
    # batches of variance about 3e-4 against a running_var that starts at 1, momentum 0.1,
    # fixed weights: after the 30-update warm-up 4% of the starting values are left, 0.04
    # against 3e-4, so the variance ratio stays over 2 until about update 70. The share of
    # the starting values explains all of it; the old rule (share >= 5%) called it a lag
    report = drift_loop(0.1, steps=100, scale=0.03, shift=0.0, lr=0.0)
    assert [f for f in report.findings if f.severity is not bncheck.Severity.INFO] == []
    [finding] = only(report, "stat-drift")
    assert finding.severity is bncheck.Severity.INFO
    assert finding.details["starting_share"] < math.exp(-3)
    assert finding.details["unexplained_steps"] == 0
    assert finding.details["last_step"] < 100
    assert "the values they started from are far from the data" in finding.message
    assert "expected early in training" in finding.message


def test_far_starting_values_left_at_the_last_step_are_a_warning():
    # the same run stopped at 60 steps: the average still drifts at the last step, so eval
    # mode would normalise with statistics near their start
    [finding] = only(drift_loop(0.1, steps=60, scale=0.03, shift=0.0, lr=0.0), "stat-drift")
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["last_step"] == 60
    assert "too slowly for the run" in finding.message
    assert "update_bn" in finding.message


def test_a_shift_after_the_warm_up_is_still_a_lag():
    # statistics that match the data by the end of the warm-up, then inputs shifted from
    # step 31 on: what the average lags is the new data, not its starting values
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for step, (x, y) in enumerate(batches(45, size=8), start=1):
            opt.zero_grad()
            F.cross_entropy(model(x if step <= 30 else x + 20), y).backward()
            opt.step()
    [finding] = only(monitor.report(), "stat-drift")
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["step"] == 31
    assert "lag the data" in finding.message
    assert "starting_share" not in finding.details


def far_start_loop(steps: int, monitor: bncheck.Monitor | None = None, **kw):
    """Train ConvBNReLU (momentum 0.1, lr 0) on batches ``x * 0.03`` (variance about 3e-4,
    against a running_var that starts at 1); ``before(step, model)`` runs before each step,
    ``inputs(step, x)`` changes the batch. Returns the monitor, detached."""
    before, inputs = kw.get("before"), kw.get("inputs", lambda step, x: x)
    model, opt = kw.get("model"), kw.get("opt")
    if model is None:
        torch.manual_seed(0)
        model = ConvBNReLU(momentum=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = monitor or bncheck.Monitor(model, optimizer=opt)
    with monitor:
        for step, (x, y) in enumerate(batches(steps, size=8), start=kw.get("start", 1)):
            if before is not None:
                before(step, model)
            opt.zero_grad()
            F.cross_entropy(model(inputs(step, x * 0.03)), y).backward()
            opt.step()
    return monitor


def test_a_momentum_changed_after_the_monitor_was_built_is_read_at_each_step():
    # a BN momentum schedule sets bn.momentum during the run: the batch statistics are
    # recovered with the momentum each update used, as when it was set before the Monitor
    def monitored(change_after: bool) -> bncheck.Monitor:
        torch.manual_seed(0)
        model = ConvBNReLU(momentum=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        if not change_after:
            model.bn.momentum = 0.03
        monitor = bncheck.Monitor(model, optimizer=opt)
        model.bn.momentum = 0.03
        return far_start_loop(100, monitor, model=model, opt=opt)

    later, before = monitored(True), monitored(False)
    np.testing.assert_allclose(later.history["batch_var"], before.history["batch_var"], rtol=1e-9)
    [finding] = only(later.report(), "stat-drift")
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.message == only(before.report(), "stat-drift")[0].message


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_a_momentum_held_as_a_numpy_or_tensor_number_is_read_as_that_number(kind):
    # a momentum read from a config as numpy.float32, or kept as a one-element tensor,
    # updates the statistics as the float would: the Monitor reads it so
    def monitored(momentum: object) -> bncheck.Monitor:
        torch.manual_seed(0)
        model = ConvBNReLU(momentum=0.1)
        model.bn.momentum = momentum
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return far_start_loop(60, model=model, opt=opt)

    number = np.float32(0.1) if kind == "numpy" else torch.tensor(0.1)
    held, plain = monitored(number), monitored(float(np.float32(0.1)))
    assert held.history["batch_var"].notna().all()
    np.testing.assert_allclose(held.history["batch_var"], plain.history["batch_var"], rtol=1e-9)
    assert [f.message for f in only(held.report(), "stat-drift")] == [
        f.message for f in only(plain.report(), "stat-drift")
    ]


def test_setting_number_reads_settings_as_torch_uses_them():
    from bncheck.discovery import setting_number

    assert setting_number(True) == 1.0  # torch runs momentum=True as 1
    assert setting_number(np.float32(0.5)) == 0.5
    assert setting_number(torch.tensor(0.25, requires_grad=True)) == 0.25
    assert setting_number(torch.tensor([0.1, 0.2])) is None
    assert setting_number("0.1") is None and setting_number(None) is None


def test_a_reset_mid_run_starts_a_new_warm_up():
    # reset_running_stats() at step 41: the counter goes back to 0 and the statistics to
    # their starting values, whose share explains the drift after it as at the start
    def reset(step, model):
        if step == 41:
            model.bn.reset_running_stats()

    [finding] = only(far_start_loop(150, before=reset).report(), "stat-drift")
    assert finding.severity is bncheck.Severity.INFO
    assert finding.details["unexplained_steps"] == 0


def test_a_reset_while_detached_starts_a_new_warm_up():
    # loaded statistics (mean 0.5, var 2), five steps, detached, reset, attached again
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.bn.running_mean.fill_(0.5)
    model.bn.running_var.fill_(2.0)
    monitor = far_start_loop(5, model=model, opt=opt)
    model.bn.reset_running_stats()
    far_start_loop(105, monitor, model=model, opt=opt, start=6)
    [finding] = only(monitor.report(), "stat-drift")
    assert finding.severity is bncheck.Severity.INFO
    assert finding.details["unexplained_steps"] == 0


def test_a_run_that_ends_on_drift_its_start_does_not_explain_is_a_lag():
    # the far start's warm-up (steps 31-79), then batches shifted by about 20 standard
    # deviations from step 120 on and back at 170: the drift after the shift back lasts to
    # the last step and is a lag of the data, not of the values the average started from
    def shifted(step, x):
        return x + 0.6 if 120 <= step < 170 else x

    [finding] = only(far_start_loop(200, inputs=shifted).report(), "stat-drift")
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["last_step"] == 200
    assert "lag the data" in finding.message


@pytest.mark.parametrize(("remaining", "severity"), [(14, "warning"), (0, "info")])
def test_drift_its_start_explains_on_few_of_its_steps_is_a_lag(remaining, severity):
    # 15 drifting steps of 30 judged, a start share of 1% at the last of them (a OneCycle
    # peak's lag): when the start explains 1 of the 15, the drift is a lag, not the warm-up;
    # when it explains all of them, the warm-up
    from bncheck.checks.training import Episode, RunObservations, StatDrift
    from bncheck.engine import prepare

    ctx = prepare(ConvBNReLU(momentum=0.1))
    run = RunObservations(["bn"], ["BatchNorm2d"], "optimizer", steps=60)
    run.drift_judged = np.array([30])
    ep = Episode(
        "stat-drift",
        0,
        31,
        45,
        15,
        {"drift_z": 1.0, "drift_var_ratio": 1.5},
        peak=44.0,
        remaining=remaining,
        last={"start_share": 0.01, "explained": remaining == 0},
    )
    said = StatDrift.says(ctx, run, ep)
    assert said is not None
    assert (said.severity or "warning") == severity
    assert ("lag the data" in said.hint) == (severity == "warning")


@pytest.mark.parametrize("shift", [False, True])
def test_warn_mode_warns_stat_drift_at_detach_as_the_report_judges_it(shift):
    # the far start's warm-up looks like drift to the end of the run at every step of it:
    # warned mid-run, it would be a warning the report does not keep. The shift's lag is
    # warned, once, when the Monitor detaches
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = bncheck.Monitor(model, optimizer=opt, warn=True)
    during: list[str] = []

    def shifted(step, x):
        return x + 0.6 if shift and 120 <= step < 170 else x

    def watch(step, model):
        during.extend(str(w.message) for w in caught if "[stat-drift]" in str(w.message))
        caught.clear()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        far_start_loop(
            200 if shift else 100, monitor, model=model, opt=opt, before=watch, inputs=shifted
        )
        at_detach = [str(w.message) for w in caught if "[stat-drift]" in str(w.message)]
    assert during == []
    report = monitor.report()
    kept = [f for f in only(report, "stat-drift") if f.severity is not bncheck.Severity.INFO]
    assert len(at_detach) == len(kept) == (1 if shift else 0)


@settings(max_examples=8, deadline=None)
@given(momentum=st.floats(0.05, 0.5), scale=st.floats(0.1, 10.0), seed=st.integers(0, 99))
def test_start_drift_columns_match_a_bias_corrected_average(momentum, scale, seed):
    # oracle: the batches' per-channel mean and unbiased variance computed here from the
    # (fixed) conv's output, their exponential average normalised by the weight it gave
    # the batches (1 - (1 - m)^k), and the drift of each batch against it. The Monitor
    # recovers a batch's statistics from float32 buffers, to about 1e-3 at these scales
    torch.manual_seed(seed)
    model = ConvBNReLU(momentum=momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data = batches(12, size=8, seed=seed)
    seen = []
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in data:
            x = x * scale
            with torch.no_grad():
                h = model.conv(x).double()
            seen.append((h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    hist = monitor.history.set_index("step")
    eps = model.bn.eps
    for k in range(2, len(data) + 1):  # step k: k - 1 batches in the average before it
        w = [momentum * (1 - momentum) ** (k - 2 - j) for j in range(k - 1)]
        mean = sum(wj * seen[j][0] for j, wj in enumerate(w)) / sum(w)
        var = sum(wj * seen[j][1] for j, wj in enumerate(w)) / sum(w)
        bm, bv = seen[k - 1]
        z = ((bm - mean).abs() / (bv + eps).sqrt()).mean().item()
        r = (bv + eps) / (var + eps)
        vr = torch.maximum(r, 1 / r).mean().item()
        row = hist.loc[k]
        assert row["start_drift_z"] == pytest.approx(z, rel=2e-3, abs=1e-4)
        assert row["start_drift_var_ratio"] == pytest.approx(vr, rel=2e-3)


# ---- without an optimizer -------------------------------------------------------------------
def test_without_optimizer_steps_are_train_forwards_with_grad():
    torch.manual_seed(0)
    model = ConvBNReLU()
    with bncheck.Monitor(model) as monitor:
        for x, _ in batches(3):
            model(x).sum().backward()
            with torch.no_grad():
                model(x)  # validation in train mode: not a step, but an update without grad
    assert monitor.steps == 3
    report = monitor.report()
    [finding] = only(report, "stats-updated-without-grad")
    assert finding.details["step"] == 2
    assert any("without an optimizer a step is" in n for n in report.notes)


# ---- the rule conditions as pure functions, against an oracle written here -----------------
def oracle_multiple_updates(updates, nograd, has_counter, train_calls, tracks):
    out = np.zeros(updates.shape, dtype=bool)
    for s in range(updates.shape[0]):
        for layer in range(updates.shape[1]):
            if not tracks[layer]:
                continue
            # a counter that grew less than the train-mode calls was reset (a recalibration):
            # the train-mode calls with grad are counted from the hooks instead
            reset = has_counter[layer] and updates[s, layer] < train_calls[s, layer]
            total = updates[s, layer] if has_counter[layer] and not reset else train_calls[s, layer]
            # a counter moved with no train-mode call of the layer, while other layers'
            # calls were seen in that step, was written outside any forward (an EMA copy)
            written = train_calls[s, layer] == 0 and train_calls[s].sum() > 0
            out[s, layer] = total - nograd[s, layer] >= 2 and not written
    return out


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_multiple_updates_condition_matches_oracle(data):
    n_steps = data.draw(st.integers(1, 6))
    n_layers = data.draw(st.integers(1, 4))
    ints = st.integers(0, 5)
    updates = np.array(
        data.draw(
            st.lists(
                st.lists(ints, min_size=n_layers, max_size=n_layers),
                min_size=n_steps,
                max_size=n_steps,
            )
        ),
        dtype=float,
    )
    nograd = np.array(
        data.draw(
            st.lists(
                st.lists(ints, min_size=n_layers, max_size=n_layers),
                min_size=n_steps,
                max_size=n_steps,
            )
        )
    )
    train_calls = nograd + np.array(
        data.draw(
            st.lists(
                st.lists(ints, min_size=n_layers, max_size=n_layers),
                min_size=n_steps,
                max_size=n_steps,
            )
        )
    )
    has_counter = np.array(data.draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers)))
    tracks = np.array(data.draw(st.lists(st.booleans(), min_size=n_layers, max_size=n_layers)))
    stats = np.zeros((n_steps, n_layers, len(STAT_COLUMNS)))
    stats[..., S_UPDATES] = np.where(has_counter[None, :], updates, np.nan)
    stats[..., S_MOVED] = 1.0
    counts = np.zeros((n_steps, n_layers, len(COUNT_COLUMNS)), dtype=np.int64)
    counts[..., C_TRAIN] = train_calls
    counts[..., C_NOGRAD] = nograd
    counts[..., C_MINBATCH] = counts[..., C_MINSAMPLES] = 100
    flags = np.zeros((n_steps, n_layers), dtype=bool)
    got = step_conditions(
        stats,
        counts,
        flags,
        flags,
        resolve_tolerances(),
        tracks_stats=tracks,
        drift_warmup=np.zeros(n_layers),
    )
    expected = oracle_multiple_updates(updates, nograd, has_counter, train_calls, tracks)
    np.testing.assert_array_equal(got["multiple-updates-per-step"], expected)


def test_stats_not_updating_needs_trainable_eval_only_and_no_update():
    stats = np.zeros((4, 1, len(STAT_COLUMNS)))
    counts = np.zeros((4, 1, len(COUNT_COLUMNS)), dtype=np.int64)
    counts[:, 0, C_EVAL] = 1
    counts[2, 0, C_TRAIN] = 1  # step 2 ran in train mode: no problem there
    stats[3, 0, S_UPDATES] = 1  # step 3 updated (e.g. called elsewhere in train mode)
    trainable = np.array([[True], [False], [True], [True]])
    got = step_conditions(
        stats,
        counts,
        trainable,
        ~trainable,
        resolve_tolerances(),
        tracks_stats=np.array([True]),
        drift_warmup=np.zeros(1),
    )
    assert got["stats-not-updating"][:, 0].tolist() == [True, False, False, False]


def test_validation_after_the_last_step_is_judged_at_detach():
    """A final validation pass in train mode (after the last optimizer step) is still caught,
    and a correct final validation in eval mode is not mistaken for training in eval mode."""

    def run(buggy: bool) -> bncheck.Report:
        torch.manual_seed(0)
        model = TwoBlock()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with bncheck.Monitor(model, optimizer=opt) as monitor:
            model.train()
            for _ in range(3):
                loss = model(torch.randn(8, 3, 6, 6)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            if not buggy:
                model.eval()
            with torch.no_grad():
                model(torch.randn(8, 3, 6, 6))
        assert monitor.steps == 3
        return monitor.report()

    buggy = run(buggy=True)
    found = buggy.filter(rules=["stats-updated-without-grad"])
    assert [f.layer for f in found] == ["block1.1", "block2.1"]
    assert "after the last optimizer step (3)" in found[0].message
    assert run(buggy=False).findings == []


def _amp_run(
    pass_scaler: bool,
    accumulate: int = 1,
    skip: tuple[int, ...] = (2, 5),
    growth_interval: int = 2000,
    iterations: int = 8,
) -> bncheck.Report:
    """A mixed-precision loop whose GradScaler skips the iterations in ``skip`` (inf grads)."""
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", growth_interval=growth_interval)
    iteration = {"n": 0}
    model.head.weight.register_hook(lambda g: g * float("inf") if iteration["n"] in skip else g)
    with bncheck.Monitor(model, optimizer=opt, scaler=scaler if pass_scaler else None) as mon:
        for i in range(iterations):
            iteration["n"] = i
            for _ in range(accumulate):
                scaler.scale(model(torch.randn(8, 3, 6, 6)).square().mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    return mon.report()


def test_steps_a_grad_scaler_skips_are_not_extra_updates_when_the_scaler_is_given():
    without = _amp_run(pass_scaler=False).filter(rules=["multiple-updates-per-step"])
    assert [f.details["step"] for f in without][:1] == [3]  # the skipped iteration's update
    assert "pass scaler= to the Monitor" in without[0].message
    assert _amp_run(pass_scaler=True).findings == []


def test_accumulation_is_still_caught_with_a_grad_scaler():
    found = _amp_run(pass_scaler=True, accumulate=2).filter(rules=["multiple-updates-per-step"])
    assert [f.layer for f in found] == ["block1.1", "block2.1"]
    assert found[0].details["step"] == 1


def test_scaler_must_be_a_grad_scaler():
    with pytest.raises(bncheck.UsageError, match="needs a torch.amp.GradScaler, got int"):
        bncheck.Monitor(TwoBlock(), scaler=3)


def test_grad_scaler_skips_before_the_first_step_are_seen():
    # mixed-precision runs often skip their first iterations while the scale settles
    assert _amp_run(pass_scaler=True, skip=(0, 1, 4)).findings == []


def test_a_grad_scaler_skip_right_after_its_scale_grew_is_seen():
    # the steady state of a long AMP run: the scale grows (every growth_interval steps) and
    # the next iteration overflows; x2 then x0.5 leave the scale where it was, and only the
    # growth tracker tells the skip from a step that ran
    for skip in ((3,), (3, 7), (3, 4)):
        report = _amp_run(pass_scaler=True, skip=skip, growth_interval=3, iterations=10)
        assert report.findings == [], (skip, report.findings)

"""The rules that read only the model, its buffers and the optimizer: each bug and its twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ConvBNReLU, FrozenBN2d, TwoBlock, image_batch, trained

import bncheck


def found(model: nn.Module, rule: str, x: torch.Tensor | None = None, **kw) -> list:
    return bncheck.audit(model, x, select=[rule], **kw).filter(rules=[rule])


# ---- keras-momentum -------------------------------------------------------------------
def test_keras_momentum_is_flagged_with_the_pytorch_value_to_use():
    (f,) = found(ConvBNReLU(momentum=0.99), "keras-momentum")
    assert f.severity == "warning" and f.layer == "bn"
    assert "momentum = 0.99 > 0.5" in f.message and "use momentum=0.01" in f.message
    assert f.details["suggested"] == pytest.approx(0.01)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, None])
def test_pytorch_momentum_values_are_not_flagged(momentum):
    assert found(ConvBNReLU(momentum=momentum), "keras-momentum") == []


def test_momentum_limit_is_a_tolerance():
    assert found(ConvBNReLU(momentum=0.4), "keras-momentum", momentum_max=0.3)


# ---- invalid-eps ----------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_invalid_eps_is_an_error(eps):
    (f,) = found(ConvBNReLU(eps=eps), "invalid-eps")
    assert f.severity == "error" and "expected a finite value > 0" in f.message


def test_valid_eps_is_not_flagged():
    assert found(ConvBNReLU(eps=1e-3), "invalid-eps") == []


def test_static_rules_still_run_when_the_forward_raises():
    model = ConvBNReLU(eps=0.0)  # PyTorch's train-mode forward raises for eps = 0
    report = bncheck.audit(model, image_batch())
    assert "invalid-eps" in report.rules_found()
    assert "forward pass failed" in report.skipped["normalization"]
    assert "eps must be positive" in report.skipped["normalization"]


# ---- no-running-stats -----------------------------------------------------------------
def test_no_running_stats_is_flagged():
    (f,) = found(ConvBNReLU(track_running_stats=False), "no-running-stats")
    assert "eval mode normalises with the statistics of each eval batch" in f.message


def test_running_stats_switched_off_after_construction_gets_its_own_message():
    model = ConvBNReLU()
    model.bn.track_running_stats = False
    (f,) = found(model, "no-running-stats")
    assert "set to False after construction" in f.message


def test_tracking_layer_and_frozen_lookalike_are_not_flagged():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), FrozenBN2d(4))
    assert found(model, "no-running-stats") == []


# ---- frozen-bn-in-train-mode ----------------------------------------------------------
def test_frozen_params_in_train_mode_are_flagged():
    model = ConvBNReLU().train()
    model.bn.requires_grad_(False)
    (f,) = found(model, "frozen-bn-in-train-mode")
    assert "requires_grad=False" in f.message and "still rewrites" in f.message


def test_params_missing_from_the_optimizer_count_as_frozen():
    model = ConvBNReLU().train()
    opt = torch.optim.SGD([model.conv.weight, *model.fc.parameters()], lr=0.1)
    (f,) = found(model, "frozen-bn-in-train-mode", optimizer=opt)
    assert "in no optimizer param group" in f.message


def test_frozen_by_design_is_not_flagged():
    eval_frozen = ConvBNReLU().train()
    eval_frozen.bn.requires_grad_(False)
    eval_frozen.bn.eval()
    assert found(eval_frozen, "frozen-bn-in-train-mode") == []
    frozen_lookalike = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBN2d(4)).train()
    assert found(frozen_lookalike, "frozen-bn-in-train-mode") == []
    trainable = ConvBNReLU().train()
    opt = torch.optim.SGD(trainable.parameters(), lr=0.1)
    assert found(trainable, "frozen-bn-in-train-mode", optimizer=opt) == []


def test_a_frozen_copy_beside_a_trained_one_is_a_warning():
    """A frozen teacher of the same architecture beside its student, both in train mode (a
    distillation bug), and a MoCo key encoder beside its query encoder (intended) look the
    same in the model alone: both are warnings. The Monitor tells them apart during training
    (the key encoder's gamma/beta move without the optimizer)."""
    model = nn.ModuleDict({"student": TwoBlock(), "teacher": TwoBlock()}).train()
    model["teacher"].requires_grad_(False)
    findings = found(model, "frozen-bn-in-train-mode")
    assert {f.layer for f in findings} == {"teacher.block1.1", "teacher.block2.1"}
    assert all(f.severity == "warning" for f in findings)


# ---- nonfinite-stats / negative-running-var / tiny-running-var ------------------------
def test_nonfinite_statistics_name_the_tensor_and_channels():
    model = trained(ConvBNReLU(), image_batch())
    model.bn.running_mean[2] = float("nan")
    with torch.no_grad():
        model.bn.weight[5] = float("inf")
    (f,) = found(model, "nonfinite-stats")
    assert f.severity == "error"
    assert "running_mean (channel 2)" in f.message and "weight (channel 5)" in f.message
    assert f.details["running_mean"] == [2]


def test_finite_statistics_are_not_flagged():
    assert found(trained(ConvBNReLU(), image_batch()), "nonfinite-stats") == []


def test_negative_running_var_is_an_error():
    model = trained(ConvBNReLU(), image_batch())
    model.bn.running_var[[1, 3]] = -0.5
    (f,) = found(model, "negative-running-var")
    assert "channels 1, 3" in f.message and f.details["min"] == -0.5
    assert found(trained(ConvBNReLU(), image_batch()), "negative-running-var") == []


def test_tiny_running_var_is_a_warning_and_positive_var_is_not():
    model = trained(ConvBNReLU(eps=1e-3), image_batch())
    model.bn.running_var[4] = 5e-4
    (f,) = found(model, "tiny-running-var")
    assert f.severity == "warning" and "channel 4" in f.message and f.details["count"] == 1
    model.bn.running_var[4] = 2e-3
    assert found(model, "tiny-running-var") == []


# ---- untrained-stats ------------------------------------------------------------------
def test_initial_statistics_in_eval_mode_are_flagged_model_wide():
    (f,) = found(TwoBlock().eval(), "untrained-stats")
    assert f.layer is None and "all 2 BN layers" in f.message
    assert f.details["layers"] == ["block1.1", "block2.1"]


def test_initial_statistics_next_to_trained_affine_are_flagged_per_layer():
    model = trained(TwoBlock(), image_batch())
    model.block2[1].reset_running_stats()
    with torch.no_grad():
        model.block2[1].weight.mul_(1.5)
    (f,) = found(model, "untrained-stats")
    assert f.layer == "block2.1" and "in eval mode next to trained gamma/beta" in f.message


def test_fresh_model_in_train_mode_is_not_flagged():
    assert found(TwoBlock().train(), "untrained-stats") == []
    zero_init = TwoBlock().train()
    nn.init.zeros_(zero_init.block2[1].weight)  # zero_init_residual: gamma moved, no training
    assert found(zero_init, "untrained-stats") == []
    assert found(zero_init, "dead-channels") == []
    assert found(trained(TwoBlock(), image_batch()), "untrained-stats") == []


# ---- dead-channels --------------------------------------------------------------------
def test_zero_gamma_in_a_trained_layer_is_flagged():
    model = trained(ConvBNReLU(), image_batch())
    with torch.no_grad():
        model.bn.weight[[0, 6]] = 0.0
    (f,) = found(model, "dead-channels")
    assert f.severity == "info" and "channels 0, 6" in f.message and f.details["count"] == 2


def test_zero_init_gamma_in_a_never_trained_model_is_not_a_dead_channel():
    model = ConvBNReLU()
    nn.init.zeros_(model.bn.weight)  # zero_init_residual
    assert found(model.train(), "dead-channels") == []
    assert found(model.eval(), "dead-channels") == []


# ---- weight-decay-on-bn ---------------------------------------------------------------
def test_weight_decay_on_bn_params_is_flagged():
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    # one finding for the layers of one param group (the model's every BN layer, with
    # optimizer(model.parameters(), weight_decay=wd)), naming them
    [finding] = found(model, "weight-decay-on-bn", optimizer=opt)
    assert finding.layer is None
    assert finding.details["layers"] == ["block1.1", "block2.1"]
    assert (
        "gamma and beta of 2 BN layers (block1.1, block2.1) are in param group 0 with "
        "weight_decay=0.0001" in finding.message
    )


def test_weight_decay_on_bn_is_one_finding_per_param_group():
    # gamma and beta of block1 decayed in group 0, block2's gamma alone in group 1
    model = TwoBlock()
    b2 = model.block2[1]
    rest = [p for p in model.parameters() if p is not b2.weight and p is not b2.bias]
    opt = torch.optim.SGD(
        [{"params": rest, "weight_decay": 1e-4}, {"params": [b2.weight], "weight_decay": 5e-4}],
        lr=0.1,
    )
    findings = found(model, "weight-decay-on-bn", optimizer=opt)
    assert [(f.layer, f.details["group"], f.details["params"]) for f in findings] == [
        ("block1.1", 0, ["weight", "bias"]),
        ("block2.1", 1, ["weight"]),
    ]
    assert "gamma is in param group 1 with weight_decay=0.0005" in findings[1].message


def test_bn_params_in_a_no_decay_group_are_not_flagged():
    model = TwoBlock()
    bn_params = [
        p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()
    ]
    ids = {id(p) for p in bn_params}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW(
        [{"params": rest, "weight_decay": 0.05}, {"params": bn_params, "weight_decay": 0.0}],
        lr=1e-3,
    )
    assert found(model, "weight-decay-on-bn", optimizer=opt) == []


def test_optimizer_rules_are_skipped_without_an_optimizer():
    report = bncheck.audit(TwoBlock(), select=["weight-decay-on-bn"])
    assert report.skipped == {
        "weight-decay-on-bn": "needs an optimizer (audit(..., optimizer=opt))"
    }


# ---- selection and tolerances ---------------------------------------------------------
def test_unknown_rule_ids_and_tolerances_suggest_the_closest():
    with pytest.raises(bncheck.UsageError, match="did you mean 'ema-update'"):
        bncheck.audit(TwoBlock(), select=["ema-updates"])
    with pytest.raises(bncheck.UsageError, match="did you mean 'keras-momentum'"):
        bncheck.audit(TwoBlock(), ignore="keras-momentun")
    with pytest.raises(bncheck.UsageError, match="did you mean 'momentum_max'"):
        bncheck.audit(TwoBlock(), momentum_maxx=0.4)
    with pytest.raises(bncheck.UsageError, match="must be a number"):
        bncheck.audit(TwoBlock(), momentum_max="high")


def test_ignore_removes_a_rule_and_select_accepts_comma_strings():
    model = ConvBNReLU(momentum=0.99, eps=0.0)
    assert bncheck.audit(model, ignore="keras-momentum").rules_found() == {"invalid-eps"}
    both = bncheck.audit(model, select="keras-momentum, invalid-eps")
    assert both.rules_found() == {"keras-momentum", "invalid-eps"}


# ---- untrained-stats on FrozenBatchNorm-style layers ----------------------------------------
def test_frozen_lookalikes_at_identity_are_told_to_load_their_statistics():
    """FrozenBatchNorm2d never updates its statistics (a detector built with
    weights_backbone=None): the fix is loading them, not training or update_bn."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), FrozenBN2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), FrozenBN2d(4)
    ).eval()
    (f,) = found(model, "untrained-stats")
    assert f.layer is None and "(mean 0, var 1)" in f.message
    assert "num_batches_tracked" not in f.message
    assert "load them with the pretrained weights" in f.message
    assert "update_bn" not in f.message
    (one,) = found(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN2d(4)).eval(), "untrained-stats")
    assert one.layer == "1" and "load them with the pretrained weights" in one.message

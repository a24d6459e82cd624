"""bncheck.testing: assertions usable without fixtures.

Tests of the assertions about forward rules are marked ``needs_rules``: they are skipped until
the forward rules (bncheck/checks/forward.py) are implemented, then run.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ConvBNReLU, TwoBlock, image_batch, trained

from bncheck import testing
from bncheck.checks.registry import get_rule
from bncheck.errors import UsageError
from bncheck.report import Report
from bncheck.testing import BNCheckFailure, assert_bn_ok


def needs_rules(*rule_ids: str) -> pytest.MarkDecorator:
    missing = [r for r in rule_ids if get_rule(r).check is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"rules not implemented yet: {', '.join(missing)}"
    )


def conv_bn(**bn_kwargs: object) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU())


# ---- assert_bn_ok -----------------------------------------------------------------------------
def test_assert_bn_ok_returns_the_report_of_a_good_model() -> None:
    report = assert_bn_ok(conv_bn())
    assert isinstance(report, Report) and report.ok


def test_assert_bn_ok_failure_is_an_assertion_error_with_the_table() -> None:
    with pytest.raises(AssertionError, match="invalid-eps") as info:
        assert_bn_ok(conv_bn(eps=0.0))
    failure = info.value
    assert isinstance(failure, BNCheckFailure)
    text = str(failure)
    assert text.splitlines()[0] == "assert_bn_ok: 1 finding at or above fail_on='error'"
    header = text.splitlines()[2].split()
    assert header == ["severity", "rule", "layer", "message"]
    assert "1 (BatchNorm2d): eps = 0.0, expected a finite value > 0" in " ".join(text.split())
    assert failure.report is not None and failure.report.rules_found() == {"invalid-eps"}


def test_fail_on_decides_which_severities_fail() -> None:
    keras = conv_bn(momentum=0.9)
    assert_bn_ok(keras)  # a warning does not fail at fail_on="error"
    with pytest.raises(BNCheckFailure, match="keras-momentum"):
        assert_bn_ok(keras, fail_on="warning")
    assert_bn_ok(conv_bn(eps=0.0), fail_on="never")
    with pytest.raises(BNCheckFailure, match=r"\(\+1 finding below fail_on\)"):
        assert_bn_ok(conv_bn(eps=0.0, momentum=0.9))


def test_select_ignore_and_tolerances_pass_through() -> None:
    keras = conv_bn(momentum=0.9)
    assert_bn_ok(keras, fail_on="warning", ignore="keras-momentum")
    assert_bn_ok(keras, fail_on="warning", momentum_max=0.95)
    assert_bn_ok(conv_bn(eps=0.0), select=["keras-momentum"])


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"fail_on must be one of .*did you mean 'warning'"):
        assert_bn_ok(conv_bn(), fail_on="warnings")
    with pytest.raises(UsageError, match=r"unknown tolerance 'momentum_mx'"):
        assert_bn_ok(conv_bn(), momentum_mx=1)
    with pytest.raises(UsageError, match=r"unknown rule id 'keras'"):
        testing.assert_rules_ok(conv_bn(), None, "keras")


def test_assert_bn_ok_leaves_model_and_rng_alone() -> None:
    model = trained(ConvBNReLU(), image_batch())
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with pytest.raises(BNCheckFailure):
        assert_bn_ok(model, image_batch(), fail_on="info", momentum_max=0.0)
    assert model.training and model.bn.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


# ---- per-invariant assertions: static rules ---------------------------------------------------
def test_assert_pytorch_momentum() -> None:
    testing.assert_pytorch_momentum(conv_bn(momentum=0.1))
    with pytest.raises(
        BNCheckFailure,
        match=r"(?s)assert_pytorch_momentum: 1 finding.*"
        r"keras-momentum",
    ):
        testing.assert_pytorch_momentum(conv_bn(momentum=0.99))


def test_assert_valid_eps() -> None:
    testing.assert_valid_eps(conv_bn())
    with pytest.raises(BNCheckFailure, match="invalid-eps"):
        testing.assert_valid_eps(conv_bn(eps=float("nan")))


def test_assert_finite_stats() -> None:
    model = conv_bn()
    testing.assert_finite_stats(model)
    model[1].running_var[2] = -1.0
    with pytest.raises(BNCheckFailure, match="negative-running-var"):
        testing.assert_finite_stats(model)
    model[1].running_var[2] = float("inf")
    with pytest.raises(BNCheckFailure, match="nonfinite-stats"):
        testing.assert_finite_stats(model)


def test_assert_trained_stats_fails_on_a_fresh_model_in_eval_mode() -> None:
    testing.assert_trained_stats(trained(ConvBNReLU(), image_batch()))
    with pytest.raises(BNCheckFailure, match="untrained-stats"):
        testing.assert_trained_stats(ConvBNReLU().eval())


def test_assert_no_weight_decay_on_bn() -> None:
    model = ConvBNReLU()
    bn_params = list(model.bn.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("bn.")]
    good = torch.optim.SGD(
        [{"params": others, "weight_decay": 1e-4}, {"params": bn_params, "weight_decay": 0.0}],
        lr=0.1,
    )
    testing.assert_no_weight_decay_on_bn(model, good)
    bad = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    with pytest.raises(BNCheckFailure, match="weight-decay-on-bn"):
        testing.assert_no_weight_decay_on_bn(model, bad)


# ---- a rule that could not run fails with the reason ------------------------------------------
def test_a_skipped_rule_fails_with_the_reason_instead_of_passing() -> None:
    with torch.device("meta"):
        model = conv_bn()
    with pytest.raises(
        BNCheckFailure,
        match=r"assert_trained_stats could not check "
        r"'untrained-stats': needs the model's parameters",
    ):
        testing.assert_trained_stats(model)


def test_forward_invariant_without_input_fails_with_the_reason() -> None:
    with pytest.raises(
        BNCheckFailure,
        match=r"assert_normalizes could not check "
        r"'normalization': needs an example input",
    ):
        testing.assert_normalizes(conv_bn(), None)


def test_forward_invariant_on_uninitialised_lazy_layers_fails_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.LazyBatchNorm2d())
    with pytest.raises(
        BNCheckFailure,
        match=r"assert_ema_updates could not check "
        r"'ema-update': the model has uninitialised lazy",
    ):
        testing.assert_ema_updates(model, image_batch())


def test_small_batch_reports_every_skipped_rule() -> None:
    with pytest.raises(
        BNCheckFailure,
        match=r"'single-value-per-channel': needs an example "
        r"input.*; 'small-batch': needs a batch the user",
    ):
        testing.assert_no_small_batch(conv_bn(), None)


# ---- per-invariant assertions: forward rules (run once those rules exist) ---------------------
class UnbiasedNormBN(nn.BatchNorm2d):
    """Normalises with the unbiased variance in train mode (the `normalization` rule's bug),
    written with plain tensor ops; its running statistics follow PyTorch's update."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var, self.momentum)
        y = (x - mean.reshape(1, -1, 1, 1)) / torch.sqrt(var.reshape(1, -1, 1, 1) + self.eps)
        return y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class NoUpdateBN(nn.BatchNorm2d):
    """Uses batch statistics in train mode but never updates its running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        return super().forward(x)


class EvalBatchStatsBN(nn.BatchNorm2d):
    """Uses batch statistics in eval mode too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class EvalUpdatesBN(nn.BatchNorm2d):
    """Updates its running statistics in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            F.batch_norm(x, self.running_mean, self.running_var, None, None, True, 0.5, self.eps)
        return super().forward(x)


def with_bn(bn: nn.Module, c: int = 8) -> nn.Module:
    model = ConvBNReLU(c=c)
    model.bn = bn
    return model


GOOD = trained(TwoBlock(), image_batch(16))


@needs_rules("normalization")
def test_assert_normalizes() -> None:
    testing.assert_normalizes(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="normalization"):
        testing.assert_normalizes(with_bn(UnbiasedNormBN(8)), image_batch(4, hw=2))


@needs_rules("ema-update")
def test_assert_ema_updates() -> None:
    testing.assert_ema_updates(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="ema-update"):
        testing.assert_ema_updates(with_bn(NoUpdateBN(8)), image_batch(16))


@needs_rules("eval-batch-dependence")
def test_assert_eval_batch_independent() -> None:
    testing.assert_eval_batch_independent(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="eval-batch-dependence"):
        testing.assert_eval_batch_independent(with_bn(EvalBatchStatsBN(8)).eval(), image_batch(16))


@needs_rules("eval-updates-stats")
def test_assert_eval_keeps_stats() -> None:
    testing.assert_eval_keeps_stats(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="eval-updates-stats"):
        testing.assert_eval_keeps_stats(with_bn(EvalUpdatesBN(8)).eval(), image_batch(16))


class NoisyEval(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.bn(self.conv(x)), p=0.5, training=True)  # dropout always on


@needs_rules("eval-nondeterminism")
def test_assert_eval_deterministic() -> None:
    testing.assert_eval_deterministic(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="eval-nondeterminism"):
        testing.assert_eval_deterministic(trained(NoisyEval(), image_batch(16)), image_batch(16))


@needs_rules("bn-after-activation")
def test_assert_bn_before_activation() -> None:
    testing.assert_bn_before_activation(GOOD, image_batch(16))
    after = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(8))
    with pytest.raises(BNCheckFailure, match="bn-after-activation"):
        testing.assert_bn_before_activation(after, image_batch(16))


@needs_rules("small-batch")
def test_assert_no_small_batch() -> None:
    testing.assert_no_small_batch(GOOD, image_batch(16))
    with pytest.raises(BNCheckFailure, match="small-batch"):
        testing.assert_no_small_batch(GOOD, image_batch(2, hw=2))


def test_check_conformance_is_re_exported() -> None:
    from bncheck.conformance import check_conformance

    assert testing.check_conformance is check_conformance
    with pytest.raises(AttributeError, match="has no attribute 'assert_everything'"):
        testing.assert_everything  # noqa: B018


def test_assert_bn_ok_fails_when_only_the_train_forward_failed():
    """eps=0 makes PyTorch's train-mode forward raise: with invalid-eps ignored, nothing else
    explains it, and the assertion must not pass without the forward checks."""
    with pytest.raises(testing.BNCheckFailure, match="forward pass failed .*eps must be positive"):
        testing.assert_bn_ok(ConvBNReLU(eps=0.0), image_batch(), ignore=["invalid-eps"])

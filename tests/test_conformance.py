"""check_conformance: PyTorch's BN passes, hand-written layers with known bugs fail, with the
smallest case hypothesis finds and a diagnosis; the numpy oracle matches torch in float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from bncheck.conformance import (
    ConformanceFailure,
    ReferenceBatchNorm,
    conformance_cases,
    supported_spatial_ranks,
)
from bncheck.errors import UsageError
from bncheck.strategies import BNConfig, bn_configs, make_input
from bncheck.testing import BNCheckFailure, check_conformance


class HandBN(nn.Module):
    """BatchNorm for any layout, written out by hand; ``bug`` switches one known mistake on."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bug: str = "",
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.track_running_stats, self.bug = track_running_stats, bug
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.weight = self.bias = None
        if track_running_stats:
            initial_var = torch.zeros if bug == "zero-init-var" else torch.ones
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", initial_var(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        batch_mean = x.mean(dims)
        var_biased = x.var(dims, unbiased=False)
        var_unbiased = x.var(dims, unbiased=True) if x.numel() > x.shape[1] else var_biased
        if self.training or self.running_mean is None or self.bug == "eval-batch":
            mean = batch_mean
            norm_var = var_unbiased if self.bug == "unbiased-norm" else var_biased
        else:
            mean, norm_var = self.running_mean.clone(), self.running_var.clone()
        update = self.running_mean is not None and (self.training or self.bug == "eval-update")
        if update:
            with torch.no_grad():
                if self.bug != "no-counter":
                    self.num_batches_tracked += 1
                count = max(1.0, float(self.num_batches_tracked))
                if self.momentum is None:
                    f = 0.1 if self.bug == "none-as-0.1" else 1.0 / count
                else:
                    f = self.momentum
                if self.bug == "keras":
                    f = 1.0 - f
                stored_var = var_biased if self.bug == "biased-store" else var_unbiased
                self.running_mean.mul_(1 - f).add_(f * batch_mean)
                self.running_var.mul_(1 - f).add_(f * stored_var)
        y = (x - mean.reshape(shape)) / torch.sqrt(norm_var.reshape(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def hand_bn(bug: str = ""):  # type: ignore[no-untyped-def]
    def factory(num_features: int, **kwargs: object) -> HandBN:
        return HandBN(num_features, bug=bug, **kwargs)  # type: ignore[arg-type]

    return factory


@pytest.mark.parametrize("layer", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d])
def test_pytorch_batchnorm_conforms(layer: type[nn.Module]) -> None:
    check_conformance(layer)


def test_a_correct_hand_written_bn_conforms_in_every_layout() -> None:
    assert supported_spatial_ranks(hand_bn(), None) == (0, 1, 2, 3)
    check_conformance(hand_bn())


@pytest.mark.parametrize(
    ("bug", "diagnosis"),
    [
        ("biased-store", r"running_var: .* it matches storing the biased batch variance"),
        ("keras", r"running_(mean|var): .* it matches the Keras convention"),
        ("eval-batch", r"\(eval, .*output: .* it matches normalising with the batch statistics"),
        ("unbiased-norm", r"output: .* it matches normalising with the unbiased variance"),
        ("no-counter", r"num_batches_tracked = 0, expected 1"),
        ("none-as-0.1", r"momentum=None.*it matches momentum=0.1"),
        ("eval-update", r"\(eval, .* an eval-mode forward changed it"),
        (
            "zero-init-var",
            r"after construction: running_var: .* PyTorch starts running "
            r"statistics at mean 0, variance 1",
        ),
    ],
)
def test_a_known_bug_fails_with_its_diagnosis(bug: str, diagnosis: str) -> None:
    with pytest.raises(ConformanceFailure, match=diagnosis):
        check_conformance(hand_bn(bug), dims=2)


def test_failure_is_the_minimal_example_and_an_assertion_error() -> None:
    with pytest.raises(AssertionError) as info:
        check_conformance(hand_bn("biased-store"), dims=2)
    assert isinstance(info.value, BNCheckFailure)
    message = str(info.value)
    # shrunk: one channel, no affine, one train step on the smallest 2-value input
    assert message.startswith("check_conformance: HandBN(1, eps=1e-05, ")
    assert "affine=False, track_running_stats=True" in message
    assert "at step 1 of 1 (train, input (2, 1, 1, 1))" in message
    assert "n = 2" in message


def test_caller_rng_and_threads_are_left_alone_even_on_failure() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    before = (
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
        torch.get_num_threads(),
    )
    check_conformance(nn.BatchNorm2d, max_examples=10)
    with pytest.raises(ConformanceFailure, match="Keras convention"):
        check_conformance(hand_bn("keras"), dims=1, max_examples=20)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert random.getstate() == before[2]
    assert torch.get_num_threads() == before[3]


@pytest.mark.parametrize(
    ("layer", "ranks"),
    [(nn.BatchNorm1d, (0, 1)), (nn.BatchNorm2d, (2,)), (nn.BatchNorm3d, (3,))],
)
def test_layouts_are_inferred_from_the_layer(
    layer: type[nn.Module], ranks: tuple[int, ...]
) -> None:
    assert supported_spatial_ranks(layer, None) == ranks


def test_dims_argument_selects_layouts() -> None:
    assert supported_spatial_ranks(hand_bn(), 1) == (0, 1)
    assert supported_spatial_ranks(hand_bn(), (2, 3)) == (2, 3)
    with pytest.raises(UsageError, match=r"dims must be 1, 2, 3 or a sequence of them"):
        check_conformance(hand_bn(), dims=4)


class Refuses(nn.Module):
    def __init__(self, num_features: int, **kwargs: object) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("nope")


def test_a_layer_that_accepts_no_layout_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"the layer accepted none of the inputs"):
        check_conformance(Refuses)


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match=r"max_examples must be >= 1, got 0"):
        check_conformance(nn.BatchNorm2d, max_examples=0)
    with pytest.raises(UsageError, match=r"max_steps must be >= 1, got 0"):
        check_conformance(nn.BatchNorm2d, max_steps=0)


class TrackedOnlyBN(HandBN):
    """Supports only track_running_stats=True and a numeric momentum."""

    def __init__(self, num_features: int, **kwargs: object) -> None:
        if kwargs.get("momentum") is None or not kwargs.get("track_running_stats"):
            raise TypeError("unsupported configuration")
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]


def test_configs_restrict_what_is_drawn() -> None:
    # behaviour changed (issue 12): the layer's own exception becomes a ConformanceFailure
    # naming the configuration, the exception and the configs= restriction that avoids it
    with pytest.raises(ConformanceFailure, match="unsupported configuration") as info:
        check_conformance(TrackedOnlyBN, max_examples=30)
    message = str(info.value)
    assert "raised TypeError: unsupported configuration at construction" in message
    assert "configs=bncheck.strategies.bn_configs(" in message
    check_conformance(
        TrackedOnlyBN,
        max_examples=30,
        configs=bn_configs(track_running_stats=True, allow_momentum_none=False),
    )


# ---- the oracle -------------------------------------------------------------------------------
def test_oracle_by_hand_on_two_values() -> None:
    config = BNConfig(1, eps=0.0, momentum=0.1)
    ref = ReferenceBatchNorm(config)
    x = np.array([[1.0], [3.0]])  # mean 2, biased var 1, unbiased var 2
    assert np.allclose(ref.forward(x, training=True), [[-1.0], [1.0]])
    assert np.allclose(ref.running_mean, [0.2]) and np.allclose(ref.running_var, [1.1])
    assert ref.num_batches_tracked == 1
    assert np.allclose(ref.forward(x, training=False), (x - 0.2) / np.sqrt(1.1))
    assert ref.num_batches_tracked == 1
    cma = ReferenceBatchNorm(BNConfig(1, eps=0.0, momentum=None))
    cma.forward(x, training=True)
    cma.forward(x + 2, training=True)  # cumulative average of means 2 and 4, variances 2 and 2
    assert np.allclose(cma.running_mean, [3.0]) and np.allclose(cma.running_var, [2.0])
    untracked = ReferenceBatchNorm(BNConfig(1, eps=0.0, track_running_stats=False))
    assert np.allclose(untracked.forward(x, training=False), [[-1.0], [1.0]])
    assert untracked.running_mean is None


_TORCH_BN = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@settings(max_examples=60, deadline=None, database=None)
@given(case=conformance_cases())
def test_oracle_matches_torch_batchnorm_in_float64(case) -> None:  # type: ignore[no-untyped-def]
    cfg = case.config
    layer = _TORCH_BN[len(case.spatial)](cfg.num_features, **cfg.kwargs).double()
    weight = bias = None
    if cfg.affine:
        generator = torch.Generator().manual_seed(case.param_seed)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(cfg.num_features, generator=generator))
            layer.bias.copy_(torch.randn(cfg.num_features, generator=generator))
        weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    ref = ReferenceBatchNorm(cfg, weight, bias)
    for step in case.steps:
        x = make_input(
            case.input_shape(step),
            step.seed,
            scale=step.scale,
            shift=step.shift,
            dtype=torch.float64,
        )
        layer.train(step.training)
        with torch.no_grad():
            out = layer(x).numpy()
        assert np.allclose(ref.forward(x.numpy(), step.training), out, rtol=1e-9, atol=1e-9)
        if cfg.track_running_stats:
            assert np.allclose(ref.running_mean, layer.running_mean.numpy(), rtol=1e-9, atol=1e-12)
            assert np.allclose(ref.running_var, layer.running_var.numpy(), rtol=1e-9, atol=1e-12)
            assert ref.num_batches_tracked == int(layer.num_batches_tracked)


def test_failure_text_has_the_falsifying_example_and_no_harness_frames(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile("""
        from torch import nn
        from bncheck.testing import check_conformance

        class NoEvalBN(nn.BatchNorm1d):
            def forward(self, x):
                self.train()  # forces batch statistics, even in eval mode
                return super().forward(x)

        def test_layer():
            check_conformance(NoEvalBN, max_examples=30)
    """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            # defined in bncheck.errors, shown under its public home bncheck.testing
            "E       bncheck.testing.ConformanceFailure: check_conformance: NoEvalBN(1, *",
            # hypothesis words it "Falsifying example:" or, since 6.16x, "Failing test case:"
            "E       Fa*: conforms(",
            "test_failure_text_has_the_falsifying_example_and_no_harness_frames.py:*: "
            "ConformanceFailure",
        ]
    )
    result.stdout.no_fnmatch_line("*bncheck/conformance.py*")


class NoCounterWithoutTracking(nn.BatchNorm2d):
    """Reads num_batches_tracked, which is None with track_running_stats=False."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_batches_tracked.add_(0)
        return super().forward(x)


def test_a_layer_raising_for_an_accepted_configuration_is_a_conformance_failure() -> None:
    with pytest.raises(ConformanceFailure) as info:
        check_conformance(NoCounterWithoutTracking, dims=2, max_examples=30)
    message = str(info.value)
    assert "track_running_stats=False) raised AttributeError" in message
    assert "at step 1 of" in message
    # only the setting that makes it fail is suggested
    assert "configs=bncheck.strategies.bn_configs(track_running_stats=True)" in message
    check_conformance(
        NoCounterWithoutTracking,
        dims=2,
        max_examples=20,
        configs=bn_configs(track_running_stats=True),
    )

"""Frozen BN + activation in one module (timm's FrozenBatchNormAct2d) is not a `normalization`
error in train mode; layers that should batch-normalise and do not are still caught.

The layers are built by hand (no timm): every tensor a buffer, no ``num_batches_tracked``,
normalising with the running statistics, then an elementwise activation in the same forward.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck

ACTS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu-inplace": lambda: nn.ReLU(inplace=True),
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "hardswish": nn.Hardswish,
}


def _stats(module: nn.Module, c: int, seed: int, *, params: bool = False) -> None:
    """Trained-looking gamma/beta and running statistics: buffers, or parameters and a
    counter (``params``)."""
    g = torch.Generator().manual_seed(seed)
    weight = 0.5 + torch.rand(c, generator=g)
    bias = 0.3 * torch.randn(c, generator=g)
    if params:
        module.weight = nn.Parameter(weight)
        module.bias = nn.Parameter(bias)
        module.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        module.momentum = 0.1
    else:
        module.register_buffer("weight", weight)
        module.register_buffer("bias", bias)
    module.register_buffer("running_mean", 0.2 * torch.randn(c, generator=g))
    module.register_buffer("running_var", 0.5 + torch.rand(c, generator=g))


class FrozenBNAct(nn.Module):
    """timm's FrozenBatchNormAct2d: the frozen affine map in its own arithmetic, then an
    activation module."""

    def __init__(self, c: int, act: nn.Module, eps: float = 1e-5, seed: int = 0) -> None:
        super().__init__()
        self.eps = eps
        _stats(self, c, seed)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return self.act(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


class FrozenBNActOp(nn.Module):
    """The same through ``F.batch_norm(training=False)``, then a functional activation."""

    def __init__(self, c: int, act: Callable[[torch.Tensor], torch.Tensor], seed: int = 0):
        super().__init__()
        self.eps = 1e-5
        _stats(self, c, seed)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return self.act(y)


class RunningStatsBNAct(nn.Module):
    """Should batch-normalise in train mode (trainable gamma/beta, a counter) but normalises
    with its running statistics, then ReLU: a bug."""

    def __init__(self, c: int, seed: int = 0) -> None:
        super().__init__()
        self.eps = 1e-5
        _stats(self, c, seed, params=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return F.relu(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))


class RunningStatsBNActSubclass(nn.BatchNorm2d):
    """An nn.BatchNorm2d subclass whose forward normalises with the running statistics in
    train mode (``training=False`` passed to F.batch_norm), then ReLU: a bug."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return F.relu(y)


class BufferBatchNormAct(nn.Module):
    """FrozenBatchNorm's signature (buffers only, no counter) but it batch-normalises, with
    the unbiased variance (a bug), and never touches its running buffers; then ReLU."""

    def __init__(self, c: int, seed: int = 0) -> None:
        super().__init__()
        self.eps = 1e-5
        _stats(self, c, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True)
        var = x.var((0, 2, 3), keepdim=True)  # BUG: unbiased
        y = (x - mean) / (var + self.eps).sqrt()
        return F.relu(y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1))


def _model(norm: nn.Module, c: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c, 3, bias=False), norm, nn.Conv2d(c, 4, 1)).train()


def _batch(n: int = 8, hw: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(1))


def _rules(report: bncheck.Report, severity: str | None = None) -> list[str]:
    return [f.rule for f in report.findings if severity is None or f.severity == severity]


# ---- frozen BN + activation: clean --------------------------------------------------------
@pytest.mark.parametrize("act", sorted(ACTS))
def test_frozen_bn_act_is_not_a_normalization_error(act: str) -> None:
    report = bncheck.audit(_model(FrozenBNAct(8, ACTS[act]())), _batch())
    assert "normalization" not in _rules(report)
    assert _rules(report, "error") == []


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("c", "n", "hw"), [(4, 16, 6), (16, 8, 10), (64, 2, 8)])
def test_frozen_bn_act_clean_across_shapes(seed: int, c: int, n: int, hw: int) -> None:
    norm = FrozenBNAct(c, nn.SiLU(), seed=seed)
    report = bncheck.audit(_model(norm, c), _batch(n, hw))
    assert _rules(report, "error") == []


def test_frozen_bn_act_in_a_deeper_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        FrozenBNAct(16, nn.ReLU(inplace=True), seed=1),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        FrozenBNAct(16, nn.SiLU(), seed=2),
        nn.Conv2d(16, 32, 3, stride=2, bias=False),
        FrozenBNAct(32, nn.GELU(), seed=3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).train()
    report = bncheck.audit(model, _batch(8, 16))
    assert _rules(report, "error") == []


@pytest.mark.parametrize("act", [F.relu, F.silu])
def test_frozen_bn_act_through_batch_norm_op_is_clean(
    act: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    report = bncheck.audit(_model(FrozenBNActOp(8, act)), _batch())
    assert "normalization" not in _rules(report)
    assert _rules(report, "error") == []


# ---- negative controls: still caught / still clean -----------------------------------------
def test_running_stats_in_train_with_params_and_counter_still_caught() -> None:
    report = bncheck.audit(_model(RunningStatsBNAct(8)), _batch())
    assert "normalization" in _rules(report, "error")
    assert "ema-update" in _rules(report, "error")


def test_batchnorm_subclass_using_running_stats_in_train_still_caught() -> None:
    norm = RunningStatsBNActSubclass(8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.running_mean.copy_(0.2 * torch.randn(8, generator=g))
        norm.running_var.copy_(0.5 + torch.rand(8, generator=g))
    report = bncheck.audit(_model(norm), _batch())
    assert "normalization" in _rules(report, "error")


@pytest.mark.parametrize("c", [1, 4, 16])
def test_frozen_signature_layer_that_batch_normalises_wrongly_still_caught(c: int) -> None:
    report = bncheck.audit(_model(BufferBatchNormAct(c), c), _batch(16, 8))
    assert "normalization" in _rules(report, "error")


@pytest.mark.parametrize("c", [1, 4])
def test_batch_normalising_layer_close_to_its_running_stats_still_caught(c: int) -> None:
    # the input is already standardised and the layer's statistics are 0 and 1: batch and
    # running statistics differ by sampling noise only, within one channel indistinguishable
    # from a frozen map, so a single channel is not taken as frozen
    norm = BufferBatchNormAct(c)
    with torch.no_grad():
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            getattr(norm, name).fill_(value)
        norm.running_var.fill_(1.0)
    x = torch.randn(16, c, 8, 8, generator=torch.Generator().manual_seed(2))
    report = bncheck.audit(nn.Sequential(norm).train(), x)
    assert "normalization" in _rules(report, "error")


def test_plain_batchnorm_relu_model_stays_clean() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).train()
    report = bncheck.audit(model, _batch())
    assert _rules(report, "error") == []
    assert "normalization" not in _rules(report)


class AffineAfterOp(nn.Module):
    """A BN that calls ``F.batch_norm`` without gamma/beta and applies its own afterwards
    (as conditional BN applies gains from an embedding): the op's output is the normalised
    tensor before any affine step, whatever parameters the module holds."""

    def __init__(self, c: int, act: Callable[[], nn.Module] = nn.Identity) -> None:
        super().__init__()
        self.eps, self.momentum = 1e-5, 0.1
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        g = torch.Generator().manual_seed(5)
        self.weight = nn.Parameter(0.5 + torch.rand(c, generator=g))
        self.bias = nn.Parameter(0.3 * torch.randn(c, generator=g))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            None,
            None,
            self.training,
            self.momentum,
            self.eps,
        )
        return self.act(y * self.weight[:, None, None] + self.bias[:, None, None])


@pytest.mark.parametrize("act", ["identity", "relu"])
def test_gamma_beta_applied_after_the_op_are_not_a_normalization_error(act: str) -> None:
    norm = AffineAfterOp(8, nn.Identity if act == "identity" else nn.ReLU)
    report = bncheck.audit(_model(norm).train(), _batch())
    assert report.filter(rules=["normalization"]) == []
    assert _rules(report, "error") == []


class WeightNotGiven(nn.BatchNorm2d):
    """Trained gamma/beta the forward never uses: F.batch_norm gets none and nothing applies
    them after (a forgotten argument)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, None, True, 0.1, self.eps)


class SwappedAffine(nn.BatchNorm2d):
    """bias and weight handed to F.batch_norm in each other's place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.bias, self.weight, True, 0.1, self.eps
        )


@pytest.mark.parametrize("cls", [WeightNotGiven, SwappedAffine])
def test_gamma_beta_the_op_did_not_apply_are_still_a_normalization_error(cls) -> None:
    norm = cls(8)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(8, generator=torch.Generator().manual_seed(2)))
        norm.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(3)))
    report = bncheck.audit(_model(norm).train(), _batch())
    assert [f.layer for f in report.filter(rules=["normalization"])] == ["1"]


class AffineInPlaceAfterOp(nn.BatchNorm2d):
    """gamma/beta applied in place on the op's output (the module returns the op's tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.batch_norm(
            x, self.running_mean, self.running_var, None, None, True, self.momentum, self.eps
        )
        return out.mul_(self.weight[:, None, None]).add_(self.bias[:, None, None])


def test_gamma_beta_applied_in_place_after_the_op_are_not_a_normalization_error() -> None:
    norm = AffineInPlaceAfterOp(8)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(8, generator=torch.Generator().manual_seed(2)))
        norm.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(3)))
    report = bncheck.audit(_model(norm).train(), _batch())
    assert report.filter(rules=["normalization"]) == []

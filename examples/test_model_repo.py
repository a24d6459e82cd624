"""What a model repository's test file looks like with bncheck.

Run it with ``python -m pytest examples/test_model_repo.py``. The pytest plugin is registered
when bncheck is installed; nothing needs to be imported to get the ``bncheck`` fixture or the
``@pytest.mark.bncheck`` marker. In a real repository the model and the custom layer below
would be imported from the package under test.

Zero-code alternative, without writing any test::

    python -m pytest --bncheck-model bncheck.models:vgg16_bn_small --bncheck-input-shape 8,3,32,32
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

from bncheck.strategies import batches_for
from bncheck.testing import (
    assert_bn_ok,
    assert_finite_stats,
    assert_no_weight_decay_on_bn,
    assert_pytorch_momentum,
    check_conformance,
)


# ---- "the repository's code" ------------------------------------------------------------------
class MyBatchNorm2d(nn.Module):
    """A hand-written BatchNorm2d (say, for a custom kernel): biased variance to normalise,
    unbiased variance into running_var, cumulative average when momentum is None."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.running_mean is None:
            mean = x.mean((0, 2, 3))
            var = x.var((0, 2, 3), unbiased=False)
            if self.training and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    f = (
                        1.0 / float(self.num_batches_tracked)
                        if self.momentum is None
                        else self.momentum
                    )
                    n = x.numel() // x.shape[1]
                    self.running_mean.lerp_(mean, f)
                    self.running_var.lerp_(var * n / (n - 1), f)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y


class Net(nn.Module):
    """conv (no bias) -> BN -> ReLU, twice, then a linear head."""

    def __init__(self, bn: type[nn.Module] = nn.BatchNorm2d, c: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            bn(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            bn(c),
            nn.ReLU(),
        )
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only: BN gamma/beta and biases get none."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1
    )


# ---- the repository's tests -------------------------------------------------------------------
@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def trained_net(batch: torch.Tensor) -> Net:
    model = Net()
    with torch.no_grad():
        for _ in range(3):
            model(batch)
    return model.eval()


def test_training_setup_is_bn_clean(bncheck, batch: torch.Tensor) -> None:  # noqa: ANN001
    """The model as we train it, with the batch size we train with."""
    model = Net()
    bncheck.assert_ok(model, batch, optimizer=make_optimizer(model))


@pytest.mark.bncheck(fail_on="warning")
def test_inference_model_has_no_warnings(
    bncheck,
    trained_net: Net,  # noqa: ANN001
    batch: torch.Tensor,
) -> None:
    """Stricter for the exported model: warnings fail too."""
    report = bncheck.assert_ok(trained_net, batch)
    assert report.layers == ["features.1", "features.4"]


def test_reference_vgg_is_bn_clean(
    bncheck,
    bncheck_reference_model,  # noqa: ANN001
    bncheck_example_batch,
) -> None:  # noqa: ANN001
    bncheck.assert_ok(bncheck_reference_model, bncheck_example_batch)


def test_without_fixtures(trained_net: Net, batch: torch.Tensor) -> None:
    assert_bn_ok(trained_net, batch)
    assert_pytorch_momentum(trained_net)
    assert_finite_stats(trained_net)
    assert_no_weight_decay_on_bn(trained_net, make_optimizer(trained_net))


def test_my_batchnorm_conforms_to_pytorch() -> None:
    check_conformance(MyBatchNorm2d, dims=2)


def test_net_with_my_batchnorm_is_bn_clean(bncheck, batch: torch.Tensor) -> None:  # noqa: ANN001
    bncheck.assert_ok(Net(bn=MyBatchNorm2d), batch)


@settings(max_examples=15, deadline=None, database=None)
@given(x=batches_for(Net()))
def test_outputs_are_finite_for_any_batch(x: torch.Tensor) -> None:
    model = Net().train()
    assert torch.isfinite(model(x)).all()

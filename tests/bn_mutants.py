"""Hand-written BN layers: a correct one (``HandBN``) and mutants with exactly one bug each.

``HandBN`` follows PyTorch's BatchNorm step by step: batch mean and biased variance over every
axis but 1, normalise with the biased variance, update running_mean/running_var with momentum
(unbiased variance stored), count num_batches_tracked; eval uses the running statistics.
Each mutant overrides one step.
"""

from __future__ import annotations

import torch
from torch import nn


class HandBN(nn.Module):
    """A correct hand-written BatchNorm (any of (N, C), (N, C, L), (N, C, H, W), ...)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reduce_dims(self, x: torch.Tensor) -> list[int]:
        return [0, *range(2, x.dim())]

    def batch_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = self.reduce_dims(x)
        return x.mean(dims), x.var(dims, correction=0)

    def factor(self) -> float:
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def update(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        self.num_batches_tracked += 1
        m = self.factor()
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))

    def eval_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.running_mean, self.running_var

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var = self.batch_stats(x)
            with torch.no_grad():
                self.update(mean.detach(), var.detach(), x.numel() // x.shape[1])
        else:
            mean, var = self.eval_stats(x)
        return self.normalize(x, mean, var)


class BiasedVarBN(HandBN):
    """Stores the biased batch variance in running_var."""

    def update(self, mean, var, n):
        self.num_batches_tracked += 1
        m = self.factor()
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var)


class KerasMomentumBN(HandBN):
    """Keras convention: running = momentum * running + (1 - momentum) * batch."""

    def update(self, mean, var, n):
        self.num_batches_tracked += 1
        m = self.factor()
        self.running_mean.mul_(m).add_((1 - m) * mean)
        self.running_var.mul_(m).add_((1 - m) * var * n / (n - 1))


class NoUpdateBN(HandBN):
    """Forgets to update the running statistics (but counts)."""

    def update(self, mean, var, n):
        self.num_batches_tracked += 1


class NoCounterBN(HandBN):
    """Updates the statistics but forgets num_batches_tracked."""

    def update(self, mean, var, n):
        m = self.momentum if self.momentum is not None else 0.1
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))


class WrongAxesBN(HandBN):
    """Normalises each position separately (reduces over N only, not the spatial dims)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        mean = x.mean(0, keepdim=True)
        var = x.var(0, keepdim=True, correction=0)
        with torch.no_grad():
            stats_mean, stats_var = self.batch_stats(x)
            self.update(stats_mean, stats_var, x.numel() // x.shape[1])
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


class UnbiasedNormBN(HandBN):
    """Normalises with the unbiased batch variance (PyTorch uses the biased one)."""

    def batch_stats(self, x):
        dims = self.reduce_dims(x)
        return x.mean(dims), x.var(dims, correction=1)

    def update(self, mean, var, n):
        super().update(mean, var * (n - 1) / n, n)


class BatchStatsInEvalBN(HandBN):
    """Normalises with batch statistics in eval mode too."""

    def eval_stats(self, x):
        return self.batch_stats(x)


class NoisyEvalBN(HandBN):
    """Adds random noise to its output in eval mode (nondeterministic)."""

    def forward(self, x):
        y = super().forward(x)
        if not self.training:
            y = y + 1e-2 * torch.randn_like(y)
        return y


class EvalUpdatingBN(HandBN):
    """Updates its running statistics in eval mode as well (but normalises with them)."""

    def forward(self, x):
        if not self.training:
            with torch.no_grad():
                mean, var = self.batch_stats(x)
                self.update(mean, var, x.numel() // x.shape[1])
        return super().forward(x)


class Net(nn.Module):
    """conv (no bias) -> norm -> ReLU -> pool -> linear, with any norm layer."""

    def __init__(self, norm: nn.Module, c_in: int = 3, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn = norm
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

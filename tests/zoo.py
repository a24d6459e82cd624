"""A zoo of tiny models for tests. Each builds in milliseconds and runs on a CPU.

Every factory is deterministic (seeded) so tests can rebuild the same model twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def env_with_tests(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that imports the test helpers: ``tests/`` first on
    ``PYTHONPATH``, then ``extra`` variables."""
    paths = [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ConvBNReLU(nn.Module):
    """conv (no bias) -> BN -> ReLU -> global pool -> linear. The canonical correct block."""

    def __init__(self, c_in: int = 3, c: int = 8, classes: int = 4, **bn_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c, **bn_kwargs)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.mean((2, 3)))


class MLPBN(nn.Module):
    """linear (no bias) -> BatchNorm1d -> ReLU -> linear: a BN1d MLP head."""

    def __init__(self, d_in: int = 6, d: int = 16, classes: int = 3, **bn_kwargs) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d, bias=False)
        self.bn = nn.BatchNorm1d(d, **bn_kwargs)
        self.fc2 = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TwoBlock(nn.Module):
    """Two conv-BN-ReLU blocks, for tests that need more than one BN layer."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)).mean((2, 3)))


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def trained(model: nn.Module, x: torch.Tensor, steps: int = 3) -> nn.Module:
    """Run a few train-mode forwards so running statistics are no longer at init, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


def image_batch(n: int = 8, c: int = 3, hw: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=seeded(seed))


class FrozenBN2d(nn.Module):
    """FrozenBatchNorm2d look-alike: every tensor is a buffer, no num_batches_tracked."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class CounterlessBN(nn.Module):
    """FrozenBatchNorm's signature (buffers only, no counter), but it batch-normalises in
    train mode and updates its running statistics: a hand-written port."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            m, v = self.running_mean, self.running_var
        else:
            m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(m, 0.1)
                self.running_var.lerp_(v, 0.1)
        return (x - m[:, None, None]) / torch.sqrt(v[:, None, None] + 1e-5)


class TwoInputs(nn.Module):
    """A model with two inputs, one BN branch each (``a`` and ``b``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x1) + self.b(x2)


class ImageListDetector(nn.Module):
    """Takes a list of (C, H, W) images as one argument, like torchvision's detectors."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.body(image[None]) for image in images]


def detection_loader(samples: int = 8, scale: float = 4.0, shift: float = 3.0) -> Any:
    """A DataLoader of (image, target) samples with torchvision's detection collate: each
    batch is (tuple of 2 images, tuple of 2 targets)."""
    from torch.utils.data import DataLoader

    data = [
        (torch.randn(3, 32, 32) * scale + shift, {"boxes": torch.zeros(0, 4)})
        for _ in range(samples)
    ]
    return DataLoader(data, batch_size=2, collate_fn=lambda b: tuple(zip(*b)))


def observed(model: nn.Module, x: Any, monkeypatch: Any, select: list[str]) -> Any:
    """The ``ForwardObservations`` of ``bncheck.audit(model, x, select=select)``, caught on
    their way from ``probes.collect`` to the rules."""
    import bncheck
    from bncheck import probes

    seen = {}
    collect = probes.collect

    def keep(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        seen["obs"] = obs = collect(ctx, *args, **kwargs)
        return obs

    monkeypatch.setattr(probes, "collect", keep)
    bncheck.audit(model, x, select=select)
    return seen["obs"]

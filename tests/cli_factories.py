"""Factories for the CLI tests, importable as ``cli_factories:NAME`` (``--arch``).

tests/ is on ``sys.path`` (conftest), so ``bncheck audit FILE --arch cli_factories:make``
works in-process. Every factory is deterministic.
"""

from __future__ import annotations

import torch
from torch import nn
from zoo import ConvBNReLU, NoBN, TwoBlock

from bncheck.models import vgg16_bn_small

MARKER_ENV = "BNCHECK_TEST_MARKER"


def make() -> nn.Module:
    """ConvBNReLU: conv(3->8) -> BN -> ReLU -> pool -> linear."""
    return ConvBNReLU()


def two_block() -> nn.Module:
    return TwoBlock()


def small_vgg() -> nn.Module:
    """The reference model at 1/8 width (channels 8..64), for 32x32 inputs."""
    return vgg16_bn_small(width=0.125)


def eps_3() -> nn.Module:
    """ConvBNReLU whose BN has eps=1e-3 (to check settings survive loading)."""
    return ConvBNReLU(eps=1e-3)


def broken() -> nn.Module:
    raise ValueError("boom: this factory always fails")


def not_a_module() -> int:
    return 42


def no_bn() -> nn.Module:
    return NoBN()


class NeedsReal(nn.Module):
    """A model whose constructor reads a tensor value, so it cannot be built on ``meta``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBNReLU()
        self.scale = float(torch.ones(1).sum().item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale


def needs_real() -> nn.Module:
    return NeedsReal()


class WithNonPersistent(nn.Module):
    """ConvBNReLU with a non-persistent buffer: absent from state dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBNReLU()
        self.register_buffer("offset", torch.full((1,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.offset)


def with_non_persistent() -> nn.Module:
    return WithNonPersistent()


class Fixed64(nn.Module):
    """conv -> BN -> flatten -> linear sized for 64x64 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 64 * 64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def fixed_64() -> nn.Module:
    return Fixed64()


class RefusesBadEps(nn.Module):
    """A model whose forward raises when its BN eps is not positive (as some kernels do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBNReLU()
        self.body.bn.eps = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.body.bn.eps > 0:
            raise RuntimeError("batch_norm: eps must be positive")
        return self.body(x)


def refuses_bad_eps() -> nn.Module:
    return RefusesBadEps()


def static_findings(momentum: float = 0.9, eps: float = 0.0) -> nn.Module:
    """Two blocks whose BN settings give one finding each, with no forward pass needed:
    ``features.1`` keras-momentum (warning) and ``head.1`` invalid-eps (error)."""
    from collections import OrderedDict

    return nn.Sequential(
        OrderedDict(
            features=nn.Sequential(
                nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=momentum)
            ),
            head=nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4, eps=eps)),
        )
    )

"""Data callables for the ``bncheck recalibrate`` tests (``--data recalibrate_data:NAME``).

tests/ is on ``sys.path`` (conftest), so the CLI finds them in-process; the subprocess test
puts tests/ on ``PYTHONPATH``. Every callable is deterministic.
"""

from __future__ import annotations

import torch
from torch import nn


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Six (image, label) batches of 3x8x8 images, mean 2 and std 3 (not the init stats)."""
    gen = torch.Generator().manual_seed(7)
    return [
        (2.0 + 3.0 * torch.randn(8, 3, 8, 8, generator=gen), torch.zeros(8, dtype=torch.long))
        for _ in range(6)
    ]


def generator_batches():  # type: ignore[no-untyped-def]
    """The same batches from a one-shot generator."""
    yield from batches()


def nan_batches() -> list[torch.Tensor]:
    data = [x for x, _ in batches()]
    data[2][0, 0, 0, 0] = float("nan")
    return data


def wrong_shape() -> list[torch.Tensor]:
    return [torch.randn(8, 5, 8, 8)]


def empty() -> list[torch.Tensor]:
    return []


def raises() -> list[torch.Tensor]:
    raise FileNotFoundError("no such folder: /data/calib")


def score(model: nn.Module) -> float:
    """Mean output of the model on fixed batches: changes when the statistics change."""
    model.eval()
    with torch.no_grad():
        return float(sum(model(x).mean() for x, _ in batches()) / 6)

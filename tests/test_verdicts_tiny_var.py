"""tiny-running-var judges what its message claims: a channel that is (nearly) constant or
collapsed next to its siblings, not a whole layer whose variance sits smoothly below eps
because its weights are small (torchvision's depthwise init)."""

from __future__ import annotations

import torch
from torch import nn

import bncheck


def _model(running_var: torch.Tensor) -> nn.Sequential:
    c = running_var.numel()
    model = nn.Sequential(nn.Conv2d(3, c, 3, bias=False), nn.BatchNorm2d(c)).eval()
    with torch.no_grad():
        model[1].running_var.copy_(running_var)
        model[1].num_batches_tracked.fill_(100)
    return model


def _flagged(model: nn.Module) -> list[int]:
    found = bncheck.audit(model, select=["tiny-running-var"]).filter(rules=["tiny-running-var"])
    return sorted(c for f in found for c in f.details["channels"])


def test_a_layer_spread_smoothly_below_eps_is_not_flagged():
    eps = 1e-5
    smooth = torch.linspace(0.03 * eps, 6 * eps, 64)  # small weights, no channel stands out
    assert _flagged(_model(smooth)) == []


def test_a_collapsed_channel_among_healthy_ones_is_flagged():
    var = torch.ones(16)
    var[5] = 5e-6  # below eps and far below its siblings
    assert _flagged(_model(var)) == [5]


def test_a_constant_channel_in_a_small_variance_layer_is_flagged():
    eps = 1e-5
    var = torch.linspace(0.5 * eps, 6 * eps, 32)
    var[3] = 0.0  # a dead unit: its input never varied
    assert _flagged(_model(var)) == [3]

"""The Monitor's warnings go through the same escaping as every human-facing renderer: a layer
name read from a file or built by code cannot move the cursor or fake a line."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import bncheck
from bncheck.errors import BNCheckWarning


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        # a NaN-producing BN under a name that would clear the screen if printed raw
        self.add_module("bn\x1b[2J\rok", nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "bn\x1b[2J\rok")(self.conv(x))


def test_monitor_warning_shows_control_characters_as_escapes() -> None:
    torch.manual_seed(0)
    model = Hostile()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bncheck.Monitor(model, optimizer=opt, warn=True):
            for _ in range(3):
                x = torch.randn(4, 3, 8, 8)
                x[0, 0, 0, 0] = float("inf")  # the batch statistics become non-finite
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()
    texts = [str(w.message) for w in caught if issubclass(w.category, BNCheckWarning)]
    assert texts, "the Monitor should warn about the non-finite statistics"
    for text in texts:
        assert "\x1b" not in text and "\r" not in text
    assert any("\\x1b[2J" in text for text in texts)

"""VGG with Batch Normalization, state-dict compatible with torchvision's ``vgg*_bn``.

``vgg16_bn()`` with default arguments has exactly the ``state_dict`` keys, shapes, dtypes and
order of ``torchvision.models.vgg16_bn`` (97 entries, 138,365,992 parameters; the conv layers
keep their bias), so torchvision's weights load into it offline with ``strict=True``. The names
``VGG``, ``make_layers`` and ``cfgs`` follow torchvision's so readers recognise them.

Beyond torchvision, for tests and demonstrations on a CPU:

* ``width``: multiplies every conv layer's channel count (``0.25`` gives 16..128 channels);
* ``small_input=True``: a head for 32x32 inputs (1x1 adaptive pooling and hidden layers as
  wide as the last conv layer instead of 7x7 pooling and 4096 units);
* ``bn_position``: ``"before"`` the ReLU (the original paper and torchvision) or ``"after"``
  it (for demonstrations);
* ``batch_norm=False``: the same network without BN.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = [
    "VGG",
    "make_layers",
    "cfgs",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "vgg16_bn_small",
]

BNPosition = Literal["before", "after"]

cfgs: dict[str, list[str | int]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_layers(
    cfg: list[str | int],
    batch_norm: bool = False,
    *,
    width: float = 1.0,
    bn_position: BNPosition = "before",
    in_channels: int = 3,
) -> nn.Sequential:
    """The convolutional trunk: ``conv3x3 -> BN -> ReLU`` per number, ``MaxPool2d(2)`` per 'M'."""
    if bn_position not in ("before", "after"):
        raise ValueError(f"bn_position must be 'before' or 'after', got {bn_position!r}")
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = _scaled(int(v), width)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if not batch_norm:
            layers += [conv, nn.ReLU(inplace=True)]
        elif bn_position == "before":
            layers += [conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
        else:
            layers += [conv, nn.ReLU(inplace=True), nn.BatchNorm2d(out_channels)]
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: ``features`` (conv trunk), ``avgpool``, ``classifier`` (three linear layers)."""

    def __init__(
        self,
        features: nn.Module,
        num_classes: int = 1000,
        init_weights: bool = True,
        dropout: float = 0.5,
        *,
        pool_size: int = 7,
        hidden: int = 4096,
        feature_channels: int = 512,
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(feature_channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _vgg(
    cfg: str,
    num_classes: int,
    *,
    width: float,
    small_input: bool,
    bn_position: BNPosition,
    batch_norm: bool,
    dropout: float,
    init_weights: bool,
    in_channels: int,
) -> VGG:
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    features = make_layers(
        cfgs[cfg], batch_norm, width=width, bn_position=bn_position, in_channels=in_channels
    )
    last = _scaled(512, width)
    if small_input:
        return VGG(
            features,
            num_classes,
            init_weights,
            dropout,
            pool_size=1,
            hidden=last,
            feature_channels=last,
        )
    return VGG(
        features,
        num_classes,
        init_weights,
        dropout,
        pool_size=7,
        hidden=_scaled(4096, width),
        feature_channels=last,
    )


def vgg11_bn(
    num_classes: int = 1000,
    *,
    width: float = 1.0,
    small_input: bool = False,
    bn_position: BNPosition = "before",
    batch_norm: bool = True,
    dropout: float = 0.5,
    init_weights: bool = True,
    in_channels: int = 3,
) -> VGG:
    """VGG11 with BN (torchvision's ``vgg11_bn`` layout at the defaults)."""
    return _vgg(
        "A",
        num_classes,
        width=width,
        small_input=small_input,
        bn_position=bn_position,
        batch_norm=batch_norm,
        dropout=dropout,
        init_weights=init_weights,
        in_channels=in_channels,
    )


def vgg13_bn(
    num_classes: int = 1000,
    *,
    width: float = 1.0,
    small_input: bool = False,
    bn_position: BNPosition = "before",
    batch_norm: bool = True,
    dropout: float = 0.5,
    init_weights: bool = True,
    in_channels: int = 3,
) -> VGG:
    """VGG13 with BN (torchvision's ``vgg13_bn`` layout at the defaults)."""
    return _vgg(
        "B",
        num_classes,
        width=width,
        small_input=small_input,
        bn_position=bn_position,
        batch_norm=batch_norm,
        dropout=dropout,
        init_weights=init_weights,
        in_channels=in_channels,
    )


def vgg16_bn(
    num_classes: int = 1000,
    *,
    width: float = 1.0,
    small_input: bool = False,
    bn_position: BNPosition = "before",
    batch_norm: bool = True,
    dropout: float = 0.5,
    init_weights: bool = True,
    in_channels: int = 3,
) -> VGG:
    """VGG16 with BN: torchvision's ``vgg16_bn`` at the defaults (138,365,992 parameters).

    Build it on the meta device when only its structure is needed::

        with torch.device("meta"):
            model = vgg16_bn()
    """
    return _vgg(
        "D",
        num_classes,
        width=width,
        small_input=small_input,
        bn_position=bn_position,
        batch_norm=batch_norm,
        dropout=dropout,
        init_weights=init_weights,
        in_channels=in_channels,
    )


def vgg19_bn(
    num_classes: int = 1000,
    *,
    width: float = 1.0,
    small_input: bool = False,
    bn_position: BNPosition = "before",
    batch_norm: bool = True,
    dropout: float = 0.5,
    init_weights: bool = True,
    in_channels: int = 3,
) -> VGG:
    """VGG19 with BN (torchvision's ``vgg19_bn`` layout at the defaults)."""
    return _vgg(
        "E",
        num_classes,
        width=width,
        small_input=small_input,
        bn_position=bn_position,
        batch_norm=batch_norm,
        dropout=dropout,
        init_weights=init_weights,
        in_channels=in_channels,
    )


def vgg16_bn_small(
    num_classes: int = 10,
    *,
    width: float = 0.25,
    bn_position: BNPosition = "before",
    batch_norm: bool = True,
    dropout: float = 0.5,
    init_weights: bool = True,
    in_channels: int = 3,
) -> VGG:
    """A small VGG16-BN for 32x32 inputs: ``vgg16_bn(width=0.25, small_input=True)``."""
    return vgg16_bn(
        num_classes,
        width=width,
        small_input=True,
        bn_position=bn_position,
        batch_norm=batch_norm,
        dropout=dropout,
        init_weights=init_weights,
        in_channels=in_channels,
    )

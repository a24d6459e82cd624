"""Reference models. ``ARCHS`` maps the names ``--arch`` accepts to their factories."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import UsageError, did_you_mean
from .vgg import VGG, cfgs, make_layers, vgg11_bn, vgg13_bn, vgg16_bn, vgg16_bn_small, vgg19_bn

__all__ = [
    "VGG",
    "cfgs",
    "make_layers",
    "vgg11_bn",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "vgg16_bn_small",
    "ARCHS",
    "INPUT_SHAPES",
    "get_arch",
]

#: Built-in architectures by name.
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "vgg11_bn": vgg11_bn,
    "vgg13_bn": vgg13_bn,
    "vgg16_bn": vgg16_bn,
    "vgg19_bn": vgg19_bn,
    "vgg16_bn_small": vgg16_bn_small,
}

#: The input shape (C, H, W) each built-in architecture is made for.
INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "vgg11_bn": (3, 224, 224),
    "vgg13_bn": (3, 224, 224),
    "vgg16_bn": (3, 224, 224),
    "vgg19_bn": (3, 224, 224),
    "vgg16_bn_small": (3, 32, 32),
}


def get_arch(name: str) -> Callable[..., nn.Module]:
    """The factory of a built-in architecture; an unknown name raises ``UsageError``."""
    try:
        return ARCHS[name]
    except KeyError:
        raise UsageError(
            f"unknown architecture {name!r}{did_you_mean(name, ARCHS)}; built-in: "
            f"{', '.join(ARCHS)} (or give pkg.module:callable)"
        ) from None

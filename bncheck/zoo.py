"""Model-zoo architectures: ``torchvision:NAME`` and ``timm:NAME`` for ``--arch`` and
``--bncheck-model``.

The library is imported only when a spec names it; when it is not installed the error is one
line saying how to install it (neither is a dependency of bncheck). Weights are never
downloaded: torchvision builders get ``weights=None`` (and ``weights_backbone=None`` where they
take one), timm gets ``pretrained=False``; the checkpoint supplies the values.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from .errors import UsageError, did_you_mean

__all__ = ["PREFIXES", "is_zoo_spec", "resolve"]

PREFIXES = ("torchvision", "timm")
_WEIGHT_ARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def is_zoo_spec(spec: str) -> bool:
    prefix, sep, name = spec.partition(":")
    return bool(sep) and prefix in PREFIXES and "." not in name


def _import(library: str, spec: str, flag: str) -> Any:
    try:
        return importlib.import_module(library)
    except ImportError:
        raise UsageError(
            f"{flag} {spec}: {library} is not installed (bncheck does not depend on it); "
            f"pip install {library}"
        ) from None
    except Exception as exc:  # a broken installation
        raise UsageError(
            f"{flag} {spec}: importing {library} raised {type(exc).__name__}: {exc}"
        ) from None


def _refuse_weights(spec: str, kwargs: Mapping[str, Any], flag: str) -> None:
    for name in _WEIGHT_ARGS:
        if kwargs.get(name) not in (None, False):
            raise UsageError(
                f"{flag} {spec}: {name}={kwargs[name]!r}: bncheck never downloads weights; the "
                "checkpoint supplies them (leave the argument out)"
            )


def resolve(
    spec: str, kwargs: Mapping[str, Any] | None = None, *, flag: str = "--arch"
) -> tuple[Callable[[], Any], tuple[int, ...] | None]:
    """The factory of a ``torchvision:NAME`` / ``timm:NAME`` spec (``kwargs`` bound) and the
    input shape ``(C, H, W)`` the model is made for, when known."""
    library, _, name = spec.partition(":")
    kwargs = dict(kwargs or {})
    _refuse_weights(spec, kwargs, flag)
    if library == "torchvision":
        return _torchvision(spec, name, kwargs, flag)
    return _timm(spec, name, kwargs, flag)


def _torchvision(
    spec: str, name: str, kwargs: dict[str, Any], flag: str
) -> tuple[Callable[[], Any], tuple[int, ...] | None]:
    _import("torchvision", spec, flag)
    models = importlib.import_module("torchvision.models")
    known = list(models.list_models())
    if name not in known:
        raise UsageError(
            f"{flag} {spec}: torchvision has no model {name!r}{did_you_mean(name, known)}; "
            "torchvision.models.list_models() lists them"
        )
    builder = models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    defaults: dict[str, Any] = {"weights": None}
    if "weights_backbone" in params:
        defaults["weights_backbone"] = None  # detection models default to ImageNet backbones
    video = set(models.list_models(module=importlib.import_module("torchvision.models.video")))
    classification = set(models.list_models(module=models))
    segmentation = set(
        models.list_models(module=importlib.import_module("torchvision.models.segmentation"))
    )
    shape: tuple[int, ...] | None = None
    if name in video:
        shape = (3, 16, 112, 112)
    elif name in classification or name in segmentation:
        shape = (3, 224, 224)
    return functools.partial(builder, **{**defaults, **kwargs}), shape


def _timm(
    spec: str, name: str, kwargs: dict[str, Any], flag: str
) -> tuple[Callable[[], Any], tuple[int, ...] | None]:
    timm = _import("timm", spec, flag)
    if not timm.is_model(name):
        known = list(timm.list_models())
        raise UsageError(
            f"{flag} {spec}: timm has no model {name!r}{did_you_mean(name, known)}; "
            "timm.list_models() lists them"
        )
    shape: tuple[int, ...] | None = None
    try:
        cfg = timm.get_pretrained_cfg(name)
        size = getattr(cfg, "input_size", None) if cfg is not None else None
        if size is not None:
            shape = tuple(int(s) for s in size)
    except Exception:  # an older timm without pretrained configs: no known shape
        shape = None
    return functools.partial(timm.create_model, name, pretrained=False, **kwargs), shape

"""Find every BatchNorm-like layer of a model, by qualified module name.

Recognised: ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, the lazy variants, and any module
with the BN buffer signature (its own per-channel ``running_mean`` and ``running_var``
buffers, optional ``weight``/``bias``), which covers torchvision's ``FrozenBatchNorm2d`` and
timm's ``BatchNormAct2d`` family without importing either library. Models wrapped in
``DistributedDataParallel`` or ``DataParallel`` are unwrapped, so names are relative to the
user's model (``features.1``, never ``module.features.1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["BNLayer", "find_bn_layers", "unwrap_model", "is_bn_like"]

_WRAPPERS = ("DistributedDataParallel", "DataParallel")


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile(module)`` returns (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model inside DDP/DataParallel and ``torch.compile`` wrappers (any depth, any
    order); else ``model`` itself. Layer names are then relative to the user's model (no
    ``module.`` or ``_orig_mod.`` prefix), and bncheck's passes call it eagerly."""
    while True:
        inner = getattr(model, "module", None)
        if type(model).__name__ in _WRAPPERS and isinstance(inner, nn.Module):
            model = inner
        elif is_compiled(model):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _own_buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    """The module's own buffer ``name`` (works for TorchScript modules too), or None."""
    buffers = module._buffers
    if isinstance(buffers, dict):
        return buffers.get(name)
    return dict(module.named_buffers(recurse=False)).get(name)


def _own_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = _own_buffer(module, name)
    if value is None:
        params = module._parameters
        if isinstance(params, dict):
            value = params.get(name)
        else:
            value = dict(module.named_parameters(recurse=False)).get(name)
    return value


def is_bn_like(module: nn.Module) -> bool:
    """True for PyTorch's BN classes and for modules with the BN buffer signature."""
    if isinstance(module, _BatchNorm):
        return True
    rm, rv = _own_buffer(module, "running_mean"), _own_buffer(module, "running_var")
    return (
        isinstance(rm, torch.Tensor)
        and isinstance(rv, torch.Tensor)
        and rm.dim() == 1
        and rm.shape == rv.shape
    )


@dataclass(eq=False)
class BNLayer:
    """One BN-like layer. Settings are read when the layer is found; tensors are read live."""

    name: str
    module: nn.Module
    kind: str
    standard: bool
    lazy_uninitialized: bool
    num_features: int | None
    eps: float | None
    momentum: float | None
    has_momentum: bool
    affine: bool
    track_running_stats: bool

    # ---- live tensors ----------------------------------------------------------------
    @property
    def running_mean(self) -> torch.Tensor | None:
        return _own_buffer(self.module, "running_mean")

    @property
    def running_var(self) -> torch.Tensor | None:
        return _own_buffer(self.module, "running_var")

    @property
    def num_batches_tracked(self) -> torch.Tensor | None:
        return _own_buffer(self.module, "num_batches_tracked")

    @property
    def weight(self) -> torch.Tensor | None:
        return _own_tensor(self.module, "weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return _own_tensor(self.module, "bias")

    @property
    def has_running_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    @property
    def on_meta(self) -> bool:
        """Whether one of its statistics or gamma/beta holds no values (the meta device:
        structure only, a template or weights not loaded yet)."""
        return any(
            isinstance(t, torch.Tensor) and t.is_meta
            for t in (self.running_mean, self.running_var, self.weight, self.bias)
        )

    @property
    def params(self) -> list[nn.Parameter]:
        """The layer's own trainable parameters (gamma, beta), if any."""
        return [p for p in self.module.parameters(recurse=False) if p is not None]

    @property
    def params_frozen(self) -> bool:
        """No own parameter requires grad (including layers with no parameters at all)."""
        return not any(p.requires_grad for p in self.params)

    @property
    def uses_batch_stats(self) -> bool:
        """Whether the layer normalises with batch statistics in train mode. PyTorch's BN
        always does; a custom layer with FrozenBatchNorm's signature (no parameters, no
        ``num_batches_tracked`` counter: torchvision's FrozenBatchNorm2d, timm's
        FrozenBatchNormAct2d) normalises with its running statistics in both modes."""
        if self.standard:
            return True
        return bool(self.params) or self.num_batches_tracked is not None

    @property
    def frozen_by_design(self) -> bool:
        """FrozenBatchNorm-style (gamma/beta are buffers), or eval mode with frozen params."""
        if not self.params and self.has_running_stats and not self.standard:
            return True
        return (not self.module.training) and self.params_frozen

    @property
    def label(self) -> str:
        """``name (Kind)``, the prefix of every message about this layer."""
        return f"{self.name or '(model)'} ({self.kind})"


def _describe(name: str, module: nn.Module) -> BNLayer:
    lazy = isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
    rm = _own_buffer(module, "running_mean")
    weight = _own_tensor(module, "weight")
    num_features = getattr(module, "num_features", None)
    if not isinstance(num_features, int) or num_features <= 0:
        if isinstance(rm, torch.Tensor) and not lazy:
            num_features = rm.numel()
        elif isinstance(weight, torch.Tensor) and not lazy:
            num_features = weight.numel()
        else:
            num_features = None
    eps = getattr(module, "eps", None)
    has_momentum = hasattr(module, "momentum")
    momentum = getattr(module, "momentum", None)
    affine = bool(getattr(module, "affine", isinstance(weight, nn.Parameter)))
    track = bool(getattr(module, "track_running_stats", rm is not None))
    return BNLayer(
        name=name,
        module=module,
        kind=getattr(module, "original_name", None) or type(module).__name__,
        standard=isinstance(module, _BatchNorm),
        lazy_uninitialized=lazy,
        num_features=num_features,
        eps=setting_number(eps),
        momentum=setting_number(momentum),
        has_momentum=has_momentum,
        affine=affine,
        track_running_stats=track,
    )


def setting_number(value: object) -> float | None:
    """A setting as a float, as torch uses it: a Python (bool included), numpy or one-element
    tensor number (a momentum read from a config as numpy.float32, or kept as a tensor); None
    for anything else."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    if isinstance(value, (int, float)):  # bool too: torch runs momentum=True as 1
        return float(value)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return None
        value = value.detach()
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        return None


def iter_bn_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in unwrap_model(model).named_modules():
        if is_bn_like(module):
            yield name, module


def find_bn_layers(model: nn.Module) -> list[BNLayer]:
    """Every BN-like layer of ``model`` in module order, named relative to the user's model."""
    return [_describe(name, module) for name, module in iter_bn_modules(model)]

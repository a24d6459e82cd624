"""Hypothesis strategies for BatchNorm tests: layer configurations, inputs, model batches.

Tensors are built from hypothesis-drawn integer seeds with a local ``torch.Generator``, so
drawing never touches the global RNG and hypothesis shrinks a failing tensor by shrinking its
seed, shape, scale and shift (a minimal example is a small shape and seed 0)::

    from hypothesis import given
    from bncheck.strategies import bn_configs, bn_inputs

    @given(config=bn_configs(), data=st.data())
    def test_my_bn(config, data):
        layer = MyBN(config.num_features, **config.kwargs)
        x = data.draw(bn_inputs(config.num_features, dims=(2,)))
        ...

Layouts follow PyTorch: ``dims=1`` is ``(N, C)`` and ``(N, C, L)`` (``BatchNorm1d``),
``dims=2`` is ``(N, C, H, W)``, ``dims=3`` is ``(N, C, D, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "BNConfig",
    "LAYOUTS",
    "bn_configs",
    "bn_input_shapes",
    "bn_inputs",
    "batches_for",
    "layouts_for_dims",
    "make_input",
]

#: Input layouts per BN dimensionality: the number of dimensions after (N, C).
LAYOUTS: dict[int, tuple[int, ...]] = {1: (0, 1), 2: (2,), 3: (3,)}


@dataclass(frozen=True)
class BNConfig:
    """The constructor arguments of a BN layer (``nn.BatchNormNd``'s signature)."""

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments after ``num_features``."""
        return {
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self.affine,
            "track_running_stats": self.track_running_stats,
        }


def _strategy(value: Any, default: SearchStrategy[Any]) -> SearchStrategy[Any]:
    if value is None:
        return default
    if isinstance(value, SearchStrategy):
        return value
    return st.just(value)


def bn_configs(
    *,
    num_features: int | SearchStrategy[int] | None = None,
    eps: float | SearchStrategy[float] | None = None,
    momentum: float | SearchStrategy[float | None] | None = None,
    allow_momentum_none: bool = True,
    affine: bool | SearchStrategy[bool] | None = None,
    track_running_stats: bool | SearchStrategy[bool] | None = None,
) -> SearchStrategy[BNConfig]:
    """BN layer configurations. Each argument fixes a value or gives a strategy; by default:
    1-6 channels, eps in [1e-6, 0.5], momentum in [0, 1] or None (cumulative average), both
    affine settings, both track_running_stats settings."""
    momenta: SearchStrategy[float | None] = st.one_of(
        st.sampled_from([0.1, 0.01, 0.5, 1.0, 0.0]), st.floats(0.0, 1.0)
    )
    if allow_momentum_none:
        momenta = st.one_of(st.none(), momenta)
    return st.builds(
        BNConfig,
        num_features=_strategy(num_features, st.integers(1, 6)),
        eps=_strategy(eps, st.one_of(st.sampled_from([1e-5, 1e-3]), st.floats(1e-6, 0.5))),
        momentum=_strategy(momentum, momenta),
        affine=_strategy(affine, st.booleans()),
        track_running_stats=_strategy(track_running_stats, st.booleans()),
    )


def layouts_for_dims(dims: int | Iterable[int]) -> tuple[int, ...]:
    """The numbers of spatial dimensions (after N, C) that BN layers of ``dims`` accept."""
    wanted = (dims,) if isinstance(dims, int) else tuple(dims)
    if not wanted or any(d not in LAYOUTS for d in wanted):
        raise UsageError(f"dims must be 1, 2, 3 or a sequence of them, got {dims!r}")
    return tuple(sorted({k for d in wanted for k in LAYOUTS[d]}))


def bn_input_shapes(
    num_features: int,
    *,
    dims: int | Iterable[int] = (1, 2, 3),
    max_batch: int = 5,
    max_side: int = 4,
    min_values_per_channel: int = 2,
) -> SearchStrategy[tuple[int, ...]]:
    """Input shapes ``(N, C, *spatial)`` with at least ``min_values_per_channel`` values per
    channel (``N * prod(spatial)``; PyTorch refuses one value per channel in train mode)."""
    spatial_ranks = layouts_for_dims(dims)

    @st.composite
    def shapes(draw: st.DrawFn) -> tuple[int, ...]:
        rank = draw(st.sampled_from(spatial_ranks))
        spatial = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
        per_sample = math.prod(spatial)
        min_batch = max(1, -(-min_values_per_channel // per_sample))
        batch = draw(st.integers(min_batch, max(min_batch, max_batch)))
        return (batch, num_features, *spatial)

    return shapes()


def make_input(
    shape: Sequence[int],
    seed: int,
    *,
    scale: float = 1.0,
    shift: float = 0.0,
    dtype: torch.dtype | None = None,
    device: Any = None,
) -> torch.Tensor:
    """``randn(shape) * scale + shift * randn(C)`` (one offset per channel, dim 1) from a local
    generator seeded with ``seed``: the same arguments always give the same tensor."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(tuple(shape), generator=generator, dtype=torch.float64)
    if len(shape) > 1:
        offsets = torch.randn(shape[1], generator=generator, dtype=torch.float64)
        values = values * scale + shift * offsets.reshape(1, -1, *([1] * (len(shape) - 2)))
    else:
        values = values * scale + shift
    return values.to(dtype=dtype or torch.float32, device=device)


_SCALES = st.sampled_from([1.0, 0.5, 3.0])
_SHIFTS = st.sampled_from([0.0, 1.0, 5.0])
_SEEDS = st.integers(0, 2**16)


def bn_inputs(
    num_features: int,
    *,
    dims: int | Iterable[int] = (1, 2, 3),
    dtype: torch.dtype | None = None,
    max_batch: int = 5,
    max_side: int = 4,
    min_values_per_channel: int = 2,
) -> SearchStrategy[torch.Tensor]:
    """Input tensors for a BN layer with ``num_features`` channels (see :func:`make_input`)."""
    return st.builds(
        lambda shape, seed, scale, shift: make_input(
            shape, seed, scale=scale, shift=shift, dtype=dtype
        ),
        bn_input_shapes(
            num_features,
            dims=dims,
            max_batch=max_batch,
            max_side=max_side,
            min_values_per_channel=min_values_per_channel,
        ),
        _SEEDS,
        _SCALES,
        _SHIFTS,
    )


def _infer_sample_shape(model: nn.Module, spatial_size: int) -> tuple[int, ...]:
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            rank = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(module)]
            return (module.in_channels, *([spatial_size] * rank))
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return (module.num_features,)
    raise UsageError(
        f"cannot tell what input {type(model).__name__} takes (its first layer is not a conv, "
        "linear or BN layer); pass example= or sample_shape="
    )


def batches_for(
    model: nn.Module | None = None,
    *,
    example: torch.Tensor | None = None,
    sample_shape: Sequence[int] | None = None,
    batch_sizes: SearchStrategy[int] | None = None,
    spatial_size: int = 8,
    scales: SearchStrategy[float] | None = None,
    shifts: SearchStrategy[float] | None = None,
) -> SearchStrategy[torch.Tensor]:
    """Input batches for ``model``: shape ``(N, *sample_shape)``, N from ``batch_sizes``
    (default 2-8).

    The per-sample shape comes from ``sample_shape``, else ``example.shape[1:]``, else the
    model's first conv/linear/BN layer (convs get ``spatial_size`` per spatial dim). dtype and
    device follow ``example``, else the model's first floating-point parameter.
    """
    import torch

    dtype: torch.dtype = torch.float32
    device: Any = None
    if sample_shape is not None:
        shape = tuple(int(d) for d in sample_shape)
    elif example is not None:
        shape = tuple(example.shape[1:])
    elif model is not None:
        shape = _infer_sample_shape(model, spatial_size)
    else:
        raise UsageError("batches_for needs a model, an example batch or a sample_shape")
    if example is not None:
        dtype, device = example.dtype, example.device
    elif model is not None:
        for param in model.parameters():
            if param.is_floating_point():
                dtype, device = param.dtype, param.device
                break
    return st.builds(
        lambda n, seed, scale, shift: make_input(
            (n, *shape), seed, scale=scale, shift=shift, dtype=dtype, device=device
        ),
        batch_sizes if batch_sizes is not None else st.integers(2, 8),
        _SEEDS,
        scales if scales is not None else _SCALES,
        shifts if shifts is not None else _SHIFTS,
    )

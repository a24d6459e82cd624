"""bncheck.strategies: what they draw, checked against the stated constraints."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import MLPBN, ConvBNReLU, NoBN

from bncheck.errors import UsageError
from bncheck.strategies import (
    BNConfig,
    batches_for,
    bn_configs,
    bn_input_shapes,
    bn_inputs,
    layouts_for_dims,
    make_input,
)

FAST = settings(max_examples=40, deadline=None, database=None)


@FAST
@given(config=bn_configs())
def test_bn_configs_build_pytorch_layers(config: BNConfig) -> None:
    assert 1 <= config.num_features <= 6
    assert config.eps > 0
    assert config.momentum is None or 0.0 <= config.momentum <= 1.0
    layer = nn.BatchNorm2d(config.num_features, **config.kwargs)
    assert (layer.weight is not None) == config.affine
    assert (layer.running_mean is not None) == config.track_running_stats


def test_bn_configs_cover_momentum_none_and_both_flags() -> None:
    assert find(bn_configs(), lambda c: c.momentum is None).momentum is None
    assert not find(bn_configs(), lambda c: not c.affine).affine
    assert not find(bn_configs(), lambda c: not c.track_running_stats).track_running_stats


@FAST
@given(
    config=bn_configs(
        num_features=3,
        eps=1e-3,
        allow_momentum_none=False,
        affine=st.just(True),
        track_running_stats=False,
    )
)
def test_bn_configs_fixed_values_and_strategies(config: BNConfig) -> None:
    assert (config.num_features, config.eps, config.affine) == (3, 1e-3, True)
    assert config.momentum is not None and not config.track_running_stats


@FAST
@given(
    data=st.data(),
    dims=st.sampled_from([1, 2, 3, (1, 3)]),
    c=st.integers(1, 4),
    min_values=st.integers(1, 9),
)
def test_bn_input_shapes_respect_layout_and_value_count(
    data: st.DataObject, dims: object, c: int, min_values: int
) -> None:
    shape = data.draw(bn_input_shapes(c, dims=dims, min_values_per_channel=min_values))
    allowed = {1: {2, 3}, 2: {4}, 3: {5}}
    ranks = set().union(*(allowed[d] for d in (dims if isinstance(dims, tuple) else (dims,))))
    assert len(shape) in ranks
    assert shape[1] == c
    assert shape[0] * math.prod(shape[2:]) >= min_values


def test_layouts_for_dims_rejects_unknown_dims() -> None:
    assert layouts_for_dims(1) == (0, 1)
    with pytest.raises(UsageError, match=r"dims must be 1, 2, 3 or a sequence of them, got 0"):
        layouts_for_dims(0)


def test_make_input_is_deterministic_per_seed_and_leaves_the_global_rng() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = make_input((4, 3, 2), 11, scale=2.0, shift=1.0)
    b = make_input((4, 3, 2), 11, scale=2.0, shift=1.0)
    c = make_input((4, 3, 2), 12, scale=2.0, shift=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), before)


def test_make_input_scale_and_per_channel_shift() -> None:
    generator = torch.Generator().manual_seed(9)
    base = torch.randn((5, 2, 3), generator=generator, dtype=torch.float64)
    offsets = torch.randn(2, generator=generator, dtype=torch.float64)
    expected = base * 3.0 + 4.0 * offsets.reshape(1, 2, 1)
    x = make_input((5, 2, 3), 9, scale=3.0, shift=4.0, dtype=torch.float64)
    assert torch.allclose(x, expected)


@FAST
@given(x=bn_inputs(3, dims=2, dtype=torch.float64))
def test_bn_inputs_are_valid_batchnorm_inputs(x: torch.Tensor) -> None:
    assert x.dim() == 4 and x.shape[1] == 3 and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    nn.BatchNorm2d(3).double().train()(x)  # at least 2 values per channel: no error


@FAST
@given(x=batches_for(ConvBNReLU()))
def test_batches_for_infers_a_conv_models_input(x: torch.Tensor) -> None:
    assert x.shape[1:] == (3, 8, 8) and 2 <= x.shape[0] <= 8
    assert ConvBNReLU()(x).shape == (x.shape[0], 4)


@FAST
@given(x=batches_for(MLPBN().double(), batch_sizes=st.just(5)))
def test_batches_for_infers_a_linear_models_input_and_dtype(x: torch.Tensor) -> None:
    assert x.shape == (5, 6) and x.dtype == torch.float64


@FAST
@given(x=batches_for(example=torch.zeros(2, 4, 5), batch_sizes=st.integers(3, 4)))
def test_batches_for_follows_an_example(x: torch.Tensor) -> None:
    assert x.shape[1:] == (4, 5) and x.shape[0] in (3, 4)


def test_batches_for_takes_the_first_conv_linear_or_bn_layer() -> None:
    assert find(batches_for(nn.Sequential(nn.Flatten(), NoBN())), lambda x: True).shape[1:] == (4,)


def test_batches_for_needs_something_to_go_on() -> None:
    with pytest.raises(UsageError, match=r"needs a model, an example batch or a sample_shape"):
        batches_for()
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(UsageError, match=r"cannot tell what input Sequential takes"):
        batches_for(model)

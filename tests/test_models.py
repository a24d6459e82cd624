"""The reference VGG16-BN: torchvision-compatible state dict and the CPU-sized variants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bncheck.errors import UsageError
from bncheck.models import ARCHS, INPUT_SHAPES, get_arch, vgg16_bn, vgg16_bn_small

# torchvision's vgg16_bn layout, written out from its documented structure: 13 conv layers
# (configuration "D"), each followed by BatchNorm2d and ReLU, five max-pools, and a classifier
# of three linear layers at features indices 0, 3 and 6.
_CONV_INDICES = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]
_CHANNELS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def _expected_state_dict_layout() -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rows: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    c_in = 3
    for idx, c in zip(_CONV_INDICES, _CHANNELS):
        rows.append((f"features.{idx}.weight", (c, c_in, 3, 3), torch.float32))
        rows.append((f"features.{idx}.bias", (c,), torch.float32))
        bn = idx + 1
        for name in ("weight", "bias", "running_mean", "running_var"):
            rows.append((f"features.{bn}.{name}", (c,), torch.float32))
        rows.append((f"features.{bn}.num_batches_tracked", (), torch.int64))
        c_in = c
    for idx, (out, inp) in zip((0, 3, 6), ((4096, 512 * 7 * 7), (4096, 4096), (1000, 4096))):
        rows.append((f"classifier.{idx}.weight", (out, inp), torch.float32))
        rows.append((f"classifier.{idx}.bias", (out,), torch.float32))
    return rows


@pytest.fixture(scope="module")
def meta_vgg16_bn() -> nn.Module:
    with torch.device("meta"):
        return vgg16_bn()


def test_state_dict_keys_shapes_dtypes_and_order_match_torchvision(meta_vgg16_bn):
    sd = meta_vgg16_bn.state_dict()
    got = [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]
    assert len(sd) == 97
    assert got == _expected_state_dict_layout()


def test_parameter_count_matches_torchvision(meta_vgg16_bn):
    assert sum(p.numel() for p in meta_vgg16_bn.parameters()) == 138_365_992


def test_conv_layers_keep_their_bias(meta_vgg16_bn):
    convs = [m for m in meta_vgg16_bn.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None for c in convs)


def test_a_torchvision_style_state_dict_loads_strictly():
    small = vgg16_bn(num_classes=7, width=0.0625)
    twin = vgg16_bn(num_classes=7, width=0.0625)
    result = twin.load_state_dict(small.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_bn_position_before_and_after_the_activation():
    before = vgg16_bn_small(width=0.0625).features
    after = vgg16_bn_small(width=0.0625, bn_position="after").features
    assert [type(m) for m in before[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in after[:3]] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]


def test_bn_position_is_validated():
    with pytest.raises(ValueError, match="bn_position must be 'before' or 'after'"):
        vgg16_bn_small(bn_position="sideways")  # type: ignore[arg-type]


def test_without_batch_norm_has_no_bn_layer():
    model = vgg16_bn_small(batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_small_configuration_runs_on_32x32_inputs():
    model = vgg16_bn_small(num_classes=10, width=0.125).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *INPUT_SHAPES["vgg16_bn_small"]))
    assert out.shape == (2, 10)


def test_width_multiplier_scales_every_conv_layer():
    model = vgg16_bn(width=0.25, small_input=True)
    convs = [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)]
    assert convs == [c // 4 for c in _CHANNELS]


def test_every_arch_builds_on_meta_and_unknown_names_suggest():
    for name, factory in ARCHS.items():
        with torch.device("meta"):
            assert isinstance(factory(), nn.Module), name
        assert name in INPUT_SHAPES
    with pytest.raises(UsageError, match="did you mean 'vgg16_bn'"):
        get_arch("vgg16bn")

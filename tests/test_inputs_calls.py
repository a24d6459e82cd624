"""How the audit calls the model with the example input, and the inputs it refuses.

A tuple is positional arguments, a dict keyword arguments, anything else (a list included)
one argument. Bad inputs (NaN, 0 samples) are an ``InputError`` that names the argument,
never bncheck's own exception reported as "the forward pass failed".
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from zoo import ConvBNReLU, image_batch

import bncheck
from bncheck.errors import InputError


class ListModel(nn.Module):
    """forward(images: list) -> one argument; spreading it would raise a TypeError."""

    def __init__(self) -> None:
        super().__init__()
        self.net = ConvBNReLU()
        # a log object, not a list attribute: an audit puts the contents of the module's own
        # list attributes back, and the test reads what the audit's passes did
        self.log = SimpleNamespace(calls=[])

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        assert isinstance(images, list), type(images)
        self.log.calls.append(len(images))
        return self.net(torch.stack(images))


class TwoArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = ConvBNReLU()

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(x * scale)


def _images(n: int, hw: int = 8) -> list[torch.Tensor]:
    return list(image_batch(n, hw=hw))


def test_a_list_is_one_argument() -> None:
    model = ListModel()
    report = bncheck.audit(model, _images(4))
    assert report.forward_error is None
    assert "normalization" not in report.skipped
    # the eval passes call it with lists of samples too (3 = sample 0 and two batch-mates)
    assert model.log.calls and set(model.log.calls) <= {4, 3, 2}


def test_a_tuple_is_positional_arguments_and_a_dict_keyword_arguments() -> None:
    x = image_batch(4)
    scale = torch.ones(4, 1, 1, 1)
    assert bncheck.audit(TwoArgs(), (x, scale)).forward_error is None
    assert bncheck.audit(TwoArgs(), {"x": x, "scale": scale}).forward_error is None


def test_a_tuple_holding_a_list_passes_the_list_as_one_argument() -> None:
    model = ListModel()
    assert bncheck.audit(model, (_images(3),)).forward_error is None


def test_the_batch_size_of_a_list_input_is_its_length() -> None:
    report = bncheck.audit(ListModel(), _images(2), select=["small-batch"])
    (model_wide,) = [f for f in report.findings if f.layer is None]
    assert model_wide.details["batch_size"] == 2  # not 3, the first image's channels


@pytest.mark.parametrize(
    "x, where",
    [
        (torch.empty(0, 3, 8, 8), "input has shape (0, 3, 8, 8)"),
        ([], "input is an empty list"),
        ((torch.empty(0, 3, 8, 8), torch.ones(1)), "input[0] has shape (0, 3, 8, 8)"),
        ({"x": torch.empty(0, 3, 8, 8), "scale": torch.ones(1)}, "input['x']"),
        (([],), "input[0] is an empty list"),
    ],
)
def test_a_batch_of_zero_samples_is_an_input_error_naming_it(x: object, where: str) -> None:
    with pytest.raises(InputError, match=r"the example input has 0 samples") as info:
        bncheck.audit(ConvBNReLU(), x)
    assert where in str(info.value)


def test_an_empty_batch_in_data_names_data() -> None:
    data = [image_batch(4), torch.empty(0, 3, 8, 8)]
    with pytest.raises(InputError, match=r"batch 2 of data= has 0 samples"):
        bncheck.audit(ConvBNReLU(), image_batch(4), data=data, select=["stat-drift"])


def test_nan_in_data_names_data_not_the_example_input() -> None:
    bad = image_batch(4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError) as info:
        bncheck.audit(ConvBNReLU(), image_batch(4), data=[image_batch(4), bad])
    text = str(info.value)
    assert text.startswith("batch 2 of data= has NaN/Inf values")
    assert "example input" not in text


def test_nan_in_the_example_input_still_names_it() -> None:
    x = image_batch(4)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match=r"^the example input has NaN/Inf values \(input,"):
        bncheck.audit(ConvBNReLU(), x)


def test_a_model_left_untouched_by_a_refused_input() -> None:
    model = ConvBNReLU()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError):
        bncheck.audit(model, torch.empty(0, 3, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_an_empty_tensor_beside_the_batch_is_not_zero_samples() -> None:
    class WithBoxes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvBNReLU()

        def forward(self, images: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
            return self.net(torch.stack(images)) + boxes.sum()

    report = bncheck.audit(WithBoxes(), {"images": _images(4), "boxes": torch.empty(0, 4)})
    assert report.forward_error is None


def test_a_list_of_batched_feature_maps_keeps_its_samples_in_dim_0() -> None:
    # forward(features: list) with three (8, C, H, W) maps: the BN layers see N = 8, so the
    # samples are rows of each map, not the three list elements
    class FeatureHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
            pooled = sum(self.bn(f).mean((2, 3)) for f in features)
            return self.fc(pooled)

    model = FeatureHead().train()
    with torch.no_grad():
        model([torch.randn(16, 4, 4, 4) for _ in range(3)])
    model.eval()
    feats = [torch.randn(8, 4, 4, 4) for _ in range(3)]
    report = bncheck.audit(model, feats, select=["eval-batch-dependence", "small-batch"])
    assert report.findings == []
    bad = bncheck.audit(
        model.train(), feats, select=["small-batch"], min_batch_size=9, min_samples_per_channel=1
    )
    (finding,) = bad.findings
    assert finding.details["batch_size"] == 8


def test_data_batches_that_are_lists_of_images_are_the_input_itself() -> None:
    # a detector's loader without targets yields lists of images, like the example input:
    # each list is one batch, not an (input, target) pair
    model = ListModel()
    data = [_images(4), _images(4, hw=8)]
    report = bncheck.audit(model, _images(4), data=data, select=["stat-drift"])
    assert "stat-drift" not in report.skipped, report.skipped
    assert report.forward_error is None

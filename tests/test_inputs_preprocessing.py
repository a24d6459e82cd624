"""``input-not-normalized`` judges what the first weight layer receives, after the model's own
preprocessing: raw uint8 pixels cast to float inside ``forward`` are flagged, float 0-255
pixels that the model normalises itself are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck

RULE = ["input-not-normalized"]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _pixels(n: int = 8, hw: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, hw, hw), generator=g, dtype=torch.uint8)


def _body() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())


class CastInForward(nn.Module):
    """Takes whatever the loader gives and casts it; ``normalize`` adds ``(x / 255 - mean) /
    std`` in ``forward``."""

    def __init__(self, normalize: bool) -> None:
        super().__init__()
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.body = _body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.normalize:
            x = (x / 255.0 - self.mean) / self.std
        return self.body(x)


class Normalize(nn.Module):
    """A normalisation layer as timm and torchvision transforms put it in front of a model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def test_uint8_pixels_cast_inside_forward_are_flagged() -> None:
    report = bncheck.audit(CastInForward(normalize=False), _pixels(), select=RULE)
    (finding,) = report.findings
    assert finding.details["where"] == "input"
    assert finding.details["dtype"] == "torch.uint8"
    assert finding.details["first_layer"] == "body.0 (Conv2d)"
    assert finding.details["integer_valued"] and finding.details["max"] > 200
    assert "uint8, cast to float inside the model" in finding.message


def test_uint8_pixels_normalised_inside_forward_are_not_flagged() -> None:
    assert bncheck.audit(CastInForward(normalize=True), _pixels(), select=RULE).findings == []


def test_float_pixels_the_model_normalises_itself_are_not_flagged() -> None:
    x = _pixels().float()  # 0-255 floats: the raw input alone looks unnormalised
    assert bncheck.audit(CastInForward(normalize=True), x, select=RULE).findings == []
    # the same batch into a model that does not normalise it is still flagged
    (finding,) = bncheck.audit(CastInForward(normalize=False), x, select=RULE).findings
    assert finding.details["first_layer"] == "body.0 (Conv2d)"
    assert not finding.details["preprocessed"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_a_normalisation_module_in_front_of_the_model_counts(dtype: torch.dtype) -> None:
    model = nn.Sequential(Normalize(), _body())
    assert bncheck.audit(model, _pixels().to(dtype), select=RULE).findings == []


def test_preprocessing_that_leaves_values_unnormalised_is_flagged_as_received() -> None:
    """A model that only resizes and scales by 2: what the conv receives is judged, and the
    message says it is after the model's preprocessing."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _body()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(F.interpolate(x, scale_factor=0.75) * 2.0)

    x = torch.rand(8, 3, 16, 16) * 255
    (finding,) = bncheck.audit(Scale(), x, select=RULE).findings
    assert finding.details["preprocessed"]
    assert "(8, 3, 12, 12)" in finding.message  # the resized tensor the conv received
    assert "after the model's own preprocessing" in finding.message
    assert finding.details["mean"] == pytest.approx(
        float((F.interpolate(x, scale_factor=0.75) * 2).mean()), rel=1e-5
    )


def test_uint8_into_bn_first_is_not_flagged() -> None:
    class BNFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn0 = nn.BatchNorm2d(3)
            self.body = _body()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(self.bn0(x.float() / 2))

    assert bncheck.audit(BNFirst(), _pixels(), select=RULE).findings == []


def test_token_ids_into_an_embedding_are_not_judged() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 16)
            with torch.no_grad():
                self.emb.weight.mul_(100)  # large embeddings: still not a network input
            self.head = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids).mean(1))

    ids = torch.randint(0, 1000, (8, 12))
    assert bncheck.audit(Tokens(), ids, select=RULE).findings == []


def test_targets_reaching_no_layer_are_not_judged_and_images_are() -> None:
    class WithTargets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _body()

        def forward(self, images: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
            out = self.body(images.float())
            return out.mean() + targets["boxes"].float().mean()

    boxes = torch.tensor([[10.0, 20.0, 120.0, 160.0]]).repeat(8, 1)
    report = bncheck.audit(WithTargets(), (_pixels(), {"boxes": boxes}), select=RULE)
    assert [f.details["where"] for f in report.findings] == ["input[0]"]


def test_list_of_uint8_images_stacked_in_forward_is_one_finding() -> None:
    class Stacks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _body()

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return self.body(torch.stack(images).float())

    images = list(_pixels(4))
    (finding,) = bncheck.audit(Stacks(), images, select=RULE).findings
    assert finding.details["where"] == "input"
    assert "(4, 3, 16, 16)" in finding.message


class RCNNTransform(nn.Module):
    """Built like torchvision's GeneralizedRCNNTransform: normalise each image with the
    model's own mean and std, resize it through ``image[None]`` (indexing, which the tracer
    does not follow), pad into one batch."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for image in images:
            mean = torch.as_tensor(self.mean, dtype=image.dtype)
            std = torch.as_tensor(self.std, dtype=image.dtype)
            image = (image - mean[:, None, None]) / std[:, None, None]
            out.append(F.interpolate(image[None], scale_factor=1.5, mode="bilinear")[0])
        h = max(i.shape[1] for i in out)
        w = max(i.shape[2] for i in out)
        batch = out[0].new_full((len(out), 3, h, w), 0.0)
        for img, pad in zip(out, batch):
            pad[:, : img.shape[1], : img.shape[2]].copy_(img)
        return batch


class Detector(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.transform = RCNNTransform(mean, std)
        self.backbone = _body()

    def forward(self, images: list[torch.Tensor], targets: object = None) -> torch.Tensor:
        return self.backbone(self.transform(images))


def _targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 160.0]]), "labels": torch.tensor([1])}] * n


def test_a_detector_that_normalises_0_255_pixels_itself_is_not_flagged() -> None:
    """Caffe-style statistics in the model's transform: 0-255 pixels are what it expects."""
    model = Detector(tuple(m * 255 for m in MEAN), tuple(s * 255 for s in STD))
    images = [t.float() for t in _pixels(2)]
    assert bncheck.audit(model, (images, _targets(2)), select=RULE).findings == []


def test_a_detector_fed_0_255_pixels_for_0_1_statistics_is_flagged_as_received() -> None:
    model = Detector(MEAN, STD)
    images = [t.float() for t in _pixels(2)]
    (finding,) = bncheck.audit(model, (images, _targets(2)), select=RULE).findings
    assert finding.details["where"] == "input[0]"
    assert finding.details["first_layer"] == "backbone.0 (Conv2d)"
    assert finding.details["mean"] > 100  # (128 - 0.45) / 0.225, not the raw 128
    assert "(2, 3, 24, 24)" in finding.message  # the resized batch the backbone received
    assert (
        bncheck.audit(model, ([i / 255 for i in images], _targets(2)), select=RULE).findings == []
    )


def test_token_ids_indexing_a_table_are_not_judged() -> None:
    """Indexing loses the trail from the input; an int64 input is then not taken to be what
    the first layer receives (uint8 pixels would be)."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(1000, 16) * 100)
            self.head = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.table[ids].mean(1))

    ids = torch.randint(0, 1000, (8, 12))
    assert bncheck.audit(Table(), ids, select=RULE).findings == []

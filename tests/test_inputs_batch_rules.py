"""The batch-size rules judge only training batches.

``small-batch`` and ``single-value-per-channel`` judge the example input only where it is a
training batch: BN layers the user runs in train mode (in eval mode BN normalises with its
running statistics, so the batch size says nothing), and an input the user gave (not a
synthetic one), unless ``training_batch=`` says otherwise. When they do not judge, the report
has a note saying why. The structures below are the ones real models warned on in eval mode:
SE blocks on 1x1 maps, ASPP image pooling, BN1d heads (LeViT style) and an Inception-style aux
head that runs in train mode only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn
from zoo import MLPBN, TwoBlock, image_batch

import bncheck

BATCH_RULES = ("small-batch", "single-value-per-channel")


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class SEBlock(nn.Module):
    """Squeeze-excitation with BN on the pooled 1x1 map (SK / split-attention style)."""

    def __init__(self, c: int, r: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1, bias=False)
        self.bn = nn.BatchNorm2d(c // r)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.bn(self.fc1(s)))))


class ASPPPooling(nn.Sequential):
    """DeepLab's image-pooling branch: global pool -> 1x1 conv -> BN on a 1x1 map."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear")


class SegNet(nn.Module):
    """A backbone, then ASPP (a 1x1 branch and the pooling branch), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(3, 8), conv_bn(8, 8, stride=2))
        self.branch = conv_bn(8, 8, k=1)
        self.pool = ASPPPooling(8, 8)
        self.project = conv_bn(16, 8, k=1)
        self.classifier = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return self.classifier(self.project(torch.cat([self.branch(f), self.pool(f)], 1)))


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.se = SEBlock(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.se(self.stem(x)).mean((2, 3)))


class BN1dHead(nn.Module):
    """LeViT / EfficientViT style: BatchNorm1d on pooled features before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.head_bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_bn(self.stem(x).mean((2, 3))))


class AuxNet(nn.Module):
    """Inception style: an auxiliary head with BN on a 1x1 map, run in train mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.aux = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        f = self.stem(x)
        out = self.fc(f.mean((2, 3)))
        if self.training:
            return out, self.aux(f).flatten(1)
        return out


FAMILIES = {"se": SENet, "aspp": SegNet, "bn1d-head": BN1dHead, "aux-head": AuxNet}


def trained(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(image_batch(16, hw=8, seed=seed))
    return model.eval()


def batch_findings(report: bncheck.Report) -> list[str]:
    return [f.rule for f in report.findings if f.rule in BATCH_RULES]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("n", [1, 2])
def test_eval_mode_models_get_no_batch_size_finding(family: str, n: int) -> None:
    model = trained(FAMILIES[family]())
    report = bncheck.audit(model, image_batch(n, hw=8))
    assert batch_findings(report) == []
    assert [f for f in report.findings if f.severity.value != "info"] == []
    assert any(
        "did not judge the batch size" in note and "eval mode" in note for note in report.notes
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_mode_models_still_get_the_batch_size_findings(family: str) -> None:
    model = FAMILIES[family]().train()
    report = bncheck.audit(model, image_batch(2, hw=8))
    found = [f for f in report.findings if f.rule == "small-batch"]
    assert any(f.layer is None and f.details["batch_size"] == 2 for f in found)
    # the 1x1 / pooled layers see 2 values per channel: named one by one
    assert any(f.layer is not None and f.details["samples_per_channel"] == 2 for f in found)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_mode_batch_of_one_is_still_an_error(family: str) -> None:
    report = bncheck.audit(FAMILIES[family]().train(), image_batch(1, hw=8))
    assert "single-value-per-channel" in batch_findings(report)


def test_training_batch_true_judges_an_eval_mode_model() -> None:
    report = bncheck.audit(trained(SENet()), image_batch(1, hw=8), training_batch=True)
    (single,) = [f for f in report.findings if f.rule == "single-value-per-channel"]
    assert single.layer == "se.bn"
    assert any(f.rule == "small-batch" and f.layer is None for f in report.findings)


def test_training_batch_false_judges_nothing_and_says_so() -> None:
    report = bncheck.audit(SENet().train(), image_batch(1, hw=8), training_batch=False)
    assert batch_findings(report) == []
    assert any("training_batch=False" in note for note in report.notes)


def test_only_the_layers_the_user_trains_are_judged() -> None:
    # a frozen-backbone fine-tune: the stem's BN stays in eval mode, the head trains
    model = BN1dHead().train()
    model.stem.eval()
    report = bncheck.audit(model, image_batch(2, hw=8))
    layers = {f.layer for f in report.findings if f.rule == "small-batch"}
    assert layers == {None, "head_bn"}
    assert any("1 BN layer(s) (stem.1) are in eval mode" in note for note in report.notes)


def test_a_synthetic_batch_of_one_gets_one_note_not_an_error() -> None:
    report = bncheck.audit(SegNet().train(), image_batch(1, hw=8), synthetic_input=True)
    assert batch_findings(report) == []
    notes = [n for n in report.notes if "synthetic input" in n]
    assert len(notes) == 1 and "single-value-per-channel" in notes[0]


def test_resnet_style_model_at_batch_1_in_eval_is_clean() -> None:
    # before: "batch size 1 < 8" on a model in eval mode, where the batch size does not matter
    model = zoo.trained(TwoBlock(), image_batch(16))
    report = bncheck.audit(model, image_batch(1))
    assert report.findings == []
    assert report.forward_error is None


def test_bn1d_mlp_at_batch_1_in_eval_is_clean() -> None:
    model = zoo.trained(MLPBN(), torch.randn(16, 6))
    report = bncheck.audit(model, torch.randn(1, 6))
    assert batch_findings(report) == []


@pytest.mark.parametrize("frozen", [True, False])
def test_a_counterless_layer_is_judged_on_its_batch_when_it_updates_its_buffers(frozen):
    torch.manual_seed(0)
    norm = zoo.FrozenBN2d(8) if frozen else zoo.CounterlessBN(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU()).train()
    report = bncheck.audit(model, image_batch(2), select=["small-batch", "bias-before-bn"])
    found = {(f.rule, f.layer) for f in report.findings}
    if frozen:  # normalises with its running statistics: the batch and the bias matter
        assert found == set()
    else:  # batch-normalises: two samples are too few (a finding on the batch), and the
        # conv bias is cancelled
        assert found == {("small-batch", None), ("bias-before-bn", "1")}

"""Detection-style inputs: a list of (3, H, W) images, plus a list of target dicts in train mode.

``TinyDetector`` is built like a torchvision detector (no torchvision needed): it takes
``forward(images, targets=None)``, stacks the images into one (N, 3, H, W) batch for its
backbone, needs targets in train mode (and raises the same AssertionError as torchvision
without them), and returns a loss dict in train mode, a list of per-image dicts in eval.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from bn_mutants import BatchStatsInEvalBN
from torch import nn

import bncheck

TRAIN_STAGE = ("normalization", "ema-update", "bn-reused", "small-batch", "input-not-normalized")
EVAL_STAGE = ("eval-batch-dependence", "eval-nondeterminism", "eval-updates-stats")


class TinyDetector(nn.Module):
    def __init__(self, normalize: bool = True, bn: nn.Module | None = None) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            bn if bn is not None else nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.box_head = nn.Linear(8, 4)
        self.cls_head = nn.Linear(8, 3)
        # a log object, not a list attribute: an audit puts the contents of the module's own
        # list attributes back, and the tests read what the audit's passes saw
        self.log = SimpleNamespace(seen=[])

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> object:
        if self.training and targets is None:
            raise AssertionError("targets should not be none when in training mode")
        assert isinstance(images, list) and all(img.dim() == 3 for img in images)
        if not self.training:
            self.log.seen.append([img.clone() for img in images])
        x = torch.stack(images)
        if self.normalize:
            x = (x - 0.45) / 0.225
        features = self.backbone(x).mean((2, 3))
        boxes, logits = self.box_head(features), self.cls_head(features)
        if self.training:
            assert targets is not None
            gt = torch.stack([t["boxes"][0] for t in targets])
            labels = torch.stack([t["labels"][0] for t in targets])
            return {
                "loss_box": F.l1_loss(boxes, gt),
                "loss_cls": F.cross_entropy(logits, labels),
            }
        # one row per detection; here as many detections as images, so a per-image tensor
        # has the batch's length as dim 0 (as torchvision's K boxes can)
        k = len(images)
        return [
            {"boxes": b.expand(k, 4), "scores": s.softmax(-1).expand(k, 3), "labels": s.argmax()}
            for b, s in zip(boxes, logits)
        ]


def images(n: int, hw: int = 16, scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, hw, hw, generator=g) * scale for _ in range(n)]


def targets(n: int) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[10.0, 20.0, 120.0, 160.0], [40.0, 30.0, 200.0, 220.0]]),
            "labels": torch.tensor([1, 2]),
            "masks": torch.ones(2, 16, 16, dtype=torch.uint8),
        }
        for _ in range(n)
    ]


def trained_detector(**kwargs: object) -> TinyDetector:
    model = TinyDetector(**kwargs)  # type: ignore[arg-type]
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(images(8, seed=seed), targets(8))
    model.log.seen.clear()
    return model.eval()


def _rules(report: bncheck.Report, severity: str = "warning") -> list[str]:
    order = ["info", "warning", "error"]
    return [
        f.rule for f in report.findings if order.index(f.severity.value) >= order.index(severity)
    ]


def test_eval_passes_feed_real_samples_never_colour_channels() -> None:
    # 5 images of 3 channels: the probe's batch-mates are real images (list elements); with
    # the images' 3 channels read as the batch, they would come out shuffled or perturbed
    model = trained_detector()
    given = images(5)
    report = bncheck.audit(model, given, select=list(EVAL_STAGE))
    assert report.findings == [] and not report.skipped
    assert model.log.seen, "the eval passes did not run"
    for batch in model.log.seen:
        assert len(batch) in (2, 3, 5)
        for img in batch:
            assert any(torch.equal(img, g) for g in given), "an image was not a real sample"


def test_eval_batch_dependence_is_found_across_images() -> None:
    model = trained_detector(bn=BatchStatsInEvalBN(8))
    report = bncheck.audit(model, images(5), select=["eval-batch-dependence"])
    (finding,) = [f for f in report.findings if f.rule == "eval-batch-dependence"]
    assert finding.layer == "backbone.1" and finding.severity.value == "error"
    assert "samples 3, 4 instead of 1, 2" in finding.message


def test_a_per_image_output_list_is_compared_for_sample_0_only() -> None:
    # 2 images: batch-mates are perturbed copies, so image 1's output differs between passes;
    # only image 0's entry of the output list may be compared
    report = bncheck.audit(trained_detector(), images(2), select=list(EVAL_STAGE))
    assert report.findings == []


def test_eval_mode_detector_without_targets_is_not_a_full_pass() -> None:
    report = bncheck.audit(trained_detector(), images(2))
    for rid in TRAIN_STAGE:
        assert "(images, targets)" in report.skipped[rid], rid
    for rid in EVAL_STAGE:
        assert rid not in report.skipped
    assert any("audit(model, (images, targets))" in note for note in report.notes)
    assert report.forward_error is not None
    assert _rules(report) == []


def test_train_mode_with_targets_judges_images_only() -> None:
    model = TinyDetector().train()
    report = bncheck.audit(model, (images(2), targets(2)))
    assert report.forward_error is None and not any(
        "targets" in reason for reason in report.skipped.values()
    )
    # the target boxes (values up to 220) are not network input
    assert "input-not-normalized" not in _rules(report)
    (batch,) = [f for f in report.findings if f.rule == "small-batch" and f.layer is None]
    assert batch.details["batch_size"] == 2  # the N the backbone's BN sees, not 3 channels


def test_raw_pixel_images_in_a_list_are_one_finding() -> None:
    model = TinyDetector(normalize=False).train()
    report = bncheck.audit(
        model, (images(4, scale=255.0), targets(4)), select=["input-not-normalized"]
    )
    (finding,) = report.findings
    assert finding.details["where"] == "input[0]"
    assert "(4, 3, 16, 16)" in finding.message


@pytest.mark.parametrize("n", [1, 2, 4])
def test_eval_mode_detector_gets_no_batch_size_finding(n: int) -> None:
    report = bncheck.audit(trained_detector(), (images(n), targets(n)))
    assert [r for r in _rules(report) if r in ("small-batch", "single-value-per-channel")] == []
    assert report.forward_error is None

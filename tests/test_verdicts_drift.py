"""stat-drift names the cause: never trained, too few updates, lag behind the weights, or a
shift of the data; lag and too few updates are info with a recalibration hint."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from zoo import ImageListDetector, TwoBlock, TwoInputs, detection_loader, image_batch, trained

import bncheck


def drift(model: nn.Module, data: list[torch.Tensor], **kw) -> list[bncheck.Finding]:
    return bncheck.audit(model, data[0], data=data, select=["stat-drift"], **kw).findings


def data(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    return [image_batch(16, seed=seed + s) for s in range(n)]


def converged() -> TwoBlock:
    """Statistics collected on the data distribution at the current weights."""
    torch.manual_seed(0)
    model = TwoBlock()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: exact statistics of the batches seen
    trained(model, torch.cat(data(seed=100, n=8)), steps=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
            m.num_batches_tracked.fill_(500)
    return model.eval()


def test_converged_statistics_on_the_same_data_are_quiet() -> None:
    assert drift(converged(), data()) == []


def test_weights_that_moved_after_the_statistics_is_lag_at_info() -> None:
    model = converged()
    with torch.no_grad():  # the last updates of the deeper conv, not yet in the averages
        model.block2[0].weight.mul_(3.0)
    (finding,) = drift(model, data())
    assert finding.layer == "block2.1"
    assert finding.severity == "info" and finding.details["cause"] == "lag"
    assert "lag the weights" in finding.message and "(block1.1) agrees" in finding.message
    assert "small batches" in finding.message and "large batches" in finding.message
    assert "bncheck.recalibrate" in finding.message and "update_bn" in finding.message
    assert "preprocessing" not in finding.message
    update_bn(data(seed=50), model)  # the fix it suggests
    assert drift(model.eval(), data()) == []


def test_shifted_data_is_a_warning_that_blames_the_data() -> None:
    model = converged()
    shifted = [3 * x + 2 for x in data()]
    findings = drift(model, shifted)
    assert [f.layer for f in findings][0] == "block1.1"
    assert {f.severity for f in findings} == {"warning"}
    assert {f.details["cause"] for f in findings} == {"data shift"}
    assert "this is the first BN layer" in findings[0].message
    assert "preprocessing" in findings[0].message


def test_statistics_with_few_updates_are_info_and_say_how_many() -> None:
    torch.manual_seed(0)
    model = trained(TwoBlock(), data(seed=100, n=1)[0], steps=3)
    findings = drift(model, data())
    assert findings and {f.severity for f in findings} == {"info"}
    assert {f.details["cause"] for f in findings} == {"few updates"}
    assert "only 3 updates at momentum 0.1, so 73% of their initial values" in findings[0].message


def test_shift_on_statistics_with_few_updates_is_still_a_shift() -> None:
    torch.manual_seed(0)
    model = trained(TwoBlock(), data(seed=100, n=1)[0], steps=3)
    findings = drift(model, [10 * x + 5 for x in data()])
    assert findings[0].layer == "block1.1" and findings[0].details["cause"] == "data shift"
    assert findings[0].severity == "warning"


def test_a_counter_at_0_beside_statistics_that_moved_is_not_few_updates() -> None:
    # an EMA copy whose integer counter the averaging truncated (timm's ModelEmaV2): the
    # statistics moved, so "0 updates, 100% of the initial values remain" would be false
    torch.manual_seed(0)
    model = trained(TwoBlock(), data(seed=100, n=1)[0], steps=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    findings = drift(model, data())
    assert findings and "few updates" not in {f.details["cause"] for f in findings}
    assert not any("only 0 updates" in f.message for f in findings)


def test_never_trained_statistics_say_so() -> None:
    model = TwoBlock().train()  # statistics at 0 and 1, counter 0; train mode
    findings = drift(model, [3 * x + 1 for x in data()])
    assert findings and {f.details["cause"] for f in findings} == {"never trained"}
    assert "never trained" in findings[0].message and findings[0].severity == "warning"


def test_never_trained_layers_in_eval_mode_are_left_to_untrained_stats() -> None:
    model = TwoBlock().eval()
    x = [3 * x + 1 for x in data()]
    report = bncheck.audit(model, x[0], data=x, select=["stat-drift", "untrained-stats"])
    assert report.rules_found() == {"untrained-stats"}


def _bn_with_stats(mean: float) -> nn.Module:
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.num_batches_tracked.fill_(100)
    return nn.Sequential(bn).eval()


def test_drift_within_the_batch_to_batch_spread_is_not_evidence() -> None:
    g = torch.Generator().manual_seed(0)
    steady = [torch.randn(64, 4, generator=g) for _ in range(4)]
    # batches whose means scatter by about one std (e.g. class-sorted): same pooled statistics
    centres = [0.9, -0.9, 0.9, -0.9]
    scattered = [c + 0.5 * torch.randn(64, 4, generator=g) for c in centres]
    (finding,) = drift(_bn_with_stats(0.8), steady)
    assert finding.details["cause"] == "data shift"
    assert drift(_bn_with_stats(0.8), scattered) == []
    assert drift(_bn_with_stats(4.0), scattered)  # far beyond the spread: still found


def _trained_eval(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(*inputs)
    return model.eval()


def test_a_detection_loader_with_torchvision_collate_feeds_the_data_pass() -> None:
    """torchvision's detection recipe collates a batch into (tuple of images, tuple of
    targets); the model takes the images as one list, as the example input shows."""
    torch.manual_seed(0)
    model = ImageListDetector()
    _trained_eval(model.body, torch.randn(8, 3, 32, 32))
    loader = detection_loader()
    example = [torch.randn(3, 32, 32) for _ in range(2)]
    report = bncheck.audit(model, example, data=loader, select=["stat-drift"])
    assert report.complete and "stat-drift" not in report.skipped
    assert [f.rule for f in report.findings] == ["stat-drift"]


def test_a_default_collated_list_of_two_inputs_is_called_like_the_example_tuple() -> None:
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = _trained_eval(TwoInputs(), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    samples = [((torch.randn(3, 16, 16), torch.randn(3, 16, 16) * 5 + 2), 0) for _ in range(8)]
    loader = DataLoader(samples, batch_size=4)  # yields [[x1, x2], y]: lists
    example = (torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    report = bncheck.audit(model, example, data=loader, select=["stat-drift"])
    assert report.complete and "stat-drift" not in report.skipped
    assert {f.layer for f in report.findings} == {"b.1"}  # only the shifted input's branch


def test_a_data_pass_that_fails_leaves_the_report_incomplete() -> None:
    """stat-drift was asked for (data= given) and could not run: a gate must not pass."""
    torch.manual_seed(0)
    model = _trained_eval(TwoBlock(), image_batch(16))
    bad = [torch.randn(4, 5, 16, 16)]  # five channels into a three-channel model
    report = bncheck.audit(model, image_batch(16), data=bad, select=["stat-drift"])
    assert not report.complete and not report.ok
    assert any("data=" in reason for reason in report.incomplete)
    assert "stat-drift" in report.skipped


def test_a_batch_input_takes_the_example_container_only_for_the_same_kind_of_items() -> None:
    from bncheck.probes import _batch_to_input

    images = [torch.randn(3, 8, 8), torch.randn(3, 10, 6)]
    targets = [{"boxes": torch.zeros(0, 4)}] * 2
    pair = (torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    # torchvision's detection collate: a tuple of images, the example a list of images
    got = _batch_to_input((tuple(images), tuple(targets)), images)
    assert isinstance(got, list) and all(a is b for a, b in zip(got, images))
    # a default-collated list of a two-input model's inputs, the example a tuple of two
    got = _batch_to_input([list(pair), torch.zeros(4)], pair)
    assert isinstance(got, tuple) and len(got) == 2
    # the example (images, targets) (a detector called with targets), a batch of images
    # alone: the images stay one list argument
    got = _batch_to_input((images, targets), (images, targets))
    assert isinstance(got, list) and len(got) == 2
    # items of another kind than the example's: left as they are
    got = _batch_to_input([[torch.randn(4, 3), torch.randn(4, 3)], 0], pair)
    assert isinstance(got, list)


class _TrainableDetector(ImageListDetector):
    """Called with (images, targets) in train mode, like torchvision's detectors."""

    def forward(  # type: ignore[override]
        self, images: list[torch.Tensor], targets: list[dict] | None = None
    ) -> list[torch.Tensor]:
        if not isinstance(images, list):
            raise TypeError(f"images must be a list, got {type(images).__name__}")
        return super().forward(images)


def test_a_detector_audited_with_targets_takes_the_loader_images_as_one_list() -> None:
    torch.manual_seed(0)
    model = _TrainableDetector()
    _trained_eval(model.body, torch.randn(8, 3, 32, 32))
    loader = detection_loader()
    images = [torch.randn(3, 32, 32) for _ in range(2)]
    example = (images, [{"boxes": torch.zeros(0, 4)}] * 2)
    report = bncheck.audit(model, example, data=loader, select=["stat-drift"])
    assert report.complete and [f.rule for f in report.findings] == ["stat-drift"]


def test_batches_of_a_two_input_model_without_targets_are_the_inputs() -> None:
    torch.manual_seed(0)
    model = _trained_eval(TwoInputs(), torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    batches = [[torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16) * 5 + 2] for _ in range(3)]
    example = (torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    report = bncheck.audit(model, example, data=batches, select=["stat-drift"])
    assert report.complete and {f.layer for f in report.findings} == {"b.1"}


@pytest.mark.parametrize("empty", [[], iter([])])
def test_data_without_a_batch_leaves_the_report_incomplete(empty: object) -> None:
    model = _trained_eval(TwoBlock(), image_batch(16))
    report = bncheck.audit(model, image_batch(16), data=empty, select=["stat-drift"])
    assert not report.complete and any("no batch" in r for r in report.incomplete)

"""Every forward rule: a layer or model with exactly that bug is caught, its twin is not."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bn_mutants import (
    BatchStatsInEvalBN,
    BiasedVarBN,
    EvalUpdatingBN,
    HandBN,
    KerasMomentumBN,
    Net,
    NoCounterBN,
    NoisyEvalBN,
    NoUpdateBN,
    UnbiasedNormBN,
    WrongAxesBN,
)
from torch import nn
from zoo import MLPBN, ConvBNReLU, TwoBlock, image_batch, trained

import bncheck

NUMERIC = [
    "normalization",
    "ema-update",
    "eval-batch-dependence",
    "eval-nondeterminism",
    "eval-updates-stats",
]


def _found(report: bncheck.Report, rule: str) -> list[bncheck.Finding]:
    return [f for f in report.findings if f.rule == rule]


def _audit_norm(norm: nn.Module, x: torch.Tensor | None = None, **kw: object) -> bncheck.Report:
    torch.manual_seed(0)
    return bncheck.audit(Net(norm), image_batch(8) if x is None else x, select=NUMERIC, **kw)


# ---- the correct twins -----------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None, 0.9])
def test_hand_written_correct_bn_passes(momentum: float | None) -> None:
    report = _audit_norm(HandBN(8, momentum=momentum))
    assert report.findings == []


def test_hand_written_bn_after_some_training_passes() -> None:
    model = Net(HandBN(8))
    trained(model, image_batch(8, seed=3))
    report = bncheck.audit(model, image_batch(8), select=NUMERIC)
    assert report.findings == []


# ---- normalization ---------------------------------------------------------------------------
def test_wrong_axes_is_caught_by_normalization() -> None:
    report = _audit_norm(WrongAxesBN(8))
    (finding,) = _found(report, "normalization")
    assert finding.layer == "bn"
    assert finding.severity == "error"
    assert finding.message.startswith("bn (WrongAxesBN): ")
    assert "> tol" in finding.message
    assert finding.details["max_error"] > finding.details["tolerance"]
    assert _found(report, "ema-update") == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_are_judged_at_their_own_rounding(dtype: torch.dtype) -> None:
    # PyTorch sums float16/bfloat16 in float32: the budget is one rounding to the narrow
    # type, not one per halving of n, so a wrong normalisation shows in bfloat16 too
    x = image_batch(32, hw=16, seed=2).to(dtype)
    broken = bncheck.audit(Net(WrongAxesBN(8)).to(dtype), x, select=NUMERIC)
    (finding,) = _found(broken, "normalization")
    assert finding.layer == "bn"
    for model in (TwoBlock(), Net(HandBN(8))):
        trained(model, image_batch(32, hw=16, seed=3))
        assert bncheck.audit(model.to(dtype), x, select=NUMERIC).findings == []


class Autocast(nn.Module):
    """Runs ``inner`` under CPU autocast: a hand-written BN computes in bfloat16 there and
    returns float32 (its float32 gamma promotes the result)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x)


def test_a_layer_computing_in_bfloat16_under_autocast_is_judged_at_bfloat16() -> None:
    x = image_batch(32, hw=16, seed=2)
    torch.manual_seed(0)
    assert bncheck.audit(Autocast(Net(HandBN(8))), x, select=NUMERIC).findings == []
    broken = bncheck.audit(Autocast(Net(WrongAxesBN(8))), x, select=NUMERIC)
    assert [f.layer for f in _found(broken, "normalization")] == ["inner.bn"]


def test_normalising_with_the_unbiased_variance_is_caught() -> None:
    report = _audit_norm(UnbiasedNormBN(8), image_batch(2, hw=4))
    (finding,) = _found(report, "normalization")
    assert "variance" in finding.details["check"]
    assert finding.details["expected_var"] == pytest.approx(1.0, abs=1e-3)


def test_normalization_is_measured_before_an_inplace_relu_overwrites_the_output() -> None:
    model = TwoBlock()  # BN -> ReLU(inplace=True) in nn.Sequential
    report = bncheck.audit(model, image_batch(8), select=["normalization"])
    assert report.findings == []
    assert "normalization" not in report.skipped


class CustomDoubleBN(nn.BatchNorm2d):
    """Scales the BN output by 2 after normalising: a normalization bug."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            2
            * F.batch_norm(
                x, self.running_mean, self.running_var, None, None, self.training, 0.1, self.eps
            )
            * self.weight.reshape(1, -1, 1, 1)
        )


def test_affine_false_and_gamma_zero_channels_are_handled() -> None:
    x = image_batch(8)
    report = _audit_norm(nn.BatchNorm2d(8, affine=False), x)
    assert report.findings == []
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.weight[:4] = 0.0
        bn.bias.copy_(torch.linspace(-2, 2, 8))
    assert _audit_norm(bn, x).findings == []


# ---- ema-update ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, words",
    [
        (BiasedVarBN, "biased"),
        (KerasMomentumBN, "Keras"),
        (NoUpdateBN, "not updated"),
    ],
)
def test_wrong_running_update_is_caught(cls: type[HandBN], words: str) -> None:
    report = _audit_norm(cls(8), image_batch(4, hw=4))
    (finding,) = _found(report, "ema-update")
    assert finding.layer == "bn"
    assert words in finding.message
    assert _found(report, "normalization") == []


def test_missing_counter_increment_is_caught() -> None:
    report = _audit_norm(NoCounterBN(8))
    (finding,) = _found(report, "ema-update")
    assert "num_batches_tracked went to 0, expected 1" in finding.message
    assert finding.details["num_batches_tracked"] == {"observed": 0, "expected": 1}


def test_momentum_changed_after_construction_is_caught() -> None:
    class Sneaky(HandBN):
        def factor(self) -> float:
            return 0.3  # uses 0.3 while the attribute says 0.1

    report = _audit_norm(Sneaky(8))
    (finding,) = _found(report, "ema-update")
    assert "momentum 0.3" in finding.message


def test_biased_variance_store_with_cumulative_average_is_caught() -> None:
    bn = BiasedVarBN(8, momentum=None)
    bn.num_batches_tracked.fill_(3)
    report = _audit_norm(bn, image_batch(4, hw=4))
    (finding,) = _found(report, "ema-update")
    assert "1/4" in finding.message


def test_standard_bn_with_tracking_flipped_off_is_not_an_ema_error() -> None:
    bn = nn.BatchNorm2d(8)
    bn.track_running_stats = False
    assert _found(_audit_norm(bn), "ema-update") == []


# ---- eval rules ------------------------------------------------------------------------------
def test_batch_statistics_in_eval_are_caught_at_the_first_layer() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        BatchStatsInEvalBN(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1, bias=False),
        nn.BatchNorm2d(4),
    )
    report = bncheck.audit(model, image_batch(8), select=NUMERIC)
    (finding,) = _found(report, "eval-batch-dependence")
    assert finding.layer == "4"
    assert "this layer causes it" in finding.message
    assert finding.details["cause_upstream"] is False


def test_correct_eval_is_batch_independent() -> None:
    report = _audit_norm(BatchStatsInEvalBN(8).__class__.__mro__[1](8))
    assert _found(report, "eval-batch-dependence") == []


def test_track_running_stats_false_is_one_finding_of_no_running_stats() -> None:
    """The deliberate setting is reported once (no-running-stats), not also as an
    eval-batch-dependence error; ignoring no-running-stats leaves nothing behind."""
    torch.manual_seed(0)
    model = Net(nn.BatchNorm2d(8, track_running_stats=False))
    report = bncheck.audit(model, image_batch(8), select=[*NUMERIC, "no-running-stats"])
    assert [f.rule for f in report.findings] == ["no-running-stats"]
    note = "eval-batch-dependence: bn normalises with batch statistics"
    assert any(note in n for n in report.notes)
    quiet = bncheck.audit(model, image_batch(8), ignore=["no-running-stats"])
    assert quiet.ok and quiet.findings == [], quiet.findings


def test_batch_dependence_of_a_custom_layer_without_running_stats_is_still_an_error() -> None:
    report = _audit_norm(BatchStatsInEvalBN(8))
    (finding,) = _found(report, "eval-batch-dependence")
    assert finding.severity == "error"


def test_batch_dependence_with_a_batch_of_one_or_two() -> None:
    for n in (1, 2):
        x = image_batch(n)
        assert _found(_audit_norm(BatchStatsInEvalBN(8), x), "eval-batch-dependence")
        assert _audit_norm(HandBN(8), x).findings == []


def test_nondeterministic_eval_is_caught() -> None:
    report = _audit_norm(NoisyEvalBN(8))
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.layer == "bn"
    assert _found(report, "eval-batch-dependence") == []


class EMAInForward(nn.Module):
    """A momentum encoder's layout: the forward moves a copy towards the trained network by a
    parameter EMA before running it (MoCo's key encoder), in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.online = ConvBNReLU()
        self.target = ConvBNReLU()
        with torch.no_grad():
            for p in self.online.parameters():
                p.add_(0.5 * torch.randn_like(p))
        self.target.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for po, pt in zip(self.online.parameters(), self.target.parameters()):
                pt.data.mul_(0.9).add_(po.data, alpha=0.1)
        return self.online(x) + self.target(x)


def test_a_forward_that_moves_its_weights_is_named_as_the_cause() -> None:
    torch.manual_seed(0)
    model = EMAInForward().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert "changed" in finding.message and "parameter tensor(s)" in finding.message
    assert "target.conv.weight" in finding.details["params_changed"]
    assert not any(n.startswith("online.") for n in finding.details["params_changed"])
    assert "outside forward" in finding.message
    # the audit put the weights back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_random_op_keeps_the_random_op_hint() -> None:
    report = _audit_norm(NoisyEvalBN(8))
    (finding,) = _found(report, "eval-nondeterminism")
    assert "params_changed" not in finding.details
    assert "self.training" in finding.message


class RunningScale(nn.Module):
    """ConvBNReLU whose output is scaled by a buffer its forward updates in every mode (a
    running maximum of its input, as an observer keeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBNReLU()
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale.mul_(0.9).add_(0.1 * x.abs().amax())
        return self.body(x) / self.scale


def test_a_forward_that_updates_a_buffer_is_named_as_the_cause() -> None:
    torch.manual_seed(0)
    model = RunningScale().eval()
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.details["buffers_changed"] == ["scale"]
    assert finding.severity is bncheck.Severity.WARNING
    assert "changed 1 buffer(s) between them (scale)" in finding.message
    assert "outside forward, or only when self.training" in finding.message
    assert float(model.scale) == 1.0  # put back


class CountedDropout(nn.Module):
    """ConvBNReLU followed by a dropout that ignores eval mode, and a call counter its
    forward increments but never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ConvBNReLU()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.dropout(self.body(x), 0.5, training=True)


def test_a_changed_buffer_does_not_hide_a_random_op() -> None:
    # the counter changes between the two eval passes, but a third pass from the same
    # state still differs: the random op is the cause, and the error stands
    torch.manual_seed(0)
    model = CountedDropout().eval()
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.severity is bncheck.Severity.ERROR
    assert "buffers_changed" not in finding.details
    assert "F.dropout" in finding.message
    assert int(model.calls) == 0  # put back


class ReassignedScale(RunningScale):
    """RunningScale whose forward replaces its buffer (``self.scale = ...``) instead of
    updating it in place, as observers and EMA code are often written."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.scale = self.scale * 0.9 + 0.1 * x.abs().amax()
        return self.body(x) / self.scale


def test_a_buffer_the_forward_replaces_is_named_as_the_cause() -> None:
    # the third pass starts from the buffer the repeated pass started from, put back in its
    # module: it agrees, so the replaced buffer is the cause (no random op)
    torch.manual_seed(0)
    model = ReassignedScale().eval()
    held = model.scale
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.details["buffers_changed"] == ["scale"]
    assert finding.severity is bncheck.Severity.WARNING
    assert model.scale is held and float(held) == 1.0


def test_qat_observers_updating_in_eval_are_named_with_their_fix() -> None:
    # torch.ao's QAT keeps its FakeQuantize observers updating in eval mode while enabled:
    # two identical eval forwards differ by the scales they moved, not by a random op
    import torch.ao.nn.intrinsic.qat as nniqat
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    qconfig = tq.get_default_qat_qconfig("fbgemm")
    model = nn.Sequential(
        nniqat.ConvBnReLU2d(3, 8, 3, bias=False, qconfig=qconfig),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(image_batch(16)).square().mean().backward()
        opt.step()
    report = bncheck.audit(model, image_batch(16), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert any("fake_quant" in name for name in finding.details["buffers_changed"])
    assert "torch.ao.quantization.disable_observer" in finding.message
    model.apply(tq.disable_observer)
    assert _found(bncheck.audit(model, image_batch(16)), "eval-nondeterminism") == []


class EvalCounted(nn.Module):
    """ConvBNReLU with ``classes`` outputs that counts its eval-mode calls and adds
    ``offsets[call]`` (0 past the end) to its output, standing in for a random op."""

    def __init__(self, classes: int, offsets: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.net = ConvBNReLU(classes=classes)
        self.offsets = offsets
        self.eval_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            return out
        self.eval_calls += 1
        k = self.eval_calls - 1
        return out + (self.offsets[k] if k < len(self.offsets) else 0.0)


def test_a_difference_only_the_screening_passes_saw_is_still_judged() -> None:
    """A random op whose few values for sample 0 happen to come out the same in the two
    recording passes (a 4-class output after dropout does so one time in 16): the
    difference the two screening passes saw still calls for the third pass. Here a stateful
    offset on the model output (eval calls 1, 3, 4 add 1; 2, 5 add nothing) stands in for it."""
    model = EvalCounted(classes=4, offsets=(1.0, 0.0, 1.0, 1.0, 0.0))
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.layer is None
    assert model.eval_calls == 0  # put back


def test_a_random_op_on_few_outputs_that_both_screening_passes_miss_is_caught() -> None:
    """Sample 0's four outputs come out the same in both screening passes (dropout on four
    values does so one time in 16): one more pass on the same batch sees the difference,
    and the determinism pass judges it."""
    model = EvalCounted(classes=4, offsets=(0.0, 0.0, 1.0, 2.0, 3.0, 4.0))
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.layer is None


def test_a_random_op_the_determinism_pass_misses_by_chance_shows_against_the_first_pass() -> None:
    """The two passes on the same batch (a and the determinism pass) agree by chance, but the
    first screening pass ran that batch too and differs: the difference is judged."""
    model = EvalCounted(classes=4, offsets=(1.0,))  # only the first eval call is off
    report = bncheck.audit(model, image_batch(8), select=["eval-nondeterminism"])
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.layer is None


@pytest.mark.parametrize("classes, passes", [(4, 3), (16, 2)])
def test_the_extra_screening_pass_runs_only_for_few_output_values(classes, passes) -> None:
    counted = EvalCounted(classes=classes)
    calls: list[int] = []
    counted.register_forward_pre_hook(lambda m, a: calls.append(int(m.training)))
    report = bncheck.audit(counted, image_batch(8), select=["eval-nondeterminism"])
    assert report.findings == []
    assert calls.count(0) == passes  # eval-mode forwards: two screening passes (+ one)


def test_nondeterminism_outside_bn_is_reported_model_wide() -> None:
    class DropAlways(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvBNReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.net(x), 0.5)  # training=True by default: a bug

    report = bncheck.audit(DropAlways(), image_batch(8), select=NUMERIC)
    (finding,) = _found(report, "eval-nondeterminism")
    assert finding.layer is None
    assert "training=self.training" in finding.message


def test_layer_updating_statistics_in_eval_is_caught() -> None:
    report = _audit_norm(EvalUpdatingBN(8))
    (finding,) = _found(report, "eval-updates-stats")
    assert finding.layer == "bn"
    assert "running_mean" in finding.details["buffers"]


def test_model_needing_its_full_batch_size_in_eval_still_works() -> None:
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvBNReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).reshape(8, -1)

    assert bncheck.audit(FixedBatch(), image_batch(8), select=NUMERIC).findings == []
    bad = FixedBatch()
    bad.net.bn = BatchStatsInEvalBN(8)
    assert _found(bncheck.audit(bad, image_batch(8), select=NUMERIC), "eval-batch-dependence")


# ---- batches and inputs ----------------------------------------------------------------------
def test_single_value_per_channel_is_reported_without_crashing() -> None:
    model = MLPBN()
    report = bncheck.audit(model, torch.randn(1, 6))
    (finding,) = _found(report, "single-value-per-channel")
    assert finding.layer == "bn"
    assert report.forward_error is None
    assert _found(report, "normalization") == []


def test_single_value_without_running_stats_stops_only_the_train_pass() -> None:
    model = MLPBN(track_running_stats=False)
    report = bncheck.audit(model, torch.randn(1, 6))
    assert _found(report, "single-value-per-channel")
    assert report.forward_error is None
    assert any("stopped at bn" in note for note in report.notes)


def test_single_value_on_a_synthetic_batch_is_not_judged() -> None:
    report = bncheck.audit(MLPBN(), torch.randn(1, 6), synthetic_input=True)
    assert _found(report, "single-value-per-channel") == []


def test_small_batch_names_batch_size_and_per_layer_sample_counts() -> None:
    report = bncheck.audit(MLPBN(), torch.randn(4, 6), select=["small-batch"])
    layers = sorted((f.layer or "", f.details.get("batch_size")) for f in report.findings)
    assert layers == [("", 4), ("bn", 4)]
    ok = bncheck.audit(MLPBN(), torch.randn(40, 6), select=["small-batch"])
    assert ok.findings == []


def test_small_batch_thresholds_are_tolerances() -> None:
    report = bncheck.audit(
        MLPBN(),
        torch.randn(4, 6),
        select=["small-batch"],
        min_batch_size=2,
        min_samples_per_channel=2,
    )
    assert report.findings == []


def test_small_batch_skips_a_synthetic_batch() -> None:
    report = bncheck.audit(MLPBN(), torch.randn(2, 6), select=["small-batch"], synthetic_input=True)
    assert report.findings == []
    assert "small-batch" in report.skipped


@pytest.mark.parametrize(
    "x, bad",
    [
        (torch.randint(0, 256, (8, 3, 8, 8)).float(), True),
        (torch.rand(8, 3, 8, 8) * 255, True),
        (torch.rand(8, 3, 8, 8), False),
        (torch.randn(8, 3, 8, 8), False),
    ],
)
def test_input_not_normalized(x: torch.Tensor, bad: bool) -> None:
    report = bncheck.audit(ConvBNReLU(), x, select=["input-not-normalized"])
    assert bool(report.findings) is bad


# ---- stat-drift ------------------------------------------------------------------------------
def test_stat_drift_compares_running_stats_with_the_data() -> None:
    model = trained(ConvBNReLU(), image_batch(16, seed=5), steps=60)
    same = [image_batch(8, seed=s) for s in range(4)]
    shifted = [(3 * x + 2, torch.zeros(8)) for x in same]
    assert bncheck.audit(model, same[0], data=same, select=["stat-drift"]).findings == []
    report = bncheck.audit(model, same[0], data=shifted, select=["stat-drift"])
    (finding,) = report.findings
    assert finding.layer == "bn"
    assert finding.details["batches"] == 4


def test_stat_drift_accepts_dict_batches_and_bounds_the_batch_count() -> None:
    model = trained(ConvBNReLU(), image_batch(16, seed=5), steps=60)
    data = [{"image": image_batch(4, seed=s), "label": torch.zeros(4)} for s in range(10)]
    report = bncheck.audit(
        model, data[0]["image"], data=data, select=["stat-drift"], drift_max_batches=3
    )
    assert report.findings == []


def test_stat_drift_rejects_bad_batches() -> None:
    with pytest.raises(bncheck.InputError, match="a batch in data= is a str"):
        bncheck.audit(ConvBNReLU(), image_batch(4), data=["oops"], select=["stat-drift"])
    with pytest.raises(bncheck.InputError, match="data= must be an iterable"):
        bncheck.audit(ConvBNReLU(), image_batch(4), data=3, select=["stat-drift"])


# ---- inputs and the model left alone ---------------------------------------------------------
@pytest.mark.parametrize(
    "x, match",
    [
        (torch.full((4, 3, 8, 8), float("nan")), "NaN/Inf"),
        ("pixels", "is a str"),
    ],
)
def test_bad_example_input_is_an_input_error(x: object, match: str) -> None:
    with pytest.raises(bncheck.InputError, match=match):
        bncheck.audit(ConvBNReLU(), x)


class FailsHalfway(nn.Module):
    """Runs BN layers, then raises in train mode (e.g. needs targets in train mode)."""

    def __init__(self, fail_in: str) -> None:
        super().__init__()
        self.fail_in = fail_in
        self.block = TwoBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block.block1(x)
        torch.rand(3)  # uses the global RNG
        if self.fail_in == "both" or (self.fail_in == "train") == self.training:
            raise RuntimeError("boom\nsecond line")
        return self.block.head(self.block.block2(y).mean((2, 3)))


def _state(model: nn.Module) -> tuple[object, ...]:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
    )


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    sa, sb = a[0], b[0]
    assert isinstance(sa, dict) and isinstance(sb, dict)
    return (
        all(torch.equal(sa[k], sb[k]) for k in sa)
        and a[1] == b[1]
        and a[2] == b[2]
        and torch.equal(a[3], b[3])
        and bool((a[4] == b[4]).all())
        and a[5] == b[5]
    )


@pytest.mark.parametrize("fail_in", ["train", "eval", "both"])
def test_model_and_rng_untouched_even_when_the_forward_raises(fail_in: str) -> None:
    model = trained(FailsHalfway("never"), image_batch(8, seed=2))
    model.fail_in = fail_in
    model.block.block2.train()  # a mixed-mode model
    model.block.block1[0].weight.requires_grad_(False)
    before = _state(model)
    report = bncheck.audit(model, image_batch(8))
    assert _same(before, _state(model))
    if fail_in == "both":
        assert report.forward_error == "RuntimeError: boom"
        assert "normalization" in report.skipped
    else:
        # the other stage's rules ran, and the report still says the forward raised
        assert report.forward_error == "RuntimeError: boom"
        stage = "train-mode" if fail_in == "train" else "eval-mode"
        failed_rule = "normalization" if fail_in == "train" else "eval-nondeterminism"
        assert (
            f"the {stage} forward pass failed (RuntimeError: boom)" in report.skipped[failed_rule]
        )


def test_model_untouched_after_a_clean_audit_with_data() -> None:
    model = trained(TwoBlock(), image_batch(8, seed=2))
    before = _state(model)
    bncheck.audit(model, image_batch(8), data=[image_batch(4, seed=9)])
    assert _same(before, _state(model))


def test_dict_and_tuple_inputs() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = ConvBNReLU()
            self.b = MLPBN()

        def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
            return self.a(image)[:, :3] + self.b(features)

    x, f = image_batch(8), torch.randn(8, 6)
    assert not bncheck.audit(TwoInputs(), (x, f)).failed("error")
    report = bncheck.audit(TwoInputs(), {"image": x, "features": f})
    assert report.ok and report.forward_error is None


# ---- layouts and dtypes ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["channels_last", "bfloat16", "float64"])
def test_correct_bn_in_other_layouts_and_dtypes_passes(layout: str) -> None:
    model, x = ConvBNReLU(), image_batch(8)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        dtype = getattr(torch, layout)
        model, x = model.to(dtype), x.to(dtype)
    report = bncheck.audit(model, x, select=NUMERIC)
    assert report.findings == []
    assert not report.skipped


def test_grid_picks_the_same_elements_whatever_the_memory_layout() -> None:
    from bncheck.probes import grid

    t = torch.randn(9, 5, 7, 6, generator=torch.Generator().manual_seed(4))
    expected = torch.stack(
        [t[n, :, 3, w] for n in (0, 3, 6) for w in range(6)],
        dim=1,
    ).double()
    for variant in (
        t,
        t.contiguous(memory_format=torch.channels_last),
        t.transpose(0, 1).contiguous().transpose(0, 1),
    ):
        assert torch.equal(grid(variant), expected)


def test_nan_running_stats_left_alone_in_eval_are_not_an_eval_update() -> None:
    """NaN statistics (a poisoned checkpoint) are nonfinite-stats, not eval-updates-stats."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).eval()
    model[1].running_var[1] = float("nan")
    report = bncheck.audit(model, torch.randn(4, 3, 6, 6))
    assert "nonfinite-stats" in report.rules_found()
    assert "eval-updates-stats" not in report.rules_found()


class _MixesBatch(nn.Module):
    """A correct model whose samples interact on purpose (a graph net's neighbour sum over the
    batch dimension) before and after stock BN layers."""

    def __init__(self, after_last_bn: bool) -> None:
        super().__init__()
        self.after_last_bn = after_last_bn
        self.fc = nn.Linear(6, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.after_last_bn:
            x = x + x.roll(1, dims=0)  # message passing between neighbouring "nodes"
        h = torch.relu(self.bn(self.fc(x)))
        if self.after_last_bn:
            h = h - h.mean(0, keepdim=True)  # e.g. contrastive logits over the batch
        return self.head(h)


@pytest.mark.parametrize("after_last_bn", [False, True])
def test_samples_mixed_by_a_non_bn_op_are_info_not_an_error(after_last_bn: bool) -> None:
    model = trained(_MixesBatch(after_last_bn), torch.randn(16, 6))
    report = bncheck.audit(model, torch.randn(16, 6), select=["eval-batch-dependence"])
    (finding,) = report.findings
    assert report.ok and finding.severity == "info"
    assert finding.layer == (None if after_last_bn else "bn")
    assert finding.details["cause"] == "non-BN op"
    assert "graph nodes, contrastive logits" in finding.message


def test_an_input_that_goes_straight_into_bn_is_not_flagged_as_unnormalized() -> None:
    """BN as the first layer normalises raw features itself (tabular data, a spectrogram's
    bn0); the same raw input into a linear layer is flagged."""
    x = torch.rand(64, 10) * torch.tensor([1, 10, 100, 1000, 1e4, 1, 1, 50, 200, 3])
    bn_first = nn.Sequential(nn.BatchNorm1d(10), nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8))
    linear_first = nn.Sequential(nn.Linear(10, 8, bias=False), nn.BatchNorm1d(8))
    rule = ["input-not-normalized"]
    assert bncheck.audit(bn_first, x, select=rule).findings == []
    assert bncheck.audit(linear_first, x, select=rule).rules_found() == set(rule)

"""The train pass takes the batch statistics of PyTorch's own train-mode BN calls (contiguous
float32/float64 CPU inputs) from the op ``torch.batch_norm`` runs, instead of reading the input
a second time. These tests hold that shortcut to what it replaces: the same result and
buffers as ``F.batch_norm``, statistics within the rules' budget of a float64 oracle, a
reading wherever the kernel's statistics could not stand in for one, and per-sample sums for
every call of a layer called more than once."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import TwoBlock, image_batch, observed

import bncheck
from bncheck import probes


def _oracle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel: the float64 mean and biased variance of ``x``, and the count."""
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    mean = values.mean(1)
    return mean, ((values - mean[:, None]) ** 2).mean(1), values.shape[1]


def _observed(
    model: nn.Module, x: torch.Tensor, monkeypatch, select: list[str] | None = None
) -> probes.ForwardObservations:
    return observed(model, x, monkeypatch, select or ["normalization", "ema-update", "bn-reused"])


def _reads(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the tensors the audit reads statistics from (``read_stats``)."""
    shapes: list[tuple[int, ...]] = []
    read = probes.read_stats

    def counting(t, *args, **kwargs):
        shapes.append(tuple(t.shape))
        return read(t, *args, **kwargs)

    monkeypatch.setattr(probes, "read_stats", counting)
    return shapes


# ---- the op gives what F.batch_norm gives ------------------------------------------------------
_SHAPES = [(8, 5, 7), (4, 6, 9, 11), (4, 6, 17, 300), (2, 3, 4, 5, 6)]


@pytest.mark.parametrize(
    ("shape", "dtype", "affine", "track", "momentum"),
    list(
        itertools.product(
            _SHAPES, [torch.float32, torch.float64], [True, False], [True, False], [0.1, 1.0]
        )
    ),
)
def test_the_op_the_train_pass_runs_gives_what_f_batch_norm_gives(
    shape, dtype, affine, track, momentum
):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(dtype)
    c = shape[1]
    w = torch.randn(c, generator=gen).to(dtype) if affine else None
    b = torch.randn(c, generator=gen).to(dtype) if affine else None
    rm = torch.randn(c, generator=gen).to(dtype) if track else None
    rv = (torch.rand(c, generator=gen) + 0.5).to(dtype) if track else None
    rm2, rv2 = (rm.clone(), rv.clone()) if track else (None, None)
    bound = probes._batch_norm_arguments((x, rm2, rv2, w, b, True, momentum, 1e-5), {})
    assert bound is not None and probes._kernel_call(bound)
    assert probes._BATCH_NORM_IMPL is not None
    with torch.no_grad():
        expected = F.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5)
        out, mean, invstd, _, backend = probes._BATCH_NORM_IMPL(
            x, w, b, rm2, rv2, True, momentum, 1e-5, torch.backends.cudnn.enabled
        )
    assert backend == 0
    assert torch.equal(out, expected) and out.stride() == expected.stride()
    if track:
        assert torch.equal(rm, rm2) and torch.equal(rv, rv2)


@pytest.mark.parametrize(
    "case",
    [
        "eps zero",
        "channels last",
        "half",
        "one value per channel",
        "(N, C)",
        "float64 weight on float32",
        "momentum None",
        "(N, C, 1, 1)",
        "another torch-function mode",
    ],
)
def test_calls_the_op_cannot_stand_in_for_are_left_to_f_batch_norm(case):
    x = torch.randn(4, 3, 5, 5)
    args: list = [x, torch.zeros(3), torch.ones(3), None, None, True, 0.1, 1e-5]
    if case == "eps zero":
        args[7] = 0.0  # F.batch_norm raises for it in training: it must still
    elif case == "channels last":
        args[0] = x.contiguous(memory_format=torch.channels_last)
    elif case == "half":
        args[:3] = [x.half(), torch.zeros(3).half(), torch.ones(3).half()]
    elif case == "one value per channel":
        args[0] = torch.randn(1, 3, 1, 1)
    elif case == "(N, C)":
        args[0] = torch.randn(8, 3)
    elif case == "float64 weight on float32":
        args[3] = torch.ones(3, dtype=torch.float64)
    elif case == "momentum None":
        args[6] = None
    elif case == "(N, C, 1, 1)":  # PyTorch sums it with its channels-last kernel
        args[0] = torch.randn(16, 3, 1, 1)
    bound = probes._batch_norm_arguments(tuple(args), {})
    assert bound is not None
    if case == "another torch-function mode":
        from torch.overrides import TorchFunctionMode

        class Passing(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Passing():
            assert not probes._kernel_call(bound)
        assert probes._kernel_call(bound)
    else:
        assert not probes._kernel_call(bound)


def test_keyword_arguments_bind_as_f_batch_norm_binds_them():
    x, rm, rv = torch.randn(4, 3, 5), torch.zeros(3), torch.ones(3)
    bound = probes._batch_norm_arguments((x, rm, rv), {"training": True, "eps": 1e-3})
    assert bound is not None
    assert bound["input"] is x and bound["running_var"] is rv and bound["weight"] is None
    assert bound["training"] is True and bound["eps"] == 1e-3 and bound["momentum"] == 0.1
    assert probes._batch_norm_arguments((x, rm), {}) is None  # running_var missing
    assert probes._batch_norm_arguments((x, rm, rv), {"input": x}) is None
    assert probes._batch_norm_arguments((x, rm, rv), {"unknown": 1}) is None


# ---- the kernel's statistics are within the rules' budget ---------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 16),
    st.integers(1, 9),
    st.sampled_from([(7,), (5, 9), (1, 130), (3, 4, 5)]),
    st.sampled_from([0.0, 1.0, 30.0, 1000.0]),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_kernel_statistics_stay_within_the_budget_of_a_float64_oracle(
    batch, channels, rest, offset, scale, seed
):
    """The rules' budget for a batch mean and variance: u (1 + log2 n) times the spread
    (and the offset). The kernel's statistics stay within a tenth of it, plus the rounding
    of its float32 results: u of the mean (ema-update allows 16 u of it) and 2 u of the
    variance (from 1 / sqrt(var + eps); a twelfth of ema-update's smallest tolerance,
    8 u (2 + g) times the variance)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, *rest, generator=gen) + offset) * scale
    if x.numel() // channels < 2:
        return
    eps = 1e-5
    with torch.no_grad():
        _, mean, invstd, _, _ = probes._BATCH_NORM_IMPL(
            x, None, None, None, None, True, 0.1, eps, False
        )
    raw = probes._kernel_stats(x, mean, invstd, eps)
    true_mean, true_var, n = _oracle(x)
    if raw is None:  # only a variance under KERNEL_VAR_FLOOR * eps is refused
        assert bool((true_var < 1.01 * probes.KERNEL_VAR_FLOOR * eps).any())
        return
    stats = probes.finish_all([raw])[id(raw)]
    assert stats.count == n
    u, g = torch.finfo(torch.float32).eps, 1 + math.log2(n)
    sd = true_var.sqrt()
    mean_budget = u * g * (sd + true_mean.abs())
    assert bool(((stats.mean - true_mean).abs() <= u * true_mean.abs() + 0.1 * mean_budget).all())
    budget = u * g * true_var * (1 + true_mean.abs() / sd)
    assert bool(((stats.var - true_var).abs() <= 2 * u * true_var + 0.1 * budget).all())


def test_dead_channels_and_nan_are_refused():
    x = torch.randn(4, 3, 6, 6)
    x[:, 1] = 2.5  # a constant channel: variance 0
    with torch.no_grad():
        _, mean, invstd, _, _ = probes._BATCH_NORM_IMPL(
            x, None, None, None, None, True, 0.1, 1e-5, False
        )
    assert probes._kernel_stats(x, mean, invstd, 1e-5) is None
    x[:, 1] = torch.randn(4, 6, 6)
    x[0, 2, 0, 0] = math.nan
    with torch.no_grad():
        _, mean, invstd, _, _ = probes._BATCH_NORM_IMPL(
            x, None, None, None, None, True, 0.1, 1e-5, False
        )
    assert probes._kernel_stats(x, mean, invstd, 1e-5) is None


# ---- what the audit reads, and what it observes --------------------------------------------------
class ConvBN(nn.Module):
    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_a_stock_bn_call_is_not_read_again_and_its_statistics_are_the_oracles(monkeypatch):
    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        bn_input = model.conv(x)
    reads = _reads(monkeypatch)
    obs = _observed(model, x, monkeypatch)
    assert tuple(bn_input.shape) not in reads
    [call] = [c for c in obs.calls if c.training]
    assert call.input_stats is not None
    # the kernel's output follows from the statistics it returned: no element grid to check
    assert call.grid_in is None and call.grid_out is None
    mean, var, n = _oracle(bn_input)
    assert call.input_stats.count == n
    assert torch.allclose(call.input_stats.mean, mean, rtol=0, atol=1e-6)
    assert torch.allclose(call.input_stats.var, var, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", ["channels last", "dead channel"])
def test_calls_whose_kernel_statistics_cannot_stand_in_are_read(case, monkeypatch):
    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(8, 3, 12, 12)
    if case == "channels last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        with torch.no_grad():
            model.conv.weight[2] = 0.0  # channel 2 of the BN input is all zeros
    reads = _reads(monkeypatch)
    obs = _observed(model, x, monkeypatch)
    assert (8, 6, 12, 12) in reads
    [call] = [c for c in obs.calls if c.training]
    assert call.input_stats is not None
    # read statistics: the kernel's output is checked against them on the element grid
    assert call.grid_in is not None and call.grid_out is not None
    if case == "dead channel":
        assert float(call.input_stats.var[2]) == 0.0  # exactly: read, not recovered


class DoubledWeightBN(nn.BatchNorm2d):
    """A custom forward that hands F.batch_norm another weight than the module's: judged
    against the module's weight, as a swapped or forgotten weight would be."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight * 2, self.bias, True, 0.1, self.eps
        )


def test_a_custom_forward_on_the_kernel_path_is_still_checked_element_by_element(monkeypatch):
    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(8, 3, 12, 12)
    model.bn = DoubledWeightBN(6)
    obs = _observed(model, x, monkeypatch)
    [call] = [c for c in obs.calls if c.training]
    assert call.norm_source == "batch_norm" and not call.stock
    assert call.grid_in is not None and call.grid_out is not None
    report = bncheck.audit(model, x, select=["normalization"])
    assert [f.layer for f in report.findings] == ["bn"]


def test_a_forward_set_on_the_instance_is_not_taken_for_pytorchs_own(monkeypatch):
    """Test-time adaptation code replaces ``forward`` on the instance: the layer is then
    checked like any custom layer (its output against the statistics, element by element)."""
    import types

    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(8, 3, 12, 12)
    model.bn.forward = types.MethodType(DoubledWeightBN.forward, model.bn)
    obs = _observed(model, x, monkeypatch)
    [call] = [c for c in obs.calls if c.training]
    assert not call.stock and call.grid_in is not None
    report = bncheck.audit(model, x, select=["normalization"])
    assert [f.layer for f in report.findings] == ["bn"]


class Softplus(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return F.softplus(w)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["parametrize", "weight_norm"])
@pytest.mark.parametrize("layout", ["contiguous", "channels last"])
def test_a_parametrized_bn_weight_is_read_from_what_the_op_was_given(how, layout):
    """A parametrized weight is not in the module's parameter table: gamma is the weight
    F.batch_norm was given, so a correct layer is not flagged (it was, with gamma taken as 1,
    wherever the output was checked)."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model, x = ConvBN(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
    if how == "parametrize":
        parametrize.register_parametrization(model.bn, "weight", Softplus())
    else:
        model.bn = nn.utils.weight_norm(model.bn, "weight", dim=0)
    if layout == "channels last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    report = bncheck.audit(model, x, select=["normalization"])
    assert report.findings == []


class Reused(nn.Module):
    """One BN at two depths (the second input at 1.8 times the scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + self.bn(y * 1.8)


def test_every_call_of_a_layer_called_twice_has_its_per_sample_sums(monkeypatch):
    """bn-reused compares the calls of one layer with the spread of their per-sample means
    and variances; the first call, whose statistics came from the kernel, is read after the
    forward from its input, held until then."""
    torch.manual_seed(0)
    model, x = Reused(), torch.randn(16, 3, 10, 10)
    with torch.no_grad():
        y = model.conv(x)
    obs = _observed(model, x, monkeypatch)
    calls = [c for c in obs.calls_of("bn") if c.training]
    assert len(calls) == 2
    for call, seen in zip(calls, (y, y * 1.8)):
        st_ = call.input_stats
        assert st_ is not None and st_.sample_var is not None and st_.sample_sq_var is not None
        per_sample = seen.double().flatten(2).mean(2)
        assert torch.allclose(st_.sample_var, per_sample.var(0), rtol=1e-6, atol=0)


class ChangedAfter(Reused):
    """The same, but the first call's input is changed after the call: in place by a leaf
    module (a version bump), through ``.data`` (no version bump), or freed."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.bn(y)
        z = self.conv(x.flip(3))  # the same producer, the same distribution
        if self.change == "in place":
            self.act(y)
        elif self.change == "through .data":
            y.data.mul_(3.0)
        else:
            y.untyped_storage().resize_(0)
        return a + self.bn(z)


class WithDropout(Reused):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop(x))


@pytest.mark.parametrize("change", ["in place", "through .data", "freed"])
def test_a_held_input_changed_after_its_call_keeps_the_kernels_statistics(change, monkeypatch):
    """The first call's input is held to be read if the layer is called again; changed
    after its call, it no longer holds what the call saw (a write through ``.data`` moves
    no version counter: the reading disagrees with the kernel's statistics). The call keeps
    the kernel's statistics, those of the input at the call, so ema-update and
    normalization stay quiet; bn-reused, which needs every call's per-sample sums, says in a
    note that it did not judge the layer, rather than judging it on the variance. With the
    eval passes, which run first and show the layer called twice, nothing is held: the first
    call is read at the call, before the change, and the layer is judged."""
    torch.manual_seed(0)
    model, x = ChangedAfter(change), torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        y = model.conv(x)
    reads = _reads(monkeypatch)
    obs = _observed(model, x, monkeypatch)
    # the second call is read during the forward; the held input only when its version,
    # place and storage are unchanged (a freed one is never read)
    assert len(reads) == (2 if change == "through .data" else 1)
    first, second = [c for c in obs.calls_of("bn") if c.training]
    assert first.input_stats is not None and first.input_stats.sample_var is None
    assert first.sums_unread is not None
    mean, var, _ = _oracle(y)  # what the first call saw, not what its input became
    assert torch.allclose(first.input_stats.mean, mean, rtol=0, atol=1e-6)
    assert torch.allclose(first.input_stats.var, var, rtol=1e-6, atol=0)
    assert second.input_stats is not None and second.input_stats.sample_var is not None
    report = bncheck.audit(model, x, select=["normalization", "ema-update", "bn-reused"])
    assert report.complete
    assert [f.rule for f in report.findings if f.layer == "bn"] == []
    assert any(n.startswith("bn-reused: bn is called 2 times") for n in report.notes)
    whole = bncheck.audit(model, x)
    found = [(f.rule, f.details.get("cause")) for f in whole.findings if f.layer == "bn"]
    assert found == [("bn-reused", "one-distribution")]
    assert not any(n.startswith("bn-reused:") for n in whole.notes)


def test_dropout_before_a_reused_layer_leaves_every_call_its_per_sample_sums(monkeypatch):
    torch.manual_seed(0)
    obs = _observed(WithDropout(), torch.randn(16, 3, 10, 10), monkeypatch)
    for call in [c for c in obs.calls_of("bn") if c.training]:
        assert call.input_stats is not None and call.input_stats.sample_var is not None


@pytest.mark.parametrize("select", [["bn-reused"], ["normalization", "ema-update"]])
def test_the_model_runs_once_in_train_mode(select, monkeypatch):
    runs = []
    model = Reused()
    model.conv.register_forward_hook(
        lambda m, a, o: runs.append(m.training) if m.training else None
    )
    _observed(model, torch.randn(8, 3, 12, 12), monkeypatch, select=select)
    assert runs == [True]


def test_only_bn_reused_needs_the_calls_of_a_reused_layer_read(monkeypatch):
    """Per-sample sums are bn-reused's alone: without it, every call of a reused layer takes
    the kernel's statistics; with it, the later calls are read during the forward and the
    first one after it."""
    torch.manual_seed(0)
    model, x = Reused(), torch.randn(8, 3, 12, 12)
    reads = _reads(monkeypatch)
    _observed(model, x, monkeypatch, select=["normalization", "ema-update"])
    assert reads == []
    _observed(model, x, monkeypatch, select=["bn-reused"])
    assert reads == [(8, 6, 12, 12), (8, 6, 12, 12)]


def _holds(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the first-call inputs the train pass considers holding."""
    shapes: list[tuple[int, ...]] = []
    fingerprint = probes._fingerprint

    def counting(t):
        shapes.append(tuple(t.shape))
        return fingerprint(t)

    monkeypatch.setattr(probes, "_fingerprint", counting)
    return shapes


#: bn-reused with a rule of the eval passes: the audit runs those first
_EVAL_FIRST = ["bn-reused", "eval-batch-dependence"]


def test_after_the_eval_passes_a_reused_layer_is_read_at_each_call_and_nothing_is_held(
    monkeypatch,
):
    torch.manual_seed(0)
    holds, reads = _holds(monkeypatch), _reads(monkeypatch)
    obs = _observed(Reused(), torch.randn(8, 3, 12, 12), monkeypatch, select=_EVAL_FIRST)
    assert holds == []
    assert reads == [(8, 6, 12, 12), (8, 6, 12, 12)]  # both calls, during the forward
    for call in [c for c in obs.calls_of("bn") if c.training]:
        assert call.input_stats is not None and call.input_stats.sample_var is not None
    assert obs.eval is not None
    reads.clear()
    obs = _observed(TwoBlock(), torch.randn(8, 3, 12, 12), monkeypatch, select=_EVAL_FIRST)
    assert holds == [] and reads == []  # each layer called once: the kernel's statistics
    assert [c.sums_unread for c in obs.calls] == [None, None]


class ReusedInTraining(Reused):
    """bn called once in eval mode, twice in train mode (an extra view in training only,
    the input flipped, or scaled and shifted by ``shift``)."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        other = x.flip(3) if not self.shift else x * self.shift + self.shift
        return y + self.bn(self.conv(other)) if self.training else y


def test_a_layer_the_eval_passes_saw_once_and_training_calls_twice_is_not_judged_blindly(
    monkeypatch,
):
    torch.manual_seed(0)
    model, x = ReusedInTraining(), torch.randn(8, 3, 12, 12)
    obs = _observed(model, x, monkeypatch, select=_EVAL_FIRST)
    first, second = [c for c in obs.calls_of("bn") if c.training]
    assert first.input_stats is not None and first.input_stats.sample_var is None
    assert first.sums_unread is not None and "eval-mode forward called it once" in first.sums_unread
    report = bncheck.audit(model, x)
    assert [f.rule for f in report.findings if f.layer == "bn"] == []
    assert any(n.startswith("bn-reused: bn is called 2 times") for n in report.notes)


def test_a_first_call_without_per_sample_sums_still_shows_a_clear_difference():
    # its variance bounds the noise of its mean: a difference beyond that is certain
    torch.manual_seed(0)
    report = bncheck.audit(ReusedInTraining(shift=10.0), torch.randn(8, 3, 12, 12))
    (found,) = [f for f in report.findings if f.layer == "bn"]
    assert found.rule == "bn-reused" and found.severity == "warning"
    assert not any(n.startswith("bn-reused:") for n in report.notes)


class KeepsHidden(Reused):
    """Keeps a per-sample hidden state between forwards (as a stateful RNN does), created
    at the first forward with that forward's batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.h: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.h is None:
            self.h = torch.zeros(x.shape[0], 6, 1, 1)
        y = self.bn(self.conv(x)) + self.h
        self.h = y.mean((2, 3), keepdim=True).detach()
        return y


class FusesInEval(TwoBlock):
    """Folds its BN layers away at its first eval forward (a model that optimises itself
    for inference; here into identities)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            for block in (self.block1, self.block2):
                block[1] = nn.Identity()
        return super().forward(x)


@pytest.mark.parametrize("model", [KeepsHidden, FusesInEval])
def test_the_train_pass_after_the_eval_passes_sees_the_model_as_the_user_left_it(model):
    torch.manual_seed(0)
    net, x = model(), torch.randn(8, 3, 12, 12)
    report = bncheck.audit(net, x)
    assert report.complete, report.notes
    assert "normalization" not in report.skipped and "ema-update" not in report.skipped
    assert all(
        not (isinstance(m, nn.Identity) or getattr(m, "h", None) is not None) for m in net.modules()
    )


def test_the_eval_passes_run_first_only_for_bn_reused_and_give_the_same_findings():
    """The order of the passes changes what the train pass holds, not what is found: the
    same findings with the eval passes first (bn-reused selected) and after (not)."""
    torch.manual_seed(0)
    for model, x in ((Reused(), torch.randn(8, 3, 12, 12)), (TwoBlock(), image_batch(8))):
        everything = bncheck.audit(model, x)
        without = bncheck.audit(model, x, ignore=["bn-reused"])
        keep = [(f.rule, f.layer, f.message) for f in everything.findings if f.rule != "bn-reused"]
        assert keep == [(f.rule, f.layer, f.message) for f in without.findings]


@pytest.mark.parametrize("budget", ["HOLD_BYTES", "HOLD_TENSOR_BYTES"])
def test_past_the_hold_budget_first_calls_are_read_during_the_forward(budget, monkeypatch):
    monkeypatch.setattr(probes, budget, 0)
    torch.manual_seed(0)
    reads = _reads(monkeypatch)
    obs = _observed(Reused(), torch.randn(8, 3, 12, 12), monkeypatch, select=["bn-reused"])
    assert len(reads) == 2
    for call in [c for c in obs.calls_of("bn") if c.training]:
        assert call.input_stats is not None and call.input_stats.sample_var is not None


def test_a_torch_function_mode_of_the_user_sees_f_batch_norm():
    """An outer torch-function mode that reroutes F.batch_norm (here: it reports a call) must
    still see the call: the shortcut stands aside for it."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.batch_norm:
                seen.append(kwargs.get("training") if kwargs else args[5])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    with Watch():
        bncheck.audit(ConvBN(), torch.randn(8, 3, 12, 12), select=["normalization"])
    assert True in seen


class HalfMomentum(nn.BatchNorm2d):
    """Updates with half its stated momentum (and a shifted variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            0.5 * self.momentum,
            self.eps,
        )


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1, self.bn2 = HalfMomentum(6), nn.BatchNorm2d(6, momentum=None)
        self.shared = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv(x))
        y = self.shared(y) + self.shared(torch.relu(y) * 3)
        return self.bn2(y)


def test_findings_are_the_same_whether_the_kernel_or_a_reading_gives_the_statistics(
    monkeypatch,
):
    """Broken and intact layers side by side (an EMA with a wrong factor, a reused layer, a
    layer whose forward is PyTorch's): the report is the same with the shortcut off."""

    def verdicts(report: bncheck.Report) -> list[tuple[str, str, str, str]]:
        return sorted((f.rule, f.layer, f.severity, f.message) for f in report.findings)

    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(8, 3, 12, 12)
    fast = bncheck.audit(model, x)
    monkeypatch.setattr(probes, "_BATCH_NORM_IMPL", None)
    slow = bncheck.audit(model, x)
    assert verdicts(fast) == verdicts(slow)
    rules = {(f.rule, f.layer) for f in fast.findings}
    assert ("bn-reused", "shared") in rules and ("ema-update", "bn1") in rules
    assert np.isfinite([f.details.get("max_error", 0.0) or 0.0 for f in fast.findings]).all()


class GradThroughBN(nn.Module):
    """A forward that differentiates through its BN layer with torch.func: the tensor BN
    sees is a transform's wrapper, a torch.Tensor without memory of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return torch.func.grad(lambda t: self.bn(t).pow(3).sum())(h).mean((1, 2, 3))


@pytest.mark.parametrize("ignore", [[], ["bn-reused"]])
def test_a_torch_func_transform_through_bn_is_left_to_f_batch_norm(ignore):
    torch.manual_seed(0)
    model, x = GradThroughBN(), torch.randn(8, 3, 12, 12)
    report = bncheck.audit(model, x, ignore=ignore)
    assert report.complete and report.forward_error is None


def _ensemble_member() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8, track_running_stats=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


class VmapEnsemble(nn.Module):
    """torch.func's model-ensembling recipe: the members' weights stacked
    (``stack_module_state``), one structure-only template on the meta device, and every
    member run at once by ``vmap`` over ``functional_call``."""

    def __init__(self, members: int = 3) -> None:
        super().__init__()
        params, _ = torch.func.stack_module_state([_ensemble_member() for _ in range(members)])
        self.keys = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[k]) for k in self.keys])
        self.base = _ensemble_member().to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def member(weights: tuple[torch.Tensor, ...], inp: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, dict(zip(self.keys, weights)), (inp,))

        return torch.func.vmap(member, in_dims=(0, None))(tuple(self.stacked), x).mean(0)


def test_a_vmap_ensemble_over_a_meta_template_is_audited_for_what_can_be_seen():
    # the model is not on the meta device (its weights are real), its BN layer runs inside
    # vmap, where the passes cannot read it: the forward runs, the report says what was not
    # observed (incomplete), and the template's settings are still judged
    torch.manual_seed(0)
    model, x = VmapEnsemble(), torch.randn(8, 3, 12, 12)
    before = [p.detach().clone() for p in model.stacked]
    report = bncheck.audit(model, x)
    assert report.forward_error is None
    assert not any("the model is on the meta device" in n for n in report.notes)
    assert any("hold tensors on the meta device" in n and "base.1" in n for n in report.notes)
    assert any("ran inside torch.func.vmap" in n for n in report.notes)
    assert not report.complete
    assert any("torch.func.vmap" in reason for reason in report.incomplete)
    assert [(f.rule, f.layer) for f in report.findings if f.severity != "info"] == [
        ("no-running-stats", "base.1")
    ]
    for f in report.findings:
        assert "no BN output differs" not in f.message
    assert all(torch.equal(a, b) for a, b in zip(before, model.stacked))


def test_a_meta_layer_beside_real_ones_leaves_the_others_audited():
    # a structure-only BN template held beside a trained network: the network is audited
    # (its forward runs), the template's settings too, its statistics are not read
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"net": nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99))}
    )
    model["template"] = nn.BatchNorm2d(8).to("meta")

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner["net"](x)

    report = bncheck.audit(Run(), torch.randn(8, 3, 12, 12))
    assert report.forward_error is None
    assert any("hold tensors on the meta device" in n for n in report.notes)
    assert ("keras-momentum", "inner.net.1") in {(f.rule, f.layer) for f in report.findings}
    assert "normalization" not in report.skipped


class VmapFirstBN(nn.Module):
    """An ensemble under vmap whose first layer is BN: the input is not batched, the
    gamma/beta the BN runs with are."""

    def __init__(self) -> None:
        super().__init__()

        def member() -> nn.Module:
            return nn.Sequential(
                nn.BatchNorm2d(3, track_running_stats=False),
                nn.Conv2d(3, 4, 3),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 2),
            )

        params, _ = torch.func.stack_module_state([member() for _ in range(3)])
        self.keys = list(params)
        self.stacked = nn.ParameterList([nn.Parameter(params[k]) for k in self.keys])
        self.base = member().to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def run(weights: tuple[torch.Tensor, ...], inp: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.base, dict(zip(self.keys, weights)), (inp,))

        return torch.func.vmap(run, in_dims=(0, None))(tuple(self.stacked), x).mean(0)


class VmapInEval(nn.Module):
    """A model whose eval path runs each sample through BN under vmap (its train path
    does not): only the eval passes meet the batched calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.conv(x)).mean((1, 2, 3))
        return torch.func.vmap(lambda t: self.bn(self.conv(t[None]))[0])(x).mean((1, 2, 3))


@pytest.mark.parametrize("model_class", [VmapFirstBN, VmapInEval])
def test_bn_calls_under_vmap_leave_the_report_incomplete_without_failing(model_class):
    # batched weights (VmapFirstBN) or calls met by the eval passes only (VmapInEval): the
    # audit neither fails nor passes as complete, and says which layers it could not read
    torch.manual_seed(0)
    report = bncheck.audit(model_class(), torch.randn(8, 3, 12, 12))
    assert report.forward_error is None
    assert not report.complete
    assert any("torch.func.vmap" in reason for reason in report.incomplete)


def test_parameters_on_meta_with_real_buffers_is_a_model_on_the_meta_device():
    # accelerate's init_empty_weights() keeps the buffers real: the model still holds no
    # weights, and the report says so instead of failing in the forward
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(p.to("meta"))
    report = bncheck.audit(model, torch.randn(8, 3, 12, 12))
    assert report.forward_error is None
    assert any("the model is on the meta device" in r for r in report.incomplete)


def test_meta_bn_layers_in_the_forward_path_fail_with_the_models_own_error():
    # BN layers not loaded yet beside real convs: the forward fails as the model fails (the
    # meta tensors), not in bncheck's readings, and the reason names the meta layers
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    )
    model[1].eps = 0.0
    model[1].to("meta")
    model[4].momentum = 0.9
    model[4].to("meta")
    report = bncheck.audit(model, torch.randn(8, 3, 12, 12))
    assert report.forward_error is not None
    assert "meta" in report.forward_error and "Cannot copy out of meta" not in report.forward_error
    assert "2 BN layer(s) hold tensors on the meta device" in report.forward_error
    # the settings of the meta layers are still judged
    found = {(f.rule, f.layer) for f in report.findings}
    assert ("keras-momentum", "4") in found and ("invalid-eps", "1") in found


class FunctionalTemplate(nn.Module):
    """A meta template run by torch.func.functional_call with weights and buffers the
    wrapper holds (no vmap): the BN layers' own statistics are meta, the ones they run
    with are real."""

    def __init__(self) -> None:
        super().__init__()
        real = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.weights = nn.ParameterDict(
            {
                k.replace(".", "_"): nn.Parameter(v.detach().clone())
                for k, v in real.named_parameters()
            }
        )
        for k, v in real.named_buffers():
            self.register_buffer("buf_" + k.replace(".", "_"), v.clone())
        self.names = [k for k, _ in real.named_parameters()]
        self.buffer_names = [k for k, _ in real.named_buffers()]
        self.base = real.to("meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = {k: self.weights[k.replace(".", "_")] for k in self.names}
        given.update({k: getattr(self, "buf_" + k.replace(".", "_")) for k in self.buffer_names})
        return torch.func.functional_call(self.base, given, (x,))


def test_a_meta_template_with_data_is_left_out_of_stat_drift():
    # data= batches through a template whose own statistics are meta: stat-drift does not
    # compare the batches with them (that raised), and the report stays incomplete
    torch.manual_seed(0)
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    report = bncheck.audit(FunctionalTemplate(), data[0], data=data)
    assert not report.complete
    assert [f.rule for f in report.findings if f.rule == "stat-drift"] == []


def test_parameters_on_meta_beside_affine_free_bn_is_a_model_on_the_meta_device():
    # the BN layers hold real buffers and no parameters; the convs' weights are on meta
    # (torch's CPU conv then returns garbage): no forward check may run on it
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU())
    model[0].to("meta")
    report = bncheck.audit(model, torch.randn(4, 3, 8, 8))
    assert any("the model is on the meta device" in r for r in report.incomplete)
    assert [f for f in report.findings if f.severity != "info"] == []

"""Tracing: who feeds each BN and what consumes it, in eager code of any shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.tracing import OpRecord, Tracer, op_name, upstream


def _x(n: int = 4, c: int = 3, hw: int = 6) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(0))


def _rules(report: bncheck.Report, rule: str) -> list[bncheck.Finding]:
    return [f for f in report.findings if f.rule == rule]


TRACING = ["bn-after-activation", "bias-before-bn", "dropout-before-bn", "bn-reused"]


class ActThenBN(nn.Module):
    """conv -> <activation applied in one of many ways> -> BN."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.act = {
            "module_relu": nn.ReLU(),
            "module_inplace": nn.ReLU(inplace=True),
            "relu6": nn.ReLU6(),
            "leaky": nn.LeakyReLU(0.1),
            "elu": nn.ELU(),
            "prelu": nn.PReLU(),
            "gelu": nn.GELU(),
            "silu": nn.SiLU(),
            "hardswish": nn.Hardswish(),
            "mish": nn.Mish(),
        }.get(how, nn.Identity())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.how == "F.relu":
            x = F.relu(x)
        elif self.how == "F.relu_inplace":
            x = F.relu(x, inplace=True)
        elif self.how == "torch.relu":
            x = torch.relu(x)
        elif self.how == "method":
            x = x.relu()
        elif self.how == "method_inplace":
            x.relu_()
        elif self.how == "F.gelu":
            x = F.gelu(x)
        else:
            x = self.act(x)
        return self.bn(x)


@pytest.mark.parametrize(
    "how",
    [
        "F.relu",
        "F.relu_inplace",
        "torch.relu",
        "method",
        "method_inplace",
        "F.gelu",
        "module_relu",
        "module_inplace",
        "relu6",
        "leaky",
        "elu",
        "prelu",
        "gelu",
        "silu",
        "hardswish",
        "mish",
    ],
)
def test_activation_before_bn_is_found_however_it_is_applied(how: str) -> None:
    report = bncheck.audit(ActThenBN(how), _x(), select=TRACING)
    found = _rules(report, "bn-after-activation")
    assert [f.layer for f in found] == ["bn"]
    assert found[0].severity == "info"


def test_bn_fed_by_conv_is_not_after_activation() -> None:
    report = bncheck.audit(ActThenBN("none"), _x(), select=TRACING)
    assert report.findings == []


class BiasModels(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=how != "conv_nobias")
        self.fc = nn.Linear(3 * 36, 8, bias=True)
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b = nn.Parameter(torch.zeros(4))
        self.bn2d = nn.BatchNorm2d(4)
        self.bn1d = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how in ("conv_bias", "conv_nobias"):
            return self.bn2d(self.conv(x))
        if self.how == "linear_view":
            y = self.fc(x.flatten(1)).view(x.shape[0], 8, 1).squeeze(-1)
            return self.bn1d(y)
        if self.how == "functional":
            return self.bn2d(F.conv2d(x, self.w, self.b, padding=1))
        raise AssertionError(self.how)


@pytest.mark.parametrize("how", ["conv_bias", "linear_view", "functional"])
def test_bias_straight_into_bn_is_found_through_reshapes(how: str) -> None:
    report = bncheck.audit(BiasModels(how), _x(), select=TRACING)
    found = _rules(report, "bias-before-bn")
    assert len(found) == 1
    assert "bias=False" in found[0].message


def test_conv_without_bias_is_not_flagged() -> None:
    report = bncheck.audit(BiasModels("conv_nobias"), _x(), select=TRACING)
    assert _rules(report, "bias-before-bn") == []


def test_bias_before_frozen_bn_is_not_flagged() -> None:
    model = BiasModels("conv_bias")
    model.bn2d.eval()
    model.bn2d.train = lambda mode=True: model.bn2d  # type: ignore[method-assign]
    report = bncheck.audit(model, _x(), select=TRACING)
    assert _rules(report, "bias-before-bn") == []


class DropoutThenBN(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.fc = nn.Linear(5, 6, bias=False)
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = F.dropout(h, 0.3, training=self.training) if self.functional else self.drop(h)
        return self.bn(h)


@pytest.mark.parametrize("functional", [False, True])
def test_dropout_before_bn_is_found(functional: bool) -> None:
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    report = bncheck.audit(DropoutThenBN(functional), x, select=TRACING)
    found = _rules(report, "dropout-before-bn")
    assert [f.layer for f in found] == ["bn"]
    assert found[0].details["p"] == pytest.approx(0.3)


class Reused(nn.Module):
    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.calls):
            x = torch.relu(self.bn(self.conv(x)))
        return x


def test_bn_called_at_several_places_is_reused() -> None:
    # seeded: with 4 samples, about one random init in 70 makes the three calls' statistics
    # alike enough for the "one distribution" info (the verdict depends on the weights)
    torch.manual_seed(0)
    report = bncheck.audit(Reused(3), _x(), select=TRACING)
    found = _rules(report, "bn-reused")
    assert [f.layer for f in found] == ["bn"]
    assert found[0].details["calls"] == 3
    assert found[0].severity == "warning"


def test_reused_stateless_bn_is_not_flagged() -> None:
    # affine=False and no running statistics (as in DARTS): nothing is shared between calls.
    model = Reused(3)
    model.bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    report = bncheck.audit(model, _x(), select=TRACING)
    assert _rules(report, "bn-reused") == []


def test_bn_called_once_is_not_reused() -> None:
    report = bncheck.audit(Reused(1), _x(), select=TRACING)
    assert _rules(report, "bn-reused") == []


class DataDependent(nn.Module):
    """Control flow on tensor values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if float(h.mean()) > -1e9:  # always true, but only known at run time
            h = F.silu(h)
        steps = int(x.abs().sum() > 0) + 1
        for _ in range(steps):
            h = self.bn(h)
        return self.bn2(h)


def test_model_with_data_dependent_control_flow_is_traced() -> None:
    with pytest.raises(Exception, match="(?i)symbolic|trace|proxy|bool"):
        torch.fx.symbolic_trace(DataDependent())
    report = bncheck.audit(DataDependent(), _x(), select=TRACING)
    by_rule = {f.rule: f for f in report.findings}
    assert by_rule["bn-after-activation"].layer == "bn"
    assert by_rule["bn-reused"].details["calls"] == 2
    assert "bias-before-bn" not in by_rule  # the conv feeds silu, not bn


def test_tracer_records_producers_and_consumers_with_inplace_relu() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1)
    )
    bn = model[1]
    with torch.no_grad(), Tracer(model, {bn: "1"}) as tracer:
        calls = []
        pre = bn.register_forward_pre_hook(lambda m, a: calls.append(tracer.bn_enter("1", m, a[0])))
        post = bn.register_forward_hook(lambda m, a, o: tracer.bn_exit(calls[-1], m, o))
        x = _x()
        tracer.mark_inputs(x)
        out = model(x)
        pre.remove()
        post.remove()
        assert tracer.producer(out) is not None
        assert tracer.producer(out).label == "3 (Conv2d)"
    (call,) = tracer.calls
    assert call.producer is not None and call.producer.label == "0 (Conv2d)"
    assert call.producer.has_bias is False
    assert call.consumers == ["2 (ReLU)"]


def test_tracer_keeps_no_activation_alive() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    import weakref

    with torch.no_grad(), Tracer(model, {}) as tracer:
        y = model(torch.randn(2, 4))
        ref = weakref.ref(y)
        assert tracer.producer(y) is not None
        del y
        assert ref() is None


def test_upstream_walks_through_shape_ops_only() -> None:
    conv = OpRecord("Conv2d", "linear", module="c", has_bias=True)
    view = OpRecord("view", "transparent", source=conv)
    flat = OpRecord("flatten", "transparent", source=view)
    assert upstream(flat) is conv
    relu = OpRecord("relu", "activation", source=conv)
    assert upstream(relu) is relu


@pytest.mark.parametrize(
    "func, expected",
    [
        (torch.relu, "relu"),
        (F.relu, "relu"),
        (torch.Tensor.relu_, "relu"),
        (torch.Tensor.__add__, "add"),
        (torch.Tensor.__iadd__, "add"),
        (F.hardswish, "hardswish"),
    ],
)
def test_op_name(func: object, expected: str) -> None:
    assert op_name(func) == expected


# ---- fast paths of the measurement: each equals the straightforward computation -------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bncheck import probes  # noqa: E402


def _layouts(t: torch.Tensor) -> list[torch.Tensor]:
    """The same values in other memory layouts: channels-last, a strided slice of a bigger
    tensor (non-contiguous, with a storage offset)."""
    out = [t]
    if t.dim() == 4:
        out.append(t.contiguous(memory_format=torch.channels_last))
    big = torch.zeros((t.shape[0] + 1, *t.shape[1:-1], 2 * t.shape[-1]), dtype=t.dtype)
    view = big[1:, ..., ::2]
    view.copy_(t)
    out.append(view)
    return out


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    offset=st.sampled_from([0.0, 3.0, -250.0, 1e3]),
    scale=st.sampled_from([1e-3, 1.0, 40.0]),
    block=st.sampled_from([1, 5, 64, 1 << 17]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    plain=st.booleans(),
)
def test_channel_stats_equal_float64_two_pass_oracle_in_every_layout_and_block_size(
    shape: list[int],
    offset: float,
    scale: float,
    block: int,
    dtype: torch.dtype,
    seed: int,
    plain: bool,
) -> None:
    """The blocked per-channel moments (any block size, so the row loop, its last partial
    block and the one-block path all run; the plain sums first, as on CPU, or the fused
    kernel, as on other devices) agree with a float64 oracle to the round-off of a cascade
    sum: |mean error| and |var error| <= 8 u (1 + log2 n) times the data's scale."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    c = shape[1]
    values = t.double().transpose(0, 1).reshape(c, -1)  # oracle: plain float64 formulas
    n = values.shape[1]
    mean = values.sum(1) / n
    var = ((values - mean[:, None]) ** 2).sum(1) / n
    u = torch.finfo(dtype).eps
    bound = 8 * u * (1 + torch.log2(torch.tensor(float(n))))
    spread = values.abs().amax(1)
    previous = probes._STATS_BLOCK
    probes._STATS_BLOCK = block
    try:
        for variant in _layouts(t):
            stats = probes.channel_stats(variant, plain)
            assert stats is not None and stats.count == n
            assert stats.mean.dtype == torch.float64 and stats.mean.shape == (c,)
            assert ((stats.mean - mean).abs() <= bound * spread).all()
            assert ((stats.var - var).abs() <= bound * spread * (spread + var.sqrt())).all()
            assert (stats.var >= 0).all()
    finally:
        probes._STATS_BLOCK = previous


def test_channel_stats_blocked_and_whole_paths_agree_on_a_large_activation() -> None:
    """An activation much larger than one block: the blocked result matches the result of
    one block holding everything (the straightforward two-pass computation)."""
    t = torch.randn(8, 6, 40, 40, generator=torch.Generator().manual_seed(3)) * 5 + 7
    blocked = probes.channel_stats(t)
    previous = probes._STATS_BLOCK
    probes._STATS_BLOCK = t.numel()
    try:
        whole = probes.channel_stats(t)
    finally:
        probes._STATS_BLOCK = previous
    assert blocked is not None and whole is not None
    assert torch.allclose(blocked.mean, whole.mean, rtol=1e-6, atol=1e-6)
    assert torch.allclose(blocked.var, whole.var, rtol=1e-5, atol=0)


def _picks(size: int, k: int) -> list[int]:
    """Evenly spread picks from 0: every ceil(size / k)-th index."""
    step = 1
    while step * k < size:
        step += 1
    return list(range(0, size, step))


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=2, max_size=5), seed=st.integers(0, 2**16))
def test_grid_gathers_the_elements_a_loop_over_the_picks_reads(shape: list[int], seed: int) -> None:
    """The strided-view grid equals reading, one by one, every ceil(N / 4)-th sample and in
    it a centred run of up to 16 positions of the last dim at the middle of the others, in
    every memory layout."""
    from itertools import product

    shape = shape[:2] + [min(s, 9) for s in shape[2:-1]] + shape[-1:] if len(shape) > 2 else shape
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    axes = [_picks(shape[0], 4)]
    if len(shape) > 2:
        axes += [[s // 2] for s in shape[2:-1]]
        start = max(0, (shape[-1] - 16) // 2)
        axes.append(list(range(start, min(shape[-1], start + 16))))
    expected = torch.tensor(
        [[float(t[(idx[0], ch, *idx[1:])]) for idx in product(*axes)] for ch in range(shape[1])],
        dtype=torch.float64,
    )
    for variant in _layouts(t):
        assert torch.equal(probes.grid(variant), expected)


def test_listeners_with_listen_to_see_only_the_named_ops() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    bn = model[1]
    seen_all: list[str] = []
    seen_bn: list[str] = []
    for names, seen in ((None, seen_all), (frozenset({"batch_norm"}), seen_bn)):
        with torch.no_grad(), Tracer(model, {bn: "1"}) as tracer:
            tracer.listeners.append(lambda name, args, kwargs, out, seen=seen: seen.append(name))
            tracer.listen_to = names
            calls: list[Any] = []
            pre = bn.register_forward_pre_hook(
                lambda m, a, tracer=tracer, calls=calls: calls.append(tracer.bn_enter("1", m, a[0]))
            )
            post = bn.register_forward_hook(
                lambda m, a, o, tracer=tracer, calls=calls: tracer.bn_exit(calls[-1], m, o)
            )
            model(_x())
            pre.remove()
            post.remove()
    assert seen_bn == ["batch_norm"]
    assert "batch_norm" in seen_all and len(seen_all) > 1


def test_a_leaf_module_called_twice_gets_a_record_per_call_with_its_own_source() -> None:
    """Leaf modules are classified once per pass; every call still gets its own record."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1, bias=False)
            self.b = nn.Conv2d(3, 3, 1, bias=True)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.act(self.a(x)), self.act(self.b(x))

    model = Twice()
    with torch.no_grad(), Tracer(model, {}) as tracer:
        first, second = model(_x())
        r1, r2 = tracer.producer(first), tracer.producer(second)
    assert r1 is not None and r2 is not None and r1 is not r2
    assert (r1.label, r1.category) == (r2.label, r2.category) == ("act (ReLU)", "activation")
    assert r1.source is not None and r1.source.module == "a" and r1.source.has_bias is False
    assert r2.source is not None and r2.source.module == "b" and r2.source.has_bias is True


def test_op_name_of_an_unhashable_callable() -> None:
    class Op:
        __name__ = "Relu_"
        __hash__ = None  # type: ignore[assignment]

        def __call__(self) -> None: ...

    assert op_name(Op()) == "relu"
    assert op_name(torch.relu) == op_name(torch.relu) == "relu"

"""Tracing: who feeds each BN and what consumes it, in eager code of any shape."""

from __future__ import annotations

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

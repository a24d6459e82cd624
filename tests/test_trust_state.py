"""The model is exactly as it was after an audit, whatever happens (issue 10, section 4).

The oracle is an independent snapshot taken in the test: every parameter and buffer by value,
every ``.grad`` (and whether it is None), ``requires_grad``, ``training`` flags, optimizer
state (deep copy of ``state_dict()``) and the three RNG states.
"""

from __future__ import annotations

import copy
import random
import threading
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bncheck
from bncheck.errors import UsageError
from bncheck.state import auditing


class TentLike(nn.Module):
    """Test-time adaptation: every forward takes an optimizer step on its BN gamma/beta, and
    the forward writes a non-BN buffer through ``.data`` and clamps a weight in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.emb = nn.Embedding(10, 4, max_norm=0.5)
        self.head = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(1))
        bn_params = [self.bn.weight, self.bn.bias]
        self.opt = torch.optim.Adam(bn_params, lr=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.data += 1
        with torch.no_grad():
            self.head.weight.clamp_(-0.01, 0.01)
        self.emb(torch.arange(3))  # renormalises rows of the embedding weight in place
        with torch.enable_grad():
            y = torch.relu(self.bn(self.conv(x)))
            loss = y.pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return self.head(y.mean((2, 3)))


def _with_history(model: nn.Module, x: torch.Tensor) -> None:
    """Give the model non-trivial grads, optimizer state and statistics."""
    model.train()
    model(x)
    for p in model.parameters():
        if p.grad is None and p.requires_grad:
            p.grad = torch.randn_like(p)
    model.head.weight.grad = None  # one grad left as None on purpose


def _snap(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    return {
        "params": [(n, p.detach().clone()) for n, p in model.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in model.named_buffers()],
        "objects": [id(t) for t in (*model.parameters(), *model.buffers())],
        "grads": [
            (n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
        ],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "opt": None if opt is None else copy.deepcopy(opt.state_dict()),
        "held_opt": copy.deepcopy(model.opt.state_dict()) if hasattr(model, "opt") else None,
        "torch": torch.get_rng_state().clone(),
        "numpy": np.random.get_state()[1].copy(),
        "python": random.getstate(),
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert _equal(before[key], after[key]), f"{key} changed"


def _setup(seed: int = 0) -> tuple[TentLike, torch.Tensor, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TentLike()
    x = torch.randn(4, 3, 6, 6)
    outer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    _with_history(model, x)
    outer.step()  # momentum buffers exist
    model.eval()
    model.bn.train()  # a mixed mode
    model.conv.weight.requires_grad_(False)
    return model, x, outer


def test_a_model_that_adapts_in_forward_is_restored_by_value() -> None:
    model, x, outer = _setup()
    before = _snap(model, outer)
    bncheck.audit(model, x, optimizer=outer)
    _assert_same(before, _snap(model, outer))


class _Interrupt(KeyboardInterrupt):
    pass


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(module_index=st.integers(0, 3), call=st.integers(1, 12), seed=st.integers(0, 3))
def test_keyboard_interrupt_at_any_hooked_call_leaves_everything_as_it_was(
    module_index: int, call: int, seed: int
) -> None:
    model, x, outer = _setup(seed)
    torch.manual_seed(100 + seed)
    np.random.seed(seed)
    random.seed(seed)
    target = [model.conv, model.bn, model.emb, model.head][module_index]
    calls = {"n": 0}

    def hook(*_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == call:
            raise _Interrupt

    handle = target.register_forward_hook(hook)
    before = _snap(model, outer)
    hooks = _hooks(model)
    try:
        with _MaybeInterrupt():
            bncheck.audit(model, x, optimizer=outer)
        assert _hooks(model) == hooks  # bncheck's hooks and modes are gone too
    finally:
        handle.remove()
    _assert_same(before, _snap(model, outer))


def _hooks(model: nn.Module) -> tuple[Any, ...]:
    from torch.nn.modules import module as module_mod
    from torch.overrides import _get_current_function_mode_stack

    per_module = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    global_hooks = (
        len(module_mod._global_forward_hooks),
        len(module_mod._global_forward_pre_hooks),
    )
    return (per_module, global_hooks, len(_get_current_function_mode_stack()))


class _MaybeInterrupt:
    """Swallow the interrupt if the audit made fewer calls than ``call`` (then it finished)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is _Interrupt


def test_the_interrupt_really_interrupts_an_audit() -> None:
    model, x, _ = _setup()
    handle = model.bn.register_forward_hook(lambda *_: (_ for _ in ()).throw(_Interrupt()))
    before = _snap(model, None)
    with pytest.raises(_Interrupt):
        bncheck.audit(model, x)
    handle.remove()
    _assert_same(before, _snap(model, None))


def test_uninitialised_lazy_modules_are_not_materialised() -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4), nn.ReLU())
    report = bncheck.audit(model, torch.randn(2, 3, 8, 8))
    assert isinstance(model[0].weight, nn.parameter.UninitializedParameter)
    assert "normalization" in report.skipped
    assert "uninitialised lazy layers (0)" in report.skipped["normalization"]
    assert report.complete  # skipped with a reason, as without an input


def test_two_threads_auditing_one_model_leave_it_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    before = _snap(model, None)
    inside: list[int] = []

    def hook(*_: Any) -> None:
        inside.append(threading.get_ident())

    model[1].register_forward_hook(hook)
    errors: list[BaseException] = []
    reports: list[bncheck.Report] = []

    def work() -> None:
        try:
            for _ in range(3):
                reports.append(bncheck.audit(model, x))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # audits are serialised: the calls of one audit are never interleaved with another's
    runs = [k for k, ident in enumerate(inside) if k == 0 or ident != inside[k - 1]]
    assert len(runs) <= 6
    assert all(r.findings == reports[0].findings for r in reports)
    _assert_same(before, _snap(model, None))
    assert not model.training


def test_auditing_is_true_only_inside_an_audit_pass_of_that_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    other = nn.Sequential(nn.BatchNorm2d(4))
    seen: list[tuple[bool, bool, bool]] = []
    model[1].register_forward_hook(
        lambda *_: seen.append((auditing(model), auditing(model[1]), auditing(other)))
    )
    bncheck.audit(model, torch.randn(4, 3, 6, 6))
    assert seen and all(s == (True, True, False) for s in seen)
    assert not auditing(model)
    model(torch.randn(4, 3, 6, 6))
    assert seen[-1] == (False, False, False)


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()


def test_a_model_made_under_inference_mode_is_audited() -> None:
    with torch.inference_mode():
        model = _small()
    before = [t.clone() for t in (*model.parameters(), *model.buffers())]
    x = torch.randn(4, 3, 8, 8)
    report = bncheck.audit(model, x)
    assert report.complete and report.ok
    assert "normalization" not in report.skipped
    assert any("inference_mode" in n for n in report.notes)
    # the same verdicts as for the same model made normally (fresh statistics in eval mode)
    twin = bncheck.audit(_small(), x)
    assert [f.to_dict() for f in report.findings] == [f.to_dict() for f in twin.findings]
    assert "untrained-stats" in report.rules_found()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    assert "weight-decay-on-bn" in bncheck.audit(model, x, optimizer=opt).rules_found()
    after = [*model.parameters(), *model.buffers()]
    assert all(torch.equal(a, b) and b.is_inference() for a, b in zip(before, after))


@pytest.mark.parametrize("bad", ["sgd", 0.1, [1, 2]])
def test_an_optimizer_that_is_not_one_is_a_usage_error(bad: Any) -> None:
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(UsageError, match=r"optimizer= must be a torch.optim.Optimizer"):
        bncheck.audit(model, optimizer=bad)


def test_a_frozen_parameter_statistics_layer_is_restored() -> None:
    class ParamStatsBN(nn.Module):
        """Keeps its statistics as frozen Parameters and updates them in forward."""

        def __init__(self) -> None:
            super().__init__()
            self.running_mean = nn.Parameter(torch.zeros(4), requires_grad=False)
            self.running_var = nn.Parameter(torch.ones(4), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
            return (x - self.running_mean) / (self.running_var + 1e-5).sqrt()

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), ParamStatsBN())
    x = torch.randn(8, 3)
    before = _snap(model, None)
    bncheck.audit(model, x)
    _assert_same(before, _snap(model, None))


def test_the_reset_between_stages_puts_back_all_but_parameter_values() -> None:
    from bncheck.state import Snapshot

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    snap = Snapshot(model)
    weight = model[0].weight.detach().clone()
    with torch.no_grad():
        model[1].running_mean.add_(1.0)
        model[0].weight.add_(1.0)
    model[1].cache = torch.zeros(2)  # an attribute a forward left behind
    model[1] = nn.Identity()  # a module swapped
    model.eval()
    state = torch.get_rng_state()
    torch.rand(3)
    snap.restore(parameters=False)
    assert isinstance(model[1], nn.BatchNorm2d) and not hasattr(model[1], "cache")
    assert torch.equal(model[1].running_mean, torch.zeros(4))
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(model[0].weight, weight + 1)  # left to the final restore
    assert not snap.settled
    snap.restore(final=True)
    assert torch.equal(model[0].weight, weight) and snap.settled


def test_large_tensors_written_through_data_are_restored_bit_for_bit() -> None:
    """Tensors of 1024 elements and more are compared through numpy: a forward that writes a
    large weight, a float16 buffer and an integer buffer through ``.data`` (no version
    counter moves) leaves none of it behind, and a NaN the model held stays NaN."""

    class Writer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)
            self.bn = nn.BatchNorm1d(64)
            self.register_buffer("halves", torch.randn(2048).half())
            self.register_buffer("counts", torch.arange(4096))
            with torch.no_grad():
                self.fc.weight[0, 0] = float("nan")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc.weight.data[1:].mul_(0.5)
            self.halves.data.add_(1)
            self.counts.data[7] += 1
            return self.bn(torch.nan_to_num(self.fc(x)))

    torch.manual_seed(0)
    model = Writer()
    before = _snap(model, None)
    bncheck.audit(model, torch.randn(8, 64))
    after = _snap(model, None)
    nan = after["params"][0][1][0, 0]
    assert torch.isnan(nan)
    for (name, b), (_, a) in zip(
        before["params"] + before["buffers"], after["params"] + after["buffers"]
    ):
        assert torch.equal(torch.nan_to_num(b), torch.nan_to_num(a)), name


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]),
    n=st.sampled_from([2, 8, 1024, 3000]),
    change=st.sampled_from(["none", "one", "nan", "negzero"]),
    transposed=st.booleans(),
)
def test_the_snapshot_comparison_agrees_with_torch_equal(
    dtype: torch.dtype, n: int, change: str, transposed: bool
) -> None:
    from bncheck.state import _same

    a = (torch.arange(n) % 5).to(dtype).reshape(2, -1)
    if transposed:  # a strided view, not contiguous
        a = a.t()
    b = a.clone()
    if change == "one":
        b[-1, -1] = ~b[-1, -1] if dtype == torch.bool else b[-1, -1] + 1
    elif change == "nan" and a.is_floating_point():
        a[0, 0] = b[0, 0] = float("nan")
    elif change == "negzero" and a.is_floating_point():
        a[0, 0], b[0, 0] = 0.0, -0.0
    assert _same(a, b) == torch.equal(a, b)

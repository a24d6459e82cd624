"""Property: nothing `audit` does changes the model, the optimizer or any RNG state.

Holds for varied models, modes, frozen flags and inputs, also when the audit fails half-way
(a forward that raises, an input the engine rejects).
"""

from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import MLPBN, ConvBNReLU, TwoBlock

import bncheck
from bncheck.models import vgg16_bn_small

_FACTORIES = {
    "conv": (lambda: ConvBNReLU(), (3, 6, 6)),
    "mlp": (lambda: MLPBN(), (6,)),
    "two": (lambda: TwoBlock(), (3, 5, 5)),
    "vgg": (lambda: vgg16_bn_small(width=0.0625), (3, 32, 32)),
    "dropout": (
        lambda: nn.Sequential(
            nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.ReLU(inplace=True)
        ),
        (6,),
    ),
}


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "torch_rng": torch.get_rng_state().clone(),
        "np_rng": np.random.get_state(),
        "py_rng": random.getstate(),
        "opt": copy.deepcopy(opt.state_dict()) if opt is not None else None,
    }


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bool(
            torch.equal(a, b)
            or (
                a.is_floating_point()
                and torch.equal(a.isnan(), b.isnan())
                and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        )
    )


def _assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert _same_tensor(before["state"][key], after["state"][key]), key
    assert before["ids"] == after["ids"]
    assert before["training"] == after["training"]
    assert before["grad"] == after["grad"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    np_b, np_a = before["np_rng"], after["np_rng"]
    assert np_b[0] == np_a[0] and np.array_equal(np_b[1], np_a[1]) and np_b[2:] == np_a[2:]
    assert before["py_rng"] == after["py_rng"]
    if before["opt"] is not None:
        ob, oa = before["opt"], after["opt"]
        assert ob["param_groups"] == oa["param_groups"]
        for k in ob["state"]:
            for name, value in ob["state"][k].items():
                assert _same_tensor(torch.as_tensor(value), torch.as_tensor(oa["state"][k][name]))


@settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(sorted(_FACTORIES)),
    modes=st.lists(st.booleans(), min_size=12, max_size=12),
    frozen=st.lists(st.booleans(), min_size=12, max_size=12),
    batch=st.sampled_from([0, 1, 2, 5]),
    input_case=st.sampled_from(["good", "none", "wrong-shape", "nan"]),
    with_optimizer=st.booleans(),
    nan_stats=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_audit_changes_nothing(
    kind, modes, frozen, batch, input_case, with_optimizer, nan_stats, seed
):
    torch.manual_seed(seed)
    factory, shape = _FACTORIES[kind]
    model = factory()
    with torch.no_grad():
        model.train()
        model(torch.randn(4, *shape))  # statistics away from their initial values
    for module, flag in zip(model.modules(), modes):
        module.training = flag
    for param, flag in zip(model.parameters(), frozen):
        param.requires_grad_(flag)
    if nan_stats:
        next(
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ).running_mean[0] = float("nan")
    opt = None
    if with_optimizer:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            trainable or [next(model.parameters())], lr=0.1, momentum=0.9, weight_decay=1e-4
        )
        if trainable:  # one step, so the optimizer has momentum buffers to keep
            sum(p.float().sum() for p in trainable).backward()
            opt.step()
            opt.zero_grad()
    x = None
    if input_case != "none":
        n = max(batch, 1)
        x = torch.randn(n, *shape)
        if input_case == "wrong-shape":
            x = torch.randn(n, 7, *shape[1:])
        elif input_case == "nan":
            x[0, 0] = float("nan")
    before = _snapshot(model, opt)
    random.random(), np.random.rand()  # the RNGs are in use; their state must survive
    before["py_rng"], before["np_rng"] = random.getstate(), np.random.get_state()
    # A clear error on bad input is allowed; a changed model is not.
    with contextlib.suppress(bncheck.BNCheckError):
        bncheck.audit(model, x, optimizer=opt)
    _assert_same(before, _snapshot(model, opt))


def test_buffers_are_restored_in_place_so_held_references_stay_valid():
    model = TwoBlock()
    held = model.block1[1].running_mean
    bncheck.audit(model, torch.randn(4, 3, 5, 5))
    assert model.block1[1].running_mean is held


class _ResizingObserver(nn.Module):
    """Resizes its buffer in place and fills it in every forward (as torch.ao's FakeQuantize
    does with its scale on its first call)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amax = x.detach().abs().amax(dim=(0, 2, 3))
        self.scale.resize_(amax.shape)
        self.scale.copy_(amax)
        return x


def test_a_buffer_resized_in_place_by_each_forward_is_put_back():
    # the audit's passes resize it again after a restore between them: the values put back
    # at the end are the user's, not the last pass's
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _ResizingObserver(), nn.BatchNorm2d(4))
    held = model[1].scale
    bncheck.audit(model, torch.randn(8, 3, 8, 8))
    assert model[1].scale is held
    assert torch.equal(held, torch.tensor([1.0]))


@pytest.mark.parametrize("fail_at", ["rule"])
def test_state_restored_when_a_rule_raises(monkeypatch, fail_at):
    from bncheck.checks import registry

    model = TwoBlock().eval()
    before = _snapshot(model, None)

    def boom(ctx):
        for layer in ctx.layers:
            layer.module.train()
            layer.running_mean.add_(1.0)
        raise RuntimeError("rule failed half-way")

    registry.load_checks()
    monkeypatch.setitem(registry._CHECKS, "keras-momentum", boom)
    with pytest.raises(RuntimeError, match="rule failed half-way"):
        bncheck.audit(model)
    _assert_same(before, _snapshot(model, None))

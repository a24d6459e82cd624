"""A ``torch.compile``\\ d model: unwrapped like DDP, audited eagerly, watched by the Monitor
without dynamo warnings, with layer names relative to the user's model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from zoo import ConvBNReLU, TwoBlock

import bncheck
from bncheck.discovery import is_compiled, unwrap_model


def deep_model(blocks: int = 10) -> nn.Sequential:
    """More BN layers than dynamo's recompile limit (8)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1, bias=False)]
    for _ in range(blocks):
        layers += [nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False)]
    return nn.Sequential(*layers)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches traced code per code object across models: start each test clean."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def test_unwrap_model_looks_through_compile_and_ddp_like_wrappers():
    model = TwoBlock()
    compiled = torch.compile(model)  # wrapping only: nothing is compiled before a call
    assert is_compiled(compiled) and not is_compiled(model)
    assert unwrap_model(compiled) is model
    assert unwrap_model(torch.nn.DataParallel(compiled)) is model


def test_audit_of_a_compiled_model_runs_eagerly_with_the_users_names():
    torch.manual_seed(0)
    model = ConvBNReLU()
    compiled = torch.compile(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dynamo warning, no recompilation
        report = bncheck.audit(compiled, torch.randn(8, 3, 8, 8))
    assert report.layers == ["bn"]
    assert report.forward_error is None
    assert all(not f.layer or not f.layer.startswith("_orig_mod") for f in report.findings)


@pytest.mark.slow
def test_monitor_on_a_compiled_model():
    """Dynamo traces the training loop (backend 'eager': no code generation, same tracing)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = deep_model()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    names = [f"{3 * i + 1}" for i in range(10)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bncheck.Monitor(compiled, optimizer=opt) as monitor:
            for _ in range(4):
                compiled(torch.randn(8, 3, 6, 6)).square().mean().backward()
                opt.step()
                opt.zero_grad()
            twin = copy.deepcopy(model)  # a copy of the watched module is not watched
            with torch.no_grad():  # BUG: validation in train mode
                compiled(torch.randn(8, 3, 6, 6))
                twin(torch.randn(8, 3, 6, 6))
    assert [str(w.message) for w in caught] == []
    # the hooks are traced into the graph: no graph break (which would make dynamo fall back
    # to eager for a Sequential), no frame of bncheck's compiled once per BN layer
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == counters["frames"]["ok"] <= 3
    report = monitor.report()
    assert monitor.steps == 4
    assert [f.layer for f in report.findings] == names
    assert report.rules_found() == {"stats-updated-without-grad"}
    history = monitor.history
    assert list(dict.fromkeys(history["layer"])) == names
    assert history[history["step"] <= 4]["updates"].tolist() == [1.0] * 40
    assert history[history["step"] <= 4]["train_calls"].tolist() == [1] * 40
    assert all(not m._forward_hooks for m in model.modules())  # removed at detach


@pytest.mark.slow
def test_a_monitor_attached_after_compilation_says_its_hooks_were_not_seen():
    torch.manual_seed(0)
    model = TwoBlock()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        compiled(torch.randn(8, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()  # compiled here, before the Monitor's hooks exist
    with bncheck.Monitor(compiled, optimizer=opt) as monitor:
        for _ in range(3):
            step()
    report = monitor.report()
    assert any("compiled before the Monitor attached" in n for n in report.notes)

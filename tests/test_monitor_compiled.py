"""A ``torch.compile``\\ d model: unwrapped like DDP, audited eagerly, watched by the Monitor
without dynamo warnings, with layer names relative to the user's model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from zoo import ConvBNReLU, TwoBlock

import bncheck
from bncheck.discovery import is_compiled, unwrap_model


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
    torch.manual_seed(0)
    model = TwoBlock()
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
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
    report = monitor.report()
    assert monitor.steps == 4
    assert [f.layer for f in report.findings] == ["block1.1", "block2.1"]
    assert report.rules_found() == {"stats-updated-without-grad"}
    history = monitor.history
    assert set(history["layer"]) == {"block1.1", "block2.1"}
    assert history[history["step"] <= 4]["updates"].tolist() == [1.0] * 8
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

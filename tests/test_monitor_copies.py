"""The Monitor never breaks the user's loop: the watched model can be saved, scripted and
copied inside and after the block, copies carry no hook, and bncheck's own audit passes on
the watched model are not taken for the user's training."""

from __future__ import annotations

import copy
import io
import pickle

import torch
import torch.nn.functional as F
from zoo import ConvBNReLU, TwoBlock

import bncheck
from bncheck.state import audit_pass, auditing


def model_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def saved_and_loaded(obj: object) -> object:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_save_script_and_deepcopy_work_inside_and_after_the_block():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(4, 3, 8, 8)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        step(model, opt)
        inside = [
            saved_and_loaded(model),
            torch.jit.script(model),
            copy.deepcopy(model),
            pickle.loads(pickle.dumps(model)),
        ]
        saved_and_loaded(opt)  # the optimizer carries nothing either
        step(model, opt, seed=1)
    after = [saved_and_loaded(model), torch.jit.script(model), copy.deepcopy(model)]
    model.eval()
    expected = model(x)
    for twin in inside[:1] + inside[2:] + after[:1] + after[2:]:
        assert model_hooks(twin) == 0
        twin.eval()
        if twin in after:
            torch.testing.assert_close(twin(x), expected)
    for scripted in (inside[1], after[1]):
        scripted.eval()
        assert scripted(x).shape == expected.shape
    assert monitor.steps == 2 and monitor.report().findings == []


def test_a_copy_taken_inside_the_block_is_not_watched_and_can_be_saved_after():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        twin = copy.deepcopy(model)
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                twin.train()
                twin(torch.randn(8, 3, 6, 6))  # statistics of the copy: not the watched model's
    assert monitor.report().findings == []
    assert model_hooks(twin) == 0
    saved_and_loaded(twin)


def test_an_audit_inside_the_block_adds_nothing_to_the_monitor_report():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for i in range(3):
            step(model, opt, seed=i)
            audit = bncheck.audit(model, torch.randn(8, 3, 8, 8))  # enters the audit scope
            assert audit.forward_error is None
    report = monitor.report()
    assert report.filter(rules=["stats-updated-without-grad"]) == []
    assert report.findings == []
    assert monitor.steps == 3


def test_without_the_scope_the_same_passes_would_be_counted():
    """The twin of the test above: the audit's train-mode passes are what the scope hides."""
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        step(model, opt)
        with torch.no_grad():
            model(torch.randn(8, 3, 8, 8))  # a train-mode pass without grad, outside any scope
        with audit_pass(model), torch.no_grad():
            model(torch.randn(8, 3, 8, 8))  # the same pass inside the scope
        step(model, opt, seed=1)
    [finding] = monitor.report().filter(rules=["stats-updated-without-grad"])
    assert finding.details["updates_without_grad"] == 1


def test_audit_scope_covers_submodules_and_ends():
    model = TwoBlock()
    assert not auditing(model)
    with audit_pass(model):
        assert auditing(model) and auditing(model.block1[1])
        assert not auditing(ConvBNReLU())
    assert not auditing(model.block1[1])


def test_a_monitor_dropped_without_detach_stops_watching():
    import gc

    from torch.nn.modules import module as module_hooks

    model = ConvBNReLU()
    before = len(module_hooks._global_forward_hooks)
    monitor = bncheck.Monitor(model).attach()
    assert len(module_hooks._global_forward_hooks) == before + 1
    del monitor
    gc.collect()
    model(torch.randn(4, 3, 8, 8))  # the orphaned hook removes itself at its next call
    assert len(module_hooks._global_forward_hooks) == before

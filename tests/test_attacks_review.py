"""Attacks from the security review: each test names the hole it keeps closed."""

from __future__ import annotations

import collections
import re
import sys
import textwrap

import pytest
import torch
from torch import nn

import bncheck
from bncheck.cli import main
from bncheck.state import preserved


def fails(capsys, *argv: str, match: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("bncheck: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    assert re.search(match, err), err
    return err


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of hostile --arch factories, importable by name."""
    name = f"review_factories_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def generator_exit():
                raise GeneratorExit

            def meta():
                with torch.device("meta"):
                    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

            class _Holder:
                @property
                def boom(self):
                    raise ValueError("property raised")

            holder = _Holder()
            """
        )
    )
    (tmp_path / f"{name}_exits.py").write_text("raise GeneratorExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)
    sys.modules.pop(f"{name}_exits", None)


# ---- --arch factories: one line, never a traceback or a silent pass --------------------------
def test_factory_raising_generator_exit_is_one_line(capsys, factories):
    fails(
        capsys,
        "audit",
        "--arch",
        f"{factories}:generator_exit",
        match=r"raised GeneratorExit",
    )


def test_module_raising_generator_exit_at_import_is_one_line(capsys, factories):
    fails(capsys, "audit", "--arch", f"{factories}_exits:f", match=r"cannot import .*GeneratorExit")


def test_attribute_lookup_that_raises_is_one_line(capsys, factories):
    fails(
        capsys,
        "audit",
        "--arch",
        f"{factories}:holder.boom",
        match=r"looking up 'holder\.boom' .* raised ValueError: property raised",
    )


def test_factory_returning_a_meta_model_holds_no_values(capsys, factories):
    fails(capsys, "audit", "--arch", f"{factories}:meta", match=r"holds no values: 7 of its")


def test_meta_factory_filled_by_a_checkpoint_still_audits(capsys, factories, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), path)
    assert main(["audit", str(path), "--arch", f"{factories}:meta"]) in (0, 1)
    assert "holds no values" not in capsys.readouterr().err


# ---- restricted unpickler: BUILD cannot hide an allowed class's methods ----------------------
class _ShadowingDict(collections.OrderedDict):
    """Unpickles as an OrderedDict whose ``items``/``keys``/``values`` attributes are other
    objects: code calling ``.items()`` would see something else than the dict holds."""

    def __reduce__(self):
        fake = {name: collections.OrderedDict for name in ("items", "keys", "values")}
        return (collections.OrderedDict, (), fake, None, iter(list(dict.items(self))))


def test_build_cannot_shadow_ordereddict_methods(capsys, tmp_path):
    sd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()
    path = tmp_path / "shadow.pt"
    torch.save(_ShadowingDict(sd), path)
    fails(capsys, "audit", str(path), match=r"BUILD sets 'items' on a OrderedDict")


def test_saved_state_dict_metadata_still_loads(capsys, tmp_path):
    sd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict()
    assert hasattr(sd, "_metadata")  # set by BUILD when unpickled
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    assert main(["audit", str(path)]) in (0, 1)
    assert "error:" not in capsys.readouterr().err


# ---- the model's structure and held schedulers are put back ----------------------------------
def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_audit_removes_a_buffer_a_hook_registered():
    model = _net()

    def hook(module, inputs, output):
        if "ema" not in module._buffers:
            module.register_buffer("ema", output.detach().mean().clone())

    model.register_forward_hook(hook)
    keys = set(model.state_dict())
    bncheck.audit(model, torch.randn(8, 3, 8, 8))
    assert set(model.state_dict()) == keys
    assert not hasattr(model, "ema")


def test_audit_removes_a_submodule_the_forward_assigned():
    class Grows(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            self.extra = nn.BatchNorm2d(3)
            return self.bn(x)

    model = Grows()
    bncheck.audit(model, torch.randn(8, 3, 4, 4))
    assert [n for n, _ in model.named_children()] == ["bn"]
    assert "extra" not in model.__dict__


def test_audit_puts_back_plain_attributes_a_hook_changed():
    model = _net()
    model.calls = 0

    def hook(module, inputs, output):
        module.calls += 1
        module.last_output = output.detach()

    model.register_forward_hook(hook)
    bncheck.audit(model, torch.randn(8, 3, 8, 8))
    assert model.calls == 0
    assert not hasattr(model, "last_output")


def test_audit_restores_a_scheduler_the_model_steps():
    class Adapts(nn.Module):  # test-time adaptation with a schedule
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9)
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)

        def forward(self, x):
            with torch.enable_grad():
                loss = self.net(x).pow(2).mean()
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                self.sched.step()
            return self.net(x)

    model = Adapts()
    before = (model.sched.last_epoch, list(model.sched.get_last_lr()))
    bncheck.audit(model, torch.randn(8, 3, 8, 8))
    assert (model.sched.last_epoch, list(model.sched.get_last_lr())) == before
    assert model.opt.param_groups[0]["lr"] == 0.1


def test_restore_may_run_twice_after_structure_changes():
    model = _net()
    with preserved(model) as snapshot:
        model.register_buffer("added", torch.zeros(1))
        model.tag = "x"
        snapshot.restore()
        assert "added" not in model._buffers and not hasattr(model, "tag")
        model.register_buffer("added", torch.zeros(1))
    assert "added" not in model._buffers


# ---- torch.export archives: torch's own logged traceback stays off stderr ---------------------
def test_export_archive_torch_rejects_is_one_line_naming_the_cause(capfd, tmp_path):
    import zipfile

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), clean)
    path = tmp_path / "two_roots.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("other/data/extra.bin", b"x")  # a second root: torch's reader refuses it
    code = main(["audit", str(path)])
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "warnings above" not in err, err
    assert re.search(r"not in a subdirectory", err), err

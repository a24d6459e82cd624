"""The engine's entry point for front ends: ``audit(model, x, facts=AuditFacts(...))``.

What a front end found (missing BN buffers, a model that cannot run, needs it cannot give, an
input it made up) goes in as facts; the skip reasons, findings and input errors come out of
the engine, with no CLI involved.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import bncheck
from bncheck.checks.catalogue import CATALOGUE, NEEDS, info_for
from bncheck.context import AuditFacts
from bncheck.engine import FORWARD_NEEDS, audit, skip_reason
from bncheck.errors import InputError, UsageError


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
        )
    )


def two_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(4),
            conv2=nn.Conv2d(4, 4, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(4),
        )
    )


def trained(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def batch(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


class Counting(nn.Module):
    """Counts its forward calls; raises in the modes listed in ``fails_in``."""

    def __init__(self, fails_in: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.body = block()
        self.calls = 0
        self.fails_in = fails_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.training in self.fails_in:
            raise RuntimeError(f"cannot run in {'train' if self.training else 'eval'} mode")
        return self.body(x)


# ---- skip reasons ----------------------------------------------------------------------------
def test_skip_reason_without_facts_is_the_catalogue_wording():
    for need, text in NEEDS.items():
        if need in ("training run", "distributed"):
            assert "bncheck.Monitor" in skip_reason(need)
        else:
            assert skip_reason(need) == f"needs {text}"


def test_needs_a_front_end_cannot_give_are_worded_by_the_engine():
    facts = AuditFacts(
        cannot_give={
            "optimizer": "which a file does not hold",
            "data": "",
            "user batch": "give its size with --batch-size N",
        }
    )
    report = audit(trained(block()), batch(2, 3, 8, 8), synthetic_input=True, facts=facts)
    assert report.skipped["weight-decay-on-bn"] == (
        "needs the optimizer, which a file does not hold: in Python, "
        "bncheck.audit(model, x, optimizer=opt)"
    )
    assert report.skipped["stat-drift"] == (
        "needs batches of real data: in Python, bncheck.audit(model, x, data=loader)"
    )
    for rid in ("small-batch", "input-not-normalized"):
        assert report.skipped[rid] == (
            "judges only the batch you train with: give its size with --batch-size N; "
            "a synthetic input is not judged"
        )
    # the same audit without facts keeps the Python wording
    plain = audit(trained(block()), batch(2, 3, 8, 8), synthetic_input=True)
    assert plain.skipped["weight-decay-on-bn"] == f"needs {NEEDS['optimizer']}"


def test_a_need_the_front_end_cannot_give_wins_over_a_failed_pass():
    model = Counting(fails_in=(True, False)).eval()
    facts = AuditFacts(cannot_give={"data": ""})
    report = audit(model, batch(2, 3, 8, 8), synthetic_input=True, facts=facts)
    assert report.forward_error is not None and not report.complete
    assert report.skipped["stat-drift"].startswith("needs batches of real data:")
    assert report.skipped["normalization"].startswith("the forward pass failed")


def test_a_model_that_cannot_run_skips_every_forward_rule_and_is_never_called():
    model = Counting().eval()
    reason = "TorchScript modules cannot be hooked: pass --arch"
    report = audit(model, batch(2, 3, 8, 8), facts=AuditFacts(cannot_run=reason))
    assert model.calls == 0
    forward_rules = {i.id for i in CATALOGUE if i.needs in FORWARD_NEEDS}
    assert {r for r, why in report.skipped.items() if why == reason} == forward_rules
    assert report.complete and report.forward_error is None


def test_unknown_settings_skip_the_model_rules_and_are_listed_last():
    reason = "a state dict does not store the layers' settings"
    model = trained(block())
    model.bn.eps = 0.0  # invalid-eps would be an error if it ran
    report = audit(model, facts=AuditFacts(settings_unknown=reason))
    model_rules = [i.id for i in CATALOGUE if i.needs == "model"]
    assert not any(f.rule in model_rules for f in report.findings)
    assert list(report.skipped)[-len(model_rules) :] == model_rules
    assert all(report.skipped[r] == reason for r in model_rules)
    assert "invalid-eps" not in report.settings["rules"]
    assert any(f.rule == "invalid-eps" for f in audit(model).findings)


def test_notes_from_the_front_end_come_first():
    model = nn.Sequential(nn.BatchNorm2d(2)).to("meta")
    report = audit(model, facts=AuditFacts(notes=("checkpoint: loaded", "input: none")))
    assert report.notes[:2] == ["checkpoint: loaded", "input: none"]
    assert any("meta device" in n for n in report.notes[2:])


def test_facts_must_be_audit_facts():
    with pytest.raises(UsageError, match="facts= must be a bncheck.context.AuditFacts"):
        audit(block(), facts={"cannot_run": "x"})


def test_public_audit_takes_facts_too():
    report = bncheck.audit(trained(block()), facts=AuditFacts(notes=("from a front end",)))
    assert report.notes[0] == "from a front end"


# ---- untrained-stats: missing buffers --------------------------------------------------------
def test_catalogue_gives_missing_buffers_its_own_severity():
    info = info_for("untrained-stats")
    assert info.severity == "warning"
    assert info.severity_for("missing-buffers") == "error"
    assert info.severity_for(None) == info.severity_for("other") == "warning"


def test_missing_buffers_are_an_untrained_stats_error_per_layer():
    model = two_bn()
    trained(model)
    model.bn1.reset_running_stats()  # what a checkpoint without them leaves behind
    facts = AuditFacts(missing_buffers={"bn1": ("running_mean", "running_var")})
    report = audit(model, facts=facts)
    (finding,) = [f for f in report.findings if f.rule == "untrained-stats"]
    assert finding.severity.value == "error" and finding.layer == "bn1"
    assert finding.message.startswith(
        "bn1 (BatchNorm2d): running_mean and running_var missing from the checkpoint"
    )
    assert finding.details["missing"] == ["bn1.running_mean", "bn1.running_var"]
    assert report.failed("error")
    # the fact alone makes the finding: without it the same model gets the warning only
    (plain,) = [f for f in audit(model).findings if f.rule == "untrained-stats"]
    assert plain.severity.value == "warning" and "missing" not in plain.message


def test_missing_buffers_are_reported_in_train_mode_too():
    model = two_bn().train()
    facts = AuditFacts(missing_buffers={"bn2": ("running_var",)})
    found = [f for f in audit(model, facts=facts).findings if f.rule == "untrained-stats"]
    assert [(f.layer, f.severity.value) for f in found] == [("bn2", "error")]
    assert found[0].message.startswith("bn2 (BatchNorm2d): running_var missing")


def test_missing_buffers_in_every_layer_are_one_model_wide_error():
    model = two_bn().eval()
    missing = {"bn1": ("running_mean", "running_var"), "bn2": ("running_mean", "running_var")}
    report = audit(model, facts=AuditFacts(missing_buffers=missing))
    (finding,) = [f for f in report.findings if f.rule == "untrained-stats"]
    assert finding.layer is None and finding.severity.value == "error"
    assert finding.message.startswith(
        "4 BN buffers missing from the checkpoint (bn1.running_mean, bn1.running_var, "
        "bn2.running_mean, +1 more): the running statistics of all 2 BN layers were not saved"
    )
    assert finding.details["layers"] == ["bn1", "bn2"]


def test_a_saved_but_untrained_layer_next_to_missing_ones_is_its_own_warning():
    model = two_bn().eval()  # both at their initial values, only bn2's were not saved
    report = audit(model, facts=AuditFacts(missing_buffers={"bn2": ("running_mean",)}))
    found = sorted(
        (f.layer, f.severity.value) for f in report.findings if f.rule == "untrained-stats"
    )
    assert found == [("bn1", "warning"), ("bn2", "error")]


def test_missing_buffers_respect_ignore():
    facts = AuditFacts(missing_buffers={"bn": ("running_mean",)})
    report = audit(block().eval(), ignore="untrained-stats", facts=facts)
    assert not any(f.rule == "untrained-stats" for f in report.findings)


# ---- a forward that fails on an input the front end made up ------------------------------------
HINT = "pass --input-shape with the shape the model expects"


def test_a_made_up_input_that_does_not_fit_is_an_input_error():
    model = trained(block())
    with pytest.raises(InputError) as info:
        audit(
            model,
            batch(2, 1, 8, 8),
            synthetic_input=True,
            source="m.pt",
            facts=AuditFacts(bad_input_hint=HINT),
        )
    message = str(info.value)
    assert message.startswith(
        "m.pt: the model's forward failed on an input of shape (2, 1, 8, 8): "
    )
    assert "RuntimeError" in message and message.endswith(HINT)
    # without the fact the input is the caller's: the report says the forward failed
    report = audit(model, batch(2, 1, 8, 8))
    assert report.forward_error is not None and not report.complete


def test_a_model_or_buffer_error_explains_the_failure():
    model = trained(block())
    facts = AuditFacts(bad_input_hint=HINT, missing_buffers={"bn": ("running_var",)})
    report = audit(model, batch(2, 1, 8, 8), synthetic_input=True, facts=facts)
    assert report.forward_error is not None and not report.complete
    assert any(f.rule == "untrained-stats" and f.severity.value == "error" for f in report.findings)


def test_a_failure_only_in_the_audit_passes_is_not_blamed_on_the_input():
    # fails only in train mode; the user's model is in eval mode and runs fine there
    model = Counting(fails_in=(True,)).eval()
    report = audit(
        model, batch(2, 3, 8, 8), synthetic_input=True, facts=AuditFacts(bad_input_hint=HINT)
    )
    assert report.forward_error is not None and "train mode" in report.forward_error
    assert not report.complete
    assert model.training is False


def test_the_check_run_leaves_the_model_as_it_was():
    model = Counting(fails_in=(True, False)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="cannot run in eval mode"):
        audit(model, batch(2, 3, 8, 8), synthetic_input=True, facts=AuditFacts(bad_input_hint=HINT))
    assert model.training is False
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the CLI passes facts and decides nothing --------------------------------------------------
def test_the_cli_passes_what_loading_found_as_facts(tmp_path, monkeypatch, capsys):
    import bncheck.engine
    from bncheck.cli import main

    (tmp_path / "h8_block_factory.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), "
        "torch.nn.BatchNorm2d(4), torch.nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    state = {k: v for k, v in model.state_dict().items() if "running" not in k}
    torch.save(state, tmp_path / "m.pt")
    seen = []
    real = bncheck.engine.audit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("facts"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bncheck.engine, "audit", spy)
    argv = ["audit", str(tmp_path / "m.pt"), "--arch", "h8_block_factory:make", "--no-config"]
    try:
        code = main([*argv, "--format", "json"])
    finally:
        sys.modules.pop("h8_block_factory", None)
    out = capsys.readouterr().out
    (facts,) = seen
    assert facts.missing_buffers == {"1": ("running_mean", "running_var")}
    assert facts.cannot_run is None and facts.bad_input_hint is not None
    assert set(facts.cannot_give) == {"optimizer", "data", "user batch"}
    assert any("BN buffers missing" in n for n in facts.notes)
    assert code == 1 and '"severity": "error"' in out and '"untrained-stats"' in out

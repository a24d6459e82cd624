"""No false alarms: correct models of every common BN family get no error finding.

Each family (tests/zoo_families.py) is audited fresh and after a few training steps, in train
and in eval mode. Besides "no error", the tracing rules must stay quiet: these architectures
put BN right after a bias-free conv/linear (or after an add / a concat).
"""

from __future__ import annotations

import pytest
from zoo_families import FAMILIES, batch, build, populate, train_steps

import bncheck

QUIET = {
    "bn-after-activation",
    "bias-before-bn",
    "dropout-before-bn",
    "bn-reused",
    "normalization",
    "ema-update",
    "eval-batch-dependence",
    "eval-nondeterminism",
    "eval-updates-stats",
    "single-value-per-channel",
    "input-not-normalized",
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("state", ["fresh", "populated", "trained"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_correct_family_has_no_error(family: str, state: str, mode: str) -> None:
    model = build(family)
    x = batch(family)
    if state == "populated":  # forwards without an optimizer step
        populate(model, x)
    elif state == "trained":
        train_steps(model, x)
    model.train(mode == "train")
    report = bncheck.audit(model, x)
    assert report.forward_error is None
    assert report.ok, report.to_table() if hasattr(report, "to_table") else report
    noisy = [f for f in report.findings if f.rule in QUIET]
    assert noisy == [], [f.message for f in noisy]
    ran = set(report.settings["rules"])
    assert {"normalization", "ema-update", "eval-batch-dependence"} <= ran


def test_frozen_bn_family_is_really_frozen_and_not_judged_as_training() -> None:
    model = build("frozen_bn_resnet")
    report = bncheck.audit(model, batch("frozen_bn_resnet"), select=["normalization", "ema-update"])
    assert report.findings == []


def test_bn_act_layers_are_checked_on_their_batch_norm_output() -> None:
    from bncheck.context import AuditContext  # noqa: F401  (documents what ctx.forward is)
    from bncheck.engine import prepare
    from bncheck.probes import collect
    from bncheck.state import preserved

    model = build("bn_act")
    ctx = prepare(model)
    ctx.example_input = batch("bn_act")
    ctx.user_batch = True
    with preserved(model):
        obs = collect(ctx)
    assert {c.layer: c.norm_source for c in obs.calls} == {"bn1": "batch_norm", "bn2": "batch_norm"}

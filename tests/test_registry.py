"""The rule registry holds the whole catalogue of the public contract."""

from __future__ import annotations

import pytest

import bncheck
from bncheck.checks.catalogue import CATALOGUE, TOLERANCES
from bncheck.checks.registry import resolve_rule_ids, resolve_tolerances

# The rule catalogue of the public contract (DESIGN.md section 3): id -> default severity.
CONTRACT = {
    "bn-after-activation": "info",
    "bias-before-bn": "info",
    "dropout-before-bn": "info",
    "bn-reused": "warning",
    "keras-momentum": "warning",
    "invalid-eps": "error",
    "no-running-stats": "warning",
    "frozen-bn-in-train-mode": "warning",
    "nonfinite-stats": "error",
    "negative-running-var": "error",
    "tiny-running-var": "warning",
    "untrained-stats": "warning",
    "dead-channels": "info",
    "normalization": "error",
    "ema-update": "error",
    "eval-batch-dependence": "error",
    "eval-nondeterminism": "error",
    "eval-updates-stats": "error",
    "single-value-per-channel": "error",
    "small-batch": "warning",
    "input-not-normalized": "warning",
    "stat-drift": "warning",
    "weight-decay-on-bn": "warning",
    "frozen-bn-drift": "error",
    "stats-not-updating": "warning",
    "stats-updated-without-grad": "warning",
    "multiple-updates-per-step": "warning",
    "rank-divergent-stats": "warning",
    "unsynced-small-batch": "info",
}


def test_registry_holds_exactly_the_contract_catalogue():
    registry = {rule.id: rule.severity.value for rule in bncheck.rules()}
    assert registry == CONTRACT
    assert [info.id for info in CATALOGUE] == list(CONTRACT)


def test_every_rule_has_a_check_function_and_a_summary():
    missing = [rule.id for rule in bncheck.rules() if rule.check is None]
    assert missing == []
    assert all(rule.summary and rule.needs_description for rule in bncheck.rules())


def test_tolerances_belong_to_their_rule_and_have_docs():
    for name, (rule_id, tol) in TOLERANCES.items():
        assert rule_id in CONTRACT and tol.doc and tol.name == name
    assert resolve_tolerances({})["momentum_max"] == 0.5
    assert resolve_tolerances({"min_batch_size": "16"})["min_batch_size"] == 16
    with pytest.raises(bncheck.UsageError, match=">= 0"):
        resolve_tolerances({"momentum_max": -1})
    with pytest.raises(bncheck.UsageError, match="must be a number, got True"):
        resolve_tolerances({"ema_rtol": True})


def test_select_all_and_ignore():
    assert resolve_rule_ids() == list(CONTRACT)
    assert resolve_rule_ids(["all"], ["invalid-eps"]) == [r for r in CONTRACT if r != "invalid-eps"]
    assert resolve_rule_ids("ema-update,invalid-eps") == ["invalid-eps", "ema-update"]


def test_explain_returns_the_rule_page_and_rejects_unknown_ids():
    assert "keras-momentum" in bncheck.explain("keras-momentum")
    with pytest.raises(bncheck.UsageError, match="did you mean 'dead-channels'"):
        bncheck.explain("dead-channel")


@pytest.mark.slow
def test_import_bncheck_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, bncheck, bncheck.checks.registry; "
        "bncheck.checks.registry.resolve_rule_ids('ema-update'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_selection_that_checks_nothing_is_an_error():
    with pytest.raises(bncheck.UsageError, match="select names no rule"):
        resolve_rule_ids(select=[])
    with pytest.raises(bncheck.UsageError, match="select names no rule"):
        resolve_rule_ids(select=" , ")
    with pytest.raises(bncheck.UsageError, match="ignore='all' would check nothing"):
        resolve_rule_ids(ignore="all")
    with pytest.raises(bncheck.UsageError, match="every selected rule is also ignored"):
        resolve_rule_ids(select="ema-update", ignore="ema-update")

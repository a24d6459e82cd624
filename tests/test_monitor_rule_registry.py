"""Every training-run rule has its class in ``checks/training.py``; each rule whose catalogue
need is a training run has its check function there, and the others keep their audit's."""

from __future__ import annotations

from bncheck.checks.catalogue import CATALOGUE
from bncheck.checks.registry import get_rule
from bncheck.checks.training import TRAINING_RULES


def test_every_training_run_rule_has_a_class_and_its_check():
    run_rules = {i.id for i in CATALOGUE if i.needs in ("training run", "distributed")}
    assert run_rules <= set(TRAINING_RULES)
    for rid in run_rules:
        assert get_rule(rid).check is not None
        assert get_rule(rid).check.__module__ == "bncheck.checks.training"


def test_rules_also_judged_by_the_audit_keep_their_audit_check():
    for rid in set(TRAINING_RULES) - {
        i.id for i in CATALOGUE if i.needs in ("training run", "distributed")
    }:
        assert get_rule(rid).check.__module__ != "bncheck.checks.training", rid

"""The engine's report of a training run: ``engine.run_report(model, run, ...)``.

A Monitor gathers a :class:`RunObservations` and hands it in; here the observations are made by
hand (no Monitor, no training loop), so these tests pin what the engine decides on its own:
which rules run on a run, every skip reason, the findings the run's episodes become, and the
merge of the run's ``nonfinite-stats`` finding with the end-of-run one.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from bncheck.checks.catalogue import CATALOGUE, NEEDS
from bncheck.checks.training import Episode, RunObservations
from bncheck.context import AuditFacts
from bncheck.engine import run_judged, run_report, skip_reason
from bncheck.errors import UsageError

NOT_DISTRIBUTED = "needs torch.distributed with more than one rank while the Monitor was attached"
DISTRIBUTED_RULES = {"rank-divergent-stats", "unsynced-small-batch"}
FORWARD_RULES_NOT_JUDGED = {  # audit-only rules: need a forward pass the run does not give
    r.id
    for r in CATALOGUE
    if r.needs in ("forward", "user batch", "data") and r.id not in ("small-batch", "stat-drift")
}


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1, bias=False),
            bn1=nn.BatchNorm2d(4),
            conv2=nn.Conv2d(4, 6, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(6),
        )
    )
    with torch.no_grad():  # trained statistics: untrained-stats has nothing to say
        for _ in range(3):
            m(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return m


def observations(*episodes: Episode, steps: int = 10, **kw: Any) -> RunObservations:
    run = RunObservations(
        layer_names=["bn1", "bn2"],
        layer_kinds=["BatchNorm2d", "BatchNorm2d"],
        step_kind="optimizer",
        steps=steps,
        drift_judged=np.array([steps, steps], dtype=np.int64),
        **kw,
    )
    for ep in episodes:
        run.episodes[(ep.rule, ep.layer)] = ep
    return run


def of(report: Any, rule: str) -> list[Any]:
    return [f for f in report.findings if f.rule == rule]


# ---- which rules run, and why the others do not ------------------------------------------------
def test_every_skip_reason_of_a_run_without_optimizer_or_torch_distributed():
    report = run_report(model(), observations())
    expected = {rid: NOT_DISTRIBUTED for rid in DISTRIBUTED_RULES}
    for r in CATALOGUE:
        if r.id in FORWARD_RULES_NOT_JUDGED:
            expected[r.id] = f"needs {NEEDS[r.needs]}"
        elif r.needs == "optimizer":
            expected[r.id] = f"needs {NEEDS['optimizer']}"
    assert report.skipped == expected
    # what the run cannot give is listed first
    assert set(list(report.skipped)[: len(DISTRIBUTED_RULES)]) == DISTRIBUTED_RULES
    # the rules a run judges step by step are never skipped, whatever their catalogue need
    for rid in ("nonfinite-stats", "small-batch", "stat-drift"):
        assert rid not in report.skipped
        assert rid in report.settings["rules"]
    assert set(report.settings["rules"]) == {r.id for r in CATALOGUE} - set(expected)


def test_a_distributed_run_with_an_optimizer_runs_the_distributed_and_optimizer_rules():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    report = run_report(m, observations(distributed=True, world_size=2), optimizer=opt)
    assert set(report.skipped) == FORWARD_RULES_NOT_JUDGED
    assert not DISTRIBUTED_RULES & set(report.skipped)
    assert "weight-decay-on-bn" in report.settings["rules"]


def test_the_distributed_wording_is_the_engines_table_and_audits_keep_their_own():
    # one table of reasons: the Monitor's "not distributed" is a need it cannot give
    assert skip_reason("distributed", AuditFacts(cannot_give={"distributed": ""})) == (
        NOT_DISTRIBUTED
    )
    assert skip_reason("distributed") == (
        "needs a distributed training run: watch one with bncheck.Monitor"
    )


def test_a_front_ends_cannot_give_words_the_reason_and_its_notes_come_first():
    facts = AuditFacts(
        cannot_give={"optimizer": "which this loop does not pass"}, notes=("watched 10 steps",)
    )
    report = run_report(model(), observations(), facts=facts)
    assert report.skipped["weight-decay-on-bn"] == (
        "needs the optimizer, which this loop does not pass: in Python, "
        "bncheck.audit(model, x, optimizer=opt)"
    )
    assert report.notes[0] == "watched 10 steps"


def test_select_limits_the_report_to_the_selected_rules():
    report = run_report(model(), observations(), select="frozen-bn-drift,rank-divergent-stats")
    assert report.settings["select"] == ["frozen-bn-drift", "rank-divergent-stats"]
    assert report.skipped == {"rank-divergent-stats": NOT_DISTRIBUTED}
    assert report.settings["rules"] == ["frozen-bn-drift"]


def test_run_judged_are_the_training_rules_whose_need_is_not_a_run():
    by_id = {r.id: r for r in CATALOGUE}
    assert run_judged() == ("nonfinite-stats", "small-batch", "stat-drift")
    assert all(by_id[r].needs not in ("training run", "distributed") for r in run_judged())


# ---- findings from hand-made episodes ---------------------------------------------------------
def test_an_episode_becomes_a_finding_with_its_step_and_the_catalogues_severity():
    ep = Episode(
        "frozen-bn-drift",
        1,
        3,
        7,
        5,
        {"updates": 1.0, "moved": 0.25, "reason": "gamma/beta are frozen"},
    )
    report = run_report(model(), observations(ep), select="frozen-bn-drift")
    [f] = report.findings
    assert (f.rule, f.layer, f.severity.value) == ("frozen-bn-drift", "bn2", "error")
    assert f.details["step"] == 3 and f.details["last_step"] == 7
    assert f.details["steps_affected"] == 5 and f.details["steps_observed"] == 10
    assert "from optimizer step 3 (5 of 10 optimizer steps, last 7)" in f.message
    assert f.message.startswith("bn2")


def test_a_distributed_episode_is_reported_only_when_the_run_was_distributed():
    ep = Episode(
        "unsynced-small-batch", 0, 1, 10, 10, {"batch_size": 2, "samples_per_channel": 128}
    )
    flat = run_report(model(), observations(ep))
    assert of(flat, "unsynced-small-batch") == []
    dist = run_report(model(), observations(ep, distributed=True, world_size=4, rank=1))
    [f] = of(dist, "unsynced-small-batch")
    assert f.layer == "bn1" and f.details["rank"] == 1 and f.details["world_size"] == 4


def test_small_batch_and_stat_drift_come_from_the_run_not_skipped():
    small = Episode("small-batch", 0, 4, 4, 1, {"batch_size": 1, "samples_per_channel": 64})
    drift = Episode("stat-drift", 1, 2, 9, 6, {"drift_z": 9.0, "drift_var_ratio": 1.0})
    report = run_report(model(), observations(small, drift))
    [s] = of(report, "small-batch")
    assert (s.layer, s.details["step"], s.details["batch_size"]) == ("bn1", 4, 1)
    [d] = of(report, "stat-drift")
    assert (d.layer, d.details["judged_steps"]) == ("bn2", 10)


def test_a_drift_episode_too_short_to_judge_says_nothing():
    drift = Episode("stat-drift", 0, 2, 3, 2, {"drift_z": 9.0, "drift_var_ratio": 1.0})
    report = run_report(model(), observations(drift))
    assert of(report, "stat-drift") == []
    assert "stat-drift" not in report.skipped


def test_the_runs_nonfinite_finding_replaces_the_end_of_run_one_of_its_layer():
    m = model()
    with torch.no_grad():
        m.bn1.running_var[1] = float("nan")  # both layers are non-finite at the end
        m.bn2.running_mean[:2] = float("inf")
    ep = Episode("nonfinite-stats", 0, 6, 10, 5, {"channels": 1})
    report = run_report(m, observations(ep), select="nonfinite-stats")
    by_layer = {f.layer: f for f in report.findings}
    assert sorted(by_layer) == ["bn1", "bn2"] and len(report.findings) == 2
    run_f, end_f = by_layer["bn1"], by_layer["bn2"]
    assert run_f.details["step"] == 6 and "at optimizer step 6" in run_f.message
    assert run_f.details["at_end"]  # the end-of-run check's details are kept
    assert "step" not in end_f.details  # no run episode: the end-of-run finding stays


# ---- the engine's promises --------------------------------------------------------------------
def test_extra_settings_are_added_and_the_model_is_left_as_it_was():
    m = model()
    m.bn2.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [x.training for x in m.modules()]
    report = run_report(m, observations(), settings={"steps": 11}, source="loop")
    assert report.settings["steps"] == 11 and report.source == "loop"
    assert report.layers == ["bn1", "bn2"]
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [x.training for x in m.modules()] == modes


def test_bad_arguments_are_one_clear_usage_error():
    with pytest.raises(UsageError, match="RunObservations"):
        run_report(model(), {"steps": 3})  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="AuditFacts"):
        run_report(model(), observations(), facts={"notes": ()})  # type: ignore[arg-type]

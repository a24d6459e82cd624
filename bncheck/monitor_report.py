"""From a run's observations to a :class:`bncheck.Report` (the Monitor's report assembly).

:func:`run_report` is the "run observations -> findings" counterpart of ``engine.audit``: it
decides which rules can run on what a Monitor saw (needs and skip reasons), runs them through
the engine, and puts the Report together. The Monitor only passes facts in (the model, the
optimizer, the :class:`~bncheck.checks.training.RunObservations`, its notes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .checks.training import RunObservations, run_findings
from .engine import prepare, run_rules
from .report import Finding, Report
from .state import preserved

__all__ = ["run_report"]

#: Rules with an end-of-run check (their catalogue needs) that the run also judges step by
#: step: their findings come from the run's observations and carry the step.
RUN_JUDGED = ("nonfinite-stats", "small-batch", "stat-drift")
_DISTRIBUTED_RULES = ("rank-divergent-stats", "unsynced-small-batch")
_NOT_DISTRIBUTED = "needs torch.distributed with more than one rank while the Monitor was attached"


def run_report(
    model: nn.Module,
    run: RunObservations,
    *,
    optimizer: Any = None,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    tolerances: dict[str, Any] | None = None,
    source: str | None = None,
    notes: Iterable[str] = (),
    settings: dict[str, Any] | None = None,
) -> Report:
    """The Report of a training run: the model rules on the model as it is now, the
    training-run rules on ``run``."""
    ctx = prepare(model, select=select, ignore=ignore, tolerances=tolerances, source=source)
    ctx.optimizer = optimizer
    ctx.run = run
    available = {"model", "buffers", "training run"}
    if optimizer is not None:
        available.add("optimizer")
    if run.distributed:
        available.add("distributed")
    else:
        for rid in _DISTRIBUTED_RULES:
            if rid in ctx.rule_ids:
                ctx.skipped[rid] = _NOT_DISTRIBUTED
    with preserved(ctx.model):
        findings = run_rules(ctx, available)
    judged: list[Finding] = []
    for rid in RUN_JUDGED:
        if rid in ctx.rule_ids:
            ctx.skipped.pop(rid, None)
            judged.extend(run_findings(ctx, rid))
    # the run's nonfinite finding (with its step) replaces the end-of-run one of the same
    # layer; the channels the end-of-run check lists are kept in its details
    run_nonfinite = {f.layer: f for f in judged if f.rule == "nonfinite-stats"}
    kept: list[Finding] = []
    for f in findings:
        if f.rule == "nonfinite-stats" and f.layer in run_nonfinite:
            run_nonfinite[f.layer].details["at_end"] = dict(f.details)
        else:
            kept.append(f)
    return Report(
        kept + judged,
        source=source,
        skipped=ctx.skipped,
        notes=list(ctx.notes) + list(notes),
        settings={
            "select": ctx.rule_ids,
            "tolerances": ctx.tolerances,
            "rules": [r for r in ctx.rule_ids if r not in ctx.skipped],
            **(settings or {}),
        },
        layers=[lyr.name for lyr in ctx.layers],
    )

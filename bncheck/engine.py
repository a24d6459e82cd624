"""The audit engine: discovery, forward-pass observations, rules, report.

Front ends (the pytest plugin, the CLI, the Monitor) call into here; no check logic lives in
them. The engine never changes the user's model: see :mod:`bncheck.state`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .checks.catalogue import info_for
from .checks.registry import get_rule, resolve_rule_ids, resolve_tolerances
from .context import AuditContext
from .discovery import find_bn_layers, unwrap_model
from .errors import BNCheckError, NoBatchNormError, UsageError
from .report import Finding, Report
from .state import preserved

__all__ = ["audit", "prepare", "run_rules", "forward_stages", "FORWARD_NEEDS", "first_line"]

#: Rule needs that are met by the audit's forward passes.
FORWARD_NEEDS = frozenset({"forward", "user batch", "data"})

_NOT_IN_AUDIT = {
    "training run": "needs a training run: watch one with bncheck.Monitor",
    "distributed": "needs a distributed training run: watch one with bncheck.Monitor",
}


def first_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: first line of its message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def forward_stages(rule_ids: Iterable[str]) -> set[str]:
    """The audit passes (``train``, ``eval``, ``data``) the given rules read, from their
    catalogue entries (``RuleInfo.stage``)."""
    return {stage for rid in rule_ids if (stage := info_for(rid).stage) is not None}


def prepare(
    model: nn.Module,
    *,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    tolerances: dict[str, Any] | None = None,
    source: str | None = None,
) -> AuditContext:
    """Validate the arguments, find the BN layers and build the context the rules read."""
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"bncheck needs a torch.nn.Module, got {type(model).__name__}; "
            "load the model first (for a file, use `bncheck audit PATH`)"
        )
    rule_ids = resolve_rule_ids(select, ignore)
    tols = resolve_tolerances(tolerances)
    inner = unwrap_model(model)
    layers = find_bn_layers(inner)
    if not layers:
        raise NoBatchNormError(
            f"{type(inner).__name__} has no BatchNorm layer, so there is nothing to check "
            "(bncheck looks for nn.BatchNorm1d/2d/3d, SyncBatchNorm, lazy BN and modules with "
            "running_mean/running_var buffers)"
        )
    return AuditContext(
        model=inner, layers=layers, tolerances=tols, rule_ids=rule_ids, source=source
    )


def run_rules(ctx: AuditContext, available: set[str]) -> list[Finding]:
    """Run every selected rule whose needs are in ``available``; record why the rest did not."""
    findings: list[Finding] = []
    for rid in ctx.rule_ids:
        rule = get_rule(rid)
        if rid in ctx.skipped:
            continue
        if rule.needs not in available:
            ctx.skipped[rid] = _NOT_IN_AUDIT.get(rule.needs, f"needs {rule.needs_description}")
            continue
        if rule.check is None:
            ctx.skipped[rid] = "not implemented in this version"
            continue
        findings.extend(rule.check(ctx))
    return findings


def audit(
    model: nn.Module,
    example_input: Any = None,
    *,
    optimizer: Any = None,
    data: Iterable[Any] | None = None,
    select: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    synthetic_input: bool = False,
    training_batch: bool | None = None,
    source: str | None = None,
    **tolerances: Any,
) -> Report:
    """Check the BatchNorm layers of ``model`` and return a :class:`~bncheck.Report`.

    Args:
        model: the model (DDP/DataParallel wrappers are looked through).
        example_input: a tensor, a tuple of positional inputs or a dict of keyword inputs.
            With it, a few forward passes check what each BN layer does; without it, only the
            rules that need no forward pass run, and the report says which were skipped.
        optimizer: enables the optimizer rules (``weight-decay-on-bn``).
        data: an iterable of batches; enables ``stat-drift``.
        select, ignore: rule ids (iterables or comma-separated strings).
        synthetic_input: the input was made up by a tool, not the batch the user trains with;
            the batch-size and input rules (needs "user batch") then do not judge it.
        training_batch: whether the example input's batch is the one the model trains with.
            ``None`` (default): it is, for the BN layers the model runs in train mode (in
            eval mode BN normalises with its running statistics, so the batch size does not
            matter there); ``True``: judge it for every BN layer that trains on batch
            statistics, whatever mode the model is in now (a checkpoint loaded in eval mode);
            ``False``: the batch-size rules do not judge it.
        source: what was audited (a file name), shown in the report.
        **tolerances: overrides of the rules' tolerances (``bncheck.rules()`` lists them).

    The model is left exactly as it was: parameters, buffers, every submodule's ``training``
    flag, ``requires_grad`` flags, and the torch/numpy/random RNG states.
    """
    ctx = prepare(model, select=select, ignore=ignore, tolerances=tolerances, source=source)
    ctx.optimizer = optimizer
    ctx.data = data
    available = {"model", "buffers"}
    if any(
        t.is_meta
        for layer in ctx.layers
        for t in (layer.running_mean, layer.weight)
        if isinstance(t, torch.Tensor)
    ):
        available.discard("buffers")
        ctx.notes.append("the model is on the meta device (structure only): no values to check")
        example_input = None
    if optimizer is not None:
        available.add("optimizer")
    ctx.example_input = example_input
    ctx.user_batch = example_input is not None and not synthetic_input
    ctx.training_batch = training_batch
    forward_error: str | None = None
    wants_forward = any(get_rule(r).needs in FORWARD_NEEDS for r in ctx.rule_ids)
    if example_input is not None and wants_forward:
        lazy = [layer.name for layer in ctx.layers if layer.lazy_uninitialized]
        reason = None
        if isinstance(ctx.model, torch.jit.ScriptModule):
            reason = (
                "TorchScript modules take no forward hooks; audit the eager model "
                "(or pass --arch with the state dict) to run the forward checks"
            )
        elif lazy:
            reason = (
                f"the model has uninitialised lazy layers ({', '.join(lazy)}); "
                "run one forward pass before auditing"
            )
        if reason is not None:
            ctx.notes.append(reason)
            for rid in ctx.rule_ids:
                if get_rule(rid).needs in FORWARD_NEEDS:
                    ctx.skipped[rid] = reason
        else:
            from . import probes

            with preserved(ctx.model):
                try:
                    ctx.forward = probes.collect(ctx, forward_stages(ctx.rule_ids))
                except BNCheckError:
                    raise
                except Exception as exc:  # the model's own forward failed
                    forward_error = first_line(exc)
            if forward_error is not None:
                reason = f"the forward pass failed ({forward_error})"
                ctx.notes.append(reason)
                for rid in ctx.rule_ids:
                    if get_rule(rid).needs in FORWARD_NEEDS and rid not in ctx.skipped:
                        ctx.skipped[rid] = reason
            else:
                # one stage failed (e.g. only the train-mode pass: eps=0): its rules were
                # skipped with the reason; the report still says the forward raised
                obs = ctx.forward
                for rid in ctx.rule_ids:
                    reason = obs.stage_errors.get(info_for(rid).stage)
                    if reason is not None and rid not in ctx.skipped:
                        ctx.skipped[rid] = reason
                partial = getattr(obs, "train_error", None) or getattr(obs, "eval_error", None)
                if partial is not None:
                    forward_error = partial
                available.add("forward")
                if ctx.user_batch:
                    available.add("user batch")
                if data is not None:
                    available.add("data")
    with preserved(ctx.model):
        findings = run_rules(ctx, available)
    return Report(
        findings,
        source=source,
        skipped=ctx.skipped,
        notes=ctx.notes,
        settings={
            "select": ctx.rule_ids,
            "tolerances": ctx.tolerances,
            "rules": [r for r in ctx.rule_ids if r not in ctx.skipped],
        },
        layers=[layer.name for layer in ctx.layers],
        forward_error=forward_error,
    )

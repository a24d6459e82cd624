"""The audit engine: discovery, forward-pass observations, rules, report.

Front ends (the pytest plugin, the CLI, the Monitor) call into here; no check logic lives in
them. The engine never changes the user's model: see :mod:`bncheck.state`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checks.catalogue import NEEDS, info_for
from .checks.registry import get_rule, resolve_rule_ids, resolve_tolerances
from .checks.training import TRAINING_RULES, RunObservations, run_findings
from .context import AuditContext, AuditFacts
from .discovery import find_bn_layers, unwrap_model
from .errors import BNCheckError, InputError, NoBatchNormError, UsageError, first_line
from .render import layer_list
from .report import Finding, Report
from .state import Snapshot, audit_lock, audit_pass, preserved

__all__ = [
    "audit",
    "run_report",
    "prepare",
    "run_rules",
    "forward_stages",
    "skip_reason",
    "AuditFacts",
    "CANNOT_GIVE",
    "FORWARD_NEEDS",
    "RUN_NEEDS",
    "run_judged",
    "first_line",
]

#: Rule needs that are met by the audit's forward passes.
FORWARD_NEEDS = frozenset({"forward", "user batch", "data"})

#: Rule needs that only a training run watched by a Monitor meets.
RUN_NEEDS = frozenset({"training run", "distributed"})

_NOT_IN_AUDIT = {
    "training run": "needs a training run: watch one with bncheck.Monitor",
    "distributed": "needs a distributed training run: watch one with bncheck.Monitor",
}

#: Skip reasons for the needs a front end cannot give (``AuditFacts.cannot_give``); ``{0}``
#: takes the front end's words (where the thing is missing, or how to give it there).
CANNOT_GIVE = {
    "optimizer": "needs the optimizer{0}: in Python, bncheck.audit(model, x, optimizer=opt)",
    "data": "needs batches of real data{0}: in Python, bncheck.audit(model, x, data=loader)",
    "user batch": "judges only the batch you train with{0}; a synthetic input is not judged",
    # a Monitor's run that was not under torch.distributed (run_report decides it)
    "distributed": "needs torch.distributed with more than one rank while the Monitor was "
    "attached{0}",
}


def skip_reason(need: str, facts: AuditFacts | None = None) -> str:
    """Why a rule with ``need`` did not run when the audit could not provide it: the one
    wording of every skip reason, from the catalogue and the front end's ``facts``."""
    facts = facts or AuditFacts()
    if facts.cannot_run is not None and need in FORWARD_NEEDS:
        return facts.cannot_run
    if facts.settings_unknown is not None and need == "model":
        return facts.settings_unknown
    if need in facts.cannot_give:
        words = facts.cannot_give[need]
        template = CANNOT_GIVE.get(need, "needs {1}{0}")
        glue = ": " if need == "user batch" else ", "
        return template.format(f"{glue}{words}" if words else "", NEEDS.get(need, need))
    return _NOT_IN_AUDIT.get(need, f"needs {NEEDS.get(need, need)}")


#: ``first_line`` moved to :mod:`bncheck.errors`; importing it from here keeps working.


def _normal_copy(model: nn.Module) -> nn.Module:
    """A copy of a model made under ``torch.inference_mode()`` whose tensors are ordinary
    (inference tensors cannot be updated in place outside inference mode)."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise UsageError(
            f"the model's tensors were created under torch.inference_mode() and bncheck could "
            f"not copy it to run its forward checks ({first_line(exc)}); re-create the model "
            "outside torch.inference_mode() (torch.no_grad() is fine) and audit that"
        ) from None


def forward_stages(rule_ids: Iterable[str]) -> set[str]:
    """The audit passes (``train``, ``eval``, ``data``) the given rules read, from their
    catalogue entries (``RuleInfo.stage``)."""
    return {stage for rid in rule_ids if (stage := info_for(rid).stage) is not None}


def prepare(
    model: nn.Module,
    *,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    tolerances: Mapping[str, Any] | None = None,
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
    """Run every selected rule whose needs are in ``available``; record why the rest did not
    (:func:`skip_reason`, with the front end's ``ctx.facts``)."""
    facts = ctx.facts
    findings: list[Finding] = []
    unknown: dict[str, str] = {}  # the model's settings are not known: listed last
    for rid in ctx.rule_ids:
        rule = get_rule(rid)
        if rid in ctx.skipped:
            continue
        if facts.settings_unknown is not None and rule.needs == "model":
            unknown[rid] = facts.settings_unknown
            continue
        if rule.needs not in available:
            ctx.skipped[rid] = skip_reason(rule.needs, facts)
            continue
        if rule.check is None:
            ctx.skipped[rid] = "not implemented in this version"
            continue
        findings.extend(rule.check(ctx))
    # what the user must change comes first: a front end that cannot run the model, or
    # cannot give what a rule needs, says so over the audit's own reason (a failed pass)
    for rid in ctx.skipped:
        need = get_rule(rid).needs
        if need in facts.cannot_give or (facts.cannot_run is not None and need in FORWARD_NEEDS):
            ctx.skipped[rid] = skip_reason(need, facts)
    ctx.skipped.update(unknown)
    return findings


def _with_facts(ctx: AuditContext, facts: AuditFacts | None) -> None:
    """Hand the front end's facts to the context; their notes come first."""
    if facts is None:
        return
    if not isinstance(facts, AuditFacts):
        raise UsageError(f"facts= must be a bncheck.context.AuditFacts, got {type(facts).__name__}")
    ctx.facts = facts
    ctx.notes.extend(facts.notes)


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
    config: Any = None,
    facts: AuditFacts | None = None,
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
        config: settings as in ``[tool.bncheck]`` (a mapping or a loaded
            :class:`bncheck.config.Config`): its ``select``/``ignore``/tolerances apply under
            the explicit arguments, and its per-layer ignores filter the report. ``audit``
            never reads a file itself: load one with :func:`bncheck.config.load`.
        facts: for front ends (the CLI): what loading found, as an
            :class:`~bncheck.context.AuditFacts` (missing BN buffers, why the model cannot run
            forward, needs the front end cannot give, notes). The engine decides with them:
            it skips and words the reasons, ``untrained-stats`` reports the missing buffers,
            and a forward failure on an input the front end made up that no model or buffer
            finding explains raises :class:`~bncheck.errors.InputError`.
        **tolerances: overrides of the rules' tolerances (``bncheck.rules()`` lists them).

    The model is left exactly as it was, whatever happens (``KeyboardInterrupt`` included):
    parameters and buffers by value, gradients, every submodule's ``training`` flag,
    ``requires_grad`` flags, the state of ``optimizer`` and of any optimizer the model holds,
    and the torch/numpy/random RNG states (see :mod:`bncheck.state`; the snapshot costs about
    the model's size in memory). Audits of one model from several threads run one at a time.

    A report whose requested checks could not run (the model's forward raised) is not
    ``complete``: ``report.ok`` is False and ``report.failed()`` is True (see
    :class:`~bncheck.Report`).
    """
    _check_optimizer(optimizer)
    if config is not None:  # [tool.bncheck] settings under the explicit arguments
        from .config import audit_kwargs

        merged = audit_kwargs(config, select=select, ignore=ignore, **tolerances)
        select, ignore = merged.pop("select", None), merged.pop("ignore", None)
        tolerances = merged
    ctx = prepare(model, select=select, ignore=ignore, tolerances=tolerances, source=source)
    _with_facts(ctx, facts)
    with audit_lock(ctx.model), audit_pass(model, ctx.model):
        optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else []
        with preserved(ctx.model, optimizers) as snapshot:
            report = _audit(
                ctx,
                snapshot,
                example_input,
                optimizer,
                data,
                synthetic_input,
                training_batch,
                source,
            )
    if config is not None:
        from .config import finish_report

        report = finish_report(report, config)
    return report


def run_judged() -> tuple[str, ...]:
    """The training-run rules whose catalogue need is not a run (``nonfinite-stats`` needs
    the buffers, ``small-batch`` the user's batch, ``stat-drift`` data): their check function
    judges something else in an audit, and a run report adds what the run showed, with the
    step (in the order the training-run rules are evaluated)."""
    return tuple(rid for rid in TRAINING_RULES if info_for(rid).needs not in RUN_NEEDS)


def run_report(
    model: nn.Module,
    run: RunObservations,
    *,
    optimizer: Any = None,
    select: str | Iterable[str] | None = None,
    ignore: str | Iterable[str] | None = None,
    tolerances: Mapping[str, Any] | None = None,
    source: str | None = None,
    facts: AuditFacts | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Report:
    """The Report of a training run, the counterpart of :func:`audit` for
    :class:`bncheck.Monitor`: the rules that need the model, its buffers or the optimizer
    judge the model as it is now, the training-run rules judge ``run`` (the
    :class:`~bncheck.checks.training.RunObservations` a Monitor gathered, a fact like any
    other). The engine decides which rules run and words every skip reason
    (:func:`skip_reason`): the forward-pass rules are skipped (a run has no example input),
    the distributed rules when ``run`` was not under ``torch.distributed`` with more than one
    rank (:data:`CANNOT_GIVE`). The rules of :func:`run_judged` are never skipped: their
    findings come from the run and carry the step; a run's ``nonfinite-stats`` finding
    replaces the end-of-run one of its layer, which is kept in ``details["at_end"]``.

    ``facts``: the front end's :class:`~bncheck.context.AuditFacts` (its notes come first);
    ``settings``: extra entries of ``Report.settings`` (the Monitor's step count). The model
    is left as it was. Never runs the model.
    """
    if not isinstance(run, RunObservations):
        raise UsageError(
            f"run_report needs a bncheck.checks.training.RunObservations, got {type(run).__name__}"
        )
    ctx = prepare(model, select=select, ignore=ignore, tolerances=tolerances, source=source)
    _with_facts(ctx, facts)
    ctx.optimizer = optimizer
    ctx.run = run
    available = {"model", "buffers", "training run"}
    if optimizer is not None:
        available.add("optimizer")
    if run.distributed:
        available.add("distributed")
    elif "distributed" not in ctx.facts.cannot_give:
        ctx.facts = dataclasses.replace(
            ctx.facts, cannot_give={**ctx.facts.cannot_give, "distributed": ""}
        )
    # what the run cannot give is listed first
    for rid in ctx.rule_ids:
        need = get_rule(rid).needs
        if need not in available and need in ctx.facts.cannot_give:
            ctx.skipped[rid] = skip_reason(need, ctx.facts)
    with preserved(ctx.model):
        findings = run_rules(ctx, available)
    judged: list[Finding] = []
    for rid in run_judged():
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
    # layers on the meta device were not watched (the Monitor leaves them out): as in audit()
    on_meta = [layer.name for layer in ctx.layers if layer.on_meta]
    incomplete = [_meta_layers(on_meta)] if on_meta else []
    ctx.notes.extend(incomplete)
    return _report(ctx, kept + judged, source, settings=settings, incomplete=incomplete)


def _check_optimizer(optimizer: Any) -> None:
    if optimizer is None or isinstance(optimizer, torch.optim.Optimizer):
        return
    groups = getattr(optimizer, "param_groups", None)
    if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
        return  # optimizer-like (param_groups of dicts), e.g. a wrapper
    shown = (
        repr(optimizer) if isinstance(optimizer, (str, int, float)) else type(optimizer).__name__
    )
    raise UsageError(
        f"optimizer= must be a torch.optim.Optimizer (or have its param_groups), got {shown}; "
        "pass the optimizer object, e.g. optimizer=torch.optim.SGD(model.parameters(), lr=0.1)"
    )


def _inference_tensors(model: nn.Module, snapshot: Snapshot | None = None) -> bool:
    """Whether the model holds tensors created under ``torch.inference_mode()`` (read from
    ``snapshot``'s lists when given: no second walk of the module tree)."""
    if snapshot is not None:
        tensors: Iterable[Any] = (
            slot[2] for slot in (*snapshot.model.parameters, *snapshot.model.buffers)
        )
    else:
        tensors = (*model.parameters(), *model.buffers())
    return any(t.is_inference() for t in tensors if isinstance(t, torch.Tensor) and not t.is_meta)


def _uninitialised_lazy(model: nn.Module) -> list[str]:
    """Names of the uninitialised lazy modules (``LazyConv2d``, ``LazyBatchNorm2d``, ...)."""
    from torch.nn.modules.lazy import LazyModuleMixin

    return [
        name or "(model)"
        for name, m in model.named_modules()
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()  # type: ignore[misc]
    ]


def _meta_layers(names: Sequence[str]) -> str:
    """Why a report that has BN layers on the meta device beside real tensors is
    incomplete."""
    return (
        f"{len(names)} BN layer(s) hold tensors on the meta device (structure only: a "
        "template torch.func.functional_call runs with other weights, or weights not "
        f"loaded yet): {layer_list(names, 3)}; their statistics and gamma/beta were not checked"
    )


def _audit(
    ctx: AuditContext,
    snapshot: Snapshot,
    example_input: Any,
    optimizer: Any,
    data: Iterable[Any] | None,
    synthetic_input: bool,
    training_batch: bool | None,
    source: str | None,
) -> Report:
    ctx.optimizer = optimizer
    ctx.data = data
    inner = ctx.model
    if ctx.facts.cannot_run is not None:
        example_input = None  # the forward rules are skipped with the front end's reason
    available = {"model", "buffers"}
    incomplete: list[str] = []
    on_meta = [layer.name for layer in ctx.layers if layer.on_meta]
    # the model is on the meta device when its parameters are (all its tensors, without
    # any): accelerate's init_empty_weights leaves the buffers real. A model whose real
    # weights run a meta template (torch.func's ensembling recipe) is not
    weights: list[torch.Tensor] = [*inner.parameters()] or [*inner.buffers()]
    if (weights and all(t.is_meta for t in weights)) or (on_meta and not weights):
        available.discard("buffers")
        meta = (
            "the model is on the meta device (structure only): its statistics and forward "
            "could not be checked; load its weights (e.g. load_state_dict(..., assign=True))"
        )
        ctx.notes.append(meta)
        incomplete.append(meta)
        example_input = None
    elif on_meta:
        # some layers only: a structure-only template the forward runs with other tensors
        # (torch.func.functional_call over stack_module_state's weights), or weights not
        # loaded yet; the buffer rules judge the other layers (checks.static._usable)
        meta = _meta_layers(on_meta)
        ctx.notes.append(meta)
        incomplete.append(meta)
    if optimizer is not None:
        available.add("optimizer")
    ctx.example_input = example_input
    ctx.user_batch = example_input is not None and not synthetic_input
    ctx.training_batch = training_batch
    forward_error: str | None = None
    wants_forward = any(get_rule(r).needs in FORWARD_NEEDS for r in ctx.rule_ids)
    if example_input is not None and wants_forward:
        lazy = _uninitialised_lazy(ctx.model)
        reason = None
        if isinstance(ctx.model, torch.jit.ScriptModule):
            reason = (
                "TorchScript modules take no forward hooks; audit the eager model "
                "(or pass --arch with the state dict) to run the forward checks"
            )
        elif lazy:
            reason = (
                f"the model has uninitialised lazy layers ({', '.join(lazy[:5])}"
                f"{f' and {len(lazy) - 5} more' if len(lazy) > 5 else ''}); "
                "run one forward pass before auditing (the audit does not materialise them)"
            )
        if reason is not None:
            ctx.notes.append(reason)
            for rid in ctx.rule_ids:
                if get_rule(rid).needs in FORWARD_NEEDS:
                    ctx.skipped[rid] = reason
        else:
            from . import probes

            layers = ctx.layers
            if _inference_tensors(ctx.model, snapshot):
                # inference tensors cannot be updated in place outside inference mode: run
                # the forward passes on an ordinary copy (same structure, same names)
                ctx.model = _normal_copy(ctx.model)
                ctx.layers = find_bn_layers(ctx.model)
                ctx.notes.append(
                    "the model's tensors were created under torch.inference_mode(): the "
                    "forward checks ran on a copy of it"
                )
            # the rules read the model as it was: restore after the passes (the copy's own
            # snapshot when the passes ran on a copy)
            copied = ctx.model is not inner
            try:
                with preserved(ctx.model) if copied else contextlib.nullcontext(snapshot) as snap:
                    ctx.reset = functools.partial(snap.restore, parameters=False)
                    ctx.forward = probes.collect(ctx, forward_stages(ctx.rule_ids))
            except BNCheckError:
                raise
            except Exception as exc:  # the model's own forward failed
                forward_error = first_line(exc)
            except (SystemExit, GeneratorExit) as exc:  # a forward that tries to end the run
                code = getattr(exc, "code", None)
                forward_error = f"the model's forward raised {type(exc).__name__}" + (
                    f" ({code!r})" if code is not None else ""
                )
            finally:
                ctx.reset = None
                # for good: from here on the audit only reads the model (its rules)
                snapshot.restore(final=True)
                ctx.model, ctx.layers = inner, layers  # the rules judge the user's model
            if forward_error is not None and on_meta:
                forward_error += (
                    f"; {len(on_meta)} BN layer(s) hold tensors on the meta device: load "
                    "their weights (e.g. load_state_dict(..., assign=True))"
                )
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
                data_error = obs.stage_errors.get("data")
                if data_error is not None and any(
                    info_for(rid).stage == "data" for rid in ctx.rule_ids
                ):
                    # data= was given for rules that read it, and they could not run
                    incomplete.append(f"{data_error}, so the rules that read data= did not run")
                partial = getattr(obs, "train_error", None) or getattr(obs, "eval_error", None)
                if partial is not None:
                    forward_error = partial
                elif obs.unread:
                    # calls inside torch.func.vmap, or with meta tensors: what they normalise
                    # with was not read, whatever the other calls showed
                    names = sorted(obs.unread)
                    incomplete.append(
                        f"{len(names)} BN layer(s) ran inside torch.func.vmap or with tensors "
                        f"on the meta device ({layer_list(names, 3)}), where the forward rules "
                        "cannot read their calls"
                    )
                elif obs.train_ran and not obs.calls:
                    # the forward returned, but through no BN layer (it caught its own error,
                    # or took a path around them): nothing the forward rules read was observed
                    incomplete.append(
                        "the train-mode forward pass ran through no BN layer (the forward "
                        "caught an error or took a path around them), so the forward rules "
                        "observed nothing"
                    )
                elif obs.train_ran:
                    missed = [lyr.name for lyr in ctx.layers if lyr.name not in obs.call_counts]
                    if missed:
                        shown = ", ".join(missed[:5]) + (
                            f" and {len(missed) - 5} more" if len(missed) > 5 else ""
                        )
                        ctx.notes.append(
                            f"{len(missed)} BN layer(s) were not called by the forward pass "
                            f"({shown}): the forward rules did not observe them"
                        )
                available.add("forward")
                if ctx.user_batch:
                    available.add("user batch")
                if data is not None:
                    available.add("data")
    findings = run_rules(ctx, available)
    if forward_error is not None and ctx.facts.bad_input_hint is not None:
        _raise_if_input_fault(ctx, findings, inner, example_input, source)
    return _report(ctx, findings, source, forward_error=forward_error, incomplete=incomplete)


def _report(
    ctx: AuditContext,
    findings: list[Finding],
    source: str | None,
    *,
    forward_error: str | None = None,
    settings: Mapping[str, Any] | None = None,
    incomplete: Sequence[str] = (),
) -> Report:
    """The Report of an audit or a run: findings, skip reasons and notes from ``ctx``."""
    return Report(
        findings,
        source=source,
        skipped=ctx.skipped,
        notes=ctx.notes,
        settings={
            "select": ctx.rule_ids,
            "tolerances": ctx.tolerances,
            "rules": [r for r in ctx.rule_ids if r not in ctx.skipped],
            **(settings or {}),
        },
        layers=[layer.name for layer in ctx.layers],
        forward_error=forward_error,
        incomplete=incomplete,
    )


def _raise_if_input_fault(
    ctx: AuditContext, findings: list[Finding], model: nn.Module, x: Any, source: str | None
) -> None:
    """The front end made the input up and the forward failed: unless a model or buffer
    error explains the failure, run the model once more, unhooked and in its own modes, and
    when that fails too the input's shape is at fault (an :class:`InputError`)."""
    if x is None or any(
        f.severity.value == "error" and info_for(f.rule).needs in ("model", "buffers")
        for f in findings
    ):
        return
    own = _own_forward_error(model, x)
    if own is None:  # only bncheck's passes failed: the report says so (incomplete)
        return
    shape = getattr(x, "shape", None)
    on = (
        "an input of shape (" + ", ".join(str(s) for s in shape) + ")"
        if shape is not None
        else "the given input"
    )
    where = f"{source}: " if source else ""
    raise InputError(
        f"{where}the model's forward failed on {on}: {own}; {ctx.facts.bad_input_hint}"
    )


def _own_forward_error(model: nn.Module, x: Any) -> str | None:
    """Run ``model`` once on ``x`` as the user would (no hooks; restored after)."""
    grad_mode = torch.inference_mode() if _inference_tensors(model) else torch.no_grad()
    try:
        with preserved(model), grad_mode:
            if isinstance(x, dict):
                model(**x)
            elif isinstance(x, tuple):
                model(*x)
            else:
                model(x)
    except BNCheckError:
        raise
    except Exception as exc:
        return first_line(exc)
    return None

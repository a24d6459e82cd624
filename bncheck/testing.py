"""Assertions for test suites, usable with or without the pytest plugin.

Every assertion is :func:`bncheck.audit` restricted to the rules it is about. On failure it
raises :class:`BNCheckFailure` (an ``AssertionError``) whose text is the findings table:
severity, rule, layer and the message with observed vs expected and the tolerance used.

``assert_bn_ok`` runs every rule the given inputs allow and fails on findings at or above
``fail_on``. The per-invariant assertions (``assert_normalizes``, ``assert_ema_updates``, ...)
fail on *any* finding of their rules, whatever its default severity, because the caller asked
for exactly that property. If a rule an assertion needs could not run (no input given, the
forward pass failed, lazy layers not initialised), the assertion fails with the reason: it
never passes without having checked.

These functions use only their arguments: the plugin's options and the
``@pytest.mark.bncheck`` marker apply to the ``bncheck`` fixture, not to them, so they behave
the same inside and outside pytest.

This module imports neither torch nor hypothesis until a function is called (the pytest
plugin imports it in every session). :func:`check_conformance` lives in
:mod:`bncheck.conformance` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from .errors import BNCheckFailure, ConformanceFailure
from .render import findings_table, visible
from .report import FAIL_ON_CHOICES, Report, Severity

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from .conformance import check_conformance

__all__ = [
    "BNCheckFailure",
    "ConformanceFailure",
    "assert_bn_ok",
    "assert_rules_ok",
    "assert_normalizes",
    "assert_ema_updates",
    "assert_eval_deterministic",
    "assert_eval_batch_independent",
    "assert_eval_keeps_stats",
    "assert_bn_before_activation",
    "assert_no_bias_before_bn",
    "assert_no_dropout_before_bn",
    "assert_no_reused_bn",
    "assert_no_small_batch",
    "assert_input_normalized",
    "assert_pytorch_momentum",
    "assert_valid_eps",
    "assert_finite_stats",
    "assert_trained_stats",
    "assert_no_weight_decay_on_bn",
    "assert_no_stat_drift",
    "check_conformance",
    "failure_text",
]

#: Called with every report an assertion produced; the pytest plugin sets it for the duration
#: of a test so the terminal summary can list the findings. ``None`` outside the plugin.
report_recorder: ContextVar[Callable[[Report], None] | None] = ContextVar(
    "bncheck_report_recorder", default=None
)

_TABLE_WIDTH = 90


def _record(report: Report) -> None:
    recorder = report_recorder.get()
    if recorder is not None:
        recorder(report)


def _validate_fail_on(fail_on: str | Severity) -> str:
    from .errors import UsageError, did_you_mean

    value = fail_on.value if isinstance(fail_on, Severity) else fail_on
    if value not in FAIL_ON_CHOICES:
        raise UsageError(
            f"fail_on must be one of {', '.join(FAIL_ON_CHOICES)}, got {fail_on!r}"
            f"{did_you_mean(str(fail_on), FAIL_ON_CHOICES)}"
        )
    return str(value)


def failure_text(
    report: Report, fail_on: str = "error", *, title: str = "bncheck", command_line: bool = False
) -> str:
    """The text of a failed check: what failed, the findings table (one row per rule and
    cause), how to silence a rule (as keyword arguments, or as pytest options when
    ``command_line``). A report that is not complete says first which checks did not run.
    Names and messages are shown with control characters made visible."""
    failing = [f for f in report.findings if fail_on != "never" and f.severity >= Severity(fail_on)]
    others = len(report.findings) - len(failing)
    where = f" in {visible(report.source)}" if report.source else ""
    lines: list[str] = []
    for reason in report.incomplete:
        lines.append(f"{title}: incomplete{where}: {visible(reason)}")
    if report.forward_error is not None:
        what = "--bncheck-input-shape" if command_line else "the example input's shape and dtype"
        lines.append(f"check {what}")
    if failing or not lines:
        if lines:
            lines.append("")
        count = f"{len(failing)} finding{'s' if len(failing) != 1 else ''}"
        lines.extend([f"{title}: {count} at or above fail_on={fail_on!r}{where}", ""])
        lines.append(findings_table(failing, max_width=_TABLE_WIDTH))
    if others:
        lines.append(f"(+{others} finding{'s' if others != 1 else ''} below fail_on)")
    lines.extend(f"note: {visible(n)}" for n in report.notes)
    rules = sorted({f.rule for f in failing})
    if not rules:
        return "\n".join(lines)
    lines.append("")
    how = (
        f"--bncheck-ignore {','.join(rules)} or a looser --bncheck-tolerance NAME=VALUE"
        if command_line
        else f"ignore=[{', '.join(repr(r) for r in rules)}] or a looser tolerance"
    )
    lines.append(f"`bncheck explain RULE` says why each matters; to accept a finding, pass {how}")
    return "\n".join(lines)


def assert_bn_ok(
    model: nn.Module,
    example_input: Any = None,
    *,
    fail_on: str | Severity = "error",
    optimizer: Any = None,
    data: Iterable[Any] | None = None,
    select: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    **tolerances: Any,
) -> Report:
    """Audit ``model`` and fail on any finding at or above ``fail_on``; return the report.

    Rules that cannot run with the given arguments (no input, no optimizer) are skipped, as in
    :func:`bncheck.audit`; a report that is not complete (the model's forward pass raised)
    fails the assertion.
    """
    __tracebackhide__ = True
    from .engine import audit

    threshold = _validate_fail_on(fail_on)
    report = audit(
        model,
        example_input,
        optimizer=optimizer,
        data=data,
        select=select,
        ignore=ignore,
        **tolerances,
    )
    _record(report)
    if report.failed(threshold) or not report.complete:
        raise BNCheckFailure(failure_text(report, threshold, title="assert_bn_ok"), report)
    return report


def assert_rules_ok(
    model: nn.Module,
    example_input: Any,
    rules: str | Sequence[str],
    *,
    optimizer: Any = None,
    data: Iterable[Any] | None = None,
    title: str = "assert_rules_ok",
    **tolerances: Any,
) -> Report:
    """Fail on any finding of ``rules`` (whatever its severity), or if one of them was skipped.

    The building block of the per-invariant assertions; use it for a set of rules of your own.
    """
    __tracebackhide__ = True
    from .checks.registry import resolve_rule_ids
    from .engine import audit

    rule_ids = resolve_rule_ids(select=rules)
    report = audit(
        model, example_input, optimizer=optimizer, data=data, select=rule_ids, **tolerances
    )
    _record(report)
    if report.findings:
        raise BNCheckFailure(failure_text(report, "info", title=title), report)
    not_run = {rid: report.skipped[rid] for rid in rule_ids if rid in report.skipped}
    if not_run:
        reasons = "; ".join(f"{rid!r}: {visible(reason)}" for rid, reason in not_run.items())
        raise BNCheckFailure(f"{title} could not check {reasons}", report)
    return report


def assert_normalizes(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """In train mode every BN layer's pre-affine output is zero-mean / unit-variance per channel
    (rule ``normalization``; the biased batch variance is the one PyTorch normalises with)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("normalization",), title="assert_normalizes", **tolerances
    )


def assert_ema_updates(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """One train-mode forward moves running_mean / running_var / num_batches_tracked exactly as
    PyTorch's momentum update does (rule ``ema-update``: ``new = (1 - m) * old + m * batch``
    with the unbiased batch variance, ``m = 1 / num_batches_tracked`` when momentum is None)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("ema-update",), title="assert_ema_updates", **tolerances
    )


def assert_eval_deterministic(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """Two identical eval-mode forwards give identical outputs (rule ``eval-nondeterminism``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("eval-nondeterminism",),
        title="assert_eval_deterministic",
        **tolerances,
    )


def assert_eval_batch_independent(
    model: nn.Module, example_input: Any, **tolerances: Any
) -> Report:
    """In eval mode a sample's output does not depend on the rest of its batch
    (rule ``eval-batch-dependence``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("eval-batch-dependence",),
        title="assert_eval_batch_independent",
        **tolerances,
    )


def assert_eval_keeps_stats(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """An eval-mode forward leaves the running statistics alone (rule ``eval-updates-stats``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("eval-updates-stats",), title="assert_eval_keeps_stats", **tolerances
    )


def assert_bn_before_activation(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """No BN layer takes its input straight from an activation (rule ``bn-after-activation``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("bn-after-activation",),
        title="assert_bn_before_activation",
        **tolerances,
    )


def assert_no_bias_before_bn(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """No conv/linear bias feeds a BN layer directly (rule ``bias-before-bn``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("bias-before-bn",), title="assert_no_bias_before_bn", **tolerances
    )


def assert_no_dropout_before_bn(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """No dropout feeds a BN layer (rule ``dropout-before-bn``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("dropout-before-bn",),
        title="assert_no_dropout_before_bn",
        **tolerances,
    )


def assert_no_reused_bn(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """Each BN module is called at one place per forward (rule ``bn-reused``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("bn-reused",), title="assert_no_reused_bn", **tolerances
    )


def assert_no_small_batch(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """``example_input`` (the batch you train with) gives every BN layer enough values per
    channel (rules ``small-batch`` and ``single-value-per-channel``; tolerances
    ``min_batch_size``, ``min_samples_per_channel``). The batch is judged as a training
    batch whatever mode the model is in (``audit(..., training_batch=True)``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("small-batch", "single-value-per-channel"),
        title="assert_no_small_batch",
        **{"training_batch": True, **tolerances},
    )


def assert_input_normalized(model: nn.Module, example_input: Any, **tolerances: Any) -> Report:
    """The batch you train with looks normalised (rule ``input-not-normalized``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("input-not-normalized",),
        title="assert_input_normalized",
        **tolerances,
    )


def assert_pytorch_momentum(
    model: nn.Module, example_input: Any = None, **tolerances: Any
) -> Report:
    """No BN momentum looks like a Keras/TF value (rule ``keras-momentum``). Needs no input."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("keras-momentum",), title="assert_pytorch_momentum", **tolerances
    )


def assert_valid_eps(model: nn.Module, example_input: Any = None, **tolerances: Any) -> Report:
    """Every BN eps is finite and > 0 (rule ``invalid-eps``). Needs no input."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("invalid-eps",), title="assert_valid_eps", **tolerances
    )


def assert_finite_stats(model: nn.Module, example_input: Any = None, **tolerances: Any) -> Report:
    """Running statistics and gamma/beta are finite and running_var >= 0 (rules
    ``nonfinite-stats``, ``negative-running-var``). Needs no input."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        example_input,
        ("nonfinite-stats", "negative-running-var"),
        title="assert_finite_stats",
        **tolerances,
    )


def assert_trained_stats(model: nn.Module, example_input: Any = None, **tolerances: Any) -> Report:
    """A model in eval mode does not carry initial running statistics (rule
    ``untrained-stats``). Needs no input."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("untrained-stats",), title="assert_trained_stats", **tolerances
    )


def assert_no_weight_decay_on_bn(model: nn.Module, optimizer: Any, **tolerances: Any) -> Report:
    """No BN gamma/beta sits in a param group with weight decay (rule ``weight-decay-on-bn``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model,
        None,
        ("weight-decay-on-bn",),
        optimizer=optimizer,
        title="assert_no_weight_decay_on_bn",
        **tolerances,
    )


def assert_no_stat_drift(
    model: nn.Module, example_input: Any, data: Iterable[Any], **tolerances: Any
) -> Report:
    """Running statistics match the statistics of ``data`` (rule ``stat-drift``)."""
    __tracebackhide__ = True
    return assert_rules_ok(
        model, example_input, ("stat-drift",), data=data, title="assert_no_stat_drift", **tolerances
    )


def __getattr__(name: str) -> Any:
    if name == "check_conformance":
        from . import conformance

        value = getattr(conformance, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bncheck.testing' has no attribute {name!r}")

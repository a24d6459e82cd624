"""What the engine collects for the rules: the model, its BN layers, inputs, observations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .checks.catalogue import info_for
from .discovery import BNLayer
from .report import Finding, Severity

__all__ = ["AuditContext", "AuditFacts", "format_message"]


def format_message(layer: BNLayer | str | None, text: str, hint: str | None = None) -> str:
    """The one message format: ``where: what is wrong (observed vs expected) - hint``."""
    if isinstance(layer, BNLayer):
        where = f"{layer.label}: "
    elif layer:
        where = f"{layer}: "
    else:
        where = ""
    return f"{where}{text}" + (f" - {hint}" if hint else "")


@dataclass(frozen=True)
class AuditFacts:
    """What a front end (the CLI, a loader) knows about the model before the audit, passed to
    :func:`bncheck.engine.audit` as ``facts=``. Facts only: the engine decides which rules run,
    words every skip reason and assembles the report; the rules turn facts into findings.

    ``missing_buffers``: BN layer name -> the running-statistics buffers the checkpoint did not
    hold (the layer now has the initial values); ``untrained-stats`` reports them.

    ``cannot_run``: why the model cannot run forward (a TorchScript archive, a state dict
    without its architecture); the rules that need a forward pass are skipped with it.

    ``settings_unknown``: why the model's settings cannot be judged (a state dict stores no
    eps or momentum); the rules that need "model" are skipped with it.

    ``cannot_give``: needs (catalogue ``needs``) this front end cannot give, each with the
    front end's own words for where it is missing or how to give it there (``""`` for none);
    the engine words the skip reason (:data:`bncheck.engine.CANNOT_GIVE`).

    ``notes``: notes from loading and input selection, shown before the engine's own.

    ``bad_input_hint``: set when the front end made the example input up (its shape is a
    guess): a forward failure that no model or buffer finding explains is then the input's
    fault, raised as :class:`~bncheck.errors.InputError` ending with this hint.
    """

    missing_buffers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cannot_run: str | None = None
    settings_unknown: str | None = None
    cannot_give: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    bad_input_hint: str | None = None


@dataclass
class AuditContext:
    """Everything a check function may read. Check functions never run the model themselves.

    ``forward`` holds the observations of the audit's forward passes
    (:mod:`bncheck.probes`), ``None`` when no forward pass ran. ``run`` holds what
    :class:`bncheck.Monitor` observed during training, ``None`` in an audit.
    """

    model: nn.Module
    layers: list[BNLayer]
    tolerances: dict[str, float | int]
    rule_ids: list[str]
    optimizer: Any = None
    example_input: Any = None
    user_batch: bool = False
    #: audit(training_batch=): None = judge batch sizes where the user's model trains
    training_batch: bool | None = None
    data: Iterable[Any] | None = None
    forward: Any = None
    run: Any = None
    source: str | None = None
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    #: what the front end found before the audit (missing buffers, ...)
    facts: AuditFacts = field(default_factory=AuditFacts)
    #: set by the engine while the forward passes run: puts the model (all but the values of
    #: its parameters) and the RNG states back as the user left them, between two stages
    reset: Callable[[], None] | None = None

    def tol(self, name: str) -> float:
        return float(self.tolerances[name])

    def layer(self, name: str) -> BNLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def finding(
        self,
        rule_id: str,
        layer: BNLayer | str | None,
        text: str,
        *,
        hint: str | None = None,
        severity: Severity | str | None = None,
        severity_cause: str | None = None,
        **details: Any,
    ) -> Finding:
        """Build a finding of ``rule_id`` in the one message format, at ``severity`` or else
        the catalogue's severity for ``severity_cause`` (``RuleInfo.severity_for``; a
        ``cause=`` keyword stays a detail, which groups findings and keys baselines)."""
        sev = Severity(
            severity if severity is not None else info_for(rule_id).severity_for(severity_cause)
        )
        name = layer.name if isinstance(layer, BNLayer) else layer
        return Finding(rule_id, sev, name, format_message(layer, text, hint), dict(details))

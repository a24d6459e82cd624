"""What the engine collects for the rules: the model, its BN layers, inputs, observations."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .checks.catalogue import info_for
from .discovery import BNLayer
from .report import Finding, Severity

__all__ = ["AuditContext", "format_message"]


def format_message(layer: BNLayer | str | None, text: str, hint: str | None = None) -> str:
    """The one message format: ``where: what is wrong (observed vs expected) - hint``."""
    if isinstance(layer, BNLayer):
        where = f"{layer.label}: "
    elif layer:
        where = f"{layer}: "
    else:
        where = ""
    return f"{where}{text}" + (f" - {hint}" if hint else "")


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
        **details: Any,
    ) -> Finding:
        """Build a finding of ``rule_id`` in the one message format."""
        sev = Severity(severity) if severity is not None else Severity(info_for(rule_id).severity)
        name = layer.name if isinstance(layer, BNLayer) else layer
        return Finding(rule_id, sev, name, format_message(layer, text, hint), dict(details))

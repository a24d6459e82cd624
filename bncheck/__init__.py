"""bncheck: find what is wrong with the Batch Normalization in a PyTorch model.

``import bncheck`` is cheap: torch is imported only when something that needs it is used
(``bncheck.audit``, ``bncheck.Monitor``, ``bncheck.recalibrate``, ``bncheck.models``, ...).
The pytest plugin relies on this, since pytest loads it in every test session of the
environment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BNCheckError,
    BNCheckWarning,
    InputError,
    LoadError,
    NoBatchNormError,
    UsageError,
)
from .report import Finding, Report, Severity

if TYPE_CHECKING:  # pragma: no cover
    from . import models, strategies, testing
    from .checks.registry import Rule
    from .discovery import BNLayer, find_bn_layers
    from .engine import audit
    from .monitor import Monitor
    from .recalibration import Recalibration, recalibrate

__all__ = [
    "__version__",
    "audit",
    "Report",
    "Finding",
    "Severity",
    "Monitor",
    "recalibrate",
    "Recalibration",
    "rules",
    "explain",
    "find_bn_layers",
    "BNLayer",
    "models",
    "testing",
    "strategies",
    "BNCheckError",
    "BNCheckWarning",
    "InputError",
    "LoadError",
    "NoBatchNormError",
    "UsageError",
]

_LAZY = {
    "audit": ("engine", "audit"),
    "Monitor": ("monitor", "Monitor"),
    "recalibrate": ("recalibration", "recalibrate"),
    "Recalibration": ("recalibration", "Recalibration"),
    "find_bn_layers": ("discovery", "find_bn_layers"),
    "BNLayer": ("discovery", "BNLayer"),
    "models": ("models", None),
    "testing": ("testing", None),
    "strategies": ("strategies", None),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bncheck' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def rules() -> list[Rule]:
    """The rule registry: every rule with its id, default severity, needs, summary, tolerances."""
    from .checks.registry import rules as _rules

    return _rules()


def explain(rule_id: str) -> str:
    """The long explanation of one rule (the text of ``docs/rules/<id>.md``)."""
    from .checks.registry import explanation

    return explanation(rule_id)

"""The rule registry: catalogue metadata joined with the check functions.

A check function takes the :class:`bncheck.context.AuditContext` the engine collected and
yields :class:`bncheck.report.Finding` objects. It never runs forward passes of its own.
Register one with::

    @check("ema-update")
    def ema_update(ctx):
        ...
        yield ctx.finding("ema-update", layer, "running_var did not follow ...", hint="...")

Adding a rule means one catalogue entry (``catalogue.py``), one check function in the module
for what it needs, and one page ``docs/rules/<id>.md``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, did_you_mean
from ..options import split_ids
from ..report import Severity
from .catalogue import CATALOGUE, NEEDS, TOLERANCES, RuleInfo, Tolerance

if TYPE_CHECKING:  # pragma: no cover
    from ..context import AuditContext
    from ..report import Finding

__all__ = [
    "Rule",
    "check",
    "rules",
    "get_rule",
    "resolve_rule_ids",
    "resolve_tolerances",
    "explanation",
    "load_checks",
]

CheckFn = Callable[["AuditContext"], Iterable["Finding"]]

_CHECKS: dict[str, CheckFn] = {}
_CHECK_MODULES = ("static", "forward", "training")
_INFO = {info.id: info for info in CATALOGUE}


@dataclass(frozen=True)
class Rule:
    """A rule: stable id, default severity, what it needs, a summary, its tolerances."""

    id: str
    severity: Severity
    needs: str
    summary: str
    tolerances: tuple[Tolerance, ...]
    check: CheckFn | None

    @property
    def explanation(self) -> str:
        """The long explanation (the text of ``docs/rules/<id>.md``)."""
        return explanation(self.id)

    @property
    def needs_description(self) -> str:
        return NEEDS[self.needs]


def check(rule_id: str) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn`` as the check function of ``rule_id`` (which must be in the catalogue)."""
    if rule_id not in _INFO:
        raise KeyError(f"rule {rule_id!r} is not in the catalogue (bncheck/checks/catalogue.py)")

    def decorate(fn: CheckFn) -> CheckFn:
        _CHECKS[rule_id] = fn
        return fn

    return decorate


def load_checks() -> None:
    """Import the modules that register check functions (they import torch)."""
    for name in _CHECK_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def _rule(info: RuleInfo) -> Rule:
    return Rule(
        info.id,
        Severity(info.severity),
        info.needs,
        info.summary,
        info.tolerances,
        _CHECKS.get(info.id),
    )


def rules() -> list[Rule]:
    """Every rule of the catalogue, in catalogue order, with its check function."""
    load_checks()
    return [_rule(info) for info in CATALOGUE]


def get_rule(rule_id: str) -> Rule:
    """The rule with this id; an unknown id raises :class:`UsageError` with a suggestion."""
    if rule_id not in _INFO:
        raise UsageError(
            f"unknown rule id {rule_id!r}{did_you_mean(rule_id, _INFO)}; "
            "run `bncheck rules` for the list"
        )
    load_checks()
    return _rule(_INFO[rule_id])


def _split_ids(ids: str | Iterable[str] | None) -> list[str] | None:
    """``None`` (no choice made) or the rule ids, split as every front end splits them."""
    return None if ids is None else split_ids(ids)


def resolve_rule_ids(
    select: str | Iterable[str] | None = None, ignore: str | Iterable[str] | None = None
) -> list[str]:
    """The rule ids to run, in catalogue order.

    ``select`` and ``ignore`` take rule ids, as an iterable or one comma-separated string.
    ``"all"`` selects every rule. An unknown id raises :class:`UsageError` naming the closest id.
    """
    selected = _split_ids(select)
    ignored = _split_ids(ignore) or []
    if selected is not None and not selected:
        raise UsageError(
            "select names no rule, so nothing would be checked; name rule ids, 'all', or "
            "leave select out for every rule"
        )
    if "all" in ignored:
        raise UsageError(
            "ignore='all' would check nothing; to skip bncheck, leave it out (pytest: "
            "-p no:bncheck)"
        )
    for rid in (selected or []) + ignored:
        if rid != "all" and rid not in _INFO:
            raise UsageError(
                f"unknown rule id {rid!r}{did_you_mean(rid, _INFO)}; "
                "run `bncheck rules` for the list"
            )
    wanted = set(_INFO) if selected is None or "all" in selected else set(selected)
    wanted -= set(ignored)
    if not wanted:
        raise UsageError(
            f"every selected rule is also ignored ({', '.join(sorted(set(ignored)))}), so "
            "nothing would be checked"
        )
    return [info.id for info in CATALOGUE if info.id in wanted]


def resolve_tolerances(overrides: Mapping[str, Any] | None = None) -> dict[str, float | int]:
    """Every tolerance with its default, updated by ``overrides`` (validated by name and type)."""
    values: dict[str, float | int] = {name: t.default for name, (_, t) in TOLERANCES.items()}
    for name, value in (overrides or {}).items():
        if name not in TOLERANCES:
            raise UsageError(
                f"unknown tolerance {name!r}{did_you_mean(name, TOLERANCES)}; "
                f"known tolerances: {', '.join(sorted(TOLERANCES))}"
            )
        default = TOLERANCES[name][1].default
        if isinstance(value, bool):
            raise UsageError(f"tolerance {name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"tolerance {name!r} must be a number, got {value!r}") from None
        if not number == number or number < 0:
            raise UsageError(f"tolerance {name!r} must be a number >= 0, got {value!r}")
        values[name] = int(number) if isinstance(default, int) and number.is_integer() else number
    return values


def _doc_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent.parent
    return [here / "_rule_docs", here.parent / "docs" / "rules"]


def explanation(rule_id: str) -> str:
    """The long explanation of a rule: the text of ``docs/rules/<id>.md`` (one source)."""
    if rule_id not in _INFO:
        raise UsageError(
            f"unknown rule id {rule_id!r}{did_you_mean(rule_id, _INFO)}; "
            "run `bncheck rules` for the list"
        )
    for folder in _doc_dirs():
        page = folder / f"{rule_id}.md"
        if page.is_file():
            return page.read_text(encoding="utf-8")
    info = _INFO[rule_id]
    return f"# {rule_id}\n\n{info.summary}\n"

"""Findings and reports: what bncheck found, and every way to show it.

``Finding`` and ``Report`` import nothing heavy (pandas and tabulate are loaded when a
rendering needs them), so the pytest plugin can handle reports without importing torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .render import findings_table, markdown_findings_table, markdown_text, visible

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Severity", "Finding", "Report", "FAIL_ON_CHOICES", "forward_failure_reason"]

PROJECT_URL = "https://github.com/bncheck/bncheck"


class Severity(str, Enum):
    """How bad a finding is. Compares by badness: ``ERROR > WARNING > INFO``."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"error": 3, "warning": 2, "info": 1}[self.value]

    def __str__(self) -> str:
        return self.value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank < other.rank

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank <= other.rank

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank > other.rank

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Severity):
            return NotImplemented
        return self.rank >= other.rank


#: Values accepted by ``--fail-on`` / ``fail_on=``.
FAIL_ON_CHOICES = ("error", "warning", "info", "never")


def forward_failure_reason(forward_error: str) -> str:
    """The ``incomplete`` reason of a report whose forward pass raised ``forward_error``."""
    return (
        f"the model's forward pass failed ({forward_error}), so the forward rules that read "
        "that pass did not run (skipped lists them)"
    )


def _jsonable(value: Any) -> Any:
    """Turn numpy/torch scalars, tuples and sets into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _jsonable(tolist())
    item = getattr(value, "item", None)
    if callable(item):
        return _jsonable(item())
    return str(value)


@dataclass(frozen=True)
class Finding:
    """One problem: which rule found it, how bad, where, and the numbers behind it."""

    rule: str
    severity: Severity
    layer: str | None
    message: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "layer": self.layer,
            "message": self.message,
            "details": _jsonable(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            rule=data["rule"],
            severity=Severity(data["severity"]),
            layer=data.get("layer"),
            message=data["message"],
            details=dict(data.get("details") or {}),
        )


def _sort_key(finding: Finding) -> tuple[int, str, str]:
    return (-finding.severity.rank, finding.rule, finding.layer or "")


class Report:
    """The result of an audit or of a monitored training run.

    ``findings`` are sorted most severe first (then by rule id, then by layer name, in the order
    the layers appear in the model). ``skipped`` maps each rule that did not run to the reason.
    ``notes`` are lines about how the audit ran (the input used, a forward pass that failed).

    ``incomplete`` lists why requested checks could not run (the model's forward raised, so
    the forward rules did not run); a report with such a reason is not ``complete``, is never
    ``ok`` and ``failed()`` at every ``fail_on`` but ``"never"``. Rules skipped because the
    caller did not give what they need (no input, no optimizer) do not make it incomplete.
    """

    def __init__(
        self,
        findings: Iterable[Finding] = (),
        *,
        source: str | None = None,
        skipped: Mapping[str, str] | None = None,
        notes: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
        layers: Sequence[str] = (),
        forward_error: str | None = None,
        incomplete: Sequence[str] = (),
    ) -> None:
        order = {name: i for i, name in enumerate(layers)}
        self.findings: list[Finding] = sorted(
            findings,
            key=lambda f: (-f.severity.rank, f.rule, order.get(f.layer or "", -1), f.layer or ""),
        )
        self.source = source
        self.skipped: dict[str, str] = dict(skipped or {})
        self.notes: list[str] = list(notes)
        self.settings: dict[str, Any] = dict(settings or {})
        self.layers: list[str] = list(layers)
        self.forward_error = forward_error
        self.incomplete: list[str] = list(incomplete)
        if forward_error is not None:
            reason = forward_failure_reason(forward_error)
            if reason not in self.incomplete:
                self.incomplete.insert(0, reason)

    # ---- queries -----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when every check the arguments allowed ran (``incomplete`` is empty)."""
        return not self.incomplete

    @property
    def ok(self) -> bool:
        """True when the report is ``complete`` and no finding has severity ``error``."""
        return self.complete and not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def summary(self) -> dict[str, int]:
        counts = {s.value: 0 for s in Severity}
        for f in self.findings:
            counts[f.severity.value] += 1
        return counts

    def failed(self, fail_on: str | Severity = "error") -> bool:
        """True when some finding is at or above ``fail_on``, or when the report is not
        ``complete`` (``"never"`` never fails)."""
        if fail_on == "never":
            return False
        threshold = Severity(fail_on)
        return not self.complete or any(f.severity >= threshold for f in self.findings)

    def filter(
        self,
        *,
        rules: Iterable[str] | None = None,
        min_severity: str | Severity | None = None,
        layer: str | None = None,
    ) -> list[Finding]:
        wanted = set(rules) if rules is not None else None
        floor = Severity(min_severity) if min_severity is not None else None
        return [
            f
            for f in self.findings
            if (wanted is None or f.rule in wanted)
            and (floor is None or f.severity >= floor)
            and (layer is None or f.layer == layer)
        ]

    def rules_found(self) -> set[str]:
        return {f.rule for f in self.findings}

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.findings)

    def __repr__(self) -> str:
        s = self.summary
        return (
            f"<Report source={self.source!r} errors={s['error']} warnings={s['warning']} "
            f"info={s['info']} skipped={len(self.skipped)} complete={self.complete}>"
        )

    @classmethod
    def merge(cls, reports: Iterable[Report], *, source: str | None = None) -> Report:
        """One report out of several (e.g. one per rank); identical findings are kept once."""
        reports = list(reports)
        seen: dict[tuple[str, str | None, str], Finding] = {}
        for r in reports:
            for f in r.findings:
                seen.setdefault((f.rule, f.layer, f.message), f)
        layers: list[str] = []
        for r in reports:
            layers.extend(n for n in r.layers if n not in layers)
        skipped: dict[str, str] = {}
        for r in reports:
            skipped.update(r.skipped)
        ran: set[str] = set()
        for r in reports:
            ran.update(r.settings.get("rules", []))
        for rid in ran:
            skipped.pop(rid, None)
        notes: list[str] = []
        incomplete: list[str] = []
        for r in reports:
            notes.extend(n for n in r.notes if n not in notes)
            incomplete.extend(n for n in r.incomplete if n not in incomplete)
        return cls(
            seen.values(),
            source=source if source is not None else (reports[0].source if reports else None),
            skipped=skipped,
            notes=notes,
            settings=reports[0].settings if reports else None,
            layers=layers,
            forward_error=next((r.forward_error for r in reports if r.forward_error), None),
            incomplete=incomplete,
        )

    # ---- renderings --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the public contract (plus ``skipped``, ``notes``, ``complete``,
        ``incomplete`` and ``forward_error``)."""
        return {
            "bncheck_version": __version__,
            "source": self.source,
            "findings": [f.to_dict() for f in self.findings],
            "summary": self.summary,
            "complete": self.complete,
            "incomplete": list(self.incomplete),
            "forward_error": self.forward_error,
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Report:
        data = json.loads(text)
        return cls(
            [Finding.from_dict(f) for f in data.get("findings", [])],
            source=data.get("source"),
            skipped=data.get("skipped"),
            notes=data.get("notes", ()),
            forward_error=data.get("forward_error"),
            incomplete=data.get("incomplete", ()),
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per finding: rule, severity, layer, message, then one column per detail."""
        import pandas as pd

        rows = []
        for f in self.findings:
            row: dict[str, Any] = {
                "rule": f.rule,
                "severity": f.severity.value,
                "layer": f.layer,
                "message": f.message,
            }
            for key, value in f.details.items():
                row.setdefault(key, value)
            rows.append(row)
        columns = None if rows else ["rule", "severity", "layer", "message"]
        return pd.DataFrame(rows, columns=columns)

    def headline(self) -> str:
        """``bncheck: 1 error, 2 warnings, 0 info in SOURCE (13 BN layers)``, with
        ``; INCOMPLETE`` when requested checks did not run. The source is shown as given:
        renderers escape it (:func:`bncheck.render.visible`)."""
        s = self.summary
        where = f" in {self.source}" if self.source else ""
        parts = [
            f"{s['error']} error{'s' if s['error'] != 1 else ''}",
            f"{s['warning']} warning{'s' if s['warning'] != 1 else ''}",
            f"{s['info']} info",
        ]
        layers = f" ({len(self.layers)} BN layers)" if self.layers else ""
        incomplete = "" if self.complete else "; INCOMPLETE: some requested checks did not run"
        return f"bncheck: {', '.join(parts)}{where}{layers}{incomplete}"

    def to_table(self, *, tablefmt: str = "simple", max_width: int | None = 100) -> str:
        """The terminal table (via tabulate), headline first, skipped rules and notes last.

        Findings of one rule and one cause share a row that lists their layers; every name
        and message is shown with control characters made visible."""
        lines = [visible(self.headline())]
        lines.extend(f"incomplete: {visible(reason)}" for reason in self.incomplete)
        if self.findings:
            lines.append("")
            lines.append(findings_table(self.findings, tablefmt=tablefmt, max_width=max_width))
        if self.notes:
            lines.append("")
            lines.extend(f"note: {visible(n)}" for n in self.notes)
        if self.skipped:
            lines.append("")
            lines.append(f"skipped {len(self.skipped)} rule(s):")
            by_reason: dict[str, list[str]] = {}
            for rid, reason in self.skipped.items():
                by_reason.setdefault(reason, []).append(rid)
            for reason, ids in by_reason.items():
                lines.append(f"  {', '.join(ids)}: {visible(reason)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()

    def to_markdown(self) -> str:
        """GitHub Markdown (for pull-request comments): every name and message escaped, so
        the file's text cannot add markup, links or HTML."""
        out = [f"## {markdown_text(self.headline())}", ""]
        if self.incomplete:
            out.extend(f"**Incomplete:** {markdown_text(reason)}" for reason in self.incomplete)
            out.append("")
        if self.findings:
            out.append(markdown_findings_table(self.findings))
        else:
            out.append("No findings.")
        if self.notes:
            out.append("")
            out.extend(f"- {markdown_text(n)}" for n in self.notes)
        if self.skipped:
            out.append("")
            out.append("<details><summary>Skipped rules</summary>")
            out.append("")
            out.extend(
                f"- `{rid}`: {markdown_text(reason)}" for rid, reason in self.skipped.items()
            )
            out.append("")
            out.append("</details>")
        return "\n".join(out) + "\n"

    def to_sarif(self) -> str:
        """SARIF 2.1.0, in the form GitHub code scanning accepts.

        Every rule of the catalogue is listed in ``tool.driver.rules``; each finding is a
        result whose physical location is the audited file (``source``) and whose logical
        location is the BN layer's qualified name. The run's invocation says whether the audit
        was complete (``executionSuccessful``) and why not (``toolExecutionNotifications``).
        """
        from .checks.catalogue import CATALOGUE

        level = {"error": "error", "warning": "warning", "info": "note"}
        index = {info.id: i for i, info in enumerate(CATALOGUE)}
        rules = [
            {
                "id": info.id,
                "name": "".join(w.capitalize() for w in info.id.split("-")),
                "shortDescription": {"text": info.summary},
                "fullDescription": {"text": info.summary},
                "helpUri": f"{PROJECT_URL}/blob/main/docs/rules/{info.id}.md",
                "help": {"text": f"Run `bncheck explain {info.id}` for the full explanation."},
                "defaultConfiguration": {"level": level[info.severity]},
                "properties": {"needs": info.needs},
            }
            for info in CATALOGUE
        ]
        uri = (self.source or "model").replace("\\", "/")
        results = []
        for f in self.findings:
            result: dict[str, Any] = {
                "ruleId": f.rule,
                "level": level[f.severity.value],
                "message": {"text": f.message},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": uri},
                            "region": {"startLine": 1},
                        },
                        "logicalLocations": [
                            {"fullyQualifiedName": f.layer or "(model)", "kind": "module"}
                        ],
                    }
                ],
                "partialFingerprints": {"bncheck/v1": f"{f.rule}:{f.layer or ''}"},
                "properties": {"details": _jsonable(f.details)},
            }
            if f.rule in index:
                result["ruleIndex"] = index[f.rule]
            results.append(result)
        doc = {
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "bncheck",
                            "version": __version__,
                            "semanticVersion": __version__,
                            "informationUri": PROJECT_URL,
                            "rules": rules,
                        }
                    },
                    "results": results,
                    # an incomplete audit is an unsuccessful run, with the reasons
                    "invocations": [
                        {
                            "executionSuccessful": self.complete,
                            "toolExecutionNotifications": [
                                {"level": "error", "message": {"text": reason}}
                                for reason in self.incomplete
                            ],
                        }
                    ],
                }
            ],
        }
        return json.dumps(doc, indent=2)

    def render(self, fmt: str = "table") -> str:
        """Render in one of ``table``, ``json``, ``markdown``, ``sarif``."""
        renderers: dict[str, Callable[[], str]] = {
            "table": self.to_table,
            "json": self.to_json,
            "markdown": self.to_markdown,
            "sarif": self.to_sarif,
        }
        if fmt not in renderers:
            from .errors import UsageError, did_you_mean

            raise UsageError(
                f"unknown format {fmt!r}{did_you_mean(fmt, renderers)}; "
                f"choose one of {', '.join(renderers)}"
            )
        return renderers[fmt]()

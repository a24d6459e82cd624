"""Baselines: the findings a team has accepted, so CI fails only on new ones.

A finding's fingerprint is ``(source, rule, layer, cause)``: the cause is the rule's
``details["cause"]`` when the rule names one, else its message without the layer label and
without every number (so measured values, which change with the machine, the torch version
and the random input, never change a fingerprint). The file is JSON, sorted, one entry per
fingerprint, so it diffs well in review::

    {
      "bncheck_baseline": 1,
      "findings": [
        {"cause": "momentum = # > #: each update keeps only # of the running ...",
         "count": 1, "layer": "head.2", "rule": "keras-momentum",
         "severity": "warning", "source": "model.pt"}
      ]
    }

One file may hold the accepted findings of several sources (checkpoints, pytest node ids);
updating it for one source keeps the entries of the others. torch-free.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .report import Finding, Report

__all__ = ["VERSION", "Baseline", "Comparison", "cause_of", "fingerprint", "load", "write"]

#: Version of the file format (the ``bncheck_baseline`` field).
VERSION = 1

# a number on its own (not the digits of a name such as BatchNorm2d, conv1 or features.3)
_NUMBER = re.compile(
    r"(?<![\w.])[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?%?|(?:nan|inf(?:inity)?)\b)",
    re.IGNORECASE,
)
_SPACES = re.compile(r"\s+")
Key = tuple[str, str, str, str]


def cause_of(finding: Finding) -> str:
    """The kind of cause of a finding, without measured numbers (the hint stays: it is fixed
    text, and telling where it starts is not reliable)."""
    cause = finding.details.get("cause")
    if isinstance(cause, str) and cause.strip():
        return cause.strip()
    text = finding.message
    if finding.layer and text.startswith(finding.layer):
        head, sep, rest = text.partition(": ")
        text = rest if sep else text
    text = _NUMBER.sub("#", text)
    return _SPACES.sub(" ", text).strip()


def fingerprint(finding: Finding, source: str | None = None) -> Key:
    """``(source, rule, layer, cause)``, stable across runs, machines and torch versions."""
    return (source or "", finding.rule, finding.layer or "(model)", cause_of(finding))


@dataclass
class Comparison:
    """A report compared with a baseline: which findings are new, known, and which entries are
    fixed (no longer found)."""

    new: list[Finding] = field(default_factory=list)
    known: list[Finding] = field(default_factory=list)
    fixed: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.known)} finding{'s' if len(self.known) != 1 else ''} in the baseline, "
            f"{len(self.new)} new, {len(self.fixed)} fixed (no longer found)"
        )


@dataclass
class Baseline:
    """Accepted findings, counted per fingerprint."""

    entries: dict[Key, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def from_findings(cls, findings: Iterable[Finding], source: str | None = None) -> Baseline:
        baseline = cls()
        baseline.add(findings, source)
        return baseline

    def add(self, findings: Iterable[Finding], source: str | None = None) -> None:
        for finding in findings:
            key = fingerprint(finding, source)
            entry = self.entries.get(key)
            if entry is None:
                self.entries[key] = {
                    "source": key[0],
                    "rule": key[1],
                    "layer": key[2],
                    "cause": key[3],
                    "severity": finding.severity.value,
                    "count": 1,
                }
            else:
                entry["count"] += 1

    def replace_source(self, findings: Iterable[Finding], source: str | None) -> None:
        """Set the entries of ``source`` to ``findings`` (other sources are kept)."""
        self.entries = {k: v for k, v in self.entries.items() if k[0] != (source or "")}
        self.add(findings, source)

    def compare(self, findings: Sequence[Finding], source: str | None = None) -> Comparison:
        """Split ``findings`` (of ``source``) into new and known; entries of ``source`` that no
        finding matched are fixed."""
        remaining = Counter({k: int(v["count"]) for k, v in self.entries.items()})
        result = Comparison()
        for finding in findings:
            key = fingerprint(finding, source)
            if remaining[key] > 0:
                remaining[key] -= 1
                result.known.append(finding)
            else:
                result.new.append(finding)
        for key, left in sorted(remaining.items()):
            if key[0] == (source or "") and left > 0:
                result.fixed.extend([self.entries[key]] * left)
        return result

    def to_json(self) -> str:
        rows = [dict(sorted(v.items())) for _, v in sorted(self.entries.items())]
        doc = {"bncheck_baseline": VERSION, "findings": rows}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def load(path: str | Path) -> Baseline:
    """Read a baseline file; a missing or malformed one is a one-line UsageError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"baseline {path}: no such file; create it with --update-baseline "
            "(pytest: --bncheck-update-baseline)"
        ) from None
    except OSError as exc:
        raise UsageError(f"baseline {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"baseline {path}: not JSON ({exc})") from None
    if not isinstance(doc, dict) or "bncheck_baseline" not in doc:
        raise UsageError(f"baseline {path}: not a bncheck baseline (no 'bncheck_baseline' field)")
    if doc["bncheck_baseline"] != VERSION:
        raise UsageError(
            f"baseline {path}: format version {doc['bncheck_baseline']!r}, this bncheck reads "
            f"version {VERSION}; regenerate it with --update-baseline"
        )
    baseline = Baseline(path=path)
    rows = doc.get("findings")
    if not isinstance(rows, list):
        raise UsageError(f"baseline {path}: 'findings' must be a list")
    for i, row in enumerate(rows):
        try:
            key = (
                str(row.get("source") or ""),
                str(row["rule"]),
                str(row["layer"]),
                str(row["cause"]),
            )
            count = int(row.get("count", 1))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UsageError(
                f"baseline {path}: entry {i} needs rule, layer and cause fields"
            ) from None
        entry = dict(row)
        entry.update(source=key[0], count=count)
        if key in baseline.entries:
            baseline.entries[key]["count"] += count
        else:
            baseline.entries[key] = entry
    return baseline


def load_or_empty(path: str | Path) -> Baseline:
    """For ``--update-baseline``: the existing file's entries, or none when it does not exist."""
    if not Path(path).exists():
        return Baseline(path=Path(path))
    return load(path)


def write(baseline: Baseline, path: str | Path) -> None:
    """Write atomically (a temporary file in the same folder, then a rename)."""
    import os
    import tempfile

    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(baseline.to_json())
        os.replace(tmp, target)
    except OSError as exc:
        raise UsageError(f"cannot write the baseline {path}: {exc.strerror or exc}") from None


def split_report(report: Report, comparison: Comparison) -> Report:
    """The report of the new findings only, with a note that gives the baseline summary."""
    from .report import Report

    new = Report(
        comparison.new,
        source=report.source,
        skipped=report.skipped,
        notes=[*report.notes, f"baseline: {comparison.summary()}"],
        settings=report.settings,
        layers=report.layers,
        forward_error=report.forward_error,
    )
    new.__dict__.update({k: v for k, v in vars(report).items() if k not in vars(new)})
    return new

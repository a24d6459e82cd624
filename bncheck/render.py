"""Human-facing rendering shared by every front end: escaping, grouping, tables.

Layer names, file names and messages can come from a file the user downloaded. Every human
renderer (the terminal table, Markdown, pytest failure text and summary, warnings, the CLI)
passes them through :func:`visible` (terminal text) or :func:`markdown_text` (Markdown/HTML) so
that a name cannot move the cursor, clear the screen, reorder text (bidi overrides) or inject
markup. JSON and SARIF keep the exact strings.

Findings of one rule and one cause (see :func:`cause_key`) are shown as one row that lists
their layers (:func:`group_findings`); JSON, SARIF and ``Report.to_frame`` keep one record per
layer.

This module imports nothing heavy (tabulate is loaded when a table is built).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .report import Finding

__all__ = [
    "FINDING_HEADERS",
    "FindingGroup",
    "cause_key",
    "findings_table",
    "group_findings",
    "layer_list",
    "markdown_findings_table",
    "markdown_text",
    "rules_table",
    "visible",
]

#: Unicode categories shown as escapes: control characters (C0, DEL, C1: ESC, CR, BS, NUL,
#: CSI, ...), format characters (the bidi embeddings, overrides and isolates U+202A-202E and
#: U+2066-2069, directional marks, zero-width spaces and joiners, BOM, tag characters), line
#: and paragraph separators, lone surrogates (undecodable file names), private-use and
#: unassigned code points.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#|~])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}

#: The columns of every findings table.
FINDING_HEADERS = ("severity", "rule", "layer", "message")

#: Detail keys whose string value names a place (another module) rather than a cause: taken
#: out of the message, like the layer name, before findings are compared.
_PLACE_DETAILS = ("producer", "consumer", "module", "caller", "callers")


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: object) -> str:
    """``text`` with every control and invisible format character shown as an escape
    (ESC as ``\\x1b``, CR as ``\\x0d``, U+202E as ``\\u202e``), so that it prints as what it
    contains and cannot move the cursor, clear the screen or reorder the line."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():  # fast path: no control, format or separator character at all
        return s
    return "".join(
        _escape_char(c) if unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in s
    )


def visible_lines(text: str) -> str:
    """:func:`visible` line by line: the line breaks of a multi-line text stay line breaks,
    every other control or invisible format character is shown as an escape."""
    return "\n".join(visible(line) for line in text.split("\n"))


def markdown_text(text: object) -> str:
    """``text`` for a Markdown (GitHub) document: controls shown visibly, HTML special
    characters as entities, Markdown punctuation backslash-escaped (renders as itself)."""
    s = visible(text)
    s = "".join(_HTML.get(c, c) for c in s)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", s)


def layer_list(names: Sequence[str], limit: int = 4) -> str:
    """``a, b, c, d and 9 more``: at most ``limit`` names (all of them when one more would
    be hidden)."""
    if len(names) <= limit + 1:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def cause_key(finding: Finding) -> tuple[str, str, str]:
    """What makes two findings "the same cause": the rule, the severity and
    ``details["cause"]`` when the rule set one, else the message with the layer's name (and
    the names of other modules it points at, such as ``details["producer"]``) taken out."""
    cause = finding.details.get("cause")
    if cause is None:
        text = finding.message
        places = [finding.layer] if finding.layer else []
        for key in _PLACE_DETAILS:
            value = finding.details.get(key)
            if isinstance(value, str) and value:
                places.append(value)
        for place in sorted(places, key=len, reverse=True):
            text = text.replace(place, "\0")
        cause = text
    return (finding.rule, finding.severity.value, str(cause))


@dataclass
class FindingGroup:
    """Findings of one rule and one cause, in report order."""

    findings: list[Finding]

    @property
    def first(self) -> Finding:
        return self.findings[0]

    @property
    def layers(self) -> list[str]:
        return [f.layer or "(model)" for f in self.findings]

    def __len__(self) -> int:
        return len(self.findings)


def group_findings(findings: Iterable[Finding]) -> list[FindingGroup]:
    """Findings grouped by :func:`cause_key`, groups in the order of their first finding."""
    groups: dict[tuple[str, str, str], FindingGroup] = {}
    for f in findings:
        key = cause_key(f)
        if key in groups:
            groups[key].findings.append(f)
        else:
            groups[key] = FindingGroup([f])
    return list(groups.values())


def group_cells(group: FindingGroup) -> tuple[str, str, str, str]:
    """The four raw (unescaped) cells of a group's row: severity, rule, layer, message.

    A group of several layers shows its first layer and ``(+N)`` in the layer column, and the
    first layer's message followed by ``(also in a, b, c, d and 5 more)``: the message stays in
    one piece however the table wraps."""
    f = group.first
    if len(group) == 1:
        return (f.severity.value, f.rule, f.layer or "(model)", f.message)
    others = group.layers[1:]
    layer = f"{group.layers[0]} (+{len(others)})"
    return (f.severity.value, f.rule, layer, f"{f.message} (also in {layer_list(others)})")


def _table(rows: list[list[str]], headers: Sequence[str], tablefmt: str, widths: Any) -> str:
    from tabulate import tabulate

    return str(
        tabulate(
            rows,
            headers=list(headers),
            tablefmt=tablefmt,
            disable_numparse=True,  # layer names like "0.1" are names, not numbers
            maxcolwidths=widths,
        )
    )


def findings_table(
    findings: Iterable[Finding],
    *,
    tablefmt: str = "simple",
    max_width: int | None = 100,
    group: bool = True,
) -> str:
    """The terminal table of findings: one row per rule and cause (``group=True``), every
    cell shown with :func:`visible`."""
    if group:
        cells = [group_cells(g) for g in group_findings(findings)]
    else:
        cells = [(f.severity.value, f.rule, f.layer or "(model)", f.message) for f in findings]
    rows = [[visible(c) for c in row] for row in cells]
    widths = [None, None, None, max_width] if max_width else None
    return _table(rows, FINDING_HEADERS, tablefmt, widths)


def markdown_findings_table(findings: Iterable[Finding], *, group: bool = True) -> str:
    """The GitHub Markdown table of findings, every cell escaped with :func:`markdown_text`
    (rule ids, which come from the catalogue, in code spans)."""
    if group:
        cells = [group_cells(g) for g in group_findings(findings)]
    else:
        cells = [(f.severity.value, f.rule, f.layer or "(model)", f.message) for f in findings]
    rows = [
        [severity, f"`{rule}`", markdown_text(layer), markdown_text(message)]
        for severity, rule, layer, message in cells
    ]
    return _table(rows, FINDING_HEADERS, "github", None)


def rules_table(infos: Iterable[Any], *, markdown: bool = False) -> str:
    """The catalogue as a table (``bncheck rules``): id, severity, needs, summary."""
    rows = [[info.id, info.severity, info.needs, info.summary] for info in infos]
    if markdown:
        rows = [[f"`{r[0]}`", r[1], r[2], markdown_text(r[3])] for r in rows]
        # a Markdown table cannot wrap a cell onto another row
        return _table(rows, ("rule", "severity", "needs", "summary"), "github", None)
    rows = [[visible(c) for c in r] for r in rows]
    return _table(rows, ("rule", "severity", "needs", "summary"), "simple", [None, None, None, 70])

"""Reports as CI annotations: GitHub Actions workflow commands and GitLab Code Quality.

``github``: one workflow command per finding, which GitHub shows as an annotation on the run
(and on the file of a pull request when the audited file is in the repository)::

    ::error file=model.pt,line=1,title=bncheck untrained-stats::features.1 (BatchNorm2d): ...

errors become ``::error``, warnings ``::warning``, info ``::notice``. The message and the
properties are escaped as GitHub's runner unescapes them (``%``, CR and LF everywhere; ``:``
and ``,`` in properties too), so a layer name or message can neither end the command early
nor inject another one.

``gitlab``: the Code Quality report (a JSON list, one issue per finding) that GitLab shows in
merge requests (``artifacts: reports: codequality:``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .render import visible_lines

if TYPE_CHECKING:  # pragma: no cover
    from .report import Report

__all__ = ["escape_data", "escape_property", "to_github", "to_gitlab", "FORMATS"]

#: Formats this module renders (besides report.py's table, json, markdown, sarif).
FORMATS = ("github", "gitlab")

_COMMAND = {"error": "error", "warning": "warning", "info": "notice"}
_GITLAB_SEVERITY = {"error": "critical", "warning": "major", "info": "info"}


def escape_data(text: str) -> str:
    """Escape a workflow command's message (GitHub's ``escapeData``), after showing control
    and invisible format characters (ESC, bidi overrides, NEL, U+2028) as escapes, line by
    line, so a name read from a file cannot reach the log raw or fake a line."""
    text = visible_lines(text)
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """Escape a workflow command property value (GitHub's ``escapeProperty``)."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _repo_path(source: str | None) -> str | None:
    """The audited file relative to the workspace, when it is a file inside it."""
    if not source:
        return None
    path = Path(source)
    if not path.is_file():
        return None
    root = Path(os.environ.get("GITHUB_WORKSPACE") or Path.cwd()).resolve()
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return None


def to_github(report: Report) -> str:
    """One workflow command per finding; stale per-layer ignores as warnings; suppression and
    baseline counts and the headline as notices."""
    file = _repo_path(report.source)
    lines = []
    for f in report.findings:
        props = []
        if file is not None:
            props += [f"file={escape_property(file)}", "line=1"]
        props.append(f"title={escape_property(f'bncheck {f.rule}')}")
        where = f"{f.layer}: " if f.layer and not f.message.startswith(f.layer) else ""
        lines.append(
            f"::{_COMMAND[f.severity.value]} {','.join(props)}::{escape_data(where + f.message)}"
        )
    for note in report.notes:
        if "matched no finding" in note:  # a stale per-layer ignore
            lines.append(f"::warning title=bncheck stale suppression::{escape_data(note)}")
        elif note.startswith(("baseline:", "suppressed")) or " suppressed by " in note:
            lines.append(f"::notice title=bncheck::{escape_data(note)}")
    lines.append(f"::notice title=bncheck::{escape_data(report.headline())}")
    return "\n".join(lines) + "\n"


def to_gitlab(report: Report) -> str:
    """GitLab Code Quality JSON; fingerprints are the baseline fingerprints (no numbers)."""
    from .baseline import fingerprint

    path = _repo_path(report.source) or (report.source or "model")
    issues = []
    for f in report.findings:
        key = "\0".join(fingerprint(f, report.source))
        issues.append(
            {
                "description": f.message,
                "check_name": f.rule,
                "fingerprint": hashlib.sha256(key.encode("utf-8")).hexdigest(),
                "severity": _GITLAB_SEVERITY[f.severity.value],
                "location": {"path": path, "lines": {"begin": 1}},
            }
        )
    return json.dumps(issues, indent=2) + "\n"


def render(report: Report, fmt: str) -> str:
    """Any format: the CI ones here, the others through ``Report.render``."""
    if fmt == "github":
        return to_github(report)
    if fmt == "gitlab":
        return to_gitlab(report)
    return report.render(fmt)

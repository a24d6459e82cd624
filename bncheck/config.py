"""``[tool.bncheck]`` configuration: find it, read it, validate it, apply it.

The file is found by walking up from a directory (the current one by default), as ruff and
pytest do: the first ``bncheck.toml`` (top-level keys) or ``pyproject.toml`` with a
``[tool.bncheck]`` table wins. Keys are those of :data:`bncheck.options.OPTIONS`::

    [tool.bncheck]
    select = ["all"]
    ignore = ["small-batch"]
    fail-on = "warning"
    tolerances = { ema_rtol = 2 }
    per-layer-ignores = { "features.*" = ["bias-before-bn"] }
    input-shape = [8, 3, 32, 32]
    arch = "torchvision:resnet18"
    arch-args = { num_classes = 10 }
    baseline = "bncheck-baseline.json"

An unknown key or a bad value is a :class:`bncheck.UsageError` of one line naming the file
and the key, with the closest known key. Relative paths (``baseline``) are relative to the
file's folder.

:func:`audit_kwargs` and :func:`apply_per_layer_ignores` are what ``bncheck.audit(config=...)``
does with a config; this module reads files only in :func:`find` and :func:`load`, never on
its own from ``audit``. torch-free.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError, did_you_mean
from .options import OPTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:  # pragma: no cover
    from .report import Finding, Report

__all__ = [
    "Config",
    "Suppressed",
    "apply_per_layer_ignores",
    "audit_kwargs",
    "find",
    "from_mapping",
    "load",
    "load_for",
]

CONFIG_FILES = ("bncheck.toml", "pyproject.toml")


@dataclass(frozen=True)
class Config:
    """Validated settings; ``None`` (or empty) for every key the file does not set."""

    path: Path | None = None
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    fail_on: str | None = None
    tolerances: Mapping[str, float | int] = field(default_factory=dict)
    per_layer_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    arch: str | None = None
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    baseline: str | None = None

    @property
    def label(self) -> str:
        """Where the settings came from, for messages."""
        return str(self.path) if self.path is not None else "config"

    def keys_set(self) -> list[str]:
        return [o.key for o in OPTIONS.values() if getattr(self, o.dest) not in (None, {}, ())]


def from_mapping(
    data: Mapping[str, Any], *, path: Path | None = None, where: str | None = None
) -> Config:
    """Validate a mapping of ``[tool.bncheck]`` keys (``-`` or ``_`` spelling) into a Config."""
    label = where or (str(path) if path is not None else "config")
    if not isinstance(data, Mapping):
        raise UsageError(
            f"{label}: expected a table of bncheck settings, got {type(data).__name__}"
        )
    values: dict[str, Any] = {}
    known = list(OPTIONS)
    for raw_key, raw_value in data.items():
        key = str(raw_key).replace("_", "-")
        option = OPTIONS.get(key)
        if option is None:
            raise UsageError(
                f"{label}: unknown key {raw_key!r}{did_you_mean(key, known)}; known keys: "
                f"{', '.join(known)}"
            )
        try:
            value = option.parse(raw_value)
        except UsageError as exc:
            raise UsageError(f"{label}: {option.key}: {exc}") from None
        if key == "baseline" and path is not None and not Path(value).is_absolute():
            value = str(path.parent / value)
        values[option.dest] = value
    return Config(path=path, **values)


def _table(path: Path) -> Mapping[str, Any] | None:
    """The bncheck table of a config file, ``None`` when the file has none."""
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if path.name == "pyproject.toml":
        tool = doc.get("tool", {})
        table = tool.get("bncheck") if isinstance(tool, Mapping) else None
        if table is None:
            return None
        if not isinstance(table, Mapping):
            raise UsageError(f"{path}: [tool.bncheck] must be a table")
        return table
    return doc


def find(start: str | Path | None = None) -> Path | None:
    """The first ``bncheck.toml`` or ``pyproject.toml`` with ``[tool.bncheck]`` at or above
    ``start`` (default: the current directory); ``None`` when there is none."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        for name in CONFIG_FILES:
            candidate = folder / name
            if candidate.is_file() and _table(candidate) is not None:
                return candidate
    return None


def load(path: str | Path) -> Config:
    """Read and validate one file; a ``pyproject.toml`` without ``[tool.bncheck]`` gives an
    empty Config."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such config file")
    table = _table(path)
    where = f"{path} [tool.bncheck]" if path.name == "pyproject.toml" else str(path)
    return from_mapping(table or {}, path=path, where=where)


def load_for(
    explicit: str | Path | None = None, *, disabled: bool = False, start: str | Path | None = None
) -> Config:
    """What a front end uses: ``--config FILE``, else the file found from ``start``, else an
    empty Config; ``--no-config`` (``disabled``) gives an empty Config."""
    if disabled:
        return Config()
    if explicit is not None:
        return load(explicit)
    found = find(start)
    return load(found) if found is not None else Config()


def as_config(config: Config | Mapping[str, Any]) -> Config:
    return config if isinstance(config, Config) else from_mapping(config)


# ---- applying a config to an audit ------------------------------------------------------------
def audit_kwargs(config: Config | Mapping[str, Any], **explicit: Any) -> dict[str, Any]:
    """Keyword arguments for ``bncheck.audit``: the config's ``select``/``ignore``/tolerances
    under the ones given explicitly (``explicit`` wins, tolerances name by name)."""
    cfg = as_config(config)
    kwargs: dict[str, Any] = {}
    if cfg.select is not None:
        kwargs["select"] = list(cfg.select)
    if cfg.ignore is not None:
        kwargs["ignore"] = list(cfg.ignore)
    kwargs.update(cfg.tolerances)
    kwargs.update({k: v for k, v in explicit.items() if v is not None})
    return kwargs


@dataclass(frozen=True)
class Suppressed:
    """A finding a per-layer ignore removed, and the glob that matched it."""

    finding: Finding
    pattern: str


def _layers_of(finding: Finding) -> list[str]:
    if finding.layer is not None:
        return [finding.layer]
    layers = finding.details.get("layers")
    if isinstance(layers, (list, tuple)) and layers:
        return [str(name) for name in layers]
    return ["(model)"]


def match_ignore(finding: Finding, per_layer_ignores: Mapping[str, Sequence[str]]) -> str | None:
    """The first glob whose rules include the finding's and that matches all its layers."""
    layers = _layers_of(finding)
    for glob, ids in per_layer_ignores.items():
        if (finding.rule in ids or "all" in ids) and all(
            fnmatch.fnmatchcase(name, glob) for name in layers
        ):
            return glob
    return None


def apply_per_layer_ignores(
    report: Report,
    per_layer_ignores: Mapping[str, Sequence[str]],
    *,
    show: bool = False,
    note_stale: bool = True,
) -> tuple[Report, list[Suppressed], list[str]]:
    """Drop the findings a per-layer ignore matches.

    Returns the new report (with a note counting what was suppressed, and with ``show`` one
    note per suppressed finding naming the pattern), the suppressed findings, and the stale
    patterns (those that matched no finding: each gets a note too, unless ``note_stale`` is
    False, as in pytest, where staleness is judged over the whole session).
    """
    from .report import Report

    if not per_layer_ignores:
        return report, [], []
    kept: list[Finding] = []
    suppressed: list[Suppressed] = []
    used: set[str] = set()
    for finding in report.findings:
        glob = match_ignore(finding, per_layer_ignores)
        if glob is None:
            kept.append(finding)
        else:
            suppressed.append(Suppressed(finding, glob))
            used.add(glob)
    stale = [glob for glob in per_layer_ignores if glob not in used]
    notes = list(report.notes)
    if suppressed:
        notes.append(
            f"{len(suppressed)} suppressed by per-layer ignores"
            + ("" if show else " (--show-suppressed lists them)")
        )
        if show:
            notes.extend(
                f"suppressed: {s.finding.severity.value} {s.finding.rule} at "
                f"{s.finding.layer or '(model)'} (matched {s.pattern!r})"
                for s in suppressed
            )
    for glob in stale if note_stale else ():
        notes.append(
            f"per-layer ignore {glob!r}: {','.join(per_layer_ignores[glob])} matched no "
            "finding (a stale suppression? remove it)"
        )
    new = Report(
        kept,
        source=report.source,
        skipped=report.skipped,
        notes=notes,
        settings={**report.settings, "suppressed": len(suppressed)},
        layers=report.layers,
        forward_error=report.forward_error,
    )
    # keep any attribute a newer Report (or a front end) set beyond the constructor's
    new.__dict__.update({k: v for k, v in vars(report).items() if k not in vars(new)})
    return new, suppressed, stale


def finish_report(report: Report, config: Config | Mapping[str, Any] | None) -> Report:
    """A report with the config's per-layer ignores applied (what ``audit(config=)`` returns)."""
    if config is None:
        return report
    cfg = as_config(config)
    return apply_per_layer_ignores(report, cfg.per_layer_ignores)[0]


def merged(base: Config, **overrides: Any) -> Config:
    """``base`` with the non-``None`` ``overrides`` (already validated) put over it."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})

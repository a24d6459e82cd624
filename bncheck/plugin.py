"""The bncheck pytest plugin (registered through the ``pytest11`` entry point ``bncheck``).

What it gives a test suite:

* the fixture ``bncheck`` (an object: ``bncheck.audit(model, x, **kw) -> Report`` and
  ``bncheck.assert_ok(model, x, **kw)``), and ``bncheck_reference_model`` /
  ``bncheck_example_batch`` (a small VGG16-BN for 32x32 inputs and a seeded batch for it);
* the marker ``@pytest.mark.bncheck(select=..., ignore=..., fail_on=..., **tolerances)``;
* the options ``--bncheck-fail-on``, ``--bncheck-select``, ``--bncheck-ignore``,
  ``--bncheck-tolerance NAME=VALUE`` with ini keys ``bncheck_fail_on``, ``bncheck_select``,
  ``bncheck_ignore``, ``bncheck_tolerance``; precedence: marker > command line > ini > default;
* zero-code mode: ``--bncheck-model pkg.mod:factory`` (repeatable, ini ``bncheck_model``) with
  ``--bncheck-input-shape 8,3,32,32`` (ini ``bncheck_input_shape``) collects one audit test
  per factory;
* a ``bncheck`` section in the terminal summary listing the BN findings of the run.

pytest loads this module in every session of the environment, so it imports only pytest and
the standard library (plus bncheck's torch-free modules); torch is imported inside fixtures
and tests. Its state lives in ``config.stash``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import options
from ._version import __version__
from .checks.catalogue import TOLERANCES
from .checks.registry import resolve_rule_ids
from .errors import BNCheckError, UsageError, did_you_mean
from .report import Finding, Report, Severity
from .testing import BNCheckFailure, failure_text, report_recorder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from _pytest._code.code import ExceptionInfo, TerminalRepr
    from _pytest.terminal import TerminalReporter
    from torch import nn

    from .baseline import Baseline

__all__ = ["BNCheckFixture", "BNCheckSettings", "BNCheckModelItem", "MARKER_KEYWORDS"]

#: Keyword arguments the marker accepts besides the tolerance names.
MARKER_KEYWORDS = ("select", "ignore", "fail_on", "per_layer_ignores")
#: Seed of the zero-code input batches and of ``bncheck_example_batch``.
SEED = 0
#: Input shape of ``bncheck_example_batch`` (the reference model takes 32x32 images).
EXAMPLE_BATCH_SHAPE = (8, 3, 32, 32)
_SUMMARY_LIMIT = 10


# ---- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BNCheckSettings:
    """The effective settings of an audit: what fails a test, which rules, which tolerances.

    ``select`` is ``None`` for every rule. ``tolerances`` holds only the overridden ones.
    ``per_layer_ignores`` maps a glob on layer names to the rule ids not reported there.
    ``sources`` says where each overridden setting came from (``[tool.bncheck]``, ``ini``,
    ``command line`` or ``marker``); a name missing from it has its default.
    """

    fail_on: str = "error"
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    tolerances: Mapping[str, float | int] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    per_layer_ignores: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def audit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`bncheck.audit`."""
        return {
            "select": list(self.select) if self.select is not None else None,
            "ignore": list(self.ignore),
            **self.tolerances,
        }

    def layered(self, overrides: Mapping[str, Any], source: str) -> BNCheckSettings:
        """These settings updated by ``overrides`` (already validated): later layers win;
        tolerances and per-layer ignores are merged name by name (glob by glob)."""
        sources = dict(self.sources)
        updated = self
        for key in ("select", "ignore", "fail_on"):
            if overrides.get(key) is not None:
                updated = replace(updated, **{key: overrides[key]})
                sources[key] = source
        if overrides.get("per_layer_ignores"):
            merged = {**self.per_layer_ignores, **overrides["per_layer_ignores"]}
            updated = replace(updated, per_layer_ignores=merged)
            sources["per_layer_ignores"] = source
        tolerances = dict(self.tolerances)
        for name, value in overrides.items():
            if name in TOLERANCES:
                tolerances[name] = value
                sources[name] = source
        return replace(updated, tolerances=tolerances, sources=sources)

    def describe(self) -> str:
        select = ",".join(self.select) if self.select is not None else "all"
        ignore = ",".join(self.ignore) if self.ignore else "none"
        tols = ",".join(f"{k}={v:g}" for k, v in sorted(self.tolerances.items())) or "defaults"
        text = f"fail_on={self.fail_on}, select={select}, ignore={ignore}, tolerances={tols}"
        if self.per_layer_ignores:
            text += ", per_layer_ignores=" + ";".join(
                f"{glob}:{','.join(ids)}" for glob, ids in self.per_layer_ignores.items()
            )
        return text

    def command_line(self, baseline: str | None = None) -> str:
        """The pytest options that give these settings (paste them back to reproduce)."""
        return options.command_line(
            fail_on=self.fail_on,
            select=self.select,
            ignore=self.ignore,
            tolerances=self.tolerances,
            per_layer_ignores=self.per_layer_ignores,
            baseline=baseline,
        )


# ---- validation: bncheck.options, with argparse's and pytest's error types -----------------------
def _argparse_type(validate: Any) -> Any:
    """An argparse ``type=`` that turns bncheck's UsageError into argparse's error."""

    def convert(value: str) -> Any:
        try:
            return validate(value)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = validate.__name__.strip("_")
    return convert


# ---- registration ----------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bncheck", "bncheck: Batch Normalization checks")
    group.addoption(
        "--bncheck-fail-on",
        dest="bncheck_fail_on",
        metavar="SEVERITY",
        default=None,
        type=_argparse_type(options.fail_on),
        help="fail a bncheck audit on findings at or above this severity: "
        "error (default), warning, info or never. ini: bncheck_fail_on",
    )
    group.addoption(
        "--bncheck-select",
        dest="bncheck_select",
        metavar="IDS",
        action="append",
        default=None,
        type=_argparse_type(options.rule_ids),
        help="run only these rules (comma-separated ids, repeatable; 'all' for every rule). "
        "ini: bncheck_select",
    )
    group.addoption(
        "--bncheck-ignore",
        dest="bncheck_ignore",
        metavar="IDS",
        action="append",
        default=None,
        type=_argparse_type(options.ignored_ids),
        help="do not run these rules (comma-separated ids, repeatable). ini: bncheck_ignore",
    )
    group.addoption(
        "--bncheck-tolerance",
        dest="bncheck_tolerance",
        metavar="NAME=VALUE",
        action="append",
        default=None,
        type=_argparse_type(options.tolerance_pair),
        help="override a rule tolerance, e.g. ema_rtol=2 (repeatable; `bncheck rules` lists "
        "them). ini: bncheck_tolerance, one NAME=VALUE per line",
    )
    group.addoption(
        "--bncheck-per-layer-ignores",
        dest="bncheck_per_layer_ignores",
        metavar="GLOB:RULE[,RULE]",
        action="append",
        default=None,
        type=_argparse_type(options.per_layer_ignore),
        help="do not report these rules on layers matching GLOB, e.g. "
        "'features.*:bias-before-bn' (repeatable). ini: bncheck_per_layer_ignores",
    )
    group.addoption(
        "--bncheck-baseline",
        dest="bncheck_baseline",
        metavar="FILE",
        default=None,
        type=_argparse_type(options.baseline_path),
        help="accepted findings: an audit fails only on findings not in FILE. "
        "ini: bncheck_baseline",
    )
    group.addoption(
        "--bncheck-update-baseline",
        dest="bncheck_update_baseline",
        action="store_true",
        default=False,
        help="write the findings of this session's audits into the baseline file (entries "
        "of tests that did not run are kept); audits do not fail on findings",
    )
    group.addoption(
        "--bncheck-config",
        dest="bncheck_config",
        metavar="FILE",
        default=None,
        help="read [tool.bncheck] from FILE instead of the pyproject.toml (or bncheck.toml) "
        "found from the current directory",
    )
    group.addoption(
        "--bncheck-no-config",
        dest="bncheck_no_config",
        action="store_true",
        default=False,
        help="ignore [tool.bncheck] configuration files",
    )
    group.addoption(
        "--bncheck-model",
        dest="bncheck_model",
        metavar="MODULE:CALLABLE",
        action="append",
        default=None,
        type=_argparse_type(options.model_spec),
        help="zero-code mode: collect one audit test for the model this factory returns: "
        "module:callable, torchvision:NAME or timm:NAME (repeatable). ini: bncheck_model",
    )
    group.addoption(
        "--bncheck-model-arg",
        dest="bncheck_model_arg",
        metavar="NAME=VALUE",
        action="append",
        default=None,
        type=_argparse_type(options.arch_arg),
        help="zero-code mode: keyword argument of every --bncheck-model factory (repeatable; "
        "VALUE is a Python literal, anything else a string)",
    )
    group.addoption(
        "--bncheck-input-shape",
        dest="bncheck_input_shape",
        metavar="N,C,...",
        default=None,
        type=_argparse_type(options.input_shape),
        help="zero-code mode: shape of the seeded random batch the models are audited with, "
        "batch first (without it, only the rules that need no forward pass run). "
        "ini: bncheck_input_shape",
    )
    parser.addini(
        "bncheck_fail_on",
        "bncheck: severity that fails an audit (default error)",
        type="string",
        default="",
    )
    parser.addini(
        "bncheck_select", "bncheck: rule ids to run (default all)", type="linelist", default=[]
    )
    parser.addini("bncheck_ignore", "bncheck: rule ids not to run", type="linelist", default=[])
    parser.addini(
        "bncheck_tolerance",
        "bncheck: NAME=VALUE tolerance overrides, one per line",
        type="linelist",
        default=[],
    )
    parser.addini(
        "bncheck_per_layer_ignores",
        "bncheck: GLOB:RULE[,RULE] per-layer ignores, one per line",
        type="linelist",
        default=[],
    )
    parser.addini("bncheck_baseline", "bncheck: baseline file", type="string", default="")
    parser.addini(
        "bncheck_model",
        "bncheck: module:callable factories to audit (zero-code)",
        type="linelist",
        default=[],
    )
    parser.addini(
        "bncheck_input_shape",
        "bncheck: input shape for zero-code audits",
        type="string",
        default="",
    )


@dataclass
class _PluginState:
    base: BNCheckSettings
    models: list[str]
    input_shape: tuple[int, ...] | None
    #: (nodeid, {"audits": n, "findings": [finding dicts]}) per test that audited, in the
    #: order their reports arrived (from xdist workers too).
    audited: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    config_file: str | None = None
    baseline_path: str | None = None
    update_baseline: bool = False
    baseline: Baseline | None = None
    model_args: dict[str, Any] = field(default_factory=dict)


_STATE = pytest.StashKey[_PluginState]()
_ITEM_REPORTS = pytest.StashKey[list[Report]]()
#: Attribute of the "call" TestReport that carries a test's audits; pytest-xdist ships it from
#: the workers to the controller along with the rest of the report.
REPORT_ATTRIBUTE = "bncheck"


def _ini(config: pytest.Config, name: str, validate: Any, value: Any = None) -> Any:
    """Validate ini key ``name`` (or one ``value`` of a linelist key); ``None`` when unset."""
    if value is None:
        value = config.getini(name)
    if not value:
        return None
    try:
        return validate(value)
    except UsageError as exc:
        raise pytest.UsageError(f"ini option {name}: {exc}") from None


def _file_config(config: pytest.Config) -> Any:
    """``[tool.bncheck]`` of ``--bncheck-config FILE``, or of the file found from the
    invocation directory; an empty Config with ``--bncheck-no-config``."""
    from . import config as config_mod

    opt = config.option
    explicit = opt.bncheck_config
    if explicit is not None and not Path(explicit).is_absolute():
        explicit = str(config.invocation_params.dir / explicit)
    try:
        return config_mod.load_for(
            explicit, disabled=opt.bncheck_no_config, start=config.invocation_params.dir
        )
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None


def _base_settings(config: pytest.Config, file_config: Any) -> BNCheckSettings:
    """Defaults, then ``[tool.bncheck]``, then the ini file, then the command line."""
    settings = BNCheckSettings()
    from_file: dict[str, Any] = {
        "fail_on": file_config.fail_on,
        "select": file_config.select,
        "ignore": file_config.ignore,
        "per_layer_ignores": dict(file_config.per_layer_ignores),
        **file_config.tolerances,
    }
    settings = settings.layered(from_file, "[tool.bncheck]")
    ini: dict[str, Any] = {
        "fail_on": _ini(config, "bncheck_fail_on", options.fail_on),
        "select": _ini(config, "bncheck_select", options.rule_ids),
        "ignore": _ini(config, "bncheck_ignore", options.ignored_ids),
        "per_layer_ignores": _ini(config, "bncheck_per_layer_ignores", options.per_layer_ignores),
    }
    for line in config.getini("bncheck_tolerance"):
        name, value = _ini(config, "bncheck_tolerance", options.tolerance_pair, line)
        ini[name] = value
    settings = settings.layered(ini, "ini")
    opt = config.option
    cli: dict[str, Any] = {
        "fail_on": opt.bncheck_fail_on,
        "select": _flatten(opt.bncheck_select),
        "ignore": _flatten(opt.bncheck_ignore),
        "per_layer_ignores": options.per_layer_ignores(
            [f"{glob}:{','.join(ids)}" for glob, ids in opt.bncheck_per_layer_ignores or ()]
        ),
    }
    cli.update(dict(opt.bncheck_tolerance or ()))
    return settings.layered(cli, "command line")


def _flatten(groups: Sequence[Sequence[str]] | None) -> tuple[str, ...] | None:
    if groups is None:
        return None
    return tuple(rid for group in groups for rid in group)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bncheck(select=None, ignore=None, fail_on=None, per_layer_ignores=None, **tolerances): "
        "settings of the bncheck fixture's audits in this test (they win over --bncheck-* "
        "options, ini keys and [tool.bncheck])",
    )
    file_config = _file_config(config)
    models = list(config.option.bncheck_model or ())
    if not models:
        models = [
            _ini(config, "bncheck_model", options.model_spec, line)
            for line in config.getini("bncheck_model")
        ]
    models = list(dict.fromkeys(models))  # a factory named twice is audited once
    shape = config.option.bncheck_input_shape
    if shape is None:
        shape = _ini(config, "bncheck_input_shape", options.input_shape)
    if shape is None:
        shape = file_config.input_shape
    baseline_path = config.option.bncheck_baseline or _ini(
        config, "bncheck_baseline", options.baseline_path
    )
    if baseline_path is not None:
        baseline_path = str(config.invocation_params.dir / baseline_path)
    else:
        baseline_path = file_config.baseline  # already relative to its file
    state = _PluginState(
        _base_settings(config, file_config),
        models,
        shape,
        config_file=str(file_config.path) if file_config.path is not None else None,
        baseline_path=baseline_path,
        update_baseline=bool(config.option.bncheck_update_baseline),
        model_args=dict(config.option.bncheck_model_arg or ()),
    )
    if state.update_baseline and baseline_path is None:
        raise pytest.UsageError(
            "--bncheck-update-baseline needs --bncheck-baseline FILE (or bncheck_baseline, or "
            "baseline in [tool.bncheck])"
        )
    if baseline_path is not None and not state.update_baseline:
        from . import baseline as baseline_mod

        try:
            state.baseline = baseline_mod.load(baseline_path)
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[_STATE] = state
    config.pluginmanager.register(_AuditCollector(state), "bncheck-audit-collector")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """``bncheck VERSION: <the options that reproduce this run's settings>``."""
    state = config.stash.get(_STATE, None)
    if state is None:
        return []
    baseline = state.baseline_path
    if baseline is not None:
        relative = os.path.relpath(baseline, config.invocation_params.dir)
        baseline = baseline if relative.startswith("..") else relative
    line = f"bncheck {__version__}: {state.base.command_line(baseline)}"
    if state.config_file is not None:
        line += f" [config: {state.config_file}]"
    lines = [line]
    if state.models:  # zero-code mode, as options too
        parts = [f"--bncheck-model={spec}" for spec in state.models]
        parts += [f"--bncheck-model-arg={k}={v!r}" for k, v in state.model_args.items()]
        if state.input_shape:
            parts.append(f"--bncheck-input-shape={','.join(map(str, state.input_shape))}")
        lines.append("bncheck models: " + " ".join(shlex.quote(p) for p in parts))
    return lines


# ---- the marker -------------------------------------------------------------------------------
def _marker_overrides(item: pytest.Item) -> dict[str, Any]:
    """The merged ``@pytest.mark.bncheck`` arguments of ``item`` (closest marker wins),
    validated; a wrong argument raises ``pytest.UsageError`` naming the test."""
    merged: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers("bncheck"))):
        if mark.args:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.bncheck takes keyword arguments only "
                f"(select=, ignore=, fail_on=, tolerances), got positional {mark.args!r}"
            )
        merged.update(mark.kwargs)
    known = (*MARKER_KEYWORDS, *TOLERANCES)
    checked: dict[str, Any] = {}
    try:
        for key, value in merged.items():
            if key not in known:
                raise UsageError(
                    f"unknown argument {key!r}{did_you_mean(key, known)}; "
                    "it takes select, ignore, fail_on, per_layer_ignores and tolerance names "
                    f"({', '.join(sorted(TOLERANCES))})"
                )
            if key == "fail_on":
                checked[key] = options.fail_on(value)
            elif key == "select":
                checked[key] = options.rule_ids(value) if value is not None else None
            elif key == "ignore":
                checked[key] = options.ignored_ids(value) if value is not None else None
            elif key == "per_layer_ignores":
                checked[key] = options.per_layer_ignores(value) if value is not None else None
            else:
                checked.update(options.tolerances({key: value}))
    except UsageError as exc:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.bncheck: {exc}") from None
    return checked


def _settings_for(item: pytest.Item) -> BNCheckSettings:
    state = item.config.stash[_STATE]
    settings = state.base.layered(_marker_overrides(item), "marker")
    if state.update_baseline:  # the session records findings; none fails a test
        settings = replace(settings, fail_on="never")
    return settings


# ---- the fixtures -----------------------------------------------------------------------------
class BNCheckFixture:
    """The ``bncheck`` fixture: audits with the test's effective settings.

    Settings come from, in order of precedence: the keyword arguments of the call, the
    ``@pytest.mark.bncheck`` marker, the ``--bncheck-*`` options, the ``bncheck_*`` ini keys,
    ``[tool.bncheck]``, the defaults. ``settings`` shows them; ``reports`` holds every report
    of this test. Reports leave out what the per-layer ignores suppress and, with a baseline,
    the findings it accepts (a note gives the counts).
    """

    def __init__(
        self,
        settings: BNCheckSettings,
        nodeid: str = "",
        baseline: Baseline | None = None,
        recording: bool = False,
    ) -> None:
        self.settings = settings
        self.nodeid = nodeid
        self.baseline = baseline
        #: ``--bncheck-update-baseline``: findings are recorded, none fails the test
        self.recording = recording
        self.reports: list[Report] = []

    def __repr__(self) -> str:
        return f"<bncheck fixture: {self.settings.describe()}>"

    def audit(self, model: nn.Module, example_input: Any = None, **kwargs: Any) -> Report:
        """:func:`bncheck.audit` with this test's select/ignore/tolerances (``kwargs`` win)."""
        __tracebackhide__ = True
        from .engine import audit

        audit_kwargs = self.settings.audit_kwargs()
        if "select" in kwargs and "ignore" not in kwargs and audit_kwargs.get("ignore"):
            # the call's own selection wins over an inherited ignore of the same rules
            chosen = set(resolve_rule_ids(kwargs["select"]))
            kept = [r for r in options.split_ids(audit_kwargs["ignore"]) if r not in chosen]
            audit_kwargs["ignore"] = kept or None
        audit_kwargs.update(kwargs)
        audit_kwargs.setdefault("source", self.nodeid or None)
        report = _gated(
            audit(model, example_input, **audit_kwargs), self.settings, self.baseline, self.nodeid
        )
        self.reports.append(report)
        recorder = report_recorder.get()
        if recorder is not None:
            recorder(report)
        return report

    def recalibrate(self, model: nn.Module, data: Any, **kwargs: Any) -> Any:
        """:func:`bncheck.recalibrate`: a :class:`bncheck.Recalibration` whose ``ok`` says
        whether the repaired model passes its audit."""
        from .recalibration import recalibrate

        return recalibrate(model, data, **kwargs)

    def assert_ok(
        self,
        model: nn.Module,
        example_input: Any = None,
        *,
        fail_on: str | Severity | None = None,
        **kwargs: Any,
    ) -> Report:
        """Audit and raise :class:`bncheck.testing.BNCheckFailure` (an ``AssertionError``)
        with the findings table when a finding is at or above ``fail_on``."""
        __tracebackhide__ = True
        threshold = self.settings.fail_on if fail_on is None else options.fail_on(fail_on)
        report = self.audit(model, example_input, **kwargs)
        if self.recording:
            return report
        if report.failed(threshold):
            raise BNCheckFailure(failure_text(report, threshold, title="bncheck"), report)
        if report.forward_error is not None:
            raise BNCheckFailure(
                f"bncheck: the model's forward pass failed ({report.forward_error}), so the "
                "forward rules could not run - check the example input's shape and dtype",
                report,
            )
        return report


def _gated(
    report: Report, settings: BNCheckSettings, baseline: Baseline | None, source: str
) -> Report:
    """The report with the per-layer ignores applied and, with a baseline, only the findings
    it does not hold. Counts for the session summary ride along in ``report.settings``."""
    from .baseline import split_report
    from .config import apply_per_layer_ignores

    report, suppressed, _ = apply_per_layer_ignores(
        report, settings.per_layer_ignores, note_stale=False
    )
    used: dict[str, int] = {}
    for s in suppressed:
        used[s.pattern] = used.get(s.pattern, 0) + 1
    bookkeeping: dict[str, Any] = {
        "per_layer_ignores": sorted(settings.per_layer_ignores),
        "suppressed_by": used,
    }
    if baseline is not None:
        comparison = baseline.compare(report.findings, source)
        report = split_report(report, comparison)
        bookkeeping["baseline"] = {
            "known": len(comparison.known),
            "new": len(comparison.new),
            "fixed": len(comparison.fixed),
        }
    report.settings["bncheck_plugin"] = bookkeeping
    return report


@pytest.fixture
def bncheck(request: pytest.FixtureRequest) -> BNCheckFixture:
    """Audit models with this test's bncheck settings: ``bncheck.audit(model, x)``,
    ``bncheck.assert_ok(model, x)``."""
    state = request.config.stash.get(_STATE, None)
    return BNCheckFixture(
        _settings_for(request.node),
        request.node.nodeid,
        state.baseline if state is not None else None,
        recording=state is not None and state.update_baseline,
    )


@pytest.fixture
def bncheck_reference_model() -> nn.Module:
    """A fresh small VGG16-BN for 32x32 inputs (``bncheck.models.vgg16_bn_small()``), in train
    mode, initialised from seed 0 without touching the global RNG."""
    import torch

    from .models import vgg16_bn_small

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return vgg16_bn_small()


@pytest.fixture
def bncheck_example_batch() -> torch.Tensor:
    """A seeded standard-normal batch of shape (8, 3, 32, 32) for the reference model."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(EXAMPLE_BATCH_SHAPE, generator=generator)


# ---- recording reports for the summary --------------------------------------------------------
def _recording(item: pytest.Item) -> Generator[None, None, None]:
    if _STATE not in item.config.stash:
        return (yield)
    reports = item.stash.setdefault(_ITEM_REPORTS, [])
    token = report_recorder.set(reports.append)
    try:
        return (yield)
    finally:
        report_recorder.reset(token)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _recording(item))  # audits made by fixtures count too


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _recording(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    audits = item.stash.get(_ITEM_REPORTS, None)
    # on the call report, or on a failed setup (then no call report follows)
    if audits and (report.when == "call" or (report.when == "setup" and report.failed)):
        findings: list[dict[str, Any]] = []
        incomplete: list[str] = []
        globs: set[str] = set()
        used: dict[str, int] = {}
        baseline = {"known": 0, "new": 0, "fixed": 0}
        for audit_report in audits:
            incomplete.extend(r for r in audit_report.incomplete if r not in incomplete)
            for finding in audit_report.findings:
                as_dict = finding.to_dict()
                if as_dict not in findings:
                    findings.append(as_dict)
            kept = audit_report.settings.get("bncheck_plugin", {})
            globs.update(kept.get("per_layer_ignores", ()))
            for glob, n in kept.get("suppressed_by", {}).items():
                used[glob] = used.get(glob, 0) + n
            for key, n in kept.get("baseline", {}).items():
                baseline[key] += n
        record: dict[str, Any] = {
            "audits": len(audits),
            "findings": findings,
            "incomplete": incomplete,
        }
        if globs:
            record["per_layer_ignores"] = sorted(globs)
            record["suppressed_by"] = used
        if any(baseline.values()):
            record["baseline"] = baseline
        setattr(report, REPORT_ATTRIBUTE, record)
    return report


def _shown(path: str | None) -> str:
    """``path`` relative to the current directory when it is below it."""
    if path is None:
        return ""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


class _AuditCollector:
    """Collects the audits of every test report (local or from xdist workers); on the
    controller, reports stale per-layer ignores and the baseline counts, and writes the
    baseline with ``--bncheck-update-baseline``."""

    def __init__(self, state: _PluginState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        audited = getattr(report, REPORT_ATTRIBUTE, None)
        if isinstance(audited, dict):
            self.state.audited.append((report.nodeid, audited))

    def stale_ignores(self) -> list[str]:
        """Per-layer ignores that were in effect in some audit and matched no finding."""
        seen: set[str] = set()
        used: set[str] = set()
        for _, record in self.state.audited:
            seen.update(record.get("per_layer_ignores", ()))
            used.update(g for g, n in record.get("suppressed_by", {}).items() if n)
        return sorted(seen - used)

    def adoption_lines(self) -> list[str]:
        """Suppressions, stale ignores and the baseline, for the end of the session."""
        lines = []
        suppressed: dict[str, int] = {}
        baseline = {"known": 0, "new": 0, "fixed": 0}
        for _, record in self.state.audited:
            for glob, n in record.get("suppressed_by", {}).items():
                suppressed[glob] = suppressed.get(glob, 0) + n
            for key, n in record.get("baseline", {}).items():
                baseline[key] += n
        total = sum(suppressed.values())
        if total:
            by = ", ".join(f"{glob!r}: {n}" for glob, n in suppressed.items() if n)
            lines.append(f"{total} suppressed by per-layer ignores ({by})")
        for glob in self.stale_ignores():
            lines.append(
                f"warning: per-layer ignore {glob!r} matched no finding in this session "
                "(a stale suppression? remove it)"
            )
        if self.state.baseline is not None:
            known = baseline["known"]
            lines.append(
                f"baseline {_shown(self.state.baseline_path)}: {known} finding"
                f"{'s' if known != 1 else ''} in the baseline, {baseline['new']} new, "
                f"{baseline['fixed']} fixed (no longer found)"
            )
        return lines

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if hasattr(terminalreporter.config, "workerinput"):
            return
        lines = self.adoption_lines()
        if self.state.update_baseline and self.state.baseline_path is not None:
            lines.append(self._write_baseline())
        if lines:
            terminalreporter.write_sep("-", "bncheck adoption")
            for line in lines:
                terminalreporter.write_line(line)

    def _write_baseline(self) -> str:
        from . import baseline as baseline_mod

        path = self.state.baseline_path
        assert path is not None
        try:
            stored = baseline_mod.load_or_empty(path)
            by_test: dict[str, list[Finding]] = {}
            for nodeid, record in self.state.audited:
                found = by_test.setdefault(nodeid, [])
                found.extend(Finding.from_dict(d) for d in record.get("findings", ()))
            for nodeid, found in by_test.items():
                stored.replace_source(found, nodeid)
            baseline_mod.write(stored, path)
        except UsageError as exc:
            return f"error: {exc}"
        total = sum(len(f) for f in by_test.values())
        return f"wrote {total} finding(s) of {len(by_test)} test(s) to the baseline {_shown(path)}"


# ---- zero-code mode ---------------------------------------------------------------------------
def _resolve_factory(spec: str, config: pytest.Config) -> Any:
    from . import zoo

    model_args = config.stash[_STATE].model_args
    if zoo.is_zoo_spec(spec):
        try:
            return zoo.resolve(spec, model_args, flag="--bncheck-model")[0]
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
    target = _import_factory(spec, config)
    if model_args:
        import functools

        return functools.partial(target, **model_args)
    return target


def _import_factory(spec: str, config: pytest.Config) -> Any:
    module_name, _, attr_path = spec.partition(":")
    invocation_dir = str(config.invocation_params.dir)
    if invocation_dir not in sys.path:
        sys.path.insert(0, invocation_dir)  # what `python -m pytest` does
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise pytest.UsageError(
            f"--bncheck-model {spec}: cannot import {module_name!r} ({exc}); is it on "
            "sys.path? (pytest's `pythonpath` ini key adds folders)"
        ) from None
    except Exception as exc:  # the module itself is broken (SyntaxError, an error at import)
        raise pytest.UsageError(
            f"--bncheck-model {spec}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None
    for part in attr_path.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise pytest.UsageError(
                f"--bncheck-model {spec}: {getattr(target, '__name__', module_name)!r} has no "
                f"attribute {part!r}{did_you_mean(part, names)}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise pytest.UsageError(
            f"--bncheck-model {spec}: {attr_path!r} is not callable; give "
            "a function or class that returns an nn.Module"
        )
    return target


class BNCheckModelItem(pytest.Item):
    """Zero-code mode: one audit of the model a factory returns."""

    def __init__(
        self, *, spec: str, factory: Any, input_shape: tuple[int, ...] | None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.add_marker("bncheck")  # `pytest -m bncheck` runs only the audits
        self.spec = spec
        self.factory = factory
        self.input_shape = input_shape

    def runtest(self) -> None:
        import torch
        from torch import nn

        from .engine import audit

        state = self.config.stash[_STATE]
        settings = state.base
        if state.update_baseline:
            settings = replace(settings, fail_on="never")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            try:
                model = self.factory()
            except Exception as exc:
                raise UsageError(
                    f"{self.spec} raised {type(exc).__name__}: {exc} (the factory must build "
                    "the model with no arguments)"
                ) from exc
        if not isinstance(model, nn.Module):
            raise UsageError(f"{self.spec} returned {type(model).__name__}, not an nn.Module")
        example = None
        if self.input_shape is not None:
            generator = torch.Generator().manual_seed(SEED)
            example = torch.randn(self.input_shape, generator=generator)
        report = audit(
            model, example, synthetic_input=True, source=self.spec, **settings.audit_kwargs()
        )
        report = _gated(report, settings, state.baseline, self.nodeid)
        recorder = report_recorder.get()
        if recorder is not None:
            recorder(report)
        if report.failed(settings.fail_on):
            raise BNCheckFailure(
                failure_text(report, settings.fail_on, title="bncheck", command_line=True), report
            )
        if report.forward_error is not None:
            raise BNCheckFailure(
                f"bncheck: the forward pass of {self.spec} failed "
                f"({report.forward_error}); check --bncheck-input-shape",
                report,
            )

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: Any = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, (BNCheckFailure, BNCheckError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"bncheck audit of {self.spec}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    for item in items:  # validate every marker before anything runs
        if item.get_closest_marker("bncheck") is not None:
            _marker_overrides(item)
    audits: list[pytest.Item] = []
    for spec in state.models:
        factory = _resolve_factory(spec, config)
        audits.append(
            BNCheckModelItem.from_parent(
                session,
                name=f"bncheck[{spec}]",
                nodeid=f"bncheck[{spec}]",
                spec=spec,
                factory=factory,
                input_shape=state.input_shape,
            )
        )
    if audits:
        items.extend(audits)
        # announce them like collected items, so "collected N items" counts them
        config.hook.pytest_collectreport(
            report=pytest.CollectReport(
                "bncheck", "passed", None, list[pytest.Item | pytest.Collector](audits)
            )
        )


# ---- the terminal summary ---------------------------------------------------------------------
def _summary_lines(audited: Iterable[tuple[str, Mapping[str, Any]]], verbose: bool) -> list[str]:
    """The summary: one count line (with the audits that could not run every requested check),
    then per test why an audit was incomplete and its findings, one line per rule and cause
    (the first 10 unless -v). Names and messages are shown with control characters visible."""
    from .render import group_findings, visible

    audits = 0
    by_test: dict[str, list[Finding]] = {}
    incomplete: dict[str, list[str]] = {}
    for nodeid, record in audited:
        audits += int(record.get("audits", 0))
        findings = by_test.setdefault(nodeid, [])
        for data in record.get("findings", ()):
            finding = Finding.from_dict(data)
            if finding not in findings:
                findings.append(finding)
        reasons = incomplete.setdefault(nodeid, [])
        reasons.extend(r for r in record.get("incomplete", ()) if r not in reasons)
    everything = [f for fs in by_test.values() for f in fs]
    counts = {s.value: sum(f.severity is s for f in everything) for s in Severity}
    n_incomplete = sum(bool(r) for r in incomplete.values())
    not_run = f", {n_incomplete} incomplete (checks did not run)" if n_incomplete else ""
    lines = [
        f"{audits} audit{'s' if audits != 1 else ''} in {len(by_test)} "
        f"test{'s' if len(by_test) != 1 else ''}: {counts['error']} error(s), "
        f"{counts['warning']} warning(s), {counts['info']} info{not_run}"
    ]
    for nodeid, findings in by_test.items():
        reasons = incomplete.get(nodeid, [])
        if not findings and not reasons:
            continue
        lines.append(visible(nodeid))
        lines.extend(f"  {'INCOMPLETE':<7} {visible(reason)}" for reason in reasons)
        groups = group_findings(findings)
        shown = groups if verbose else groups[:_SUMMARY_LIMIT]
        for group in shown:
            first = group.first
            where = ""
            if len(group) > 1:
                names = group.layers
                more = f", +{len(names) - 3}" if len(names) > 3 else ""
                where = f"{len(group)} findings ({', '.join(names[:3])}{more}); first: "
            text = visible(where + first.message)
            lines.append(f"  {first.severity.value:<7} {first.rule:<26} {text}")
        if len(shown) < len(groups):
            lines.append(f"  ... +{len(groups) - len(shown)} more rules (-v shows all)")
    return lines


def pytest_terminal_summary(
    terminalreporter: TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller prints the summary
        return
    state = config.stash.get(_STATE, None)
    if state is None or not state.audited:
        return
    terminalreporter.write_sep("=", "bncheck")
    for line in _summary_lines(state.audited, config.option.verbose > 0):
        terminalreporter.write_line(line)

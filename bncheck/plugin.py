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
import re
import sys
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import pytest

from ._version import __version__
from .checks.catalogue import TOLERANCES
from .checks.registry import resolve_rule_ids, resolve_tolerances
from .errors import BNCheckError, UsageError, did_you_mean
from .report import FAIL_ON_CHOICES, Finding, Report, Severity
from .testing import BNCheckFailure, failure_text, report_recorder

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from _pytest._code.code import ExceptionInfo, TerminalRepr
    from _pytest.terminal import TerminalReporter
    from torch import nn

__all__ = ["BNCheckFixture", "BNCheckSettings", "BNCheckModelItem", "MARKER_KEYWORDS"]

#: Keyword arguments the marker accepts besides the tolerance names.
MARKER_KEYWORDS = ("select", "ignore", "fail_on")
#: Seed of the zero-code input batches and of ``bncheck_example_batch``.
SEED = 0
#: Input shape of ``bncheck_example_batch`` (the reference model takes 32x32 images).
EXAMPLE_BATCH_SHAPE = (8, 3, 32, 32)
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_SUMMARY_LIMIT = 10


# ---- settings --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BNCheckSettings:
    """The effective settings of an audit: what fails a test, which rules, which tolerances.

    ``select`` is ``None`` for every rule. ``tolerances`` holds only the overridden ones.
    ``sources`` says where each overridden setting came from (``ini``, ``command line`` or
    ``marker``); a name missing from it has its default.
    """

    fail_on: str = "error"
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    tolerances: Mapping[str, float | int] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    def audit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`bncheck.audit`."""
        return {
            "select": list(self.select) if self.select is not None else None,
            "ignore": list(self.ignore),
            **self.tolerances,
        }

    def layered(self, overrides: Mapping[str, Any], source: str) -> BNCheckSettings:
        """These settings updated by ``overrides`` (already validated): later layers win;
        tolerances are merged name by name."""
        sources = dict(self.sources)
        updated = self
        for key in MARKER_KEYWORDS:
            if overrides.get(key) is not None:
                updated = replace(updated, **{key: overrides[key]})
                sources[key] = source
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
        return f"fail_on={self.fail_on}, select={select}, ignore={ignore}, tolerances={tols}"


# ---- validation (shared by options, ini keys and the marker) --------------------------------
def _fail_on(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in FAIL_ON_CHOICES:
        raise UsageError(
            f"{value!r} is not one of {', '.join(FAIL_ON_CHOICES)}"
            f"{did_you_mean(text, FAIL_ON_CHOICES)}"
        )
    return text


def _rule_ids(value: Any) -> tuple[str, ...]:
    """Rule ids from a comma-separated string or a sequence of them; ``all`` is every rule."""
    if isinstance(value, str):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise UsageError(
                f"expected rule ids (a comma-separated string or a list of them), got "
                f"{type(value).__name__} {value!r}"
            ) from None
    ids: list[str] = []
    for item in items:
        ids.extend(part.strip() for part in str(item).split(",") if part.strip())
    if not ids:
        raise UsageError("names no rule; give rule ids or 'all'")
    resolve_rule_ids(select=ids)  # raises UsageError with a suggestion
    return tuple(ids)


def _ignored_ids(value: Any) -> tuple[str, ...]:
    """Rule ids not to run; ``all`` is refused (it would check nothing)."""
    ids = _rule_ids(value)
    if "all" in ids:
        resolve_rule_ids(ignore=ids)  # raises the UsageError that says why
    return ids


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def _tolerance_pair(text: str) -> tuple[str, float | int]:
    name, sep, raw = str(text).partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise UsageError(
            f"{text!r} is not NAME=VALUE (e.g. ema_rtol=2); known tolerances: "
            f"{', '.join(sorted(TOLERANCES))}"
        )
    value = resolve_tolerances({name: raw.strip()})[name]
    return name, value


def _input_shape(value: Any) -> tuple[int, ...]:
    parts = [p.strip() for p in str(value).replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise UsageError(
            f"{value!r} is not an input shape; give positive integers N,C[,...] "
            "separated by commas, e.g. 8,3,32,32"
        )
    return shape


def _model_spec(value: Any) -> str:
    text = str(value).strip()
    if not _SPEC.match(text):
        raise UsageError(
            f"{value!r} is not a factory spec; give module:callable, e.g. "
            "mypkg.models:build_model or bncheck.models:vgg16_bn_small"
        )
    return text


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
        type=_argparse_type(_fail_on),
        help="fail a bncheck audit on findings at or above this severity: "
        "error (default), warning, info or never. ini: bncheck_fail_on",
    )
    group.addoption(
        "--bncheck-select",
        dest="bncheck_select",
        metavar="IDS",
        action="append",
        default=None,
        type=_argparse_type(_rule_ids),
        help="run only these rules (comma-separated ids, repeatable; 'all' for every rule). "
        "ini: bncheck_select",
    )
    group.addoption(
        "--bncheck-ignore",
        dest="bncheck_ignore",
        metavar="IDS",
        action="append",
        default=None,
        type=_argparse_type(_ignored_ids),
        help="do not run these rules (comma-separated ids, repeatable). ini: bncheck_ignore",
    )
    group.addoption(
        "--bncheck-tolerance",
        dest="bncheck_tolerance",
        metavar="NAME=VALUE",
        action="append",
        default=None,
        type=_argparse_type(_tolerance_pair),
        help="override a rule tolerance, e.g. ema_rtol=2 (repeatable; `bncheck rules` lists "
        "them). ini: bncheck_tolerance, one NAME=VALUE per line",
    )
    group.addoption(
        "--bncheck-model",
        dest="bncheck_model",
        metavar="MODULE:CALLABLE",
        action="append",
        default=None,
        type=_argparse_type(_model_spec),
        help="zero-code mode: collect one audit test for the model this factory returns "
        "(repeatable). ini: bncheck_model",
    )
    group.addoption(
        "--bncheck-input-shape",
        dest="bncheck_input_shape",
        metavar="N,C,...",
        default=None,
        type=_argparse_type(_input_shape),
        help="zero-code mode: shape of the seeded random batch the models are audited with "
        "(without it, only the rules that need no forward pass run). "
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


def _base_settings(config: pytest.Config) -> BNCheckSettings:
    """Defaults, then the ini file, then the command line."""
    settings = BNCheckSettings()
    ini: dict[str, Any] = {
        "fail_on": _ini(config, "bncheck_fail_on", _fail_on),
        "select": _ini(config, "bncheck_select", _rule_ids),
        "ignore": _ini(config, "bncheck_ignore", _ignored_ids),
    }
    for line in config.getini("bncheck_tolerance"):
        name, value = _ini(config, "bncheck_tolerance", _tolerance_pair, line)
        ini[name] = value
    settings = settings.layered(ini, "ini")
    opt = config.option
    cli: dict[str, Any] = {
        "fail_on": opt.bncheck_fail_on,
        "select": _flatten(opt.bncheck_select),
        "ignore": _flatten(opt.bncheck_ignore),
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
        "bncheck(select=None, ignore=None, fail_on=None, **tolerances): settings of the "
        "bncheck fixture's audits in this test (they win over --bncheck-* options and ini "
        "keys)",
    )
    models = list(config.option.bncheck_model or ())
    if not models:
        models = [
            _ini(config, "bncheck_model", _model_spec, line)
            for line in config.getini("bncheck_model")
        ]
    models = list(dict.fromkeys(models))  # a factory named twice is audited once
    shape = config.option.bncheck_input_shape
    if shape is None:
        shape = _ini(config, "bncheck_input_shape", _input_shape)
    state = _PluginState(_base_settings(config), models, shape)
    config.stash[_STATE] = state
    config.pluginmanager.register(_AuditCollector(state), "bncheck-audit-collector")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(_STATE, None)
    if state is None:
        return []
    lines = [f"bncheck {__version__}: {state.base.describe()}"]
    if state.models:
        shape = ",".join(map(str, state.input_shape)) if state.input_shape else "none"
        lines.append(f"bncheck models: {' '.join(state.models)} (input shape {shape})")
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
                    "it takes select, ignore, fail_on and tolerance names "
                    f"({', '.join(sorted(TOLERANCES))})"
                )
            if key == "fail_on":
                checked[key] = _fail_on(value.value if isinstance(value, Severity) else value)
            elif key == "select":
                checked[key] = _rule_ids(value) if value is not None else None
            elif key == "ignore":
                checked[key] = _ignored_ids(value) if value is not None else None
            else:
                checked[key] = resolve_tolerances({key: value})[key]
    except UsageError as exc:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.bncheck: {exc}") from None
    return checked


def _settings_for(item: pytest.Item) -> BNCheckSettings:
    return item.config.stash[_STATE].base.layered(_marker_overrides(item), "marker")


# ---- the fixtures -----------------------------------------------------------------------------
class BNCheckFixture:
    """The ``bncheck`` fixture: audits with the test's effective settings.

    Settings come from, in order of precedence: the keyword arguments of the call, the
    ``@pytest.mark.bncheck`` marker, the ``--bncheck-*`` options, the ``bncheck_*`` ini keys,
    the defaults. ``settings`` shows them; ``reports`` holds every report of this test.
    """

    def __init__(self, settings: BNCheckSettings, nodeid: str = "") -> None:
        self.settings = settings
        self.nodeid = nodeid
        self.reports: list[Report] = []

    def __repr__(self) -> str:
        return f"<bncheck fixture: {self.settings.describe()}>"

    def audit(self, model: nn.Module, example_input: Any = None, **kwargs: Any) -> Report:
        """:func:`bncheck.audit` with this test's select/ignore/tolerances (``kwargs`` win)."""
        __tracebackhide__ = True
        from .engine import audit

        options = self.settings.audit_kwargs()
        if "select" in kwargs and "ignore" not in kwargs and options.get("ignore"):
            # the call's own selection wins over an inherited ignore of the same rules
            chosen = set(resolve_rule_ids(kwargs["select"]))
            kept = [r for r in _as_list(options["ignore"]) if r not in chosen]
            options["ignore"] = kept or None
        options.update(kwargs)
        options.setdefault("source", self.nodeid or None)
        report = audit(model, example_input, **options)
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
        threshold = (
            self.settings.fail_on
            if fail_on is None
            else _fail_on(fail_on.value if isinstance(fail_on, Severity) else fail_on)
        )
        report = self.audit(model, example_input, **kwargs)
        if report.failed(threshold):
            raise BNCheckFailure(failure_text(report, threshold, title="bncheck"), report)
        if report.forward_error is not None:
            raise BNCheckFailure(
                f"bncheck: the model's forward pass failed ({report.forward_error}), so the "
                "forward rules could not run - check the example input's shape and dtype",
                report,
            )
        return report


@pytest.fixture
def bncheck(request: pytest.FixtureRequest) -> BNCheckFixture:
    """Audit models with this test's bncheck settings: ``bncheck.audit(model, x)``,
    ``bncheck.assert_ok(model, x)``."""
    return BNCheckFixture(_settings_for(request.node), request.node.nodeid)


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
        for audit_report in audits:
            for finding in audit_report.findings:
                as_dict = finding.to_dict()
                if as_dict not in findings:
                    findings.append(as_dict)
        setattr(report, REPORT_ATTRIBUTE, {"audits": len(audits), "findings": findings})
    return report


class _AuditCollector:
    """Collects the audits of every test report (local or from xdist workers)."""

    def __init__(self, state: _PluginState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        audited = getattr(report, REPORT_ATTRIBUTE, None)
        if isinstance(audited, dict):
            self.state.audited.append((report.nodeid, audited))


# ---- zero-code mode ---------------------------------------------------------------------------
def _resolve_factory(spec: str, config: pytest.Config) -> Any:
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

        settings = self.config.stash[_STATE].base
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
    """The summary: one count line, then per test its findings, one line per rule (the first
    10 rules unless -v)."""
    audits = 0
    by_test: dict[str, list[Finding]] = {}
    for nodeid, record in audited:
        audits += int(record.get("audits", 0))
        findings = by_test.setdefault(nodeid, [])
        for data in record.get("findings", ()):
            finding = Finding.from_dict(data)
            if finding not in findings:
                findings.append(finding)
    everything = [f for fs in by_test.values() for f in fs]
    counts = {s.value: sum(f.severity is s for f in everything) for s in Severity}
    lines = [
        f"{audits} audit{'s' if audits != 1 else ''} in {len(by_test)} "
        f"test{'s' if len(by_test) != 1 else ''}: {counts['error']} error(s), "
        f"{counts['warning']} warning(s), {counts['info']} info"
    ]
    for nodeid, findings in by_test.items():
        if not findings:
            continue
        lines.append(nodeid)
        groups: dict[tuple[str, str], list[Finding]] = {}
        for f in findings:
            groups.setdefault((f.severity.value, f.rule), []).append(f)
        entries = list(groups.items())
        shown = entries if verbose else entries[:_SUMMARY_LIMIT]
        for (severity, rule), group in shown:
            where = ""
            if len(group) > 1:
                names = [f.layer or "(model)" for f in group]
                more = f", +{len(names) - 3}" if len(names) > 3 else ""
                where = f"{len(group)} findings ({', '.join(names[:3])}{more}); first: "
            lines.append(f"  {severity:<7} {rule:<26} {where}{group[0].message}")
        if len(shown) < len(entries):
            lines.append(f"  ... +{len(entries) - len(shown)} more rules (-v shows all)")
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

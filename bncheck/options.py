"""The options the command line and the pytest plugin share: one definition, one validation.

Every shared setting (rule ids, ``fail-on``, tolerances, per-layer ignores, the input shape, the
baseline file, architecture arguments) is parsed here, so ``bncheck audit --select X``,
``pytest --bncheck-select X``, ``bncheck_select = X`` in an ini file, ``select = ["X"]`` in
``[tool.bncheck]`` and ``@pytest.mark.bncheck(select="X")`` accept exactly the same values and
reject bad ones with the same one-line message. :data:`OPTIONS` lists them with the name each
front end gives them.

Each validator raises :class:`bncheck.UsageError` with one line that does not name the option
(the caller prefixes where the value came from: ``--fail-on``, ``pyproject.toml: fail-on``).

This module imports no torch: the plugin imports it in every pytest session.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import UsageError, did_you_mean
from .report import FAIL_ON_CHOICES

__all__ = [
    "OPTIONS",
    "Option",
    "ZOO_PREFIXES",
    "arch_arg",
    "arch_args",
    "baseline_path",
    "command_line",
    "fail_on",
    "ignored_ids",
    "input_shape",
    "model_spec",
    "parse_shape",
    "per_layer_ignore",
    "per_layer_ignores",
    "rule_ids",
    "split_ids",
    "tolerance_pair",
    "tolerances",
]

#: ``--arch`` / ``--bncheck-model`` prefixes naming a model zoo instead of a Python module.
ZOO_PREFIXES = ("torchvision", "timm")
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FACTORY = re.compile(rf"^{_DOTTED}:{_DOTTED}$")
_IDENTIFIER = re.compile(r"^[A-Za-z_]\w*$")


# ---- rule ids --------------------------------------------------------------------------------
def split_ids(value: Any) -> list[str]:
    """Rule ids from a comma-separated string or an iterable of such strings (blanks dropped)."""
    if value is None:
        return []
    if isinstance(value, str):
        items: Iterable[Any] = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            raise UsageError(
                f"expected rule ids (a comma-separated string or a list of them), got "
                f"{type(value).__name__} {value!r}"
            ) from None
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UsageError(f"expected rule ids as strings, got {type(item).__name__} {item!r}")
        out.extend(part.strip() for part in item.split(",") if part.strip())
    return out


def rule_ids(value: Any) -> tuple[str, ...]:
    """Rule ids to run (``all`` is every rule); an unknown id names the closest one."""
    from .checks.registry import resolve_rule_ids

    ids = split_ids(value)
    if not ids:
        raise UsageError("names no rule; give rule ids or 'all'")
    resolve_rule_ids(select=ids)
    return tuple(ids)


def ignored_ids(value: Any) -> tuple[str, ...]:
    """Rule ids not to run; ``all`` is refused (it would check nothing)."""
    from .checks.registry import resolve_rule_ids

    ids = rule_ids(value)
    if "all" in ids:
        resolve_rule_ids(ignore=ids)  # raises the UsageError that says why
    return ids


# ---- severity and tolerances -----------------------------------------------------------------
def fail_on(value: Any) -> str:
    """``error``, ``warning``, ``info`` or ``never`` (any case; a Severity is accepted too)."""
    raw = getattr(value, "value", value)
    if not isinstance(raw, str):
        raise UsageError(
            f"expected one of {', '.join(FAIL_ON_CHOICES)}, got {type(raw).__name__} {raw!r}"
        )
    text = raw.strip().lower()
    if text not in FAIL_ON_CHOICES:
        raise UsageError(
            f"{raw!r} is not one of {', '.join(FAIL_ON_CHOICES)}"
            f"{did_you_mean(text, FAIL_ON_CHOICES)}"
        )
    return text


def tolerances(value: Any) -> dict[str, float | int]:
    """A mapping of tolerance name to number (``-`` in names is read as ``_``), validated."""
    from .checks.registry import resolve_tolerances

    if not isinstance(value, Mapping):
        raise UsageError(
            f"expected a table of NAME = number (e.g. ema_rtol = 2), got {type(value).__name__}"
        )
    named = {str(k).strip().replace("-", "_"): v for k, v in value.items()}
    resolved = resolve_tolerances(named)
    return {name: resolved[name] for name in named}


def tolerance_pair(text: Any) -> tuple[str, float | int]:
    """``"ema_rtol=2"`` -> ``("ema_rtol", 2.0)``."""
    from .checks.catalogue import TOLERANCES

    name, sep, raw = str(text).partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(
            f"{text!r} is not NAME=VALUE (e.g. ema_rtol=2); known tolerances: "
            f"{', '.join(sorted(TOLERANCES))}"
        )
    return next(iter(tolerances({name: raw.strip()}).items()))


# ---- per-layer ignores -----------------------------------------------------------------------
def _glob(pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern.strip():
        raise UsageError(
            f"expected a glob on qualified layer names (e.g. 'features.*'), got {pattern!r}"
        )
    return pattern.strip()


def per_layer_ignore(text: Any) -> tuple[str, tuple[str, ...]]:
    """``"features.*:bias-before-bn,small-batch"`` -> ``("features.*", (ids...))``.

    The rule ids follow the last ``:`` (a rule id never holds one); ``all`` is every rule.
    """
    glob, sep, ids = str(text).rpartition(":")
    if not sep or not glob.strip() or not ids.strip():
        raise UsageError(f"{text!r} is not GLOB:RULE[,RULE] (e.g. 'features.*:bias-before-bn')")
    return _glob(glob), rule_ids(ids)


def per_layer_ignores(value: Any) -> dict[str, tuple[str, ...]]:
    """A table from layer glob to rule ids, or a list of ``GLOB:RULE[,RULE]`` strings."""
    if isinstance(value, Mapping):
        out: dict[str, tuple[str, ...]] = {}
        for glob, ids in value.items():
            try:
                out[_glob(glob)] = rule_ids(ids)
            except UsageError as exc:
                raise UsageError(f"{glob!r}: {exc}") from None
        return out
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Sequence):
        merged: dict[str, tuple[str, ...]] = {}
        for item in value:
            glob, ids = per_layer_ignore(item)
            merged[glob] = tuple(dict.fromkeys((*merged.get(glob, ()), *ids)))
        return merged
    raise UsageError(
        "expected a table from layer glob to rule ids, e.g. {'features.*': ['bias-before-bn']}, "
        f"got {type(value).__name__}"
    )


# ---- input shape ------------------------------------------------------------------------------
def parse_shape(value: Any) -> tuple[int, ...]:
    """Positive integer sizes: ``"8,3,32,32"``, ``"8x3x32x32"`` or a list of integers."""
    if isinstance(value, (list, tuple)):
        parts: list[Any] = list(value)
    else:
        parts = [p.strip() for p in str(value).replace("x", ",").split(",")]
    try:
        shape = tuple(
            int(p) if not isinstance(p, (bool, float)) else int("not an int") for p in parts
        )
    except (TypeError, ValueError):
        raise UsageError(
            f"bad shape {value!r}: expected comma-separated positive integers such as 8,3,32,32"
        ) from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"bad shape {value!r}: every size must be >= 1")
    return shape


def input_shape(value: Any, batch_size: int | None = None) -> tuple[int, ...]:
    """The shape of an input batch, batch dimension first: ``N,C[,D...]`` (at least two sizes).

    The one rule both front ends apply. With ``batch_size`` (the CLI's ``--batch-size``) the
    value omits the batch dimension (``C[,D...]``) and ``batch_size`` is put in front.
    """
    shape = parse_shape(value)
    if batch_size is not None:
        shape = (batch_size, *shape)
    if len(shape) < 2:
        raise UsageError(
            f"{','.join(map(str, shape))} has no batch dimension: give N,C[,H,W] (batch size "
            "first, e.g. 8,3,32,32)"
        )
    return shape


# ---- architectures and baselines --------------------------------------------------------------
def model_spec(value: Any) -> str:
    """``pkg.module:callable``, ``torchvision:NAME`` or ``timm:NAME``."""
    text = str(value).strip()
    if not _FACTORY.match(text):
        raise UsageError(
            f"{value!r} is not a model spec; give module:callable (e.g. "
            "mypkg.models:build_model or bncheck.models:vgg16_bn_small), torchvision:NAME "
            "or timm:NAME"
        )
    return text


def arch_arg(text: Any) -> tuple[str, Any]:
    """``"num_classes=10"`` -> ``("num_classes", 10)``.

    The value is read with :func:`ast.literal_eval` (numbers, strings, True/False/None,
    tuples, lists, dicts); anything that is not a Python literal is passed as a string.
    """
    name, sep, raw = str(text).partition("=")
    name = name.strip()
    if not sep or not _IDENTIFIER.match(name):
        raise UsageError(f"{text!r} is not NAME=VALUE (e.g. num_classes=10)")
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = raw
    return name, value


def arch_args(value: Any) -> dict[str, Any]:
    """A table of keyword arguments for the factory, or a list of ``NAME=VALUE`` strings."""
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            if not isinstance(name, str) or not _IDENTIFIER.match(name):
                raise UsageError(f"{name!r} is not a keyword argument name")
            out[name] = item
        return out
    if isinstance(value, str):
        value = [value]
    if isinstance(value, Sequence):
        return dict(arch_arg(item) for item in value)
    raise UsageError(f"expected a table of NAME = value, got {type(value).__name__}")


def baseline_path(value: Any) -> str:
    """A file name (the file need not exist yet)."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"expected a file name, got {value!r}")
    return value.strip()


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"expected a non-empty string, got {value!r}")
    return value.strip()


# ---- the table of shared options ---------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One shared setting and the name each front end gives it."""

    key: str  #: the ``[tool.bncheck]`` key
    dest: str  #: the Python name (keyword argument, settings attribute)
    parse: Callable[[Any], Any]  #: validator: raw value -> value, or UsageError
    cli: str | None  #: ``bncheck audit`` flag
    pytest: str | None  #: pytest plugin flag
    help: str


OPTIONS: dict[str, Option] = {
    o.key: o
    for o in (
        Option("select", "select", rule_ids, "--select", "--bncheck-select", "rule ids to run"),
        Option("ignore", "ignore", ignored_ids, "--ignore", "--bncheck-ignore", "rule ids to skip"),
        Option(
            "fail-on",
            "fail_on",
            fail_on,
            "--fail-on",
            "--bncheck-fail-on",
            "severity at or above which an audit fails",
        ),
        Option(
            "tolerances",
            "tolerances",
            tolerances,
            None,
            "--bncheck-tolerance",
            "table of tolerance overrides",
        ),
        Option(
            "per-layer-ignores",
            "per_layer_ignores",
            per_layer_ignores,
            "--per-layer-ignores",
            "--bncheck-per-layer-ignores",
            "table from layer glob to rule ids not to report there",
        ),
        Option(
            "input-shape",
            "input_shape",
            input_shape,
            "--input-shape",
            "--bncheck-input-shape",
            "input batch shape N,C[,H,W]",
        ),
        Option("arch", "arch", _string, "--arch", None, "architecture of a state dict"),
        Option("arch-args", "arch_args", arch_args, "--arch-arg", None, "factory arguments"),
        Option(
            "baseline",
            "baseline",
            baseline_path,
            "--baseline",
            "--bncheck-baseline",
            "baseline file of accepted findings",
        ),
    )
}


def command_line(
    *,
    prefix: str = "--bncheck-",
    fail_on: str | None = None,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    tolerances: Mapping[str, float | int] | None = None,
    per_layer_ignores: Mapping[str, Sequence[str]] | None = None,
    baseline: str | None = None,
) -> str:
    """The options that reproduce these settings, quoted for a POSIX shell.

    ``prefix`` is ``--bncheck-`` for pytest and ``--`` for ``bncheck audit``.
    """
    parts: list[str] = []
    if fail_on is not None:
        parts.append(f"{prefix}fail-on={fail_on}")
    if select is not None:
        parts.append(f"{prefix}select={','.join(select)}")
    if ignore:
        parts.append(f"{prefix}ignore={','.join(ignore)}")
    tolerance_flag = f"{prefix}tolerance" if prefix != "--" else "--tolerance"
    for name, value in sorted((tolerances or {}).items()):
        parts.append(f"{tolerance_flag}={name}={value:g}")
    for glob, ids in (per_layer_ignores or {}).items():
        parts.append(f"{prefix}per-layer-ignores={glob}:{','.join(ids)}")
    if baseline is not None:
        parts.append(f"{prefix}baseline={baseline}")
    return " ".join(shlex.quote(p) for p in parts)

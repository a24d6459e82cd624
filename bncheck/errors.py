"""Exceptions and warnings raised by bncheck.

Every error bncheck raises on bad input derives from :class:`BNCheckError` and carries a
one-line message that says what is wrong and what to do about it. Front ends (the CLI, the
pytest plugin) print that line instead of a traceback.

This module imports nothing heavy: the pytest plugin imports it in every test session.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .report import Report

__all__ = [
    "BNCheckError",
    "BNCheckFailure",
    "BNCheckWarning",
    "ConformanceFailure",
    "InputError",
    "LoadError",
    "NoBatchNormError",
    "UsageError",
    "did_you_mean",
    "first_line",
]


class BNCheckError(Exception):
    """Base class of every error bncheck raises on bad input or bad usage."""


class UsageError(BNCheckError, ValueError):
    """A wrong argument: an unknown rule id, tolerance, format or option value."""


class InputError(BNCheckError, ValueError):
    """The example input cannot be used (NaN values, wrong shape for the model, ...)."""


class NoBatchNormError(BNCheckError, ValueError):
    """The model has no BatchNorm-like layer, so there is nothing to check."""


class LoadError(BNCheckError, OSError):
    """A file could not be read or loaded as a model or checkpoint."""


class BNCheckFailure(AssertionError):
    """A BN check failed. ``str(failure)`` is the findings table; ``.report`` the full report."""

    def __init__(self, message: str, report: Report | None = None) -> None:
        super().__init__(message)
        self.report = report


class ConformanceFailure(BNCheckFailure):
    """A custom BN layer differs from PyTorch's BatchNorm (raised by ``check_conformance``)."""


# Shown (in tracebacks and pytest's failure lines) under the public module users import them
# from; bncheck.testing re-exports both, so pickling by that name works too.
BNCheckFailure.__module__ = "bncheck.testing"
ConformanceFailure.__module__ = "bncheck.testing"


class BNCheckWarning(UserWarning):
    """A BN problem found while training (emitted by ``bncheck.Monitor`` in warnings mode)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` if none is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


def first_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: first line of its message``."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def message_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's
    name when the message is empty: for texts that name the type themselves."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__

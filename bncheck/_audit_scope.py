"""Which modules bncheck's own audit passes are running on right now.

``bncheck.audit`` runs forward passes on the user's model (in train mode, under ``no_grad``)
and restores every buffer afterwards. A ``bncheck.Monitor`` watching the same model must not
take those passes for the user's training: while :func:`scope` is active for a model,
:func:`active` is True for that model and each of its submodules, and the Monitor ignores
their calls.

The scope is :func:`bncheck.state.audit_pass`'s :class:`contextvars.ContextVar`, so it holds
for the thread (or task) that runs the audit: another thread training the same model
meanwhile is still watched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Token

from torch import nn

from .state import _AUDITING as _SCOPE

__all__ = ["scope", "enter", "exit", "active"]

# ``_SCOPE`` is the one record of modules under an audit in this context (empty: no audit
# running): :func:`bncheck.audit` enters it through :func:`bncheck.state.audit_pass`, and
# :func:`bncheck.state.auditing` reads the same variable as :func:`active`.


def enter(model: nn.Module) -> Token[frozenset[int]]:
    """Mark ``model`` and its submodules as under an audit; pass the token to :func:`exit`."""
    ids = frozenset(id(m) for m in model.modules())
    return _SCOPE.set(_SCOPE.get() | ids)


def exit(token: Token[frozenset[int]]) -> None:  # noqa: A001 - pairs with enter()
    """End the scope that :func:`enter` returned ``token`` for."""
    _SCOPE.reset(token)


@contextmanager
def scope(model: nn.Module) -> Iterator[None]:
    """``with scope(model):`` bncheck's own passes on ``model`` run inside."""
    token = enter(model)
    try:
        yield
    finally:
        exit(token)


def active(module: nn.Module) -> bool:
    """True while a bncheck audit runs passes on ``module`` (or a model that contains it)."""
    scoped = _SCOPE.get()
    return bool(scoped) and id(module) in scoped

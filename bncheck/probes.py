"""The audit's forward passes and what they observe (tracing, statistics, eval checks).

``collect(ctx)`` is called by the engine inside ``bncheck.state.preserved`` and returns the
observations the forward rules (``bncheck.checks.forward``) read as ``ctx.forward``.
"""

from __future__ import annotations

from typing import Any

from .context import AuditContext

__all__ = ["collect"]


def collect(ctx: AuditContext) -> Any:
    """Run the audit's forward passes on ``ctx.example_input`` (not implemented yet)."""
    return None

"""A thin Lightning-style callback over :class:`bncheck.Monitor`.

This module imports no Lightning package. :class:`MonitorCallback` has the hook methods
Lightning calls (``on_fit_start``, ``on_fit_end``, ``on_exception``) and works with any
trainer that has an ``optimizers`` list; :func:`lightning_callback` returns an instance that
also subclasses Lightning's ``Callback`` (``lightning.pytorch`` or ``pytorch_lightning``,
imported when it is called)::

    from bncheck.lightning import lightning_callback
    cb = lightning_callback(warn=True)
    trainer = L.Trainer(callbacks=[cb]); trainer.fit(module)
    print(cb.report)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .monitor import Monitor
from .report import Report

__all__ = ["MonitorCallback", "lightning_callback"]


class MonitorCallback:
    """Attach a Monitor when fitting starts; detach it and keep its report when fitting ends.

    ``monitor_kwargs`` are passed to :class:`bncheck.Monitor` (``warn``, ``sync_every``,
    ``select``, tolerances, ...). The first optimizer of the trainer is the one watched.
    Under DDP, ``on_fit_end`` runs on every rank, so the report's collective is safe; the
    merged report is on rank 0.
    """

    def __init__(self, **monitor_kwargs: Any) -> None:
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.report: Report | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        optimizer = optimizers[0] if optimizers else None
        self.monitor = Monitor(pl_module, optimizer=optimizer, **self.monitor_kwargs).attach()

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.monitor is None:
            return
        self.monitor.detach()
        self.report = self.monitor.report()

    def on_exception(self, trainer: Any, pl_module: nn.Module, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.__exit__(type(exception), exception, None)  # hooks off, no checks


def lightning_callback(**monitor_kwargs: Any) -> MonitorCallback:
    """A :class:`MonitorCallback` that is also a Lightning ``Callback`` (for ``Trainer``)."""
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback  # type: ignore[assignment]
        except ImportError:
            raise ImportError(
                "bncheck.lightning.lightning_callback needs Lightning (pip install lightning); "
                "without it, use bncheck.lightning.MonitorCallback or bncheck.Monitor directly"
            ) from None
    cls = type("BNCheckCallback", (MonitorCallback, Callback), {})
    return cls(**monitor_kwargs)  # type: ignore[no-any-return]

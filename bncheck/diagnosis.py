"""Known mistakes of hand-written BatchNorm layers, recognised from the numbers.

One place for the diagnosis that both the ``ema-update`` rule (:mod:`bncheck.checks.forward`)
and :func:`bncheck.testing.check_conformance` give when a running statistic did not follow
PyTorch's update ``new = (1 - m) * old + m * batch`` (the unbiased batch variance for
``running_var``). Pure numpy; imports no torch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["running_update_mistake"]


def _close(observed: np.ndarray, candidate: np.ndarray, tol: np.ndarray | float) -> bool:
    return bool((np.abs(observed - candidate) <= tol).all())


def running_update_mistake(
    name: str,
    observed: np.ndarray,
    old: np.ndarray,
    batch: np.ndarray,
    factor: float,
    tol: np.ndarray | float,
    *,
    biased_var: np.ndarray | None = None,
    n: int | None = None,
    momentum_none: bool = False,
    estimate_momentum: bool = False,
) -> str | None:
    """Which known mistake ``observed`` (the value of buffer ``name`` after one train-mode
    forward) matches, or ``None``.

    ``old`` is the value before, ``batch`` the batch statistic PyTorch would blend in
    (mean, or unbiased variance), ``factor`` the blend factor (momentum, or
    ``1 / num_batches_tracked`` when ``momentum_none``), ``tol`` the allowed difference,
    ``biased_var`` and ``n`` the biased batch variance and the number of values per channel.
    With ``estimate_momentum`` a value that moved as with another momentum is named too.
    """
    f = factor
    # checked first: with momentum=None the first factor is 1, and the Keras rule then keeps
    # the old value, which is how that mistake shows
    keras_possible = 0 < f < 1 or (f == 1 and momentum_none)
    if keras_possible and _close(observed, f * old + (1 - f) * batch, tol):
        return (
            f"it matches the Keras convention (new = {f:g} * old + {1 - f:g} * batch); "
            "PyTorch's momentum weights the new batch"
        )
    if _close(observed, old, tol):
        return "it was not updated (unchanged); a train-mode forward must update it"
    if (
        name == "running_var"
        and biased_var is not None
        and _close(observed, (1 - f) * old + f * biased_var, tol)
    ):
        times = f" (times n/(n-1), n = {n})" if n is not None else ""
        return (
            "it matches storing the biased batch variance; PyTorch stores the unbiased one" + times
        )
    if momentum_none and _close(observed, 0.9 * old + 0.1 * batch, tol):
        return (
            "it matches momentum=0.1; with momentum=None PyTorch takes the cumulative average "
            "(factor 1/num_batches_tracked)"
        )
    if estimate_momentum:
        delta = batch - old
        moved = np.abs(delta) > 1e-6 * (np.abs(old) + np.abs(batch) + 1e-12)
        if moved.any():
            m_eff = float(np.median((observed - old)[moved] / delta[moved]))
            if _close(observed, (1 - m_eff) * old + m_eff * batch, np.asarray(tol) * 4):
                return f"it moved as with momentum {m_eff:.3g} instead of {f:.3g}"
    return None

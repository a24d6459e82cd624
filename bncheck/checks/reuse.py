"""Whether the calls of one reused BN layer see different distributions (``bn-reused``).

``bn-reused`` claims that a BN module called at several places "blends different activation
distributions". That holds for one BN across the time steps of a recurrent loop or across
two different convolutions; it does not for one encoder applied to two augmented views
(SimSiam, BYOL), a siamese encoder, or ghost / virtual batch norm (TabNet: one BN applied to
chunks of one batch), where every call sees the same distribution and the blend is the
right statistic. :func:`calls_differ` tells the two apart from the per-channel statistics of
each call's input (means and variances), beyond sampling noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["calls_differ", "calls_alike", "pair_z", "DIFFER_Z", "DIFFER_FRACTION"]

#: A channel whose batch means are further apart than this many standard errors differs;
#: the calls differ when at least ``DIFFER_FRACTION`` of the channels do.
DIFFER_Z = 4.0
DIFFER_FRACTION = 0.25


def pair_z(mean_a: Any, var_a: Any, n_a: int, mean_b: Any, var_b: Any, n_b: int) -> torch.Tensor:
    """Per channel, ``|mean_a - mean_b| / sqrt(var_a / n_a + var_b / n_b)``.

    ``n`` is the batch size, not the number of values per channel (neighbouring values of a
    feature map are correlated, so N x H x W would understate the noise), and ``var`` the
    variance over the batch of the per-sample channel means (Welch's test), or, when only
    that is known, the channel's variance over all its values, which bounds it (then the
    test errs towards "same distribution").
    """
    ma, mb = (
        torch.as_tensor(mean_a, dtype=torch.float64),
        torch.as_tensor(mean_b, dtype=torch.float64),
    )
    va, vb = (
        torch.as_tensor(var_a, dtype=torch.float64),
        torch.as_tensor(var_b, dtype=torch.float64),
    )
    se = (va.clamp(min=0) / max(n_a, 1) + vb.clamp(min=0) / max(n_b, 1)).sqrt()
    diff = (ma - mb).abs()
    # equal means are never different; a difference with no noise at all always is
    return torch.where(diff == 0, torch.zeros_like(diff), diff / se.clamp(min=1e-300))


def calls_differ(calls: Sequence[Any]) -> bool | None:
    """Whether any two of ``calls`` see different distributions (None: cannot tell).

    Each call needs ``input_stats`` (``mean``, ``var`` per channel) and ``batch_size``, as
    :class:`bncheck.probes.TrainCall` has them. When ``input_stats`` also has
    ``sample_var`` (the variance over the batch of the per-sample channel means), the test
    is Welch's with the exact sampling noise of a batch mean, spatial correlation included;
    otherwise ``var`` bounds it (see :func:`pair_z`) and the test errs towards "same".
    """
    usable = [
        c
        for c in calls
        if getattr(c, "input_stats", None) is not None and getattr(c, "batch_size", 0) >= 2
    ]
    if len(usable) < 2:
        return None
    for a, b in itertools.combinations(usable, 2):
        sa, sb = a.input_stats, b.input_stats
        if sa.mean.shape != sb.mean.shape:
            return True  # different channel counts cannot be one distribution
        va = getattr(sa, "sample_var", None)
        vb = getattr(sb, "sample_var", None)
        if va is None or vb is None:
            va, vb = sa.var, sb.var
        z = pair_z(sa.mean, va, a.batch_size, sb.mean, vb, b.batch_size)
        if float((z > DIFFER_Z).double().mean()) >= DIFFER_FRACTION:
            return True
        # the variances too: a running_var blended from two scales is as wrong as a blended
        # mean (the same conv applied again at another depth often keeps the mean near 0)
        qa = getattr(sa, "sample_sq_var", None)
        qb = getattr(sb, "sample_sq_var", None)
        if qa is not None and qb is not None:
            zv = pair_z(sa.var, qa, a.batch_size, sb.var, qb, b.batch_size)
            if float((zv > DIFFER_Z).double().mean()) >= DIFFER_FRACTION:
                return True
    return False


#: Calls are "alike" when, in at least this fraction of the channels, their means are within
#: ``ALIKE_MEAN`` standard deviations and their variances within a factor ``ALIKE_VAR``.
ALIKE_FRACTION = 0.75
ALIKE_MEAN = 0.5
ALIKE_VAR = 2.0


def calls_alike(calls: Sequence[Any]) -> bool:
    """Positive evidence that ``calls`` see one distribution: no difference beyond sampling
    noise (:func:`calls_differ` is False) *and* small effect sizes (means within half a
    standard deviation, variances within a factor 2: what batch-to-batch noise of a BN1d layer at
    batch 32 reaches) in most channels. A small batch whose noise hides a real difference (one
    conv applied again at another depth, with 3x the variance) is therefore not taken as "one
    distribution"."""
    if calls_differ(calls) is not False:
        return False
    usable = [c for c in calls if getattr(c, "input_stats", None) is not None]
    for a, b in itertools.combinations(usable, 2):
        sa, sb = a.input_stats, b.input_stats
        va = torch.as_tensor(sa.var, dtype=torch.float64).clamp(min=1e-300)
        vb = torch.as_tensor(sb.var, dtype=torch.float64).clamp(min=1e-300)
        diff = (
            torch.as_tensor(sa.mean, dtype=torch.float64)
            - torch.as_tensor(sb.mean, dtype=torch.float64)
        ).abs()
        close_mean = diff <= ALIKE_MEAN * torch.maximum(va, vb).sqrt()
        close_var = torch.maximum(va, vb) / torch.minimum(va, vb) <= ALIKE_VAR
        if float((close_mean & close_var).double().mean()) < ALIKE_FRACTION:
            return False
    return True

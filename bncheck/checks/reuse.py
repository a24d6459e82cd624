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
import math
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
        elif float(_var_apart(sa.var, a.batch_size, sb.var, b.batch_size).mean()) >= (
            DIFFER_FRACTION
        ):
            return True
    return False


def _var_apart(var_a: Any, n_a: int, var_b: Any, n_b: int) -> torch.Tensor:
    """Per channel, whether two variances differ without the per-sample spread that measures
    their noise: more than ``ALIKE_VAR_CAP`` apart and more than ``DIFFER_Z`` standard errors
    of log(var_a / var_b) by normal theory (about 2 / (n - 1) each, n the batch size: the
    samples are independent, the values of one feature map are not)."""
    va, vb = _t(var_a).clamp(min=1e-300), _t(var_b).clamp(min=1e-300)
    log_ratio = (va / vb).log().abs()
    se = (2 / max(n_a - 1, 1) + 2 / max(n_b - 1, 1)) ** 0.5
    return ((log_ratio > DIFFER_Z * se) & (log_ratio > math.log(ALIKE_VAR_CAP))).double()


#: Calls are "alike" when, in at least ``ALIKE_FRACTION`` of the channels, their means are
#: within ``ALIKE_MEAN`` standard deviations and their variances within a factor
#: ``ALIKE_VAR``, widened to ``ALIKE_NOISE`` standard errors of the difference where sampling
#: noise is larger; a channel whose noise would need more than ``ALIKE_MEAN_CAP`` standard
#: deviations or a factor ``ALIKE_VAR_CAP`` cannot tell, and does not count as alike.
ALIKE_FRACTION = 0.75
ALIKE_MEAN = 0.5
ALIKE_VAR = 2.0
ALIKE_NOISE = 3.0
ALIKE_MEAN_CAP = 1.0
ALIKE_VAR_CAP = 4.0


def _t(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def _alike_channels(a: Any, b: Any) -> torch.Tensor:
    """Per channel, whether calls ``a`` and ``b`` agree in mean and variance (see above)."""
    sa, sb = a.input_stats, b.input_stats
    na, nb = max(getattr(a, "batch_size", 1) or 1, 1), max(getattr(b, "batch_size", 1) or 1, 1)
    va, vb = _t(sa.var).clamp(min=1e-300), _t(sb.var).clamp(min=1e-300)
    std = torch.maximum(va, vb).sqrt()
    # the noise of the means: the spread of the per-sample means (else the variance bounds it)
    ma_noise = _t(getattr(sa, "sample_var", None) if sa.sample_var is not None else sa.var)
    mb_noise = _t(getattr(sb, "sample_var", None) if sb.sample_var is not None else sb.var)
    se_mean = (ma_noise.clamp(min=0) / na + mb_noise.clamp(min=0) / nb).sqrt()
    mean_bound = torch.maximum(ALIKE_MEAN * std, ALIKE_NOISE * se_mean)
    close_mean = ((_t(sa.mean) - _t(sb.mean)).abs() <= mean_bound) & (
        ALIKE_NOISE * se_mean <= ALIKE_MEAN_CAP * std
    )
    # the noise of the variances, as the standard error of log(var_a / var_b)
    qa, qb = getattr(sa, "sample_sq_var", None), getattr(sb, "sample_sq_var", None)
    if qa is not None and qb is not None:
        rel = (_t(qa).clamp(min=0) / na / va**2 + _t(qb).clamp(min=0) / nb / vb**2).sqrt()
    else:  # normal data: var(log s^2) is about 2 / (n - 1) with n the batch size
        rel = torch.full_like(va, (2 / max(na - 1, 1) + 2 / max(nb - 1, 1)) ** 0.5)
    log_ratio = (va / vb).log().abs()
    var_bound = torch.maximum(torch.full_like(rel, math.log(ALIKE_VAR)), ALIKE_NOISE * rel)
    close_var = (log_ratio <= var_bound) & (ALIKE_NOISE * rel <= math.log(ALIKE_VAR_CAP))
    return close_mean & close_var


def calls_alike(calls: Sequence[Any]) -> bool:
    """Positive evidence that ``calls`` see one distribution: no difference beyond sampling
    noise (:func:`calls_differ` is False) *and* small effect sizes in most channels: means
    within half a standard deviation and variances within a factor 2, or within three
    standard errors where the batch is too small for those bounds. A batch whose noise is so
    large that a real difference could hide in it (one conv applied again at another depth,
    with 3x the variance, at batch 4) is not taken as "one distribution"."""
    if calls_differ(calls) is not False:
        return False
    usable = [c for c in calls if getattr(c, "input_stats", None) is not None]
    for a, b in itertools.combinations(usable, 2):
        if float(_alike_channels(a, b).double().mean()) < ALIKE_FRACTION:
            return False
    return True

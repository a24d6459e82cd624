"""Check functions of the rules that need forward passes, a user batch or data.

They read :class:`bncheck.probes.ForwardObservations` (``ctx.forward``) and never run the
model. The numerical rules compare what a layer did with what PyTorch's BatchNorm does,
computed from the layer's input: read by bncheck, or, for a train-mode ``F.batch_norm`` on a
contiguous float32/float64 CPU tensor, the batch statistics PyTorch's kernel returns with its
result (see :mod:`bncheck.probes` for what is recorded). Tolerances are derived from float
round-off of the numbers involved: with ``u = torch.finfo(dtype).eps`` and
``g = 1 + log2(n)`` (n values summed per channel), an error term of size ``u * g * scale`` is
allowed, times a safety factor and the user's ``*_rtol`` multiplier. Every message shows the
observed error and the tolerance used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..context import AuditContext
from ..discovery import BNLayer
from ..probes import ForwardObservations, InputSummary, TrainCall, first_difference, input_origin
from ..render import layer_list
from ..report import Finding
from ..tracing import OpRecord, upstream
from .registry import check
from .reuse import calls_alike, calls_differ
from .static import (
    batch_stats_in_eval,
    channel_list,
    no_running_stats_note,
    statistics_never_move,
    stats_at_init,
    stats_at_initial_values,
)

__all__ = ["normalization_errors", "ema_errors", "NORM_SAFETY", "EMA_SAFETY"]

#: Safety factors on the round-off bounds. Calibrated on 300 random nn.BatchNorm1d/2d/3d
#: layers (eps 1e-8..0.1, offsets up to 1e4 std, |beta|/|gamma| up to 1e4, 2..8192 values per
#: channel): the largest error seen was 0.84 of the bound with factor 1, so 16 leaves a
#: margin of about 19.
NORM_SAFETY = 16.0
EMA_SAFETY = 8.0
#: |gamma| below this (relative to 1 + |beta|) makes a channel's pre-affine output unrecoverable.
GAMMA_FLOOR = 1e-6


def _obs(ctx: AuditContext) -> ForwardObservations | None:
    obs = ctx.forward
    return obs if isinstance(obs, ForwardObservations) else None


def _layers(ctx: AuditContext) -> dict[str, BNLayer]:
    return {layer.name: layer for layer in ctx.layers}


def _first_per_layer(calls: list[TrainCall]) -> Iterator[TrainCall]:
    seen: set[str] = set()
    for call in calls:
        if call.layer not in seen:
            seen.add(call.layer)
            yield call


def _indices(mask: torch.Tensor, limit: int = 32) -> list[int]:
    return torch.nonzero(mask.flatten(), as_tuple=False).flatten()[:limit].tolist()


# ---- tracing rules ---------------------------------------------------------------------------
def _frozen_layer(call: TrainCall, layer: BNLayer | None) -> bool:
    """Whether a call does not normalise with batch statistics: eval mode, or a layer of
    FrozenBatchNorm's signature (no parameters, no counter) whose running buffers the call
    left as they were (a hand-written BN without them that updates its buffers is not)."""
    if not call.training:
        return True
    if layer is None or layer.uses_batch_stats:
        return False
    before, after = call.before, call.after
    return before is None or after is None or not before.changed(after)


def _first_producers(ctx: AuditContext) -> Iterator[tuple[TrainCall, BNLayer | None, OpRecord]]:
    """For each BN layer's first train-mode call: the call, the layer, what produced its input
    (looking through shape-only ops). Calls whose producer is unknown are left out."""
    obs = _obs(ctx)
    if obs is None:
        return
    layers = _layers(ctx)
    for call in _first_per_layer(obs.calls):
        src = upstream(call.trace.producer) if call.trace else None
        if src is not None:
            yield call, layers.get(call.layer), src


@check("bn-after-activation")
def bn_after_activation(ctx: AuditContext) -> Iterator[Finding]:
    for call, layer, src in _first_producers(ctx):
        if src.category != "activation":
            continue
        yield ctx.finding(
            "bn-after-activation",
            layer or call.layer,
            f"its input comes straight from an activation ({src.label}); the original paper "
            "puts BN between the linear op and the nonlinearity",
            hint="fine if intended (the order is debated); when porting weights, match the "
            "source architecture's order; silence with ignore=['bn-after-activation']",
            producer=src.label,
        )


@check("bias-before-bn")
def bias_before_bn(ctx: AuditContext) -> Iterator[Finding]:
    for call, layer, src in _first_producers(ctx):
        if src.category != "linear" or not src.has_bias:
            continue
        if _frozen_layer(call, layer):
            continue  # a frozen BN does not cancel the bias: it may be the only shift
        yield ctx.finding(
            "bias-before-bn",
            layer or call.layer,
            f"its input comes from {src.label} with a bias; the batch-mean subtraction cancels "
            "that bias, so it only costs parameters (beta already provides the shift)",
            hint="construct that layer with bias=False",
            producer=src.label,
        )


@check("dropout-before-bn")
def dropout_before_bn(ctx: AuditContext) -> Iterator[Finding]:
    for call, layer, src in _first_producers(ctx):
        if src.category != "dropout":
            continue
        yield ctx.finding(
            "dropout-before-bn",
            layer or call.layer,
            f"its input comes from dropout ({src.label}, p={src.p:g}); the variance BN sees "
            "in training differs from eval, so running_var does not match eval inputs",
            hint="put dropout after BN (e.g. before the next linear layer)",
            producer=src.label,
            p=src.p,
        )


@check("bn-reused")
def bn_reused(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None:
        return
    layers = _layers(ctx)
    for name, count in obs.call_counts.items():
        if count <= 1:
            continue
        layer = layers.get(name)
        if layer is not None and not layer.has_running_stats and not layer.params:
            continue  # stateless (affine=False, no running stats): nothing is shared
        producers = []
        for call in obs.calls_of(name):
            src = upstream(call.trace.producer) if call.trace else None
            if src is not None and src.label not in producers:
                producers.append(src.label)
        trained = [c for c in obs.calls_of(name) if c.training]
        unread = next((c.sums_unread for c in trained if c.sums_unread), None)
        if len(producers) <= 1 and unread and calls_differ(trained) is not True:
            # one producer: only the calls' statistics can tell intended reuse from a blend,
            # and without the per-sample sums of every call they cannot be compared fairly:
            # a call without them is compared with its variance as the noise of its mean,
            # which can show a difference (then the blend is certain) but not sameness
            ctx.notes.append(
                f"bn-reused: {name} is called {count} times from one producer, but was not "
                f"judged: {unread}; without every call's per-sample statistics, its calls "
                "could not be compared"
            )
            continue
        if len(producers) <= 1 and calls_alike(trained):
            # one producer (two views, a siamese encoder, ghost BN) and batches of one
            # distribution within sampling noise: averaging them is what the recipe wants
            yield ctx.finding(
                "bn-reused",
                layers.get(name, name),
                f"called {count} times in one forward on inputs of one distribution (batch "
                "means within sampling noise): its running statistics average them, as "
                "intended for two views, a siamese encoder or ghost BN",
                severity="info",
                calls=count,
                inputs_from=producers,
                cause="one-distribution",
            )
            continue
        yield ctx.finding(
            "bn-reused",
            layers.get(name, name),
            f"called {count} times in one forward; its running statistics blend "
            f"{count} different activation distributions and eval uses the blend for all",
            hint="give each call site its own BN module (sharing gamma/beta is possible with "
            "separate running statistics)",
            calls=count,
            inputs_from=producers,
        )


# ---- normalization ---------------------------------------------------------------------------
#: The steepest elementwise op after a frozen layer's affine step that it may apply and still
#: be recognised as frozen: ``|f(a) - f(b)| <= ELEMENTWISE_SLOPE * |a - b|``. Activations have
#: slopes up to about 1 (ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Mish, Tanh), 1.5 (Hardswish)
#: and 1.76 (SELU).
ELEMENTWISE_SLOPE = 2.0


@np.errstate(all="ignore")  # NaN/Inf statistics are judged, not warned about
def _behaves_frozen(call: TrainCall, layer: BNLayer | None = None) -> bool:
    """A custom layer that normalises with its running statistics even in train mode.

    Its output's channel moments are those of the affine map with the running statistics,
    ``gamma * (x - running_mean) / sqrt(running_var + eps) + beta``; or, for a layer with
    FrozenBatchNorm's signature (``layer`` given: no parameters, no ``num_batches_tracked``)
    whose output is the module's own (``norm_source == "module"``), that map followed by one
    elementwise op in the same module (timm's FrozenBatchNormAct2d: an activation), which
    moves the moments (see :func:`_frozen_then_elementwise`).
    """
    if (
        call.standard
        or call.before is None
        or call.input_stats is None
        or call.output_stats is None
    ):
        return False
    if call.after is not None and call.before.changed(call.after):
        return False
    rm, rv = call.before.running_mean, call.before.running_var
    if rm is None or rv is None or rm.shape != call.input_stats.mean.shape:
        return False
    eps = call.eps if call.eps is not None else 1e-5
    gamma, beta = _affine(call)
    denom = (rv.double().cpu() + eps).clamp_min(1e-30)
    exp_mean = gamma * (call.input_stats.mean - rm.double().cpu()) / denom.sqrt() + beta
    exp_var = gamma**2 * call.input_stats.var / denom
    scale_m = (
        gamma.abs() * (call.input_stats.var.sqrt() + call.input_stats.mean.abs()) / denom.sqrt()
        + beta.abs()
        + 1e-12
    )
    ok_mean = ((call.output_stats.mean - exp_mean).abs() <= 1e-3 * scale_m).all()
    ok_var = ((call.output_stats.var - exp_var).abs() <= 1e-3 * (exp_var + 1e-12)).all()
    if bool(ok_mean) and bool(ok_var):
        return True
    return (
        call.norm_source == "module"
        and layer is not None
        and not layer.uses_batch_stats
        and _frozen_then_elementwise(call, rm, rv, eps, gamma, beta)
    )


@np.errstate(all="ignore")  # NaN/Inf statistics are judged, not warned about
def _frozen_then_elementwise(
    call: TrainCall,
    rm: torch.Tensor,
    rv: torch.Tensor,
    eps: float,
    gamma: torch.Tensor,
    beta: torch.Tensor,
) -> bool:
    """Whether the recorded element grid's outputs are one elementwise function ``f`` of the
    frozen affine map ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta`` of
    its inputs, the same ``f`` for every channel, with slope at most ``ELEMENTWISE_SLOPE``.

    The grid's elements of all channels are sorted by ``y``. The channels must interleave:
    ``C`` channels whose ``y`` do not overlap give ``C - 1`` neighbour pairs from two
    channels, and twice that many are asked for (one channel alone, or channels side by side,
    cannot show that they share ``f``). Each neighbour pair must have
    ``|o_j - o_i| <= ELEMENTWISE_SLOPE * (y_j - y_i)`` plus the round-off of the layer's
    ``y`` and ``f(y)`` in its dtype (``u * (|x * scale| + |shift| + |o|)`` per element, times
    ``NORM_SAFETY * ELEMENTWISE_SLOPE``). A layer that normalises with its batch statistics
    maps each channel's ``y`` through an affine map of its own (batch against running
    statistics), so its channels' points do not lie on one curve where their ``y`` overlap.
    """
    gi, go = call.grid_in, call.grid_out
    c = rm.numel()
    if gi is None or go is None or gi.shape != go.shape or gi.dim() != 2 or gi.shape[0] != c:
        return False
    if c < 2 or gi.shape[1] == 0:
        return False
    x, o = gi.numpy(), go.numpy()
    scale = gamma.numpy() / np.sqrt(np.maximum(rv.double().cpu().numpy() + eps, 1e-30))
    shift = beta.numpy() - rm.double().cpu().numpy() * scale
    xs = x * scale[:, None]
    y = xs + shift[:, None]
    if not (np.isfinite(y).all() and np.isfinite(o).all()):
        return False
    roundoff = np.abs(xs) + np.abs(shift)[:, None] + np.abs(o)
    order = np.argsort(y, axis=None, kind="stable")
    channel = order // y.shape[1]
    if np.count_nonzero(channel[1:] != channel[:-1]) < 2 * (c - 1):
        return False
    y_s, o_s, r_s = y.ravel()[order], o.ravel()[order], roundoff.ravel()[order]
    k = NORM_SAFETY * ELEMENTWISE_SLOPE * _unit(call)
    tol = ELEMENTWISE_SLOPE * np.diff(y_s) + k * (r_s[1:] + r_s[:-1])
    return bool((np.abs(np.diff(o_s)) <= tol).all())


def _affine(call: TrainCall) -> tuple[torch.Tensor, torch.Tensor]:
    assert call.input_stats is not None
    c = call.input_stats.mean.numel()
    gamma = (
        call.gamma
        if call.gamma is not None and call.gamma.numel() == c
        else torch.ones(c, dtype=torch.float64)
    )
    beta = (
        call.beta
        if call.beta is not None and call.beta.numel() == c
        else torch.zeros(c, dtype=torch.float64)
    )
    return gamma, beta


def _unit(call: TrainCall) -> float:
    """The unit round-off ``u`` of a call's dtype."""
    return torch.finfo(call.dtype).eps if call.dtype.is_floating_point else 2**-23


#: dtypes whose reductions PyTorch accumulates in float32 (CPU and CUDA kernels alike)
_WIDENED = (torch.float16, torch.bfloat16)


def _reduced_rounding(call: TrainCall, n: int) -> float:
    """The round-off of a value computed from a reduction over ``n`` elements of the call's
    dtype and then rounded to it: u * (1 + log2 n) for float32/float64, whose sums carry
    their own precision; for float16/bfloat16, whose sums PyTorch accumulates in float32,
    one rounding to the narrow type plus float32's share, u + u_32 * (1 + log2 n)."""
    u = _unit(call)
    g = 1 + math.log2(max(2, n))
    if call.dtype in _WIDENED:
        return u + float(torch.finfo(torch.float32).eps) * g
    return u * g


@np.errstate(all="ignore")  # NaN/Inf statistics are judged, not warned about
def normalization_errors(call: TrainCall, rtol: float = 1.0) -> dict[str, Any] | None:
    """Compare one train-mode call with BatchNorm's normalisation; ``None`` when it matches.

    Expected, per channel c with the input's batch mean mu, biased variance var and count n:
    the pre-affine output z = (y - beta) / gamma has mean 0 and biased variance
    var / (var + eps), and every element satisfies z = (x - mu) / sqrt(var + eps) (checked on
    the recorded grid of elements). Tolerances, with a = (|mu| + sqrt(var)) / sqrt(var + eps)
    (input conditioning), b = (|beta| + |gamma|) / |gamma| (affine conditioning),
    e = u*g with u = finfo(dtype).eps and g = 1 + log2(n) (for float16/bfloat16, whose sums
    PyTorch accumulates in float32, e = u + u_32*g: see :func:`_reduced_rounding`), times
    ``NORM_SAFETY * rtol``: mean e*(a + b); variance e*((a + b)*(r + sqrt(r)) + e*(a + b)^2)
    with r the expected variance (the sqrt(r) term: rounding noise of each element
    correlates with z); element e*(a*(1 + |z|) + b + |z|).
    Channels with |gamma| <= GAMMA_FLOOR * (1 + |beta|) are skipped. When the call has no
    ``output_stats`` (PyTorch's own BN classes), only the element grid is checked.
    """
    st_in, st_out = call.input_stats, call.output_stats
    if st_in is None or (st_out is not None and st_in.mean.shape != st_out.mean.shape):
        return None
    # numpy: these are short per-channel vectors, where torch's per-op overhead dominates
    eps = call.eps if call.eps is not None else 1e-5
    gamma_t, beta_t = _affine(call)
    gamma, beta = gamma_t.numpy(), beta_t.numpy()
    usable = np.abs(gamma) > GAMMA_FLOOR * (1 + np.abs(beta))
    if not usable.any():
        return None
    g_safe = np.where(usable, gamma, 1.0)
    mean_in = st_in.mean.numpy()
    var = np.maximum(st_in.var.numpy(), 0.0)
    r = var / (var + eps)
    k = NORM_SAFETY * rtol * _reduced_rounding(call, st_in.count)
    a = (np.abs(mean_in) + np.sqrt(var)) / np.sqrt(var + eps)
    b = (np.abs(beta) + np.abs(gamma)) / np.abs(g_safe)
    parts: list[tuple[str, np.ndarray, np.ndarray]] = []
    z_mean: np.ndarray | None = None
    z_var: np.ndarray | None = None
    if st_out is not None:
        z_mean = (st_out.mean.numpy() - beta) / g_safe
        z_var = st_out.var.numpy() / g_safe**2
        parts.append(("per-channel mean of the pre-affine output", np.abs(z_mean), k * (a + b)))
        parts.append(
            (
                "per-channel variance of the pre-affine output",
                np.abs(z_var - r),
                k * ((a + b) * (r + np.sqrt(r)) + k * (a + b) ** 2),
            )
        )
    if (
        call.grid_in is not None
        and call.grid_out is not None
        and call.grid_in.shape == call.grid_out.shape
        and call.grid_in.shape[0] == gamma.size
    ):
        z_exp = call.grid_in.numpy() - mean_in[:, None]
        z_exp /= np.sqrt(var + eps)[:, None]
        err_el = call.grid_out.numpy() - beta[:, None]
        err_el /= g_safe[:, None]
        err_el -= z_exp
        np.abs(err_el, out=err_el)
        np.abs(z_exp, out=z_exp)  # from here on |z|
        # tolerance k * (a * (1 + |z|) + b + |z|) = k * (a + b) + k * (a + 1) * |z|
        tol_el = z_exp * (k * (a + 1))[:, None]
        tol_el += (k * (a + b))[:, None]
        if (err_el <= tol_el).all() and st_out is None:
            return None  # every element within its tolerance: the common case, no detail
        worst_el = np.argmax(err_el / tol_el, axis=1)[:, None]
        parts.append(
            (
                "output elements vs (x - mean) / sqrt(var + eps)",
                np.take_along_axis(err_el, worst_el, 1)[:, 0],
                np.take_along_axis(tol_el, worst_el, 1)[:, 0],
            )
        )
        if z_mean is None:  # grid-only check: show the grid's own moments
            z_obs = (call.grid_out.numpy() - beta[:, None]) / g_safe[:, None]
            z_mean, z_var = z_obs.mean(1), z_obs.var(1)
    for what, err, tol in parts:
        bad = (err > tol) & usable
        if bad.any():
            worst = int(np.argmax(np.where(bad, err / tol, 0.0)))
            return {
                "what": what,
                "bad": torch.from_numpy(bad),
                "max_error": float(err[worst]),
                "tolerance": float(tol[worst]),
                "channel": worst,
                "observed_mean": float(z_mean[worst]) if z_mean is not None else math.nan,
                "observed_var": float(z_var[worst]) if z_var is not None else math.nan,
                "expected_var": float(r[worst]),
            }
    return None


_OVERFLOW_HINT = (
    "the layer's statistics pass the range of its dtype (float32 max is 3.4e38): normalise "
    "or scale its input down, or run the layer in float64"
)


def _overflows(call: TrainCall) -> bool:
    """Whether the sum of squares of a call's input passes its dtype's range (the layer's
    own statistics then overflow), from bncheck's exact statistics."""
    st = call.input_stats
    if st is None or not call.dtype.is_floating_point:
        return False
    # half types are normalised in float32 arithmetic
    wide = torch.float32 if call.dtype in (torch.float16, torch.bfloat16) else call.dtype
    squares = (st.var.numpy() + st.mean.numpy() ** 2) * st.count
    with np.errstate(all="ignore"):
        return bool((squares > torch.finfo(wide).max).any())


@check("normalization")
def normalization(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None:
        return
    layers = _layers(ctx)
    rtol = ctx.tol("normalization_rtol")
    reported: set[str] = set()
    for call in obs.calls:
        if call.layer in reported or not call.training or call.forced_eval:
            continue
        if _behaves_frozen(call, layers.get(call.layer)):
            continue
        err = normalization_errors(call, rtol)
        if err is None:
            continue
        reported.add(call.layer)
        bad = err["bad"]
        assert isinstance(bad, torch.Tensor)
        hint = (
            "check the axes it reduces over (per channel = every dim but 1) and that it "
            "divides by sqrt(biased var + eps)"
        )
        if _overflows(call):
            hint = _OVERFLOW_HINT
        yield ctx.finding(
            "normalization",
            layers.get(call.layer, call.layer),
            f"train-mode output is not batch-normalised: {err['what']} is off; "
            f"max |obs-exp| = {err['max_error']:.2g} > tol {err['tolerance']:.2g} "
            f"({channel_list(bad)}; channel {err['channel']}: mean {err['observed_mean']:.3g} "
            f"vs 0, var {err['observed_var']:.4g} vs {err['expected_var']:.4g})",
            hint=hint,
            check=err["what"],
            max_error=err["max_error"],
            tolerance=err["tolerance"],
            channels=_indices(bad),
            observed_mean=err["observed_mean"],
            observed_var=err["observed_var"],
            expected_var=err["expected_var"],
            call=call.occurrence,
            source=call.norm_source,
        )


# ---- ema-update ------------------------------------------------------------------------------
def _ema_expected(
    old_m: np.ndarray,
    old_v: np.ndarray,
    mu: np.ndarray,
    biased: np.ndarray,
    n: Any,
    m: Any,
    u: Any,
    g: Any,
    root_n: Any,
    rtol: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per channel: the expected new running mean, its tolerance, the expected new running
    variance, its tolerance, and the unbiased batch variance (see :func:`ema_errors`).
    ``n``, ``m``, ``u``, ``g`` (``1 + log2 n``) and ``root_n`` are one call's scalars, or
    per-channel vectors for the channels of many calls: every operation is elementwise, in
    the same order, so each channel gets the same values either way."""
    v_unb = biased * n / (n - 1)
    sd = np.sqrt(np.maximum(biased, 0.0))
    k = EMA_SAFETY * rtol * u
    m_abs = np.abs(m)
    keep = np.abs(1 - m)
    # the batch mean: a sum of n values; an offset mu accumulates sequentially in sums over
    # an outer dim (random-walk error u * sqrt(n) * |mu|), the spread sd pairwise
    tol_m = k * (
        2 * (keep * np.abs(old_m) + m_abs * np.abs(mu)) + m_abs * g * (sd + root_n * np.abs(mu))
    )
    spread = np.minimum(np.abs(mu) / np.maximum(sd, 1e-30), 1e6)
    conditioning = np.minimum(1 + spread, 1 + spread**2)
    # a mean off by delta adds delta^2 to a two-pass variance
    mean_off = u * g * (1 + root_n * spread)
    tol_v = k * (2 * (keep * np.abs(old_v) + m_abs * v_unb) + m_abs * g * v_unb * conditioning)
    tol_v = tol_v + EMA_SAFETY * rtol * m_abs * v_unb * mean_off**2
    tol_m, tol_v = tol_m + 1e-30, tol_v + 1e-30
    exp_m = (1 - m) * old_m + m * mu
    exp_v = (1 - m) * old_v + m * v_unb
    return exp_m, tol_m, exp_v, tol_v, v_unb


def _ema_momentum(call: TrainCall) -> tuple[float | None, str]:
    """The momentum factor of a call's update when the layer states it (``momentum``, or
    ``1 / num_batches_tracked`` after the increment for ``momentum=None``), and how it was
    found; ``None`` when it must be inferred."""
    before = call.before
    nbt = before.num_batches_tracked if before is not None else None
    if call.has_momentum and call.momentum is not None:
        return call.momentum, f"momentum={call.momentum:g}"
    if call.has_momentum and nbt is not None:
        return 1.0 / (nbt + 1), f"momentum=None (cumulative average, factor 1/{nbt + 1})"
    return None, "momentum unknown"


def ema_suspects(calls: list[TrainCall], rtol: float = 1.0) -> set[int]:
    """``id``s of the calls :func:`ema_errors` must look at: all but those whose buffers
    (on CPU) moved within tolerance of the stated momentum update with the counter counting
    one step. One evaluation over the channels of all calls, with the per-channel arithmetic
    of the per-call check, so a call left out is one it returns ``None`` for."""
    suspects: set[int] = set()
    members: list[tuple[TrainCall, float]] = []
    for call in calls:
        st, before, after = call.input_stats, call.before, call.after
        m, _ = _ema_momentum(call)
        if (
            m is None
            or st is None
            or before is None
            or after is None
            or st.count < 2
            or any(
                not isinstance(t, torch.Tensor) or t.device.type != "cpu"
                for t in (
                    before.running_mean,
                    before.running_var,
                    after.running_mean,
                    after.running_var,
                )
            )
            or before.running_mean.shape != st.mean.shape  # type: ignore[union-attr]
            or after.running_mean.shape != st.mean.shape  # type: ignore[union-attr]
            or before.running_var.shape != st.mean.shape  # type: ignore[union-attr]
            or after.running_var.shape != st.mean.shape  # type: ignore[union-attr]
            or (
                before.num_batches_tracked is not None
                and after.num_batches_tracked is not None
                and after.num_batches_tracked != before.num_batches_tracked + 1
            )
        ):
            suspects.add(id(call))
        else:
            members.append((call, m))
    if not members:
        return suspects
    widths = [call.input_stats.mean.numel() for call, _ in members]  # type: ignore[union-attr]

    def joined(get: Any) -> np.ndarray:
        return torch.cat([get(call).reshape(-1) for call, _ in members]).double().numpy()

    old_m = joined(lambda c: c.before.running_mean)
    old_v = joined(lambda c: c.before.running_var)
    new_m = joined(lambda c: c.after.running_mean)
    new_v = joined(lambda c: c.after.running_var)
    mu = np.concatenate([call.input_stats.mean.numpy() for call, _ in members])  # type: ignore[union-attr]
    biased = np.concatenate([call.input_stats.var.numpy() for call, _ in members])  # type: ignore[union-attr]
    counts = [call.input_stats.count for call, _ in members]  # type: ignore[union-attr]

    def per_channel(values: list[float]) -> np.ndarray:
        return np.repeat(np.array(values, dtype=np.float64), widths)

    with np.errstate(all="ignore"):
        exp_m, tol_m, exp_v, tol_v, _ = _ema_expected(
            old_m,
            old_v,
            mu,
            biased,
            per_channel([float(n) for n in counts]),
            per_channel([m for _, m in members]),
            per_channel([_unit(call) for call, _ in members]),
            per_channel([1 + math.log2(n) for n in counts]),
            per_channel([math.sqrt(n) for n in counts]),
            rtol,
        )
        within = (np.abs(new_m - exp_m) <= tol_m) & (np.abs(new_v - exp_v) <= tol_v)
    for (call, _), ok in zip(members, np.split(within, np.cumsum(widths)[:-1])):
        if not ok.all():
            suspects.add(id(call))
    return suspects


@np.errstate(all="ignore")  # NaN/Inf statistics are judged, not warned about
def ema_errors(call: TrainCall, rtol: float = 1.0) -> dict[str, Any] | None:
    """Compare the buffers after one train-mode call with PyTorch's update; ``None`` if equal.

    With batch mean mu, biased batch variance v and n values per channel, PyTorch sets
    running_mean = (1 - m) * old + m * mu and running_var = (1 - m) * old + m * v * n / (n - 1)
    (the unbiased variance), num_batches_tracked += 1; m = momentum, or
    1 / num_batches_tracked (after the increment) when momentum is None.

    The tolerance is the round-off of the two quantities compared, per channel, with
    u = finfo(dtype).eps and g = 1 + log2(n), times ``EMA_SAFETY * rtol``:

    * the update itself (two products and a sum in the buffer's dtype):
      ``2 * u * ((1 - m) * |old| + m * |batch|)``;
    * the batch statistic, estimated by the layer and by bncheck from the same n values
      (summation error ``u * g`` relative to the values summed, at most linear in the
      conditioning ``1 + |mu| / sqrt(v)`` for Welford/pairwise variance):
      ``m * u * g * (sqrt(v) + sqrt(n) * |mu|)`` for the mean (an offset accumulates
      sequentially in sums over an outer dim) and
      ``m * u * g * v_unbiased * min(1 + |mu| / sqrt(v), 1 + mu^2 / v)`` for the variance,
      plus the square of the mean's own round-off (a two-pass variance grows by delta^2).

    Only the batch term carries g: the old value is copied, not summed. A biased-variance
    update differs from the unbiased one by ``m * v / (n - 1)``, so it is caught while that
    exceeds the tolerance (up to n = 16384 with momentum 0.1, old ~ v and |mu| <= sqrt(v) in
    float32; the rule page has the table).
    """
    st = call.input_stats
    before, after = call.before, call.after
    if st is None or before is None or after is None or st.count < 2:
        return None
    if (
        before.running_mean is None
        or before.running_var is None
        or after.running_mean is None
        or after.running_var is None
    ):
        return None
    if before.running_mean.shape != st.mean.shape:
        return None
    n = st.count
    nbt_expected = (
        before.num_batches_tracked + 1 if before.num_batches_tracked is not None else None
    )
    m, how = _ema_momentum(call)
    # numpy: short per-channel vectors, where torch's per-op overhead dominates
    old_m = before.running_mean.double().cpu().numpy()
    old_v = before.running_var.double().cpu().numpy()
    new_m = after.running_mean.double().cpu().numpy()
    new_v = after.running_var.double().cpu().numpy()
    mu, biased = st.mean.numpy(), st.var.numpy()
    u = _unit(call)
    if m is None:  # infer the momentum from the mean update
        sd = np.sqrt(np.maximum(biased, 0.0))
        delta = mu - old_m
        ok = np.abs(delta) > 1e-3 * (np.abs(old_m) + sd + 1e-12)
        if not ok.any():
            return None
        m = float(np.median((new_m - old_m)[ok] / delta[ok]))
        how = f"inferred momentum {m:.3g}"
    exp_m, tol_m, exp_v, tol_v, v_unb = _ema_expected(
        old_m, old_v, mu, biased, n, m, u, 1 + math.log2(n), math.sqrt(n), rtol
    )
    problems: list[dict[str, Any]] = []
    for name, obs_t, exp_t, tol_t, old_t, batch in (
        ("running_mean", new_m, exp_m, tol_m, old_m, mu),
        ("running_var", new_v, exp_v, tol_v, old_v, v_unb),
    ):
        err = np.abs(obs_t - exp_t)
        bad = err > tol_t
        if not bad.any():
            continue
        worst = int(np.argmax(np.where(bad, err / tol_t, 0.0)))
        problems.append(
            {
                "buffer": name,
                "bad": torch.from_numpy(bad),
                "max_error": float(err[worst]),
                "tolerance": float(tol_t[worst]),
                "channel": worst,
                "why": _diagnose(name, obs_t, old_t, batch, m, tol_t, biased, n),
            }
        )
    nbt_problem = None
    if (
        nbt_expected is not None
        and after.num_batches_tracked is not None
        and after.num_batches_tracked != nbt_expected
    ):
        nbt_problem = (after.num_batches_tracked, nbt_expected)
    if not problems and nbt_problem is None:
        return None
    return {"problems": problems, "nbt": nbt_problem, "momentum": m, "how": how}


def _close(obs: np.ndarray, exp: np.ndarray, tol: np.ndarray) -> bool:
    return bool((np.abs(obs - exp) <= tol).all())


@np.errstate(all="ignore")  # NaN/Inf statistics are judged, not warned about
def _diagnose(
    name: str,
    new: np.ndarray,
    old: np.ndarray,
    batch: np.ndarray,
    m: float,
    tol: np.ndarray,
    biased_var: np.ndarray,
    n: int,
) -> str:
    if (
        not np.isfinite(new).all()
        and np.isfinite(old).all()
        and np.isfinite(batch).all()
        and np.isfinite(biased_var).all()
    ):
        return (
            "it overflowed to Inf/NaN while the batch's statistics are finite: they pass the "
            "range of the layer's arithmetic"
        )
    if _close(new, old, tol):
        return "it was not updated (unchanged)"
    if 0 < m < 1 and _close(new, m * old + (1 - m) * batch, tol):
        return (
            f"it moved as the Keras convention does (new = {m:g} * old + {1 - m:g} * batch); "
            f"PyTorch's momentum weights the batch"
        )
    if name == "running_var" and _close(new, (1 - m) * old + m * biased_var, tol):
        return (
            f"the biased batch variance was stored; PyTorch stores the unbiased one "
            f"(times n/(n-1) = {n}/{n - 1})"
        )
    delta = batch - old
    ok = np.abs(delta) > 1e-6 * (np.abs(old) + np.abs(batch) + 1e-12)
    if ok.any():
        m_eff = float(np.median((new - old)[ok] / delta[ok]))
        if _close(new, (1 - m_eff) * old + m_eff * batch, tol * 4):
            return f"it moved as with momentum {m_eff:.3g} instead of {m:.3g}"
    return "the value matches no momentum update"


@check("ema-update")
def ema_update(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None:
        return
    layers = _layers(ctx)
    rtol = ctx.tol("ema_rtol")
    reported: set[str] = set()
    judged: list[tuple[TrainCall, BNLayer | None]] = []
    for call in obs.calls:
        if not call.training or call.forced_eval:
            continue
        if not call.track_running_stats or _behaves_frozen(call):
            continue
        layer = layers.get(call.layer)
        if layer is not None and not layer.uses_batch_stats:
            continue  # FrozenBatchNorm-style: no update by design
        judged.append((call, layer))
    suspects = ema_suspects([call for call, _ in judged], rtol)
    for call, layer in judged:
        if call.layer in reported or id(call) not in suspects:
            continue
        result = ema_errors(call, rtol)
        if result is None:
            continue
        reported.add(call.layer)
        problems = result["problems"]
        assert isinstance(problems, list)
        nbt = result["nbt"]
        texts = []
        details: dict[str, Any] = {
            "momentum": result["momentum"],
            "update": result["how"],
            "call": call.occurrence,
        }
        whys = list(dict.fromkeys(str(p["why"]) for p in problems))
        for why in whys:
            group = [p for p in problems if p["why"] == why]
            worst = max(group, key=lambda p: float(p["max_error"]) / float(p["tolerance"]))
            bad = worst["bad"]
            assert isinstance(bad, torch.Tensor)
            names = " and ".join(str(p["buffer"]) for p in group)
            texts.append(
                f"{names} did not follow the momentum update ({result['how']}); "
                f"max |obs-exp| = {worst['max_error']:.2g} > tol {worst['tolerance']:.2g} "
                f"({channel_list(bad)}): {why}"
            )
        for p in problems:
            bad = p["bad"]
            assert isinstance(bad, torch.Tensor)
            details[str(p["buffer"])] = {
                "max_error": p["max_error"],
                "tolerance": p["tolerance"],
                "channels": _indices(bad),
                "diagnosis": p["why"],
            }
        if nbt is not None:
            texts.append(
                f"num_batches_tracked went to {nbt[0]}, expected {nbt[1]} "
                "(it counts every train-mode forward)"
            )
            details["num_batches_tracked"] = {"observed": nbt[0], "expected": nbt[1]}
        if any("overflowed" in str(p["why"]) for p in problems):
            hint = _OVERFLOW_HINT
        elif problems and all("not updated" in str(p["why"]) for p in problems):
            hint = (
                "a train-mode forward must update the running statistics; check the layer's "
                "training branch (or momentum=0)"
            )
        elif any("Keras" in str(p["why"]) for p in problems):
            hint = "use momentum = 1 - keras_momentum and PyTorch's update rule"
        elif any("biased" in str(p["why"]) for p in problems):
            hint = "store var * n / (n - 1) in running_var (torch.var(..., correction=1))"
        elif not problems:
            hint = "increment num_batches_tracked on every train-mode forward"
        else:
            hint = "was momentum changed after construction, or the update rule rewritten?"
        yield ctx.finding("ema-update", layer or call.layer, "; ".join(texts), hint=hint, **details)


# ---- eval rules ------------------------------------------------------------------------------
def _where(input_differs: bool) -> str:
    return (
        "its input already differs (the cause is upstream of it)"
        if input_differs
        else "its input is the same, so this layer causes it"
    )


@check("eval-nondeterminism")
def eval_nondeterminism(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None or obs.eval is None:
        return
    rtol = ctx.tol("eval_rtol")
    if obs.eval.a_again is None:
        return  # sample 0 came out the same in both eval passes
    first = first_difference(obs.eval.a, obs.eval.a_again, slice(None), rtol)
    if first is None:
        return
    layer, occurrence, upstream_too, (diff, scale) = first
    where = _where(upstream_too)
    moved = obs.eval.params_changed
    if moved:
        # the forward changed the weights the next forward runs with (an EMA step inside
        # forward): that, not a random op, is why two identical passes differ
        shown = layer_list(moved, 3)
        yield ctx.finding(
            "eval-nondeterminism",
            ctx.layer(layer) if layer else None,
            f"two identical eval forwards differ (max |diff| = {diff:.2g} > tol "
            f"{rtol * scale:.2g}) because the forward changed {len(moved)} parameter "
            f"tensor(s) between them ({shown}): every call runs with other weights",
            hint="update parameters outside forward (a momentum encoder's EMA step after "
            "optimizer.step()), or only when self.training",
            max_diff=diff,
            tolerance=rtol * scale,
            call=occurrence,
            params_changed=list(moved),
        )
        return
    kept = obs.eval.buffers_changed
    if kept:
        # the forward changed other state the next forward reads (a quantization observer
        # that keeps updating its scale in eval mode): not a random op, and the model works
        # as built; its eval outputs depend on the batches evaluated before
        shown = layer_list(kept, 3)
        observers = any(
            part in name
            for name in kept
            for part in ("fake_quant", "activation_post_process", "observer")
        )
        hint = (
            "quantization observers (QAT's FakeQuantize) keep updating in eval mode while "
            "enabled: call model.apply(torch.ao.quantization.disable_observer) before "
            "evaluating or converting, so eval outputs do not depend on the batches seen"
            if observers
            else "update this state outside forward, or only when self.training, so eval "
            "outputs do not depend on the batches evaluated before"
        )
        yield ctx.finding(
            "eval-nondeterminism",
            ctx.layer(layer) if layer else None,
            f"two identical eval forwards differ (max |diff| = {diff:.2g} > tol "
            f"{rtol * scale:.2g}) because the forward changed {len(kept)} buffer(s) between "
            f"them ({shown}): each call runs with the state the previous one left",
            hint=hint,
            severity="warning",
            max_diff=diff,
            tolerance=rtol * scale,
            call=occurrence,
            buffers_changed=list(kept),
        )
        return
    if layer is None and obs.unread:
        # BN layers ran where the passes cannot read them (torch.func.vmap, meta tensors)
        text = (
            f"two identical eval forwards give different model outputs (max |diff| = "
            f"{diff:.2g} > tol {rtol * scale:.2g}); the BN layers that ran inside "
            f"torch.func.vmap or with meta tensors ({layer_list(sorted(obs.unread), 3)}) were "
            "not observed, so where it starts is not known"
        )
        hint = (
            "look for F.dropout(...) without training=self.training, or random ops that "
            "ignore eval mode"
        )
    elif layer is None:
        text = (
            f"two identical eval forwards give different model outputs (max |diff| = "
            f"{diff:.2g} > tol {rtol * scale:.2g}); no BN layer output differs, so the "
            "randomness is after the last BN or outside BN layers"
        )
        hint = (
            "look for F.dropout(...) without training=self.training, or random ops "
            "that ignore eval mode"
        )
    else:
        text = (
            f"two identical eval forwards differ here first: max |diff| = {diff:.2g} > tol "
            f"{rtol * scale:.2g}; {where}"
        )
        hint = "eval mode must be deterministic: random ops must check self.training"
    yield ctx.finding(
        "eval-nondeterminism",
        ctx.layer(layer) if layer else None,
        text,
        hint=hint,
        max_diff=diff,
        tolerance=rtol * scale,
        call=occurrence,
    )


@check("eval-batch-dependence")
def eval_batch_dependence(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None or obs.eval is None or obs.eval.b is None:
        return
    rtol = ctx.tol("eval_rtol")
    if obs.eval.a_again is None:
        return  # sample 0 came out the same with both sets of batch-mates
    if first_difference(obs.eval.a, obs.eval.a_again, slice(None), rtol) is not None:
        ctx.notes.append(
            "eval-batch-dependence was not judged: eval forwards are "
            "nondeterministic (see eval-nondeterminism)"
        )
        return
    first = first_difference(obs.eval.a, obs.eval.b, slice(0, 1), rtol)
    if first is None:
        return
    layer, occurrence, upstream_too, (diff, scale) = first
    where = _where(upstream_too)
    companion = obs.eval.companion
    # Not caused by a BN layer: a non-BN op mixes the samples. That is a bug in a CNN, but by
    # design in graph nets (the batch is the nodes), contrastive logits (N x N) and
    # sequence-first (T, N, ...) inputs, so it is reported as info, not as an error.
    not_bn = (
        "if samples are meant to interact (graph nodes, contrastive logits, sequence-first "
        "(T, N, ...) inputs), this is expected; else look for reductions over the batch "
        "dimension (dim 0) that ignore self.training"
    )
    if layer is None and obs.unread:
        # BN layers ran where the passes cannot read them (torch.func.vmap, meta tensors)
        shown = layer_list(sorted(obs.unread), 3)
        yield ctx.finding(
            "eval-batch-dependence",
            None,
            f"in eval mode, sample 0's model output changes when its batch-mates change "
            f"({companion}): max |diff| = {diff:.2g} > tol {rtol * scale:.2g}; the BN "
            f"layers that ran inside torch.func.vmap or with meta tensors ({shown}) were not "
            "observed, so where it starts is not known",
            hint="a BN layer built with track_running_stats=False normalises with the batch "
            "in eval mode (see no-running-stats); else look for reductions over the batch "
            "dimension (dim 0) that ignore self.training",
            severity="info",
            max_diff=diff,
            tolerance=rtol * scale,
            companion=companion,
            cause="not observed",
        )
        return
    if layer is None:
        text = (
            f"in eval mode, sample 0's model output changes when its batch-mates change "
            f"({companion}): max |diff| = {diff:.2g} > tol {rtol * scale:.2g}; no BN "
            "output differs, so a non-BN op after the last BN mixes samples"
        )
        yield ctx.finding(
            "eval-batch-dependence",
            None,
            text,
            hint=not_bn,
            severity="info",
            max_diff=diff,
            tolerance=rtol * scale,
            companion=companion,
            cause="non-BN op",
        )
        return
    bn = ctx.layer(layer)
    if not upstream_too and batch_stats_in_eval(bn):  # one setting, one finding
        ctx.notes.append(no_running_stats_note(bn, "eval-batch-dependence"))
        return
    if upstream_too:
        yield ctx.finding(
            "eval-batch-dependence",
            bn,
            f"in eval mode, sample 0's output changes when its batch-mates change ({companion}) "
            f"- first seen at this layer: max |diff| = {diff:.2g} > tol {rtol * scale:.2g}; "
            f"{where}, so a non-BN op before it mixes samples",
            hint=not_bn,
            severity="info",
            max_diff=diff,
            tolerance=rtol * scale,
            companion=companion,
            call=occurrence,
            cause_upstream=True,
            cause="non-BN op",
        )
        return
    text = (
        f"in eval mode, sample 0's output changes when its batch-mates change ({companion}) "
        f"- first at this layer: max |diff| = {diff:.2g} > tol {rtol * scale:.2g}; {where}"
    )
    if not bn.has_running_stats or not bn.track_running_stats:
        hint = (
            "it has no running statistics, so eval normalises with batch statistics; use "
            "track_running_stats=True"
        )
    else:
        hint = "eval mode must normalise with running_mean/running_var, not batch statistics"
    yield ctx.finding(
        "eval-batch-dependence",
        bn,
        text,
        hint=hint,
        max_diff=diff,
        tolerance=rtol * scale,
        companion=companion,
        call=occurrence,
        cause_upstream=upstream_too,
    )


@check("eval-updates-stats")
def eval_updates_stats(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None or obs.eval is None:
        return
    for name, buffers in obs.eval.buffer_changes.items():
        yield ctx.finding(
            "eval-updates-stats",
            ctx.layer(name),
            f"an eval-mode forward changed {' and '.join(buffers)}; eval must leave the running "
            "statistics alone",
            hint="update the buffers only when self.training is True",
            buffers=buffers,
        )


# ---- batch and input rules -------------------------------------------------------------------
_EVAL_MODE_NOTE = (
    "{rules} did not judge the batch size: {what} in eval mode in the model you audited, "
    "and in eval mode BN normalises with its running statistics whatever the batch; to "
    "judge the batch you train with, audit the model in train mode (model.train()) or pass "
    "training_batch=True"
)
_NOT_TRAINING_NOTE = (
    "{rules} did not judge the batch size: the example input is not the batch the model "
    "trains with (training_batch=False)"
)
_SYNTHETIC_NOTE = (
    "{rules} did not judge the batch size: the example input is a shape, not the batch you "
    "train with (synthetic input); pass the batch you train with to judge it"
)


def _note_once(ctx: AuditContext, text: str) -> None:
    if text not in ctx.notes:
        ctx.notes.append(text)


def _user_trains(ctx: AuditContext, obs: ForwardObservations, call: TrainCall) -> bool:
    """Whether the example input is a training batch of this call's layer: the user runs the
    layer in train mode (the audit's train pass runs every layer in train mode), or said so
    with ``audit(..., training_batch=True)``."""
    if ctx.training_batch is not None:
        return ctx.training_batch
    return obs.user_training.get(call.layer, True)


def _batch_rules_skip_note(ctx: AuditContext, obs: ForwardObservations) -> None:
    """The note for train-mode calls the batch-size rules left alone because the user runs
    those layers in eval mode."""
    batch_rules = ("small-batch", "single-value-per-channel")
    rules = " and ".join(r for r in batch_rules if r in ctx.rule_ids)
    if ctx.training_batch is False:
        _note_once(ctx, _NOT_TRAINING_NOTE.format(rules=rules))
        return
    eval_layers = [
        c.layer for c in _first_per_layer(obs.calls) if c.training and not _user_trains(ctx, obs, c)
    ]
    if not eval_layers:
        return
    everything = not any(obs.user_training.values())
    what = (
        "every BN layer is"
        if everything
        else f"{len(eval_layers)} BN layer(s) ({', '.join(eval_layers[:3])}"
        + (", ..." if len(eval_layers) > 3 else "")
        + ") are"
    )
    _note_once(ctx, _EVAL_MODE_NOTE.format(rules=rules, what=what))


@check("single-value-per-channel")
def single_value_per_channel(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None:
        return
    layers = _layers(ctx)
    seen: set[str] = set()
    for call in obs.calls:
        if not call.single_value or call.layer in seen:
            continue
        seen.add(call.layer)
        if not _user_trains(ctx, obs, call):
            _batch_rules_skip_note(ctx, obs)
            continue
        if not ctx.user_batch:
            _note_once(ctx, _SYNTHETIC_NOTE.format(rules="single-value-per-channel"))
            continue
        yield ctx.finding(
            "single-value-per-channel",
            layers.get(call.layer, call.layer),
            f"in train mode it sees 1 value per channel (input shape {tuple(call.shape)}, "
            "N * spatial = 1): batch statistics are undefined and nn.BatchNorm raises "
            "'Expected more than 1 value per channel when training'",
            hint="use batches of more than one sample (DataLoader(drop_last=True) avoids a "
            "last batch of 1), or keep this layer in eval mode",
            shape=list(call.shape),
            samples_per_channel=call.samples_per_channel,
        )


@check("small-batch")
def small_batch(ctx: AuditContext) -> Iterator[Finding]:
    obs = _obs(ctx)
    if obs is None or not ctx.user_batch:
        return
    min_batch = ctx.tol("min_batch_size")
    min_samples = ctx.tol("min_samples_per_channel")
    layers = _layers(ctx)
    training = [
        c
        for c in _first_per_layer(obs.calls)
        if c.training and not c.single_value and not _frozen_layer(c, layers.get(c.layer))
    ]
    judged = [c for c in training if _user_trains(ctx, obs, c)]
    if len(judged) < len(training):
        _batch_rules_skip_note(ctx, obs)
    if not judged:
        return
    # the batch as the BN layers see it: the N of their inputs (a detector's list of images
    # reaches its backbone as one (N, C, H, W) tensor)
    n = min((c.batch_size for c in judged if c.batch_size > 0), default=None)
    if n is not None and n < min_batch:
        yield ctx.finding(
            "small-batch",
            None,
            f"batch size {n} < {min_batch:g}: the batch statistics every BN layer normalises "
            "with are noisy, and running statistics follow that noise",
            hint="use a larger batch, SyncBatchNorm across devices, GroupNorm, or frozen BN; "
            "tune with min_batch_size=",
            batch_size=n,
            min_batch_size=min_batch,
        )
    for call in judged:
        if call.samples_per_channel >= min_samples:
            continue
        yield ctx.finding(
            "small-batch",
            layers.get(call.layer, call.layer),
            f"{call.samples_per_channel} values per channel (N * spatial, input shape "
            f"{tuple(call.shape)}) < {min_samples:g}: its batch mean and variance are "
            "estimated from very few values",
            hint="use a larger batch or keep this layer frozen (eval); tune with "
            "min_samples_per_channel=",
            samples_per_channel=call.samples_per_channel,
            batch_size=call.batch_size,
            min_samples_per_channel=min_samples,
        )


@check("input-not-normalized")
def input_not_normalized(ctx: AuditContext) -> Iterator[Finding]:
    """Each network input as the first weight layer fed by it receives it (after the model's
    own preprocessing: a cast, ``/ 255``, ``(x - mean) / std``); the raw input where no
    conv/linear module is reached (see :func:`bncheck.probes._input_entries`)."""
    obs = _obs(ctx)
    if obs is None or not ctx.user_batch:
        return
    limit = ctx.tol("input_abs_max")
    # An input that reaches a BN layer before any weight layer is normalised by it (tabular
    # features, a spectrogram's bn0): not a finding.
    into_bn = set()
    for call in obs.calls:
        origin = input_origin(call.trace.producer) if call.trace else None
        if origin is not None:
            into_bn.add(origin.name)
    for s in obs.inputs:
        if s.where in into_bn or any(part in into_bn for part in s.parts):
            continue
        reasons = []
        if abs(s.mean) > limit or s.std > limit:
            reasons.append(
                f"mean {s.mean:.3g}, std {s.std:.3g} (normalized: |mean|, std <= {limit:g})"
            )
        if s.integer_valued and s.max > 1 and s.min >= 0 and len(s.shape) >= 3:
            reasons.append(f"integer values in [{s.min:g}, {s.max:g}] (raw pixel counts?)")
        if not reasons:
            continue
        yield ctx.finding(
            "input-not-normalized",
            None,
            f"the network {_input_label(s)} looks unnormalized: " + "; ".join(reasons),
            hint="scale to [0, 1] and standardise per channel (x / 255, then (x - mean) / std) "
            "as in training; tune with input_abs_max=",
            where=s.where,
            mean=s.mean,
            std=s.std,
            min=s.min,
            max=s.max,
            integer_valued=s.integer_valued,
            limit=limit,
            first_layer=s.layer,
            preprocessed=s.preprocessed,
            dtype=s.dtype,
        )


def _input_label(s: InputSummary) -> str:
    """``input (16, 3, 8, 8)``, with what the model did to it before its first layer."""
    text = f"{s.where} {tuple(s.shape)}"
    if s.layer is not None and s.preprocessed:
        return f"{text}, as {s.layer} receives it after the model's own preprocessing,"
    if s.layer is not None and not s.dtype.startswith(("torch.float", "torch.bfloat")):
        return f"{text} ({s.dtype.removeprefix('torch.')}, cast to float inside the model)"
    return text


# ---- stat-drift ------------------------------------------------------------------------------
#: Below this share of the initial values (0 and 1) left in the running statistics, a layer
#: counts as converged: (1 - momentum) ** num_batches_tracked.
UNCONVERGED_SHARE = 0.05
#: The first BN layer "agrees with the data" while its drift is below this fraction of the
#: tolerances (in units of drift_mean_z and of log(drift_var_ratio)).
ENTRY_AGREES = 0.5
#: Drift within this many standard errors of the batch-to-batch spread is sampling noise.
NOISE_SIGMAS = 3.0


def _drift_measure(
    rm: torch.Tensor, rv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: |running_mean - mean| in data std, and |log((running_var + eps) / (var +
    eps))|."""
    z = (rm - mean).abs() / (var + eps).sqrt()
    log_ratio = ((rv.clamp_min(0) + eps) / (var + eps)).log().abs()
    return z, log_ratio


def _sampling_noise(stats: Any, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per channel, how far running statistics may sit from the data's by sampling alone:
    ``NOISE_SIGMAS * spread * sqrt(1 / batches + 1 / 4)``, with ``spread`` the batch-to-batch
    standard deviation of the batch means (in data std) and of the log batch variances (at
    least the layer's median over channels). The 1/4 stands for running statistics averaged
    over at least four batches (an EMA with momentum 0.1 averages about 19). ``None`` with
    fewer than two batches."""
    means, variances = getattr(stats, "batch_means", None), getattr(stats, "batch_vars", None)
    if means is None or variances is None or means.shape[0] < 2:
        return None
    scale = NOISE_SIGMAS * math.sqrt(1.0 / means.shape[0] + 0.25)
    z_spread = means.std(0) / (stats.var + eps).sqrt()
    log_spread = (variances.clamp_min(0) + eps).log().std(0)
    # a spread from a few batches is itself noisy: no channel gets less than the layer's median
    z_spread = z_spread.clamp_min(float(z_spread.median()))
    log_spread = log_spread.clamp_min(float(log_spread.median()))
    return scale * z_spread, scale * log_spread


def _initial_share(layer: BNLayer) -> float:
    """(1 - momentum) ** num_batches_tracked: the weight the initial values (0 and 1) still
    have in the running statistics; 0 for momentum=None (the first update replaces them),
    and 0 (unknown) for a counter at 0 beside statistics that moved: the counter did not
    count their updates (an EMA copy whose integer counter the averaging truncates)."""
    nbt = layer.num_batches_tracked
    m = layer.momentum
    if nbt is None or m is None or not 0 < m <= 1:
        return 0.0
    count = int(nbt.reshape(-1)[0])
    if count == 0 and not stats_at_initial_values(layer):
        return 0.0
    return float((1 - m) ** count)


def _never_trained(layer: BNLayer) -> bool:
    return stats_at_init(layer) or (statistics_never_move(layer) and stats_at_initial_values(layer))


@check("stat-drift")
def stat_drift(ctx: AuditContext) -> Iterator[Finding]:
    """Running statistics against the statistics of ``data=``, with the cause that fits.

    * never trained: statistics at their initial values (counter 0, or momentum=0);
    * too few updates: (1 - momentum) ** num_batches_tracked >= ``UNCONVERGED_SHARE`` and the
      first BN layer's statistics match that mix of initial values and data (info);
    * data shift: the first BN layer (in call order) already sees data unlike its statistics
      (by ``ENTRY_AGREES`` of the tolerances or more) - the data differs from what the
      statistics were collected on (warning);
    * lag: the first layer agrees and deeper layers drift - the running averages trail the
      last weight updates (a large final learning rate), or were collected in train mode
      with small batches, whose noisy batch statistics upstream change what deeper layers
      see (an exact calibration at batch 8 shows it); fixed by recalibrating with large
      batches (info).

    Channels whose drift is within the sampling noise of the batches (``_sampling_noise``)
    are not counted.
    """
    obs = _obs(ctx)
    if obs is None or obs.drift is None:
        return
    z_max = ctx.tol("drift_mean_z")
    log_ratio_max = math.log(max(ctx.tol("drift_var_ratio"), 1.0 + 1e-12))
    layers = _layers(ctx)
    measured: list[tuple[BNLayer, Any, torch.Tensor, torch.Tensor, float]] = []
    for name, stats in obs.drift.items():  # in the order the data pass called the layers
        layer = layers.get(name)
        if layer is None:
            continue
        rm, rv = layer.running_mean, layer.running_var
        if rm is None or rv is None or rm.shape != stats.mean.shape or rm.is_meta or rv.is_meta:
            continue  # meta: a template's statistics hold no values
        eps = layer.eps if layer.eps is not None and layer.eps > 0 else 1e-5
        with torch.no_grad():
            rm_d, rv_d = rm.detach().double().cpu(), rv.detach().double().cpu()
        z, log_ratio = _drift_measure(rm_d, rv_d, stats.mean, stats.var, eps)
        noise = _sampling_noise(stats, eps)
        if noise is not None:  # only drift beyond sampling noise is evidence
            z = torch.where(z > noise[0], z, torch.zeros_like(z))
            log_ratio = torch.where(log_ratio > noise[1], log_ratio, torch.zeros_like(log_ratio))
        measured.append((layer, stats, z, log_ratio, eps))
    if not measured:
        return

    def relative(z: torch.Tensor, log_ratio: torch.Tensor) -> float:
        return max(float(z.max()) / z_max, float(log_ratio.max()) / log_ratio_max)

    # the model-wide cause, judged on the first layer with statistics from training
    entry = next((m for m in measured if not _never_trained(m[0])), None)
    cause = "lag"
    if entry is not None:
        layer, stats, z, log_ratio, eps = entry
        share = _initial_share(layer)
        if share >= UNCONVERGED_SHARE:
            # what the running statistics would hold after those updates on this data
            mixed_mean = (1 - share) * stats.mean
            mixed_var = share + (1 - share) * stats.var
            z_mix, lr_mix = _drift_measure(
                layer.running_mean.detach().double().cpu(),  # type: ignore[union-attr]
                layer.running_var.detach().double().cpu(),  # type: ignore[union-attr]
                mixed_mean,
                mixed_var,
                eps,
            )
            if relative(z_mix, lr_mix) < ENTRY_AGREES:
                cause = "few updates"
        if cause != "few updates" and relative(z, log_ratio) >= ENTRY_AGREES:
            cause = "data shift"
    untrained_reported = "untrained-stats" in ctx.rule_ids
    for layer, stats, z, log_ratio, _eps in measured:
        bad_mean = z > z_max
        bad_var = log_ratio > log_ratio_max
        bad = bad_mean | bad_var
        if not bool(bad.any()):
            continue
        parts = []
        if bool(bad_mean.any()):
            parts.append(
                f"|running_mean - data mean| up to {float(z.max()):.3g} data std > {z_max:g}"
            )
        if bool(bad_var.any()):
            worst = float(torch.where(bad_var, log_ratio, torch.zeros_like(log_ratio)).max())
            parts.append(
                f"running_var / data var off by up to x{math.exp(worst):.3g} > "
                f"x{math.exp(log_ratio_max):g}"
            )
        measured_text = (
            f"({stats.batches} batches, {stats.count} values per channel): "
            + "; ".join(parts)
            + f" ({channel_list(bad)} of {bad.numel()})"
        )
        recalibrate = (
            "recalibrate on representative data: bncheck.recalibrate(model, data) or "
            "torch.optim.swa_utils.update_bn(loader, model)"
        )
        share = _initial_share(layer)
        severity: str | None = None
        if _never_trained(layer):
            if untrained_reported and (statistics_never_move(layer) or not layer.module.training):
                continue  # untrained-stats reports this layer (one cause, one finding)
            layer_cause = "never trained"
            text = (
                "running statistics were never trained (still mean 0, var 1"
                + (", momentum=0" if statistics_never_move(layer) else ", num_batches_tracked 0")
                + f"), so they are far from the statistics of the given data {measured_text}"
            )
            hint = recalibrate
        elif cause == "few updates" and share >= UNCONVERGED_SHARE:
            layer_cause = "few updates"
            nbt = int(layer.num_batches_tracked.reshape(-1)[0])  # type: ignore[union-attr]
            text = (
                f"running statistics have had only {nbt} update{'s' if nbt != 1 else ''} at "
                f"momentum {layer.momentum:g}, so {share:.0%} of their initial values (0 and 1) "
                f"remain; they are far from the statistics of the given data {measured_text}"
            )
            hint = "run more train-mode batches before evaluating, or " + recalibrate
            severity = "info"
        elif cause == "data shift":
            layer_cause = "data shift"
            assert entry is not None
            first = (
                "this is the first BN layer, and its input"
                if layer is entry[0]
                else f"the first BN layer ({entry[0].name}) already"
            )
            text = (
                f"running statistics are far from the statistics of the given data "
                f"{measured_text}; {first} differs from the data the statistics were "
                "collected on, or the weights before it changed after they were collected "
                "(large steps since the last train-mode batches, weights loaded or edited "
                "without their statistics)"
            )
            hint = (
                "check the preprocessing (scale, mean/std, channel order, resolution) against "
                "training; if this data is the new target domain, or the weights changed "
                "since, " + recalibrate
            )
        else:
            layer_cause = "lag"
            first = entry[0].name if entry is not None else "the first BN layer"
            text = (
                f"running statistics differ from what eval feeds this layer: far from the "
                f"statistics of the given data {measured_text}, while the first BN layer "
                f"({first}) agrees with the data, so the difference builds up inside the "
                "network. Either the running averages lag the weights (they mix statistics of "
                "earlier weights: a large final learning rate, averaged or fine-tuned "
                "weights), or they were collected in train mode with small batches, whose "
                "noisy batch statistics upstream change what this layer sees (eval normalises "
                "upstream with the running statistics instead)"
            )
            hint = recalibrate + " after training, with large batches"
            severity = "info"
        yield ctx.finding(
            "stat-drift",
            layer,
            text,
            hint=hint,
            severity=severity,
            cause=layer_cause,
            max_mean_z=float(z.max()),
            max_var_ratio=float(math.exp(float(log_ratio.max()))),
            channels=_indices(bad),
            fraction=float(bad.double().mean()),
            batches=stats.batches,
            initial_share=share,
        )

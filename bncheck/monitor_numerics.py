"""The Monitor's numerics: running buffers as one flat vector, and what a step's calls were.

:class:`FlatBuffers` is the only tensor work on the hot path (one snapshot per step) and turns
blocks of snapshots into per-layer summaries (see :mod:`bncheck.monitor` for the maths).
:func:`classify_updates` judges how the several updates of one layer in one step came about,
from the few calls the Monitor recorded in detail (see :class:`CallRecord`).
:class:`ParamWatch` tells a moving-average copy from a frozen layer by where its gamma/beta
change.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .discovery import BNLayer, setting_number

__all__ = [
    "FlatBuffers",
    "Snapshot",
    "ParamWatch",
    "CallRecord",
    "classify_updates",
    "batches_differ",
]

#: Per channel, a batch mean further than this many standard errors from another call's
#: counts as a different distribution; ``DIFFER_FRACTION`` of the channels must be so.
DIFFER_Z = 4.0
DIFFER_FRACTION = 0.25


Snapshot = tuple[torch.Tensor, torch.Tensor, tuple[Any, ...]]


class FlatBuffers:
    """The running buffers of every BN layer that tracks statistics, as one flat vector.

    ``snapshot`` is the only work on the hot path: one ``cat`` of every layer's running_mean
    and running_var (float32, ``2 * sum(C)`` values) and one ``stack`` of the counters.
    ``summarize`` turns a block of consecutive snapshots into the per-layer ``STAT_COLUMNS``
    of each step, with a fixed number of tensor operations for the whole block, whatever the
    number of layers and steps (one ``index_add_`` does every per-layer reduction).
    """

    def __init__(self, layers: Sequence[BNLayer]) -> None:
        self.indices = [
            i
            for i, lyr in enumerate(layers)
            if lyr.has_running_stats
            and not lyr.lazy_uninitialized
            and not (isinstance(lyr.running_mean, torch.Tensor) and lyr.running_mean.is_meta)
        ]
        self.modules = [layers[i].module for i in self.indices]
        self.has_counter = [layers[i].num_batches_tracked is not None for i in self.indices]
        if not self.modules:
            return
        first = layers[self.indices[0]].running_mean
        assert first is not None
        self.device = first.device
        sizes = [int(layers[i].running_mean.numel()) for i in self.indices]  # type: ignore[union-attr]
        self.channels = sum(sizes)
        dev = self.device
        self.sizes = torch.tensor(sizes, dtype=torch.float64, device=dev)
        self.segment = torch.repeat_interleave(
            torch.arange(len(sizes), device=dev), torch.tensor(sizes, device=dev)
        )
        eps = [layers[i].eps if layers[i].eps is not None else 0.0 for i in self.indices]
        self.eps = torch.tensor(eps, dtype=torch.float64, device=dev)[self.segment]
        self.counter_mask = torch.tensor(self.has_counter, device=dev)
        #: per layer: whether it has a ``momentum`` attribute, read at each snapshot (a BN
        #: momentum schedule changes it during the run); without one, its value when found
        self.live_momentum = [hasattr(layers[i].module, "momentum") for i in self.indices]
        self.found_momentum = [layers[i].momentum for i in self.indices]
        #: the reference of the bias correction (see :meth:`summarize`): per channel, the
        #: running statistics (flat, float64) the layer's average started from, and per
        #: layer the log of the weight they still have in the last summarized snapshot
        self.reference: torch.Tensor | None = None
        self.reference_log: torch.Tensor | None = None
        self._segment2 = torch.cat([self.segment, self.segment])
        self._zero = torch.zeros((), dtype=torch.long, device=dev)
        self.nan = torch.tensor(float("nan"), dtype=torch.float64, device=dev)

    @torch.no_grad()
    def snapshot(self) -> Snapshot:
        """(running_mean then running_var of every layer, counters) as new tensors, and the
        layers' momenta (as read, the update of the step before used them)."""
        bufs = [m._buffers for m in self.modules]
        flat = torch.cat(
            [b["running_mean"] for b in bufs]  # type: ignore[misc,arg-type]
            + [b["running_var"] for b in bufs]
        )
        nbt = torch.stack(
            [
                b["num_batches_tracked"] if has else self._zero  # type: ignore[misc]
                for b, has in zip(bufs, self.has_counter)
            ]
        )
        momenta = tuple(
            _momentum_value(m.momentum) if live else found
            for m, live, found in zip(self.modules, self.live_momentum, self.found_momentum)
        )
        return flat, nbt, momenta

    def rebase(self) -> None:
        """Forget the bias correction's reference: the next summarized block starts a new
        one (after a detach, the updates made meanwhile are unknown)."""
        self.reference = self.reference_log = None

    def _factors(self, snaps: Sequence[Snapshot], nbt: torch.Tensor) -> torch.Tensor:
        """``[S, T]``: the update factor of each step, from the momenta its snapshot read
        (``1 / num_batches_tracked`` for momentum None; NaN where the momentum is no
        number)."""
        rows = [[math.nan if m is None else float(m) for m in snap[2]] for snap in snaps]
        averaged = [[m is None for m in snap[2]] for snap in snaps]
        table = torch.tensor(rows, dtype=torch.float64, device=nbt.device)
        cumulative = torch.tensor(averaged, dtype=torch.bool, device=nbt.device)
        return torch.where(cumulative, 1.0 / nbt.clamp(min=1.0), table)

    @torch.no_grad()
    def summarize(
        self, base: Snapshot, snaps: Sequence[Snapshot]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step statistics of ``snaps`` (each compared with the one before, ``base`` first).

        Returns ``summary [S, T, len(STAT_COLUMNS)]``, then per channel ``[S, C]``:
        running_mean, running_var, batch mean and unbiased batch variance. The batch
        statistics are recovered from the update (see the module docstring) and are NaN for
        a layer that did not update exactly once in that step.
        """
        flats = torch.stack([base[0]] + [s[0] for s in snaps]).to(torch.float64)
        nbts = torch.stack([base[1]] + [s[1] for s in snaps]).to(torch.float64)
        c = self.channels
        rm0, rm = flats[:-1, :c], flats[1:, :c]
        rv0, rv = flats[:-1, c:], flats[1:, c:]
        nbt0, nbt = nbts[:-1], nbts[1:]
        seg = self.segment
        updates = torch.where(self.counter_mask, nbt - nbt0, self.nan)
        factor = self._factors(snaps, nbt)
        exact = (updates == 1) & (factor > 0)
        f = torch.where(exact, factor, torch.ones_like(factor))[:, seg]
        keep = 1.0 - f
        batch_mean = (rm - keep * rm0) / f
        batch_var = (rv - keep * rv0) / f
        eps = self.eps
        drift_z, drift_vr = _drift(batch_mean, batch_var, rm0, rv0, eps)
        # the same against the previous running statistics without their reference's share
        start_z, start_vr, share = self._corrected(flats, exact, factor, batch_mean, batch_var)
        moved = torch.nan_to_num((rm - rm0).abs() + (rv - rv0).abs(), nan=1.0, posinf=1.0)
        nonfinite = (~torch.isfinite(rm) | ~torch.isfinite(rv)).to(torch.float64)
        cols = torch.stack(
            [
                moved,
                nonfinite,
                batch_mean.abs(),
                batch_var,
                rm.abs(),
                rv,
                drift_z,
                drift_vr,
                start_z,
                start_vr,
            ],
            dim=2,
        )
        sums = torch.zeros(
            cols.shape[0], len(self.modules), cols.shape[2], dtype=torch.float64, device=cols.device
        ).index_add_(1, seg, cols)
        means = sums / self.sizes[None, :, None]
        exact3 = exact[..., None]
        summary = torch.cat(
            [
                updates[..., None],
                nbt[..., None],
                sums[..., 0:2],
                torch.where(exact3, means[..., 2:4], self.nan),
                means[..., 4:6],
                torch.where(exact3, means[..., 6:10], self.nan),
                torch.where(exact, share, self.nan)[..., None],
            ],
            dim=2,
        )
        exact_ch = exact[:, seg]
        return (
            summary,
            rm,
            rv,
            torch.where(exact_ch, batch_mean, self.nan),
            torch.where(exact_ch, batch_var, self.nan),
        )

    def _corrected(
        self,
        flats: torch.Tensor,
        exact: torch.Tensor,
        factor: torch.Tensor,
        batch_mean: torch.Tensor,
        batch_var: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The drift of each step's batch against the previous running statistics with
        their reference's share taken out, per channel, and that share per layer ``[S, T]``.

        A running average that started from values ``R0`` holds, k exact updates later,
        ``K R0 + (1 - K) D`` with ``K`` the product of ``1 - factor`` over those updates and
        ``D`` the (normalised) average of the batches; ``D = (R - K R0) / (1 - K)`` is what
        it will hold once ``R0`` is forgotten (the bias correction of an exponential
        average). The average is linear, so any snapshot can be the reference: the first
        one summarized after the Monitor was attached, then, for each layer, the snapshot of
        any step that was not one exact update (a reset, a recalibration, several updates:
        what they did to the average is not known). Where no update came since the
        reference, the share is 0 (nothing to correct)."""
        c = self.channels
        n_steps = exact.shape[0]
        if self.reference is None or self.reference_log is None:
            self.reference = flats[0]
            self.reference_log = torch.zeros_like(exact[0], dtype=torch.float64)
        step_log = torch.where(
            exact, torch.log((1.0 - factor).clamp(min=1e-300)), torch.zeros_like(factor)
        )
        rows = torch.arange(1, n_steps + 1, device=exact.device)[:, None].expand_as(exact)
        # per row (0: the base, t: after step t), the reference's row (0: the carried one)
        since = torch.cummax(torch.where(exact, torch.zeros_like(rows), rows), dim=0).values
        total = torch.cumsum(step_log, dim=0) + self.reference_log[None, :]
        totals = torch.cat([self.reference_log[None, :], total])
        log_share = total - torch.where(since > 0, totals.gather(0, since), totals[:1] * 0)
        since = torch.cat([torch.zeros_like(since[:1]), since])
        log_share = torch.cat([self.reference_log[None, :], log_share])
        references = torch.cat([self.reference[None, :], flats[1:]])
        picked = references.gather(0, since[:, self._segment2])
        self.reference, self.reference_log = picked[-1], log_share[-1]
        # step i is judged against row i - 1
        share = torch.exp(log_share[:-1])
        share = torch.where(share < 1.0, share, torch.zeros_like(share))
        kept = share[:, self.segment]
        rest = 1.0 - kept
        start_z, start_vr = _drift(
            batch_mean,
            batch_var,
            (flats[:-1, :c] - kept * picked[:-1, :c]) / rest,
            (flats[:-1, c:] - kept * picked[:-1, c:]) / rest,
            self.eps,
        )
        return start_z, start_vr, share


def _momentum_value(m: Any) -> float | None:
    """A layer's momentum as a float (None: a cumulative average; NaN: no number). A float
    is kept as it is (the common case, per step); a numpy scalar or a one-element tensor is
    read now, so a later in-place change does not rewrite this step's value."""
    if m is None or type(m) is float:
        return m
    value = setting_number(m)
    return math.nan if value is None else value


def _drift(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: |batch mean - running mean| in batch standard deviations, and the
    variance ratio max(r, 1 / r), r = (batch var + eps) / (running var + eps)."""
    var = batch_var.clamp(min=0.0) + eps
    z = (batch_mean - running_mean).abs() / var.sqrt()
    ratio = var / (running_var.clamp(min=0.0) + eps)
    return z, torch.maximum(ratio, 1.0 / ratio)


class ParamWatch:
    """The gamma/beta of the BN layers no optimizer trains, fingerprinted (one norm per tensor,
    one ``torch._foreach_norm``) at the start of each optimizer step and at its end. A change
    between one step's end and the next step's start happened outside the optimizer (a
    momentum encoder's EMA step, a ``load_state_dict``); so did any change, even during the
    step, to a tensor in none of the optimizer's param groups (an EMA step in an optimizer
    step hook). Changes the optimizer makes to its own parameters (Adam's momentum on
    parameters just frozen) are not counted. Without an optimizer, every change between two
    steps counts. A tensor whose dtype or device changed is fingerprinted anew (a cast is not
    a change). The counts stay on the parameters' device (no host transfer per step) until
    :meth:`moving` reads them. A layer whose gamma/beta changed outside the optimizer in at
    least :attr:`MIN_CHANGES` steps is a moving-average copy of another network (or one
    another optimizer trains), not a frozen layer."""

    #: steps with a change outside the optimizer that make a layer a moving-average copy
    #: (one change is a load_state_dict or a manual edit, not a copy that follows a network)
    MIN_CHANGES = 2

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.owners: list[int] = []
        self.layers: frozenset[int] = frozenset()
        #: per tensor: outside every param group of the watched optimizer
        self.unowned: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.kinds: list[tuple[torch.dtype, torch.device]] = []
        self.changes: torch.Tensor | None = None
        self.totals: Counter[int] = Counter()

    def watch(
        self,
        layer_params: Sequence[tuple[int, Sequence[torch.Tensor]]],
        optimized: frozenset[int] = frozenset(),
    ) -> None:
        """Watch these layers' parameters from now on (what was counted is kept);
        ``optimized``: ids of the tensors in the watched optimizer's param groups."""
        self._fold()
        # a structure-only (meta) parameter holds no values to fingerprint
        layer_params = [(idx, [p for p in ps if not p.is_meta]) for idx, ps in layer_params]
        self.params = [p for _, ps in layer_params for p in ps]
        self.owners = [idx for idx, ps in layer_params for _ in ps]
        self.layers = frozenset(self.owners)
        self.unowned = torch.tensor([id(p) not in optimized for p in self.params])
        self.last = self._fingerprint()

    def _fingerprint(self) -> torch.Tensor | None:
        if not self.params:
            return None
        kinds = [(p.dtype, p.device) for p in self.params]
        if kinds != self.kinds:  # cast or moved: a new baseline, nothing counted across it
            self._fold()
            self.kinds, self.last = kinds, None
        try:
            with torch.no_grad():
                norms = torch._foreach_norm([p.detach() for p in self.params])
                try:
                    return torch.stack(norms).double()
                except RuntimeError:  # mixed dtypes or devices
                    return torch.stack([n.double().cpu() for n in norms])
        except Exception:  # a tensor foreach cannot take: not watched
            return None

    def _advance(self, only_unowned: bool) -> None:
        now = self._fingerprint()
        last = self.last
        if now is not None and last is not None and now.shape == last.shape:
            same = (now == last) | (now.isnan() & last.isnan())
            changed = ~same
            if only_unowned and self.unowned is not None:
                changed &= self.unowned.to(changed.device)
            counted = changed.long()
            self.changes = counted if self.changes is None else self.changes + counted
        self.last = now

    def outside(self) -> None:
        """The start of an optimizer step (or a step's end without one): every change since
        the last fingerprint was made outside the optimizer."""
        self._advance(only_unowned=False)

    def inside(self) -> None:
        """The end of an optimizer step: only changes to tensors outside its param groups
        count (the optimizer may change its own)."""
        self._advance(only_unowned=True)

    def _fold(self) -> None:
        if self.changes is None:
            return
        per_layer: dict[int, int] = {}
        for idx, count in zip(self.owners, self.changes.cpu().tolist()):
            per_layer[idx] = max(per_layer.get(idx, 0), int(count))
        self.totals.update(per_layer)
        self.changes = None

    def moving(self) -> set[int]:
        """The layers that changed outside the optimizer in at least MIN_CHANGES steps."""
        self._fold()
        return {idx for idx, count in self.totals.items() if count >= self.MIN_CHANGES}


@dataclass
class CallRecord:
    """One train-mode call of a BN layer with grad, recorded in detail.

    ``seq`` orders forwards and backwards; ``backward_seq`` is when the gradient of the
    call's output was computed (None: no backward reached it); ``hookable`` whether the
    output required grad (only then can a backward be seen); ``in_backward`` whether the call
    itself ran during a backward pass (a recomputed forward); ``n`` the batch size, ``mean``
    the per-channel batch mean of the input and ``var`` the variance over the batch of the
    per-sample channel means (its sampling noise times ``n``).
    """

    seq: int
    n: int
    mean: torch.Tensor | None
    var: torch.Tensor | None
    hookable: bool
    in_backward: bool
    backward_seq: int | None = None
    #: the layer's gamma gradient at the call: ``None`` when cleared (``set_to_none``), a
    #: device scalar (the sum of its magnitudes: 0 when zeroed), ``False`` when not read (no
    #: other optimizer stepped before the call in its step, or no gradient to tell by)
    grad_left: Any = False

    def mark_backward(self, seq: int) -> None:
        if self.backward_seq is None:
            self.backward_seq = seq


def batches_differ(a: CallRecord, b: CallRecord) -> bool:
    """Whether two calls' batch statistics come from different distributions, beyond noise.

    A two-sample (Welch) test per channel of the batch means: ``|mean_a - mean_b|`` against
    the standard error ``sqrt(var_a / n_a + var_b / n_b)``, with ``n`` the batch size and
    ``var`` the variance over the batch of the per-sample channel means (so the spatial
    correlation of a feature map does not understate the noise). Different when at least
    ``DIFFER_FRACTION`` of the channels are more than ``DIFFER_Z`` standard errors apart.
    """
    if a.mean is None or b.mean is None or a.var is None or b.var is None:
        return False
    if a.mean.shape != b.mean.shape or a.n < 2 or b.n < 2:
        return False
    se = (a.var / a.n + b.var / b.n).clamp(min=1e-12).sqrt()
    z = (a.mean - b.mean).abs() / se
    return bool(((z > DIFFER_Z).double().mean() >= DIFFER_FRACTION).item())


def _cleared(call: CallRecord) -> bool:
    """Whether the layer's gradient was cleared (``None`` or all zeros) at the call."""
    left = call.grad_left
    if left is None:
        return True
    return isinstance(left, torch.Tensor) and float(left) == 0.0


def classify_updates(
    calls: Sequence[CallRecord], *, backward_seen: bool = True, others: Sequence[int] = ()
) -> str | None:
    """How several train-mode updates of one layer in one step came about.

    One of :data:`bncheck.checks.training.UPDATE_KINDS` (None with fewer than two calls):
    ``recompute`` if a call ran during backward; ``extra`` if a call's output required grad
    but no backward reached it; ``other-step`` if another optimizer stepped between two of
    the calls (``others``: when, on the calls' ``seq`` clock), the layer's gradients were
    cleared before the first call after the last such step, and only that call follows it:
    the network is also run in another network's training step (a GAN generator's step
    through the discriminator); when several follow it, they are classified as below.
    With forwards that share one backward (a later forward before an earlier call's
    backward): ``reused`` when their batches differ (one BN across
    time steps or scales), else ``views`` (two augmented views, ghost-BN chunks); with
    forward/backward pairs: ``sources`` when the batches differ (real and fake batches),
    else ``accumulation``. Without ``backward_seen`` (a step ends at the forward, before its
    backward) the calls count as sharing one backward.
    """
    if len(calls) < 2:
        return None
    if any(c.in_backward for c in calls):
        return "recompute"
    if backward_seen and any(c.hookable and c.backward_seq is None for c in calls):
        return "extra"
    ordered = sorted(calls, key=lambda c: c.seq)
    between = [s for s in others if ordered[0].seq < s < ordered[-1].seq]
    if between:
        # the calls after the last of those steps are the network's own step: when its
        # gradients were cleared before them (zero_grad: the other step's gradients through
        # this network are not the network's to keep), the calls before belong to the other
        # network's step; gradient accumulation beside an optimizer that steps on its own
        # keeps them, and is classified as below
        own = [c for c in ordered if c.seq > max(between)]
        if _cleared(own[0]):
            if len(own) < 2:
                return "other-step"
            ordered = own
    shared = not backward_seen or any(
        a.backward_seq is not None and b.seq < a.backward_seq
        for a, b in itertools.pairwise(ordered)
    )
    differ = any(batches_differ(a, b) for a, b in itertools.combinations(ordered, 2))
    if shared:
        return "reused" if differ else "views"
    return "sources" if differ else "accumulation"

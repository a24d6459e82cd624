"""``bncheck.Monitor``: BatchNorm diagnostics during a real training loop, at almost no cost.

::

    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in loader:          # the training loop, unchanged
            ...
    print(monitor.report())          # a bncheck.Report over the run
    monitor.history                  # pandas.DataFrame: one row per step and BN layer

How it stays cheap
------------------
BN already computes its batch statistics and folds them into its running buffers, so the
Monitor never re-reduces activations. At the end of every step it takes one snapshot: a
``cat`` of the running_mean and running_var of every BN layer (a few thousand floats) and a
``stack`` of their ``num_batches_tracked``. Each BN call appends one small tuple (layer, mode,
grad enabled, flags, input shape) from a global forward hook (:mod:`bncheck.monitor_hooks`:
the model itself carries no hook, so it can be saved, deep-copied and scripted inside the
block). Nothing is converted to Python numbers and no per-layer tensor operation runs on the
hot path; only a layer seen updating more than once in a step is recorded in detail for a
few steps, to tell accumulation and recomputation from intended recipes.

Every ``flush_every`` steps (every step in warnings mode, and when a report or the history is
asked for) the pending snapshots are compared with the ones before them, for all layers and
steps at once, and the batch statistics are recovered from the momentum update::

    running_new = (1 - f) * running_old + f * batch          (PyTorch's convention)
    batch_mean  = (running_mean_new - (1 - f) * running_mean_old) / f
    batch_var   = (running_var_new  - (1 - f) * running_var_old)  / f   # unbiased (n - 1)

with ``f = momentum``, or ``f = 1 / num_batches_tracked`` when ``momentum`` is None (a
cumulative average), computed in float64. This is exact up to float32 round-off of the
buffers (amplified by ``1 / f``) when the layer updated exactly once in the step
(Δnum_batches_tracked == 1); otherwise (accumulation, extra forwards, eval mode, ``f = 0``)
the batch statistics of that step are NaN and only the number of updates is kept. Per-layer
summaries come from one ``index_add_``; then one transfer to numpy, and the rule checks run
vectorised over the block.

The code is split by job: :mod:`bncheck.monitor_hooks` (the hooks),
:mod:`bncheck.monitor_numerics` (the flat buffers and the classification of several updates),
this module (step bookkeeping and the notes; the report itself is
:func:`bncheck.engine.run_report` over the run's observations) and :mod:`bncheck.monitor_views`
(pandas and matplotlib).

What is kept (bounded memory)
-----------------------------
- per step and BN layer: the ``STAT_COLUMNS`` and ``COUNT_COLUMNS`` of
  :mod:`bncheck.checks.training` (16 numbers, about 100 bytes), for the last ``max_history``
  steps;
- per channel: running mean/var and the recovered batch mean/var for the last
  ``channel_history`` steps (:meth:`Monitor.channels`);
- per (rule, layer): the step where a problem started, how many steps it held, the numbers at
  its first step. Detection covers every step, also those dropped from the history.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from . import monitor_views
from .checks.training import (
    C_BACKWARD,
    C_EVAL,
    C_FED,
    C_INFER,
    C_KEPT_EVAL,
    C_MINBATCH,
    C_MINSAMPLES,
    C_NOGRAD,
    C_RECAL,
    C_STILL,
    C_TRAIN,
    COUNT_COLUMNS,
    S_MOVED,
    S_NONFINITE,
    STAT_COLUMNS,
    TRAINING_RULES,
    RunObservations,
    StepBlock,
    conditions,
    episode_finding,
    record_episodes,
    record_rank_check,
    small_batch_findings,
)
from .context import AuditContext, AuditFacts
from .discovery import BNLayer, is_compiled, unwrap_model
from .engine import first_line, prepare, run_report
from .errors import BNCheckWarning, UsageError
from .monitor_hooks import BACKWARD, FED, INFERENCE, KEPT_EVAL, RECALIBRATION, STILL, Call, Recorder
from .monitor_numerics import FlatBuffers, ParamWatch, Snapshot
from .render import visible
from .report import Report

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .distributed import DistInfo

__all__ = ["Monitor"]

_BIG = np.iinfo(np.int64).max
#: the statistics updates a partial step (the calls after the last step) may make: it is no
#: optimizer step, so ``multiple-updates-per-step`` does not judge it
_PARTIAL_STEP_UPDATES = 1 << 30
#: rules that judge a layer no optimizer trains as frozen: with warn=True, for such a layer
#: they wait ParamWatch.MIN_CHANGES steps (a moving-average copy moves from its second step,
#: once the network it follows has taken an optimizer step); held warnings go out at detach
_FROZEN_JUDGED = frozenset({"frozen-bn-drift", "stats-updated-without-grad"})

_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (the training loop), past
    bncheck's and torch's own frames (hooks run deep inside ``module.__call__``)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"Monitor({name}=...) must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _first_steps(steps: Sequence[int], shown: int = 5) -> str:
    """The first ``shown`` of ``steps``, comma-separated, with " ..." when there are more."""
    return ", ".join(str(s) for s in steps[:shown]) + (" ..." if len(steps) > shown else "")


def count_calls(
    pending_calls: Sequence[Sequence[Call]], n_layers: int, tracks: np.ndarray
) -> np.ndarray:
    """``[S, L, len(COUNT_COLUMNS)]`` from the calls the BN hooks recorded in each step."""
    counts = np.zeros((len(pending_calls), n_layers, len(COUNT_COLUMNS)), dtype=np.int64)
    counts[..., C_MINBATCH : C_MINSAMPLES + 1] = _BIG
    for s, calls in enumerate(pending_calls):
        block = counts[s]
        trained_with_grad = False
        for idx, training, grad, flags, shape in calls:
            row = block[idx]
            if not training:
                row[C_EVAL] += 1
                if flags & KEPT_EVAL:
                    row[C_KEPT_EVAL] += 1
                continue
            row[C_TRAIN] += 1
            trained_with_grad = trained_with_grad or grad
            if flags & STILL:
                row[C_STILL] += 1  # momentum 0: normalised, no update of the statistics
            elif grad:
                if flags & BACKWARD:
                    row[C_BACKWARD] += 1
            elif tracks[idx]:
                if flags & RECALIBRATION:
                    row[C_RECAL] += 1
                else:
                    row[C_NOGRAD] += 1
                    if flags & INFERENCE:
                        row[C_INFER] += 1
                    if flags & FED:
                        row[C_FED] += 1
            if shape is not None and len(shape) >= 1:
                n = int(shape[0])
                samples = math.prod(shape) // int(shape[1]) if len(shape) >= 2 and shape[1] else n
                row[C_MINBATCH] = min(row[C_MINBATCH], n)
                row[C_MINSAMPLES] = min(row[C_MINSAMPLES], samples)
        if trained_with_grad:
            # other BN layers trained in this step: the ones that ran in eval mode were kept
            # there by the recipe (a frozen backbone's .eval() inside model.train()), not
            # left there by a forgotten model.train()
            block[:, C_KEPT_EVAL] = block[:, C_EVAL]
    no_train = counts[..., C_TRAIN] == 0
    counts[..., C_MINBATCH][no_train] = 0
    counts[..., C_MINSAMPLES][no_train] = 0
    return counts


Pending = tuple[int, "Snapshot | None", list[Call], tuple[Any, ...]]


class Monitor:
    """Watch the BatchNorm layers of a model during training and report what goes wrong.

    Args:
        model: the model being trained (DDP/DataParallel wrappers are looked through).
        optimizer: the optimizer; a step is one ``optimizer.step()`` (through
            ``register_step_post_hook``). Without it, a step is one top-level forward call in
            train mode with grad enabled, and the rules that need optimizer steps are weaker
            (the report says so).
        warn: emit a :class:`bncheck.BNCheckWarning` as soon as a problem appears (each rule
            and layer once). Checks then run at every step (one small host transfer a step).
        sync_every: under ``torch.distributed`` with more than one rank, compare running
            statistics across ranks every this many steps (an ``all_gather`` of 4 floats per
            layer at the start of the next train-mode forward, which every rank runs).
        select, ignore: rule ids for :meth:`report` and the warnings, as in ``bncheck.audit``.
        channel_history: how many recent steps of per-channel values to keep.
        max_history: how many recent steps of per-layer summaries ``history`` keeps.
        flush_every: check pending steps every this many steps (memory vs. host transfers).
        process_group: the process group to compare ranks over (default: the world).
        source: a name for the run, shown in the report.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop. A step it skips (inf or
            NaN gradients) calls no ``optimizer.step()``; with the scaler the Monitor sees the
            skip (the scale backed off) and does not count the skipped iteration's statistics
            update as a second update of the next step (``multiple-updates-per-step``).
        **tolerances: overrides of the rules' tolerances (``bncheck.rules()`` lists them).

    The Monitor never changes the model, its buffers, or any RNG state: a monitored run
    trains bit for bit like an unmonitored one. Hooks are removed by :meth:`detach` (also on
    exception when used as a context manager).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        warn: bool = False,
        sync_every: int = 50,
        select: str | Iterable[str] | None = None,
        ignore: str | Iterable[str] | None = None,
        channel_history: int = 16,
        max_history: int = 100_000,
        flush_every: int = 64,
        process_group: Any = None,
        source: str | None = None,
        scaler: Any = None,
        **tolerances: Any,
    ) -> None:
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("get_scale", "get_backoff_factor", "is_enabled")
        ):
            raise UsageError(
                f"Monitor(scaler=...) needs a torch.amp.GradScaler, got {type(scaler).__name__}"
            )
        self.scaler = scaler
        if optimizer is not None and not (
            hasattr(optimizer, "param_groups") and hasattr(optimizer, "register_step_post_hook")
        ):
            raise UsageError(
                f"Monitor(optimizer=...) needs a torch.optim.Optimizer (torch >= 2.0), got "
                f"{type(optimizer).__name__}; pass the optimizer your loop calls .step() on, "
                "or leave it out to count train-mode forwards as steps"
            )
        self.sync_every = _positive_int("sync_every", sync_every)
        self.channel_history = _positive_int("channel_history", channel_history, 0)
        self.max_history = _positive_int("max_history", max_history)
        self.flush_every = _positive_int("flush_every", flush_every)
        self._select, self._ignore, self._tolerances = select, ignore, dict(tolerances)
        self._ctx: AuditContext = prepare(
            model, select=select, ignore=ignore, tolerances=tolerances, source=source
        )
        self.model = model
        self.optimizer = optimizer
        self.warn = bool(warn)
        self.source = source
        self.process_group = process_group
        self._inner = unwrap_model(model)
        self.layers: list[BNLayer] = self._ctx.layers
        self._recorder = Recorder(self, self.layers, self._inner)
        self._attached = False
        self._ever_attached = False
        self._reset()

    # ---- state --------------------------------------------------------------------------
    def _reset(self) -> None:
        layers = self.layers
        n = len(layers)
        self._flat = FlatBuffers(layers)
        self._tracks = np.array(
            [
                lyr.has_running_stats and lyr.track_running_stats and not lyr.lazy_uninitialized
                for lyr in layers
            ],
            dtype=bool,
        )
        self._sync_bn = np.array([lyr.kind == "SyncBatchNorm" for lyr in layers], dtype=bool)
        self._batch_stats = np.array([lyr.uses_batch_stats for lyr in layers], dtype=bool)
        #: per layer: steps with train-mode calls in which its finite running buffers moved
        #: (a counterless BN that updates them batch-normalises, whatever its signature)
        self._buffer_moves = np.zeros(n, dtype=np.int64)
        #: the gamma/beta of layers no optimizer trains, to tell a frozen layer from a
        #: moving-average copy (its parameters change outside the optimizer's step)
        self._params = ParamWatch()
        warmup = []
        for lyr in layers:
            m = lyr.momentum
            # judge drift once the initial statistics weigh < 5% ((1 - m)^k), at most 30 updates
            warmup.append(
                10.0 if m is None or m <= 0 else float(min(math.ceil(3.0 / min(m, 1.0)), 30))
            )
        self._drift_warmup = np.array(warmup)
        self._step = 0
        self._trailing_steps = 0  # partial steps closed at detach (calls after the last step)
        #: per pending step: iterations the GradScaler skipped before it, or the scale and
        #: growth tracker read at its end (device tensors: counted at the flush, no host
        #: sync per step)
        self._skipped: list[int | tuple[Any, Any]] = []
        self._last_scale: float | None = None
        #: the growth tracker at the last step's end, before its update (None: unknown)
        self._last_tracker: int | None = None
        self._base: Snapshot | None = None
        self._pending: list[Pending] = []
        self._chunks: deque[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = deque()
        self._history_steps = 0
        # (step, per-channel [running_mean, running_var, batch_mean, batch_var] as [4, C])
        self._channels: deque[tuple[int, torch.Tensor]] = deque(maxlen=self.channel_history or None)
        self._bn_params = [[p for p in lyr.params] for lyr in layers]
        self._flag_key: Any = None
        self._flags: tuple[tuple[bool, ...], tuple[bool, ...], tuple[str, ...]] = ((), (), ())
        self._warned: set[tuple[str, int]] = set()
        self._failure: str | None = None
        self._dist: DistInfo | None = None
        self._sync_due = True
        self._last_rank_check: int | None = None
        self._compiled = is_compiled(self.model)
        self._hooks_silent = False
        self._run = RunObservations(
            layer_names=[lyr.name for lyr in layers],
            layer_kinds=[lyr.kind for lyr in layers],
            step_kind="optimizer" if self.optimizer is not None else "forward",
            drift_judged=np.zeros(n, dtype=np.int64),
        )

    # ---- attach / detach ------------------------------------------------------------------
    def attach(self) -> Monitor:
        """Register the hooks. Returns the Monitor, so ``monitor = Monitor(...).attach()``."""
        if self._attached:
            raise UsageError("this Monitor is already attached; call detach() first")
        from .distributed import dist_info

        self._dist = dist_info(self.process_group)
        self._run.distributed = self._dist is not None
        if self._dist is not None:
            self._run.world_size, self._run.rank = self._dist.world_size, self._dist.rank
        if self._pending:  # left by an exception exit; judged against the old baseline
            self._flush()
        self._recorder.register(
            optimizer=self.optimizer,
            pre_hook=self._dist is not None,
            per_module=is_compiled(self.model),
        )
        # a Monitor dropped without detach(): its process-wide hooks (which hold the model
        # and the optimizer) go with it, not at the next watched call that may never come
        weakref.finalize(self, self._recorder.remove)
        if self._flat.modules:  # the baseline: what happened while detached is not judged
            self._base = self._flat.snapshot()
            self._flat.rebase()
        if self.scaler is not None and self.scaler.is_enabled():  # skips before step 1 count
            self._last_scale = float(self.scaler.get_scale())
            self._last_tracker = None  # read after an update, not before one: not comparable
        self._recorder.reset_step()
        self._watch_params(self._trainable_flags()[0])
        self._attached = True
        self._ever_attached = True
        return self

    def detach(self) -> None:
        """Remove every hook and check the pending steps. Safe to call twice."""
        try:
            self._recorder.remove()
        finally:
            self._attached = False
            self._safely(self._close_trailing_step)
            if self._pending:
                self._flush()
            if self.warn:  # the warnings held back for a later flush that will not come
                self._run.moving_copies |= self._params.moving()
                self._safely(lambda: self._emit_warnings(final=True))

    def _close_trailing_step(self) -> None:
        """Judge the BN calls made after the last step (e.g. a final validation pass).

        They form one last, partial step in which no layer counts as being trained, so a
        validation pass in eval mode is not mistaken for training in eval mode, while
        statistics updated without grad or in frozen layers are still caught.
        """
        calls = self._recorder.take_calls()
        if not calls:
            return
        _, frozen, reason = self._trainable_flags()
        self._step += 1
        self._trailing_steps += 1
        snap = self._flat.snapshot() if self._flat.modules else None
        self._note_update_kinds(self._recorder.finish_step(calls))
        self._pending.append((self._step, snap, calls, ((False,) * len(frozen), frozen, reason)))
        self._skipped.append(_PARTIAL_STEP_UPDATES)

    def __deepcopy__(self, memo: dict[int, Any]) -> Monitor:
        # A Monitor is not copied along with something that holds it: the copy would watch
        # the same model twice.
        return self

    def __enter__(self) -> Monitor:
        return self.attach()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.detach()
            return
        self._recorder.remove()  # on exception: no checks that could raise over the user's error
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def steps(self) -> int:
        """Steps observed so far (optimizer steps, or train-mode forwards without optimizer)."""
        return self._step - self._trailing_steps

    # ---- step bookkeeping (called from the hooks) --------------------------------------------
    def _safely(self, work: Any) -> None:
        """Run the Monitor's own work in a hook; if it fails, stop watching, not training."""
        if self._failure is not None:
            return
        try:
            work()
        except Warning:
            raise  # a BNCheckWarning turned into an error by the user's warning filters
        except Exception as exc:
            self._failure = f"the Monitor stopped watching at step {self._step}: {first_line(exc)}"
            warnings.warn(BNCheckWarning(visible(self._failure)), stacklevel=_user_stacklevel())

    def _before_train_forward(self) -> None:
        """At the start of a train-mode forward with grad: the cross-rank comparison, if due
        (every rank runs this forward, so the collective cannot hang)."""
        if self._dist is not None and self._sync_due:
            self._sync_due = False
            self._safely(self._compare_ranks)

    def _trainable_flags(self) -> tuple[tuple[bool, ...], tuple[bool, ...], tuple[str, ...]]:
        opt = self.optimizer
        rg = tuple(p.requires_grad for ps in self._bn_params for p in ps)
        groups = tuple(len(g["params"]) for g in opt.param_groups) if opt is not None else ()
        key = (rg, groups)
        if key == self._flag_key:
            return self._flags
        ids = {id(p) for g in opt.param_groups for p in g["params"]} if opt is not None else None
        trainable, frozen, reason = [], [], []
        for ps in self._bn_params:
            grad = any(p.requires_grad for p in ps)
            optimized = ids is None or any(id(p) in ids for p in ps)
            ok = bool(ps) and grad and optimized
            trainable.append(ok)
            frozen.append(bool(ps) and not ok)
            reason.append(
                "gamma/beta have requires_grad=False"
                if not grad
                else "gamma/beta are in no optimizer param group"
            )
        self._flag_key = key
        self._flags = (tuple(trainable), tuple(frozen), tuple(reason))
        self._watch_params(trainable)
        return self._flags

    def _watch_params(self, trainable: Sequence[bool]) -> None:
        """Watch the gamma/beta of each layer no optimizer trains now, none of the others."""
        opt = self.optimizer
        optimized = (
            frozenset(id(p) for g in opt.param_groups for p in g["params"])
            if opt is not None
            else frozenset()
        )
        self._params.watch(
            [
                (idx, ps)
                for idx, ps in enumerate(self._bn_params)
                if ps and not (idx < len(trainable) and trainable[idx])
            ],
            optimized,
        )

    def _before_step(self) -> None:
        """At the start of an optimizer step: gamma/beta changes since the last step's end
        were made outside the optimizer."""
        self._params.outside()

    def _end_step(self) -> None:
        if self.optimizer is not None:
            self._params.inside()
        else:  # a step is a forward: every change since the last one counts
            self._params.outside()
        self._step += 1
        snap = self._flat.snapshot() if self._flat.modules else None
        calls = self._recorder.take_calls()
        self._note_update_kinds(self._recorder.finish_step(calls))
        self._pending.append((self._step, snap, calls, self._trainable_flags()))
        self._skipped.append(self._scale_now())
        if self._dist is not None and self._step % self.sync_every == 0:
            self._sync_due = True
        if self.warn or len(self._pending) >= self.flush_every:
            self._flush()

    def _batch_stats_now(self, stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Which layers normalise with batch statistics: by signature, or (a layer with
        FrozenBatchNorm's signature) once its finite running buffers moved in at least two
        steps with train-mode calls (one move is a load_state_dict, not an update)."""
        with np.errstate(invalid="ignore"):
            moved = (
                (stats[..., S_MOVED] > 0)
                & (stats[..., S_NONFINITE] == 0)
                & (counts[..., C_TRAIN] > 0)
            )
        self._buffer_moves += moved.sum(axis=0)
        return self._batch_stats | (self._buffer_moves >= 2)

    def _note_update_kinds(self, kinds: dict[int, str]) -> None:
        for idx, kind in kinds.items():
            self._run.update_kinds.setdefault(idx, Counter())[kind] += 1

    def _scale_now(self) -> int | tuple[Any, Any]:
        """The GradScaler's scale and growth tracker at the end of a step (before its
        ``update()``), read without a host sync: copies of its tensors (``update()`` changes
        them in place), or its initial values before the first ``scale()``; 0 (no skips)
        without an enabled scaler."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return 0
        read = getattr(scaler, "_get_scale_async", None)
        scale = read() if callable(read) else None
        scale = scale.detach().clone() if isinstance(scale, torch.Tensor) else scaler.get_scale()
        tracker = getattr(scaler, "_growth_tracker", None)
        tracker = tracker.detach().clone() if isinstance(tracker, torch.Tensor) else None
        return scale, tracker

    def _skips(self, entries: list[int | tuple[Any, Any]]) -> list[int]:
        """The iterations the GradScaler skipped before each pending step, from the scales
        and growth trackers read at their ends (one host transfer for the whole block)."""
        tensors = [v for e in entries if isinstance(e, tuple) for v in e if torch.is_tensor(v)]
        values = iter(
            torch.stack([t.to(tensors[0].device, torch.float32).reshape(()) for t in tensors])
            .cpu()
            .tolist()
            if tensors
            else []
        )
        skips: list[int] = []
        for entry in entries:
            if isinstance(entry, int):
                skips.append(entry)
                continue
            scale, tracker = (next(values) if torch.is_tensor(v) else v for v in entry)
            skips.append(
                self._scaler_skips(float(scale), None if tracker is None else round(tracker))
            )
        return skips

    def _scaler_skips(self, scale: float, tracker: int | None = None) -> int:
        """Iterations the GradScaler skipped since the last step, from the scale and growth
        tracker read at this step's end (before its ``update()``). Each skip multiplies the
        scale by the backoff factor and resets the tracker; a step that ran adds one to the
        tracker, or, at the growth interval, multiplies the scale by the growth factor and
        resets the tracker. So a tracker above 0 means no skip; at 0 the scale tells, grown
        first when the last step's update reached the interval (a growth then a skip leave
        the scale where it was)."""
        scaler = self.scaler
        assert scaler is not None
        last, self._last_scale = self._last_scale, scale
        last_tracker, self._last_tracker = self._last_tracker, tracker
        if tracker is not None and tracker > 0:
            return 0
        backoff = float(scaler.get_backoff_factor())
        expected = last
        if (
            last is not None
            and tracker == 0
            and last_tracker is not None
            and last_tracker + 1 >= int(scaler.get_growth_interval())
        ):
            expected = last * float(scaler.get_growth_factor())
        if expected is None or not scale < expected or not 0.0 < backoff < 1.0 or scale <= 0.0:
            return 0
        return max(0, round(math.log(scale / expected) / math.log(backoff)))

    # ---- checks ----------------------------------------------------------------------------
    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        skipped, self._skipped = self._skipped, []
        if not pending:
            return
        n_layers = len(self.layers)
        steps = np.array([p[0] for p in pending], dtype=np.int64)
        stats = np.full((len(pending), n_layers, len(STAT_COLUMNS)), np.nan)
        have = [i for i, p in enumerate(pending) if p[1] is not None]
        if have and self._base is not None:
            snaps = [pending[i][1] for i in have]
            summary, rm, rv, bm, bv = self._flat.summarize(self._base, snaps)  # type: ignore[arg-type]
            self._base = snaps[-1]  # type: ignore[assignment]
            stats[np.ix_(have, self._flat.indices)] = summary.cpu().numpy()
            keep = min(self.channel_history, len(have))
            if keep:
                per_channel = torch.stack([rm, rv, bm, bv], dim=1)[-keep:]  # [keep, 4, C]
                for j in range(keep):
                    step = int(steps[have[len(have) - keep + j]])
                    self._channels.append((step, per_channel[j]))
        counts = count_calls([p[2] for p in pending], n_layers, self._tracks)
        trainable = np.array([p[3][0] for p in pending], dtype=bool).reshape(len(pending), -1)
        frozen = np.array([p[3][1] for p in pending], dtype=bool).reshape(len(pending), -1)
        reasons = pending[-1][3][2]
        block = StepBlock(
            stats,
            counts,
            trainable,
            frozen,
            self._ctx.tolerances,
            self._tracks,
            self._drift_warmup,
            distributed=self._dist is not None,
            sync_bn=self._sync_bn,
            expected_updates=1 + np.array(self._skips(skipped), dtype=np.int64),
            frozen_reason=reasons or ("",) * n_layers,
            batch_stats=self._batch_stats_now(stats, counts),
        )
        if self._compiled and not self._hooks_silent:
            # statistics updated with no BN call seen: dynamo compiled the model before the
            # Monitor's hooks existed and does not re-trace for them
            with np.errstate(invalid="ignore"):
                silent = (np.nan_to_num(block.updates) > 0) & (counts[..., C_TRAIN] == 0)
            self._hooks_silent = bool(silent.any())
        kept = trainable & (counts[..., C_KEPT_EVAL] > 0) & (counts[..., C_TRAIN] == 0)
        self._run.kept_eval.update(int(i) for i in np.flatnonzero(kept.any(axis=0)))
        masks = conditions(block)
        self._run.moving_copies |= self._params.moving()
        assert self._run.drift_judged is not None
        self._run.drift_judged += masks["_drift_judged"].sum(axis=0)
        recal_steps = steps[masks["_recalibration"].any(axis=1)].tolist()
        self._run.recalibrations.extend(int(s) for s in recal_steps)
        fed = (counts[..., C_FED] > 0).any(axis=1)  # counted for tracking layers only
        self._run.fed_steps.extend(int(s) for s in steps[fed].tolist())
        record_episodes(self._run.episodes, masks, steps, block)
        self._run.steps = self._step - self._trailing_steps
        self._chunks.append((steps, stats.astype(np.float32), counts, trainable))
        self._history_steps += len(steps)
        while self._chunks and self._history_steps - len(self._chunks[0][0]) >= self.max_history:
            self._history_steps -= len(self._chunks.popleft()[0])
        if self.warn:
            self._emit_warnings()

    def _emit_warnings(self, final: bool = False) -> None:
        """Warn about the new problems; ``final`` (at detach): also those held back."""
        wanted = set(self._ctx.rule_ids)
        if "small-batch" in wanted:
            # grouped as in the report: one warning for the layers that saw the same batch
            small = [
                ep
                for key, ep in self._run.episodes.items()
                if ep.rule == "small-batch" and key not in self._warned
            ]
            for grouped, members in small_batch_findings(self._ctx, self._run, small):
                self._warned.update(("small-batch", ep.layer) for ep in members)
                if grouped.severity.value != "info":
                    warnings.warn(
                        BNCheckWarning(visible(f"[{grouped.rule}] {grouped.message}")),
                        stacklevel=_user_stacklevel(),
                    )
        for key, ep in list(self._run.episodes.items()):
            if key in self._warned or ep.rule not in wanted or ep.rule == "small-batch":
                continue
            if (
                not final
                and ep.rule in _FROZEN_JUDGED
                and ep.layer in self._params.layers
                and ep.layer not in self._run.moving_copies
                and self._step - ep.first_step < ParamWatch.MIN_CHANGES
            ):
                continue  # not yet told from a moving-average copy: at a later flush
            if not final and TRAINING_RULES[ep.rule].whole_run:
                continue  # what it says is known at the run's end
            if (
                not final
                and ep.rule == "multiple-updates-per-step"
                and not ep.first.get("recomputed")
                and not self._run.update_kinds.get(ep.layer)
                and self._recorder.classifying(ep.layer)
            ):
                # its cause is being classified over the next steps (two views are fine); a
                # repetition those steps do not see is warned when they are over
                continue
            finding = episode_finding(self._ctx, self._run, ep)
            if finding is None or finding.severity.value == "info":
                continue
            self._warned.add(key)
            warnings.warn(
                BNCheckWarning(visible(f"[{finding.rule}] {finding.message}")),
                stacklevel=_user_stacklevel(),
            )

    def _compare_ranks(self) -> None:
        from .distributed import gather_checksums, layer_checksums, rank_divergence

        assert self._dist is not None
        device = self._flat.device if self._flat.modules else torch.device("cpu")
        if self._dist.backend == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        local = layer_checksums([lyr.module for lyr in self.layers], device)
        gathered = gather_checksums(local, self._dist).cpu().numpy()
        if self._last_rank_check == self._step:
            return  # this state was compared already (a final comparison right after one)
        self._last_rank_check = self._step
        rel = rank_divergence(gathered)
        self._run.rank_checks += 1
        new = record_rank_check(
            self._run.episodes,
            self._step,
            rel,
            float(self._ctx.tol("rank_rtol")),
            self._dist.world_size,
        )
        if self.warn and new:
            self._emit_warnings()

    # ---- results ---------------------------------------------------------------------------
    def report(self, *, merge: bool = True) -> Report:
        """A :class:`bncheck.Report` over the run so far.

        The model rules (settings, buffers, optimizer) judge the model as it is now; the
        training-run rules judge what happened at each step, and each of their findings names
        the step where the problem started (``details["step"]``). Under ``torch.distributed``
        with ``merge=True`` this is a collective (call it on every rank): the running
        statistics are compared across ranks once more (so a run shorter than ``sync_every``
        or a divergence in the last interval is caught; not under a DDP that broadcasts
        buffers at each forward, whose ranks differ after the last step by design), and
        rank 0 gets one report merged
        over all ranks, the other ranks their own.

        The Monitor only gathers: the run's observations and its notes go to
        :func:`bncheck.engine.run_report`, which decides which rules run and why the others
        were skipped, and assembles the report.
        """
        self._flush()
        if self._dist is not None and merge:
            from .distributed import syncs_buffers_at_forward

            if not syncs_buffers_at_forward(self.model):  # same answer on every rank
                self._safely(self._compare_ranks)
        report = run_report(
            self._inner,
            self._run,
            optimizer=self.optimizer,
            select=self._select,
            ignore=self._ignore,
            tolerances=self._tolerances,
            source=self.source,
            facts=AuditFacts(notes=tuple(self._notes())),
            settings={"steps": self._step},
        )
        if self._dist is not None and merge:
            from .distributed import gather_reports

            texts = gather_reports(report.to_json(indent=None), self._dist)
            if texts is not None:
                parts = [Report.from_json(t) for t in texts]
                for part in parts:
                    part.settings = report.settings
                merged = Report.merge(parts, source=self.source)
                return Report(
                    merged.findings,
                    source=self.source,
                    skipped=report.skipped,
                    notes=merged.notes,
                    settings=report.settings,
                    layers=report.layers,
                )
        return report

    def _notes(self) -> list[str]:
        """What the report should say about how the run was watched."""
        notes: list[str] = []
        steps = self._step - self._trailing_steps
        if self._trailing_steps:
            notes.append(
                f"BN calls after the last step were judged as one more, partial step ({steps + 1})"
            )
        if self.optimizer is not None:
            notes.append(f"monitored {steps} optimizer step(s)")
            if steps == 0 and self._trailing_steps:
                notes.append(
                    "BN layers ran but the optimizer never stepped: is optimizer= the one "
                    "whose step() the loop calls? (a wrapper such as SAM steps its base "
                    "optimizer: pass that one)"
                )
        else:
            notes.append(
                f"monitored {steps} step(s); without an optimizer a step is a "
                "top-level train-mode forward with grad enabled, so 'stats-not-"
                "updating' cannot see training that runs in eval mode"
            )
        recal = self._run.recalibrations
        if recal:
            where = _first_steps(recal)
            notes.append(
                f"recalibration pass(es) of the running statistics recognised at step(s) "
                f"{where} (no grad with momentum None as torch.optim.swa_utils.update_bn, "
                "momentum 1 as fvcore's update_bn_stats (PreciseBN), reset statistics or BN "
                "alone in train mode): not judged as validation"
            )
        fed = self._run.fed_steps
        if fed:
            where = _first_steps(fed)
            notes.append(
                f"a train-mode forward without grad right before another optimizer's step "
                f"(no forward with grad of the layer in between) at {len(fed)} step(s) "
                f"({where}): taken for a network making another's inputs (a GAN generator "
                "making the discriminator's fakes under no_grad), so its statistics updates "
                "were not judged as validation; if it was validation, a probe's features or "
                "an agent acting, in train mode, call model.eval() before it"
            )
        views = sorted(
            self.layers[i].name
            for i, kinds in self._run.update_kinds.items()
            if kinds and max(kinds, key=lambda k: kinds[k]) == "views"
        )
        if views:
            notes.append(
                f"{len(views)} BN layer(s) ran several times per step on batches of one "
                "distribution trained by one backward (two views, ghost BN, a siamese "
                f"encoder; e.g. {views[0]}): intended, not reported"
            )
        moving = sorted(self.layers[i].name for i in self._run.moving_copies)
        if moving:
            notes.append(
                f"{len(moving)} BN layer(s) had their gamma/beta changed while the optimizer "
                "watched did not train them: a moving-average copy (a MoCo key encoder, a BYOL "
                f"target, a mean teacher) or a network another optimizer trains (e.g. "
                f"{moving[0]}); not judged as frozen BN, and their train-mode forwards without "
                "grad not as validation"
            )
        kept_eval = sorted(self.layers[i].name for i in self._run.kept_eval)
        if kept_eval:
            notes.append(
                f"{len(kept_eval)} BN layer(s) with trainable gamma/beta ran in eval mode while "
                "the module holding them, or other BN layers, trained (running statistics "
                "kept frozen by the recipe: mmdetection's norm_eval, a backbone's .eval() "
                f"inside model.train(); e.g. {kept_eval[0]}): not reported by "
                "stats-not-updating"
            )
        if self._hooks_silent:
            notes.append(
                "the compiled model was compiled before the Monitor attached, and dynamo does "
                "not re-trace for new hooks: the BN calls were not seen (only the running "
                "buffers), so the rules that count calls could not judge the run; attach the "
                "Monitor before the model's first call, or call torch.compiler.reset() first"
            )
        if self._failure is not None:
            notes.append(self._failure)
        if not self._ever_attached:
            notes.append("the Monitor was never attached: use `with Monitor(...)` or attach()")
        if self._run.distributed:
            notes.append(
                f"rank {self._run.rank} of {self._run.world_size}; running statistics "
                f"compared across ranks {self._run.rank_checks} time(s)"
            )
        skipped_lazy = [lyr.name for lyr in self.layers if lyr.lazy_uninitialized]
        if skipped_lazy:
            notes.append(
                f"lazy layers not initialised at attach ({', '.join(skipped_lazy)}) "
                "are not watched: run one forward before attaching"
            )
        return notes

    # ---- views (bncheck.monitor_views) -------------------------------------------------------
    @property
    def history(self) -> pd.DataFrame:
        """One row per step and BN layer, built from the compact per-step records.

        Columns: ``step``, ``layer``, ``mode`` ("train", "eval", "train+eval" or "unused"),
        ``grad_enabled`` (whether the train-mode calls ran with grad; None without any),
        ``batch_size`` and ``samples_per_channel`` (smallest of the step's train-mode calls),
        ``updates`` (Δnum_batches_tracked), then the per-layer summaries of
        :data:`bncheck.checks.training.STAT_COLUMNS` (means over channels).
        """
        return monitor_views.history(self)

    def channels(self, layer: str) -> pd.DataFrame:
        """Per-channel values of one layer for the last ``channel_history`` steps.

        Columns: ``step``, ``channel``, ``running_mean``, ``running_var``, ``batch_mean``,
        ``batch_var`` (the unbiased batch variance recovered from the update; NaN when the
        layer did not update exactly once in that step).
        """
        return monitor_views.channels(self, layer)

    def plot(self, path: str | Path, layers: Sequence[str] | None = None) -> Path:
        """Write a PNG of per-layer statistics over the steps; returns the path.

        Four panels: mean |batch mean|, mean batch variance, mean |running_mean| and mean
        running_var, one line per layer. Needs matplotlib (``pip install 'bncheck[plot]'``).
        """
        return monitor_views.plot(self, path, layers)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return (
            f"<bncheck.Monitor {state}: {len(self.layers)} BN layers, {self._step} "
            f"{self._run.step_word}s>"
        )

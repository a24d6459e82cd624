"""Check functions of the rules that need a training run (``bncheck.Monitor``).

The Monitor records, at every step, one row of numbers per BN layer (``STAT_COLUMNS``, from
the running-statistics buffers) and one row of call counters (``COUNT_COLUMNS``, from a
forward hook on each BN layer). Each training-run rule below is one class with, side by side:

- ``when(block)``: a boolean mask ``[steps, layers]``, where the problem holds;
- ``first(block, i, layer)``: the numbers of the step where it started (kept in the episode);
- ``says(ctx, run, ep)``: the finding's text, hint and extra details (or None: not a problem).

:func:`step_conditions` evaluates every rule's ``when`` over a block of steps,
:func:`record_episodes` keeps, for every (rule, layer), the step where the problem started and
the numbers at that step, and each rule's check function (registered by :func:`run_rule`)
turns those episodes into findings. ``ctx.run`` is a :class:`RunObservations`.

What "a step" is: an ``optimizer.step()`` call when the Monitor has an optimizer; otherwise a
top-level forward call in train mode with grad enabled. Steps count from 1, and what happens
between step k and step k + 1 (a validation loop, the forwards of an accumulation) belongs to
step k + 1. ``details["step"]`` of a finding is the step where its problem first held; a
cross-rank comparison runs at the start of a forward and belongs to the last completed step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from ..context import AuditContext
from ..discovery import BNLayer
from ..report import Finding
from .registry import check

__all__ = [
    "STAT_COLUMNS",
    "COUNT_COLUMNS",
    "UPDATE_KINDS",
    "Episode",
    "RunObservations",
    "StepBlock",
    "TRAINING_RULES",
    "step_conditions",
    "record_episodes",
    "record_rank_check",
    "run_findings",
    "episode_finding",
    "small_batch_findings",
]

#: Per-step, per-layer numbers derived from the running-statistics buffers (float64).
#:
#: ``updates``: Δnum_batches_tracked since the previous step (NaN without a counter).
#: ``num_batches_tracked``: the counter after the step.
#: ``moved``: sum over channels of |Δrunning_mean| + |Δrunning_var| (non-finite counts as moved).
#: ``nonfinite``: number of channels whose running_mean or running_var is NaN/Inf.
#: ``batch_mean_abs`` / ``batch_var``: mean over channels of |batch mean| and of the unbiased
#: batch variance, recovered from the momentum update (NaN unless exactly one update happened).
#: ``running_mean_abs`` / ``running_var``: mean over channels of |running_mean|, running_var.
#: ``drift_z``: mean over channels of |batch mean - previous running_mean| / sqrt(batch var + eps).
#: ``drift_var_ratio``: mean over channels of max(r, 1/r), r = (batch var + eps) /
#: (previous running_var + eps).
#: ``start_drift_z`` / ``start_drift_var_ratio``: the same two against the previous running
#: statistics with their starting values' share taken out (the bias correction of an
#: exponential average, :meth:`bncheck.monitor_numerics.FlatBuffers.summarize`): what the
#: drift would be once the average has forgotten the values it started from (when the
#: Monitor was attached, or after a step that was not one exact update).
#: ``start_share``: that share, the product of ``1 - momentum`` over the exact updates since.
STAT_COLUMNS: tuple[str, ...] = (
    "updates",
    "num_batches_tracked",
    "moved",
    "nonfinite",
    "batch_mean_abs",
    "batch_var",
    "running_mean_abs",
    "running_var",
    "drift_z",
    "drift_var_ratio",
    "start_drift_z",
    "start_drift_var_ratio",
    "start_share",
)
(
    S_UPDATES,
    S_NBT,
    S_MOVED,
    S_NONFINITE,
    S_BMEAN,
    S_BVAR,
    S_RMEAN,
    S_RVAR,
    S_Z,
    S_VR,
    S_START_Z,
    S_START_VR,
    S_START_SHARE,
) = range(13)

#: Per-step, per-layer counters from the BN forward hooks (int64).
#:
#: ``train_calls``: calls in train mode; ``eval_calls``: calls in eval mode;
#: ``nograd_updates``: train-mode calls with grad disabled (``no_grad`` or ``inference_mode``)
#: of a layer that tracks running statistics, other than recalibration; ``inference_updates``:
#: those under ``inference_mode``; ``min_batch`` / ``min_samples``: smallest batch size and
#: smallest per-channel sample count (N x spatial size) of the train-mode calls (0 when none);
#: ``backward_calls``: train-mode calls made while autograd ran a backward pass (a recomputed
#: forward: reentrant activation checkpointing); ``recalibration_updates``: train-mode calls
#: without grad recognised as a deliberate recalibration of the statistics (the layer's
#: momentum set to None, as ``torch.optim.swa_utils.update_bn`` does, or BN switched to train
#: mode inside a model in eval mode, as AdaBN-style recalibration does); ``still_calls``:
#: train-mode calls of a layer whose momentum was 0 at the call (batch statistics normalise,
#: the running statistics stay as they were: SAM's second pass, ``disable_running_stats``;
#: only ``num_batches_tracked`` moves), not counted as updates of any kind;
#: ``kept_eval_calls``: eval-mode calls while the module holding the layer was in train mode,
#: or in a step in which other BN layers trained with grad (BN kept in eval mode by the
#: recipe: mmdetection's ``norm_eval``, a backbone's ``.eval()`` inside ``model.train()``);
#: ``fed_updates``: those of the ``nograd_updates`` that were a layer's last call before
#: another optimizer's step, with no train-mode call with grad in between (a GAN generator
#: making the discriminator's fakes under ``no_grad``), which are not validation.
COUNT_COLUMNS: tuple[str, ...] = (
    "train_calls",
    "eval_calls",
    "nograd_updates",
    "inference_updates",
    "min_batch",
    "min_samples",
    "backward_calls",
    "recalibration_updates",
    "still_calls",
    "kept_eval_calls",
    "fed_updates",
)
(
    C_TRAIN,
    C_EVAL,
    C_NOGRAD,
    C_INFER,
    C_MINBATCH,
    C_MINSAMPLES,
    C_BACKWARD,
    C_RECAL,
    C_STILL,
    C_KEPT_EVAL,
    C_FED,
) = range(11)

#: How the several updates of one step came about, judged by the Monitor on a few steps of a
#: layer that updated more than once (see ``Monitor`` and ``multiple-updates-per-step``):
#: ``recompute``: a forward re-run during backward (activation checkpointing);
#: ``extra``: a train-mode forward whose output no backward used (validation, a probe);
#: ``repeat``: forward/backward pairs on the same input at weights moved in place in between
#: (SAM's second pass, an LBFGS closure evaluated along its line search);
#: ``accumulation``: forward/backward pairs on batches of one distribution (micro-batches);
#: ``sources``: forward/backward pairs on batches whose statistics differ beyond sampling
#: noise (a GAN discriminator's real and fake batches);
#: ``other-step``: calls on both sides of another optimizer's step (a GAN generator's step,
#: which runs the discriminator on its fakes);
#: ``reused``: several forwards trained by one backward on batches whose statistics differ (one
#: BN across the time steps of a recurrent loop, or across scales);
#: ``sizes``: the same, on inputs of several spatial sizes (crops of several sizes in
#: multi-crop self-supervised training, the levels of a feature pyramid);
#: ``views``: several forwards trained by one backward on batches of one distribution (two
#: augmented views of a self-supervised encoder, ghost BN chunks, a siamese encoder).
UPDATE_KINDS: tuple[str, ...] = (
    "recompute",
    "extra",
    "reused",
    "repeat",
    "accumulation",
    "sources",
    "other-step",
    "sizes",
    "views",
)

#: A stat-drift episode becomes a finding when at least this many judged steps exceed the
#: tolerances, and at least this fraction of the judged steps.
DRIFT_MIN_STEPS = 3
DRIFT_MIN_FRACTION = 0.5
#: A stat-drift episode whose last step came while the running average still held at least
#: this share of its starting values ((1 - momentum) ** updates, e^-3 = 5%) is the warm-up
#: of the average (info), not a lag.
WARMUP_KEPT = math.exp(-3.0)


@dataclass
class Episode:
    """One problem of one layer over a run: where it started and how often it held."""

    rule: str
    layer: int
    first_step: int
    last_step: int
    steps: int
    first: dict[str, Any]
    #: the largest value of the rule's :meth:`TrainingRule.peak` over the steps (``None``
    #: for rules without one)
    peak: float | None = None
    #: the sum of the rule's :meth:`TrainingRule.remains` over the steps: how many of them
    #: still show the problem once its known benign cause is taken out (``None`` for rules
    #: without one)
    remaining: int | None = None
    #: the rule's :meth:`TrainingRule.last` numbers at the last step
    last: dict[str, Any] = field(default_factory=dict)

    def extend(
        self,
        first_step: int,
        last_step: int,
        steps: int,
        first: dict[str, Any],
        peak: float | None = None,
        remaining: int | None = None,
        last: dict[str, Any] | None = None,
    ) -> None:
        if first_step < self.first_step:
            self.first_step, self.first = first_step, first
        if last_step >= self.last_step and last is not None:
            self.last = last
        self.last_step = max(self.last_step, last_step)
        self.steps += steps
        if peak is not None:
            self.peak = peak if self.peak is None else max(self.peak, peak)
        if remaining is not None:
            self.remaining = remaining + (self.remaining or 0)


@dataclass
class RunObservations:
    """What a Monitor observed; the training-run check functions read it as ``ctx.run``."""

    layer_names: list[str]
    layer_kinds: list[str]
    step_kind: str  # "optimizer" or "forward"
    steps: int = 0
    episodes: dict[tuple[str, int], Episode] = field(default_factory=dict)
    drift_judged: np.ndarray | None = None  # [L] steps where stat-drift was judged
    distributed: bool = False
    world_size: int = 1
    rank: int = 0
    rank_checks: int = 0
    #: per layer: how the steps with several updates came about (counts of UPDATE_KINDS)
    update_kinds: dict[int, Counter[str]] = field(default_factory=dict)
    #: steps with a recalibration pass (update_bn and the like), in order
    recalibrations: list[int] = field(default_factory=list)
    #: steps whose train-mode forwards without grad came before another optimizer's step (a
    #: GAN generator making the discriminator's fakes), in order
    fed_steps: list[int] = field(default_factory=list)
    #: layers whose gamma/beta changed during the run while no optimizer trained them: a
    #: moving-average copy (MoCo's key encoder, BYOL's target, a mean teacher), whose
    #: train-mode forwards without grad are the method, not a frozen BN left in train mode
    moving_copies: set[int] = field(default_factory=set)
    #: layers with trainable gamma/beta that ran in eval mode while the module holding them,
    #: or other BN layers, trained (statistics frozen by the recipe: norm_eval, a backbone's
    #: .eval()), which ``stats-not-updating`` leaves alone
    kept_eval: set[int] = field(default_factory=set)

    @property
    def step_word(self) -> str:
        return "optimizer step" if self.step_kind == "optimizer" else "step"


@dataclass
class StepBlock:
    """A block of consecutive steps as the rules see it (arrays ``[S, L]`` unless noted)."""

    stats: np.ndarray  # [S, L, len(STAT_COLUMNS)]
    counts: np.ndarray  # [S, L, len(COUNT_COLUMNS)]
    trainable: np.ndarray  # gamma/beta optimized
    frozen: np.ndarray  # has gamma/beta, none optimized
    tolerances: Mapping[str, float | int]
    tracks_stats: np.ndarray  # [L]
    drift_warmup: np.ndarray  # [L] counter value before which stat-drift is not judged
    distributed: bool = False
    sync_bn: np.ndarray | None = None  # [L]
    expected_updates: np.ndarray | None = None  # [S]: 1 + iterations a GradScaler skipped
    frozen_reason: Sequence[str] = ()
    #: [L] the layer normalises with batch statistics in train mode: not of FrozenBatchNorm's
    #: signature, or seen updating its running buffers (a hand-written BN without counter)
    batch_stats: np.ndarray | None = None

    @cached_property
    def uses_batch_stats(self) -> np.ndarray:
        n_layers = self.updates.shape[1]
        mask = np.ones(n_layers, dtype=bool) if self.batch_stats is None else self.batch_stats
        return np.broadcast_to(mask[None, :], self.updates.shape)

    @cached_property
    def updates(self) -> np.ndarray:
        return self.stats[..., S_UPDATES]

    @cached_property
    def has_counter(self) -> np.ndarray:
        return ~np.isnan(self.updates)

    @cached_property
    def tracks(self) -> np.ndarray:
        return np.broadcast_to(self.tracks_stats[None, :], self.updates.shape)

    @cached_property
    def moved(self) -> np.ndarray:
        return self.stats[..., S_MOVED] > 0

    @cached_property
    def reset(self) -> np.ndarray:
        """The counter grew less than the train-mode calls: the statistics were reset."""
        return self.has_counter & (np.nan_to_num(self.updates) < self.counts[..., C_TRAIN])

    @cached_property
    def nograd_unexplained(self) -> np.ndarray:
        """Updates without grad that are neither recalibration nor a checkpointed forward
        (reentrant checkpointing runs the forward under no_grad and again in backward) nor
        made for another optimizer's step (a GAN generator's fakes for the discriminator)."""
        c = self.counts
        left = np.maximum(c[..., C_NOGRAD] - c[..., C_BACKWARD] - c[..., C_FED], 0)
        return np.where(self.reset, 0, left)

    @cached_property
    def grad_updates(self) -> np.ndarray:
        """Updates that belong to training: all updates but validation/recalibration ones
        and calls with momentum 0, which move the counter but not the statistics (counted
        from the hooks in a step whose statistics were reset)."""
        c = self.counts
        no_grad = (
            np.maximum(c[..., C_NOGRAD] - c[..., C_BACKWARD], 0) + c[..., C_RECAL] + c[..., C_STILL]
        )
        counted = np.where(self.has_counter & ~self.reset, self.updates, c[..., C_TRAIN])
        hooks_only = c[..., C_TRAIN] - c[..., C_NOGRAD] - c[..., C_RECAL] - c[..., C_STILL]
        return np.where(self.reset, hooks_only, np.nan_to_num(counted) - no_grad)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# ---- the rules, one class each ----------------------------------------------------------------
@dataclass
class Said:
    """What a rule says about one episode: the finding's text, hint and extra details."""

    text: str
    hint: str
    details: dict[str, Any] = field(default_factory=dict)
    severity: str | None = None  # None: the catalogue's


class TrainingRule:
    """Base of the training-run rules: ``when``, ``first`` and ``says`` side by side."""

    id: ClassVar[str]
    #: judged over the whole run (a share of its steps, how the run ends): what an episode
    #: says can change until the run's last step, so ``Monitor(warn=True)`` warns it at
    #: ``detach()``
    whole_run: ClassVar[bool] = False

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        """Where the problem holds, ``[S, L]``."""
        raise NotImplementedError

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        """The numbers of step ``i`` of the block for ``layer`` (kept in the episode)."""
        return {}

    @staticmethod
    def peak(b: StepBlock, rows: np.ndarray, layer: int) -> float | None:
        """The largest of one number over the block's steps ``rows`` where the problem held
        (kept in the episode as its maximum over the run; ``None``: the rule keeps none)."""
        return None

    @staticmethod
    def remains(b: StepBlock, rows: np.ndarray, layer: int) -> int | None:
        """Of the block's steps ``rows`` where the problem held, how many still show it once
        the rule's known benign cause is taken out (summed in the episode; ``None``: the
        rule takes none out)."""
        return None

    @staticmethod
    def last(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        """The numbers of step ``i`` (the last where the problem held) the episode keeps from
        the last such step of the run."""
        return {}

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        """The finding of one episode (None: not a problem after all)."""
        raise NotImplementedError


#: The training-run rules by id, in the order they are evaluated.
TRAINING_RULES: dict[str, type[TrainingRule]] = {}


def run_rule(
    rule_id: str, *, check_function: bool = True
) -> Callable[[type[TrainingRule]], type[TrainingRule]]:
    """Register a training-run rule class and, with ``check_function``, its check function
    (like ``@check``). Rules whose check function judges something else in an audit (the
    buffers, a batch, data) pass ``check_function=False``: the Monitor's report adds their
    run findings itself (:func:`bncheck.engine.run_judged`)."""

    def decorate(cls: type[TrainingRule]) -> type[TrainingRule]:
        cls.id = rule_id
        TRAINING_RULES[rule_id] = cls
        if not check_function:
            return cls

        def check_fn(ctx: AuditContext) -> Iterator[Finding]:
            return run_findings(ctx, rule_id)

        check_fn.__name__ = check_fn.__qualname__ = rule_id.replace("-", "_")
        check(rule_id)(check_fn)
        return cls

    return decorate


# ---- frozen-bn-drift -------------------------------------------------------------------------
@run_rule("frozen-bn-drift")
class FrozenBNDrift(TrainingRule):
    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        return b.frozen & b.tracks & b.moved

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        s = b.stats[i, layer]
        reason = b.frozen_reason[layer] if b.frozen_reason else ""
        return {"updates": _num(s[S_UPDATES]), "moved": float(s[S_MOVED]), "reason": reason}

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        if ep.layer in run.moving_copies:
            return None  # a moving-average copy: its gamma/beta are not frozen (a note)
        f = ep.first
        return Said(
            f"{f['reason']} but its running statistics changed {_span(run, ep)} "
            f"(sum |delta| = {f['moved']:.3g}, expected 0)",
            "re-apply .eval() to frozen BN layers after every model.train() (or use a "
            "FrozenBatchNorm layer)",
        )


# ---- stats-not-updating ----------------------------------------------------------------------
@run_rule("stats-not-updating")
class StatsNotUpdating(TrainingRule):
    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        no_update = np.where(b.has_counter, np.nan_to_num(b.updates) == 0, ~b.moved)
        c = b.counts
        # eval-mode calls while the holding module or other BN layers train keep BN in eval
        # on purpose (norm_eval, a backbone's .eval()): counted as kept_eval_calls
        forgot_train = (c[..., C_EVAL] > 0) & (c[..., C_KEPT_EVAL] == 0)
        return b.trainable & b.tracks & forgot_train & (c[..., C_TRAIN] == 0) & no_update

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        return {
            "updates": _num(b.stats[i, layer, S_UPDATES]),
            "eval_calls": int(b.counts[i, layer, C_EVAL]),
        }

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        return Said(
            f"gamma/beta are being optimized but the layer ran only in eval mode "
            f"{_span(run, ep)}: num_batches_tracked did not change (delta 0, expected 1 per "
            "step)",
            "call model.train() after validation (model.eval()) and before training resumes",
        )


# ---- stats-updated-without-grad --------------------------------------------------------------
@run_rule("stats-updated-without-grad")
class StatsUpdatedWithoutGrad(TrainingRule):
    """Train-mode forwards without grad, less recalibration passes (momentum None, statistics
    reset, or BN alone in train mode) and the no-grad forward of reentrant checkpointing."""

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        return b.tracks & (b.nograd_unexplained > 0)

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        c = b.counts[i, layer]
        return {
            "updates_without_grad": int(b.nograd_unexplained[i, layer]),
            "inference_mode": int(c[C_INFER]),
        }

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        if ep.layer in run.moving_copies:
            return None  # a MoCo key / BYOL target encoder runs without grad by design
        if "frozen-bn-drift" in ctx.rule_ids and ("frozen-bn-drift", ep.layer) in run.episodes:
            # a frozen layer left in train mode (a distillation teacher run without grad):
            # frozen-bn-drift says so, with its fix; this rule's "validation" would not fit
            return None
        f = ep.first
        how = "torch.inference_mode()" if f["inference_mode"] else "torch.no_grad()"
        return Said(
            f"running statistics updated by {f['updates_without_grad']} train-mode "
            f"forward(s) under {how} {_span(run, ep)} (expected 0: forwards without grad are "
            "usually validation)",
            "call model.eval() before validation and model.train() after; to recalibrate "
            "the statistics on purpose use torch.optim.swa_utils.update_bn (recognised); a "
            "network run in train mode without grad on purpose updates them at every such "
            "forward (a GAN generator making the discriminator's fakes is recognised when "
            "the Monitor has the generator's optimizer): if that is intended, ignore "
            "'stats-updated-without-grad' for it",
        )


# ---- multiple-updates-per-step ---------------------------------------------------------------
_KIND_WORDS = {
    "recompute": (
        "the forward is re-run during backward (activation checkpointing), so every batch "
        "updates the statistics twice and the effective momentum grows",
        "divide the BN momentum by the number of forwards per step (2 with checkpointing), or "
        "keep BN layers out of the checkpointed segments",
    ),
    "extra": (
        "a train-mode call whose output no backward used updated the statistics: a "
        "validation or probe pass in train mode, or a head whose output on that batch is "
        "not in the loss (a domain-adaptation classifier on the target batch)",
        "run validation and probe passes in eval mode: model.eval(), then model.train() "
        "before training; for a head computed on a batch its loss ignores, ignore this if "
        "its statistics are meant to include that batch",
    ),
    "reused": (
        "one forward/backward runs it on batches whose statistics differ beyond sampling "
        "noise (one BN across time steps or scales, or separate forwards of batches from "
        "different sources: labeled and unlabeled, source and target domain): the running "
        "statistics blend them and eval mode uses the blend for all",
        "time steps or scales: give each call site its own BN module (nn.ModuleList); "
        "batches of several sources trained by one loss: run them as one concatenated "
        "forward (FixMatch's interleave) so BN normalises them together, or give each "
        "source its own BN",
    ),
    "repeat": (
        "the same input runs forward and backward again in the step at weights moved in "
        "place in between (SAM's second pass, an LBFGS closure evaluated along its line "
        "search): every run updates the statistics, the extra ones with the statistics of "
        "weights the step does not keep",
        "keep the statistics to one pass: set the BN momentum to 0 around the extra passes "
        "(SAM's disable_running_stats/enable_running_stats), or run them with BN in eval "
        "mode",
    ),
    "accumulation": (
        "forward/backward pairs on batches of one distribution (gradient accumulation): BN "
        "normalises and averages the micro-batches, not the batch the optimizer steps on",
        "make each micro-batch large enough for BN (small-batch's min_batch_size and "
        "min_samples_per_channel: then this is info), use SyncBatchNorm across devices or "
        "GroupNorm; with AMP, pass scaler= to the Monitor so iterations the GradScaler "
        "skipped are not counted",
    ),
    "sources": (
        "forward/backward pairs on batches whose statistics differ beyond sampling noise (as "
        "a GAN discriminator's real and fake batches): the running statistics blend them and "
        "eval mode uses the blend for both",
        "fine for a network used only in train mode (a GAN discriminator); otherwise give "
        "each source its own BN layer",
    ),
    "sizes": (
        "one forward/backward runs it on inputs of several spatial sizes whose statistics "
        "differ beyond sampling noise (crops of several sizes, pyramid levels, domains at "
        "other resolutions): the running statistics blend them and eval uses the blend",
        "multi-crop self-supervised training (global and local crops): intended; recompute "
        "the statistics at the evaluation size before evaluating (bncheck.recalibrate); "
        "pyramid levels or domains: give each its own BN module",
    ),
    "other-step": (
        "it is also run with grad in another optimizer's step (as a GAN discriminator in the "
        "generator's step), and those batches update the running statistics too",
        "fine for a network used only in train mode (a GAN discriminator); otherwise run it "
        "in eval mode inside the other network's step, or freeze its BN layers there",
    ),
}
#: the hint when the Monitor did not see how the updates came about
_GENERIC = (
    "each train-mode forward updates the statistics: gradient accumulation (micro-batches), "
    "activation checkpointing (a recompute during backward: divide the momentum by the "
    "recompute count), or a validation or logging forward in train mode (call model.eval() "
    "for it, model.train() after); ignore 'multiple-updates-per-step' if intended; with AMP, "
    "pass scaler= to the Monitor so steps the GradScaler skipped are not counted"
)
#: the hint when only the run's first steps had several updates and the Monitor did not see
#: how: a GradScaler skips iterations while it finds its scale
_FIRST_STEPS = (
    "at the run's first steps only: with AMP, most likely iterations the GradScaler skipped "
    "while it found its scale (pass scaler= to the Monitor, which then counts them); else a "
    "forward run in train mode at those steps (a validation or logging pass: call "
    "model.eval() for it), a gradient accumulation or activation checkpointing"
)
#: the hint when few steps had several updates and the Monitor did not see how
_NOW_AND_THEN = (
    "at a few steps only: most likely a forward the loop runs now and then in train mode (a "
    "validation or logging pass: call model.eval() for it, model.train() after); else a "
    "gradient accumulation or activation checkpointing at those steps; with AMP, pass "
    "scaler= to the Monitor so steps the GradScaler skipped are not counted"
)


def update_kind(run: RunObservations, ep: Episode) -> str | None:
    """The cause of an episode of several updates per step (None: not observed)."""
    if ep.first.get("recomputed"):
        return "recompute"
    kinds = run.update_kinds.get(ep.layer)
    if not kinds:
        return None
    order = {k: i for i, k in enumerate(UPDATE_KINDS)}
    # the most frequent cause over the judged steps; a tie goes to the more harmful one
    return min(kinds, key=lambda k: (-kinds[k], order[k]))


@run_rule("multiple-updates-per-step")
class MultipleUpdatesPerStep(TrainingRule):
    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        # one update per step, plus one for each iteration a GradScaler skipped before it
        allowed = 1 if b.expected_updates is None else b.expected_updates[:, None]
        # a counter that moved in a step without a train-mode call of its layer, while the
        # hooks saw other layers' calls, was written outside any forward (an EMA copy whose
        # buffers are averaged or copied, a load_state_dict): no update of BN's. Where no
        # layer's calls were seen (a model compiled before the Monitor's hooks), the
        # counters are all there is
        called = b.counts[..., C_TRAIN] > 0
        written = ~called & called.any(axis=1, keepdims=True)
        return b.tracks & (b.grad_updates > allowed) & ~written

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        c = b.counts[i, layer]
        ups = b.updates[i, layer]
        # updates the forward hooks never saw: a recomputation hidden from them
        # (non-reentrant checkpointing), or calls made during backward (reentrant)
        hidden = not math.isnan(ups) and ups > c[C_TRAIN]
        return {
            "updates": int(b.grad_updates[i, layer]),
            "train_calls": int(c[C_TRAIN]),
            "recomputed": int(c[C_BACKWARD]) or (int(ups - c[C_TRAIN]) if hidden else 0),
            # the smallest train-mode call of the step (a micro-batch of an accumulation)
            **_batch_numbers(b, i, layer),
        }

    @staticmethod
    def peak(b: StepBlock, rows: np.ndarray, layer: int) -> float | None:
        return float(b.grad_updates[rows, layer].max())

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        f = ep.first
        kind = update_kind(run, ep)
        most = int(ep.peak) if ep.peak is not None else f["updates"]
        count = f"{f['updates']}" if most <= f["updates"] else f"{f['updates']} to {most}"
        head = f"{count} running-statistics updates per {run.step_word} {_span(run, ep)}"
        if kind == "views":
            return None  # several inputs trained by one backward: two views, ghost BN
        if kind is None:
            # the steps after the first one with several updates, recorded in detail, did
            # not repeat it: a pass the loop runs at some steps only, when they are few
            if ep.steps * 2 > max(run.steps, 1):
                hint = _GENERIC
            else:
                hint = _FIRST_STEPS if ep.last_step <= 3 else _NOW_AND_THEN
            return Said(f"{head} (expected 1)", hint, {"cause": None, "max_updates": most})
        why, hint = _KIND_WORDS[kind]
        severity = "info" if kind in ("sources", "other-step") else None
        if kind == "accumulation" and _large_micro_batches(ctx, run, ep):
            # BN-10's harm is BN-09's (small batches): micro-batches that small-batch would
            # not flag give reliable statistics, and the accumulation costs BN nothing
            severity = "info"
            why, hint = _LARGE_ACCUMULATION
            why = why.format(n=f["batch_size"])
            hint = hint.format(need=int(ctx.tol("min_batch_size")))
        return Said(
            f"{head} (expected 1): {why}", hint, {"cause": kind, "max_updates": most}, severity
        )


_LARGE_ACCUMULATION = (
    "forward/backward pairs on batches of one distribution (gradient accumulation): BN "
    "normalises each micro-batch on its own, and micro-batches of {n} samples give it "
    "reliable statistics",
    "nothing to fix at this micro-batch size (small-batch's min_batch_size is {need}); with "
    "AMP, pass scaler= to the Monitor so iterations the GradScaler skipped are not counted",
)


def _large_micro_batches(ctx: AuditContext, run: RunObservations, ep: Episode) -> bool:
    """Whether the micro-batches are large enough for BN: the smallest train-mode call of the
    episode's first step reaches ``small-batch``'s tolerances (batch size and values per
    channel), and ``small-batch`` found the layer's batches too small at no more than half
    as many steps as the accumulation lasted."""
    n, samples = ep.first.get("batch_size", 0), ep.first.get("samples_per_channel", 0)
    small = run.episodes.get(("small-batch", ep.layer))
    return (
        n >= int(ctx.tol("min_batch_size"))
        and samples >= int(ctx.tol("min_samples_per_channel"))
        # small-batch's own finding covers a short last batch of an epoch; micro-batches
        # that stay small at most steps make the accumulation harmful
        and (small is None or small.steps * 2 <= ep.steps)
    )


# ---- nonfinite-stats -------------------------------------------------------------------------
@run_rule("nonfinite-stats", check_function=False)  # audit check: checks/static.py
class NonfiniteStats(TrainingRule):
    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        return b.stats[..., S_NONFINITE] > 0

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        return {"channels": int(b.stats[i, layer, S_NONFINITE])}

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        name = run.layer_names[ep.layer]
        return Said(
            f"running statistics became NaN/Inf {_span(run, ep).replace('from', 'at', 1)} "
            f"({ep.first['channels']} of {_channels(ctx, name)} channels); every output of "
            "those channels is NaN from then on",
            f"look for NaN/Inf in the batch or loss of {run.step_word} {ep.first_step}, "
            "fp16 overflow or a too-high learning rate; reload or recompute the statistics",
        )


# ---- small-batch -----------------------------------------------------------------------------
def _batch_numbers(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
    c = b.counts[i, layer]
    return {"batch_size": int(c[C_MINBATCH]), "samples_per_channel": int(c[C_MINSAMPLES])}


@run_rule("small-batch", check_function=False)  # audit check: checks/forward.py
class SmallBatch(TrainingRule):
    first = staticmethod(_batch_numbers)

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        c, tol = b.counts, b.tolerances
        # a FrozenBatchNorm-style layer in train mode normalises with its running statistics:
        # the batch size does not enter its output
        return (
            b.uses_batch_stats
            & (c[..., C_TRAIN] > 0)
            & (
                (c[..., C_MINBATCH] < float(tol["min_batch_size"]))
                | (c[..., C_MINSAMPLES] < float(tol["min_samples_per_channel"]))
            )
        )

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        f = ep.first
        need_b = int(ctx.tol("min_batch_size"))
        need_s = int(ctx.tol("min_samples_per_channel"))
        if f["samples_per_channel"] <= f["batch_size"]:
            # one value per sample and channel: (N, C) features or 1x1 feature maps
            hint = (
                "this layer sees one value per sample and channel ((N, C) features, or 1x1 "
                f"feature maps), so the batch is its whole count: use batches of "
                f"{max(need_b, need_s)} or more (or larger inputs, for 1x1 maps), freeze "
                "this BN (eval mode), or use LayerNorm/GroupNorm here"
            )
        elif f["batch_size"] >= need_b:  # the batch is large enough: the feature maps are small
            hint = (
                "the batch is large enough but this layer's feature maps are small: use "
                "larger inputs or batches, freeze this BN (eval mode), or use GroupNorm here"
            )
        else:
            hint = (
                "use larger batches (with several devices, SyncBatchNorm normalises over "
                "their batches together), freeze BN (eval mode) for fine-tuning, or use "
                "GroupNorm"
            )
        if ep.steps * 2 <= max(run.steps, 1):
            # at a few steps only: the short last batch of an epoch, most likely
            hint += "; at a few steps only, as the last partial batch of an epoch: drop_last=True"
        return Said(
            f"train-mode batch of {f['batch_size']} sample(s), {f['samples_per_channel']} "
            f"value(s) per channel {_span(run, ep)} (expected >= {need_b} samples and >= "
            f"{need_s} values per channel): batch statistics are noisy",
            hint,
            {"min_batch_size": need_b, "min_samples_per_channel": need_s},
        )


# ---- stat-drift ------------------------------------------------------------------------------
def drift_judged(b: StepBlock) -> np.ndarray:
    """Steps where stat-drift can be judged: one exact update, after the warm-up."""
    nbt_before = b.stats[..., S_NBT] - np.nan_to_num(b.updates)
    with np.errstate(invalid="ignore"):
        return ~np.isnan(b.stats[..., S_Z]) & (nbt_before >= b.drift_warmup[None, :])


def _start_explains(b: StepBlock, rows: np.ndarray, layer: int) -> np.ndarray:
    """Per step of ``rows``: whether the batch is within the drift tolerances of the running
    statistics once their starting values' share is taken out (NaN: not told, no)."""
    tol = b.tolerances
    s = b.stats[rows, layer]
    with np.errstate(invalid="ignore"):
        return (s[:, S_START_Z] <= float(tol["drift_mean_z"])) & (
            s[:, S_START_VR] <= float(tol["drift_var_ratio"])
        )


@run_rule("stat-drift", check_function=False)  # audit check: checks/forward.py
class StatDrift(TrainingRule):
    # a share of the judged steps makes a finding; whether the drift is the warm-up of the
    # average or a lag, and whether the run ends with it, shows at the end
    whole_run = True

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        tol = b.tolerances
        with np.errstate(invalid="ignore"):
            exceeds = (b.stats[..., S_Z] > float(tol["drift_mean_z"])) | (
                b.stats[..., S_VR] > float(tol["drift_var_ratio"])
            )
        return drift_judged(b) & exceeds

    @staticmethod
    def first(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        s = b.stats[i, layer]
        return {"drift_z": float(s[S_Z]), "drift_var_ratio": float(s[S_VR])}

    @staticmethod
    def peak(b: StepBlock, rows: np.ndarray, layer: int) -> float | None:
        # the counter before the update of the last drifting step: how much of the
        # statistics' starting values the running average still held there
        before = b.stats[rows, layer, S_NBT] - np.nan_to_num(b.updates[rows, layer])
        return None if np.isnan(before).all() else float(np.nanmax(before))

    @staticmethod
    def remains(b: StepBlock, rows: np.ndarray, layer: int) -> int:
        # the steps whose batches are still far from the running statistics once their
        # starting values' share is taken out
        return int((~_start_explains(b, rows, layer)).sum())

    @staticmethod
    def last(b: StepBlock, i: int, layer: int) -> dict[str, Any]:
        return {
            "start_share": float(b.stats[i, layer, S_START_SHARE]),
            "explained": bool(_start_explains(b, np.array([i]), layer)[0]),
        }

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        judged = int(run.drift_judged[ep.layer]) if run.drift_judged is not None else ep.steps
        if ep.steps < DRIFT_MIN_STEPS or ep.steps < DRIFT_MIN_FRACTION * max(judged, 1):
            return None
        f = ep.first
        tz, tv = ctx.tol("drift_mean_z"), ctx.tol("drift_var_ratio")
        measured = (
            f"train batches far from the running statistics {_span(run, ep)} ({ep.steps} of "
            f"{judged} judged): mean |batch mean - running_mean| = {f['drift_z']:.3g} std "
            f"(tol {tz:g}), var ratio {f['drift_var_ratio']:.3g} (tol {tv:g})"
        )
        details = {"judged_steps": judged, "drift_mean_z_tol": tz, "drift_var_ratio_tol": tv}
        try:
            momentum = ctx.layer(run.layer_names[ep.layer]).momentum
        except KeyError:  # the layer left the model before the report (fused, replaced)
            momentum = None
        kept = (
            (1.0 - momentum) ** ep.peak
            if ep.peak is not None and momentum is not None and 0.0 < momentum < 1.0
            else 0.0
        )
        # the starting values explain the drift when, with their share taken out, most of
        # its steps agree, and too few drift to make a finding of their own among the steps
        # they do not explain
        left = ep.steps if ep.remaining is None else ep.remaining
        explained = ep.steps - left
        lags = left >= DRIFT_MIN_STEPS and left >= DRIFT_MIN_FRACTION * max(judged - explained, 1)
        start_explains = explained > left and not lags
        young = kept >= WARMUP_KEPT and momentum is not None and ep.peak is not None
        to_end = ep.last_step >= run.steps
        if (
            (young or start_explains)
            and momentum is not None
            and not (to_end and not young and not ep.last.get("explained", False))
        ):
            # the warm-up of the average, not a lag: every drifting step came while the
            # starting values still weighed in it (the judging starts after at most 30
            # updates, 3 / momentum are needed at a small momentum), or they were so far from
            # the data that even a small share of them explains the drift. Not when the run
            # ends on a drifting step they do not explain: that is a lag the model keeps
            if young:
                assert ep.peak is not None
                warm = {**details, "starting_share": kept}
                held = (
                    f"while the running statistics still held {kept:.0%} or more of their "
                    f"starting values (momentum {momentum:g}, {int(ep.peak)} updates counted"
                )
                follows = (
                    "an average at this momentum follows the data after about "
                    f"{math.ceil(3.0 / momentum)} updates"
                )
                short = "more than the run gave it"
            else:
                share = float(ep.last.get("start_share", math.nan))
                warm = {**details, "starting_share": share, "unexplained_steps": left}
                held = (
                    "while the running statistics still held a share of the values they "
                    f"started from (momentum {momentum:g}: {share:.2g}"
                )
                agree = (
                    "the batches agree with them"
                    if left == 0
                    else f"the batches of all but {left} of those steps agree with them"
                )
                follows = (
                    f"with that share taken out {agree}: the values they started from are "
                    "far from the data, and the average forgets them by a factor "
                    f"{1.0 - momentum:g} per update"
                )
                short = "too slowly for the run"
            if to_end:
                # still drifting at the last step: the model leaves training with them
                return Said(
                    f"{measured}, up to the last {run.step_word}, {held}): {follows}, "
                    f"{short}, so eval mode would normalise with statistics still near their "
                    "start",
                    "recompute the statistics after training (torch.optim.swa_utils."
                    "update_bn), train longer, or use a larger momentum (PyTorch's default "
                    "is 0.1)",
                    warm,
                )
            return Said(
                f"{measured}, {held} by the last of those steps): {follows}",
                "expected early in training: nothing to fix if training runs well past that; "
                "to evaluate before it, recompute the statistics "
                "(torch.optim.swa_utils.update_bn) or use a larger momentum",
                warm,
                "info",
            )
        return Said(
            measured,
            "the running statistics lag the data: momentum too small for how fast the "
            "weights before the layer move (a high learning rate), statistics loaded from "
            "other data, or the input distribution changed; recompute them "
            "(torch.optim.swa_utils.update_bn)",
            details,
        )


# ---- unsynced-small-batch --------------------------------------------------------------------
@run_rule("unsynced-small-batch")
class UnsyncedSmallBatch(TrainingRule):
    first = staticmethod(_batch_numbers)

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        if not b.distributed:
            return np.zeros(b.updates.shape, dtype=bool)
        n_layers = b.updates.shape[1]
        plain = ~b.sync_bn if b.sync_bn is not None else np.ones(n_layers, dtype=bool)
        c = b.counts
        return (
            (c[..., C_TRAIN] > 0)
            & b.tracks
            & b.uses_batch_stats
            & plain[None, :]
            & (c[..., C_MINBATCH] < float(b.tolerances["sync_bn_min_batch"]))
        )

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        f, world = ep.first, run.world_size
        return Said(
            f"per-rank batch of {f['batch_size']} with plain {run.layer_kinds[ep.layer]} "
            f"across {world} ranks {_span(run, ep)}: statistics come from {f['batch_size']} "
            f"samples, not the global {f['batch_size'] * world}",
            "convert with nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping "
            "in DDP, or raise the per-rank batch",
            {"world_size": world, "sync_bn_min_batch": int(ctx.tol("sync_bn_min_batch"))},
        )


# ---- rank-divergent-stats --------------------------------------------------------------------
@run_rule("rank-divergent-stats")
class RankDivergentStats(TrainingRule):
    """Judged from cross-rank comparisons (:func:`record_rank_check`), not from steps."""

    @staticmethod
    def when(b: StepBlock) -> np.ndarray:
        return np.zeros(b.updates.shape, dtype=bool)

    @staticmethod
    def says(ctx: AuditContext, run: RunObservations, ep: Episode) -> Said | None:
        f = ep.first
        return Said(
            f"running statistics differ across {f['world_size']} ranks {_span(run, ep)}: max "
            f"relative difference {f['rel_diff']:.3g} > rank_rtol {f['rank_rtol']:g}",
            "keep DDP's buffer sync on (broadcast_buffers=True, or forward_sync_buffers=True "
            "on newer torch) or use SyncBatchNorm; "
            "evaluate and save from one rank only after the buffers are synchronised",
            {"rank": None},
        )


# ---- evaluating the rules over a run -----------------------------------------------------------
def step_conditions(
    stats: np.ndarray,
    counts: np.ndarray,
    trainable: np.ndarray,
    frozen: np.ndarray,
    tolerances: Mapping[str, float | int],
    *,
    tracks_stats: np.ndarray,
    drift_warmup: np.ndarray,
    distributed: bool = False,
    sync_bn: np.ndarray | None = None,
    expected_updates: np.ndarray | None = None,
    frozen_reason: Sequence[str] = (),
    batch_stats: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """For each rule, a boolean mask ``[steps, layers]``: the problem holds at that step.

    ``stats`` is ``[S, L, len(STAT_COLUMNS)]``, ``counts`` ``[S, L, len(COUNT_COLUMNS)]``;
    ``trainable`` / ``frozen`` ``[S, L]`` say whether the layer's gamma/beta were being
    optimized (requires_grad and, with an optimizer, in a param group) or frozen (it has
    parameters and none is optimized); ``tracks_stats`` ``[L]`` whether it has running
    statistics; ``drift_warmup`` ``[L]`` the counter value before which stat-drift is not
    judged (the running average has not yet forgotten its initial values);
    ``expected_updates`` ``[S]`` the statistics updates each step may make (1, plus the
    iterations a GradScaler skipped before it; default 1); ``batch_stats`` ``[L]`` whether
    the layer normalises with batch statistics in train mode (default: every layer; a
    FrozenBatchNorm-style layer does not). ``_drift_judged`` is the mask of the steps where
    stat-drift was judged.
    """
    return conditions(
        StepBlock(
            stats,
            counts,
            trainable,
            frozen,
            tolerances,
            tracks_stats,
            drift_warmup,
            distributed,
            sync_bn,
            expected_updates,
            frozen_reason,
            batch_stats,
        )
    )


def conditions(block: StepBlock) -> dict[str, np.ndarray]:
    """Every rule's ``when`` over ``block``, plus ``_drift_judged`` (the steps where stat-drift
    was judged) and ``_recalibration`` (steps with a recognised recalibration pass)."""
    out = {rid: rule.when(block) for rid, rule in TRAINING_RULES.items()}
    out["_drift_judged"] = drift_judged(block)
    c = block.counts
    out["_recalibration"] = block.tracks & (
        (c[..., C_RECAL] > 0) | (block.reset & (c[..., C_NOGRAD] > 0))
    )
    return out


def record_episodes(
    episodes: dict[tuple[str, int], Episode],
    conditions: Mapping[str, np.ndarray],
    steps: np.ndarray,
    block: StepBlock,
) -> list[Episode]:
    """Fold one block of steps into ``episodes``; return the episodes that are new."""
    new: list[Episode] = []
    for rule, mask in conditions.items():
        if rule.startswith("_") or not mask.any():
            continue
        kind = TRAINING_RULES[rule]
        for layer in np.flatnonzero(mask.any(axis=0)).tolist():
            idx = np.flatnonzero(mask[:, layer])
            i0, i1 = int(idx[0]), int(idx[-1])
            first, last = kind.first(block, i0, layer), kind.last(block, i1, layer)
            peak, left = kind.peak(block, idx, layer), kind.remains(block, idx, layer)
            key = (rule, layer)
            span = (int(steps[i0]), int(steps[i1]), len(idx))
            if key in episodes:
                episodes[key].extend(*span, first, peak, left, last)
            else:
                ep = Episode(rule, layer, *span, first, peak, left, last)
                episodes[key] = ep
                new.append(ep)
    return new


def record_rank_check(
    episodes: dict[tuple[str, int], Episode],
    step: int,
    rel_diff: np.ndarray,
    rtol: float,
    world_size: int,
) -> list[Episode]:
    """Fold one cross-rank comparison (``rel_diff[L]``, max over ranks) into ``episodes``."""
    new: list[Episode] = []
    for layer in np.flatnonzero(rel_diff > rtol).tolist():
        first = {"rel_diff": float(rel_diff[layer]), "rank_rtol": rtol, "world_size": world_size}
        key = ("rank-divergent-stats", layer)
        if key in episodes:
            episodes[key].extend(step, step, 1, first)
        else:
            episodes[key] = ep = Episode("rank-divergent-stats", layer, step, step, 1, first)
            new.append(ep)
    return new


# ---- findings -----------------------------------------------------------------------------
def _span(run: RunObservations, ep: Episode) -> str:
    word = run.step_word
    if ep.first_step > run.steps:  # only in the calls after the last step (see Monitor)
        if run.steps == 0:
            return f"before any {word} (none was seen)"
        return f"after the last {word} ({run.steps})"
    if ep.steps == 1:
        return f"at {word} {ep.first_step}"
    if ep.last_step > run.steps:
        return (
            f"from {word} {ep.first_step} until after the last {word} ({ep.steps} "
            f"times in {run.steps} {word}s)"
        )
    return f"from {word} {ep.first_step} ({ep.steps} of {run.steps} {word}s, last {ep.last_step})"


def _channels(ctx: AuditContext, name: str) -> str:
    try:
        n = ctx.layer(name).num_features
    except KeyError:
        return "?"
    return str(n) if n is not None else "?"


def _where_in_run(run: RunObservations, ep: Episode) -> dict[str, Any]:
    """The details every training-run finding carries: where in the run its episode was."""
    details: dict[str, Any] = {
        "step": ep.first_step,
        "last_step": ep.last_step,
        "steps_affected": ep.steps,
        "steps_observed": run.steps,
    }
    if run.distributed and run.rank is not None:
        details["rank"] = run.rank
    return details


def episode_finding(ctx: AuditContext, run: RunObservations, ep: Episode) -> Finding | None:
    """The finding of one episode, in the one message format (``None``: not reportable)."""
    said = TRAINING_RULES[ep.rule].says(ctx, run, ep)
    if said is None:
        return None
    details = _where_in_run(run, ep)
    details.update(said.details)
    details.update(ep.first)
    name = run.layer_names[ep.layer]
    try:
        where: BNLayer | str = ctx.layer(name)
    except KeyError:
        where = name
    return ctx.finding(ep.rule, where, said.text, hint=said.hint, severity=said.severity, **details)


def run_findings(ctx: AuditContext, rule: str) -> Iterator[Finding]:
    """Findings of ``rule`` from the Monitor's observations (``ctx.run``), in layer order."""
    run: RunObservations | None = ctx.run
    if run is None:
        return
    eps = sorted((ep for (r, _), ep in run.episodes.items() if r == rule), key=lambda ep: ep.layer)
    if rule == "small-batch":
        yield from (finding for finding, _ in small_batch_findings(ctx, run, eps))
        return
    for ep in eps:
        finding = episode_finding(ctx, run, ep)
        if finding is not None:
            yield finding


def small_batch_findings(
    ctx: AuditContext, run: RunObservations, eps: list[Episode]
) -> list[tuple[Finding, list[Episode]]]:
    """``small-batch``'s findings from its episodes ``eps``, each with the episodes it
    reports. One finding for the layers that saw the same too-small batch over the same
    steps (the same first and last step and as many steps; as the audit gives one for its
    batch), instead of one per layer: a detector trained at 2 images a GPU has every BN
    layer's batch small. Layers on (N, C) features are grouped apart from the others (their
    hint differs). Layers that saw other batches, over other steps (a head fed a slice of
    the batch, a last partial batch), or whose batch was large enough and whose feature maps
    were small, get one finding each. The report and the Monitor's warnings (``warn=True``)
    use it alike."""
    need_b = int(ctx.tol("min_batch_size"))
    need_s = int(ctx.tol("min_samples_per_channel"))
    groups: dict[tuple[int, int, int, int, bool], list[Episode]] = {}
    for ep in eps:
        n = ep.first.get("batch_size", 0)
        if 0 < n < need_b:
            # one value per sample and channel ((N, C) features) has its own hint
            flat = ep.first.get("samples_per_channel", 0) <= n
            groups.setdefault((n, ep.first_step, ep.last_step, ep.steps, flat), []).append(ep)
    out: list[tuple[Finding, list[Episode]]] = []
    grouped: set[int] = set()
    for (n, *_), members in groups.items():
        if len(members) < 2:
            continue
        grouped.update(id(ep) for ep in members)
        said = SmallBatch.says(ctx, run, members[0])  # the hint of the group's batch
        details = _where_in_run(run, members[0])
        details.update(
            batch_size=n,
            samples_per_channel=min(ep.first["samples_per_channel"] for ep in members),
            min_batch_size=need_b,
            min_samples_per_channel=need_s,
            layers=[run.layer_names[ep.layer] for ep in members],
        )
        finding = ctx.finding(
            "small-batch",
            None,
            f"train-mode batches of {n} sample(s) in {len(members)} BN layers "
            f"{_span(run, members[0])} (expected >= {need_b}): the batch statistics these "
            "layers normalise with are noisy, and their running statistics follow that noise",
            hint=said.hint if said is not None else "",
            **details,
        )
        out.append((finding, members))
    for ep in eps:
        single = None if id(ep) in grouped else episode_finding(ctx, run, ep)
        if single is not None:
            out.append((single, [ep]))
    return out

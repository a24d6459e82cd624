"""Check functions of the rules that need a training run (``bncheck.Monitor``).

The Monitor records, at every step, one row of numbers per BN layer (``STAT_COLUMNS``, from
the running-statistics buffers) and one row of call counters (``COUNT_COLUMNS``, from a
forward hook on each BN layer). The functions here are pure: :func:`step_conditions` turns a
block of those rows into one boolean mask per rule (which layer has the problem at which
step), :func:`record_episodes` keeps, for every (rule, layer), the step where the problem
started and the numbers at that step, and the registered check functions turn those episodes
into findings. ``ctx.run`` is a :class:`RunObservations`.

What "a step" is: an ``optimizer.step()`` call when the Monitor has an optimizer; otherwise a
top-level forward call in train mode with grad enabled. Steps count from 1, and what happens
between step k and step k + 1 (a validation loop, the forwards of an accumulation) belongs to
step k + 1. ``details["step"]`` of a finding is the step where its problem first held; a
cross-rank comparison runs at the start of a forward and belongs to the last completed step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..context import AuditContext
from ..discovery import BNLayer
from ..report import Finding
from .catalogue import CATALOGUE
from .registry import check

__all__ = [
    "STAT_COLUMNS",
    "COUNT_COLUMNS",
    "Episode",
    "RunObservations",
    "step_conditions",
    "record_episodes",
    "record_rank_check",
    "run_findings",
    "MONITOR_RULES",
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
)
S_UPDATES, S_NBT, S_MOVED, S_NONFINITE, S_BMEAN, S_BVAR, S_RMEAN, S_RVAR, S_Z, S_VR = range(10)

#: Per-step, per-layer counters from the BN forward hooks (int64).
#:
#: ``train_calls``: calls in train mode; ``eval_calls``: calls in eval mode;
#: ``nograd_updates``: train-mode calls with grad disabled (``no_grad`` or ``inference_mode``)
#: of a layer that tracks running statistics; ``inference_updates``: those under
#: ``inference_mode``; ``min_batch`` / ``min_samples``: smallest batch size and smallest
#: per-channel sample count (N x spatial size) of the train-mode calls (0 when none).
COUNT_COLUMNS: tuple[str, ...] = (
    "train_calls",
    "eval_calls",
    "nograd_updates",
    "inference_updates",
    "min_batch",
    "min_samples",
)
C_TRAIN, C_EVAL, C_NOGRAD, C_INFER, C_MINBATCH, C_MINSAMPLES = range(6)

#: Rules whose findings the Monitor builds from its observations.
MONITOR_RULES: tuple[str, ...] = (
    "frozen-bn-drift",
    "stats-not-updating",
    "stats-updated-without-grad",
    "multiple-updates-per-step",
    "nonfinite-stats",
    "small-batch",
    "stat-drift",
    "unsynced-small-batch",
    "rank-divergent-stats",
)

#: A stat-drift episode becomes a finding when at least this many judged steps exceed the
#: tolerances, and at least this fraction of the judged steps.
DRIFT_MIN_STEPS = 3
DRIFT_MIN_FRACTION = 0.5


@dataclass
class Episode:
    """One problem of one layer over a run: where it started and how often it held."""

    rule: str
    layer: int
    first_step: int
    last_step: int
    steps: int
    first: dict[str, Any]

    def extend(self, first_step: int, last_step: int, steps: int, first: dict[str, Any]) -> None:
        if first_step < self.first_step:
            self.first_step, self.first = first_step, first
        self.last_step = max(self.last_step, last_step)
        self.steps += steps


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

    @property
    def step_word(self) -> str:
        return "optimizer step" if self.step_kind == "optimizer" else "step"


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
) -> dict[str, np.ndarray]:
    """For each rule, a boolean mask ``[steps, layers]``: the problem holds at that step.

    ``stats`` is ``[S, L, len(STAT_COLUMNS)]``, ``counts`` ``[S, L, len(COUNT_COLUMNS)]``;
    ``trainable`` / ``frozen`` ``[S, L]`` say whether the layer's gamma/beta were being
    optimized (requires_grad and, with an optimizer, in a param group) or frozen (it has
    parameters and none is optimized); ``tracks_stats`` ``[L]`` whether it has running
    statistics; ``drift_warmup`` ``[L]`` the counter value before which stat-drift is not
    judged (the running average has not yet forgotten its initial values);
    ``expected_updates`` ``[S]`` the statistics updates each step may make (1, plus the
    iterations a GradScaler skipped before it; default 1).
    """
    updates = stats[..., S_UPDATES]
    has_counter = ~np.isnan(updates)
    moved = stats[..., S_MOVED] > 0
    train_calls = counts[..., C_TRAIN]
    eval_calls = counts[..., C_EVAL]
    nograd = counts[..., C_NOGRAD]
    tracks = np.broadcast_to(tracks_stats[None, :], updates.shape)

    out: dict[str, np.ndarray] = {}
    out["frozen-bn-drift"] = frozen & tracks & moved
    no_update = np.where(has_counter, np.nan_to_num(updates) == 0, ~moved)
    out["stats-not-updating"] = (
        trainable & tracks & (eval_calls > 0) & (train_calls == 0) & no_update
    )
    out["stats-updated-without-grad"] = tracks & (nograd > 0)
    grad_updates = np.where(has_counter, np.nan_to_num(updates) - nograd, train_calls - nograd)
    # one update per step, plus one for each iteration a GradScaler skipped before it
    allowed = 1 if expected_updates is None else expected_updates[:, None]
    out["multiple-updates-per-step"] = tracks & (grad_updates > allowed)
    out["nonfinite-stats"] = stats[..., S_NONFINITE] > 0
    min_batch = counts[..., C_MINBATCH]
    min_samples = counts[..., C_MINSAMPLES]
    small = (train_calls > 0) & (
        (min_batch < float(tolerances["min_batch_size"]))
        | (min_samples < float(tolerances["min_samples_per_channel"]))
    )
    out["small-batch"] = small
    nbt_before = stats[..., S_NBT] - np.nan_to_num(updates)
    with np.errstate(invalid="ignore"):
        judged = ~np.isnan(stats[..., S_Z]) & (nbt_before >= drift_warmup[None, :])
        exceeds = (stats[..., S_Z] > float(tolerances["drift_mean_z"])) | (
            stats[..., S_VR] > float(tolerances["drift_var_ratio"])
        )
    out["stat-drift"] = judged & exceeds
    out["_drift_judged"] = judged
    if distributed:
        plain = ~sync_bn if sync_bn is not None else np.ones(updates.shape[1], dtype=bool)
        out["unsynced-small-batch"] = (
            (train_calls > 0)
            & tracks
            & plain[None, :]
            & (min_batch < float(tolerances["sync_bn_min_batch"]))
        )
    return out


def _first_numbers(
    rule: str, stats: np.ndarray, counts: np.ndarray, frozen_reason: str, i: int, layer: int
) -> dict[str, Any]:
    s, c = stats[i, layer], counts[i, layer]

    def num(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    if rule == "frozen-bn-drift":
        return {"updates": num(s[S_UPDATES]), "moved": float(s[S_MOVED]), "reason": frozen_reason}
    if rule == "stats-not-updating":
        return {"updates": num(s[S_UPDATES]), "eval_calls": int(c[C_EVAL])}
    if rule == "stats-updated-without-grad":
        return {"updates_without_grad": int(c[C_NOGRAD]), "inference_mode": int(c[C_INFER])}
    if rule == "multiple-updates-per-step":
        ups = s[S_UPDATES]
        grad_ups = (ups if not math.isnan(ups) else c[C_TRAIN]) - c[C_NOGRAD]
        return {"updates": int(grad_ups), "train_calls": int(c[C_TRAIN])}
    if rule == "nonfinite-stats":
        return {"channels": int(s[S_NONFINITE])}
    if rule in ("small-batch", "unsynced-small-batch"):
        return {"batch_size": int(c[C_MINBATCH]), "samples_per_channel": int(c[C_MINSAMPLES])}
    if rule == "stat-drift":
        return {"drift_z": float(s[S_Z]), "drift_var_ratio": float(s[S_VR])}
    return {}


def record_episodes(
    episodes: dict[tuple[str, int], Episode],
    conditions: Mapping[str, np.ndarray],
    steps: np.ndarray,
    stats: np.ndarray,
    counts: np.ndarray,
    frozen_reason: Sequence[str],
) -> list[Episode]:
    """Fold one block of steps into ``episodes``; return the episodes that are new."""
    new: list[Episode] = []
    for rule, mask in conditions.items():
        if rule.startswith("_") or not mask.any():
            continue
        hit_layers = np.flatnonzero(mask.any(axis=0))
        for layer in hit_layers.tolist():
            col = mask[:, layer]
            idx = np.flatnonzero(col)
            i0, i1 = int(idx[0]), int(idx[-1])
            first = _first_numbers(rule, stats, counts, frozen_reason[layer], i0, layer)
            key = (rule, layer)
            if key in episodes:
                episodes[key].extend(int(steps[i0]), int(steps[i1]), len(idx), first)
            else:
                ep = Episode(rule, layer, int(steps[i0]), int(steps[i1]), len(idx), first)
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
        return f"after the last {word} ({run.steps})"
    if ep.steps == 1:
        return f"at {word} {ep.first_step}"
    if ep.last_step > run.steps:
        return (
            f"from {word} {ep.first_step} until after the last {word} ({ep.steps} "
            f"times in {run.steps} {word}s)"
        )
    return f"from {word} {ep.first_step} ({ep.steps} of {run.steps} {word}s, last {ep.last_step})"


def episode_finding(ctx: AuditContext, run: RunObservations, ep: Episode) -> Finding | None:
    """The finding of one episode, in the one message format (``None``: not reportable)."""
    name = run.layer_names[ep.layer]
    f = ep.first
    base: dict[str, Any] = {
        "step": ep.first_step,
        "last_step": ep.last_step,
        "steps_affected": ep.steps,
        "steps_observed": run.steps,
    }
    if run.distributed:
        base["rank"] = run.rank
    span = _span(run, ep)
    rule = ep.rule
    if rule == "frozen-bn-drift":
        text = (
            f"{f['reason']} but its running statistics changed {span} "
            f"(sum |delta| = {f['moved']:.3g}, expected 0)"
        )
        hint = (
            "re-apply .eval() to frozen BN layers after every model.train() (or use a "
            "FrozenBatchNorm layer)"
        )
    elif rule == "stats-not-updating":
        text = (
            f"gamma/beta are being optimized but the layer ran only in eval mode {span}: "
            "num_batches_tracked did not change (delta 0, expected 1 per step)"
        )
        hint = "call model.train() after validation (model.eval()) and before training resumes"
    elif rule == "stats-updated-without-grad":
        how = "torch.inference_mode()" if f["inference_mode"] else "torch.no_grad()"
        text = (
            f"running statistics updated by {f['updates_without_grad']} train-mode "
            f"forward(s) under {how} {span} (expected 0: forwards without grad are "
            "usually validation)"
        )
        hint = (
            "call model.eval() before validation and model.train() after; if this is "
            "deliberate recalibration, ignore 'stats-updated-without-grad'"
        )
    elif rule == "multiple-updates-per-step":
        text = f"{f['updates']} running-statistics updates per {run.step_word} {span} (expected 1)"
        hint = (
            "gradient accumulation feeds BN micro-batches; activation checkpointing and "
            "extra train-mode forwards update twice; for checkpointing divide momentum by "
            "the recompute count, else ignore 'multiple-updates-per-step' if intended; with "
            "AMP, pass scaler= to the Monitor so steps the GradScaler skipped are not counted"
        )
    elif rule == "nonfinite-stats":
        text = (
            f"running statistics became NaN/Inf {span.replace('from', 'at', 1)} "
            f"({f['channels']} of {_channels(ctx, name)} channels); every output of those "
            "channels is NaN from then on"
        )
        hint = (
            f"look for NaN/Inf in the batch or loss of {run.step_word} {ep.first_step}, "
            "fp16 overflow or a too-high learning rate; reload or recompute the statistics"
        )
    elif rule == "small-batch":
        need_b = int(ctx.tol("min_batch_size"))
        need_s = int(ctx.tol("min_samples_per_channel"))
        text = (
            f"train-mode batch of {f['batch_size']} sample(s), {f['samples_per_channel']} "
            f"value(s) per channel {span} (expected >= {need_b} samples and >= {need_s} "
            "values per channel): batch statistics are noisy"
        )
        hint = (
            "use larger batches, freeze BN (eval mode) for fine-tuning, or use GroupNorm; "
            "drop the last partial batch (drop_last=True)"
        )
        base.update(min_batch_size=need_b, min_samples_per_channel=need_s)
    elif rule == "stat-drift":
        judged = int(run.drift_judged[ep.layer]) if run.drift_judged is not None else ep.steps
        if ep.steps < DRIFT_MIN_STEPS or ep.steps < DRIFT_MIN_FRACTION * max(judged, 1):
            return None
        tz, tv = ctx.tol("drift_mean_z"), ctx.tol("drift_var_ratio")
        text = (
            f"train batches far from the running statistics {span} ({ep.steps} of {judged} "
            f"judged): mean |batch mean - running_mean| = {f['drift_z']:.3g} std (tol "
            f"{tz:g}), var ratio {f['drift_var_ratio']:.3g} (tol {tv:g})"
        )
        hint = (
            "the running statistics lag the data: momentum too small, statistics loaded "
            "from other data, or the input distribution changed; recompute them "
            "(torch.optim.swa_utils.update_bn)"
        )
        base.update(judged_steps=judged, drift_mean_z_tol=tz, drift_var_ratio_tol=tv)
    elif rule == "rank-divergent-stats":
        rtol = f["rank_rtol"]
        text = (
            f"running statistics differ across {f['world_size']} ranks {span}: max "
            f"relative difference {f['rel_diff']:.3g} > rank_rtol {rtol:g}"
        )
        hint = (
            "keep DDP's buffer sync on (broadcast_buffers=True, or forward_sync_buffers=True "
            "on newer torch) or use SyncBatchNorm; "
            "evaluate and save from one rank only after the buffers are synchronised"
        )
        base.pop("rank", None)
    elif rule == "unsynced-small-batch":
        world = run.world_size
        text = (
            f"per-rank batch of {f['batch_size']} with plain {run.layer_kinds[ep.layer]} "
            f"across {world} ranks {span}: statistics come from {f['batch_size']} samples, "
            f"not the global {f['batch_size'] * world}"
        )
        hint = (
            "convert with nn.SyncBatchNorm.convert_sync_batchnorm(model) before wrapping "
            "in DDP, or raise the per-rank batch"
        )
        base.update(world_size=world, sync_bn_min_batch=int(ctx.tol("sync_bn_min_batch")))
    else:  # pragma: no cover - every monitor rule is handled above
        return None
    try:
        where: BNLayer | str = ctx.layer(name)
    except KeyError:
        where = name
    return ctx.finding(rule, where, text, hint=hint, **base, **f)


def _channels(ctx: AuditContext, name: str) -> str:
    try:
        n = ctx.layer(name).num_features
    except KeyError:
        return "?"
    return str(n) if n is not None else "?"


def run_findings(ctx: AuditContext, rule: str) -> Iterator[Finding]:
    """Findings of ``rule`` from the Monitor's observations (``ctx.run``), in layer order."""
    run: RunObservations | None = ctx.run
    if run is None:
        return
    eps = sorted((ep for (r, _), ep in run.episodes.items() if r == rule), key=lambda ep: ep.layer)
    for ep in eps:
        finding = episode_finding(ctx, run, ep)
        if finding is not None:
            yield finding


# The check function of every training-run and distributed rule reads the same episodes.
for _info in CATALOGUE:
    if _info.needs in ("training run", "distributed"):
        check(_info.id)(functools.partial(run_findings, rule=_info.id))

"""The rule catalogue: id, default severity, what a rule needs, summary and tolerances.

This is the single source of the rule metadata. It imports nothing but the standard
library, so the pytest plugin and the CLI can validate rule ids and tolerance names without
importing torch. The check functions live in ``bncheck.checks.static`` (model and buffers),
``bncheck.checks.forward`` (forward passes, user batch, data) and ``bncheck.checks.training``
(training runs and distributed runs); they are attached to these entries by
:func:`bncheck.checks.registry.check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["NEEDS", "STAGES", "RuleInfo", "CATALOGUE", "TOLERANCES", "Tolerance"]

#: What a rule needs, and what provides it.
NEEDS: dict[str, str] = {
    "model": "the model's modules and their settings",
    "buffers": "the model's parameters and buffers",
    "optimizer": "an optimizer (audit(..., optimizer=opt))",
    "forward": "an example input to run forward passes with (audit(model, x))",
    "user batch": "a batch the user trains with (audit(model, x)); synthetic inputs are not judged",
    "data": "an iterable of batches (audit(..., data=loader))",
    "training run": "a training run watched by bncheck.Monitor",
    "distributed": "a distributed training run watched by bncheck.Monitor",
}

#: The audit's forward passes; a rule with one of these needs names the pass it reads
#: (``RuleInfo.stage``), and the engine runs only the passes the selected rules read.
STAGES: dict[str, str] = {
    "train": "the train-mode pass on the example input (tracing, statistics, batch sizes)",
    "eval": "the eval-mode passes on samples of the example input",
    "data": "the eval-mode passes over the batches of data=",
}


@dataclass(frozen=True)
class Tolerance:
    """A named, documented threshold that users can override (``audit(model, x, name=value)``)."""

    name: str
    default: float | int
    doc: str


@dataclass(frozen=True)
class RuleInfo:
    """Metadata of one rule. ``severity`` is the default severity of its findings.
    ``stage`` is the audit pass the rule reads (a key of :data:`STAGES`); ``None`` for rules
    that need no forward pass. ``causes`` pairs a cause of the rule's findings with its own
    severity where that cause deserves another than the default (see :meth:`severity_for`)."""

    id: str
    severity: str
    needs: str
    summary: str
    tolerances: tuple[Tolerance, ...] = field(default=())
    stage: str | None = None
    causes: tuple[tuple[str, str], ...] = field(default=())

    def severity_for(self, cause: str | None = None) -> str:
        """The severity of a finding with ``cause`` (the default severity for any other)."""
        return dict(self.causes).get(cause, self.severity) if cause else self.severity


def _t(name: str, default: float | int, doc: str) -> Tolerance:
    return Tolerance(name, default, doc)


CATALOGUE: tuple[RuleInfo, ...] = (
    # ---- forward: tracing -------------------------------------------------------------
    RuleInfo(
        "bn-after-activation",
        "info",
        "forward",
        "BN input comes straight from an activation (the original paper puts BN between the "
        "linear op and the nonlinearity).",
        stage="train",
    ),
    RuleInfo(
        "bias-before-bn",
        "info",
        "forward",
        "A conv/linear bias feeds BN directly; BN's mean subtraction cancels it.",
        stage="train",
    ),
    RuleInfo(
        "dropout-before-bn",
        "info",
        "forward",
        "Dropout feeds BN: the variance BN sees differs between train and eval.",
        stage="train",
    ),
    RuleInfo(
        "bn-reused",
        "warning",
        "forward",
        "One BN module is called at more than one place per forward; its statistics mix them.",
        stage="train",
    ),
    # ---- model ------------------------------------------------------------------------
    RuleInfo(
        "keras-momentum",
        "warning",
        "model",
        "Momentum > 0.5: a Keras-convention value; PyTorch's momentum weights the new batch.",
        (_t("momentum_max", 0.5, "largest momentum accepted as PyTorch-convention"),),
    ),
    RuleInfo("invalid-eps", "error", "model", "eps <= 0 or not finite."),
    RuleInfo(
        "no-running-stats",
        "warning",
        "model",
        "track_running_stats=False (or no running buffers): eval uses batch statistics.",
    ),
    RuleInfo(
        "frozen-bn-in-train-mode",
        "warning",
        "model",
        "Affine parameters frozen but the layer is in train mode: its statistics still move.",
    ),
    # ---- buffers ----------------------------------------------------------------------
    RuleInfo(
        "nonfinite-stats",
        "error",
        "buffers",
        "NaN/Inf in running_mean, running_var, weight or bias.",
    ),
    RuleInfo("negative-running-var", "error", "buffers", "running_var < 0 in some channels."),
    RuleInfo("tiny-running-var", "warning", "buffers", "running_var <= eps in some channels."),
    RuleInfo(
        "untrained-stats",
        "warning",
        "buffers",
        "Running statistics still at their initial values (0 and 1) in a model used for inference.",
        # statistics a checkpoint did not hold (the loader's fact): not saved, an error
        causes=(("missing-buffers", "error"),),
    ),
    RuleInfo(
        "dead-channels",
        "info",
        "buffers",
        "gamma ~ 0 in a trained layer: those channels output only beta.",
        (_t("dead_gamma_atol", 1e-6, "|gamma| at or below this counts as zero"),),
    ),
    # ---- forward: numerics ------------------------------------------------------------
    RuleInfo(
        "normalization",
        "error",
        "forward",
        "In train mode the pre-affine output per channel is not zero-mean / unit-variance.",
        (
            _t(
                "normalization_rtol",
                1.0,
                "multiplier on the per-channel float round-off bound (u * (1 + log2 n) times "
                "the input and gamma/beta conditioning, x16; for float16/bfloat16 u + u_32 * "
                "(1 + log2 n)) used as tolerance; raise to loosen",
            ),
        ),
        stage="train",
    ),
    RuleInfo(
        "ema-update",
        "error",
        "forward",
        "running_mean / running_var / num_batches_tracked did not follow the momentum update.",
        (
            _t(
                "ema_rtol",
                1.0,
                "multiplier on the per-channel float round-off bound of the quantities compared "
                "(u times the old value and the batch statistic, u * (1 + log2 n) on the batch "
                "statistic only, x8) used as tolerance; raise to loosen",
            ),
        ),
        stage="train",
    ),
    RuleInfo(
        "eval-batch-dependence",
        "error",
        "forward",
        "In eval mode a sample's output depends on the other samples in its batch.",
        (
            _t(
                "eval_rtol",
                1e-5,
                "difference between two eval outputs ignored as float noise of batched kernels, "
                "relative to the largest |value| of that output (also used by "
                "eval-nondeterminism)",
            ),
        ),
        stage="eval",
    ),
    RuleInfo(
        "eval-nondeterminism",
        "error",
        "forward",
        "Two identical eval forwards differ.",
        stage="eval",
    ),
    RuleInfo(
        "eval-updates-stats",
        "error",
        "forward",
        "An eval-mode forward changed running statistics.",
        stage="eval",
    ),
    RuleInfo(
        "single-value-per-channel",
        "error",
        "forward",
        "A BN layer in train mode sees one value per channel (batch statistics undefined).",
        stage="train",
    ),
    RuleInfo(
        "small-batch",
        "warning",
        "user batch",
        "Batch size or per-channel sample count too small for reliable statistics.",
        (
            _t(
                "min_batch_size",
                8,
                "smallest batch size that gets no small-batch warning (judged on the user's "
                "batch only)",
            ),
            _t(
                "min_samples_per_channel",
                32,
                "smallest per-channel value count N * prod(spatial) a train-mode BN layer "
                "may see without a warning",
            ),
        ),
        stage="train",
    ),
    RuleInfo(
        "input-not-normalized",
        "warning",
        "user batch",
        "The network input looks unnormalized (e.g. raw 0-255 pixels).",
        (
            _t(
                "input_abs_max",
                10.0,
                "largest |mean| or std of a floating-point network input that counts as "
                "normalized (image-like inputs of 3+ dims holding only integers in [0, max], "
                "max > 1, are flagged regardless)",
            ),
        ),
        stage="train",
    ),
    RuleInfo(
        "stat-drift",
        "warning",
        "data",
        "Running statistics far from the statistics of the given data.",
        (
            _t(
                "drift_mean_z",
                0.5,
                "largest |running_mean - data mean| in units of the data std "
                "(sqrt(data var + eps))",
            ),
            _t(
                "drift_var_ratio",
                2.0,
                "largest (running_var + eps) / (data var + eps), or its inverse",
            ),
            _t(
                "drift_max_batches",
                32,
                "at most this many batches of data= are run (eval mode) to estimate the "
                "population statistics",
            ),
        ),
        stage="data",
    ),
    # ---- optimizer --------------------------------------------------------------------
    RuleInfo(
        "weight-decay-on-bn",
        "warning",
        "optimizer",
        "BN gamma/beta are in a param group with weight decay.",
    ),
    # ---- training run (Monitor) -------------------------------------------------------
    RuleInfo(
        "frozen-bn-drift",
        "error",
        "training run",
        "Statistics of a BN whose parameters are frozen changed during training.",
    ),
    RuleInfo(
        "stats-not-updating",
        "warning",
        "training run",
        "BN layers with trainable gamma/beta run in eval mode across optimizer steps: their "
        "running statistics never update.",
    ),
    RuleInfo(
        "stats-updated-without-grad",
        "warning",
        "training run",
        "Running statistics updated under no_grad / inference_mode (e.g. validation in train "
        "mode).",
    ),
    RuleInfo(
        "multiple-updates-per-step",
        "warning",
        "training run",
        "Statistics updated more than once per optimizer step (accumulation, recomputation, "
        "extra forwards).",
    ),
    # ---- distributed (Monitor under torch.distributed) --------------------------------
    RuleInfo(
        "rank-divergent-stats",
        "warning",
        "distributed",
        "Running statistics differ across ranks.",
        (
            _t(
                "rank_rtol",
                1e-4,
                "relative difference of a layer's running-statistics summary (mean and mean "
                "square of running_mean and running_var) between ranks that counts as "
                "divergent",
            ),
        ),
    ),
    RuleInfo(
        "unsynced-small-batch",
        "info",
        "distributed",
        "Small per-rank batches with plain (not Sync) BN under DDP.",
        (
            _t(
                "sync_bn_min_batch",
                32,
                "smallest per-rank batch size under DDP with plain BN that gets no info",
            ),
        ),
    ),
)

#: Every tolerance by name, with the rule that owns it.
TOLERANCES: dict[str, tuple[str, Tolerance]] = {
    t.name: (info.id, t) for info in CATALOGUE for t in info.tolerances
}


def rule_ids() -> list[str]:
    return [info.id for info in CATALOGUE]


def info_for(rule_id: str) -> RuleInfo:
    for info in CATALOGUE:
        if info.id == rule_id:
            return info
    raise KeyError(rule_id)


def describe() -> list[dict[str, Any]]:
    """The catalogue as plain dicts (id, severity, needs, summary)."""
    return [
        {"id": i.id, "severity": i.severity, "needs": i.needs, "summary": i.summary}
        for i in CATALOGUE
    ]

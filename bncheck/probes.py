"""The audit's forward passes and what they observe (tracing, statistics, eval checks).

``collect(ctx)`` is called by the engine inside ``bncheck.state.preserved`` and returns a
:class:`ForwardObservations`, which the forward rules (``bncheck.checks.forward``) read as
``ctx.forward``. The passes, all under ``torch.no_grad()`` and with no copy of the model:

1. **Train pass** (``model.train()``, the user's batch, once). A :class:`bncheck.tracing.Tracer`
   records who feeds each BN call and what consumes it; hooks on every BN layer record, per
   call, a :class:`TrainCall`: the input's shape, the per-channel statistics of the tensors
   going into and out of the normalisation (computed the moment they exist, before an in-place
   op after BN can overwrite them), a small grid of (input, output) element pairs, gamma/beta,
   and the running buffers before and after the call. A layer that would see one value per
   channel is switched to eval for that call (so the pass does not raise) and marked.
2. **Eval passes** (``model.eval()``, batches of 2 samples, or 3 when a BN layer sees one value
   per sample and channel): ``A`` = sample 0 with sample 1 (and 2), ``B`` = sample 0 with other
   batch-mates (later samples, or perturbed copies from a local generator). Per BN call the
   hooks keep the input and output of those samples (:class:`EvalPass`). When sample 0 comes
   out the same in both, eval is deterministic and batch-independent; otherwise ``A`` runs
   again (``A2``): ``A`` vs ``A2`` is determinism, ``A`` vs ``B`` on sample 0 batch
   dependence. The BN buffers are compared before/after each pass.
3. **Data passes** (only with ``data=`` and ``stat-drift`` selected; eval mode, at most
   ``drift_max_batches`` batches): per-channel statistics of each BN input (:class:`DriftStats`).

With ``bn-reused`` selected and both stages wanted, the eval passes run first when the input
has one sample count: the layers they call more than once tell the train pass which first
calls to read for ``bn-reused`` (otherwise first-call inputs are held until the forward ends,
in case the layer is called again). The train pass then gets the model as the user left it
(``ctx.reset``: all but parameter values) and the RNG state it would have had first, and the
eval passes run again after it when it shows another batch size or number of batch-mates
than they used.

The BN buffers are snapshot first and put back after each stage, so every stage sees the
user's statistics; :func:`bncheck.state.preserved` restores everything else on exit. Random
inputs are drawn from a local ``torch.Generator``, never the global RNG.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.module import register_module_forward_hook

from .context import AuditContext
from .discovery import BNLayer, setting_number
from .errors import BNCheckError, InputError, first_line
from .render import layer_list
from .state import RNGState
from .tracing import BNCall, OpRecord, Tracer

__all__ = [
    "collect",
    "ForwardObservations",
    "TrainCall",
    "ChannelStats",
    "BufferState",
    "EvalPass",
    "EvalCall",
    "EvalObservations",
    "DriftStats",
    "InputSummary",
    "channel_stats",
    "read_stats",
    "RawStats",
    "finish_all",
    "tensor_difference",
    "first_difference",
    "validate_input",
    "ALL_STAGES",
]


# ---- records ---------------------------------------------------------------------------------
class ChannelStats:
    """Per-channel statistics over every axis but dim 1 (float64 CPU vectors of length C).

    ``mean`` is the sample mean and ``var`` the biased variance (divide by ``count``); see
    :func:`channel_stats` for how they are computed. ``count`` is N times the product of the
    spatial sizes.
    """

    __slots__ = ("mean", "var", "count", "_sample_var", "_sample_sq_var", "_rows")

    def __init__(
        self,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: int,
        sample_var: torch.Tensor | None = None,
        sample_sq_var: torch.Tensor | None = None,
        *,
        rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None = None,
    ) -> None:
        self.mean = mean
        self.var = var
        self.count = count
        self._sample_var = sample_var
        self._sample_sq_var = sample_sq_var
        #: (s1, s2, k, d, values per row): the per-sample sums the two sample variances are
        #: computed from on first use (only ``bn-reused`` reads them)
        self._rows = rows

    def __repr__(self) -> str:
        return f"ChannelStats(channels={self.mean.numel()}, count={self.count})"

    def _resolve(self) -> None:
        if self._rows is None:
            return
        s1, s2, k, d, length = self._rows
        self._rows = None
        if s1.shape[0] < 2:
            return
        with np.errstate(all="ignore"):
            per_sample = k + s1 / length
            # each sample's mean squared deviation from the channel mean: (x - k - d)^2
            per_sample_sq = (s2 - 2 * d * s1) / length + d * d
            self._sample_var = torch.from_numpy(_batch_var(per_sample))
            self._sample_sq_var = torch.from_numpy(_batch_var(per_sample_sq))

    @property
    def sample_var(self) -> torch.Tensor | None:
        """The variance over the batch (unbiased) of each sample's channel mean, the sampling
        noise of a batch mean (``bn-reused`` compares calls with it); ``None`` for one
        sample."""
        self._resolve()
        return self._sample_var

    @property
    def sample_sq_var(self) -> torch.Tensor | None:
        """The same for the variance: the variance over the batch (unbiased) of each sample's
        mean squared deviation from the channel mean, the sampling noise of ``var``."""
        self._resolve()
        return self._sample_sq_var


def _counter(module: nn.Module) -> int | None:
    """A BN module's ``num_batches_tracked`` as an int (``None`` without one)."""
    nbt = module._buffers.get("num_batches_tracked")
    if not isinstance(nbt, torch.Tensor):
        return None
    numel = nbt.numel()
    if numel == 1:
        return int(nbt.item())
    return int(nbt.reshape(-1)[0]) if numel else None


@dataclass
class BufferState:
    """Copies of a BN layer's running buffers at one moment (``None`` where absent)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: int | None

    @classmethod
    def capture(cls, module: nn.Module) -> BufferState:
        def copy(name: str) -> torch.Tensor | None:
            t = module._buffers.get(name)
            return t.detach().clone() if isinstance(t, torch.Tensor) else None

        return cls(copy("running_mean"), copy("running_var"), _counter(module))

    def restore(self, module: nn.Module) -> None:
        """Write these values back into the module's buffers, in place."""
        with torch.no_grad():
            for name, value in (
                ("running_mean", self.running_mean),
                ("running_var", self.running_var),
            ):
                buf = module._buffers.get(name)
                if isinstance(buf, torch.Tensor) and value is not None and buf.shape == value.shape:
                    buf.copy_(value)
            nbt = module._buffers.get("num_batches_tracked")
            if isinstance(nbt, torch.Tensor) and self.num_batches_tracked is not None:
                nbt.fill_(self.num_batches_tracked)

    def changed_in(self, module: nn.Module) -> list[str]:
        """:meth:`changed` against the module's live buffers (no copies taken)."""
        names = []
        for name in ("running_mean", "running_var"):
            a, b = getattr(self, name), module._buffers.get(name)
            if a is None or not isinstance(b, torch.Tensor):
                continue
            b = b.detach()
            if (
                a.shape != b.shape
                or a.dtype != b.dtype
                or a.device != b.device
                or not torch.equal(a, b)
                and not torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
            ):
                names.append(name)
        if self.num_batches_tracked != _counter(module):
            names.append("num_batches_tracked")
        return names

    def changed(self, other: BufferState) -> list[str]:
        """Names of the buffers whose values differ between ``self`` and ``other``."""
        names = []
        for name in ("running_mean", "running_var"):
            a, b = getattr(self, name), getattr(other, name)
            if a is None or b is None:
                continue
            # NaN == NaN here: a NaN buffer an eval pass left alone has not changed
            if a.shape != b.shape or not torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True):
                names.append(name)
        if self.num_batches_tracked != other.num_batches_tracked:
            names.append("num_batches_tracked")
        return names


@dataclass
class TrainCall:
    """One call of a BN layer in the train-mode pass.

    ``input_stats``/``output_stats`` are the :class:`ChannelStats` of the tensor normalised
    and of the result (post-affine), taken from PyTorch's ``batch_norm`` op when the layer
    called it (``norm_source == "batch_norm"``, which also covers BatchNormAct-style layers
    that apply an activation afterwards) or else from the layer's own input and output
    (``"module"``); ``output_stats`` is ``None`` for ``stock`` layers (PyTorch's own BN
    classes with PyTorch's forward), whose output is checked on the grid only.
    ``grid_in``/``grid_out`` are (C, K) float64 values of the same K elements per channel of
    both tensors. ``gamma``/``beta`` are float64 copies (``None`` without
    affine). ``before``/``after`` are the running buffers around the call. ``forced_eval``:
    the layer would have seen one value per channel and was run in eval mode for this call.
    """

    layer: str
    index: int
    occurrence: int
    training: bool
    standard: bool
    shape: tuple[int, ...]
    batch_size: int
    samples_per_channel: int
    single_value: bool = False
    forced_eval: bool = False
    #: the call could not be read (:func:`_unreadable_call`: inside torch.func ``vmap``,
    #: whose batched values cannot leave the transform, or with meta tensors); not observed
    unread: bool = False
    eps: float | None = None
    momentum: float | None = None
    has_momentum: bool = False
    track_running_stats: bool = False
    dtype: torch.dtype = torch.float32
    input_stats: ChannelStats | None = None
    output_stats: ChannelStats | None = None
    grid_in: torch.Tensor | None = None
    grid_out: torch.Tensor | None = None
    norm_source: str | None = None
    gamma: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    before: BufferState | None = None
    after: BufferState | None = None
    trace: BNCall | None = None
    stock: bool = False
    #: read during the forward, finished into ``input_stats``/``output_stats`` and the
    #: (C, K) grids after it (``measured`` until then)
    raw_in: RawStats | None = field(default=None, repr=False)
    raw_out: RawStats | None = field(default=None, repr=False)
    measured: bool = False
    #: ``gamma``/``beta`` the module holds but its ``F.batch_norm`` was not given (decided at
    #: the module's exit, with ``op_output``, the op's result)
    affine_after: tuple[str, ...] = ()
    op_output: torch.Tensor | None = field(default=None, repr=False)
    op_version: int = 0
    #: why ``input_stats`` have no per-sample sums although ``bn-reused`` wanted them (the
    #: first call of a layer called again, whose input changed after the call)
    sums_unread: str | None = None


@dataclass
class EvalCall:
    """One BN call in an eval pass: input and output of the (at most three) kept samples."""

    layer: str
    occurrence: int
    input: torch.Tensor | None
    output: torch.Tensor | None


@dataclass
class EvalPass:
    """One eval-mode forward: its BN calls in order and the model's output tensors. A
    screening pass records each call's first output row only (no inputs)."""

    calls: list[EvalCall]
    outputs: list[torch.Tensor]
    #: layers whose calls could not be read (inside torch.func.vmap, or on the meta device)
    unread: set[str] = field(default_factory=set)


@dataclass
class EvalObservations:
    """The eval passes: ``a`` (sample 0 with two batch-mates), ``b`` (sample 0 with other
    batch-mates; ``None`` when no other batch could be made) and ``a_again`` (``a`` run once
    more). ``a_again`` is run only when sample 0's BN outputs or model outputs differ between
    ``a`` and ``b`` (to tell nondeterminism from batch dependence); when they agree, the
    eval forward is both deterministic and batch-independent for sample 0, and it is
    ``None``. Also: the sub-batch size used, what the companions were, and per layer the
    buffers an eval pass changed."""

    a: EvalPass
    a_again: EvalPass | None
    b: EvalPass | None
    batch_size: int
    companion: str
    buffer_changes: dict[str, list[str]] = field(default_factory=dict)
    #: BN layers with running statistics that the eval forward neither calls nor reads
    #: (an auxiliary head used in training only): moving their statistics far changed none
    #: of sample 0's BN outputs or model outputs (:func:`_unread_statistics`)
    unread_stats: frozenset[str] = frozenset()
    #: parameters whose values the repeated pass (``a_again``) changed: a forward that
    #: updates weights (an EMA step inside forward) differs at every call by construction
    params_changed: tuple[str, ...] = ()
    #: the same for buffers other than the BN layers' running statistics (a quantization
    #: observer that updates its scale in eval mode too)
    buffers_changed: tuple[str, ...] = ()


@dataclass
class DriftStats:
    """Population statistics of one BN layer's input over the given data.

    Estimator (as fvcore's precise-BN weights batches): with per-batch per-channel counts
    ``n_i``, means ``m_i`` and biased variances ``v_i``, the population mean is
    ``sum(n_i m_i) / sum(n_i)`` and the population variance is
    ``sum(n_i v_i) / sum(n_i) + sum(n_i (m_i - mean)^2) / sum(n_i)``, i.e. E[var] + Var[mean]:
    exactly the biased variance of all the data pooled.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int
    batches: int
    #: (batches, C): each batch's mean and biased variance (the batch-to-batch spread)
    batch_means: torch.Tensor | None = None
    batch_vars: torch.Tensor | None = None


@dataclass
class InputSummary:
    """Summary of one floating-point network input tensor."""

    where: str
    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    integer_valued: bool
    #: for a list of tensors summarised as one input, the names of its elements
    parts: tuple[str, ...] = ()
    #: the first weight layer (conv/linear, e.g. ``conv (Conv2d)``) this input reached, when
    #: the summary is of the tensor that layer received (after the model's own preprocessing)
    #: rather than of the raw input; ``None`` for a summary of the raw input
    layer: str | None = None
    #: ops other than shape-only ones and dtype casts ran between the raw input and ``layer``
    preprocessed: bool = False
    #: the raw input's dtype (``torch.uint8`` for raw pixels cast to float in the model)
    dtype: str = ""


@dataclass
class ForwardObservations:
    """What the audit's forward passes observed; ``ctx.forward`` holds one.

    ``calls`` are the BN calls of the train pass in call order (:class:`TrainCall`);
    ``call_counts`` maps layer name to calls per forward; ``train_error`` /
    ``eval_error`` say why a stage did not run to the end (``None`` when it did);
    ``stopped_at`` names the layer where a one-value-per-channel layer without running
    statistics stopped the train pass. ``eval`` and ``drift`` are ``None`` when not run.
    ``batch_size`` is the number of samples of the example input (a list's length or a
    tensor's dim 0; with several candidates, the one the BN layers saw as N).
    ``stage_errors`` maps a stage (``"train"``, ``"eval"``, ``"data"``) that did not run to
    the end to the reason its rules are skipped; ``needs_targets``: the train-mode forward
    failed for want of targets. ``user_training`` is each BN layer's ``training`` flag as
    the user left it (the batch-size rules judge only layers the user runs in train mode).
    """

    calls: list[TrainCall] = field(default_factory=list)
    call_counts: dict[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    inputs: list[InputSummary] = field(default_factory=list)
    train_ran: bool = False
    train_error: str | None = None
    stopped_at: str | None = None
    eval: EvalObservations | None = None
    eval_error: str | None = None
    drift: dict[str, DriftStats] | None = None
    drift_batches: int = 0
    stage_errors: dict[str, str] = field(default_factory=dict)
    needs_targets: bool = False
    user_training: dict[str, bool] = field(default_factory=dict)
    #: BN layers with calls the passes could not read (:func:`_unreadable_call`)
    unread: set[str] = field(default_factory=set)

    def calls_of(self, layer: str) -> list[TrainCall]:
        return [c for c in self.calls if c.layer == layer]


class _SingleValueStop(Exception):
    """A layer without running statistics would see one value per channel: stop the pass."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


# ---- inputs ----------------------------------------------------------------------------------
# How the example input is read (DESIGN: a tuple is positional arguments, a dict keyword
# arguments, anything else one argument). Its *samples* are the elements of a list (a
# torchvision detector's images, its target dicts) and the rows (dim 0) of a tensor; the
# number of samples is the one the BN layers see as N, when the train pass has shown it.
EXAMPLE = "the example input"

#: dict keys whose values are training targets, never network input
_TARGET_KEYS = frozenset(
    {
        "target",
        "targets",
        "label",
        "labels",
        "y",
        "boxes",
        "bbox",
        "bboxes",
        "masks",
        "mask",
        "keypoints",
        "segmentation",
        "gt",
        "gt_boxes",
        "gt_labels",
        "gt_masks",
        "area",
        "iscrowd",
        "image_id",
    }
)


def _tensors_in(value: Any, where: str = "input") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{where}[{k!r}]")


def _arguments(x: Any) -> list[Any]:
    """The arguments ``model`` is called with: a tuple's items, a dict's values, else ``x``."""
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, dict):
        return list(x.values())
    return [x]


def _sample_counts(x: Any) -> list[int]:
    """Candidate sample counts of ``x``, argument by argument: a list's length, a tensor's
    dim 0 (a tuple/dict nested in an argument is looked into)."""
    counts: list[int] = []
    for arg in _arguments(x):
        if isinstance(arg, torch.Tensor):
            if arg.dim() >= 1:
                counts.append(int(arg.shape[0]))
        elif isinstance(arg, list):
            counts.append(len(arg))
            # a list of batched tensors (multi-scale features) has its samples in dim 0
            firsts = {int(t.shape[0]) for t in arg if isinstance(t, torch.Tensor) and t.dim()}
            if len(firsts) == 1 and all(isinstance(t, torch.Tensor) for t in arg):
                counts.append(firsts.pop())
        elif isinstance(arg, (tuple, dict)):
            counts.extend(_sample_counts(arg))
    return counts


def _batch_size(x: Any, seen_by_bn: Iterable[int] = ()) -> int | None:
    """The number of samples in ``x``: of its candidate counts (list lengths, tensor dim 0),
    the first that a BN layer saw as its N in the train pass, else the first one."""
    counts = _sample_counts(x)
    if not counts:
        return None
    seen = set(seen_by_bn)
    for n in counts:
        if n in seen:
            return n
    return counts[0]


def _first_batched(x: Any, where: str = "input") -> tuple[str, Any] | None:
    """The argument that gives the batch its sample count (the first list, or tensor of one
    dimension or more, in argument order) and where it is."""
    if isinstance(x, tuple):
        items: list[tuple[str, Any]] = [(f"{where}[{i}]", v) for i, v in enumerate(x)]
    elif isinstance(x, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in x.items()]
    else:
        items = [(where, x)]
    for name, arg in items:
        if isinstance(arg, list) or (isinstance(arg, torch.Tensor) and arg.dim() >= 1):
            return name, arg
        if isinstance(arg, (tuple, dict)):
            found = _first_batched(arg, name)
            if found is not None:
                return found
    return None


def _describe_empty(x: Any) -> str | None:
    """How ``x`` holds 0 samples (its batch-giving argument is an empty list or a tensor whose
    dim 0 has size 0); ``None`` when it holds some."""
    found = _first_batched(x)
    if found is None:
        return None
    name, arg = found
    if isinstance(arg, list):
        return f"{name} is an empty list" if not arg else None
    return f"{name} has shape {tuple(arg.shape)}" if arg.shape[0] == 0 else None


def validate_input(x: Any, what: str = EXAMPLE) -> None:
    """Raise :class:`InputError` for an input bncheck cannot use (type, no tensor, 0 samples,
    NaN/Inf); ``what`` names the argument in the message (``"the example input"``,
    ``"batch 3 of data="``)."""
    if not isinstance(x, (torch.Tensor, tuple, list, dict)):
        raise InputError(
            f"{what} is a {type(x).__name__}; pass a tensor, a list (one argument), a tuple "
            "of positional inputs or a dict of keyword inputs"
        )
    empty = _describe_empty(x)
    if empty is not None:
        raise InputError(f"{what} has 0 samples ({empty}); pass a batch of at least one sample")
    tensors = list(_tensors_in(x))
    if not tensors:
        raise InputError(f"{what} holds no tensor; pass the batch the model takes")
    for where, t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        # a finite sum means every value is finite (NaN and Inf propagate); only a sum that
        # is not (which a large finite batch can also overflow to) needs the full check
        with torch.no_grad():
            finite_sum = bool(torch.isfinite(t.detach().sum()))
        if not finite_sum and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"{what} has NaN/Inf values ({where}, shape {tuple(t.shape)}); pass a finite batch"
            )


def _call(model: nn.Module, x: Any) -> Any:
    """Call ``model`` the way the user would: a tuple is positional arguments, a dict keyword
    arguments, anything else (a tensor, a list of images) one argument."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


def _changed_value(value: Any, seed: int) -> Any:
    """A changed copy of one sample: tensors changed by :func:`_changed_sample`, dicts (target
    dicts: boxes, labels) kept as they are, sequences element by element."""
    if isinstance(value, torch.Tensor):
        return _changed_sample(value, seed)
    if isinstance(value, (list, tuple)):
        return type(value)(_changed_value(v, seed + i) for i, v in enumerate(value))
    return value


def _pick_samples(x: Any, n: int, picks: list[int | tuple[int, int]]) -> Any:
    """``x`` with its samples replaced by ``picks`` (an int picks that sample, ``(i, seed)`` a
    changed copy of sample i): rows of every tensor whose dim 0 is ``n``, elements of every
    list of length ``n``; other values are kept."""
    if isinstance(x, torch.Tensor):
        return _rows(x, picks) if x.dim() >= 1 and x.shape[0] == n else x
    if isinstance(x, list) and len(x) == n:
        return [x[p] if isinstance(p, int) else _changed_value(x[p[0]], p[1]) for p in picks]
    if isinstance(x, (list, tuple)):
        return type(x)(_pick_samples(v, n, picks) for v in x)
    if isinstance(x, dict):
        return {k: _pick_samples(v, n, picks) for k, v in x.items()}
    return x


def _changed_sample(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A sample that differs from ``t`` but keeps its dtype and shape: ``t`` plus noise of
    its own spread (floating point; from a local generator), or rolled (integer)."""
    if t.is_floating_point():
        g = torch.Generator(device=t.device).manual_seed(seed)
        spread = float(t.double().std()) if t.numel() > 1 else 0.0
        noise = torch.randn(t.shape, generator=g, device=t.device, dtype=t.dtype)
        return t + noise * (spread if spread > 0 else 1.0)
    return t.roll(seed, -1) if t.dim() >= 1 else t


def _rows(t: torch.Tensor, picks: list[int | tuple[int, int]]) -> torch.Tensor:
    """Stack rows of ``t``: an int picks that row, ``(i, seed)`` a changed copy of row i."""
    return torch.stack(
        [t[p] if isinstance(p, int) else _changed_sample(t[p[0]], p[1]) for p in picks]
    )


def _sample_outputs(result: Any, batch: int | None, keep: int) -> list[torch.Tensor]:
    """The model outputs of the first ``keep`` samples, one row per sample: tensors whose
    dim 0 is the batch (their first ``keep`` rows), or, for a list with one entry per sample
    (a detector's per-image dicts), the tensors of sample 0 as one row each (the other
    samples' entries are left out: their companions differ between passes)."""
    if isinstance(result, list) and batch is not None and len(result) == batch and batch > 1:
        return [t.detach().clone().unsqueeze(0) for t in _output_tensors(result[0])]
    return [
        t[:keep].detach().clone()
        for t in _output_tensors(result)
        if t.dim() >= 1 and t.shape[0] == batch
    ]


def _image_key(key: Any) -> bool:
    return isinstance(key, str) and key.lower() not in _TARGET_KEYS


def _network_inputs(value: Any, where: str = "input") -> Iterator[tuple[str, Any]]:
    """The parts of the example input that are network input, not training targets: tensors
    and lists of tensors (images), leaving out values under target-like dict keys
    (``targets``, ``labels``, ``boxes``, ``masks``...) and dicts inside a list (a detector's
    per-image target dicts)."""
    images = isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value)
    if isinstance(value, torch.Tensor) or (images and value):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if isinstance(value, list) and isinstance(v, dict):
                continue  # per-sample dicts in a list: targets
            yield from _network_inputs(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if _image_key(k):
                yield from _network_inputs(v, f"{where}[{k!r}]")


def summarize_inputs(x: Any) -> list[InputSummary]:
    """Summaries of the floating-point network inputs of ``x`` (targets left out). A list of
    tensors (a detector's images) is summarised as one input, its elements pooled."""
    out = []
    for where, value in _network_inputs(x):
        parts: tuple[str, ...] = ()
        if isinstance(value, list):
            items = [t for t in value if t.is_floating_point() and t.numel()]
            if not items:
                continue
            dtype = items[0].dtype
            parts = tuple(f"{where}[{i}]" for i in range(len(value)))
            shape = (
                (len(value), *items[0].shape)
                if all(t.shape == items[0].shape for t in items)
                else (len(value),)
            )
            with torch.no_grad():
                d = torch.cat([_float(t.detach()).reshape(-1) for t in items])
        else:
            if not value.is_floating_point() or value.numel() == 0:
                continue
            shape = tuple(value.shape)
            dtype = value.dtype
            with torch.no_grad():
                d = _float(value.detach())
        out.append(_summary(where, shape, d, parts, dtype=str(dtype)))
    return out


def _summary(
    where: str, shape: tuple[int, ...], d: torch.Tensor, parts: tuple[str, ...] = (), **extra: Any
) -> InputSummary:
    with torch.no_grad():
        # two passes (the library's std_mean takes a slow scalar path on CPU)
        mean = d.mean()
        std = (d - mean).square_().mean().sqrt()
        low, high = (float(v) for v in torch.aminmax(d))
        # integer-valued needs integral extremes first (the full check reads every value)
        integral = (
            math.isfinite(low)
            and math.isfinite(high)
            and low.is_integer()
            and high.is_integer()
            and torch.equal(d, d.round())
        )
        return InputSummary(
            where, shape, float(mean), float(std), low, high, integral, parts, **extra
        )


#: Weight layers whose input is judged as what the network receives.
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
#: Ops and modules (lower-cased) that look values up by index: an integer input that reaches
#: a layer through one is an index (token ids), not a measurement.
_LOOKUPS = frozenset({"embedding", "embeddingbag", "embedding_bag", "one_hot"})
#: Shape-only ops and dtype casts: a tensor reached through these alone is the raw input.
_CASTS = frozenset({"type", "half", "double", "bfloat16", "to", "float"})


@dataclass
class InputOrigin:
    """The network input a tensor derives from (see :func:`input_origin`)."""

    #: the tracer's name of the input (``input``, ``input[0][1]``, ``input['x']``)
    name: str
    #: ops other than shape-only ones and casts lie between the input and the tensor
    preprocessed: bool
    #: an index lookup (embedding, one_hot) lies between them
    lookup: bool


def input_origin(record: OpRecord | None) -> InputOrigin | None:
    """Walk back from the record of a tensor's producer (each op's first tensor argument)
    through the model's own ops to the network input it derives from. ``None`` when a layer
    (conv/linear or BN) comes first, or where the chain is lost (an op whose first tensor
    argument is a parameter or a tensor the model made)."""
    return _trace_back(record)[1]


def _trace_back(record: OpRecord | None) -> tuple[str, InputOrigin | None]:
    """:func:`input_origin`, with why there is none: ``("input", origin)``, ``("layer",
    None)`` when a conv/linear or BN layer comes first, ``("lost", None)`` otherwise (the
    partial walk's ``preprocessed`` and ``lookup`` in an origin named ``""``)."""
    preprocessed = lookup = False
    for _ in range(256):
        if record is None:
            break
        if record.category in ("linear", "bn"):
            return "layer", None
        if record.category == "input":
            return "input", InputOrigin(record.name, preprocessed, lookup)
        name = record.name.lower()
        if record.category != "transparent" and name not in _CASTS:
            preprocessed = True
        if name in _LOOKUPS:
            lookup = True
        record = record.source
    return "lost", InputOrigin("", preprocessed, lookup)


@contextmanager
def _input_entries(
    ctx: AuditContext, tracer: Tracer, x: Any, obs: ForwardObservations
) -> Iterator[None]:
    """During the train pass, summarise once per network input the tensor that the first
    weight layer (conv/linear module) fed by it receives, after the model's own
    preprocessing (a cast, ``/ 255``, ``(x - mean) / std``, a normalisation module);
    afterwards these summaries replace the raw inputs' ones in ``obs.inputs`` (integer inputs,
    not summarised raw, are added). Inputs that reach no weight layer module keep the raw
    summary."""
    if not ctx.user_batch:
        yield
        return
    names: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for where, value in _network_inputs(x):
        if isinstance(value, list):
            parts = tuple(f"{where}[{i}]" for i in range(len(value)))
            dtype = str(value[0].dtype)
            for part in parts:
                names[part] = (where, parts, dtype)
        else:
            names[where] = (where, (), str(value.dtype))
    wanted = {entry[0] for entry in names.values()}
    found: dict[str, InputSummary] = {}
    # the raw inputs' own summaries, reused when a layer receives such a tensor unchanged
    summaries = {summary.where: summary for summary in obs.inputs if not summary.parts}
    raw = {
        where: (value, value._version, summaries[where])
        for where, value in _network_inputs(x)
        if isinstance(value, torch.Tensor) and where in summaries
    }
    calls = [0]

    def hook_for(qualname: str, module: nn.Module) -> Callable[..., None]:
        label = f"{qualname or '(model)'} ({type(module).__name__})"

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls[0] += 1
            if len(found) == len(wanted):
                return
            t = _first_tensor(args)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not t.numel():
                return
            with tracer.paused():
                kind, origin = _trace_back(tracer.producer(t))
                sole = next(iter(names.values())) if len(wanted) == 1 else None
                if kind == "lost" and origin is not None and sole is not None:
                    # the chain is lost (the input indexed, ``image[None]``, as a detector's
                    # resize does): the model's first layer call, before any BN call,
                    # receives its only network input
                    # (integer inputs other than uint8 pixels may be indices: not judged)
                    pixels = sole[2].startswith(("torch.float", "torch.bfloat", "torch.uint8"))
                    if calls[0] > 1 or obs.calls or origin.lookup or not pixels:
                        return
                    origin = InputOrigin(next(iter(names)), True, False)
                if origin is None or origin.lookup or origin.name not in names:
                    return
                where, parts, dtype = names[origin.name]
                if where in found:
                    return
                known = raw.get(where)
                if known is not None and known[0] is t and t._version == known[1]:
                    # the layer receives the raw input itself, unchanged: same summary
                    found[where] = dataclasses.replace(
                        known[2], layer=label, preprocessed=origin.preprocessed
                    )
                    return
                found[where] = _summary(
                    where,
                    tuple(t.shape),
                    _float(t.detach()),
                    parts,
                    layer=label,
                    preprocessed=origin.preprocessed,
                    dtype=dtype,
                )

        return hook

    with ExitStack() as stack:
        for qualname, module in ctx.model.named_modules():
            if isinstance(module, _WEIGHT_LAYERS):
                handle = module.register_forward_pre_hook(hook_for(qualname, module))
                stack.callback(handle.remove)
        try:
            yield
        finally:
            if found:
                merged = [found.pop(s.where, s) for s in obs.inputs]
                order = list(dict.fromkeys(entry[0] for entry in names.values()))
                merged += sorted(found.values(), key=lambda s: order.index(s.where))
                obs.inputs = merged


# ---- statistics ------------------------------------------------------------------------------
def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


#: elements per block of the statistics sweep (512 KiB of float32: stays in a core's cache);
#: tensors of up to 4 blocks are summed whole
_STATS_BLOCK = 1 << 17


def channel_stats(t: torch.Tensor, plain: bool | None = None) -> ChannelStats | None:
    """:class:`ChannelStats` of an (N, C, ...) tensor; ``None`` for fewer than 2 dims.

    Sums in the tensor's precision (float32 for half types) with PyTorch's summation (error
    about u * log2(n) relative to the values summed; less where noted), around a per-channel
    shift ``k``: per row of (sample, channel), ``s1 = sum(x - k)`` and
    ``s2 = sum((x - k)^2)``; then, in float64, ``mean = k + S1 / n`` and
    ``var = (S2 - S1 * (mean - k)) / n`` (biased). With ``d = mean - k`` the variance's
    relative round-off is that of a two-pass variance times ``1 + d^2 / var``.

    * (N, C) tensors (one value per row): in float64 directly.
    * Contiguous CPU tensors of more than two blocks, in rows of 64 values or more: first
      the plain row sums ``sum(x)`` and ``sum(x^2)`` (``k`` = 0; one read, no copy). They
      are kept when every channel has a finite ``var`` and
      ``mean^2 <= PLAIN_CONDITION * var`` (32): the factor ``1 + d^2 / var`` is then at most
      33, while the rules' budgets grow as ``g * (1 + |mean| / sd)`` with
      ``g = 1 + log2(n)``: measured, the error stays under a tenth of the budget there, on
      random and on repeating values. Otherwise (NaN/Inf, squares past the dtype's range,
      or an offset mean) ``k`` is the exact channel mean, which those row sums give, and one
      sweep of the shifted sums follows: the two-pass variance.
    * Other tensors of up to four blocks: each (sample, channel) row's mean and
      biased variance from PyTorch's fused BN statistics kernel (``batch_norm_update_stats``
      on the rows), combined per channel in float64 around the channel means (``k`` = the
      mean, so ``d`` is 0); larger ones: the exact channel means, then the shifted sweep.
    * The sweeps (:func:`_row_moments`), for a contiguous tensor, go block by block of rows
      through one small buffer that stays in cache (the deviations of a whole activation are
      never held at once); other layouts are swept whole. Both sums use PyTorch's cascade
      summation, the squares too: a 2-norm, which adds them one after another per vector
      lane, drifts by thousands of u on long rows of repeating values (integer pixels).

    ``plain`` chooses the path: the plain sums first (``True``) or not (``False``); by
    default, on contiguous CPU tensors of more than two blocks in rows of 64 values or more
    (on other devices the test would wait for the device).
    """
    raw = read_stats(t, plain)
    return None if raw is None else raw.finish()


@dataclass
class RawStats:
    """What :func:`read_stats` read from a tensor, before the float64 arithmetic that turns
    it into :class:`ChannelStats` (:meth:`finish`). The audit's train pass reads during the
    forward and finishes after it: the arithmetic is many small operations, which run
    several times faster together than between the model's own layers."""

    batch: int
    channels: int
    count: int
    length: int
    #: per (sample, channel) row: mean and biased variance (``rows``), or the sum and the
    #: sum of squares around ``shift`` (``sums``), or the (N, C) values themselves
    #: (``values``); or per channel, the float64 mean and biased variance that PyTorch's BN
    #: kernel normalised with (``kernel``, see :func:`_kernel_stats`)
    kind: str
    first: torch.Tensor
    second: torch.Tensor | None = None
    shift: np.ndarray | None = None
    #: the eps of a ``kernel`` reading (whose ``second`` is 1 / sqrt(var + eps))
    eps: float = 0.0

    def finish(self) -> ChannelStats:
        if self.kind == "kernel":
            assert self.second is not None
            mean, var = _kernel_moments(_as_numpy(self.first), _as_numpy(self.second), self.eps)
            return ChannelStats(torch.from_numpy(mean), torch.from_numpy(var), self.count)
        batch, c, length = self.batch, self.channels, self.length
        with np.errstate(all="ignore"):
            if self.kind == "values":  # one value per row: its mean, variance 0
                s1, s2, k = _around_means(_as_numpy(self.first).reshape(batch, c), 0.0, 1.0)
            elif self.kind == "rows":
                assert self.second is not None
                s1, s2, k = _around_means(
                    _as_numpy(self.first).reshape(batch, c),
                    _as_numpy(self.second).reshape(batch, c),
                    length,
                )
            else:
                assert self.second is not None and self.shift is not None
                k = self.shift
                s1 = _as_numpy(self.first).reshape(batch, c)
                s2 = _as_numpy(self.second).reshape(batch, c)
            d, mean, var = _moments(s1, s2, k, self.count)
        return ChannelStats(
            torch.from_numpy(mean), torch.from_numpy(var), self.count, rows=(s1, s2, k, d, length)
        )


def _around_means(
    row_mean: np.ndarray, row_var: Any, length: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shifted sums ``(s1, s2)`` of (N, C) rows of ``length`` values, from each row's
    mean and biased variance, around the channel means (the shift ``k``, returned too)."""
    k = _finite_or_zero(row_mean.mean(0))
    dm = row_mean - k
    return dm * length, (row_var + dm * dm) * length, k


def _kernel_moments(mean: Any, invstd: Any, eps: Any) -> tuple[np.ndarray, np.ndarray]:
    """The float64 mean and biased variance of a ``kernel`` reading (``eps`` a number, or
    one per channel)."""
    return mean, np.maximum(1.0 / (invstd * invstd) - eps, 0.0)


def _finite_or_zero(k: np.ndarray) -> np.ndarray:
    """A shift with NaN/Inf replaced by 0: the sums then carry an infinite mean as it is
    (a shift of Inf would turn every deviation into NaN)."""
    k[~np.isfinite(k)] = 0.0
    return k


def read_stats(t: torch.Tensor, plain: bool | None = None) -> RawStats | None:
    """The reading part of :func:`channel_stats` (see there, also for ``plain``): every pass
    over the tensor's values, none of the arithmetic on the per-row results. ``None`` for
    fewer than 2 dims or no values."""
    if t.dim() < 2 or not (t.is_floating_point()):
        return None
    x = _float(t.detach())
    batch, c = x.shape[0], x.shape[1]
    n = x.numel() // max(1, c)
    if n == 0:
        return None
    length = max(1, n // max(1, batch))  # values per (sample, channel) row
    if length == 1:  # (N, C): each row is one value
        return RawStats(batch, c, n, length, "values", x.reshape(batch, c).clone())
    raw = _read(x, batch, c, n, length, plain)
    if (
        x.device.type == "cpu"
        and x.dtype != torch.float64
        and not (_all_finite(raw.first) and _all_finite(raw.second))
        and bool(torch.isfinite(x).all())
    ):
        # finite values whose sums or squares pass float32's range (about 1e19 and up):
        # the same reading in float64 (NaN/Inf values are carried as they are)
        raw = _read(x.double(), batch, c, n, length, plain)
    return raw


def _all_finite(t: torch.Tensor | None) -> bool:
    """Whether the sum of a small tensor of per-row results is finite, which it is only when
    every term is (a sum that overflows on finite terms says False too: the caller then
    tests the data itself)."""
    return t is None or math.isfinite(float(t.sum()))


def _read(x: torch.Tensor, batch: int, c: int, n: int, length: int, plain: bool | None) -> RawStats:
    """:func:`read_stats` past its checks, in ``x``'s own precision."""
    if (
        plain
        if plain is not None
        else x.device.type == "cpu"
        and x.is_contiguous()
        and x.numel() > _PLAIN_FROM
        and length >= _PLAIN_ROWS_FROM
    ):
        return _plain_or_shifted(x, batch, c, n, length)
    if not x.is_contiguous() and x.numel() <= 4 * _STATS_BLOCK:
        x = x.contiguous()  # a small copy, for the fused path below
    if x.is_contiguous() and x.numel() <= 4 * _STATS_BLOCK:
        # each (sample, channel) row as a channel of one sample: PyTorch's fused BN
        # statistics kernel gives every row's mean and biased variance in one call (two
        # passes; on other devices no transfer to the host until the statistics are finished)
        row_mean, row_var = torch.batch_norm_update_stats(
            x.reshape(1, batch * c, length), None, None, 0.0
        )
        return RawStats(batch, c, n, length, "rows", row_mean, row_var)
    with np.errstate(all="ignore"):
        k = _finite_or_zero(_as_numpy(_row_sums(x)).reshape(batch, c).sum(0) / n)
    return _shifted_sums(x, batch, c, n, length, k)


#: CPU tensors of more elements than this take the plain sums first (below it PyTorch's fused
#: kernel costs no more than they do)
_PLAIN_FROM = 2 * _STATS_BLOCK
#: ... and rows of at least this many values (PyTorch sums short rows slowly)
_PLAIN_ROWS_FROM = 64

#: the plain (unshifted) sums are kept when every channel's mean^2 <= PLAIN_CONDITION * var:
#: their variance then carries at most (1 + PLAIN_CONDITION) times the relative round-off
#: of a two-pass variance (see :func:`channel_stats`)
PLAIN_CONDITION = 32.0


def _row_sums(x: torch.Tensor) -> torch.Tensor:
    """Per (sample, channel): the sum over the other dims, (N * C) or (N, C)."""
    if x.is_contiguous():
        return x.reshape(x.shape[0] * x.shape[1], -1).sum(1)
    return x.sum(list(range(2, x.dim())))


def _plain_or_shifted(x: torch.Tensor, batch: int, c: int, n: int, length: int) -> RawStats:
    """The plain sums ``sum(x)`` and ``sum(x^2)`` per (sample, channel) row, kept when they
    are well conditioned (:data:`PLAIN_CONDITION`); otherwise the sums around the channel
    means, which the plain row sums give exactly."""
    s1, s2 = _row_moments(x, None)
    with np.errstate(all="ignore"):
        total = s1.cpu().numpy().reshape(batch, c).sum(0, dtype=np.float64)
        squares = s2.cpu().numpy().reshape(batch, c).sum(0, dtype=np.float64)
        mean = total / n
        var = squares / n - mean * mean
        # NaN/Inf values, or squares past the dtype's range, go the shifted way (which
        # carries NaN/Inf values as they are)
        if bool(np.all(np.isfinite(var) & (mean * mean <= PLAIN_CONDITION * var))):
            return RawStats(batch, c, n, length, "sums", s1, s2, np.zeros(c))
        k = _finite_or_zero(mean)
    return _shifted_sums(x, batch, c, n, length, k)


def _shifted_sums(
    x: torch.Tensor, batch: int, c: int, n: int, length: int, k: np.ndarray
) -> RawStats:
    """The sums around a per-channel shift ``k`` (float64, finite)."""
    k_x = torch.from_numpy(k).to(device=x.device, dtype=x.dtype)
    s1, s2 = _row_moments(x, k_x)
    return RawStats(batch, c, n, length, "sums", s1, s2, _as_numpy(k_x))


def _moments(
    s1: np.ndarray, s2: np.ndarray, k: np.ndarray, n: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean - k, mean, biased var)`` per channel from (N, C) float64 shifted sums."""
    total1 = s1.sum(0)
    d = total1 / n
    return d, k + d, np.maximum((s2.sum(0) - total1 * d) / n, 0.0)


def _batch_var(v: np.ndarray) -> np.ndarray:
    """The unbiased variance over dim 0 of an (N, C) array (two passes)."""
    dev = v - v.mean(0)
    return (dev * dev).sum(0) / (v.shape[0] - 1)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def _row_moments(x: torch.Tensor, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) of an (N, C, ...) tensor: ``sum(x - shift)`` and
    ``sum((x - shift)^2)`` over the other dims (``shift`` per channel; ``None``: 0), as
    (N * C) or (N, C) tensors, with PyTorch's cascade summation (error about u * log2 of the
    row length, relative to the sum; a 2-norm would add the squares one after another per
    vector lane, which drifts by thousands of u on long rows of repeating values). A
    contiguous tensor goes block by block of rows through one buffer that stays in cache,
    and so does a contiguous copy of a tensor in another layout without a shift; with a
    shift, the deviations are taken whole (a dense tensor in their own layout)."""
    batch, c = x.shape[0], x.shape[1]
    if not x.is_contiguous() and shift is None:
        # PyTorch sums a view whose dims do not merge (a crop, a ``::2`` slice) row by row,
        # one after another, which is not a cascade: sum a contiguous copy
        x = x.contiguous()
    if not x.is_contiguous():
        dev = x - shift.reshape([1, -1] + [1] * (x.dim() - 2))  # type: ignore[union-attr]
        spatial = list(range(2, x.dim()))
        return dev.sum(spatial), (dev * dev).sum(spatial)
    rows = x.reshape(batch * c, -1)  # one row per (sample, channel), contiguous
    length = rows.shape[1]
    per = max(1, _STATS_BLOCK // max(1, length))
    row_shift = None if shift is None else shift.repeat(batch)[:, None]
    s1 = torch.empty(rows.shape[0], dtype=x.dtype, device=x.device)
    s2 = torch.empty(rows.shape[0], dtype=x.dtype, device=x.device)
    buf = torch.empty(min(per, rows.shape[0]), length, dtype=x.dtype, device=x.device)
    for start in range(0, rows.shape[0], per):
        part = rows[start : start + per]
        block = buf[: part.shape[0]]
        if row_shift is None:
            torch.sum(part, 1, out=s1[start : start + per])
            torch.mul(part, part, out=block)
        else:
            torch.sub(part, row_shift[start : start + per], out=block)
            torch.sum(block, 1, out=s1[start : start + per])
            block.mul_(block)
        torch.sum(block, 1, out=s2[start : start + per])
    return s1, s2


def grid(t: torch.Tensor, k_batch: int = 4, run: int = 16) -> torch.Tensor:
    """The same few elements per channel of an (N, C, ...) tensor as a (C, K) float64 tensor.

    Every ``ceil(N / k_batch)``-th sample from 0 (at most ``k_batch``), and in each, a run of
    up to ``run`` adjacent positions along the last spatial dim, centred, at the middle index
    of the other spatial dims (interior positions: away from the padding at the borders).
    Adjacent positions share cache lines, so the read costs a few lines per sample and
    channel even when the activation is no longer in cache. Read through one strided view,
    in (sample, position) order; the same elements for every tensor of that shape.
    """
    return _grid_matrix(_grid_read(t, k_batch, run))


def _grid_read(t: torch.Tensor, k_batch: int = 4, run: int = 16) -> torch.Tensor:
    """The elements of :func:`grid`, copied in the (N', C, ...) layout they are read in."""
    t = t.detach()
    if t.numel() == 0:
        return torch.zeros(0, t.shape[1] if t.dim() > 1 else 0, dtype=torch.float64)
    index: list[Any] = [slice(None, None, max(1, -(-t.shape[0] // k_batch))), slice(None)]
    if t.dim() > 2:
        index += [size // 2 for size in t.shape[2:-1]]
        last = t.shape[-1]
        start = max(0, (last - run) // 2)
        index.append(slice(start, start + run))
    # one strided read into a copy of its own (never a view: the tensor may be changed in
    # place later in the forward, e.g. by ReLU(inplace=True) on a float64 CPU activation)
    return t[tuple(index)].to(dtype=torch.float64, device="cpu", copy=True)


def _grid_matrix(picked: torch.Tensor) -> torch.Tensor:
    """The (C, K) layout of the elements :func:`grid` read, (N', C, ...) as read."""
    return picked.transpose(0, 1).reshape(picked.shape[1], -1)


def _affine_copy(module: nn.Module, name: str) -> torch.Tensor | None:
    t = _own_affine(module, name)
    if not isinstance(t, torch.Tensor):
        return None
    return _host_float64(t)


def _host_float64(t: torch.Tensor) -> torch.Tensor:
    """A flat float64 CPU copy of ``t``'s values."""
    return t.detach().reshape(-1).to(dtype=torch.float64, device="cpu", copy=True)


def _affine_from_op(rec: TrainCall, bound: dict[str, Any] | None, out: torch.Tensor) -> None:
    """Complete the ``gamma``/``beta`` of a call whose output is its ``F.batch_norm``'s
    (``bound``: the op's arguments by name, ``out`` its result). Where the module holds no
    tensor of that name (a parametrized weight, ``torch.nn.utils.parametrize`` or
    ``weight_norm``, lives elsewhere and is computed on each access), they are what the op was
    given. Where it holds one and the op got none, the layer may apply its own after the op
    (the post hook decides: the module then returns another tensor than the op's); any other
    tensor the op got instead of the module's own is judged against the module's (a swapped
    or forgotten weight is a bug the check reports)."""
    if bound is None:
        return
    after: list[str] = []
    for attr, name in (("gamma", "weight"), ("beta", "bias")):
        t = bound[name]
        if getattr(rec, attr) is None:
            if isinstance(t, torch.Tensor) and t.dim() == 1:
                setattr(rec, attr, _host_float64(t))
        elif t is None:
            after.append(attr)
    if after:
        rec.affine_after, rec.op_output, rec.op_version = tuple(after), out, _version_of(out)


def _version_of(t: torch.Tensor) -> int:
    """``t``'s version counter (-1 for a tensor without one: an inference tensor)."""
    try:
        return int(t._version)
    except Exception:
        return -1


def _own_affine(module: nn.Module, name: str) -> torch.Tensor | None:
    t = module._parameters.get(name)
    return t if t is not None else module._buffers.get(name)


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args if isinstance(args, (tuple, list)) else (args,):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _output_tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _output_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _output_tensors(v)]
    for attr in ("logits", "last_hidden_state"):
        if isinstance(getattr(value, attr, None), torch.Tensor):
            return [getattr(value, attr)]
    return []


@contextmanager
def _hooks(
    layers: Iterable[BNLayer], pre: Callable[[BNLayer], Any], post: Callable[[BNLayer], Any]
) -> Iterator[None]:
    with ExitStack() as stack:
        seen: set[int] = set()
        for layer in layers:
            if id(layer.module) in seen:
                continue
            seen.add(id(layer.module))
            handle = layer.module.register_forward_pre_hook(pre(layer))
            stack.callback(handle.remove)
            handle = layer.module.register_forward_hook(post(layer))
            stack.callback(handle.remove)
        yield


#: forward methods of PyTorch's own BN classes (BatchNorm1d/2d/3d, lazy variants, SyncBatchNorm),
#: where torch defines them (not a replacement patched in before bncheck was imported)
_STOCK_FORWARDS = frozenset(
    f
    for f in (_BatchNorm.forward, nn.SyncBatchNorm.forward)
    if getattr(f, "__module__", None) == "torch.nn.modules.batchnorm"
)


def _stock(module: nn.Module) -> bool:
    """Whether ``module`` runs PyTorch's own BN forward: its class's, and no ``forward``
    set on the instance (test-time adaptation code replaces it that way)."""
    return type(module).forward in _STOCK_FORWARDS and "forward" not in vars(module)


# ---- statistics from PyTorch's BN kernel ----------------------------------------------------
# A train-mode ``F.batch_norm`` on a contiguous float32/float64 CPU tensor runs, after its
# argument checks, ``torch._batch_norm_impl_index``, whose first result ``torch.batch_norm``
# returns and whose next two are the batch mean and 1 / sqrt(var + eps) that PyTorch's kernel
# normalised with. The train pass calls that op itself for such calls (the result and the
# running buffers are bit for bit those of ``F.batch_norm``, tested across shapes, dtypes and
# buffer settings) and takes those statistics instead of reading the input again. For
# contiguous inputs the kernel sums in double precision and takes the variance around the
# mean (two passes): its mean is within float32 rounding of a float64 oracle, and its
# variance within two u more (the rounding of its float32 1 / sqrt(var + eps)), inside the
# rules' budgets (tested, also as a guard against a change of kernel). Channels-last inputs
# go through another kernel, which sums in float32 (E[x^2] - E[x]^2, so a large mean ruins
# the variance, and with it BN's own output): those are read, and so are half types.
_KERNEL_DTYPES = frozenset({torch.float32, torch.float64})
_KERNEL_TYPES = (torch.Tensor, nn.Parameter)

#: kernel statistics are used only when every channel's variance is at least this many eps:
#: the variance recovered from 1 / sqrt(var + eps) then carries at most (1 + 1/64) times the
#: relative rounding of the kernel's result
KERNEL_VAR_FLOOR = 64.0

#: bytes of (storage behind) the first-call BN inputs the train pass keeps alive when
#: ``bn-reused`` is selected: a layer that turns out to be called again has its first call
#: read after the forward, for the per-sample sums that rule compares calls with (the
#: kernel gives per-channel statistics only); past this many bytes, first calls are read
#: during the forward
HOLD_BYTES = 256 << 20
#: ... and of one input: a larger one is read during the forward, as holding it costs about
#: as much in fresh memory pages for the rest of the forward as the reading it saves
#: (measured on the architecture families of ``benchmarks/audit_cost.py``)
HOLD_TENSOR_BYTES = 4 << 20

#: the op ``torch.batch_norm`` returns the first result of: (output, batch mean, invstd,
#: reserve, backend), backend 0 being PyTorch's own kernel
_BATCH_NORM_IMPL = getattr(torch, "_batch_norm_impl_index", None)
#: how many torch-function modes are active besides the one whose handler runs
_MODE_DEPTH = getattr(torch._C, "_len_torch_function_stack", None)

_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS: dict[str, Any] = {
    "weight": None,
    "bias": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
}


def _batch_norm_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``F.batch_norm``'s arguments by name; ``None`` for a call it would not accept."""
    if len(args) > len(_BN_ARGS):
        return None
    bound = dict(zip(_BN_ARGS, args))
    for key, value in kwargs.items():
        if key not in _BN_ARGS or key in bound:
            return None
        bound[key] = value
    for key, value in _BN_DEFAULTS.items():
        bound.setdefault(key, value)
    return bound if len(bound) == len(_BN_ARGS) else None


def _has_storage(t: torch.Tensor) -> bool:
    """Whether a tensor has memory of its own (a ``torch.func`` transform's wrapper, whose
    Python type is ``torch.Tensor`` too, has none)."""
    try:
        t.data_ptr()
    except Exception:
        return False
    return True


def _kernel_call(bound: dict[str, Any]) -> bool:
    """Whether a train-mode ``F.batch_norm`` call runs PyTorch's contiguous CPU kernel
    with float32/float64 statistics (plain tensors only: a tensor subclass may dispatch
    elsewhere), with more than one value per channel, and no torch-function mode other than
    the tracer's is active (called from inside the tracer's handler)."""
    x = bound["input"]
    if (
        type(x) is not torch.Tensor
        or not _has_storage(x)
        or bound["training"] is not True
        or x.device.type != "cpu"
        or x.layout != torch.strided
        or x.dtype not in _KERNEL_DTYPES
        or x.dim() < 3
        or not x.is_contiguous()
        or x.shape[1] == 0
        or x.numel() // x.shape[1] < 2
        # one value per sample and channel ((N, C, 1, 1)): PyTorch takes its channels-last
        # kernel, which sums in float32
        or x.stride(1) == 1
        # another torch-function mode (the user's) must see the op as F.batch_norm
        or _MODE_DEPTH is None
        or _MODE_DEPTH() > 0
    ):
        return False
    for name in ("running_mean", "running_var", "weight", "bias"):
        t = bound[name]
        if t is not None and (
            type(t) not in _KERNEL_TYPES or t.dtype != x.dtype or t.device != x.device
        ):
            return False
    momentum, eps = bound["momentum"], bound["eps"]
    return (
        isinstance(momentum, (int, float))
        and isinstance(eps, (int, float))
        and not isinstance(momentum, bool)
        and not isinstance(eps, bool)
        and eps > 0  # F.batch_norm refuses the rest in training (NaN: left to it)
    )


def _kernel_stats(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float
) -> RawStats | None:
    """The statistics the BN kernel normalised ``x`` with, as a reading of kind ``kernel``
    (:meth:`RawStats.finish` turns them into the float64 mean and ``var = 1 / invstd^2 -
    eps``). ``None`` where they cannot stand in for a reading of ``x``: NaN/Inf, or a
    channel whose variance is under :data:`KERNEL_VAR_FLOOR` times eps (a dead channel: the
    rounding of invstd would dominate)."""
    if (
        mean.dtype not in _KERNEL_DTYPES
        or invstd.dtype not in _KERNEL_DTYPES
        or not (_has_storage(mean) and _has_storage(invstd))
    ):
        return None
    inv = invstd.numpy()
    # var >= KERNEL_VAR_FLOOR * eps  <=>  invstd <= 1 / sqrt((KERNEL_VAR_FLOOR + 1) * eps);
    # NaN fails every comparison
    with np.errstate(all="ignore"):
        top = math.inf if eps == 0 else 1.0 / math.sqrt((KERNEL_VAR_FLOOR + 1.0) * eps)
        if not (inv.min() > 0 and inv.max() <= top and math.isfinite(mean.numpy().sum())):
            return None
    batch, c = x.shape[0], x.shape[1]
    n = x.numel() // c
    length = max(1, n // max(1, batch))
    return RawStats(batch, c, n, length, "kernel", mean, invstd, eps=eps)


def _transformed(t: Any) -> bool:
    """Whether ``t`` is batched by a torch.func ``vmap`` at some level of its wrappers: its
    values cannot be read (``.item()``) nor kept after the transform. (A ``grad``
    transform's tensor alone can be read: the kernel statistics leave it to F.batch_norm.)"""
    if not isinstance(t, torch.Tensor):
        return False
    try:
        functorch = torch._C._functorch
        for _ in range(64):  # levels of nested transforms
            if functorch.is_batchedtensor(t):
                return True
            if not functorch.is_functorch_wrapped_tensor(t):
                return False
            t = functorch.get_unwrapped(t)
    except Exception:  # pragma: no cover - a torch without functorch's checks
        return False
    return False


def _readable(t: Any) -> TypeGuard[torch.Tensor]:
    """A tensor with a batch dimension the eval passes can keep rows of (of a call that
    :func:`_unreadable_call` let through)."""
    return isinstance(t, torch.Tensor) and t.dim() >= 1


def _unreadable_call(x: Any, module: nn.Module) -> bool:
    """Whether a BN call cannot be read: its input, or the gamma/beta/statistics it runs
    with (a functional_call's, at call time), are batched by torch.func.vmap or hold no
    values (the meta device)."""
    tensors = [x, module._parameters.get("weight"), module._parameters.get("bias")]
    buffers = module._buffers
    if isinstance(buffers, dict):
        tensors += [buffers.get("running_mean"), buffers.get("running_var")]
    return any(isinstance(t, torch.Tensor) and (t.is_meta or _transformed(t)) for t in tensors)


def _fingerprint(t: torch.Tensor) -> tuple[Any, ...] | None:
    """What must be unchanged for a held tensor to hold what its call saw: its version
    counter, place, size and layout, and its storage's place and size; ``None`` for a tensor
    without a version counter (an inference tensor)."""
    try:
        storage = t.untyped_storage()
        return (
            int(t._version),
            t.data_ptr(),
            tuple(t.shape),
            t.stride(),
            storage.data_ptr(),
            storage.nbytes(),
        )
    except Exception:
        return None


#: why a held first-call input was not read (``TrainCall.sums_unread``)
_CHANGED = (
    "its first call's input was changed after the call (in place, or its memory freed; BN's "
    "backward needs that input as the call saw it)"
)
#: why a first call was neither read nor held: the eval passes called the layer once
_UNPREDICTED = (
    "the eval-mode forward called it once (a batch split into chunks, or a view added in "
    "training only), so its first train-mode call was not read"
)


def _read_held(
    held: list[tuple[TrainCall, torch.Tensor, tuple[Any, ...]]], counts: dict[str, int]
) -> None:
    """After the forward: the first calls of layers called more than once, whose statistics
    came from the kernel, are read from their inputs, held since, so that they have the
    per-sample sums ``bn-reused`` compares calls with, as every other call has. The reading
    is taken only when the input is unchanged (:func:`_fingerprint`) and its channel means
    and variances agree with the kernel's within the rules' budgets (a write through
    ``.data`` moves no version counter); otherwise the call keeps the kernel's statistics
    and says why it has no per-sample sums (``sums_unread``). ``counts``: calls per layer."""
    for rec, x, fingerprint in held:
        if counts.get(rec.layer, 0) < 2 or rec.raw_in is None:
            continue
        raw = None
        if _fingerprint(x) == fingerprint:
            try:
                raw = read_stats(x)
            except Exception:
                raw = None
        if raw is not None and _same_statistics(raw, rec.raw_in, x.dtype):
            rec.raw_in = raw
        else:
            rec.sums_unread = _CHANGED


def _same_statistics(read: RawStats, kernel: RawStats, dtype: torch.dtype) -> bool:
    """Whether a reading of a tensor and the kernel's statistics of it agree, per channel,
    within eight times the rules' round-off budgets: u (1 + log2 n) (sd + |mean|) for the
    mean and u (1 + log2 n) var (1 + |mean| / sd) for the variance, plus the rounding of the
    kernel's float32 results (u |mean|, 2 u var)."""
    finished = finish_all([read, kernel])
    a, b = finished[id(read)], finished[id(kernel)]
    if a.mean.shape != b.mean.shape:
        return False
    u = float(torch.finfo(dtype).eps)
    g = 1 + math.log2(max(2, a.count))
    with np.errstate(all="ignore"):
        mean, var = b.mean.numpy(), b.var.numpy()
        sd = np.sqrt(var)
        tol_m = u * np.abs(mean) + 8 * u * g * (sd + np.abs(mean))
        tol_v = 2 * u * var + 8 * u * g * var * (1 + np.abs(mean) / sd)
        return bool(
            np.all(np.abs(a.mean.numpy() - mean) <= tol_m)
            and np.all(np.abs(a.var.numpy() - var) <= tol_v)
        )


# ---- the train pass --------------------------------------------------------------------------
def _train_pass(
    ctx: AuditContext, x: Any, obs: ForwardObservations, predicted: _Predicted | None = None
) -> None:
    """The train-mode pass (see the module's docstring). ``predicted``: the BN calls the eval
    passes saw, when they ran first: a layer they saw called more than once has its first
    call read during the forward, one they saw called once is not held for ``bn-reused``."""
    model = ctx.model
    bn_modules = {layer.module: layer.name for layer in ctx.layers}
    tracer = Tracer(model, bn_modules)
    active: list[tuple[TrainCall, nn.Module, torch.Tensor | None]] = []

    def on_op(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if name != "batch_norm" or not active or not isinstance(out, torch.Tensor):
            return
        rec = active[-1][0]
        if rec.norm_source is not None or rec.forced_eval or rec.unread or not rec.training:
            return
        inp = args[0] if args else kwargs.get("input")
        if not isinstance(inp, torch.Tensor):
            return
        _measure(rec, inp, out)
        _affine_from_op(rec, _batch_norm_arguments(args, kwargs), out)
        rec.norm_source = "batch_norm"

    tracer.listeners.append(on_op)
    tracer.listen_to = frozenset({"batch_norm"})

    # bn-reused compares a layer's calls by their per-sample sums, which only a reading
    # gives: with it selected, later calls of a layer are read, and first calls' inputs are
    # held (up to HOLD_BYTES) to be read after the forward if the layer is called again;
    # with the eval passes' calls known, the first calls of the layers they saw called
    # again are read, and those of the layers they saw once are neither read nor held
    rows = "bn-reused" in ctx.rule_ids
    reused = predicted.reused if predicted is not None else frozenset()
    seen = predicted.seen if predicted is not None else frozenset()
    held: list[tuple[TrainCall, torch.Tensor, tuple[Any, ...]]] = []
    unheld: list[TrainCall] = []
    held_bytes = [0]

    def batch_norm_read(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # F.batch_norm of the call being measured, through the op it runs, when the
        # statistics that op returns can stand in for a reading (see _kernel_call)
        rec = active[-1][0] if active else None
        bound = _batch_norm_arguments(args, kwargs) if rec is not None else None
        if (
            rec is None
            or bound is None
            or rec.norm_source is not None
            or rec.forced_eval
            or rec.unread
            or not rec.training
            or _BATCH_NORM_IMPL is None
            or (rows and (rec.occurrence > 0 or rec.layer in reused))
            or not _kernel_call(bound)
        ):
            return func(*args, **kwargs)
        x = bound["input"]
        hold = rows and rec.layer not in seen
        fingerprint = _fingerprint(x) if hold else None
        if hold and (
            fingerprint is None
            or fingerprint[5] > HOLD_TENSOR_BYTES
            or held_bytes[0] + fingerprint[5] > HOLD_BYTES
        ):
            return func(*args, **kwargs)
        # what torch.batch_norm runs (its result is this call's first output), past the
        # checks F.batch_norm makes first (which _kernel_call's conditions pass)
        out, mean, invstd, _, backend = _BATCH_NORM_IMPL(
            x,
            bound["weight"],
            bound["bias"],
            bound["running_mean"],
            bound["running_var"],
            True,
            bound["momentum"],
            bound["eps"],
            torch.backends.cudnn.enabled,
        )
        with tracer.paused():
            kernel = _kernel_stats(x, mean, invstd, float(bound["eps"])) if backend == 0 else None
            _measure(rec, x, out, kernel)
            _affine_from_op(rec, bound, out)
            if kernel is not None and fingerprint is not None:
                held.append((rec, x, fingerprint))
                held_bytes[0] += fingerprint[5]
            elif kernel is not None and rows:
                unheld.append(rec)
        rec.norm_source = "batch_norm"
        return out

    tracer.overrides[F.batch_norm] = batch_norm_read

    def pre(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            with tracer.paused():
                x_in = _first_tensor(args)
                trace = tracer.bn_enter(layer.name, module, x_in)
                shape = tuple(x_in.shape) if isinstance(x_in, torch.Tensor) else ()
                n = shape[0] if shape else 0
                count = (
                    x_in.numel() // shape[1]
                    if isinstance(x_in, torch.Tensor) and len(shape) >= 2 and shape[1]
                    else n
                )
                momentum = getattr(module, "momentum", None)
                eps = getattr(module, "eps", None)
                rec = TrainCall(
                    layer=layer.name,
                    index=trace.index,
                    occurrence=trace.occurrence,
                    training=bool(module.training),
                    standard=layer.standard,
                    shape=shape,
                    batch_size=n,
                    samples_per_channel=count,
                    eps=setting_number(eps),
                    momentum=setting_number(momentum),
                    has_momentum=hasattr(module, "momentum"),
                    track_running_stats=bool(
                        getattr(module, "track_running_stats", layer.has_running_stats)
                    ),
                    dtype=x_in.dtype if isinstance(x_in, torch.Tensor) else torch.float32,
                    trace=trace,
                    stock=_stock(module),
                )
                if _unreadable_call(x_in, module):
                    rec.unread = True
                    obs.unread.add(layer.name)
                    active.append((rec, module, x_in))
                    return
                obs.calls.append(rec)
                if rec.training and count == 1 and layer.uses_batch_stats:
                    rec.single_value = True
                    if layer.has_running_stats:
                        rec.forced_eval = True
                        module.training = False
                    else:
                        raise _SingleValueStop(layer.name)
                if rec.training and not rec.forced_eval:
                    rec.gamma = _affine_copy(module, "weight")
                    rec.beta = _affine_copy(module, "bias")
                    if layer.has_running_stats:
                        rec.before = BufferState.capture(module)
                active.append((rec, module, x_in))

        return hook

    def post(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            with tracer.paused():
                if not active:
                    return
                rec, _, x_in = active.pop()
                tracer.bn_exit(rec.trace, module, output) if rec.trace else None
                if rec.unread:
                    return
                if rec.forced_eval:
                    module.training = True
                    return
                if not rec.training:
                    return
                out = _first_tensor(output)
                if rec.affine_after:
                    # the op got no gamma/beta of the module's own: applied after it when the
                    # module returns another tensor than the op's, or the op's changed in place
                    # (then the op's output was the normalised tensor before any affine step)
                    if (
                        out is None
                        or out is not rec.op_output
                        or _version_of(out) != rec.op_version
                    ):
                        for attr in rec.affine_after:
                            setattr(rec, attr, None)
                    rec.op_output = None
                if (
                    rec.norm_source is None
                    and isinstance(x_in, torch.Tensor)
                    and isinstance(out, torch.Tensor)
                    and out.shape == x_in.shape
                ):
                    _measure(rec, x_in, out)
                    rec.norm_source = "module"
                if rec.before is not None:
                    rec.after = BufferState.capture(module)

        return hook

    with _hooks(ctx.layers, pre, post), tracer, _input_entries(ctx, tracer, x, obs):
        tracer.mark_inputs(x)
        try:
            _call(model, x)
        except _SingleValueStop as stop:
            obs.stopped_at = stop.layer
            for rec, module, _ in active:
                if rec.forced_eval:
                    module.training = True
        finally:
            active.clear()
            counts: dict[str, int] = {}
            for rec in obs.calls:
                counts[rec.layer] = counts.get(rec.layer, 0) + 1
            with tracer.paused():  # bncheck's own arithmetic: not part of the model's trace
                _read_held(held, counts)
                held.clear()
                for rec in unheld:
                    if counts.get(rec.layer, 0) > 1:
                        rec.sums_unread = _UNPREDICTED
                _finish_measures(obs.calls)
    obs.call_counts = counts
    obs.train_ran = True


def _measure(
    rec: TrainCall, inp: torch.Tensor, out: torch.Tensor, kernel: RawStats | None = None
) -> None:
    """Read, during the forward, what the call's statistics need (the arithmetic is left
    to :func:`_finish_measures`, after the forward). ``kernel``: the input's statistics as
    the BN kernel computed them (:func:`_kernel_stats`), instead of a reading."""
    if inp.dim() < 2 or out.shape != inp.shape or not out.is_floating_point():
        return
    if kernel is None or not rec.stock:
        # the element grid checks an output against the statistics read of its input; where
        # PyTorch's own forward ran the kernel that returned those statistics, its output
        # follows from them by construction (the same op, with the module's weight, bias and
        # eps), and the check could not fail
        rec.grid_in = _grid_read(inp)
        rec.grid_out = _grid_read(out)
    rec.raw_in = kernel if kernel is not None else read_stats(inp)
    # PyTorch's own forward: its output's per-channel moments follow from the element grid
    # checked against the input's statistics; custom layers get their output measured too
    rec.raw_out = None if rec.stock else read_stats(out)
    rec.dtype = _narrower(inp.dtype, out.dtype)
    rec.measured = True


def _narrower(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Of a call's input and output dtypes, the one whose rounding is coarser: a layer that
    computes in bfloat16 under autocast and returns float32 (its float32 gamma promotes the
    result) is judged at bfloat16's precision."""
    if not (a.is_floating_point and b.is_floating_point):
        return b
    return a if torch.finfo(a).eps > torch.finfo(b).eps else b


def _finish_measures(calls: Iterable[TrainCall]) -> None:
    """Turn what :func:`_measure` read into statistics and (C, K) grids."""
    pending = [rec for rec in calls if rec.measured]
    raws = [raw for rec in pending for raw in (rec.raw_in, rec.raw_out) if raw is not None]
    finished = finish_all(raws)
    for rec in pending:
        rec.measured = False
        if rec.grid_in is not None and rec.grid_out is not None:
            rec.grid_in, rec.grid_out = _grid_matrix(rec.grid_in), _grid_matrix(rec.grid_out)
        rec.input_stats = finished[id(rec.raw_in)] if rec.raw_in is not None else None
        rec.output_stats = finished[id(rec.raw_out)] if rec.raw_out is not None else None
        rec.raw_in = rec.raw_out = None


def finish_all(raws: list[RawStats]) -> dict[int, ChannelStats]:
    """:meth:`RawStats.finish` of many readings, by ``id``: the CPU readings of one batch
    size and kind side by side, so that the float64 arithmetic runs once over all their
    channels."""
    out: dict[int, ChannelStats] = {}
    groups: dict[tuple[int, str], list[RawStats]] = {}
    kernel: list[RawStats] = []
    for raw in raws:
        if raw.kind in ("rows", "sums") and raw.first.device.type == "cpu":
            groups.setdefault((raw.batch, raw.kind), []).append(raw)
        elif raw.kind == "kernel" and raw.first.device.type == "cpu":
            kernel.append(raw)
        else:
            out[id(raw)] = raw.finish()
    if kernel:
        widths = [raw.channels for raw in kernel]
        with np.errstate(all="ignore"):
            mean, var = _kernel_moments(
                _as_numpy(torch.cat([raw.first for raw in kernel])),
                _as_numpy(torch.cat([raw.second for raw in kernel])),  # type: ignore[misc]
                np.repeat([raw.eps for raw in kernel], widths),
            )
        edges = np.cumsum(widths)[:-1]
        for raw, m, v in zip(kernel, np.split(mean, edges), np.split(var, edges)):
            out[id(raw)] = ChannelStats(torch.from_numpy(m), torch.from_numpy(v), raw.count)
    for (batch, kind), members in groups.items():
        if len(members) == 1:
            out[id(members[0])] = members[0].finish()
            continue
        widths = [raw.channels for raw in members]
        # torch.cat promotes a float32/float64 mix to float64 exactly
        first = _as_numpy(torch.cat([raw.first.reshape(batch, -1) for raw in members], 1))
        second = _as_numpy(
            torch.cat([raw.second.reshape(batch, -1) for raw in members], 1)  # type: ignore[union-attr]
        )
        counts = np.repeat([float(raw.count) for raw in members], widths)
        with np.errstate(all="ignore"):
            if kind == "rows":
                lengths = np.repeat([float(raw.length) for raw in members], widths)
                s1, s2, k = _around_means(first, second, lengths)
            else:
                s1, s2 = first, second
                k = np.concatenate([raw.shift for raw in members])  # type: ignore[misc]
            d, mean, var = _moments(s1, s2, k, counts)
        edges = np.cumsum(widths)[:-1]
        parts = zip(
            np.split(s1, edges, 1),
            np.split(s2, edges, 1),
            np.split(k, edges),
            np.split(d, edges),
            np.split(mean, edges),
            np.split(var, edges),
        )
        for raw, (p1, p2, pk, pd, pmean, pvar) in zip(members, parts):
            out[id(raw)] = ChannelStats(
                torch.from_numpy(pmean),
                torch.from_numpy(pvar),
                raw.count,
                rows=(p1, p2, pk, pd, raw.length),
            )
    return out


def tensor_difference(
    a: torch.Tensor | None, b: torch.Tensor | None, rows: slice = slice(None)
) -> tuple[float, float] | None:
    """(max |a - b|, max |a|) over ``rows``; ``None`` when not comparable. NaN/Inf in the
    same places count as equal; elsewhere they make the difference infinite."""
    if a is None or b is None or a.shape != b.shape or not a.is_floating_point():
        return None
    a, b = a[rows], b[rows]
    if a.numel() == 0:
        return None
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    if math.isfinite(diff) and math.isfinite(scale):
        return diff, scale
    same = torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    return (0.0 if same else math.inf), 1.0


def differs(d: tuple[float, float] | None, rtol: float) -> bool:
    """Whether a :func:`tensor_difference` exceeds ``rtol`` times the output's scale."""
    return d is not None and d[0] > 0 and d[0] > rtol * d[1]


def _all_identical(
    pairs: list[tuple[torch.Tensor | None, torch.Tensor | None]], rows: slice
) -> bool:
    """Whether every pair :func:`tensor_difference` can compare holds bitwise-equal values
    over ``rows``: then no pair differs. One ``torch.equal`` per dtype and device over the
    pairs joined (NaN makes it False, and the pair-by-pair path decides)."""
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]]
    groups = {}
    for a, b in pairs:
        if a is None or b is None or a.shape != b.shape or not a.is_floating_point():
            continue  # not comparable: never a difference
        if b.dtype != a.dtype or b.device != a.device:
            return False
        left, right = groups.setdefault((a.dtype, a.device), ([], []))
        left.append(a[rows].reshape(-1))
        right.append(b[rows].reshape(-1))
    return all(torch.equal(torch.cat(left), torch.cat(right)) for left, right in groups.values())


def first_difference(
    p: EvalPass, q: EvalPass, rows: slice, rtol: float
) -> tuple[str | None, int, bool, tuple[float, float]] | None:
    """The first BN call (in ``p``'s call order) whose output differs between two passes:
    ``(layer, occurrence, input_differs_too, (max diff, scale))``; layer ``None`` when only
    the model outputs differ; ``None`` when nothing differs."""
    q_calls = {(c.layer, c.occurrence): c for c in q.calls}
    pairs = [(call, q_calls.get((call.layer, call.occurrence))) for call in p.calls]
    if _all_identical(
        [(c.output, o.output) for c, o in pairs if o is not None] + list(zip(p.outputs, q.outputs)),
        rows,
    ):
        return None  # the common case, one comparison
    for call, other in pairs:
        if other is None:
            continue
        d = tensor_difference(call.output, other.output, rows)
        if differs(d, rtol):
            assert d is not None
            upstream = differs(tensor_difference(call.input, other.input, rows), rtol)
            return call.layer, call.occurrence, upstream, d
    for x, y in zip(p.outputs, q.outputs):
        d = tensor_difference(x, y, rows)
        if differs(d, rtol):
            assert d is not None
            return None, -1, True, d
    return None


# ---- the eval passes -------------------------------------------------------------------------
def _eval_pass(
    ctx: AuditContext, x: Any, keep: int, batch: int | None = None, hooks: bool = True
) -> EvalPass:
    """One eval-mode forward; with ``hooks``, each BN call's first ``keep`` input and output
    rows are recorded; without, a screening pass: each BN call's first output row only."""
    calls: list[EvalCall] = []
    counts: dict[str, int] = {}
    pending: list[EvalCall] = []
    unread: set[str] = set()

    def pre(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            t = _first_tensor(args)
            if _unreadable_call(t, module):
                unread.add(layer.name)
                t = None
            occ = counts.get(layer.name, 0)
            counts[layer.name] = occ + 1
            # a view is enough for the input (nothing writes a BN input in place after BN;
            # the output is cloned: an in-place activation may follow)
            call = EvalCall(
                layer.name,
                occ,
                t[:keep].detach() if _readable(t) else None,
                None,
            )
            calls.append(call)
            pending.append(call)

        return hook

    def post(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not pending:
                return
            call = pending.pop()
            t = _first_tensor(output) if not isinstance(output, torch.Tensor) else output
            if _readable(t) and layer.name not in unread:
                call.output = t[:keep].detach().clone()

        return hook

    names = {id(layer.module): (layer.module, layer.name) for layer in ctx.layers}

    def screen(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # a screening pass: each BN call's first output row (sample 0), nothing else
        entry = names.get(id(module))
        if entry is None or entry[0] is not module:
            return
        occ = counts.get(entry[1], 0)
        counts[entry[1]] = occ + 1
        t = output if isinstance(output, torch.Tensor) else _first_tensor(output)
        if _unreadable_call(t, module):
            unread.add(entry[1])
            t = None
        row = t[:1].detach().clone() if _readable(t) else None
        calls.append(EvalCall(entry[1], occ, None, row))

    with ExitStack() as stack:
        if hooks:
            stack.enter_context(_hooks(ctx.layers, pre, post))
        else:  # one process-wide hook: cheaper than registering a pair on every BN layer
            stack.callback(register_module_forward_hook(screen).remove)
        result = _call(ctx.model, x)
    # only outputs with one row (or one list entry) per sample are compared sample by sample
    return EvalPass(calls, _sample_outputs(result, keep if batch is None else batch, keep), unread)


#: Fewer values than this in sample 0's model outputs, and the screening passes agreeing, call
#: for one more screening pass (see :func:`_eval_passes`): dropout with p = 0.5 on k values
#: leaves them all the same in two passes one time in 2^k.
FEW_OUTPUT_VALUES = 16


def _few_output_values(p: EvalPass) -> bool:
    """Whether sample 0's model outputs in ``p`` are fewer than :data:`FEW_OUTPUT_VALUES`
    floating-point values (and there are some to compare)."""
    values = [t[:1].numel() for t in p.outputs if t.dim() >= 1 and t.is_floating_point()]
    return bool(values) and 0 < sum(values) < FEW_OUTPUT_VALUES


def _eval_passes(
    ctx: AuditContext, x: Any, n: int, after_pass: Callable[[], None], mates: int = 2
) -> EvalObservations:
    """Run the eval passes; ``mates`` batch-mates keep sample 0 company (2, or 1 when every
    BN layer sees more than one value per sample and channel)."""
    model = ctx.model
    model.eval()
    size = mates + 1
    picks_a: list[int | tuple[int, int]] = [i if i < n else (i % n, 10 + i) for i in range(size)]
    picks_b: list[int | tuple[int, int]] = [0]
    for i in range(1, size):
        later = size + i - 1
        picks_b.append(later if later < n else ((i % n) if n > 1 else 0, 20 + i))
    a_in = _pick_samples(x, n, picks_a)
    b_in = _pick_samples(x, n, picks_b)
    companion = (
        f"sample{'s' if mates > 1 else ''} {', '.join(str(p) for p in picks_b[1:])} "
        f"instead of {', '.join(str(p) for p in picks_a[1:])}"
        if all(isinstance(p, int) for p in picks_a + picks_b)
        else "perturbed copies of its batch-mates"
    )

    def run(inp: Any, batch: int = size, hooks: bool = True) -> EvalPass:
        try:
            return _eval_pass(ctx, inp, size, batch, hooks)
        finally:
            after_pass()

    rtol = float(ctx.tolerances.get("eval_rtol", 1e-5))
    try:
        # first screening passes (each BN call's output row for sample 0 and the model's
        # outputs): when nothing differs between the two sets of batch-mates, the rules read
        # nothing else (they localise only a difference); else once more with BN hooks that
        # also record the inputs
        a = first = run(a_in, hooks=False)
        screened = run(b_in, hooks=False)
        b: EvalPass | None = screened
        # a difference the screening passes saw stands even when the recording passes
        # happen to agree (a random op whose few values of sample 0 come out the same twice)
        screen_differs = first_difference(a, screened, slice(0, 1), rtol) is not None
        if not screen_differs and _few_output_values(first):
            # a random op after the last BN layer shows only in the model outputs; when sample
            # 0 has a few output values, it leaves them the same in two passes often (dropout
            # on 4 values: one time in 16): one more pass on the same batch, whose sample 0
            # differs from the first pass's only by such an op
            screen_differs = (
                first_difference(first, run(a_in, hooks=False), slice(0, 1), rtol) is not None
            )
        if screen_differs:
            a = run(a_in)
            b = run(b_in)
        batch = size
    except BNCheckError:
        raise
    except Exception:
        # The model may need its full batch size (a hard-coded reshape): use the whole batch.
        screen_differs = False
        a = run(x, n)
        batch = n
        if n >= 2:
            picks: list[int | tuple[int, int]] = [0, *((i, 31 + i) for i in range(1, n))]
            b = run(_pick_samples(x, n, picks), n)
            companion = "perturbed copies of its batch-mates (full batch)"
        else:
            b, companion = None, "none (batch of 1 and the model needs that batch size)"
    differs = b is None or screen_differs or first_difference(a, b, slice(0, 1), rtol) is not None
    params_changed: tuple[str, ...] = ()
    buffers_changed: tuple[str, ...] = ()
    a_again = None
    if differs:
        bn_modules = frozenset(id(layer.module) for layer in ctx.layers)
        sums = _state_sums(model, bn_modules)
        started = _buffer_copies(model, bn_modules)
        a_again = run(a_in) if batch == size else run(x, n)
        params_changed, buffers_changed = _changed_since(_state_sums(model, bn_modules), sums)
        if buffers_changed and not params_changed:
            # is the changed state why the passes differ? once more from the state a_again
            # started from: a pass that differs from it has a random op besides (a counter
            # the forward increments and never reads must not hide a dropout); the two
            # passes from one state then locate it. Not told (a pass that fails): the
            # random-op verdict stands
            third = None
            if _put_buffers(started, buffers_changed):
                try:
                    third = run(a_in) if batch == size else run(x, n)
                except Exception:
                    third = None
            if third is None:
                buffers_changed = ()
            elif first_difference(a_again, third, slice(0, 1), rtol) is not None:
                buffers_changed = ()
                a, a_again = a_again, third
    if (
        a_again is not None
        and batch == size
        and first_difference(a, a_again, slice(0, 1), rtol) is None
        and first_difference(first, a, slice(0, 1), rtol) is not None
    ):
        # the first screening pass ran this batch too: a random op on a few values that
        # left a and a_again the same by chance shows between it and a (the rules then
        # compare the model outputs: it kept only sample 0's row of each BN output)
        a_again = first
    unread = (
        _unread_statistics(
            ctx, first, lambda: _eval_pass(ctx, a_in, size, size, False), after_pass, rtol
        )
        if batch == size and not differs
        else frozenset()
    )
    return EvalObservations(
        a,
        a_again,
        b,
        batch,
        companion,
        unread_stats=unread,
        params_changed=params_changed,
        buffers_changed=buffers_changed,
    )


def _state_sums(
    model: nn.Module, bn_modules: frozenset[int]
) -> tuple[dict[str, float], dict[str, float]]:
    """A float64 sum of each parameter's values and of each buffer's but the BN layers'
    (``bn_modules``: their ids), by qualified name (one read of each, no copy): enough to see
    a forward that moves its weights (an EMA step) or its other state (an observer)."""
    params: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and p.numel():
            params[name] = float(p.detach().sum(dtype=torch.float64))
    buffers = {
        key: float(b.detach().sum(dtype=torch.float64))
        for key, _, _, b in _other_buffers(model, bn_modules)
        if b.is_floating_point() or (not b.is_complex() and b.dtype != torch.bool)
    }
    return params, buffers


def _other_buffers(
    model: nn.Module, bn_modules: frozenset[int]
) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """The buffers with values of the modules but the BN layers (``bn_modules``: their ids):
    (qualified name, the module holding it, its name there, the buffer)."""
    for prefix, module in model.named_modules():
        if id(module) in bn_modules:
            continue
        for name, b in module.named_buffers(recurse=False):
            if isinstance(b, torch.Tensor) and not b.is_meta and b.numel():
                yield (f"{prefix}.{name}" if prefix else name), module, name, b


_BufferCopy = tuple[nn.Module, str, torch.Tensor, torch.Tensor]


def _buffer_copies(model: nn.Module, bn_modules: frozenset[int]) -> dict[str, _BufferCopy]:
    """The buffers :func:`_state_sums` reads, by qualified name, in modules whose table can
    take them back: (the module holding it, its name there, the buffer, a copy of its
    values)."""
    return {
        key: (module, name, b, b.detach().clone())
        for key, module, name, b in _other_buffers(model, bn_modules)
        if isinstance(module._buffers, dict)  # TorchScript's table cannot take one back
    }


def _put_buffers(copies: dict[str, _BufferCopy], names: Sequence[str]) -> bool:
    """Put the buffers ``names`` back as they were: the same tensors in their modules (a
    forward that assigns ``self.scale = ...`` replaced them), holding the copied values
    (resized ones too). False when one is not among the copies."""
    entries = [copies.get(name) for name in names]
    if any(e is None for e in entries):
        return False
    with torch.no_grad():
        for module, name, buffer, copy in entries:  # type: ignore[misc]
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
            if (
                buffer.shape != copy.shape
                or buffer.dtype != copy.dtype
                or buffer.device != copy.device
            ):
                buffer.data = copy.clone()
            else:
                buffer.copy_(copy)
    return True


def _changed_since(
    now: tuple[dict[str, float], dict[str, float]],
    before: tuple[dict[str, float], dict[str, float]],
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parameters, then the buffers, whose sum in ``now`` is not the one in ``before``
    (:func:`_state_sums`; in order)."""

    def changed(a: dict[str, float], b: dict[str, float]) -> tuple[str, ...]:
        return tuple(
            name
            for name, value in a.items()
            if name in b and value != b[name] and not (math.isnan(value) and math.isnan(b[name]))
        )

    return changed(now[0], before[0]), changed(now[1], before[1])


def _unread_statistics(
    ctx: AuditContext,
    first: EvalPass,
    screen: Callable[[], EvalPass],
    after_pass: Callable[[], None],
    rtol: float,
) -> frozenset[str]:
    """The BN layers with running statistics that the eval forward ``first`` did not call,
    when moving all their running means and variances far (+1e3) changes none of sample 0's
    BN outputs or model outputs in one more screening pass on the same batch (``screen``).
    A layer whose statistics are read without a call (a conv-BN folded for inference)
    changes them, and then no layer is returned; so does a forward that is not
    deterministic. Only this batch is tried: an eval forward that takes another branch for
    other inputs could still use a layer returned here. The moved buffers are put back from
    copies before ``after_pass`` compares the buffers (so the move is not taken for an
    update by the eval pass)."""
    called = {c.layer for c in first.calls}
    idle = [
        layer
        for layer in ctx.layers
        if layer.name not in called
        and isinstance(layer.running_mean, torch.Tensor)
        and layer.running_mean.is_floating_point()
        and not layer.running_mean.is_meta
        and layer.running_mean.numel() > 0
    ]
    if not idle:
        return frozenset()
    buffers = [b for lyr in idle for b in (lyr.running_mean, lyr.running_var)]
    saved = [
        (b, b.detach().clone())
        for b in buffers
        if isinstance(b, torch.Tensor) and b.is_floating_point() and not b.is_meta
    ]
    try:
        with torch.no_grad():
            for buffer, _ in saved:
                buffer.add_(1e3)  # far from any mean, and a variance that stays positive
        moved = screen()
    except BNCheckError:
        raise
    except Exception:
        return frozenset()
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)
        after_pass()
    if first_difference(first, moved, slice(0, 1), rtol) is not None:
        return frozenset()
    return frozenset(layer.name for layer in idle)


# ---- the data passes -------------------------------------------------------------------------
def _images_like(batch: Any, example: Any) -> bool:
    """Whether ``batch`` is itself a list of images like the example input's (a detector's
    list of (C, H, W) tensors), not an (input, target) pair."""
    return (
        isinstance(example, list)
        and bool(example)
        and isinstance(example[0], torch.Tensor)
        and example[0].dim() == 3  # (C, H, W) images, not one batched tensor in a list
        and isinstance(batch, list)
        and bool(batch)
        and all(isinstance(t, torch.Tensor) and t.dim() == example[0].dim() for t in batch)
        and all(t.shape[:1] == example[0].shape[:1] for t in batch)
    )


def _like_example(part: Any, example: Any) -> Any:
    """``part`` in the container of the example input when it holds the same kind of items,
    so that it is called the same way: a tuple of images (torchvision's detection collate)
    is a list when the example is a list of images; a list of a two-input model's inputs (a
    DataLoader's default collate) is a tuple when the example is a tuple of that many
    tensors of the same dims. Anything else (an example ``(images, targets)`` and a batch
    of images alone) is left as it is."""
    if isinstance(part, tuple) and (
        _images_like(list(part), example)
        # a detector called with (images, targets) in train mode: its images alone in eval
        or (isinstance(example, tuple) and bool(example) and _images_like(list(part), example[0]))
    ):
        return list(part)
    if isinstance(part, list) and _tensors_like(part, example, same_shapes=False):
        return tuple(part)
    return part


def _tensors_like(items: Any, example: Any, same_shapes: bool) -> bool:
    """Whether ``items`` are as many tensors as an example tuple of tensors, each with the
    same number of dims (and with ``same_shapes``, the same shape past the batch dim)."""
    return (
        isinstance(example, tuple)
        and len(items) == len(example)
        and all(
            isinstance(t, torch.Tensor)
            and isinstance(e, torch.Tensor)
            and t.dim() == e.dim()
            and (not same_shapes or (t.dim() >= 1 and t.shape[1:] == e.shape[1:]))
            for t, e in zip(items, example)
        )
    )


def _batch_to_input(batch: Any, example: Any) -> Any:
    """The part of a ``data=`` batch the model takes (see :func:`_like_example` for its
    container)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if _images_like(batch, example):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError("a batch in data= is empty; yield tensors or (input, target) pairs")
        if len(batch) >= 2 and _tensors_like(batch, example, same_shapes=True):
            # exactly the example's tensors: the inputs of a multi-input model, no target
            return tuple(batch)
        return _like_example(batch[0], example)
    if isinstance(batch, dict):
        if isinstance(example, dict):
            return {k: v for k, v in batch.items() if k in example}
        for key in ("input", "inputs", "x", "image", "images", "pixel_values", "data"):
            if key in batch:
                return batch[key]
        raise InputError(
            f"a batch in data= is a dict with keys {sorted(map(str, batch))}; bncheck looks for "
            "'input', 'x', 'image' or 'pixel_values', or the keys of a dict example input"
        )
    raise InputError(
        f"a batch in data= is a {type(batch).__name__}; yield tensors, (input, target) "
        "tuples/lists or dicts"
    )


def _drift_pass(
    ctx: AuditContext, limit: int, unread: set[str]
) -> tuple[dict[str, DriftStats], int]:
    """The eval-mode forwards on ``data=``: each BN layer's input statistics over the
    batches; ``unread`` collects the layers whose calls could not be read."""
    data = ctx.data
    try:
        iterator = iter(data)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(
            f"data= must be an iterable of batches (a DataLoader, a list of tensors), got "
            f"{type(data).__name__}"
        ) from None
    per_layer: dict[str, list[ChannelStats]] = {}

    def pre(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            t = _first_tensor(args)
            if _unreadable_call(t, module):
                unread.add(layer.name)  # vmap-batched or meta: not read (stat-drift skips it)
            elif isinstance(t, torch.Tensor):
                stats = channel_stats(t)
                if stats is not None:
                    per_layer.setdefault(layer.name, []).append(stats)

        return hook

    def post(layer: BNLayer) -> Callable[..., None]:
        return lambda module, args, output: None

    batches = 0
    ctx.model.eval()
    with _hooks([layer for layer in ctx.layers if layer.has_running_stats], pre, post):
        for batch in iterator:
            if batches >= limit:
                break
            inp = _batch_to_input(batch, ctx.example_input)
            validate_input(inp, f"batch {batches + 1} of data=")
            _call(ctx.model, inp)
            batches += 1
    result = {}
    for name, items in per_layer.items():
        if any(s.mean.shape != items[0].mean.shape for s in items):
            continue
        counts = torch.tensor([float(s.count) for s in items], dtype=torch.float64)
        means = torch.stack([s.mean for s in items])
        variances = torch.stack([s.var for s in items])
        w = (counts / counts.sum()).unsqueeze(1)
        mean = (w * means).sum(0)
        var = (w * variances).sum(0) + (w * (means - mean) ** 2).sum(0)
        result[name] = DriftStats(mean, var, int(counts.sum()), batches, means, variances)
    return result, batches


# ---- entry point -----------------------------------------------------------------------------
#: The stages :func:`collect` can run (``bncheck.checks.catalogue.STAGES``).
ALL_STAGES = frozenset({"train", "eval", "data"})


class _SavedBuffers:
    """The running buffers of BN modules at one moment, put back and compared for all
    modules at once (a few operations instead of a few per module); the per-module
    :class:`BufferState` paths remain for what the batched ones cannot take (a buffer
    rebound to another shape, dtype or device, NaN values)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        #: id(module) -> (module, its buffers' values)
        self.states = {id(m): (m, BufferState.capture(m)) for m in modules}
        self.slots: list[tuple[nn.Module, str]] = []
        self.saved: list[torch.Tensor] = []
        for module, state in self.states.values():
            for name in ("running_mean", "running_var"):
                value = getattr(state, name)
                if value is not None and isinstance(module._buffers.get(name), torch.Tensor):
                    self.slots.append((module, name))
                    self.saved.append(value)
            nbt = module._buffers.get("num_batches_tracked")
            if isinstance(nbt, torch.Tensor) and state.num_batches_tracked is not None:
                self.slots.append((module, "num_batches_tracked"))
                self.saved.append(nbt.detach().clone())
        self._flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] | None = None

    def _live(self) -> list[torch.Tensor] | None:
        live = [module._buffers.get(name) for module, name in self.slots]
        for t, s in zip(live, self.saved):
            if (
                not isinstance(t, torch.Tensor)
                or t.shape != s.shape
                or t.dtype != s.dtype
                or t.device != s.device
            ):
                return None
        return live  # type: ignore[return-value]

    @staticmethod
    def _flatten(
        tensors: list[torch.Tensor],
    ) -> dict[tuple[torch.dtype, torch.device], torch.Tensor]:
        groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t.detach().reshape(-1))
        return {key: torch.cat(parts) for key, parts in groups.items()}

    def restore(self) -> None:
        live = self._live()
        if live is None or not live:
            for module, state in self.states.values():
                state.restore(module)
            return
        with torch.no_grad():
            torch._foreach_copy_(live, self.saved)

    def unchanged(self) -> bool:
        """Whether every buffer still holds its saved values (``False`` also when that
        cannot be told at once: then compare module by module)."""
        live = self._live()
        if live is None:
            return False
        if self._flat is None:
            self._flat = self._flatten(self.saved)
        now = self._flatten(live)
        return now.keys() == self._flat.keys() and all(
            torch.equal(now[key], self._flat[key]) for key in now
        )


def _needs_targets(exc: BaseException, x: Any) -> bool:
    """Whether a train-mode forward failed for want of targets (a torchvision detector's
    "targets should not be none when in training mode"): the message names targets and the
    input holds no dict of targets."""
    if not re.search(r"\btargets?\b", str(exc), re.IGNORECASE):
        return False
    return not any(isinstance(v, dict) for v in _arguments(x) for v in _listed(v))


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


@dataclass(frozen=True)
class _Predicted:
    """What the eval passes saw of the BN calls, for the train pass: the layers called, and
    those called more than once in one forward."""

    seen: frozenset[str]
    reused: frozenset[str]

    @classmethod
    def of(cls, ev: EvalObservations) -> _Predicted:
        counts: dict[str, int] = {}
        for call in ev.a.calls:
            counts[call.layer] = max(counts.get(call.layer, 0), call.occurrence + 1)
        return cls(frozenset(counts), frozenset(k for k, v in counts.items() if v > 1))


def _flat_eval(ev: EvalObservations) -> bool:
    """Whether a BN call of the eval passes saw one value per sample and channel (the train
    pass's test, ``samples_per_channel <= batch_size``, on the eval passes' calls)."""
    if not ev.a.calls:
        return True
    for call in ev.a.calls:
        t = call.output if call.output is not None else call.input
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[0] == 0:
            return True
        if t[0].numel() // max(1, int(t.shape[1])) <= 1:
            return True
    return False


def collect(ctx: AuditContext, stages: Iterable[str] | None = None) -> ForwardObservations:
    """Run the audit's forward passes on ``ctx.example_input`` and return what they observed.

    ``stages`` are the passes to run (``"train"``, ``"eval"``, ``"data"``; all by default);
    the engine derives them from the selected rules' catalogue entries (``RuleInfo.stage``).
    Runs inside :func:`bncheck.state.preserved` (the engine's), under ``torch.no_grad()``.
    Raises :class:`InputError` for an unusable input. An exception from the model's own
    forward propagates when no stage could run; when one stage ran, the stage that failed is
    recorded in ``stage_errors`` (the engine skips its rules with that reason) and the rest
    are observed.
    """
    wanted = ALL_STAGES if stages is None else frozenset(stages)
    x = ctx.example_input
    validate_input(x)
    obs = ForwardObservations(batch_size=_batch_size(x))
    # the user's own modes, before any pass changes them: only BN layers the user trains
    # (train mode) have their batch judged by the batch-size rules
    obs.user_training = {layer.name: bool(layer.module.training) for layer in ctx.layers}
    if "train" in wanted and ctx.user_batch:
        obs.inputs = summarize_inputs(x)
    saved = _SavedBuffers(
        [
            layer.module
            for layer in ctx.layers
            if layer.has_running_stats
            and not (isinstance(layer.running_mean, torch.Tensor) and layer.running_mean.is_meta)
        ]
    )
    snapshot = saved.states
    restore = saved.restore

    train_failure: BaseException | None = None
    eval_failure: BaseException | None = None

    def eval_stage(n: int, mates: int) -> None:
        nonlocal eval_failure
        obs.eval, obs.eval_error, eval_failure = None, None, None
        changes: dict[str, list[str]] = {}

        def after_pass() -> None:
            # what an eval pass changed, then back to the user's values for the next one
            if saved.unchanged():
                return
            for layer in ctx.layers:
                if id(layer.module) in snapshot:
                    state = snapshot[id(layer.module)][1]
                    changed = state.changed_in(layer.module)
                    if changed:
                        state.restore(layer.module)
                    for name in changed:
                        if name not in changes.setdefault(layer.name, []):
                            changes[layer.name].append(name)

        try:
            obs.eval = _eval_passes(ctx, x, n, after_pass, mates=mates)
            for p in (obs.eval.a, obs.eval.a_again, obs.eval.b):
                if p is not None:
                    obs.unread |= p.unread
        except BNCheckError:
            raise
        except Exception as exc:
            eval_failure = exc
            obs.eval_error = first_line(exc)
        else:
            obs.eval.buffer_changes = {k: v for k, v in changes.items() if v}
        restore()

    with torch.no_grad():
        # the eval passes first when they can tell the train pass which layers are called
        # more than once (bn-reused's per-sample sums): then no first-call input is held
        # in case its layer is called again (see _train_pass); the train pass gets the RNG
        # state it would have had first, and the eval passes run again after it if their
        # batch size or batch-mates turn out other than the train pass says
        early: tuple[int, int] | None = None
        predicted: _Predicted | None = None
        counts = set(_sample_counts(x))
        if (
            "train" in wanted
            and "eval" in wanted
            and "bn-reused" in ctx.rule_ids
            and len(counts) == 1
            and not any(layer.lazy_uninitialized for layer in ctx.layers)
        ):
            rng = RNGState.capture()  # (ctx.reset restores the RNG too, when the engine set it)
            n, mates = counts.pop(), 1
            eval_stage(n, mates)
            if obs.eval is not None and _flat_eval(obs.eval):
                mates = 2
                eval_stage(n, mates)
            if obs.eval is not None:  # a failure is left to the eval passes after the train pass
                early = (n, mates)
                predicted = _Predicted.of(obs.eval)
            # the train pass runs on the model as the user left it: what the eval forwards
            # changed (an attribute holding a hidden state of 2 samples, a counter, a module
            # fused or swapped) is put back, with the RNG states
            if ctx.reset is not None:
                ctx.reset()
            rng.restore()
        if "train" in wanted:
            ctx.model.train()
            try:
                _train_pass(ctx, x, obs, predicted)
            except BNCheckError:
                raise
            except Exception as exc:
                train_failure = exc
                obs.train_error = first_line(exc)
                if _needs_targets(exc, x):
                    obs.needs_targets = True
            restore()
            # the batch is what the BN layers see as N: a list of images is its length
            obs.batch_size = _batch_size(x, (c.batch_size for c in obs.calls))
        if "eval" in wanted and obs.batch_size is not None:
            # with one value per sample and channel (BN on (N, C)), batch statistics of
            # two samples are about +-1 whatever the samples are: use two batch-mates
            flat = not obs.calls or any(c.samples_per_channel <= c.batch_size for c in obs.calls)
            if early != (obs.batch_size, 2 if flat else 1):
                eval_stage(obs.batch_size, 2 if flat else 1)
        failures = [e for e in (train_failure, eval_failure) if e is not None]
        ran = obs.train_ran or obs.eval is not None
        if failures and not ran:
            raise failures[0]
        for stage, label, error in (
            ("train", "train-mode", obs.train_error),
            ("eval", "eval-mode", obs.eval_error),
        ):
            if error is None:
                continue
            if stage == "train" and obs.needs_targets:
                reason = (
                    f"the train-mode forward pass needs targets ({error}); pass the example "
                    "input as (images, targets)"
                )
                ctx.notes.append(
                    f"{reason}: audit(model, (images, targets)), one target dict per image "
                    "(e.g. {'boxes': ..., 'labels': ...}), calls model(images, targets) as in "
                    "training; the train-mode rules were skipped"
                )
            else:
                reason = f"the {label} forward pass failed ({error})"
                ctx.notes.append(f"{reason}; its rules were skipped")
            obs.stage_errors[stage] = reason
        if ctx.data is not None and "data" in wanted:
            limit = int(ctx.tolerances.get("drift_max_batches", 32))
            try:
                obs.drift, obs.drift_batches = _drift_pass(ctx, max(1, limit), obs.unread)
                if obs.drift_batches == 0:
                    obs.stage_errors["data"] = "data= yielded no batch"
            except BNCheckError:
                raise
            except Exception as exc:
                obs.stage_errors["data"] = f"the forward pass on data= failed ({first_line(exc)})"
            restore()
    if obs.unread:
        names = sorted(obs.unread)
        ctx.notes.append(
            f"{len(names)} BN layer(s) ran inside torch.func.vmap or with tensors on the meta "
            f"device, and their calls could not be read: {layer_list(names, 3)}"
        )
    if obs.stopped_at is not None:
        ctx.notes.append(
            f"the train-mode pass stopped at {obs.stopped_at}: it sees one value per channel "
            "and has no running statistics to fall back on; later layers were not checked "
            "in train mode"
        )
    return obs

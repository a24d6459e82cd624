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

The BN buffers are snapshot first and put back after each stage, so every stage sees the
user's statistics; :func:`bncheck.state.preserved` restores everything else on exit. Random
inputs are drawn from a local ``torch.Generator``, never the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .context import AuditContext
from .discovery import BNLayer
from .errors import BNCheckError, InputError
from .tracing import BNCall, Tracer

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
    "tensor_difference",
    "first_difference",
    "TRAIN_RULES",
    "EVAL_RULES",
]

#: Rules read from the train-mode pass.
TRAIN_RULES = frozenset(
    {
        "bn-after-activation",
        "bias-before-bn",
        "dropout-before-bn",
        "bn-reused",
        "normalization",
        "ema-update",
        "single-value-per-channel",
        "small-batch",
        "input-not-normalized",  # reads which inputs go straight into a BN layer
    }
)
#: Rules read from the eval-mode passes.
EVAL_RULES = frozenset({"eval-batch-dependence", "eval-nondeterminism", "eval-updates-stats"})


# ---- records ---------------------------------------------------------------------------------
@dataclass
class ChannelStats:
    """Per-channel statistics over every axis but dim 1 (float64 CPU vectors of length C).

    ``mean`` is the sample mean and ``var`` the biased variance (divide by ``count``),
    computed in the tensor's own float precision (Welford/two-pass in PyTorch's reduction).
    ``count`` is N times the product of the spatial sizes.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: int


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

        nbt = module._buffers.get("num_batches_tracked")
        return cls(
            copy("running_mean"),
            copy("running_var"),
            int(nbt.reshape(-1)[0]) if isinstance(nbt, torch.Tensor) and nbt.numel() else None,
        )

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


@dataclass
class EvalCall:
    """One BN call in an eval pass: input and output of the (at most three) kept samples."""

    layer: str
    occurrence: int
    input: torch.Tensor | None
    output: torch.Tensor | None


@dataclass
class EvalPass:
    """One eval-mode forward: its BN calls in order and the model's output tensors."""

    calls: list[EvalCall]
    outputs: list[torch.Tensor]


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


@dataclass
class ForwardObservations:
    """What the audit's forward passes observed; ``ctx.forward`` holds one.

    ``calls`` are the BN calls of the train pass in call order (:class:`TrainCall`);
    ``call_counts`` maps layer name to calls per forward; ``train_error`` /
    ``eval_error`` say why a stage did not run to the end (``None`` when it did);
    ``stopped_at`` names the layer where a one-value-per-channel layer without running
    statistics stopped the train pass. ``eval`` and ``drift`` are ``None`` when not run.
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

    def calls_of(self, layer: str) -> list[TrainCall]:
        return [c for c in self.calls if c.layer == layer]


class _SingleValueStop(Exception):
    """A layer without running statistics would see one value per channel: stop the pass."""

    def __init__(self, layer: str) -> None:
        super().__init__(layer)
        self.layer = layer


# ---- inputs ----------------------------------------------------------------------------------
def _tensors_in(value: Any, where: str = "input") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{where}[{k!r}]")


def validate_input(x: Any) -> None:
    """Raise :class:`InputError` for an input bncheck cannot use (type, NaN/Inf)."""
    if not isinstance(x, (torch.Tensor, tuple, list, dict)):
        raise InputError(
            f"the example input is a {type(x).__name__}; pass a tensor, a tuple of positional "
            "inputs or a dict of keyword inputs"
        )
    tensors = list(_tensors_in(x))
    if not tensors:
        raise InputError("the example input holds no tensor; pass the batch the model takes")
    for where, t in tensors:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise InputError(
                f"the example input has NaN/Inf values ({where}, shape "
                f"{tuple(t.shape)}); pass a finite batch"
            )


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _batch_size(x: Any) -> int | None:
    for _, t in _tensors_in(x):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _map_batched(x: Any, n: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of ``x`` whose first dimension is the batch size ``n``."""
    if isinstance(x, torch.Tensor):
        return fn(x) if x.dim() >= 1 and x.shape[0] == n else x
    if isinstance(x, tuple):
        return tuple(_map_batched(v, n, fn) for v in x)
    if isinstance(x, list):
        return [_map_batched(v, n, fn) for v in x]
    if isinstance(x, dict):
        return {k: _map_batched(v, n, fn) for k, v in x.items()}
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


def summarize_inputs(x: Any) -> list[InputSummary]:
    out = []
    for where, t in _tensors_in(x):
        if not t.is_floating_point() or t.numel() == 0:
            continue
        with torch.no_grad():
            d = _float(t.detach())
            std, mean = torch.std_mean(d, correction=0)
            low, high = torch.aminmax(d)
            out.append(
                InputSummary(
                    where,
                    tuple(t.shape),
                    float(mean),
                    float(std),
                    float(low),
                    float(high),
                    torch.equal(d, d.round()),
                )
            )
    return out


# ---- statistics ------------------------------------------------------------------------------
def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def channel_stats(t: torch.Tensor) -> ChannelStats | None:
    """:class:`ChannelStats` of an (N, C, ...) tensor; ``None`` for fewer than 2 dims.

    Two passes in the tensor's precision (float32 for half types): ``mean = sum(x) / n``,
    then ``var = sum((x - mean)^2) / n`` (biased), both with PyTorch's cascade summation
    (error about u * log2(n) relative to the values summed). About 10x faster on CPU than
    ``torch.var_mean`` over non-contiguous dims; the temporary is one activation's size.
    """
    if t.dim() < 2 or not (t.is_floating_point()):
        return None
    x = _float(t.detach())
    dims = [0, *range(2, x.dim())]
    n = x.numel() // max(1, x.shape[1])
    if n == 0:
        return None
    mean = x.sum(dims) / n
    shape = [1, -1] + [1] * (x.dim() - 2)
    dev = x - mean.reshape(shape)
    dev.square_()
    var = dev.sum(dims) / n
    del dev
    return ChannelStats(mean.double().cpu(), var.double().cpu(), n)


_GRID_CACHE: dict[tuple[int, int, str], torch.Tensor] = {}


def _grid_indices(size: int, k: int, device: torch.device) -> torch.Tensor:
    key = (size, k, str(device))
    idx = _GRID_CACHE.get(key)
    if idx is None:
        k = max(1, min(size, k))
        picks = sorted({round(i * (size - 1) / max(1, k - 1)) for i in range(k)})
        idx = _GRID_CACHE[key] = torch.tensor(picks, dtype=torch.long, device=device)
    return idx


_OFFSET_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, int]] = {}


def _grid_offsets(t: torch.Tensor, k_batch: int, k_space: int) -> tuple[torch.Tensor, int]:
    """Storage offsets (C, K) of the grid elements of a tensor with ``t``'s shape and strides,
    and the length of storage they span; cached per (shape, strides, device)."""
    key = (tuple(t.shape), t.stride(), str(t.device), k_batch, k_space)
    hit = _OFFSET_CACHE.get(key)
    if hit is not None:
        return hit
    offsets = torch.zeros(1, dtype=torch.long)
    for d in [0, *range(2, t.dim())]:
        picks = _grid_indices(t.shape[d], k_batch if d == 0 else k_space, torch.device("cpu"))
        offsets = (offsets[:, None] + picks[None, :] * t.stride(d)).reshape(-1)
    channel = torch.arange(t.shape[1], dtype=torch.long) * t.stride(1)
    table = channel[:, None] + offsets[None, :]
    span = int(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))) + 1
    if len(_OFFSET_CACHE) > 256:
        _OFFSET_CACHE.clear()
    hit = _OFFSET_CACHE[key] = (table.to(t.device), span)
    return hit


def grid(t: torch.Tensor, k_batch: int = 8, k_space: int = 4) -> torch.Tensor:
    """The same few elements per channel of an (N, C, ...) tensor as a (C, K) float64 tensor.

    Picks up to ``k_batch`` evenly spaced samples and ``k_space`` evenly spaced positions per
    spatial dim (the same positions for every tensor of that shape), with one gather.
    """
    t = t.detach()
    if any(stride < 0 for stride in t.stride()) or t.numel() == 0:
        t = t.contiguous()
    table, span = _grid_offsets(t, k_batch, k_space)
    storage = t.as_strided((span,), (1,), t.storage_offset())
    return storage[table].double().cpu()


def _affine_copy(module: nn.Module, name: str) -> torch.Tensor | None:
    t: torch.Tensor | None = module._parameters.get(name)
    if t is None:
        t = module._buffers.get(name)
    if not isinstance(t, torch.Tensor):
        return None
    return t.detach().reshape(-1).to(dtype=torch.float64, device="cpu", copy=True)


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


def _computes_batch_stats(layer: BNLayer, module: nn.Module) -> bool:
    """Whether a layer in train mode normalises with batch statistics. PyTorch's BN always
    does; a custom layer with FrozenBatchNorm's signature (no parameters, no counter) does not.
    """
    if layer.standard:
        return True
    frozen_signature = not layer.params and module._buffers.get("num_batches_tracked") is None
    return not frozen_signature


#: forward methods of PyTorch's own BN classes (BatchNorm1d/2d/3d, lazy variants, SyncBatchNorm)
_STOCK_FORWARDS = frozenset({_BatchNorm.forward, nn.SyncBatchNorm.forward})


# ---- the train pass --------------------------------------------------------------------------
def _train_pass(ctx: AuditContext, x: Any, obs: ForwardObservations) -> None:
    model = ctx.model
    bn_modules = {layer.module: layer.name for layer in ctx.layers}
    tracer = Tracer(model, bn_modules)
    active: list[tuple[TrainCall, nn.Module, torch.Tensor | None]] = []

    def on_op(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if name != "batch_norm" or not active or not isinstance(out, torch.Tensor):
            return
        rec, module, _ = active[-1]
        if rec.norm_source is not None or rec.forced_eval or not rec.training:
            return
        inp = args[0] if args else kwargs.get("input")
        if not isinstance(inp, torch.Tensor):
            return
        _measure(rec, inp, out)
        rec.norm_source = "batch_norm"

    tracer.listeners.append(on_op)

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
                    eps=float(eps) if isinstance(eps, (int, float)) else None,
                    momentum=float(momentum) if isinstance(momentum, (int, float)) else None,
                    has_momentum=hasattr(module, "momentum"),
                    track_running_stats=bool(
                        getattr(module, "track_running_stats", layer.has_running_stats)
                    ),
                    dtype=x_in.dtype if isinstance(x_in, torch.Tensor) else torch.float32,
                    trace=trace,
                    stock=type(module).forward in _STOCK_FORWARDS,
                )
                obs.calls.append(rec)
                if rec.training and count == 1 and _computes_batch_stats(layer, module):
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
                if rec.forced_eval:
                    module.training = True
                    return
                if not rec.training:
                    return
                out = _first_tensor(output)
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

    with _hooks(ctx.layers, pre, post), tracer:
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
    for rec in obs.calls:
        obs.call_counts[rec.layer] = obs.call_counts.get(rec.layer, 0) + 1
    obs.train_ran = True


def _measure(rec: TrainCall, inp: torch.Tensor, out: torch.Tensor) -> None:
    if inp.dim() < 2 or out.shape != inp.shape or not out.is_floating_point():
        return
    rec.input_stats = channel_stats(inp)
    # PyTorch's own forward: its output's per-channel moments follow from the element grid
    # checked against the input's statistics; custom layers get their output measured too
    rec.output_stats = None if rec.stock else channel_stats(out)
    rec.dtype = out.dtype
    rec.grid_in = grid(inp)
    rec.grid_out = grid(out)


# ---- comparing eval passes -------------------------------------------------------------------
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


def first_difference(
    p: EvalPass, q: EvalPass, rows: slice, rtol: float
) -> tuple[str | None, int, bool, tuple[float, float]] | None:
    """The first BN call (in ``p``'s call order) whose output differs between two passes:
    ``(layer, occurrence, input_differs_too, (max diff, scale))``; layer ``None`` when only
    the model outputs differ; ``None`` when nothing differs."""
    q_calls = {(c.layer, c.occurrence): c for c in q.calls}
    for call in p.calls:
        other = q_calls.get((call.layer, call.occurrence))
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
def _eval_pass(ctx: AuditContext, x: Any, keep: int) -> EvalPass:
    calls: list[EvalCall] = []
    counts: dict[str, int] = {}
    pending: list[EvalCall] = []

    def pre(layer: BNLayer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            t = _first_tensor(args)
            occ = counts.get(layer.name, 0)
            counts[layer.name] = occ + 1
            # a view is enough for the input (nothing writes a BN input in place after BN;
            # the output is cloned: an in-place activation may follow)
            call = EvalCall(
                layer.name,
                occ,
                t[:keep].detach() if isinstance(t, torch.Tensor) and t.dim() >= 1 else None,
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
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                call.output = t[:keep].detach().clone()

        return hook

    with _hooks(ctx.layers, pre, post):
        result = _call(ctx.model, x)
    batch = _batch_size(x)
    # only outputs with one row per sample can be compared sample by sample
    outputs = [
        t[:keep].detach().clone()
        for t in _output_tensors(result)
        if t.dim() >= 1 and t.shape[0] == batch
    ]
    return EvalPass(calls, outputs)


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
    a_in = _map_batched(x, n, lambda t: _rows(t, picks_a))
    b_in = _map_batched(x, n, lambda t: _rows(t, picks_b))
    companion = (
        f"sample{'s' if mates > 1 else ''} {', '.join(str(p) for p in picks_b[1:])} "
        f"instead of {', '.join(str(p) for p in picks_a[1:])}"
        if all(isinstance(p, int) for p in picks_a + picks_b)
        else "perturbed copies of its batch-mates"
    )

    def run(inp: Any) -> EvalPass:
        try:
            return _eval_pass(ctx, inp, size)
        finally:
            after_pass()

    try:
        a = run(a_in)
        b: EvalPass | None = run(b_in)
        batch = size
    except BNCheckError:
        raise
    except Exception:
        # The model may need its full batch size (a hard-coded reshape): use the whole batch.
        a = run(x)
        batch = n
        if n >= 2:
            picks: list[int | tuple[int, int]] = [0, *((i, 31 + i) for i in range(1, n))]
            b = run(_map_batched(x, n, lambda t: _rows(t, picks)))
            companion = "perturbed copies of its batch-mates (full batch)"
        else:
            b, companion = None, "none (batch of 1 and the model needs that batch size)"
    rtol = float(ctx.tolerances.get("eval_rtol", 1e-5))
    differs = b is None or first_difference(a, b, slice(0, 1), rtol) is not None
    a_again = (run(a_in if batch == size else x)) if differs else None
    return EvalObservations(a, a_again, b, batch, companion)


# ---- the data passes -------------------------------------------------------------------------
def _batch_to_input(batch: Any, example: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise InputError("a batch in data= is empty; yield tensors or (input, target) pairs")
        return batch[0]
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


def _drift_pass(ctx: AuditContext, limit: int) -> tuple[dict[str, DriftStats], int]:
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
            if isinstance(t, torch.Tensor):
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
            validate_input(inp)
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
def _skip(ctx: AuditContext, rules: Iterable[str], reason: str) -> None:
    for rid in rules:
        if rid in ctx.rule_ids and rid not in ctx.skipped:
            ctx.skipped[rid] = reason


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def collect(ctx: AuditContext) -> ForwardObservations:
    """Run the audit's forward passes on ``ctx.example_input`` and return what they observed.

    Runs inside :func:`bncheck.state.preserved` (the engine's), under ``torch.no_grad()``.
    Raises :class:`InputError` for an unusable input. An exception from the model's own
    forward propagates when no stage could run; when one stage ran, the rules of the stage
    that failed are skipped with the reason, and the rest are checked.
    """
    x = ctx.example_input
    validate_input(x)
    wanted = set(ctx.rule_ids)
    obs = ForwardObservations(batch_size=_batch_size(x))
    if "input-not-normalized" in wanted and ctx.user_batch:
        obs.inputs = summarize_inputs(x)
    snapshot = {
        id(layer.module): (layer.module, BufferState.capture(layer.module))
        for layer in ctx.layers
        if layer.has_running_stats
    }

    def restore() -> None:
        for module, state in snapshot.values():
            state.restore(module)

    failures: list[BaseException] = []
    with torch.no_grad():
        if wanted & TRAIN_RULES:
            ctx.model.train()
            try:
                _train_pass(ctx, x, obs)
            except BNCheckError:
                raise
            except Exception as exc:
                failures.append(exc)
                obs.train_error = _one_line(exc)
            restore()
        if wanted & EVAL_RULES and obs.batch_size is not None:
            changes: dict[str, list[str]] = {}

            def after_pass() -> None:
                # what an eval pass changed, then back to the user's values for the next one
                for layer in ctx.layers:
                    if id(layer.module) in snapshot:
                        state = snapshot[id(layer.module)][1]
                        changed = state.changed(BufferState.capture(layer.module))
                        if changed:
                            state.restore(layer.module)
                        for name in changed:
                            if name not in changes.setdefault(layer.name, []):
                                changes[layer.name].append(name)

            try:
                # with one value per sample and channel (BN on (N, C)), batch statistics of
                # two samples are about +-1 whatever the samples are: use two batch-mates
                flat = not obs.calls or any(
                    c.samples_per_channel <= c.batch_size for c in obs.calls
                )
                obs.eval = _eval_passes(ctx, x, obs.batch_size, after_pass, mates=2 if flat else 1)
            except BNCheckError:
                raise
            except Exception as exc:
                failures.append(exc)
                obs.eval_error = _one_line(exc)
            else:
                obs.eval.buffer_changes = {k: v for k, v in changes.items() if v}
            restore()
        ran = obs.train_ran or obs.eval is not None
        if failures and not ran:
            raise failures[0]
        for stage, error, rules in (
            ("train-mode", obs.train_error, TRAIN_RULES),
            ("eval-mode", obs.eval_error, EVAL_RULES),
        ):
            if error is not None:
                reason = f"the {stage} forward pass failed ({error})"
                ctx.notes.append(f"{reason}; its rules were skipped")
                _skip(ctx, rules, reason)
        if ctx.data is not None and "stat-drift" in wanted:
            limit = int(ctx.tolerances.get("drift_max_batches", 32))
            try:
                obs.drift, obs.drift_batches = _drift_pass(ctx, max(1, limit))
            except BNCheckError:
                raise
            except Exception as exc:
                _skip(ctx, ["stat-drift"], f"the forward pass on data= failed ({_one_line(exc)})")
            restore()
    if obs.stopped_at is not None:
        ctx.notes.append(
            f"the train-mode pass stopped at {obs.stopped_at}: it sees one value per channel "
            "and has no running statistics to fall back on; later layers were not checked "
            "in train mode"
        )
    return obs

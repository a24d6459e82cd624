"""Recompute BatchNorm running statistics from data, and show that the repair worked.

``bncheck.recalibrate(model, data)`` audits the model's statistics against ``data`` (the
buffer rules and ``stat-drift``), recomputes the statistics of the layers that need it (or of
the layers asked for) from a forward pass over the batches (with ``layers="broken"``, up to
two more for layers the audit after still flags), audits again, and returns a
:class:`Recalibration` with the repaired copy, both reports, a per-layer table of what changed
and, when asked, a metric evaluated before and after.

The module is ``bncheck.recalibration`` (not ``bncheck.recalibrate``) so that importing it
never shadows the function ``bncheck.recalibrate`` on the package.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .discovery import BNLayer, find_bn_layers, unwrap_model
from .errors import BNCheckError, InputError, NoBatchNormError, UsageError, did_you_mean, first_line
from .probes import _batch_to_input, _first_tensor, _tensors_in
from .probes import _call as _call_as_audited
from .report import Report, Severity
from .state import ModelState, RNGState

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["recalibrate", "Recalibration", "AUDIT_RULES", "BUFFER_RULES"]

#: The rules whose findings on a layer make ``layers="broken"`` recompute it.
BUFFER_RULES = ("nonfinite-stats", "negative-running-var", "tiny-running-var", "untrained-stats")
#: The audit run before and after: the buffer rules and ``stat-drift`` over the same data.
AUDIT_RULES = (*BUFFER_RULES, "stat-drift")

_CHANGE_COLUMNS = [
    "layer",
    "kind",
    "reason",
    "channels",
    "batches",
    "values_per_channel",
    "nonfinite_channels",
    "max_mean_shift",
    "median_mean_shift",
    "min_var_ratio",
    "max_var_ratio",
]


class _NoBatchNorm(UsageError, NoBatchNormError):
    """A model without BN given to :func:`recalibrate` (both a usage error and "no BN")."""


# ---- the result ------------------------------------------------------------------------------
@dataclass
class Recalibration:
    """What :func:`bncheck.recalibrate` did.

    Attributes:
        model: the model with the recomputed statistics (a copy unless ``inplace=True``).
        before, after: reports of the same audit (buffer rules and ``stat-drift`` over the
            same batches, in eval mode) of the model before and after.
        changes: one row per recomputed layer (see :attr:`changes`).
        layers: the qualified names of the recomputed layers, in model order.
        batches: how many batches the statistics were computed from (all ranks together
            under ``torch.distributed``).
        metric_before, metric_after: what ``evaluate(model)`` returned, or None.
        notes: how the recalibration ran (layers left alone and why, the estimator).
    """

    model: nn.Module
    before: Report
    after: Report
    changes: pd.DataFrame
    layers: list[str]
    batches: int
    metric_before: float | None = None
    metric_after: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the audit of the repaired model ran every check (``after.complete``)
        and found no warning or error."""
        return self.after.complete and not any(
            f.severity >= Severity.WARNING for f in self.after.findings
        )

    @property
    def remaining(self) -> list[str]:
        """``rule layer`` of every warning or error the repaired model still has."""
        return [
            f"{f.rule} {f.layer or '(model)'}"
            for f in self.after.findings
            if f.severity >= Severity.WARNING
        ]

    def _findings_by_layer(self, report: Report) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in report.findings:
            if f.severity < Severity.WARNING:
                continue
            covered = [f.layer] if f.layer is not None else f.details.get("layers", [])
            for name in covered or ["(model)"]:
                if f.rule not in out.setdefault(name, []):
                    out[name].append(f.rule)
        return out

    def table_rows(self) -> list[list[str]]:
        """Rows of the before/after table: every layer recomputed or with findings."""
        before = self._findings_by_layer(self.before)
        after = self._findings_by_layer(self.after)
        changes = {row["layer"]: row for row in self.changes.to_dict("records")}
        order = list(self.before.layers) or list(changes)
        names = [n for n in order if n in before or n in after or n in changes]
        names += [n for n in (*before, *after) if n not in names]
        rows = []
        for name in names:
            row = changes.get(name)
            rows.append(
                [
                    name,
                    ", ".join(before.get(name, [])) or "ok",
                    f"yes: {row['reason']}" if row is not None else "no",
                    ", ".join(after.get(name, [])) or "ok",
                    _num(row["max_mean_shift"]) if row is not None else "",
                    _ratio_text(row) if row is not None else "",
                    str(row["nonfinite_channels"]) if row is not None else "",
                ]
            )
        return rows

    def headline(self) -> str:
        total = len(self.before.layers)
        values = ""
        if len(self.changes):
            counts = sorted({int(v) for v in self.changes["values_per_channel"]})
            values = (
                f", {counts[0]} values per channel"
                if len(counts) == 1
                else f", {counts[0]} to {counts[-1]} values per channel"
            )
        if not self.after.complete:
            state = "incomplete (" + "; ".join(self.after.incomplete) + ")"
        elif self.ok:
            state = "ok"
        else:
            state = f"{len(self.remaining)} finding(s) remain"
        return (
            f"bncheck recalibrate: {len(self.layers)} of {total} BN layers recomputed from "
            f"{self.batches} batches{values}; after: {state}"
        )

    def metric_line(self) -> str | None:
        if self.metric_before is None and self.metric_after is None:
            return None
        b, a = self.metric_before, self.metric_after
        delta = f" ({a - b:+.4g})" if a is not None and b is not None else ""

        def text(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4g}"

        return f"evaluate(model): {text(b)} before, {text(a)} after{delta}"

    def to_table(self, *, tablefmt: str = "simple") -> str:
        """The before/after table, the metric, and the notes, as text."""
        from tabulate import tabulate

        from .render import visible, visible_lines

        lines = [self.headline()]
        metric = self.metric_line()
        if metric:
            lines.append(metric)
        rows = [[visible(cell) for cell in row] for row in self.table_rows()]  # before widths
        if rows:
            lines.append("")
            lines.append(
                tabulate(
                    rows,
                    headers=[
                        "layer",
                        "before",
                        "recomputed",
                        "after",
                        "max |Δmean|/std",
                        "var ratio old/new",
                        "non-finite ch.",
                    ],
                    tablefmt=tablefmt,
                    disable_numparse=True,
                )
            )
        if self.notes:
            lines.append("")
            lines.extend(f"note: {n}" for n in self.notes)
        # layer names come from the model (or a file): shown, never interpreted
        return visible_lines("\n".join(lines))

    def __str__(self) -> str:
        return self.to_table()

    def __repr__(self) -> str:
        return f"<Recalibration: {self.headline()}>"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{value:.3g}"


def _ratio_text(row: dict[str, Any]) -> str:
    lo, hi = _num(row["min_var_ratio"]), _num(row["max_var_ratio"])
    return lo if lo == hi else f"{lo} to {hi}"


# ---- data ------------------------------------------------------------------------------------
def _shape_of(x: Any) -> str:
    shapes = [tuple(t.shape) for _, t in _tensors_in(x)]
    return ", ".join(str(s) for s in shapes) or "no tensor"


_INPUT_KEYS = ("input", "inputs", "x", "image", "images", "pixel_values", "data")


def _network_input(batch: Any, index: int, example: Any = None) -> Any:
    """The part of a batch the model takes (``x`` of ``(x, y)``), checked to be finite. With
    an ``example`` input, read as the audit reads ``data=`` batches against its example
    input (:func:`bncheck.probes._batch_to_input`)."""
    if example is not None:
        try:
            x = _batch_to_input(batch, example)
        except InputError as exc:
            raise UsageError(f"batch {index} of data: {exc}") from None
    elif isinstance(batch, torch.Tensor):
        x = batch
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    elif isinstance(batch, dict) and any(k in batch for k in _INPUT_KEYS):
        x = batch[next(k for k in _INPUT_KEYS if k in batch)]
    else:
        what = (
            f"a dict with keys {sorted(map(str, batch))}"
            if isinstance(batch, dict)
            else f"an empty {type(batch).__name__}"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise UsageError(
            f"batch {index} of data is {what}; yield tensors, (input, target) pairs or dicts "
            "with an 'input', 'x', 'image' or 'pixel_values' key"
        )
    tensors = list(_tensors_in(x))
    if not tensors:
        raise UsageError(
            f"batch {index} of data holds no tensor ({type(x).__name__}); yield the "
            "batches the model takes"
        )
    for where, t in tensors:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UsageError(
                f"batch {index} of data has {bad} NaN/Inf values ({where}, shape "
                f"{tuple(t.shape)}); statistics of non-finite data are not finite: clean "
                "or drop those batches"
            )
    return x


class _Batches:
    """The network inputs of ``data``, at most ``limit`` of them, validated as they come.

    A one-shot iterator (a generator) is read once and kept, so every pass sees the same
    batches; a re-iterable (a list, a DataLoader) is iterated again for each pass.
    """

    def __init__(self, data: Any, limit: int | None, example: Any = None) -> None:
        if isinstance(data, torch.Tensor):
            raise UsageError(
                "data must be an iterable of batches, got one tensor: wrap it in a list, [x]"
            )
        if isinstance(data, (str, bytes)) or data is None:
            raise UsageError(
                f"data must be an iterable of batches (a DataLoader, a list of tensors), got "
                f"{type(data).__name__}"
            )
        try:
            it = iter(data)
        except TypeError:
            raise UsageError(
                f"data must be an iterable of batches (a DataLoader, a list of tensors), "
                f"got {type(data).__name__}"
            ) from None
        self.limit = limit
        self.example = example
        self._kept: list[Any] | None = None
        self._data = data
        if it is data:  # one-shot: keep what this run uses
            self._kept = [_network_input(b, i, example) for i, b in enumerate(self._take(it))]

    def _take(self, it: Iterator[Any]) -> Iterator[Any]:
        for i, batch in enumerate(it):
            if self.limit is not None and i >= self.limit:
                return
            yield batch

    def __iter__(self) -> Iterator[Any]:
        if self._kept is not None:
            yield from self._kept
            return
        for i, batch in enumerate(self._take(iter(self._data))):
            yield _network_input(batch, i, self.example)

    def first(self) -> Any | None:
        return next(iter(self), None)


# ---- layer selection -------------------------------------------------------------------------
def _ineligible(layer: BNLayer) -> str | None:
    """Why ``layer``'s statistics cannot be recomputed by a train-mode pass, or None."""
    if not layer.has_running_stats:
        return "has no running statistics (track_running_stats=False): nothing to recompute"
    if layer.lazy_uninitialized:
        return "is an uninitialised lazy layer: run one forward pass first"
    if not isinstance(layer.module, _BatchNorm):
        return "keeps its statistics on purpose (it never normalises with batch statistics)"
    rm, rv = layer.running_mean, layer.running_var
    if rm is None or rv is None or rm.is_meta or rv.is_meta:
        return "has no values (meta device)"
    return None


def _patterns(layers: Any) -> list[str]:
    if isinstance(layers, str):
        parts = [p.strip() for p in layers.split(",")]
    elif isinstance(layers, Iterable):
        parts = []
        for item in layers:
            if not isinstance(item, str):
                raise UsageError(
                    f"layers= holds a {type(item).__name__}; give qualified layer names or "
                    "globs (strings), 'broken' or 'all'"
                )
            parts.append(item.strip())
    else:
        raise UsageError(
            f"layers= must be 'broken', 'all', or a list of layer names/globs, got "
            f"{type(layers).__name__}"
        )
    parts = [p for p in parts if p]
    if not parts:
        raise UsageError("layers= is empty; give 'broken', 'all' or layer names/globs")
    return parts


def _select_named(all_layers: list[BNLayer], patterns: list[str]) -> list[BNLayer]:
    names = [layer.name for layer in all_layers]
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise UsageError(
                f"layers= {pattern!r} matches no BN layer{did_you_mean(pattern, names)}; the "
                f"BN layers are {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
            )
        for name in matched:
            layer = all_layers[names.index(name)]
            why = _ineligible(layer)
            if why is not None and (pattern == name or not any(ch in pattern for ch in "*?[")):
                raise UsageError(f"layers= {name}: {layer.kind} {why}")
            if why is None:
                chosen.add(name)
        if not any(n in chosen for n in matched):
            raise UsageError(
                f"layers= {pattern!r} matches only layers whose statistics cannot be "
                f"recomputed ({', '.join(matched[:4])})"
            )
    return [layer for layer in all_layers if layer.name in chosen]


def _flagged(report: Report) -> dict[str, list[str]]:
    """Layer name -> the rules that flag it (buffer rules and stat-drift)."""
    out: dict[str, list[str]] = {}
    for f in report.findings:
        if f.rule not in AUDIT_RULES:
            continue
        covered = [f.layer] if f.layer is not None else list(f.details.get("layers", []))
        for name in covered:
            if f.rule not in out.setdefault(name, []):
                out[name].append(f.rule)
    return out


# ---- the audit -------------------------------------------------------------------------------
class _AsBatches:
    """The network inputs of :class:`_Batches` as one-element batches ``(input,)``, so that
    the audit's data pass takes each input whole (a tuple of inputs included)."""

    def __init__(self, batches: _Batches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Any]]:
        return ((inp,) for inp in self.batches)


def _audit(model: nn.Module, batches: _Batches, first: Any, source: str | None) -> Report:
    """The buffer rules and stat-drift over ``batches``, with the whole model in eval mode."""
    from .engine import audit

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        limit = batches.limit if batches.limit is not None else 2**31 - 1
        return audit(
            model,
            first,
            data=_AsBatches(batches),
            select=list(AUDIT_RULES),
            source=source,
            drift_max_batches=limit,
        )
    finally:
        for module, flag in modes:
            module.training = flag


# ---- the statistics pass ---------------------------------------------------------------------
class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch (float64).

    Batches are combined with Chan et al.'s pairwise update,
    ``M2 = M2_a + M2_b + delta^2 * n_a * n_b / n``, which gives the sum of squared deviations
    from the mean of all values without the cancellation of ``sum(x^2) - n * mean^2``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.calls = 0
        # per call, kept until collapse(): (values per channel, batch index, mean, unbiased var)
        self._calls: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    def add_batch(self, n: int, index: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Keep one call's batch mean and unbiased variance (copies; reduced later)."""
        self._calls.append((n, index, mean.detach().clone(), var.detach().clone()))

    def add_input(self, x: torch.Tensor, index: int) -> None:
        """Keep the statistics of one BN input (N, C, ...), reduced here."""
        x = x.detach()
        if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        n = x.numel() // max(1, x.shape[1])
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
        self._calls.append((n, index, mean, var))

    def collapse(self) -> int | None:
        """Merge the kept calls into the totals; the batch index of a non-finite call, or None.

        All calls at once, in float64: ``mean = sum(n_k m_k) / N`` and
        ``M2 = sum((n_k - 1) v_k) + sum(n_k (m_k - mean)^2)`` (deviations only, no
        cancellation), then merged into the running totals.
        """
        if not self._calls:
            return None
        counts = torch.tensor([c[0] for c in self._calls], dtype=torch.float64)
        means = torch.stack([c[2] for c in self._calls]).double()
        variances = torch.stack([c[3] for c in self._calls]).double()
        finite = torch.isfinite(means).all(1) & torch.isfinite(variances).all(1)
        if not bool(finite.all()):
            return self._calls[int((~finite).nonzero()[0, 0])][1]
        counts = counts.to(means.device)
        total = float(counts.sum())
        mean = (counts[:, None] * means).sum(0) / total
        m2 = ((counts - 1)[:, None] * variances).sum(0)
        m2 = m2 + (counts[:, None] * (means - mean) ** 2).sum(0)
        calls = len(self._calls)
        self._calls = []
        self.merge(int(total), mean, m2)
        self.calls += calls
        return None

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
        if self.mean is None or self.m2 is None or self.n == 0:
            self.n, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total


def _call(model: nn.Module, x: Any) -> Any:
    """Call ``model`` on a batch's network input: a dict as keyword arguments, a tuple or a
    list as positional arguments (a DataLoader collates a sample's inputs into a list)."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _statistics_pass(
    model: nn.Module, selected: list[BNLayer], batches: _Batches
) -> tuple[dict[str, _Moments], int]:
    """One forward pass per batch; returns the moments of each selected layer's input.

    The batch statistics are those the layer computes itself: during the pass its momentum
    is 1, so after each train-mode call ``running_mean`` is that batch's mean and
    ``running_var`` its unbiased variance (C numbers read per call, no extra pass over the
    activations). A layer whose call leaves ``num_batches_tracked`` alone (a subclass that
    does not update its statistics) has its input reduced by a hook instead.
    """
    moments = {layer.name: _Moments() for layer in selected}
    # layer -> (values per channel, num_batches_tracked before, the input while unchecked)
    pending: dict[str, tuple[int, int, torch.Tensor | None]] = {}
    direct: set[str] = set()  # layers whose inputs are reduced by the hook
    checked: set[str] = set()  # layers seen to update their statistics
    index = 0

    def pre_for(layer: BNLayer) -> Callable[..., None]:
        name = layer.name

        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            t = _first_tensor(args)
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                return
            if name in direct:
                moments[name].add_input(t, index)
            elif name in checked:
                pending[name] = (t.numel() // max(1, t.shape[1]), 0, None)
            else:
                nbt = layer.num_batches_tracked
                before = int(nbt) if isinstance(nbt, torch.Tensor) else -1
                pending[name] = (t.numel() // max(1, t.shape[1]), before, t)

        return pre

    def post_for(layer: BNLayer) -> Callable[..., None]:
        name = layer.name

        def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if name not in pending:
                return
            n, before, first = pending.pop(name)
            if first is not None:  # the first call: did the layer update its statistics?
                nbt = layer.num_batches_tracked
                if not isinstance(nbt, torch.Tensor) or before < 0 or int(nbt) != before + 1:
                    direct.add(name)
                    moments[name].add_input(first, index)
                    return
                checked.add(name)
            rm, rv = layer.running_mean, layer.running_var
            assert rm is not None and rv is not None
            moments[name].add_batch(n, index, rm, rv)

        return post

    model.eval()
    momenta: dict[str, Any] = {}
    for layer in selected:
        layer.module.train()
        momenta[layer.name] = layer.module.momentum
        layer.module.momentum = 1.0  # type: ignore[assignment]
        with torch.no_grad():  # (1 - momentum) * NaN would still be NaN
            for buf, value in ((layer.running_mean, 0.0), (layer.running_var, 1.0)):
                if buf is not None:
                    buf.fill_(value)
    handles = []
    for layer in selected:
        handles.append(layer.module.register_forward_pre_hook(pre_for(layer)))
        handles.append(layer.module.register_forward_hook(post_for(layer)))
    count = 0
    call = _call if batches.example is None else _call_as_audited
    try:
        with torch.no_grad():
            for index, x in enumerate(batches):  # noqa: B007 - the hooks read index
                try:
                    call(model, x)
                except BNCheckError:
                    raise
                except Exception as exc:
                    raise UsageError(
                        f"the model's forward failed on batch {index} of data (input shape "
                        f"{_shape_of(x)}) with the recomputed layers in train mode: "
                        f"{first_line(exc)}"
                    ) from exc
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        for layer in selected:
            layer.module.momentum = momenta[layer.name]
    for layer in selected:  # in model order: the first non-finite layer is the cause
        where = moments[layer.name].collapse()
        if where is not None:
            raise UsageError(
                f"the input of {layer.name} is not finite in batch {where} of data: a layer "
                "before it has non-finite weights or statistics; recalibrate that layer "
                "too (layers='broken' or 'all') or fix its weights"
            )
    return moments, count


# ---- torch.distributed -----------------------------------------------------------------------
def _dist_world() -> tuple[int, int] | None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def _sync_error(error: BaseException | None, has_data: bool = True) -> None:
    """Collective: raise on every rank when any rank failed (so none waits forever), or
    when no rank has a batch."""
    import torch.distributed as dist

    flags: list[Any] = [None] * dist.get_world_size()
    text = None if error is None else str(error).strip().splitlines()[0]
    dist.all_gather_object(flags, (text, has_data))
    if error is not None:
        raise error
    failed = [(rank, t) for rank, (t, _) in enumerate(flags) if t is not None]
    if failed:
        rank, t = failed[0]
        raise UsageError(f"recalibration failed on rank {rank}: {t}")
    if not any(d for _, d in flags):
        raise UsageError("data yielded no batch on any rank; give at least one batch")


def _sync_selection(names: list[str], order: list[str]) -> list[str]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    union = {n for part in gathered for n in part}
    return [n for n in order if n in union]


def _all_reduce_moments(moments: dict[str, _Moments], selected: list[BNLayer], batches: int) -> int:
    """Merge every rank's moments into identical totals on every rank; returns all batches."""
    import torch.distributed as dist

    parts = []
    for layer in selected:
        m = moments[layer.name]
        c = int(layer.num_features or layer.running_mean.numel())  # type: ignore[union-attr]
        mean = m.mean if m.mean is not None else torch.zeros(c, dtype=torch.float64)
        m2 = m.m2 if m.m2 is not None else torch.zeros(c, dtype=torch.float64)
        parts.append(torch.tensor([float(m.n), float(m.calls)], dtype=torch.float64))
        parts += [mean.detach().cpu(), m2.detach().cpu()]
    parts.append(torch.tensor([float(batches)], dtype=torch.float64))
    local = torch.cat(parts)
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    sendable = local.to(device) if device is not None else local
    gathered = [torch.empty_like(sendable) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sendable)
    total_batches = 0
    merged: dict[str, _Moments] = {layer.name: _Moments() for layer in selected}
    for flat in gathered:  # rank order: the same arithmetic on every rank
        flat = flat.cpu()
        at = 0
        for layer in selected:
            c = int(layer.num_features or layer.running_mean.numel())  # type: ignore[union-attr]
            n, calls = int(flat[at].item()), int(flat[at + 1].item())
            mean, m2 = flat[at + 2 : at + 2 + c], flat[at + 2 + c : at + 2 + 2 * c]
            at += 2 + 2 * c
            merged[layer.name].merge(n, mean, m2)
            merged[layer.name].calls += calls
        total_batches += int(flat[at].item())
    for name, m in merged.items():
        moments[name].n, moments[name].mean, moments[name].m2 = m.n, m.mean, m.m2
        moments[name].calls = m.calls
    return total_batches


# ---- writing ---------------------------------------------------------------------------------
def _old_stats(layer: BNLayer) -> tuple[torch.Tensor, torch.Tensor]:
    rm, rv = layer.running_mean, layer.running_var
    assert rm is not None and rv is not None
    return rm.detach().double().cpu().clone(), rv.detach().double().cpu().clone()


def _change_row(
    layer: BNLayer,
    reason: str,
    old: tuple[torch.Tensor, torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    m: _Moments,
) -> dict[str, Any]:
    old_mean, old_var = old
    eps = layer.eps if layer.eps is not None and layer.eps > 0 else 1e-5
    nonfinite = ~(torch.isfinite(old_mean) & torch.isfinite(old_var))
    new_mean, new_var = mean.double().cpu(), var.double().cpu()
    shift = (old_mean - new_mean).abs() / (new_var + eps).sqrt()
    ratio = (old_var + eps) / (new_var + eps)
    finite = ~nonfinite
    if bool(finite.any()):
        s, r = shift[finite], ratio[finite]
        stats = (float(s.max()), float(s.median()), float(r.min()), float(r.max()))
    else:
        stats = (math.nan, math.nan, math.nan, math.nan)
    return {
        "layer": layer.name,
        "kind": layer.kind,
        "reason": reason,
        "channels": int(new_mean.numel()),
        "batches": int(m.calls),
        "values_per_channel": int(m.n),
        "nonfinite_channels": int(nonfinite.sum()),
        "max_mean_shift": stats[0],
        "median_mean_shift": stats[1],
        "min_var_ratio": stats[2],
        "max_var_ratio": stats[3],
    }


def _write(layer: BNLayer, mean: torch.Tensor, var: torch.Tensor, calls: int) -> None:
    rm, rv, nbt = layer.running_mean, layer.running_var, layer.num_batches_tracked
    assert rm is not None and rv is not None
    with torch.no_grad():
        rm.copy_(mean.to(device=rm.device, dtype=rm.dtype))
        rv.copy_(var.to(device=rv.device, dtype=rv.dtype))
        if isinstance(nbt, torch.Tensor):
            nbt.fill_(calls)


# ---- evaluate --------------------------------------------------------------------------------
def _restore(state: ModelState) -> None:
    """Put back modes, parameters and buffers by value (a train-mode BN forward updates its
    running statistics without bumping version counters), grads and ``requires_grad``."""
    state.restore()


def _evaluate(evaluate: Callable[[nn.Module], Any] | None, model: nn.Module) -> float | None:
    """``evaluate(model)`` as a float; the model's modes, buffers and the RNG are put back."""
    if evaluate is None:
        return None
    state = ModelState.capture(model)
    rng = RNGState.capture()
    try:
        value = evaluate(model)
    finally:
        _restore(state)
        rng.restore()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(
            f"evaluate(model) returned a {type(value).__name__}; it must return a number "
            "(e.g. the accuracy on held-out data)"
        ) from None


# ---- entry point -----------------------------------------------------------------------------
def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    layers: str | Sequence[str] = "broken",
    max_batches: int | None = None,
    evaluate: Callable[[nn.Module], Any] | None = None,
    inplace: bool = False,
    example_input: Any = None,
) -> Recalibration:
    """Recompute the running statistics of BN layers from ``data``, and verify the result.

    Args:
        model: the model (DDP/DataParallel wrappers are looked through). Never changed,
            unless ``inplace=True``: the work is done on ``copy.deepcopy(model)``, returned
            as ``result.model``.
        data: an iterable of batches (a DataLoader, a list): tensors, ``(input, target)``
            tuples/lists (the first element is fed to the model) or dicts with an ``input``,
            ``x``, ``image`` or ``pixel_values`` key. A one-shot iterator is read once and
            its batches kept in memory; a re-iterable is iterated once per pass (three
            passes: the audit before, the statistics, the audit after).
        layers: ``"broken"`` (default): the layers the audit flags (``nonfinite-stats``,
            ``negative-running-var``, ``tiny-running-var``, ``untrained-stats``,
            ``stat-drift``); ``"all"``: every BN layer with running statistics; or a list
            of qualified names or globs (``"features.*"``), or one comma-separated string.
        max_batches: use at most this many batches of ``data``.
        evaluate: ``evaluate(model) -> float`` (e.g. held-out accuracy), called on the model
            before and on the result after; both values are shown. It runs with the model's
            modes, buffers and the RNG restored afterwards.
        inplace: recompute in ``model`` itself instead of a copy.
        example_input: an input the model takes, as :func:`bncheck.audit` takes it (a
            detector's list of images, a multi-input model's tuple). Batches of ``data``
            are then read the way the audit reads ``data=`` batches against its example
            input, and the model is called the way the audit calls it: torchvision's
            detection collate (a tuple of images and a tuple of targets) feeds the images as
            a list; a DataLoader's list of a two-input model's inputs is the two arguments.
            Without it, the first element of a tuple or list batch is fed, and a tuple or
            list input is taken as positional arguments.

    Estimator: for each recomputed layer, the exact population statistics of its input over
    all the batches given: with per-channel counts ``n_i``, batch means ``m_i`` and unbiased
    batch variances ``v_i``, the mean is ``sum(n_i m_i) / N`` with ``N = sum(n_i)`` (the mean
    of the batch means weighted by their value counts, i.e. the mean over all values) and the
    variance ``M2 / (N - 1)`` with ``M2 = sum((n_i - 1) v_i) + sum(n_i (m_i - mean)^2)``, the
    pooled sum of squared deviations (float64, no cancellation), i.e. the unbiased variance
    over all values, as PyTorch keeps ``running_var``. ``num_batches_tracked`` is set to the
    number of batches each layer saw; ``momentum`` is left as it was: with ``momentum=None``
    (PyTorch's cumulative average, weight ``1 / num_batches_tracked``) further training
    continues the average as if these batches had been its first ones.

    How the pass runs: under ``torch.no_grad()``, one forward per batch, with the model in
    eval mode (dropout off, BN layers not recomputed use their statistics) and the recomputed
    layers in train mode; each call's batch statistics are read from the layer's own update
    (its momentum is 1 during the pass and restored after), so no activation is reduced
    twice. A recomputed layer normalises each batch with that batch's statistics, so a layer
    downstream of it sees activations normalised with batch statistics, not with the final
    population statistics: the procedure of ``torch.optim.swa_utils.update_bn`` and fvcore's
    precise BN, one pass over the data in all. Recomputing layer by layer in eval mode with
    the new statistics of the layers before would match inference exactly but cost one pass
    per layer; the difference is the sampling noise of a batch's mean and variance (order
    ``1 / sqrt(values per channel in a batch)``), and the ``stat-drift`` audit afterwards
    measures what is left against the data in eval mode. With ``layers="broken"`` the goal
    is an audit that passes: a layer the first audit could not judge (its input was NaN
    behind a broken layer) is recomputed in a further pass when the audit after flags it, and
    a recomputed layer still flagged by ``stat-drift`` is recomputed again with the layers
    before it now in eval mode (at most three passes). Parameters are never written.

    Under ``torch.distributed`` (initialised, more than one rank) the layers to recompute
    are the union over ranks, and the per-rank moments are all-gathered and merged in rank
    order, so every rank ends with identical statistics over all shards. Every rank must
    call it.

    Returns:
        a :class:`Recalibration`: ``model``, ``before``, ``after``, ``changes`` (a DataFrame
        per recomputed layer), ``metric_before``/``metric_after``, ``ok``.

    Raises:
        UsageError: data with NaN/Inf, batches the model cannot take, an empty iterable, a
            model without BN (also a NoBatchNormError), unknown layer names. Nothing is
            changed then: not the model (even with ``inplace=True``), not the RNG states.
    """
    import pandas as pd

    if not isinstance(model, nn.Module):
        raise UsageError(
            f"recalibrate needs a torch.nn.Module, got {type(model).__name__}; load the model "
            "first (for a file, use `bncheck recalibrate PATH --arch ...`)"
        )
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise UsageError(f"max_batches must be a positive integer or None, got {max_batches!r}")
    if evaluate is not None and not callable(evaluate):
        raise UsageError(
            f"evaluate must be a callable evaluate(model) -> float, got {type(evaluate).__name__}"
        )
    if not isinstance(inplace, bool):
        raise UsageError(f"inplace must be True or False, got {inplace!r}")
    mode = layers if isinstance(layers, str) and layers in ("broken", "all") else None
    patterns = None if mode is not None else _patterns(layers)

    inner = unwrap_model(model)
    all_layers = find_bn_layers(inner)
    if not all_layers:
        raise _NoBatchNorm(
            f"{type(inner).__name__} has no BatchNorm layer, so there are no statistics to "
            "recalibrate"
        )
    if patterns is not None:
        _select_named(all_layers, patterns)  # fail fast, before any pass over the data

    rng = RNGState.capture()
    try:
        if inplace:
            work = inner
        else:
            try:
                work = copy.deepcopy(inner)
            except Exception as exc:
                raise UsageError(
                    f"cannot copy the model ({first_line(exc)}); pass inplace=True to "
                    "recalibrate it in place"
                ) from exc
        return _run(work, data, mode, patterns, max_batches, evaluate, inner, pd, example_input)
    finally:
        rng.restore()


#: Passes at most: a layer whose input was non-finite before (behind a NaN layer) can only be
#: judged once the layers before it are repaired, and a layer recomputed while the layers
#: before it normalised with batch statistics may need a second look (see ``_choose``).
MAX_ROUNDS = 3


def _listed(names: list[str], limit: int = 4) -> str:
    head = ", ".join(names[:limit])
    return head + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _choose(
    all_layers: list[BNLayer],
    report: Report,
    mode: str | None,
    patterns: list[str] | None,
    done: set[str],
    round_: int,
    notes: list[str],
) -> tuple[list[BNLayer], dict[str, str]]:
    """The layers to recompute in this round and why.

    The first round takes what ``layers=`` says. With ``"broken"``, later rounds take the
    layers the audit after the previous round flags: a layer it could not judge before
    (behind a NaN layer), or, flagged by ``stat-drift`` again, a layer recomputed while the
    layers before it normalised with batch statistics (refined now that they use their new
    statistics). ``"all"`` and named layers get the one pass the estimator describes.
    """
    flagged = _flagged(report)
    if patterns is not None:
        allowed = _select_named(all_layers, patterns)
    else:
        allowed = []
        left: dict[str, list[str]] = {}
        for layer in all_layers:
            why = _ineligible(layer)
            if why is None:
                allowed.append(layer)
            elif mode == "all" or (layer.name in flagged and mode == "broken"):
                left.setdefault(f"{layer.kind} {why}", []).append(layer.name)
        for why, names in left.items():
            note = f"{_listed(names)} not recomputed: {why}"
            if note not in notes:
                notes.append(note)
    if round_ == 0 and mode != "broken":
        reasons = {
            layer.name: ", ".join(flagged.get(layer.name, [])) or ("all" if mode else "requested")
            for layer in allowed
        }
        return allowed, reasons
    chosen, reasons = [], {}
    for layer in allowed:
        rules = flagged.get(layer.name, [])
        if layer.name in done:
            rules = [r for r in rules if r == "stat-drift"]  # what another pass can improve
        if rules:
            chosen.append(layer)
            reasons[layer.name] = ", ".join(rules)
    return chosen, reasons


def _run(
    work: nn.Module,
    data: Any,
    mode: str | None,
    patterns: list[str] | None,
    max_batches: int | None,
    evaluate: Callable[[nn.Module], Any] | None,
    original: nn.Module,
    pd: Any,
    example: Any = None,
) -> Recalibration:
    all_layers = find_bn_layers(work)
    state = ModelState.capture(work)
    notes: list[str] = []
    world = _dist_world()
    try:
        error: BaseException | None = None
        first: Any = None
        try:
            batches = _Batches(data, max_batches, example)
            first = batches.first()
            if first is None and world is None:
                raise UsageError(
                    "data yielded no batch; give at least one batch (a few hundred "
                    "samples are typical)"
                )
        except BNCheckError as exc:
            error = exc
        if world is not None:
            _sync_error(error, first is not None)
        elif error is not None:
            raise error
        metric_before = _evaluate(evaluate, original)
        order = [layer.name for layer in all_layers]

        def audit_now() -> Report:
            if first is None:  # an empty shard under torch.distributed
                return Report(layers=order)
            return _audit(work, batches, first, None)

        before = after = audit_now()
        rows: dict[str, dict[str, Any]] = {}
        total_batches = 0
        first_old: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for round_ in range(MAX_ROUNDS if mode == "broken" else 1):
            chosen, reasons = _choose(all_layers, after, mode, patterns, set(rows), round_, notes)
            if world is not None:
                names = set(_sync_selection([layer.name for layer in chosen], order))
                chosen = [layer for layer in all_layers if layer.name in names]
                for layer in chosen:
                    reasons.setdefault(layer.name, "flagged on another rank")
            if not chosen:
                break
            new = [layer.name for layer in chosen if layer.name not in rows]
            again = [layer.name for layer in chosen if layer.name in rows]
            if round_ > 0 and new:
                notes.append(
                    f"pass {round_ + 1} recomputed {_listed(new)}: the audit could judge "
                    f"{'them' if len(new) > 1 else 'it'} only once the layers before were "
                    "repaired"
                )
            if again:
                notes.append(
                    f"pass {round_ + 1} refined {_listed(again)} (still off the data in "
                    "eval mode after a pass in which the layers before normalised with "
                    "batch statistics)"
                )
            frozen = [layer.name for layer in chosen if layer.frozen_by_design]
            if frozen:
                notes.append(
                    f"recomputed {len(frozen)} layer(s) that look frozen on purpose (eval "
                    f"mode, parameters not trainable): {', '.join(frozen[:4])}; their old "
                    "statistics were part of the model (see docs/recalibrate.md)"
                )
            for layer in chosen:
                first_old.setdefault(layer.name, _old_stats(layer))
            error = None
            moments: dict[str, _Moments] = {}
            count = 0
            try:
                moments, count = _statistics_pass(work, chosen, batches)
            except BNCheckError as exc:
                error = exc
            if world is not None:
                _sync_error(error)
                count = _all_reduce_moments(moments, chosen, count)
            elif error is not None:
                raise error
            total_batches = max(total_batches, count)
            for module, flag in state.training:  # back to the model's own modes
                module.training = flag
            for layer in chosen:
                m = moments[layer.name]
                if m.n < 2 or m.mean is None or m.m2 is None:
                    notes.append(
                        f"{layer.name} not recomputed: the forward passes "
                        + ("never reached it" if m.n == 0 else "gave it one value per channel")
                    )
                    continue
                mean, var = m.mean, m.m2 / (m.n - 1)
                if layer.name in rows:
                    reason = (
                        rows[layer.name]["reason"].split(" (")[0] + f" (refined, pass {round_ + 1})"
                    )
                else:
                    reason = reasons[layer.name] + (f" (pass {round_ + 1})" if round_ else "")
                rows[layer.name] = _change_row(layer, reason, first_old[layer.name], mean, var, m)
                _write(layer, mean, var, m.calls)
            after = audit_now()
        if not rows:
            notes.append("no BN layer needed recomputing: the statistics fit the data")
        for module, flag in state.training:
            module.training = flag
        metric_after = _evaluate(evaluate, work) if evaluate is not None else None
    except BaseException:
        _restore(state)
        raise
    if world is not None:
        notes.append(
            f"torch.distributed: statistics merged over {world[1]} ranks; the audits "
            "judge this rank's data"
        )
    ordered = [rows[name] for name in order if name in rows]
    return Recalibration(
        model=work,
        before=before,
        after=after,
        changes=pd.DataFrame(ordered, columns=_CHANGE_COLUMNS),
        layers=[row["layer"] for row in ordered],
        batches=total_batches,
        metric_before=metric_before,
        metric_after=metric_after,
        notes=notes,
    )

"""Check functions of the rules that read only the model, its buffers and the optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..context import AuditContext
from ..discovery import BNLayer
from ..render import layer_list
from ..report import Finding
from .registry import check

__all__ = [
    "channel_list",
    "stats_at_init",
    "stats_at_initial_values",
    "is_trained",
    "batch_stats_in_eval",
    "statistics_never_move",
    "no_running_stats_note",
]


def channel_list(mask: torch.Tensor, limit: int = 3) -> str:
    """``channels 3, 17, +2`` for a boolean per-channel mask."""
    idx = torch.nonzero(mask.flatten(), as_tuple=False).flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:limit])
    more = f", +{len(idx) - limit}" if len(idx) > limit else ""
    return f"channel{'s' if len(idx) != 1 else ''} {shown}{more}"


def _indices(mask: torch.Tensor, limit: int = 32) -> list[int]:
    return torch.nonzero(mask.flatten(), as_tuple=False).flatten()[:limit].tolist()


def _usable(layers: Sequence[BNLayer]) -> Iterator[BNLayer]:
    """The layers whose tensors hold values: not uninitialised lazy layers, not layers on
    the meta device (structure only; the audit skips the buffer rules for a model on it, a
    run report judges the other layers)."""
    for layer in layers:
        if not layer.lazy_uninitialized and not layer.on_meta:
            yield layer


def _configured(layers: Sequence[BNLayer]) -> Iterator[BNLayer]:
    """The layers whose settings are known (all but uninitialised lazy layers): the settings
    rules judge layers on the meta device too (a structure-only template keeps them)."""
    return (layer for layer in layers if not layer.lazy_uninitialized)


def layers_where(
    layers: Sequence[BNLayer], name: str, test: Callable[[torch.Tensor], torch.Tensor]
) -> set[str]:
    """Names of the layers whose tensor ``name`` (``running_var``, ``weight``...) has an
    element where the elementwise ``test`` holds: one evaluation over the tensors of all
    layers at once (per device and dtype), so that rules that usually find nothing cost a few
    ops, not a few per layer."""
    groups: dict[tuple[Any, Any], list[tuple[str, torch.Tensor]]] = {}
    for layer in layers:
        t = getattr(layer, name)
        if isinstance(t, torch.Tensor) and t.numel() and not t.is_meta:
            groups.setdefault((t.device, t.dtype), []).append((layer.name, t.detach().reshape(-1)))
    hits: set[str] = set()
    with torch.no_grad():
        for members in groups.values():
            mask = test(torch.cat([t for _, t in members]))
            if not bool(mask.any()):
                continue
            for (layer_name, _), part in zip(members, mask.split([t.numel() for _, t in members])):
                if bool(part.any()):
                    hits.add(layer_name)
    return hits


def _tested_in_batch(layer: BNLayer) -> bool:
    """Whether :func:`layers_where` read the layer's running statistics (real, non-empty
    tensors), so that "not in its result" means "at the tested values"."""
    return all(
        isinstance(t, torch.Tensor) and t.numel() > 0 and not t.is_meta
        for t in (layer.running_mean, layer.running_var)
    )


def stats_at_initial_values(layer: BNLayer) -> bool:
    """running_mean all 0 and running_var all 1 (PyTorch's initial values), whatever the
    counter says."""
    rm, rv = layer.running_mean, layer.running_var
    if rm is None or rv is None:
        return False
    with torch.no_grad():
        return bool((rm == 0).all()) and bool((rv == 1).all())


def stats_at_init(layer: BNLayer) -> bool:
    """Running statistics exactly at PyTorch's initial values (mean 0, var 1, counter 0)."""
    nbt = layer.num_batches_tracked
    if nbt is not None and int(nbt.reshape(-1)[0]) != 0:
        return False
    return stats_at_initial_values(layer)


def statistics_never_move(layer: BNLayer) -> bool:
    """``momentum == 0`` on a layer that tracks running statistics: train-mode forwards count
    (num_batches_tracked) but never change running_mean/running_var."""
    return layer.momentum == 0 and layer.has_running_stats and layer.track_running_stats


def batch_stats_in_eval(layer: BNLayer) -> bool:
    """A standard BN layer built with ``track_running_stats=False``: it has no running
    statistics, so eval mode normalises with the batch's statistics by design.

    ``no-running-stats`` reports that setting; ``eval-batch-dependence`` calls this to leave
    the batch dependence it causes to it (one setting, one finding).
    """
    return layer.standard and not layer.has_running_stats


def no_running_stats_note(layer: BNLayer, rule_id: str) -> str:
    """The note a rule leaves when it does not report what ``no-running-stats`` explains."""
    return (
        f"{rule_id}: {layer.name} normalises with batch statistics in eval mode because it was "
        "built with track_running_stats=False; reported once, as no-running-stats (layers "
        "after it were not judged)"
    )


def _affine_at_init(layer: BNLayer) -> bool:
    w, b = layer.weight, layer.bias
    with torch.no_grad():
        return (w is None or bool((w == 1).all())) and (b is None or bool((b == 0).all()))


def is_trained(layer: BNLayer) -> bool:
    """Evidence the layer saw training: an updated counter or moved running statistics.

    gamma/beta away from 1/0 are no evidence: ``zero_init_residual`` and custom initialisations
    (e.g. N(1, 0.02)) set them before any training. A layer without running statistics counts
    as trained when its gamma/beta moved, the only evidence it has.
    """
    nbt = layer.num_batches_tracked
    if nbt is not None and int(nbt.reshape(-1)[0]) > 0:
        return True
    if layer.has_running_stats:
        return not stats_at_init(layer)
    return not _affine_at_init(layer)


@check("keras-momentum")
def keras_momentum(ctx: AuditContext) -> Iterator[Finding]:
    limit = ctx.tol("momentum_max")
    for layer in _configured(ctx.layers):
        m = layer.momentum
        if m is None or not layer.has_running_stats or m <= limit:
            continue
        yield ctx.finding(
            "keras-momentum",
            layer,
            f"momentum = {m:g} > {limit:g}: each update keeps only {1 - m:.0%} of the running "
            f"statistics (PyTorch: new = (1 - momentum) * old + momentum * batch)",
            hint=f"if this is a Keras/TF value, use momentum={1 - m:.3g} (= 1 - {m:g})",
            momentum=m,
            limit=limit,
            suggested=1 - m,
        )


@check("invalid-eps")
def invalid_eps(ctx: AuditContext) -> Iterator[Finding]:
    for layer in _configured(ctx.layers):
        eps = layer.eps
        if eps is None or (math.isfinite(eps) and eps > 0):
            continue
        yield ctx.finding(
            "invalid-eps",
            layer,
            f"eps = {eps!r}, expected a finite value > 0 (it keeps 1/sqrt(var + eps) finite)",
            hint="use eps=1e-5 (PyTorch's default) or 1e-3 (Keras/TF's)",
            eps=eps,
        )


@check("no-running-stats")
def no_running_stats(ctx: AuditContext) -> Iterator[Finding]:
    for layer in _configured(ctx.layers):
        if not layer.standard:
            continue
        if layer.has_running_stats and layer.track_running_stats:
            continue
        if layer.has_running_stats:
            text = (
                "track_running_stats was set to False after construction: train mode uses "
                "batch statistics without updating the buffers, eval mode uses the stale "
                "buffers"
            )
            hint = "construct the layer with the setting you want instead of flipping it"
        else:
            text = (
                "track_running_stats=False: there are no running statistics, so eval mode "
                "normalises with the statistics of each eval batch"
            )
            hint = (
                "use track_running_stats=True unless batch statistics at inference are "
                "intended; silence with ignore=['no-running-stats']"
            )
        yield ctx.finding(
            "no-running-stats", layer, text, hint=hint, has_buffers=layer.has_running_stats
        )


def _in_optimizer(ctx: AuditContext, layer: BNLayer) -> bool | None:
    if ctx.optimizer is None:
        return None
    ids = {id(p) for group in ctx.optimizer.param_groups for p in group["params"]}
    return any(id(p) in ids for p in layer.params)


@check("frozen-bn-in-train-mode")
def frozen_bn_in_train_mode(ctx: AuditContext) -> Iterator[Finding]:
    # in a training run's report: layers the run showed to be a moving-average copy (their
    # gamma/beta changed without the optimizer) are not frozen (the Monitor's note says so)
    run = ctx.run
    moving = (
        {run.layer_names[i] for i in run.moving_copies}
        if run is not None and getattr(run, "moving_copies", None)
        else set()
    )
    for layer in _usable(ctx.layers):
        if not layer.module.training or not layer.params or not layer.has_running_stats:
            continue
        if layer.name in moving:
            continue
        if not layer.track_running_stats or layer.momentum == 0:
            continue
        frozen = layer.params_frozen
        optimized = _in_optimizer(ctx, layer)
        if not frozen and optimized is not False:
            continue
        why = (
            "gamma/beta have requires_grad=False"
            if frozen
            else "gamma/beta are in no optimizer param group"
        )
        yield ctx.finding(
            "frozen-bn-in-train-mode",
            layer,
            f"{why} but the layer is in train mode, so every forward still rewrites "
            "running_mean/running_var",
            hint="call .eval() on frozen BN layers after every model.train(), or use a "
            "FrozenBatchNorm layer",
            requires_grad=not frozen,
            in_optimizer=optimized,
        )


def _nonfinite_mask(t: torch.Tensor) -> torch.Tensor:
    """NaN/Inf elements of a floating tensor (none in any other)."""
    if not t.is_floating_point():
        return torch.zeros_like(t, dtype=torch.bool)
    return ~torch.isfinite(t.detach())


def _nonfinite(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or not t.is_floating_point():
        return None
    with torch.no_grad():
        bad = _nonfinite_mask(t)
    return bad if bool(bad.any()) else None


@check("nonfinite-stats")
def nonfinite_stats(ctx: AuditContext) -> Iterator[Finding]:
    usable = list(_usable(ctx.layers))
    suspects: set[str] = set()
    for name in ("running_mean", "running_var", "weight", "bias"):
        suspects |= layers_where(usable, name, _nonfinite_mask)
    for layer in usable:
        if layer.name not in suspects:
            continue
        parts = []
        details: dict[str, Any] = {}
        for name in ("running_mean", "running_var", "weight", "bias"):
            bad = _nonfinite(getattr(layer, name))
            if bad is not None:
                parts.append(f"{name} ({channel_list(bad)})")
                details[name] = _indices(bad)
        if parts:
            yield ctx.finding(
                "nonfinite-stats",
                layer,
                f"NaN/Inf in {'; '.join(parts)}; every output of those channels is NaN",
                hint="look for fp16 overflow or a skipped AMP step before the last update; "
                "recompute the statistics (torch.optim.swa_utils.update_bn) or reload them",
                **details,
            )


@check("negative-running-var")
def negative_running_var(ctx: AuditContext) -> Iterator[Finding]:
    usable = list(_usable(ctx.layers))
    suspects = layers_where(usable, "running_var", lambda t: t < 0)
    for layer in usable:
        if layer.name not in suspects:
            continue
        rv = layer.running_var
        if rv is None:
            continue
        with torch.no_grad():
            neg = rv.detach() < 0
        if bool(neg.any()):
            yield ctx.finding(
                "negative-running-var",
                layer,
                f"running_var < 0 in {channel_list(neg)} (min {float(rv.min()):.3g}); a "
                "variance cannot be negative, and sqrt(var + eps) is NaN there",
                hint="the buffer was corrupted or written by hand; recompute the statistics",
                channels=_indices(neg),
                min=float(rv.min()),
            )


#: ``tiny-running-var`` flags a channel whose running_var is at most eps and also at most this
#: fraction of eps (a constant feature) or of the layer's median running_var (a collapsed one).
TINY_VAR_ABS = 0.01
TINY_VAR_REL = 0.01


@check("tiny-running-var")
def tiny_running_var(ctx: AuditContext) -> Iterator[Finding]:
    usable = list(_usable(ctx.layers))
    largest_eps = max((lyr.eps for lyr in usable if lyr.eps is not None), default=0.0)
    # a channel can be tiny only if its running_var is at most some layer's eps
    suspects = layers_where(usable, "running_var", lambda t: t <= largest_eps)
    for layer in usable:
        if layer.name not in suspects:
            continue
        rv = layer.running_var
        if rv is None or layer.eps is None or layer.eps <= 0:
            continue
        with torch.no_grad():
            var = rv.detach().double()
            below = (var >= 0) & (var <= layer.eps)
            # below eps is harmful only for a channel that is (nearly) constant or collapsed
            # next to its siblings: a whole layer spread smoothly below eps (small depthwise
            # weights from the init) is normalised by the same sqrt(var + eps) in training
            finite = var[torch.isfinite(var)]
            median = float(finite.median()) if finite.numel() else 0.0
            tiny = below & ((var <= TINY_VAR_ABS * layer.eps) | (var <= TINY_VAR_REL * median))
        if bool(tiny.any()):
            yield ctx.finding(
                "tiny-running-var",
                layer,
                f"running_var <= eps = {layer.eps:g} in {channel_list(tiny)} of "
                f"{rv.numel()}: eval divides by about sqrt(eps) there, amplifying noise",
                hint="those channels' inputs were (nearly) constant in training; check for dead "
                "units upstream or recompute statistics on real data",
                channels=_indices(tiny),
                count=int(tiny.sum()),
                eps=layer.eps,
            )


@check("untrained-stats")
def untrained_stats(ctx: AuditContext) -> Iterator[Finding]:
    missing = ctx.facts.missing_buffers  # statistics the checkpoint did not hold
    if missing:
        yield from _missing_stats(ctx, missing)
    hits = []
    frozen_at_init = []
    usable = list(_usable(ctx.layers))
    # both cases below need statistics at their initial values (mean 0, var 1)
    moved = layers_where(usable, "running_mean", lambda t: t != 0) | layers_where(
        usable, "running_var", lambda t: t != 1
    )
    # the counters and gamma/beta in batch too (an untrained model: every layer gets here)
    counted = layers_where(usable, "num_batches_tracked", lambda t: t != 0)
    candidates: list[BNLayer] = []
    for layer in usable:
        if layer.name in missing or not layer.has_running_stats or layer.name in moved:
            continue
        # meta or empty statistics were not read in batch: test them one by one
        if not _tested_in_batch(layer) and not stats_at_initial_values(layer):
            continue
        if statistics_never_move(layer):
            # momentum=0: they will never leave 0 and 1, in train mode or eval mode
            frozen_at_init.append(layer)
            continue
        if layer.name in counted:
            continue
        # Only a layer used for inference (eval mode) is judged: in train mode initial
        # statistics are expected, whatever gamma/beta hold (zero_init_residual, custom init).
        if layer.module.training:
            continue
        candidates.append(layer)
    # an eval forward that neither calls nor reads a layer's statistics (an auxiliary head
    # used in training only) does not normalise with them: noted, not reported
    unread: frozenset[str] = getattr(
        getattr(ctx.forward, "eval", None), "unread_stats", frozenset()
    )
    idle = [layer.name for layer in candidates if layer.name in unread]
    if idle:
        ctx.notes.append(
            f"untrained-stats: {len(idle)} BN layer(s) with initial statistics are not used "
            f"by the eval forward (moving their statistics changed no output): "
            f"{', '.join(idle[:5])}{' and more' if len(idle) > 5 else ''}; not reported"
        )
        candidates = [layer for layer in candidates if layer.name not in unread]
    if candidates:
        affine_moved = layers_where(candidates, "weight", lambda t: t != 1) | layers_where(
            candidates, "bias", lambda t: t != 0
        )
        hits = [(layer, True, layer.name in affine_moved) for layer in candidates]
    for layer in frozen_at_init:
        nbt = layer.num_batches_tracked
        count = int(nbt.reshape(-1)[0]) if nbt is not None else 0
        seen = f" after {count} train-mode forward{'s' if count != 1 else ''}" if count else ""
        yield ctx.finding(
            "untrained-stats",
            layer,
            f"momentum=0: running_mean/running_var never move, and they are still the initial "
            f"values (mean 0, var 1){seen}; eval normalises with statistics no data produced",
            hint="use momentum=0.1 (PyTorch's default) or momentum=None (cumulative average); "
            "for batch statistics at inference, use track_running_stats=False",
            momentum=0.0,
            num_batches_tracked=count,
            eval_mode=not layer.module.training,
        )
    if not hits:
        return
    hint = (
        "train (or calibrate) in train mode before saving, load the statistics with "
        "strict=True, or recompute them with torch.optim.swa_utils.update_bn"
    )
    # FrozenBatchNorm-style layers (buffers only, no counter) never update their statistics:
    # they come from the weights they are loaded with, or nowhere
    frozen_hint = (
        "FrozenBatchNorm-style layers never update their statistics: load them with the "
        "pretrained weights (e.g. torchvision's weights_backbone=), or copy them from a "
        "trained BatchNorm"
    )
    usable = [
        layer for layer in ctx.layers if layer.has_running_stats and not layer.lazy_uninitialized
    ]
    if len(hits) > 1 and len(hits) == len(usable):
        frozen = [not h[0].uses_batch_stats for h in hits]
        yield ctx.finding(
            "untrained-stats",
            None,
            f"all {len(hits)} BN layers still have their initial running statistics "
            + ("(mean 0, var 1)" if all(frozen) else "(mean 0, var 1, num_batches_tracked 0)")
            + " and run in eval mode"
            + (" with trained gamma/beta" if any(h[2] for h in hits) else ""),
            hint=frozen_hint if all(frozen) else hint + ("; " + frozen_hint if any(frozen) else ""),
            layers=[h[0].name for h in hits],
        )
        return
    for layer, in_eval, trained_affine in hits:
        why = "in eval mode" + (" next to trained gamma/beta" if trained_affine else "")
        yield ctx.finding(
            "untrained-stats",
            layer,
            f"running statistics are still the initial values (mean 0, var 1) {why}; "
            "inference normalises with statistics no data produced",
            hint=hint if layer.uses_batch_stats else frozen_hint,
            eval_mode=in_eval,
            trained_affine=trained_affine,
        )


def _missing_stats(ctx: AuditContext, missing: Any) -> Iterator[Finding]:
    """``untrained-stats``'s "missing-buffers" cause: the layers hold the initial values only
    because the checkpoint lacks their statistics, which is worse than statistics saved
    untrained (the catalogue gives this cause its own severity), in any mode."""
    hint = (
        "save model.state_dict() with its buffers (not only named_parameters()), or "
        "recompute the statistics with torch.optim.swa_utils.update_bn"
    )
    harm = "so inference would normalise with the initial values (mean 0, var 1)"
    keys = [f"{name}.{leaf}" for name, leaves in missing.items() for leaf in leaves]
    if len(missing) > 1 and len(missing) == len(ctx.layers):
        shown = ", ".join(keys[:3]) + (f", +{len(keys) - 3} more" if len(keys) > 3 else "")
        yield ctx.finding(
            "untrained-stats",
            None,
            f"{len(keys)} BN buffers missing from the checkpoint ({shown}): the running "
            f"statistics of all {len(missing)} BN layers were not saved, {harm}",
            hint=hint,
            severity_cause="missing-buffers",
            layers=sorted(missing),
            missing=keys,
        )
        return
    known = {layer.name: layer for layer in ctx.layers}
    for name, leaves in missing.items():
        yield ctx.finding(
            "untrained-stats",
            known.get(name, name),
            f"{' and '.join(leaves)} missing from the checkpoint: the running statistics "
            f"were not saved, {harm}",
            hint=hint,
            severity_cause="missing-buffers",
            missing=[f"{name}.{leaf}" for leaf in leaves],
        )


def zero_initialised(weight: torch.Tensor) -> bool:
    """gamma exactly 0 in every channel: a deliberate initialisation (``zero_init_residual``,
    timm's ``zero_init_last``, skip-init), not something an optimizer learned. One step of
    any optimizer moves such a gamma off exact zero (its gradient is the sum of
    ``grad_out * x_hat``, zero only for a dead branch)."""
    with torch.no_grad():
        return bool((weight.detach() == 0).all())


@check("dead-channels")
def dead_channels(ctx: AuditContext) -> Iterator[Finding]:
    atol = ctx.tol("dead_gamma_atol")
    for layer in _usable(ctx.layers):
        w = layer.weight
        if w is None or not w.is_floating_point() or not is_trained(layer):
            continue
        if zero_initialised(w):
            continue  # judged only on learned gamma: a whole layer at exactly 0 is an init
        with torch.no_grad():
            dead = w.detach().abs() <= atol
        if not bool(dead.any()):
            continue
        yield ctx.finding(
            "dead-channels",
            layer,
            f"|gamma| <= {atol:g} in {channel_list(dead)} of {w.numel()} "
            f"({float(dead.float().mean()):.0%}): those channels output only beta",
            hint="if pruned on purpose, remove the channels (fold beta into the next layer); "
            "a gamma initialised to 0 on purpose (the last BN of a residual block with "
            "torchvision's zero_init_residual or timm's zero_init_last) stays near 0 early in "
            "training; else check weight decay and learning rate",
            channels=_indices(dead),
            count=int(dead.sum()),
            atol=atol,
        )


@check("weight-decay-on-bn")
def weight_decay_on_bn(ctx: AuditContext) -> Iterator[Finding]:
    opt = ctx.optimizer
    if opt is None:
        return
    where: dict[int, tuple[int, float]] = {}
    for gi, group in enumerate(opt.param_groups):
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        if wd > 0:
            for p in group["params"]:
                where.setdefault(id(p), (gi, wd))
    # one finding per param group and decayed parameters: a model built with
    # optimizer(model.parameters(), weight_decay=wd) has every BN layer in it (52 in a
    # DeepLabV3), and what is said and what is fixed is the same for all of them
    groups: dict[tuple[int, float, tuple[str, ...]], list[BNLayer]] = {}
    for layer in _usable(ctx.layers):
        decayed = [
            (name, where[id(p)])
            for name, p in layer.module._parameters.items()
            if p is not None and id(p) in where
        ]
        if not decayed:
            continue
        gi, wd = decayed[0][1]
        groups.setdefault((gi, wd, tuple(n for n, _ in decayed)), []).append(layer)
    for (gi, wd, params), members in groups.items():
        names = " and ".join(
            "gamma" if n == "weight" else "beta" if n == "bias" else n for n in params
        )
        verb = "are" if len(params) > 1 else "is"
        why = (
            f"in param group {gi} with weight_decay={wd:g}; decay pulls each channel's output "
            "scale (gamma) and shift (beta) toward 0, toward dead channels, rather than "
            "regularising; most recipes leave norm parameters out of weight decay"
        )
        hint = "put BN (and bias) parameters in a param group with weight_decay=0"
        if len(members) == 1:
            yield ctx.finding(
                "weight-decay-on-bn",
                members[0],
                f"{names} {verb} {why}",
                hint=hint,
                group=gi,
                weight_decay=wd,
                params=list(params),
            )
            continue
        shown = layer_list([m.name for m in members], 3)
        yield ctx.finding(
            "weight-decay-on-bn",
            None,
            f"{names} of {len(members)} BN layers ({shown}) {verb} {why}",
            hint=hint,
            group=gi,
            weight_decay=wd,
            params=list(params),
            layers=[m.name for m in members],
        )

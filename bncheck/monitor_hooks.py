"""The Monitor's hooks: what each watched BN call was, recorded at almost no cost.

The hooks are registered globally (``torch.nn.modules.module.register_module_forward_hook``
and ``torch.optim.optimizer.register_optimizer_step_post_hook``, with its pre-step twin) and
pick the watched modules and optimizer by identity, so the user's model and optimizer carry
nothing of the Monitor:
``torch.save(model)``, ``copy.deepcopy(model)`` and ``torch.jit.script(model)`` work inside
and after a ``with bncheck.Monitor(model)`` block, and a copy (an EMA model, a "best model")
is never watched. The hooks hold the Monitor through a weak reference: a Monitor dropped
without ``detach()`` stops watching and its hooks remove themselves at their next call.

Per call of a watched BN layer the forward hook appends one tuple ``(layer, training,
grad_enabled, flags, input shape)``; ``flags`` says whether a train-mode call ran inside a
backward pass (a recomputed forward), under ``inference_mode``, or looks like a deliberate
recalibration (no grad and momentum None while the layer has a momentum, or BN in train mode
inside a model in eval mode), ran with momentum 0 (no statistics update: SAM's second pass),
or, in eval mode, ran inside a parent module in train mode (BN kept in eval by the recipe), or,
without grad, was the layer's last call before another optimizer's step with no call with
grad in between (a GAN generator making the discriminator's fakes under ``no_grad``). Calls
made by bncheck's own audit passes on the model (:func:`bncheck.state.auditing`) are not
recorded.

A layer that updates more than once in a step is *armed* for the next ``ARM_STEPS`` steps:
its calls are then recorded in detail (per-channel input statistics, and when the output's
gradient is computed) so that :func:`bncheck.monitor_numerics.classify_updates` can tell
accumulation and recomputation from two views, ghost BN or real/fake batches.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .discovery import BNLayer
from .monitor_numerics import CallRecord, classify_updates
from .state import auditing

if TYPE_CHECKING:  # pragma: no cover
    from .monitor import Monitor

__all__ = [
    "Recorder",
    "BACKWARD",
    "INFERENCE",
    "RECALIBRATION",
    "STILL",
    "KEPT_EVAL",
    "FED",
    "ARM_STEPS",
]

BACKWARD, INFERENCE, RECALIBRATION = 1, 2, 4
#: a train-mode call with momentum 0 (normalises, leaves the running statistics as they were)
STILL = 8
#: an eval-mode call while the module holding the layer is in train mode (BN kept in eval)
KEPT_EVAL = 16
#: the last train-mode call of a layer without grad before another optimizer's step, with no
#: train-mode call with grad in between (a GAN generator making the discriminator's fakes
#: under no_grad)
FED = 32
#: Steps a layer with several updates per step is recorded in detail.
ARM_STEPS = 3

_current_node: Callable[[], Any] = torch._C._current_autograd_node

Call = tuple[int, bool, bool, int, "torch.Size | None"]


class _BackwardMark:
    """Tensor hook on a detailed call's output: notes when its gradient was computed."""

    __slots__ = ("record", "seq")

    def __init__(self, record: CallRecord, seq: itertools.count[int]) -> None:
        self.record, self.seq = record, seq

    def __call__(self, grad: torch.Tensor) -> None:
        self.record.mark_backward(next(self.seq))


class _ModuleHook:
    """A per-module hook that calls the Recorder through a weak reference.

    Used only for a model wrapped by ``torch.compile``, where dynamo warns about process-wide
    hooks. While dynamo traces, the hook records only what dynamo can trace into the graph
    (:meth:`Recorder._forward_traced`), so the compiled graph has no break. A deep copy of the
    module gets an inert hook (it watches nothing)."""

    __slots__ = ("__weakref__", "method", "recorder")

    def __init__(self, recorder: Recorder | None, method: str) -> None:
        self.recorder = weakref.ref(recorder) if recorder is not None else None
        self.method = method

    def __call__(self, *args: Any) -> None:
        recorder = self.recorder() if self.recorder is not None else None
        if recorder is None:
            return
        if torch.compiler.is_compiling():  # traced into the graph: only what dynamo can trace
            if self.method == "_forward":
                recorder._forward_traced(*args)
            return
        getattr(recorder, self.method)(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ModuleHook:
        return _ModuleHook(None, self.method)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ModuleHook, (None, self.method))


def _version(t: torch.Tensor) -> int | None:
    """A tensor's version counter; ``None`` for an inference tensor (it has none)."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _several_sizes(calls: Sequence[Call], idx: int) -> bool:
    """Whether layer ``idx``'s calls in the step saw inputs of more than one spatial size
    (crops of several sizes in multi-crop training, the levels of a feature pyramid)."""
    sizes = {tuple(shape[2:]) for layer, *_, shape in calls if layer == idx and shape is not None}
    return len(sizes) > 1


def _parent(inner: nn.Module, name: str) -> nn.Module:
    """The module that holds the layer named ``name`` in ``inner`` (``inner`` for a top-level
    layer or the model itself)."""
    prefix = name.rpartition(".")[0]
    try:
        return inner.get_submodule(prefix) if prefix else inner
    except AttributeError:
        return inner


class Recorder:
    """Global hooks for one Monitor and what they recorded since the last step."""

    def __init__(self, monitor: Monitor, layers: list[BNLayer], inner: nn.Module) -> None:
        self._monitor = weakref.ref(monitor)
        self.index = {id(lyr.module): i for i, lyr in enumerate(layers)}
        self._modules = [lyr.module for lyr in layers]
        self.inner = inner
        self._inner_id = id(inner)
        self._has_momentum = [lyr.momentum is not None for lyr in layers]
        #: momentum 1 in a pass without grad, on a layer that does not train with it: each
        #: batch replaces the statistics, which the pass then averages itself (fvcore's
        #: update_bn_stats, detectron2's PreciseBN hook)
        self._replaces = [lyr.momentum != 1.0 for lyr in layers]
        #: the module holding each layer: in train mode while the layer runs in eval mode, the
        #: recipe put BN alone back in eval (norm_eval); a forgotten .train() leaves the whole
        #: network (the parent too) in eval, whatever mode a wrapper around it is in
        self._parents = [_parent(inner, lyr.name) for lyr in layers]
        self.optimizer: Any = None
        #: nesting of the watched optimizer's step: torch runs the global step hooks around
        #: each class's patched ``step``, so a subclass whose step calls ``super().step()``
        #: fires them twice; only the outermost pair is a step. A train-mode BN call resets
        #: it (a step that raised never ran its post hook; LBFGS's closure runs inside one)
        self._step_depth = 0
        self.calls: list[Call] = []
        self._handles: list[Any] = []
        self._step = 0  # steps finished (for arming)
        self._seen = [-1] * len(layers)  # last step with a train-mode call with grad
        self._armed: dict[int, list[int]] = {}  # layer -> [first step to record, steps left]
        self._details: dict[int, list[CallRecord]] = {}
        #: when other optimizers stepped in this step (on the ``seq`` clock, only while a
        #: layer is armed): a network also run in another network's step (a GAN generator's)
        self._other_steps: list[int] = []
        self._seq = itertools.count()
        #: the model's train-mode inputs with grad in this step (weak references, only while
        #: a layer is armed), and whether one of them was run again
        self._inputs: list[tuple[weakref.ref[torch.Tensor], int, int | None]] = []
        self._repeated = False
        #: the watched layers' gamma/beta (with the optimizer's parameters, see
        #: :meth:`_weights_version`): version counters that tell weights moved in place
        #: between two runs of one input (SAM's perturbation, an LBFGS line search)
        self._weights = [p for lyr in layers for p in lyr.params]
        #: per layer, the position in ``calls`` of its last train-mode call without grad
        #: since its last train-mode call with grad: marked FED if another optimizer steps
        #: now (only the last: a validation pass before the fakes' forward stays validation)
        self._nograd_at: dict[int, int] = {}

    # ---- registration ------------------------------------------------------------------------
    def register(self, *, optimizer: Any, pre_hook: bool, per_module: bool = False) -> None:
        """Register the hooks: process-wide ones, or with ``per_module`` (a compiled model,
        where dynamo warns about process-wide module hooks) hooks on the watched modules."""
        self.optimizer = optimizer
        try:
            if per_module:
                modules = [*self._modules, self.inner]
                hook = _ModuleHook(self, "_forward")
                self._handles.extend(m.register_forward_hook(hook) for m in modules)
                if pre_hook:
                    pre = _ModuleHook(self, "_pre_forward")
                    self._handles.append(self.inner.register_forward_pre_hook(pre))
            else:
                self._handles.append(register_module_forward_hook(self._forward))
                if pre_hook:
                    self._handles.append(register_module_forward_pre_hook(self._pre_forward))
            if optimizer is not None:
                self._handles.append(register_optimizer_step_pre_hook(self._optimizer_pre_step))
                self._handles.append(register_optimizer_step_post_hook(self._optimizer_step))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    def _alive(self) -> Monitor | None:
        monitor = self._monitor()
        if monitor is None:  # dropped without detach(): stop watching
            self.remove()
        return monitor

    # ---- the hooks (the hot path) ---------------------------------------------------------------
    def _forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        idx = self.index.get(id(module))
        if idx is None:
            if id(module) == self._inner_id and module is self.inner:
                self._model_forward(module, args)
            return
        if self._monitor() is None:  # dropped without detach(): stop watching
            self.remove()
            return
        if auditing(module):
            return  # bncheck's own audit pass on this model
        training = module.training
        grad = torch.is_grad_enabled()
        flags = 0
        if training:
            momentum = getattr(module, "momentum", None)
            number = type(momentum) in (float, int)
            if not grad:
                if torch.is_inference_mode_enabled():
                    flags = INFERENCE
                if (
                    (momentum is None and self._has_momentum[idx])
                    or (number and momentum == 1 and self._replaces[idx])
                    or not self.inner.training
                ):
                    flags |= RECALIBRATION
                self._nograd_at[idx] = len(self.calls)  # the call appended below
            else:
                if self._nograd_at:
                    self._nograd_at.pop(idx, None)
                if _current_node() is not None:
                    flags = BACKWARD
            if number and momentum == 0:
                flags |= STILL
        elif self._parents[idx].training:
            flags = KEPT_EVAL
        x = args[0] if args else None
        self.calls.append(
            (idx, training, grad, flags, x.shape if isinstance(x, torch.Tensor) else None)
        )
        if training:
            self._step_depth = 0
        if training and grad and not flags & STILL:
            if self._seen[idx] == self._step:  # a second update in this step
                if idx not in self._armed:
                    self._armed[idx] = [self._step + 1, ARM_STEPS]
            else:
                self._seen[idx] = self._step
            if self._armed:
                arm = self._armed.get(idx)
                if arm is not None and arm[0] <= self._step:
                    self._detail(idx, module, x, output, flags)

    def _forward_traced(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """The forward hook as dynamo traces it into a compiled graph: the call's layer, mode,
        grad mode and shape (appended when the graph runs), without the flags that need
        autograd's state (recomputation, recalibration) and without detailed recording."""
        idx = self.index.get(id(module))
        if idx is None:
            return
        x = args[0] if args else None
        shape = x.shape if isinstance(x, torch.Tensor) else None
        self.calls.append((idx, module.training, torch.is_grad_enabled(), 0, shape))

    def _model_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not (module.training and torch.is_grad_enabled()) or auditing(module):
            return
        if self._armed and args and isinstance(args[0], torch.Tensor):
            # while layers are classified: the same input tensor run again in the step, with
            # the same values, at weights moved in place since its first run (SAM's second
            # pass, an LBFGS closure); the input by identity and version counter (a buffer a
            # loader refills in place is another batch), through a weak reference (the batch
            # is not kept alive, so a freed batch's address cannot be mistaken for it)
            x = args[0]
            version = _version(x)
            if version is not None:
                weights = self._weights_version()
                for ref, seen, before in self._inputs:
                    if ref() is x and seen == version:
                        if before is not None and weights != before:
                            self._repeated = True
                        break
                else:
                    self._inputs.append((weakref.ref(x), version, weights))
        if self.optimizer is not None:
            return
        monitor = self._alive()
        if monitor is not None:
            monitor._safely(monitor._end_step)

    def _weights_version(self) -> int | None:
        """The sum of the version counters of the optimizer's parameters and the watched
        gamma/beta (BN without affine parameters, or frozen ones, still sits among weights
        SAM moves); inference tensors, which have none, are left out. ``None``: nothing to
        read."""
        tensors = {id(p): p for p in self._weights}
        groups = getattr(self.optimizer, "param_groups", None)
        if isinstance(groups, list):
            for g in groups:
                if isinstance(g, dict):
                    tensors.update((id(p), p) for p in g.get("params", ()))
        total, seen = 0, False
        for p in tensors.values():
            v = _version(p) if isinstance(p, torch.Tensor) else None
            if v is not None:
                total, seen = total + v, True
        return total if seen else None

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if module is not self.inner or not (module.training and torch.is_grad_enabled()):
            return
        if auditing(module):
            return
        monitor = self._alive()
        if monitor is not None:
            monitor._before_train_forward()

    def _optimizer_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is not self.optimizer:
            return
        self._step_depth += 1
        if self._step_depth > 1:
            return  # a parent class's step inside the subclass's
        monitor = self._alive()
        if monitor is not None:
            monitor._safely(monitor._before_step)

    def _optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is not self.optimizer:
            if self._armed:
                self._other_steps.append(next(self._seq))
            # forwards without grad that fed this step (a GAN's fakes); not an optimizer that
            # the watched one steps inside its own step (a Lookahead-style wrapper's base)
            if self._nograd_at and not self._step_depth:
                for pos in self._nograd_at.values():
                    idx, training, grad, flags, shape = self.calls[pos]
                    self.calls[pos] = (idx, training, grad, flags | FED, shape)
                self._nograd_at = {}
            return
        self._step_depth = max(0, self._step_depth - 1)
        if self._step_depth:
            return  # the end of a parent class's step inside the subclass's
        monitor = self._alive()
        if monitor is not None:
            monitor._safely(monitor._end_step)

    # ---- detailed calls (armed layers only) -----------------------------------------------------
    def _detail(self, idx: int, module: nn.Module, x: Any, output: Any, flags: int) -> None:
        in_backward = bool(flags & BACKWARD)
        mean = var = None
        n = 0
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.is_floating_point():
            with torch.no_grad():
                # per-sample channel means [N, C]: their spread is the sampling noise of the
                # batch mean, spatial correlation included
                per_sample = x.detach().float().flatten(2).mean(2) if x.dim() > 2 else x.detach()
                var, mean = torch.var_mean(per_sample.float(), dim=0, correction=1)
            n = int(x.shape[0])
        hookable = isinstance(output, torch.Tensor) and output.requires_grad and not in_backward
        record = CallRecord(next(self._seq), n, mean, var, hookable, in_backward)
        # whether the layer's gradients were cleared before this call (zero_grad between a
        # GAN's generator step and its discriminator step; gradient accumulation keeps them):
        # consulted only for a call after another optimizer's step in this step
        weight = getattr(module, "weight", None)
        if self._other_steps and isinstance(weight, torch.Tensor) and weight.requires_grad:
            grad = weight.grad
            record.grad_left = None if grad is None else grad.detach().abs().sum()
        if hookable:
            output.register_hook(_BackwardMark(record, self._seq))
        self._details.setdefault(idx, []).append(record)

    # ---- step boundaries ------------------------------------------------------------------------
    def classifying(self, idx: int) -> bool:
        """Whether layer ``idx``'s calls are being recorded in detail to classify its several
        updates per step (for :data:`ARM_STEPS` steps after they were first seen)."""
        return idx in self._armed

    def take_calls(self) -> list[Call]:
        calls, self.calls = self.calls, []
        self._nograd_at = {}
        return calls

    def finish_step(self, calls: Sequence[Call] = ()) -> dict[int, str]:
        """Close a step: how the armed layers' several updates came about (layer -> kind).
        ``calls``: the step's BN calls (:meth:`take_calls`), whose input sizes tell one BN
        reused on inputs of several sizes (multi-crop training, pyramid levels)."""
        kinds: dict[int, str] = {}
        for idx, records in self._details.items():
            kind = classify_updates(
                records, backward_seen=self.optimizer is not None, others=self._other_steps
            )
            if kind == "reused" and _several_sizes(calls, idx):
                kind = "sizes"
            elif kind in ("accumulation", "sources") and self._repeated:
                # one input run again at weights moved within the step: not micro-batches,
                # nor two sources (deep layers see the moved weights' effect as another
                # batch); at the same weights (a fixed batch, views made inside the model, a
                # fixed argument beside the data) the calls keep their classification
                kind = "repeat"
            if kind is not None:
                kinds[idx] = kind
        self._forget_details()
        for idx, arm in list(self._armed.items()):
            if arm[0] <= self._step:
                arm[1] -= 1
                if arm[1] <= 0:
                    del self._armed[idx]
        self._step += 1
        return kinds

    def _forget_details(self) -> None:
        """Drop what the step recorded to classify its repeated updates."""
        self._details = {}
        self._other_steps = []
        self._inputs, self._repeated = [], False

    def reset_step(self) -> None:
        """Forget what was recorded (attach: what happened while detached is not judged)."""
        self.take_calls()
        self._forget_details()
        self._step_depth = 0

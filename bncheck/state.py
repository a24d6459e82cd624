"""Snapshot and restore everything bncheck could disturb while it inspects a model.

``preserved(model, optimizers=...)`` records, and on exit puts back, whatever happens inside
(a normal exit, an exception, ``KeyboardInterrupt`` or any other ``BaseException``):

- every parameter and buffer of every submodule, **by value** (BatchNorm's forward updates
  its running statistics in place without bumping their version counters, so a restore keyed
  on version counters would miss them; a forward may also renormalise or clamp a weight, or
  write a buffer through ``.data``). A parameter or buffer that was replaced by another object
  is put back as the original object, so tensors the user or an optimizer holds stay the same
  objects; values are written back through ``.data`` only where they changed, so no version
  counter moves and an autograd graph the user holds stays valid;
- every ``.grad`` (its value, and whether it was ``None``) and ``requires_grad`` flag;
- every submodule's ``training`` flag;
- every submodule's structure: parameters, buffers and submodules added, removed or replaced
  during the block (a hook that registers a buffer, a forward that assigns a new submodule)
  are put back, and so are its plain attributes (added ones removed, rebound ones rebound:
  a counter a hook of yours increments);
- the state of every learning-rate scheduler held as a module attribute (its step count and
  last learning rates);
- the state of the optimizers given and of every ``torch.optim.Optimizer`` held as a module
  attribute: its per-parameter state tensors by value, its other state entries and its
  param-group settings (``lr``, ``momentum``, ...);
- the RNG states of torch (CPU and initialised CUDA devices), numpy and ``random``.

**Memory cost**: one clone of every parameter, buffer, gradient and optimizer state tensor,
so about the size of the model (twice with gradients, plus the optimizer's state), on the
device the tensors live on, held for the duration of the block.

``audit_lock(model)`` serialises audits of one model across threads, and
:func:`auditing` tells whether the current thread is running an audit pass on a module (the
Monitor uses it to ignore bncheck's own forward passes).
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

__all__ = [
    "preserved",
    "Snapshot",
    "RNGState",
    "ModelState",
    "OptimizerState",
    "audit_lock",
    "auditing",
    "audit_pass",
    "held_optimizers",
]


@dataclass
class RNGState:
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = torch.cuda.get_rng_state_all()
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _snapshot(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``t``'s values (``None`` for a missing or uninitialised lazy tensor)."""
    if not isinstance(t, torch.Tensor) or isinstance(t, UninitializedTensorMixin):
        return None
    if t.is_meta:
        return None
    return t.detach().clone()  # detached: no autograd record, no grad-mode switch needed


def _put_back(target: torch.Tensor, copy: torch.Tensor | None) -> None:
    """Write ``copy``'s values into ``target`` where they differ, without moving its version
    counter (through ``.data``)."""
    if copy is None or isinstance(target, UninitializedTensorMixin):
        return
    data = target.data
    if data.shape != copy.shape or data.dtype != copy.dtype or data.device != copy.device:
        # resized or moved in place: a copy of the saved values (never the saved tensor
        # itself, which a later restore reads: a forward that resizes the buffer in place
        # again, as torch.ao's FakeQuantize does on its first call, would write into it)
        target.data = copy.clone()
        return
    if data.is_inference():
        with torch.inference_mode():
            if not _same(data, copy):
                data.copy_(copy)
        return
    if not _same(data, copy):
        data.copy_(copy)


#: dtypes whose CPU tensors numpy can view without a copy
_NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    }
)
#: from this many elements numpy's comparison beats ``torch.equal`` (about 3x on large CPU
#: tensors, whose ``torch.equal`` runs at a third of memory speed; below it the views cost more)
_NUMPY_FROM = 1024
#: elements compared at once
_NUMPY_BLOCK = 1 << 22


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``torch.equal(a, b)`` for two detached tensors of one shape, dtype and device (NaN
    differs from NaN in both), through numpy for large plain CPU tensors."""
    if (
        a.numel() >= _NUMPY_FROM
        and a.device.type == "cpu"
        and a.dtype in _NUMPY_DTYPES
        and a.layout == torch.strided
        and not (a.is_conj() or a.is_neg() or b.is_conj() or b.is_neg())
    ):
        try:
            x, y = a.numpy(), b.numpy()
        except (RuntimeError, TypeError):  # a tensor numpy cannot view: torch decides
            return torch.equal(a, b)
        if x.flags.c_contiguous and y.flags.c_contiguous:
            # in blocks: the elementwise comparison's temporary stays small (VGG's largest
            # weight would need 100 MB at once)
            x, y = x.reshape(-1), y.reshape(-1)
            return all(
                np.array_equal(x[i : i + _NUMPY_BLOCK], y[i : i + _NUMPY_BLOCK])
                for i in range(0, x.size, _NUMPY_BLOCK)
            )
    return torch.equal(a, b)


#: (module, attribute name, original object, copy of its values)
_Slot = tuple[nn.Module, str, Any, "torch.Tensor | None"]


def _slots(module: nn.Module, kind: str) -> Iterator[tuple[str, Any]]:
    table = getattr(module, kind)
    if isinstance(table, dict):
        yield from list(table.items())
    else:  # TorchScript: a wrapper, not a dict
        named = module.named_parameters if kind == "_parameters" else module.named_buffers
        yield from named(recurse=False)


@dataclass
class OptimizerState:
    """Value snapshot of one optimizer: per-parameter state, other entries, group settings."""

    optimizer: torch.optim.Optimizer
    #: per state key: (the entry dict itself, {name: (value object, copy of its values)})
    state: dict[Any, tuple[dict[str, Any], dict[str, tuple[Any, torch.Tensor | None]]]]
    groups: list[dict[str, Any]]

    @classmethod
    def capture(cls, optimizer: torch.optim.Optimizer) -> OptimizerState:
        state: dict[Any, tuple[dict[str, Any], dict[str, tuple[Any, torch.Tensor | None]]]] = {}
        for key, entry in optimizer.state.items():
            saved = {
                name: (value, _snapshot(value) if isinstance(value, torch.Tensor) else None)
                for name, value in entry.items()
            }
            state[key] = (entry, saved)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return cls(optimizer, state, groups)

    def restore(self) -> None:
        live = self.optimizer.state
        for key in [k for k in live if k not in self.state]:
            del live[key]  # state the audit created (a first step taken during it)
        for key, (entry, saved) in self.state.items():
            for value, copy in saved.values():
                if isinstance(value, torch.Tensor):
                    _put_back(value, copy)
            if live.get(key) is not entry:
                live[key] = entry
            if entry.keys() != saved.keys() or any(
                entry[name] is not value for name, (value, _) in saved.items()
            ):
                entry.clear()
                entry.update({name: value for name, (value, _) in saved.items()})
        for group, settings in zip(self.optimizer.param_groups, self.groups):
            for name in [k for k in group if k != "params" and k not in settings]:
                del group[name]
            group.update(settings)


def held_optimizers(
    model: nn.Module, modules: Iterable[nn.Module] | None = None
) -> list[torch.optim.Optimizer]:
    """Every ``torch.optim.Optimizer`` held as an attribute of a submodule of ``model``
    (e.g. a test-time-adaptation wrapper that steps its own optimizer in forward);
    ``modules``: ``model.modules()`` when the caller has them listed already."""
    return _distinct(
        (
            value
            for module in (model.modules() if modules is None else modules)
            for value in vars(module).values()
        ),
        torch.optim.Optimizer,
    )


_TABLES = ("_parameters", "_buffers", "_modules")
#: the attributes every nn.Module has (its tables, hook dictionaries, flags)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _put_dict(live: dict[str, Any], saved: dict[str, Any]) -> None:
    """Make ``live`` hold exactly ``saved``'s entries (the same objects), in place."""
    for key in [k for k in live if k not in saved]:
        del live[key]
    for key, value in saved.items():
        if key not in live or live[key] is not value:
            live[key] = value


@dataclass
class StructureState:
    """One module's attribute dictionary and its parameter/buffer/submodule tables, shallow:
    what was added, removed or rebound is put back (values are ModelState's business). The
    contents of its own list, dict and set attributes (all but ``nn.Module``'s internal
    tables and hook dictionaries) are copied too (one level) and put back in place: a forward
    that appends to ``self.history`` or fills ``self._cache`` leaves no entry behind."""

    module: nn.Module
    attrs: dict[str, Any]
    tables: dict[str, dict[str, Any]]
    non_persistent: set[str] | None
    #: list/dict/set attributes: (the object, a shallow copy of its contents)
    containers: list[tuple[Any, Any]] = field(default_factory=list)

    @classmethod
    def capture(cls, module: nn.Module, held: list[Any] | None = None) -> StructureState | None:
        """``held``: where to append the optimizers and learning-rate schedulers the module
        holds as attributes (found in the same walk of its attributes)."""
        attrs = vars(module)
        if not all(isinstance(attrs.get(kind), dict) for kind in _TABLES):
            if held is not None:  # TorchScript: its attributes live in the compiled module
                held.extend(v for v in attrs.values() if isinstance(v, _HELD_KINDS))
            return None
        tables = {kind: dict(attrs[kind]) for kind in _TABLES}
        persistent = attrs.get("_non_persistent_buffers_set")
        containers = []
        for name, value in attrs.items():
            if name in _MODULE_INTERNALS:
                continue
            if isinstance(value, (list, dict, set)):
                containers.append((value, value.copy()))
            elif held is not None and isinstance(value, _HELD_KINDS):
                held.append(value)
        return cls(
            module,
            dict(attrs),
            tables,
            set(persistent) if isinstance(persistent, set) else None,
            containers,
        )

    def restore(self) -> None:
        attrs = vars(self.module)
        _put_dict(attrs, self.attrs)
        for kind, saved in self.tables.items():
            _put_dict(attrs[kind], saved)
        for live, saved in self.containers:
            try:  # unchanged items compare by identity; a replaced tensor item cannot
                if bool(live == saved):
                    continue
            except Exception:
                pass
            try:
                if isinstance(live, list):
                    live[:] = saved
                else:  # dict or set
                    live.clear()
                    live.update(saved)
            except Exception:  # a container that refuses changes cannot have been changed
                pass
        live = attrs.get("_non_persistent_buffers_set")
        if (
            self.non_persistent is not None
            and isinstance(live, set)
            and live != self.non_persistent
        ):
            live.clear()
            live.update(self.non_persistent)


#: learning-rate scheduler classes (``LRScheduler`` and ``ReduceLROnPlateau``, where torch has
#: them)
_SCHEDULER_KINDS: tuple[type, ...] = tuple(
    k
    for k in (
        getattr(torch.optim.lr_scheduler, "LRScheduler", None),
        getattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", None),
    )
    if isinstance(k, type)
)
#: the objects a module may hold whose state a snapshot keeps: optimizers and schedulers
_HELD_KINDS: tuple[type, ...] = (torch.optim.Optimizer, *_SCHEDULER_KINDS)


def _distinct(found: Iterable[Any], kind: type | tuple[type, ...]) -> list[Any]:
    out: list[Any] = []
    for value in found:
        if isinstance(value, kind) and all(value is not o for o in out):
            out.append(value)
    return out


def _scheduler_state(scheduler: Any) -> dict[str, Any]:
    # lists (last_lr, base_lrs) are copied: a step rebinds or rewrites them
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in vars(scheduler).items()
    }


def _scheduler_state_copy(saved: dict[str, Any]) -> dict[str, Any]:
    # a fresh copy of the lists each time: restore() may run more than once
    return {
        k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
        for k, v in saved.items()
    }


@dataclass
class ModelState:
    training: list[tuple[nn.Module, bool]]
    parameters: list[_Slot]
    buffers: list[_Slot]
    #: per distinct parameter: (parameter, requires_grad, grad object, copy of the grad)
    grads: list[tuple[torch.Tensor, bool, torch.Tensor | None, torch.Tensor | None]]
    optimizers: list[OptimizerState] = field(default_factory=list)
    structure: list[StructureState] = field(default_factory=list)
    #: (scheduler, its attributes, shallow, lists and dicts copied)
    schedulers: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    @classmethod
    def capture(
        cls, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()
    ) -> ModelState:
        modules = list(model.modules())  # one walk of the module tree for every part
        training = [(m, m.training) for m in modules]
        copies: dict[int, torch.Tensor | None] = {}  # one clone per distinct tensor

        def copy_of(t: Any) -> torch.Tensor | None:
            if not isinstance(t, torch.Tensor):
                return None
            if id(t) not in copies:
                copies[id(t)] = _snapshot(t)
            return copies[id(t)]

        parameters: list[_Slot] = []
        buffers: list[_Slot] = []
        for module in modules:
            for name, param in _slots(module, "_parameters"):
                parameters.append((module, name, param, copy_of(param)))
            for name, buf in _slots(module, "_buffers"):
                buffers.append((module, name, buf, copy_of(buf)))
        grads = []
        seen: set[int] = set()
        for _, _, param, _ in parameters:
            if isinstance(param, torch.Tensor) and id(param) not in seen:
                seen.add(id(param))
                grads.append((param, param.requires_grad, param.grad, _snapshot(param.grad)))
        held: list[Any] = []  # optimizers and schedulers held as module attributes
        structure = [
            st for st in (StructureState.capture(m, held) for m in modules) if st is not None
        ]
        opts: list[OptimizerState] = []
        for opt in [*optimizers, *held]:
            if isinstance(opt, torch.optim.Optimizer) and all(o.optimizer is not opt for o in opts):
                opts.append(OptimizerState.capture(opt))
        schedulers = [(sch, _scheduler_state(sch)) for sch in _distinct(held, _SCHEDULER_KINDS)]
        return cls(training, parameters, buffers, grads, opts, structure, schedulers)

    def restore(self, parameters: bool = True) -> None:
        """Put everything back; with ``parameters=False`` the values of parameters, grads
        and optimizer states are left as they are (which tensors they are, their
        ``requires_grad`` and everything else is put back): the cheap reset between two
        forward passes under ``no_grad``, which change buffers and attributes far more often
        than weights, and whose weight changes the final restore puts back anyway."""
        for st in self.structure:
            st.restore()
        for sch, saved in self.schedulers:
            _put_dict(vars(sch), _scheduler_state_copy(saved))
        for module, flag in self.training:
            module.training = flag
        for kind, slots in (("_parameters", self.parameters), ("_buffers", self.buffers)):
            values = parameters or kind == "_buffers"
            for module, name, original, copy in slots:
                table = getattr(module, kind)
                if isinstance(table, dict):
                    if table.get(name) is not original:
                        table[name] = original
                elif original is not None:  # TorchScript: cannot swap back, write the values
                    current = dict(_slots(module, kind)).get(name, original)
                    if isinstance(current, torch.Tensor) and values:
                        _put_back(current, copy)
                    continue
                if isinstance(original, torch.Tensor) and values:
                    _put_back(original, copy)
        for param, flag, grad, copy in self.grads:
            if param.grad is not grad:
                param.grad = grad
            if grad is not None and parameters:
                _put_back(grad, copy)
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        if parameters:
            for opt in self.optimizers:
                opt.restore()


class Snapshot:
    """The saved state of a model, its optimizers and the RNGs; ``restore()`` puts it back
    (it may be called more than once, e.g. between the audit's stages)."""

    def __init__(self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()):
        self.rng = RNGState.capture()
        self.model = ModelState.capture(model, optimizers)
        #: the model's state was put back for good (``restore(final=True)`` completed): the
        #: exit of :func:`preserved` restores only the RNG states
        self.settled = False

    def restore(self, final: bool = False, parameters: bool = True) -> None:
        """Put everything back. ``final=True``: the caller runs nothing on the model after
        this (the audit's rules only read it), so comparing every tensor again at the exit of
        :func:`preserved` would find nothing to do; an interrupted restore is not final.
        ``parameters=False``: not the values of parameters, grads and optimizer states (see
        :meth:`ModelState.restore`); never final."""
        try:
            if not self.settled:
                self.model.restore(parameters)
                self.settled = final and parameters
        finally:
            self.rng.restore()


@contextmanager
def preserved(
    model: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()
) -> Iterator[Snapshot]:
    """Restore ``model``'s parameters, buffers, grads, ``requires_grad`` and ``training``
    flags, the state of ``optimizers`` and of the optimizers it holds, and all RNG states,
    on any exit (``KeyboardInterrupt`` included). Yields the :class:`Snapshot`, whose
    ``restore()`` also puts everything back early."""
    snapshot = Snapshot(model, optimizers)
    try:
        yield snapshot
    finally:
        snapshot.restore()


# ---- one audit at a time per model; which modules an audit pass is running on -----------------
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextmanager
def audit_lock(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s audit lock: a second thread auditing the same model waits until the
    first is done (re-entrant within one thread)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield


_AUDITING: ContextVar[frozenset[int]] = ContextVar("bncheck_auditing", default=frozenset())


@contextmanager
def audit_pass(*models: nn.Module) -> Iterator[None]:
    """Mark ``models`` and all their submodules as being audited in this thread / context."""
    ids = {id(m) for model in models for m in model.modules()}
    token = _AUDITING.set(_AUDITING.get() | ids)
    try:
        yield
    finally:
        _AUDITING.reset(token)


def auditing(model: nn.Module) -> bool:
    """True while the current thread (context) runs a :func:`bncheck.audit` on ``model`` or on
    a model that contains it. Forward hooks of other tools (the Monitor) call it to ignore
    bncheck's own forward passes; an audit in another thread does not count."""
    active = _AUDITING.get()
    return bool(active) and id(model) in active

"""Who feeds each BN layer and what consumes its output, observed during one eager forward.

:class:`Tracer` works on any model that runs eagerly, including models that ``torch.fx``
cannot trace (data-dependent control flow), because it watches the real execution instead of
reading the code:

* a :class:`torch.overrides.TorchFunctionMode` sees every torch function, tensor method and
  ``torch.nn.functional`` call (``F.relu``, ``torch.relu``, ``x.relu()``, ``x.relu_()``, ...)
  and records, for each tensor it produces, an :class:`OpRecord` in a map keyed by
  ``id(tensor)`` and guarded by a weak reference (activations are never kept alive);
* forward hooks on leaf modules (``nn.Conv2d``, ``nn.ReLU(inplace=True)``, ``nn.Dropout``...)
  replace the records of the functions they ran with one record naming the module;
* BN layers report their calls through :meth:`Tracer.bn_enter` / :meth:`Tracer.bn_exit`, which
  gives each call its producer (walked back through shape-only ops) and the list of its
  consumers.

An in-place op (``relu_``, ``ReLU(inplace=True)``) returns the tensor object it was given, so
its record replaces the one of that object, with the old record as its ``source``. The
tracer's own computations (statistics computed in hooks) run inside :meth:`Tracer.paused` and
are not recorded.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.overrides import TorchFunctionMode

__all__ = ["OpRecord", "BNCall", "Tracer", "op_name", "upstream", "ACTIVATIONS"]

#: Activation names (functions lower-cased without a trailing ``_``, module classes
#: lower-cased). The ReLU family, smooth ReLUs, gates and squashing functions.
ACTIVATIONS = frozenset(
    {
        "relu",
        "relu6",
        "leaky_relu",
        "leakyrelu",
        "rrelu",
        "elu",
        "selu",
        "celu",
        "prelu",
        "gelu",
        "silu",
        "swish",
        "hardswish",
        "hard_swish",
        "hardsigmoid",
        "hard_sigmoid",
        "mish",
        "softplus",
        "sigmoid",
        "tanh",
        "hardtanh",
        "glu",
        "logsigmoid",
        "softsign",
        "tanhshrink",
        "threshold",
        "quickgelu",
        "gelutanh",
        "star_relu",
        "starrelu",
    }
)

#: Ops that only change shape or layout; producers are looked up through them.
TRANSPARENT = frozenset(
    {
        "view",
        "reshape",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "contiguous",
        "identity",
        "view_as",
        "reshape_as",
        "clone",
        "detach",
        "to",
        "float",
        "type_as",
    }
)

_DROPOUT_FUNCS = frozenset(
    {
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "feature_dropout",
    }
)
_LINEAR_FUNCS = frozenset(
    {
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "linear",
        "convolution",
    }
)


@dataclass(eq=False)
class OpRecord:
    """The op that produced a tensor.

    ``category`` is one of ``"input"`` (a network input), ``"bn"`` (a BN layer call),
    ``"linear"`` (conv/linear; ``has_bias`` says whether a bias was added), ``"activation"``,
    ``"dropout"`` (with p > 0 in training), ``"transparent"`` (shape-only) or ``"other"``.
    ``source`` is the record of the op's first tensor argument (for an in-place op, the record
    the tensor had before), so chains can be walked back through transparent ops.
    """

    name: str
    category: str
    module: str | None = None
    has_bias: bool | None = None
    p: float | None = None
    source: OpRecord | None = None

    @property
    def label(self) -> str:
        """``features.2 (ReLU)`` for a module, ``F.relu`` style ``relu()`` for a function."""
        if self.module is not None:
            return f"{self.module or '(model)'} ({self.name})"
        if self.category == "input":
            return "the network input"
        return f"{self.name}()"


@dataclass(eq=False)
class BNCall:
    """One call of a BN layer during the traced pass: what fed it, what used its output."""

    layer: str
    index: int
    occurrence: int
    producer: OpRecord | None
    consumers: list[str] = field(default_factory=list)
    record: OpRecord | None = None


_NAMES: dict[Any, str] = {}


def op_name(func: Any) -> str:
    """A function's or tensor method's plain name: ``relu`` for ``torch.relu``/``F.relu``/
    ``Tensor.relu_``; dunder methods lose their underscores (``__add__`` -> ``add``).
    Remembered per function (the recording mode asks for every op it sees)."""
    try:
        return _NAMES[func]
    except (KeyError, TypeError):
        pass
    name = _plain_name(func)
    try:
        if len(_NAMES) < 4096:
            _NAMES[func] = name
    except TypeError:  # an unhashable callable: not remembered
        pass
    return name


def _plain_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith("i") and name[1:] in {"add", "sub", "mul", "truediv"}:
            name = name[1:]
    return name.rstrip("_").lower()


def upstream(record: OpRecord | None) -> OpRecord | None:
    """The first record behind ``record`` that is not a shape-only (transparent) op."""
    seen = 0
    while record is not None and record.category == "transparent" and seen < 64:
        record = record.source
        seen += 1
    return record


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b
    return None


def _iter_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], pos: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else default


def _function_record(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], source: OpRecord | None
) -> OpRecord:
    if name in TRANSPARENT:
        return OpRecord(name, "transparent", source=source)
    if name in ACTIVATIONS:
        return OpRecord(name, "activation", source=source)
    if name in _LINEAR_FUNCS:
        bias = _arg(args, kwargs, 2, "bias", None)
        return OpRecord(name, "linear", has_bias=isinstance(bias, torch.Tensor), source=source)
    if name in _DROPOUT_FUNCS:
        p = _arg(args, kwargs, 1, "p", 0.5)
        training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
        try:
            p = float(p)
        except (TypeError, ValueError):
            p = 0.5
        category = "dropout" if p > 0 and bool(training) else "other"
        return OpRecord(name, category, p=p, source=source)
    return OpRecord(name, "other", source=source)


def _module_record(qualname: str, module: nn.Module, source: OpRecord | None) -> OpRecord:
    """The record of one call of a leaf module (what it is, from its class and settings)."""
    kind = type(module).__name__
    lowered = kind.lower()
    if isinstance(module, (nn.Identity, nn.Flatten, nn.Unflatten)):
        return OpRecord(kind, "transparent", module=qualname, source=source)
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)):
        return OpRecord(
            kind,
            "linear",
            module=qualname,
            has_bias=getattr(module, "bias", None) is not None,
            source=source,
        )
    if isinstance(module, nn.modules.dropout._DropoutNd):
        category = "dropout" if module.p > 0 and module.training else "other"
        return OpRecord(kind, category, module=qualname, p=float(module.p), source=source)
    if lowered in ACTIVATIONS or isinstance(
        module,
        (
            nn.ReLU,
            nn.ReLU6,
            nn.LeakyReLU,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.PReLU,
            nn.GELU,
            nn.SiLU,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Mish,
            nn.Softplus,
            nn.Sigmoid,
            nn.Tanh,
            nn.Hardtanh,
            nn.RReLU,
            nn.GLU,
        ),
    ):
        return OpRecord(kind, "activation", module=qualname, source=source)
    return OpRecord(kind, "other", module=qualname, source=source)


_IGNORED = frozenset({"dim", "size", "numel", "shape", "item", "tolist", "is_floating_point"})

OpListener = Callable[[str, tuple[Any, ...], dict[str, Any], Any], None]


class _RecordingMode(TorchFunctionMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        tracer = self.tracer
        impl = tracer.overrides.get(func) if tracer.overrides else None
        out = func(*args, **kwargs) if impl is None else impl(func, args, kwargs)
        if tracer.paused_depth or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        name = op_name(func)
        if tracer._leaf_depth:
            # inside a leaf module the module's own record replaces whatever its ops
            # produced: only the listeners (e.g. for batch_norm) need to see the op
            if tracer.listeners and (tracer.listen_to is None or name in tracer.listen_to):
                tracer.notify(name, args, kwargs, out)
            return out
        if name.startswith("get") or name in _IGNORED:
            return out
        tracer.observe_op(name, args, kwargs, out)
        return out


class Tracer:
    """Records producers and consumers of BN calls during one forward pass.

    Use as a context manager around the pass; call :meth:`mark_inputs` on the network inputs
    first and :meth:`bn_enter` / :meth:`bn_exit` from the BN layers' hooks. ``listeners`` are
    called after every recorded op with ``(name, args, kwargs, output)`` while recording is
    paused (they may compute freely); with ``listen_to`` set, only after the ops of those
    names.
    """

    def __init__(self, model: nn.Module, bn_modules: dict[nn.Module, str]) -> None:
        self.model = model
        self.bn_modules = bn_modules
        self.calls: list[BNCall] = []
        self.listeners: list[OpListener] = []
        #: op names the listeners want (``None``: every op)
        self.listen_to: frozenset[str] | None = None
        #: ops the recording mode runs through the caller's function instead:
        #: ``{func: impl}``, ``impl(func, args, kwargs)`` returns the op's result (the
        #: audit's train pass takes BN's batch statistics from the kernel that computes them)
        self.overrides: dict[Any, Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]] = {}
        self.paused_depth = 0
        self._producers: dict[int, tuple[weakref.ref[torch.Tensor], OpRecord]] = {}
        self._leaf_depth = 0
        self._leaf_sources: list[OpRecord | None] = []
        self._stack = ExitStack()
        self._occurrences: dict[str, int] = {}
        self._guards: list[Any] = []
        self._call_by_record: dict[OpRecord, BNCall] = {}
        self._module_kinds: dict[int, OpRecord] = {}
        #: id(leaf module) -> (module, qualified name, label)
        self._leaves: dict[int, tuple[nn.Module, str, str]] = {}

    # ---- producer map --------------------------------------------------------------
    def producer(self, tensor: torch.Tensor) -> OpRecord | None:
        entry = self._producers.get(id(tensor))
        if entry is None or entry[0]() is not tensor:
            return None
        return entry[1]

    def set_producer(self, tensor: torch.Tensor, record: OpRecord) -> None:
        try:
            ref = weakref.ref(tensor)
        except TypeError:  # pragma: no cover - every torch.Tensor supports weak references
            return
        self._producers[id(tensor)] = (ref, record)

    def mark_inputs(self, value: Any, where: str = "input") -> None:
        """Record the network inputs (tensors, nested in tuples/lists/dicts) as category
        ``input``, named by their place: ``input``, ``input[0]``, ``input['x']``."""
        if isinstance(value, torch.Tensor):
            self.set_producer(value, OpRecord(where, "input"))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.mark_inputs(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                self.mark_inputs(v, f"{where}[{k!r}]")

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run bncheck's own computations without recording them (and without the cost of
        dispatching each of their torch calls through the recording mode)."""
        self.paused_depth += 1
        try:
            with torch._C.DisableTorchFunction():
                yield
        finally:
            self.paused_depth -= 1

    # ---- ops ---------------------------------------------------------------------------
    def _note_consumers(self, args: tuple[Any, ...], kwargs: dict[str, Any], label: str) -> None:
        for value in (*args, *kwargs.values()):
            for t in _iter_tensors(value):
                rec = self.producer(t)
                if rec is not None and rec.category == "bn":
                    call = self._call_of(rec)
                    if call is not None and (not call.consumers or call.consumers[-1] != label):
                        call.consumers.append(label)

    def _call_of(self, record: OpRecord) -> BNCall | None:
        return self._call_by_record.get(record)

    def observe_op(
        self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        first = _first_tensor(args)
        source = self.producer(first) if first is not None else None
        if self._leaf_depth == 0:
            self._note_consumers(args, kwargs, f"{name}()")
        record = _function_record(name, args, kwargs, source)
        for t in _iter_tensors(out):
            self.set_producer(t, record)
        if self.listeners and (self.listen_to is None or name in self.listen_to):
            self.notify(name, args, kwargs, out)

    @property
    def inside_leaf(self) -> bool:
        """Whether a leaf module (or a BN layer) is running now."""
        return self._leaf_depth > 0

    def notify(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Call the listeners on one op, with recording paused."""
        self.paused_depth += 1
        try:
            with torch._C.DisableTorchFunction():
                for listener in self.listeners:
                    listener(name, args, kwargs, out)
        finally:
            self.paused_depth -= 1

    # ---- module hooks ------------------------------------------------------------------
    # Two process-wide module hooks (``register_module_forward_pre_hook``) serve every leaf
    # module of the model through a lookup by identity: registering a hook pair per module
    # costs more than the calls themselves on models with hundreds of small layers.
    def _leaf(self, module: nn.Module) -> tuple[str, str] | None:
        entry = self._leaves.get(id(module))
        if entry is None or entry[0] is not module:
            return None
        return entry[1], entry[2]

    def _own_leaf_hooks(self, qualname: str, label: str) -> tuple[Any, Any]:
        """A hook pair for one leaf module that has hooks of its own: registered on the
        module after them, so that the tracer sees what they pass on (an output a user hook
        replaced), as the process-wide hooks, which run first, could not."""
        entry = (qualname, label)

        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self.paused_depth:
                self._enter_leaf(entry, args)

        def post(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.paused_depth and self._leaf_sources:
                self._exit_leaf(entry, module, output)

        return pre, post

    def _leaf_pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.paused_depth:
            return
        leaf = self._leaf(module)
        if leaf is None:
            return
        self._enter_leaf(leaf, args)

    def _enter_leaf(self, leaf: tuple[str, str], args: tuple[Any, ...]) -> None:
        first = _first_tensor(args)
        self._leaf_sources.append(self.producer(first) if first is not None else None)
        if self._leaf_depth == 0:
            self._note_consumers(args, {}, leaf[1])
        self._leaf_depth += 1
        # the module's own record replaces what its ops produce: let them bypass the
        # recording mode (undone in the post hook, or in __exit__ if the module raises)
        guard = torch._C.DisableTorchFunction()
        guard.__enter__()
        self._guards.append(guard)

    def _leaf_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.paused_depth or not self._leaf_sources:
            return
        leaf = self._leaf(module)
        if leaf is None:
            return
        self._exit_leaf(leaf, module, output)

    def _exit_leaf(self, leaf: tuple[str, str], module: nn.Module, output: Any) -> None:
        if self._guards:
            self._guards.pop().__exit__(None, None, None)
        self._leaf_depth -= 1
        source = self._leaf_sources.pop()
        # what the module is does not change during the pass: classify it once, then
        # each call gets its own record with its own source
        kind = self._module_kinds.get(id(module))
        if kind is None:
            kind = self._module_kinds[id(module)] = _module_record(leaf[0], module, None)
        record = OpRecord(
            kind.name, kind.category, kind.module, kind.has_bias, kind.p, source=source
        )
        for t in _iter_tensors(output):
            self.set_producer(t, record)

    def bn_enter(self, layer: str, module: nn.Module, x: torch.Tensor | None) -> BNCall:
        """A BN layer starts: record its producer and count the call."""
        producer = self.producer(x) if isinstance(x, torch.Tensor) else None
        if self._leaf_depth == 0 and isinstance(x, torch.Tensor):
            self._note_consumers((x,), {}, f"{layer or '(model)'} ({type(module).__name__})")
        occurrence = self._occurrences.get(layer, 0)
        self._occurrences[layer] = occurrence + 1
        call = BNCall(layer, len(self.calls), occurrence, producer)
        self.calls.append(call)
        self._leaf_depth += 1
        return call

    def bn_exit(self, call: BNCall, module: nn.Module, output: Any) -> None:
        """A BN layer returns: its output tensors are now produced by this call."""
        self._leaf_depth = max(0, self._leaf_depth - 1)
        record = OpRecord(type(module).__name__, "bn", module=call.layer, source=call.producer)
        call.record = record
        self._call_by_record[record] = call
        for t in _iter_tensors(output):
            self.set_producer(t, record)

    # ---- context -----------------------------------------------------------------------
    def __enter__(self) -> Tracer:
        stack = self._stack
        try:
            for qualname, module in self.model.named_modules():
                if module in self.bn_modules or any(True for _ in module.children()):
                    continue
                label = f"{qualname or '(model)'} ({type(module).__name__})"
                if module._forward_hooks or module._forward_pre_hooks:
                    # its own hooks run after the process-wide ones: hook in after them
                    pre, post = self._own_leaf_hooks(qualname, label)
                    stack.enter_context(_removing(module.register_forward_pre_hook(pre)))
                    stack.enter_context(_removing(module.register_forward_hook(post)))
                    continue
                self._leaves.setdefault(id(module), (module, qualname, label))
            stack.enter_context(_removing(register_module_forward_pre_hook(self._leaf_pre)))
            stack.enter_context(_removing(register_module_forward_hook(self._leaf_post)))
            stack.enter_context(_RecordingMode(self))
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._guards:  # a leaf module raised before its post hook ran
            self._guards.pop().__exit__(None, None, None)
        self._stack.close()
        self._producers.clear()
        self._module_kinds.clear()
        self._leaves.clear()


@contextmanager
def _removing(handle: Any) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()

"""Load a model or checkpoint file safely, for ``bncheck audit PATH``.

Usable from Python too::

    from bncheck.loading import load_model
    loaded = load_model("ckpt.pt", arch="vgg16_bn")
    report = bncheck.audit(loaded.model)

How a file is recognised (by its bytes, never by its extension), in this order:

1. **safetensors**: the first 8 bytes are a little-endian header length ``n`` that fits in the
   file, and byte 8 is ``{`` (the JSON header). Read with the optional ``safetensors`` package.
2. **zip archive** (magic ``PK\\x03\\x04``), then by its entries:

   * ``<root>/code/...`` present: a **TorchScript** archive, read from its zip entries without
     running any of its code (``data.pkl`` by the restricted unpickler, the class
     declarations in ``code/`` as text); ``torch.jit.load`` only with ``trust_pickle``;
   * ``<root>/archive_format`` or ``<root>/models/*.json`` or
     ``serialized_exported_program.json`` present: a **torch.export** archive (``.pt2``), read
     with ``torch.export.load`` after every pickle inside it has been scanned;
   * ``<root>/data.pkl`` present: a ``torch.save`` file, read by the restricted unpickler of
     :mod:`bncheck._safe_pickle` with its tensors memory-mapped from the archive, so a big
     checkpoint is not held twice, and only tensors and plain containers can be unpickled.
3. **legacy pickle** (first byte ``0x80``, a pickle protocol marker): a pre-1.6 ``torch.save``
   file or a plain pickle, read by the same restricted unpickler (no mmap).
4. Anything else is not a checkpoint.

Only regular files are opened, and every size a file claims is checked against its size
before anything is allocated (:mod:`bncheck._readers`; ``docs/security.md``). A file whose
pickle needs code to load (a pickled full module, or a hostile pickle) is refused unless
``trust_pickle=True``; the refusal names every global the pickle would import, found by
simulating its opcodes (:func:`bncheck._safe_pickle.scan_pickle`), which executes nothing.

What the file holds, in turn:

* an ``nn.Module`` (trusted pickle, TorchScript): audited as is;
* a state dict, possibly wrapped (``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"model_state_dict": ...}``, ``{"net": ...}``) and possibly prefixed (``module.`` from
  DataParallel/DDP, ``model.`` from training frameworks, ``_orig_mod.`` from ``torch.compile``):
  with an architecture, the architecture is built on the ``meta`` device and the tensors are
  assigned (``load_state_dict(strict=False, assign=True)``, every mismatch checked first), so
  the parameters are the memory-mapped tensors and nothing is copied; without one, a stand-in
  model holding only the BN layers is reconstructed from the key groups
  ``X.weight, X.bias, X.running_mean, X.running_var, X.num_batches_tracked``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import random
import struct
import sys
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import zoo
from ._readers import (
    check_exported_program,
    check_zip_sizes,
    read_legacy,
    read_torch_zip,
    read_torchscript,
    regular_file_size,
)
from ._safe_pickle import BadTensor, numpy_scalar_kinds, scan_pickle
from .errors import BNCheckError, LoadError, UsageError, message_line
from .models import ARCHS, INPUT_SHAPES, get_arch

__all__ = [
    "LoadedModel",
    "ArchSpec",
    "load_model",
    "build_arch",
    "resolve_arch",
    "sniff_format",
    "StateDictBatchNorm",
    "ExportedBatchNorm",
    "model_from_state_dict",
    "FORMATS",
]

#: Formats :func:`sniff_format` recognises, with how they are described to users.
FORMATS: dict[str, str] = {
    "safetensors": "safetensors file",
    "torchscript": "TorchScript archive",
    "exported_program": "torch.export archive",
    "torch_zip": "torch.save checkpoint",
    "torch_legacy": "legacy (pre-1.6) torch.save checkpoint or pickle",
}

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = 0x80
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module")
_KNOWN_PREFIXES = ("module.", "model.", "_orig_mod.")
_BN_STATS = ("running_mean", "running_var")
_STANDARD_BN = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "SyncBatchNorm": nn.SyncBatchNorm,
}


def _shown(names: list[str], limit: int = 4) -> str:
    """``a, b, c, +5 more`` for a list of names."""
    head = ", ".join(names[:limit])
    return head + (f", +{len(names) - limit} more" if len(names) > limit else "")


# ---- the result ------------------------------------------------------------------------------
@dataclass
class ArchSpec:
    """An architecture to build: a built-in name or an imported factory."""

    label: str
    factory: Callable[[], Any]
    builtin: bool
    input_shape: tuple[int, ...] | None  # (C, H, W) the architecture is made for, if known
    meta_factory: Callable[[], Any] | None = None  # skips weight init (pointless on meta)


@dataclass
class LoadedModel:
    """A loaded model and what was found on the way.

    ``runnable`` is False when the model is a stand-in that holds only the BN layers (a bare
    state dict, a TorchScript archive, a torch.export archive); ``not_runnable_reason`` then
    says why the forward checks cannot run. ``missing_bn_stats`` maps each BN layer whose
    running statistics were absent from the checkpoint (and now hold their initial values) to
    the missing buffer names. ``static_unknown`` lists the model-setting rules a stand-in
    cannot judge (eps, momentum are not stored in a state dict).
    """

    model: nn.Module
    source: str
    format: str
    arch: str | None = None
    runnable: bool = True
    not_runnable_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    missing_bn_stats: dict[str, list[str]] = field(default_factory=dict)
    example_input: Any = None
    memory_mapped: bool = False
    static_unknown: str | None = None
    input_shape: tuple[int, ...] | None = None


# ---- RNG isolation ---------------------------------------------------------------------------
@contextlib.contextmanager
def isolated_rng(seed: int = 0) -> Iterator[None]:
    """Seed torch/numpy/random for a deterministic build, and restore their states after."""
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's untouched
        np.random.seed(seed)
        random.seed(seed)
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


# ---- architectures ---------------------------------------------------------------------------
def import_callable(
    spec: str, option: str, *, expected: str = "callable", installed: bool = False
) -> Callable[..., Any]:
    """The callable ``pkg.module:attr.path`` names, imported from the current directory too
    (as ``python -m`` does). Anything going wrong, including a module or lookup that calls
    ``sys.exit()`` or raises, is a one-line :class:`UsageError` that starts with ``option``;
    ``expected`` words what the callable should be."""
    module_name, _, attr_path = spec.strip().partition(":")
    if not module_name or not attr_path:
        raise UsageError(f"{option} {spec!r}: expected pkg.module:callable")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:
        raise UsageError(
            f"{option} {spec}: importing {module_name!r} called sys.exit({exc.code!r}); an "
            f"{option} module must import without exiting"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # ImportError, or anything raised while importing
        raise UsageError(
            f"{option} {spec}: cannot import {module_name!r} ({type(exc).__name__}: "
            f"{message_line(exc)}); check the module is importable from the current directory"
            + (" or installed" if installed else "")
        ) from exc
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(
                f"{option} {spec}: {module_name} has no attribute {attr_path!r}"
            ) from None
        except Exception as exc:  # a module __getattr__ or a property that raises
            raise UsageError(
                f"{option} {spec}: looking up {attr_path!r} in {module_name} raised "
                f"{type(exc).__name__}: {message_line(exc)}"
            ) from exc
    if not callable(target):
        raise UsageError(
            f"{option} {spec}: {attr_path} is a {type(target).__name__}, not {expected}"
        )
    return target  # type: ignore[no-any-return]


def resolve_arch(spec: str, arch_args: dict[str, Any] | None = None) -> ArchSpec:
    """``vgg16_bn`` (built in: ``bncheck.models.ARCHS``), ``pkg.module:callable``, or a zoo
    model ``torchvision:NAME`` / ``timm:NAME`` (:mod:`bncheck.zoo`).

    The factory is imported here (from the current directory too, like ``python -m``); it is
    called by :func:`build_arch` with ``arch_args`` as keyword arguments. Errors are
    :class:`UsageError` with one line.
    """
    spec = spec.strip()
    kwargs = dict(arch_args or {})
    if zoo.is_zoo_spec(spec):
        zoo_factory, zoo_shape = zoo.resolve(spec, kwargs)
        return ArchSpec(spec, zoo_factory, False, zoo_shape)
    if ":" not in spec:
        factory = get_arch(spec)
        return ArchSpec(
            spec,
            functools.partial(factory, **kwargs),
            True,
            INPUT_SHAPES.get(spec),
            meta_factory=functools.partial(factory, init_weights=False, **kwargs),
        )
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UsageError(
            f"--arch {spec!r}: expected pkg.module:callable or one of {', '.join(ARCHS)}"
        )
    target = import_callable(
        spec, "--arch", expected="a callable that returns an nn.Module", installed=True
    )
    return ArchSpec(spec, functools.partial(target, **kwargs) if kwargs else target, False, None)


def build_arch(arch: ArchSpec, *, meta: bool = False, values: bool = True) -> nn.Module:
    """Call the architecture's factory (seeded, global RNG untouched); on ``meta`` if asked.

    ``values`` (off the meta device): the model must hold values, not meta tensors; off when a
    checkpoint's tensors will be assigned to it (checked after that)."""
    try:
        with isolated_rng(0):
            if meta:
                with torch.device("meta"):
                    model = (arch.meta_factory or arch.factory)()
            else:
                model = arch.factory()
    except BNCheckError:
        raise
    except SystemExit as exc:
        raise UsageError(
            f"--arch {arch.label} called sys.exit({exc.code!r}) instead of returning a "
            "model; the factory must return a torch.nn.Module"
        ) from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # GeneratorExit and other BaseExceptions too: one line
        if meta and isinstance(exc, Exception):
            raise _MetaBuildFailed(exc) from exc
        raise UsageError(
            f"--arch {arch.label} raised {type(exc).__name__}: {message_line(exc)} "
            "(run it in Python, or pass --debug, for the traceback)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--arch {arch.label} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if not meta and values:
        _require_values(model, f"--arch {arch.label}")
    return model


def _require_values(model: nn.Module, what: str) -> None:
    """Refuse a model with tensors on the meta device (shapes only): nothing to audit."""
    empty = _leftover_meta(model)
    if empty:
        more = f", +{len(empty) - 3} more" if len(empty) > 3 else ""
        raise UsageError(
            f"{what} holds no values: {len(empty)} of its tensors are on the meta device "
            f"({', '.join(empty[:3])}{more}); build the model on the CPU"
        )


class _MetaBuildFailed(Exception):
    """The factory did not work on the meta device (it will be built on the CPU instead)."""


# ---- format detection ------------------------------------------------------------------------
def _check_file(path: Path) -> int:
    return regular_file_size(path)


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= size - 8 and head[8:9] == b"{"


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_sizes(path, archive, path.stat().st_size)
            names = archive.namelist()
    except LoadError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise LoadError(
            f"{path}: a zip archive that cannot be read ({exc}); the file is truncated or "
            "corrupt: save or download it again"
        ) from exc
    inner = [name.split("/", 1)[1] if "/" in name else name for name in names]
    if any(name.startswith("code/") for name in inner):
        return "torchscript"
    if any(
        name == "archive_format"
        or name.endswith("serialized_exported_program.json")
        or (name.startswith("models/") and name.endswith(".json"))
        for name in inner
    ):
        return "exported_program"
    if "data.pkl" in inner:
        return "torch_zip"
    raise LoadError(
        f"{path}: a zip archive but not a PyTorch file (no data.pkl, code/ or "
        "exported program inside); give a checkpoint saved with torch.save, "
        "torch.jit.save, torch.export.save or safetensors"
    )


def sniff_format(path: str | os.PathLike[str]) -> str:
    """The format of ``path`` (a key of :data:`FORMATS`), recognised by its bytes."""
    path = Path(path)
    size = _check_file(path)
    with path.open("rb") as fh:
        head = fh.read(16)
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if head[:4] in _ZIP_MAGIC:
        return _zip_kind(path)
    if head[0] == _PICKLE_PROTO:
        return "torch_legacy"
    text = head.decode("utf-8", errors="replace")
    printable = all(ch.isprintable() or ch.isspace() for ch in text)
    what = "a text file" if printable else "not a recognised checkpoint format"
    raise LoadError(
        f"{path}: {what}, not a model or checkpoint; bncheck reads torch.save, safetensors, "
        "TorchScript and torch.export files"
    )


# ---- pickles ---------------------------------------------------------------------------------
def pickle_globals(data: bytes, limit: int | None = None) -> list[str]:
    """Every name a pickle would import or call outside the plain-data allowlist.

    Read from its opcodes by a symbolic simulator (:func:`bncheck._safe_pickle.scan_pickle`)
    that follows the memo, ``STACK_GLOBAL``, ``getattr``/``__import__`` chains and nested
    pickles; nothing is executed. ``limit`` keeps the first names only.
    """
    names = scan_pickle(data).unsafe()
    return names if limit is None else names[:limit]


def data_globals() -> list[Any]:
    """Plain-data classes training checkpoints often hold beside the weights.

    ``argparse.Namespace`` (saved hyper-parameters) and numpy scalars, arrays and dtypes
    (saved metrics). Allowing them in the ``weights_only`` unpickler runs no code beyond
    building those values; everything else still needs ``--trust-pickle``.
    """
    import argparse

    allowed: list[Any] = [argparse.Namespace]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    multiarray = getattr(core, "multiarray", None)
    for name in ("scalar", "_reconstruct"):
        func = getattr(multiarray, name, None)
        if func is not None:
            allowed.append(func)
            allowed.append((func, f"numpy.core.multiarray.{name}"))  # saved by numpy 1.x
    allowed += [np.ndarray, np.dtype]
    for kind in numpy_scalar_kinds():
        allowed.append(type(np.dtype(kind)))
    return allowed


def _torch_load(path: Path, fmt: str, trust_pickle: bool) -> tuple[Any, bool]:
    """A ``torch.save`` file (zip or legacy) or a plain pickle, read by the restricted
    unpickler; returns (obj, memory-mapped)."""
    size = path.stat().st_size
    if fmt == "torch_zip":
        return read_torch_zip(path, path, size, trust_pickle)
    obj, _is_torch = read_legacy(path, size, trust_pickle)
    return obj, False


def _load_failure(path: Path, fmt: str, exc: Exception) -> LoadError:
    text = message_line(exc)
    lowered = text.lower()
    if fmt == "torch_legacy" and (
        "magic number" in lowered
        or "invalid load key" in lowered
        or "unpickling" in lowered
        or "pickle" in lowered
    ):
        return LoadError(
            f"{path}: a pickle but not a PyTorch checkpoint ({text}); give a file "
            "saved with torch.save(model.state_dict(), path)"
        )
    if any(
        word in lowered
        for word in (
            "central directory",
            "zip",
            "truncated",
            "eof",
            "unexpected end",
            "out of range",
            "failed reading",
        )
    ):
        return LoadError(
            f"{path}: the archive is truncated or corrupt ({text}); save or download it again"
        )
    return LoadError(
        f"{path}: cannot load the {FORMATS.get(fmt, fmt)} ({type(exc).__name__}: {text})"
    )


# ---- state dicts -----------------------------------------------------------------------------
def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, (torch.Tensor, BadTensor)) for v in obj.values())
    )


def _describe_obj(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        return f"a dict with keys {_shown(keys, 6)}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def extract_state_dict(
    obj: Any, path: Path, notes: list[str]
) -> dict[str, torch.Tensor] | nn.Module:
    """The state dict (or module) inside a loaded object; wrappers are unwrapped and noted."""
    trail: list[str] = []
    current = obj
    for _ in range(3):
        if isinstance(current, nn.Module) or _is_tensor_dict(current):
            break
        if not isinstance(current, Mapping):
            break
        key = next(
            (
                k
                for k in _WRAPPER_KEYS
                if k in current and (isinstance(current[k], (Mapping, nn.Module)))
            ),
            None,
        )
        if key is None:
            break
        others = [str(k) for k in current if k != key]
        trail.append(key)
        if others:
            notes.append(
                f"checkpoint: used [{key!r}] (the file also holds "
                f"{_shown(others, 5)}; those were not audited)"
            )
        current = current[key]
    if isinstance(current, nn.Module):
        return current
    if isinstance(current, Mapping) and current and all(isinstance(k, str) for k in current):
        for key, value in current.items():
            if isinstance(value, BadTensor):
                raise LoadError(f"{path}: tensor {_key_text(str(key))} {value.reason}")
        tensors = {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(current) / 2:
            dropped = [k for k in current if k not in tensors]
            if dropped:
                notes.append(
                    f"checkpoint: ignored {len(dropped)} non-tensor entries ({_shown(dropped)})"
                )
            return tensors
    where = "".join(f"[{k!r}]" for k in trail)
    raise LoadError(
        f"{path}: holds {_describe_obj(current)}{' at ' + where if where else ''}, not a "
        "state dict or model; save torch.save(model.state_dict(), path) "
        f"(bncheck looks under {', '.join(repr(k) for k in _WRAPPER_KEYS[:3])}, ...)"
    )


def _common_prefixes(keys: list[str]) -> list[str]:
    """Candidate prefixes: the first one or two dotted components seen in the keys."""
    seen: dict[str, None] = {}
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                seen[".".join(parts[:depth]) + "."] = None
    return list(seen)


def strip_prefix(
    sd: dict[str, torch.Tensor], expected: set[str] | None, notes: list[str]
) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix (``module.``, ``model.``...) from the keys, and say so.

    With the architecture's keys (``expected``), the prefix whose stripped keys match the most
    expected keys wins (no prefix on a tie); keys outside it are left out and listed in a
    note. Without, a known wrapper prefix is stripped only when every key carries it.
    """
    keys = list(sd)
    if expected is not None:
        best, best_score = "", len(set(keys) & expected)
        for prefix in _common_prefixes(keys):
            score = len({k[len(prefix) :] for k in keys if k.startswith(prefix)} & expected)
            if score > best_score:
                best, best_score = prefix, score
        prefix = best
    else:
        prefix = ""
        changed = True
        while changed:
            changed = False
            for known in _KNOWN_PREFIXES:
                if all(k.startswith(prefix + known) for k in keys):
                    prefix += known
                    changed = True
    if not prefix:
        return sd
    inside = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    outside = [k for k in keys if not k.startswith(prefix)]
    origin = {
        "module.": " (a DataParallel/DDP checkpoint)",
        "_orig_mod.": " (a torch.compile checkpoint)",
    }.get(prefix, "")
    notes.append(
        f"checkpoint: keys carry the prefix {prefix!r}{origin}; stripped it from {len(inside)} keys"
    )
    if outside:
        notes.append(
            f"checkpoint: left out {len(outside)} keys outside {prefix!r} ({_shown(outside)})"
        )
    return inside


def _bn_key_groups(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = tensor
    found = {}
    for prefix, group in groups.items():
        rm, rv = group.get("running_mean"), group.get("running_var")
        if (
            isinstance(rm, torch.Tensor)
            and isinstance(rv, torch.Tensor)
            and rm.dim() == 1
            and rm.shape == rv.shape
        ):
            found[prefix] = group
    return found


class StateDictBatchNorm(nn.Module):
    """A stand-in for a BN layer known only from its saved tensors (no forward).

    It holds ``running_mean``, ``running_var`` and ``num_batches_tracked`` as buffers and
    ``weight``/``bias`` as parameters, so the buffer rules read them. A state dict does not
    store ``eps``: it is assumed to be PyTorch's default, 1e-5.
    """

    eps: float = 1e-5

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], eps: float = 1e-5, momentum: float | None = None
    ) -> None:
        super().__init__()
        self.eps = eps
        if momentum is not None:
            self.momentum = momentum
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if name in tensors:
                self.register_buffer(name, tensors[name])
        for name in ("weight", "bias"):
            value = tensors.get(name)
            if isinstance(value, torch.Tensor) and value.shape == tensors["running_mean"].shape:
                param = (
                    value
                    if isinstance(value, nn.Parameter)
                    else nn.Parameter(value, requires_grad=value.is_floating_point())
                )
                self.register_parameter(name, param)
        self.num_features = int(tensors["running_mean"].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise RuntimeError("a BN layer rebuilt from a state dict cannot run; pass --arch")


class ExportedBatchNorm(StateDictBatchNorm):
    """A BN layer of a torch.export archive: saved tensors, eps and momentum from its graph."""


def _place(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted ``name`` under ``root``, creating empty containers."""
    if not name:
        return module
    parts = name.split(".")
    parent = root
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    parent.add_module(parts[-1], module)
    return root


def model_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    settings: Mapping[str, Mapping[str, float]] | None = None,
) -> nn.Module:
    """A stand-in model holding one :class:`StateDictBatchNorm` per BN key group of ``sd``.

    A BN layer is recognised by its key group: ``X.running_mean`` and ``X.running_var``
    (1-D, same shape), with ``X.weight``, ``X.bias``, ``X.num_batches_tracked`` when saved.
    The tensors are used as they are (no copy). ``settings`` maps a layer name to its
    ``eps``/``momentum`` where known (an exported program's graph records them). The model is
    in eval mode.
    """
    groups = _bn_key_groups(sd)
    settings = settings or {}
    order = {key: i for i, key in enumerate(sd)}
    root = nn.Module()
    for prefix in sorted(groups, key=lambda p: order[f"{p}.running_mean" if p else "running_mean"]):
        known = settings.get(prefix, {})
        kind = ExportedBatchNorm if prefix in settings else StateDictBatchNorm
        layer = kind(
            groups[prefix], eps=float(known.get("eps", 1e-5)), momentum=known.get("momentum")
        )
        root = _place(root, prefix, layer)
    return root.eval()


def exported_bn_settings(program: Any) -> dict[str, dict[str, float]]:
    """``eps`` and ``momentum`` of each BN layer, read from an exported program's graph.

    A batch-norm op (``aten.batch_norm``, ``aten._native_batch_norm_legit_no_training``, ...)
    is matched to its layer through the placeholder of its ``running_mean`` argument, which
    the graph signature maps to the buffer's qualified name (``features.1.running_mean``).
    """
    buffers = dict(getattr(program.graph_signature, "inputs_to_buffers", {}) or {})
    found: dict[str, dict[str, float]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or "batch_norm" not in str(node.target):
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        values = dict(zip((a.name for a in schema.arguments), node.args))
        values.update(node.kwargs)
        stat = values.get("running_mean")
        fqn = buffers.get(getattr(stat, "name", ""), "")
        if not fqn.endswith(".running_mean"):
            continue
        known: dict[str, float] = {}
        for key in ("eps", "momentum"):
            if isinstance(values.get(key), (int, float)):
                known[key] = float(values[key])
        found[fqn[: -len(".running_mean")]] = known
    return found


def _mirror_module(source: nn.Module) -> tuple[nn.Module, bool]:
    """A plain model holding the BN layers of a TorchScript module, sharing their tensors, and
    whether their settings were saved: a scripted module keeps ``eps``/``momentum`` as
    attributes, a traced one inlines them into its graph (they are then unknown)."""
    root = nn.Module()
    settings_known = True
    for name, sub in source.named_modules():
        buffers = dict(sub.named_buffers(recurse=False))
        params = dict(sub.named_parameters(recurse=False))
        rm, rv = buffers.get("running_mean"), buffers.get("running_var")
        kind = getattr(sub, "original_name", type(sub).__name__)
        standard = _STANDARD_BN.get(kind)
        if standard is not None and not hasattr(sub, "eps"):
            settings_known = False  # traced: constants inlined into the graph
            standard = None
        if standard is not None:
            num_features = int(
                getattr(sub, "num_features", 0)
                or (rm.numel() if rm is not None else params["weight"].numel())
            )
            with torch.device("meta"):
                bn = standard(
                    num_features,
                    eps=float(sub.eps),
                    momentum=getattr(sub, "momentum", 0.1),
                    affine=bool(getattr(sub, "affine", "weight" in params)),
                    track_running_stats=bool(getattr(sub, "track_running_stats", rm is not None)),
                )
            for key in list(bn._buffers):
                bn._buffers[key] = buffers.get(key)
            for key in list(bn._parameters):
                bn._parameters[key] = params.get(key)
        elif isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and rm.dim() == 1:
            tensors = {**params, **buffers}
            eps = getattr(sub, "eps", None)
            bn = type(kind, (StateDictBatchNorm,), {})(
                tensors, eps=float(eps) if isinstance(eps, (int, float)) else 1e-5
            )
        else:
            continue
        if name == "":
            return bn.eval(), settings_known
        root = _place(root, name, bn)
    return root.eval(), settings_known


# ---- fitting a state dict to an architecture -------------------------------------------------
def _bn_names(model: nn.Module) -> set[str]:
    from .discovery import iter_bn_modules

    return {name for name, _ in iter_bn_modules(model)}


def fit_state_dict(
    model: nn.Module, sd: dict[str, torch.Tensor], arch: str, path: Path, notes: list[str]
) -> dict[str, list[str]]:
    """Assign ``sd`` to ``model`` (built on meta or CPU) after checking every key and shape.

    Raises :class:`LoadError` for keys the architecture lacks, missing parameters or other
    missing tensors, and shape mismatches. Missing BN running statistics are filled with
    PyTorch's initial values (mean 0, var 1, counter 0) and returned, layer -> buffer names,
    so the audit reports them. A missing ``num_batches_tracked`` alone (checkpoints from
    PyTorch < 0.4) is filled with 0 and noted.
    """
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if mismatched:
        key = mismatched[0]
        more = (
            f" (and {len(mismatched) - 1} more: {_shown(mismatched[1:], 3)})"
            if len(mismatched) > 1
            else ""
        )
        raise LoadError(
            f"{path}: does not fit --arch {arch}: {key} has shape "
            f"{tuple(sd[key].shape)} in the checkpoint but {tuple(expected[key].shape)} in the "
            f"architecture{more}; build the architecture the checkpoint was saved from "
            "(--arch pkg.module:factory)"
        )
    bn_names = _bn_names(model)
    stats_missing: dict[str, list[str]] = {}
    counters_missing: list[str] = []
    fatal: list[str] = []
    for key in missing:
        prefix, _, leaf = key.rpartition(".")
        if prefix in bn_names and leaf in _BN_STATS:
            stats_missing.setdefault(prefix, []).append(leaf)
        elif prefix in bn_names and leaf == "num_batches_tracked":
            counters_missing.append(key)
        else:
            fatal.append(key)
    if fatal or unexpected:
        parts = []
        if fatal:
            parts.append(f"{len(fatal)} keys missing from the checkpoint ({_shown(fatal)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_shown(unexpected)})")
        raise LoadError(
            f"{path}: does not fit --arch {arch}: {'; '.join(parts)}; build the "
            "architecture the checkpoint was saved from (--arch pkg.module:factory)"
        )
    model.load_state_dict(sd, strict=False, assign=True)
    modules = dict(model.named_modules())
    for prefix, leaves in stats_missing.items():
        bn = modules[prefix]
        for leaf in leaves:
            like = expected[f"{prefix}.{leaf}"]
            init = torch.zeros if leaf == "running_mean" else torch.ones
            bn._buffers[leaf] = init(like.shape, dtype=like.dtype)
    for key in counters_missing:
        prefix, _, leaf = key.rpartition(".")
        modules[prefix]._buffers[leaf] = torch.zeros((), dtype=torch.long)
    if stats_missing:
        keys = [f"{p}.{leaf}" for p, leaves in stats_missing.items() for leaf in leaves]
        notes.append(
            f"checkpoint: {len(keys)} BN buffers missing: {_shown(keys)} - the running "
            "statistics were not saved; the audited model has the initial values "
            "(mean 0, var 1)"
        )
    # a counter missing beside missing statistics is part of "not saved"; alone, it usually
    # means a checkpoint from PyTorch < 0.4, which had no counter
    counters_only = [k for k in counters_missing if k.rpartition(".")[0] not in stats_missing]
    if counters_only:
        notes.append(
            f"checkpoint: num_batches_tracked missing in {len(counters_only)} BN "
            "layers (saved by PyTorch < 0.4?); set to 0"
        )
    return stats_missing


def _leftover_meta(model: nn.Module) -> list[str]:
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    return names


def _fit_to_arch(
    arch: ArchSpec, sd: dict[str, torch.Tensor], path: Path, notes: list[str]
) -> tuple[nn.Module, dict[str, list[str]]]:
    """Build ``arch`` on meta (CPU if the factory needs real tensors) and assign ``sd``."""
    validate_state_dict(sd, path)
    try:
        model = build_arch(arch, meta=True)
        on_meta = True
    except _MetaBuildFailed:
        model = build_arch(arch, meta=False, values=False)
        on_meta = False
        notes.append(
            f"--arch {arch.label} cannot be built on the meta device; built it on the "
            "CPU (the checkpoint's tensors replace its initial ones)"
        )
    expected = set(model.state_dict())
    sd = strip_prefix(sd, expected, notes)
    missing_stats = fit_state_dict(model, sd, arch.label, path, notes)
    leftover = _leftover_meta(model) if on_meta else []
    if leftover:
        # Non-persistent buffers are not in a state dict: build for real and assign again.
        model = build_arch(arch, meta=False, values=False)
        missing_stats = fit_state_dict(model, sd, arch.label, path, [])
    _require_values(model, f"{path}: --arch {arch.label}")
    return model, missing_stats


@contextlib.contextmanager
def _quiet_export_log() -> Iterator[list[str]]:
    """Keep ``torch.export.load``'s logged traceback off stderr (the CLI prints one line);
    yields the last line of each record it logged (the error it hit)."""
    import logging

    logger = logging.getLogger("torch.export")
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                text = record.getMessage()
                if record.exc_info and record.exc_info[1] is not None:
                    exc = record.exc_info[1]
                    text = f"{type(exc).__name__}: {message_line(exc)}"
                tail = [t for t in text.strip().splitlines() if t.strip()]
                if tail:
                    lines.append(tail[-1].strip())

    saved = logger.handlers[:], logger.propagate
    logger.handlers = [_Keep()]
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.handlers, logger.propagate = saved


def _sample_input(saved: Any) -> Any:
    """An exported program's ``(args, kwargs)`` as the engine's input: tensor, tuple or dict."""
    if not isinstance(saved, tuple) or len(saved) != 2:
        return None
    args, kwargs = saved
    if kwargs and not args:
        return dict(kwargs)
    if kwargs:
        return None  # positional and keyword inputs together: not representable, so none
    if len(args) == 1:
        return args[0]
    return tuple(args) if args else None


# ---- entry point -----------------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise LoadError(
            f"{path}: a safetensors file, and reading it needs the safetensors "
            "package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise LoadError(
            f"{path}: the safetensors file is truncated or corrupt "
            f"({message_line(exc)}); save or download it again"
        ) from exc


def _stand_in(
    sd: dict[str, torch.Tensor],
    path: Path,
    fmt: str,
    notes: list[str],
    settings: Mapping[str, Mapping[str, float]] | None = None,
) -> LoadedModel:
    from .errors import NoBatchNormError

    validate_state_dict(sd, path)
    sd = strip_prefix(sd, None, notes)
    if not _bn_key_groups(sd):
        raise NoBatchNormError(
            f"{path}: the state dict has no BatchNorm running statistics (no key pairs "
            "X.running_mean / X.running_var), so there is nothing to check"
        )
    model = model_from_state_dict(sd, settings)
    layers = set(_bn_key_groups(sd))
    if settings and layers <= set(settings):
        notes.append(
            "rebuilt the BN layers from their saved tensors, with eps and momentum "
            "from the exported graph"
        )
        return LoadedModel(
            model,
            str(path),
            fmt,
            runnable=False,
            notes=notes,
            not_runnable_reason="pass --arch to run the forward checks",
        )
    notes.append(
        "a state dict holds no architecture: rebuilt the BN layers from their saved "
        "tensors (eps assumed 1e-5); pass --arch to run every check"
    )
    return LoadedModel(
        model,
        str(path),
        fmt,
        runnable=False,
        not_runnable_reason="the file is a state dict with no architecture: "
        "pass --arch to run the forward checks",
        notes=notes,
        static_unknown="a state dict does not store the layers' settings "
        "(eps, momentum, track_running_stats, train mode): pass "
        "--arch to check them",
    )


def _read_torchscript(path: Path, trust_pickle: bool) -> nn.Module:
    """A TorchScript archive: rebuilt from its zip entries (no code runs), or with
    ``torch.jit.load`` when trusted."""
    if trust_pickle:
        try:
            module: nn.Module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise _load_failure(path, "torchscript", exc) from exc
        return module
    module, runs = read_torchscript(path, path.stat().st_size)
    if runs:
        raise LoadError(
            f"{path}: loading this TorchScript archive runs {', '.join(runs)} (TorchScript "
            "code from the file, which can read and write files); bncheck does not run it "
            "unless you pass --trust-pickle for a file you trust"
        )
    return module


_PLAIN_MODULE = nn.Module()
#: Deepest module nesting a state dict key may have (real models stay well under 30).
MAX_KEY_DEPTH = 64


def _refuse_bad_tensors(obj: Any, path: Path, trail: str = "", depth: int = 0) -> None:
    """Raise for a tensor the file describes but does not hold (see ``BadTensor``)."""
    if depth > 8:
        return
    if isinstance(obj, BadTensor):
        if obj.corrupt:
            raise LoadError(f"{path}: tensor {_key_text(trail or '(top level)')} {obj.reason}")
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(value, (BadTensor, Mapping, list, tuple)):
                _refuse_bad_tensors(value, path, f"{trail}.{key}" if trail else str(key), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            if isinstance(value, (BadTensor, Mapping, list, tuple)):
                _refuse_bad_tensors(value, path, f"{trail}[{i}]", depth + 1)


def _key_text(key: str, limit: int = 60) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def validate_state_dict(sd: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse keys no module tree can have and tensors bncheck cannot audit, naming the key.

    A key must be dotted names (no empty part), at most :data:`MAX_KEY_DEPTH` deep, none an
    attribute every module has (``training``, ``forward``...); a tensor must hold values
    (not ``meta``), be dense, and BN statistics and affine parameters must be real numbers.
    """
    meta = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise LoadError(
            f"{path}: the checkpoint holds no values: {len(meta)} of its {len(sd)} tensors "
            f"are meta tensors (shapes only, e.g. {_key_text(meta[0])}); save the model after "
            "its weights are materialised (not built on the meta device)"
        )
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) > MAX_KEY_DEPTH:
            raise LoadError(
                f"{path}: key {_key_text(key)} is nested {len(parts)} modules deep (at most "
                f"{MAX_KEY_DEPTH}); the file is corrupt or crafted"
            )
        if any(part == "" for part in parts):
            raise LoadError(
                f"{path}: key {_key_text(key)} has an empty name between dots; no module "
                "tree has such a key"
            )
        reserved = next((p for p in parts if hasattr(_PLAIN_MODULE, p)), None)
        if reserved is not None:
            raise LoadError(
                f"{path}: key {_key_text(key)}: {reserved!r} is an attribute of every torch "
                "module, so no module or tensor can have that name; the file is corrupt "
                "or crafted"
            )
        if not isinstance(value, torch.Tensor):
            continue
        if value.layout != torch.strided:
            raise LoadError(
                f"{path}: tensor {_key_text(key)} is a {str(value.layout).replace('torch.', '')}"
                " tensor; bncheck audits dense tensors (save tensor.to_dense())"
            )
        leaf = parts[-1]
        if leaf in ("running_mean", "running_var", "weight", "bias") and (
            value.is_complex() or value.dtype == torch.bool
        ):
            raise LoadError(
                f"{path}: tensor {_key_text(key)} has dtype "
                f"{str(value.dtype).replace('torch.', '')}; BatchNorm statistics and "
                "parameters are real numbers"
            )


#: Largest synthetic input batch the command line makes, in bytes (float32 values).
INPUT_BUDGET_BYTES = 1 << 30


def check_input_size(shape: tuple[int, ...], flag: str = "--input-shape") -> None:
    """Refuse an input batch over :data:`INPUT_BUDGET_BYTES`, naming the flag that set it."""
    import math

    values = math.prod(shape)
    if values * 4 > INPUT_BUDGET_BYTES:
        text = ",".join(map(str, shape))
        raise UsageError(
            f"{flag}: an input of shape {text} is {values:.3g} values ({values * 4 / 2**30:.3g} "
            f"GiB as float32), over bncheck's input budget of {INPUT_BUDGET_BYTES // 2**30} "
            "GiB; give a smaller batch or spatial size"
        )


def load_model(
    path: str | os.PathLike[str], arch: str | ArchSpec | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load ``path`` safely and return the model to audit with what was found.

    Args:
        path: a checkpoint, state dict, safetensors, TorchScript or torch.export file.
        arch: the architecture for a state dict: a name of ``bncheck.models.ARCHS`` or
            ``pkg.module:callable``. Ignored (with a note) for files that hold a model.
        trust_pickle: allow unpickling a full pickled module (this can run arbitrary code).

    A loaded model is put in eval mode (it is what would be used for inference). The file is
    never written: memory-mapped tensors are mapped copy-on-write.

    Raises:
        LoadError: the file cannot be read, is not a checkpoint, or does not fit ``arch``.
        UsageError: ``arch`` is unknown, cannot be imported or its factory fails.
        NoBatchNormError: a state dict with no BN layer.
    """
    path = Path(path)
    spec = resolve_arch(arch) if isinstance(arch, str) else arch
    fmt = sniff_format(path)
    notes: list[str] = [f"file: {FORMATS[fmt]}"]
    example_input: Any = None
    mmapped = False
    obj: Any
    if fmt == "torchscript":
        obj = _read_torchscript(path, trust_pickle)
        if spec is None:
            model, settings_known = _mirror_module(obj)
            return LoadedModel(
                model,
                str(path),
                fmt,
                runnable=False,
                not_runnable_reason="TorchScript modules cannot be hooked, so the forward "
                "checks cannot run: pass --arch (the archive's weights "
                "are loaded into it) to run them",
                notes=notes
                + [
                    "rebuilt the BN layers of the TorchScript archive with their "
                    + (
                        "saved settings and tensors"
                        if settings_known
                        else "saved tensors (a traced archive inlines eps and momentum into its "
                        "graph; eps assumed 1e-5)"
                    )
                ],
                static_unknown=None
                if settings_known
                else "a traced TorchScript archive inlines the layers' settings (eps, momentum) "
                "into its graph: pass --arch to check them",
            )
        obj = {k: v for k, v in obj.state_dict().items()}
    elif fmt == "exported_program":
        if not trust_pickle:
            check_exported_program(path, path.stat().st_size)
        try:
            with path.open("rb") as fh, _quiet_export_log() as logged:  # any extension
                program = torch.export.load(fh)
        except Exception as exc:
            if logged:  # torch logs the error it hit, then raises a vaguer one
                raise LoadError(
                    f"{path}: cannot load the torch.export archive ({logged[-1]})"
                ) from exc
            raise _load_failure(path, fmt, exc) from exc
        obj = dict(program.state_dict)
        example_input = _sample_input(program.example_inputs)
        if spec is None:
            loaded = _stand_in(obj, path, fmt, notes, exported_bn_settings(program))
            loaded.not_runnable_reason = (
                "an exported program runs as one graph whose BN "
                "layers cannot be hooked: pass --arch (the archive's "
                "weights are loaded into it) to run the forward checks"
            )
            return loaded
    elif fmt == "safetensors":
        obj = _read_safetensors(path)
    else:
        obj, mmapped = _torch_load(path, fmt, trust_pickle)
    _refuse_bad_tensors(obj, path)
    content = extract_state_dict(obj, path, notes)
    if isinstance(content, nn.Module):
        if spec is not None:
            notes.append(f"--arch {spec.label} ignored: the file holds a full model")
        notes.append(f"pickled full module {type(content).__name__} (loaded with --trust-pickle)")
        return LoadedModel(content.eval(), str(path), fmt, notes=notes, memory_mapped=mmapped)
    if spec is None:
        loaded = _stand_in(content, path, fmt, notes)
        loaded.memory_mapped = mmapped
        return loaded
    model, missing_stats = _fit_to_arch(spec, content, path, notes)
    return LoadedModel(
        model.eval(),
        str(path),
        fmt,
        arch=spec.label,
        notes=notes,
        missing_bn_stats=missing_stats,
        example_input=example_input,
        memory_mapped=mmapped,
        input_shape=spec.input_shape,
    )


__all__ += [
    "extract_state_dict",
    "strip_prefix",
    "fit_state_dict",
    "pickle_globals",
    "isolated_rng",
    "exported_bn_settings",
    "data_globals",
    "validate_state_dict",
    "check_input_size",
]

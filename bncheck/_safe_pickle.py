"""Reading pickles without running them: an opcode simulator and a restricted unpickler.

Two tools, both used by :mod:`bncheck.loading`:

* :func:`scan_pickle` walks a pickle's opcodes (``pickletools.genops``) on a symbolic stack
  with its memo, so it knows every name the pickle would import (``GLOBAL``, ``INST``,
  ``STACK_GLOBAL`` with strings fetched from the memo, names built at load through
  ``getattr``/``__import__``, copyreg extension codes) and every nested pickle or
  ``torch.save`` archive carried as bytes. It executes nothing.
* :class:`RestrictedUnpickler` loads a pickle whose every import is in :data:`SAFE_NAMES`
  (tensors, storages, dtypes, plain containers, saved hyper-parameters and numpy values);
  ``find_class`` refuses anything else, and ``BUILD`` only fills plain objects.

Tensors are rebuilt with checks: a storage must hold the bytes its tensor claims, so a file
cannot make bncheck allocate more than it stores (see :class:`BadTensor`).
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import torch

__all__ = [
    "PickleScan",
    "scan_pickle",
    "RestrictedUnpickler",
    "Refused",
    "BadTensor",
    "SAFE_NAMES",
    "is_dangerous",
]

#: Modules whose callables run commands, touch files or run code: always named in a refusal.
_DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "sys",
    "shutil",
    "socket",
    "pickle",
    "_pickle",
    "marshal",
    "importlib",
    "runpy",
    "code",
    "codeop",
    "pty",
    "ctypes",
    "webbrowser",
    "urllib",
    "http",
    "pathlib",
    "io",
    "tempfile",
    "multiprocessing",
    "dill",
    "torch.storage",
    "torch.serialization",
    "torch.jit",
    "torch.ops",
    "torch.hub",
)
_DANGEROUS_BUILTINS = {
    "eval",
    "exec",
    "compile",
    "open",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "exit",
    "quit",
}
COMPUTED = "<a name computed while unpickling>"
#: Most opcodes a pickle may have (nested ones included): a state dict of 100,000 tensors has
#: about 2.5 million. Each opcode can make a Python object, so this bounds the memory the
#: structure of a checkpoint takes, whatever its size.
MAX_OPCODES = 4_000_000
_MAX_NESTING = 4


def is_dangerous(name: str) -> bool:
    """Whether ``name`` (``module.attr``) is a callable that can act outside the process."""
    if name.startswith("<"):
        return True
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _DANGEROUS_BUILTINS
    return any(name == m or name.startswith(m + ".") for m in _DANGEROUS_MODULES)


# ---- the opcode simulator --------------------------------------------------------------------
class _Mark:
    pass


_MARK = _Mark()


@dataclass(frozen=True)
class _Name:
    """A global (or a module) on the symbolic stack."""

    name: str


@dataclass(frozen=True)
class _Result:
    """The value a call returns at load time."""

    of: str


@dataclass
class PickleScan:
    """What a pickle would do when loaded, read from its opcodes.

    ``imports``: every global it imports or computes, in order of first appearance, nested
    pickles included (``os.system``, ``torch._utils._rebuild_tensor_v2``). ``calls``: the
    callables it calls (``REDUCE``, ``NEWOBJ``, ``INST``, ``OBJ``). ``storages``: the
    persistent ids of ``torch.save`` storages, ``(key, storage type, location, numel)``.
    ``error``: the opcode reader's complaint when the pickle is malformed.
    """

    imports: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    storages: list[tuple[Any, str, Any, Any]] = field(default_factory=list)
    nested: int = 0
    error: str | None = None
    opcodes: int = 0
    too_long: bool = False

    def unsafe(self, extra: frozenset[str] = frozenset(), strict: bool = False) -> list[str]:
        """The imported names outside :data:`SAFE_NAMES`, in order, once: ``extra`` names are
        allowed too, or, with ``strict``, refused too."""
        names = dict.fromkeys(self.imports + self.calls)
        if strict:
            return [n for n in names if n not in SAFE_NAMES or n in extra]
        return [n for n in names if n not in SAFE_NAMES and n not in extra]

    def _add(self, bucket: list[str], name: str) -> None:
        if name not in bucket:
            bucket.append(name)


_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_BYTES_OPS = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_VALUE_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_GETATTR = {"builtins.getattr", "__builtin__.getattr"}
#: Callables that unpickle their bytes argument: it is scanned as a nested pickle.
_LOADERS = {
    "pickle.loads",
    "_pickle.loads",
    "pickle._loads",
    "dill.loads",
    "dill._dill.loads",
    "cloudpickle.loads",
    "torch.load",
    "torch.serialization.load",
    "torch.storage._load_from_bytes",
}
_IMPORTERS = {"builtins.__import__", "__builtin__.__import__", "importlib.import_module"}


def _describe(item: Any) -> str:
    if isinstance(item, _Name):
        return item.name
    if isinstance(item, _Result):
        return f"the result of {item.of}"
    return COMPUTED


def _looks_nested(value: bytes) -> bool:
    return (len(value) > 2 and value[0] == 0x80 and 1 <= value[1] <= 5) or value[
        :4
    ] == b"PK\x03\x04"


def scan_pickle(
    data: bytes | IO[bytes], _scan: PickleScan | None = None, _depth: int = 0
) -> PickleScan:
    """Simulate the opcodes of ``data`` (bytes, or a binary file read up to its ``STOP``)
    on a symbolic stack and memo; runs nothing."""
    scan = _scan if _scan is not None else PickleScan()
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}

    refs: dict[str, int] = {}  # pushes of getattr/__import__, and their resolved calls
    resolved: dict[str, int] = {}

    def push(item: Any) -> None:
        if isinstance(item, _Name) and item.name in _GETATTR | _IMPORTERS:
            refs[item.name] = refs.get(item.name, 0) + 1
        stack.append(item)

    def pop() -> Any:
        return stack.pop() if stack else None

    def pop_mark() -> list[Any]:
        nonlocal stack
        items = stack
        stack = marks.pop() if marks else []
        return items

    def nested(value: Any) -> None:
        if isinstance(value, (bytes, bytearray)) and _looks_nested(bytes(value)):
            scan.nested += 1
            if _depth >= _MAX_NESTING:
                scan._add(scan.imports, "<a pickle nested too deep to read>")
                return
            for inner in _inner_pickles(bytes(value)):
                scan_pickle(inner, scan, _depth + 1)

    def call(func: Any, args: Any) -> Any:
        name = _describe(func)
        is_name = isinstance(func, _Name) and isinstance(args, tuple)
        if is_name and func.name in _GETATTR and len(args) >= 2 and isinstance(args[1], str):
            resolved[func.name] = resolved.get(func.name, 0) + 1
            target = f"{_describe(args[0])}.{args[1]}"
            scan._add(scan.imports, target)
            return _Name(target)
        if is_name and func.name in _IMPORTERS and args and isinstance(args[0], str):
            resolved[func.name] = resolved.get(func.name, 0) + 1
            scan._add(scan.imports, args[0])
            return _Name(args[0])
        if not isinstance(func, _Name):
            scan._add(scan.calls, name)
        first = args[0] if isinstance(args, tuple) and args else None
        if name == "_codecs.encode" and isinstance(first, str):
            return first.encode("latin-1", errors="replace")  # the bytes it makes
        if name in _LOADERS and isinstance(first, (str, bytes)):
            raw = first.encode("latin-1", errors="replace") if isinstance(first, str) else first
            if not _looks_nested(raw):  # a protocol 0/1 pickle: no header to recognise it by
                scan.nested += 1
                if _depth < _MAX_NESTING:
                    scan_pickle(raw, scan, _depth + 1)
        return _Result(name)

    try:
        for opcode, arg, _pos in pickletools.genops(data):
            op = opcode.name
            scan.opcodes += 1
            if scan.opcodes > MAX_OPCODES:
                scan.error = f"more than {MAX_OPCODES} opcodes"
                scan.too_long = True
                break
            if op in _STRING_OPS:
                value = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                stack.append(value)
                if isinstance(arg, bytes):
                    nested(arg)
                elif isinstance(value, str) and value[:1] == "\x80":
                    nested(value.encode("latin-1", errors="replace"))
            elif op in _BYTES_OPS:
                stack.append(bytes(arg or b""))
                nested(arg)
            elif op in _VALUE_OPS:
                stack.append(arg)
            elif op == "NONE":
                stack.append(None)
            elif op in ("NEWTRUE", "NEWFALSE"):
                stack.append(op == "NEWTRUE")
            elif op == "MARK":
                marks.append(stack)
                stack = []
            elif op == "POP":
                pop()
            elif op == "POP_MARK":
                pop_mark()
            elif op == "DUP":
                stack.append(stack[-1] if stack else None)
            elif op == "EMPTY_TUPLE":
                stack.append(())
            elif op in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(op[-1])
                items = [pop() for _ in range(n)][::-1]
                stack.append(tuple(items))
            elif op == "TUPLE":
                items = pop_mark()  # rebinds ``stack``: append afterwards
                stack.append(tuple(items))
            elif op in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append(_Result(op.lower()))
            elif op in ("LIST", "DICT", "FROZENSET"):
                pop_mark()
                stack.append(_Result(op.lower()))
            elif op in ("APPEND", "SETITEM"):
                for _ in range(1 if op == "APPEND" else 2):
                    pop()
            elif op in ("APPENDS", "SETITEMS", "ADDITEMS"):
                pop_mark()
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg or 0)] = stack[-1] if stack else None
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                push(memo.get(int(arg or 0)))
            elif op == "GLOBAL":
                name = str(arg).replace(" ", ".", 1)
                scan._add(scan.imports, name)
                push(_Name(name))
            elif op == "STACK_GLOBAL":
                attr, module = pop(), pop()
                if isinstance(module, str) and isinstance(attr, str):
                    name = f"{module}.{attr}"
                else:
                    name = COMPUTED
                scan._add(scan.imports, name)
                push(_Name(name))
            elif op in ("EXT1", "EXT2", "EXT4"):
                name = f"<copyreg extension {arg}>"
                scan._add(scan.imports, name)
                stack.append(_Name(name))
            elif op == "REDUCE":
                args = pop()
                func = pop()
                stack.append(call(func, args))
            elif op == "NEWOBJ":
                args, cls = pop(), pop()
                stack.append(call(cls, args))
            elif op == "NEWOBJ_EX":
                _kwargs, args, cls = pop(), pop(), pop()
                stack.append(call(cls, args))
            elif op == "INST":
                name = str(arg).replace(" ", ".", 1)
                scan._add(scan.imports, name)
                args = tuple(pop_mark())
                stack.append(call(_Name(name), args))
            elif op == "OBJ":
                items = pop_mark()
                cls = items[0] if items else None
                stack.append(call(cls, tuple(items[1:])))
            elif op == "BUILD":
                pop()
            elif op in ("PERSID", "BINPERSID"):
                pid = arg if op == "PERSID" else pop()
                if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
                    kind = _describe(pid[1])
                    scan.storages.append((pid[2], kind, pid[3], pid[4]))
                stack.append(_Result("a stored tensor"))
            elif op in ("NEXT_BUFFER", "READONLY_BUFFER"):
                if op == "NEXT_BUFFER":
                    stack.append(_Result("an out-of-band buffer"))
            elif op in ("PROTO", "FRAME", "STOP"):
                continue
            else:  # an opcode this simulator does not model: say so rather than guess
                scan._add(scan.imports, f"<opcode {op}>")
                stack.append(None)
    except Exception as exc:  # truncated or malformed: what was read so far is reported
        scan.error = str(exc)
    for name, count in refs.items():
        # getattr(X, "attr") / __import__("m") with constant arguments is listed as what it
        # reaches (X.attr, m); the helper itself only when some use of it was not resolved
        if resolved.get(name, 0) == count and name in scan.imports:
            scan.imports.remove(name)
    return scan


def _inner_pickles(value: bytes) -> list[Any]:
    """The pickles inside ``value``: the first few back to back (a legacy ``torch.save`` file
    is five pickles, then raw bytes), or the ``.pkl`` entries of a ``torch.save`` zip."""
    if value[:4] != b"PK\x03\x04":
        found: list[Any] = []
        stream = io.BytesIO(value)
        for _ in range(5):
            start = stream.tell()
            if stream.read(1) != b"\x80":
                break
            stream.seek(start)
            try:
                for _op in pickletools.genops(stream):
                    pass
            except Exception:
                found.append(value[start:])
                break
            found.append(value[start : stream.tell()])
        return found
    try:
        with zipfile.ZipFile(io.BytesIO(value)) as archive:
            found = []
            for info in archive.infolist():
                if info.filename.endswith(".pkl") and info.file_size <= len(value):
                    found.append(archive.read(info))
            return found
    except Exception:
        return []


# ---- the restricted unpickler ----------------------------------------------------------------
class Refused(pickle.UnpicklingError):
    """The pickle imports a name outside the allowlist."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused to import {name}")
        self.name = name


@dataclass
class BadTensor:
    """Stands in for a tensor the file describes but does not hold (or holds in a form bncheck
    refuses): the loader names its key and ``reason``. ``corrupt``: the file claims bytes it
    does not hold (refused wherever the tensor is); otherwise a valid tensor bncheck does not
    read (sparse, quantized), refused only where it would be audited."""

    reason: str
    corrupt: bool = True


@dataclass
class StorageRecord:
    """A storage the pickle refers to: its dtype, element count and where its bytes are."""

    dtype: torch.dtype
    numel: int
    location: str
    storage: torch.UntypedStorage | None = None  # None on the meta device

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` and friends unpickle to here: only their dtype."""

    name: str
    dtype: torch.dtype


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"a tensor's {what} is not a tuple of sizes")
    return value


def _rebuild_tensor(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *_: Any
) -> Any:
    size, stride = _shape(size, "size"), _shape(stride, "stride")
    if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError("a tensor's offset or stride does not fit its size")
    if isinstance(storage, BadTensor):
        return storage
    if not isinstance(storage, StorageRecord):
        raise pickle.UnpicklingError("a tensor without a storage")
    numel = math.prod(size)
    needed = 0 if numel == 0 else offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    shape_text = "x".join(map(str, size)) or "scalar"
    if needed > storage.numel:
        return BadTensor(
            f"claims {numel} elements ({shape_text}, {storage.dtype}) but its storage holds "
            f"{storage.numel}"
        )
    if numel > max(storage.numel, 1):
        return BadTensor(
            f"claims {numel} elements ({shape_text}) over a storage of {storage.numel} "
            "(an expanded view, which bncheck does not load)"
        )
    if storage.storage is None:  # meta: shape only
        tensor = torch.empty_strided(size, stride, dtype=storage.dtype, device="meta")
    else:
        tensor = torch.empty((0,), dtype=storage.dtype).set_(storage.storage, offset, size, stride)
    if requires_grad is True and tensor.is_floating_point():
        tensor.requires_grad_(True)
    return tensor


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    *_: Any,
) -> Any:
    """A tensor of a dtype with no typed storage class (float8, uint16...): the storage is
    untyped bytes, viewed as ``dtype``."""
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a tensor without a dtype")
    if isinstance(storage, StorageRecord):
        itemsize = _itemsize(dtype)
        storage = StorageRecord(
            dtype, storage.nbytes // itemsize, storage.location, storage.storage
        )
    return _rebuild_tensor(storage, offset, size, stride, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any, *_: Any) -> Any:
    if isinstance(data, BadTensor):
        return data
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter without a tensor")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad) and data.is_floating_point())


def _rebuild_meta(dtype: Any, size: Any, stride: Any, requires_grad: Any = False) -> Any:
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a meta tensor without a dtype")
    return torch.empty_strided(
        _shape(size, "size"), _shape(stride, "stride"), dtype=dtype, device="meta"
    )


def _sparse(*_: Any) -> BadTensor:
    return BadTensor("is a sparse tensor (bncheck reads dense tensors only)", corrupt=False)


def _quantized(*_: Any) -> BadTensor:
    return BadTensor("is a quantized tensor (bncheck reads float tensors only)", corrupt=False)


class _NdarrayType:
    """``numpy.ndarray`` as a pickle may name it: only an argument of ``_reconstruct``."""


_NDARRAY = _NdarrayType()


def _np_reconstruct(cls: Any, shape: Any, dtype: Any) -> Any:
    import numpy as np

    if cls is not _NDARRAY or not isinstance(shape, tuple) or math.prod(shape) > 1:
        raise pickle.UnpicklingError("numpy _reconstruct with unexpected arguments")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _bytes(value: Any = b"", *rest: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or rest:
        raise pickle.UnpicklingError("bytes() of something other than bytes")
    return bytes(value)


def _bytearray(value: Any = b"") -> bytearray:
    if not isinstance(value, (bytes, bytearray)):
        raise pickle.UnpicklingError("bytearray of something other than bytes")
    return bytearray(value)


def _get_layout(name: Any) -> Any:
    layouts = {f"torch.{n}": getattr(torch, n) for n in ("strided", "sparse_coo", "sparse_csr")}
    if name not in layouts:
        raise pickle.UnpicklingError(f"an unknown tensor layout {name!r}")
    return layouts[name]


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with an unexpected encoding")
    return text.encode("latin-1")


def numpy_scalar_kinds() -> tuple[Any, ...]:
    """The numpy scalar types whose dtypes a checkpoint may hold (numpy arrays saved beside
    the tensors: plain numbers, never objects)."""
    import numpy as np

    return (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.float16,
        np.float32,
        np.float64,
        np.complex64,
        np.complex128,
    )


def _safe_names() -> dict[str, Any]:
    import argparse

    import numpy as np

    names: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._utils._rebuild_meta_tensor_no_storage": _rebuild_meta,
        "torch._utils._rebuild_sparse_tensor": _sparse,
        "torch._utils._rebuild_sparse_csr_tensor": _sparse,
        "torch._utils._rebuild_qtensor": _quantized,
        "torch.Size": torch.Size,
        "torch.serialization._get_layout": _get_layout,
        "_codecs.encode": _encode,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.bytearray": _bytearray,
        "builtins.bytes": _bytes,
        "builtins.complex": complex,
        "argparse.Namespace": argparse.Namespace,
        "numpy.ndarray": _NDARRAY,
        "numpy.dtype": np.dtype,
    }
    for name in (
        "set",
        "frozenset",
        "bytearray",
        "bytes",
        "complex",
    ):  # protocol 2's Python 2 names
        names[f"__builtin__.{name}"] = names[f"builtins.{name}"]
    for kind, dtype in _STORAGE_DTYPES.items():
        names[f"torch.{kind}"] = StorageType(kind, dtype)
    names["torch.storage.UntypedStorage"] = names["torch.UntypedStorage"]
    for attr in dir(torch):
        value = getattr(torch, attr, None)
        if isinstance(value, torch.dtype):
            names[f"torch.{attr}"] = value
    for layout in ("sparse_coo", "sparse_csr", "strided"):
        names[f"torch.{layout}"] = getattr(torch, layout)
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    multiarray = getattr(core, "multiarray", None)
    scalar = getattr(multiarray, "scalar", None)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        names[f"{module}._reconstruct"] = _np_reconstruct
        if scalar is not None:
            names[f"{module}.scalar"] = scalar
    for kind in numpy_scalar_kinds():
        cls = type(np.dtype(kind))
        names[f"numpy.dtypes.{cls.__name__}"] = cls
    return names


#: Every name a pickle may import without ``--trust-pickle``, and what it unpickles to here.
SAFE_NAMES: dict[str, Any] = _safe_names()


def _buildable() -> tuple[type, ...]:
    import argparse

    import numpy as np

    return (OrderedDict, argparse.Namespace, np.ndarray, np.dtype)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """An unpickler that imports only :data:`SAFE_NAMES` and builds only plain objects.

    ``persistent_load`` is the caller's: it turns a ``torch.save`` storage id into a
    :class:`StorageRecord` (or a :class:`BadTensor` when the file does not hold the bytes).
    The pure-Python unpickler is used so that ``BUILD`` can be restricted too; the pickles it
    reads hold only the structure of a checkpoint, the tensor bytes are read separately.
    """

    def __init__(
        self,
        file: Any,
        persistent_load: Callable[[Any], Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent_load
        self._extra = extra or {}
        self._buildable = _buildable()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in self._extra:
            return self._extra[full]
        if full in SAFE_NAMES:
            return SAFE_NAMES[full]
        raise Refused(full)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("a persistent id outside a torch.save file")
        return self._persistent(pid)

    def _load_build(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        state = stack.pop()
        inst = stack[-1]
        if isinstance(inst, self._buildable) and not isinstance(inst, (list, tuple)):
            import numpy as np

            if isinstance(inst, (np.ndarray, np.dtype)):
                inst.__setstate__(state)  # type: ignore[union-attr]
                return
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
                if slots:
                    raise pickle.UnpicklingError("slot state on a plain object")
            if isinstance(state, dict):
                for key, value in state.items():
                    if not isinstance(key, str):
                        raise pickle.UnpicklingError("a non-string attribute name")
                    if hasattr(type(inst), key):  # e.g. an OrderedDict whose items() is not
                        raise pickle.UnpicklingError(
                            f"BUILD sets {key!r} on a {type(inst).__name__}, hiding its own "
                            "attribute of that name"
                        )
                    inst.__dict__[key] = value
                return
        hook = getattr(inst, "_bncheck_build", None)
        if hook is not None:
            hook(state)
            return
        raise pickle.UnpicklingError(f"BUILD on a {type(inst).__name__}")

    def _load_ext(self) -> None:
        raise Refused("<copyreg extension>")

    # the pure-Python unpickler's opcode table, with BUILD and the EXT opcodes replaced
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BUILD[0]] = _load_build  # type: ignore[assignment]
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext  # type: ignore[assignment]
    del _op

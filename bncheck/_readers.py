"""Reading checkpoint files without running anything they contain, within bounded memory.

Used by :mod:`bncheck.loading`; every error is a :class:`~bncheck.errors.LoadError` with one
line. The threat model is in ``docs/security.md``: a file may be hostile, so

* only a regular file is opened (a FIFO, a device or a directory is refused before reading);
* every size a file claims (a zip entry's uncompressed size, a storage's element count, a
  tensor's shape) is checked against the bytes the file holds before anything is allocated;
* a pickle is read by :class:`~bncheck._safe_pickle.RestrictedUnpickler`, which imports only
  tensors, storages, dtypes and plain containers; anything else is refused with every name
  the pickle would import (from :func:`~bncheck._safe_pickle.scan_pickle`), unless the user
  trusts the file;
* a TorchScript archive is read from its zip entries (its pickled attributes, its class
  declarations as text): none of its TorchScript code runs;
* a torch.export archive is handed to ``torch.export.load`` only after every pickle inside it
  has been scanned and found to import nothing outside the allowlist.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import pickle
import re
import stat
import struct
import zipfile
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._safe_pickle import (
    SAFE_NAMES,
    BadTensor,
    PickleScan,
    Refused,
    RestrictedUnpickler,
    StorageRecord,
    StorageType,
    is_dangerous,
    scan_pickle,
)
from .errors import LoadError, message_line

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: Most names a refusal lists before "and N more" (names that act outside the process are
#: always listed).
REFUSAL_NAMES = 12


# ---- files -----------------------------------------------------------------------------------
def regular_file_size(path: Path) -> int:
    """The size of ``path`` after checking it is a readable, non-empty regular file.

    Opened with ``O_NONBLOCK`` and checked with ``fstat``, so a FIFO or a device never blocks
    and is never read.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise LoadError(f"{path}: no such file; check the path") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot be opened ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise LoadError(f"{path}: is a directory; give the checkpoint file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(
            f"{path}: is a {_file_kind(info.st_mode)}, not a regular file; bncheck reads "
            "checkpoint files only"
        )
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise LoadError(
            f"{path}: cannot be read ({exc.strerror or exc}); check its permissions"
        ) from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(f"{path}: is a {_file_kind(info.st_mode)}, not a regular file")
    if info.st_size == 0:
        if os.path.realpath(path).startswith(("/proc/", "/sys/")):
            raise LoadError(
                f"{path}: is a kernel pseudo-file (its size reads 0 whatever it holds), not a "
                "checkpoint file"
            )
        raise LoadError(f"{path}: the file is empty (0 bytes); was the save interrupted?")
    return int(info.st_size)


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def check_zip_sizes(path: Path, archive: zipfile.ZipFile, size: int) -> None:
    """Refuse an archive whose entries claim more bytes than the file holds (a zip bomb)."""
    total = 0
    for info in archive.infolist():
        total += info.file_size
        if info.file_size > size or total > 2 * size + (1 << 20):
            raise LoadError(
                f"{path}: the zip entry {_short(info.filename)} claims {info.file_size} bytes "
                f"uncompressed, more than the {size}-byte file can hold (a zip bomb or a "
                "corrupt archive); bncheck reads uncompressed PyTorch archives only"
            )


def _short(text: str, limit: int = 80) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _data_offset(path_or_bytes: Path | bytes, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header."""
    if isinstance(path_or_bytes, bytes):
        header = path_or_bytes[info.header_offset : info.header_offset + 30]
    else:
        with open(path_or_bytes, "rb") as fh:
            fh.seek(info.header_offset)
            header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise LoadError(f"{path_or_bytes!s:.80}: the archive is truncated or corrupt")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return int(info.header_offset) + 30 + name_len + extra_len


# ---- refusals --------------------------------------------------------------------------------
def check_scan(label: Path, scan: PickleScan) -> None:
    """Refuse a pickle the scan stopped reading because it is too long."""
    if scan.too_long:
        raise LoadError(
            f"{label}: the pickle has {scan.error}, more than any checkpoint's structure "
            "needs; the file is corrupt or crafted"
        )


def refusal_names(names: list[str]) -> str:
    """Every name, or the dangerous ones plus the first others and "and N more"."""
    if len(names) <= REFUSAL_NAMES:
        return ", ".join(names)
    dangerous = [n for n in names if is_dangerous(n)]
    others = [n for n in names if not is_dangerous(n)]
    room = max(REFUSAL_NAMES - len(dangerous), 3)
    shown = [n for n in names if n in dangerous or n in others[:room]]
    return ", ".join(shown) + f" and {len(names) - len(shown)} more"


def pickle_refusal(
    path: Path, scan: PickleScan, where: str = "", refused: frozenset[str] = frozenset()
) -> LoadError:
    names = scan.unsafe(refused, strict=True)
    what = f" (it imports {refusal_names(names)})" if names else ""
    inside = f" in {where}" if where else ""
    return LoadError(
        f"{path}: the file holds a pickle{inside} that needs code to load{what}, and unpickling "
        "can run arbitrary code; if you trust the file pass --trust-pickle, or save "
        "model.state_dict() instead and pass --arch"
    )


# ---- torch.save zip archives -----------------------------------------------------------------
@dataclass
class _Archive:
    """A zip archive read from a path (memory-mapped storages) or from bytes."""

    source: Path | bytes
    label: Path
    size: int
    archive: zipfile.ZipFile
    infos: dict[str, zipfile.ZipInfo] = field(default_factory=dict)
    _mapped: Any = None  # the whole file, mapped copy-on-write, once a storage is needed

    @classmethod
    def open(cls, source: Path | bytes, label: Path, size: int) -> _Archive:
        try:
            archive = zipfile.ZipFile(source if isinstance(source, Path) else io.BytesIO(source))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise LoadError(
                f"{label}: a zip archive that cannot be read ({exc}); the file is truncated or "
                "corrupt: save or download it again"
            ) from exc
        check_zip_sizes(label, archive, size)
        return cls(source, label, size, archive, {i.filename: i for i in archive.infolist()})

    def close(self) -> None:
        self.archive.close()

    def read(self, name: str) -> bytes:
        try:
            return self.archive.read(self.infos[name])
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
            raise LoadError(
                f"{self.label}: the archive is truncated or corrupt ({exc}); save or download "
                "it again"
            ) from exc

    def record(self, name: str, nbytes: int) -> torch.UntypedStorage | None:
        """The bytes of entry ``name`` as a storage (mapped copy-on-write from a path)."""
        info = self.infos.get(name)
        if info is None or info.compress_type != zipfile.ZIP_STORED or nbytes > info.file_size:
            return None
        offset = _data_offset(self.source, info)
        if offset + nbytes > self.size:
            return None
        if nbytes == 0:
            return torch.UntypedStorage(0)
        if isinstance(self.source, bytes):
            return torch.frombuffer(
                bytearray(self.source[offset : offset + nbytes]), dtype=torch.uint8
            ).untyped_storage()
        if self._mapped is None:
            self._mapped = torch.UntypedStorage.from_file(
                str(self.source), shared=False, nbytes=self.size
            )
        return self._mapped[offset : offset + nbytes]


def _pid_storage(pid: Any) -> tuple[str, torch.dtype, str, int]:
    if not (
        isinstance(pid, tuple)
        and len(pid) >= 5
        and pid[0] == "storage"
        and isinstance(pid[1], StorageType)
        and isinstance(pid[2], str)
        and isinstance(pid[4], int)
        and pid[4] >= 0
    ):
        raise pickle.UnpicklingError("a storage reference bncheck does not understand")
    return pid[2], pid[1].dtype, str(pid[3]), int(pid[4])


def _storage_size_error(scan: PickleScan, limit: Callable[[str], int | None]) -> str | None:
    """A storage whose claimed size exceeds what the file holds for it, read from the scan."""
    from ._safe_pickle import _STORAGE_DTYPES, _itemsize

    for key, kind, location, numel in scan.storages:
        dtype = _STORAGE_DTYPES.get(kind.rpartition(".")[2])
        if dtype is None or not isinstance(numel, int) or str(location).startswith("meta"):
            continue
        have = limit(str(key))
        need = numel * _itemsize(dtype)
        if have is not None and need > have:
            return (
                f"storage {key!s:.40} claims {numel} elements of {dtype} ({need} bytes) but the "
                f"file holds {have} bytes for it"
            )
    return None


def read_torch_zip(
    source: Path | bytes, label: Path, size: int, trust: bool, where: str = ""
) -> tuple[Any, bool]:
    """Load a ``torch.save`` zip archive: (object, memory-mapped)."""
    arc = _Archive.open(source, label, size)
    try:
        pkls = [n for n in arc.infos if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pkls:
            raise LoadError(f"{label}: a zip archive without data.pkl; not a torch.save file")
        pkl = min(pkls, key=lambda n: n.count("/"))
        prefix = pkl[: -len("data.pkl")]
        data = arc.read(pkl)
        scan = scan_pickle(data)
        check_scan(label, scan)

        def held(key: str) -> int | None:
            info = arc.infos.get(f"{prefix}data/{key}")
            return info.file_size if info is not None else 0

        problem = _storage_size_error(scan, held)
        if problem:
            raise LoadError(
                f"{label}: {problem}; the file is corrupt or crafted, bncheck does not "
                "allocate what a file does not hold"
            )
        if scan.unsafe():
            if not trust:
                raise pickle_refusal(label, scan, where)
            return _trusted_torch_load(source, label), isinstance(source, Path)
        cache: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            key, dtype, location, numel = _pid_storage(pid)
            if key in cache:
                return cache[key]
            record: Any
            if location.startswith("meta"):
                record = StorageRecord(dtype, numel, "meta", None)
            else:
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                storage = arc.record(f"{prefix}data/{key}", nbytes)
                if storage is None:
                    record = BadTensor(
                        f"has no stored bytes in the archive (its storage data/{key} is "
                        "missing, compressed or shorter than the tensor)"
                    )
                else:
                    record = StorageRecord(dtype, numel, "cpu", storage)
            cache[key] = record
            return record

        obj = _restricted_load(data, label, scan, persistent_load, where)
        return obj, isinstance(source, Path)
    finally:
        arc.close()


def _restricted_load(
    data: bytes | io.BufferedIOBase,
    label: Path,
    scan: PickleScan,
    persistent_load: Callable[[Any], Any] | None,
    where: str = "",
    extra: dict[str, Any] | None = None,
) -> Any:
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return RestrictedUnpickler(stream, persistent_load, extra).load()
    except Refused as exc:  # the scan missed it: name it anyway
        scan.imports.append(exc.name)
        raise pickle_refusal(label, scan, where) from exc
    except LoadError as exc:
        if str(exc).startswith(str(label)):
            raise
        raise LoadError(f"{label}: {exc}") from exc
    except RecursionError as exc:
        raise LoadError(f"{label}: the pickle is nested too deeply to read") from exc
    except MemoryError as exc:
        raise LoadError(f"{label}: the pickle needs more memory than bncheck allows") from exc
    except Exception as exc:
        raise LoadError(
            f"{label}: the pickle is truncated, corrupt or crafted "
            f"({type(exc).__name__}: {message_line(exc, 200)}); save or download it again"
        ) from exc


def _trusted_torch_load(source: Path | bytes, label: Path) -> Any:
    try:
        if isinstance(source, bytes):
            return torch.load(io.BytesIO(source), map_location="cpu", weights_only=False)
        return torch.load(source, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise LoadError(
            f"{label}: unpickling with --trust-pickle failed "
            f"({type(exc).__name__}: {message_line(exc, 200)}); the classes it needs "
            "must be importable (run from the project directory)"
        ) from exc


# ---- legacy torch.save and plain pickles -----------------------------------------------------
def read_legacy(path: Path, size: int, trust: bool, data: bytes | None = None) -> tuple[Any, bool]:
    """A pre-1.6 ``torch.save`` file or a plain pickle (``data`` when not read from ``path``):
    (object, is a torch.save file)."""
    with open(path, "rb") if data is None else io.BytesIO(data) as fh:
        head_scan = scan_pickle(fh)
        check_scan(path, head_scan)
        fh.seek(0)
        try:
            magic = RestrictedUnpickler(fh).load() if not head_scan.unsafe() else None
        except Exception:
            magic = None
        if magic != _LEGACY_MAGIC:
            if data is not None:
                raise LoadError(f"{path}: a nested pickle that is not a torch.save file")
            return _read_plain_pickle(path, fh, size, trust), False
        try:
            RestrictedUnpickler(fh).load()  # protocol version
            RestrictedUnpickler(fh).load()  # system info
        except Exception as exc:
            raise LoadError(f"{path}: the legacy checkpoint header is corrupt ({exc})") from exc
        start = fh.tell()
        scan = scan_pickle(fh)
        check_scan(path, scan)
        problem = _storage_size_error(scan, lambda _key: size)
        if problem is None:
            total = _claimed_bytes(scan)
            if total > size:
                problem = f"its storages claim {total} bytes, more than the {size}-byte file"
        if problem:
            raise LoadError(
                f"{path}: {problem}; the file is corrupt or crafted, bncheck does not allocate "
                "what a file does not hold"
            )
        if scan.unsafe():
            if not trust:
                raise pickle_refusal(path, scan)
            return _trusted_torch_load(path if data is None else data, path), True
        fh.seek(start)
        records: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            if isinstance(pid, tuple) and len(pid) == 6 and pid[5] is not None:
                raise pickle.UnpicklingError("storage views (torch < 0.4) are not supported")
            key, dtype, location, numel = _pid_storage(pid)
            if key not in records:
                if location.startswith("meta"):
                    records[key] = StorageRecord(dtype, numel, "meta", None)
                else:
                    storage = torch.empty(numel, dtype=dtype).untyped_storage()
                    records[key] = StorageRecord(dtype, numel, "cpu", storage)
            return records[key]

        obj = _restricted_load(fh, path, scan, persistent_load)  # type: ignore[arg-type]
        try:
            keys = RestrictedUnpickler(fh).load()
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError("bad storage key list")
            for key in keys:
                record = records.get(key)
                if not isinstance(record, StorageRecord) or record.storage is None:
                    raise ValueError(f"storage {key} is not referenced")
                (count,) = struct.unpack("<q", _read_exact(fh, 8))
                if count != record.numel:
                    raise ValueError(f"storage {key} holds {count} elements, not {record.numel}")
                view = torch.empty(0, dtype=torch.uint8).set_(record.storage)
                if fh.readinto(view.numpy()) != record.nbytes:  # type: ignore[arg-type]
                    raise EOFError("the file ends inside a storage")
        except Exception as exc:
            raise LoadError(
                f"{path}: the legacy checkpoint is truncated or corrupt "
                f"({message_line(exc, 200)}); save or download it again"
            ) from exc
        return obj, True


def _claimed_bytes(scan: PickleScan) -> int:
    """The bytes the distinct non-meta storages of a pickle claim."""
    from ._safe_pickle import _STORAGE_DTYPES, _itemsize

    claims: dict[str, int] = {}
    for key, kind, location, numel in scan.storages:
        dtype = _STORAGE_DTYPES.get(kind.rpartition(".")[2])
        if dtype is not None and isinstance(numel, int) and not str(location).startswith("meta"):
            claims[str(key)] = numel * _itemsize(dtype)
    return sum(claims.values())


def _read_exact(fh: Any, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError("the file ends early")
    return bytes(data)


#: A tensor in a plain pickle holds its storage as a nested torch.save archive, read here
#: by the restricted loader too.
_PLAIN_PICKLE_NAMES = frozenset({"torch.storage._load_from_bytes"})


def _read_plain_pickle(path: Path, fh: Any, size: int, trust: bool) -> Any:
    fh.seek(0)
    scan = scan_pickle(fh)
    check_scan(path, scan)
    if scan.unsafe(_PLAIN_PICKLE_NAMES):
        if not trust:
            raise pickle_refusal(path, scan)
        fh.seek(0)
        try:
            return pickle.load(fh)
        except Exception as exc:
            raise LoadError(
                f"{path}: unpickling with --trust-pickle failed "
                f"({type(exc).__name__}: {message_line(exc, 200)})"
            ) from exc
    fh.seek(0)

    def from_bytes(data: Any) -> Any:  # torch.storage._load_from_bytes: a nested torch.save
        if not isinstance(data, bytes):
            raise pickle.UnpicklingError("a nested storage that is not a torch.save file")
        if data[:4] == b"PK\x03\x04":
            return read_torch_zip(data, path, len(data), False, "a nested torch.save archive")[0]
        return read_legacy(path, len(data), False, data)[0]

    obj = _restricted_load(
        fh, path, scan, None, extra={"torch.storage._load_from_bytes": from_bytes}
    )
    if not isinstance(obj, Mapping):
        raise LoadError(
            f"{path}: a pickle but not a PyTorch checkpoint (it holds a {type(obj).__name__}); "
            "give a file saved with torch.save(model.state_dict(), path)"
        )
    return obj


# ---- TorchScript archives --------------------------------------------------------------------
@dataclass
class ScriptClass:
    """A class declared in a TorchScript archive's ``code/`` folder, read as text."""

    qualname: str
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    runs_at_load: list[str] = field(default_factory=list)
    is_module: bool = False


_CLASS = re.compile(r"^class (\w+)\((\w*)\):\s*$")
_LIST_ATTR = re.compile(r"^  (__parameters__|__buffers__) = \[(.*)\]\s*$")
_FINAL = re.compile(r"^  (\w+) : Final\[[^=]*\] = (.+)$")
_DEF = re.compile(r"^  def (\w+)\(")
#: Methods TorchScript's loader runs while loading an archive.
_LOAD_METHODS = ("__setstate__",)


def script_classes(arc: _Archive, root: str) -> dict[str, ScriptClass]:
    classes: dict[str, ScriptClass] = {}
    for name in arc.infos:
        if not (name.startswith(f"{root}code/") and name.endswith(".py")):
            continue
        module = name[len(f"{root}code/") : -3].replace("/", ".")
        current: ScriptClass | None = None
        for line in arc.read(name).decode("utf-8", errors="replace").splitlines():
            match = _CLASS.match(line)
            if match:
                current = ScriptClass(
                    f"{module}.{match.group(1)}", is_module=match.group(2) == "Module"
                )
                classes[current.qualname] = current
                continue
            if current is None or not line.startswith("  "):
                if line and not line.startswith(" "):
                    current = None
                continue
            match = _LIST_ATTR.match(line)
            if match:
                names = re.findall(r'"([^"]*)"', match.group(2))
                (current.parameters if match.group(1) == "__parameters__" else current.buffers)[
                    :
                ] = names
                continue
            match = _FINAL.match(line)
            if match:
                with contextlib.suppress(ValueError, SyntaxError, RecursionError, MemoryError):
                    current.constants[match.group(1)] = ast.literal_eval(match.group(2).strip())
                continue
            match = _DEF.match(line)
            if match and match.group(1) in _LOAD_METHODS:
                current.runs_at_load.append(f"{current.qualname}.{match.group(1)}")
    return classes


class _ScriptObject:
    """An object of a TorchScript class, as unpickled here: its class and attributes."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname
        self.state: dict[str, Any] = {}

    def _bncheck_build(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise LoadError(
                f"the TorchScript object {self.qualname} restores its state with a method of "
                "the archive (__setstate__), code bncheck does not run; pass --trust-pickle "
                "if you trust the file"
            )
        self.state.update(state)


def _script_type(qualname: str) -> Any:
    class _New:
        def __new__(cls, *args: Any) -> Any:  # NEWOBJ on the placeholder
            return _ScriptObject(qualname)

    return _New


def _restore_type_tag(value: Any, _tag: Any = None) -> Any:
    return value


def _as_is(value: Any) -> Any:
    return value


def read_torchscript(path: Path, size: int) -> tuple[nn.Module, list[str]]:
    """The module tree of a TorchScript archive, rebuilt as plain modules; runs no code.

    Returns the module and the TorchScript methods that would run at load (non-empty: the
    caller refuses the file unless trusted). Parameters and buffers are the ones each class
    declares (``__parameters__``, ``__buffers__``); ``Final`` constants (``eps``,
    ``momentum``) become attributes, as ``torch.jit.load`` would give them.
    """
    arc = _Archive.open(path, path, size)
    try:
        pkls = [n for n in arc.infos if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkls:
            raise LoadError(f"{path}: a TorchScript archive without data.pkl; save it again")
        pkl = min(pkls, key=lambda n: n.count("/"))
        root = pkl[: -len("data.pkl")]
        classes = script_classes(arc, root)
        data = arc.read(pkl)
        scan = scan_pickle(data)
        check_scan(path, scan)
        used = [n for n in scan.imports if n.startswith("__torch__.")]
        runs = [m for n in used if n in classes for m in classes[n].runs_at_load]
        if runs:
            return nn.Module(), runs
        problem = _storage_size_error(
            scan, lambda key: getattr(arc.infos.get(f"{root}data/{key}"), "file_size", 0)
        )
        if problem:
            raise LoadError(f"{path}: {problem}; the archive is corrupt or crafted")
        extra: dict[str, Any] = {name: _script_type(name) for name in used}
        for helper in ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
            extra[f"torch.jit._pickle.{helper}"] = _as_is
        extra["torch.jit._pickle.restore_type_tag"] = _restore_type_tag
        unknown = [n for n in scan.unsafe() if n not in extra and not n.startswith("__torch__.")]
        if unknown:
            raise LoadError(
                f"{path}: the TorchScript archive's data.pkl imports {refusal_names(unknown)}, "
                "which bncheck does not read without running code; pass --trust-pickle to "
                "load it with torch.jit.load if you trust the file"
            )

        cache: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            key, dtype, location, numel = _pid_storage(pid)
            if key not in cache:
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                storage = arc.record(f"{root}data/{key}", nbytes)
                cache[key] = (
                    StorageRecord(dtype, numel, "cpu", storage)
                    if storage is not None
                    else BadTensor(f"has no stored bytes (data/{key} is missing or short)")
                )
            return cache[key]

        obj = _restricted_load(data, path, scan, persistent_load, extra=extra)
        if not isinstance(obj, _ScriptObject):
            raise LoadError(f"{path}: the TorchScript archive does not hold a module")
        return _module_from_script(obj, classes, path, 0), []
    finally:
        arc.close()


def _module_from_script(
    obj: _ScriptObject, classes: Mapping[str, ScriptClass], path: Path, depth: int
) -> nn.Module:
    if depth > 200:
        raise LoadError(f"{path}: the TorchScript module tree is nested more than 200 deep")
    decl = classes.get(obj.qualname, ScriptClass(obj.qualname))
    module = nn.Module()
    module.original_name = obj.qualname.rpartition(".")[2]  # type: ignore[assignment]
    try:
        for key, value in obj.state.items():
            if isinstance(value, BadTensor):
                raise LoadError(f"{path}: tensor {_short(key)} {value.reason}")
            if key == "training":
                module.training = bool(value)
            elif isinstance(value, _ScriptObject):
                module.add_module(key, _module_from_script(value, classes, path, depth + 1))
            elif isinstance(value, torch.Tensor) and key in decl.parameters:
                module.register_parameter(
                    key, nn.Parameter(value, requires_grad=value.is_floating_point())
                )
            elif isinstance(value, torch.Tensor) and key in decl.buffers:
                module.register_buffer(key, value)
            elif key in decl.buffers and value is None:
                module.register_buffer(key, None)
            elif key in decl.parameters and value is None:
                module.register_parameter(key, None)
            elif isinstance(value, (int, float, bool, str)) and not hasattr(nn.Module, key):
                setattr(module, key, value)
        for key, value in decl.constants.items():
            if not hasattr(nn.Module, key) and key not in module.__dict__:
                setattr(module, key, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise LoadError(
            f"{path}: the TorchScript archive has an attribute bncheck cannot rebuild "
            f"({message_line(exc, 200)})"
        ) from exc
    return module


# ---- torch.export archives -------------------------------------------------------------------
def check_exported_program(path: Path, size: int) -> None:
    """Refuse a torch.export archive that would unpickle or run anything unsafe.

    ``torch.export.load`` unpickles sample inputs, weights and constants marked as pickled,
    opaque constants and legacy weight files, with an unrestricted unpickler when the
    restricted one fails, and restores TorchScript objects with their ``__setstate__``. Each
    of those entries is scanned first: the archive passes only when every pickle in it
    imports nothing outside the allowlist, and it holds no TorchScript object.
    """
    import json

    arc = _Archive.open(path, path, size)
    try:
        by_inner = {(n.split("/", 1)[1] if "/" in n else n): n for n in arc.infos}
        pickled: list[str] = [
            inner
            for inner in by_inner
            if inner.startswith("data/sample_inputs/")
            or (inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"))
            or inner.startswith("extra/")
            and inner.endswith(".pt")
        ]
        for inner in by_inner:
            if not (
                inner.startswith(("data/weights/", "data/constants/"))
                and inner.endswith("config.json")
            ):
                continue
            folder = inner.rpartition("/")[0] + "/"
            try:
                config = json.loads(arc.read(by_inner[inner])).get("config", {})
                entries = list(config.values()) if isinstance(config, dict) else []
            except (ValueError, AttributeError, RecursionError) as exc:
                raise LoadError(f"{path}: {inner} is not valid JSON ({exc})") from exc
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                name = str(entry.get("path_name", ""))
                if name.startswith("custom_obj_"):
                    raise LoadError(
                        f"{path}: the torch.export archive holds a TorchScript object "
                        f"({_short(folder + name)}) whose __setstate__ runs when it is loaded; "
                        "pass --trust-pickle to load it if you trust the file"
                    )
                if entry.get("use_pickle") or name.startswith("opaque_obj_"):
                    pickled.append(folder + name)
        for inner in pickled:
            full = by_inner.get(inner)
            if full is None:
                continue
            data = arc.read(full)
            if data[:4] == b"PK\x03\x04":
                _scan_nested_zip(path, data, inner)
            else:
                scan = scan_pickle(data)
                check_scan(path, scan)
                if scan.unsafe(_EXPORT_EXCLUDED, strict=True):
                    raise pickle_refusal(path, scan, inner, _EXPORT_EXCLUDED)
    finally:
        arc.close()


def _scan_nested_zip(path: Path, data: bytes, where: str) -> None:
    arc = _Archive.open(data, path, len(data))
    try:
        for name in arc.infos:
            if name.endswith(".pkl"):
                scan = scan_pickle(arc.read(name))
                check_scan(path, scan)
                if scan.unsafe(_EXPORT_EXCLUDED, strict=True):
                    raise pickle_refusal(path, scan, where, _EXPORT_EXCLUDED)
                folder = name[: -len(name.rpartition("/")[2])]
                sizes: dict[str, int] = defaultdict(int)  # a missing storage holds 0 bytes
                for entry, info in arc.infos.items():
                    if entry.startswith(f"{folder}data/"):
                        sizes[entry[len(folder) + 5 :]] = info.file_size
                problem = _storage_size_error(scan, sizes.__getitem__)
                if problem:
                    raise LoadError(
                        f"{path}: in {where}, {problem}; the file is corrupt or crafted"
                    )
    finally:
        arc.close()


#: Names of the allowlist that torch.export.load's own (unrestricted) unpickler would call
#: without bncheck's size checks: refused in a torch.export archive.
_EXPORT_EXCLUDED = frozenset(
    name
    for name in SAFE_NAMES
    if name.startswith(("numpy.", "argparse.")) or name.rpartition(".")[2] in ("bytes", "bytearray")
)

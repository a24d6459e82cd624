"""``bncheck recalibrate CKPT --arch ARCH --data pkg.mod:callable -o FIXED``.

Loads a checkpoint as safely as ``bncheck audit`` (:func:`bncheck.loading.load_model`: no
unpickling of code), recomputes the running statistics of the BN layers the audit flags (or
of ``--layers``) over the batches ``--data`` returns, prints the before/after table, and
writes a new file in the input's layout: the same wrapper (``{"state_dict": ...}``), the same
key prefix, the same format (safetensors stays safetensors), every other entry unchanged.
The input file is never written.

Exit codes: **0** the repaired model passes the audit (buffer rules and ``stat-drift``: no
warning or error), **1** findings remain, **2** bad input (usage, a file that cannot be
loaded, data the model cannot take, ``-o`` naming the input).

This module imports no torch at import time: ``bncheck --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import _positive_int, _same_file, replace_atomically
from .errors import BNCheckError, UsageError, message_line
from .render import visible_lines

if TYPE_CHECKING:  # pragma: no cover
    from .recalibration import Recalibration

__all__ = ["add_parser", "run"]

EPILOG = """\
examples:
  bncheck recalibrate ckpt.pt --arch vgg16_bn --data mypkg.data:calib_loader -o fixed.pt
  bncheck recalibrate ema.safetensors --arch mypkg.nets:build --data mypkg.data:loader \\
      --max-batches 50 --layers all --evaluate mypkg.data:val_accuracy -o ema_fixed.safetensors

--data names a callable that takes no argument and returns an iterable of batches (e.g. a
DataLoader over a few hundred training images); --evaluate one that takes the model and
returns a number (e.g. held-out accuracy), called before and after.

exit codes: 0 the repaired model passes the audit, 1 findings remain,
            2 usage error, or the file or the data could not be used
"""

#: Formats whose layout ``recalibrate`` can write back.
WRITABLE = ("torch_zip", "torch_legacy", "safetensors")
_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``recalibrate`` subcommand to ``bncheck``'s subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "recalibrate",
        help="recompute BN running statistics of a checkpoint from data",
        description="Recompute the running statistics of the BN layers a checkpoint's audit "
        "flags\n(NaN, negative or tiny variance, never trained, far from the data), verify "
        "the\nresult, and write a new checkpoint in the input's layout. Loading is as safe as\n"
        "`bncheck audit`: no code from the file is run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", metavar="CKPT", help="the checkpoint (state dict or safetensors)")
    parser.add_argument(
        "--arch",
        required=True,
        metavar="NAME|module:callable",
        help="the architecture: a built-in name (vgg16_bn, vgg16_bn_small, ...) or "
        "pkg.module:callable returning an nn.Module",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="module:callable",
        help="pkg.module:callable returning an iterable of batches (e.g. a DataLoader)",
    )
    parser.add_argument(
        "--max-batches", type=_positive_int, metavar="N", help="use at most N batches"
    )
    parser.add_argument(
        "--layers",
        default="broken",
        metavar="broken|all|GLOB,...",
        help="which layers to recompute: those the audit flags (default), all, or "
        "comma-separated qualified names/globs (features.*)",
    )
    parser.add_argument(
        "--evaluate",
        metavar="module:callable",
        help="pkg.module:callable(model) -> float (e.g. accuracy), shown before and after",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="FIXED",
        help="the new checkpoint to write (never the input file)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.set_defaults(handler=run)
    return parser


# ---- user callables --------------------------------------------------------------------------
def resolve_callable(spec: str, option: str) -> Callable[..., Any]:
    """``pkg.module:callable`` imported (from the current directory too, like ``python -m``),
    as ``--arch`` factories are (:func:`bncheck.loading.import_callable`)."""
    from .loading import import_callable

    return import_callable(spec, option)


# ---- files -----------------------------------------------------------------------------------
def _container(obj: Any) -> MutableMapping[str, Any]:
    """The mapping that holds the state dict's tensors, inside the same wrappers the loader
    looks through (:data:`bncheck.loading._WRAPPER_KEYS`)."""
    import torch

    from .loading import _WRAPPER_KEYS

    current = obj
    for _ in range(4):
        if not isinstance(current, MutableMapping):
            break
        tensors = sum(isinstance(v, torch.Tensor) for v in current.values())
        if tensors and tensors >= len(current) / 2:
            return current
        key = next(
            (k for k in _WRAPPER_KEYS if k in current and isinstance(current[k], Mapping)),
            None,
        )
        if key is None:
            break
        current = current[key]
    raise UsageError(
        "the checkpoint holds no state dict bncheck can write back; save "
        "torch.save(model.state_dict(), path) or a {'state_dict': ...} dict"
    )


def _prefix(keys: list[str], model_keys: list[str]) -> str:
    """The prefix the file's keys carry (``module.``...): the one that matches most keys."""
    from .loading import _common_prefixes

    present = set(keys)
    best, score = "", sum(k in present for k in model_keys)
    for prefix in _common_prefixes(keys):
        s = sum(prefix + k in present for k in model_keys)
        if s > score:
            best, score = prefix, s
    return best


def _update(sd: MutableMapping[str, Any], result: Recalibration) -> list[str]:
    """Put the recomputed buffers into ``sd`` (in its dtypes); returns the keys written."""
    import torch

    model_sd = result.model.state_dict()
    prefix = _prefix([k for k in sd if isinstance(k, str)], list(model_sd))
    written = []
    for layer in result.layers:
        for leaf in _LEAVES:
            key = f"{layer}.{leaf}" if layer else leaf
            if key not in model_sd:
                continue
            value = model_sd[key].detach().cpu()
            old = sd.get(prefix + key)
            if isinstance(old, torch.Tensor):
                value = value.to(old.dtype)
            sd[prefix + key] = value.clone().contiguous()
            written.append(prefix + key)
    return written


def write_recalibrated(path: Path, fmt: str, output: Path, result: Recalibration) -> list[str]:
    """Write ``output``: ``path``'s content in its layout, with the recomputed buffers."""
    import torch

    from .loading import _read_safetensors, _torch_load

    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        sd: MutableMapping[str, Any] = dict(_read_safetensors(path))
        written = _update(sd, result)
        replace_atomically(
            output, lambda tmp: save_file(dict(sd), tmp, metadata=metadata), str(output)
        )
        return written
    obj, _ = _torch_load(path, fmt, trust_pickle=False)
    written = _update(_container(obj), result)
    legacy = fmt == "torch_legacy"
    replace_atomically(
        output,
        lambda tmp: torch.save(obj, tmp, _use_new_zipfile_serialization=not legacy),
        str(output),
    )
    return written


# ---- the command -----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """``bncheck recalibrate``: returns the exit code (errors raise :class:`BNCheckError`)."""
    from . import loading
    from .recalibration import recalibrate

    path, output = Path(args.path), Path(args.output)
    if output.exists() and output.is_dir():
        raise UsageError(f"-o {output} is a folder; give the file to write")
    if path.exists() and _same_file(str(path), str(output)):
        raise UsageError(
            f"-o {args.output} is the input checkpoint {args.path}; recalibrate never "
            "overwrites its input: give a new file name"
        )
    fmt = loading.sniff_format(path)
    if fmt not in WRITABLE:
        raise UsageError(
            f"{path}: a {loading.FORMATS[fmt]}; recalibrate reads and writes state dicts "
            "(torch.save(model.state_dict()) or safetensors): load it in Python and use "
            "bncheck.recalibrate(model, data)"
        )
    loaded = loading.load_model(path, args.arch)
    data_factory = resolve_callable(args.data, "--data")
    evaluate = resolve_callable(args.evaluate, "--evaluate") if args.evaluate else None
    try:
        data = data_factory()
    except BNCheckError:
        raise
    except Exception as exc:
        raise UsageError(
            f"--data {args.data} raised {type(exc).__name__}: {message_line(exc)}"
        ) from exc
    result = recalibrate(
        loaded.model,
        data,
        layers=args.layers,
        max_batches=args.max_batches,
        evaluate=evaluate,
        inplace=True,  # the loaded model is ours; its mapped tensors are copy-on-write
    )
    written = write_recalibrated(path, fmt, output, result)
    lines = [result.to_table(), ""]
    lines += [f"note: {note}" for note in loaded.notes]
    layers = f"{len(result.layers)} layer{'s' if len(result.layers) != 1 else ''}"
    lines.append(
        f"wrote {output} ({loading.FORMATS[fmt]}, {len(written)} buffers of {layers} "
        f"replaced, everything else as in {path.name})"
    )
    sys.stdout.write(visible_lines("\n".join(lines)) + "\n")  # paths and names from files
    sys.stdout.flush()
    return 0 if result.ok else 1

"""The ``bncheck`` command line: ``bncheck audit PATH``, ``bncheck rules``, ``bncheck explain``.

Exit codes (the public contract): **0** no finding at or above ``--fail-on``; **1** some
finding at or above it; **2** a usage error, or the file could not be read or loaded. Errors
are one line on stderr starting with ``bncheck: error:``; ``--debug`` adds the traceback.

The front end is thin: it parses options, loads the file (:mod:`bncheck.loading`), makes up an
input when none is given, passes what loading found to :func:`bncheck.engine.audit` as
:class:`~bncheck.context.AuditFacts` (the engine words every skip reason, reports missing BN
buffers and decides when a failed forward is the input's fault) and renders the report. torch is
imported only by ``audit``, so ``bncheck rules`` and ``--help`` are quick.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import options
from ._version import __version__
from .errors import BNCheckError, UsageError, did_you_mean, message_line
from .render import visible
from .report import FAIL_ON_CHOICES

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from .report import Report

__all__ = ["main", "build_parser", "parse_shape", "FORMATS"]

#: Values of ``--format`` and of ``--output-format FMT=FILE``.
FORMATS = ("table", "json", "markdown", "sarif", "github", "gitlab")
#: Values of ``--color``.
COLOR_CHOICES = ("auto", "always", "never")
#: Batch size of a synthetic input (and of a large one, e.g. 224x224 images).
SYNTHETIC_BATCH = 4
SYNTHETIC_BATCH_LARGE = 2
#: Spatial size used when neither the architecture nor ``--input-shape`` gives one.
DEFAULT_SPATIAL = {1: 32, 2: 32, 3: 16}
_LARGE_INPUT = 128 * 128
#: Largest spatial size of a synthetic input for a built-in architecture. The reference VGGs
#: end in adaptive pooling, so they accept any size from 32; at 224x224 the audit's passes on a
#: full VGG16-BN take several times longer and more memory than the checkpoint itself.
BUILTIN_MAX_SPATIAL = 64


class ArgumentError(Exception):
    """A malformed command line (argparse's errors, turned into one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message}; see `{self.prog} --help`")


def _choice(name: str, choices: Sequence[str]) -> Any:
    def parse(value: str) -> str:
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"unknown {name} {value!r}{did_you_mean(value, choices)}; "
                f"choose one of {', '.join(choices)}"
            )
        return value

    parse.__name__ = name
    return parse


def _option_type(validate: Any, name: str | None = None) -> Any:
    """An argparse ``type=`` from a validator of :mod:`bncheck.options` (UsageError -> one
    argparse error line)."""

    def convert(value: str) -> Any:
        try:
            return validate(value)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name or validate.__name__.strip("_")
    return convert


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,3,32,32"`` (or ``8x3x32x32``) -> ``(8, 3, 32, 32)``; every size a positive integer
    (:func:`bncheck.options.parse_shape`; the batch rule is :func:`bncheck.options.input_shape`)."""
    try:
        return options.parse_shape(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _output_format(text: str) -> tuple[str, str]:
    """``sarif=bncheck.sarif`` -> ``("sarif", "bncheck.sarif")``."""
    fmt, sep, path = text.partition("=")
    fmt = fmt.strip()
    if not sep or not path.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not FMT=FILE (e.g. sarif=bncheck.sarif)")
    if fmt not in FORMATS:
        raise argparse.ArgumentTypeError(
            f"unknown format {fmt!r}{did_you_mean(fmt, FORMATS)}; "
            f"choose one of {', '.join(FORMATS)}"
        )
    return fmt, path.strip()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


AUDIT_EPILOG = """\
examples:
  bncheck audit --arch vgg16_bn_small             audit a freshly built reference model
  bncheck audit model.pt --arch vgg16_bn          a state dict with a built-in architecture
  bncheck audit ckpt.pt --arch mypkg.nets:build   ... or with your own factory
  bncheck audit ckpt.pt --arch torchvision:resnet50 --arch-arg num_classes=10
  bncheck audit model.ts                          a TorchScript or torch.export archive
  bncheck audit ckpt.pt --arch vgg16_bn --format github --output-format sarif=bncheck.sarif
  bncheck audit ckpt.pt --arch vgg16_bn --baseline bncheck-baseline.json

settings also come from [tool.bncheck] in the nearest pyproject.toml (or bncheck.toml);
flags win over it. See docs/cli.md and docs/ci.md.

exit codes: 0 no finding at or above --fail-on, 1 findings at or above it,
            2 usage error or the file could not be loaded
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bncheck",
        description="Find what is wrong with the Batch Normalization in a PyTorch model.",
    )
    parser.add_argument("--version", action="version", version=f"bncheck {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    audit = commands.add_parser(
        "audit",
        help="audit a model file (or a built-in architecture)",
        description="Audit the BatchNorm layers of a model file. Loading runs nothing from the\n"
        "file by default: tensors and plain containers are read by a restricted unpickler\n"
        "(memory-mapped), safetensors directly, TorchScript and torch.export archives from\n"
        "their entries; anything that would run code (a pickled module, a TorchScript\n"
        "__setstate__, pickled export inputs) only with --trust-pickle (docs/security.md).",
        epilog=AUDIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument(
        "path",
        nargs="?",
        metavar="PATH",
        help="the file to audit; without it, --arch builds a fresh model",
    )
    model = audit.add_argument_group("model and input")
    model.add_argument(
        "--arch",
        metavar="NAME|module:callable",
        help="the architecture of a state dict: a built-in name (vgg11_bn, "
        "vgg13_bn, vgg16_bn, vgg19_bn, vgg16_bn_small), torchvision:NAME, timm:NAME "
        "(built without downloading weights) or pkg.module:callable returning an nn.Module",
    )
    model.add_argument(
        "--arch-arg",
        type=_option_type(options.arch_arg, "NAME=VALUE"),
        action="append",
        metavar="NAME=VALUE",
        help="keyword argument of the --arch factory (repeatable); VALUE is a Python literal "
        "(10, 0.5, True, None, 'text', (1, 2)), anything else a string",
    )
    model.add_argument(
        "--input-shape",
        type=parse_shape,
        metavar="N,C,H,W",
        help="shape of the random input batch, batch dimension first "
        "(C,H,W when --batch-size is given); default: inferred from the "
        "first conv/linear layer; a shape only, not judged by the batch-size "
        "rules (see --batch-size)",
    )
    model.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="batch size you train with: the batch-size rules judge it",
    )
    model.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading what runs code from the file (a pickled module, TorchScript "
        "methods run at load, pickled torch.export inputs): only for files you trust",
    )
    rule_opts = audit.add_argument_group("rules")
    rule_opts.add_argument(
        "--select",
        type=_option_type(options.rule_ids, "rule ids"),
        metavar="IDS",
        help="comma-separated rule ids to run (default: all)",
    )
    rule_opts.add_argument(
        "--ignore",
        type=_option_type(options.ignored_ids, "rule ids"),
        metavar="IDS",
        help="comma-separated rule ids to skip",
    )
    rule_opts.add_argument(
        "--tolerance",
        type=_option_type(options.tolerance_pair, "NAME=VALUE"),
        action="append",
        metavar="NAME=VALUE",
        help="override a rule tolerance, e.g. ema_rtol=2 (repeatable; `bncheck rules` lists them)",
    )
    rule_opts.add_argument(
        "--per-layer-ignores",
        type=_option_type(options.per_layer_ignore, "GLOB:RULE[,RULE]"),
        action="append",
        metavar="GLOB:RULE[,RULE]",
        help="do not report these rules on layers whose qualified name matches GLOB, e.g. "
        "'features.*:bias-before-bn' (repeatable)",
    )
    rule_opts.add_argument(
        "--show-suppressed",
        action="store_true",
        help="list the findings the per-layer ignores suppressed, with the pattern that matched",
    )
    rule_opts.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from FILE (a pyproject.toml with [tool.bncheck], or a bncheck.toml) "
        "instead of the one found from the current directory",
    )
    rule_opts.add_argument(
        "--no-config", action="store_true", help="ignore every configuration file"
    )
    gate = audit.add_argument_group("exit code and baseline")
    gate.add_argument(
        "--fail-on",
        type=_option_type(options.fail_on, "--fail-on value"),
        metavar="{" + ",".join(FAIL_ON_CHOICES) + "}",
        help="exit 1 when a finding is at or above this severity (default: error)",
    )
    gate.add_argument(
        "--baseline",
        metavar="FILE",
        help="accepted findings: exit 1 only for findings not in FILE (see --update-baseline)",
    )
    gate.add_argument(
        "--update-baseline",
        action="store_true",
        help="write this audit's findings into the --baseline file (entries of other files "
        "it holds are kept) and exit 0",
    )
    out = audit.add_argument_group("output")
    out.add_argument(
        "--format",
        type=_choice("format", FORMATS),
        default="table",
        metavar="{" + ",".join(FORMATS) + "}",
        help="report format on stdout (or --output): table (default), json, markdown, sarif, "
        "github (workflow commands: annotations on a GitHub Actions run), gitlab (Code Quality)",
    )
    out.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the --format report to FILE (atomically) instead of stdout",
    )
    out.add_argument(
        "--output-format",
        type=_output_format,
        action="append",
        metavar="FMT=FILE",
        help="also write the report in FMT to FILE (repeatable), e.g. "
        "--format github --output-format sarif=bncheck.sarif",
    )
    out.add_argument(
        "--color",
        type=_choice("--color value", COLOR_CHOICES),
        default="auto",
        metavar="{auto,always,never}",
        help="colour the table by severity: auto (default) when stdout is a terminal and "
        "NO_COLOR is not set",
    )
    out.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr (default: a progress bar when stderr is a terminal)",
    )
    out.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    audit.set_defaults(handler=run_audit)

    rules = commands.add_parser(
        "rules", help="list the rules", description="List every rule: id, severity, needs, summary."
    )
    rules.add_argument(
        "--format",
        type=_choice("format", ("table", "json", "markdown")),
        default="table",
        metavar="{table,json,markdown}",
    )
    rules.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    rules.set_defaults(handler=run_rules)

    explain = commands.add_parser(
        "explain", help="explain one rule", description="Print the long explanation of a rule."
    )
    explain.add_argument("rule", metavar="RULE", help="a rule id, e.g. ema-update")
    explain.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    explain.set_defaults(handler=run_explain)
    from .recalibrate_cli import add_parser as add_recalibrate

    add_recalibrate(commands)
    return parser


# ---- progress and colour ----------------------------------------------------------------------
#: Seconds of work before the progress bar appears (quick audits never show one).
PROGRESS_DELAY = 2.0


class Progress:
    """Progress on stderr: a tqdm bar when stderr is a terminal (shown only for work that
    takes more than :data:`PROGRESS_DELAY` seconds), one line per stage with ``--progress``
    when it is not, nothing otherwise.

    Each call names the stage that starts now; the bar counts :attr:`STAGES` stages (load or
    build, audit, report) and shows the elapsed time.
    """

    STAGES = 3

    def __init__(self, enabled: bool, stream: TextIO | None = None, bar: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self._bar: Any = None
        self._steps = 0
        if enabled and bar:
            from tqdm import tqdm

            class Bar(tqdm):  # type: ignore[type-arg]
                # no tqdm monitor thread: it tunes miniters for fast loops (not a handful of
                # stage updates) and would outlive the command in an in-process run
                monitor_interval = 0

            self._bar = Bar(
                total=self.STAGES,
                file=self.stream,
                delay=PROGRESS_DELAY,
                mininterval=0,  # a handful of stage updates: draw each one
                leave=False,
                dynamic_ncols=True,
                bar_format="bncheck: {desc} {bar} [{elapsed}]",
            )
            # tqdm redraws only on updates; a stage (one long audit) has none, so a daemon
            # thread redraws the bar (and its elapsed time) once the delay has passed
            self._stop = threading.Event()
            self._redrawer = threading.Thread(target=self._redraw, daemon=True)
            self._redrawer.start()

    def _redraw(self) -> None:
        while not self._stop.wait(0.5):
            bar = self._bar
            if bar is not None and time.perf_counter() - self.start >= PROGRESS_DELAY:
                bar.refresh()

    @classmethod
    def for_args(cls, args: argparse.Namespace) -> Progress:
        stream = sys.stderr
        isatty = getattr(stream, "isatty", None)
        terminal = bool(isatty and isatty())
        return cls(bool(args.progress) or terminal, stream, bar=terminal)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(message.rstrip("."), refresh=False)
            if self._steps and self._steps <= self.STAGES:
                self._bar.update(1)  # the previous stage is done (drawn once past the delay)
            elif time.perf_counter() - self.start >= PROGRESS_DELAY:
                self._bar.refresh()
            self._steps += 1
            if message == "done":
                self.close()
            return
        elapsed = time.perf_counter() - self.start
        print(f"bncheck: [{elapsed:5.1f}s] {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._stop.set()
            self._redrawer.join()  # a command leaves no thread behind (it wakes within 0.5 s)
            bar, self._bar = self._bar, None
            bar.close()


_ANSI = {"error": "\033[1;31m", "warning": "\033[33m", "info": "\033[36m"}
_RESET = "\033[0m"


def use_color(choice: str, stream: TextIO | None = None) -> bool:
    """``--color``: ``always``, ``never``, or (``auto``) when ``stream`` is a terminal and the
    ``NO_COLOR`` environment variable is unset or empty (https://no-color.org)."""
    if choice == "always":
        return True
    if choice == "never" or os.environ.get("NO_COLOR"):
        return False
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def colorize(text: str) -> str:
    """The table with its severity words (rows and headline counts) coloured."""
    import re

    lines = text.split("\n")
    for i, line in enumerate(lines):
        word = line.split(" ", 1)[0]
        if word in _ANSI:
            lines[i] = f"{_ANSI[word]}{word}{_RESET}{line[len(word) :]}"
        elif line.startswith("bncheck: ") and i == 0:
            lines[i] = re.sub(
                r"\b([1-9]\d*) (errors?|warnings?|info)\b",
                lambda m: f"{_ANSI[m.group(2).rstrip('s')]}{m.group(0)}{_RESET}",
                line,
            )
    return "\n".join(lines)


# ---- commands --------------------------------------------------------------------------------
def run_rules(args: argparse.Namespace) -> int:
    from .checks.catalogue import CATALOGUE

    rows = [[info.id, info.severity, info.needs, info.summary] for info in CATALOGUE]
    if args.format == "json":
        import json

        doc = [
            {
                "id": info.id,
                "severity": info.severity,
                "needs": info.needs,
                "summary": info.summary,
                "tolerances": {t.name: t.default for t in info.tolerances},
            }
            for info in CATALOGUE
        ]
        _write_stdout(json.dumps(doc, indent=2) + "\n")
        return 0
    from tabulate import tabulate

    tablefmt = "github" if args.format == "markdown" else "simple"
    text = tabulate(
        rows,
        headers=["rule", "severity", "needs", "summary"],
        tablefmt=tablefmt,
        # a Markdown table cannot wrap a cell onto another row
        maxcolwidths=None if args.format == "markdown" else [None, None, None, 70],
    )
    _write_stdout(text + "\n\n`bncheck explain RULE` shows the full explanation of a rule.\n")
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from .checks.registry import explanation

    text = explanation(args.rule)
    _write_stdout(text if text.endswith("\n") else text + "\n")
    return 0


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _new_file_mode(target: Path) -> int:
    """The mode of the file being replaced, else what ``open()`` would give (0666 & ~umask)."""
    with contextlib.suppress(OSError):
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def replace_atomically(target: Path, save: Callable[[str], None], what: str) -> None:
    """Write ``target`` by ``save(tmp)`` to a temporary file in the same folder, then a rename
    (a reader never sees half a file); the temporary file is removed whatever happens, and an
    ``OSError`` is a one-line :class:`UsageError` about ``what``."""
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UsageError(
            f"cannot write {what}: {exc.strerror or exc}; check that the folder exists and "
            "is writable"
        ) from exc
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, _new_file_mode(target))  # mkstemp makes it 0600
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {what}: {exc.strerror or exc}") from exc
        raise


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""

    def save(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    replace_atomically(Path(path), save, f"the report to {path}")


# ---- inputs ----------------------------------------------------------------------------------
def _first_input_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

    for name, module in model.named_modules():
        if isinstance(module, (_ConvNd, nn.Linear, _BatchNorm)):
            return name, module
    return None


def infer_input_shape(
    model: nn.Module, arch_shape: tuple[int, ...] | None, batch: int | None
) -> tuple[tuple[int, ...], str]:
    """The input shape for a synthetic batch, and a sentence saying where it came from.

    The channel count comes from the first conv/linear/BN layer in module order; the spatial
    size from the architecture (``bncheck.models.INPUT_SHAPES``) when it matches, else
    :data:`DEFAULT_SPATIAL`. The batch is :data:`SYNTHETIC_BATCH` (``SYNTHETIC_BATCH_LARGE``
    for inputs of 128x128 and more, to keep a CPU audit quick) unless ``batch`` is given.
    """
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

    found = _first_input_layer(model)
    hint = "pass --input-shape N,C,H,W"
    if found is None:
        raise UsageError(
            f"cannot infer the input shape (no conv, linear or BN layer found); {hint}"
        )
    name, layer = found
    kind = type(layer).__name__
    spatial: tuple[int, ...]
    if isinstance(layer, _ConvNd):
        channels, dims = int(layer.in_channels), len(layer.kernel_size)
        what = f"{name} ({kind}, in_channels={channels})"
    elif isinstance(layer, nn.Linear):
        channels, dims = int(layer.in_features), 0
        what = f"{name} ({kind}, in_features={channels})"
    else:
        assert isinstance(layer, _BatchNorm)
        channels = int(layer.num_features)
        dims = {"BatchNorm1d": 0, "BatchNorm2d": 2, "BatchNorm3d": 3}.get(kind, 0)
        what = f"{name} ({kind}, num_features={channels})"
    if channels <= 0:
        raise UsageError(
            f"cannot infer the input shape: {name} ({kind}) is not initialised yet; {hint}"
        )
    size_note = ""
    if dims == 0:
        spatial = ()
    elif arch_shape is not None and len(arch_shape) == dims + 1:
        spatial = tuple(min(s, BUILTIN_MAX_SPATIAL) for s in arch_shape[1:])
        if spatial == tuple(arch_shape[1:]):
            size_note = "; spatial size from the architecture"
        else:
            made_for = "x".join(map(str, arch_shape[1:]))
            size_note = (
                f"; spatial size {'x'.join(map(str, spatial))}, not the {made_for} "
                "the architecture is made for: it accepts any size from 32, and a "
                "small input keeps the audit quick"
            )
    else:
        spatial = (DEFAULT_SPATIAL.get(dims, 16),) * dims
        size_note = f"; spatial size {'x'.join(map(str, spatial))} is a default guess"
    if batch is None:
        batch = (
            SYNTHETIC_BATCH_LARGE if math.prod(spatial or (1,)) >= _LARGE_INPUT else SYNTHETIC_BATCH
        )
    return (batch, channels, *spatial), f"channels from {what}{size_note}"


def random_batch(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A standard normal batch from a local generator (seed 0): the global RNG is untouched."""
    import torch

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None and not param.is_meta else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


# ---- audit ----------------------------------------------------------------------------------
def effective_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Flags over ``[tool.bncheck]`` over defaults, validated: fills in ``args`` (``select``,
    ``ignore``, ``fail_on``, ``tolerances``, ``per_layer_ignores``, ``input_shape`` with the
    batch first, ``arch``, ``arch_args``, ``baseline``) and sets ``args.config_file``."""
    from . import config as config_mod

    cfg = config_mod.load_for(args.config, disabled=args.no_config)
    args.config_file = cfg.path
    if args.select is None and cfg.select is not None:
        args.select = cfg.select
    if args.ignore is None and cfg.ignore is not None:
        args.ignore = cfg.ignore
    args.fail_on = args.fail_on or cfg.fail_on or "error"
    args.tolerances = {**cfg.tolerances, **dict(args.tolerance or ())}
    flagged: dict[str, tuple[str, ...]] = {}
    for glob, ids in args.per_layer_ignores or ():
        flagged[glob] = tuple(dict.fromkeys((*flagged.get(glob, ()), *ids)))
    args.per_layer_ignores = {**cfg.per_layer_ignores, **flagged}
    args.arch = args.arch or cfg.arch
    args.arch_args = {**cfg.arch_args, **dict(args.arch_arg or ())}
    if args.arch_args and args.arch is None:
        raise UsageError("--arch-arg needs --arch (the factory it is passed to)")
    if args.input_shape is not None:
        try:
            args.input_shape = options.input_shape(args.input_shape, args.batch_size)
        except UsageError as exc:
            raise UsageError(
                f"--input-shape {exc}"
                + ("" if args.batch_size else " (or C,H,W with --batch-size N)")
            ) from None
    elif cfg.input_shape is not None:
        shape = cfg.input_shape
        args.input_shape = (args.batch_size, *shape[1:]) if args.batch_size else shape
    args.baseline = args.baseline or cfg.baseline
    if args.update_baseline and args.baseline is None:
        raise UsageError("--update-baseline needs --baseline FILE (or baseline in [tool.bncheck])")
    return args


def _check_outputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (format, file) pairs to write; none may be the audited file or the baseline."""
    outputs = list(args.output_format or ())
    if args.output:
        outputs.insert(0, (args.format, args.output))
    protected = [
        (p, what)
        for p, what in ((args.path, "the file being audited"), (args.baseline, "the baseline"))
        if p
    ]
    for fmt, path in outputs:
        for kept, what in protected:
            if _same_file(path, kept):
                raise UsageError(
                    f"the {fmt} report would overwrite {what} ({path}); choose another file"
                )
    return outputs


def _same_file(a: str, b: str) -> bool:
    """The same file: one path, a symlink or a hard link to it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare the resolved paths
        return Path(a).resolve() == Path(b).resolve()


def run_audit(args: argparse.Namespace) -> int:
    from . import annotate, baseline
    from .checks.registry import resolve_rule_ids
    from .config import apply_per_layer_ignores

    effective_settings(args)
    rule_ids = resolve_rule_ids(args.select, args.ignore)  # fail fast on unknown ids
    if args.path is None and args.arch is None:
        raise UsageError(
            "give a PATH to audit, or --arch NAME to audit a freshly built "
            "architecture (e.g. bncheck audit --arch vgg16_bn_small)"
        )
    outputs = _check_outputs(args)
    accepted = None
    if args.baseline is not None and not args.update_baseline:
        accepted = baseline.load(args.baseline)  # a missing file fails before the audit
    progress = Progress.for_args(args)
    try:
        report = audit_command(args, rule_ids, progress)
    finally:
        progress.close()
    report, _, stale = apply_per_layer_ignores(
        report, args.per_layer_ignores, show=args.show_suppressed
    )
    for glob in stale:
        _warn(
            f"per-layer ignore {glob!r} ({','.join(args.per_layer_ignores[glob])}) matched no "
            "finding; remove it if the layer was fixed or renamed"
        )
    source = _baseline_source(args)
    if args.update_baseline:
        stored = baseline.load_or_empty(args.baseline)
        before = stored.compare(report.findings, source)
        stored.replace_source(report.findings, source)
        baseline.write(stored, args.baseline)
        _info(
            f"wrote {len(report.findings)} finding(s) of {source} to the baseline "
            f"{_shown_path(args.baseline)} ({len(before.new)} added, {len(before.fixed)} "
            "dropped as fixed)"
        )
    elif accepted is not None:
        comparison = accepted.compare(report.findings, source)
        report = baseline.split_report(report, comparison)
        _info(f"baseline {_shown_path(args.baseline)}: {comparison.summary()}")
    text = annotate.render(report, args.format)
    if not text.endswith("\n"):
        text += "\n"
    written = []
    for fmt, path in outputs:
        body = text if fmt == args.format else annotate.render(report, fmt)
        write_atomically(path, body if body.endswith("\n") else body + "\n")
        written.append(f"the {fmt} report to {path}")
    if not args.output:
        if args.format == "table" and use_color(args.color):
            text = colorize(text)
        _write_stdout(text)
    if written and progress.enabled:
        print(f"bncheck: wrote {', '.join(written)}", file=sys.stderr)
        if args.output:
            print(report.headline(), file=sys.stderr)
    if args.update_baseline:
        return 0
    return 1 if report.failed(args.fail_on) else 0


def _baseline_source(args: argparse.Namespace) -> str:
    """What the baseline entries of this audit are filed under: the path as a normalised
    relative path (the same on every machine that runs the same command), else the arch."""
    if args.path is None:
        return str(args.arch)
    return os.path.normpath(args.path).replace(os.sep, "/")


def _shown_path(path: str) -> str:
    """``path`` relative to the current directory when it is below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _info(message: str) -> None:
    print(f"bncheck: {visible(message)}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"bncheck: warning: {visible(message)}", file=sys.stderr, flush=True)


def audit_command(args: argparse.Namespace, rule_ids: list[str], progress: Progress) -> Report:
    """Load or build the model, choose the input, audit, and finish the report."""
    from . import loading
    from .context import AuditFacts
    from .engine import audit

    notes: list[str] = []
    loaded: loading.LoadedModel | None = None
    if args.path is not None:
        path = Path(args.path)
        size = 0
        with contextlib.suppress(OSError):  # the loader says what is wrong with the path
            size = path.stat().st_size if path.is_file() else 0
        progress(f"loading {args.path} ({size / 1e6:.1f} MB)...")
        arch = loading.resolve_arch(args.arch, args.arch_args) if args.arch else None
        loaded = loading.load_model(path, arch, trust_pickle=args.trust_pickle)
        model = loaded.model
        source = str(args.path)
        arch_shape = loaded.input_shape
    else:
        spec = loading.resolve_arch(args.arch, args.arch_args)
        progress(f"building {spec.label}...")
        model = loading.build_arch(spec)
        source = spec.label
        arch_shape = spec.input_shape
        notes.append(f"model: {spec.label} freshly built (seed 0), in train mode")

    runnable = loaded is None or loaded.runnable
    x: Any = None
    synthetic = True
    given = args.input_shape is not None or args.batch_size is not None
    if not runnable:
        if given:
            notes.append("--input-shape/--batch-size ignored: the model cannot be run")
    elif given:
        if args.input_shape is not None:  # batch first (effective_settings)
            shape = args.input_shape
        else:
            shape, _ = infer_input_shape(model, arch_shape, args.batch_size)
        loading.check_input_size(shape, "--input-shape" if args.input_shape else "--batch-size")
        x = random_batch(model, shape)
        # --batch-size says "the batch I train with"; --input-shape alone is only a shape
        synthetic = args.batch_size is None
        notes.append(
            f"input: random normal batch of shape {_shape_text(shape)} from "
            + (
                "--input-shape, not judged by the batch-size rules (--batch-size N gives "
                "the batch you train with)"
                if synthetic
                else "--batch-size; the batch-size rules judge it as the batch you train with"
            )
        )
    elif loaded is not None and loaded.example_input is not None:
        x = loaded.example_input
        notes.append(
            "input: the sample input saved in the exported program (synthetic, "
            "not judged by the batch-size rules)"
        )
    else:
        shape, where = infer_input_shape(model, arch_shape, None)
        x = random_batch(model, shape)
        notes.append(
            f"input: synthetic random normal batch of shape {_shape_text(shape)}, "
            "not judged by the batch-size rules (--input-shape sets the shape); "
            f"{where}"
        )

    # facts for the engine, in the command line's words; the engine decides with them
    facts = AuditFacts(
        missing_buffers={
            k: tuple(v) for k, v in (loaded.missing_bn_stats if loaded else {}).items()
        },
        cannot_run=None if runnable or loaded is None else loaded.not_runnable_reason,
        settings_unknown=loaded.static_unknown if loaded is not None else None,
        cannot_give=_CANNOT_GIVE if synthetic else _CANNOT_GIVE_GIVEN_BATCH,
        notes=(*(loaded.notes if loaded is not None else ()), *notes),
        bad_input_hint="pass --input-shape with the shape the model expects",
    )
    progress(
        "running the audit"
        + (f" (forward passes on {_shape_text(x.shape)})" if hasattr(x, "shape") else "")
        + "..."
    )
    report = audit(
        model,
        x,
        select=rule_ids,
        synthetic_input=synthetic,
        training_batch=None if synthetic else True,
        source=source,
        facts=facts,
        **args.tolerances,
    )
    progress("done")
    return report


#: What the command line cannot give (engine.skip_reason words the reasons): a file holds no
#: optimizer and no data loader, and a made-up input is not the batch the user trains with.
_CANNOT_GIVE_GIVEN_BATCH = {"optimizer": "which a file does not hold", "data": ""}
_CANNOT_GIVE = {
    **_CANNOT_GIVE_GIVEN_BATCH,
    "user batch": "give its size with --batch-size N (--input-shape alone is a shape)",
}


# ---- entry point -----------------------------------------------------------------------------
def _error(message: str) -> None:
    # paths and names in the message come from the user's files: shown, never interpreted
    print(f"bncheck: error: {visible(message)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
        if getattr(args, "handler", None) is None:
            _error("missing command: choose one of audit, rules, explain; see `bncheck --help`")
            return 2
        return int(args.handler(args))
    except SystemExit as exc:  # --help and --version
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except ArgumentError as exc:
        _error(str(exc))
        return 2
    except BNCheckError as exc:
        if debug:
            traceback.print_exc()
        _error(message_line(exc))
        return 2
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # e.g. `bncheck rules | head`: stop quietly
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug in bncheck, or something no check above expected
        if debug:
            traceback.print_exc()
        lines = str(exc).strip().splitlines()
        _error(
            f"unexpected {type(exc).__name__}: {lines[0] if lines else ''} (rerun with "
            "--debug for the traceback, and please report it)"
        )
        return 2

"""Cost of ``bncheck.audit(model, x)`` relative to one plain forward of the same model and batch.

Measured side by side in one run: for each model, ``--repeats`` rounds alternate a plain
forward (``model.eval()``, ``torch.no_grad()``) and a full audit (every rule the example input
enables), and the script prints the median time of each and their ratio, with the spread of
per-round ratios (min, max), both in wall time and in CPU time of this process (the CPU ratio
is steadier on a shared machine: other processes do not inflate it). At the end it prints the
median and the worst of the per-model CPU ratios. Targets: median <= 1.5x, worst <= 2.0x.
The last column is the floor: one train-mode forward of the batch plus two eval forwards of
2 samples, without any measurement (CPU time over the plain forward's): the audit's passes
cost that much before it observes anything.

Models: architecture families built here (no download, no torchvision needed), sized like
their torchvision namesakes: a mobile inverted-residual network with squeeze-excitation
(MobileNetV3-like, hard-swish), one without (MobileNetV2-like), a shuffle network
(ShuffleNetV2-like: channel split, concat, channel shuffle), a dense network
(DenseNet-like: BN-ReLU-conv with concatenation), a RegNet-style network (group convolution
and SE), ResNets with basic and bottleneck blocks, and VGG16-BN (``bncheck.models``). With
``--torchvision`` (default: when torchvision is importable) torchvision's own models are
measured too, built with ``weights=None`` (nothing is downloaded).

    python benchmarks/audit_cost.py [--repeats 5] [--threads 1] [--batch 32] [--size 96]
                                    [--only NAME,...] [--no-torchvision] [--against DIR]
                                    [--ignore RULE,...]

``--against DIR`` also times the bncheck of another checkout (``DIR/bncheck``, e.g. a
``git worktree`` of an earlier commit) in the same rounds, prints its ratio beside this one's,
and checks that both versions give the same findings (rule, layer, severity) on each model.
``--ignore`` passes rule ids for both audits to skip (``--ignore bn-reused``: the audit without
the one rule that needs per-sample sums of every BN input).

``--device cuda`` runs the models and the batch on the GPU: every timed call ends with
``torch.cuda.synchronize()``, and the wall ratio is the one that counts there (the CPU time of
this process includes waiting for the GPU); the summary lines give wall ratios.

Timing depends on the machine's load: compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bncheck
from bncheck.models import vgg16_bn


# ---- architecture families -------------------------------------------------------------------
def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(
        self, cin: int, cout: int, expand: int, k: int, stride: int, se: bool, act: type[nn.Module]
    ) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*conv_bn(cin, mid, 1), act()]
        layers += [*conv_bn(mid, mid, k, stride, groups=mid), act()]
        if se:
            layers.append(SqueezeExcite(mid, max(8, mid // 4), nn.Hardsigmoid))
        layers += conv_bn(mid, cout, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def mobile_v2_like() -> nn.Module:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    cfg += [(6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [*conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True)]
    cin = 32
    for t, c, n, s in cfg:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, t, 3, s if i == 0 else 1, False, nn.ReLU6))
            cin = c
    layers += [*conv_bn(cin, 1280, 1), nn.ReLU6(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000))


def mobile_v3_like() -> nn.Module:
    # (kernel, expand, out, se, hard-swish, stride), as MobileNetV3-Large
    cfg = [
        (3, 1, 16, False, False, 1),
        (3, 4, 24, False, False, 2),
        (3, 3, 24, False, False, 1),
        (5, 3, 40, True, False, 2),
        (5, 3, 40, True, False, 1),
        (5, 3, 40, True, False, 1),
        (3, 6, 80, False, True, 2),
        (3, 2, 80, False, True, 1),
        (3, 2, 80, False, True, 1),
        (3, 2, 80, False, True, 1),
        (3, 6, 112, True, True, 1),
        (3, 6, 112, True, True, 1),
        (5, 6, 160, True, True, 2),
        (5, 6, 160, True, True, 1),
        (5, 6, 160, True, True, 1),
    ]
    layers: list[nn.Module] = [*conv_bn(3, 16, 3, 2), nn.Hardswish()]
    cin = 16
    for k, e, c, se, hs, s in cfg:
        act = nn.Hardswish if hs else nn.ReLU
        layers.append(InvertedResidual(cin, c, e, k, s, se, act))
        cin = c
    layers += [*conv_bn(cin, 960, 1), nn.Hardswish()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(960, 1000))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                *conv_bn(cin, cin, 3, stride, groups=cin), *conv_bn(cin, half, 1), nn.ReLU(True)
            )
        b_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            *conv_bn(b_in, half, 1),
            nn.ReLU(True),
            *conv_bn(half, half, 3, stride, groups=half),
            *conv_bn(half, half, 1),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def shuffle_v2_like() -> nn.Module:
    layers: list[nn.Module] = [*conv_bn(3, 24, 3, 2), nn.ReLU(True), nn.MaxPool2d(3, 2, 1)]
    cin = 24
    for repeats, cout in ((4, 116), (8, 232), (4, 464)):
        for i in range(repeats):
            layers.append(ShuffleUnit(cin, cout, 2 if i == 0 else 1))
            cin = cout
    layers += [*conv_bn(cin, 1024, 1), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(True),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


def dense_like(blocks: tuple[int, ...] = (6, 12, 24, 16), growth: int = 32) -> nn.Module:
    layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(True), nn.MaxPool2d(3, 2, 1)]
    c = 64
    for i, n in enumerate(blocks):
        for _ in range(n):
            layers.append(DenseLayer(c, growth))
            c += growth
        if i < len(blocks) - 1:
            layers += [
                nn.BatchNorm2d(c),
                nn.ReLU(True),
                nn.Conv2d(c, c // 2, 1, bias=False),
                nn.AvgPool2d(2),
            ]
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000))


class RegBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 1),
            nn.ReLU(True),
            *conv_bn(cout, cout, 3, stride, groups=cout // group_width),
            nn.ReLU(True),
            SqueezeExcite(cout, max(8, cin // 4)),
            *conv_bn(cout, cout, 1),
        )
        self.short = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


def regnet_like() -> nn.Module:
    # RegNetY-400MF: depths 1, 3, 6, 6; widths 48, 104, 208, 440; group width 8
    layers: list[nn.Module] = [*conv_bn(3, 32, 3, 2), nn.ReLU(True)]
    cin = 32
    for depth, width in ((1, 48), (3, 104), (6, 208), (6, 440)):
        for i in range(depth):
            layers.append(RegBlock(cin, width, 2 if i == 0 else 1, 8))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *conv_bn(cin, planes, 3, stride), nn.ReLU(True), *conv_bn(planes, cout, 3)
        )
        self.short = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = nn.ReLU(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.short(x))


class Bottleneck(Basic):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        nn.Module.__init__(self)
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *conv_bn(cin, planes, 1),
            nn.ReLU(True),
            *conv_bn(planes, planes, 3, stride),
            nn.ReLU(True),
            *conv_bn(planes, cout, 1),
        )
        self.short = (
            nn.Sequential(*conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.act = nn.ReLU(True)


def resnet_like(block: type[Basic], depths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i, depth in enumerate(depths):
        for j in range(depth):
            layers.append(block(cin, 64 * 2**i, 2 if i > 0 and j == 0 else 1))
            cin = 64 * 2**i * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mobile-v2-like": mobile_v2_like,
    "mobile-v3-like (SE)": mobile_v3_like,
    "shuffle-v2-like": shuffle_v2_like,
    "dense-like (121)": dense_like,
    "regnet-y-like (group+SE)": regnet_like,
    "resnet-basic (18)": lambda: resnet_like(Basic, (2, 2, 2, 2)),
    "resnet-bottleneck (50)": lambda: resnet_like(Bottleneck, (3, 4, 6, 3)),
    "vgg16_bn": lambda: vgg16_bn(num_classes=1000),
}

TORCHVISION = [
    "resnet18",
    "resnet50",
    "densenet121",
    "efficientnet_b0",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "vgg16_bn",
]


# ---- measuring -------------------------------------------------------------------------------
#: the device of the models and the batch (``--device``)
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, the device's queue drained
    before and after."""
    _sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def load_other(path: str) -> Any:
    """The ``bncheck`` package of another checkout, imported as ``bncheck_against`` (its
    imports are package-relative, so it runs its own modules, not this checkout's)."""
    root = Path(path) / "bncheck"
    spec = importlib.util.spec_from_file_location(
        "bncheck_against", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"--against: no bncheck package in {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bncheck_against"] = module
    spec.loader.exec_module(module)
    return module


def _verdicts(report: Any) -> list[tuple[str, str, str]]:
    return sorted((f.rule, str(f.layer), str(f.severity)) for f in report.findings)


#: keyword arguments of every audit timed (``--ignore``)
AUDIT_OPTIONS: dict[str, Any] = {}


def measure(
    name: str, model: nn.Module, x: torch.Tensor, repeats: int, other: Any = None
) -> tuple[float, float | None]:
    """Print one row; return the median CPU ratio (and the other checkout's, if given).

    Besides the audit, each round times the audit's floor: what its passes cost with no
    measurement at all (one train-mode forward of the batch under no_grad plus two eval
    forwards of 2 samples, the smallest eval passes the audit runs).
    """
    model.to(DEVICE).eval()
    x = x.to(DEVICE)
    pair_a, pair_b = x[:2].clone(), x[1:3].clone()

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def audit() -> None:
        bncheck.audit(model, x, **AUDIT_OPTIONS)

    def against() -> None:
        other.audit(model, x, **AUDIT_OPTIONS)

    def floor() -> None:
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            model(pair_a)
            model(pair_b)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain()
    audit()  # warm-up (imports, allocator, first-call costs)
    floor()
    same = ""
    if other is not None:
        mine = _verdicts(bncheck.audit(model, x, **AUDIT_OPTIONS))
        theirs = _verdicts(other.audit(model, x, **AUDIT_OPTIONS))
        same = "  same findings" if mine == theirs else f"  FINDINGS DIFFER: {mine} vs {theirs}"
    timed: tuple[Callable[[], None], ...] = (plain, audit, floor) + (
        (against,) if other is not None else ()
    )
    rows: dict[str, list[float]] = {f.__name__: [] for f in timed}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    for i in range(repeats):
        order = timed if i % 2 == 0 else timed[::-1]
        for f in order:
            wall, used = _timed(f)
            rows[f.__name__].append(wall)
            cpu[f.__name__].append(used)
    model.load_state_dict(state)  # the floor's train-mode forwards moved the statistics
    med = {k: statistics.median(v) for k, v in rows.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    cpu_ratios = [a / p for a, p in zip(cpu["audit"], cpu["plain"])]
    cpu_ratio = med_cpu["audit"] / med_cpu["plain"]
    if DEVICE.type == "cuda":  # the host waits for the GPU: wall time is the measure
        return _gpu_row(name, model, med, rows, other is not None, same)
    print(
        f"{name:<26} BN {_bn_count(model):3d}  forward {med['plain'] * 1e3:6.1f} ms"
        f"  audit {med['audit'] * 1e3:6.1f} ms"
        f"  CPU ratio {cpu_ratio:4.2f}x ({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
        f"  wall {med['audit'] / med['plain']:4.2f}x"
        f"  floor {med_cpu['floor'] / med_cpu['plain']:4.2f}x"
        + (
            f"  against {med_cpu['against'] / med_cpu['plain']:4.2f}x{same}"
            if other is not None
            else ""
        ),
        flush=True,
    )
    return cpu_ratio, (med_cpu["against"] / med_cpu["plain"] if other is not None else None)


def _gpu_row(
    name: str,
    model: nn.Module,
    med: dict[str, float],
    rows: dict[str, list[float]],
    against: bool,
    same: str,
) -> tuple[float, float | None]:
    """Print one row of wall-time ratios (``--device cuda``); return the audit's and the
    other checkout's."""
    ratios = [a / p for a, p in zip(rows["audit"], rows["plain"])]
    ratio = med["audit"] / med["plain"]
    theirs = med["against"] / med["plain"] if against else None
    print(
        f"{name:<26} BN {_bn_count(model):3d}  forward {med['plain'] * 1e3:6.2f} ms"
        f"  audit {med['audit'] * 1e3:7.1f} ms  wall ratio {ratio:5.1f}x"
        f" ({min(ratios):.1f}-{max(ratios):.1f})"
        f"  floor {med['floor'] / med['plain']:4.2f}x"
        + (f"  against {theirs:5.1f}x{same}" if theirs is not None else ""),
        flush=True,
    )
    return ratio, theirs


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _summary(title: str, ratios: dict[str, float]) -> None:
    if not ratios:
        return
    worst = max(ratios, key=ratios.__getitem__)
    print(
        f"{title}: median {statistics.median(ratios.values()):.2f}x, "
        f"worst {ratios[worst]:.2f}x ({worst}) over {len(ratios)} models"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--only", default="", help="comma-separated substrings of model names")
    parser.add_argument("--no-torchvision", dest="torchvision", action="store_false")
    parser.add_argument("--against", help="another checkout whose bncheck to time beside")
    parser.add_argument("--ignore", default="", help="comma-separated rule ids the audits skip")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.ignore:
        AUDIT_OPTIONS["ignore"] = [r for r in args.ignore.split(",") if r]
    other = load_other(args.against) if args.against else None
    torch.set_num_threads(args.threads)
    only = [s for s in args.only.split(",") if s]

    def wanted(name: str) -> bool:
        return not only or any(s in name for s in only)

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    print(
        f"torch {torch.__version__}, {DEVICE}, {args.threads} thread(s), {args.repeats} "
        f"repeats, batch "
        f"{args.batch}, {args.size}x{args.size}; median times; ratio = audit / one plain eval "
        "forward (no_grad), same model and batch; CPU ratio (per-round min-max); wall ratio; "
        "floor = (train-mode forward + two 2-sample eval forwards) / forward, CPU"
    )

    def run_group(title: str, models: Iterable[tuple[str, Callable[[], nn.Module]]]) -> None:
        mine: dict[str, float] = {}
        theirs: dict[str, float] = {}
        for name, build in models:
            if wanted(name):
                mine[name], other_ratio = measure(name, build(), x, args.repeats, other)
                if other_ratio is not None:
                    theirs[name] = other_ratio
        _summary(title, mine)
        _summary(f"  the same with {args.against}", theirs)

    clock = "wall" if DEVICE.type == "cuda" else "CPU"
    run_group(f"families built here ({clock} ratio)", FAMILIES.items())
    if not args.torchvision:
        return
    try:
        import torchvision.models as tvm
    except ImportError:
        print("torchvision is not importable: its models were not measured")
        return
    run_group(
        f"torchvision models ({clock} ratio)",
        ((f"tv:{name}", partial(getattr(tvm, name), weights=None)) for name in TORCHVISION),
    )


if __name__ == "__main__":
    main()

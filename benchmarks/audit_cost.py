"""Cost of ``bncheck.audit(model, x)`` relative to one plain forward of the same model and batch.

Measured side by side in one run: for each configuration, ``--repeats`` rounds alternate a
plain forward (``model.eval()``, ``torch.no_grad()``) and a full audit (every rule the example
input enables), and the script prints the median time of each and their ratio, with the spread
of per-round ratios (min, max), both in wall time and in CPU time of this process (the CPU
ratio is steadier on a shared machine: other processes do not inflate it). The audit's budget
is 2.5x (aim: about 2.1x).

Configurations: ``vgg16_bn_small`` at 32x32 with batch 32 and 64, and a mid-size VGG16-BN
(``vgg16_bn(width=0.5, small_input=True)``) at 64x64 with batch 16.

    python benchmarks/audit_cost.py [--repeats 7] [--threads 1]

Timing depends on the machine's load: compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import bncheck
from bncheck.models import vgg16_bn, vgg16_bn_small


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> None:
    model.eval()

    def plain() -> None:
        with torch.no_grad():
            model(x)

    def audit() -> None:
        bncheck.audit(model, x)

    plain()
    audit()  # warm-up (imports, allocator, first-call costs)
    rows: dict[str, list[float]] = {"plain": [], "audit": [], "plain_cpu": [], "audit_cpu": []}
    for i in range(repeats):
        order = (plain, audit) if i % 2 == 0 else (audit, plain)
        times = {f: _timed(f) for f in order}
        for f, key in ((plain, "plain"), (audit, "audit")):
            rows[key].append(times[f][0])
            rows[f"{key}_cpu"].append(times[f][1])
    med = {k: statistics.median(v) for k, v in rows.items()}
    wall_ratios = [a / p for a, p in zip(rows["audit"], rows["plain"])]
    cpu_ratios = [a / p for a, p in zip(rows["audit_cpu"], rows["plain_cpu"])]
    print(
        f"{name:<36} forward {med['plain'] * 1e3:7.1f} ms  audit {med['audit'] * 1e3:7.1f} ms"
        f"  wall ratio {med['audit'] / med['plain']:4.2f}x "
        f"(rounds {min(wall_ratios):.2f}-{max(wall_ratios):.2f})"
        f"  CPU ratio {med['audit_cpu'] / med['plain_cpu']:4.2f}x "
        f"(rounds {min(cpu_ratios):.2f}-{max(cpu_ratios):.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats, "
        "median times; ratio = audit / one plain eval forward (no_grad), same model and batch"
    )
    small = vgg16_bn_small()
    for batch in (32, 64):
        x = torch.randn(batch, 3, 32, 32, generator=g)
        measure(f"vgg16_bn_small 32x32 batch {batch}", small, x, args.repeats)
    mid = vgg16_bn(num_classes=100, width=0.5, small_input=True)
    x = torch.randn(16, 3, 64, 64, generator=g)
    measure("vgg16_bn(width=0.5) 64x64 batch 16", mid, x, args.repeats)


if __name__ == "__main__":
    main()

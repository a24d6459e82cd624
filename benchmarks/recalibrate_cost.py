"""Cost of ``bncheck.recalibrate`` against plain forward passes over the same batches.

Model: ``bncheck.models.vgg16_bn_small()`` (13 BN layers), 32x32 inputs, ``--batches``
batches of ``--batch`` images, CPU. Three things are timed side by side in one run, in ABBA
order per repeat (so a slow drift of the machine cancels out):

* **forward**: the model in eval mode under ``torch.no_grad()``, one forward per batch: what
  any pass over the data costs;
* **train-mode forward**: the same with the BN layers in train mode (normalising with batch
  statistics, updating their buffers): the pass ``torch.optim.swa_utils.update_bn`` runs;
* **statistics pass**: the recomputation itself (every BN layer recomputed, the pass
  ``bncheck.recalibrate(..., layers="all")`` runs between its two audits). Target: at most
  1.1x a forward over the same batches (the train-mode forward is the like-for-like one:
  a train-mode BN must reduce its input, an eval-mode BN need not);
* **recalibrate()**: the whole call, ``layers="all"``: the audit before (one eval pass over
  the data that reduces every BN input for ``stat-drift``), the statistics pass, the audit
  after, and the model copy. This is the price of the verification, stated separately.

    python benchmarks/recalibrate_cost.py [--repeats 7] [--batches 8] [--batch 64] [--threads 1]

Prints per-item median times (CPU time of this process, ``time.process_time``, and wall
time) and the ratios to the forward, with their min-max over repeats. Timing depends on the
machine's load: compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

import bncheck
from bncheck.discovery import find_bn_layers
from bncheck.models import vgg16_bn_small
from bncheck.recalibration import _Batches, _statistics_pass


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg16_bn_small().eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(args.batch, 3, 32, 32, generator=gen) for _ in range(args.batches)]

    def forward() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    train_bn = copy.deepcopy(model)
    for module in train_bn.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()

    def train_forward() -> None:
        with torch.no_grad():
            for x in data:
                train_bn(x)

    work = copy.deepcopy(model)
    layers = find_bn_layers(work)
    batches = _Batches(data, None)

    def stats_pass() -> None:
        _statistics_pass(work, layers, batches)
        work.eval()

    def full() -> None:
        bncheck.recalibrate(model, data, layers="all")

    items = {
        "forward": forward,
        "train-mode forward": train_forward,
        "statistics pass": stats_pass,
        "recalibrate()": full,
    }
    for fn in items.values():  # warm up
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in items}
    names = list(items)
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(timed(items[name]))

    def med(name: str, i: int) -> float:
        return statistics.median(t[i] for t in times[name])

    print(
        f"vgg16_bn_small, {args.batches} batches of {args.batch}x3x32x32, "
        f"{args.threads} thread(s), {args.repeats} repeats, torch {torch.__version__}"
    )
    for base in ("forward", "train-mode forward"):
        print(f"\n{'':19} {'CPU s':>7} {'wall s':>7}   ratio to {base}: CPU (min-max), wall")
        for name in names:
            ratios_cpu = [a[0] / b[0] for a, b in zip(times[name], times[base])]
            ratios_wall = [a[1] / b[1] for a, b in zip(times[name], times[base])]
            print(
                f"{name:19} {med(name, 0):7.3f} {med(name, 1):7.3f}   "
                f"{statistics.median(ratios_cpu):.3f}x ({min(ratios_cpu):.3f}-"
                f"{max(ratios_cpu):.3f}), {statistics.median(ratios_wall):.3f}x"
            )


if __name__ == "__main__":
    main()

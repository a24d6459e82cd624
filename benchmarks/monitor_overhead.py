"""Cost of ``bncheck.Monitor`` on a training step, measured side by side in one run.

Model: ``bncheck.models.vgg16_bn_small()`` (13 BN layers), 32x32 inputs, batch 64, CPU, SGD
with momentum. One model and one optimizer train throughout; blocks of ``--block`` steps
alternate between unmonitored and monitored (in ABBA order, so a slow drift of the machine
cancels out), and each repeat gives one ratio monitored/unmonitored of the median step times
of its blocks. One Monitor is built up front; the monitored block includes attaching,
detaching and the Monitor's periodic checks (``flush_every`` is lowered to the block length
so they are paid inside the block).
A second unmonitored block ("a/a") is timed the same way: its ratio to the first shows how
much two identical blocks differ on this machine right now (the noise floor). With
``--naive``, forward hooks that re-reduce every BN input (what the Monitor avoids) are timed
too.

    python benchmarks/monitor_overhead.py [--repeats 30] [--block 4] [--threads 1] [--naive]
                                          [--device cuda] [--amp]

``--device cuda`` trains on the GPU (each block ends with ``torch.cuda.synchronize()``; the
wall ratio is the measure there, the CPU ratio counts the host's waiting); ``--amp`` trains
under ``torch.autocast`` float16 with a ``GradScaler`` handed to the Monitor.

Prints the median ratio and its spread (min, max over repeats) for wall-clock time and for
this process's CPU time (``time.process_time``, less sensitive to other processes on a shared
machine; with one thread it is the work the step costs), and the Monitor's own work
per step timed from inside its hooks during real monitored steps, which stays readable when
the machine is too noisy for the side-by-side ratio. Timing depends on the
machine's load: run it when the machine is quiet, and compare only ratios from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.models import vgg16_bn_small


def naive_hooks(model: nn.Module) -> Callable[[], None]:
    """Forward hooks that recompute every BN input's per-channel mean and variance."""
    records: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = args[0].detach()
        dims = [0] + list(range(2, x.dim()))
        records.append(torch.stack([x.mean(dims), x.var(dims)]))

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)
    ]

    def remove() -> None:
        for h in handles:
            h.remove()
        records.clear()

    return remove


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--block", type=int, default=4, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--naive", action="store_true", help="also time forward hooks that re-reduce every BN input"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--amp", action="store_true", help="autocast float16 + GradScaler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = vgg16_bn_small().to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    mon = bncheck.Monitor(
        model, optimizer=opt, flush_every=args.block, scaler=scaler if args.amp else None
    )

    def block(kind: str) -> tuple[float, float]:
        """(wall, CPU) seconds per step over one block (attach/detach included)."""
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        if kind == "monitor":
            mon.attach()
            for _ in range(args.block):
                step()
            mon.detach()
        elif kind == "naive":
            remove = naive_hooks(model)
            for _ in range(args.block):
                step()
            remove()
        else:
            for _ in range(args.block):
                step()
        sync()
        return ((time.perf_counter() - w0) / args.block, (time.process_time() - c0) / args.block)

    for _ in range(3):  # warm-up: allocator, kernels
        step()
    # "a/a" is a second unmonitored block: its ratio to "plain" is the noise floor
    kinds = ["plain", "monitor", "a/a"] + (["naive"] if args.naive else [])
    ratios: dict[str, dict[str, list[float]]] = {
        clock: {k: [] for k in kinds[1:]} for clock in ("wall", "cpu")
    }
    base_times: list[float] = []
    for r in range(args.repeats):
        order = kinds + kinds[::-1] if r % 2 == 0 else kinds[::-1] + kinds
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
        for kind in order:
            times[kind].append(block(kind))
        for c, clock in enumerate(("wall", "cpu")):
            base = statistics.median(t[c] for t in times["plain"])
            if clock == "wall":
                base_times.append(base)
            for k in kinds[1:]:
                ratios[clock][k].append(statistics.median(t[c] for t in times[k]) / base)
    print(
        f"vgg16_bn_small, batch {args.batch}, 32x32, SGD, {device}"
        f"{', AMP float16' if args.amp else ''}, {args.threads} thread(s); "
        f"{args.repeats} repeats of ABBA blocks of {args.block} steps"
    )
    print(
        f"unmonitored step (wall): median {statistics.median(base_times) * 1e3:.1f} ms "
        f"(min {min(base_times) * 1e3:.1f}, max {max(base_times) * 1e3:.1f})"
    )
    for clock in ("wall", "cpu"):
        for k, values in ratios[clock].items():
            med = statistics.median(values)
            print(
                f"{clock:>4} {k:>8} / plain: median {med:.4f} ({(med - 1) * 100:+.2f}%), "
                f"spread {min(values):.4f} .. {max(values):.4f}"
            )
    work, step_time, step_wall = monitor_work_per_step(model, opt, step, sync)
    print(
        f"Monitor's own work, timed inside 64 monitored steps (CPU): {work * 1e6:.0f} us per "
        f"step = {work / step_time * 100:.2f}% of the step's CPU time, "
        f"{work / step_wall * 100:.2f}% of its wall time (robust to machine noise)"
    )


def monitor_work_per_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: Callable[[], None],
    sync: Callable[[], None],
    steps: int = 64,
) -> tuple[float, float, float]:
    """(Monitor seconds per step, step seconds, step wall seconds), CPU time but the last,
    over ``steps`` real training steps.

    The Monitor's work is timed from inside: its end-of-step hook (which runs the periodic
    checks every ``flush_every`` = 64 steps), its forward hook (process-wide: called for
    every module, returning at once for the unwatched ones) and the final detach. torch's
    own cost of calling a hook is not in this figure, only in the side-by-side ratio.
    """
    mon = bncheck.Monitor(model, optimizer=opt)
    spent = [0.0]
    end_step, forward_hook = mon._end_step, mon._recorder._forward

    def timed_end_step() -> None:
        t0 = time.process_time()
        end_step()
        spent[0] += time.process_time() - t0

    def timed_forward_hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        t0 = time.process_time()
        forward_hook(module, args, output)
        spent[0] += time.process_time() - t0

    mon._end_step = timed_end_step  # type: ignore[method-assign]
    mon._recorder._forward = timed_forward_hook  # type: ignore[method-assign]
    mon.attach()
    sync()
    t0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    t1, w1 = time.process_time(), time.perf_counter()
    mon.detach()
    spent[0] += time.process_time() - t1
    return spent[0] / steps, (t1 - t0) / steps, (w1 - w0) / steps


if __name__ == "__main__":
    main()

"""Cost of ``bncheck.Monitor`` on a ``torch.compile``\\ d training step (inductor, CPU).

Model: ``bncheck.models.vgg16_bn_small()`` (13 BN layers), 32x32 inputs, batch 32, SGD. The
same compiled model trains in blocks without and with a Monitor (ABBA order); the first
steps of each variant (compilation, recompilation when the Monitor's hooks appear) are
timed separately and excluded from the per-step figures. The Monitor attaches before the first
call, so its hooks are compiled in. Also prints dynamo's graph-break count.

    python benchmarks/monitor_compiled.py [--steps 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bncheck
from bncheck.models import vgg16_bn_small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg16_bn_small()
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        opt.step()

    def timed(n: int) -> float:  # CPU time of this process (one thread: the step's work)
        t0 = time.process_time()
        for _ in range(n):
            step()
        return (time.process_time() - t0) / n

    from torch._dynamo.utils import counters

    # attach before the first call: dynamo traces the Monitor's hooks into the compiled code
    # (it does not re-trace for hooks added later)
    monitor = bncheck.Monitor(compiled, optimizer=opt, flush_every=args.steps)
    with monitor:
        t0 = time.perf_counter()
        step()
        first_monitored = time.perf_counter() - t0
    breaks = sum(counters["graph_break"].values())
    t0 = time.perf_counter()
    step()
    first_plain = time.perf_counter() - t0
    plain, monitored = [], []
    for r in range(args.repeats):
        order = ("plain", "monitored") if r % 2 == 0 else ("monitored", "plain")
        for name in order:
            if name == "plain":
                step()  # a recompilation, if a variant change triggers one, is not timed
                plain.append(timed(args.steps))
            else:
                with monitor:
                    step()
                    monitored.append(timed(args.steps))
    p, m = statistics.median(plain), statistics.median(monitored)
    print(f"first step: monitored (compiles) {first_monitored:.1f} s, plain {first_plain:.1f} s")
    print(f"graph breaks: {breaks}; monitored steps seen: {monitor.steps}")
    print(f"step (CPU): plain {p * 1e3:.1f} ms, monitored {m * 1e3:.1f} ms, ratio {m / p:.3f}")
    print(f"ratios per repeat: {[round(b / a, 3) for a, b in zip(plain, monitored)]}")


if __name__ == "__main__":
    main()

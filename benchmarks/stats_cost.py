"""Cost of the audit's per-channel statistics of BN inputs, this checkout against another.

The full audit's ratio (``audit_cost.py``) moves by +-0.15 between runs on a shared machine,
more than one part of the audit weighs. This script isolates one part: every BN input of one
train-mode forward of each family model (``audit_cost.FAMILIES``, batch 32, 96x96) is kept,
then ``probes.read_stats`` on each and ``probes.finish_all`` over all of them are timed for
this checkout and for ``--against DIR``'s bncheck, alternating, ``--repeats`` rounds (CPU
time, medians). It also prints the largest difference between the two versions' channel
variances, relative to the budget the rules allow (8 u (1 + log2 n) var (1 + |mean| / sd)):
both versions must stay well under 1.

    python benchmarks/stats_cost.py --against DIR [--repeats 11] [--only NAME,...]

The activations are copies, read from memory rather than from the cache the forward left
them in, so the absolute times are those of a cold read.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from typing import Any

import torch
from audit_cost import FAMILIES, load_other
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bncheck import probes


def bn_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Copies of every BN call's input in one train-mode forward (no_grad)."""
    kept: list[torch.Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args: kept.append(args[0].detach().clone()))
        for m in model.modules()
        if isinstance(m, _BatchNorm)
    ]
    try:
        with torch.no_grad():
            model.train()(x)
    finally:
        for h in handles:
            h.remove()
    return kept


def read_all(module: Any, inputs: list[torch.Tensor]) -> dict[int, Any]:
    raws = [module.read_stats(t) for t in inputs]
    finished = module.finish_all([r for r in raws if r is not None])
    return {i: finished[id(r)] for i, r in enumerate(raws) if r is not None}


def cpu_seconds(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def worst_budget_share(inputs: list[torch.Tensor], stats: dict[int, Any]) -> float:
    """Largest |var - float64 oracle| over the rules' budget, over all channels."""
    worst = 0.0
    for i, t in enumerate(inputs):
        values = t.double().transpose(0, 1).reshape(t.shape[1], -1)
        n = values.shape[1]
        mean = values.mean(1)
        var = ((values - mean[:, None]) ** 2).mean(1)
        u = torch.finfo(t.dtype).eps
        budget = 8 * u * (1 + math.log2(n)) * var * (1 + mean.abs() / var.sqrt())
        err = (stats[i].var - var).abs() / budget.clamp_min(1e-300)
        worst = max(worst, float(err.max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="another checkout's directory")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--only", default="", help="comma-separated substrings of names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    other = load_other(args.against)
    other_probes = __import__("bncheck_against.probes", fromlist=["probes"])
    wanted = [w for w in args.only.split(",") if w]
    print(f"torch {torch.__version__}, 1 thread, {args.repeats} rounds, batch 32, 96x96")
    for name, build in FAMILIES.items():
        if wanted and not any(w in name for w in wanted):
            continue
        torch.manual_seed(0)
        inputs = bn_inputs(build(), torch.randn(32, 3, 96, 96))
        times: dict[str, list[float]] = {"this": [], "against": []}
        for _ in range(args.repeats):
            times["this"].append(cpu_seconds(partial(read_all, probes, inputs)))
            times["against"].append(cpu_seconds(partial(read_all, other_probes, inputs)))
        this, against = (statistics.median(times[k]) for k in ("this", "against"))
        share = worst_budget_share(inputs, read_all(probes, inputs))
        share_other = worst_budget_share(inputs, read_all(other_probes, inputs))
        print(
            f"{name:26s} {len(inputs):3d} BN inputs  this {this * 1e3:7.1f} ms  "
            f"against {against * 1e3:7.1f} ms  ratio {this / against:4.2f}  "
            f"worst error / budget {share:.3f} (against {share_other:.3f})"
        )
    del other


if __name__ == "__main__":
    main()

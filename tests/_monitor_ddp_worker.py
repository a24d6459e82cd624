"""One rank of the Monitor's DDP tests (run as a subprocess by tests/test_monitor_distributed.py).

    python tests/_monitor_ddp_worker.py RANK WORLD PORT SCENARIO[,SCENARIO...] OUT_PREFIX

Scenarios: ``divergent`` (broadcast_buffers=False, different data per rank, per-rank batch
4), ``synced`` (broadcast_buffers=True, different data per rank, per-rank batch 40), ``raise``
(rank 1 raises inside the monitored loop; rank 0 must fail by timeout, not hang), ``short``
(as ``divergent`` with per-rank batch 40, but 3 steps with the default ``sync_every=50``: only
the final comparison in ``report()`` sees the divergence).
Rank 0 writes each scenario's merged report as JSON to OUT_PREFIX.SCENARIO.json.
"""

from __future__ import annotations

import os
import sys
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# run as a script: its folder (tests/) is sys.path[0], so the helper modules import by name
from zoo import ConvBNReLU

import bncheck


def train(rank: int, scenario: str) -> bncheck.Report:
    torch.manual_seed(0)
    model = ConvBNReLU()
    with warnings.catch_warnings():  # newer torch renames broadcast_buffers
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DDP(model, broadcast_buffers=scenario == "synced")
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    batch = 4 if scenario == "divergent" else 40
    sync_every, steps = (50, 3) if scenario == "short" else (1, 4)
    gen = torch.Generator().manual_seed(100 + rank)
    with bncheck.Monitor(ddp, optimizer=opt, sync_every=sync_every) as monitor:
        for step in range(steps):
            x = torch.randn(batch, 3, 8, 8, generator=gen) * (1 + rank) + rank
            y = torch.randint(0, 4, (batch,), generator=gen)
            if scenario == "raise" and rank == 1 and step == 2:
                raise RuntimeError("rank 1 failed on purpose")
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
    return monitor.report()


def main() -> None:
    rank, world, port, scenarios, out = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4].split(","),
        sys.argv[5],
    )
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    timeout = timedelta(seconds=5 if "raise" in scenarios else 60)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        for scenario in scenarios:
            report = train(rank, scenario)
            if rank == 0:
                with open(f"{out}.{scenario}.json", "w", encoding="utf-8") as fh:
                    fh.write(report.to_json())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One rank of the distributed ``bncheck.recalibrate`` test (tests/test_recalibrate_distributed.py).

    python tests/_recalibrate_ddp_worker.py RANK WORLD PORT OUT_PREFIX

Each rank recalibrates the same model on its own shard of ``recalibrate_data.batches()``
(rank r takes batches r, r + WORLD, ...), then on a shard whose batch has NaN on rank 1
only, and writes OUT_PREFIX.RANK.pt: the recomputed buffers, the batch count, and the
error each rank got for the NaN shard (every rank must get one; none may hang).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

# run as a script: its folder (tests/) is sys.path[0], so the helper modules import by name
from recalibrate_data import batches
from zoo import TwoBlock, trained

import bncheck


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = trained(TwoBlock(), batches()[0][0])
        shard = batches()[rank::world]
        result = bncheck.recalibrate(model, shard, layers="all")
        bad = [x for x, _ in shard]
        if rank == 1:
            bad[0][0, 0, 0, 0] = float("nan")
        try:
            bncheck.recalibrate(model, bad, layers="all")
            error = None
        except bncheck.UsageError as exc:
            error = str(exc)
        torch.save(
            {
                "buffers": {
                    k: v
                    for k, v in result.model.state_dict().items()
                    if "running" in k or "num_batches" in k
                },
                "batches": result.batches,
                "layers": result.layers,
                "error": error,
            },
            f"{out}.{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

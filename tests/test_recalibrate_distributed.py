"""``bncheck.recalibrate`` under torch.distributed: 2 gloo ranks on loopback, bounded time.

Ranks with different shards of the data must end with identical statistics, equal to the
statistics of all shards pooled in one process; an error on one rank is an error on every
rank, not a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from recalibrate_data import batches
from zoo import TwoBlock, trained

import bncheck

WORKER = Path(__file__).with_name("_recalibrate_ddp_worker.py")
TIMEOUT = 150

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ranks_with_different_shards_end_identical_and_equal_to_the_pooled_statistics(tmp_path):
    out = tmp_path / "rank"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", port, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], logs
    ranks = [torch.load(f"{out}.{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["buffers"].keys() == ranks[1]["buffers"].keys()
    for key, value in ranks[0]["buffers"].items():
        assert torch.equal(value, ranks[1]["buffers"][key]), key
    assert ranks[0]["batches"] == ranks[1]["batches"] == len(batches())
    torch.manual_seed(0)  # the workers' model
    model = trained(TwoBlock(), batches()[0][0])
    pooled = bncheck.recalibrate(model, batches(), layers="all").model.state_dict()
    for key, value in ranks[0]["buffers"].items():
        torch.testing.assert_close(value, pooled[key], rtol=1e-5, atol=1e-6)
    assert "has 1 NaN/Inf values" in ranks[1]["error"]
    assert ranks[0]["error"].startswith("recalibration failed on rank 1: batch 0 of data")

"""The Monitor under torch.distributed: 2 processes, gloo backend, loopback, bounded time.

Each test starts two ranks of ``tests/_monitor_ddp_worker.py`` as subprocesses, waits at most
``TIMEOUT`` seconds and kills them on timeout, so a deadlock fails the test instead of hanging
CI. The workers use ``init_process_group(timeout=...)`` so a rank blocked in a collective
gives up on its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

import bncheck
from bncheck.distributed import rank_divergence

WORKER = Path(__file__).with_name("_monitor_ddp_worker.py")
TIMEOUT = 150

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with gloo is not available",
    ),
    pytest.mark.slow,
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(scenarios: str, tmp_path: Path) -> tuple[list[int], list[str], Path]:
    out = tmp_path / "report"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", port, scenarios, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for rank in range(2)
    ]
    codes, logs = [], []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=TIMEOUT)
            codes.append(proc.returncode)
            logs.append(text)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes, logs, out


@pytest.fixture(scope="module")
def two_rank_reports(tmp_path_factory) -> dict[str, bncheck.Report]:
    """Both training scenarios in one pair of processes (one startup, one process group)."""
    tmp = tmp_path_factory.mktemp("ddp")
    codes, logs, out = run_ranks("divergent,synced,short", tmp)
    assert codes == [0, 0], logs
    return {
        name: bncheck.Report.from_json(Path(f"{out}.{name}.json").read_text())
        for name in ("divergent", "synced", "short")
    }


@pytest.mark.slow
def test_broadcast_buffers_false_with_per_rank_data_diverges(two_rank_reports):
    report = two_rank_reports["divergent"]
    [divergent] = report.filter(rules=["rank-divergent-stats"])
    assert divergent.layer == "bn"
    assert divergent.details["step"] == 1  # compared at the forward after optimizer step 1
    assert divergent.details["rel_diff"] > 1e-4 and "2 ranks" in divergent.message
    [unsynced] = report.filter(rules=["unsynced-small-batch"])
    assert unsynced.details["batch_size"] == 4 and "global 8" in unsynced.message
    assert any("rank 1 of 2" in n for n in report.notes)  # merged over both ranks


@pytest.mark.slow
def test_broadcast_buffers_true_keeps_ranks_in_sync(two_rank_reports):
    report = two_rank_reports["synced"]
    assert report.filter(rules=["rank-divergent-stats", "unsynced-small-batch"]) == []
    # at the start of each of the 4 forwards; not at report(): DDP broadcasts rank 0's
    # buffers at the next forward, so the ranks differ after the last step by design
    assert any("compared across ranks 4 time(s)" in n for n in report.notes)


def test_a_run_shorter_than_sync_every_is_compared_at_report(two_rank_reports):
    """3 steps with sync_every=50: the only comparison during the run is before the first
    update (ranks still equal); the final one in report() finds the divergence."""
    report = two_rank_reports["short"]
    [divergent] = report.filter(rules=["rank-divergent-stats"])
    assert divergent.layer == "bn"
    assert divergent.details["step"] == 3  # the state after the last optimizer step
    assert any("compared across ranks 2 time(s)" in n for n in report.notes)


@pytest.mark.slow
def test_a_rank_that_raises_does_not_hang_the_other(tmp_path):
    codes, logs, _ = run_ranks("raise", tmp_path)
    assert codes[1] != 0 and "rank 1 failed on purpose" in logs[1]
    assert codes[0] != 0  # rank 0 gives up at the process-group timeout


def test_rank_divergence_against_a_direct_computation():
    rng = np.random.default_rng(0)
    gathered = rng.normal(size=(3, 4, 4))
    gathered[:, 1] = gathered[0, 1]  # layer 1 identical on every rank
    gathered[2, 3, 0] = np.nan  # layer 3 poisoned on one rank
    got = rank_divergence(gathered)
    for layer in (0, 2):
        vals = gathered[:, layer, :]
        spread = (vals.max(0) - vals.min(0)) / np.maximum(np.abs(vals).max(0), 1e-12)
        assert got[layer] == pytest.approx(spread.max())
    assert got[1] == 0.0 and got[3] == np.inf

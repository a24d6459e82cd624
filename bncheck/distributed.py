"""The Monitor's collective operations under ``torch.distributed`` (DDP).

Every function here that talks to other ranks is a collective: every rank must call it, in
the same order. The Monitor calls them only at points every rank reaches together (the
start of a train-mode forward with grad enabled, and ``Monitor.report()``), never in hooks
that run on one rank only and never while cleaning up after an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DistInfo",
    "dist_info",
    "layer_checksums",
    "gather_checksums",
    "rank_divergence",
    "gather_reports",
    "is_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the process group the Monitor compares ranks over."""

    rank: int
    world_size: int
    group: Any
    backend: str


def is_ddp(model: nn.Module) -> bool:
    return type(model).__name__ == "DistributedDataParallel"


def syncs_buffers_at_forward(model: nn.Module) -> bool:
    """True for a DDP wrapper that broadcasts rank 0's buffers at the start of each forward
    (``broadcast_buffers`` / ``forward_sync_buffers``): between the last update and the next
    forward the ranks' buffers differ by design, so that state is not compared."""
    if not is_ddp(model):
        return False
    will = getattr(model, "will_sync_module_buffers", None)
    if callable(will):
        try:
            return bool(will())
        except Exception:  # an older or newer DDP: fall back to the flag
            pass
    flag = getattr(model, "forward_sync_buffers", None)
    if flag is None:
        flag = getattr(model, "broadcast_buffers", False)
    return bool(flag)


def dist_info(group: Any = None) -> DistInfo | None:
    """The rank and world size when ``torch.distributed`` runs with more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size(group)
    if world <= 1:
        return None
    return DistInfo(dist.get_rank(group), world, group, str(dist.get_backend(group)))


@torch.no_grad()
def layer_checksums(modules: Sequence[nn.Module], device: torch.device) -> torch.Tensor:
    """``[L, 4]`` float64: mean and mean square of running_mean and of running_var per layer.

    Two ranks with the same buffers give bitwise equal rows; a layer without running
    statistics gives zeros.
    """
    rows = []
    for m in modules:
        rm, rv = m._buffers.get("running_mean"), m._buffers.get("running_var")
        if rm is None or rv is None:
            rows.append(torch.zeros(4, dtype=torch.float64, device=device))
            continue
        rm64, rv64 = rm.detach().to(device, torch.float64), rv.detach().to(device, torch.float64)
        rows.append(
            torch.stack([rm64.mean(), (rm64 * rm64).mean(), rv64.mean(), (rv64 * rv64).mean()])
        )
    return torch.stack(rows)


def gather_checksums(local: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """All ranks' checksums, ``[world, L, 4]`` (an ``all_gather``: collective)."""
    import torch.distributed as dist

    out = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(out, local.contiguous(), group=info.group)
    return torch.stack(out)


def rank_divergence(gathered: np.ndarray) -> np.ndarray:
    """Per layer, the largest relative spread across ranks of any checksum entry.

    ``(max over ranks - min over ranks) / max(max |value| over ranks, 1e-12)``; NaN/Inf
    anywhere counts as divergent (infinite spread) unless every rank has the same bits.
    """
    hi, lo = gathered.max(axis=0), gathered.min(axis=0)
    scale = np.maximum(np.abs(gathered).max(axis=0), 1e-12)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = (hi - lo) / scale
    same = (gathered == gathered[0:1]).all(axis=0)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    rel = np.where(same, 0.0, rel)
    return rel.max(axis=1)


def gather_reports(report_json: str, info: DistInfo) -> list[str] | None:
    """Every rank's report JSON on rank 0 (``None`` on the other ranks): collective."""
    import torch.distributed as dist

    out: list[Any] | None = [None] * info.world_size if info.rank == 0 else None
    dst = 0 if info.group is None else dist.get_global_rank(info.group, 0)
    dist.gather_object(report_json, out, dst=dst, group=info.group)
    return [str(x) for x in out] if out is not None else None

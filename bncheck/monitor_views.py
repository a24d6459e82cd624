"""The Monitor's views: its records as pandas DataFrames and a matplotlib figure.

These are the bodies of ``Monitor.history``, ``Monitor.channels`` and ``Monitor.plot``; they
read the Monitor's compact records (after checking the pending steps) and build nothing
while the training loop runs. pandas and matplotlib are imported only here, when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks.training import C_EVAL, C_MINBATCH, C_MINSAMPLES, C_NOGRAD, C_TRAIN, STAT_COLUMNS
from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .monitor import Monitor

__all__ = ["history", "channels", "plot"]


def history(mon: Monitor) -> pd.DataFrame:
    """One row per step and BN layer, built from the compact per-step records.

    Columns: ``step``, ``layer``, ``mode`` ("train", "eval", "train+eval" or "unused"),
    ``grad_enabled`` (whether the train-mode calls ran with grad; None without any),
    ``batch_size`` and ``samples_per_channel`` (smallest of the step's train-mode calls),
    ``updates`` (Δnum_batches_tracked), then the per-layer summaries of
    :data:`bncheck.checks.training.STAT_COLUMNS` (means over channels).
    """
    import pandas as pd

    mon._flush()
    columns = [
        "step",
        "layer",
        "mode",
        "grad_enabled",
        "batch_size",
        "samples_per_channel",
        "train_calls",
        "eval_calls",
        "updates_without_grad",
        *STAT_COLUMNS,
    ]
    if not mon._chunks:
        return pd.DataFrame(columns=columns)
    steps = np.concatenate([c[0] for c in mon._chunks])
    stats = np.concatenate([c[1] for c in mon._chunks])
    counts = np.concatenate([c[2] for c in mon._chunks])
    n_steps, n_layers = stats.shape[:2]
    train, evals = counts[..., C_TRAIN], counts[..., C_EVAL]
    mode = np.where(
        train > 0,
        np.where(evals > 0, "train+eval", "train"),
        np.where(evals > 0, "eval", "unused"),
    )
    nograd = counts[..., C_NOGRAD]
    grad = np.where(train > 0, (nograd < train).astype(object), np.array(None))
    data: dict[str, Any] = {
        "step": np.repeat(steps, n_layers),
        "layer": np.tile(np.array([lyr.name for lyr in mon.layers], dtype=object), n_steps),
        "mode": mode.reshape(-1),
        "grad_enabled": grad.reshape(-1),
        "batch_size": counts[..., C_MINBATCH].reshape(-1),
        "samples_per_channel": counts[..., C_MINSAMPLES].reshape(-1),
        "train_calls": train.reshape(-1),
        "eval_calls": evals.reshape(-1),
        "updates_without_grad": nograd.reshape(-1),
    }
    for j, name in enumerate(STAT_COLUMNS):
        data[name] = stats[..., j].reshape(-1).astype(np.float64)
    return pd.DataFrame(data, columns=columns)


def channels(mon: Monitor, layer: str) -> pd.DataFrame:
    """Per-channel values of one layer for the last ``channel_history`` steps.

    Columns: ``step``, ``channel``, ``running_mean``, ``running_var``, ``batch_mean``,
    ``batch_var`` (the unbiased batch variance recovered from the update; NaN when the
    layer did not update exactly once in that step).
    """
    import pandas as pd

    mon._flush()
    names = [mon.layers[i].name for i in mon._flat.indices] if mon._flat.modules else []
    if layer not in names:
        known = [lyr.name for lyr in mon.layers]
        from .errors import did_you_mean

        raise UsageError(
            f"no watched BN layer named {layer!r}{did_you_mean(layer, known)}; "
            f"watched: {', '.join(names) or 'none'}"
        )
    t = names.index(layer)
    seg = mon._flat.segment
    mask = seg == t
    rows = []
    for step, values in mon._channels:
        block = values[:, mask].T.cpu().numpy()
        frame = pd.DataFrame(
            block, columns=["running_mean", "running_var", "batch_mean", "batch_var"]
        )
        frame.insert(0, "channel", np.arange(len(block)))
        frame.insert(0, "step", step)
        rows.append(frame)
    if not rows:
        return pd.DataFrame(
            columns=[
                "step",
                "channel",
                "running_mean",
                "running_var",
                "batch_mean",
                "batch_var",
            ]
        )
    return pd.concat(rows, ignore_index=True)


def plot(mon: Monitor, path: str | Path, layers: Sequence[str] | None = None) -> Path:
    """Write a PNG of per-layer statistics over the steps; returns the path.

    Four panels: mean |batch mean|, mean batch variance, mean |running_mean| and mean
    running_var, one line per layer. Needs matplotlib (``pip install 'bncheck[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "Monitor.plot needs matplotlib, which is not installed; install it with "
            "pip install 'bncheck[plot]'"
        ) from None
    frame = history(mon)
    names = list(layers) if layers is not None else [lyr.name for lyr in mon.layers]
    unknown = [n for n in names if n not in {lyr.name for lyr in mon.layers}]
    if unknown:
        raise UsageError(
            f"Monitor.plot: no BN layer named {unknown[0]!r}; layers: "
            f"{', '.join(lyr.name for lyr in mon.layers)}"
        )
    panels = [
        ("batch_mean_abs", "mean |batch mean|"),
        ("batch_var", "mean batch var"),
        ("running_mean_abs", "mean |running_mean|"),
        ("running_var", "mean running_var"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    try:
        for ax, (col, title) in zip(axes.flat, panels):
            for name in names:
                part = frame[frame["layer"] == name]
                ax.plot(
                    part["step"].to_numpy(),
                    part[col].to_numpy(dtype=float),
                    label=name,
                    linewidth=1,
                )
            ax.set_title(title)
            ax.set_xlabel("step")
        if names and len(names) <= 20:
            axes.flat[0].legend(fontsize=6, ncol=2)
        fig.suptitle(f"bncheck Monitor: {len(names)} BN layer(s), {mon._step} step(s)")
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out

#!/usr/bin/env python
"""Batch Normalization in a CNN, measured: the tutorial bncheck grew from, as numbers.

This script trains the small reference VGG16-BN (``bncheck.models.vgg16_bn_small``) on real
images, scikit-learn's bundled handwritten digits (1,797 8x8 grey images, upsampled to 32x32),
with ``bncheck.Monitor`` attached, and measures six claims of the tutorial:

1. scaling the input (0-1) vs feeding raw 0-255 pixels, with and without BN: accuracy,
   loss, and the ``input-not-normalized`` finding;
2. with vs without BN (``batch_norm=False``): loss and accuracy per epoch;
3. batch sizes 2, 8 and 64 (learning rate scaled linearly): how much the per-step batch
   statistics jump (``Monitor.channels``, and ``drift_z`` from ``Monitor.history``), what a
   small batch's statistics cost at test time, and the ``small-batch`` finding;
4. BN before vs after the ReLU (``bn_position="after"``): accuracy and ``bn-after-activation``;
5. running (EMA) statistics vs batch statistics at inference: test accuracy in ``eval()`` mode
   vs with the BN layers left in train mode at test batch sizes 1 and 256, and how
   ``running_mean`` (an exponential moving average with momentum 0.1) converges to the
   population mean: measured step by step against the 0.9^t the EMA predicts, by resetting
   the trained model's statistics and re-estimating them with a Monitor watching;
6. repairing corrupted statistics: NaN in one layer (an AMP overflow), an EMA copy whose
   statistics were never trained, statistics of the wrong data; the accuracy each costs, and
   ``bncheck.recalibrate`` on a few hundred training images bringing it back, with its
   before/after tables.

The Monitor's findings for every run are listed at the end. The texts in the Markdown are
chosen from the measured numbers: where an effect does not show at this scale, it says so.

Everything is seeded (``torch.manual_seed`` and a local ``torch.Generator`` for the data split
and the shuffling), so the numbers repeat on the same machine and torch version. Nothing is
downloaded. Output, in ``--out`` (default ``examples/_out``): ``walkthrough.md`` (the tables
and what they show; also printed), ``walkthrough.png`` (six panels), and the Monitor's own
plots (``Monitor.plot``) of the batch-64 and batch-2 runs.

    python examples/seed_walkthrough.py            # the full run (about 2-3 minutes, 1 thread)
    python examples/seed_walkthrough.py --quick    # a few seconds: a smoke test, not a result
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import bncheck  # noqa: E402
from bncheck.models import vgg16_bn_small  # noqa: E402

SEED = 0
#: The BN layer whose statistics the walkthrough follows: the first one, right after conv1.
WATCHED_LAYER = "features.1"
#: The same layer when BN comes after the ReLU (conv, relu, bn): index 2 in ``features``.
WATCHED_LAYER_AFTER = "features.2"


# ---------------------------------------------------------------------------------------------
# settings and data
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """How big the run is. ``--quick`` shrinks everything so the script runs in seconds."""

    epochs: int = 6
    train_size: int = 1297
    test_size: int = 500
    width: float = 0.25
    lr: float = 0.02  # at batch size 64; scaled linearly with the batch size
    max_steps_per_epoch: int | None = None
    recalibration_steps: int = 60
    calibration_images: int = 320  # section 6: the few hundred images bncheck.recalibrate uses
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(
            epochs=1,
            train_size=256,
            test_size=128,
            width=0.125,
            max_steps_per_epoch=12,
            recalibration_steps=12,
            calibration_images=128,
            quick=True,
        )


@dataclass
class Digits:
    """The digits split into train and test; images are 1x32x32 on the raw 0-255 pixel scale."""

    x_train_raw: torch.Tensor
    y_train: torch.Tensor
    x_test_raw: torch.Tensor
    y_test: torch.Tensor

    @staticmethod
    def scale(x_raw: torch.Tensor) -> torch.Tensor:
        """Scale raw pixels to 0-1 (divide by 255), the tutorial's first option."""
        return x_raw / 255.0


def load_digits_32(settings: Settings) -> Digits:
    """scikit-learn's bundled digits, upsampled from 8x8 to 32x32, split with a fixed seed.

    The digits are stored as intensities 0-16; multiplying by 255/16 puts them on the raw
    8-bit pixel scale a camera or a PNG file gives (0-255), the "unscaled" input.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    train = order[: settings.train_size]
    test = order[settings.train_size : settings.train_size + settings.test_size]
    return Digits(images[train], labels[train], images[test], labels[test])


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    max_steps: int | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches; the last partial batch is dropped (``drop_last=True``), so no
    batch is smaller than ``batch_size`` (a batch of 1 is what BN cannot train on)."""
    order = torch.randperm(len(y), generator=generator)
    steps = len(y) // batch_size
    if max_steps is not None:
        steps = min(steps, max_steps)
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        yield x[index], y[index]


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run: its settings, curves, final model, and what bncheck said about it."""

    name: str
    model: nn.Module
    batch_size: int
    scaled: bool
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    history: Any = None  # Monitor.history (a pandas DataFrame), None without BN
    channels: Any = None  # Monitor.channels(WATCHED_LAYER): per-channel values per step
    monitor: Any = None  # the bncheck.Monitor that watched the run
    monitor_report: bncheck.Report | None = None
    seconds: float = 0.0


def reset_classifier(model: nn.Module) -> None:
    """Give the classifier's linear layers PyTorch's default initialisation.

    The reference VGG initialises them like torchvision, N(0, 0.01): made for ImageNet and
    dozens of epochs, it shrinks the signal about tenfold per layer and the head then learns
    nothing in the few epochs run here (measured: test accuracy stays at chance, with or
    without BN). The convolutions keep torchvision's initialisation (Kaiming, fan_out), which
    is fair to the network without BN.
    """
    for module in model.classifier:  # type: ignore[union-attr]
        if isinstance(module, nn.Linear):
            module.reset_parameters()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    bn_batch_stats: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x, y).

    With ``bn_batch_stats=False`` the model is in ``eval()`` mode: BN uses its running
    statistics. With ``True``, dropout stays off but every BN layer is put in train mode, so it
    normalises each test batch with that batch's own mean and (biased) variance; this runs on
    a copy of the model because a train-mode forward also updates the running statistics.
    """
    net = model
    if bn_batch_stats:
        net = copy.deepcopy(model).eval()
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
    else:
        net.eval()
    losses, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = net(x[start : start + batch_size])
        target = y[start : start + batch_size]
        losses += F.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return losses / len(y), correct / len(y)


def train(
    name: str,
    data: Digits,
    settings: Settings,
    *,
    batch_size: int = 64,
    scaled: bool = True,
    batch_norm: bool = True,
    bn_position: str = "before",
    lr: float | None = None,
) -> Run:
    """Train a fresh, seeded ``vgg16_bn_small`` with SGD, watched by ``bncheck.Monitor``.

    The learning rate is ``lr`` (default ``settings.lr``) times ``batch_size / 64`` (the linear
    scaling rule, so every batch size moves the weights about as far per epoch), annealed to
    0 over the run with a cosine schedule, so the final weights (and the running statistics
    that follow them) settle.
    """
    torch.manual_seed(SEED)
    model = vgg16_bn_small(
        num_classes=10,
        in_channels=1,
        width=settings.width,
        batch_norm=batch_norm,
        bn_position=bn_position,
    )  # type: ignore[arg-type]
    reset_classifier(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=(lr or settings.lr) * batch_size / 64, momentum=0.9
    )
    steps_per_epoch = len(data.y_train) // batch_size
    if settings.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps_per_epoch)
    steps = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    x_train = Digits.scale(data.x_train_raw) if scaled else data.x_train_raw
    x_test = Digits.scale(data.x_test_raw) if scaled else data.x_test_raw
    run = Run(name, model, batch_size, scaled)
    watched = WATCHED_LAYER if bn_position == "before" else WATCHED_LAYER_AFTER
    shuffle = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()

    def one_epoch() -> float:
        model.train()
        total, count = 0.0, 0
        for xb, yb in batches(
            x_train, data.y_train, batch_size, shuffle, settings.max_steps_per_epoch
        ):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(yb)
            count += len(yb)
        return total / max(count, 1)

    def record(train_loss: float) -> None:
        run.train_loss.append(train_loss)
        loss, acc = evaluate(model, x_test, data.y_test)
        run.test_loss.append(loss)
        run.test_acc.append(acc)

    for_epochs = range(settings.epochs)
    if batch_norm:
        # channel_history: keep every step's per-channel values (not just the last 16) for
        # the plots; the per-layer summaries in ``history`` are kept for every step anyway.
        with bncheck.Monitor(model, optimizer=optimizer, channel_history=steps) as monitor:
            for _ in for_epochs:
                record(one_epoch())
        run.history = monitor.history
        run.monitor = monitor
        run.channels = monitor.channels(watched)
        run.monitor_report = monitor.report()
    else:  # no BN layer: nothing for the Monitor to watch (it would raise NoBatchNormError)
        for _ in for_epochs:
            record(one_epoch())
    run.seconds = time.perf_counter() - started
    model.eval()
    return run


# ---------------------------------------------------------------------------------------------
# reading bncheck's output
# ---------------------------------------------------------------------------------------------
def rule_status(report: bncheck.Report | None, rule: str) -> str:
    """One cell saying what a report says about ``rule``: found where, not found, or skipped."""
    if report is None:
        return "n/a (no BN layer)"
    found = [f for f in report.findings if f.rule == rule]
    if found:
        parts = ["model-wide"] if any(f.layer is None for f in found) else []
        layers = [f.layer for f in found if f.layer is not None]
        if layers:
            shown = ", ".join(f"`{name}`" for name in layers[:3])
            more = f" +{len(layers) - 3}" if len(layers) > 3 else ""
            parts.append(f"in {len(layers)} layer(s): {shown}{more}")
        return f"**{found[0].severity.value}** " + "; ".join(parts)
    if rule in report.skipped:
        return f"not run ({report.skipped[rule]})"
    return "not found"


def first_message(report: bncheck.Report | None, rule: str) -> str | None:
    if report is None:
        return None
    for finding in report.findings:
        if finding.rule == rule:
            return finding.message
    return None


def audit_training_batch(run: Run, data: Digits) -> bncheck.Report:
    """``bncheck.audit`` with one real training batch, at the run's batch size and scaling.
    The trained model is in eval mode: ``training_batch=True`` says the batch is the one it
    trains with, so the batch-size rules judge it."""
    x = data.x_train_raw[: run.batch_size]
    return bncheck.audit(run.model, Digits.scale(x) if run.scaled else x, training_batch=True)


def layer_series(run: Run, column: str) -> np.ndarray:
    """Per-channel ``column`` of the watched BN layer, as a (steps, channels) array.

    Read from ``Monitor.channels(layer)``: the running mean/var after each optimizer step and
    the batch mean/var of that step, which the Monitor recovers exactly from the momentum
    update (``batch = (running_new - (1 - momentum) * running_old) / momentum``; the batch
    variance is the unbiased one, as PyTorch uses for ``running_var``).
    """
    frame = run.channels
    if frame is None or frame.empty:
        raise SystemExit(f"{run.name}: the Monitor kept no per-channel values")
    table = frame.pivot(index="step", columns="channel", values=column).sort_index()
    return table.to_numpy(dtype=float)


def batch_mean_noise(run: Run) -> float:
    """How much the per-step batch means of the watched layer jump, in units of the channel's std.

    For each channel c: the standard deviation over steps of the step-to-step change of the
    batch mean, ``std_t(m_t - m_{t-1})``, divided by ``sqrt(running_var_c)`` at the end of
    training; then the median over channels. Differencing removes the slow drift that comes
    from the weights changing, so what is left is mostly sampling noise, which shrinks like
    ``1/sqrt(batch size)``.
    """
    means = layer_series(run, "batch_mean")
    running_var = layer_series(run, "running_var")[-1]
    if len(means) < 3:
        return float("nan")
    jumps = np.nanstd(np.diff(means, axis=0), axis=0)
    return float(np.median(jumps / np.sqrt(np.maximum(running_var, 1e-12))))


@torch.no_grad()
def population_mean(model: nn.Module, x: torch.Tensor, layer: str) -> np.ndarray:
    """Per-channel mean of the input of BN ``layer`` over all of ``x`` (eval mode)."""
    module = dict(model.named_modules())[layer]
    sums: list[torch.Tensor] = []
    counts: list[int] = []

    def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        t = inputs[0].double()
        dims = [d for d in range(t.dim()) if d != 1]
        sums.append(t.sum(dims))
        counts.append(t.numel() // t.shape[1])

    handle = module.register_forward_pre_hook(hook)
    try:
        model.eval()
        for start in range(0, len(x), 256):
            model(x[start : start + 256])
    finally:
        handle.remove()
    return (torch.stack(sums).sum(0) / sum(counts)).numpy()


@dataclass
class EMAReestimate:
    model: nn.Module
    running_mean: np.ndarray  # (steps, channels) of WATCHED_LAYER after each forward
    running_var: np.ndarray
    report: bncheck.Report


def reestimate_ema(
    model: nn.Module, x: torch.Tensor, steps: int, batch_size: int = 64
) -> EMAReestimate:
    """Re-estimate the BN running statistics of a copy of ``model`` with its weights fixed.

    The statistics are reset (mean 0, var 1, counter 0) and updated by ``steps`` train-mode
    forward passes of random training batches: the EMA with the layers' momentum (0.1),
    ``running = 0.9 * running + 0.1 * batch`` (the unbiased batch variance for running_var).
    ``bncheck.Monitor`` watches without an optimizer, so each train-mode forward with grad
    enabled is one step, and ``Monitor.channels`` gives the per-channel values after each.
    """
    copy_ = copy.deepcopy(model)
    for module in copy_.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    copy_.train()  # dropout too, but it sits after every BN layer and is not trained here
    generator = torch.Generator().manual_seed(SEED + 1)
    with bncheck.Monitor(copy_, channel_history=steps) as monitor:
        for _ in range(steps):
            index = torch.randint(0, len(x), (batch_size,), generator=generator)
            copy_(x[index])  # grad enabled: a training-style forward, the output is dropped
    frame = monitor.channels(WATCHED_LAYER)
    means = frame.pivot(index="step", columns="channel", values="running_mean").sort_index()
    variances = frame.pivot(index="step", columns="channel", values="running_var").sort_index()
    return EMAReestimate(
        copy_.eval(), means.to_numpy(dtype=float), variances.to_numpy(dtype=float), monitor.report()
    )


# ---------------------------------------------------------------------------------------------
# section 6: corrupted statistics, repaired by bncheck.recalibrate
# ---------------------------------------------------------------------------------------------
#: The layer the AMP-overflow corruption hits: the BN after the third convolution.
NAN_LAYER = "features.8"


def corrupted_copies(model: nn.Module, data: Digits) -> dict[str, nn.Module]:
    """Three copies of a trained model whose BN statistics went wrong in three common ways.

    * an AMP overflow: half of the channels of one layer's ``running_var`` are NaN (an inf
      in a float16 batch statistic, blended into the EMA);
    * an EMA (or SWA) copy that averaged only the parameters: every BN layer still holds the
      initial statistics (mean 0, var 1, ``num_batches_tracked`` 0);
    * statistics of the wrong data: re-estimated on raw 0-255 pixels while the model is fed
      0-1 images (a preprocessing mismatch between calibration and deployment).
    """
    nan = copy.deepcopy(model).eval()
    bn = dict(nan.named_modules())[NAN_LAYER]
    with torch.no_grad():
        half = bn.running_var.numel() // 2  # type: ignore[union-attr]
        bn.running_var[:half] = float("nan")  # type: ignore[index]

    ema = copy.deepcopy(model).eval()
    for module in ema.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()

    wrong = copy.deepcopy(model).eval()
    bn_layers = [m for m in wrong.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in bn_layers:
        module.reset_running_stats()
        module.momentum = None  # a cumulative average over the passes below
        module.train()
    with torch.no_grad():
        for start in range(0, 256, 64):
            wrong(data.x_train_raw[start : start + 64])  # raw pixels: the wrong data
    for module in bn_layers:
        module.momentum = 0.1
    wrong.eval()
    return {
        f"NaN in half the channels of `{NAN_LAYER}` (AMP overflow)": nan,
        "EMA copy of the parameters only (statistics never trained)": ema,
        "statistics of raw 0-255 pixels, model fed 0-1 images": wrong,
    }


def found_rules(report: bncheck.Report) -> str:
    """``rule (n layers)`` for every warning or error of a report."""
    counts: dict[str, int] = {}
    for finding in report.findings:
        if finding.severity.value in ("warning", "error"):
            covered = finding.details.get("layers") if finding.layer is None else None
            counts[finding.rule] = counts.get(finding.rule, 0) + (len(covered or []) or 1)
    return ", ".join(f"`{rule}` ({n})" for rule, n in sorted(counts.items())) or "none"


# ---------------------------------------------------------------------------------------------
# the experiments
# ---------------------------------------------------------------------------------------------
def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"


def num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (a few seconds) for smoke tests; numbers mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "_out",
        help="folder for walkthrough.md and walkthrough.png (default: examples/_out)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: small models gain little from "
        "more, a busy machine loses a lot, and one thread makes the "
        "numbers repeat exactly; 0 keeps torch's default)",
    )
    args = parser.parse_args(argv)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings.quick_run() if args.quick else Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = load_digits_32(settings)
    md: list[str] = ["# Batch Normalization in a CNN, measured", ""]
    md.append(
        f"Reference VGG16-BN (`vgg16_bn_small`, width {settings.width}, 13 BN layers) on "
        f"scikit-learn's digits upsampled to 32x32: {len(data.y_train)} training and "
        f"{len(data.y_test)} test images, {settings.epochs} epochs of SGD (momentum 0.9, lr "
        f"{settings.lr} x batch size / 64, cosine-annealed to 0), seed {SEED}, "
        f"torch {torch.__version__}, bncheck {bncheck.__version__}"
        + (
            ". **Quick mode: the numbers below are a smoke test and show nothing.**"
            if settings.quick
            else "."
        )
    )
    md.append("")

    # -- runs ----------------------------------------------------------------------------
    base = train("BN before ReLU, scaled 0-1, batch 64", data, settings)
    raw = train("BN, raw 0-255 pixels, batch 64", data, settings, scaled=False)
    no_bn = train("no BN, scaled 0-1, batch 64", data, settings, batch_norm=False)
    no_bn_raw = train(
        "no BN, raw 0-255 pixels, batch 64", data, settings, scaled=False, batch_norm=False
    )
    no_bn_slow = train(
        f"no BN, scaled 0-1, batch 64, lr {settings.lr / 4:g}",
        data,
        settings,
        batch_norm=False,
        lr=settings.lr / 4,
    )
    after = train("BN after ReLU, scaled 0-1, batch 64", data, settings, bn_position="after")
    small = {
        bs: train(f"BN before ReLU, scaled 0-1, batch {bs}", data, settings, batch_size=bs)
        for bs in (2, 8)
    }
    small[64] = base
    x_test = Digits.scale(data.x_test_raw)

    # -- (1) scaled vs raw inputs ---------------------------------------------------------
    audit_base = audit_training_batch(base, data)
    audit_raw = audit_training_batch(raw, data)
    md += ["## 1. Scaled (0-1) vs raw 0-255 inputs", ""]
    rows = []
    for run, report in ((base, audit_base), (raw, audit_raw), (no_bn, None), (no_bn_raw, None)):
        rows.append(
            [
                run.name,
                num(run.train_loss[-1]),
                num(run.test_loss[-1]),
                pct(run.test_acc[-1]),
                rule_status(report, "input-not-normalized"),
            ]
        )
    md.append(
        table(
            [
                "run",
                "final train loss",
                "test loss",
                "test accuracy",
                "`input-not-normalized` (audit of a training batch)",
            ],
            rows,
        )
    )
    md.append("")
    gap_bn = raw.test_acc[-1] - base.test_acc[-1]
    gap_plain = no_bn_raw.test_acc[-1] - no_bn.test_acc[-1]
    chance = 0.2  # 10 classes: below 20% a run has not learned anything worth comparing
    text = (
        f"With BN, raw pixels instead of 0-1 inputs changed the final test accuracy by "
        f"{100 * gap_bn:+.1f} points ({pct(base.test_acc[-1])} scaled, "
        f"{pct(raw.test_acc[-1])} raw). "
    )
    if abs(gap_bn) < 0.03:
        text += (
            "BN right after the first convolution cancels a constant input scale (the "
            "conv output is divided by its own batch std), so this network barely cares. "
        )
    elif gap_bn < 0:
        text += (
            "The raw scale still costs accuracy with BN: BN cancels the scale in the "
            "forward pass, but the first layer's gradients shrink with it, so its "
            "effective learning rate differs. "
        )
    else:
        text += "Here the raw input did better; at this scale that is within run-to-run noise. "
    if max(no_bn.test_acc[-1], no_bn_raw.test_acc[-1]) < chance:
        text += (
            "Without BN the network did not learn at all at this learning rate, scaled or "
            "not (see section 2), so the comparison without BN says nothing here. "
        )
    else:
        text += (
            f"Without BN the input scale changes everything: {pct(no_bn.test_acc[-1])} "
            f"scaled vs {pct(no_bn_raw.test_acc[-1])} raw ({100 * gap_plain:+.1f} "
            f"points). Without normalisation every activation's scale follows the "
            f"input's, so whether the signal survives 13 layers at a given learning rate "
            f"depends on it"
            + (
                " (here the larger raw scale happened to be the one that trained: not an "
                "argument for raw pixels, but for the fragility BN removes). "
                if gap_plain > 0
                else ". "
            )
        )
    text += (
        "bncheck flags the raw input either way (it judges the batch, not the model): "
        "a model without BN in front, or a pretrained model that expects 0-1 or "
        "standardised input, does care."
    )
    md.append(text)
    message = first_message(audit_raw, "input-not-normalized")
    if message:
        md += ["", f"> {message}"]
    md.append("")

    # -- (2) with vs without BN -----------------------------------------------------------
    md += ["## 2. With vs without BN: convergence", ""]
    curves = (base, no_bn, no_bn_slow)
    header = ["epoch"] + [f"{r.name}: train loss / test acc" for r in curves]
    rows = [
        [str(e + 1)] + [f"{num(r.train_loss[e])} / {pct(r.test_acc[e])}" for r in curves]
        for e in range(len(base.train_loss))
    ]
    md.append(table(header, rows))
    md.append("")
    first_good = {
        r.name: next((e + 1 for e, a in enumerate(r.test_acc) if a >= 0.9), None) for r in curves
    }
    best_plain = max(max(no_bn.test_acc), max(no_bn_slow.test_acc))
    md.append(
        f"Epochs to reach 90% test accuracy: with BN {first_good[base.name] or 'not reached'}; "
        f"without BN {first_good[no_bn.name] or 'not reached'} at the same learning rate and "
        f"{first_good[no_bn_slow.name] or 'not reached'} at a quarter of it (same seed, "
        f"same initialisation: torchvision's Kaiming init for the convolutions). "
        + (
            f"Without BN the best test accuracy in {len(base.test_acc)} epochs was "
            f"{pct(best_plain)} (chance is 10%): the signal has to pass 13 unnormalised "
            f"conv layers, and plain SGD does not get this 16-layer network off the ground in "
            f"this budget, while with BN it trains in a few epochs. (The original VGG authors "
            f"trained their deepest nets by initialising them from shallower ones; BN made "
            f"that unnecessary.)"
            if best_plain < 0.5
            else "Both train; compare the first epochs for the difference in speed."
        )
        + (
            f" The raw-pixel run without BN in section 1 did train ({pct(no_bn_raw.test_acc[-1])}"
            f"): without BN, whether this network trains at all depends on the input scale and "
            f"the learning rate; with BN it trained at every setting tried here."
            if no_bn_raw.test_acc[-1] >= 0.5 and best_plain < 0.5
            else ""
        )
    )
    md.append("")

    # -- (3) batch size ------------------------------------------------------------------
    md += ["## 3. Batch size: noisy statistics", ""]
    rows = []
    noise: dict[int, float] = {}
    drift: dict[int, float] = {}
    for bs, run in small.items():
        noise[bs] = batch_mean_noise(run)
        _, eval_acc = evaluate(run.model, x_test, data.y_test)
        batch_loss, batch_acc = evaluate(
            run.model, x_test, data.y_test, batch_size=bs, bn_batch_stats=True
        )
        eval_loss, _ = evaluate(run.model, x_test, data.y_test)
        report = audit_training_batch(run, data)
        watched = run.history[run.history["layer"] == WATCHED_LAYER]
        # only the training steps: the test-set evaluations between epochs are history rows
        # too (eval mode: no train-mode call, so 0 values per channel and no drift_z)
        watched = watched[watched["train_calls"] > 0]
        drift[bs] = float(np.nanmedian(watched["drift_z"].to_numpy(dtype=float)))
        rows.append(
            [
                str(bs),
                str(len(watched)),
                str(int(watched["samples_per_channel"].min())),
                num(noise[bs]),
                num(drift[bs]),
                pct(eval_acc),
                pct(batch_acc),
                num(batch_loss - eval_loss),
                rule_status(report, "small-batch"),
            ]
        )
    md.append(
        table(
            [
                "batch size",
                "optimizer steps",
                f"values per channel in `{WATCHED_LAYER}`",
                "step-to-step jump of batch mean (x channel std)",
                "median `drift_z` (Monitor history)",
                "test acc, eval mode (running stats)",
                "test acc, BN on batch stats at this batch size",
                "test loss gap (batch stats - running stats)",
                "`small-batch`",
            ],
            rows,
        )
    )
    md.append("")
    md.append(
        f"All three train {settings.epochs} epochs with the learning rate scaled to the "
        "batch size, so the smaller batches take more, smaller, noisier steps."
    )
    md.append("")
    ratio = noise[2] / noise[64] if noise[64] > 0 else float("nan")
    drift_ratio = drift[2] / drift[64] if drift[64] > 0 else float("nan")
    text = (
        f"The batch mean of `{WATCHED_LAYER}` jumps {num(ratio, 1)}x more from step to "
        f"step at batch 2 than at batch 64 (independent images alone would predict "
        f"sqrt(64/2) = 5.7x). The Monitor's `drift_z` (per step, the mean over channels of "
        f"abs(batch mean - running_mean) / batch std) is {num(drift[2])} at batch 2, "
        f"{num(drift[8])} at batch 8 and {num(drift[64])} at batch 64 "
        f"({num(drift_ratio, 1)}x between 2 and 64)"
    )
    if drift_ratio > 1.5:
        text += ": the same story from the Monitor's own numbers. "
    else:
        text += (
            ": not the same story, because `drift_z` also measures how far the running "
            "mean lags behind weights that change every step, and with the learning rate "
            "scaled to the batch size a batch-64 step moves the weights 32x as far as a "
            "batch-2 step; the step-to-step jump of the batch mean separates the two. "
        )
    gap2 = (
        small[2].test_acc[-1]
        - evaluate(small[2].model, x_test, data.y_test, batch_size=2, bn_batch_stats=True)[1]
    )
    text += (
        f"Using a 2-image batch's statistics at test time costs {100 * gap2:.1f} accuracy "
        f"points against the running statistics of the same model: each batch of 2 is "
        f"normalised by its own noisy mean and variance. "
    )
    finals = {bs: small[bs].test_acc[-1] for bs in small}
    spread = max(finals.values()) - min(finals.values())
    listed = ", ".join(f"batch {bs} {pct(acc)}" for bs, acc in sorted(finals.items()))
    if spread < 0.02:
        text += (
            f"In eval mode the three models end within {100 * spread:.1f} points of each "
            f"other ({listed}): on digits, with the learning rate scaled, the noisier "
            f"statistics of small batches cost little final accuracy; the documented "
            f"damage (detection and segmentation models with 1-4 images per GPU) needs "
            f"harder tasks than this one. "
        )
    else:
        text += (
            f"In eval mode: {listed}; batch 2 ends "
            f"{100 * (max(finals.values()) - finals[2]):.1f} points below the best. "
        )
    text += (
        "bncheck's `small-batch` rule judges the batch you train with: below 8 samples, "
        "or fewer than 32 values per channel in a layer (here the 2x2 layers at the end, "
        "2 x 4 = 8 values)."
    )
    md.append(text)
    md.append("")

    # -- (4) BN before vs after ReLU -----------------------------------------------------
    audit_after = audit_training_batch(after, data)
    md += ["## 4. BN before vs after the ReLU", ""]
    rows = [
        [
            run.name,
            num(run.train_loss[-1]),
            pct(run.test_acc[-1]),
            rule_status(report, "bn-after-activation"),
        ]
        for run, report in ((base, audit_base), (after, audit_after))
    ]
    md.append(table(["run", "final train loss", "test accuracy", "`bn-after-activation`"], rows))
    md.append("")
    diff = after.test_acc[-1] - base.test_acc[-1]
    md.append(
        f"Test accuracy: BN before the ReLU {pct(base.test_acc[-1])}, after "
        f"{pct(after.test_acc[-1])} (after - before = {100 * diff:+.1f} points). "
        + (
            "At this scale both orders train about equally well, which is why bncheck reports "
            "the order as info, not as an error: the original paper puts BN between the linear "
            "op and the nonlinearity, but the order is debated."
            if abs(diff) < 0.03
            else "The order made a difference here; bncheck still reports it only as info, because "
            "the order is debated and depends on the architecture."
        )
    )
    message = first_message(audit_after, "bn-after-activation")
    if message:
        md += ["", f"> {message}"]
    md.append("")

    # -- (5) running statistics vs batch statistics at inference -------------------------
    md += ["## 5. Running (EMA) statistics vs batch statistics at inference", ""]
    _, acc_eval = evaluate(base.model, x_test, data.y_test)
    rows = [["`model.eval()` (running statistics)", "any", pct(acc_eval)]]
    inference: dict[int, float] = {}
    for bs in (1, 256):
        try:
            _, acc = evaluate(base.model, x_test, data.y_test, batch_size=bs, bn_batch_stats=True)
            inference[bs] = acc
            rows.append(["BN in train mode (batch statistics)", str(bs), pct(acc)])
        except ValueError as exc:  # one value per channel: PyTorch refuses to train on it
            inference[bs] = float("nan")
            rows.append(
                [
                    "BN in train mode (batch statistics)",
                    str(bs),
                    f"fails: {str(exc).splitlines()[0]}",
                ]
            )
    md.append(table(["inference", "test batch size", "test accuracy"], rows))
    md.append("")
    md.append(
        f"With `model.eval()` every test image gets the same normalisation whatever else is in "
        f"its batch: {pct(acc_eval)}. With BN left in train mode, a batch of 256 gives "
        f"{pct(inference[256])} (its statistics are close to the population's), and a batch "
        f"of 1 gives {pct(inference[1])}: each image is normalised by its own statistics. "
        "PyTorch only raises an error when a BN layer sees exactly one value per channel; the "
        "last BN layers of this VGG run at 2x2 spatial size (the final max-pool comes after "
        "them), so a batch of 1 still gives them 4 values per channel and no error, just "
        "wrong outputs. Calling `model.eval()` before inference is the fix; bncheck's "
        "`eval-batch-dependence` rule catches models whose eval mode still depends on the batch."
    )
    md.append("")
    running = layer_series(base, "running_mean")
    batch_means = layer_series(base, "batch_mean")
    recal = reestimate_ema(base.model, Digits.scale(data.x_train_raw), settings.recalibration_steps)
    _, acc_recal = evaluate(recal.model, x_test, data.y_test)
    population = population_mean(base.model, Digits.scale(data.x_train_raw), WATCHED_LAYER)
    scale = np.sqrt(np.maximum(recal.running_var[-1], 1e-12))
    error = np.abs(recal.running_mean - population) / scale  # (steps, channels)
    start_error = np.abs(population) / scale  # running_mean starts at 0
    steps = len(error)
    marks = sorted({1, 2, 5, 10, 20, 30, 50, steps} & set(range(1, steps + 1)))
    rows = [
        [str(t), num(float(np.median(error[t - 1]))), num(float(np.median(0.9**t * start_error)))]
        for t in marks
    ]
    md.append(
        f"How the EMA converges: the trained model's BN statistics reset (mean 0, var 1) and "
        f"re-estimated with the weights fixed, {steps} train-mode forward passes of 64 "
        f"training images, watched by a `bncheck.Monitor` without an optimizer (each forward "
        f"is a step). The population mean is the mean of `{WATCHED_LAYER}`'s input over all "
        f"{len(data.y_train)} training images; with momentum 0.1 the EMA's distance to it "
        f"should shrink like 0.9^t (0.35 after 10 steps, 0.01 after 44) until batch-to-batch "
        f"noise is all that is left."
    )
    md.append("")
    md.append(
        table(
            [
                "forward passes t",
                "median over channels of abs(running_mean - population mean) / std",
                "0.9^t x the same at t = 0",
            ],
            rows,
        )
    )
    md.append("")
    md.append(
        f"Measured: {num(float(np.median(error[min(9, steps - 1)])))} after 10 passes against "
        f"{num(float(np.median(0.9**10 * start_error)))} predicted, and "
        f"{num(float(np.median(error[-1])))} after {steps}, the noise floor of a running "
        f"average of 64-image batch means. Test accuracy in eval mode with the re-estimated "
        f"statistics: {pct(acc_recal)} (with the statistics from training: {pct(acc_eval)}"
        + (
            "; the cosine schedule let the weights settle at the end, so the EMA from training "
            "had caught up). "
            if abs(acc_recal - acc_eval) < 0.005
            else "). "
        )
        + "During training the EMA trails a moving target instead (the weights change every "
        "step); the plot shows `running_mean` following the noisy batch means of channel 0."
    )
    md.append("")
    recal_findings = sorted(recal.report.rules_found())
    md.append(f"Monitor findings during the re-estimation: {', '.join(recal_findings) or 'none'}.")
    md.append("")

    # -- (6) corrupted statistics, repaired ----------------------------------------------
    md += ["## 6. Repairing broken statistics: `bncheck.recalibrate`", ""]
    x_calib = Digits.scale(data.x_train_raw[: settings.calibration_images])
    calibration = [
        (x_calib[start : start + 64], data.y_train[start : start + 64])
        for start in range(0, len(x_calib), 64)
    ]

    def test_accuracy(model: nn.Module) -> float:
        return evaluate(model, x_test, data.y_test)[1]

    rows = []
    details: list[str] = []
    worst_gap = 0.0
    nan_text = wrong_text = ""
    for name, broken in corrupted_copies(base.model, data).items():
        result = bncheck.recalibrate(broken, calibration, evaluate=test_accuracy)
        if "raw 0-255" in name and len(result.changes):
            moved = result.changes[
                (result.changes["max_mean_shift"] > 0.1)
                | ((result.changes["max_var_ratio"] - 1).abs() > 0.1)
                | ((result.changes["min_var_ratio"] - 1).abs() > 0.1)
            ]
            wrong_text = (
                f"With the raw-pixel statistics, {len(moved)} of the "
                f"{len(result.changes)} recomputed layers really changed "
                f"({', '.join(f'`{n}`' for n in moved['layer'][:3])}): a constant input scale "
                "is cancelled by the first BN layer in train mode, so the later layers got "
                "the right statistics; the audit in eval mode still flags them, "
                "because each sees the wrong normalisation of the layers before. "
            )
        if NAN_LAYER in name:
            nan_text = (
                f"The NaN corruption was repaired by recomputing only `{NAN_LAYER}`: the "
                "layers after it kept the statistics training left, which fit the data. "
                if result.layers == [NAN_LAYER]
                else f"For the NaN corruption the audit also flagged "
                f"{len(result.layers) - 1} other layer(s) whose statistics did not fit the "
                f"calibration images (`stat-drift`), so {len(result.layers)} were recomputed. "
            )
        broken_acc = result.metric_before if result.metric_before is not None else math.nan
        fixed_acc = result.metric_after if result.metric_after is not None else math.nan
        worst_gap = max(worst_gap, abs(fixed_acc - acc_eval))
        rows.append(
            [
                name,
                found_rules(result.before),
                pct(broken_acc),
                f"{len(result.layers)} of {len(result.before.layers)}",
                pct(fixed_acc),
                f"{100 * (fixed_acc - acc_eval):+.1f}",
                found_rules(result.after),
            ]
        )
        details += [f"**{name}**", "", "```text", result.to_table(), "```", ""]
    md.append(
        f"The trained batch-64 model ({pct(acc_eval)} test accuracy in eval mode), with its BN "
        f"statistics corrupted three ways, then `bncheck.recalibrate(model, data, "
        f"evaluate=test_accuracy)` on the first {len(x_calib)} training images "
        f"({len(calibration)} batches of up to 64): it audits the statistics against those "
        f"images, recomputes the layers the audit flags (exact statistics over all "
        f"{len(x_calib)} images, not a moving average), audits again, and reports the test "
        f"accuracy before and after. The corrupted model is never changed: the repair is a copy."
    )
    md.append("")
    md.append(
        table(
            [
                "corruption",
                "audit before",
                "test acc, corrupted",
                "layers recomputed",
                "test acc, recalibrated",
                "vs trained model (points)",
                "audit after",
            ],
            rows,
        )
    )
    md.append("")
    md.append(
        (
            f"Every repair ends within {100 * worst_gap:.1f} points of the trained model's "
            f"{pct(acc_eval)}: {len(x_calib)} images are enough for statistics as good as the "
            f"ones training left. "
            if worst_gap <= 0.01
            else f"The repairs end up to {100 * worst_gap:.1f} points from the trained "
            f"model's {pct(acc_eval)}"
            + (
                " (quick mode: a model this undertrained says nothing). "
                if settings.quick
                else ": more calibration images would close the gap. "
            )
        )
        + nan_text
        + wrong_text
        + "The before/after tables:"
    )
    md.append("")
    md += details

    # -- findings from the Monitor --------------------------------------------------------
    md += ["## What `bncheck.Monitor` reported during training", ""]
    rows = []
    quoted: dict[str, str] = {}
    for run in (base, raw, after, small[8], small[2]):
        report = run.monitor_report
        found = sorted(report.rules_found()) if report is not None else []
        rows.append([run.name, ", ".join(f"`{r}`" for r in found) or "none"])
        for rule in found:
            quoted.setdefault(rule, f"{run.name}: {first_message(report, rule)}")
    md.append(table(["run", "Monitor findings"], rows))
    md.append("")
    md += [f"- `{rule}` ({text})" for rule, text in quoted.items()]
    if quoted:
        md.append("")
    if "tiny-running-var" in quoted:
        md.append(
            "With BN after the ReLU, a channel whose ReLU output is zero for every "
            "image has zero batch variance, so its running_var decays towards 0, "
            "below eps: `tiny-running-var` points at exactly that."
            + (
                " The `stat-drift` in the same layer most likely comes from the same "
                "near-constant channels: the ratio of two variances near eps swings "
                "wildly."
                if "stat-drift" in quoted
                else ""
            )
        )
        md.append("")
    total = time.perf_counter() - started
    md.append(f"Run time: {total:.0f} s on {torch.get_num_threads()} torch thread(s).")
    md.append("")

    # -- plot ----------------------------------------------------------------------------
    figure, axes = plt.subplots(2, 3, figsize=(16, 8))
    epochs = np.arange(1, len(base.test_acc) + 1)
    for run in (base, raw, no_bn, no_bn_raw, no_bn_slow, after):
        axes[0, 0].plot(epochs, run.test_acc, marker="o", label=run.name)
    axes[0, 0].set(
        title="1, 2, 4: test accuracy per epoch",
        xlabel="epoch",
        ylabel="test accuracy",
        ylim=(0, 1),
    )
    axes[0, 0].legend(fontsize=7)
    for bs, run in small.items():
        series = layer_series(run, "batch_mean")[:, 0]
        axes[0, 1].plot(np.linspace(0, 1, len(series)), series, lw=0.7, label=f"batch {bs}")
    axes[0, 1].set(
        title=f"3: batch mean of channel 0 of {WATCHED_LAYER}",
        xlabel="fraction of training",
        ylabel="batch mean",
    )
    axes[0, 1].legend(fontsize=7)
    axes[1, 0].plot(batch_means[:, 0], lw=0.6, color="0.6", label="batch mean")
    axes[1, 0].plot(running[:, 0], lw=1.5, label="running_mean (EMA)")
    axes[1, 0].axhline(population[0], color="k", ls="--", label="population mean (final w)")
    axes[1, 0].set(title=f"5: EMA of channel 0 of {WATCHED_LAYER}", xlabel="optimizer step")
    axes[1, 0].legend(fontsize=7)
    labels = ["eval()", "train-mode BN\nbatch 256", "train-mode BN\nbatch 1"]
    values = [acc_eval, inference[256], inference[1]]
    axes[1, 1].bar(labels, [0 if math.isnan(v) else v for v in values])
    axes[1, 1].set(title="5: test accuracy at inference", ylim=(0, 1))
    t = np.arange(1, len(error) + 1)
    axes[1, 2].semilogy(t, np.median(error, axis=1), marker=".", label="measured")
    axes[1, 2].semilogy(
        t,
        np.median(0.9 ** t[:, None] * start_error[None, :], axis=1),
        ls="--",
        label="0.9^t x start",
    )
    axes[1, 2].set(
        title=f"5: EMA re-estimation, {WATCHED_LAYER}",
        xlabel="forward passes",
        ylabel="median |running_mean - pop. mean| / std",
    )
    axes[1, 2].legend(fontsize=7)
    losses = [base, raw, after, small[8], small[2]]
    for run in losses:
        axes[0, 2].plot(epochs, run.train_loss, marker="o", label=run.name)
    axes[0, 2].set(title="training loss per epoch", xlabel="epoch", yscale="log")
    axes[0, 2].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out / "walkthrough.png", dpi=110)
    plt.close(figure)

    # The Monitor's own plot of the batch-64 and batch-2 runs: per-layer summaries per step.
    first_layers = [WATCHED_LAYER, "features.4", "features.8"]
    base.monitor.plot(args.out / "monitor_batch64.png", layers=first_layers)
    small[2].monitor.plot(args.out / "monitor_batch2.png", layers=first_layers)

    text = "\n".join(md)
    (args.out / "walkthrough.md").write_text(text, encoding="utf-8")
    print(text)
    print(
        f"wrote walkthrough.md, walkthrough.png, monitor_batch64.png and monitor_batch2.png "
        f"in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

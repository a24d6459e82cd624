#!/usr/bin/env python
"""Fine-tuning with a frozen backbone: the BN bug ``requires_grad=False`` does not prevent.

A small VGG16-BN is "pretrained" briefly on the digits 0-4 (scikit-learn's bundled digits,
upsampled to 32x32), then fine-tuned on the digits 5-9 with the backbone (``model.features``)
frozen: its parameters get ``requires_grad=False`` and its BN layers are put in eval mode once,
and only the classifier trains.

* **The buggy loop** calls ``model.train()`` at the top of every epoch, as most loops do. That
  call recurses into every submodule and puts the frozen BN layers back in train mode, so
  every forward pass keeps rewriting their ``running_mean``/``running_var``, although no
  gradient ever touches them. The "frozen" backbone's eval outputs change. ``bncheck.Monitor``
  reports ``frozen-bn-drift`` and a static ``bncheck.audit(model)`` of the model as the loop
  leaves it reports ``frozen-bn-in-train-mode``.
* **The fix** re-applies ``.eval()`` to the frozen BN layers after each ``model.train()``. The
  backbone's eval outputs stay bit-for-bit identical and the Monitor reports nothing.

    python examples/finetune_frozen_backbone.py           # about 10 s on one CPU thread
    python examples/finetune_frozen_backbone.py --quick   # a few seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import bncheck
from bncheck.models import vgg16_bn_small

SEED = 0


@dataclass(frozen=True)
class Settings:
    pretrain_epochs: int = 5
    finetune_epochs: int = 3
    width: float = 0.25
    max_steps_per_epoch: int | None = None

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(pretrain_epochs=1, finetune_epochs=1, width=0.125, max_steps_per_epoch=4)


def load_digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as 1x32x32 images scaled to 0-1, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


def frozen_bn_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    max_steps: int | None,
    batch_size: int = 32,
) -> float:
    """One epoch of shuffled mini-batches (last partial batch dropped); the mean loss."""
    order = torch.randperm(len(y), generator=generator)
    steps = len(y) // batch_size if max_steps is None else min(len(y) // batch_size, max_steps)
    total = 0.0
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / max(steps, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def backbone_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the frozen backbone computes for ``x`` at inference (eval mode).

    Every submodule's mode is restored one by one afterwards: ``model.train(True)`` would
    recurse and put the frozen BN layers back in train mode, the very bug this example is about.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    out = model.features(x).clone()  # type: ignore[operator]
    for module, training in modes.items():
        module.training = training
    return out


def pretrain(x: torch.Tensor, y: torch.Tensor, settings: Settings) -> nn.Module:
    """The "pretrained" model: trained on digits 0-4 only (5 classes)."""
    torch.manual_seed(SEED)
    model = vgg16_bn_small(num_classes=5, in_channels=1, width=settings.width)
    # PyTorch's default init for the classifier: torchvision's N(0, 0.01) learns nothing in a
    # few epochs on a thousand images (see seed_walkthrough.py).
    for module in model.classifier:
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(settings.pretrain_epochs):
        model.train()
        train_epoch(model, optimizer, x, y, generator, settings.max_steps_per_epoch)
    return model.eval()


@dataclass
class FinetuneResult:
    """What one fine-tuning loop did to the model, and what bncheck said about it."""

    monitor: bncheck.Report  # Monitor.report() over the run
    static: bncheck.Report  # bncheck.audit(model) as the loop leaves the model
    identical: bool  # backbone eval outputs bit-for-bit unchanged
    max_change: float  # largest |change| of a backbone eval output
    accuracy: float  # new task (digits 5-9), test split
    old_accuracy: float  # old task (digits 0-4) through the fine-tuned backbone


def finetune(
    pretrained: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    old_test: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
    *,
    fixed: bool,
) -> FinetuneResult:
    """Fine-tune a copy of ``pretrained`` on new classes with the backbone frozen.

    ``fixed=False`` is the common loop: freeze once, then ``model.train()`` every epoch.
    ``fixed=True`` re-applies ``.eval()`` to the frozen BN layers after each ``model.train()``.
    """
    torch.manual_seed(SEED)
    model = vgg16_bn_small(num_classes=5, in_channels=1, width=settings.width)
    model.load_state_dict(pretrained.state_dict())
    # Freeze the backbone: no gradients for its parameters, its BN layers in eval mode.
    for parameter in model.features.parameters():
        parameter.requires_grad_(False)
    frozen_bns = frozen_bn_layers(model.features)
    for bn in frozen_bns:
        bn.eval()
    # A fresh last layer for the new classes (5-9, relabelled 0-4).
    head = model.classifier[-1]
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected the VGG classifier to end in nn.Linear, got {head!r}")
    model.classifier[-1] = nn.Linear(head.in_features, 5)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9
    )
    probe = x_test[:64]
    before = backbone_output(model, probe)
    generator = torch.Generator().manual_seed(SEED)
    with bncheck.Monitor(model, optimizer=optimizer) as monitor:
        for _ in range(settings.finetune_epochs):
            model.train()  # the usual top of an epoch: also flips the frozen BNs to train mode
            if fixed:
                for bn in frozen_bns:  # the fix: the frozen BN layers go back to eval mode
                    bn.eval()
            train_epoch(model, optimizer, x, y, generator, settings.max_steps_per_epoch)
        # The static rule sees the layer modes as the loop leaves them (still in training).
        static = bncheck.audit(model, select=["frozen-bn-in-train-mode"])
    after = backbone_output(model, probe)
    # The old task through the fine-tuned backbone: the pretrained model with its backbone
    # state (BN buffers included) replaced by the fine-tuned one.
    old_model = copy.deepcopy(pretrained)
    old_model.features.load_state_dict(model.features.state_dict())  # type: ignore[union-attr]
    return FinetuneResult(
        monitor=monitor.report(),
        static=static,
        identical=bool(torch.equal(before, after)),
        max_change=float((after - before).abs().max()),
        accuracy=accuracy(model, x_test, y_test),
        old_accuracy=accuracy(old_model, *old_test),
    )


def describe(name: str, result: FinetuneResult) -> None:
    print(f"\n== {name} ==")
    print(
        f"backbone eval outputs identical before/after fine-tuning: {result.identical} "
        f"(max |change| = {result.max_change:.3g})"
    )
    print(
        f"test accuracy on the new task (digits 5-9): {100 * result.accuracy:.1f}%; "
        f"on the old task (0-4) through the fine-tuned backbone: "
        f"{100 * result.old_accuracy:.1f}%"
    )
    for label, report in (
        ("Monitor (training run)", result.monitor),
        ("bncheck.audit(model)", result.static),
    ):
        print(f"{label}: {report.headline()}")
        for rule in sorted(report.rules_found()):
            found = [f for f in report.findings if f.rule == rule]
            print(
                f"  {found[0].severity.value} {rule} in {len(found)} layer(s), first: "
                f"{found[0].message}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
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
    images, labels = load_digits_32()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    images, labels = images[order], labels[order]
    old, new = labels < 5, labels >= 5
    x_old, y_old = images[old], labels[old]
    x_new, y_new = images[new], labels[new] - 5  # digits 5-9 relabelled 0-4
    split_old, split_new = int(0.7 * len(y_old)), int(0.7 * len(y_new))
    old_test = (x_old[split_old:], y_old[split_old:])
    pretrained = pretrain(x_old[:split_old], y_old[:split_old], settings)
    pretrained_accuracy = accuracy(pretrained, *old_test)
    print(
        f"pretrained on digits 0-4 ({split_old} images): test accuracy "
        f"{100 * pretrained_accuracy:.1f}%"
    )
    data = (x_new[:split_new], y_new[:split_new], x_new[split_new:], y_new[split_new:])
    buggy = finetune(pretrained, *data, old_test, settings, fixed=False)
    fixed = finetune(pretrained, *data, old_test, settings, fixed=True)
    describe("buggy: model.train() each epoch re-enables the frozen BN layers", buggy)
    describe("fixed: frozen BN layers put back in eval mode after model.train()", fixed)
    new_delta = 100 * (buggy.accuracy - fixed.accuracy)
    old_delta = 100 * (buggy.old_accuracy - pretrained_accuracy)
    print(
        f"\nWhat the drift did: the buggy loop's frozen BN layers re-estimated their statistics "
        f"on digits 5-9. New-task accuracy {new_delta:+.1f} points vs the fixed loop; old task "
        f"through the fine-tuned backbone {old_delta:+.1f} points vs the pretrained model "
        f"(the fixed loop: exactly unchanged). Re-estimating BN statistics on new data can "
        f"help or hurt (adapting them on purpose is a known technique, AdaBN); the bug is that "
        f"it happens silently to a backbone meant to stay as pretrained, so it no longer "
        f"computes what was pretrained (outputs moved by up to {buggy.max_change:.3g})."
    )

    checks = {
        "buggy run: backbone outputs changed": not buggy.identical,
        "buggy run: Monitor reports frozen-bn-drift": "frozen-bn-drift"
        in buggy.monitor.rules_found(),
        "buggy run: audit reports frozen-bn-in-train-mode": "frozen-bn-in-train-mode"
        in buggy.static.rules_found(),
        "fixed run: backbone outputs identical": fixed.identical,
        "fixed run: old-task accuracy unchanged": fixed.old_accuracy == pretrained_accuracy,
        "fixed run: Monitor reports nothing": not fixed.monitor.findings,
    }
    print()
    for claim, holds in checks.items():
        print(f"[{'ok' if holds else 'FAILED'}] {claim}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Audit a checkpoint's Batch Normalization, from the command line and from Python.

The script makes three state dicts of the small reference VGG16-BN in a temporary folder:

* ``healthy.pt``: trained for a few steps, so its running statistics are real;
* ``nan_stats.pt``: the same, with NaN in one channel of one layer's ``running_var`` (what an
  fp16 overflow during training leaves behind): an **error**;
* ``untrained.pt``: a freshly built model saved before any training step, so every
  ``running_mean`` is still 0 and every ``running_var`` 1: a **warning**;

then audits each one twice:

1. with the command line, ``bncheck audit FILE --arch vgg16_bn_small``, run in-process through
   ``bncheck.cli.main(argv)`` (the same as typing the command in a shell), showing the table and
   the exit code: 0 when nothing is at or above ``--fail-on`` (default ``error``), 1 when
   something is, 2 when the file cannot be loaded;
2. from Python: ``bncheck.loading.load_model`` (safe loading: ``weights_only=True``) and
   ``bncheck.audit``, printing the JSON report a CI job would keep.

    python examples/audit_checkpoint.py            # a few seconds
    python examples/audit_checkpoint.py --quick    # the same (it is already small)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

import bncheck
import bncheck.cli
from bncheck.loading import load_model
from bncheck.models import INPUT_SHAPES, vgg16_bn_small

ARCH = "vgg16_bn_small"
#: The layer the NaN is written into: the third BN layer of the trunk.
BROKEN_LAYER = "features.8"
#: The reference VGG keeps a bias on every conv layer (for torchvision compatibility), which
#: the ``bias-before-bn`` rule reports as info in all 13 layers; silenced here to keep the
#: output short. This is how a project silences a rule it has decided to live with.
QUIET = ["--ignore", "bias-before-bn"]


def make_checkpoints(folder: Path, steps: int) -> dict[str, Path]:
    """Save a healthy, a NaN-poisoned and an untrained state dict of ``vgg16_bn_small``."""
    torch.manual_seed(0)
    untrained = vgg16_bn_small()  # the exact model ``--arch vgg16_bn_small`` builds
    paths = {"untrained": folder / "untrained.pt"}
    torch.save(untrained.state_dict(), paths["untrained"])

    torch.manual_seed(0)
    model = vgg16_bn_small()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, *INPUT_SHAPES[ARCH], generator=generator)  # already standardised
    labels = torch.randint(0, 10, (32,), generator=generator)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    paths["healthy"] = folder / "healthy.pt"
    torch.save(model.state_dict(), paths["healthy"])

    poisoned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    poisoned[f"{BROKEN_LAYER}.running_var"][3] = float("nan")
    paths["nan_stats"] = folder / "nan_stats.pt"
    torch.save(poisoned, paths["nan_stats"])
    return paths


def run_cli(argv: list[str]) -> int:
    """Run ``bncheck`` with ``argv`` in this process and show the command and its exit code."""
    print(f"\n$ bncheck {shlex.join(argv)}")
    sys.stdout.flush()
    code = bncheck.cli.main(argv)
    sys.stdout.flush()
    print(f"[exit code {code}]")
    return code


def audit_from_python(path: Path) -> bncheck.Report:
    """Load ``path`` safely and audit it with a made-up batch of the architecture's shape.

    The batch is synthetic (``synthetic_input=True``): bncheck then runs the forward checks
    with it but does not judge its batch size or its scale, which only the user's real
    training batches can tell.
    """
    loaded = load_model(path, arch=ARCH)
    example = loaded.example_input
    if example is None and loaded.runnable:
        shape = loaded.input_shape or INPUT_SHAPES[ARCH]
        example = torch.randn(8, *shape, generator=torch.Generator().manual_seed(0))
    return bncheck.audit(
        loaded.model, example, synthetic_input=True, source=str(path), ignore=QUIET[1]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer training steps (the script is small either way)"
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
    steps = 2 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="bncheck-example-") as tmp:
        folder = Path(tmp)
        paths = make_checkpoints(folder, steps)
        print(f"saved {', '.join(p.name for p in paths.values())} in {folder}")

        print("\n== 1. From the command line ==")
        codes = {
            name: run_cli(["audit", str(path), "--arch", ARCH, *QUIET])
            for name, path in paths.items()
        }
        # A CI job that must also fail on warnings:
        codes["untrained --fail-on warning"] = run_cli(
            ["audit", str(paths["untrained"]), "--arch", ARCH, "--fail-on", "warning", *QUIET]
        )
        # Machine-readable output for CI, written to a file:
        json_path = folder / "nan_stats.json"
        run_cli(
            [
                "audit",
                str(paths["nan_stats"]),
                "--arch",
                ARCH,
                *QUIET,
                "--format",
                "json",
                "--output",
                str(json_path),
            ]
        )
        if json_path.exists():
            saved = json.loads(json_path.read_text(encoding="utf-8"))
            print(
                f"{json_path.name}: summary {saved['summary']}, rules "
                f"{sorted({f['rule'] for f in saved['findings']})}"
            )
        # A file that is not a checkpoint: a one-line error and exit code 2, no traceback.
        junk = folder / "notes.txt"
        junk.write_text("not a checkpoint\n", encoding="utf-8")
        codes["not a checkpoint"] = run_cli(["audit", str(junk), "--arch", ARCH])

        print("\n== 2. From Python ==")
        reports = {name: audit_from_python(path) for name, path in paths.items()}
        for name, report in reports.items():
            print(f"\n{name}: ok={report.ok} summary={report.summary}")
            for finding in report.findings:
                print(f"  {finding.severity.value:<8} {finding.rule:<20} {finding.message}")
        print("\nnan_stats as JSON:")
        print(reports["nan_stats"].to_json())

    print("\n== Exit codes ==")
    for name, code in codes.items():
        print(f"{name:>28}: {code}")
    expected = {
        "healthy": 0,
        "nan_stats": 1,
        "untrained": 0,
        "untrained --fail-on warning": 1,
        "not a checkpoint": 2,
    }
    wrong = {name: code for name, code in codes.items() if code != expected[name]}
    if wrong or not reports["healthy"].ok or reports["nan_stats"].ok:
        print(f"unexpected results: {wrong or 'Python reports'}")
        return 1
    print(
        "all as expected: the healthy checkpoint passes, the NaN one fails, the untrained one warns"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

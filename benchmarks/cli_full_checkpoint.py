"""Cost of `bncheck audit FILE --arch vgg16_bn` on a full-size VGG16-BN checkpoint.

Writes a randomly initialised ``vgg16_bn()`` state dict (138M parameters, about 550 MB) to a
temporary folder, runs the command line on it in a subprocess (the way CI runs it), and
prints the wall time, the subprocess's peak resident memory (``getrusage(RUSAGE_CHILDREN)``,
``ru_maxrss``) and the ratio peak RSS / file size. The target: well under a minute, and a
ratio under 2: the checkpoint is memory-mapped and assigned to a model built on the meta
device, so its tensors are not held twice.

For comparison, measured side by side in the same run, a naive load in a second subprocess:
build ``vgg16_bn()`` on the CPU, ``torch.load(weights_only=True)`` without mmap,
``load_state_dict`` (a copy), then one eval forward on the same input shape.

    python benchmarks/cli_full_checkpoint.py [--legacy] [extra bncheck audit args...]

``--legacy`` writes the checkpoint in the pre-1.6 (non-zip) ``torch.save`` format, which
bncheck reads into memory (no mmap) after checking every storage's size against the file.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAIVE = """
import sys, torch
from bncheck.models import vgg16_bn
model = vgg16_bn()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
model.eval()
with torch.no_grad():
    model(torch.randn(4, 3, 64, 64))
"""


def write_checkpoint(folder: Path, legacy: bool = False) -> Path:
    import torch

    from bncheck.models import vgg16_bn

    torch.manual_seed(0)
    model = vgg16_bn()
    path = folder / "vgg16_bn.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
    return path


def run_measured(cmd: list[str], folder: Path) -> tuple[int, float, int, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS in bytes of that child, stderr)."""
    err_path = folder / "stderr.txt"
    with open(os.devnull, "w") as out, err_path.open("w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_maxrss * 1024, err_path.read_text()


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(
            f"usage: python {Path(__file__).name} [--legacy] [EXTRA BNCHECK AUDIT FLAGS ...]\n\n"
            "Writes a full-size VGG16-BN state dict (about 530 MiB) to a temporary folder,\n"
            "runs `bncheck audit FILE --arch vgg16_bn` on it in a subprocess, then a naive\n"
            "load + one forward, and prints wall time, peak RSS and peak RSS / file size.\n"
            "Extra flags are passed on to `bncheck audit`."
        )
        return 0
    legacy = "--legacy" in argv
    argv = [a for a in argv if a != "--legacy"]
    with tempfile.TemporaryDirectory(prefix="bncheck-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        path = write_checkpoint(folder, legacy)
        size = path.stat().st_size
        print(
            f"checkpoint: vgg16_bn state dict{' (legacy format)' if legacy else ''}, "
            f"{size / 2**20:.0f} MiB "
            f"(written in {time.perf_counter() - t0:.1f} s); {os.cpu_count()} CPUs"
        )
        cmd = [
            sys.executable,
            "-m",
            "bncheck",
            "audit",
            str(path),
            "--arch",
            "vgg16_bn",
            "--format",
            "json",
            "--progress",
            *argv,
        ]
        code, wall, _, err = run_measured(cmd, folder)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        print(err.rstrip())
        naive_code, naive_wall, naive_peak, naive_err = run_measured(
            [sys.executable, "-c", NAIVE, str(path)], folder
        )
        if naive_code != 0:
            print(naive_err)
        print()
        print(f"{'':34}{'wall s':>8}{'peak RSS MiB':>14}{'RSS / file':>12}")
        print(
            f"{'bncheck audit FILE --arch vgg16_bn':34}{wall:8.1f}{peak / 2**20:14.0f}"
            f"{peak / size:12.2f}   exit {code}"
        )
        print(
            f"{'naive load + 1 forward':34}{naive_wall:8.1f}{naive_peak / 2**20:14.0f}"
            f"{naive_peak / size:12.2f}"
        )
        print(f"peak RSS, bncheck / naive: {peak / naive_peak:.2f}")
        return 0 if code in (0, 1) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

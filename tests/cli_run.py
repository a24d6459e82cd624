"""Running the CLI in-process from tests: ``run(capsys, *argv)`` and the zero-code factory the
config, baseline and annotation tests audit (two static findings, no forward pass)."""

from __future__ import annotations

from bncheck.cli import main

#: A factory (``tests/cli_factories.py``) whose model has an ``invalid-eps`` and a
#: ``keras-momentum`` finding; ``SELECT`` limits an audit to those two rules.
ARCH = "cli_factories:static_findings"
SELECT = "invalid-eps,keras-momentum"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``bncheck *argv`` in this process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err

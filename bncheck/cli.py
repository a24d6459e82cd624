"""The ``bncheck`` command line."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("bncheck: the command line is not implemented yet")

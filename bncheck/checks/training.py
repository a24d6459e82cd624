"""Check functions of the rules that need training."""

from __future__ import annotations

"""Check functions of the rules that need forward."""

from __future__ import annotations

"""The command line's input flags: ``--input-shape`` is a shape, ``--batch-size`` the batch you
train with (in-process through ``main(argv)``)."""

from __future__ import annotations

import json

from bncheck.cli import main

ARCH = "zoo:MLPBN"  # linear -> BatchNorm1d -> ReLU -> linear, built fresh (train mode)


def audit_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["audit", *argv, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


def _single(doc: dict) -> list[dict]:
    return [f for f in doc["findings"] if f["rule"] == "single-value-per-channel"]


def test_a_fresh_model_with_a_shape_of_batch_1_gets_no_batch_size_error(capsys):
    # the freshly built model is in train mode; --input-shape 1,... is still only a shape
    code, doc = audit_json(capsys, "--arch", ARCH, "--input-shape", "1,6")
    assert _single(doc) == []
    assert any("single-value-per-channel did not judge" in n for n in doc["notes"])
    assert "small-batch" in doc["skipped"]


def test_batch_size_1_on_a_fresh_model_is_judged(capsys):
    code, doc = audit_json(capsys, "--arch", ARCH, "--input-shape", "6", "--batch-size", "1")
    assert [f["layer"] for f in _single(doc)] == ["bn"]
    assert code == 1

"""Findings and reports: order, verdicts and every rendering."""

from __future__ import annotations

import json

import pytest

from bncheck import Finding, Report, Severity, UsageError
from bncheck.checks.catalogue import CATALOGUE


def _findings() -> list[Finding]:
    return [
        Finding("bias-before-bn", "info", "features.1", "features.1 (BatchNorm2d): bias"),
        Finding(
            "ema-update",
            Severity.ERROR,
            "features.4",
            "features.4 (BatchNorm2d): ema",
            {"max_error": 4.1e-3, "channels": (3, 17)},
        ),
        Finding("keras-momentum", "warning", "features.1", "features.1 (BatchNorm2d): m | x"),
        Finding("ema-update", "error", "features.1", "features.1 (BatchNorm2d): ema"),
    ]


def test_findings_sorted_most_severe_first_then_rule_then_layer_order():
    report = Report(_findings(), layers=["features.1", "features.4"])
    assert [(f.severity.value, f.rule, f.layer) for f in report.findings] == [
        ("error", "ema-update", "features.1"),
        ("error", "ema-update", "features.4"),
        ("warning", "keras-momentum", "features.1"),
        ("info", "bias-before-bn", "features.1"),
    ]


def test_ok_summary_and_fail_on_thresholds():
    report = Report(_findings())
    assert not report.ok
    assert report.summary == {"error": 2, "warning": 1, "info": 1}
    assert report.failed("error") and report.failed("info") and not report.failed("never")
    only_info = Report([_findings()[0]])
    assert only_info.ok
    assert not only_info.failed("warning") and only_info.failed("info")


def test_severity_is_a_str_enum_ordered_by_badness():
    assert Severity.ERROR == "error"
    assert Severity.ERROR > Severity.WARNING > Severity.INFO
    assert sorted([Severity.INFO, Severity.ERROR, Severity.WARNING])[-1] is Severity.ERROR


def test_json_has_the_contract_shape_and_round_trips():
    report = Report(_findings(), source="model.pt")
    doc = json.loads(report.to_json())
    assert set(doc) >= {"bncheck_version", "source", "findings", "summary"}
    assert doc["source"] == "model.pt"
    assert doc["summary"] == {"error": 2, "warning": 1, "info": 1}
    assert set(doc["findings"][0]) == {"rule", "severity", "layer", "message", "details"}
    assert doc["findings"][1]["details"] == {"max_error": 4.1e-3, "channels": [3, 17]}
    again = Report.from_json(report.to_json())
    assert [f.to_dict() for f in again.findings] == doc["findings"]


def test_json_turns_nonfinite_and_tensor_details_into_plain_values():
    import torch

    f = Finding(
        "nonfinite-stats",
        "error",
        "bn",
        "m",
        {"value": float("nan"), "t": torch.tensor([1, 2]), "s": torch.tensor(0.5)},
    )
    doc = json.loads(Report([f]).to_json())
    assert doc["findings"][0]["details"] == {"value": "nan", "t": [1, 2], "s": 0.5}


def test_markdown_escapes_pipes_and_lists_skipped_rules():
    md = Report(_findings(), skipped={"stat-drift": "needs data"}).to_markdown()
    assert "| error" in md and "`ema-update`" in md
    assert "m \\| x" in md
    assert "`stat-drift`: needs data" in md


def test_table_shows_headline_rows_notes_and_skips():
    text = str(
        Report(
            _findings(),
            source="m.pt",
            notes=["input: synthetic"],
            skipped={"stat-drift": "needs data"},
            layers=["features.1"],
        )
    )
    assert text.splitlines()[0] == "bncheck: 2 errors, 1 warning, 1 info in m.pt (1 BN layers)"
    assert "ema-update" in text and "note: input: synthetic" in text
    assert "stat-drift: needs data" in text


def test_empty_report_renders_everywhere():
    report = Report()
    assert report.ok and len(report) == 0
    assert "0 errors" in str(report)
    assert "No findings." in report.to_markdown()
    assert list(report.to_frame().columns) == ["rule", "severity", "layer", "message"]
    assert json.loads(report.to_sarif())["runs"][0]["results"] == []


def test_frame_has_one_row_per_finding_with_details_as_columns():
    frame = Report(_findings()).to_frame()
    assert len(frame) == 4
    assert {"rule", "severity", "layer", "message", "max_error"} <= set(frame.columns)
    assert frame.iloc[0]["severity"] == "error"


def test_sarif_has_the_structure_github_code_scanning_requires():
    report = Report(_findings(), source="ckpt/model.pt")
    doc = json.loads(report.to_sarif())
    assert doc["version"] == "2.1.0"
    assert doc["$schema"].endswith("sarif-2.1.0.json")
    (run,) = doc["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "bncheck" and driver["version"]
    rule_ids = [r["id"] for r in driver["rules"]]
    assert rule_ids == [info.id for info in CATALOGUE]
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] in {"error", "warning", "note"}
    assert len(run["results"]) == 4
    for finding, result in zip(report.findings, run["results"]):
        assert result["ruleId"] == finding.rule
        assert result["level"] in {"error", "warning", "note"}
        assert result["message"]["text"]
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        (loc,) = result["locations"]
        assert loc["physicalLocation"]["artifactLocation"]["uri"] == "ckpt/model.pt"
        assert loc["physicalLocation"]["region"]["startLine"] >= 1
        assert loc["logicalLocations"][0]["fullyQualifiedName"] == finding.layer
    levels = {r["ruleId"]: r["level"] for r in run["results"]}
    assert levels["bias-before-bn"] == "note"


def test_render_dispatches_and_rejects_unknown_formats():
    report = Report(_findings())
    assert report.render("json") == report.to_json()
    with pytest.raises(UsageError, match="did you mean 'sarif'"):
        report.render("sarf")


def test_merge_keeps_identical_findings_once():
    a = Report(_findings()[:2], layers=["features.1"])
    b = Report(_findings()[1:], layers=["features.4"])
    merged = Report.merge([a, b])
    assert len(merged) == 4
    assert merged.layers == ["features.1", "features.4"]

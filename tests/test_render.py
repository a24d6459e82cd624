"""Human renderers cannot be made to lie by names from a file, and group findings by cause
(issue 10 section 3, issue 12 section 5)."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bncheck
from bncheck import Finding, Report, Severity
from bncheck.plugin import _summary_lines
from bncheck.render import cause_key, group_findings, layer_list, markdown_text, visible
from bncheck.testing import BNCheckFailure, failure_text

FAKE = "\x1b[2J\x1b[Hbncheck: 0 errors, 0 warnings, 0 info\r"
BIDI = "bn\u202eevil\u2066x\u2069"
HTML = "<img src=x onerror=alert(1)>[click](https://evil.example)**bold**|`code`"


def _hostile_report() -> Report:
    findings = [
        Finding("ema-update", "error", FAKE, f"{FAKE} (BatchNorm2d): ema is off"),
        Finding("keras-momentum", "warning", BIDI, f"{BIDI} (BatchNorm2d): momentum"),
        Finding("bias-before-bn", "info", HTML, f"{HTML} (BatchNorm2d): bias"),
    ]
    return Report(
        findings,
        source=f"model{FAKE}.pt",
        notes=[f"note with {FAKE}"],
        skipped={"stat-drift": f"needs {HTML}"},
        layers=[FAKE, BIDI, HTML],
    )


_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _unsafe_chars(text: str) -> list[str]:
    """Independent oracle: characters a terminal or browser would interpret or hide."""
    return [c for c in text if unicodedata.category(c) in _UNSAFE and c != "\n"]


def test_the_table_shows_control_characters_visibly_and_keeps_its_real_headline() -> None:
    text = str(_hostile_report())
    assert _unsafe_chars(text) == []
    assert text.splitlines()[0].startswith("bncheck: 1 error, 1 warning, 1 info in model\\x1b[2J")
    assert "\\x1b[2J\\x1b[Hbncheck: 0 errors" in text  # shown, not obeyed
    assert "bn\\u202eevil\\u2066x\\u2069" in text


def test_markdown_escapes_html_markdown_and_controls() -> None:
    md = _hostile_report().to_markdown()
    assert _unsafe_chars(md) == []
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert "[click](" not in md and "\\[click\\](" in md
    assert "**bold**" not in md and "\\*\\*bold\\*\\*" in md
    assert "\\`code\\`" in md
    # each table row still has exactly its four cells (the | in the name is escaped)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line]
    assert rows and all(line.replace("\\|", "").count("|") == 5 for line in rows)


def test_json_and_sarif_keep_the_exact_strings() -> None:
    report = _hostile_report()
    doc = json.loads(report.to_json())
    assert {f["layer"] for f in doc["findings"]} == {FAKE, BIDI, HTML}
    assert doc["source"] == f"model{FAKE}.pt"
    sarif = json.loads(report.to_sarif())
    names = {
        r["locations"][0]["logicalLocations"][0]["fullyQualifiedName"]
        for r in sarif["runs"][0]["results"]
    }
    assert names == {FAKE, BIDI, HTML}


def test_pytest_failure_text_and_summary_show_controls_visibly() -> None:
    report = _hostile_report()
    text = failure_text(report, "info")
    assert _unsafe_chars(text) == []
    assert "\\x1b[2J" in text
    record = {"audits": 1, "findings": [f.to_dict() for f in report.findings]}
    lines = _summary_lines([(f"t::x{FAKE}", record)], verbose=True)
    assert all(_unsafe_chars(line) == [] for line in lines)
    assert any("\\x1b[H" in line for line in lines)


def test_an_audited_model_with_an_ansi_layer_name_cannot_fake_the_headline() -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    model.add_module(f"bn{FAKE}", nn.BatchNorm2d(4, momentum=0.9))
    report = bncheck.audit(model, torch.randn(4, 3, 6, 6))
    text = str(report)
    assert _unsafe_chars(text) == []
    assert text.splitlines()[0].startswith("bncheck: 0 errors, ")
    with pytest.raises(BNCheckFailure) as info:
        bncheck.testing.assert_pytorch_momentum(model)
    assert _unsafe_chars(str(info.value)) == []


@given(st.text())
def test_visible_leaves_no_hidden_character_and_keeps_printable_text(text: str) -> None:
    shown = visible(text)
    assert [c for c in shown if unicodedata.category(c) in _UNSAFE] == []
    if all(unicodedata.category(c) not in _UNSAFE | {"Co", "Cn"} for c in text):
        assert shown == text


@given(st.text())
def test_markdown_text_has_no_raw_markup(text: str) -> None:
    md = markdown_text(text)
    assert "<" not in md and ">" not in md
    unescaped = md.replace("\\\\", "").replace("\\[", "").replace("\\]", "").replace("\\|", "")
    assert "[" not in unescaped and "]" not in unescaped and "|" not in unescaped


# ---- one row per rule and cause -------------------------------------------------------------
def _bias(i: int) -> Finding:
    return Finding(
        "bias-before-bn",
        Severity.INFO,
        f"features.{3 * i + 1}",
        f"features.{3 * i + 1} (BatchNorm2d): its input comes from features.{3 * i} (Conv2d) "
        "with a bias - construct that layer with bias=False",
        {"producer": f"features.{3 * i} (Conv2d)"},
    )


def test_thirteen_findings_of_one_cause_are_one_row_listing_the_layers() -> None:
    report = Report(
        [_bias(i) for i in range(13)], layers=[f"features.{3 * i + 1}" for i in range(13)]
    )
    table = str(report)
    assert table.count("bias-before-bn") == 1
    assert "features.1 (+12)" in table
    flat = " ".join(table.split())  # the table wraps the message
    assert (
        "bias=False (also in features.4, features.7, features.10, features.13 and 8 more)" in flat
    )
    md = report.to_markdown()
    assert md.count("`bias-before-bn`") == 1
    text = failure_text(report, "info")
    assert text.count("bias-before-bn ") == 1
    # machine formats keep one record per layer
    assert len(json.loads(report.to_json())["findings"]) == 13
    assert len(json.loads(report.to_sarif())["runs"][0]["results"]) == 13
    assert len(report.to_frame()) == 13


def test_different_causes_or_severities_stay_separate_rows() -> None:
    a = Finding("ema-update", "error", "bn1", "bn1 (BatchNorm2d): max error 0.5")
    b = Finding("ema-update", "error", "bn2", "bn2 (BatchNorm2d): max error 0.7")
    c = Finding("ema-update", "warning", "bn3", "bn3 (BatchNorm2d): max error 0.5")
    d = Finding("ema-update", "error", "bn4", "bn4 (BatchNorm2d): max error 0.5")
    groups = group_findings([a, b, c, d])
    assert [[f.layer for f in g.findings] for g in groups] == [["bn1", "bn4"], ["bn2"], ["bn3"]]


def test_a_cause_detail_set_by_the_rule_wins_over_the_message() -> None:
    a = Finding("stat-drift", "warning", "bn1", "bn1: mean 0.5 off", {"cause": "lag"})
    b = Finding("stat-drift", "warning", "bn2", "bn2: mean 0.9 off", {"cause": "lag"})
    c = Finding("stat-drift", "warning", "bn3", "bn3: mean 0.5 off", {"cause": "shift"})
    assert cause_key(a) == cause_key(b) != cause_key(c)
    assert len(group_findings([a, b, c])) == 2


@given(st.lists(st.text(min_size=1, max_size=5), max_size=20), st.integers(1, 6))
def test_layer_list_shows_at_most_limit_names_and_counts_the_rest(
    names: list[str], limit: int
) -> None:
    text = layer_list(names, limit)
    if len(names) <= limit + 1:
        assert text == ", ".join(names)
    else:
        assert text == f"{', '.join(names[:limit])} and {len(names) - limit} more"

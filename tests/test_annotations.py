"""GitHub workflow commands, GitLab Code Quality, several formats in one run, colour."""

from __future__ import annotations

import json
import re
import sys
import unicodedata

import pytest
from cli_run import ARCH, SELECT, run
from hypothesis import given
from hypothesis import strategies as st

from bncheck.annotate import escape_data, escape_property, to_github, to_gitlab
from bncheck.cli import colorize, use_color
from bncheck.report import Finding, Report, Severity


def unescape_data(text: str) -> str:
    """What GitHub's runner does to a command's message (the oracle)."""
    return text.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def unescape_property(text: str) -> str:
    return unescape_data(text.replace("%3A", ":").replace("%2C", ","))


_PRINTABLE_OR_NEWLINE = st.text(
    st.one_of(
        st.just("\n"),
        st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    )
)


@given(_PRINTABLE_OR_NEWLINE)
def test_escaping_round_trips_printable_text(text):
    data, prop = escape_data(text), escape_property(text)
    assert unescape_data(data) == text
    assert unescape_property(prop) == text


@given(st.text())
def test_escaping_leaves_no_command_syntax_and_no_control_character(text):
    data, prop = escape_data(text), escape_property(text)
    assert "\n" not in data and "\r" not in data
    assert not {",", ":", "\n", "\r"} & set(prop)
    # control and invisible format characters (ESC, bidi overrides, NEL, line and paragraph
    # separators) are shown as escapes; a no-break space may stay (it prints as a space)
    hidden = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
    assert not any(unicodedata.category(c) in hidden for c in data + prop)


def test_github_commands_per_severity_with_file_and_title(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "net.pt").write_bytes(b"x")
    report = Report(
        [
            Finding("invalid-eps", Severity.ERROR, "head.1", "head.1 (BatchNorm2d): eps = 0"),
            Finding("keras-momentum", Severity.WARNING, "f.1", "f.1: momentum 0.9\nsecond line"),
            Finding("small-batch", Severity.INFO, None, "100% of a, b: c"),
        ],
        source="models/net.pt",
    )
    lines = to_github(report).splitlines()
    assert lines[0] == (
        "::error file=models/net.pt,line=1,title=bncheck invalid-eps::head.1 (BatchNorm2d): eps = 0"
    )
    assert lines[1] == (
        "::warning file=models/net.pt,line=1,title=bncheck keras-momentum::"
        "f.1: momentum 0.9%0Asecond line"
    )
    assert (
        lines[2]
        == "::notice file=models/net.pt,line=1,title=bncheck small-batch::100%25 of a, b: c"
    )
    assert lines[3].startswith("::notice title=bncheck::bncheck: 1 error, 1 warning, 1 info")


def test_github_leaves_out_file_for_a_source_that_is_not_a_file_in_the_workspace(tmp_path):
    report = Report([Finding("invalid-eps", Severity.ERROR, "x", "x: eps")], source="vgg16_bn")
    assert to_github(report).splitlines()[0] == "::error title=bncheck invalid-eps::x: eps"


def test_a_hostile_layer_name_cannot_inject_a_command():
    name = "evil\n::error title=fake::0 errors,"
    report = Report([Finding("invalid-eps", Severity.WARNING, name, f"{name}: eps")])
    lines = to_github(report).splitlines()
    assert len(lines) == 2 and all(line.startswith("::") for line in lines)
    assert not any(line.startswith("::error") for line in lines)


def test_gitlab_code_quality_uses_stable_fingerprints():
    one = Report([Finding("keras-momentum", Severity.WARNING, "f.1", "f.1 (BN): momentum = 0.9")])
    two = Report([Finding("keras-momentum", Severity.WARNING, "f.1", "f.1 (BN): momentum = 0.99")])
    a, b = json.loads(to_gitlab(one)), json.loads(to_gitlab(two))
    assert a[0]["fingerprint"] == b[0]["fingerprint"]
    assert a[0]["check_name"] == "keras-momentum" and a[0]["severity"] == "major"
    assert a[0]["location"] == {"path": "model", "lines": {"begin": 1}}


def test_format_github_and_other_formats_to_files_in_one_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(
        capsys,
        "audit",
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--format",
        "github",
        "--output-format",
        "sarif=bncheck.sarif",
        "--output-format",
        "json=report.json",
        "--output-format",
        "markdown=report.md",
    )
    assert code == 1 and err == ""
    assert out.splitlines()[0].startswith("::error title=bncheck invalid-eps::head.1")
    sarif = json.loads((tmp_path / "bncheck.sarif").read_text())
    assert {r["ruleId"] for r in sarif["runs"][0]["results"]} == {"invalid-eps", "keras-momentum"}
    assert len(json.loads((tmp_path / "report.json").read_text())["findings"]) == 2
    assert (tmp_path / "report.md").read_text().startswith("## bncheck: 1 error")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sarif", "'sarif' is not FMT=FILE"),
        ("sarf=x.sarif", "unknown format 'sarf' (did you mean 'sarif'?)"),
    ],
)
def test_bad_output_format(capsys, value, message):
    code, out, err = run(capsys, "audit", "--arch", ARCH, "--output-format", value)
    assert code == 2 and message in err


def test_an_output_may_not_replace_the_audited_file(tmp_path, capsys):
    import torch
    from cli_factories import make

    ckpt = tmp_path / "m.pt"
    torch.save(make().state_dict(), ckpt)
    code, _, err = run(
        capsys,
        "audit",
        str(ckpt),
        "--arch",
        "cli_factories:make",
        "--output-format",
        f"sarif={ckpt}",
    )
    assert code == 2 and "would overwrite the file being audited" in err
    assert torch.load(ckpt, weights_only=True)  # still the checkpoint


# ---- colour --------------------------------------------------------------------------------------
class _Tty:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color("auto", _Tty(True)) is True
    assert use_color("auto", _Tty(False)) is False
    assert use_color("always", _Tty(False)) is True
    assert use_color("never", _Tty(True)) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color("auto", _Tty(True)) is False
    monkeypatch.setenv("NO_COLOR", "")  # empty means unset (no-color.org)
    assert use_color("auto", _Tty(True)) is True


def test_table_rows_and_headline_are_coloured_by_severity(capsys, monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, plain, _ = run(capsys, "audit", "--arch", ARCH, "--select", SELECT)
    assert "\033[" not in plain  # capsys is not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    code, coloured, _ = run(capsys, "audit", "--arch", ARCH, "--select", SELECT)
    assert "\033[1;31merror\033[0m" in coloured and "\033[33mwarning\033[0m" in coloured
    assert coloured.startswith("bncheck: \033[1;31m1 error\033[0m, \033[33m1 warning\033[0m")
    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == plain
    monkeypatch.setenv("NO_COLOR", "1")
    code, again, _ = run(capsys, "audit", "--arch", ARCH, "--select", SELECT)
    assert again == plain
    code, json_out, _ = run(
        capsys, "audit", "--arch", ARCH, "--format", "json", "--color", "always"
    )
    assert "\033[" not in json_out  # only the table is coloured


def test_colorize_leaves_zero_counts_alone():
    text = "bncheck: 0 errors, 2 warnings, 0 info\n\nwarning  x  y  z"
    assert colorize(text).splitlines()[0] == "bncheck: 0 errors, \033[33m2 warnings\033[0m, 0 info"

"""The guides and the README stay true to the repository.

* Every relative link in README.md and docs/*.md (docs/rules has its own test) points at a file
  that exists, and a ``#fragment`` into a Markdown file names one of its headings.
* The README's quick start has exactly the two documented commands, and its test command is the
  one ``.ci/run`` runs.
* docs/api.md's tolerance table lists every tolerance of the catalogue with its default.
* docs/cli.md names every flag of ``bncheck audit``; docs/pytest.md every ``--bncheck-*`` option
  and ``bncheck_*`` ini key.

No torch needed: everything here reads files or torch-free modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *GUIDES]

QUICK_START = [
    "pip install torch==2.13.0 && pip install . && bncheck audit --arch vgg16_bn_small",
    "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest",
]

_FENCE = re.compile(r"^(```|~~~)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def relative_links(text: str) -> list[str]:
    """Link targets in prose that are neither absolute URLs nor in-page anchors."""
    targets = []
    for line in prose_lines(text):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            targets.append(target)
    return targets


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            out.add(github_slug(match.group(1)))
    return out


def test_link_helpers_find_what_a_reader_would_click() -> None:
    text = (
        "See [the API](docs/api.md#tolerances), [site](https://example.org), [here](#top),\n"
        "![img](pic.png) and `[not](a-link.md)`.\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert relative_links(text) == ["docs/api.md#tolerances"]
    assert github_slug("SARIF and GitHub code scanning") == "sarif-and-github-code-scanning"
    assert github_slug("`Report`") == "report"
    slug = github_slug("`bncheck rules` and `bncheck explain`")
    assert slug == "bncheck-rules-and-bncheck-explain"


def test_the_pages_exist_and_link_to_each_other() -> None:
    names = {p.name for p in GUIDES}
    assert {"api.md", "pytest.md", "cli.md", "monitor.md", "benchmarks.md"} <= names
    readme_links = set(relative_links(README.read_text(encoding="utf-8")))
    for page in (
        "docs/api.md",
        "docs/pytest.md",
        "docs/cli.md",
        "docs/monitor.md",
        "docs/benchmarks.md",
        "docs/rules/README.md",
        "examples/README.md",
    ):
        assert page in readme_links, f"README.md does not link to {page}"
    index_links = set(relative_links((ROOT / "docs" / "index.md").read_text(encoding="utf-8")))
    for page in ("api.md", "pytest.md", "cli.md", "monitor.md", "benchmarks.md"):
        assert page in index_links, f"docs/index.md does not link to {page}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page.read_text(encoding="utf-8")):
        file_part, _, fragment = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def quick_start_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
    assert section is not None, "README.md has no '## Quick start' section"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    assert block is not None, "the quick start has no ```bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_quick_start_is_exactly_the_two_commands() -> None:
    assert quick_start_commands() == QUICK_START


def ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [
        line.strip()
        for line in lines
        if line.strip()
        and not line.strip().startswith("#")
        and not line.strip().startswith(("set ", "cd "))
    ]


def test_ci_runs_the_readme_test_command() -> None:
    commands = ci_commands()
    readme_test = quick_start_commands()[1]
    torch_pin, _, test_command = readme_test.partition(" && ")
    # .ci/run installs the same torch build first, then runs the rest of the README's line
    # (lint and type checks may follow it)
    assert test_command in commands
    at = commands.index(test_command)
    assert any(torch_pin.split()[-1] in c and "pip install" in c for c in commands[:at])


def test_ci_lints_and_type_checks_the_package() -> None:
    commands = " ".join(ci_commands())
    for tool in ("ruff check", "ruff format --check", "mypy bncheck"):
        assert tool in commands


def tolerance_table(text: str) -> dict[str, tuple[float, str]]:
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^\|\s*`(\w+)`\s*\|\s*([0-9.e+-]+)\s*\|\s*`([a-z-]+)`\s*\|", line)
        if match:
            rows[match.group(1)] = (float(match.group(2)), match.group(3))
    return rows


def test_api_tolerance_table_matches_the_catalogue() -> None:
    from bncheck.checks.catalogue import TOLERANCES

    documented = tolerance_table((ROOT / "docs" / "api.md").read_text(encoding="utf-8"))
    expected = {name: (float(t.default), rule) for name, (rule, t) in TOLERANCES.items()}
    assert documented == expected


def test_cli_guide_names_every_audit_flag() -> None:
    from bncheck.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(commands.choices, dict)
    audit = commands.choices["audit"]
    flags = {
        s for action in audit._actions for s in action.option_strings if s not in ("-h", "--help")
    }
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = sorted(f for f in flags if f"`{f}" not in text)
    assert len(flags) >= 11 and not missing, f"docs/cli.md does not document {missing}"


class _RecordingParser:
    """Stands in for pytest's parser: records the options and ini keys the plugin adds."""

    def __init__(self) -> None:
        self.options: list[str] = []
        self.ini: list[str] = []

    def getgroup(self, *args: object, **kwargs: object) -> _RecordingParser:
        return self

    def addoption(self, *names: str, **kwargs: object) -> None:
        self.options.extend(names)

    def addini(self, name: str, *args: object, **kwargs: object) -> None:
        self.ini.append(name)


def test_pytest_guide_names_every_option_and_ini_key() -> None:
    from bncheck import plugin

    recorder = _RecordingParser()
    plugin.pytest_addoption(recorder)  # type: ignore[arg-type]
    text = (ROOT / "docs" / "pytest.md").read_text(encoding="utf-8")
    names = recorder.options + recorder.ini
    missing = [n for n in names if f"`{n}" not in text]
    assert len(recorder.options) >= 6 and len(recorder.ini) >= 6
    assert not missing, f"docs/pytest.md does not document {missing}"

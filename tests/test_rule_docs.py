"""The rule pages (docs/rules/<id>.md): complete, consistent with the catalogue, and runnable.

Each page is the long explanation ``bncheck explain <id>`` prints, so it must exist for every
rule, carry the catalogue's severity and needs, have the sections every page has, and read
well in a terminal. Its ``## Example`` block is a complete script: running it must produce a
finding of that rule, and the message the page shows must be the one the rule really writes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bncheck.checks.catalogue import CATALOGUE, info_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RULES_DIR = DOCS / "rules"
RULE_IDS = [info.id for info in CATALOGUE]

REQUIRED_SECTIONS = ("What it finds", "Why it matters", "Example", "How to fix", "How to silence")
OPTIONAL_SECTIONS = ("Not flagged",)

#: Rules whose page shows a message written before the rule's check function existed. Once the
#: check lands, run the page's example, paste the real message into the ``text`` block under
#: ``## Example`` (wrapped under 100 characters) and remove the rule from this set.
MESSAGES_PENDING: frozenset[str] = frozenset()

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^>]*)?/?>")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_REF_USE = re.compile(r"\]\[([^\]]+)\]")
_REF_DEF = re.compile(r"^\[([^\]]+)\]: (\S+)$", re.M)


def page_path(rule_id: str) -> Path:
    return RULES_DIR / f"{rule_id}.md"


def read_page(rule_id: str) -> str:
    path = page_path(rule_id)
    if not path.is_file():
        pytest.fail(f"no page for rule {rule_id!r}: write {path.relative_to(ROOT)}")
    return path.read_text(encoding="utf-8")


def sections(text: str) -> dict[str, str]:
    """``## Title`` -> the text up to the next ``## `` heading (fenced code is skipped)."""
    out: dict[str, str] = {}
    current: str | None = None
    in_fence = False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.startswith("## "):
            current = line[3:].strip()
            out[current] = ""
        elif current is not None:
            out[current] += line
    return out


def fenced_blocks(section: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a section as ``(language, code)``, in order."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(section)]


def example_code(text: str) -> str:
    blocks = [
        code for lang, code in fenced_blocks(sections(text).get("Example", "")) if lang == "python"
    ]
    if not blocks:
        pytest.fail("the '## Example' section has no ```python block")
    return blocks[0]


def example_output(text: str) -> str:
    """The first ``text`` block after the example code: the finding the page shows."""
    blocks = fenced_blocks(sections(text).get("Example", ""))
    langs = [lang for lang, _ in blocks]
    if "python" not in langs or "text" not in langs[langs.index("python") :]:
        pytest.fail("the '## Example' section has no ```text block after the example code")
    start = langs.index("python")
    return next(code for lang, code in blocks[start:] if lang == "text")


def squash(text: str) -> str:
    return " ".join(text.split())


_NUMBER = re.compile(r"(?<![\d.])[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def wording(text: str) -> str:
    """``text`` with whitespace squashed and numbers masked: a message's words, not its values.

    The measured values in a message (a max difference, a tolerance) move with float details
    of the platform; the page must show the rule's current wording.
    """
    return _NUMBER.sub("#", squash(text))


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


# ---- (a) every rule has a complete page that agrees with the catalogue ---------------------
@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_page_has_title_severity_needs_and_sections(rule_id: str) -> None:
    text = read_page(rule_id)
    lines = text.splitlines()
    info = info_for(rule_id)
    assert lines[0] == f"# {rule_id}"
    assert lines[1] == ""
    assert lines[2] == f"**Severity:** {info.severity} · **Needs:** {info.needs}"
    found = list(sections(text))
    missing = [s for s in REQUIRED_SECTIONS if s not in found]
    assert not missing, f"{rule_id}.md lacks section(s) {missing}"
    unknown = [s for s in found if s not in REQUIRED_SECTIONS + OPTIONAL_SECTIONS]
    assert not unknown, f"{rule_id}.md has unexpected section(s) {unknown}"
    in_order = [s for s in REQUIRED_SECTIONS + OPTIONAL_SECTIONS if s in found]
    assert found == in_order, f"{rule_id}.md: sections out of order {found}"


@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_page_reads_in_a_terminal(rule_id: str) -> None:
    text = read_page(rule_id)
    assert text.endswith("\n") and not text.endswith("\n\n")
    long = [(i + 1, len(line)) for i, line in enumerate(text.splitlines()) if len(line) >= 100]
    assert not long, f"{rule_id}.md: lines of 100+ characters (line, length): {long}"
    assert "\t" not in text
    tags = [m.group(0) for line in prose_lines(text) for m in _HTML_TAG.finditer(line)]
    assert not tags, f"{rule_id}.md contains HTML: {tags}"


@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_how_to_silence_names_every_way_and_tolerance(rule_id: str) -> None:
    silence = sections(read_page(rule_id))["How to silence"]
    assert f'ignore=["{rule_id}"]' in silence
    assert f"--ignore {rule_id}" in silence
    assert f'@pytest.mark.bncheck(ignore=["{rule_id}"])' in silence
    for tol in info_for(rule_id).tolerances:
        assert f"`{tol.name}` (default {tol.default!r})" in silence, (
            f"{rule_id}.md: 'How to silence' must name tolerance {tol.name} with its default "
            f"{tol.default!r}"
        )


@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_why_it_matters_cites_at_most_four_links(rule_id: str) -> None:
    why = sections(read_page(rule_id))["Why it matters"]
    links = [url for url in _LINK.findall(why) if url.startswith("http")]
    links += [url for _, url in _REF_DEF.findall(why)]
    assert 1 <= len(links) <= 4 or rule_id in UNCITED, (
        f"{rule_id}.md cites {len(links)} links; cite the strongest 2-4"
    )


#: Rules for which the research notes list no issue thread to cite.
UNCITED = frozenset({"input-not-normalized"})


@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_reference_links_are_defined_and_used(rule_id: str) -> None:
    text = read_page(rule_id)
    prose = "\n".join(prose_lines(text))
    used = set(_REF_USE.findall(prose))
    defined = dict(_REF_DEF.findall(prose))
    assert used <= set(defined), f"{rule_id}.md: undefined link references {used - set(defined)}"
    assert set(defined) <= used, f"{rule_id}.md: unused link definitions {set(defined) - used}"
    assert all(url.startswith("https://") for url in defined.values())


def test_every_page_in_docs_rules_is_a_rule() -> None:
    pages = {p.stem for p in RULES_DIR.glob("*.md") if p.name != "README.md"}
    assert pages == set(RULE_IDS), (
        f"pages without a rule: {sorted(pages - set(RULE_IDS))}; "
        f"rules without a page: {sorted(set(RULE_IDS) - pages)}"
    )


# ---- (b) bncheck.explain prints exactly the page ------------------------------------------
@pytest.mark.parametrize("rule_id", RULE_IDS)
def test_explain_returns_the_page(rule_id: str) -> None:
    import bncheck
    from bncheck.checks.registry import get_rule

    page = read_page(rule_id)
    assert bncheck.explain(rule_id) == page
    assert get_rule(rule_id).explanation == page


# ---- (c) the examples run and find their rule ----------------------------------------------
def _not_ready(rule_id: str) -> str | None:
    """Why the example of ``rule_id`` cannot run yet, or ``None`` when it can."""
    from bncheck.checks.registry import get_rule

    if get_rule(rule_id).check is None:
        return f"the check function of {rule_id!r} is not registered yet"
    if info_for(rule_id).needs in ("training run", "distributed"):
        try:
            from bncheck.monitor import Monitor
        except ImportError as exc:
            return f"bncheck.Monitor is not available yet ({exc})"
        if not all(hasattr(Monitor, name) for name in ("__enter__", "__exit__", "report")):
            return "bncheck.Monitor is not a working context manager with report() yet"
    return None


def _run_in_process(rule_id: str, code: str) -> tuple[object, str]:
    """Run an example in a fresh namespace; return its ``report`` and what it printed."""
    import torch

    namespace: dict[str, object] = {"__name__": f"bncheck_doc_example_{rule_id}"}
    out = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        exec(compile(code, str(page_path(rule_id)), "exec"), namespace)
    return namespace.get("report"), out.getvalue()


IN_PROCESS = [r for r in RULE_IDS if info_for(r).needs != "distributed"]
DISTRIBUTED = [r for r in RULE_IDS if info_for(r).needs == "distributed"]


@pytest.mark.parametrize("rule_id", IN_PROCESS)
def test_example_produces_a_finding_of_its_rule(rule_id: str) -> None:
    import bncheck

    reason = _not_ready(rule_id)
    if reason:
        pytest.skip(reason)
    report, printed = _run_in_process(rule_id, example_code(read_page(rule_id)))
    assert isinstance(report, bncheck.Report), "the example must end with `report = ...`"
    found = report.filter(rules=[rule_id])
    assert found, (
        f"the example of {rule_id} found no {rule_id} finding; it found "
        f"{sorted(report.rules_found())}, skipped {report.skipped.get(rule_id)!r}"
    )
    assert all(f.severity.value == info_for(rule_id).severity for f in found)
    assert rule_id in printed, "the example prints its report"
    if rule_id in MESSAGES_PENDING:
        return
    shown = wording(example_output(read_page(rule_id)))
    for finding in found:
        assert wording(finding.message) in shown, (
            f"{rule_id}.md shows a different message; the rule now writes:\n{finding.message}"
        )


def test_pending_messages_are_only_for_rules_without_a_check() -> None:
    """A rule leaves MESSAGES_PENDING once its check lands: its page must show the real text."""
    from bncheck.checks.registry import get_rule

    landed = sorted(r for r in MESSAGES_PENDING if get_rule(r).check is not None)
    assert not landed, (
        f"checks landed for {landed}: paste the messages their examples produce into their "
        "pages and remove them from MESSAGES_PENDING"
    )


@pytest.mark.slow
@pytest.mark.parametrize("rule_id", DISTRIBUTED)
def test_distributed_example_produces_a_finding_of_its_rule(rule_id: str, tmp_path: Path) -> None:
    import torch.distributed as dist

    reason = _not_ready(rule_id)
    if reason:
        pytest.skip(reason)
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    script = tmp_path / "example.py"
    script.write_text(example_code(read_page(rule_id)), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    messages = table_messages(done.stdout, rule_id)
    assert messages, f"no {rule_id} row in the printed report:\n{done.stdout[-3000:]}"
    if rule_id not in MESSAGES_PENDING:
        shown = wording(example_output(read_page(rule_id)))
        assert any(wording(m) in shown for m in messages), (
            f"{rule_id}.md shows a different message; the rule now writes:\n{messages[0]}"
        )


def table_messages(table: str, rule_id: str) -> list[str]:
    """The messages of ``rule_id``'s rows in a printed report table (wrapped cells joined)."""
    lines = table.splitlines()
    header = [i for i, line in enumerate(lines) if re.match(r"^-+( +-+){3}$", line)]
    if not header:
        return []
    dashes = lines[header[0]]
    starts = [m.start() for m in re.finditer(r"-+", dashes)]
    message_col = starts[3]
    out: list[str] = []
    current: list[str] | None = None
    for line in lines[header[0] + 1 :]:
        if not line.strip():
            break
        cells = line[:message_col].split()
        if cells:  # a new row: severity, rule, layer
            current = [line[message_col:].strip()] if cells[1:2] == [rule_id] else None
            if current is not None:
                out.append("")
        elif current is not None:
            current.append(line[message_col:].strip())
        if current is not None:
            out[-1] = " ".join(current)
    return out


# ---- the rule index and the guides -------------------------------------------------------
_INDEX_ROW = re.compile(
    r"^\| \[`([a-z0-9-]+)`\]\(([a-z0-9-]+)\.md\) \| (\w+) \| ([a-z ]+) \| (.+) \|$"
)


def test_rule_index_lists_every_rule_as_the_catalogue_does() -> None:
    rows = [
        _INDEX_ROW.match(line)
        for line in (RULES_DIR / "README.md").read_text(encoding="utf-8").splitlines()
    ]
    table = {m.group(1): m for m in rows if m}
    assert list(table) == RULE_IDS, "the index lists the rules in catalogue order, once each"
    for rule_id, m in table.items():
        info = info_for(rule_id)
        assert m.group(2) == rule_id
        assert (m.group(3), m.group(4), m.group(5)) == (info.severity, info.needs, info.summary)


def _markdown_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in _LINK.findall(path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files {broken}"


def test_getting_started_first_audit_shows_what_the_guide_says() -> None:
    import torch

    import bncheck

    guide = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    section = sections(guide)["Your first audit"]
    code = next(c for lang, c in fenced_blocks(section) if lang == "python")
    shown = next(c for lang, c in fenced_blocks(section) if lang == "text")
    namespace: dict[str, object] = {"__name__": "bncheck_getting_started"}
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "getting-started.md", "exec"), namespace)
    report = namespace["report"]
    assert isinstance(report, bncheck.Report)
    assert shown.splitlines()[0] == report.headline()
    assert report.rules_found() == {"bias-before-bn"}
    first = report.findings[0]
    assert wording(first.message) in wording(shown)


def test_guides_exist_and_are_linked_from_the_index() -> None:
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert f"{len(RULE_IDS)} rules" in index, "docs/index.md states how many rules there are"
    for target in ("getting-started.md", "rules/README.md"):
        assert (DOCS / target).is_file()
        assert f"]({target})" in index

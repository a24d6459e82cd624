"""[tool.bncheck] configuration, the shared options module, and per-layer ignores, through
``bncheck.cli.main`` in-process (the file is found from the current directory)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from cli_run import ARCH, SELECT, run

from bncheck import config, options
from bncheck.errors import UsageError
from bncheck.report import Finding, Report, Severity


def audit_json(capsys, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, "audit", *argv, "--format", "json")
    return code, (json.loads(out) if out else {}), err


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty project folder that is the current directory, with a sub folder."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text("[project]\nname = 'demo'\n\n[tool.bncheck]\n" + textwrap.dedent(body))
    return path


# ---- finding the file --------------------------------------------------------------------------
def test_config_is_found_by_walking_up_from_the_current_directory(project, monkeypatch, capsys):
    write_pyproject(project, f'select = "{SELECT}"\nfail-on = "warning"\n')
    monkeypatch.chdir(project / "sub" / "deeper")
    assert config.find() == project / "pyproject.toml"
    code, doc, _ = audit_json(capsys, "--arch", ARCH)
    assert code == 1  # fail-on = warning from the file; keras-momentum is a warning
    assert {f["rule"] for f in doc["findings"]} == {"invalid-eps", "keras-momentum"}
    assert set(doc["skipped"]) == set()  # select from the file: only the two rules ran


def test_pyproject_without_a_bncheck_table_is_passed_over(project, monkeypatch):
    write_pyproject(project, 'fail-on = "info"\n')
    (project / "sub" / "pyproject.toml").write_text("[tool.ruff]\nline-length = 99\n")
    monkeypatch.chdir(project / "sub")
    assert config.find() == project / "pyproject.toml"
    (project / "sub" / "bncheck.toml").write_text('fail-on = "never"\n')
    assert config.find() == project / "sub" / "bncheck.toml"
    assert config.load(config.find()).fail_on == "never"


def test_flags_win_over_the_file_and_no_config_ignores_it(project, capsys):
    write_pyproject(project, 'fail-on = "never"\nignore = ["invalid-eps"]\n')
    code, doc, _ = audit_json(capsys, "--arch", ARCH, "--select", SELECT)
    assert code == 0 and {f["rule"] for f in doc["findings"]} == {"keras-momentum"}
    code, doc, _ = audit_json(capsys, "--arch", ARCH, "--select", SELECT, "--fail-on", "error")
    assert code == 0  # the file's ignore still drops invalid-eps
    code, doc, _ = audit_json(capsys, "--arch", ARCH, "--select", SELECT, "--no-config")
    assert code == 1 and "invalid-eps" in {f["rule"] for f in doc["findings"]}


def test_explicit_config_file_and_tolerances_from_it(project, tmp_path, capsys):
    other = tmp_path / "elsewhere.toml"
    other.write_text("[tolerances]\nmomentum_max = 0.95\n")
    code, doc, _ = audit_json(capsys, "--arch", ARCH, "--select", SELECT, "--config", str(other))
    assert {f["rule"] for f in doc["findings"]} == {"invalid-eps"}  # 0.9 <= 0.95 now
    code, doc, _ = audit_json(
        capsys,
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--config",
        str(other),
        "--tolerance",
        "momentum_max=0.5",
    )
    assert "keras-momentum" in {f["rule"] for f in doc["findings"]}  # the flag wins


def test_input_shape_arch_and_arch_args_from_the_file(project, capsys):
    write_pyproject(
        project,
        f"""
        arch = "{ARCH}"
        arch-args = {{ momentum = 0.1 }}
        input-shape = [2, 3, 16, 16]
        select = "{SELECT}"
        """,
    )
    code, doc, _ = audit_json(capsys)
    assert doc["source"] == ARCH
    assert {f["rule"] for f in doc["findings"]} == {"invalid-eps"}  # momentum 0.1 from args
    code, doc, _ = audit_json(capsys, "--arch-arg", "eps=1e-5")  # flags merge over the table
    assert doc["findings"] == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('selct = "all"', "unknown key 'selct' (did you mean 'select'?)"),
        ('fail-on = "warn"', "fail-on: 'warn' is not one of error, warning, info, never"),
        ('select = ["bias-befor-bn"]', "select: unknown rule id 'bias-befor-bn'"),
        ("tolerances = { ema_rtl = 2 }", "tolerances: unknown tolerance 'ema_rtl'"),
        ('tolerances = { ema_rtol = "x" }', "tolerance 'ema_rtol' must be a number"),
        ("input-shape = [3]", "input-shape: 3 has no batch dimension"),
        ("input-shape = [8, 0, 4]", "input-shape: bad shape"),
        ('per-layer-ignores = { "a.*" = ["nope"] }', "per-layer-ignores: 'a.*': unknown rule"),
        ("per-layer-ignores = 3", "per-layer-ignores: expected a table"),
        ("baseline = 3", "baseline: expected a file name"),
        ("select = [", "not valid TOML"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_file_and_key(project, capsys, body, expected):
    path = write_pyproject(project, body + "\n")
    code, out, err = run(capsys, "audit", "--arch", ARCH)
    assert code == 2 and out == ""
    assert err.startswith(f"bncheck: error: {path}")
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_explicit_config_is_a_usage_error(project, capsys):
    code, _, err = run(capsys, "audit", "--arch", ARCH, "--config", "nope.toml")
    assert code == 2 and "nope.toml: no such config file" in err


# ---- bncheck.audit(config=...) pieces (the engine calls these) ---------------------------------
def test_audit_kwargs_from_a_mapping_and_explicit_arguments_win():
    kwargs = config.audit_kwargs(
        {"select": "invalid-eps,keras-momentum", "tolerances": {"momentum-max": 0.7}},
        ignore=None,
        momentum_max=0.8,
    )
    assert kwargs == {"select": ["invalid-eps", "keras-momentum"], "momentum_max": 0.8}
    with pytest.raises(UsageError, match="config: unknown key 'fail_onn'"):
        config.audit_kwargs({"fail_onn": "error"})


def test_audit_with_a_config_mapping_applies_select_tolerances_and_per_layer_ignores():
    from cli_factories import static_findings

    import bncheck

    cfg = {
        "select": ["invalid-eps", "keras-momentum"],
        "per-layer-ignores": {"head.*": ["invalid-eps"]},
    }
    report = config.finish_report(bncheck.audit(static_findings(), **config.audit_kwargs(cfg)), cfg)
    assert [(f.rule, f.layer) for f in report.findings] == [("keras-momentum", "features.1")]
    assert report.settings["suppressed"] == 1
    assert "1 suppressed by per-layer ignores" in "\n".join(report.notes)


# ---- per-layer ignores -------------------------------------------------------------------------
def finding(rule: str, layer: str | None, **details) -> Finding:
    return Finding(rule, Severity.WARNING, layer, f"{layer}: something about {rule}", details)


def test_per_layer_ignores_match_globs_on_qualified_names_and_rules():
    report = Report(
        [
            finding("bias-before-bn", "features.0.bn"),
            finding("bias-before-bn", "classifier.1"),
            finding("small-batch", "features.3"),
            finding("untrained-stats", None, layers=["features.1", "features.2"]),
            finding("untrained-stats", None, layers=["features.1", "head.2"]),
        ],
        layers=["features.0.bn", "features.1", "features.2", "features.3", "classifier.1"],
    )
    new, suppressed, stale = config.apply_per_layer_ignores(
        report,
        {"features.*": ("bias-before-bn", "untrained-stats"), "stem.*": ("all",)},
        show=True,
    )
    assert [(s.finding.rule, s.finding.layer, s.pattern) for s in suppressed] == [
        ("bias-before-bn", "features.0.bn", "features.*"),
        ("untrained-stats", None, "features.*"),  # every layer it names matched
    ]
    assert [(f.rule, f.layer) for f in new.findings] == [
        ("bias-before-bn", "classifier.1"),
        ("small-batch", "features.3"),  # another rule: kept
        ("untrained-stats", None),  # head.2 is not under features
    ]
    assert stale == ["stem.*"]
    text = "\n".join(new.notes)
    assert "2 suppressed by per-layer ignores" in text
    assert "suppressed: warning bias-before-bn at features.0.bn (matched 'features.*')" in text
    assert "per-layer ignore 'stem.*': all matched no finding" in text


def test_cli_per_layer_ignores_count_show_and_warn_when_stale(project, capsys):
    code, doc, err = audit_json(
        capsys,
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--per-layer-ignores",
        "head.*:invalid-eps",
        "--per-layer-ignores",
        "stem.*:keras-momentum",
    )
    assert code == 0  # the only error was suppressed
    assert [f["rule"] for f in doc["findings"]] == ["keras-momentum"]
    assert any("1 suppressed by per-layer ignores (--show-suppressed" in n for n in doc["notes"])
    assert err == (
        "bncheck: warning: per-layer ignore 'stem.*' (keras-momentum) matched no finding; "
        "remove it if the layer was fixed or renamed\n"
    )
    code, out, _ = run(
        capsys,
        "audit",
        "--arch",
        ARCH,
        "--select",
        SELECT,
        "--per-layer-ignores",
        "head.*:invalid-eps",
        "--show-suppressed",
    )
    assert "suppressed: error invalid-eps at head.1 (matched 'head.*')" in out


def test_config_table_and_flag_ignores_merge(project, capsys):
    write_pyproject(project, 'per-layer-ignores = { "head.*" = ["invalid-eps"] }\n')
    code, doc, _ = audit_json(
        capsys, "--arch", ARCH, "--select", SELECT, "--per-layer-ignores", "features.*:all"
    )
    assert code == 0 and doc["findings"] == []


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("features.*", "'features.*' is not GLOB:RULE[,RULE]"),
        ("features.*:", "'features.*:' is not GLOB:RULE[,RULE]"),
        ("features.*:bias-befor-bn", "did you mean 'bias-before-bn'"),
    ],
)
def test_bad_per_layer_ignores_flag(capsys, flag, message):
    code, out, err = run(capsys, "audit", "--arch", ARCH, "--per-layer-ignores", flag)
    assert code == 2 and out == "" and message in err and len(err.splitlines()) == 1


# ---- the shared options: one rule in both front ends -------------------------------------------
@pytest.mark.parametrize(
    ("text", "batch", "shape"),
    [
        ("8,3,32,32", None, (8, 3, 32, 32)),
        ("8x3x32x32", None, (8, 3, 32, 32)),
        (" 8, 3 ", None, (8, 3)),
        ([2, 3, 4], None, (2, 3, 4)),
        ("3,32,32", 8, (8, 3, 32, 32)),
    ],
)
def test_input_shape_rule(text, batch, shape):
    assert options.input_shape(text, batch) == shape


@pytest.mark.parametrize("text", ["32", "8,0,3", "8,-1", "8,3.5", "", "a,b", [8, True], [8.0, 3]])
def test_input_shape_rule_rejects(text):
    with pytest.raises(UsageError):
        options.input_shape(text)


def test_cli_and_plugin_share_the_validators():
    import bncheck.cli as cli
    import bncheck.plugin as plugin

    # the duplicate splitters and parsers are gone from both front ends
    for name in (
        "_rule_ids",
        "_ignored_ids",
        "_fail_on",
        "_tolerance_pair",
        "_input_shape",
        "_model_spec",
        "_as_list",
    ):
        assert not hasattr(plugin, name), name
    assert not hasattr(cli, "_split_ids")
    assert options.OPTIONS["fail-on"].cli == "--fail-on"
    assert options.OPTIONS["fail-on"].pytest == "--bncheck-fail-on"
    assert {o.key for o in options.OPTIONS.values()} == {
        "select",
        "ignore",
        "fail-on",
        "tolerances",
        "per-layer-ignores",
        "input-shape",
        "arch",
        "arch-args",
        "baseline",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_classes=10", ("num_classes", 10)),
        ("drop_rate=0.2", ("drop_rate", 0.2)),
        ("zero_init_residual=True", ("zero_init_residual", True)),
        ("norm=None", ("norm", None)),
        ("act=relu", ("act", "relu")),
        ("name='x=y'", ("name", "x=y")),
        ("sizes=(1, 2)", ("sizes", (1, 2))),
        ("mode=__import__('os')", ("mode", "__import__('os')")),  # never evaluated
    ],
)
def test_arch_arg_values_are_literals_or_strings(text, expected):
    assert options.arch_arg(text) == expected


def test_command_line_round_trips_through_the_parsers():
    line = options.command_line(
        prefix="--",
        fail_on="warning",
        select=("invalid-eps", "keras-momentum"),
        ignore=(),
        tolerances={"momentum_max": 0.7},
        per_layer_ignores={"features.*": ("bias-before-bn",)},
    )
    assert line == (
        "--fail-on=warning --select=invalid-eps,keras-momentum --tolerance=momentum_max=0.7 "
        "'--per-layer-ignores=features.*:bias-before-bn'"
    )


def _engine_takes_config() -> bool:
    import inspect

    from bncheck.engine import audit

    return "config" in inspect.signature(audit).parameters


@pytest.mark.skipif(not _engine_takes_config(), reason="engine.audit(config=) not wired yet")
def test_bncheck_audit_takes_a_config_and_reads_no_file(project):
    from cli_factories import static_findings

    import bncheck

    write_pyproject(project, 'select = "dead-channels"\n')  # must not be read
    cfg = {
        "select": "invalid-eps,keras-momentum",
        "per-layer-ignores": {"head.*": ["invalid-eps"]},
        "tolerances": {"momentum_max": 0.95},
    }
    report = bncheck.audit(static_findings(), config=cfg)
    assert report.findings == [] and report.settings["suppressed"] == 1
    report = bncheck.audit(static_findings(), config=config.from_mapping(cfg), momentum_max=0.5)
    assert [f.rule for f in report.findings] == ["keras-momentum"]  # the argument wins
    with pytest.raises(UsageError, match="unknown key 'selct'"):
        bncheck.audit(static_findings(), config={"selct": "x"})


@pytest.mark.slow
def test_console_script_reads_the_config_and_reports_a_bad_one(project):
    import os
    import subprocess
    import sys

    tests = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), tests])}
    write_pyproject(project, f'arch = "{ARCH}"\nselect = "{SELECT}"\nfail-on = "never"\n')
    ok = subprocess.run(
        [sys.executable, "-m", "bncheck", "audit", "--format", "github"],
        capture_output=True,
        text=True,
        env=env,
        cwd=project / "sub",
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr  # fail-on = never, found from a sub folder
    assert "::error title=bncheck invalid-eps::head.1" in ok.stdout
    write_pyproject(project, 'fail-on = "sometimes"\n')
    bad = subprocess.run(
        [sys.executable, "-m", "bncheck", "audit", "--arch", ARCH],
        capture_output=True,
        text=True,
        env=env,
        cwd=project,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("bncheck: error: ") and "fail-on: 'sometimes'" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1 and "Traceback" not in bad.stderr

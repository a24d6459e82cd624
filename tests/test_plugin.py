"""The pytest plugin, through pytester: everything a user of the plugin sees.

Inner test sessions run in-process (fast); only the import-cost test uses a subprocess.
Models in the inner tests use static rules (invalid-eps, keras-momentum), which need no
forward pass, so these tests do not depend on the forward rules.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest

from bncheck.plugin import _summary_lines, pytest_terminal_summary
from bncheck.report import Finding, Report, Severity

MODELS = """
from torch import nn

def good():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

def zero_eps():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=0.0))

def keras():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, momentum=0.9))

not_callable = 3
"""


@pytest.fixture
def models(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester dir with ``zoo_models.py`` (good, zero_eps, keras factories)."""
    pytester.makepyfile(zoo_models=MODELS)
    pytester.syspathinsert()
    return pytester


@pytest.mark.slow
def test_importing_the_plugin_does_not_import_torch() -> None:
    code = (
        "import sys, bncheck.plugin, bncheck.testing; "
        "heavy = [m for m in ('torch', 'numpy', 'pandas', 'hypothesis') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_registered_as_pytest11_entry_point_named_bncheck() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("bncheck") == "bncheck.plugin"


def test_help_lists_the_option_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*bncheck: Batch Normalization checks*",
            "*--bncheck-fail-on=SEVERITY*",
            "*--bncheck-tolerance=NAME=VALUE*",
            "*--bncheck-model=MODULE:CALLABLE*",
            "*bncheck_fail_on*",
        ]
    )


def test_p_no_bncheck_disables_the_plugin(models: pytest.Pytester) -> None:
    models.makepyfile("def test_uses(bncheck):\n    pass\n")
    result = models.runpytest("-p", "no:bncheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'bncheck' not found*"])
    result.stdout.no_fnmatch_line("bncheck 0.*")


def test_fixture_passes_a_good_model_and_returns_the_report(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import zoo_models
        from bncheck import Report

        def test_good(bncheck):
            report = bncheck.assert_ok(zoo_models.good())
            assert isinstance(report, Report) and report.ok
            assert report.layers == ["1"]

        def test_audit_returns_findings(bncheck):
            report = bncheck.audit(zoo_models.zero_eps())
            assert report.rules_found() == {"invalid-eps"}
            assert bncheck.reports == [report]
    """)
    models.runpytest().assert_outcomes(passed=2)


def test_failure_shows_the_findings_table_without_bncheck_frames(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import zoo_models

        def test_zero_eps(bncheck):
            bncheck.assert_ok(zoo_models.zero_eps())
    """)
    result = models.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*BNCheckFailure: bncheck: 1 finding at or above fail_on='error'*",
            "*severity*rule*layer*message*",
            "*error*invalid-eps*1*1 (BatchNorm2d): eps = 0*expected a finite value > 0*",
            "*ignore=[[]'invalid-eps'[]]*",
        ]
    )
    # __tracebackhide__: the traceback ends in the user's test, not in bncheck's code
    result.stdout.no_fnmatch_line("*def assert_ok*")
    result.stdout.no_fnmatch_line("*bncheck/plugin.py*")


def test_marker_fail_on_ignore_and_tolerance(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import pytest
        import zoo_models

        def test_default_passes_a_warning(bncheck):
            bncheck.assert_ok(zoo_models.keras())

        @pytest.mark.bncheck(fail_on="warning")
        def test_strict_fails(bncheck):
            bncheck.assert_ok(zoo_models.keras())

        @pytest.mark.bncheck(fail_on="warning", ignore=["keras-momentum"])
        def test_ignored(bncheck):
            bncheck.assert_ok(zoo_models.keras())

        @pytest.mark.bncheck(fail_on="warning", momentum_max=0.95)
        def test_loosened(bncheck):
            bncheck.assert_ok(zoo_models.keras())

        @pytest.mark.bncheck(select="invalid-eps")
        def test_selected(bncheck):
            assert bncheck.audit(zoo_models.keras()).settings["select"] == ["invalid-eps"]
    """)
    result = models.runpytest()
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_strict_fails*"])


def test_closest_marker_wins_over_module_marker(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import pytest
        import zoo_models

        pytestmark = pytest.mark.bncheck(fail_on="warning", momentum_max=0.2)

        @pytest.mark.bncheck(fail_on="error")
        def test_function_marker_wins(bncheck):
            assert bncheck.settings.fail_on == "error"
            assert bncheck.settings.tolerances == {"momentum_max": 0.2}
            bncheck.assert_ok(zoo_models.keras())
    """)
    models.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('fail_onn="warning"', "*unknown argument 'fail_onn' (did you mean 'fail_on'?)*"),
        (
            'ignore="keras-momentun"',
            "*unknown rule id 'keras-momentun' (did you mean 'keras-momentum'?)*",
        ),
        ("ema_rtl=2", "*unknown argument 'ema_rtl' (did you mean 'ema_rtol'?)*"),
        ('fail_on="warn"', "*'warn' is not one of error, warning, info, never*"),
        ("ema_rtol=-1", "*tolerance 'ema_rtol' must be a number >= 0*"),
        ("select=5", "*expected rule ids (a comma-separated string or a list of them), got int*"),
        ("select=[]", "*names no rule*"),
        ('ignore="all"', "*ignore='all' would check nothing*"),
        ('"warning"', "*keyword arguments only*"),
    ],
)
def test_bad_marker_is_a_usage_error_naming_the_test(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.bncheck({marker})
        def test_marked(bncheck):
            pass
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*test_bad_marker_is_a_usage_error_naming_the_test.py::test_marked: "
            "@pytest.mark.bncheck: *"
            if "keyword" not in message
            else "*test_marked*",
        ]
    )
    result.stderr.fnmatch_lines([message])


def test_marker_is_registered_for_strict_markers(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import pytest

        @pytest.mark.bncheck(fail_on="info")
        def test_marked(bncheck):
            assert bncheck.settings.fail_on == "info"
    """)
    models.runpytest("--strict-markers").assert_outcomes(passed=1)


def test_options_fail_on_ignore_select_and_tolerance(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import zoo_models

        def test_keras(bncheck):
            bncheck.assert_ok(zoo_models.keras())
    """)
    models.runpytest("--bncheck-fail-on=warning").assert_outcomes(failed=1)
    models.runpytest(
        "--bncheck-fail-on=warning", "--bncheck-ignore=keras-momentum"
    ).assert_outcomes(passed=1)
    models.runpytest(
        "--bncheck-fail-on=warning",
        "--bncheck-select=invalid-eps",
        "--bncheck-select=nonfinite-stats",
    ).assert_outcomes(passed=1)
    models.runpytest(
        "--bncheck-fail-on=warning", "--bncheck-tolerance", "momentum_max=0.95"
    ).assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--bncheck-fail-on=erorr"],
            "*argument --bncheck-fail-on: 'erorr' is not one of error, warning, info, never "
            "(did you mean 'error'?)*",
        ),
        (
            ["--bncheck-select=ema-updat"],
            "*argument --bncheck-select: unknown rule id 'ema-updat' (did you mean 'ema-update'?)*",
        ),
        (
            ["--bncheck-ignore=invalid_eps"],
            "*unknown rule id 'invalid_eps' (did you mean 'invalid-eps'?)*",
        ),
        (
            ["--bncheck-tolerance=ema_rtl=2"],
            "*unknown tolerance 'ema_rtl' (did you mean 'ema_rtol'?)*",
        ),
        (["--bncheck-tolerance=ema_rtol"], "*'ema_rtol' is not NAME=VALUE*"),
        (["--bncheck-tolerance=ema_rtol=lots"], "*tolerance 'ema_rtol' must be a number*"),
        (["--bncheck-input-shape=8,3,big"], "*bad shape '8,3,big': expected comma-separated*"),
        (["--bncheck-input-shape=32"], "*32 has no batch dimension: give N,C*"),
        (["--bncheck-model=pkg.mod"], "*'pkg.mod' is not a model spec; give module:callable*"),
        (["--bncheck-per-layer-ignores=features.*"], "*'features.*' is not GLOB:RULE*"),
        (
            ["--bncheck-per-layer-ignores=features.*:bias_before_bn"],
            "*did you mean 'bias-before-bn'*",
        ),
        (["--bncheck-model-arg=1x=2"], "*'1x=2' is not NAME=VALUE*"),
        (["--bncheck-select=,"], "*names no rule*"),
        (["--bncheck-ignore=all"], "*ignore='all' would check nothing*"),
    ],
)
def test_bad_option_values_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_ini_keys_and_precedence(models: pytest.Pytester) -> None:
    models.makeini("""
        [pytest]
        bncheck_fail_on = warning
        bncheck_tolerance =
            momentum_max = 0.6
            eval_rtol=1e-3
    """)
    models.makepyfile(
        test_settings="""
        import pytest
        import zoo_models

        def test_keras(bncheck):
            bncheck.assert_ok(zoo_models.keras())

        @pytest.mark.bncheck(fail_on="warning", momentum_max=0.5)
        def test_marker_beats_command_line(bncheck):
            assert bncheck.settings.sources["fail_on"] == "marker"
            bncheck.assert_ok(zoo_models.keras())

        def test_tolerances_merge_by_name(bncheck):
            assert dict(bncheck.settings.tolerances) == {"momentum_max": 0.95,
                                                         "eval_rtol": 1e-3}
            assert bncheck.settings.sources["eval_rtol"] == "ini"
            assert bncheck.settings.sources["momentum_max"] == "command line"
            assert bncheck.settings.sources["fail_on"] == "command line"
    """
    )
    # ini alone: fail_on=warning fails the keras model
    result = models.runpytest("test_settings.py::test_keras")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "bncheck *: --bncheck-fail-on=warning --bncheck-tolerance=eval_rtol=0.001 "
            "--bncheck-tolerance=momentum_max=0.6"
        ]
    )
    # the command line beats ini; the marker beats the command line
    result = models.runpytest("--bncheck-fail-on=error", "--bncheck-tolerance=momentum_max=0.95")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_settings.py::test_marker_beats_command_line*"])


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        bncheck_select = keras-momentun
    """)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*ini option bncheck_select: unknown rule id 'keras-momentun' "
            "(did you mean 'keras-momentum'?)*"
        ]
    )


def test_report_header_is_a_command_line_that_reproduces_the_settings(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        "def test_settings(bncheck):\n    print('SETTINGS', bncheck.settings.describe())\n"
    )
    pytester.makepyprojecttoml(
        """
        [tool.bncheck]
        per-layer-ignores = { "features.*" = ["bias-before-bn"] }
        tolerances = { momentum_max = 0.4 }
        """
    )
    result = pytester.runpytest(
        "-s",
        "--bncheck-fail-on=warning",
        "--bncheck-ignore=dead-channels",
        "--bncheck-tolerance=ema_rtol=2",
    )
    header = next(line for line in result.outlines if line.startswith("bncheck "))
    settings = next(line for line in result.outlines if "SETTINGS" in line)
    assert header.startswith("bncheck ") and "[config: " in header
    pasted = shlex.split(header.split(": ", 1)[1].split(" [config: ")[0])
    assert "--bncheck-per-layer-ignores=features.*:bias-before-bn" in pasted
    again = pytester.runpytest("-s", "--bncheck-no-config", *pasted)
    assert next(line for line in again.outlines if "SETTINGS" in line) == settings


def test_zero_code_mode_collects_one_audit_per_factory(models: pytest.Pytester) -> None:
    result = models.runpytest(
        "-v",
        "--bncheck-model",
        "zoo_models:good",
        "--bncheck-model",
        "zoo_models:zero_eps",
        "--bncheck-input-shape",
        "4,3,8,8",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "bncheck models: --bncheck-model=zoo_models:good --bncheck-model=zoo_models:zero_eps "
            "--bncheck-input-shape=4,3,8,8",
            "bncheck[[]zoo_models:good[]] PASSED*",
            "bncheck[[]zoo_models:zero_eps[]] FAILED*",
            "*bncheck: 1 finding at or above fail_on='error' in zoo_models:zero_eps*",
            "*error*invalid-eps*eps = 0*",
        ]
    )
    # the failure shows the findings, not a Python traceback
    result.stdout.no_fnmatch_line("*def runtest*")


def test_zero_code_mode_obeys_options_ini_and_k(models: pytest.Pytester) -> None:
    models.makeini("""
        [pytest]
        bncheck_model =
            zoo_models:keras
            zoo_models:zero_eps
    """)
    models.makepyfile("def test_unrelated():\n    pass\n")
    result = models.runpytest("-k", "keras")
    result.assert_outcomes(passed=1, deselected=2)
    result.stdout.fnmatch_lines(["collected 3 items / 2 deselected / 1 selected"])
    models.runpytest("-k", "keras", "--bncheck-fail-on=warning").assert_outcomes(
        failed=1, deselected=2
    )
    # zero-code items carry the bncheck marker: -m bncheck runs only the audits
    models.runpytest("-m", "bncheck", "--bncheck-ignore=invalid-eps").assert_outcomes(
        passed=2, deselected=1
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "zoo_models:goood",
            "*--bncheck-model zoo_models:goood: 'zoo_models' has no attribute "
            "'goood' (did you mean 'good'?)*",
        ),
        ("no_such_module:f", "*--bncheck-model no_such_module:f: cannot import 'no_such_module'*"),
        ("zoo_models:not_callable", "*'not_callable' is not callable*"),
    ],
)
def test_zero_code_bad_factory_is_a_usage_error(
    models: pytest.Pytester, spec: str, message: str
) -> None:
    result = models.runpytest("--bncheck-model", spec)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_summary_lists_findings_of_the_run(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import zoo_models
        from bncheck.testing import assert_bn_ok

        def test_fixture(bncheck):
            bncheck.assert_ok(zoo_models.keras())  # a warning: passes, but is summarised

        def test_assertion_helper():
            assert_bn_ok(zoo_models.good())
    """)
    result = models.runpytest()
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*= bncheck =*",
            "2 audits in 2 tests: 0 error(s), 1 warning(s), 0 info",
            "test_summary_lists_findings_of_the_run.py::test_fixture",
            "  warning keras-momentum * momentum = 0.9 > 0.5*",
        ]
    )


def test_audits_travel_on_the_test_report_for_xdist(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import zoo_models

        def test_two_audits(bncheck):
            bncheck.audit(zoo_models.keras())
            bncheck.audit(zoo_models.keras())
    """)
    recorded = models.inline_run()
    calls = [r for r in recorded.getreports("pytest_runtest_logreport") if r.when == "call"]
    # what pytest-xdist does to send a report from a worker to the controller
    shipped = pytest.TestReport._from_json(calls[0]._to_json())
    audited = shipped.bncheck  # type: ignore[attr-defined]
    assert audited["audits"] == 2
    assert [f["rule"] for f in audited["findings"]] == ["keras-momentum"]


def test_no_summary_when_no_audit_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*= bncheck =*")


def _audited(*rules: str) -> dict[str, object]:
    report = Report(
        [Finding(r, Severity.WARNING, "bn", f"bn (BatchNorm2d): {r} here") for r in rules]
    )
    return {"audits": 1, "findings": [f.to_dict() for f in report.findings]}


def test_summary_is_skipped_on_xdist_workers() -> None:
    written: list[str] = []
    reporter = SimpleNamespace(
        write_sep=lambda sep, title: written.append(title), write_line=written.append
    )
    from bncheck.plugin import _STATE, BNCheckSettings, _PluginState

    stash = pytest.Stash()
    stash[_STATE] = _PluginState(BNCheckSettings(), [], None, [("t::a", _audited("x"))])
    worker = SimpleNamespace(
        workerinput={"workerid": "gw0"}, stash=stash, option=SimpleNamespace(verbose=0)
    )
    pytest_terminal_summary(reporter, 0, worker)  # type: ignore[arg-type]
    assert written == []
    controller = SimpleNamespace(stash=stash, option=SimpleNamespace(verbose=0))
    pytest_terminal_summary(reporter, 0, controller)  # type: ignore[arg-type]
    assert written[0] == "bncheck" and "t::a" in written


def test_summary_caps_findings_per_test_unless_verbose() -> None:
    many = _audited(*(f"rule-{i:02d}" for i in range(13)))
    short = _summary_lines([("t::many", many)], verbose=False)
    assert sum(line.startswith("  warning") for line in short) == 10
    assert short[-1] == "  ... +3 more rules (-v shows all)"
    full = _summary_lines([("t::many", many)], verbose=True)
    assert sum(line.startswith("  warning") for line in full) == 13


def test_summary_groups_findings_of_one_rule() -> None:
    report = Report(
        [Finding("bias-before-bn", Severity.INFO, f"f.{i}", f"f.{i} (BN): bias") for i in range(5)]
    )
    audited = {"audits": 1, "findings": [f.to_dict() for f in report.findings]}
    lines = _summary_lines([("t::x", audited)], verbose=False)
    assert lines == [
        "1 audit in 1 test: 0 error(s), 0 warning(s), 5 info",
        "t::x",
        "  info    bias-before-bn             5 findings (f.0, f.1, f.2, +2); "
        "first: f.0 (BN): bias",
    ]


def test_reference_model_and_example_batch_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import torch
        from bncheck.models import VGG

        def test_reference(request):
            torch.manual_seed(123)
            before = torch.get_rng_state()
            model = request.getfixturevalue("bncheck_reference_model")
            batch = request.getfixturevalue("bncheck_example_batch")
            assert torch.equal(torch.get_rng_state(), before)  # global RNG untouched
            assert isinstance(model, VGG) and model.training
            assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13
            assert batch.shape == (8, 3, 32, 32)
            assert model(batch).shape == (8, 10)

        def test_deterministic(bncheck_reference_model, bncheck_example_batch):
            from bncheck.plugin import SEED
            torch.manual_seed(SEED)
            from bncheck.models import vgg16_bn_small
            again = vgg16_bn_small()
            for a, b in zip(bncheck_reference_model.parameters(), again.parameters()):
                assert torch.equal(a, b)
            g = torch.Generator().manual_seed(SEED)
            assert torch.equal(bncheck_example_batch, torch.randn(8, 3, 32, 32, generator=g))

        def test_audit_reference(bncheck, bncheck_reference_model, bncheck_example_batch):
            bncheck.assert_ok(bncheck_reference_model, bncheck_example_batch)
    """)
    pytester.runpytest().assert_outcomes(passed=3)


def test_zero_code_module_that_fails_to_import_is_a_usage_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(broken="def f(:\n    pass\n")
    pytester.syspathinsert()
    result = pytester.runpytest("--bncheck-model", "broken:f")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--bncheck-model broken:f: importing 'broken' raised SyntaxError*"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_zero_code_factory_that_raises_fails_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(raising="def build():\n    raise RuntimeError('boom')\n")
    pytester.syspathinsert()
    result = pytester.runpytest("--bncheck-model", "raising:build")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*raising:build raised RuntimeError: boom*"])
    assert "_hookexec" not in result.stdout.str()  # no pytest/pluggy internals


def test_the_calls_own_select_wins_over_an_inherited_ignore(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import pytest
        import zoo_models

        @pytest.mark.bncheck(ignore=["keras-momentum"])
        def test_call_selects_it(bncheck):
            report = bncheck.audit(zoo_models.keras(), select=["keras-momentum"])
            assert report.rules_found() == {"keras-momentum"}

        @pytest.mark.bncheck(ignore=["keras-momentum"])
        def test_marker_still_ignores_it(bncheck):
            assert "keras-momentum" not in bncheck.audit(zoo_models.keras()).rules_found()
    """)
    models.runpytest().assert_outcomes(passed=2)


def test_audits_made_by_fixtures_are_in_the_summary(models: pytest.Pytester) -> None:
    models.makepyfile("""
        import pytest
        import zoo_models

        @pytest.fixture
        def audited(bncheck):
            return bncheck.audit(zoo_models.keras())

        def test_uses_fixture(audited):
            assert audited.rules_found() == {"keras-momentum"}
    """)
    result = models.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*1 audit in 1 test*", "*keras-momentum*"])


# ---- [tool.bncheck], per-layer ignores, baselines ------------------------------------------------
SETTINGS_TEST = """
import pytest
import zoo_models


def test_settings(bncheck):
    print("SOURCES", dict(bncheck.settings.sources), bncheck.settings.fail_on)
    bncheck.assert_ok(zoo_models.keras())
"""


def test_tool_bncheck_is_read_below_ini_and_command_line(models: pytest.Pytester) -> None:
    models.makepyfile(test_cfg=SETTINGS_TEST)
    models.makepyprojecttoml(
        """
        [tool.bncheck]
        fail-on = "warning"
        tolerances = { momentum_max = 0.6 }
        """
    )
    result = models.runpytest("-s")
    result.assert_outcomes(failed=1)  # fail-on = warning from the file
    result.stdout.fnmatch_lines(["*'fail_on': '[[]tool.bncheck[]]'*"])
    result = models.runpytest("-s", "--bncheck-fail-on=error")
    result.assert_outcomes(passed=1)  # the command line wins
    models.makeini("[pytest]\nbncheck_fail_on = error\n")
    result = models.runpytest("-s", "-c", "tox.ini")
    result.assert_outcomes(passed=1)  # the ini file wins over [tool.bncheck]
    result = models.runpytest("-s", "--bncheck-no-config", "-c", "tox.ini")
    result.stdout.fnmatch_lines(["*SOURCES {'fail_on': 'ini'} error"])


def test_bad_tool_bncheck_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.bncheck]\nfail_on = "warn"\nselct = "x"\n')
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*pyproject.toml [[]tool.bncheck[]]: fail-on: 'warn' is not one of error, warning*"]
    )


def test_marker_per_layer_ignores_suppress_and_are_counted(models: pytest.Pytester) -> None:
    models.makepyfile(
        """
        import pytest
        import zoo_models

        @pytest.mark.bncheck(per_layer_ignores={"1": ["invalid-eps"]})
        def test_suppressed(bncheck):
            report = bncheck.assert_ok(zoo_models.zero_eps())
            assert report.settings["suppressed"] == 1

        @pytest.mark.bncheck(per_layer_ignores={"0.*": "invalid-eps"})
        def test_wrong_glob(bncheck):
            bncheck.assert_ok(zoo_models.zero_eps())
        """
    )
    result = models.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "1 suppressed by per-layer ignores ('1': 1)",
            "warning: per-layer ignore '0.*' matched no finding in this session*",
        ]
    )
    models.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.bncheck(per_layer_ignores=["1:invalid_eps"])
        def test_bad_rule(bncheck):
            pass
        """
    )
    result = models.runpytest("test_bad.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*@pytest.mark.bncheck: unknown rule id 'invalid_eps'*"])


def test_baseline_accepts_known_findings_and_fails_new_ones(
    models: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    models.makepyfile(
        test_base="""
        import os
        import zoo_models

        def test_model(bncheck):
            bncheck.assert_ok(getattr(zoo_models, os.environ.get("WHICH", "keras"))(),
                              fail_on="warning")
        """
    )
    result = models.runpytest("--bncheck-baseline=b.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*baseline *b.json: no such file; create it with*"])
    result = models.runpytest("--bncheck-baseline=b.json", "--bncheck-update-baseline")
    result.assert_outcomes(passed=1)
    result = models.runpytest("--bncheck-baseline=b.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["baseline *b.json: 1 finding in the baseline, 0 new, 0 fixed*"])
    monkeypatch.setenv("WHICH", "zero_eps")
    result = models.runpytest("--bncheck-baseline=b.json")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["baseline *b.json: 0 findings in the baseline, 1 new, 1 fixed*"])


def test_zero_code_input_shape_from_tool_bncheck(models: pytest.Pytester) -> None:
    models.makepyprojecttoml('[tool.bncheck]\ninput-shape = "2,3,8,8"\n')
    result = models.runpytest("--bncheck-model", "zoo_models:good")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["bncheck models: --bncheck-model=zoo_models:good --bncheck-input-shape=2,3,8,8"]
    )
    models.makepyprojecttoml('[tool.bncheck]\ninput-shape = "8"\n')
    result = models.runpytest("--bncheck-model", "zoo_models:good")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*input-shape: 8 has no batch dimension*"])

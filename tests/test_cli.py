"""The ``bncheck`` command line, in-process through ``main(argv)``, plus console-script smoke."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from zoo import ConvBNReLU, image_batch, trained

from bncheck.checks.catalogue import CATALOGUE
from bncheck.checks.registry import explanation
from bncheck.cli import main

ARCH = "cli_factories:make"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def audit_json(capsys, *argv: str) -> tuple[int, dict, str]:
    code, out, err = run(capsys, "audit", *argv, "--format", "json")
    return code, json.loads(out), err


@pytest.fixture
def trained_sd(tmp_path) -> Path:
    torch.manual_seed(0)
    model = trained(ConvBNReLU(), image_batch())
    path = tmp_path / "trained.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def untrained_sd(tmp_path) -> Path:
    path = tmp_path / "untrained.pt"
    torch.save(ConvBNReLU().state_dict(), path)
    return path


@pytest.fixture
def no_stats_sd(tmp_path) -> Path:
    torch.manual_seed(0)
    model = trained(ConvBNReLU(), image_batch())
    path = tmp_path / "no_stats.pt"
    torch.save({k: v for k, v in model.state_dict().items() if "running" not in k}, path)
    return path


# ---- commands --------------------------------------------------------------------------------
def test_rules_lists_the_whole_catalogue(capsys):
    code, out, err = run(capsys, "rules")
    assert code == 0 and err == ""
    for info in CATALOGUE:
        assert info.id in out


def test_rules_as_json(capsys):
    code, out, _ = run(capsys, "rules", "--format", "json")
    doc = json.loads(out)
    assert code == 0
    assert [r["id"] for r in doc] == [info.id for info in CATALOGUE]
    assert {r["severity"] for r in doc} <= {"error", "warning", "info"}


def test_explain_prints_the_rule_page(capsys):
    code, out, _ = run(capsys, "explain", "ema-update")
    assert code == 0
    assert out.strip() == explanation("ema-update").strip()


def test_help_and_version_return_zero(capsys):
    code, out, _ = run(capsys, "audit", "--help")
    assert code == 0
    for flag in (
        "--arch",
        "--input-shape",
        "--batch-size",
        "--format",
        "--output",
        "--fail-on",
        "--select",
        "--ignore",
        "--trust-pickle",
        "--progress",
        "--debug",
    ):
        assert flag in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("bncheck ")


# ---- audit of a built-in architecture ----------------------------------------------------------
def test_audit_arch_builds_a_fresh_model_in_train_mode(capsys):
    before = torch.get_rng_state()
    code, doc, err = audit_json(capsys, "--arch", "vgg16_bn_small")
    assert torch.equal(torch.get_rng_state(), before)
    assert code == 0, doc
    assert doc["source"] == "vgg16_bn_small"
    assert not any(f["rule"] == "untrained-stats" for f in doc["findings"])
    assert any("in train mode" in n for n in doc["notes"])
    assert any("(4, 3, 32, 32)" in n and "synthetic" in n for n in doc["notes"])
    assert err == ""


def test_table_is_the_default_format(capsys):
    code, out, _ = run(capsys, "audit", "--arch", "vgg16_bn_small")
    assert code == 0
    assert out.startswith("bncheck: 0 errors") and "(13 BN layers)" in out


def test_json_has_the_contract_shape(capsys, untrained_sd):
    code, doc, _ = audit_json(capsys, str(untrained_sd), "--arch", ARCH)
    assert {"bncheck_version", "source", "findings", "summary"} <= set(doc)
    assert doc["source"] == str(untrained_sd)
    assert set(doc["summary"]) == {"error", "warning", "info"}
    finding = doc["findings"][0]
    assert set(finding) == {"rule", "severity", "layer", "message", "details"}


def test_a_loaded_checkpoint_is_audited_in_eval_mode(capsys, untrained_sd):
    code, doc, _ = audit_json(capsys, str(untrained_sd), "--arch", ARCH)
    assert code == 0  # untrained-stats is a warning
    (finding,) = [f for f in doc["findings"] if f["rule"] == "untrained-stats"]
    assert finding["layer"] == "bn" and "in eval mode" in finding["message"]


@pytest.mark.parametrize("fmt", ["markdown", "sarif"])
def test_other_formats(capsys, untrained_sd, fmt):
    code, out, _ = run(capsys, "audit", str(untrained_sd), "--arch", ARCH, "--format", fmt)
    assert code == 0
    if fmt == "sarif":
        doc = json.loads(out)
        (result,) = [r for r in doc["runs"][0]["results"] if r["ruleId"] == "untrained-stats"]
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri == str(untrained_sd)
    else:
        assert out.startswith("## bncheck:") and "`untrained-stats`" in out


# ---- exit codes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fail_on, expected", [("error", 0), ("warning", 1), ("info", 1), ("never", 0)]
)
def test_fail_on_decides_the_exit_code_for_a_warning(capsys, untrained_sd, fail_on, expected):
    code, doc, _ = audit_json(capsys, str(untrained_sd), "--arch", ARCH, "--fail-on", fail_on)
    assert doc["summary"]["warning"] >= 1 and doc["summary"]["error"] == 0
    assert code == expected


def test_missing_running_stats_are_an_error_finding(capsys, no_stats_sd):
    code, doc, _ = audit_json(capsys, str(no_stats_sd), "--arch", ARCH)
    assert code == 1
    (finding,) = [f for f in doc["findings"] if f["rule"] == "untrained-stats"]
    assert finding["severity"] == "error" and finding["layer"] == "bn"
    assert "running_mean and running_var missing from the checkpoint" in finding["message"]
    assert finding["details"]["missing"] == ["bn.running_mean", "bn.running_var"]
    assert any("2 BN buffers missing" in n for n in doc["notes"])
    code, doc, _ = audit_json(capsys, str(no_stats_sd), "--arch", ARCH, "--fail-on", "never")
    assert code == 0


def test_missing_stats_in_every_layer_is_one_model_wide_error(capsys, tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),
    )
    torch.save(
        {k: v for k, v in model.state_dict().items() if "running" not in k}, tmp_path / "sd.pt"
    )
    factory = tmp_path / "seq_factory.py"
    factory.write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential("
        "torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), "
        "torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        code, doc, _ = audit_json(capsys, str(tmp_path / "sd.pt"), "--arch", "seq_factory:make")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("seq_factory", None)
    assert code == 1
    (finding,) = [f for f in doc["findings"] if f["rule"] == "untrained-stats"]
    assert finding["layer"] is None and finding["severity"] == "error"
    assert "4 BN buffers missing" in finding["message"] and "all 2 BN layers" in finding["message"]


def test_ignore_and_select(capsys, no_stats_sd):
    code, doc, _ = audit_json(
        capsys, str(no_stats_sd), "--arch", ARCH, "--ignore", "untrained-stats"
    )
    assert code == 0 and not any(f["rule"] == "untrained-stats" for f in doc["findings"])
    code, doc, _ = audit_json(
        capsys, str(no_stats_sd), "--arch", ARCH, "--select", "untrained-stats,invalid-eps"
    )
    assert code == 1
    assert {f["rule"] for f in doc["findings"]} == {"untrained-stats"}
    assert "ema-update" not in doc["skipped"]


# ---- inputs ----------------------------------------------------------------------------------
def test_input_shape_alone_is_a_shape_not_a_training_batch(capsys, trained_sd):
    code, doc, _ = audit_json(capsys, str(trained_sd), "--arch", ARCH, "--input-shape", "1,3,16,16")
    assert any("(1, 3, 16, 16) from --input-shape, not judged" in n for n in doc["notes"])
    assert "--batch-size N" in doc["skipped"]["small-batch"]
    assert not [f for f in doc["findings"] if f["rule"] == "single-value-per-channel"]


def test_batch_size_is_judged_as_the_users_training_batch(capsys, trained_sd):
    # the checkpoint loads in eval mode; --batch-size still says "the batch I train with"
    code, doc, _ = audit_json(
        capsys, str(trained_sd), "--arch", ARCH, "--input-shape", "3,16,16", "--batch-size", "2"
    )
    assert any("(2, 3, 16, 16) from --batch-size" in n for n in doc["notes"])
    assert "small-batch" not in doc["skipped"]
    (finding,) = [f for f in doc["findings"] if f["rule"] == "small-batch" and not f["layer"]]
    assert finding["details"]["batch_size"] == 2


def test_shape_without_batch_plus_batch_size(capsys, trained_sd):
    code, doc, _ = audit_json(
        capsys, str(trained_sd), "--arch", ARCH, "--input-shape", "3,8,8", "--batch-size", "6"
    )
    assert any("(6, 3, 8, 8)" in n for n in doc["notes"])


def test_batch_size_alone_keeps_the_inferred_shape(capsys, trained_sd):
    code, doc, _ = audit_json(capsys, str(trained_sd), "--arch", ARCH, "--batch-size", "5")
    assert any("(5, 3, 32, 32)" in n for n in doc["notes"])


def test_synthetic_input_is_not_judged(capsys, trained_sd):
    code, doc, _ = audit_json(capsys, str(trained_sd), "--arch", ARCH)
    assert code == 0
    assert "give its size with --batch-size N" in doc["skipped"]["small-batch"]
    note = next(n for n in doc["notes"] if n.startswith("input:"))
    assert "(4, 3, 32, 32)" in note and "conv (Conv2d, in_channels=3)" in note
    assert "32x32 is a default guess" in note


def test_synthetic_input_of_a_large_builtin_arch_is_kept_small():
    from bncheck.cli import infer_input_shape
    from bncheck.models import INPUT_SHAPES, vgg16_bn

    with torch.device("meta"):
        model = vgg16_bn(init_weights=False)
    shape, where = infer_input_shape(model, INPUT_SHAPES["vgg16_bn"], None)
    assert shape == (4, 3, 64, 64)
    assert "not the 224x224 the architecture is made for" in where
    shape, _ = infer_input_shape(model, (3, 48, 40), 2)
    assert shape == (2, 3, 48, 40)


def test_bare_state_dict_runs_the_buffer_rules_and_says_what_was_skipped(capsys, untrained_sd):
    code, doc, _ = audit_json(capsys, str(untrained_sd))
    assert code == 0
    assert any(f["rule"] == "untrained-stats" and f["layer"] == "bn" for f in doc["findings"])
    assert "pass --arch to run the forward checks" in doc["skipped"]["ema-update"]
    assert "eps" in doc["skipped"]["invalid-eps"] and "--arch" in doc["skipped"]["invalid-eps"]


def test_forward_failure_explained_by_an_error_finding_is_reported(capsys, tmp_path):
    import cli_factories

    torch.save(cli_factories.refuses_bad_eps().state_dict(), tmp_path / "sd.pt")
    # eps is not in a state dict: the factory sets it, the forward refuses it.
    code, doc, _ = audit_json(
        capsys, str(tmp_path / "sd.pt"), "--arch", "cli_factories:refuses_bad_eps"
    )
    assert code == 1
    assert any(f["rule"] == "invalid-eps" for f in doc["findings"])
    assert any("eps must be positive" in n for n in doc["notes"])


def test_exported_program_uses_its_sample_input(capsys, tmp_path):
    torch.manual_seed(0)
    model = trained(ConvBNReLU(), image_batch()).eval()
    program = torch.export.export(model, (image_batch(n=3, hw=6),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    code, doc, _ = audit_json(capsys, str(tmp_path / "m.pt2"), "--arch", ARCH)
    assert code == 0
    assert any("sample input saved in the exported program" in n for n in doc["notes"])


# ---- output and progress ---------------------------------------------------------------------
def test_output_file_is_written_atomically(capsys, tmp_path, untrained_sd):
    target = tmp_path / "out" / "report.json"
    target.parent.mkdir()
    target.write_text("old")
    code, out, err = run(
        capsys,
        "audit",
        str(untrained_sd),
        "--arch",
        ARCH,
        "--format",
        "json",
        "--output",
        str(target),
    )
    assert code == 0 and out == "" and err == ""
    assert json.loads(target.read_text())["source"] == str(untrained_sd)
    assert os.listdir(target.parent) == ["report.json"]
    fresh = tmp_path / "out" / "fresh.md"
    assert (
        main(
            [
                "audit",
                str(untrained_sd),
                "--arch",
                ARCH,
                "--format",
                "markdown",
                "--output",
                str(fresh),
            ]
        )
        == 0
    )
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask


def test_progress_goes_to_stderr_and_never_into_json(capsys, untrained_sd):
    code, out, err = run(
        capsys, "audit", str(untrained_sd), "--arch", ARCH, "--format", "json", "--progress"
    )
    json.loads(out)
    assert "loading" in err and "running the audit" in err
    assert all(line.startswith("bncheck: [") for line in err.splitlines())
    code, out, err = run(capsys, "audit", str(untrained_sd), "--arch", ARCH, "--format", "json")
    assert err == ""  # capsys is not a terminal


def test_progress_bar_in_a_terminal_only_for_long_work(capsys, monkeypatch, untrained_sd):
    import bncheck.cli as cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    threads = threading.enumerate()
    code, out, err = run(capsys, "audit", str(untrained_sd), "--arch", ARCH, "--format", "json")
    json.loads(out)
    assert err == ""  # a quick audit: the bar waits PROGRESS_DELAY seconds before it shows
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)  # as if every stage were long
    code, out, err = run(capsys, "audit", str(untrained_sd), "--arch", ARCH, "--format", "json")
    json.loads(out)
    assert "\r" in err and "bncheck: loading" in err and "bncheck: running the audit" in err
    assert "bncheck: [" not in err  # not the plain progress lines
    assert threading.enumerate() == threads  # neither the redraw nor a tqdm monitor thread lives on


# ---- the file and the session are left alone -------------------------------------------------
def test_the_checkpoint_file_is_never_written(capsys, trained_sd):
    digest = hashlib.sha256(trained_sd.read_bytes()).hexdigest()
    mtime = trained_sd.stat().st_mtime_ns
    before = torch.get_rng_state()
    code, _, _ = run(capsys, "audit", str(trained_sd), "--arch", ARCH)
    assert code == 0
    assert hashlib.sha256(trained_sd.read_bytes()).hexdigest() == digest
    assert trained_sd.stat().st_mtime_ns == mtime
    assert torch.equal(torch.get_rng_state(), before)


# ---- console scripts -------------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_and_python_m(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    script = subprocess.run(
        [Path(sys.executable).with_name("bncheck"), "rules"],  # this interpreter's script
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert script.returncode == 0, script.stderr
    assert "ema-update" in script.stdout
    module = subprocess.run(
        [sys.executable, "-m", "bncheck", "explain", "ema-udpate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    assert module.returncode == 2
    assert module.stderr.startswith("bncheck: error: unknown rule id 'ema-udpate'")
    assert "did you mean 'ema-update'" in module.stderr and "Traceback" not in module.stderr

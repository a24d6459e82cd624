"""Bad input to ``bncheck``: exit 2, one or two lines starting with ``bncheck: error:``.

Every case runs in-process through ``main(argv)``; none may print a traceback, and none
may change the files it was given.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from zoo import ConvBNReLU, NoBN, image_batch, trained

from bncheck.cli import main

ARCH = "cli_factories:make"


def fails(capsys, *argv: str, match: str) -> str:
    """Run ``bncheck argv``; check exit 2, the one-line error format, and ``match``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == ""
    assert err.startswith("bncheck: error: "), err
    assert len(err.strip().splitlines()) <= 2, err
    assert "Traceback" not in err
    assert re.search(match, err), err
    return err


@pytest.fixture
def sd_file(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "sd.pt"
    torch.save(trained(ConvBNReLU(), image_batch()).state_dict(), path)
    return path


# ---- files that are not checkpoints ----------------------------------------------------------
def test_missing_file(capsys, tmp_path):
    fails(capsys, "audit", str(tmp_path / "nope.pt"), match=r"nope\.pt: no such file")


def test_directory(capsys, tmp_path):
    fails(capsys, "audit", str(tmp_path), match=r"is a directory")


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    fails(capsys, "audit", str(tmp_path / "empty.pt"), match=r"empty\.pt: the file is empty")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux procfs")
def test_kernel_pseudo_file_is_not_called_empty(capsys):
    # procfs reports size 0 for files that hold content: say what it is, not "empty"
    fails(capsys, "audit", "/proc/self/status", match=r"kernel pseudo-file")


def test_random_bytes(capsys, tmp_path):
    data = bytes(
        torch.randint(
            0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8
        ).tolist()
    )
    data = b"\x13" + data[1:]  # not a pickle marker, not a zip, not a safetensors header
    (tmp_path / "noise.bin").write_bytes(data)
    fails(
        capsys,
        "audit",
        str(tmp_path / "noise.bin"),
        match=r"noise\.bin: not a recognised checkpoint format",
    )


def test_text_file(capsys, tmp_path):
    (tmp_path / "notes.pt").write_text("epoch 3: loss 0.21\n" * 20)
    fails(
        capsys,
        "audit",
        str(tmp_path / "notes.pt"),
        match=r"notes\.pt: a text file, not a "
        r"model or checkpoint",
    )


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_archive(capsys, tmp_path, sd_file, keep):
    data = sd_file.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    fails(capsys, "audit", str(cut), "--arch", ARCH, match=r"cut\.pt: .*truncated or corrupt")


def test_truncated_safetensors(capsys, tmp_path, sd_file):
    from safetensors.torch import save_file

    full = tmp_path / "full.safetensors"
    save_file(dict(torch.load(sd_file)), str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-100])
    fails(capsys, "audit", str(cut), "--arch", ARCH, match=r"truncated or corrupt")


def test_pickled_list(capsys, tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    fails(
        capsys,
        "audit",
        str(tmp_path / "list.pkl"),
        match=r"list\.pkl: a pickle but not a PyTorch checkpoint",
    )


def test_torch_saved_list(capsys, tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    fails(
        capsys, "audit", str(tmp_path / "list.pt"), match=r"holds a list, not a state dict or model"
    )


def test_checkpoint_dict_without_a_state_dict(capsys, tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    fails(
        capsys,
        "audit",
        str(tmp_path / "meta.pt"),
        match=r"holds a dict with keys epoch, optimizer, not a state dict",
    )


class _Touch:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("container", ["raw pickle", "torch.save"])
def test_hostile_pickle_does_not_run_without_trust(capsys, tmp_path, container):
    marker = tmp_path / "created-by-pickle"
    path = tmp_path / "evil.pt"
    if container == "raw pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Touch(marker)}, protocol=2))
    else:
        torch.save({"state_dict": _Touch(marker)}, path)
    fails(
        capsys, "audit", str(path), "--arch", ARCH, match=r"needs code to load.*pass --trust-pickle"
    )
    assert not marker.exists()


def test_full_module_without_trust_then_with(capsys, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "full.pt"
    torch.save(trained(ConvBNReLU(), image_batch()), path)
    fails(capsys, "audit", str(path), match=r"zoo\.ConvBNReLU.*--trust-pickle")
    assert main(["audit", str(path), "--trust-pickle"]) == 0
    out, _ = capsys.readouterr()
    assert "pickled full module ConvBNReLU" in out


# ---- architectures ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("vgg16bn", r"unknown architecture 'vgg16bn' \(did you mean 'vgg16_bn'\?\)"),
        ("cli_factories:broken", r"--arch cli_factories:broken raised ValueError: boom"),
        ("cli_factories:not_a_module", r"returned a int, not a torch\.nn\.Module"),
        ("no_such_pkg.nets:build", r"cannot import 'no_such_pkg\.nets' \(ModuleNotFoundError"),
        ("cli_factories:nothing", r"cli_factories has no attribute 'nothing'"),
        ("vgg16_bn_small", r"does not fit --arch vgg16_bn_small: .*keys missing"),
    ],
    ids=[
        "unknown-builtin",
        "factory-raises",
        "not-a-module",
        "cannot-import",
        "no-such-attribute",
        "another-architecture",
    ],
)
def test_bad_architecture(capsys, sd_file, arch, message):
    fails(capsys, "audit", str(sd_file), "--arch", arch, match=message)


def test_model_without_bn(capsys, tmp_path):
    fails(capsys, "audit", "--arch", "cli_factories:no_bn", match=r"has no BatchNorm layer")
    torch.save(NoBN().state_dict(), tmp_path / "nobn.pt")
    fails(capsys, "audit", str(tmp_path / "nobn.pt"), match=r"no BatchNorm running statistics")


# ---- inputs ----------------------------------------------------------------------------------
def test_input_shape_that_does_not_fit_the_model(capsys, tmp_path):
    import cli_factories

    torch.save(cli_factories.fixed_64().state_dict(), tmp_path / "fixed.pt")
    err = fails(
        capsys,
        "audit",
        str(tmp_path / "fixed.pt"),
        "--arch",
        "cli_factories:fixed_64",
        match=r"the model's forward failed on an input of shape \(4, 3, 32, 32\): "
        r"RuntimeError: .*pass --input-shape",
    )
    assert "mat1 and mat2" in err
    assert (
        main(
            [
                "audit",
                str(tmp_path / "fixed.pt"),
                "--arch",
                "cli_factories:fixed_64",
                "--input-shape",
                "2,3,64,64",
                "--fail-on",
                "never",
            ]
        )
        == 0
    )
    capsys.readouterr()


def test_input_shape_with_the_wrong_channel_count(capsys, sd_file):
    fails(
        capsys,
        "audit",
        str(sd_file),
        "--arch",
        ARCH,
        "--input-shape",
        "2,5,8,8",
        match=r"shape \(2, 5, 8, 8\).*pass --input-shape",
    )


@pytest.mark.parametrize(
    "argv, match",
    [
        (["audit", "--arch", "vgg16_bn_small", "--input-shape", "a,b"], r"bad shape 'a,b'"),
        (
            ["audit", "--arch", "vgg16_bn_small", "--input-shape", "2,0,8"],
            r"every size must be >= 1",
        ),
        (["audit", "--arch", "vgg16_bn_small", "--input-shape", "8"], r"has no batch dimension"),
        (
            ["audit", "--arch", "vgg16_bn_small", "--batch-size", "0"],
            r"expected a positive integer",
        ),
        (
            ["audit", "--arch", "vgg16_bn_small", "--format", "jsn"],
            r"unknown format 'jsn' \(did you mean 'json'\?\)",
        ),
        (["audit", "--arch", "vgg16_bn_small", "--fail-on", "errors"], r"did you mean 'error'"),
        (
            ["audit", "--arch", "vgg16_bn_small", "--select", "ema-updat"],
            r"unknown rule id 'ema-updat' \(did you mean 'ema-update'\?\)",
        ),
        (["audit", "--arch", "vgg16_bn_small", "--ignore", "nope"], r"unknown rule id 'nope'"),
        (["audit", "--arch", "vgg16_bn_small", "--bogus"], r"unrecognized arguments: --bogus"),
        (["audit"], r"give a PATH to audit, or --arch NAME"),
        (["audti"], r"invalid choice: 'audti'"),
        ([], r"missing command"),
        (["explain"], r"the following arguments are required: RULE"),
        (["explain", "no-such-rule"], r"unknown rule id 'no-such-rule'"),
        (["rules", "--format", "sarif"], r"unknown format 'sarif'"),
    ],
)
def test_malformed_command_lines(capsys, argv, match):
    fails(capsys, *argv, match=match)


def test_output_that_cannot_be_written(capsys, sd_file, tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "report.json"
    fails(
        capsys,
        "audit",
        str(sd_file),
        "--arch",
        ARCH,
        "--output",
        str(target),
        match=r"cannot write the report to .*report\.json",
    )
    assert not target.parent.exists()


def test_unknown_rule_fails_before_loading(capsys, tmp_path, monkeypatch):
    import bncheck.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a file despite a bad --select")

    monkeypatch.setattr(bncheck.loading, "load_model", no_loading)
    fails(capsys, "audit", str(tmp_path / "x.pt"), "--select", "bogus", match=r"unknown rule id")


def test_debug_shows_the_traceback(capsys, tmp_path):
    code = main(["audit", str(tmp_path / "nope.pt"), "--debug"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "Traceback (most recent call last)" in err and "LoadError" in err
    assert err.rstrip().splitlines()[-1].startswith("bncheck: error: ")


def test_safetensors_package_missing(capsys, tmp_path, sd_file, monkeypatch):
    import sys

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(dict(torch.load(sd_file)), str(path))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    fails(capsys, "audit", str(path), "--arch", ARCH, match=r"pip install safetensors")


def test_unreadable_file(capsys, sd_file):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    sd_file.chmod(0)
    try:
        fails(capsys, "audit", str(sd_file), "--arch", ARCH, match=r"cannot be read")
    finally:
        sd_file.chmod(0o644)


def test_errors_raised_by_the_engine_exit_2(capsys, monkeypatch):
    import bncheck.engine
    from bncheck.errors import InputError

    def refuse(*args, **kwargs):
        raise InputError(
            "the example input has NaN/Inf values (input, shape (4, 3)); pass a finite batch"
        )

    monkeypatch.setattr(bncheck.engine, "audit", refuse)
    fails(capsys, "audit", "--arch", "vgg16_bn_small", match=r"NaN/Inf values")


def test_an_unexpected_exception_is_one_line_too(capsys, monkeypatch):
    import bncheck.engine

    def crash(*args, **kwargs):
        raise RuntimeError("something inside bncheck broke\nsecond line")

    monkeypatch.setattr(bncheck.engine, "audit", crash)
    fails(
        capsys,
        "audit",
        "--arch",
        "vgg16_bn_small",
        match=r"unexpected RuntimeError: something inside bncheck broke \(rerun with --debug",
    )

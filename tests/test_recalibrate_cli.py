"""``bncheck recalibrate CKPT --arch ARCH --data MOD:FN -o FIXED``, in-process through ``main``.

The written file keeps the input's layout (wrapper, key prefix, other entries, format); the
input is never written; bad input is exit 2 with one line. One subprocess run (slow) checks
the installed entry point end to end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recalibrate_data import batches
from zoo import TwoBlock, env_with_tests

import bncheck
from bncheck.cli import main

ARCH = "cli_factories:two_block"
DATA = "recalibrate_data:batches"


def broken_state_dict() -> dict[str, torch.Tensor]:
    """TwoBlock's state dict, statistics fitted to the data, then an AMP-style NaN in
    block1's statistics."""
    torch.manual_seed(0)
    model = bncheck.recalibrate(TwoBlock().eval(), batches(), layers="all").model
    sd = model.state_dict()
    sd["block1.1.running_var"][2] = float("nan")
    return sd


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["recalibrate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_wrapped_prefixed_checkpoint_stays_wrapped_and_other_entries_are_kept(capsys, tmp_path):
    sd = broken_state_dict()
    ckpt = tmp_path / "ckpt.pt"
    original = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}
    torch.save(original, ckpt)
    before = ckpt.read_bytes()
    fixed = tmp_path / "fixed.pt"
    code, out, err = run(
        capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", str(fixed), "--max-batches", "5"
    )
    assert code == 0, out + err
    assert ckpt.read_bytes() == before  # the input is never written
    saved = torch.load(fixed, weights_only=True)
    assert saved.keys() == {"state_dict", "epoch"} and saved["epoch"] == 7
    new = saved["state_dict"]
    assert new.keys() == original["state_dict"].keys()
    assert torch.isfinite(new["module.block1.1.running_var"]).all()
    assert int(new["module.block1.1.num_batches_tracked"]) == 5
    for key, value in original["state_dict"].items():  # only block1.1's statistics changed
        if not key.startswith("module.block1.1.running") and "num_batches" not in key:
            assert torch.equal(new[key], value), key
    assert "block1.1" in out and "nonfinite-stats" in out
    assert f"wrote {fixed}" in out


def test_safetensors_stays_safetensors_with_its_metadata(capsys, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = tmp_path / "ema.safetensors"
    save_file(broken_state_dict(), str(ckpt), metadata={"origin": "ema"})
    fixed = tmp_path / "fixed.safetensors"
    code, out, err = run(
        capsys,
        str(ckpt),
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--evaluate",
        "recalibrate_data:score",
        "-o",
        str(fixed),
    )
    assert code == 0, out + err
    with safe_open(str(fixed), framework="pt") as fh:
        assert fh.metadata() == {"origin": "ema"}
        assert torch.isfinite(fh.get_tensor("block1.1.running_var")).all()
    assert "evaluate(model): nan before" in out  # the NaN statistics give NaN outputs


def test_findings_that_remain_exit_1(capsys, tmp_path):
    sd = broken_state_dict()
    sd["block2.1.running_var"][0] = -1.0
    ckpt = tmp_path / "sd.pt"
    torch.save(sd, ckpt)
    code, out, _ = run(
        capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "--layers", "block1.*", "-o",
        str(tmp_path / "fixed.pt"),
    )  # fmt: skip
    assert code == 1
    assert "negative-running-var" in out
    assert (tmp_path / "fixed.pt").exists()


def fails(capsys, *argv: str, match: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("bncheck: error: ") and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.fixture
def ckpt(tmp_path) -> Path:
    path = tmp_path / "ckpt.pt"
    torch.save(broken_state_dict(), path)
    return path


def test_output_is_the_input(capsys, ckpt):
    before = ckpt.read_bytes()
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", str(ckpt), match="never")
    assert ckpt.read_bytes() == before


def test_output_is_the_input_through_a_symlink(capsys, ckpt, tmp_path):
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    before = ckpt.read_bytes()
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", str(link), match="is the input")
    assert ckpt.read_bytes() == before and link.is_symlink()


@pytest.mark.parametrize(
    "data, match",
    [
        ("recalibrate_data:nan_batches", "batch 2 of data has 1 NaN/Inf values"),
        ("recalibrate_data:wrong_shape", "forward failed on batch 0 of data"),
        ("recalibrate_data:empty", "data yielded no batch"),
        ("recalibrate_data:raises", "--data recalibrate_data:raises raised FileNotFoundError"),
        ("recalibrate_data:missing", "has no attribute 'missing'"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("just_a_name", "expected pkg.module:callable"),
    ],
)
def test_bad_data_exits_2_and_writes_nothing(capsys, ckpt, tmp_path, data, match):
    fixed = tmp_path / "fixed.pt"
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", data, "-o", str(fixed), match=match)
    assert not fixed.exists()


def test_missing_options_and_files(capsys, ckpt, tmp_path):
    fails(capsys, str(ckpt), "--data", DATA, "-o", "x.pt", match="--arch")
    fails(capsys, str(tmp_path / "none.pt"), "--arch", ARCH, "--data", DATA, "-o", "x.pt",
          match="none.pt")  # fmt: skip
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", "x.pt", "--max-batches", "0",
          match="positive integer")  # fmt: skip
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", str(tmp_path / "d" / "x.pt"),
          match="cannot write")  # fmt: skip
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", DATA, "-o", "x.pt", "--layers", "nope",
          match="'nope' matches no BN layer")  # fmt: skip


def test_a_torchscript_archive_is_refused(capsys, tmp_path):
    path = tmp_path / "m.ts"
    torch.jit.script(TwoBlock().eval()).save(str(path))
    fails(capsys, str(path), "--arch", ARCH, "--data", DATA, "-o", str(tmp_path / "o.pt"),
          match="recalibrate reads and writes state dicts")  # fmt: skip


def test_a_pickled_module_is_refused_without_running_it(capsys, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(TwoBlock(), path)  # a full pickled module: loading it would run code
    fails(capsys, str(path), "--arch", ARCH, "--data", DATA, "-o", str(tmp_path / "o.pt"),
          match="--trust-pickle")  # fmt: skip


@pytest.mark.slow
def test_entry_point_end_to_end(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": broken_state_dict()}, ckpt)
    env = env_with_tests()
    result = subprocess.run(
        [sys.executable, "-m", "bncheck", "recalibrate", str(ckpt), "--arch", ARCH, "--data",
         DATA, "-o", str(tmp_path / "fixed.pt")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recomputed" in result.stdout and result.stderr == ""
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=True)
    assert list(fixed) == ["model"]
    assert torch.isfinite(fixed["model"]["block1.1.running_var"]).all()


def test_a_data_module_that_exits_at_import_is_one_line(capsys, ckpt, tmp_path, monkeypatch):
    """--data is imported as --arch is: sys.exit() at import is a usage error, not an exit."""
    (tmp_path / "exiting_data_mod.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    fixed = tmp_path / "fixed.pt"
    fails(capsys, str(ckpt), "--arch", ARCH, "--data", "exiting_data_mod:f", "-o", str(fixed),
          match="called sys.exit")  # fmt: skip
    assert not fixed.exists()

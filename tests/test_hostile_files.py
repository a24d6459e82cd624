"""Hostile files: nothing they contain runs, nothing they claim is allocated, one clear line.

Every hostile file is built here (never committed). Payloads try to create a marker file;
each test asserts the marker never appears and the command line exits 2 with one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn
from zoo import ConvBNReLU, image_batch, trained

from bncheck.cli import main
from bncheck.errors import LoadError
from bncheck.loading import load_model, pickle_globals

ARCH = "cli_factories:make"


def fails(capsys, *argv: str, match: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("bncheck: error: "), err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not re.search(r"unexpected \w+Error", err), err
    assert re.search(match, err), err
    return err


@pytest.fixture
def sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return trained(ConvBNReLU(), image_batch()).state_dict()


class _Touch:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _system_pickle_behind_namespace(command: str) -> bytes:
    """Protocol 4: argparse.Namespace first, then os.system from memoised strings."""
    p = b"\x80\x04"
    p += b"\x8c\x08argparse\x94\x8c\x09Namespace\x94\x93\x94)\x81\x94"  # memo 0..3
    p += b"\x8c\x02os\x94\x8c\x06system\x94"  # memo 4, 5
    p += b"0"  # POP the namespace: the strings stay in the memo
    p += b"h\x04h\x05\x93"  # BINGET 4, BINGET 5, STACK_GLOBAL -> os.system
    cmd = command.encode()
    p += b"\x8c" + bytes([len(cmd)]) + cmd + b"\x85R."  # TUPLE1, REDUCE, STOP
    return p


# ---- section 1: nothing runs ---------------------------------------------------------------
def test_memoised_stack_global_names_os_system(capsys, tmp_path):
    marker = tmp_path / "marker"
    data = _system_pickle_behind_namespace(f"touch {marker}")
    assert "os.system" in pickle_globals(data)
    path = tmp_path / "hparams.pkl"
    path.write_bytes(data)
    fails(capsys, "audit", str(path), match=r"imports .*os\.system.*--trust-pickle")
    assert not marker.exists()


def test_getattr_and_import_chains_are_resolved():
    # getattr(__import__("os"), "system")("...") written with protocol 0 opcodes
    data = b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtrue\ntR."
    names = pickle_globals(data)
    assert "os.system" in names and "os" in names, names


def test_nested_pickle_names_the_inner_payload(capsys, tmp_path):
    marker = tmp_path / "marker"
    inner = pickle.dumps(_Touch(marker), protocol=2)

    class Nested:
        def __reduce__(self):
            return (pickle.loads, (inner,))

    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.dumps({"state_dict": Nested()}, protocol=4))
    err = fails(capsys, "audit", str(path), match=r"needs code to load")
    assert "pickle.loads" in err or "_pickle.loads" in err
    assert "pathlib.Path.touch" in err
    assert not marker.exists()


def test_inst_and_obj_opcodes_are_named(tmp_path):
    marker = tmp_path / "marker"
    inst = f"(S'touch {marker}'\nios\nsystem\n.".encode()
    assert "os.system" in pickle_globals(inst)
    obj = b"\x80\x02(cos\nsystem\nX\x04\x00\x00\x00trueo."
    assert "os.system" in pickle_globals(obj)


def test_every_dangerous_name_is_listed_however_many_others(tmp_path):
    class Many:
        def __reduce__(self):
            return (OrderedDict, ())

    names = [f"pkg{i}.Thing" for i in range(30)]
    body = b"".join(f"c{n.replace('.', chr(10))}\n0".encode() for n in names)
    data = b"\x80\x02" + body + b"cos\nsystem\n0N."
    path = tmp_path / "many.pkl"
    path.write_bytes(data)
    with pytest.raises(LoadError) as info:
        load_model(path)
    assert "os.system" in str(info.value) and "more" in str(info.value)


@pytest.mark.parametrize("container", ["plain pickle", "torch.save zip", "legacy torch.save"])
def test_payload_never_runs_in_any_container(capsys, tmp_path, container):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": _Touch(marker)}
    if container == "plain pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    elif container == "torch.save zip":
        torch.save(payload, path, pickle_protocol=4)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    fails(capsys, "audit", str(path), "--arch", ARCH, match=r"imports [^)]*pathlib\.Path\.touch")
    assert not marker.exists()


def test_protocol_4_state_dict_loads_and_audits(capsys, tmp_path, sd):
    path = tmp_path / "p4.pt"
    torch.save(sd, path, pickle_protocol=4)
    loaded = load_model(path, arch=ARCH)
    for key, value in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    assert main(["audit", str(path), "--arch", ARCH]) in (0, 1)
    assert main(["audit", str(path)]) in (0, 1)


def test_plain_pickle_of_tensors_loads_through_the_nested_archives(tmp_path, sd):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(sd, protocol=2))
    loaded = load_model(path, arch=ARCH)
    for key, value in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_legacy_protocol_4_state_dict_loads(tmp_path, sd):
    path = tmp_path / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    loaded = load_model(path, arch=ARCH)
    for key, value in sd.items():
        assert torch.equal(loaded.model.state_dict()[key], value)


class _SetState(nn.Module):
    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.register_buffer("w", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.target, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.target = state[0]
        self.training = state[2]
        written = torch.from_file(self.target, shared=True, size=2, dtype=torch.uint8)
        self.w = state[1] + written.float()


def test_torchscript_setstate_never_runs(capsys, tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(_SetState(str(marker))), str(path))
    assert not marker.exists()
    fails(capsys, "audit", str(path), match=r"runs \S*_SetState\.__setstate__.*--trust-pickle")
    assert not marker.exists()
    torch.jit.load(str(path))  # the payload is real: torch.jit.load runs it
    assert marker.exists()


def test_torchscript_is_read_without_torch_jit_load(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3)).eval()
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(model), str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    loaded = load_model(path)
    bn = dict(loaded.model.named_modules())["1"]
    assert bn.eps == pytest.approx(1e-3)
    assert torch.equal(bn.running_var, model[1].running_var)


def _exported(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),))
    path = tmp_path / "m.pt2"
    torch.export.save(program, path)
    return path


def _rewrite(path: Path, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path) as src:
        entries = [(i, src.read(i)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in entries:
            inner = info.filename.split("/", 1)[1]
            dst.writestr(info, replace.get(inner, data))


def _torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("where", ["sample inputs", "pickled weight", "pickled constant"])
def test_exported_program_pickles_never_run(capsys, tmp_path, where):
    marker = tmp_path / "marker"
    path = _exported(tmp_path)
    payload = _torch_saved(((_Touch(marker),), {}))
    if where == "sample inputs":
        _rewrite(path, {"data/sample_inputs/model.pt": payload})
    else:
        folder, config_name = (
            ("data/weights/", "model_weights_config.json")
            if where == "pickled weight"
            else ("data/constants/", "model_constants_config.json")
        )
        with zipfile.ZipFile(path) as src:
            root = src.namelist()[0].split("/", 1)[0]
            config = json.loads(src.read(f"{root}/{folder}{config_name}"))
        if where == "pickled weight":
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            _rewrite(
                path,
                {
                    folder + config_name: json.dumps(config).encode(),
                    folder + first["path_name"]: _torch_saved(_Touch(marker)),
                },
            )
        else:
            config["config"]["c"] = {"path_name": "tensor_0", "use_pickle": True}
            with zipfile.ZipFile(path, "a") as dst:
                root_name = dst.namelist()[0].split("/", 1)[0]
                dst.writestr(f"{root_name}/{folder}tensor_0", _torch_saved(_Touch(marker)))
            _rewrite(path, {folder + config_name: json.dumps(config).encode()})
    fails(capsys, "audit", str(path), match=r"imports [^)]*pathlib\.Path\.touch.*--trust-pickle")
    assert not marker.exists()


def test_clean_exported_program_still_loads(tmp_path):
    loaded = load_model(_exported(tmp_path), arch=None)
    assert "1.running_var" in loaded.model.state_dict()


# ---- section 2: bounded resources ----------------------------------------------------------
def test_fifo_is_refused_without_blocking(capsys, tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    fails(capsys, "audit", str(fifo), match=r"pipe\.pt: is a named pipe \(FIFO\), not a regular")


@pytest.mark.slow
def test_fifo_from_the_command_line_exits_promptly(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "bncheck", "audit", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and "not a regular file" in done.stderr


def test_dev_zero_is_refused(capsys):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    fails(capsys, "audit", "/dev/zero", match=r"/dev/zero: is a character device")


def test_zip_bomb_is_refused_before_decompressing(capsys, tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", b"\0" * (64 << 20))
        archive.writestr("bomb/version", b"3\n")
    assert path.stat().st_size < (1 << 20)
    err = fails(capsys, "audit", str(path), match=r"data\.pkl.* claims \d+ bytes uncompressed")
    assert "cannot be read" not in err


class _Storage:
    pass


class _ClaimPickler(pickle.Pickler):
    def __init__(self, fh, numel: int) -> None:
        super().__init__(fh, protocol=2)
        self.numel = numel

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", self.numel)
        return None


class _Claimed:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self):
        stride = (1,) * len(self.shape)
        return (
            torch._utils._rebuild_tensor_v2,
            (_Storage(), 0, self.shape, stride, False, OrderedDict()),
        )


def _claiming_file(path: Path, storage_numel: int, shape: tuple[int, ...]) -> Path:
    buffer = io.BytesIO()
    obj = {"bn.running_mean": _Claimed(shape), "bn.running_var": _Claimed((4,))}
    _ClaimPickler(buffer, storage_numel).dump(obj)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x/data.pkl", buffer.getvalue())
        archive.writestr("x/data/0", b"\0" * 16)
        archive.writestr("x/version", b"3\n")
    return path


def test_storage_claiming_more_than_the_file_is_refused(capsys, tmp_path):
    path = _claiming_file(tmp_path / "claim.pt", 10**12, (10**12,))
    assert path.stat().st_size < 4096
    fails(capsys, "audit", str(path), match=r"storage 0 claims 1000000000000 elements")


def test_tensor_claiming_more_than_its_storage_names_the_key(capsys, tmp_path):
    path = _claiming_file(tmp_path / "claim.pt", 4, (10**12,))
    fails(capsys, "audit", str(path), match=r"tensor 'bn\.running_mean' claims 1000000000000")


def test_legacy_file_claiming_more_than_it_holds_is_refused(capsys, tmp_path):
    buffer = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, buffer, protocol=2)
    _ClaimPickler(buffer, 10**12).dump({"bn.running_mean": _Claimed((10**12,))})
    pickle.dump(["0"], buffer, protocol=2)
    buffer.write(b"\0" * 64)
    path = tmp_path / "legacy.pt"
    path.write_bytes(buffer.getvalue())
    fails(capsys, "audit", str(path), match=r"storage 0 claims 1000000000000 elements")


def test_huge_input_shape_names_the_flag(capsys, tmp_path, sd):
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    fails(
        capsys,
        "audit",
        str(path),
        "--arch",
        ARCH,
        "--input-shape",
        "100000,3,4096,4096",
        match=r"--input-shape: an input of shape 100000,3,4096,4096 .*input budget",
    )
    fails(
        capsys,
        "audit",
        str(path),
        "--arch",
        ARCH,
        "--batch-size",
        "1000000000",
        match=r"--batch-size: an input of shape 1000000000,.*input budget",
    )


def _bn_group(prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.running_mean": torch.zeros(3), f"{prefix}.running_var": torch.ones(3)}


@pytest.mark.parametrize(
    ("prefix", "match"),
    [
        (".".join(["a"] * 3000), r"nested 3001 modules deep"),
        ("training", r"'training' is an attribute of every torch module"),
        ("forward", r"'forward' is an attribute of every torch module"),
        ("a..b", r"'a\.\.b\.running_mean' has an empty name"),
    ],
)
@pytest.mark.parametrize("arch", [None, ARCH])
def test_keys_no_module_tree_can_have(capsys, tmp_path, prefix, match, arch):
    path = tmp_path / "keys.pt"
    torch.save(_bn_group(prefix), path)
    fails(capsys, "audit", str(path), *(["--arch", arch] if arch else []), match=match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.to(torch.complex64), r"'bn\.running_var' has dtype complex64"),
        (lambda t: t.to_sparse(), r"'bn\.running_var' is a sparse tensor"),
    ],
)
def test_complex_or_sparse_statistics(capsys, tmp_path, sd, change, match):
    sd = dict(sd)
    sd["bn.running_var"] = change(sd["bn.running_var"])
    path = tmp_path / "odd.pt"
    torch.save(sd, path)
    fails(capsys, "audit", str(path), match=match)


def test_a_300_character_file_name(capsys, tmp_path):
    fails(capsys, "audit", str(tmp_path / ("a" * 300 + ".pt")), match=r"cannot be opened")


@pytest.mark.parametrize("arch", [None, ARCH])
def test_meta_tensors_hold_no_values(capsys, tmp_path, arch):
    with torch.device("meta"):
        model = ConvBNReLU()
    path = tmp_path / "meta.pt"
    torch.save(model.state_dict(), path)
    fails(capsys, "audit", str(path), *(["--arch", arch] if arch else []), match="holds no values")


# ---- output and architectures --------------------------------------------------------------
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_naming_the_audited_file_is_refused(capsys, tmp_path, sd, how):
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    before = path.read_bytes()
    target = path
    if how == "symlink":
        target = tmp_path / "link.pt"
        target.symlink_to(path)
    elif how == "hard link":
        target = tmp_path / "hard.pt"
        os.link(path, target)
    fails(capsys, "audit", str(path), "--arch", ARCH, "-o", str(target), match=r"being audited")
    assert path.read_bytes() == before


@pytest.mark.parametrize("when", ["import", "factory"])
def test_arch_that_calls_sys_exit(capsys, tmp_path, monkeypatch, when):
    name = f"exiting_{when}_arch"
    body = (
        "import sys\nsys.exit(0)\n"
        if when == "import"
        else "import sys\ndef make():\n    sys.exit(0)\n"
    )
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    fails(capsys, "audit", "--arch", f"{name}:make", match=r"sys\.exit\(0\)")


def test_sparse_tensor_outside_the_audited_state_dict_is_left_alone(tmp_path, sd):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "optimizer": {"emb": torch.eye(3).to_sparse()}}, path)
    loaded = load_model(path, arch=ARCH)
    assert any("also holds optimizer" in note for note in loaded.notes)


@pytest.mark.slow
def test_hidden_os_system_from_the_command_line(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hparams.pkl"
    path.write_bytes(_system_pickle_behind_namespace(f"touch {marker}"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-m", "bncheck", "audit", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert "os.system" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_exported_program_sample_inputs_may_not_allocate_through_numpy(capsys, tmp_path):
    import numpy as np

    class Huge:
        def __reduce__(self):
            return (np.ndarray, ((10**12,),))

    path = _exported(tmp_path)
    _rewrite(path, {"data/sample_inputs/model.pt": _torch_saved(((Huge(),), {}))})
    fails(capsys, "audit", str(path), match=r"in data/sample_inputs/model\.pt .*numpy\.ndarray")

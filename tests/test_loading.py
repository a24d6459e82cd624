"""bncheck.loading: every file format, wrapper, prefix and key mismatch, from Python."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import cli_factories
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ConvBNReLU, image_batch, trained

from bncheck.discovery import find_bn_layers
from bncheck.errors import LoadError, NoBatchNormError, UsageError
from bncheck.loading import (
    StateDictBatchNorm,
    load_model,
    model_from_state_dict,
    pickle_globals,
    sniff_format,
)


def trained_block(**bn_kwargs) -> ConvBNReLU:
    torch.manual_seed(0)
    return trained(ConvBNReLU(**bn_kwargs), image_batch())


@pytest.fixture
def block() -> ConvBNReLU:
    return trained_block()


def save(obj, path: Path, **kw) -> Path:
    torch.save(obj, path, **kw)
    return path


def same_tensors(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


# ---- format detection ------------------------------------------------------------------------
def test_formats_are_recognised_by_their_bytes_not_their_extension(tmp_path, block):
    sd = block.state_dict()
    from safetensors.torch import save_file

    files = {
        "torch_zip": save(sd, tmp_path / "a.safetensors"),
        "torch_legacy": save(sd, tmp_path / "b.pt2", _use_new_zipfile_serialization=False),
        "torchscript": tmp_path / "c.pt",
        "safetensors": tmp_path / "d.pt",
    }
    torch.jit.save(torch.jit.script(block), str(files["torchscript"]))
    save_file(dict(sd), str(files["safetensors"]))
    for fmt, path in files.items():
        assert sniff_format(path) == fmt, path


def test_exported_program_is_recognised_and_loaded_with_its_sample_input(tmp_path):
    block = trained_block(eps=1e-3, momentum=0.25)
    x = image_batch(n=2)
    program = torch.export.export(block, (x,))
    path = tmp_path / "model.bin"
    torch.export.save(program, str(path))
    assert sniff_format(path) == "exported_program"
    bare = load_model(path)
    assert not bare.runnable and "exported program" in bare.not_runnable_reason
    assert bare.static_unknown is None  # eps and momentum come from the graph
    (layer,) = find_bn_layers(bare.model)
    assert (layer.name, layer.kind, layer.eps, layer.momentum) == (
        "bn",
        "ExportedBatchNorm",
        1e-3,
        0.25,
    )
    assert torch.equal(layer.running_var, block.bn.running_var)
    with_arch = load_model(path, arch="cli_factories:make")
    assert with_arch.runnable
    assert torch.equal(with_arch.example_input, x)
    same_tensors(with_arch.model, block.state_dict())


# ---- state dicts with an architecture --------------------------------------------------------
def test_state_dict_with_arch_is_memory_mapped_and_assigned_without_copy(tmp_path, block):
    path = save(block.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(path, arch="cli_factories:make")
    assert loaded.memory_mapped and loaded.format == "torch_zip"
    same_tensors(loaded.model, block.state_dict())
    assert not loaded.model.training and not any(m.training for m in loaded.model.modules())
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps to see the file mapping")
    regions = []
    for line in maps.read_text().splitlines():
        if line.rstrip().endswith(str(path.resolve())):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            regions.append((lo, hi))
    assert regions, "the checkpoint is not memory-mapped"
    for name, tensor in loaded.model.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        assert any(lo <= ptr < hi for lo, hi in regions), f"{name} was copied out of the map"


def test_writing_to_a_loaded_model_never_writes_the_file(tmp_path, block):
    path = save(block.state_dict(), tmp_path / "sd.pt")
    before = path.read_bytes()
    loaded = load_model(path, arch="cli_factories:make")
    assert loaded.memory_mapped
    with torch.no_grad():
        loaded.model.bn.running_mean.add_(1.0)  # what a train-mode forward does
        loaded.model.conv.weight.zero_()
    del loaded
    assert path.read_bytes() == before


def test_loading_does_not_touch_the_global_rng(tmp_path, block):
    path = save(block.state_dict(), tmp_path / "sd.pt")
    before = torch.get_rng_state()
    load_model(path, arch="cli_factories:make")
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_wrapped_state_dicts_are_unwrapped_and_noted(tmp_path, block, wrapper):
    path = save(
        {wrapper: block.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt"
    )
    loaded = load_model(path, arch="cli_factories:make")
    same_tensors(loaded.model, block.state_dict())
    note = next(n for n in loaded.notes if "used [" in n)
    assert repr(wrapper) in note and "epoch" in note and "optimizer" in note


@pytest.mark.parametrize("prefix", ["module.", "model.", "model.module."])
def test_prefixes_are_stripped_with_an_architecture(tmp_path, block, prefix):
    sd = {prefix + k: v for k, v in block.state_dict().items()}
    path = save({"state_dict": sd}, tmp_path / "ckpt.pt")
    loaded = load_model(path, arch="cli_factories:make")
    same_tensors(loaded.model, block.state_dict())
    assert any(f"prefix {prefix!r}" in n for n in loaded.notes)


def test_keys_outside_the_model_prefix_are_left_out_and_listed(tmp_path, block):
    sd = {"model." + k: v for k, v in block.state_dict().items()}
    sd["loss_fn.weight"] = torch.ones(3)
    loaded = load_model(save(sd, tmp_path / "ckpt.pt"), arch="cli_factories:make")
    same_tensors(loaded.model, block.state_dict())
    assert any("left out 1 keys" in n and "loss_fn.weight" in n for n in loaded.notes)


def test_missing_bn_running_stats_are_filled_with_init_values_and_reported(tmp_path, block):
    sd = {k: v for k, v in block.state_dict().items() if "running" not in k}
    loaded = load_model(save(sd, tmp_path / "sd.pt"), arch="cli_factories:make")
    assert loaded.missing_bn_stats == {"bn": ["running_mean", "running_var"]}
    assert torch.equal(loaded.model.bn.running_mean, torch.zeros(8))
    assert torch.equal(loaded.model.bn.running_var, torch.ones(8))
    assert torch.equal(loaded.model.bn.weight, block.bn.weight)
    assert any(
        "2 BN buffers missing: bn.running_mean, bn.running_var" in n and "not saved" in n
        for n in loaded.notes
    )


def test_missing_num_batches_tracked_alone_is_version_skew(tmp_path, block):
    sd = {k: v for k, v in block.state_dict().items() if "num_batches" not in k}
    loaded = load_model(save(sd, tmp_path / "sd.pt"), arch="cli_factories:make")
    assert loaded.missing_bn_stats == {}
    assert int(loaded.model.bn.num_batches_tracked) == 0
    assert torch.equal(loaded.model.bn.running_var, block.bn.running_var)
    assert any("num_batches_tracked missing in 1 BN" in n for n in loaded.notes)


def test_a_missing_weight_is_a_load_error(tmp_path, block):
    sd = {k: v for k, v in block.state_dict().items() if k != "conv.weight"}
    with pytest.raises(
        LoadError,
        match=r"does not fit --arch cli_factories:make: 1 keys "
        r"missing from the checkpoint \(conv\.weight\)",
    ):
        load_model(save(sd, tmp_path / "sd.pt"), arch="cli_factories:make")


def test_unexpected_keys_are_a_load_error(tmp_path, block):
    sd = dict(block.state_dict())
    sd["extra.running_mean"] = torch.zeros(8)
    with pytest.raises(LoadError, match=r"1 unexpected keys \(extra\.running_mean\)"):
        load_model(save(sd, tmp_path / "sd.pt"), arch="cli_factories:make")


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    sd = ConvBNReLU(c=16).state_dict()
    with pytest.raises(
        LoadError,
        match=r"conv\.weight has shape \(16, 3, 3, 3\) in the "
        r"checkpoint but \(8, 3, 3, 3\) in the architecture",
    ):
        load_model(save(sd, tmp_path / "sd.pt"), arch="cli_factories:make")


def test_factory_that_needs_real_tensors_is_built_on_cpu(tmp_path):
    source = cli_factories.needs_real()
    loaded = load_model(
        save(source.state_dict(), tmp_path / "sd.pt"), arch="cli_factories:needs_real"
    )
    same_tensors(loaded.model, source.state_dict())
    assert loaded.model.scale == 1.0
    assert any("cannot be built on the meta device" in n for n in loaded.notes)


def test_non_persistent_buffers_are_real_after_loading(tmp_path):
    source = cli_factories.with_non_persistent()
    loaded = load_model(
        save(source.state_dict(), tmp_path / "sd.pt"), arch="cli_factories:with_non_persistent"
    )
    assert not loaded.model.offset.is_meta
    assert torch.equal(loaded.model.offset, torch.full((1,), 0.5))
    same_tensors(loaded.model, source.state_dict())


def test_builtin_arch_loads_a_reference_checkpoint(tmp_path):
    from bncheck.models import vgg16_bn_small

    source = vgg16_bn_small()
    loaded = load_model(save(source.state_dict(), tmp_path / "vgg.pt"), arch="vgg16_bn_small")
    same_tensors(loaded.model, source.state_dict())
    assert loaded.input_shape == (3, 32, 32) and loaded.arch == "vgg16_bn_small"


def test_unknown_arch_suggests_a_close_name(tmp_path, block):
    path = save(block.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(
        UsageError,
        match=r"unknown architecture 'vgg16bn'.*did you mean "
        r"'vgg16_bn'",
    ):
        load_model(path, arch="vgg16bn")


# ---- state dicts without an architecture -----------------------------------------------------
def test_bare_state_dict_becomes_stand_in_bn_layers_sharing_the_tensors(block):
    sd = {"module.backbone." + k: v for k, v in block.state_dict().items()}
    model = model_from_state_dict(sd)
    layers = find_bn_layers(model)
    assert [layer.name for layer in layers] == ["module.backbone.bn"]
    bn = model.get_submodule("module.backbone.bn")
    assert isinstance(bn, StateDictBatchNorm) and not bn.training
    assert bn.running_var is sd["module.backbone.bn.running_var"]
    assert torch.equal(bn.weight, block.bn.weight)


def test_bare_state_dict_strips_wrapper_prefixes_and_is_not_runnable(tmp_path, block):
    sd = {"module." + k: v for k, v in block.state_dict().items()}
    loaded = load_model(save(sd, tmp_path / "sd.pt"))
    assert not loaded.runnable and "pass --arch" in loaded.not_runnable_reason
    assert [layer.name for layer in find_bn_layers(loaded.model)] == ["bn"]
    assert "eps" in loaded.static_unknown


def test_bare_state_dict_without_bn_is_a_no_batchnorm_error(tmp_path):
    path = save(nn.Linear(3, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(NoBatchNormError, match="no BatchNorm running statistics"):
        load_model(path)


# ---- safetensors, TorchScript, pickles -------------------------------------------------------
def test_safetensors_state_dict_loads_into_an_arch(tmp_path, block):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dict(block.state_dict()), str(path))
    loaded = load_model(path, arch="cli_factories:make")
    same_tensors(loaded.model, block.state_dict())


def test_safetensors_without_the_package_says_how_to_install_it(tmp_path, block, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(dict(block.state_dict()), str(path))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(LoadError, match="pip install safetensors"):
        load_model(path, arch="cli_factories:make")


def test_torchscript_keeps_the_bn_settings_without_an_arch(tmp_path):
    model = trained_block(eps=1e-3, momentum=0.3)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    assert not loaded.runnable and "TorchScript" in loaded.not_runnable_reason
    (layer,) = find_bn_layers(loaded.model)
    assert (layer.name, layer.kind, layer.eps, layer.momentum) == ("bn", "BatchNorm2d", 1e-3, 0.3)
    assert torch.equal(layer.running_var, model.bn.running_var)


def test_traced_torchscript_loads_with_its_settings_marked_unknown(tmp_path):
    model = trained_block(eps=1e-3, momentum=0.3)
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 3, 8, 8)), str(path))
    loaded = load_model(path)
    (layer,) = find_bn_layers(loaded.model)
    assert (layer.name, layer.kind) == ("bn", "BatchNorm2d")
    assert torch.equal(layer.running_var, model.bn.running_var)
    assert "inlines the layers' settings" in loaded.static_unknown


def test_torchscript_with_an_arch_is_runnable(tmp_path, block):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(block), str(path))
    loaded = load_model(path, arch="cli_factories:make")
    assert loaded.runnable
    same_tensors(loaded.model, block.state_dict())


def test_full_module_pickle_needs_trust(tmp_path, block):
    path = save(block, tmp_path / "full.pt")
    with pytest.raises(LoadError, match=r"imports zoo\.ConvBNReLU.*--trust-pickle"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert isinstance(loaded.model, ConvBNReLU) and not loaded.model.training
    assert any("pickled full module ConvBNReLU" in n for n in loaded.notes)


def test_legacy_format_loads_without_mmap(tmp_path, block):
    path = save(block.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = load_model(path, arch="cli_factories:make")
    assert not loaded.memory_mapped
    same_tensors(loaded.model, block.state_dict())


class _Touch:
    """Unpickling this creates a file: the marker of code run by a pickle."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.parametrize("container", ["raw pickle", "torch.save"])
def test_hostile_pickle_never_runs(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": _Touch(marker)}
    if container == "raw pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(
        LoadError,
        match=r"needs code to load \(it imports pathlib\.[^)]*\)"
        r".*--trust-pickle",
    ):
        load_model(path)
    assert not marker.exists()


def test_pickle_globals_reads_opcodes_only():
    class_path = f"{_Touch.__module__}._Touch"
    for protocol in (2, 4):
        data = pickle.dumps([_Touch(Path("/nonexistent/x")), {"a": 1}], protocol=protocol)
        found = pickle_globals(data)
        assert any(g.startswith("pathlib.") for g in found), (protocol, found)
        assert class_path not in found  # __reduce__ replaces the class by its callable
    assert pickle_globals(pickle.dumps({"a": [1, 2.0, "x"]})) == []


def test_safetensors_detection_needs_a_header_that_fits(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b"{" + b"x" * 30)
    with pytest.raises(LoadError, match="not a recognised checkpoint format"):
        sniff_format(path)


def test_hyperparameters_and_numpy_metrics_beside_the_weights_need_no_trust(tmp_path, block):
    import argparse

    import numpy as np

    ckpt = {
        "state_dict": block.state_dict(),
        "args": argparse.Namespace(lr=0.1, arch="x"),
        "best_acc": np.float64(0.93),
        "history": np.arange(3),
    }
    loaded = load_model(save(ckpt, tmp_path / "ckpt.pt"), arch="cli_factories:make")
    same_tensors(loaded.model, block.state_dict())
    assert any("args, best_acc, history" in n for n in loaded.notes)


class FrozenBN(nn.Module):
    """torchvision-style frozen BN: gamma/beta and statistics are all buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.eps = 1e-4
        self.register_buffer("weight", torch.ones(c))
        self.register_buffer("bias", torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return (
            x * scale[None, :, None, None]
            + (self.bias - self.running_mean * scale)[None, :, None, None]
        )


def test_torchscript_custom_bn_like_layers_are_found(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBN(4)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(-1.0)
    path = tmp_path / "frozen.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    (layer,) = find_bn_layers(loaded.model)
    assert (layer.name, layer.kind, layer.eps) == ("1", "FrozenBN", 1e-4)
    assert torch.equal(layer.running_var, torch.full((4,), -1.0))


keys_strategy = st.lists(
    st.from_regex(r"[a-z]{1,4}(\.[a-z0-9]{1,3}){0,2}\.(weight|bias|running_mean)", fullmatch=True),
    min_size=1,
    max_size=8,
    unique=True,
)


@given(
    keys=keys_strategy,
    wrappers=st.lists(st.sampled_from(["module.", "model.", "_orig_mod."]), max_size=3),
)
@settings(max_examples=60, deadline=None)
def test_strip_prefix_without_arch_removes_exactly_the_wrapper_prefixes(keys, wrappers):
    from bncheck.loading import strip_prefix

    prefix = "".join(wrappers)
    wrapped = {prefix + k: torch.zeros(1) for k in keys}
    # Oracle: peel known wrapper names off the front while every key starts with one.
    expected_keys = list(wrapped)
    while True:
        for known in ("module.", "model.", "_orig_mod."):
            if all(k.startswith(known) for k in expected_keys):
                expected_keys = [k[len(known) :] for k in expected_keys]
                break
        else:
            break
    notes: list[str] = []
    stripped = strip_prefix(wrapped, None, notes)
    assert list(stripped) == expected_keys
    assert bool(notes) == (expected_keys != list(wrapped))
    if not any(k.startswith(("module.", "model.", "_orig_mod.")) for k in keys):
        assert list(stripped) == keys


@given(keys=keys_strategy, prefix=st.from_regex(r"[a-z]{1,5}\.", fullmatch=True))
@settings(max_examples=60, deadline=None)
def test_strip_prefix_with_arch_recovers_the_architecture_keys(keys, prefix):
    from bncheck.loading import strip_prefix

    wrapped = {prefix + k: torch.zeros(1) for k in keys}
    wrapped["other.thing.weight"] = torch.zeros(1)
    stripped = strip_prefix(wrapped, set(keys), [])
    assert set(keys) <= set(stripped)

"""BN discovery: every BN-like layer, by qualified name, through wrappers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from zoo import ConvBNReLU, FrozenBN2d, NoBN, TwoBlock, env_with_tests

import bncheck
from bncheck.discovery import find_bn_layers, is_bn_like


class BNAct2d(nn.BatchNorm2d):
    """BatchNormAct2d look-alike: a BatchNorm2d subclass with its activation inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class CustomBN(nn.Module):
    """A hand-written BN: own parameters and per-channel running buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
        self.body = nn.ModuleDict(
            {
                "a": nn.BatchNorm2d(4),
                "frozen": FrozenBN2d(4),
                "act": BNAct2d(4),
                "custom": CustomBN(4),
            }
        )
        self.head = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.SyncBatchNorm(4))
        self.lazy = nn.LazyBatchNorm2d()
        self.not_bn = nn.LayerNorm(4)


def test_finds_every_kind_by_qualified_name_in_module_order():
    layers = find_bn_layers(Mixed())
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("stem.1", "BatchNorm3d"),
        ("body.a", "BatchNorm2d"),
        ("body.frozen", "FrozenBN2d"),
        ("body.act", "BNAct2d"),
        ("body.custom", "CustomBN"),
        ("head.1", "BatchNorm1d"),
        ("head.2", "SyncBatchNorm"),
        ("lazy", "LazyBatchNorm2d"),
    ]


def test_layer_settings_are_read():
    layers = {layer.name: layer for layer in find_bn_layers(Mixed())}
    frozen, custom, lazy = layers["body.frozen"], layers["body.custom"], layers["lazy"]
    assert frozen.num_features == 4 and frozen.eps == 1e-5 and not frozen.standard
    assert frozen.frozen_by_design and frozen.params == []
    assert custom.num_features == 4 and custom.eps is None and not custom.has_momentum
    assert custom.affine and not custom.frozen_by_design
    assert lazy.lazy_uninitialized and lazy.num_features is None
    assert layers["stem.1"].momentum == 0.1 and layers["stem.1"].label == "stem.1 (BatchNorm3d)"


def test_no_running_stats_layer_is_still_found():
    (layer,) = find_bn_layers(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    assert not layer.has_running_stats and not layer.track_running_stats


def test_lookalikes_that_are_not_bn_are_ignored():
    class NotBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(3))  # no running_var

    assert not is_bn_like(NotBN())
    assert not is_bn_like(nn.LayerNorm(3)) and not is_bn_like(nn.GroupNorm(1, 3))
    assert find_bn_layers(NoBN()) == []


def test_uninitialised_lazy_layer_is_reported_clearly_not_crashed_on():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.LazyBatchNorm2d())
    report = bncheck.audit(model, torch.randn(4, 3, 4, 4))
    assert any("uninitialised lazy layers (1)" in note for note in report.notes)
    assert "run one forward pass" in report.skipped["normalization"]
    assert isinstance(model[1].running_mean, nn.parameter.UninitializedBuffer)


def test_data_parallel_names_are_relative_to_the_user_model():
    wrapped = nn.DataParallel(TwoBlock())
    assert [layer.name for layer in find_bn_layers(wrapped)] == ["block1.1", "block2.1"]


#: One gloo rank in its own process: a process group (and gloo's threads) never live in the
#: test process, and a hang in torch.distributed fails this test instead of holding the suite.
DDP_SCRIPT = """
import sys
from datetime import timedelta
import torch.distributed as dist
from torch import nn
from zoo import ConvBNReLU
import bncheck
from bncheck.discovery import find_bn_layers
store = dist.FileStore(sys.argv[1], 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
try:
    ddp = nn.parallel.DistributedDataParallel(ConvBNReLU())
    print([layer.name for layer in find_bn_layers(ddp)], bncheck.audit(ddp).layers)
finally:
    dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo"
)
def test_ddp_names_are_relative_to_the_user_model(tmp_path):
    env = env_with_tests(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['bn'] ['bn']"


def test_model_without_bn_is_a_clear_error():
    with pytest.raises(bncheck.NoBatchNormError, match="NoBN has no BatchNorm layer"):
        bncheck.audit(NoBN())


def test_audit_rejects_a_non_module():
    with pytest.raises(bncheck.UsageError, match="needs a torch.nn.Module, got dict"):
        bncheck.audit({"features.1.weight": torch.ones(3)})  # type: ignore[arg-type]


def test_torchscript_models_get_the_static_rules_and_a_clear_skip_reason():
    scripted = torch.jit.script(ConvBNReLU(momentum=0.99))
    (layer,) = find_bn_layers(scripted)
    assert layer.name == "bn" and layer.kind == "BatchNorm2d" and layer.momentum == 0.99
    report = bncheck.audit(scripted, torch.randn(2, 3, 4, 4))
    assert "keras-momentum" in report.rules_found()
    assert "TorchScript modules take no forward hooks" in report.skipped["normalization"]

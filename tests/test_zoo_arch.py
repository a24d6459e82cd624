"""``torchvision:NAME`` / ``timm:NAME`` architectures and ``--arch-arg``.

torchvision and timm are not dependencies: without them the errors must be one line. The
tests that build real zoo models skip when the library is absent; the others put a stand-in
library in ``sys.modules`` that records what it was asked for (nothing may download weights).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from torch import nn

from bncheck.cli import main
from bncheck.errors import UsageError
from bncheck.zoo import is_zoo_spec, resolve


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_zoo_specs_are_told_from_module_paths():
    assert is_zoo_spec("torchvision:resnet18") and is_zoo_spec("timm:resnet50d")
    assert not is_zoo_spec("torchvision.models:resnet18")  # a plain module:callable
    assert not is_zoo_spec("mypkg:build") and not is_zoo_spec("vgg16_bn")


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_missing_library_is_a_one_line_error(capsys, monkeypatch, library):
    monkeypatch.setitem(sys.modules, library, None)  # import fails as if not installed
    code, out, err = run(capsys, "audit", "--arch", f"{library}:resnet18")
    assert code == 2 and out == ""
    assert err == (
        f"bncheck: error: --arch {library}:resnet18: {library} is not installed (bncheck does "
        f"not depend on it); pip install {library}\n"
    )


def _fake_torchvision(monkeypatch) -> list[dict]:
    calls: list[dict] = []

    def resnet_ish(*, weights=None, progress=True, num_classes=1000, **kwargs):
        calls.append({"weights": weights, "num_classes": num_classes, **kwargs})
        return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def detector(*, weights=None, weights_backbone="IMAGENET", **kwargs):
        calls.append({"weights": weights, "weights_backbone": weights_backbone})
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    builders = {"resnet18": resnet_ish, "fasterrcnn_resnet50_fpn": detector}
    package = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    video = types.ModuleType("torchvision.models.video")
    segmentation = types.ModuleType("torchvision.models.segmentation")

    def list_models(module=None):
        if module is None:
            return sorted(builders)
        return ["resnet18"] if module is models else []

    models.list_models = list_models
    models.get_model_builder = builders.__getitem__
    package.models = models
    for name, module in {
        "torchvision": package,
        "torchvision.models": models,
        "torchvision.models.video": video,
        "torchvision.models.segmentation": segmentation,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_torchvision_models_are_built_without_weights(monkeypatch, capsys):
    calls = _fake_torchvision(monkeypatch)
    code, out, _ = run(
        capsys,
        "audit",
        "--arch",
        "torchvision:resnet18",
        "--arch-arg",
        "num_classes=10",
        "--format",
        "json",
        "--select",
        "invalid-eps",
    )
    assert code == 0, out
    assert json.loads(out)["source"] == "torchvision:resnet18"
    assert calls == [{"weights": None, "num_classes": 10}]
    factory, shape = resolve("torchvision:fasterrcnn_resnet50_fpn")
    factory()
    assert calls[-1] == {"weights": None, "weights_backbone": None}  # no ImageNet backbone
    assert shape is None  # a detector: no default input shape


def test_unknown_zoo_model_and_weight_arguments_are_refused(monkeypatch):
    _fake_torchvision(monkeypatch)
    with pytest.raises(UsageError, match=r"no model 'resnet19' \(did you mean 'resnet18'\?\)"):
        resolve("torchvision:resnet19")
    with pytest.raises(UsageError, match="never downloads weights"):
        resolve("torchvision:resnet18", {"weights": "IMAGENET1K_V1"})
    with pytest.raises(UsageError, match="never downloads weights"):
        resolve("timm:resnet50d", {"pretrained": True})


def test_arch_args_reach_a_module_factory_and_a_builtin(capsys):
    code, out, _ = run(
        capsys,
        "audit",
        "--arch",
        "cli_factories:static_findings",
        "--arch-arg",
        "eps=0.001",
        "--arch-arg",
        "momentum=0.1",
        "--select",
        "invalid-eps,keras-momentum",
        "--format",
        "json",
    )
    assert code == 0 and json.loads(out)["findings"] == []
    code, out, err = run(
        capsys,
        "audit",
        "--arch",
        "vgg16_bn_small",
        "--arch-arg",
        "num_classes=3",
        "--select",
        "invalid-eps",
        "--format",
        "json",
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch-arg", "num_classes=3"], "--arch-arg needs --arch"),
        (["--arch", "cli_factories:make", "--arch-arg", "3=4"], "'3=4' is not NAME=VALUE"),
        (
            ["--arch", "cli_factories:make", "--arch-arg", "nope=1"],
            "--arch cli_factories:make raised TypeError",
        ),
    ],
)
def test_bad_arch_args(capsys, argv, message):
    code, out, err = run(capsys, "audit", *argv)
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_real_torchvision_resnet18(capsys):
    code, out, err = run(capsys, "audit", "--arch", "torchvision:resnet18", "--format", "json")
    doc = json.loads(out)
    assert code == 0, doc
    assert len(doc["findings"]) == 0 or all(f["severity"] != "error" for f in doc["findings"])


def test_zero_code_zoo_model_without_torchvision(pytester: pytest.Pytester, monkeypatch):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    monkeypatch.setitem(sys.modules, "torchvision", None)
    result = pytester.runpytest_inprocess("--bncheck-model", "torchvision:resnet18")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--bncheck-model torchvision:resnet18: torchvision is not installed*pip install*"]
    )


def test_zero_code_zoo_model_with_model_args(pytester: pytest.Pytester, monkeypatch):
    calls = _fake_torchvision(monkeypatch)
    result = pytester.runpytest_inprocess(
        "--bncheck-model",
        "torchvision:resnet18",
        "--bncheck-model-arg",
        "num_classes=7",
        "--bncheck-input-shape",
        "2,3,8,8",
    )
    result.assert_outcomes(passed=1)
    assert calls == [{"weights": None, "num_classes": 7}]
    assert torch.get_default_dtype() == torch.float32

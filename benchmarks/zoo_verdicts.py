"""Audit real torchvision and timm models (random init, no weights) and count findings per rule.

A correct architecture should get no warning and no error: every finding this prints is either
a real problem of that model or a false alarm of bncheck. Run it with an environment that has
torchvision and/or timm (it skips what is not importable; nothing is downloaded):

    PYTHONPATH=$PWD python benchmarks/zoo_verdicts.py [--fast] [--json FILE] [--models a,b]

Per model it runs, at batch 8 and the model's smallest comfortable input size:

* ``fresh``: the freshly built model audited in train mode (the stage a test suite audits);
* ``populated``: after a few train-mode forwards on random data (statistics populated, weights
  untouched: "after one forward and no optimizer step"), audited in train and in eval mode,
  in eval mode also with ``data=`` (a few batches of the same random distribution), so
  ``stat-drift`` is judged on statistics that have not converged yet;
* with ``--calibrated``, only this instead: statistics recomputed exactly on random batches
  (cumulative average), then eval mode with ``data=`` of the same distribution: no
  ``stat-drift`` warning is expected.

torchvision detectors are audited with ``(images, targets)`` in train mode (a list of
``(3, H, W)`` images and one target dict per image) and in eval mode both with the images only
(the train-mode pass cannot run: the report is incomplete and says to pass targets, recorded
as ``(incomplete)``) and with ``(images, targets)``; their ``data=`` batches are
``(images, targets)`` pairs, as a detection loader yields them. ``--batch`` sets the batch
size (default 8); the batch-size rules judge it as the training batch.

It prints the number of warnings and errors per rule (info counted apart), and with ``--json``
writes every finding (model, scenario, rule, severity, layer, message) for inspection.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import bncheck

#: torchvision classification models too large to build quickly on a CPU, or without BN.
TV_SKIP = {
    "regnet_y_128gf",
    "regnet_y_32gf",
    "regnet_y_16gf",
    "vit_h_14",
    "vit_l_16",
    "vit_l_32",
    "vit_b_16",
    "vit_b_32",
    "swin_b",
    "swin_s",
    "swin_t",
    "swin_v2_b",
    "swin_v2_s",
    "swin_v2_t",
    "convnext_large",
    "convnext_base",
    "convnext_small",
    "convnext_tiny",
    "alexnet",
    "squeezenet1_0",
    "squeezenet1_1",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "efficientnet_b7",
    "efficientnet_b6",
    "efficientnet_v2_l",
    "wide_resnet101_2",
    # large variants of families covered by a smaller member (CPU time)
    "resnet152",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "vgg13_bn",
    "vgg16_bn",
    "vgg19_bn",
    "regnet_x_32gf",
    "regnet_x_16gf",
    "regnet_y_8gf",
    "efficientnet_b5",
    "efficientnet_v2_m",
    "densenet161",
    "densenet169",
    "densenet201",
    "inception_v3",  # its train-mode aux head needs 299x299 (timm's inception_v3 is audited)
}
TV_SIZE = {"googlenet": 64, "maxvit_t": 224}
TV_FAST = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "inception_v3",
    "googlenet",
    "vgg11_bn",
]
TV_SEGMENTATION = [
    "fcn_resnet50",
    "deeplabv3_resnet50",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
]
TV_VIDEO = ["r3d_18"]  # s3d needs 16 frames of 224x224
#: detectors: a list of (3, H, W) images, plus a list of target dicts in train mode. Built
#: without weights, so their backbones use nn.BatchNorm2d (FrozenBatchNorm2d only with weights).
TV_DETECTION = [
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_resnet50_fpn",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
]
#: the detectors' own resize (GeneralizedRCNNTransform): small images keep the CPU time low
DET_SIZE = 160
TIMM = [
    "resnet18",
    "resnet26d",
    "resnet50",
    "seresnet18",
    "ecaresnet26t",
    "skresnet18",
    "resnest14d",
    "res2net50_14w_8s",
    "resnext26ts",
    "gcresnet33ts",
    "regnetx_002",
    "regnety_002",
    "regnetz_b16",
    "efficientnet_b0",
    "efficientnetv2_rw_t",
    "mobilenetv3_small_100",
    "mobilenetv3_large_100",
    "mobilenetv2_100",
    "mobilenetv4_conv_small",
    "mixnet_s",
    "tinynet_a",
    "fbnetc_100",
    "spnasnet_100",
    "semnasnet_050",
    "lcnet_050",
    "hardcorenas_a",
    "rexnet_100",
    "ghostnet_100",
    "densenet121",
    "dla34",
    "dpn68",
    "hrnet_w18_small",
    "selecsls42b",
    "cspresnet50",
    "cspdarknet53",
    "darknet53",
    "vovnet39a",
    "ese_vovnet19b_dw",
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "resnetv2_50",
    "xception41",
    "inception_v3",
    "gernet_s",
    "convmixer_768_32",
    "levit_128s",
    "efficientvit_m0",
    "efficientvit_b0",
    "mobilevit_xxs",
    "halonet26t",
    "lambda_resnet26t",
    "botnet26t_256",
    "coatnet_0_rw_224",
    "tresnet_m",
    "pnasnet5large",
    "nasnetalarge",
]
TIMM_FAST = ["resnet18", "seresnet18", "efficientnet_b0", "levit_128s", "rexnet_100", "dla34"]
TIMM_SIZE = {"inception_v3": 80, "xception41": 64}


def _tv_models(
    names: set[str] | None, fast: bool
) -> Iterator[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    try:
        import torchvision
    except ImportError:
        print("torchvision not importable: its models are skipped", file=sys.stderr)
        return
    models = torchvision.models
    classification = sorted(models.list_models(module=models))
    if fast:
        classification = [n for n in classification if n in TV_FAST]
    for name in classification:
        if name in TV_SKIP or (names and f"tv:{name}" not in names):
            continue
        size = TV_SIZE.get(name, 64)
        kw: dict[str, Any] = {"weights": None}
        if name in ("inception_v3", "googlenet"):
            kw["init_weights"] = True
        yield f"tv:{name}", lambda n=name, k=kw: models.get_model(n, **k), (3, size, size)
    seg = TV_SEGMENTATION[:1] if fast else TV_SEGMENTATION
    for name in seg:
        if names and f"tv:{name}" not in names:
            continue
        yield (
            f"tv:{name}",
            lambda n=name: models.get_model(n, weights=None, weights_backbone=None),
            (3, 64, 64),
        )
    for name in [] if fast else TV_VIDEO:
        if names and f"tv:{name}" not in names:
            continue
        yield f"tv:{name}", lambda n=name: models.get_model(n, weights=None), (3, 8, 32, 32)


def _tv_detection(
    names: set[str] | None, fast: bool
) -> Iterator[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    try:
        import torchvision
    except ImportError:
        return
    models = torchvision.models
    for name in TV_DETECTION[:1] if fast else TV_DETECTION:
        if names and f"tv:{name}" not in names:
            continue
        kw: dict[str, Any] = {"weights": None, "weights_backbone": None}
        if not name.startswith("ssd"):  # SSD resizes to its fixed 320x320
            kw.update(min_size=DET_SIZE, max_size=DET_SIZE)
        # the marker 0 as first dimension: detection input (images, targets)
        yield f"tv:{name}", lambda n=name, k=kw: models.get_model(n, **k), (0, DET_SIZE, DET_SIZE)


def _det_batch(g: torch.Generator, n: int, size: int, masks: bool) -> tuple[list, list]:
    """``n`` images of (3, size, size) in [0, 1] and one target dict per image (two boxes)."""
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * size / 2
        wh = size / 8 + torch.rand(2, 2, generator=g) * size / 3
        target: dict[str, torch.Tensor] = {
            "boxes": torch.cat([xy, xy + wh], dim=1),
            "labels": torch.randint(1, 91, (2,), generator=g),
        }
        if masks:
            target["masks"] = (torch.rand(2, size, size, generator=g) > 0.5).to(torch.uint8)
        targets.append(target)
    return images, targets


def _timm_models(
    names: set[str] | None, fast: bool
) -> Iterator[tuple[str, Callable[[], nn.Module], tuple[int, ...]]]:
    try:
        import timm
    except ImportError:
        print("timm not importable: its models are skipped", file=sys.stderr)
        return
    for name in TIMM_FAST if fast else TIMM:
        if names and f"timm:{name}" not in names:
            continue
        if name not in timm.list_models():
            continue
        cfg_size = None
        try:
            cfg = timm.models.get_pretrained_cfg(name)
            fixed = getattr(cfg, "fixed_input_size", False) if cfg is not None else False
            if fixed or any(
                k in name
                for k in (
                    "botnet",
                    "halonet",
                    "lambda",
                    "coatnet",
                    "levit",
                    "efficientvit_m",
                    "nasnet",
                )
            ):
                cfg_size = cfg.input_size[-1] if cfg is not None else 224
        except Exception:
            cfg_size = None
        size = cfg_size or TIMM_SIZE.get(name, 64)
        yield f"timm:{name}", lambda n=name: timm.create_model(n, pretrained=False), (3, size, size)


def _populate(model: nn.Module, shape: tuple[int, ...], steps: int = 3, batch: int = 8) -> None:
    """A few train-mode forwards on random data: statistics move, weights do not."""
    model.train()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(batch, *shape, generator=g))


def _calibrate(model: nn.Module, shape: tuple[int, ...], batches: int = 4, batch: int = 8) -> None:
    """Exact statistics of a few random batches at the current weights (cumulative average,
    as ``torch.optim.swa_utils.update_bn`` does), then the model's momentum back."""
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved[m] = m.momentum
            m.reset_running_stats()
            m.momentum = None
    _populate(model, shape, batches, batch)
    for m, momentum in saved.items():
        m.momentum = momentum


def _audit_detector(
    name: str, model: nn.Module, size: int, calibrated: bool, batch: int
) -> list[dict[str, Any]]:
    """A detector: train mode with ``(images, targets)``, eval mode with the images only."""
    rows: list[dict[str, Any]] = []
    masks = "maskrcnn" in name
    g = torch.Generator().manual_seed(7)
    x = _det_batch(g, batch, size, masks)
    # a detection loader yields (images, targets): data= feeds the first item to the model
    data = [_det_batch(g, batch, size, masks) for _ in range(3)]

    def populate(steps: int) -> None:
        model.train()
        pg = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _ in range(steps):
                model(*_det_batch(pg, batch, size, masks))

    if calibrated:
        saved = {}
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                saved[m] = m.momentum
                m.reset_running_stats()
                m.momentum = None
        populate(4)
        for m, momentum in saved.items():
            m.momentum = momentum
        model.eval()
        _record(rows, name, "calibrated/eval", bncheck.audit(model, x, data=data))
        return rows
    model.train()
    _record(rows, name, "fresh/train", bncheck.audit(model, x))
    populate(3)
    model.train()
    _record(rows, name, "populated/train", bncheck.audit(model, x))
    model.eval()
    # images only, as the model is called in eval mode: the train-mode pass cannot run (the
    # report is incomplete and says to pass targets); with (images, targets) it can
    _record(rows, name, "populated/eval", bncheck.audit(model, x[0], data=data))
    _record(rows, name, "populated/eval+targets", bncheck.audit(model, x, data=data))
    return rows


def _record(rows: list[dict[str, Any]], model: str, scenario: str, report: Any) -> None:
    for f in report.findings:
        rows.append(
            {
                "model": model,
                "scenario": scenario,
                "rule": f.rule,
                "severity": str(f.severity),
                "layer": f.layer,
                "message": f.message,
            }
        )
    if report.forward_error:
        rows.append(
            {
                "model": model,
                "scenario": scenario,
                "rule": "(forward failed)",
                "severity": "note",
                "layer": None,
                "message": report.forward_error,
            }
        )
    for reason in getattr(report, "incomplete", []) or []:
        rows.append(
            {
                "model": model,
                "scenario": scenario,
                "rule": "(incomplete)",
                "severity": "note",
                "layer": None,
                "message": reason,
            }
        )


def audit_model(
    name: str,
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    calibrated: bool = False,
    batch: int = 8,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    model = factory()
    if shape[0] == 0:
        return _audit_detector(name, model, shape[-1], calibrated, batch)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, *shape, generator=g)
    data = [torch.randn(batch, *shape, generator=g) for _ in range(3)]
    if calibrated:  # statistics of this distribution at these weights: stat-drift must be quiet
        _calibrate(model, shape, batch=batch)
        model.eval()
        _record(rows, name, "calibrated/eval", bncheck.audit(model, x, data=data))
        return rows
    model.train()
    _record(rows, name, "fresh/train", bncheck.audit(model, x))
    _populate(model, shape, batch=batch)
    model.train()
    _record(rows, name, "populated/train", bncheck.audit(model, x))
    model.eval()
    _record(rows, name, "populated/eval", bncheck.audit(model, x, data=data))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a dozen models only")
    parser.add_argument("--json", help="write every finding to this file")
    parser.add_argument("--models", help="comma-separated tv:NAME / timm:NAME to run")
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="only: exact statistics of random data, then eval mode with data= of the same kind",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=8,
        help="samples per batch (default 8; the batch-size rules judge it as a training batch)",
    )
    args = parser.parse_args(argv)
    names = set(args.models.split(",")) if args.models else None
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    audited, failed = 0, []
    start = time.perf_counter()
    for name, factory, shape in [
        *_tv_models(names, args.fast),
        *_tv_detection(names, args.fast),
        *_timm_models(names, args.fast),
    ]:
        t0 = time.perf_counter()
        try:
            found = audit_model(name, factory, shape, args.calibrated, args.batch)
        except bncheck.NoBatchNormError:
            continue
        except Exception as exc:  # a model this script cannot build or run at that size
            text = str(exc).splitlines()[0][:120] if str(exc) else ""
            failed.append(f"{name}: {type(exc).__name__}: {text}")
            continue
        audited += 1
        rows.extend(found)
        if args.json:  # after every model, so a long run can be read while it goes
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        serious = sum(r["severity"] in ("warning", "error") for r in found)
        print(
            f"{name:40s} {serious:3d} warnings/errors  ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    if audited == 0:
        print("no model audited (torchvision/timm not importable?)")
        for line in failed:
            print("  " + line)
        return 0
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    models_per_rule: dict[str, set[str]] = collections.defaultdict(set)
    for r in rows:
        counts[r["rule"]][r["severity"]] += 1
        if r["severity"] in ("warning", "error"):
            models_per_rule[r["rule"]].add(r["model"])
    print(f"\n{audited} models audited in {time.perf_counter() - start:.0f} s; findings per rule:")
    print(f"{'rule':28s} {'error':>6s} {'warning':>8s} {'info':>6s} {'models (w/e)':>13s}")
    for rule in sorted(counts):
        c = counts[rule]
        models = len(models_per_rule[rule])
        print(f"{rule:28s} {c['error']:6d} {c['warning']:8d} {c['info']:6d} {models:13d}")
    total = sum(c["error"] + c["warning"] for c in counts.values())
    print(f"{'total warnings + errors':28s} {total:15d}")
    if failed:
        print(f"\n{len(failed)} models not audited:")
        for line in failed:
            print("  " + line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

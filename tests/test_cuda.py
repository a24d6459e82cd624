"""bncheck on a CUDA device: the audit finds what it finds on the CPU, leaves no trace (CUDA
RNG included), judges float16/bfloat16 models within their precision, and the Monitor and
``recalibrate`` work on device tensors, with AMP, where float16 statistics overflow in practice.

Every test here skips without CUDA (CI has none); run them on a machine with a GPU with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from bn_mutants import (
    BatchStatsInEvalBN,
    EvalUpdatingBN,
    HandBN,
    KerasMomentumBN,
    NoisyEvalBN,
    NoUpdateBN,
    WrongAxesBN,
)
from bn_mutants import Net as MutantNet
from torch import nn
from zoo import ConvBNReLU, TwoBlock, image_batch, seeded, trained

import bncheck

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def verdicts(report: bncheck.Report) -> set[tuple[str, str, str]]:
    return {(f.rule, str(f.layer), str(f.severity)) for f in report.findings}


MODELS = {
    "healthy": lambda: trained(ConvBNReLU(), image_batch(16)),
    "two-block": lambda: trained(TwoBlock(), image_batch(16)),
    "hand-written": lambda: trained(MutantNet(HandBN(8)), image_batch(16)),
    "keras-momentum": lambda: MutantNet(KerasMomentumBN(8)),
    "no-update": lambda: MutantNet(NoUpdateBN(8)),
    "wrong-axes": lambda: MutantNet(WrongAxesBN(8)),
    "batch-stats-in-eval": lambda: MutantNet(BatchStatsInEvalBN(8)),
    "noisy-eval": lambda: MutantNet(NoisyEvalBN(8)),
    "eval-updating": lambda: MutantNet(EvalUpdatingBN(8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_audit_on_cuda_finds_what_it_finds_on_the_cpu(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    x = image_batch(16, seed=1)
    on_cpu = bncheck.audit(copy.deepcopy(model), x)
    on_cuda = bncheck.audit(model.to(CUDA), x.to(CUDA))
    assert on_cuda.complete
    assert verdicts(on_cuda) == verdicts(on_cpu)
    if name in ("healthy", "two-block", "hand-written"):
        assert on_cuda.filter(min_severity="warning") == []
    else:
        assert on_cuda.filter(min_severity="error") != []


def test_the_audit_leaves_no_trace_on_a_cuda_model_or_the_cuda_rng():
    torch.manual_seed(0)
    # a layer that draws from the global CUDA generator in eval mode
    model = MutantNet(NoisyEvalBN(8)).to(CUDA).train()
    x = image_batch(16).to(CUDA)
    torch.cuda.manual_seed(123)
    rng_before = torch.cuda.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = bncheck.audit(model, x)
    assert "eval-nondeterminism" in report.rules_found()
    assert torch.equal(torch.cuda.get_rng_state(), rng_before)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert {k: v.data_ptr() for k, v in after.items()} == pointers
    assert all(v.device.type == "cuda" for v in after.values())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_judged_within_their_precision(dtype):
    torch.manual_seed(0)
    x = image_batch(32, hw=16, seed=2).to(CUDA, dtype)
    healthy = trained(TwoBlock(), x.float().cpu()).to(CUDA, dtype)
    report = bncheck.audit(healthy, x)
    assert report.complete and report.filter(min_severity="warning") == []
    broken = MutantNet(WrongAxesBN(8)).to(CUDA, dtype)
    found = bncheck.audit(broken, x).filter(rules=["normalization"])
    assert [f.layer for f in found] == ["bn"]


def _train(model: nn.Module, steps: int, scale: float, amp: bool) -> bncheck.Report:
    """``steps`` SGD steps on inputs of standard deviation ``scale``, under autocast float16
    with a GradScaler when ``amp``; the Monitor's report."""
    gen = torch.Generator(device=CUDA).manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(CUDA.type, enabled=amp)
    with bncheck.Monitor(model, optimizer=opt, scaler=scaler if amp else None) as monitor:
        model.train()
        for _ in range(steps):
            x = scale * torch.randn(16, 3, 8, 8, device=CUDA, generator=gen)
            y = torch.randint(0, 2, (16,), device=CUDA, generator=gen)
            opt.zero_grad()
            with torch.autocast(CUDA.type, dtype=torch.float16, enabled=amp):
                x = x if amp else x.to(next(model.parameters()).dtype)
                loss = F.cross_entropy(model(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    return monitor.report()


class InputBN(nn.Module):
    """BN straight on the input (a normalisation layer at the stem), then conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(self.bn(x))).mean((2, 3)))


def test_amp_training_on_cuda_gets_no_warning():
    torch.manual_seed(0)
    report = _train(TwoBlock(c=8).to(CUDA), steps=6, scale=1.0, amp=True)
    assert report.complete
    assert report.filter(min_severity="warning") == []


def test_a_float16_running_var_that_overflows_is_found_and_amp_keeps_it_finite():
    # inputs of standard deviation 1000: a batch variance of about 1e6, above float16's
    # largest value (65504), so a float16 running_var becomes inf within a few steps
    torch.manual_seed(0)
    pure_half = InputBN().to(CUDA, torch.float16)
    report = _train(pure_half, steps=40, scale=1000.0, amp=False)
    assert not torch.isfinite(pure_half.bn.running_var).all()
    assert [f.layer for f in report.filter(rules=["nonfinite-stats"])] == ["bn"]
    audited = bncheck.audit(pure_half, image_batch(16).to(CUDA, torch.float16))
    assert "nonfinite-stats" in audited.rules_found()
    # the same data under autocast: the BN buffers stay float32 and finite
    torch.manual_seed(0)
    amp_model = InputBN().to(CUDA)
    report = _train(amp_model, steps=40, scale=1000.0, amp=True)
    assert torch.isfinite(amp_model.bn.running_var).all()
    assert report.filter(rules=["nonfinite-stats"]) == []


def test_recalibrate_on_cuda_repairs_nan_statistics_like_on_the_cpu():
    torch.manual_seed(0)
    model = trained(ConvBNReLU(), image_batch(16))
    model.bn.running_var[2] = float("nan")
    data = [torch.randn(16, 3, 8, 8, generator=seeded(i)) for i in range(4)]
    on_cpu = bncheck.recalibrate(copy.deepcopy(model), data)
    gpu_model = model.to(CUDA)
    kept = gpu_model.bn.running_var.clone()
    on_cuda = bncheck.recalibrate(gpu_model, [b.to(CUDA) for b in data])
    fixed = on_cuda.model.bn
    assert fixed.running_var.device.type == "cuda"
    assert torch.isfinite(fixed.running_var).all()
    torch.testing.assert_close(fixed.running_mean.cpu(), on_cpu.model.bn.running_mean)
    torch.testing.assert_close(fixed.running_var.cpu(), on_cpu.model.bn.running_var)
    assert torch.equal(gpu_model.bn.running_var.isnan(), kept.isnan())  # the input, untouched


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "amp"])
def test_monitored_steps_between_flushes_do_not_wait_for_the_gpu(amp):
    """A host synchronisation per step stalls a GPU training loop; the Monitor's per-step
    work stays on the device between its periodic flushes (the GradScaler's scale too)."""
    torch.manual_seed(0)
    model = TwoBlock().to(CUDA)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    x = torch.randn(16, 3, 8, 8, device=CUDA)
    y = torch.randint(0, 2, (16,), device=CUDA)

    def step() -> None:
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def without_sync(work):
        def run() -> None:
            torch.cuda.set_sync_debug_mode("error")
            try:
                work()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(work.__name__)

        return run

    checked: list[str] = []
    step()  # optimizer state and kernels exist before the checked steps
    monitor = bncheck.Monitor(
        model, optimizer=opt, scaler=scaler if amp else None, flush_every=1000, sync_every=1000
    )
    with monitor, warnings.catch_warnings():
        warnings.simplefilter("error", bncheck.BNCheckWarning)  # a failing hook raises
        step()
        step()
        if amp:  # GradScaler.step syncs by itself: check the Monitor's step work alone
            monitor._end_step = without_sync(monitor._end_step)
            monitor._before_step = without_sync(monitor._before_step)
            for _ in range(3):
                step()
            assert checked.count("_end_step") == 3
        else:
            torch.cuda.synchronize()
            without_sync(lambda: [step() for _ in range(3)])()
    assert monitor.report().complete

"""bn-reused's claim checked on the audit's own observations: one BN called at several places
blends different distributions only when its calls' batches really differ
(:func:`bncheck.checks.reuse.calls_differ`)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import observed

import bncheck
from bncheck import probes
from bncheck.checks.reuse import DIFFER_FRACTION, DIFFER_Z, calls_differ, pair_z


def observed_calls(model: nn.Module, x, layer: str, monkeypatch) -> list[probes.TrainCall]:
    obs = observed(model, x, monkeypatch, ["bn-reused"])
    return [c for c in obs.calls_of(layer) if c.training]


def recorded_calls(model: nn.Module, x, bn: nn.Module) -> list[SimpleNamespace]:
    """Each train-mode call of ``bn`` with the statistics ``calls_differ`` reads, including
    the variance over the batch of the per-sample channel means (``sample_var``)."""
    calls = []

    def hook(module, args):
        t = args[0].detach().double()
        per_sample = t.flatten(2).mean(2) if t.dim() > 2 else t
        dims = [0, *range(2, t.dim())]
        stats = SimpleNamespace(
            mean=t.mean(dims), var=t.var(dims, correction=0), sample_var=per_sample.var(0)
        )
        calls.append(SimpleNamespace(input_stats=stats, batch_size=t.shape[0]))

    handle = bn.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*x) if isinstance(x, tuple) else model(x)
    finally:
        handle.remove()
    return calls


class TwoViews(nn.Module):
    """A SimSiam-style model: one encoder on two augmented views of one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        v1 = x.flip(3)
        v2 = x * (1 + 0.1 * torch.randn(x.shape[0], 1, 1, 1, generator=gen))
        return self.bn(self.conv(v1)) - self.bn(self.conv(v2))


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.enc(a) - self.enc(b)).square().sum(1)


class Ghost(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 16), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bn(p) for p in self.fc(x).split(32)])


class TwoConvs(nn.Module):
    """The bn-reused page's example: one BN after two different convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        return torch.relu(self.bn(self.conv2(x)))


class Recurrent(nn.Module):
    """One BN across the time steps of a recurrent loop; the input's scale grows along the
    sequence (as a cumulative signal does), so each step has its own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rec, self.bn = nn.Linear(4, 16), nn.Linear(16, 16), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]):
            h = torch.tanh(self.bn(self.inp(x[:, t]) * (t + 1) + self.rec(h)))
        return h


@pytest.mark.parametrize(
    ("model", "x", "layer"),
    [
        (TwoViews(), torch.randn(32, 3, 8, 8), "bn"),
        (Siamese(), (torch.randn(64, 6), torch.randn(64, 6)), "enc.1"),
        (Ghost(), torch.randn(128, 6), "bn"),
    ],
    ids=["two-views", "siamese", "ghost-bn"],
)
def test_intended_reuse_sees_one_distribution(model, x, layer, monkeypatch):
    torch.manual_seed(0)
    calls = observed_calls(model, x, layer, monkeypatch)
    assert len(calls) >= 2
    assert calls_differ(calls) is False


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (TwoConvs(), torch.randn(32, 3, 8, 8)),
        (Recurrent(), torch.randn(64, 5, 4) + 2.0),
    ],
    ids=["two-convolutions", "rnn-time-steps"],
)
def test_harmful_reuse_sees_different_distributions(model, x):
    torch.manual_seed(0)
    assert calls_differ(recorded_calls(model, x, model.bn)) is True


@pytest.mark.parametrize(
    ("model", "x", "bn"),
    [
        (TwoViews(), torch.randn(32, 3, 8, 8), "bn"),
        (Siamese(), (torch.randn(64, 6), torch.randn(64, 6)), "enc.1"),
        (Ghost(), torch.randn(128, 6), "bn"),
    ],
    ids=["two-views", "siamese", "ghost-bn"],
)
def test_intended_reuse_is_one_distribution_with_the_exact_noise_too(model, x, bn):
    torch.manual_seed(0)
    assert calls_differ(recorded_calls(model, x, model.get_submodule(bn))) is False


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 64),
    st.integers(2, 64),
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.floats(-3, 3), min_size=4, max_size=4),
    st.lists(st.floats(0.01, 4), min_size=4, max_size=4),
)
def test_pair_z_is_the_two_sample_statistic(n_a, n_b, m_a, m_b, var):
    z = pair_z(m_a, var, n_a, m_b, var, n_b).numpy()
    v = np.array(var)
    expected = np.abs(np.subtract(m_a, m_b)) / np.sqrt(v / n_a + v / n_b)
    np.testing.assert_allclose(z, expected, rtol=1e-12)
    assert DIFFER_Z > 3 and 0 < DIFFER_FRACTION < 1


def _bn_reused(model: nn.Module, x) -> list[bncheck.Finding]:
    torch.manual_seed(0)
    return bncheck.audit(model, x, select=["bn-reused"]).filter(rules=["bn-reused"])


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (TwoViews(), torch.randn(32, 3, 8, 8)),
        (Siamese(), (torch.randn(64, 6), torch.randn(64, 6))),
        (Ghost(), torch.randn(128, 6)),
    ],
    ids=["two-views", "siamese", "ghost-bn"],
)
def test_audit_reports_intended_reuse_as_info_only(model, x):
    [finding] = _bn_reused(model, x)
    assert finding.severity == "info"
    assert finding.details["cause"] == "one-distribution"


class SameConvTwice(nn.Module):
    """One conv + BN applied again to its own output (a recurrent block): one producer, but
    the second call sees another scale, so the blend is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = torch.relu(self.bn(self.conv(x)))
        return x


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (TwoConvs(), torch.randn(32, 3, 8, 8)),
        (Recurrent(), torch.randn(64, 5, 4) + 2.0),
        (SameConvTwice(), torch.randn(4, 3, 6, 6)),
    ],
    ids=["two-convolutions", "rnn-time-steps", "same-conv-at-two-depths"],
)
def test_audit_keeps_warning_on_harmful_reuse(model, x):
    [finding] = _bn_reused(model, x)
    assert finding.severity == "warning"


@pytest.mark.parametrize("seed", range(8))
def test_a_small_batch_at_two_depths_is_never_taken_for_one_distribution(seed):
    """Sampling noise at batch 4 can hide a difference from the z-test alone: the effect-size
    condition keeps the warning whatever the seed."""
    torch.manual_seed(seed)
    model = SameConvTwice()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    [finding] = bncheck.audit(model, x, select=["bn-reused"]).filter(rules=["bn-reused"])
    assert finding.severity == "warning"


@pytest.mark.parametrize("seed", range(8))
def test_ghost_bn_on_small_chunks_is_one_distribution_whatever_the_seed(seed):
    """Four chunks of 32 rows: their variances differ by up to about 2x from sampling noise
    alone, which the noise-widened bounds accept."""
    torch.manual_seed(seed)
    model, x = Ghost(), torch.randn(128, 6)
    [finding] = bncheck.audit(model, x, select=["bn-reused"]).filter(rules=["bn-reused"])
    assert finding.severity == "info"

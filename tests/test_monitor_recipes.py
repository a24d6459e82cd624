"""Training recipes under the Monitor: intended ones stay quiet, the real problems are caught.

Each recipe is built here in a few lines, as its paper or the PyTorch example writes it:
two-view self-supervised training, a siamese encoder, ghost batch norm, the DCGAN
discriminator step, ``torch.optim.swa_utils.update_bn`` and AdaBN-style recalibration; and
their harmful twins: gradient accumulation, activation checkpointing, a validation pass in
train mode, one BN across the time steps of a recurrent loop.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint
from zoo import ConvBNReLU, CounterlessBN, TwoBlock

import bncheck
from bncheck.monitor_numerics import CallRecord, batches_differ, classify_updates


def multi(report: bncheck.Report) -> list[bncheck.Finding]:
    return report.filter(rules=["multiple-updates-per-step"])


def warnings_of(report: bncheck.Report) -> list[bncheck.Finding]:
    return [f for f in report.findings if f.severity is not bncheck.Severity.INFO]


class Encoder(nn.Module):
    def __init__(self, c: int = 8, d: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c, d, bias=False),
            nn.BatchNorm1d(d),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random flip and a small brightness jitter per sample (same images, another view)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5
    x = torch.where(flip, x.flip(3), x)
    return x * (1 + 0.1 * torch.randn(x.shape[0], 1, 1, 1, generator=gen))


# ---- intended: several calls per step trained by one backward ---------------------------------
@pytest.mark.parametrize("warn", [False, True])
def test_two_view_self_supervised_training_is_not_flagged(warn):
    """SimSiam: one encoder on two augmented views of a batch, one loss, one backward. With
    ``warn=True`` nothing is warned during training either: the repeated calls are held
    until their cause is classified (the views are), not warned at the first step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    encoder, predictor = Encoder(), nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    opt = torch.optim.SGD([*encoder.parameters(), *predictor.parameters()], lr=0.05)
    model = nn.ModuleDict({"encoder": encoder, "predictor": predictor})
    with warnings.catch_warnings(), bncheck.Monitor(model, optimizer=opt, warn=warn) as monitor:
        warnings.simplefilter("error", bncheck.BNCheckWarning)
        for _ in range(6):
            x = torch.randn(32, 3, 8, 8, generator=gen)
            z1, z2 = encoder(augment(x, gen)), encoder(augment(x, gen))
            p1, p2 = predictor(z1), predictor(z2)
            loss = -(
                F.cosine_similarity(p1, z2.detach()).mean()
                + F.cosine_similarity(p2, z1.detach()).mean()
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = monitor.report()
    assert multi(report) == []
    assert any("two views, ghost BN" in n for n in report.notes)


def test_siamese_encoder_on_pairs_is_not_flagged():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    encoder = Encoder()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.05)
    with bncheck.Monitor(encoder, optimizer=opt) as monitor:
        for _ in range(5):
            a, b = torch.randn(32, 3, 8, 8, generator=gen), torch.randn(32, 3, 8, 8, generator=gen)
            same = torch.randint(0, 2, (32,), generator=gen).float()
            dist = (encoder(a) - encoder(b)).square().sum(1)
            loss = (same * dist + (1 - same) * F.relu(2 - dist)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert multi(monitor.report()) == []


class GhostBN(nn.Module):
    """Ghost (virtual) batch norm as in TabNet: one BN applied to chunks of the batch."""

    def __init__(self, d: int, chunk: int) -> None:
        super().__init__()
        self.bn, self.chunk = nn.BatchNorm1d(d), chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.bn(part) for part in x.split(self.chunk)])


def test_ghost_batch_norm_is_not_flagged():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), GhostBN(16, chunk=32), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            x, y = torch.randn(128, 6, generator=gen), torch.randint(0, 2, (128,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert multi(monitor.report()) == []


# ---- intended: the DCGAN discriminator --------------------------------------------------------
def _dcgan_generator() -> nn.Module:
    """The DCGAN example's generator, scaled down: 8-dim noise to 3x8x8 images."""
    return nn.Sequential(
        nn.ConvTranspose2d(8, 16, 4, 1, 0, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.ConvTranspose2d(16, 3, 4, 2, 1, bias=False),
        nn.Tanh(),
    )


def dcgan_run(steps: int = 6, concatenated: bool = False) -> bncheck.Report:
    """The PyTorch DCGAN example's loop, scaled down: D sees a real and a fake batch per step
    (and the generator's step runs D once more on the fake batch). ``concatenated``: D sees
    one batch of real and fake samples per step, and the "real" samples come from a second
    generator's batch (one distribution: nothing tells the calls apart by their batches)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    net_g = _dcgan_generator()
    net_d = nn.Sequential(
        nn.Conv2d(3, 16, 4, 2, 1, bias=False),
        nn.LeakyReLU(0.2),
        nn.Conv2d(16, 32, 3, 1, 1, bias=False),
        nn.BatchNorm2d(32),
        nn.LeakyReLU(0.2),
        nn.Conv2d(32, 1, 4, 1, 0, bias=False),
        nn.Flatten(),
    )
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    loss = nn.BCEWithLogitsLoss()
    with bncheck.Monitor(net_d, optimizer=opt_d) as monitor:
        for _ in range(steps):
            real = torch.rand(32, 3, 8, 8, generator=gen) * 2 - 1
            ones, zeros = torch.ones(32, 1), torch.zeros(32, 1)
            net_d.zero_grad()
            if concatenated:
                with torch.no_grad():
                    real = net_g(torch.randn(32, 8, 1, 1, generator=gen))
                fake = net_g(torch.randn(32, 8, 1, 1, generator=gen))
                both = torch.cat([real, fake.detach()])
                loss(net_d(both), torch.cat([ones, zeros])).backward()
            else:
                loss(net_d(real), ones).backward()
                fake = net_g(torch.randn(32, 8, 1, 1, generator=gen))
                loss(net_d(fake.detach()), zeros).backward()
            opt_d.step()
            net_g.zero_grad()
            loss(net_d(fake), ones).backward()
            opt_g.step()
    return monitor.report()


def test_dcgan_discriminator_real_and_fake_batches_are_at_most_info():
    report = dcgan_run()
    assert warnings_of(report) == []
    found = multi(report)
    assert found, "the blend of real and fake statistics is still said, at info"
    assert {f.severity for f in found} == {bncheck.Severity.INFO}
    assert found[0].details["cause"] == "sources"
    assert "GAN discriminator" in found[0].message


def test_a_discriminator_also_run_in_the_generators_step_is_info_whatever_its_batches():
    # one call in D's own step and one in G's: the batches alone cannot tell this from
    # gradient accumulation; G's optimizer stepping between the two calls does
    report = dcgan_run(concatenated=True)
    assert warnings_of(report) == []
    found = multi(report)
    assert [f.severity for f in found] == [bncheck.Severity.INFO]
    assert found[0].details["cause"] == "other-step"
    assert "another optimizer's step" in found[0].message


def _generator_run(
    critic_steps: int = 1, validate_at: int | None = None, steps: int = 5
) -> bncheck.Report:
    """A GAN loop watched from the generator's side: D's fakes are made under no_grad with
    G in train mode (``critic_steps`` D steps per G step, as WGAN's n_critic), then G's own
    step makes fakes with grad. ``validate_at``: after that G step, a validation pass of G
    in train mode under no_grad (the bug), with no other optimizer step after it."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    net_g = _dcgan_generator()
    net_d = nn.Sequential(
        nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(1)
    )
    net_d(torch.zeros(1, 3, 8, 8))
    opt_d = torch.optim.Adam(net_d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    with bncheck.Monitor(net_g, optimizer=opt_g) as monitor:
        net_g.train()
        for step in range(steps):
            for _ in range(critic_steps):
                real = torch.rand(16, 3, 8, 8, generator=gen) * 2 - 1
                with torch.no_grad():
                    fake = net_g(torch.randn(16, 8, 1, 1, generator=gen))
                opt_d.zero_grad()
                (net_d(fake).mean() - net_d(real).mean()).backward()
                opt_d.step()
            opt_g.zero_grad()
            (-net_d(net_g(torch.randn(16, 8, 1, 1, generator=gen))).mean()).backward()
            opt_g.step()
            if step == validate_at:
                with torch.no_grad():  # BUG: G still in train mode
                    net_g(torch.randn(64, 8, 1, 1, generator=gen))
    return monitor.report()


@pytest.mark.parametrize("critic_steps", [1, 5])
def test_a_generator_making_the_discriminators_fakes_under_no_grad_is_not_validation(
    critic_steps,
):
    report = _generator_run(critic_steps)
    assert report.filter(rules=["stats-updated-without-grad"]) == []
    assert multi(report) == []  # those forwards are not training updates either
    [note] = [n for n in report.notes if "GAN generator" in n]
    assert "at 5 step(s) (1, 2, 3, 4, 5)" in note


def test_validation_in_train_mode_is_still_found_in_a_gan_loop():
    # the same loop with a validation pass of G in train mode after step 3's G step: no
    # other optimizer steps before G's next forward with grad
    [finding] = _generator_run(validate_at=2).filter(rules=["stats-updated-without-grad"])
    assert finding.layer == "1" and finding.details["step"] == 4
    assert finding.details["updates_without_grad"] == 1


def _head_and_body(
    steps: int, micro_batches: int, size: int, validate_at: int | None = None
) -> bncheck.Report:
    """TwoBlock trained by two optimizers that step one after the other at the end of each
    iteration (the head's, then the watched body's), after ``micro_batches`` forward/backward
    pairs on batches of ``size``; ``validate_at``: after that iteration, a forward in train
    mode under no_grad (validation without model.eval())."""
    torch.manual_seed(0)
    model = TwoBlock()
    head = torch.optim.SGD(model.head.parameters(), lr=0.01)
    body = torch.optim.SGD([p for n, p in model.named_parameters() if "head" not in n], lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with bncheck.Monitor(model, optimizer=body) as monitor:
        for i in range(steps):
            for _ in range(micro_batches):
                x = torch.randn(size, 3, 6, 6, generator=gen)
                y = torch.randint(0, 2, (size,), generator=gen)
                F.cross_entropy(model(x), y).backward()
            head.step()
            body.step()
            head.zero_grad()
            body.zero_grad()
            if i == validate_at:
                with torch.no_grad():
                    model(torch.randn(size, 3, 6, 6, generator=gen))
    return monitor.report()


def test_validation_before_another_optimizers_step_is_still_validation():
    # two optimizers (head, then the watched body) stepping at the end of each iteration,
    # and a validation pass in train mode between iterations: the next iteration's forward
    # with grad comes before the head's step, so the validation did not feed that step
    report = _head_and_body(steps=4, micro_batches=1, size=8, validate_at=1)
    found = report.filter(rules=["stats-updated-without-grad"])
    assert [f.layer for f in found] == ["block1.1", "block2.1"]
    assert {f.details["step"] for f in found} == {3}
    assert not [n for n in report.notes if "GAN generator" in n]


def test_an_optimizer_stepping_after_the_watched_step_marks_nothing_of_the_step_before():
    # a validation forward in train mode right before the watched optimizer's step, then
    # another optimizer's step: the step was closed in between, so the mark has nothing to
    # point at (no error), and the validation is still flagged
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model, other = ConvBNReLU(), nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 3, 8, 8, generator=gen)).square().mean().backward()
            with torch.no_grad():  # BUG: validation in train mode
                model(torch.randn(8, 3, 8, 8, generator=gen))
            opt.step()
            other(torch.randn(2, 4, generator=gen)).sum().backward()
            other_opt.step()
    report = monitor.report()
    assert not any("stopped watching" in n for n in report.notes)
    [finding] = report.filter(rules=["stats-updated-without-grad"])
    assert finding.details["step"] == 1


def test_an_optimizer_stepped_inside_the_watched_ones_step_is_not_another_network():
    # a Lookahead-style wrapper steps its base optimizer inside its own step: a forward
    # without grad in train mode just before that step is still validation
    class Lookahead(torch.optim.Optimizer):
        def __init__(self, base: torch.optim.Optimizer) -> None:
            self.base = base
            super().__init__(base.param_groups[0]["params"], {"lr": base.defaults["lr"]})
            self.param_groups = base.param_groups

        def step(self, closure=None):  # type: ignore[override]
            return self.base.step(closure)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    wrapper = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    with bncheck.Monitor(model, optimizer=wrapper) as monitor:
        for _ in range(4):
            wrapper.zero_grad()
            x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 2, (32,), generator=gen)
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():  # BUG: validation in train mode, right before the step
                model(torch.randn(32, 8, generator=gen))
            wrapper.step()
    [finding] = monitor.report().filter(rules=["stats-updated-without-grad"])
    assert finding.details["step"] == 1


def test_a_gan_module_holding_both_networks_recognises_the_generators_fakes():
    # the Monitor watches one module holding G and D (D with BN too): D's forward with grad
    # before D's step does not make G's forward without grad look like validation
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Sequential(
                nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
            )
            self.d = nn.Sequential(
                nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1)
            )

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    pair = Pair()
    opt_g = torch.optim.SGD(pair.g.parameters(), lr=0.01)
    opt_d = torch.optim.SGD(pair.d.parameters(), lr=0.01)
    with bncheck.Monitor(pair, optimizer=opt_g) as monitor:
        pair.train()
        for _ in range(4):
            with torch.no_grad():
                fake = pair.g(torch.randn(16, 8, generator=gen))
            opt_d.zero_grad()
            (pair.d(fake).mean() - pair.d(torch.randn(16, 4, generator=gen)).mean()).backward()
            opt_d.step()
            opt_g.zero_grad()
            (-pair.d(pair.g(torch.randn(16, 8, generator=gen))).mean()).backward()
            opt_g.step()
    report = monitor.report()
    assert [f.layer for f in report.filter(rules=["stats-updated-without-grad"])] == []
    assert any("GAN generator" in n for n in report.notes)


def assert_accumulation(report: bncheck.Report) -> None:
    """Both BN layers of TwoBlock warned of, for gradient accumulation (of micro-batches too
    small for BN: large ones are info)."""
    found = multi(report)
    assert [f.layer for f in found] == ["block1.1", "block2.1"]
    assert {f.details["cause"] for f in found} == {"accumulation"}
    assert {f.severity for f in found} == {bncheck.Severity.WARNING}


def test_accumulation_beside_an_optimizer_stepping_per_micro_batch_is_still_accumulation():
    # another network's optimizer steps between the micro-batches; the watched network's
    # gradients add up all the while (no zero_grad between its calls)
    torch.manual_seed(0)
    model, aux = TwoBlock(), nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux_opt = torch.optim.SGD(aux.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(6):
            for _ in range(4):
                x = torch.randn(4, 3, 6, 6, generator=gen)
                y = torch.randint(0, 2, (4,), generator=gen)
                (F.cross_entropy(model(x), y) / 4).backward()
                aux(torch.randn(2, 4, generator=gen)).sum().backward()
                aux_opt.step()
                aux_opt.zero_grad()
            opt.step()
            opt.zero_grad()
    assert_accumulation(monitor.report())


def test_accumulation_beside_a_second_optimizer_is_still_accumulation():
    # two optimizers stepping one after the other at the end of each iteration (backbone
    # and head): the other one's step is not between the watched network's calls
    assert_accumulation(_head_and_body(steps=5, micro_batches=2, size=4))


def _accumulate(micro: int, warn: bool = False, **tolerances: float) -> bncheck.Report:
    """Gradient accumulation of 4 micro-batches of ``micro`` samples per optimizer step."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt, warn=warn, **tolerances) as monitor:
        for i in range(16):
            x = torch.randn(micro, 3, 8, 8, generator=gen)
            y = torch.randint(0, 4, (micro,), generator=gen)
            (F.cross_entropy(model(x), y) / 4).backward()
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    return monitor.report()


def test_accumulation_of_micro_batches_large_enough_for_bn_is_info():
    # BN-10's harm is small micro-batches (BN-09): at a size small-batch does not flag, BN's
    # statistics are reliable and the accumulation costs it nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", bncheck.BNCheckWarning)
        report = _accumulate(16, warn=True)
    assert warnings_of(report) == []
    [finding] = multi(report)
    assert finding.severity is bncheck.Severity.INFO
    assert finding.details["cause"] == "accumulation"
    assert finding.details["batch_size"] == 16
    assert "micro-batches of 16 samples give it reliable statistics" in finding.message
    assert "nothing to fix at this micro-batch size" in finding.message


def test_large_micro_batches_follow_small_batchs_tolerances():
    # the same run judged with min_batch_size=32 (or 2048 values per channel): a warning
    for tolerances in ({"min_batch_size": 32}, {"min_samples_per_channel": 2048}):
        [finding] = multi(_accumulate(16, **tolerances))
        assert finding.severity is bncheck.Severity.WARNING, tolerances
        assert "reliable" not in finding.message


def test_large_micro_batches_are_judged_over_the_whole_run():
    # micro-batches of 32 in the first step, then of 4 (token-budget batching): small-batch
    # flags the later steps, so the accumulation is not called harmless
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for step in range(4):
            micro = 32 if step == 0 else 4
            for _ in range(2):
                x = torch.randn(micro, 3, 8, 8, generator=gen)
                y = torch.randint(0, 4, (micro,), generator=gen)
                (F.cross_entropy(model(x), y) / 2).backward()
            opt.step()
            opt.zero_grad()
    report = monitor.report()
    [finding] = multi(report)
    assert finding.severity is bncheck.Severity.WARNING
    assert report.filter(rules=["small-batch"])


def _sam_like(
    second_momentum: float | None = None,
    steps: int = 5,
    model: nn.Module | None = None,
    rho: float = 0.05,
) -> bncheck.Report:
    """SAM's two passes on one batch per step (batch 32): the gradient at the weights moved
    along the first pass's gradient (by ``rho``), then the step. ``second_momentum``: the BN
    momentum during the second pass (SAM's ``disable_running_stats`` sets 0)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4)
    model = ConvBNReLU() if model is None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(steps):
            x = torch.randn(32, 3, 8, 8, generator=gen)
            y = torch.randint(0, 4, (32,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            moved = []
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        e = rho * p.grad / (p.grad.norm() + 1e-12)
                        p.add_(e)
                        moved.append((p, e))
            opt.zero_grad()
            if second_momentum is not None:
                for bn in bns:
                    bn.momentum = second_momentum
            F.cross_entropy(model(x), y).backward()
            for bn in bns:
                bn.momentum = 0.1
            with torch.no_grad():
                for p, e in moved:
                    p.sub_(e)
            opt.step()
    return monitor.report()


def test_sams_second_pass_on_the_same_batch_is_a_repeat_not_accumulation():
    [finding] = multi(_sam_like())
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["cause"] == "repeat"
    assert "disable_running_stats" in finding.message
    # with the running statistics left alone in the second pass: nothing to report
    assert multi(_sam_like(second_momentum=0.0)) == []


def test_a_buffer_refilled_in_place_is_another_batch_even_when_weights_move():
    # a loader writes each micro-batch into one preallocated tensor (copy_: its version
    # counter moves), and the loop clamps a weight in place between micro-batches: the same
    # object at moved weights, but another batch, so accumulation, not a repeat
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    buffer = torch.empty(16, 3, 8, 8)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for i in range(12):
            buffer.copy_(torch.randn(16, 3, 8, 8, generator=gen))
            y = torch.randint(0, 4, (16,), generator=gen)
            (F.cross_entropy(model(buffer), y) / 4).backward()
            with torch.no_grad():
                model.conv.weight.clamp_(-1.0, 1.0)
            if (i + 1) % 4 == 0:
                opt.step()
                opt.zero_grad()
    [finding] = multi(monitor.report())
    assert finding.details["cause"] == "accumulation"


class _CoordDecoder(nn.Module):
    """A decoder called as model(grid, z): a fixed coordinate grid first, the data second."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(2 + 8, 16, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, grid: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        n, (h, w) = z.shape[0], grid.shape[-2:]
        x = torch.cat([grid.expand(n, -1, -1, -1), z[:, :, None, None].expand(-1, -1, h, w)], 1)
        return self.out(torch.relu(self.bn(self.inp(x))))


class _Jitter(nn.Module):
    """Augmentation inside the model: each call makes another view of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.3 * torch.randn(x.shape[0], 1, 1, 1)) + 0.3 * torch.randn(
            x.shape[0], x.shape[1], 1, 1
        )


@pytest.mark.parametrize(
    "case", ["fixed first argument", "views made inside", "data refill", "fixed batch"]
)
def test_the_same_input_object_at_the_same_weights_is_not_a_repeat(case):
    # the same tensor object reaches the model several times in a step, at weights no one
    # moved in between: a fixed grid beside new latents, augmentation inside the model (one
    # backward per view), a loader refilling one buffer behind the version counter (through
    # .data), one fixed batch accumulated (an overfitting check); the statistics see
    # batches of one distribution, as accumulation
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(8)
    if case == "fixed first argument":
        model: nn.Module = _CoordDecoder()
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
        grid = torch.stack([xs, ys])[None]
    else:
        model = (
            nn.Sequential(_Jitter(), ConvBNReLU()) if case == "views made inside" else ConvBNReLU()
        )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    buffer = torch.empty(16, 3, 8, 8)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            x = torch.randn(16, 3, 8, 8, generator=gen)
            for _ in range(3):
                if case == "fixed first argument":
                    out = model(grid, torch.randn(16, 8, generator=gen)).square().mean()
                elif case in ("views made inside", "fixed batch"):
                    out = model(x).square().mean()
                else:
                    buffer.data.copy_(torch.randn(16, 3, 8, 8, generator=gen))
                    out = model(buffer).square().mean()
                (out / 3).backward()
            opt.step()
            opt.zero_grad()
    causes = {f.details.get("cause") for f in multi(monitor.report())}
    assert "repeat" not in causes and causes <= {"accumulation"}


def test_an_input_made_under_inference_mode_is_watched_without_error():
    # uint8 images made under inference_mode (a loader's decode step), turned into floats by
    # the model: an inference tensor has no version counter to read
    class FromBytes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = ConvBNReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float() / 255)

    torch.manual_seed(0)
    model = FromBytes()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(4):
            for _ in range(2):
                with torch.inference_mode():
                    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
                (model(x).square().mean() / 2).backward()
            opt.step()
            opt.zero_grad()
    report = monitor.report()
    assert not any("stopped watching" in n for n in report.notes)
    assert [f.details["cause"] for f in multi(report)] == ["accumulation"]


def test_a_short_last_batch_of_each_epoch_leaves_large_micro_batches_info():
    # accumulation of 4 micro-batches of 32, the epoch's last micro-batch of 4: small-batch
    # reports that batch (drop_last), the accumulation itself stays info
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(9)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(2):  # epochs of 6 steps
            sizes = [32] * 23 + [4]
            for i, n in enumerate(sizes):
                x, y = (
                    torch.randn(n, 3, 8, 8, generator=gen),
                    torch.randint(0, 4, (n,), generator=gen),
                )
                (F.cross_entropy(model(x), y) / 4).backward()
                if (i + 1) % 4 == 0:
                    opt.step()
                    opt.zero_grad()
    report = monitor.report()
    [finding] = multi(report)
    assert finding.severity is bncheck.Severity.INFO
    [small] = report.filter(rules=["small-batch"])
    assert "drop_last=True" in small.message


def test_sam_is_a_repeat_without_affine_bn_and_in_every_layer_of_a_deep_net():
    # BN without gamma/beta (affine=False): the optimizer's weights tell they moved; a deep
    # net at a large rho: the deep layers' batches differ (they see the moved weights), and
    # are not taken for two sources
    [found] = multi(_sam_like(model=ConvBNReLU(affine=False)))
    assert found.details["cause"] == "repeat"
    deep = nn.Sequential(
        *[
            nn.Sequential(
                nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False),
                nn.BatchNorm2d(8),
                nn.ReLU(),
            )
            for i in range(6)
        ],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    found = multi(_sam_like(model=deep, rho=2.0))
    assert len(found) == 6 and {f.details["cause"] for f in found} == {"repeat"}


def test_an_lbfgs_closure_evaluated_several_times_is_a_repeat():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = ConvBNReLU()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            x = torch.randn(16, 3, 8, 8, generator=gen)
            y = torch.randint(0, 4, (16,), generator=gen)

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    [finding] = multi(monitor.report())
    assert finding.details["cause"] == "repeat"


def test_separate_forwards_of_two_sources_are_told_to_run_as_one():
    # FixMatch/DANN with one forward per source and one loss: the statistics of the
    # labeled and the (differently distributed) unlabeled batches are blended
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            labeled = torch.randn(16, 3, 8, 8, generator=gen)
            unlabeled = torch.randn(32, 3, 8, 8, generator=gen) * 2 + 1
            y = torch.randint(0, 4, (16,), generator=gen)
            loss = F.cross_entropy(model(labeled), y) + model(unlabeled).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    [finding] = multi(monitor.report())
    assert finding.details["cause"] == "reused"
    assert "labeled and unlabeled" in finding.message
    assert "one concatenated forward" in finding.message


# ---- intended: recalibration passes -----------------------------------------------------------
def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_swa_update_bn_is_a_recalibration_not_a_validation_leak():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train_steps(model, opt, 3)
        torch.optim.swa_utils.update_bn(loader, model)
        train_steps(model, opt, 2, seed=1)
        torch.optim.swa_utils.update_bn(loader, model)  # after the last step, too
    report = monitor.report()
    assert report.filter(rules=["stats-updated-without-grad"]) == []
    assert multi(report) == []
    assert any("recalibration" in n and "update_bn" in n for n in report.notes)


def test_adabn_recalibration_with_only_bn_in_train_mode_is_not_flagged():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(3):
            model(torch.randn(8, 3, 6, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 6, 6) + 1.0)  # target-domain data
    assert monitor.report().filter(rules=["stats-updated-without-grad"]) == []


def _precise_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """PreciseBN as fvcore's update_bn_stats does it (detectron2's PreciseBN hook): momentum
    1 for the pass, so each batch replaces the statistics, averaged by hand, then assigned."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    kept = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 1.0
    means = [torch.zeros_like(m.running_mean) for m in layers]
    variances = [torch.zeros_like(m.running_var) for m in layers]
    with torch.no_grad():
        for i, x in enumerate(batches):
            model(x)
            for j, m in enumerate(layers):
                means[j] += (m.running_mean - means[j]) / (i + 1)
                variances[j] += (m.running_var - variances[j]) / (i + 1)
    for m, mean, var, momentum in zip(layers, means, variances, kept):
        m.running_mean, m.running_var, m.momentum = mean, var, momentum


def test_fvcores_precise_bn_is_a_recalibration_not_a_validation_leak():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train_steps(model, opt, 3)
        _precise_bn(model, calibration)
        train_steps(model, opt, 2, seed=1)
    report = monitor.report()
    assert report.filter(rules=["stats-updated-without-grad"]) == []
    assert any("recalibration" in n and "PreciseBN" in n for n in report.notes)


def test_a_layer_trained_at_momentum_1_still_has_its_validation_flagged():
    # momentum 1 on purpose (statistics of the last batch only): a validation pass in train
    # mode under no_grad is not taken for PreciseBN
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train_steps(model, opt, 3)
        with torch.no_grad():  # BUG: validation without model.eval()
            model(torch.randn(16, 3, 8, 8))
        train_steps(model, opt, 2, seed=1)
    [finding] = monitor.report().filter(rules=["stats-updated-without-grad"])
    assert finding.details["step"] == 4


def test_validation_in_train_mode_is_still_found_next_to_update_bn():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train_steps(model, opt, 3)
        torch.optim.swa_utils.update_bn([torch.randn(16, 3, 8, 8)], model)
        train_steps(model, opt, 2, seed=1)
        with torch.no_grad():  # BUG: validation without model.eval()
            model(torch.randn(16, 3, 8, 8))
    [finding] = monitor.report().filter(rules=["stats-updated-without-grad"])
    assert finding.details["step"] == 6


# ---- harmful: caught, with the cause --------------------------------------------------------
@pytest.mark.parametrize("warn", [False, True])
def test_gradient_accumulation_is_found_as_accumulation(warn):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bncheck.BNCheckWarning)
        with bncheck.Monitor(model, optimizer=opt, warn=warn) as monitor:
            for i in range(16):
                x = torch.randn(4, 3, 8, 8, generator=gen)
                y = torch.randint(0, 4, (4,), generator=gen)
                (F.cross_entropy(model(x), y) / 4).backward()
                if (i + 1) % 4 == 0:
                    opt.step()
                    opt.zero_grad()
                    if warn and i == 7:  # warned at the step after the first, with its cause
                        said = [str(w.message) for w in caught]
                        said = [m for m in said if "multiple-updates-per-step" in m]
                        assert len(said) == 1 and "micro-batches" in said[0]
    [finding] = multi(monitor.report())
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["cause"] == "accumulation"
    assert finding.details["updates"] == 4
    assert "micro-batches" in finding.message


def test_a_count_that_grows_after_the_first_step_is_given_as_a_range():
    """Accumulation over 2 micro-batches at the first step, 3 afterwards: the finding gives
    both, not only the first step's count."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for micro in (2, 3, 3, 3):
            for _ in range(micro):
                x = torch.randn(8, 3, 8, 8, generator=gen)
                y = torch.randint(0, 4, (8,), generator=gen)
                (F.cross_entropy(model(x), y) / micro).backward()
            opt.step()
            opt.zero_grad()
    [finding] = multi(monitor.report())
    assert finding.details["updates"] == 2 and finding.details["max_updates"] == 3
    assert finding.message.startswith("bn (BatchNorm2d): 2 to 3 running-statistics updates")


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc, self.reentrant = nn.Linear(8, 2), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_found_as_recomputation(reentrant: bool):
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(3):
            x = torch.randn(8, 3, 8, 8, requires_grad=reentrant)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
            opt.step()
    report = monitor.report()
    [finding] = multi(report)
    assert finding.details["cause"] == "recompute" and finding.details["updates"] == 2
    assert "checkpointing" in finding.message
    # reentrant checkpointing runs the first forward under no_grad: not a validation pass
    assert report.filter(rules=["stats-updated-without-grad"]) == []


def test_validation_in_train_mode_with_grad_is_found_as_an_extra_forward():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            x = torch.randn(16, 3, 8, 8, generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=gen)).backward()
            opt.step()
            val_loss = F.cross_entropy(model(x + 3.0), torch.randint(0, 4, (16,)))  # BUG
            del val_loss
    [finding] = multi(monitor.report())
    assert finding.details["cause"] == "extra"
    assert finding.severity is bncheck.Severity.WARNING


def test_a_validation_pass_in_train_mode_every_few_steps_is_named_in_the_hint():
    # every 10 steps, a validation loss with grad on and the model left in train mode: the
    # steps recorded in detail after the first one do not repeat it, so its cause is not
    # classified; the hint names what few such steps most likely are, and the fix
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for step in range(1, 31):
            x = torch.randn(16, 3, 8, 8, generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 4, (16,), generator=gen)).backward()
            opt.step()
            if step % 10 == 0:
                F.cross_entropy(model(x + 3.0), torch.randint(0, 4, (16,))).item()  # BUG
    [finding] = multi(monitor.report())
    assert finding.severity is bncheck.Severity.WARNING
    assert finding.details["cause"] is None
    assert "at a few steps only" in finding.message
    assert "call model.eval() for it" in finding.message


def test_updates_piled_up_at_the_first_steps_name_amp_skips_first():
    # a GradScaler skips the optimizer step at the first iterations (its initial scale
    # overflows), emulated by not stepping at iterations 1-4 (the Monitor was not given
    # scaler=): the first step sees five updates, and the hint names the likeliest cause
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for it in range(1, 31):
            opt.zero_grad()
            x, y = (
                torch.randn(16, 3, 8, 8, generator=gen),
                torch.randint(0, 4, (16,), generator=gen),
            )
            F.cross_entropy(model(x), y).backward()
            if it > 4:
                opt.step()
    [finding] = multi(monitor.report())
    assert finding.details["updates"] == 5 and finding.details["step"] == 1
    assert "at the run's first steps only: with AMP" in finding.message
    assert "scaler=" in finding.message


class RecurrentBN(nn.Module):
    """One BN applied at every time step of a recurrent loop (the hidden state's statistics
    change from step to step)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp, self.rec = nn.Linear(4, d), nn.Linear(d, d, bias=False)
        self.bn = nn.BatchNorm1d(d)
        self.out = nn.Linear(d, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.rec.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.bn(self.inp(x[:, t]) * (t + 1) + self.rec(h)))
        return self.out(h)


def test_one_bn_across_rnn_time_steps_is_found_as_reused():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    model = RecurrentBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            x = torch.randn(64, 4, 4, generator=gen) + 1.0
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 2, (64,), generator=gen)).backward()
            opt.step()
    [finding] = multi(monitor.report())
    assert finding.details["cause"] == "reused"
    assert finding.severity is bncheck.Severity.WARNING


def test_multi_crop_training_is_told_apart_by_its_sizes_with_its_fix():
    """DINO/SwAV: global and local crops of other sizes through the whole encoder, one
    backward; the local crops' statistics differ (here: brighter). The blend is real (the
    same holds for pyramid levels or domains at other sizes), so it stays a warning, whose
    hint gives multi-crop training its fix: recompute at the evaluation size."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    encoder = Encoder()
    opt = torch.optim.SGD(encoder.parameters(), lr=0.05)
    with bncheck.Monitor(encoder, optimizer=opt) as monitor:
        for _ in range(5):
            x = torch.randn(32, 3, 16, 16, generator=gen)
            big = encoder(torch.cat([augment(x, gen), augment(x, gen)]))
            small = encoder(x[:, :, 4:12, 4:12] * 2 + 1.5)
            loss = -F.cosine_similarity(big[:32].detach(), small).mean() - big.var(0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    found = multi(monitor.report())
    assert found and {f.details["cause"] for f in found} == {"sizes"}
    assert "multi-crop" in found[0].message and "evaluation size" in found[0].message


class SharedHead(nn.Module):
    """Two feature levels (8x8 and 4x4) and one conv-BN head shared by both (an FPN head
    with one BN for all levels)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = torch.relu(self.stem(x))
        p2 = self.down(p1) * 3 + 2  # a level with other statistics
        outs = [self.head(p).mean((2, 3)) for p in (p1, p2)]
        return self.fc(outs[0] + outs[1])


@pytest.mark.parametrize("stem_in_eval", [False, True])
def test_one_bn_shared_by_the_levels_of_a_pyramid_is_a_warning(stem_in_eval):
    # with the layers before the head in train mode or kept in eval (norm_eval)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    model = SharedHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(5):
            model.train()
            if stem_in_eval:
                model.stem[1].eval()
            x = torch.randn(16, 3, 8, 8, generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 2, (16,), generator=gen)).backward()
            opt.step()
    [finding] = multi(monitor.report())
    assert finding.layer == "head.1" and finding.details["cause"] == "sizes"
    assert finding.severity is bncheck.Severity.WARNING
    assert "pyramid levels" in finding.message


# ---- the classification on its own ------------------------------------------------------------
def call(seq: int, back: int | None, mean: float = 0.0, n: int = 32, **kw) -> CallRecord:
    return CallRecord(
        seq,
        n,
        torch.full((4,), mean),
        torch.ones(4),
        hookable=True,
        in_backward=kw.get("in_backward", False),
        backward_seq=back,
        grad_left=kw.get("grad_left", torch.tensor(1.0)),
    )


def test_classify_updates_by_the_order_of_forwards_and_backwards():
    assert classify_updates([call(0, 1)]) is None
    assert classify_updates([call(0, 1), call(2, 3)]) == "accumulation"
    assert classify_updates([call(0, 1), call(2, 3, mean=5.0)]) == "sources"
    assert classify_updates([call(0, 3), call(1, 2)]) == "views"
    assert classify_updates([call(0, 3), call(1, 2, mean=5.0)]) == "reused"
    assert classify_updates([call(0, 1), call(2, None)]) == "extra"
    # another optimizer stepped (at seq 2) between the calls, and the layer's gradients were
    # cleared (None, or zeros) before the next: the first call was the other network's step
    for cleared in (None, torch.tensor(0.0)):
        calls = [call(0, 1), call(3, 4, grad_left=cleared)]
        assert classify_updates(calls, others=[2]) == "other-step"
    # ... not cleared (accumulation beside an optimizer stepping on its own), or no gradient
    # to tell by, or the other step before or after the calls
    assert classify_updates([call(0, 1), call(3, 4)], others=[2]) == "accumulation"
    assert classify_updates([call(0, 1), call(3, 4, grad_left=False)], others=[2]) == (
        "accumulation"
    )
    assert classify_updates([call(1, 2), call(3, 4, grad_left=None)], others=[0, 5]) == (
        "accumulation"
    )
    # the network's own step after the other one has two calls: those are the finding
    own = [call(0, 1), call(3, 4, grad_left=None), call(5, 6, mean=5.0)]
    assert classify_updates(own, others=[2]) == "sources"
    assert classify_updates([call(0, 1), call(2, None, in_backward=True)]) == "recompute"
    # a step that ends at the forward (no optimizer): the calls share one backward
    assert classify_updates([call(0, None), call(1, None)], backward_seen=False) == "views"


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 64),
    st.integers(2, 64),
    st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    st.lists(st.floats(-3, 3), min_size=3, max_size=3),
    st.lists(st.floats(0.01, 4), min_size=3, max_size=3),
)
def test_batches_differ_matches_a_per_channel_two_sample_test(n_a, n_b, m_a, m_b, var):
    a = CallRecord(0, n_a, torch.tensor(m_a), torch.tensor(var), True, False)
    b = CallRecord(1, n_b, torch.tensor(m_b), torch.tensor(var), True, False)
    z = np.abs(np.subtract(m_a, m_b)) / np.sqrt(np.array(var) / n_a + np.array(var) / n_b)
    assert batches_differ(a, b) == bool(np.mean(z > 4.0) >= 0.25)


# ---- recipes the Monitor once misjudged ---------------------------------------------------------
class Momentum(nn.Module):
    """MoCo's layout: a key encoder inside the trained module, a copy of the query encoder
    with requires_grad=False, moved towards it by a parameter EMA inside forward and run in
    train mode under no_grad (``update=False``: the copy is never moved, a frozen encoder
    left in train mode)."""

    def __init__(self, update: bool = True) -> None:
        super().__init__()
        self.encoder_q = Encoder()
        self.encoder_k = Encoder()
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.update = update

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            if self.update:
                for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                    pk.data.mul_(0.9).add_(pq.data, alpha=0.1)
            k = F.normalize(self.encoder_k(im_k), dim=1)
        return F.cross_entropy(q @ k.t() / 0.2, torch.arange(q.shape[0]))


def momentum_run(update: bool, warn: bool = False, steps: int = 4):
    torch.manual_seed(0)
    model = Momentum(update).train()
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    with _recorded() as caught, bncheck.Monitor(model, optimizer=opt, warn=warn) as monitor:
        for _ in range(steps):
            x = torch.randn(32, 3, 8, 8, generator=gen)
            loss = model(augment(x, gen), augment(x, gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return monitor.report(), [w for w in caught if issubclass(w.category, bncheck.BNCheckWarning)]


def _recorded():
    class Recorded(warnings.catch_warnings):
        def __enter__(self):  # type: ignore[override]
            caught = super().__enter__()
            warnings.simplefilter("always")
            return caught

    return Recorded(record=True)


FROZEN_RULES = ["frozen-bn-drift", "frozen-bn-in-train-mode", "stats-updated-without-grad"]


@pytest.mark.parametrize("warn", [False, True])
def test_momentum_encoder_inside_the_model_is_not_a_frozen_bn(warn):
    report, warned = momentum_run(update=True, warn=warn)
    assert report.filter(rules=FROZEN_RULES) == []
    assert warnings_of(report) == []
    assert warned == []  # not even at step 1, before the copy had moved
    assert any("moving-average copy" in n and "encoder_k." in n for n in report.notes)


@pytest.mark.parametrize("warn", [False, True])
def test_a_copy_that_never_moves_is_still_a_frozen_bn_in_train_mode(warn):
    report, warned = momentum_run(update=False, warn=warn)
    drift = report.filter(rules=["frozen-bn-drift"])
    assert {f.layer for f in drift} == {"encoder_k.net.1", "encoder_k.net.6"}
    assert all(f.details["step"] == 1 for f in drift)
    assert report.filter(rules=["frozen-bn-in-train-mode"])
    assert not any("moving-average copy" in n for n in report.notes)
    if warn:  # told one step later than the problem began, once the copy was seen static
        assert any("frozen-bn-drift" in str(w.message) for w in warned)


def test_byol_target_moved_after_the_optimizer_step_is_not_a_frozen_bn():
    """BYOL: the target network is a submodule, moved by EMA after each optimizer step."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"online": Encoder(), "target": Encoder()})
    model["target"].load_state_dict(model["online"].state_dict())
    model["target"].requires_grad_(False)
    opt = torch.optim.SGD(model["online"].parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(2)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(4):
            x = torch.randn(32, 3, 8, 8, generator=gen)
            a, b = augment(x, gen), augment(x, gen)
            with torch.no_grad():
                t = model["target"](b)
            loss = -F.cosine_similarity(model["online"](a), t).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for po, pt in zip(model["online"].parameters(), model["target"].parameters()):
                    pt.mul_(0.99).add_(po, alpha=0.01)
    report = monitor.report()
    assert report.filter(rules=FROZEN_RULES) == []
    assert warnings_of(report) == []


def test_an_eval_mode_ema_copy_whose_buffers_are_averaged_is_no_multiple_update():
    """An EMA copy held beside the net (AveragedModel with use_buffers=True, or timm's
    ModelEmaV3), kept in eval mode: its counters follow the net's two views per step by
    averaging, outside any forward of its own. That is no update of BN's (no checkpointing,
    no accumulation)."""
    torch.manual_seed(0)
    net = ConvBNReLU()
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99), use_buffers=True
    )
    model = nn.ModuleDict({"net": net, "ema": ema})
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(2)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(6):
            ema.eval()
            x = torch.randn(16, 3, 8, 8, generator=gen)
            loss = net(augment(x, gen)).square().mean() + net(augment(x, gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update_parameters(net)
    report = monitor.report()
    assert int(ema.module.bn.num_batches_tracked) >= 2  # moved by the averaging alone
    assert report.filter(rules=["multiple-updates-per-step"]) == []
    assert warnings_of(report) == []


def sam_run(disable_second: bool, watch_base: bool = True) -> bncheck.Report:
    """SAM: two forward/backward passes on one batch per step; its README's recipe sets BN
    momentum to 0 for the second pass so that the statistics update once."""
    torch.manual_seed(0)
    model = ConvBNReLU()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapper = torch.optim.SGD(model.parameters(), lr=0.0)  # stands in for SAM (never steps)
    gen = torch.Generator().manual_seed(3)
    with bncheck.Monitor(model, optimizer=base if watch_base else wrapper) as monitor:
        for _ in range(4):
            x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,))
            F.cross_entropy(model(x), y).backward()  # first pass: the ascent direction
            if disable_second:
                model.bn.momentum = 0
            F.cross_entropy(model(x), y).backward()  # second pass, at the perturbed weights
            model.bn.momentum = 0.1
            base.step()
            base.zero_grad()
    return monitor.report()


def test_sam_second_pass_with_momentum_zero_is_one_update_per_step():
    report = sam_run(disable_second=True)
    assert multi(report) == []
    assert warnings_of(report) == []


def test_sam_second_pass_that_updates_the_statistics_is_found():
    [finding] = multi(sam_run(disable_second=False))
    assert finding.details["updates"] == 2


def test_an_optimizer_that_never_steps_gives_a_note_not_per_step_findings():
    report = sam_run(disable_second=False, watch_base=False)
    assert multi(report) == []
    assert any("optimizer never stepped" in n for n in report.notes)


def with_norm(norm: nn.Module, *more: nn.Module) -> nn.Module:
    """conv -> ``norm`` -> ReLU (-> ``more``) -> pool -> linear, 8 channels, 2 classes."""
    torch.manual_seed(0)
    head = (nn.ReLU(), *more, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm, *head)


def small_batch_findings(model: nn.Module, steps: int = 3, edit=None) -> list[bncheck.Finding]:
    """``small-batch`` findings of a run of two images per step (as a detector's);
    ``edit(step)`` runs before each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for step in range(steps):
            if edit is not None:
                edit(step)
            x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 2, (2,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return monitor.report().filter(rules=["small-batch"])


def test_frozen_batchnorm_in_train_mode_is_not_a_small_batch():
    from zoo import FrozenBN2d

    more = (nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    small = small_batch_findings(with_norm(FrozenBN2d(8), *more))
    assert [f.layer for f in small] == ["4"]  # the BatchNorm2d, not the frozen layer


def norm_eval_run(reapply_train: bool) -> bncheck.Report:
    """mmdetection's ``norm_eval=True``: model.train() each step, then every BN back to eval
    (statistics frozen, gamma/beta trained); the twin forgets model.train() after a
    validation pass."""
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        model.eval()  # a validation pass before training
        with torch.no_grad():
            model(torch.randn(8, 3, 8, 8, generator=gen))
        for _ in range(3):
            if reapply_train:
                model.train()
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 2, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return monitor.report()


def test_bn_kept_in_eval_inside_a_training_model_is_a_note():
    report = norm_eval_run(reapply_train=True)
    assert report.filter(rules=["stats-not-updating"]) == []
    assert any("norm_eval" in n for n in report.notes)


def test_forgetting_model_train_after_validation_is_still_found():
    report = norm_eval_run(reapply_train=False)
    assert {f.layer for f in report.filter(rules=["stats-not-updating"])} == {
        "block1.1",
        "block2.1",
    }
    assert not any("norm_eval" in n for n in report.notes)


def test_a_forgotten_train_inside_a_wrapper_in_train_mode_is_still_found():
    """The loss wrapper (model + criterion) stays in train mode; validation called
    ``net.eval()`` and training never called ``net.train()`` again: the whole network, not
    BN alone, runs in eval mode."""
    torch.manual_seed(0)

    class WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TwoBlock()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.net(x), y)

    model = WithLoss().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        model.net.eval()  # validation; .train() is never called again
        for _ in range(3):
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 2, (8,))
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
    report = monitor.report()
    found = {f.layer for f in report.filter(rules=["stats-not-updating"])}
    assert found == {"net.block1.1", "net.block2.1"}
    assert not any("norm_eval" in n for n in report.notes)


def frozen_backbone_run(event: str, warn: bool = False, steps: int = 4):
    """A frozen backbone left in train mode (frozen-bn-drift) whose gamma/beta change once
    in a way a moving-average copy's never would: a ``load_state_dict`` after attaching, the
    watched Adam moving them inside its step after a mid-run freeze, a NaN gamma that stays
    NaN."""
    torch.manual_seed(0)
    model = TwoBlock()
    if event != "freeze-mid-run":
        model.block1.requires_grad_(False)
    if event == "nan":
        with torch.no_grad():
            model.block1[1].weight[0] = float("nan")
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(8)
    saved = {k: v.clone() + 0.01 for k, v in model.state_dict().items()}
    with _recorded() as caught, bncheck.Monitor(model, optimizer=opt, warn=warn) as monitor:
        for step in range(steps):
            if event == "load" and step == 1:
                model.load_state_dict(saved)
            if event == "freeze-mid-run" and step == 1:
                model.block1.requires_grad_(False)
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 2, (8,))
            opt.zero_grad(set_to_none=False)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    warned = [w for w in caught if issubclass(w.category, bncheck.BNCheckWarning)]
    return monitor.report(), warned


@pytest.mark.parametrize("event", ["load", "freeze-mid-run", "nan"])
def test_a_frozen_layer_whose_params_changed_once_or_inside_the_step_is_still_frozen(event):
    report, _ = frozen_backbone_run(event)
    assert [f.layer for f in report.filter(rules=["frozen-bn-drift"])] == ["block1.1"]
    assert not any("moving-average copy" in n for n in report.notes)


@pytest.mark.parametrize("steps", [1, 2])
def test_a_warning_held_back_for_a_frozen_layer_is_given_at_detach(steps):
    report, warned = frozen_backbone_run("none", warn=True, steps=steps)
    assert report.filter(rules=["frozen-bn-drift"])
    assert any("frozen-bn-drift" in str(w.message) for w in warned)


def test_a_counterless_bn_that_batch_normalises_is_judged_on_its_batch():
    assert [f.layer for f in small_batch_findings(with_norm(CounterlessBN(8)))] == ["1"]


def test_byol_target_moved_in_an_optimizer_step_hook_is_not_a_frozen_bn():
    """The EMA step in the optimizer's own step post-hook (it runs inside the step, before
    the Monitor's): the target's parameters are in none of its param groups, so the change is
    not the optimizer's."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"online": Encoder(), "target": Encoder()})
    model["target"].load_state_dict(model["online"].state_dict())
    model["target"].requires_grad_(False)
    opt = torch.optim.SGD(model["online"].parameters(), lr=0.1)

    def ema(*_):
        with torch.no_grad():
            for po, pt in zip(model["online"].parameters(), model["target"].parameters()):
                pt.mul_(0.99).add_(po, alpha=0.01)

    opt.register_step_post_hook(ema)
    gen = torch.Generator().manual_seed(9)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(4):
            x = torch.randn(32, 3, 8, 8, generator=gen)
            with torch.no_grad():
                t = model["target"](augment(x, gen))
            loss = -F.cosine_similarity(model["online"](augment(x, gen)), t).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert monitor.report().filter(rules=FROZEN_RULES) == []


def test_a_frozen_layer_cast_and_cast_back_is_still_frozen():
    torch.manual_seed(0)
    model = TwoBlock()
    model.block1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(10)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for step in range(4):
            if step == 1:
                model.double()
            if step == 2:
                model.float()
            dtype = torch.float64 if step == 1 else torch.float32
            x = torch.randn(8, 3, 8, 8, generator=gen, dtype=dtype)
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
            opt.step()
    assert [f.layer for f in monitor.report().filter(rules=["frozen-bn-drift"])] == ["block1.1"]


def test_a_backbone_kept_in_eval_inside_model_train_is_a_note():
    """``train()`` overridden to keep the backbone in eval (its BN statistics frozen, its
    weights still optimized) while the head's BN trains."""
    torch.manual_seed(0)

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = TwoBlock()
            self.head = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

        def train(self, mode: bool = True) -> Frozen:
            super().train(mode)
            self.backbone.eval()
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    model = Frozen().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(11)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(3):
            x, y = torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 2, (32,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    report = monitor.report()
    assert report.filter(rules=["stats-not-updating"]) == []
    assert any("kept frozen by the recipe" in n for n in report.notes)


@pytest.mark.parametrize("event", ["load", "nan"])
def test_a_frozen_batchnorm_whose_buffers_changed_once_is_not_a_small_batch(event):
    from zoo import FrozenBN2d

    model = with_norm(FrozenBN2d(8))
    if event == "nan":
        model[1].running_var[0] = float("nan")

    def load(step: int) -> None:
        if event == "load" and step == 2:
            model[1].running_mean.add_(0.1)  # a load_state_dict of other statistics

    assert small_batch_findings(model, steps=4, edit=load) == []


def test_a_monitor_dropped_without_detach_frees_the_model():
    import gc
    import weakref

    from torch.optim import optimizer as optim_module

    before = len(optim_module._global_optimizer_pre_hooks)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = bncheck.Monitor(model, optimizer=opt).attach()
    alive = weakref.ref(model)
    del monitor, model, opt
    gc.collect()
    assert alive() is None
    assert len(optim_module._global_optimizer_pre_hooks) == before


class SubclassedSGD(torch.optim.SGD):
    """An optimizer subclass whose step calls the parent's (both steps hooked by torch once
    an instance of each class exists)."""

    def step(self, closure=None):  # type: ignore[override]
        return super().step(closure)


def test_a_subclassed_optimizer_step_is_one_step():
    torch.manual_seed(0)
    model = ConvBNReLU()
    torch.optim.SGD(model.parameters(), lr=0.1)  # an SGD instance: SGD.step is hooked too
    opt = SubclassedSGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train_steps(model, opt, 5, seed=12)
    assert monitor.steps == 5
    assert list(monitor.history["updates"]) == [1.0] * 5


def test_a_step_that_raised_does_not_stop_the_count():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    failing = [True]

    def fail_once(*_):
        if failing:
            failing.clear()
            raise RuntimeError("a step that fails once")

    handle = opt.register_step_pre_hook(fail_once)
    gen = torch.Generator().manual_seed(13)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for _ in range(4):
            x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with contextlib.suppress(RuntimeError):
                opt.step()
    handle.remove()
    assert monitor.steps == 3


def test_a_distillation_teacher_left_in_train_mode_is_frozen_bn_drift_alone():
    # the teacher is frozen and run without grad; a model.train() on the whole put its BN
    # back in train mode: frozen-bn-drift says that, and "validation" would be wrong
    torch.manual_seed(0)
    model = nn.ModuleDict({"student": TwoBlock(), "teacher": TwoBlock()})
    model["teacher"].requires_grad_(False)
    opt = torch.optim.SGD(model["student"].parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        model.train()
        for _ in range(4):
            x = torch.randn(8, 3, 6, 6, generator=gen)
            with torch.no_grad():
                soft = model["teacher"](x).softmax(1)
            loss = F.kl_div(model["student"](x).log_softmax(1), soft, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
    report = monitor.report()
    drift = {f.layer for f in report.filter(rules=["frozen-bn-drift"])}
    assert drift == {"teacher.block1.1", "teacher.block2.1"}
    assert report.filter(rules=["stats-updated-without-grad"]) == []


@pytest.mark.parametrize(
    ("sizes", "hw", "says"),
    [
        ((2, 2, 2, 2), 8, "use larger batches"),  # small at every step: no drop_last
        ((16, 16, 16, 3), 8, "drop_last=True"),  # a short last batch of the epoch
        ((16, 16, 16, 16), 1, "1x1 feature maps"),  # 16 samples, 1x1 maps
    ],
)
def test_the_small_batch_hint_fits_when_and_where_the_batch_is_small(sizes, hw, says):
    torch.manual_seed(0)
    model = with_norm(nn.BatchNorm2d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for n in sizes:
            x, y = torch.randn(n, 3, hw, hw), torch.randint(0, 2, (n,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    (found,) = monitor.report().filter(rules=["small-batch"])
    assert says in found.message
    assert ("drop_last" in found.message) == (says == "drop_last=True")


def test_warn_mode_warns_an_isolated_extra_update_during_the_run():
    # one extra train-mode forward with grad, once: the steps that classify repeated updates
    # never see it again, and the warning comes when they are over, not at detach
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen_at = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", bncheck.BNCheckWarning)
        with bncheck.Monitor(model, optimizer=opt, warn=True):
            for step in range(10):
                x = torch.randn(8, 3, 6, 6, generator=gen)
                y = torch.randint(0, 2, (8,), generator=gen)
                if step == 1:
                    model(x).sum()  # a logging forward in train mode, with grad
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if caught and not seen_at:
                    seen_at.append(step)
    assert seen_at and seen_at[0] <= 6
    assert all("multiple-updates-per-step" in str(w.message) for w in caught)

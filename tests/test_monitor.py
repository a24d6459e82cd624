"""bncheck.Monitor: use, history, plot, warnings, hooks, exactness, recovered statistics."""

from __future__ import annotations

import random
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import ConvBNReLU, NoBN, TwoBlock

import bncheck
from bncheck.checks.training import COUNT_COLUMNS, STAT_COLUMNS


def batches(n: int, size: int = 8, hw: int = 8, seed: int = 0, classes: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 3, hw, hw, generator=gen),
            torch.randint(0, classes, (size,), generator=gen),
        )
        for _ in range(n)
    ]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def hook_count(model: nn.Module) -> int:
    """Hooks on the model's modules plus the process-wide module and optimizer hooks (where
    the Monitor registers its own, so that the model carries none)."""
    from torch.nn.modules import module as module_hooks
    from torch.optim import optimizer as optimizer_hooks

    return (
        sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        + len(module_hooks._global_forward_hooks)
        + len(module_hooks._global_forward_pre_hooks)
        + len(optimizer_hooks._global_optimizer_post_hooks)
    )


def model_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- use ------------------------------------------------------------------------------------
def test_report_covers_static_rules_and_the_run():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=1e-4)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train(model, opt, batches(3))
    report = monitor.report()
    assert isinstance(report, bncheck.Report)
    # a static (optimizer) rule runs in the Monitor's report too
    [decayed] = report.filter(rules=["weight-decay-on-bn"])
    assert decayed.details["layers"] == ["block1.1", "block2.1"]
    assert report.settings["steps"] == 3
    assert "frozen-bn-drift" in report.settings["rules"]
    assert "rank-divergent-stats" in report.skipped
    assert any("3 optimizer step" in n for n in report.notes)


def test_attach_detach_without_with_removes_every_hook():
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = hook_count(model)
    monitor = bncheck.Monitor(model, optimizer=opt).attach()
    assert monitor.attached and hook_count(model) > before
    assert model_hook_count(model) == 0  # the model itself carries no hook
    train(model, opt, batches(2))
    monitor.detach()
    monitor.detach()  # twice is fine
    assert not monitor.attached
    assert hook_count(model) == before and len(opt._optimizer_step_post_hooks) == 0
    train(model, opt, batches(2))  # not counted any more
    assert monitor.steps == 2


def test_hooks_removed_when_the_loop_raises():
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(RuntimeError, match="boom"), bncheck.Monitor(model, optimizer=opt):
        train(model, opt, batches(1))
        raise RuntimeError("boom")
    assert hook_count(model) == 0 and len(opt._optimizer_step_post_hooks) == 0


def test_attach_twice_is_a_usage_error():
    monitor = bncheck.Monitor(ConvBNReLU()).attach()
    try:
        with pytest.raises(bncheck.UsageError, match="already attached"):
            monitor.attach()
    finally:
        monitor.detach()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sync_every": 0}, bncheck.UsageError, "sync_every=.*integer >= 1"),
        ({"optimizer": "sgd"}, bncheck.UsageError, "needs a torch.optim.Optimizer"),
        ({"rank_rtl": 1e-3}, bncheck.UsageError, "did you mean 'rank_rtol'"),
        ({"select": ["frozen-bn-drfit"]}, bncheck.UsageError, "did you mean 'frozen-bn-drift'"),
    ],
)
def test_bad_arguments_get_one_line_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        bncheck.Monitor(ConvBNReLU(), **kwargs)


def test_model_without_bn_is_rejected():
    with pytest.raises(bncheck.NoBatchNormError, match="no BatchNorm layer"):
        bncheck.Monitor(NoBN())


def test_select_and_ignore_apply_to_the_report():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt, ignore=["small-batch"]) as monitor:
        train(model, opt, batches(2, size=2))
    assert monitor.report().filter(rules=["small-batch"]) == []
    with bncheck.Monitor(model, optimizer=opt, select="small-batch") as monitor:
        train(model, opt, batches(2, size=2))
    assert monitor.report().rules_found() == {"small-batch"}


# ---- history, channels, plot ----------------------------------------------------------------
def test_history_has_a_row_per_step_and_layer():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt, flush_every=2) as monitor:
        train(model, opt, batches(3))
        model.eval()
        with torch.no_grad():
            model(batches(1)[0][0])
        model.train()
        train(model, opt, batches(1, seed=3))
    frame = monitor.history
    assert len(frame) == 4 * 2
    assert list(frame["step"]) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert list(frame["layer"][:2]) == ["block1.1", "block2.1"]
    assert set(STAT_COLUMNS) <= set(frame.columns)
    assert frame["mode"].tolist()[:6] == ["train"] * 6
    assert frame["mode"].tolist()[6:] == ["train+eval"] * 2
    assert frame["grad_enabled"].tolist()[0] is True
    assert frame["batch_size"].tolist()[0] == 8
    assert frame["samples_per_channel"].tolist()[0] == 8 * 8 * 8
    assert frame["updates"].tolist() == [1.0] * 8
    assert frame["num_batches_tracked"].tolist()[-1] == 4.0
    assert len(COUNT_COLUMNS) == 11


def test_history_is_bounded_by_max_history():
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(
        model, optimizer=opt, flush_every=2, max_history=4, channel_history=3
    ) as monitor:
        train(model, opt, batches(10))
    frame = monitor.history
    assert 4 <= frame["step"].nunique() <= 5 and frame["step"].max() == 10
    assert sorted(monitor.channels("bn")["step"].unique()) == [8, 9, 10]


def test_channels_unknown_layer():
    monitor = bncheck.Monitor(TwoBlock())
    with pytest.raises(bncheck.UsageError, match="did you mean 'block1.1'"):
        monitor.channels("block1.2")


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train(model, opt, batches(3))
    out = monitor.plot(tmp_path / "bn.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monitor = bncheck.Monitor(ConvBNReLU())
    with pytest.raises(ImportError, match=r"pip install 'bncheck\[plot\]'"):
        monitor.plot(tmp_path / "x.png")


# ---- warnings mode --------------------------------------------------------------------------
def test_warn_mode_warns_once_per_rule_and_layer_as_soon_as_it_appears():
    torch.manual_seed(0)
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen_at: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with bncheck.Monitor(model, optimizer=opt, warn=True):
            for i, (x, y) in enumerate(batches(4, size=4)):
                for _ in range(2):  # two updates per step from the first step on
                    F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                if any("multiple-updates-per-step" in str(w.message) for w in caught):
                    seen_at.append(i)
    ours = [w for w in caught if issubclass(w.category, bncheck.BNCheckWarning)]
    ours = [w for w in ours if "multiple-updates-per-step" in str(w.message)]
    assert len(ours) == 2  # one per layer, not one per step
    # micro-batches of 4: small-batch warns too, once for both layers (as the report says it)
    [small] = [str(w.message) for w in caught if str(w.message).startswith("[small-batch]")]
    assert "in 2 BN layers" in small
    # emitted during the run, not at the end: at the step after the first, once the cause of
    # the repeated updates is classified (two views of one batch would not be warned)
    assert seen_at[0] == 1


def test_no_warnings_without_warn_mode():
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bncheck.BNCheckWarning)
        with bncheck.Monitor(model, optimizer=opt):
            train(model, opt, batches(2, size=2))


# ---- exactness ------------------------------------------------------------------------------
class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3)
        )
        self.head = nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=None), nn.Dropout(0.5), nn.Linear(8, 2)
        )

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def train_run(monitored: bool, seed: int, steps: int, size: int, warn: bool):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = DropoutNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = batches(steps, size=size, seed=seed)
    monitor = bncheck.Monitor(model, optimizer=opt, warn=warn) if monitored else None
    if monitor is not None:
        monitor.attach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bncheck.BNCheckWarning)
        train(model, opt, data)
        with torch.no_grad():
            model(data[0][0])  # a train-mode forward without grad, too
        if monitor is not None:
            monitor.detach()  # judges that last forward: it warns in warn mode
    if monitor is not None:
        monitor.report()
        _ = monitor.history
    return model, torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**16), steps=st.integers(1, 4), size=st.integers(2, 6), warn=st.booleans()
)
def test_monitored_training_is_bit_for_bit_unmonitored_training(seed, steps, size, warn):
    plain, rng_plain, np_plain, py_plain = train_run(False, seed, steps, size, warn)
    watched, rng_watched, np_watched, py_watched = train_run(True, seed, steps, size, warn)
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(rng_plain, rng_watched)
    assert np.array_equal(np_plain, np_watched) and py_plain == py_watched
    assert [m.training for m in plain.modules()] == [m.training for m in watched.modules()]


# ---- recovered batch statistics against an oracle -------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    momentum=st.one_of(st.none(), st.floats(0.05, 1.0)),
    n=st.integers(2, 6),
    hw=st.integers(1, 4),
    seed=st.integers(0, 1000),
    steps=st.integers(1, 3),
)
def test_recovered_batch_statistics_match_the_batch(momentum, n, hw, seed, steps):
    gen = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(5, momentum=momentum)
    model = nn.Sequential(bn)
    inputs = [torch.randn(n, 5, hw, hw, generator=gen) * 2 + 1 for _ in range(steps)]
    with bncheck.Monitor(model, channel_history=steps) as monitor:
        for x in inputs:
            model(x.requires_grad_(True))
    frame = monitor.channels("0")
    for k, x in enumerate(inputs):
        part = frame[frame["step"] == k + 1]
        flat = x.detach().double().transpose(0, 1).reshape(5, -1)
        expect_mean = flat.mean(1).numpy()
        expect_var = flat.var(1, unbiased=True).numpy()  # BN folds the unbiased variance in
        scale = 1.0 / (momentum if momentum is not None else 1.0 / (k + 1))
        atol = 1e-5 * scale * (1 + np.abs(expect_var).max())
        np.testing.assert_allclose(part["batch_mean"].to_numpy(), expect_mean, atol=atol)
        np.testing.assert_allclose(part["batch_var"].to_numpy(), expect_var, atol=atol)


def test_batch_statistics_are_nan_when_the_layer_updated_twice():
    model = ConvBNReLU()
    x = batches(1)[0][0]
    with bncheck.Monitor(model) as monitor:
        model.bn(model.conv(x))  # an extra update outside a top-level forward
        model(x).sum().backward()
    assert np.isnan(monitor.channels("bn")["batch_mean"]).all()
    assert monitor.history["updates"].tolist() == [2.0]


# ---- Lightning-style callback ---------------------------------------------------------------
def test_lightning_style_callback_wraps_the_monitor():
    from types import SimpleNamespace

    from bncheck.lightning import MonitorCallback

    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = SimpleNamespace(optimizers=[opt])
    callback = MonitorCallback(select="small-batch")
    callback.on_fit_start(trainer, model)
    train(model, opt, batches(2, size=2))
    callback.on_fit_end(trainer, model)
    assert hook_count(model) == 0
    assert callback.report is not None and callback.report.rules_found() == {"small-batch"}
    callback.on_fit_start(trainer, model)
    callback.on_exception(trainer, model, RuntimeError("x"))
    assert hook_count(model) == 0 and len(opt._optimizer_step_post_hooks) == 0


def test_lightning_callback_without_lightning_says_what_to_do(monkeypatch):
    from bncheck.lightning import lightning_callback

    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    with pytest.raises(ImportError, match="pip install lightning"):
        lightning_callback()


def test_a_failure_inside_the_monitor_stops_watching_not_training(monkeypatch):
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def broken():
        raise RuntimeError("buffers on two devices")

    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train(model, opt, batches(1))
        monkeypatch.setattr(monitor._flat, "snapshot", broken)
        with pytest.warns(bncheck.BNCheckWarning, match="stopped watching at step 2"):
            train(model, opt, batches(1))
        train(model, opt, batches(2))  # training goes on, unwatched
    assert monitor.steps == 2  # the step it failed on, and none after
    assert any("RuntimeError: buffers on two devices" in n for n in monitor.report().notes)


def test_reattaching_takes_a_new_baseline():
    torch.manual_seed(0)
    model = ConvBNReLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = bncheck.Monitor(model, optimizer=opt)
    with monitor:
        train(model, opt, batches(2))
    train(model, opt, batches(3))  # unwatched: not judged on the next attach
    with monitor:
        train(model, opt, batches(2))
    assert monitor.steps == 4
    assert monitor.history["updates"].tolist() == [1.0] * 4
    assert monitor.report().filter(rules=["multiple-updates-per-step"]) == []


def test_warnings_point_at_the_users_training_loop():
    """A BNCheckWarning names the line of the user's code that triggered it, not a hook."""
    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with (
        pytest.warns(bncheck.BNCheckWarning) as caught,
        bncheck.Monitor(model, optimizer=opt, warn=True),
    ):
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 3, 6, 6))  # validation in train mode
        loss = model(torch.randn(8, 3, 6, 6)).square().mean()
        loss.backward()
        opt.step()
    assert {w.filename for w in caught} == {__file__}


def test_a_deep_copy_of_the_watched_model_is_not_watched():
    """EMA/SWA copies (copy.deepcopy, AveragedModel) carry the hooks along: the copy's forwards
    must not count as the watched model's, and its hooks must go away."""
    import copy

    model = TwoBlock()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        twin = copy.deepcopy(model)
        for _ in range(3):
            model.train()
            model(torch.randn(8, 3, 6, 6)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                twin.train()
                twin(torch.randn(8, 3, 6, 6))  # e.g. update_bn on an averaged copy
    assert monitor.report().findings == []
    leftover = [n for n, m in twin.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert leftover == []


def test_an_unused_bn_layer_on_the_meta_device_does_not_stop_the_monitor():
    # a structure-only layer beside the real ones (a head built on meta, never called)
    torch.manual_seed(0)
    model = ConvBNReLU()
    model.spare = nn.BatchNorm2d(4, device="meta")
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("spare")])
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        train(model, opt, batches(3))
    report = monitor.report()
    assert monitor.steps == 3
    assert not any("stopped watching" in n for n in report.notes)
    # the real layer is still judged: its statistics were watched step by step
    frame = monitor.history
    assert set(frame["layer"]) >= {"bn"}
    assert frame[frame["layer"] == "bn"]["updates"].tolist() == [1.0, 1.0, 1.0]
    # the meta layer was not watched: the report says so and is not complete (a gate on
    # report.ok must not pass on what it could not see), as the audit's is
    assert not report.complete
    assert any("meta device" in reason and "spare" in reason for reason in report.incomplete)


def test_a_report_after_the_layer_left_the_model_still_says_its_drift():
    # a layer replaced after the run (a conv-BN fusion in place) before the report: the
    # run's stat-drift episode is reported without the layer's current settings
    torch.manual_seed(0)
    model = ConvBNReLU(momentum=0.001)
    model.spare = nn.BatchNorm2d(8)  # a BN layer that stays, unused
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with bncheck.Monitor(model, optimizer=opt) as monitor:
        for x, y in batches(40):
            opt.zero_grad()
            F.cross_entropy(model(x * 3 + 5), y).backward()
            opt.step()
    model.bn = nn.Identity()
    [finding] = monitor.report().filter(rules=["stat-drift"])
    assert finding.layer == "bn"

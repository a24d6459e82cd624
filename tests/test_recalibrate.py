"""``bncheck.recalibrate``: exact statistics, only the broken layers, the model untouched.

The property test compares the recomputed buffers with an oracle written here: every input
of each BN layer captured in the same forward passes, concatenated, and reduced with
``torch.mean`` / ``torch.var`` (unbiased) in float64.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recalibrate_data import batches
from torch import nn
from zoo import ImageListDetector, NoBN, TwoBlock, TwoInputs, detection_loader, trained

import bncheck
from bncheck.errors import NoBatchNormError, UsageError


# ---- helpers ---------------------------------------------------------------------------------
def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def bitwise(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN."""
    if x.is_floating_point():
        return x.shape == y.shape and bool(((x == y) | (x.isnan() & y.isnan())).all())
    return torch.equal(x, y)


def same(a: tuple[dict[str, torch.Tensor], list[bool]], model: nn.Module) -> bool:
    state, modes = snapshot(model)
    return (
        modes == a[1]
        and state.keys() == a[0].keys()
        and all(bitwise(state[k], a[0][k]) for k in a[0])
    )


def rng_states() -> tuple[torch.Tensor, object, object]:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def inputs(data: list) -> list[torch.Tensor]:
    return [x for x, _ in data]


def fitted(model: nn.Module, data: list) -> nn.Module:
    """``model`` with exact statistics for ``data`` (all layers recomputed), eval mode."""
    return bncheck.recalibrate(model.eval(), data, layers="all").model


class Frozen(nn.Module):
    """A FrozenBatchNorm2d look-alike: BN buffers, no train-mode behaviour."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, init in (("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)):
            self.register_buffer(name, torch.full((c,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight / (self.running_var + 1e-5).sqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class WithFrozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = Frozen(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.bn(self.conv(x))).mean((2, 3))


# ---- the oracle ------------------------------------------------------------------------------
def oracle(model: nn.Module, data: list[torch.Tensor], names: list[str]) -> dict[str, tuple]:
    """Mean and unbiased variance of every input of the named BN layers, all values pooled.

    The forward passes run as the docstring of ``recalibrate`` says: the named layers in
    train mode, everything else in eval mode, under no_grad.
    """
    net = copy.deepcopy(model).eval()
    modules = dict(net.named_modules())
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        modules[name].train()
        handles.append(
            modules[name].register_forward_pre_hook(
                lambda m, args, name=name: seen[name].append(args[0].detach().double())
            )
        )
    with torch.no_grad():
        for x in data:
            net(x)
    for h in handles:
        h.remove()
    out = {}
    for name, parts in seen.items():
        c = parts[0].shape[1]
        flat = torch.cat([p.transpose(0, 1).reshape(c, -1) for p in parts], dim=1)
        out[name] = (flat.mean(1), torch.var(flat, dim=1, unbiased=True), len(parts))
    return out


class Chain(nn.Module):
    def __init__(self, d_in: int, c1: int, c2: int, spatial: bool) -> None:
        super().__init__()
        if spatial:
            self.f1 = nn.Conv2d(d_in, c1, 3, padding=1)
            self.b1 = nn.BatchNorm2d(c1, momentum=None)
            self.f2 = nn.Conv2d(c1, c2, 1)
            self.b2 = nn.BatchNorm2d(c2)
        else:
            self.f1 = nn.Linear(d_in, c1)
            self.b1 = nn.BatchNorm1d(c1, momentum=None)
            self.f2 = nn.Linear(c1, c2)
            self.b2 = nn.BatchNorm1d(c2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.f2(self.drop(torch.relu(self.b1(self.f1(x))))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spatial=st.booleans(),
    sizes=st.lists(st.integers(2, 7), min_size=1, max_size=4),
    channels=st.tuples(st.integers(1, 5), st.integers(1, 4)),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_recomputed_buffers_equal_the_pooled_statistics_of_every_input(
    spatial, sizes, channels, offset, scale, seed
):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in = 3
    model = Chain(d_in, *channels, spatial=spatial).eval()
    shape = (d_in, 4, 3) if spatial else (d_in,)
    data = [offset + scale * torch.randn(n, *shape, generator=gen) for n in sizes]
    expected = oracle(model, data, ["b1", "b2"])
    result = bncheck.recalibrate(model, data, layers="all")
    modules = dict(result.model.named_modules())
    for name, (mean, var, calls) in expected.items():
        bn = modules[name]
        spread = float(var.sqrt().max()) + 1e-6
        atol = 1e-5 * (float(mean.abs().max()) + spread)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=atol)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-4, atol=atol * spread)
        assert int(bn.num_batches_tracked) == calls == len(sizes)
    assert modules["b1"].momentum is None and modules["b2"].momentum == 0.1  # left as they were
    assert result.batches == len(sizes)
    assert list(result.changes["values_per_channel"]) == [sum(sizes) * (12 if spatial else 1)] * 2


class NoUpdateBN(nn.BatchNorm1d):
    """Normalises with batch statistics in train mode but never updates its buffers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        return torch.nn.functional.batch_norm(
            x, None, None, self.weight, self.bias, True, 0.0, self.eps
        )


def test_a_layer_that_does_not_update_its_buffers_is_reduced_from_its_input():
    model = nn.Sequential(nn.Linear(3, 4), NoUpdateBN(4), nn.ReLU(), nn.BatchNorm1d(4)).eval()
    data = [torch.randn(5, 3) * 4 + 2 for _ in range(3)]
    expected = oracle(model, data, ["1", "3"])
    result = bncheck.recalibrate(model, data, layers="all")
    for name, (mean, var, calls) in expected.items():
        bn = dict(result.model.named_modules())[name]
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == calls == 3


# ---- what is recomputed ----------------------------------------------------------------------
def test_broken_recomputes_only_the_nan_layer_and_leaves_the_others_bitwise():
    good = fitted(TwoBlock(), batches())
    broken = copy.deepcopy(good)
    broken.block1[1].running_var[3] = float("nan")  # an AMP overflow in one layer
    result = bncheck.recalibrate(broken, batches())
    assert result.layers == ["block1.1"]
    assert result.before.rules_found() >= {"nonfinite-stats"}
    assert result.ok and not result.after.findings
    assert torch.equal(result.model.block2[1].running_var, good.block2[1].running_var)
    fixed = result.model.block1[1]
    torch.testing.assert_close(fixed.running_var, good.block1[1].running_var)
    assert int(result.changes.loc[0, "nonfinite_channels"]) == 1
    assert "block1.1" in str(result) and "nonfinite-stats" in str(result)


def test_untrained_statistics_of_an_ema_copy_are_all_recomputed():
    ema = copy.deepcopy(fitted(TwoBlock(), batches()))
    for m in ema.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()  # the EMA copied parameters only
    result = bncheck.recalibrate(ema, batches())
    assert "untrained-stats" in result.before.rules_found()
    assert result.layers == ["block1.1", "block2.1"]
    assert result.ok


def test_statistics_of_other_data_are_flagged_as_drift_and_replaced():
    wrong = fitted(TwoBlock(), [(x * 0.1 - 5, y) for x, y in batches()])
    result = bncheck.recalibrate(wrong, batches())
    assert "stat-drift" in result.before.rules_found()
    assert "block1.1" in result.layers
    assert result.ok
    assert float(result.changes["max_mean_shift"].max()) > 0.5


def test_a_layer_hidden_behind_a_nan_layer_is_found_in_a_second_pass():
    model = trained(TwoBlock(), batches()[0][0], steps=1)  # stats far from the data
    model.block1[1].running_mean[0] = float("nan")  # makes block2's input NaN in eval mode
    result = bncheck.recalibrate(model, batches())
    assert result.layers == ["block1.1", "block2.1"]
    assert "(pass 2)" in result.changes.loc[1, "reason"]
    assert result.ok


def test_broken_refines_only_when_the_single_pass_leaves_drift():
    # batches of 2: in the one pass, each layer after the first sees activations normalised
    # by two-sample statistics (about +-1), not what it sees in eval mode; whether stat-drift
    # calls that a drift depends on the batch-to-batch spread of the data (it discounts
    # sampling noise), and "broken" refines exactly when it does
    torch.manual_seed(0)
    model = nn.Sequential(
        *[m for _ in range(4) for m in (nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU())]
    ).eval()
    data = [torch.randn(2, 6) * 3 + 1 for _ in range(16)]
    one_pass = bncheck.recalibrate(model, data, layers="all")
    drift_left = "stat-drift" in one_pass.after.rules_found()
    result = bncheck.recalibrate(model, data)  # "broken": until the audit passes
    assert result.ok
    refined = any("(refined, pass 2)" in reason for reason in result.changes["reason"])
    assert refined == drift_left
    assert any(note.startswith("pass 2 refined") for note in result.notes) == drift_left


def test_healthy_model_is_left_alone():
    good = fitted(TwoBlock(), batches())
    result = bncheck.recalibrate(good, batches())
    assert result.layers == [] and result.ok
    assert any("no BN layer needed" in n for n in result.notes)


def test_layer_globs_select_and_unknown_names_say_what_exists():
    model = trained(TwoBlock(), batches()[0][0])
    result = bncheck.recalibrate(model, batches(), layers="block2.*")
    assert result.layers == ["block2.1"]
    with pytest.raises(UsageError, match=r"'blok1\.1' matches no BN layer.*did you mean"):
        bncheck.recalibrate(model, batches(), layers=["blok1.1"])


def test_frozen_bn_is_never_recomputed():
    model = WithFrozen().eval()
    data = [torch.randn(4, 3, 5, 5) for _ in range(3)]
    with pytest.raises(UsageError, match="frozen: Frozen .*keeps its statistics on purpose"):
        bncheck.recalibrate(model, data, layers=["frozen"])
    model.frozen.running_var[0] = float("nan")
    model.bn.running_var[0] = -1.0
    result = bncheck.recalibrate(model, data)
    assert result.layers == ["bn"]
    assert "frozen not recomputed: Frozen keeps its statistics on purpose" in result.notes[0]
    assert not result.ok  # the frozen layer's NaN remains, and is reported


def test_dropout_is_off_and_other_bn_layers_use_their_statistics_during_the_pass():
    model = Chain(3, 4, 2, spatial=False).eval()
    data = [torch.randn(6, 3) for _ in range(3)]
    before = model.b1.running_mean.clone()
    result = bncheck.recalibrate(model, data, layers=["b2"])
    # b2's input computed with b1 in eval mode (its own statistics) and dropout off:
    with torch.no_grad():
        ref = torch.cat([model.f2(torch.relu(model.eval().b1(model.f1(x)))) for x in data])
    torch.testing.assert_close(result.model.b2.running_mean, ref.mean(0))
    assert torch.equal(result.model.b1.running_mean, before)


# ---- the model and the RNG are untouched -----------------------------------------------------
def test_the_model_its_modes_and_the_rng_are_untouched():
    model = trained(TwoBlock(), batches()[0][0])
    model.block1.train()  # mixed modes must survive
    model.block1[1].running_var[0] = float("nan")
    state = snapshot(model)
    torch.manual_seed(123)
    rng = rng_states()
    result = bncheck.recalibrate(model, batches(), evaluate=lambda m: m(batches()[0][0]).mean())
    assert same(state, model)
    after = rng_states()
    assert torch.equal(rng[0], after[0]) and np.array_equal(rng[1], after[1])
    assert rng[2] == after[2]
    assert result.model is not model
    assert [m.training for m in result.model.modules()] == state[1]  # modes kept on the copy
    assert result.metric_before is not None and result.metric_after is not None
    assert "evaluate(model)" in str(result)


def test_inplace_changes_the_model_itself():
    model = trained(TwoBlock(), batches()[0][0])
    model.block1[1].running_var[0] = float("nan")
    result = bncheck.recalibrate(model, batches(), inplace=True)
    assert result.model is model
    assert torch.isfinite(model.block1[1].running_var).all()


def test_one_shot_generators_are_read_once_and_kept():
    model = trained(TwoBlock(), batches()[0][0])
    result = bncheck.recalibrate(model, (b for b in batches()), layers="all", max_batches=4)
    assert result.batches == 4
    assert result.after.settings["tolerances"]["drift_max_batches"] == 4
    assert result.ok


def test_evaluate_is_called_before_and_after():
    model = trained(TwoBlock(), batches()[0][0])
    model.block1[1].running_mean.fill_(float("nan"))
    calls = []

    def evaluate(m: nn.Module) -> float:
        calls.append(m)
        return float(torch.isfinite(m(batches()[0][0])).all())

    result = bncheck.recalibrate(model, batches(), evaluate=evaluate)
    assert calls == [model, result.model]
    assert (result.metric_before, result.metric_after) == (0.0, 1.0)


# ---- bad input -------------------------------------------------------------------------------
def nan_data() -> list[torch.Tensor]:
    data = inputs(batches())
    data[3][1, 2] = float("nan")
    return data


BAD = {
    "nan": (
        lambda: nan_data(),
        r"batch 3 of data has 64 NaN/Inf values \(input, shape \(8, 3, 8, 8\)\)",
    ),
    "shape": (
        lambda: [torch.randn(4, 5, 8, 8)],
        r"forward failed on batch 0 of data \(input shape \(4, 5, 8, 8\)\)",
    ),
    "empty": (lambda: [], "data yielded no batch"),
    "not iterable": (lambda: 3, "data must be an iterable of batches"),
    "one tensor": (lambda: torch.randn(4, 3, 8, 8), "wrap it in a list"),
    "bad batch": (lambda: ["text"], "batch 0 of data is a str"),
    "one value per channel": (lambda: [torch.randn(1, 3, 1, 1)], "more than 1 value"),
    # runs in the eval-mode audit, fails in the train-mode pass after three batches that
    # updated the running statistics in place: everything must still be put back
    "fails late": (
        lambda: [*inputs(batches())[:3], torch.randn(1, 3, 1, 1)],
        "failed on batch 3 of data",
    ),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_a_usage_error_and_changes_nothing(case, inplace):
    make, match = BAD[case]
    model = trained(TwoBlock(), batches()[0][0])
    model.block1[1].running_var[0] = float("nan")
    data = make()
    state = snapshot(model)
    rng = rng_states()
    with pytest.raises(UsageError, match=match):
        bncheck.recalibrate(model, data, layers="all", inplace=inplace)
    assert same(state, model)
    assert torch.equal(rng[0], rng_states()[0])


def test_model_without_bn_is_a_usage_error():
    with pytest.raises(UsageError, match="NoBN has no BatchNorm layer") as info:
        bncheck.recalibrate(NoBN(), [torch.randn(2, 4)])
    assert isinstance(info.value, NoBatchNormError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batches": 0}, "max_batches must be a positive integer"),
        ({"max_batches": True}, "max_batches must be a positive integer"),
        ({"layers": 3}, "layers= must be"),
        ({"layers": ""}, "layers= is empty"),
        ({"evaluate": 1.0}, "evaluate must be a callable"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        bncheck.recalibrate(TwoBlock(), batches(), **kwargs)


def test_not_a_module():
    with pytest.raises(UsageError, match="needs a torch.nn.Module"):
        bncheck.recalibrate({"a": torch.zeros(1)}, batches())  # type: ignore[arg-type]


def test_a_non_finite_layer_before_a_requested_one_is_named():
    model = trained(TwoBlock(), batches()[0][0])
    model.block1[1].running_var.fill_(float("nan"))
    with pytest.raises(UsageError, match="input of block2.1 is not finite in batch 0"):
        bncheck.recalibrate(model, batches(), layers=["block2.1"])


def test_evaluate_must_return_a_number():
    with pytest.raises(UsageError, match="evaluate\\(model\\) returned a str"):
        bncheck.recalibrate(TwoBlock(), batches(), evaluate=lambda m: "good")


# ---- the pytest fixture ----------------------------------------------------------------------
def test_the_fixture_exposes_recalibrate(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import torch
        from torch import nn

        def test_checkpoint_recalibrates(bncheck):
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
            model[1].running_var[0] = float("nan")
            data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
            result = bncheck.recalibrate(model, data)
            assert result.ok and result.layers == ["1"]
            assert not torch.isfinite(model[1].running_var).all()  # a copy was repaired
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_table_shows_control_characters_in_layer_names_as_escapes():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
    model.add_module("bn\x1b[2J\u202eX", nn.BatchNorm2d(4))
    model.eval()
    getattr(model, "bn\x1b[2J\u202eX").running_var[0] = float("nan")
    torch.manual_seed(0)
    text = str(bncheck.recalibrate(model, [torch.randn(4, 3, 8, 8) for _ in range(4)]))
    assert "\x1b" not in text and "\u202e" not in text
    assert "bn\\x1b[2J\\u202eX" in text


def test_a_detection_loader_wrapped_as_the_guide_says_is_recalibrated() -> None:
    """docs/recalibrate.md: a detector takes its images as one argument; the batches of
    torchvision's detection collate, wrapped as ``((tuple(images),), targets)``, feed it."""

    torch.manual_seed(0)
    loader = detection_loader(scale=2.0, shift=1.0)
    batches = [((tuple(images),), targets) for images, targets in loader]
    result = bncheck.recalibrate(ImageListDetector().eval(), batches, layers="all")
    assert result.after.complete
    bn = result.model.body[1]
    pooled = torch.stack([s[0] for s in loader.dataset])  # every image, as the body sees them
    with torch.no_grad():
        x = result.model.body[0](pooled)
    assert torch.allclose(bn.running_mean, x.mean((0, 2, 3)), atol=1e-5)
    assert int(bn.num_batches_tracked) == 8  # the body runs once per image


def test_a_detection_loader_as_it_comes_is_recalibrated_with_an_example_input() -> None:
    """With example_input= (a list of images), the batches of torchvision's detection collate
    are read as the audit reads data= batches: the tuple of images is fed as one list. The
    result is the same as with the batches wrapped by hand."""

    torch.manual_seed(0)
    model = ImageListDetector().eval()
    loader = detection_loader(scale=2.0, shift=1.0)
    example = [loader.dataset[0][0], loader.dataset[1][0]]
    result = bncheck.recalibrate(model, loader, layers="all", example_input=example)
    assert result.before.complete and result.after.complete
    wrapped = [((tuple(images),), targets) for images, targets in loader]
    by_hand = bncheck.recalibrate(model, wrapped, layers="all")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(
            getattr(result.model.body[1], name), getattr(by_hand.model.body[1], name)
        )


def test_without_an_example_input_the_detection_collate_is_a_clear_error() -> None:
    torch.manual_seed(0)
    with pytest.raises(bncheck.UsageError, match="forward failed on batch 0"):
        bncheck.recalibrate(ImageListDetector().eval(), detection_loader(), layers="all")


def test_an_example_input_reads_a_two_input_loader_as_the_audit_does() -> None:
    """A DataLoader's default collate turns ((x1, x2), y) samples into [[x1s, x2s], ys]: with
    an example (x1, x2), the list of inputs is both arguments."""

    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    samples = [((torch.randn(3, 16, 16), torch.randn(3, 16, 16)), 0) for _ in range(16)]
    loader = DataLoader(samples, batch_size=4)
    example = (torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    result = bncheck.recalibrate(TwoInputs().eval(), loader, layers="all", example_input=example)
    assert result.after.complete and result.layers == ["a.1", "b.1"]


def test_a_batch_the_example_input_cannot_read_is_a_clear_error() -> None:
    with pytest.raises(bncheck.UsageError, match=r"batch 0 of data: a batch in data= is a dict"):
        bncheck.recalibrate(
            ImageListDetector().eval(),
            [{"boxes": torch.zeros(0, 4)}],
            example_input=[torch.randn(3, 8, 8)],
        )


def test_a_two_input_model_is_recalibrated_and_audited_with_its_inputs_whole() -> None:
    """recalibrate's audits take each network input whole: a tuple of two inputs is both
    arguments (the audit before finds the drifted layer; the audit after is complete)."""

    torch.manual_seed(0)
    model = TwoInputs()
    model.train()
    with torch.no_grad():
        for _ in range(30):
            model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
        model.b[1].running_mean.fill_(9.0)  # far from what the data gives
    model.eval()
    data = [((torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)), 0) for _ in range(4)]
    result = bncheck.recalibrate(model, data)
    assert result.before.complete and result.after.complete and result.ok
    assert "b.1" in {f.layer for f in result.before.findings if f.rule == "stat-drift"}
    assert "b.1" in result.layers

"""The audit's fast paths decide as the slow computations they replace.

* ``normalization_errors`` on a grid-only call (PyTorch's own BN forward) returns early when
  every element is within its tolerance: it must flag exactly the calls an element-by-element
  evaluation of the documented tolerance flags.
* ``BufferState.changed_in`` compares with the live buffers (no copies): it must name the
  same buffers as comparing two captures.
* ``Snapshot.restore(final=True)``: the exit of ``preserved`` then skips the model's second
  comparison, but still restores the RNG states; a restore that is not final is repeated.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bncheck
from bncheck.checks.forward import GAMMA_FLOOR, NORM_SAFETY, normalization_errors
from bncheck.probes import BufferState, TrainCall, channel_stats, grid
from bncheck.state import preserved

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def _oracle_flags(x: torch.Tensor, y: torch.Tensor, gamma, beta, eps: float) -> set[int]:
    """Channels whose grid elements break the tolerance of ``normalization_errors``'s
    docstring, evaluated element by element in plain Python floats."""
    stats = channel_stats(x)
    assert stats is not None
    gi, go = grid(x), grid(y)
    u = torch.finfo(x.dtype).eps
    g = 1 + math.log2(max(2, stats.count))
    k = NORM_SAFETY * u * g
    flagged = set()
    for c in range(x.shape[1]):
        gm, bt = float(gamma[c]), float(beta[c])
        if not abs(gm) > GAMMA_FLOOR * (1 + abs(bt)):
            continue
        mu, var = float(stats.mean[c]), max(float(stats.var[c]), 0.0)
        root = math.sqrt(var + eps)
        a = (abs(mu) + math.sqrt(var)) / root
        b = (abs(bt) + abs(gm)) / abs(gm)
        for xi, yi in zip(gi[c].tolist(), go[c].tolist()):
            z = (xi - mu) / root
            z_obs = (yi - bt) / gm
            if abs(z_obs - z) > k * (a * (1 + abs(z)) + b + abs(z)):
                flagged.add(c)
                break
    return flagged


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    channels=st.integers(1, 6),
    offset=st.sampled_from([0.0, 3.0, -50.0]),
    bump=st.sampled_from([0.0, 1e-7, 1e-5, 1e-3, 0.5]),
    where=st.integers(0, 5),
)
def test_grid_only_normalization_flags_what_the_elementwise_oracle_flags(
    seed: int, channels: int, offset: float, bump: float, where: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, channels, 5, 5, generator=gen) * 2 + offset
    gamma = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(channels, generator=gen, dtype=torch.float64)
    eps = 1e-5
    y = torch.nn.functional.batch_norm(
        x, None, None, gamma.float(), beta.float(), training=True, eps=eps
    )
    c = where % channels
    y[0, c, 0, 0] += bump * (1 + float(y[0, c, 0, 0].abs()))  # a grid element (sample 0, 0, 0)
    stats = channel_stats(x)
    call = TrainCall(
        layer="bn",
        index=0,
        occurrence=0,
        training=True,
        standard=True,
        shape=tuple(x.shape),
        batch_size=8,
        samples_per_channel=stats.count if stats else 0,
        eps=eps,
        dtype=x.dtype,
        input_stats=stats,
        output_stats=None,
        grid_in=grid(x),
        grid_out=grid(y),
        gamma=gamma,
        beta=beta,
        stock=True,
    )
    expected = _oracle_flags(x, y, gamma, beta, eps)
    err = normalization_errors(call)
    assert (err is not None) == bool(expected), (expected, err)
    if err is not None:
        assert err["channel"] in expected
        assert set(np.flatnonzero(err["bad"].numpy())) == expected


def test_changed_in_names_the_buffers_a_second_capture_would() -> None:
    bn = nn.BatchNorm2d(3)
    bn.running_var[1] = float("nan")  # NaN left alone: not a change
    saved = BufferState.capture(bn)
    assert saved.changed_in(bn) == [] == saved.changed(BufferState.capture(bn))
    with torch.no_grad():
        bn.running_mean[0] += 1e-7
        bn.num_batches_tracked += 1
    assert saved.changed_in(bn) == ["running_mean", "num_batches_tracked"]
    assert saved.changed_in(bn) == saved.changed(BufferState.capture(bn))
    with torch.no_grad():
        bn.running_var.data = bn.running_var.double()  # a dtype change is a change
    assert "running_var" in saved.changed_in(bn)


def test_a_final_restore_skips_the_model_but_not_the_rngs_at_exit() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    random.seed(5)
    rng = torch.get_rng_state()
    py_rng = random.getstate()
    with preserved(model) as snapshot:
        with torch.no_grad():
            model[0].weight.add_(1.0)
        snapshot.restore(final=True)
        assert snapshot.settled
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        torch.rand(3)
        random.random()
    assert torch.equal(torch.get_rng_state(), rng)
    assert random.getstate() == py_rng


def test_a_restore_that_is_not_final_is_repeated_at_exit() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    before = [p.detach().clone() for p in model.parameters()]
    with preserved(model) as snapshot:
        snapshot.restore()  # e.g. between stages: more passes may follow
        assert not snapshot.settled
        with torch.no_grad():
            model[0].weight.mul_(3.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Pooled(nn.Module):
    """A model whose output has no row per sample (a scalar): the eval passes cannot screen
    on it and must record every BN call."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).sum()


def test_eval_batch_dependence_is_found_when_outputs_cannot_be_screened() -> None:
    from bn_mutants import BatchStatsInEvalBN

    import bncheck

    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = bncheck.audit(_Pooled(BatchStatsInEvalBN(4)), x, select=["eval-batch-dependence"])
    assert [(f.rule, f.layer) for f in report.findings] == [("eval-batch-dependence", "norm")]


def test_eval_batch_dependence_is_localised_after_the_screen_finds_a_difference() -> None:
    from bn_mutants import BatchStatsInEvalBN

    import bncheck

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), BatchStatsInEvalBN(4), nn.Flatten()
    )
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    report = bncheck.audit(model, x, select=["eval-batch-dependence"])
    assert [(f.rule, f.layer) for f in report.findings] == [("eval-batch-dependence", "1")]
    # a healthy model: the screen alone decides, and nothing is found
    healthy = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
    assert not bncheck.audit(healthy, x, select=["eval-batch-dependence"]).findings


def test_input_check_finds_nan_and_inf_and_accepts_a_sum_that_overflows() -> None:
    import pytest

    from bncheck.errors import InputError
    from bncheck.probes import validate_input

    x = torch.rand(4, 3, 8, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 1, 3, 3] = bad
        with pytest.raises(InputError, match="NaN/Inf"):
            validate_input(y)
    validate_input(torch.full((4, 8), 3e38))  # finite values whose float32 sum is inf
    validate_input(torch.full((4, 8), 60000.0, dtype=torch.float16))


def test_integer_valued_inputs_are_told_from_float_ones() -> None:
    from bncheck.probes import _summary

    assert _summary("x", (3,), torch.tensor([0.0, 255.0, 17.0])).integer_valued
    assert not _summary("x", (3,), torch.tensor([0.0, 255.0, 17.5])).integer_valued  # interior
    assert not _summary("x", (2,), torch.tensor([0.25, 1.0])).integer_valued
    assert not _summary("x", (2,), torch.tensor([0.0, float("inf")])).integer_valued


def test_saved_buffers_restore_and_compare_all_modules_at_once() -> None:
    from bncheck.probes import _SavedBuffers

    bns = [nn.BatchNorm2d(3), nn.BatchNorm1d(5)]
    before = [
        (b.running_mean.clone(), b.running_var.clone(), int(b.num_batches_tracked)) for b in bns
    ]
    saved = _SavedBuffers(bns)
    assert saved.unchanged()
    with torch.no_grad():
        bns[0].train()(torch.randn(4, 3, 2, 2))  # updates all three buffers
    assert not saved.unchanged()
    saved.restore()
    assert saved.unchanged()
    for b, (rm, rv, nbt) in zip(bns, before):
        assert torch.equal(b.running_mean, rm) and torch.equal(b.running_var, rv)
        assert int(b.num_batches_tracked) == nbt
    # a buffer rebound to another shape: put back module by module, where shapes allow
    bns[1].running_mean = torch.ones(7)
    assert not saved.unchanged()
    saved.restore()
    assert torch.equal(bns[1].running_var, before[1][1])


class _Labels(nn.Module):
    """Integer outputs (class indices): nothing the screen can compare."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).flatten(1).argmax(1)


def test_eval_batch_dependence_is_found_when_outputs_are_integers() -> None:
    from bn_mutants import BatchStatsInEvalBN

    import bncheck

    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    report = bncheck.audit(_Labels(BatchStatsInEvalBN(4)), x, select=["eval-batch-dependence"])
    assert [(f.rule, f.layer) for f in report.findings] == [("eval-batch-dependence", "norm")]


def test_parameters_and_buffers_are_restored_by_value_once_per_audit() -> None:
    """The one comparison at the end of ``preserved`` puts back writes made through
    ``.data`` (no version bump), in-place ops, a resize through ``.data``, and leaves NaN
    values that were there before."""
    big = nn.Linear(300, 300)
    model = nn.Sequential(big, nn.BatchNorm1d(300), nn.Linear(300, 2))
    model[1].running_var[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with preserved(model), torch.no_grad():
        model[2].weight.data.add_(1.0)  # through .data: no version bump
        model[1].bias.mul_(2.0)
        model[1].running_var.fill_(7.0)
        big.weight.add_(1.0)
        model[2].bias.data = torch.zeros(5)  # resized through .data
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(torch.nan_to_num(after[key]), torch.nan_to_num(value)), key
        assert after[key].shape == value.shape
    assert torch.isnan(model[1].running_var[3])


class _Remembers(nn.Module):
    """A forward that keeps things in plain containers of the module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.history: list = ["kept"]
        self.seen: dict = {"calls": 0}
        self.shapes: set = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        self.history.append(y.detach())
        self.history[0] = y.detach()  # an item replaced by a tensor
        self.seen["calls"] += 1
        self.shapes.add(tuple(x.shape))
        return y


def test_an_audit_puts_back_the_contents_of_list_dict_and_set_attributes() -> None:
    import bncheck

    model = _Remembers()
    history, seen, shapes = model.history, model.seen, model.shapes
    bncheck.audit(model, torch.randn(4, 3, 6, 6))
    assert model.history is history and history == ["kept"]
    assert model.seen is seen and seen == {"calls": 0}
    assert model.shapes is shapes and shapes == set()


def test_float64_grid_is_a_copy_that_an_inplace_relu_cannot_change() -> None:
    import bncheck

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
    ).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    report = bncheck.audit(model, x, select=["normalization"])
    assert report.findings == [] and not report.skipped


def test_a_user_hook_that_replaces_a_layer_output_keeps_the_trace() -> None:
    import bncheck

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model[0].register_forward_hook(lambda mod, args, out: out * 1.0)
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    report = bncheck.audit(model, x, select=["bias-before-bn"])
    assert [(f.rule, f.layer) for f in report.findings] == [("bias-before-bn", "1")]


class _AlwaysBatch(nn.BatchNorm2d):
    """Normalises with batch statistics in eval mode too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps
        )


class _Rounded(nn.Module):
    """Outputs rounded to integers: a batch dependence inside may not show in them."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = _AlwaysBatch(8)
        self.c2 = nn.Conv2d(8, 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(self.c2(torch.relu(self.bn(self.c(x)))).mean((2, 3)) * 1e-3)


def test_eval_batch_dependence_hidden_by_rounded_outputs_is_still_found() -> None:
    import bncheck

    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(7))
    report = bncheck.audit(_Rounded().eval(), x, select=["eval-batch-dependence"])
    assert [(f.rule, f.layer) for f in report.findings] == [("eval-batch-dependence", "bn")]


def test_an_infinite_value_gives_an_infinite_channel_mean() -> None:
    for shape, where in (((64, 16), (3, 2)), ((4, 8, 16, 16), (0, 5, 0, 0))):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
        for value in (float("inf"), -float("inf")):
            y = x.clone()
            y[where] = value
            stats = channel_stats(y)
            assert stats is not None
            assert float(stats.mean[where[1]]) == value
            finite = [c for c in range(shape[1]) if c != where[1]]
            assert torch.isfinite(stats.mean[finite]).all()


def test_a_list_holding_one_batched_tensor_is_not_a_list_of_images() -> None:
    from bncheck.probes import _batch_to_input

    x = torch.randn(4, 3, 8, 8)
    mask = torch.randn(4, 3, 8, 8)
    assert _batch_to_input([x, mask], [x]) is x
    images = [torch.randn(3, 8, 8) for _ in range(2)]
    assert _batch_to_input(images, [torch.randn(3, 8, 8)]) is images


@SETTINGS
@given(
    shape=st.sampled_from([(8, 3, 5, 5), (4, 2, 60, 70), (16, 5, 3), (2, 3, 4, 4, 4), (5, 4, 1)]),
    offset_in_sds=st.sampled_from([0.0, 0.5, 1.0, 2.5, 3.0, 5.0, 5.6, 10.0, 1e3]),
    scale=st.sampled_from([1e-3, 1.0, 40.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**16),
    plain=st.booleans(),
)
def test_channel_variance_error_grows_at_most_linearly_with_the_mean_offset(
    shape: tuple[int, ...],
    offset_in_sds: float,
    scale: float,
    dtype: torch.dtype,
    channels_last: bool,
    seed: int,
    plain: bool,
) -> None:
    """The rules' round-off budgets (``normalization``, ``ema-update``) grow linearly in
    rho = |mean| / sd. Sums taken without a shift lose precision as 1 + rho^2, so the plain
    (unshifted) path may only serve well-conditioned channels: against a float64 oracle,
    |var error| <= 8 u (1 + log2 n) var (1 + rho) whatever the offset, in every layout, on
    both paths (``plain``: CPU; otherwise: other devices)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    x += (
        offset_in_sds
        * scale
        * torch.linspace(-1, 1, shape[1], dtype=torch.float64).reshape(
            [1, -1] + [1] * (len(shape) - 2)
        )
    )
    x = x.to(dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    values = x.double().transpose(0, 1).reshape(shape[1], -1)  # oracle: plain float64
    n = values.shape[1]
    mean = values.mean(1)
    var = ((values - mean[:, None]) ** 2).mean(1)
    rho = mean.abs() / var.sqrt()
    u = torch.finfo(dtype).eps
    bound = 8 * u * (1 + math.log2(n)) * var * (1 + rho)
    stats = channel_stats(x, plain)
    assert stats is not None
    assert ((stats.var - var).abs() <= bound).all(), ((stats.var - var).abs() / bound).max()
    assert ((stats.mean - mean).abs() <= 8 * u * (1 + math.log2(n)) * values.abs().amax(1)).all()


def test_finishing_many_readings_together_equals_finishing_each_alone() -> None:
    """``finish_all`` runs the float64 arithmetic once over readings of one batch size and
    kind (plain sums, shifted sums, fused rows; different widths and lengths, float32 and
    float64): each result must equal that reading's own ``finish``."""
    from bncheck.probes import finish_all, read_stats

    gen = torch.Generator().manual_seed(5)
    tensors = [
        torch.randn(6, 3, 4, 4, generator=gen),
        torch.randn(6, 5, 7, generator=gen, dtype=torch.float64) * 3 + 1,
        torch.randn(6, 2, 3, 3, generator=gen) + 100.0,  # ill-conditioned: shifted sums
        torch.randn(4, 3, 5, 5, generator=gen),  # another batch size
        torch.randn(6, 4, generator=gen),  # one value per row
    ]
    raws = [read_stats(t, plain) for t in tensors for plain in (True, False)]
    assert {raw.kind for raw in raws if raw is not None} == {"sums", "rows", "values"}
    together = finish_all([raw for raw in raws if raw is not None])
    for raw in raws:
        assert raw is not None
        alone = raw.finish()
        got = together[id(raw)]
        assert torch.equal(got.mean, alone.mean) and torch.equal(got.var, alone.var)
        if alone.sample_var is None:
            assert got.sample_var is None
        else:
            assert got.sample_var is not None and got.sample_sq_var is not None
            assert torch.allclose(got.sample_var, alone.sample_var, rtol=1e-12, atol=0)
            assert torch.allclose(got.sample_sq_var, alone.sample_sq_var, rtol=1e-12, atol=0)


def _bn_call(
    gen: torch.Generator,
    channels: int,
    shape_rest: tuple[int, ...],
    dtype: torch.dtype,
    momentum: float | None,
    offset: float,
) -> TrainCall:
    """One train-mode call of a real ``nn.BatchNorm`` layer, recorded as the audit does
    (input statistics, element grids, gamma/beta, buffers before and after)."""
    dims = len(shape_rest)
    bn = (nn.BatchNorm1d if dims <= 1 else nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(
        channels, momentum=momentum
    ).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(generator=gen)
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.num_batches_tracked.fill_(3)
    x = (torch.randn(6, channels, *shape_rest, generator=gen, dtype=torch.float64) + offset).to(
        dtype
    )
    before = BufferState.capture(bn)
    with torch.no_grad():
        y = bn.train()(x)
    stats = channel_stats(x)
    assert stats is not None
    call = TrainCall(
        layer=f"bn{int(torch.randint(0, 10**6, (1,), generator=gen))}",
        index=0,
        occurrence=0,
        training=True,
        standard=True,
        shape=tuple(x.shape),
        batch_size=6,
        samples_per_channel=stats.count,
        eps=bn.eps,
        momentum=momentum,
        has_momentum=True,
        track_running_stats=True,
        dtype=dtype,
        input_stats=stats,
        grid_in=grid(x),
        grid_out=grid(y),
        gamma=bn.weight.detach().double(),
        beta=bn.bias.detach().double(),
        before=before,
        after=BufferState.capture(bn),
        stock=True,
    )
    return call


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    specs=st.lists(
        st.tuples(
            st.integers(1, 5),  # channels
            st.sampled_from([(), (3,), (4, 5), (2, 3, 3), (1, 1)]),
            st.sampled_from([torch.float32, torch.float64]),
            st.sampled_from([0.1, 0.01, None]),
            st.sampled_from([0.0, 5.0]),
            # what to break: nothing, running_mean, running_var, the counter
            st.sampled_from(["none", "mean", "var", "counter", "nan"]),
            st.sampled_from([3e-7, 1e-6, 2e-6, 1e-5, 3e-5, 1e-4, 1e-3]),  # near the tolerances
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_the_batched_ema_screen_leaves_out_only_calls_the_per_call_check_passes(
    seed: int, specs: list[tuple]
) -> None:
    """``ema_suspects`` judges all calls in one evaluation; the rule runs the per-call check
    only on the suspects. A call left out must be one the per-call check passes, whatever
    the mix of shapes, dtypes, momenta and breakages near the tolerance; and an intact call
    of a real BN layer is left out (the screen does its job)."""
    from bncheck.checks.forward import ema_errors, ema_suspects

    gen = torch.Generator().manual_seed(seed)
    calls, broken = [], []
    for channels, rest, dtype, momentum, offset, breaking, size in specs:
        call = _bn_call(gen, channels, rest, dtype, momentum, offset)
        c = int(torch.randint(0, channels, (1,), generator=gen))
        after = call.after
        assert after is not None
        if breaking == "mean":
            after.running_mean[c] += size * (1 + abs(float(after.running_mean[c])))
        elif breaking == "var":
            after.running_var[c] *= 1 + size
        elif breaking == "counter":
            after.num_batches_tracked = (after.num_batches_tracked or 0) + 1
        elif breaking == "nan":
            after.running_var[c] = float("nan")
        calls.append(call)
        broken.append(breaking != "none")
    suspects = ema_suspects(calls)
    for call, was_broken in zip(calls, broken):
        if id(call) not in suspects:
            assert ema_errors(call) is None
        if not was_broken:
            assert id(call) not in suspects


def test_first_difference_finds_one_ulp_after_the_joined_comparison() -> None:
    """``first_difference`` first compares all BN outputs and model outputs of two eval
    passes at once; a one-ulp change in any of them, a dtype mismatch, or NaN must still
    reach the pair-by-pair path and come out as it did before."""
    from bncheck.probes import EvalCall, EvalPass, first_difference

    gen = torch.Generator().manual_seed(0)

    def passes(dtype_b: torch.dtype = torch.float32) -> tuple[EvalPass, EvalPass]:
        outs = [torch.randn(2, 3, 4, generator=gen) for _ in range(3)]
        model_out = torch.randn(2, 5, generator=gen)
        p = EvalPass([EvalCall(f"bn{i}", 0, o, o) for i, o in enumerate(outs)], [model_out])
        q = EvalPass(
            [EvalCall(f"bn{i}", 0, o.clone(), o.clone().to(dtype_b)) for i, o in enumerate(outs)],
            [model_out.clone()],
        )
        return p, q

    p, q = passes()
    assert first_difference(p, q, slice(0, 1), 0.0) is None
    out = q.calls[1].output
    assert out is not None
    out[0, 2, 3] = torch.nextafter(out[0, 2, 3], torch.tensor(math.inf))
    found = first_difference(p, q, slice(0, 1), 0.0)
    assert found is not None and found[0] == "bn1"
    assert first_difference(p, q, slice(1, 2), 0.0) is None  # only sample 0 changed
    p, q = passes()
    q.outputs[0][0, 4] += 1.0
    found = first_difference(p, q, slice(0, 1), 0.0)
    assert found is not None and found[0] is None  # only the model output differs
    p, q = passes(torch.float64)  # another dtype: compared pair by pair
    found = first_difference(p, q, slice(0, 1), 1e-6)
    assert found is None
    p, q = passes()
    for call in (p.calls[0], q.calls[0]):
        assert call.output is not None
        call.output[0, 0, 0] = math.nan  # NaN in the same place in both: no difference
    assert first_difference(p, q, slice(0, 1), 0.0) is None


def _within_budget(x: torch.Tensor, plain: bool) -> float:
    """The largest variance error of ``channel_stats(x)`` over 8 u (1 + log2 n) var
    (1 + |mean| / sd), against a float64 oracle."""
    values = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    n = values.shape[1]
    mean = values.mean(1)
    var = ((values - mean[:, None]) ** 2).mean(1)
    budget = 8 * torch.finfo(x.dtype).eps * (1 + math.log2(n)) * var * (1 + mean.abs() / var.sqrt())
    stats = channel_stats(x, plain)
    assert stats is not None
    return float(((stats.var - var).abs() / budget.clamp_min(1e-300)).max())


@pytest.mark.parametrize("plain", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("data", ["plus-minus", "pixels"])
def test_sums_of_squares_of_repeating_values_stay_within_the_budget(
    data: str, layout: str, plain: bool
) -> None:
    """Long rows of repeating values (+-a; integer pixels 0..255): a sum of squares added one
    after another per vector lane (a 2-norm) drifts by thousands of u there and gave
    correct BN layers ema-update and normalization errors; the cascade sum does not."""
    gen = torch.Generator().manual_seed(0)
    if data == "plus-minus":
        a = math.sqrt(1 + 2**-10 - 2**-20)
        x = (torch.randint(0, 2, (1, 2, 512, 512), generator=gen).float() * 2 - 1) * a
    else:
        x = torch.randint(0, 256, (2, 3, 224, 224), generator=gen).float()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert _within_budget(x, plain) <= 1.0


def test_raw_pixels_into_a_correct_bn_layer_give_no_ema_or_normalization_finding() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 224, 224)).float()
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, stride=4))
    report = bncheck.audit(model, x, select=["ema-update", "normalization"])
    assert report.findings == []


def test_squares_past_float32_range_take_the_shifted_way() -> None:
    """Values whose squares overflow float32 while their deviations' squares do not: the
    plain sums hold Inf, and the screen must send the tensor the shifted way (exact var)."""
    torch.manual_seed(0)
    x = (torch.randn(4, 2, 64, 64) + 2.5) * 3.2e16  # mean^2 = 6.25 var: well conditioned
    stats = channel_stats(x, plain=True)
    assert stats is not None and bool(torch.isfinite(stats.var).all())
    assert _within_budget(x, plain=True) <= 1.0


@pytest.mark.parametrize("plain", [None, True, False])
def test_statistics_of_strided_views_of_repeating_values_stay_within_the_budget(
    plain: bool | None,
) -> None:
    """A BN input that is a view whose dims do not merge (a crop, a ``::2`` slice, an
    ``expand``): PyTorch sums such a view row after row, not by cascade, and on repeating
    values (stripes, padding) the plain sum of the view drifted 350 times past the budget."""
    stripes = 0.3 + 0.35 * (torch.arange(130) % 3).float()
    full = stripes.expand(1, 2, 4096, 130).contiguous()
    for view in (
        full[..., :2],
        full[..., 1:129],
        full[:, :, :, ::2],
        stripes[:64].expand(2, 3, 512, 64),
    ):
        assert not view.is_contiguous()
        assert _within_budget(view, plain) <= 1.0


@pytest.mark.parametrize("plain", [None, True, False])
@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (8, 3, 256, 256)])
def test_finite_values_whose_squares_overflow_float32_are_summed_wider(
    shape: tuple[int, ...], plain: bool | None
) -> None:
    """float32 values near 1e18: their squares pass float32's range in every path (PyTorch's
    fused kernel included), the statistics must not."""
    torch.manual_seed(0)
    x = torch.randn(*shape) * 1e18
    stats = channel_stats(x, plain)
    assert stats is not None
    true = x.double().var((0, 2, 3), unbiased=False)
    assert bool(((stats.var - true).abs() <= 1e-6 * true).all())


def test_an_overflowing_bn_layer_is_reported_without_numpy_warnings() -> None:
    """At 1e18 PyTorch's own float32 BN overflows (running_var inf, output 0): the audit says
    so, and the NaN/Inf arithmetic of its rules warns nobody."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(8, 3, 64, 64) * 1e18
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = bncheck.audit(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), x)
    found = {f.rule: f for f in report.findings}
    assert {"ema-update", "normalization"} <= set(found)
    for rule in ("ema-update", "normalization"):  # the cause, not an implementation bug
        assert "range of its dtype" in found[rule].message
    assert "overflowed" in found["ema-update"].message


@pytest.mark.parametrize("plain", [None, True, False])
@pytest.mark.parametrize(
    ("shape", "scale"),
    [
        ((16, 8, 64, 64), 1e35),
        ((2, 1, 512, 512), 1e33),
        ((2, 2, 100, 100), 1e37),
        ((2, 2, 8, 8), 1e38),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_whose_sums_overflow_float32_keep_their_mean_and_variance(
    shape: tuple[int, ...], scale: float, dtype: torch.dtype, plain: bool | None
) -> None:
    """Finite values near float32's top: not only their squares, their sums pass its range.
    The reading is redone in float64 when the data is finite (NaN/Inf data is carried)."""
    torch.manual_seed(0)
    x = ((torch.rand(shape, dtype=torch.float64) + 1) * scale).to(dtype)
    stats = channel_stats(x, plain)
    assert stats is not None
    values = x.double().transpose(0, 1).reshape(shape[1], -1)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    assert bool(((stats.mean - mean).abs() <= 1e-6 * mean.abs()).all())
    assert bool(((stats.var - var).abs() <= 1e-5 * var).all())

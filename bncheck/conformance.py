"""A property-based conformance test for custom BatchNorm layers.

:func:`check_conformance` draws layer configurations, input shapes and sequences of
train/eval forward passes with hypothesis, runs the layer under test, and compares its
outputs, ``running_mean``, ``running_var`` and ``num_batches_tracked`` after every step with
:class:`ReferenceBatchNorm`, PyTorch's semantics written out in numpy float64.

Why a numpy oracle and not ``nn.BatchNormNd`` with copied state: the oracle is independent of
the code it judges (a regression in PyTorch's kernels, or a custom layer that subclasses
``_BatchNorm`` and inherits a bug, cannot make both sides agree), it runs in float64 so the
only round-off in a comparison is the layer's own, and each formula is written down once,
here, where a reader can check it against PyTorch's documentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .diagnosis import running_update_mistake
from .errors import ConformanceFailure, UsageError, first_line
from .state import RNGState
from .strategies import BNConfig, bn_configs, layouts_for_dims, make_input

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "check_conformance",
    "ConformanceFailure",
    "ConformanceCase",
    "Step",
    "ReferenceBatchNorm",
    "conformance_cases",
    "supported_spatial_ranks",
]

#: ``factory(num_features, *, eps, momentum, affine, track_running_stats) -> nn.Module``
Factory = Callable[..., "nn.Module"]

_LAYOUT_NAMES = {0: "(N, C)", 1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


class ReferenceBatchNorm:
    """PyTorch's ``nn.BatchNormNd`` semantics in numpy float64 (the oracle).

    For an input ``x`` of shape ``(N, C, *spatial)`` statistics are per channel over the
    ``n = N * prod(spatial)`` values of that channel:

    * the batch mean ``mu = sum(x) / n`` and the *biased* batch variance
      ``var_b = sum((x - mu)**2) / n`` normalise in train mode (and in eval mode when there
      are no running statistics): ``y = (x - mu) / sqrt(var_b + eps) * weight + bias``;
    * in train mode with ``track_running_stats``, ``num_batches_tracked += 1`` and the running
      statistics move by ``running = (1 - f) * running + f * batch_stat`` where
      ``f = momentum``, or ``f = 1 / num_batches_tracked`` (after the increment) when momentum
      is None; running_var folds in the *unbiased* variance ``var_u = var_b * n / (n - 1)``;
    * in eval mode with running statistics, ``y = (x - running_mean) / sqrt(running_var + eps)
      * weight + bias`` and nothing is updated.

    Running statistics start at mean 0, variance 1, ``num_batches_tracked`` 0; without
    ``affine``, weight is 1 and bias 0.
    """

    def __init__(
        self, config: BNConfig, weight: np.ndarray | None = None, bias: np.ndarray | None = None
    ) -> None:
        c = config.num_features
        self.config = config
        self.weight = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
        self.bias = np.zeros(c) if bias is None else np.asarray(bias, dtype=np.float64)
        self.running_mean: np.ndarray | None = None
        self.running_var: np.ndarray | None = None
        self.num_batches_tracked: int | None = None
        if config.track_running_stats:
            self.running_mean = np.zeros(c)
            self.running_var = np.ones(c)
            self.num_batches_tracked = 0

    @staticmethod
    def batch_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Per-channel mean, biased variance and value count ``n`` of ``x`` (N, C, ...)."""
        axes = (0, *range(2, x.ndim))
        n = x.size // x.shape[1]
        mean = x.mean(axis=axes)
        var_biased = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)
        return mean, var_biased, n

    def normalize(self, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        eps = self.config.eps
        scale = self.weight / np.sqrt(var + eps)
        shifted: np.ndarray = x - _per_channel(mean, x.ndim)
        out: np.ndarray = shifted * _per_channel(scale, x.ndim) + _per_channel(self.bias, x.ndim)
        return out

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """The output for ``x``; in train mode also updates the running statistics."""
        if training or self.running_mean is None or self.running_var is None:
            mean, var_biased, n = self.batch_stats(x)
            if training and self.running_mean is not None and self.running_var is not None:
                assert self.num_batches_tracked is not None
                self.num_batches_tracked += 1
                m = self.config.momentum
                f = 1.0 / self.num_batches_tracked if m is None else m
                self.running_mean = (1 - f) * self.running_mean + f * mean
                self.running_var = (1 - f) * self.running_var + f * var_biased * n / (n - 1)
            return self.normalize(x, mean, var_biased)
        return self.normalize(x, self.running_mean, self.running_var)


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


# ---- drawn cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One forward pass: mode, batch size, and the seed, scale and shift of its input."""

    training: bool
    batch_size: int
    seed: int
    scale: float = 1.0
    shift: float = 0.0


@dataclass(frozen=True)
class ConformanceCase:
    """A layer configuration, a spatial shape, the steps, and the seed of weight and bias."""

    config: BNConfig
    spatial: tuple[int, ...]
    steps: tuple[Step, ...]
    param_seed: int = 0

    def input_shape(self, step: Step) -> tuple[int, ...]:
        return (step.batch_size, self.config.num_features, *self.spatial)


def conformance_cases(
    *,
    spatial_ranks: Iterable[int] = (0, 1, 2, 3),
    configs: st.SearchStrategy[BNConfig] | None = None,
    max_steps: int = 4,
    max_batch: int = 5,
    max_side: int = 4,
) -> st.SearchStrategy[ConformanceCase]:
    """Cases with every batch holding at least 2 values per channel."""
    ranks = tuple(spatial_ranks)
    config_strategy = configs if configs is not None else bn_configs()

    @st.composite
    def cases(draw: st.DrawFn) -> ConformanceCase:
        config = draw(config_strategy)
        rank = draw(st.sampled_from(ranks))
        spatial = tuple(draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank)))
        min_batch = 2 if math.prod(spatial) == 1 else 1
        step = st.builds(
            Step,
            training=st.booleans(),
            batch_size=st.integers(min_batch, max(min_batch, max_batch)),
            seed=st.integers(0, 2**16),
            scale=st.sampled_from([1.0, 0.5, 3.0]),
            shift=st.sampled_from([0.0, 1.0, 5.0]),
        )
        steps = tuple(draw(st.lists(step, min_size=1, max_size=max_steps)))
        return ConformanceCase(config, spatial, steps, draw(st.integers(0, 2**16)))

    return cases()


# ---- comparing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tolerance:
    rtol: float
    atol: float


def _mismatch(observed: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> str | None:
    """``None`` if ``|observed - expected| <= bound`` everywhere; else a description."""
    if observed.shape != expected.shape:
        return f"shape {tuple(observed.shape)}, expected {tuple(expected.shape)}"
    error = np.abs(observed - expected)
    bad = ~(error <= bound)  # NaN counts as bad
    if not bad.any():
        return None
    worst = int(np.argmax(np.where(bad, np.nan_to_num(error, nan=np.inf), -1.0)))
    per_channel = (
        bad if bad.ndim == 1 else np.moveaxis(bad, 1, 0).reshape(bad.shape[1], -1).any(axis=1)
    )
    channels = np.nonzero(per_channel)[0].tolist()
    shown = ", ".join(map(str, channels[:3])) + (
        f", +{len(channels) - 3}" if len(channels) > 3 else ""
    )
    return (
        f"max |obs-exp| = {error.flat[worst]:.3g} > tol {bound.flat[worst]:.3g} "
        f"(obs {observed.flat[worst]:.6g}, exp {expected.flat[worst]:.6g}; "
        f"channel{'s' if len(channels) != 1 else ''} {shown})"
    )


def _close(observed: np.ndarray, candidate: np.ndarray, bound: np.ndarray) -> bool:
    return observed.shape == candidate.shape and bool((np.abs(observed - candidate) <= bound).all())


def _to_numpy(t: Any) -> np.ndarray:
    values: np.ndarray = t.detach().to("cpu").double().numpy()
    return values


@dataclass(frozen=True)
class _Update:
    """What one step should do to the running statistics (for bounds and diagnoses)."""

    training: bool
    factor: float
    prev_mean: np.ndarray
    prev_var: np.ndarray
    mean: np.ndarray
    var_biased: np.ndarray
    n: int

    def prev(self, name: str) -> np.ndarray:
        return self.prev_mean if name == "running_mean" else self.prev_var

    def batch(self, name: str) -> np.ndarray:
        """The batch statistic folded into ``name`` (unbiased variance for running_var)."""
        if name == "running_mean":
            return self.mean
        return self.var_biased * self.n / (self.n - 1)


def _describe_config(name: str, cfg: BNConfig) -> str:
    return (
        f"{name}({cfg.num_features}, eps={cfg.eps:g}, momentum={cfg.momentum}, "
        f"affine={cfg.affine}, track_running_stats={cfg.track_running_stats})"
    )


def _flips(cfg: BNConfig) -> list[tuple[str, BNConfig]]:
    """``(bn_configs argument, config)`` for each unusual setting of ``cfg`` set back to
    nn.BatchNorm's default."""
    flips = []
    if not cfg.track_running_stats:
        flips.append(("track_running_stats=True", replace(cfg, track_running_stats=True)))
    if cfg.momentum is None:
        flips.append(("allow_momentum_none=False", replace(cfg, momentum=0.1)))
    if not cfg.affine:
        flips.append(("affine=True", replace(cfg, affine=True)))
    return flips


def _runs(factory: Factory, cfg: BNConfig, shape: tuple[int, ...]) -> bool:
    """Whether a layer of ``cfg`` builds and runs a train and an eval forward on ``shape``."""
    import torch

    try:
        layer = factory(cfg.num_features, **cfg.kwargs)
        x = make_input(shape, 0)
        with torch.no_grad():
            layer.train()
            layer(x)
            layer.eval()
            layer(x)
    except Exception:
        return False
    return True


def _restriction(factory: Factory, cfg: BNConfig, shape: tuple[int, ...]) -> str:
    """A ``configs=`` argument that leaves out what makes ``cfg`` fail: the one unusual
    setting whose change lets the layer run, else all of them."""
    flips = _flips(cfg)
    working = [arg for arg, other in flips if _runs(factory, other, shape)]
    parts = working[:1] or [arg for arg, _ in flips]
    if not parts:
        parts = [f"eps={cfg.eps:g}, momentum={cfg.momentum}"]
    return f"configs=bncheck.strategies.bn_configs({', '.join(parts)})"


def layer_raised(
    factory: Factory,
    name: str,
    cfg: BNConfig,
    shape: tuple[int, ...],
    where: str,
    exc: Exception,
) -> ConformanceFailure:
    """The failure for a layer that raised on a configuration ``nn.BatchNorm`` accepts."""
    return ConformanceFailure(
        f"check_conformance: {_describe_config(name, cfg)} raised {first_line(exc)} {where}; "
        f"nn.BatchNorm accepts this configuration - if the layer is not meant to support it, "
        f"restrict the drawn configurations, e.g. check_conformance(factory, "
        f"{_restriction(factory, cfg, shape)})"
    )


class _Run:
    """Runs one case against one layer; raises ConformanceFailure at the first difference."""

    def __init__(
        self, factory: Factory, case: ConformanceCase, tol: _Tolerance, dtype: torch.dtype
    ) -> None:
        import torch

        self.case = case
        self.tol = tol
        self.dtype = dtype
        self.factory = factory
        cfg = case.config
        try:
            self.layer = factory(cfg.num_features, **cfg.kwargs).to(dtype)
        except Exception as exc:  # the factory refuses a configuration nn.BatchNorm accepts
            shape = case.input_shape(case.steps[0])
            name = getattr(factory, "__name__", type(factory).__name__)
            raise layer_raised(factory, name, cfg, shape, "at construction", exc) from exc
        weight = bias = None
        if cfg.affine:
            generator = torch.Generator().manual_seed(case.param_seed)
            with torch.no_grad():
                for name, center in (("weight", 1.0), ("bias", 0.0)):
                    param = getattr(self.layer, name, None)
                    if isinstance(param, torch.Tensor) and param.shape == (cfg.num_features,):
                        values = center + 0.5 * torch.randn(cfg.num_features, generator=generator)
                        param.copy_(values.to(param.dtype))
            w, b = getattr(self.layer, "weight", None), getattr(self.layer, "bias", None)
            weight = _to_numpy(w) if isinstance(w, torch.Tensor) else None
            bias = _to_numpy(b) if isinstance(b, torch.Tensor) else None
        self.reference = ReferenceBatchNorm(cfg, weight, bias)

    def fail(self, where: str, what: str, hint: str | None) -> NoReturn:
        __tracebackhide__ = True
        cfg = self.case.config
        raise ConformanceFailure(
            f"check_conformance: {_describe_config(type(self.layer).__name__, cfg)} differs "
            f"from PyTorch's BatchNorm {where}: {what}" + (f" - {hint}" if hint else "")
        )

    def check_buffers(self, where: str, update: _Update | None) -> None:
        """Compare running statistics and the counter with the oracle's.

        ``update`` describes the step just taken (``None`` right after construction)."""
        __tracebackhide__ = True
        ref = self.reference
        if ref.running_mean is None or ref.running_var is None:
            return
        rm = getattr(self.layer, "running_mean", None)
        rv = getattr(self.layer, "running_var", None)
        if rm is None or rv is None:
            self.fail(
                where,
                "the layer has no running_mean/running_var buffers with track_running_stats=True",
                "register them as buffers",
            )
        for name, obs_t, exp in (
            ("running_mean", rm, ref.running_mean),
            ("running_var", rv, ref.running_var),
        ):
            observed = _to_numpy(obs_t)
            size = np.abs(exp)
            if update is not None and update.training:
                size = size + np.abs(update.prev(name)) + np.abs(update.batch(name))
            bound = self.tol.atol + self.tol.rtol * size
            problem = _mismatch(observed, exp, bound)
            if problem is not None:
                self.fail(
                    where, f"{name}: {problem}", self.diagnose_buffer(name, observed, bound, update)
                )
        nbt = getattr(self.layer, "num_batches_tracked", None)
        if nbt is not None and ref.num_batches_tracked is not None:
            observed_count = int(nbt.reshape(-1)[0])
            if observed_count != ref.num_batches_tracked:
                self.fail(
                    where,
                    f"num_batches_tracked = {observed_count}, expected {ref.num_batches_tracked}",
                    "it counts train-mode forwards with track_running_stats, whatever the momentum",
                )

    def diagnose_buffer(
        self, name: str, observed: np.ndarray, bound: np.ndarray, update: _Update | None
    ) -> str | None:
        """A known mistake the observed value matches, if any."""
        if update is None:
            return "PyTorch starts running statistics at mean 0, variance 1"
        prev = update.prev(name)
        if not update.training:
            if not _close(observed, prev, bound):
                return "an eval-mode forward changed it; in eval mode PyTorch updates nothing"
            return None
        return running_update_mistake(
            name,
            observed,
            prev,
            update.batch(name),
            update.factor,
            bound,
            biased_var=update.var_biased,
            n=update.n,
            momentum_none=self.case.config.momentum is None,
        )

    def run(self) -> None:
        __tracebackhide__ = True
        import torch

        self.check_buffers("after construction", None)
        ref = self.reference
        total = len(self.case.steps)
        for index, step in enumerate(self.case.steps, start=1):
            shape = self.case.input_shape(step)
            x = make_input(shape, step.seed, scale=step.scale, shift=step.shift, dtype=self.dtype)
            x64 = _to_numpy(x)
            where = (
                f"at step {index} of {total} ({'train' if step.training else 'eval'}, "
                f"input {tuple(shape)})"
            )
            mean, var_b, n = ReferenceBatchNorm.batch_stats(x64)
            update = None
            if ref.running_mean is not None and ref.running_var is not None:
                count = (ref.num_batches_tracked or 0) + 1
                m = self.case.config.momentum
                update = _Update(
                    step.training,
                    1.0 / count if m is None else m,
                    ref.running_mean.copy(),
                    ref.running_var.copy(),
                    mean,
                    var_b,
                    n,
                )
            self.layer.train(step.training)
            try:
                with torch.no_grad():
                    out = self.layer(x)
            except Exception as exc:  # the layer's own forward raised for this configuration
                raise layer_raised(
                    self.factory, type(self.layer).__name__, self.case.config, shape, where, exc
                ) from exc
            expected = ref.forward(x64, step.training)
            observed = _to_numpy(out)
            run_mean = update.prev_mean if update is not None else None
            run_var = update.prev_var if update is not None else None
            bound = self.output_bound(x64, expected, step.training, mean, var_b, run_mean, run_var)
            problem = _mismatch(observed, expected, bound)
            if problem is not None:
                hint = self.diagnose_output(
                    observed, x64, bound, step.training, mean, var_b, n, run_mean, run_var
                )
                self.fail(where, f"output: {problem}", hint)
            self.check_buffers(where, update)

    def output_bound(
        self,
        x: np.ndarray,
        expected: np.ndarray,
        training: bool,
        mean: np.ndarray,
        var_b: np.ndarray,
        run_mean: np.ndarray | None,
        run_var: np.ndarray | None,
    ) -> np.ndarray:
        """Round-off bound of a float32 BN output: ``rtol`` times the size of the terms
        (``|x| + |mean|`` scaled by ``|weight| / sqrt(var + eps)``, plus ``|y|``)."""
        use_batch = training or run_mean is None or run_var is None
        mu = mean if use_batch else run_mean
        var = var_b if use_batch else run_var
        assert mu is not None and var is not None
        ndim = x.ndim
        gain = np.abs(self.reference.weight) / np.sqrt(np.maximum(var, 0) + self.case.config.eps)
        terms = (np.abs(x) + _per_channel(np.abs(mu), ndim)) * _per_channel(gain, ndim)
        bound: np.ndarray = self.tol.atol + self.tol.rtol * (np.abs(expected) + terms)
        return bound

    def diagnose_output(
        self,
        observed: np.ndarray,
        x: np.ndarray,
        bound: np.ndarray,
        training: bool,
        mean: np.ndarray,
        var_b: np.ndarray,
        n: int,
        run_mean: np.ndarray | None,
        run_var: np.ndarray | None,
    ) -> str | None:
        ref = self.reference
        candidates: list[tuple[np.ndarray, str]] = []
        if not training and run_mean is not None and run_var is not None:
            candidates.append(
                (
                    ref.normalize(x, mean, var_b),
                    "it matches normalising with the batch statistics; in eval mode "
                    "PyTorch uses running_mean/running_var",
                )
            )
        if training or run_mean is None:
            candidates.append(
                (
                    ref.normalize(x, mean, var_b * n / (n - 1)),
                    f"it matches normalising with the unbiased variance; PyTorch "
                    f"normalises with the biased one (divide by n = {n})",
                )
            )
        if training and run_mean is not None and run_var is not None:
            candidates.append(
                (
                    ref.normalize(x, run_mean, run_var),
                    "it matches normalising with the running statistics; in train "
                    "mode PyTorch uses the batch statistics",
                )
            )
        for value, hint in candidates:
            if _close(observed, value, bound):
                return hint
        return None


def supported_spatial_ranks(factory: Factory, dims: int | Iterable[int] | None) -> tuple[int, ...]:
    """The input layouts to test: those of ``dims``, or those a probe layer accepts."""
    import torch

    if dims is not None:
        return layouts_for_dims(dims)
    accepted = []
    for rank in (0, 1, 2, 3):
        layer = factory(2, **BNConfig(2).kwargs)
        layer.train()
        try:
            with torch.no_grad():
                layer(make_input((2, 2, *([2] * rank)), 0))
        except Exception:  # the layer refuses this layout
            continue
        accepted.append(rank)
    if not accepted:
        raise UsageError(
            "check_conformance: the layer accepted none of the inputs (N, C), (N, C, L), "
            "(N, C, H, W), (N, C, D, H, W) in train mode; check the factory, or pass dims="
        )
    return tuple(accepted)


def check_conformance(
    factory: Factory,
    *,
    dims: int | Iterable[int] | None = None,
    configs: st.SearchStrategy[BNConfig] | None = None,
    max_examples: int = 60,
    max_steps: int = 4,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    dtype: torch.dtype | None = None,
    derandomize: bool = True,
) -> None:
    """Check that the layers ``factory`` builds behave exactly like ``nn.BatchNormNd``.

    ``factory(num_features, *, eps, momentum, affine, track_running_stats)`` returns a new
    layer; it may ignore arguments it does not support only if ``configs`` never varies them
    (e.g. ``configs=bn_configs(track_running_stats=True, allow_momentum_none=False)``).

    Hypothesis draws a configuration, an input layout (``dims=1``: ``(N, C)`` and
    ``(N, C, L)``; ``2``: ``(N, C, H, W)``; ``3``: ``(N, C, D, H, W)``; by default the layouts
    the layer accepts), and 1 to ``max_steps`` train/eval forward passes on seeded inputs.
    After construction and after every step it compares the output, ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` with :class:`ReferenceBatchNorm` (float64),
    allowing ``atol + rtol * size of the terms`` for float32 round-off. The first difference
    raises :class:`ConformanceFailure` (an ``AssertionError``) for the smallest case hypothesis
    finds, with a diagnosis when the numbers match a known mistake (biased running variance,
    Keras momentum, batch statistics in eval, ...).

    ``dtype`` (default float32) is the dtype of the inputs; the layer is moved to it with
    ``.to(dtype)``.

    ``derandomize=True`` (default) draws the same cases on every run, so a CI failure
    reproduces locally; the global RNG states (torch, numpy, random) are left as they were.
    It runs torch on one thread while it works (the tensors are tiny), then restores the
    thread count.
    """
    __tracebackhide__ = True
    import torch

    if max_examples < 1:
        raise UsageError(f"max_examples must be >= 1, got {max_examples!r}")
    if max_steps < 1:
        raise UsageError(f"max_steps must be >= 1, got {max_steps!r}")
    rng = RNGState.capture()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors are tiny: threads only add overhead
    try:
        ranks = supported_spatial_ranks(factory, dims)
        tol = _Tolerance(rtol, atol)
        layer_dtype = dtype or torch.float32

        @settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            derandomize=derandomize,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
            report_multiple_bugs=False,
            phases=(Phase.explicit, Phase.generate, Phase.shrink),
        )
        @given(case=conformance_cases(spatial_ranks=ranks, configs=configs, max_steps=max_steps))
        def conforms(case: ConformanceCase) -> None:
            __tracebackhide__ = True
            _Run(factory, case, tol, layer_dtype).run()

        try:
            conforms()
        except ConformanceFailure as failure:
            # re-raised here so the traceback ends in the caller's test, not in hypothesis
            notes = "\n".join(getattr(failure, "__notes__", ()))
            raise ConformanceFailure(f"{failure}\n{notes}".rstrip()) from None
    finally:
        torch.set_num_threads(threads)
        rng.restore()

"""Where an audit's time goes, by part, on the architecture families of ``audit_cost.py``.

``audit_cost.py`` times the whole audit; its ratio moves by about +-0.1 between runs here, as
much as most single parts weigh. This script splits one model's audit two ways, in forwards
(CPU time over one plain eval forward, ``no_grad``, of the same model and batch; medians of
``--repeats`` rounds, every variant timed once per round, alternating):

1. **Phases of** ``bncheck.audit(model, x)``: the model snapshot (taken, restored), the
   train-mode pass, the eval passes and the rules, timed by wrapping the functions that run
   them (``state.Snapshot``, ``probes._train_pass``, ``probes._eval_passes``,
   ``engine.run_rules``).
2. **The train-mode pass by part**, built up from a plain train-mode forward (``no_grad``):
   with the tracer alone, then with BN hooks that only report calls to the tracer, then the
   whole pass as the audit runs it (told by the eval passes which layers are called more
   than once); and the whole pass with one part switched off at a time (``bn-reused``'s
   readings, the buffer copies around each call, the gamma/beta copies, the statistics
   taken from the kernel or read, finishing them after the forward). A part's weight is the
   whole pass minus the pass without it. Switching a part off breaks the checks that read it:
   this measures, it does not audit. One more variant is the pass as it runs without the
   eval passes first (first-call inputs held for ``bn-reused``): what that order saves.

The script reaches into ``bncheck.probes``, ``bncheck.state`` and ``bncheck.engine``: it
measures the internals of this checkout and may need an edit when they are renamed.

    python benchmarks/audit_parts.py [--only NAME,...] [--repeats 15] [--threads 1]
                                     [--batch 32] [--size 96]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from audit_cost import FAMILIES
from torch import nn

import bncheck
from bncheck import engine, probes, state, tracing


def _cpu(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


@contextmanager
def _timing(owner: Any, attr: str, label: str, into: dict[str, float]) -> Iterator[None]:
    """Add the CPU time of every call of ``owner.attr`` to ``into[label]``."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            into[label] = into.get(label, 0.0) + time.process_time() - start

    setattr(owner, attr, timed)
    try:
        yield
    finally:
        setattr(owner, attr, original)


@contextmanager
def _patched(owner: Any, **values: Any) -> Iterator[None]:
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class _NoBuffers:
    """Stands in for ``probes.BufferState``: no copies of the running buffers."""

    @classmethod
    def capture(cls, module: nn.Module) -> None:
        return None


def phases(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    parts = (
        (state.Snapshot, "__init__", "snapshot taken"),
        (state.Snapshot, "restore", "snapshot restored"),
        (probes, "_train_pass", "train-mode pass"),
        (probes, "_eval_passes", "eval passes"),
        (engine, "run_rules", "rules"),
    )

    def plain() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    plain()
    bncheck.audit(model, x)  # warm up
    forwards: list[float] = []
    rounds: dict[str, list[float]] = {}
    for _ in range(repeats):
        forwards.append(_cpu(plain))
        spent: dict[str, float] = {}
        with ExitStack() as stack:
            for owner, attr, label in parts:
                stack.enter_context(_timing(owner, attr, label, spent))
            spent["whole audit"] = _cpu(lambda: bncheck.audit(model, x))
        for label, seconds in spent.items():
            rounds.setdefault(label, []).append(seconds)
    forward = statistics.median(forwards)
    return {label: statistics.median(v) / forward for label, v in rounds.items()}


def train_parts(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    ctx = engine.prepare(model)
    ctx.example_input = x
    bn_names = {layer.module: layer.name for layer in ctx.layers}

    def plain() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    def train_forward() -> None:
        model.train()
        with torch.no_grad():
            model(x)

    def with_tracer() -> None:
        model.train()
        with torch.no_grad(), tracing.Tracer(model, bn_names) as tracer:
            tracer.mark_inputs(x)
            model(x)

    def with_bn_hooks() -> None:
        model.train()
        tracer = tracing.Tracer(model, bn_names)
        open_calls: list[Any] = []

        def pre(layer: Any) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                with tracer.paused():
                    open_calls.append(tracer.bn_enter(layer.name, module, args[0]))

            return hook

        def post(layer: Any) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                with tracer.paused():
                    tracer.bn_exit(open_calls.pop(), module, output)

            return hook

        with torch.no_grad(), probes._hooks(ctx.layers, pre, post), tracer:
            tracer.mark_inputs(x)
            model(x)

    # what the audit's eval passes, run first, tell the train pass: the layers called, and
    # those called more than once (taken here from one train pass)
    model.train()
    first = probes.ForwardObservations(batch_size=x.shape[0])
    with torch.no_grad():
        probes._train_pass(ctx, x, first)
    predicted = probes._Predicted(
        frozenset(first.call_counts), frozenset(k for k, v in first.call_counts.items() if v > 1)
    )

    def whole(told: Any = predicted, **patches: Any) -> Callable[[], None]:
        def run() -> None:
            model.train()
            obs = probes.ForwardObservations(batch_size=x.shape[0])
            with torch.no_grad(), _patched(probes, **patches):
                probes._train_pass(ctx, x, obs, told)

        return run

    def without_reuse_rule() -> None:
        saved = ctx.rule_ids
        ctx.rule_ids = [r for r in saved if r != "bn-reused"]
        try:
            whole()()
        finally:
            ctx.rule_ids = saved

    variants: dict[str, Callable[[], None]] = {
        "plain eval forward": plain,
        "train-mode forward": train_forward,
        "+ tracer": with_tracer,
        "+ BN hooks (calls only)": with_bn_hooks,
        "whole train-mode pass": whole(),
        "  without bn-reused": without_reuse_rule,
        "  with held inputs (eval passes after it)": whole(told=None),
        "  without buffer copies": whole(BufferState=_NoBuffers),
        "  without gamma/beta copies": whole(
            _affine_copy=lambda module, name: None, _affine_from_op=lambda *a: None
        ),
        "  without finishing statistics": whole(_finish_measures=lambda calls: None),
        "  without statistics (kernel's or read)": whole(
            _kernel_stats=lambda *a: None, _measure=lambda *a, **k: None
        ),
    }
    saved_state = {k: v.clone() for k, v in model.state_dict().items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm up
        fn()
        model.load_state_dict(saved_state)
    for _ in range(repeats):
        for label, fn in variants.items():
            times[label].append(_cpu(fn))
            model.load_state_dict(saved_state)
    forward = statistics.median(times["plain eval forward"])
    return {label: statistics.median(v) / forward for label, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="shuffle,regnet,mobile-v3,mobile-v2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats, batch "
        f"{args.batch}, {args.size}x{args.size}; CPU time in plain eval forwards (no_grad), medians"
    )
    for name, build in FAMILIES.items():
        if not any(w in name for w in wanted):
            continue
        torch.manual_seed(0)
        model = build()
        x = torch.randn(args.batch, 3, args.size, args.size)
        parts = train_parts(model, x, args.repeats)
        torch.manual_seed(0)
        audit = phases(build(), x, args.repeats)
        print(f"\n{name}")
        for label, ratio in parts.items():
            print(f"  {label:42s} {ratio:5.2f}")
        whole = parts["whole train-mode pass"]
        print("  weights (whole pass minus the pass without the part):")
        for label, ratio in parts.items():
            if label.startswith("  without"):
                print(f"    {label.strip()[8:]:38s} {whole - ratio:+5.2f}")
            elif label.startswith("  with "):  # a part the audit no longer pays
                print(f"    {label.strip()[5:]:38s} {ratio - whole:+5.2f} (not paid)")
        print("  phases of the whole audit:")
        for label, ratio in audit.items():
            print(f"    {label:40s} {ratio:5.2f}")


if __name__ == "__main__":
    main()

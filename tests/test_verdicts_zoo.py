"""The model, buffer, numeric and data rules raise no warning on correct architecture families.

Families as in tests/zoo_families.py (SE / selective-kernel attention on 1x1 maps, depthwise
and shuffle units, dense blocks, ASPP pooling, BN1d token and head layers, zero-initialised
residual gamma), each after a few train-mode forwards without an optimizer step ("populated",
the state a model is in after one forward) and after a few SGD steps, audited in train and eval
mode with data= from the same distribution.
"""

from __future__ import annotations

import pytest
import torch
from zoo_families import FAMILIES, batch, build, populate, train_steps

import bncheck

#: Rules judged by other parts of the suite (batch-size and input rules, eval-batch-dependence).
OTHERS = {
    "small-batch",
    "single-value-per-channel",
    "input-not-normalized",
    "eval-batch-dependence",
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("state", ["populated", "trained"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_warning_from_model_buffer_numeric_and_data_rules(
    family: str, state: str, mode: str
) -> None:
    model = build(family)
    x = batch(family)
    if state == "populated":
        populate(model, x)
    else:
        train_steps(model, x)
    model.train(mode == "train")
    # frozen_bn_resnet's statistics are set by hand, not collected on any data: no data= there
    data = None if family == "frozen_bn_resnet" else [batch(family, seed=s) for s in range(2, 5)]
    report = bncheck.audit(model, x, data=data)
    serious = [
        f.message
        for f in report.findings
        if f.rule not in OTHERS and f.severity in ("warning", "error")
    ]
    assert serious == []
    dead = [f.message for f in report.findings if f.rule == "dead-channels"]
    assert dead == []
    assert data is None or "stat-drift" in report.settings["rules"]


def test_populated_zero_init_families_keep_gamma_exactly_zero() -> None:
    """The families above really hold the zero-init case: gamma still all 0 after forwards."""
    for family in ("resnet_zero_init_residual", "zero_init_last_bottleneck"):
        model = build(family)
        populate(model, batch(family))
        zero = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.BatchNorm2d) and bool((m.weight == 0).all())
        ]
        assert zero and all(int(m.num_batches_tracked) == 3 for m in zero)

"""The one diagnosis of a wrong running-statistics update, shared by ``ema-update`` and
``check_conformance``: each known mistake, computed here by hand, is named."""

from __future__ import annotations

import numpy as np
import pytest

from bncheck.diagnosis import running_update_mistake

OLD = np.array([0.5, -1.0, 2.0])
BATCH_MEAN = np.array([1.5, 0.25, -0.5])
BIASED = np.array([0.8, 1.2, 0.4])
N = 4
UNBIASED = BIASED * N / (N - 1)
M = 0.1


@pytest.mark.parametrize(
    ("name", "observed", "batch", "factor", "none", "words"),
    [
        ("running_mean", OLD, BATCH_MEAN, M, False, "not updated"),
        ("running_mean", M * OLD + (1 - M) * BATCH_MEAN, BATCH_MEAN, M, False, "Keras convention"),
        ("running_var", (1 - M) * OLD + M * BIASED, UNBIASED, M, False, "biased batch variance"),
        ("running_mean", 0.9 * OLD + 0.1 * BATCH_MEAN, BATCH_MEAN, 0.5, True, "momentum=0.1"),
        ("running_mean", OLD, BATCH_MEAN, 1.0, True, "Keras convention"),
        ("running_mean", OLD, BATCH_MEAN, 1.0, False, "not updated"),
        ("running_mean", 0.7 * OLD + 0.3 * BATCH_MEAN, BATCH_MEAN, M, False, None),
    ],
)
def test_each_known_mistake_is_named(
    name: str,
    observed: np.ndarray,
    batch: np.ndarray,
    factor: float,
    none: bool,
    words: str | None,
) -> None:
    found = running_update_mistake(
        name, observed, OLD, batch, factor, 1e-6, biased_var=BIASED, n=N, momentum_none=none
    )
    if words is None:
        assert found is None
    else:
        assert found is not None and words in found


def test_another_momentum_is_estimated_when_asked() -> None:
    observed = 0.7 * OLD + 0.3 * BATCH_MEAN
    found = running_update_mistake(
        "running_mean", observed, OLD, BATCH_MEAN, M, 1e-6, estimate_momentum=True
    )
    assert found == "it moved as with momentum 0.3 instead of 0.1"

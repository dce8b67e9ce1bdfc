"""The prequential metric against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.client.metrics import Prequential


def test_accuracy_and_fading_by_hand() -> None:
    m = Prequential(fading=0.5)
    m.update(np.array([True, False]), np.array([0.1, 0.9]))
    m.update(np.array([True]), np.array([0.2]))
    assert m.seen == 3 and m.correct == 2
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.loss == pytest.approx(1.2 / 3)
    # outcomes oldest-first 1, 0, 1 with weights 0.25, 0.5, 1
    assert m.fading_accuracy == pytest.approx((0.25 + 1.0) / (0.25 + 0.5 + 1.0))


def test_batching_does_not_change_the_result() -> None:
    rng = np.random.default_rng(0)
    c = rng.random(100) < 0.7
    loss = rng.random(100)
    whole, parts = Prequential(0.9), Prequential(0.9)
    whole.update(c, loss)
    for i in range(0, 100, 7):
        parts.update(c[i : i + 7], loss[i : i + 7])
    assert parts.fading_accuracy == pytest.approx(whole.fading_accuracy)
    assert parts.accuracy == whole.accuracy


def test_empty_is_nan_not_error() -> None:
    assert np.isnan(Prequential().accuracy)

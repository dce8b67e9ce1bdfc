"""Running feature standardisation (client/scaling.py): exact statistics, whatever the batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.scaling import RunningScaler


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 60),
    cuts=st.lists(st.integers(0, 60), max_size=5),
    offset=st.floats(-1e4, 1e4),
    spread=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_batched_statistics_are_those_of_all_rows(
    rows: int, cuts: list[int], offset: float, spread: float, seed: int
) -> None:
    # The stream arrives in batches of any size (empty ones too): the statistics must be
    # those of every row seen, as if computed at once.
    x = np.random.default_rng(seed).normal(offset, spread, (rows, 3)).astype(np.float32)
    scaler = RunningScaler((3,))
    bounds = sorted({0, rows, *(min(c, rows) for c in cuts)})
    for lo, hi in itertools.pairwise(bounds):
        scaler.update(x[lo:hi])
    scaler.update(x[:0])
    assert scaler.count == rows
    np.testing.assert_allclose(scaler.mean, x.astype(np.float64).mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(
        scaler.m2 / rows, x.astype(np.float64).var(0), rtol=1e-6, atol=1e-9 * spread**2
    )


def test_transform_standardises_and_leaves_constant_features_finite() -> None:
    x = np.stack([np.linspace(1000, 1030, 50), np.full(50, 7.0)], axis=1).astype(np.float32)
    scaler = RunningScaler((2,))
    raw = torch.from_numpy(x)
    assert scaler.transform(raw) is raw  # nothing seen yet: the identity
    scaler.update(x)
    z = scaler.transform(raw).numpy()
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 0].mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, 0].std(), 1.0, atol=1e-4)
    np.testing.assert_array_equal(z[:, 1], 0.0)  # constant: centred, not divided by 0


def test_state_round_trip_and_shape_check() -> None:
    a = RunningScaler((4,))
    a.update(np.arange(20, dtype=np.float32).reshape(5, 4))
    b = RunningScaler((4,))
    b.load_state_dict({k: torch.as_tensor(v) if k != "count" else v
                       for k, v in a.state_dict().items()})  # as the learner's state gives it
    x = torch.ones(2, 4)
    torch.testing.assert_close(a.transform(x), b.transform(x))
    with pytest.raises(ValueError, match=r"shape \(4,\).*\(3,\)"):
        RunningScaler((3,)).load_state_dict(a.state_dict())

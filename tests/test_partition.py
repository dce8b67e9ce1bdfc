"""Partitioning: property tests for the split invariants, plus skew and prior checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedstream.sim.partition import class_priors, dirichlet, iid, partition, shards

FAST = settings(max_examples=60, deadline=None)


def assert_valid_split(parts: list[np.ndarray], n_samples: int, n_clients: int) -> None:
    """Every index exactly once, ascending within each client, no client empty."""
    assert len(parts) == n_clients
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert part.size > 0
        assert np.all(np.diff(part) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_samples))


@st.composite
def labelled(draw: st.DrawFn, min_per_client: int = 1) -> tuple[np.ndarray, int]:
    n_clients = draw(st.integers(1, 12))
    n_classes = draw(st.integers(1, 8))
    n = draw(st.integers(n_clients * min_per_client, n_clients * min_per_client + 300))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, n_classes, n), n_clients


@FAST
@given(n_clients=st.integers(1, 20), extra=st.integers(0, 200), seed=st.integers(0, 1000))
def test_iid_properties(n_clients: int, extra: int, seed: int) -> None:
    n = n_clients + extra
    parts = iid(n, n_clients, np.random.default_rng(seed))
    assert_valid_split(parts, n, n_clients)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(data=labelled(min_per_client=20), alpha=st.floats(0.5, 100.0), seed=st.integers(0, 1000))
def test_dirichlet_properties(data: tuple[np.ndarray, int], alpha: float, seed: int) -> None:
    labels, n_clients = data
    parts = dirichlet(labels, n_clients, alpha, np.random.default_rng(seed))
    assert_valid_split(parts, labels.size, n_clients)


@FAST
@given(data=labelled(), spc=st.integers(1, 4), seed=st.integers(0, 1000))
def test_shards_properties(data: tuple[np.ndarray, int], spc: int, seed: int) -> None:
    labels, n_clients = data
    n_classes = np.unique(labels).size
    assume(n_classes <= n_clients * spc <= labels.size)
    parts = shards(labels, n_clients, spc, np.random.default_rng(seed))
    assert_valid_split(parts, labels.size, n_clients)
    assert max(np.unique(labels[p]).size for p in parts) <= spc


@FAST
@given(
    data=labelled(min_per_client=4),
    scheme=st.sampled_from(["iid", "dirichlet", "shards"]),
    seed=st.integers(0, 1000),
)
def test_partition_dispatch(data: tuple[np.ndarray, int], scheme: str, seed: int) -> None:
    labels, n_clients = data
    if scheme == "shards":
        assume(np.unique(labels).size <= 2 * n_clients)
    try:
        parts = partition(labels, n_clients, scheme, alpha=5.0, seed=seed)  # type: ignore[arg-type]
    except ValueError as exc:  # dirichlet may legitimately give up on tiny datasets
        assert scheme == "dirichlet" and "min_size" in str(exc)
        return
    assert_valid_split(parts, labels.size, n_clients)
    again = partition(labels, n_clients, scheme, alpha=5.0, seed=seed)  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _class_shares(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=n_classes) / p.size for p in parts])


def test_dirichlet_alpha_controls_skew() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 20000)
    skewed = _class_shares(labels, partition(labels, 10, "dirichlet", alpha=0.05), 10)
    even = _class_shares(labels, partition(labels, 10, "dirichlet", alpha=1000.0), 10)
    assert skewed.max(axis=1).mean() > 0.6  # a dominant class per client
    assert np.abs(even - 0.1).max() < 0.05  # close to the global mix


def test_strings_labels_and_min_size() -> None:
    labels = np.array(["a", "b", "c"] * 40)
    parts = dirichlet(labels, 4, 0.3, np.random.default_rng(1), min_size=10)
    assert_valid_split(parts, 120, 4)
    assert min(p.size for p in parts) >= 10
    with pytest.raises(ValueError, match="min_size"):
        dirichlet(labels, 4, 0.3, np.random.default_rng(1), min_size=31)


def test_bad_arguments_name_the_argument() -> None:
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="n_clients"):
        partition(labels, 0, "iid")
    with pytest.raises(ValueError, match="n_clients"):
        partition(labels, 11, "dirichlet")
    with pytest.raises(ValueError, match="alpha"):
        partition(labels, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="shards_per_client"):
        partition(labels, 1, "shards", shards_per_client=2)  # 3 classes cannot fit
    with pytest.raises(ValueError, match="scheme"):
        partition(labels, 2, "pathological")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        class_priors(3, 4, "dirichlet", alpha=-1.0)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_class_priors_rows_are_distributions(scheme: str) -> None:
    priors = class_priors(7, 5, scheme, alpha=0.3, seed=4)  # type: ignore[arg-type]
    assert priors.shape == (7, 5)
    assert np.all(priors >= 0)
    np.testing.assert_allclose(priors.sum(axis=1), 1.0)
    again = class_priors(7, 5, scheme, alpha=0.3, seed=4)  # type: ignore[arg-type]
    np.testing.assert_array_equal(priors, again)


@FAST
@given(
    n_clients=st.integers(1, 15),
    n_classes=st.integers(1, 12),
    spc=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_shard_priors_cover_classes(n_clients: int, n_classes: int, spc: int, seed: int) -> None:
    priors = class_priors(n_clients, n_classes, "shards", shards_per_client=spc, seed=seed)
    per_client = min(spc, n_classes)
    assert np.all((priors > 0).sum(axis=1) == per_client)
    np.testing.assert_allclose(priors[priors > 0], 1.0 / per_client)
    if n_clients * per_client >= n_classes:
        assert np.all(priors.sum(axis=0) > 0)  # every class is somebody's


def test_dirichlet_priors_skew() -> None:
    peaky = class_priors(200, 10, "dirichlet", alpha=0.05, seed=0)
    flat = class_priors(200, 10, "dirichlet", alpha=100.0, seed=0)
    assert peaky.max(axis=1).mean() > 0.7
    assert flat.max(axis=1).mean() < 0.2
    np.testing.assert_array_equal(class_priors(3, 4, "iid"), np.full((3, 4), 0.25))

"""Data sources: contract (shapes, dtypes, determinism), label priors and drift behaviour."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chi2

from fedstream.client.sources import (
    ArraySource,
    DriftSchedule,
    GaussianMixture,
    RotatingHyperplane,
    Source,
    load_digits_arrays,
    staggered,
)

NO_DRIFT = DriftSchedule("none")


def mixture(**kw: object) -> GaussianMixture:
    args: dict[str, object] = dict(
        n_features=6, n_classes=4, class_prior=None, drift=NO_DRIFT, seed=7, client=3
    )
    args.update(kw)
    return GaussianMixture(**args)  # type: ignore[arg-type]


def hyperplane(**kw: object) -> RotatingHyperplane:
    args: dict[str, object] = dict(
        n_features=5, n_classes=2, class_prior=None, drift=NO_DRIFT, seed=7, client=3
    )
    args.update(kw)
    return RotatingHyperplane(**args)  # type: ignore[arg-type]


def draw_range(src: Source, start: int, stop: int, t: np.ndarray | float = 0.0):
    idx = np.arange(start, stop, dtype=np.int64)
    return src.draw(idx, np.broadcast_to(np.asarray(t, dtype=np.float64), idx.shape))


def chi_square_ok(y: np.ndarray, prior: np.ndarray) -> bool:
    counts = np.bincount(y, minlength=prior.size)
    expected = prior * y.size
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a class with prior 0 was drawn"
    stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    return stat < chi2.ppf(0.999, df=int(keep.sum()) - 1)


# ------------------------------------------------------------------------- contract


@pytest.mark.parametrize("make", [mixture, hyperplane])
def test_shapes_dtypes_and_protocol(make) -> None:
    src = make()
    assert isinstance(src, Source)
    assert src.length is None
    x, y = draw_range(src, 0, 300)
    assert x.shape == (300, *src.feature_shape) and x.dtype == np.float32
    assert y.shape == (300,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() < src.n_classes
    assert np.all(np.isfinite(x))
    x0, y0 = src.draw(np.empty(0, dtype=np.int64), np.empty(0))
    assert x0.shape == (0, *src.feature_shape) and y0.shape == (0,)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mixture(drift=DriftSchedule("gradual", (0.5,), width=1.0)),
        lambda: hyperplane(
            n_classes=3,
            class_prior=np.array([0.5, 0.3, 0.2]),
            drift=DriftSchedule("abrupt", (0.5,)),
        ),
    ],
)
def test_chunking_invariance_and_determinism(make) -> None:
    src = make()
    n = 1500
    idx = np.arange(n, dtype=np.int64)
    t = np.linspace(0.0, 1.0, n)
    x_all, y_all = src.draw(idx, t)
    cuts = [0, 1, 9, 255, 256, 257, 700, 1023, 1024, n]
    pieces = [src.draw(idx[a:b], t[a:b]) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in pieces]), x_all)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), y_all)
    # a fresh instance, and a scattered (unsorted) request, give the same samples
    x_again, y_again = make().draw(idx, t)
    np.testing.assert_array_equal(x_again, x_all)
    np.testing.assert_array_equal(y_again, y_all)
    pick = np.array([1400, 3, 700, 3, 256])
    x_pick, y_pick = src.draw(pick, t[pick])
    np.testing.assert_array_equal(x_pick, x_all[pick])
    np.testing.assert_array_equal(y_pick, y_all[pick])


def test_clients_differ_but_share_concepts() -> None:
    a, b = mixture(client=0), mixture(client=1)
    assert not np.array_equal(draw_range(a, 0, 50)[0], draw_range(b, 0, 50)[0])
    np.testing.assert_array_equal(a.centres, b.centres)
    assert not np.array_equal(a.centres, mixture(seed=8).centres)


def test_negative_client_id_is_a_distinct_stream() -> None:
    holdout = mixture(client=-1)  # e.g. a held-out evaluation stream
    x, _ = draw_range(holdout, 0, 50)
    assert not np.array_equal(x, draw_range(mixture(client=0), 0, 50)[0])
    np.testing.assert_array_equal(x, draw_range(mixture(client=-1), 0, 50)[0])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="class_prior"):
        mixture(class_prior=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="n_classes"):
        mixture(n_classes=1)
    with pytest.raises(ValueError, match="noise"):
        hyperplane(noise=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        mixture().draw(np.array([-1]), np.array([0.0]))


# ------------------------------------------------------------------------- label priors


@pytest.mark.parametrize(
    "make, prior",
    [
        (lambda p: mixture(class_prior=p), np.array([0.6, 0.25, 0.15, 0.0])),
        (lambda p: hyperplane(class_prior=p), np.array([0.85, 0.15])),
        (lambda p: hyperplane(n_classes=4, class_prior=p), np.array([0.1, 0.2, 0.3, 0.4])),
    ],
)
def test_label_prior_respected(make, prior: np.ndarray) -> None:
    _, y = draw_range(make(prior), 0, 6000)
    assert chi_square_ok(y, prior)


def test_uniform_prior_by_default_for_mixture() -> None:
    _, y = draw_range(mixture(), 0, 6000)
    assert chi_square_ok(y, np.full(4, 0.25))


def test_hyperplane_label_noise_rate() -> None:
    clean = hyperplane(noise=0.0)
    noisy = hyperplane(noise=0.2)
    x_c, y_c = draw_range(clean, 0, 5000)
    x_n, y_n = draw_range(noisy, 0, 5000)
    np.testing.assert_array_equal(x_c, x_n)  # same points, only labels flipped
    assert abs((y_c != y_n).mean() - 0.2) < 0.03


# ------------------------------------------------------------------------- drift


def test_drift_schedule_weights_and_assignment() -> None:
    t = np.array([0.0, 9.99, 10.0, 11.0, 12.0, 30.0])
    abrupt = DriftSchedule("abrupt", (10.0, 20.0))
    np.testing.assert_array_equal(abrupt.weight(t)[:, 0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(abrupt.assign(t, np.full(6, 0.99)), [0, 0, 1, 1, 1, 2])
    gradual = DriftSchedule("gradual", [10.0], width=4.0)  # ramp over [8, 12]
    np.testing.assert_allclose(gradual.weight(t)[:, 0], [0, 0.4975, 0.5, 0.75, 1, 1])
    np.testing.assert_array_equal(
        gradual.assign(np.full(3, 11.0), np.array([0.1, 0.7, 0.8])), [1, 1, 0]
    )
    np.testing.assert_array_equal(gradual.concept(t), [0, 0, 1, 1, 1, 1])
    assert DriftSchedule("none", (5.0,)).assign(t, np.zeros(6)).sum() == 0
    with pytest.raises(ValueError, match="kind"):
        DriftSchedule("sudden", (1.0,))  # type: ignore[arg-type]


def _concept_of(src: GaussianMixture, x: np.ndarray) -> np.ndarray:
    """With spread 0 every sample is exactly a centre: recover which concept it came from."""
    centres = src.centres.reshape(src.centres.shape[0], -1, src.feature_shape[0])
    dist = np.abs(x[:, None, None, :] - centres[None].astype(np.float32)).max(axis=-1)
    hit = dist.min(axis=-1) < 1e-5  # (n, concepts)
    assert np.all(hit.sum(axis=1) == 1)
    return hit.argmax(axis=1)


def test_abrupt_drift_switches_concept_at_the_drift_time() -> None:
    src = mixture(spread=0.0, drift=DriftSchedule("abrupt", (5.0,)))
    t = np.linspace(0.0, 10.0, 1001)
    x, _ = src.draw(np.arange(t.size), t)
    np.testing.assert_array_equal(_concept_of(src, x), (t >= 5.0).astype(int))
    np.testing.assert_array_equal(src.concept(t), (t >= 5.0).astype(int))


def test_gradual_drift_mixes_concepts_during_the_ramp() -> None:
    src = mixture(spread=0.0, drift=DriftSchedule("gradual", (5.0,), width=4.0))
    t = np.repeat([2.0, 4.0, 5.0, 6.0, 8.0], 2000)
    x, _ = src.draw(np.arange(t.size), t)
    share = _concept_of(src, x).reshape(5, -1).mean(axis=1)
    np.testing.assert_allclose(share, [0.0, 0.25, 0.5, 0.75, 1.0], atol=0.04)


def test_class_conditional_means_move_after_drift() -> None:
    src = mixture(drift=DriftSchedule("abrupt", (1.0,)))
    n = 4000
    before = draw_range(src, 0, n, 0.5), draw_range(src, n, 2 * n, 0.5)
    after = draw_range(src, 2 * n, 3 * n, 1.5)

    def class_means(xy: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        x, y = xy
        return np.stack([x[y == c].mean(axis=0) for c in range(src.n_classes)])

    same = np.linalg.norm(class_means(before[0]) - class_means(before[1]), axis=1)
    moved = np.linalg.norm(class_means(before[0]) - class_means(after), axis=1)
    assert np.all(same < 0.35)  # sampling noise only
    assert np.all(moved > 0.8)  # every class moved to a new region
    assert np.all(moved > 3 * same.max())


def test_hyperplane_rotation_changes_labels() -> None:
    src = hyperplane(noise=0.0, drift=DriftSchedule("abrupt", (1.0,)))
    x0, y0 = draw_range(src, 0, 4000, 0.0)
    x1, y1 = draw_range(src, 0, 4000, 2.0)
    np.testing.assert_array_equal(x0, x1)  # same points, new concept
    assert 0.2 < (y0 != y1).mean() < 0.8
    assert 0.35 < y0.mean() < 0.65  # about balanced without a prior


def test_staggered_offsets_bounded_and_deterministic() -> None:
    base = (10.0, 30.0)
    shifted = [staggered(base, 2.0, c, 20, seed=5) for c in range(20)]
    offsets = np.array([s[0] - base[0] for s in shifted])
    assert np.all(np.abs(offsets) <= 2.0)
    assert np.unique(offsets).size == 20  # clients differ
    np.testing.assert_allclose([s[1] - s[0] for s in shifted], 20.0)  # gaps preserved
    assert staggered(base, 2.0, 3, 20, seed=5) == shifted[3]
    assert staggered(base, 2.0, 3, 20, seed=6) != shifted[3]
    assert staggered(base, 0.0, 3, 20, seed=5) == base
    with pytest.raises(ValueError, match="client"):
        staggered(base, 1.0, 20, 20, seed=5)
    with pytest.raises(ValueError, match="stagger"):
        staggered(base, -1.0, 0, 20, seed=5)


# ------------------------------------------------------------------------- replay


def test_digits_loader_shapes() -> None:
    x, y, n_classes = load_digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64 and n_classes == 10
    assert x.min() == 0.0 and x.max() == 1.0
    img, _, _ = load_digits_arrays(image=True)
    assert img.shape == (1797, 1, 8, 8)
    np.testing.assert_array_equal(img.reshape(1797, 64), x)


def test_array_source_replays_in_order() -> None:
    x, y, n_classes = load_digits_arrays(image=True)
    order = np.array([5, 3, 1000, 2])
    src = ArraySource(x, y, order, n_classes)
    assert isinstance(src, Source)
    assert src.length == 4 and src.feature_shape == (1, 8, 8) and src.n_classes == 10
    xs, ys = src.draw(np.array([0, 2]), np.array([0.0, 1.0]))
    np.testing.assert_array_equal(xs, x[[5, 1000]])
    np.testing.assert_array_equal(ys, y[[5, 1000]])
    assert src.concept(np.array([0.0, 99.0])).tolist() == [0, 0]
    with pytest.raises(IndexError):
        src.draw(np.array([4]), np.array([0.0]))
    with pytest.raises(ValueError, match="labels"):
        ArraySource(x, y, order, 5)


@pytest.mark.parametrize("source", ["gaussian_mixture", "hyperplane"])
def test_replayed_blocks_match_fresh_draws(source: str) -> None:
    """A stream read a few samples at a time (replaying its memo) equals one fresh read."""
    from fedstream.protocol.config import load
    from fedstream.sim.federation import Federation

    cfg = load(overrides=[f"stream.source={source}", "drift.at=[3.0]", "stream.rate=80.0"])
    a, b = Federation(cfg).stream(3), Federation(cfg).stream(3)
    parts = [a.take(i, i + 7) for i in range(0, 595, 7)]
    x, y = b.source.draw(np.arange(595), a.arrival.times(0, 595))
    np.testing.assert_array_equal(np.concatenate([p.x for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p.y for p in parts]), y)

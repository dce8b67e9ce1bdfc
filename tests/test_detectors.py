"""Tests for the client-side concept-drift detectors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.client.detectors import (
    ADWIN,
    DETECTOR_KINDS,
    DriftDetector,
    NoDetector,
    PageHinkley,
    detections,
    make_detector,
)

CHANGE_AT = 1000
MAX_DELAY = 300


def bernoulli(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


def piecewise(seed: int, *segments: tuple[float, int]) -> np.ndarray:
    """0/1 error stream made of (error rate, length) segments."""
    rng = np.random.default_rng(seed)
    return np.concatenate([bernoulli(rng, p, n) for p, n in segments])


def one_by_one(detector: DriftDetector, stream: np.ndarray | list[float]) -> list[int]:
    """The samples after which `detector`, fed one value at a time, reported a change."""
    found = []
    for i, x in enumerate(stream):
        detector.update(x)
        if detector.drift_detected:
            found.append(i)
    return found


@pytest.fixture(params=["page_hinkley", "adwin"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


# --- stationary streams ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_page_hinkley_no_false_alarm_on_stationary_stream(seed: int) -> None:
    assert one_by_one(PageHinkley(), piecewise(seed, (0.1, 5000))) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_at_most_one_false_alarm_on_stationary_stream(seed: int) -> None:
    adwin = ADWIN()
    assert len(one_by_one(adwin, piecewise(seed, (0.1, 5000)))) <= 1
    assert abs(adwin.estimation - 0.1) < 0.03


def test_no_detector_never_detects() -> None:
    stream = piecewise(0, (0.1, CHANGE_AT), (0.9, CHANGE_AT))
    assert one_by_one(NoDetector(), stream) == []


# --- abrupt changes ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_abrupt_increase_detected_with_bounded_delay(kind: str, seed: int) -> None:
    stream = piecewise(seed, (0.1, CHANGE_AT), (0.6, CHANGE_AT))
    found = one_by_one(make_detector(kind), stream)
    assert found, "increase not detected"
    assert CHANGE_AT <= found[0] < CHANGE_AT + MAX_DELAY


def test_drift_flag_clears_on_next_update(kind: str) -> None:
    detector = make_detector(kind)
    stream = piecewise(0, (0.1, CHANGE_AT), (0.6, CHANGE_AT))
    first = one_by_one(detector, stream[: CHANGE_AT + MAX_DELAY])[0]
    detector = make_detector(kind)
    for x in stream[: first + 1]:
        detector.update(x)
    assert detector.drift_detected
    detector.update(stream[first + 1])
    assert not detector.drift_detected


@pytest.mark.parametrize("seed", range(20))
def test_adwin_reports_one_abrupt_change_once(seed: int) -> None:
    # Without a fresh window after a report, what the cut kept still straddled the change
    # and was cut again at the next checks: one change read as three or four.
    rng = np.random.default_rng(seed)
    errors = np.r_[rng.random(1000) < 0.15, rng.random(1000) < 0.5].astype(float)
    adwin, reports = ADWIN(), []
    for i, e in enumerate(errors):
        adwin.update(e)
        if adwin.drift_detected:
            reports.append(i)
    assert len([i for i in reports if i >= 1000]) == 1, reports


def test_adwin_shrinks_window_and_tracks_new_mean() -> None:
    """After the change ADWIN should have dropped (nearly) all pre-change history."""
    adwin = ADWIN()
    one_by_one(adwin, piecewise(0, (0.1, CHANGE_AT), (0.6, CHANGE_AT)))
    stale = adwin.width - CHANGE_AT
    assert stale < 0.1 * CHANGE_AT
    assert abs(adwin.estimation - 0.6) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_adwin_detects_decrease(seed: int) -> None:
    found = one_by_one(ADWIN(), piecewise(seed, (0.6, CHANGE_AT), (0.1, CHANGE_AT)))
    assert found
    assert CHANGE_AT <= found[0] < CHANGE_AT + MAX_DELAY


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adwin_on_rises_ignores_a_fall_but_forgets_the_old_errors(seed: int) -> None:
    # A learner's error falls as it learns, then rises at a drift: only the rise is drift.
    stream = piecewise(seed, (0.6, CHANGE_AT), (0.1, CHANGE_AT), (0.5, CHANGE_AT))
    both, rise = ADWIN(), ADWIN(direction="rise")
    assert [i for i in one_by_one(both, stream) if i < 2 * CHANGE_AT]  # the fall, reported
    found = one_by_one(rise, stream)
    assert found and 2 * CHANGE_AT <= found[0] < 2 * CHANGE_AT + MAX_DELAY
    # Both cut the window the same way: the rise is found as fast as by the paper's ADWIN.
    assert found[0] == next(i for i in one_by_one(ADWIN(), stream) if i >= 2 * CHANGE_AT)
    assert abs(rise.estimation - 0.5) < 0.05


def test_adwin_direction_is_checked_and_kept_in_its_state() -> None:
    with pytest.raises(ValueError, match="direction must be 'both' or 'rise', got 'up'"):
        ADWIN(direction="up")
    restored = ADWIN()
    restored.load_state_dict(ADWIN(direction="rise").state_dict())
    assert restored.direction == "rise"
    old = ADWIN(direction="rise").state_dict()
    del old["params"]["direction"]  # saved before the parameter existed: keeps its own
    for own in ("both", "rise"):
        restored = ADWIN(direction=own)
        restored.load_state_dict(old)
        assert restored.direction == own


@pytest.mark.parametrize("seed", [0, 1])
def test_page_hinkley_ignores_decrease(seed: int) -> None:
    """A falling error means the model improved: by design no alarm."""
    assert one_by_one(PageHinkley(), piecewise(seed, (0.6, CHANGE_AT), (0.1, CHANGE_AT))) == []


def test_detects_each_of_successive_increases(kind: str) -> None:
    """Post-detection reset/shrink must leave the detector able to catch the next drift."""
    stream = piecewise(3, (0.1, 1000), (0.5, 1000), (0.1, 1000), (0.9, 1000))
    found = one_by_one(make_detector(kind), stream)
    for start in (1000, 3000):
        assert any(start <= i < start + MAX_DELAY for i in found), (start, found)
    assert not [i for i in found if i < 1000]


# --- persistence -------------------------------------------------------------------------


@pytest.mark.parametrize("split", [500, 1030, 1500])
def test_state_dict_round_trip_behaves_identically(kind: str, split: int) -> None:
    stream = piecewise(5, (0.1, 1000), (0.6, 1000), (0.2, 1000))
    original = make_detector(kind, **({"clock": 8} if kind == "adwin" else {}))
    for x in stream[:split]:
        original.update(x)

    restored = make_detector(kind)  # default params: the state must carry the real ones
    restored.load_state_dict(pickle.loads(pickle.dumps(original.state_dict())))
    assert restored.drift_detected == original.drift_detected

    rest = stream[split:]
    assert one_by_one(restored, rest) == one_by_one(original, rest)
    assert restored.state_dict() == original.state_dict()


def test_state_dict_is_a_snapshot_not_a_view() -> None:
    adwin = ADWIN()
    for x in piecewise(0, (0.3, 100)):
        adwin.update(x)
    state = adwin.state_dict()
    frozen = pickle.dumps(state)
    adwin.update(1.0)
    assert pickle.dumps(state) == frozen


def test_load_state_dict_rejects_other_kind() -> None:
    with pytest.raises(ValueError, match="page_hinkley"):
        ADWIN().load_state_dict(PageHinkley().state_dict())


def test_reset_restores_fresh_state(kind: str) -> None:
    detector = make_detector(kind)
    one_by_one(detector, piecewise(0, (0.1, 500), (0.8, 500)))
    detector.reset()
    assert detector.state_dict() == make_detector(kind).state_dict()


# --- factory and interface ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"), [("none", NoDetector), ("page_hinkley", PageHinkley), ("adwin", ADWIN)]
)
def test_make_detector_builds_each_kind(name: str, cls: type) -> None:
    detector = make_detector(name)
    assert isinstance(detector, cls)
    assert isinstance(detector, DriftDetector)


def test_make_detector_forwards_params() -> None:
    assert make_detector("adwin", delta=0.01, clock=4).clock == 4
    assert make_detector("page_hinkley", threshold=10.0).threshold == 10.0


def test_make_detector_unknown_kind_names_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match="kswin") as excinfo:
        make_detector("kswin")
    for choice in DETECTOR_KINDS:
        assert choice in str(excinfo.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_rejected(kind: str, bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        make_detector(kind).update(bad)


@pytest.mark.parametrize(
    ("cls", "params"),
    [
        (ADWIN, {"delta": 0.0}),
        (ADWIN, {"clock": 0}),
        (ADWIN, {"min_window": 0}),
        (PageHinkley, {"threshold": 0.0}),
        (PageHinkley, {"alpha": 1.5}),
    ],
)
def test_invalid_params_rejected(cls: type, params: dict) -> None:
    with pytest.raises(ValueError):
        cls(**params)


def test_adwin_memory_is_logarithmic_in_width() -> None:
    adwin = ADWIN()
    for x in piecewise(0, (0.2, 20_000)):
        adwin.update(x)
    assert adwin.width > 10_000
    rows = math.floor(math.log2(adwin.width)) + 1
    assert adwin.n_buckets <= adwin.max_buckets * rows


# --- properties --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=400),
    clock=st.sampled_from([1, 4, 32]),
    min_window=st.integers(min_value=1, max_value=8),
)
def test_any_unit_interval_stream_keeps_invariants(
    values: list[float], clock: int, min_window: int
) -> None:
    adwin = ADWIN(clock=clock, min_window=min_window)
    others = [PageHinkley(min_instances=5, threshold=1.0), NoDetector()]
    for n, x in enumerate(values, start=1):
        adwin.update(x)
        for detector in others:
            detector.update(x)
        assert not others[1].drift_detected  # NoDetector
        if n < 5:  # Page-Hinkley is silent before min_instances
            assert not others[0].drift_detected
        assert 0 < adwin.width <= n
        assert 0.0 <= adwin.estimation <= 1.0
        assert adwin.variance <= 0.25 + 1e-9  # the largest of any variable in [0, 1]


@given(
    segments=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(1, 400)), min_size=1,
                      max_size=4),
    batches=st.lists(st.integers(1, 70), min_size=1, max_size=30),
    clock=st.integers(1, 40),
    max_buckets=st.integers(1, 6),
    min_window=st.integers(1, 12),
    direction=st.sampled_from(["both", "rise"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_adwin_in_batches_is_adwin_one_value_at_a_time(
    segments: list[tuple[float, int]], batches: list[int], clock: int, max_buckets: int,
    min_window: int, direction: str, seed: int,
) -> None:
    """`update_many` (what a learner uses for a batch's errors) must report the same
    changes at the same samples, and leave the very same state, as `update` per value."""
    stream = piecewise(seed, *segments).tolist()
    params = {"clock": clock, "max_buckets": max_buckets, "min_window": min_window,
              "direction": direction, "delta": 0.05}
    one, many = ADWIN(**params), ADWIN(**params)
    reported_one, reported_many, start = one_by_one(one, stream), [], 0
    for size in batches * (len(stream) // sum(batches) + 1):
        if start >= len(stream):
            break
        reported_many += [start + i for i in many.update_many(stream[start : start + size])]
        start += size
    assert reported_many == reported_one
    assert many.state_dict() == one.state_dict()


def test_detections_feeds_any_detector_one_value_at_a_time() -> None:
    stream = piecewise(3, (0.05, 600), (0.6, 600)).tolist()
    expected = one_by_one(PageHinkley(), stream)
    assert expected and detections(PageHinkley(), stream) == expected
    assert detections(NoDetector(), stream) == []
    one, many = ADWIN(), ADWIN()
    for value in (0.0, 1.0):
        one.update(value)
    with pytest.raises(ValueError, match="must be finite"):
        detections(many, [0.0, 1.0, math.nan, 0.0])
    assert many.state_dict() == one.state_dict()  # the values before it counted, as one by one

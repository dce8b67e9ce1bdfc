"""Arrival processes: count/times agreement, Poisson statistics, determinism, client rates."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.client.arrival import (
    Arrival,
    FixedRate,
    PoissonArrival,
    Scheduled,
    client_rates,
    make_arrival,
    on_the_clock,
)

PROCESSES = [
    FixedRate(10),
    FixedRate(0.3),
    FixedRate(1 / 3),
    FixedRate(2.5),
    FixedRate(0.1),
    PoissonArrival(4.0, seed=1, client=0),
    PoissonArrival(0.7, seed=2, client=5),
]


@pytest.mark.parametrize("proc", PROCESSES, ids=repr)
def test_count_and_times_agree(proc: Arrival) -> None:
    assert isinstance(proc, Arrival)
    assert proc.count(0) == 0 and proc.count(-3.0) == 0
    previous = 0
    for r in range(1, 80):
        n = proc.count(r)
        assert n >= previous
        stamps = proc.times(0, n)
        assert stamps.dtype == np.float64 and stamps.shape == (n,)
        assert np.all(stamps < r)
        assert proc.times(n, n + 1)[0] >= r  # the next sample has not arrived yet
        if n > previous:  # this round's arrivals fall inside [r-1, r)
            assert np.all(proc.times(previous, n) >= r - 1)
        previous = n
    stamps = proc.times(0, previous)
    assert np.all(np.diff(stamps) >= 0)


@pytest.mark.parametrize("proc", PROCESSES, ids=repr)
def test_fractional_until_counts_times_before_it(proc: Arrival) -> None:
    stamps = proc.times(0, proc.count(40) + 1)
    for until in np.linspace(0.05, 39.95, 97):
        assert proc.count(float(until)) == int((stamps < until).sum())


def test_fixed_rate_spacing() -> None:
    proc = FixedRate(4)
    np.testing.assert_allclose(proc.times(0, 6), [0, 0.25, 0.5, 0.75, 1.0, 1.25])
    assert proc.count(1) == 4 and proc.count(1.01) == 5
    assert FixedRate(0.5).count(3) == 2  # arrivals at 0 and 2


def test_poisson_mean_rate_and_round_counts() -> None:
    rate, rounds = 6.0, 3000
    proc = PoissonArrival(rate, seed=3, client=1)
    per_round = np.diff([proc.count(r) for r in range(rounds + 1)])
    assert abs(per_round.mean() - rate) < 4 * np.sqrt(rate / rounds)
    assert abs(per_round.var() - rate) < 0.15 * rate  # Poisson: variance equals the mean
    stamps = proc.times(0, proc.count(rounds))
    within = stamps - np.floor(stamps)
    assert abs(within.mean() - 0.5) < 0.01  # uniform inside each round


def test_poisson_deterministic_and_chunk_invariant() -> None:
    a = PoissonArrival(3.0, seed=9, client=4)
    b = PoissonArrival(3.0, seed=9, client=4)
    assert b.count(500) == a.count(500)  # b computes counts before times, a after
    whole = a.times(0, 1000)
    pieces = np.concatenate([b.times(lo, lo + 37) for lo in range(0, 1000, 37)])[:1000]
    np.testing.assert_array_equal(whole, pieces)
    other = PoissonArrival(3.0, seed=9, client=5)
    assert not np.array_equal(other.times(0, 100), whole[:100])
    assert a.times(5, 5).shape == (0,)


def test_make_arrival_and_validation() -> None:
    assert isinstance(make_arrival("fixed", 2.0, 0, 0), FixedRate)
    assert isinstance(make_arrival("poisson", 2.0, 0, 0), PoissonArrival)
    with pytest.raises(ValueError, match="kind"):
        make_arrival("bursty", 2.0, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        PoissonArrival(0.0, 0, 0)
    with pytest.raises(ValueError, match="per_round"):
        FixedRate(-1)
    with pytest.raises(ValueError, match="start"):
        FixedRate(1).times(3, 2)


def test_client_rates() -> None:
    flat = client_rates(20.0, 0.0, 7, seed=1)
    np.testing.assert_array_equal(flat, np.full(7, 20.0))
    mild = client_rates(20.0, 0.3, 200, seed=1)
    wild = client_rates(20.0, 1.0, 200, seed=1)
    for rates in (mild, wild):
        assert rates.shape == (200,) and np.all(rates > 0)
        assert rates.mean() == pytest.approx(20.0)
    assert 0.2 < mild.std() / 20.0 < 0.4
    assert wild.std() > 2 * mild.std()
    np.testing.assert_array_equal(client_rates(20.0, 0.3, 200, seed=1), mild)
    assert not np.array_equal(client_rates(20.0, 0.3, 200, seed=2), mild)
    with pytest.raises(ValueError, match="n_clients"):
        client_rates(20.0, 0.3, 0, seed=1)
    with pytest.raises(ValueError, match="spread"):
        client_rates(20.0, -0.3, 4, seed=1)


def test_scheduled_arrivals_count_what_came_before_each_time() -> None:
    at = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 2.9])
    proc = Scheduled(at)
    assert isinstance(proc, Arrival)
    assert [proc.count(r) for r in (0, 1, 2, 3, 4)] == [0, 3, 5, 6, 6]  # [r-1, r)
    assert proc.times(2, 5).tolist() == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="only 6 samples arrive"):
        proc.times(0, 7)
    with pytest.raises(ValueError, match="non-decreasing"):
        Scheduled(np.array([1.0, 0.5]))


def test_a_files_times_span_the_run_on_one_clock() -> None:
    # Any unit (epoch seconds here): first time at 0, the last inside the last round.
    t = 1.7e9 + np.array([0.0, 3600.0, 7200.0, 36000.0])
    clock = on_the_clock(t, rounds=10)
    assert clock[0] == 0.0 and 9.0 <= clock[-1] < 10.0 and clock[1] == pytest.approx(1.0)
    assert Scheduled(clock).count(10) == 4  # every row arrives within the run
    assert on_the_clock(np.full(3, 5.0), 4).tolist() == [0.0, 0.0, 0.0]  # one instant

"""When samples reach a client: arrival processes on the round clock.

Time is measured in rounds; round ``r`` (1-based) spans ``[r-1, r)``. An arrival process
numbers a client's samples 0, 1, 2, ... in arrival order and says when each one arrives,
so a client can ask "what is new since last round?" as ``times(count(r-1), count(r))`` and
feed those stream positions and times to its ``Source``. Both processes are pure functions
of their parameters (no hidden generator state), so restarts and re-runs replay exactly.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from fedstream.client.sources.base import client_key

ARRIVAL_TAG = 0xA7
_RATES_TAG = 0xB0


@runtime_checkable
class Arrival(Protocol):
    """Arrival times of a client's samples."""

    def count(self, until: float) -> int:
        """number of samples arrived in [0, until)"""
        ...

    def times(self, start: int, stop: int) -> np.ndarray:
        """arrival times (float64, non-decreasing) of samples start..stop-1"""
        ...


def _check_rate(rate: float, name: str) -> float:
    if not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {rate}")
    return float(rate)


def _check_span(start: int, stop: int) -> None:
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")


class FixedRate:
    """Evenly spaced arrivals: sample i arrives at time i / per_round.

    The same expression defines ``times`` and (after correcting floating-point rounding)
    ``count``, so the two can never disagree about which side of a boundary a sample is."""

    def __init__(self, per_round: float) -> None:
        self.per_round = _check_rate(per_round, "per_round")

    def __repr__(self) -> str:
        return f"FixedRate(per_round={self.per_round!r})"

    def _time(self, i: int) -> float:
        return i / self.per_round

    def count(self, until: float) -> int:
        """number of samples arrived in [0, until)"""
        if math.isnan(until) or until == math.inf:
            raise ValueError(f"until must be finite, got {until}")
        if until <= 0:
            return 0
        n = math.ceil(until * self.per_round)
        while n > 0 and self._time(n - 1) >= until:
            n -= 1
        while self._time(n) < until:
            n += 1
        return n

    def times(self, start: int, stop: int) -> np.ndarray:
        """arrival times (float64, non-decreasing) of samples start..stop-1"""
        _check_span(start, stop)
        return np.arange(start, stop, dtype=np.float64) / self.per_round


class PoissonArrival:
    """A Poisson process with ``rate`` arrivals per round on average.

    Round r's count is Poisson(rate) and its times are sorted uniforms in [r-1, r), all
    from ``default_rng([seed, client, 0xA7, r])``: any round can be regenerated on its own.
    Cumulative counts are cached and extended lazily (in growing chunks), so ``count`` is a
    lookup after the first call and ``times`` only regenerates the rounds it touches."""

    def __init__(self, rate: float, seed: int, client: int) -> None:
        self.rate = _check_rate(rate, "rate")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.client = client
        self._cum = np.zeros(1, dtype=np.int64)  # _cum[r] = arrivals in rounds 1..r

    def __repr__(self) -> str:
        return f"PoissonArrival(rate={self.rate!r}, seed={self.seed}, client={self.client})"

    def _rng(self, r: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, client_key(self.client), ARRIVAL_TAG, r])

    def _round_count(self, r: int) -> int:
        return int(self._rng(r).poisson(self.rate))

    def _round_times(self, r: int) -> np.ndarray:
        rng = self._rng(r)
        n = int(rng.poisson(self.rate))  # same draw as _round_count: keeps the two consistent
        stamps = (r - 1) + np.sort(rng.random(n))
        # (r-1) + u can round up to r for u close to 1; the round must stay half-open.
        return np.minimum(stamps, round_end(r))

    def _extend_rounds(self, rounds: int) -> None:
        """Make ``_cum`` cover rounds 1..rounds (at least), growing geometrically."""
        known = self._cum.size - 1
        if rounds <= known:
            return
        target = max(rounds, 2 * known, 64)
        counts = np.fromiter(
            (self._round_count(r) for r in range(known + 1, target + 1)),
            dtype=np.int64,
            count=target - known,
        )
        self._cum = np.concatenate([self._cum, self._cum[-1] + np.cumsum(counts)])

    def _extend_samples(self, n: int) -> None:
        """Make ``_cum`` cover at least ``n`` samples."""
        while self._cum[-1] < n:
            missing = n - int(self._cum[-1])
            self._extend_rounds(self._cum.size - 1 + math.ceil(1.2 * missing / self.rate) + 8)

    def count(self, until: float) -> int:
        """number of samples arrived in [0, until)"""
        if math.isnan(until) or until == math.inf:
            raise ValueError(f"until must be finite, got {until}")
        if until <= 0:
            return 0
        whole = math.floor(until)
        self._extend_rounds(whole + 1)
        n = int(self._cum[whole])
        if until > whole and self._cum[whole + 1] > n:  # partial round whole+1
            n += int(np.searchsorted(self._round_times(whole + 1), until, side="left"))
        return n

    def times(self, start: int, stop: int) -> np.ndarray:
        """arrival times (float64, non-decreasing) of samples start..stop-1"""
        _check_span(start, stop)
        if start == stop:
            return np.empty(0, dtype=np.float64)
        self._extend_samples(stop)
        first = int(np.searchsorted(self._cum, start, side="right"))
        last = int(np.searchsorted(self._cum, stop - 1, side="right"))
        rounds = [r for r in range(first, last + 1) if self._cum[r] > self._cum[r - 1]]
        stamps = np.concatenate([self._round_times(r) for r in rounds])
        skip = start - int(self._cum[first - 1])
        return stamps[skip : skip + stop - start]


def round_end(server_round: int) -> float:
    """The last instant of round r, whose samples arrive in [r - 1, r): the concept in
    force at r itself (a drift at r exactly) is already the next round's."""
    return math.nextafter(float(server_round), -math.inf)


class Scheduled:
    """Arrivals at times given in advance (rounds, non-decreasing): a file's own clock.

    A file with a time column replays its rows when they happened, on one clock for all
    clients, so that sites sharing that clock stay in step (a drift in the file reaches
    every site in the same round), rather than each at its own synthetic rate."""

    def __init__(self, at: np.ndarray) -> None:
        at = np.asarray(at, dtype=np.float64)
        if not np.isfinite(at).all() or (np.diff(at) < 0).any():
            raise ValueError("arrival times must be finite and non-decreasing")
        self.at = at

    def __repr__(self) -> str:
        return f"Scheduled({len(self.at)} arrivals)"

    def count(self, until: float) -> int:
        """number of samples arrived in [0, until)"""
        if math.isnan(until):
            raise ValueError("until must not be NaN")
        return int(np.searchsorted(self.at, until, side="left"))

    def times(self, start: int, stop: int) -> np.ndarray:
        """arrival times (float64, non-decreasing) of samples start..stop-1"""
        _check_span(start, stop)
        if stop > len(self.at):
            raise ValueError(f"only {len(self.at)} samples arrive, asked for up to {stop}")
        return self.at[start:stop]


def on_the_clock(
    time: np.ndarray, rounds: int, between: tuple[float, float] | None = None
) -> np.ndarray:
    """A file's times (any unit) as arrival times on the round clock: its first time at
    the start of round 1, its last in the last round, linearly between. `between`: the
    file's first and last time, for times that are not its rows' (a drift's)."""
    time = np.asarray(time, dtype=np.float64)
    if not len(time):
        return time
    low, high = between if between is not None else (time.min(), time.max())
    first, span = low, high - low
    if span == 0:
        return np.zeros_like(time)
    # the last row in the last round, not at its end (round r spans [r - 1, r))
    return np.minimum((time - first) / span * rounds, np.nextafter(float(rounds), 0.0))


def make_arrival(kind: Literal["fixed", "poisson"], rate: float, seed: int, client: int) -> Arrival:
    """Build the arrival process named in a config."""
    if kind == "fixed":
        return FixedRate(rate)
    if kind == "poisson":
        return PoissonArrival(rate, seed, client)
    raise ValueError(f"kind must be 'fixed' or 'poisson', got {kind!r}")


def client_rates(base: float, spread: float, n_clients: int, seed: int) -> np.ndarray:
    """per-client mean rates so clients see different amounts: base * lognormal(0, spread)
    normalised to mean base; spread 0 -> all equal.

    Normalising keeps the federation's total data volume independent of ``spread``, so
    changing heterogeneity does not also change how much data there is."""
    _check_rate(base, "base")
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if not math.isfinite(spread) or spread < 0:
        raise ValueError(f"spread must be finite and >= 0, got {spread}")
    if spread == 0:
        return np.full(n_clients, float(base))
    factors = np.random.default_rng([seed, _RATES_TAG]).lognormal(0.0, spread, n_clients)
    return base * factors / factors.mean()

"""A client's stream: what its source produces, arriving on its own clock.

Separating the source (what a sample is) from the arrival process (when it comes) lets
the same generator, dataset or file be replayed at any rate, bursty or steady.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedstream.client.arrival import Arrival
from fedstream.client.sources import Source


@dataclass(frozen=True)
class Batch:
    x: np.ndarray
    y: np.ndarray
    t: np.ndarray  # arrival times, in rounds

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ClientStream:
    client: int
    source: Source
    arrival: Arrival

    def arrived(self, until: float) -> int:
        """Samples that have arrived by time `until` (a finite source eventually runs dry)."""
        n = self.arrival.count(until)
        return n if self.source.length is None else min(n, self.source.length)

    def take(self, start: int, stop: int) -> Batch:
        """Samples [start, stop), as a slice would: a finite stream (a file's rows) gives
        what it has of them."""
        if self.source.length is not None:
            stop = min(stop, self.source.length)
            start = min(start, stop)
        index = np.arange(start, stop, dtype=np.int64)
        t = self.arrival.times(start, stop)
        x, y = self.source.draw(index, t)
        return Batch(x=x, y=y, t=t)

    def pending(self, offset: int, until: float, budget: int = 0) -> tuple[int, int]:
        """The slice a round trains on: everything since `offset`, at most `budget` (0: all)."""
        stop = self.arrived(until)
        if budget:
            stop = min(stop, offset + budget)
        return offset, max(offset, stop)

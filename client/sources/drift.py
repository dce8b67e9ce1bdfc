"""When concepts change: drift schedules and per-client staggering.

Drift is described in *time* (rounds), not stream positions, because clients receive data
at different rates: a global event such as "the market changed in round 50" must hit every
client at the same wall-clock time, however many samples it has seen by then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .base import STAGGER_TAG

DriftKind = Literal["none", "abrupt", "gradual"]
_KINDS = ("none", "abrupt", "gradual")


@dataclass(frozen=True)
class DriftSchedule:
    """Times at which the concept changes, and how sharply.

    ``at`` lists transition times in rounds; transition ``j`` moves from concept ``j`` to
    ``j + 1``. A gradual transition is a linear ramp of ``width`` rounds *centred* on its
    time, so ``at`` marks the midpoint for both kinds and plots can mark the same instants.
    ``kind="none"`` ignores ``at`` (handy when a config keeps times around while drift is off).
    """

    kind: DriftKind
    at: tuple[float, ...] = ()
    width: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        at = tuple(float(a) for a in self.at)
        if not all(np.isfinite(at)):
            raise ValueError(f"at must hold finite times, got {at}")
        if not np.isfinite(self.width) or self.width < 0:
            raise ValueError(f"width must be finite and >= 0, got {self.width}")
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "width", float(self.width))

    @property
    def n_concepts(self) -> int:
        """Number of distinct concepts a source must prepare (ids ``0..n_concepts-1``)."""
        return 1 if self.kind == "none" else len(self.at) + 1

    def weight(self, t: np.ndarray) -> np.ndarray:
        """(n, len(at)) progress of each transition in [0,1] at times t (abrupt: step at the
        drift time; gradual: linear ramp over ``width`` rounds centred on it)."""
        tt = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        at = np.asarray(self.at, dtype=np.float64).reshape(1, -1)
        if self.kind == "none":
            return np.zeros((tt.shape[0], at.shape[1]))
        if self.kind == "gradual" and self.width > 0:
            return np.clip((tt - at) / self.width + 0.5, 0.0, 1.0)
        return (tt >= at).astype(np.float64)

    def assign(self, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Concept id per sample: the number of transitions passed, where during a gradual
        transition a sample is already in the new concept when ``u < weight``.

        Using one uniform ``u`` per sample for every transition keeps the count coherent:
        a sample that has crossed a later transition has also crossed every earlier one."""
        uu = np.asarray(u, dtype=np.float64).reshape(-1, 1)
        return (uu < self.weight(t)).sum(axis=1).astype(np.int64)

    def concept(self, t: np.ndarray) -> np.ndarray:
        """Dominant concept id at times t: transitions whose midpoint has passed."""
        return (self.weight(t) >= 0.5).sum(axis=1).astype(np.int64)


def staggered(
    at: Sequence[float], stagger: float, client: int, n_clients: int, seed: int
) -> tuple[float, ...]:
    """This client's drift times: every base time shifted by one per-client offset drawn
    uniformly from [-stagger, +stagger] (deterministic in seed and client).

    One offset per client (rather than per drift) keeps the order of the drifts and the
    gaps between them, so "concept k" means the same thing on every client; it only
    arrives a little earlier or later, as a real-world change reaches sites unevenly."""
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if not 0 <= client < n_clients:
        raise ValueError(f"client must be in [0, {n_clients}), got {client}")
    if not np.isfinite(stagger) or stagger < 0:
        raise ValueError(f"stagger must be finite and >= 0, got {stagger}")
    offset = 0.0
    if stagger > 0:
        rng = np.random.default_rng([seed, client, STAGGER_TAG])
        offset = float(rng.uniform(-stagger, stagger))
    return tuple(float(a) + offset for a in at)

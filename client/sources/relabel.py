"""Concept drift for recorded data: after each drift the classes are renamed.

A real dataset has one fixed concept; permuting its labels at drift times gives the
hardest kind of real drift (the same inputs now mean another class) while the input
distribution stays real. No drift configured: labels pass through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedstream.client.sources.base import Source
from fedstream.client.sources.drift import DriftSchedule

_GOLDEN = 0.6180339887498949


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of range(n) that moves every element (n >= 2):
    rejection sampling, about e draws."""
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


class Relabel:
    def __init__(self, base: Source, drift: DriftSchedule, *, seed: int, client: int) -> None:
        self.base = base
        self.drift = drift
        self.feature_shape = base.feature_shape
        self.n_classes = base.n_classes
        self.length = base.length
        self._phase = float(np.random.default_rng([seed, 0x5E, client & 0xFFFF]).random())
        # Permutation k is shared by all clients: concept k means the same everywhere. Each
        # one moves every class away from where the concept before put it (a derangement
        # after the previous permutation), so every drift changes every label: a random
        # permutation of two classes would be no drift at all half the time.
        n_concepts = len(drift.at) + 1
        perms = [np.arange(base.n_classes)]
        for k in range(1, n_concepts):
            step = _derangement(base.n_classes, np.random.default_rng([seed, 0x9E, k]))
            perms.append(step[perms[-1]])
        self._perms = np.stack(perms)

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.base.draw(index, t)
        if self.drift.kind == "none" or not self.drift.at:
            return x, y
        return x, self._perms[self.concept_at(index, t), y]

    def concept_at(self, index: np.ndarray, t: np.ndarray) -> np.ndarray:
        # A Weyl sequence gives each position its own uniform draw, independent of chunking.
        u = np.mod(self._phase + index.astype(np.float64) * _GOLDEN, 1.0)
        return self.drift.assign(t, u)

    def concept(self, t: np.ndarray) -> np.ndarray:
        return self.drift.assign(t, np.full(len(t), 0.5))

    def label_names(self, names: Sequence[str], t: float) -> list[str]:
        """The class each label stands for at time `t` (the concept then): a model trained
        on the renamed stream scores `names` in this order."""
        if self.drift.kind == "none" or not self.drift.at:
            return list(names)
        perm = self._perms[int(self.concept(np.array([float(t)]))[0])]
        out = np.empty(len(names), dtype=object)
        out[perm] = list(names)  # class c is given label perm[c]
        return [str(name) for name in out]

"""Synthetic drifting streams: a Gaussian mixture and a rotating hyperplane.

Both are infinite (``length is None``) and counter-seeded (see ``base``). Concept
parameters come from ``concept_rng(seed, k)`` and are therefore shared by all clients,
while the samples themselves come from the client's own block generators. Every random
number a sample needs is drawn *before* its concept is known, so the concept only changes
how those numbers are mapped to (x, y): a drift changes the meaning of the data, not the
randomness, which keeps comparisons across drift settings paired.
"""

from __future__ import annotations

import math

import numpy as np

from .base import (
    BLOCK,
    Source,
    concept_rng,
    draw_blocks,
    normalise_prior,
    sample_labels,
)
from .drift import DriftSchedule

# Geometry of the mixture in its informative subspace: class means are close together
# while each class's own centres are spread widely around its mean. A linear model only
# sees the (small) mean differences; a nonlinear one can carve out the clusters.
_MEAN_SCALE = 1.0
_CLUSTER_SCALE = 2.5

_CANDIDATES_BINARY = 16
_CANDIDATES_MULTI = 32
_MIN_ANGLE = math.pi / 3
_MAX_ANGLE = 2 * math.pi / 3


def _check_common(n_features: int, n_classes: int, seed: int, client: int) -> None:
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if seed < 0 or client < 0:
        raise ValueError(f"seed and client must be >= 0, got seed={seed}, client={client}")


def _informative_dims(n_features: int, n_clusters: int) -> int:
    """Enough dimensions to place all clusters apart, few enough that classes interleave."""
    return min(n_features, max(2, math.ceil(math.log2(n_clusters)) + 1))


def _mixture_centres(
    seed: int, k: int, n_features: int, n_classes: int, per_class: int
) -> np.ndarray:
    """(n_classes, per_class, n_features) centres of concept ``k``.

    Each class gets a mean plus ``per_class`` zero-sum offsets, all in a random
    low-dimensional subspace, then rotated into feature space."""
    rng = concept_rng(seed, k)
    dims = _informative_dims(n_features, n_classes * per_class)
    means = rng.standard_normal((n_classes, 1, dims)) * _MEAN_SCALE
    offsets = rng.standard_normal((n_classes, per_class, dims))
    if per_class > 1:
        offsets -= offsets.mean(axis=1, keepdims=True)
        offsets *= _CLUSTER_SCALE * math.sqrt(per_class / (per_class - 1))
    else:
        offsets *= _CLUSTER_SCALE  # a single cluster per class: spread the classes instead
    basis, _ = np.linalg.qr(rng.standard_normal((n_features, dims)))
    return (means + offsets) @ basis.T


class GaussianMixture(Source):
    """Classes made of several Gaussian clusters; each concept redraws every centre.

    A new concept moves each class to a fresh region, so a model trained on the old concept
    is wrong afterwards and must relearn: real concept drift, not just covariate shift."""

    def __init__(
        self,
        *,
        n_features: int,
        n_classes: int,
        centers_per_class: int = 2,
        spread: float = 1.0,
        class_prior: np.ndarray | None,
        drift: DriftSchedule,
        seed: int,
        client: int,
    ) -> None:
        _check_common(n_features, n_classes, seed, client)
        if centers_per_class < 1:
            raise ValueError(f"centers_per_class must be >= 1, got {centers_per_class}")
        if not np.isfinite(spread) or spread < 0:
            raise ValueError(f"spread must be finite and >= 0, got {spread}")
        self.feature_shape: tuple[int, ...] = (n_features,)
        self.n_classes = n_classes
        self.length: int | None = None
        self.centers_per_class = centers_per_class
        self.spread = float(spread)
        self.prior = normalise_prior(class_prior, n_classes)
        self.drift = drift
        self.seed = seed
        self.client = client
        # (concept, class, cluster, feature): all concepts up front, they are few and small.
        self.centres = np.stack(
            [
                _mixture_centres(seed, k, n_features, n_classes, centers_per_class)
                for k in range(drift.n_concepts)
            ]
        )

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream positions ``index`` arriving at times ``t`` (see ``Source``)."""
        return draw_blocks(
            index,
            t,
            seed=self.seed,
            client=self.client,
            feature_shape=self.feature_shape,
            draw_block=self._draw_block,
        )

    def concept(self, t: np.ndarray) -> np.ndarray:
        """Concept id in force at times ``t``."""
        return self.drift.concept(t)

    def _draw_block(
        self, rng: np.random.Generator, offsets: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        d = self.feature_shape[0]
        u_concept = rng.random(BLOCK)[offsets]
        u_label = rng.random(BLOCK)[offsets]
        cluster = rng.integers(0, self.centers_per_class, BLOCK)[offsets]
        noise = rng.standard_normal((BLOCK, d))[offsets]
        y = sample_labels(self.prior, u_label)
        k = self.drift.assign(t, u_concept)
        x = self.centres[k, y, cluster] + self.spread * noise
        return x.astype(np.float32), y


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _rotate_rows(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each unit row of ``w`` by an angle in [60, 120] degrees within a random plane
    containing it: large enough that a stale model misclassifies a third or more."""
    v = rng.standard_normal(w.shape)
    v -= (v * w).sum(axis=1, keepdims=True) * w  # Gram-Schmidt: v is orthogonal to its row
    v = _unit_rows(v)
    theta = rng.uniform(_MIN_ANGLE, _MAX_ANGLE, (w.shape[0], 1))
    return _unit_rows(np.cos(theta) * w + np.sin(theta) * v)


class RotatingHyperplane(Source):
    """x uniform in the unit cube, label = argmax of linear scores about the cube centre
    (binary: the side of one hyperplane); each drift rotates the weight vectors.

    With a ``class_prior``, each sample picks its label from the prior and then the first of
    several candidate points that has that label (vectorised rejection), so the label
    distribution follows the prior approximately while x stays consistent with the concept.
    Without one, labels follow the geometry (about balanced). A fraction ``noise`` of the
    labels are wrong on purpose: x is taken from another class's region."""

    def __init__(
        self,
        *,
        n_features: int,
        n_classes: int = 2,
        class_prior: np.ndarray | None,
        drift: DriftSchedule,
        noise: float = 0.05,
        seed: int,
        client: int,
    ) -> None:
        _check_common(n_features, n_classes, seed, client)
        if n_features < 2:
            raise ValueError(f"n_features must be >= 2 to rotate a hyperplane, got {n_features}")
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}")
        self.feature_shape: tuple[int, ...] = (n_features,)
        self.n_classes = n_classes
        self.length: int | None = None
        self.prior = None if class_prior is None else normalise_prior(class_prior, n_classes)
        self.noise = float(noise)
        self.drift = drift
        self.seed = seed
        self.client = client
        self.n_candidates = 1
        if self.prior is not None:
            self.n_candidates = _CANDIDATES_BINARY if n_classes == 2 else _CANDIDATES_MULTI
        self.weights = self._concept_weights()

    def _concept_weights(self) -> np.ndarray:
        """(concept, class, feature) unit weight vectors; concept k rotates concept k-1."""
        n_rows = 1 if self.n_classes == 2 else self.n_classes
        d = self.feature_shape[0]
        w = _unit_rows(concept_rng(self.seed, 0).standard_normal((n_rows, d)))
        concepts = [w]
        for k in range(1, self.drift.n_concepts):
            w = _rotate_rows(w, concept_rng(self.seed, k))
            concepts.append(w)
        stacked = np.stack(concepts)
        if self.n_classes == 2:  # class 1 on the positive side of w, class 0 on the other
            stacked = np.concatenate([-stacked, stacked], axis=1)
        return stacked

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream positions ``index`` arriving at times ``t`` (see ``Source``)."""
        return draw_blocks(
            index,
            t,
            seed=self.seed,
            client=self.client,
            feature_shape=self.feature_shape,
            draw_block=self._draw_block,
        )

    def concept(self, t: np.ndarray) -> np.ndarray:
        """Concept id in force at times ``t``."""
        return self.drift.concept(t)

    def _labels(self, x: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Noise-free labels of candidates ``x`` (n, R, d) under per-sample concepts ``k``."""
        scores = np.einsum("nrd,ncd->nrc", x - 0.5, self.weights[k])
        return scores.argmax(axis=2)

    def _draw_block(
        self, rng: np.random.Generator, offsets: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        d, c = self.feature_shape[0], self.n_classes
        u_concept = rng.random(BLOCK)[offsets]
        u_label = rng.random(BLOCK)[offsets]
        u_noise = rng.random(BLOCK)[offsets]
        u_other = rng.random(BLOCK)[offsets]
        cand = rng.random((BLOCK, self.n_candidates, d))[offsets]
        clean = self._labels(cand, self.drift.assign(t, u_concept))
        flip = u_noise < self.noise
        rows = np.arange(offsets.size)
        if self.prior is None:
            y = clean[:, 0]
            other = (y + 1 + (u_other * (c - 1)).astype(np.int64)) % c
            return cand[:, 0].astype(np.float32), np.where(flip, other, y).astype(np.int64)
        target = sample_labels(self.prior, u_label)
        wanted = (clean == target[:, None]) != flip[:, None]  # noisy samples: any other class
        found = wanted.any(axis=1)
        pick = np.where(found, wanted.argmax(axis=1), 0)
        # No candidate fits: keep the first candidate with its own (clean or flipped) label.
        fallback = np.where(flip, (clean[:, 0] + 1 + (u_other * (c - 1)).astype(np.int64)) % c,
                            clean[:, 0])
        y = np.where(found, target, fallback)
        return cand[rows, pick].astype(np.float32), y.astype(np.int64)

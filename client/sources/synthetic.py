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

# Geometry of the mixture, in units of the noise scale. Each class is ``centers_per_class``
# clusters placed symmetrically about a class mean, along directions orthogonal to every
# other class's (while the feature space has room). Class means sit close together, so a
# linear model, which effectively compares means, does poorly; a nonlinear model that
# carves out the clusters does well. With a single cluster per class the classes are
# plain, linearly separable blobs.
_MEAN_NORM = 1.5
_CLUSTER_NORM = 3.5

_CANDIDATES_BINARY = 16
_CANDIDATES_MULTI = 32
_MIN_ANGLE = math.pi / 3
_MAX_ANGLE = 2 * math.pi / 3


def _check_common(n_features: int, n_classes: int, seed: int) -> None:
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _simplex(m: int) -> np.ndarray:
    """(m, m-1) coordinates of a regular simplex centred at 0 with unit-norm vertices:
    the most spread-out way to put m clusters around a mean."""
    centred = np.eye(m) - 1.0 / m
    frame, _ = np.linalg.qr(centred[:, : m - 1])
    vertices = centred @ frame
    return vertices / np.linalg.norm(vertices, axis=1, keepdims=True)


def _mixture_centres(
    seed: int, k: int, n_features: int, n_classes: int, per_class: int
) -> np.ndarray:
    """(n_classes, per_class, n_features) centres of concept ``k``.

    Work in an informative subspace of ``dims`` coordinates (a random orthonormal basis of
    feature space); the remaining directions carry pure noise."""
    rng = concept_rng(seed, k)
    n_dirs = n_classes * (per_class - 1)
    dims = min(n_features, max(2, n_dirs if per_class > 1 else n_classes))
    basis, _ = np.linalg.qr(rng.standard_normal((n_features, dims)))
    if per_class == 1:
        means = _unit_rows(rng.standard_normal((n_classes, dims))) * _CLUSTER_NORM
        return (means @ basis.T)[:, None, :]
    means = _unit_rows(rng.standard_normal((n_classes, dims))) * _MEAN_NORM
    if n_dirs <= dims:  # room for mutually orthogonal cluster axes
        axes = np.eye(dims)[:n_dirs]
    else:
        axes = _unit_rows(rng.standard_normal((n_dirs, dims)))
    axes = axes.reshape(n_classes, per_class - 1, dims)
    offsets = np.einsum("mj,cjd->cmd", _simplex(per_class), axes) * _CLUSTER_NORM
    return (means[:, None, :] + offsets) @ basis.T


class _Synthetic(Source):
    """Shared by the generators: blockwise drawing and the drift schedule's concept."""

    seed: int
    client: int
    drift: DriftSchedule
    _memo: dict[int, list[np.ndarray]]

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples at stream positions ``index`` arriving at times ``t`` (see ``Source``)."""
        return draw_blocks(
            index,
            t,
            seed=self.seed,
            client=self.client,
            feature_shape=self.feature_shape,
            draw_block=self._draw_block,
            memo=self._memo,
        )

    def concept(self, t: np.ndarray) -> np.ndarray:
        """Concept id in force at times ``t``."""
        return self.drift.concept(t)

    def _draw_block(
        self, rng: np.random.Generator, offsets: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class GaussianMixture(_Synthetic):
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
        _check_common(n_features, n_classes, seed)
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
        self._memo = {}
        # (concept, class, cluster, feature): all concepts up front, they are few and small.
        self.centres = np.stack(
            [
                _mixture_centres(seed, k, n_features, n_classes, centers_per_class)
                for k in range(drift.n_concepts)
            ]
        )

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


def _other_class(y: np.ndarray, u: np.ndarray, n_classes: int) -> np.ndarray:
    """A class other than ``y``, uniformly, from uniforms ``u``: how a label is corrupted."""
    return (y + 1 + (u * (n_classes - 1)).astype(np.int64)) % n_classes


def _rotate_rows(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each unit row of ``w`` by an angle in [60, 120] degrees within a random plane
    containing it: large enough that a stale model misclassifies a third or more."""
    v = rng.standard_normal(w.shape)
    v -= (v * w).sum(axis=1, keepdims=True) * w  # Gram-Schmidt: v is orthogonal to its row
    v = _unit_rows(v)
    theta = rng.uniform(_MIN_ANGLE, _MAX_ANGLE, (w.shape[0], 1))
    return _unit_rows(np.cos(theta) * w + np.sin(theta) * v)


class RotatingHyperplane(_Synthetic):
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
        _check_common(n_features, n_classes, seed)
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
        self._memo = {}
        self.n_candidates = 1
        if self.prior is not None:
            self.n_candidates = _CANDIDATES_BINARY if n_classes == 2 else _CANDIDATES_MULTI
        self.weights = self._concept_weights()
        self._weights32 = self.weights.astype(np.float32)  # candidates are float32 too

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

    def _labels(self, cand: np.ndarray, k: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Noise-free labels (n, R) of the candidates of the selected block rows, each under
        its own concept. Scoring the whole block per concept (one matrix product) is cheaper
        than first copying out the selected rows."""
        flat = cand.reshape(-1, cand.shape[-1]) - np.float32(0.5)
        labels = np.empty((offsets.size, cand.shape[1]), dtype=np.int64)
        for concept in np.unique(k).tolist():  # usually one or two concepts per block
            rows = k == concept
            block_labels = (
                (flat @ self._weights32[concept].T).argmax(axis=1).reshape(cand.shape[:2])
            )
            labels[rows] = block_labels[offsets[rows]]
        return labels

    def _draw_block(
        self, rng: np.random.Generator, offsets: np.ndarray, t: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        d, c = self.feature_shape[0], self.n_classes
        u_concept = rng.random(BLOCK)[offsets]
        u_label = rng.random(BLOCK)[offsets]
        u_noise = rng.random(BLOCK)[offsets]
        u_other = rng.random(BLOCK)[offsets]
        cand = rng.random((BLOCK, self.n_candidates, d), dtype=np.float32)
        clean = self._labels(cand, self.drift.assign(t, u_concept), offsets)
        flip = u_noise < self.noise
        if self.prior is None:
            y = np.where(flip, _other_class(clean[:, 0], u_other, c), clean[:, 0])
            return cand[offsets, 0], y
        target = sample_labels(self.prior, u_label)
        wanted = (clean == target[:, None]) != flip[:, None]  # noisy samples: any other class
        found = wanted.any(axis=1)
        pick = np.where(found, wanted.argmax(axis=1), 0)
        # No candidate fits: keep the first candidate with its own (clean or flipped) label.
        fallback = np.where(flip, _other_class(clean[:, 0], u_other, c), clean[:, 0])
        return cand[offsets, pick], np.where(found, target, fallback)

"""Replaying a finite dataset as a time-ordered stream.

Real datasets have no generative process to drift, so a replay source simply serves a
fixed permutation of the rows: ``order`` decides what a client sees and in which order
(its partition from ``fedstream.sim.partition``, possibly sorted by a time column).
"""

from __future__ import annotations

import numpy as np

from .base import Source, check_positions


class ArraySource(Source):
    """A finite dataset replayed as a time-ordered stream: position i -> row order[i]."""

    def __init__(self, x: np.ndarray, y: np.ndarray, order: np.ndarray, n_classes: int) -> None:
        xs = np.asarray(x)
        ys = np.asarray(y)
        rows = np.asarray(order)
        if xs.ndim < 2:
            raise ValueError(f"x must be (n, *feature_shape), got shape {xs.shape}")
        if ys.shape != (xs.shape[0],):
            raise ValueError(f"y must have shape ({xs.shape[0]},), got {ys.shape}")
        if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
            raise ValueError("order must be a 1-D integer array")
        if rows.size and (rows.min() < 0 or rows.max() >= xs.shape[0]):
            raise ValueError(f"order refers to rows outside [0, {xs.shape[0]})")
        if ys.size and (ys.min() < 0 or ys.max() >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes}), got [{ys.min()}, {ys.max()}]")
        # Copy once, in the dtypes draw() promises, so serving a batch is a plain gather.
        self._x = np.ascontiguousarray(xs, dtype=np.float32)
        self._y = ys.astype(np.int64)
        self._order = rows.astype(np.int64)
        self.feature_shape: tuple[int, ...] = tuple(int(s) for s in xs.shape[1:])
        self.n_classes = int(n_classes)
        self.length: int | None = int(rows.size)

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``order[index]``; ``t`` is accepted for the protocol but does not matter."""
        idx, _ = check_positions(index, t, self.length)
        rows = self._order[idx]
        return self._x[rows], self._y[rows]

    def concept(self, t: np.ndarray) -> np.ndarray:
        """Replayed data has no known concept changes: always concept 0."""
        return np.zeros(np.shape(t), dtype=np.int64)


def load_digits_arrays(image: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's bundled digits (offline), x scaled to [0,1] float32, shape (n,64) or
    (n,1,8,8) if image (channel-first, as convolutional models expect)."""
    from sklearn.datasets import load_digits  # local: sklearn is slow to import

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return x, np.asarray(bunch.target, dtype=np.int64), 10

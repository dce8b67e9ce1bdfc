"""Standardising a client's features with what its stream has shown it so far.

A real table's columns come on their own scales (a pressure near 1013 hPa, a temperature
near 20 °C): fed raw, SGD at one learning rate is dominated by the largest column and the
model barely learns from the others. Scaling by the whole file's statistics would use
samples that have not arrived yet, and a device has no whole file. So each client keeps a
running mean and variance per feature, and a round's samples enter them before they are
predicted. Only features do, never labels: the samples of a round are on the device when
it learns, so test-then-train stays honest.

The statistics are the client's own (like FedBN's local normalisation layers): they are
never sent, so they reveal nothing under secure aggregation. Each client's inputs are
then on a comparable scale, which is what the shared model needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

EPS = 1e-8  # a constant feature (variance 0) is centred, not blown up


class RunningScaler:
    """Per-feature running mean and variance (Chan et al.'s batched update, in float64)."""

    def __init__(self, feature_shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = np.zeros(feature_shape, dtype=np.float64)
        self.m2 = np.zeros(feature_shape, dtype=np.float64)  # sum of squared deviations
        self._cached: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, x: np.ndarray) -> None:
        """Fold a batch of samples (first axis) into the statistics."""
        n = len(x)
        if n == 0:
            return
        batch = np.asarray(x, dtype=np.float64)
        batch_mean = batch.mean(axis=0)
        batch_m2 = ((batch - batch_mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count = total
        self._cached.clear()

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std, feature by feature; the identity before any sample was seen."""
        if self.count == 0:
            return x
        if x.device not in self._cached:
            std = np.sqrt(self.m2 / self.count + EPS)
            self._cached[x.device] = (
                torch.as_tensor(self.mean, dtype=x.dtype, device=x.device),
                torch.as_tensor(1.0 / std, dtype=x.dtype, device=x.device),
            )
        shift, scale = self._cached[x.device]
        return (x - shift) * scale

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean, m2 = _float64(state["mean"]), _float64(state["m2"])
        if mean.shape != self.mean.shape or m2.shape != self.m2.shape:
            raise ValueError(
                f"saved feature statistics have shape {mean.shape}, the stream's features "
                f"{self.mean.shape}"
            )
        self.count, self.mean, self.m2 = int(state["count"]), mean, m2
        self._cached.clear()


def _float64(values: Any) -> np.ndarray:
    """A saved array as numpy float64 (the learner's state may hand it back as a tensor)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)

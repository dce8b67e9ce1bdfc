"""Prequential (test-then-train) bookkeeping: every prediction is scored before its sample
is learned, so the running accuracy is an honest estimate on unseen data.

Kept apart from logging (Avalanche's lesson): this only counts; records and plots read it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Prequential:
    """Counts over a stream: totals, and a fading window that forgets old predictions.

    The fading accuracy is sum(a^(n-i) * correct_i) / sum(a^(n-i)) over all n predictions;
    it is updated per batch in closed form, so no per-sample loop is needed.
    """

    fading: float = 0.99
    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    fading_num: float = 0.0
    fading_den: float = 0.0

    def update(self, correct: np.ndarray, losses: np.ndarray) -> None:
        """Add a batch of per-sample outcomes (bool correct, float loss), oldest first."""
        n = len(correct)
        if n == 0:
            return
        weights = self.fading ** np.arange(n - 1, -1, -1, dtype=np.float64)
        decay = self.fading**n
        self.fading_num = self.fading_num * decay + float(weights @ correct.astype(np.float64))
        self.fading_den = self.fading_den * decay + float(weights.sum())
        self.seen += n
        self.correct += int(correct.sum())
        self.loss_sum += float(losses.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else float("nan")

    @property
    def fading_accuracy(self) -> float:
        return self.fading_num / self.fading_den if self.fading_den else float("nan")

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, float]) -> Prequential:
        return cls(**state)


@dataclass
class RoundOutcome:
    """What one client did in one round: the numbers its update reports."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    drifts: list[int] = field(default_factory=list)  # stream positions where drift was detected

    def add(self, correct: np.ndarray, losses: np.ndarray) -> None:
        self.seen += len(correct)
        self.correct += int(correct.sum())
        self.loss_sum += float(losses.sum())

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


# How the trivial predictors are named wherever a person reads them (terminal, plots).
NO_CHANGE, MAJORITY = "no-change (last label)", "majority class so far"


@dataclass
class References:
    """The two predictors a stream classifier must beat, scored on the same samples.

    `no-change` predicts the label before (it wins on labels that come in runs, which a
    shuffled test set never shows); `majority` predicts the class seen most often so far
    (it wins on imbalanced classes). Their accuracies give the kappa statistics stream
    mining reports (Bifet et al. 2015): a model with kappa_temporal <= 0 learned less than
    the label's own autocorrelation tells. Before its first label, each predicts class 0.
    """

    counts: np.ndarray  # per class, labels seen so far
    last: int = 0  # the label before the next one

    @classmethod
    def new(cls, n_classes: int) -> References:
        return cls(np.zeros(n_classes, dtype=np.int64))

    def score(self, y: np.ndarray) -> tuple[int, int]:
        """How many of labels `y` (oldest first) each predicted right: (no-change, majority).

        The majority's prediction before each label is the argmax of the counts until
        then, taken for a block of labels at once (one-hot cumulative counts), in blocks
        small enough that the block is a few megabytes whatever the number of classes.
        """
        y = np.asarray(y, dtype=np.int64)
        if len(y) == 0:
            return 0, 0
        no_change = int(y[0] == self.last) + int((y[1:] == y[:-1]).sum())
        majority, n_classes = 0, len(self.counts)
        step = max(1, (1 << 19) // n_classes)
        for lo in range(0, len(y), step):
            block = y[lo : lo + step]
            onehot = np.zeros((len(block), n_classes), dtype=np.int64)
            onehot[np.arange(len(block)), block] = 1
            before = np.cumsum(onehot, axis=0) - onehot + self.counts
            majority += int((before.argmax(axis=1) == block).sum())
            self.counts += onehot.sum(axis=0)
        self.last = int(y[-1])
        return no_change, majority

    def state_dict(self) -> dict[str, object]:
        return {"counts": self.counts.copy(), "last": self.last}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> References:
        return cls(np.array(state["counts"], dtype=np.int64), int(state["last"]))  # type: ignore[call-overload]


def class_tally(y: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class: how many samples had it as label, how many were predicted as it, and how
    many of those were right ((3, n_classes) counts, in that order).

    These are what an imbalanced stream is judged by (recall per class, balanced accuracy,
    Cohen's kappa, macro F1), and unlike a confusion matrix they grow with the classes,
    not their square: under secure aggregation they travel in the masked tail.
    """
    y, predicted = np.asarray(y, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    for what, values in (("label", y), ("prediction", predicted)):
        if len(values) and not 0 <= values.min() <= values.max() < n_classes:
            raise ValueError(
                f"a {what} outside the {n_classes} classes (got {values.min()} to "
                f"{values.max()}): a model must give one score per class (stream.n_classes)"
            )
    return np.stack([
        np.bincount(y, minlength=n_classes),
        np.bincount(predicted, minlength=n_classes),
        np.bincount(y[y == predicted], minlength=n_classes),
    ])


@dataclass
class RoundOutcome:
    """What one client did in one round: the numbers its update reports."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    drifts: list[int] = field(default_factory=list)  # stream positions where drift was detected
    no_change_correct: int = 0  # of the same samples, right by References
    majority_correct: int = 0
    classes: np.ndarray | None = None  # class_tally of the round's samples

    def absorb(self, other: RoundOutcome) -> None:
        """Count `other`'s samples as this one's too (several clients' round as one)."""
        self.seen += other.seen
        self.correct += other.correct
        self.loss_sum += other.loss_sum
        self.no_change_correct += other.no_change_correct
        self.majority_correct += other.majority_correct
        if other.classes is not None:
            self.classes = other.classes if self.classes is None else self.classes + other.classes

    def add(self, correct: np.ndarray, losses: np.ndarray) -> None:
        self.seen += len(correct)
        self.correct += int(correct.sum())
        self.loss_sum += float(losses.sum())

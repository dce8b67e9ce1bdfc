"""Baselines on the very same streams: `local` (every client alone) and `centralized`
(one learner that sees all streams interleaved in time order).

They bracket federated learning: it should beat `local` by pooling knowledge and come
close to `centralized`, which pools the raw data federated learning never moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedstream.client.learner import Learner, Spec
from fedstream.protocol.config import Config
from fedstream.server import stopping
from fedstream.sim.federation import Federation, federation


@dataclass
class AccuracySeries:
    """One run's prequential accuracy, round by round: a baseline's, or the federation's
    as its round records tell it, so that both reach summary.json in the same form."""

    name: str
    seen: int = 0
    correct: int = 0
    per_round: list[float | None] = field(default_factory=list)  # accuracy in each round
    cumulative: list[float | None] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.seen if self.seen else None

    def add_round(self, seen: int, correct: int) -> None:
        self.seen += seen
        self.correct += correct
        self.per_round.append(correct / seen if seen else None)
        self.cumulative.append(self.accuracy)

    def to_dict(self) -> dict:
        return {
            "prequential_accuracy": self.accuracy,
            "samples_seen": self.seen,
            "accuracy_per_round": self.per_round,
            "cumulative_accuracy": self.cumulative,
        }


def _spec(cfg: Config, fed: Federation) -> Spec:
    return Spec(
        feature_shape=fed.feature_shape,
        n_classes=fed.n_classes,
        learner=cfg.learner,
        detector=cfg.detector,
        fading=cfg.evaluation.fading,
        seed=cfg.seed,
    )


def run_local(cfg: Config) -> AccuracySeries:
    fed = federation(cfg)
    streams = [fed.stream(c) for c in range(cfg.federation.clients)]
    learners = [Learner(_spec(cfg, fed)) for _ in streams]
    result = AccuracySeries("local")
    for r in range(1, cfg.federation.rounds + 1):
        stopping.check()  # a stopped run does not finish its baselines
        seen = correct = 0
        for stream, learner in zip(streams, learners, strict=True):
            batch = stream.take(*stream.pending(learner.offset, r, cfg.stream.budget))
            outcome = learner.learn(batch.x, batch.y)
            seen, correct = seen + outcome.seen, correct + outcome.correct
        result.add_round(seen, correct)
    return result


def run_centralized(cfg: Config) -> AccuracySeries:
    fed = federation(cfg)
    streams = [fed.stream(c) for c in range(cfg.federation.clients)]
    offsets = [0] * len(streams)
    learner = Learner(_spec(cfg, fed))
    result = AccuracySeries("centralized")
    for r in range(1, cfg.federation.rounds + 1):
        stopping.check()  # a stopped run does not finish its baselines
        batches = []
        for c, stream in enumerate(streams):
            start, stop = stream.pending(offsets[c], r, cfg.stream.budget)
            batches.append(stream.take(start, stop))
            offsets[c] = stop
        t = np.concatenate([b.t for b in batches])
        order = np.argsort(t, kind="stable")
        x = np.concatenate([b.x for b in batches])[order]
        y = np.concatenate([b.y for b in batches])[order]
        outcome = learner.learn(x, y)
        result.add_round(outcome.seen, outcome.correct)
    return result


RUNNERS = {"local": run_local, "centralized": run_centralized}


def run_baselines(cfg: Config) -> dict[str, AccuracySeries]:
    return {name: RUNNERS[name](cfg) for name in cfg.simulation.baselines}

"""Baselines on the very same streams: `local` (every client alone) and `centralized`
(one learner that sees all streams interleaved in time order).

They bracket federated learning: it should beat `local` by pooling knowledge and come
close to `centralized`, which pools the raw data federated learning never moves.
"""

from __future__ import annotations

import numpy as np

from fedstream.client.app import new_learner
from fedstream.client.metrics import RoundOutcome
from fedstream.protocol.config import Config
from fedstream.server import stopping
from fedstream.server.records import AccuracySeries
from fedstream.sim.federation import federation


def run_local(cfg: Config) -> AccuracySeries:
    fed = federation(cfg)
    streams = [fed.stream(c) for c in range(cfg.federation.clients)]
    learners = [new_learner(cfg, fed.feature_shape, fed.n_classes) for _ in streams]
    result = AccuracySeries("local")
    for r in range(1, cfg.federation.rounds + 1):
        stopping.check()  # a stopped run does not finish its baselines
        total = RoundOutcome()
        for stream, learner in zip(streams, learners, strict=True):
            batch = stream.take(*stream.pending(learner.offset, r, cfg.stream.budget))
            total.absorb(learner.learn(batch.x, batch.y))
        _add(result, total)
    return result


def run_centralized(cfg: Config) -> AccuracySeries:
    fed = federation(cfg)
    streams = [fed.stream(c) for c in range(cfg.federation.clients)]
    offsets = [0] * len(streams)
    learner = new_learner(cfg, fed.feature_shape, fed.n_classes)
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
        _add(result, learner.learn(x, y))
    return result


def _add(series: AccuracySeries, outcome: RoundOutcome) -> None:
    series.add_round(outcome.seen, outcome.correct, outcome.no_change_correct,
                     outcome.majority_correct, outcome.classes)


RUNNERS = {"local": run_local, "centralized": run_centralized}


def run_baselines(cfg: Config) -> dict[str, AccuracySeries]:
    return {name: RUNNERS[name](cfg) for name in cfg.simulation.baselines}

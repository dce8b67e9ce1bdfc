"""The fedstream ClientApp: one round of test-then-train on a client's stream.

The whole client pipeline is `train_round`: load the learner, apply the global model, take
the samples that arrived since the last commit, predict-then-learn on them, and reply with
the local model and a report. The learner (and with it the stream offset) is committed to
`Context.state` in the same step that builds the reply, so a round either happens whole
or not at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedstream.client.learner import Learner, Spec
from fedstream.client.privacy import make_privacy_mod
from fedstream.client.secure import check_classes, make_secure_aggregation_mod
from fedstream.client.stream import ClientStream
from fedstream.protocol import messages as m
from fedstream.protocol import updates
from fedstream.protocol.config import Config, from_run_config

StreamFactory = Callable[[Config, Context], ClientStream]
STATE_KEY = "fedstream-learner"


def make_client_app(
    stream_for: StreamFactory,
    config: Config | None = None,
    mods: Sequence[Mod] = (),
    app_class: type[ClientApp] = ClientApp,
    seed: int | None = None,
) -> ClientApp:
    """A ClientApp whose clients read their streams from `stream_for`.

    `config` binds the federation config (Python API); without it the app reads it from the
    Flower run config, which is how `flwr run` and deployments hand it over. `app_class`
    lets a runtime choose how the app travels (see `fedstream.sim.client_app`).
    `seed` makes differential privacy's noise and secure aggregation's stochastic rounding
    repeat (simulation only: a device's must be unpredictable, so they come from the OS).
    """
    # The update pipeline, outermost last: the handler trains, privacy clips and noises the
    # change, secure aggregation quantizes and masks it.
    app = app_class(mods=[*mods, make_secure_aggregation_mod(seed), make_privacy_mod(seed)])

    @app.train()
    def _train(msg: Message, ctx: Context) -> Message:
        cfg = config or from_run_config(dict(ctx.run_config))
        return train_round(msg, ctx, cfg, stream_for(cfg, ctx))

    @app.query()
    def _query(msg: Message, ctx: Context) -> Message:
        cfg = config or from_run_config(dict(ctx.run_config))
        return Message(m.roster_reply(stream_for(cfg, ctx).client), reply_to=msg)

    return app


def train_round(msg: Message, ctx: Context, cfg: Config, stream: ClientStream) -> Message:
    started = time.perf_counter()
    learner = load_learner(ctx, cfg, stream)
    server_round = int(msg.content[m.CONFIG][m.ROUND])
    start, stop = stream.pending(learner.offset, until=server_round, budget=cfg.stream.budget)
    batch = stream.take(start, stop)
    content = learn(msg, learner, batch.x, batch.y, stream.client, started)
    save_learner(ctx, learner)
    return Message(content, reply_to=msg)


def learn(
    msg: Message, learner: Learner, x: np.ndarray, y: np.ndarray, client: int, started: float
) -> RecordDict:
    """Apply the global model, test-then-train on (x, y): the reply's model and report."""
    check_classes(msg, learner.spec.n_classes)
    learner.set_weights(msg.content[m.ARRAYS].to_torch_state_dict())
    outcome = learner.learn(x, y)
    report = m.TrainReport(
        client=client,
        examples=outcome.seen,
        correct=outcome.correct,
        loss_sum=outcome.loss_sum,
        drifts=outcome.drifts,
        total_seen=learner.metric.seen,
        total_correct=learner.metric.correct,
        fading_accuracy=learner.metric.fading_accuracy if learner.metric.seen else 0.0,
        offset=learner.offset,
        train_seconds=time.perf_counter() - started,
        no_change_correct=outcome.no_change_correct,
        majority_correct=outcome.majority_correct,
        classes=None if outcome.classes is None else outcome.classes.ravel().tolist(),
    )
    weights = updates.record(learner.get_weights())
    return RecordDict({m.ARRAYS: weights, m.METRICS: report.to_record()})


def load_learner(ctx: Context, cfg: Config, stream: ClientStream) -> Learner:
    source = stream.source
    blob = ctx.state[STATE_KEY]["blob"] if STATE_KEY in ctx.state else None
    return new_learner(cfg, tuple(source.feature_shape), source.n_classes, blob)  # type: ignore[arg-type]


def new_learner(
    cfg: Config, feature_shape: tuple[int, ...], n_classes: int, state: bytes | None = None
) -> Learner:
    spec = Spec(
        feature_shape=feature_shape,
        n_classes=n_classes,
        learner=cfg.learner,
        detector=cfg.detector,
        fading=cfg.evaluation.fading,
        seed=cfg.seed,
    )
    learner = Learner(spec)
    if state is not None:
        learner.load_state_bytes(state)
    return learner


def save_learner(ctx: Context, learner: Learner) -> None:
    ctx.state[STATE_KEY] = ConfigRecord({"blob": learner.state_bytes()})

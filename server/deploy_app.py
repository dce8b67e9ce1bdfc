"""The aggregator's ServerApp in deployment: rounds, live records, a checkpoint every round.

The latest global model is also written as `model.pt` in the results folder every round,
for use outside fedstream while the federation goes on.

`fedstream server` submits this app to its SuperLink with the federation config and its
state directory. After every round the global model, the strategy with its optimizer state,
the round number and the running totals are checkpointed; with `resume`, the app starts
from the last checkpoint and carries on to the configured number of rounds.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedstream.protocol import model_file, updates
from fedstream.protocol.config import Config, from_run_config
from fedstream.protocol.models import build_model, check_outputs
from fedstream.server import checkpoint
from fedstream.server.app import stages
from fedstream.server.grid import bounded_pulls
from fedstream.server.records import (
    History,
    MetricsLog,
    federated_series,
    read_metrics,
    run_summary,
    write_summary,
)
from fedstream.server.rounds import RoundSettings, run_rounds
from fedstream.server.strategy import make_strategy

STATE_DIR, RESUME = "state-dir", "resume"  # run config keys set by `fedstream server`


def deploy_server_app() -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        bounded_pulls()
        run_config = dict(context.run_config)
        cfg = from_run_config({k: v for k, v in run_config.items() if k not in (STATE_DIR, RESUME)})
        run_aggregator(grid, cfg, Path(str(run_config[STATE_DIR])), bool(run_config.get(RESUME)))

    return app


def run_aggregator(grid: Grid, cfg: Config, state_dir: Path, resume: bool) -> dict[str, Any]:
    out = Path(cfg.output.dir)
    ckpt = checkpoint.load(state_dir) if resume else None
    log = MetricsLog(out / "metrics.jsonl", append=ckpt is not None)
    if ckpt is None:
        strategy, arrays, history, first = make_strategy(cfg), initial_arrays(cfg), History(), 1
    else:
        strategy, arrays, history = ckpt.strategy, ckpt.arrays, ckpt.history
        first = ckpt.server_round + 1
        log.write({"resumed_after_round": ckpt.server_round, "model_sha256": fingerprint(arrays)})

    def record(rec: dict[str, Any], _history: History) -> None:
        log.write(rec)

    def save(server_round: int, model: ArrayRecord, hist: History) -> None:
        checkpoint.save(state_dir, checkpoint.Checkpoint(server_round, model, strategy, hist))
        log.write({"checkpoint_round": server_round, "model_sha256": fingerprint(model)})
        # The feeds name the classes (`fedstream feed --classes`), the server only if the
        # config does too (`stream.classes`); the columns likewise (`stream.features`).
        classes = model_file.class_labels(cfg.stream.classes, cfg.stream.n_classes)
        named = cfg.stream.features if len(cfg.stream.features) == cfg.stream.n_features else []
        model_file.save(out, model, cfg, (cfg.stream.n_features,), classes, named,
                        server_round=server_round)

    settings = RoundSettings(
        rounds=cfg.federation.rounds,
        seed=cfg.seed,
        timeout=cfg.federation.round_timeout,
        progress=False,
        sample_all=cfg.federation.fraction == 1.0,
        first_round=first,
    )
    settings.privacy, settings.secure = stages(cfg, None)
    if settings.privacy is not None:
        settings.privacy.resume(history.releases, history.aggregated)
        history.privacy_void = settings.privacy.void
    started = time.perf_counter()
    arrays, history = run_rounds(
        grid, strategy, arrays, settings, record, history=history, after_round=save
    )
    federated = federated_series(read_metrics(out / "metrics.jsonl"))  # resumed runs too
    summary = {
        **run_summary(cfg, history),
        "accuracy_per_round": federated.per_round,
        "cumulative_accuracy": federated.cumulative,
        "samples_dropped": history.dropped,
        "wall_seconds_since_start": time.perf_counter() - started,
        "model_sha256": fingerprint(arrays),
    }
    write_summary(out, summary)
    return summary


def initial_arrays(cfg: Config, check: bool = False) -> ArrayRecord:
    """The run's first global model; `check`: also that it gives one score per class
    (`fedstream server` does, once, before anything starts)."""
    shape = (cfg.stream.n_features,)
    model = build_model(cfg.learner.model, shape, cfg.stream.n_classes,
                        hidden=cfg.learner.hidden, seed=cfg.seed)
    if check:
        check_outputs(model, cfg.learner.model, shape, cfg.stream.n_classes)
    return ArrayRecord(model.state_dict())


def fingerprint(arrays: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for key, arr in arrays.items():
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(updates.view(arr)))  # no copy of a C-order array
    return digest.hexdigest()


app = deploy_server_app()

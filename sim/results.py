"""The results folder: config.toml, metrics.jsonl (written live by the server), summary.json
and plots. Its layout is a contract other tools read; see the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedstream.protocol.config import Config, to_toml
from fedstream.server.records import History, run_summary
from fedstream.sim.baselines import AccuracySeries
from fedstream.sim.detection import client_drift_times, detection_report, drifts_in_run

OWNED = ("summary.json", "metrics.jsonl", "plots/accuracy.png", "plots/clients.png",
         "plots/privacy.png")


def prepare(cfg: Config) -> Path:
    """The results folder, holding nothing of an earlier run: a file this run does not
    write (a plot it does not draw) would otherwise sit beside its results as if it
    were one of them. Files fedstream does not write are left alone."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        (out / name).unlink(missing_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    return out


def summarize(
    cfg: Config,
    history: History,
    wall_seconds: float,
    baselines: dict[str, AccuracySeries],
    final_eval: dict[str, float] | None = None,
    records: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    records = records or []
    federated = AccuracySeries("federated")  # per round, as the baselines have it
    for rec in records:
        federated.add_round(rec["examples"], rec["correct"])
    summary: dict[str, Any] = {
        **run_summary(cfg, history),
        "wall_seconds": wall_seconds,
        "accuracy_per_round": federated.per_round,  # null: a round with no prediction
        "cumulative_accuracy": federated.cumulative,
        "drift_times": drifts_in_run(cfg),  # later (or earlier) ones were never seen
    }
    if cfg.drift.kind != "none" and cfg.drift.stagger > 0:  # each client's own, by id
        summary["client_drift_times"] = client_drift_times(cfg)
    detection = detection_report(cfg, records)
    if detection is not None:
        summary["drift_detection"] = detection
    names = _client_names(cfg)
    if names:  # partition.column: which site (device, user) each client is
        summary["client_names"] = list(names)  # by client id
    if final_eval:
        summary["global_eval"] = final_eval
    if baselines:
        summary["baselines"] = {name: b.to_dict() for name, b in baselines.items()}
    return summary


def _client_names(cfg: Config) -> tuple[str, ...]:
    from fedstream.sim.federation import federation  # the data: only for a column split

    if cfg.partition.scheme != "column":
        return ()
    dataset = federation(cfg).dataset
    return dataset.client_names if dataset is not None else ()


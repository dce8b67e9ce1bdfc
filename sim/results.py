"""The results folder: config.toml, metrics.jsonl (written live by the server), summary.json
and plots. Its layout is a contract other tools read; see the README.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedstream.protocol.config import Config, drift_times, to_toml
from fedstream.server.records import History, read_metrics
from fedstream.sim.baselines import BaselineResult


def prepare(cfg: Config) -> Path:
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(cfg))
    return out


def summarize(
    cfg: Config,
    history: History,
    wall_seconds: float,
    baselines: dict[str, BaselineResult],
    final_eval: dict[str, float] | None = None,
) -> dict[str, Any]:
    per_client = {
        str(c): (v["correct"] / v["seen"] if v["seen"] else None)
        for c, v in sorted(history.per_client.items())
    }
    summary: dict[str, Any] = {
        "rounds": history.rounds,
        "clients": cfg.federation.clients,
        "strategy": cfg.federation.strategy,
        "seed": cfg.seed,
        "prequential_accuracy": history.accuracy,
        "prequential_loss": history.loss_sum / history.seen if history.seen else None,
        "wall_seconds": wall_seconds,
        "client_updates": history.client_updates,
        "client_failures": history.failures,
        "samples_seen": history.seen,
        "bytes_up": history.bytes_up,
        "bytes_down": history.bytes_down,
        "drift_times": drift_times(cfg),
        "drift_detections": history.drift_count,
        "secure_aggregation": cfg.secure_aggregation.enabled,
        "round_trips": history.round_trips,
        "round_trips_per_round": history.round_trips / history.rounds if history.rounds else None,
        "per_client_accuracy": per_client,
    }
    if final_eval:
        summary["global_eval"] = final_eval
    if baselines:
        summary["baselines"] = {name: b.to_dict() for name, b in baselines.items()}
    return summary


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def load(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a results folder back: (summary, round records)."""
    summary = json.loads((out / "summary.json").read_text())
    return summary, read_metrics(out / "metrics.jsonl")

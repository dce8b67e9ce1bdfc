"""How well the clients' drift detectors found the drifts the simulation put in.

A simulation knows what a deployment cannot: when each client's concept really changed
(its drift times, after its stagger) and at which stream position that was. Matching
the detections in metrics.jsonl against those positions turns "the detector fired 31
times" into what a study of drift handling reports: drifts detected and missed, the
delay of each detection, and false alarms.

The rule, per client (detections are stream positions, as the learner records them):
- drift j starts at the first sample that arrives at or after its start time (the
  drift time; for a gradual drift, the start of its ramp, `at - width / 2`);
- the first detection at or after that sample and before the next drift's is drift j's
  detection; its delay is counted in samples (the detector's own measure) and in rounds
  (from the drift's start to the end of the round that reported it: what the server
  waited, sampling included);
- a drift whose window holds no detection is missed, if the client processed any of
  its samples; a drift the client never reached (not sampled again, stream run dry,
  run ended) is neither;
- every other detection is a false alarm: before the first drift, or a repeat after a
  drift was already detected.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from fedstream.client.sources.drift import staggered
from fedstream.protocol.config import Config, drift_times
from fedstream.sim.federation import federation


def client_drift_times(cfg: Config) -> list[list[float]]:
    """Each client's drift times (by client id), after its stagger, as its source applies
    them; like `drift.at`, a gradual drift's time is the middle of its ramp."""
    n = cfg.federation.clients
    return [list(staggered(drift_times(cfg), cfg.drift.stagger, c, n, cfg.seed))
            for c in range(n)]


def detection_report(cfg: Config, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Drifts detected, missed and false alarms, with delays; None when there is nothing to
    match: no detector, or secure aggregation (who detected what stays on the client)."""
    if cfg.detector.kind == "none" or cfg.secure_aggregation.enabled:
        return None
    half = cfg.drift.width / 2 if cfg.drift.kind == "gradual" else 0.0
    starts = [[t - half for t in times] for times in client_drift_times(cfg)]
    base = drift_times(cfg)
    found: dict[int, list[tuple[int, int]]] = {}  # client -> [(position, round)]
    reached: dict[int, int] = {}  # client -> stream offset after its last report
    for rec in records:
        for d in rec["drifts"]:
            found.setdefault(int(d["client"]), []).append((int(d["position"]), rec["round"]))
        for c, rep in rec["clients"].items():
            reached[int(c)] = max(reached.get(int(c), 0), int(rep.get("offset", 0)))
    per_drift = [{"at": t, "clients_reached": 0, "detected": 0, "missed": 0,
                  "delays_samples": [], "delays_rounds": []} for t in base]
    false_alarms = 0
    for c in sorted(set(found) | set(reached)):
        stream = federation(cfg).stream(c)
        positions = [stream.arrived(s) for s in starts[c]]
        hits = sorted(found.get(c, []))
        hit_positions = [p for p, _ in hits]
        used = 0
        for j, (p, start) in enumerate(zip(positions, starts[c], strict=True)):
            if reached.get(c, 0) <= p:
                continue  # the client never processed a sample of this concept
            end = positions[j + 1] if j + 1 < len(positions) else np.inf
            k = bisect.bisect_left(hit_positions, p)
            row = per_drift[j]
            row["clients_reached"] += 1
            if k < len(hits) and hits[k][0] < end:
                row["detected"] += 1
                row["delays_samples"].append(hits[k][0] - p)
                row["delays_rounds"].append(hits[k][1] - start)
                used += 1
            else:
                row["missed"] += 1
        false_alarms += len(hits) - used
    samples = [d for row in per_drift for d in row["delays_samples"]]
    rounds = [d for row in per_drift for d in row["delays_rounds"]]
    for row in per_drift:
        row["delay_samples"] = _spread(row.pop("delays_samples"))
        row["delay_rounds"] = _spread(row.pop("delays_rounds"))
    return {
        "client_drifts": sum(row["clients_reached"] for row in per_drift),
        "detected": sum(row["detected"] for row in per_drift),
        "missed": sum(row["missed"] for row in per_drift),
        "false_alarms": false_alarms,
        "delay_samples": _spread(samples),
        "delay_rounds": _spread(rounds),
        "per_drift": per_drift,
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())}

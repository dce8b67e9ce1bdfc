"""How well the clients' drift detectors found the drifts the simulation put in.

A simulation knows what a deployment cannot: when each client's concept really changed
(its drift times, after its stagger) and at which stream position that was. Matching
the detections in metrics.jsonl against those positions turns "the detector fired 31
times" into what a study of drift handling reports: drifts detected and missed, the
delay of each detection, and false alarms.

The rule, per client (detections are stream positions, as the learner records them):
- drift j starts at the first sample that arrives at or after its start time: the drift
  time or, for a gradual drift, the start of its ramp (`at - width / 2`), though never
  before halfway from the previous drift's time, where two ramps overlap;
- a drift whose time comes before the client's first sample is not one it saw (its
  stream began in the new concept, or mostly so, for a ramp), nor is one with no sample
  before the next drift starts (the two came as one change, scored as the later);
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedstream.client.sources.drift import staggered
from fedstream.client.stream import ClientStream
from fedstream.protocol.config import Config, drift_times
from fedstream.sim.federation import federation


def scored_times(cfg: Config) -> list[float]:
    """The drift times detections are scored against: those put in, or a file's own
    (`drift.known_at`, on the round clock its rows arrive on)."""
    return federation(cfg).known_drifts if cfg.drift.known_at else drift_times(cfg)


def client_drift_times(cfg: Config) -> list[list[float]]:
    """Each client's drift times (by client id), after its stagger, as its source applies
    them; like `drift.at`, a gradual drift's time is the middle of its ramp. A file's own
    drifts reach every client at once (its rows arrive on one clock)."""
    n = cfg.federation.clients
    if cfg.drift.known_at:
        return [scored_times(cfg) for _ in range(n)]
    return [list(staggered(drift_times(cfg), cfg.drift.stagger, c, n, cfg.seed))
            for c in range(n)]


def drifts_in_run(cfg: Config) -> list[float]:
    """The times of `drift.at` that some client lives through in this run: after its
    stagger, the drift comes after time 0 and starts (its ramp, if gradual) before the
    last round ends."""
    last = cfg.federation.rounds
    met = {j for times in client_drift_times(cfg)
           for j, (t, start) in enumerate(zip(times, _starts(times, cfg), strict=True))
           if t > 0 and start < last}
    return [t for j, t in enumerate(scored_times(cfg)) if j in met]


def detection_report(cfg: Config, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Drifts detected, missed and false alarms, with delays; None when there is nothing to
    match: no detector, or secure aggregation (who detected what stays on the client)."""
    if cfg.detector.kind == "none" or cfg.secure_aggregation.enabled:
        return None
    found: dict[int, list[tuple[int, int]]] = {}  # client -> [(position, round)]
    reached: dict[int, int] = {}  # client -> stream offset after its last report
    for rec in records:
        for d in rec["drifts"]:
            found.setdefault(int(d["client"]), []).append((int(d["position"]), rec["round"]))
        for c, rep in rec["clients"].items():
            reached[int(c)] = max(reached.get(int(c), 0), int(rep.get("offset", 0)))
    rows = [_Tally(t) for t in scored_times(cfg)]
    times = client_drift_times(cfg)
    false_alarms = sum(
        _score_client(cfg, c, times[c], sorted(found.get(c, [])), reached.get(c, 0), rows)
        for c in sorted(set(found) | set(reached))
    )
    # A file's own drifts, if any, are unknown: with none put in, no alarm can be called
    # false (on a built-in source without drift, every one is).
    unknown = not rows and cfg.stream.source in ("csv", "jsonl") and not cfg.drift.known_at
    return {
        "client_drifts": sum(row.reached for row in rows),
        "detected": sum(len(row.samples) for row in rows),
        "missed": sum(row.missed for row in rows),
        "alarms": sum(len(found_c) for found_c in found.values()),
        "false_alarms": None if unknown else false_alarms,
        "delay_samples": _spread([d for row in rows for d in row.samples]),
        "delay_rounds": _spread([d for row in rows for d in row.rounds]),
        "per_drift": [row.summary() for row in rows],
    }


@dataclass
class _Tally:
    """One drift time's score, summed over clients."""

    at: float
    reached: int = 0
    missed: int = 0
    samples: list[int] = field(default_factory=list)  # delay of each detection
    rounds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"at": self.at, "clients_reached": self.reached, "detected": len(self.samples),
                "missed": self.missed, "delay_samples": _spread(self.samples),
                "delay_rounds": _spread(self.rounds)}


def _score_client(
    cfg: Config, client: int, times: list[float], hits: list[tuple[int, int]], offset: int,
    rows: list[_Tally],
) -> int:
    """Add one client's drifts to `rows`; its false alarms. `hits` are its detections as
    sorted (position, round) pairs, `offset` its stream position after its last report."""
    stream, last = federation(cfg).stream(client), cfg.federation.rounds
    starts = _starts(times, cfg)
    # a drift whose time comes before the client's first sample: it began in the new
    # concept (mostly, for a ramp), so it saw no change
    unseen = [t < last and stream.arrived(t) == 0 for t in times]
    windows = _windows(_positions(stream, starts, last), unseen)
    hit_positions = [p for p, _ in hits]
    used = 0
    for row, start, (p, end) in zip(rows, starts, windows, strict=True):
        if p is None or offset <= p:
            continue  # not a change this client saw, or never processed a sample of it
        row.reached += 1
        k = bisect.bisect_left(hit_positions, p)
        if k < len(hits) and hits[k][0] < end:
            row.samples.append(hits[k][0] - p)
            row.rounds.append(hits[k][1] - start)
            used += 1
        else:
            row.missed += 1
    return len(hits) - used


def _starts(times: list[float], cfg: Config) -> list[float]:
    """When each of a client's drifts begins: its time, or for a gradual drift the start
    of its ramp, but never before halfway from the previous drift's time (where ramps
    overlap, a sample belongs to the drift whose time is nearer)."""
    if cfg.drift.kind != "gradual":
        return list(times)
    half = cfg.drift.width / 2
    return [t - half if j == 0 else max(t - half, (times[j - 1] + t) / 2)
            for j, t in enumerate(times)]


def _positions(stream: ClientStream, starts: list[float], rounds: int) -> list[int | None]:
    """The stream position where each drift begins; None for one the run cannot reach
    (no sample arrives at or after time `rounds`), without counting arrivals up to it."""
    return [stream.arrived(s) if s < rounds else None for s in starts]


def _windows(
    positions: list[int | None], unseen: list[bool]
) -> list[tuple[int | None, float]]:
    """Each drift's window of positions, [start, next drift's start); None for a drift no
    sample of this client saw happen: an `unseen` one, or one with no sample before the
    next (the two changes came as one, and the later one is scored)."""
    windows: list[tuple[int | None, float]] = []
    for j, p in enumerate(positions):
        nxt = positions[j + 1] if j + 1 < len(positions) else None
        end = np.inf if nxt is None else nxt
        windows.append((None if p is None or unseen[j] or p == end else p, end))
    return windows


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())}

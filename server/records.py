"""Round records: what happened in each round, as one JSON object per line of metrics.jsonl.

The records are the contract that plots, summaries and other tools read, so everything
is derived from the replies here, once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message

from fedstream.protocol import messages as m
from fedstream.protocol.updates import size
from fedstream.server import stopping
from fedstream.server.privacy import ADJACENCY, SAMPLING
from fedstream.server.strategy import flower_strategy

if TYPE_CHECKING:
    from fedstream.protocol.config import Config, PrivacyConfig
    from fedstream.server.secure import SecureOutcome


def bytes_of(msg: Message) -> int:
    """Payload bytes of a message: its arrays plus its metric and config records."""
    total = 0
    for rec in msg.content.values():  # not the typed views: see messages.record
        total += _config_bytes(rec) if isinstance(rec, ConfigRecord) else rec.count_bytes()
    return total


def _config_bytes(rec: Any) -> int:
    """Flower's ConfigRecord.count_bytes, but an empty list counts 0 instead of raising."""
    total = 0
    for key, value in rec.items():
        items = value if isinstance(value, list) else [value]
        total += len(key) + sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in items)
    return total


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def client_name(node: int, client_of: dict[int, int]) -> str:
    """A node as the privacy ledger and failure reasons name it: its client id once it has
    said it (a masked input says it, so by the time a round fails every survivor has), else
    its node id."""
    return f"client {client_of[node]}" if node in client_of else f"node {node}"


def _known_sum(counts: list[int | None]) -> int | None:
    """A round's total of a count some clients may not report (an older fedstream): None
    then, rather than a total that counts their samples as none right."""
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


CLASS_ROWS = ("labels", "predicted", "right")  # a class tally's rows (client.metrics)


def _class_sum(tallies: list[list[int] | None]) -> list[int] | None:
    """A round's class tally, summed over its clients: None when no client reported, a
    client did not count one (an older fedstream) or counted another number of classes."""
    if not tallies or any(t is None for t in tallies) or len({len(t or ()) for t in tallies}) > 1:
        return None
    return np.sum(tallies, axis=0, dtype=np.int64).tolist()


def _class_record(tally: list[int] | None) -> dict[str, list[int]] | None:
    """A class tally as metrics.jsonl holds it: one list per row, a count per class."""
    if tally is None:
        return None
    rows = np.asarray(tally, dtype=np.int64).reshape(len(CLASS_ROWS), -1).tolist()
    return dict(zip(CLASS_ROWS, rows, strict=True))


SILENT = "no reply before timeout"  # a failure's reason when nothing came back


def _failure(
    client_of: dict[int, int], node: int, reason: str, stage: str | None = None
) -> dict[str, Any]:
    """A failed client, by fedstream id and by Flower node id: a node that never answered
    has no known client id yet, and the node id is what the SuperLink's own logs show."""
    failure: dict[str, Any] = {"client": client_of.get(node), "node": node}
    if stage is not None:
        failure["stage"] = stage
    failure["reason"] = reason
    return failure


@dataclass
class History:
    """Running totals over rounds, for the summary and the live progress bar."""

    rounds: int = 0
    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    client_updates: int = 0
    empty_updates: int = 0  # updates that trained on nothing (where the server can tell)
    failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    drift_count: int = 0
    dropped: int = 0
    no_change_correct: int | None = 0  # of `seen`, right by repeating the label before
    majority_correct: int | None = 0  # of `seen`, right by the class seen most so far
    # Of `seen`, per class: labels, predictions, right ones (flat, CLASS_ROWS); [] before
    # any sample, None when some round's are unknown.
    classes: list[int] | None = field(default_factory=list)
    clipped: int = 0  # secure rounds: coordinates clipped, of `coordinates` summed
    coordinates: int = 0
    secure: bool = False
    aggregated: int = 0  # rounds whose aggregate became the global model
    errors: dict[str, list[int]] = field(default_factory=dict)  # reason -> rounds it failed
    shared_ids: set[int] = field(default_factory=set)  # client ids two devices answered as
    releases: list[dict[str, Any]] = field(default_factory=list)  # differential privacy's
    privacy_void: str | None = None  # why no privacy bound holds (a resume after rounds without)
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)
    # Which client each node said it is: checkpointed with the rest, so a resumed server
    # names the devices it knew in its failures instead of their bare node ids.
    client_of: dict[int, int] = field(default_factory=dict)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.correct, self.seen)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A checkpoint from before failed rounds were counted: its rounds count as aggregated
        (why any failed is in its metrics.jsonl), so resuming it does not fail the run."""
        state.setdefault("aggregated", state.get("rounds", 0))
        state.setdefault("errors", {})
        state.setdefault("shared_ids", set())
        state.setdefault("releases", [])
        state.setdefault("privacy_void", None)
        state.setdefault("empty_updates", 0)
        state.setdefault("client_of", {})
        state.setdefault("no_change_correct", None)  # unknown for the rounds before
        state.setdefault("majority_correct", None)
        state.setdefault("classes", None)
        self.__dict__.update(state)

    def add(self, record: dict[str, Any]) -> None:
        self.rounds += 1
        self.seen += record["examples"]
        self.correct += record["correct"]
        self.loss_sum += record["loss_sum"]
        self.client_updates += record["clients_ok"]
        self.failures += len(record["failures"])
        self.bytes_up += record["bytes_up"]
        self.bytes_down += record["bytes_down"]
        self.round_trips += record["round_trips"]
        self.drift_count += record["drift_count"]
        self.dropped += record["dropped"]
        no_change, majority = record.get("no_change_correct"), record.get("majority_correct")
        if no_change is None or majority is None:  # unknown for this round: for the run too
            self.no_change_correct = self.majority_correct = None
        elif self.no_change_correct is not None and self.majority_correct is not None:
            self.no_change_correct += no_change
            self.majority_correct += majority
        self.classes = _add_classes(self.classes, record)
        self.secure = self.secure or record.get("secure", False)
        self.clipped += record.get("clipped_coordinates", 0)
        self.coordinates += record.get("summed_coordinates", 0)
        self.shared_ids.update(record.get("shared_client_ids", []))
        if "privacy" in record:
            self.releases.append(record["privacy"])
        if record.get("aggregated", True):
            self.aggregated += 1
        else:
            reason = record.get("aggregation_error") or "not aggregated"
            # "offline in round 7": one reason for every round it failed, not one a round.
            reason = re.sub(rf"\bround {record['round']}\b", "this round", reason)
            self.errors.setdefault(reason, []).append(record["round"])
        for cid, rep in record["clients"].items():
            acc = self.per_client.setdefault(int(cid), {"seen": 0, "correct": 0})
            acc["seen"] += rep["examples"]
            acc["correct"] += rep["correct"]
            self.empty_updates += rep["examples"] == 0


def _add_classes(total: list[int] | None, record: dict[str, Any]) -> list[int] | None:
    """The run's class tally after a round: unknown once a round with samples has none."""
    rows = record.get("classes")
    if not record["examples"] or total is None:
        return total
    if rows is None:
        return None
    tally = [n for name in CLASS_ROWS for n in rows[name]]
    if not total:
        return tally
    return None if len(tally) != len(total) else np.add(total, tally).tolist()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# "Name: message", and the message's indented lines after it (a ConfigError lists each bad
# key on one), but not a traceback's `File "..."` lines or its ^^^ markers.
_RAISED = re.compile(r"^([A-Za-z_][\w.]*): (.+(?:\n[ \t]+(?!File \")[^\s^].*)*)$", re.MULTILINE)
_WRAPPERS = ("ClientAppException", "RayTaskError", "RayActorError")
_DEPLOYED = re.compile(r"<class '(?P<name>[\w.]+)'>:<'(?P<message>.*)'>", re.DOTALL)


def error_reason(reply: Message) -> str:
    """A failed client's reason as a line someone can read: the exception that started
    it, not the engine's wrappers around it. A Ray worker's error is a couple of
    kilobytes of coloured traceback with pids and actor ids, which would also make two
    runs of one seed differ in metrics.jsonl.
    """
    reason = _ANSI.sub("", reply.error.reason or "")
    deployed = _DEPLOYED.fullmatch(reason.strip())  # a SuperNode's "<class 'x.E'>:<'msg'>"
    if deployed:
        return f"{deployed['name'].rsplit('.', 1)[-1]}: {deployed['message']}"
    if reason.startswith("<class '") and reason.endswith("'>"):  # the wrapper's own close
        reason = reason[:-2]
    for name, message in _RAISED.findall(reason):
        if not any(w in name for w in _WRAPPERS):
            words = " ".join(line.strip() for line in message.splitlines())
            return f"{name.rsplit('.', 1)[-1]}: {words}"
    return reason


def round_record(
    server_round: int,
    sent: list[Message],
    replies: Iterable[Message],
    client_of: dict[int, int],
    seconds: float,
) -> dict[str, Any]:
    """Summarise one round from the messages that went out and the replies that came back."""
    replies = list(replies)
    reports: list[m.TrainReport] = []
    failures: list[dict[str, Any]] = []
    answered = set()
    for reply in replies:
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            failures.append(_failure(client_of, node, error_reason(reply)))
        else:
            reports.append(m.TrainReport.from_record(reply.content[m.METRICS]))
    for msg in sent:
        if msg.metadata.dst_node_id not in answered:
            node = msg.metadata.dst_node_id
            failures.append(_failure(client_of, node, SILENT))
    examples = sum(r.examples for r in reports)
    correct = sum(r.correct for r in reports)
    loss_sum = sum(r.loss_sum for r in reports)
    no_change = _known_sum([r.no_change_correct for r in reports])
    majority = _known_sum([r.majority_correct for r in reports])
    classes = _class_record(_class_sum([r.classes for r in reports]))
    return {
        "round": server_round,
        "clients_sampled": len(sent),
        "clients_ok": len(reports),
        "failures": failures,
        "examples": examples,
        "correct": correct,
        "loss_sum": loss_sum,
        "accuracy": _ratio(correct, examples),
        "loss": _ratio(loss_sum, examples),
        "no_change_correct": no_change,
        "majority_correct": majority,
        "classes": classes,
        "bytes_down": sum(bytes_of(msg) for msg in sent),
        "bytes_up": sum(bytes_of(r) for r in replies if not r.has_error()),
        "seconds": seconds,
        "round_trips": 1,
        "dropped": sum(r.dropped for r in reports),
        "drift_count": sum(len(r.drifts) for r in reports),
        "drifts": [{"client": r.client, "position": p} for r in reports for p in r.drifts],
        "clients": {
            str(r.client): {
                "examples": r.examples,
                "correct": r.correct,
                "accuracy": _ratio(r.correct, r.examples),
                "loss": _ratio(r.loss_sum, r.examples),
                "no_change_correct": r.no_change_correct,
                "majority_correct": r.majority_correct,
                "fading_accuracy": r.fading_accuracy,
                "total_seen": r.total_seen,
                "total_accuracy": _ratio(r.total_correct, r.total_seen),
                "offset": r.offset,  # stream position after the round
                "train_seconds": r.train_seconds,
            }
            for r in sorted(reports, key=lambda r: r.client)
        },
    }


def secure_round_record(
    server_round: int,
    sampled: int,
    outcome: SecureOutcome,
    client_of: dict[int, int],
    seconds: float,
) -> dict[str, Any]:
    """A round record from a secure sum: totals only, since no single client's report exists."""
    t = outcome.totals
    loss_sum = t["loss-sum-fp"] / m.FIXED_POINT
    summed = size(outcome.arrays) * t["contributors"]  # 0 when the sum stayed sealed
    return {
        "round": server_round,
        "clients_sampled": sampled,
        "clients_ok": outcome.clients_ok,
        "failures": [
            _failure(client_of, f["node"], f["reason"], stage=f["stage"])
            for f in outcome.failures
        ],
        "examples": t["examples"],
        "correct": t["correct"],
        "loss_sum": loss_sum,
        "accuracy": _ratio(t["correct"], t["examples"]),
        "loss": _ratio(loss_sum, t["examples"]),
        "no_change_correct": t["no-change-correct"],
        "majority_correct": t["majority-correct"],
        "classes": _class_record(outcome.classes),
        "bytes_down": outcome.bytes_down,
        "bytes_up": outcome.bytes_up,
        "seconds": seconds,
        "secure": True,
        "round_trips": outcome.round_trips,
        "stage_seconds": outcome.stage_seconds,
        "train_seconds": t["train-us"] / 1e6,  # the clients', summed
        "clipped_coordinates": t["clipped"],
        # of the coordinates summed: a large share means secure_aggregation.clip is too
        # small, and the updates lost their size (a fact of the sum, not of one client)
        "summed_coordinates": summed,
        "clipped_fraction": _ratio(t["clipped"], summed),
        "coordinate_clip": outcome.coordinate_clip,  # above secure_aggregation.clip under privacy
        "dropped": t["dropped"],
        "drift_count": t["drift-count"],
        "drifts": [],  # who drifted is a client's own business under secure aggregation
        "clients": {},
    }


ROUNDS_LISTED = 10  # failed rounds named per reason in summary.json; all are in metrics.jsonl


@dataclass
class AccuracySeries:
    """One run's prequential accuracy, round by round: a baseline's, or the federation's
    as its round records tell it, so that both reach summary.json in the same form."""

    name: str
    seen: int = 0
    correct: int = 0
    per_round: list[float | None] = field(default_factory=list)  # accuracy in each round
    cumulative: list[float | None] = field(default_factory=list)
    # The trivial predictors on this run's own samples: a baseline's stream is not the
    # clients' (the centralized learner's interleaves them), so neither are its references.
    no_change_correct: int = 0
    majority_correct: int = 0
    classes: np.ndarray | None = None  # the class tally (CLASS_ROWS, a column per class)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.seen if self.seen else None

    def add_round(
        self,
        seen: int,
        correct: int,
        no_change: int = 0,
        majority: int = 0,
        classes: np.ndarray | None = None,
    ) -> None:
        self.seen += seen
        self.correct += correct
        self.no_change_correct += no_change
        self.majority_correct += majority
        if classes is not None:
            self.classes = classes if self.classes is None else self.classes + classes
        self.per_round.append(correct / seen if seen else None)
        self.cumulative.append(self.accuracy)

    def to_dict(self) -> dict:
        return {
            "prequential_accuracy": self.accuracy,
            "samples_seen": self.seen,
            "accuracy_per_round": self.per_round,
            "cumulative_accuracy": self.cumulative,
            **kappas(self.accuracy, self.no_change_correct, self.majority_correct, self.seen),
            **{k: v for k, v in class_scores(self.classes).items() if k in CLASS_SCORES},
        }


def federated_series(records: Iterable[dict[str, Any]]) -> AccuracySeries:
    """The federation's accuracy round by round, from its metrics.jsonl records: the last
    record of each round (a round redone after a crash, before its checkpoint, is written
    twice), in round order."""
    rounds = {rec["round"]: rec for rec in records if "round" in rec}
    series = AccuracySeries("federated")
    for _, rec in sorted(rounds.items()):
        series.add_round(rec["examples"], rec["correct"])
    return series


def kappas(
    accuracy: float | None, no_change: int | None, majority: int | None, seen: int
) -> dict[str, float | None]:
    """The trivial predictors' accuracies on a run's own predictions, and the kappa
    statistics against them: (accuracy - theirs) / (1 - theirs), 1 for a perfect model,
    0 or below for one no better than they are. None where unknown (counts missing) or
    undefined."""
    keys = ("no_change_accuracy", "majority_accuracy", "kappa_temporal", "kappa_m")
    if no_change is None or majority is None:
        return dict.fromkeys(keys)
    theirs = (_ratio(no_change, seen), _ratio(majority, seen))
    against = [None if accuracy is None or p is None or p == 1 else (accuracy - p) / (1 - p)
               for p in theirs]
    return dict(zip(keys, [*theirs, *against], strict=True))


CLASS_SCORES = ("balanced_accuracy", "cohen_kappa", "macro_f1")


def class_scores(
    tally: list[int] | np.ndarray | None, names: Sequence[str] = ()
) -> dict[str, Any]:
    """What an imbalanced stream is judged by, from a run's class tally (CLASS_ROWS): the
    mean recall over the classes that occurred, Cohen's kappa (agreement beyond what the
    label and prediction frequencies give by chance), the mean F1 over the classes that
    occurred or were predicted, and each class's counts, recall and precision, keyed by
    `names` (else the class index). None where unknown or undefined."""
    unknown = {**dict.fromkeys(CLASS_SCORES), "per_class": None}
    if tally is None or not len(tally):
        return unknown
    labels, predicted, right = np.asarray(tally, dtype=np.int64).reshape(len(CLASS_ROWS), -1)
    n = int(labels.sum())
    if not n:
        return unknown
    recall = _rates(right, labels)
    precision = _rates(right, predicted)
    f1 = _rates(2 * right, labels + predicted)
    chance = float(labels.astype(np.float64) @ predicted) / n**2  # no int64 overflow
    names = list(names) if len(names) == len(labels) else [str(c) for c in range(len(labels))]
    per_class = {
        name: {"samples": int(labels[c]), "predicted": int(predicted[c]),
               "right": int(right[c]), "recall": _nan_none(recall[c]),
               "precision": _nan_none(precision[c])}
        for c, name in enumerate(names)
    }
    return {
        "balanced_accuracy": float(np.nanmean(recall)),
        "cohen_kappa": (int(right.sum()) / n - chance) / (1 - chance) if chance < 1 else None,
        "macro_f1": float(np.nanmean(f1)),
        "per_class": per_class,
    }


def _rates(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den per class, NaN where den is 0 (the class never occurred or was never
    predicted), so that means skip it."""
    return np.divide(num, den, out=np.full(len(den), np.nan), where=den > 0)


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def run_summary(
    cfg: Config, history: History, class_names: Sequence[str] = ()
) -> dict[str, Any]:
    """The summary.json keys every run has, simulated or deployed (see the README);
    `class_names` name the model's outputs in `per_class` (stream.classes by default)."""
    per_client = {
        str(c): (v["correct"] / v["seen"] if v["seen"] else None)
        for c, v in sorted(history.per_client.items())
    }
    return {
        "rounds": history.rounds,
        "clients": cfg.federation.clients,
        "strategy": cfg.federation.strategy,
        "flower_strategy": flower_strategy(cfg),  # e.g. FedAvgM for fedavg with a server step
        "server_lr": cfg.federation.server_lr,
        "seed": cfg.seed,
        "prequential_accuracy": history.accuracy,
        "prequential_loss": history.loss_sum / history.seen if history.seen else None,
        **kappas(history.accuracy, history.no_change_correct, history.majority_correct,
                 history.seen),
        **class_scores(history.classes, class_names or cfg.stream.classes),
        "client_updates": history.client_updates,
        "client_updates_empty": None if history.secure else history.empty_updates,
        "client_failures": history.failures,
        "samples_seen": history.seen,
        "bytes_up": history.bytes_up,
        "bytes_down": history.bytes_down,
        "drift_detections": history.drift_count,
        "secure_aggregation": cfg.secure_aggregation.enabled,
        "round_trips": history.round_trips,
        "round_trips_per_round": history.round_trips / history.rounds if history.rounds else None,
        "clipped_fraction": _ratio(history.clipped, history.coordinates),
        "per_client_accuracy": per_client,
        "shared_client_ids": sorted(history.shared_ids),
        "rounds_aggregated": history.aggregated,
        "aggregation_errors": [
            {"reason": reason, "rounds": len(rounds), "first_rounds": rounds[:ROUNDS_LISTED]}
            for reason, rounds in sorted(history.errors.items(), key=lambda kv: kv[1][0])
        ],
        "privacy": privacy_summary(cfg.privacy, history),
    }


def privacy_summary(dp: PrivacyConfig, history: History) -> dict[str, Any] | None:
    """What the run's models cost in privacy (None: differential privacy was off)."""
    if not dp.enabled:
        return None
    releases = history.releases
    last = releases[-1] if releases else {"epsilon": 0.0, "epsilon_known_cohorts": 0.0}
    void = history.privacy_void or last.get("void")
    seen = [r for r in releases if "clipped" in r]  # rounds where the server clipped
    return {
        "epsilon": math.inf if void else last["epsilon"],
        # the worst client's, for an observer who knows each round's cohort (the server)
        "epsilon_known_cohorts": math.inf if void else last.get("epsilon_known_cohorts", math.inf),
        "void": void,
        "delta": dp.delta,
        "releases": len(releases),
        # as set, or as calibrated to target_epsilon (each round records the one it asked for)
        "noise_multiplier": releases[-1].get("planned_noise_multiplier", dp.noise_multiplier)
        if releases else dp.noise_multiplier,
        "target_epsilon": dp.target_epsilon or None,
        "clip_norm": dp.clip_norm,
        "noise_at": dp.noise_at,
        "adjacency": ADJACENCY,
        "sampling": SAMPLING,
        "accountant": "Renyi DP (dp-accounting)",
        "clipped_updates": _ratio(sum(r["clipped"] for r in seen),
                                  sum(r.get("measured", r["summed"]) for r in seen)),
        "median_norm": _median([r["median_norm"] for r in seen]),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")


_WRITES = threading.Lock()  # one record at a time, so a stop never leaves half a line


def stop_logs() -> None:
    """Stop the run (`stopping.request`) and write no more round records for it.

    A stopped command (Ctrl-C) says where its rounds end; the ServerApp's thread may still
    finish a round while Ray shuts down, and that round must not appear after the
    message. A record being written when this is called is completed first.
    """
    stopping.request()
    # Wait for a write under way (in another thread) to finish its line; a handler that
    # interrupted this very thread inside a write must not wait for itself.
    if _WRITES.acquire(timeout=1.0):
        _WRITES.release()


class MetricsLog:
    """Appends round records to metrics.jsonl as they happen, so a crash keeps past rounds."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append or not path.exists():
            path.write_text("")
        else:
            _drop_partial_line(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_finite(record)) + "\n"
        with _WRITES:
            if stopping.requested():
                return
            try:
                fh = self.path.open("ab", buffering=0)
            except FileNotFoundError:
                raise ResultsFolderGone(
                    f"{self.path.parent}: the results folder was removed or moved during "
                    f"the run; round {record.get('round', '?')} and later are not recorded"
                ) from None
            with fh:
                start, data = fh.seek(0, os.SEEK_END), memoryview(line.encode())
                try:
                    while data:
                        data = data[fh.write(data) :]
                except OSError as err:  # a full disk: no half record is left behind
                    with contextlib.suppress(OSError):
                        fh.truncate(start)
                    raise OSError(
                        err.errno, f"{self.path}: round {record.get('round', '?')} could not "
                        f"be recorded ({err.strerror}); the rounds before it are kept"
                    ) from None


class ResultsFolderGone(RuntimeError):
    """The run's output folder vanished under it: nothing more can be recorded."""


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a crash left half-written: appended to, it would make one line
    no JSON reader (ours, or pandas') can parse, in the middle of the file."""
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (or of the results folder holding it), one dict
    per line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    text = path.read_text()
    if not text.endswith("\n"):  # a last line a crash cut off: not a record
        text = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _finite(value: Any) -> Any:
    """JSON has no NaN: write null instead, so any reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value

"""The message contract between the fedstream ServerApp and ClientApp.

Flower carries records; this module fixes which records and keys a fedstream message holds,
so both sides read and write them through one definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)

ARRAYS = "arrays"  # global model down, local model up
CONFIG = "config"  # round instructions down
METRICS = "metrics"  # client report up
ROUND = "server-round"
NUM_EXAMPLES = "num-examples"  # Flower strategies weight by this key
QUERY_KIND = "query"
ROSTER = "roster"  # query asking a node which client it is
DP_CLIP = "dp-clip"  # train config: clip the model change to this L2 norm (privacy)
DP_STD = "dp-noise-std"  # train config: add Gaussian noise of this deviation to it (0: none)
PRIVATISED = "privatised"  # train report: the privacy mod clipped and noised the model
CLASS_TALLY = "class-tally"  # train report: per class labels, predictions, right ones


@dataclass
class TrainReport:
    """What one client says about its round, besides its model."""

    client: int
    examples: int
    correct: int
    loss_sum: float
    drifts: list[int] = field(default_factory=list)
    total_seen: int = 0
    total_correct: int = 0
    fading_accuracy: float = 0.0
    offset: int = 0
    train_seconds: float = 0.0
    dropped: int = 0  # samples the device's spool dropped (full) since its last report
    # Clipped and noised as the server asked (differential privacy), and so weighs as much
    # as every other client, whatever its examples: a weight that grew with the client's
    # data would let it move the sum by more than the clip.
    privatised: bool = False
    # Of the same samples, how many the trivial predictors got right (client.metrics.References);
    # None from a client too old to count them, so that no total treats it as none right.
    no_change_correct: int | None = 0
    majority_correct: int | None = 0
    # Per class, of the same samples: labels, predictions, right ones (client.metrics.
    # class_tally, flattened row by row); None from a client too old to count them.
    classes: list[int] | None = None

    def to_record(self) -> MetricRecord:
        record = MetricRecord(
            {
                "client-id": self.client,
                NUM_EXAMPLES: self.examples,
                "correct": self.correct,
                "loss-sum": self.loss_sum,
                "drifts": list(self.drifts),
                "total-seen": self.total_seen,
                "total-correct": self.total_correct,
                "fading-accuracy": self.fading_accuracy,
                "offset": self.offset,
                "train-seconds": self.train_seconds,
                "dropped": self.dropped,
            }
        )
        for key, count in (("no-change-correct", self.no_change_correct),
                           ("majority-correct", self.majority_correct)):
            if count is not None:
                record[key] = count
        if self.classes is not None:
            record[CLASS_TALLY] = list(self.classes)
        if self.privatised:  # only under differential privacy: other reports stay as they were
            record[PRIVATISED] = 1
        return record

    @classmethod
    def from_record(cls, rec: MetricRecord) -> TrainReport:
        return cls(
            client=int(rec["client-id"]),
            examples=int(rec[NUM_EXAMPLES]),
            correct=int(rec["correct"]),
            loss_sum=float(rec["loss-sum"]),
            drifts=[int(d) for d in rec.get("drifts", [])],
            total_seen=int(rec.get("total-seen", 0)),
            total_correct=int(rec.get("total-correct", 0)),
            fading_accuracy=float(rec.get("fading-accuracy", 0.0)),
            offset=int(rec.get("offset", 0)),
            train_seconds=float(rec.get("train-seconds", 0.0)),
            dropped=int(rec.get("dropped", 0)),
            privatised=bool(rec.get(PRIVATISED, 0)),
            no_change_correct=_count(rec, "no-change-correct"),
            majority_correct=_count(rec, "majority-correct"),
            classes=_counts(rec, CLASS_TALLY),
        )


def _count(rec: MetricRecord, key: str) -> int | None:
    value = rec.get(key)
    return None if value is None else int(value)  # type: ignore[arg-type]


def _counts(rec: MetricRecord, key: str) -> list[int] | None:
    value = rec.get(key)
    return None if value is None else [int(v) for v in value]  # type: ignore[union-attr]


def roster_query() -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({QUERY_KIND: ROSTER})})


def roster_reply(client: int) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({"client-id": client})})


# --- secure aggregation -----------------------------------------------------------------
SECAGG = "secagg"  # ConfigRecord: round setup down, masked-input envelope and shares up
MASKED = "masked"  # ArrayRecord up: the masked model vector and tail
KEYS = "secagg-keys"  # query: advertise your encryption key and a fresh mask key
UNMASK = "secagg-unmask"  # query: reveal the shares you hold for this round
# The exact integers summed under the masks, besides the model: nothing here travels in the
# clear. "contributors" (1 per client) lets the server check the unmasking worked;
# "with-samples" (1 per client that learned from any) that the sum is not one client's.
TAIL = (
    "contributors",
    "with-samples",
    "examples",
    "weight",
    "correct",
    "loss-sum-fp",
    "drift-count",
    "clipped",
    "train-us",
    "dropped",
    "privatised",  # under differential privacy the server checks that every client did
    "no-change-correct",
    "majority-correct",
)  # then the class tally: 3 words per class (labels, predictions, right ones), as
# `TrainReport.classes` orders them, so the tail is len(TAIL) + 3 * classes words long.


def tail_len(n_classes: int) -> int:
    """The masked tail's words for a model of `n_classes` outputs."""
    return len(TAIL) + 3 * n_classes


FIXED_POINT = 1 << 16  # loss sums travel as integers of 1/65536
KEYS_LOST = "secure aggregation keys not held"  # in an error reason: fetch the keys again


def record(content: RecordDict, key: str, kind: type[R]) -> R | None:
    """The record under `key` if it is of `kind`, else None.

    Use this, not `content.array_records[...]` and friends: in flwr 1.41 those typed views
    make a reference cycle, so every reply read through one stays in memory (model-sized)
    until the garbage collector happens to run.
    """
    rec = content.get(key)
    return rec if isinstance(rec, kind) else None


def client_id(reply: RecordDict) -> int | None:
    """The client a train reply comes from (its report, or its secure envelope), or None
    when it names none: no `client-id`, or one that is not a whole number 0 or more."""
    rec = record(reply, METRICS, MetricRecord) or record(reply, SECAGG, ConfigRecord)
    value = None if rec is None else rec.get("client-id")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None

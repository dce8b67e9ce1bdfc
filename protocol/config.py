"""The federation config: one validated document that server, clients and simulator share.

Everything a run does is decided here, so a run is reproducible from its `config.toml`
alone. Unknown keys, wrong types and impossible values are refused up front, with the
dotted key path, before any process or Ray worker starts.
"""

from __future__ import annotations

import codecs
import datetime
import difflib
import itertools
import json
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config that cannot run; the message names every offending key."""


class _Section(BaseModel):
    # strict: a string "10" is not a count; extra="forbid": a typo is an error, not a default;
    # frozen: a run's config never changes under it (and caches keyed on it stay valid).
    # allow_inf_nan=False: `clip = inf` would pass `gt=0` and fail inside the first round.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class FederationConfig(_Section):
    """Who takes part and how the server aggregates."""

    clients: PositiveInt = 20
    rounds: PositiveInt = 30
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    min_clients: PositiveInt = 1
    strategy: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    # 0 (the default) picks the strategy's own: see SERVER_LR.
    server_lr: Annotated[float, Field(ge=0.0)] = 0.0
    server_momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    beta1: Probability = 0.9
    beta2: Probability = 0.99
    tau: Annotated[float, Field(gt=0.0)] = 1e-3
    round_timeout: Annotated[float, Field(gt=0.0)] = 600.0

    @model_validator(mode="after")
    def _server_lr_of_the_strategy(self) -> FederationConfig:
        if self.server_lr == 0.0:
            object.__setattr__(self, "server_lr", SERVER_LR[self.strategy])
        return self


# The server step each strategy takes by default. FedAvg's 3 makes up for the few local
# steps a round of a stream gives each client (README: Server strategies); FedAdam's and
# FedYogi's eta is a step of the normalised update, where 3 diverges: 0.1 measured best of
# 3, 0.1, 0.03 and 0.01 on the default federation (70.7 % and 72.5 %, against 65.0 % and
# 62.8 % at 3).
SERVER_LR = {"fedavg": 3.0, "fedadam": 0.1, "fedyogi": 0.1}


def _path_text(value: Any) -> Any:
    """A `pathlib.Path` (what Python code holds) as the text a config file would give."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class StreamConfig(_Section):
    """What each client's stream carries and how fast it arrives."""

    source: Literal["gaussian_mixture", "hyperplane", "digits", "csv", "jsonl"] = (
        "gaussian_mixture"
    )
    path: str = ""
    label: str = "label"
    features: list[str] = []
    exclude: list[str] = []  # columns left out of "all the others" (an ID, a comment)
    time: str = ""
    # The file's content, pinned by `fedstream sim` when it starts (and so in the results'
    # config.toml): every process reads exactly that content, and a rerun refuses an
    # edited file instead of quietly training on other data. Empty: not pinned yet.
    sha256: str = ""
    n_features: PositiveInt = 20
    n_classes: Annotated[int, Field(ge=2)] = 10
    # The classes' names, in index order. A file source then takes exactly these labels, in
    # this order (another is an error, naming its line); a built-in source and a deployment
    # name the model file's outputs with them (as `fedstream feed --classes` maps them).
    classes: list[str] = []
    centers_per_class: PositiveInt = 2
    spread: Annotated[float, Field(gt=0.0)] = 1.0
    noise: Probability = 0.05
    image: bool = False
    # "time": a file's rows arrive at their stream.time, on one clock for all clients
    arrival: Literal["fixed", "poisson", "time"] = "poisson"
    rate: Annotated[float, Field(gt=0.0)] = 30.0
    rate_spread: Annotated[float, Field(ge=0.0)] = 0.5
    budget: Annotated[int, Field(ge=0)] = 0

    _path = field_validator("path", mode="before")(_path_text)

    @field_validator("sha256")
    @classmethod
    def _a_sha256_or_empty(cls, value: str) -> str:
        digest = value.strip().lower()
        if digest and (len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest)):
            raise ValueError("must be the file's SHA-256 as 64 hex digits, or empty")
        return digest

    @model_validator(mode="after")
    def _time_arrival_needs_a_time_column(self) -> StreamConfig:
        if self.arrival == "time" and (self.source not in ("csv", "jsonl") or not self.time):
            raise ValueError(
                "stream.arrival = 'time' replays a file's rows at the times in its "
                "stream.time column: it needs stream.source 'csv' or 'jsonl' and stream.time"
            )
        return self

    @model_validator(mode="after")
    def _file_sources_need_a_readable_path(self, info: ValidationInfo) -> StreamConfig:
        if self.exclude and self.features:
            raise ValueError(
                "stream.exclude leaves columns out of all the others; with stream.features "
                "naming the columns to use, list only those"
            )
        if self.classes:
            names = [c.strip() for c in self.classes]
            if "" in names or len(set(names)) != len(names):
                raise ValueError(
                    f"stream.classes = {self.classes}: each class needs a name of its own"
                )
            object.__setattr__(self, "classes", names)
            fixed = {"digits": 10}.get(self.source, self.n_classes)
            if self.source not in ("csv", "jsonl") and len(names) != fixed:
                raise ValueError(
                    f"stream.classes names {len(names)} classes, but the {self.source} stream "
                    f"has {fixed}" + (" (stream.n_classes)" if self.source != "digits" else "")
                )
        if self.label in self.exclude:  # the time column may be listed: it is no feature
            raise ValueError(f"stream.exclude names the label column {self.label!r}")
        if self.path and self.source not in ("csv", "jsonl"):
            raise ValueError(
                f"stream.path is set, but stream.source {self.source!r} is built in and "
                f'reads no file: for the file, set stream.source = "{_source_of(self.path)}" '
                "(or leave stream.source out: a path alone picks csv or jsonl from its "
                f"name); for {self.source!r}, clear the path (--set 'stream.path=\"\"')"
            )
        if self.source in ("csv", "jsonl"):
            if not self.path:
                raise ValueError(f"stream.path is required for source '{self.source}'")
            if not (info.context or {}).get("check_files", True):
                return self  # a config checked before: its file may be gone, not its cache
            path = Path(self.path).expanduser()
            try:
                path.is_dir()
            except PermissionError:  # Path.is_dir() raises where a folder on the way is closed
                raise ValueError(
                    f"stream.path: cannot reach {self.path} (permission denied on a folder "
                    "on the way)"
                ) from None
            if path.is_dir():
                raise ValueError(f"stream.path: {path.resolve()} is a directory, not a file")
            if not path.is_file():
                where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
                raise ValueError(f"stream.path: file not found: {self.path}{where}")
            # Absolute, so Ray workers with another working directory find the same file.
            object.__setattr__(self, "path", str(path.resolve()))
        return self


def _source_of(path: str) -> str:
    """The file source a path's name implies: JSON Lines by its suffix, else CSV."""
    name = Path(path).name.lower().removesuffix(".gz")
    return "jsonl" if name.endswith((".jsonl", ".ndjson", ".json")) else "csv"


class PartitionConfig(_Section):
    """How labels (or rows of a dataset) are split across clients: the non-IID knob."""

    scheme: Literal["iid", "dirichlet", "shards", "column"] = "dirichlet"
    alpha: Annotated[float, Field(gt=0.0)] = 0.5
    shards_per_client: PositiveInt = 2
    # scheme "column": a file's own split, one client per value of this column (a site,
    # device or user id), in sorted order; the column is not a feature.
    column: str = ""


class DriftConfig(_Section):
    """When the concept changes. Times are in rounds, and each client's are staggered."""

    kind: Literal["none", "abrupt", "gradual"] = "abrupt"
    at: list[Annotated[float, Field(ge=0.0)]] = [15.0]
    width: Annotated[float, Field(ge=0.0)] = 3.0
    stagger: Annotated[float, Field(ge=0.0)] = 1.0
    # A file's own drifts, at times of its stream.time column (numbers, or ISO-8601 for a
    # date-time column): scored as the drifts put in are, with nothing relabelled.
    known_at: list[float | str] = []

    @field_validator("at")
    @classmethod
    def _increasing(cls, at: list[float]) -> list[float]:
        # Concept k holds between the k-th and the next time: out of order, or twice, the
        # schedule would skip concepts and the plots mark drifts that never happen.
        if any(b <= a for a, b in itertools.pairwise(at)):
            raise ValueError(f"drift times must increase, each once: {at}")
        return at


class LearnerConfig(_Section):
    """The on-device learner: model, how it walks the stream, and its optimizer."""

    model: str = "mlp"
    hidden: list[PositiveInt] = [64]
    mode: Literal["online", "batch"] = "online"
    batch_size: PositiveInt = 4
    epochs: PositiveInt = 1
    window: PositiveInt = 512
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0.0)] = 0.2
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    schedule: Literal["constant", "step", "exponential", "cosine"] = "constant"
    step_size: PositiveInt = 100
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    t_max: PositiveInt = 1000
    device: str = "auto"
    # Scale each feature by the client's running mean and standard deviation (tables
    # whose columns come on their own scales; see client/scaling.py).
    standardize: bool = False

    @field_validator("model", mode="before")
    @classmethod
    def _named_not_passed(cls, value: Any) -> Any:
        """A factory passed itself (Python's habit) is named as a worker imports it."""
        if callable(value) and hasattr(value, "__module__") and hasattr(value, "__qualname__"):
            raise ValueError(
                f"give the factory by name, as each Ray worker imports it: "
                f"'{value.__module__}:{value.__qualname__}'"
            )
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value in ("logreg", "mlp", "cnn") or ":" in value:
            return value
        raise ValueError(f"unknown model '{value}': use logreg, mlp, cnn or 'module:factory'")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", value):
            return value
        raise ValueError(f"unknown device '{value}': use auto, cpu, cuda[:N] or mps")


# `delta` means a different thing to each detector: ADWIN's confidence, Page-Hinkley's
# tolerated change per sample. Their usual values (River's, and the ADWIN paper's).
DETECTOR_DELTA = {"adwin": 0.002, "page_hinkley": 0.005}


class DetectorConfig(_Section):
    """Drift detection on the prequential error, and what the learner does about it."""

    kind: Literal["none", "page_hinkley", "adwin"] = "adwin"
    # 0 (the default) picks the detector's own: see DETECTOR_DELTA.
    delta: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    threshold: Annotated[float, Field(gt=0.0)] = 50.0
    # A falling error is learning, not drift; "both" is the paper's ADWIN (adwin only).
    direction: Literal["rise", "both"] = "rise"
    reaction: Literal["none", "reset_optimizer", "boost_lr"] = "reset_optimizer"
    boost: Annotated[float, Field(ge=1.0)] = 2.0
    boost_batches: PositiveInt = 10

    @model_validator(mode="after")
    def _defaults_and_direction(self) -> DetectorConfig:
        if self.delta == 0.0 and self.kind in DETECTOR_DELTA:
            object.__setattr__(self, "delta", DETECTOR_DELTA[self.kind])
        if self.kind == "page_hinkley" and self.direction == "both":
            raise ValueError("detector.direction 'both' is for adwin: page_hinkley detects "
                             "rises of the error only")
        return self


class EvaluationConfig(_Section):
    """Prequential metrics, and optional global evaluation on a held-back slice."""

    fading: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.99
    every: Annotated[int, Field(ge=0)] = 0
    holdout: PositiveInt = 500


class SimulationConfig(_Section):
    """How the simulation engine runs the virtual clients."""

    backend: Literal["ray"] = "ray"
    client_cpus: Annotated[float, Field(gt=0.0)] = 1.0
    client_gpus: Annotated[float, Field(ge=0.0)] = 0.0
    ray_address: str = ""
    # Seconds between the engine's sweeps for queued messages when nothing was pushed (a
    # push is handed out at once); Flower's is 0.1. See sim/dispatch.py.
    dispatch_interval: Annotated[float, Field(gt=0.0, le=0.1)] = 0.01
    dropout: Probability = 0.0
    baselines: list[Literal["local", "centralized"]] = []


class SecureAggregationConfig(_Section):
    """Encrypted updates: the server learns only the sum over the clients of a round."""

    enabled: bool = False
    # A count of shares (>= 2), or a fraction (> 0.5) of each client's share group
    # (its neighbours and itself): that many holders must answer to unmask a client.
    threshold: Annotated[int, Field(ge=2)] | Annotated[float, Field(gt=0.5, le=1.0)] = 0.6

    @field_validator("threshold", mode="before")
    @classmethod
    def _count_or_fraction(cls, value: Any) -> Any:
        # An integer is a count, never the fraction 1.0 it would otherwise coerce to.
        if isinstance(value, int) and not isinstance(value, bool) and value < 2:
            raise ValueError(
                "a count of shares must be at least 2; a fraction of the share group is "
                "written with a point (1.0 = all of it)"
            )
        return value
    degree: Annotated[int, Field(ge=0)] = 0  # neighbours per client; 0 = O(log n), Bell et al.
    # The fraction of a round's clients expected to drop: degree 0 widens the share groups
    # until dropouts alone fail a round with probability below 1 % (a simulation's own
    # simulation.dropout, if higher, is used instead).
    dropout: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    bits: Annotated[int, Field(ge=8, le=53)] = 32  # ring Z / 2^bits of each model coordinate
    # Per-coordinate range of the model change; bounded so that the ring's scale (steps per
    # unit, ~2^bits / clip) is a finite, nonzero float.
    clip: Annotated[float, Field(ge=1e-12, le=1e15)] = 1.0
    # Examples that weigh in full; more are counted, not weighed (a billion: far above any
    # round's examples, and summed exactly in the masked tail).
    max_weight: Annotated[int, Field(ge=1, le=10**9)] = 1000


class PrivacyConfig(_Section):
    """Differential privacy of the clients (user level): clip each update, add Gaussian noise
    to their sum, and account for the privacy spent (README: Differential privacy)."""

    enabled: bool = False
    # The noise on the sum of a round's updates has standard deviation noise_multiplier x
    # clip_norm; 0 clips without noise (and promises nothing).
    noise_multiplier: Annotated[float, Field(ge=0.0, le=1e6)] = 1.0
    # > 0: the noise multiplier is chosen instead, the smallest that keeps epsilon at or
    # below this after federation.rounds rounds of the planned cohort (all clients online).
    target_epsilon: Annotated[float, Field(ge=0.0, le=1e6)] = 0.0
    # Bound on the L2 norm of one client's model change in one round.
    clip_norm: Annotated[float, Field(gt=0.0, le=1e6)] = 0.5
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    # Who adds the noise: "clients" (each its share, so the sum carries all of it: with
    # secure aggregation the server never sees an update without it), "server" (to the
    # aggregate, exactly), or "auto": clients with secure aggregation, else the server.
    noise_at: Literal["auto", "clients", "server"] = "auto"
    # Whether noise_at was "auto" and derived (a saved config writes "auto" back), or chosen.
    _derived_noise_at: bool = PrivateAttr(default=False)

    @property
    def noise_at_derived(self) -> bool:
        return self._derived_noise_at


class OutputConfig(_Section):
    """Where results land."""

    dir: str = "results/latest"
    plots: bool = True
    progress: bool = True

    _path = field_validator("dir", mode="before")(_path_text)

    @field_validator("dir")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        # An empty path is the current folder to pathlib: `--out "$OUT"` with OUT unset
        # would clear the run files there.
        if not value.strip():
            raise ValueError("is empty: give a folder (. for the current one)")
        return value


class Config(_Section):
    """A whole federation. `fedstream config show` prints it with every default."""

    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0  # seed x 1_000_003 + n fits 64 bits
    federation: FederationConfig = FederationConfig()
    stream: StreamConfig = StreamConfig()
    partition: PartitionConfig = PartitionConfig()
    drift: DriftConfig = DriftConfig()
    learner: LearnerConfig = LearnerConfig()
    detector: DetectorConfig = DetectorConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    simulation: SimulationConfig = SimulationConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="before")
    @classmethod
    def _files_replay_as_they_are(cls, raw: Any) -> Any:
        """A user's own file is replayed as it is unless drift is asked for: relabelling
        real data by default (as the synthetic sources drift) would corrupt it silently."""
        if not isinstance(raw, dict):
            return raw
        stream = raw.get("stream")
        path = _path_text(stream.get("path")) if isinstance(stream, dict) else None
        if isinstance(path, str) and path and "source" not in stream:  # type: ignore[operator]
            # A file named and no source: that file, not the default synthetic stream.
            stream = {**stream, "source": _source_of(path)}  # type: ignore[dict-item]
            raw = {**raw, "stream": stream}
        source = stream.get("source") if isinstance(stream, dict) else getattr(stream, "source", "")
        drift = raw.get("drift")
        # no drift key (or only the file's own drift times): no drift asked for
        if isinstance(source, str) and source in ("csv", "jsonl") and (
            not drift or (isinstance(drift, dict) and set(drift) == {"known_at"})
        ):
            return {**raw, "drift": {"kind": "none", **(drift or {})}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.federation.min_clients > self.federation.clients:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) exceeds "
                f"federation.clients ({self.federation.clients})"
            )
        if self.simulation.dropout > self.secure_aggregation.dropout:  # a copy, as below
            sa = self.secure_aggregation.model_copy(update={"dropout": self.simulation.dropout})
            object.__setattr__(self, "secure_aggregation", sa)
        if self.secure_aggregation.enabled:
            # At the sample fraction and min_clients give: a count threshold too large for
            # it is refused here, not met by quietly sampling more clients.
            fed = self.federation
            _check_secure(
                self.secure_aggregation, _sample(fed, max(fed.min_clients, 2)), fed.clients
            )
        if self.privacy.enabled:
            _check_privacy(self.privacy, self.federation.clients)
        if self.privacy.noise_at == "auto":  # a copy: the default instance is shared
            at = "clients" if self.secure_aggregation.enabled else "server"
            derived = self.privacy.model_copy(update={"noise_at": at})
            derived._derived_noise_at = True
            object.__setattr__(self, "privacy", derived)
        if self.drift.known_at:
            _check_known_drifts(self)
        if self.learner.model == "cnn" and self.stream.source != "digits":
            raise ValueError("learner.model 'cnn' needs image-shaped input: stream.source 'digits'")
        if self.stream.image and self.stream.source != "digits":
            raise ValueError(
                "stream.image shapes the digits source's samples as 8x8 images: with "
                f"stream.source {self.stream.source!r} it would change nothing"
            )
        _check_column_split(self.partition, self.stream)
        return self


def _check_column_split(p: PartitionConfig, stream: StreamConfig) -> None:
    if p.scheme != "column":
        if p.column:
            raise ValueError(
                "partition.column is used only with partition.scheme = 'column' (one client "
                "per value of that column)"
            )
        return
    if stream.source not in ("csv", "jsonl"):
        raise ValueError(
            "partition.scheme = 'column' splits a file by one of its columns: stream.source "
            f"must be 'csv' or 'jsonl', not {stream.source!r}"
        )
    if not p.column:
        raise ValueError("partition.scheme = 'column' needs partition.column: the column "
                         "whose values (a site, device or user id) make the clients")
    for role, col in (("stream.label", stream.label), ("stream.time", stream.time)):
        if p.column == col:
            raise ValueError(f"partition.column {p.column!r} is also {role}")
    if p.column in stream.features:
        raise ValueError(f"partition.column {p.column!r} is also one of stream.features")


def least_clients(fed: FederationConfig, sa: SecureAggregationConfig) -> int:
    """Clients a round waits for: min_clients, and under secure aggregation as many as its
    shares need: two for any sum (a round sampled while one node is connected, the first
    device of a deployment to come up, could only fail), and for a count threshold the
    fewest clients whose share groups hold that many shares. A round sampled below that
    could only fail, at once, and a run whose devices are down would spend its remaining
    rounds in a second instead of waiting for them."""
    if not sa.enabled:
        return fed.min_clients
    least = max(fed.min_clients, 2)
    if isinstance(sa.threshold, int):
        from fedstream.protocol import secagg  # numpy and cryptography: only when enabled

        for n in range(least, max(fed.clients, least) + 1):
            try:
                secagg.round_shape(n, sa.degree, sa.threshold, sa.dropout)
            except ValueError:
                continue
            return n
    return least


def ignored_settings(cfg: Config) -> list[str]:
    """Settings the run will not use: keys of a section that is off (a study would compare
    a non-private run with itself, none the wiser), and a noise multiplier that a target
    epsilon replaces. Hints, not errors: a config written out by a run keeps every key."""
    notes = []
    for name, what in (("privacy", "differential privacy"),
                       ("secure_aggregation", "secure aggregation")):
        section = getattr(cfg, name)
        if section.enabled:
            continue
        derived = {"dropout": cfg.simulation.dropout}  # copied there, not set by the user
        changed = [
            f"{name}.{key}" for key, spec in type(section).model_fields.items()
            if key not in ("enabled", "noise_at") and getattr(section, key) != spec.default
            and not (name == "secure_aggregation" and getattr(section, key) == derived.get(key))
        ]
        if changed:
            verb = "is" if len(changed) == 1 else "are"
            notes.append(f"{', '.join(changed)} {verb} set, but {name}.enabled is false: "
                         f"this run has no {what}")
    fed, learner = cfg.federation, cfg.learner
    for section, keys, unused, why in (
        (fed, ("server_momentum",), fed.strategy != "fedavg",
         f"for fedavg (FedAvgM); {fed.strategy} has beta1, beta2 and tau"),
        (fed, ("beta1", "beta2", "tau"), fed.strategy == "fedavg",
         "for fedadam and fedyogi"),
        (learner, ("momentum",), learner.optimizer == "adam", 'for learner.optimizer = "sgd"'),
        (learner, ("epochs", "window"), learner.mode == "online",
         'for learner.mode = "batch"'),
        (learner, ("step_size",), learner.schedule != "step", 'for learner.schedule = "step"'),
        (learner, ("gamma",), learner.schedule not in ("step", "exponential"),
         'for learner.schedule = "step" or "exponential"'),
        (learner, ("t_max",), learner.schedule != "cosine", 'for learner.schedule = "cosine"'),
    ):
        fields = type(section).model_fields
        changed = [k for k in keys if getattr(section, k) != fields[k].default]
        if unused and changed:
            name = "federation" if section is fed else "learner"
            shown = ", ".join(f"{name}.{k} = {getattr(section, k):g}" for k in changed)
            one = len(changed) == 1
            notes.append(f"{shown} {'is' if one else 'are'} not used: "
                         f"{'it is' if one else 'they are'} {why}")
    stream = cfg.stream
    paced = [f"stream.{k} = {getattr(stream, k):g}" for k in ("rate", "rate_spread")
             if getattr(stream, k) != StreamConfig.model_fields[k].default]
    if stream.arrival == "time" and paced:
        notes.append(f"{', '.join(paced)} {'is' if len(paced) == 1 else 'are'} not used: "
                     "stream.arrival = 'time' replays the rows at their stream.time")
    dp = cfg.privacy
    if dp.enabled and dp.target_epsilon > 0 and (
        dp.noise_multiplier != PrivacyConfig.model_fields["noise_multiplier"].default
    ):
        notes.append(f"privacy.noise_multiplier = {dp.noise_multiplier:g} is not used: "
                     f"privacy.target_epsilon = {dp.target_epsilon:g} chooses the multiplier")
    return notes


def risky_settings(cfg: Config) -> list[str]:
    """Settings the run will use, but that work against what it is likely meant to do."""
    notes = []
    fed = cfg.federation
    if fed.strategy != "fedavg" and fed.server_lr > 1:
        notes.append(
            f"federation.server_lr = {fed.server_lr:g} with {fed.strategy}: an adaptive "
            f"server step this large diverges (its own is {SERVER_LR[fed.strategy]:g}; "
            "server_lr = 0 picks the strategy's own)"
        )
    learner = cfg.learner
    if learner.mode == "batch" and learner.window < learner.batch_size:
        notes.append(
            f"learner.window = {learner.window} is below learner.batch_size = "
            f"{learner.batch_size}: batch mode keeps only {learner.window} recent samples, so "
            "each step trains on all of them; raise learner.window to keep more"
        )
    dp = cfg.privacy
    if dp.enabled and cfg.secure_aggregation.enabled and dp.noise_at == "server":
        notes.append(
            'privacy.noise_at = "server" under secure aggregation: the server adds the noise '
            "to a sum it sees exactly, so epsilon holds against those who see the models, not "
            'against the server ("clients", or "auto", noises each update before it is masked)'
        )
    return notes


def sampled_clients(fed: FederationConfig, sa: SecureAggregationConfig) -> int:
    """Clients a round trains when all are online: Flower's sample size."""
    return _sample(fed, least_clients(fed, sa))


def _sample(fed: FederationConfig, least: int) -> int:
    """Flower's sample size: the fraction of the clients, at least `least`."""
    return min(fed.clients, max(int(fed.clients * fed.fraction), least))


def _check_privacy(dp: PrivacyConfig, clients: int) -> None:
    """A delta of 1 / clients or more allows a mechanism that publishes one client's whole
    update in the clear now and then: refused, as the literature advises (delta << 1/n)."""
    if dp.delta >= 1 / clients:
        raise ValueError(
            f"privacy.delta = {dp.delta:g} is not below 1 / federation.clients = "
            f"{1 / clients:g}: a delta that large allows revealing a client outright "
            "(choose one well below it)"
        )


def _check_secure(sa: SecureAggregationConfig, parties: int, clients: int) -> None:
    """Settings that would fail every secure round, refused before anything runs.

    A round with fewer parties (clients offline before it starts) can still fail, and
    says why in its record; this catches the settings that cannot work at all.
    """
    from fedstream.protocol import secagg  # numpy and cryptography: only when enabled
    from fedstream.protocol.fixedpoint import Quantizer

    if parties < 2:
        raise ValueError(
            f"secure_aggregation needs 2 or more clients a round; federation.clients = "
            f"{parties} gives fewer: a sum of one client is that client's update"
        )
    try:
        Quantizer(sa.bits, sa.clip, parties)
    except ValueError:
        need = math.ceil(math.log2(parties + 2)) + 1
        raise ValueError(
            f"secure_aggregation.bits = {sa.bits} cannot hold the sum of {parties} clients' "
            f"updates: use at least {need} (32 keeps the rounding error below float32's)"
        ) from None
    try:
        secagg.round_shape(parties, sa.degree, sa.threshold, sa.dropout)
    except ValueError as err:
        more = (f", or sample more of the {clients} clients (federation.min_clients or "
                "federation.fraction)") if parties < clients else ""
        raise ValueError(
            f"secure_aggregation.threshold = {sa.threshold}, at {parties} clients a round: "
            f"{err}; or give a fraction above 0.5{more}"
        ) from None


# --------------------------------------------------------------------------- loading


_BOUNDS = {"ge": "at least", "gt": "greater than", "le": "at most", "lt": "less than"}


def _bound(item: Any) -> str | None:
    """A range error with its bound written as a number reads (pydantic spells 1e-12 out
    to twelve decimals)."""
    ctx = item.get("ctx") or {}
    for key, words in _BOUNDS.items():
        bound = ctx.get(key)
        if isinstance(bound, int) and not isinstance(bound, bool):
            return f"must be {words} {bound}"  # a count, in full (2**32: 4294967296)
        if isinstance(bound, float):
            return f"must be {words} {bound:g}"
    return None


def _short(value: Any) -> str:
    """A value as an error shows it: one line, and a numpy array by its kind and shape."""
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and not isinstance(value, str | bytes):
        return f"{type(value).__name__} of shape {shape}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _format_errors(err: ValidationError) -> str:
    lines = []
    unions: set[str] = set()  # a count-or-fraction key: one line, for the input's kind
    skipped: dict[str, Any] = {}
    for item in err.errors():
        msg = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:  # a check across sections: its message names the keys
            lines.append(f"  {msg}")
            continue
        loc = [str(p) for p in item["loc"]]
        if loc[-1].startswith("constrained-"):  # pydantic's tag for one side of a union
            kind = loc.pop().removeprefix("constrained-")
            if type(item.get("input")).__name__ != kind or ".".join(loc) in unions:
                skipped.setdefault(".".join(loc), item.get("input"))
                continue
            unions.add(".".join(loc))
        path = ".".join(loc)
        if msg.startswith(f"{path}.") or msg.startswith(f"{path}:"):  # names its key already
            lines.append(f"  {msg}")
            continue
        if item["type"] == "extra_forbidden":
            msg = _unknown_key(loc)
        elif item["type"] in ("model_type", "dict_type") and len(loc) == 1:
            msg = (f"is a section, not a value: set one of its keys ([{path}] and KEY = VALUE "
                   f"in a file, --set {path}.KEY=VALUE on the command line)")
        elif "input" in item and item["type"] not in ("missing",):
            got = item["input"]  # a TOML date as the file wrote it, not as Python's repr
            dated = isinstance(got, datetime.date | datetime.time)
            shown = got.isoformat() if dated else _short(got)
            msg = f"{_bound(item) or msg} (got {shown}){_quoting_hint(item)}"
        lines.append(f"  {path}: {msg}")
    for path, value in skipped.items():
        if path not in unions:
            lines.append(f"  {path}: expected a count or a fraction (got {value!r})")
    return "invalid config:\n" + "\n".join(lines)


def _unknown_key(loc: list[str]) -> str:
    """'unknown key', with the likeliest key meant and the keys its section has."""
    model: Any = Config
    for part in loc[:-1]:  # down to the section the unknown key sits in
        field = model.model_fields.get(part)
        model = getattr(field, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return "unknown key"
    keys = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6)
    where = ".".join(loc[:-1])
    named = [f"{where}.{k}" if where else k for k in keys]
    meant = f"; did you mean '{named[keys.index(close[0])]}'?" if close else ""
    if not where and not close:  # `strategy = ...` at the top: a section's key, unnamed
        homes = [f"{name}.{loc[-1]}" for name, f in Config.model_fields.items()
                 if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
                 and loc[-1] in f.annotation.model_fields]
        meant = f"; did you mean {' or '.join(repr(h) for h in homes)}?" if homes else ""
    return f"unknown key{meant} ({where or 'the top level'} has: {', '.join(keys)})"


def _quoting_hint(item: Any) -> str:
    """A list of bare words from --set (`[a,b]`) is not TOML, so it arrives as one string."""
    value = item.get("input")
    if item["type"] == "list_type" and isinstance(value, str) and value.startswith("["):
        words = [w.strip() for w in value.strip("[]").split(",") if w.strip()]
        quoted = ", ".join(f'"{w}"' for w in words) if words else '"a", "b"'
        return f"; a list of names needs quotes: [{quoted}]"
    dated = isinstance(value, datetime.date | datetime.time)  # TOML reads 2024-01-01 so
    if item["type"] == "string_type" and (isinstance(value, int | float) or dated):
        # TOML has parsed it: 1.50 is 1.5 now, and 0x10 is 16. Only these read back alike.
        if isinstance(value, bool):
            text = json.dumps(str(value).lower())
        elif isinstance(value, int) or dated:
            text = json.dumps(value.isoformat() if dated else str(value))
        else:
            text = '"..."'  # the name as the file spells it
        *section, last = [str(p) for p in item["loc"]]
        if isinstance(item["loc"][-1], int):  # an item of a list of names
            return f"; a name that reads as a number, a date or true/false needs quotes: {text}"
        key = ".".join([*section, last])
        return (f"; a name that reads as a number, a date or true/false needs quotes: "
                f"--set '{key}={text}' (in a file: {last} = {text})")
    return ""


def validate(raw: dict[str, Any], check_files: bool = True) -> Config:
    """Build a Config from plain data, or raise ConfigError naming each bad key.

    `check_files=False` takes `stream.path` as given, for a config that was checked where
    it was loaded and is passed on: a Ray worker reads a pinned file's table from the
    cache, so a file moved or deleted during a run must not fail every round there."""
    try:
        return Config.model_validate(raw, context={"check_files": check_files})
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning I/O and syntax errors into ConfigError with the file name."""
    path = Path(path)
    try:
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8)  # as Windows editors save
        return tomllib.loads(text.decode())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError) as err:  # unreadable, or not text
        raise ConfigError(f"{path}: cannot be read as a config file: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_value(text: str) -> Any:
    """Read a --set value as TOML (numbers, booleans, lists), falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts; refuses to descend into a scalar so typos surface."""
    *parents, leaf = dotted.split(".")
    node = raw
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is a value, not a section")
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (as given to --set) on top of raw config data."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        set_dotted(raw, key.strip(), parse_value(text.strip()))
    return raw


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """The effective config: defaults, then the file, then --set overrides."""
    if isinstance(overrides, str):  # would be read a character at a time
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, not one "
                        f"string: [{overrides!r}]")
    raw = read_config_file(path) if path else {}
    try:
        return validate(apply_overrides(raw, list(overrides or [])))
    except ConfigError as err:
        if not path:
            raise
        where = f"{path}{', with overrides' if overrides else ''}"  # where the keys came from
        said = str(err).replace("invalid config:", f"invalid config ({where}):", 1)
        raise ConfigError(said) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's data, its relative `stream.path` and `output.dir` taken from the
    file's own folder (a config that sits beside its data runs from any directory, and
    writes where it says); `--set` and `--out` paths stay relative to where the command
    runs."""
    raw = read_toml(path)
    for section, key in (("stream", "path"), ("output", "dir")):
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            given = Path(table[key])
            if not given.expanduser().is_absolute():  # absolute: a saved copy moves freely
                # resolved: `../data` is the folder it names (through a symlinked config
                # folder too, as the system reads `..`), said without `cfg/../`
                table[key] = str((Path(path).parent.absolute() / given).resolve())
    return raw


def to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def to_toml(cfg: Config) -> str:
    """The config as a file to edit and run again (`config show`, a run's results folder).

    Values the config derives are written as their "derive it" settings when they are what
    would be derived: a server step that is the strategy's own as 0, a detector's own delta
    as 0, a noise placement derived from secure aggregation as "auto" (one chosen stays as
    chosen), a dropout for secure aggregation that is the simulation's as the default.
    Loaded back, the file is
    the same config; edited (another strategy, secure aggregation switched on), it derives
    them again instead of carrying FedAvg's step of 3 into FedAdam, or server-side noise
    into a secure run.
    """
    data = _as_chosen(cfg)
    fed = data["federation"]
    if fed["server_lr"] == SERVER_LR[fed["strategy"]]:
        fed["server_lr"] = 0.0
    detector = data["detector"]
    if detector["delta"] == DETECTOR_DELTA.get(detector["kind"]):
        detector["delta"] = 0.0
    sa, default = data["secure_aggregation"], SecureAggregationConfig().dropout
    simulated = data["simulation"]["dropout"]
    if simulated > default and sa["dropout"] == simulated:  # the simulation's, derived
        sa["dropout"] = default
    return tomli_w.dumps(data)


def to_json(cfg: Config) -> str:
    """Compact form carried inside Flower run configs (whose values must be scalars)."""
    return json.dumps(_as_chosen(cfg), separators=(",", ":"))


def _as_chosen(cfg: Config) -> dict[str, Any]:
    """The config's values, with a derived noise placement as "auto": read back, it derives
    the same placement and remembers it as derived, so the copy equals the config."""
    data = to_dict(cfg)
    if cfg.privacy.noise_at_derived:
        data["privacy"]["noise_at"] = "auto"
    return data


def from_json(text: str) -> Config:
    """The config `to_json` passed on (to Ray workers, a ServerApp): its file was checked."""
    return validate(json.loads(text), check_files=False)


def scalar_defaults() -> dict[str, Any]:
    """Every scalar key's default, as written in the code (a default a validator resolves,
    server_lr 0 for the strategy's own, stays 0): what pyproject.toml declares for
    `flwr run`, whose run config can only hold scalars."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for key, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(f"{prefix}{key}.", field.annotation)
            elif not isinstance(field.default, list):
                flat[f"{prefix}{key}"] = field.default

    walk("", Config)
    return flat


def run_config_changes(run_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a Flower run config that differ from their declared defaults. Flower
    hands over every declared key, given or not: taken all, the defaults would replace a
    `config` file's values and count as set (a file's drift.kind "none", a path's source)."""
    defaults = scalar_defaults()
    return {k: v for k, v in run_config.items()
            if k != "config" and not (k in defaults and v == defaults[k]
                                      and type(v) is type(defaults[k]))}


def from_run_config(run_config: dict[str, Any]) -> Config:
    """Config from a Flower run config: `fedstream-config` JSON, a `config` file, and the
    dotted keys whose values differ from their defaults (a key given at its default
    leaves the file's value).

    This is how `flwr run .` (whose run-config values can only be scalars) reaches the same
    federation as `fedstream sim`.
    """
    if "fedstream-config" in run_config:
        return from_json(str(run_config["fedstream-config"]))
    raw = read_config_file(str(run_config["config"])) if run_config.get("config") else {}
    for key, value in run_config_changes(run_config).items():
        set_dotted(raw, key, value)
    return validate(raw)


def _check_known_drifts(cfg: Config) -> None:
    """A file's own drift times are in its time column's units, and reach every client in
    the same round only when the rows arrive at those times."""
    if cfg.stream.arrival != "time" or cfg.drift.kind != "none":
        raise ValueError(
            "drift.known_at names a file's own drift times, in its stream.time column: it "
            "needs stream.arrival = 'time' (the rows arriving at those times) and "
            "drift.kind = 'none' (no drift put in besides)"
        )
    times = [known_time(value) for value in cfg.drift.known_at]  # bad text: said now
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ValueError(f"drift.known_at: times must increase, each once: {cfg.drift.known_at}")


def known_time(value: float | str) -> float:
    """A drift.known_at value in the units a table's time column has: a number as given,
    an ISO-8601 text as seconds since the Unix epoch (a naive one taken as UTC)."""
    if not isinstance(value, str):
        return float(value)
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"drift.known_at: {value!r} is neither a number nor an ISO-8601 "
                         "time (e.g. 2024-03-01T12:00:00)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def drift_times(cfg: Config) -> list[float]:
    """Base drift times (before per-client stagger); empty when the stream does not drift."""
    return [] if cfg.drift.kind == "none" else list(cfg.drift.at)

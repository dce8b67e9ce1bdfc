"""A virtual federation: every client's stream, derived from the config and the seed alone.

Any process (the server, a Ray worker, a baseline) that builds the federation from the same
config gets the very same streams, so federated training and its baselines are compared
sample for sample. Building is cached per process: it is derived data, not client state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numpy as np
from flwr.app import ArrayRecord

from fedstream.client.arrival import (
    Arrival,
    Scheduled,
    client_rates,
    make_arrival,
    on_the_clock,
)
from fedstream.client.sources import (
    ArraySource,
    DataError,
    DriftSchedule,
    GaussianMixture,
    RotatingHyperplane,
    Source,
    load_digits_arrays,
    staggered,
)
from fedstream.client.sources.relabel import Relabel
from fedstream.client.sources.tabular import Table
from fedstream.client.stream import ClientStream
from fedstream.protocol import model_file
from fedstream.protocol.config import Config, drift_times, from_json, known_time, to_json
from fedstream.protocol.models import build_model, check_outputs
from fedstream.sim.partition import class_priors, partition
from fedstream.sim.table_cache import cached_table

HOLDOUT_CLIENT = -1  # stream id of the held-back evaluation slice
HELD_AT_LEAST = 50  # held-back rows a round of a user's file is evaluated on, if it has them


@dataclass(frozen=True)
class Dataset:
    """A finite dataset replayed as streams: rows split across clients, a slice held back."""

    x: np.ndarray
    y: np.ndarray
    n_classes: int
    parts: tuple[np.ndarray, ...]
    holdout: np.ndarray
    features: tuple[str, ...] = ()  # column names, for a file source
    classes: tuple[str, ...] = ()  # label names, for a file source
    client_names: tuple[str, ...] = ()  # partition.column's value of each client
    time: np.ndarray | None = None  # stream.time of each row (rows sorted by it)

    def class_shares(self) -> np.ndarray:
        """Each class's share of the rows, by class index."""
        return np.bincount(self.y, minlength=self.n_classes) / max(len(self.y), 1)

    def class_names(self) -> tuple[str, ...]:
        """The classes by name: the file's labels, else their indices."""
        return model_file.class_labels(self.classes, self.n_classes)

    def unscaled(self, limit: float = 10.0) -> list[tuple[str, float]]:
        """File columns far from unit scale (root mean square above `limit`), largest
        first: fed raw, they dominate SGD and the model learns little from the others."""
        if not self.features:
            return []
        rms = np.sqrt(np.mean(np.square(self.x, dtype=np.float64), axis=0))
        order = np.argsort(-rms, kind="stable")
        return [(self.features[j], float(rms[j])) for j in order if rms[j] > limit]

    def identifiers(self, least: int = 50) -> list[str]:
        """File columns that look like a row ID or a timestamp, not a measurement: whole
        numbers, one per row, from a range about as wide as the rows are many (an ID); or
        epoch-sized numbers (10^8 and up: seconds since 1973, or milliseconds) that only
        rise, or only fall, down the file (a time). Fed as features, they tell the model
        each row's place, which no other client and no later row shares."""
        x = self.x
        n = len(x)
        if not self.features or n < least:
            return []
        low, high = x.min(axis=0).astype(np.float64), x.max(axis=0).astype(np.float64)
        # float32 is whole above 2^24 whatever the file said: IDs are told below it only
        whole = np.all(x == np.round(x), axis=0) & (np.abs(low) < 2**24) & (high < 2**24)
        dense = whole & (high - low < 2 * n)
        step = np.diff(x, axis=0)
        monotone = np.all(step >= 0, axis=0) | np.all(step <= 0, axis=0)
        epochs = monotone & (low >= 1e8) & (high > low)
        marked = [j for j in np.flatnonzero(dense | epochs)
                  if epochs[j] or len(np.unique(x[:, j])) == n]
        return [self.features[j] for j in marked]


class Federation:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        n = cfg.federation.clients
        self.rates = client_rates(cfg.stream.rate, cfg.stream.rate_spread, n, cfg.seed)
        self._streams: dict[int, ClientStream] = {}

    # ----------------------------------------------------------------- shape
    @cached_property
    def dataset(self) -> Dataset | None:
        cfg = self.cfg
        features: tuple[str, ...] = ()
        classes: tuple[str, ...] = ()
        if cfg.stream.source == "digits":
            image = cfg.stream.image or cfg.learner.model == "cnn"
            x, y, n_classes = load_digits_arrays(image=image)
        elif cfg.stream.source in ("csv", "jsonl"):
            table = cached_table(
                cfg.stream.path,
                label=cfg.stream.label,
                features=cfg.stream.features or None,
                time=cfg.stream.time or None,
                fmt=cfg.stream.source,
                exclude=cfg.stream.exclude,
                group=cfg.partition.column or None,
                sha256=cfg.stream.sha256,
                classes=cfg.stream.classes or None,
            )
            _check_classes(table.classes, len(table), cfg)
            x, y, n_classes = table.x, table.y, len(table.classes)
            features, classes = tuple(table.features), tuple(table.classes)
            if table.groups is not None:
                return _split_by_column(table, cfg)
            return replace(_split(x, y, n_classes, cfg, features, classes), time=table.time)
        else:
            return None
        return _split(x, y, n_classes, cfg, features, classes)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        if self.dataset is not None:
            return tuple(self.dataset.x.shape[1:])
        return (self.cfg.stream.n_features,)

    @property
    def n_classes(self) -> int:
        return self.dataset.n_classes if self.dataset is not None else self.cfg.stream.n_classes

    # --------------------------------------------------------------- streams
    def source(self, client: int) -> Source:
        cfg = self.cfg
        n = cfg.federation.clients
        if client == HOLDOUT_CLIENT:
            drift = DriftSchedule(cfg.drift.kind, tuple(drift_times(cfg)), cfg.drift.width)
        else:
            at = staggered(drift_times(cfg), cfg.drift.stagger, client, n, cfg.seed)
            drift = DriftSchedule(cfg.drift.kind, at, cfg.drift.width)
        if self.dataset is not None:
            rows = self.dataset.holdout if client == HOLDOUT_CLIENT else self.dataset.parts[client]
            base = ArraySource(self.dataset.x, self.dataset.y, rows, self.dataset.n_classes)
            return Relabel(base, drift, seed=cfg.seed, client=client)
        prior = None if client == HOLDOUT_CLIENT else self.priors[client]
        common = {"n_features": cfg.stream.n_features, "n_classes": cfg.stream.n_classes}
        if cfg.stream.source == "hyperplane":
            return RotatingHyperplane(
                **common, class_prior=prior, drift=drift, noise=cfg.stream.noise,
                seed=cfg.seed, client=client,
            )
        return GaussianMixture(
            **common,
            centers_per_class=cfg.stream.centers_per_class,
            spread=cfg.stream.spread,
            class_prior=prior,
            drift=drift,
            seed=cfg.seed,
            client=client,
        )

    @cached_property
    def clock(self) -> np.ndarray | None:
        """Every row's arrival time under stream.arrival = 'time': its stream.time, with
        the file's first time at the start of the run and its last in the last round."""
        if self.dataset is None or self.dataset.time is None:
            return None
        return on_the_clock(self.dataset.time, self.cfg.federation.rounds)

    @cached_property
    def known_drifts(self) -> list[float]:
        """drift.known_at on the round clock, as the rows arrive under stream.arrival =
        'time'; a time outside the file's is an error naming it."""
        if not self.cfg.drift.known_at or self.dataset is None or self.dataset.time is None:
            return []
        first, last = float(self.dataset.time.min()), float(self.dataset.time.max())
        at = [known_time(v) for v in self.cfg.drift.known_at]
        for value, t in zip(self.cfg.drift.known_at, at, strict=True):
            if not first <= t <= last:
                raise DataError(
                    f"drift.known_at: {value!r} is outside {self.cfg.stream.path}'s times "
                    f"({first:g} to {last:g} in its stream.time column)"
                )
        rounds = self.cfg.federation.rounds
        return [float(t) for t in on_the_clock(np.array(at), rounds, between=(first, last))]

    @cached_property
    def priors(self) -> np.ndarray:
        p = self.cfg.partition
        return class_priors(
            self.cfg.federation.clients, self.cfg.stream.n_classes, p.scheme,
            alpha=p.alpha, shards_per_client=p.shards_per_client, seed=self.cfg.seed,
        )

    def stream(self, client: int) -> ClientStream:
        """Client `client`'s stream, built once per process (its arrival counts are cached)."""
        n = self.cfg.federation.clients
        if not 0 <= client < n:
            raise ValueError(f"client {client} is not in this federation (clients 0..{n - 1})")
        if client not in self._streams:
            arrival: Arrival
            if self.cfg.stream.arrival == "time":  # the file's clock, the same for all
                assert self.dataset is not None and self.clock is not None
                arrival = Scheduled(self.clock[self.dataset.parts[client]])
            else:
                arrival = make_arrival(
                    self.cfg.stream.arrival, float(self.rates[client]), self.cfg.seed, client
                )
            self._streams[client] = ClientStream(client, self.source(client), arrival)
        return self._streams[client]

    def holdout(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """The held-back slice as it looks at time `t`, the end of a round: under the
        concept in force then, and, from the user's own file, only its held-back rows
        among those the round brought (`_held_in_round`)."""
        src = self.source(HOLDOUT_CLIENT)
        if src.length is None:
            index = np.arange(self.cfg.evaluation.holdout, dtype=np.int64)
        elif self.cfg.stream.source in ("csv", "jsonl"):
            index = self._held_in_round(t)
        else:
            index = np.arange(src.length, dtype=np.int64)
        return src.draw(index, np.full(len(index), float(t)))

    def _held_in_round(self, t: float) -> np.ndarray:
        """Positions, among a file's held-back rows, of those in the stretch of the file
        that the clients' streams brought in the round ending at `t` (widened back to the
        HELD_AT_LEAST nearest before its end). A file's own drifts lie in the order of its
        rows, which the streams replay: rows from the whole file would score every round
        on a mix of every concept it goes through."""
        assert self.dataset is not None
        held, start = self.dataset.holdout, float(np.floor(t))  # the round spans [start, t]
        first, last, reached = len(self.dataset.y), -1, -1
        for c, part in enumerate(self.dataset.parts):
            stream = self.stream(c)
            a, b = stream.arrived(start), stream.arrived(t)
            if b:  # the furthest row it has brought so far
                reached = max(reached, int(part[b - 1]))
            if a < b:  # rows a..b-1 of its part came in this round (a stream run dry: none)
                first, last = min(first, int(part[a])), max(last, int(part[b - 1]))
        if last < 0:  # a round that brought nothing: the point reached so far
            first = last = reached
        lo = int(np.searchsorted(held, first))
        hi = int(np.searchsorted(held, last, side="right"))
        lo = min(lo, max(0, hi - HELD_AT_LEAST))
        if hi <= lo:  # nothing arrived yet: the file's first held-back rows
            lo, hi = 0, min(len(held), HELD_AT_LEAST)
        return np.arange(lo, hi, dtype=np.int64)

    def initial_arrays(self, check: bool = False) -> ArrayRecord:
        """The global model's first weights; `check`: also that it gives one score per
        class (preflight does, once)."""
        model = build_model(
            self.cfg.learner.model, self.feature_shape, self.n_classes,
            hidden=self.cfg.learner.hidden, seed=self.cfg.seed,
        )
        if check:
            check_outputs(model, self.cfg.learner.model, self.feature_shape, self.n_classes)
        return ArrayRecord(model.state_dict())


def _check_classes(classes: list[str], rows: int, cfg: Config) -> None:
    """A label column a classifier cannot learn from: one class, or a measurement whose
    every row is a class of its own (a model with that many outputs, silently)."""
    where = f"{cfg.stream.path}: {cfg.stream.label!r}"
    if len(classes) < 2:
        raise DataError(
            f"{where} has a single class ({classes[0]!r}): a classifier needs two or more "
            "(stream.label names the column of classes)"
        )
    if rows >= 20 and len(classes) > rows // 2:
        raise DataError(
            f"{where} has {len(classes):,} distinct values in {rows:,} rows: that is a "
            "measurement, not a class; fedstream trains classifiers, so stream.label must "
            "name a column of classes"
        )


def _split(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    cfg: Config,
    features: tuple[str, ...] = (),
    classes: tuple[str, ...] = (),
) -> Dataset:
    what = cfg.stream.path or cfg.stream.source
    hold, rest = _holdout(len(y), cfg, what)
    _check_split(y[rest], cfg, what, len(hold))
    p = cfg.partition
    try:
        parts = partition(
            y[rest], cfg.federation.clients, p.scheme,
            alpha=p.alpha, shards_per_client=p.shards_per_client, seed=cfg.seed,
        )
    except ValueError as err:  # Dirichlet draws that leave a client empty, every time
        raise DataError(
            f"{what} ({len(rest)} rows, federation.clients = {cfg.federation.clients}): {err}"
        ) from None
    parts_rows = tuple(rest[idx] for idx in parts)
    return Dataset(x, y, n_classes, parts_rows, hold, features, classes)


def _holdout(rows: int, cfg: Config, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(held-back rows for evaluation.every, the rest), both sorted: a fifth of the rows
    at most, drawn from (seed) whatever the split."""
    n_hold = min(cfg.evaluation.holdout, rows // 5) if cfg.evaluation.every else 0
    if cfg.evaluation.every and not n_hold:
        raise DataError(
            f"{what}: {rows} rows are too few to hold back a fifth for evaluation.every; "
            "set evaluation.every = 0"
        )
    rng = np.random.default_rng([cfg.seed, 0x40])
    hold = np.sort(rng.choice(rows, size=n_hold, replace=False)) if n_hold else np.array([], int)
    return hold, np.setdiff1d(np.arange(rows), hold)


def _split_by_column(table: Table, cfg: Config) -> Dataset:
    """The file's own split: client i gets the rows whose `partition.column` has the i-th
    value (sorted as labels are), in file (or time) order. The held-back rows for
    evaluation are drawn from all rows first, as in `_split`."""
    assert table.groups is not None and table.group_names is not None
    names, what, col = table.group_names, cfg.stream.path, cfg.partition.column
    n = cfg.federation.clients
    if len(names) != n:
        shown = ", ".join(map(repr, names[:20])) + (", ..." if len(names) > 20 else "")
        raise DataError(
            f"{what}: partition.column {col!r} has {len(names)} distinct values ({shown}), "
            f"one client each: set federation.clients = {len(names)} (values that differ "
            "only in case or spaces count apart)"
        )
    hold, rows = _holdout(len(table), cfg, what)
    order = np.argsort(table.groups[rows], kind="stable")  # rows by client, in file order
    parts = np.split(rows[order], np.cumsum(np.bincount(table.groups[rows], minlength=n))[:-1])
    empty = [names[i] for i, part in enumerate(parts) if not len(part)]
    if empty:
        raise DataError(
            f"{what}: partition.column {col!r} value {empty[0]!r} has no rows left after "
            f"{len(hold)} were held back for evaluation.every: lower evaluation.holdout"
        )
    return Dataset(
        table.x, table.y, len(table.classes), tuple(parts), hold, tuple(table.features),
        tuple(table.classes), client_names=tuple(names), time=table.time,
    )


def _check_split(y: np.ndarray, cfg: Config, what: str, held: int) -> None:
    """Splits that cannot give every client rows, said in config keys."""
    n, p = cfg.federation.clients, cfg.partition
    held_note = f" (after {held} held back for evaluation)" if held else ""
    if len(y) < n:
        raise DataError(
            f"{what}: {len(y)} rows{held_note} for federation.clients = {n}: every client "
            "needs at least one row"
        )
    if p.scheme == "shards":
        shards, classes = n * p.shards_per_client, len(np.unique(y))
        if shards < classes:
            raise DataError(
                f"{what}: federation.clients x partition.shards_per_client = {shards} shards "
                f"cannot cover the {classes} classes: raise partition.shards_per_client"
            )
        if shards > len(y):
            raise DataError(
                f"{what}: federation.clients x partition.shards_per_client = {shards} shards "
                f"exceed the {len(y)} rows{held_note}: some shards would be empty"
            )


@lru_cache(maxsize=4)
def _cached(cfg_json: str, _file: tuple[int, int] | None) -> Federation:
    return Federation(from_json(cfg_json))


_by_identity: dict[int, tuple[Config, tuple[int, int] | None, Federation]] = {}


def _file_mark(cfg: Config) -> tuple[int, int] | None:
    """An unpinned data file's size and modification time: a file edited between two
    calls in one process (a notebook) is read again, not served from the cache. A pinned
    file (`stream.sha256`, set when a run starts) is that content, whatever the disk says."""
    stream = cfg.stream
    if stream.source not in ("csv", "jsonl") or stream.sha256:
        return None
    try:
        stat = os.stat(stream.path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def federation(cfg: Config) -> Federation:
    """The (per-process cached) federation of `cfg`.

    Looked up first by the config object itself, which saves serialising the config on
    every message; equal configs built apart still share one federation.
    """
    mark = _file_mark(cfg)
    hit = _by_identity.get(id(cfg))
    if hit is not None and hit[0] is cfg and hit[1] == mark:
        return hit[2]
    fed = _cached(to_json(cfg), mark)
    if len(_by_identity) > 16:
        _by_identity.clear()
    _by_identity[id(cfg)] = (cfg, mark, fed)
    return fed

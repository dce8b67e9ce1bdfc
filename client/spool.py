"""A device's spool: a durable, bounded on-disk buffer of its local stream.

Producers append samples (through the ingestion service, ``client/ingest.py``, or in
process); the learner reads the samples it has not trained yet and, once its update is
handed over, commits the new read offset together with its own state in one transaction.
A process killed before that commit leaves the samples pending, so the next round trains
them again; a committed round never sees them again.

Storage is one SQLite file per device in WAL mode, safe for several processes at once
(the ingestion service appending while a ClientApp reads and commits): every write is one
short ``BEGIN IMMEDIATE`` transaction, and readers see a consistent snapshot without
blocking writers. Tables:

* ``samples(seq INTEGER PRIMARY KEY, label INTEGER, t REAL, features BLOB)``: the pending
  samples only, features as float32 little-endian. ``seq`` is assigned by the spool from a
  persistent counter, so it never repeats, even after every row was deleted.
* ``meta(key TEXT PRIMARY KEY, value INTEGER)``: ``n_features``, the committed ``offset``
  and the counters ``next_seq``, ``accepted``, ``trained``, ``dropped``, ``refused`` and
  ``pending``, each updated in the same transaction as the rows it counts, so
  ``accepted == trained + dropped + pending`` holds after any crash.
* ``state(key TEXT PRIMARY KEY, value BLOB)``: blobs committed with the offset
  ("learner", "secagg", ...).

Offsets are half-open: the committed ``offset`` is the first sequence number not yet
trained, a ``Pending`` read covers ``[start, stop)`` and committing ``stop`` marks all of
it trained. Committed rows are deleted at once, so the file holds at most ``capacity``
samples (freed pages are reused; the WAL is truncated back to ``journal_size_limit``).

Capacity counts pending samples (about ``capacity * (4 * n_features + 30)`` bytes on disk).
When an append does not fit, ``policy`` decides: ``"reject"`` stores the head of the batch
that fits and refuses the tail (back-pressure; counted in ``refused``), ``"drop_oldest"``
stores everything and deletes the oldest pending samples to make room (counted in
``dropped``; a sample dropped while a learner was training on it still counts as dropped,
not trained). ``capacity`` and ``policy`` belong to the process that appends; they are not
stored in the file.

``synchronous="full"`` fsyncs the WAL at every transaction (an acknowledged append
survives a power cut); ``"normal"`` fsyncs only at checkpoints (survives a process crash;
a power cut may lose the latest transactions, never the file's consistency).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Policy = Literal["reject", "drop_oldest"]
Synchronous = Literal["full", "normal"]

COUNTERS = ("accepted", "trained", "dropped", "refused", "pending", "offset")
_META_DEFAULTS = {key: 0 for key in (*COUNTERS, "next_seq")}
_BUSY_TIMEOUT = 30.0  # seconds a writer waits for another process's transaction
_JOURNAL_SIZE_LIMIT = 64 << 20  # the WAL is truncated back to this after a checkpoint
_F32 = np.dtype("<f4")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    seq INTEGER PRIMARY KEY, label INTEGER NOT NULL, t REAL NOT NULL, features BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS ledger (
    start INTEGER NOT NULL, stop INTEGER NOT NULL, trained INTEGER NOT NULL, tag TEXT NOT NULL
);
"""


def _owner_only(path: Path) -> None:
    """Make the spool readable by its owner only, before SQLite opens it (its WAL and
    shared-memory files take the database's mode): it holds the device's raw samples and
    its secure-aggregation keys. A spool someone else owns is left as it is."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        with contextlib.suppress(OSError):  # not ours to change: SQLite says if unusable
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        return
    except OSError:
        return  # a missing folder, a read-only place: SQLite's own error names it
    os.close(fd)


class SpoolError(Exception):
    """A spool that cannot be opened as asked, or a call that breaks its rules."""


class FeatureCountMismatch(SpoolError):
    """The spool holds samples of another width than it was opened for."""

    def __init__(self, message: str, stored: int, requested: int) -> None:
        super().__init__(message)
        self.stored, self.requested = stored, requested


@dataclass(frozen=True)
class AppendResult:
    accepted: int  # samples of this call stored (drop_oldest: all of them)
    dropped: int  # older pending samples dropped to make room (policy drop_oldest)
    refused: int  # tail of this call not stored because the spool was full (policy reject)


@dataclass(frozen=True)
class Pending:
    start: int  # seq of the first sample (the committed offset when there is none)
    stop: int  # one past the last seq: the offset to commit once all of them are trained
    x: np.ndarray  # float32 (k, n_features)
    y: np.ndarray  # int64 (k,)
    t: np.ndarray  # float64 (k,) event or arrival times, seconds since the epoch

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Spool:
    """One device's spool file; see the module docstring. Thread-safe (one connection
    behind a lock) and process-safe (SQLite locking); open one per process."""

    def __init__(
        self,
        path: str | Path,
        n_features: int,
        capacity: int = 1_000_000,
        policy: Policy = "reject",
        synchronous: Synchronous = "full",
    ) -> None:
        if int(n_features) < 1:
            raise SpoolError(f"n_features must be at least 1, got {n_features}")
        if int(capacity) < 1:
            raise SpoolError(f"capacity must be at least 1 sample, got {capacity}")
        if policy not in ("reject", "drop_oldest"):
            raise SpoolError(f"policy must be 'reject' or 'drop_oldest', got {policy!r}")
        if synchronous not in ("full", "normal"):
            raise SpoolError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.path = Path(path)
        self.n_features = int(n_features)
        self.capacity = int(capacity)
        self.policy: Policy = policy
        self.synchronous: Synchronous = synchronous
        self._lock = threading.Lock()
        _owner_only(self.path)
        try:
            self._db = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from exc
        try:
            self._setup()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise SpoolError(f"{self.path}: not a usable spool: {exc}") from exc
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        db.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
        with self._write() as cur:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                cur.execute(statement)
            cur.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('n_features', ?)",
                (self.n_features,),
            )
            cur.executemany(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", _META_DEFAULTS.items()
            )
            stored = cur.execute("SELECT value FROM meta WHERE key = 'n_features'").fetchone()[0]
        if stored != self.n_features:
            raise FeatureCountMismatch(
                f"{self.path}: the spool stores samples of {stored} features, "
                f"opened with n_features={self.n_features}",
                stored, self.n_features,
            )

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Cursor]:
        """One IMMEDIATE transaction (takes the write lock up front, so it never fails
        half-way on a lock upgrade); rolled back on any error."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    cur.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        """One read transaction: all its statements see the same snapshot."""
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")

    @staticmethod
    def _meta(cur: sqlite3.Cursor) -> dict[str, int]:
        return dict(cur.execute("SELECT key, value FROM meta").fetchall())

    @staticmethod
    def _add(cur: sqlite3.Cursor, **deltas: int) -> None:
        cur.executemany(
            "UPDATE meta SET value = value + ? WHERE key = ?",
            [(int(d), k) for k, d in deltas.items() if d],
        )

    # ------------------------------------------------------------------------- write

    def append(self, x: np.ndarray, y: np.ndarray, t: np.ndarray | None = None) -> AppendResult:
        """Store samples ``x`` (n, n_features) with labels ``y`` (n,) in one transaction.

        ``t`` (n,) are event times in seconds since the epoch (default: now). Non-numeric
        input raises ``SpoolError``; validating values (finite, label range) is the
        caller's job (the ingestion service reports each bad sample); a non-finite
        feature or a negative label here raises ``SpoolError`` and stores nothing."""
        features, labels, times = self._convert(x, y, t)
        n = labels.shape[0]
        if n == 0:
            return AppendResult(0, 0, 0)
        blobs = features.view(np.dtype((np.void, features.shape[1] * 4))).ravel().tolist()
        with self._write() as cur:
            meta = self._meta(cur)
            pending, first = meta["pending"], meta["next_seq"]
            free = self.capacity - pending
            dropped = refused = 0
            keep = slice(0, n)
            if n > free and self.policy == "reject":
                refused = n - max(free, 0)
                keep = slice(0, n - refused)
            elif n > free:  # drop_oldest
                dropped = n - free
                old = min(dropped, pending)
                if old:
                    cutoff = cur.execute(
                        "SELECT seq FROM samples ORDER BY seq LIMIT 1 OFFSET ?", (old,)
                    ).fetchone()
                    if cutoff is None:
                        cur.execute("DELETE FROM samples")
                    else:
                        cur.execute("DELETE FROM samples WHERE seq < ?", cutoff)
                    if cur.rowcount != old:
                        raise SpoolError(
                            f"{self.path}: corrupt counters: dropped {cur.rowcount} rows, "
                            f"expected {old}"
                        )
                keep = slice(n - min(n, self.capacity), n)  # the newest that fit
            stored = keep.stop - keep.start
            if stored:
                seqs = range(first + keep.start, first + keep.stop)
                cur.executemany(
                    "INSERT INTO samples (seq, label, t, features) VALUES (?, ?, ?, ?)",
                    zip(
                        seqs,
                        labels[keep].tolist(),
                        times[keep].tolist(),
                        blobs[keep],
                        strict=True,
                    ),
                )
            accepted = n - refused
            self._add(
                cur,
                next_seq=accepted,
                accepted=accepted,
                dropped=dropped,
                refused=refused,
                pending=accepted - dropped,
            )
        return AppendResult(accepted=accepted, dropped=dropped, refused=refused)

    def _convert(
        self, x: np.ndarray, y: np.ndarray, t: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            features = np.ascontiguousarray(np.asarray(x, dtype=_F32))
        except (TypeError, ValueError) as exc:
            raise SpoolError(f"x must be numeric, nothing was stored: {exc}") from None
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise SpoolError(
                f"x must have shape (n, {self.n_features}), got {features.shape}"
            )
        labels = np.asarray(y)
        if labels.dtype.kind not in "iub" and labels.size:
            raise SpoolError(f"y must hold integer class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=False).reshape(-1)
        if labels.shape[0] != features.shape[0] or np.ndim(y) != 1:
            raise SpoolError(
                f"y must have shape ({features.shape[0]},) to match x, got {np.shape(y)}"
            )
        bad = ~np.isfinite(features).all(axis=1) | (labels < 0)
        if bad.any():
            i = int(np.argmax(bad))
            problem = "negative label" if labels[i] < 0 else "non-finite feature (NaN or inf)"
            raise SpoolError(f"sample {i}: {problem}; nothing of this call was stored")
        if t is None:
            times = np.full(labels.shape[0], time.time())
        else:
            try:
                times = np.asarray(t, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise SpoolError(f"t must be numeric: {exc}") from None
            if times.shape != labels.shape:
                raise SpoolError(f"t must have shape {labels.shape}, got {times.shape}")
        return features, labels, times

    # -------------------------------------------------------------------- read/commit

    def pending(self, limit: int | None = None) -> Pending:
        """The oldest untrained samples, in order, at most ``limit`` of them."""
        if limit is not None and limit < 0:
            raise SpoolError(f"limit must be >= 0 or None, got {limit}")
        with self._read() as cur:
            offset = cur.execute("SELECT value FROM meta WHERE key = 'offset'").fetchone()[0]
            rows = cur.execute(
                "SELECT seq, label, t, features FROM samples WHERE seq >= ? ORDER BY seq LIMIT ?",
                (offset, -1 if limit is None else limit),
            ).fetchall()
        k = len(rows)
        if not k:
            empty = np.empty((0, self.n_features), dtype=np.float32)
            return Pending(offset, offset, empty, np.empty(0, np.int64), np.empty(0))
        seq, label, when, blobs = zip(*rows, strict=True)
        x = np.frombuffer(b"".join(blobs), dtype=_F32).reshape(k, self.n_features)
        return Pending(
            start=int(seq[0]),
            stop=int(seq[-1]) + 1,
            x=x.astype(np.float32),  # native byte order, writable
            y=np.asarray(label, dtype=np.int64),
            t=np.asarray(when, dtype=np.float64),
        )

    def commit(
        self, offset: int, state: dict[str, bytes] | None = None, tag: str = ""
    ) -> None:
        """Mark every sample before ``offset`` trained and store ``state``, atomically.

        Each commit also appends ``(start, stop, trained, tag)`` to the ledger, the audit
        trail that shows every accepted sample trained exactly once (``tag``: e.g. the
        round that trained them)."""
        offset = int(offset)
        with self._write() as cur:
            meta = self._meta(cur)
            if offset < meta["offset"]:
                raise SpoolError(
                    f"offset {offset} is behind the committed offset {meta['offset']}"
                )
            if offset > meta["next_seq"]:
                raise SpoolError(
                    f"offset {offset} is beyond the last appended sample "
                    f"(next sequence number {meta['next_seq']})"
                )
            cur.execute("DELETE FROM samples WHERE seq < ?", (offset,))
            trained = cur.rowcount
            for key, blob in (state or {}).items():
                if not isinstance(key, str) or not isinstance(blob, bytes | bytearray):
                    raise SpoolError(f"state must map str to bytes, got {key!r}: {type(blob)}")
                cur.execute(
                    "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, bytes(blob))
                )
            cur.execute("UPDATE meta SET value = ? WHERE key = 'offset'", (offset,))
            if offset > meta["offset"]:
                cur.execute(
                    "INSERT INTO ledger (start, stop, trained, tag) VALUES (?, ?, ?, ?)",
                    (meta["offset"], offset, trained, tag),
                )
            self._add(cur, trained=trained, pending=-trained)

    def ledger(self) -> list[tuple[int, int, int, str]]:
        """Every commit, in order: ``(start, stop, trained, tag)``; ranges are contiguous."""
        with self._read() as cur:
            return [tuple(r) for r in cur.execute("SELECT * FROM ledger ORDER BY rowid")]

    def put_state(self, key: str, blob: bytes) -> None:
        """Store one state value on its own, durably, leaving the samples as they are."""
        with self._write() as cur:
            cur.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                        (key, bytes(blob)))

    def state(self, key: str) -> bytes | None:
        with self._read() as cur:
            row = cur.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def stats(self) -> dict[str, int]:
        """``accepted``, ``trained``, ``dropped``, ``refused``, ``pending``, ``offset``
        and ``n_features``, from one snapshot."""
        with self._read() as cur:
            meta = self._meta(cur)
        return {key: int(meta[key]) for key in (*COUNTERS, "n_features")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

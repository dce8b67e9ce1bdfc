"""The local ingestion service of a device, and a Python producer for it.

Producers, in any language, push samples with the client-streaming ``Append`` call of
``fedstream.ingest.v1.Ingest`` (``protocol/ingest.proto``, which documents the wire rules)
over a Unix socket or loopback TCP; the service validates each sample and stores the good
ones in the device's spool (``client/spool.py``), one transaction per received batch.

Back-pressure, when the spool is full under policy ``"reject"``: the service stores what
fits, refuses the rest of that batch and ends the call at once with status **OK** and an
``AppendReply`` with ``full = true``, ``refused`` (samples received and not stored) and
``first_refused`` (the stream position from which nothing was stored). It does not answer
RESOURCE_EXHAUSTED for this, so the reply (accepted counts, malformed-sample errors) always
reaches the producer. RESOURCE_EXHAUSTED comes from gRPC itself for a message beyond the
hard transport limit, and from the service when its spool cannot store a batch (a full
disk): then the trailing metadata ``fedstream-handled`` holds the stream position of that
batch's first sample, from which the producer feeds again (``IngestError.handled``).
``Producer.append`` turns back-pressure into ``IngestResult.refused``, counting the
samples it never got to send as refused too.

Run the service on its own with

    python -m fedstream.client.ingest --spool /var/lib/fedstream/spool.db --n-features 32 \
        --address unix:///run/fedstream/ingest.sock
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sqlite3
import stat
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedstream.client.spool import Policy, Spool, SpoolError, Synchronous
from fedstream.protocol import ingest_pb2 as pb
from fedstream.protocol import ingest_pb2_grpc as pb_grpc
from fedstream.protocol.runtime import port_in_use

SERVICE = "fedstream.ingest.v1.Ingest"
MAX_MESSAGE_BYTES = 4 << 20  # a larger batch is refused as "oversized message"
TRANSPORT_FACTOR = 4  # gRPC itself drops messages beyond this many times the limit
MAX_BATCH = 65_536  # samples per message
MAX_ERRORS = 1000  # error entries listed in a reply (all are counted in `rejected`)
_ROW_OVERHEAD = 24  # protobuf bytes per sample besides its features (label, flags, time)


class IngestError(Exception):
    """The ingestion service cannot be reached, or refused the call as a whole.

    `sent`: samples of the call handed to the connection before it failed (a device that
    went down mid-stream stored those it received; the rest were never sent)."""

    sent: int = 0
    # Samples of the call the device handled (stored or refused) before it failed, when it
    # said so: a spool that could not store (a full disk). Feed again from there.
    handled: int | None = None


HANDLED = "fedstream-handled"  # the trailer that carries `IngestError.handled`


# ------------------------------------------------------------------------------ server


@dataclass
class _Call:
    """Running totals of one Append call."""

    received: int = 0
    accepted: int = 0
    dropped: int = 0
    refused: int = 0
    rejected: int = 0
    first_refused: int | None = None
    errors: list[pb.SampleError] = field(default_factory=list)

    def error(self, index: int, reason: str, count: int = 1) -> None:
        self.rejected += count
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(pb.SampleError(index=index, reason=reason, count=count))

    def reply(self) -> pb.AppendReply:
        return pb.AppendReply(
            accepted=self.accepted,
            dropped=self.dropped,
            refused=self.refused,
            rejected=self.rejected,
            errors=self.errors,
            full=self.first_refused is not None,
            first_refused=self.first_refused or 0,
            received=self.received,
        )


class _Servicer:
    def __init__(
        self, spool: Spool, n_classes: int | None, max_message_bytes: int, max_batch: int
    ) -> None:
        self.spool = spool
        self.n_classes = n_classes
        self.max_message_bytes = max_message_bytes
        self.max_batch = max_batch

    def Append(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.AppendReply:
        call = _Call()
        for raw in requests:
            try:
                batch = pb.SampleBatch.FromString(raw)
            except Exception:  # protobuf's DecodeError; the positions of later samples are lost
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed batch: message at stream position {call.received} is not a "
                    f"SampleBatch ({len(raw)} bytes); samples before it were handled: "
                    f"{call.accepted} stored, {call.rejected} malformed",
                )
            start = call.received
            try:
                more = self._batch(batch, raw, call)
            except (SpoolError, sqlite3.Error) as exc:  # e.g. the disk is full
                # A batch is stored whole or not at all: the producer goes on from its first
                # sample (the trailer says which), and loses none.
                text = str(exc).lower()
                full = (" (is the disk full?)" if "full" in text else
                        " (is the disk full, or failing?)" if "i/o" in text else "")
                print(f"ingestion: the spool could not store samples: {self.spool.path}: "
                      f"{exc}{full}", file=sys.stderr, flush=True)
                context.set_trailing_metadata(((HANDLED, str(start)),))
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the device's spool could not store the samples from stream position "
                    f"{start} on: {exc}{full}; the {call.accepted} samples of this call "
                    "before them were stored",
                )
            if not more:
                break  # spool full: end the call now (back-pressure)
        return call.reply()

    def _batch(self, batch: pb.SampleBatch, raw: bytes, call: _Call) -> bool:
        """Validate and store one batch; False when the spool refused (full)."""
        start = call.received
        size = len(raw)
        n = len(batch.labels)
        if n == 0 and len(batch.features):
            d = batch.n_features or self.spool.n_features
            n = max(1, len(batch.features) // d)
            call.received += n
            call.error(start, "missing label: the batch has feature values but no labels", n)
            return True
        call.received += n
        if n == 0:
            return True
        whole = self._batch_problem(batch, size, n)
        if whole is not None:
            call.error(start, whole, n)
            return True
        x, index, reasons = self._features(batch, raw, n)
        labels = np.asarray(batch.labels, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        ok[index] = True
        if len(batch.has_label):
            missing = ~np.asarray(batch.has_label, dtype=bool)
            reasons.append((missing & ok, lambda i: "missing label"))
            ok &= ~missing
        high = labels >= self.n_classes if self.n_classes else np.zeros(n, dtype=bool)
        out_of_range = ok & ((labels < 0) | high)
        limit = f"is not in [0, {self.n_classes})" if self.n_classes else "is negative"
        reasons.append((out_of_range, lambda i: f"label out of range: {labels[i]} {limit}"))
        ok &= ~out_of_range
        times = None
        if len(batch.timestamps):
            times = np.asarray(batch.timestamps, dtype=np.float64)
            bad_time = ok & ~np.isfinite(times)
            reasons.append((bad_time, lambda i: f"non-finite timestamp {times[i]}"))
            ok &= ~bad_time
        self._report(reasons, start, call)
        keep = ok[index]  # rows of x to store
        good = index[keep]
        if not good.size:
            return True
        result = self.spool.append(x[keep], labels[good], None if times is None else times[good])
        call.accepted += result.accepted
        call.dropped += result.dropped
        if result.refused:
            call.refused += result.refused
            call.first_refused = start + int(good[result.accepted])
            return False
        return True

    def _batch_problem(self, batch: pb.SampleBatch, size: int, n: int) -> str | None:
        """A reason that applies to every sample of the batch, or None."""
        d = self.spool.n_features
        if size > self.max_message_bytes:
            fit = max(1, self.max_message_bytes // (4 * d + _ROW_OVERHEAD))
            return (
                f"oversized message: {size} bytes, the limit is {self.max_message_bytes} "
                f"bytes (send at most about {fit} samples of {d} features per batch)"
            )
        if n > self.max_batch:
            return f"oversized message: {n} samples, the limit is {self.max_batch} per batch"
        for name, values in (
            ("has_label", batch.has_label),
            ("timestamps", batch.timestamps),
            ("row_lengths", batch.row_lengths),
        ):
            if len(values) not in (0, n):
                return f"malformed batch: {name} has {len(values)} entries for {n} labels"
        if batch.n_features != d and not len(batch.row_lengths):
            return (
                f"wrong feature count: the batch has n_features={batch.n_features}, "
                f"the spool stores {d}"
            )
        if len(batch.row_lengths):
            total = sum(batch.row_lengths)
            if total != len(batch.features):
                return (
                    f"malformed batch: row_lengths add up to {total} but features holds "
                    f"{len(batch.features)} values"
                )
        elif len(batch.features) != n * d:
            return (
                f"wrong feature count: ragged batch, {len(batch.features)} feature values "
                f"for {n} samples of {d} features"
            )
        return None

    def _features(
        self, batch: pb.SampleBatch, raw: bytes, n: int
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, Any]]]:
        """(finite rows of the right length, their sample indices, [(mask, reason), ...])."""
        d = self.spool.n_features
        values = wire_floats(raw, FEATURES_FIELD)
        if values is None or values.shape[0] != len(batch.features):
            values = np.fromiter(batch.features, dtype=np.float32, count=len(batch.features))
        reasons: list[tuple[np.ndarray, Any]] = []
        if len(batch.row_lengths):
            lengths = np.asarray(batch.row_lengths, dtype=np.int64)
            right = lengths == d
            reasons.append(
                (~right, lambda i: f"wrong feature count: {lengths[i]} values, expected {d}")
            )
            x = values[np.repeat(right, lengths)].reshape(-1, d)
            index = np.flatnonzero(right)
        else:
            x = values.reshape(n, d)
            index = np.arange(n)
        finite = np.isfinite(x)
        rows = finite.all(axis=1)
        if not rows.all():
            bad = np.zeros(n, dtype=bool)
            bad[index[~rows]] = True
            where = {int(index[r]): r for r in np.flatnonzero(~rows)[:MAX_ERRORS]}

            def reason(i: int, x: np.ndarray = x) -> str:
                r = where.get(i)
                if r is None:
                    return "non-finite feature (NaN or inf)"
                j = int(np.argmin(finite[r]))
                return f"non-finite feature {j}: {x[r, j]} (NaN and inf are not stored)"

            reasons.append((bad, reason))
            x, index = x[rows], index[rows]
        return x, index, reasons

    @staticmethod
    def _report(reasons: list[tuple[np.ndarray, Any]], start: int, call: _Call) -> None:
        """One error per bad sample, the first problem found naming it (masks are
        disjoint by construction), in stream order."""
        if not reasons:
            return
        which = np.full(reasons[0][0].shape[0], -1)
        for k, (mask, _) in enumerate(reasons):
            which[mask & (which < 0)] = k
        bad = np.flatnonzero(which >= 0)
        room = max(0, MAX_ERRORS - len(call.errors))
        for i in bad[:room].tolist():
            call.error(start + i, reasons[which[i]][1](i))
        call.rejected += max(0, bad.size - room)  # counted, not listed

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        stats = self.spool.stats()
        return pb.StatsReply(**stats, capacity=self.spool.capacity, policy=self.spool.policy)


FEATURES_FIELD = pb.SampleBatch.DESCRIPTOR.fields_by_name["features"].number


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def wire_floats(raw: bytes, number: int) -> np.ndarray | None:
    """The values of the repeated float field ``number`` of a serialized (already parsed,
    hence well-formed) message, straight from the wire bytes: the packed run(s) become
    float32 arrays without a Python float per value. None if the layout is unexpected."""
    chunks: list[np.ndarray] = []
    pos, end = 0, len(raw)
    while pos < end:
        tag, pos = _varint(raw, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(raw, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            if field == number:
                chunks.append(np.frombuffer(raw, dtype="<f4", count=1, offset=pos))
            pos += 4
        elif wire == 2:
            length, pos = _varint(raw, pos)
            if field == number:
                if length % 4:
                    return None
                chunks.append(np.frombuffer(raw, dtype="<f4", count=length // 4, offset=pos))
            pos += length
        else:
            return None
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.float32)


def encode_batch(
    x: np.ndarray, y: np.ndarray, has_label: np.ndarray | None, t: np.ndarray | None
) -> bytes:
    """A serialized ``SampleBatch``. The features go on the wire as one packed run of
    little-endian float32 written from the array's bytes (what protobuf itself would
    write, without a Python float per value); the other fields are serialized by protobuf
    and the two parts concatenated, which protobuf reads as one message."""
    head = pb.SampleBatch(n_features=x.shape[1], labels=y.tolist())
    if has_label is not None and not has_label.all():
        head.has_label.extend(has_label.tolist())
    if t is not None:
        head.timestamps.extend(t.tolist())
    body = np.ascontiguousarray(x, dtype="<f4").tobytes()
    if not body:
        return head.SerializeToString()
    length, prefix = len(body), bytearray([FEATURES_FIELD << 3 | 2])
    while length >= 0x80:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return head.SerializeToString() + bytes(prefix) + body


def serve(
    spool_path: str | Path,
    n_features: int,
    address: str,
    capacity: int = 1_000_000,
    policy: Policy = "reject",
    *,
    synchronous: Synchronous = "full",
    n_classes: int | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    max_batch: int = MAX_BATCH,
    max_workers: int = 4,
) -> grpc.Server:
    """Open (or create) the spool and start serving ``Ingest`` on ``address``; returns at
    once. ``address`` is ``unix:///path/to.sock`` (a stale socket file is replaced) or
    ``HOST:PORT`` (port 0 picks a free one). The returned server has two extra attributes:
    ``address`` (with the bound port) and ``spool``. Stop it with ``server.stop(grace)``."""
    host, _, port_text = address.rpartition(":")
    tcp = not address.startswith("unix:") and port_text.isdigit() and int(port_text) > 0
    # Asked first: gRPC's own failed bind prints a C-core error line on the terminal.
    if tcp and port_in_use(host.strip("[]") or "127.0.0.1", int(port_text)):
        raise IngestError(f"cannot listen on {address}: the port is in use")
    spool = Spool(spool_path, n_features, capacity, policy, synchronous)
    servicer = _Servicer(spool, n_classes, max_message_bytes, max_batch)
    transport = TRANSPORT_FACTOR * max_message_bytes
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ingest"),
        options=[
            ("grpc.max_receive_message_length", transport),
            ("grpc.max_send_message_length", transport),
        ],
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            # raw bytes in: the service sees each message's wire size (oversized check)
            "Append": grpc.stream_unary_rpc_method_handler(
                servicer.Append, response_serializer=pb.AppendReply.SerializeToString
            ),
            "Stats": grpc.unary_unary_rpc_method_handler(
                servicer.Stats,
                request_deserializer=pb.StatsRequest.FromString,
                response_serializer=pb.StatsReply.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    try:
        if address.startswith("unix:"):
            _clear_stale_socket(address)
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        spool.close()
        raise IngestError(f"cannot listen on {address}: is it in use?") from exc
    except BaseException:
        spool.close()
        raise
    if not address.startswith("unix:") and address.rsplit(":", 1)[-1] == "0":
        address = f"{address.rsplit(':', 1)[0]}:{port}"
    server.start()
    server.address = address  # type: ignore[attr-defined]
    server.spool = spool  # type: ignore[attr-defined]
    return server


def _clear_stale_socket(address: str) -> None:
    """gRPC will not bind over an existing socket file; remove it if nobody listens."""
    path = address.removeprefix("unix:").removeprefix("//")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise IngestError(f"cannot listen on {address}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                os.unlink(path)
                return
            raise IngestError(f"cannot listen on {address}: {exc}") from exc
    raise IngestError(f"cannot listen on {address}: another process is serving on it")


# ---------------------------------------------------------------------------- producer


@dataclass(frozen=True)
class SampleError:
    index: int  # position of the first sample concerned (row of the x given to append)
    reason: str
    count: int = 1  # consecutive samples with this reason


@dataclass(frozen=True)
class IngestResult:
    accepted: int  # stored
    dropped: int  # older untrained samples dropped to make room (policy drop_oldest)
    refused: int  # not stored because the spool was full, including those never sent
    rejected: int  # malformed, not stored
    errors: list[SampleError]  # the malformed ones (at most MAX_ERRORS entries)
    first_refused: int | None = None  # spool full: nothing from this position on was stored
    sent: int = 0  # samples handed to the service

    @property
    def full(self) -> bool:
        return self.first_refused is not None


class Producer:
    """Push samples to an ingestion service (``serve``) at ``address``.

    ``append(x, y)`` streams ``x`` in batches of at most ``batch`` samples (fewer if that
    would pass the service's message limit) in one ``Append`` call and returns what the
    service did with them; ``refused`` > 0 is back-pressure (spool full): retry the samples
    from ``first_refused`` on later. A connection failure raises ``IngestError``."""

    def __init__(
        self,
        address: str,
        *,
        batch: int = 8192,
        timeout: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.address = address
        self.batch = batch
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", TRANSPORT_FACTOR * max_message_bytes),
                ("grpc.max_receive_message_length", TRANSPORT_FACTOR * max_message_bytes),
            ],
        )
        self._stub = pb_grpc.IngestStub(self._channel)
        self._append = self._channel.stream_unary(  # requests already serialized
            f"/{SERVICE}/Append", response_deserializer=pb.AppendReply.FromString
        )

    def wait_ready(self, seconds: float) -> None:
        """Wait up to `seconds` for the service to accept connections (a producer may
        start before its device); IngestError if it does not come up in time."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=seconds)
        except grpc.FutureTimeoutError:
            raise IngestError(
                f"cannot reach the ingestion service at {self.address}: not up after "
                f"{seconds:g} s"
            ) from None

    def append(self, x: Any, y: Any, t: Any | None = None) -> IngestResult:
        """Send samples ``x`` (n, n_features), labels ``y`` (n,; ``None`` or NaN marks a
        missing label, which the service reports) and optional times ``t`` (n,).
        Non-numeric values raise ``ValueError`` naming the row and column; the service
        reports every other problem per sample in ``errors``."""
        features, labels, has_label = _as_samples(x, y)
        times = None
        if t is not None:
            times = _numeric(t, "t", np.float64).reshape(-1)
            if times.shape[0] != labels.shape[0]:
                raise ValueError(f"t has {times.shape[0]} entries for {labels.shape[0]} samples")
        return self.append_batches([(features, labels, has_label, times)], total=len(labels))

    def append_batches(
        self,
        batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]],
        total: int | None = None,
    ) -> IngestResult:
        """One ``Append`` call over batches ``(x, y, has_label, t)`` of checked arrays
        (x float32 2-D, y int64; the last two may be None), each split into messages of
        at most ``batch`` samples and the message limit. Stream positions count the
        samples of all batches in order. ``total``, if known, lets ``refused`` include the
        samples never sent (the call ends early when the spool is full)."""
        sent = 0

        def messages() -> Iterator[bytes]:
            nonlocal sent
            for x, y, has_label, t in batches:
                step = self._rows_per_message(x.shape[1])
                for lo in range(0, len(y), step):
                    hi = min(len(y), lo + step)
                    message = encode_batch(
                        x[lo:hi],
                        y[lo:hi],
                        None if has_label is None else has_label[lo:hi],
                        None if t is None else t[lo:hi],
                    )
                    sent += hi - lo  # before the yield: gRPC may never ask for the next one
                    yield message

        try:
            reply = self._append(messages(), timeout=self.timeout)
        except grpc.RpcError as exc:
            error = _rpc_error(exc, self.address)
            # gRPC reads requests ahead of connecting: rows count as sent only if a
            # connection was made (then broke), not when none could be.
            never = "failed to connect" in (exc.details() if isinstance(exc, grpc.Call) else "")
            error.sent = 0 if never else sent
            trailer = dict(exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else {}
            if HANDLED in trailer:
                error.handled = int(trailer[HANDLED])
            raise error from None
        first = reply.first_refused if reply.full else None
        refused = reply.refused
        if reply.full:
            # samples sent after the call ended, and those never sent, were not stored
            refused += max(total if total is not None else sent, sent) - reply.received
        return IngestResult(
            accepted=reply.accepted,
            dropped=reply.dropped,
            refused=refused,
            rejected=reply.rejected,
            errors=[SampleError(e.index, e.reason, e.count or 1) for e in reply.errors],
            first_refused=first,
            sent=reply.received,
        )

    def stats(self) -> dict[str, Any]:
        try:
            reply = self._stub.Stats(pb.StatsRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.address) from None
        keys = ("accepted", "trained", "dropped", "refused", "pending", "offset")
        out: dict[str, Any] = {k: int(getattr(reply, k)) for k in keys}
        out.update(n_features=reply.n_features, capacity=reply.capacity, policy=reply.policy)
        return out

    def _rows_per_message(self, d: int) -> int:
        return max(1, min(self.batch, (self.max_message_bytes - 64) // (4 * d + _ROW_OVERHEAD)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rpc_error(exc: grpc.RpcError, address: str) -> IngestError:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return IngestError(f"cannot reach the ingestion service at {address}: {details}")
    name = code.name if code is not None else "error"
    return IngestError(f"ingestion service at {address}: {name}: {details}")


def _numeric(values: Any, what: str, dtype: type) -> np.ndarray:
    """``values`` as a ``dtype`` array, or ``ValueError`` naming the first non-number."""
    try:
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError):
        pass
    cells = np.asarray(values, dtype=object)
    for position, cell in np.ndenumerate(cells):
        try:
            if isinstance(cell, bool | str | bytes) or cell is None:
                raise TypeError
            float(cell)
        except (TypeError, ValueError):
            at = ", ".join(map(str, position))
            raise ValueError(
                f"{what}[{at}]: {cell!r} is not a number; non-numeric samples are not sent"
            ) from None
    raise ValueError(f"{what} is not a numeric array (ragged rows?)")


def _as_samples(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(float32 x, int64 y, has_label or None); a missing label (None/NaN) is kept for the
    service to report; a non-integer label is refused here."""
    features = np.ascontiguousarray(_numeric(x, "x", np.float32))
    if features.ndim != 2:
        raise ValueError(f"x must be 2-D (n, n_features), got shape {features.shape}")
    raw = np.asarray(y, dtype=object if _has_none(y) else None).reshape(-1)
    if raw.shape[0] != features.shape[0]:
        raise ValueError(f"y has {raw.shape[0]} labels for {features.shape[0]} samples")
    if raw.dtype.kind in "iub":
        return features, raw.astype(np.int64), None
    has = np.asarray([v is not None for v in raw]) if raw.dtype == object else None
    filled = np.where(has, raw, 0) if has is not None else raw
    values = _numeric(filled, "y", np.float64)
    present = ~np.isnan(values) if has is None else has & ~np.isnan(values)
    bad = present & (values != np.round(values))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"y[{i}]: {float(values[i])!r} is not an integer class index")
    labels = np.where(present, values, 0).astype(np.int64)
    return features, labels, None if present.all() else present


def _has_none(y: Any) -> bool:
    return isinstance(y, list | tuple) and any(v is None for v in y)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fedstream.client.ingest", description="Run a device's ingestion service."
    )
    parser.add_argument("--spool", required=True, help="spool file (created if missing)")
    parser.add_argument("--n-features", type=int, required=True)
    parser.add_argument("--address", required=True, help="unix:///path.sock or 127.0.0.1:PORT")
    parser.add_argument("--capacity", type=int, default=1_000_000, help="pending samples")
    parser.add_argument("--policy", choices=("reject", "drop_oldest"), default="reject")
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--n-classes", type=int, default=None)
    parser.add_argument("--max-workers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        server = serve(
            args.spool, args.n_features, args.address, args.capacity, args.policy,
            synchronous=args.synchronous, n_classes=args.n_classes, max_workers=args.max_workers,
        )
    except (SpoolError, IngestError) as exc:
        parser.exit(2, f"error: {exc}\n")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {server.address}", flush=True)  # type: ignore[attr-defined]
    stop.wait()
    server.stop(grace=5).wait()
    server.spool.close()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()

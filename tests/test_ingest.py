"""The ingestion service: real gRPC servers on a Unix socket and on loopback TCP, a real
spool behind them, and `fedstream feed` end to end."""

from __future__ import annotations

import contextlib
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedstream.client.ingest import IngestError, Producer, serve
from fedstream.client.spool import Spool
from fedstream.protocol import ingest_pb2 as pb
from fedstream.protocol import ingest_pb2_grpc as pb_grpc

D = 4


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to ~100 bytes: pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="fsi", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start(short_dir: Path) -> Iterator:
    servers: list[grpc.Server] = []

    def start(transport: str = "unix", **kw: object) -> grpc.Server:
        address = f"unix://{short_dir}/ingest.sock" if transport == "unix" else "127.0.0.1:0"
        kw.setdefault("n_features", D)
        server = serve(short_dir / f"spool{len(servers)}.db", address=address, **kw)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(None)
        server.spool.close()


def rows(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(start, start + n, dtype=np.float32)
    return np.repeat(ids[:, None], D, axis=1), np.arange(start, start + n) % 3


def stored(server: grpc.Server) -> list[int]:
    return server.spool.pending().x[:, 0].astype(int).tolist()


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_append_round_trip(start, transport: str) -> None:
    server = start(transport)
    assert server.address.startswith("unix://") or not server.address.endswith(":0")
    x, y = rows(1000)
    t = np.arange(1000, dtype=np.float64) + 1.7e9
    with Producer(server.address, batch=128) as producer:
        result = producer.append(x, y, t)
        assert (result.accepted, result.refused, result.rejected, result.errors) == (1000, 0, 0, [])
        stats = producer.stats()
    assert stats["accepted"] == 1000 and stats["pending"] == 1000 and stats["n_features"] == D
    assert stats["capacity"] == 1_000_000 and stats["policy"] == "reject"
    pending = server.spool.pending()
    np.testing.assert_array_equal(pending.x, x)
    np.testing.assert_array_equal(pending.y, y)
    np.testing.assert_array_equal(pending.t, t)


def test_malformed_samples_are_named_and_the_good_ones_stored(start) -> None:
    server = start(n_classes=3, max_message_bytes=2000)
    x, y = rows(12)
    x[2, 1] = np.nan
    x[5, 3] = np.inf
    labels: list[int | None] = y.tolist()
    labels[7] = None  # missing label
    labels[9] = 3  # out of range for 3 classes
    labels[10] = -1
    wide = np.ones((2, D + 1), dtype=np.float32)
    has = np.asarray([v is not None for v in labels])
    with Producer(server.address, batch=4) as producer:
        result = producer.append_batches(
            [
                (x, np.asarray([v or 0 for v in labels]), has, None),  # stream positions 0..11
                (wide, np.zeros(2, dtype=np.int64), None, None),  # 12, 13
                (*rows(3, start=50), None, None),  # 14..16
            ]
        )
    reasons = {e.index: e.reason for e in result.errors}
    assert set(reasons) == {2, 5, 7, 9, 10, 12}, result.errors
    assert "non-finite feature 1: nan" in reasons[2]
    assert "non-finite feature 3: inf" in reasons[5]
    assert reasons[7] == "missing label"
    assert "label out of range: 3 is not in [0, 3)" in reasons[9]
    assert "label out of range: -1" in reasons[10]
    assert "wrong feature count" in reasons[12] and "n_features=5" in reasons[12]
    assert result.errors[-1].count == 2 and result.rejected == 7
    assert result.accepted == 10 and result.refused == 0
    assert stored(server) == [0, 1, 3, 4, 6, 8, 11, 50, 51, 52]

    # a producer that ignores the service's message limit (2000 bytes here)
    with Producer(server.address, batch=1000, max_message_bytes=10_000) as greedy:
        result = greedy.append_batches(
            [(*rows(3, start=100), None, None), (*rows(200, start=200), None, None),
             (*rows(2, start=900), None, None)]
        )
    assert (result.accepted, result.rejected) == (5, 200)
    [error] = result.errors
    assert (error.index, error.count) == (3, 200)
    assert "oversized message" in error.reason and "the limit is 2000 bytes" in error.reason
    assert stored(server)[-5:] == [100, 101, 102, 900, 901]


def test_raw_producer_ragged_rows_and_batch_mismatches(start) -> None:
    """What a producer in another language could send: ragged rows, inconsistent fields."""
    server = start("tcp")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.IngestStub(channel)
        batches = [
            pb.SampleBatch(  # 3 samples, the middle one has 3 values: per-sample error
                n_features=D, features=[1.0] * 4 + [2.0] * 3 + [3.0] * 4, labels=[0, 1, 2],
                row_lengths=[4, 3, 4],
            ),
            pb.SampleBatch(n_features=D, features=[1.0] * 7, labels=[0, 1]),  # ragged
            pb.SampleBatch(n_features=D, features=[1.0] * 8, labels=[0, 1], has_label=[True]),
            pb.SampleBatch(n_features=D, features=[5.0] * 4),  # no labels at all
            pb.SampleBatch(n_features=D, features=[6.0] * 4, labels=[1]),
        ]
        reply = stub.Append(iter(batches))
    errors = [(e.index, e.count, e.reason) for e in reply.errors]
    assert errors[0] == (1, 1, "wrong feature count: 3 values, expected 4")
    assert errors[1][:2] == (3, 2)
    assert "ragged batch, 7 feature values for 2 samples of 4 features" in errors[1][2]
    assert errors[2][:2] == (5, 2) and "has_label has 1 entries for 2 labels" in errors[2][2]
    assert errors[3][:2] == (7, 1) and "missing label" in errors[3][2]
    assert (reply.accepted, reply.rejected, reply.received) == (3, 6, 9)
    assert stored(server) == [1, 3, 6]

    with grpc.insecure_channel(server.address) as channel:
        append = channel.stream_unary(f"/{pb.DESCRIPTOR.services_by_name['Ingest'].full_name}"
                                      "/Append")
        good = pb.SampleBatch(n_features=D, features=[7.0] * 4, labels=[2]).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            append(iter([good, b"\xff\xff not protobuf"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed batch: message at stream position 1" in info.value.details()
    assert stored(server) == [1, 3, 6, 7]


def test_non_numeric_input_is_refused_before_sending(start) -> None:
    server = start()
    with Producer(server.address) as producer:
        with pytest.raises(ValueError, match=r"x\[1, 2\]: 'n/a' is not a number"):
            producer.append([[1, 2, 3, 4], [1, 2, "n/a", 4]], [0, 1])
        with pytest.raises(ValueError, match=r"y\[0\]: 1.5 is not an integer"):
            producer.append(np.ones((1, D)), [1.5])
    assert server.spool.stats()["accepted"] == 0


def test_back_pressure_when_full(start) -> None:
    server = start(capacity=10, policy="reject")
    with Producer(server.address, batch=4) as producer:
        result = producer.append(*rows(25))
        assert (result.accepted, result.refused, result.first_refused) == (10, 15, 10)
        assert result.full
        again = producer.append(*rows(3, start=10))
        assert (again.accepted, again.refused, again.first_refused) == (0, 3, 0)
        server.spool.commit(server.spool.pending(limit=5).stop)  # the learner frees room
        resumed = producer.append(*rows(15, start=10))  # retry from first_refused
        assert (resumed.accepted, resumed.first_refused) == (5, 5)
        stats = producer.stats()
    assert stored(server) == list(range(5, 15))
    assert stats["refused"] >= 1 and stats["pending"] == 10 and stats["trained"] == 5


def test_back_pressure_counts_add_up_when_the_total_is_not_known(start) -> None:
    # fedstream feed streams a file of unknown length: one message of 200 rows into a
    # spool with room for 88 stores 88 and refuses the other 112.
    server = start(capacity=100, policy="reject")
    with Producer(server.address) as producer:
        producer.append(*rows(12))
        x, y = rows(200, start=12)
        result = producer.append_batches([(x, y, None, None)])
    assert (result.accepted, result.refused, result.first_refused) == (88, 112, 88)


def test_drop_oldest_via_the_service(start) -> None:
    server = start("tcp", capacity=10, policy="drop_oldest")
    with Producer(server.address, batch=4) as producer:
        result = producer.append(*rows(25))
    assert (result.accepted, result.dropped, result.refused) == (25, 15, 0)
    assert stored(server) == list(range(15, 25))
    stats = server.spool.stats()
    assert stats["accepted"] == stats["dropped"] + stats["pending"] == 25


def test_message_beyond_transport_limit_ends_the_call(start) -> None:
    server = start(max_message_bytes=1000)  # hard limit: 4000 bytes
    batches = [(*rows(2), None, None), (*rows(400, start=10), None, None)]
    producer = Producer(server.address, batch=1000, max_message_bytes=100_000)
    with producer, pytest.raises(IngestError, match="RESOURCE_EXHAUSTED"):
        producer.append_batches(batches)
    assert stored(server) == [0, 1], "batches before the huge one stay stored"


def test_unix_socket_housekeeping(start, short_dir: Path) -> None:
    (short_dir / "ingest.sock").touch()  # a plain file is not replaced
    with pytest.raises(IngestError, match="not a socket"):
        start()
    (short_dir / "ingest.sock").unlink()
    first = start()
    with pytest.raises(IngestError, match="another process is serving"):
        start()
    first.stop(None).wait()
    second = start()  # a stale socket left behind is replaced
    with Producer(second.address) as producer:
        assert producer.append(*rows(2)).accepted == 2
    with pytest.raises(IngestError, match="cannot reach the ingestion service"):
        Producer(f"unix://{short_dir}/nobody.sock", timeout=5).append(*rows(1))


# ------------------------------------------------------------------------ fedstream feed


def feed(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "feed", *args, "--quiet"],
        input=stdin, capture_output=True, text=True, timeout=60,
    )


def test_feed_csv_with_quirks_reports_bad_rows(start, tmp_path: Path) -> None:
    server = start(n_features=2)
    path = tmp_path / "sensors.csv"
    path.write_bytes(
        "\ufeff temp ; humidity ;status;\r\n"  # BOM, semicolons, padded names, trailing ;
        '21.5;"40";ok;\r\n'
        "\r\n"
        "22.0;oops;ok;\r\n"  # line 4: not a number
        "23;41,5;alarm;\r\n"  # a decimal comma, as a ';' file from a spreadsheet has them
        "24;42;;\r\n"  # line 6: missing label
        "25;43;ok\r\n".encode()
    )
    proc = feed(str(path), "--to", server.address, "--label", "status", "--classes", "ok,alarm")
    assert proc.returncode == 2, proc.stderr
    assert f"{path}:4: column 'humidity': 'oops' is not a number" in proc.stderr
    assert f"{path}:6: column 'status': missing label" in proc.stderr
    assert proc.stdout.startswith("3 accepted, 0 dropped, 0 refused (spool full), 2 malformed")
    pending = server.spool.pending()
    np.testing.assert_array_equal(pending.x, [[21.5, 40], [23, 41.5], [25, 43]])
    np.testing.assert_array_equal(pending.y, [0, 1, 0])


def test_feed_refuses_columns_the_device_cannot_store_before_sending(start, tmp_path) -> None:
    server = start(n_features=3)
    path = tmp_path / "two.csv"
    path.write_text("temp,hum,label\n" + "21,40,1\n" * 30)
    proc = feed(str(path), "--to", server.address)
    assert proc.returncode == 2, proc.stderr
    said = " ".join(proc.stderr.split())
    assert f"{path}: its rows have 2 features ('temp', 'hum'), and the device at " in said
    assert "stores samples of 3: name the 3 feature columns" in said
    assert server.spool.stats()["accepted"] == 0


def test_feed_jsonl_from_stdin(start) -> None:
    server = start("tcp", n_features=2, n_classes=3)
    lines = [
        '{"a": 1, "b": 2, "label": 0}',
        '{"a": 3, "b": 4.5, "label": 2}',
        "",
        '{"a": 5, "b": 6, "label": 7}',  # out of range: the service says so
        '{"a": 7, "b": 8, "label": 1}',
    ]
    proc = feed("-", "--to", server.address, "--format", "jsonl", stdin="\n".join(lines))
    assert proc.returncode == 2, proc.stderr
    assert "<stdin>:4: label out of range: 7 is not in [0, 3)" in proc.stderr
    assert "3 accepted" in proc.stdout
    np.testing.assert_array_equal(server.spool.pending().y, [0, 2, 1])

    # With --classes naming more classes than the device takes, the refused row's class is
    # named, not only its index.
    named = feed("-", "--to", server.address, "--format", "jsonl", "--classes", "ok,fault,warn,x",
                 stdin='{"a": 1, "b": 2, "label": "x"}\n')
    assert named.returncode == 2, named.stderr
    assert ("<stdin>:1: label out of range: 3 is not in [0, 3): 'x' is class 3 of --classes "
            "(4 names), and the device takes 3 (its stream.n_classes)"
            in " ".join(named.stderr.split()))

    clean = feed("-", "--to", server.address, "--features", "b,a", stdin=lines[0] + "\n")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("1 accepted, 0 dropped, 0 refused (spool full), 0 malformed")
    np.testing.assert_array_equal(server.spool.pending().x[-1], [2, 1])


def test_feed_exit_codes(start, tmp_path: Path) -> None:
    server = start(n_features=2, capacity=3)
    path = tmp_path / "many.csv"
    path.write_text("x,y,label\n" + "".join(f"{i},{i},0\n" for i in range(5)))
    full = feed(str(path), "--to", server.address, "--batch", "2")
    assert full.returncode == 3, full.stderr
    assert f"rows from {path}:5 on were not stored" in full.stderr
    assert full.stdout.startswith("3 accepted, 0 dropped, ")  # refused: read ahead, 1 or 2
    assert "refused (spool full), 0 malformed" in full.stdout
    missing = feed(str(path), "--to", server.address, "--label", "status")
    assert missing.returncode == 2 and "label column 'status' not found" in missing.stderr
    Spool(tmp_path / "other.db", 2).close()
    nobody = feed(str(path), "--to", f"unix://{tmp_path}/x.sock")
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr
    assert "--wait" in nobody.stderr  # the hint: the device may not be up yet
    late = feed(str(path), "--to", f"unix://{tmp_path}/x.sock", "--wait", "0.5")
    assert late.returncode == 1 and "not up after 0.5 s" in late.stderr


def test_feed_waits_for_a_device_that_comes_up_later(start, short_dir: Path) -> None:
    path = short_dir / "rows.csv"
    path.write_text("x,y,label\n1,2,0\n3,4,1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", str(path), "--to",
         f"unix://{short_dir}/ingest.sock", "--wait", "60", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(1.0)  # the producer is waiting before the service exists
    assert proc.poll() is None
    server = start(n_features=2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.startswith("2 accepted")
    np.testing.assert_array_equal(server.spool.pending().x, [[1, 2], [3, 4]])


def _feeding_two_rows(server) -> subprocess.Popen:
    """`fedstream feed -` on a live pipe that stays open, once its first two rows (file
    lines 2 and 3) are stored."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--to", server.address,
         "--quiet", "--batch", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write("x,y,label\n1,2,0\n3,4,1\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while len(stored(server)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "rows were not stored"
        time.sleep(0.05)
    return proc


def test_feed_says_what_was_sent_when_the_device_goes_away_mid_stream(
    start, short_dir: Path
) -> None:
    server = start(n_features=2)
    proc = _feeding_two_rows(server)
    server.stop(None)  # the device goes down; the producer still has rows to send
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write("5,6,0\n7,8,1\n")
        proc.stdin.flush()
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not flush it again
    _, err = proc.communicate(timeout=60)
    said = " ".join(err.split())
    assert proc.returncode == 1, err
    assert "the device went away during the feed:" in said and "rows were sent (to <stdin>:" in said
    assert "Once it is up, feed again from line " in said and "sed -n '1p;" in said
    assert len(stored(server)) >= 2  # what it stored before going away is kept


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_feed_ends_its_stream_and_says_where_to_go_on(
    start, sig: signal.Signals, code: int
) -> None:
    server = start(n_features=2)
    proc = _feeding_two_rows(server)  # and the pipe stays open: the input goes on
    proc.send_signal(sig)
    try:
        assert proc.wait(timeout=60) == code
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        proc.kill()
        proc.stdin.close()
    said = " ".join(err.split())
    assert out.startswith("2 accepted, 0 dropped"), out  # the device's own reply
    assert f"stopped ({sig.name}): the rows up to <stdin>:3 were sent, and the device's " \
        "counts above are for them" in said, said
    assert ("feed again from line 4, after the header (line 1): e.g. `cat FILE | sed -n "
            "'1p;4,$p'`") in said and "Traceback" not in err


def test_a_second_stop_leaves_at_once_saying_what_was_sent(start, monkeypatch) -> None:
    # A device that takes its time to store: the first stop waits for its reply, the
    # second does not.
    server = start(n_features=2)
    proc = _feeding_two_rows(server)
    release = threading.Event()
    real = server.spool.append
    monkeypatch.setattr(server.spool, "append", lambda *a: (release.wait(30), real(*a))[1])
    assert proc.stdin is not None
    proc.stdin.write("5,6,0\n")
    proc.stdin.flush()
    time.sleep(1.5)  # sent (after its second), and held by the device
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        release.set()
    said = " ".join(err.split())
    assert proc.returncode == 130, err
    assert "stopping: sending the rows already read" in said  # the first stop, said at once
    assert "stopped (SIGINT): 3 rows were sent (to <stdin>:4)" in said, said
    assert "may not be stored" in said and "Traceback" not in err


def _held_feed(server, monkeypatch, rows: str, close: bool) -> tuple[subprocess.Popen, Any]:
    """`fedstream feed -` whose device holds every batch until released: a stop then
    lands while the rows are with the device."""
    release = threading.Event()
    real = server.spool.append
    monkeypatch.setattr(server.spool, "append", lambda *a: (release.wait(30), real(*a))[1])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--to", server.address,
         "--quiet", "--batch", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write("x,y,label\n" + rows)
    proc.stdin.flush()
    if close:
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it again
    time.sleep(2.0)  # read, sent, and held by the device
    return proc, release


def test_a_stop_after_the_input_ended_names_no_line_to_go_on_from(start, monkeypatch) -> None:
    server = start(n_features=2)
    proc, release = _held_feed(server, monkeypatch, "1,2,0\n3,4,1\n5,6,0\n", close=True)
    proc.send_signal(signal.SIGINT)
    threading.Timer(0.5, release.set).start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out.startswith("3 accepted") and "feed again" not in err, err  # all was sent


def test_a_stop_behind_a_full_spool_names_the_first_row_refused(start, monkeypatch) -> None:
    server = start(n_features=2, capacity=2)
    rows = "".join(f"{i},0,{i % 2}\n" for i in range(6))  # lines 2 to 7
    proc, release = _held_feed(server, monkeypatch, rows, close=False)
    proc.send_signal(signal.SIGINT)
    threading.Timer(0.5, release.set).start()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        release.set()
    said = " ".join(err.split())
    assert proc.returncode == 3, err  # back-pressure's code, not the stop's
    assert out.startswith("2 accepted") and "rows from <stdin>:4 on were not stored" in said
    assert "feed again from" not in said, said  # no second, later line to go on from


def test_a_feed_stopped_while_rows_flow_names_the_very_next_row(start) -> None:
    """Rows written without pause: at the stop some are in flight. The line it names is
    the first the device did not store: feeding again from it stores every row once."""
    server = start(n_features=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--to", server.address,
         "--quiet", "--batch", "7"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None

    def write() -> None:  # row i (0-based) is on line i + 2, and its first value is i
        with contextlib.suppress(BrokenPipeError, ValueError, OSError):
            proc.stdin.write("x,y,label\n")
            for i in range(200_000):
                proc.stdin.write(f"{i},0,{i % 3}\n")
                if i % 50 == 0:
                    proc.stdin.flush()
                    time.sleep(0.001)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while len(stored(server)) < 500:
        assert time.monotonic() < deadline and proc.poll() is None, "rows were not stored"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
        assert proc.stderr is not None
        said = " ".join(proc.stderr.read().split())
    finally:
        proc.kill()
    assert code == 130, said
    named = re.search(r"feed again from line (\d+),", said)
    assert named, said
    # Every row before the line named was stored, once, in order; none after it.
    assert stored(server) == list(range(int(named.group(1)) - 2))


@pytest.mark.parametrize("how", ["sigterm", "width"])
def test_a_feed_from_a_pipe_left_open_exits_after_what_it_says(start, how: str) -> None:
    # `tail -f live.csv | fedstream feed -`: the writer keeps the pipe open, and the
    # reader thread is blocked in a read. Whatever ends the feed, it must exit.
    server = start(n_features=3 if how == "width" else 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--to", server.address,
         "--quiet", "--batch", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write("x,y,label\n1,2,0\n3,4,1\n")
    proc.stdin.flush()  # and left open
    try:
        if how == "sigterm":
            deadline = time.monotonic() + 60
            while len(stored(server)) < 2:
                assert time.monotonic() < deadline, "rows were not stored"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        said = " ".join(proc.stderr.read().split())
    finally:
        proc.kill()
        proc.stdin.close()
    if how == "sigterm":
        assert code == 143 and "stopped (SIGTERM): the rows up to <stdin>:3 were sent" in said, said
    else:
        assert code == 2 and "its rows have 2 features ('x', 'y')" in said, said
    assert "Fatal Python error" not in said


def test_a_feed_stopped_before_its_first_row_says_nothing_was_sent(start) -> None:
    server = start(n_features=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--to", server.address,
         "--quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60  # until it catches SIGTERM: waiting for a header

    def catches_term() -> bool:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1],
                     16)
        return bool(caught >> (signal.SIGTERM - 1) & 1)

    while not catches_term():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped (SIGTERM) before the input's first row: nothing was sent" in err


def test_a_tcp_port_in_use_is_refused_before_grpc_or_the_spool_is_touched(tmp_path: Path) -> None:
    """gRPC's own failed bind prints a C-core error line on the device's terminal."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(IngestError, match=f"127.0.0.1:{port}: the port is in use"):
            serve(tmp_path / "spool.db", 3, f"127.0.0.1:{port}")
    assert not (tmp_path / "spool.db").exists()


DEVICE_WITH_A_SMALL_DISK = """
import resource, signal, sys, time
from fedstream.client.ingest import serve
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
server = serve(sys.argv[1], address=sys.argv[2], n_features=2)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_feed_into_a_full_disk_says_the_line_to_go_on_from_and_loses_none(
    short_dir: Path,
) -> None:
    """The device's disk fills mid-feed (a real file-size limit: writes fail with EFBIG as
    with ENOSPC): the feed must name the first row not stored, and feeding again from
    it must give every row once."""
    spool, address = short_dir / "spool.db", f"unix://{short_dir}/ingest.sock"
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE_WITH_A_SMALL_DISK, str(spool), address, str(200_000)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert device.stdout is not None and device.stdout.readline() == "ready\n"
        path = short_dir / "rows.csv"
        rows = [f"{i},{i % 5},{i % 3}\n" for i in range(20_000)]
        rows[5] = "x,5,2\n"  # line 7: malformed, refused by the feed itself
        path.write_text("x,y,label\n" + "".join(rows))
        full = feed(str(path), "--to", address, "--batch", "500")
        said = " ".join(full.stderr.split())
        assert full.returncode == 3, full.stderr
        assert "could not store the samples from stream position" in said
        assert f"error: {path}:7: column 'x': 'x' is not a number" in said
        first = int(said.split("feed again from line ")[1].split(",")[0])
        assert f"the rows before {path}:{first} were stored, but for malformed ones" in said
    finally:
        device.kill()
        _, device_said = device.communicate(timeout=30)
    assert "the spool could not store samples" in device_said
    assert "(is the disk full" in device_said
    with Spool(spool, 2) as kept:
        ids = kept.pending().x[:, 0].astype(int).tolist()
    assert 0 < len(ids) < 20_000 and ids == [i for i in range(first - 2) if i != 5]
    # The disk has room again: fed from `first` on, as the feed said, every row is there once.
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE_WITH_A_SMALL_DISK, str(spool), address,
         str(resource.RLIM_INFINITY)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert device.stdout is not None and device.stdout.readline() == "ready\n"
        rest = short_dir / "rest.csv"
        rest.write_text("x,y,label\n" + "".join(rows[first - 2 :]))
        again = feed(str(rest), "--to", address)
        assert again.returncode == 0, again.stderr
    finally:
        device.kill()
        device.communicate(timeout=30)
    with Spool(spool, 2) as kept:
        assert kept.pending().x[:, 0].astype(int).tolist() == [i for i in range(20_000) if i != 5]

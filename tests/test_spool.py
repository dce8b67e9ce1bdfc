"""The spool: a durable, bounded buffer whose read offset is committed with the learner state.

Crashes are real here: child processes are killed with SIGKILL between reading and
committing, and while several of them write at once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedstream.client.spool import AppendResult, Spool, SpoolError

D = 5


def samples(n: int, start: int = 0, d: int = D) -> tuple[np.ndarray, np.ndarray]:
    """Row i holds the value start+i everywhere, so a row tells which sample it is."""
    ids = np.arange(start, start + n, dtype=np.float32)
    return np.repeat(ids[:, None], d, axis=1), (np.arange(start, start + n) % 3).astype(np.int64)


def ids(spool: Spool) -> list[int]:
    return spool.pending().x[:, 0].astype(int).tolist()


def check_invariant(spool: Spool) -> dict[str, int]:
    stats = spool.stats()
    assert stats["accepted"] == stats["trained"] + stats["dropped"] + stats["pending"], stats
    assert stats["pending"] == len(spool.pending()), stats
    return stats


def test_append_pending_commit_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "device.spool"
    spool = Spool(path, D)
    x, y = samples(10)
    t = np.linspace(1.7e9, 1.7e9 + 9, 10)
    assert spool.append(x, y, t) == AppendResult(accepted=10, dropped=0, refused=0)
    first = spool.pending(limit=4)
    assert (first.start, first.stop, len(first)) == (0, 4, 4)
    assert first.x.dtype == np.float32 and first.y.dtype == np.int64
    np.testing.assert_array_equal(first.x, x[:4])
    np.testing.assert_array_equal(first.y, y[:4])
    np.testing.assert_array_equal(first.t, t[:4])
    spool.commit(first.stop, {"learner": b"\x00state-1", "secagg": b"keys"})
    rest = spool.pending()
    assert (rest.start, rest.stop) == (4, 10)
    np.testing.assert_array_equal(rest.x, x[4:])
    spool.commit(rest.stop, {"learner": b"state-2"})
    empty = spool.pending()
    assert (empty.start, empty.stop, empty.x.shape) == (10, 10, (0, D))
    spool.close()

    again = Spool(path, D)  # everything persists across reopen
    assert again.state("learner") == b"state-2" and again.state("secagg") == b"keys"
    assert again.state("nothing") is None
    assert again.stats() == {
        "accepted": 10, "trained": 10, "dropped": 0, "refused": 0, "pending": 0, "offset": 10,
        "n_features": D,
    }
    # sequence numbers never repeat, even once every row is gone
    again.append(*samples(2, start=10))
    assert (again.pending().start, again.pending().stop) == (10, 12)


def test_commit_rules(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", D)
    spool.append(*samples(6))
    spool.commit(3)
    with pytest.raises(SpoolError, match="behind the committed offset 3"):
        spool.commit(2)
    with pytest.raises(SpoolError, match="beyond the last appended"):
        spool.commit(7)
    with pytest.raises(SpoolError, match="state must map str to bytes"):
        spool.commit(6, {"learner": "not bytes"})  # type: ignore[dict-item]
    assert spool.stats()["offset"] == 3 and ids(spool) == [3, 4, 5], "a failed commit is undone"
    spool.commit(3)  # re-committing the same offset is a no-op
    check_invariant(spool)


def test_mismatched_n_features_on_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Spool(path, 32).close()
    with pytest.raises(SpoolError) as info:
        Spool(path, 31)
    assert "32" in str(info.value) and "31" in str(info.value)


def test_bad_input_is_refused_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", 2)
    with pytest.raises(SpoolError, match="numeric"):
        spool.append(np.array([[1.0, "x"]], dtype=object), np.array([0]))
    with pytest.raises(SpoolError, match=r"shape \(n, 2\)"):
        spool.append(np.ones((3, 3)), np.zeros(3, dtype=int))
    with pytest.raises(SpoolError, match="sample 1: non-finite"):
        spool.append(np.array([[1.0, 2.0], [np.nan, 0.0]]), np.array([0, 1]))
    with pytest.raises(SpoolError, match="integer class indices"):
        spool.append(np.ones((1, 2)), np.array([0.5]))
    assert spool.stats()["accepted"] == 0 and len(spool.pending()) == 0


def test_capacity_reject_refuses_the_tail(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", D, capacity=10, policy="reject")
    assert spool.append(*samples(7)) == AppendResult(7, 0, 0)
    assert spool.append(*samples(7, start=7)) == AppendResult(accepted=3, dropped=0, refused=4)
    assert ids(spool) == list(range(10)), "the head that fits is stored, the tail is not"
    assert spool.append(*samples(1, start=14)) == AppendResult(0, 0, 1)
    spool.commit(spool.pending(limit=4).stop)  # training frees room
    assert spool.append(*samples(5, start=20)) == AppendResult(4, 0, 1)
    assert ids(spool) == [*range(4, 10), 20, 21, 22, 23]
    stats = check_invariant(spool)
    assert (stats["refused"], stats["dropped"], stats["pending"]) == (6, 0, 10)


def test_capacity_drop_oldest_counts_every_drop(tmp_path: Path) -> None:
    path = tmp_path / "s"
    spool = Spool(path, D, capacity=10, policy="drop_oldest")
    spool.append(*samples(7))
    assert spool.append(*samples(7, start=7)) == AppendResult(accepted=7, dropped=4, refused=0)
    assert ids(spool) == list(range(4, 14))
    reading = spool.pending(limit=3)  # a learner is training on 4, 5, 6 ...
    assert spool.append(*samples(25, start=100)) == AppendResult(25, dropped=25, refused=0)
    assert ids(spool) == list(range(115, 125)), "only the newest `capacity` are kept"
    spool.commit(reading.stop)  # ... whose rows were dropped meanwhile: nothing to count
    stats = check_invariant(spool)
    assert (stats["accepted"], stats["dropped"], stats["trained"]) == (39, 29, 0)
    spool.close()
    reopened = Spool(path, D, capacity=4, policy="drop_oldest")  # capacity is per process
    assert reopened.append(*samples(1, start=200)).dropped == 7
    assert ids(reopened) == [122, 123, 124, 200]
    check_invariant(reopened)


# --------------------------------------------------------------------------- crashes

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from fedstream.client.spool import Spool

    path, mode = sys.argv[1], sys.argv[2]
    spool = Spool(path, {d})
    if mode in ("die_before_commit", "hang_after_commit"):
        batch = spool.pending()
        model = batch.x.sum()  # "training"
        if mode == "die_before_commit":
            print("trained", len(batch), flush=True)
            os._exit(1)
        spool.commit(batch.stop, {{"learner": b"after %d" % batch.stop}})
        print("committed", flush=True)
        time.sleep(60)  # killed with SIGKILL here
    elif mode == "producer":
        rng = np.random.default_rng(0)
        while True:
            n = int(rng.integers(1, 60))
            spool.append(rng.random((n, {d}), dtype=np.float32), rng.integers(0, 3, n))
    elif mode == "learner":
        while True:
            batch = spool.pending(limit=int(np.random.default_rng().integers(1, 50)))
            spool.commit(batch.stop, {{"learner": os.urandom(64)}})
    """
).format(d=D)


def child(path: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_killed_before_commit_retrains_after_commit_never(tmp_path: Path) -> None:
    path = tmp_path / "s"
    spool = Spool(path, D)
    x, y = samples(50)
    spool.append(x, y)

    proc = child(path, "die_before_commit")
    out, errors = proc.communicate(timeout=30)
    assert proc.returncode == 1 and out.strip() == "trained 50", errors
    again = spool.pending()
    assert (again.start, again.stop) == (0, 50), "a crash before commit trains them again"
    np.testing.assert_array_equal(again.x, x)
    assert spool.state("learner") is None

    proc = child(path, "hang_after_commit")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "committed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(spool.pending()) == 0, "a committed round never trains them again"
    assert spool.state("learner") == b"after 50"
    stats = check_invariant(spool)
    assert (stats["trained"], stats["offset"]) == (50, 50)


def test_invariant_survives_sigkill_of_concurrent_writers(tmp_path: Path) -> None:
    """A producer and a learner in two processes hammer one spool (drops included) and
    are killed mid-flight; the counters still add up and every row is accounted for."""
    path = tmp_path / "s"
    spool = Spool(path, D, capacity=200, policy="drop_oldest")
    spool.append(*samples(10))
    writers = [child(path, "producer"), child(path, "learner")]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and spool.stats()["trained"] < 300:
            assert all(p.poll() is None for p in writers), writers[0].stderr
            spool.append(*samples(150, start=1000))  # this process drops oldest too
            time.sleep(0.05)
    finally:
        for proc in writers:
            proc.send_signal(signal.SIGKILL)
        for proc in writers:
            proc.wait(timeout=30)
    spool.close()
    reopened = Spool(path, D, capacity=200, policy="drop_oldest")
    stats = check_invariant(reopened)
    assert stats["trained"] >= 300 and stats["dropped"] > 0, stats
    pending = reopened.pending()
    if len(pending):
        assert pending.start >= stats["offset"]
        assert pending.stop - pending.start == len(pending), "pending rows are contiguous"


def test_a_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # It holds the device's raw samples and its secure-aggregation keys.
    path = tmp_path / "spool.db"
    spool = Spool(path, 2)
    spool.append(np.zeros((3, 2), np.float32), np.array([0, 1, 0]))
    files = [path, path.with_name("spool.db-wal"), path.with_name("spool.db-shm")]
    assert [oct(p.stat().st_mode & 0o777) for p in files] == ["0o600"] * 3
    spool.close()
    path.chmod(0o644)  # made by an older fedstream, or copied in
    Spool(path, 2).close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"

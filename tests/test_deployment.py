"""A real deployment on 127.0.0.1: `fedstream server` and `fedstream client` processes.

Flower's SuperLink and SuperNodes run as separate processes with TLS and SuperNode
authentication; producers push samples through each device's ingestion service. The test
kills a client and the server with SIGKILL and checks that the run still reaches its last
round and that every accepted sample was trained exactly once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from waiting import wait_until

from fedstream.client.ingest import Producer
from fedstream.client.spool import Spool
from fedstream.protocol import model_file
from fedstream.protocol.runtime import free_port
from fedstream.server.deploy_app import fingerprint
from fedstream.server.privacy import Ledger, releases_of

pytestmark = pytest.mark.slow

CONFIG = """\
[federation]
clients = 3
min_clients = 3
rounds = 3
round_timeout = 120.0
[stream]
n_features = 8
n_classes = 3
classes = ["low", "mid", "high"]  # as the feeds' --classes: names for model.pt
features = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"]  # the feeds' column order
budget = 20
[learner]
model = "logreg"
[secure_aggregation]
enabled = true
[privacy]
enabled = true
delta = 0.01
"""


@pytest.fixture
def work():
    # Unix socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="fsd", dir="/tmp"))
    yield path
    if os.environ.get("FEDSTREAM_KEEP_DEPLOYMENT"):  # for debugging a failed run
        return
    shutil.rmtree(path, ignore_errors=True)


def fedstream(*args: str, log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", *args], cwd=cwd,
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL a command and every process it started (its session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def records(work: Path) -> list[dict]:
    path = work / "srv" / "results" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpointed(work: Path) -> int:
    return max((r["checkpoint_round"] for r in records(work) if "checkpoint_round" in r),
               default=0)


def test_server_and_clients_survive_kill_9(work: Path) -> None:
    (work / "cfg.toml").write_text(CONFIG)
    made = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "certs", "creds",
         "--node", "n0", "--node", "n1", "--node", "n2"],
        cwd=work, capture_output=True, text=True, timeout=60,
    )
    assert made.returncode == 0, made.stderr
    port = free_port()
    server_args = ["server", "--state", "srv", "--credentials", "creds", "--config", "cfg.toml",
                   "--port", str(port)]
    server = fedstream(*server_args, log=work / "server.log", cwd=work)

    def client(i: int) -> subprocess.Popen:
        return fedstream(
            "client", "--server", f"127.0.0.1:{port}", "--state", f"c{i}", "--client-id", str(i),
            "--config", "cfg.toml", "--ca", "creds/ca.crt", "--key", f"creds/n{i}.key",
            log=work / f"client{i}.log", cwd=work,
        )

    procs = [server]
    wait_until(lambda: (work / "srv" / "run-id").exists(), "the server", 120)
    clients = [client(i) for i in range(3)]
    procs += clients
    try:
        for i in range(3):  # each device is fed by its own producer
            sock = work / f"c{i}" / "ingest.sock"
            wait_until(sock.exists, f"client {i}'s ingestion service", 60)
            rng = np.random.default_rng(i)
            x = rng.normal(size=(200, 8)).astype(np.float32)
            with Producer(f"unix://{sock}") as producer:
                assert producer.append(x, (x[:, 0] > 0) + (x[:, 1] > 0).astype(int)).accepted == 200

        wait_until(lambda: checkpointed(work) >= 1, "round 1", 600)
        # The run's log is written as the run goes, not only once it ends.
        wait_until(lambda: any(p.stat().st_size for p in (work / "srv" / "logs").glob("run-*")),
                   "the run's log", 60)
        kill9(clients[1])  # mid-round 2: the device and its ClientApp die
        clients[1] = client(1)
        procs.append(clients[1])

        wait_until(lambda: checkpointed(work) >= 2, "round 2", 600)
        kill9(server)  # the SuperLink and the ServerApp die
        last = checkpointed(work)
        sha = next(r["model_sha256"] for r in records(work) if r.get("checkpoint_round") == last)
        server = fedstream(*server_args, "--resume", log=work / "server.log", cwd=work)
        procs.append(server)
        assert server.wait(timeout=600) == 0, (work / "server.log").read_text()[-3000:]
    finally:
        for proc in procs:
            kill9(proc)

    run_logs = sorted((work / "srv" / "logs").glob("run-*.log"))
    assert len(run_logs) == 2, run_logs  # the crashed run's log is kept, the resumed one's too
    assert all("\x1b[" not in p.read_text() for p in run_logs)
    # The restarted device still held the mask key it had offered (kept in its spool).
    assert "keys not held" not in (work / "client1.log").read_text()
    for i in (0, 2):  # the devices that lived through the server's crash say they are back
        said = (work / f"client{i}.log").read_text()
        assert said.count("connected to the server at") >= 2, said[-3000:]
    recs = records(work)
    resumed = next(r for r in recs if "resumed_after_round" in r)
    assert resumed["resumed_after_round"] == last and resumed["model_sha256"] == sha
    assert sorted(r["round"] for r in recs if "round" in r) == [1, 2, 3]
    summary = json.loads((work / "srv" / "results" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["secure_aggregation"] is True
    assert summary["rounds_aggregated"] == 3
    assert len(summary["accuracy_per_round"]) == 3  # across the crash and the resume
    assert summary["cumulative_accuracy"][-1] == pytest.approx(summary["prequential_accuracy"])
    saved = model_file.load(work / "srv" / "results")  # the latest global model, as a file
    assert saved.server_round == 3 and saved.classes == ("low", "mid", "high")
    assert saved.features == tuple(f"f{j}" for j in range(8))
    assert fingerprint(ArrayRecord(saved.state_dict)) == summary["model_sha256"]
    # Differential privacy's ledger came back with the checkpoint: round 3's epsilon is
    # that of all three rounds (the clients added the noise, as under secure aggregation).
    spent = Ledger(0.01, releases_of(r["privacy"] for r in recs if "round" in r))
    assert summary["privacy"]["releases"] == spent.releases == 3
    assert summary["privacy"]["noise_at"] == "clients"
    assert summary["privacy"]["epsilon"] == pytest.approx(spent.epsilon)
    said = (work / "server.log").read_text()
    assert "client updates" in said  # the server prints it, and a line a round as it goes
    assert "round 3/3: " in said and "devices, aggregated" in said
    for i in range(3):
        spool = Spool(work / f"c{i}" / "spool.db", 8)
        stats, ledger = spool.stats(), spool.ledger()
        # Exactly once: commits cover contiguous, disjoint ranges from the first sample on,
        # and everything accepted is either trained or still pending.
        assert ledger and ledger[0][0] == 0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ledger))
        assert stats["trained"] == sum(n for _, _, n, _ in ledger) == ledger[-1][1]
        assert stats["accepted"] == stats["trained"] + stats["pending"] == 200
        assert stats["dropped"] == 0


def test_unregistered_untrusted_and_plaintext_clients_are_refused(work: Path) -> None:
    (work / "cfg.toml").write_text(CONFIG)
    subprocess.run([sys.executable, "-m", "fedstream.cli.main", "certs", "creds", "--node", "n0",
                    "--node", "n1", "--node", "n2"],
                   cwd=work, check=True, capture_output=True, timeout=60)
    subprocess.run([sys.executable, "-m", "fedstream.cli.main", "certs", "other", "--node", "x"],
                   cwd=work, check=True, capture_output=True, timeout=60)
    port = free_port()
    # Fewer keys than a round waits for (min_clients = 3): refused, nothing left running.
    few = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "server", "--state", "few",
         "--credentials", "creds", "--config", "cfg.toml", "--port", str(port),
         "--node-key", "creds/n0.pub"], cwd=work, capture_output=True, text=True, timeout=120)
    assert few.returncode == 2, few.stderr
    assert "1 device key registered, but a round waits for 3 devices" in " ".join(
        few.stderr.split())
    server = fedstream("server", "--state", "srv", "--credentials", "creds", "--config",
                       "cfg.toml", "--port", str(port), log=work / "server.log", cwd=work)
    try:
        wait_until(lambda: (work / "srv" / "run-id").exists(), "the server", 120)
        cases = {  # each refused, and the device's terminal says why
            "unregistered key": (["--ca", "creds/ca.crt", "--key", "other/x.key"],
                                 "it is not registered there"),
            "no key": (["--ca", "creds/ca.crt"], "this one has no key: pass --key"),
            "wrong CA": (["--ca", "other/ca.crt", "--key", "creds/n0.key"],
                         "CERTIFICATE_VERIFY_FAILED"),
            "no TLS": (["--insecure"], "--insecure against a TLS server?"),
        }
        for name, (extra, why) in cases.items():
            proc = subprocess.run(
                [sys.executable, "-m", "fedstream.cli.main", "client", "--server",
                 f"127.0.0.1:{port}", "--state", f"c-{name[:2]}", "--client-id", "0",
                 "--config", "cfg.toml", "--max-wait", "10", *extra],
                cwd=work, capture_output=True, text=True, timeout=120,
            )
            assert proc.returncode != 0, name
            assert why in proc.stderr and "fork_posix" not in proc.stderr, (name, proc.stderr)
            exited = [x for x in proc.stderr.splitlines() if "SuperNode exited" in x]
            if name == "unregistered key" and exited:  # retried within --max-wait (a slow
                # machine may give up at the first exit): said briefly, keys may be coming
                assert "has not activated this device's key yet" in exited[0], proc.stderr
    finally:
        kill9(server)

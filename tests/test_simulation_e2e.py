"""End to end: `fedstream sim` on Flower's simulation engine (Ray), as a user runs it.

These start Ray, so they are few and marked slow; CI runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SMALL = [
    "--set", "federation.clients=4",
    "--set", "federation.rounds=3",
    "--set", "stream.rate=12.0",
    "--set", "learner.hidden=[16]",
    "--set", "drift.at=[2.0]",
]


def fedstream(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = fedstream(
        "sim", *SMALL, "--set", "evaluation.every=1", "--baselines", "--quiet", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "federated" in proc.stdout and "centralized" in proc.stdout
    assert "Drift detection: " in proc.stdout
    return out


def test_results_folder_has_the_contract(small_run: Path) -> None:
    summary = json.loads((small_run / "summary.json").read_text())
    for key in ("rounds", "clients", "prequential_accuracy", "wall_seconds", "client_updates",
                "samples_seen", "bytes_up", "bytes_down"):
        assert key in summary, key
    assert summary["rounds"] == 3 and summary["clients"] == 4
    assert summary["client_updates"] == 12
    assert 0.0 <= summary["prequential_accuracy"] <= 1.0
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    for name in ("local", "centralized"):
        base = summary["baselines"][name]
        assert 0.0 <= base["prequential_accuracy"] <= 1.0
        assert base["samples_seen"] == summary["samples_seen"]  # the very same streams
    lines = (small_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert sum(r["examples"] for r in records) == summary["samples_seen"]
    assert set(records[0]["clients"]) == {"0", "1", "2", "3"}
    assert all(0.0 <= r["global_eval"]["accuracy"] <= 1.0 for r in records)
    assert "global_eval" in summary
    assert (small_run / "config.toml").read_text().count("clients = 4") == 1
    assert all("offset" in rep for r in records for rep in r["clients"].values())
    assert len(summary["client_drift_times"]) == 4  # drift at 2, staggered per client
    assert summary["accuracy_per_round"] == [r["accuracy"] for r in records]
    assert summary["cumulative_accuracy"][-1] == pytest.approx(summary["prequential_accuracy"])
    # The trivial predictors, on the same samples, as the records sum them.
    for key in ("no_change", "majority"):
        right = sum(r[f"{key}_correct"] for r in records)
        assert summary[f"{key}_accuracy"] == right / summary["samples_seen"]
        for r in records:  # and per client, in plaintext
            assert r[f"{key}_correct"] == sum(c[f"{key}_correct"] for c in r["clients"].values())
    ours, theirs = summary["prequential_accuracy"], summary["no_change_accuracy"]
    assert summary["kappa_temporal"] == pytest.approx((ours - theirs) / (1 - theirs))
    # The local baseline learns the very same streams: the same trivial predictors. The
    # centralized one interleaves them: its own.
    local, central = summary["baselines"]["local"], summary["baselines"]["centralized"]
    assert local["no_change_accuracy"] == summary["no_change_accuracy"]
    assert local["majority_accuracy"] == summary["majority_accuracy"]
    assert 0 <= central["no_change_accuracy"] <= 1 and central["kappa_temporal"] is not None
    # Per class, as the records sum them: every sample once, every right one once.
    per_class = summary["per_class"]
    for row, key in (("labels", "samples"), ("predicted", "predicted"), ("right", "right")):
        by_round = np.sum([r["classes"][row] for r in records], axis=0)
        assert by_round.tolist() == [c[key] for c in per_class.values()]
    assert sum(c["right"] for c in per_class.values()) == sum(r["correct"] for r in records)
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    assert summary["balanced_accuracy"] == pytest.approx(sum(recalls) / len(recalls))
    assert all(0 <= b["balanced_accuracy"] <= 1 for b in (local, central))
    found = summary["drift_detection"]
    assert found["detected"] + found["missed"] == found["client_drifts"] <= 4
    detections = sum(len(r["drifts"]) for r in records)
    assert found["detected"] + found["false_alarms"] == detections
    for plot in ("accuracy.png", "clients.png"):
        assert (small_run / "plots" / plot).stat().st_size > 10_000


def test_the_final_model_is_saved_and_scores_as_the_run_said(small_run: Path) -> None:
    from flwr.app import ArrayRecord

    from fedstream.protocol import model_file
    from fedstream.protocol.config import load
    from fedstream.sim.evaluation import make_evaluate

    saved = model_file.load(small_run)
    assert saved.server_round == 3 and saved.model == "mlp" and saved.hidden == (16,)
    assert saved.classes == tuple(str(i) for i in range(10))  # the synthetic default's
    cfg = load(small_run / "config.toml")
    again = make_evaluate(cfg)(3, ArrayRecord(saved.state_dict))
    summary = json.loads((small_run / "summary.json").read_text())
    assert again == pytest.approx(summary["global_eval"])  # the model it evaluated last


def test_same_seed_same_results(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    proc = fedstream("sim", *SMALL, "--set", "evaluation.every=1", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = [json.loads(x) for x in (small_run / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(first, second, strict=True):
        for rec in (a, b):
            rec.pop("seconds")
            for c in rec["clients"].values():
                c.pop("train_seconds")
        assert a == b


def test_secure_aggregation_costs_no_accuracy(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "secure"
    proc = fedstream("sim", *SMALL, "--set", "evaluation.every=1", "--set",
                     "secure_aggregation.enabled=true", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads((small_run / "summary.json").read_text())
    secure = json.loads((out / "summary.json").read_text())
    assert secure["secure_aggregation"] is True and plain["secure_aggregation"] is False
    assert secure["samples_seen"] == plain["samples_seen"]
    assert abs(secure["prequential_accuracy"] - plain["prequential_accuracy"]) < 0.005
    assert secure["round_trips"] == 3 + 2 + 2  # keys once, then two trips a round
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["secure"] and r["clients"] == {} for r in records)


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_failing_clients_do_not_stop_the_federation(tmp_path: Path, secure: bool) -> None:
    out = tmp_path / "flaky"
    proc = fedstream(
        "sim", *SMALL, "--set", "simulation.dropout=0.4", "--set", 'federation.strategy="fedadam"',
        "--set", "federation.server_lr=0.05",
        "--set", f"secure_aggregation.enabled={str(secure).lower()}", "--quiet", "--out", str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ClientUnavailable" not in proc.stderr  # a planned dropout is not an error to log
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    failures = [f for r in records for f in r["failures"]]
    assert failures, "a 40% dropout over 12 client rounds must fail someone"
    assert all("offline" in f["reason"] and f["client"] in range(4) for f in failures)
    assert summary["client_failures"] == len(failures)
    assert summary["client_updates"] == 12 - len(failures)


def test_a_run_that_aggregates_no_round_says_why_and_fails(tmp_path: Path) -> None:
    # Valid settings, but with 90 % of the clients offline no secure round has the 3 of 4
    # survivors it needs: each round says so, and the run exits non-zero.
    out = tmp_path / "none"
    proc = fedstream(
        "sim", *SMALL, "--set", "simulation.dropout=0.9", "--set", "federation.rounds=2",
        "--set", "secure_aggregation.enabled=true", "--quiet", "--out", str(out),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "no round was aggregated" in proc.stderr
    assert "2 of 2 rounds were not aggregated" in proc.stdout
    assert "survived, threshold is 3" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_aggregated"] == 0
    assert sum(e["rounds"] for e in summary["aggregation_errors"]) == 2
    # In Python, `simulate` returns this summary and warns on stderr with its first reason.
    from fedstream.sim.runner import unaggregated

    said = unaggregated(summary)
    assert said is not None and said.startswith("fedstream: warning: no round was aggregated")
    assert summary["aggregation_errors"][0]["reason"] in said
    assert unaggregated({**summary, "rounds_aggregated": 1}) is None
    assert unaggregated({**summary, "rounds": 0}) is None


RAY = Path(sys.executable).parent / "ray"


@pytest.mark.skipif(not RAY.exists(), reason="ray CLI not installed beside this Python")
def test_joins_an_existing_ray_cluster(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="fsray")  # Unix socket paths must stay under 108 bytes
    # The head's workers have another table cache than the driver: they must read the
    # driver's (the ClientApp carries its folder), not parse the file again into theirs.
    heads, drivers = tmp_path / "head-cache", tmp_path / "driver-cache"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "FEDSTREAM_CACHE_DIR": str(heads)}
    data = tmp_path / "d.csv"
    rng = np.random.default_rng(0)
    data.write_text("a,b,c,label\n" + "".join(
        f"{x:.3f},{y:.3f},{z:.3f},{int(x + y > 0) + int(z > 1)}\n"
        for x, y, z in rng.normal(size=(400, 3))))
    # --block keeps the head in the foreground, so this test owns (and stops) only its own
    # cluster; `ray stop` would stop every Ray on the machine.
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        _wait_for_ray(address, env)
        out = tmp_path / "cluster"
        proc = fedstream("sim", *SMALL, "--set", 'federation.strategy="fedyogi"',
                         "--set", "federation.fraction=0.5", "--quiet", "--ray-address", address,
                         "--set", f'stream.path="{data}"', "--out", str(out),
                         env={"RAY_TMPDIR": ray_tmp, "FEDSTREAM_CACHE_DIR": str(drivers)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["client_updates"] == 6  # half the clients sampled each round
        assert any(drivers.iterdir()) and not (heads.exists() and any(heads.iterdir()))
        # the cluster we joined is still up afterwards: the simulation did not own it
        assert _ray_status(address, env) == 0
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _ray_status(address: str, env: dict[str, str]) -> int:
    cmd = [str(RAY), "status", f"--address={address}"]
    return subprocess.run(cmd, capture_output=True, timeout=60, env=env).returncode


def _wait_for_ray(address: str, env: dict[str, str], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while _ray_status(address, env) != 0:
        assert time.monotonic() < deadline, f"Ray head at {address} did not come up"
        time.sleep(1.0)


def test_ctrl_c_stops_the_run_at_once_and_keeps_the_rounds_done(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "sim", "--quiet", "--out", str(out),
         "--set", "federation.clients=2", "--set", "federation.rounds=1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and proc.poll() is None, "no round finished"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted: the rounds done so far are in" in err
    assert metrics.read_text().count("\n") >= 2 and not (out / "summary.json").exists()


@pytest.mark.slow  # a file large enough to still be read when the signal comes
def test_an_interrupt_while_the_data_is_read_says_nothing_was_written(tmp_path: Path) -> None:
    import numpy as np

    data = tmp_path / "big.csv"
    rows = np.random.default_rng(0).normal(size=(1_500_000, 4))
    np.savetxt(data, np.c_[rows, rows[:, 0] > 0], fmt="%.3f", delimiter=",",
               header="a,b,c,d,label", comments="")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "sim", "--quiet", "--out", str(out),
         "--set", f'stream.path="{data}"', "--set", "federation.clients=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        time.sleep(4.0)  # the config is read; the file's 1.5M rows take longer
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "interrupted: before the run started: nothing was written" in err


def test_an_interrupt_before_any_round_says_none_finished(tmp_path: Path) -> None:
    from fedstream.cli.main import _done_so_far

    assert _done_so_far(tmp_path) == "no round had finished"
    (tmp_path / "metrics.jsonl").write_text("")  # made at the start of every run
    assert _done_so_far(tmp_path) == "no round had finished"
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n')
    assert _done_so_far(tmp_path).startswith("the rounds done so far are in")


INTERRUPTED_SCRIPT = """
import _thread, os, signal, sys, threading, time
from pathlib import Path
from fedstream.protocol.config import load
from fedstream.sim.runner import simulate

out = Path(sys.argv[1])
metrics = out / "metrics.jsonl"

def ctrl_c():
    while not (metrics.exists() and metrics.read_text().count("\\n") >= 2):
        time.sleep(0.1)
    if sys.argv[2] == "signal":
        os.kill(os.getpid(), signal.SIGINT)
    else:  # what a notebook's interrupt button or a watchdog thread does
        _thread.interrupt_main()

threading.Thread(target=ctrl_c, daemon=True).start()
base = [f'output.dir="{out}"', "output.progress=false", "federation.clients=2"]
try:
    simulate(load(None, [*base, "federation.rounds=1000"]))
except KeyboardInterrupt:
    print("interrupted", flush=True)
summary = simulate(load(None, [*base, "federation.rounds=3"]))
print("second run", summary["rounds"], flush=True)
print("left", [t.name for t in threading.enumerate() if not t.daemon], flush=True)
print("breakpoint", os.environ.get("PYTHONBREAKPOINT"), flush=True)
"""


@pytest.mark.parametrize("how", ["signal", "interrupt_main"])
def test_a_python_script_can_stop_a_run_and_start_another(tmp_path: Path, how: str) -> None:
    # The engine leaves the ServerApp's thread running after a KeyboardInterrupt: it used
    # to write the stopped run's next round into the second run's metrics.jsonl, and to
    # keep the script from ending for up to a round timeout. Interrupted inside the engine,
    # its workers waited on Ray for good: the next run could crash, or the script hang at
    # its end; and `_thread.interrupt_main` was not seen until the whole run was over.
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_SCRIPT, str(out), how],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interrupted" in proc.stdout and "second run 3" in proc.stdout, proc.stdout
    assert "left ['MainThread']" in proc.stdout  # no engine thread outlives its run
    assert "breakpoint None" in proc.stdout  # Ray's debugger hook left with Ray
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").open()]
    assert rounds == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3

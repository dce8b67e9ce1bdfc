"""The `fedstream` command refuses bad input before anything runs, with file, line, key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def fedstream(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "sensors.csv"
    path.write_text("temp,humidity,label\n21.5,40,ok\n22.0,41,ok\n35.1,oops,alarm\n")
    return path


def test_unparseable_csv_row_names_file_line_and_column(csv_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = fedstream("sim", "--set", "stream.source=csv", "--set", f'stream.path="{csv_file}"',
                     "--out", str(out))
    assert proc.returncode == 2
    assert f"{csv_file}:4" in proc.stderr and "humidity" in proc.stderr and "oops" in proc.stderr
    assert not out.exists(), "nothing may run (or be written) on bad input"


def test_missing_label_column_lists_the_columns(csv_file: Path) -> None:
    proc = fedstream("sim", "--set", "stream.source=csv", "--set", f'stream.path="{csv_file}"',
                     "--set", "stream.label=status")
    assert proc.returncode == 2
    assert "'status'" in proc.stderr and "'humidity'" in proc.stderr


def test_relative_csv_path_is_resolved(csv_file: Path) -> None:
    proc = fedstream("config", "show", "--set", "stream.source=csv",
                     "--set", f'stream.path="{csv_file.name}"', cwd=csv_file.parent)
    assert proc.returncode == 0, proc.stderr
    assert f'path = "{csv_file}"' in proc.stdout


def test_version_and_exit_codes_are_told() -> None:
    proc = fedstream("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fedstream 0.")
    assert "flwr 1." in proc.stdout
    assert "Exit codes: 0 done; 1 the run failed; 2 bad input" in " ".join(
        fedstream("--help").stdout.split())


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "fed.toml"
    cfg.write_text("[federation]\nclients = 5\n\n[learner]\nlearning_rate = 0.1\n")
    proc = fedstream("sim", "--config", str(cfg))
    assert proc.returncode == 2
    assert "learner.learning_rate: unknown key" in proc.stderr
    assert f"invalid config ({cfg})" in " ".join(proc.stderr.split())  # which file


def test_broken_model_factory_stops_before_ray(tmp_path: Path) -> None:
    proc = fedstream("sim", "--set", "learner.model=no_such_module:factory")
    assert proc.returncode == 2
    assert "no_such_module:factory" in proc.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="needs a machine without CUDA"
)
def test_a_device_this_machine_lacks_stops_before_ray(tmp_path: Path) -> None:
    proc = fedstream("sim", "--set", "learner.device=cuda", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "learner.device is 'cuda' but CUDA is not available here" in proc.stderr
    assert "ray::" not in proc.stderr  # no virtual client was started


def test_a_results_folder_another_run_is_writing_into_is_refused(tmp_path: Path) -> None:
    # Two runs into one folder mixed their rounds in one metrics.jsonl, and one printed the
    # other's figures.
    import os

    from fedstream.sim.results import ResultsFolderBusy, claimed

    out = tmp_path / "res"
    with claimed(out):
        proc = fedstream("sim", "--quiet", "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        assert f"is in use by another fedstream run (pid {os.getpid()})" in proc.stderr
        assert not (out / "metrics.jsonl").exists()
    with claimed(out):  # released when its run ends
        pass
    assert ResultsFolderBusy.__mro__[1] is ValueError  # Python callers catch ValueError


def _as_a_user(*args: str) -> subprocess.CompletedProcess:
    """`fedstream` without root's override of file permissions (as most users run it)."""
    import os
    import shutil

    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: permissions cannot be tested")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    return subprocess.run([*prefix, sys.executable, "-m", "fedstream.cli.main", *args],
                          capture_output=True, text=True, timeout=120)


def test_paths_through_a_closed_folder_are_named_not_a_traceback(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0)
    try:
        proc = _as_a_user("sim", "--quiet", "--out", str(closed / "sub"))
        assert proc.returncode == 2, proc.stderr
        assert f"output.dir: cannot reach {closed / 'sub'} (permission denied" in proc.stderr
        proc = _as_a_user("sim", "--quiet", "--set", f'stream.path="{closed / "d.csv"}"')
        assert proc.returncode == 2, proc.stderr
        assert "stream.path: cannot reach" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        closed.chmod(0o755)


def test_brackets_in_names_are_printed_as_they_are(tmp_path: Path) -> None:
    # Units in brackets are common in spreadsheet headers; the error printer must not read
    # "[hPa]" as a style tag and drop it.
    data = tmp_path / "wetter.csv"
    data.write_text("Temperatur [°C];Druck [hPa];Klasse\n21,5;1013;ok\n22,0;1012;warm\n",
                    encoding="utf-8")
    proc = fedstream("sim", "--set", "stream.source=csv", "--set", f'stream.path="{data}"',
                     "--set", "stream.label=Klasse", "--set", 'stream.features=["Druck [hpa]"]')
    assert proc.returncode == 2
    assert "'Druck [hpa]'" in proc.stderr and "'Druck [hPa]'" in proc.stderr


def test_a_list_of_bare_names_gets_a_quoting_hint() -> None:
    proc = fedstream("config", "show", "--set", "stream.features=[f0,f1]")
    assert proc.returncode == 2
    assert "(got '[f0,f1]')" in proc.stderr
    assert 'needs quotes: ["f0", "f1"]' in proc.stderr


def _summary(**keys: object) -> dict[str, object]:
    """A finished run's summary.json, as print_summary reads it, with `keys` changed."""
    return {
        "clients": 4, "rounds": 3, "prequential_accuracy": 0.6, "prequential_loss": 0.7,
        "samples_seen": 300, "client_updates": 12, "client_failures": 0, "wall_seconds": 3.0,
        "bytes_up": 1, "bytes_down": 1, **keys,
    }


@pytest.mark.parametrize(("clipped", "warned"), [(0.996, True), (0.02, False), (None, False)])
def test_a_run_that_clipped_most_coordinates_is_told_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, clipped: float | None, warned: bool
) -> None:
    from fedstream.cli.main import print_summary

    summary = _summary(secure_aggregation=True, round_trips_per_round=2.0,
                       clipped_fraction=clipped)
    print_summary(summary, tmp_path)
    out = capsys.readouterr().out
    assert ("99.6 % of the update coordinates were clipped" in out) is warned
    assert ("raise secure_aggregation.clip" in " ".join(out.split())) is warned


@pytest.mark.parametrize(
    ("no_change", "majority", "warned"),
    [(0.7, 0.3, ["no-change (last label) predictor (70.00%)"]),
     (0.2, 0.6, ["majority class so far predictor (60.00%)"]),
     (0.7, 0.6, ["no-change (last label) predictor (70.00%) and the majority class so far "
                 "predictor (60.00%)"]),
     (0.2, 1.0, ["majority class so far predictor (100.00%)"]),
     (0.5, 0.5, []), (None, None, [])],
)
def test_a_model_no_better_than_a_trivial_predictor_is_told_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, no_change: float | None,
    majority: float | None, warned: list[str],
) -> None:
    from fedstream.cli.main import print_summary

    def kappa(theirs: float | None) -> float | None:  # as server.records.references has it
        return None if theirs is None or theirs == 1 else (0.55 - theirs) / (1 - theirs)

    print_summary(_summary(no_change_accuracy=no_change, majority_accuracy=majority,
                           prequential_accuracy=0.55, kappa_temporal=kappa(no_change),
                           kappa_m=kappa(majority)), tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert ("no-change (last label) │" in out) is (no_change is not None)  # table rows
    if no_change is not None:
        assert f"kappa_temporal {kappa(no_change):.2f}, kappa_m " in out
    if not warned:
        assert "did no better" not in out
    for names in warned:
        assert f"the federated model (55.00%) did no better than the {names} on the" in out
    if majority == 1.0:  # an undefined kappa is said to be one, not "0 or below"
        assert "one class dominates (kappa_m undefined (that predictor was always right))" \
            in out
    elif majority == 0.6:
        assert "one class dominates (kappa_m -0.12)" in out


def test_the_class_scores_and_a_class_never_right_are_told(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedstream.cli.main import print_summary
    from fedstream.server.records import class_scores

    # 1,000 samples: 'ok' 960 (950 right), 'fault' 30 (never right), 'idle' 10 (never
    # right, but only 1 %: still named), 'spare' never seen.
    tally = [960, 30, 10, 0, 990, 10, 0, 0, 950, 0, 0, 0]
    scores = class_scores(tally, ["ok", "fault", "idle", "spare"])
    print_summary(_summary(prequential_accuracy=0.95, samples_seen=1000, **scores), tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert f"│ federated │ 95.00% │ {100 * 950 / 960 / 3:.2f}% │ 1000 │" in out  # the column
    assert (f"Cohen's kappa {scores['cohen_kappa']:.2f}, macro F1 {scores['macro_f1']:.2f}; "
            "weakest class 'fault': recall 0.00% of 30 samples") in out
    assert ("the federated model never predicted classes 'fault' (30 samples, 3.00%), "
            "'idle' (10 samples, 1.00%) right") in out
    tally[8], tally[9] = 940, 10  # 'fault' right 10 times: only 'idle' is named
    print_summary(_summary(prequential_accuracy=0.95, samples_seen=1000,
                           **class_scores(tally, ["ok", "fault", "idle", "spare"])), tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "never predicted class 'idle' (10 samples, 1.00%) right" in out
    print_summary(_summary(prequential_accuracy=0.95, samples_seen=1000,
                           **class_scores(None)), tmp_path)  # an older run: no line
    older = capsys.readouterr().out
    assert "balanced accuracy" not in older and "Cohen's kappa" not in older
    print_summary(_summary(prequential_accuracy=1.0, samples_seen=10,
                           **class_scores([10, 0, 10, 0, 10, 0], ["ok", "fault"])), tmp_path)
    assert ("Cohen's kappa undefined (one class only, always predicted)"
            in " ".join(capsys.readouterr().out.split()))


def test_samples_dropped_on_devices_are_counted_in_the_closing_lines(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedstream.cli.main import print_summary

    print_summary(_summary(samples_dropped=33), tmp_path)
    assert ("33 samples dropped on the devices (full spools, or labels beyond the run's "
            "stream.n_classes" in " ".join(capsys.readouterr().out.split()))
    print_summary(_summary(samples_dropped=0), tmp_path)
    assert "samples dropped on the devices" not in capsys.readouterr().out


def test_a_file_whose_labels_come_in_runs_warns_that_repeating_them_does_better(
    tmp_path: Path,
) -> None:
    """Noise features, labels in runs of 50: the model learns nothing, yet scores above
    chance at times; only the no-change predictor on the same samples shows it."""
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 3, 24), 50)
    rows = [f"{a:.4f},{b:.4f},{c}" for (a, b), c in zip(rng.normal(size=(1200, 2)), labels,
                                                           strict=True)]
    path = tmp_path / "runs.csv"
    path.write_text("a,b,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = fedstream("sim", "--set", "stream.source=csv", "--set", f'stream.path="{path}"',
                     "--set", "federation.clients=2", "--set", "federation.rounds=4",
                     "--set", "drift.kind=none", "--quiet", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = " ".join(proc.stdout.split())
    assert "did no better than the no-change (last label) predictor" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["no_change_accuracy"] > 0.9 and summary["kappa_temporal"] < 0
    # The classes by the file's names, every sample predicted counted once.
    assert list(summary["per_class"]) == ["0", "1", "2"]
    assert sum(c["samples"] for c in summary["per_class"].values()) == summary["samples_seen"]


def test_a_secure_run_that_aggregated_nothing_does_not_claim_sums(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedstream.cli.main import print_summary

    summary = _summary(rounds_aggregated=0, prequential_accuracy=None, samples_seen=0,
                       client_updates=0, client_failures=8, secure_aggregation=True,
                       round_trips_per_round=1.0, aggregation_errors=[])
    print_summary(summary, tmp_path)
    assert "the server saw only sums" not in capsys.readouterr().out


def test_a_run_pins_its_data_file_and_a_rerun_refuses_it_edited(
    csv_file: Path, tmp_path: Path
) -> None:
    # The results' config.toml carries the file's SHA-256, so rerunning it after an edit
    # says so instead of quietly training on other data.
    from fedstream.protocol.config import load
    from fedstream.sim.results import prepare
    from fedstream.sim.runner import pin_data

    csv_file.write_text("temp,humidity,label\n" + "21.5,40,ok\n35.1,20,alarm\n" * 20)
    out = tmp_path / "out"
    cfg = pin_data(load(None, ["stream.source=csv", f'stream.path="{csv_file}"',
                               f'output.dir="{out}"']))
    assert len(cfg.stream.sha256) == 64
    prepare(cfg)
    assert f'sha256 = "{cfg.stream.sha256}"' in (out / "config.toml").read_text()
    assert pin_data(load(out / "config.toml", [])) == cfg  # unchanged: runs as it is
    with csv_file.open("a") as fh:
        fh.write("22.0,41,ok\n")
    proc = fedstream("sim", "--config", str(out / "config.toml"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2
    assert "stream.sha256" in proc.stderr and str(csv_file) in proc.stderr.replace("\n", "")
    assert not (tmp_path / "b").exists()


def test_a_run_never_replaces_a_config_it_did_not_write(tmp_path: Path) -> None:
    # A config kept beside its results, run with --out its own folder, lost its comments
    # to the run's config; an empty --out (an unset shell variable) cleared the cwd's runs.
    from fedstream.protocol.config import load
    from fedstream.sim.results import MARK, prepare

    own = tmp_path / "exp" / "config.toml"
    own.parent.mkdir()
    own.write_text("# my experiment\nseed = 4  # lucky\n[federation]\nclients = 2\n")
    proc = fedstream("sim", "--config", str(own), "--out", str(own.parent), "--quiet")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a config a run wrote (your own config?)" in " ".join(proc.stderr.split())
    assert own.read_text().startswith("# my experiment") and len(list(own.parent.iterdir())) == 1
    proc = fedstream("sim", "--out", "", "--quiet")
    assert proc.returncode == 2 and "output.dir" in proc.stderr and "is empty" in proc.stderr

    # What a run writes it may write again; its config names the folder absolutely, so a
    # rerun from anywhere lands in the same folder.
    out = tmp_path / "runs" / "a"
    prepare(load(None, [f'output.dir="{out}"']))
    text = (out / "config.toml").read_text()
    assert text.startswith(MARK) and load(out / "config.toml").output.dir == str(out.resolve())
    prepare(load(out / "config.toml"))  # the run's own config: replaced, no complaint
    # Results files without a run's config.toml are someone else's: kept, and refused.
    theirs = tmp_path / "theirs"
    (theirs / "plots").mkdir(parents=True)
    (theirs / "summary.json").write_text("{}")
    (theirs / "plots" / "accuracy.png").write_bytes(b"mine")
    with pytest.raises(ValueError, match=r"holds summary.json, plots/accuracy.png but no "):
        prepare(load(None, [f'output.dir="{theirs}"']))
    assert (theirs / "summary.json").read_text() == "{}"
    # `fedstream config show` dumps a config exactly as an old run (no header line) wrote
    # one: alone in its folder, it is someone's own, and refused.
    from fedstream.protocol.config import to_toml
    from fedstream.sim.results import check_config_file

    shown = tmp_path / "shown"
    shown.mkdir()
    dumped = to_toml(load(None, ["seed=1"]))
    (shown / "config.toml").write_text(dumped)
    with pytest.raises(ValueError, match="is not a config a run wrote"):
        check_config_file(load(None, [f'output.dir="{shown}"']))
    (shown / "metrics.jsonl").write_text("")  # beside an old run's records: that run's
    check_config_file(load(None, [f'output.dir="{shown}"']))
    assert (shown / "config.toml").read_text() == dumped


def test_sizes_are_printed_in_units_that_show_them() -> None:
    from fedstream.cli.main import _size

    assert [_size(n) for n in (30_515, 5_200_000, 999, 2.5e9)] == [
        "30.5 kB", "5.2 MB", "999 B", "2.5 GB"]


def test_a_run_whose_model_diverged_is_told_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedstream.cli.main import print_summary

    summary = _summary(prequential_accuracy=0.059, prequential_loss=None)
    print_summary(summary, tmp_path)
    assert "the model diverged" in capsys.readouterr().out
    print_summary({**summary, "prequential_loss": 0.7}, tmp_path)
    assert "diverged" not in capsys.readouterr().out


def test_devices_sharing_a_client_id_and_the_detection_score_are_printed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedstream.cli.main import print_summary

    score = {"client_drifts": 20, "detected": 11, "missed": 9, "false_alarms": 4,
             "delay_samples": {"median": 48.5}, "delay_rounds": {"median": 1.81}}
    print_summary(_summary(shared_client_ids=[0, 2], drift_detection=score), tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "two devices answered as the same client (client 0, 2)" in out
    assert "give each device its own --client-id" in out
    assert ("Drift detection: 11 of 20 client drifts found (median delay 48.5 samples, 1.8 "
            "rounds), 9 missed; 4 false alarms.") in out
    print_summary(_summary(shared_client_ids=[], drift_detection={
        **score, "client_drifts": 0, "detected": 0, "missed": 0, "false_alarms": 1,
        "delay_samples": None}), tmp_path)
    out = " ".join(capsys.readouterr().out.split())
    assert "same client" not in out
    assert "Drift detection: no client reached a drift; 1 false alarm." in out
    print_summary(_summary(shared_client_ids=[], drift_detection={
        **score, "client_drifts": 0, "detected": 0, "missed": 0, "false_alarms": None,
        "alarms": 3, "per_drift": []}), tmp_path)  # a file's stream: none to score against
    out = " ".join(capsys.readouterr().out.split())
    assert ("Drift detection: 3 alarms; the file's own drifts are unknown and none was put "
            "in (drift.kind)") in out


@pytest.mark.slow  # a whole run: Ray's workers must import the module too
def test_a_model_module_beside_the_user_is_found(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch.nn as nn\n"
        "def wide(shape, n):\n    return nn.Sequential(nn.Flatten(), nn.Linear(20, n))\n"
    )
    proc = fedstream("sim", "--quiet", "--out", str(tmp_path / "o"), "--set",
                     "learner.model=mymodels:wide", "--set", "federation.clients=2",
                     "--set", "federation.rounds=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_feed_from_a_pipe_still_open_exits_2_on_a_bad_header(tmp_path: Path) -> None:
    # `tail -f live.csv | fedstream feed -`: the writer never closes the pipe. The error
    # must end the command with its code, not abort the interpreter on stdin's lock.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedstream.cli.main", "feed", "-", "--label", "state",
         "--to", f"unix://{tmp_path}/none.sock"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write("temp,humidity,label\n21.5,40,ok\n")
    proc.stdin.flush()  # and kept open
    try:
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.stdin.close()
    assert code == 2, stderr
    assert "label column 'state' not found" in stderr and "Fatal Python error" not in stderr


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:abc", ":6379", "10.0.0.5:70000"])
def test_a_malformed_ray_address_is_refused_before_ray_starts(tmp_path: Path, address: str) -> None:
    proc = fedstream("sim", "--ray-address", address, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    said = " ".join(proc.stderr.split())
    assert f"simulation.ray_address (or --ray-address): '{address}' is not a Ray cluster " \
        "address" in said
    assert "Traceback" not in proc.stderr


def test_a_cluster_that_does_not_answer_is_named_before_the_data_is_read(
    csv_file: Path, tmp_path: Path
) -> None:
    # A socket's check: it came after the file was parsed and the model built (46 s).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    proc = fedstream("sim", "--set", "stream.source=csv", "--set", f'stream.path="{csv_file}"',
                     "--ray-address", f"127.0.0.1:{port}", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "simulation.ray_address (or --ray-address): no Ray cluster answers at " in said
    assert "oops" not in said  # the file's bad row (line 4) was not reached

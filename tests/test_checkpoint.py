"""The aggregator's checkpoints: a crashed server resumes where its last round ended."""

from __future__ import annotations

import json

import pytest
from loopback_grid import LoopbackGrid
from test_device_app import CLASSES, CLIENTS, FEATURES, _spools

from fedstream.client.device_app import device_client_app
from fedstream.protocol.config import load
from fedstream.server import checkpoint
from fedstream.server.deploy_app import fingerprint, run_aggregator


def _cfg(tmp_path, rounds: int, strategy: str):
    return load(None, [
        f"federation.clients={CLIENTS}", f"federation.rounds={rounds}",
        "federation.round_timeout=0.5", f"stream.n_features={FEATURES}",
        f"stream.n_classes={CLASSES}", "stream.budget=10", 'learner.model="logreg"',
        f'federation.strategy="{strategy}"', "federation.server_lr=0.5",
        "secure_aggregation.enabled=true", f"output.dir=\"{tmp_path / 'out'}\"",
    ])


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_continues_from_the_last_checkpoint(tmp_path, strategy, capsys):
    paths = _spools(tmp_path)

    def grid(cfg):
        return LoopbackGrid(device_client_app(cfg), CLIENTS,
                            node_config=lambda p: {"spool": str(paths[p]), "client-id": p})

    state = tmp_path / "state"
    first = _cfg(tmp_path, 2, strategy)
    run_aggregator(grid(first), first, state, resume=False)
    saved = checkpoint.load(state)
    assert saved is not None and saved.server_round == 2 and saved.history.rounds == 2
    # Which client each node is comes back with the checkpoint: a resumed server's
    # failures name the devices it knew, not bare node ids.
    assert sorted(saved.history.client_of.values()) == list(range(CLIENTS))

    again = _cfg(tmp_path, 4, strategy)
    summary = run_aggregator(grid(again), again, state, resume=True)
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    rounds = [rec["round"] for rec in lines if "round" in rec]
    assert rounds == [1, 2, 3, 4]  # no round twice, none skipped
    resumed = next(rec for rec in lines if "resumed_after_round" in rec)
    assert resumed["resumed_after_round"] == 2
    assert resumed["model_sha256"] == fingerprint(saved.arrays)
    assert summary["rounds"] == 4 and summary["samples_seen"] == 4 * CLIENTS * 10
    assert checkpoint.load(state).server_round == 4
    if strategy != "fedavg":
        return
    # A resume that has no round left to run is refused, naming the rounds a run was last
    # started with (an operator resuming after a crash forgot the --set that extended it).
    from fedstream.server.aggregator import Aggregator, check_rounds_left

    agg = Aggregator(state, tmp_path / "creds", "127.0.0.1", 1)
    checkpoint.remember_config(state, _cfg(tmp_path, 6, strategy))
    check_rounds_left(agg, _cfg(tmp_path, 5, strategy))
    assert ("--resume: federation.rounds is 5, the run was started with 6: 1 more round "
            "after the 4 done") in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"has done 4 rounds, and federation.rounds is 4: "
                       r"nothing is left to run \(it was last started with federation.rounds "
                       r"= 6\). To go on, pass --set federation.rounds=N with N above 4"):
        check_rounds_left(agg, again)


def test_without_a_checkpoint_resume_starts_at_round_one(tmp_path):
    paths = _spools(tmp_path)
    cfg = _cfg(tmp_path, 1, "fedavg")
    grid = LoopbackGrid(device_client_app(cfg), CLIENTS,
                        node_config=lambda p: {"spool": str(paths[p]), "client-id": p})
    summary = run_aggregator(grid, cfg, tmp_path / "state", resume=True)
    assert summary["rounds"] == 1


def test_a_model_that_was_sent_is_checkpointed(tmp_path):
    # A round that keeps the previous model checkpoints the very ArrayRecord it sent, and
    # sending (Flower's deflate) caches wire chunks, memoryviews, in each Array: the
    # checkpoint of such a round once failed with "cannot pickle memoryview objects".
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedstream.server.records import History
    from fedstream.server.strategy import make_strategy

    cfg = _cfg(tmp_path, 1, "fedadam")
    arrays = ArrayRecord({"w": Array(np.arange(12, dtype=np.float32).reshape(3, 4))})
    for arr in arrays.values():
        arr.deflate()  # what pushing it to a SuperLink does
    assert "_chunks" in arrays["w"].__dict__
    checkpoint.save(tmp_path, checkpoint.Checkpoint(3, arrays, make_strategy(cfg), History()))
    back = checkpoint.load(tmp_path)
    assert back is not None and back.server_round == 3
    assert fingerprint(back.arrays) == fingerprint(arrays)
    np.testing.assert_array_equal(back.arrays["w"].numpy(), arrays["w"].numpy())


def test_resume_refuses_a_config_that_makes_another_run(tmp_path):
    state = tmp_path / "srv"
    base = ["stream.n_features=8", "federation.rounds=3"]
    checkpoint.remember_config(state, load(None, base))
    longer = load(None, [*base, "federation.rounds=9", "federation.round_timeout=30",
                         'output.dir="elsewhere"'])
    assert checkpoint.changes_on_resume(state, longer) == []
    other = load(None, [*base, "stream.n_features=5", 'federation.strategy="fedadam"'])
    changes = checkpoint.changes_on_resume(state, other)
    assert 'federation.strategy: "fedavg" in the run, "fedadam" given' in changes
    assert "stream.n_features: 8 in the run, 5 given" in changes
    assert checkpoint.changes_on_resume(tmp_path / "older", other) == []  # kept no config
    # A key a newer fedstream added is not a difference from a run that did not know it.
    stored = json.loads((state / checkpoint.RUN_CONFIG).read_text())
    del stored["stream"]["budget"]
    (state / checkpoint.RUN_CONFIG).write_text(json.dumps(stored))
    assert checkpoint.changes_on_resume(state, load(None, base)) == []
    # Noise calibrated to a target epsilon over the run's rounds: more rounds would spend
    # more than the target, so the rounds are fixed too.
    private = [*base, "privacy.enabled=true", "privacy.target_epsilon=8"]
    checkpoint.remember_config(tmp_path / "dp", load(None, private))
    [change] = checkpoint.changes_on_resume(tmp_path / "dp", load(None, [*private,
                                                                       "federation.rounds=9"]))
    assert change.startswith("federation.rounds: 3 in the run, 9 given (the noise was")
    checkpoint.remember_config(state, load(None, base))

    # The CLI says so before it starts anything, with a usage error's exit status.
    (state / checkpoint.CHECKPOINT).write_bytes(b"")
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "server", "--state", str(state),
         "--credentials", str(tmp_path / "creds"), "--resume", "--set", "stream.n_features=5",
         "--set", "federation.rounds=3", "--port", "29199"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "stream.n_features: 8 in the run, 5 given" in " ".join(done.stderr.split())
    assert not (state / "logs").exists()


def test_the_server_checks_the_run_model_before_it_starts(tmp_path, monkeypatch) -> None:
    """A factory that gives more scores than classes would fail every device's round (a
    prediction beyond the classes cannot be tallied): `fedstream server` refuses it first."""
    from fedstream.protocol.config import load
    from fedstream.server.aggregator import check_model

    (tmp_path / "wide_models.py").write_text(
        "from torch import nn\n"
        "def wide(shape, n_classes):\n"
        "    return nn.Linear(shape[0], n_classes + 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["stream.n_features=4", "stream.n_classes=2"]
    check_model(load(None, base))
    with pytest.raises(ValueError, match=r"learner.model 'wide_models:wide' gives outputs of "
                       r"shape \(2, 4\) for a batch of 2: it must give one score per class"):
        check_model(load(None, [*base, "learner.model=wide_models:wide"]))

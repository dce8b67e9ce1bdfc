"""The device ClientApp on real spool files: what a round trains, commits and reports."""

from __future__ import annotations

import numpy as np
import pytest
from loopback_grid import LoopbackGrid

from fedstream.client import device_app
from fedstream.client.device_app import device_client_app
from fedstream.client.spool import Spool
from fedstream.protocol import messages as m
from fedstream.protocol.config import load
from fedstream.protocol.models import build_model
from fedstream.protocol.runtime import ROUND_NOTE
from fedstream.server.app import run_federation

CLIENTS, FEATURES, CLASSES = 3, 8, 3


def _cfg(*extra: str):
    return load(None, [
        f"federation.clients={CLIENTS}", "federation.rounds=3", "federation.round_timeout=0.5",
        f"stream.n_features={FEATURES}", f"stream.n_classes={CLASSES}", "output.progress=false",
        "learner.model=\"logreg\"", *extra,
    ])


def _initial(cfg):
    from flwr.app import ArrayRecord

    model = build_model("logreg", (FEATURES,), cfg.stream.n_classes, seed=cfg.seed)
    return ArrayRecord(model.state_dict())


def _spools(tmp_path, per_client: int = 50, capacity: int = 1_000_000, policy: str = "reject"):
    rng = np.random.default_rng(0)
    paths = []
    for c in range(CLIENTS):
        path = tmp_path / f"spool-{c}.db"
        spool = Spool(path, FEATURES, capacity=capacity, policy=policy)
        x = rng.normal(size=(per_client, FEATURES)).astype(np.float32)
        spool.append(x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0))
        spool.close()
        paths.append(path)
    return paths


def _grid(cfg, paths, tamper=None):
    # Devices configured as the server is: under secure aggregation they refuse plaintext,
    # and under privacy a round that asks less of them (as `fedstream client` sets them).
    from fedstream.client.privacy import PRIVATE_ONLY, bounds, requirement
    from fedstream.server.app import planned_noise

    own = {"secure-only": True} if cfg.secure_aggregation.enabled else {}
    if need := requirement(cfg.privacy, cfg.secure_aggregation.enabled):
        own[PRIVATE_ONLY] = need
        own.update(bounds(cfg.privacy, planned_noise(cfg), cfg.federation.clients))
    return LoopbackGrid(
        device_client_app(cfg), CLIENTS, tamper,
        node_config=lambda p: {"spool": str(paths[p]), "client-id": p, **own},
    )


def test_samples_beyond_the_runs_classes_are_said_once_and_counted_as_dropped(tmp_path, capfd):
    """A device that ingested under more classes than the server's run (its own config
    differs): those samples cannot be learned; it says so, on its log and terminal."""
    from fedstream.client.node import Device, _Watch

    cfg = _cfg("stream.n_classes=2", "federation.rounds=2")
    paths = _spools(tmp_path)  # labels 0, 1 and 2
    expected = sum(int((Spool(p, FEATURES).pending(limit=1000).y == 2).sum()) for p in paths)
    records: list[dict] = []
    run_federation(_grid(cfg, paths), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert sum(r["dropped"] for r in records) == expected > 0
    notes = [line for line in capfd.readouterr().err.splitlines() if ROUND_NOTE in line]
    assert notes and all("samples skipped (counted as dropped): their labels are beyond the "
                         "run's stream.n_classes = 2" in line for line in notes)
    watch = _Watch(Device("127.0.0.1:1", tmp_path, 0, FEATURES), tmp_path / "log")
    for line in notes:  # each device's round: one line on the terminal, not one a round
        watch.hear(line)
    said = [line for line in capfd.readouterr().err.splitlines() if "a round on this" in line]
    assert len(said) == 1 and "samples skipped" in said[0]


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_rounds_train_each_spooled_sample_once(tmp_path, secure):
    cfg = _cfg("stream.budget=20", f"secure_aggregation.enabled={str(secure).lower()}")
    paths = _spools(tmp_path)
    records: list[dict] = []
    run_federation(_grid(cfg, paths), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert [r["examples"] for r in records] == [60, 60, 30]  # budget 20 a round, 50 each
    for path in paths:
        spool = Spool(path, FEATURES)
        stats, ledger = spool.stats(), spool.ledger()
        assert stats["accepted"] == stats["trained"] + stats["dropped"] + stats["pending"]
        assert stats["trained"] == 50 and stats["pending"] == 0
        assert [(a, b, n) for a, b, n, _ in ledger] == [(0, 20, 20), (20, 40, 20), (40, 50, 10)]
        assert [tag for *_, tag in ledger] == ["round 1", "round 2", "round 3"]


def test_a_restarted_device_keeps_its_secure_aggregation_keys(tmp_path):
    # A restarted SuperNode starts with an empty Context. Device 1 restarts after rounds 1
    # and 2 (the server then assigns it the mask key it offered before), and in round 3
    # between its masked reply and the unmask request. Its spool kept its secrets: it
    # takes part in every round, and answers round 3's request once, across restarts.
    from flwr.app import Context, RecordDict

    cfg = _cfg("secure_aggregation.enabled=true", "stream.budget=10", "federation.rounds=4")

    def restart(node: int) -> None:
        grid.contexts[node] = Context(1, node, grid.contexts[node].node_config, RecordDict(),
                                      {})

    def mid_round_3(node: int, reply):
        if (node == 1001 and reply.has_content() and m.MASKED in reply.content
                and reply.content[m.SECAGG]["round"] == 3):
            restart(node)
        return reply

    grid = _grid(cfg, _spools(tmp_path), tamper=mid_round_3)
    records: list[dict] = []

    def after(rec: dict, _history: object) -> None:
        records.append(rec)
        if rec["round"] in (1, 2):
            restart(1001)

    run_federation(grid, cfg, _initial(cfg), tmp_path / "out", on_round=after)
    assert [r["failures"] for r in records] == [[]] * 4
    assert [r["clients_ok"] for r in records] == [CLIENTS] * 4
    round_3_unmask = next(
        msg for msg in grid.sent if msg.metadata.dst_node_id == 1001
        and m.CONFIG in msg.content and msg.content[m.CONFIG].get(m.QUERY_KIND) == m.UNMASK
        and msg.content[m.CONFIG]["round"] == 3
    )
    restart(1001)
    with pytest.raises(Exception, match="already unmasked"):  # answered once, kept so
        grid.app(round_3_unmask, grid.contexts[1001])


def test_a_round_that_dies_before_its_commit_is_trained_again(tmp_path, monkeypatch):
    cfg = _cfg("stream.budget=20")
    paths = _spools(tmp_path)
    real_commit = Spool.commit
    died: list[str] = []

    def dying_commit(self, offset, state=None, tag=""):
        if str(self.path) == str(paths[1]) and not died:  # client 1, round 1: killed
            died.append(tag)  # between training and commit
            raise RuntimeError("killed")
        return real_commit(self, offset, state, tag)

    monkeypatch.setattr(Spool, "commit", dying_commit)
    records: list[dict] = []
    run_federation(_grid(cfg, paths), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert records[0]["clients_ok"] == 2 and records[0]["failures"][0]["client"] == 1
    spool = Spool(paths[1], FEATURES)
    # Round 1's samples were trained but not committed: round 2 trains them again, once.
    assert spool.ledger() == [(0, 20, 20, "round 2"), (20, 40, 20, "round 3")]
    assert spool.stats()["pending"] == 10


def test_samples_dropped_by_a_full_spool_are_reported(tmp_path):
    cfg = _cfg("stream.budget=100", "federation.rounds=1")
    paths = _spools(tmp_path, per_client=50, capacity=30, policy="drop_oldest")
    records: list[dict] = []
    run_federation(_grid(cfg, paths), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert records[0]["dropped"] == 3 * 20 and records[0]["examples"] == 3 * 30


def test_a_node_without_a_spool_says_so(tmp_path):
    cfg = _cfg("federation.rounds=1")
    grid = LoopbackGrid(device_client_app(cfg), CLIENTS, node_config=lambda p: {"client-id": p})
    records: list[dict] = []
    run_federation(grid, cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert all(device_app.SPOOL in f["reason"] for f in records[0]["failures"])


def test_a_device_whose_config_disagrees_with_the_servers_is_told_whose_is_whose(tmp_path):
    # The device stored 8-feature samples; the server's run says 5.
    cfg = _cfg("federation.rounds=1", "stream.n_features=5")
    records: list[dict] = []
    run_federation(_grid(cfg, _spools(tmp_path)), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    reasons = {f["reason"] for f in records[0]["failures"]}
    assert len(records[0]["failures"]) == CLIENTS and len(reasons) == CLIENTS  # one per spool
    assert all(f"spool-{f['client']}.db) holds samples of 8 features, and the server's run "
               "has stream.n_features = 5" in f["reason"] for f in records[0]["failures"])


def test_labels_the_model_cannot_output_are_skipped_not_trained_forever(tmp_path):
    # A spool filled by a service that did not know the class count (or before the config
    # lost a class) holds a label of 3 in a 3-class federation: skipped and reported as
    # dropped, so the offset moves on instead of every round failing on that row.
    cfg = _cfg("stream.budget=100", "federation.rounds=2")
    paths = _spools(tmp_path, per_client=10)
    spool = Spool(paths[0], FEATURES)
    spool.append(np.zeros((2, FEATURES), np.float32), np.array([CLASSES, 1]))
    spool.close()
    records: list[dict] = []
    run_federation(_grid(cfg, paths), cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert records[0]["clients_ok"] == CLIENTS and not records[0]["failures"]
    assert records[0]["examples"] == 3 * 10 + 1 and records[0]["dropped"] == 1
    assert Spool(paths[0], FEATURES).stats()["pending"] == 0


def test_the_device_service_refuses_labels_beyond_the_class_count(tmp_path):
    from fedstream.client.ingest import Producer, serve

    server = serve(tmp_path / "s.db", 2, "127.0.0.1:0", n_classes=2)
    try:
        result = Producer(server.address).append(np.zeros((3, 2), np.float32), [0, 1, 2])
        assert result.accepted == 2 and "2 is not in [0, 2)" in result.errors[0].reason
    finally:
        server.stop(None)


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_two_devices_with_one_client_id_are_told_of_once(tmp_path, caplog, secure):
    # A copy-pasted `fedstream client --client-id 1`: both devices train, but their reports
    # are filed under one client; the server says so once, naming both nodes.
    cfg = _cfg("federation.rounds=2", f"secure_aggregation.enabled={str(secure).lower()}")
    paths = _spools(tmp_path)
    grid = LoopbackGrid(device_client_app(cfg), CLIENTS,
                        node_config=lambda p: {"spool": str(paths[p]), "client-id": min(p, 1)})
    records: list[dict] = []
    with caplog.at_level("WARNING", logger="fedstream"):
        run_federation(grid, cfg, _initial(cfg), tmp_path / "out",
                       on_round=lambda r, _h: records.append(r))
    told = [r.getMessage() for r in caplog.records if "same --client-id" in r.getMessage()]
    assert told == ["nodes 1001, 1002 all answered as client 1: were two devices started "
                    "with the same --client-id? Their reports are filed under one client"]
    assert all(r["clients_ok"] == CLIENTS for r in records)  # both still train
    assert [r["shared_client_ids"] for r in records] == [[1], [1]]
    from fedstream.server.records import History, run_summary

    history = History()
    for r in records:
        history.add(r)
    assert run_summary(cfg, history)["shared_client_ids"] == [1]


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_devices_clip_and_noise_their_updates_under_differential_privacy(tmp_path, secure):
    """The device app has the privacy mod: with a clip far below the updates, the server's
    model moves by at most the clip (plus noise), and every device said it privatised."""
    on = f"secure_aggregation.enabled={str(secure).lower()}"
    replies: list = []

    def spy(_node, reply):
        replies.append(reply)
        return reply

    moved = {}
    for clip in (0.01, 0.5):
        cfg = _cfg(on, "privacy.enabled=true", "privacy.delta=0.01", "privacy.noise_at=clients",
                   "privacy.noise_multiplier=0", f"privacy.clip_norm={clip}",
                   "federation.server_lr=1.0", "federation.rounds=1")
        initial, folder = _initial(cfg), tmp_path / str(clip)
        folder.mkdir()
        arrays, history = run_federation(_grid(cfg, _spools(folder), spy), cfg,
                                         initial, tmp_path / f"out{clip}")
        assert history.aggregated == 1 and history.releases[0]["summed"] == CLIENTS
        flat = [np.concatenate([a.numpy().ravel() for a in r.values()]) for r in (arrays, initial)]
        moved[clip] = float(np.linalg.norm(flat[0] - flat[1]))
    assert moved[0.01] <= 0.01 * 1.001 < moved[0.5]  # the mean of changes clipped to 0.01
    if not secure:  # plaintext replies show it; secure ones carry it in the masked tail
        assert all(r.content["metrics"]["privatised"] == 1 for r in replies if not r.has_error())


def test_a_device_configured_for_secure_aggregation_refuses_a_plaintext_round(tmp_path):
    # A server that leaves the secure-aggregation setup out of a round would otherwise get
    # the device's model and counts in the clear.
    from fedstream.client import secure
    from fedstream.client.node import Device, supernode_command

    cfg = _cfg("federation.rounds=1")  # the server runs in plaintext
    paths = _spools(tmp_path, per_client=20)
    grid = LoopbackGrid(
        device_client_app(cfg), CLIENTS,
        node_config=lambda p: {"spool": str(paths[p]), "client-id": p, secure.SECURE_ONLY: True},
    )
    records: list[dict] = []
    run_federation(grid, cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert not records[0]["aggregated"] and records[0]["clients_ok"] == 0
    assert all("trains only under secure aggregation" in f["reason"]
               for f in records[0]["failures"])
    dev = Device(server="127.0.0.1:9092", state=tmp_path, client_id=0, n_features=FEATURES,
                 n_classes=CLASSES, secure_only=True)
    config = supernode_command(dev, 9094)
    assert f"{secure.SECURE_ONLY}=true" in config[config.index("--node-config") + 1]


@pytest.mark.parametrize(
    ("device", "need"),
    [(["privacy.noise_at=clients"], "noise"),
     (["secure_aggregation.enabled=true"], "noise"),  # auto: the clients, under masks
     (["secure_aggregation.enabled=true", "privacy.noise_at=server"], "clip")],
)
def test_a_device_configured_for_privacy_refuses_a_round_that_asks_less(
    tmp_path, device, need
):
    """A server run without privacy (or with another noise_at) would otherwise train on the
    device's update without the noise its operator asked for, and nobody would say so."""
    from flwr.common.config import parse_config_args

    from fedstream.client.node import Device, supernode_command
    from fedstream.client.privacy import PRIVATE_ONLY, requirement
    from fedstream.protocol.config import load

    own = load(None, ["privacy.enabled=true", *device])
    assert requirement(own.privacy, own.secure_aggregation.enabled) == need
    assert requirement(load(None, ["privacy.enabled=true"]).privacy, False) == ""  # server's
    cfg = _cfg("federation.rounds=1")  # the server runs without privacy
    paths = _spools(tmp_path, per_client=20)
    grid = LoopbackGrid(
        device_client_app(cfg), CLIENTS,
        node_config=lambda p: {"spool": str(paths[p]), "client-id": p, PRIVATE_ONLY: need},
    )
    records: list[dict] = []
    run_federation(grid, cfg, _initial(cfg), tmp_path / "out",
                   on_round=lambda r, _h: records.append(r))
    assert not records[0]["aggregated"] and records[0]["clients_ok"] == 0
    assert all("trains only under differential privacy" in f["reason"]
               and "asked neither clipping nor noise" in f["reason"]
               for f in records[0]["failures"])
    dev = Device(server="127.0.0.1:9092", state=tmp_path, client_id=0, n_features=FEATURES,
                 n_classes=CLASSES, private_only=need,
                 private_bounds={"private-clip": 0.5, "private-noise": 0.1})
    config = supernode_command(dev, 9094)
    node_config = parse_config_args([config[config.index("--node-config") + 1]])
    assert node_config[PRIVATE_ONLY] == need  # as Flower reads it
    assert node_config["private-clip"] == 0.5 and node_config["private-noise"] == 0.1

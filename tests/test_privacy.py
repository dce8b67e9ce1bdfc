"""Differential privacy: clip -> noise on both sides, the private mean, and the accountant.

The round tests run fedstream's real ClientApps (learner, privacy and secure mods) behind
a loopback grid, so what is checked is what a client sends and what the server makes of it.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from loopback_grid import LoopbackGrid

from fedstream.cli.main import print_summary
from fedstream.client.privacy import make_privacy_mod, privatised
from fedstream.protocol import dp, updates
from fedstream.protocol import messages as m
from fedstream.protocol.config import ConfigError, from_json, load, to_json
from fedstream.server.app import run_federation
from fedstream.server.privacy import (
    ORDERS,
    VOID_NO_NOISE,
    Ledger,
    Privacy,
    Release,
    releases_of,
)
from fedstream.server.records import History, run_summary
from fedstream.sim.client_app import sim_client_app
from fedstream.sim.federation import federation

BASE = [
    "federation.clients=6",
    "federation.rounds=3",
    "federation.round_timeout=0.3",
    "federation.server_lr=1.0",  # plain FedAvg: the new model is the private mean itself
    "output.progress=false",
    "stream.rate=20.0",
    "evaluation.every=1",
    "privacy.enabled=true",
    "privacy.delta=1e-3",
]


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([a.numpy().ravel().astype(np.float64) for a in arrays.values()])


def _run(tmp_path, overrides=(), tamper=None):
    """Rounds over real ClientApps: (grid, round records, model after each round, initial)."""
    cfg = load(None, [*BASE, *overrides])
    grid = LoopbackGrid(sim_client_app(cfg), cfg.federation.clients, tamper)
    models: list[np.ndarray] = []

    def keep(_round, arrays):
        models.append(_flat(arrays))
        return {}

    records: list[dict] = []
    initial = federation(cfg).initial_arrays()
    run_federation(grid, cfg, initial, tmp_path, evaluate=keep,
                   on_round=lambda rec, _h: records.append(rec), simulated=True)
    return grid, records, models, _flat(initial)


def _spy(into: list[Message]):
    def tamper(_node, reply):
        into.append(reply)
        return reply
    return tamper


# --- the two steps -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)),
    st.floats(1e-6, 1e3),
)
def test_clipping_bounds_the_norm_and_keeps_the_direction(values, bound):
    change = values.copy()
    norm = dp.clip_l2(change, bound)
    assert norm == pytest.approx(np.linalg.norm(values))
    assert np.linalg.norm(change) <= bound * (1 + 1e-9)
    if norm <= bound:
        assert np.array_equal(change, values)
    else:  # the same direction, shorter
        assert np.allclose(change * norm / bound, values, rtol=1e-9, atol=1e-9 * norm)


def test_a_change_that_is_not_finite_is_dropped_not_scaled():
    change = np.array([1.0, np.inf, 2.0])
    assert math.isinf(dp.clip_l2(change, 1.0))
    assert not change.any()


def _model(**arrays) -> ArrayRecord:
    return updates.record(arrays)


def test_integer_arrays_are_not_trained_under_privacy_and_dtypes_stay():
    old = _model(w=np.zeros((3, 2), np.float32), n=np.array([5], np.int64))
    new = _model(w=np.full((3, 2), 4.0, np.float32), n=np.array([9], np.int64))
    change = dp.model_change(new, old)
    assert change.tolist() == [4.0] * 6 + [0.0]
    assert dp.float_spans(old) == [(0, 6)]
    sandwich = [_model(a=np.zeros(2, np.float32), n=np.array([5, 6]), b=np.zeros(1, np.float32)),
                _model(a=np.ones(2, np.float32), n=np.array([9, 9]), b=np.ones(1, np.float32))]
    assert dp.model_change(sandwich[1], sandwich[0]).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    out = privatised(old, new, clip=3.0, std=0.0, rng=np.random.default_rng(0))
    assert out["w"].numpy().dtype == np.float32 and out["n"].numpy().tolist() == [5]
    assert np.linalg.norm(out["w"].numpy()) == pytest.approx(3.0, rel=1e-6)


def test_client_noise_has_the_deviation_asked_for_and_repeats_with_its_seed():
    old = _model(w=np.zeros(200_000, np.float32))
    new = _model(w=np.full(200_000, 1e-3, np.float32))
    a = privatised(old, new, clip=0.1, std=0.05, rng=np.random.default_rng([1, 2]))
    b = privatised(old, new, clip=0.1, std=0.05, rng=np.random.default_rng([1, 2]))
    noise = a["w"].numpy().astype(np.float64) - 0.1 / np.sqrt(200_000)  # minus the clipped change
    assert noise.std() == pytest.approx(0.05, rel=0.01) and abs(noise.mean()) < 0.05 * 0.01
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())


def _train_message(config: dict) -> Message:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    content = RecordDict({m.ARRAYS: _model(w=np.zeros(4, np.float32)),
                          m.CONFIG: ConfigRecord({m.ROUND: 1, **config})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _handler(msg: Message, _ctx: Context) -> Message:
    report = m.TrainReport(client=3, examples=7, correct=1, loss_sum=0.0)
    weights = _model(w=np.array([3.0, 4.0, 0.0, 0.0], np.float32))
    return Message(RecordDict({m.ARRAYS: weights, m.METRICS: report.to_record()}), reply_to=msg)


def test_a_device_that_must_add_noise_refuses_a_round_that_asks_only_for_clipping():
    from fedstream.client.privacy import PRIVATE_ONLY, PrivacyRequired

    mod = make_privacy_mod(seed=0)
    ctx = Context(1, 1, {PRIVATE_ONLY: "noise"}, RecordDict(), {})
    with pytest.raises(PrivacyRequired, match="asked clipping but no noise"):
        mod(_train_message({m.DP_CLIP: 1.0, m.DP_STD: 0.0}), ctx, _handler)
    noised = mod(_train_message({m.DP_CLIP: 1.0, m.DP_STD: 0.1}), ctx, _handler)
    assert m.TrainReport.from_record(noised.content[m.METRICS]).privatised
    clip_only = Context(1, 1, {PRIVATE_ONLY: "clip"}, RecordDict(), {})
    assert not mod(_train_message({m.DP_CLIP: 1.0}), clip_only, _handler).has_error()


def test_a_device_refuses_a_round_that_asks_less_privacy_than_its_config():
    # The kind is not enough: a server whose config clips at 1e6, or noises at z = 1e-6,
    # asks for clipping and noise all the same.
    from fedstream.client.privacy import PRIVATE_ONLY, PrivacyRequired, bounds

    own = load(None, ["privacy.enabled=true", "privacy.noise_at=clients",
                      "privacy.clip_norm=2", "privacy.noise_multiplier=1.5",
                      "federation.clients=9"])
    limits = bounds(own.privacy, 1.5, 9)
    assert limits == {"private-clip": 2.0, "private-noise": 0.5}  # z / sqrt(9)
    mod = make_privacy_mod(seed=0)
    ctx = Context(1, 1, {PRIVATE_ONLY: "noise", **limits}, RecordDict(), {})
    honest = {m.DP_CLIP: 2.0, m.DP_STD: 1.5 * 2.0 / 9**0.5}  # the server of that config
    assert not mod(_train_message(honest), ctx, _handler).has_error()
    smaller = {m.DP_CLIP: 1.0, m.DP_STD: 0.5}  # a smaller clip, as much noise per unit
    assert not mod(_train_message(smaller), ctx, _handler).has_error()
    with pytest.raises(PrivacyRequired, match=re.escape(
            "clip its update at 1e+06, above its own config's privacy.clip_norm = 2")):
        mod(_train_message({m.DP_CLIP: 1e6, m.DP_STD: 1e6}), ctx, _handler)
    with pytest.raises(PrivacyRequired, match=r"noise of std 0\.999 at clip 2 .* less than its "
                       r"own config asks: 0\.5 of the clip"):
        mod(_train_message({m.DP_CLIP: 2.0, m.DP_STD: 0.999}), ctx, _handler)
    # Noise on the server: only the clip is the device's to check.
    server = load(None, ["privacy.enabled=true", "privacy.noise_at=server"])
    assert bounds(server.privacy, 1.0, 9) == {"private-clip": server.privacy.clip_norm}
    assert bounds(load(None, []).privacy, 1.0, 9) == {}


def test_a_clients_old_node_sampled_beside_its_new_one_keeps_the_shares_client_sized():
    # A restarted device's old node is still listed, and sampled: 11 nodes of 10 clients.
    # Shares sized for 11 would fall below the devices' floor, z / sqrt(10) of the clip.
    from fedstream.server.privacy import Privacy, client_std

    privacy = Privacy(load(None, ["privacy.enabled=true", "privacy.noise_at=clients"]).privacy,
                      secure=False, seed=0)
    messages = [_train_message({}) for _ in range(11)]
    privacy.ask(messages, population=10)
    assert privacy.client_std == client_std(privacy.z, privacy.cfg.clip_norm, 10)
    privacy.ask(messages[:4], population=10)
    assert privacy.client_std == client_std(privacy.z, privacy.cfg.clip_norm, 4)


def test_the_mod_privatises_only_when_asked_and_says_so():
    mod, ctx = make_privacy_mod(seed=0), Context(1, 1, {}, RecordDict(), {})
    plain = mod(_train_message({}), ctx, _handler)
    assert plain.content[m.ARRAYS]["w"].numpy().tolist() == [3.0, 4.0, 0.0, 0.0]
    assert not m.TrainReport.from_record(plain.content[m.METRICS]).privatised
    asked = mod(_train_message({m.DP_CLIP: 1.0, m.DP_STD: 0.0}), ctx, _handler)
    assert asked.content[m.ARRAYS]["w"].numpy().tolist() == pytest.approx([0.6, 0.8, 0, 0])
    report = m.TrainReport.from_record(asked.content[m.METRICS])
    assert report.privatised and report.examples == 7  # counted as ever, weighed as all others

    def failing(msg, _ctx):
        return Message(Error(1, "boom"), reply_to=msg)

    assert mod(_train_message({m.DP_CLIP: 1.0}), ctx, failing).has_error()


# --- the accountant ----------------------------------------------------------------------


def _gaussian_epsilon(z: float, rounds: int, delta: float) -> float:
    """epsilon of `rounds` unsampled Gaussian releases, by hand: replace-one moves the sum by
    2C, so RDP(a) = rounds * a / (2 (z/2)^2); converted as dp-accounting does (Canonne,
    Kamath and Steinke 2020), minimised over the same orders."""
    best = math.inf
    for a in ORDERS:
        rdp = rounds * a / (2 * (z / 2) ** 2)
        eps = rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize("z, rounds", [(1.0, 30), (4.0, 10), (10.0, 100)])
def test_epsilon_of_unsampled_rounds_is_the_gaussian_mechanism_at_twice_the_clip(z, rounds):
    ledger = Ledger(1e-5, [Release(z, 20, 20)] * rounds)
    assert ledger.epsilon == pytest.approx(_gaussian_epsilon(z, rounds, 1e-5), rel=1e-6)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    def eps(z, k, n, rounds=20):
        return Ledger(1e-5, [Release(z, k, n)] * rounds).epsilon

    assert Ledger(1e-5).epsilon == 0.0
    assert eps(1.0, 10, 10, 10) < eps(1.0, 10, 10, 20)
    assert eps(2.0, 10, 10) < eps(1.0, 10, 10)
    assert eps(2.0, 10, 100) < eps(2.0, 10, 10)  # sampling one in ten amplifies
    assert math.isinf(eps(0.0, 10, 10))


def test_a_resumed_ledger_carries_on_where_the_checkpoint_stopped():
    releases = [Release(1.0, 5, 50), Release(0.8, 5, 40), Release(1.0, 5, 50)]
    history = History()
    for r in releases[:2]:
        history.add(_record({**dataclasses.asdict(r), "summed": 5, "epsilon": 0.0}))
    history = pickle.loads(pickle.dumps(history))
    resumed = Ledger(1e-5, releases_of(history.releases))
    resumed.add(releases[2])
    assert resumed.epsilon == Ledger(1e-5, releases).epsilon


def _record(privacy: dict) -> dict:
    return {"round": 1, "examples": 0, "correct": 0, "loss_sum": 0.0, "clients_ok": 5,
            "failures": [], "bytes_up": 0, "bytes_down": 0, "round_trips": 1,
            "drift_count": 0, "dropped": 0, "clients": {}, "privacy": privacy}


# --- rounds over real clients -------------------------------------------------------------


def test_server_noise_goes_onto_the_mean_of_the_changes_it_clipped(tmp_path):
    replies: list[Message] = []
    _, records, models, start = _run(tmp_path, ["privacy.noise_multiplier=0",
                                                "privacy.clip_norm=0.05"], _spy(replies))
    first = [r for r in replies[:6] if not r.has_error()]
    changes = [_flat(r.content[m.ARRAYS]) - start for r in first]  # sent as trained: unclipped
    clipped = [c * min(1.0, 0.05 / np.linalg.norm(c)) for c in changes]
    assert np.allclose(models[0], start + np.mean(clipped, axis=0), atol=1e-6)
    entry = records[0]["privacy"]
    assert entry["clipped"] == sum(np.linalg.norm(c) > 0.05 for c in changes) > 0
    assert entry["median_norm"] == pytest.approx(np.median([np.linalg.norm(c) for c in changes]))
    assert math.isinf(entry["epsilon"]) and entry["void"] == VOID_NO_NOISE  # null in JSON

    _, noisy, noisy_models, _ = _run(tmp_path / "n", ["privacy.noise_multiplier=2",
                                                       "privacy.clip_norm=0.05"])
    noise = noisy_models[0] - models[0]  # the same seed, so the same clients: only noise
    assert noise.std() == pytest.approx(2 * 0.05 / 6, rel=0.1)
    assert noisy[0]["privacy"]["epsilon"] == pytest.approx(
        _gaussian_epsilon(2.0, 1, 1e-3), rel=1e-6)


def test_secure_aggregation_sums_the_clients_noise_as_plaintext_would(tmp_path):
    noise = ["privacy.noise_at=clients", "privacy.noise_multiplier=1", "privacy.clip_norm=0.05"]
    grid, plain, plain_models, start = _run(tmp_path / "p", noise)
    _, secure, secure_models, _ = _run(tmp_path / "s", [*noise, "secure_aggregation.enabled=true"])
    train = [msg for msg in grid.sent if msg.metadata.message_type == MessageType.TRAIN]
    assert {msg.content[m.CONFIG][m.DP_STD] for msg in train} == {1 * 0.05 / math.sqrt(6)}
    # Seeded noise: the same clients add the same noise; secure only adds its rounding.
    step = 1 * 0.05 / 6  # the deviation of the noise on the mean, per coordinate
    assert np.abs(secure_models[0] - plain_models[0]).max() < step / 100
    assert (plain_models[0] - start).std() > step  # and the noise is there
    assert [r["privacy"]["epsilon"] for r in secure] == [r["privacy"]["epsilon"] for r in plain]


def test_secure_aggregations_range_never_cuts_the_clients_noise(tmp_path):
    # A target epsilon over few clients asks each for noise above secure_aggregation.clip:
    # clipping that noise per coordinate would leave less of it in the sum than the ledger
    # counts (a new user's run clipped 46 % of the coordinates and still reported epsilon).
    noise = ["privacy.noise_at=clients", "privacy.noise_multiplier=10", "privacy.clip_norm=0.5"]
    _, _, plain_models, start = _run(tmp_path / "p", noise)
    _, secure, secure_models, _ = _run(tmp_path / "s", [*noise, "secure_aggregation.enabled=true"])
    std = 10 * 0.5 / math.sqrt(6)  # each client's noise, per coordinate: twice the set clip
    assert [r["coordinate_clip"] for r in secure] == pytest.approx([0.5 + 12 * std] * 3)
    assert {r["clipped_fraction"] for r in secure} == {0.0}
    assert np.abs(secure_models[-1] - plain_models[-1]).max() < 1e-4 * std
    assert (plain_models[0] - start).std() > 10 * 0.5 / 6 / 2  # the noise is all there


def test_without_privacy_the_range_is_the_one_set(tmp_path):
    from fedstream.server.privacy import secure_clip

    assert secure_clip(1.0, 0.5, 0.0) == 1.0 and secure_clip(0.1, 0.5, 0.0) == 0.5
    cfg = load(None, [*BASE, "privacy.enabled=false", "secure_aggregation.enabled=true",
                      "secure_aggregation.clip=0.25"])
    grid = LoopbackGrid(sim_client_app(cfg), 6)
    records: list[dict] = []
    run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path, simulated=True,
                   on_round=lambda rec, _h: records.append(rec))
    assert {r["coordinate_clip"] for r in records} == {0.25}


def test_clients_that_drop_out_take_their_noise_with_them(tmp_path):
    def drop_one(node, reply):
        return None if node == 1000 else reply

    _, records, _, _ = _run(tmp_path, ["privacy.noise_at=clients"], drop_one)
    entry = records[0]["privacy"]
    assert (entry["sampled"], entry["summed"]) == (6, 5)
    assert entry["noise_multiplier"] == pytest.approx(math.sqrt(5 / 6))
    assert records[-1]["privacy"]["epsilon"] == pytest.approx(
        Ledger(1e-3, releases_of(r["privacy"] for r in records)).epsilon)


def test_summary_and_cli_say_what_the_run_cost(tmp_path, capsys):
    cfg = load(None, [*BASE, "privacy.noise_multiplier=3"])
    grid = LoopbackGrid(sim_client_app(cfg), 6)
    _, history = run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path,
                                simulated=True)
    summary = {**run_summary(cfg, history), "wall_seconds": 1.0}
    p = summary["privacy"]
    assert p["releases"] == 3 and p["noise_at"] == "server" and p["delta"] == 1e-3
    assert p["epsilon"] == pytest.approx(_gaussian_epsilon(3.0, 3, 1e-3), rel=1e-6)
    assert 0 <= p["clipped_updates"] <= 1 and p["median_norm"] > 0
    print_summary(summary, tmp_path)
    out = capsys.readouterr().out
    assert f"Differential privacy: epsilon = {p['epsilon']:.3g} at delta = 0.001 after 3" in out
    # In plaintext the bound is for those who see the models, never for the server.
    assert "The server sees each update without noise: no bound holds against it" in out
    assert run_summary(load(None, BASE[:-2]), history)["privacy"] is None


def test_the_printed_bound_says_whom_it_holds_against(capsys):
    from fedstream.cli.main import _privacy_line

    p = {"noise_multiplier": 1.0, "clip_norm": 0.5, "noise_at": "clients", "epsilon": 5.0,
         "epsilon_known_cohorts": 9.0, "delta": 1e-5, "releases": 3}
    plain, secure = _privacy_line(p, secure=False), _privacy_line(p, secure=True)
    assert "(the server does): epsilon = 9" in secure and "The server sees" not in secure
    assert "and sees only the models: epsilon = 9" in plain and "(the server does)" not in plain
    assert "with only its own client's share of the noise: no bound holds against it" in plain
    server = _privacy_line({**p, "noise_at": "server"}, secure=True)
    assert "sees each round's sum without noise: no bound holds against it" in server
    # A deployment's summary read back from records made before `void` said why.
    older = _privacy_line({**p, "epsilon": None, "void": None}, secure=True)
    assert older.startswith("Differential privacy: no guarantee") and "without noise" in older


def test_settings_that_work_against_the_run_are_named_before_it_starts(tmp_path):
    from fedstream.protocol.config import risky_settings, to_toml

    assert risky_settings(load(None, [])) == []
    adam = load(None, ["federation.strategy=fedadam", "federation.server_lr=3"])
    assert risky_settings(adam) == [
        "federation.server_lr = 3 with fedadam: an adaptive server step this large diverges "
        "(its own is 0.1; server_lr = 0 picks the strategy's own)"]
    server_noise = load(None, [*BASE, "secure_aggregation.enabled=true",
                               'privacy.noise_at="server"'])
    [note] = risky_settings(server_noise)
    assert "not against the server" in note
    # A config written out says "derive it" where the value is the derived one, so editing
    # the strategy or switching secure aggregation on derives them anew.
    text = to_toml(load(None, ["privacy.enabled=true"]))
    assert "server_lr = 0.0" in text and 'noise_at = "auto"' in text
    assert "server_lr = 1.0" in to_toml(load(None, BASE))  # a choice is kept as made
    path = tmp_path / "mine.toml"
    path.write_text(text)
    edited = load(path, ["federation.strategy=fedadam", "secure_aggregation.enabled=true"])
    assert edited.federation.server_lr == 0.1 and edited.privacy.noise_at == "clients"
    assert 'noise_at = "server"' in to_toml(server_noise)  # a choice is kept as made
    # Also one that auto would have made: switching secure aggregation on later must not
    # quietly move a chosen placement.
    chosen = load(None, ["privacy.enabled=true", 'privacy.noise_at="server"'])
    assert 'noise_at = "server"' in to_toml(chosen) and from_json(to_json(chosen)) == chosen


def test_server_asks_clients_to_clip_only_where_it_cannot_clip_itself():
    cfg = load(None, [*BASE, "privacy.noise_multiplier=2", "privacy.clip_norm=0.5"]).privacy
    messages = [_train_message({}) for _ in range(4)]
    Privacy(cfg, secure=False).ask(messages, population=10)
    assert all(m.DP_CLIP not in msg.content[m.CONFIG] for msg in messages)
    Privacy(cfg, secure=True).ask(messages, population=10)  # the server adds the noise
    assert {(msg.content[m.CONFIG][m.DP_CLIP], msg.content[m.CONFIG][m.DP_STD])
            for msg in messages} == {(0.5, 0.0)}


def test_privacy_settings_that_cannot_protect_are_refused():
    with pytest.raises(ConfigError, match=r"privacy\.delta = 0\.2 is not below 1 / federation"):
        load(None, ["privacy.enabled=true", "privacy.delta=0.2", "federation.clients=10"])
    with pytest.raises(ConfigError, match=r"privacy\.clip_norm"):
        load(None, ["privacy.enabled=true", "privacy.clip_norm=0"])
    assert load(None, ["privacy.enabled=true"]).privacy.noise_at == "server"
    secure = ["privacy.enabled=true", "secure_aggregation.enabled=true"]
    assert load(None, secure).privacy.noise_at == "clients"


def test_the_privacy_plot_is_drawn_only_when_an_epsilon_holds(tmp_path):
    from fedstream.sim.plots import plot_all

    def rec(r, privacy):
        return {"round": r, "clients": {}, "privacy": privacy}

    summary = {"accuracy_per_round": [0.5, 0.6], "cumulative_accuracy": [0.5, 0.55],
               "drift_times": [], "privacy": {"delta": 1e-5, "noise_multiplier": 1.0,
                                              "clip_norm": 0.5, "noise_at": "server"}}
    spent = [rec(1, {"epsilon": 1.5}), rec(2, {"epsilon": 2.0})]
    assert (tmp_path / "plots" / "privacy.png") in plot_all(tmp_path, summary, spent)
    unbounded = [rec(1, {"epsilon": None}), rec(2, None)]  # no noise, then a failed round
    (tmp_path / "b").mkdir()
    assert [p.name for p in plot_all(tmp_path / "b", summary, unbounded)] == ["accuracy.png"]
    in_memory = [rec(1, {"epsilon": math.inf}), rec(2, None)]  # held so until JSON: null
    (tmp_path / "c").mkdir()
    assert [p.name for p in plot_all(tmp_path / "c", summary, in_memory)] == ["accuracy.png"]


def test_a_round_that_released_nothing_spends_nothing_on_the_plot():
    from fedstream.sim.plots import _spent

    records = [{"round": 1, "privacy": {"epsilon": 1.0}}, {"round": 2, "privacy": None},
               {"round": 3}, {"round": 4, "privacy": {"epsilon": 1.5}}]
    assert _spent(records) == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.5)]
    assert _spent([{"round": 1}, *records[3:]]) == [(1, 0.0), (4, 1.5)]  # none spent before
    assert _spent([*records[:1], {"round": 2, "privacy": {"epsilon": None}}]) == [(1, 1.0)]


def test_the_privacy_plot_says_whom_epsilon_holds_against_in_whole_rounds(monkeypatch, tmp_path):
    from fedstream.sim import plots

    drawn: list = []
    monkeypatch.setattr(plots.plt, "close", drawn.append)
    summary = {"cumulative_accuracy": [0.5, 0.55], "secure_aggregation": True,
               "privacy": {"delta": 1e-5, "noise_multiplier": 1.0, "clip_norm": 0.5,
                           "noise_at": "clients"}}
    records = [{"round": 1, "privacy": {"epsilon": 1.5}}, {"round": 2, "privacy": {"epsilon": 2}}]
    plots.privacy_plot(tmp_path, summary, records)
    summary["privacy"]["noise_at"] = "server"  # the server sees each sum exactly
    plots.privacy_plot(tmp_path, summary, records)
    secure, server = (fig.axes[0] for fig in drawn)
    assert "not for the server" not in secure.get_title()
    assert "not for the server" in server.get_title()
    ticks = [t for t in secure.get_xticks() if 1 <= t <= 2]
    assert ticks and all(float(t).is_integer() for t in ticks)
    monkeypatch.undo()
    for fig in drawn:
        plots.plt.close(fig)


@pytest.mark.parametrize(
    "target, sampled, population",
    [(8.0, 20, 20), (2.0, 10, 100), (111.1, 19, 20), (300.0, 20, 20), (8.0, 10, 20)],
)
def test_a_target_epsilon_is_met_by_the_smallest_noise_that_meets_it(target, sampled, population):
    from fedstream.server.privacy import calibrated

    z = calibrated(target, 1e-5, 30, sampled, population)

    def spent(noise):
        ledger = Ledger(1e-5)
        ledger.add(Release(noise, sampled, population), 30)
        return ledger.epsilon

    assert spent(z) <= target < spent(z * (1 - 1e-5))


@pytest.mark.parametrize("z", [100.0, 300.0, 1000.0, 5000.0])
def test_much_noise_is_accounted_as_tightly_as_dp_accountings_own_orders_allow(z):
    """Large noise reaches its small epsilon only at large Renyi orders: capped at 128, no
    epsilon fell below 0.045 and a target of 0.03 was met with 700 times its noise."""
    from dp_accounting import dp_event, privacy_accountant, rdp

    reference = rdp.RdpAccountant(  # dp-accounting's default orders, to 1024
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE)
    reference.compose(dp_event.GaussianDpEvent(z / 2), 3)
    ours = Ledger(1e-5, [Release(z, 6, 6)] * 3).epsilon
    assert 0 < ours <= reference.get_epsilon(1e-5) * (1 + 1e-9)
    assert Ledger(1e-5, [Release(2 * z, 6, 6)] * 3).epsilon < ours  # always falling


@pytest.mark.parametrize("target", [0.001, 0.03])
def test_a_small_target_epsilon_gets_the_noise_it_needs_not_far_more(target):
    from fedstream.server.privacy import calibrated

    z = calibrated(target, 1e-5, 2, 6, 6)
    spent = Ledger(1e-5, [Release(z, 6, 6)] * 2).epsilon
    assert target * 0.999 < spent <= target  # not 2e5 and an epsilon of 0
    assert z < 10_000


def test_a_run_with_a_target_epsilon_ends_within_it(tmp_path, capsys):
    cfg = load(None, [*BASE, "privacy.target_epsilon=20"])
    grid = LoopbackGrid(sim_client_app(cfg), 6)
    _, history = run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path,
                                simulated=True)
    p = run_summary(cfg, history)["privacy"]
    assert p["target_epsilon"] == 20 and 19.9 < p["epsilon"] <= 20
    assert p["noise_multiplier"] == pytest.approx(history.releases[0]["noise_multiplier"])
    print_summary({**run_summary(cfg, history), "wall_seconds": 1.0}, tmp_path)
    assert "(calibrated for epsilon 20)" in capsys.readouterr().out


def test_an_update_its_client_did_not_privatise_is_never_released(tmp_path):
    """A client without the privacy mod (an old device app, say): plaintext or secure, the
    server refuses to make a model of a sum with its unbounded update in it."""
    from flwr.clientapp import ClientApp

    from fedstream.client.app import train_round
    from fedstream.client.secure import secure_aggregation_mod
    from fedstream.sim.client_app import virtual_stream

    cfg = load(None, [*BASE, "secure_aggregation.enabled=true"])

    def unprivate(config):
        app = ClientApp(mods=[secure_aggregation_mod])

        @app.train()
        def _train(msg, ctx):
            return train_round(msg, ctx, config, virtual_stream(config, ctx))

        @app.query()
        def _query(msg, ctx):
            return Message(m.roster_reply(virtual_stream(config, ctx).client), reply_to=msg)

        return app

    for c in (cfg, load(None, [*BASE, "privacy.noise_at=clients"])):
        records: list[dict] = []
        run_federation(LoopbackGrid(unprivate(c), 6), c, federation(c).initial_arrays(),
                       tmp_path, on_round=lambda rec, _h, into=records: into.append(rec),
                       simulated=True)
        assert not any(r["aggregated"] for r in records)
        assert "6 of 6 clients sent an update they had not clipped and noised" in (
            records[0]["aggregation_error"])
        if c.secure_aggregation.enabled:  # the server saw the sum, noise-free: no bound
            assert all(math.isinf(r["privacy"]["epsilon"] or math.inf) for r in records)
            assert records[0]["privacy"]["noise_multiplier"] == 0
        else:  # plaintext: the sum was never made
            assert all("privacy" not in r for r in records)


def test_a_round_whose_clients_learned_nothing_still_releases_its_noisy_model(tmp_path):
    """Whether a model comes out must not depend on the data: an empty round is released
    (the noise alone), and accounted."""
    _, records, models, start = _run(tmp_path, ["stream.rate=0.0001", "privacy.noise_multiplier=1"])
    assert [r["examples"] for r in records] == [0, 0, 0]
    assert all(r["aggregated"] and r["privacy"]["summed"] == 6 for r in records)
    assert not np.allclose(models[0], start)  # the noise moved it
    # Updates without new samples have no size to measure: they do not pull the median
    # norm, nor the share clipped, towards zero.
    assert all("median_norm" not in r["privacy"] for r in records)


def test_the_norms_the_server_measures_leave_out_updates_without_samples(tmp_path):
    def no_samples(node, reply):
        if node in (1000, 1001):
            reply.content[m.METRICS][m.NUM_EXAMPLES] = 0
        return reply

    _, records, _, _ = _run(tmp_path, ["privacy.noise_multiplier=1"], no_samples)
    assert {(r["privacy"]["summed"], r["privacy"]["measured"]) for r in records} == {(6, 4)}


def test_a_sampled_round_never_reads_as_costlier_than_an_unsampled_one():
    def eps(k, n):
        return Ledger(1e-5, [Release(1.0, k, n)] * 30).epsilon

    assert eps(19, 20) <= eps(20, 20) and eps(15, 20) <= eps(20, 20)
    assert eps(2, 20) < eps(20, 20) / 3  # where sampling amplifies, it still counts


def test_the_server_that_knows_the_cohorts_is_accounted_for_by_the_busiest_client(tmp_path):
    _, records, _, _ = _run(tmp_path, ["federation.fraction=0.5", "federation.rounds=4",
                                       "privacy.noise_multiplier=2"])
    rounds_in = {}
    for rec in records:
        assert len(rec["privacy"]["clients"]) == rec["privacy"]["summed"] == 3
        for client in rec["privacy"]["clients"]:
            rounds_in[client] = rounds_in.get(client, 0) + 1
    last = records[-1]["privacy"]
    busiest = max(rounds_in.values())
    assert last["epsilon_known_cohorts"] == pytest.approx(
        _gaussian_epsilon(2.0, busiest, 1e-3), rel=1e-6)


def test_deployed_cohorts_are_secret_and_simulated_ones_repeat(tmp_path):
    def cohorts(simulated, folder, rounds=3):
        cfg = load(None, [*BASE, "federation.fraction=0.5", f"federation.rounds={rounds}"])
        records: list[dict] = []
        run_federation(LoopbackGrid(sim_client_app(cfg), 6), cfg,
                       federation(cfg).initial_arrays(), tmp_path / folder,
                       on_round=lambda rec, _h: records.append(rec), simulated=simulated)
        return [r["privacy"]["clients"] for r in records]

    assert cohorts(True, "a") == cohorts(True, "b")
    # 3 of 6 clients a round: two secret draws of 7 rounds agree by chance once in 20^7.
    assert cohorts(False, "c", 7) != cohorts(False, "d", 7)


def test_two_nodes_of_one_client_are_one_client_of_the_population(tmp_path):
    cfg = load(None, [*BASE, "federation.fraction=0.5"])
    grid = LoopbackGrid(sim_client_app(cfg), 6, node_config=lambda p: {"partition-id": min(p, 4)})
    records: list[dict] = []
    run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path,
                   on_round=lambda rec, _h: records.append(rec), simulated=True)
    assert {r["privacy"]["population"] for r in records} == {5}


@pytest.mark.parametrize(
    "aggregated, clients, void",
    [(1, True, None), (3, True, "released without privacy"), (1, False, "whose updates")],
)
def test_a_checkpoint_that_cannot_vouch_for_its_rounds_voids_both_bounds(
    tmp_path, capsys, aggregated, clients, void
):
    """Rounds released before privacy was on, or recorded before the ledger kept whose
    updates each sum held: no bound holds after the resume, and the run says why."""
    cfg = load(None, BASE)
    entry = {**dataclasses.asdict(Release(1.0, 6, 6)), "epsilon": 5.0, "epsilon_known_cohorts": 5.0}
    if clients:
        entry["clients"] = ["client 1"]
    privacy = Privacy(cfg.privacy, secure=False)
    privacy.resume([entry], aggregated=aggregated)
    privacy.ask([_train_message({})], population=6)
    fresh = privacy.release(1, ["client 1"])
    history = History(releases=[entry], privacy_void=privacy.void)
    summary = {**run_summary(cfg, history), "wall_seconds": 1.0}
    if void is None:
        assert math.isfinite(fresh["epsilon"]) and privacy.exposure == {"client 1": 2.0}
        return
    assert void in privacy.void and math.isinf(fresh["epsilon_known_cohorts"])
    assert math.isinf(summary["privacy"]["epsilon"]) and void in summary["privacy"]["void"]
    print_summary(summary, tmp_path)
    assert "no guarantee" in capsys.readouterr().out


def test_noise_that_is_not_a_number_bounds_nothing():
    assert math.isinf(Ledger(1e-5, [Release(math.nan, 5, 10)]).epsilon)


def test_settings_a_run_will_not_use_are_named_before_it_starts():
    from fedstream.protocol.config import ignored_settings
    from fedstream.server.app import privacy_plan

    off = load(None, ["privacy.target_epsilon=5", "secure_aggregation.threshold=3",
                      "federation.clients=6"])
    notes = ignored_settings(off)
    assert notes[0].startswith("privacy.target_epsilon is set, but privacy.enabled is false")
    assert "secure_aggregation.threshold is set, but secure_aggregation.enabled" in notes[1]
    assert privacy_plan(off) is None
    both = load(None, [*BASE, "privacy.noise_multiplier=3", "privacy.target_epsilon=50"])
    assert ignored_settings(both) == [
        "privacy.noise_multiplier = 3 is not used: privacy.target_epsilon = 50 chooses the "
        "multiplier"]
    plan = privacy_plan(both)
    assert plan is not None and "(calibrated for epsilon 50 at delta 0.001 over 3 rounds" in plan
    # A config a run wrote out holds every key at its value: defaults say nothing.
    assert ignored_settings(load(None, ["privacy.noise_multiplier=1.0"])) == []
    # A key of another strategy, optimizer, mode or schedule than the one chosen.
    assert ignored_settings(load(None, [
        'federation.strategy="fedadam"', "federation.server_momentum=0.9",
        'learner.optimizer="adam"', "learner.momentum=0.5", "learner.epochs=3",
        "learner.window=100", "learner.t_max=50"])) == [
        "federation.server_momentum = 0.9 is not used: it is for fedavg (FedAvgM); fedadam "
        "has beta1, beta2 and tau",
        'learner.momentum = 0.5 is not used: it is for learner.optimizer = "sgd"',
        'learner.epochs = 3, learner.window = 100 are not used: they are for learner.mode = '
        '"batch"',
        'learner.t_max = 50 is not used: it is for learner.schedule = "cosine"']
    assert ignored_settings(load(None, ['learner.schedule="cosine"', "learner.t_max=50",
                                        'learner.mode="batch"', "learner.epochs=3"])) == []
    # A simulated dropout is copied into secure_aggregation.dropout: not set by the user.
    assert ignored_settings(load(None, ["simulation.dropout=0.2"])) == []
    assert "secure_aggregation.dropout is set" in ignored_settings(
        load(None, ["simulation.dropout=0.2", "secure_aggregation.dropout=0.3"]))[0]

"""Virtual federations: streams from config alone, the same in every process."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from fedstream.client.app import new_learner
from fedstream.client.sources.replay import ArraySource
from fedstream.protocol.config import ConfigError, ignored_settings, load
from fedstream.sim.baselines import run_centralized, run_local
from fedstream.sim.federation import Federation, federation


def test_streams_are_a_function_of_the_config() -> None:
    cfg = load(overrides=["federation.clients=5"])
    a, b = Federation(cfg).stream(3), Federation(cfg).stream(3)
    x1, x2 = a.take(0, 50), b.take(0, 50)
    np.testing.assert_array_equal(x1.x, x2.x)
    np.testing.assert_array_equal(x1.y, x2.y)
    assert federation(cfg) is federation(cfg)  # cached per process


def test_clients_differ_in_labels_and_rates() -> None:
    cfg = load(overrides=["federation.clients=6", "partition.alpha=0.1"])
    fed = federation(cfg)
    hists = [np.bincount(fed.stream(c).take(0, 300).y, minlength=10) for c in range(6)]
    assert len({int(h.argmax()) for h in hists}) > 1, "Dirichlet(0.1) must skew labels"
    assert len({fed.stream(c).arrived(10.0) for c in range(6)}) > 1


def test_digits_partitions_cover_the_dataset_once() -> None:
    overrides = ["stream.source=digits", "federation.clients=7", "partition.scheme=shards"]
    cfg = load(overrides=overrides)
    fed = federation(cfg)
    rows = np.concatenate(fed.dataset.parts)
    assert len(rows) == len(np.unique(rows)) == 1797
    assert fed.feature_shape == (64,)


def test_replayed_data_drifts_by_relabelling() -> None:
    cfg = load(overrides=["stream.source=digits", "federation.clients=2", "drift.at=[2.0]",
                          "drift.stagger=0.0", "stream.arrival=fixed", "stream.rate=100.0"])
    stream = federation(cfg).stream(0)
    source = stream.source
    index = np.arange(50)
    _, before = source.draw(index, np.full(50, 1.0))
    _, after = source.draw(index, np.full(50, 3.0))
    assert (before != after).mean() > 0.5  # same inputs, other classes


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_every_drift_moves_every_label(classes: int) -> None:
    # A random permutation of yes/no is no drift half the time; two drifts in a row may
    # draw the same one. Each drift must move every class, whatever the seed.
    from fedstream.client.sources.drift import DriftSchedule
    from fedstream.client.sources.relabel import Relabel

    for seed in range(20):
        base = ArraySource(np.zeros((classes, 1), np.float32), np.arange(classes),
                           np.arange(classes), classes)
        source = Relabel(base, DriftSchedule("abrupt", (1.0, 2.0, 3.0), 0.0), seed=seed,
                         client=0)
        index = np.arange(classes)
        concepts = [source.draw(index, np.full(classes, t))[1] for t in (0.5, 1.5, 2.5, 3.5)]
        for before, after in itertools.pairwise(concepts):
            assert np.all(before != after), (seed, concepts)


def test_cnn_learns_on_image_shaped_digits() -> None:
    cfg = load(overrides=["stream.source=digits", "learner.model=cnn", "federation.clients=1",
                          'drift.kind="none"', "learner.lr=0.05", "learner.momentum=0.9"])
    fed = federation(cfg)
    assert fed.feature_shape == (1, 8, 8)
    learner = new_learner(cfg, fed.feature_shape, fed.n_classes)
    batch = fed.stream(0).take(0, 1500)
    for _ in range(3):
        learner.learn(batch.x, batch.y)
    logits = learner.model(torch.from_numpy(batch.x))
    assert (logits.argmax(1).numpy() == batch.y).mean() > 0.8


def test_csv_federation_with_time_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["when,f1,f2,kind"]
    for i in range(200):
        f1, f2 = rng.normal(size=2)
        rows.append(f"{199 - i},{f1:.4f},{f2:.4f},{'up' if f1 + f2 > 0 else 'down'}")
    path = tmp_path / "data.csv"
    path.write_text("\n".join(rows) + "\n")
    cfg = load(overrides=["stream.source=csv", f'stream.path="{path}"', "stream.label=kind",
                          "stream.time=when", "federation.clients=4", "partition.scheme=iid"])
    fed = federation(cfg)
    assert fed.feature_shape == (2,) and fed.n_classes == 2
    assert sum(len(p) for p in fed.dataset.parts) == 200


def test_global_evaluation_holdout_is_held_back() -> None:
    cfg = load(overrides=["stream.source=digits", "evaluation.every=1", "evaluation.holdout=100"])
    fed = federation(cfg)
    train_rows = np.concatenate(fed.dataset.parts)
    assert len(fed.dataset.holdout) == 100
    assert not np.intersect1d(train_rows, fed.dataset.holdout).size
    x, y = fed.holdout(5.0)
    assert len(y) == len(x) == 100


def test_a_files_global_evaluation_follows_the_rows_its_round_brought(tmp_path: Path) -> None:
    # The label flips halfway through the file: each round must be scored on held-back
    # rows of its own stretch, not on a mix of both concepts.
    from fedstream.client.arrival import round_end
    from fedstream.sim.federation import HELD_AT_LEAST

    x = np.random.default_rng(0).normal(size=4000)
    label = np.where(np.arange(4000) < 2000, x > 0, x <= 0).astype(int)
    path = tmp_path / "flip.csv"
    path.write_text("x,label\n" + "".join(f"{a:.4f},{b}\n" for a, b in zip(x, label,
                                                                          strict=True)))
    cfg = load(overrides=["stream.source=csv", f'stream.path="{path}"', "federation.clients=2",
                          "partition.scheme=iid", "stream.arrival=fixed", "stream.rate=100",
                          "stream.rate_spread=0", "evaluation.every=1", "federation.rounds=16",
                          "drift.kind=none"])
    fed = federation(cfg)
    rows = fed.dataset.holdout
    for r in range(1, 17):
        xs, ys = fed.holdout(round_end(r))
        brought = np.concatenate([part[fed.stream(c).arrived(r - 1):fed.stream(c).arrived(
            round_end(r))] for c, part in enumerate(fed.dataset.parts)])
        before = int(np.searchsorted(rows, brought.max(), side="right"))  # held so far
        assert min(HELD_AT_LEAST, before) <= len(ys) < len(rows)
        # The newest held-back row scored is no later than the round's last row.
        newest = rows[np.searchsorted(rows, brought.max(), side="right") - 1]
        assert newest <= brought.max()
        concept = (xs[:, 0] > 0) if brought.max() < 1800 else (xs[:, 0] <= 0)
        if brought.max() < 1800 or brought.min() > 2500:
            assert (ys == concept).mean() > 0.9, r


def test_a_stream_run_dry_does_not_stretch_the_evaluation_to_the_end_of_the_file(
    tmp_path: Path,
) -> None:
    from fedstream.client.arrival import round_end

    # Site b has a row in ten: at the same rate it runs dry early, its last row near the end.
    path = tmp_path / "sites.csv"
    path.write_text("site,x,label\n" + "".join(
        f"{'b' if i % 10 == 0 else 'a'},{i % 7},{i % 2}\n" for i in range(5000)))
    cfg = load(overrides=["stream.source=csv", f'stream.path="{path}"', "federation.clients=2",
                          "partition.scheme=column", "partition.column=site",
                          "stream.arrival=fixed", "stream.rate=100", "stream.rate_spread=0",
                          "evaluation.every=1", "federation.rounds=30", "drift.kind=none"])
    fed = federation(cfg)
    a, b = fed.dataset.parts
    dry = next(r for r in range(1, 31) if fed.stream(1).arrived(r - 1) >= len(b))
    for r in range(dry + 1, dry + 4):
        rows = fed.dataset.holdout[fed._held_in_round(round_end(r))]
        brought = a[fed.stream(0).arrived(r - 1):fed.stream(0).arrived(round_end(r))]
        assert rows.max() <= brought.max() < int(b[-1])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_baselines_see_the_same_samples(scheme: str) -> None:
    cfg = load(overrides=["federation.clients=3", "federation.rounds=3", "stream.rate=10.0",
                          f'partition.scheme="{scheme}"', "learner.hidden=[8]"])
    local, central = run_local(cfg), run_centralized(cfg)
    fed = federation(cfg)
    expected = sum(fed.stream(c).arrived(3.0) for c in range(3))
    assert local.seen == central.seen == expected
    assert len(local.per_round) == len(central.per_round) == 3


def test_a_file_with_columns_far_from_unit_scale_gets_a_hint(tmp_path: Path) -> None:
    from fedstream.sim.hints import scale_hint

    rng = np.random.default_rng(0)
    rows = ["temp;pressure;ok"] + [
        f"{t:.2f};{p:.1f};{int(t > 0)}".replace(".", ",")
        for t, p in zip(rng.normal(0, 1, 100), rng.normal(1013, 5, 100), strict=True)
    ]
    path = tmp_path / "de.csv"
    path.write_text("\n".join(rows) + "\n")
    base = ["stream.source=csv", f'stream.path="{path}"', "stream.label=ok"]
    hint = scale_hint(load(overrides=base))
    assert hint is not None and "'pressure' ~ 1.01e+03" in hint and "'temp'" not in hint
    assert "learner.standardize=true" in hint
    assert scale_hint(load(overrides=[*base, "learner.standardize=true"])) is None
    assert scale_hint(load(overrides=["federation.clients=3"])) is None  # synthetic: unit scale


def test_global_evaluation_feeds_the_model_standardised_features(tmp_path: Path) -> None:
    # With learner.standardize the clients' model only ever sees standardised inputs; the
    # server's evaluation on the held-back slice must feed it the same kind.
    from flwr.app import ArrayRecord

    from fedstream.sim.evaluation import make_evaluate

    rng = np.random.default_rng(1)
    temp, pressure = rng.normal(20, 3, 1000), rng.normal(1013, 5, 1000)
    rows = ["temp,pressure,y"] + [
        f"{t:.3f},{p:.2f},{int(t > 20)}" for t, p in zip(temp, pressure, strict=True)
    ]
    path = tmp_path / "sensors.csv"
    path.write_text("\n".join(rows) + "\n")
    cfg = load(overrides=[
        "stream.source=csv", f'stream.path="{path}"', "stream.label=y", "federation.clients=2",
        "partition.scheme=iid", "learner.standardize=true", "evaluation.every=1",
        "evaluation.holdout=200", 'drift.kind="none"',
    ])
    fed = federation(cfg)
    learner = new_learner(cfg, fed.feature_shape, fed.n_classes)
    batch = fed.stream(0).take(0, 400)
    for _ in range(3):
        learner.learn(batch.x, batch.y)
    assert learner.metric.accuracy > 0.8
    # Round 20: the streams have brought most of the file, and its held-back rows with it.
    result = make_evaluate(cfg)(20, ArrayRecord(learner.get_weights()))
    assert result["examples"] >= 50 and result["accuracy"] > 0.85, result


def _csv(tmp_path: Path, rows: list[str], name: str = "d.csv") -> list[str]:
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return ["stream.source=csv", f'stream.path="{path}"', "federation.clients=2"]


@pytest.mark.parametrize(
    ("rows", "extra", "fragment"),
    [
        (["a,label"] + [f"{i},yes" for i in range(30)], [], "has a single class ('yes')"),
        (["a,label"] + [f"{i},{i * 0.37:.2f}" for i in range(40)], [], "is a measurement"),
        (["a,label", "1,0", "2,1", "3,0"], ["evaluation.every=1"], "too few to hold back"),
        (["a,label", "1,0", "2,1"], ["federation.clients=3"], "federation.clients = 3"),
        (["a,label"] + [f"{i},{i % 3}" for i in range(9)],
         ["partition.scheme=shards", "partition.shards_per_client=1"],
         "cannot cover the 3 classes"),
        (["a,label"] + [f"{i},{i % 2}" for i in range(9)],
         ["partition.scheme=shards", "partition.shards_per_client=5"], "exceed the 9 rows"),
    ],
)
def test_a_file_a_federation_cannot_use_is_refused_in_config_keys(
    tmp_path: Path, rows: list[str], extra: list[str], fragment: str
) -> None:
    from fedstream.client.sources import DataError
    from fedstream.sim.runner import preflight

    with pytest.raises(DataError, match=r"d\.csv") as info:
        preflight(load(overrides=[*_csv(tmp_path, rows), *extra]))
    assert fragment in str(info.value)


def test_hints_for_rows_that_run_out_and_for_labels_with_fractions(tmp_path: Path) -> None:
    from fedstream.sim.hints import exhaustion_hint, label_hint

    base = _csv(tmp_path, ["a,label"] + [f"{i},{i % 2}" for i in range(150)])
    hint = exhaustion_hint(load(overrides=[*base, "stream.rate=30", "federation.rounds=30"]))
    assert hint is not None and "the rows of 2 of 2 clients" in hint
    assert "before the last of the 30 rounds (client " in hint
    assert exhaustion_hint(load(overrides=[*base, "stream.rate=1", "federation.rounds=30"])) is None
    assert "partition.alpha" not in hint  # an even split: the rate is what to change
    skewed = _csv(tmp_path, ["a,label"] + [f"{i},{i % 2}" for i in range(600)], "s.csv")
    hint = exhaustion_hint(load(overrides=[*skewed, "stream.rate=10", "federation.rounds=30",
                                           "federation.clients=4", "partition.alpha=0.05"]))
    assert hint is not None and "or raise partition.alpha (now 0.05; clients hold" in hint
    assert label_hint(load(overrides=base)) is None
    graded = _csv(tmp_path, ["a,label"] + [f"{i},{1 + i % 3 / 2}" for i in range(60)], "g.csv")
    hint = label_hint(load(overrides=graded))
    assert hint is not None and "3 distinct values" in hint


def test_hints_for_labels_alike_but_for_case_and_for_drift_on_a_file(tmp_path: Path) -> None:
    from fedstream.sim.hints import drift_hint, label_hint

    rows = ["a,label"] + [f"{i},{['yes', 'Yes', 'no', ' YES'][i % 4]}" for i in range(80)]
    base = _csv(tmp_path, rows)
    hint = label_hint(load(overrides=base))
    assert hint is not None and "'Yes', 'yes'" in hint and "differ only in case" in hint
    assert drift_hint(load(overrides=base)) is None  # a file replays as it is
    hint = drift_hint(load(overrides=[*base, "drift.stagger=0"]))  # any drift key turns it on
    assert hint is not None and "'abrupt' relabels the classes" in hint
    assert "after 15 rounds" in hint
    gradual = drift_hint(load(overrides=[*base, 'drift.kind="gradual"']))
    assert gradual is not None and "over drift.width = 3 rounds" in gradual
    never = drift_hint(load(overrides=[*base, "drift.stagger=0", "federation.rounds=3"]))
    assert never is not None and "no client meets drift.at = [15] within the 3 rounds" in never
    # A built-in source says so too, and only then (its drift needs no note).
    built_in = drift_hint(load(overrides=["drift.at=[40.0]", "federation.rounds=2"]))
    assert built_in is not None and "the classes of the streams do not change" in built_in
    assert drift_hint(load(overrides=["federation.rounds=30"])) is None


def test_preflight_refuses_clients_bigger_than_this_machine(tmp_path: Path) -> None:
    from fedstream.sim.runner import machine_cpus, preflight

    cpus = machine_cpus()
    cfg = load(overrides=[f"simulation.client_cpus={cpus + 1}", f'output.dir="{tmp_path}"'])
    with pytest.raises(ValueError, match=f"simulation.client_cpus = {cpus + 1}, but this "
                       f"machine has {cpus} CPUs"):
        preflight(cfg)
    preflight(load(overrides=[f"simulation.client_cpus={cpus}", f'output.dir="{tmp_path}"']))


def test_preflight_refuses_an_output_that_is_a_file_and_a_factory_that_raises(
    tmp_path: Path,
) -> None:
    from fedstream.sim.runner import preflight

    (tmp_path / "afile").write_text("hi")
    with pytest.raises(ValueError, match=r"output\.dir: .* is a file, not a folder"):
        preflight(load(overrides=[f'output.dir="{tmp_path / "afile"}"']))
    # A folder no one can make, even root (whom access() always answers yes), and nothing
    # is left behind by finding that out.
    with pytest.raises(ValueError, match=r"output\.dir: cannot make /proc/x/y \("):
        preflight(load(overrides=['output.dir="/proc/x/y"']))
    preflight(load(overrides=[f'output.dir="{tmp_path / "new" / "run"}"']))
    assert list(tmp_path.iterdir()) == [tmp_path / "afile"]
    with pytest.raises(ValueError, match=r"learner.model 'os:getcwd': calling getcwd\(.*raised"):
        preflight(load(overrides=["learner.model=os:getcwd", f'output.dir="{tmp_path}"']))
    with pytest.raises(ValueError, match="client 3 is not in this federation"):
        federation(load(overrides=["federation.clients=3"])).stream(3)


def test_preflight_refuses_a_model_with_another_number_of_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It would load, and then fail every client with "Target 8 is out of bounds".
    from fedstream.sim.runner import preflight

    (tmp_path / "three_out.py").write_text(
        "import torch.nn as nn\n"
        "def make(shape, n):\n    return nn.Sequential(nn.Flatten(), nn.Linear(20, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load(overrides=["learner.model=three_out:make", f'output.dir="{tmp_path}"'])
    with pytest.raises(ValueError, match=r"gives outputs of shape \(2, 3\) .* \(2, 10\)"):
        preflight(cfg)


def test_a_rerun_in_the_same_folder_leaves_nothing_of_the_first(tmp_path: Path) -> None:
    from fedstream.sim.results import prepare, summarize

    cfg = load(overrides=[f'output.dir="{tmp_path}"', "federation.rounds=3"])
    prepare(cfg)  # the first run's config.toml: what it wrote, a rerun may replace
    (tmp_path / "plots").mkdir()
    for name in ("plots/clients.png", "plots/privacy.png", "summary.json", "model.pt",
                 "notes.txt"):
        (tmp_path / name).write_text("old")
    prepare(cfg)
    assert not (tmp_path / "plots/clients.png").exists()
    assert not (tmp_path / "plots/privacy.png").exists()  # an earlier private run's
    assert not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "model.pt").exists()  # an earlier run's model, not this one's
    assert (tmp_path / "notes.txt").read_text() == "old"  # not fedstream's: left alone
    from fedstream.server.records import History

    assert summarize(cfg, History(), 1.0, {})["drift_times"] == []  # drift at 15, 3 rounds


@pytest.mark.parametrize(
    ("overrides", "noise"),
    [
        ([], None),
        (["secure_aggregation.bits=16"], None),  # 0.002: stochastic rounding averages it out
        (["secure_aggregation.bits=12"], "0.037"),
        (["secure_aggregation.bits=8"], "0.7"),
        (["secure_aggregation.clip=1e12"], "3.5e+04"),
        (["secure_aggregation.bits=8", "secure_aggregation.max_weight=30"], "0.021"),
        (["secure_aggregation.bits=10", "secure_aggregation.max_weight=30"], None),  # 0.005
    ],
)
def test_a_ring_too_coarse_for_the_updates_gets_a_hint(
    overrides: list[str], noise: str | None
) -> None:
    # A new user's bits = 8 or clip = 1e12 ran to the end with accuracy stuck at chance and
    # no word of why. The noise is that of unbiased rounding: up to half a ring step per
    # client update, divided by the square root of the clients averaged.
    from fedstream.sim.hints import precision_hint

    cfg = load(overrides=["secure_aggregation.enabled=true", *overrides])
    hint = precision_hint(cfg)
    if noise is None:
        assert hint is None
    else:
        assert hint is not None and f"noise of up to {noise} " in hint
    assert precision_hint(load(overrides=overrides)) is None  # secure aggregation off


def test_a_dirichlet_split_that_leaves_a_client_empty_names_the_file_once(
    tmp_path: Path,
) -> None:
    from fedstream.client.sources.base import DataError

    path = tmp_path / "tiny.csv"
    path.write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    cfg = load(None, [f'stream.path="{path}"', "federation.clients=8", "partition.alpha=0.001"])
    with pytest.raises(DataError) as err:
        _ = federation(cfg).dataset
    said = str(err.value)
    assert said.startswith(f"{path} (40 rows, federation.clients = 8): partition.alpha = "
                           "0.001: no dirichlet split gave every one of 8 clients")
    assert said.count("raise partition.alpha") == 1


def test_partition_by_column_gives_each_site_its_own_client(tmp_path: Path) -> None:
    # A file's own split: client i streams the rows of the i-th site, in file order.
    from fedstream.client.sources import DataError
    from fedstream.server.records import History
    from fedstream.sim.hints import exhaustion_hint, group_hint
    from fedstream.sim.results import summarize

    sites = ["rome", "berlin", "paris", "berlin"] * 30
    rows = ["site,a,label"] + [f"{s},{i},{i % 2}" for i, s in enumerate(sites)]
    base = [*_csv(tmp_path, rows), "partition.scheme=column", "partition.column=site"]
    cfg = load(overrides=[*base, "federation.clients=3", "federation.rounds=2"])
    data = federation(cfg).dataset
    assert data is not None and data.client_names == ("berlin", "paris", "rome")
    assert data.features == ("a",)
    for client, site in enumerate(data.client_names):
        expected = [i for i, s in enumerate(sites) if s == site]
        assert data.x[data.parts[client], 0].tolist() == expected
    assert summarize(cfg, History(), 1.0, {})["client_names"] == ["berlin", "paris", "rome"]
    # One small site runs out long before the others: named, though the median would not.
    short = exhaustion_hint(load(overrides=[
        *base, "federation.clients=3", "stream.rate=5", "stream.rate_spread=0",
        "federation.rounds=10",
    ]))
    assert short is not None and "the rows of 2 of 3 clients" in short  # not berlin's 60
    assert ("(client 1 ('paris') after about 6.0 rounds, client 2 ('rome') after about 6.0 "
            "rounds)") in short
    twins = [*rows, "Berlin,999,0"]  # another case: a client of its own, and said so
    twinned = [*_csv(tmp_path, twins, "t.csv"), "partition.scheme=column",
               "partition.column=site", "federation.clients=4"]
    hint = group_hint(load(overrides=twinned))
    assert hint is not None and "('Berlin', 'berlin')" in hint
    with pytest.raises(DataError, match=r"'site' has 3 distinct values .* federation\.clients = 3"):
        _ = federation(load(overrides=[*base, "federation.clients=4"])).dataset


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["partition.column=site"], "partition.column is used only with partition.scheme"),
        (["partition.scheme=column"], "needs partition.column"),
        (["partition.scheme=column", "partition.column=label"], "is also stream.label"),
    ],
)
def test_a_column_split_that_cannot_work_is_refused_in_config_keys(
    tmp_path: Path, extra: list[str], fragment: str
) -> None:
    from fedstream.protocol.config import ConfigError

    with pytest.raises(ConfigError, match=fragment):
        load(overrides=[*_csv(tmp_path, ["site,a,label", "x,1,0"]), *extra])
    with pytest.raises(ConfigError, match=r"stream\.source must be 'csv' or 'jsonl'"):
        load(overrides=["partition.scheme=column", "partition.column=site"])


def test_the_clients_plot_names_each_site(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    from fedstream.sim.plots import clients_plot

    ticks: list[list[str]] = []
    real = Axes.set_yticks
    monkeypatch.setattr(Axes, "set_yticks",
                        lambda self, at, labels=None, **kw: (ticks.append(list(labels or [])),
                                                             real(self, at, labels, **kw))[1])
    records = [{"round": 1, "drifts": [], "clients": {
        "0": {"accuracy": 0.5}, "1": {"accuracy": 0.7}}}]
    summary = {"client_names": ["berlin", "paris"], "drift_times": []}
    assert clients_plot(tmp_path, summary, records).exists()
    assert ticks[-1] == ["0 berlin", "1 paris"]


def test_an_accuracy_plot_with_nothing_scored_says_so(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.axes import Axes

    from fedstream.sim.plots import accuracy_plot

    said: list[str] = []
    real = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **kw: (
        said.append(s), real(self, x, y, s, *a, **kw))[1])
    records = [{"round": r, "drifts": [], "clients": {}} for r in (1, 2)]
    empty = {"accuracy_per_round": [None, None], "cumulative_accuracy": [None, None]}
    assert accuracy_plot(tmp_path, empty, records).exists()
    assert said == ["no prediction was scored in this run"]
    scored = {"accuracy_per_round": [None, 0.5], "cumulative_accuracy": [None, 0.5]}
    accuracy_plot(tmp_path, scored, records)
    assert said == ["no prediction was scored in this run"]  # nothing more said


def test_the_accuracy_plot_draws_the_trivial_predictors_cumulatively(
    tmp_path: Path, monkeypatch
) -> None:
    from matplotlib.axes import Axes

    from fedstream.sim.plots import accuracy_plot

    drawn: dict[str, list[float]] = {}
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: (
        drawn.__setitem__(kw.get("label"), list(a[1])), real(self, *a, **kw))[1])
    records = [{"round": r, "drifts": [], "clients": {}, "examples": n, "no_change_correct": k,
                "majority_correct": 1} for r, n, k in ((1, 0, 0), (2, 10, 5), (3, 30, 5))]
    summary = {"accuracy_per_round": [None, 0.5, 0.5], "cumulative_accuracy": [None, 0.5, 0.5]}
    accuracy_plot(tmp_path, summary, records)
    assert np.isnan(drawn["no-change (last label)"][0])  # nothing seen yet
    assert drawn["no-change (last label)"][1:] == [50.0, 25.0]
    assert drawn["majority class so far"][1:] == [20.0, 7.5]
    drawn.clear()
    accuracy_plot(tmp_path, summary, [{k: v for k, v in rec.items() if "_correct" not in k}
                                      for rec in records])  # an older run's records
    assert "no-change (last label)" not in drawn


def test_a_ray_cluster_that_does_not_answer_is_refused_at_once() -> None:
    # Ray retries an unreachable GCS for minutes, printing only its own warnings.
    import socket

    from fedstream.sim.runner import _check_cluster

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(ValueError, match=rf"no Ray cluster answers at 127.0.0.1:{port}"):
        _check_cluster(f"127.0.0.1:{port}")
    with socket.socket() as s:  # it accepts connections, but no gRPC: a web server, say
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match=r"something listens at .* but it is no Ray head"):
            _check_cluster(f"127.0.0.1:{s.getsockname()[1]}", wait=1.0)
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=1))  # speaks gRPC, as a Ray head
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check_cluster(f"ray://127.0.0.1:{port}")
    finally:
        server.stop(None)
    _check_cluster("auto")  # Ray's own names are Ray's to resolve


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["federation.clients=20"], None),  # the default 10 %: below 1 % of rounds
        (["federation.clients=3"], None),  # 2.8 %, and no threshold is lower than t = 2
        (["federation.clients=20", "simulation.dropout=0.3"],
         "up to about 11% of secure rounds fail from dropouts alone (20 clients a round, 19 "
         "neighbours each, 12 of 20 shares needed): lower secure_aggregation.threshold "
         "towards 0.51 (about 5% then), or sample more clients a round"),
        (["federation.clients=4"], None),  # nobody drops in this simulation
        (["federation.clients=4", "secure_aggregation.dropout=0.3"], None),  # not simulated
        (["federation.clients=10", "simulation.dropout=0.3"],
         "up to about 15% of secure rounds fail from dropouts alone (10 clients a round, 9 "
         "neighbours each, 6 of 10 shares needed): more clients a round make it rarer"),
        (["federation.clients=100", "simulation.dropout=0.3"], None),  # groups of 100
    ],
)
def test_dropouts_that_would_fail_many_secure_rounds_get_a_hint(
    overrides: list[str], said: str | None
) -> None:
    # A trial at 20 clients and simulation.dropout = 0.3 lost 7 of 15 secure rounds, and
    # plaintext none, with no word of why: a survivor whose share group keeps fewer than t
    # members cannot be unmasked. The groups now widen for the dropout; what is left is said.
    from fedstream.sim.hints import dropout_hint

    cfg = load(overrides=["secure_aggregation.enabled=true", *overrides])
    hint = dropout_hint(cfg)
    assert hint == (None if said is None else f"fedstream: hint: with 30% of clients "
                                              f"dropping, {said}")
    assert dropout_hint(load(overrides=overrides)) is None  # secure aggregation off


def test_a_simulations_own_dropout_sizes_the_share_groups() -> None:
    assert load().secure_aggregation.dropout == 0.1
    assert load(overrides=["simulation.dropout=0.3"]).secure_aggregation.dropout == 0.3
    assert load(overrides=["simulation.dropout=0.05"]).secure_aggregation.dropout == 0.1
    with pytest.raises(ConfigError, match=r"secure_aggregation.dropout: .*1.5"):
        load(overrides=["secure_aggregation.dropout=1.5"])


def test_global_evaluation_scores_a_round_under_the_concept_its_clients_trained_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round r trains on samples that arrived in [r - 1, r): a drift at time r is the next
    round's, and the evaluation after round r must not see it either."""
    from fedstream.sim.evaluation import make_evaluate

    cfg = load(overrides=["evaluation.every=1", "drift.kind=abrupt", "drift.at=[2.0]",
                          "drift.stagger=0", "federation.clients=2"])
    fed = federation(cfg)
    asked: list[float] = []
    holdout = Federation.holdout

    def spy(self: Federation, t: float) -> tuple[np.ndarray, np.ndarray]:
        asked.append(t)
        return holdout(self, t)

    monkeypatch.setattr(Federation, "holdout", spy)
    make_evaluate(cfg)(2, fed.initial_arrays())
    assert len(asked) == 1 and 1.999 < asked[0] < 2.0
    # The stream agrees: what arrives just before time 2 follows the old concept.
    src, index = fed.source(0), np.arange(200)
    before, old, new = (src.draw(index, np.full(200, t))[0] for t in (asked[0], 1.5, 2.0))
    assert np.array_equal(before, old) and not np.array_equal(new, old)


def test_row_ids_and_timestamps_among_the_features_get_a_hint(tmp_path: Path) -> None:
    from fedstream.sim.hints import identifier_hint

    rng = np.random.default_rng(0)
    ids = rng.permutation(300) + 1000  # shuffled: a different number in every row
    age = np.sort(rng.integers(18, 90, 300))  # a file sorted by a measurement
    income = rng.permutation(np.arange(20_000, 200_000, 600))  # distinct, but not dense
    rows = ["id,epoch,temp,count,age,income,pop,label"] + [
        f"{ids[i]},{1_700_000_000 + 60 * i},{rng.normal():.3f},{rng.integers(0, 9)},"
        f"{age[i]},{income[i]},{34_567_890.12 + 1000 * rng.normal():.2f},{'ab'[i % 2]}"
        for i in range(300)
    ]
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    base = ["stream.source=csv", f'stream.path="{path}"', 'partition.scheme="iid"']
    hint = identifier_hint(load(overrides=base))
    assert hint is not None and "columns 'id', 'epoch' look like a row ID" in hint, hint
    assert """--set 'stream.exclude=["id", "epoch"]'""" in hint and "stream.time" in hint
    kept = identifier_hint(load(overrides=[*base, 'stream.exclude=["id"]']))
    assert kept is not None and """stream.exclude=["id", "epoch"]""" in kept
    assert identifier_hint(load(overrides=[*base, 'stream.exclude=["id", "epoch"]'])) is None
    named = identifier_hint(load(overrides=[*base, 'stream.features=["id", "temp"]']))
    assert named is not None and """--set 'stream.features=["temp"]'""" in named
    assert identifier_hint(load(overrides=["federation.clients=3"])) is None  # synthetic
    digits = load(overrides=["stream.source=digits", "learner.standardize=true"])
    assert identifier_hint(digits) is None


def test_a_file_edited_in_the_same_process_is_read_again(tmp_path: Path) -> None:
    """A notebook edits its CSV and loads the config again: the federation must be the
    new file's, as the run it then starts will be (the pinned run reads the file anew)."""
    import os

    path = tmp_path / "nb.csv"
    rows = "\n".join(f"{i % 7},{i % 3},{'cat' if i % 2 else 'dog'}" for i in range(60))
    path.write_text("a,b,label\n" + rows + "\n")
    overrides = [f'stream.path="{path}"', "federation.clients=2", f'output.dir="{tmp_path}"']
    cfg = load(None, overrides)
    assert federation(cfg).dataset.classes == ("cat", "dog")
    path.write_text("a,b,label\n" + rows.replace("cat", "hi").replace("dog", "lo") + "\n")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse clock's tick
    assert federation(load(None, overrides)).dataset.classes == ("hi", "lo")
    assert federation(cfg).dataset.classes == ("hi", "lo")  # the same config object too


def test_a_file_dealt_by_label_that_leaves_a_client_without_a_class_gets_a_hint(
    tmp_path: Path,
) -> None:
    from fedstream.sim.hints import skew_hint

    rows = ["a,label"] + [f"{i},{'UP' if i % 3 else 'DOWN'}" for i in range(300)]
    skewed = load(overrides=[*_csv(tmp_path, rows), "federation.clients=4",
                             "partition.alpha=0.05"])
    hint = skew_hint(skewed)
    assert hint is not None and "partition.scheme = 'iid'" in hint
    # Every client without a class is named, for each class some client lacks.
    data = federation(skewed).dataset
    for c, name in enumerate(data.classes):
        lacking = [k for k, rows in enumerate(data.parts) if not (data.y[rows] == c).any()]
        if len(lacking) == 1:
            assert f"client {lacking[0]} holds no {name!r} rows" in hint
        elif lacking:
            listed = ", ".join(map(str, lacking[:-1])) + f" and {lacking[-1]}"
            assert f"clients {listed} hold no {name!r} rows" in hint
        else:
            assert f"no {name!r} rows" not in hint
    assert "no 'DOWN' rows" in hint or "no 'UP' rows" in hint
    for fine in (["partition.scheme=iid"], ["partition.alpha=1000"]):
        assert skew_hint(load(overrides=[*_csv(tmp_path, rows), "federation.clients=4",
                                         *fine])) is None
    assert skew_hint(load(overrides=["federation.clients=4"])) is None  # synthetic: by design


def test_a_file_with_a_rare_class_gets_a_note_before_the_run(tmp_path: Path) -> None:
    from fedstream.sim.hints import _clients, rare_class_hint

    rows = ["a,label"] + [f"{i},{'fault' if i % 50 == 0 else 'ok'}" for i in range(500)]
    hint = rare_class_hint(load(overrides=[*_csv(tmp_path, rows), "federation.clients=2"]))
    assert hint is not None and "rare class ('fault' 2.0 % of the rows)" in hint
    assert "balanced accuracy, Cohen's kappa and each class's recall" in hint
    even = ["a,label"] + [f"{i},{'fault' if i % 3 == 0 else 'ok'}" for i in range(500)]
    assert rare_class_hint(load(overrides=[*_csv(tmp_path, even), "federation.clients=2"])) \
        is None
    assert rare_class_hint(load(overrides=["federation.clients=2"])) is None  # synthetic
    assert _clients(np.array([3])) == "client 3 holds"
    assert _clients(np.arange(1, 4)) == "clients 1, 2 and 3 hold"
    assert _clients(np.arange(8)) == "clients 0, 1, 2, 3, 4 and 3 more hold"


def test_sites_logging_time_in_other_units_get_a_hint(tmp_path: Path) -> None:
    from fedstream.sim.hints import time_units_hint

    start = 1_764_770_710
    rows = ["t,site,a,label"] + [f"{start + i},a,{i % 5},{i % 2}" for i in range(100)]
    millis = [f"{(start + i) * 1000},b,{i % 5},{i % 2}" for i in range(100)]
    split = ["partition.scheme=column", 'partition.column="site"', 'stream.time="t"',
             "stream.arrival=time"]
    hint = time_units_hint(load(overrides=[*_csv(tmp_path, rows + millis), *split]))
    assert hint is not None and "client 1's times in 't' (median 1.76477e+12) are about " \
        "1e+03 times client 0's (1.76477e+09): one clock in two units" in hint
    seconds = [f"{start + i},b,{i % 5},{i % 2}" for i in range(100)]
    assert time_units_hint(load(overrides=[*_csv(tmp_path, rows + seconds), *split])) is None
    # Each client in its own order, at its own pace: the units never meet.
    assert time_units_hint(load(overrides=[*_csv(tmp_path, rows + millis), *split[:3]])) is None


def test_a_file_sorted_by_its_label_gets_a_hint(tmp_path: Path) -> None:
    from fedstream.sim.hints import order_hint

    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    x = rng.normal(size=(120, 2)).round(3)

    def write(name: str, order: np.ndarray) -> list[str]:
        path = tmp_path / name
        lines = [f"{x[i, 0]},{x[i, 1]},{i},{labels[i]}" for i in order]
        path.write_text("f0,f1,t,label\n" + "\n".join(lines) + "\n")
        return [f'stream.path="{path}"', 'stream.exclude=["t"]', "federation.clients=2",
                f'output.dir="{tmp_path}"']

    hint = order_hint(load(overrides=write("sorted.csv", np.arange(120))))
    assert hint is not None and "the rows are sorted by 'label' (each class in one block, " \
        "3 blocks)" in hint
    assert order_hint(load(overrides=write("mixed.csv", rng.permutation(120)))) is None
    # Ordered by a time column, the blocks are the stream's own.
    timed = [o for o in write("timed.csv", np.arange(120)) if "exclude" not in o]
    assert order_hint(load(overrides=[*timed, 'stream.time="t"'])) is None


def test_a_clusters_workers_are_told_where_the_table_cache_is(
    monkeypatch, tmp_path: Path,
) -> None:
    # Workers of a cluster fedstream joins do not inherit its environment: they parsed
    # the file again, into another cache, and failed once it had moved. The ClientApp
    # carries the driver's cache folder, and a worker unpickling it takes it.
    import os

    from fedstream.sim.client_app import sim_client_app
    from fedstream.sim.runner import backend_config
    from fedstream.sim.table_cache import ENV

    monkeypatch.setenv(ENV, str(tmp_path / "driver-cache"))
    factory, args = sim_client_app(load(overrides=["seed=11"])).__reduce__()
    assert args[1] == str((tmp_path / "driver-cache").resolve())
    monkeypatch.setenv(ENV, "/a/worker/elsewhere")  # a worker's own environment
    assert factory(*args).tables == args[1]
    assert os.environ[ENV] == args[1]
    # The config's address comes before $RAY_ADDRESS ("local": a Ray of this machine's own).
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
    assert backend_config(load(overrides=['simulation.ray_address="local"']))[
        "init_args"] == {"address": "local"}
    assert backend_config(load(overrides=[]))["init_args"]["address"] == "10.0.0.9:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert backend_config(load(overrides=[]))["init_args"] == {}


def test_time_arrival_keeps_sites_sharing_a_clock_in_step(tmp_path: Path) -> None:
    """Two sites, one at ten rows an hour, the other at one: under stream.arrival = 'time'
    a row reaches its client when it happened (the file's first hour is round 1), so the
    same hour of the file is in the same round for both, whatever their volumes."""
    from fedstream.sim.federation import federation

    rows = ["hour,site,a,label"]
    for hour in range(20):
        rows += [f"{hour + k / 10},busy,{k},{k % 2}" for k in range(10)]
        rows.append(f"{hour},quiet,0.5,{hour % 2}")
    cfg = load(overrides=[
        *_csv(tmp_path, rows), "stream.time=hour", "stream.arrival=time",
        "partition.scheme=column", "partition.column=site", "federation.rounds=20",
        "stream.features=[\"a\"]",
    ])
    fed = federation(cfg)
    busy, quiet = (fed.stream(fed.dataset.client_names.index(s)) for s in ("busy", "quiet"))
    for r in (1, 5, 20):
        assert busy.arrived(r) == 10 * r and quiet.arrived(r) == r  # in step, by the hour
    assert busy.take(40, 50).t.min() >= 4 and busy.take(40, 50).t.max() < 5  # hour 4: round 5
    for wrong, said in ((["stream.arrival=time"], "needs stream.source 'csv' or 'jsonl'"),
                        ([*_csv(tmp_path, rows), "stream.arrival=time"], "and stream.time")):
        with pytest.raises(ConfigError, match=said):
            load(overrides=wrong)
    unused = ignored_settings(load(overrides=[*_csv(tmp_path, rows), "stream.time=hour",
                                              "stream.arrival=time", "stream.rate=5"]))
    assert any("stream.rate = 5 is not used" in note for note in unused)
    # Secure aggregation's rounding is sized from the rows a round brings (11 here), not
    # from the stream.rate it does not use: weighed against max_weight 1000 they are few.
    from fedstream.sim.hints import precision_hint

    secure = [*_csv(tmp_path, rows), "stream.time=hour", "partition.scheme=column",
              "partition.column=site", "federation.rounds=20", 'stream.features=["a"]',
              "secure_aggregation.enabled=true", "secure_aggregation.bits=8"]
    by_rows = precision_hint(load(overrides=[*secure, "stream.arrival=time"]))
    assert by_rows is not None and "about 5.5 examples each" in by_rows, by_rows
    by_rate = precision_hint(load(overrides=secure))
    assert by_rate is not None and "about 30 examples each" in by_rate, by_rate


def test_a_files_own_drift_times_are_scored_without_relabelling(tmp_path: Path) -> None:
    """drift.known_at: the file's own drift (its time column's units) on the round clock
    the rows arrive on, scored as a drift put in would be; the labels stay the file's."""
    from fedstream.client.sources import DataError
    from fedstream.sim.detection import client_drift_times, detection_report, drifts_in_run
    from fedstream.sim.federation import federation

    rows = ["hour,site,a,label"]
    for hour in range(20):
        rows += [f"{hour + k / 10},busy,{k},{k % 2}" for k in range(10)]
        rows.append(f"{hour},quiet,0.5,{hour % 2}")
    base = [*_csv(tmp_path, rows), "stream.time=hour", "stream.arrival=time",
            "partition.scheme=column", "partition.column=site", "federation.rounds=20",
            'stream.features=["a"]', "detector.kind=adwin"]
    cfg = load(overrides=[*base, "drift.known_at=[9.95]"])
    assert cfg.drift.kind == "none"  # only known_at given: nothing is put in
    fed = federation(cfg)
    assert fed.known_drifts == [pytest.approx(9.95 / 19.9 * 20)] == drifts_in_run(cfg)
    assert client_drift_times(cfg) == [fed.known_drifts] * 2  # one clock: no stagger
    busy = fed.dataset.client_names.index("busy")
    drift_at = fed.stream(busy).arrived(fed.known_drifts[0])  # its first row of hour 10
    records = [{"round": 12, "drifts": [{"client": busy, "position": drift_at + 7}],
                "clients": {str(busy): {"offset": 200}, str(1 - busy): {"offset": 20}}}]
    report = detection_report(cfg, records)
    assert report is not None and report["false_alarms"] == 0
    assert (report["detected"], report["missed"]) == (1, 1)  # the quiet site missed it
    assert report["delay_samples"]["median"] == 7
    # Refused with the reason: out of the file's times, unordered, not a time, no clock.
    with pytest.raises(DataError, match=r"drift.known_at: 25.0 is outside .* \(0 to 19.9"):
        _ = federation(load(overrides=[*base, "drift.known_at=[25.0]"])).known_drifts
    for wrong, said in ((["drift.known_at=[5, 3]"], "times must increase"),
                        (['drift.known_at=["soon"]'], "neither a number nor an ISO-8601"),
                        (["drift.known_at=[5]", "stream.arrival=poisson"],
                         "needs stream.arrival = 'time'")):
        with pytest.raises(ConfigError, match=said):
            load(overrides=[*base, *wrong])

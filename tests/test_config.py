"""Config validation: bad input stops before anything runs, naming the key."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedstream.protocol.config import (
    DETECTOR_DELTA,
    ConfigError,
    apply_overrides,
    from_json,
    from_run_config,
    load,
    to_json,
    to_toml,
    validate,
)


def test_defaults_are_the_embedded_federation() -> None:
    cfg = load()
    assert cfg.federation.clients == 20
    assert cfg.drift.kind != "none"
    assert cfg.partition.scheme != "iid"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"federation": {"clientz": 3}}, "federation.clientz: unknown key; did you mean "
         "'federation.clients'? (federation has: clients, rounds, "),
        ({"privacy": {"enable": True}}, "did you mean 'privacy.enabled'?"),
        ({"federaton": {"rounds": 3}}, "federaton: unknown key; did you mean 'federation'?"),
        ({"strategy": "fedadam"}, "strategy: unknown key; did you mean 'federation.strategy'?"),
        ({"delta": 0.1}, "did you mean 'detector.delta' or 'privacy.delta'?"),
        ({"federation": {"clients": "ten"}}, "federation.clients"),
        ({"federation": {"fraction": 1.5}}, "federation.fraction"),
        ({"federation": {"clients": 0}}, "federation.clients"),
        ({"learner": {"lr": -1.0}}, "learner.lr"),
        ({"learner": {"model": "resnet"}}, "unknown model 'resnet'"),
        ({"stream": {"source": "csv", "path": "/no/such.csv"}}, "file not found: /no/such.csv"),
        ({"federation": {"clients": 2, "min_clients": 3}}, "min_clients"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"stream": {"features": ["a"], "exclude": ["b"]}},
         "stream.exclude leaves columns out of all the others"),
        ({"stream": {"exclude": ["label"]}}, "stream.exclude names the label column 'label'"),
        ({"simulation": {"dispatch_interval": 0}}, "simulation.dispatch_interval"),
        ({"simulation": {"dispatch_interval": 0.5}}, "simulation.dispatch_interval"),
        ({"secure_aggregation": {"clip": float("inf")}}, "secure_aggregation.clip: Input "
         "should be a finite number"),
        ({"drift": {"at": [8, 3, 3]}}, "drift.at: drift times must increase, each once"),
        ({"secure_aggregation": {"clip": 1e-320}}, "secure_aggregation.clip: must be at least "
         "1e-12 (got 1e-320)"),
        ({"secure_aggregation": {"max_weight": 2**64}}, "secure_aggregation.max_weight"),
        ({"stream": {"sha256": "abc"}}, "stream.sha256: must be the file's SHA-256 as 64 hex "
         "digits, or empty"),
        ({"secure_aggregation": {"threshold": 1}}, "a count of shares must be at least 2; "
         "a fraction of the share group is written with a point (1.0 = all of it) (got 1)"),
        ({"secure_aggregation": True}, "secure_aggregation: is a section, not a value: set "
         "one of its keys ([secure_aggregation] and KEY = VALUE in a file, --set "
         "secure_aggregation.KEY=VALUE on the command line)"),
        ({"secure_aggregation": {"threshold": 0.3}},
         "secure_aggregation.threshold: must be greater than 0.5 (got 0.3)"),
        ({"federation": {"rounds": 0}}, "federation.rounds: must be greater than 0 (got 0)"),
        ({"seed": 2**64}, "seed: must be less than 4294967296 (got 18446744073709551616)"),
        ({"stream": {"label": 400}}, "a name that reads as a number, a date or true/false needs "
         """quotes: --set 'stream.label="400"' (in a file: label = "400")"""),
        ({"stream": {"features": [1, "a"]}}, 'stream.features.0: Input should be a valid '
         'string (got 1); a name that reads as a number, a date or true/false needs quotes: '
         '"1"'),
        ({"output": {"dir": datetime.date(2024, 1, 1)}}, "output.dir: Input should be a "
         "valid string (got 2024-01-01); a name that reads as a number, a date or "
         """true/false needs quotes: --set 'output.dir="2024-01-01"'"""),
        ({"learner": {"device": "cudafoo"}}, "learner.device: unknown device 'cudafoo': use "
         "auto, cpu, cuda[:N] or mps"),
        ({"stream": {"path": "x.csv", "source": "hyperplane"}}, "stream.path is set, but "
         "stream.source 'hyperplane' is built in and reads no file: for the file, set "
         'stream.source = "csv"'),
        ({"stream": {"label": 1.5}}, """needs quotes: --set 'stream.label="..."'"""),
        ({"secure_aggregation": {"threshold": "x"}},
         "secure_aggregation.threshold: expected a count or a fraction"),
        ({"stream": {"image": True}}, "stream.image shapes the digits source's samples as 8x8 "
         "images: with stream.source 'gaussian_mixture' it would change nothing"),
    ],
)
def test_bad_values_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(raw)
    assert needle in str(exc.value)


SECURE = {"enabled": True}


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        # 20 clients: each has 14 neighbours, a share group of 15, so t must be 8..15.
        ({"secure_aggregation": {**SECURE, "threshold": 2}}, "must be from 8 to 15"),
        ({"secure_aggregation": {**SECURE, "threshold": 16}}, "must be from 8 to 15"),
        # Half of the 20 clients a round: a complete graph of 10, t from 6 to 10.
        ({"federation": {"fraction": 0.5}, "secure_aggregation": {**SECURE, "threshold": 5}},
         "at 10 clients a round: a threshold of 5 shares does not fit a share group of 10 "
         "(a client and its 9 neighbours): it must be from 6 to 10, more than half so that "
         "no server can collect both masks of a client; or give a fraction above 0.5, or "
         "sample more of the 20 clients (federation.min_clients or federation.fraction)"),
        ({"federation": {"clients": 1}, "secure_aggregation": SECURE},
         "needs 2 or more clients a round; federation.clients = 1 gives fewer"),
        ({"federation": {"clients": 200}, "secure_aggregation": {**SECURE, "bits": 8}},
         "secure_aggregation.bits = 8 cannot hold the sum of 200 clients' updates: use at "
         "least 9"),
    ],
)
def test_secure_settings_that_fail_every_round_are_refused(raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        validate(raw)
    assert needle in str(exc.value)
    assert "Value error" not in str(exc.value) and "(got {" not in str(exc.value)


@pytest.mark.parametrize(
    "raw",
    [
        {"secure_aggregation": {**SECURE, "threshold": 8}},
        {"secure_aggregation": {**SECURE, "threshold": 15}},
        {"federation": {"fraction": 0.5}, "secure_aggregation": {**SECURE, "threshold": 6}},
        {"federation": {"fraction": 0.1}, "secure_aggregation": SECURE},  # 2 a round
        # 1 a round by fraction, but a secure round waits for 2 (as the server samples)
        {"federation": {"fraction": 0.05}, "secure_aggregation": SECURE},
        {"federation": {"clients": 200}, "secure_aggregation": {**SECURE, "bits": 9}},
        {"secure_aggregation": {"enabled": False, "threshold": 2}},  # not used: not checked
    ],
)
def test_secure_settings_at_the_limits_are_accepted(raw: dict) -> None:
    validate(raw)


def test_overrides_parse_toml_values() -> None:
    overrides = ["federation.rounds=7", "learner.hidden=[8, 8]", "stream.source=digits"]
    raw = apply_overrides({}, overrides)
    cfg = validate(raw)
    assert cfg.federation.rounds == 7
    assert cfg.learner.hidden == [8, 8]
    assert cfg.stream.source == "digits"


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["federation.rounds"])


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nclients = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(bad)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml")


def test_a_folder_or_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    # A script catching ConfigError must catch these too, not a bare OSError.
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"\x80\x02\xff binary")
    with pytest.raises(ConfigError, match=r"model\.pt: cannot be read as a config file"):
        load(tmp_path / "model.pt")


def test_overrides_given_as_one_string_are_refused_not_split_into_characters() -> None:
    with pytest.raises(TypeError, match=r"a list of 'section.key=value' strings"):
        load(None, "federation.rounds=3")  # type: ignore[arg-type]


def test_round_trips() -> None:
    cfg = load(overrides=["federation.rounds=3", "learner.hidden=[4]"])
    assert from_json(to_json(cfg)) == cfg
    import tomllib

    assert validate(tomllib.loads(to_toml(cfg))) == cfg


def test_run_config_dotted_keys() -> None:
    cfg = from_run_config({"federation.rounds": 4, "stream.source": "digits"})
    assert cfg.federation.rounds == 4 and cfg.stream.source == "digits"


def test_cli_rejects_bad_config_before_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "sim", "--set", "federation.fraction=2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "federation.fraction" in proc.stderr
    assert not out.exists()


def test_cli_config_show_prints_effective_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "config", "show", "--set", "seed=5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed = 5" in proc.stdout and "[learner]" in proc.stdout


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_are_valid(path: Path) -> None:
    load(path)


# ------------------------------------------------------------------- a user's own file


def test_a_file_source_replays_its_data_unless_drift_is_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label\n1,0\n2,1\n")
    base = ["stream.source=csv", f'stream.path="{path}"']
    assert load(overrides=base).drift.kind == "none"
    assert load(overrides=[*base, "drift.kind=gradual"]).drift.kind == "gradual"
    assert load(overrides=[*base, "drift.at=[5.0]"]).drift.kind == "abrupt"  # asked for
    assert load().drift.kind == "abrupt"  # synthetic sources drift by default


def test_a_data_path_in_a_config_file_is_relative_to_that_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.csv").write_text("a,label\n1,0\n2,1\n")
    config = tmp_path / "cfg" / "fed.toml"
    config.write_text('[stream]\nsource = "csv"\npath = "d.csv"\n')
    monkeypatch.chdir(tmp_path)
    assert load(config).stream.path == str((tmp_path / "cfg" / "d.csv").resolve())
    with pytest.raises(ConfigError, match="looked for"):  # --set stays relative to here
        load(config, ["stream.path=d.csv"])


def test_an_output_folder_in_a_config_file_is_relative_to_that_file(
    tmp_path: Path, monkeypatch
) -> None:
    # `cd /tmp && fedstream sim --config /work/cfgs/fed.toml` with dir = "../runs/a" wrote
    # to /runs/a: the file's data path was read beside it, its output was not.
    (tmp_path / "cfgs").mkdir()
    config = tmp_path / "cfgs" / "fed.toml"
    config.write_text('[output]\ndir = "../runs/a"\n')
    monkeypatch.chdir(tmp_path / "cfgs")
    assert Path(load(config).output.dir).resolve() == tmp_path / "runs" / "a"
    monkeypatch.chdir("/")
    assert Path(load(config).output.dir).resolve() == tmp_path / "runs" / "a"
    # ... and said as the folder it is (a run prints it), not `cfgs/../runs/a`
    assert ".." not in load(config).output.dir
    assert load(config, ["output.dir=here"]).output.dir == "here"  # --set: from the cwd


def test_a_config_shown_from_a_relative_config_file_runs_alike_from_elsewhere(
    tmp_path: Path, monkeypatch
) -> None:
    # `fedstream config show --config col/col.toml > other/mine.toml` wrote dir = "col/out"
    # (relative to the shell's folder), so mine.toml wrote into other/col/out.
    import tomllib

    (tmp_path / "col").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "col" / "col.toml").write_text('[output]\ndir = "out"\n')
    monkeypatch.chdir(tmp_path)
    shown = tmp_path / "other" / "mine.toml"
    shown.write_text(to_toml(load(Path("col/col.toml"))))
    assert Path(load(shown).output.dir) == tmp_path / "col" / "out"
    assert tomllib.loads(shown.read_text())["output"]["dir"] == str(tmp_path / "col" / "out")


@pytest.mark.parametrize("kind", ["adwin", "page_hinkley"])
def test_a_shown_config_keeps_deriving_what_it_derived(kind: str) -> None:
    # A detector's own delta is written as 0, so that another kind picks its own again;
    # a dropout taken from the simulation is written as the default, derived again.
    import tomllib

    cfg = load(overrides=[f"detector.kind={kind}", "simulation.dropout=0.3"])
    data = tomllib.loads(to_toml(cfg))
    assert data["detector"]["delta"] == 0.0
    assert data["secure_aggregation"]["dropout"] == 0.1
    assert validate(data) == cfg
    other = "adwin" if kind == "page_hinkley" else "page_hinkley"
    data["detector"]["kind"] = other
    assert validate(data).detector.delta == DETECTOR_DELTA[other]
    kept = load(overrides=["detector.delta=0.01", "secure_aggregation.dropout=0.2"])
    assert validate(tomllib.loads(to_toml(kept))) == kept


def test_a_config_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    # Notepad's "UTF-8 with BOM": tomllib refused it as "Invalid statement (at line 1)".
    config = tmp_path / "fed.toml"
    config.write_bytes(b"\xef\xbb\xbf[federation]\r\nrounds = 4\r\n")
    assert load(config).federation.rounds == 4
    config.write_bytes(b"\xff\xfe[\x00")  # UTF-16: not read as text, and said so
    with pytest.raises(ConfigError, match="cannot be read as a config file"):
        load(config)


def test_a_data_path_expands_home_and_refuses_a_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.csv").write_text("a,label\n1,0\n2,1\n")
    cfg = load(overrides=["stream.source=csv", "stream.path=~/d.csv"])
    assert cfg.stream.path == str((tmp_path / "d.csv").resolve())
    with pytest.raises(ConfigError) as info:
        load(overrides=["stream.source=csv", f'stream.path="{tmp_path}"'])
    message = str(info.value)
    assert "is a directory" in message
    assert message.count("stream.path") == 1  # said once, without the section's raw data


def test_exclude_may_list_the_time_column(tmp_path: Path) -> None:
    # The time column is no feature anyway: listing it among the columns to leave out is
    # harmless, and refusing it only puzzled users.
    path = tmp_path / "d.csv"
    path.write_text("ts,id,a,y\n3,x1,1,p\n1,x2,2,q\n")
    cfg = load(overrides=["stream.source=csv", f'stream.path="{path}"', "stream.label=y",
                          "stream.time=ts", 'stream.exclude=["ts", "id"]'])
    assert cfg.stream.exclude == ["ts", "id"]


@pytest.mark.parametrize(("strategy", "lr"), [("fedavg", 3.0), ("fedadam", 0.1), ("fedyogi", 0.1)])
def test_server_lr_defaults_to_the_strategys_own(strategy: str, lr: float) -> None:
    # FedAvg's server step of 3 made FedAdam diverge; an explicit value is kept as given.
    assert load(overrides=[f"federation.strategy={strategy}"]).federation.server_lr == lr
    explicit = [f"federation.strategy={strategy}", "federation.server_lr=0.5"]
    assert load(overrides=explicit).federation.server_lr == 0.5


def test_a_secure_round_waits_for_as_many_clients_as_a_count_threshold_needs() -> None:
    # With two of four devices down, a count threshold of 3 cannot be met: rounds sampled
    # from the two left failed in milliseconds and used up the run before the others came
    # back. The strategy now waits for the fewest clients whose share groups hold 3 shares.
    from fedstream.protocol import secagg
    from fedstream.protocol.config import least_clients, sampled_clients
    from fedstream.server.strategy import make_strategy

    cfg = load(None, ["federation.clients=4", "federation.min_clients=2",
                      "secure_aggregation.enabled=true", "secure_aggregation.threshold=3"])
    assert least_clients(cfg.federation, cfg.secure_aggregation) == 3
    assert make_strategy(cfg).min_available_nodes == 3
    big = load(None, ["federation.clients=100", "federation.fraction=0.2",
                      "secure_aggregation.enabled=true", "secure_aggregation.threshold=12"])
    least = least_clients(big.federation, big.secure_aggregation)
    secagg.round_shape(least, 0, 12)
    with pytest.raises(ValueError):
        secagg.round_shape(least - 1, 0, 12)
    assert least == 12 and sampled_clients(big.federation, big.secure_aggregation) == 20
    # A count too large for the sample the config asks for is refused, not met by quietly
    # sampling more clients.
    with pytest.raises(ConfigError, match="at 10 clients a round: a threshold of 12"):
        load(None, ["federation.clients=100", "federation.fraction=0.1",
                    "secure_aggregation.enabled=true", "secure_aggregation.threshold=12"])
    fraction = load(None, ["federation.clients=4", "secure_aggregation.enabled=true"])
    assert least_clients(fraction.federation, fraction.secure_aggregation) == 2


@pytest.mark.parametrize(
    "name, source",
    [("s.csv", "csv"), ("s.tsv.gz", "csv"), ("s.jsonl", "jsonl"), ("S.NDJSON.GZ", "jsonl"),
     ("export", "csv")],
)
def test_a_path_alone_reads_that_file_not_the_synthetic_default(
    tmp_path: Path, name: str, source: str
) -> None:
    """A user who names a file and forgets stream.source meant the file: the default
    synthetic stream would have trained on other data and said nothing."""
    (tmp_path / name).write_text("a,label\n1,x\n")
    cfg = validate({"stream": {"path": str(tmp_path / name)}})
    assert cfg.stream.source == source and cfg.drift.kind == "none"  # replayed as it is


def test_a_config_passed_on_does_not_need_its_file_again(tmp_path: Path) -> None:
    """Ray workers get the driver's checked config: a file deleted during the run is read
    from the table cache there, not refused by every worker's config check."""
    path = tmp_path / "d.csv"
    path.write_text("a,label\n1,x\n")
    cfg = validate({"stream": {"path": str(path)}})
    path.unlink()
    assert from_json(to_json(cfg)) == cfg
    with pytest.raises(ConfigError, match="file not found"):  # loading it anew still checks
        validate({"stream": {"path": str(path)}})


def test_a_batch_window_smaller_than_a_batch_is_noted() -> None:
    from fedstream.protocol.config import risky_settings

    notes = risky_settings(load(None, ["learner.mode=batch", "learner.window=2",
                                       "learner.batch_size=16"]))
    assert notes == ["learner.window = 2 is below learner.batch_size = 16: batch mode keeps "
                     "only 2 recent samples, so each step trains on all of them; raise "
                     "learner.window to keep more"]
    assert risky_settings(load(None, ["learner.window=2", "learner.batch_size=16"])) == []


def test_python_paths_are_taken_and_arrays_are_named_by_key(tmp_path: Path) -> None:
    """What a Python user holds: a `pathlib.Path` is a path; a numpy array (data passed
    where a file is named) is refused at its key, shown by kind and shape."""
    import numpy as np

    data = tmp_path / "d.csv"
    data.write_text("a,label\n1,0\n2,1\n")
    cfg = validate({"stream": {"path": data}, "output": {"dir": tmp_path / "out"}})
    assert (cfg.stream.path, cfg.stream.source) == (str(data), "csv")
    assert cfg.output.dir == str(tmp_path / "out") and cfg.drift.kind == "none"
    for section, key in (("stream", "path"), ("stream", "source")):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}: .* \(got ndarray of shape "
                           r"\(10, 3\)\)"):
            validate({section: {key: np.zeros((10, 3))}})
    with pytest.raises(ConfigError) as err:
        validate({"federation": {"rounds": "9" * 500}})
    assert len(str(err.value)) < 250 and "...)" in str(err.value)



def test_python_users_get_a_config_from_what_they_hold(tmp_path: Path) -> None:
    """`simulate` takes a Config, a dict of sections or a TOML path; a factory passed as a
    function is named as the workers import it."""
    from fedstream.protocol import models
    from fedstream.sim.runner import as_config

    toml = tmp_path / "fed.toml"
    toml.write_text("[federation]\nrounds = 7\n")
    made = load(None, ["federation.rounds=7"])
    for given in (toml, str(toml), {"federation": {"rounds": 7}}, made):
        assert as_config(given).federation.rounds == 7
    assert as_config(made) is made
    with pytest.raises(TypeError, match="simulate takes a Config, a dict of config sections or "
                       "a TOML file's path, not list"):
        as_config(["federation.rounds=7"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=re.escape(
            "learner.model: give the factory by name, as each Ray worker imports it: "
            "'fedstream.protocol.models:mlp'")):
        validate({"learner": {"model": models.mlp}})

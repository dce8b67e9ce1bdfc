"""The repository is a Flower App: `flwr run .` runs the same federation as `fedstream sim`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest

from fedstream.protocol.config import Config, from_run_config, scalar_defaults

ROOT = Path(__file__).resolve().parents[1]
APP_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_scalar_key_with_its_default() -> None:
    declared = {k: v for k, v in APP_CONFIG.items() if k != "config"}
    defaults = scalar_defaults()
    assert declared == defaults
    # The same types too: a default is told from a value given by its type and value.
    assert {k: type(v) for k, v in declared.items()} == {k: type(v) for k, v in defaults.items()}


def test_flower_run_config_gives_the_default_federation() -> None:
    assert from_run_config(dict(APP_CONFIG)) == Config()


def test_a_config_file_under_flwr_run_keeps_its_values(tmp_path: Path) -> None:
    # Flower hands over every declared key at its default: those must not replace the
    # file's values, nor count as set (a file source's drift.kind "none", a path's source).
    data = tmp_path / "d.csv"
    data.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    (tmp_path / "fed.toml").write_text(
        f'seed = 5\n[federation]\nclients = 3\nrounds = 2\n[learner]\nlr = 0.05\n'
        f'hidden = [16]\n[stream]\npath = "{data}"\n')
    run_config = {**APP_CONFIG, "config": str(tmp_path / "fed.toml"), "federation.rounds": 4}
    cfg = from_run_config(run_config)
    assert (cfg.seed, cfg.federation.clients, cfg.learner.lr, cfg.learner.hidden) == (
        5, 3, 0.05, [16])
    assert cfg.federation.rounds == 4  # a key given on top of the file
    assert cfg.stream.source == "csv" and cfg.drift.kind == "none"


def test_the_flwr_run_client_app_is_the_seeded_one_fedstream_sim_runs(monkeypatch) -> None:
    # Unbound (flwr run), the ClientApp read its config per message and drew privacy's
    # noise from the OS: two identical runs differed. It now hands each message to the
    # app `fedstream sim` builds for that config, seeded by it.
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedstream.protocol import messages as m
    from fedstream.protocol.config import to_json
    from fedstream.sim.client_app import _bound_client_app, app_for_run_config, sim_client_app

    run_config = {**APP_CONFIG, "federation.clients": 3, "privacy.enabled": True}
    cfg = from_run_config(run_config)
    items = tuple(sorted(run_config.items()))
    assert app_for_run_config(items) is _bound_client_app(to_json(cfg))
    ctx = Context(1, 7, {"partition-id": 2}, RecordDict(), run_config)
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)  # a server's message
    query = Message(m.roster_query(), dst_node_id=7, message_type=MessageType.QUERY)
    reply = sim_client_app()(query, ctx)
    assert reply.content[m.METRICS]["client-id"] == 2


def test_engine_settings_flwr_run_does_not_use_are_said() -> None:
    from fedstream.sim.server_app import engine_settings_unused

    assert engine_settings_unused(dict(APP_CONFIG)) == []
    said = engine_settings_unused({**APP_CONFIG, "simulation.client_cpus": 2.0,
                                   "simulation.ray_address": "10.0.0.5:6379"})
    assert said == ["simulation.client_cpus, simulation.ray_address are not used under `flwr "
                    "run`: Flower's federation settings start its simulation engine there (its "
                    "client resources, its Ray); `fedstream sim` uses them"]


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.skipif(_port_in_use(39091), reason="a local Flower SuperLink is already running")
def test_flwr_run_dot(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    out = tmp_path / "out"
    overrides = f'federation.clients=3 federation.rounds=2 output.dir="{out}" output.plots=false'
    try:
        proc = subprocess.run(
            [str(bindir / "flwr"), "run", ".", "--run-config", overrides,
             "--federation-config", "num-supernodes=3", "--stream"],
            cwd=ROOT, capture_output=True, text=True, timeout=400, env=env,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["clients"] == 3 and summary["client_updates"] == 6
    finally:
        _stop_superlinks_under(tmp_path)


def _stop_superlinks_under(path: Path) -> None:
    """`flwr run` leaves a detached local SuperLink behind; stop the one this test started."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(path) in cmdline:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()

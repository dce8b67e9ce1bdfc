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
from pydantic import BaseModel

from fedstream.protocol.config import Config, from_run_config

ROOT = Path(__file__).resolve().parents[1]
APP_CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def _scalar_defaults() -> dict[str, object]:
    """Every scalar key's declared default, as written in the code: a default that a
    validator resolves (server_lr 0: the strategy's own) is declared as that 0, so that
    `flwr run` resolves it the same way for whatever strategy its run config picks."""
    flat: dict[str, object] = {}

    def walk(prefix: str, model: type[BaseModel]) -> None:
        for key, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(f"{prefix}{key}.", field.annotation)
            elif not isinstance(field.default, list):
                flat[f"{prefix}{key}"] = field.default

    walk("", Config)
    return flat


def test_pyproject_declares_every_scalar_key_with_its_default() -> None:
    declared = {k: v for k, v in APP_CONFIG.items() if k != "config"}
    assert declared == _scalar_defaults()


def test_flower_run_config_gives_the_default_federation() -> None:
    assert from_run_config(dict(APP_CONFIG)) == Config()


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

"""Run a whole virtual federation on Flower's simulation engine (Ray underneath)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from flwr.simulation import run_simulation

from fedstream.client.device import pick_device
from fedstream.protocol.config import Config, load, validate
from fedstream.server import stopping
from fedstream.server.app import before_run, planned_noise
from fedstream.server.records import stop_logs
from fedstream.sim.client_app import sim_client_app
from fedstream.sim.dispatch import set_dispatch_interval
from fedstream.sim.federation import federation
from fedstream.sim.hints import before_start
from fedstream.sim.logs import quiet_flower
from fedstream.sim.results import check_config_file, check_free, claimed
from fedstream.sim.server_app import sim_server_app
from fedstream.sim.table_cache import content_digest


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray settings: one actor per `client_cpus`, and an existing cluster when given one
    (`simulation.ray_address`, else $RAY_ADDRESS)."""
    sim = cfg.simulation
    init_args: dict[str, Any] = {}
    address = sim.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        init_args["address"] = address
    return {
        "client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
        "init_args": init_args,
    }


def pin_data(cfg: Config) -> Config:
    """`cfg` with its data file's content pinned (`stream.sha256`).

    The driver checks the file, then every Ray worker loads it again: pinned, they all
    read the content that was checked (from the table cache), and a file edited during
    the run is refused instead of training some clients on another version. Pinned in
    the results' config.toml, a rerun refuses an edited file too.
    """
    if cfg.stream.source not in ("csv", "jsonl"):
        return cfg
    try:
        now = content_digest(cfg.stream.path)
    except OSError as err:
        why = err.strerror or err
        raise ValueError(f"stream.path: cannot read {cfg.stream.path}: {why}") from None
    if cfg.stream.sha256 and cfg.stream.sha256 != now:
        raise ValueError(
            f"stream.sha256: {cfg.stream.path} is not the content this config pinned "
            f"({cfg.stream.sha256[:12]}..., the file is {now[:12]}...): the file was "
            'edited since; set stream.sha256 = "" to run on it as it is now'
        )
    return cfg.model_copy(update={"stream": cfg.stream.model_copy(update={"sha256": now})})


def preflight(cfg: Config) -> None:
    """Fail before Ray starts: read the data files and build the model once, here.

    A bad CSV row, a missing label column, a model factory that does not load or a
    learner.device this machine lacks would otherwise surface later, in a worker, as
    failed rounds.
    """
    _check_output(Path(cfg.output.dir))
    check_config_file(cfg)
    # First the cluster, a socket's check, rather than after the data and model load.
    address = cfg.simulation.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        _check_cluster(address, where="simulation.ray_address (or --ray-address)"
                       if cfg.simulation.ray_address else "RAY_ADDRESS")
    fed = federation(cfg)
    _ = fed.dataset, fed.known_drifts  # a drift.known_at outside the file's times: now
    fed.initial_arrays(check=True)
    if cfg.privacy.enabled:
        planned_noise(cfg)  # a target epsilon out of reach is said now
    if not address:
        # Local virtual clients see this machine's devices; on a cluster, its nodes' may differ.
        try:
            pick_device(cfg.learner.device)
        except RuntimeError as err:
            raise ValueError(str(err)) from None
        _check_resources(cfg)


def _check_resources(cfg: Config) -> None:
    """A client that needs more CPUs or GPUs than this machine has: Ray would start no
    actor, and Flower end the run in a page of tracebacks."""
    sim, cpus = cfg.simulation, machine_cpus()
    if sim.client_cpus > cpus:
        raise ValueError(
            f"simulation.client_cpus = {sim.client_cpus:g}, but this machine has {cpus} CPUs: "
            f"each virtual client needs that many to start (at most {cpus})"
        )
    if sim.client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if sim.client_gpus > gpus:
            raise ValueError(
                f"simulation.client_gpus = {sim.client_gpus:g}, but this machine has {gpus} "
                "CUDA GPUs: each virtual client needs that many to start"
            )


def machine_cpus() -> int:
    """The CPUs Ray will give a local run: a container's CPU quota, not the host's
    cores that `os.cpu_count()` reports (a 2-CPU pod on a 64-core node)."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus(override_docker_cpu_warning=True)))
    except Exception:  # a Ray without this helper: the cores this process may run on
        if hasattr(os, "sched_getaffinity"):
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1


def _check_cluster(address: str, wait: float = 5.0, where: str = "simulation.ray_address",
                   ) -> None:
    """A cluster's HOST:PORT (or ray://HOST:PORT) must answer now: Ray itself retries an
    unreachable one for minutes, saying only that it cannot reach its GCS. `where`: the
    setting that named it."""
    if address in ("auto", "local"):
        return  # Ray's own names, resolved by Ray
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{where}: {address!r} is not a Ray cluster address: give HOST:PORT of its head "
            "(e.g. 10.0.0.5:6379, or ray://HOST:PORT), 'auto' for the cluster this machine "
            "is part of, or leave it out to run on this machine"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=wait).close()
    except OSError as err:
        raise ValueError(
            f"{where}: no Ray cluster answers at {address} ({err.strerror or err}); start "
            "one (`ray start --head`) or leave the address out to run on this machine"
        ) from None
    # Something listens there; a Ray head (its GCS, or the Ray Client server) speaks gRPC.
    # Anything else (a web server, say) would have Ray retry it for many minutes. (A head
    # with TLS, RAY_USE_TLS, is left to Ray: this probe speaks plaintext.)
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=wait)
    except grpc.FutureTimeoutError:
        raise ValueError(
            f"{where}: something listens at {address}, but it is no Ray head (it does not "
            f"speak gRPC within {wait:g} s): give the port `ray start --head` printed "
            "(6379 by default), or leave the address out to run on this machine"
        ) from None
    finally:
        channel.close()


def _check_output(out: Path) -> None:
    """The results folder must be a folder this process can write, found out now rather
    than by the server once Ray is up; nothing is left behind here (bad input writes
    nothing)."""
    try:
        _check_output_path(out)
    except PermissionError:  # Path.exists() raises where a folder on the way is closed
        raise ValueError(
            f"output.dir: cannot reach {out} (permission denied on a folder on the way)"
        ) from None


def _check_output_path(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output.dir: {out} is a file, not a folder")
    if out.is_dir():
        check_free(out)
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output.dir: {existing} is a file, not a folder")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise ValueError(f"output.dir: cannot write to {existing} (a read-only file system)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output.dir: cannot write to {existing} (permission denied)")
    try:  # access() says yes to root everywhere: a folder made and removed at once tells
        os.rmdir(tempfile.mkdtemp(prefix=".fedstream-check-", dir=existing))
    except OSError as exc:
        raise ValueError(
            f"output.dir: cannot make {out} ({exc.strerror or exc} in {existing})"
        ) from None


ENGINE_STOP_SECONDS = 60.0  # for a stopped run's engine to end (its workers finish a round)


def simulate(cfg: Config | dict[str, Any] | str | Path) -> dict[str, Any]:
    """Run `cfg` to completion and return its summary (also in `output.dir`/summary.json).

    `cfg` is a `Config`, or what makes one: a dict of sections (`validate`) or a TOML
    file's path (`load`).

    A run that aggregated no round returns its summary too (its reasons are data), but
    says so on stderr, as `fedstream sim` does with its exit status: its accuracy is the
    clients' training alone, and would pass for the federation's."""
    summary = run(prepare(as_config(cfg)))
    warning = unaggregated(summary)
    if warning:
        print(warning, file=sys.stderr)
    return summary


def as_config(cfg: Config | dict[str, Any] | str | Path) -> Config:
    """A `Config`, from itself, a dict of config sections or a TOML file's path."""
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return validate(cfg)
    if isinstance(cfg, str | Path):
        return load(cfg)
    raise TypeError(f"simulate takes a Config, a dict of config sections or a TOML file's "
                    f"path, not {type(cfg).__name__}")


def unaggregated(summary: dict[str, Any]) -> str | None:
    """The warning for a run that aggregated no round, naming the first reason."""
    if not summary["rounds"] or summary.get("rounds_aggregated", summary["rounds"]):
        return None
    errors = summary.get("aggregation_errors") or [{"reason": "see metrics.jsonl"}]
    return (f"fedstream: warning: no round was aggregated ({errors[0]['reason']}): the "
            "global model is the initial one (summary['aggregation_errors'])")


def prepare(cfg: Config) -> Config:
    """`cfg` checked and ready to run: its data file pinned, the data and model loaded once
    here (`preflight`), and the hints printed. Bad input raises (DataError, ValueError)
    and writes nothing; `fedstream sim` exits 2 on it."""
    cfg = pin_data(cfg)
    preflight(cfg)
    for hint in (*before_start(cfg), *before_run(cfg)):
        print(hint, file=sys.stderr)
    return cfg


def run(cfg: Config) -> dict[str, Any]:
    """Run a config `prepare` returned, on Flower's simulation engine; its summary. The
    results folder is held for the run (`results.claimed`): another run into it fails."""
    with claimed(Path(cfg.output.dir)), _environment_kept(RAY_SETS):
        return _run(cfg)


RAY_SETS = ("PYTHONBREAKPOINT",)  # Ray's driver points it at its remote debugger


@contextlib.contextmanager
def _environment_kept(names: tuple[str, ...]) -> Iterator[None]:
    """The caller's environment variables `names` as they were, once the run's Ray is gone:
    a script's `breakpoint()` after a run would otherwise wait for Ray's debugger."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run(cfg: Config) -> dict[str, Any]:
    summary_path = Path(cfg.output.dir) / "summary.json"
    summary_path.unlink(missing_ok=True)
    # An interrupt while Ray starts must not point at an earlier run's rounds.
    (summary_path.parent / "metrics.jsonl").unlink(missing_ok=True)
    quiet_flower()
    if not set_dispatch_interval(cfg.simulation.dispatch_interval):
        print(
            "fedstream: this flwr's simulation engine dispatches in a way fedstream does not "
            "know: simulation.dispatch_interval is ignored (Flower's 0.1 s applies)",
            file=sys.stderr,
        )
    stopping.start()
    failed: list[BaseException] = []
    ended = threading.Event()

    def engine() -> None:
        try:
            run_simulation(
                server_app=sim_server_app(cfg),
                client_app=sim_client_app(cfg),
                num_supernodes=cfg.federation.clients,
                backend_config=backend_config(cfg),
            )
        except BaseException as err:  # handed to the caller's thread below
            failed.append(err)
        finally:
            ended.set()

    # Flower's engine runs in a thread of its own and the caller's waits in short waits, so
    # that an interrupt (Ctrl-C, or `_thread.interrupt_main`, which no blocking wait sees)
    # lands here at once, and not inside the engine: interrupted there, it left its worker
    # threads waiting on Ray for good, and the next run in the process crashed or hung.
    # (An Event, not Thread.join: a join that an interrupt cut short returns at once after.)
    threading.Thread(target=engine, name="fedstream-simulation", daemon=True).start()
    try:
        while not ended.wait(0.2):
            pass
    except BaseException:
        # The ServerApp's next poll raises `stopping.RunStopped`; the engine then ends as after a
        # last round: its workers finish the messages they hold, and it stops Ray.
        stop_logs()
        if not ended.wait(ENGINE_STOP_SECONDS):
            print("fedstream: the stopped run's engine is still ending", file=sys.stderr)
        raise
    if failed:  # the ServerApp's thread may outlive the engine: stop it writing rounds
        stop_logs()
        if not stopping.join(timeout=30.0):
            print("fedstream: the failed run's ServerApp is still ending", file=sys.stderr)
        raise failed[0]
    if not summary_path.exists():
        raise RuntimeError(
            f"the simulation ended without a summary in {summary_path.parent}: see the log above"
        )
    return json.loads(summary_path.read_text())

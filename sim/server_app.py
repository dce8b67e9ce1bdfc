"""The simulation's ServerApp: federate, then baselines, summary and plots."""

from __future__ import annotations

import contextlib
import sys
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedstream.protocol.config import Config, from_run_config, run_config_changes
from fedstream.server import stopping
from fedstream.server.app import run_federation
from fedstream.server.records import read_metrics, write_summary
from fedstream.sim import results
from fedstream.sim.baselines import run_baselines
from fedstream.sim.dispatch import set_dispatch_interval
from fedstream.sim.evaluation import make_evaluate
from fedstream.sim.federation import federation
from fedstream.sim.logs import quiet_flower
from fedstream.sim.plots import plot_all


def run_server(grid: Grid, cfg: Config, simulated: bool = True) -> dict:
    """The whole server side of a simulation: federate, then baselines, summary and plots.

    `simulated` is False under `flwr run` (the app may be federating real SuperNodes)."""
    out = results.prepare(cfg)
    nodes = _registered(grid, cfg.federation.clients)
    if nodes < cfg.federation.clients:
        print(
            f"warning: {nodes} SuperNodes for federation.clients = {cfg.federation.clients}; "
            f"{_ids(nodes, cfg.federation.clients - 1)} will not take part",
            file=sys.stderr,
        )
    fed = federation(cfg)
    evaluate = make_evaluate(cfg) if cfg.evaluation.every else None
    started = time.perf_counter()
    arrays, history = run_federation(
        grid, cfg, fed.initial_arrays(), out, evaluate, simulated=simulated,
        n_classes=fed.n_classes,
    )
    wall = time.perf_counter() - started
    baselines = run_baselines(cfg)
    final_eval = evaluate(cfg.federation.rounds, arrays) if evaluate else None
    records = read_metrics(out / "metrics.jsonl")
    summary = results.summarize(cfg, history, wall, baselines, final_eval, records)
    stopping.check()  # a stopped run leaves no summary or model: it did not finish
    results.save_model(cfg, arrays, history)
    write_summary(out, summary)
    if cfg.output.plots:
        plot_all(out, summary, records)
    return summary


ENGINE_KEYS = ("simulation.ray_address", "simulation.client_cpus", "simulation.client_gpus",
               "simulation.backend")


def engine_settings_unused(run_config: dict) -> list[str]:
    """Under `flwr run`, Flower's own simulation settings start the engine, before any
    fedstream code runs: the keys that would have started it are said to be unused."""
    given = [k for k in run_config_changes(run_config) if k in ENGINE_KEYS]
    if not given:
        return []
    return [f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not used under `flwr "
            "run`: Flower's federation settings start its simulation engine there (its "
            "client resources, its Ray); `fedstream sim` uses them"]


def _ids(first: int, last: int) -> str:
    return f"client {first}" if first == last else f"clients {first} to {last}"


def _registered(grid: Grid, want: int, timeout: float = 10.0) -> int:
    """How many SuperNodes are up, waiting a little for them: the engine registers its
    virtual nodes while the ServerApp starts, so a count taken at once can be short."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = len(list(grid.get_node_ids()))
        if nodes >= want or time.monotonic() > deadline:
            return nodes
        time.sleep(0.05)


def sim_server_app(cfg: Config | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        quiet_flower()
        config = cfg or from_run_config(dict(context.run_config))
        if cfg is None:
            for line in engine_settings_unused(dict(context.run_config)):
                print(f"fedstream: {line}", file=sys.stderr, flush=True)
        # Under `flwr run`, the engine in this process starts its dispatcher once Ray is up,
        # seconds after this; `fedstream sim` has set it before starting the engine.
        set_dispatch_interval(config.simulation.dispatch_interval)
        stopping.serving()
        with contextlib.suppress(stopping.RunStopped):  # its caller stopped the run
            run_server(grid, config, simulated=cfg is not None)

    return app

"""Simulation throughput of fedstream against stock Flower, and against bare torch compute.

    python bench/sim_throughput.py [--clients 20] [--rounds 30] [--repeat 1]

Both federations run on Flower's simulation engine (Ray) with the same Ray resources, the
same model and the very same samples: before the runs, every client's per-round batches are
drawn from fedstream's streams and written to one .npz per client, which the stock app
(bench/stock_app.py) loads as its partition. Each simulation runs in a subprocess of its own
(`--only fedstream|stock|bare --json`), so Ray state and memory do not leak between them.

Nothing here asserts on time: the machine is shared and noisy. It prints ratios against
baselines measured in the same run; read them, do not gate on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from children import run_child

SYSTEMS = ("stock", "fedstream")
CONFIG_FILE = "fedstream-config.json"
RAY_RESOURCES = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}


# --------------------------------------------------------------------------- config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=20, help="virtual clients (default 20)")
    p.add_argument("--rounds", type=int, default=30, help="federated rounds (default 30)")
    p.add_argument("--repeat", type=int, default=1, help="runs per system; medians are shown")
    p.add_argument("--only", choices=("fedstream", "stock", "bare"), help="child mode: one run")
    p.add_argument("--json", action="store_true", help="child mode: print the result as JSON")
    p.add_argument("--data", type=Path, help="child mode: the materialised batches")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="fedstream config override (repeatable), e.g. detector.kind=none",
    )
    return p.parse_args(argv)


def bench_config(
    clients: int, rounds: int, out_dir: Path, overrides: list[str] | None = None
) -> Any:
    """The default fedstream config, resized, quiet, writing into `out_dir`.

    The parent resolves it once and hands it to every child as JSON, so all runs use the
    same settings even if the defaults in the source change while the benchmark runs.
    """
    from fedstream.protocol.config import load

    return load(
        overrides=[
            f"federation.clients={clients}",
            f"federation.rounds={rounds}",
            f'output.dir="{out_dir}"',
            "output.progress=false",
            "output.plots=false",
            *(overrides or []),
        ]
    )


# ---------------------------------------------------------------------- the samples


def materialise(cfg: Any, data: Path) -> int:
    """Write each client's per-round batches (exactly what fedstream trains on) to .npz.

    `bounds[r-1]:bounds[r]` is round r's slice, as a federated client whose offset advances
    to `stop` each round would take it. Returns the number of samples written.
    """
    from fedstream.sim.federation import federation

    fed = federation(cfg)
    total = 0
    for c in range(cfg.federation.clients):
        stream = fed.stream(c)
        bounds = [0]
        for r in range(1, cfg.federation.rounds + 1):
            bounds.append(stream.pending(bounds[-1], until=r, budget=cfg.stream.budget)[1])
        batch = stream.take(0, bounds[-1])
        np.savez(data / f"client_{c}.npz", x=batch.x, y=batch.y, bounds=np.array(bounds))
        total += bounds[-1]
    meta = {
        "model": cfg.learner.model,
        "feature_shape": list(fed.feature_shape),
        "n_classes": fed.n_classes,
        "hidden": list(cfg.learner.hidden),
        "seed": cfg.seed,
        "rounds": cfg.federation.rounds,
        "clients": cfg.federation.clients,
        "lr": cfg.learner.lr,
        "momentum": cfg.learner.momentum,
        "batch_size": cfg.learner.batch_size,
    }
    (data / "meta.json").write_text(json.dumps(meta))
    return total


# ------------------------------------------------------------------------ children


def record_message_runtimes() -> list[float]:
    """Collect the duration of every ClientApp message as Flower's runtime measures it.

    Flower's simulation runtime times each message from submission to a Ray actor until
    the reply is back (`VceMetrics.add_clientapp_runtime`), which includes pickling the
    ClientApp, message and Context both ways. The list fills while the simulation runs.
    """
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics

    seen: list[float] = []
    original = VceMetrics.add_clientapp_runtime

    def add(self: Any, runtime: float) -> None:
        seen.append(runtime)
        original(self, runtime)

    VceMetrics.add_clientapp_runtime = add  # type: ignore[method-assign]
    return seen


def timed_method(owner: type, name: str) -> list[float]:
    """Time every call of `owner.name` (in this process) into the returned list."""
    seen: list[float] = []
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seen.append(time.perf_counter() - started)

    setattr(owner, name, timed)
    return seen


def run_fedstream(args: argparse.Namespace) -> dict[str, Any]:
    """fedstream's own `simulate`, as a user calls it; timings from its results folder."""
    from fedstream.protocol.config import from_json
    from fedstream.server import roster
    from fedstream.sim.runner import simulate

    cfg = from_json((args.data / CONFIG_FILE).read_text())
    out = Path(cfg.output.dir)
    per_message = record_message_runtimes()
    refresh = timed_method(roster.Roster, "refresh")
    started = time.perf_counter()
    summary = simulate(cfg)
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_seconds": summary["wall_seconds"],
        "total_seconds": total,
        "round_seconds": [r["seconds"] for r in records],
        "round_updates": [r["clients_ok"] for r in records],
        "client_updates": summary["client_updates"],
        "samples_seen": summary["samples_seen"],
        "train_seconds": sum(c["train_seconds"] for r in records for c in r["clients"].values()),
        "accuracy": summary["prequential_accuracy"],
        "message_seconds": per_message,
        "roster_seconds": refresh[0] if refresh else None,
    }


def run_stock(_args: argparse.Namespace) -> dict[str, Any]:
    """The stock Flower app on the same Ray resources; the ServerApp times its own loop."""
    import stock_app  # on PYTHONPATH (set by the parent) so Ray workers import it too
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)  # fedstream quiets Flower the same way
    meta = stock_app.meta()
    per_message = record_message_runtimes()
    started = time.perf_counter()
    run_simulation(
        server_app=stock_app.server,
        client_app=stock_app.app,
        num_supernodes=meta["clients"],
        backend_config=RAY_RESOURCES,
    )
    total = time.perf_counter() - started
    t = stock_app.TIMINGS
    return {
        "wall_seconds": t["wall_seconds"],
        "total_seconds": total,
        "round_seconds": t["round_seconds"],
        "round_updates": [meta["clients"]] * len(t["round_seconds"]),
        "client_updates": t["client_updates"],
        "samples_seen": t["samples_seen"],
        "train_seconds": t["train_seconds"],
        "message_seconds": per_message,
    }


def run_bare(args: argparse.Namespace) -> dict[str, Any]:
    """The same SGD steps in one process, one thread, timing only forward/backward/step."""
    import torch
    from torch.nn import functional as F

    from fedstream.protocol.models import build_model

    torch.set_num_threads(1)
    meta = json.loads((args.data / "meta.json").read_text())
    bs, steps = meta["batch_size"], 0
    per_round = [0.0] * meta["rounds"]
    for c in range(meta["clients"]):
        with np.load(args.data / f"client_{c}.npz") as npz:
            x, y, bounds = torch.from_numpy(npz["x"]), torch.from_numpy(npz["y"]), npz["bounds"]
        model = build_model(
            meta["model"],
            meta["feature_shape"],
            meta["n_classes"],
            hidden=meta["hidden"],
            seed=meta["seed"],
        )
        opt = torch.optim.SGD(model.parameters(), lr=meta["lr"], momentum=meta["momentum"])
        for r in range(meta["rounds"]):
            xr, yr = x[bounds[r] : bounds[r + 1]], y[bounds[r] : bounds[r + 1]]
            started = time.perf_counter()
            for s in range(0, len(yr), bs):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xr[s : s + bs]), yr[s : s + bs]).backward()
                opt.step()
                steps += 1
            per_round[r] += time.perf_counter() - started
    return {"compute_seconds": sum(per_round), "round_compute": per_round, "sgd_steps": steps}


CHILDREN = {"fedstream": run_fedstream, "stock": run_stock, "bare": run_bare}


def child_main(args: argparse.Namespace) -> None:
    result = CHILDREN[args.only](args)
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(json.dumps(result, indent=2))


# -------------------------------------------------------------------------- parent


def spawn(system: str, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Run one child (`--only SYSTEM --json`) and collect its JSON."""
    cmd = ["--only", system, "--json", "--clients", str(args.clients),
           "--rounds", str(args.rounds), "--data", str(data)]
    return run_child(__file__, cmd, {"FEDSTREAM_BENCH_DATA": str(data)}, system)


def steady(result: dict[str, Any]) -> tuple[float, int]:
    """Seconds and updates of rounds 2..N.

    Round 1 is not a fair sample: Flower starts the ServerApp thread before it starts Ray,
    so the first round waits for Ray itself, its actors and their first imports.
    """
    return sum(result["round_seconds"][1:]), sum(result["round_updates"][1:])


def steady_messages(result: dict[str, Any]) -> list[float]:
    """Per-message runtimes of rounds 2..N (the last (N-1) x clients train messages)."""
    return result["message_seconds"][-sum(result["round_updates"][1:]) :]


def figures(r: dict[str, Any]) -> dict[str, float]:
    """Every figure the table shows, for one run."""
    st_sec, st_upd = steady(r)
    messages = steady_messages(r)
    row = {
        "rounds_wall": r["wall_seconds"],
        "round1": r["round_seconds"][0],
        "steady_round": st_sec / max(1, len(r["round_seconds"]) - 1),
        "total": r["total_seconds"],
        "process": r["process_seconds"],
        "updates": r["client_updates"],
        "samples": r["samples_seen"],
        "ups": r["client_updates"] / r["wall_seconds"],
        "steady_ups": st_upd / st_sec if st_sec else float("nan"),
        "client_train": r["train_seconds"],
        "msg_median": 1e3 * statistics.median(messages),
        "msg_busy": sum(messages) / max(1e-9, st_sec),
    }
    if r.get("roster_seconds") is not None:
        row["roster"] = r["roster_seconds"]
    return row


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median over repeats of every figure."""
    rows = [figures(r) for r in runs]
    return {k: statistics.median(row[k] for row in rows) for k in rows[0]}


ROWS = (
    ("rounds wall (ServerApp loop) [s]", "rounds_wall", "{:.2f}"),
    ("  round 1 (waits for Ray start-up) [s]", "round1", "{:.2f}"),
    ("  rounds 2..N, mean per round [s]", "steady_round", "{:.3f}"),
    ("total incl. Ray start-up [s]", "total", "{:.2f}"),
    ("whole subprocess [s]", "process", "{:.2f}"),
    ("client updates", "updates", "{:.0f}"),
    ("samples trained", "samples", "{:.0f}"),
    ("client updates/s (all rounds)", "ups", "{:.2f}"),
    ("client updates/s (rounds 2..N)", "steady_ups", "{:.2f}"),
    ("time inside ClientApp, summed [s]", "client_train", "{:.2f}"),
    ("per message, Ray round trip [ms]", "msg_median", "{:.1f}"),
    ("  messages in flight, avg (of 2)", "msg_busy", "{:.2f}"),
)


def print_report(med: dict[str, dict[str, float]], bare: dict[str, Any], expected: int) -> None:
    fs, st = med["fedstream"], med["stock"]
    print(f"\n{'':36} {'stock Flower':>14} {'fedstream':>14}")
    for label, key, fmt in ROWS:
        print(f"{label:36} {fmt.format(st[key]):>14} {fmt.format(fs[key]):>14}")
    if fs.get("roster") is not None:
        print(f"{'fedstream roster query (once) [s]':36} {'-':>14} {fs['roster']:>14.2f}")
    same = fs["samples"] == st["samples"] == expected
    print(f"\nsame samples on both sides: {'yes' if same else 'NO'} ({expected} materialised)")
    print("\nthroughput ratio fedstream/stock (>= 1.0: fedstream no slower)")
    print(f"  all rounds        {fs['ups'] / st['ups']:.2f}")
    print(f"  rounds 2..N       {fs['steady_ups'] / st['steady_ups']:.2f}")
    print(f"  incl. start-up    {st['total'] / fs['total']:.2f}")
    compute = bare["compute_seconds"]
    print(f"\nbare torch compute: {compute:.2f} s for {bare['sgd_steps']} SGD steps (1 thread)")
    later = sum(bare["round_compute"][1:])
    print(f"  {'':36} {'all rounds':>12} {'rounds 2..N':>12}")
    for name, m in (("fedstream", fs), ("stock", st)):
        steady_wall = m["steady_round"] * (len(bare["round_compute"]) - 1)
        print(
            f"  {name + ' rounds wall / bare compute':36} {m['rounds_wall'] / compute:11.1f}x "
            f"{steady_wall / later:11.1f}x"
        )


def parent_main(args: argparse.Namespace) -> None:
    from fedstream.protocol.config import to_json

    with tempfile.TemporaryDirectory(prefix="fedstream-bench-") as tmp:
        data = Path(tmp)
        cfg = bench_config(args.clients, args.rounds, data / "fedstream-out", args.overrides)
        (data / CONFIG_FILE).write_text(to_json(cfg))
        expected = materialise(cfg, data)
        print(
            f"{args.clients} clients, {args.rounds} rounds, {expected} samples; Ray: "
            f"{RAY_RESOURCES['client_resources']} per client, {os.cpu_count()} cores"
        )
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
        for i in range(args.repeat):
            order = SYSTEMS if i % 2 == 0 else SYSTEMS[::-1]  # alternate against drift
            for system in order:
                load = os.getloadavg()[0]
                res = spawn(system, args, data)
                runs[system].append(res)
                print(
                    f"  run {i + 1} {system:9}: rounds {res['wall_seconds']:.2f} s, "
                    f"total {res['total_seconds']:.2f} s (1-min load before: {load:.2f})",
                    flush=True,
                )
        bare = spawn("bare", args, data)
        print_report({s: summarise(runs[s]) for s in SYSTEMS}, bare, expected)


def main() -> None:
    args = parse_args()
    if args.only:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

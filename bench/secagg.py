"""The cost of secure aggregation: plaintext FedAvg, fedstream's, and Flower's SecAgg+.

    python bench/secagg.py [--clients 10] [--params 1000000] [--rounds 5] [--dropout 0.3]
                           [--repeat 1] [--dispatch-interval 0.01] [--quick]
                           [--systems plain ours secaggplus]
                           [--skip-memory] [--skip-profile]

One federation, three systems side by side, in a no-dropout and a dropout variant:

- **plaintext**: Flower's own `FedAvg` (the Message API, `flwr.serverapp.strategy`), its
  `start()` loop, and a ClientApp that replies with its float32 `ArrayRecord`.
- **ours**: fedstream's round loop (`run_rounds`) with `SecureAggregator`, the strategy
  from `make_strategy` (plain FedAvg: `federation.server_lr=1`), and a ClientApp with
  `secure_aggregation_mod` around a train handler that replies in fedstream's format
  (`arrays` + `TrainReport.to_record()`). Secure-aggregation settings are the config's
  defaults: 32-bit ring, clip 1.0 on the model change, threshold 0.6 of the share group,
  O(log n) neighbours (all 9 others at 10 clients).
- **SecAgg+**: Flower's legacy `SecAggPlusWorkflow` in a `DefaultWorkflow` with a legacy
  `FedAvg`, and a `NumPyClient` behind `secaggplus_mod`. Comparable settings: shares to all
  clients (`num_shares=1.0`), `reconstruction_threshold=0.6`, modulus 2^32, quantization
  range 2^32 / (2 x clients) (the largest that cannot wrap), clipping 8.0 (Flower clips
  weights, not changes), `max_weight=1000` as ours.

The model is a 1-hidden-layer MLP (h -> h -> 10, h chosen so that it has about `--params`
parameters, float32). Every client round does the same work in all three: `--steps` SGD
steps on batches of 32 random samples drawn from (client, round). In the dropout variant,
the same `round(dropout x clients)` clients, drawn per round, raise in their train handler
(for SecAgg+: in `fit`, i.e. the stage that carries the model), in every round.

**Transport.** All three run on Flower's simulation engine (`run_simulation`, Ray, one CPU
per actor: 2 actors on 2 cores), each in a subprocess of its own. All three ServerApps pull
replies through the same poller, fedstream's `send_and_collect` (2 ms, then 5 % of the wait);
Flower's grid would poll every 100 ms, which would add up to 0.1 s per trip to the two
baselines, most to SecAgg+ (4 trips). The engine hands messages to the actors every
`--dispatch-interval` seconds in all three: by default every 0.01 s, and at once when a
ServerApp pushes, as `fedstream sim` runs it (`fedstream.sim.dispatch`);
`--dispatch-interval 0.1` is Flower's stock engine, where every trip starts on a 0.1 s
tick and round times come in steps of it.

**Measures.**
- *Round time*: the time between the ends of consecutive rounds, in the ServerApp, over
  the timed rounds (1 warm-up round first: it waits for Ray and, for ours, fetches keys).
  The targets are checked on paired ratios: each repeat runs the three systems back to
  back, gives one ratio per pair, and the median over repeats is compared with the
  target (the machine's speed drifts over minutes, more than the targets' margins).
- *Upload per client*: payload bytes (`fedstream.server.records.bytes_of`: arrays, metric
  and config records, without protobuf framing) of every reply a client sends in a round,
  all trips summed, counted where the engine stores replies; mean over the clients whose
  update entered the round's sum. Compared with 4 bytes x parameters (the float32 update)
  and with the plaintext run's measured reply.
- *Server peak memory*: a separate, in-process run (no Ray) of the same three ServerApps on
  a loopback grid that runs each ClientApp in this process when its message is pushed,
  keeps replies serialized on disk and hands them out on pull. tracemalloc measures the
  process, but the ClientApps' own execution is cut out (the peak is read before and
  reset after each client runs), so what is left is the ServerApp: the peak of traced
  bytes over two rounds, above the level before the ServerApp started. Measured at two
  client counts and two model sizes. Ours is measured twice: with replies arriving one
  per pull (as when clients finish at different times), and with all of a trip's replies
  ready at the first pull ("burst": `send_and_collect` then holds them all at once).
  Note that reading a reply through `RecordDict.array_records` / `config_records` (as
  `bytes_of` and `secagg_wire.read_masked` do) makes a reference cycle in flwr 1.41
  (`_SyncedDict` keeps a bound method of itself), so a folded reply stays in memory until
  Python's cyclic GC runs: ours' peak includes a few such replies, a number set by the GC's
  cadence, not by the client count.
- *Profile*: an in-process run of ours (and plaintext, for reference) with timers around
  the client's and the server's secure-aggregation steps: where ours spends its time.

Nothing here asserts anything: the machine is shared and noisy. Read the ratios.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import children
import numpy as np

from fedstream.protocol.config import SimulationConfig
from fedstream.sim.dispatch import FLOWER_INTERVAL, set_dispatch_interval

BENCH_DIR = Path(__file__).resolve().parent
MODULE = Path(__file__).stem  # Ray workers import this file by name (bench/ on PYTHONPATH)
ENV = "FEDSTREAM_SECAGG_BENCH"  # the run's Settings as JSON, for the driver and Ray workers
SYSTEMS = ("plain", "ours", "secaggplus")
LABELS = {"plain": "plaintext", "ours": "ours", "secaggplus": "SecAgg+"}
RAY_RESOURCES = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
CLASSES = 10
BATCH = 32
LR = 0.05


@dataclass(frozen=True)
class Settings:
    clients: int
    params: int
    rounds: int  # timed rounds
    warmup: int
    dropout: float
    steps: int
    seed: int = 0
    dispatch_interval: float = FLOWER_INTERVAL  # seconds between the engine's hand-outs

    @property
    def total_rounds(self) -> int:
        return self.warmup + self.rounds


@cache
def settings() -> Settings:
    return Settings(**json.loads(os.environ[ENV]))


# --------------------------------------------------------------------------- the work


def hidden_for(params: int) -> int:
    """h such that an h -> h -> 10 MLP has about `params` parameters."""
    # h*h + h + 10*h + 10 = params
    return max(1, round((-11 + math.sqrt(121 + 4 * (params - CLASSES))) / 2))


def param_count(params: int) -> int:
    h = hidden_for(params)
    return h * h + h + CLASSES * h + CLASSES


def initial_state(s: Settings) -> dict[str, np.ndarray]:
    """The global model before round 1: the same in all three systems."""
    h = hidden_for(s.params)
    rng = np.random.default_rng([s.seed, 0x1417])
    bound = 1 / math.sqrt(h)
    shapes = {"0.weight": (h, h), "0.bias": (h,), "2.weight": (CLASSES, h), "2.bias": (CLASSES,)}
    return {k: rng.uniform(-bound, bound, shape).astype(np.float32) for k, shape in shapes.items()}


@cache
def _model(h: int) -> Any:
    import torch
    from torch import nn

    torch.set_num_threads(1)
    return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, CLASSES))


def local_train(state: dict[str, Any], partition: int, server_round: int) -> tuple[Any, int, float]:
    """`steps` SGD steps from `state` on this client's random samples for this round.

    Returns the new state dict (torch tensors), the number of examples and the loss sum.
    """
    import torch
    from torch.nn import functional as F

    s = settings()
    h = hidden_for(s.params)
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    model = _model(h)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    rng = np.random.default_rng([s.seed, partition, server_round])
    x = torch.from_numpy(rng.standard_normal((s.steps * BATCH, h), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, CLASSES, s.steps * BATCH))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_sum = 0.0
    for i in range(s.steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(
            model(x[i * BATCH : (i + 1) * BATCH]), y[i * BATCH : (i + 1) * BATCH]
        )
        loss.backward()
        opt.step()
        loss_sum += float(loss) * BATCH
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(y), loss_sum


class ClientDropped(RuntimeError):
    """This client is offline this round (the dropout variant)."""


def dropped(s: Settings, server_round: int) -> set[int]:
    k = round(s.dropout * s.clients)
    return set(random.Random(s.seed * 7919 + server_round).sample(range(s.clients), k))


def maybe_drop(partition: int, server_round: int) -> None:
    if partition in dropped(settings(), server_round):
        raise ClientDropped(f"client {partition} drops out of round {server_round}")


def _partition(ctx: Any) -> int:
    return int(ctx.node_config.get("partition-id", 0))


def _numpy(arrays: Any) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in arrays.items()}


def _record(state: dict[str, np.ndarray]) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(v) for k, v in state.items()})


# ------------------------------------------------------------------------ ClientApps


def _plain_client() -> Any:
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    app = _ref_app("plain")

    @app.train()
    def train(msg: Message, ctx: Any) -> Message:
        p, r = _partition(ctx), int(msg.content["config"]["server-round"])
        maybe_drop(p, r)
        state, n, _ = local_train(_numpy(msg.content["arrays"]), p, r)
        content = RecordDict(
            {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})}
        )
        return Message(content, reply_to=msg)

    return app


def _ours_client() -> Any:
    from flwr.app import ArrayRecord, Message, RecordDict

    from fedstream.client.secure import secure_aggregation_mod
    from fedstream.protocol import messages as m

    app = _ref_app("ours", mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, ctx: Any) -> Message:
        started = time.perf_counter()
        p, r = _partition(ctx), int(msg.content[m.CONFIG][m.ROUND])
        maybe_drop(p, r)
        state, n, loss_sum = local_train(_numpy(msg.content[m.ARRAYS]), p, r)
        report = m.TrainReport(
            client=p,
            examples=n,
            correct=0,
            loss_sum=loss_sum,
            train_seconds=time.perf_counter() - started,
            classes=[n, 0, 0, n, 0, 0],  # 2 classes: labelled 0, predicted 1 (correct 0)
        )
        content = RecordDict({m.ARRAYS: ArrayRecord(state), m.METRICS: report.to_record()})
        return Message(content, reply_to=msg)

    @app.query()
    def query(msg: Message, ctx: Any) -> Message:
        return Message(m.roster_reply(_partition(ctx)), reply_to=msg)

    return app


def _secaggplus_client() -> Any:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class BenchClient(NumPyClient):
        def __init__(self, partition: int) -> None:
            self.partition = partition

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]):
            r = int(config["server-round"])
            maybe_drop(self.partition, r)
            keys = list(initial_state(settings()))
            state, n, _ = local_train(dict(zip(keys, parameters, strict=True)), self.partition, r)
            return [v.numpy() for v in state.values()], n, {}

    def client_fn(context: Any) -> Any:
        return BenchClient(_partition(context)).to_client()

    return _ref_app("secaggplus", client_fn=client_fn, mods=[secaggplus_mod])


CLIENT_FACTORIES = {"plain": _plain_client, "ours": _ours_client, "secaggplus": _secaggplus_client}


@cache
def client_app(system: str) -> Any:
    return CLIENT_FACTORIES[system]()


def _ref_app(system: str, **kwargs: Any) -> Any:
    """A ClientApp that pickles as its system's name: each Ray worker builds it once."""
    from flwr.clientapp import ClientApp

    class RefApp(ClientApp):
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (client_app, (system,))

    return RefApp(**kwargs)


# ------------------------------------------------------------------------ ServerApps

RoundHook = Callable[[int, bool], None]  # (round that just ended, 0 = start; aggregated?)


def _fast(grid: Any) -> Any:
    """The grid every ServerApp here uses: fedstream's poller (see the module docstring)."""
    from fedstream.server.grid import OrderedGrid

    return OrderedGrid(grid, sorted)


def serve_plain(grid: Any, context: Any, s: Settings, on_round: RoundHook) -> Any:
    from flwr.app import ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=s.clients,
        min_available_nodes=s.clients,
    )
    last: list[Any] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        on_round(server_round, bool(last) and arrays is not last[-1])
        last[:] = [arrays]

    result = strategy.start(
        grid=_fast(grid),
        initial_arrays=_record(initial_state(s)),
        num_rounds=s.total_rounds,
        evaluate_fn=stamp,
    )
    return result.arrays


def ours_config(s: Settings) -> Any:
    from fedstream.protocol.config import load

    return load(
        None,
        [
            f"federation.clients={s.clients}",
            f"federation.min_clients={s.clients}",
            f"federation.rounds={s.total_rounds}",
            "federation.server_lr=1.0",
            "secure_aggregation.enabled=true",
            "output.progress=false",
        ],
    )


def serve_ours(grid: Any, context: Any, s: Settings, on_round: RoundHook) -> Any:

    from fedstream.server.rounds import RoundSettings, run_rounds
    from fedstream.server.secure import SecureAggregator
    from fedstream.server.strategy import make_strategy

    cfg = ours_config(s)
    settings_ = RoundSettings(
        rounds=cfg.federation.rounds,
        seed=cfg.seed,
        timeout=cfg.federation.round_timeout,
        progress=False,
        sample_all=True,
        secure=SecureAggregator(cfg.secure_aggregation, 2),
    )
    on_round(0, False)
    arrays, _ = run_rounds(
        grid,
        make_strategy(cfg),
        _record(initial_state(s)),
        settings_,
        lambda rec, _h: (
            STAGES.append(rec.get("stage_seconds", {})),
            on_round(rec["round"], rec["aggregated"]),
        ),
    )
    return arrays


def secaggplus_workflow(s: Settings) -> Any:
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled client holds a share: ours at 10 clients
        reconstruction_threshold=0.6,
        max_weight=1000.0,
        clipping_range=8.0,
        quantization_range=2**32 // (2 * s.clients),
        modulus_range=2**32,
    )


def serve_secaggplus(grid: Any, context: Any, s: Settings, on_round: RoundHook) -> Any:
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=s.clients,
        min_available_clients=s.clients,
        initial_parameters=ndarrays_to_parameters(list(initial_state(s).values())),
        on_fit_config_fn=lambda r: {"server-round": r},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=s.total_rounds), strategy=strategy
    )
    secagg = secaggplus_workflow(s)
    done = itertools.count(1)

    def fit(grid_: Any, ctx: Any) -> None:
        before = ctx.state.array_records[MAIN_PARAMS_RECORD]
        secagg(grid_, ctx)
        on_round(next(done), ctx.state.array_records[MAIN_PARAMS_RECORD] is not before)

    on_round(0, False)
    DefaultWorkflow(fit_workflow=fit)(_fast(grid), legacy)
    return legacy.state.array_records[MAIN_PARAMS_RECORD]


SERVERS = {"plain": serve_plain, "ours": serve_ours, "secaggplus": serve_secaggplus}


def flat(arrays: Any) -> np.ndarray:
    return np.concatenate([a.numpy().astype(np.float32).ravel() for a in arrays.values()])


# ----------------------------------------------------------------- Ray child: one run


class Recorder:
    """Per-round marks, and bytes per node, filled by the engine's threads and the server's."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.up: dict[int, int] = defaultdict(int)
        self.down: dict[int, int] = defaultdict(int)
        self.errors: dict[int, int] = defaultdict(int)
        self.pushes = 0
        self.runtimes: list[tuple[float, float]] = []  # (end time, seconds) per ClientApp call
        self.marks: list[dict[str, Any]] = []

    def mark(self, server_round: int, aggregated: bool) -> None:
        with self.lock:
            self.marks.append(
                {
                    "round": server_round,
                    "t": time.perf_counter(),
                    "aggregated": aggregated,
                    "up": dict(self.up),
                    "down": dict(self.down),
                    "errors": dict(self.errors),
                    "pushes": self.pushes,
                }
            )


RECORDER = Recorder()
FINAL: dict[str, Any] = {}
STAGES: list[dict[str, float]] = []  # ours: seconds per stage of each round (SecureOutcome)


def install_counters() -> None:
    """Count payload bytes where the engine stores messages; count trips; time ClientApps."""
    from flwr.server.superlink.fleet.vce.metrics import VceMetrics
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedstream.server.records import bytes_of

    store_res, store_ins = InMemoryLinkState.store_message_res, InMemoryLinkState.store_message_ins
    push, add_runtime = InMemoryGrid.push_messages, VceMetrics.add_clientapp_runtime

    def count_res(self: Any, message: Any) -> Any:
        node = message.metadata.src_node_id
        with RECORDER.lock:
            if message.has_error():
                RECORDER.errors[node] += 1
            else:
                RECORDER.up[node] += bytes_of(message)
        return store_res(self, message)

    def count_ins(self: Any, message: Any) -> Any:
        with RECORDER.lock:
            RECORDER.down[message.metadata.dst_node_id] += bytes_of(message)
        return store_ins(self, message)

    def count_push(self: Any, messages: Iterable[Any]) -> Any:
        messages = list(messages)
        if messages:
            with RECORDER.lock:
                RECORDER.pushes += 1
        return push(self, messages)

    def runtime(self: Any, seconds: float) -> None:
        with RECORDER.lock:
            RECORDER.runtimes.append((time.perf_counter(), seconds))
        add_runtime(self, seconds)

    InMemoryLinkState.store_message_res = count_res  # type: ignore[method-assign]
    InMemoryLinkState.store_message_ins = count_ins  # type: ignore[method-assign]
    InMemoryGrid.push_messages = count_push  # type: ignore[method-assign]
    VceMetrics.add_clientapp_runtime = runtime  # type: ignore[method-assign]


def server_app(system: str) -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        FINAL["arrays"] = SERVERS[system](grid, context, settings(), RECORDER.mark)

    return app


def _diff(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {n: v - before.get(n, 0) for n, v in after.items() if v - before.get(n, 0)}


def run_child(system: str, out: Path) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    quiet()
    s = settings()
    install_counters()
    if not set_dispatch_interval(s.dispatch_interval):
        raise RuntimeError("this flwr's engine cannot take a dispatch interval")
    started = time.perf_counter()
    run_simulation(
        server_app=server_app(system),
        client_app=client_app(system),
        num_supernodes=s.clients,
        backend_config=RAY_RESOURCES,
    )
    total = time.perf_counter() - started
    if "arrays" not in FINAL:
        raise RuntimeError("the ServerApp did not finish")
    np.save(out, flat(FINAL["arrays"]))
    marks = RECORDER.marks
    rounds = []
    for before, after in itertools.pairwise(marks):
        up = _diff(after["up"], before["up"])
        errors = _diff(after["errors"], before["errors"])
        client_seconds = sum(sec for t, sec in RECORDER.runtimes if before["t"] < t <= after["t"])
        rounds.append(
            {
                "round": after["round"],
                "seconds": after["t"] - before["t"],
                "aggregated": after["aggregated"],
                "up": up,
                "down": _diff(after["down"], before["down"]),
                "failed_nodes": sorted(str(n) for n in errors),
                "trips": after["pushes"] - before["pushes"],
                "client_seconds": client_seconds,
            }
        )
    return {"system": system, "total_seconds": total, "rounds": rounds, "stages": STAGES}


# --------------------------------------------------- in-process: memory and profile


class Meter:
    """tracemalloc peak of the ServerApp only: client segments are cut out."""

    def __init__(self) -> None:
        self.peak = 0
        self.active = False

    def start(self) -> None:
        gc.collect()
        tracemalloc.start()
        self.floor = tracemalloc.get_traced_memory()[0]
        self.peak, self.active = self.floor, True

    def pause(self) -> None:
        if self.active:
            self.peak = max(self.peak, tracemalloc.get_traced_memory()[1])

    def resume(self) -> None:
        if self.active:
            tracemalloc.reset_peak()

    def stop(self) -> int:
        self.pause()
        tracemalloc.stop()
        self.active = False
        return self.peak - self.floor


class LocalGrid:
    """A Grid that runs each ClientApp in this process as its message is pushed.

    Messages travel serialized as on a real link. Replies are kept on disk until pulled, so
    they weigh on the ServerApp only once it pulls them; `one_per_pull` hands out one reply
    per pull (replies that arrive at different times), else every reply that is ready.
    """

    def __init__(
        self, app: Any, clients: int, spool: Path, one_per_pull: bool, meter: Meter | None
    ) -> None:
        from flwr.app import Context, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app, self.spool, self.one_per_pull, self.meter = app, spool, one_per_pull, meter
        self.nodes = {1000 + i: i for i in range(clients)}
        self.contexts = {
            n: Context(1, n, {"partition-id": p}, RecordDict(), {}) for n, p in self.nodes.items()
        }
        self.ready: dict[str, Path] = {}
        self.ids = itertools.count()
        self.client_seconds = 0.0  # spent delivering: running ClientApps, (de)serializing

    # The Grid interface, as far as the three ServerApps use it.
    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    @property
    def run(self) -> Any:
        from flwr.supercore.run import Run

        return Run.create_empty(1)

    def set_run(self, run: Any) -> None:
        pass

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        from flwr.common.serde import message_to_proto

        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            wire = message_to_proto(msg).SerializeToString()  # what the server sends
            if self.meter:
                self.meter.pause()
            started = time.perf_counter()
            self._deliver(mid, msg.metadata.dst_node_id, wire)
            del wire
            if self.meter:
                gc.collect()  # the client's garbage is not the server's (cheap after gc.freeze)
                self.meter.resume()
            self.client_seconds += time.perf_counter() - started
            ids.append(mid)
        return ids

    def _deliver(self, mid: str, node: int, wire: bytes) -> None:
        from flwr.app import Error, Message
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        msg = message_from_proto(ProtoMessage.FromString(wire))
        try:
            reply = self.app(msg, self.contexts[node])
        except Exception as err:  # as Flower does: the failure becomes an error reply
            reply = Message(Error(1, f"{type(err).__name__}: {err}"), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = f"r{mid}"
        path = self.spool / f"{mid}.bin"
        path.write_bytes(message_to_proto(reply).SerializeToString())
        self.ready[mid] = path

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        from flwr.common.serde import message_from_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        out = []
        for mid in message_ids:
            path = self.ready.pop(mid, None)
            if path is None:
                continue
            out.append(message_from_proto(ProtoMessage.FromString(path.read_bytes())))
            path.unlink()
            if self.one_per_pull:
                break
        return out

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        from fedstream.server.grid import send_and_collect

        return send_and_collect(self, messages, timeout)  # type: ignore[arg-type]


def _no_poll_sleep() -> None:
    """Everything is ready at once in-process: fedstream's poller need not wait."""
    from fedstream.server import grid

    grid.FIRST_PULL = grid.MAX_PULL = 0.0


def local_run(
    system: str,
    s: Settings,
    one_per_pull: bool,
    meter: Meter | None,
    on_round: Callable[[int, bool, LocalGrid], None] | None = None,
) -> Any:
    """One federation of `system` in this process, on a LocalGrid."""
    from flwr.app import Context, RecordDict

    os.environ[ENV] = json.dumps(asdict(s))
    settings.cache_clear()
    with tempfile.TemporaryDirectory(prefix="secagg-bench-") as spool:
        grid = LocalGrid(client_app(system), s.clients, Path(spool), one_per_pull, meter)
        context = Context(1, 0, {}, RecordDict(), {})

        def hook(r: int, aggregated: bool) -> None:
            if on_round:
                on_round(r, aggregated, grid)

        if meter:
            meter.start()
        try:
            return SERVERS[system](grid, context, s, hook)
        finally:
            if meter and meter.active:
                meter.last = meter.stop()


def quiet() -> None:
    import flwr.client
    import flwr.server  # noqa: F401  (imported first: importing may set the level)

    logging.getLogger("flwr").setLevel(logging.ERROR)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    quiet()
    _no_poll_sleep()
    for system in SYSTEMS:  # warm up: imports and caches are not the ServerApp's peak
        local_run(system, Settings(3, 1000, 1, 1, 0.0, 1), True, None)
    gc.collect()
    gc.freeze()  # what exists now is never garbage: full collections stay cheap
    rows = []
    for clients in args.mem_clients:
        for params in args.mem_params:
            s = Settings(clients, params, 1, 1, 0.0, args.steps)
            for system, one in (
                ("plain", True),
                ("ours", True),
                ("ours", False),
                ("secaggplus", True),
            ):
                meter = Meter()
                started = time.perf_counter()
                local_run(system, s, one, meter)
                rows.append(
                    {
                        "system": system if one else "ours-burst",
                        "clients": clients,
                        "params": param_count(params),
                        "peak": meter.last,
                        "seconds": time.perf_counter() - started,
                    }
                )
                print(
                    f"  memory {rows[-1]['system']:10} {clients:3} clients "
                    f"{param_count(params):>9,} params: {meter.last / 2**20:8.1f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    return {"rows": rows}


class Timers:
    """Wrap functions (module or class attributes) to sum their time per label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, target: str, label: str) -> None:
        owner_path, _, name = target.rpartition(".")
        if ":" in owner_path:
            mod, _, cls = owner_path.partition(":")
            owner = getattr(importlib.import_module(mod), cls)
        else:
            owner = importlib.import_module(owner_path)
        original = getattr(owner, name)
        seconds, calls = self.seconds, self.calls

        def timed(*a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                seconds[label] += time.perf_counter() - started
                calls[label] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


PROFILE_STEPS = [  # (target, label); a function both sides call is listed once, at the end
    ("fedstream.client.secure._train", "client: train message through the secure mod"),
    (f"{MODULE}.local_train", "  local training (the same in all three systems)"),
    ("fedstream.client.secure.masked_update", "  clip -> quantize -> mask, piece by piece"),
    ("fedstream.protocol.fixedpoint:Encoder.__call__", "    clip, weigh, quantize (Encoder)"),
    ("fedstream.protocol.secagg.sealed", "    shares and commitments (sealed)"),
    ("fedstream.protocol.shamir.split", "      shamir.split"),
    ("fedstream.protocol.keyschedule.seal", "      seal (share encryption)"),
    ("fedstream.protocol.secagg_wire.masked_content", "  wire.masked_content"),
    ("fedstream.client.secure._offer_keys", "client: key offer"),
    ("fedstream.client.secure._unmask", "client: unmask answer"),
    ("fedstream.protocol.secagg_wire.read_masked", "server: wire.read_masked"),
    ("fedstream.protocol.secagg:Aggregation.accept", "server: Aggregation.accept (fold)"),
    ("fedstream.protocol.secagg:Aggregation.result", "server: Aggregation.result (unmask)"),
    ("fedstream.server.secure:SecureAggregator._finish", "server: SecureAggregator._finish"),
    ("fedstream.protocol.fixedpoint:Quantizer.decode", "  Quantizer.decode"),
    ("fedstream.protocol.updates.shifted", "  updates.shifted"),
    ("fedstream.protocol.secagg:Masks.add", "both: Masks.add (masks added, piece by piece)"),
    ("fedstream.protocol.keyschedule:Keystream.into", "both: keystream (AES-128, GCM segments)"),
    ("fedstream.protocol.fixedpoint:Quantizer.add", "both: Quantizer.add (ring add/subtract)"),
    ("flwr.app:ArrayRecord.__init__", "both: ArrayRecord construction"),
]


def run_profile(args: argparse.Namespace) -> dict[str, Any]:
    """All three in this process, serially, on a LocalGrid; timers around ours' steps."""
    import cProfile
    import pstats

    quiet()
    _no_poll_sleep()
    timers = Timers()
    for target, label in PROFILE_STEPS:
        timers.wrap(target, label)
    s = Settings(args.clients, args.params, 2, 1, args.dropout, args.steps)
    out: dict[str, Any] = {"settings": asdict(s), "systems": {}}
    for system in SYSTEMS:
        marks: list[tuple[float, float]] = []  # (time, client time so far)
        profiler = cProfile.Profile()

        def hook(
            r: int,
            _agg: bool,
            grid: LocalGrid,
            system: str = system,
            marks: list = marks,
            prof: Any = profiler,
        ) -> None:
            marks.append((time.perf_counter(), grid.client_seconds))
            if r == s.warmup:  # time only the rounds after the warm-up
                timers.reset()
                if system == "ours":
                    prof.enable()

        local_run(system, s, True, None, hook)
        profiler.disable()
        timed = list(itertools.pairwise(marks[s.warmup :]))
        out["systems"][system] = {
            "round_seconds": [b[0] - a[0] for a, b in timed],
            "client_seconds": [b[1] - a[1] for a, b in timed],
            "timers": {k: [v, timers.calls[k]] for k, v in timers.seconds.items()},
        }
        if system == "ours":
            stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
            top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
            out["top"] = [
                [f"{Path(f).name}:{line}({fn})", tt, nc] for (f, line, fn), (_, nc, tt, _, _) in top
            ]
    return out


# -------------------------------------------------------------------------- parent


def spawn(mode: str, args: argparse.Namespace, s: Settings, data: Path) -> dict[str, Any]:
    cmd = ["--only", mode, "--data", str(data), "--clients", str(s.clients),
           "--params", str(s.params), "--steps", str(s.steps), "--dropout", str(s.dropout),
           "--mem-clients", *map(str, args.mem_clients),
           "--mem-params", *map(str, args.mem_params)]
    return children.run_child(__file__, cmd, {ENV: json.dumps(asdict(s))}, f"secagg-{mode}")


def timed_rounds(run: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    return [r for r in run["rounds"] if r["round"] > s.warmup]


def figures(runs: list[dict[str, Any]], s: Settings) -> dict[str, float]:
    """Medians over repeats of per-run means over the timed rounds."""
    rows = []
    for run in runs:
        rounds = timed_rounds(run, s)
        per_client_up = [
            v for r in rounds for n, v in r["up"].items() if n not in r["failed_nodes"]
        ]
        contributors = [len(r["up"]) - len(set(r["up"]) & set(r["failed_nodes"])) for r in rounds]
        rows.append(
            {
                "round": statistics.mean(r["seconds"] for r in rounds),
                "round_min": min(r["seconds"] for r in rounds),
                "round_max": max(r["seconds"] for r in rounds),
                "client": statistics.mean(r["client_seconds"] for r in rounds),
                "trips": statistics.mean(r["trips"] for r in rounds),
                "up": statistics.mean(per_client_up),
                "up_max": max(per_client_up),
                "down": statistics.mean(v for r in rounds for v in r["down"].values()),
                "failed": statistics.mean(len(r["failed_nodes"]) for r in rounds),
                "contributors": statistics.mean(contributors),
                "aggregated": sum(r["aggregated"] for r in rounds) / len(rounds),
                "process": run["process_seconds"],
                "rel_err": run.get("rel_err", float("nan")),
            }
        )
    return {k: statistics.median(row[k] for row in rows) for k in rows[0]}


def relative_errors(
    data: Path, variant: str, s: Settings, runs: dict[str, list[dict[str, Any]]]
) -> None:
    """How far each final model is from the plaintext one, relative to the plaintext change."""
    if "plain" not in runs:
        return
    init = np.concatenate([v.ravel() for v in initial_state(s).values()])
    for system, items in runs.items():
        for i, run in enumerate(items):
            plain = np.load(data / f"plain-{variant}-{i}.npy")
            mine = np.load(data / f"{system}-{variant}-{i}.npy")
            change = np.linalg.norm(plain - init)
            run["rel_err"] = (
                float(np.linalg.norm(mine - plain) / change) if change else float("nan")
            )


ROWS = (
    ("round time, mean of timed rounds [s]", "round", "{:.3f}"),
    ("  fastest / slowest round [s]", None, None),
    ("trips (message waves) per round", "trips", "{:.1f}"),
    ("time inside ClientApps per round [s]", "client", "{:.2f}"),
    ("failed clients per round", "failed", "{:.1f}"),
    ("rounds aggregated", "aggregated", "{:.0%}"),
    ("upload per contributing client [MB]", "up", "{:.3f}"),
    ("download per client [MB]", "down", "{:.3f}"),
    ("final model vs plaintext, rel. error", "rel_err", "{:.1e}"),
    ("whole subprocess incl. Ray [s]", "process", "{:.1f}"),
)


def print_runs(
    results: dict[str, dict[str, dict[str, float]]], variants: list[str], systems: Sequence[str]
) -> None:
    head = "".join(f"{v:^{11 * len(systems)}}" for v in variants)
    print(f"\n{'':40}{head}")
    print(f"{'':40}" + "".join(f"{LABELS[x]:>11}" for _ in variants for x in systems))
    for label, key, fmt in ROWS:
        cells = []
        for v in variants:
            for x in systems:
                f = results[v][x]
                if key is None:
                    cells.append(f"{f['round_min']:.2f}/{f['round_max']:.2f}")
                elif key in ("up", "down"):
                    cells.append(fmt.format(f[key] / 1e6))
                else:
                    cells.append(fmt.format(f[key]))
        print(f"{label:40}" + "".join(f"{c:>11}" for c in cells))


PAIRS = (("ours", "plain"), ("secaggplus", "ours"), ("secaggplus", "plain"))  # num, den


def paired_ratios(
    runs: dict[str, list[dict[str, Any]]], s: Settings, num: str, den: str
) -> list[float]:
    """num / den round time for each repeat: the two runs of a repeat are back to back.

    The machine's speed drifts over minutes (other tenants share its caches and memory
    bus, unseen as steal time), by more than the margins the targets leave. Runs next to
    each other see the same conditions, so each repeat gives one ratio, and the median
    of those is what the targets are checked against.
    """
    means = {x: [statistics.mean(r["seconds"] for r in timed_rounds(run, s)) for run in runs[x]]
             for x in (num, den)}
    return [a / b for a, b in zip(means[num], means[den], strict=True)]


def print_targets(
    results: dict[str, dict[str, dict[str, float]]],
    ratios: dict[str, dict[str, list[float]]],
    variants: list[str],
    model_bytes: int,
) -> None:
    print("\ntargets (round times: median of the per-repeat ratios, each repeat's runs back to "
          "back; sizes: ratios of the medians above)")
    for v in variants:
        r = results[v]
        print(f"  [{v}]")
        if "plain" in r:
            t_ours = statistics.median(ratios[v]["ours/plain"])
            target("ours / plaintext round time", t_ours, "<= 1.3x", t_ours <= 1.3,
                   ratios[v]["ours/plain"])
        if "secaggplus" in r:
            t_flwr = statistics.median(ratios[v]["secaggplus/ours"])
            target("SecAgg+ / ours round time", t_flwr, ">= 3x", t_flwr >= 3,
                   ratios[v]["secaggplus/ours"])
        if "secaggplus" in r and "plain" in r:
            # No secure sum is faster than plaintext: this bounds SecAgg+ / ours from above.
            ceiling = ratios[v]["secaggplus/plain"]
            target("SecAgg+ / plaintext (ceiling of the above)", statistics.median(ceiling),
                   each=ceiling)
        up_raw = r["ours"]["up"] / model_bytes
        target("ours upload / float32 update (4 B/param)", up_raw, "<= 1.2x", up_raw <= 1.2)
        if "plain" in r:
            target("ours upload / plaintext reply", r["ours"]["up"] / r["plain"]["up"])
        if "secaggplus" in r:
            target("SecAgg+ upload / float32 update", r["secaggplus"]["up"] / model_bytes)


def stage_line(stages: list[dict[str, float]]) -> str:
    """Median seconds per stage of ours' secure rounds (server/secure.py: SecureOutcome)."""
    names = [k for k in ("keys", "train", "unmask", "recover", "finish") if k in stages[0]]
    return "stages (median s): " + "  ".join(
        f"{k} {statistics.median(st.get(k, 0.0) for st in stages):.3f}" for k in names
    )


def target(
    label: str, value: float, goal: str = "", ok: bool | None = None, each: Sequence[float] = ()
) -> None:
    check = f"  ({goal}: {'met' if ok else 'NOT met'})" if goal else ""
    runs = f"  repeats: {' '.join(f'{x:.2f}' for x in each)}" if len(each) > 1 else ""
    print(f"    {label:42} {value:6.3f}x{check}{runs}")


def print_memory(mem: dict[str, Any]) -> None:
    rows = mem["rows"]
    cols = ("plain", "ours", "ours-burst", "secaggplus")
    names = {
        "plain": "plaintext",
        "ours": "ours",
        "ours-burst": "ours, burst",
        "secaggplus": "SecAgg+",
    }
    print("\nServerApp peak memory (tracemalloc, in-process, 2 rounds), MiB and in model copies")
    print("(model copy = 4 B x params; 'burst': a trip's replies all ready at the first pull)")
    print(f"{'clients':>8} {'params':>10}" + "".join(f"{names[c]:>20}" for c in cols))
    keys = sorted({(r["clients"], r["params"]) for r in rows}, key=lambda k: (k[1], k[0]))
    table = {(r["system"], r["clients"], r["params"]): r["peak"] for r in rows}
    for n, p in keys:
        cells = []
        for c in cols:
            peak = table[(c, n, p)]
            cells.append(f"{peak / 2**20:8.1f} ({peak / (4 * p):5.1f}x)")
        print(f"{n:>8} {p:>10,}" + "".join(f"{c:>20}" for c in cells))
    ns = sorted({n for n, _ in keys})
    ps = sorted({p for _, p in keys})
    if len(ns) > 1 and len(ps) > 1:
        lo_n, hi_n, lo_p, hi_p = ns[0], ns[-1], ps[0], ps[-1]
        print(f"\n  growth of the peak{'':21}" + "".join(f"{names[c]:>20}" for c in cols))
        line = f"  {hi_n}/{lo_n} clients at {hi_p:,} params"
        print(
            f"{line:41}"
            + "".join(f"{table[(c, hi_n, hi_p)] / table[(c, lo_n, hi_p)]:19.2f}x" for c in cols)
        )
        line = f"  {hi_p:,}/{lo_p:,} params at {lo_n} clients"
        print(
            f"{line:41}"
            + "".join(f"{table[(c, lo_n, hi_p)] / table[(c, lo_n, lo_p)]:19.2f}x" for c in cols)
        )
        print(f"  (clients grow {hi_n / lo_n:.1f}x, the model {hi_p / lo_p:.1f}x)")


def print_profile(prof: dict[str, Any]) -> None:
    s = prof["settings"]
    print(
        f"\nin-process, serial: {s['clients']} clients, {s['rounds']} rounds after a warm-up, "
        f"dropout {s['dropout']:.0%}, no Ray (a LocalGrid runs every ClientApp in turn)"
    )
    print(f"  {'mean per round [s]':24} {'round':>8} {'ClientApps':>11} {'ServerApp':>10}")
    for system, data in prof["systems"].items():
        rnd = statistics.mean(data["round_seconds"])
        cli = statistics.mean(data["client_seconds"])
        print(f"  {LABELS[system]:24} {rnd:8.3f} {cli:11.3f} {rnd - cli:10.3f}")
    timers = prof["systems"]["ours"]["timers"]
    print(f"\nwhere ours spends its time (in-process, summed over {s['rounds']} rounds)")
    print(f"  {'step':52} {'total [s]':>10} {'calls':>6} {'per call [ms]':>14}")
    for _, label in PROFILE_STEPS:
        if label in timers:
            sec, calls = timers[label]
            print(f"  {label:52} {sec:10.3f} {calls:6d} {1e3 * sec / calls:14.1f}")
    print("  ('both': called by the clients' masking and the server's unmasking alike)")
    print("\n  top functions of ours by own time (cProfile, ClientApps and ServerApp)")
    for name, tt, calls in prof["top"]:
        print(f"    {tt:8.3f} s {calls:7d}  {name}")


def parent_main(args: argparse.Namespace) -> None:
    base = Settings(
        args.clients, args.params, args.rounds, args.warmup, 0.0, args.steps,
        dispatch_interval=args.dispatch_interval,
    )
    p = param_count(args.params)
    model_bytes = 4 * p
    systems = [x for x in SYSTEMS if x in args.systems]
    variants = {"no dropout": 0.0}
    if args.dropout > 0:
        variants[f"{args.dropout:.0%} dropout"] = args.dropout
    print(
        f"{args.clients} clients, {p:,} parameters ({model_bytes / 1e6:.2f} MB float32), "
        f"{args.warmup} warm-up + {args.rounds} timed rounds, {args.steps} SGD steps x {BATCH} "
        f"samples per client round, repeat {args.repeat}; Ray: 1 CPU per actor, "
        f"{os.cpu_count()} cores; the engine dispatches every {args.dispatch_interval:g} s "
        f"(Flower's: {FLOWER_INTERVAL:g} s)",
        flush=True,
    )
    results: dict[str, dict[str, dict[str, float]]] = {}
    ratios: dict[str, dict[str, list[float]]] = {}
    mem = prof = None
    with tempfile.TemporaryDirectory(prefix="fedstream-secagg-bench-") as tmp:
        data = Path(tmp)
        for v, dropout in variants.items():
            s = Settings(**{**asdict(base), "dropout": dropout})
            tag = f"d{round(100 * dropout)}"
            runs: dict[str, list[dict[str, Any]]] = {x: [] for x in systems}
            for i in range(args.repeat):
                order = systems if i % 2 == 0 else systems[::-1]  # alternate against drift
                for system in order:
                    load = os.getloadavg()[0]
                    res = spawn(system, args, s, data / f"{system}-{tag}-{i}.npy")
                    runs[system].append(res)
                    print(
                        f"  [{v}] run {i + 1} {LABELS[system]:9}: timed rounds "
                        + " ".join(f"{r['seconds']:.2f}" for r in timed_rounds(res, s))
                        + f" s (process {res['process_seconds']:.0f} s, 1-min load before "
                        f"{load:.2f}, after {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                    if res.get("stages"):
                        print(f"{'':18}{stage_line(res['stages'][s.warmup:])}", flush=True)
            relative_errors(data, tag, s, runs)
            results[v] = {x: figures(runs[x], s) for x in systems}
            ratios[v] = {
                f"{num}/{den}": paired_ratios(runs, s, num, den)
                for num, den in PAIRS
                if num in runs and den in runs
            }
        if not args.skip_memory:
            print("  memory runs (in-process) ...", flush=True)
            mem = spawn("memory", args, base, data / "unused.npy")
        if not args.skip_profile:
            print("  profile run (in-process) ...", flush=True)
            prof = spawn(
                "profile",
                args,
                Settings(**{**asdict(base), "dropout": args.dropout}),
                data / "unused.npy",
            )
    print_runs(results, list(variants), systems)
    print_targets(results, ratios, list(variants), model_bytes)
    if mem:
        print_memory(mem)
    if prof:
        print_profile(prof)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=10, help="clients (default 10)")
    p.add_argument("--params", type=int, default=1_000_000, help="model size (default 1M)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument(
        "--dropout",
        type=float,
        default=0.3,
        help="fraction of clients that fail each round in the dropout variant "
        "(default 0.3; 0 runs only the no-dropout variant)",
    )
    p.add_argument("--steps", type=int, default=4, help="SGD steps per client round (default 4)")
    p.add_argument("--repeat", type=int, default=1, help="runs per system; medians are shown")
    p.add_argument(
        "--dispatch-interval",
        type=float,
        default=SimulationConfig().dispatch_interval,
        help="seconds between the simulation engine's hand-outs of messages to the actors, "
        "for all three systems (default: fedstream sim's, %(default)s; Flower's is 0.1: "
        "every trip then starts on a 0.1 s tick)",
    )
    p.add_argument(
        "--mem-clients",
        type=int,
        nargs="+",
        default=[5, 20],
        help="client counts of the memory runs (default 5 20)",
    )
    p.add_argument(
        "--mem-params",
        type=int,
        nargs="+",
        default=[250_000, 1_000_000],
        help="model sizes of the memory runs (default 250000 1000000)",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        help="which systems the simulation runs cover (default all three; 'ours' always "
        "runs: the targets are ratios against it). The memory and profile runs always "
        "cover all three: add --skip-memory to leave SecAgg+ out altogether",
    )
    p.add_argument("--skip-memory", action="store_true", help="no memory runs")
    p.add_argument("--skip-profile", action="store_true", help="no in-process profile")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 250k parameters, 2 timed rounds, memory at 3/6 clients "
        "and 62.5k/250k parameters",
    )
    p.add_argument("--only", choices=(*SYSTEMS, "memory", "profile"), help="child mode")
    p.add_argument("--data", type=Path, help="child mode: where to write the final model")
    args = p.parse_args(argv)
    if not 0 < args.dispatch_interval <= FLOWER_INTERVAL:
        p.error(f"--dispatch-interval must be in (0, {FLOWER_INTERVAL}]: {args.dispatch_interval}")
    args.systems = sorted({*args.systems, "ours"}, key=SYSTEMS.index)
    if args.quick:
        args.params, args.rounds = min(args.params, 250_000), min(args.rounds, 2)
        args.mem_clients, args.mem_params = [3, 6], [62_500, 250_000]
    return args


def child_main(args: argparse.Namespace) -> None:
    me = importlib.import_module(MODULE)  # the importable copy, so Ray pickles by reference
    if args.only == "memory":
        result = me.run_memory(args)
    elif args.only == "profile":
        result = me.run_profile(args)
    else:
        result = me.run_child(args.only, args.data)
    print(json.dumps(result), flush=True)


def main() -> None:
    args = parse_args()
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    if args.only:
        child_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()

"""Where a simulated client update spends its time: fedstream's ClientApp against stock Flower's.

    python bench/client_overhead.py [--clients 20] [--rounds 30]

sim_throughput.py tells how fast the two federations go; this tells why. It drives both
ClientApps in this one process (no Ray, one torch thread) over the same materialised
samples, and does per message what Flower's Ray backend does: cloudpickle the ClientApp
loader, the message and the Context to the actor, run the app, and pickle the reply and the
Context back. fedstream's pieces are timed by wrapping its functions here, in this process
only. Global weights stay the initial ones (no aggregation): only the cost is of interest.

Figures are medians per message, plus the sum over all messages; nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sim_throughput

Samples = defaultdict[str, list[float]]


def timed(owner: Any, name: str, label: str, samples: Samples) -> None:
    """Wrap `owner.name` so every call adds its duration to `samples[label]`."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            samples[label].append(time.perf_counter() - started)

    setattr(owner, name, wrapper)


FEDSTREAM_STEPS = [  # (module or class path, attribute, label), in train_round's order
    ("fedstream.sim.client_app", "federation", "federation(cfg) lookup (to_json key)"),
    ("fedstream.sim.federation:Federation", "stream", "Federation.stream (new stream object)"),
    ("fedstream.client.stream:ClientStream", "pending", "stream.pending (arrival counts)"),
    ("fedstream.client.app", "load_learner", "load_learner"),
    ("fedstream.client.learner:Learner", "__init__", "  Learner() (model, optimizer, detector)"),
    ("fedstream.client.learner:Learner", "load_state_bytes", "  torch.load of learner state"),
    ("fedstream.client.stream:ClientStream", "take", "stream.take (draw the samples)"),
    ("fedstream.client.learner:Learner", "learn", "learner.learn"),
    ("fedstream.client.learner:Learner", "_step", "  backward + step (summed over batches)"),
    ("fedstream.client.learner:Learner", "_record", "  scoring + detector (summed over batches)"),
    ("fedstream.client.app", "save_learner", "save_learner (torch.save of state)"),
]
STOCK_STEPS = [
    ("stock_app", "new_model", "build model"),
    ("stock_app", "round_slice", "slice of the partition"),
    ("stock_app", "train_fn", "train loop"),
]
COMMON_STEPS = [  # Flower's record conversions, which both apps do once each way
    ("flwr.app:ArrayRecord", "to_torch_state_dict", "ArrayRecord -> state dict"),
    ("flwr.app:ArrayRecord", "__init__", "state dict -> ArrayRecord"),
]
FEDSTREAM_ROWS = [label for _, _, label in FEDSTREAM_STEPS + COMMON_STEPS]
STOCK_ROWS = [label for _, _, label in STOCK_STEPS + COMMON_STEPS]
STOCK_CONFIG = {"lr": "lr", "momentum": "momentum", "batch-size": "batch_size"}


def instrument(steps: list[tuple[str, str, str]], samples: Samples) -> Callable[[], None]:
    """Time each listed function or method (`module` or `module:Class`) into `samples`.

    Returns the function that puts the originals back.
    """
    restore = []
    for where, name, label in steps:
        module, _, cls = where.partition(":")
        owner = importlib.import_module(module)
        owner = getattr(owner, cls) if cls else owner
        restore.append((owner, name, owner.__dict__[name]))
        timed(owner, name, label, samples)

    def undo() -> None:
        for owner, name, original in restore:
            setattr(owner, name, original)

    return undo


def train_message(arrays: ArrayRecord, config: dict[str, Any], node: int, rnd: int) -> Message:
    """A train message as FedAvg.configure_train builds it."""
    content = RecordDict(
        {"arrays": arrays, "config": ConfigRecord({**config, "server-round": rnd})}
    )
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = f"{node}-{rnd}"  # as Flower's runtime assigns it
    return msg


def drive(
    app: ClientApp, config: dict[str, Any], arrays: ArrayRecord, clients: int, rounds: int
) -> Samples:
    """Every client every round, each message pickled to and from a would-be Ray actor."""
    samples: Samples = defaultdict(list)
    contexts = [
        Context(
            run_id=1,
            node_id=c + 1,
            node_config={"partition-id": c, "num-partitions": clients},
            state=RecordDict(),
            run_config={},
        )
        for c in range(clients)
    ]

    def load_app() -> ClientApp:  # what run_simulation hands Ray for every message
        return app

    for rnd in range(1, rounds + 1):
        for c in range(clients):
            msg = train_message(arrays, config, c + 1, rnd)
            started = time.perf_counter()
            blob = cloudpickle.dumps((load_app, msg, str(c), contexts[c]))
            pickled = time.perf_counter()
            loader, msg, _, ctx = cloudpickle.loads(blob)
            loaded = time.perf_counter()
            reply = loader()(message=msg, context=ctx)
            called = time.perf_counter()
            back = cloudpickle.dumps((str(c), reply, ctx))
            _, reply, contexts[c] = cloudpickle.loads(back)
            done = time.perf_counter()
            samples["pickle to actor"].append(pickled - started)
            samples["unpickle in actor"].append(loaded - pickled)
            samples["ClientApp call"].append(called - loaded)
            samples["pickle reply + Context back"].append(done - called)
            samples["whole message"].append(done - started)
            samples["kB to actor"].append(len(blob) / 1e3)
            samples["kB back"].append(len(back) / 1e3)
    samples["kB ClientApp loader"].append(len(cloudpickle.dumps(load_app)) / 1e3)
    return samples


def report(name: str, samples: Samples, order: list[str], messages: int) -> None:
    print(f"\n{name}")
    print(f"  {'':44} {'median ms':>10} {'per msg ms':>10} {'total s':>8}")
    for label in order:
        values = samples.get(label)
        if not values:
            continue
        if label.startswith("kB"):
            print(f"  {label:44} {statistics.median(values):10.1f} {'(kB)':>10}")
            continue
        total = sum(values)
        med = 1e3 * statistics.median(values)
        print(f"  {label:44} {med:10.2f} {1e3 * total / messages:10.2f} {total:8.2f}")


MESSAGE_ROWS = [
    "pickle to actor",
    "unpickle in actor",
    "ClientApp call",
    "pickle reply + Context back",
    "whole message",
    "kB ClientApp loader",
    "kB to actor",
    "kB back",
]


def run_one(
    steps: list[tuple[str, str, str]],
    app: ClientApp,
    config: dict[str, Any],
    arrays: ArrayRecord,
    args: Any,
) -> Samples:
    """Drive one app with `steps` (and Flower's record conversions) timed, then undo that."""
    inner: Samples = defaultdict(list)
    undo = instrument(steps + COMMON_STEPS, inner)
    try:
        outer = drive(app, config, arrays, args.clients, args.rounds)
    finally:
        undo()
    outer.update(inner)
    return outer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    # The first optimizer of a process imports torch._dynamo (seconds): not a per-message cost.
    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    with tempfile.TemporaryDirectory(prefix="fedstream-overhead-") as tmp:
        data = Path(tmp)
        cfg = sim_throughput.bench_config(args.clients, args.rounds, data / "out")
        sim_throughput.materialise(cfg, data)
        import stock_app

        os.environ[stock_app.DATA_ENV] = str(data)

        from fedstream.sim.client_app import sim_client_app
        from fedstream.sim.federation import federation

        arrays = federation(cfg).initial_arrays()
        meta = stock_app.meta()
        stock_config = {k: meta[v] for k, v in STOCK_CONFIG.items()}
        n = args.clients * args.rounds
        stock = run_one(STOCK_STEPS, stock_app.app, stock_config, arrays, args)
        fed = run_one(FEDSTREAM_STEPS, sim_client_app(cfg), {}, arrays, args)
    report("stock Flower ClientApp", stock, MESSAGE_ROWS + STOCK_ROWS, n)
    report("fedstream ClientApp", fed, MESSAGE_ROWS + FEDSTREAM_ROWS, n)
    diff = 1e3 * (sum(fed["whole message"]) - sum(stock["whole message"])) / n
    print(f"\nfedstream costs {diff:+.2f} ms per client update more than stock Flower here")


if __name__ == "__main__":
    main()

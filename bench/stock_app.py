"""Stock Flower baseline for bench/sim_throughput.py: a plain FedAvg app, quickstart-style.

Nothing of fedstream's client or server machinery is used here, only its model definition
(so both sides train the very same network). The clients read pre-materialised per-round
batches from `<data dir>/client_<partition-id>.npz`, the way a typical Flower app loads its
partition, so the benchmark compares frameworks on the same samples, not data loaders.

The module must be importable by Ray workers (the parent puts bench/ on PYTHONPATH): the
app and its helpers are then pickled by reference, as with an app loaded by `flwr run`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from functools import cache, lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torch.nn import functional as F

from fedstream.protocol.models import build_model

DATA_ENV = "FEDSTREAM_BENCH_DATA"  # where the parent wrote meta.json and client_<i>.npz
TIMINGS: dict[str, Any] = {}  # filled by the ServerApp thread, read by the driver


# ----------------------------------------------------------------------------- data


def data_dir() -> Path:
    return Path(os.environ[DATA_ENV])


@lru_cache(maxsize=1)
def meta() -> dict[str, Any]:
    """Model and training settings of the run, written by the parent next to the data."""
    return json.loads((data_dir() / "meta.json").read_text())


@cache
def load_partition(partition_id: int) -> dict[str, np.ndarray]:
    """One client's whole stream, cached per worker like Flower's FederatedDataset."""
    with np.load(data_dir() / f"client_{partition_id}.npz") as npz:
        return {k: npz[k] for k in npz.files}


def round_slice(partition_id: int, server_round: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples this client trains on in `server_round` (bounds[r-1]:bounds[r])."""
    part = load_partition(partition_id)
    lo, hi = int(part["bounds"][server_round - 1]), int(part["bounds"][server_round])
    return torch.from_numpy(part["x"][lo:hi]), torch.from_numpy(part["y"][lo:hi])


def new_model() -> nn.Module:
    m = meta()
    return build_model(
        m["model"], m["feature_shape"], m["n_classes"], hidden=m["hidden"], seed=m["seed"]
    )


# --------------------------------------------------------------------------- client


def train_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, momentum: float, bs: int
) -> float:
    """One pass in arrival order, plain SGD with momentum: the quickstart's train loop."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    running = 0.0
    for start in range(0, len(y), bs):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[start : start + bs]), y[start : start + bs])
        loss.backward()
        optimizer.step()
        running += float(loss.item())
    return running / max(1, -(-len(y) // bs))


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, train on this round's samples, reply with model and count."""
    started = time.perf_counter()
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    model = new_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    partition_id = int(context.node_config["partition-id"])
    x, y = round_slice(partition_id, int(config["server-round"]))
    loss = train_fn(
        model, x, y, float(config["lr"]), float(config["momentum"]), int(config["batch-size"])
    )
    metrics = {
        "train_loss": loss,
        "num-examples": len(y),
        "train-seconds": time.perf_counter() - started,
    }
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


# --------------------------------------------------------------------------- server


class CountingFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, plus tallies of what the replies report (for the table)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tally = {"client_updates": 0, "samples_seen": 0, "train_seconds": 0.0}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                rec = reply.content["metrics"]
                self.tally["client_updates"] += 1
                self.tally["samples_seen"] += int(rec["num-examples"])
                self.tally["train_seconds"] += float(rec["train-seconds"])
        return super().aggregate_train(server_round, replies)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every node each round; times the round loop, as fedstream does."""
    m = meta()
    arrays = ArrayRecord(new_model().state_dict())
    strategy = CountingFedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    marks: list[float] = []

    def stamp(_round: int, _arrays: ArrayRecord) -> None:
        # Called before round 1 and after every round: per-round wall times for free.
        marks.append(time.perf_counter())

    train_config = ConfigRecord(
        {"lr": m["lr"], "momentum": m["momentum"], "batch-size": m["batch_size"]}
    )
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=m["rounds"],
        train_config=train_config,
        evaluate_fn=stamp,
    )
    TIMINGS["wall_seconds"] = time.perf_counter() - started
    TIMINGS["round_seconds"] = [b - a for a, b in pairwise(marks)]
    TIMINGS["rounds_done"] = len(result.train_metrics_clientapp)
    TIMINGS.update(strategy.tally)

"""Client mods of the simulation.

Flaky availability: a mod that makes a virtual client miss some rounds.

A client that drops out raises, exactly as a crashed or unreachable device would look to
the server: its reply is an error, its samples stay in its stream for a later round.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedstream.protocol import messages as m
from fedstream.protocol.config import Config


class ClientUnavailable(RuntimeError):
    """The virtual client is offline this round."""


def availability_mod(cfg: Config) -> Mod:
    """Drop a train message with probability `simulation.dropout`, fixed per node and round."""

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        dropout, seed = cfg.simulation.dropout, cfg.seed
        if dropout > 0 and msg.metadata.message_type == MessageType.TRAIN:
            server_round = int(msg.content[m.CONFIG][m.ROUND])
            partition = int(ctx.node_config.get("partition-id", 0))
            u = np.random.default_rng([seed, 0xD0, partition, server_round]).random()
            if u < dropout:
                raise ClientUnavailable(f"client {partition} is offline in round {server_round}")
        return call_next(msg, ctx)

    return mod


def threads_mod(cfg: Config) -> Mod:
    """Give torch in a Ray worker only the CPUs the worker reserved.

    torch defaults to one thread per core; with several workers per machine that
    oversubscribes the cores and makes every client slower.
    """

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        threads = max(1, int(cfg.simulation.client_cpus))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return call_next(msg, ctx)

    return mod

"""The ClientApp on a device: its stream is the device's spool.

Every message runs in a fresh ClientApp process (forked from a warm, preloaded process by
`fedstream.client.warm_exec`, or started anew by Flower's own SuperExec with `--cold`), so
nothing lives in memory between rounds: the learner's state sits in the spool file beside
the samples, and one SQLite transaction moves the read offset and stores the new learner
state. A process killed before that commit leaves the offset where it was, so the next
round trains the same samples again; after it, they are never trained again (the spool's
ledger shows it).

The SuperNode tells the app where its spool is and which client it is through its node
config: `--node-config "spool='/path/spool.db' client-id=3"`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from flwr.proto.recorddict_pb2 import ConfigRecord as ProtoConfigRecord

from fedstream.client.privacy import make_privacy_mod
from fedstream.client.secure import STATE_KEY, secure_aggregation_mod
from fedstream.client.spool import FeatureCountMismatch, Spool
from fedstream.protocol import messages as m
from fedstream.protocol import runtime
from fedstream.protocol.config import Config, from_run_config

SPOOL = "spool"  # node config: path of this device's spool file
CLIENT_ID = "client-id"  # node config: this device's stable client id
MAX_ROUND_SAMPLES = 100_000  # a round never loads more than this (stream.budget lowers it)
LEARNER, REPORTED_DROPS = "learner", "dropped-reported"
SECRETS = "secure-aggregation"  # the spool's copy of the secure-aggregation secrets


def device_client_app(config: Config | None = None) -> ClientApp:
    # The update pipeline, as in every fedstream ClientApp (client/app.py): privacy clips
    # and noises the change with the OS's entropy, secure aggregation quantizes and masks it.
    app = ClientApp(mods=[said_on_failure, secrets_in_spool(config), secure_aggregation_mod,
                          make_privacy_mod()])

    @app.train()
    def _train(msg: Message, ctx: Context) -> Message:
        cfg = config or from_run_config(dict(ctx.run_config))
        return train_from_spool(msg, ctx, cfg)

    @app.query()
    def _query(msg: Message, ctx: Context) -> Message:
        return Message(m.roster_reply(client_of(ctx)), reply_to=msg)

    return app


def said_on_failure(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """A round this device fails is said in its log too, where `fedstream client` reads it
    and tells the operator (a device whose config differs from the server's run would
    otherwise look healthy on its own terminal while every round failed on it)."""
    try:
        return call_next(msg, ctx)
    except Exception as err:
        print(f"{runtime.ROUND_FAILED} {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        raise


def secrets_in_spool(config: Config | None) -> Mod:
    """A mod that keeps the device's secure-aggregation secrets in its spool.

    They live in `Context.state` (`client.secure`), which a SuperNode holds in memory only:
    a restarted device would come back without the mask key it offered, miss the round the
    server assigned it in, and forget which rounds it had already answered. Kept here, the
    secrets come back with the device: it masks the next round, and answers a round once
    even across restarts. They are written before the reply that depends on them leaves.
    Two secure messages handled at once on one device would write last-wins, as Flower's
    own Context does; the server sends a device one trip's message at a time.
    """

    def mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        if SPOOL not in ctx.node_config or not _secure(msg):
            return call_next(msg, ctx)
        cfg = config or from_run_config(dict(ctx.run_config))
        with open_spool(ctx, cfg) as spool:
            kept = spool.state(SECRETS)
        if kept is not None:
            ctx.state[STATE_KEY] = config_record_from_proto(ProtoConfigRecord.FromString(kept))
        reply = call_next(msg, ctx)
        if STATE_KEY in ctx.state:
            blob = config_record_to_proto(ctx.state[STATE_KEY]).SerializeToString()
            if blob != kept:
                with open_spool(ctx, cfg) as spool:
                    spool.put_state(SECRETS, blob)
        return reply

    return mod


def _secure(msg: Message) -> bool:
    """A message the secure-aggregation mod answers or masks: the only ones that read or
    change its secrets."""
    if m.record(msg.content, m.SECAGG, ConfigRecord) is not None:
        return True
    query = m.record(msg.content, m.CONFIG, ConfigRecord)
    return query is not None and query.get(m.QUERY_KIND) in (m.KEYS, m.UNMASK)


def train_from_spool(msg: Message, ctx: Context, cfg: Config) -> Message:
    """One round on a device: read what the spool holds, test-then-train, commit, reply."""
    # torch: imported here, so a cold process pays for it in train messages only (a warm
    # SuperExec has it preloaded)
    from fedstream.client.app import learn, new_learner

    started = time.perf_counter()
    spool = open_spool(ctx, cfg)
    try:
        learner = new_learner(
            cfg, (cfg.stream.n_features,), cfg.stream.n_classes, spool.state(LEARNER)
        )
        batch = spool.pending(limit=min(cfg.stream.budget or MAX_ROUND_SAMPLES, MAX_ROUND_SAMPLES))
        x, y, unusable = usable(batch.x, batch.y, cfg.stream.n_classes)
        if unusable:
            print(f"{runtime.ROUND_NOTE} {unusable} samples skipped (counted as dropped): "
                  f"their labels are beyond the run's stream.n_classes = "
                  f"{cfg.stream.n_classes}; start the device with the server's config "
                  "(fedstream client --config) and feed it the server's --classes",
                  file=sys.stderr, flush=True)
        content = learn(msg, learner, x, y, client_of(ctx), started)
        dropped = spool.stats()["dropped"]
        reported = int.from_bytes(spool.state(REPORTED_DROPS) or b"", "big")
        content[m.METRICS]["dropped"] = dropped - reported + unusable
        state = {LEARNER: learner.state_bytes(), REPORTED_DROPS: dropped.to_bytes(8, "big")}
        round_tag = f"round {int(msg.content[m.CONFIG][m.ROUND])}"
        spool.commit(batch.stop, state, tag=round_tag)  # the last step before the reply
    finally:
        spool.close()
    return Message(content, reply_to=msg)


def usable(x: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows a model with `n_classes` outputs can learn, and how many were left out.

    The ingestion service refuses other labels, but a spool filled before a config
    change (fewer classes), or by a service started without a class count, may hold
    some; trained, one such row would fail every round, since the offset never moves
    past it. They are skipped and counted as dropped instead.
    """
    keep = (y >= 0) & (y < n_classes)
    if keep.all():
        return x, y, 0
    return x[keep], y[keep], int(np.count_nonzero(~keep))


def open_spool(ctx: Context, cfg: Config) -> Spool:
    path = ctx.node_config.get(SPOOL)
    if not path:
        raise ValueError(f"this SuperNode has no '{SPOOL}' in its node config")
    try:
        return Spool(str(path), cfg.stream.n_features)
    except FeatureCountMismatch as err:  # the run's config is the server's, not the device's
        raise FeatureCountMismatch(
            f"this device's spool ({path}) holds samples of {err.stored} features, and the "
            f"server's run has stream.n_features = {err.requested}: start the device with "
            "the server's config (fedstream client --config), or the server with this one's",
            err.stored, err.requested,
        ) from None


def client_of(ctx: Context) -> int:
    if CLIENT_ID not in ctx.node_config:
        raise ValueError(f"this SuperNode has no '{CLIENT_ID}' in its node config")
    return int(ctx.node_config[CLIENT_ID])


app = device_client_app()

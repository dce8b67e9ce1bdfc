"""The client side of secure aggregation, as a Flower mod: clip -> quantize -> mask.

The mod sits between the runtime and fedstream's train handler. The handler trains and
replies as always; the mod turns that reply into a masked vector (model change, example
count and metrics together) before it leaves the device, and answers the server's key and
unmask queries itself. A message without a secure-aggregation record passes through
untouched, so one ClientApp serves both plaintext and secure federations.

Secrets live in `Context.state` (the device), never in a reply: the long-lived encryption
key, the last few mask keys it offered (a new one with every masked reply), and the rounds
this client already unmasked (it answers once per round, so no server can ask twice with
different survivor sets).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import secagg, updates
from fedstream.protocol import secagg_wire as wire
from fedstream.protocol.fixedpoint import Encoder

STATE_KEY = "fedstream-secagg"
PENDING_KEYS = 4  # mask keys kept; the server only ever assigns one of the latest
ANSWERED_KEPT = 16


class SecureAggregationError(RuntimeError):
    """The client cannot take part in this secure round (the server will see it as dropped)."""


def secure_aggregation_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    content = msg.content
    kind = msg.metadata.message_type
    if kind == MessageType.TRAIN and m.record(content, m.SECAGG, ConfigRecord) is not None:
        return _train(msg, ctx, call_next)
    if kind == MessageType.QUERY and m.record(content, m.CONFIG, ConfigRecord) is not None:
        query = content[m.CONFIG].get(m.QUERY_KIND)
        if query == m.KEYS:
            return Message(RecordDict({m.SECAGG: _offer_keys(ctx)}), reply_to=msg)
        if query == m.UNMASK:
            return Message(RecordDict({m.SECAGG: _unmask(content[m.CONFIG], ctx)}), reply_to=msg)
    return call_next(msg, ctx)


def _train(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    try:
        setup = wire.read_setup(msg.content[m.SECAGG])
    except secagg.Rejected as err:
        raise SecureAggregationError(f"bad round setup: {err}") from err
    state = _state(ctx)
    mask_sk = _mask_key(state, setup.mask_pub)  # before training: a failure trains nothing
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply
    report = m.TrainReport.from_record(reply.content[m.METRICS])
    masked = masked_update(
        msg.content[m.ARRAYS], reply.content[m.ARRAYS], report, setup, state["enc-sk"], mask_sk
    )
    del reply  # the trained model's memory, freed, is reused for the masked reply's bytes
    next_pub = _new_mask_key(state)
    _save(ctx, state)
    return Message(wire.masked_content(masked, report.client, next_pub), reply_to=msg)


def masked_update(
    global_arrays: ArrayRecord,
    local_arrays: ArrayRecord,
    report: m.TrainReport,
    setup: secagg.RoundSetup,
    enc_sk: bytes,
    mask_sk: bytes,
) -> secagg.MaskedInput:
    """The update pipeline, clip -> quantize -> mask, run one piece at a time.

    The model change is weighed by examples (all alike under differential privacy: the
    report says `privatised`); the example count and metrics ride as exact integers in the
    masked tail. Each piece of the change (`keyschedule.PIECE` bytes of ring elements) is
    clipped, quantized and masked before the next is read, so the device needs the masked
    vector and one piece besides its models, not a float64 copy of the whole change.
    """
    q = setup.quantizer
    weight = setup.max_weight if report.privatised else min(report.examples, setup.max_weight)
    rng = np.random.default_rng([setup.server_round, report.client, 0x5EC])
    encoder = Encoder(q, rng, weight=weight / setup.max_weight)
    seeds = secagg.mask_seeds(setup, mask_sk)
    masks = secagg.Masks(q, secagg.signed(setup, seeds))
    y = np.empty(updates.size(local_arrays), dtype=q.dtype)
    for lo, change in updates.delta_pieces(local_arrays, global_arrays, masks.step):
        piece = y[lo : lo + change.size]
        encoder(change, piece)  # clip, weigh, quantize
        masks.add(piece)
    tail = {
        "contributors": 1,
        "examples": report.examples,
        "weight": weight,
        "correct": report.correct,
        "loss-sum-fp": round(_bounded(report.loss_sum) * m.FIXED_POINT),
        "drift-count": len(report.drifts),
        "clipped": encoder.clipped,
        "train-us": int(report.train_seconds * 1e6),
        "dropped": report.dropped,
        "privatised": int(report.privatised),
    }
    y_tail = secagg.tail_words([tail[name] for name in m.TAIL])
    masks.add_tail(y_tail)
    return secagg.sealed(setup, enc_sk, seeds, y, y_tail)


def _bounded(loss_sum: float) -> float:
    """A loss sum that fits the tail: a diverged (inf/NaN) loss counts as very large."""
    return float(np.nan_to_num(min(loss_sum, 2.0**40), nan=2.0**40))


def _offer_keys(ctx: Context) -> ConfigRecord:
    state = _state(ctx)
    pub = _new_mask_key(state)
    _save(ctx, state)
    return ConfigRecord({"enc-pub": ks.public_key(state["enc-sk"]), "mask-pub": pub})


def _unmask(rec: ConfigRecord, ctx: Context) -> ConfigRecord:
    try:
        request, index = wire.read_request(rec)
    except secagg.Rejected as err:
        raise SecureAggregationError(f"bad unmask request: {err}") from err
    state = _state(ctx)
    answered = (request.session, request.server_round)
    if answered in state["answered"]:
        raise SecureAggregationError(f"round {request.server_round} was already unmasked")
    try:
        answer = secagg.answer(request, index, state["enc-sk"])
    except secagg.Rejected as err:
        raise SecureAggregationError(str(err)) from err
    state["answered"] = [*state["answered"], answered][-ANSWERED_KEPT:]
    _save(ctx, state)
    return wire.answer_record(answer)


# --- device state -----------------------------------------------------------------------


def _state(ctx: Context) -> dict:
    if STATE_KEY not in ctx.state:
        return {"enc-sk": ks.new_private_key(), "mask-sks": [], "answered": []}
    rec = ctx.state[STATE_KEY]
    sessions, rounds = rec["answered-sessions"], rec["answered-rounds"]
    return {
        "enc-sk": rec["enc-sk"],
        "mask-sks": list(rec["mask-sks"]),
        "answered": list(zip(sessions, rounds, strict=True)),
    }


def _save(ctx: Context, state: dict) -> None:
    ctx.state[STATE_KEY] = ConfigRecord(
        {
            "enc-sk": state["enc-sk"],
            "mask-sks": state["mask-sks"],
            "answered-sessions": [s for s, _ in state["answered"]],
            "answered-rounds": [r for _, r in state["answered"]],
        }
    )


def _new_mask_key(state: dict) -> bytes:
    sk = ks.new_private_key()
    state["mask-sks"] = [*state["mask-sks"], sk][-PENDING_KEYS:]
    return ks.public_key(sk)


def _mask_key(state: dict, pub: bytes) -> bytes:
    """The secret of the mask key the server assigned (kept: a dropped round may reuse it)."""
    for sk in state["mask-sks"]:
        if ks.public_key(sk) == pub:
            return sk
    raise SecureAggregationError(f"{m.KEYS_LOST}: the server assigned an unknown mask key")

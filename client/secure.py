"""The client side of secure aggregation, as a Flower mod: clip -> quantize -> mask.

The mod sits between the runtime and fedstream's train handler. The handler trains and
replies as always; the mod turns that reply into a masked vector (model change, example
count and metrics together) before it leaves the device, and answers the server's key and
unmask queries itself. A message without a secure-aggregation record passes through
untouched, so one ClientApp serves both plaintext and secure federations.

Secrets live in `Context.state` (the device), never in a reply: the long-lived encryption
key, the last few mask keys it offered (a new one with every masked reply), and a memo of
each recent round it masked in. An unmask request is answered only against such a memo,
which the answer uses up: once per round, with the round's threshold, about the round's
parties (so no server can ask twice with different survivor sets, or ask about a round
this device never took part in). A mask key masks once: the shares sent to this device are
bound to its key of the round, so a server that sent a round again, for a second memo and
a second answer (the self mask from one, the pair masks from the other), would find the
first round's shares sealed to a key that no memo holds any more.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedstream.client.privacy import round_rng
from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import secagg, updates
from fedstream.protocol import secagg_wire as wire
from fedstream.protocol.fixedpoint import Encoder

STATE_KEY = "fedstream-secagg"
SECURE_ONLY = "secure-only"  # node config: a device whose config enables secure aggregation
PENDING_KEYS = 4  # mask keys kept; the server only ever assigns one of the latest
_ROUNDING_STREAM = 0x5EC  # apart from the noise of the same round (sources/base.py: key layouts)
ROUNDS_KEPT = 16  # rounds masked in whose unmask request may still come (older: refused)


class SecureAggregationError(RuntimeError):
    """The client cannot take part in this secure round (the server will see it as dropped)."""


def make_secure_aggregation_mod(seed: int | None = None) -> Mod:
    """The mod, its stochastic rounding seeded from `seed` (simulation, so that a run
    repeats) or from the OS (devices: no server can predict a device's rounding)."""

    def secure_aggregation_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
        content = msg.content
        kind = msg.metadata.message_type
        if kind == MessageType.TRAIN and m.record(content, m.SECAGG, ConfigRecord) is not None:
            return _train(msg, ctx, call_next, seed)
        if kind == MessageType.TRAIN and ctx.node_config.get(SECURE_ONLY):
            # A server that drops the setup would otherwise get this device's update in clear.
            raise SecureAggregationError(
                "this device trains only under secure aggregation (its config enables it), "
                "and the round came without a secure-aggregation setup"
            )
        if kind == MessageType.QUERY and m.record(content, m.CONFIG, ConfigRecord) is not None:
            query = content[m.CONFIG].get(m.QUERY_KIND)
            if query == m.KEYS:
                return Message(RecordDict({m.SECAGG: _offer_keys(ctx)}), reply_to=msg)
            if query == m.UNMASK:
                answer = _unmask(content[m.CONFIG], ctx)
                return Message(RecordDict({m.SECAGG: answer}), reply_to=msg)
        return call_next(msg, ctx)

    return secure_aggregation_mod


secure_aggregation_mod = make_secure_aggregation_mod()  # a device's: rounding from the OS


def _train(
    msg: Message, ctx: Context, call_next: ClientAppCallable, seed: int | None
) -> Message:
    try:
        setup = wire.read_setup(msg.content[m.SECAGG])
    except secagg.Rejected as err:
        raise SecureAggregationError(f"bad round setup: {err}") from err
    state = _state(ctx)
    mask_sk = _mask_key(state, setup.mask_pub)
    try:  # all of the setup is checked before training: a failure trains nothing
        seeds = secagg.mask_seeds(setup, mask_sk)
    except ValueError as err:
        raise SecureAggregationError(f"bad round setup: {err}") from err
    reply = call_next(msg, ctx)
    if reply.has_error():
        return reply
    report = m.TrainReport.from_record(reply.content[m.METRICS])
    rng = round_rng(seed, setup.server_round, report.client, _ROUNDING_STREAM)
    masked = masked_update(
        msg.content[m.ARRAYS], reply.content[m.ARRAYS], report, setup, state["enc-sk"], seeds,
        rng,
    )
    del reply  # the trained model's memory, freed, is reused for the masked reply's bytes
    state["mask-sks"] = [sk for sk in state["mask-sks"] if sk != mask_sk]  # it masks once
    next_pub = _new_mask_key(state)
    memo = secagg.RoundMemo.of(setup)
    rounds = [r for r in state["rounds"] if (r.session, r.server_round) != _round_of(memo)]
    state["rounds"] = [*rounds, memo][-ROUNDS_KEPT:]
    _save(ctx, state)
    return Message(wire.masked_content(masked, report.client, next_pub), reply_to=msg)


def masked_update(
    global_arrays: ArrayRecord,
    local_arrays: ArrayRecord,
    report: m.TrainReport,
    setup: secagg.RoundSetup,
    enc_sk: bytes,
    seeds: dict[int, bytes],
    rng: np.random.Generator | None = None,
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
    encoder = Encoder(q, rng or np.random.default_rng(), weight=weight / setup.max_weight)
    masks = secagg.Masks(q, secagg.signed(setup, seeds))
    y = np.empty(updates.size(local_arrays), dtype=q.dtype)
    for lo, change in updates.delta_pieces(local_arrays, global_arrays, masks.step):
        piece = y[lo : lo + change.size]
        encoder(change, piece)  # clip, weigh, quantize
        masks.add(piece)
    tail = {
        "contributors": 1,
        "with-samples": int(report.examples > 0),
        "examples": report.examples,
        "weight": weight,
        "correct": report.correct,
        "loss-sum-fp": round(_bounded(report.loss_sum, q.parties) * m.FIXED_POINT),
        "drift-count": len(report.drifts),
        "clipped": encoder.clipped,
        "train-us": int(report.train_seconds * 1e6),
        "dropped": report.dropped,
        "privatised": int(report.privatised),
        "no-change-correct": report.no_change_correct,
        "majority-correct": report.majority_correct,
    }
    y_tail = secagg.tail_words([*(tail[name] for name in m.TAIL), *_classes(report, setup)])
    masks.add_tail(y_tail)
    return secagg.sealed(setup, enc_sk, seeds, y, y_tail)


def check_classes(msg: Message, n_classes: int) -> None:
    """Before a secure round trains: its tail must count the classes this client scores.

    Checked before the round's samples are used (on a device, committed), since the
    masked reply could not carry them and the round would fail anyway."""
    rec = m.record(msg.content, m.SECAGG, ConfigRecord)
    if rec is not None:
        _check_classes(n_classes, int(rec.get("tail-len", 0)))  # type: ignore[arg-type]


def _check_classes(n_classes: int, tail_len: int) -> None:
    expected = (tail_len - len(m.TAIL)) // 3
    if tail_len != m.tail_len(n_classes):
        raise SecureAggregationError(
            f"this client scores {n_classes} classes, the server's round counts {expected}: "
            "set the same stream.n_classes on server and devices"
        )


def _classes(report: m.TrainReport, setup: secagg.RoundSetup) -> list[int]:
    """The report's class tally, as long as the round's tail has room for."""
    classes = report.classes
    if classes is None or len(classes) % 3:
        raise SecureAggregationError("the train report carries no class tally")
    _check_classes(len(classes) // 3, setup.tail_len)
    return classes


def _bounded(loss_sum: float, parties: int) -> float:
    """A loss sum whose fixed point, summed over the round's parties, fits the signed tail:
    a diverged (inf/NaN) loss counts as the largest that does."""
    cap = 2.0**61 / (parties * m.FIXED_POINT)  # half the signed range: rounding has room
    return float(np.clip(np.nan_to_num(loss_sum, nan=cap, posinf=cap, neginf=-cap), -cap, cap))


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
    memo = next((r for r in state["rounds"] if _round_of(r) == _round_of(request)), None)
    if memo is None or memo.index != index:
        raise SecureAggregationError(
            f"round {request.server_round} is not a round this device masked in as party "
            f"{index}, or it was already unmasked"
        )
    try:
        answer = secagg.answer(request, memo, state["enc-sk"])
    except secagg.Rejected as err:
        raise SecureAggregationError(str(err)) from err
    state["rounds"] = [r for r in state["rounds"] if r is not memo]  # answered once only
    _save(ctx, state)
    return wire.answer_record(answer)


def _round_of(x: secagg.RoundMemo | secagg.UnmaskRequest) -> tuple[bytes, int]:
    return x.session, x.server_round


# --- device state -----------------------------------------------------------------------


_MEMO_FIELDS = ("session", "server_round", "index", "threshold", "parties", "mask_pub")


def _state(ctx: Context) -> dict:
    if STATE_KEY not in ctx.state:
        return {"enc-sk": ks.new_private_key(), "mask-sks": [], "rounds": []}
    rec = ctx.state[STATE_KEY]
    columns = [rec.get(f"rounds-{name}", []) for name in _MEMO_FIELDS]
    if len({len(column) for column in columns}) > 1:
        columns = [[] for _ in columns]  # memos of an older protocol: none can be answered
    return {
        "enc-sk": rec["enc-sk"],
        "mask-sks": list(rec["mask-sks"]),
        "rounds": [secagg.RoundMemo(*row) for row in zip(*columns, strict=True)],
    }


def _save(ctx: Context, state: dict) -> None:
    columns = {
        f"rounds-{name}": [getattr(r, name) for r in state["rounds"]] for name in _MEMO_FIELDS
    }
    ctx.state[STATE_KEY] = ConfigRecord(
        {"enc-sk": state["enc-sk"], "mask-sks": state["mask-sks"], **columns}
    )


def _new_mask_key(state: dict) -> bytes:
    sk = ks.new_private_key()
    state["mask-sks"] = [*state["mask-sks"], sk][-PENDING_KEYS:]
    return ks.public_key(sk)


def _mask_key(state: dict, pub: bytes) -> bytes:
    """The secret of the mask key the server assigned (kept until it masks: a round this
    device dropped out of before masking may reuse it)."""
    for sk in state["mask-sks"]:
        if ks.public_key(sk) == pub:
            return sk
    raise SecureAggregationError(f"{m.KEYS_LOST}: the server assigned an unknown mask key")

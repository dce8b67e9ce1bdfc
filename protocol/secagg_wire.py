"""Secure-aggregation messages as Flower records, read and written in one place.

Readers validate as they parse: a record that is missing a field, or has one of the wrong
type, raises `Rejected` naming the field, and its sender is treated as dropped.

The round setup and the masked reply carry the protocol version, so that a client and a
server that would expand masks differently refuse each other with a reason instead of
summing to noise.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import updates
from fedstream.protocol.fixedpoint import Quantizer
from fedstream.protocol.secagg import (
    MaskedInput,
    Peer,
    Rejected,
    RoundSetup,
    UnmaskAnswer,
    UnmaskRequest,
)

PROTOCOL = 7
"""Version of the secure-aggregation protocol: 1 read masks as AES-128-CTR from a zero
counter block; 2 reads them segment by segment (keyschedule.Keystream); 3 counts privatised
updates in the tail; 4 counts clients with samples too; 5 binds each share to its
receiver's mask key (keyschedule.share_ad); 6 counts the trivial predictors' right answers
in the tail; 7 tallies labels, predictions and right ones per class after it."""


def _check_protocol(rec: ConfigRecord, sender: str) -> None:
    version = rec.get("protocol", 1)
    if version != PROTOCOL:
        raise Rejected(
            f"{sender} speaks secure-aggregation protocol {version!r}, this side "
            f"{PROTOCOL}: run the same fedstream version on server and clients"
        )


def _get(rec: ConfigRecord, key: str, kind: type) -> Any:
    if key not in rec:
        raise Rejected(f"secure-aggregation record lacks '{key}'")
    value = rec[key]
    if kind is list:
        if not isinstance(value, list):
            raise Rejected(f"'{key}' must be a list")
    elif kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Rejected(f"'{key}' must be a number")
    elif not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise Rejected(f"'{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _ints(rec: ConfigRecord, key: str) -> list[int]:
    values = _get(rec, key, list)
    if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise Rejected(f"'{key}' must be a list of integers")
    return values


def _blobs(rec: ConfigRecord, key: str, n: int) -> list[bytes]:
    values = _get(rec, key, list) if n else rec.get(key, [])
    if len(values) != n or any(not isinstance(v, bytes) for v in values):
        raise Rejected(f"'{key}' must hold {n} byte strings")
    return values


def setup_record(s: RoundSetup) -> ConfigRecord:
    peers = sorted(s.peers)
    return ConfigRecord(
        {
            "protocol": PROTOCOL,
            "session": s.session,
            "round": s.server_round,
            "index": s.index,
            "threshold": s.threshold,
            "bits": s.quantizer.bits,
            "clip": s.quantizer.clip,
            "parties": s.quantizer.parties,
            "tail-len": s.tail_len,
            "peers": peers,
            "peer-enc": [s.peers[w].enc_pub for w in peers],
            "peer-mask": [s.peers[w].mask_pub for w in peers],
            "mask-pub": s.mask_pub,
            "max-weight": s.max_weight,
        }
    )


def read_setup(rec: ConfigRecord) -> RoundSetup:
    _check_protocol(rec, "the server")
    peers = _ints(rec, "peers")
    enc, mask = _blobs(rec, "peer-enc", len(peers)), _blobs(rec, "peer-mask", len(peers))
    try:
        quantizer = Quantizer(
            _get(rec, "bits", int), float(_get(rec, "clip", float)), _get(rec, "parties", int)
        )
    except ValueError as err:
        raise Rejected(str(err)) from err
    return RoundSetup(
        session=_get(rec, "session", bytes),
        server_round=_get(rec, "round", int),
        index=_get(rec, "index", int),
        threshold=_get(rec, "threshold", int),
        quantizer=quantizer,
        tail_len=_get(rec, "tail-len", int),
        peers={w: Peer(e, k) for w, e, k in zip(peers, enc, mask, strict=True)},
        mask_pub=_get(rec, "mask-pub", bytes),
        max_weight=_get(rec, "max-weight", int),
    )


def masked_content(mi: MaskedInput, client: int, next_mask_pub: bytes) -> RecordDict:
    tags, holders = sorted(mi.commitments), sorted(mi.shares)
    envelope = ConfigRecord(
        {
            "protocol": PROTOCOL,
            "client-id": client,
            "session": mi.session,
            "round": mi.server_round,
            "index": mi.index,
            "mask-pub": mi.mask_pub,
            "commit-tags": tags,
            "commits": [mi.commitments[t] for t in tags],
            "holders": holders,
            "shares": [mi.shares[h] for h in holders],
            "next-mask-pub": next_mask_pub,
        }
    )
    arrays = updates.record({"model": mi.model, "tail": mi.tail})
    return RecordDict({m.MASKED: arrays, m.SECAGG: envelope})


def read_masked(content: RecordDict) -> tuple[MaskedInput, bytes]:
    """The masked input of a reply, and the mask key its sender offers for next time."""
    rec = m.record(content, m.SECAGG, ConfigRecord)
    arrays = m.record(content, m.MASKED, ArrayRecord)
    if rec is None or arrays is None:
        raise Rejected("reply carries no masked update")
    _check_protocol(rec, "the client")
    if set(arrays.keys()) != {"model", "tail"}:
        raise Rejected("masked update must hold exactly 'model' and 'tail'")
    try:
        model, tail = updates.view(arrays["model"]), updates.view(arrays["tail"])
    except Exception as err:  # a corrupt Array cannot be decoded
        raise Rejected(f"masked update does not decode: {err}") from err
    tags, holders = _ints(rec, "commit-tags"), _ints(rec, "holders")
    mi = MaskedInput(
        session=_get(rec, "session", bytes),
        server_round=_get(rec, "round", int),
        index=_get(rec, "index", int),
        mask_pub=_get(rec, "mask-pub", bytes),
        model=model,
        tail=tail,
        commitments=dict(zip(tags, _blobs(rec, "commits", len(tags)), strict=True)),
        shares=dict(zip(holders, _blobs(rec, "shares", len(holders)), strict=True)),
    )
    next_pub = _get(rec, "next-mask-pub", bytes)
    if len(next_pub) != 32 or not ks.usable_public_key(next_pub):
        # Handed to its neighbours next round, it would fail their rounds, not its own.
        raise Rejected("the mask key offered for next time is not a usable X25519 key")
    return mi, next_pub


def request_record(req: UnmaskRequest, index: int) -> ConfigRecord:
    senders = sorted(req.ciphertexts)
    return ConfigRecord(
        {
            m.QUERY_KIND: m.UNMASK,
            "session": req.session,
            "round": req.server_round,
            "index": index,
            "survivors": sorted(req.survivors),
            "threshold": req.threshold,
            "senders": senders,
            "ciphertexts": [req.ciphertexts[u] for u in senders],
            "sender-enc": [req.sender_enc_pubs[u] for u in senders],
        }
    )


def read_request(rec: ConfigRecord) -> tuple[UnmaskRequest, int]:
    senders = _ints(rec, "senders")
    req = UnmaskRequest(
        session=_get(rec, "session", bytes),
        server_round=_get(rec, "round", int),
        survivors=frozenset(_ints(rec, "survivors")),
        threshold=_get(rec, "threshold", int),
        ciphertexts=dict(zip(senders, _blobs(rec, "ciphertexts", len(senders)), strict=True)),
        sender_enc_pubs=dict(zip(senders, _blobs(rec, "sender-enc", len(senders)), strict=True)),
    )
    return req, _get(rec, "index", int)


def answer_record(ans: UnmaskAnswer) -> ConfigRecord:
    keys = sorted(ans.shares)
    rejected = sorted(ans.rejected)
    return ConfigRecord(
        {
            "session": ans.session,
            "round": ans.server_round,
            "index": ans.index,
            "senders": [u for u, _ in keys],
            "tags": [t for _, t in keys],
            "shares": [ans.shares[k] for k in keys],
            "rejected": rejected,
            "reasons": [ans.rejected[u] for u in rejected],
        }
    )


def read_answer(rec: ConfigRecord) -> UnmaskAnswer:
    senders, tags = _ints(rec, "senders"), _ints(rec, "tags")
    if len(senders) != len(tags):
        raise Rejected("'senders' and 'tags' differ in length")
    shares = _blobs(rec, "shares", len(senders))
    rejected = _ints(rec, "rejected")
    reasons = _get(rec, "reasons", list) if rejected else rec.get("reasons", [])
    if len(reasons) != len(rejected):
        raise Rejected("'rejected' and 'reasons' differ in length")
    return UnmaskAnswer(
        session=_get(rec, "session", bytes),
        server_round=_get(rec, "round", int),
        index=_get(rec, "index", int),
        shares=dict(zip(zip(senders, tags, strict=True), shares, strict=True)),
        rejected={u: str(r) for u, r in zip(rejected, reasons, strict=True)},
    )

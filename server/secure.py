"""The server side of secure aggregation: one round in two trips, then Flower's strategy.

Trip 1 sends the model with each client's round setup (its index, neighbours and their
keys) and folds each masked reply into one accumulator as it arrives. Trip 2 asks the
survivors for the shares that unmask the sum, and ends as soon as the answers in recover
every secret it needs (the slowest holders' answers are then discarded when they come).
The unmasked sum becomes a single averaged update that Flower's strategy (FedAvg,
FedAvgM, FedAdam, FedYogi) aggregates as usual, so server optimizers work unchanged on
top of the secure sum.

Keys are fetched once per client: an extra trip in the first round, which also asks, without
waiting, every node not sampled yet, so that later rounds start in two trips. Every masked reply
offers a fresh mask key for the client's next round; a client that dropped keeps the one
it had. Reusing a mask key is safe here because only round-bound pair seeds derived from
it are ever revealed (see `fedstream.protocol.secagg`), never the key.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import secagg, updates
from fedstream.protocol import secagg_wire as wire
from fedstream.protocol.config import SecureAggregationConfig
from fedstream.protocol.fixedpoint import Quantizer
from fedstream.server.grid import Stragglers, send_and_collect
from fedstream.server.privacy import Privacy, aggregate_message, secure_clip
from fedstream.server.records import SILENT, bytes_of, client_name, error_reason


@dataclass
class SecureOutcome:
    """What a secure round yields for the round record."""

    arrays: ArrayRecord
    error: str | None = None
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(m.TAIL, 0))
    totals_checked: bool = False  # the unmasked tail passed its checks (else: zeros)
    classes: list[int] | None = None  # the summed class tally, once checked
    failures: list[dict[str, Any]] = field(default_factory=list)  # node, stage, reason
    summed_nodes: list[int] = field(default_factory=list)  # whose inputs the sum holds
    clients_ok: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0
    coordinate_clip: float = 0.0  # the range the round's fixed point clipped coordinates to
    # Wall seconds per stage: "keys", "train" (trip 1, folding included), "unmask" (trip 2),
    # "recover" (shares -> seeds -> masks removed), "finish" (decode, strategy): where the
    # cost of privacy goes, round by round.
    stage_seconds: dict[str, float] = field(default_factory=dict)


KEY_STILL_UNUSED = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


class SecureAggregator:
    """Runs the secure rounds of one federation; keeps the keys clients offered."""

    def __init__(
        self,
        cfg: SecureAggregationConfig,
        n_classes: int,
        graph_seed: int | None = None,
        privacy: Privacy | None = None,
    ) -> None:
        self.cfg = cfg
        self.n_classes = n_classes  # the tail counts each class (messages.tail_len)
        self.privacy = privacy  # its server noise goes onto the unmasked mean
        # Seeds the neighbour ring in simulation only (see `secagg.neighbour_graph`).
        self.graph_seed = graph_seed
        self.session = secrets.token_bytes(16)
        self.enc_pub: dict[int, bytes] = {}  # node -> long-lived encryption key
        self.mask_pub: dict[int, bytes] = {}  # node -> the mask key its next round uses
        self.late = Stragglers()  # replies no longer waited for: pulled off the grid, unread
        self.offers = Stragglers()  # key queries not waited for: their answers are read later
        self.asked: set[int] = set()  # nodes with such a query out (not asked again meanwhile)

    def round(
        self,
        grid: Grid,
        strategy: Strategy,
        server_round: int,
        arrays: ArrayRecord,
        sent: list[Message],
        client_of: dict[int, int],
        timeout: float,
    ) -> SecureOutcome:
        out = SecureOutcome(arrays)
        clock = _Stages(out.stage_seconds)
        self.late.discard(grid)
        nodes = [msg.metadata.dst_node_id for msg in sent]
        self._fetch_keys(nodes, grid, timeout, out)
        clock.lap("keys")
        parties = [n for n in nodes if n in self.mask_pub and n in self.enc_pub]
        try:
            agg = self._aggregation(server_round, parties, updates.size(arrays), client_of)
        except (ValueError, secagg.RoundFailed) as err:
            out.error = str(err)
            return out
        out.coordinate_clip = agg.q.clip
        index = {node: i for i, node in enumerate(parties, start=1)}
        messages = [
            _with_setup(msg, agg.setup_for(index[msg.metadata.dst_node_id]))
            for msg in sent
            if msg.metadata.dst_node_id in index
        ]
        out.bytes_down += sum(bytes_of(msg) for msg in messages)

        def fold(reply: Message) -> None:
            node = reply.metadata.src_node_id
            if reply.has_error():
                out.failures.append(_failure(node, "train", error_reason(reply)))
                # The key is still unused only where the ClientApp raised (before it masked,
                # or with its reply never sent); a reply Flower could not fetch (an upload
                # cut off), or a crash, may have used it; a device that lost its state has
                # none.
                if m.KEYS_LOST in (reply.error.reason or "") or (
                        reply.error.code not in KEY_STILL_UNUSED):
                    self.mask_pub.pop(node, None)
                return
            out.bytes_up += bytes_of(reply)
            try:
                masked, next_pub = wire.read_masked(reply.content)
                if masked.index != index.get(node):
                    raise secagg.Rejected(
                        f"claims index {masked.index}, was given {index.get(node)}"
                    )
                client = m.client_id(reply.content)
                if client is None:
                    raise secagg.Rejected("it names no client (a whole number as 'client-id')")
                agg.accept(masked)
            except secagg.Rejected as err:
                out.failures.append(_failure(node, "masked input", f"rejected: {err}"))
                self.mask_pub.pop(node, None)  # it masked with it: a key masks once
                return
            client_of[node] = client
            self.mask_pub[node] = next_pub

        answered = _collect(grid, messages, timeout, fold, late=self.late.trip())
        out.round_trips += 1
        clock.lap("train")
        for node in parties:
            if node not in answered:
                out.failures.append(_failure(node, "train", SILENT))
                self.mask_pub.pop(node, None)  # it may have masked with it (a lost reply)
        out.clients_ok = len(agg.survivors)
        try:
            agg.check_survivors()
            self._unmask(agg, grid, {i: n for n, i in index.items()}, timeout, out)
            clock.lap("unmask")
            ring, tail = agg.result()
            out.summed_nodes = [parties[i - 1] for i in sorted(agg.survivors)]
            clock.lap("recover")
        except secagg.RoundFailed as err:
            out.error = f"secure aggregation failed: {err}"
            return out
        self._finish(strategy, server_round, arrays, agg, ring, tail, out)
        clock.lap("finish")
        return out

    def _aggregation(
        self, server_round: int, parties: list[int], size: int, client_of: dict[int, int]
    ) -> secagg.Aggregation:
        n = len(parties)
        if n < 2:
            raise secagg.RoundFailed(f"{n} client(s) ready: a secure sum needs at least 2")
        try:
            degree, threshold = secagg.round_shape(
                n, self.cfg.degree, self.cfg.threshold, self.cfg.dropout
            )
        except ValueError as err:  # a count threshold, and clients offline since sampling
            raise secagg.RoundFailed(
                f"{n} clients ready, too few for secure_aggregation.threshold = "
                f"{self.cfg.threshold} ({err})"
            ) from None
        seeded = self.graph_seed is not None
        rng = random.Random(f"fedstream/graph/{self.graph_seed}/{server_round}") if seeded else None
        peers = {
            i: secagg.Peer(self.enc_pub[node], self.mask_pub[node])
            for i, node in enumerate(parties, start=1)
        }
        return secagg.Aggregation(
            session=self.session,
            server_round=server_round,
            quantizer=Quantizer(self.cfg.bits, self._clip(), n),
            threshold=threshold,
            graph=secagg.neighbour_graph(n, degree, rng),
            peers=peers,
            size=size,
            tail_len=m.tail_len(self.n_classes),
            max_weight=self.cfg.max_weight,
            name=lambda i: client_name(parties[i - 1], client_of),
        )

    def _clip(self) -> float:
        """The fixed point's range: as set, or under privacy wide enough that it cuts none
        of the noise the clients were asked to add (`privacy.secure_clip`)."""
        if self.privacy is None:
            return self.cfg.clip
        p = self.privacy
        return secure_clip(self.cfg.clip, p.cfg.clip_norm, p.client_std)

    def _fetch_keys(
        self, nodes: list[int], grid: Grid, timeout: float, out: SecureOutcome
    ) -> None:
        """Keys of the sampled nodes that have none, and, without waiting for them, of every
        other node that has none: with partial participation, a node sampled later then
        starts its round in two trips instead of three."""
        self._take_offers(grid)
        nodes = [n for n in nodes if n not in self.mask_pub]
        if not nodes:
            return
        ahead = [
            n for n in grid.get_node_ids()
            if n not in self.mask_pub and n not in nodes and n not in self.asked
        ]
        queries = [
            Message(
                RecordDict({m.CONFIG: ConfigRecord({m.QUERY_KIND: m.KEYS})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in [*nodes, *ahead]
        ]
        out.round_trips += 1
        waiting = set(nodes)  # sampled nodes not heard from yet

        def take(reply: Message) -> None:
            node = reply.metadata.src_node_id
            reason = self._register_keys(reply)
            if reason and node in waiting:
                out.failures.append(_failure(node, "keys", reason))
            waiting.discard(node)

        # Late answers are read when they come: see _take_offers.
        answered = _collect(
            grid, queries, timeout, take, enough=lambda: not waiting, late=self.offers.trip()
        )
        out.failures.extend(_failure(n, "keys", SILENT) for n in nodes if n in waiting)
        self.asked.update(n for n in ahead if n not in answered)

    def _take_offers(self, grid: Grid) -> None:
        """Key offers that came in after their trip ended. A node with keys by then keeps
        them: they are newer (every masked reply offers the next mask key)."""
        for reply in self.offers.collect(grid):
            node = reply.metadata.src_node_id
            self.asked.discard(node)
            if node not in self.mask_pub:
                self._register_keys(reply)

    def _register_keys(self, reply: Message) -> str | None:
        """Keep a node's key offer; what is wrong with it, if anything."""
        if reply.has_error():
            return error_reason(reply)
        rec = m.record(reply.content, m.SECAGG, ConfigRecord)
        enc, mask = (rec or {}).get("enc-pub"), (rec or {}).get("mask-pub")
        if not all(isinstance(k, bytes) and len(k) == 32 for k in (enc, mask)):
            return "malformed key offer"
        if not all(ks.usable_public_key(k) for k in (enc, mask)):
            return "key offer refused: a public key of low order (no shared secret)"
        node = reply.metadata.src_node_id
        self.enc_pub[node], self.mask_pub[node] = enc, mask
        return None

    def _unmask(
        self,
        agg: secagg.Aggregation,
        grid: Grid,
        node_of: dict[int, int],
        timeout: float,
        out: SecureOutcome,
    ) -> None:
        queries = [
            Message(
                RecordDict({m.CONFIG: wire.request_record(agg.request_for(i), i)}),
                dst_node_id=node_of[i],
                message_type=MessageType.QUERY,
            )
            for i in sorted(agg.survivors)
        ]
        out.bytes_down += sum(bytes_of(q) for q in queries)
        blamed: dict[int, list[str]] = {}  # sender -> what holders found in its bundles

        def take(reply: Message) -> None:
            node = reply.metadata.src_node_id
            if reply.has_error():
                out.failures.append(_failure(node, "unmask", error_reason(reply)))
                return
            out.bytes_up += bytes_of(reply)
            try:
                answer = wire.read_answer(reply.content[m.SECAGG])
                if node_of.get(answer.index) != node:
                    raise secagg.Rejected(f"answers as holder {answer.index}")
                ignored = agg.take(answer)
            except (secagg.Rejected, KeyError) as err:
                out.failures.append(_failure(node, "unmask", f"rejected: {err}"))
                return
            for sender, why in answer.rejected.items():
                blamed.setdefault(sender, []).append(why)
            for sender, tag in ignored:
                blamed.setdefault(sender, []).append(f"a share of a pair with {agg.name(tag)}, "
                                                     "not its neighbour")

        # Stop at the first answers that unmask the sum (t honest holders of each secret):
        # the last holders' answers would only be waited for.
        answered = _collect(grid, queries, timeout, take, enough=agg.ready,
                            late=self.late.trip())
        out.round_trips += 1
        # A bundle's contents are read only now, by its holders: a sender whose bundles
        # they refuse is named, whether or not the others' shares still rebuild its secrets.
        out.failures.extend(
            _failure(node_of[u], "shares", f"{len(why)} holder(s) refused its share bundle: "
                     f"{why[0]}")
            for u, why in sorted(blamed.items()) if u in agg.survivors
        )
        if not agg.ready():  # the holders that were waited for in vain: the round's failures
            out.failures.extend(_failure(node_of[i], "unmask", SILENT)
                                for i in sorted(agg.survivors) if node_of[i] not in answered)
        out.failures.extend(  # found by `ready`, which rebuilt the secrets
            _failure(node_of[h], "unmask", "sent shares off the secrets' polynomials (tampered)")
            for h in sorted(agg.tamperers)
        )

    def _finish(
        self,
        strategy: Strategy,
        server_round: int,
        arrays: ArrayRecord,
        agg: secagg.Aggregation,
        ring: np.ndarray,
        tail: np.ndarray,
        out: SecureOutcome,
    ) -> None:
        words = tail.astype(np.int64)
        totals = {name: int(v) for name, v in zip(m.TAIL, words, strict=False)}
        classes = words[len(m.TAIL):].reshape(3, -1)
        if totals["contributors"] != len(agg.survivors):
            out.error = "secure aggregation failed: the unmasked sum did not pass its check"
            return
        odd = _odd_totals(totals, self.cfg.max_weight) or _odd_classes(classes, totals)
        if odd:
            out.error = f"secure aggregation failed: the unmasked totals are inconsistent ({odd})"
            return
        out.totals, out.totals_checked = totals, True
        out.classes = classes.ravel().tolist()
        if totals["weight"] <= 0:
            out.error = "no client update to aggregate"
            return
        if totals["with-samples"] == 1 and totals["privatised"] < totals["contributors"]:
            # The others' changes are zero: the sum is one client's update, which the new
            # model would hand every client. Only client noise would have hidden it.
            out.error = (
                "secure aggregation held back the sum: only 1 of its "
                f"{totals['contributors']} clients had new samples, so it is that client's "
                "update alone (the previous model is kept)"
            )
            return
        # The weighted mean of the decoded changes, added to the model block by block.
        factor = self.cfg.max_weight / (totals["weight"] * agg.q.scale)
        change = agg.q.signed(ring)
        weight = totals["examples"]
        try:
            if self.privacy is not None:
                self.privacy.check_privatised(totals["privatised"], totals["contributors"])
                weight = totals["contributors"]  # see `aggregate_message`
                if not self.privacy.client_noise:  # the server's noise goes onto the mean
                    change = change * factor
                    self.privacy.noise_onto(server_round, change, len(agg.survivors), arrays)
                    factor = 1.0
            averaged = aggregate_message(updates.shifted(arrays, change, factor), weight)
            new, _ = strategy.aggregate_train(server_round, [averaged])
        except Exception as err:
            out.error = f"{type(err).__name__}: {err}"
            return
        if new is None:
            out.error = "no client update to aggregate"
        else:
            out.arrays = new


def _odd_totals(totals: dict[str, int], max_weight: int) -> str | None:
    """What no set of honest clients could sum to, if anything.

    Each client weighs min(examples, max_weight), or max_weight when privatised, and every
    count is non-negative. A tail forged to a small weight would scale the whole mean up;
    this catches such a forgery unless its counts agree with it (see the threat model).
    """
    n, weight, examples = totals["contributors"], totals["weight"], totals["examples"]
    negative = [f"{k} = {v}" for k, v in totals.items() if v < 0 and k != "loss-sum-fp"]
    if negative:
        return "a negative count: " + ", ".join(negative)
    with_samples = totals["with-samples"]
    if with_samples > n or (with_samples == 0) != (examples == 0) or with_samples > examples:
        return f"{with_samples} of {n} clients with samples, {examples} examples"
    if totals["privatised"] > n:
        return f"privatised = {totals['privatised']} of {n} clients"
    right = [f"{k} = {totals[k]}" for k in ("correct", "no-change-correct", "majority-correct")
             if totals[k] > examples]
    if right:
        return f"{', '.join(right)} of {examples} examples"
    private, plain = totals["privatised"], n - totals["privatised"]
    low = private * max_weight + (min(examples, max_weight) if plain == n else 0)
    high = private * max_weight + min(examples, plain * max_weight)
    if not low <= weight <= high:
        return f"weight = {weight} for {n} clients and {examples} examples"
    return None


def _odd_classes(classes: np.ndarray, totals: dict[str, int]) -> str | None:
    """What no honest clients' class tallies could sum to: each sample has one label and
    one prediction, and is right for at most both."""
    labels, predicted, right = classes
    examples = totals["examples"]
    if (classes < 0).any() or (classes > examples).any():  # and the sums below cannot wrap
        return f"a class count below 0 or above the {examples} examples"
    if labels.sum() != examples or predicted.sum() != examples:
        return (f"{labels.sum()} labels and {predicted.sum()} predictions counted by class, "
                f"{examples} examples")
    # Right at most as often as the class occurred or was predicted, and at least as often
    # as both happened beyond the samples of other labels (a sum of clients keeps both).
    low, high = labels + predicted - examples, np.minimum(labels, predicted)
    if right.sum() != totals["correct"] or (right > high).any() or (right < low).any():
        return f"{right.sum()} right by class, {totals['correct']} correct"
    return None


class _Stages:
    def __init__(self, into: dict[str, float]) -> None:
        self.into, self.last = into, time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] = round(now - self.last, 6)
        self.last = now


def _with_setup(msg: Message, setup: secagg.RoundSetup) -> Message:
    content = RecordDict(dict(msg.content.items()))
    content[m.SECAGG] = wire.setup_record(setup)
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN)


def _collect(
    grid: Grid,
    messages: list[Message],
    timeout: float,
    fold: Callable[[Message], None],
    enough: Callable[[], bool] | None = None,
    late: set[str] | None = None,
) -> set[int]:
    answered: set[int] = set()

    def on_reply(reply: Message) -> None:
        answered.add(reply.metadata.src_node_id)
        fold(reply)

    send_and_collect(grid, messages, timeout, on_reply=on_reply, enough=enough, late=late)
    return answered


def _failure(node: int, stage: str, reason: str) -> dict[str, Any]:
    return {"node": node, "stage": stage, "reason": reason}

"""Secure rounds end to end over real ClientApps: what the server sees, what it refuses.

Every client runs fedstream's real ClientApp (learner, secure-aggregation mod) behind a
loopback grid; the tamper hook plays the network or a misbehaving client.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
from flwr.app import Message, MessageType
from loopback_grid import LoopbackGrid

from fedstream.protocol import messages as m
from fedstream.protocol.config import load
from fedstream.server.app import run_federation
from fedstream.sim.client_app import sim_client_app
from fedstream.sim.federation import federation

BASE = [
    "federation.clients=6",
    "federation.rounds=4",
    "federation.round_timeout=0.3",
    "output.progress=false",
    "stream.rate=20.0",
]


def _run(tmp_path, overrides=(), tamper=None):
    cfg = load(None, [*BASE, *overrides])
    grid = LoopbackGrid(sim_client_app(cfg), cfg.federation.clients, tamper)
    evaluated: list[np.ndarray] = []

    def keep(_round, arrays):
        evaluated.append(np.concatenate([a.numpy().ravel() for a in arrays.values()]))
        return {}

    records: list[dict] = []
    run_federation(
        grid, cfg, federation(cfg).initial_arrays(), tmp_path,
        evaluate=keep if "evaluation.every=1" in overrides else None,
        on_round=lambda rec, _h: records.append(rec), simulated=True,
    )
    return grid, records, evaluated


def test_secure_rounds_match_plaintext_and_send_nothing_in_clear(tmp_path):
    seen: list[Message] = []

    def spy(_node, reply):
        seen.append(reply)
        return reply

    _, plain, _ = _run(tmp_path / "p")
    _, secure, _ = _run(tmp_path / "s", ["secure_aggregation.enabled=true"], spy)
    assert [r["examples"] for r in secure] == [r["examples"] for r in plain]
    # The trivial predictors see only labels: their counts sum, masked, to the same.
    for key in ("no_change_correct", "majority_correct"):
        assert [r[key] for r in secure] == [r[key] for r in plain]
        assert 0 < sum(r[key] for r in plain) < sum(r["examples"] for r in plain)
    # Labels per class sum to the same; predictions may differ where the rounded model does.
    assert [r["classes"]["labels"] for r in secure] == [r["classes"]["labels"] for r in plain]
    for s, p in zip(secure, plain, strict=True):
        assert abs(s["accuracy"] - p["accuracy"]) < 0.005
        assert s["secure"] and s["aggregated"] and s["clients"] == {} and not s["failures"]
    assert [r["round_trips"] for r in secure] == [3, 2, 2, 2]  # keys fetched once
    stages = [r["stage_seconds"] for r in secure]
    assert [set(s) for s in stages] == [{"keys", "train", "unmask", "recover", "finish"}] * 4
    assert all(v >= 0 for s in stages for v in s.values()) and stages[0]["keys"] > 0
    train_replies = [r for r in seen if m.MASKED in r.content.array_records]
    assert len(train_replies) == 6 * 4
    for reply in train_replies:  # no model, no count, no metric leaves a device in the clear
        assert not reply.content.metric_records and m.ARRAYS not in reply.content
        assert reply.content[m.MASKED]["model"].numpy().dtype == np.uint32


def _tamper_in_round(target_round: int, node_index: int, change):
    """Apply `change` to one client's masked reply in one round; record earlier replies."""
    history: dict[int, list[Message]] = {}

    def tamper(node, reply):
        if reply.has_error() or m.SECAGG not in reply.content.config_records or (
                m.MASKED not in reply.content):
            return reply
        history.setdefault(node, []).append(copy.deepcopy(reply))
        rnd = int(reply.content[m.SECAGG]["round"])
        if rnd == target_round and node == 1000 + node_index:
            change(reply, history[node])
        return reply

    return tamper


def _replay(reply, earlier):
    reply.content = copy.deepcopy(earlier[-2].content)  # its round-1 reply, again


def _wrong_round(reply, _earlier):
    reply.content[m.SECAGG]["round"] = 1


def _truncate(reply, _earlier):
    arr = reply.content[m.MASKED]["model"].numpy()
    reply.content[m.MASKED]["model"] = type(reply.content[m.MASKED]["model"])(arr[:-1])


def _bad_share(reply, _earlier):
    reply.content[m.SECAGG]["shares"] = reply.content[m.SECAGG]["shares"][:-1]


def _low_order_next_key(reply, _earlier):
    reply.content[m.SECAGG]["next-mask-pub"] = bytes(32)  # X25519 with it has no secret


def _client_id(value):
    def change(reply, _earlier):
        if value is None:
            del reply.content[m.SECAGG]["client-id"]
        else:
            reply.content[m.SECAGG]["client-id"] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_replay, "round 1"),
        (_wrong_round, "round 1"),
        (_truncate, "shape"),
        (_bad_share, "shares"),
        (_low_order_next_key, "not a usable X25519 key"),
        (_client_id(None), "names no client"),
        (_client_id("abc"), "names no client"),
        (_client_id(1.5), "names no client"),
        (_client_id(-1), "names no client"),
    ],
)
def test_a_bad_masked_input_is_rejected_and_the_round_goes_on(tmp_path, change, reason):
    _, records, _ = _run(
        tmp_path, ["secure_aggregation.enabled=true"], _tamper_in_round(2, 3, change)
    )
    second = records[1]
    assert second["aggregated"], second.get("aggregation_error")
    assert second["clients_ok"] == 5
    [failure] = second["failures"]
    assert failure["client"] == 3 and failure["stage"] == "masked input"
    assert "rejected" in failure["reason"] and reason in failure["reason"]
    # The client is back next round, with a new key: the one it masked with masked once.
    assert records[2]["clients_ok"] == 6 and records[2]["round_trips"] == 3


def _forged_count(reply, _earlier):
    tail = reply.content[m.MASKED]["tail"].numpy().copy()
    tail[list(m.TAIL).index("dropped")] -= np.uint64(1)  # the unmasked sum says -1 dropped
    reply.content[m.MASKED]["tail"] = type(reply.content[m.MASKED]["tail"])(tail)


def test_a_sum_whose_tail_fails_its_checks_voids_client_noise_accounting(tmp_path):
    # The server has seen the noisy sum, but how many of its updates carried noise is not
    # known: no bound holds, and the ledger says why (not "released without noise").
    from fedstream.server.privacy import VOID_UNCHECKED

    overrides = ["secure_aggregation.enabled=true", "privacy.enabled=true",
                 "privacy.noise_at=clients", "federation.rounds=3"]
    _, records, _ = _run(tmp_path, overrides, _tamper_in_round(2, 3, _forged_count))
    assert records[0]["aggregated"] and 0 < records[0]["privacy"]["epsilon"] < 1e9
    assert "a negative count: dropped = -1" in records[1]["aggregation_error"]
    for r in records[1:]:
        assert r["privacy"]["epsilon"] == float("inf") and r["privacy"]["void"] == VOID_UNCHECKED
    assert records[2]["aggregated"]


def test_a_masked_reply_flower_could_not_fetch_costs_its_key_not_a_round(tmp_path):
    # The device masked with its key, and the upload was cut off: Flower makes up an error
    # reply. The key is used: assigned again, it would fail the client's next round.
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    cfg = load(None, [*BASE, "secure_aggregation.enabled=true"])
    grids: list[LoopbackGrid] = []

    def cut_off(node, reply):
        sent = grids[0].sent[-1]
        if (node == 1003 and not reply.has_error() and m.MASKED in reply.content
                and int(reply.content[m.SECAGG]["round"]) == 2):
            return Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, "cut off"), reply_to=sent)
        return reply

    grids.append(LoopbackGrid(sim_client_app(cfg), cfg.federation.clients, cut_off))
    records: list[dict] = []
    run_federation(grids[0], cfg, federation(cfg).initial_arrays(), tmp_path,
                   on_round=lambda rec, _h: records.append(rec), simulated=True)
    assert records[1]["clients_ok"] == 5
    assert records[2]["clients_ok"] == 6 and records[2]["round_trips"] == 3  # a key trip


def _garbage_bundles(reply, _earlier):
    rec = reply.content[m.SECAGG]
    rec["shares"] = [bytes(len(c)) for c in rec["shares"]]  # right sizes, nothing inside


def test_a_sender_whose_share_bundles_do_not_open_is_named(tmp_path):
    # The bundles are opened only by their holders, after the masked input was summed: the
    # round cannot take it out again, so it fails, but it names the sender, not nobody.
    _, records, _ = _run(
        tmp_path, ["secure_aggregation.enabled=true"], _tamper_in_round(2, 3, _garbage_bundles)
    )
    second = records[1]
    assert not second["aggregated"] and "client 3" in second["aggregation_error"]
    [failure] = [f for f in second["failures"] if f["stage"] == "shares"]
    assert failure["client"] == 3
    assert "refused its share bundle: share does not authenticate" in failure["reason"]
    assert records[2]["aggregated"]  # the next round goes on


def test_a_holder_that_tampers_with_its_shares_is_named_and_the_round_goes_on(tmp_path):
    # 8 clients, t = 5. Holder 1 tampers with every share and holders 7 and 8 never answer:
    # whatever order the answers are pulled in, the sum needs 5 of the 6 that came, and
    # the first subset tried (1 to 5) holds the tampered shares.
    def answers(_node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if rec is None or "tags" not in rec:  # not an unmask answer
            return reply
        if rec["index"] in (7, 8):
            return None
        if rec["index"] == 1:
            rec["shares"] = [bytes([v[0] ^ 1]) + v[1:] for v in rec["shares"]]
        return reply

    overrides = ["secure_aggregation.enabled=true", "federation.rounds=2", "federation.clients=8"]
    _, records, _ = _run(tmp_path, overrides, answers)
    for record in records:
        assert record["aggregated"], record.get("aggregation_error")
        [failure] = record["failures"]
        assert failure["stage"] == "unmask" and "tampered" in failure["reason"]


def _extra_share(tag=None, share=None):
    """Holder 2's unmask answer with one more share: of party `tag` or a given value. The
    tamperer's node goes into the hook's `nodes`, round by round."""
    def answers(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if rec is None or "tags" not in rec:
            return reply
        if rec["index"] in (7, 8):
            return None  # silent: the other six answers are all read (see below)
        if rec["index"] != 2:
            return reply
        answers.nodes.append(node)
        rec["senders"] = [*rec["senders"], rec["senders"][0]]
        rec["tags"] = [*rec["tags"], rec["tags"][0] if tag is None else tag]
        rec["shares"] = [*rec["shares"], share or rec["shares"][0]]
        if share is not None:  # instead of its first share: the same key twice is refused
            rec["senders"], rec["tags"], rec["shares"] = (
                rec["senders"][1:], rec["tags"][1:], rec["shares"][1:]
            )
        return reply

    answers.nodes = []
    return answers


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (_extra_share(tag=999), "a share of a party outside the round (999)"),
        (_extra_share(tag=-1), "a share of a party outside the round (-1)"),
        (_extra_share(share=b"\xff" * 32), "is not a field element"),
    ],
)
def test_a_malformed_unmask_answer_names_its_holder_and_the_round_goes_on(
    tmp_path, answers, reason
):
    # Holder 2's answer is refused whole and it is named, not a sender; the other five
    # holders' shares still unmask the sum. 8 clients, t = 5, holders 7 and 8 silent:
    # answers are pulled 4 at a time, and no 4 suffice, so all six are read, whatever
    # their order.
    overrides = ["secure_aggregation.enabled=true", "federation.clients=8"]
    _, records, _ = _run(tmp_path, overrides, answers)
    for record, node in zip(records, answers.nodes, strict=True):
        assert record["aggregated"], record.get("aggregation_error")
        [failure] = record["failures"]
        assert failure["node"] == node and failure["stage"] == "unmask"
        assert "rejected" in failure["reason"] and reason in failure["reason"]


def test_a_sum_of_one_clients_samples_is_held_back(tmp_path):
    # At one sample a second over 3 clients, some rounds bring samples to one client only:
    # the others' changes are zero, so the sum would be that client's update, handed to all
    # in the next model. Client noise (differential privacy on the clients) hides it.
    slow = ["federation.clients=3", "federation.rounds=8", "stream.rate=1.0"]
    _, plain, _ = _run(tmp_path / "p", slow)
    _, secure, _ = _run(tmp_path / "s", [*slow, "secure_aggregation.enabled=true"])
    alone = [p["round"] for p in plain
             if sum(c["examples"] > 0 for c in p["clients"].values()) == 1]
    assert alone, "the scenario should have a round where only one client had samples"
    for p, s in zip(plain, secure, strict=True):
        if p["round"] in alone:
            assert not s["aggregated"]
            assert "only 1 of its 3 clients had new samples" in s["aggregation_error"]
        else:
            assert s["aggregated"] == p["aggregated"], s.get("aggregation_error")
    noised = ["privacy.enabled=true", "privacy.noise_multiplier=0.5"]
    _, private, _ = _run(tmp_path / "n", [*slow, "secure_aggregation.enabled=true", *noised])
    assert all(r["aggregated"] for r in private if r["round"] in alone)


def test_a_low_order_key_offer_is_refused_and_fails_no_honest_neighbour(tmp_path):
    # Handed to its neighbours, a key with no shared secret failed every one of their
    # rounds (and named them, not the offender).
    def low_order(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if node == 1003 and rec is not None and "enc-pub" in rec:
            rec["mask-pub"] = (1).to_bytes(32, "little")  # a point of small order
        return reply

    _, records, _ = _run(
        tmp_path, ["secure_aggregation.enabled=true", "federation.rounds=2"], low_order
    )
    for rec in records:
        assert rec["aggregated"], rec.get("aggregation_error")
        assert rec["clients_ok"] == 5
        [failure] = rec["failures"]
        assert failure["node"] == 1003 and failure["stage"] == "keys"
        assert "low order" in failure["reason"]


def test_below_threshold_the_round_fails_and_the_model_is_kept(tmp_path):
    def drop_most_in_round_2(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if rec is not None and m.MASKED in reply.content and rec["round"] == 2 and node > 1001:
            return None  # four of six never arrive
        return reply

    _, records, models = _run(
        tmp_path, ["secure_aggregation.enabled=true", "evaluation.every=1"], drop_most_in_round_2
    )
    assert records[0]["aggregated"] and records[2]["aggregated"]
    assert not records[1]["aggregated"]
    assert "threshold" in records[1]["aggregation_error"]
    assert records[1]["examples"] == 0  # the sum was never opened: no metrics either
    np.testing.assert_array_equal(models[1], models[0])  # previous global model kept
    assert not np.array_equal(models[2], models[1])


def test_holders_silent_in_a_failed_unmask_trip_are_named_as_failures(tmp_path):
    # Devices killed between their masked input and the unmask trip: the round failed on
    # a timeout with no failures listed, so nothing named them.
    def no_answers_from_three(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        unmask = rec is not None and m.MASKED not in reply.content and "enc-pub" not in rec
        return None if unmask and node > 1002 else reply

    _, records, _ = _run(tmp_path, ["secure_aggregation.enabled=true", "federation.rounds=1"],
                         no_answers_from_three)
    [first] = records
    assert not first["aggregated"] and "shares" in first["aggregation_error"]
    silent = [f for f in first["failures"] if f["stage"] == "unmask"]
    assert sorted(f["node"] for f in silent) == [1003, 1004, 1005]
    assert {f["reason"] for f in silent} == {"no reply before timeout"}
    assert all(f["client"] is not None for f in silent)


def test_a_client_unmasks_a_round_only_once(tmp_path):
    grid, _, _ = _run(tmp_path, ["secure_aggregation.enabled=true"])
    unmask = [
        msg for msg in grid.sent
        if m.CONFIG in msg.content and msg.content[m.CONFIG].get(m.QUERY_KIND) == m.UNMASK
    ][-1]
    node = unmask.metadata.dst_node_id
    with pytest.raises(Exception, match="already unmasked"):
        grid.app(unmask, grid.contexts[node])


def test_a_mask_key_masks_once(tmp_path):
    # A second memo of a round would buy a second unmask answer: the self mask from one
    # survivor set, the pair masks from another, and the client's update in clear. The
    # round sent again finds its mask key used up.
    grid, _, _ = _run(tmp_path, ["secure_aggregation.enabled=true"])
    train = [msg for msg in grid.sent if m.SECAGG in msg.content.config_records][-1]
    with pytest.raises(Exception, match=m.KEYS_LOST):
        grid.app(train, grid.contexts[train.metadata.dst_node_id])


def test_a_setup_that_cannot_be_masked_under_is_refused_before_training():
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedstream.client.secure import SecureAggregationError, make_secure_aggregation_mod
    from fedstream.protocol import keyschedule as ks
    from fedstream.protocol import secagg_wire as wire

    mod, ctx = make_secure_aggregation_mod(seed=0), Context(1, 1, {}, RecordDict(), {})
    keys = mod(Message(RecordDict({m.CONFIG: ConfigRecord({m.QUERY_KIND: m.KEYS})}), dst_node_id=1,
                       message_type=MessageType.QUERY), ctx, None)
    trained: list[Message] = []
    low_order = bytes(32)  # an X25519 point of small order: no key agreement with it
    for peers, why in (({}, "no neighbours but itself"), ({2: low_order}, "bad round setup")):
        setup = ConfigRecord({
            "protocol": wire.PROTOCOL, "session": b"s" * 16, "round": 1, "index": 1,
            "threshold": 2, "bits": 32, "clip": 1.0, "parties": 2, "tail-len": len(m.TAIL),
            "peers": list(peers), "peer-enc": [ks.public_key(ks.new_private_key())] * len(peers),
            "peer-mask": list(peers.values()), "mask-pub": keys.content[m.SECAGG]["mask-pub"],
            "max-weight": 1,
        })
        msg = Message(RecordDict({m.SECAGG: setup}), dst_node_id=1,
                      message_type=MessageType.TRAIN)
        with pytest.raises(SecureAggregationError, match=why):
            mod(msg, ctx, lambda msg, _ctx: trained.append(msg))
    assert trained == []  # the device spent none of its samples


def test_dropouts_before_training_are_survived(tmp_path):
    _, records, _ = _run(
        tmp_path, ["secure_aggregation.enabled=true", "simulation.dropout=0.3", "seed=3"]
    )
    assert all(r["aggregated"] for r in records if r["clients_ok"] >= 4)
    assert sum(len(r["failures"]) for r in records) > 0
    for r in records:
        if r["aggregated"]:
            assert r["clients_ok"] == r["clients_sampled"] - len(r["failures"])


def test_replies_are_folded_a_few_at_a_time_however_many_are_ready(tmp_path):
    # The loopback grid answers at push time: every reply of a trip is ready at the first
    # pull. The server must still ask for (and so hold) at most PULL_GROUP of them at once.
    from fedstream.server import grid as grid_module

    cfg = load(None, [*BASE, "federation.clients=9", "secure_aggregation.enabled=true"])
    grid = LoopbackGrid(sim_client_app(cfg), cfg.federation.clients)
    pulled: list[int] = []
    pull = grid.pull_messages

    def counting_pull(ids):
        got = pull(ids)
        pulled.append(sum(m.MASKED in reply.content for reply in got))  # model-sized replies
        return got

    grid.pull_messages = counting_pull  # type: ignore[method-assign]
    records: list[dict] = []
    run_federation(
        grid, cfg, federation(cfg).initial_arrays(), tmp_path,
        on_round=lambda rec, _h: records.append(rec),
    )
    assert all(r["aggregated"] and r["clients_ok"] == 9 for r in records)
    assert max(pulled) == grid_module.PULL_GROUP < 9


def _run_with_late_replies(tmp_path, overrides, late):
    """A federation in which the replies `late(node, reply)` picks arrive only after their
    round is over (held back, then put on the grid). Returns the grid, the round records
    and the ids of the messages the last round sent."""
    cfg = load(None, [*BASE, *overrides])
    held: list[Message] = []

    def hold_back(node, reply):
        if late(node, reply):
            held.append(reply)
            return None
        return reply

    grid = LoopbackGrid(sim_client_app(cfg), cfg.federation.clients, hold_back)
    records: list[dict] = []
    sent_before = [0]  # messages sent before each round

    def deliver_late(rec, _history):
        records.append(rec)
        sent_before.append(len(grid.sent))
        for reply in held:
            grid.inbox[reply.metadata.reply_to_message_id] = reply
        held.clear()

    run_federation(grid, cfg, federation(cfg).initial_arrays(), tmp_path, on_round=deliver_late)
    assert len(records) == cfg.federation.rounds
    last_round = {msg.metadata.message_id for msg in grid.sent[sent_before[-2] :]}
    return grid, records, last_round


def test_the_unmask_stage_ends_once_the_sum_can_be_unmasked(tmp_path):
    # Six clients, t = 4: two holders answer the unmask query only after the round. The
    # server must not wait for them (the timeout is a minute), and must later pull their
    # answers off the grid, unread.
    def unmask_answer_of_clients_4_and_5(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        return rec is not None and "senders" in rec and node in (1004, 1005)

    _, plain, _ = _run(tmp_path / "p")
    grid, records, last_round = _run_with_late_replies(
        tmp_path / "s",
        ["federation.round_timeout=60", "secure_aggregation.enabled=true"],
        unmask_answer_of_clients_4_and_5,
    )
    assert all(r["aggregated"] and not r["failures"] for r in records)
    assert [r["examples"] for r in records] == [r["examples"] for r in plain]
    for s, p in zip(records, plain, strict=True):
        assert abs(s["accuracy"] - p["accuracy"]) < 0.005
    assert all(r["stage_seconds"]["unmask"] < 30 for r in records)  # not the 60 s timeout
    # Each round's late answers were pulled at the start of the next: only the last
    # round's are still on the grid.
    assert len(grid.inbox) == 2 and set(grid.inbox) <= last_round


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secure"])
def test_a_model_update_that_comes_after_its_round_is_pulled_off_the_grid(tmp_path, secure):
    # Client 5's update always arrives after its round's timeout. The round goes on without
    # it; the next round pulls it off the grid unread, so late updates never pile up on a
    # SuperLink.
    def update_of_5(node, reply):
        return node == 1005 and reply.metadata.message_type == MessageType.TRAIN

    grid, records, last_round = _run_with_late_replies(
        tmp_path, [f"secure_aggregation.enabled={str(secure).lower()}"], update_of_5
    )
    assert all(r["aggregated"] and r["clients_ok"] == 5 for r in records)
    # Only the last round's late replies are left: its late update (and, secure, the unmask
    # answers it did not need).
    late_updates = [
        msg.metadata.message_id for msg in grid.sent
        if msg.metadata.dst_node_id == 1005 and msg.metadata.message_type == MessageType.TRAIN
    ]
    assert late_updates[-1] in grid.inbox
    assert set(grid.inbox) <= last_round


def test_with_partial_participation_keys_are_fetched_ahead_and_later_rounds_take_two_trips(
    tmp_path,
):
    # Three of six clients a round. Round 1 asks the three unsampled nodes for their keys
    # too, without waiting: their offers come only after the round, are read at the start
    # of the next, and a node sampled later needs no keys trip of its own.
    offers = []

    def offers_after_the_first_three(_node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if rec is None or "enc-pub" not in rec:
            return False
        offers.append(reply)
        return len(offers) > 3

    grid, records, _ = _run_with_late_replies(
        tmp_path,
        ["federation.fraction=0.5", "federation.round_timeout=60",
         "secure_aggregation.enabled=true"],
        offers_after_the_first_three,
    )
    assert len(offers) == 6  # every node asked once, in round 1
    trained = [m_.metadata.dst_node_id for m_ in grid.sent
               if m_.metadata.message_type == MessageType.TRAIN]
    rounds = [set(trained[i : i + 3]) for i in range(0, len(trained), 3)]
    assert any(r - rounds[0] for r in rounds[1:])  # later rounds sample nodes round 1 did not
    assert all(r["aggregated"] and not r["failures"] for r in records)
    assert [r["round_trips"] for r in records] == [3, 2, 2, 2]
    assert all(r["stage_seconds"]["keys"] < 30 for r in records)  # the late offers not awaited


def test_a_node_silent_in_the_keys_trip_is_named_and_its_late_offer_is_used(tmp_path):
    # Client 5's key offer comes only after round 1 (timeout 0.3 s): round 1 names it as
    # silent at the keys stage and goes on with five; round 2 reads the late offer and
    # includes it without a keys trip.
    held = []

    def first_offer_of_5(node, reply):
        rec = reply.content.config_records.get(m.SECAGG)
        if node == 1005 and rec is not None and "enc-pub" in rec and not held:
            held.append(reply)
            return True
        return False

    _, records, _ = _run_with_late_replies(
        tmp_path, ["secure_aggregation.enabled=true"], first_offer_of_5
    )
    first, second = records[0], records[1]
    assert first["aggregated"] and first["clients_ok"] == 5
    # It never answered, so only its Flower node id can name it.
    assert [(f["stage"], f["client"], f["node"], f["reason"]) for f in first["failures"]] == [
        ("keys", None, 1005, "no reply before timeout")
    ]
    assert second["aggregated"] and second["clients_ok"] == 6 and not second["failures"]
    assert [r["round_trips"] for r in records] == [3, 2, 2, 2]


@pytest.mark.parametrize("secure", [False, True])
def test_a_round_nobody_answered_in_time_names_the_timeout(tmp_path, secure):
    # "no client update to aggregate" alone reads like a data problem; when every client
    # was silent, the reason names the setting to change.
    overrides = ["federation.rounds=1", *(["secure_aggregation.enabled=true"] * secure)]
    _, records, _ = _run(tmp_path, overrides, tamper=lambda _node, _reply: None)
    (record,) = records
    assert not record["aggregated"] and record["clients_ok"] == 0
    assert "no client replied within federation.round_timeout (0.3 s)" in (
        record["aggregation_error"]
    )


def test_a_round_every_client_failed_in_names_their_common_error(tmp_path, monkeypatch):
    def train_round(*_args, **_kwargs):
        raise ValueError("no such column 'x'")

    monkeypatch.setattr("fedstream.client.app.train_round", train_round)
    _, records, _ = _run(tmp_path, ["federation.rounds=1"])
    assert records[0]["aggregation_error"] == (
        "no client update to aggregate: every client failed with ValueError: no such column 'x'"
    )


@pytest.mark.parametrize("secure", [False, True])
def test_a_round_every_client_dropped_from_names_the_kind_of_failure(tmp_path, secure):
    # Each dropout's reason names its own client, so no two were "the same reason", and
    # a round in which all dropped said only "no client update to aggregate".
    overrides = ["federation.rounds=1", "federation.clients=3", "simulation.dropout=1.0",
                 *(["secure_aggregation.enabled=true"] * secure)]
    _, records, _ = _run(tmp_path, overrides)
    error = records[0]["aggregation_error"]
    assert "every client failed with ClientUnavailable, e.g. ClientUnavailable: client 0 " \
           "is offline in round 1" in error, error


def test_sparse_rings_with_dropouts_repeat_and_failed_rounds_name_real_clients(tmp_path):
    # 12 clients on a ring of 4 neighbours: which rounds can be unmasked depends on the
    # ring, which a simulation draws from the seed. A round that cannot be unmasked names
    # the client whose masks it misses by its client id, one that sent its update.
    overrides = [
        "federation.clients=12", "federation.rounds=5", "secure_aggregation.enabled=true",
        "secure_aggregation.degree=4", "simulation.dropout=0.35", "seed=0",
    ]
    runs = [_run(tmp_path / str(i), overrides)[1] for i in range(2)]
    strip = ("seconds", "stage_seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in strip} for r in runs[0]] == [
        {k: v for k, v in r.items() if k not in strip} for r in runs[1]
    ]
    missing = [r for r in runs[0] if "shares of" in r.get("aggregation_error", "")]
    assert missing, "the scenario should leave a round short of shares"
    for r in missing:
        named = re.search(r"shares of (client|party|node) (\d+)'s", r["aggregation_error"])
        assert named and named.group(1) == "client", r["aggregation_error"]
        # Only a client whose update arrived has its self-mask rebuilt.
        assert int(named.group(2)) not in {
            f["client"] for f in r["failures"] if f["stage"] != "unmask"
        }


def _totals(**changes: int) -> dict[str, int]:
    """The tail totals of 5 honest clients with 100 examples each (max_weight 1000)."""
    honest = dict.fromkeys(m.TAIL, 0) | {
        "contributors": 5, "with-samples": 5, "examples": 500, "weight": 500
    }
    return honest | changes


def test_unmasked_totals_that_no_honest_clients_could_sum_to_fail_the_round():
    from fedstream.server.secure import _odd_totals

    assert _odd_totals(_totals(), 1000) is None
    assert _odd_totals(_totals(weight=0, examples=0, **{"with-samples": 0}), 1000) is None
    assert _odd_totals(_totals(**{"with-samples": 2}), 1000) is None  # three had nothing new
    assert _odd_totals(_totals(privatised=5, weight=5000), 1000) is None  # all weigh in full
    # A client that took 499 off the weight would have scaled the whole mean up 500 times.
    assert "weight = 1" in _odd_totals(_totals(weight=1), 1000)
    assert "weight = 900" in _odd_totals(_totals(weight=900), 1000)  # above the examples
    assert "weight = 4999" in _odd_totals(_totals(privatised=5, weight=4999), 1000)
    assert "examples = -3" in _odd_totals(_totals(examples=-3), 1000)
    assert "privatised = 6" in _odd_totals(_totals(privatised=6), 1000)
    assert _odd_totals(_totals(**{"loss-sum-fp": -7}), 1000) is None  # a loss may be negative
    # Clients with samples: no more than the clients, none exactly when no examples.
    assert "6 of 5 clients with samples" in _odd_totals(_totals(**{"with-samples": 6}), 1000)
    assert "0 of 5 clients with samples" in _odd_totals(_totals(**{"with-samples": 0}), 1000)
    assert "3 of 5" in _odd_totals(_totals(weight=0, examples=0, **{"with-samples": 3}), 1000)
    # No predictor is right more often than there were examples to predict.
    for key in ("correct", "no-change-correct", "majority-correct"):
        assert _odd_totals(_totals(**{key: 500}), 1000) is None
        assert f"{key} = 501 of 500 examples" in _odd_totals(_totals(**{key: 501}), 1000)


def test_unmasked_class_tallies_that_no_honest_clients_could_sum_to_fail_the_round():
    from fedstream.server.secure import _odd_classes

    totals = _totals(correct=300)
    honest = np.array([[200, 300], [250, 250], [100, 200]])  # labels, predicted, right
    assert _odd_classes(honest, totals) is None
    for forged, said in (
        ([[200, 301], [250, 250], [100, 200]], "501 labels and 500 predictions"),
        ([[200, 300], [250, 251], [100, 200]], "500 labels and 501 predictions"),
        ([[200, 300], [250, 250], [100, 199]], "299 right by class, 300 correct"),
        ([[200, 300], [100, 400], [150, 150]], "300 right by class"),  # right > predicted
        ([[-1, 501], [250, 250], [100, 200]], "a class count below 0 or above the 500"),
        # Counts that wrap around int64 to the right totals: each above the examples.
        ([[2**62, 2**62, 2**62, 2**62 + 500], [250, 250, 0, 0], [100, 200, 0, 0]],
         "above the 500 examples"),
    ):
        assert said in _odd_classes(np.array(forged), totals)
    # Every sample labelled 0 and predicted 0, yet none right: below what both imply.
    assert "0 right by class, 0 correct" in _odd_classes(np.array([[500, 0], [500, 0], [0, 0]]),
                                                         _totals(correct=0))


def test_devices_scoring_other_classes_than_the_server_fail_the_round_with_a_reason(tmp_path):
    """A server whose stream.n_classes is not the devices': their tallies would not fit the
    round's tail, and each says so instead of summing to nonsense."""
    cfg = load(None, [*BASE, "federation.rounds=1", "secure_aggregation.enabled=true"])
    records: list[dict] = []
    run_federation(LoopbackGrid(sim_client_app(cfg), 6), cfg, federation(cfg).initial_arrays(),
                   tmp_path, on_round=lambda rec, _h: records.append(rec), n_classes=3)
    (rec,) = records
    assert not rec["aggregated"] and len(rec["failures"]) == 6
    scores = federation(cfg).n_classes
    assert {f["reason"] for f in rec["failures"]} == {
        f"SecureAggregationError: this client scores {scores} classes, the server's round "
        "counts 3: set the same stream.n_classes on server and devices"}


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf"), 1e300, -1e300])
def test_a_diverged_loss_cannot_wrap_the_summed_tail(loss):
    from fedstream.client.secure import _bounded

    for parties in (2, 128, 10_000):
        fp = round(_bounded(loss, parties) * m.FIXED_POINT)
        assert parties * abs(fp) <= 2**62


def test_a_device_keeps_memos_of_its_latest_rounds_only(tmp_path):
    # A server that never asks to unmask leaves a memo per round behind on the device. It
    # keeps the latest ROUNDS_KEPT; a request about an older round is refused (an evicted
    # memo can only make a device refuse, never answer twice).
    from fedstream.client import secure
    from fedstream.protocol import keyschedule as ks

    grid, _, _ = _run(tmp_path, ["secure_aggregation.enabled=true", "federation.rounds=1"])
    train = next(msg for msg in grid.sent if m.SECAGG in msg.content)
    node, ctx = train.metadata.dst_node_id, grid.contexts[train.metadata.dst_node_id]
    unmask = next(
        msg for msg in grid.sent
        if msg.metadata.dst_node_id == node and m.CONFIG in msg.content
        and msg.content[m.CONFIG].get(m.QUERY_KIND) == m.UNMASK
    )
    assert secure._state(ctx)["rounds"] == []  # round 1: answered, its memo used up
    mask_pub = ks.public_key(secure._state(ctx)["mask-sks"][-1])  # the key it offered last
    last = 2 + secure.ROUNDS_KEPT
    for server_round in range(2, last + 1):  # rounds the server never unmasks
        msg = copy.deepcopy(train)
        msg.content[m.SECAGG]["round"] = server_round
        msg.content[m.SECAGG]["mask-pub"] = mask_pub  # the key this device offered last
        reply = grid.app(msg, ctx)
        assert not reply.has_error(), reply.error
        mask_pub = reply.content[m.SECAGG]["next-mask-pub"]
    kept = [memo.server_round for memo in secure._state(ctx)["rounds"]]
    assert kept == list(range(last - secure.ROUNDS_KEPT + 1, last + 1))
    evicted = copy.deepcopy(unmask)
    evicted.content[m.CONFIG]["round"] = 2
    with pytest.raises(Exception, match="round 2 is not a round this device masked in"):
        grid.app(evicted, ctx)

"""One round of fedstream's secure aggregation, in one process: the protocol as a library.

    python examples/secure_sum.py

Five parties on a complete graph, threshold 3; party 4 drops after the keys are out, so
its pair masks must be removed through the survivors' shares. What runs here is what the
Flower mod and the server run, without the transport: the server's `Aggregation`, each
party's `masked_update` (clip -> quantize -> mask), and each holder's `answer`.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedstream.client.secure import masked_update
from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import secagg, updates
from fedstream.protocol.fixedpoint import Quantizer

PARTIES, THRESHOLD, SIZE, DROPPED = 5, 3, 1000, 4


def main() -> None:
    rng = np.random.default_rng(0)
    # Each party's long-lived encryption key and this round's mask key (X25519).
    enc = {u: ks.new_private_key() for u in range(1, PARTIES + 1)}
    mask = {u: ks.new_private_key() for u in range(1, PARTIES + 1)}
    peers = {u: secagg.Peer(ks.public_key(enc[u]), ks.public_key(mask[u])) for u in enc}

    # Server: the round's setup (a 32-bit ring, updates clipped to [-1, 1]).
    agg = secagg.Aggregation(
        session=secrets.token_bytes(16), server_round=1,
        quantizer=Quantizer(bits=32, clip=1.0, parties=PARTIES), threshold=THRESHOLD,
        graph=secagg.neighbour_graph(PARTIES, degree=0), peers=peers, size=SIZE,
        tail_len=m.tail_len(2), max_weight=100,
    )

    # Trip 1, parties: train (here: a random model change), then clip -> quantize -> mask.
    model = updates.record({"w": np.zeros(SIZE, dtype=np.float32)})
    plain = np.zeros(SIZE)
    memo = {}  # what each party keeps of the round, to check the unmask request against
    for u in range(1, PARTIES + 1):
        change = rng.normal(0, 0.01, SIZE).astype(np.float32)
        trained = updates.record({"w": change})
        report = m.TrainReport(client=u, examples=100, correct=60, loss_sum=40.0,
                                classes=[50, 50, 55, 45, 35, 25])  # 2 classes' tallies
        setup = agg.setup_for(u)
        masked = masked_update(
            model, trained, report, setup, enc[u], secagg.mask_seeds(setup, mask[u])
        )
        memo[u] = secagg.RoundMemo.of(setup)
        if u == DROPPED:
            continue  # its masked input never arrives
        agg.accept(masked)  # the server folds it into one ring-sized sum
        plain += change

    # Trip 2, survivors: each holder reveals the shares the server may have (self-mask
    # seeds of survivors, pair seeds with the dropped party), nothing more.
    agg.check_survivors()
    for h in sorted(agg.survivors):
        agg.take(secagg.answer(agg.request_for(h), memo[h], enc[h]))
    assert agg.ready()

    ring, tail = agg.result()  # the unmasked sum: the only thing the server learns
    # Each update was weighed by min(examples, max_weight) / max_weight = 1 before rounding.
    total = agg.q.decode(ring)
    totals = dict(zip(m.TAIL, tail.astype(np.int64).tolist(), strict=False))  # class tally after
    error = float(np.max(np.abs(total - plain)))
    print(f"survivors {sorted(agg.survivors)}, party {DROPPED} dropped")
    print(f"summed examples {totals['examples']}, contributors {totals['contributors']}")
    print(f"largest difference from the plaintext sum: {error:.2e}")


if __name__ == "__main__":
    main()

"""Secure aggregation (protocol/secagg.py with shamir.py, fixedpoint.py and secagg_wire.py).

Covered: the unmasked sum equals the survivors' plaintext sum (quantization error only, tail
exact) for random federations, graphs, thresholds and dropouts at every stage, and the round
fails exactly when the survivors are too few or split or some needed secret lacks t
answering holders (expectation computed here from the graph, not by the code's own check);
Shamir reconstruction and its failure below threshold; recovery against the commitment
despite a tampered share; a client's masked vector is uniform over the ring and uncorrelated
with its update; every rejection of `accept`, `answer` and `take` (folding nothing); the
holder's privacy rule; the neighbour graph and threshold rule; fixed-point encoding; and the
Flower-record wire format with its validation.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedstream.client import secure
from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol import secagg as sa
from fedstream.protocol import secagg_wire as wire
from fedstream.protocol import shamir
from fedstream.protocol.fixedpoint import Encoder, Quantizer, ring_dtype

SESSION = bytes(range(16))
ROUND = 5
SELF = sa.SELF
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sk(kind: str, u: int) -> bytes:
    """A fixed X25519 private key per (kind, party), so runs are reproducible."""
    return hashlib.sha256(f"{kind}/{u}".encode()).digest()


def _memo(agg: sa.Aggregation, u: int) -> sa.RoundMemo:
    """What party u kept of the round when it masked (its check on the unmask request)."""
    return sa.RoundMemo.of(agg.setup_for(u))


_PUB: dict[tuple[str, int], bytes] = {}


def _pub(kind: str, u: int) -> bytes:
    if (kind, u) not in _PUB:
        _PUB[kind, u] = ks.public_key(_sk(kind, u))
    return _PUB[kind, u]


def _encode(
    q: Quantizer, values, rng: np.random.Generator, weight: float = 1.0
) -> tuple[np.ndarray, int]:
    """A whole vector through the client's `Encoder` in one piece: ring elements and the
    clipped count."""
    encoder = Encoder(q, rng, weight)
    x = np.array(values, dtype=np.float64)
    ring = np.empty(x.shape, dtype=q.dtype)
    encoder(x, ring)
    return ring, encoder.clipped


def _mask_whole(
    setup: sa.RoundSetup, enc_sk: bytes, mask_sk: bytes, ring: np.ndarray, tail: Sequence[int]
) -> sa.MaskedInput:
    """Trip 1 for an update encoded whole: the composition `client.secure.masked_update`
    runs piece by piece as it encodes (seeds, signed masks, shares and commitments)."""
    seeds = sa.mask_seeds(setup, mask_sk)
    y = np.array(ring, dtype=setup.quantizer.dtype, copy=True)
    y_tail = sa.tail_words(tail)
    masks = sa.Masks(setup.quantizer, sa.signed(setup, seeds))
    masks.add(y)
    masks.add_tail(y_tail)
    return sa.sealed(setup, enc_sk, seeds, y, y_tail)


def _keystream(seed: bytes, nbytes: int) -> bytes:
    out = np.empty(nbytes, dtype=np.uint8)
    ks.Keystream(seed).into(out)
    return out.tobytes()


def _peers(n: int, mask_kind: str = "mask") -> dict[int, sa.Peer]:
    return {u: sa.Peer(_pub("enc", u), _pub(mask_kind, u)) for u in range(1, n + 1)}


def _ring_graph(order: Sequence[int], k: int) -> dict[int, list[int]]:
    """`k` neighbours per party, k/2 either side on the ring `order` (all when k = n - 1)."""
    n = len(order)
    if k >= n - 1:
        return {u: sorted(w for w in order if w != u) for u in order}
    graph: dict[int, set[int]] = {u: set() for u in order}
    for pos, u in enumerate(order):
        for step in range(1, k // 2 + 1):
            w = order[(pos + step) % n]
            graph[u].add(w)
            graph[w].add(u)
    return {u: sorted(ws) for u, ws in graph.items()}


def _aggregation(
    n: int,
    t: int,
    *,
    graph: Mapping[int, Sequence[int]] | None = None,
    q: Quantizer | None = None,
    size: int = 8,
    tail_len: int = 2,
    server_round: int = ROUND,
    mask_kind: str = "mask",
) -> sa.Aggregation:
    return sa.Aggregation(
        SESSION,
        server_round,
        q or Quantizer(32, 1.0, n),
        t,
        graph or _ring_graph(range(1, n + 1), n - 1),
        _peers(n, mask_kind),
        size,
        tail_len,
    )


def _mask(
    agg: sa.Aggregation,
    u: int,
    x: np.ndarray | None = None,
    tail: Sequence[int] | None = None,
    mask_kind: str = "mask",
) -> sa.MaskedInput:
    x = np.full(agg.size, 0.25 * u / len(agg.graph)) if x is None else x
    ring, _ = _encode(agg.q, x, np.random.default_rng(u))
    tail = [u, -u, 7][: agg.tail_len] if tail is None else tail
    return _mask_whole(agg.setup_for(u), _sk("enc", u), _sk(mask_kind, u), ring, tail)


def _connected(nodes: set[int], graph: Mapping[int, Sequence[int]]) -> bool:
    """Union-find over the subgraph induced by `nodes`."""
    parent = {u: u for u in nodes}

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for u in nodes:
        for w in graph[u]:
            if w in nodes:
                parent[find(u)] = find(w)
    return len({find(u) for u in nodes}) <= 1


def _within(q: Quantizer, got: np.ndarray, want: np.ndarray, steps: int) -> bool:
    """|got - want| <= `steps` ring steps everywhere, give or take float64 noise in `want`
    (which only matters for rings wider than about 40 bits)."""
    noise = 8 * np.finfo(np.float64).eps * (np.abs(want).max() + q.parties * q.clip)
    return bool(np.abs(got - want).max() <= steps / q.scale + noise)


def _state(agg: sa.Aggregation) -> tuple:
    return (
        agg.acc.tobytes(),
        agg.acc_tail.tobytes(),
        set(agg.survivors),
        copy.deepcopy(agg.commitments),
        copy.deepcopy(agg.ciphertexts),
        copy.deepcopy(agg.shares),
    )


def _unmask_all(agg: sa.Aggregation, answering: Sequence[int] | None = None) -> None:
    agg.check_survivors()
    for h in sorted(agg.survivors if answering is None else answering):
        agg.take(sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h)))


def _other_dtype(mi: sa.MaskedInput) -> np.ndarray:
    return mi.model.astype(np.uint16 if mi.model.dtype == np.uint8 else np.uint8)


# Ways a masked input must be refused, each a copy of a good one with one thing wrong.
TAMPERS: dict[str, Callable[[sa.MaskedInput], sa.MaskedInput]] = {
    "other session": lambda mi: replace(mi, session=bytes(16)),
    "other round": lambda mi: replace(mi, server_round=mi.server_round + 1),
    "unknown party": lambda mi: replace(mi, index=99),
    "other mask key": lambda mi: replace(mi, mask_pub=_pub("other", mi.index)),
    "float model": lambda mi: replace(mi, model=mi.model.astype(np.float64)),
    "other ring dtype": lambda mi: replace(mi, model=_other_dtype(mi)),
    "model as list": lambda mi: replace(mi, model=mi.model.tolist()),
    "short model": lambda mi: replace(mi, model=mi.model[:-1]),
    "long model": lambda mi: replace(mi, model=np.append(mi.model, mi.model[:1])),
    "2-d model": lambda mi: replace(mi, model=mi.model.reshape(1, -1)),
    "long tail": lambda mi: replace(mi, tail=np.append(mi.tail, np.uint64(0))),
    "2-d tail": lambda mi: replace(mi, tail=mi.tail.reshape(1, -1)),
    "signed tail": lambda mi: replace(mi, tail=mi.tail.astype(np.int64)),
    "missing commitment": lambda mi: replace(
        mi, commitments={k: v for k, v in mi.commitments.items() if k != SELF}
    ),
    "extra commitment": lambda mi: replace(mi, commitments={**mi.commitments, 99: bytes(32)}),
    "short commitment": lambda mi: replace(mi, commitments={**mi.commitments, SELF: bytes(31)}),
    "missing share": lambda mi: replace(
        mi, shares={h: c for h, c in mi.shares.items() if h != mi.index}
    ),
    "extra share": lambda mi: replace(mi, shares={**mi.shares, 99: b"x"}),
    "share not bytes": lambda mi: replace(mi, shares={**mi.shares, mi.index: "x"}),
}


# --- the sum, under dropouts at every stage ----------------------------------------------

FATES = ["ok"] * 5 + ["absent", "rejected", "silent"]  # silent: survives, never answers


@st.composite
def federations(draw: st.DrawFn) -> dict:
    n = draw(st.integers(2, 12))
    degree = draw(st.one_of(st.just(0), st.integers(1, max(1, n - 2))))
    k = sa.effective_degree(n, degree)
    group = k + 1
    return {
        "n": n,
        "graph": _ring_graph(draw(st.permutations(range(1, n + 1))), k),
        "t": draw(st.integers(group // 2 + 1, group)),
        "bits": draw(st.sampled_from([12, 16, 32])),
        "clip": draw(st.sampled_from([0.05, 1.0, 8.0])),
        "size": draw(st.integers(1, 300)),
        "tail_len": (tail_len := draw(st.integers(0, 3))),
        "tails": draw(
            st.lists(
                st.lists(st.integers(-(2**40), 2**40), min_size=tail_len, max_size=tail_len),
                min_size=n,
                max_size=n,
            )
        ),
        "fates": draw(st.lists(st.sampled_from(FATES), min_size=n, max_size=n)),
        "tampers": draw(st.lists(st.sampled_from(sorted(TAMPERS)), min_size=n, max_size=n)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fed=federations())
def test_sum_of_survivors_or_round_failed(fed: dict) -> None:
    n, graph, t, clip = fed["n"], fed["graph"], fed["t"], fed["clip"]
    q = Quantizer(fed["bits"], clip, n)
    agg = _aggregation(n, t, graph=graph, q=q, size=fed["size"], tail_len=fed["tail_len"])
    rng = np.random.default_rng(fed["seed"])
    xs = {}
    for u in range(1, n + 1):
        x = rng.uniform(-clip, clip, fed["size"])
        x[rng.random(fed["size"]) < 0.1] = clip  # the extremes too
        x[rng.random(fed["size"]) < 0.1] = -clip
        xs[u] = x
    fates = dict(zip(range(1, n + 1), fed["fates"], strict=True))
    for u in range(1, n + 1):
        if fates[u] == "absent":  # (a) never sends its masked input
            continue
        ring, clipped = _encode(q, xs[u], rng)
        assert clipped == 0
        mi = _mask_whole(agg.setup_for(u), _sk("enc", u), _sk("mask", u), ring, fed["tails"][u - 1])
        if fates[u] == "rejected":  # (b) its masked input is refused
            before = _state(agg)
            with pytest.raises(sa.Rejected):
                agg.accept(TAMPERS[fed["tampers"][u - 1]](mi))
            assert _state(agg) == before
            continue
        agg.accept(mi)
    survivors = {u for u, f in fates.items() if f in ("ok", "silent")}
    answering = {u for u, f in fates.items() if f == "ok"}  # (c) "silent" never answers
    assert agg.survivors == survivors

    if len(survivors) < t or not _connected(survivors, graph):
        event("fails: survivors too few or split")
        with pytest.raises(sa.RoundFailed):
            agg.check_survivors()
        return
    agg.check_survivors()
    # Every survivor's self mask is needed, and its pair seeds with dropped neighbours; all
    # are shared among the same holders: the survivor and its neighbours. The server may
    # stop waiting (`ready`) exactly once t of each survivor's holders have answered.
    answered: set[int] = set()
    for h in sorted(answering):
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        assert not ans.rejected
        agg.take(ans)
        answered.add(h)
        assert agg.ready() == all(len(answered & {u, *graph[u]}) >= t for u in survivors)
    recoverable = all(len(answering & {u, *graph[u]}) >= t for u in survivors)
    if not recoverable:
        event("fails: a secret lacks t answering holders")
        with pytest.raises(sa.RoundFailed):
            agg.result()
        return
    event("sum recovered")
    ring_sum, tail_sum = agg.result()
    truth = np.sum([xs[u] for u in survivors], axis=0)
    assert _within(q, q.decode(ring_sum), truth, len(survivors))  # one step per survivor
    expected_tail = [sum(fed["tails"][u - 1][i] for u in survivors) for i in range(fed["tail_len"])]
    assert tail_sum.dtype == sa.TAIL_DTYPE
    assert tail_sum.view(np.int64).tolist() == expected_tail


def test_survivor_silent_in_the_unmask_trip_costs_nothing() -> None:
    n, size = 6, 5000
    agg = _aggregation(n, 4, size=size, tail_len=3)
    rng = np.random.default_rng(1)
    xs = {u: rng.uniform(-1, 1, size) for u in range(1, n + 1)}
    for u in (1, 3, 4, 5, 6):  # 2 never sends
        agg.accept(_mask(agg, u, xs[u], [1, u, -u]))
    _unmask_all(agg, answering=[1, 3, 4, 6])  # 5 survives but never answers
    ring_sum, tail = agg.result()
    truth = sum(xs[u] for u in (1, 3, 4, 5, 6))
    assert _within(agg.q, agg.q.decode(ring_sum), truth, 5)
    assert tail.view(np.int64).tolist() == [5, 19, -19]


def test_the_sum_is_unmasked_once() -> None:
    # Unmasking works in place: a second call would take the masks out twice.
    agg = _aggregation(3, 2, size=40)
    for u in (1, 2, 3):
        agg.accept(_mask(agg, u, np.full(40, 0.25)))
    _unmask_all(agg)
    ring_sum, _ = agg.result()
    assert _within(agg.q, agg.q.decode(ring_sum), np.full(40, 0.75), 3)
    with pytest.raises(RuntimeError, match="already unmasked"):
        agg.result()


def test_split_survivors_fail_even_above_threshold() -> None:
    # Ring 1-2-3-4-5-6-1 with degree 2: dropping 1 and 4 leaves {2, 3} and {5, 6} apart.
    graph = _ring_graph(range(1, 7), 2)
    agg = _aggregation(6, 2, graph=graph)
    for u in (2, 3, 5, 6):
        agg.accept(_mask(agg, u))
    with pytest.raises(sa.RoundFailed, match="split"):
        agg.check_survivors()


# --- neighbour graph and threshold -------------------------------------------------------


@pytest.mark.parametrize(
    ("parties", "degree", "expected"),
    [(2, 0, 1), (10, 0, 9), (10, 3, 4), (10, 4, 4), (5, 3, 4), (10, 9, 9), (10, 20, 9), (99, 7, 8)],
)
def test_effective_degree(parties: int, degree: int, expected: int) -> None:
    assert sa.effective_degree(parties, degree) == expected


def _failed_rounds(parties: int, degree: int, t: int, dropout: float, trials: int) -> float:
    """The share of rounds, drawn here, where some survivor keeps fewer than t of its group."""
    rng, failed = random.Random(3), 0
    for _ in range(trials):
        graph = sa.neighbour_graph(parties, degree, rng)
        alive = {u for u in graph if rng.random() >= dropout}
        failed += any(1 + sum(w in alive for w in graph[u]) < t for u in alive)
    return failed / trials


def test_degree_0_widens_the_share_groups_for_the_dropout_expected() -> None:
    # At the default 10 % the O(log n) degree already keeps failures below 1 %: unchanged.
    for n, k in [(10, 9), (20, 14), (50, 18), (100, 20), (1000, 30)]:
        assert sa.round_shape(n, 0, 0.6, 0.0)[0] == sa.round_shape(n, 0, 0.6, 0.1)[0] == k
    # At 30 %, 20 clients on the log degree (14) lost 7 of 15 rounds in a trial; the groups
    # widen, and the rounds that still fail are the ones no degree can save at t = 0.6.
    k, t = sa.round_shape(20, 0, 0.6, 0.3)
    assert (k, t) == (19, 12)
    assert _failed_rounds(20, 14, 9, 0.3, 2000) > 0.25
    assert _failed_rounds(20, k, t, 0.3, 2000) < 0.15
    k, t = sa.round_shape(1000, 0, 0.6, 0.3)
    assert 30 < k < 999 and sa.dropout_failure(1000, k, t, 0.3) <= sa.ROUND_FAILURE
    # A set degree is kept, and a count threshold is never left at half a wider group.
    assert sa.round_shape(100, 10, 0.6, 0.3)[0] == 10
    assert sa.round_shape(100, 0, 12, 0.3) == (20, 12)


@pytest.mark.parametrize(("parties", "degree", "t"), [(20, 19, 12), (20, 14, 9), (50, 18, 12)])
def test_the_dropout_failure_estimate_errs_high(parties: int, degree: int, t: int) -> None:
    # Exact for a complete graph (every group is the survivors), high on a ring.
    estimate = sa.dropout_failure(parties, degree, t, 0.3)
    seen = _failed_rounds(parties, degree, t, 0.3, 1500)
    assert seen - 0.03 <= estimate and (degree < parties - 1 or estimate <= seen + 0.03)
    assert sa.dropout_failure(parties, degree, t, 0.0) == 0.0
    assert sa.dropout_failure(parties, degree, t, 1.0) == 1.0


@pytest.mark.parametrize("parties", [2, 3, 5, 8, 13, 30])
def test_neighbour_graph_is_regular_symmetric_and_connected(parties: int) -> None:
    for degree in range(parties + 1):
        graph = sa.neighbour_graph(parties, degree)
        k = sa.effective_degree(parties, degree)
        assert sorted(graph) == list(range(1, parties + 1))
        for u, ws in graph.items():
            assert len(ws) == len(set(ws)) == k and u not in ws
            assert all(u in graph[w] for w in ws)
        assert _connected(set(graph), graph)


def test_a_seeded_ring_repeats_and_an_unseeded_one_is_secret() -> None:
    # Simulations seed the ring (a run must repeat); deployments draw it from the OS, so
    # nobody can know a victim's neighbours before choosing whom to corrupt.
    seeded = [sa.neighbour_graph(30, 4, random.Random("s/1")) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert sa.neighbour_graph(30, 4, random.Random("s/2")) != seeded[0]
    assert len({str(sa.neighbour_graph(30, 4)) for _ in range(5)}) == 5


@pytest.mark.parametrize(("group", "valid"), [(2, [2]), (4, [3, 4]), (5, [3, 4, 5]), (9, [5, 9])])
def test_threshold_must_exceed_half_the_group_and_fit(group: int, valid: list[int]) -> None:
    for t in valid:
        sa.check_threshold(t, group)
    for t in (group // 2, group + 1, 0):
        with pytest.raises(ValueError, match="threshold"):
            sa.check_threshold(t, group)


# --- Shamir ------------------------------------------------------------------------------

# Seeds enter the field with their top bit cleared (`field_seed`): 255 random bits.
FIELD_SECRETS = st.binary(min_size=32, max_size=32).map(sa.field_seed)


def test_shamir_refuses_a_secret_outside_the_field() -> None:
    with pytest.raises(ValueError, match="field"):
        shamir.split(b"\xff" * 32, [1, 2, 3], 2)
    assert sa.field_seed(b"\xff" * 32)[0] == 0x7F


@FAST
@given(secret=FIELD_SECRETS, n=st.integers(1, 10), data=st.data())
def test_shamir_any_t_shares_reconstruct(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, 2**40), min_size=n, max_size=n, unique=True))
    shares = shamir.split(secret, holders, t)
    assert set(shares) == set(holders)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    chosen = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=n, unique=True))
    assert shamir.reconstruct({x: shares[x] for x in chosen}) == secret


@FAST
@given(secret=FIELD_SECRETS, n=st.integers(2, 10), data=st.data())
def test_shamir_fewer_than_t_shares_reveal_nothing_usable(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(2, n))
    holders = list(range(1, n + 1))
    shares = shamir.split(secret, holders, t)
    chosen = data.draw(st.lists(st.sampled_from(holders), min_size=1, max_size=t - 1, unique=True))
    # A wrong secret, not an error: only the commitment can tell (secagg checks it).
    got = shamir.reconstruct({x: shares[x] for x in chosen})
    assert got != secret and len(got) == shamir.SHARE_BYTES


def test_shamir_refuses_bad_parameters() -> None:
    for holders, t in (([1, 2], 0), ([1, 2], 3), ([1, 1, 2], 2), ([0, 1], 1), ([-1, 2], 1)):
        with pytest.raises(ValueError):
            shamir.split(bytes(32), holders, t)
    for secret in (b"", bytes(31), bytes(33)):
        with pytest.raises(ValueError, match="a secret has 32 bytes"):
            shamir.split(secret, [1, 2], 2)
    good = shamir.split(bytes(32), [1, 2], 2)
    for bad in ({}, {1: good[1][:31], 2: good[2]}, {0: good[1], 2: good[2]},
                {1: b"\xff" * 32, 2: good[2]}):
        with pytest.raises(ValueError):
            shamir.reconstruct(bad)


def _lagrange_at_zero(xs: Sequence[int], j: int) -> int:
    num = den = 1
    for x in xs:
        if x != j:
            num = num * x % shamir.PRIME
            den = den * (x - j) % shamir.PRIME
    return num * pow(den, -1, shamir.PRIME) % shamir.PRIME


def _shift_secret_by_one(share: bytes, holders: Sequence[int], j: int) -> bytes:
    """Holder j's share changed so that `holders` reconstruct secret + 1: a valid-looking seed
    that only the commitment can tell from the real one."""
    delta = pow(_lagrange_at_zero(holders, j), -1, shamir.PRIME)
    value = (int.from_bytes(share, "big") + delta) % shamir.PRIME
    return value.to_bytes(shamir.SHARE_BYTES, "big")


@pytest.mark.parametrize("tamper", ["commitment", "garbage"])
@pytest.mark.parametrize("extra_honest", [False, True])
def test_tampered_share_is_caught_by_the_commitment(tamper: str, extra_honest: bool) -> None:
    n, t = 4, 3
    agg = _aggregation(n, t)
    xs = {u: np.full(agg.size, 0.1 * u) for u in range(1, n + 1)}
    for u in range(1, n + 1):
        agg.accept(_mask(agg, u, xs[u]))
    agg.check_survivors()
    answering = [1, 2, 3, 4] if extra_honest else [1, 2, 3]
    for h in answering:
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        if h == 1:
            share = ans.shares[(2, SELF)]
            if tamper == "commitment":
                ans.shares[(2, SELF)] = _shift_secret_by_one(share, [1, 2, 3], 1)
            else:
                ans.shares[(2, SELF)] = bytes(shamir.SHARE_BYTES - 1) + b"\x01"
        agg.take(ans)
    if tamper == "commitment":  # holders 1-3 give a well-formed seed, just not the real one
        seed = shamir.reconstruct({x: agg.shares[(2, SELF)][x] for x in (1, 2, 3)})
        assert ks.commitment(seed) != agg.commitments[2][SELF]
    if not extra_honest:
        assert not agg.ready()  # the server keeps waiting for another holder
        with pytest.raises(sa.RoundFailed, match="commitment"):
            agg.result()
        return
    assert agg.ready()
    ring_sum, _ = agg.result()  # one more honest share: another combination recovers
    assert _within(agg.q, agg.q.decode(ring_sum), sum(xs.values()), n)


def _answered(n: int, t: int, tamper: Callable[[int, sa.UnmaskAnswer], None]) -> sa.Aggregation:
    """A round of n parties, all surviving, whose holders' answers `tamper` may change."""
    agg = _aggregation(n, t)
    for u in range(1, n + 1):
        agg.accept(_mask(agg, u))
    agg.check_survivors()
    for h in range(1, n + 1):
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        tamper(h, ans)
        agg.take(ans)
    return agg


def test_one_tampered_share_among_many_honest_ones_does_not_fail_the_round() -> None:
    # Default config with 10 clients: complete graph, t = 6; 9 honest holders answer.
    def one_share(h: int, ans: sa.UnmaskAnswer) -> None:
        if h == 1:
            ans.shares[(5, SELF)] = bytes(shamir.SHARE_BYTES - 1) + b"\x01"

    agg = _answered(10, 6, one_share)
    ring_sum, _ = agg.result()
    plain = sum(np.full(agg.size, 0.25 * u / 10) for u in range(1, 11))  # `_mask`'s inputs
    assert _within(agg.q, agg.q.decode(ring_sum), plain, 10)
    assert agg.tamperers == {1}


def test_a_tampered_share_outside_the_first_t_is_still_named() -> None:
    # The first t holders rebuild every secret at once; the last holder's shares, off the
    # polynomials, are checked against them all the same.
    def last_holder(h: int, ans: sa.UnmaskAnswer) -> None:
        if h == 8:
            ans.shares = {k: bytes(a ^ 1 for a in v[:1]) + v[1:] for k, v in ans.shares.items()}

    agg = _answered(8, 5, last_holder)
    assert agg.ready() and agg.tamperers == {8}
    agg.result()


def test_holders_that_tamper_with_every_share_are_found_and_left_out() -> None:
    # 15 parties (a share group of 15, t = 9) and three holders spread so that every cyclic
    # window of 9 holds one of them: each secret needs a subset beyond the windows, and once
    # one is rebuilt the three are known and left out of the others.
    n, t, bad = 15, 9, {1, 6, 11}
    agg = _aggregation(n, t)
    xs = {u: np.full(agg.size, 0.01 * u) for u in range(1, n + 1)}
    for u in range(1, n + 1):
        agg.accept(_mask(agg, u, xs[u]))
    agg.check_survivors()
    for h in range(1, n + 1):
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        if h in bad:
            ans.shares = {k: bytes(a ^ 1 for a in v[:1]) + v[1:] for k, v in ans.shares.items()}
        agg.take(ans)
    assert agg.ready()
    assert agg.tamperers == bad
    ring_sum, _ = agg.result()
    assert _within(agg.q, agg.q.decode(ring_sum), sum(xs.values()), n)


def test_misfits_are_the_shares_off_the_polynomial() -> None:
    shares = shamir.split(bytes(31) + b"\x07", list(range(1, 8)), 4)
    points = {x: shares[x] for x in (1, 2, 3, 4)}
    others = {x: shares[x] for x in (5, 6, 7)}
    assert shamir.misfits(points, others) == set()
    others[6] = bytes(31) + b"\x01"
    assert shamir.misfits(points, others) == {6}


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**255 - 20), st.data())
def test_misfits_agree_with_reconstruction_from_any_other_points(
    t: int, secret: int, data: st.DataObject
) -> None:
    # The checked shares are exactly those that, swapped in for a point, change the secret.
    holders = list(range(1, t + 6))
    shares = shamir.split(secret.to_bytes(32, "big"), holders, t)
    bad = data.draw(st.sets(st.sampled_from(holders[t:]), max_size=5))
    for x in bad:
        shares[x] = ((int.from_bytes(shares[x], "big") + 1) % shamir.PRIME).to_bytes(32, "big")
    points = {x: shares[x] for x in holders[:t]}
    others = {x: shares[x] for x in holders[t:]}
    assert shamir.misfits(points, others) == bad


# --- what the server sees of one client --------------------------------------------------

CHI2_255_AT_1E3 = 330.52  # chi-square critical value, 255 degrees of freedom, alpha = 1e-3
COORDS = 100_000


def _one_masked_vector(bits: int, update: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    # Fixed keys and a fixed self-mask seed make the statistic deterministic (no flakes).
    monkeypatch.setattr(sa.secrets, "token_bytes", lambda k: hashlib.sha256(b"self").digest()[:k])
    agg = _aggregation(3, 2, q=Quantizer(bits, 1.0, 3), size=COORDS, tail_len=0)
    ring, _ = _encode(agg.q, update, np.random.default_rng(0))
    return _mask_whole(agg.setup_for(1), _sk("enc", 1), _sk("mask", 1), ring, []).model, ring


def _chi2_uniform_bytes(values: np.ndarray) -> float:
    counts = np.bincount(values.astype(np.int64), minlength=256)
    expected = values.size / 256
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("update", ["zeros", "all +clip"])
def test_masked_vector_is_uniform_over_the_ring(
    bits: int, update: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.zeros(COORDS) if update == "zeros" else np.ones(COORDS)
    masked, ring = _one_masked_vector(bits, x, monkeypatch)
    assert masked.dtype == ring_dtype(bits)
    assert len(np.unique(ring)) <= 2  # the input itself is as far from uniform as it gets
    top, low = masked >> np.uint32(bits - 8), masked & np.uint32(0xFF)
    assert _chi2_uniform_bytes(top) < CHI2_255_AT_1E3
    assert _chi2_uniform_bytes(low) < CHI2_255_AT_1E3
    assert _chi2_uniform_bytes(ring >> np.uint32(bits - 8)) > 100 * CHI2_255_AT_1E3  # it bites


@pytest.mark.parametrize("bits", [16, 32])
def test_masked_vector_does_not_correlate_with_the_update(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.random.default_rng(2).uniform(-1, 1, COORDS)
    masked, ring = _one_masked_vector(bits, x, monkeypatch)
    q = Quantizer(bits, 1.0, 3)
    assert np.corrcoef(x, q.decode(ring))[0, 1] > 0.99  # unmasked, it is the update
    assert abs(np.corrcoef(x, masked.astype(np.float64))[0, 1]) < 0.02
    assert abs(np.corrcoef(x, q.decode(masked))[0, 1]) < 0.02


# --- accept: what must not enter the sum -------------------------------------------------


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_accept_rejects_and_folds_nothing(how: str) -> None:
    agg = _aggregation(4, 3)
    agg.accept(_mask(agg, 1))
    good = _mask(agg, 2)
    before = _state(agg)
    with pytest.raises(sa.Rejected):
        agg.accept(TAMPERS[how](good))
    assert _state(agg) == before
    agg.accept(good)  # the party is not blocked by a refused message
    assert agg.survivors == {1, 2}


def test_accept_rejects_a_duplicate() -> None:
    agg = _aggregation(4, 3)
    mi = _mask(agg, 1)
    agg.accept(mi)
    before = _state(agg)
    with pytest.raises(sa.Rejected, match="already"):
        agg.accept(mi)
    with pytest.raises(sa.Rejected, match="already"):
        agg.accept(_mask(agg, 1))  # a second, freshly masked input counts twice just the same
    assert _state(agg) == before


def test_accept_rejects_a_replay_from_an_earlier_round() -> None:
    earlier = _aggregation(4, 3, server_round=ROUND - 1, mask_kind="earlier")
    old = _mask(earlier, 2, mask_kind="earlier")
    earlier.accept(old)
    agg = _aggregation(4, 3)
    agg.accept(_mask(agg, 1))
    before = _state(agg)
    with pytest.raises(sa.Rejected, match="round"):
        agg.accept(old)
    with pytest.raises(sa.Rejected, match="key"):  # relabelled, it still carries the old key
        agg.accept(replace(old, server_round=ROUND))
    assert _state(agg) == before


def test_accept_rejects_shares_for_a_non_neighbour() -> None:
    graph = _ring_graph(range(1, 9), 4)  # 1's holders: 7, 8, 1, 2, 3
    agg = _aggregation(8, 3, graph=graph)
    mi = _mask(agg, 1)
    before = _state(agg)
    moved = {(5 if h == 3 else h): c for h, c in mi.shares.items()}
    with pytest.raises(sa.Rejected, match="holders"):
        agg.accept(replace(mi, shares=moved))
    assert _state(agg) == before


# --- answer: the holder's side -----------------------------------------------------------


def _round_with_dropouts(
    n: int = 8, degree: int = 4, t: int = 3, absent: Sequence[int] = (3,)
) -> sa.Aggregation:
    graph = _ring_graph(range(1, n + 1), degree)
    agg = _aggregation(n, t, graph=graph)
    for u in range(1, n + 1):
        if u not in absent:
            agg.accept(_mask(agg, u))
    agg.check_survivors()
    return agg


def test_answer_refuses_survivor_sets_without_the_holder_or_below_threshold() -> None:
    agg = _round_with_dropouts()
    request = agg.request_for(4)
    enc = _sk("enc", 4)
    with pytest.raises(sa.Rejected, match="not among the survivors"):
        sa.answer(replace(request, survivors=request.survivors - {4}), _memo(agg, 4), enc)
    with pytest.raises(sa.Rejected, match="threshold"):
        sa.answer(replace(request, survivors=frozenset({4, 5})), _memo(agg, 4), enc)
    with pytest.raises(sa.Rejected, match="threshold"):  # a lone holder, whatever t says
        sa.answer(replace(request, survivors=frozenset({4}), threshold=1), _memo(agg, 4), enc)


def test_a_round_sent_again_opens_none_of_the_first_rounds_shares() -> None:
    # A server that sends a round again gets each holder to mask in it with a new mask key
    # (a key masks once), and so to hold a second memo of the round. Its shares of the
    # first round are sealed to the first key: the second answer opens none of them, so the
    # server cannot collect the self mask under one survivor set and the pair masks under
    # another.
    agg = _round_with_dropouts()
    request, memo = agg.request_for(4), _memo(agg, 4)
    assert sa.answer(request, memo, _sk("enc", 4)).shares
    again = replace(memo, mask_pub=_pub("other mask", 4))
    later = replace(request, survivors=request.survivors - {2})
    answer = sa.answer(later, again, _sk("enc", 4))
    assert not answer.shares
    assert {answer.rejected[u] for u in later.survivors if u in later.ciphertexts} == {
        "share does not authenticate"}


def test_answer_reports_ciphertexts_that_do_not_authenticate() -> None:
    agg = _round_with_dropouts()
    request = agg.request_for(4)
    other = _aggregation(8, 3, graph=agg.graph, server_round=ROUND + 1)
    for u in range(1, 9):
        other.accept(_mask(other, u))
    ct = dict(request.ciphertexts)
    flipped = bytearray(ct[2])
    flipped[20] ^= 1
    ct[2] = bytes(flipped)  # tampered
    ct[5] = other.ciphertexts[4][5]  # replayed from another round, same sender and holder
    ct[6] = ct[4]  # re-labelled: 4's ciphertext claimed to come from 6
    ct[8] = b"short"  # not even a nonce and a tag
    pubs = {**request.sender_enc_pubs, 8: _pub("enc", 8)}
    tampered = replace(request, ciphertexts=ct, sender_enc_pubs=pubs)
    ans = sa.answer(tampered, _memo(agg, 4), _sk("enc", 4))
    assert set(ans.rejected) == {2, 5, 6, 8}
    assert all(u not in (2, 5, 6, 8) for u, _ in ans.shares)
    assert {u for u, _ in ans.shares} == {4}
    re_addressed = agg.request_for(5).ciphertexts[4]  # 4's shares for holder 5, given to 6
    misaddressed = replace(agg.request_for(6), ciphertexts={4: re_addressed})
    ans = sa.answer(misaddressed, _memo(agg, 6), _sk("enc", 6))
    assert set(ans.rejected) == {4} and not ans.shares


def test_holder_reveals_self_masks_of_survivors_and_pair_seeds_towards_the_dropped() -> None:
    agg = _round_with_dropouts(n=8, degree=4, t=3, absent=(3, 6))
    survivors, graph = agg.survivors, agg.graph
    for h in sorted(survivors):
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        assert not ans.rejected
        senders = [u for u in survivors if h in (u, *graph[u])]
        expected = {(u, SELF) for u in senders} | {
            (u, w) for u in senders for w in graph[u] if w not in survivors
        }
        assert set(ans.shares) == expected
        for sender, tag in ans.shares:  # the rule itself, spelled out
            assert sender in survivors and (tag == SELF or tag not in survivors)


def test_holder_reveals_nothing_for_a_sender_the_server_calls_dropped() -> None:
    agg = _round_with_dropouts(absent=())
    request = agg.request_for(4)  # 3 sent, but the server now says it dropped
    without_3 = replace(request, survivors=request.survivors - {3})
    ans = sa.answer(without_3, _memo(agg, 4), _sk("enc", 4))
    assert ans.rejected.keys() == {3}
    assert all(u != 3 for u, _ in ans.shares)
    assert {(u, w) for u, w in ans.shares if w != SELF} == {(2, 3), (4, 3), (5, 3)}


def test_answer_checks_the_request_against_the_round_the_holder_masked_in() -> None:
    agg = _round_with_dropouts()
    request, memo, enc = agg.request_for(4), _memo(agg, 4), _sk("enc", 4)
    assert sa.answer(request, memo, enc).shares  # the honest request
    with pytest.raises(sa.Rejected, match="masked in round"):
        sa.answer(replace(request, server_round=ROUND + 1), memo, enc)
    with pytest.raises(sa.Rejected, match="masked in round"):
        sa.answer(replace(request, session=bytes(16)), memo, enc)
    with pytest.raises(sa.Rejected, match="threshold 2, the round's is 3"):
        sa.answer(replace(request, threshold=2), memo, enc)
    # Made-up parties, counted towards the threshold, would let a server that tells each
    # holder a different survivor set collect a client's self mask and pair seeds at once.
    fake = frozenset({4, 2, 100, 101})
    with pytest.raises(sa.Rejected, match=r"outside the round's parties 1\.\.8"):
        sa.answer(replace(request, survivors=fake), memo, enc)


def _resealed(agg: sa.Aggregation, sender: int, holder: int, extra: bytes) -> bytes:
    """The sender's share bundle for a holder, opened and sealed again with `extra` appended:
    what a misbehaving sender could have sent."""
    info = ks.share_ad(ROUND, sender, holder, _pub("mask", holder))
    key = ks.share_key(_sk("enc", sender), _pub("enc", holder), SESSION, ROUND, sender, holder)
    plain = ks.open_(key, agg.ciphertexts[holder][sender], info)
    return ks.seal(key, plain + extra, info)


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ((99).to_bytes(4, "big") + bytes(32), "a tag of no party"),
        (SELF.to_bytes(4, "big") + bytes(32), "the self-mask share twice"),
    ],
    ids=["unknown tag", "duplicate tag"],
)
def test_a_share_bundle_with_a_tag_outside_the_round_or_twice_is_refused_whole(
    extra: bytes, why: str
) -> None:
    # Passed on, a share the server never asked for would get the honest holder's whole
    # answer refused (the sender's fault, the holder's blame).
    agg = _round_with_dropouts()
    request = agg.request_for(4)
    ciphertexts = {**request.ciphertexts, 5: _resealed(agg, 5, 4, extra)}
    ans = sa.answer(replace(request, ciphertexts=ciphertexts), _memo(agg, 4), _sk("enc", 4))
    assert set(ans.rejected) == {5}, why
    assert "tag" in ans.rejected[5]
    assert all(u != 5 for u, _ in ans.shares)
    agg.take(ans)  # the rest of the answer is good


# --- the holder's memo of its rounds, in the client mod -----------------------------------


def _holder(agg: sa.Aggregation, h: int) -> Context:
    """Holder h's device state right after it masked in `agg`'s round."""
    ctx = Context(1, h, {}, RecordDict(), {})
    secure._save(ctx, {"enc-sk": _sk("enc", h), "mask-sks": [], "rounds": [_memo(agg, h)]})
    return ctx


def _ask(ctx: Context, request: sa.UnmaskRequest, h: int) -> sa.UnmaskAnswer:
    return wire.read_answer(secure._unmask(wire.request_record(request, h), ctx))


def test_a_holder_answers_its_round_once_and_no_flood_of_requests_reopens_it() -> None:
    agg = _round_with_dropouts()
    ctx, request = _holder(agg, 4), agg.request_for(4)
    # Requests for rounds it never masked in are refused, and leave no trace: they cannot
    # push the real round out of the device's memory.
    for r in range(2 * secure.ROUNDS_KEPT):
        with pytest.raises(secure.SecureAggregationError, match="not a round this device"):
            _ask(ctx, replace(request, server_round=ROUND + 1 + r), 4)
    # A bad request for the real round is refused without using the round up...
    with pytest.raises(secure.SecureAggregationError, match="threshold"):
        _ask(ctx, replace(request, threshold=2), 4)
    with pytest.raises(secure.SecureAggregationError, match="not a round this device"):
        _ask(ctx, request, 5)  # asked as another party
    assert _ask(ctx, request, 4).shares  # ...which is answered once,
    later = replace(request, survivors=request.survivors - {2})  # then never again
    with pytest.raises(secure.SecureAggregationError, match="already unmasked"):
        _ask(ctx, later, 4)


def test_the_holder_memos_survive_the_device_state_round_trip() -> None:
    agg = _round_with_dropouts()
    memo = _memo(agg, 4)
    ctx = _holder(agg, 4)
    state = secure._state(ctx)
    state["rounds"] = [replace(memo, server_round=r) for r in range(1, 40)]
    secure._save(ctx, state)
    kept = secure._state(ctx)["rounds"]
    assert kept == [replace(memo, server_round=r) for r in range(1, 40)]  # state round trip


# --- take: what the server keeps of an answer --------------------------------------------


def _bad_answers(good: sa.UnmaskAnswer) -> dict[str, sa.UnmaskAnswer]:
    """Holder 4's answer in `_round_with_dropouts()` with one thing wrong."""
    share = good.shares[(4, SELF)]

    def plus(key: tuple[int, int], value: object = share) -> sa.UnmaskAnswer:
        return replace(good, shares={**good.shares, key: value})

    return {
        "pair seed towards a survivor": plus((4, 5)),
        "self mask of a dropped party": plus((3, SELF)),
        "pair seed of a dropped party": plus((3, 4)),
        "share it does not hold": plus((8, SELF)),  # 4 is not among 8's holders
        "pair seed with a non-neighbour that survived": plus((4, 8)),
        "short share": plus((4, SELF), share[:-1]),
        "long share": plus((4, SELF), share + b"\0"),
        "share not bytes": plus((4, SELF), "x" * shamir.SHARE_BYTES),
        "from a non-survivor": replace(good, index=3),
        "unknown holder": replace(good, index=99),
        "other round": replace(good, server_round=ROUND + 1),
        "other session": replace(good, session=bytes(16)),
    }


BAD_ANSWERS = sorted(_bad_answers(sa.UnmaskAnswer(SESSION, ROUND, 4, {(4, SELF): b""})))


@pytest.mark.parametrize("how", BAD_ANSWERS)
def test_take_rejects_and_keeps_nothing(how: str) -> None:
    agg = _round_with_dropouts()  # 8 parties on a ring, 2 either side; 3 absent
    agg.take(sa.answer(agg.request_for(2), _memo(agg, 2), _sk("enc", 2)))
    good = sa.answer(agg.request_for(4), _memo(agg, 4), _sk("enc", 4))
    before = _state(agg)
    with pytest.raises(sa.Rejected):
        agg.take(_bad_answers(good)[how])
    assert _state(agg) == before
    agg.take(good)


def test_take_leaves_out_a_pair_seed_with_a_non_neighbour_and_keeps_the_rest() -> None:
    # An honest holder passes on what a sender's bundle carried; a share of a pair the
    # sender does not have is the sender's doing: left out, and named, not the answer lost.
    agg = _round_with_dropouts(absent=(3, 8))  # 8 is not among 4's neighbours (2, 3, 5, 6)
    good = sa.answer(agg.request_for(4), _memo(agg, 4), _sk("enc", 4))
    odd = replace(good, shares={**good.shares, (4, 8): good.shares[(4, SELF)]})
    assert agg.take(odd) == [(4, 8)]
    assert (4, 8) not in agg.shares and agg.shares[(4, SELF)] == {4: good.shares[(4, SELF)]}


# --- fixed point -------------------------------------------------------------------------


@FAST
@given(
    bits=st.sampled_from([8, 12, 16, 32, 48]),
    clip=st.floats(1e-3, 1e3),
    parties=st.integers(1, 100),
    data=st.data(),
)
def test_encode_decode_round_trip_within_one_step(
    bits: int, clip: float, parties: int, data: st.DataObject
) -> None:
    if (1 << (bits - 1)) - 1 - parties < 1:
        with pytest.raises(ValueError, match="more bits"):
            Quantizer(bits, clip, parties)
        return
    q = Quantizer(bits, clip, parties)
    values = np.array(
        data.draw(st.lists(st.floats(-clip, clip), min_size=1, max_size=50)), dtype=np.float64
    )
    ring, clipped = _encode(q, values, np.random.default_rng(data.draw(st.integers(0, 99))))
    assert clipped == 0 and ring.dtype == ring_dtype(bits)
    assert int(ring.max()) <= q.mask
    assert _within(q, q.decode(ring), values, 1)


@pytest.mark.parametrize("bits", [12, 16, 32, 40])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    q = Quantizer(bits, 1.0, 4)
    rng = np.random.default_rng(3)
    draws = 200_000
    for v in (0.3, -0.7, 1 / 3, 0.9999):
        frac = v * q.scale - np.floor(v * q.scale)
        err = q.decode(_encode(q, np.full(draws, v), rng)[0]) - v
        sigma = np.sqrt(frac * (1 - frac) / draws) / q.scale
        assert abs(err.mean()) < 5 * sigma + 1e-12
        assert np.abs(err).max() <= 1 / q.scale  # and each draw is one of the two neighbours
        nearest_bias = abs(round(frac) - frac) / q.scale
        assert nearest_bias > 10 * sigma  # round-to-nearest would fail the same check


@FAST
@given(
    bits=st.sampled_from([8, 12, 16, 31, 32, 40, 53]),
    values=st.lists(st.floats(-3, 3) | st.just(float("nan")), min_size=1, max_size=60),
    cuts=st.lists(st.integers(1, 20), max_size=5),
    seed=st.integers(0, 99),
)
def test_encoding_in_pieces_is_encoding_whole(
    bits: int, values: list[float], cuts: list[int], seed: int
) -> None:
    # The client encodes its change piece by piece; however it is cut, the ring elements and
    # the clipped count are those of encoding it whole.
    q = Quantizer(bits, 1.0, 3)
    whole, clipped = _encode(q, np.array(values), np.random.default_rng(seed), weight=0.75)
    encoder = Encoder(q, np.random.default_rng(seed), weight=0.75)
    got = np.empty(len(values), dtype=q.dtype)
    bounds = [0, *np.cumsum(cuts)[np.cumsum(cuts) < len(values)].tolist(), len(values)]
    for lo, hi in itertools.pairwise(bounds):
        encoder(np.array(values[lo:hi], dtype=np.float64), got[lo:hi])
    np.testing.assert_array_equal(got, whole)
    assert encoder.clipped == clipped


@FAST
@given(
    bits=st.sampled_from([8, 12, 16, 32, 40, 53]),
    size=st.integers(0, 3000),
    offset=st.integers(0, 3000),
    signs=st.lists(st.sampled_from([1, -1]), min_size=1, max_size=3),
)
def test_masks_added_from_any_offset_are_the_whole_masks_range(
    bits: int, size: int, offset: int, signs: list[int]
) -> None:
    # Threads on the server each take the masks out of one range of the sum: a range
    # expanded from its offset must be that range of the whole mask, tail included.
    q = Quantizer(bits, 1.0, 2)
    seeds = [(hashlib.sha256(bytes([i])).digest(), sign) for i, sign in enumerate(signs)]
    offset = min(offset, size)
    whole, whole_tail = np.zeros(size, q.dtype), np.zeros(3, sa.TAIL_DTYPE)
    masks = sa.Masks(q, seeds)
    masks.add(whole)
    masks.add_tail(whole_tail)
    part = np.zeros(size - offset, q.dtype)
    sa.Masks(q, seeds, offset=offset).add(part)
    np.testing.assert_array_equal(part, whole[offset:])
    tail = np.zeros(3, sa.TAIL_DTYPE)
    sa.Masks(q, seeds, offset=size).add_tail(tail)
    np.testing.assert_array_equal(tail, whole_tail)


def test_masks_span_many_pieces_like_one_keystream() -> None:
    q = Quantizer(32, 1.0, 2)
    size = 3 * sa.Masks(q, []).step + 5  # several cache pieces, and a short last one
    got = np.zeros(size, q.dtype)
    sa.Masks(q, [(bytes(32), 1)]).add(got)
    stream = np.frombuffer(_keystream(bytes(32), 4 * size), dtype="<u4")
    np.testing.assert_array_equal(got, stream)


def test_the_clients_pipeline_is_the_update_encoded_whole_and_masked_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client clips, quantizes and masks its change piece by piece as it computes it
    # (client.secure.masked_update): the result must be exactly the change encoded in one
    # piece plus the signed masks of the same seeds, tail (metrics, clipped count) included.
    from fedstream.client.secure import masked_update
    from fedstream.protocol import updates

    monkeypatch.setattr(sa.secrets, "token_bytes", lambda k: hashlib.sha256(b"self").digest()[:k])
    rng = np.random.default_rng(7)
    old = {"w": rng.standard_normal((600, 500), dtype=np.float32), "b": np.zeros(7, np.float32)}
    new = {k: v + rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in old.items()}
    size = sum(v.size for v in old.values())
    assert size > sa.Masks(Quantizer(32, 1.0, 4), []).step  # more than one piece
    agg = _aggregation(4, 3, size=size, tail_len=m.tail_len(2))
    setup = agg.setup_for(3)
    report = m.TrainReport(
        client=11, examples=50, correct=7, loss_sum=12.5, drifts=[4], train_seconds=0.25,
        dropped=2, no_change_correct=30, majority_correct=21, classes=[20, 30, 10, 40, 3, 4],
    )
    got = masked_update(
        updates.record(old), updates.record(new), report, setup, _sk("enc", 3),
        sa.mask_seeds(setup, _sk("mask", 3)), np.random.default_rng(5),
    )

    change = np.concatenate([(new[k].astype(np.float64) - old[k]).ravel() for k in old])
    ring, clipped = _encode(agg.q, change, np.random.default_rng(5))
    assert clipped > 0  # the clipped count rides in the tail: it is checked too
    tail = [1, 1, 50, 1, 7, round(12.5 * m.FIXED_POINT), 1, clipped, 250_000, 2, 0, 30, 21,
            20, 30, 10, 40, 3, 4]
    seeds = sa.mask_seeds(setup, _sk("mask", 3))  # the same self seed: token_bytes is fixed
    want = _mask_whole(setup, _sk("enc", 3), _sk("mask", 3), ring, tail)
    np.testing.assert_array_equal(got.model, want.model)
    np.testing.assert_array_equal(got.tail, want.tail)
    assert got.commitments == {tag: ks.commitment(seed) for tag, seed in seeds.items()}


def test_weight_scales_the_clipped_update() -> None:
    q = Quantizer(32, 1.0, 4)
    values = np.array([0.5, -0.25, 3.0, -3.0])  # clipped first, then weighed
    ring, clipped = _encode(q, values, np.random.default_rng(0), weight=0.5)
    assert clipped == 2
    assert _within(q, q.decode(ring), np.array([0.25, -0.125, 0.5, -0.5]), 1)
    for weight in (-0.1, 1.5):
        with pytest.raises(ValueError, match="weight"):
            _encode(q, values, np.random.default_rng(0), weight=weight)


def test_a_nan_is_counted_and_encodes_zero() -> None:
    q = Quantizer(32, 1.0, 3)
    ring, clipped = _encode(q, np.array([np.nan, 0.25, 2.0, np.nan]), np.random.default_rng(0))
    assert clipped == 3
    assert _within(q, q.decode(ring), np.array([0.0, 0.25, 1.0, 0.0]), 1)


def test_clipping_is_counted_and_saturates() -> None:
    q = Quantizer(32, 0.5, 3)
    values = np.array([2.0, -2.0, 0.5, -0.5, 0.1, np.inf, -np.inf])
    ring, clipped = _encode(q, values, np.random.default_rng(0))
    assert clipped == 4
    expected = [0.5, -0.5, 0.5, -0.5, 0.1, 0.5, -0.5]
    assert _within(q, q.decode(ring), np.array(expected), 1)


@FAST
@given(bits=st.integers(3, 53), clip=st.floats(1e-3, 1e3), data=st.data())
def test_sum_of_parties_extremes_never_wraps(bits: int, clip: float, data: st.DataObject) -> None:
    most = (1 << (bits - 1)) - 2  # headroom 1
    parties = data.draw(st.one_of(st.just(min(most, 200)), st.integers(1, min(most, 200))))
    q = Quantizer(bits, clip, parties)
    rng = np.random.default_rng(parties)
    for sign in (1, -1):
        acc = np.zeros(16, q.dtype)
        for _ in range(parties):
            q.add(acc, _encode(q, np.full(16, sign * clip), rng)[0])
        got = q.decode(acc)
        assert np.all(sign * got >= 0)  # never on the wrong side of zero
        assert _within(q, got, np.full(16, sign * parties * clip), parties)


@pytest.mark.parametrize(("bits", "parties"), [(53, 1), (53, 2), (53, 10)])
def test_sum_of_parties_extremes_never_wraps_in_the_widest_ring(bits: int, parties: int) -> None:
    q = Quantizer(bits, 1.0, parties)
    rng = np.random.default_rng(0)
    for sign in (1, -1):
        acc = np.zeros(4, q.dtype)
        for _ in range(parties):
            q.add(acc, _encode(q, np.full(4, float(sign)), rng)[0])
        assert _within(q, q.decode(acc), np.full(4, float(sign * parties)), parties)


@pytest.mark.parametrize("bits", [54, 62, 64])
def test_quantizer_refuses_rings_float64_cannot_scale_exactly(bits: int) -> None:
    with pytest.raises(ValueError, match="at most 53"):
        Quantizer(bits, 1.0, 2)


def test_quantizer_refuses_a_ring_too_small_for_the_parties() -> None:
    Quantizer(8, 1.0, 126)  # headroom 1: still fits
    for bits, clip, parties in ((8, 1.0, 127), (16, 1.0, 40_000), (3, 1.0, 3), (32, 1.0, 0)):
        with pytest.raises(ValueError, match="more bits"):
            Quantizer(bits, clip, parties)
    for bits in (1, 65):
        with pytest.raises(ValueError, match="ring bits"):
            Quantizer(bits, 1.0, 1)
    with pytest.raises(ValueError, match="clip"):
        Quantizer(16, 0.0, 1)


def test_ring_dtype_and_masked_addition() -> None:
    widths = [ring_dtype(b).itemsize for b in (2, 8, 9, 16, 17, 32, 33, 64)]
    assert widths == [1, 1, 2, 2, 4, 4, 8, 8]
    q = Quantizer(12, 1.0, 2)
    acc = np.array([4095, 0], dtype=q.dtype)
    q.add(acc, np.array([1, 1], dtype=q.dtype))
    assert acc.tolist() == [0, 1]
    q.add(acc, np.array([1, 2], dtype=q.dtype), -1)
    assert acc.tolist() == [4095, 4095]


# --- the party refuses what would let a server unmask it ---------------------------------


def test_party_refuses_a_threshold_of_at_most_half_its_share_group() -> None:
    agg = _aggregation(4, 3)
    bad = replace(agg.setup_for(1), threshold=1)
    ring, _ = _encode(agg.q, np.zeros(agg.size), np.random.default_rng(0))
    with pytest.raises(ValueError):
        received = wire.read_setup(wire.setup_record(bad))
        _mask_whole(received, _sk("enc", 1), _sk("mask", 1), ring, [0, 0])


def test_party_refuses_a_mask_key_or_tail_other_than_the_rounds() -> None:
    agg = _aggregation(4, 3)
    ring, _ = _encode(agg.q, np.zeros(agg.size), np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask key"):
        _mask_whole(agg.setup_for(1), _sk("enc", 1), _sk("other", 1), ring, [0, 0])
    with pytest.raises(ValueError, match="tail"):
        _mask_whole(agg.setup_for(1), _sk("enc", 1), _sk("mask", 1), ring, [0])


# --- wire: Flower records ----------------------------------------------------------------

peer_keys = st.tuples(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))


@FAST
@given(
    session=st.binary(min_size=16, max_size=16),
    server_round=st.integers(0, 2**40),
    index=st.integers(1, 1000),
    threshold=st.integers(1, 50),
    q=st.builds(Quantizer, st.sampled_from([16, 32, 53]), st.floats(1e-3, 1e6), st.integers(1, 99)),
    tail_len=st.integers(0, 10),
    peers=st.dictionaries(st.integers(1, 1000), peer_keys, max_size=8),
    mask_pub=st.binary(min_size=32, max_size=32),
    max_weight=st.integers(1, 10**6),
)
def test_setup_round_trips(
    session: bytes,
    server_round: int,
    index: int,
    threshold: int,
    q: Quantizer,
    tail_len: int,
    peers: dict[int, tuple[bytes, bytes]],
    mask_pub: bytes,
    max_weight: int,
) -> None:
    setup = sa.RoundSetup(
        session,
        server_round,
        index,
        threshold,
        q,
        tail_len,
        {w: sa.Peer(*keys) for w, keys in peers.items()},
        mask_pub,
        max_weight,
    )
    assert wire.read_setup(wire.setup_record(setup)) == setup


@pytest.mark.parametrize(("bits", "tail_len"), [(12, 0), (16, 3), (32, 8)])
def test_masked_input_round_trips(bits: int, tail_len: int) -> None:
    agg = _aggregation(5, 3, q=Quantizer(bits, 1.0, 5), size=33, tail_len=tail_len)
    mi = _mask(agg, 2, tail=list(range(-1, tail_len - 1)))
    got, next_pub = wire.read_masked(wire.masked_content(mi, 17, _pub("next", 2)))
    assert next_pub == _pub("next", 2)
    assert (got.session, got.server_round, got.index, got.mask_pub) == (
        mi.session,
        mi.server_round,
        mi.index,
        mi.mask_pub,
    )
    assert got.model.dtype == mi.model.dtype and np.array_equal(got.model, mi.model)
    assert got.tail.dtype == sa.TAIL_DTYPE and np.array_equal(got.tail, mi.tail)
    assert got.commitments == mi.commitments and got.shares == mi.shares
    agg.accept(got)  # what came off the wire is what the server folds


def test_request_and_answer_round_trip_and_still_unmask() -> None:
    agg = _round_with_dropouts()
    for h in sorted(agg.survivors):
        request, index = wire.read_request(wire.request_record(agg.request_for(h), h))
        assert (request, index) == (agg.request_for(h), h)
        ans = sa.answer(request, _memo(agg, index), _sk("enc", index))
        assert wire.read_answer(wire.answer_record(ans)) == ans
        agg.take(wire.read_answer(wire.answer_record(ans)))
    agg.result()


@FAST
@given(
    index=st.integers(1, 1000),
    shares=st.dictionaries(
        st.tuples(st.integers(1, 1000), st.integers(0, 1000)),
        st.binary(min_size=shamir.SHARE_BYTES, max_size=shamir.SHARE_BYTES),
        max_size=10,
    ),
    rejected=st.dictionaries(st.integers(1, 1000), st.text(max_size=30), max_size=4),
)
def test_answer_round_trips(
    index: int, shares: dict[tuple[int, int], bytes], rejected: dict[int, str]
) -> None:
    ans = sa.UnmaskAnswer(SESSION, ROUND, index, shares, rejected)
    assert wire.read_answer(wire.answer_record(ans)) == ans


MISSING = object()


@functools.cache
def _base() -> dict[str, dict]:
    agg = _round_with_dropouts()
    request = agg.request_for(4)
    without_5 = replace(request, survivors=request.survivors - {5})
    ans = sa.answer(without_5, _memo(agg, 4), _sk("enc", 4))
    assert ans.rejected and ans.shares
    return {
        "setup": dict(wire.setup_record(agg.setup_for(4))),
        "masked": dict(_masked_content()[m.SECAGG]),
        "request": dict(wire.request_record(request, 4)),
        "answer": dict(wire.answer_record(ans)),
    }


def _base_records() -> dict[str, dict]:
    return copy.deepcopy(_base())


def _read(kind: str, rec: dict) -> object:
    if kind == "masked":
        content = _masked_content()
        content[m.SECAGG] = ConfigRecord(rec)
        return wire.read_masked(content)
    return {"setup": wire.read_setup, "request": wire.read_request, "answer": wire.read_answer}[
        kind
    ](ConfigRecord(rec))


SHORTER, LONGER = object(), object()
# (record, key, new value, key the error must name)
MALFORMED = [
    ("setup", "session", MISSING, "session"),
    ("setup", "session", "text", "session"),
    ("setup", "round", "7", "round"),
    ("setup", "round", True, "round"),
    ("setup", "index", 1.5, "index"),
    ("setup", "threshold", MISSING, "threshold"),
    ("setup", "bits", "32", "bits"),
    ("setup", "clip", "1.0", "clip"),
    ("setup", "parties", MISSING, "parties"),
    ("setup", "tail-len", [3], "tail-len"),
    ("setup", "peers", 2, "peers"),
    ("setup", "peers", ["2", "3", "5", "6"], "peers"),
    ("setup", "peers", MISSING, "peers"),
    ("setup", "peer-enc", SHORTER, "peer-enc"),
    ("setup", "peer-mask", LONGER, "peer-mask"),
    ("setup", "peer-enc", [1, 2, 3, 4], "peer-enc"),
    ("setup", "mask-pub", MISSING, "mask-pub"),
    ("setup", "max-weight", MISSING, "max-weight"),
    ("masked", "session", MISSING, "session"),
    ("masked", "round", b"\x05", "round"),
    ("masked", "index", "1", "index"),
    ("masked", "mask-pub", 3, "mask-pub"),
    ("masked", "commit-tags", 0, "commit-tags"),
    ("masked", "commit-tags", MISSING, "commit-tags"),
    ("masked", "commits", SHORTER, "commits"),
    ("masked", "commits", MISSING, "commits"),
    ("masked", "holders", LONGER, "shares"),
    ("masked", "shares", SHORTER, "shares"),
    ("masked", "shares", ["a", "b", "c", "d"], "shares"),
    ("masked", "next-mask-pub", MISSING, "next-mask-pub"),
    ("request", "session", MISSING, "session"),
    ("request", "round", MISSING, "round"),
    ("request", "index", MISSING, "index"),
    ("request", "survivors", ["a"], "survivors"),
    ("request", "threshold", "3", "threshold"),
    ("request", "senders", MISSING, "senders"),
    ("request", "ciphertexts", SHORTER, "ciphertexts"),
    ("request", "sender-enc", MISSING, "sender-enc"),
    ("request", "sender-enc", LONGER, "sender-enc"),
    ("answer", "session", MISSING, "session"),
    ("answer", "index", "4", "index"),
    ("answer", "senders", MISSING, "senders"),
    ("answer", "tags", SHORTER, "tags"),
    ("answer", "shares", SHORTER, "shares"),
    ("answer", "shares", MISSING, "shares"),
    ("answer", "rejected", 5, "rejected"),
]


@pytest.mark.parametrize(("kind", "key", "value", "named"), MALFORMED)
def test_malformed_record_is_rejected_naming_the_key(
    kind: str, key: str, value: object, named: str
) -> None:
    rec = _base_records()[kind]
    _read(kind, rec)  # the base record reads
    if value is MISSING:
        del rec[key]
    elif value is SHORTER:
        rec[key] = rec[key][:-1]
    elif value is LONGER:
        rec[key] = [*rec[key], rec[key][0]]
    else:
        rec[key] = value
    with pytest.raises(sa.Rejected, match=f"'{named}'"):
        _read(kind, rec)


@pytest.mark.parametrize("kind", ["setup", "masked"])
@pytest.mark.parametrize("version", [MISSING, 1, 2, 3, 4, 5, 6, 8, "7"])
def test_a_record_of_another_protocol_version_is_rejected(kind: str, version: object) -> None:
    # Version 1 clients and servers sent no version; they expand masks differently, so
    # mixing them would sum to noise. Each side names the other's version instead.
    rec = _base_records()[kind]
    if version is MISSING:
        del rec["protocol"]
    else:
        rec["protocol"] = version
    sender = "the server" if kind == "setup" else "the client"
    shown = 1 if version is MISSING else version
    with pytest.raises(sa.Rejected, match=f"{sender} speaks secure-aggregation protocol {shown!r}"):
        _read(kind, rec)


def test_answer_with_reasons_and_rejected_of_different_lengths_is_rejected() -> None:
    rec = _base_records()["answer"]
    rec["rejected"] = [*rec["rejected"], 99]
    with pytest.raises(sa.Rejected, match="'reasons'"):
        wire.read_answer(ConfigRecord(rec))


def _masked_content() -> RecordDict:
    return wire.masked_content(_mask(_aggregation(4, 3), 1), 11, _pub("next", 1))


@pytest.mark.parametrize("drop", [m.MASKED, m.SECAGG])
def test_masked_reply_without_its_records_is_rejected(drop: str) -> None:
    content = _masked_content()
    del content[drop]
    with pytest.raises(sa.Rejected, match="no masked update"):
        wire.read_masked(content)


def test_masked_reply_with_extra_or_corrupt_arrays_is_rejected() -> None:
    content = _masked_content()
    model, tail = content[m.MASKED]["model"], content[m.MASKED]["tail"]
    content[m.MASKED] = ArrayRecord({"model": model, "tail": tail, "extra": tail})
    with pytest.raises(sa.Rejected, match="exactly"):
        wire.read_masked(content)
    garbage = Array(dtype="<u4", shape=(3,), stype="numpy.ndarray", data=b"garbage")
    content[m.MASKED] = ArrayRecord({"model": garbage, "tail": tail})
    with pytest.raises(sa.Rejected, match="does not decode"):
        wire.read_masked(content)


def test_a_secret_that_failed_is_retried_only_when_a_share_comes_in(monkeypatch) -> None:
    # The server asks `ready` after every pull; a secret whose shares failed the commitment
    # must not be rebuilt again (up to MAX_RECOVERY_TRIES interpolations) until it has more.
    n, t = 4, 3
    agg = _aggregation(n, t)
    for u in range(1, n + 1):
        agg.accept(_mask(agg, u))
    agg.check_survivors()
    for h in (1, 2, 3):
        ans = sa.answer(agg.request_for(h), _memo(agg, h), _sk("enc", h))
        if h == 1:
            ans.shares[(2, SELF)] = bytes(shamir.SHARE_BYTES - 1) + b"\x01"
        agg.take(ans)
    calls: list[int] = []
    real = shamir.reconstruct
    monkeypatch.setattr(shamir, "reconstruct", lambda s: calls.append(1) or real(s))
    assert not agg.ready()
    tried = len(calls)
    assert tried > 0
    assert not agg.ready() and len(calls) == tried  # nothing new: nothing rebuilt
    agg.take(sa.answer(agg.request_for(4), _memo(agg, 4), _sk("enc", 4)))
    assert agg.ready() and len(calls) > tried


def test_the_protocol_example_runs_a_round_with_a_dropout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # examples/secure_sum.py is the README's Python example of the protocol: it must run.
    import runpy

    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "secure_sum.py"),
                   run_name="__main__")
    out = capsys.readouterr().out
    assert "party 4 dropped" in out and "contributors 4" in out
    error = float(out.rsplit(": ", 1)[1])
    assert error < 1e-6

"""Secure aggregation in two round trips: both sides of the protocol, without any transport.

Parties are the clients of one round, numbered 1..n by the server. Each party u has a
long-lived encryption key pair c_u and a mask key pair s_u (advertised in advance, renewed
with every masked reply). Neither key, nor any X25519 shared secret, is ever revealed: a
dropout reveals only pair seeds bound to one round by HKDF, so reusing a key agreement
across rounds leaks nothing about any other round. The server links
each party to `degree` neighbours on a random ring (Bell et al. 2020; all others when the
federation is small).

Trip 1 (train). u trains, quantizes its update to ring elements x_u and sends
    y_u = x_u + PRG(b_u) + sum_{w in N(u)} sign(u, w) PRG(seed_uw)
where b_u is a fresh self-mask seed and seed_uw = HKDF(X25519(s_u, s_w), round) is shared
with neighbour w (sign +1 if u < w, else -1, so each pair cancels in the sum). With y_u it
sends, encrypted to each holder h in N(u) + {u}, Shamir shares (threshold t) of b_u and of
every seed_uw, plus SHA-256 commitments to those secrets.

Trip 2 (unmask). The server fixes the survivors S (parties whose y arrived and passed
validation) and asks every survivor, as holder, for the shares it holds: of b_u for senders
u in S, and of seed_uw for senders u in S and neighbours w that dropped. It reconstructs
those secrets (checking each against its commitment), removes the self-masks of S and the
pair masks between S and the dropped parties, and is left with sum_{u in S} x_u and
nothing else. Because a pair seed is shared by the survivor who computed it, a survivor
that vanishes after trip 1 costs nothing as long as t of the holders answer, and the
server need not wait for more than the first t honest answers (`Aggregation.ready`).

A holder reveals a self-mask share only for a survivor and pair-seed shares only towards
dropped parties, once per round, and only for a round it masked in (`RoundMemo`); with
t > (degree + 1) / 2 a server that asks every holder with one survivor set can never hold
both the self-mask and the pair masks of one party. (One that tells holders different sets
can: that takes a consistency round, which this protocol does not have.)
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fedstream.protocol import keyschedule as ks
from fedstream.protocol import shamir
from fedstream.protocol.fixedpoint import Quantizer

TAIL_DTYPE = np.dtype("<u8")  # counts and metrics are summed exactly in Z / 2^64
SELF = 0  # share tag of the self-mask seed; tag w > 0 is the pair seed with party w
_ENTRY = struct.Struct(">I")
ROUND_FAILURE = 0.01  # chance of a round failing from dropouts that degree 0 aims below
MAX_RECOVERY_TRIES = 256  # t-subsets tried per secret (each an interpolation and a hash)
UNMASK_THREADS = 2  # mask expansion threads on the server (see Aggregation.result)


class Rejected(ValueError):
    """A message that must not enter the sum; its sender is treated as dropped."""


class RoundFailed(RuntimeError):
    """The sum cannot be recovered this round (too few survivors or shares)."""


@dataclass(frozen=True)
class Peer:
    enc_pub: bytes
    mask_pub: bytes


@dataclass(frozen=True)
class RoundSetup:
    """Everything one party needs from the server to mask its update."""

    session: bytes
    server_round: int
    index: int
    threshold: int
    quantizer: Quantizer
    tail_len: int
    peers: Mapping[int, Peer]  # this party's neighbours
    mask_pub: bytes  # which of its own mask keys the server expects it to use
    max_weight: int = 1  # examples that weigh in full (the update is scaled by min(n, this))

    @property
    def holders(self) -> list[int]:
        return sorted([*self.peers, self.index])


@dataclass(frozen=True)
class RoundMemo:
    """What a holder keeps of a round it masked in, to check that round's unmask request.

    A holder answers a request only for a round it holds a memo of, and only once (the
    memo goes with the answer), with the threshold it masked under, and about parties of
    that round: a request for another round, for the same round again, with a lowered
    threshold or with made-up survivors is refused. The shares it opens are those sealed
    to `mask_pub`, which masked only this round: a server that sent the round again would
    get a memo with another key, under which none of the first round's shares open.
    """

    session: bytes
    server_round: int
    index: int
    threshold: int
    parties: int
    mask_pub: bytes  # the holder's mask key of the round: its shares are bound to it

    @classmethod
    def of(cls, setup: RoundSetup) -> RoundMemo:
        return cls(
            setup.session, setup.server_round, setup.index, setup.threshold,
            setup.quantizer.parties, setup.mask_pub,
        )


@dataclass
class MaskedInput:
    """What a party uploads in trip 1 besides its identity."""

    session: bytes
    server_round: int
    index: int
    mask_pub: bytes
    model: np.ndarray
    tail: np.ndarray
    commitments: dict[int, bytes]  # tag -> commitment (SELF, then one per neighbour)
    shares: dict[int, bytes]  # holder -> ciphertext


@dataclass(frozen=True)
class UnmaskRequest:
    session: bytes
    server_round: int
    survivors: frozenset[int]
    threshold: int
    ciphertexts: Mapping[int, bytes]  # sender -> ciphertext addressed to this holder
    sender_enc_pubs: Mapping[int, bytes]


@dataclass
class UnmaskAnswer:
    session: bytes
    server_round: int
    index: int
    shares: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (sender, tag) -> share
    rejected: dict[int, str] = field(default_factory=dict)  # sender -> why its share failed


@functools.lru_cache(maxsize=256, typed=True)  # asked every round; a count is no fraction
def round_shape(
    parties: int, degree: int, threshold: int | float, dropout: float = 0.0
) -> tuple[int, int]:
    """(neighbours per party, shares that unmask a party) for a round of `parties`, from the
    config's `degree` and `threshold` (a count, or a fraction of the share group, never half
    of it or less). ValueError when the threshold is unsafe or does not fit.

    Degree 0 is O(log n), as Bell et al., raised (towards all others) until parties that
    drop at rate `dropout` fail a round with probability below ROUND_FAILURE: a survivor
    whose share group keeps fewer than t members cannot be unmasked, and the round fails.
    """
    k = effective_degree(parties, degree or 2 * math.ceil(1.5 * math.log2(max(parties, 2))))
    t = _shares_needed(threshold, k + 1)
    check_threshold(t, k + 1)  # a count that does not fit is refused, not widened for
    while (
        not degree and k < parties - 1 and dropout_failure(parties, k, t, dropout) > ROUND_FAILURE
    ):
        wider = effective_degree(parties, k + max(2, k // 8 * 2))
        t_wider = _shares_needed(threshold, wider + 1)
        if t_wider <= (wider + 1) // 2:
            break  # a count threshold that a wider group would no longer keep above half
        k, t = wider, t_wider
    return k, t


def _shares_needed(threshold: int | float, group: int) -> int:
    if isinstance(threshold, int):
        return threshold
    return max(group // 2 + 1, math.ceil(threshold * group))


def dropout_failure(parties: int, degree: int, threshold: int, dropout: float) -> float:
    """The chance that a round of `parties`, each dropping at rate `dropout` on its own,
    leaves some survivor with fewer than `threshold` surviving members of its share group
    (itself and `degree` neighbours). In a complete graph every group is the survivors;
    on a ring, survivors' groups are taken as independent, which errs high (it does not
    count that overlapping groups fail together)."""
    if dropout <= 0 or dropout >= 1:
        return float(dropout >= 1)
    stay = 1.0 - dropout
    if degree >= parties - 1:
        return _binomial_below(parties, stay, threshold)
    short = _binomial_below(degree, stay, threshold - 1)  # surviving neighbours too few
    return 1.0 - (1.0 - short) ** (parties * stay)


def _binomial_below(n: int, p: float, k: int) -> float:
    """P[Binomial(n, p) < k], summed in logs: no overflow at any n."""
    return min(1.0, sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                 + i * math.log(p) + (n - i) * math.log1p(-p))
        for i in range(min(k, n + 1))
    ))


def effective_degree(parties: int, degree: int) -> int:
    """Neighbours per party: all others when `degree` is 0 or covers them, else even."""
    if degree <= 0 or degree >= parties - 1:
        return parties - 1
    return min(parties - 1, degree + degree % 2)


def neighbour_graph(
    parties: int, degree: int, rng: random.Random | None = None
) -> dict[int, list[int]]:
    """Each party's neighbours: `degree / 2` either side on a shuffled ring.

    The shuffle is secret (the OS's randomness) unless `rng` is given: a ring known in
    advance lets an adversary corrupt exactly a victim's neighbours, so only a simulation
    (where reproducing a run matters and nobody is corrupted) passes a seeded one.
    """
    k = effective_degree(parties, degree)
    if k == parties - 1:
        return {u: [w for w in range(1, parties + 1) if w != u] for u in range(1, parties + 1)}
    ring = list(range(1, parties + 1))
    (rng or secrets.SystemRandom()).shuffle(ring)
    graph: dict[int, set[int]] = {u: set() for u in ring}
    for pos, u in enumerate(ring):
        for step in range(1, k // 2 + 1):
            w = ring[(pos + step) % parties]
            graph[u].add(w)
            graph[w].add(u)
    return {u: sorted(ws) for u, ws in graph.items()}


def check_threshold(threshold: int, group: int) -> None:
    """t must exceed half a share group (so no server gets both masks) and fit in it."""
    if not group // 2 < threshold <= group:
        raise ValueError(
            f"a threshold of {threshold} shares does not fit a share group of {group} (a "
            f"client and its {group - 1} neighbour{'s' * (group != 2)}): it must be from "
            f"{group // 2 + 1} to "
            f"{group}, more than half so that no server can collect both masks of a client"
        )


# --- party side -------------------------------------------------------------------------


def field_seed(seed: bytes) -> bytes:
    """A 32-byte seed with its top bit cleared, so it is one element of the Shamir field."""
    return bytes([seed[0] & 0x7F]) + seed[1:]


class Masks:
    """The signed sum of the masks some seeds stand for, added to a vector piece by piece.

    A mask is the seed's keystream read as `size` ring elements, then `tail_len` 64-bit
    words. Pieces must come in order (from element `offset` on), and no model-sized buffer
    is ever made for a mask, whatever the number of seeds. A client adds
    its own masks to its encoded update as it produces it; the server takes survivors' masks
    out of the sum, one range of it per thread.
    """

    def __init__(
        self, quantizer: Quantizer, masks: Iterable[tuple[bytes, int]], offset: int = 0
    ) -> None:
        self.q = quantizer
        width = quantizer.dtype.itemsize
        self.streams = [(ks.Keystream(seed, offset * width), sign) for seed, sign in masks]
        self.buf = np.empty(ks.PIECE, dtype=np.uint8)
        self.step = ks.PIECE // width  # ring elements per piece

    def add(self, values: np.ndarray) -> None:
        """values += the next len(values) elements of every signed mask, in the ring."""
        for lo in range(0, values.size, self.step):
            part = values[lo : lo + self.step]
            mask = self.buf[: part.nbytes].view(self.q.dtype)
            for stream, sign in self.streams:
                stream.into(mask.view(np.uint8))
                self.q.add(part, mask, sign)

    def add_tail(self, tail: np.ndarray) -> None:
        """tail += the masks' tail words mod 2^64 (the streams must stand at the model's end)."""
        words = np.empty(tail.shape, dtype=TAIL_DTYPE)
        for stream, sign in self.streams:
            stream.into(words.view(np.uint8))
            (np.add if sign > 0 else np.subtract)(tail, words, out=tail)


def mask_seeds(setup: RoundSetup, mask_sk: bytes) -> dict[int, bytes]:
    """Trip 1, party side: a fresh self-mask seed (tag SELF) and the pair seed with every
    neighbour (tag = the neighbour's index)."""
    if ks.public_key(mask_sk) != setup.mask_pub:
        raise ValueError("mask key does not match the one the server assigned")
    if not setup.peers or setup.index in setup.peers:
        # Alone, its update would be masked by its self mask only, whose shares (one each,
        # at a threshold of 1) the server may ask for.
        raise ValueError(f"party {setup.index} has no neighbours but itself: nothing to hide "
                         "its update in")
    # A threshold of half the group or less would let a server collect both masks of a party.
    check_threshold(setup.threshold, len(setup.holders))
    seeds = {SELF: field_seed(secrets.token_bytes(32))}
    for w, peer in setup.peers.items():
        seeds[w] = field_seed(
            ks.pair_seed(mask_sk, peer.mask_pub, setup.session, setup.server_round)
        )
    return seeds


def signed(setup: RoundSetup, seeds: Mapping[int, bytes]) -> list[tuple[bytes, int]]:
    """The self mask, and each pair mask with the sign that makes the pair cancel in the sum."""
    return [(seed, 1 if tag == SELF or setup.index < tag else -1) for tag, seed in seeds.items()]


def tail_words(tail: Sequence[int]) -> np.ndarray:
    """Exact integers as ring words mod 2^64 (a negative value wraps, and sums back)."""
    return np.array([v & (2**64 - 1) for v in tail], dtype=TAIL_DTYPE)


def sealed(
    setup: RoundSetup, enc_sk: bytes, seeds: Mapping[int, bytes], y: np.ndarray, y_tail: np.ndarray
) -> MaskedInput:
    """The masked input with, for each holder, its Shamir shares of every seed (encrypted
    to it), and a commitment to every seed."""
    if len(y_tail) != setup.tail_len:
        raise ValueError(f"tail has {len(y_tail)} values, the round expects {setup.tail_len}")
    holders = setup.holders
    per_secret = {tag: shamir.split(seed, holders, setup.threshold) for tag, seed in seeds.items()}
    own_pub = ks.public_key(enc_sk)
    shares = {}
    for h in holders:
        pub = own_pub if h == setup.index else setup.peers[h].enc_pub
        plain = b"".join(_ENTRY.pack(tag) + per_secret[tag][h] for tag in sorted(seeds))
        key = ks.share_key(enc_sk, pub, setup.session, setup.server_round, setup.index, h)
        mask_pub = setup.mask_pub if h == setup.index else setup.peers[h].mask_pub
        ad = ks.share_ad(setup.server_round, setup.index, h, mask_pub)
        shares[h] = ks.seal(key, plain, ad)
    return MaskedInput(
        session=setup.session,
        server_round=setup.server_round,
        index=setup.index,
        mask_pub=setup.mask_pub,
        model=y,
        tail=y_tail,
        commitments={tag: ks.commitment(seed) for tag, seed in seeds.items()},
        shares=shares,
    )


def answer(request: UnmaskRequest, memo: RoundMemo, enc_sk: bytes) -> UnmaskAnswer:
    """Trip 2, holder side: the shares this holder may reveal, and nothing more.

    Self-mask shares only for survivors; pair-seed shares only towards parties that are not
    survivors. The request must be for the round of `memo`, with its threshold, and name
    only parties of that round; a survivor set below the threshold, or without this holder,
    is refused. A sender whose share bundle holds anything but one share per tag of the
    round is refused whole.
    """
    index, survivors = memo.index, request.survivors
    if (request.session, request.server_round) != (memo.session, memo.server_round):
        raise Rejected(
            f"unmask request for round {request.server_round}, this holder masked in round "
            f"{memo.server_round}"
        )
    if request.threshold != memo.threshold:
        raise Rejected(
            f"unmask request with threshold {request.threshold}, the round's is {memo.threshold}"
        )
    if not survivors <= frozenset(range(1, memo.parties + 1)):
        raise Rejected(f"survivors outside the round's parties 1..{memo.parties}")
    threshold = max(2, memo.threshold)
    if index not in survivors:
        raise Rejected(f"holder {index} is not among the survivors it is asked to unmask")
    if len(survivors) < threshold:
        raise Rejected(f"{len(survivors)} survivors, fewer than the threshold {threshold}")
    out = UnmaskAnswer(request.session, request.server_round, index)
    for sender, ciphertext in request.ciphertexts.items():
        if sender not in survivors:
            out.rejected[sender] = "sender is not a survivor"
            continue
        try:
            key = ks.share_key(
                enc_sk,
                request.sender_enc_pubs[sender],
                request.session,
                request.server_round,
                sender,
                index,
            )
            ad = ks.share_ad(request.server_round, sender, index, memo.mask_pub)
            plain = ks.open_(key, ciphertext, ad)
            entries = _parse_entries(plain, memo.parties)
        except (KeyError, ValueError) as err:
            out.rejected[sender] = str(err) or type(err).__name__
            continue
        for tag, share in entries.items():
            if (tag == SELF) or (tag not in survivors):
                out.shares[(sender, tag)] = share
    return out


def _parse_entries(plain: bytes, parties: int) -> dict[int, bytes]:
    size = _ENTRY.size + shamir.SHARE_BYTES
    if len(plain) % size:
        raise ValueError("share payload has a partial entry")
    entries = {}
    for off in range(0, len(plain), size):
        (tag,) = _ENTRY.unpack_from(plain, off)
        if tag > parties or tag in entries:
            raise ValueError(f"share payload has a tag ({tag}) outside the round, or twice")
        entries[tag] = plain[off + _ENTRY.size : off + size]
    return entries


# --- server side ------------------------------------------------------------------------


class Aggregation:
    """The server's view of one round: folds masked inputs as they arrive, then unmasks.

    Memory is one accumulator the size of the model, whatever the number of parties.
    """

    def __init__(
        self,
        session: bytes,
        server_round: int,
        quantizer: Quantizer,
        threshold: int,
        graph: Mapping[int, Sequence[int]],
        peers: Mapping[int, Peer],
        size: int,
        tail_len: int,
        max_weight: int = 1,
        name: Callable[[int], str] | None = None,
    ) -> None:
        self.session, self.server_round = session, server_round
        self._name = name  # index -> how a failed round names the party (a client id)
        self.q, self.threshold = quantizer, threshold
        self.graph, self.peers = graph, peers
        self.size, self.tail_len, self.max_weight = size, tail_len, max_weight
        self.acc = np.zeros(size, dtype=quantizer.dtype)
        self.acc_tail = np.zeros(tail_len, dtype=TAIL_DTYPE)
        self.survivors: set[int] = set()
        self.commitments: dict[int, dict[int, bytes]] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # holder -> sender -> ciphertext
        self.shares: dict[tuple[int, int], dict[int, bytes]] = {}  # (sender, tag) -> x -> y
        self.seeds: dict[tuple[int, int], bytes] = {}  # (sender, tag) -> recovered, checked
        self._tried: dict[tuple[int, int], int] = {}  # secret -> shares it failed to recover from
        self.tamperers: set[int] = set()  # holders with a share off a rebuilt secret's polynomial
        self._unmasked = False

    def setup_for(self, index: int) -> RoundSetup:
        return RoundSetup(
            session=self.session,
            server_round=self.server_round,
            index=index,
            threshold=self.threshold,
            quantizer=self.q,
            tail_len=self.tail_len,
            peers={w: self.peers[w] for w in self.graph[index]},
            mask_pub=self.peers[index].mask_pub,
            max_weight=self.max_weight,
        )

    def accept(self, msg: MaskedInput) -> None:
        """Fold one masked input into the sum, or reject it (nothing folded) with a reason."""
        u = msg.index
        if msg.session != self.session:
            raise Rejected("masked input from another session")
        if msg.server_round != self.server_round:
            raise Rejected(
                f"masked input for round {msg.server_round}, this is {self.server_round}"
            )
        if u not in self.graph or u in self.survivors:
            raise Rejected(f"party {u} is not expected (unknown, or already counted)")
        if msg.mask_pub != self.peers[u].mask_pub:
            raise Rejected("masked with a key other than this round's (replayed?)")
        if not isinstance(msg.model, np.ndarray) or msg.model.dtype != self.q.dtype:
            got = getattr(msg.model, "dtype", type(msg.model).__name__)
            raise Rejected(f"masked vector must be {self.q.dtype}, got {got}")
        if msg.model.shape != (self.size,):
            raise Rejected(f"masked vector has shape {msg.model.shape}, expected ({self.size},)")
        if (
            not isinstance(msg.tail, np.ndarray)
            or msg.tail.dtype != TAIL_DTYPE
            or msg.tail.shape != (self.tail_len,)
        ):
            raise Rejected("masked tail has the wrong type or length")
        tags = {SELF, *self.graph[u]}
        if set(msg.commitments) != tags or any(len(c) != 32 for c in msg.commitments.values()):
            raise Rejected("commitments do not match the party's neighbours")
        holders = {u, *self.graph[u]}
        if set(msg.shares) != holders or any(not isinstance(c, bytes) for c in msg.shares.values()):
            raise Rejected("shares are not addressed to exactly the party's holders")
        self.q.add(self.acc, msg.model)
        self.acc_tail += msg.tail
        self.survivors.add(u)
        self.commitments[u] = dict(msg.commitments)
        for h, ciphertext in msg.shares.items():
            self.ciphertexts.setdefault(h, {})[u] = ciphertext

    def check_survivors(self) -> None:
        """Refuse to unmask when the sum would say too much: too few, or split, survivors."""
        s = self.survivors
        if len(s) < self.threshold:
            raise RoundFailed(
                f"{len(s)} of {len(self.graph)} clients survived, threshold is {self.threshold}"
            )
        start = min(s)
        seen, todo = {start}, [start]
        while todo:
            for w in self.graph[todo.pop()]:
                if w in s and w not in seen:
                    seen.add(w)
                    todo.append(w)
        if seen != s:
            raise RoundFailed("survivors are split into groups whose sums could be told apart")

    def request_for(self, holder: int) -> UnmaskRequest:
        senders = {u: c for u, c in self.ciphertexts.get(holder, {}).items() if u in self.survivors}
        return UnmaskRequest(
            session=self.session,
            server_round=self.server_round,
            survivors=frozenset(self.survivors),
            threshold=self.threshold,
            ciphertexts=senders,
            sender_enc_pubs={u: self.peers[u].enc_pub for u in senders},
        )

    def take(self, ans: UnmaskAnswer) -> list[tuple[int, int]]:
        """Keep the shares of one holder's answer; a malformed answer is refused whole.

        One kind of share is left out instead, and returned: a pair seed of a survivor
        with a dropped party that is not its neighbour. An honest holder passes it on when
        the sender's own bundle carried it (the holder cannot know the sender's
        neighbours), so it is the sender's doing, and must not cost the holder its answer.
        Every other unasked-for share is one that no honest holder sends.
        """
        h = ans.index
        if ans.session != self.session or ans.server_round != self.server_round:
            raise Rejected("unmask answer for another round or session")
        if h not in self.survivors:
            raise Rejected(f"holder {h} is not a survivor")
        ignored = []
        for (sender, tag), share in ans.shares.items():
            if sender not in self.survivors or h not in (sender, *self.graph[sender]):
                raise Rejected(f"holder {h} sent a share it should not have ({sender}, {tag})")
            if tag != SELF and tag not in self.graph:  # an honest holder refuses such a bundle
                raise Rejected(f"holder {h} sent a share of a party outside the round ({tag})")
            if tag != SELF and tag not in self.graph[sender] and tag not in self.survivors:
                ignored.append((sender, tag))
                continue
            if tag != SELF and tag in self.survivors:
                raise Rejected(f"holder {h} sent a share it should not have ({sender}, {tag})")
            if not shamir.is_share(share):
                raise Rejected(f"share ({sender}, {tag}) from holder {h} is not a field element")
        for key, share in ans.shares.items():
            if key not in ignored:
                self.shares.setdefault(key, {})[h] = share
        return ignored

    def needed(self) -> list[tuple[int, int]]:
        """The secrets that unmask the sum: every survivor's self-mask seed, and its pair
        seed with every neighbour that dropped."""
        out = []
        for u in sorted(self.survivors):
            out.append((u, SELF))
            out.extend((u, w) for w in self.graph[u] if w not in self.survivors)
        return out

    def ready(self) -> bool:
        """Whether every secret that unmasks the sum is recovered (and checked) from the
        shares taken so far. The server stops waiting for holders once it is: t honest
        answers do, the others are not needed. A secret is retried as shares come in."""
        for key in self.needed():
            if key in self.seeds:
                continue
            have = len(self.shares.get(key, {}))
            if have < self.threshold or self._tried.get(key) == have:
                return False  # too few shares, or no new one since the last failed try
            try:
                self.seeds[key] = self._recover(*key)
            except RoundFailed:
                self._tried[key] = have
                return False
        return True

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The unmasked sum (ring elements, exact tail), or RoundFailed naming what is missing.

        Every seed is recovered (and checked) first; then the masks are taken out of the
        sum in place (a fresh model-sized copy would cost its page faults, as much as the
        copying), each thread expanding every mask over its own range of coordinates, since
        the clients wait for this step. So it succeeds once a round; a seed that cannot be
        recovered leaves the sum as it was, for a retry when more shares come in (an error
        while the masks are taken out leaves it spoilt, and the round failed). numpy's
        additions release the GIL, and so do `cryptography`'s cipher updates from version
        50 on; whether two threads beat one depends on the aggregator's free cores (README,
        "Cost").
        """
        masks: list[tuple[bytes, int]] = []  # (seed, minus the sign the party added it with)
        for u, tag in self.needed():
            seed = self.seeds.get((u, tag)) or self._recover(u, tag)
            masks.append((seed, -1 if tag == SELF or u < tag else 1))
        if self._unmasked:
            raise RuntimeError("the sum is already unmasked")
        self._unmasked = True
        acc, tail = self.acc, self.acc_tail
        cuts = [self.size * i // UNMASK_THREADS for i in range(UNMASK_THREADS + 1)]
        ranges = [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]

        def take_out(lo: int, hi: int) -> None:
            Masks(self.q, masks, offset=lo).add(acc[lo:hi])

        with ThreadPoolExecutor(max_workers=UNMASK_THREADS) as pool:
            for job in [pool.submit(take_out, lo, hi) for lo, hi in ranges]:
                job.result()  # re-raises a thread's error here
        Masks(self.q, masks, offset=self.size).add_tail(tail)
        return acc, tail

    def _recover(self, sender: int, tag: int) -> bytes:
        shares = self.shares.get((sender, tag), {})
        if len(shares) < self.threshold:
            what = "self-mask" if tag == SELF else f"pair mask with {self.name(tag)}"
            raise RoundFailed(
                f"only {len(shares)} of {self.threshold} shares of {self.name(sender)}'s {what}"
            )
        expected = self.commitments[sender][tag]
        trusted = [x for x in sorted(shares) if x not in self.tamperers]
        pool = trusted if len(trusted) >= self.threshold else sorted(shares)
        combos = itertools.islice(_subsets(pool, self.threshold), MAX_RECOVERY_TRIES)
        for combo in combos:
            try:
                secret = shamir.reconstruct({x: shares[x] for x in combo})
            except ValueError:
                continue
            if ks.commitment(secret) == expected:
                # Every other share must lie on the same polynomial: name those that do not,
                # and leave them out from now on (also when the first t were all honest).
                points = {x: shares[x] for x in combo}
                rest = {x: y for x, y in shares.items() if x not in points}
                self.tamperers |= shamir.misfits(points, rest)
                return secret
        raise RoundFailed(f"shares of {self.name(sender)}'s masks do not match its commitment")

    def name(self, index: int) -> str:
        """A party as the caller knows it (a client id), else by its index in the round."""
        return self._name(index) if self._name else f"party {index}"


def _subsets(holders: list[int], t: int) -> Iterator[tuple[int, ...]]:
    """t-subsets to try: every cyclic window first (one bad holder is always left out of
    some window when more than t answered), then the rest: all of them in order when they
    are few, else random ones, so that bad holders spread over the windows (which leave
    none of them out) do not stop the search in the subsets that all start alike."""
    m = len(holders)
    windows = [tuple(sorted(holders[(i + j) % m] for j in range(t))) for i in range(m)]
    yield from dict.fromkeys(windows)
    tried = set(windows)
    if math.comb(m, t) <= MAX_RECOVERY_TRIES:
        yield from (c for c in itertools.combinations(holders, t) if c not in tried)
        return
    rng = random.Random(f"fedstream/subsets/{m}/{t}")
    while True:
        combo = tuple(sorted(rng.sample(holders, t)))
        if combo not in tried:
            tried.add(combo)
            yield combo

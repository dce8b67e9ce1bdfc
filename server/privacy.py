"""The server side of differential privacy: who clips, who adds the noise, and what each
round's model costs in privacy.

This is DP-FedAvg (McMahan et al. 2018) at the user level: each sampled client's model
change is clipped to L2 norm C, the changes are summed with equal weights, and Gaussian
noise of standard deviation z C is put on the sum; the strategy (FedAvg, FedAdam, ...)
then steps with the mean of that noisy sum. Either the server adds the noise, once, or
the clients add it, each its share z C / sqrt(k) of a round of k sampled clients.

- Secure aggregation: the clients clip (the server sees no single change), and by
  default add the noise, so the server sees only the noisy sum.
- Plaintext, noise at the server: the server clips what it receives and adds the noise;
  clipping there also tells it how large the changes are (`median_norm`, `clipped`).
- Plaintext, noise at the clients: the clients clip and noise, the server only averages.

The accountant is Google's dp-accounting (Rényi DP). fedstream samples a fixed number of
clients without replacement, so a round is a `SampledWithoutReplacementDpEvent`, which
dp-accounting supports under replace-one adjacency: two federations differ in one
client's whole stream. Replacing a client can move the sum by 2C, so the accountant sees
the noise multiplier z_round / 2, where z_round is the noise that really reached the sum:
with client noise, s survivors of k sampled carry z sqrt(s / k).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedstream.protocol import dp, updates
from fedstream.protocol import messages as m
from fedstream.protocol.config import PrivacyConfig

ADJACENCY = "replace-one client"
SAMPLING = "fixed-size cohorts, without replacement"
_NOISE_STREAM = 0x5D9  # the server's noise, apart from the clients'
# Rényi orders the accountant tries. dp-accounting's default 156 run to 1024, and a sampled
# round costs 160 ms to compose at those (the large orders dominate); these 51 cost 43 ms
# and agree with them within 1 % on every setting tried (epsilon 5 to 12,000). Each order
# gives a valid bound, so fewer orders can only make epsilon larger, never smaller.
# Unsampled rounds (every client trains) cost nothing.
ORDERS = tuple([1 + x / 8 for x in range(1, 16)] + list(range(3, 33)) + [40, 48, 56, 64, 96, 128])
# A Gaussian release costs nothing to compose at any order, and a small epsilon (a large
# noise multiplier) is reached only at large orders: near z sqrt(log(1/delta) / rounds).
# Capped at 128, epsilon could not fall below about 0.045 at delta 1e-5 whatever the
# noise, so a target of 0.03 was calibrated to 700 times the noise it needs. These run on
# to 10^9 in steps of 2^(1/4), where a step costs epsilon under 1 %.
GAUSSIAN_ORDERS = ORDERS + tuple(float(a) for a in np.geomspace(2**7.25, 2**30, 92))
NOISE_RANGE = (1e-4, 1e7)  # noise multipliers a target epsilon is calibrated within
# Secure aggregation's fixed point clips every coordinate to a range. Under privacy the
# range covers a clipped change (no coordinate beyond the L2 clip) plus this many standard
# deviations of a client's noise: a coordinate of noise reaches it with probability
# 3.6e-33, so a run of 10^12 coordinate updates cuts any with probability below 1e-20, far
# below any delta. Cutting the noise would leave less of it in the sum than the ledger
# counts, and the reported epsilon would not hold.
NOISE_SIGMAS = 12.0
VOID_UNPROTECTED = "models were released without privacy before the run resumed"
VOID_OLD_LEDGER = "the checkpoint's rounds do not say whose updates each sum held"
VOID_NO_NOISE = "a round was released without noise: clipping alone promises nothing"
VOID_UNCHECKED = (
    "a round's unmasked sum failed its checks: how many of its updates carried their noise "
    "is unknown"
)


@dataclass(frozen=True)
class Release:
    """One round's model as the accountant sees it."""

    noise_multiplier: float  # of the noise that reached the round's sum, over the clip
    sampled: int  # clients asked to train
    population: int  # clients they were drawn from


def client_std(noise_multiplier: float, clip_norm: float, cohort: int) -> float:
    """Each client's share of the noise, per coordinate: z C / sqrt(k), so that k shares
    sum to z C."""
    return noise_multiplier * clip_norm / cohort**0.5


def holds_against_server(noise_at: str, secure: bool) -> bool:
    """Whether a run's epsilon binds the server too: only when each update is noised
    before it is masked. Otherwise the server sees each update, or each exact sum."""
    return secure and noise_at == "clients"


def secure_clip(clip: float, clip_norm: float, client_std: float) -> float:
    """Secure aggregation's per-coordinate range for privatised changes: `clip` as set,
    raised where needed to cut neither the clipped change nor its noise."""
    return max(clip, clip_norm + NOISE_SIGMAS * client_std)


def _accountant(orders: tuple[float, ...] = ORDERS) -> Any:
    from dp_accounting import privacy_accountant, rdp

    replace_one = privacy_accountant.NeighboringRelation.REPLACE_ONE
    return rdp.RdpAccountant(orders=orders, neighboring_relation=replace_one)


def gaussian(noise_multiplier: float) -> Any:
    """The noisy sum as dp-accounting's event. Replacing a client moves the sum by up to 2C
    (its clipped change out, another in), so the noise is 1/2 of z in units of that."""
    from dp_accounting import dp_event

    return dp_event.GaussianDpEvent(noise_multiplier / 2)


def event(release: Release) -> Any:
    """The round as dp-accounting's event: the noisy sum of a cohort drawn at random."""
    from dp_accounting import dp_event

    return dp_event.SampledWithoutReplacementDpEvent(
        release.population, release.sampled, gaussian(release.noise_multiplier)
    )


def known_cohort_epsilon(exposure: float, delta: float) -> float:
    """Epsilon for one client against an observer who knows which rounds it was in (the
    server always does): no amplification by sampling, only the rounds its update was
    summed in. Gaussian rounds compose into one Gaussian: `exposure` is the sum of
    1 / z^2 over those rounds."""
    if exposure <= 0:
        return 0.0
    if math.isinf(exposure):
        return math.inf
    accountant = _accountant(GAUSSIAN_ORDERS)
    accountant.compose(gaussian(exposure ** -0.5))
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=8)  # a simulation asks twice: before it starts, and its server
def calibrated(target_epsilon: float, delta: float, rounds: int, sampled: int, population: int
               ) -> float:
    """The smallest noise multiplier (to 1 part in 10^6) whose `rounds` releases stay
    within `target_epsilon`, as the ledger reports it (the smaller of its two bounds).

    Epsilon falls as z grows. The search brackets z between powers of 4 from z = 1
    outwards, then runs Brent's method on log z, and steps the root up until it meets the
    target, so the answer is never on the unsafe side. Accounting a sampled round takes
    longer the smaller z is (seconds below z = 0.5), so the search evaluates as few
    points as it can, and small ones only when the answer is small: about 12, where
    bisecting the whole of NOISE_RANGE took 25, two of them tiny."""
    from scipy.optimize import brentq

    @functools.cache
    def over(z: float) -> float:  # how far z's epsilon exceeds the target (> 0: too little noise)
        return _spent(z, delta, rounds, sampled, population) - target_epsilon

    lo, hi = NOISE_RANGE
    if over(hi) > 0:
        raise ValueError(
            f"privacy.target_epsilon = {target_epsilon:g} is out of reach: {rounds} rounds "
            f"of {sampled} of {population} clients at delta = {delta:g} need a noise "
            f"multiplier above {hi:g}"
        )
    z, step = 1.0, 4.0 if over(1.0) > 0 else 0.25
    while (over(z * step) > 0) == (step > 1):
        z *= step
        if not lo < z * step < hi:
            break
    if step < 1 and over(max(z * step, lo)) <= 0:
        return lo  # even the least noise meets the target
    a, b = sorted([math.log(z), math.log(min(max(z * step, lo), hi))])
    z = math.exp(brentq(lambda u: over(math.exp(u)), a, b, xtol=1e-8, rtol=1e-12))
    while over(z) > 0:
        z *= 1 + 1e-7
    return z


def _spent(z: float, delta: float, rounds: int, sampled: int, population: int) -> float:
    ledger = Ledger(delta)
    ledger.add(Release(z, sampled, population), rounds)
    return ledger.epsilon


class Ledger:
    """Privacy spent by a sequence of releases (RDP, converted to (epsilon, delta))."""

    def __init__(self, delta: float, releases: Iterable[Release] = ()) -> None:
        self.delta = delta
        # Two bounds, and the smaller epsilon holds: dp-accounting's bound for sampling
        # without replacement is loose when most clients are sampled (19 of 20 would read
        # worse than 20 of 20), and a sampled round can never cost more than the same
        # round with every client in it.
        self._rdp, self._unsampled = _accountant(), _accountant(GAUSSIAN_ORDERS)
        self.releases = 0
        self._unbounded = False
        # Rényi DP adds up in any order: alike rounds are composed at once (a resumed run
        # with a thousand rounds behind it takes one composition, not a thousand).
        for release, count in collections.Counter(releases).items():
            self.add(release, count)

    def add(self, release: Release, count: int = 1) -> None:
        """Compose `count` rounds of `release` (at the cost of one)."""
        self.releases += count
        if not release.noise_multiplier > 0:  # no noise (or not a number): no epsilon holds
            self._unbounded = True
            return
        self._rdp.compose(event(release), count)
        self._unsampled.compose(gaussian(release.noise_multiplier), count)

    @property
    def epsilon(self) -> float:
        """Epsilon at `delta` so far: 0 before any release, inf if one had no noise."""
        if self._unbounded:
            return math.inf
        if not self.releases:
            return 0.0
        return float(min(a.get_epsilon(self.delta) for a in (self._rdp, self._unsampled)))


class Privacy:
    """The privacy stage of the server's round: ask, aggregate or noise, account."""

    def __init__(
        self,
        cfg: PrivacyConfig,
        secure: bool,
        seed: int | None = None,
        noise_multiplier: float | None = None,
    ) -> None:
        """`noise_multiplier`: the one `calibrated` for `cfg.target_epsilon`, if set."""
        self.cfg, self.seed = cfg, seed
        self.z = cfg.noise_multiplier if noise_multiplier is None else noise_multiplier
        self.client_noise = cfg.noise_at == "clients"
        self.clients_clip = secure or self.client_noise
        self.ledger = Ledger(cfg.delta)
        self.exposure: dict[str, float] = {}  # client -> sum of 1/z^2 over its rounds
        self.void: str | None = None  # why no bound holds, whatever comes next
        self._pending: tuple[int, int] | None = None  # this round's (sampled, population)
        self.client_std = 0.0  # the noise each client of this round adds, per coordinate
        self._norms: list[float] = []  # this round's change norms, where the server clips

    @property
    def secret_cohorts(self) -> bool:
        """Draw each round's clients from the OS's entropy: amplification by sampling
        holds only against observers who cannot know the cohort, so on real devices it
        must not follow from the config's seed (which every client holds). A simulation
        keeps its seeded, repeatable cohorts."""
        return self.seed is None

    def resume(self, entries: list[dict[str, Any]], aggregated: int) -> None:
        """Carry on from a checkpoint: the rounds in its records are already spent. Models
        it released without privacy (`aggregated` counts them too), or rounds recorded
        before the ledger knew whose updates each sum held, void both bounds."""
        self.ledger = Ledger(self.cfg.delta, releases_of(entries))
        # A reason recorded before the stop holds on (the unbounded round is in the ledger).
        self.void = next((e["void"] for e in entries if e.get("void")), None)
        if aggregated > len(entries):
            self.void = VOID_UNPROTECTED
        elif any("clients" not in entry for entry in entries):
            self.void = VOID_OLD_LEDGER
        for entry in entries:
            self._expose(entry.get("clients", []), entry["noise_multiplier"])

    def _expose(self, clients: list[str], z: float) -> None:
        for client in clients:
            self.exposure[client] = self.exposure.get(client, 0.0) + (
                z ** -2 if z > 0 else math.inf
            )

    def ask(self, messages: list[Message], population: int) -> None:
        """Tell the sampled clients to clip (and noise) their change, before they train."""
        self._pending = (len(messages), max(population, len(messages)))
        self.client_std = 0.0
        if not self.clients_clip or not messages:
            return
        if self.client_noise:
            # A restarted device's old node (the same client, still listed) is sampled too:
            # the shares are sized for the clients, so the devices' own floor (z / sqrt of
            # their clients) holds; the extra share only adds noise.
            cohort = min(len(messages), max(population, 1))
            self.client_std = client_std(self.z, self.cfg.clip_norm, cohort)
        for msg in messages:
            config = msg.content[m.CONFIG]
            config[m.DP_CLIP] = self.cfg.clip_norm
            config[m.DP_STD] = self.client_std

    def mean(self, server_round: int, replies: list[Message], arrays: ArrayRecord) -> Message:
        """The plaintext aggregate: every reply's change (clipped here, unless the clients
        did), averaged with equal weights, with the server's noise; one message the
        strategy takes its step with, as a secure round hands it one."""
        ok = [r for r in replies if not r.has_error()]
        if self.clients_clip:
            self.check_privatised(
                sum(m.PRIVATISED in r.content[m.METRICS] for r in ok), len(ok)
            )
        total = np.zeros(updates.size(arrays))
        norms = []
        for reply in ok:
            change = dp.model_change(reply.content[m.ARRAYS], arrays)
            if not self.clients_clip:
                norm = dp.clip_l2(change, self.cfg.clip_norm)
                if reply.content[m.METRICS].get(m.NUM_EXAMPLES, 1):  # no new samples: no size
                    norms.append(norm)
            total += change
        if ok:
            total /= len(ok)
            self.noise_onto(server_round, total, len(ok), arrays)
        self._norms = norms
        return aggregate_message(updates.shifted(arrays, total), len(ok))

    @staticmethod
    def check_privatised(privatised: int, summed: int) -> None:
        """Every update in the sum must have been clipped and noised by its client (a
        client without fedstream's privacy mod would go into the sum unbounded)."""
        if privatised != summed:
            raise ValueError(
                f"differential privacy: {summed - privatised} of {summed} clients sent an "
                "update they had not clipped and noised (a client without fedstream's "
                "privacy mod?); the round's model is not released"
            )

    def noise_onto(
        self, server_round: int, mean_change: np.ndarray, summed: int, arrays: ArrayRecord
    ) -> None:
        """Add the server's noise to the mean of `summed` changes (z C on their sum)."""
        if self.client_noise or summed <= 0:
            return
        std = self.z * self.cfg.clip_norm / summed
        dp.add_noise(mean_change, std, self._rng(server_round), dp.float_spans(arrays))

    def release(self, summed: int, clients: list[str], unchecked: bool = False) -> dict[str, Any]:
        """Account for the round's new model, made of `summed` clients' changes (`clients`
        names them); its entry in the round record. `unchecked`: the server saw a secure
        sum whose tail failed its checks, so `summed` is not known; with the noise on the
        clients, no bound holds from then on (one client's bad tail is enough)."""
        if self._pending is None:
            raise RuntimeError("a release without a sampled round (call ask first)")
        sampled, population = self._pending
        self._pending = None
        z = self.z
        if self.client_noise and unchecked:
            z, self.void = 0.0, self.void or VOID_UNCHECKED
        elif self.client_noise:
            z *= (summed / sampled) ** 0.5  # the missing clients' shares never came
        release = Release(z, sampled, population)
        self.ledger.add(release)
        self._expose(clients, z)
        worst = max(self.exposure.values(), default=0.0)
        epsilon = self.ledger.epsilon  # composed once: each read converts every order
        entry: dict[str, Any] = {
            **dataclasses.asdict(release), "planned_noise_multiplier": self.z, "summed": summed,
            "clients": sorted(clients), "epsilon": epsilon,
            "epsilon_known_cohorts": known_cohort_epsilon(worst, self.cfg.delta),
        }
        void = self.void or (VOID_NO_NOISE if math.isinf(epsilon) else None)
        if void:
            entry.update(epsilon=math.inf, epsilon_known_cohorts=math.inf, void=void)
        norms, self._norms = self._norms, []
        if norms:
            entry["median_norm"] = statistics.median(norms)
            entry["clipped"] = sum(n > self.cfg.clip_norm for n in norms)
            entry["measured"] = len(norms)  # of the summed updates, those with new samples
        return entry

    def _rng(self, server_round: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()  # OS entropy
        return np.random.default_rng([self.seed, server_round, _NOISE_STREAM])


def aggregate_message(arrays: ArrayRecord, weight: int) -> Message:
    """The one message a strategy steps with: an aggregate that stands for `weight`.

    Under differential privacy `weight` is the number of updates summed, never their
    examples: a round whose clients learned nothing still releases its noisy model, since
    releasing one or not according to the clients' data would itself tell of the data."""
    return Message(
        RecordDict({m.ARRAYS: arrays, m.METRICS: MetricRecord({m.NUM_EXAMPLES: weight})}),
        dst_node_id=0,
        message_type=MessageType.TRAIN,
    )


def releases_of(entries: Iterable[dict[str, Any]]) -> list[Release]:
    """The releases behind round records' `privacy` entries (to resume a ledger)."""
    return [Release(e["noise_multiplier"], e["sampled"], e["population"]) for e in entries]

"""The contract every data source honours, plus the counter-based sampling helper they share.

A source maps *stream positions* to samples. Making that map a pure function of
``(seed, client, position)`` is what lets the simulator replay a client's stream after a
restart, draw a round's batch in one call or in many, and compare strategies on exactly
the same data. We get it by seeding one generator per block of ``BLOCK`` positions
(counter-based seeding) instead of advancing one long-lived generator.

Seed keys of the streams (``np.random.default_rng(key)``):

* ``[seed, client, SAMPLE_TAG, block]``  per-client sample randomness (this module)
* ``[seed, CONCEPT_TAG, k]``             concept ``k`` parameters, shared by all clients
* ``[seed, client, STAGGER_TAG]``        a client's drift-time offset (``drift.staggered``)
* ``[seed, client, 0xA7, r]``            arrivals of round ``r >= 1`` (``client.arrival``)

``client`` in these keys is ``client_key(client)``, so negative ids work too. Others:
``[seed, 0x5E, client]`` and ``[seed, 0x9E, k]`` (relabelling, ``relabel.py``),
``[seed, 0x40]`` (a file's hold-out rows), ``[seed, 0xB0]`` (clients' rates),
``[seed, 0xD0, client, round]`` (simulated dropouts), ``[seed, round, client, stream]``
(privacy noise and secure rounding, ``client/privacy.py``), ``[seed, round, stream]``
(the server's noise).

The layouts differ, and numpy pads a short key with zeros, so keys can coincide: client
192 (0xC0) has concept 87's key as its drift offset and concept 218's as its first
sample block, and client 218 (0xDA) draws its privacy noise in round r from client r's
sample block ``stream``. Federations below 192 clients never meet it; one layout for all
would change every simulated stream (and every figure measured on them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

BLOCK = 256
SAMPLE_TAG = 0xDA
CONCEPT_TAG = 0xC0
STAGGER_TAG = 0x57

BlockDraw = Callable[[np.random.Generator, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class DataError(ValueError):
    """Bad input data; message names file, line and column where known."""


@runtime_checkable
class Source(Protocol):
    """A (possibly unbounded) stream of labelled samples addressed by position."""

    feature_shape: tuple[int, ...]
    n_classes: int
    length: int | None

    def draw(self, index: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 (n, *feature_shape), y int64 (n,) for the samples at stream positions `index`
        (int64, ascending, 0-based) which arrive at times `t` (float64, in rounds).

        Deterministic: the same index (and t) always gives the same sample, whatever the
        chunking of calls (draw(0..9) then draw(10..19) == draw(0..19))."""
        ...

    def concept(self, t: np.ndarray) -> np.ndarray:
        """int concept id in force at times t (0 before any drift); replay sources return zeros."""
        ...


def concept_rng(seed: int, k: int) -> np.random.Generator:
    """Generator for concept ``k``: independent of the client, so every client sees the same
    concept and a drift is a global event that federated training must track."""
    return np.random.default_rng([seed, CONCEPT_TAG, k])


def client_key(client: int) -> int:
    """Client id as a seed word. Seed words must be non-negative, but negative ids are
    useful for special streams (e.g. -1 for a held-out evaluation stream); they map to
    2**32 + id, far from any real client."""
    return client % (1 << 32)


def block_rng(seed: int, client: int, block: int) -> np.random.Generator:
    """Generator for one block of positions of one client's stream."""
    return np.random.default_rng([seed, client_key(client), SAMPLE_TAG, block])


def check_positions(
    index: np.ndarray, t: np.ndarray, length: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and normalise ``draw`` arguments, so every source fails the same clear way."""
    idx = np.asarray(index)
    if idx.ndim != 1:
        raise ValueError(f"index must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"index must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    times = np.broadcast_to(np.asarray(t, dtype=np.float64), idx.shape)
    if idx.size:
        if idx.min() < 0:
            raise ValueError("index must be non-negative")
        if length is not None and idx.max() >= length:
            raise IndexError(f"index {int(idx.max())} out of range for a source of length {length}")
    return idx, times


def draw_blocks(
    index: np.ndarray,
    t: np.ndarray,
    *,
    seed: int,
    client: int,
    feature_shape: tuple[int, ...],
    draw_block: BlockDraw,
    memo: dict[int, list[np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluate ``draw_block(rng, offsets, t)`` once per touched block and reassemble.

    ``draw_block`` must consume its generator identically whatever ``offsets`` asks for
    (draw the whole block, then select); that is what makes results independent of how the
    caller chunks its requests. Work is vectorised within a block; the Python loop runs
    over blocks only, so its overhead is amortised over up to ``BLOCK`` samples.

    ``memo`` (owned by the source) keeps what the last block's generator produced: a stream
    read a few samples per round redraws the same block many times, and replaying the
    recorded arrays gives identical samples without generating them again.
    """
    idx, times = check_positions(index, t, None)
    n = idx.size
    x = np.empty((n, *feature_shape), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    if n == 0:
        return x, y
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    blocks = sorted_idx // BLOCK
    starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
    stops = np.r_[starts[1:], n]
    for lo, hi in zip(starts.tolist(), stops.tolist(), strict=True):
        rows = order[lo:hi]
        block = int(blocks[lo])
        rng = _block_generator(seed, client, block, memo)
        x[rows], y[rows] = draw_block(rng, sorted_idx[lo:hi] % BLOCK, times[rows])
    return x, y


def _block_generator(
    seed: int, client: int, block: int, memo: dict[int, list[np.ndarray]] | None
) -> Any:
    if memo is None:
        return block_rng(seed, client, block)
    if block in memo:
        return _Replay(memo[block])
    memo.clear()  # one block per source: memory stays flat however many clients a worker serves
    memo[block] = []
    return _Record(block_rng(seed, client, block), memo[block])


class _Record:
    """A generator that keeps (read-only) every array it hands out."""

    def __init__(self, rng: np.random.Generator, tape: list[np.ndarray]) -> None:
        self._rng, self._tape = rng, tape

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._rng, name)

        def record(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            if isinstance(out, np.ndarray):
                out.flags.writeable = False  # a replay must see exactly what was drawn
            self._tape.append(out)
            return out

        return record


class _Replay:
    """Hands out a recorded block's arrays again, in the order they were drawn."""

    def __init__(self, tape: list[np.ndarray]) -> None:
        self._next = iter(tape).__next__

    def __getattr__(self, _name: str) -> Any:
        return lambda *_args, **_kwargs: self._next()


def normalise_prior(prior: np.ndarray | None, n_classes: int) -> np.ndarray:
    """Return a validated probability vector (uniform if ``prior`` is None)."""
    if prior is None:
        return np.full(n_classes, 1.0 / n_classes)
    p = np.asarray(prior, dtype=np.float64)
    if p.shape != (n_classes,):
        raise ValueError(f"class_prior must have shape ({n_classes},), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("class_prior must be finite, non-negative and not all zero")
    return p / p.sum()


def sample_labels(prior: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF sampling of class ids from uniforms ``u`` (vectorised)."""
    cdf = np.cumsum(prior)
    cdf[-1] = 1.0
    return np.minimum(np.searchsorted(cdf, u, side="right"), prior.size - 1).astype(np.int64)

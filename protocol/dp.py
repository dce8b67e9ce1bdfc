"""The two steps of differential privacy on a model update: clip its L2 norm, add noise.

Both sides use them: the client on its own change before it is quantized and masked, the
server again on what it can see (plaintext replies, and the aggregate when it adds the
noise itself). A change is a flat float64 vector in the model's key order, the layout of
`updates.delta_pieces`, so it goes back into a model with `updates.shifted`.

Integer arrays (a BatchNorm batch counter) are not trained under differential privacy:
their slots in the change are zero, so they keep the global model's values. A counter
moves with the number of batches a client learned from, which no noise hides.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord

from fedstream.protocol.updates import BLOCK, delta_pieces, size, view


def float_spans(arrays: ArrayRecord) -> list[tuple[int, int]]:
    """The [start, stop) ranges of the flat vector that belong to floating-point arrays."""
    spans, start = [], 0
    for arr in arrays.values():
        values = view(arr)
        if np.issubdtype(values.dtype, np.floating):
            spans.append((start, start + values.size))
        start += values.size
    return spans


def model_change(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """`new - old` of the float arrays, flat, in float64; zero where an array is integer.
    (`updates.delta_pieces` checks the layouts and takes the difference.)"""
    change = np.empty(size(old))
    for lo, piece in delta_pieces(new, old, BLOCK):
        change[lo : lo + piece.size] = piece
    start = 0
    for lo, hi in [*float_spans(old), (change.size, change.size)]:
        change[start:lo] = 0.0  # the integer arrays between float ones
        start = hi
    return change


def clip_l2(change: np.ndarray, bound: float) -> float:
    """Scale `change` in place to an L2 norm of at most `bound`; returns its norm before.

    A change that is not finite (a diverged client) is zeroed: it carries no information
    a bound could keep, and its noise still goes out."""
    norm = math.sqrt(float(np.dot(change, change)))
    if not math.isfinite(norm):
        change[:] = 0.0
    elif norm > bound:
        change *= bound / norm
    return norm


def add_noise(
    change: np.ndarray, std: float, rng: np.random.Generator, spans: list[tuple[int, int]]
) -> None:
    """Add N(0, std^2) to every float coordinate of `change`, in place."""
    if std <= 0:
        return
    for lo, hi in spans:
        change[lo:hi] += rng.normal(0.0, std, hi - lo)

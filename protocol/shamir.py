"""Shamir t-of-n secret sharing of 255-bit secrets over the prime field GF(2^255 - 19).

A secret is one field element, so a share is 32 bytes and there is no chunking to get wrong;
secure aggregation clears the top bit of its 32-byte seeds to fit (255 bits of entropy
remain). Coefficients come from the OS CSPRNG (`secrets`). Any t shares give the secret;
fewer give a value that is uniformly random over the field, and `reconstruct` returns it
all the same: nothing in the shares can tell, so callers check the result against a
commitment to the secret (secure aggregation publishes SHA-256 commitments).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**255 - 19
SHARE_BYTES = 32


def split(secret: bytes, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` (SHARE_BYTES bytes, below PRIME) for each holder x (distinct,
    1 <= x < PRIME); any `threshold` of them recover it."""
    if len(secret) != SHARE_BYTES:
        raise ValueError(f"a secret has {SHARE_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} outside 1..{len(holders)} holders")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError("share holders must be distinct positive integers")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret does not fit the field: clear its top bit")
    coeffs = [value] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _evaluate(coeffs, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def is_share(y: object) -> bool:
    """Whether `y` can be a share at all: SHARE_BYTES bytes holding a field element."""
    return isinstance(y, bytes) and len(y) == SHARE_BYTES and int.from_bytes(y, "big") < PRIME


def reconstruct(shares: Mapping[int, bytes]) -> bytes:
    """The secret behind `shares` (x -> share), by Lagrange interpolation at 0.

    Fewer than t shares, or a tampered one, give a wrong secret that looks like any other
    (see the module docstring): check it against a commitment. Raises ValueError only for
    shares that are malformed: none, a holder outside 1..PRIME-1, or not a field element
    of SHARE_BYTES bytes.
    """
    if not shares:
        raise ValueError("no shares")
    points = []
    for x, y in shares.items():
        if not 0 < x < PRIME:
            raise ValueError(f"share holder {x} is outside 1..2^255 - 20")
        if not is_share(y):
            raise ValueError(f"share of holder {x} is not a {SHARE_BYTES}-byte field element")
        points.append((x, int.from_bytes(y, "big")))
    return _interpolate(points, 0).to_bytes(SHARE_BYTES, "big")


def misfits(points: Mapping[int, bytes], others: Mapping[int, bytes]) -> set[int]:
    """The holders in `others` whose shares do not lie on the polynomial through `points`.

    Once `points` rebuilt a secret that matched its commitment, they are the polynomial:
    a share off it was tampered with, so its holder need not be tried for other secrets.
    """
    xs = list(points)
    ys = [int.from_bytes(points[x], "big") for x in xs]
    # Barycentric form: the weights once per polynomial, then O(t) per share checked (the
    # server checks every share it took, and a share group can hold hundreds).
    weights = [pow(math.prod(xi - xj for xj in xs if xj != xi) % PRIME, -1, PRIME)
               for xi in xs]
    off = set()
    for x, y in others.items():
        gaps = [(x - xi) % PRIME for xi in xs]  # never 0: x is not one of the points
        total = sum(w * yi * pow(g, -1, PRIME) for w, yi, g in zip(weights, ys, gaps, strict=True))
        if (math.prod(gaps) * total % PRIME).to_bytes(SHARE_BYTES, "big") != y:
            off.add(x)
    return off


def _interpolate(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at `x` of the polynomial through `points` (Lagrange)."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc

"""Fixed-point encoding of updates into the ring Z / 2^bits, and back.

Masking only works on integers modulo a power of two, and the masked sum must not wrap. So
each coordinate is clipped to [-clip, clip] and scaled so that the sum of `parties` such
values always fits in the signed half of the ring; stochastic rounding keeps every encoded
value an unbiased estimate of the real one, so quantization error averages out over clients
and rounds instead of accumulating as a bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_BITS = 53  # float64 holds every integer up to 2^53: scaling stays exact


def ring_dtype(bits: int) -> np.dtype:
    """The narrowest unsigned dtype holding `bits`: the wire size of one coordinate."""
    if not 2 <= bits <= 64:
        raise ValueError(f"ring bits must be in 2..64, got {bits}")
    for width in (8, 16, 32, 64):
        if bits <= width:
            return np.dtype(f"<u{width // 8}")
    raise AssertionError


@dataclass(frozen=True)
class Quantizer:
    """Encoding shared by all parties of one round: ring size, clipping range and party count."""

    bits: int
    clip: float
    parties: int

    def __post_init__(self) -> None:
        ring_dtype(self.bits)
        if self.bits > MAX_BITS:
            raise ValueError(
                f"ring bits must be at most {MAX_BITS}: wider rings cannot be scaled exactly "
                "in float64"
            )
        if self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip}")
        if self.parties < 1 or self.headroom < 1:
            raise ValueError(
                f"a {self.bits}-bit ring cannot hold the sum of {self.parties} parties: "
                "use more bits"
            )

    @property
    def headroom(self) -> int:
        # Each party may round up by one step, so keep `parties` steps in reserve.
        return (1 << (self.bits - 1)) - 1 - self.parties

    @property
    def scale(self) -> float:
        """Ring steps per unit: the sum of `parties` values in [-clip, clip] never wraps."""
        return self.headroom / (self.parties * self.clip)

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1

    def encode(
        self, values: np.ndarray, rng: np.random.Generator, weight: float = 1.0
    ) -> tuple[np.ndarray, int]:
        """Ring elements for `weight` x `values` clipped to [-clip, clip] (weight in [0, 1]),
        and how many coordinates were clipped."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        values = np.asarray(values, dtype=np.float64)
        clipped = int(np.count_nonzero(np.abs(values) > self.clip))
        scaled = np.clip(values, -self.clip, self.clip)
        scaled *= self.scale * weight
        # floor(x + U), U ~ [0, 1): rounds up with probability frac(x), so E[q] = x.
        scaled += rng.random(scaled.shape, dtype=np.float32)
        np.floor(scaled, out=scaled)
        ring = scaled.astype(np.int64).astype(self.dtype)  # two's complement, mod 2^width
        if self.bits != 8 * self.dtype.itemsize:
            np.bitwise_and(ring, self.dtype.type(self.mask), out=ring)
        return ring, clipped

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Real values of (sums of) encoded vectors: the upper half of the ring is negative."""
        ints = ring.astype(np.uint64) & np.uint64(self.mask)
        signed = ints.astype(np.int64)
        if self.bits < 64:
            signed = np.where(signed >= (1 << (self.bits - 1)), signed - (1 << self.bits), signed)
        return signed.astype(np.float64) / self.scale

    def add(self, acc: np.ndarray, other: np.ndarray, sign: int = 1) -> None:
        """acc += sign * other in the ring, in place (numpy wraps unsigned arithmetic)."""
        if sign > 0:
            np.add(acc, other, out=acc)
        else:
            np.subtract(acc, other, out=acc)
        if self.bits not in (8, 16, 32, 64):
            np.bitwise_and(acc, acc.dtype.type(self.mask), out=acc)

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

from fedstream.protocol.keyschedule import Keystream

MAX_BITS = 53  # float64 holds every integer up to 2^53: scaling stays exact
_ROUND = 1.5 * 2.0**84  # x + _ROUND is a float whose last ulp is 2^32: the sum rounds x


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

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Real values of (sums of) encoded vectors: the upper half of the ring is negative."""
        return np.multiply(self.signed(ring), 1.0 / self.scale, dtype=np.float64)

    def signed(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers (decode = signed / scale).

        A full-width ring is two's complement already: it is read as signed, in place.
        """
        if ring.dtype == self.dtype and self.bits == 8 * self.dtype.itemsize:
            return ring.view(np.dtype(f"<i{self.dtype.itemsize}"))
        ints = (ring.astype(np.uint64) & np.uint64(self.mask)).astype(np.int64)
        if self.bits < 64:
            ints = np.where(ints >= (1 << (self.bits - 1)), ints - (1 << self.bits), ints)
        return ints

    def add(self, acc: np.ndarray, other: np.ndarray, sign: int = 1) -> None:
        """acc += sign * other in the ring, in place (numpy wraps unsigned arithmetic)."""
        if sign > 0:
            np.add(acc, other, out=acc)
        else:
            np.subtract(acc, other, out=acc)
        if self.bits not in (8, 16, 32, 64):
            np.bitwise_and(acc, acc.dtype.type(self.mask), out=acc)


class Encoder:
    """Encodes one vector given in consecutive pieces exactly as if it came whole.

    A client quantizes and masks its model change one piece at a time, so it never holds the
    change whole in float64; the rounding noise is one stream per vector, so how the vector
    is cut changes nothing in the result.
    """

    def __init__(self, q: Quantizer, rng: np.random.Generator, weight: float = 1.0) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        self.q, self.rng = q, rng
        self.clipped = 0  # coordinates clipped so far (NaNs included)
        self._wide = q.dtype.itemsize == 8
        # 32-bit noise words are keyed by the generator, so the stream is fixed per vector.
        self._noise = None if self._wide else Keystream(rng.bytes(32))
        self._factor = q.scale * weight * (1.0 if self._wide else 2.0**32)

    def __call__(self, x: np.ndarray, out: np.ndarray) -> None:
        """Write the ring elements of the next piece `x` (float64, overwritten) into `out`."""
        q = self.q
        self.clipped += self._clip(x)
        x *= self._factor
        if self._wide:
            self._encode_wide(x, out)
            return
        # Stochastic rounding: rint(x + U - 1/2), U ~ [0, 1), rounds up with probability
        # frac(x) (as floor(x + U) does), so E[q] = x. Everything is scaled by 2^32 (exact),
        # so that U - 1/2 is just 32 random bits read as an int32 (from an AES keystream
        # keyed by the generator: four times faster than numpy's floats). Adding 1.5 * 2^84
        # does the rint and leaves the integer, mod 2^32, in the float's low 32 bits
        # (|x| < 2^31 steps here): the ring element, with no integer temporaries. 32-bit
        # noise is drawn into the output's own memory, which it leaves just before the
        # result moves in.
        noise = out.view(np.int32) if out.dtype.itemsize == 4 else np.empty(x.shape, np.int32)
        self._noise.into(noise.view(np.uint8))
        x += noise
        x += _ROUND
        np.copyto(out, x.view(np.uint64), casting="unsafe")  # keeps the low bits
        if q.bits != 8 * q.dtype.itemsize:
            np.bitwise_and(out, q.dtype.type(q.mask), out=out)

    def _clip(self, x: np.ndarray) -> int:
        """Clip `x` in place to [-clip, clip]; NaNs become 0. How many values changed."""
        if x.size == 0 or (x.min() >= -self.q.clip and x.max() <= self.q.clip):
            return 0  # the common case, in two fast reductions and no temporaries
        nans = np.isnan(x)
        changed = int(np.count_nonzero(nans))
        x[nans] = 0.0
        changed += int(np.count_nonzero(x > self.q.clip) + np.count_nonzero(x < -self.q.clip))
        np.clip(x, -self.q.clip, self.q.clip, out=x)
        return changed

    def _encode_wide(self, x: np.ndarray, out: np.ndarray) -> None:
        """Rings above 32 bits: floor(x + U) through int64 (the float trick needs |x| < 2^51)."""
        x += self.rng.random(x.shape, dtype=np.float32)
        np.floor(x, out=x)
        np.copyto(out, x.astype(np.int64).view(np.uint64))
        if self.q.bits != 64:
            np.bitwise_and(out, np.uint64(self.q.mask), out=out)

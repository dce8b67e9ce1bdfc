"""The key schedule of fedstream's secure aggregation: every derivation, fixed byte for byte.

All primitives come from `cryptography`; this module only fixes how they are chained, so a
client written in another language can interoperate from the README and the known-answer
tests alone. Integers are big-endian; `||` is concatenation.

- `agree(sk, pk)`: X25519, 32 bytes.
- `share_key`: HKDF-SHA256(ikm=agree(c_u, c_v), salt=session, info=b"fedstream/secagg/v1/share"
  || u64(round) || u32(sender) || u32(receiver), 32 bytes); one key per direction and round.
- `seal` / `open_`: ChaCha20-Poly1305 with that key, a random 12-byte nonce prepended to the
  ciphertext, and as associated data the same info bytes || the receiver's mask public key
  of the round (`share_ad`), so a share can neither be replayed into another round nor
  re-addressed, and opens only in the receiver's memo of the round it masked in with that
  key: a mask key masks once, so a holder answers about a share once.
- `pair_seed`: HKDF-SHA256(ikm=agree(s_u, s_v), salt=session, info=b"fedstream/secagg/v1/pair"
  || u64(round), 32 bytes); symmetric in u and v.
- `Keystream(seed)`: AES-128 in counter mode keyed with the last 16 bytes of the 32-byte
  seed, in segments of 2^16 blocks (1 MiB): block i of the stream is
  AES-128(seed[16:], u96(i // 2^16) || u32(2 + i % 2^16)), so segment j is exactly
  AES-128-GCM's ciphertext of zeros under the nonce u96(j) (its tag unused), and also
  AES-CTR from the block u96(j) || u32(2). It is computed in whichever of the two modes
  OpenSSL runs faster on the CPU (`segment_mode`): GCM has vector-AES code on some
  x86-64 CPUs, twice CTR's speed there; on others CTR is faster. AES rather than ChaCha20
  because masks are the hot path (one model-sized stream per neighbour) and
  AES-NI/ARMv8-AES run it two to three times as fast; a 128-bit key because X25519,
  which every seed comes from, gives 128-bit security, so AES-256's four extra rounds
  would buy nothing. The last 16 bytes because a Shamir
  field seed has the top bit of its first byte cleared.
- `commitment(b)`: SHA-256(b"fedstream/secagg/v1/commit" || b), published with a self-mask
  seed so the server can check the seed it reconstructs.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

LABEL = b"fedstream/secagg/v1/"
NONCE = 12
SEED_BYTES = 32  # every seed: pair seeds, self-mask seeds, rounding-noise keys
RAW = serialization.Encoding.Raw


class DecryptError(ValueError):
    """A ciphertext that is not what its sender, receiver and round say it is."""


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_key(private: bytes) -> bytes:
    return _private(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes) -> bytes:
    return _private(private).exchange(X25519PublicKey.from_public_bytes(peer_public))


_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


def usable_public_key(public: bytes) -> bool:
    """Whether X25519 with this public key gives a shared secret (not a low-order point).

    OpenSSL refuses an agreement whose result is all zeros. A key offer that fails here
    would make every honest neighbour's round fail, so the server refuses it at once.
    """
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


@lru_cache(maxsize=64)
def _private(raw: bytes) -> X25519PrivateKey:
    # Loading a raw key derives its public point (a scalar multiplication, as costly as an
    # agreement); a party uses its two keys in a dozen derivations per round.
    return X25519PrivateKey.from_private_bytes(raw)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def share_info(server_round: int, sender: int, receiver: int) -> bytes:
    return LABEL + b"share" + struct.pack(">QII", server_round, sender, receiver)


def share_ad(server_round: int, sender: int, receiver: int, receiver_mask_pub: bytes) -> bytes:
    return share_info(server_round, sender, receiver) + receiver_mask_pub


def share_key(
    private: bytes,
    peer_public: bytes,
    session: bytes,
    server_round: int,
    sender: int,
    receiver: int,
) -> bytes:
    info = share_info(server_round, sender, receiver)
    return hkdf(_long_lived_agreement(private, peer_public), session, info)


@lru_cache(maxsize=1024)
def _long_lived_agreement(private: bytes, peer_public: bytes) -> bytes:
    # Encryption keys live as long as a device does, so each agreement serves every round:
    # a party derives a share key with each of its holders and senders twice a round.
    # (Mask keys change every round; their agreements are never kept.)
    return agree(private, peer_public)


def seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def open_(key: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE], ciphertext[NONCE:], ad)
    except (InvalidTag, ValueError) as err:
        raise DecryptError("share does not authenticate") from err


def pair_seed(private: bytes, peer_public: bytes, session: bytes, server_round: int) -> bytes:
    return hkdf(
        agree(private, peer_public), session, LABEL + b"pair" + struct.pack(">Q", server_round)
    )


class Keystream:
    """The keystream of `seed` read in consecutive pieces, from any byte `offset` on.

    Reading a mask piece by piece lets a caller add it to a vector without ever holding a
    model-sized mask, and an offset lets threads expand disjoint ranges of one mask. Each
    segment is one GCM encryption of zeros (the stream's layout: the module docstring); a
    start inside a segment reads the rest of that segment in CTR mode from the same counter
    block, where CTR's 128-bit increment and GCM's 32-bit one agree.
    """

    def __init__(self, seed: bytes, offset: int = 0) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a keystream seed has {SEED_BYTES} bytes, got {len(seed)}")
        self._aes = algorithms.AES(seed[SEED_BYTES - 16 :])
        segment, skip = divmod(int(offset), SEGMENT)
        self._segment = segment  # the next segment to open in GCM mode
        if skip:
            block, extra = divmod(skip, 16)
            self._ctx = Cipher(self._aes, _ctr(segment, block)).encryptor()
            self._ctx.update(bytes(extra))
            self._segment, self._left = segment + 1, SEGMENT - skip
        else:
            self._ctx, self._left = None, 0

    def into(self, out: np.ndarray) -> None:
        """Fill the contiguous uint8 array `out` with the next `out.nbytes` bytes."""
        start = 0
        while start < out.nbytes:
            if not self._left:
                self._ctx = Cipher(self._aes, segment_mode()(self._segment)).encryptor()
                self._segment, self._left = self._segment + 1, SEGMENT
            n = min(self._left, out.nbytes - start)
            self._ctx.update_into(_ZEROS[:n], out[start : start + n])
            start, self._left = start + n, self._left - n


SEGMENT = 1 << 20  # keystream bytes under one GCM nonce (2^16 blocks)
PIECE = 1 << 18  # bytes a caller reads at a time (see README: Cost)
_ZEROS = np.zeros(SEGMENT, dtype=np.uint8)  # only ever read (CTR encrypts zeros to the stream)
_ZEROS.flags.writeable = False


def _gcm(segment: int) -> modes.Mode:
    return modes.GCM(segment.to_bytes(12, "big"))


def _ctr(segment: int, block: int = 0) -> modes.Mode:
    return modes.CTR(segment.to_bytes(12, "big") + (2 + block).to_bytes(4, "big"))


@lru_cache(maxsize=1)  # timed on the first mask of a process, not when it imports this
def segment_mode() -> Callable[[int], modes.Mode]:
    """GCM or CTR, whichever OpenSSL runs faster on this CPU: the same bytes either way
    (segment j is AES-CTR from the block u96(j) || u32(2)), but OpenSSL has vector-AES
    code for GCM and not for CTR on some x86-64 CPUs (twice as fast there), and the
    reverse holds on others (CTR 2.4 times GCM's speed on one this was measured on).
    Timed once per process, on 1 MiB each, the best of three: about a millisecond."""
    aes, out = algorithms.AES(bytes(16)), np.empty(SEGMENT, dtype=np.uint8)
    best = {}
    for name, mode in (("gcm", _gcm), ("ctr", _ctr)):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            Cipher(aes, mode(0)).encryptor().update_into(_ZEROS, out)
            times.append(time.perf_counter() - started)
        best[name] = min(times)
    return _ctr if best["ctr"] < best["gcm"] else _gcm


def commitment(seed: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(LABEL + b"commit" + seed)
    return digest.finalize()

"""Known-answer tests for the secure-aggregation key schedule (protocol/keyschedule.py).

Two layers, so that a client in another language can interoperate from these values alone:
the primitives are the standard ones (RFC 7748 X25519, RFC 5869 HKDF-SHA256, RFC 8439
ChaCha20-Poly1305, AES-128 in counter mode as GCM runs it, anchored on GCM's own test
case 2), and fedstream's own derivations are pinned to hex literals. Each
pinned value is also rebuilt here from `cryptography`/`hashlib` calls with
the salt, info and associated-data bytes written out by hand from the module docstring, so a
failure means the wire spec changed, not just the code.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from fedstream.protocol import keyschedule as ks
from fedstream.protocol import secagg, shamir
from fedstream.protocol.fixedpoint import Quantizer

# RFC 7748, section 6.1.
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 2: AES-128-GCM with the
# all-zero key and nonce encrypts a zero block to this, i.e. AES-128(0, 0^96 || u32(2)):
# block 0 of the keystream of the all-zero seed (whose last 16 bytes are the key).
GCM_TEST_CASE_2 = bytes.fromhex("0388dace60b6a392f328c2b971b2fe78")
# Blocks 0..2 of the keystream of the all-zero seed (block i = AES-128(seed[16:],
# u96(i // 2^16) || u32(2 + i % 2^16))).
ZERO_SEED_STREAM = bytes.fromhex(
    "0388dace60b6a392f328c2b971b2fe78f795aaab494b5923f7fd89ff948bc1e0"
    "200211214e7394da2089b6acd093abe0"
)
# Block 2^16 of the same stream: the first of segment 1 (nonce u96(1)).
ZERO_SEED_SEGMENT_1 = bytes.fromhex("6e01d930078872bd5b32ec9465fd4798")


def _counter_blocks(key: bytes, first: int, n: int) -> bytes:
    """Blocks first..first+n-1 of a keystream, as AES-128-ECB of their counter blocks."""
    counters = b"".join(
        (i // 2**16).to_bytes(12, "big") + (2 + i % 2**16).to_bytes(4, "big")
        for i in range(first, first + n)
    )
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(counters)


# fedstream's derivations for session 00..0f, round 7, sender 1 (Alice), receiver 2 (Bob).
SESSION = bytes(range(16))
ROUND, SENDER, RECEIVER = 7, 1, 2
SHARE_INFO = bytes.fromhex(
    "66656473747265616d2f7365636167672f76312f7368617265"  # b"fedstream/secagg/v1/share"
    "0000000000000007"  # u64 round
    "00000001"  # u32 sender
    "00000002"  # u32 receiver
)
SHARE_KEY = bytes.fromhex("30f4515da7583f3c0009c1f059caa7d5dc1f2d6fec31b27bd5662de78bce27b7")
SHARE_KEY_2_TO_1 = bytes.fromhex("e13c0fcd89abb48d4f2ab58b921193f988cfe05ea3494e37f775cb52af16c0aa")
PAIR_SEED = bytes.fromhex("fdb2420d5b02c5a25cb2008ebc2110c6fabfea2fdcf88edd11b2d4c07e3aadf4")
COMMIT_ZERO = bytes.fromhex("07ebac56c389222565c7330b15edae1b1d0d3a2d22b448c21f7a41e44593f7a8")
# An arbitrary plaintext (a u32 tag, then 66 bytes holding 12345) sealed with SHARE_KEY.
PLAINTEXT = (0).to_bytes(4, "big") + (12345).to_bytes(66, "big")
SEALED = bytes.fromhex(
    "b53e8868a6356bbb1f27d5a2"  # random 12-byte nonce, prepended
    "c3a8e80f1be5359080c08af338256f2cc107ba74337a92e8aee99858eee41222dcfd1c4f6d7bab00edd0"
    "7038d5e538200c45c9c09b5838c52e4bf3234320539b1a2fea442796204b5bb7dc22cb24a518c2308af5"
    "dc3c"
)


def _keystream(seed: bytes, nbytes: int) -> bytes:
    """The first `nbytes` of a seed's keystream."""
    out = np.empty(nbytes, dtype=np.uint8)
    ks.Keystream(seed).into(out)
    return out.tobytes()


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# --- the primitives are the standard ones ------------------------------------------------


def test_x25519_is_rfc7748() -> None:
    assert ks.public_key(ALICE_SK) == ALICE_PK
    assert ks.public_key(BOB_SK) == BOB_PK
    assert ks.agree(ALICE_SK, BOB_PK) == SHARED == ks.agree(BOB_SK, ALICE_PK)


def test_hkdf_is_rfc5869_case_1() -> None:
    okm = ks.hkdf(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_keystream_is_aes128_gcm_of_zeros_from_gcm_test_case_2() -> None:
    assert _keystream(bytes(32), 16) == GCM_TEST_CASE_2
    assert _keystream(bytes(32), 48) == ZERO_SEED_STREAM == _counter_blocks(bytes(16), 0, 3)
    assert _keystream(bytes(32), 20) == ZERO_SEED_STREAM[:20]  # a prefix, whatever n
    gcm = Cipher(algorithms.AES(bytes(16)), modes.GCM(bytes(12))).encryptor()
    assert gcm.update(bytes(48)) == ZERO_SEED_STREAM


def test_keystream_pinned_for_a_nonzero_seed_keys_aes_with_its_last_16_bytes() -> None:
    seed = bytes(range(32))
    expected = bytes.fromhex("111364b3181dd1fc8945708c2dbb68f4b20ee312dc16ec157e08262c5ebf1d57")
    ctr = Cipher(algorithms.AES(seed[16:]), modes.CTR(bytes(12) + (2).to_bytes(4, "big")))
    assert _keystream(seed, 32) == ctr.encryptor().update(bytes(32)) == expected


def test_keystream_segments_take_the_next_nonce_every_mib() -> None:
    assert ks.SEGMENT == 2**16 * 16
    stream = _keystream(bytes(32), ks.SEGMENT + 48)
    assert stream[ks.SEGMENT : ks.SEGMENT + 16] == ZERO_SEED_SEGMENT_1
    assert stream[ks.SEGMENT - 32 :] == _counter_blocks(bytes(16), 2**16 - 2, 5)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_a_keystream_seed_must_have_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="a keystream seed has 32 bytes"):
        ks.Keystream(bytes(size))


def test_keystream_fills_a_buffer_with_the_same_stream() -> None:
    out = np.full(40, 7, dtype=np.uint8)
    ks.Keystream(bytes(32)).into(out)
    assert out.tobytes() == ZERO_SEED_STREAM[:40]


@settings(max_examples=100, deadline=None)
@given(offset=st.integers(0, 47), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_keystream_read_in_pieces_from_any_offset_is_the_same_stream(
    offset: int, cuts: list[int]
) -> None:
    stream = ks.Keystream(bytes(32), offset)
    got = b""
    for n in [*cuts, 48 - offset - sum(cuts)]:
        out = np.empty(max(0, min(n, 48 - offset - len(got))), dtype=np.uint8)
        stream.into(out)
        got += out.tobytes()
    assert got == ZERO_SEED_STREAM[offset:]


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(ks.SEGMENT - 40, ks.SEGMENT + 40),
    cuts=st.lists(st.integers(0, 40), max_size=4),
)
def test_keystream_from_any_offset_crosses_segments_as_one_stream(
    offset: int, cuts: list[int]
) -> None:
    first = ks.SEGMENT // 16 - 3
    reference = _counter_blocks(bytes(16), first, 8)  # bytes first*16 .. first*16 + 127
    stream = ks.Keystream(bytes(32), offset)
    got = b""
    end = (first + 8) * 16
    for n in [*cuts, end - offset]:
        out = np.empty(max(0, min(n, end - offset - len(got))), dtype=np.uint8)
        stream.into(out)
        got += out.tobytes()
    assert got == reference[offset - first * 16 :]


def test_keystream_longer_than_a_segment_continues_across_it() -> None:
    n = 2 * ks.SEGMENT + 48
    whole = b"".join(
        Cipher(algorithms.AES(bytes(16)), modes.GCM(j.to_bytes(12, "big")))
        .encryptor()
        .update(bytes(ks.SEGMENT))
        for j in range(3)
    )[:n]
    assert _keystream(bytes(32), n) == whole
    tail = np.empty(48, dtype=np.uint8)
    ks.Keystream(bytes(32), 2 * ks.SEGMENT).into(tail)
    assert tail.tobytes() == whole[2 * ks.SEGMENT :]


# --- fedstream's derivations -------------------------------------------------------------


def test_share_info_layout() -> None:
    assert ks.share_info(ROUND, SENDER, RECEIVER) == SHARE_INFO
    by_hand = (
        b"fedstream/secagg/v1/share"
        + ROUND.to_bytes(8, "big")
        + SENDER.to_bytes(4, "big")
        + RECEIVER.to_bytes(4, "big")
    )
    assert by_hand == SHARE_INFO


def test_share_key_pinned_and_directional() -> None:
    assert ks.share_key(ALICE_SK, BOB_PK, SESSION, ROUND, SENDER, RECEIVER) == SHARE_KEY
    # Both ends derive it; the other direction is a different key.
    assert ks.share_key(BOB_SK, ALICE_PK, SESSION, ROUND, SENDER, RECEIVER) == SHARE_KEY
    assert ks.share_key(ALICE_SK, BOB_PK, SESSION, ROUND, RECEIVER, SENDER) == SHARE_KEY_2_TO_1
    assert _hkdf(SHARED, salt=SESSION, info=SHARE_INFO) == SHARE_KEY
    info_2_to_1 = b"fedstream/secagg/v1/share" + bytes.fromhex("0000000000000007 00000002 00000001")
    assert _hkdf(SHARED, salt=SESSION, info=info_2_to_1) == SHARE_KEY_2_TO_1


def test_pair_seed_pinned_and_symmetric() -> None:
    assert ks.pair_seed(ALICE_SK, BOB_PK, SESSION, ROUND) == PAIR_SEED
    assert ks.pair_seed(BOB_SK, ALICE_PK, SESSION, ROUND) == PAIR_SEED
    info = b"fedstream/secagg/v1/pair" + ROUND.to_bytes(8, "big")
    assert _hkdf(SHARED, salt=SESSION, info=info) == PAIR_SEED
    assert ks.pair_seed(ALICE_SK, BOB_PK, SESSION, ROUND + 1) != PAIR_SEED


def test_commitment_pinned() -> None:
    assert ks.commitment(bytes(32)) == COMMIT_ZERO
    assert hashlib.sha256(b"fedstream/secagg/v1/commit" + bytes(32)).digest() == COMMIT_ZERO


def test_sealed_share_opens_and_is_chacha20_poly1305_with_nonce_prefix() -> None:
    assert len(SEALED) == ks.NONCE + len(PLAINTEXT) + 16
    assert ks.open_(SHARE_KEY, SEALED, SHARE_INFO) == PLAINTEXT
    nonce, body = SEALED[:12], SEALED[12:]
    assert ChaCha20Poly1305(SHARE_KEY).encrypt(nonce, PLAINTEXT, SHARE_INFO) == body
    # The associated data binds round, sender and receiver.
    for ad in (ks.share_info(ROUND + 1, 1, 2), ks.share_info(ROUND, 2, 1), b""):
        with pytest.raises(ks.DecryptError):
            ks.open_(SHARE_KEY, SEALED, ad)
    with pytest.raises(ks.DecryptError):
        ks.open_(SHARE_KEY_2_TO_1, SEALED, SHARE_INFO)
    with pytest.raises(ks.DecryptError):
        ks.open_(SHARE_KEY, SEALED[:5], SHARE_INFO)  # shorter than a nonce


def test_seal_round_trips_with_a_fresh_nonce() -> None:
    first = ks.seal(SHARE_KEY, PLAINTEXT, SHARE_INFO)
    second = ks.seal(SHARE_KEY, PLAINTEXT, SHARE_INFO)
    assert first[:12] != second[:12]
    assert ks.open_(SHARE_KEY, first, SHARE_INFO) == ks.open_(SHARE_KEY, second, SHARE_INFO)


def test_mask_expansion_layout() -> None:
    # A seed's mask is its keystream read as little-endian ring words, then u64 tail words.
    model, tail = np.zeros(4, "<u2"), np.zeros(1, "<u8")
    masks = secagg.Masks(Quantizer(16, 1.0, 2), [(bytes(32), 1)])
    masks.add(model)
    masks.add_tail(tail)
    assert model.tolist() == np.frombuffer(ZERO_SEED_STREAM[:8], "<u2").tolist()
    assert tail.tolist() == np.frombuffer(ZERO_SEED_STREAM[8:16], "<u8").tolist()
    assert model.tolist() == [34819, 52954, 46688, 37539]


def test_shamir_share_format() -> None:
    # f(x) = s + c x over GF(2^255 - 19); holder x gets f(x) as 32 big-endian bytes. The
    # secret is a seed with its top bit cleared (secagg.field_seed).
    seed = bytes([PAIR_SEED[0] & 0x7F]) + PAIR_SEED[1:]
    assert shamir.PRIME == 2**255 - 19
    s, c = int.from_bytes(seed, "big"), 2**200 + 12345
    shares = {x: ((s + c * x) % shamir.PRIME).to_bytes(32, "big") for x in (3, 5, 9)}
    assert shamir.reconstruct({3: shares[3], 9: shares[9]}) == seed
    assert shamir.reconstruct(shares) == seed


def test_low_order_public_keys_are_not_usable() -> None:
    # Points of small order on Curve25519 (and their non-canonical forms): X25519 with
    # any of them gives all zeros, which OpenSSL refuses.
    for point in (0, 1, 2**255 - 19, 2**255 - 18, 2**255 - 20 + 2**255):
        assert not ks.usable_public_key((point % 2**256).to_bytes(32, "little"))
    assert ks.usable_public_key(ks.public_key(ks.new_private_key()))


def test_gcm_and_ctr_segments_give_the_same_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # Which one runs is timed per CPU: the bytes must not depend on it.
    streams = []
    for mode in (ks._gcm, ks._ctr):
        monkeypatch.setattr(ks, "segment_mode", lambda mode=mode: mode)
        out = np.empty(2 * ks.SEGMENT + 48, dtype=np.uint8)
        ks.Keystream(bytes(32)).into(out)
        streams.append(out.tobytes())
    assert streams[0] == streams[1]
    assert streams[0][:16].hex() == "0388dace60b6a392f328c2b971b2fe78"  # GCM test case 2

"""A client's clip -> quantize -> mask, with masks from 1 MiB segments against plain AES-CTR.

    python bench/masking.py [--params 1000000] [--neighbours 9] [--repeat 30]

Runs fedstream's real update pipeline (`client.secure.masked_update`: model change,
clipping, stochastic rounding, the self mask and one pair mask per neighbour, shares and
commitments) on one 1M-parameter update in this process, twice per repeat, alternating:

- **segments**: the keystream as fedstream computes it (`keyschedule.Keystream`: segment
  by segment, each an AES-128-GCM encryption of zeros or the same bytes from AES-128-CTR,
  whichever this CPU runs faster, timed once per process; protocol 2 on);
- **ctr**: the same pipeline with every keystream read from `cryptography`'s AES-128-CTR
  mode instead (protocol 1's stream: the baseline this replaced).

Both are AES-128 in counter mode; only the OpenSSL code path differs (on some x86-64 CPUs
GCM has a vector-AES implementation where CTR has none; on others CTR is the faster). It
prints the median time per update of each, the ratio, the mode the segments use here, and
the raw keystream throughput of both modes. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedstream.client import secure
from fedstream.protocol import fixedpoint, secagg, updates
from fedstream.protocol import keyschedule as ks
from fedstream.protocol import messages as m
from fedstream.protocol.fixedpoint import Quantizer


class CtrKeystream:
    """Protocol 1's stream: AES-128-CTR from the all-zero counter block, read in pieces."""

    def __init__(self, seed: bytes, offset: int = 0) -> None:
        block, skip = divmod(int(offset), 16)
        aes = algorithms.AES(seed[ks.SEED_BYTES - 16 :])
        self._ctx = Cipher(aes, modes.CTR(block.to_bytes(16, "big"))).encryptor()
        self._ctx.update(bytes(skip))

    def into(self, out: np.ndarray) -> None:
        for start in range(0, out.nbytes, ks.PIECE):
            part = out[start : start + ks.PIECE]
            self._ctx.update_into(ks._ZEROS[: part.nbytes], part)


def use_keystream(kind: type) -> None:
    secagg.ks.Keystream = kind  # type: ignore[misc]  # Masks reads it through `ks`
    fixedpoint.Keystream = kind  # type: ignore[misc]  # the rounding noise


def round_inputs(params: int, neighbours: int) -> dict[str, Any]:
    """One party's setup in a round of `neighbours + 1` parties, and its model pair."""
    parties = neighbours + 1
    enc = {u: ks.new_private_key() for u in range(1, parties + 1)}
    mask = {u: ks.new_private_key() for u in range(1, parties + 1)}
    peers = {u: secagg.Peer(ks.public_key(enc[u]), ks.public_key(mask[u])) for u in enc}
    graph = {u: [w for w in enc if w != u] for u in enc}
    tail_len = m.tail_len(2)
    agg = secagg.Aggregation(
        bytes(16), 1, Quantizer(32, 1.0, parties), parties // 2 + 1, graph, peers, params,
        tail_len, max_weight=1000,
    )
    rng = np.random.default_rng(0)
    old = rng.uniform(-0.03, 0.03, params).astype(np.float32)
    new = old + rng.normal(0, 1e-3, params).astype(np.float32)
    return {
        "setup": agg.setup_for(1),
        "enc_sk": enc[1],
        "mask_sk": mask[1],
        "old": updates.record({"w": old}),
        "new": updates.record({"w": new}),
        "report": m.TrainReport(client=1, examples=128, correct=90, loss_sum=50.0,
                                 classes=[64, 64, 70, 58, 45, 45]),
    }


def timer(inputs: dict[str, Any]) -> Callable[[], float]:
    def once() -> float:
        started = time.perf_counter()
        secure.masked_update(
            inputs["old"], inputs["new"], inputs["report"], inputs["setup"],
            inputs["enc_sk"], secagg.mask_seeds(inputs["setup"], inputs["mask_sk"]),
        )
        return time.perf_counter() - started

    return once


def throughput(mode: str, nbytes: int = 1 << 20, reps: int = 400) -> float:
    key = bytes(range(16))
    ctx = Cipher(
        algorithms.AES(key),
        modes.GCM(bytes(12)) if mode == "gcm" else modes.CTR(bytes(16)),
    ).encryptor()
    out = np.empty(nbytes, dtype=np.uint8)
    zeros = np.zeros(nbytes, dtype=np.uint8)
    ctx.update_into(zeros, out)
    started = time.perf_counter()
    for _ in range(reps):
        ctx.update_into(zeros, out)
    return reps * nbytes / (time.perf_counter() - started) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", type=int, default=1_000_000)
    p.add_argument("--neighbours", type=int, default=9)
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    once = timer(round_inputs(args.params, args.neighbours))
    kinds = {"segments": ks.Keystream, "ctr": CtrKeystream}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.repeat + 3):
        order = list(kinds) if i % 2 == 0 else list(kinds)[::-1]
        for name in order:
            use_keystream(kinds[name])
            took = once()
            if i >= 3:  # the first rounds warm caches and allocators
                times[name].append(took)
    use_keystream(kinds["segments"])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"clip -> quantize -> mask, {args.params:,} parameters, {args.neighbours} neighbours "
        f"({args.neighbours + 2} keystreams of {4 * args.params / 1e6:.1f} MB), "
        f"median of {args.repeat}"
    )
    for k in kinds:
        print(f"  {k}: {1e3 * med[k]:6.2f} ms per update")
    print(f"  ctr / segments: {med['ctr'] / med['segments']:.2f}x (segments here: "
          f"{ks.segment_mode().__name__.strip('_').upper()})")
    gcm, ctr = throughput("gcm"), throughput("ctr")
    print(
        f"keystream alone, 1 MiB calls: GCM {gcm:.1f} GB/s, CTR {ctr:.1f} GB/s "
        f"({gcm / ctr:.2f}x)"
    )


if __name__ == "__main__":
    main()

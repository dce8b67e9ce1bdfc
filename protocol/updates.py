"""Model updates as flat vectors: the form clipping, quantization and masking work on.

Both sides flatten an ArrayRecord in its key order, so a vector coordinate means the same
weight on client and server without sending any layout.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def delta(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """`new - old` as one float64 vector, in key order: one pass, one allocation.

    The difference is taken in float64, where the difference of two float32 is exact.
    """
    if list(new.keys()) != list(old.keys()):
        raise ValueError(f"update has arrays {list(new.keys())}, the model {list(old.keys())}")
    out = np.empty(size(new), dtype=np.float64)
    start = 0
    for key, arr in new.items():
        a, b = arr.numpy(), old[key].numpy()
        if a.shape != b.shape:
            raise ValueError(f"array {key!r} has shape {a.shape}, the model's is {b.shape}")
        stop = start + a.size
        np.subtract(a.ravel(), b.ravel(), out=out[start:stop], dtype=np.float64)
        start = stop
    return out


def size(arrays: ArrayRecord) -> int:
    return sum(int(np.prod(arr.shape)) for arr in arrays.values())


def shifted(base: ArrayRecord, change: np.ndarray) -> ArrayRecord:
    """`base` plus a flat `change`, each array back in its own shape and dtype."""
    out, start = {}, 0
    for key, arr in base.items():
        values = arr.numpy()
        stop = start + values.size
        part = change[start:stop].reshape(values.shape)
        if np.issubdtype(values.dtype, np.integer):
            new = np.rint(values + part).astype(values.dtype)
        else:  # summed in float64, stored in the model's dtype, in one pass
            new = np.add(values, part, out=np.empty_like(values), casting="same_kind")
        out[key] = Array(new)
        start = stop
    if start != change.size:
        raise ValueError(f"update has {change.size} values, the model {start}")
    return ArrayRecord(out)

"""Model updates as flat vectors: the form clipping, quantization and masking work on.

Both sides flatten an ArrayRecord in its key order, so a vector coordinate means the same
weight on client and server without sending any layout.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def flat(arrays: ArrayRecord) -> np.ndarray:
    """All arrays of a record, in key order, as one float64 vector."""
    parts = [arr.numpy().astype(np.float64, copy=False).ravel() for arr in arrays.values()]
    return np.concatenate(parts) if parts else np.zeros(0)


def size(arrays: ArrayRecord) -> int:
    return sum(int(np.prod(arr.shape)) for arr in arrays.values())


def shifted(base: ArrayRecord, delta: np.ndarray) -> ArrayRecord:
    """`base` plus a flat `delta`, each array back in its own shape and dtype."""
    out, start = {}, 0
    for key, arr in base.items():
        values = arr.numpy()
        stop = start + values.size
        new = values.astype(np.float64) + delta[start:stop].reshape(values.shape)
        if np.issubdtype(values.dtype, np.integer):
            new = np.rint(new)
        out[key] = Array(new.astype(values.dtype))
        start = stop
    if start != delta.size:
        raise ValueError(f"update has {delta.size} values, the model {start}")
    return ArrayRecord(out)

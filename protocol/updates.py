"""Model updates as flat vectors: the form clipping, quantization and masking work on.

Both sides flatten an ArrayRecord in its key order, so a vector coordinate means the same
weight on client and server without sending any layout.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def view(arr: Array) -> np.ndarray:
    """An Array's values, read-only, without copying them out of its bytes.

    `Array.numpy()` copies the whole buffer on every call; a model-sized vector read
    this way costs a header parse instead. Anything but a plain .npy buffer goes
    through `numpy()`.
    """
    if arr.stype != SType.NUMPY:
        return arr.numpy()
    stream = io.BytesIO(arr.data)
    read_header = _HEADERS.get(np.lib.format.read_magic(stream))
    if read_header is None:
        return arr.numpy()
    shape, fortran, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("an array of Python objects is not a model")
    flat = np.frombuffer(arr.data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def delta(new: ArrayRecord, old: ArrayRecord) -> np.ndarray:
    """`new - old` as one float64 vector, in key order: one pass, one allocation.

    The difference is taken in float64, 29 bits finer than the float32 it is taken of.
    """
    if list(new.keys()) != list(old.keys()):
        raise ValueError(f"update has arrays {list(new.keys())}, the model {list(old.keys())}")
    out = np.empty(size(new), dtype=np.float64)
    start = 0
    for key, arr in new.items():
        a, b = view(arr), view(old[key])
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

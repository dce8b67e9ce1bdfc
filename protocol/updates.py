"""Model updates as flat vectors: the form clipping, quantization and masking work on.

Both sides flatten an ArrayRecord in its key order, so a vector coordinate means the same
weight on client and server without sending any layout.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping
from typing import Any

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


def array(values: Any) -> Array:
    """An `Array` of `values` (numpy or torch), byte for byte what `Array(values)` makes of a
    C-ordered array, built with one copy.

    Flower's constructor goes through `np.save` into a growing buffer, which copies a
    model-sized vector three times; a client sends one such vector per round and the
    server broadcasts one.
    """
    if not isinstance(values, np.ndarray):
        values = values.detach().cpu().numpy()  # a torch tensor: shares its memory
    values = np.asarray(values, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if values.dtype.hasobject:
        raise ValueError("an array of Python objects is not a model")
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join([head.getvalue(), memoryview(values).cast("B")])
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)


def record(values: Mapping[str, Any]) -> ArrayRecord:
    """An `ArrayRecord` of named arrays or tensors, each built by `array`."""
    return ArrayRecord({key: array(v) for key, v in values.items()})


def delta_pieces(
    new: ArrayRecord, old: ArrayRecord, piece: int
) -> Iterator[tuple[int, np.ndarray]]:
    """`new - old` in float64, flattened in key order, as (offset, values) pieces of at most
    `piece` coordinates.

    Pieces let a client clip, quantize and mask its change without ever holding it whole
    in float64 (twice the model's float32 size). The difference is taken in float64, 29 bits finer
    than the float32 it is taken of. Every piece is written into one scratch buffer, which
    the next piece overwrites: use a piece before asking for the next.
    """
    if list(new.keys()) != list(old.keys()):
        raise ValueError(f"update has arrays {list(new.keys())}, the model {list(old.keys())}")
    pairs = []
    for key, arr in new.items():
        a, b = view(arr), view(old[key])
        if a.shape != b.shape:
            raise ValueError(f"array {key!r} has shape {a.shape}, the model's is {b.shape}")
        pairs.append((a.ravel(), b.ravel()))
    return _pieces(pairs, piece)


def _pieces(
    pairs: list[tuple[np.ndarray, np.ndarray]], piece: int
) -> Iterator[tuple[int, np.ndarray]]:
    scratch = np.empty(max(1, min(piece, sum(a.size for a, _ in pairs))), dtype=np.float64)
    start = 0
    for a, b in pairs:
        for lo in range(0, a.size, piece):
            hi = min(lo + piece, a.size)
            out = scratch[: hi - lo]
            # Widening first and subtracting in float64 gives the same values as a float64
            # subtract of the float32 pair, a quarter faster (no buffered mixed-type loop).
            np.copyto(out, a[lo:hi])
            np.subtract(out, b[lo:hi], out=out)
            yield start + lo, out
        start += a.size


def size(arrays: ArrayRecord) -> int:
    return sum(int(np.prod(arr.shape)) for arr in arrays.values())


BLOCK = 1 << 16  # coordinates per pass in `shifted`: its float64 scratch (512 KiB) stays in cache


def shifted(base: ArrayRecord, change: np.ndarray, factor: float = 1.0) -> ArrayRecord:
    """`base` plus `factor` times a flat `change`, each array back in its own shape and dtype.

    `change` may be any real-valued vector (float64, or the signed integers of a ring sum):
    it is scaled and added one block at a time, in float64, so the server never holds a
    model-sized float64 copy of it (two of them, 16 MB for a 1M model, cost more in page
    faults than the arithmetic).
    """
    out, start = {}, 0
    scratch = np.empty(max(1, min(BLOCK, change.size)), dtype=np.float64)
    for key, arr in base.items():
        values = view(arr)
        stop = start + values.size
        if stop > change.size:
            raise ValueError(f"update has {change.size} values, fewer than the model's")
        flat = values.reshape(-1)  # C order: the order `delta_pieces` flattens in
        new = np.empty(values.shape, dtype=values.dtype)
        new_flat = new.reshape(-1)
        for lo in range(0, values.size, BLOCK):
            hi = min(lo + BLOCK, values.size)
            part = scratch[: hi - lo]
            np.multiply(change[start + lo : start + hi], factor, out=part, casting="unsafe")
            if np.issubdtype(values.dtype, np.integer):
                new_flat[lo:hi] = np.rint(flat[lo:hi] + part)
            else:  # summed in float64, stored in the model's dtype
                np.add(flat[lo:hi], part, out=new_flat[lo:hi], casting="same_kind")
        out[key] = new
        start = stop
    if start != change.size:
        raise ValueError(f"update has {change.size} values, the model {start}")
    return record(out)

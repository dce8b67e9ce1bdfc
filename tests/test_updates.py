"""Model updates as flat vectors (protocol/updates.py): the zero-copy reader, the one-copy
writer, and the difference both sides of secure aggregation compute."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedstream.protocol import updates
from fedstream.protocol.fixedpoint import Quantizer

DTYPES = st.sampled_from(["<f4", "<f8", ">f4", "<i8", "<u4", "|u1", "<f2", "|b1"])


@settings(max_examples=80, deadline=None)
@given(arr=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
       fortran=st.booleans())
def test_view_reads_what_numpy_reads(arr: np.ndarray, fortran: bool) -> None:
    arr = np.asfortranarray(arr) if fortran else arr
    record = Array(arr)
    got = updates.view(record)
    expected = record.numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert not got.flags.writeable  # a view of the message's bytes: never written through


@settings(max_examples=80, deadline=None)
@given(arr=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)),
       fortran=st.booleans())
def test_array_is_flowers_npy_array_with_one_copy(arr: np.ndarray, fortran: bool) -> None:
    arr = np.asfortranarray(arr) if fortran else arr
    built = updates.array(arr)
    assert (built.dtype, built.shape, built.stype) == (str(arr.dtype), arr.shape, "numpy.ndarray")
    np.testing.assert_array_equal(built.numpy(), arr)
    np.testing.assert_array_equal(updates.view(built), arr)
    if arr.flags.c_contiguous:  # a C-ordered array gives Flower's very bytes
        assert built.data == Array(arr).data


def test_record_takes_torch_tensors_as_flower_does() -> None:
    torch = pytest.importorskip("torch")
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    built, flowers = updates.record(state), ArrayRecord(state)
    assert list(built.keys()) == list(flowers.keys())
    for key in state:
        assert built[key].data == flowers[key].data


def test_view_refuses_object_arrays_it_cannot_have_been_sent() -> None:
    record = Array(np.arange(3.0))
    record.data = b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    record.data += b" " * (128 - len(record.data) - 1) + b"\n"
    with pytest.raises(ValueError, match="objects"):
        updates.view(record)


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_delta_pieces_are_the_float64_difference_and_shifted_undoes_it(data: st.DataObject) -> None:
    shapes = data.draw(st.lists(hnp.array_shapes(max_dims=3, max_side=6), min_size=1, max_size=4))
    floats = st.floats(-1e6, 1e6, width=32)
    new, old = {}, {}
    for i, shape in enumerate(shapes):
        new[f"k{i}"] = data.draw(hnp.arrays(np.float32, shape, elements=floats))
        old[f"k{i}"] = data.draw(hnp.arrays(np.float32, shape, elements=floats))
    piece = data.draw(st.integers(1, 50))
    got = np.full(sum(v.size for v in new.values()), np.nan)
    offsets = []
    for lo, values in updates.delta_pieces(
        ArrayRecord({k: Array(v) for k, v in new.items()}),
        ArrayRecord({k: Array(v) for k, v in old.items()}),
        piece,
    ):
        assert values.dtype == np.float64 and 0 < values.size <= piece
        got[lo : lo + values.size] = values
        offsets.append(lo)
    assert offsets == sorted(offsets)  # in order, so masks can be streamed along
    expected = np.concatenate(
        [new[k].astype(np.float64).ravel() - old[k].astype(np.float64).ravel() for k in new]
    )
    np.testing.assert_array_equal(got, expected)
    back = updates.shifted(ArrayRecord({k: Array(v) for k, v in old.items()}), got)
    for k in new:  # old + (new - old) is new again, up to float32 and float64 rounding
        err = np.abs(back[k].numpy().astype(np.float64) - new[k])
        bound = np.spacing(np.abs(new[k])) + 2.0**-50 * (np.abs(new[k]) + np.abs(old[k]))
        assert np.all(err <= bound)


def test_delta_pieces_name_a_layout_mismatch() -> None:
    a = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})
    with pytest.raises(ValueError, match="shape"):
        updates.delta_pieces(a, ArrayRecord({"w": Array(np.zeros((3, 2), np.float32))}), 4)
    with pytest.raises(ValueError, match="arrays"):
        updates.delta_pieces(a, ArrayRecord({"v": Array(np.zeros((2, 3), np.float32))}), 4)


@pytest.mark.parametrize("bits", [32, 20])
def test_shifted_adds_a_scaled_ring_sum_across_blocks(bits: int) -> None:
    # The server's finish: model + signed ring sum x factor, block by block, for a model
    # larger than one block and arrays that straddle block boundaries.
    q = Quantizer(bits, 1.0, 4)
    rng = np.random.default_rng(bits)
    base = {"a": rng.standard_normal((300, 301)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float32),
            "steps": np.arange(5, dtype=np.int64)}
    size = sum(v.size for v in base.values())
    assert size > updates.BLOCK
    ring = rng.integers(0, 1 << bits, size, dtype=np.uint64).astype(q.dtype)
    factor = 0.37 / q.scale
    got = updates.shifted(updates.record(base), q.signed(ring), factor)
    change = q.decode(ring) * 0.37
    start = 0
    for key, values in base.items():
        part = change[start : start + values.size].reshape(values.shape)
        start += values.size
        if key == "steps":
            expected = np.rint(values + part).astype(np.int64)
        else:
            expected = (values.astype(np.float64) + part).astype(np.float32)
        np.testing.assert_allclose(got[key].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert got[key].numpy().dtype == values.dtype
    with pytest.raises(ValueError, match="values"):
        updates.shifted(updates.record(base), q.signed(ring[:-1]), factor)

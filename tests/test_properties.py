"""Invariants, checked with hypothesis on tiny shapes."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import volnorm as vn
from volnorm._utils import slab_chunks
from volnorm.io.niftizarr import stream_slabs

shapes = st.lists(st.integers(1, 9), min_size=2, max_size=4).map(tuple)


@given(shape=shapes, itemsize=st.sampled_from([1, 2, 4, 8]), target=st.integers(1, 4096))
def test_slab_chunks_are_whole_planes_within_target(shape, itemsize, target):
    chunks = slab_chunks(shape, itemsize, target)
    assert all(1 <= c <= n for c, n in zip(chunks, shape))
    split = [i for i, (c, n) in enumerate(zip(chunks, shape)) if c != n]
    if split:
        k = split[-1]
        # whole planes after the last split axis, single indices before it
        assert all(c == n for c, n in zip(chunks[k + 1 :], shape[k + 1 :]))
        assert all(c == 1 for c in chunks[:k])
        # as big as possible within the target (unless one plane already exceeds it)
        if math.prod(chunks) * itemsize > target:
            assert chunks[k] == 1
    else:
        assert math.prod(shape) * itemsize <= target or all(c == 1 for c in chunks)


@given(shape=shapes, data=st.data())
def test_stream_slabs_cover_each_voxel_once_in_file_order(shape, data):
    chunks = tuple(data.draw(st.integers(1, n)) for n in shape)
    count = np.zeros(shape, dtype=int)
    last = -1
    flat = np.arange(math.prod(shape)).reshape(shape)
    for region in stream_slabs(shape, chunks):
        block = flat[region]
        assert block.ravel()[0] == last + 1  # contiguous, in order
        last = block.ravel()[-1]
        assert block.size == block.ravel()[-1] - block.ravel()[0] + 1
        count[region] += 1
    assert (count == 1).all()


dtypes = st.sampled_from(["uint8", "int8", "int16", "uint16", "int32", "float32", "float64"])


@settings(deadline=None, max_examples=25)
@given(
    shape=st.lists(st.integers(1, 6), min_size=3, max_size=4).map(tuple),
    dtype=dtypes,
    big_endian=st.booleans(),
    slope=st.sampled_from([1.0, 0.5, 2.5, 1e-3]),
    inter=st.sampled_from([0.0, -10.0, 3100.76]),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_nifti_roundtrips_exactly(tmp_path_factory, shape, dtype, big_endian, slope, inter, gz, seed):
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.normal(0, 100, shape).astype(dt)
    else:
        info = np.iinfo(dt)
        data = rng.integers(info.min, info.max, shape, endpoint=True).astype(dt)
    img = nib.Nifti1Image(data, np.diag([1.5, 2.0, 3.0, 1.0]))
    img.header.set_data_dtype(dt.newbyteorder(">" if big_endian else "<"))
    img.header.set_slope_inter(slope, inter)
    d = tmp_path_factory.mktemp("p")
    p = d / ("x.nii.gz" if gz else "x.nii")
    nib.save(img, p)
    ref = nib.load(p)
    stack = vn.open_nifti(p, chunks={"z": 2})
    np.testing.assert_array_equal(stack.values[0], np.asarray(ref.dataobj).T)
    vn.convert(p, d / "s.zarr", scheduler="sync")
    back = vn.open_zarr(d / "s.zarr")
    np.testing.assert_array_equal(back.values[0], np.asarray(ref.dataobj).T)
    assert back.dtype == stack.dtype
    # float data stored with scaling cannot always be inverted exactly: export the raw view
    exact = dt.kind in "iu" or (slope, inter) == (1.0, 0.0)
    view = back if exact else vn.open_zarr(d / "s.zarr", scaled=False)
    out = vn.to_nifti(view, d / ("y.nii.gz" if gz else "y.nii"))[0]
    again = nib.load(out)
    np.testing.assert_array_equal(again.dataobj.get_unscaled(), ref.dataobj.get_unscaled())
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(ref.dataobj))

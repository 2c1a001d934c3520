"""Per-voxel histograms across a stack (``dim="volume"``) equal a per-voxel numpy loop and
xhistogram on real data, for any chunking, in the smallest count dtype."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data as skdata

import volnorm as vn
from volnorm._histogram import count_dtype
from volnorm.testing import raise_if_dask_computes

EXTRA = ("nan", "posinf", "neginf", "below", "above", "masked_out")


def loop_reference(v: np.ndarray, bins: int, rng: tuple[float, float], keep: np.ndarray | None = None) -> np.ndarray:
    """np.histogram of each voxel's values across the first axis (finite, kept ones)."""
    out = np.zeros(v.shape[1:] + (bins,), dtype=np.int64)
    for idx in np.ndindex(*v.shape[1:]):
        a = v[(slice(None),) + idx]
        if keep is not None:
            a = a[keep[(slice(None),) + idx]]
        out[idx] = np.histogram(a[np.isfinite(a)], bins=bins, range=rng)[0]
    return out


@pytest.fixture(scope="module")
def faces() -> xr.DataArray:
    """scikit-image's 200 LFW faces (25x25 float64 in [0, 1]) as a stack."""
    return xr.DataArray(skdata.lfw_subset(), dims=("volume", "y", "x"))


@pytest.mark.parametrize("chunks", [{}, {"volume": 64}, {"volume": 37, "y": 9, "x": 25}])
def test_faces_equal_numpy_loop_and_xhistogram(faces, chunks):
    x = faces.chunk(chunks) if chunks else faces
    with raise_if_dask_computes():
        h = vn.histogram(x, dim="volume", bins=20, range=(0.0, 1.0))
    assert h.dims == ("y", "x", "bin") and h.dtype == np.uint8  # 200 volumes fit in uint8
    got = h.values
    np.testing.assert_array_equal(got, loop_reference(faces.values, 20, (0.0, 1.0)))
    xhistogram = pytest.importorskip("xhistogram.xarray")
    ref = xhistogram.histogram(faces.rename("faces"), bins=np.linspace(0.0, 1.0, 21), dim=["volume"]).values
    # xhistogram puts ~1e-6 of the values next to an edge in the neighbouring bin (its own edge arithmetic)
    assert np.count_nonzero(got != ref) <= 1e-5 * got.size + 2
    assert (got.sum(axis=-1) == 200).all()


def test_nibabel_time_points_int16_one_bin_per_value():
    """Integers: one bin per value; values outside ``range`` counted per voxel."""
    # nibabel's 4-D example: its 2 time points are the stack's volumes
    x4 = vn.open_nifti(vn.datasets.nibabel_files()["example4d.nii.gz"]).isel(volume=0, z=slice(8, 16), drop=True)
    x = x4.rename(t="volume").chunk({"volume": 1, "z": 3})
    h = vn.histogram(x, dim="volume", range=(-5, 300))  # integers: one bin per value
    v = x.values.astype(np.int64)
    # the vectorized numpy answer: bincount with flat offsets (voxel * nbins + bin)
    vv = v.reshape(len(v), -1)
    nvox = vv.shape[1]
    inside = (vv >= -5) & (vv <= 300)
    flat = (np.arange(nvox)[None, :] * 306 + (vv + 5))[inside]
    ref = np.bincount(flat, minlength=nvox * 306).reshape(v.shape[1:] + (306,))
    np.testing.assert_array_equal(h.values, ref)
    below = (v < -5).sum(axis=0)
    above = (v > 300).sum(axis=0)
    np.testing.assert_array_equal(h["n_below"].values, below)
    np.testing.assert_array_equal(h["n_above"].values, above)
    assert h.dtype == np.uint8


def test_count_dtype_and_merge_widens():
    assert [count_dtype(n) for n in (1, 255, 256, 65535, 65536)] == ["uint8", "uint8", "uint16", "uint16", "uint32"]
    rng = np.random.default_rng(0)
    v = rng.integers(0, 3, (400, 2, 3)).astype(np.uint8)  # 400 volumes: most counts above 255 in total
    a = xr.DataArray(v[:200], dims=("volume", "y", "x"))
    b = xr.DataArray(v[200:], dims=("volume", "y", "x"))
    whole = vn.histogram(xr.DataArray(v, dims=("volume", "y", "x")), dim="volume", range=(0, 2))
    assert whole.dtype == np.uint16
    merged = vn.merge_histograms([vn.histogram(a, dim="volume", range=(0, 2)), vn.histogram(b, dim="volume", range=(0, 2))])
    assert merged.dtype == np.uint16  # two uint8 halves would wrap at 255
    np.testing.assert_array_equal(merged.values, whole.values)


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(1, 7)),
    cv=st.integers(1, 30),
    cy=st.integers(1, 6),
    specials=st.booleans(),
    use_mask=st.sampled_from([None, "stack", "spatial"]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_properties_equal_loop_and_every_voxel_once(seed, shape, cv, cy, specials, use_mask, dtype):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 1.2, shape).astype(dtype)
    v[:, 0, 0] = np.float32(0.5)  # exactly on an edge of 8 bins over (-2, 2)
    if specials:
        v.flat[rng.integers(0, v.size, 3)] = [np.nan, np.inf, -np.inf]
    x = xr.DataArray(v, dims=("volume", "y", "x")).chunk({"volume": cv, "y": cy})
    keep = mask = None
    if use_mask == "stack":  # one mask per volume
        keep = rng.random(shape) > 0.25
        mask = xr.DataArray(keep, dims=("volume", "y", "x"))
    elif use_mask == "spatial":  # one brain mask for every volume
        mask = xr.DataArray(rng.random(shape[1:]) > 0.25, dims=("y", "x"))
        keep = np.broadcast_to(mask.values, shape)
    h = vn.histogram(x, dim="volume", bins=8, range=(-2.0, 2.0), mask=mask).compute()
    np.testing.assert_array_equal(h.values, loop_reference(v, 8, (-2.0, 2.0), keep))
    extras = sum(h[f"n_{k}"].values.astype(np.int64) for k in EXTRA)
    np.testing.assert_array_equal(h.values.sum(axis=-1, dtype=np.int64) + extras, shape[0])  # every value counted once
    one = vn.histogram(x.chunk({"volume": -1, "y": -1}), dim="volume", bins=8, range=(-2.0, 2.0), mask=mask).compute()
    xr.testing.assert_identical(h, one)
    from volnorm import _histogram

    with pytest.MonkeyPatch.context() as mp:  # tiny budgets: voxel tiles split, volume blocks in several groups
        mp.setattr(_histogram, "VOXEL_OUT_BYTES", 3 * 14)
        mp.setattr(_histogram, "VOXEL_IN_BYTES", 8 * 3 * v.dtype.itemsize)
        small = vn.histogram(x, dim="volume", bins=8, range=(-2.0, 2.0), mask=mask)
        assert small.data.numblocks[0] >= min(shape[1], -(-shape[1] // cy))
        xr.testing.assert_identical(small.compute(), h)


@pytest.mark.slow
def test_same_per_voxel_histogram_on_a_distributed_cluster(faces, cluster_client):
    x = faces.chunk({"volume": 50, "y": 10})
    local = vn.histogram(x, dim="volume", bins=16, range=(0.0, 1.0)).compute(scheduler="threads")
    remote = cluster_client.compute(vn.histogram(x, dim="volume", bins=16, range=(0.0, 1.0))).result()
    xr.testing.assert_identical(local, remote)


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["uint8", "int8", "int16", "uint16"]),
    bins=st.integers(1, 40),
    lo=st.integers(-300, 200),
    width=st.integers(1, 600),
)
def test_small_integers_on_float_bins_equal_loop(seed, dtype, bins, lo, width):
    """8/16-bit integers on float bins go through a value -> bin table: numpy's bins exactly."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    low = max(info.min, lo - 50)
    v = rng.integers(low, max(low, min(info.max, lo + width + 50)) + 1, (9, 3, 4)).astype(dtype)
    rng_ = (float(lo), float(lo + width))
    h = vn.histogram(xr.DataArray(v, dims=("volume", "y", "x")).chunk({"volume": 4}), dim="volume", bins=bins, range=rng_).compute()
    np.testing.assert_array_equal(h.values, loop_reference(v.astype(np.float64), bins, rng_))
    np.testing.assert_array_equal(h["n_below"].values, (v < lo).sum(axis=0))
    np.testing.assert_array_equal(h["n_above"].values, (v > lo + width).sum(axis=0))

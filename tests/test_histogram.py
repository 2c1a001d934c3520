"""The histogram engine equals numpy on real data, for every dim, mask and chunking."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata

import volnorm as vn
from volnorm._histogram import histogram
from volnorm.testing import raise_if_dask_computes


@pytest.fixture(scope="module")
def images() -> xr.DataArray:
    """camera, moon, coins cropped to one shape: a real uint8 stack."""
    ims = [im[:300, :300] for im in (skdata.camera(), skdata.moon(), skdata.coins())]
    return xr.DataArray(np.stack(ims), dims=("volume", "y", "x"), coords={"volume": ["camera", "moon", "coins"]})


CHUNKINGS = [None, {"volume": 1}, {"volume": 2, "y": 77, "x": 128}]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dim", [None, ("y", "x"), "x"])
def test_uint8_equals_bincount(images, chunks, dim):
    x = images if chunks is None else images.chunk(chunks)
    h = histogram(x, dim=dim).compute()
    a = images.values
    if dim is None:
        ref = np.bincount(a.ravel(), minlength=256)
        np.testing.assert_array_equal(h.values, ref)
    elif dim == ("y", "x"):
        for i in range(3):
            np.testing.assert_array_equal(h.values[i], np.bincount(a[i].ravel(), minlength=256))
    else:
        for i in (0, 2):
            for j in (0, 150, 299):
                np.testing.assert_array_equal(h.values[i, j], np.bincount(a[i, j], minlength=256))
    per_hist = {None: a.size, ("y", "x"): a.shape[1] * a.shape[2], "x": a.shape[2]}[dim]
    assert (h.sum("bin").values == per_hist).all()
    assert h.dims[-1] == "bin" and h["bin"].values[0] == 0 and h.sizes["bin"] == 256


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_float_with_nan_inf_and_mask_equals_numpy(images, chunks):
    f = images.astype("float32") / 7.0
    v = f.values.copy()
    v[0, 0, :10] = np.nan
    v[1, 5, 5] = np.inf
    v[2, 6, 6] = -np.inf
    f = f.copy(data=v)
    mask = xr.DataArray(images.values[0] > 40, dims=("y", "x"))
    x = f if chunks is None else f.chunk(chunks)
    h = histogram(x, bins=50, range=(5.0, 30.0), dim=("y", "x"), mask=mask).compute()
    for i in range(3):
        sel = v[i][mask.values]
        fin = sel[np.isfinite(sel)]
        ref, edges = np.histogram(fin, bins=50, range=(5.0, 30.0))
        np.testing.assert_array_equal(h.values[i], ref)
        np.testing.assert_allclose(h["bin_lower"].values, edges[:-1])
        assert int(h["n_nan"][i]) == np.isnan(sel).sum()
        assert int(h["n_posinf"][i]) == np.isposinf(sel).sum()
        assert int(h["n_neginf"][i]) == np.isneginf(sel).sum()
        assert int(h["n_below"][i]) == (fin < 5).sum() and int(h["n_above"][i]) == (fin > 30).sum()
        assert int(h["n_masked_out"][i]) == (~mask.values).sum()
        # nothing is lost: every voxel is in exactly one counter
        assert int(h.values[i].sum()) + sum(int(h[f"n_{k}"][i]) for k in ("nan", "posinf", "neginf", "below", "above", "masked_out")) == v[i].size


def test_nifti_int16_exact_and_lazy_with_range(tmp_path):
    f = vn.datasets.nibabel_files()["anatomical.nii"]
    stack = vn.open_nifti(f, chunks={"z": 4})
    a = stack.values[0]
    with raise_if_dask_computes():
        h = histogram(stack, range=(int(a.min()), int(a.max())))
    np.testing.assert_array_equal(h.values, np.bincount((a - a.min()).ravel()))
    h2 = histogram(stack)  # one range pass, same answer
    np.testing.assert_array_equal(h2.values, h.values)


def test_merge_of_parts_equals_whole(images):
    x = images.astype("float64")
    whole = histogram(x, bins=64, range=(0, 255)).values
    parts = sum(histogram(x.isel(volume=[i]), bins=64, range=(0, 255)).values for i in range(3))
    np.testing.assert_array_equal(whole, parts)


def test_bad_arguments(images):
    with pytest.raises(ValueError, match="`bins` must be a positive int"):
        histogram(images, bins=0)
    with pytest.raises(ValueError, match="lo < hi"):
        histogram(images, range=(3, 3))
    with pytest.raises(ValueError, match="do not have"):
        histogram(images, dim="t")
    with pytest.raises(ValueError, match="no finite value"):
        histogram(xr.DataArray(np.full((2, 3), np.nan)))
    with pytest.raises(ValueError, match="has 5 along 'y'"):
        histogram(images, mask=xr.DataArray(np.ones((5, 300), bool), dims=("y", "x")))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    cz=st.integers(1, 9),
    nan_frac=st.floats(0, 0.3),
    use_mask=st.booleans(),
)
def test_properties_counts_and_chunk_invariance(seed, shape, cz, nan_frac, use_mask):
    rng = np.random.default_rng(seed)
    v = rng.normal(0, 10, shape)
    v[rng.random(shape) < nan_frac] = np.nan
    x = xr.DataArray(v, dims=("volume", "y", "x"))
    mask = xr.DataArray(rng.random(shape[1:]) > 0.3, dims=("y", "x")) if use_mask else None
    one = histogram(x, bins=17, range=(-15, 15), mask=mask).compute()
    chunked = histogram(x.chunk({"volume": 1, "y": cz}), bins=17, range=(-15, 15), mask=mask).compute()
    xr.testing.assert_identical(one, chunked)
    # every voxel lands in exactly one counter
    extras = sum(int(one[f"n_{k}"]) for k in ("nan", "posinf", "neginf", "below", "above", "masked_out"))
    assert int(one.sum()) + extras == v.size
    # merge: the per-volume histograms add up to the whole
    per = histogram(x, bins=17, range=(-15, 15), dim=("y", "x"), mask=mask).compute()
    np.testing.assert_array_equal(per.sum("volume").values, one.values)


@settings(deadline=None, max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["uint8", "int8", "bool"]),
    lo=st.integers(-130, 250),
    width=st.integers(2, 300),
    cy=st.integers(1, 7),
)
def test_one_byte_kernel_equals_numpy(seed, dtype, lo, width, cy):
    """1-byte data take their own kernel (four interleaved tables, folded into the bins):
    counts and the below/above counters equal numpy's for any integer range, signed or not."""
    rng = np.random.default_rng(seed)
    v = rng.integers(0, 256, (3, 7, 33)).astype(np.uint8).view(dtype) if dtype != "bool" else rng.random((3, 7, 33)) > 0.5
    v[:, :, :9] = v[:, :, :1]  # runs of equal values, as in real images
    x = xr.DataArray(v, dims=("volume", "y", "x")).chunk({"y": cy})
    h = histogram(x, range=(lo, lo + width - 1), dim=("y", "x")).compute()
    for i in range(3):
        a = v[i].astype(np.int64).ravel()
        np.testing.assert_array_equal(h.values[i], np.bincount(a[(a >= lo) & (a < lo + width)] - lo, minlength=width))
        assert int(h["n_below"][i]) == (a < lo).sum() and int(h["n_above"][i]) == (a >= lo + width).sum()
    if dtype != "bool":  # the default: one bin per value of the whole dtype range
        full = histogram(x, dim=None).compute()
        info = np.iinfo(dtype)
        np.testing.assert_array_equal(full.values, np.bincount(v.astype(np.int64).ravel() - info.min, minlength=256))


@pytest.mark.slow
def test_same_histogram_on_a_distributed_cluster(images, cluster_client):
    x = images.chunk({"volume": 1, "y": 100})
    local = histogram(x, dim=("y", "x")).compute(scheduler="threads")
    remote = cluster_client.compute(histogram(x, dim=("y", "x"))).result()
    xr.testing.assert_identical(local, remote)
    f = (images.astype("float32") / 3).chunk({"volume": 1})
    xr.testing.assert_identical(
        histogram(f, bins=100).compute(scheduler="sync"),
        cluster_client.compute(histogram(f, bins=100)).result(),
    )

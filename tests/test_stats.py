"""Quantiles equal numpy's on real data: exact for integers, exact after refinement for floats."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data as skdata

import volnorm as vn

QS = [0.0, 0.02, 0.25, 0.5, 0.731, 0.98, 1.0]


@pytest.fixture(scope="module")
def images() -> xr.DataArray:
    ims = [im[:300, :300] for im in (skdata.camera(), skdata.moon(), skdata.coins())]
    return xr.DataArray(np.stack(ims), dims=("volume", "y", "x"))


@pytest.mark.parametrize("chunks", [None, {"volume": 1, "y": 64}])
def test_integer_quantiles_exact_every_dim(images, chunks):
    x = images if chunks is None else images.chunk(chunks)
    np.testing.assert_array_equal(vn.quantile(x, QS).values, np.quantile(images.values, QS))
    per = vn.quantile(x, QS, dim=("y", "x")).values
    for i in range(3):
        np.testing.assert_array_equal(per[i], np.quantile(images.values[i], QS))


def test_nifti_scaled_float_quantiles_exact_with_mask():
    f = vn.datasets.nibabel_files()["functional.nii"]
    x = vn.open_nifti(f, chunks={"t": 3})
    v = x.values
    mask = xr.DataArray(v[0, 0] > 2000, dims=("z", "y", "x"))
    got = vn.quantile(x, QS, mask=mask)
    ref = np.quantile(v[0][:, mask.values], QS)
    np.testing.assert_array_equal(got.values, ref)
    assert got.attrs["max_error"] == 0.0


def test_float_per_volume_exact_and_bound_without_refinement(images):
    f = images.astype("float32") / 3.3
    exact = vn.quantile(f, QS, dim=("y", "x"))
    rough = vn.quantile(f, QS, dim=("y", "x"), exact=False)
    assert exact.attrs["max_error"] == 0 and rough.attrs["max_error"] > 0
    for i in range(3):
        ref = np.quantile(f.values[i].astype(np.float64), QS)
        np.testing.assert_array_equal(exact.values[i], ref)
        assert np.all(np.abs(rough.values[i] - ref) <= rough.attrs["max_error"])
    assert np.any(rough.values != exact.values)  # the bound is not vacuous: refinement changed values


@settings(deadline=None, max_examples=40)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 400), nan=st.booleans(), q=st.lists(st.floats(0, 1), min_size=1, max_size=5))
def test_float_quantiles_exact_and_chunk_invariant(seed, n, nan, q):
    rng = np.random.default_rng(seed)
    v = rng.standard_cauchy(n)  # long tails
    if nan and n > 1:
        v[rng.integers(0, n)] = np.nan
    x = xr.DataArray(v, dims="x")
    ref = np.nanquantile(v, q)
    np.testing.assert_array_equal(vn.quantile(x, q).values, ref)
    np.testing.assert_array_equal(vn.quantile(x.chunk({"x": 7}), q).values, ref)


@settings(deadline=None, max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 5),
    n=st.integers(1, 60),
    dtype=st.sampled_from(["float32", "float64"]),
    specials=st.booleans(),
    cy=st.integers(1, 5),
    cx=st.integers(1, 60),
    q=st.lists(st.floats(0, 1), min_size=1, max_size=4),
)
def test_float_per_row_quantiles_equal_numpy_on_both_paths(seed, rows, n, dtype, specials, cy, cx, q):
    """Per-row float quantiles (per-row key histograms + pick; or, past KEY_ROWS_CELLS, a range
    pass and common bins) equal np.nanquantile of each row's masked voxels, for any chunking."""
    from volnorm import stats

    rng = np.random.default_rng(seed)
    v = (rng.standard_cauchy((rows, n)) * rng.choice([1e-3, 1.0, 1e6])).astype(dtype)
    v[:, : n // 3] = v[:, :1]  # repeated values
    if specials:
        v.flat[rng.integers(0, v.size, 3)] = [np.nan, np.inf, -np.inf]
    keep = rng.random((rows, n)) > 0.3
    keep[:, 0] = True
    v[:, 0] = np.where(np.isnan(v[:, 0]), 1.0, v[:, 0])  # every row keeps one valid voxel
    x = xr.DataArray(v, dims=("row", "x")).chunk({"row": cy, "x": cx})
    mask = xr.DataArray(keep, dims=("row", "x"))
    rows_v = [np.where(keep[r], v[r], np.nan).astype(np.float64) for r in range(rows)]
    with np.errstate(invalid="ignore"):  # numpy's inf - inf
        ref = np.stack([np.nanquantile(a, q) for a in rows_v])
    # where a quantile falls exactly on a value, volnorm returns it even when numpy's
    # interpolation turns an infinity into NaN (inf * 0; documented)
    exact_pos = np.stack([((np.count_nonzero(~np.isnan(a)) - 1) * np.asarray(q)) % 1 == 0 for a in rows_v])
    lower = np.stack([np.nanquantile(a, q, method="lower") for a in rows_v])
    ref = np.where(exact_pos, lower, ref)
    np.testing.assert_array_equal(vn.quantile(x, q, dim="x", mask=mask).values, ref)
    if all(np.isfinite(a).any() for a in rows_v):  # the range pass needs a finite value per row
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(stats, "KEY_ROWS_CELLS", 0)  # the other path
            np.testing.assert_array_equal(vn.quantile(x, q, dim="x", mask=mask).values, ref)


def test_bad_q_and_empty(images):
    with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]"):
        vn.quantile(images, 50)
    empty = xr.DataArray(np.zeros((300, 300), bool), dims=("y", "x"))
    with pytest.raises(ValueError, match="no valid voxel"):
        vn.quantile(images, 0.5, mask=empty)


@pytest.mark.parametrize("chunks", [None, {"volume": 1, "y": 50}])
def test_summarize_equals_numpy(images, chunks):
    f = images.astype("float32").values.copy()
    f[0, 0, 0] = np.nan
    f[1, 1, 1] = np.inf
    x = xr.DataArray(f, dims=images.dims)
    x = x if chunks is None else x.chunk(chunks)
    s = vn.summarize(x, quantiles=[0.5])
    fin = f[np.isfinite(f)].astype(np.float64)
    assert int(s["count"]) == fin.size and int(s["n_nan"]) == 1 and int(s["n_posinf"]) == 1
    np.testing.assert_allclose(float(s["mean"]), fin.mean(), rtol=1e-12)
    np.testing.assert_allclose(float(s["var"]), fin.var(), rtol=1e-10)
    assert float(s["min"]) == fin.min() and float(s["max"]) == fin.max()
    assert float(s["q0.5"]) == np.median(fin)
    assert "mean" in repr(s) and "statistic" in repr(s)
    per = vn.summarize(x, dim=("y", "x"), quantiles=())
    for i in range(3):
        v = f[i][np.isfinite(f[i])].astype(np.float64)
        np.testing.assert_allclose(per["std"].values[i], v.std(), rtol=1e-10)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 300), k=st.integers(1, 50), offset=st.sampled_from([0.0, 1e6, -3e8]))
def test_moments_merge_is_exact_and_chunk_invariant(seed, n, k, offset):
    v = np.random.default_rng(seed).normal(offset, 1.0, n)
    x = xr.DataArray(v, dims="x")
    a = vn.summarize(x, quantiles=())
    b = vn.summarize(x.chunk({"x": k}), quantiles=())
    # float64 near |offset| carries absolute errors of ~eps*|offset| per value (numpy's too)
    tol = 1e-14 * abs(offset) + 1e-12
    np.testing.assert_allclose(float(b["mean"]), v.mean(), rtol=1e-13, atol=tol)
    np.testing.assert_allclose(float(b["var"]), v.var(), rtol=1e-9, atol=tol)
    np.testing.assert_allclose(float(a["var"]), float(b["var"]), rtol=1e-9, atol=tol)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32"])
def test_integer_summarize_per_volume_equals_numpy_in_one_pass_for_16_bit(images, dtype):
    from volnorm.testing import raise_if_dask_computes

    v = (images.values.astype(np.int64) * (3 if dtype != "uint8" else 1) - (200 if dtype in ("int16", "int32") else 0)).astype(dtype)
    x = xr.DataArray(v, dims=images.dims).chunk({"volume": 1, "y": 128})
    mask = xr.DataArray(images.values[0] > 20, dims=("y", "x"))
    qs = [0.0, 0.01, 0.5, 0.999, 1.0]
    # 8/16-bit: the moments and the quantile histogram in one compute (one read of the data)
    with raise_if_dask_computes(1 if np.dtype(dtype).itemsize <= 2 else 3):
        s = vn.summarize(x, dim=("y", "x"), mask=mask, quantiles=qs)
    for i in range(v.shape[0]):
        inside = v[i][mask.values].astype(np.float64)
        assert int(s["count"][i]) == inside.size
        np.testing.assert_allclose(float(s["mean"][i]), inside.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(s["std"][i]), inside.std(), rtol=1e-10)
        assert [float(s[f"q{q:g}"][i]) for q in qs] == np.quantile(inside, qs).tolist()  # exact


def test_per_volume_integer_quantile_tasks_do_not_carry_the_bins():
    """A 16-bit histogram's per-bin arrays are 1.5 MiB: a task that captured them would cost that
    much per volume in worker memory (the results wait there for the gather)."""
    import pickle

    import cloudpickle

    from volnorm.stats import int_quantile_lazy

    x = xr.DataArray(np.arange(8 * 16 * 16, dtype=np.uint16).reshape(8, 16, 16), dims=("volume", "y", "x")).chunk({"volume": 1})
    lazy, _, _ = int_quantile_lazy(x, np.array([0.5]), dim=("y", "x"), mask=None)
    sizes = [len(cloudpickle.dumps(t, protocol=pickle.HIGHEST_PROTOCOL)) for t in dict(lazy.__dask_graph__()).values()]
    assert max(sizes) < 64 * 1024, max(sizes)
    np.testing.assert_array_equal(lazy.compute()[:, 0], np.median(x.values.reshape(8, -1), axis=1))


def test_a_constant_float32_row_too_large_for_half_a_bin_has_its_quantiles(monkeypatch):
    """Found by the property test above: a constant float32 value of ~9e6 (its step is 1.0, so
    numpy's ±0.5 widening of a constant range rounds back) took the range-pass path into
    'equal edges'; its bins now span the neighbouring float32 values."""
    from volnorm import stats

    v = np.array([[8.936858e6, 8.936858e6]], dtype="float32")
    x = xr.DataArray(v, dims=("row", "x")).chunk({"x": 1})
    monkeypatch.setattr(stats, "KEY_ROWS_CELLS", 0)  # the range-pass path
    np.testing.assert_array_equal(vn.quantile(x, [0.0, 0.5, 1.0], dim="x").values, [[8936858.0] * 3])

"""Transforms: identical across chunkings and schedulers, lazy after their fit pass, no silent
overflow, wrap or float64 blow-up, and documented behaviour on constant, all-NaN and empty-mask input."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata

import volnorm as vn
from volnorm.testing import raise_if_dask_computes

PER_VOLUME = ("y", "x")


@pytest.fixture(scope="module")
def stack() -> xr.DataArray:
    ims = [im[:160, :200] for im in (skdata.camera(), skdata.moon(), skdata.coins())]
    return xr.DataArray(np.stack(ims).astype(np.uint16) * 7, dims=("volume", "y", "x"))


def _cases(x: xr.DataArray) -> dict[str, xr.DataArray]:
    f = x.astype(np.float32)
    mask = x > 100
    return {
        "rescale": vn.rescale(x, percentiles=(2, 98), out_range="uint8"),
        "rescale-masked": vn.rescale(f, mask=mask),
        "zscore": vn.zscore(f, dim=PER_VOLUME),
        "mean_scale": vn.mean_scale(x),
        "gamma": vn.gamma(x, 0.7),
        "auto_gamma": vn.auto_gamma(f, mask=mask),
        "log": vn.log(x),
        "equalize": vn.equalize(x),
        "equalize-float-slices": vn.equalize(f / 3, nbins=128, dim=PER_VOLUME),
        "match": vn.match_histogram(x, x.isel(volume=1)),
        "nyul": vn.nyul_apply(f, vn.nyul_fit(f, mask=mask), mask=mask),
        "binarize": vn.binarize(x, method="li"),
    }


CHUNKINGS = [None, {"volume": 1}, {"volume": 2, "y": 37, "x": 53}]


def test_identical_across_chunkings(stack):
    results = [_cases(stack if c is None else stack.chunk(c)) for c in CHUNKINGS]
    for name in results[0]:
        ref = results[0][name].values
        for other in results[1:]:
            np.testing.assert_array_equal(other[name].values, ref, err_msg=name)


@pytest.mark.slow
def test_identical_on_a_process_cluster(stack, cluster_client):
    x = stack.chunk({"volume": 1, "y": 80})
    with dask.config.set(scheduler="threads"):
        local = {k: v.values for k, v in _cases(x).items()}
    with dask.config.set(scheduler=cluster_client):
        remote = {k: v.values for k, v in _cases(x).items()}
    for name in local:
        np.testing.assert_array_equal(remote[name], local[name], err_msg=name)


@pytest.mark.parametrize(
    ("fit", "apply"),
    [
        (lambda x: vn.fit_rescale(x, percentiles=(1, 99)), lambda x, p: vn.rescale(x, params=p)),
        (lambda x: vn.fit_zscore(x, dim=PER_VOLUME), lambda x, p: vn.zscore(x, params=p)),
        (lambda x: vn.fit_mean_scale(x), lambda x, p: vn.mean_scale(x, params=p)),
        (lambda x: vn.fit_equalize(x, dim=PER_VOLUME), lambda x, p: vn.equalize(x, params=p)),
        (lambda x: vn.fit_equalize(x.astype("float32")), lambda x, p: vn.equalize(x.astype("float32"), params=p)),
    ],
    ids=["rescale", "zscore", "mean_scale", "equalize-slices", "equalize-float"],
)
def test_only_the_fit_computes(stack, fit, apply):
    x = stack.chunk({"volume": 1})
    p = fit(x)
    with raise_if_dask_computes():
        y = apply(x, p)
    assert isinstance(y.data, dask.array.Array)


def test_convenience_functions_compute_only_their_fit(stack):
    x = stack.chunk({"volume": 1})
    with raise_if_dask_computes(max_computes=2):  # moments (+ quantiles) of the fit; nothing else
        vn.rescale(x)
    with raise_if_dask_computes(max_computes=1):
        vn.equalize(x)
    with raise_if_dask_computes(max_computes=0):
        vn.binarize(x, 300)
        vn.dither(x.astype("float32"), in_range=(0, 2000))


def test_dtypes_no_overflow_wrap_or_float64_blowup():
    big = xr.DataArray(np.array([0, 65535, 40000, 1], dtype=np.uint16), dims="x")
    assert vn.rescale(big).dtype == np.float32
    assert vn.rescale(big, out_range="uint8").values.tolist() == [0, 255, 156, 0]
    i16 = xr.DataArray(np.array([-32768, 32767, 0], dtype=np.int16), dims="x")
    z = vn.zscore(i16)
    assert z.dtype == np.float32 and np.isfinite(z.values).all()
    np.testing.assert_allclose(vn.rescale(i16, out_range=(-1, 1)).values, [-1, 1, 1 / 65535], atol=1e-6)
    i32 = xr.DataArray(np.array([-(2**31), 2**31 - 1], dtype=np.int32), dims="x")
    assert vn.rescale(i32).dtype == np.float64  # float32 would lose integer precision
    assert vn.rescale(i32, out_range="int8").values.tolist() == [-128, 127]
    assert vn.gamma(xr.DataArray(np.array([0, 255], np.uint8), dims="x"), 2).values.tolist() == [0.0, 255.0]
    f16 = xr.DataArray(np.array([0, 1, 2], np.float16), dims="x")
    assert vn.equalize(f16).dtype == np.float32


def test_constant_all_nan_and_empty_mask():
    c = xr.DataArray(np.full((3, 4), 9.0, np.float32), dims=("y", "x"))
    assert np.all(vn.rescale(c).values == 0) and np.all(vn.zscore(c).values == 0)
    from skimage import exposure

    np.testing.assert_array_equal(vn.equalize(c).values, exposure.equalize_hist(c.values))  # 0.5, as scikit-image
    ci = c.astype(np.uint8)
    np.testing.assert_array_equal(vn.equalize(ci).values, exposure.equalize_hist(ci.values))  # 1.0 for integers
    assert np.all(vn.gamma(c, 2, scale="data").values == 9)  # the data's max maps to itself
    nan = c.where(False)
    empty = c < 0
    for bad in (lambda: vn.rescale(nan), lambda: vn.zscore(nan), lambda: vn.equalize(nan),
                lambda: vn.rescale(c, mask=empty), lambda: vn.equalize(c, mask=empty),
                lambda: vn.mean_scale(c.expand_dims(volume=1), mask=empty.expand_dims(volume=1))):
        with pytest.raises(ValueError, match="no valid voxel|no non-zero voxel|no voxel"):
            bad()
    x = xr.DataArray(np.array([1.0, np.nan, 3.0]), dims="x")
    assert np.isnan(vn.rescale(x).values[1]) and np.isnan(vn.zscore(x).values[1])  # NaN stays NaN

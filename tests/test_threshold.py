"""Thresholds equal scikit-image's on real images, dataset-wide and per volume."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata
from skimage import filters

import volnorm as vn

SK = {
    "otsu": filters.threshold_otsu,
    "yen": filters.threshold_yen,
    "isodata": filters.threshold_isodata,
    "minimum": filters.threshold_minimum,
    "triangle": filters.threshold_triangle,
    "li": filters.threshold_li,
    "mean": filters.threshold_mean,
}


@pytest.fixture(scope="module")
def images() -> xr.DataArray:
    ims = [im[:300, :300] for im in (skdata.camera(), skdata.moon(), skdata.coins())]
    return xr.DataArray(np.stack(ims), dims=("volume", "y", "x"))


@pytest.mark.parametrize("method", sorted(SK))
@pytest.mark.parametrize("chunks", [None, {"volume": 1, "y": 100}])
def test_uint8_equals_skimage_per_volume_and_whole(images, method, chunks):
    x = images if chunks is None else images.chunk(chunks)
    per = vn.threshold(x, method, dim=("y", "x")).values
    for i in range(3):
        assert per[i] == pytest.approx(SK[method](images.values[i]), rel=1e-12, abs=1e-9), i
    whole = float(vn.threshold(x, method))
    assert whole == pytest.approx(SK[method](images.values), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("method", ["otsu", "yen", "isodata", "triangle"])
def test_float_equals_skimage(images, method):
    f = (images.astype("float64") / 3.7).chunk({"volume": 1})
    # dataset-wide: the same bins as scikit-image's histogram of the whole array
    assert float(vn.threshold(f, method)) == pytest.approx(SK[method](f.values, nbins=256), rel=1e-12)
    # per volume each image gets its own bins over its own range, as scikit-image's histogram
    got = vn.threshold(f, method, dim=("y", "x")).values
    for i in range(3):
        assert got[i] == SK[method](f.values[i], nbins=256)


def test_multiotsu_and_percentile(images):
    got = vn.threshold(images, "multiotsu", classes=3, dim=("y", "x"))
    assert got.dims == ("volume", "threshold")
    for i in range(3):
        np.testing.assert_array_equal(got.values[i], filters.threshold_multiotsu(images.values[i], classes=3))
    assert float(vn.threshold(images, "percentile", q=0.9)) == np.quantile(images.values, 0.9)


def test_masked_threshold_ignores_outside(images):
    mask = xr.DataArray(np.zeros((300, 300), bool), dims=("y", "x"))
    mask[50:250, 50:250] = True
    got = vn.threshold(images, "otsu", dim=("y", "x"), mask=mask).values
    for i in range(3):
        assert got[i] == filters.threshold_otsu(images.values[i, 50:250, 50:250])


def test_bad_method(images):
    with pytest.raises(ValueError, match="Did you mean 'otsu'"):
        vn.threshold(images, "ostu")

"""Per-voxel statistics from per-voxel histograms, and normative scores, equal numpy references
on scikit-image's LFW faces (200 faces as a cohort), lazily."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata

import volnorm as vn
from volnorm.testing import raise_if_dask_computes

BINS, RANGE = 32, (0.0, 1.0)


@pytest.fixture(scope="module")
def cohort() -> tuple[np.ndarray, np.ndarray]:
    faces = skdata.lfw_subset()
    return faces[:150], faces[150:]  # a cohort, and new faces to score


@pytest.fixture(scope="module")
def hist(cohort) -> xr.DataArray:
    x = xr.DataArray(cohort[0], dims=("volume", "y", "x")).chunk({"volume": 40, "y": 9})
    return vn.histogram(x, dim="volume", bins=BINS, range=RANGE)


def edges() -> np.ndarray:
    return np.linspace(*RANGE, BINS + 1)


def test_stats_are_the_binned_moments_and_lazy(cohort, hist):
    with raise_if_dask_computes():
        s = vn.voxel_stats(hist)
    e = edges()
    idx = np.clip(np.searchsorted(e, cohort[0], side="right") - 1, 0, BINS - 1)  # numpy's bins, last closed
    centred = ((e[:-1] + e[1:]) / 2)[idx]  # each value at its bin's centre
    np.testing.assert_allclose(s["mean"].values, centred.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s["std"].values, centred.std(axis=0), rtol=1e-9, atol=1e-12)
    assert (s["count"].values == 150).all()
    assert np.abs(s["mean"].values - cohort[0].mean(axis=0)).max() <= 0.5 / BINS + 1e-12  # within half a bin


def test_quantiles_within_a_bin_of_numpy(cohort, hist):
    qs = [0.0, 0.05, 0.5, 0.95, 1.0]
    with raise_if_dask_computes():
        q = vn.voxel_quantile(hist, qs)
    ref = np.quantile(cohort[0], qs, axis=0, method="inverted_cdf")  # the same definition: F(v) >= q
    got = np.moveaxis(q.values, -1, 0)
    assert np.abs(got - ref).max() <= 1.0 / BINS + 1e-12  # within one bin width
    # the minimum is the lower edge of its bin, the maximum the upper edge
    e = edges()
    np.testing.assert_array_equal(got[0], e[np.clip(np.searchsorted(e, ref[0], side="right") - 1, 0, BINS - 1)])


def test_cdf_and_normative_score_equal_numpy(cohort, hist):
    new = xr.DataArray(cohort[1][0], dims=("y", "x"), attrs={"affine": np.eye(4).tolist()})
    with raise_if_dask_computes():
        score = vn.normative_score(new, hist)
    e = edges()
    counts = hist.values.astype(np.float64)
    cum = np.concatenate([np.zeros(counts.shape[:-1] + (1,)), np.cumsum(counts, axis=-1)], axis=-1)
    ref_cdf = np.empty(new.shape)
    for i, j in np.ndindex(*new.shape):  # the piecewise-linear CDF through the bin edges
        ref_cdf[i, j] = np.interp(new.values[i, j], e, cum[i, j]) / cum[i, j, -1]
    np.testing.assert_allclose(score["percentile"].values, 100 * ref_cdf, rtol=1e-6, atol=1e-4)
    st = vn.voxel_stats(hist)
    np.testing.assert_allclose(score["zscore"].values, (new.values - st["mean"].values) / st["std"].values, rtol=1e-5)
    assert score.attrs["affine"] == new.attrs["affine"]
    # a stack of new faces is scored face by face; ranks of faces from the same population average ~50
    many = vn.normative_score(xr.DataArray(cohort[1], dims=("volume", "y", "x")), hist)
    np.testing.assert_array_equal(many["percentile"].values[0], score["percentile"].values)
    assert 40 < float(many["percentile"].mean()) < 60


def test_bad_grid_and_not_a_histogram(hist):
    with pytest.raises(ValueError, match="register it"):
        vn.voxel_cdf(hist, xr.DataArray(np.zeros((24, 25)), dims=("y", "x")))
    with pytest.raises(TypeError, match="per-voxel histogram"):
        vn.voxel_stats(xr.DataArray(np.zeros(3), dims="x"))
    with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]"):
        vn.voxel_quantile(hist, 50)


def test_scores_of_a_scaled_nifti_export_as_nifti_zarr_and_nifti(tmp_path):
    """A scaled int16 NIfTI (scl_slope 2, scl_inter 10): the float maps are written with the
    volume's geometry, not squeezed back into its scaled integers."""
    import nibabel as nib

    from volnorm.normative import scores_stack

    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    files = []
    for i in range(6):
        img = nib.Nifti1Image(rng.integers(0, 200, (5, 6, 4)).astype(np.int16), affine)
        img.header.set_slope_inter(2.0, 10.0)
        files.append(tmp_path / f"s{i}.nii.gz")
        nib.save(img, files[-1])
    stack = vn.open_nifti(files[:5])
    h = vn.histogram(stack, dim="volume", bins=20, range=(0, 420))
    new = vn.open_nifti(files[5])
    vol = new.isel(volume=0, drop=True).assign_attrs(new.attrs)
    s = vn.normative_score(vol, h)
    vn.to_zarr(scores_stack(s), tmp_path / "scores.zarr")
    back = vn.open_zarr(tmp_path / "scores.zarr")
    np.testing.assert_array_equal(back.sel(volume="percentile").values, s["percentile"].values)
    np.testing.assert_allclose(back.attrs["affine"], affine)
    vn.to_nifti(s["zscore"], tmp_path / "z.nii.gz")
    z = nib.load(tmp_path / "z.nii.gz")
    np.testing.assert_allclose(z.affine, affine)
    assert z.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(z.dataobj).T, s["zscore"].values)

"""WhiteStripe and KDE tissue-mode normalization equal intensity-normalization 3.x's."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from intensity_normalization.adapters.images import NumpyImageAdapter
from intensity_normalization.domain.models import Modality
from intensity_normalization.normalizers.individual.kde import KDENormalizer
from intensity_normalization.normalizers.individual.whitestripe import WhiteStripeNormalizer
from nibabel.testing import data_path

import volnorm as vn
from volnorm.transforms import tissue

MODALITIES = ["t1", "t2", "flair", "pd"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _reference(x: xr.DataArray, mask: xr.DataArray | None, modality: str, i: int):
    vol = x.isel(volume=i).values.astype(np.float64)
    img = NumpyImageAdapter(vol)
    m = NumpyImageAdapter(mask.isel(volume=i).values) if mask is not None else None
    ws = WhiteStripeNormalizer(modality=Modality(modality)).fit(img, m)
    kd = KDENormalizer(modality=Modality(modality)).fit(img, m)
    return ws, kd, ws.transform(img).get_data(), kd.transform(img).get_data()


@pytest.fixture(scope="module")
def mri():
    """nibabel's shipped T1 (int16) and three phantom subjects (int16, brain-like tissue classes)."""
    anat = vn.open_nifti(data_path / "anatomical.nii")
    return anat


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("which", ["anatomical", "cohort"])
def test_equal_to_intensity_normalization(mri, cohort, modality, masked, which):
    x = mri if which == "anatomical" else vn.open_nifti(cohort[:3])
    mask = (x > float(np.percentile(x.values, 40))) if masked else None
    p = tissue.fit_whitestripe(x, mask=mask, modality=modality)
    pk = tissue.fit_kde(x, mask=mask, modality=modality)
    y, yk = tissue.whitestripe(x, params=p).values, tissue.kde(x, params=pk).values
    assert y.dtype == np.float32 and yk.dtype == np.float32
    for i in range(x.sizes["volume"]):
        ws, kd, ref, refk = _reference(x, mask, modality, i)
        assert _rel(float(p.values["mean"][i]), ws.mean) < 1e-6
        assert _rel(float(p.values["std"][i]), ws.std) < 1e-6
        assert _rel(float(pk.values["mode"][i]), kd.tissue_mode) < 1e-6
        assert np.corrcoef(ref.ravel(), y[i].ravel())[0, 1] >= 0.999
        np.testing.assert_allclose(y[i], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(yk[i], refk, rtol=1e-5, atol=1e-6 * np.abs(refk).max())


def test_one_call_fits_and_applies_per_volume(cohort):
    x = vn.open_nifti(cohort[:3])
    y = tissue.whitestripe(x)
    p = tissue.fit_whitestripe(x)
    assert p.values["mean"].dims == ("volume",) and list(p.values["volume"].values) == list(x["volume"].values)
    xr.testing.assert_identical(y, tissue.whitestripe(x, params=p))
    alone = tissue.whitestripe(x.isel(volume=[1]))
    np.testing.assert_array_equal(alone.values[0], y.values[1])
    assert "whitestripe" in y.attrs["volnorm_params"]


def test_the_accessor_is_the_function(cohort):
    x = vn.open_nifti(cohort[:2])
    xr.testing.assert_identical(x.volnorm.whitestripe(modality="t2"), vn.whitestripe(x, modality="t2"))
    xr.testing.assert_identical(x.volnorm.kde(), vn.kde(x))


def test_lazy_until_computed_with_params(cohort):
    x = vn.open_nifti(cohort[:2])
    p = tissue.fit_kde(x)
    calls = []
    with dask.callbacks.Callback(pretask=lambda key, dsk, state: calls.append(key)):
        y = tissue.kde(x, params=p)
        assert calls == [] and isinstance(y.data, dask.array.Array)
        y.compute(scheduler="sync")
    assert calls


def test_float_data_within_a_bin_of_the_reference(cohort):
    x = vn.open_nifti(cohort[:1]).astype("float32") * np.float32(0.37)
    p = tissue.fit_whitestripe(x, modality="t1")
    pk = tissue.fit_kde(x, modality="t1")
    ws, kd, _, _ = _reference(x, None, "t1", 0)
    fg = x.values[x.values > 0]
    bin_width = (fg.max() - x.values.min()) / tissue.FLOAT_BINS
    grid_step = (fg.max() - fg.min()) / (tissue.GRID_POINTS - 1)
    assert abs(float(pk.values["mode"][0]) - kd.tissue_mode) <= grid_step  # the grid point, or its neighbour
    assert abs(float(p.values["mean"][0]) - ws.mean) <= 2 * bin_width
    assert _rel(float(p.values["std"][0]), ws.std) < 1e-2


def test_params_and_options_are_checked(cohort):
    x = vn.open_nifti(cohort[:2])
    with pytest.raises(ValueError, match="fitted by 'kde'"):
        tissue.whitestripe(x, params=tissue.fit_kde(x))
    with pytest.raises(ValueError, match="modality"):
        tissue.whitestripe(x, params=tissue.fit_whitestripe(x, modality="t1"), modality="t2")
    with pytest.raises(ValueError, match="modality='t3'"):
        tissue.fit_whitestripe(x, modality="t3")
    with pytest.raises(ValueError, match="volume"):
        tissue.fit_kde(x.isel(volume=0))
    empty = xr.zeros_like(x)
    with pytest.raises(ValueError, match="no valid voxel|No valid voxel|valid"):
        tissue.fit_whitestripe(empty)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=1, max_size=40), st.floats(0, 1))
def test_percentile_from_counts_equals_numpy(samples, q):
    values, counts = np.unique(np.asarray(samples), return_counts=True)
    assert tissue._percentile(values, counts, q) == np.quantile(np.asarray(samples, dtype=np.float64), q)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=3, max_size=60))
def test_density_equals_scipy_gaussian_kde(samples):
    from scipy.stats import gaussian_kde

    a = np.asarray(samples, dtype=np.float64)
    if np.ptp(a) == 0:
        return
    values, counts = np.unique(a, return_counts=True)
    grid, pdf = tissue._density(values, counts, None)
    np.testing.assert_allclose(pdf, gaussian_kde(a)(grid), rtol=1e-9)
    grid, pdf = tissue._density(values, counts, a.max() / 80)
    np.testing.assert_allclose(pdf, gaussian_kde(a, bw_method=a.max() / 80)(grid), rtol=1e-9, atol=1e-300)


def test_spec_steps_equal_the_functions(tmp_path, cohort):
    spec = {"version": 1, "input": {"nifti": [str(f) for f in cohort]}, "mask": {"threshold": {"method": "otsu", "per": "volume"}},
            "steps": [{"whitestripe": {"width": 0.1, "modality": "t1"}}],
            "output": {"store": str(tmp_path / "ws.zarr")}, "engine": {"scheduler": "sync", "progress": False}}
    assert vn.pipeline.run(spec, echo=None).status == "done"
    x = vn.open_nifti(cohort)
    m = x > vn.threshold(x, "otsu", dim=("z", "y", "x"))
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "ws.zarr").values, vn.whitestripe(x, mask=m, width=0.1).values)
    spec2 = {**spec, "mask": None, "steps": [{"kde": {"modality": "t2"}}], "output": {"store": str(tmp_path / "kde.zarr")}}
    del spec2["mask"]
    assert vn.pipeline.run(spec2, echo=None).status == "done"
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "kde.zarr").values, vn.kde(x, modality="t2").values)


def test_the_command_line_step_and_its_replay_fit_each_volume(tmp_path, cohort):
    from volnorm.cli import main

    out = tmp_path / "cli.zarr"
    assert main(["convert", *map(str, cohort[:3]), str(out), "--step", "whitestripe:modality=t2:width=0.08", "--scheduler", "sync", "--no-progress"]) == 0
    want = vn.whitestripe(vn.open_nifti(cohort[:3]), modality="t2", width=0.08)
    np.testing.assert_array_equal(vn.open_zarr(out).values, want.values)
    # replayed on other volumes: the per-volume step is fitted again on each (same options)
    again = tmp_path / "again.zarr"
    assert main(["apply", *map(str, cohort[3:]), str(again), "--params", str(out), "--scheduler", "sync", "--no-progress"]) == 0
    want2 = vn.whitestripe(vn.open_nifti(cohort[3:]), modality="t2", width=0.08)
    np.testing.assert_array_equal(vn.open_zarr(again).values, want2.values)


def test_a_stripe_around_zero_takes_in_the_voxels_outside_the_mask_as_the_reference_does():
    """The reference tests ``data * mask`` against the stripe: when 0 is inside it, every voxel
    outside the mask is in the stripe, with its own value."""
    rng = np.random.default_rng(5)
    a = rng.normal(0, 20, (1, 16, 18, 20)).round().astype("int16")
    m = rng.random(a.shape) < 0.6
    x, mask = xr.DataArray(a, dims=("volume", "z", "y", "x")), xr.DataArray(m, dims=("volume", "z", "y", "x"))
    p = tissue.fit_whitestripe(x, mask=mask, modality="t2", width=0.2)
    assert float(p.values["stripe_lo"][0]) < 0 < float(p.values["stripe_hi"][0])
    ws = WhiteStripeNormalizer(width=0.2, modality=Modality.T2).fit(NumpyImageAdapter(a[0].astype(np.float64)), NumpyImageAdapter(m[0]))
    assert _rel(float(p.values["mean"][0]), ws.mean) < 1e-6 and _rel(float(p.values["std"][0]), ws.std) < 1e-6

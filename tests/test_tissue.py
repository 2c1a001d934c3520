"""WhiteStripe, KDE, FCM and LSQ tissue normalization equal intensity-normalization 3.x's."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr
from hypothesis import assume, given, settings
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


# ---------------------------------------------------------------------------
# fuzzy c-means (FCMNormalizer) and least-squares tissue means (LSQNormalizer)
# ---------------------------------------------------------------------------


def _seeded_like_volnorm(seed: int = 0):
    """skfuzzy's cmeans started as volnorm starts: each voxel from its value's column of
    :func:`tissue.initial_memberships` (the reference's own start is unseeded random)."""
    import skfuzzy

    def cmeans(data, c, m, error, maxiter, **kw):
        values, inverse = np.unique(data.ravel(), return_inverse=True)
        return skfuzzy.cmeans(data, c, m, error=error, maxiter=maxiter, init=tissue.initial_memberships(len(values), seed)[:, inverse])

    return cmeans


@pytest.fixture
def seeded_reference(monkeypatch):
    """intensity-normalization's FCM and LSQ normalizers, started as volnorm starts."""
    import intensity_normalization.normalizers.individual.fcm as fcm_module
    import intensity_normalization.normalizers.population.lsq as lsq_module

    monkeypatch.setattr(fcm_module, "cmeans", _seeded_like_volnorm())
    monkeypatch.setattr(lsq_module, "cmeans", _seeded_like_volnorm())

    def scaling_factor(self, t):
        # the reference's own formula; 3.0.1 writes float() of (1, 1) arrays, which NumPy 2.x refuses
        # ("only 0-dimensional arrays can be converted"), so its transform cannot run as shipped
        return (t.T @ t).item() / (t.T @ self._standard_tissue_means).item()

    monkeypatch.setattr(lsq_module.LSQNormalizer, "_calculate_scaling_factor", scaling_factor)
    return fcm_module.FCMNormalizer, lsq_module.LSQNormalizer


def _labelled_cohort(n: int = 3, shape=(40, 48, 36), dtype="int16"):
    """Phantom subjects with their tissue labels (3 CSF, 4 GM, 5 WM): the brain mask is the
    labelled brain."""
    from volnorm.datasets.phantom import _phantom

    vols, labels = [], []
    for s in range(n):
        a, _, lab = _phantom(shape, seed=10 + s, dtype=dtype, bias_strength=0.2, noise=0.03, intensity_scale=1.0 + 0.4 * s,
                             affine=None, labels=True)
        vols.append(a)
        labels.append(lab)
    dims = ("volume", "z", "y", "x")
    return xr.DataArray(np.stack(vols), dims=dims), np.stack(labels)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-40, 300), min_size=6, max_size=80), st.integers(0, 2**32 - 1), st.sampled_from([1.5, 2.0, 3.0]))
def test_weighted_cmeans_equals_skfuzzy_on_the_voxels(samples, seed, m):
    """On the voxels, from the same start. (With fewer distinct values than about twice the
    classes, two centres may meet on one value, where the split of its memberships between them
    turns on the last bit of a sum: neither result is better, and they differ.)"""
    import skfuzzy

    a = np.asarray(samples, dtype=np.float64)
    values, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    assume(len(values) >= 6)
    init = tissue.initial_memberships(len(values), seed)
    centers, u, steps = tissue.cmeans(values, counts, init, fuzziness=m, error=0.005, max_iter=50)
    c, ur, _, _, _, p, _ = skfuzzy.cmeans(a[None], 3, m, error=0.005, maxiter=50, init=init[:, inverse])
    assert steps == p
    np.testing.assert_allclose(centers, c.ravel(), rtol=1e-9, atol=1e-9 * max(1.0, np.abs(a).max()))
    np.testing.assert_allclose(u[:, inverse], ur, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("which", ["anatomical", "phantoms"])
def test_fcm_and_lsq_equal_intensity_normalization(mri, seeded_reference, which):
    from skimage import filters

    FCMNormalizer, LSQNormalizer = seeded_reference
    if which == "anatomical":
        x = mri
        masks = np.stack([x.values[0] > filters.threshold_otsu(x.values[0])])
    else:
        x, labels = _labelled_cohort()
        masks = labels >= 3
    mask = xr.DataArray(masks, dims=x.dims)
    p = vn.fit_fcm(x, mask=mask)
    y = vn.fcm(x, params=p).values
    pl = vn.fit_lsq(x, mask=mask)
    yl = vn.lsq(x, params=pl).values
    assert y.dtype == np.float32 and yl.dtype == np.float32
    images = [NumpyImageAdapter(v.astype(np.float64)) for v in x.values]
    ms = [NumpyImageAdapter(m) for m in masks]
    ref_lsq = LSQNormalizer().fit_population(images, ms)
    np.testing.assert_allclose(pl.values["standard"].values, ref_lsq.standard_tissue_means.ravel(), rtol=1e-6)
    for i, (img, m) in enumerate(zip(images, ms)):
        ref = FCMNormalizer().fit(img, m)
        wm = float(np.average(img.get_data(), weights=ref.tissue_membership))  # what the reference divides by
        assert _rel(float(p.values["mean"][i]), wm) < 1e-6
        np.testing.assert_allclose(p.values["centers"][i].values[-1], ref._tissue_mean, rtol=1e-6)
        want = ref.transform(img).get_data()
        assert np.corrcoef(want.ravel(), y[i].ravel())[0, 1] >= 0.999
        np.testing.assert_allclose(y[i], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        means = ref_lsq._get_tissue_means(img.get_data(), ref_lsq._get_tissue_membership(img, m)).ravel()
        np.testing.assert_allclose(pl.values["tissue_means"][i].values, means, rtol=1e-6)
        want = ref_lsq.transform(img, m).get_data()
        assert np.corrcoef(want.ravel(), yl[i].ravel())[0, 1] >= 0.999
        np.testing.assert_allclose(yl[i], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_fcm_is_within_the_unseeded_references_own_spread(mri):
    """The reference starts from unseeded random memberships and stops before full
    convergence: run to run its white-matter mean moves by about 1e-5 relative on
    anatomical.nii; volnorm's seeded start lands within that spread."""
    from intensity_normalization.normalizers.individual.fcm import FCMNormalizer
    from skimage import filters

    a = mri.values[0]
    m = a > filters.threshold_otsu(a)
    img = NumpyImageAdapter(a.astype(np.float64))
    ref = [float(np.average(a, weights=FCMNormalizer().fit(img, NumpyImageAdapter(m)).tissue_membership)) for _ in range(3)]
    got = float(vn.fit_fcm(mri, mask=xr.DataArray(m, dims=("z", "y", "x"))).values["mean"][0])
    assert all(_rel(got, r) < 1e-4 for r in ref)


def test_fcm_finds_the_phantoms_known_tissue_classes():
    """Ordered centres (CSF < GM < WM), the white-matter mean near the labelled white matter's,
    and most voxels of each label with their largest membership in their class."""
    x, labels = _labelled_cohort(2)
    mask = xr.DataArray(labels >= 3, dims=x.dims)
    p = vn.fit_fcm(x, mask=mask)
    for i in range(2):
        true = np.array([x.values[i][labels[i] == k].mean() for k in (3, 4, 5)])
        centers = p.values["centers"][i].values
        assert np.all(np.diff(centers) > 0)
        assert _rel(float(p.values["mean"][i]), true[2]) < 0.05
        values, counts = np.unique(x.values[i][labels[i] >= 3], return_counts=True)
        c, u, _ = tissue.cmeans(values, counts, tissue.initial_memberships(len(values), 0))
        np.testing.assert_allclose(np.sort(c), centers, rtol=1e-12)
        best = dict(zip(values.tolist(), np.argmax(u[np.argsort(c)], axis=0).tolist()))
        for cls, k in enumerate((3, 4, 5)):
            agree = np.mean([best[v] == cls for v in x.values[i][labels[i] == k].tolist()])
            assert agree > 0.6, (k, agree)
    # the WM-normalized volumes agree on white matter whatever their global scale
    y = vn.fcm(x, params=p).values
    wm = [y[i][labels[i] == 5].mean() for i in range(2)]
    assert abs(wm[0] - wm[1]) < 0.05


def test_lsq_brings_differently_scaled_subjects_onto_the_standard():
    x, labels = _labelled_cohort(3)
    mask = xr.DataArray(labels >= 3, dims=x.dims)
    pl = vn.fit_lsq(x, mask=mask, norm_value=2.0)
    s = pl.values["standard"].values
    assert s[0] == 2.0 and np.all(np.diff(s) > 0)
    assert pl.options["standard_from"] == "volume 0"
    y = vn.lsq(x, params=pl).values
    raw_wm = [x.values[i][labels[i] == 5].mean() for i in range(3)]
    assert max(raw_wm) / min(raw_wm) > 1.5  # the subjects' scales differ (intensity_scale 1, 1.4, 1.8) ...
    for i in range(3):  # ... their tissue means, scaled, are close to the standard ones
        t = pl.values["tissue_means"][i].values / pl.values["scale"][i].values
        np.testing.assert_allclose(t, s, rtol=0.1)
        wm = y[i][labels[i] == 5].mean()
        assert abs(wm / y[0][labels[0] == 5].mean() - 1) < 0.05  # ... and the labelled white matter agrees after
    # the same standard on new volumes: their own tissue means, the recorded standard
    again = vn.fit_lsq(x.isel(volume=[2, 1]), mask=mask.isel(volume=[2, 1]), standard=s)
    np.testing.assert_allclose(again.values["scale"].values, pl.values["scale"].values[[2, 1]], rtol=1e-12)
    assert again.options["standard_from"] == "given"


def test_fcm_float_data_within_a_bin_of_the_integer_result():
    x, labels = _labelled_cohort(1)
    mask = xr.DataArray(labels >= 3, dims=x.dims)
    exact = vn.fit_fcm(x, mask=mask)
    f = (x.astype("float32") * np.float32(0.37))
    p = vn.fit_fcm(f, mask=mask)
    bin_width = 0.37 * float(x.max() - x.min()) / tissue.FLOAT_BINS
    assert abs(float(p.values["mean"][0]) - 0.37 * float(exact.values["mean"][0])) <= 2 * bin_width
    assert vn.fcm(f, params=p).dtype == np.float32


def test_fcm_and_lsq_need_a_brain_mask_and_check_their_input():
    x, labels = _labelled_cohort(2, shape=(24, 28, 24))
    mask = xr.DataArray(labels >= 3, dims=x.dims)
    for fn in (vn.fcm, vn.fit_fcm, vn.lsq, vn.fit_lsq):
        with pytest.raises(ValueError, match=r"needs a brain mask \(mask=\)"):
            fn(x)
        with pytest.raises(ValueError, match="no voxel inside the mask"):
            fn(x, mask=xr.zeros_like(mask))
        with pytest.raises(ValueError, match="no valid voxel|No valid voxel"):
            fn(x, mask=mask & xr.DataArray([True, False], dims="volume"))  # the second volume's is empty
    with pytest.raises(ValueError, match="tissue='white'"):
        vn.fit_fcm(x, mask=mask, tissue="white")
    with pytest.raises(ValueError, match="fuzziness must be > 1"):
        vn.fit_fcm(x, mask=mask, fuzziness=1.0)
    with pytest.raises(ValueError, match="three finite tissue means"):
        vn.fit_lsq(x, mask=mask, standard=(1.0, 2.0))
    with pytest.raises(ValueError, match="volume"):
        vn.fit_fcm(x.isel(volume=0), mask=mask.isel(volume=0))
    p = vn.fit_fcm(x, mask=mask)
    with pytest.raises(ValueError, match="tissue='gm' was given, but these parameters were fitted with tissue='wm'"):
        vn.fcm(x, params=p, tissue="gm")
    with pytest.raises(ValueError, match="fitted by 'fcm', not lsq"):
        vn.lsq(x, params=p)
    with pytest.raises(ValueError, match="fitted per 'volume' on 2"):
        vn.fcm(x.isel(volume=[0]), params=p)


def test_fcm_gm_and_csf_divide_by_their_class():
    x, labels = _labelled_cohort(1, shape=(24, 28, 24))
    mask = xr.DataArray(labels >= 3, dims=x.dims)
    means = vn.fit_fcm(x, mask=mask).values["tissue_means"][0].values
    for k, t in enumerate(("csf", "gm", "wm")):
        p = vn.fit_fcm(x, mask=mask, tissue=t)
        assert float(p.values["mean"][0]) == means[k]


def test_fcm_and_lsq_lazy_until_computed_with_params_and_the_accessor(cohort):
    x = vn.open_nifti(cohort[:2])
    m = x > vn.threshold(x, "otsu", dim=("z", "y", "x"))
    xr.testing.assert_identical(x.volnorm.fcm(mask=m), vn.fcm(x, mask=m))
    xr.testing.assert_identical(x.volnorm.lsq(mask=m), vn.lsq(x, mask=m))
    xr.testing.assert_identical(x.volnorm.fit_lsq(mask=m).values, vn.fit_lsq(x, mask=m).values)
    p, pl = vn.fit_fcm(x, mask=m), x.volnorm.fit_lsq(mask=m)
    calls = []
    with dask.callbacks.Callback(pretask=lambda key, dsk, state: calls.append(key)):
        y, yl = vn.fcm(x, params=p), vn.lsq(x, params=pl)
        assert calls == [] and isinstance(y.data, dask.array.Array) and isinstance(yl.data, dask.array.Array)
        y.compute(scheduler="sync")
    assert calls
    assert [r["method"] for r in json.loads(yl.attrs["volnorm_params"])] == ["lsq"]


def test_fcm_and_lsq_on_a_distributed_cluster_equal_sync(cohort, cluster_client):
    x = vn.open_nifti(cohort[:3], chunks={"z": 10})
    m = x > 200
    want_p, want_pl = vn.fit_fcm(x, mask=m), vn.fit_lsq(x, mask=m)
    want = vn.lsq(x, params=want_pl).compute(scheduler="sync")
    with cluster_client.as_current():
        p, pl = vn.fit_fcm(x, mask=m), vn.fit_lsq(x, mask=m)
        got = vn.lsq(x, mask=m).compute()
    xr.testing.assert_identical(p.values, want_p.values)
    xr.testing.assert_identical(pl.values, want_pl.values)
    np.testing.assert_array_equal(got.values, want.values)


def test_fcm_and_lsq_spec_steps_and_their_replay(tmp_path, cohort):
    from volnorm.pipeline import steps

    spec = {"version": 1, "input": {"nifti": [str(f) for f in cohort[:4]]}, "mask": {"threshold": {"method": "otsu", "per": "volume"}},
            "steps": [{"lsq": {"norm_value": 2.0}}],
            "output": {"store": str(tmp_path / "lsq.zarr")}, "engine": {"scheduler": "sync", "progress": False}}
    assert vn.pipeline.run(spec, echo=None).status == "done"
    x = vn.open_nifti(cohort[:4])
    m = x > vn.threshold(x, "otsu", dim=("z", "y", "x"))
    want = vn.lsq(x, mask=m, norm_value=2.0)
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "lsq.zarr").values, want.values)
    spec2 = {**spec, "steps": [{"fcm": {"tissue": "gm"}}], "output": {"store": str(tmp_path / "fcm.zarr")}}
    assert vn.pipeline.run(spec2, echo=None).status == "done"
    np.testing.assert_array_equal(vn.open_zarr(tmp_path / "fcm.zarr").values, vn.fcm(x, mask=m, tissue="gm").values)
    # replayed on new volumes: each volume's tissues clustered again, the recorded standard kept
    history = json.loads(want.attrs["volnorm_params"])
    new = vn.open_nifti(cohort[4:])
    mn = new > vn.threshold(new, "otsu", dim=("z", "y", "x"))
    standard = tuple(vn.Params.from_dict(history[-1]).values["standard"].values)
    np.testing.assert_array_equal(steps.replay(new, history, mask=mn).values, vn.lsq(new, mask=mn, standard=standard).values)
    with pytest.raises(ValueError, match=r"step 'fcm' needs a brain mask"):
        steps.run_steps(x, [("fcm", {})])


def test_the_command_line_fcm_and_lsq_steps_take_a_mask(tmp_path, cohort, capsys):
    """`volnorm convert --step lsq --mask M` equals vn.lsq with that mask, `volnorm apply
    --mask M` replays it (the standard kept) on new volumes; without --mask, a step that needs
    one says where masks come from and nothing is written."""
    import nibabel as nib

    from volnorm.cli import main
    from volnorm.io.readers import open_mask

    run = ["--scheduler", "sync", "--no-progress"]
    assert main(["convert", *map(str, cohort[:2]), str(tmp_path / "o.zarr"), "--step", "lsq", *run]) != 0
    assert "step 'lsq' needs a brain mask: a pipeline spec's `mask:`" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    img = nib.load(cohort[0])
    nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 200).astype(np.uint8), img.affine), tmp_path / "brain.nii")
    mask = ["--mask", str(tmp_path / "brain.nii")]
    assert main(["convert", *map(str, cohort[:3]), str(tmp_path / "o.zarr"), "--step", "lsq", *mask, *run]) == 0
    x = vn.open_nifti(cohort[:3])
    m = open_mask(tmp_path / "brain.nii", like=x)
    want = vn.lsq(x, mask=m)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "o.zarr").values, want.values, rtol=1e-6)
    new = vn.open_nifti(cohort[3:5])
    assert main(["apply", *map(str, cohort[3:5]), str(tmp_path / "a.zarr"), "--params", str(tmp_path / "o.zarr"), *mask, *run]) == 0
    standard = tuple(vn.Params.from_dict(json.loads(want.attrs["volnorm_params"])[-1]).values["standard"].values)
    np.testing.assert_allclose(vn.open_zarr(tmp_path / "a.zarr").values,
                               vn.lsq(new, mask=open_mask(tmp_path / "brain.nii", like=new), standard=standard).values, rtol=1e-6)
    capsys.readouterr()
    assert main(["convert", str(cohort[0]), str(tmp_path / "m.zarr"), *mask, *run]) != 0
    assert "--mask is for the --step steps" in capsys.readouterr().err and not (tmp_path / "m.zarr").exists()


def test_replayed_fcm_refits_each_volume_and_lsq_needs_its_standard(cohort):
    from volnorm.pipeline import steps

    x = vn.open_nifti(cohort[:2])
    m = x > 200
    rec = json.loads(vn.fcm(x, mask=m, tissue="gm", max_iter=30).attrs["volnorm_params"])
    new = vn.open_nifti(cohort[2:4])
    xr.testing.assert_identical(steps.replay(new, rec, mask=new > 200), vn.fcm(new, mask=new > 200, tissue="gm", max_iter=30))
    with pytest.raises(ValueError, match=r"fcm needs a brain mask \(mask=\)"):
        steps.replay(new, rec)
    rec = json.loads(vn.lsq(x, mask=m).attrs["volnorm_params"])
    del rec[-1]["values"]
    with pytest.raises(ValueError, match="step 'lsq' was recorded without its standard tissue means"):
        steps.replay(new, rec, mask=new > 200)

"""Intensity transforms equal their in-memory references (numpy formulas, scikit-image, OpenCV),
fit once and apply lazily, and round-trip their parameters."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from skimage import data as skdata
from skimage import exposure

import volnorm as vn
from volnorm.testing import raise_if_dask_computes


@pytest.fixture(scope="module")
def images() -> xr.DataArray:
    ims = [im[:200, :240] for im in (skdata.camera(), skdata.moon(), skdata.coins())]
    return xr.DataArray(np.stack(ims), dims=("volume", "y", "x"), coords={"volume": ["camera", "moon", "coins"]})


@pytest.fixture(scope="module")
def mri() -> xr.DataArray:
    return vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"], chunks={"z": 5}).isel(volume=0, drop=True)


CHUNKS = [None, {"volume": 1}, {"volume": 2, "y": 37, "x": 101}]
PER_VOLUME = ("y", "x")


# ---------------------------------------------------------------------------
# rescale
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("dim", [None, PER_VOLUME])
def test_rescale_minmax_and_percentiles_equal_numpy(images, chunks, dim):
    x = images if chunks is None else images.chunk(chunks)
    a = images.values.astype(np.float64)
    axis = None if dim is None else (1, 2)
    lo, hi = a.min(axis=axis, keepdims=True), a.max(axis=axis, keepdims=True)
    np.testing.assert_allclose(vn.rescale(x, dim=dim).values, (a - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    p_lo, p_hi = np.percentile(a, [2, 98], axis=axis, keepdims=True)
    ref = np.clip((a - p_lo) / (p_hi - p_lo) * 2 - 1, -1, 1)
    got = vn.rescale(x, percentiles=(2, 98), out_range=(-1, 1), dim=dim)
    np.testing.assert_allclose(got.values, ref, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32


def test_rescale_integer_output_masks_constant_and_explicit_window(images, mri):
    u8 = vn.rescale(mri, out_range="uint8")
    a = mri.values.astype(np.float64)
    ref = np.rint((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)
    assert u8.dtype == np.uint8 and np.abs(u8.values.astype(int) - ref).max() <= 1  # float32 arithmetic
    mask = mri > float(mri.mean())
    got = vn.rescale(mri, mask=mask)
    m = a[mask.values]
    np.testing.assert_allclose(got.values, np.clip((a - m.min()) / (m.max() - m.min()), 0, 1), rtol=1e-5, atol=1e-6)
    const = xr.DataArray(np.full((4, 5), 7, np.int16), dims=("y", "x"))
    assert np.all(vn.rescale(const, out_range=(10, 20)).values == 10)  # no division by zero
    w = vn.rescale(images, (50, 100), clip=False).values
    np.testing.assert_allclose(w, (images.values.astype(np.float64) - 50) / 50, rtol=1e-6, atol=1e-6)


def test_fit_on_one_apply_on_another_is_lazy_and_serializable(images):
    train, test = images.isel(volume=[0, 1]), images.isel(volume=[2]).chunk({"y": 50})
    p = vn.fit_rescale(train, percentiles=(1, 99))
    p2 = vn.Params.from_json(p.to_json())
    assert p2 == p
    with raise_if_dask_computes():
        y = vn.rescale(test, params=p2)
    lo, hi = np.percentile(train.values, [1, 99])
    np.testing.assert_allclose(y.values, np.clip((test.values - lo) / (hi - lo), 0, 1), rtol=1e-6, atol=1e-6)
    import json

    history = json.loads(y.attrs["volnorm_params"])
    assert history[-1]["method"] == "rescale" and history[-1]["options"]["percentiles"] == [1.0, 99.0]
    with pytest.raises(ValueError, match="fitted by 'rescale', not zscore"):
        vn.zscore(test, params=p)


def test_rescale_bad_arguments(images):
    with pytest.raises(ValueError, match="percentiles"):
        vn.rescale(images, percentiles=(99, 1))
    with pytest.raises(ValueError, match="out_range"):
        vn.rescale(images, out_range=(1, 1))
    with pytest.raises(ValueError, match="integer dtype"):
        vn.rescale(images, out_range="float32")
    with pytest.raises(ValueError, match="in_range"):
        vn.rescale(images, "auto")


# ---------------------------------------------------------------------------
# z-score, FSL mean scaling, gamma, log, auto-gamma
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [None, PER_VOLUME])
def test_zscore_equals_numpy_and_constant_is_zero(images, dim):
    a = images.values.astype(np.float64)
    axis = None if dim is None else (1, 2)
    ref = (a - a.mean(axis=axis, keepdims=True)) / a.std(axis=axis, keepdims=True)
    np.testing.assert_allclose(vn.zscore(images.chunk({"y": 64}), dim=dim).values, ref, rtol=1e-5, atol=1e-5)
    const = xr.DataArray(np.full((2, 3), 5.0), dims=("y", "x"))
    assert np.all(vn.zscore(const).values == 0)


def test_masked_zscore_uses_masked_moments_everywhere(mri):
    mask = mri > 1000
    a = mri.values.astype(np.float64)
    m = a[mask.values]
    np.testing.assert_allclose(vn.zscore(mri, mask=mask).values, (a - m.mean()) / m.std(), rtol=1e-5, atol=1e-5)


def test_mean_scale_is_fsl_inm_and_ing(images):
    a = images.values.astype(np.float64)
    a[:, :10] = 0
    x = images.copy(data=a)
    inm = np.stack([v * 10000 / v[v != 0].mean() for v in a])
    np.testing.assert_allclose(vn.mean_scale(x).values, inm, rtol=1e-6)
    ing = a * 10000 / a[a != 0].mean()
    np.testing.assert_allclose(vn.mean_scale(x, per_volume=False).values, ing, rtol=1e-6)


def test_gamma_log_auto_gamma_formulas(images):
    """scale="data" (the data's max; the default, the dtype's full scale as scikit-image and
    ImageMagick, is tested in test_intensity_references.py)."""
    a = images.values.astype(np.float64)
    mx = a.max()
    np.testing.assert_allclose(vn.gamma(images, 0.4, scale="data").values, mx * (a / mx) ** 0.4, rtol=1e-5)
    np.testing.assert_allclose(vn.log(images, scale="data").values, mx * np.log1p(a) / np.log1p(mx), rtol=1e-5)
    g = np.log(0.5) / np.log(a.mean() / mx)
    np.testing.assert_allclose(vn.auto_gamma(images, scale="data").values, mx * (a / mx) ** g, rtol=1e-5)
    per = vn.gamma(images, 2.0, dim=PER_VOLUME, scale="data").values
    np.testing.assert_allclose(per.max(axis=(1, 2)), a.max(axis=(1, 2)), rtol=1e-6)  # max maps to max
    with pytest.raises(ValueError, match="non-negative"):
        vn.gamma(images.astype(np.float32) - 10, 2.0).compute()  # scale="dtype": raised when computed
    with pytest.raises(ValueError, match="positive"):
        vn.gamma(images, -1)


# ---------------------------------------------------------------------------
# equalization: scikit-image (float) and OpenCV (uint8), per slice and dataset-wide
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", CHUNKS)
def test_equalize_per_slice_equals_skimage(images, chunks):
    x = images if chunks is None else images.chunk(chunks)
    with raise_if_dask_computes():  # per slice: each block equalizes its slices; no pass at call time
        got = vn.equalize(x, dim=PER_VOLUME)
    assert got.dtype == np.float32  # volnorm's rule for <= 16-bit integers (scikit-image: float64)
    for i in range(3):
        ref = exposure.equalize_hist(images.values[i])
        assert ref.dtype == np.float64
        np.testing.assert_array_equal(got.values[i], ref.astype(np.float32))  # scikit-image's, rounded
    f = (images.astype(np.float32) / 7.3).chunk({"volume": 1, "y": 50})
    gotf = vn.equalize(f, nbins=100, dim=PER_VOLUME)
    assert gotf.dtype == np.float32
    for i in range(3):
        ref = exposure.equalize_hist(f.values[i], nbins=100)
        assert ref.dtype == np.float32
        np.testing.assert_allclose(gotf.values[i], ref, rtol=0, atol=2e-7)
    s8 = (images.astype(np.int16) - 128).astype(np.int8)  # signed 1-byte data: the gather kernel's offset
    got8 = vn.equalize(s8 if chunks is None else s8.chunk(chunks), dim=PER_VOLUME)
    for i in range(3):
        np.testing.assert_allclose(got8.values[i], exposure.equalize_hist(s8.values[i]), rtol=0, atol=1e-6)


def test_equalize_dataset_wide_and_masked_equal_skimage(images, mri):
    np.testing.assert_allclose(vn.equalize(images.chunk({"volume": 1})).values, exposure.equalize_hist(images.values), atol=1e-6)
    mask = mri > float(mri.mean())
    ref = exposure.equalize_hist(mri.values, mask=mask.values)
    np.testing.assert_allclose(vn.equalize(mri, mask=mask).values, ref, atol=1e-6)


def test_equalize_per_slice_masked_equals_skimage_and_is_lazy(images):
    """Voxels outside the mask below a slice's masked minimum take the CDF of that minimum, as
    scikit-image's ``np.interp`` clamps (one CDF per slice over the slice's own masked range)."""
    mask = images > 60
    for x in (images, images.astype(np.uint16) * 200, images.astype(np.float32) / 7.3):
        with raise_if_dask_computes():
            got = vn.equalize(x.chunk({"volume": 1, "y": 50}), dim=PER_VOLUME, mask=mask)
        fitted = vn.equalize(x, params=vn.fit_equalize(x, dim=PER_VOLUME, mask=mask))  # the fit path: the same
        np.testing.assert_array_equal(fitted.values, got.values)
        for i in range(3):
            ref = exposure.equalize_hist(x.values[i], mask=mask.values[i])
            np.testing.assert_array_equal(got.values[i], ref.astype(got.dtype))
    with raise_if_dask_computes():
        empty = vn.equalize(images.chunk({"volume": 1}), dim=PER_VOLUME, mask=xr.zeros_like(mask))
    with pytest.raises(ValueError, match="no valid"):
        empty.compute()


def test_equalize_uint8_equals_opencv(images):
    cv2 = pytest.importorskip("cv2")
    got = vn.equalize(images.chunk({"volume": 1, "y": 64}), dim=PER_VOLUME, out_range="uint8")
    assert got.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(got.values[i], cv2.equalizeHist(images.values[i]))


def test_equalize_is_lazy_after_its_fit(images):
    p = vn.fit_equalize(images)
    with raise_if_dask_computes():
        y = vn.equalize(images.chunk({"volume": 1}), params=p)
    assert isinstance(y.data, type(images.chunk().data))
    assert vn.Params.from_json(p.to_json()) == p


# ---------------------------------------------------------------------------
# histogram matching and Nyúl standardization
# ---------------------------------------------------------------------------


def test_match_histogram_uint8_equals_skimage(images):
    src, ref = images.isel(volume=0), images.isel(volume=1)
    got = vn.match_histogram(src.chunk({"y": 64}), ref)
    np.testing.assert_allclose(got.values, exposure.match_histograms(src.values, ref.values), rtol=1e-12)
    # to a dataset-wide reference histogram (e.g. a cohort's)
    h = vn.histogram(images)
    got2 = vn.match_histogram(src, h)
    flat = images.values.reshape(-1, images.sizes["x"])
    np.testing.assert_allclose(got2.values, exposure.match_histograms(src.values, flat), rtol=1e-12)


def test_match_histogram_float_within_a_bin(images):
    src = images.isel(volume=0).astype(np.float32) / 3.1 + 0.01
    ref = images.isel(volume=2).astype(np.float32) * 1.7
    got = vn.match_histogram(src, ref).values
    want = exposure.match_histograms(src.values, ref.values)
    width = float(ref.max() - ref.min()) / 4096 * 4  # interpolation across neighbouring bins
    assert np.abs(got - want).max() <= width + 1e-6


def nyul_reference(volumes, masks, percentiles, lo, hi):
    """The algorithm as intensity-normalization writes it (numpy, in memory)."""
    lands = [np.percentile(v[m], percentiles) for v, m in zip(volumes, masks)]
    mapped = [lo + (l - l[0]) / (l[-1] - l[0]) * (hi - lo) for l in lands]
    std = np.mean(mapped, axis=0)
    outs = []
    for v, l in zip(volumes, lands):
        from scipy.interpolate import interp1d

        outs.append(interp1d(l, std, fill_value="extrapolate")(v.astype(np.float64)))
    return std, outs


def test_nyul_equals_the_in_memory_algorithm(mri):
    rng = np.random.default_rng(0)
    vols = np.stack([mri.values * s + o for s, o in [(1.0, 0), (1.7, 300), (0.6, -50)]]).astype(np.float32)
    vols += rng.normal(0, 5, vols.shape).astype(np.float32)
    x = xr.DataArray(vols, dims=("volume", "z", "y", "x")).chunk({"volume": 1, "z": 7})
    mask = x > 500
    p = vn.nyul_fit(x, mask=mask)
    ms = [m for m in mask.values]
    std, outs = nyul_reference(list(vols), ms, vn.transforms.nyul.NYUL_PERCENTILES, 1.0, 100.0)
    np.testing.assert_allclose(p.values["standard"].values, std, rtol=1e-6)
    y = vn.nyul_apply(x, p, mask=mask)
    for i in range(3):
        np.testing.assert_allclose(y.values[i], outs[i], rtol=1e-4, atol=1e-3)
    q = vn.Params.from_json(p.to_json())
    assert q == p
    with pytest.raises(ValueError, match="`volume` dim"):
        vn.nyul_fit(mri)


# ---------------------------------------------------------------------------
# binarization and dithering
# ---------------------------------------------------------------------------


def test_binarize_threshold_methods_and_fsl_semantics(images):
    from skimage import filters

    x = images.chunk({"volume": 1, "y": 50})
    got = vn.binarize(x, method="otsu")
    np.testing.assert_array_equal(got.values, images.values > filters.threshold_otsu(images.values))
    per = vn.binarize(x, method="otsu", dim=PER_VOLUME).values
    for i in range(3):
        np.testing.assert_array_equal(per[i], images.values[i] > filters.threshold_otsu(images.values[i]))
    a = images.values
    np.testing.assert_array_equal(vn.binarize(x, 100, inclusive=True, upper=200).values, (a >= 100) & (a <= 200))  # -thr -uthr -bin
    np.testing.assert_array_equal(vn.binarize(x, 0, invert=True).values, a == 0)  # -binv
    with pytest.raises(ValueError, match="several thresholds"):
        vn.binarize(x, method="multiotsu")


def test_dither_keeps_the_mean_and_is_seamless_across_chunks():
    img = skdata.camera().astype(np.float64) / 255.0
    x = xr.DataArray(np.stack([img, img[::-1]]), dims=("volume", "y", "x"))
    one = vn.dither(x, in_range=(0, 1)).values
    chunked = vn.dither(x.chunk({"volume": 1, "y": 77, "x": 101}), in_range=(0, 1)).values
    np.testing.assert_array_equal(one, chunked)  # Bayer tiles in global coordinates: no seams
    ref = img > (vn.transforms.binary.BAYER8[np.arange(512)[:, None] % 8, np.arange(512)[None, :] % 8] + 0.5) / 64
    np.testing.assert_array_equal(one[0], ref)
    fs = vn.dither(x.chunk({"volume": 1, "y": 100}), "floyd-steinberg", in_range=(0, 1)).values
    for out in (one, fs):
        assert abs(out.mean() - x.values.mean()) < 0.01
        # the local mean survives: 16x16 block means track the image (a threshold would not)
        blocks = out[0].reshape(32, 16, 32, 16).mean(axis=(1, 3))
        assert np.abs(blocks - img.reshape(32, 16, 32, 16).mean(axis=(1, 3))).mean() < 0.03
    assert np.abs((img > 0.5).reshape(32, 16, 32, 16).mean(axis=(1, 3)) - img.reshape(32, 16, 32, 16).mean(axis=(1, 3))).mean() > 0.1


def test_the_accessor_is_exactly_the_function(images):
    import inspect

    from volnorm.accessor import DATAARRAY_METHODS, DATATREE_METHODS

    x = images.chunk({"volume": 1})
    xr.testing.assert_identical(x.volnorm.equalize(dim=PER_VOLUME), vn.equalize(x, dim=PER_VOLUME))
    xr.testing.assert_identical(x.volnorm.histogram(), vn.histogram(x))
    assert float(x.volnorm.threshold("li")) == float(vn.threshold(x, "li"))
    for name in DATAARRAY_METHODS:
        method = getattr(x.volnorm, name)
        assert method.__doc__ == getattr(vn, name).__doc__ and method.__doc__
        assert inspect.signature(getattr(vn, name)).parameters  # a real function behind it
    tree = xr.DataTree.from_dict({n: xr.Dataset({"image": images.sel(volume=n, drop=True)}) for n in ("camera", "moon")})
    xr.testing.assert_identical(tree.volnorm.histogram(), vn.histogram(tree))
    assert set(DATATREE_METHODS) <= set(dir(tree.volnorm))


def test_equalize_adaptive_equals_skimage_without_seams(images, mri):
    x = images.chunk({"volume": 1, "y": 33, "x": 50})  # chunks cut the planes: volnorm keeps them whole
    got = vn.equalize_adaptive(x, clip_limit=0.02)
    for i in range(3):
        np.testing.assert_array_equal(got.values[i], exposure.equalize_adapthist(images.values[i], clip_limit=0.02))
    # signed 16-bit: scikit-image alone clips the negative values; volnorm maps the plane's range first
    signed = (mri.astype(np.int32) - 5000).astype(np.int16).isel(z=slice(0, 4))
    out = vn.equalize_adaptive(signed, dim=("y", "x")).values
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    plane = signed.values[0].astype(np.float64)
    ref = exposure.equalize_adapthist((plane - plane.min()) / (plane.max() - plane.min()))
    np.testing.assert_array_equal(out[0], ref)
    assert np.unique(exposure.equalize_adapthist(signed.values[0])).size < np.unique(out[0]).size  # skimage clips
    vol = vn.equalize_adaptive(mri.astype(np.uint16).chunk({"z": 3}), dim=("z", "y", "x"))
    np.testing.assert_array_equal(vol.values, exposure.equalize_adapthist(mri.values.astype(np.uint16).transpose(0, 1, 2)))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), hi=st.integers(1, 256), h=st.integers(1, 24), w=st.integers(1, 24))
def test_uint8_equalize_is_opencv_bit_for_bit(seed, hi, h, w):
    """Including ties at .5 (OpenCV rounds its float32 product half to even) and one-value images
    (OpenCV leaves them as they are)."""
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(seed).integers(0, hi, (h, w)).astype(np.uint8)
    got = vn.equalize(xr.DataArray(img, dims=("y", "x")), out_range="uint8").values
    np.testing.assert_array_equal(got, cv2.equalizeHist(img))

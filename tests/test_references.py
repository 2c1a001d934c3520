"""One table: every row of the README's "Coming from" table is a volnorm call checked against
the reference it names, on the reference's own sample data (scikit-image's images, nibabel's
test NIfTI files), dtype for dtype where volnorm claims it. The README cannot drift: a row
without an entry here fails, and an entry without a row fails.

Deeper, property-based comparisons live beside each family (tests/test_intensity_references.py,
tests/test_threshold_references.py, tests/test_color_references.py, tests/test_fsl.py,
tests/test_peers.py); this table is the contract a reader of the README sees.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from skimage import color as skcolor
from skimage import data as skdata
from skimage import exposure, filters

import volnorm as vn

README = Path(__file__).parents[1] / "README.md"


def _fsl_reference():
    """FSL's own algorithms, transcribed in tests/test_fsl.py (FSL is not installed here)."""
    spec = importlib.util.spec_from_file_location("fsl_reference", Path(__file__).parent / "test_fsl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FSL = _fsl_reference()


def readme_rows() -> list[tuple[str, str, str]]:
    section = README.read_text().split("## Coming from", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and "---" not in r][1:]
    return [tuple(c.strip() for c in r.strip("|").split("|")[:3]) for r in rows]


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return skdata.camera()


@pytest.fixture(scope="module")
def anat() -> np.ndarray:
    """nibabel's anatomical.nii as volnorm orders it: (z, y, x)."""
    a = np.asarray(nib.load(vn.datasets.nibabel_files()["anatomical.nii"]).dataobj).T
    return a.astype(a.dtype.newbyteorder("="))  # the file is big-endian


def _da(a: np.ndarray, dims: tuple[str, ...], chunks: int = 64) -> xr.DataArray:
    return xr.DataArray(a, dims=dims).chunk({d: chunks for d in dims})


# ---------------------------------------------------------------------------
# one check per README row (keyed by the "there" cell, exactly as the README writes it)
# ---------------------------------------------------------------------------


def fsl_robust_range(camera, anat):
    got = vn.fsl.robust_range(_da(anat, ("z", "y", "x"), 16))
    (lo, hi), _passes = FSL.fsl_find_thresholds(anat.ravel())
    assert got == (FSL._as_py(lo), FSL._as_py(hi))


def fsl_percentile(camera, anat):
    x = _da(anat, ("z", "y", "x"), 16)
    assert float(vn.fsl.percentile(x, 50)) == float(FSL.fsl_percentile(anat.ravel(), 50))
    assert float(vn.quantile(x, 0.5)) == float(np.quantile(anat, 0.5))


def fsl_masked_mean_std(camera, anat):
    x = _da(anat, ("z", "y", "x"), 16)
    m = anat > np.median(anat)
    got = vn.fsl.fslstats(x, ["-k", "mask", "-m", "-s"], masks={"mask": xr.DataArray(m, dims=("z", "y", "x"))})
    inside = anat[m].astype(np.float64)
    np.testing.assert_allclose(got, [inside.mean(), inside.std(ddof=1)], rtol=1e-12)
    s = vn.summarize(x, mask=xr.DataArray(m, dims=("z", "y", "x")))
    np.testing.assert_allclose(float(s["mean"]), inside.mean(), rtol=1e-12)


def fsl_thrp(camera, anat):
    (lo, hi), _passes = FSL.fsl_find_thresholds(anat.ravel())
    lo, hi = float(lo), float(hi)
    t = vn.fsl.thrp_threshold(_da(anat, ("z", "y", "x"), 16), 10)
    np.testing.assert_allclose(t, lo + 0.10 * (hi - lo), rtol=1e-6)


def fsl_inm(camera, anat):
    stack = np.stack([anat, anat // 2 + 7]).astype(np.float64)
    got = vn.mean_scale(_da(stack, ("volume", "z", "y", "x"), 16), 10000).values
    ref = np.stack([v * 10000 / v[v != 0].mean() for v in stack])
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def sk_histogram(camera, anat):
    counts, centers = exposure.histogram(camera)
    h = vn.histogram(_da(camera, ("y", "x")))
    ours = dict(zip(h["bin"].values.astype(int), h.values))
    assert [ours[int(c)] for c in centers] == list(counts)
    assert sum(ours.values()) == camera.size


def sk_rescale(camera, anat):
    p1, p99 = np.percentile(camera, (1, 99))
    ref = exposure.rescale_intensity(camera.astype(np.float64), in_range=(p1, p99), out_range=(0.0, 1.0))
    got = vn.rescale(_da(camera, ("y", "x")), percentiles=(1, 99)).values
    np.testing.assert_allclose(got, ref, atol=1e-6)


def sk_equalize(camera, anat):
    ref = exposure.equalize_hist(camera)
    got = vn.equalize(_da(camera, ("y", "x"))).values
    np.testing.assert_array_equal(got, ref.astype(got.dtype))  # float32 output: skimage's values rounded


def sk_clahe(camera, anat):
    ref = exposure.equalize_adapthist(camera)
    got = vn.equalize_adaptive(_da(camera, ("y", "x"))).values
    np.testing.assert_allclose(got, ref, atol=1e-6)


def sk_match(camera, anat):
    ref_img = skdata.moon()
    ref = exposure.match_histograms(camera, ref_img)
    got = vn.match_histogram(_da(camera, ("y", "x")), _da(ref_img, ("y", "x"))).values
    np.testing.assert_allclose(got, ref, atol=1e-6)


def sk_gamma(camera, anat):
    dark = (camera * 0.7).astype(np.uint8)  # max 178: the data's max is not the dtype's
    for g in (0.5, 2.0):
        ref = exposure.adjust_gamma(dark, g)
        got = vn.gamma(_da(dark, ("y", "x")), g).values
        assert got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)


def sk_log(camera, anat):
    ref = exposure.adjust_log(camera)
    got = vn.log(_da(camera, ("y", "x"))).values
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


def sk_otsu(camera, anat):
    assert float(vn.threshold(_da(camera, ("y", "x")), "otsu")) == float(filters.threshold_otsu(camera))


def sk_multiotsu(camera, anat):
    got = vn.threshold(_da(camera, ("y", "x")), "multiotsu").values
    np.testing.assert_array_equal(got, filters.threshold_multiotsu(camera))


def sk_rgb2gray(camera, anat):
    rgb = skdata.astronaut()
    got = vn.color.to_grey(xr.DataArray(rgb, dims=("y", "x", "channel")), method="rec709").values
    np.testing.assert_allclose(got / 255, skcolor.rgb2gray(rgb), atol=2e-3)


def sk_equalize_hsv(camera, anat):
    rgb = skdata.astronaut()
    hsv = skcolor.rgb2hsv(rgb)
    hsv[..., 2] = exposure.equalize_hist(hsv[..., 2])
    ref = skcolor.hsv2rgb(hsv)
    got = vn.color.equalize_color(xr.DataArray(rgb, dims=("y", "x", "channel")), space="hsv").values
    got = got / 255.0 if got.dtype == np.uint8 else got
    assert np.mean(np.abs(got - ref)) < 2 / 255


def mpl_colormap(camera, anat):
    import matplotlib as mpl

    x = camera.astype(np.float64)
    ref = mpl.colormaps["viridis"](mpl.colors.Normalize(10, 240)(x), bytes=True)
    rgba = vn.apply_colormap(_da(x, ("y", "x")), "viridis", vmin=10, vmax=240)
    np.testing.assert_array_equal(rgba.values, ref)
    back = vn.invert_colormap(rgba, "viridis", 10, 240)
    err = np.abs(back.values - np.clip(x, 10, 240))
    assert err.max() <= float(back.attrs["max_error"]) + 1e-9


def sklearn_kmeans(camera, anat):
    from sklearn.metrics import pairwise_distances_argmin

    rgb = xr.DataArray(skdata.astronaut()[::4, ::4], dims=("y", "x", "channel"))
    p = vn.color.fit_quantize(rgb, 16)
    labels = vn.color.quantize(rgb, params=p, labels=True).values
    palette = np.asarray(p.values["palette"].values, dtype=np.float64)
    ref = pairwise_distances_argmin(rgb.values.reshape(-1, 3).astype(np.float64), palette).reshape(labels.shape)
    assert np.mean(labels == ref) > 0.999  # ties between equidistant colours may go either way


def inorm_zscore(camera, anat):
    m = anat > filters.threshold_otsu(anat)
    x = _da(anat.astype(np.float64), ("z", "y", "x"), 16)
    got = vn.zscore(x, mask=xr.DataArray(m, dims=("z", "y", "x"))).values
    inside = anat[m].astype(np.float64)
    np.testing.assert_allclose(got, (anat - inside.mean()) / inside.std(), rtol=1e-9, atol=1e-9)


def _inorm_tissue(anat, normalizer, ours):
    from intensity_normalization.adapters.images import NumpyImageAdapter

    m = anat > filters.threshold_otsu(anat)
    ref = normalizer.fit(NumpyImageAdapter(anat.astype(np.float64)), NumpyImageAdapter(m))
    got = ours(_da(anat, ("z", "y", "x"), 16).expand_dims(volume=1), xr.DataArray(m, dims=("z", "y", "x"))).values[0]
    want = ref.transform(NumpyImageAdapter(anat.astype(np.float64))).get_data()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def inorm_whitestripe(camera, anat):
    from intensity_normalization.domain.models import Modality
    from intensity_normalization.normalizers.individual.whitestripe import WhiteStripeNormalizer

    _inorm_tissue(anat, WhiteStripeNormalizer(width=0.05, modality=Modality.T1), lambda x, m: vn.whitestripe(x, mask=m, width=0.05, modality="t1"))


def inorm_kde(camera, anat):
    from intensity_normalization.domain.models import Modality
    from intensity_normalization.normalizers.individual.kde import KDENormalizer

    _inorm_tissue(anat, KDENormalizer(modality=Modality.T1), lambda x, m: vn.kde(x, mask=m, modality="t1"))


def _otsu_mask(anat):
    m = anat > filters.threshold_otsu(anat)
    return m, xr.DataArray(m, dims=("z", "y", "x"))


def _seeded_cmeans(data, c, m, error, maxiter):
    """skfuzzy's cmeans started as volnorm starts: each voxel from its value's column."""
    import skfuzzy

    values, inverse = np.unique(data.ravel(), return_inverse=True)
    return skfuzzy.cmeans(data, c, m, error=error, maxiter=maxiter, init=vn.transforms.tissue.initial_memberships(len(values), 0)[:, inverse])


def inorm_fcm(camera, anat):
    """The reference started as volnorm starts (its own start is unseeded random: run to run it
    moves by about 1e-5 relative, tests/test_tissue.py)."""
    from intensity_normalization.adapters.images import NumpyImageAdapter
    from intensity_normalization.domain.models import TissueType
    from intensity_normalization.normalizers.individual import fcm as module

    m, mask = _otsu_mask(anat)
    original, module.cmeans = module.cmeans, _seeded_cmeans
    try:
        img = NumpyImageAdapter(anat.astype(np.float64))
        want = module.FCMNormalizer(tissue_type=TissueType.WM).fit(img, NumpyImageAdapter(m)).transform(img).get_data()
    finally:
        module.cmeans = original
    got = vn.fcm(_da(anat, ("z", "y", "x"), 16).expand_dims(volume=1), mask=mask, tissue="wm").values[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def inorm_lsq(camera, anat):
    """Two subjects (anatomical.nii, and it scaled by 1.7 and flipped): the standard tissue means
    are the first one's over its CSF mean; each is divided by its least-squares scale (the
    reference's formula: its transform's float() of a 1x1 array fails under NumPy 2)."""
    from intensity_normalization.adapters.images import NumpyImageAdapter
    from intensity_normalization.normalizers.population import lsq as module

    stack = np.stack([anat, (anat[::-1] * 1.7).round().astype(anat.dtype)])
    masks = np.stack([_otsu_mask(a)[0] for a in stack])
    original, module.cmeans = module.cmeans, _seeded_cmeans
    try:
        ref = module.LSQNormalizer()
        images = [NumpyImageAdapter(a.astype(np.float64)) for a in stack]
        ref.fit_population(images, [NumpyImageAdapter(m) for m in masks])
        want = []
        for img, m in zip(images, masks):
            t = ref._get_tissue_means(img.get_data(), ref._get_tissue_membership(img, NumpyImageAdapter(m)))
            want.append(img.get_data() / ((t.T @ t).item() / (t.T @ ref.standard_tissue_means).item()))
    finally:
        module.cmeans = original
    got = vn.lsq(_da(stack, ("volume", "z", "y", "x"), 16), mask=xr.DataArray(masks, dims=("volume", "z", "y", "x"))).values
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())


def sitk_n4(camera, anat):
    """SimpleITK's documented example with shrinking (tests/test_n4.py checks every option)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(anat.astype(np.float32))
    m = anat > filters.threshold_otsu(anat)
    mask = sitk.GetImageFromArray(m.astype(np.uint8))
    mask.CopyInformation(image)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([5, 5])
    corrector.Execute(sitk.Shrink(image, [4] * 3), sitk.Shrink(mask, [4] * 3))
    want = sitk.GetArrayFromImage(image / sitk.Exp(corrector.GetLogBiasFieldAsImage(image)))
    got = vn.n4(_da(anat, ("z", "y", "x"), 16).expand_dims(volume=1), mask=xr.DataArray(m, dims=("z", "y", "x")), shrink_factor=4, iterations=(5, 5)).values[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def inorm_nyul(camera, anat):
    from intensity_normalization import NyulNormalizer  # noqa: F401 - the reference (tests/test_peers.py compares the landmarks)

    peers = importlib.util.spec_from_file_location("peers", Path(__file__).parent / "test_peers.py")
    mod = importlib.util.module_from_spec(peers)
    peers.loader.exec_module(mod)
    assert hasattr(mod, "test_nyul_equals_intensity_normalization")


def torchio_znorm(camera, anat):
    """TorchIO's ZNormalization: (x - mean) / std of each image (torch's std is N - 1)."""
    stack = np.stack([anat, anat[::-1] * 2]).astype(np.float32)
    got = vn.zscore(_da(stack, ("volume", "z", "y", "x"), 16), dim=("z", "y", "x")).values
    for v, g in zip(stack.astype(np.float64), got):
        np.testing.assert_allclose(g, (v - v.mean()) / v.std(ddof=1), rtol=2e-4, atol=2e-4)


def torchio_rescale(camera, anat):
    stack = np.stack([anat, anat[::-1] * 2]).astype(np.float32)
    got = vn.rescale(_da(stack, ("volume", "z", "y", "x"), 16), percentiles=(1, 99), dim=("z", "y", "x")).values
    for v, g in zip(stack.astype(np.float64), got):
        lo, hi = np.percentile(v, (1, 99))
        np.testing.assert_allclose(g, np.clip((v - lo) / (hi - lo), 0, 1), atol=1e-6)


def torchio_histogram_standardization(camera, anat):
    """Nyúl's method, as intensity-normalization's (the same landmarks: tests/test_peers.py)."""
    inorm_nyul(camera, anat)


TABLE: dict[str, Callable] = {
    "`fslstats img -r` (robust range)": fsl_robust_range,
    "`fslstats img -p 50`": fsl_percentile,
    "`fslstats img -k mask -m -s`": fsl_masked_mean_std,
    "`fslmaths img -thrp 10`": fsl_thrp,
    "`fslmaths img -inm 10000`": fsl_inm,
    "`skimage.exposure.histogram(img)`": sk_histogram,
    "`skimage.exposure.rescale_intensity(img, in_range=(p1, p99))`": sk_rescale,
    "`skimage.exposure.equalize_hist(img)`": sk_equalize,
    "`skimage.exposure.equalize_adapthist(img)`": sk_clahe,
    "`skimage.exposure.match_histograms(img, ref)`": sk_match,
    "`skimage.exposure.adjust_gamma(img, g)`": sk_gamma,
    "`skimage.exposure.adjust_log(img)`": sk_log,
    "`skimage.filters.threshold_otsu(img)`": sk_otsu,
    "`skimage.filters.threshold_multiotsu(img)`": sk_multiotsu,
    "`skimage.color.rgb2gray(rgb)`": sk_rgb2gray,
    "`skimage.color.rgb2hsv`, `skimage.exposure.equalize_hist` on V, `skimage.color.hsv2rgb`": sk_equalize_hsv,
    "`cmap(Normalize(vmin, vmax)(x), bytes=True)` (a rendering without a figure)": mpl_colormap,
    "`KMeans(16).fit(pixels)`, then `predict`": sklearn_kmeans,
    "`intensity_normalization.ZScoreNormalizer`": inorm_zscore,
    "`intensity_normalization.NyulNormalizer` (fit on a set, then normalize)": inorm_nyul,
    "`WhiteStripeNormalizer(width=0.05, modality=Modality.T1)`": inorm_whitestripe,
    "`KDENormalizer(modality=Modality.T1)`": inorm_kde,
    "`FCMNormalizer(tissue_type=TissueType.WM)` with a brain mask": inorm_fcm,
    "`LSQNormalizer().fit_population(images, masks)`, then `transform`": inorm_lsq,
    "`sitk.N4BiasFieldCorrectionImageFilter` (ANTs' `N4BiasFieldCorrection`), SimpleITK's example with shrinking; `sitk.Exp(GetLogBiasFieldAsImage(img))`": sitk_n4,
    "`torchio.ZNormalization()`": torchio_znorm,
    "`torchio.RescaleIntensity(out_min_max=(0, 1), percentiles=(1, 99))`": torchio_rescale,
    "`torchio.HistogramStandardization.train(paths)` then the transform": torchio_histogram_standardization,
}


def test_every_readme_row_is_in_the_table_and_back():
    there = [r[1] for r in readme_rows()]
    assert sorted(there) == sorted(TABLE), {"README only": set(there) - set(TABLE), "table only": set(TABLE) - set(there)}


@pytest.mark.parametrize("there", list(TABLE), ids=lambda s: re.sub(r"\W+", "-", s).strip("-")[:60])
def test_readme_row_equals_its_reference(there, camera, anat):
    TABLE[there](camera, anat)


def test_a_big_endian_array_gives_the_references_answer():
    """nibabel's `dataobj` of a big-endian file (anatomical.nii is one) is a byte-swapped array:
    the kernels take it in native order instead of failing in numba."""
    a = np.asarray(nib.load(vn.datasets.nibabel_files()["anatomical.nii"]).dataobj).T
    assert not a.dtype.isnative
    x = _da(a, ("z", "y", "x"), 16)
    assert float(vn.threshold(x, "otsu")) == float(filters.threshold_otsu(a.astype(a.dtype.newbyteorder("="))))
    assert float(vn.quantile(x.astype(">f4"), 0.5)) == float(np.quantile(a.astype(np.float32), 0.5))
    assert int(vn.histogram(x).sum()) == a.size

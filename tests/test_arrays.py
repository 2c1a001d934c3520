"""Numpy and dask arrays at ``volnorm.<name>`` (volnorm/arrays.py): dims by convention, results of
the input's kind, the same values as the DataArray path, laziness kept for dask, real images."""

from __future__ import annotations

import inspect
import pickle
import threading

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.arrays import as_dataarray, convention, convention_dims
from volnorm.params import Params
from volnorm.stats import Summary
from volnorm.testing import raise_if_dask_computes

RNG = np.random.default_rng(12345)
STACK = RNG.random((3, 16, 16)).astype("float32")
DIMS = ("volume", "y", "x")

#: (function, keywords): every data-first function of volnorm's namespace with its arguments.
CASES = [
    ("histogram", {}),
    ("histogram", {"dim": ("y", "x"), "bins": 8, "range": (0, 1)}),
    ("quantile", {"q": [0.25, 0.5]}),
    ("quantile", {"q": 0.5, "dim": ("y", "x")}),
    ("summarize", {}),
    ("threshold", {}),
    ("threshold", {"dim": ("y", "x")}),
    ("rescale", {}),
    ("zscore", {"dim": ("y", "x")}),
    ("mean_scale", {}),
    ("gamma", {"gamma": 0.5}),
    ("log", {}),
    ("auto_gamma", {}),
    ("equalize", {}),
    ("equalize_adaptive", {}),
    ("match_histogram", {"reference": STACK[::-1] ** 2}),
    ("binarize", {"threshold": 0.5}),
    ("binarize", {"method": "otsu", "dim": ("y", "x")}),
    ("dither", {}),
    ("nyul_fit", {}),
    ("fit_rescale", {}),
    ("fit_zscore", {}),
    ("fit_mean_scale", {}),
    ("fit_equalize", {}),
    ("apply_colormap", {"vmin": 0.0, "vmax": 1.0}),
]
#: Calls that compute nothing on dask input (no fit, or fitted parameters given).
LAZY = [
    ("gamma", {"gamma": 0.5}),
    ("log", {}),
    ("equalize_adaptive", {}),
    ("binarize", {"threshold": 0.5}),
    ("apply_colormap", {"vmin": 0.0, "vmax": 1.0}),
    ("histogram", {"bins": 8, "range": (0, 1)}),
    ("zscore", {"params": "fit_zscore"}),
    ("rescale", {"params": "fit_rescale"}),
    ("mean_scale", {"params": "fit_mean_scale"}),
    ("equalize", {"params": "fit_equalize"}),
]


def _ids(case):
    name, kw = case
    return name + ("[" + ",".join(kw) + "]" if kw else "")


def _labelled(kw):
    return {k: xr.DataArray(v, dims=DIMS) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def _fitted(kw, data):
    """Replace ``"fit_x"`` values by the parameters fitted on ``data``."""
    return {k: getattr(vn, v)(data) if isinstance(v, str) and v.startswith(("fit_", "nyul_fit")) else v for k, v in kw.items()}


def _assert_same(got, expected):
    """``got`` (from a bare array) holds the values of ``expected`` (the DataArray path)."""
    if isinstance(expected, xr.DataArray):
        np.testing.assert_allclose(np.asarray(got), expected.values, rtol=1e-6, equal_nan=True)
        assert np.asarray(got).dtype == expected.dtype
    elif isinstance(expected, Params):
        assert got == expected
    else:
        xr.testing.assert_allclose(got, expected)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_numpy_in_numpy_out_equal_to_the_dataarray_path(case):
    name, kw = case
    func = getattr(vn, name)
    expected = func(xr.DataArray(STACK, dims=DIMS), **_labelled(kw))
    got = func(STACK, **kw)
    if isinstance(expected, xr.DataArray):
        if expected.ndim == 0:
            assert isinstance(got, np.generic)
        else:
            assert type(got) is np.ndarray and got.shape == expected.shape
    else:
        assert type(got) is type(expected)
    _assert_same(got, expected)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dask_in_dask_out_with_the_same_values(case):
    name, kw = case
    func = getattr(vn, name)
    expected = func(xr.DataArray(STACK, dims=DIMS), **_labelled(kw))
    kw = {k: da.from_array(v, chunks=(1, 8, 16)) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    got = func(da.from_array(STACK, chunks=(1, 8, 16)), **kw)
    if isinstance(expected, xr.DataArray) and expected.ndim == STACK.ndim:   # a transform
        assert isinstance(got, da.Array)
    _assert_same(got.compute() if isinstance(got, da.Array) else got, expected)


@pytest.mark.parametrize("case", LAZY, ids=_ids)
def test_dask_in_is_lazy(case):
    name, kw = case
    kw = _fitted(kw, STACK)
    data = da.from_array(STACK, chunks=(1, 8, 16))
    with raise_if_dask_computes():
        got = getattr(vn, name)(data, **kw)
    assert isinstance(got, da.Array)
    expected = getattr(vn, name)(xr.DataArray(STACK, dims=DIMS), **kw)
    _assert_same(got.compute(), expected)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_dim_n_dataarray_works_and_gets_its_dims_back(case):
    name, kw = case
    func = getattr(vn, name)
    expected = func(xr.DataArray(STACK, dims=DIMS), **_labelled(kw))
    got = func(xr.DataArray(STACK), **kw)
    back = {"volume": "dim_0", "y": "dim_1", "x": "dim_2"}
    if isinstance(expected, xr.DataArray):
        assert isinstance(got, xr.DataArray)
        assert got.dims == tuple(back.get(d, d) for d in expected.dims)
        np.testing.assert_allclose(got.values, expected.values, rtol=1e-6, equal_nan=True)
    else:
        _assert_same(got, expected)


def test_dim_n_names_and_axis_numbers_in_dim():
    per_image = vn.quantile(STACK, 0.5, dim=("y", "x"))
    np.testing.assert_array_equal(vn.quantile(STACK, 0.5, dim=(1, 2)), per_image)
    np.testing.assert_array_equal(vn.quantile(STACK, 0.5, dim=[-2, -1]), per_image)
    got = vn.quantile(xr.DataArray(STACK), 0.5, dim=("dim_1", "dim_2"))
    assert got.dims == ("dim_0",)
    np.testing.assert_array_equal(got.values, per_image)
    np.testing.assert_allclose(vn.threshold(STACK, dim=0), vn.threshold(xr.DataArray(STACK, dims=DIMS), dim="volume").values)
    with pytest.raises(ValueError, match="out of range"):
        vn.quantile(STACK, 0.5, dim=3)


def test_three_d_as_one_volume_inside_convention():
    with convention(three_d=("z", "y", "x")):
        assert convention_dims(3) == ("z", "y", "x")
        per_slice = vn.zscore(STACK, dim=("y", "x"))
        assert vn.threshold(STACK, dim=("y", "x")).shape == (3,)        # one per z
    assert convention_dims(3) == ("volume", "y", "x")   # restored
    expected = vn.zscore(xr.DataArray(STACK, dims=("z", "y", "x")), dim=("y", "x")).values
    np.testing.assert_allclose(per_slice, expected)
    with pytest.raises(ValueError, match="three_d"):
        with convention(three_d=("t", "y", "x")):
            pass


def test_convention_is_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(three_d):
        with convention(three_d=three_d):
            barrier.wait()
            seen[three_d] = convention_dims(3)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (("volume", "y", "x"), ("z", "y", "x"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {d: d for d in seen} and len(seen) == 2


def test_masks_line_up_with_trailing_dims():
    mask2d = np.zeros((16, 16), bool)
    mask2d[4:12, 4:12] = True
    x = xr.DataArray(STACK, dims=DIMS)
    expected = vn.quantile(x, 0.5, mask=xr.DataArray(mask2d, dims=("y", "x"))).item()
    assert vn.quantile(STACK, 0.5, mask=mask2d) == expected
    assert vn.quantile(STACK, 0.5, mask=mask2d[None]) == expected            # a size-1 axis broadcasts
    assert vn.quantile(x, 0.5, mask=mask2d) == expected                      # a bare mask for a DataArray too
    mask3d = np.broadcast_to(mask2d, STACK.shape)
    np.testing.assert_allclose(vn.zscore(STACK, mask=da.from_array(mask3d)), vn.zscore(STACK, mask=mask3d))
    with pytest.raises(ValueError, match="does not broadcast"):
        vn.quantile(STACK[0], 0.5, mask=mask3d)


def test_colour_axis_only_when_the_caller_says_so():
    rgba = vn.apply_colormap(STACK[0], "viridis", vmin=0.0, vmax=1.0)
    assert rgba.shape == (16, 16, 4) and rgba.dtype == np.uint8
    back = vn.invert_colormap(rgba, "viridis")                          # colour by definition
    assert back.shape == (16, 16)
    np.testing.assert_allclose(back, STACK[0], atol=1 / 255 + 1e-3)
    assert as_dataarray(rgba).dims == ("volume", "y", "x")               # by default a 3-D stack
    with convention(rgb=True):
        assert as_dataarray(rgba).dims == ("y", "x", "channel")
        with pytest.raises(ValueError, match="3 \\(RGB\\) or 4"):
            as_dataarray(STACK)


def test_wrappers_keep_name_doc_signature_and_pickle():
    for name in vn._ARRAY_FUNCTIONS:
        func = getattr(vn, name)
        assert func.__module__ == "volnorm" and func.__name__ == name and func.__qualname__ == name
        assert func.__doc__ == func.__wrapped__.__doc__
        assert inspect.signature(func) == inspect.signature(func.__wrapped__)
        assert pickle.loads(pickle.dumps(func)) is func
    assert vn.transforms.zscore is vn.zscore.__wrapped__
    assert pickle.loads(pickle.dumps(vn.transforms.zscore)) is vn.transforms.zscore
    with pytest.raises(TypeError):
        vn.transforms.zscore(STACK)      # the submodule's function stays strict


def test_dataarrays_with_their_own_dims_are_untouched():
    x = xr.DataArray(STACK, dims=("a", "b", "c"), attrs={"k": 1})
    xr.testing.assert_identical(vn.zscore(x, dim=("b", "c")), vn.transforms.zscore(x, dim=("b", "c")))
    with pytest.raises(ValueError, match="convention"):
        vn.zscore(np.zeros((2,) * 6))


def test_normative_score_takes_the_histograms_voxel_dims():
    cohort = RNG.random((5, 4, 6))                      # (volume, y, x)
    h = vn.histogram(xr.DataArray(cohort, dims=DIMS), dim="volume", bins=10, range=(0, 1))
    scan = RNG.random((4, 6))
    got = vn.normative_score(scan, h)
    expected = vn.normative_score(xr.DataArray(scan, dims=("y", "x")), h)
    xr.testing.assert_allclose(got, expected.compute())


# -- real images: scikit-image's and nibabel's samples, and equality with scikit-image -------------

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def camera():
    return skimage_data.camera()


@pytest.fixture(scope="module")
def images(camera):
    return np.stack([camera, skimage_data.moon(), camera.T])      # (volume, y, x): 3 × 512 × 512 uint8


@pytest.fixture(scope="module")
def example4d():
    nib = pytest.importorskip("nibabel")
    from nibabel.testing import data_path

    # nibabel's (i, j, k, t) reversed into C order: (t, z, y, x) = (volume, z, y, x) by convention
    return nib.load(f"{data_path}/example4d.nii.gz").get_fdata().T


def test_camera_like_scikit_image(camera):
    exposure = pytest.importorskip("skimage.exposure")
    filters = pytest.importorskip("skimage.filters")
    np.testing.assert_allclose(vn.equalize(camera), exposure.equalize_hist(camera), atol=1e-6)
    floats = camera / 255.0
    np.testing.assert_allclose(vn.equalize(floats), exposure.equalize_hist(floats), atol=1e-6)
    np.testing.assert_allclose(vn.rescale(camera), exposure.rescale_intensity(camera, out_range=(0.0, 1.0)), atol=1e-6)
    assert vn.threshold(camera, "otsu") == filters.threshold_otsu(camera)
    counts, centres = exposure.histogram(camera)
    hist = vn.histogram(camera)
    np.testing.assert_array_equal(hist[int(camera.min()):int(camera.max()) + 1], counts)
    assert vn.apply_colormap(camera).shape == camera.shape + (4,)


def test_a_stack_of_images(images):
    per_image = vn.equalize(images, dim=("y", "x"))
    for img, eq in zip(images, per_image, strict=True):
        np.testing.assert_allclose(eq, vn.equalize(img), atol=1e-6)
    thresholds = vn.threshold(images, dim=("y", "x"))
    assert thresholds.shape == (3,) and thresholds[0] == vn.threshold(images[0])
    assert vn.histogram(images, dim=(1, 2)).shape == (3, 256)
    assert vn.rescale(images).max() == 1.0
    assert vn.apply_colormap(images).shape == images.shape + (4,)
    lazy = vn.equalize(da.from_array(images, chunks=(1, 512, 512)), dim=("y", "x"))
    assert isinstance(lazy, da.Array)
    np.testing.assert_allclose(lazy.compute(), per_image)


def test_nibabel_4d(example4d):
    assert example4d.shape == (2, 24, 96, 128)
    per_volume = vn.threshold(example4d, dim=("z", "y", "x"))
    assert per_volume.shape == (2,)
    x = xr.DataArray(example4d, dims=("volume", "z", "y", "x"))
    np.testing.assert_array_equal(per_volume, vn.threshold(x, dim=("z", "y", "x")).values)
    np.testing.assert_allclose(vn.equalize(example4d), vn.equalize(x).values)
    np.testing.assert_array_equal(vn.histogram(example4d, bins=64), vn.histogram(x, bins=64).values)
    np.testing.assert_allclose(vn.rescale(example4d, percentiles=(1, 99)), vn.rescale(x, percentiles=(1, 99)).values)
    assert vn.apply_colormap(example4d[0]).shape == (24, 96, 128, 4)   # 3-D: read as a stack, same pixels

"""The fast paths give the results of the plain ones, bit for bit.

- :func:`volnorm.transforms.common.pointwise`: a transform of 1- and 2-byte integer data
  applied through a look-up table equals the same formula evaluated on the data (the table
  path is switched off by setting ``MAX_TABLE_BYTES`` to 0);
- :func:`volnorm.stats.ranges`: the min and max of :func:`volnorm.summarize`.
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import volnorm as vn
from volnorm.transforms import common

INT_DTYPES = ["uint8", "int8", "uint16", "int16"]

CALLS = {
    "rescale": lambda x: vn.rescale(x, dim=("y", "x")),
    "rescale_uint8": lambda x: vn.rescale(x, dim=("y", "x"), out_range="uint8"),
    "rescale_percentiles": lambda x: vn.rescale(x, percentiles=(2, 98), out_range=(-1, 1)),
    "zscore": lambda x: vn.zscore(x, dim=("y", "x")),
    "mean_scale": lambda x: vn.mean_scale(abs(x.astype("int32")).astype(x.dtype) + 1, 100.0),
    "gamma": lambda x: vn.gamma(_nonneg(x), 0.6),
    "gamma_gain": lambda x: vn.gamma(_nonneg(x), 1.7, gain=0.9),
    "gamma_out_range": lambda x: vn.gamma(_nonneg(x), 0.5, out_range="uint16"),
    "gamma_data": lambda x: vn.gamma(_nonneg(x), 0.5, scale="data", dim=("y", "x")),
    "log": lambda x: vn.log(_nonneg(x)),
    "log_inv": lambda x: vn.log(_nonneg(x), inv=True, gain=1.3),
    "log_out_range": lambda x: vn.log(_nonneg(x), out_range=(0, 1)),
    "log_data": lambda x: vn.log(_nonneg(x), scale="data"),
    "auto_gamma": lambda x: vn.auto_gamma(_nonneg(x)),
    "auto_gamma_out_range": lambda x: vn.auto_gamma(_nonneg(x), out_range="uint8"),
}


def _nonneg(x: xr.DataArray) -> xr.DataArray:
    return x if x.dtype.kind == "u" else abs(x.astype("int32")).clip(0, np.iinfo(x.dtype).max).astype(x.dtype)


def _stack(dtype: str) -> xr.DataArray:
    """Three images of camera() spread over the dtype's range, large enough for the tables
    (64x64 for 1-byte data, 512x512 for 2-byte data: a quarter of the data's values)."""
    import skimage.data

    step = 8 if np.dtype(dtype).itemsize == 1 else 1
    img = skimage.data.camera()[::step, ::step].astype(np.float64) / 255
    info = np.iinfo(dtype)
    imgs = [info.min + img * (info.max - info.min), img * info.max * 0.3, info.max - img * (info.max - max(info.min, 0)) * 0.8]
    return xr.DataArray(np.stack(imgs).round().astype(dtype), dims=("volume", "y", "x"))


@pytest.mark.parametrize("dtype", INT_DTYPES)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_table_path_equals_the_formula(name, dtype, monkeypatch):
    x = _stack(dtype)
    fast = CALLS[name](x)
    fast_chunked = CALLS[name](x.chunk({"volume": 1, "y": 24}))
    monkeypatch.setattr(common, "MAX_TABLE_BYTES", 0)
    plain = CALLS[name](x)
    assert fast.dtype == plain.dtype
    np.testing.assert_array_equal(fast.values, plain.values)
    np.testing.assert_array_equal(fast_chunked.values, plain.values)
    xr.testing.assert_identical(fast.drop_attrs(), plain.drop_attrs())


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_table_path_is_taken(dtype):
    x = _stack(dtype).chunk({"volume": 1})
    y = vn.rescale(x, dim=("y", "x"), out_range="uint8")
    names = {k[0] if isinstance(k, tuple) else k for k in dict(y.data.__dask_graph__())}
    assert any(n.startswith("gather-rows") for n in names)  # the table's map
    assert not any(n.startswith(("sub-", "rint-", "clip-")) for n in names)  # not a chain of ufuncs


def test_a_negative_voxel_still_raises_through_the_table():
    x = _stack("int16")
    with pytest.raises(ValueError, match="non-negative"):
        vn.gamma(x, 0.5).compute()


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.dtype(d) for d in ("uint8", "int16", "float32", "float64")]),
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=7),
    ),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_ranges_equal_summarize(arr, masked, seed):
    rng = np.random.default_rng(seed)
    if arr.dtype.kind == "f":
        arr = arr.copy()
        arr.flat[rng.integers(0, arr.size, max(1, arr.size // 4))] = rng.choice([np.nan, np.inf, -np.inf])
    x = xr.DataArray(arr, dims=("a", "b", "c")[: arr.ndim])
    mask = xr.DataArray(rng.random(arr.shape) < 0.7, dims=x.dims) if masked else None
    for dim in (None, "b", ("a",)):
        got = vn.stats.ranges(x.chunk({"a": 2}), dim=dim, mask=mask)
        s = vn.summarize(x, dim=dim, mask=mask, quantiles=())
        np.testing.assert_array_equal(got["min"].values, s["min"].values)
        np.testing.assert_array_equal(got["max"].values, s["max"].values)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0, "radial"])
def test_desaturate_is_the_hsv_round_trip(dtype, w):
    """The exact ``V - w (V - c)``, rounded half to even; scikit-image's HSV round trip within
    its float error (1 grey level at exact halves)."""
    import skimage.data
    from skimage import color

    img8 = skimage.data.astronaut()[::4, ::4]
    img = (img8.astype(np.float64) / 255).astype(dtype) if dtype.startswith("float") else (img8.astype(np.uint32) * 257 if dtype == "uint16" else img8).astype(dtype)
    x = xr.DataArray(img, dims=("y", "x", "channel"))
    weight = vn.color.radial_weight(x, (40, 60), 10, 60) if w == "radial" else w
    wv = np.asarray(weight.values if isinstance(weight, xr.DataArray) else weight, dtype=np.float64)[..., None] * np.ones(3)
    got = vn.color.desaturate(x.chunk({"y": 50}), weight).values
    assert got.dtype == img.dtype
    f = img.astype(np.float64)
    v = f.max(-1, keepdims=True)
    exact = v - wv * (v - f)
    white = 1.0 if dtype.startswith("float") else np.iinfo(dtype).max
    want = np.clip(exact if dtype.startswith("float") else np.rint(exact), 0, white).astype(dtype)
    np.testing.assert_array_equal(got, want)
    hsv = color.rgb2hsv(f / white)
    hsv[..., 1] *= wv[..., 0]
    sk = color.hsv2rgb(hsv) * white
    # integers: the rounding (0.5) and the round trip's float error; floats: float32's cast
    tol = 1e-6 if dtype.startswith("float") else 0.5 + 1e-9 * white
    assert np.abs(got.astype(np.float64) - sk).max() <= tol


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32", "grey_uint8", "grey_float64_nan", "bgr"])
def test_exposure_equals_numpy_with_images_split_across_chunks(kind):
    """One fused pass per block, blocks of an image merged (Chan): the report numpy computes in
    float64 on the whole images."""
    import skimage.data

    rgb8 = np.stack([skimage.data.astronaut()[::4, ::4], skimage.data.coffee()[:128, :128], skimage.data.chelsea()[:128, :128]])
    grey = kind.startswith("grey")
    if kind == "uint16":
        arr = rgb8.astype(np.uint16) * 257
    elif kind == "float32":
        arr = (rgb8 / 255).astype(np.float32)
    elif grey:
        arr = rgb8[..., 1] if kind == "grey_uint8" else rgb8[..., 1] / 255.0
        if kind == "grey_float64_nan":
            arr = arr.copy()
            arr[0, :5, :7] = np.nan
    else:
        arr = rgb8
    dims = ("volume", "y", "x") if grey else ("volume", "y", "x", "channel")
    x = xr.DataArray(arr, dims=dims)
    if kind == "bgr":
        x = xr.DataArray(np.ascontiguousarray(arr[..., ::-1]), dims=dims, coords={"channel": ["B", "G", "R"]})
    got = vn.color.exposure(x.chunk({"volume": 2, "y": 50}))
    white = 255.0 if kind in ("uint8", "grey_uint8", "bgr") else 65535.0 if kind == "uint16" else 1.0
    f = arr.astype(np.float64) / white
    if grey:
        luma = perceived = f
    else:
        luma = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        perceived = np.sqrt(0.241 * f[..., 0] ** 2 + 0.691 * f[..., 1] ** 2 + 0.068 * f[..., 2] ** 2)
    ax = (1, 2)
    np.testing.assert_allclose(got["mean"].values, np.nanmean(luma, ax), rtol=1e-6)
    np.testing.assert_allclose(got["rms_contrast"].values, np.nanstd(luma, ax), rtol=1e-5)
    np.testing.assert_allclose(got["brightness"].values, np.nanmean(perceived, ax), rtol=1e-6)
    # a float32 luma at the edge of 0.1/0.9 may fall on the other side of float64's
    np.testing.assert_allclose(got["underexposed"].values, (luma < 0.1).mean(ax), atol=2 / luma[0].size)
    np.testing.assert_allclose(got["overexposed"].values, (luma > 0.9).mean(ax), atol=2 / luma[0].size)
    whole = vn.color.exposure(x)
    for v in got.data_vars:
        np.testing.assert_allclose(got[v].values, whole[v].values, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(st.sampled_from([np.dtype(d) for d in ("uint8", "int8", "uint16", "int16", "bool")]),
               hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=9)),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_integer_moments_from_the_histogram_equal_the_moments_pass(arr, masked, seed):
    """8/16-bit integers with quantiles: the moments come from the quantiles' histogram (exact
    sums), not the moments kernel; they agree with it and with numpy."""
    rng = np.random.default_rng(seed)
    x = xr.DataArray(arr, dims=("a", "b", "c")[: arr.ndim])
    mask = xr.DataArray(rng.random(arr.shape) < 0.7, dims=x.dims) if masked else None
    for dim in (None, "b", ("a",)):
        kernel = vn.summarize(x, dim=dim, mask=mask, quantiles=())
        try:
            hist = vn.summarize(x.chunk({"a": 2}), dim=dim, mask=mask, quantiles=[0.5])
        except ValueError as e:  # a row with no voxel inside the mask: quantiles refuse it
            assert "no valid" in str(e).lower() or "no voxel" in str(e).lower()
            assert np.any(kernel["count"].values == 0)
            continue
        for v in ("count", "min", "max", "n_nan", "n_posinf", "n_neginf", "n_masked_out"):
            np.testing.assert_array_equal(hist[v].values, kernel[v].values, err_msg=v)
        np.testing.assert_allclose(hist["mean"].values, kernel["mean"].values, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(hist["var"].values, kernel["var"].values, rtol=1e-9, atol=1e-9)
        f = np.where(mask.values, arr.astype(np.float64), np.nan) if masked else arr.astype(np.float64)
        axes = None if dim is None else tuple(x.dims.index(d) for d in ((dim,) if isinstance(dim, str) else dim))
        np.testing.assert_allclose(hist["mean"].values, np.nanmean(f, axis=axes), rtol=1e-12)


def test_the_write_pass_reads_each_input_once_with_its_statistics(tmp_path, monkeypatch):
    """The store and the statistics taken with it share their blocks on a distributed scheduler
    (``da.store``'s own optimized graph made them read and transform every volume twice)."""
    import collections
    import os

    from distributed import Client, LocalCluster

    from volnorm.io import nifti

    files = vn.datasets.make_cohort(tmp_path / "in", 3, shape=(64, 64, 64))  # int16: rescale through its table
    reads: collections.Counter = collections.Counter()
    original = nifti.NiftiArray.__getitem__

    def counted(self, key):
        reads[os.path.basename(self.path)] += 1
        return original(self, key)

    monkeypatch.setattr(nifti.NiftiArray, "__getitem__", counted)
    spec = {"version": 1, "input": {"nifti": str(tmp_path / "in" / "*.nii")},
            "steps": [{"rescale": {"percentiles": [1, 99], "out_range": "uint16"}}],
            "output": {"store": str(tmp_path / "out.zarr")},
            "outputs": {"images": True, "statistics": {"path": str(tmp_path / "out.csv")}}}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        vn.pipeline.run(spec, client=client, echo=lambda s: None)
    assert sorted(reads) == sorted(f.name for f in files)
    assert set(reads.values()) == {2}  # the fit's pass and the write's (with its statistics), no more
    got = vn.open_zarr(tmp_path / "out.zarr")
    assert got.sizes["volume"] == 3 and (tmp_path / "out.csv").read_text().count("\n") >= 4


@pytest.mark.parametrize("method", ["rec601", "rec709", "perceived", (0.2, 0.5, 0.3)])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64"])
def test_to_grey_kernels_equal_numpy_bit_for_bit(method, dtype):
    """Each specialized kernel (stride 3 or 4, root or not, float or integer out) gives numpy's
    float arithmetic, bit for bit, in memory (shared among threads) and chunked."""
    import skimage.data

    rgba = np.concatenate([skimage.data.astronaut()[::3, ::3], np.full((171, 171, 1), 200, np.uint8)], axis=-1)
    ft = np.float64 if dtype == "float64" else np.float32
    w = [ft(v) for v in (vn.color.grey.PERCEIVED if method == "perceived" else vn.color.grey.LUMA.get(method, method))]
    for img in (rgba[..., :3], rgba):  # alpha ignored
        img = (img / 255).astype(dtype) if dtype.startswith("float") else img.astype(dtype)
        f = img.astype(ft)
        if method == "perceived":
            want = np.sqrt(w[0] * (f[..., 0] * f[..., 0]) + w[1] * (f[..., 1] * f[..., 1]) + w[2] * (f[..., 2] * f[..., 2]))
        else:
            want = w[0] * f[..., 0] + w[1] * f[..., 1] + w[2] * f[..., 2]
        x = xr.DataArray(np.tile(img, (8, 1, 1)), dims=("y", "x", "channel"))  # 1.8-2.3 MB: shared among threads
        for got in (vn.color.to_grey(x, method=method).values, vn.color.to_grey(x.chunk({"y": 50}), method=method).values):
            assert got.dtype == ft
            np.testing.assert_array_equal(got, np.tile(want, (8, 1)))
        if dtype == "uint8":
            got = vn.color.to_grey(x, method=method, dtype="uint8").values
            np.testing.assert_array_equal(got, np.clip(np.rint(np.tile(want, (8, 1))), 0, 255).astype(np.uint8))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 12), st.integers(1, 300), st.integers(0, 2**32 - 1), st.booleans())
def test_otsu_rows_equal_scikit_image_row_by_row(rows, nbins, seed, sparse):
    from volnorm.transforms import thresholds

    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 10 ** int(rng.integers(1, 9)), (rows, nbins))  # past 2**24: float32 sums round
    if sparse:  # empty ends, single values, ties
        counts[rng.random((rows, nbins)) < 0.8] = 0
        counts[0] = 0
        counts[0, rng.integers(nbins)] = 7
    counts[counts.sum(axis=1) == 0, 0] = 1
    centers = np.sort(rng.choice(np.arange(-1000, 1000), nbins, replace=False)).astype(np.float64) / 4
    want = np.array([thresholds._one("otsu", c, centers, 3)[0] for c in counts])
    np.testing.assert_array_equal(thresholds._otsu_rows(counts, centers), want)


def test_the_plan_counts_a_whole_nii_gz_volume_in_the_memory_estimate(tmp_path):
    """A .nii.gz is decompressed whole by one task: the estimate holds the volume and its chunks."""
    plain = vn.datasets.make_cohort(tmp_path / "nii", 2, shape=(64, 64, 48))
    gz = vn.datasets.make_cohort(tmp_path / "gz", 2, shape=(64, 64, 48), compressed=True)
    assert plain[0].suffix == ".nii" and gz[0].name.endswith(".nii.gz")

    def spec(d):
        return {"version": 1, "input": {"nifti": str(d / "*")}, "steps": [{"zscore": {}}],
                "output": {"store": str(tmp_path / f"{d.name}.zarr")}}

    p_nii, p_gz = vn.pipeline.plan(spec(tmp_path / "nii")), vn.pipeline.plan(spec(tmp_path / "gz"))
    volume = 64 * 64 * 48 * 2
    assert p_gz["memory"] - p_nii["memory"] == pytest.approx(2 * volume)
    assert "read whole" in vn.pipeline.describe(p_gz) and "read whole" not in vn.pipeline.describe(p_nii)


@pytest.mark.parametrize("method", ["rec601", "perceived"])
def test_to_grey_to_uint8_is_the_float_result_rounded_and_near_opencv(method):
    import skimage.data

    img = np.ascontiguousarray(skimage.data.astronaut()[::2, ::2])
    x = xr.DataArray(img, dims=("y", "x", "channel"))
    as_float = vn.color.to_grey(x, method=method).values
    want = np.clip(np.rint(as_float), 0, 255).astype(np.uint8)
    fast = vn.color.to_grey(x.chunk({"y": 70}), method=method, dtype="uint8").values  # the one-pass kernel
    plain = vn.color.to_grey(x.astype(np.uint16), method=method, dtype="uint8").values  # float, then rounded
    assert fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, want)
    np.testing.assert_array_equal(plain, want)
    if method == "rec601":
        cv2 = pytest.importorskip("cv2")
        ref = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)  # fixed-point rounding
        diff = np.abs(fast.astype(int) - ref)
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    with pytest.raises(ValueError, match="integer dtype"):
        vn.color.to_grey(x, dtype="float32")

"""Bad input to the statistics: a clear error (its type and a message naming the problem)
or a documented, sensible result, for histogram, quantile, summarize and threshold."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xarray as xr
from skimage import filters

import volnorm as vn

HIST_METHODS = ["otsu", "multiotsu", "li", "yen", "triangle", "isodata", "minimum"]
EXTRA = ("nan", "posinf", "neginf", "below", "above", "masked_out")


@pytest.fixture
def x() -> xr.DataArray:
    """A small float32 stack with distinct values."""
    return xr.DataArray(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) * 1.5, dims=("volume", "y", "x"))


@pytest.fixture
def xi(x) -> xr.DataArray:
    return x.astype(np.int16)


#: every statistic, called the way a user would; ``f(data, **kwargs)``
STATS = {
    "histogram": lambda d, **kw: vn.histogram(d, **kw).compute(),
    "quantile": lambda d, **kw: vn.quantile(d, [0.1, 0.5], **kw),
    "summarize": lambda d, **kw: vn.summarize(d, quantiles=(0.5,), **kw),
    "threshold": lambda d, **kw: vn.threshold(d, "otsu", **kw),
    "threshold_mean": lambda d, **kw: vn.threshold(d, "mean", **kw),
}
ALL_STATS = pytest.mark.parametrize("stat", list(STATS))
#: the library's own functions (``vn.<name>`` wraps them to take numpy arrays too)
STRICT = {
    "histogram": lambda d, **kw: inspect.unwrap(vn.histogram)(d, **kw).compute(),
    "quantile": lambda d, **kw: inspect.unwrap(vn.quantile)(d, [0.1, 0.5], **kw),
    "summarize": lambda d, **kw: inspect.unwrap(vn.summarize)(d, quantiles=(0.5,), **kw),
    "threshold": lambda d, **kw: inspect.unwrap(vn.threshold)(d, "otsu", **kw),
    "threshold_mean": lambda d, **kw: inspect.unwrap(vn.threshold)(d, "mean", **kw),
}


# ---------------------------------------------------------------------------
# bins and range
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bins", [0, -3, np.int64(0), True, False, 2.5, "10"], ids=repr)
@pytest.mark.parametrize("kind", ["float", "int"])
def test_bad_bins(x, xi, bins, kind):
    data = x if kind == "float" else xi
    with pytest.raises(ValueError, match=r"`bins` must be a positive int; got " + repr(bins).replace("(", r"\(").replace(")", r"\)")):
        vn.histogram(data, bins=bins)
    with pytest.raises(ValueError, match=r"`bins` must be a positive int"):
        vn.threshold(data, "otsu", bins=bins)


@pytest.mark.parametrize("rng", [(3, 3), (5.0, 1.0), (2, 1)], ids=repr)
@pytest.mark.parametrize("kind", ["float", "int"])
def test_range_lo_not_below_hi(x, xi, rng, kind):
    with pytest.raises(ValueError, match=r"`range` must be finite \(lo, hi\) with lo < hi; got \(" + str(rng[0])):
        vn.histogram(x if kind == "float" else xi, range=rng)


@pytest.mark.parametrize("rng", [(np.nan, 1.0), (0.0, np.nan), (0.0, np.inf), (-np.inf, 0.0), (-np.inf, np.inf)], ids=repr)
def test_range_not_finite(x, rng):
    with pytest.raises(ValueError, match=r"`range` must be finite \(lo, hi\)"):
        vn.histogram(x, range=rng)


@pytest.mark.parametrize("rng", [(1,), (1, 2, 3), "ab", 5], ids=repr)
def test_range_not_a_pair(x, rng):
    with pytest.raises(ValueError, match=r"`range` must be \(lo, hi\)"):
        vn.histogram(x, range=rng)


def test_integer_range_without_an_integer(xi):
    with pytest.raises(ValueError, match="holds no integer value"):
        vn.histogram(xi.astype(np.int32), range=(0.2, 0.8))


# ---------------------------------------------------------------------------
# no valid voxel: all NaN, empty mask
# ---------------------------------------------------------------------------


@pytest.fixture
def all_nan() -> xr.DataArray:
    return xr.DataArray(np.full((2, 3, 4), np.nan, np.float32), dims=("volume", "y", "x"))


def test_all_nan_histogram(all_nan):
    with pytest.raises(ValueError, match=r"no finite value \(all NaN or ±Inf\): there is no range to histogram"):
        vn.histogram(all_nan)
    with pytest.raises(ValueError, match="no finite value"):
        vn.histogram(all_nan.where(False, np.inf))  # ±Inf only: no range either
    # with an explicit range there is nothing to find: empty bins, every voxel counted as NaN
    h = vn.histogram(all_nan, bins=4, range=(0, 1)).compute()
    assert h.values.tolist() == [0, 0, 0, 0] and int(h["n_nan"]) == all_nan.size
    np.testing.assert_array_equal(h.values, np.histogram(all_nan.values, bins=4, range=(0, 1))[0])


@pytest.mark.parametrize("dim", [None, ("y", "x")])
def test_all_nan_quantile(all_nan, dim):
    with pytest.raises(ValueError, match="no finite value|no valid voxel"):
        vn.quantile(all_nan, 0.5, dim=dim)


def test_all_nan_summarize(all_nan):
    with pytest.raises(ValueError, match=r"no valid voxel \(all NaN/±Inf or masked out\)"):
        vn.summarize(all_nan, quantiles=(0.5,))
    # without quantiles: a summary of nothing (count 0, NaN statistics, the NaN voxels counted)
    s = vn.summarize(all_nan, quantiles=())
    assert int(s["count"]) == 0 and int(s["n_nan"]) == all_nan.size
    assert all(np.isnan(float(s[v])) for v in ("min", "max", "mean", "var", "std"))


@pytest.mark.parametrize("method", [*HIST_METHODS, "percentile", "robust_range"])
def test_all_nan_threshold(all_nan, method):
    with pytest.raises(ValueError, match="no finite value|no valid voxel"):
        vn.threshold(all_nan, method)


def test_one_all_nan_volume_per_volume(x):
    v = x.values.copy()
    v[1] = np.nan
    data = x.copy(data=v)
    with pytest.raises(ValueError, match=r"no valid voxel to take a quantile of .*for some index"):
        vn.quantile(data, 0.5, dim=("y", "x"))
    with pytest.raises(ValueError, match=r"no valid voxel to threshold .*for some index"):
        vn.threshold(data, "otsu", dim=("y", "x"))
    with pytest.raises(ValueError, match=r"no valid voxel .*for some index"):
        vn.summarize(data, dim=("y", "x"), quantiles=(0.5,))
    s = vn.summarize(data, dim=("y", "x"), quantiles=())
    assert s["count"].values.tolist() == [12, 0] and np.isnan(s["mean"].values[1])
    h = vn.histogram(data, dim=("y", "x")).compute()
    assert h.sum("bin").values.tolist() == [12, 0] and h["n_nan"].values.tolist() == [0, 12]


@pytest.fixture
def empty_mask() -> xr.DataArray:
    return xr.DataArray(np.zeros((3, 4), bool), dims=("y", "x"))


@pytest.mark.parametrize("dtype", ["float32", "int16", "int32"])
def test_empty_mask_histogram_needing_a_range(x, empty_mask, dtype):
    with pytest.raises(ValueError, match="inside the mask: there is no range to histogram"):
        vn.histogram(x.astype(dtype), mask=empty_mask)


@pytest.mark.parametrize("kw", [{"dtype": "uint8"}, {"dtype": "float32", "bins": 3, "range": (0, 1)}], ids=["uint8", "float-range"])
def test_empty_mask_histogram_without_a_range_pass(x, empty_mask, kw):
    """8-bit data (or an explicit range) need no range: all bins empty, every voxel masked out."""
    kw = dict(kw)
    h = vn.histogram(x.astype(kw.pop("dtype")), mask=empty_mask, **kw).compute()
    assert int(h.sum()) == 0 and int(h["n_masked_out"]) == x.size
    assert all(int(h[f"n_{k}"]) == 0 for k in EXTRA if k != "masked_out")


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8"])
def test_empty_mask_quantile_summarize_threshold(x, empty_mask, dtype):
    data = x.astype(dtype)
    with pytest.raises(ValueError, match="no valid voxel|inside the mask"):
        vn.quantile(data, 0.5, mask=empty_mask)
    with pytest.raises(ValueError, match="no valid voxel|inside the mask"):
        vn.summarize(data, mask=empty_mask, quantiles=(0.5,))
    with pytest.raises(ValueError, match="no valid voxel|inside the mask"):
        vn.threshold(data, "otsu", mask=empty_mask)
    s = vn.summarize(data, mask=empty_mask, quantiles=())
    assert int(s["count"]) == 0 and int(s["n_masked_out"]) == x.size and np.isnan(float(s["mean"]))


@pytest.mark.parametrize("case", ["all-nan", "empty-mask"])
def test_mean_threshold_of_nothing_raises_like_the_others(all_nan, x, empty_mask, case):
    data, mask = (all_nan, None) if case == "all-nan" else (x, empty_mask)
    with pytest.raises(ValueError, match="no valid voxel|no finite value"):
        vn.threshold(data, "mean", mask=mask)


# ---------------------------------------------------------------------------
# masks: shape, grid, dtype, type
# ---------------------------------------------------------------------------


@ALL_STATS
def test_mask_of_the_wrong_shape(x, stat):
    mask = xr.DataArray(np.ones((3, 5), bool), dims=("y", "x"))
    with pytest.raises(ValueError, match=r"`mask` has 5 along 'x' but the data have 4 \(mask shape \{'y': 3, 'x': 5\}"):
        STATS[stat](x, mask=mask)


@ALL_STATS
def test_mask_with_a_dim_the_data_lack(x, stat):
    mask = xr.DataArray(np.ones((3, 4), bool), dims=("y", "q"))
    with pytest.raises(ValueError, match=r"`mask` has dims \['q'\] that the data do not have"):
        STATS[stat](x, mask=mask)


@ALL_STATS
def test_mask_on_another_grid(stat):
    """Same shape, but the mask's affine (another voxel grid) differs from the data's."""
    stack = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    v = stack.values[0]
    affine = np.asarray(stack.attrs["affine"])
    mask = xr.DataArray(v > v.mean(), dims=("z", "y", "x"), attrs={"affine": affine.tolist()})
    STATS[stat](stack, mask=mask)  # the same grid: fine
    shifted = affine.copy()
    shifted[:3, 3] += 2.0
    moved = mask.assign_attrs(affine=shifted.tolist())
    with pytest.raises(ValueError, match=r"`mask` is on another grid than the data \(its affine differs"):
        STATS[stat](stack, mask=moved)


@ALL_STATS
@pytest.mark.parametrize("dtype", ["int64", "uint8", "float64"])
def test_non_boolean_mask(x, stat, dtype):
    mask = xr.DataArray(np.ones((3, 4), dtype), dims=("y", "x"))
    with pytest.raises(TypeError, match=rf"`mask` must be boolean; got dtype {dtype} \(use `mask != 0`\)"):
        STATS[stat](x, mask=mask)


@ALL_STATS
def test_mask_not_a_dataarray(x, stat):
    """The library's functions take DataArrays; `vn.<name>` also takes numpy (tests/test_arrays.py)."""
    with pytest.raises(TypeError, match="`mask` must be an xarray.DataArray; got ndarray"):
        STRICT[stat](x, mask=np.ones((2, 3, 4), bool))


# ---------------------------------------------------------------------------
# a constant image
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bins", [None, 4, 1])
def test_constant_float_image_histogram_follows_numpy(dtype, bins):
    v = np.full((2, 3, 5), 7.25, dtype)
    h = vn.histogram(xr.DataArray(v, dims=("volume", "y", "x")), bins=bins).compute()
    ref, edges = np.histogram(v, bins=256 if bins is None else bins)
    assert edges[0] == 6.75 and edges[-1] == 7.75  # numpy's rule: [v - 0.5, v + 0.5]
    np.testing.assert_array_equal(h.values, ref)
    np.testing.assert_array_equal(h["bin_lower"].values, edges[:-1].astype(np.float64))
    np.testing.assert_array_equal(h["bin_upper"].values, edges[1:].astype(np.float64))


def test_constant_integer_image_histogram_has_one_bin():
    h = vn.histogram(xr.DataArray(np.full((2, 3, 5), 7, np.int16), dims=("volume", "y", "x"))).compute()
    assert h["bin"].values.tolist() == [7.0] and h.values.tolist() == [30]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint8"])
def test_constant_image_quantile_and_summarize(dtype):
    c = xr.DataArray(np.full((2, 3, 5), 7.25 if dtype.startswith("float") else 7, dtype), dims=("volume", "y", "x"))
    value = float(c.values.flat[0])
    q = vn.quantile(c, [0.0, 0.02, 0.5, 1.0])
    assert q.values.tolist() == [value] * 4
    per = vn.quantile(c.chunk({"volume": 1}), 0.5, dim=("y", "x"))
    assert per.values.tolist() == [value, value]
    s = vn.summarize(c, quantiles=(0.5,))
    assert float(s["std"]) == 0.0 and float(s["var"]) == 0.0
    assert float(s["min"]) == float(s["max"]) == float(s["mean"]) == float(s["q0.5"]) == value
    assert int(s["count"]) == c.size


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_constant_image_otsu_agrees_with_skimage(dtype):
    v = np.full((2, 3, 5), 7.25 if dtype == "float32" else 7, dtype)
    ref = filters.threshold_otsu(v)
    assert float(ref) == float(v.flat[0])
    assert float(vn.threshold(xr.DataArray(v, dims=("volume", "y", "x")), "otsu")) == float(ref)


@pytest.mark.parametrize("method", ["li", "yen", "isodata", "triangle", "mean"])
def test_constant_integer_image_other_thresholds_agree_with_skimage(method):
    v = np.full((2, 3, 5), 7, np.int16)
    ref = getattr(filters, f"threshold_{method}")(v)
    assert float(vn.threshold(xr.DataArray(v, dims=("volume", "y", "x")), method)) == float(ref) == 7.0


@pytest.mark.parametrize("method", ["multiotsu", "minimum"])
def test_constant_image_thresholds_that_cannot_split_say_so(method):
    """As scikit-image: multiotsu and minimum have no answer for one value, and say why."""
    c = xr.DataArray(np.full((2, 3, 5), 7, np.int16), dims=("volume", "y", "x"))
    exc, match = (ValueError, "only 1 different values") if method == "multiotsu" else (RuntimeError, "Unable to find two maxima")
    with pytest.raises(exc, match=match):
        vn.threshold(c, method)
    with pytest.raises(exc, match=match):
        getattr(filters, f"threshold_{method}")(c.values)


# ---------------------------------------------------------------------------
# q, dim, collections
# ---------------------------------------------------------------------------

BAD_Q = [-0.1, 1.1, 50, np.nan, np.inf, [], [0.5, np.nan], [0.2, 1.5], [[0.5]], None]


@pytest.mark.parametrize("q", BAD_Q, ids=repr)
def test_bad_q(x, q):
    with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]; got .*\(Percentiles 0-100\? divide by 100\.\)"):
        vn.quantile(x, q)


@pytest.mark.parametrize("q", [-0.1, 1.1, 50, np.nan, [0.5, np.nan]], ids=repr)
def test_bad_q_in_summarize_and_percentile_threshold(x, q):
    with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]"):
        vn.summarize(x, quantiles=list(np.atleast_1d(q)))
    if np.ndim(q) == 0:
        with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]"):
            vn.threshold(x, "percentile", q=q)
        with pytest.raises(ValueError, match=r"`q` must be in \[0, 1\]"):
            vn.threshold(x, "robust_range", q=q)


@ALL_STATS
@pytest.mark.parametrize("dim", ["t", ("y", "t"), ["volume", "z"]], ids=repr)
def test_dim_naming_an_absent_dim(x, stat, dim):
    missing = "t" if "t" in dim else "z"
    with pytest.raises(ValueError, match=rf"`dim` names \['{missing}'\], which the data do not have; its dims are \('volume', 'y', 'x'\)"):
        STATS[stat](x, dim=dim)


@ALL_STATS
def test_dim_empty(x, stat):
    with pytest.raises(ValueError, match="`dim` must name at least one dim"):
        STATS[stat](x, dim=())


def _collection() -> xr.DataTree:
    return xr.DataTree.from_dict(
        {
            "a": xr.Dataset({"image": (("y", "x"), np.arange(4.0).reshape(2, 2))}),
            "b": xr.Dataset({"image": (("y", "x"), np.arange(9.0).reshape(3, 3))}),
        }
    )


@ALL_STATS
@pytest.mark.parametrize("dim", [None, ("y", "x")])
def test_datatree_without_image_variables(stat, dim):
    tree = xr.DataTree.from_dict(
        {"a": xr.Dataset({"img": (("y", "x"), np.ones((2, 2)))}), "b": xr.Dataset({"data": (("x",), np.ones(3))})}
    )
    with pytest.raises(ValueError, match=r"the DataTree holds no `image` variable: not a volnorm collection"):
        STATS[stat](tree, dim=dim)


@ALL_STATS
@pytest.mark.parametrize("dim", [None, ("y", "x")])
def test_dataarray_mask_with_a_collection(stat, dim):
    mask = xr.DataArray(np.ones((2, 2), bool), dims=("y", "x"))
    with pytest.raises(TypeError, match=r"a collection's `mask` must be a DataTree with the same nodes"):
        STATS[stat](_collection(), dim=dim, mask=mask)


@ALL_STATS
def test_datatree_mask_with_a_dataarray(x, stat):
    mask = xr.DataTree.from_dict({"a": xr.Dataset({"mask": (("y", "x"), np.ones((3, 4), bool))})})
    # summarize (and the mean threshold) word it from the DataArray side: both name it
    with pytest.raises(TypeError, match=r"`mask` (is a DataTree \(a collection's masks\) but the data are one DataArray|must be an xarray.DataArray; got DataTree)"):
        STATS[stat](x, mask=mask)


def test_collection_mask_problems():
    coll = _collection()
    missing = xr.DataTree.from_dict({"a": xr.Dataset({"mask": (("y", "x"), np.ones((2, 2), bool))})})
    with pytest.raises(ValueError, match=r"`mask` has no node 'b'"):
        vn.histogram(coll, mask=missing)
    wrong = xr.DataTree.from_dict(
        {"a": xr.Dataset({"mask": (("y", "x"), np.ones((2, 3), bool))}), "b": xr.Dataset({"mask": (("y", "x"), np.ones((3, 3), bool))})}
    )
    with pytest.raises(ValueError, match=r"`mask` has 3 along 'x' but the data have 2"):
        vn.histogram(coll, mask=wrong)
    ints = xr.DataTree.from_dict(
        {n: xr.Dataset({"mask": (("y", "x"), np.ones(s, np.int64))}) for n, s in (("a", (2, 2)), ("b", (3, 3)))}
    )
    with pytest.raises(TypeError, match="`mask` must be boolean; got dtype int64"):
        vn.quantile(coll, 0.5, mask=ints)
    with pytest.raises(ValueError, match=r"`dim` names \['t'\], which no volume of the collection has"):
        vn.histogram(coll, dim="t")


def test_data_not_xarray():
    """The library's histogram takes DataArrays; `vn.histogram` also takes numpy (tests/test_arrays.py)."""
    with pytest.raises(TypeError, match="`data` must be an xarray.DataArray or DataTree; got ndarray"):
        inspect.unwrap(vn.histogram)(np.ones(3))


# ---------------------------------------------------------------------------
# sizes: too many integer values, too many float bins
# ---------------------------------------------------------------------------


@pytest.fixture
def wide_int() -> xr.DataArray:
    """int32 data spanning 2**21 + 1 values (> MAX_INT_BINS = 2**20)."""
    return xr.DataArray(np.array([[0, 5, 2**21]], dtype=np.int32), dims=("y", "x"))


@pytest.mark.parametrize("stat", ["histogram", "quantile", "summarize", "threshold"])
def test_integers_spanning_too_many_values_need_bins(wide_int, stat):
    with pytest.raises(ValueError, match=r"the integer data span 2097153 values \(0\.\.2097152\); pass bins= \(and range=\)"):
        STATS[stat](wide_int)


def test_integers_spanning_many_values_with_bins_follow_numpy(wide_int):
    h = vn.histogram(wide_int, bins=10).compute()
    ref, edges = np.histogram(wide_int.values, bins=10)
    np.testing.assert_array_equal(h.values, ref)
    np.testing.assert_array_equal(h["bin_lower"].values, edges[:-1])
    # and exactly 2**20 values is still allowed without bins=
    ok = xr.DataArray(np.array([0, 2**20 - 1], dtype=np.int32), dims="x")
    assert vn.histogram(ok).sizes["bin"] == 2**20


def test_too_many_float_bins_for_a_tiny_float32_range():
    x = xr.DataArray(np.array([1.0, 1.0000001], dtype=np.float32), dims="x")
    with pytest.raises(ValueError, match=r"1000000 bins over \[.*1\.0.*, .*1\.0000001.*\] do not fit in float32 \(equal edges\); use fewer bins"):
        vn.histogram(x, bins=10**6, range=(1.0, 1.0000001))
    with pytest.raises(ValueError, match="do not fit in float32"):
        vn.histogram(x, bins=10**6)  # the same from the data's own range
    # numpy refuses too
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(x.values, bins=10**6, range=(1.0, 1.0000001))


# ---------------------------------------------------------------------------
# other arguments
# ---------------------------------------------------------------------------


def test_bad_weights(x):
    with pytest.raises(TypeError, match="`weights` must be numeric; got dtype <U1"):
        vn.histogram(x, weights=xr.DataArray(np.full((3, 4), "a"), dims=("y", "x")))
    with pytest.raises(NotImplementedError, match="`weights` with a collection"):
        vn.histogram(_collection(), weights=x)


def test_weights_of_the_wrong_shape_say_weights(x):
    with pytest.raises(ValueError, match=r"`weights` has 5 along 'x'") as e:
        vn.histogram(x, bins=3, weights=xr.DataArray(np.ones((3, 5)), dims=("y", "x")))
    assert "mask" not in str(e.value), str(e.value)


def test_merge_histograms_bad_input(x):
    with pytest.raises(ValueError, match="no histogram to merge"):
        vn.merge_histograms([])
    with pytest.raises(ValueError, match="histograms on different bins .*cannot be merged"):
        vn.merge_histograms([vn.histogram(x, bins=3), vn.histogram(x, bins=4)])


def test_bad_threshold_method(x):
    with pytest.raises(ValueError, match=r"`method` must be one of .*; got 'Otsu'\. Did you mean 'otsu'\?"):
        vn.threshold(x, "Otsu")


@pytest.mark.parametrize("classes", [0, -1, 2.5])
def test_multiotsu_bad_classes_named(x, classes):
    with pytest.raises(ValueError, match="classes"):
        vn.threshold(x, "multiotsu", classes=classes)


def test_multiotsu_one_class_is_refused_not_a_crash():
    code = textwrap.dedent(
        """
        import numpy as np, xarray as xr, volnorm as vn
        x = xr.DataArray(np.arange(24, dtype=np.float32).reshape(2, 3, 4), dims=("volume", "y", "x"))
        vn.threshold(x, "multiotsu", classes=1)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1, f"exit code {res.returncode} (negative: killed by signal {-res.returncode})"
    assert "ValueError" in res.stderr and "classes" in res.stderr, res.stderr[-2000:]

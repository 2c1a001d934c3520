"""In-memory data (numpy backed, up to ``EAGER_MAX_BYTES``) are computed at once, a share of the
rows per thread, without a task graph: every such path gives what the lazy (chunked) path gives,
bit for bit, and comes back in memory; larger or dask-backed data stay lazy."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import volnorm as vn
from volnorm import _eager
from volnorm.transforms.binary import _compare

DTYPES = ["uint8", "int8", "uint16", "int16", "int32", "float32"]


def _stack(dtype: str, shape=(6, 40, 50), seed=0) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("float"):
        a = (rng.normal(100, 30, shape)).astype(dtype)
        a.flat[::97] = np.nan
    else:
        info = np.iinfo(dtype)
        a = rng.integers(max(info.min, -3000), min(info.max, 3000) + 1, shape).astype(dtype)
    return xr.DataArray(a, dims=("volume", "y", "x"))


CALLS = {
    "rescale": lambda x: vn.rescale(x, dim=("y", "x"), out_range="uint8"),
    "rescale_all": lambda x: vn.rescale(x),
    "zscore": lambda x: vn.zscore(x, dim=("y", "x")),
    "equalize": lambda x: vn.equalize(x, dim=("y", "x")),
    "binarize": lambda x: vn.binarize(x, dim=("y", "x")),
    "binarize_fsl": lambda x: vn.binarize(x, 10.5, inclusive=True, upper=200.2),
    "histogram": lambda x: vn.histogram(x, dim=("y", "x")),
    "histogram_masked": lambda x: vn.histogram(x, dim=("y", "x"), mask=x > x.mean(("y", "x"))),
    "ranges_masked": lambda x: vn.stats.ranges(x, dim=("y", "x"), mask=(x > 0))["max"],
    "quantile": lambda x: vn.quantile(x, [0.1, 0.5], dim=("y", "x")),
    "threshold": lambda x: vn.threshold(x, "otsu", dim=("y", "x")),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CALLS))
def test_in_memory_equals_chunked_and_comes_back_in_memory(name, dtype, monkeypatch):
    x = _stack(dtype)
    if name.startswith(("binarize", "threshold", "equalize")) and dtype.startswith("float"):
        x = x.fillna(0)
    monkeypatch.setattr(_eager, "MIN_PART_BYTES", 1024)  # small data shared among threads too
    fast = CALLS[name](x)
    assert isinstance(fast.data, np.ndarray), "in-memory data came back lazy"
    lazy = CALLS[name](x.chunk({"volume": 2, "y": 25}))
    if name == "zscore" and dtype in ("int32", "float32"):  # float64 moments merged in another order
        np.testing.assert_allclose(fast.values, lazy.values, rtol=1e-12, atol=1e-12)
    else:
        np.testing.assert_array_equal(fast.values, lazy.values)
    assert fast.dtype == lazy.dtype and fast.dims == lazy.dims


def test_large_numpy_data_stay_lazy(monkeypatch):
    x = _stack("int16")
    monkeypatch.setattr(_eager, "EAGER_MAX_BYTES", x.nbytes - 1)
    assert isinstance(vn.rescale(x, dim=("y", "x")).data, da.Array)
    monkeypatch.setattr(_eager, "EAGER_MAX_BYTES", x.nbytes)
    assert isinstance(vn.rescale(x, dim=("y", "x")).data, np.ndarray)


def test_shares_run_on_several_threads_and_serially_under_dask_sync(monkeypatch):
    monkeypatch.setattr(_eager, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(_eager, "usable_cpus", lambda: 3)
    monkeypatch.setattr(_eager, "_pool", None)  # a pool of this test's size
    seen: set[int] = set()
    barrier = threading.Barrier(3, timeout=10)

    def work(k: int) -> int:
        seen.add(threading.get_ident())
        barrier.wait()  # all three at once: a serial run would time out here
        return k * k

    assert _eager.run_parallel(work, [1, 2, 3]) == [1, 4, 9]
    assert len(seen) == 3
    order: list[int] = []
    with dask.config.set(scheduler="sync"):
        _eager.run_parallel(lambda k: order.append(k) or threading.get_ident(), [1, 2, 3])
    assert order == [1, 2, 3]


def test_an_error_in_a_share_is_raised_after_every_share_ended():
    done = []

    def work(k: int) -> int:
        if k == 2:
            raise ValueError("share 2 failed")
        done.append(k)
        return k

    with pytest.raises(ValueError, match="share 2 failed"):
        _eager.run_parallel(work, [1, 2, 3, 4])
    assert sorted(done) == [1, 3, 4]


def test_parts_cover_rows_or_the_columns_of_few_rows(monkeypatch):
    monkeypatch.setattr(_eager, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(_eager, "usable_cpus", lambda: 4)
    for rows, cols in [(1, 10), (3, 7), (4, 5), (9, 2), (0, 3), (2, 0)]:
        cover = np.zeros((rows, cols), int)
        for r, c in _eager.parts_2d(rows, cols, 1):
            cover[r, c] += 1
        assert (cover == 1).all()


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["uint8", "int8", "uint16", "int16", "int32", "bool"]),
    st.one_of(st.floats(-1e10, 1e10), st.sampled_from([np.nan, np.inf, -np.inf, 0.5, -0.5, 127.0, 127.5, 255.0, -129.0])),
    st.sampled_from(["gt", "ge", "le"]),
    st.integers(0, 2**32 - 1),
)
def test_integer_compare_equals_numpy(dtype, t, op, seed):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        a = rng.random((3, 17)) < 0.5
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, (3, 17), endpoint=True).astype(dtype)
        a[0, :2] = (info.min, info.max)
    x = xr.DataArray(a, dims=("volume", "x"))
    numpy_op = {"gt": np.greater, "ge": np.greater_equal, "le": np.less_equal}[op]
    per_row = xr.DataArray(np.array([t, t / 3 if np.isfinite(t) else t, np.floor(t) if np.isfinite(t) else 0.0]), dims="volume")
    for thr in (t, per_row):
        want = numpy_op(a, np.asarray(thr)[:, None] if isinstance(thr, xr.DataArray) else thr)
        np.testing.assert_array_equal(_compare(x, thr, op).values, want)

"""The laziness contract of every public function that takes data: calling it on a dask-backed
DataArray computes nothing, unless it needs a fit, and then it reads the data at most the
documented number of passes.

One table, one line per call: ``passes`` is how many times each input chunk may be read at call
time (0: nothing computes). Reads are counted at the source (a dask array over an object whose
``__getitem__`` counts the chunks it returns) and dask computes by
:func:`volnorm.testing.raise_if_dask_computes`: a pass may be one or more computes, but never reads a
chunk twice. Functions that need a fit say why. Entries whose behaviour is being changed by
work in progress are marked ``CHANGING``; an entry whose measured reads differ from its line
fails with the numbers, so the line is updated with the function's docstring.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import volnorm as vn
from volnorm.testing import raise_if_dask_computes

SHAPE = (3, 4, 16, 16)  # volume, z, y, x
CHUNKS = (1, 2, 16, 16)  # 6 chunks, each (y, x) slice whole in one chunk
NCHUNKS = 6
PER_VOLUME = ("z", "y", "x")
PER_SLICE = ("y", "x")


class CountingSource:
    """A numpy-like array that counts the chunks read from it (empty reads, e.g. dask's meta, aside)."""

    def __init__(self, a: np.ndarray) -> None:
        self.a, self.shape, self.dtype, self.ndim = a, a.shape, a.dtype, a.ndim
        self.reads = 0

    def __getitem__(self, key: Any) -> np.ndarray:
        out = self.a[key]
        if np.size(out):
            self.reads += 1
        return out


def values(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    a = rng.gamma(2.0, 300.0, SHAPE)
    return a.astype(dtype) if dtype.startswith("float") else np.clip(a, 0, 4000).astype(dtype)


def counted(dtype: str = "uint16") -> tuple[xr.DataArray, CountingSource]:
    src = CountingSource(values(dtype))
    arr = da.from_array(src, chunks=CHUNKS, name=f"counted-{uuid.uuid4().hex}", lock=False, asarray=True)
    return xr.DataArray(arr, dims=("volume", "z", "y", "x")), src


def mask_of() -> xr.DataArray:
    return xr.DataArray(values("uint16") > 200, dims=("volume", "z", "y", "x"))


def in_memory(dtype: str = "uint16") -> xr.DataArray:
    return xr.DataArray(values(dtype), dims=("volume", "z", "y", "x"))


def per_voxel_histogram() -> xr.DataArray:
    return vn.histogram(xr.DataArray(values("uint16"), dims=("volume", "z", "y", "x")).chunk({"z": 2}), dim="volume", bins=16, range=(0, 4000))


REFERENCE = xr.DataArray(np.random.default_rng(1).integers(0, 3000, (8, 16, 16)).astype("uint16"), dims=("z", "y", "x"))
LANDMARKS = vn.nyul_fit(in_memory())
EQ_PARAMS, Z_PARAMS, R_PARAMS = vn.fit_equalize(in_memory()), vn.fit_zscore(in_memory()), vn.fit_rescale(in_memory())
FCM_PARAMS, LSQ_PARAMS = vn.fit_fcm(in_memory(), mask=mask_of()), vn.fit_lsq(in_memory(), mask=mask_of())


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[xr.DataArray], Any]
    passes: int  # reads of each chunk at call time; 0 = lazy
    dtype: str = "uint16"
    why: str = ""  # why it needs a fit (passes > 0)


FIT = "a fit: the statistics decide every voxel's value"

# fmt: off
TABLE: list[Case] = [
    # --- no fit: lazy -----------------------------------------------------------------------
    Case("rescale-window", lambda x: vn.rescale(x, (0, 4000)), 0),
    Case("equalize-per-slice", lambda x: vn.equalize(x, dim=PER_SLICE), 0),
    Case("equalize-per-slice-float", lambda x: vn.equalize(x, dim=PER_SLICE), 0, "float32"),
    Case("equalize-per-slice-masked", lambda x: vn.equalize(x, dim=PER_SLICE, mask=mask_of()), 0),
    Case("equalize-per-slice-uint8", lambda x: vn.equalize(x, dim=PER_SLICE, out_range="uint8"), 0),
    Case("equalize-per-volume", lambda x: vn.equalize(x, dim=PER_VOLUME), 0),  # volumes made whole by a lazy rechunk
    Case("equalize-params", lambda x: vn.equalize(x, params=EQ_PARAMS), 0),
    Case("equalize_adaptive", lambda x: vn.equalize_adaptive(x), 0),
    Case("equalize_adaptive-3d", lambda x: vn.equalize_adaptive(x, dim=PER_VOLUME), 0),
    Case("gamma", lambda x: vn.gamma(x, 0.5), 0),  # CHANGING: scales by the dtype range (no fit)
    Case("log", lambda x: vn.log(x), 0),  # CHANGING: scales by the dtype range (no fit)
    Case("n4", lambda x: vn.n4(x), 0),
    Case("zscore-params", lambda x: vn.zscore(x, params=Z_PARAMS), 0),
    Case("fcm-params", lambda x: vn.fcm(x, params=FCM_PARAMS), 0),
    Case("lsq-params", lambda x: vn.lsq(x, params=LSQ_PARAMS), 0),
    Case("rescale-params", lambda x: vn.rescale(x, params=R_PARAMS), 0),
    Case("binarize-value", lambda x: vn.binarize(x, 500), 0),
    Case("dither-window", lambda x: vn.dither(x, in_range=(0, 4000)), 0),
    Case("histogram-range", lambda x: vn.histogram(x, bins=64, range=(0, 4000)), 0),
    Case("histogram-per-voxel", lambda x: vn.histogram(x, dim="volume", bins=16, range=(0, 4000)), 0),
    Case("apply_colormap-window", lambda x: vn.apply_colormap(x, vmin=0, vmax=4000), 0),
    Case("invert_colormap", lambda x: vn.invert_colormap(vn.apply_colormap(x, vmin=0, vmax=4000), "viridis", 0, 4000), 0),
    Case("merge_histograms", lambda x: vn.merge_histograms([vn.histogram(x, bins=8, range=(0, 4000))] * 2), 0),
    Case("voxel_stats", lambda x: vn.voxel_stats(vn.histogram(x, dim="volume", bins=16, range=(0, 4000))), 0),
    Case("voxel_quantile", lambda x: vn.voxel_quantile(vn.histogram(x, dim="volume", bins=16, range=(0, 4000)), 0.5), 0),
    Case("voxel_cdf", lambda x: vn.voxel_cdf(per_voxel_histogram(), x.isel(volume=0)), 0),
    Case("normative_score", lambda x: vn.normative_score(x.isel(volume=0), per_voxel_histogram()), 0),
    Case("nyul_apply", lambda x: vn.nyul_apply(x, LANDMARKS), 1, why="each volume's own landmarks (its percentiles) are a fit"),
    # --- fits: at most the documented passes --------------------------------------------------
    Case("rescale", lambda x: vn.rescale(x), 1, why=FIT + " (min/max)"),
    Case("rescale-per-volume", lambda x: vn.rescale(x, dim=PER_VOLUME), 1, why=FIT + " (per-volume min/max)"),
    Case("rescale-percentiles", lambda x: vn.rescale(x, percentiles=(1, 99)), 1, why=FIT + " (integer histogram)"),
    Case("rescale-percentiles-float", lambda x: vn.rescale(x, percentiles=(1, 99)), 2, "float32", why=FIT + " (range, histogram)"),
    Case("fit_rescale", lambda x: vn.fit_rescale(x), 1, why=FIT),
    Case("zscore", lambda x: vn.zscore(x), 1, why=FIT + " (mean, std)"),
    Case("fit_zscore", lambda x: vn.fit_zscore(x), 1, why=FIT),
    Case("whitestripe", lambda x: vn.whitestripe(x), 1, why=FIT + " (each volume's exact histogram)"),
    Case("fit_whitestripe", lambda x: vn.fit_whitestripe(x), 1, why=FIT),
    Case("kde", lambda x: vn.kde(x), 1, why=FIT + " (each volume's exact histogram)"),
    Case("fit_kde", lambda x: vn.fit_kde(x), 1, why=FIT),
    Case("fcm", lambda x: vn.fcm(x, mask=mask_of()), 1, why=FIT + " (each volume's exact histogram, clustered)"),
    Case("fit_fcm", lambda x: vn.fit_fcm(x, mask=mask_of()), 1, why=FIT),
    Case("lsq", lambda x: vn.lsq(x, mask=mask_of()), 1, why=FIT + " (each volume's tissue means and the standard)"),
    Case("fit_lsq", lambda x: vn.fit_lsq(x, mask=mask_of()), 1, why=FIT),
    Case("mean_scale", lambda x: vn.mean_scale(x), 1, why=FIT + " (each volume's mean)"),
    Case("fit_mean_scale", lambda x: vn.fit_mean_scale(x), 1, why=FIT),
    Case("auto_gamma", lambda x: vn.auto_gamma(x), 1, why=FIT + " (the mean sets the exponent)"),  # CHANGING
    Case("equalize", lambda x: vn.equalize(x), 1, why=FIT + " (one CDF for the dataset: integer histogram)"),
    Case("equalize-float", lambda x: vn.equalize(x), 2, "float32", why=FIT + " (range, histogram)"),
    Case("fit_equalize", lambda x: vn.fit_equalize(x, dim=PER_SLICE), 1, why="returns the histograms"),
    Case("fit_equalize-float", lambda x: vn.fit_equalize(x, dim=PER_SLICE), 2, "float32", why="returns the histograms (range, histogram)"),
    Case("match_histogram", lambda x: vn.match_histogram(x, REFERENCE), 1, why=FIT + " (the source's CDF)"),
    Case("match_histogram-to-histogram", lambda x: vn.match_histogram(x, vn.histogram(REFERENCE)), 1, why=FIT + " (the source's CDF)"),
    Case("nyul_fit", lambda x: vn.nyul_fit(x), 1, why="returns the landmarks"),
    Case("threshold", lambda x: vn.threshold(x), 1, why="returns the threshold: a small computed result"),  # CHANGING
    Case("threshold-per-volume", lambda x: vn.threshold(x, dim=PER_VOLUME), 1, why="returns the thresholds"),  # CHANGING
    Case("binarize", lambda x: vn.binarize(x), 1, why="the Otsu threshold is a fit"),  # CHANGING (thresholds)
    Case("dither", lambda x: vn.dither(x), 1, why="in_range='minmax' is a fit (min/max)"),
    Case("apply_colormap", lambda x: vn.apply_colormap(x), 1, why="vmin/vmax default to the data's min/max: a fit"),
    Case("histogram", lambda x: vn.histogram(x), 1, why="integer bins from the data's range (range pass); the counts are lazy"),
    Case("quantile", lambda x: vn.quantile(x, 0.5), 1, why="returns the quantiles"),
    Case("quantile-float", lambda x: vn.quantile(x, 0.5), 2, "float32", why="returns the quantiles (range, histogram)"),
    Case("summarize", lambda x: vn.summarize(x), 1, why="returns the statistics"),
]
# fmt: on

#: Public functions that take no data array of a stack, or whose job is to read or write it.
NOT_IN_TABLE = {
    "open_images": "opens files (tests/test_laziness.py: opening reads no voxel)",
    "open_nifti": "opens files (tests/test_laziness.py: opening reads no voxel)",
    "open_zarr": "opens a store (tests/test_laziness.py: opening reads no voxel)",
    "open_voxel_histogram": "opens a store",
    "read_info": "reads one header",
    "to_zarr": "writes: computing is its job",
    "to_nifti": "writes: computing is its job",
    "convert": "converts files: computing is its job",
    "accumulate": "writes per-voxel histograms into a store: computing is its job",
    "verify": "reads a store to check it: computing is its job",
}


def public_functions() -> set[str]:
    return {n for n in vn.__all__ if inspect.isfunction(getattr(vn, n))}


def test_every_public_function_is_in_the_table():
    called = {c.id.split("-")[0] for c in TABLE}
    missing = public_functions() - called - set(NOT_IN_TABLE)
    assert not missing, f"add a line to TABLE (or NOT_IN_TABLE, with why) for {sorted(missing)}"
    assert all(c.why for c in TABLE if c.passes), "every entry that reads data at call time says why"


@pytest.mark.parametrize("case", TABLE, ids=[c.id for c in TABLE])
def test_calls_read_at_most_their_passes(case):
    x, src = counted(case.dtype)
    scheduler_limit = 0 if case.passes == 0 else 100  # a pass may take several computes
    with raise_if_dask_computes(scheduler_limit) as counter:
        case.call(x)
    reads = src.reads / NCHUNKS
    assert reads <= case.passes, (
        f"{case.id}: read every chunk {reads:g} times at call time ({counter.total_computes} computes); "
        f"the table says {case.passes}")
    if case.passes == 0:
        assert counter.total_computes == 0


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_per_slice_equalize_reads_each_chunk_once_when_computed(dtype):
    """No pass at call time, and one read of each chunk when computed (the fit read it once
    for integers, twice for floats, before the map read it again)."""
    x, src = counted(dtype)
    with raise_if_dask_computes():
        y = vn.equalize(x, dim=PER_SLICE)
    want = vn.equalize(in_memory(dtype), params=vn.fit_equalize(in_memory(dtype), dim=PER_SLICE))
    np.testing.assert_array_equal(y.values, want.values)
    assert src.reads == NCHUNKS

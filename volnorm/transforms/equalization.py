"""Histogram equalization (global, per volume, per slice, adaptive) and histogram matching.

``fit_equalize`` takes the exact histograms (one pass after the range pass for floats) and
:func:`equalize` maps every voxel through their CDFs, one look-up table per index of the kept
dims, blockwise (:func:`volnorm.transforms.common.map_rows`). CLAHE keeps each plane or volume
whole in a chunk and runs scikit-image's kernel on it.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Hashable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._dims import Dim, reduced_names, split
from volnorm._eager import in_memory_rows, row_parts, run_parallel
from volnorm._histogram import histogram, histogram_counts, histogram_rows, numba_ready, prepare
from volnorm._utils import DEFAULT_CHUNK_BYTES, no_valid_voxels
from volnorm.params import Params, attach, check
from volnorm.stats import FLOAT_BINS, summarize
from volnorm.transforms.common import check_data, dask_data, float_dtype, map_rows, out_spec

__all__ = ["GROUP_BYTES", "equalize", "equalize_adaptive", "fit_equalize", "match_histogram"]

#: The largest group (one index of the kept dims, e.g. one slice or one volume; bytes of input)
#: that a per-group :func:`equalize` takes whole into one block and equalizes there, lazily;
#: larger groups are fitted in a pass at call time (:func:`fit_equalize`).
GROUP_BYTES = 2 * DEFAULT_CHUNK_BYTES


# ---------------------------------------------------------------------------
# histogram equalization
# ---------------------------------------------------------------------------


def fit_equalize(data: xr.DataArray, nbins: int = 256, *, dim: Dim = None, mask: xr.DataArray | None = None) -> Params:
    """Fit :func:`equalize`: per index of the kept dims, the histogram scikit-image would take of
    that part (integers: one bin per value; floats: ``nbins`` numpy bins over **its own** masked
    min..max), i.e. its CDF. Computes: a min/max pass and a histogram pass.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    nbins : int
        Bins of each histogram for float data (a positive int); integer data get one bin per value.
    dim : str, sequence of str or None
        Dims each histogram is taken over: ``None`` = one for the whole dataset;
        ``("z", "y", "x")`` = one per volume; ``("y", "x")`` = one per slice.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are counted.

    Returns
    -------
    Params
        Method ``"equalize"``: ``counts`` and bin ``centers`` with the kept dims plus ``bin``;
        ``nbins``, the data's ``dtype`` and ``dim`` in ``options``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 0, 1, 3], dtype="uint8"), dims="x")
    >>> p = vn.fit_equalize(x)
    >>> p.method, vn.equalize(x, params=p).values.tolist() == vn.equalize(x).values.tolist()
    ('equalize', True)
    """
    data = check_data(data)
    kept, _ = split(data, dim)
    if data.dtype.kind in "iub":
        counts, centers = histogram_counts(data, dim, mask)
        centers = np.broadcast_to(centers, counts.shape)
    else:
        if isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or nbins <= 0:
            raise ValueError(f"`nbins` must be a positive int; got {nbins!r}")
        s = summarize(data, dim=dim, mask=mask, quantiles=())
        lo, hi = s["min"].values.reshape(-1), s["max"].values.reshape(-1)
        if np.any(np.isnan(lo)):
            raise no_valid_voxels("to equalize", some=bool(kept))
        edges = np.stack([_float_edges(a, b, data.dtype, nbins) for a, b in zip(lo, hi)]).astype(np.float64)
        counts = histogram_rows(data, dim, edges, mask)[:, :nbins]
        centers = _centers(edges, data.dtype)  # scikit-image's centres
    if np.any(counts.sum(axis=1) == 0):
        raise no_valid_voxels("to equalize", some=bool(kept))
    shape = tuple(data.sizes[d] for d in kept)
    coords = {d: data[d] for d in kept if d in data.coords}
    values = xr.Dataset(
        {
            "counts": ((*kept, "bin"), counts.reshape(shape + (-1,))),
            "centers": ((*kept, "bin"), np.ascontiguousarray(centers).reshape(shape + (-1,))),
        },
        coords=coords,
    )
    return Params("equalize", values, {"nbins": int(nbins), "dtype": data.dtype.name, "dim": reduced_names(data, dim)})


def equalize(
    data: xr.DataArray,
    nbins: int = 256,
    *,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    out_range: tuple[float, float] | str | np.dtype | type = (0.0, 1.0),
    params: Params | None = None,
) -> xr.DataArray:
    """Histogram equalization with one CDF per index of the kept dims (``dim=None``: one CDF for
    the whole dataset, exact for integer data; per volume; per slice with ``dim=("y", "x")``).

    Float output (``out_range=(lo, hi)``, default [0, 1]) follows scikit-image's
    ``equalize_hist``: ``cdf = cumsum(hist) / total`` over the histogram of the
    masked voxels (integers: one bin per value from min to max; floats: ``nbins``
    numpy bins, centres ``(e[i] + e[i+1]) / 2`` in the data's float type), and
    ``y = np.interp(x, centres, cdf)`` for every voxel, masked or not - equal
    to ``skimage.exposure.equalize_hist`` applied to each part (slice, volume, dataset).

    Output dtype (the rule of :func:`volnorm.transforms.common.float_dtype`, as every volnorm
    transform): float32 for float32/16 input and for integer (and bool) input of up to 16 bits;
    float64 for float64 and 32/64-bit integer input. *Departure from scikit-image*, which
    returns float64 for every integer input: for uint8/int8/uint16/int16/bool input the values
    are scikit-image's float64 values rounded to float32 (computed in float64, then rounded;
    half the memory). For every other input the dtype and the values are scikit-image's.

    Integer output (``out_range="uint8"`` or another integer dtype, max ``M``)
    follows OpenCV's ``equalizeHist``: ``y = round((C(x) - C_min) * M / (N - C_min))``
    with ``C`` the cumulative count, ``C_min`` the count of the lowest occupied
    bin and ``N`` the total - equal to ``cv2.equalizeHist`` on uint8 slices.

    Computes at call time: **nothing** when each part is equalized on its own (``dim`` keeps
    some dims, e.g. per slice or per volume) and one part's input is at most
    :data:`GROUP_BYTES`: each block of the result (its parts made whole within it, by a lazy
    rechunk when the chunks cut them) takes its parts' histograms and maps them when it is
    computed, reading every input chunk once. Otherwise - dataset-wide (``dim=None``) or
    larger parts - the fit of :func:`fit_equalize` (integers: one histogram pass; floats: a
    min/max pass and a histogram pass), then a lazy map. With ``params``: nothing.
    A part without any valid voxel raises when the lazy result is computed (the fit raises
    at call time).

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    nbins : int
        Histogram bins for float data; integer data get one bin per value.
    dim : str, sequence of str or None
        Dims each CDF is computed over: ``None`` = the whole dataset; ``("z", "y", "x")`` = one
        per volume; ``("y", "x")`` = one per slice.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels make the histograms (every voxel is mapped).
    out_range : (lo, hi) or integer dtype
        A float output range (scikit-image's rule), or an integer dtype such as ``"uint8"``
        (OpenCV's rule, over the dtype's range).
    params : Params, optional
        From :func:`fit_equalize`: no fit pass; ``mask`` is then not used, and a ``dim`` or
        ``nbins`` given must be what they were fitted with. Per-part parameters only apply to
        data with the same parts (sizes and labels along the kept dims).

    Returns
    -------
    xarray.DataArray
        Lazy; float output as the dtype rule above, integer output has the ``out_range`` dtype;
        the fitted parameters in ``attrs["volnorm_params"]`` (per-part equalization without a
        fit records its options only: ``fitted: "per group, in each block"``, no histograms).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 0, 1, 3], dtype="uint8"), dims="x")
    >>> vn.equalize(x).values.tolist()
    [0.5, 0.5, 0.75, 1.0]
    >>> vn.equalize(x, out_range="uint8").values.tolist()
    [0, 0, 128, 255]
    >>> s = xr.DataArray(np.array([[0, 0, 1, 3], [5, 5, 5, 9]], dtype="uint8"), dims=("y", "x")).chunk({"y": 1})
    >>> y = vn.equalize(s, dim="x")   # one CDF per row: computes nothing yet
    >>> y.dtype, y.values.tolist()
    (dtype('float32'), [[0.5, 0.5, 0.75, 1.0], [0.75, 0.75, 0.75, 1.0]])
    """
    data = check_data(data)
    spec = _plan(data.dtype, out_range)  # the output range checked before any work
    if params is None:
        kept, reduced = split(data, dim)
        if data.dtype.kind not in "iub" and (isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or nbins <= 0):
            raise ValueError(f"`nbins` must be a positive int; got {nbins!r}")
        y = _equalize_groups(data, kept, reduced, mask, int(nbins), out_range) if kept else None
        if y is not None:  # each group equalized in its block: nothing to fit
            options = {"nbins": int(nbins), "dtype": data.dtype.name, "dim": reduced_names(data, dim), "fitted": "per group, in each block",
                       "out_range": list(spec[:2]), "out_dtype": None if spec[2] is None else spec[2].name}
            return attach(y, data, Params("equalize", xr.Dataset(), options))
        params = fit_equalize(data, nbins, dim=dim, mask=mask)
    else:
        check(params, equalize, data, dim=dim, nbins=nbins)
        if "counts" not in params.values:
            raise ValueError("these equalize parameters hold no histograms (a per-group equalize takes them in each "
                             "block and keeps none); fit them with vn.fit_equalize(data, dim=...)")
    h = params.values["counts"]
    kept = tuple(d for d in h.dims if d != "bin")
    counts = h.values.reshape(-1, h.sizes["bin"]).astype(np.int64, copy=False)
    centers = params.values["centers"].values.reshape(counts.shape)
    src_dtype = np.dtype(params.options.get("dtype", data.dtype.name))
    spec = _plan(src_dtype, out_range)
    table = _tables(counts, centers, src_dtype, spec)
    lo = int(centers[0][0]) if src_dtype.kind in "iub" else 0

    def equalize_lut(v: np.ndarray, t: np.ndarray) -> np.ndarray:
        return _map_int(v, t, lo)

    def equalize_interp(v: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        return _map_float(v, t, c, spec)

    if src_dtype.kind in "iub":
        y = map_rows(data, kept, equalize_lut, [table], spec[4])
    else:
        y = map_rows(data, kept, equalize_interp, [table, centers], spec[4])
    out_lo, out_hi, out_dtype = spec[:3]
    params = Params("equalize", params.values, {**params.options, "out_range": [out_lo, out_hi], "out_dtype": None if out_dtype is None else out_dtype.name})
    return attach(y, data, params)


def _plan(src_dtype: np.dtype, out_range: Any) -> tuple[float, float, np.dtype | None, np.dtype, np.dtype]:
    """``(out_lo, out_hi, out_dtype, ct, res_dtype)``: the output range, the integer output dtype
    (or ``None``), the float type the tables are computed in (scikit-image's: float64 for
    integers, float32 for float32/16) and the result's dtype (:func:`float_dtype` for float output)."""
    out_lo, out_hi, out_dtype = out_spec(out_range)
    ct = np.dtype(np.float32) if src_dtype in (np.float32, np.float16) else np.dtype(np.float64)  # scikit-image's
    return out_lo, out_hi, out_dtype, ct, float_dtype(src_dtype) if out_dtype is None else out_dtype


def _finish(vals: np.ndarray, ct: np.dtype, res: np.dtype, out_lo: float, out_hi: float, out_dtype: np.dtype | None) -> np.ndarray:
    """CDF values (``ct``) or OpenCV's scaled counts (float32) as output values of dtype ``res``."""
    if out_dtype is None:
        if (out_lo, out_hi) != (0.0, 1.0):
            vals = vals * ct.type(out_hi - out_lo) + ct.type(out_lo)
        return vals.astype(res, copy=False)
    vals = np.rint(vals)  # half to even, as cvRound
    vals += vals.dtype.type(out_lo)
    return np.clip(vals, out_lo, out_hi, out=vals).astype(out_dtype)


def _tables(counts: np.ndarray, centers: np.ndarray, src_dtype: np.dtype, spec: tuple) -> np.ndarray:
    """Per row of ``counts`` (its bins at ``centers``): integer data, the output value of each
    bin (a look-up table); float data, the CDF at each centre (interpolated between voxels)."""
    out_lo, out_hi, out_dtype, ct, res = spec
    total = counts.sum(axis=1, keepdims=True)
    cum = np.cumsum(counts, axis=1)
    first = counts[np.arange(len(counts)), np.argmax(counts > 0, axis=1)][:, None]
    if out_dtype is None:  # scikit-image: cdf = cumsum / total, in its float type
        # integers: a part's own histogram starts at its lowest occupied value, so bins below
        # it (other parts' values, voxels outside the mask) take its CDF, as np.interp clamps
        # (float bins are each part's own already)
        low = np.maximum(cum, first) if src_dtype.kind in "iub" else cum
        table = (low / total.astype(np.float64)).astype(ct)
    else:  # OpenCV: cvRound(float(C - C_min) * (M / float(N - C_min))), all in float32 as OpenCV
        step = np.float32(out_hi - out_lo) / np.maximum(total - first, 1).astype(np.float32)
        cum -= first
        table = np.maximum(cum, 0, out=cum).astype(np.float32)
        table *= step  # in output units from out_lo
    if src_dtype.kind not in "iub":
        return table
    lut = _finish(table, ct, res, out_lo, out_hi, out_dtype)
    if out_dtype is not None:  # OpenCV leaves a one-value image as it is
        occupied = np.argmax(counts > 0, axis=1)
        const = counts[np.arange(len(counts)), occupied] == total[:, 0]
        lut[const, occupied[const]] = np.clip(centers[const, occupied[const]], out_lo, out_hi).astype(out_dtype)
    return lut


def _map_int(v: np.ndarray, lut: np.ndarray, lo: int) -> np.ndarray:
    """``lut[row, clip(v - lo)]`` for integer rows ``v`` (``(rows, n)``)."""
    out = np.empty(v.shape, dtype=lut.dtype)
    v = np.ascontiguousarray(v)
    if v.dtype.itemsize == 1:  # a 256-entry table per row: a plain gather
        byte = np.arange(256, dtype=np.uint8).view(v.dtype).astype(np.int64)
        t = lut[:, np.clip(byte - lo, 0, lut.shape[1] - 1)]
        _kernels.gather_rows(v.view(np.uint8), np.ascontiguousarray(t), out)
    else:
        _kernels.lut_rows(v, np.ascontiguousarray(lut), lo, out)
    return out


def _map_float(v: np.ndarray, table: np.ndarray, centers: np.ndarray, spec: tuple) -> np.ndarray:
    """``np.interp`` of float rows ``v`` on each row's centres and CDF, as scikit-image."""
    _, _, out_dtype, ct, res = spec
    out = np.empty(v.shape, dtype=np.float64)
    for i in range(v.shape[0]):
        out[i] = np.interp(v[i], centers[i], table[i])
    return _finish(out.astype(ct) if out_dtype is None else out.astype(np.float32), ct, res, *spec[:3])


def _float_edges(lo: Any, hi: Any, dtype: np.dtype, nbins: int) -> np.ndarray:
    """numpy's ``nbins`` edges over ``lo..hi`` (values of ``dtype``), as ``np.histogram(part)``."""
    a, b = dtype.type(lo), dtype.type(hi)
    if a == b:
        a, b = a - 0.5, b + 0.5
    return np.linspace(a, b, nbins + 1, dtype=np.result_type(dtype, np.float16))


def _centers(edges: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """scikit-image's bin centres ``(e[i] + e[i+1]) / 2`` in the data's float type, as float64."""
    et = np.result_type(dtype, np.float16)
    e = edges.astype(et)
    return ((e[..., :-1] + e[..., 1:]) / et.type(2)).astype(np.float64)


def _group_histogram(v: np.ndarray, m: np.ndarray | None, nbins: int) -> tuple[np.ndarray, np.ndarray] | None:
    """One group's histogram as :func:`fit_equalize` takes it (``v`` flat, ``m`` its mask):
    ``(counts, centers)``, or ``None`` when no voxel counts."""
    x = numba_ready(v)[None]
    mm = None if m is None else np.ascontiguousarray(m, dtype=np.bool_)
    if x.dtype.kind == "b":
        x = x.view(np.uint8)
    rng = np.array([np.inf, -np.inf], dtype=x.dtype) if x.dtype.kind == "f" else np.array(
        [np.iinfo(x.dtype).max, np.iinfo(x.dtype).min], dtype=x.dtype)
    _kernels.minmax(x[0], rng, mm)
    if rng[0] > rng[1] or (x.dtype.kind == "f" and not np.isfinite(rng).all()):
        return None
    m2 = None if mm is None else mm[None]
    if v.dtype.kind in "iub":
        lo, n = int(rng[0]), int(rng[1]) - int(rng[0]) + 1
        out = np.zeros((1, n + _kernels.NEXTRA), dtype=np.int64)
        _kernels.hist_int(x, lo, n, out, m2, None)
        return out[0, :n], np.arange(lo, lo + n, dtype=np.float64)
    edges = _float_edges(rng[0], rng[1], v.dtype, nbins).astype(np.float64)
    out = np.zeros((1, nbins + _kernels.NEXTRA), dtype=np.int64)
    _kernels.hist_float(x, edges, out, m2, None, min(_kernels.edge_slack(edges), 0.5))
    return out[0, :nbins], _centers(edges, v.dtype)


def _group_chunks(xa: da.Array, nk: int) -> tuple | None:
    """Chunks of ``xa`` (kept axes first) with each group (one index of the first ``nk`` axes)
    whole in a block: ``xa.chunks`` when they already are, else the reduced axes whole and the
    kept axes split to keep a block near :data:`DEFAULT_CHUNK_BYTES`; ``None`` when one group is
    larger than :data:`GROUP_BYTES` (then it is fitted in a pass instead)."""
    group = math.prod(xa.shape[nk:]) * xa.dtype.itemsize
    if group > GROUP_BYTES:
        return None
    if all(len(c) <= 1 for c in xa.chunks[nk:]):
        return xa.chunks
    budget = max(1, DEFAULT_CHUNK_BYTES // max(group, 1))
    kept = []
    for c in reversed(xa.chunks[:nk]):
        size = max(1, min(max(c), budget))
        budget = max(1, budget // size)
        kept.append(size)
    return tuple(reversed(kept)) + tuple(xa.shape[nk:])


def _equalize_groups(data: xr.DataArray, kept: tuple, reduced: tuple, mask: Any, nbins: int, out_range: Any) -> xr.DataArray | None:
    """Per-group equalization without a pass: each block takes its groups' histograms and maps
    them. ``None`` when a group does not fit in a block."""
    spec = _plan(data.dtype, out_range)
    res = spec[4]

    def equalized_rows(v2: np.ndarray, m2: np.ndarray | None) -> np.ndarray:
        out = np.empty(v2.shape, dtype=res)
        for r in range(len(v2)):
            h = _group_histogram(v2[r], None if m2 is None else m2[r], nbins)
            if h is None:
                raise no_valid_voxels("to equalize", some=True)
            counts, centers = h[0][None], h[1][None]
            table = _tables(counts, centers, data.dtype, spec)
            if data.dtype.kind in "iub":
                out[r] = _map_int(v2[r : r + 1], table, int(centers[0, 0]))[0]
            else:
                out[r] = _map_float(v2[r : r + 1], table, centers, spec)[0]
        return out

    at_once = in_memory_rows(data, kept, reduced, mask)
    if at_once is not None:  # in memory: a share of the groups per thread
        x, v, m = at_once
        shares = row_parts(len(v), v.shape[1] * (v.itemsize + res.itemsize))
        out = np.concatenate(run_parallel(lambda s: equalized_rows(v[s], None if m is None else m[s]), shares)) if shares else np.empty(v.shape, res)
        return xr.DataArray(out.reshape(x.shape), dims=x.dims, coords=x.coords, name=data.name).transpose(*data.dims)
    x, args = prepare(data, kept, reduced, mask)
    nk = len(kept)
    chunks = _group_chunks(args[0], nk)
    if chunks is None:
        return None
    args = [a.rechunk(chunks) for a in args]

    def block(b: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        rows = math.prod(b.shape[:nk])
        m2 = None if not rest else np.ascontiguousarray(rest[0], dtype=np.bool_).reshape(rows, -1)
        return equalized_rows(np.ascontiguousarray(b).reshape(rows, -1), m2).reshape(b.shape)

    name = f"equalize-groups-{uuid.uuid4().hex}"
    ya = da.map_blocks(block, *args, dtype=res, meta=np.empty((0,) * args[0].ndim, dtype=res), name=name)
    return xr.DataArray(ya, dims=x.dims, coords=x.coords, name=data.name).transpose(*data.dims)


# ---------------------------------------------------------------------------
# histogram matching
# ---------------------------------------------------------------------------


def _cdf_table(data: xr.DataArray, dim: Dim, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Per index of the kept dims, the empirical CDF as scikit-image takes it (the fraction of
    voxels <= each value): ``(values, fractions, edges, kept)``. Integers: one point per value.
    Floats: a 4096-bin histogram, each bin one point at its centre (``edges`` bin the voxels)."""
    is_int = data.dtype.kind in "iub"
    h = histogram(data, bins=None if is_int else FLOAT_BINS, dim=dim, mask=mask).compute()
    counts = h.values.reshape(-1, h.sizes["bin"]).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    if np.any(total == 0):
        raise no_valid_voxels("to take a histogram of", some=total.size > 1)
    kept = tuple(d for d in h.dims if d != "bin")
    edges = np.concatenate([h["bin_lower"].values[:1], h["bin_upper"].values])
    return np.broadcast_to(h["bin"].values, counts.shape), np.cumsum(counts, axis=1) / total, edges, kept


def match_histogram(
    data: xr.DataArray,
    reference: xr.DataArray,
    *,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    reference_mask: xr.DataArray | None = None,
) -> xr.DataArray:
    """Map intensities so that the histogram over ``dim`` matches the reference's, as
    ``skimage.exposure.match_histograms`` (CDF to CDF, ``np.interp`` between the occupied values).

    Integer data are matched exactly as scikit-image does; float data through 4096-bin
    histograms, each bin standing for its values (scikit-image uses every distinct value: the
    results differ by about a reference bin). Computes at call time: the source's histograms
    (integers: one pass; floats: a range pass and a histogram pass) and, when ``reference`` is an
    image, the same for it (a histogram ``reference`` is used as it is); the map is lazy.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    reference : xarray.DataArray
        ``reference`` is a volume/stack (its dataset-wide histogram is used, masked by
        ``reference_mask``) or a histogram from :func:`volnorm.histogram` (a DataArray with a
        ``bin`` dim), e.g. a cohort's.
    dim : str, sequence of str or None
        Dims each source histogram is taken over: ``None`` = one map for the whole dataset;
        ``("z", "y", "x")`` = one map per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels make the source histograms (every voxel
        is mapped).
    reference_mask : xarray.DataArray of bool, optional
        Broadcastable to ``reference``; only ``True`` reference voxels count. Not used when
        ``reference`` is a histogram.

    Returns
    -------
    xarray.DataArray
        Lazy; float64 for integer and float64 data, float32 for float32/16 data; the reference's
        values and CDF in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> src = xr.DataArray(np.array([0, 0, 1, 2], dtype="uint8"), dims="x")
    >>> ref = xr.DataArray(np.array([10, 20, 20, 30], dtype="uint8"), dims="x")
    >>> vn.match_histogram(src, ref).values.tolist()   # as skimage.exposure.match_histograms
    [15.0, 15.0, 20.0, 30.0]
    """
    data = check_data(data)
    if "bin" in reference.dims:
        counts = reference.values.astype(np.float64).reshape(-1)
        if reference.ndim != 1:
            raise ValueError("a reference histogram must be one histogram (dims ('bin',))")
        occupied = counts > 0
        t_values = reference["bin"].values[occupied]
        t_q = np.cumsum(counts[occupied]) / counts.sum()
    else:
        tv, tq, _, _ = _cdf_table(reference, None, reference_mask)
        keep = np.diff(np.concatenate([[0.0], tq[0]])) > 0  # the occupied values
        t_values, t_q = tv[0][keep], tq[0][keep]
    s_values, s_q, s_edges, kept = _cdf_table(data, dim, mask)
    mapped = np.stack([np.interp(q, t_q, t_values) for q in s_q])  # per source value/bin, as scikit-image
    ft = float_dtype(data.dtype) if data.dtype.kind == "f" else np.dtype(np.float64)
    is_int = data.dtype.kind in "iub"
    lo = int(s_values[0][0]) if is_int else 0

    def apply(v: np.ndarray, mp: np.ndarray) -> np.ndarray:
        nb = mp.shape[1]
        if is_int:
            idx = v.astype(np.int64) - lo
        else:
            idx = np.searchsorted(s_edges, v, side="right") - 1
        return np.take_along_axis(mp, np.clip(idx, 0, nb - 1), axis=1)

    y = map_rows(data, kept, apply, [mapped], np.float64).astype(ft)
    params = Params("match_histogram", xr.Dataset({"reference_values": ("value", t_values), "reference_cdf": ("value", t_q)}), {"dim": reduced_names(data, dim)})
    return attach(y, data, params)


# ---------------------------------------------------------------------------
# adaptive equalization (CLAHE)
# ---------------------------------------------------------------------------


def equalize_adaptive(
    data: xr.DataArray,
    kernel_size: int | Sequence[int] | None = None,
    clip_limit: float = 0.01,
    nbins: int = 256,
    *,
    dim: Sequence[Hashable] = ("y", "x"),
) -> xr.DataArray:
    """Contrast-limited adaptive histogram equalization (CLAHE) of each plane (``dim=("y", "x")``)
    or each volume (``dim=("z", "y", "x")``), by ``skimage.exposure.equalize_adapthist``.

    Each plane/volume is kept whole in one chunk (rechunked if needed), so the tiles and their
    interpolation never meet a chunk border: the result equals scikit-image's everywhere and has
    no seams. Unsigned 8/16-bit data are passed as they are; signed integers and floats are first
    mapped linearly to [0, 1] over the plane's own finite range - scikit-image would clip
    negative values (``img_as_uint``) or refuse floats outside [-1, 1]. Like scikit-image,
    intensities are quantized to 14 bits inside. Computes at call time: nothing (each
    block equalizes its planes when computed); float output in [0, 1].

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data with the ``dim`` dims.
    kernel_size : int or sequence of int, optional
        Shape of the contextual regions (tiles), one size for all dims or one per dim, as
        scikit-image's ``kernel_size`` (default: 1/8 of each size).
    clip_limit : float
        Contrast clipping limit in [0, 1], normalized as in scikit-image (higher: more contrast).
    nbins : int
        Grey-level bins of each region's histogram.
    dim : sequence of str
        The 2 or 3 dims of each plane or volume that is equalized on its own.

    Returns
    -------
    xarray.DataArray
        Lazy, in [0, 1]: float32 for float32/16 input, float64 otherwise; the options in
        ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> from skimage import data, exposure
    >>> x = xr.DataArray(data.camera()[None], dims=("volume", "y", "x")).chunk({"y": 100})
    >>> bool(np.array_equal(vn.equalize_adaptive(x)[0].values, exposure.equalize_adapthist(data.camera())))
    True
    """
    from skimage import exposure  # on first use: not imported with volnorm

    data = check_data(data)
    dim = tuple(dim)
    missing = [d for d in dim if d not in data.dims]
    if missing or not 2 <= len(dim) <= 3:
        raise ValueError(f"`dim` must name 2 or 3 of the data's dims {data.dims!r}; got {dim!r}")
    if not (0 <= clip_limit <= 1):
        raise ValueError(f"`clip_limit` must be in [0, 1]; got {clip_limit!r}")
    x = data.transpose(..., *dim)
    xa = dask_data(x)
    nd = len(dim)
    xa = xa.rechunk({xa.ndim - k - 1: -1 for k in range(nd)})
    passthrough = data.dtype.kind == "u" and data.dtype.itemsize <= 2
    out_dtype = np.dtype(np.float32) if data.dtype in (np.float32, np.float16) else np.dtype(np.float64)

    def block(b: np.ndarray) -> np.ndarray:
        shape = b.shape[-nd:]
        parts = b.reshape((-1,) + shape)
        out = np.empty(parts.shape, dtype=out_dtype)
        for i, p in enumerate(parts):
            if not passthrough:
                p = p.astype(np.float64)
                finite = np.isfinite(p)
                lo, hi = (p[finite].min(), p[finite].max()) if finite.any() else (0.0, 0.0)
                p = np.where(finite, (p - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
            out[i] = exposure.equalize_adapthist(p, kernel_size=kernel_size, clip_limit=clip_limit, nbins=nbins)
        return out.reshape(b.shape)

    ya = da.map_blocks(block, xa, dtype=out_dtype, meta=np.empty((0,) * xa.ndim, dtype=out_dtype))
    y = xr.DataArray(ya, dims=x.dims, coords=x.coords).transpose(*data.dims)
    params = Params("equalize_adaptive", xr.Dataset(), {"kernel_size": kernel_size, "clip_limit": clip_limit, "nbins": nbins, "dim": list(map(str, dim))})
    return attach(y, data, params)

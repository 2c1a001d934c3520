"""The min and max of each row: :func:`ranges`, the one pass behind ``rescale``'s ``"minmax"``
window (re-exported by :mod:`volnorm.stats`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Sequence

import dask
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._dims import split
from volnorm._eager import in_memory_rows, reduce_rows
from volnorm._histogram import numba_ready, per_block, prepare

__all__ = ["ranges"]


def _block_ranges(xb: np.ndarray, mb: np.ndarray | None = None, *, nkept: int) -> np.ndarray:
    kshape = xb.shape[:nkept]
    rows = math.prod(kshape)
    xb = xb.view(np.uint8) if xb.dtype == np.bool_ else numba_ready(xb)
    x2 = np.ascontiguousarray(xb).reshape(rows, -1)
    m2 = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(rows, -1)
    out = np.empty((rows, 2), dtype=np.float64)
    if m2 is None and xb.dtype.kind in "iu" and x2.shape[1]:  # no NaN to leave out: numpy's SIMD reductions
        out[:, 0], out[:, 1] = x2.min(axis=1), x2.max(axis=1)
        return out.reshape(kshape + (1,) * (xb.ndim - nkept) + (2,))
    init = [np.inf, -np.inf] if xb.dtype.kind == "f" else [np.iinfo(xb.dtype).max, np.iinfo(xb.dtype).min]
    o = np.empty(2, dtype=xb.dtype)  # the data's dtype: the loop vectorizes
    for r in range(rows):
        o[:] = init
        _kernels.minmax(x2[r], o, None if m2 is None else m2[r])
        out[r] = o if o[0] <= o[1] else (np.inf, -np.inf)  # no valid voxel in the row
    return out.reshape(kshape + (1,) * (xb.ndim - nkept) + (2,))


def _merge_ranges(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.stack([np.minimum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])], axis=1)


def ranges(
    data: xr.DataArray, *, dim: Hashable | Sequence[Hashable] | None = None, mask: xr.DataArray | None = None
) -> xr.Dataset:
    """The min and max over ``dim`` of the (masked) finite voxels, in one vectorized pass
    (about 20x faster than :func:`summarize`'s moments, which also sum).

    Parameters
    ----------
    data : xarray.DataArray
        Numpy or dask backed.
    dim : str, sequence of str or None
        Dims reduced (``None``: all).
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels count.

    Returns
    -------
    xarray.Dataset
        ``min`` and ``max`` (float64, as :func:`summarize`'s) over the kept dims; NaN where no
        voxel is valid.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> r = ranges(xr.DataArray(np.array([[1, 5], [-2, 0]], dtype="int16"), dims=("volume", "x")), dim="x")
    >>> r["min"].values.tolist(), r["max"].values.tolist()
    ([1.0, -2.0], [5.0, 0.0])
    """
    kept, reduced = split(data, dim)
    nk = len(kept)
    at_once = in_memory_rows(data, kept, reduced, mask)
    if at_once is not None:  # in memory: a share per thread, no graph
        x, v, m = at_once
        kshape = tuple(x.sizes[d] for d in kept)
        r = reduce_rows(lambda a, b: _block_ranges(a, b, nkept=1), v, m, (np.inf, -np.inf), _merge_ranges)
        lo, hi = r[:, 0].reshape(kshape), r[:, 1].reshape(kshape)
    else:
        x, args = prepare(data, kept, reduced, mask)
        lazy = per_block(functools.partial(_block_ranges, nkept=nk), args, nk, 2, np.float64, token="ranges")
        parts = np.asarray(dask.compute(lazy)[0])  # one row per block: reduced here, not by a graph
        red = tuple(range(nk, parts.ndim - 1))
        lo, hi = parts[..., 0].min(axis=red), parts[..., 1].max(axis=red)
    none = lo > hi
    coords = {c: v for c, v in x.coords.items() if set(v.dims) <= set(kept)}
    return xr.Dataset({"min": (kept, np.where(none, np.nan, lo)), "max": (kept, np.where(none, np.nan, hi))}, coords=coords)

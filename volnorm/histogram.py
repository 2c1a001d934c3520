"""Exact, mergeable histograms over any ``dim`` of a stack (the statistics engine).

One map over the chunks (a GIL-free numba kernel per chunk) followed by a
dask tree reduction over the reduced dims: the histogram of the whole is the
sum of the histograms of its parts, whatever the chunking. NaN, ±Inf,
out-of-range and masked-out voxels are counted apart (coords ``n_nan``,
``n_posinf``, ``n_neginf``, ``n_below``, ``n_above``, ``n_masked_out``), never
dropped silently nor folded into the edge bins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels

logger = logging.getLogger(__name__)

_range = range  # `histogram` takes numpy's `range=` keyword, which hides the builtin

#: Integer data wider than this many distinct values need ``bins=`` (memory of the result).
MAX_INT_BINS = 2**20


def _dims(data: xr.DataArray, dim: Hashable | Sequence[Hashable] | None) -> tuple[tuple, tuple]:
    if dim is None:
        reduced = tuple(data.dims)
    elif isinstance(dim, str) or not isinstance(dim, Sequence):
        reduced = (dim,)
    else:
        reduced = tuple(dim)
    unknown = [d for d in reduced if d not in data.dims]
    if unknown:
        raise ValueError(f"`dim` names {unknown!r}, which the data do not have; its dims are {data.dims!r}.")
    if not reduced:
        raise ValueError("`dim` must name at least one dim (or be None for the whole dataset).")
    kept = tuple(d for d in data.dims if d not in reduced)
    return kept, reduced


def _block_hist(x: np.ndarray, m: np.ndarray | None, *, nkept: int, kind: str, lo: int, edges: np.ndarray, nbins: int) -> np.ndarray:
    kshape = x.shape[:nkept]
    rows = math.prod(kshape)
    x2 = np.ascontiguousarray(x).reshape(rows, -1)
    m2 = None if m is None else np.ascontiguousarray(m, dtype=np.bool_).reshape(rows, -1)
    out = np.zeros((rows, nbins + _kernels.NEXTRA), dtype=np.int64)
    if kind == "int":
        _kernels.hist_int(x2, lo, nbins, out, m2)
    else:
        _kernels.hist_float(x2, edges, out, m2)
    return out.reshape(kshape + (1,) * (x.ndim - nkept) + (nbins + _kernels.NEXTRA,))


def _block_minmax(x: np.ndarray) -> np.ndarray:
    out = np.empty(2, dtype=np.float64)
    _kernels.minmax_float(np.ascontiguousarray(x).reshape(-1), out)
    return out.reshape((1,) * x.ndim + (2,))


def value_range(data: xr.DataArray) -> tuple[float, float]:
    """NaN/Inf-ignoring (min, max) over all of ``data``. Computes: one pass.

    Raises ``ValueError`` when no voxel is finite.

    >>> import xarray as xr, numpy as np
    >>> value_range(xr.DataArray(np.array([np.nan, 2.0, -1.0, np.inf])))
    (-1.0, 2.0)
    """
    x = data.data if isinstance(data.data, da.Array) else da.from_array(np.asarray(data.data))
    if x.dtype.kind in "iub":
        lo, hi = dask.compute(x.min(), x.max())
        return float(lo), float(hi)
    ind = tuple(range(x.ndim))
    parts = da.blockwise(
        _block_minmax, ind + (x.ndim,), x, ind, new_axes={x.ndim: 2},
        adjust_chunks={i: 1 for i in ind}, dtype=np.float64, meta=np.empty((0,) * (x.ndim + 1)),
    )
    mm = parts.reshape(-1, 2)
    lo, hi = dask.compute(mm[:, 0].min(), mm[:, 1].max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("the data hold no finite value (all NaN or ±Inf): there is no range to histogram")
    return float(lo), float(hi)


def prepare(
    data: xr.DataArray, kept: tuple, reduced: tuple, mask: xr.DataArray | None
) -> tuple[xr.DataArray, list[da.Array]]:
    """Transpose to (kept..., reduced...), check and align the mask; dask arrays with unified chunks."""
    x = data.transpose(*kept, *reduced)
    xa = x.data if isinstance(x.data, da.Array) else da.from_array(np.asarray(x.data), chunks=-1)
    if mask is None:
        return x, [xa]
    if not isinstance(mask, xr.DataArray):
        raise TypeError(f"`mask` must be a boolean xarray.DataArray; got {type(mask).__name__}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`mask` must be boolean; got dtype {mask.dtype}")
    extra = [d for d in mask.dims if d not in data.dims]
    if extra:
        raise ValueError(f"`mask` has dims {extra!r} that the data do not have (data dims {data.dims!r})")
    for d in mask.dims:
        if mask.sizes[d] != data.sizes[d]:
            raise ValueError(f"`mask` has {mask.sizes[d]} along {d!r} but the data have {data.sizes[d]}")
    m = mask.broadcast_like(x).transpose(*x.dims)
    ma = m.data if isinstance(m.data, da.Array) else da.from_array(np.asarray(m.data))
    _, (xa, ma) = da.core.unify_chunks(xa, tuple(range(xa.ndim)), ma, tuple(range(ma.ndim)))
    return x, [xa, ma]


def per_block(func: Any, args: list[da.Array], nkept: int, width: int, dtype: Any, token: Any) -> da.Array:
    """Map ``func(x_block[, mask_block])`` over the chunks; each result keeps the kept axes,
    shrinks every reduced axis to 1 and adds a last axis of ``width`` (one GIL-free call per chunk)."""
    ndim = args[0].ndim
    ind = tuple(range(ndim))
    pairs: list[Any] = []
    for a in args:
        pairs += [a, ind]
    return da.blockwise(
        func, ind + (ndim,), *pairs,
        new_axes={ndim: width},
        adjust_chunks={i: 1 for i in ind[nkept:]},
        dtype=dtype,
        meta=np.empty((0,) * (ndim + 1), dtype=dtype),
        name=f"{getattr(func, '__name__', 'block')}-{dask.base.tokenize(*args, nkept, width, token)}",
    )


def histogram(
    data: xr.DataArray,
    *,
    bins: int | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | None = None,
) -> xr.DataArray:
    """Histogram ``data`` over ``dim``, exactly and lazily.

    Parameters
    ----------
    data : xarray.DataArray
        A stack ``("volume", ...)`` or any labelled array (numpy or dask backed).
    bins : int, optional
        Number of equal bins. Default: integer data get one bin per integer
        value (exact); float data get 256 bins.
    range : (lo, hi), optional
        Bin range (inclusive). Default: the data's own range, found with one
        NaN-aware pass (the only eager part; pass ``range=`` to skip it).
        8-bit integers default to their whole dtype range without a pass.
    dim : str, sequence of str or None
        Dims the histogram is computed **over**: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one histogram per volume; ``("y", "x")`` = per slice.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are counted.

    Returns
    -------
    xarray.DataArray
        Lazy int64 counts named ``histogram`` with the kept dims plus ``bin``;
        coords ``bin`` (centre), ``bin_lower``, ``bin_upper``, and the counts
        outside the bins ``n_nan``, ``n_posinf``, ``n_neginf``, ``n_below``,
        ``n_above``, ``n_masked_out`` over the kept dims. Computes: at most one
        range pass (none with ``range=`` or 8-bit data).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[0, 1, 1], [2, 2, 2]], dtype="uint8"), dims=("volume", "x"))
    >>> h = vn.histogram(x, dim="x")
    >>> h.sel(bin=[0, 1, 2]).values.tolist()
    [[1, 2, 0], [0, 0, 3]]
    """
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"`data` must be an xarray.DataArray; got {type(data).__name__}")
    if bins is not None and (not isinstance(bins, (int, np.integer)) or bins <= 0):
        raise ValueError(f"`bins` must be a positive int; got {bins!r}.")
    if range is not None:
        lo_r, hi_r = (float(v) for v in range)
        if not (math.isfinite(lo_r) and math.isfinite(hi_r)) or lo_r >= hi_r:
            raise ValueError(f"`range` must be finite (lo, hi) with lo < hi; got {range!r}.")
    kind_char = data.dtype.kind
    if kind_char not in "iufb":
        raise TypeError(f"cannot histogram dtype {data.dtype}")
    kept, reduced = _dims(data, dim)

    # bins
    if kind_char in "iub" and bins is None:
        if range is not None:
            lo, hi = math.ceil(lo_r), math.floor(hi_r)
        elif data.dtype.itemsize == 1 or kind_char == "b":
            info = np.iinfo(np.uint8 if kind_char == "b" else data.dtype)
            lo, hi = int(info.min), int(info.max)
        else:
            lo, hi = (int(v) for v in value_range(data))
        nbins = hi - lo + 1
        if nbins > MAX_INT_BINS:
            raise ValueError(
                f"the integer data span {nbins} values ({lo}..{hi}); pass bins= (and range=) for fewer bins"
            )
        kind = "int"
        centers = np.arange(lo, hi + 1, dtype=np.float64)
        lower, upper = centers - 0.5, centers + 0.5
        edges = np.empty(0)
    else:
        nbins = int(bins) if bins is not None else 256
        if range is not None:
            flo, fhi = lo_r, hi_r
        else:
            flo, fhi = value_range(data)
            if flo == fhi:  # np.histogram's rule for a constant image
                flo, fhi = flo - 0.5, fhi + 0.5
        edges = np.linspace(flo, fhi, nbins + 1)
        kind, lo = "float", 0
        lower, upper = edges[:-1], edges[1:]
        centers = (lower + upper) / 2

    x, args = prepare(data, kept, reduced, mask)
    nk = len(kept)

    def block(xb: np.ndarray, mb: np.ndarray | None = None) -> np.ndarray:
        return _block_hist(xb, mb, nkept=nk, kind=kind, lo=lo, edges=edges, nbins=nbins)

    parts = per_block(block, args, nk, nbins + _kernels.NEXTRA, np.int64, token=(kind, lo, edges, nbins))
    xa = args[0]
    total = parts.sum(axis=tuple(_range(nk, xa.ndim)), dtype=np.int64)  # the tree reduction
    counts = total[..., :nbins]
    coords: dict[Hashable, Any] = {k: v for k, v in x.coords.items() if set(v.dims) <= set(kept)}
    coords.update(
        bin=("bin", centers), bin_lower=("bin", lower), bin_upper=("bin", upper),
    )
    for i, name in enumerate(_kernels.EXTRA):
        coords[f"n_{name}"] = (kept, total[..., nbins + i])
    return xr.DataArray(counts, dims=(*kept, "bin"), coords=coords, name="histogram")

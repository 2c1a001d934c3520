"""Quantiles from histograms: exact for integer data, exact after one refinement pass for floats."""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._dims import split
from volnorm._eager import in_memory_dask
from volnorm._histogram import (
    add_up,
    bin_spec,
    histogram,
    numba_ready,
    over_collection,
    parts_of,
    per_block,
    prepare,
    rows_of,
    totals,
)
from volnorm._minmax import ranges
from volnorm._utils import no_valid_voxels
from volnorm.engine import compute_small

__all__ = ["Summary", "order_statistics", "quantile", "ranges", "summarize", "summary_graph"]

#: Bins of the first (float) pass; the refinement then reads only the values in 1-2 bins.
FLOAT_BINS = 4096


def _groups(counts: np.ndarray, ninf_lo: np.ndarray, ninf_hi: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """For each row, which group holds each 0-based rank: 0 = -inf, 1..nbins = bin i-1, nbins+1 = +inf."""
    out = np.empty(ranks.shape, dtype=np.int64)
    for r in range(counts.shape[0]):
        cum = np.cumsum(np.concatenate([[ninf_lo[r]], counts[r], [ninf_hi[r]]]))
        out[r] = np.searchsorted(cum, ranks[r], side="right")
    return out


def quantile(
    data: xr.DataArray | xr.DataTree,
    q: float | Sequence[float],
    *,
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | xr.DataTree | None = None,
    exact: bool = True,
) -> xr.DataArray:
    """Quantiles over ``dim``, equal to ``numpy.nanquantile`` (linear interpolation).

    Integer data: exact from one histogram with a bin per value, reduced to
    the quantiles block by block of the kept dims (only the quantiles of each
    index come back, not its histogram). Float data:
    a histogram of the values' order-preserving bit patterns (2**16 bins per
    index of the kept dims, no range pass) finds, for each requested rank, the
    bin that holds it; one more pass keeps only the voxels inside those bins
    and sorts them, so the result is exact. Past ``KEY_ROWS_CELLS`` (more than
    128 indices of the kept dims) a range pass and 4096 common bins take the
    first role. ``exact=False`` skips the second pass: each value is then the
    centre of its 4096-bin histogram bin and ``attrs["max_error"]`` states the
    bound (one bin width; 0 when exact).

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
    q : float or sequence of float
        In [0, 1].
    dim : str, sequence of str or None
        The dims the quantiles are computed over, as in :func:`volnorm.histogram`.
    mask : xarray.DataArray of bool, optional
        As in :func:`volnorm.histogram`. NaN and masked-out voxels are ignored;
        ±Inf are ranked, as numpy does. One difference: where a quantile
        falls exactly on an infinite value (no interpolation needed), volnorm
        returns it, while numpy's interpolation computes ``inf * 0`` and
        returns NaN (``[1, 2, inf]`` at 0.5: volnorm 2.0, numpy NaN).
    exact : bool
        Float data only: run the refinement pass (default).

    Returns
    -------
    xarray.DataArray
        float64 with dim ``quantile`` (when ``q`` is a sequence) plus the kept
        dims. Computes: two passes for float data (three past
        ``KEY_ROWS_CELLS``: range, histogram, refinement), one for 8/16-bit
        integers, two for wider ones (range, histogram).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(11, dtype="int16"), dims="x")
    >>> float(vn.quantile(x, 0.25))
    2.5
    """
    return _quantile(data, q, dim=dim, mask=mask, exact=exact)


def _quantile(data, q, *, dim, mask, exact, known_range: tuple[float, float] | None = None) -> xr.DataArray:
    """:func:`quantile`; ``known_range`` (the finite min/max of the masked voxels, e.g. from
    :func:`summarize`'s moments pass) spares the float range pass."""
    qs = _checked_q(q)
    if isinstance(data, xr.DataTree):
        if dim is not None:
            return over_collection(quantile, data, dim, mask, q=q, exact=exact)
        dtype = np.result_type(*(p[1].dtype for p in parts_of(data, mask)))
    else:
        dtype = data.dtype
    is_int = dtype.kind in "iub"
    if is_int and isinstance(data, xr.DataArray):
        return _finish_int(*int_quantile_lazy(data, qs, dim=dim, mask=mask, known_range=known_range), qs, q)
    if not is_int and exact and (dim is None or (isinstance(data, xr.DataArray) and set(split(data, dim)[1]) == set(data.dims))):
        return _float_quantile_rows([(img, m) for _, img, m in parts_of(data, mask)], (), (), qs, q)
    if not is_int and exact and isinstance(data, xr.DataArray):
        kept, reduced = split(data, dim)
        kshape = tuple(data.sizes[d] for d in kept)
        if math.prod(kshape) * 2**KEY_BITS <= KEY_ROWS_CELLS:  # two passes, no range pass
            return _float_quantile_rows([(data.transpose(*kept, *reduced), mask)], kept, kshape, qs, q)
    rng = None if (is_int or known_range is None or known_range[0] >= known_range[1]) else known_range
    for nbins in (None,) if is_int else (FLOAT_BINS, 64, 1):
        try:
            h = histogram(data, bins=nbins, range=rng, dim=dim, mask=mask)
            break
        except ValueError as e:  # a range a few float steps wide: fewer bins (the pick is exact anyway)
            if "do not fit" not in str(e) or nbins == 1:
                raise
    kept = h.dims[:-1]
    h = h.compute()
    counts = h.values.reshape(-1, h.sizes["bin"])
    lo_inf = h["n_neginf"].values.reshape(-1)
    hi_inf = h["n_posinf"].values.reshape(-1)
    n = counts.sum(axis=1) + lo_inf + hi_inf
    if np.any(n == 0):
        raise no_valid_voxels("to take a quantile of", some=bool(kept))
    # numpy's method="linear": the same floating-point steps, so results agree bit for bit
    nn = n[:, None].astype(np.float64)
    pos = (nn - 1) * qs[None, :]
    r_lo = np.floor(pos).astype(np.int64)
    r_hi = np.minimum(r_lo + 1, n[:, None] - 1)
    frac = pos - r_lo
    b_lo = _groups(counts, lo_inf, hi_inf, r_lo)
    b_hi = _groups(counts, lo_inf, hi_inf, r_hi)
    nb = counts.shape[1]
    centers = h["bin"].values
    width = float(h["bin_upper"].values[0] - h["bin_lower"].values[0])

    def value(b: np.ndarray) -> np.ndarray:
        v = np.where(b <= 0, -np.inf, np.where(b >= nb + 1, np.inf, centers[np.clip(b - 1, 0, nb - 1)]))
        return v

    max_error = 0.0
    if is_int:
        v_lo, v_hi = value(b_lo), value(b_hi)
    elif exact:
        parts = [(img.transpose(*kept, ...), m) for _, img, m in parts_of(data, mask)]
        both = _refine(parts, h, len(kept), np.concatenate([b_lo, b_hi], axis=1), np.concatenate([r_lo, r_hi], axis=1))
        v_lo, v_hi = both[:, : len(qs)], both[:, len(qs) :]
    else:
        v_lo, v_hi = value(b_lo), value(b_hi)
        max_error = width
    out = _lerp(v_lo, v_hi, frac)
    shape = tuple(h.sizes[d] for d in kept)
    out = out.reshape(shape + (len(qs),))
    coords = {k: v for k, v in h.coords.items() if set(v.dims) <= set(kept) and not k.startswith("n_")}
    res = xr.DataArray(out, dims=(*kept, "quantile"), coords={**coords, "quantile": qs}, name="quantile")
    res.attrs["max_error"] = max_error
    return res if np.ndim(q) else res.isel(quantile=0, drop=True).assign_attrs(res.attrs)


def _checked_q(q: Any) -> np.ndarray:
    """``q`` as a 1-D float64 array, each in [0, 1]."""
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if qs.ndim != 1 or qs.size == 0 or np.any(~np.isfinite(qs)) or np.any((qs < 0) | (qs > 1)):
        raise ValueError(f"`q` must be in [0, 1]; got {q!r}. (Percentiles 0-100? divide by 100.)")
    return qs


#: The columns :func:`int_quantile_lazy` adds with ``moments=True``, after the count.
HIST_MOMENTS = ("mean", "m2", "min", "max")


def _hist_moments(flat: np.ndarray, n: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``(rows, 4)``: the mean, M2, min and max of each row of bin ``counts`` whose bins hold
    ``values`` (one integer each): the sum exact in float64 (below 2**53), then one division;
    M2 summed over the bins, not the voxels. NaN for an empty row."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c = flat.astype(np.float64)
        mean = (c @ values) / n
        m2 = np.einsum("rb,rb->r", c, (values[None, :] - mean[:, None]) ** 2)
        nz = flat > 0
        first, last = nz.argmax(axis=1), flat.shape[1] - 1 - nz[:, ::-1].argmax(axis=1)
        out = np.stack([mean, m2, values[first], values[last]], axis=1)
    out[n == 0] = np.nan
    return out


def int_quantile_lazy(
    data: xr.DataArray, qs: np.ndarray, *, dim: Any, mask: Any, known_range: tuple[float, float] | None = None,
    moments: bool = False,
) -> tuple[da.Array, tuple, dict]:
    """Integer data: the lazy ``(*kept, len(qs) + 1)`` quantiles (the last column: the voxel count)
    and the kept dims and coords. One histogram pass with a bin per value; each block of kept
    rows is reduced to its quantiles where it was counted, so only ``len(qs) + 1`` numbers per
    row come back (a 16-bit histogram is 0.5 MiB per row). No range pass for 8/16-bit data or
    with ``known_range``. ``moments=True`` adds the columns :data:`HIST_MOMENTS` from the same
    counts (:func:`_hist_moments`): no moments pass."""
    kept, reduced = split(data, dim)
    dtype = data.dtype
    if known_range is not None:
        rng: tuple[float, float] | None = (math.floor(known_range[0]) - 0.5, math.ceil(known_range[1]) + 0.5)
    elif dtype.kind == "b" or dtype.itemsize <= 2:
        info = np.iinfo(np.uint8 if dtype.kind == "b" else dtype)
        rng = (info.min - 0.5, info.max + 0.5)
    else:
        rng = None  # bin_spec's range pass
    spec = bin_spec(data, dtype, None, rng, mask)
    x, counts, _ = totals(data, spec, kept, reduced, mask, None)
    nq, lo, nbins = len(qs), spec.lo, spec.nbins

    def rows(c: np.ndarray) -> np.ndarray:
        flat = c.reshape(-1, c.shape[-1])
        n = flat.sum(axis=1)
        pos = (np.maximum(n, 1)[:, None].astype(np.float64) - 1) * qs[None, :]  # numpy's method="linear"
        r_lo = np.floor(pos).astype(np.int64)
        r_hi = np.minimum(r_lo + 1, np.maximum(n, 1)[:, None] - 1)
        zero = np.zeros(len(flat), dtype=flat.dtype)
        b = _groups(flat, zero, zero, np.concatenate([r_lo, r_hi], axis=1))
        v = (lo + np.clip(b - 1, 0, nbins - 1)).astype(np.float64)  # the bins' values (not spec.centers: see BinSpec.kernel)
        cols = [_lerp(v[:, :nq], v[:, nq:], pos - r_lo), n[:, None].astype(np.float64)]
        if moments:
            cols.append(_hist_moments(flat, n, np.arange(lo, lo + nbins, dtype=np.float64)))
        out = np.concatenate(cols, axis=1)
        return out.reshape(c.shape[:-1] + (out.shape[1],))

    width = nq + 1 + (len(HIST_MOMENTS) if moments else 0)
    if isinstance(counts, np.ndarray):  # in-memory data, counted at once
        lazy = in_memory_dask(rows(counts))
    else:
        lazy = counts.map_blocks(rows, chunks=counts.chunks[:-1] + ((width,),), dtype=np.float64)
    coords = {k: v for k, v in x.coords.items() if set(v.dims) <= set(kept)}
    return lazy, kept, coords


def _finish_int(lazy: da.Array, kept: tuple, coords: dict, qs: np.ndarray, q: Any, computed: np.ndarray | None = None) -> xr.DataArray:
    """:func:`int_quantile_lazy`'s result (``computed`` when it was computed with other work)."""
    vals = np.asarray(lazy.compute() if computed is None else computed)
    nq = len(qs)
    if np.any(vals[..., nq] == 0):
        raise no_valid_voxels("to take a quantile of", some=bool(kept))
    res = xr.DataArray(vals[..., :nq], dims=(*kept, "quantile"), coords={**coords, "quantile": qs}, name="quantile", attrs={"max_error": 0.0})
    return res if np.ndim(q) else res.isel(quantile=0, drop=True).assign_attrs(res.attrs)


def _lerp(v_lo: np.ndarray, v_hi: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """numpy's linear interpolation (method="linear"), the same floating-point steps."""
    with np.errstate(invalid="ignore"):
        diff = v_hi - v_lo
        out = np.where(frac >= 0.5, v_hi - diff * (1 - frac), v_lo + diff * frac)
        return np.where(frac == 0, v_lo, out)


def _float_quantile_rows(parts, kept: tuple, kshape: tuple, qs: np.ndarray, q) -> xr.DataArray:
    """Float quantiles per index of the kept dims (none: over everything) in two passes
    (per-row key histograms, pick), no range pass; ``parts`` as for :func:`_key_order_stats`."""
    k = len(qs)
    frac_holder: list[np.ndarray] = []

    def ranks(n: np.ndarray) -> np.ndarray:
        if np.any(n == 0):
            raise no_valid_voxels("to take a quantile of", some=bool(kept))
        pos = (n[:, None].astype(np.float64) - 1) * qs[None, :]  # numpy's method="linear"
        r_lo = np.floor(pos).astype(np.int64)
        frac_holder.append(pos - r_lo)
        return np.concatenate([r_lo, np.minimum(r_lo + 1, n[:, None] - 1)], axis=1)

    v = _key_order_stats(parts, len(kept), kshape, ranks)
    out = _lerp(v[:, :k], v[:, k:], frac_holder[0]).reshape(kshape + (k,))
    coords = {c: val for c, val in parts[0][0].coords.items() if set(val.dims) <= set(kept)} if kept else {}
    res = xr.DataArray(out, dims=(*kept, "quantile"), coords={**coords, "quantile": qs}, name="quantile", attrs={"max_error": 0.0})
    return res if np.ndim(q) else res.isel(quantile=0, drop=True).assign_attrs(res.attrs)


def order_statistics(
    data: xr.DataArray | xr.DataTree,
    ranks: Sequence[int] | Callable[[int], int | Sequence[int]],
    *,
    mask: xr.DataArray | xr.DataTree | None = None,
) -> np.ndarray:
    """The exact values at 0-based ``ranks`` of the sorted valid voxels (NaN and masked-out
    left out, ±Inf ranked), over the whole dataset, out of core.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack, any labelled array (numpy or dask backed), or a collection; the ranks are over
        all of it.
    ranks : sequence of int or callable
        0-based ranks in ``[0, n)`` of the ``n`` valid voxels. ``ranks`` may be a function of
        the number of valid voxels ``n`` (known only after the histogram pass), e.g.
        ``lambda n: n // 2``, giving one rank or a sequence.
    mask : xarray.DataArray of bool (DataTree for a collection), optional
        Broadcastable to ``data``; only ``True`` voxels are ranked.

    Returns
    -------
    numpy.ndarray
        float64, one value per rank in the order given (``-inf``/``inf`` at ranks held by
        infinite voxels). Computes: the integer histogram's passes, or for float data two
        passes (a histogram of the values' bit patterns, then the voxels of the bins holding
        the ranks).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> x = xr.DataArray(np.array([5.5, np.nan, -1.0, 3.25]), dims="x")
    >>> order_statistics(x, [0, 2]).tolist()
    [-1.0, 5.5]
    """
    dtype = np.result_type(*(p[1].dtype for p in parts_of(data, mask)))
    is_int = dtype.kind in "iub"
    if not is_int:
        return _float_order_stats(data, mask, ranks)
    h = histogram(data, mask=mask).compute()
    counts = h.values.reshape(1, -1)
    lo_inf, hi_inf = h["n_neginf"].values.reshape(-1), h["n_posinf"].values.reshape(-1)
    n = int(counts.sum() + lo_inf[0] + hi_inf[0])
    if n == 0:
        raise no_valid_voxels()
    r = np.atleast_1d(np.asarray(ranks(n) if callable(ranks) else ranks, dtype=np.int64)).reshape(1, -1)
    if np.any((r < 0) | (r >= n)):
        raise ValueError(f"ranks must be in [0, {n}); got {r.ravel().tolist()}")
    b = _groups(counts, lo_inf, hi_inf, r)
    centers = h["bin"].values
    nb = len(centers)
    return np.where(b <= 0, -np.inf, np.where(b >= nb + 1, np.inf, centers[np.clip(b - 1, 0, nb - 1)]))[0]


def _block_pick(xb: np.ndarray, mb: np.ndarray | None, *, nkept: int, ilo: np.ndarray, ihi: np.ndarray):
    xb = numba_ready(xb)
    rows = math.prod(xb.shape[:nkept])
    x2 = np.ascontiguousarray(xb).reshape(rows, -1)
    m2 = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(rows, -1)
    at_lo = np.zeros(ilo.shape, dtype=np.int64)
    vals, which, rws = _kernels.pick_bins(x2, ilo, ihi, at_lo, m2)
    return vals, which, rws, at_lo


def _pick(parts, nkept: int, kshape: tuple, ilo: np.ndarray, ihi: np.ndarray):
    """One pass keeping the voxels inside per-row intervals ``[ilo, ihi)`` (rows, k): returns
    ``(values sorted by (row, interval, value), their row * k + interval keys, at_lo counts)``."""
    nrows, width = ilo.shape
    picks = []
    for img, m in parts:
        kept, reduced = img.dims[:nkept], img.dims[nkept:]
        _, args = prepare(img, kept, reduced, m)
        xa = args[0]
        offsets = [np.concatenate([[0], np.cumsum(c)]) for c in xa.chunks[:nkept]]
        blocks = [a.to_delayed() for a in args]
        for bi in np.ndindex(*xa.numblocks):
            gl_rows = rows_of([(offsets[d][bi[d]], offsets[d][bi[d] + 1]) for d in range(nkept)], kshape)
            if not np.isfinite(ilo[gl_rows]).any():
                continue
            mb = blocks[1][bi] if len(blocks) > 1 else None
            task = dask.delayed(_block_pick)(blocks[0][bi], mb, nkept=nkept, ilo=ilo[gl_rows], ihi=ihi[gl_rows])
            picks.append((gl_rows, task))
    found = dask.compute(*[p[1] for p in picks])
    at_lo = np.zeros((nrows, width), dtype=np.int64)
    for (g, _), f in zip(picks, found):
        np.add.at(at_lo, g, f[3])
    if not found:
        return np.empty(0), np.empty(0, np.int64), at_lo
    allv = np.concatenate([f[0] for f in found])
    rows = np.concatenate([g[f[2]] for (g, _), f in zip(picks, found)])
    key = rows * width + np.concatenate([f[1] for f in found])
    order = np.lexsort((allv, key))
    return allv[order], key[order], at_lo


def _lookup(allv, key, at_lo, ilo, row: int, k: int, offset: int) -> float:
    """The ``offset``-th smallest voxel of interval ``k`` of ``row`` (its ``at_lo`` copies of the
    lower bound first)."""
    n_at = at_lo[row, k]
    if offset < n_at:
        return float(ilo[row, k])
    start = np.searchsorted(key, row * ilo.shape[1] + k, side="left")
    return float(allv[start + offset - n_at])


def _intervals(wanted: list[np.ndarray], lower: np.ndarray, upper: np.ndarray):
    """Per row, the wanted bins as padded interval arrays ``(ilo, ihi, index of the bin)``."""
    nrows = len(wanted)
    width = max(1, max(len(w) for w in wanted))
    ilo = np.full((nrows, width), np.inf)
    ihi = np.full((nrows, width), -np.inf)
    wbin = np.full((nrows, width), -1, dtype=np.int64)
    for row, w in enumerate(wanted):
        ilo[row, : len(w)], ihi[row, : len(w)], wbin[row, : len(w)] = lower[w], upper[w], w
    return ilo, ihi, wbin


def _refine(parts, h: xr.DataArray, nkept: int, b: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Exact float values at 0-based ranks ``r`` (rows, k) that fall in groups ``b`` (see
    :func:`_groups`) of the uniform histogram ``h``: one GIL-free pass keeps only the voxels
    inside the few bins that hold them (per row), then sorts those."""
    lower, upper = h["bin_lower"].values, h["bin_upper"].values.copy()
    upper[-1] = np.nextafter(upper[-1], np.inf)  # the last bin is closed
    counts = h.values.reshape(-1, h.sizes["bin"])
    nrows, nb = counts.shape
    nlo = h["n_neginf"].values.reshape(-1)
    inside = (b >= 1) & (b <= nb)
    wanted = [np.unique(b[row][inside[row]]) - 1 for row in range(nrows)]
    ilo, ihi, wbin = _intervals(wanted, lower, upper)
    allv, key, at_lo = _pick(parts, nkept, tuple(h.shape[:nkept]), ilo, ihi)
    cum_before = np.concatenate([nlo[:, None], nlo[:, None] + np.cumsum(counts, axis=1)], axis=1)
    out = np.where(b <= 0, -np.inf, np.inf)
    for row, col in zip(*np.nonzero(inside)):
        bb = b[row, col] - 1
        k = int(np.flatnonzero(wbin[row] == bb)[0])
        out[row, col] = _lookup(allv, key, at_lo, ilo, row, k, int(r[row, col] - cum_before[row, bb]))
    return out


#: Key bits kept by the range-free float histogram of dataset-wide quantiles: 2**16 bins (512 KiB
#: of counts, cache-resident; 2**20 ran 1.5x slower), each 2**-7 (float32) or 2**-4 (float64) of
#: its values' magnitude wide; repeated values cost nothing in the pick (counted, not stored).
KEY_BITS = 16


def _block_keys(xb: np.ndarray, mb: np.ndarray | None = None, *, nkept: int, ft: np.dtype) -> np.ndarray:
    kshape = xb.shape[:nkept]
    rows = math.prod(kshape)
    xb = numba_ready(xb).astype(ft, copy=False)  # one key space for every part
    x = np.ascontiguousarray(xb).reshape(rows, -1)
    ut = np.uint32 if x.dtype.itemsize == 4 else np.uint64
    out = np.zeros((rows, 2**KEY_BITS + 4), dtype=np.int64)
    m = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(rows, -1)
    _kernels.key_hist(x.view(ut), x, 8 * x.itemsize - KEY_BITS, out, m)
    return out.reshape(kshape + (1,) * (xb.ndim - nkept) + (out.shape[1],))


def _key_values(keys: np.ndarray, itemsize: int) -> np.ndarray:
    """The float value whose order-preserving key is ``keys`` (NaN patterns become ∓inf)."""
    ut, ft = (np.uint32, np.float32) if itemsize == 4 else (np.uint64, np.float64)
    top = ut(1) << ut(8 * itemsize - 1)
    k = keys.astype(ut)
    u = np.where(k & top, k & ~top, ~k).astype(ut)
    v = u.view(ft).astype(np.float64)
    return np.where(np.isnan(v), np.where(k & top, np.inf, -np.inf), v)


#: Per-row key histograms (rows x 2**KEY_BITS counts) are used up to this many cells; beyond,
#: per-row float quantiles take a range pass and 4096 common bins (less memory, one more pass).
KEY_ROWS_CELLS = 2**23


def _float_order_stats(data, mask, ranks) -> np.ndarray:
    """Exact order statistics of float data over everything (see :func:`_key_order_stats`)."""
    parts = [(img, m) for _, img, m in parts_of(data, mask)]

    def row_ranks(n: np.ndarray) -> np.ndarray:
        if n[0] == 0:
            raise no_valid_voxels()
        r = np.atleast_1d(np.asarray(ranks(int(n[0])) if callable(ranks) else ranks, dtype=np.int64))
        if np.any((r < 0) | (r >= n[0])):
            raise ValueError(f"ranks must be in [0, {n[0]}); got {r.tolist()}")
        return r[None]

    return _key_order_stats(parts, 0, (), row_ranks)[0]


def _key_order_stats(parts, nkept: int, kshape: tuple, ranks: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exact order statistics of float data, per row of the first ``nkept`` dims of each
    ``(image, mask)`` in ``parts`` (images transposed kept dims first; ``kshape`` their sizes):
    a range-free key histogram per row (one pass), then one pass picking the voxels of the key
    bins that hold the ranks (one table look-up per voxel). ``ranks(n)`` maps the valid voxels
    per row ``(rows,)`` to 0-based ranks ``(rows, k)``. Returns ``(rows, k)``."""
    itemsize = max(4, max(img.dtype.itemsize for img, _ in parts))
    ft = np.dtype(np.float32 if itemsize == 4 else np.float64)
    nrows = math.prod(kshape)
    lazy = []
    for img, m in parts:
        _, args = prepare(img, tuple(img.dims[:nkept]), tuple(img.dims[nkept:]), m)
        func = functools.partial(_block_keys, nkept=nkept, ft=ft)
        blocks = per_block(func, args, nkept, 2**KEY_BITS + 4, np.int64, token=("keys", KEY_BITS, ft.name))
        lazy.append(add_up(blocks, nkept))
    total = np.sum(compute_small(*lazy), axis=0).reshape(nrows, -1)
    counts, pinf, ninf = total[:, : 2**KEY_BITS], total[:, -3], total[:, -2]
    r = ranks(counts.sum(axis=1) + pinf + ninf)
    b = _groups(counts, ninf, pinf, r)
    inside = (b >= 1) & (b <= 2**KEY_BITS)
    # one slot per (row, wanted bin), numbered row by row; each block builds its own rows' slot
    # table (a dense table of all rows, 256 KiB per row in every task, filled a worker's memory)
    wanted = [np.unique(b[row][inside[row]]) - 1 for row in range(nrows)]
    first_slot = np.concatenate([[0], np.cumsum([len(w) for w in wanted])]).astype(np.int64)
    all_w = np.concatenate(wanted).astype(np.uint64) if nrows else np.empty(0, np.uint64)
    shift = np.uint64(8 * itemsize - KEY_BITS)
    lower = _key_values(all_w << shift, itemsize)
    row_cap = np.array([int(counts[row, w].sum()) for row, w in enumerate(wanted)], dtype=np.int64)
    found: list = []
    if len(all_w):
        for img, m in parts:
            _, args = prepare(img, tuple(img.dims[:nkept]), tuple(img.dims[nkept:]), m)
            func = functools.partial(_block_pick_keys, nkept=nkept, kshape=kshape, ft=ft, bins=all_w.astype(np.int64),
                                     first_slot=first_slot, ilo=lower, row_cap=row_cap)
            nd = args[0].ndim
            picks = da.map_blocks(
                func, *args, dtype=object, meta=np.empty((0,) * nd, dtype=object),
                chunks=tuple((1,) * n for n in args[0].numblocks), name=f"pick-keys-{uuid.uuid4().hex}",
            )
            found += [f for f in compute_small(picks)[0].ravel() if f is not None]
    at_lo = (np.sum([f[2] for f in found], axis=0) if found else np.zeros(len(all_w), np.int64)).reshape(1, -1)
    allv = np.concatenate([f[0] for f in found]) if found else np.empty(0)
    key = np.concatenate([f[1] for f in found]) if found else np.empty(0, np.int64)
    order = np.lexsort((allv, key))
    allv, key = allv[order], key[order]
    cum_before = np.concatenate([ninf[:, None], ninf[:, None] + np.cumsum(counts, axis=1)], axis=1)
    out = np.where(b <= 0, -np.inf, np.inf).astype(np.float64)
    ilo = lower.reshape(1, -1)
    for row, col in zip(*np.nonzero(inside)):
        bin_ = b[row, col] - 1
        at = first_slot[row] + int(np.searchsorted(wanted[row], bin_))
        out[row, col] = _lookup(allv, key, at_lo, ilo, 0, at, int(r[row, col] - cum_before[row, bin_]))
    return out


def _block_pick_keys(
    xb: np.ndarray, mb: np.ndarray | None = None, *, nkept: int, kshape: tuple, ft: np.dtype, bins: np.ndarray,
    first_slot: np.ndarray, ilo: np.ndarray, row_cap: np.ndarray, block_info: Any = None,
) -> np.ndarray:
    """One block of the pick pass: ``(values, slots, at_lo)`` in a one-element object array (``None``
    if no row wants a voxel). Row ``r`` wants key bins ``bins[first_slot[r]:first_slot[r + 1]]``."""
    out = np.empty((1,) * xb.ndim, dtype=object)
    g = rows_of(block_info[0]["array-location"][:nkept] if block_info else [], kshape)
    if not (first_slot[g + 1] > first_slot[g]).any():
        return out
    slot = np.full((len(g), 2**KEY_BITS), -1, dtype=np.int32)
    for i, row in enumerate(g):
        a, z = first_slot[row], first_slot[row + 1]
        slot[i, bins[a:z]] = np.arange(a, z, dtype=np.int32)
    cap = int(row_cap[g].sum())
    out[(0,) * xb.ndim] = _pick_keys(xb, mb, nkept=nkept, ft=ft, slot=slot, ilo=ilo, cap=cap if cap <= 2**22 else -1)
    return out


def _pick_keys(xb: np.ndarray, mb: np.ndarray | None, *, nkept: int, ft: np.dtype, slot: np.ndarray, ilo: np.ndarray, cap: int):
    rows = math.prod(xb.shape[:nkept])
    xb = numba_ready(xb).astype(ft, copy=False)
    x = np.ascontiguousarray(xb).reshape(rows, -1)
    ut = np.uint32 if x.dtype.itemsize == 4 else np.uint64
    m = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(rows, -1)
    at_lo = np.zeros(len(ilo), dtype=np.int64)
    cap = min(cap, x.size) if cap >= 0 else -1
    shift = 8 * x.itemsize - KEY_BITS
    vals, which, n = _kernels.pick_keys(x.view(ut), x, shift, slot, ilo, at_lo, cap, m)
    if cap >= 0 and n > cap:  # pragma: no cover - the histogram's count bounds every chunk
        at_lo[:] = 0
        vals, which, n = _kernels.pick_keys(x.view(ut), x, shift, slot, ilo, at_lo, -1, m)
    return vals, which, at_lo


# ---------------------------------------------------------------------------
# moments: one pass, merged exactly (Chan et al.) across chunks
# ---------------------------------------------------------------------------


def _block_moments(xb: np.ndarray, mb: np.ndarray | None = None, *, nkept: int) -> np.ndarray:
    kshape = xb.shape[:nkept]
    rows = math.prod(kshape)
    xb = numba_ready(xb)
    x2 = np.ascontiguousarray(xb).reshape(rows, -1)
    m2 = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(rows, -1)
    out = np.zeros((rows, len(_kernels.MOMENTS)), dtype=np.float64)
    _kernels.moments(x2, out, m2)
    return out.reshape(kshape + (1,) * (xb.ndim - nkept) + (len(_kernels.MOMENTS),))


def _merge(parts: np.ndarray) -> np.ndarray:
    """Merge moment rows along axis 0 (Chan's parallel update; float64)."""
    acc = parts[0].copy()
    for p in parts[1:]:
        na, nb = acc[..., 0], p[..., 0]
        n = na + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = p[..., 1] - acc[..., 1]
            w = np.where(n > 0, nb / n, 0.0)
            acc[..., 1] = acc[..., 1] + delta * w
            acc[..., 2] = acc[..., 2] + p[..., 2] + np.where(n > 0, delta * delta * na * w, 0.0)
        acc[..., 0] = n
        acc[..., 3] = np.minimum(acc[..., 3], p[..., 3])
        acc[..., 4] = np.maximum(acc[..., 4], p[..., 4])
        acc[..., 5:] += p[..., 5:]
    return acc


class Summary(xr.Dataset):
    """Statistics of :func:`summarize`: an ``xarray.Dataset`` that prints as a table (and
    shows as one in Jupyter).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> s = vn.summarize(xr.DataArray(np.array([1.0, 3.0]), dims="x"), quantiles=())
    >>> isinstance(s, vn.Summary), float(s["mean"])
    (True, 2.0)
    """

    __slots__ = ()

    def __repr__(self) -> str:
        if any(self[v].ndim for v in self.data_vars):
            return xr.Dataset.__repr__(self)
        width = max(len(str(v)) for v in self.data_vars)
        lines = [f"{'statistic':<{width}}  value"]
        for v in self.data_vars:
            val = self[v].item()
            lines.append(f"{v!s:<{width}}  {val:.6g}" if isinstance(val, float) else f"{v!s:<{width}}  {val}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Jupyter: a table (one row per index of the kept dims)."""
        if all(self[v].ndim == 0 for v in self.data_vars):
            return "<table>" + "".join(f"<tr><th style='text-align:left'>{v}</th><td>{self[v].item():.6g}</td></tr>" for v in self.data_vars) + "</table>"
        if max(self[v].ndim for v in self.data_vars) <= 2:
            return self.to_dataframe().to_html(float_format=lambda x: f"{x:.6g}")
        return xr.Dataset._repr_html_(self)


def summarize(
    data: xr.DataArray | xr.DataTree,
    *,
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | xr.DataTree | None = None,
    quantiles: Sequence[float] = (0.02, 0.25, 0.5, 0.75, 0.98),
) -> Summary:
    """Count, min, max, mean, variance, std and quantiles over ``dim`` in one object.

    Moments come from one GIL-free pass merged exactly across chunks (Welford
    within a chunk, Chan's update between chunks, float64); quantiles come
    from :func:`quantile`. NaN, ±Inf and masked-out voxels are excluded and
    counted. Computes: one pass for the moments plus the quantile passes
    (pass ``quantiles=()`` to skip them).

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack ``("volume", ...)``, any labelled array (numpy or dask backed), or a collection
        (a DataTree with an ``image`` per volume node).
    dim : str, sequence of str or None
        Dims the statistics are computed over: ``None`` = the whole dataset; ``("z", "y", "x")``
        = one set per volume. For a collection, per-volume results are stacked along ``volume``;
        finer ones come back as a DataTree.
    mask : xarray.DataArray of bool (DataTree for a collection), optional
        Broadcastable to ``data``; only ``True`` voxels are used (the others count in
        ``n_masked_out``).
    quantiles : sequence of float
        In [0, 1]; each gives a variable ``q{q:g}`` (e.g. ``q0.5``), as :func:`quantile`.

    Returns
    -------
    Summary
        Over the kept dims: ``count``, ``min``, ``max``, ``mean``, ``var`` and ``std``
        (population, float64), the excluded voxels ``n_nan``, ``n_posinf``, ``n_neginf`` and
        ``n_masked_out``, and the quantiles.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> s = vn.summarize(xr.DataArray(np.array([1.0, 2.0, 3.0, np.nan]), dims="x"), quantiles=[0.5])
    >>> float(s["mean"]), int(s["count"]), int(s["n_nan"]), float(s["q0.5"])
    (2.0, 3, 1, 2.0)
    """
    if isinstance(data, xr.DataTree) and dim is not None:
        res = over_collection(summarize, data, dim, mask, quantiles=quantiles)
        return Summary(res.data_vars, coords=res.coords) if isinstance(res, xr.Dataset) else res
    parts, finish = summary_graph(data, dim=dim, mask=mask, quantiles=quantiles)
    return finish(dask.compute(*parts))


def summary_graph(
    data: xr.DataArray | xr.DataTree,
    *,
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | xr.DataTree | None = None,
    quantiles: Sequence[float] = (0.02, 0.25, 0.5, 0.75, 0.98),
) -> tuple[list[da.Array], Callable[[Sequence[np.ndarray]], Summary]]:
    """:func:`summarize` in two halves: the lazy arrays of its first pass, and the function
    that makes the :class:`Summary` from their computed values. A runner computes the first
    half with other work on the same data (e.g. with the write of the data: one read). The
    finish computes nothing for 8/16-bit integers; float or wider integer quantiles need
    their own passes there.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack, any labelled array (numpy or dask backed), or a collection.
    dim : str, sequence of str or None
        Dims the statistics are computed over, as in :func:`summarize`. For a collection the
        moments are over all of it: leave ``None`` (:func:`summarize` handles other ``dim``).
    mask : xarray.DataArray of bool (DataTree for a collection), optional
        Broadcastable to ``data``; only ``True`` voxels are used.
    quantiles : sequence of float
        In [0, 1]; each gives a variable ``q{q:g}`` of the summary.

    Returns
    -------
    (list of dask.array.Array, callable)
        The lazy arrays of the first pass, and ``finish``, which takes their computed values (in
        that order) and returns the :class:`Summary` that :func:`summarize` would.

    Examples
    --------
    >>> import dask, numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(12, dtype="uint8").reshape(2, 6), dims=("volume", "x")).chunk({"volume": 1})
    >>> parts, finish = vn.stats.summary_graph(x, dim="x", quantiles=[0.5])
    >>> finish(dask.compute(*parts))["q0.5"].values.tolist()   # one compute: moments and quantiles
    [2.5, 8.5]
    """
    if isinstance(data, xr.DataTree):
        pieces = [(img, m, (), tuple(img.dims)) for _, img, m in parts_of(data, mask)]
        coords: dict | None = {}
        kept: tuple = ()
    elif isinstance(data, xr.DataArray):
        kept, reduced = split(data, dim)
        pieces = [(data, mask, kept, reduced)]
        coords = None
    else:
        raise TypeError(f"`data` must be an xarray.DataArray or DataTree; got {type(data).__name__}")
    nk = len(kept)
    qs = _checked_q(list(quantiles)) if len(quantiles) else np.empty(0)

    def block(xb: np.ndarray, mb: np.ndarray | None = None) -> np.ndarray:
        return _block_moments(xb, mb, nkept=nk)

    # 8/16-bit integers with quantiles: one histogram pass with a bin per value gives the
    # quantiles and, from the same counts, the moments (exact sums; 3x faster than the moments
    # kernel on int16): the data are read once and counted once
    together = (
        bool(len(qs)) and isinstance(data, xr.DataArray) and data.dtype.kind in "iub"
        and (data.dtype.kind == "b" or data.dtype.itemsize <= 2)
    )
    lazy = []
    for img, m, k, r in pieces:
        x, args = prepare(img, k, r, m)
        if coords is None:
            coords = {c: v for c, v in x.coords.items() if set(v.dims) <= set(kept)}
        if not together:
            lazy.append(per_block(block, args, nk, len(_kernels.MOMENTS), np.float64, token="moments"))
    int_q = int_quantile_lazy(data, qs, dim=dim, mask=mask, moments=True) if together else None
    n_moments = len(lazy)
    per_row = math.prod(data.sizes[d] for d in data.dims if d not in kept) if together else 0

    def finish(computed: Sequence[np.ndarray]) -> Summary:
        if int_q:
            vals = np.asarray(computed[n_moments])
            n = vals[..., len(qs)]
            mean, m2, lo, hi = (vals[..., len(qs) + 1 + i] for i in range(len(HIST_MOMENTS)))
            zero = np.zeros_like(n)
            m = np.stack([n, mean, m2, lo, hi, zero, zero, zero, per_row - n], axis=-1)
        else:
            flats = []
            for arr in computed[:n_moments]:
                red_axes = tuple(range(nk, arr.ndim - 1))
                flats.append(np.moveaxis(arr, red_axes, tuple(range(len(red_axes)))).reshape(-1, *arr.shape[:nk], arr.shape[-1]))
            m = _merge(np.concatenate(flats))
        count = m[..., 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(count > 0, m[..., 2] / count, np.nan)
        nanify = count == 0
        out = {
            "count": (kept, count.astype(np.int64)),
            "min": (kept, np.where(nanify, np.nan, m[..., 3])),
            "max": (kept, np.where(nanify, np.nan, m[..., 4])),
            "mean": (kept, np.where(nanify, np.nan, m[..., 1])),
            "var": (kept, var),
            "std": (kept, np.sqrt(var)),
            "n_nan": (kept, m[..., 5].astype(np.int64)),
            "n_posinf": (kept, m[..., 6].astype(np.int64)),
            "n_neginf": (kept, m[..., 7].astype(np.int64)),
            "n_masked_out": (kept, m[..., 8].astype(np.int64)),
        }
        if len(qs) and not np.all(count > 0):
            raise no_valid_voxels(some=bool(kept), inf=True)
        if len(qs):
            if int_q:
                qv = _finish_int(*int_q, qs, list(quantiles), computed=computed[n_moments])
            else:
                known = (float(np.min(m[..., 3])), float(np.max(m[..., 4])))  # spares quantile's range pass
                qv = _quantile(data, list(quantiles), dim=dim, mask=mask, exact=True, known_range=known)
            for i, qq in enumerate(quantiles):
                out[f"q{qq:g}"] = (kept, qv.isel(quantile=i).values)
        return Summary(out, coords=coords)

    return [*lazy, *([int_q[0]] if int_q else [])], finish

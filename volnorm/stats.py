"""Quantiles from histograms: exact for integer data, exact after one refinement pass for floats."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import dask
import numpy as np
import xarray as xr

from volnorm.histogram import histogram

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
    data: xr.DataArray,
    q: float | Sequence[float],
    *,
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | None = None,
) -> xr.DataArray:
    """Quantiles over ``dim``, equal to ``numpy.nanquantile`` (linear interpolation).

    Integer data: exact from one histogram with a bin per value. Float data:
    exact with ``dim=None`` (a 4096-bin histogram finds the bins holding the
    ranks, a second pass reads only the values inside them); with other
    ``dim`` the value is interpolated inside its bin and ``attrs["max_error"]``
    states the bound (one bin width).

    Parameters
    ----------
    data : xarray.DataArray
    q : float or sequence of float
        In [0, 1].
    dim, mask
        As in :func:`volnorm.histogram`. NaN and masked-out voxels are ignored.

    Returns
    -------
    xarray.DataArray
        float64 with dim ``quantile`` (when ``q`` is a sequence) plus the kept
        dims. Computes: up to three passes (range, histogram, refinement).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(11, dtype="int16"), dims="x")
    >>> float(vn.quantile(x, 0.25))
    2.5
    """
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if qs.ndim != 1 or np.any(~np.isfinite(qs)) or np.any((qs < 0) | (qs > 1)):
        raise ValueError(f"`q` must be in [0, 1]; got {q!r}. (Percentiles 0-100? divide by 100.)")
    is_int = data.dtype.kind in "iub"
    h = histogram(data, bins=None if is_int else FLOAT_BINS, dim=dim, mask=mask)
    kept = h.dims[:-1]
    h = h.compute()
    counts = h.values.reshape(-1, h.sizes["bin"])
    lo_inf = h["n_neginf"].values.reshape(-1)
    hi_inf = h["n_posinf"].values.reshape(-1)
    n = counts.sum(axis=1) + lo_inf + hi_inf
    if np.any(n == 0):
        raise ValueError("no valid voxel to take a quantile of (all NaN or masked out" + (" for some index)" if kept else ")"))
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
    elif not kept:
        v_lo, v_hi = _refine(data, mask, h, counts[0], lo_inf[0], b_lo[0], b_hi[0], r_lo[0], r_hi[0])
        v_lo, v_hi = v_lo[None], v_hi[None]
    else:
        v_lo, v_hi = value(b_lo), value(b_hi)
        max_error = width
    with np.errstate(invalid="ignore"):
        diff = v_hi - v_lo
        out = np.where(frac >= 0.5, v_hi - diff * (1 - frac), v_lo + diff * frac)
        out = np.where(frac == 0, v_lo, out)
    shape = tuple(h.sizes[d] for d in kept)
    out = out.reshape(shape + (len(qs),))
    coords = {k: v for k, v in h.coords.items() if set(v.dims) <= set(kept) and not k.startswith("n_")}
    res = xr.DataArray(out, dims=(*kept, "quantile"), coords={**coords, "quantile": qs}, name="quantile")
    res.attrs["max_error"] = max_error
    return res if np.ndim(q) else res.isel(quantile=0, drop=True).assign_attrs(res.attrs)


def _refine(data, mask, h, counts, nlo, b_lo, b_hi, r_lo, r_hi):
    """Exact float values at the ranks: read only the voxels inside the bins that hold them."""
    lower = h["bin_lower"].values
    upper = h["bin_upper"].values
    nb = len(counts)
    cum_before = np.concatenate([[nlo], nlo + np.cumsum(counts)])  # voxels before bin i
    wanted = sorted({int(b) for b in np.concatenate([b_lo, b_hi]) if 1 <= b <= nb})
    x = data if mask is None else data.where(mask.broadcast_like(data))
    xa = x.data if hasattr(x.data, "dask") else dask.array.from_array(np.asarray(x.data))
    picks = []
    for b in wanted:
        i = b - 1
        last = i == nb - 1
        sel = (xa >= lower[i]) & ((xa <= upper[i]) if last else (xa < upper[i]))
        picks.append(xa[sel])
    vals = dask.compute(*picks) if picks else []
    sorted_vals = {b: np.sort(np.asarray(v, dtype=np.float64)) for b, v in zip(wanted, vals)}

    def at(b, r):
        out = np.empty(len(b))
        for k, (bb, rr) in enumerate(zip(b, r)):
            if bb <= 0:
                out[k] = -np.inf
            elif bb >= nb + 1:
                out[k] = np.inf
            else:
                out[k] = sorted_vals[int(bb)][rr - cum_before[bb - 1]]
        return out

    return at(b_lo, r_lo), at(b_hi, r_hi)

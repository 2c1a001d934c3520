"""Thresholds as functions of a histogram, so they are dataset-wide (or per ``dim``) for free.

The module is ``thresholds``, not ``threshold``: :func:`threshold` is the function
(``volnorm.threshold``).
"""

from __future__ import annotations

import difflib
from typing import Literal

import numpy as np
import xarray as xr

from volnorm import fsl
from volnorm._dims import Dim, split
from volnorm._histogram import histogram, over_collection
from volnorm._utils import no_valid_voxels
from volnorm.stats import quantile, summarize

__all__ = ["METHODS", "Method", "threshold"]

Method = Literal[
    "otsu", "multiotsu", "li", "yen", "triangle", "isodata", "mean", "minimum", "percentile",
    "robust_range", "robust_range_positive",
]
METHODS: tuple[str, ...] = (
    "otsu", "multiotsu", "li", "yen", "triangle", "isodata", "mean", "minimum", "percentile",
    "robust_range", "robust_range_positive",
)


def _triangle(counts: np.ndarray, centers: np.ndarray) -> float:
    """scikit-image's ``threshold_triangle`` on a histogram (same steps)."""
    nz = np.flatnonzero(counts)
    counts, centers = counts[nz[0] : nz[-1] + 1], centers[nz[0] : nz[-1] + 1]
    hist = counts.astype(np.float64)
    nbins = len(hist)
    arg_peak = int(np.argmax(hist))
    peak = hist[arg_peak]
    lo_arg, hi_arg = np.flatnonzero(hist)[[0, -1]]
    if lo_arg == hi_arg:
        return float(centers[0])
    flip = arg_peak - lo_arg < hi_arg - arg_peak
    if flip:
        hist = hist[::-1]
        lo_arg = nbins - hi_arg - 1
        arg_peak = nbins - arg_peak - 1
    width = arg_peak - lo_arg
    x1 = np.arange(width)
    y1 = hist[x1 + lo_arg]
    norm = np.sqrt(peak**2 + width**2)
    length = (peak / norm) * x1 - (width / norm) * y1
    arg_level = int(np.argmax(length)) + lo_arg
    if flip:
        arg_level = nbins - arg_level - 1
    return float(centers[arg_level])


def _li(counts: np.ndarray, centers: np.ndarray) -> float:
    """Li's minimum cross entropy, iterated on the histogram as scikit-image does for integers."""
    nz = np.flatnonzero(counts)
    counts, centers = counts[nz[0] : nz[-1] + 1].astype(np.float32), centers[nz[0] : nz[-1] + 1]
    if len(centers) == 1:
        return float(centers[0])
    lo = centers[0]
    c = centers - lo
    tolerance = float(np.min(np.diff(c))) / 2
    t_next = float(np.sum(counts * c) / np.sum(counts))
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        fg = c > t_curr
        mean_fore = np.average(c[fg], weights=counts[fg])
        mean_back = np.average(c[~fg], weights=counts[~fg])
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return float(t_next + lo)


def _one(method: str, counts: np.ndarray, centers: np.ndarray, classes: int) -> np.ndarray:
    from skimage import filters  # on first use: not imported with volnorm

    # scikit-image histograms an image over its own min..max: drop empty end bins the same way
    nz = np.flatnonzero(counts)
    counts, centers = counts[nz[0] : nz[-1] + 1], centers[nz[0] : nz[-1] + 1]
    if len(counts) == 1 and method not in ("multiotsu", "minimum"):  # one value: scikit-image returns it
        return np.atleast_1d(float(centers[0]))
    hist = (counts, centers)
    if method == "otsu":
        return np.atleast_1d(filters.threshold_otsu(hist=hist))
    if method == "multiotsu":
        return np.asarray(filters.threshold_multiotsu(classes=classes, hist=hist), dtype=np.float64)
    if method == "yen":
        return np.atleast_1d(filters.threshold_yen(hist=hist))
    if method == "isodata":
        return np.atleast_1d(filters.threshold_isodata(hist=hist))
    if method == "minimum":
        return np.atleast_1d(filters.threshold_minimum(hist=hist))
    if method == "triangle":
        return np.atleast_1d(_triangle(counts, centers))
    if method == "li":
        return np.atleast_1d(_li(counts, centers))
    raise AssertionError(method)


def threshold(
    data: xr.DataArray | xr.DataTree,
    method: Method = "otsu",
    *,
    dim: Dim = None,
    mask: xr.DataArray | xr.DataTree | None = None,
    bins: int | None = None,
    classes: int = 3,
    q: float = 0.5,
) -> xr.DataArray:
    """A threshold over ``dim``, computed from the histogram of ``data``.

    ``otsu``, ``multiotsu``, ``yen``, ``isodata`` and ``minimum`` call
    scikit-image's functions with ``hist=`` our exact histogram, so the values
    are scikit-image's for the same histogram; ``triangle`` and ``li`` run
    scikit-image's steps on the histogram; ``mean`` is the mean of the valid
    voxels; ``percentile`` is :func:`volnorm.quantile` at ``q``;
    ``robust_range`` is FSL's ``fslmaths -thrp`` value, ``q`` of the way up
    FSL's robust range (:func:`volnorm.fsl.thrp_threshold`), and
    ``robust_range_positive`` its ``-thrP`` (robust range of the voxels > 0).

    Parameters
    ----------
    data : xarray.DataArray
    method : str
        One of ``METHODS``.
    dim : str, sequence of str or None
        The dims the threshold is computed over, as in :func:`volnorm.histogram`
        (None: one threshold for the whole dataset).
    mask : xarray.DataArray of bool, optional
        Only these voxels count, as in :func:`volnorm.histogram`.
    bins : int, optional
        Histogram bins (default: one per integer value, 256 for floats).
    classes : int
        For ``multiotsu``.
    q : float
        For ``percentile`` and ``robust_range*``, in [0, 1].

    Returns
    -------
    xarray.DataArray
        float64 over the kept dims (plus ``threshold`` for ``multiotsu``).
        Computes: a range pass (floats) and a histogram pass.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([10] * 50 + [200] * 50, dtype="uint8"), dims="x")
    >>> float(vn.threshold(x, "otsu"))   # voxels above it are foreground, as in scikit-image
    10.0
    """
    if method not in METHODS:
        hint = difflib.get_close_matches(str(method), METHODS, n=1)
        raise ValueError(
            f"`method` must be one of {', '.join(map(repr, METHODS))}; got {method!r}."
            + (f" Did you mean {hint[0]!r}?" if hint else "")
        )
    if method == "multiotsu" and (isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2):
        raise ValueError(f"`classes` must be an int >= 2 for multiotsu; got {classes!r}")
    if isinstance(data, xr.DataTree) and dim is not None:
        return over_collection(threshold, data, dim, mask, method=method, bins=bins, classes=classes, q=q)
    if method in ("robust_range", "robust_range_positive"):
        return _robust_range(data, dim, mask, q, positive=method == "robust_range_positive")
    if method == "percentile":
        return quantile(data, q, dim=dim, mask=mask).rename("threshold")
    if method == "mean":
        s = summarize(data, dim=dim, mask=mask, quantiles=())
        if np.any(s["count"].values == 0):
            raise no_valid_voxels("to threshold", some=s["count"].ndim > 0, inf=True)
        return s["mean"].rename("threshold")
    h = histogram(data, bins=bins, dim=dim, mask=mask).compute()
    kept = h.dims[:-1]
    centers = h["bin"].values
    counts = h.values.reshape(-1, h.sizes["bin"])
    if np.any(counts.sum(axis=1) == 0):
        raise no_valid_voxels("to threshold", some=bool(kept), inf=True)
    vals = np.stack([_one(method, c, centers, classes) for c in counts])
    single = np.count_nonzero(counts, axis=1) == 1
    if single.any() and method != "multiotsu" and np.any(centers != np.round(centers)):
        # float data in one bin: a constant image's threshold is its value (as scikit-image's),
        # not the bin centre; other one-bin rows keep the centre (scikit-image on that histogram)
        st = summarize(data, dim=dim, mask=mask, quantiles=())
        lo, hi = st["min"].values.reshape(-1), st["max"].values.reshape(-1)
        constant = single & (lo == hi)
        vals[constant, 0] = lo[constant]
    shape = tuple(h.sizes[d] for d in kept)
    coords = {k: v for k, v in h.coords.items() if set(v.dims) <= set(kept) and not str(k).startswith("n_")}
    if method == "multiotsu":
        return xr.DataArray(vals.reshape(shape + (vals.shape[-1],)), dims=(*kept, "threshold"), coords=coords, name="threshold")
    return xr.DataArray(vals.reshape(shape), dims=kept, coords=coords, name="threshold")


def _robust_range(data: xr.DataArray, dim: Dim, mask: xr.DataArray | None, q: float, *, positive: bool) -> xr.DataArray:
    """FSL's -thrp/-thrP value per index of the kept dims (each index its own FSL passes)."""
    if not 0 <= q <= 1:
        raise ValueError(f"`q` must be in [0, 1] (a fraction of the robust range); got {q!r}")
    if not isinstance(data, xr.DataArray):
        raise NotImplementedError("robust_range thresholds of a collection: threshold each volume")
    kept, _ = split(data, dim)
    shape = tuple(data.sizes[d] for d in kept)
    out = np.empty(shape)
    for idx in np.ndindex(*shape):
        sel = dict(zip(kept, idx))
        m = None if mask is None else mask.isel({k: v for k, v in sel.items() if k in mask.dims})
        out[idx] = fsl.thrp_threshold(data.isel(sel), 100 * q, mask=m, positive=positive)
    coords = {k: v for k, v in data.coords.items() if set(v.dims) <= set(kept)}
    return xr.DataArray(out, dims=kept, coords=coords, name="threshold")

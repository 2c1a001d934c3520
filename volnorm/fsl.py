"""FSL-compatible statistics: ``fslstats -r/-R/-p/-P/-m/-M/-s/-S/-v/-V`` and ``fslmaths -thrp/-thrP``.

FSL users keep their numbers: the robust range is FSL's ``find_thresholds``
(a 1000-bin histogram, the 2 % and 98 % points found by walking in from each
end, the histogram redone over the narrowed range while the 2-98 % range is
less than a tenth of the full range, at most ten passes, the tenth over the
full range without its end bins); percentiles are FSL's nearest-rank rule.
The arithmetic follows FSL, which reads every image as 32-bit float: voxel
values, limits and thresholds are rounded to float32 where FSL's ``T`` is
``float``, bin positions are computed in double.

Out of core: with integer data every pass is regrouped from one exact
integer histogram (one read); float data need one read per pass (one or two
on typical images, up to ten on pathological tails).

Differences from FSL, on purpose: NaN and ±Inf voxels are left out (FSL's
result with them is undefined); ``-P``, ``-M``, ``-S``, ``-V`` take the voxels
``!= 0`` (FSL: non-zero); ``-thrP`` takes the voxels ``> 0``, as ``fslmaths``
does.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._histogram import histogram, merge_histograms, numba_ready, parts_of, per_block, prepare, value_range
from volnorm.stats import order_statistics, summarize

#: FSL's ``find_thresholds`` constants.
HISTOGRAM_BINS = 1000
MAX_PASSES = 10

_f32 = np.float32


__all__ = ["fslstats", "percentile", "robust_range", "thrp_threshold"]


def _py(v: Any) -> float:
    """A float32 result as the Python float with the same shortest repr (18.981, not 18.98100090...)."""
    return float(str(_f32(v)))


def _and_mask(data: xr.DataArray, mask: xr.DataArray | None, where: str | None) -> xr.DataArray | None:
    """Combine the user's mask with FSL's voxel rule (``nonzero``: ``!= 0``, ``positive``: ``> 0``)."""
    if where is None:
        return mask
    rule = data != 0 if where == "nonzero" else data > 0
    rule = rule.drop_vars(list(rule.coords))
    if mask is None:
        return rule
    return rule & mask.drop_vars(list(mask.coords)).broadcast_like(rule)


class _Hist:
    """FSL's ``find_histogram`` over the (masked) voxels: regrouped from one exact integer
    histogram for integer data, one pass over the data per call for float data."""

    def __init__(self, data: xr.DataArray | xr.DataTree, mask: Any) -> None:
        self.data, self.mask = data, mask
        self.parts = parts_of(data, mask)
        self.is_int = all(p[1].dtype.kind in "iub" for p in self.parts)
        if self.is_int:
            h = merge_histograms([histogram(img, mask=m) for _, img, m in self.parts]).compute()
            nz = np.flatnonzero(h.values)
            self.values = h["bin"].values[nz].astype(np.float32).astype(np.float64)  # FSL's float voxels
            self.counts = h.values[nz].astype(np.int64)

    def minmax(self) -> tuple[np.float32, np.float32]:
        """FSL's ``vol.min(mask)``, ``vol.max(mask)`` (finite voxels)."""
        if self.is_int:
            if not len(self.values):
                raise ValueError("no voxel to take FSL statistics of (the mask is empty)")
            return _f32(self.values[0]), _f32(self.values[-1])
        lo, hi = value_range(self.data, self.mask)
        return _f32(lo), _f32(hi)

    def __call__(self, lo: np.float32, hi: np.float32) -> tuple[np.ndarray, int]:
        """``(hist, validsize)``; validsize is -1 when ``lo == hi``, as in FSL."""
        hist = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
        if hi == lo:
            return hist, -1
        span = float(_f32(hi - lo))  # FSL: (double)(max - min), the difference of two floats
        fa = HISTOGRAM_BINS / span
        fb = HISTOGRAM_BINS * -float(lo) / span
        if self.is_int:
            k = np.clip(np.trunc(fa * self.values + fb), 0, HISTOGRAM_BINS - 1).astype(np.int64)
            hist += np.bincount(k, weights=self.counts, minlength=HISTOGRAM_BINS).astype(np.int64)
            return hist, int(self.counts.sum())

        def block(xb: np.ndarray, mb: np.ndarray | None = None) -> np.ndarray:
            out = np.zeros(HISTOGRAM_BINS + 1, dtype=np.int64)
            xb = numba_ready(xb)
            m = None if mb is None else np.ascontiguousarray(mb, dtype=np.bool_).reshape(-1)
            _kernels.hist_fsl(np.ascontiguousarray(xb).reshape(-1), fa, fb, HISTOGRAM_BINS, out, m)
            return out.reshape((1,) * xb.ndim + (HISTOGRAM_BINS + 1,))

        pieces = []
        for _, img, m in self.parts:
            _, args = prepare(img, (), tuple(img.dims), m)
            parts = per_block(block, args, 0, HISTOGRAM_BINS + 1, np.int64, token=(fa, fb))
            pieces.append(parts.sum(axis=tuple(range(args[0].ndim))))
        hist += np.sum(dask.compute(*pieces), axis=0)[:HISTOGRAM_BINS]
        return hist, int(hist.sum())


def _find_thresholds(hist_of: _Hist) -> tuple[np.float32, np.float32]:
    """FSL's ``find_thresholds`` (newimage), step for step, with ``T = float``."""
    lowest_bin, highest_bin = 0, HISTOGRAM_BINS - 1
    top_bin = bottom_bin = 0
    vmin, vmax = hist_of.minmax()
    thresh2 = thresh98 = _f32(0)
    npass = 1
    while npass == 1 or float(_f32(thresh98 - thresh2)) < float(_f32(vmax - vmin)) / 10:
        if npass > 1:  # redo the histogram over the 2-98 % range found, widened by a bin
            bottom_bin = max(bottom_bin - 1, 0)
            top_bin = min(top_bin + 1, HISTOGRAM_BINS - 1)
            tmpmin = _f32(float(vmin) + (bottom_bin / HISTOGRAM_BINS) * float(_f32(vmax - vmin)))
            vmax = _f32(float(vmin) + ((top_bin + 1) / HISTOGRAM_BINS) * float(_f32(vmax - vmin)))
            vmin = tmpmin
        if npass == MAX_PASSES or vmin == vmax:  # give up: the full range, without its end bins
            vmin, vmax = hist_of.minmax()
        hist, validsize = hist_of(vmin, vmax)
        if validsize < 1:
            return vmin, vmax
        if npass == MAX_PASSES:
            validsize -= int(hist[lowest_bin]) + int(hist[highest_bin])
            lowest_bin += 1
            highest_bin -= 1
        if validsize < 0:  # zero range
            return vmin, vmin
        fa = float(_f32(vmax - vmin)) / HISTOGRAM_BINS
        need = validsize // 50  # C integer division
        count, bottom_bin = 0, lowest_bin
        while count < need:
            count += int(hist[bottom_bin])
            bottom_bin += 1
        bottom_bin -= 1
        thresh2 = _f32(vmin + _f32(bottom_bin * fa))
        count, top_bin = 0, highest_bin
        while count < need:
            count += int(hist[top_bin])
            top_bin -= 1
        top_bin += 1
        thresh98 = _f32(vmin + _f32((top_bin + 1) * fa))
        if npass == MAX_PASSES:
            break
        npass += 1
    return thresh2, thresh98


def robust_range(
    data: xr.DataArray | xr.DataTree,
    *,
    mask: xr.DataArray | xr.DataTree | None = None,
    positive: bool = False,
) -> tuple[float, float]:
    """FSL's robust range (``fslstats -r``): the 2 % and 98 % points of FSL's histogram rule.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack, a volume or a collection; the range is over all of it.
    mask : boolean DataArray (DataTree for a collection), optional
        FSL's ``-k``: only voxels inside count.
    positive : bool
        Only voxels ``> 0`` (what ``fslmaths -thrP`` uses).

    Returns
    -------
    (float, float)
        Robust min and max, float32 values as FSL prints them. Computes: an
        integer histogram (integer data) or a range pass and 1-10 histogram
        passes (float data).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(1000, dtype="int16"), dims="x")
    >>> vn.fsl.robust_range(x)
    (18.981, 980.019)
    """
    if isinstance(data, xr.DataArray) and positive:
        mask = _and_mask(data, mask, "positive")
    elif positive:
        raise NotImplementedError("positive=True with a collection")
    lo, hi = _find_thresholds(_Hist(data, mask))
    return _py(lo), _py(hi)


def percentile(
    data: xr.DataArray | xr.DataTree,
    p: float,
    *,
    mask: xr.DataArray | xr.DataTree | None = None,
    nonzero: bool = False,
) -> float:
    """FSL's percentile (``fslstats -p``; ``-P`` with ``nonzero=True``): nearest rank, no interpolation.

    The value at 0-based rank ``int(float32(n) * float32(p / 100))`` (clamped
    to ``n - 1``) of the ``n`` sorted valid voxels, as FSL's ``percentile``
    computes it. Exact out of core (:func:`volnorm.quantile`'s rank machinery).

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack, a volume or a collection; the percentile is over all of it.
    p : float
        The percentile, in [0, 100] (FSL's scale).
    mask : boolean DataArray (DataTree for a collection), optional
        FSL's ``-k``: only voxels inside count.
    nonzero : bool
        Only voxels ``!= 0`` (FSL's ``-P``); not with a collection.

    Returns
    -------
    float
        The voxel value at that rank, a float32 value as FSL prints it. Computes: the passes of
        :func:`volnorm.stats.order_statistics`.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 0, 3, 1, 2], dtype="uint8"), dims="x")
    >>> vn.fsl.percentile(x, 50), vn.fsl.percentile(x, 50, nonzero=True)
    (1.0, 2.0)
    """
    if not (0 <= p <= 100) or not math.isfinite(p):
        raise ValueError(f"the percentile must be in [0, 100] (FSL's scale); got {p!r}")
    if nonzero:
        if not isinstance(data, xr.DataArray):
            raise NotImplementedError("nonzero=True with a collection")
        mask = _and_mask(data, mask, "nonzero")
    rank = lambda n: min(int(_f32(n) * _f32(p / 100.0)), n - 1)  # noqa: E731
    return _py(order_statistics(data, rank, mask=mask)[0])


def thrp_threshold(data: xr.DataArray, p: float, *, mask: xr.DataArray | None = None, positive: bool = False) -> float:
    """The value ``fslmaths -thrp p`` (``-thrP`` with ``positive=True``) thresholds at:
    ``rmin + p / 100 * (rmax - rmin)`` of the robust range.

    Parameters
    ----------
    data : xarray.DataArray
        A stack or a volume; the robust range is over all of it.
    p : float
        How far up the robust range, in percent: [0, 100].
    mask : boolean DataArray, optional
        Only voxels inside count for the robust range.
    positive : bool
        Only voxels ``> 0`` count for the robust range (``-thrP``).

    Returns
    -------
    float
        The threshold, a float32 value as FSL computes it. Computes: :func:`robust_range`'s
        passes.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(1000, dtype="int16"), dims="x")
    >>> vn.fsl.thrp_threshold(x, 50)
    499.49997
    """
    if not (0 <= p <= 100) or not math.isfinite(p):
        raise ValueError(f"the percentage must be in [0, 100] (FSL's scale); got {p!r}")
    lo, hi = robust_range(data, mask=mask, positive=positive)
    lo32, hi32 = _f32(lo), _f32(hi)
    return _py(float(lo32) + (p / 100.0) * float(_f32(hi32 - lo32)))  # double, then FSL's float


#: ``fslstats`` options that take no argument, and what they print.
OPTIONS = {
    "-r": "robust min and max (2 %, 98 % by FSL's histogram rule)",
    "-R": "min and max",
    "-m": "mean",
    "-M": "mean of the non-zero voxels",
    "-s": "standard deviation (n - 1)",
    "-S": "standard deviation of the non-zero voxels (n - 1)",
    "-v": "voxel count and volume (mm^3)",
    "-V": "voxel count and volume of the non-zero voxels",
    "-p": "nth percentile (takes n, 0-100)",
    "-P": "nth percentile of the non-zero voxels (takes n, 0-100)",
    "-k": "use a mask (takes a file); applies to the options after it",
}


def fslstats(data: xr.DataArray, ops: Sequence[str], *, masks: dict[str, xr.DataArray] | None = None) -> list[float]:
    """Run ``fslstats``-style options left to right, returning the numbers FSL would print.

    Parameters
    ----------
    data : xarray.DataArray
        A stack or a volume; every statistic is over all of it.
    ops : sequence of str
        ``ops`` are FSL's letters with their arguments, e.g. ``["-r", "-p", "50"]``;
        ``-k NAME`` switches to ``masks[NAME]`` for the options after it, as in FSL.
        Known options: ``OPTIONS``.
    masks : dict of str to boolean DataArray, optional
        The masks that ``-k`` names.

    Returns
    -------
    list of float
        The numbers in order: two for ``-r``, ``-R``, ``-v`` and ``-V`` (``-v``/``-V``: the
        voxel count and the volume in mm^3 from ``attrs["zooms"]``), one for the others.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(1000, dtype="int16"), dims="x")
    >>> vn.fsl.fslstats(x, ["-R", "-p", "50"])
    [0.0, 999.0, 500.0]
    """
    out: list[float] = []
    mask = None
    i = 0
    ops = list(ops)

    def arg(name: str) -> str:
        if i + 1 >= len(ops):
            raise ValueError(f"fslstats option {name} needs a value")
        return ops[i + 1]

    while i < len(ops):
        op = ops[i]
        if op == "-k":
            key = arg(op)
            if masks is None or key not in masks:
                raise ValueError(f"-k {key}: no such mask was given")
            mask = masks[key]
            i += 2
            continue
        if op in ("-p", "-P"):
            try:
                n = float(arg(op))
            except ValueError:
                raise ValueError(f"{op} takes a number 0-100; got {ops[i + 1]!r}") from None
            out.append(percentile(data, n, mask=mask, nonzero=op == "-P"))
            i += 2
            continue
        if op == "-r":
            out.extend(robust_range(data, mask=mask))
        elif op in ("-R", "-m", "-M", "-s", "-S", "-v", "-V"):
            nz = op in ("-M", "-S", "-V")
            s = summarize(data, mask=_and_mask(data, mask, "nonzero" if nz else None), quantiles=())
            n = int(s["count"])
            if op == "-R":
                out.extend([_py(s["min"]), _py(s["max"])])
            elif op in ("-m", "-M"):
                out.append(float(s["mean"]))
            elif op in ("-s", "-S"):
                out.append(math.sqrt(float(s["var"]) * n / (n - 1)) if n > 1 else 0.0)
            else:
                zooms = data.attrs.get("zooms") or (1.0, 1.0, 1.0)
                out.extend([float(n), float(n * math.prod(zooms[:3]))])
        else:
            hint = difflib.get_close_matches(op, list(OPTIONS), n=1)
            known = " ".join(OPTIONS)
            raise ValueError(f"unknown fslstats option {op!r} (known: {known})" + (f"; did you mean {hint[0]}?" if hint else ""))
        i += 1
    return out

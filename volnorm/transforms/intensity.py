"""Intensity transforms: rescale, z-score, FSL's mean scaling, gamma, log and auto-gamma.

Each dataset-wide transform is split (DESIGN.md, "Fit, then apply"): ``fit_*`` runs one
explicit pass through the statistics engine and returns :class:`~volnorm.params.Params`
(one value per index of the kept dims); the apply step is an elementwise map with no
communication between chunks. The convenience functions fit when called (unless given
``params=``, checked by :func:`volnorm.params.check`) and return a lazy result whose
``attrs["volnorm_params"]`` records the fitted parameters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from volnorm._dims import Dim, reduced_names, volume_dims
from volnorm._utils import no_valid_voxels
from volnorm.params import Params, attach, check
from volnorm.stats import quantile, summarize
from volnorm.transforms.common import check_data, float_dtype, out_spec

__all__ = ["auto_gamma", "fit_mean_scale", "fit_rescale", "fit_zscore", "gamma", "log", "mean_scale", "rescale", "zscore"]


def _finish(y: xr.DataArray, lo: float, hi: float, dtype: np.dtype | None, clip: bool) -> xr.DataArray:
    """Clip ``y`` to ``[lo, hi]`` (when ``clip``, always for integer output) and round it to
    ``dtype`` (half to even, as numpy), never wrapping."""
    if clip or dtype is not None:
        y = y.clip(lo, hi)
    if dtype is not None:
        y = np.rint(y).astype(dtype)  # round half to even, as numpy
    return y


def _kept_values(ds: xr.Dataset, data: xr.DataArray) -> xr.Dataset:
    """Fitted values ready to broadcast against ``data``: without their non-index coords (which
    could clash with the data's), and without index coords the data lack (the result keeps the
    data's coords). Index coords both have are equal: :func:`volnorm.params.check` saw to it."""
    return ds.drop_vars([c for c in ds.coords if c not in ds.dims or c not in data.indexes])


# ---------------------------------------------------------------------------
# rescale
# ---------------------------------------------------------------------------


def fit_rescale(
    data: xr.DataArray,
    *,
    in_range: str | tuple[float, float] = "minmax",
    percentiles: tuple[float, float] | None = None,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
) -> Params:
    """Fit :func:`rescale`'s input window: the (masked) min and max, or two percentiles (0-100),
    over ``dim``. Computes: one statistics pass (none for an explicit ``in_range``).

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    in_range : "minmax" or (lo, hi)
        ``"minmax"``: the min and max of the valid voxels; ``(lo, hi)``: an explicit finite
        window with ``lo <= hi``, taken as it is (no pass).
    percentiles : (lo, hi), optional
        Two exact percentiles (:func:`volnorm.quantile`), ``0 <= lo < hi <= 100``; overrides
        ``in_range``.
    dim : str, sequence of str or None
        Dims the window is computed over: ``None`` = the whole dataset; ``("z", "y", "x")`` =
        one window per volume. An explicit ``in_range`` is one window for all.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the fit.

    Returns
    -------
    Params
        Method ``"rescale"``: float64 ``in_lo`` and ``in_hi`` over the kept dims; ``options``
        record how they were found and ``dim``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> p = vn.fit_rescale(xr.DataArray(np.arange(101.0), dims="x"), percentiles=(1, 99))
    >>> float(p.values["in_lo"]), float(p.values["in_hi"])
    (1.0, 99.0)"""
    data = check_data(data)
    if percentiles is not None:
        p_lo, p_hi = (float(p) for p in percentiles)
        if not (0 <= p_lo < p_hi <= 100):
            raise ValueError(f"`percentiles` must be (lo, hi) with 0 <= lo < hi <= 100; got {percentiles!r}")
        q = quantile(data, [p_lo / 100, p_hi / 100], dim=dim, mask=mask)
        lo, hi = q.isel(quantile=0, drop=True), q.isel(quantile=1, drop=True)
        how = {"percentiles": [p_lo, p_hi]}
    elif isinstance(in_range, str):
        if in_range != "minmax":
            raise ValueError(f"`in_range` must be 'minmax' or (lo, hi); got {in_range!r}")
        s = summarize(data, dim=dim, mask=mask, quantiles=())
        if np.any(s["count"].values == 0):
            raise no_valid_voxels("to take a range from", some=s["count"].ndim > 0)
        lo, hi = s["min"], s["max"]
        how = {"in_range": "minmax"}
    else:
        lo_f, hi_f = (float(v) for v in in_range)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or lo_f > hi_f:
            raise ValueError(f"`in_range` must be finite (lo, hi) with lo <= hi; got {in_range!r}")
        lo, hi = xr.DataArray(lo_f), xr.DataArray(hi_f)
        how = {"in_range": [lo_f, hi_f]}
    values = xr.Dataset({"in_lo": lo.astype(np.float64), "in_hi": hi.astype(np.float64)})
    return Params("rescale", values, {**how, "dim": reduced_names(data, dim)})


def rescale(
    data: xr.DataArray,
    in_range: str | tuple[float, float] = "minmax",
    *,
    percentiles: tuple[float, float] | None = None,
    out_range: tuple[float, float] | str | np.dtype | type = (0.0, 1.0),
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    clip: bool = True,
    params: Params | None = None,
) -> xr.DataArray:
    """Linear rescaling of an input window to ``out_range`` (auto-level, robust window, explicit).

    ``y = (x - in_lo) * (out_hi - out_lo) / (in_hi - in_lo) + out_lo``, with
    the window fitted over ``dim`` on the (masked) voxels: ``"minmax"``, two
    ``percentiles`` (TorchIO's ``RescaleIntensity(percentiles=)``, FSL-style
    robust windows), or an explicit ``in_range``. A constant input (``in_hi
    == in_lo``) maps to ``out_lo`` - no division by zero. ``out_range`` is a
    float range or an integer dtype (then the result is rounded half to even
    and clipped to the dtype's range).

    Parameters
    ----------
    data : xarray.DataArray
    in_range : "minmax" or (lo, hi)
    percentiles : (lo, hi), optional
        In 0-100; overrides ``in_range``.
    out_range : (lo, hi) or integer dtype
    dim : str, sequence of str or None
        What the window is computed over (None: the whole dataset).
    mask : xarray.DataArray of bool, optional
        Which voxels count for the window (the map is applied to every voxel).
    clip : bool
        Clip the result to ``out_range`` (always for integer output).
    params : Params, optional
        From :func:`fit_rescale` (e.g. on a training cohort): no fit pass; ``mask`` is then not
        used, and a ``dim``, ``in_range`` or ``percentiles`` given must be what they were
        fitted with (:func:`volnorm.params.check`).

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for 8/16-bit integer and float32 input, float64 for
        wider types; the fitted window in ``attrs["volnorm_params"]``.
        Computes: the fit pass only.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([10, 20, 30, 40], dtype="uint16"), dims="x")
    >>> vn.rescale(x).values.tolist()
    [0.0, 0.3333333432674408, 0.6666666865348816, 1.0]
    >>> vn.rescale(x, out_range="uint8").values.tolist()
    [0, 85, 170, 255]
    """
    data = check_data(data)
    out_lo, out_hi, out_dtype = out_spec(out_range)
    if params is None:
        params = fit_rescale(data, in_range=in_range, percentiles=percentiles, dim=dim, mask=mask)
    else:
        check(params, rescale, data, dim=dim, in_range=in_range, percentiles=percentiles)
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    span = v["in_hi"] - v["in_lo"]
    scale = xr.where(span > 0, (out_hi - out_lo) / span.where(span > 0, 1.0), 0.0)
    y = (data.astype(ft) - v["in_lo"].astype(ft)) * scale.astype(ft) + ft.type(out_lo)
    y = _finish(y.astype(ft), out_lo, out_hi, out_dtype, clip)
    params = Params("rescale", params.values, {**params.options, "out_range": [out_lo, out_hi], "out_dtype": None if out_dtype is None else out_dtype.name, "clip": clip})
    return attach(y, data, params)


# ---------------------------------------------------------------------------
# z-score and FSL's mean scaling
# ---------------------------------------------------------------------------


def fit_zscore(data: xr.DataArray, *, dim: Dim = None, mask: xr.DataArray | None = None) -> Params:
    """Fit :func:`zscore`: the exact float64 mean and (population) std over ``dim``. Computes: one pass.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    dim : str, sequence of str or None
        Dims the moments are computed over: ``None`` = the whole dataset; ``("z", "y", "x")`` =
        one mean and std per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used (NaN and ±Inf never are).

    Returns
    -------
    Params
        Method ``"zscore"``: float64 ``mean`` and ``std`` over the kept dims, ``dim`` in ``options``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> p = vn.fit_zscore(xr.DataArray(np.array([1.0, 2.0, 3.0]), dims="x"))
    >>> float(p.values["mean"]), round(float(p.values["std"]), 4)
    (2.0, 0.8165)
    """
    data = check_data(data)
    s = summarize(data, dim=dim, mask=mask, quantiles=())
    if np.any(s["count"].values == 0):
        raise no_valid_voxels("to take a mean from", some=s["count"].ndim > 0)
    return Params("zscore", xr.Dataset({"mean": s["mean"], "std": s["std"]}), {"dim": reduced_names(data, dim)})


def zscore(
    data: xr.DataArray, *, dim: Dim = None, mask: xr.DataArray | None = None, params: Params | None = None
) -> xr.DataArray:
    """``(x - mean) / std`` with mean and std over ``dim`` (dataset-wide by default, per volume
    with ``dim=("z", "y", "x")``), from the (masked) voxels, exact float64 moments.

    A constant input (std 0) gives 0, not a division by zero. Lazy; computes the fit pass.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    dim : str, sequence of str or None
        Dims the mean and std are computed over: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one pair per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the fit (every voxel is
        transformed).
    params : Params, optional
        From :func:`fit_zscore` (e.g. on a training cohort): no fit pass; ``mask`` is then not
        used, and a ``dim`` given must be the one they were fitted over.

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the
        fitted mean and std in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[1.0, 3.0], [10.0, 10.0]]), dims=("volume", "x"))
    >>> vn.zscore(x, dim="x").values.tolist()
    [[-1.0, 1.0], [0.0, 0.0]]
    """
    data = check_data(data)
    if params is None:
        params = fit_zscore(data, dim=dim, mask=mask)
    else:
        check(params, zscore, data, dim=dim)
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    inv = xr.where(v["std"] > 0, 1.0 / v["std"].where(v["std"] > 0, 1.0), 0.0)
    y = ((data.astype(ft) - v["mean"].astype(ft)) * inv.astype(ft)).astype(ft)
    return attach(y, data, params)


def fit_mean_scale(
    data: xr.DataArray, target: float = 10000.0, *, per_volume: bool = True, mask: xr.DataArray | None = None
) -> Params:
    """Fit :func:`mean_scale`: the mean of the non-zero (masked) voxels, per volume or over all.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data; a stack with a ``volume`` dim when ``per_volume``.
    target : float
        The mean to scale to, recorded in ``options`` for :func:`mean_scale`.
    per_volume : bool
        One mean per index of ``volume`` (FSL's ``-inm``), else one over all volumes (``-ing``).
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels (of them, the non-zero ones) are used.

    Returns
    -------
    Params
        Method ``"mean_scale"``: ``mean`` (over ``volume``, or one value), with ``target`` and
        ``per_volume`` in ``options``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[0.0, 2.0, 4.0], [0.0, 10.0, 30.0]]), dims=("volume", "x"))
    >>> vn.fit_mean_scale(x).values["mean"].values.tolist()   # zeros left out
    [3.0, 20.0]
    """
    data = check_data(data)
    nz = data != 0
    m = nz if mask is None else nz & mask
    dim = volume_dims(data, "mean_scale(per_volume=True)") if per_volume else None
    s = summarize(data, dim=dim, mask=m, quantiles=())
    if np.any(s["count"].values == 0):
        raise ValueError("a volume has no non-zero voxel: there is no mean to scale to")
    return Params("mean_scale", xr.Dataset({"mean": s["mean"]}), {"target": float(target), "per_volume": per_volume})


def mean_scale(
    data: xr.DataArray,
    target: float = 10000.0,
    *,
    per_volume: bool = True,
    mask: xr.DataArray | None = None,
    params: Params | None = None,
) -> xr.DataArray:
    """Scale intensities so the mean of the non-zero voxels is ``target``, as FSL's ``fslmaths``
    ``-inm`` (``per_volume=True``: each volume its own scale) and ``-ing`` (``per_volume=False``:
    one scale from the mean over all volumes). ``y = x * target / mean``.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data; a stack with a ``volume`` dim when ``per_volume``.
    target : float
        The mean the non-zero voxels get. With ``params``, the target recorded in them is used.
    per_volume : bool
        One scale per volume (``-inm``), else one scale for all volumes (``-ing``).
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` non-zero voxels are used for the mean (every
        voxel is scaled).
    params : Params, optional
        From :func:`fit_mean_scale`: no fit pass; ``mask`` is then not used, and the recorded
        ``target`` and ``per_volume`` apply (given other than their defaults, they must agree).

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the
        fitted means in ``attrs["volnorm_params"]``. Computes: the fit pass only.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[0.0, 2.0, 6.0], [0.0, 1.0, 1.0]]), dims=("volume", "x"))
    >>> vn.mean_scale(x, 100).values.tolist()                    # -inm 100
    [[0.0, 50.0, 150.0], [0.0, 100.0, 100.0]]
    >>> vn.mean_scale(x, 100, per_volume=False).values.tolist()  # -ing 100
    [[0.0, 80.0, 240.0], [0.0, 40.0, 40.0]]
    """
    data = check_data(data)
    if params is None:
        params = fit_mean_scale(data, target, per_volume=per_volume, mask=mask)
    else:
        check(params, mean_scale, data, target=target, per_volume=per_volume)
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    y = (data.astype(ft) * (params.options["target"] / v["mean"]).astype(ft)).astype(ft)
    return attach(y, data, params)


# ---------------------------------------------------------------------------
# power law and log, with the gain that maps the maximum to itself
# ---------------------------------------------------------------------------


def _max_params(method: str, data: xr.DataArray, dim: Dim, mask: xr.DataArray | None, params: Params | None, **extra: Any) -> Params:
    """The maximum and mean over ``dim`` that gamma, log and auto_gamma apply: fitted (one pass),
    or ``params`` checked and labelled as ``method``'s own (the three fits hold the same values)."""
    if params is not None:
        check(params, globals()[method], data, dim=dim, **extra)  # by name: gamma's argument hides gamma
        return Params(method, params.values, {**extra, "dim": params.options.get("dim")})
    s = summarize(data, dim=dim, mask=mask, quantiles=())
    if np.any(s["count"].values == 0):
        raise no_valid_voxels(some=s["count"].ndim > 0)
    if np.nanmin(s["min"].values) < 0:
        raise ValueError(f"{method} needs non-negative data; the minimum is {float(np.nanmin(s['min'].values))!r} (rescale first)")
    return Params(method, xr.Dataset({"max": s["max"], "mean": s["mean"]}), {**extra, "dim": reduced_names(data, dim)})


def gamma(
    data: xr.DataArray, gamma: float, *, dim: Dim = None, mask: xr.DataArray | None = None, params: Params | None = None
) -> xr.DataArray:
    """Power law ``y = max * (x / max) ** gamma``: the gain maps the maximum (over ``dim``) to
    itself, so the intensity scale is kept. Needs non-negative data. Computes: a max pass.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data (checked on the fitted voxels).
    gamma : float
        The exponent, a positive number (< 1 brightens, > 1 darkens). With ``params`` of an
        earlier gamma, it must be the exponent they record; with those of :func:`log` or
        :func:`auto_gamma` (the same maximum), it is the exponent applied.
    dim : str, sequence of str or None
        Dims the maximum is taken over: ``None`` = the whole dataset; ``("z", "y", "x")`` =
        one per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the maximum (every voxel is
        transformed).
    params : Params, optional
        Recorded by an earlier gamma, log or auto_gamma call (:meth:`Params.from_dict` of its
        ``attrs["volnorm_params"]`` entry): no max pass; a ``dim`` given must be the one they
        were fitted over, and ``mask`` is not used.

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the
        maximum and ``gamma`` in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> vn.gamma(xr.DataArray(np.array([0.0, 25.0, 100.0]), dims="x"), 0.5).values.tolist()
    [0.0, 50.0, 100.0]
    """
    data = check_data(data)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"`gamma` must be a positive number; got {gamma!r}")
    params = _max_params("gamma", data, dim, mask, params, gamma=float(gamma))
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    mx = v["max"].where(v["max"] > 0, 1.0).astype(ft)
    y = (mx * (data.astype(ft) / mx) ** ft.type(params.options["gamma"])).astype(ft)
    return attach(y, data, params)


def log(data: xr.DataArray, *, dim: Dim = None, mask: xr.DataArray | None = None, params: Params | None = None) -> xr.DataArray:
    """``y = max * log1p(x) / log1p(max)``: logarithmic compression with the gain that maps the
    maximum to itself, in float (no 8-bit truncation). Needs non-negative data.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data (checked on the fitted voxels).
    dim : str, sequence of str or None
        Dims the maximum is taken over, as in :func:`gamma`.
    mask : xarray.DataArray of bool, optional
        The voxels the maximum is taken over, as in :func:`gamma`.
    params : Params, optional
        An earlier gamma, log or auto_gamma call's parameters, as in :func:`gamma` (no max pass).

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the
        maximum in ``attrs["volnorm_params"]``. Computes: the max pass only.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> vn.log(xr.DataArray(np.array([0, 255], dtype="uint8"), dims="x")).values.tolist()
    [0.0, 255.0]
    """
    data = check_data(data)
    params = _max_params("log", data, dim, mask, params)
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    gain = xr.where(v["max"] > 0, v["max"] / np.log1p(v["max"].where(v["max"] > 0, 1.0)), 0.0).astype(ft)
    y = (gain * np.log1p(data.astype(ft))).astype(ft)
    return attach(y, data, params)


def auto_gamma(
    data: xr.DataArray, *, dim: Dim = None, mask: xr.DataArray | None = None, params: Params | None = None
) -> xr.DataArray:
    """ImageMagick's ``-auto-gamma``: the gamma that maps the mean to 50 % of the maximum,
    ``y = max * (x / max) ** (log(0.5) / log(mean / max))``. Needs non-negative data.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data (checked on the fitted voxels).
    dim : str, sequence of str or None
        Dims the mean and maximum are taken over: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one pair per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the mean and maximum (every
        voxel is transformed).
    params : Params, optional
        Recorded by an earlier auto_gamma, gamma or log call (:meth:`Params.from_dict` of its
        ``attrs["volnorm_params"]`` entry): no pass; a ``dim`` given must be the one they were
        fitted over, and ``mask`` is not used.

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the mean
        and maximum in ``attrs["volnorm_params"]``. Where ``mean / max`` is not strictly between
        0 and 1 (e.g. constant data), the gamma is 1 and the values are kept.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0.0, 20.0, 30.0, 70.0, 30.0]), dims="x")   # mean 30, max 70
    >>> round(float(vn.auto_gamma(x).values[2]), 6)   # the mean becomes half the maximum
    35.0
    """
    data = check_data(data)
    params = _max_params("auto_gamma", data, dim, mask, params)
    v = _kept_values(params.values, data)
    ft = float_dtype(data.dtype)
    ratio = (v["mean"] / v["max"].where(v["max"] > 0, 1.0))
    ok = (ratio > 0) & (ratio < 1)
    g = xr.where(ok, np.log(0.5) / np.log(ratio.where(ok, 0.5)), 1.0)
    mx = v["max"].where(v["max"] > 0, 1.0).astype(ft)
    y = (mx * (data.astype(ft) / mx) ** g.astype(ft)).astype(ft)
    return attach(y, data, params)



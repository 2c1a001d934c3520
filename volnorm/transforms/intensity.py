"""Intensity transforms: rescale, z-score, FSL's mean scaling, gamma, log and auto-gamma.

Each dataset-wide transform is split (DESIGN.md, "Fit, then apply"): ``fit_*`` runs one
explicit pass through the statistics engine and returns :class:`~volnorm.params.Params`
(one value per index of the kept dims); the apply step is an elementwise map with no
communication between chunks. The convenience functions fit when called (unless given
``params=``, checked by :func:`volnorm.params.check`) and return a lazy result whose
``attrs["volnorm_params"]`` records the fitted parameters.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import numpy as np
import xarray as xr

from volnorm._dims import Dim, reduced_names, volume_dims
from volnorm._utils import no_valid_voxels
from volnorm.params import Params, attach, check
from volnorm.stats import quantile, ranges, summarize
from volnorm.transforms.common import (
    check_data,
    checked_nonnegative,
    float_dtype,
    full_scale,
    out_range_record,
    out_spec,
    pointwise,
)

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
        s = ranges(data, dim=dim, mask=mask)
        if np.any(np.isnan(s["min"].values)):
            raise no_valid_voxels("to take a range from", some=s["min"].ndim > 0)
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

    References: ``rescale(x, out_range="uint8")`` on uint8 data equals OpenCV's
    ``cv2.normalize(x, None, 0, 255, cv2.NORM_MINMAX)`` (both round the exact map; a constant
    image is 0 in both), except where the map is an exact half (e.g. ``(142 - 29) / 226 * 255 =
    127.5``): OpenCV's float arithmetic lands just above and rounds up, ours rounds half to
    even; 1 apart at most. ImageMagick 6's ``-auto-level`` (Q16, written to an 8-bit PNG) is
    the same map rounded to 16 bits and stored as ``q // 257`` (about the floor): 1 below ours
    (never above) where the map's fraction is about >= 0.5, e.g. 55 % of the pixels of
    ``skimage.data.coins()``, 0 where min and max are 0 and 255; ``rescale`` keeps rounding
    to nearest.

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
    lo, k = v["in_lo"].astype(ft), scale.astype(ft)
    y = pointwise(data, lambda x: _finish(((x.astype(ft) - lo) * k + ft.type(out_lo)).astype(ft), out_lo, out_hi, out_dtype, clip))
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
    mean, k = v["mean"].astype(ft), inv.astype(ft)
    return attach(pointwise(data, lambda x: ((x.astype(ft) - mean) * k).astype(ft)), data, params)


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
    k = (params.options["target"] / v["mean"]).astype(ft)
    return attach(pointwise(data, lambda x: (x.astype(ft) * k).astype(ft)), data, params)


# ---------------------------------------------------------------------------
# power law, log and auto-gamma: on the dtype's full scale (the references'), or the data's max
# ---------------------------------------------------------------------------

#: Which full scale gamma, log and auto_gamma work on: ``"dtype"`` (the references': the
#: integer dtype's maximum, 1.0 for float data) or ``"data"`` (the fitted maximum over ``dim``).
Scale = Literal["dtype", "data"]
_OWN = {"gamma": ("gamma", "gain"), "log": ("gain", "inv"), "auto_gamma": ()}


def _power_params(method: str, data: xr.DataArray, scale: str, dim: Dim, mask: xr.DataArray | None,
                  params: Params | None, out_range: Any, **own: Any) -> Params:
    """The parameters gamma, log and auto_gamma apply: ``scale``, the method's own options
    (``own``), ``out_range`` and, where needed, the fitted max and mean over ``dim`` (one pass:
    ``scale="data"``, and auto_gamma's mean). With ``params`` (checked): no pass; their scale,
    and the options they record for the same method, decide."""
    if scale not in ("dtype", "data"):
        raise ValueError(f"`scale` must be 'dtype' or 'data'; got {scale!r}")
    opts = {**own, "scale": scale, "out_range": out_range_record(out_range)}
    if method == "auto_gamma":
        opts["full_scale"] = full_scale(data.dtype)
    if params is not None:
        if isinstance(params, Params) and params.method in _OWN and "scale" not in params.options:
            params = Params(params.method, params.values, {**params.options, "scale": "data"})  # recorded before scale=
        same = isinstance(params, Params) and params.method == method
        fn = globals()[method]  # by name: gamma's argument hides gamma
        nothing_fitted = method != "auto_gamma" and isinstance(params, Params) and params.options.get("scale") == "dtype"
        check(params, fn, data, dim=None if nothing_fitted else dim, scale=scale, **({**own, "out_range": out_range} if same else {}))
        rec = params.options
        opts = {**opts, "scale": rec["scale"], "dim": rec.get("dim")}
        if same:
            opts.update({k: rec[k] for k in (*_OWN[method], "out_range", "full_scale") if k in rec})
        need = ("max",) if opts["scale"] == "data" else ()
        need += ("mean",) if method == "auto_gamma" else ()
        missing = [k for k in need if k not in params.values]
        if missing:
            raise ValueError(f"{method}(params=...): these {params.method} parameters (scale={rec['scale']!r}) hold no fitted "
                             f"{' and '.join(missing)}: fit {method} on the data instead")
        return Params(method, params.values, opts)
    if scale == "dtype" and method != "auto_gamma":  # nothing to fit
        return Params(method, xr.Dataset(), {**opts, "dim": None})
    s = summarize(data, dim=dim, mask=mask, quantiles=())
    if np.any(s["count"].values == 0):
        raise no_valid_voxels(some=s["count"].ndim > 0)
    if np.nanmin(s["min"].values) < 0:
        raise ValueError(f"{method} needs non-negative data; the minimum is {float(np.nanmin(s['min'].values))!r} (rescale first)")
    return Params(method, xr.Dataset({"max": s["max"], "mean": s["mean"]}), {**opts, "dim": reduced_names(data, dim)})


def _check_gain(gain: Any) -> float:
    if isinstance(gain, bool) or not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain >= 0):
        raise ValueError(f"`gain` must be a finite number >= 0; got {gain!r}")
    return float(gain)


def _to_dtype(y: xr.DataArray, dtype: np.dtype) -> xr.DataArray:
    """A float result cast to ``dtype`` as scikit-image's ``astype`` does (integers truncated
    toward zero), but clipped to the dtype's range first (where numpy's cast would wrap)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        y = y.clip(info.min, info.max)
    return y.astype(dtype)


def _out(f: xr.DataArray, data: xr.DataArray, out_range: Any) -> xr.DataArray:
    """``out_lo + (out_hi - out_lo) * f`` for a transfer ``f`` on [0, 1]: float (float32 for
    float32/16 and up to 16-bit integer input), or an integer dtype (rounded half to even and
    clipped, as :func:`rescale`)."""
    lo, hi, dt = out_spec(out_range)
    ft = float_dtype(data.dtype)
    y = (ft.type(lo) + ft.type(hi - lo) * f.astype(ft)).astype(ft)
    return _finish(y, lo, hi, dt, clip=False)


def _data_scale(v: xr.Dataset, ft: np.dtype) -> xr.DataArray:
    return v["max"].where(v["max"] > 0, 1.0).astype(ft)


def _on_data_max(data: xr.DataArray, params: Params, curve: Any, k: float) -> xr.DataArray:
    """``scale="data"``: ``max * gain * curve(x, max)`` in float (``curve`` on [0, 1]), or the
    curve on ``out_range``; recorded."""
    ft = float_dtype(data.dtype)
    mx = _data_scale(_kept_values(params.values, data), ft)
    out_range = params.options["out_range"]

    def formula(x: xr.DataArray) -> xr.DataArray:
        f = curve(x.astype(ft), mx)
        if out_range is not None:
            return _out(k * f, data, out_range)
        y = (mx * f).astype(ft)
        return (y * ft.type(k) if k != 1 else y).astype(ft)

    return attach(pointwise(data, formula), data, params)


def gamma(
    data: xr.DataArray,
    gamma: float,
    *,
    gain: float = 1.0,
    scale: Scale = "dtype",
    out_range: tuple[float, float] | str | np.dtype | type | None = None,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    params: Params | None = None,
) -> xr.DataArray:
    """Power law, as ``skimage.exposure.adjust_gamma``: ``y = (x / s) ** gamma * s * gain``
    with ``s`` the dtype's full scale (uint8 255, uint16 65535, int16 32767, float 1.0).

    With the default ``scale="dtype"`` the result equals ``adjust_gamma(x, gamma, gain)`` dtype
    for dtype: the input dtype; uint8 through scikit-image's rounded look-up table, other integer
    dtypes truncated toward zero as its ``astype``. It differs only where scikit-image's result
    is undefined or refused: a result above an integer dtype's maximum (``gain > 1``) is clipped
    to it, where scikit-image's cast wraps; ``gamma`` must be > 0 (scikit-image also takes 0) and
    ``gain`` >= 0; negative data raise ``ValueError`` when computed, not when called. Computes
    nothing when called. ``scale="data"`` (the earlier default): ``s`` is the maximum over
    ``dim`` (one max pass), the result float: ``y = max * (x / max) ** gamma * gain``.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data.
    gamma : float
        The exponent, a positive number (< 1 brightens, > 1 darkens). With ``params`` of an
        earlier gamma, it must be the exponent they record; with those of :func:`log` or
        :func:`auto_gamma`, it is the exponent applied.
    gain : float
        The constant multiplier, >= 0.
    scale : {"dtype", "data"}
        The full scale ``s``: the dtype's (scikit-image's), or the data's maximum over ``dim``.
    out_range : (lo, hi), integer dtype or None
        ``None``: the reference's output, the input dtype (``scale="data"``: float32 for
        float32/16 and up to 16-bit integer input, float64 otherwise). ``(lo, hi)``: float
        ``lo + (hi - lo) * gain * (x / s) ** gamma``; an integer dtype (e.g. ``"uint8"``): that
        range, rounded half to even and clipped, as :func:`rescale` (no truncation trap).
    dim : str, sequence of str or None
        ``scale="data"`` only: dims the maximum is taken over (None: the whole dataset;
        ``("z", "y", "x")``: one per volume).
    mask : xarray.DataArray of bool, optional
        ``scale="data"`` only: the voxels the maximum is taken over (every voxel is transformed).
    params : Params, optional
        Recorded by an earlier gamma, log or auto_gamma call (:meth:`Params.from_dict` of its
        ``attrs["volnorm_params"]`` entry): no pass; their ``scale`` (and, from gamma, ``gain``
        and ``out_range``) apply; a ``dim`` or such option given must be the recorded one.

    Returns
    -------
    xarray.DataArray
        Lazy; ``scale``, ``gamma``, ``gain``, ``out_range`` (and with ``scale="data"`` the
        maximum) in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 64, 255], dtype="uint8"), dims="x")
    >>> vn.gamma(x, 0.5).values.tolist()            # skimage.exposure.adjust_gamma(x, 0.5)
    [0, 128, 255]
    >>> vn.gamma(x, 0.5, out_range="uint16").values.tolist()
    [0, 32832, 65535]
    >>> vn.gamma(xr.DataArray(np.array([0.0, 25.0, 100.0]), dims="x"), 0.5, scale="data").values.tolist()
    [0.0, 50.0, 100.0]
    """
    data = check_data(data)
    if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"`gamma` must be a positive number; got {gamma!r}")
    params = _power_params("gamma", data, scale, dim, mask, params, out_range, gamma=float(gamma), gain=_check_gain(gain))
    o = params.options
    g, k = float(o["gamma"]), float(o["gain"])
    if o["scale"] == "data":
        return _on_data_max(data, params, lambda x, mx: (x / mx) ** x.dtype.type(g), k)
    s = full_scale(data.dtype)
    x = checked_nonnegative(data, "gamma")
    if o["out_range"] is not None:
        ft = float_dtype(data.dtype)
        return attach(pointwise(x, lambda v: _out(k * (v.astype(ft) / ft.type(s)) ** ft.type(g), data, o["out_range"]), lo=0), data, params)
    if data.dtype == np.uint8:  # scikit-image's look-up table, bit for bit
        lut = np.minimum(np.rint(255 * k * (np.linspace(0, 1, 256) ** g)), 255).astype(np.uint8)
        look_up = functools.partial(xr.apply_ufunc, lut.__getitem__, dask="parallelized", output_dtypes=[np.uint8])
        return attach(pointwise(x, look_up), data, params)
    return attach(pointwise(x, lambda v: _to_dtype(((v / s) ** g) * s * k, data.dtype), lo=0), data, params)


def log(
    data: xr.DataArray,
    *,
    gain: float = 1.0,
    inv: bool = False,
    scale: Scale = "dtype",
    out_range: tuple[float, float] | str | np.dtype | type | None = None,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    params: Params | None = None,
) -> xr.DataArray:
    """Logarithmic correction, as ``skimage.exposure.adjust_log``: ``y = log2(1 + x / s) * s *
    gain``, or with ``inv=True`` ``y = (2 ** (x / s) - 1) * s * gain``, with ``s`` the dtype's
    full scale (uint8 255, uint16 65535, float 1.0).

    With the default ``scale="dtype"`` the result equals ``adjust_log(x, gain, inv)`` dtype for
    dtype: the input dtype, integers truncated toward zero as scikit-image's cast. It differs
    only where scikit-image's result is undefined: a result above an integer dtype's maximum
    (``gain > 1``) is clipped to it, where the cast wraps; ``gain`` must be >= 0; negative data
    raise ``ValueError`` when computed, not when called. Computes nothing when called.
    ``scale="data"`` (the earlier default): ``y = max * log1p(x) / log1p(max) * gain`` with
    the maximum over ``dim`` (one max pass), float; ``inv=True`` is its inverse,
    ``y = expm1(x * log1p(max) / max) * gain``.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data.
    gain : float
        The constant multiplier, >= 0.
    inv : bool
        The inverse correction (expansion instead of compression).
    scale : {"dtype", "data"}
        The full scale: the dtype's (scikit-image's), or the data's maximum over ``dim``.
    out_range : (lo, hi), integer dtype or None
        ``None``: the reference's output, the input dtype (``scale="data"``: float32 for
        float32/16 and up to 16-bit integer input, float64 otherwise). ``(lo, hi)``: float
        ``lo + (hi - lo) * gain * log2(1 + x / s)`` (the curve on [0, 1]); an integer dtype:
        that range, rounded half to even and clipped, as :func:`rescale`.
    dim : str, sequence of str or None
        ``scale="data"`` only: dims the maximum is taken over, as in :func:`gamma`.
    mask : xarray.DataArray of bool, optional
        ``scale="data"`` only: the voxels the maximum is taken over, as in :func:`gamma`.
    params : Params, optional
        An earlier gamma, log or auto_gamma call's parameters, as in :func:`gamma` (no pass).

    Returns
    -------
    xarray.DataArray
        Lazy; ``scale``, ``gain``, ``inv``, ``out_range`` (and with ``scale="data"`` the
        maximum) in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 64, 255], dtype="uint8"), dims="x")
    >>> vn.log(x).values.tolist()                   # skimage.exposure.adjust_log(x)
    [0, 82, 255]
    >>> vn.log(x, inv=True).values.tolist()         # adjust_log(x, inv=True)
    [0, 48, 255]
    >>> [round(float(v), 2) for v in vn.log(x, scale="data").values]   # 255 * log1p(x) / log1p(255)
    [0.0, 191.96, 255.0]
    """
    data = check_data(data)
    if not isinstance(inv, (bool, np.bool_)):
        raise ValueError(f"`inv` must be True or False; got {inv!r}")
    params = _power_params("log", data, scale, dim, mask, params, out_range, gain=_check_gain(gain), inv=bool(inv))
    o = params.options
    k, iv = float(o["gain"]), bool(o["inv"])
    if o["scale"] == "data":  # the curve on [0, 1]: log1p(x) / log1p(max), or its inverse
        return _on_data_max(data, params, lambda x, mx: np.expm1(x * (np.log1p(mx) / mx)) / mx if iv else np.log1p(x) / np.log1p(mx), k)
    s = full_scale(data.dtype)
    x = checked_nonnegative(data, "log")
    if o["out_range"] is not None:
        ft = float_dtype(data.dtype)

        def on_range(v: xr.DataArray) -> xr.DataArray:
            t = v.astype(ft) / ft.type(s)
            return _out(k * ((2 ** t - 1) if iv else np.log2(1 + t)), data, o["out_range"])

        return attach(pointwise(x, on_range, lo=0), data, params)

    def adjust_log(v: xr.DataArray) -> xr.DataArray:  # adjust_log's arithmetic
        return _to_dtype((2 ** (v / s) - 1) * s * k if iv else np.log2(1 + v / s) * s * k, data.dtype)

    return attach(pointwise(x, adjust_log, lo=0), data, params)


def _im_level(x: xr.DataArray, s: float, e: xr.DataArray, dtype: np.dtype) -> xr.DataArray:
    """ImageMagick's ``LevelImage(image, 0, QuantumRange, gamma)`` with ``e = 1 / gamma``:
    ``QuantumRange * (x / QuantumRange) ** e`` in double, then its ``ClampToQuantum`` (clamped,
    rounded half up) for integer data. uint8 works in 16 bits (Q16: ``x * 257``), and a Q16
    value ``q`` becomes the 8-bit ``q // 257`` that ImageMagick 6.9's PNG writer stores."""
    q16 = dtype == np.uint8
    qr = 65535.0 if q16 else s
    q = x.astype(np.float64) * 257.0 if q16 else x.astype(np.float64)
    t = q * (1.0 / qr)  # LevelPixel: PerceptibleReciprocal(white - black) * (pixel - black)
    v = qr * xr.where(t < 0, t, t ** e)  # gamma_pow
    if dtype.kind not in "iu":
        return v.astype(dtype if dtype.kind == "f" else np.float64)
    v = xr.where(v <= 0, 0.0, xr.where(v >= qr, qr, np.floor(v + 0.5)))  # ClampToQuantum
    return (np.floor(v / 257.0) if q16 else v).astype(dtype)


def auto_gamma(
    data: xr.DataArray,
    *,
    scale: Scale = "dtype",
    out_range: tuple[float, float] | str | np.dtype | type | None = None,
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    params: Params | None = None,
) -> xr.DataArray:
    """ImageMagick's ``-auto-gamma``: the gamma that maps the mean to half of full scale,
    ``gamma = log(mean / s) / log(0.5)``, ``y = s * (x / s) ** (1 / gamma)``, with ``s`` the
    dtype's full scale (ImageMagick's ``QuantumRange``: uint8 255, uint16 65535, float 1.0).

    With the default ``scale="dtype"`` the result equals ImageMagick 6.9 (Q16)
    ``convert in.png -auto-gamma out.png`` bit for bit on 8- and 16-bit grey PNGs: uint8 is
    computed as ImageMagick does, in 16 bits (``x * 257``), rounded half up to 16 bits
    (``ClampToQuantum``), then stored as ``q // 257`` as its PNG writer does (this is up to 1
    below rounding the exact float formula to 8 bits); uint16 and other integer dtypes are
    rounded half up and clamped; float data stay float, unrounded (an HDRI build). The mean is
    over ``dim`` (ImageMagick: the whole image) and the masked voxels. Its arithmetic is kept at
    the ends: a mean of 0 makes every voxel full scale (gamma infinite), as ImageMagick.
    Output dtype: the input's. ``scale="data"`` (the earlier default): ``s`` is the
    maximum over ``dim``, float output, and where ``mean / max`` is not strictly between 0 and 1
    (constant data) the gamma is 1. Needs non-negative data. Computes: the mean (and max) pass.

    Parameters
    ----------
    data : xarray.DataArray
        Non-negative numeric data (checked on the fitted voxels).
    scale : {"dtype", "data"}
        The full scale: the dtype's (ImageMagick's), or the data's maximum over ``dim``.
    out_range : (lo, hi), integer dtype or None
        ``None``: the reference's output, the input dtype (``scale="data"``: float32 for
        float32/16 and up to 16-bit integer input, float64 otherwise). ``(lo, hi)``: float
        ``lo + (hi - lo) * (x / s) ** (1 / gamma)``; an integer dtype: that range, rounded half
        to even and clipped, as :func:`rescale`.
    dim : str, sequence of str or None
        Dims the mean (and maximum) are taken over: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the mean and maximum (every
        voxel is transformed).
    params : Params, optional
        Recorded by an earlier auto_gamma call (or, with ``scale="data"``, gamma or log):
        :meth:`Params.from_dict` of its ``attrs["volnorm_params"]`` entry: no pass; their scale
        and ``out_range`` apply, and a ``dim`` given must be the one they were fitted over.

    Returns
    -------
    xarray.DataArray
        Lazy; the mean and maximum, ``scale``, ``out_range`` and the fitted data's full scale in
        ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> grey = xr.DataArray(np.full((2, 2), 60, dtype="uint8"), dims=("y", "x"))
    >>> vn.auto_gamma(grey).values.tolist()   # convert grey60.png -auto-gamma: 127
    [[127, 127], [127, 127]]
    >>> x = xr.DataArray(np.array([0.0, 20.0, 30.0, 70.0, 30.0]), dims="x")   # mean 30, max 70
    >>> round(float(vn.auto_gamma(x, scale="data").values[2]), 6)   # the mean becomes half the max
    35.0
    """
    data = check_data(data)
    params = _power_params("auto_gamma", data, scale, dim, mask, params, out_range)
    o = params.options
    v = _kept_values(params.values, data)
    if o["scale"] == "data":
        ft = float_dtype(data.dtype)
        ratio = (v["mean"] / v["max"].where(v["max"] > 0, 1.0))
        ok = (ratio > 0) & (ratio < 1)
        g = xr.where(ok, np.log(0.5) / np.log(ratio.where(ok, 0.5)), 1.0).astype(ft)
        return _on_data_max(data, params, lambda x, mx: (x / mx) ** g, 1.0)
    fs = float(o.get("full_scale", full_scale(data.dtype)))
    k = 257.0 if fs == 255.0 else 1.0  # the fitted mean as ImageMagick (Q16) holds it
    with np.errstate(divide="ignore"):
        e = 1.0 / (np.log((v["mean"] * k) * (1.0 / (fs * k))) / np.log(0.5))
    if o["out_range"] is not None:

        def on_range(x: xr.DataArray) -> xr.DataArray:
            t = x.astype(np.float64) * (1.0 / full_scale(data.dtype))
            return _out(xr.where(t < 0, t, t ** e), data, o["out_range"])

        return attach(pointwise(data, on_range), data, params)
    return attach(pointwise(data, lambda x: _im_level(x, full_scale(data.dtype), e, data.dtype)), data, params)

"""Intensity transforms: fit on the whole dataset (one statistics pass), apply lazily chunk by chunk.

Every dataset-wide transform is split (DESIGN.md, "Fit, then apply"): ``fit_*``
runs one explicit pass through the histogram/moments engine and returns
:class:`Params` (small, JSON-serializable, one value per index of the kept
dims); the apply step is a blockwise map with no communication between
chunks. The convenience functions (``rescale``, ``zscore``, ...) fit when
called (unless given ``params=``) and return a lazy result whose
``attrs["volnorm_params"]`` records the fitted parameters (JSON), so a store
written from it carries them in its provenance.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from volnorm._histogram import _dims, histogram, histogram_counts, in_memory_dask, rows_of

Dim = Hashable | Sequence[Hashable] | None


@dataclass
class Params:
    """Fitted parameters of a transform: per-index values over the kept dims, and options.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0.0, 5.0, 10.0]), dims="x")
    >>> p = vn.fit_rescale(x)
    >>> p.method, float(p.values["in_lo"]), float(p.values["in_hi"])
    ('rescale', 0.0, 10.0)
    >>> vn.Params.from_json(p.to_json()) == p
    True
    """

    method: str
    values: xr.Dataset
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "values": self.values.to_dict(data="list")}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=_jsonable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Params:
        return cls(d["method"], xr.Dataset.from_dict(d["values"]), dict(d.get("options", {})))

    @classmethod
    def from_json(cls, s: str) -> Params:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Params)
            and self.method == other.method
            and json.loads(json.dumps(self.options, default=_jsonable)) == json.loads(json.dumps(other.options, default=_jsonable))
            and self.values.identical(other.values)
        )

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={_short(v)}" for k, v in self.values.data_vars.items())
        return f"Params({self.method}: {vals}; {self.options})"

    def _repr_html_(self) -> str:
        """Jupyter: the method, its options and every fitted value (long arrays shortened)."""
        import html

        def cell(v: xr.DataArray) -> str:
            flat = np.asarray(v.values).ravel()
            shown = ", ".join(f"{x:.6g}" if isinstance(x, (float, np.floating)) else str(x) for x in flat[:12])
            return html.escape(f"[{shown}{', ...' if flat.size > 12 else ''}]" if v.ndim else shown) + (
                f" <small>over {html.escape(str(v.dims))}</small>" if v.ndim else "")

        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>{cell(v)}</td></tr>"
                       for k, v in self.values.data_vars.items())
        opts = html.escape(json.dumps(self.options, default=_jsonable))
        return (f"<div><b>volnorm Params: {html.escape(self.method)}</b> <small>options {opts}</small>"
                f"<table>{rows}</table></div>")


def _short(v: xr.DataArray) -> str:
    return f"{float(v):.6g}" if v.ndim == 0 else f"<{v.size} values over {v.dims}>"


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.dtype):
        return o.name
    if isinstance(o, type) and issubclass(o, np.generic):
        return np.dtype(o).name
    raise TypeError(f"not JSON-serializable: {o!r}")


def _check(data: Any) -> xr.DataArray:
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"`data` must be an xarray.DataArray; got {type(data).__name__}")
    if data.dtype.kind not in "iufb":
        raise TypeError(f"cannot transform dtype {data.dtype}")
    if not isinstance(data.data, da.Array):  # once, for the fit and the apply
        data = data.copy(data=in_memory_dask(np.asarray(data.data)))
    return data


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for float32/16 and integers up to 16 bits; float64 otherwise (no precision lost)."""
    if dtype.kind == "f":
        return np.dtype(np.float64) if dtype.itemsize >= 8 else np.dtype(np.float32)
    return np.dtype(np.float32) if dtype.itemsize <= 2 else np.dtype(np.float64)


def _out_spec(out_range: Any) -> tuple[float, float, np.dtype | None]:
    """``(lo, hi, integer dtype or None)`` from a float range or an integer dtype."""
    if isinstance(out_range, (str, np.dtype, type)):
        dt = np.dtype(out_range)
        if dt.kind not in "iu":
            raise ValueError(f"`out_range` as a dtype must be an integer dtype; got {dt}")
        info = np.iinfo(dt)
        return float(info.min), float(info.max), dt
    try:
        lo, hi = (float(v) for v in out_range)
    except (TypeError, ValueError):
        raise ValueError(f"`out_range` must be (lo, hi) or an integer dtype; got {out_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ValueError(f"`out_range` must be finite with lo < hi; got {out_range!r}")
    return lo, hi, None


def _finish(y: xr.DataArray, lo: float, hi: float, dtype: np.dtype | None, clip: bool) -> xr.DataArray:
    if clip or dtype is not None:
        y = y.clip(lo, hi)
    if dtype is not None:
        y = np.rint(y).astype(dtype)  # round half to even, as numpy
    return y


#: Fitted values larger than this (numbers) are summarized, not copied, in ``attrs`` and
#: provenance: per-slice tables of a large stack would dwarf the metadata (and take longer to
#: serialize than the transform takes to run). Such steps are fitted per part and are fitted
#: again on new data anyway (``volnorm apply``); ``fit_*`` returns them whole.
MAX_RECORDED_VALUES = 100_000


def _record(params: Params) -> dict[str, Any]:
    n = sum(int(v.size) for v in params.values.data_vars.values())
    if n <= MAX_RECORDED_VALUES:
        return params.to_dict()
    shapes = {k: dict(v.sizes) for k, v in params.values.data_vars.items()}
    return {"method": params.method, "options": params.options, "values": None, "values_shapes": shapes}


def _attach(y: xr.DataArray, data: xr.DataArray, params: Params) -> xr.DataArray:
    y.attrs = {k: v for k, v in data.attrs.items() if k not in ("volnorm_params",)}
    history = json.loads(data.attrs.get("volnorm_params", "[]"))
    y.attrs["volnorm_params"] = json.dumps(history + [_record(params)], default=_jsonable)
    return y.rename(data.name)


def _dim_option(data: xr.DataArray, dim: Dim) -> list[str] | None:
    if dim is None:
        return None
    _, reduced = _dims(data, dim)
    return [str(d) for d in reduced]


def _kept_values(ds: xr.Dataset, data: xr.DataArray) -> xr.Dataset:
    """Drop coords that would clash with the data's when broadcasting the fitted values."""
    return ds.drop_vars([c for c in ds.coords if c not in ds.dims])


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
    from volnorm.stats import quantile, summarize

    data = _check(data)
    kept, _ = _dims(data, dim)
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
            raise ValueError("no valid voxel to take a range from (all NaN or masked out)")
        lo, hi = s["min"], s["max"]
        how = {"in_range": "minmax"}
    else:
        lo_f, hi_f = (float(v) for v in in_range)
        if not (math.isfinite(lo_f) and math.isfinite(hi_f)) or lo_f > hi_f:
            raise ValueError(f"`in_range` must be finite (lo, hi) with lo <= hi; got {in_range!r}")
        lo, hi = xr.DataArray(lo_f), xr.DataArray(hi_f)
        how = {"in_range": [lo_f, hi_f]}
    values = xr.Dataset({"in_lo": lo.astype(np.float64), "in_hi": hi.astype(np.float64)})
    return Params("rescale", values, {**how, "dim": _dim_option(data, dim)})


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
        From :func:`fit_rescale` (e.g. on a training cohort): no fit pass.

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
    data = _check(data)
    out_lo, out_hi, out_dtype = _out_spec(out_range)
    if params is None:
        params = fit_rescale(data, in_range=in_range, percentiles=percentiles, dim=dim, mask=mask)
    elif params.method != "rescale":
        raise ValueError(f"`params` were fitted by {params.method!r}, not rescale")
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    span = v["in_hi"] - v["in_lo"]
    scale = xr.where(span > 0, (out_hi - out_lo) / span.where(span > 0, 1.0), 0.0)
    y = (data.astype(ft) - v["in_lo"].astype(ft)) * scale.astype(ft) + ft.type(out_lo)
    y = _finish(y.astype(ft), out_lo, out_hi, out_dtype, clip)
    params = Params("rescale", params.values, {**params.options, "out_range": [out_lo, out_hi], "out_dtype": None if out_dtype is None else out_dtype.name, "clip": clip})
    return _attach(y, data, params)


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
    from volnorm.stats import summarize

    data = _check(data)
    s = summarize(data, dim=dim, mask=mask, quantiles=())
    if np.any(s["count"].values == 0):
        raise ValueError("no valid voxel to take a mean from (all NaN or masked out)")
    return Params("zscore", xr.Dataset({"mean": s["mean"], "std": s["std"]}), {"dim": _dim_option(data, dim)})


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
        From :func:`fit_zscore` (e.g. on a training cohort): no fit pass; ``dim`` and ``mask``
        are then not used.

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
    data = _check(data)
    if params is None:
        params = fit_zscore(data, dim=dim, mask=mask)
    elif params.method != "zscore":
        raise ValueError(f"`params` were fitted by {params.method!r}, not zscore")
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    inv = xr.where(v["std"] > 0, 1.0 / v["std"].where(v["std"] > 0, 1.0), 0.0)
    y = ((data.astype(ft) - v["mean"].astype(ft)) * inv.astype(ft)).astype(ft)
    return _attach(y, data, params)


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
    from volnorm.stats import summarize

    data = _check(data)
    nz = data != 0
    m = nz if mask is None else nz & mask
    if per_volume:
        if "volume" not in data.dims:
            raise ValueError("per_volume=True needs a `volume` dim (a stack)")
        dim = tuple(d for d in data.dims if d != "volume")
    else:
        dim = None
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
        From :func:`fit_mean_scale`: no fit pass; ``target``, ``per_volume`` and ``mask`` are
        then not used.

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
    data = _check(data)
    if params is None:
        params = fit_mean_scale(data, target, per_volume=per_volume, mask=mask)
    elif params.method != "mean_scale":
        raise ValueError(f"`params` were fitted by {params.method!r}, not mean_scale")
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    y = (data.astype(ft) * (params.options["target"] / v["mean"]).astype(ft)).astype(ft)
    return _attach(y, data, params)


# ---------------------------------------------------------------------------
# power law and log, with the gain that maps the maximum to itself
# ---------------------------------------------------------------------------


def _fit_max(data: xr.DataArray, dim: Dim, mask: xr.DataArray | None, method: str, extra: dict) -> Params:
    from volnorm.stats import summarize

    s = summarize(data, dim=dim, mask=mask, quantiles=())
    if np.any(s["count"].values == 0):
        raise ValueError("no valid voxel (all NaN or masked out)")
    if np.nanmin(s["min"].values) < 0:
        raise ValueError(f"{method} needs non-negative data; the minimum is {float(np.nanmin(s['min'].values))!r} (rescale first)")
    return Params(method, xr.Dataset({"max": s["max"], "mean": s["mean"]}), {**extra, "dim": _dim_option(data, dim)})


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
        The exponent, a positive number (< 1 brightens, > 1 darkens). With ``params``, the
        exponent recorded in them is used.
    dim : str, sequence of str or None
        Dims the maximum is taken over: ``None`` = the whole dataset; ``("z", "y", "x")`` =
        one per volume.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used for the maximum (every voxel is
        transformed).
    params : Params, optional
        Recorded by an earlier call (:meth:`Params.from_dict` of its ``attrs["volnorm_params"]``
        entry): no max pass; ``dim`` and ``mask`` are then not used.

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
    data = _check(data)
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"`gamma` must be a positive number; got {gamma!r}")
    if params is None:
        params = _fit_max(data, dim, mask, "gamma", {"gamma": float(gamma)})
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    mx = v["max"].where(v["max"] > 0, 1.0).astype(ft)
    y = (mx * (data.astype(ft) / mx) ** ft.type(params.options["gamma"])).astype(ft)
    return _attach(y, data, params)


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
        An earlier call's parameters, as in :func:`gamma` (no max pass).

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
    data = _check(data)
    if params is None:
        params = _fit_max(data, dim, mask, "log", {})
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    gain = xr.where(v["max"] > 0, v["max"] / np.log1p(v["max"].where(v["max"] > 0, 1.0)), 0.0).astype(ft)
    y = (gain * np.log1p(data.astype(ft))).astype(ft)
    return _attach(y, data, params)


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
        Recorded by an earlier call (:meth:`Params.from_dict` of its ``attrs["volnorm_params"]``
        entry): no pass; ``dim`` and ``mask`` are then not used.

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
    data = _check(data)
    if params is None:
        params = _fit_max(data, dim, mask, "auto_gamma", {})
    v = _kept_values(params.values, data)
    ft = _float_dtype(data.dtype)
    ratio = (v["mean"] / v["max"].where(v["max"] > 0, 1.0))
    ok = (ratio > 0) & (ratio < 1)
    g = xr.where(ok, np.log(0.5) / np.log(ratio.where(ok, 0.5)), 1.0)
    mx = v["max"].where(v["max"] > 0, 1.0).astype(ft)
    y = (mx * (data.astype(ft) / mx) ** g.astype(ft)).astype(ft)
    return _attach(y, data, params)


# ---------------------------------------------------------------------------
# per-row maps: a table per index of the kept dims, applied blockwise
# ---------------------------------------------------------------------------


def map_rows(data: xr.DataArray, kept: tuple, func: Any, tables: Sequence[np.ndarray], dtype: Any) -> xr.DataArray:
    """Apply ``func(values_2d, *table_rows) -> values_2d`` chunk by chunk, where ``values_2d`` is
    ``(rows, n)`` for the block's indices of the ``kept`` dims and ``table_rows`` the matching rows of
    each ``tables[i]`` (shape ``(nrows_total, ...)``). Lazy; no communication between chunks."""
    reduced = tuple(d for d in data.dims if d not in kept)
    x = data.transpose(*kept, *reduced)
    xa = x.data if isinstance(x.data, da.Array) else in_memory_dask(np.asarray(x.data))
    nk = len(kept)
    kshape = tuple(x.sizes[d] for d in kept)

    def block(b: np.ndarray, block_info: Any = None) -> np.ndarray:
        rows = rows_of(block_info[0]["array-location"][:nk] if block_info else [], kshape)
        n_rows = len(rows)
        out = func(b.reshape(n_rows, -1), *[t[rows] for t in tables])
        return np.asarray(out, dtype=dtype).reshape(b.shape)

    # a fresh name: tokenizing the closure would pickle it (a third of the cost on small data)
    name = f"{getattr(func, '__name__', 'map')}-rows-{uuid.uuid4().hex}"
    ya = da.map_blocks(block, xa, dtype=dtype, meta=np.empty((0,) * xa.ndim, dtype=dtype), name=name)
    y = xr.DataArray(ya, dims=x.dims, coords=x.coords, name=data.name)
    return y.transpose(*data.dims)


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
    from volnorm._histogram import histogram_rows
    from volnorm.stats import summarize

    data = _check(data)
    kept, _ = _dims(data, dim)
    if data.dtype.kind in "iub":
        counts, centers = histogram_counts(data, dim, mask)
        centers = np.broadcast_to(centers, counts.shape)
    else:
        if isinstance(nbins, bool) or not isinstance(nbins, (int, np.integer)) or nbins <= 0:
            raise ValueError(f"`nbins` must be a positive int; got {nbins!r}")
        s = summarize(data, dim=dim, mask=mask, quantiles=())
        lo, hi = s["min"].values.reshape(-1), s["max"].values.reshape(-1)
        if np.any(np.isnan(lo)):
            raise ValueError("no valid voxel to equalize (all NaN or masked out" + (" for some index)" if kept else ")"))
        et = np.result_type(data.dtype, np.float16)
        edges = np.empty((len(lo), nbins + 1))
        for r, (a, b) in enumerate(zip(lo, hi)):
            a, b = data.dtype.type(a), data.dtype.type(b)  # numpy's rules, as np.histogram(part)
            if a == b:
                a, b = a - 0.5, b + 0.5
            edges[r] = np.linspace(a, b, nbins + 1, dtype=et)
        counts = histogram_rows(data, dim, edges, mask)[:, :nbins]
        e32 = edges.astype(et)
        centers = ((e32[:, :-1] + e32[:, 1:]) / et.type(2)).astype(np.float64)  # scikit-image's centres
    if np.any(counts.sum(axis=1) == 0):
        raise ValueError("no valid voxel to equalize (all NaN or masked out" + (" for some index)" if kept else ")"))
    shape = tuple(data.sizes[d] for d in kept)
    coords = {d: data[d] for d in kept if d in data.coords}
    values = xr.Dataset(
        {
            "counts": ((*kept, "bin"), counts.reshape(shape + (-1,))),
            "centers": ((*kept, "bin"), np.ascontiguousarray(centers).reshape(shape + (-1,))),
        },
        coords=coords,
    )
    return Params("equalize", values, {"nbins": int(nbins), "dtype": data.dtype.name, "dim": _dim_option(data, dim)})


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
    to ``skimage.exposure.equalize_hist`` per slice, to float32 precision.

    Integer output (``out_range="uint8"`` or another integer dtype, max ``M``)
    follows OpenCV's ``equalizeHist``: ``y = round((C(x) - C_min) * M / (N - C_min))``
    with ``C`` the cumulative count, ``C_min`` the count of the lowest occupied
    bin and ``N`` the total - equal to ``cv2.equalizeHist`` on uint8 slices.

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
        From :func:`fit_equalize`: no fit pass; ``nbins``, ``dim`` and ``mask`` are then not used.
        Per-part parameters only apply to data with the same sizes along the kept dims.

    Returns
    -------
    xarray.DataArray
        Lazy; float output is float32 for float32/16 input and float64 otherwise (as
        scikit-image), integer output has the ``out_range`` dtype; the fitted parameters in
        ``attrs["volnorm_params"]``. Computes: the fit passes only.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 0, 1, 3], dtype="uint8"), dims="x")
    >>> vn.equalize(x).values.tolist()
    [0.5, 0.5, 0.75, 1.0]
    >>> vn.equalize(x, out_range="uint8").values.tolist()
    [0, 0, 128, 255]
    """
    data = _check(data)
    if params is None:
        params = fit_equalize(data, nbins, dim=dim, mask=mask)
    elif params.method != "equalize":
        raise ValueError(f"`params` were fitted by {params.method!r}, not equalize")
    out_lo, out_hi, out_dtype = _out_spec(out_range)
    h = params.values["counts"]
    kept = tuple(d for d in h.dims if d != "bin")
    for d in kept:
        if d not in data.dims or data.sizes[d] != h.sizes[d]:
            raise ValueError(
                f"these equalize parameters were fitted per {d!r} on {h.sizes[d]} of them; the data have "
                f"{data.sizes.get(d, 0)}: fit again (per-part parameters belong to the data they were fitted on)"
            )
    counts = h.values.reshape(-1, h.sizes["bin"]).astype(np.int64, copy=False)
    centers = params.values["centers"].values.reshape(counts.shape)
    src_dtype = np.dtype(params.options.get("dtype", data.dtype.name))
    ft = np.dtype(np.float32) if src_dtype in (np.float32, np.float16) else np.dtype(np.float64)  # scikit-image's
    total = counts.sum(axis=1, keepdims=True)
    cum = np.cumsum(counts, axis=1)
    if out_dtype is None:  # scikit-image: cdf = cumsum / total, in its float type
        table = (cum / total.astype(np.float64)).astype(ft)
        res_dtype = ft
    else:  # OpenCV: cvRound(float(C - C_min) * (M / float(N - C_min))), all in float32 as OpenCV
        first = counts[np.arange(len(counts)), np.argmax(counts > 0, axis=1)][:, None]
        step = np.float32(out_hi - out_lo) / np.maximum(total - first, 1).astype(np.float32)
        cum -= first
        table = np.maximum(cum, 0, out=cum).astype(np.float32)
        table *= step  # in output units from out_lo
        res_dtype = out_dtype
    scale, offset = (out_hi - out_lo), out_lo

    def finish(vals: np.ndarray) -> np.ndarray:
        if out_dtype is None:
            return vals if (out_lo, out_hi) == (0.0, 1.0) else (vals * ft.type(scale) + ft.type(offset)).astype(ft)
        vals = np.rint(vals)  # half to even, as cvRound
        vals += vals.dtype.type(offset)
        return np.clip(vals, out_lo, out_hi, out=vals).astype(out_dtype)

    if src_dtype.kind in "iub":
        lut = finish(table)  # one output value per input value and row: a look-up table
        lo = int(centers[0][0])
        if out_dtype is not None:  # OpenCV leaves a one-value image as it is
            occupied = np.argmax(counts > 0, axis=1)
            const = counts[np.arange(len(counts)), occupied] == total[:, 0]
            lut[const, occupied[const]] = np.clip(centers[const, occupied[const]], out_lo, out_hi).astype(out_dtype)

        def apply(v: np.ndarray, t: np.ndarray) -> np.ndarray:
            from volnorm import _kernels

            out = np.empty(v.shape, dtype=t.dtype)
            v = np.ascontiguousarray(v)
            if v.dtype.itemsize == 1:  # a 256-entry table per row: a plain gather
                byte = np.arange(256, dtype=np.uint8).view(v.dtype).astype(np.int64)
                t = t[:, np.clip(byte - lo, 0, t.shape[1] - 1)]
                _kernels.gather_rows(v.view(np.uint8), np.ascontiguousarray(t), out)
            else:
                _kernels.lut_rows(v, np.ascontiguousarray(t), lo, out)
            return out

        y = map_rows(data, kept, apply, [lut], res_dtype)
    else:

        def apply(v: np.ndarray, t: np.ndarray, cen: np.ndarray) -> np.ndarray:
            out = np.empty(v.shape, dtype=np.float64)
            for i in range(v.shape[0]):
                out[i] = np.interp(v[i], cen[i], t[i])
            return finish(out.astype(ft) if out_dtype is None else out.astype(np.float32))

        y = map_rows(data, kept, apply, [table, centers], res_dtype)
    params = Params("equalize", params.values, {**params.options, "out_range": [out_lo, out_hi], "out_dtype": None if out_dtype is None else out_dtype.name})
    return _attach(y, data, params)


# ---------------------------------------------------------------------------
# histogram matching and Nyúl-Udupa standardization
# ---------------------------------------------------------------------------


def _cdf_table(data: xr.DataArray, dim: Dim, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Per index of the kept dims, the empirical CDF as scikit-image takes it (the fraction of
    voxels <= each value): ``(values, fractions, edges, kept)``. Integers: one point per value.
    Floats: a 4096-bin histogram, each bin one point at its centre (``edges`` bin the voxels)."""
    from volnorm.stats import FLOAT_BINS

    is_int = data.dtype.kind in "iub"
    h = histogram(data, bins=None if is_int else FLOAT_BINS, dim=dim, mask=mask).compute()
    counts = h.values.reshape(-1, h.sizes["bin"]).astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    if np.any(total == 0):
        raise ValueError("no valid voxel to take a histogram of (all NaN or masked out)")
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
    results differ by about a reference bin). Computes: the histogram passes; the map is lazy.

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
    data = _check(data)
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
    ft = _float_dtype(data.dtype) if data.dtype.kind == "f" else np.dtype(np.float64)
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
    params = Params("match_histogram", xr.Dataset({"reference_values": ("value", t_values), "reference_cdf": ("value", t_q)}), {"dim": _dim_option(data, dim)})
    return _attach(y, data, params)


#: Nyúl's default landmarks: the 1st and 99th percentiles and the deciles between.
NYUL_PERCENTILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)


def _volume_dims(data: xr.DataArray) -> tuple:
    if "volume" not in data.dims:
        raise ValueError("Nyúl standardization works per volume: the data need a `volume` dim (a stack)")
    return tuple(d for d in data.dims if d != "volume")


#: Volumes whose landmarks are found in one go: memory stays flat in the number of volumes.
NYUL_BATCH = 16


def _landmarks(data: xr.DataArray, ps: np.ndarray, mask: xr.DataArray | None) -> np.ndarray:
    """Each volume's exact percentiles ``ps``, ``NYUL_BATCH`` volumes at a time: ``(volumes, landmarks)``."""
    from volnorm.stats import quantile

    dims = _volume_dims(data)
    out = []
    for start in range(0, data.sizes["volume"], NYUL_BATCH):
        sel = {"volume": slice(start, start + NYUL_BATCH)}
        m = mask.isel(sel) if mask is not None and "volume" in mask.dims else mask
        q = quantile(data.isel(sel), list(ps / 100), dim=dims, mask=m)
        out.append(q.transpose("volume", "quantile").values)
    return np.concatenate(out)


def nyul_fit(
    data: xr.DataArray,
    *,
    mask: xr.DataArray | None = None,
    percentiles: Sequence[float] = NYUL_PERCENTILES,
    standard_range: tuple[float, float] = (1.0, 100.0),
) -> Params:
    """Learn Nyúl-Udupa standard landmarks over a stack of volumes, streaming.

    Each volume's landmarks are its exact ``percentiles`` (of the masked voxels, one
    histogram per volume, in parallel - memory does not grow with the number of volumes);
    they are mapped linearly so that the first and last land on ``standard_range``, and the
    standard landmarks are their mean over the volumes (Nyúl & Udupa 1999; Shah et al. 2018,
    as in intensity-normalization and TorchIO). Computes: the quantile passes.

    Parameters
    ----------
    data : xarray.DataArray
        A stack ``("volume", ...)``: the training volumes.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data`` (one mask for all volumes, or one per volume along ``volume``);
        only ``True`` voxels give each volume's percentiles.
    percentiles : sequence of float
        The landmarks, increasing within [0, 100], at least two (default: 1, 10, 20, ..., 90, 99).
    standard_range : (lo, hi)
        Where the first and last landmarks are mapped, ``lo < hi``.

    Returns
    -------
    Params
        Method ``"nyul"``: the ``standard`` landmarks and their ``percentiles`` (dim
        ``landmark``), ``standard_range`` and ``n_volumes`` in ``options``; for :func:`nyul_apply`.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.stack([np.arange(101.0), 2 * np.arange(101.0)]), dims=("volume", "x"))
    >>> p = vn.nyul_fit(x, percentiles=(0, 50, 100), standard_range=(0, 10))
    >>> p.values["standard"].values.tolist()
    [0.0, 5.0, 10.0]
    """

    data = _check(data)
    ps = np.asarray(percentiles, dtype=np.float64)
    if ps.ndim != 1 or len(ps) < 2 or np.any(np.diff(ps) <= 0) or ps[0] < 0 or ps[-1] > 100:
        raise ValueError(f"`percentiles` must increase within [0, 100], at least two; got {percentiles!r}")
    s_lo, s_hi = (float(v) for v in standard_range)
    if not s_lo < s_hi:
        raise ValueError(f"`standard_range` must be (lo, hi) with lo < hi; got {standard_range!r}")
    land = _landmarks(data, ps, mask)
    span = land[:, -1] - land[:, 0]
    if np.any(span <= 0):
        bad = [str(v) for v in np.asarray(data["volume"].values)[span <= 0]] if "volume" in data.coords else list(np.flatnonzero(span <= 0))
        raise ValueError(f"volumes {bad} are constant between the first and last landmark: nothing to standardize")
    mapped = s_lo + (land - land[:, :1]) / span[:, None] * (s_hi - s_lo)
    values = xr.Dataset({"standard": ("landmark", mapped.mean(axis=0)), "percentiles": ("landmark", ps)})
    return Params("nyul", values, {"standard_range": [s_lo, s_hi], "n_volumes": int(land.shape[0])})


def nyul_apply(data: xr.DataArray, landmarks: Params, *, mask: xr.DataArray | None = None) -> xr.DataArray:
    """Map each volume piecewise-linearly from its own landmarks (its percentiles, as in the fit)
    to the standard landmarks of :func:`nyul_fit`; linear extrapolation beyond the end
    landmarks, as intensity-normalization does. Computes: each volume's quantile pass; the map is lazy.

    Parameters
    ----------
    data : xarray.DataArray
        A stack ``("volume", ...)`` to standardize (the training volumes or new ones).
    landmarks : Params
        From :func:`nyul_fit`.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels give each volume's own landmarks (every
        voxel is mapped).

    Returns
    -------
    xarray.DataArray
        Lazy; float32 for float32/16 and up to 16-bit integer input, float64 otherwise; the
        standard landmarks and each volume's own (``volume_landmarks``) in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> train = xr.DataArray(np.stack([np.arange(101.0), 2 * np.arange(101.0)]), dims=("volume", "x"))
    >>> p = vn.nyul_fit(train, percentiles=(0, 50, 100), standard_range=(0, 10))
    >>> vn.nyul_apply(train, p).values[:, [0, 50, 100]].tolist()
    [[0.0, 5.0, 10.0], [0.0, 5.0, 10.0]]
    """

    data = _check(data)
    if landmarks.method != "nyul":
        raise ValueError(f"`landmarks` were fitted by {landmarks.method!r}, not nyul_fit")
    ps = landmarks.values["percentiles"].values
    std = landmarks.values["standard"].values
    land = _landmarks(data, ps, mask)
    ft = _float_dtype(data.dtype)

    def apply(v: np.ndarray, lm: np.ndarray) -> np.ndarray:
        out = np.empty(v.shape, dtype=np.float64)
        for i in range(v.shape[0]):
            xp, x = lm[i], v[i].astype(np.float64)
            y = np.interp(x, xp, std)
            lo, hi = x < xp[0], x > xp[-1]  # extrapolate with the end segments' slopes
            y[lo] = std[0] + (x[lo] - xp[0]) * (std[1] - std[0]) / max(xp[1] - xp[0], 1e-300)
            y[hi] = std[-1] + (x[hi] - xp[-1]) * (std[-1] - std[-2]) / max(xp[-1] - xp[-2], 1e-300)
            out[i] = y
        return out.astype(ft)

    y = map_rows(data, ("volume",), apply, [land], ft)
    params = Params("nyul", landmarks.values.assign(volume_landmarks=(("volume", "landmark"), land)), landmarks.options)
    return _attach(y, data, params)


# ---------------------------------------------------------------------------
# binarization and dithering
# ---------------------------------------------------------------------------


def binarize(
    data: xr.DataArray,
    threshold: float | xr.DataArray | None = None,
    *,
    method: str = "otsu",
    dim: Dim = None,
    mask: xr.DataArray | None = None,
    inclusive: bool = False,
    upper: float | None = None,
    invert: bool = False,
    **kwargs: Any,
) -> xr.DataArray:
    """Foreground mask ``x > threshold`` (scikit-image's convention), lazily.

    FSL's ``fslmaths`` spellings: ``-thr t -bin`` is ``binarize(x, t, inclusive=True)``
    (``x >= t``), adding ``-uthr u`` is ``upper=u`` (``x <= u``), and ``-binv`` is
    ``invert=True``. NaN voxels are never foreground (before ``invert``).

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data (integer, float or bool), numpy or dask backed.
    threshold : float or xarray.DataArray, optional
        ``threshold`` is a number (or per-index DataArray); without it, ``method`` computes one
        over ``dim`` with :func:`volnorm.threshold` (dataset-wide by default).
    method : str
        One of :func:`volnorm.threshold`'s methods that gives one threshold (not ``"multiotsu"``);
        used only without ``threshold``.
    dim : str, sequence of str or None
        Dims the computed threshold is taken over: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one per volume. Used only without ``threshold``.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; only ``True`` voxels are used to compute the threshold. The
        result is not masked: every voxel is compared.
    inclusive : bool
        ``x >= threshold`` instead of ``x > threshold`` (FSL's ``-thr``).
    upper : float, optional
        Also require ``x <= upper`` (FSL's ``-uthr``).
    invert : bool
        Negate the result (FSL's ``-binv``); NaN voxels then come out ``True``.
    kwargs : dict
        Passed on to :func:`volnorm.threshold` (``bins``, ``classes``, ``q``) when it computes
        the threshold.

    Returns
    -------
    xarray.DataArray
        Lazy bool, named as ``data``. Computes: the threshold's passes when ``threshold`` is
        not given.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0, 10, 20, 30], dtype="uint8"), dims="x")
    >>> vn.binarize(x, 10).values.tolist(), vn.binarize(x, 10, inclusive=True, upper=20).values.tolist()
    ([False, False, True, True], [False, True, True, False])
    """
    from volnorm.transforms.thresholds import threshold as _threshold

    data = _check(data)
    if threshold is None:
        t = _threshold(data, method, dim=dim, mask=mask, **kwargs)
        if "threshold" in t.dims:
            raise ValueError(f"method {method!r} gives several thresholds; pick one or use vn.threshold")
        t = t.drop_vars([c for c in t.coords if c not in t.dims])
    else:
        t = threshold
    y = (data >= t) if inclusive else (data > t)
    if upper is not None:
        y = y & (data <= upper)
    if invert:
        y = ~y
    return y.rename(data.name)


#: The 8x8 Bayer index matrix (ordered dithering), thresholds (i + 0.5) / 64.
BAYER8 = np.array(
    [
        [0, 32, 8, 40, 2, 34, 10, 42], [48, 16, 56, 24, 50, 18, 58, 26],
        [12, 44, 4, 36, 14, 46, 6, 38], [60, 28, 52, 20, 62, 30, 54, 22],
        [3, 35, 11, 43, 1, 33, 9, 41], [51, 19, 59, 27, 49, 17, 57, 25],
        [15, 47, 7, 39, 13, 45, 5, 37], [63, 31, 55, 23, 61, 29, 53, 21],
    ]
)


def dither(
    data: xr.DataArray,
    method: str = "bayer",
    *,
    in_range: str | tuple[float, float] = "minmax",
    dims: tuple[Hashable, Hashable] = ("y", "x"),
) -> xr.DataArray:
    """Binarize grey levels by dithering, keeping the local mean intensity (unlike a threshold,
    which discards it, or random binomial sampling, which adds noise at every scale).

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data with both ``dims``.
    method : {"bayer", "floyd-steinberg"}
        ``"bayer"``: ordered dithering with the 8x8 Bayer matrix tiled over ``dims`` in
        global coordinates - blockwise, seamless across chunks. ``"floyd-steinberg"``: error
        diffusion in raster order over each ``dims`` plane - planes are kept whole in a chunk
        (rechunked if needed).
    in_range : "minmax" or (lo, hi)
        The data are first rescaled to [0, 1] over ``in_range`` (fitted on the whole dataset by
        default), as :func:`rescale` does, clipping values outside it.
    dims : (str, str)
        The plane that is dithered.

    Returns
    -------
    xarray.DataArray
        Returns a lazy bool array. It has the dims and name of ``data``. Computes: the
        min/max pass for ``in_range="minmax"``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> grey = xr.DataArray(np.full((64, 64), 0.25), dims=("y", "x"))   # 25 % grey
    >>> b, f = vn.dither(grey, in_range=(0, 1)), vn.dither(grey, "floyd-steinberg", in_range=(0, 1))
    >>> float(b.mean()), round(float(f.mean()), 3)   # error leaving the last row/column is lost
    (0.25, 0.243)
    """
    from volnorm import _kernels

    data = _check(data)
    if method not in ("bayer", "floyd-steinberg"):
        raise ValueError(f"`method` must be 'bayer' or 'floyd-steinberg'; got {method!r}")
    for d in dims:
        if d not in data.dims:
            raise ValueError(f"dither works over the plane {dims!r}; the data have dims {data.dims!r}")
    g = rescale(data, in_range, out_range=(0.0, 1.0), clip=True)
    g = g.transpose(..., *dims)
    ga = g.data if isinstance(g.data, da.Array) else da.from_array(np.asarray(g.data), chunks=-1)
    if method == "bayer":
        def block(b: np.ndarray, block_info: Any = None) -> np.ndarray:
            (y0, _), (x0, _) = block_info[0]["array-location"][-2:]
            yy = (np.arange(y0, y0 + b.shape[-2]) % 8)[:, None]
            xx = (np.arange(x0, x0 + b.shape[-1]) % 8)[None, :]
            return b > (BAYER8[yy, xx] + 0.5) / 64.0

        out = da.map_blocks(block, ga, dtype=bool, meta=np.empty((0,) * ga.ndim, dtype=bool))
    else:
        ga = ga.rechunk({ga.ndim - 2: -1, ga.ndim - 1: -1})

        def block_fs(b: np.ndarray) -> np.ndarray:
            planes = np.ascontiguousarray(b).reshape(-1, b.shape[-2], b.shape[-1])
            res = np.zeros(planes.shape, dtype=np.uint8)
            _kernels.floyd_steinberg(planes, res)
            return res.reshape(b.shape).astype(bool)

        out = da.map_blocks(block_fs, ga, dtype=bool, meta=np.empty((0,) * ga.ndim, dtype=bool))
    y = xr.DataArray(out, dims=g.dims, coords=g.coords, name=data.name).transpose(*data.dims)
    return y


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
    intensities are quantized to 14 bits inside. Lazy; float output in [0, 1].

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
    from skimage import exposure

    data = _check(data)
    dim = tuple(dim)
    missing = [d for d in dim if d not in data.dims]
    if missing or not 2 <= len(dim) <= 3:
        raise ValueError(f"`dim` must name 2 or 3 of the data's dims {data.dims!r}; got {dim!r}")
    if not (0 <= clip_limit <= 1):
        raise ValueError(f"`clip_limit` must be in [0, 1]; got {clip_limit!r}")
    x = data.transpose(..., *dim)
    xa = x.data if isinstance(x.data, da.Array) else da.from_array(np.asarray(x.data))
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
    return _attach(y, data, params)

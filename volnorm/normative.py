"""Per-voxel statistics from per-voxel histograms, and normative scores of new volumes.

A per-voxel histogram (``vn.histogram(stack, dim="volume")``: dims ``(..., "bin")``)
describes, for every voxel, the distribution of a cohort's intensities there. These
functions read it lazily, block by block (nothing is computed before asked), and
treat each bin's values as spread uniformly over the bin, so a quantile or a CDF
value is exact to within one bin width. Values outside the histogram's range
(``n_below``, ``n_above``) count in the CDF (they are below / above every bin) but
not in the mean and standard deviation, whose values they do not carry; NaN and
masked-out values count nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

__all__ = ["normative_score", "voxel_cdf", "voxel_quantile", "voxel_stats"]


def _check_hist(h: xr.DataArray) -> xr.DataArray:
    if not isinstance(h, xr.DataArray) or "bin" not in h.dims or "bin_lower" not in h.coords:
        raise TypeError("expected a per-voxel histogram from vn.histogram(stack, dim='volume') (a DataArray with a 'bin' dim)")
    if h.dims[-1] != "bin":
        h = h.transpose(..., "bin")
    return h


def _extra(h: xr.DataArray, name: str) -> xr.DataArray:
    return h[f"n_{name}"].astype(np.float64) if f"n_{name}" in h.coords else xr.zeros_like(h.isel(bin=0), dtype=np.float64)


def _outside(h: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """Per voxel, the values below every bin (below the range, -Inf) and above every bin."""
    return _extra(h, "below") + _extra(h, "neginf"), _extra(h, "above") + _extra(h, "posinf")


def voxel_stats(h: xr.DataArray) -> xr.Dataset:
    """Per voxel: the number of cohort values, their (binned) mean and standard deviation.

    ``count`` counts every value that is not NaN or masked out (those outside the
    range included); ``mean``/``std`` come from the binned values inside the range,
    each taken at its bin's centre (within half a bin width of the true values;
    ``n_inside`` says how many). Lazy.

    Parameters
    ----------
    h : xarray.DataArray
        A per-voxel histogram (``vn.histogram(stack, dim="volume")`` or
        :func:`volnorm.open_voxel_histogram`): dims ``(..., "bin")``.

    Returns
    -------
    xarray.Dataset
        float64 over the voxel dims: ``count``, ``n_inside``, ``mean`` and ``std`` (population;
        NaN where no value is inside the range).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> stack = xr.DataArray(np.array([[1.5, 3.5], [2.5, 3.5]]), dims=("volume", "x"))
    >>> s = vn.voxel_stats(vn.histogram(stack, dim="volume", bins=4, range=(0, 4)))
    >>> s["mean"].values.tolist(), s["std"].values.tolist()
    ([2.0, 3.5], [0.5, 0.0])
    """
    h = _check_hist(h)
    c = h.astype(np.float64)
    centers = h["bin"]
    n_in = c.sum("bin")
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (c * centers).sum("bin") / n_in
        var = (c * (centers - mean) ** 2).sum("bin") / n_in
    below, above = _outside(h)
    count = n_in + below + above
    drop = [k for k in h.coords if str(k).startswith("n_") or k in ("bin", "bin_lower", "bin_upper")]
    out = xr.Dataset({"count": count, "n_inside": n_in, "mean": mean, "std": np.sqrt(var)})
    return out.drop_vars([k for k in drop if k in out.coords])


def _quantile_block(c: np.ndarray, below: np.ndarray, above: np.ndarray, lower: np.ndarray, upper: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """``c`` (voxels..., bins) float counts -> (voxels..., len(qs)): the inverse of the CDF that is
    linear inside each bin; ranks below/above the range give -inf/+inf; no value gives NaN."""
    cum = np.cumsum(c, axis=-1) + below[..., None]
    n = cum[..., -1] + above
    out = np.full(c.shape[:-1] + (len(qs),), np.nan)
    for j, q in enumerate(qs):
        target = q * n  # the fraction of the cohort at or below the answer
        if q > 0:  # the first bin whose cumulative count reaches it
            k = np.sum(cum < target[..., None], axis=-1)
        else:  # the minimum: the first occupied bin
            k = np.sum(cum <= below[..., None], axis=-1)
        inside = k < c.shape[-1]
        kk = np.minimum(k, c.shape[-1] - 1)
        cnt = np.take_along_axis(c, kk[..., None], -1)[..., 0]
        before = np.take_along_axis(cum, kk[..., None], -1)[..., 0] - cnt
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(cnt > 0, (target - before) / cnt, 0.0)
        v = lower[kk] + np.clip(frac, 0.0, 1.0) * (upper[kk] - lower[kk])
        low = (below > 0) & (target <= below)  # among the values below the range
        v = np.where(low, -np.inf, np.where(inside, v, np.inf))
        out[..., j] = np.where(n > 0, v, np.nan)
    return out


def voxel_quantile(h: xr.DataArray, q: float | Sequence[float]) -> xr.DataArray:
    """Per-voxel quantiles of the cohort (``q`` in [0, 1]), lazily, to within one bin width.

    The CDF is linear inside each bin (values spread uniformly); a quantile among the
    values below (above) the range is ``-inf`` (``+inf``); a voxel without values gives NaN.

    Parameters
    ----------
    h : xarray.DataArray
        A per-voxel histogram (``vn.histogram(stack, dim="volume")`` or
        :func:`volnorm.open_voxel_histogram`): dims ``(..., "bin")``.
    q : float or sequence of float
        In [0, 1].

    Returns
    -------
    xarray.DataArray
        float64 named ``quantile`` over the voxel dims, plus a last ``quantile`` dim when ``q``
        is a sequence.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> stack = xr.DataArray(np.array([[0.5], [1.5], [2.5], [3.5]]), dims=("volume", "x"))
    >>> h = vn.histogram(stack, dim="volume", bins=4, range=(0, 4))
    >>> vn.voxel_quantile(h, [0.25, 0.5]).values.tolist()
    [[1.0, 2.0]]
    """
    h = _check_hist(h)
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    if qs.ndim != 1 or np.any(~np.isfinite(qs)) or np.any((qs < 0) | (qs > 1)):
        raise ValueError(f"`q` must be in [0, 1]; got {q!r}")
    lower, upper = h["bin_lower"].values, h["bin_upper"].values
    res = xr.apply_ufunc(
        _quantile_block, h.astype(np.float64), *_outside(h),
        kwargs={"lower": lower, "upper": upper, "qs": qs},
        input_core_dims=[["bin"], [], []], output_core_dims=[["quantile"]],
        dask="parallelized", output_dtypes=[np.float64], dask_gufunc_kwargs={"output_sizes": {"quantile": len(qs)}},
    )
    res = res.drop_vars([k for k in res.coords if str(k).startswith("n_")]).assign_coords(quantile=qs).rename("quantile")
    return res if np.ndim(q) else res.isel(quantile=0, drop=True)


def _cdf_block(c: np.ndarray, below: np.ndarray, above: np.ndarray, v: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """The fraction of the cohort at or below ``v``, per voxel (linear inside the bin holding ``v``)."""
    cum = np.cumsum(c, axis=-1)
    n = cum[..., -1] + below + above
    nb = c.shape[-1]
    vv = np.where(np.isnan(v), 0.0, v)
    k = np.clip(np.searchsorted(upper, vv, side="left"), 0, nb - 1)  # the bin holding v
    cnt = np.take_along_axis(c, k[..., None], -1)[..., 0]
    before = np.take_along_axis(cum, k[..., None], -1)[..., 0] - cnt
    width = upper[k] - lower[k]
    frac = np.clip((vv - lower[k]) / width, 0.0, 1.0)
    at = below + before + frac * cnt
    at = np.where(vv < lower[0], below * 0.0, at)  # below the range: the values below it are not placed; count none
    at = np.where(vv >= upper[-1], n - above, at)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = at / n
    return np.where(np.isnan(v) | (n == 0), np.nan, out)


def voxel_cdf(h: xr.DataArray, values: xr.DataArray) -> xr.DataArray:
    """Per voxel, the fraction of the cohort at or below ``values`` (a volume on the histogram's
    grid), lazily: bins wholly below count fully, the bin holding the value in proportion.

    Values below the range give 0 (where the cohort's values below the range are, is not
    known); values at or above its top give the fraction not above it. NaN gives NaN.

    Parameters
    ----------
    h : xarray.DataArray
        A per-voxel histogram (``vn.histogram(stack, dim="volume")`` or
        :func:`volnorm.open_voxel_histogram`): dims ``(..., "bin")``.
    values : xarray.DataArray
        A volume on the histogram's grid: its voxel dims, with the same sizes (other dims, e.g.
        ``volume``, broadcast).

    Returns
    -------
    xarray.DataArray
        float64 fractions in [0, 1], named ``cdf``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> stack = xr.DataArray(np.array([[0.5], [1.5], [2.5], [3.5]]), dims=("volume", "x"))
    >>> h = vn.histogram(stack, dim="volume", bins=4, range=(0, 4))
    >>> vn.voxel_cdf(h, xr.DataArray([2.0], dims="x")).values.tolist()
    [0.5]
    """
    h = _check_hist(h)
    spatial = [d for d in h.dims if d != "bin"]
    if not isinstance(values, xr.DataArray):
        raise TypeError(f"`values` must be an xarray.DataArray on the histogram's grid; got {type(values).__name__}")
    missing = [d for d in spatial if d not in values.dims]
    wrong = [d for d in spatial if d in values.dims and values.sizes[d] != h.sizes[d]]
    if missing or wrong:
        raise ValueError(
            f"the volume's grid {dict(values.sizes)} is not the histograms' { {d: h.sizes[d] for d in spatial} }: "
            "register it to the cohort's space first"
        )
    lower, upper = h["bin_lower"].values, h["bin_upper"].values
    res = xr.apply_ufunc(
        _cdf_block, h.astype(np.float64), *_outside(h),
        values.astype(np.float64),
        kwargs={"lower": lower, "upper": upper},
        input_core_dims=[["bin"], [], [], []], output_core_dims=[[]],
        dask="parallelized", output_dtypes=[np.float64],
    )
    return res.drop_vars([k for k in res.coords if str(k).startswith("n_")]).rename("cdf")


def normative_score(volume: xr.DataArray, histograms: xr.DataArray) -> xr.Dataset:
    """Score a new volume voxel by voxel against a cohort's per-voxel histograms.

    Parameters
    ----------
    volume : xarray.DataArray
        The new volume, on the cohort's grid (the histograms' voxel dims and sizes; the same
        affine when both record one).
    histograms : xarray.DataArray
        The cohort's per-voxel histograms (``vn.histogram(stack, dim="volume")`` or
        :func:`volnorm.open_voxel_histogram`): dims ``(..., "bin")``.

    Returns
    -------
    xarray.Dataset
        Returns a lazy Dataset on the volume's grid: ``percentile`` (0-100, the share of
        the cohort at or below the voxel's value, :func:`voxel_cdf`) and ``zscore``
        (``(value - mean) / std`` with the cohort's binned per-voxel mean and standard
        deviation, :func:`voxel_stats`; NaN where the cohort has no spread), both float32. The
        volume's attrs (affine, NIfTI header) are kept so the scores export with
        :func:`volnorm.to_nifti`.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> stack = xr.DataArray(np.array([[0.5, 1.5], [1.5, 1.5], [2.5, 3.5], [3.5, 3.5]]), dims=("volume", "x"))
    >>> h = vn.histogram(stack, dim="volume", bins=4, range=(0, 4))
    >>> s = vn.normative_score(xr.DataArray([2.0, 3.5], dims="x"), h)
    >>> s["percentile"].values.tolist(), s["zscore"].values.round(3).tolist()
    ([50.0, 75.0], [0.0, 1.0])
    """
    grid = histograms.attrs.get("grid") if isinstance(histograms, xr.DataArray) else None
    if (
        isinstance(grid, dict) and "affine" in grid and "affine" in volume.attrs
        and not np.allclose(np.asarray(volume.attrs["affine"], dtype=np.float64), np.asarray(grid["affine"]), atol=1e-5)
    ):
        raise ValueError("the volume's affine differs from the cohort's: register it to the cohort's space first")
    st = voxel_stats(histograms)
    v = volume.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (v - st["mean"]) / st["std"].where(st["std"] > 0)
    pct = voxel_cdf(histograms, volume) * 100.0
    out = xr.Dataset({"percentile": pct.astype(np.float32), "zscore": z.astype(np.float32)}).transpose(*volume.dims)
    attrs = dict(volume.attrs)
    if "nifti_scaled" in attrs:  # new float maps: not the scaled integers of the volume's header
        attrs["nifti_scaled"] = False
    for k in out.data_vars:
        out[k].attrs = dict(attrs)
    out.attrs = attrs
    return out


def scores_stack(scores: xr.Dataset) -> xr.DataArray:
    """The maps of :func:`normative_score` as one stack, a volume each (``percentile``,
    ``zscore``), for :func:`volnorm.to_zarr`: a NIfTI-derived volume gives one NIfTI-Zarr
    group per map, with the volume's geometry.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> from volnorm.normative import scores_stack
    >>> h = vn.histogram(xr.DataArray(np.array([[0.5], [1.5]]), dims=("volume", "x")), dim="volume", bins=2, range=(0, 2))
    >>> scores_stack(vn.normative_score(xr.DataArray([1.0], dims="x"), h))["volume"].values.tolist()
    ['percentile', 'zscore']
    """
    names = ["percentile", "zscore"]
    stack = xr.concat([scores[n] for n in names], dim="volume", coords="minimal", compat="override", combine_attrs="override")
    stack = stack.assign_coords(volume=names)
    attrs = dict(scores.attrs)
    headers = attrs.get("nifti_headers")
    if isinstance(headers, dict) and len(headers) == 1:  # the volume's header, for each map
        attrs["nifti_headers"] = dict.fromkeys(names, next(iter(headers.values())))
    return stack.rename("scores").assign_attrs(attrs)

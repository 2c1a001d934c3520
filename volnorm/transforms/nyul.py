"""Nyúl-Udupa standardization: standard landmarks learned over a stack, each volume mapped
piecewise-linearly from its own landmarks onto them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from volnorm._dims import volume_dims
from volnorm.params import Params, attach, check
from volnorm.stats import quantile
from volnorm.transforms.common import check_data, float_dtype, map_rows

__all__ = ["NYUL_BATCH", "NYUL_PERCENTILES", "nyul_apply", "nyul_fit"]


#: Nyúl's default landmarks: the 1st and 99th percentiles and the deciles between.
NYUL_PERCENTILES = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)


#: Volumes whose landmarks are found in one go: memory stays flat in the number of volumes.
NYUL_BATCH = 16


def _landmarks(data: xr.DataArray, ps: np.ndarray, mask: xr.DataArray | None) -> np.ndarray:
    """Each volume's exact percentiles ``ps``, ``NYUL_BATCH`` volumes at a time: ``(volumes, landmarks)``."""
    dims = volume_dims(data, "Nyúl standardization")
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
    data = check_data(data)
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
        From :func:`nyul_fit` (checked by :func:`volnorm.params.check`).
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
    data = check_data(data)
    check(landmarks, nyul_apply, data, arg="landmarks")
    ps = landmarks.values["percentiles"].values
    std = landmarks.values["standard"].values
    land = _landmarks(data, ps, mask)
    ft = float_dtype(data.dtype)

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
    return attach(y, data, params)

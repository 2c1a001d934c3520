"""Tissue-based normalization: WhiteStripe, the KDE tissue mode and fuzzy c-means, per volume.

intensity-normalization 3.x (``WhiteStripeNormalizer``, ``KDENormalizer``, ``FCMNormalizer``) is
the reference;
its papers are Shinohara et al. 2014 (WhiteStripe) and Reinhold et al. 2019. The reference
works on one volume's voxels in memory: a Gaussian kernel density estimate of the (masked)
intensities on an 80-point grid, the tissue mode picked from it by modality (T1: the last
local maximum below the 96th percentile; T2/FLAIR: the largest; PD: the first local maximum
below the 99th percentile), then for WhiteStripe the quantile stripe of ``width`` around the
mode's quantile and the mean and std of the voxels strictly inside it.

Here every statistic comes from each volume's exact histogram, one pass over the cohort,
volumes in parallel; memory does not grow with the cohort. For integer data up to 16 bits
the histogram holds every value, so the kernel density, the percentiles (numpy's linear
interpolation), the mode's quantile and the stripe's moments are those of the voxels
themselves: equal to the reference's up to float rounding. Float data are histogrammed in
``FLOAT_BINS`` equal bins, each bin's voxels taken at its centre: the landmarks are then
within a bin width of the reference's (the docstrings say so).

Fuzzy c-means (:func:`fcm`, and the tissue means of :func:`volnorm.transforms.harmonize.lsq`)
is skfuzzy's iteration on the same histogram: once the centres are known a voxel's memberships
depend only on its value, so clustering the voxels is clustering the distinct values weighted
by their counts (:func:`cmeans`), a few thousand values instead of a million voxels.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import xarray as xr

from volnorm._dims import volume_dims
from volnorm._histogram import histogram
from volnorm._utils import no_valid_voxels
from volnorm.params import Params, attach, check
from volnorm.transforms.common import check_data, float_dtype, pointwise

__all__ = ["fcm", "fit_fcm", "fit_kde", "fit_whitestripe", "kde", "whitestripe"]

Modality = Literal["t1", "t2", "flair", "pd"]

#: Equal bins of a float volume's histogram (integer data: one bin per value, exact).
FLOAT_BINS = 2**16

#: The reference's evaluation grid of the kernel density (points from min to max).
GRID_POINTS = 80


# ---------------------------------------------------------------------------
# the reference's statistics, from one volume's (values, counts)
# ---------------------------------------------------------------------------


def _percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.quantile(voxels, q)`` (linear interpolation, numpy's own lerp) from sorted
    ``values`` and their ``counts``."""
    n = int(counts.sum())
    pos = q * (n - 1)
    lo = math.floor(pos)
    t = pos - lo
    cum = np.cumsum(counts)
    a = float(values[np.searchsorted(cum, lo, side="right")])
    b = float(values[np.searchsorted(cum, min(lo + 1, n - 1), side="right")])
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def _density(values: np.ndarray, counts: np.ndarray, factor: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``scipy.stats.gaussian_kde`` of the voxels (Scott's factor, or ``factor``) on the
    reference's grid: the grid and the density."""
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    n = w.sum()
    mean = (w * v).sum() / n
    var = (w * (v - mean) ** 2).sum() / (n - 1)
    f = n ** (-1.0 / 5.0) if factor is None else factor
    s2 = var * f * f
    grid = np.linspace(v[0], v[-1], GRID_POINTS)
    pdf = np.array([(w * np.exp(-0.5 * (g - v) ** 2 / s2)).sum() for g in grid]) / (n * math.sqrt(2 * math.pi * s2))
    return grid, pdf


def _local_maxima(pdf: np.ndarray) -> np.ndarray:
    """``scipy.signal.argrelmax(pdf)``: strictly greater than both neighbours (ends excluded)."""
    return np.flatnonzero((pdf[1:-1] > pdf[:-2]) & (pdf[1:-1] > pdf[2:])) + 1


def tissue_mode(values: np.ndarray, counts: np.ndarray, modality: str, factor: float | str | None = None) -> float:
    """The reference's tissue mode of a volume's foreground ``values``/``counts`` (sorted,
    counts > 0). ``factor``: the kernel's bandwidth factor (``None``: Scott's rule, as
    WhiteStripe; ``"max/80"``: the largest value / 80, as the KDE normalizer)."""
    if modality in ("t2", "flair"):
        keep = slice(None)
        pick = None
    else:
        tail = 99.0 if modality == "pd" else 96.0
        top = _percentile(values, counts, tail / 100.0)
        keep = values <= top
        pick = 0 if modality == "pd" else -1
    v, c = values[keep], counts[keep]
    bw = float(v[-1]) / 80.0 if factor == "max/80" else factor
    grid, pdf = _density(v, c, bw)
    maxima = _local_maxima(pdf)
    if pick is None or not len(maxima):
        return float(grid[np.argmax(pdf)])
    return float(grid[maxima[pick]])


def stripe(values: np.ndarray, counts: np.ndarray, mode: float, width_l: float, width_u: float) -> tuple[float, float]:
    """The stripe's bounds: the quantiles ``width_l`` below and ``width_u`` above the mode's."""
    n = counts.sum()
    q = float(counts[values < mode].sum() / n)
    return _percentile(values, counts, max(q - width_l, 0.0)), _percentile(values, counts, min(q + width_u, 1.0))


def _moments(values: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    w = counts.astype(np.float64)
    n = w.sum()
    mean = float((w * values).sum() / n)
    return mean, float(math.sqrt((w * (values - mean) ** 2).sum() / n))


# ---------------------------------------------------------------------------
# per-volume histograms
# ---------------------------------------------------------------------------


def _check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in ("t1", "t2", "flair", "pd"):
        raise ValueError(f"modality={modality!r}: expected one of 't1', 't2', 'flair', 'pd'")
    return m


def _per_volume(data: xr.DataArray, mask: xr.DataArray | None) -> xr.DataArray:
    """Each volume's histogram over its own dims: of the mask's voxels, or every voxel."""
    spatial = volume_dims(data, "a tissue-based normalization (one fit per volume)")
    exact = data.dtype.kind in "iub" and data.dtype.itemsize <= 2
    return histogram(data, dim=spatial, mask=mask, bins=None if exact else FLOAT_BINS).compute()


def _foreground(data: xr.DataArray, mask: xr.DataArray | None, what: str) -> tuple[xr.DataArray, list[tuple[np.ndarray, np.ndarray]]]:
    """Each volume's histogram and its foreground's ``(values, counts)`` (the mask's voxels, else
    those > 0); raises when a volume has none (``what``: the error's purpose)."""
    h = _per_volume(data, mask)
    rows = _rows(h, foreground_only=mask is None)
    if any(not len(v) for v, _ in rows):
        raise no_valid_voxels(what, some=len(rows) > 1)
    return h, rows


def per_volume_values(h: xr.DataArray, **values: Any) -> xr.Dataset:
    """float64 values, one per volume of the histogram ``h`` (or one per volume and tissue:
    ``(volumes, 3)``, dim ``tissue``), with its kept dims and coords."""
    kept = {k: h.coords[k] for k in h.dims if k != "bin"}
    out = {}
    for k, v in values.items():
        a = np.asarray(v, dtype=np.float64)
        per_tissue = a.ndim == 2 and a.shape[1] == len(TISSUES)
        out[k] = ((*kept, "tissue") if per_tissue else tuple(kept), a.reshape(h.shape[:-1] + a.shape[1:] if per_tissue else h.shape[:-1]))
    return xr.Dataset(out, coords={**kept, "tissue": list(TISSUES)} if any("tissue" in d for d, _ in out.values()) else kept)


def _rows(h: xr.DataArray, foreground_only: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per volume, the occupied ``(values, counts)``; with ``foreground_only``, values > 0."""
    values = h["bin"].values
    out = []
    for row in np.atleast_2d(h.values):
        keep = row > 0
        if foreground_only:
            keep &= values > 0
        out.append((values[keep], row[keep]))
    return out


def fit_whitestripe(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, width: float = 0.05, width_l: float | None = None,
    width_u: float | None = None, modality: Modality = "t1",
) -> Params:
    """Fit :func:`whitestripe`: per volume, the normal-appearing white matter's mean and std.
    Computes: one histogram pass (two with a mask whose stripe takes in the voxels outside it).

    The reference (intensity-normalization 3.x ``WhiteStripeNormalizer``): the tissue mode of
    the foreground (the mask's voxels, else those > 0) from a kernel density estimate; the
    stripe from the quantile ``width_l`` below to ``width_u`` above the mode's quantile; the
    mean and (population) std of the voxels strictly inside the stripe (with a mask: of the
    voxels whose masked value, 0 outside it, is inside, as the reference counts them).

    Parameters
    ----------
    data : xarray.DataArray
        A stack (``("volume", ...)``), numpy or dask backed.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data`` (a brain mask): the foreground. Default: voxels > 0.
    width : float
        The stripe's half-width in quantiles (the reference's default 0.05).
    width_l : float, optional
        Its lower half-width (default ``width``).
    width_u : float, optional
        Its upper half-width (default ``width``).
    modality : {"t1", "t2", "flair", "pd"}
        Which tissue mode (T1: the last, T2/FLAIR: the largest, PD: the first).

    Returns
    -------
    Params
        Method ``"whitestripe"``: per volume float64 ``mean``, ``std``, the ``mode`` and the
        stripe's bounds ``stripe_lo``/``stripe_hi``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> rng = np.random.default_rng(0)
    >>> x = xr.DataArray(rng.normal(100, 10, (1, 20, 20, 20)).astype("int16"), dims=("volume", "z", "y", "x"))
    >>> p = vn.fit_whitestripe(x, modality="t2")
    >>> float(p.values["stripe_lo"][0]), float(p.values["stripe_hi"][0]), round(float(p.values["mean"][0]), 2)
    (96.0, 99.0, 97.47)
    """
    data = check_data(data)
    m = _check_modality(modality)
    wl, wu = width_l or width, width_u or width
    h, rows = _foreground(data, mask, "to find the white matter in")
    modes = [tissue_mode(v, c, m) for v, c in rows]
    bounds = [stripe(v, c, mode, wl, wu) for (v, c), mode in zip(rows, modes)]
    # the stripe's voxels: those whose (masked) value is strictly inside it; without a mask every
    # voxel, not only the foreground. With a mask the reference tests ``data * mask``: when 0 is
    # inside the stripe, every voxel outside the mask is in it, with its own value.
    inside = rows if mask is not None else _rows(h, foreground_only=False)
    if mask is not None and any(lo < 0 < hi for lo, hi in bounds):
        every = _per_volume(data, None)
        out_counts = np.atleast_2d(every.values).astype(np.int64) - np.atleast_2d(h.reindex(bin=every["bin"], fill_value=0).values)
    mean, std = [], []
    for i, ((v, c), (lo, hi)) in enumerate(zip(inside, bounds)):
        sel = (v > lo) & (v < hi)
        v, c = v[sel], c[sel]
        if mask is not None and lo < 0 < hi:
            keep = out_counts[i] > 0
            v, c = np.concatenate([v, every["bin"].values[keep]]), np.concatenate([c, out_counts[i][keep]])
        if not len(v):
            raise ValueError(f"whitestripe: no voxel inside the stripe ({lo:g}, {hi:g}) of a volume")
        a, b = _moments(v.astype(np.float64), c)
        if b == 0:
            raise ValueError(f"whitestripe: the stripe ({lo:g}, {hi:g}) of a volume holds one value: its std is 0")
        mean.append(a)
        std.append(b)
    ds = per_volume_values(h, mean=mean, std=std, mode=modes, stripe_lo=[lo for lo, _ in bounds], stripe_hi=[hi for _, hi in bounds])
    return Params("whitestripe", ds, {"dim": list(volume_dims(data)), "width_l": wl, "width_u": wu, "modality": m})


def whitestripe(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, width: float = 0.05, width_l: float | None = None,
    width_u: float | None = None, modality: Modality = "t1", params: Params | None = None,
) -> xr.DataArray:
    """WhiteStripe normalization: ``(x - mean) / std`` with each volume's normal-appearing
    white matter's mean and std (:func:`fit_whitestripe`; intensity-normalization 3.x's
    ``WhiteStripeNormalizer`` is the reference). Lazy; computes the fit pass.

    Parameters
    ----------
    data : xarray.DataArray
        A stack, numpy or dask backed.
    mask : xarray.DataArray of bool, optional
        The foreground (default: voxels > 0), as :func:`fit_whitestripe`.
    width : float
        The stripe's half-width in quantiles (default 0.05).
    width_l : float, optional
        Its lower half-width (default ``width``).
    width_u : float, optional
        Its upper half-width (default ``width``).
    modality : {"t1", "t2", "flair", "pd"}
        Which tissue mode.
    params : Params, optional
        From :func:`fit_whitestripe`: no fit pass (one pair per volume of the same stack).

    Returns
    -------
    xarray.DataArray
        float32 for float32 and up to 16-bit integer input, float64 otherwise; the fitted
        values in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> rng = np.random.default_rng(0)
    >>> x = xr.DataArray(rng.normal(100, 10, (1, 20, 20, 20)).astype("int16"), dims=("volume", "z", "y", "x"))
    >>> y = vn.whitestripe(x, modality="t2")  # (x - 97.47) / 0.4994
    >>> int(x[0, 0, 0, 0]), y.dtype.name, round(float(y[0, 0, 0, 0]), 2)
    (101, 'float32', 7.06)
    """
    data = check_data(data)
    if params is None:
        params = fit_whitestripe(data, mask=mask, width=width, width_l=width_l, width_u=width_u, modality=modality)
    else:
        check(params, whitestripe, data, modality=modality)
    ft = float_dtype(data.dtype)
    v = params.values
    mean, inv = v["mean"].astype(ft), (1.0 / v["std"]).astype(ft)
    return attach(pointwise(data, lambda x: ((x.astype(ft) - mean) * inv).astype(ft)), data, params)


def fit_kde(data: xr.DataArray, *, mask: xr.DataArray | None = None, modality: Modality = "t1") -> Params:
    """Fit :func:`kde`: per volume, the tissue mode of a kernel density estimate of the
    foreground (the mask's voxels, else those > 0), with the reference's bandwidth factor (the
    largest value / 80; intensity-normalization 3.x ``KDENormalizer``). Computes: one pass.

    Parameters
    ----------
    data : xarray.DataArray
        A stack, numpy or dask backed.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data``; default: voxels > 0.
    modality : {"t1", "t2", "flair", "pd"}
        Which tissue mode.

    Returns
    -------
    Params
        Method ``"kde"``: per volume float64 ``mode``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[1, 2, 2, 2, 3, 9]], dtype="int16"), dims=("volume", "x"))
    >>> round(float(vn.fit_kde(x, modality="t2").values["mode"][0]), 3)
    2.013
    """
    data = check_data(data)
    m = _check_modality(modality)
    h, rows = _foreground(data, mask, "to find a tissue mode in")
    modes = [tissue_mode(v, c, m, "max/80") for v, c in rows]
    return Params("kde", per_volume_values(h, mode=modes), {"dim": list(volume_dims(data)), "modality": m})


def kde(data: xr.DataArray, *, mask: xr.DataArray | None = None, modality: Modality = "t1", params: Params | None = None) -> xr.DataArray:
    """KDE tissue-mode normalization: ``x / mode`` with each volume's tissue mode
    (:func:`fit_kde`; intensity-normalization 3.x's ``KDENormalizer`` is the reference). Lazy;
    computes the fit pass.

    Parameters
    ----------
    data : xarray.DataArray
        A stack, numpy or dask backed.
    mask : xarray.DataArray of bool, optional
        The foreground (default: voxels > 0), as :func:`fit_kde`.
    modality : {"t1", "t2", "flair", "pd"}
        Which tissue mode.
    params : Params, optional
        From :func:`fit_kde`: no fit pass.

    Returns
    -------
    xarray.DataArray
        float32 for float32 and up to 16-bit integer input, float64 otherwise.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[1, 2, 2, 2, 3, 9]], dtype="int16"), dims=("volume", "x"))
    >>> [round(v, 2) for v in vn.kde(x, modality="t2").values[0].tolist()]
    [0.5, 0.99, 0.99, 0.99, 1.49, 4.47]
    """
    data = check_data(data)
    if params is None:
        params = fit_kde(data, mask=mask, modality=modality)
    else:
        check(params, kde, data, modality=modality)
    return divide(data, params.values["mode"], params)


# ---------------------------------------------------------------------------
# fuzzy c-means (FCMNormalizer, and the tissue means of LSQNormalizer)
# ---------------------------------------------------------------------------

#: The three classes of the reference's fuzzy c-means, by increasing centre (T1: CSF, GM, WM).
TISSUES = ("csf", "gm", "wm")

Tissue = Literal["csf", "gm", "wm"]

_EPS = np.finfo(np.float64).eps


def initial_memberships(n: int, seed: int) -> np.ndarray:
    """The first memberships of ``n`` distinct values, ``(3, n)``: uniform random numbers of
    ``seed`` with each column summing to 1 (as skfuzzy's own random start, but seeded)."""
    u = np.random.default_rng(seed).random((len(TISSUES), n))
    return u / u.sum(axis=0, keepdims=True)


def cmeans(
    values: np.ndarray, counts: np.ndarray, init: np.ndarray, *, fuzziness: float = 2.0, error: float = 0.005, max_iter: int = 50,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``skfuzzy.cmeans`` of the voxels, from their distinct ``values`` and ``counts``.

    Each voxel's membership depends only on its value once the centres are known, so fuzzy
    c-means of the voxels is weighted fuzzy c-means of the distinct values: the same steps
    (normalized memberships floored at machine epsilon, centres as the ``fuzziness``-th power
    weighted means, distances floored at epsilon, skfuzzy's ``normalize_power_columns``) and
    the same stopping rule (the Frobenius norm of the change of the *voxels'* memberships
    below ``error``, or ``max_iter`` steps). Given the start ``init`` (``(c, n)``, per value),
    the result equals skfuzzy's on the voxels started from each voxel's value's column.

    Parameters
    ----------
    values : (n,) ndarray
        The distinct values.
    counts : (n,) ndarray
        How many voxels hold each.
    init : (c, n) ndarray
        The first memberships, per value (:func:`initial_memberships`).
    fuzziness : float
        skfuzzy's ``m`` (> 1).
    error : float
        The stopping rule's bound.
    max_iter : int
        At most this many steps.

    Returns
    -------
    centers : (c,) float64
        skfuzzy's ``cntr`` (the centres of the last step, unsorted).
    u : (c, n) float64
        skfuzzy's final memberships ``u``, per value.
    steps : int
        skfuzzy's ``p``.

    Examples
    --------
    >>> import numpy as np
    >>> values, counts = np.array([10.0, 11.0, 50.0, 90.0, 91.0]), np.array([5, 3, 4, 6, 2])
    >>> centers, u, steps = cmeans(values, counts, initial_memberships(5, 0))
    >>> np.round(np.sort(centers), 2).tolist(), u.shape
    ([10.37, 50.0, 90.25], (3, 5))
    """
    v = values.astype(np.float64)
    w = counts.astype(np.float64)
    u = np.fmax(init, _EPS)
    p = 0
    while p < max_iter:
        u2 = u
        um = np.fmax(u2 / u2.sum(axis=0, keepdims=True), _EPS) ** fuzziness * w
        centers = um @ v / um.sum(axis=1)
        d = np.fmax(np.sqrt((v[None, :] - centers[:, None]) ** 2), _EPS)  # scipy's cdist, to the last bit
        d = np.fmax(d / d.max(axis=0, keepdims=True), _EPS)
        d = (d / d.min(axis=0, keepdims=True)) ** (-2.0 / (fuzziness - 1.0))
        u = d / d.sum(axis=0, keepdims=True)
        p += 1
        if math.sqrt(float((w * (u - u2) ** 2).sum())) < error:
            break
    return centers, u, p


def require_mask(mask: xr.DataArray | None, name: str) -> None:
    """The error of a tissue clustering without a brain mask."""
    if mask is None:
        raise ValueError(
            f"{name} needs a brain mask (mask=): fuzzy c-means over every voxel would take the background, "
            "skull and scalp for tissue classes; give a boolean mask broadcastable to the data (in a pipeline spec, `mask:`)"
        )


def fcm_tissues(
    data: xr.DataArray, mask: xr.DataArray | None, *, name: str, fuzziness: float, error: float, max_iter: int, seed: int,
) -> tuple[xr.DataArray, np.ndarray, np.ndarray, np.ndarray]:
    """Per volume, fuzzy c-means of the brain mask's voxels from the volume's histogram (one
    pass, every volume at once), classes sorted by centre (:data:`TISSUES`).

    Returns the histogram (its kept dims index the volumes) and per volume ``(n, 3)`` centres,
    ``(n, 3)`` tissue means (each class's membership-weighted mean of the voxels, the
    reference's ``np.average(data, weights=membership)``) and ``(n,)`` steps taken. ``name``:
    the function, for the errors.
    """
    require_mask(mask, name)
    if not (fuzziness > 1 and error > 0 and max_iter >= 1):
        raise ValueError(f"{name}: fuzziness must be > 1, error > 0 and max_iter >= 1 (got {fuzziness}, {error}, {max_iter})")
    h, rows = _foreground(data, mask, "to cluster into tissues")
    centers, means, steps = [], [], []
    for v, c in rows:
        cntr, u, p = cmeans(v, c, initial_memberships(len(v), seed), fuzziness=fuzziness, error=error, max_iter=max_iter)
        order = np.argsort(cntr)
        wu = u[order] * c.astype(np.float64)
        centers.append(cntr[order])
        means.append(wu @ v.astype(np.float64) / wu.sum(axis=1))
        steps.append(p)
    return h, np.array(centers), np.array(means), np.array(steps)


def fit_fcm(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, tissue: Tissue = "wm", fuzziness: float = 2.0, error: float = 0.005,
    max_iter: int = 50, seed: int = 0,
) -> Params:
    """Fit :func:`fcm`: per volume, fuzzy c-means of the brain mask's voxels into three tissue
    classes and the chosen class's membership-weighted mean. Computes: one histogram pass.

    The reference (intensity-normalization 3.x ``FCMNormalizer``): ``skfuzzy.cmeans`` of the
    masked voxels, 3 classes, ``m=2``, ``error=0.005``, ``maxiter=50``; the classes sorted by
    centre (CSF, GM, WM on T1); the tissue mean ``np.average(data, weights=u)`` with ``u`` the
    class's final memberships (0 outside the mask). Here the same iteration runs on each
    volume's histogram (:func:`cmeans`: distinct values weighted by their counts).

    What is equal: skfuzzy starts from *unseeded* random memberships per voxel and stops at
    ``error`` (or after 50 steps) before full convergence, so the reference itself differs from
    run to run (about 1e-5 relative on nibabel's ``anatomical.nii``, up to 6e-4 on phantoms
    where it stops at 50 steps). volnorm starts from seeded random
    memberships per distinct value (:func:`initial_memberships`, ``seed``), so it is
    reproducible; started from the same memberships (each voxel its value's), skfuzzy and the
    reference give the same centres, memberships and tissue mean up to float rounding (the
    tests check 1e-6 relative on integer data). For integer data up to 16 bits the histogram
    holds every value (exact); float data are histogrammed in ``FLOAT_BINS`` equal bins, each
    bin's voxels taken at its centre, so the tissue mean is within a bin width of the voxels'.

    Parameters
    ----------
    data : xarray.DataArray
        A stack (``("volume", ...)``), numpy or dask backed.
    mask : xarray.DataArray of bool
        Required: a brain mask broadcastable to ``data`` (the reference's foreground).
    tissue : {"csf", "gm", "wm"}
        The class to normalize by: the lowest, middle or highest centre.
    fuzziness : float
        skfuzzy's ``m`` (> 1).
    error : float
        skfuzzy's stopping rule: the norm of the voxels' membership change (> 0).
    max_iter : int
        At most this many steps (>= 1).
    seed : int
        The start's random memberships.

    Returns
    -------
    Params
        Method ``"fcm"``: per volume float64 ``mean`` (the class's membership-weighted mean,
        the divisor), per volume and ``tissue`` (csf, gm, wm) the ``centers`` and the
        ``tissue_means``, and the ``steps`` taken.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[10, 11, 12, 50, 52, 90, 91, 93]], dtype="int16"), dims=("volume", "x"))
    >>> p = vn.fit_fcm(x, mask=x > 0)
    >>> np.round(p.values["centers"][0].values, 1).tolist(), round(float(p.values["mean"][0]), 1)
    ([11.0, 51.0, 91.3], 91.3)
    """
    data = check_data(data)
    if tissue not in TISSUES:
        raise ValueError(f"tissue={tissue!r}: expected one of 'csf', 'gm', 'wm'")
    h, centers, means, steps = fcm_tissues(data, mask, name="fcm", fuzziness=fuzziness, error=error, max_iter=max_iter, seed=seed)
    mean = means[:, TISSUES.index(tissue)]
    if np.any(mean == 0):
        raise ValueError(f"fcm: the {tissue} mean of a volume is 0: cannot divide by it")
    ds = per_volume_values(h, mean=mean, centers=centers, tissue_means=means, steps=steps)
    options = {"dim": list(volume_dims(data)), "tissue": tissue, "fuzziness": fuzziness, "error": error, "max_iter": max_iter, "seed": seed}
    return Params("fcm", ds, options)


def fcm(
    data: xr.DataArray, *, mask: xr.DataArray | None = None, tissue: Tissue = "wm", fuzziness: float = 2.0, error: float = 0.005,
    max_iter: int = 50, seed: int = 0, params: Params | None = None,
) -> xr.DataArray:
    """Fuzzy c-means tissue normalization: ``x / mean`` with each volume's white-matter (or
    ``tissue``) membership-weighted mean (:func:`fit_fcm`; intensity-normalization 3.x's
    ``FCMNormalizer`` is the reference, equal as :func:`fit_fcm` says). Lazy; computes the fit
    pass.

    Parameters
    ----------
    data : xarray.DataArray
        A stack, numpy or dask backed.
    mask : xarray.DataArray of bool
        Required without ``params``: a brain mask broadcastable to ``data``.
    tissue : {"csf", "gm", "wm"}
        The class to normalize by.
    fuzziness : float
        skfuzzy's ``m`` (> 1).
    error : float
        skfuzzy's stopping rule (> 0).
    max_iter : int
        At most this many steps (>= 1).
    seed : int
        The start's random memberships.
    params : Params, optional
        From :func:`fit_fcm`: no fit pass (one mean per volume of the same stack).

    Returns
    -------
    xarray.DataArray
        float32 for float32 and up to 16-bit integer input, float64 otherwise; every voxel
        divided (the mask only chooses the voxels of the fit).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[10, 11, 12, 50, 52, 90, 91, 93]], dtype="int16"), dims=("volume", "x"))
    >>> [round(v, 2) for v in vn.fcm(x, mask=x > 0).values[0].tolist()]
    [0.11, 0.12, 0.13, 0.55, 0.57, 0.99, 1.0, 1.02]
    """
    data = check_data(data)
    if params is None:
        params = fit_fcm(data, mask=mask, tissue=tissue, fuzziness=fuzziness, error=error, max_iter=max_iter, seed=seed)
    else:
        check(params, fcm, data, tissue=tissue, fuzziness=fuzziness, error=error, max_iter=max_iter, seed=seed)
    return divide(data, params.values["mean"], params)


def divide(data: xr.DataArray, by: xr.DataArray, params: Params) -> xr.DataArray:
    """``data / by`` (one divisor per volume) in :func:`~volnorm.transforms.common.float_dtype`
    as one look-up table per row where the data allow, ``params`` attached."""
    ft = float_dtype(data.dtype)
    inv = (1.0 / by).astype(ft)
    return attach(pointwise(data, lambda x: (x.astype(ft) * inv).astype(ft)), data, params)

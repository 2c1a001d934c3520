"""Binarization: a threshold (scikit-image's and FSL's conventions) or dithering, which keeps
the local mean intensity.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._dims import Dim
from volnorm._utils import VolnormDeprecationWarning
from volnorm.params import Params, attach
from volnorm.transforms import thresholds
from volnorm.transforms.common import check_data, dask_data
from volnorm.transforms.intensity import fit_rescale, rescale

__all__ = ["BAYER8", "binarize", "dither", "uniform_at"]

#: The plane :func:`dither` works on unless told otherwise.
PLANE: tuple[Hashable, Hashable] = ("y", "x")


class _Default(tuple):
    """A default that reads as its value (signatures, specs) but tells "not given" apart from
    the same value given: ``dim`` and the deprecated ``dims`` both given is an error."""


_PLANE_DEFAULT = _Default(PLANE)


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
    data = check_data(data)
    if threshold is None:
        t = thresholds.threshold(data, method, dim=dim, mask=mask, **kwargs)
        if "threshold" in t.dims:
            raise ValueError(f"method {method!r} gives several thresholds; pick one or use vn.threshold")
        t = t.drop_vars([c for c in t.coords if c not in t.dims])
    else:
        t = threshold
    y = _compare(data, t, "ge" if inclusive else "gt")
    if upper is not None:
        y = y & _compare(data, upper, "le")
    if invert:
        y = ~y
    return y.rename(data.name)


def _compare(data: xr.DataArray, t: Any, op: str) -> xr.DataArray:
    """``data > t`` (``op`` "gt"), ``>=`` ("ge") or ``<=`` ("le"), the same booleans; integer
    data against a float ``t`` compared in their own dtype (``x > t`` is ``x > floor(t)``),
    not after numpy's cast of every voxel to float64: 5x faster on bytes."""
    cmp = {"gt": np.greater, "ge": np.greater_equal, "le": np.less_equal}[op]
    tv = np.asarray(t.values if isinstance(t, xr.DataArray) else t)
    if data.dtype.kind not in "iu" or data.dtype.itemsize > 4 or tv.dtype.kind not in "iuf" or not np.all(np.isfinite(tv)):
        return cmp(data, t)
    info = np.iinfo(data.dtype)
    k = np.floor(t) if op in ("gt", "le") else np.ceil(t)  # the integer the data are compared to
    if np.all((k >= info.min) & (k <= info.max)):  # else some rows are all or none: numpy's way
        return cmp(data, k.astype(data.dtype) if isinstance(k, xr.DataArray) else data.dtype.type(k))
    return cmp(data, t)


#: The 8x8 Bayer index matrix (ordered dithering), thresholds (i + 0.5) / 64.
BAYER8 = np.array(
    [
        [0, 32, 8, 40, 2, 34, 10, 42], [48, 16, 56, 24, 50, 18, 58, 26],
        [12, 44, 4, 36, 14, 46, 6, 38], [60, 28, 52, 20, 62, 30, 54, 22],
        [3, 35, 11, 43, 1, 33, 9, 41], [51, 19, 59, 27, 49, 17, 57, 25],
        [15, 47, 7, 39, 13, 45, 5, 37], [63, 31, 55, 23, 61, 29, 53, 21],
    ]
)


#: splitmix64's constants (Steele, Lea & Flood 2014; Java's SplittableRandom).
_GOLDEN, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function of the states ``z`` (uint64, wrapping)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def uniform_at(index: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in [0, 1) keyed by global element indices: element ``i`` of the splitmix64
    stream of ``seed``, the same whatever block computes it (counter-based, chunk-independent).

    Parameters
    ----------
    index : numpy.ndarray
        Non-negative integer indices (the flat index of each element in the whole array).
    seed : int
        The stream.

    Returns
    -------
    numpy.ndarray
        float64 of ``index``'s shape, 53 random bits each.

    Examples
    --------
    >>> u = uniform_at(np.arange(100_000), 0)
    >>> bool(np.all((u >= 0) & (u < 1))), round(float(u.mean()), 2), bool(np.array_equal(uniform_at(np.arange(5, 9), 0), u[5:9]))
    (True, 0.5, True)
    """
    key = _splitmix(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        # splitmix64 advances its state by the golden gamma before each output: element i is
        # the output of key + (i + 1) * gamma. (Without the + 1, seed 0's element 0 was the
        # output of state 0, which is 0: that pixel was on at any level above 0.)
        z = _splitmix((np.asarray(index).astype(np.uint64) + np.uint64(1)) * _GOLDEN + key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def dither(
    data: xr.DataArray,
    method: str = "bayer",
    *,
    in_range: str | tuple[float, float] = "minmax",
    dim: tuple[Hashable, Hashable] = _PLANE_DEFAULT,
    dims: tuple[Hashable, Hashable] = _PLANE_DEFAULT,
    seed: int = 0,
) -> xr.DataArray:
    """Binarize grey levels by dithering, keeping the local mean intensity (unlike a threshold,
    which discards it); ``"random"`` is the classic baseline, binomial sampling, which keeps
    the mean only on average and adds noise at every scale.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data with both ``dim`` dims.
    method : {"bayer", "floyd-steinberg", "random"}
        ``"bayer"``: ordered dithering with the 8x8 Bayer matrix tiled over ``dim`` in
        global coordinates - blockwise, seamless across chunks. ``"floyd-steinberg"``: error
        diffusion in raster order over each ``dim`` plane - planes are kept whole in a chunk
        (rechunked if needed). ``"random"``: each pixel is on with probability equal to its
        value in [0, 1] (``u < value``, ``u`` uniform in [0, 1)), the numbers keyed by each
        element's global index (:func:`uniform_at`): the same bits whatever the chunking.
    in_range : "minmax" or (lo, hi)
        The data are first rescaled to [0, 1] over ``in_range`` (fitted on the whole dataset by
        default), as :func:`rescale` does, clipping values outside it.
    dim : (str, str)
        The plane that is dithered (its row and column dims), as :func:`equalize_adaptive`'s ``dim``.
    dims : (str, str), optional
        Deprecated spelling of ``dim`` (a :class:`~volnorm._utils.VolnormDeprecationWarning`);
        not with ``dim``.
    seed : int
        ``method="random"``: the random stream (the same seed, the same bits).

    Returns
    -------
    xarray.DataArray
        Returns a lazy bool array. It has the dims and name of ``data``; ``attrs["volnorm_params"]``
        records the step (method ``"dither"``: the fitted window ``in_lo``/``in_hi``, ``method``,
        ``in_range``, ``dim``, ``seed``). Computes: the min/max pass for ``in_range="minmax"``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> grey = xr.DataArray(np.full((64, 64), 0.25), dims=("y", "x"))   # 25 % grey
    >>> b, f = vn.dither(grey, in_range=(0, 1)), vn.dither(grey, "floyd-steinberg", in_range=(0, 1))
    >>> float(b.mean()), round(float(f.mean()), 3)   # error leaving the last row/column is lost
    (0.25, 0.243)
    >>> r = vn.dither(grey, "random", in_range=(0, 1), seed=1)
    >>> abs(float(r.mean()) - 0.25) < 3 * (0.25 * 0.75 / 64**2) ** 0.5   # within 3 binomial sd
    True
    """
    if dims is not _PLANE_DEFAULT:
        if dim is not _PLANE_DEFAULT:
            raise ValueError(f"dither: give `dim` only (`dims` is its deprecated spelling); got dim={dim!r} and dims={dims!r}")
        warnings.warn(
            f"dither(dims=...) is deprecated; write dim={tuple(dims)!r} (the plane's dims, as every other function spells it)",
            VolnormDeprecationWarning, stacklevel=2,
        )
        dim = dims
    dim = tuple(dim)
    data = check_data(data)
    if method not in ("bayer", "floyd-steinberg", "random"):
        raise ValueError(f"`method` must be 'bayer', 'floyd-steinberg' or 'random'; got {method!r}")
    if len(dim) != 2 or any(d not in data.dims for d in dim):
        raise ValueError(f"dither works over the plane dim={dim!r} (2 of the data's dims); the data have dims {data.dims!r}")
    window = fit_rescale(data, in_range=in_range)
    g = rescale(data, params=window, out_range=(0.0, 1.0), clip=True)
    g = g.transpose(..., *dim)
    ga = dask_data(g)
    if method == "random":
        shape, key = ga.shape, int(seed)

        def block_random(b: np.ndarray, block_info: Any = None) -> np.ndarray:
            loc = block_info[0]["array-location"]
            index = np.ravel_multi_index(np.ix_(*[np.arange(a, z, dtype=np.int64) for a, z in loc]), shape)
            return uniform_at(index, key) < b  # NaN: never on

        out = da.map_blocks(block_random, ga, dtype=bool, meta=np.empty((0,) * ga.ndim, dtype=bool))
    elif method == "bayer":
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
    options = {"method": method, "in_range": in_range if isinstance(in_range, str) else [float(v) for v in in_range],
               "dim": [str(d) for d in dim], **({"seed": int(seed)} if method == "random" else {})}
    return attach(y, data, Params("dither", window.values, options))

"""Colour: greyscale conversion, colormaps and their inverse, lazily and block by block.

Colour data carry a ``channel`` dim (R, G, B[, A]); results keep the input's other dims and
chunks. Matplotlib provides the colormaps (the ``volnorm[plot]`` extra); no figure is made.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._histogram import numba_ready, value_range
from volnorm.params import Params, attach, check
from volnorm.transforms.equalization import equalize

__all__ = [
    "LUMA", "apply_colormap", "colormap_table", "desaturate", "equalize_color", "exposure", "fit_quantize", "invert_colormap",
    "quantize", "quantize_grey", "radial_weight", "to_grey",
]

#: Weights of R, G, B in the luma of ITU-R BT.601 (``"rec601"``, as PIL and OpenCV) and
#: BT.709 (``"rec709"``, sRGB primaries).
LUMA = {"rec601": (0.299, 0.587, 0.114), "rec709": (0.2126, 0.7152, 0.0722)}


def _channels(rgb: xr.DataArray, channel_dim: str) -> xr.DataArray:
    if not isinstance(rgb, xr.DataArray):
        raise TypeError(f"expected an xarray.DataArray with a {channel_dim!r} dim; got {type(rgb).__name__}")
    if channel_dim not in rgb.dims or rgb.sizes[channel_dim] not in (3, 4):
        raise ValueError(f"colour data need a {channel_dim!r} dim of size 3 (RGB) or 4 (RGBA); got dims {dict(rgb.sizes)}")
    if rgb.chunks is not None and len(rgb.chunksizes[channel_dim]) > 1:
        rgb = rgb.chunk({channel_dim: -1})  # a pixel's channels in one block
    return rgb


def _white(dtype: np.dtype) -> float:
    """The value of full white: an integer dtype's maximum (uint8: 255), 1 for floats."""
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def to_grey(rgb: xr.DataArray, *, method: str = "rec601", channel_dim: str = "channel") -> xr.DataArray:
    """Greyscale from RGB(A): a weighted sum of the channels (luma), or the "perceived
    brightness" ``sqrt(0.299 R² + 0.587 G² + 0.114 B²)``. Alpha is ignored.

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with a ``channel_dim`` of size 3 or 4, in any dtype (integer values keep their
        scale: uint8 in, 0-255 floats out).
    method : {"rec601", "rec709", "perceived"}
        BT.601 luma (PIL's ``convert("L")`` and OpenCV's weights), BT.709 luma, or perceived
        brightness.
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    xarray.DataArray
        float32 for inputs of up to 16 bits, float64 otherwise, without ``channel_dim``; lazy when
        the input is.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> px = xr.DataArray(np.array([[255, 0, 0], [255, 255, 255]], dtype="uint8"), dims=("x", "channel"))
    >>> [round(float(v), 3) for v in vn.color.to_grey(px).values]
    [76.245, 255.0]
    """
    rgb = _channels(rgb, channel_dim)
    ft = np.float32 if rgb.dtype.itemsize <= 2 or rgb.dtype == np.float32 else np.float64
    if method not in ("perceived", *LUMA):
        raise ValueError(f"`method` must be one of rec601, rec709, perceived; got {method!r}")
    w = [ft(v) for v in LUMA["rec601" if method == "perceived" else method]]

    def block(x: np.ndarray) -> np.ndarray:
        flat = numba_ready(x.reshape(-1, x.shape[-1]))
        out = np.empty(len(flat), dtype=ft)
        _kernels.luma_rows(flat, *w, method == "perceived", np.empty(3, ft), out)
        return out.reshape(x.shape[:-1])

    out = xr.apply_ufunc(block, rgb.transpose(..., channel_dim), input_core_dims=[[channel_dim]], dask="parallelized", output_dtypes=[ft])
    return out.transpose(*[d for d in rgb.dims if d != channel_dim]).rename(rgb.name).assign_attrs(rgb.attrs)


def colormap_table(cmap: Any) -> tuple[np.ndarray, np.ndarray]:
    """A matplotlib colormap as uint8 RGBA rows, as ``cmap(..., bytes=True)`` gives them: its
    ``N`` colours, then the under, over and bad colours.

    Parameters
    ----------
    cmap : str or matplotlib.colors.Colormap
        A colormap or its registered name (``"viridis"``, ``"jet"``, ...).

    Returns
    -------
    (numpy.ndarray, matplotlib.colors.Colormap)
        The ``(N + 3, 4)`` uint8 table and the colormap.

    Examples
    --------
    >>> table, cm = colormap_table("viridis")
    >>> table.shape, cm.N
    ((259, 4), 256)
    """
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("colormaps need matplotlib: pip install 'volnorm[plot]'") from e
    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    colors = cm(np.arange(cm.N), bytes=True)
    extra = (np.array([cm.get_under(), cm.get_over(), cm.get_bad()]) * 255).astype(np.uint8)
    return np.concatenate([colors, extra]), cm


def apply_colormap(
    data: xr.DataArray, cmap: Any = "viridis", *, vmin: float | None = None, vmax: float | None = None
) -> xr.DataArray:
    """Colour ``data`` with a matplotlib colormap: RGBA uint8 with the input's dims plus
    ``channel`` (4), equal to ``cmap(Normalize(vmin, vmax)(data), bytes=True)``; no figure.

    Below ``vmin`` takes the colormap's "under" colour, above ``vmax`` its "over" colour,
    NaN its "bad" colour (transparent by default), as matplotlib does (and with
    ``vmin == vmax`` everything takes the first colour, NaN too, as matplotlib does).
    float16 data are computed in float32 (matplotlib stays in float16, whose 11-bit mantissa
    can move a value next to an entry's edge into the neighbouring entry).

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data, numpy or dask backed (lazy in, lazy out; chunks kept).
    cmap : str or matplotlib.colors.Colormap
        The colormap (default viridis).
    vmin : float, optional
        The value of the first colour (default: the data's minimum, one pass).
    vmax : float, optional
        The value of the last colour (default: the data's maximum).

    Returns
    -------
    xarray.DataArray
        uint8, dims ``(*data.dims, "channel")`` with coords R, G, B, A; ``attrs`` record the
        colormap, ``vmin`` and ``vmax`` (for :func:`invert_colormap`).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> rgba = vn.color.apply_colormap(xr.DataArray(np.array([0.0, 0.5, 1.0]), dims="x"), "gray", vmin=0, vmax=1)
    >>> rgba.values.tolist()
    [[0, 0, 0, 255], [128, 128, 128, 255], [255, 255, 255, 255]]
    """
    table, cm = colormap_table(cmap)
    if vmin is None or vmax is None:
        lo, hi = value_range(data)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmin > vmax:
        raise ValueError(f"need finite vmin <= vmax; got {vmin!r}, {vmax!r}")
    n = cm.N
    # matplotlib's working dtype: floats keep theirs, integers go to float32 when it holds them
    ft = np.float32 if data.dtype == np.float16 else np.promote_types(data.dtype, np.float32).type
    lo, span = float(vmin), float(vmax) - float(vmin)

    def block(x: np.ndarray) -> np.ndarray:
        flat = x.astype(ft, copy=False).reshape(-1)
        out = np.empty((flat.size, 4), dtype=np.uint8)
        _kernels.colormap_rows(flat, lo, span, ft(n), np.empty(1, ft), table, out)  # matplotlib's steps
        return out.reshape(x.shape + (4,))

    out = xr.apply_ufunc(
        block, data, output_core_dims=[["channel"]], dask="parallelized", output_dtypes=[np.uint8],
        dask_gufunc_kwargs={"output_sizes": {"channel": 4}},
    )
    name = getattr(cm, "name", str(cmap))
    return out.assign_coords(channel=["R", "G", "B", "A"]).rename(data.name).assign_attrs(
        colormap=name, vmin=float(vmin), vmax=float(vmax))


def quantize_grey(
    data: xr.DataArray, n_levels: int, cmap: Any = "gray", *, vmin: float | None = None, vmax: float | None = None
) -> xr.DataArray:
    """Grey levels into ``n_levels`` equal bins over ``[vmin, vmax]``, each bin drawn in one
    colour of ``cmap`` resampled to ``n_levels`` colours: the histogram-bin alternative to
    :func:`quantize` (a posterized, colour-mapped picture).

    Parameters
    ----------
    data : xarray.DataArray
        Scalar (grey) data; colour data: convert with :func:`to_grey` first.
    n_levels : int
        The number of levels (2-256).
    cmap : str or matplotlib.colors.Colormap
        Colours of the levels (default grey ramp).
    vmin : float, optional
        The bottom of the first bin (default: the data's minimum).
    vmax : float, optional
        The top of the last bin (default: the data's maximum).

    Returns
    -------
    xarray.DataArray
        RGBA uint8 as :func:`apply_colormap`, at most ``n_levels`` distinct colours.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> q = vn.color.quantize_grey(xr.DataArray(np.linspace(0, 1, 9), dims="x"), 3, vmin=0, vmax=1)
    >>> q.isel(channel=0).values.tolist()
    [0, 0, 0, 127, 127, 127, 255, 255, 255]
    """
    if not (isinstance(n_levels, (int, np.integer)) and 2 <= n_levels <= 256):
        raise ValueError(f"`n_levels` must be an int in 2..256; got {n_levels!r}")
    _, cm = colormap_table(cmap)
    return apply_colormap(data, cm.resampled(int(n_levels)), vmin=vmin, vmax=vmax)


def invert_colormap(
    rgb: xr.DataArray, cmap: Any = "viridis", vmin: float = 0.0, vmax: float = 1.0, *, channel_dim: str = "channel"
) -> xr.DataArray:
    """Recover scalar data from a picture made with a colormap: each pixel takes the value of
    the nearest colour among all the colormap's entries (Euclidean in RGB; a pixel need not
    match a colour exactly, e.g. after JPEG compression). 8-bit pictures go through a table of
    the nearest entry of every 8-bit colour, made once per colormap and process.

    The value of entry ``i`` is the centre of its interval, ``vmin + (i + 0.5) * step`` with
    ``step = (vmax - vmin) / N``, so a round trip is exact to within half a step. Entries
    that share one 8-bit colour cannot be told apart: they get the middle of their centres,
    and ``attrs["max_error"]`` (the bound for the whole colormap) grows by half their spread
    (jet, whose ends repeat a colour 4 times: 2 steps; viridis: 1 step; plasma: half a step).
    ``attrs["step"]`` is the quantization step (jet over 1500-4500 with 256 colours: 11.72);
    ``distance`` (a coord) says how far each pixel's colour was from the colormap.

    Parameters
    ----------
    rgb : xarray.DataArray
        uint8 (0-255) or float (0-1) colours with a ``channel_dim`` of size 3 or 4 (alpha ignored).
    cmap : str or matplotlib.colors.Colormap
        The colormap the picture was made with.
    vmin : float
        The value of the colormap's first colour.
    vmax : float
        The value of its last colour.
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    xarray.DataArray
        float64 values without ``channel_dim``, with a ``distance`` coord (float32 RGB distance to
        the nearest colour, 0-255 scale) and ``attrs`` ``step``, ``max_error``, ``colormap``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.linspace(1500, 4500, 7), dims="x")
    >>> back = vn.color.invert_colormap(vn.color.apply_colormap(x, "jet", vmin=1500, vmax=4500), "jet", vmin=1500, vmax=4500)
    >>> round(back.attrs["step"], 2), bool(np.all(np.abs(back - x) <= back.attrs["max_error"]))
    (11.72, True)
    """
    rgb = _channels(rgb, channel_dim)
    table, cm = colormap_table(cmap)
    n = cm.N
    step = (float(vmax) - float(vmin)) / n
    # entries that share one uint8 colour (jet's ends: 4 entries) are one colour: the value is
    # the middle of their centres, and the error bound grows by half their spread
    colors, which = np.unique(table[:n, :3], axis=0, return_inverse=True)
    which = which.ravel()
    idx = np.arange(n)
    first = np.full(len(colors), n)
    last = np.full(len(colors), -1)
    np.minimum.at(first, which, idx)
    np.maximum.at(last, which, idx)
    centres = float(vmin) + ((first + last) / 2 + 0.5) * step
    max_error = step / 2 + float(np.max(last - first)) * step / 2
    colors = np.ascontiguousarray(colors, dtype=np.float64)
    scale = 255.0 if rgb.dtype.kind == "f" else 1.0

    def block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = x.reshape(-1, x.shape[-1])
        value, dist = np.empty(len(pts), dtype=np.float64), np.empty(len(pts), dtype=np.float32)
        if pts.dtype == np.uint8:
            _kernels.rgb_invert(pts, *_rgb_table(colors.tobytes()), colors, centres, value, dist)
        else:
            pts = pts[:, :3].astype(np.float64) * scale
            i = _nearest(pts, colors)
            value[:] = centres[i]
            dist[:] = np.sqrt(((pts - colors[i]) ** 2).sum(axis=1))
            value[np.isnan(dist)] = np.nan  # a pixel with a NaN has no value
        return value.reshape(x.shape[:-1]), dist.reshape(x.shape[:-1])

    # two outputs of one task each (no stacked array to slice)
    out, dist = xr.apply_ufunc(
        block, rgb.transpose(..., channel_dim), input_core_dims=[[channel_dim]], output_core_dims=[[], []], dask="parallelized",
        output_dtypes=[np.float64, np.float32],
    )
    out = out.assign_coords(distance=dist)
    return out.rename(rgb.name).assign_attrs(step=step, max_error=max_error, colormap=getattr(cm, "name", str(cmap)),
                                              vmin=float(vmin), vmax=float(vmax))


# ---------------------------------------------------------------------------
# colour quantization: a palette fitted by k-means on a sample of the whole stack
# ---------------------------------------------------------------------------


def _pixels_sample(rgb: xr.DataArray, n: int, seed: int, channel_dim: str) -> np.ndarray:
    """About ``n`` pixels drawn uniformly from the whole stack, block by block (each block gives
    its share, with its own seed): ``(n, channels)`` float64. One pass; only the sample is kept."""
    x = rgb.transpose(..., channel_dim)
    arr = x.data if isinstance(x.data, da.Array) else da.from_array(np.asarray(x.data), chunks=x.shape)
    arr = arr.rechunk({arr.ndim - 1: -1})
    total = int(np.prod(arr.shape[:-1]))
    frac = min(1.0, n / max(total, 1))

    def block(b: np.ndarray, loc: tuple) -> np.ndarray:
        rng = np.random.default_rng([seed, *loc])  # the block's own stream: chunking-stable per block
        flat = b.reshape(-1, b.shape[-1])
        keep = rng.random(len(flat)) < frac
        return flat[keep].astype(np.float64)

    parts = [dask.delayed(block)(arr.blocks[idx], idx) for idx in np.ndindex(*arr.numblocks)]
    out = dask.compute(*parts)
    return np.concatenate(out) if out else np.empty((0, arr.shape[-1]))


def fit_quantize(
    rgb: xr.DataArray, n_colors: int = 16, *, sample: int = 200_000, seed: int = 0, channel_dim: str = "channel"
) -> Any:
    """Fit a palette of ``n_colors`` colours to a colour stack: k-means (k-means++ start,
    Lloyd iterations to a fixed point) on about ``sample`` pixels drawn uniformly from the
    whole stack, so the fit costs one read and the sample's memory, whatever the stack's size.

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with ``channel_dim`` of size 3 or 4 (alpha is clustered too when present).
    n_colors : int
        Palette size (2-256).
    sample : int
        About this many pixels are drawn (all of them for smaller stacks).
    seed : int
        The sample and the k-means++ start: the same seed, the same palette.
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    volnorm.Params
        ``method="quantize"``, ``values["palette"]`` ``(color, channel)`` in the data's scale,
        reusable on new frames with ``vn.color.quantize(frames, params=p)``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> px = np.array([[0, 0, 0]] * 50 + [[255, 0, 0]] * 50, dtype="uint8").reshape(10, 10, 3)
    >>> p = vn.color.fit_quantize(xr.DataArray(px, dims=("y", "x", "channel")), 2)
    >>> sorted(map(tuple, p.values["palette"].values.round().astype(int).tolist()))
    [(0, 0, 0), (255, 0, 0)]
    """
    from scipy.cluster.vq import kmeans2  # on first use: not imported with volnorm

    rgb = _channels(rgb, channel_dim)
    if not (isinstance(n_colors, (int, np.integer)) and 2 <= n_colors <= 256):
        raise ValueError(f"`n_colors` must be an int in 2..256; got {n_colors!r}")
    pts = _pixels_sample(rgb, int(sample), int(seed), channel_dim)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < n_colors:
        raise ValueError(f"only {len(pts)} valid pixels to fit {n_colors} colours")
    # k-means++ start and one Lloyd round (scipy), then Lloyd rounds until no pixel changes its
    # colour (a fixed point: the means no longer move), at most 300
    centres, lab = kmeans2(pts, int(n_colors), iter=1, minit="++", seed=np.random.default_rng(seed), check_finite=False)
    k = len(centres)
    for _ in range(300):
        counts = np.bincount(lab, minlength=k)
        sums = np.stack([np.bincount(lab, weights=pts[:, c], minlength=k) for c in range(pts.shape[1])], axis=1)
        filled = counts > 0  # an emptied colour keeps its place
        centres = np.where(filled[:, None], sums / np.maximum(counts, 1)[:, None], centres)
        new = _nearest(pts, centres)
        if np.array_equal(new, lab):
            break
        lab = new
    values = xr.Dataset({"palette": (("color", channel_dim), centres)}, coords={channel_dim: rgb[channel_dim].values if channel_dim in rgb.coords else np.arange(rgb.sizes[channel_dim])})
    return Params("quantize", values, {"n_colors": int(n_colors), "sample": len(pts), "seed": int(seed)})


def _nearest(pts: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each point ``(n, c)`` (exact squared Euclidean distance,
    the lowest index among equals), point by point in a numba kernel: no ``(n, k)`` matrix.
    8-bit RGB goes through a 24-bit table made once per palette and process (:func:`_rgb_table`)."""
    centres = np.ascontiguousarray(centres, dtype=np.float64)
    if pts.dtype == np.uint8 and pts.shape[1] >= 3 and centres.shape[1] == 3:
        table, cells = _rgb_table(centres.tobytes())
        out = np.empty(len(pts), dtype=table.dtype)
        _kernels.rgb_lookup(pts, table, cells, out)
        return out
    out = np.empty(len(pts), dtype=np.int64)
    ok = pts.dtype.kind in "ui" or pts.dtype in (np.float32, np.float64)  # what numba takes as it is
    _kernels.nearest_rows(pts if ok else pts.astype(np.float64), centres, out)
    return out


_TABLE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _rgb_table_cached(key: bytes) -> tuple[np.ndarray, np.ndarray]:
    centres = np.frombuffer(key, dtype=np.float64).reshape(-1, 3)
    table = np.empty(1 << 24, dtype=np.uint8 if len(centres) <= 256 else np.int32)
    cells = np.empty(1 << 15, dtype=np.int32)
    _kernels.rgb_nearest_table(centres, table, cells)
    table.flags.writeable = cells.flags.writeable = False
    return table, cells


def _rgb_table(key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centre of every 8-bit colour (16 MiB) and of every cell of 8**3 colours that
    has one answer, for the palette whose float64 bytes are ``key``: ~0.1 s, made the first time
    a process (a worker) needs it and kept for the next blocks (8 palettes at most); tasks carry
    only the palette. Measured 42 MiB of RGB in 0.05-0.17 s per thread, against 0.85 s (16
    colours) to 11 s (256) comparing each pixel with each colour."""
    with _TABLE_LOCK:  # two threads of one worker build it once
        return _rgb_table_cached(key)


def quantize(
    rgb: xr.DataArray, n_colors: int = 16, *, params: Any = None, labels: bool = False, channel_dim: str = "channel", **fit: Any
) -> xr.DataArray:
    """Reduce a colour stack to a palette: each pixel takes its nearest palette colour,
    block by block (lazy). The palette is fitted with :func:`fit_quantize` unless ``params``
    gives one (e.g. fitted on the first frames of a video, applied to the rest).

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with ``channel_dim`` of size 3 or 4.
    n_colors : int
        Palette size when fitting.
    params : volnorm.Params, optional
        A fitted palette (``fit_quantize``); no fit then (checked by :func:`volnorm.params.check`:
        an ``n_colors`` other than the default, or a ``seed``, must be what it was fitted with).
    labels : bool
        Return each pixel's palette index (uint8, without ``channel_dim``) instead of its colour.
        (Float pixels with a NaN get NaN colours, or label 0: uint8 has no missing value.)
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).
    fit
        ``sample=`` and ``seed=`` for the fit.

    Returns
    -------
    xarray.DataArray
        The quantized colours in the input's dtype (rounded for integers), or the labels;
        the palette in ``attrs["volnorm_params"]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> px = xr.DataArray(np.array([[[10, 10, 10], [250, 0, 0], [12, 9, 11]]], dtype="uint8"), dims=("y", "x", "channel"))
    >>> vn.color.quantize(px, 2, labels=True).values.tolist() in ([[0, 1, 0]], [[1, 0, 1]])
    True
    """
    rgb = _channels(rgb, channel_dim)
    if params is None:
        p = fit_quantize(rgb, n_colors, channel_dim=channel_dim, **fit)
    else:
        p = check(params, quantize, rgb, n_colors=n_colors, **fit)
    centres = np.asarray(p.values["palette"].values, dtype=np.float64)
    if centres.shape[1] != rgb.sizes[channel_dim]:
        raise ValueError(f"the palette has {centres.shape[1]} channels, the data {rgb.sizes[channel_dim]}")
    out_colors = centres.round().clip(0, 255).astype(rgb.dtype) if rgb.dtype.kind in "iu" else centres.astype(rgb.dtype)

    def block(x: np.ndarray) -> np.ndarray:
        lab = _nearest(x.reshape(-1, x.shape[-1]), centres).reshape(x.shape[:-1])  # 8-bit RGB: the table
        if labels:
            return lab.astype(np.uint8, copy=False)
        out = out_colors[lab]
        if x.dtype.kind == "f":  # a pixel with a NaN stays NaN
            out[np.isnan(x).any(axis=-1)] = np.nan
        return out

    x = rgb.transpose(..., channel_dim)
    if labels:
        out = xr.apply_ufunc(block, x, input_core_dims=[[channel_dim]], dask="parallelized", output_dtypes=[np.uint8])
    else:
        out = xr.apply_ufunc(block, x, input_core_dims=[[channel_dim]], output_core_dims=[[channel_dim]], dask="parallelized",
                             output_dtypes=[rgb.dtype]).transpose(*rgb.dims)
    return attach(out, rgb, p)


# ---------------------------------------------------------------------------
# exposure report
# ---------------------------------------------------------------------------


def exposure(
    data: xr.DataArray, *, dark: float = 0.1, bright: float = 0.9, channel_dim: str = "channel", scale: float | None = None
) -> xr.Dataset:
    """An exposure report per image: mean luma, RMS contrast, perceived brightness, the
    fractions of under- and over-exposed pixels and a 0-10 brightness level. One pass.

    Values are taken on a 0-1 scale: integers divided by their dtype's maximum (uint8 by
    255), floats as they are (or divided by ``scale``). Colour images use BT.601 luma for
    the mean, contrast and exposure fractions and the perceived brightness
    ``sqrt(0.299 R² + 0.587 G² + 0.114 B²)`` for ``brightness``; grey images use their value
    for both.

    Parameters
    ----------
    data : xarray.DataArray
        A stack ``(volume, y, x[, channel])`` or one image.
    dark : float
        Pixels below this (0-1) count as under-exposed.
    bright : float
        Pixels above this (0-1) count as over-exposed.
    channel_dim : str
        The name of the channel dim of colour data.
    scale : float, optional
        The value of full white (default: the integer dtype's maximum, 1 for floats).

    Returns
    -------
    xarray.Dataset
        Per image (the ``volume`` dim): ``mean``, ``rms_contrast`` (std of the luma),
        ``brightness``, ``underexposed``, ``overexposed`` (fractions) and ``level``
        (``round(10 * brightness)``, 0 black to 10 white). ``report.to_dataframe()`` gives
        the table; ``vn.plot.plot_exposure`` draws it.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[[0, 0], [0, 0]], [[255, 255], [128, 255]]], dtype="uint8"), dims=("volume", "y", "x"))
    >>> r = vn.color.exposure(x)
    >>> r["level"].values.tolist(), r["underexposed"].values.tolist()
    ([0, 9], [1.0, 0.0])
    """
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"expected an xarray.DataArray; got {type(data).__name__}")
    if scale is None:
        scale = _white(data.dtype)
    if channel_dim in data.dims:
        luma = to_grey(data, method="rec601", channel_dim=channel_dim) / scale
        perceived = to_grey(data, method="perceived", channel_dim=channel_dim) / scale
    else:
        luma = perceived = data.astype(np.float32 if data.dtype.itemsize <= 2 else np.float64) / scale
    over = [d for d in luma.dims if d != "volume"]
    report = xr.Dataset({
        "mean": luma.mean(over),
        "rms_contrast": luma.std(over),
        "brightness": perceived.mean(over),
        "underexposed": (luma < dark).mean(over),
        "overexposed": (luma > bright).mean(over),
    }).compute()
    report = report.astype(np.float64)
    report["level"] = np.clip(np.round(10 * report["brightness"]), 0, 10).astype(np.int64)
    report.attrs.update(dark=float(dark), bright=float(bright), scale=float(scale))
    return report


# ---------------------------------------------------------------------------
# equalization of colour, desaturation: in a colour space that keeps hue
# ---------------------------------------------------------------------------

#: Colour spaces for luminance-only work: (to, from, the lightness channel, its range).
_SPACES = {"hsv": ("rgb2hsv", "hsv2rgb", 2, (0.0, 1.0)), "lab": ("rgb2lab", "lab2rgb", 0, (0.0, 100.0))}


def _as_unit(rgb: xr.DataArray) -> tuple[xr.DataArray, float]:
    """RGB as floats in [0, 1] (integers divided by their dtype's maximum) and that scale."""
    scale = _white(rgb.dtype)
    return rgb.astype(np.float64) / scale, scale


def _from_unit(x: xr.DataArray, like: xr.DataArray, scale: float) -> xr.DataArray:
    if like.dtype.kind in "iu":
        return (x * scale).round().clip(0, scale).astype(like.dtype)
    return x.clip(0, 1).astype(like.dtype if like.dtype.kind == "f" else np.float64)


def _convert(x: xr.DataArray, func: str, channel_dim: str) -> xr.DataArray:
    """skimage.color's ``func`` block by block over the channel dim (kept last in the block)."""
    import skimage.color  # on first use: not imported with volnorm

    f = getattr(skimage.color, func)
    order = x.dims
    if x.chunks is not None:
        x = x.chunk({channel_dim: -1})  # the three channels in one block
    def block(b: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # lab2rgb: out-of-gamut colours clipped (documented), once per block
            warnings.filterwarnings("ignore", message=".*negative Z values.*")
            return f(b[..., :3], channel_axis=-1)

    out = xr.apply_ufunc(block, x.transpose(..., channel_dim), input_core_dims=[[channel_dim]],
                         output_core_dims=[[channel_dim]], dask="parallelized", output_dtypes=[np.float64],
                         dask_gufunc_kwargs={"output_sizes": {channel_dim: 3}}, exclude_dims={channel_dim})
    return out.transpose(*order)


def equalize_color(
    rgb: xr.DataArray,
    *,
    mode: str = "luminance",
    space: str = "lab",
    dim: str | tuple[str, ...] | None = None,
    nbins: int = 256,
    channel_dim: str = "channel",
) -> xr.DataArray:
    """Histogram equalization of colour images: of the lightness only, in a space that keeps
    hue (``mode="luminance"``: Lab's L, or HSV's V), or of each channel on its own
    (``mode="channels"``, which shifts colours).

    The CDFs are exact and, by the ``dim`` rule, dataset-wide by default (one for the whole
    stack, computed out of core with :func:`volnorm.equalize`); ``dim=("y", "x")`` gives one
    per image. Alpha is dropped.
    Lab colours that a brighter L pushes out of the sRGB gamut are clipped (as
    ``skimage.color.lab2rgb`` does, without its warning for every block).

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with a ``channel_dim`` of size 3 or 4; integers are read on their dtype's full
        scale (uint8: 0-255), floats in [0, 1].
    mode : {"luminance", "channels"}
        What is equalized.
    space : {"lab", "hsv"}
        ``mode="luminance"``: the colour space whose lightness is equalized.
    dim : str or tuple of str, optional
        The dims each CDF is computed over (never the channel dim): ``None`` (default) every
        other dim, one CDF for the stack; ``("y", "x")`` one per image.
    nbins : int
        Bins of the float histogram, as ``skimage.exposure.equalize_hist``.
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    xarray.DataArray
        RGB in the input's dtype and scale (integers rounded), lazy when the input is.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> rgb = xr.DataArray(np.random.default_rng(0).integers(60, 120, (8, 8, 3), dtype=np.uint8), dims=("y", "x", "channel"))
    >>> out = vn.color.equalize_color(rgb, space="hsv")
    >>> int(rgb.max()) < 130 and int(out.max()) > 240   # the dim picture now spans the range
    True
    """
    rgb = _channels(rgb, channel_dim)
    rgb3 = rgb.isel({channel_dim: slice(0, 3)})
    unit, scale = _as_unit(rgb3)
    over = tuple(d for d in rgb3.dims if d != channel_dim) if dim is None else ((dim,) if isinstance(dim, str) else tuple(dim))
    if channel_dim in over or not set(over) <= set(rgb3.dims):
        raise ValueError(f"`dim` must name dims of the data other than {channel_dim!r}; got {dim!r} for dims {rgb3.dims}")
    if mode == "channels":  # each channel its own CDF
        out = equalize(unit, nbins, dim=over)
        return _from_unit(out.transpose(*rgb3.dims), rgb3, scale).rename(rgb.name)
    if mode != "luminance":
        raise ValueError(f"`mode` must be 'luminance' or 'channels'; got {mode!r}")
    if space not in _SPACES:
        raise ValueError(f"`space` must be one of {', '.join(_SPACES)}; got {space!r}")
    to, back, li, rng = _SPACES[space]
    conv = _convert(unit, to, channel_dim)
    light = conv.isel({channel_dim: li}, drop=True)
    eq = equalize(light, nbins, dim=over, out_range=rng)
    parts = [eq if i == li else conv.isel({channel_dim: i}, drop=True) for i in range(3)]
    merged = xr.concat(parts, dim=channel_dim).transpose(*conv.dims)
    out = _convert(merged, back, channel_dim)
    return _from_unit(out, rgb3, scale).assign_coords({channel_dim: rgb3[channel_dim]} if channel_dim in rgb3.coords else {}).rename(rgb.name)


def radial_weight(
    like: xr.DataArray, centre: tuple[float, float], inner: float, outer: float, *, dims: tuple[str, str] = ("y", "x")
) -> xr.DataArray:
    """A weight map on ``like``'s ``(y, x)`` grid: 1 within ``inner`` pixels of ``centre``,
    falling linearly to 0 at ``outer`` (for :func:`desaturate`: colour kept at a focus point,
    fading to grey around it).

    Parameters
    ----------
    like : xarray.DataArray
        Gives the grid (sizes of ``dims``).
    centre : (float, float)
        The focus point, (row, column) in pixels.
    inner : float
        Full weight within this distance.
    outer : float
        Zero weight from this distance on (> ``inner``).
    dims : (str, str)
        The row and column dims.

    Returns
    -------
    xarray.DataArray
        float64 weights in [0, 1] over ``dims``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> w = vn.color.radial_weight(xr.DataArray(np.zeros((1, 5)), dims=("y", "x")), (0, 0), 1, 3)
    >>> w.values.round(2).tolist()
    [[1.0, 1.0, 0.5, 0.0, 0.0]]
    """
    if not outer > inner >= 0:
        raise ValueError(f"need 0 <= inner < outer; got {inner!r}, {outer!r}")
    yy, xx = np.meshgrid(np.arange(like.sizes[dims[0]]), np.arange(like.sizes[dims[1]]), indexing="ij")
    r = np.hypot(yy - centre[0], xx - centre[1])
    return xr.DataArray(np.clip((outer - r) / (outer - inner), 0.0, 1.0), dims=dims, name="weight")


def desaturate(rgb: xr.DataArray, weight: xr.DataArray | float, *, channel_dim: str = "channel") -> xr.DataArray:
    """Fade colour towards grey gradually: HSV saturation multiplied by ``weight`` (1 keeps
    the colour, 0 gives grey of the same value), hue and value unchanged — not a blend of
    the RGB channels with a grey image.

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with a ``channel_dim`` of size 3 or 4 (alpha dropped).
    weight : xarray.DataArray or float
        In [0, 1], broadcastable to the image grid (e.g. :func:`radial_weight`).
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    xarray.DataArray
        RGB in the input's dtype and scale, lazy when the input is.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> red = xr.DataArray(np.array([[[200, 40, 40]]], dtype=np.uint8), dims=("y", "x", "channel"))
    >>> vn.color.desaturate(red, 0.0).values.tolist()   # grey with the same HSV value
    [[[200, 200, 200]]]
    """
    rgb = _channels(rgb, channel_dim)
    rgb3 = rgb.isel({channel_dim: slice(0, 3)})
    w = weight if isinstance(weight, xr.DataArray) else xr.DataArray(float(weight))
    if float(w.min()) < 0 or float(w.max()) > 1:
        raise ValueError("`weight` must be in [0, 1]")
    unit, scale = _as_unit(rgb3)
    hsv = _convert(unit, "rgb2hsv", channel_dim)
    s = hsv.isel({channel_dim: 1}, drop=True) * w
    merged = xr.concat([hsv.isel({channel_dim: 0}, drop=True), s.transpose(*hsv.isel({channel_dim: 0}, drop=True).dims), hsv.isel({channel_dim: 2}, drop=True)], dim=channel_dim)
    out = _convert(merged.transpose(*hsv.dims), "hsv2rgb", channel_dim)
    return _from_unit(out, rgb3, scale).rename(rgb.name)

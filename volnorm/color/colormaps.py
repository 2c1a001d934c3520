"""Colormaps (matplotlib's, no figure) applied and inverted block by block."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from volnorm import _color_kernels
from volnorm._histogram import value_range
from volnorm.color.grey import channels
from volnorm.color.palette import nearest, rgb_table

__all__ = ["apply_colormap", "colormap_table", "invert_colormap", "quantize_grey"]


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
        colormap (``colormap``, its number of colours ``colormap_n``), ``vmin`` and ``vmax``:
        :func:`invert_colormap` reads them.

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
        _color_kernels.colormap_rows(flat, lo, span, ft(n), np.empty(1, ft), table, out)  # matplotlib's steps
        return out.reshape(x.shape + (4,))

    out = xr.apply_ufunc(
        block, data, output_core_dims=[["channel"]], dask="parallelized", output_dtypes=[np.uint8],
        dask_gufunc_kwargs={"output_sizes": {"channel": 4}},
    )
    name = getattr(cm, "name", str(cmap))
    return out.assign_coords(channel=["R", "G", "B", "A"]).rename(data.name).assign_attrs(
        colormap=name, colormap_n=int(n), vmin=float(vmin), vmax=float(vmax))


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
    rgb: xr.DataArray, cmap: Any = None, vmin: float | None = None, vmax: float | None = None, *, channel_dim: str = "channel"
) -> xr.DataArray:
    """Recover scalar data from a picture made with a colormap: each pixel takes the value of
    the nearest colour among all the colormap's entries (Euclidean in RGB; a pixel need not
    match a colour exactly, e.g. after JPEG compression).

    ``cmap``, ``vmin`` and ``vmax`` not given are read from the picture's ``attrs``, where
    :func:`apply_colormap` writes them (``colormap``, ``colormap_n``, ``vmin``, ``vmax``); without
    them the defaults are viridis, 0 and 1. ``attrs["from_attrs"]`` lists what was read.

    The value of entry ``i`` is the centre of its interval, ``vmin + (i + 0.5) * step`` with
    ``step = (vmax - vmin) / N``. Entries that share one colour cannot be told apart: they
    get the middle of their centres. 8-bit pictures (matplotlib's ``bytes=True``) are compared
    with the 8-bit colours, through a table of the nearest entry of every 8-bit colour made
    once per colormap and process; float pictures (0-1, matplotlib's default float RGBA, or
    8-bit colours divided by 255 as ``plt.imread`` gives a PNG) with the float colours and the
    8-bit colours / 255 both (the float colours first among equals).
    ``attrs["max_error"]`` is a true bound of ``|inverted - value|`` for every value in
    ``[vmin, vmax]`` rendered by matplotlib in that representation (8-bit, float64, float32,
    8-bit / 255): it is found by inverting every entry's renders, and is half a step plus the
    farthest an entry's render lands from it (8-bit jet, whose ends repeat a colour 4 times:
    2 steps; viridis: 1 step; plasma, magma: half a step. Float pictures: jet 2.5 steps, gray
    1.5, viridis 1, magma half a step, where an 8-bit colour / 255 can equal another entry's float
    colour; a float64 render itself comes back within jet's 1.5 steps, half a step for most).
    ``attrs["step"]`` is the quantization step (jet over 1500-4500 with 256 colours: 11.72);
    ``distance`` (a coord) says how far each pixel's colour was from the colormap.

    Parameters
    ----------
    rgb : xarray.DataArray
        uint8 (0-255) or float (0-1) colours with a ``channel_dim`` of size 3 or 4 (alpha ignored;
        labelled channels are taken by label).
    cmap : str or matplotlib.colors.Colormap, optional
        The colormap the picture was made with (default: ``attrs["colormap"]``, else viridis).
    vmin : float, optional
        The value of the colormap's first colour (default: ``attrs["vmin"]``, else 0).
    vmax : float, optional
        The value of its last colour (default: ``attrs["vmax"]``, else 1).
    channel_dim : str
        The name of the channel dim (R, G, B[, A]).

    Returns
    -------
    xarray.DataArray
        float64 values without ``channel_dim``, with a ``distance`` coord (float32 RGB distance to
        the nearest colour, 0-255 scale) and ``attrs`` ``step``, ``max_error``, ``colormap``,
        ``vmin``, ``vmax``, ``from_attrs``.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.linspace(1500, 4500, 7), dims="x")
    >>> back = vn.color.invert_colormap(vn.color.apply_colormap(x, "jet", vmin=1500, vmax=4500), "jet", vmin=1500, vmax=4500)
    >>> round(back.attrs["step"], 2), bool(np.all(np.abs(back - x) <= back.attrs["max_error"]))
    (11.72, True)
    """
    attrs = rgb.attrs if isinstance(rgb, xr.DataArray) else {}
    rgb = channels(rgb, channel_dim)
    given = {"colormap": cmap, "vmin": vmin, "vmax": vmax}
    from_attrs = [k for k, v in given.items() if v is None and k in attrs]
    cmap, vmin, vmax = (v if v is not None else attrs.get(k, d) for (k, v), d in zip(given.items(), ("viridis", 0.0, 1.0)))
    table, cm = colormap_table(cmap)
    if "colormap" in from_attrs and attrs.get("colormap_n", cm.N) != cm.N:  # quantize_grey: a resampled colormap
        table, cm = colormap_table(cm.resampled(int(attrs["colormap_n"])))
    n = cm.N
    step = (float(vmax) - float(vmin)) / n
    kind = "f" if rgb.dtype.kind == "f" else "u"
    colors, mids = _entries(table[:n, :3].astype(np.float64))
    if kind == "f":  # float colours first (they win ties), then the 8-bit ones / 255
        fcolors, fmids = _entries(cm(np.arange(n))[:, :3] * 255.0)
        colors, mids = np.concatenate([fcolors, colors]), np.concatenate([fmids, mids])
    colors = np.ascontiguousarray(colors)
    centres = float(vmin) + (mids + 0.5) * step
    max_error = (_farthest(cm, table, colors, mids, kind) + 0.5) * step

    def block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pts = x.reshape(-1, x.shape[-1])
        value, dist = np.empty(len(pts), dtype=np.float64), np.empty(len(pts), dtype=np.float32)
        if pts.dtype == np.uint8:
            _color_kernels.rgb_invert(pts, *rgb_table(colors.tobytes()), colors, centres, value, dist)
        else:
            pts = pts[:, :3].astype(np.float64) * (255.0 if kind == "f" else 1.0)
            i = nearest(pts, colors)
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
                                              vmin=float(vmin), vmax=float(vmax), from_attrs=from_attrs)


def _entries(colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A colormap's distinct colours ``(k, 3)`` float64 and the middle entry index of each (entries
    sharing a colour, as jet's 8-bit ends, 4 entries, are one colour)."""
    uniq, which = np.unique(colors, axis=0, return_inverse=True)
    which = which.ravel()
    idx = np.arange(len(colors))
    first, last = np.full(len(uniq), len(colors)), np.full(len(uniq), -1)
    np.minimum.at(first, which, idx)
    np.maximum.at(last, which, idx)
    return np.ascontiguousarray(uniq, dtype=np.float64), (first + last) / 2


def _farthest(cm: Any, table: np.ndarray, colors: np.ndarray, mids: np.ndarray, kind: str) -> float:
    """How far (in entries) the inverse of an entry's render lands from the entry, at most, over
    every entry and every render of the kind: 8-bit (``"u"``), or float64, float32, 8-bit / 255
    in float64 and float32 (``"f"``), computed as the inversion computes it."""
    idx = np.arange(cm.N)
    if kind == "u":
        renders = [table[: cm.N, :3].astype(np.float64)]
    else:
        f, b = cm(idx)[:, :3], table[: cm.N, :3] / 255.0
        renders = [r.astype(t).astype(np.float64) * 255.0 for r in (f, b) for t in (np.float64, np.float32)]
    return float(max(np.max(np.abs(mids[nearest(r, colors)] - idx)) for r in renders))

"""Colour equalization and desaturation in a colour space that keeps hue."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from volnorm import _color_kernels
from volnorm._histogram import numba_ready
from volnorm.color.grey import channels, white
from volnorm.transforms.equalization import equalize

__all__ = ["desaturate", "equalize_color", "radial_weight"]

#: Colour spaces for luminance-only work: (to, from, the lightness channel, its range).
_SPACES = {"hsv": ("rgb2hsv", "hsv2rgb", 2, (0.0, 1.0)), "lab": ("rgb2lab", "lab2rgb", 0, (0.0, 100.0))}


def _as_unit(rgb: xr.DataArray) -> tuple[xr.DataArray, float]:
    """RGB as floats in [0, 1] (integers divided by their dtype's maximum) and that scale."""
    scale = white(rgb.dtype)
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
        The name of the channel dim (R, G, B[, A]; channels labelled in another order, such as
        OpenCV's ``["B", "G", "R"]``, are taken by label and come back as R, G, B, labelled).

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
    rgb = channels(rgb, channel_dim)
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

    With ``V`` the largest channel of a pixel, HSV's round trip with the saturation times ``w``
    gives each channel ``c`` as ``V - w (V - c)``; that is computed directly, in float64, per
    pixel (one pass, no colour-space temporaries). Integer results are that value rounded half
    to even: scikit-image's ``hsv2rgb(rgb2hsv(x))`` with ``S * w``, rounded, lands 1 away where
    the value is an exact half (its float error decides; 5.5 % of ``astronaut()``'s pixels at
    ``w = 0.5``, none at ``w`` 0 or 1). OpenCV's 8-bit HSV (hue in 2-degree steps) is further off.

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with a ``channel_dim`` of size 3 or 4 (alpha dropped).
    weight : xarray.DataArray or float
        In [0, 1], broadcastable to the image grid (e.g. :func:`radial_weight`).
    channel_dim : str
        The name of the channel dim (R, G, B[, A]; channels labelled in another order, such as
        OpenCV's ``["B", "G", "R"]``, are taken by label and come back as R, G, B, labelled).

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
    rgb = channels(rgb, channel_dim)
    rgb3 = rgb.isel({channel_dim: slice(0, 3)})
    w = weight if isinstance(weight, xr.DataArray) else xr.DataArray(float(weight))
    if float(w.min()) < 0 or float(w.max()) > 1:
        raise ValueError("`weight` must be in [0, 1]")
    extra = [d for d in w.dims if d not in rgb3.dims or d == channel_dim]
    if extra:
        raise ValueError(f"`weight` has dims {extra!r} that the image grid does not have (dims {rgb3.dims})")
    dt = rgb3.dtype if rgb3.dtype.kind in "iuf" else np.dtype(np.float64)
    integer, scale = rgb3.dtype.kind in "iu", white(rgb3.dtype)

    def block(b: np.ndarray, wb: np.ndarray) -> np.ndarray:
        flat = numba_ready(np.ascontiguousarray(b[..., :3]).reshape(-1, 3))
        wf = np.ascontiguousarray(np.broadcast_to(wb, b.shape[:-1]) if np.ndim(wb) else np.reshape(wb, 1), dtype=np.float64).reshape(-1)
        out = np.empty(flat.shape, dtype=dt)
        _color_kernels.desaturate_rows(flat, wf, scale, integer, out)
        return out.reshape(b[..., :3].shape)

    out = xr.apply_ufunc(block, rgb3.transpose(..., channel_dim), w, input_core_dims=[[channel_dim], []],
                         output_core_dims=[[channel_dim]], dask="parallelized", output_dtypes=[dt])
    return out.transpose(*rgb3.dims).rename(rgb.name)

"""Greyscale from colour: luma, perceived brightness, the exposure report; the channel rules
every colour function shares (a ``channel`` dim of 3 or 4, its R, G, B[, A] labels)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from volnorm import _color_kernels
from volnorm._eager import in_memory, row_parts, run_parallel
from volnorm._histogram import numba_ready, per_block, prepare

__all__ = ["LUMA", "PERCEIVED", "exposure", "to_grey"]

#: Weights of R, G, B in the luma of ITU-R BT.601 (``"rec601"``, as PIL and OpenCV) and
#: BT.709 (``"rec709"``, sRGB primaries).
LUMA = {"rec601": (0.299, 0.587, 0.114), "rec709": (0.2126, 0.7152, 0.0722)}
#: Weights of R², G², B² in the perceived brightness ``sqrt(0.241 R² + 0.691 G² + 0.068 B²)``
#: (Darel Rex Finley's HSP colour model, 2006).
PERCEIVED = (0.241, 0.691, 0.068)

#: Channel labels understood (any case): what each names.
LABELS = {"R": "R", "RED": "R", "G": "G", "GREEN": "G", "B": "B", "BLUE": "B", "A": "A", "ALPHA": "A"}


def channels(rgb: xr.DataArray, channel_dim: str, *, order: bool = True) -> xr.DataArray:
    """``rgb`` checked as colour data (a ``channel_dim`` of size 3 or 4, in one chunk), its
    channels put in R, G, B[, A] order by their labels when the dim has string labels
    (``["B", "G", "R"]``: OpenCV's order; ``red``/``green``/``blue``/``alpha`` too, any case).
    Without labels (or with the labels 0, 1, 2[, 3]) the order is R, G, B[, A]. Other labels
    are refused. ``order=False``: only checked (channel-agnostic work: palettes)."""
    if not isinstance(rgb, xr.DataArray):
        raise TypeError(f"expected an xarray.DataArray with a {channel_dim!r} dim; got {type(rgb).__name__}")
    if channel_dim not in rgb.dims or rgb.sizes[channel_dim] not in (3, 4):
        raise ValueError(f"colour data need a {channel_dim!r} dim of size 3 (RGB) or 4 (RGBA); got dims {dict(rgb.sizes)}")
    if order and channel_dim in rgb.coords:
        labels = rgb[channel_dim].values.tolist()
        n = len(labels)
        if labels != list(range(n)):
            names = [LABELS.get(str(v).upper()) for v in labels]
            want = ["R", "G", "B", "A"][:n]
            if sorted(map(str, names)) != sorted(want):
                raise ValueError(
                    f"the {channel_dim!r} labels {labels!r} do not name {', '.join(want)} once each (R, G, B, A or red, "
                    "green, blue, alpha, any case; or no labels: R, G, B[, A] in that order)")
            if names != want:
                rgb = rgb.isel({channel_dim: [names.index(c) for c in want]})
    if rgb.chunks is not None and len(rgb.chunksizes[channel_dim]) > 1:
        rgb = rgb.chunk({channel_dim: -1})  # a pixel's channels in one block
    return rgb


def white(dtype: np.dtype) -> float:
    """The value of full white: an integer dtype's maximum (uint8: 255), 1 for floats."""
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def to_grey(
    rgb: xr.DataArray, *, method: str | tuple[float, float, float] = "rec601", channel_dim: str = "channel",
    dtype: Any = None,
) -> xr.DataArray:
    """Greyscale from RGB(A): a weighted sum of the channels (luma), or the perceived
    brightness ``sqrt(0.241 R² + 0.691 G² + 0.068 B²)`` (HSP). Alpha is ignored.

    The channels are taken by their labels when ``channel_dim`` has them (``["B", "G", "R"]``,
    OpenCV's order, gives what ``cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)`` does, before its
    rounding to uint8); unknown labels are refused.

    Parameters
    ----------
    rgb : xarray.DataArray
        Colour data with a ``channel_dim`` of size 3 or 4, in any dtype (integer values keep their
        scale: uint8 in, 0-255 floats out).
    method : {"rec601", "rec709", "perceived"} or (float, float, float)
        BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert("L")`` and OpenCV's
        weights), BT.709 luma, the perceived brightness of Darel Rex Finley's HSP model
        (:data:`PERCEIVED`; before, this name gave ``sqrt`` of the BT.601-weighted squares), or
        three weights of R, G, B: their weighted sum.
    channel_dim : str
        The name of the channel dim (R, G, B[, A], or labelled in another order).
    dtype : integer dtype, optional
        Round the grey values half to even and clip them to this dtype (``"uint8"``: an 8-bit
        image, as ``cv2.cvtColor`` and PIL's ``convert("L")`` give, within 1 of both: they round
        in fixed point), computed in one pass. Default: float.

    Returns
    -------
    xarray.DataArray
        float32 for inputs of up to 16 bits, float64 otherwise (or ``dtype``), without
        ``channel_dim``; lazy when the input is.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> px = xr.DataArray(np.array([[255, 0, 0], [255, 255, 255]], dtype="uint8"), dims=("x", "channel"))
    >>> [round(float(v), 3) for v in vn.color.to_grey(px).values]
    [76.245, 255.0]
    >>> [round(float(v), 2) for v in vn.color.to_grey(px, method="perceived").values]   # 255 * sqrt(0.241)
    [125.18, 255.0]
    >>> bgr = px.assign_coords(channel=["B", "G", "R"])   # OpenCV's order: the first pixel is blue
    >>> [round(float(v), 3) for v in vn.color.to_grey(bgr).values]
    [29.07, 255.0]
    >>> vn.color.to_grey(px, dtype="uint8").values.tolist()
    [76, 255]
    """
    rgb = channels(rgb, channel_dim)
    ft = np.float32 if rgb.dtype.itemsize <= 2 or rgb.dtype == np.float32 else np.float64
    if isinstance(method, str):
        if method not in ("perceived", *LUMA):
            raise ValueError(f"`method` must be one of rec601, rec709, perceived or 3 weights; got {method!r}")
        weights = PERCEIVED if method == "perceived" else LUMA[method]
    else:
        weights = tuple(method) if np.ndim(method) == 1 else ()
        if len(weights) != 3 or not all(isinstance(v, (int, float, np.number)) and np.isfinite(v) for v in weights):
            raise ValueError(f"`method` must be one of rec601, rec709, perceived or 3 finite weights of R, G, B; got {method!r}")
    w = [ft(v) for v in weights]
    root = isinstance(method, str) and method == "perceived"

    integer = dtype is not None
    out_dtype = np.dtype(dtype) if integer else np.dtype(ft)
    if integer and out_dtype.kind not in "iu":
        raise ValueError(f"`dtype` must be an integer dtype (or None for float); got {out_dtype}")
    lo, hi = (ft(np.iinfo(out_dtype).min), ft(np.iinfo(out_dtype).max)) if integer else (ft(0), ft(0))
    kernel = _color_kernels.luma_kernel(rgb.sizes[channel_dim], root, integer, ft)
    shared = in_memory(rgb) is not None  # apply_ufunc then calls `block` once: its pixels shared among threads

    def block(x: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(numba_ready(x.reshape(-1, x.shape[-1])))
        out = np.empty(len(flat), dtype=out_dtype)
        shares = row_parts(len(flat), flat.shape[1] * flat.itemsize + out.itemsize) if shared else [slice(None)]
        run_parallel(lambda s: kernel(flat[s].reshape(-1), *w, lo, hi, out[s]), shares)
        return out.reshape(x.shape[:-1])

    out = xr.apply_ufunc(block, rgb.transpose(..., channel_dim), input_core_dims=[[channel_dim]], dask="parallelized", output_dtypes=[out_dtype])
    return out.transpose(*[d for d in rgb.dims if d != channel_dim]).rename(rgb.name).assign_attrs(rgb.attrs)



def _merge_exposure(parts: np.ndarray) -> list[np.ndarray]:
    """Merge :func:`volnorm._color_kernels.exposure_rows` rows of the blocks of one image (axis 0):
    Chan's update for the luma's mean and M2, weighted means, sums."""
    n, mean, m2, npv, pmean, under, over, total = (parts[0, ..., k].copy() for k in range(parts.shape[-1]))
    for p in parts[1:]:
        nb = p[..., 0]
        tot = n + nb
        with np.errstate(invalid="ignore", divide="ignore"):
            fb = np.where(tot > 0, nb / tot, 0.0)
            delta = np.where(nb > 0, p[..., 1] - np.nan_to_num(mean), 0.0)
            mean = np.where(n > 0, mean, 0.0) + np.where(nb > 0, delta * fb, 0.0)
            m2 = np.where(n > 0, m2, 0.0) + np.where(nb > 0, p[..., 2] + delta * delta * n * fb, 0.0)
            ptot = npv + p[..., 3]
            pmean = np.where(ptot > 0, (np.nan_to_num(pmean) * npv + np.nan_to_num(p[..., 4]) * p[..., 3]) / ptot, np.nan)
        n, npv = tot, ptot
        mean = np.where(n > 0, mean, np.nan)
        under, over, total = under + p[..., 5], over + p[..., 6], total + p[..., 7]
    return [n, mean, m2, npv, pmean, under, over, total]


def exposure(
    data: xr.DataArray, *, dark: float = 0.1, bright: float = 0.9, channel_dim: str = "channel", scale: float | None = None
) -> xr.Dataset:
    """An exposure report per image: mean luma, RMS contrast, perceived brightness, the
    fractions of under- and over-exposed pixels and a 0-10 brightness level. One pass.

    Values are taken on a 0-1 scale: integers divided by their dtype's maximum (uint8 by
    255), floats as they are (or divided by ``scale``). Colour images use BT.601 luma for
    the mean, contrast and exposure fractions and the perceived brightness
    ``sqrt(0.241 R² + 0.691 G² + 0.068 B²)`` (HSP, :func:`to_grey`'s ``"perceived"``) for
    ``brightness``; grey images use their value
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
        scale = white(data.dtype)
    colour = channel_dim in data.dims
    if colour:
        data = channels(data, channel_dim).isel({channel_dim: slice(0, 3)})
        ft = np.dtype(np.float32 if data.dtype.itemsize <= 2 or data.dtype == np.float32 else np.float64)  # to_grey's
    else:
        ft = np.dtype(np.float32 if data.dtype.itemsize <= 2 else np.float64)
    kept = ("volume",) if "volume" in data.dims else ()
    reduced = tuple(d for d in data.dims if d not in kept and d != channel_dim) + ((channel_dim,) if colour else ())
    _, args = prepare(data, kept, reduced, None)
    w, pw = np.array(LUMA["rec601"], dtype=ft), np.array(PERCEIVED, dtype=ft)
    limits = (ft.type(scale), ft.type(dark), ft.type(bright))

    def block(xb: np.ndarray) -> np.ndarray:
        rows = math.prod(xb.shape[: len(kept)])
        x3 = numba_ready(np.ascontiguousarray(xb)).reshape(rows, -1, xb.shape[-1] if colour else 1)
        x3 = x3.view(np.uint8) if x3.dtype == np.bool_ else x3
        out = np.empty((rows, len(_color_kernels.EXPOSURE)), dtype=np.float64)
        _color_kernels.exposure_rows(x3, w, pw, *limits, np.empty(3, ft), np.empty(x3.shape[1], ft), out)
        return out.reshape(xb.shape[: len(kept)] + (1,) * len(reduced) + (out.shape[-1],))

    parts = np.asarray(per_block(block, args, len(kept), len(_color_kernels.EXPOSURE), np.float64, token=("exposure", str(ft), limits)).compute())
    parts = np.moveaxis(parts, tuple(range(len(kept), parts.ndim - 1)), tuple(range(len(reduced)))).reshape(-1, *parts.shape[: len(kept)], parts.shape[-1])
    n, mean, m2, _, pmean, under, over, total = _merge_exposure(parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        report = xr.Dataset({
            "mean": (kept, mean),
            "rms_contrast": (kept, np.sqrt(m2 / n)),
            "brightness": (kept, pmean),
            "underexposed": (kept, under / total),
            "overexposed": (kept, over / total),
        }, coords={c: v for c, v in data.coords.items() if set(v.dims) <= set(kept)})
    report["level"] = np.clip(np.round(10 * report["brightness"]), 0, 10).astype(np.int64)
    report.attrs.update(dark=float(dark), bright=float(bright), scale=float(scale))
    return report

"""N4 bias-field correction, one 3-D volume per task, by SimpleITK's
``N4BiasFieldCorrectionImageFilter`` (Tustison et al. 2010; volnorm does not reimplement N4).

The recipe is SimpleITK's documented example with shrinking: the volume as a float32 image with
its voxel sizes as spacing, an Otsu mask unless one is given, the filter fitted on the image
and mask shrunk by ``shrink_factor``, then the log bias field evaluated on the full-resolution
grid and the volume divided by its exponential. Each volume (every index of the dims other
than ``z, y, x``) is one block and one task; nothing is shared between volumes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from volnorm._eager import in_memory
from volnorm.io.nifti import header_from_bytes
from volnorm.params import Params, attach
from volnorm.transforms.common import check_data, dask_data

__all__ = ["SPATIAL", "n4"]

#: The dims of one volume, in the order SimpleITK's arrays take them (its images are x, y, z).
SPATIAL = ("z", "y", "x")


def _voxel_sizes(data: xr.DataArray) -> np.ndarray:
    """The (x, y, z) voxel sizes of each volume, one row per index of ``volume`` (one row when
    the data have no ``volume`` dim): from the volume's own NIfTI header
    (``attrs["nifti_headers"]``), else ``attrs["zooms"]``, else 1.0."""
    headers = data.attrs.get("nifti_headers")
    headers = headers if isinstance(headers, dict) else {}
    zooms = data.attrs.get("zooms")
    default = tuple(zooms[:3]) if isinstance(zooms, (list, tuple)) and len(zooms) >= 3 else (1.0, 1.0, 1.0)
    if "volume" in data.dims:
        names = [str(v) for v in data["volume"].values] if "volume" in data.coords else []
        header_of = [headers.get(n) for n in names] or [None] * data.sizes["volume"]
    else:
        header_of = [next(iter(headers.values())) if len(headers) == 1 else None]
    rows = [tuple(header_from_bytes(hb).get_zooms()[:3]) if hb is not None else default for hb in header_of]
    return np.array([[abs(float(s)) if math.isfinite(float(s)) and float(s) != 0 else 1.0 for s in r] for r in rows], dtype=np.float64)


def _checked_mask(mask: Any, data: xr.DataArray) -> xr.DataArray:
    """``mask`` broadcast to ``data``'s dims and shape (its coords left out), or a ValueError
    naming both shapes."""
    if not isinstance(mask, xr.DataArray):
        raise TypeError(f"`mask` must be an xarray.DataArray or None; got {type(mask).__name__}")
    want = tuple(data.sizes[d] for d in SPATIAL)
    got = tuple(mask.sizes.get(d) for d in SPATIAL)
    extra = [d for d in mask.dims if d not in data.dims]
    other = {d: (mask.sizes[d], data.sizes[d]) for d in mask.dims if d in data.dims and d not in SPATIAL and mask.sizes[d] != data.sizes[d]}
    if got != want or extra or other:
        raise ValueError(
            f"`mask` must have the data's (z, y, x) shape {want} and no dims the data lack; got a mask of dims "
            f"{mask.dims!r} and shape {mask.shape} (z, y, x: {got}) for data of dims {data.dims!r} and shape {data.shape}"
        )
    bare = xr.DataArray(mask.data, dims=mask.dims)  # its coords aside: the data's are kept
    return bare.expand_dims({d: data.sizes[d] for d in data.dims if d not in bare.dims}).transpose(*data.dims)


def _threads(requested: int | None) -> int | None:
    """SimpleITK threads for one filter: ``requested``; by default 1 inside a task of a
    ``distributed`` worker (the cluster already runs a task per worker thread on each core),
    else None (SimpleITK's global default, one per core)."""
    if requested is not None:
        return int(requested)
    try:
        from distributed import get_worker  # optional: only on a cluster
        get_worker()
    except (ImportError, ValueError):
        return None
    return 1


def _correct(volume: np.ndarray, mask: np.ndarray | None, spacing: Sequence[float], options: dict[str, Any],
             threads: int | None = None, field: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """SimpleITK's N4 recipe on one ``(z, y, x)`` volume: the corrected volume and (with
    ``field``, else None) the bias field ``exp(log_field)``, both float32 (one filter run
    gives both)."""
    import SimpleITK as sitk  # on first use: a large import

    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    image.SetSpacing([float(s) for s in spacing])
    if mask is None:
        mask_image = sitk.OtsuThreshold(image, 0, 1, 200)
    else:
        mask_image = sitk.GetImageFromArray(np.ascontiguousarray(mask != 0, dtype=np.uint8))
        mask_image.CopyInformation(image)
    shrunk, shrunk_mask = image, mask_image
    factor = options["shrink_factor"]
    if factor > 1:
        shrunk = sitk.Shrink(image, [factor] * image.GetDimension())
        shrunk_mask = sitk.Shrink(mask_image, [factor] * image.GetDimension())
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    n_threads = _threads(threads)
    if n_threads is not None:
        corrector.SetNumberOfThreads(n_threads)
    corrector.SetMaximumNumberOfIterations([int(i) for i in options["iterations"]])
    corrector.SetConvergenceThreshold(float(options["convergence_threshold"]))
    corrector.SetNumberOfControlPoints([int(options["control_points"])] * image.GetDimension())
    corrector.SetSplineOrder(int(options["spline_order"]))
    corrector.SetNumberOfHistogramBins(int(options["histogram_bins"]))
    corrector.SetBiasFieldFullWidthAtHalfMaximum(float(options["bias_field_fwhm"]))
    corrector.SetWienerFilterNoise(float(options["wiener_noise"]))
    corrector.Execute(shrunk, shrunk_mask)
    exp_field = sitk.Exp(corrector.GetLogBiasFieldAsImage(image))  # float64
    corrected = sitk.GetArrayFromImage(image / exp_field).astype(np.float32)  # SimpleITK's float64, rounded
    return corrected, sitk.GetArrayFromImage(exp_field).astype(np.float32) if field else None


def _volumes(v: np.ndarray, m: np.ndarray | None, start: Sequence[int], *, options: dict[str, Any], sizes: np.ndarray,
             volume_axis: int | None, threads: int | None = None, field: bool = False) -> np.ndarray:
    """:func:`_correct` on each ``(z, y, x)`` volume of ``v`` (dims ``(lead..., z, y, x)``), whose
    first volume is at ``start`` in the lead dims (``volume_axis`` picks its row of ``sizes``):
    the corrected volumes, or with ``field`` the corrected volumes and the fields stacked on a
    new first axis (of 2)."""
    out = np.empty((2, *v.shape) if field else v.shape, dtype=np.float32)
    for idx in np.ndindex(v.shape[:-3]):
        at = tuple(a + b for a, b in zip(start, idx))
        corrected, f = _correct(v[idx], None if m is None else m[idx], sizes[at[volume_axis] if volume_axis is not None else 0], options, threads, field)
        if field:
            out[(0, *idx)], out[(1, *idx)] = corrected, f
        else:
            out[idx] = corrected
    return out


def _block(v: np.ndarray, *mask: np.ndarray, options: dict[str, Any], sizes: np.ndarray, volume_axis: int | None,
           threads: int | None = None, field: bool = False, block_info: Any = None) -> np.ndarray:
    """One block of :func:`n4`: one volume (each lead dim has a chunk of 1)."""
    start = block_info[0]["chunk-location"][:-3] if block_info else (0,) * (v.ndim - 3)
    return _volumes(v, mask[0] if mask else None, start, options=options, sizes=sizes, volume_axis=volume_axis, threads=threads, field=field)


def _check_options(options: dict[str, Any]) -> None:
    def whole(key: str, lo: int) -> int:
        v = options[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"`{key}` must be an integer >= {lo}; got {v!r}")
        return int(v)

    whole("shrink_factor", 1)
    whole("histogram_bins", 2)
    order = whole("spline_order", 1)
    points = whole("control_points", 2)
    if points <= order:
        raise ValueError(f"`control_points` must exceed `spline_order` (N4 needs spline_order + 1 points per axis); got {points} and {order}")
    its = options["iterations"]
    if isinstance(its, (str, bytes)) or not isinstance(its, Sequence) or not its or not all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 1 for i in its
    ):
        raise ValueError(f"`iterations` must be a non-empty sequence of integers >= 1 (one per fitting level); got {its!r}")
    for key, lo in (("convergence_threshold", 0.0), ("bias_field_fwhm", 0.0), ("wiener_noise", 0.0)):
        v = options[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v < lo or (key != "convergence_threshold" and v == lo):
            raise ValueError(f"`{key}` must be a finite number {'>=' if key == 'convergence_threshold' else '>'} 0; got {v!r}")


def n4(
    data: xr.DataArray,
    *,
    mask: xr.DataArray | None = None,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50, 50),
    convergence_threshold: float = 0.001,
    control_points: int = 4,
    spline_order: int = 3,
    histogram_bins: int = 200,
    bias_field_fwhm: float = 0.15,
    wiener_noise: float = 0.01,
    threads: int | None = None,
    return_field: bool = False,
) -> xr.DataArray | tuple[xr.DataArray, xr.DataArray]:
    """N4 bias-field correction of each 3-D volume by SimpleITK's
    ``N4BiasFieldCorrectionImageFilter`` (ANTs' ``N4BiasFieldCorrection``).

    Each volume (every index of the dims other than ``z, y, x``: ``volume``, ``t``) is made
    one block (a lazy rechunk) and corrected in one task, with SimpleITK's documented recipe:
    the volume as a float32 image whose spacing is its voxel sizes (the volume's NIfTI header
    in ``attrs["nifti_headers"]``, else ``attrs["zooms"]``, else 1); the mask (``mask``, or
    ``sitk.OtsuThreshold(image, 0, 1, 200)``); both shrunk by ``shrink_factor`` along each
    axis; the filter run on them; then ``image / exp(log_field)`` with the log bias field
    evaluated on the full-resolution grid (``GetLogBiasFieldAsImage``). The result is
    SimpleITK's (a float64 image: the log field is float64) rounded to float32, bit for bit
    (``tests/test_n4.py``). The defaults are the filter's own (SimpleITK 2.5.7).

    Threads: SimpleITK runs the filter with threads of its own. On a ``distributed`` cluster
    (volnorm's local cluster, SLURM, ...) each worker thread already runs one task, one volume,
    so by default the filter there gets one thread (``SetNumberOfThreads(1)``): two workers on
    two cores run two volumes on two threads, not 2 x 2. Elsewhere (in memory, dask's
    ``threads`` or ``sync`` scheduler) it gets SimpleITK's global default (one per core).
    ``threads=`` sets it for every volume.

    Parameters
    ----------
    data : xarray.DataArray
        Numeric data with dims ``z, y, x`` (a stack ``(volume, [t,] z, y, x)`` or one volume),
        numpy or dask backed.
    mask : xarray.DataArray, optional
        The voxels the field is fitted on (non-zero: inside), with the data's ``z, y, x``
        shape, with or without the other dims (broadcast to the data); default: an Otsu
        threshold of each volume, as in SimpleITK's example. Every voxel is corrected.
    shrink_factor : int
        The image and mask are shrunk by this factor along each axis for the fit (1: no
        shrinking); the field is then evaluated at full resolution. At least 1.
    iterations : sequence of int
        Maximum iterations at each fitting level (their number is the number of levels; the
        control-point lattice doubles at each level). Each at least 1.
    convergence_threshold : float
        Stop a level when the change of the field's coefficient of variation falls below it.
        At least 0.
    control_points : int
        Control points of the B-spline lattice along each axis at the first level; more than
        ``spline_order``.
    spline_order : int
        Order of the B-spline of the field. At least 1.
    histogram_bins : int
        Bins of the log-intensity histogram that is sharpened. At least 2.
    bias_field_fwhm : float
        Full width at half maximum of the Gaussian that models the bias field's histogram
        (log domain). Greater than 0.
    wiener_noise : float
        Noise of the Wiener filter that deconvolves the histogram. Greater than 0.
    threads : int, optional
        SimpleITK threads per volume (``SetNumberOfThreads``); default: 1 on a ``distributed``
        worker, else SimpleITK's global default (see above). At least 1.
    return_field : bool
        Also return the estimated bias field ``exp(log_field)`` (float32; ``corrected * field``
        is ``data`` up to rounding), made by the same tasks: computed together, the filter
        runs once per volume.

    Returns
    -------
    xarray.DataArray or (xarray.DataArray, xarray.DataArray)
        float32, with the dims, coords, name and attrs of ``data`` (but ``nifti_scaled``: the
        values are no longer the header's scaled integers) and the options in
        ``attrs["volnorm_params"]``; with ``return_field``, ``(corrected, field)``, the field
        named ``bias_field`` with the same dims, coords and attrs. Lazy for dask-backed data
        (one task per volume; nothing computes at call time); computed at once for in-memory
        data (numpy backed, up to 1 GiB).

    Raises
    ------
    ValueError
        For data without the dims ``z, y, x``, a mask of another shape, or an option out of
        its range.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> z, y, x = np.mgrid[:16, :16, :16] / 15.0
    >>> field = np.exp(0.4 * (x - 0.5) + 0.2 * (z - 0.5))          # a smooth multiplicative bias
    >>> phantom = np.where((x - .5) ** 2 + (y - .5) ** 2 + (z - .5) ** 2 < 0.16, 100.0, 10.0)
    >>> vol = xr.DataArray((phantom * field)[None].astype("float32"), dims=("volume", "z", "y", "x"))
    >>> out = vn.n4(vol, shrink_factor=1, iterations=(20, 20))
    >>> out.dtype, out.dims
    (dtype('float32'), ('volume', 'z', 'y', 'x'))
    >>> inside = phantom[None] == 100
    >>> cv = lambda a: a[inside].std() / a[inside].mean()
    >>> bool(cv(out.values) < cv(vol.values))
    True
    >>> out, est = vn.n4(vol, shrink_factor=1, iterations=(20, 20), return_field=True)
    >>> bool(np.allclose(out * est, vol, rtol=1e-5))
    True
    """
    data = check_data(data)
    missing = [d for d in SPATIAL if d not in data.dims]
    if missing:
        raise ValueError(
            f"n4 corrects 3-D volumes: the data need the dims ('z', 'y', 'x'); got dims {data.dims!r} "
            f"(missing {tuple(missing)!r}); for one volume of shape (z, y, x), name its dims ('z', 'y', 'x')"
        )
    options = {
        "shrink_factor": shrink_factor, "iterations": iterations, "convergence_threshold": convergence_threshold,
        "control_points": control_points, "spline_order": spline_order, "histogram_bins": histogram_bins,
        "bias_field_fwhm": bias_field_fwhm, "wiener_noise": wiener_noise,
    }
    _check_options(options)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"`threads` must be an integer >= 1 or None; got {threads!r}")
    if not isinstance(return_field, (bool, np.bool_)):
        raise TypeError(f"`return_field` must be True or False; got {return_field!r}")
    options = {k: [int(i) for i in v] if k == "iterations" else v.item() if isinstance(v, np.generic) else v for k, v in options.items()}
    lead = tuple(d for d in data.dims if d not in SPATIAL)
    x = data.transpose(*lead, *SPATIAL)
    m = None if mask is None else _checked_mask(mask, data).transpose(*x.dims)
    where = {"sizes": _voxel_sizes(data), "volume_axis": lead.index("volume") if "volume" in lead else None,
             "threads": None if threads is None else int(threads), "field": bool(return_field)}
    src, msrc = in_memory(x), None if m is None else in_memory(m)
    if src is not None and (m is None or msrc is not None):  # in memory: at once, volume by volume
        ya = _volumes(src, msrc, (0,) * len(lead), options=options, **where)
    else:  # one block, hence one task, per volume (with the field: both from that task, on a new first axis)
        xa = dask_data(x).rechunk({i: 1 for i in range(len(lead))} | {len(lead) + k: -1 for k in range(3)})
        args = [xa] if m is None else [xa, dask_data(m).rechunk(xa.chunks)]
        extra = {"new_axis": 0, "chunks": ((2,), *xa.chunks)} if return_field else {}
        ya = da.map_blocks(_block, *args, options=options, **where, dtype=np.float32,
                           meta=np.empty((0,) * (xa.ndim + bool(return_field)), dtype=np.float32), token="n4", **extra)
    recorded = {**options, "threads": where["threads"]}
    y = _like(ya[0] if return_field else ya, x, data, recorded)
    if not return_field:
        return y
    return y, _like(ya[1], x, data, recorded).rename("bias_field")


def _like(ya: Any, x: xr.DataArray, data: xr.DataArray, options: dict[str, Any]) -> xr.DataArray:
    """``ya`` (dims of ``x``) as a DataArray like ``data``: its dims' order, coords, attrs but
    ``nifti_scaled``, and the n4 record."""
    y = xr.DataArray(ya, dims=x.dims, coords=x.coords).transpose(*data.dims)
    y = attach(y, data, Params("n4", xr.Dataset(), options))
    y.attrs.pop("nifti_scaled", None)  # float values, no longer raw * scl_slope + scl_inter
    return y

"""What the transform families share: the data check, the float type of results, the output
range, and the blockwise map of one table per index of the kept dims.

Internal to :mod:`volnorm.transforms`; the names are public so that each family module imports
them without reaching into another module's private names.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._eager import in_memory, in_memory_dask, parts_2d, run_parallel
from volnorm._histogram import rows_of

__all__ = [
    "check_data", "checked_nonnegative", "dask_data", "float_dtype", "full_scale", "map_rows", "out_range_record",
    "out_spec", "pointwise",
]


def check_data(data: Any) -> xr.DataArray:
    """The data a transform takes: a numeric DataArray, in memory or dask backed. In-memory
    data (numpy backed, up to :data:`volnorm._eager.EAGER_MAX_BYTES`) are kept as they are:
    the transforms compute them at once (numpy in, numpy out, as xarray's arithmetic); larger
    numpy data are wrapped once, without a copy, for a lazy fit and apply.

    Parameters
    ----------
    data : xarray.DataArray
        Integer, float or bool data.

    Returns
    -------
    xarray.DataArray
        In memory or dask backed.

    Raises
    ------
    TypeError
        For anything else.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> type(check_data(xr.DataArray(np.zeros(3), dims="x")).data).__name__
    'ndarray'
    """
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"`data` must be an xarray.DataArray; got {type(data).__name__}")
    if data.dtype.kind not in "iufb":
        raise TypeError(f"cannot transform dtype {data.dtype}")
    if not isinstance(data.data, da.Array) and in_memory(data) is None:  # once, for the fit and the apply
        data = data.copy(data=in_memory_dask(np.asarray(data.data)))
    return data


def dask_data(x: xr.DataArray) -> da.Array:
    """The dask array behind ``x`` (a numpy-backed ``x`` wrapped without a copy).

    Parameters
    ----------
    x : xarray.DataArray

    Returns
    -------
    dask.array.Array

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> dask_data(xr.DataArray(np.arange(4), dims="x")).compute().tolist()
    [0, 1, 2, 3]
    """
    return x.data if isinstance(x.data, da.Array) else in_memory_dask(np.asarray(x.data))


def float_dtype(dtype: np.dtype) -> np.dtype:
    """The float type of a continuous result: float32 for float32/16 and integers up to 16 bits;
    float64 otherwise (no precision lost).

    Parameters
    ----------
    dtype : numpy.dtype
        The input's.

    Returns
    -------
    numpy.dtype

    Examples
    --------
    >>> float_dtype(np.dtype("uint16")), float_dtype(np.dtype("int32"))
    (dtype('float32'), dtype('float64'))
    """
    if dtype.kind == "f":
        return np.dtype(np.float64) if dtype.itemsize >= 8 else np.dtype(np.float32)
    return np.dtype(np.float32) if dtype.itemsize <= 2 else np.dtype(np.float64)


def out_spec(out_range: Any) -> tuple[float, float, np.dtype | None]:
    """``(lo, hi, integer dtype or None)`` from an ``out_range``: a float range or an integer dtype.

    Parameters
    ----------
    out_range : (lo, hi) or integer dtype

    Returns
    -------
    (float, float, numpy.dtype or None)

    Raises
    ------
    ValueError
        For a non-integer dtype, or a range that is not finite with ``lo < hi``.

    Examples
    --------
    >>> out_spec("uint8"), out_spec((0, 1))
    ((0.0, 255.0, dtype('uint8')), (0.0, 1.0, None))
    """
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


def map_rows(data: xr.DataArray, kept: tuple, func: Any, tables: Sequence[np.ndarray], dtype: Any, *, writes_out: bool = False) -> xr.DataArray:
    """Apply ``func(values_2d, *table_rows) -> values_2d`` chunk by chunk, where ``values_2d`` is
    ``(rows, n)`` for the block's indices of the ``kept`` dims and ``table_rows`` the matching rows of
    each ``tables[i]`` (shape ``(nrows_total, ...)``). Lazy; no communication between chunks.

    Parameters
    ----------
    data : xarray.DataArray
    kept : tuple
        The dims that index the tables' rows (C order over their sizes); ``()``: one row.
    func : callable
        ``func(values_2d, *table_rows)``.
    tables : sequence of numpy.ndarray
        One row per index of the kept dims.
    dtype : numpy.dtype
        Of the result.
    writes_out : bool
        ``func`` takes ``out=``, a C-contiguous ``values_2d``-shaped array of ``dtype`` to
        write its result into (in-memory data are then written where they belong, without a
        copy).

    Returns
    -------
    xarray.DataArray
        With the dims, coords and name of ``data``: computed for in-memory data
        (:func:`volnorm._eager.in_memory`: numpy backed, up to 1 GiB; a share of the rows per
        thread), lazy otherwise (no communication between chunks).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> x = xr.DataArray(np.arange(6).reshape(2, 3), dims=("volume", "x"))
    >>> map_rows(x, ("volume",), lambda v, t: v + t, [np.array([[10], [20]])], np.int64).values.tolist()
    [[10, 11, 12], [23, 24, 25]]
    """
    reduced = tuple(d for d in data.dims if d not in kept)
    x = data.transpose(*kept, *reduced)
    nk = len(kept)
    kshape = tuple(x.sizes[d] for d in kept)
    src = in_memory(x)
    if src is not None:  # at once, a share of the rows (or of the columns of one row) per thread
        n_rows = math.prod(kshape)
        v = np.ascontiguousarray(src).reshape(n_rows, -1)
        out = np.empty(v.shape, dtype=dtype)

        def part(share: tuple[slice, slice]) -> None:
            if writes_out:
                func(v[share], *[t[share[0]] for t in tables], out=out[share])
            else:
                out[share] = func(v[share], *[t[share[0]] for t in tables])

        run_parallel(part, parts_2d(*v.shape, v.itemsize + out.itemsize))
        y = xr.DataArray(out.reshape(src.shape), dims=x.dims, coords=x.coords, name=data.name)
        return y.transpose(*data.dims)
    xa = dask_data(x)

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


#: The dim of the value table :func:`pointwise` evaluates a formula on.
VALUE_DIM = "__volnorm_value__"
#: :func:`pointwise` uses a table only up to this many bytes (the table travels with every
#: task of the graph) and only when it is at most a quarter of the data's values.
MAX_TABLE_BYTES = 16 * 2**20


def pointwise(data: xr.DataArray, formula: Any, *, lo: int | None = None) -> xr.DataArray:
    """``formula(data)`` for a formula that maps each voxel on its own (through parameters over
    some of the data's dims): for 1- and 2-byte integer data, evaluated once on every value the
    dtype holds (from ``lo``) and applied as one look-up table per row of those parameters (a
    GIL-free gather instead of a numpy temporary per operation: 5-20x faster); otherwise
    ``formula(data)`` itself. The same numpy operations run on the same values, so the result is
    the formula's, bit for bit.

    Parameters
    ----------
    data : xarray.DataArray
        As :func:`check_data` returns it: in memory (computed at once) or dask backed (lazy).
    formula : callable
        ``formula(x) -> xarray.DataArray``: elementwise in ``x`` (any numpy/xarray arithmetic,
        broadcasting against parameters by dim name); it must not reduce, reorder or look at
        ``x``'s coords.
    lo : int, optional
        The smallest value the data can hold (e.g. 0 after a non-negative check), so that the
        formula never sees values outside its domain; values below map as ``lo`` does.

    Returns
    -------
    xarray.DataArray
        With the data's dims, coords and name; lazy when the data are.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> x = check_data(xr.DataArray(np.array([[0, 128], [64, 255]], dtype="uint8"), dims=("volume", "x")))
    >>> k = xr.DataArray([1.0, 2.0], dims="volume")
    >>> pointwise(x, lambda v: v.astype("float32") * k).values.tolist()
    [[0.0, 128.0], [128.0, 510.0]]
    """
    dt = data.dtype
    if dt.kind not in "iu" or dt.itemsize > 2:
        return formula(data)
    info = np.iinfo(dt)
    start = info.min if lo is None else max(int(lo), info.min)
    values = np.arange(start, info.max + 1, dtype=dt)
    with np.errstate(all="ignore"):  # values the data may not hold (e.g. log of a negative)
        probe = formula(xr.DataArray(values[:1], dims=VALUE_DIM))  # the table's rows, before it is made
    kept = tuple(d for d in probe.dims if d != VALUE_DIM)
    n_rows = math.prod(probe.sizes[d] for d in kept)
    if (
        not set(kept) <= set(data.dims)
        or any(probe.sizes[d] != data.sizes[d] for d in kept)
        or any(d in probe.indexes and d in data.indexes and not probe.indexes[d].equals(data.indexes[d]) for d in kept)
        or probe.dtype.kind not in "biuf"
        or n_rows * len(values) * probe.dtype.itemsize > min(MAX_TABLE_BYTES, data.size * probe.dtype.itemsize / 4)
    ):
        return formula(data)
    with np.errstate(all="ignore"):
        table = formula(xr.DataArray(values, dims=VALUE_DIM))
    lut = np.ascontiguousarray(np.asarray(table.transpose(*kept, VALUE_DIM).values).reshape(n_rows, -1))
    if dt.itemsize == 1:
        if dt.kind == "i":  # index by the byte: -128..-1 are bytes 128..255
            lut = np.ascontiguousarray(np.roll(lut, -128, axis=1))

        def gather(v: np.ndarray, t: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            out = np.empty(v.shape, dtype=t.dtype) if out is None else out
            _kernels.gather_rows(np.ascontiguousarray(v).view(np.uint8), t, out)
            return out
    else:

        def gather(v: np.ndarray, t: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
            out = np.empty(v.shape, dtype=t.dtype) if out is None else out
            _kernels.lut_rows(np.ascontiguousarray(v), t, start, out)
            return out

    y = map_rows(data, kept, gather, [lut], lut.dtype, writes_out=True)
    return y.drop_vars([c for c in y.coords if c not in data.coords])


def full_scale(dtype: np.dtype) -> float:
    """The full scale of a dtype, as scikit-image's ``dtype_limits(image, clip_negative=True)``
    span and ImageMagick's ``QuantumRange`` have it: the maximum of an integer dtype (uint8 255,
    uint16 65535, int16 32767), 1.0 for float and bool data.

    Parameters
    ----------
    dtype : numpy.dtype

    Returns
    -------
    float

    Examples
    --------
    >>> full_scale(np.dtype("uint8")), full_scale(np.dtype("int16")), full_scale(np.dtype("float32"))
    (255.0, 32767.0, 1.0)
    """
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "iu" else 1.0


def out_range_record(out_range: Any) -> Any:
    """An ``out_range`` as results record it: ``None``, ``[lo, hi]`` (floats) or an integer
    dtype's name; equal records mean the same output range.

    Parameters
    ----------
    out_range : (lo, hi), integer dtype or None

    Returns
    -------
    None, list of float or str

    Raises
    ------
    ValueError
        As :func:`out_spec`.

    Examples
    --------
    >>> out_range_record(np.uint8), out_range_record((0, 1)), out_range_record(None)
    ('uint8', [0.0, 1.0], None)
    """
    if out_range is None:
        return None
    lo, hi, dt = out_spec(out_range)
    return dt.name if dt is not None else [lo, hi]


def checked_nonnegative(data: xr.DataArray, what: str) -> xr.DataArray:
    """``data``, checked for negative values: in-memory data (:func:`volnorm._eager.in_memory`)
    now, as scikit-image's exposure functions check at call time; dask-backed data as each chunk
    is computed (a lazy transform computes nothing when called). A negative value raises
    ``ValueError``. Unsigned and bool data are returned as they are.

    Parameters
    ----------
    data : xarray.DataArray
    what : str
        The function's name, for the message.

    Returns
    -------
    xarray.DataArray
        The same values, lazy when ``data`` are.

    Examples
    --------
    >>> import dask.array as da, xarray as xr
    >>> y = checked_nonnegative(xr.DataArray(da.from_array(np.array([1.0, -2.0])), dims="x"), "log")
    >>> y.values
    Traceback (most recent call last):
    ...
    ValueError: log needs non-negative data; a chunk holds -2.0 (rescale first)
    """
    if data.dtype.kind in "ub":
        return data

    def block(b: np.ndarray) -> np.ndarray:
        neg = b < 0  # NaN is not negative, as in scikit-image's check
        if neg.any():
            raise ValueError(f"{what} needs non-negative data; a chunk holds {float(np.min(b[b < 0]))!r} (rescale first)")
        return b

    src = in_memory(data)
    if src is not None:  # computed at once, as the transform will be
        block(src)
        return data
    xa = dask_data(data)
    return data.copy(data=xa.map_blocks(block, dtype=xa.dtype, name=f"nonnegative-{uuid.uuid4().hex}"))

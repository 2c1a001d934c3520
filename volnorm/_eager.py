"""The in-memory fast path: data already in memory (numpy, or a numpy-backed DataArray) of at
most :data:`EAGER_MAX_BYTES` are computed at once, a share of the rows per thread, without a
task graph.

On 100 images of 512x512 a dask graph cost more than the arithmetic: ~1-3 ms to build,
optimize and schedule per compute, and one more copy of every result (dask concatenates the
blocks, or copies a single one). The kernels are the same GIL-free numba and numpy calls either
way; only who calls them differs. Larger in-memory data stay lazy (the result of a 10 GiB array
can then be written to a store chunk by chunk), as do dask-backed data, whatever their size.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm.engine.clusters import usable_cpus

__all__ = ["EAGER_MAX_BYTES", "in_memory", "in_memory_dask", "in_memory_rows", "parts_2d", "reduce_rows", "row_parts", "run_parallel"]

T = TypeVar("T")

#: In-memory data up to this many bytes are computed at once (a transform's result is then
#: in memory too, as xarray's own arithmetic on numpy data is); larger ones are lazy.
EAGER_MAX_BYTES = 2**30

#: Rows smaller than this are not shared between threads (a thread costs ~20 us to hand work).
MIN_PART_BYTES = 2**20

#: dask's names of its one-thread scheduler: the fast path then runs in one thread too (a
#: debugger sees every call in order).
SERIAL = ("sync", "synchronous", "single-threaded")

_pool: cf.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_inside = threading.local()


def in_memory(x: Any) -> np.ndarray | None:
    """The numpy array behind ``x`` when it is in memory and small enough to compute at once
    (:data:`EAGER_MAX_BYTES`), else ``None`` (dask backed, or larger).

    Parameters
    ----------
    x : xarray.DataArray or numpy.ndarray

    Returns
    -------
    numpy.ndarray or None

    Examples
    --------
    >>> import dask.array as da
    >>> in_memory(xr.DataArray(np.zeros(3), dims="x")).shape, in_memory(xr.DataArray(da.zeros(3), dims="x"))
    ((3,), None)
    """
    data = x.data if isinstance(x, xr.DataArray) else x
    if isinstance(data, np.ndarray) and data.nbytes <= EAGER_MAX_BYTES:
        return data
    return None


def row_parts(n_rows: int, row_bytes: int) -> list[slice]:
    """Up to one contiguous share of ``n_rows`` rows per usable CPU, none smaller than
    :data:`MIN_PART_BYTES` (one share when the whole is smaller).

    Parameters
    ----------
    n_rows : int
    row_bytes : int
        The bytes one row holds (input and output together, roughly).

    Returns
    -------
    list of slice
        Covering ``range(n_rows)`` in order.

    Examples
    --------
    >>> row_parts(0, 8), row_parts(3, 10)
    ([], [slice(0, 3, None)])
    """
    if n_rows <= 0:
        return []
    n = max(1, min(usable_cpus(), n_rows, (n_rows * max(row_bytes, 1)) // MIN_PART_BYTES))
    edges = [n_rows * k // n for k in range(n + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges) if b > a]


def parts_2d(n_rows: int, n_cols: int, item_bytes: int) -> list[tuple[slice, slice]]:
    """How to share a ``(n_rows, n_cols)`` array among threads: shares of the rows when there
    are at least as many rows as CPUs, else shares of each row's columns (one dataset-wide row
    still uses every core).

    Parameters
    ----------
    n_rows, n_cols : int
    item_bytes : int
        The bytes of one item (input and output together, roughly).

    Returns
    -------
    list of (slice, slice)
        ``(rows, cols)`` of each share, covering the array.

    Examples
    --------
    >>> parts_2d(1, 4, 8)
    [(slice(0, 1, None), slice(0, 4, None))]
    """
    if n_rows >= usable_cpus() or not n_cols:
        return [(r, slice(0, n_cols)) for r in row_parts(n_rows, n_cols * item_bytes)]
    return [(slice(r, r + 1), c) for r in range(n_rows) for c in row_parts(n_cols, n_rows * item_bytes)]


def run_parallel(func: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[func(item) for item in items]``, the items shared among a pool of :func:`usable_cpus`
    threads (the caller's thread takes the first): for GIL-free kernels. A call made from one of
    those threads, or under dask's ``scheduler="sync"``, runs its items in turn.

    Parameters
    ----------
    func : callable
    items : sequence

    Returns
    -------
    list
        In the items' order; the first exception raised is raised here.

    Examples
    --------
    >>> run_parallel(lambda v: v * v, [1, 2, 3])
    [1, 4, 9]
    """
    global _pool
    if len(items) <= 1 or getattr(_inside, "active", False) or dask.config.get("scheduler", None) in SERIAL:
        return [func(item) for item in items]
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(max_workers=max(1, usable_cpus() - 1), thread_name_prefix="volnorm-eager")

    def inside(item: Any) -> T:
        _inside.active = True
        try:
            return func(item)
        finally:
            _inside.active = False

    futures = [_pool.submit(inside, item) for item in items[1:]]
    try:
        first = inside(items[0])
    finally:
        cf.wait(futures)  # none left running on the caller's arrays
    return [first, *(f.result() for f in futures)]


def in_memory_rows(data: xr.DataArray, kept: tuple, reduced: tuple, mask: Any = None) -> tuple[xr.DataArray, np.ndarray, np.ndarray | None] | None:
    """In-memory data (and mask) as ``(rows, voxels)`` for a per-row reduction at once: the data
    transposed to ``(*kept, *reduced)``, its values and its mask's (None without a mask); None
    when either is not in memory or the mask is not a boolean DataArray over the data's dims
    (the lazy path then checks it and says what is wrong).

    Parameters
    ----------
    data : xarray.DataArray
    kept, reduced : tuple
        The dims kept (one row per index) and reduced.
    mask : xarray.DataArray of bool, optional

    Returns
    -------
    (xarray.DataArray, numpy.ndarray, numpy.ndarray or None) or None

    Examples
    --------
    >>> x = xr.DataArray(np.arange(6).reshape(2, 3), dims=("volume", "x"))
    >>> in_memory_rows(x, ("volume",), ("x",))[1].shape
    (2, 3)
    """
    x = data.transpose(*kept, *reduced)
    src = in_memory(x)
    if src is None:
        return None
    rows = math.prod(src.shape[: len(kept)])
    m2 = None
    if mask is not None:
        if not (isinstance(mask, xr.DataArray) and mask.dtype == np.bool_ and all(data.sizes.get(d) == n for d, n in mask.sizes.items())):
            return None
        m = in_memory(mask.broadcast_like(x).transpose(*x.dims))
        if m is None or m.dtype != np.bool_ or m.shape != src.shape:
            return None
        m2 = np.ascontiguousarray(m).reshape(rows, -1)
    return x, np.ascontiguousarray(src).reshape(rows, -1), m2


def reduce_rows(
    func: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    x2: np.ndarray,
    m2: np.ndarray | None,
    fill: Any,
    merge: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """A per-row reduction of ``(rows, voxels)`` values at once: ``func(values, mask)`` gives
    ``(rows_of_share, ..., width)`` for a share of :func:`parts_2d` (a share of the rows, or of
    one row's voxels), run on the thread pool; the shares of a row are merged with ``merge``
    (e.g. ``numpy.add`` for counts), starting from ``fill``.

    Parameters
    ----------
    func : callable
    x2 : numpy.ndarray
        ``(rows, voxels)``.
    m2 : numpy.ndarray of bool or None
        The same shape, or None.
    fill : array_like
        One row's start, broadcast to ``(width,)``.
    merge : callable
        ``merge(rows_so_far, rows_of_share) -> rows``.

    Returns
    -------
    numpy.ndarray
        ``(rows, width)``.

    Examples
    --------
    >>> x2 = np.arange(6).reshape(2, 3)
    >>> reduce_rows(lambda v, m: v.sum(axis=1, keepdims=True), x2, None, 0, np.add).tolist()
    [[3], [12]]
    """
    shares = parts_2d(*x2.shape, x2.itemsize)
    got = run_parallel(lambda s: func(x2[s], None if m2 is None else m2[s]), shares)
    width = got[0].shape[-1] if got else np.size(fill)
    dtype = np.result_type(*(g.dtype for g in got)) if got else np.asarray(fill).dtype
    out = np.empty((len(x2), width), dtype=dtype)
    out[:] = fill
    for (rows, _), g in zip(shares, got):
        out[rows] = merge(out[rows], g.reshape(-1, width))
    return out


def in_memory_dask(a: np.ndarray) -> da.Array:
    """A numpy array as a dask array whose blocks are views of it: no copy (``da.from_array``
    copies the whole array, a millisecond per 10 MB and twice the memory) and no hash of its
    bytes (a random name: hashing cost more than the histogram of 1000 small images); split
    along its first axis so that every core gets a share when it is large. The lazy results
    read ``a`` when computed: do not modify it in place before then."""
    import uuid

    from dask.array.core import normalize_chunks, slices_from_chunks
    from dask.highlevelgraph import HighLevelGraph

    n = usable_cpus()
    split = a.ndim and a.nbytes > 4 * 2**20 and a.shape[0] >= n
    chunks = normalize_chunks(((-(-a.shape[0] // n),) + (-1,) * (a.ndim - 1)) if split else -1, a.shape, dtype=a.dtype)
    name = f"array-{uuid.uuid4().hex}"
    keys = itertools.product(*(range(len(c)) for c in chunks))
    dsk = {(name, *k): np.asarray(a[s]) for k, s in zip(keys, slices_from_chunks(chunks))}
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, chunks, meta=np.empty((0,) * a.ndim, dtype=a.dtype))

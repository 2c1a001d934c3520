"""Writers: volnorm Zarr stores (staged, verified, committed) and NIfTI files."""

from __future__ import annotations

import collections
import contextvars
import io
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm._utils import cached_fraction, native, plain_name, slab_chunks
from volnorm.engine import compute, current
from volnorm.io.nifti import (
    SUPPORTED_DTYPES,
    apply_scaling,
    header_from_bytes,
    scaled_dtype,
)
from volnorm.io.niftizarr import (
    create_volume_group,
    data_array,
    finish_volume,
    level_arrays,
    stream_slabs,
    write_nifti_file,
)
from volnorm.io.pyramid import auto_downsample, check_downsample, level_factors, pyramid
from volnorm.io.objectstore import staging_for
from volnorm.io.store import DEFAULT_CODEC, Codec, Staging, encoding

logger = logging.getLogger(__name__)

_NIFTI_CODES = {np.dtype(v): k for k, v in SUPPORTED_DTYPES.items()}


# ---------------------------------------------------------------------------
# volumes of a stack or collection
# ---------------------------------------------------------------------------


def _volumes(data: xr.DataArray | xr.DataTree) -> list[tuple[str, xr.DataArray]]:
    """(name, volume) pairs; each volume has dims ``([t,] z, y, x)`` and the stack's attrs."""
    if isinstance(data, xr.DataTree):
        out = []
        for node in data.subtree:
            if "image" in node.ds.data_vars:
                arr = node.ds["image"]
                arr.attrs = {**node.ds.attrs, **arr.attrs}
                out.append((node.name or "volume", arr))
        if not out:
            raise ValueError("the DataTree holds no node with an 'image' variable")
        return out
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"`data` must be an xarray.DataArray or xarray.DataTree; got {type(data).__name__}")
    if "volume" not in data.dims:
        headers = data.attrs.get("nifti_headers")
        if "volume" in data.coords and data["volume"].ndim == 0:
            name = str(data["volume"].item())
        elif isinstance(headers, dict) and len(headers) == 1:
            name = next(iter(headers))
        else:
            name = str(data.name or "volume")
        return [(name, data)]
    names = [str(v) for v in data["volume"].values] if "volume" in data.coords else [
        f"vol-{i:04d}" for i in range(data.sizes["volume"])
    ]
    vols = [(n, data.isel(volume=i, drop=True).assign_attrs(data.attrs)) for i, n in enumerate(names)]
    if "path" in data.coords and data["path"].dims == ("volume",):  # each volume's input file (provenance, read order)
        vols = [(n, v.assign_coords(path=str(p))) for (n, v), p in zip(vols, data["path"].values)]
    return vols


def _is_nifti_derived(vols: list[tuple[str, xr.DataArray]]) -> bool:
    return all(isinstance(v.attrs.get("nifti_headers"), dict) and n in v.attrs["nifti_headers"] for n, v in vols)


def _inverse_block(x: np.ndarray, slope: float, inter: float, raw: np.dtype) -> np.ndarray:
    """Recover raw integers from nibabel-scaled values, verifying the round trip bit for bit."""
    with np.errstate(invalid="ignore", over="ignore"):
        r = (x.astype(np.float64) - inter) / slope
        if raw.kind in "iu":
            info = np.iinfo(raw)
            r = np.clip(np.nan_to_num(np.rint(r)), info.min, info.max)
        r = r.astype(raw)
    back = apply_scaling(r, slope, inter)
    if not np.array_equal(np.asarray(back, dtype=x.dtype), x, equal_nan=True):
        raise ValueError(
            "the data no longer equal raw * scl_slope + scl_inter of their NIfTI header "
            "(they were changed but kept attrs['nifti_scaled']=True: drop that attribute; or, for "
            "float data stored with scaling, export the raw values: open_zarr(..., scaled=False))"
        )
    return r


def _volume_header(name: str, vol: xr.DataArray) -> bytes | None:
    headers = vol.attrs.get("nifti_headers")
    return headers.get(name) if isinstance(headers, dict) else None


def fresh_header(vol: xr.DataArray) -> bytes:
    """A NIfTI-1 header for data without one (affine and zooms from attrs when present)."""
    import nibabel as nib

    shape = tuple(reversed(vol.shape))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    affine = np.asarray(vol.attrs.get("affine", np.eye(4)), dtype=np.float64)
    hdr.set_qform(affine, code=1 if "affine" in vol.attrs else 0)
    hdr.set_sform(affine, code=1 if "affine" in vol.attrs else 0)
    hdr.set_xyzt_units("mm", "sec")
    return _header_bytes(hdr)


def _header_bytes(hdr: Any) -> bytes:
    buf = io.BytesIO()
    hdr.write_to(buf)
    b = buf.getvalue()
    off = int(hdr["vox_offset"]) or len(b)
    return b[:off] + b"\0" * max(0, off - len(b))


def raw_for_header(name: str, vol: xr.DataArray) -> tuple[da.Array, bytes]:
    """The raw dask array to store and the header bytes that describe it.

    Unchanged data from :func:`open_nifti`/:func:`open_zarr` keep their
    original header and raw integers (scaling inverted and verified per chunk);
    other data keep the header's geometry with the data's own dtype and no
    scaling.
    """
    data = vol.data if isinstance(vol.data, da.Array) else da.from_array(np.asarray(vol.data))
    hb = _volume_header(name, vol)
    if hb is None:
        hb = fresh_header(vol)
    hdr = header_from_bytes(hb)
    raw_dtype = native(hdr.get_data_dtype())
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or not math.isfinite(slope):
        slope, inter = 1.0, 0.0
    same_shape = tuple(hdr.get_data_shape())[: vol.ndim] == tuple(reversed(vol.shape))[: vol.ndim]
    if same_shape and vol.attrs.get("nifti_scaled") and (slope, inter) != (1.0, 0.0):
        if data.dtype == scaled_dtype(raw_dtype, slope, inter):
            raw = data.map_blocks(_inverse_block, slope, inter, raw_dtype, dtype=raw_dtype)
            return raw, hb
    elif same_shape and data.dtype == raw_dtype:
        if (slope, inter) == (1.0, 0.0) or vol.attrs.get("nifti_scaled") is False:
            return data, hb
    # derived data: keep geometry, take the data's dtype, drop scaling
    dtype = native(data.dtype)
    if dtype == np.bool_:
        data, dtype = data.astype(np.uint8), np.dtype(np.uint8)
    if dtype not in _NIFTI_CODES:
        raise ValueError(f"{name}: dtype {dtype} cannot be stored in NIfTI")
    hdr.set_data_shape(tuple(reversed(vol.shape)))
    hdr.set_data_dtype(dtype)
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    return data, _header_bytes(hdr)


# ---------------------------------------------------------------------------
# to_zarr
# ---------------------------------------------------------------------------


def _aligned(data: da.Array) -> tuple[da.Array, tuple[int, ...]]:
    """Regular chunks for zarr: keep dask's when regular, else rechunk to slabs."""
    chunks = tuple(c[0] for c in data.chunks)
    regular = all(all(x == c[0] for x in c[:-1]) and c[-1] <= c[0] for c in data.chunks)
    if regular:
        return data, chunks
    target = slab_chunks(data.shape, data.dtype.itemsize)
    logger.info("rechunking %s -> %s so every dask chunk is a whole zarr chunk", data.chunksize, target)
    return data.rechunk(target), target


def to_zarr(
    data: xr.DataArray | xr.DataTree,
    store: str | os.PathLike,
    *,
    overwrite: bool = False,
    codec: Codec | Any = DEFAULT_CODEC,
    steps: list | None = None,
    progress: bool = False,
    levels: int = 1,
    downsample: str | None = None,
    beside: Mapping[str, xr.DataArray] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Write a stack or collection to a volnorm Zarr store, safely.

    NIfTI-derived data (from :func:`open_nifti`/:func:`open_zarr`) become one
    NIfTI-Zarr group per volume with the original header; other data become
    one xarray-style array ``image``. Everything is written into a staging
    directory, every chunk is verified, the manifest and completion marker are
    written last, and the store is moved into place.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack with dims ``("volume", ...)``, one volume, or a collection.
    store : path or URL
        Output directory, or an object-store URL (``s3://bucket/cohort.zarr``: written in
        place with the completion marker last and a lock object beside it,
        :mod:`volnorm.io.objectstore`). Must not exist unless it is a volnorm store and
        ``overwrite=True``; volnorm never deletes a directory (or objects) it did not create.
    overwrite : bool
        Replace an existing volnorm store (only after the new one is complete).
    codec : {"lz4", "zstd", "zarr-default", "none"} or a zarr codec
        Compression; default blosc-lz4 with byte shuffle (measured fastest to write).
    steps : list, optional
        Processing steps recorded in the provenance.
    progress : bool
        Show a progress bar.
    levels : int
        Resolution levels of each volume, level 0 included (default 1: no pyramid). Each
        level halves ``x``, ``y``, ``z`` (:mod:`volnorm.io.pyramid`), is written in the same
        pass from the same graph as level 0, and is an OME-Zarr 0.5 multiscale level that
        napari and neuroglancer open; ``open_zarr(store, level=k)`` reads one. Volumes only
        (NIfTI-Zarr groups): a 2-D image stack has no pyramid.
    downsample : {"mean", "mode"}, optional
        How a level is made from the one above: ``"mean"`` (images; cast back to the stored
        dtype, integers rounded) or ``"mode"`` (labels and masks). Default: ``"mode"`` for
        boolean data and for volumes whose NIfTI intent is a label image (``intent_code``
        1002/1003), else ``"mean"``.
    beside : mapping of str to xarray.DataArray, optional
        More stacks with the data's volumes and shapes, each written as the sub-group
        ``NAME/<volume>`` of NIfTI-Zarr volume groups (the volume's header and affine, the
        stack's dtype; the same levels), in the same pass and graph as the volumes (e.g.
        ``vn.n4(x, return_field=True)``'s field: N4 runs once per volume), checksummed and
        committed with them; ``open_zarr(store, group=NAME)`` reads one. Volume groups only.
    storage_options : dict, optional
        fsspec options for a URL (credentials, endpoint); by default the standard AWS
        variables and files (``AWS_ENDPOINT_URL`` for S3-compatible servers).

    Returns
    -------
    None
        Computes: one pass over ``data``.

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "func.zarr")
    >>> vn.to_zarr(vn.open_nifti(vn.datasets.nibabel_files()["functional.nii"]), out)
    >>> vn.open_zarr(out).dims
    ('volume', 't', 'z', 'y', 'x')
    >>> x = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> corrected, field = vn.n4(x, shrink_factor=2, iterations=(3,), return_field=True)
    >>> out = os.path.join(tempfile.mkdtemp(), "n4.zarr")
    >>> vn.to_zarr(corrected, out, beside={"bias_field": field})
    >>> vn.open_zarr(out, group="bias_field").dtype == "float32"
    True
    """
    vols = _volumes(data)
    pyr = [levels, downsample] if levels != 1 or downsample is not None else []  # older plans' tokens unchanged
    more = [sorted(beside), *[beside[k].data for k in sorted(beside)]] if beside else []  # older plans' tokens unchanged
    token = dask.base.tokenize(*[v.data for _, v in vols], [n for n, _ in vols], str(codec), *pyr, *more)
    plan = {"kind": "cohort" if _is_nifti_derived(vols) else "images", "token": token}
    _check_levels(levels, downsample, _check_names(data, vols), vols)  # before anything exists on disk
    _check_beside(beside, data, vols, _is_nifti_derived(vols))
    staging = staging_for(store, plan, overwrite=overwrite, storage_options=storage_options).prepare()
    try:
        with staging.named_errors():
            write_staged(data, staging, codec=codec, steps=steps, progress=progress, levels=levels, downsample=downsample, beside=beside)
    finally:
        staging.release()


#: Volumes are written in batches of about this many bytes, each marked complete when done:
#: an interrupted run resumes after the last complete batch, not from scratch.
WRITE_BATCH_BYTES = 1 << 30
#: ... and of at most this many volumes: each volume's statistics stay in the workers' memory
#: until its batch is gathered, and small volumes would otherwise make batches of thousands
#: (800 volumes of 64x64x48 in one batch: +60 MiB per worker by the batch's end).
WRITE_BATCH_VOLUMES = 64
#: ... and of about this many seconds of work, from the batches done so far (the first has
#: :data:`WRITE_BATCH_FIRST` volumes): what an interrupted run loses is bounded in time, also
#: for slow steps (N4: seconds to minutes per volume; 40 volumes in one batch never completed
#: within a SLURM job's 30-60 s before its time limit's SIGTERM, requeued again and again).
WRITE_BATCH_SECONDS = 30.0
WRITE_BATCH_FIRST = 4
#: Threads that write the volume groups' metadata (small files) of a cohort store.
METADATA_THREADS = 8


class _BatchSize:
    """How many volumes the next batch takes: :data:`WRITE_BATCH_FIRST`, then as many as the
    batches done so far did in :data:`WRITE_BATCH_SECONDS` (at most ``most``). Up to two
    batches run at once (:func:`_overlapped`), so a batch's time may count the other's share of
    the workers: the estimate errs on the small side."""

    def __init__(self, most: int = WRITE_BATCH_VOLUMES, seconds: float = WRITE_BATCH_SECONDS, first: int = WRITE_BATCH_FIRST) -> None:
        self.most, self.seconds, self.n = most, seconds, min(first, most)
        self._lock = threading.Lock()

    def record(self, volumes: int, elapsed: float) -> None:
        """A batch of ``volumes`` took ``elapsed`` seconds (called from the batches' thread)."""
        with self._lock:
            per = elapsed / max(1, volumes)
            self.n = self.most if per <= 0 else max(1, min(self.most, int(self.seconds / per)))


def _batches(items: Iterable, limit: int, most: _BatchSize | int = WRITE_BATCH_VOLUMES) -> Iterator[list]:
    """Consecutive groups of ``(name, dask array, target)`` of at most ``limit`` bytes and
    ``most`` items (a number, or a :class:`_BatchSize` asked at each batch; one item at least),
    each as soon as its items are there (``items`` may still be being made)."""
    batch: list = []
    size = 0
    for it in items:
        n = most if isinstance(most, int) else most.n
        if batch and (size + it[1].nbytes > limit or len(batch) >= n):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += it[1].nbytes
    if batch:
        yield batch


def _overlapped(batches: Iterable[Any], work: Callable[[Any], Any], done: Callable[[Any, Any], None], at_once: int = 2) -> None:
    """``done(batch, work(batch))`` for each batch, in order, with ``work`` (a compute) run on a
    background thread and the next batch's work started before the previous one is waited for:
    the workers go from one batch to the next without waiting for the client between them (at
    28 GB, 26 batches had cost ~1 s each of idle workers: the last volumes' tail, the client
    marking volumes complete and building the next graph). At most ``at_once`` batches at once (2);
    ``done`` runs on this thread, so an interrupt still stops the run between two volumes and
    the volumes of unfinished batches are not marked complete (a resumed run writes them)."""
    eng = current()
    if eng is not None:  # started here: its cluster's contexts belong to this thread's context
        eng.start()
    ex = ThreadPoolExecutor(2, thread_name_prefix="volnorm-batch")
    pending: collections.deque = collections.deque()
    try:
        for batch in batches:
            pending.append((batch, ex.submit(contextvars.copy_context().run, work, batch)))  # the engine is a context var
            if len(pending) >= at_once:
                b, f = pending.popleft()
                done(b, f.result())
        while pending:
            b, f = pending.popleft()
            done(b, f.result())
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)  # a batch computing now ends with the engine
        raise
    ex.shutdown(wait=True)


#: Per-volume statistics computed with a write: called with the batch's volumes (a stack) and
#: their index along ``volume``, it returns the lazy arrays to compute with the batch and a
#: function of their values that gives one JSON-able dict per volume.
Alongside = Callable[[xr.DataArray, Any], tuple[list, Callable[[Sequence[Any]], list[dict]]]]


def _cached_first(vols: list[tuple[str, xr.DataArray]], pool: ThreadPoolExecutor) -> list[tuple[str, xr.DataArray]]:
    """The volumes whose input files are most in the page cache first (stable otherwise).

    A fit reads the cohort before the write pass reads it again; when the cohort is larger than
    the RAM, the files it read last are still cached, and the write pass reads them from there
    if it takes them before its own reads and writes push them out (the fit's reading order is
    dask's, not the volumes'). Volumes without a ``path`` coordinate keep their order."""
    paths = [str(v.coords["path"].item()) if "path" in v.coords else "" for _, v in vols]
    if not any(paths):
        return vols
    share = list(pool.map(lambda p: cached_fraction(p) if p else 0.0, paths))
    return [vols[i] for i in sorted(range(len(vols)), key=lambda i: -share[i])]


def _check_names(data: xr.DataArray | xr.DataTree, vols: list[tuple[str, xr.DataArray]], nifti: bool | None = None) -> bool:
    """Whether each volume becomes a group of the store (a cohort); if so, check that every
    name is a plain name (a volume name such as ``../x`` must never become a path out of it)."""
    nifti = _is_nifti_derived(vols) if nifti is None else nifti
    groups = nifti or isinstance(data, xr.DataTree) or data.ndim >= 4 or "volume" not in getattr(data, "dims", ())
    if groups:
        for name, _ in vols:
            plain_name(name, "volume name")
    return groups


def _check_levels(levels: Any, downsample: Any, groups: bool, vols: list[tuple[str, xr.DataArray]]) -> None:
    """Refuse a pyramid that cannot be written (bad values, a 2-D image stack, more levels than a volume has)."""
    check_downsample(downsample, levels)
    if levels > 1 and not groups:
        raise ValueError(f"levels={levels}: pyramids are written for volumes (NIfTI-Zarr groups); a 2-D image stack "
                         "(dims volume, y, x) is one array without levels")
    for name, vol in vols if levels > 1 else ():
        level_factors(vol.shape, vol.dims, levels, where=name)


def write_staged(
    data: xr.DataArray | xr.DataTree, staging: Staging, *, codec: Any = DEFAULT_CODEC, steps: list | None = None,
    progress: bool = False, manifest: dict | None = None, statistics: Alongside | None = None,
    levels: int = 1, downsample: str | None = None, beside: Mapping[str, xr.DataArray] | None = None,
) -> None:
    """Write ``data`` into a prepared :class:`~volnorm.io.store.Staging` and commit it (the
    body of :func:`to_zarr`, for runners that own the staging: its plan, resume, lock).
    Volumes already complete in a resumed staging are not written again; ``manifest`` adds
    keys to the committed manifest. ``statistics`` (a stack only) are computed with each
    batch's write, in the same graph (the data are made and read once), and kept with the
    volumes: each volume group's ``statistics`` attribute (cohort stores), the manifest's
    ``volume_statistics`` (image stacks). ``levels``/``downsample``: the pyramid, as
    :func:`to_zarr`'s. ``beside``: stacks written beside the volumes, as
    :func:`to_zarr`'s."""
    if statistics is not None and (not isinstance(data, xr.DataArray) or "volume" not in data.dims):
        raise ValueError("write_staged: `statistics` needs a stack (a DataArray with a volume dim)")
    vols = _volumes(data)
    nifti = _is_nifti_derived(vols)
    _check_levels(levels, downsample, _check_names(data, vols, nifti), vols)
    _check_beside(beside, data, vols, nifti)
    _write_staged(data, vols, staging, nifti, codec, steps, progress, manifest or {}, statistics, levels, downsample, beside)


def _check_beside(beside: Mapping[str, Any] | None, data: Any, vols: list[tuple[str, xr.DataArray]], nifti: bool) -> None:
    """Refuse stacks beside the volumes that cannot be written: not a store of volume groups,
    a name that is not a plain name or is a volume's, other volumes or shapes."""
    for key, stack in (beside or {}).items():
        plain_name(key, "a group beside the volumes", taken=[n for n, _ in vols])
        if not _check_names(data, vols, nifti):
            raise ValueError(f"beside={{{key!r}: ...}}: groups beside the volumes are written for volumes (NIfTI-Zarr groups), "
                             "not for a 2-D image stack")
        if not isinstance(stack, xr.DataArray):
            raise TypeError(f"beside[{key!r}] must be an xarray.DataArray; got {type(stack).__name__}")
        theirs = [(n, v.shape) for n, v in _volumes(stack)]
        mine = [(n, v.shape) for n, v in vols]
        if theirs != mine:
            raise ValueError(f"beside[{key!r}] must have the data's volumes and shapes {mine}; got {theirs}")


def store_blocks(source: da.Array, target: Any, region: tuple[slice, ...] | None = None, *, passthrough: bool = False) -> da.Array:
    """Lazily write every block of ``source`` into ``target`` (a zarr array) at its place
    (offset by ``region``'s starts): an *array* of one int8 per block, so that computing it
    with other arrays of the same data (the statistics taken with the write) shares their
    blocks. ``da.store`` gives a ``Delayed`` whose graph it has already optimized on its own:
    computed with arrays, the data were read and transformed twice (once fused into the store,
    once for the statistics), measured on a local cluster.

    With ``passthrough=True`` the array is ``source`` itself, each block returned by the task
    that wrote it: statistics taken on it follow the write in one chain of tasks, which dask
    fuses into one task per block (read, transform, write, count), instead of a task for the
    data with two dependents (the write and the count). Compute only arrays derived from it
    (their values come back; its own blocks would be sent to the client).

    Parameters
    ----------
    source : dask.array.Array
    target : zarr.Array
        Its chunks aligned with ``source``'s blocks (no two blocks write one chunk).
    region : tuple of slice, optional
        Where ``source`` goes in ``target`` (default: all of it).
    passthrough : bool, default False
        Return ``source``'s blocks rather than one int8 per block.

    Returns
    -------
    dask.array.Array
        int8 zeros, one per block (``source``'s values with ``passthrough``); computing it writes.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array({}, shape=(4,), chunks=(2,), dtype="i2")
    >>> int(store_blocks(da.arange(4, chunks=2, dtype="i2"), z).sum().compute()), z[:].tolist()
    (0, [0, 1, 2, 3])
    >>> int(store_blocks(da.arange(4, chunks=2, dtype="i2") * 2, z, passthrough=True).sum().compute()), z[:].tolist()
    (12, [0, 2, 4, 6])
    """
    starts = tuple(r.start or 0 for r in region) if region else (0,) * source.ndim

    def put(block: np.ndarray, block_info: Any = None) -> np.ndarray:
        loc = block_info[0]["array-location"]
        target[tuple(slice(a + o, b + o) for (a, b), o in zip(loc, starts))] = block
        return block if passthrough else np.zeros((1,) * block.ndim, dtype=np.int8)

    name = f"store-{dask.base.tokenize(source, str(target.store), target.path, starts, passthrough)}"
    if passthrough:
        return source.map_blocks(put, dtype=source.dtype, meta=source._meta, name=name)
    return source.map_blocks(put, chunks=tuple((1,) * len(c) for c in source.chunks), dtype=np.int8,
                             meta=np.empty((0,) * source.ndim, dtype=np.int8), name=name)


def _with_statistics(writes: list[tuple[da.Array, Any, tuple[slice, ...] | None, bool]], data: xr.DataArray, index: Any, statistics: Alongside | None,
                     progress: bool, also: Sequence[tuple[da.Array, Any]] = ()) -> list[dict]:
    """Write a batch of ``data``'s volumes ``index`` and compute their statistics in the same
    graph; the per-volume dicts (none without ``statistics``). ``writes``: (source, zarr array,
    region as :func:`store_blocks` takes it, whether the source holds the volumes' own values:
    not scaled back nor cast). When every source does, the statistics are taken on the written
    blocks (:func:`store_blocks` ``passthrough``): read, transform, write and count are one
    task per block; else the data's task has two dependents (measured on 8 phantoms: 2 tasks
    per volume instead of 6.6). ``also``: more (source, zarr array) writes of the batch (the
    volumes' resolution levels, the groups beside them), in the same graph."""
    more = [store_blocks(a, t) for a, t in also]
    if statistics is None:
        compute(*(store_blocks(a, t, r) for a, t, r, _ in writes), *more, progress=progress)
        return []
    order = list(range(index.start, index.stop) if isinstance(index, slice) else index)
    # consecutive volumes as slices: a list index would make dask join their chunks into one
    runs: list[slice] = []
    for i in order:
        if runs and runs[-1].stop == i:
            runs[-1] = slice(runs[-1].start, i + 1)
        else:
            runs.append(slice(i, i + 1))
    if all(same for *_, same in writes):  # one chain of tasks per block: write, then count
        if isinstance(index, slice):  # an image stack's batch: one write of those volumes
            (a, t, r, _), = writes
            parts = [statistics(data.isel(volume=index).copy(data=store_blocks(a, t, r, passthrough=True)), index)]
        else:  # a cohort's: one write per volume
            written = {i: store_blocks(a, t, r, passthrough=True) for i, (a, t, r, _) in zip(order, writes)}
            parts = [statistics(data.isel(volume=s).copy(data=da.stack([written[i] for i in range(s.start, s.stop)])), s) for s in runs]
        stored = more
    else:
        parts = [statistics(data.isel(volume=r), r) for r in runs]
        stored = [store_blocks(a, t, r) for a, t, r, _ in writes] + more
    values = compute(*stored, *(x for lazy, _ in parts for x in lazy), progress=progress)[len(stored):]
    rows: list[dict] = []
    for lazy, finish in parts:
        rows += finish(values[: len(lazy)])
        values = values[len(lazy):]
    return rows


def _volume_group(root: Any, name: str, vol: xr.DataArray, codec: Any, levels: int, downsample: str | None) -> tuple[da.Array, list, bool]:
    """Make volume ``name``'s NIfTI-Zarr group in ``root``: (its raw level 0, [(level 0's and
    each level's dask array, its zarr array)], whether level 0 holds the volume's own values)."""
    raw, hb = raw_for_header(name, vol)
    same = raw is vol.data  # neither scaled back nor cast: the statistics can be taken on the written blocks
    raw, chunks = _aligned(raw)
    method = downsample or auto_downsample(vol.dtype, hb)  # a mean of labels or a mask is neither
    hdr = header_from_bytes(hb)
    zooms = tuple(float(z) for z in hdr.get_zooms())
    grp = create_volume_group(
        root,
        name,
        header_bytes=hb,
        shape=raw.shape,
        dtype=raw.dtype,
        dims=tuple(vol.dims),
        chunks=chunks,
        codec=codec,
        zooms=zooms + (1.0,) * (4 - len(zooms)),
        units=tuple(hdr.get_xyzt_units()),
        attrs={"source": {"path": str(vol.attrs.get("store") or (vol.coords["path"].item() if "path" in vol.coords else ""))}},
        levels=levels,
        downsample=method,
    )
    made = pyramid(raw, tuple(vol.dims), levels, method, chunks)  # from the same graph: read once
    return raw, list(zip([raw, *made], [data_array(grp), *level_arrays(grp)])), same


def _write_staged(
    data: xr.DataArray | xr.DataTree,
    vols: list[tuple[str, xr.DataArray]],
    staging: Staging,
    nifti: bool,
    codec: Any,
    steps: list | None,
    progress: bool,
    extra: dict,
    statistics: Alongside | None = None,
    levels: int = 1,
    downsample: str | None = None,
    beside: Mapping[str, xr.DataArray] | None = None,
) -> None:
    import zarr

    sources: list[dict] = []
    if _check_names(data, vols, nifti):
        root = zarr.open_group(staging.store(), mode="r+", zarr_format=3)

        extras = {key: (root.require_group(key), dict(_volumes(stack))) for key, stack in (beside or {}).items()}

        def start(item: tuple[str, xr.DataArray]) -> tuple[str, da.Array, list, bool] | None:
            """(name, raw level 0, [(level 0's and each level's dask array, its zarr array)] of the
            volume then of its groups beside, whether level 0 holds the volume's own values), the
            groups made. The groups beside come first: a volume marked complete has them complete."""
            name, vol = item
            if name in root and root[name].attrs.get("volnorm", {}).get("complete"):
                return None
            pairs = []
            for grp, vols_ in extras.values():
                if name in grp and grp[name].attrs.get("volnorm", {}).get("complete"):
                    del grp[name]  # its volume was not: both are written again, from one graph
                pairs += _volume_group(grp, name, vols_[name], codec, levels, downsample)[1]
            raw, own, same = _volume_group(root, name, vol, codec, levels, downsample)
            return name, raw, own + pairs, same

        # the groups' metadata are small files, one volume at a time 12 ms each (13 s for 1000
        # volumes on the client, the workers idle): made by threads, in order. (Marking volumes
        # complete stays on this thread, where an interrupt stops it between two volumes.)
        # The first batch is computed as soon as its volumes' groups are made, the others' are
        # made meanwhile.
        index = {name: i for i, (name, _) in enumerate(vols)}

        sizer = _BatchSize()

        def work(batch: list) -> list[dict]:
            writes = [(a, t, None, same) for _, _, ((a, t), *_), same in batch]  # the volumes' level 0; the rest: levels, groups beside
            more = [pair for _, _, (_, *rest), _ in batch for pair in rest]
            t0 = time.monotonic()
            rows = _with_statistics(writes, data, [index[name] for name, *_ in batch], statistics, progress, more)
            sizer.record(len(batch), time.monotonic() - t0)
            return rows

        def done(batch: list, rows: list[dict]) -> None:  # each batch's volumes are marked complete, after their groups beside
            for i, (name, *_) in enumerate(batch):
                for key, (grp, _) in extras.items():
                    finish_volume(grp[name], f"{key}/{name}", {})
                finish_volume(root[name], name, {"statistics": rows[i]} if rows else {})

        meta = ThreadPoolExecutor(METADATA_THREADS)
        try:
            made = (a for a in meta.map(start, _cached_first(vols, meta)) if a is not None)  # in order, made in the background
            # a batch's volumes in their order in ``data``: consecutive ones are one slice of the statistics
            batches = (sorted(b, key=lambda it: index[it[0]]) for b in _batches(made, WRITE_BATCH_BYTES, sizer))
            # groups beside the volumes (an N4 field, a mask after a step) share their graph's tasks
            # across batches: two batches at once on a cluster lost a shared key (KeyError, seen
            # once in CI on the n4-normalize example); one batch at a time there
            _overlapped(batches, work, done, at_once=1 if extras else 2)
        finally:
            meta.shutdown(wait=True, cancel_futures=True)
        for name, _ in vols:
            for grp in [g[name] for g, _ in extras.values()] + [root[name]]:
                if not grp.attrs["volnorm"].get("complete"):
                    finish_volume(grp, name, {})
        sources = [{"name": n, "path": str(v.coords["path"].item()) if "path" in v.coords else None} for n, v in vols]
        manifest = {"kind": "cohort", "volumes": [n for n, _ in vols], "inputs": sources, "steps": steps or []}
        if extras:
            manifest["beside"] = sorted(extras)
    else:
        arr = data
        same = isinstance(arr.data, da.Array)  # the statistics can be taken on the written blocks
        raw, chunks = _aligned(arr.data if same else da.from_array(np.asarray(arr.data)))
        # resumable: the volumes are written in batches of whole chunks, each batch's end
        # recorded in the staging manifest once its chunks are on disk
        done = int(staging.manifest().get("written_volumes", 0)) if staging.resumed and (staging.path / "image" / "zarr.json").exists() else 0
        if not done:  # the metadata and the coords; the voxels below
            ds = arr.copy(data=raw).to_dataset(name="image")
            ds["image"].attrs = {k: v for k, v in arr.attrs.items() if _jsonable(v)}
            ds.attrs = {"volnorm": staging.manifest()}  # to_zarr rewrites the root's attributes: keep the manifest
            enc = encoding(ds, codec, image={"chunks": chunks})  # every array checksummed, coords too
            ds.to_zarr(staging.store(), mode="a", zarr_format=3, encoding=enc, compute=False, consolidated=False, write_empty_chunks=True)
        # write_empty_chunks is forgotten on reopening: an all-fill chunk must be stored too
        target = zarr.open_array(staging.store(), path="image", mode="r+").with_config({"write_empty_chunks": True})
        axis = arr.dims.index("volume")
        bounds = np.cumsum((0, *raw.chunks[axis]))
        per_volume = raw.nbytes / max(1, raw.shape[axis])
        start = done
        while start < raw.shape[axis]:
            fits = bounds[(bounds > start) & ((bounds - start) * per_volume <= WRITE_BATCH_BYTES)]
            end = int(fits[-1]) if len(fits) else int(bounds[bounds > start][0])
            region = tuple(slice(start, end) if i == axis else slice(None) for i in range(raw.ndim))
            rows = _with_statistics([(raw[region], target, region, same)], data, slice(start, end), statistics, progress)
            if rows:
                staging.update_manifest(written_volumes=end, volume_statistics=staging.manifest().get("volume_statistics", []) + rows)
            else:
                staging.update_manifest(written_volumes=end)
            start = end
        manifest = {"kind": "images", "volumes": [str(v) for v in arr["volume"].values], "steps": steps or []}
    staging.commit({**manifest, **extra})


def _jsonable(v: Any) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError, RecursionError):  # not JSON, NaN-free or shallow enough: not stored
        return False


# ---------------------------------------------------------------------------
# to_nifti
# ---------------------------------------------------------------------------


def _slabs(arr: da.Array) -> Iterator[np.ndarray]:
    chunks = tuple(c[0] for c in arr.chunks)
    for region in stream_slabs(arr.shape, chunks):
        yield arr[region].compute()


def to_nifti(
    data: xr.DataArray | xr.DataTree,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    compress: bool | None = None,
) -> list[Path]:
    """Export volumes as NIfTI files with their original header and affine.

    Data read from NIfTI (directly or through a store) and not changed are
    written back bit for bit: original header bytes, raw integers, scaling.
    Changed data keep the geometry and take their own dtype, without scaling.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        One volume, a stack or a collection.
    path : path
        The output file for one volume; a directory (created if missing) for
        several, written as ``<volume>.nii.gz`` (or ``.nii`` with ``compress=False``).
    overwrite : bool
        Replace existing files.
    compress : bool, optional
        gzip the output; default: from the file name, else True.

    Returns
    -------
    list of pathlib.Path
        The files written. Computes: one pass over ``data``, one slab at a time.

    Examples
    --------
    >>> import volnorm as vn, tempfile, os, nibabel as nib, numpy as np
    >>> src = vn.datasets.nibabel_files()["anatomical.nii"]
    >>> out = os.path.join(tempfile.mkdtemp(), "anat.nii")
    >>> _ = vn.to_nifti(vn.open_nifti(src), out)
    >>> np.array_equal(nib.load(out).get_fdata(), nib.load(src).get_fdata())
    True
    """
    vols = _volumes(data)
    path = Path(path)
    if len(vols) == 1 and not path.is_dir():
        targets = [path]
    else:
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path}: exists and is not a directory; several volumes need a directory")
        path.mkdir(parents=True, exist_ok=True)
        suffix = ".nii" if compress is False else ".nii.gz"
        targets = [path / f"{name}{suffix}" for name, _ in vols]
    for t in targets:
        if t.exists() and not overwrite:
            raise FileExistsError(f"{t}: exists; pass overwrite=True to replace it")
    written = []
    for (name, vol), target in zip(vols, targets):
        raw, hb = raw_for_header(name, vol)
        hdr = header_from_bytes(hb)
        file_dtype = hdr.get_data_dtype()
        gz = compress if compress is not None else target.name.endswith(".gz")
        blocks = (b.astype(file_dtype, copy=False) for b in _slabs(raw))
        write_nifti_file(target, hb, blocks, compress=gz)
        written.append(target)
        logger.info("wrote %s", target)
    return written

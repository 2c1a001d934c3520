"""Lazy readers: NIfTI files, masks, image stacks and volnorm Zarr stores.

Nothing here reads voxel data: every function validates headers/metadata and
returns a dask-backed ``xarray.DataArray`` (a stack) or ``xarray.DataTree``
(a collection of volumes of different shapes).
"""

from __future__ import annotations

import logging
import operator
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from volnorm._utils import native, normalize_chunks
from volnorm.integrity import checked_store
from volnorm.io.manifest import IncompleteStoreError, read_manifest
from volnorm.io.nifti import (
    WHOLE_READ_MAX,
    NiftiArray,
    NiftiInfo,
    apply_scaling,
    expand_paths,
    header_from_bytes,
    read_info,
    scaled_dtype,
)
from volnorm.io.location import Remote, location
from volnorm.io.niftizarr import check_volume, group_header, level_paths
from volnorm.io.pyramid import level_affine, level_header
from volnorm.io.store import staging_path

logger = logging.getLogger(__name__)

PathsLike = str | os.PathLike | Iterable[str | os.PathLike]
ChunksLike = int | str | Mapping[str, int] | Sequence[int] | None


class HeaderMap(dict):
    """``{volume name: NIfTI header bytes}`` kept in ``attrs["nifti_headers"]``.

    A dict with a short repr, so notebooks do not print hundreds of bytes.
    """

    def __repr__(self) -> str:
        return f"<{len(self)} NIfTI header(s)>"


def unique_names(infos: Sequence[NiftiInfo]) -> list[str]:
    """One name per input file for the ``volume`` coordinate and the store's groups.

    The file name without ``.nii``/``.nii.gz``; when two files share a name (the same
    name in different folders), the path relative to their common folder, with the
    separators replaced by ``_``.

    Parameters
    ----------
    infos : sequence of NiftiInfo
        The validated files (:func:`~volnorm.io.nifti.read_info`), in order.

    Returns
    -------
    list of str
        One unique name per file, in the same order.

    Raises
    ------
    ValueError
        When no unique names can be made (the message lists the paths).

    Examples
    --------
    >>> from volnorm import datasets
    >>> files = datasets.nibabel_files()
    >>> unique_names([read_info(files["anatomical.nii"]), read_info(files["standard.nii.gz"])])
    ['anatomical', 'standard']
    """
    names = [i.name for i in infos]
    if len(set(names)) == len(names):
        return names
    # same file name in different folders: use the path relative to the common folder
    def folder(i: NiftiInfo) -> PurePath:
        return PurePosixPath(str(i.path.parent)) if isinstance(i.path, Remote) else i.path.absolute().parent

    common = PurePath(os.path.commonpath([str(folder(i)) for i in infos]))
    names = [str(folder(i).relative_to(common) / i.name).replace("/", "_").replace(os.sep, "_").lstrip("._") for i in infos]
    if len(set(names)) != len(names):
        raise ValueError(f"cannot give unique names to the inputs {[str(i.path) for i in infos]}")
    return names


def _volume_attrs(infos: Sequence[NiftiInfo], names: Sequence[str], scaled: bool) -> dict:
    first = infos[0]
    attrs: dict[str, Any] = {
        "zooms": tuple(first.zooms),
        "units": tuple(first.units),
        "nifti_scaled": bool(scaled),
        "nifti_headers": HeaderMap({n: i.header_bytes for n, i in zip(names, infos)}),
    }
    if all(np.array_equal(i.affine, first.affine) for i in infos):
        attrs["affine"] = first.affine.tolist()
    return attrs


def open_nifti(
    paths: PathsLike,
    *,
    chunks: ChunksLike = None,
    scaled: bool = True,
    storage_options: dict | None = None,
) -> xr.DataArray | xr.DataTree:
    """Open NIfTI files lazily as a stack or a collection.

    Every file is validated first (header sanity, byte count, gzip trailer);
    no voxel is read until the result is computed.

    Parameters
    ----------
    paths : str, path, glob or iterable of them
        ``.nii``/``.nii.gz`` files, glob patterns or directories; or object-store URLs
        (``s3://bucket/cohort/*.nii.gz``, a glob expanded by listing, or a prefix).
    chunks : None, "auto", int, mapping or tuple
        ``None``/"auto": whole-plane slabs of about 64 MiB (a .nii slab is
        contiguous on disk); an int is a size in MiB; a mapping names dims.
    scaled : bool
        Apply ``scl_slope``/``scl_inter`` exactly as nibabel does (default), or
        return the raw stored integers (``scaled=False``).
    storage_options : dict, optional
        fsspec options for URLs (credentials, ``client_kwargs={"endpoint_url": ...}``,
        ``anon=True``); by default the standard AWS variables and files.

    Returns
    -------
    xarray.DataArray or xarray.DataTree
        Lazy; nothing is computed. Files of one shape give a ``DataArray``
        named ``image`` with dims ``("volume", ["t",] "z", "y", "x")``, the
        ``volume`` coordinate holding file names (without ``.nii[.gz]``) and
        ``path`` the source paths. Different shapes give a ``DataTree`` with
        one node per file holding an ``image`` variable. ``attrs`` carry
        ``affine`` (when shared), ``zooms``, ``units``, ``nifti_scaled`` and
        ``nifti_headers`` (the header bytes of each volume).

    Notes
    -----
    A .nii chunk reads its bytes of the file. A .nii.gz is decompressed whole, once, by
    one task (ISA-L, in one streaming pass that checks the CRC and the length as
    :func:`volnorm.convert` does: a corrupt file fails at compute time, naming it); its
    chunks are copies cut from that volume, on the worker that holds it. That task holds
    the volume (plus its scaled copy, if any) until every chunk is cut: a .nii.gz larger
    than :func:`whole_read_limit` (1 GiB, or a quarter of the current ``distributed``
    client's worker memory) is read chunk by chunk through ``indexed_gzip`` instead
    (slower, CRC not checked). The chunk keys are the same either way.

    Examples
    --------
    >>> import volnorm as vn
    >>> stack = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> stack.dims, stack.dtype.name
    (('volume', 'z', 'y', 'x'), 'int16')
    """
    files = expand_paths(paths, storage_options=storage_options)
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as ex:
        infos = list(ex.map(read_info, files))
    names = unique_names(infos)
    shapes = {i.shape for i in infos}
    if len(shapes) == 1:
        return _nifti_stack(infos, names, chunks=chunks, scaled=scaled)
    nodes: dict[str, xr.Dataset] = {}
    for info, name in zip(infos, names):
        arr = _nifti_stack([info], [name], chunks=chunks, scaled=scaled).isel(volume=0, drop=True)
        nodes[name] = xr.Dataset({"image": arr}, attrs=dict(arr.attrs, path=str(info.path)))
    return xr.DataTree.from_dict(nodes)


def _nifti_stack(infos: Sequence[NiftiInfo], names: Sequence[str], *, chunks: ChunksLike, scaled: bool) -> xr.DataArray:
    dtypes = [i.scaled_dtype if scaled else native(i.raw_dtype) for i in infos]
    dtype = np.result_type(*dtypes)
    dims = infos[0].dims
    shape = tuple(reversed(infos[0].shape))
    full_dims = ("volume", *dims)
    if isinstance(chunks, Mapping) and "volume" in chunks:
        if chunks["volume"] != 1:
            raise ValueError(f"`chunks` along 'volume' must be 1 for NIfTI inputs (one file per chunk); got {chunks['volume']!r}")
        chunks = {k: v for k, v in chunks.items() if k != "volume"}
    if isinstance(chunks, Sequence) and not isinstance(chunks, str) and len(chunks) == len(full_dims):
        if chunks[0] != 1:
            raise ValueError(f"`chunks` along 'volume' must be 1 for NIfTI inputs (one file per chunk); got {chunks[0]!r}")
        chunks = tuple(chunks[1:])
    cshape = (1, *normalize_chunks(chunks, dims, shape, dtype.itemsize))
    meta = np.empty((0,) * len(shape), dtype=dtype)
    limit = whole_read_limit()
    arrays = []
    for info in infos:
        view = NiftiArray(info, scaled=scaled, dtype=dtype)
        # deterministic across processes, so a re-run resumes the same plan
        name = f"nifti-{info.name}-{tokenize(str(info.path.absolute()), info.file_size, info.mtime_ns, scaled, str(dtype), cshape)}"
        if info.compressed and view.whole_read_bytes <= limit:
            arrays.append(_whole_gz_array(view, name, cshape[1:], meta))
        else:
            arrays.append(da.from_array(view, chunks=cshape[1:], meta=meta, name=name, fancy=False))
    data = da.stack(arrays) if len(arrays) > 1 else arrays[0][None]
    coords = {"volume": list(names), "path": ("volume", [str(i.path) for i in infos])}
    return xr.DataArray(data, dims=full_dims, coords=coords, name="image", attrs=_volume_attrs(infos, names, scaled))


def whole_read_limit() -> int:
    """The largest .nii.gz volume (:attr:`NiftiArray.whole_read_bytes`) read whole, in one task.

    ``WHOLE_READ_MAX`` (1 GiB), or a quarter of the smallest worker memory limit of the current
    ``distributed`` client when that is smaller (asked only when ``distributed`` is imported
    and a client is current: without one, the graph may run anywhere, and 1 GiB it is).
    """
    if "distributed" not in sys.modules:
        return WHOLE_READ_MAX
    try:
        from distributed import Client

        workers = Client.current(allow_global=True).scheduler_info(n_workers=-1)["workers"].values()
        limits = [int(w.get("memory_limit") or 0) for w in workers]
    except Exception:  # noqa: BLE001 - no client, or its scheduler is gone: the fixed bound
        return WHOLE_READ_MAX
    return min([WHOLE_READ_MAX, *(v // 4 for v in limits if v > 0)])


def _volume_chunk(volume: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
    """One chunk of a volume read whole: a copy, so that the volume is freed once its chunks are cut."""
    part = volume[region]
    return part if part.shape == volume.shape else part.copy()


def _whole_gz_array(view: NiftiArray, name: str, chunks: tuple[int, ...], meta: np.ndarray) -> da.Array:
    """A .nii.gz as a dask array whose chunks (keys ``(name, i, j, ...)``, as ``da.from_array``
    names them) are cut from one task that decompresses the whole file in one streaming pass.

    The volume task's key is ``("nifti-<file stem>-<token>",)``: it reads that file, as
    ``engine.faults.key_inputs`` reads such keys. The chunks depend on it alone, so the
    schedulers run them where it lives; it is freed once every chunk is cut (they are copies).
    """
    whole = f"nifti-{view.info.name}-{tokenize(name, 'whole')}"
    full = tuple(slice(0, n) for n in view.shape)
    blocks = da.core.normalize_chunks(chunks, view.shape, dtype=view.dtype)
    regions = da.core.slices_from_chunks(blocks)
    indices = np.ndindex(*(len(b) for b in blocks))
    layers = {
        whole: {(whole,): (operator.getitem, view, full)},
        name: {(name, *i): (_volume_chunk, (whole,), r) for i, r in zip(indices, regions)},
    }
    graph = HighLevelGraph(layers, {whole: set(), name: {whole}})
    return da.Array(graph, name, blocks, meta=meta)


# ---------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------


def open_mask(path: PathsLike, *, like: xr.DataArray | None = None) -> xr.DataArray:
    """Open a NIfTI mask lazily: non-zero voxels are inside.

    Parameters
    ----------
    path : str, path, glob or iterable of them
        One NIfTI file (one mask for every volume), or several of one grid (a glob,
        a folder or a list: one mask per volume, in the data's volume order).
    like : xarray.DataArray, optional
        The data the mask is for, dims ``([volume,] [t,] z, y, x)``; its metadata
        only are read. With it, the mask is checked against the data's grid and
        matched to its volumes.

    Returns
    -------
    xarray.DataArray
        Lazy; nothing is computed. Boolean, named ``mask``: dims ``([t,] z, y, x)``
        for one file (it broadcasts to every volume), ``(volume, [t,] z, y, x)`` with
        ``like``'s ``volume`` coordinate for one file per volume. No non-dim
        coordinate; ``attrs["affine"]`` is the mask's affine (when its files share one).

    Raises
    ------
    ValueError
        Naming ``path``: several mask files without ``like``, or not as many as the
        data's volumes (both counts given); a grid that is not the data's (both
        grids given); files of different shapes.
    TypeError
        ``like`` is not an ``xarray.DataArray``.

    Notes
    -----
    The rule, for every caller: the stored values are read unscaled
    (``open_nifti(path, scaled=False)``) and any non-zero value (NaN included) is
    inside. A 4-D mask file's ``t`` is part of its grid, not its volumes: one frame
    is dropped (it broadcasts over the data's ``t``); several must equal the
    data's ``t``. The mask's grid dims must be among the data's grid dims (every
    dim but ``volume``) with the same sizes; the affines are not compared.

    Examples
    --------
    >>> import volnorm as vn
    >>> files = vn.datasets.nibabel_files()
    >>> data = vn.open_nifti(files["functional.nii"])
    >>> mask = open_mask(files["resampled_anat_moved.nii"], like=data)
    >>> mask.dims, mask.dtype.name, "affine" in mask.attrs
    (('z', 'y', 'x'), 'bool', True)
    >>> open_mask(files["anatomical.nii"], like=data)
    Traceback (most recent call last):
    ...
    ValueError: .../anatomical.nii: the mask's grid {'z': 25, 'y': 41, 'x': 33} is not the data's {'t': 20, 'z': 3, 'y': 21, 'x': 17}
    """
    if like is not None and not isinstance(like, xr.DataArray):
        raise TypeError(f"`like` must be an xarray.DataArray (the data the mask is for); got {type(like).__name__}.")
    m = open_nifti(path, scaled=False)
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else [os.fspath(p) for p in path]
    if isinstance(m, xr.DataTree):
        raise ValueError(f"{where}: the mask files have different shapes; masks for one dataset share its grid")
    mask = (m != 0).drop_vars([c for c in m.coords if c not in m.dims or c == "volume"])
    if mask.sizes.get("t") == 1:
        mask = mask.isel(t=0)
    n = mask.sizes["volume"]
    if n == 1:
        mask = mask.isel(volume=0)
    elif like is None:
        raise ValueError(f"{where}: {n} mask files (one per volume) need `like=`, the data they mask, to be matched to its volumes")
    elif like.sizes.get("volume", 1) != n:
        raise ValueError(
            f"{where}: {n} mask files but the data has {like.sizes.get('volume', 1)} volumes; "
            "give one mask for every volume, or one per volume"
        )
    elif "volume" in like.coords:
        mask = mask.assign_coords(volume=like["volume"].variable)
    if like is not None:
        grid = {d: s for d, s in like.sizes.items() if d != "volume"}
        own = {d: s for d, s in mask.sizes.items() if d != "volume"}
        if any(grid.get(d) != s for d, s in own.items()):
            raise ValueError(f"{where}: the mask's grid {own} is not the data's {grid}")
    attrs = {"affine": m.attrs["affine"]} if "affine" in m.attrs else {}
    return mask.rename("mask").assign_attrs(attrs)


# ---------------------------------------------------------------------------
# image stacks
# ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class _ImageFiles:
    """Picklable lazy view of many 2-D image files of one shape, stacked."""

    def __init__(self, paths: Sequence[str], shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.paths = list(paths)
        self.shape = (len(paths), *shape)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __dask_tokenize__(self) -> tuple:
        return ("volnorm-images", [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.paths])

    def __getitem__(self, key: tuple) -> np.ndarray:
        import imageio.v3 as iio

        key = key + (slice(None),) * (self.ndim - len(key))
        out = []
        for p in self.paths[key[0]]:
            img = np.asarray(iio.imread(p))
            if img.shape != self.shape[1:] or img.dtype != self.dtype:
                raise ValueError(f"{p}: shape {img.shape} {img.dtype} differs from the stack's {self.shape[1:]} {self.dtype}")
            out.append(img[key[1:]])
        return np.stack(out) if out else np.empty((0, *self.shape[1:]), self.dtype)[(slice(None), *key[1:])]


class _TiffPages:
    """Picklable lazy view of a multi-page TIFF, one page per volume."""

    def __init__(self, path: str, n: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = (n, *shape)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return ("volnorm-tiff", self.path, st.st_size, st.st_mtime_ns)

    def __getitem__(self, key: tuple) -> np.ndarray:
        import tifffile

        key = key + (slice(None),) * (self.ndim - len(key))
        idx = range(*key[0].indices(self.shape[0]))
        with tifffile.TiffFile(self.path) as tf:
            pages = [tf.pages[i].asarray()[key[1:]] for i in idx]
        return np.stack(pages) if pages else np.empty((0,) + self.shape[1:], self.dtype)[(slice(None), *key[1:])]


def open_images(paths: PathsLike, *, chunks: ChunksLike = None) -> xr.DataArray:
    """Open a 2-D image stack lazily: a 3-D ``.npy``, a multi-page TIFF, or many image files.

    Parameters
    ----------
    paths : str, path, glob or iterable
        One ``.npy`` file holding a ``(volume, y, x)`` array (memory-mapped),
        one multi-page TIFF, or a glob/folder/list of PNG/TIFF/JPEG files of one
        shape and dtype (one image per ``volume``).
    chunks : None, "auto", int, mapping or tuple
        Default: whole images, about 64 MiB per chunk.

    Returns
    -------
    xarray.DataArray
        Lazy; nothing is computed. Named ``image``, dims ``("volume", "y", "x")``
        (plus ``"channel"`` for colour images, as :mod:`volnorm.color` expects); ``volume`` holds file or page names.

    Examples
    --------
    >>> import numpy as np, tempfile, os, volnorm as vn
    >>> p = os.path.join(tempfile.mkdtemp(), "stack.npy")
    >>> np.save(p, np.zeros((5, 8, 9), dtype="uint8"))
    >>> vn.open_images(p).sizes["volume"]
    5
    """
    files = expand_paths(paths, suffixes=IMAGE_SUFFIXES + (".npy",), what="image")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: no such file")
        if f.stat().st_size == 0:
            raise ValueError(f"{f}: the file is empty (0 bytes)")
    if len(files) == 1 and files[0].suffix == ".npy":
        try:
            arr = np.load(files[0], mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{files[0]}: not a readable .npy array ({e})") from None
        if arr.ndim not in (3, 4):
            raise ValueError(f"{files[0]}: expected a 3-D (volume, y, x) array, got shape {arr.shape}")
        names = [f"{files[0].stem}[{i}]" for i in range(arr.shape[0])]
        source: Any = arr
        shape, dtype = arr.shape, arr.dtype
    elif len(files) == 1 and files[0].suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(files[0]) as tf:
                n = len(tf.pages)
                page = tf.pages[0]
                pshape, dtype = tuple(page.shape), np.dtype(page.dtype)
        except Exception as e:
            raise ValueError(f"{files[0]}: not a readable TIFF ({e})") from None
        names = [f"{files[0].stem}[{i}]" for i in range(n)]
        source = _TiffPages(str(files[0]), n, pshape, dtype)
        shape = source.shape
    else:
        import imageio.v3 as iio

        try:
            props = iio.improps(files[0])
        except Exception as e:
            raise ValueError(f"{files[0]}: not a readable image ({e})") from None
        pshape, dtype = tuple(props.shape), np.dtype(props.dtype)
        for f in files[1:]:
            try:
                p = iio.improps(f)
            except Exception as e:
                raise ValueError(f"{f}: not a readable image ({e})") from None
            if tuple(p.shape) != pshape or np.dtype(p.dtype) != dtype:
                raise ValueError(
                    f"{f}: image shape {tuple(p.shape)} {np.dtype(p.dtype)} differs from "
                    f"{files[0]}'s {pshape} {dtype}; a stack needs one shape and dtype"
                )
        names = [f.stem for f in files]
        source = _ImageFiles([str(f) for f in files], pshape, dtype)
        shape = source.shape
    dims = ("volume", "y", "x", "channel")[: len(shape)]
    if dtype.kind not in "uif" and dtype != np.bool_:
        raise ValueError(f"{files[0]}: unsupported dtype {dtype}")
    cshape = normalize_chunks(chunks, dims, shape, dtype.itemsize)
    data = da.from_array(source, chunks=cshape, meta=np.empty((0,) * len(shape), dtype=dtype), fancy=False)
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return xr.DataArray(data, dims=dims, coords={"volume": np.array(names, dtype=object)}, name="image")


# ---------------------------------------------------------------------------
# volnorm stores
# ---------------------------------------------------------------------------


def _scale_block(block: np.ndarray, slope: float, inter: float, dtype: np.dtype) -> np.ndarray:
    return np.asarray(apply_scaling(block, slope, inter), dtype=dtype)


def open_zarr(
    store: str | os.PathLike,
    *,
    scaled: bool = True,
    allow_incomplete: bool = False,
    level: int = 0,
    group: str | None = None,
    storage_options: dict | None = None,
) -> xr.DataArray | xr.DataTree:
    """Open a volnorm Zarr store lazily as a stack or a collection.

    Parameters
    ----------
    store : path or URL
        A store written by :func:`to_zarr` or :func:`convert`: a local path, or an object-store
        URL (``s3://bucket/cohort.zarr``; :mod:`volnorm.io.location`).
    scaled : bool
        Apply each volume's NIfTI ``scl_slope``/``scl_inter`` as nibabel does
        (default) or return the stored raw values.
    allow_incomplete : bool
        Open a store that lacks the completion marker (for inspection only;
        reading an unwritten chunk raises :class:`~volnorm.integrity.DamagedStoreError`).
    level : int
        The resolution level to read (``to_zarr(..., levels=N)``): 0 (default) is the data
        as written; level ``k`` halves ``x``, ``y``, ``z`` ``k`` times (each axis down to 1).
        Its ``attrs`` describe that level: ``zooms`` and ``affine`` (level-``k`` voxel
        centres to the same world positions), ``nifti_headers`` with the level's shape,
        voxel sizes and qform/sform (so :func:`to_nifti` writes a correct file), ``level``.
    group : str, optional
        Read the volumes of a group written beside them (``to_zarr(..., beside=)``, a spec's
        ``n4: {field: NAME}``: the bias fields) instead: ``NAME/<volume>``, the same volume
        names, each with its own header.
    storage_options : dict, optional
        fsspec options for a URL (credentials, ``client_kwargs={"endpoint_url": ...}``,
        ``anon=True``); by default the standard AWS variables and files (``AWS_ENDPOINT_URL``).

    Returns
    -------
    xarray.DataArray or xarray.DataTree
        Lazy; nothing is computed. Same shapes and attrs as :func:`open_nifti`.

    Raises
    ------
    IncompleteStoreError
        The store was not completely written (an interrupted run): re-run the
        command that wrote it to finish it.
    DamagedStoreError
        When computed: a chunk is missing or fails its CRC-32C (the message names
        the chunk; ``volnorm verify`` lists all).
    ValueError
        ``level`` is not a level of every volume (the message names the volume and the
        levels it has); ``group`` is not a group the store holds beside its volumes.

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "anat.zarr")
    >>> vn.to_zarr(vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"]), out)
    >>> vn.open_zarr(out).sizes["z"]
    25
    """
    try:
        return _open_zarr(location(store, storage_options), scaled=scaled, allow_incomplete=allow_incomplete, level=level, group=group)
    except RecursionError:  # json of a hostile or damaged zarr.json, anywhere in the store
        raise ValueError(f"{store}: metadata nested too deeply to be a volnorm store's (damaged or not volnorm's)") from None


def _open_zarr(path: Path | Remote, *, scaled: bool, allow_incomplete: bool, level: int = 0, group: str | None = None) -> xr.DataArray | xr.DataTree:
    import zarr

    if not isinstance(level, int) or isinstance(level, bool) or level < 0:
        raise ValueError(f"{path}: `level` must be a resolution level, an integer >= 0; got {level!r}")

    if not path.exists():
        staged = None if isinstance(path, Remote) else staging_path(path.absolute())
        if staged is not None and staged.exists():
            raise IncompleteStoreError(
                f"{path}: the store is incomplete: an interrupted run is staged at {staged}; "
                "re-run the same command to finish it."
            )
        raise FileNotFoundError(f"{path}: no such store")
    m = read_manifest(path)
    if m is None:
        raise ValueError(f"{path}: not a volnorm store (no volnorm manifest in its zarr.json)")
    if not m.get("complete") and not allow_incomplete:
        raise IncompleteStoreError(
            f"{path}: the store is incomplete (no completion marker: the run that wrote it was "
            "interrupted or is still running). Re-run the command to finish it, or pass "
            "allow_incomplete=True to inspect it."
        )
    store_ = checked_store(path)  # every chunk read is checked: missing or failing its CRC-32C is an error naming it
    root = zarr.open_group(store_, mode="r", zarr_format=3)
    if group is not None and group not in (m.get("beside") or []):
        have = ", ".join(m.get("beside") or []) or "none"
        raise ValueError(f"{path}: no group {group!r} beside the volumes (groups beside them: {have})")
    if m.get("kind") == "images":
        if level:
            raise ValueError(f"{path}: an image stack has no pyramid (level 0 only); got level={level}")
        ds = xr.open_zarr(store_, zarr_format=3, decode_cf=False, mask_and_scale=False, consolidated=False)
        arr = ds["image"]
        arr.attrs = {k: v for k, v in arr.attrs.items() if k != "_FillValue"}
        return arr
    names = list(m.get("volumes") or [k for k, _ in root.groups()])
    if group is not None:  # a group beside the volumes: the same names, one level down
        root, path = root[group], path / group
    vols = []
    for name in names:
        if name not in root:
            raise IncompleteStoreError(f"{path}: the manifest lists volume {name!r} but the store lacks it")
        grp = root[name]
        check_volume(grp, f"{path}/{name}", allow_incomplete=allow_incomplete)
        hb = group_header(grp)
        paths = level_paths(grp)
        if level >= len(paths) or paths[level] not in grp:
            have = f"levels 0..{len(paths) - 1}" if len(paths) > 1 else "level 0 only (no pyramid)"
            raise ValueError(f"{path}/{name}: no resolution level {level}; the volume has {have} "
                             f"(write the store with levels={level + 1} or more: `volnorm convert --levels`)")
        arr = grp[paths[level]]
        dims = tuple(arr.metadata.dimension_names)
        affine = np.asarray(header_from_bytes(hb).get_best_affine(), dtype=np.float64)
        if level:  # the level's own header and affine (level-k voxel centres at the same world positions)
            factors = _factors(grp, level, dims)
            hb, affine = level_header(hb, arr.shape, factors, dims), level_affine(affine, factors, dims)
        hdr = header_from_bytes(hb)
        slope, inter = (float(hdr["scl_slope"]), float(hdr["scl_inter"]))
        if slope == 0 or not np.isfinite(slope):
            slope, inter = 1.0, 0.0
        vols.append((name, grp, arr, dims, hb, hdr, slope if scaled else 1.0, inter if scaled else 0.0, affine))
    if not vols:
        raise ValueError(f"{path}: the store holds no volume")

    def lazy(arr: Any, slope: float, inter: float, dtype: np.dtype) -> da.Array:
        raw = da.from_zarr(arr)
        if (slope, inter) == (1.0, 0.0) and raw.dtype == dtype:
            return raw
        return raw.map_blocks(_scale_block, slope, inter, dtype, dtype=dtype, meta=np.empty((0,) * raw.ndim, dtype))

    def attrs_for(sub: list) -> dict:
        first_hdr = sub[0][5]
        affines = [v[8] for v in sub]
        out: dict[str, Any] = {
            "zooms": tuple(float(z) for z in first_hdr.get_zooms()),
            "units": tuple(first_hdr.get_xyzt_units()),
            "nifti_scaled": bool(scaled),
            "nifti_headers": HeaderMap({v[0]: v[4] for v in sub}),
            "store": str(path),
        }
        if level:
            out["level"] = level
        if all(np.array_equal(a, affines[0]) for a in affines):
            out["affine"] = affines[0].tolist()
        return out

    shapes = {v[2].shape for v in vols}
    if len(shapes) == 1 and len({v[3] for v in vols}) == 1:
        dtypes = [scaled_dtype(v[2].dtype, v[6], v[7]) for v in vols]
        dtype = np.result_type(*dtypes)
        arrays = [lazy(v[2], v[6], v[7], dtype) for v in vols]
        data = da.stack(arrays)
        return xr.DataArray(
            data, dims=("volume", *vols[0][3]), coords={"volume": names}, name="image", attrs=attrs_for(vols)
        )
    nodes = {}
    for v in vols:
        dtype = scaled_dtype(v[2].dtype, v[6], v[7])
        a = xr.DataArray(lazy(v[2], v[6], v[7], dtype), dims=v[3], name="image", attrs=attrs_for([v]))
        nodes[v[0]] = xr.Dataset({"image": a}, attrs=a.attrs)
    return xr.DataTree.from_dict(nodes)


def _factors(grp: Any, level: int, dims: Sequence[str]) -> tuple[int, ...]:
    """A level's factor per dim, from the group's OME-Zarr scales (level ``k`` over level 0)."""
    sets = grp.attrs["ome"]["multiscales"][0]["datasets"]

    def scale(k: int) -> list[float]:
        return next(t["scale"] for t in sets[k]["coordinateTransformations"] if t["type"] == "scale")

    return tuple(int(round(b / a)) if a else 1 for a, b in zip(scale(0), scale(level)))

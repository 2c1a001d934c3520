"""Per-voxel histograms in a store: written beside the images, appendable subject by subject.

``vn.accumulate(store, volumes, bins=..., range=...)`` counts the volumes' values voxel by
voxel (:func:`volnorm.histogram` with ``dim="volume"``) into a group of the store
(``voxel_histogram`` by default): the counts ``(..., bin)`` in the smallest dtype that
holds the number of volumes, the out-of-range / NaN counters per voxel, the bin edges,
the grid (affine, shape) and the inputs already counted. Calling it again with new
volumes adds their counts to the stored ones without reading the old inputs again, and
refuses inputs already counted, another grid or other bins. The new version is written
beside the old one and swapped in by a rename, so an interrupted call leaves the previous
histogram intact. At an object-store URL nothing can be renamed: the group is written in
place, its format marker last (:func:`accumulate`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._histogram import (
    BinSpec,
    bin_spec,
    count_dtype,
    histogram_with,
    merge_histograms,
)
from volnorm._kernels import EXTRA as EXTRA_NAMES
from volnorm._utils import plain_name
from volnorm.engine import compute
from volnorm.integrity import checked_store, seal
from volnorm.io.location import Remote, location
from volnorm.io.nifti import header_from_bytes
from volnorm.io.objectstore import LeaseLock
from volnorm.io.readers import open_nifti
from volnorm.io.store import encoding, now, pid_alive, read_attributes, read_manifest, versions

__all__ = ["accumulate", "open_voxel_histogram"]

#: Format marker of the group's attrs.
FORMAT = "volnorm-voxel-histogram/1"
#: The marker of a group at a URL while it is written (in place, the marker last).
WRITING = FORMAT + "/incomplete"


def _grid(stack: xr.DataArray) -> dict[str, Any]:
    """The spatial grid of a stack: dims, sizes and (when known) one affine for every volume."""
    spatial = [d for d in stack.dims if d != "volume"]
    grid: dict[str, Any] = {"dims": spatial, "shape": [int(stack.sizes[d]) for d in spatial]}
    headers = stack.attrs.get("nifti_headers")
    if "affine" in stack.attrs:
        grid["affine"] = np.asarray(stack.attrs["affine"], dtype=np.float64).tolist()
    elif isinstance(headers, dict) and headers:
        affines = {n: header_from_bytes(hb).get_best_affine() for n, hb in headers.items()}
        first = next(iter(affines))
        odd = [n for n, a in affines.items() if not np.allclose(a, affines[first])]
        raise ValueError(
            f"the volumes are not on one grid: the affine of {odd[:5]} differs from {first!r}'s "
            "(register them to one space first)"
        )
    return grid


def _inputs(stack: xr.DataArray) -> list[dict[str, Any]]:
    """Each volume's name and source file: its ``path`` coord (NIfTI files), or the source the
    store's manifest records (a volnorm store), so one file is known however it comes."""
    names = [str(v) for v in stack["volume"].values] if "volume" in stack.coords else [f"vol-{i:04d}" for i in range(stack.sizes["volume"])]
    if "path" in stack.coords:
        paths: list[str | None] = [str(Path(str(p)).resolve()) for p in stack["path"].values]
    else:
        manifest = read_manifest(stack.attrs["store"]) if stack.attrs.get("store") else None
        recorded = {i.get("name"): i for i in (manifest or {}).get("inputs", []) if isinstance(i, dict)}
        paths = [str(Path(recorded[n]["path"]).resolve()) if recorded.get(n, {}).get("path") else None for n in names]
    return [{"name": n, "path": p} for n, p in zip(names, paths)]


def _as_stack(volumes: Any) -> xr.DataArray:
    if isinstance(volumes, (str, os.PathLike, list, tuple)):
        volumes = open_nifti(volumes)
    if isinstance(volumes, xr.DataTree):
        shapes = {n.name: tuple(n["image"].shape) for n in volumes.subtree if "image" in n.ds.data_vars}
        raise ValueError(f"the volumes are not on one grid (shapes {shapes}): register them to one space first")  # noqa: TRY004 - a grid problem
    if not isinstance(volumes, xr.DataArray) or "volume" not in volumes.dims:
        raise TypeError("`volumes` must be NIfTI paths or a stack (an xarray.DataArray with a `volume` dim)")
    if volumes.dims[0] != "volume":
        volumes = volumes.transpose("volume", ...)
    return volumes


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One writer per histogram group: a lock file created exclusively (a dead owner's is taken over)."""
    lock = path.parent / f".{path.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                raise RuntimeError(f"{path}: another process ({pid}) is adding to this histogram") from None
            lock.unlink(missing_ok=True)
    else:  # pragma: no cover - a race lost twice
        raise RuntimeError(f"{path}: could not take the lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def open_voxel_histogram(store: str | os.PathLike, name: str = "voxel_histogram", *, storage_options: dict | None = None) -> xr.DataArray:
    """Open a stored per-voxel histogram lazily, as :func:`volnorm.histogram` returns it.

    ``attrs`` hold the grid (``dims``, ``shape``, ``affine``), ``n_volumes``, the
    ``inputs`` counted (name and source file of each volume) and the ``history`` of
    the calls that added them (time, versions).

    Parameters
    ----------
    store : str or os.PathLike
        The directory holding the histogram (as given to :func:`accumulate`), or a URL.
    name : str
        The histogram's Zarr group in ``store``.
    storage_options : dict, optional
        fsspec options of a URL (default: the AWS environment variables and config files).

    Returns
    -------
    xarray.DataArray
        Lazy counts named ``histogram``: the voxel dims plus ``bin``, with the ``bin``,
        ``bin_lower``, ``bin_upper`` and ``n_*`` coords and the ``attrs`` above.

    Examples
    --------
    >>> import os, tempfile, volnorm as vn
    >>> d = tempfile.mkdtemp()
    >>> x = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> vn.accumulate(os.path.join(d, "h.zarr"), x, bins=16, range=(0, 300))   # doctest: +ELLIPSIS
    <xarray.DataArray ...
    >>> h = vn.open_voxel_histogram(os.path.join(d, "h.zarr"))
    >>> h.sizes["bin"], h.attrs["n_volumes"]
    (16, 1)
    """
    path = location(store, storage_options) / name
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"{path}: no per-voxel histogram here (vn.accumulate writes one)")

    ds = xr.open_zarr(checked_store(path), consolidated=False, zarr_format=3)  # chunks checked on read
    if ds.attrs.get("format") == WRITING:
        raise ValueError(f"{path}: an incomplete per-voxel histogram (its writer did not finish); run vn.accumulate again")
    if ds.attrs.get("format") != FORMAT:
        raise ValueError(f"{path}: not a volnorm per-voxel histogram (format {ds.attrs.get('format')!r})")
    h = ds["counts"]
    h = h.assign_coords({f"n_{k}": ds[f"n_{k}"] for k in EXTRA_NAMES})
    h.attrs = dict(ds.attrs)
    return h.rename("histogram")


def _spec_of(h: xr.DataArray) -> BinSpec:
    lower, upper, centers = (np.asarray(h[c].values, dtype=np.float64) for c in ("bin_lower", "bin_upper", "bin"))
    if h.attrs["bin_kind"] == "int":
        return BinSpec("int", int(h.attrs["bin_lo"]), len(centers), np.empty(0), lower, upper, centers)

    edges = np.concatenate([lower, upper[-1:]])
    return BinSpec("float", 0, len(centers), edges, lower, upper, centers, min(_kernels.edge_slack(edges), 0.5))


def _regular(h: xr.DataArray) -> xr.DataArray:
    """Chunks zarr can store: the first chunk size of each dim everywhere; ``bin`` whole."""
    return h.chunk({d: (-1 if d == "bin" else h.chunksizes[d][0]) for d in h.dims})


def accumulate(
    store: str | os.PathLike,
    volumes: Any,
    *,
    bins: int | None = None,
    range: tuple[float, float] | None = None,
    mask: xr.DataArray | None = None,
    name: str = "voxel_histogram",
    progress: bool = False,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> xr.DataArray:
    """Add volumes' per-voxel histograms to the one stored in ``store`` (created on first use).

    Parameters
    ----------
    store : path or URL
        A directory (a volnorm store of the images, or any other): the histogram is the
        Zarr group ``store/name``. Or an object-store URL (``s3://...``): there nothing can be
        renamed, so the group is written in place with its format marker last (readers refuse
        it until then), one writer at a time (a leased lock object, as for stores), and a
        histogram at a URL is created or replaced (``overwrite=True``; the old one is deleted
        first), not appended to.
    volumes : NIfTI paths / glob, or a stack ``("volume", ...)``
        On one grid: the same spatial shape and, when known, the same affine.
    bins : int, optional
        The number of bins, as for :func:`volnorm.histogram`, when the histogram is
        created; when appending it must be omitted or equal the stored one.
    range : (lo, hi), optional
        The bins' range when the histogram is created (needed then for float data, so
        that later volumes share the bins); when appending, omitted or the stored one.
    mask : xarray.DataArray of bool, optional
        Voxels to count (broadcast to the stack); others are counted in ``n_masked_out``.
    name : str
        The group's name: a plain name (no ``/``, ``..``, leading ``.``), not a volume of the store.
    progress : bool
        Show a progress bar while counting and writing.
    overwrite : bool
        Start a new histogram from ``volumes`` alone instead of adding to the stored one. Only a
        volnorm per-voxel histogram is ever replaced, and (on disk) only once the new one is
        complete; anything else at ``store/name`` is refused.
    storage_options : dict, optional
        fsspec options of a URL ``store`` (default: the AWS environment variables and files).

    Returns
    -------
    xarray.DataArray
        The stored histogram, opened lazily (:func:`open_voxel_histogram`).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn, tempfile
    >>> d = tempfile.mkdtemp()
    >>> a = xr.DataArray(np.zeros((2, 3)), dims=("volume", "x"), coords={"volume": ["s1", "s2"]})
    >>> b = xr.DataArray(np.ones((1, 3)), dims=("volume", "x"), coords={"volume": ["s3"]})
    >>> h = vn.accumulate(d, a, bins=2, range=(0, 1))
    >>> h = vn.accumulate(d, b)            # adds s3; the old counts are not recomputed
    >>> h.values.tolist(), h.attrs["n_volumes"]
    ([[2, 1], [2, 1], [2, 1]], 3)
    """
    import zarr

    root = location(store, storage_options)
    plain_name(name, "name", taken=(read_manifest(root) or {}).get("volumes") or ())
    target = root / name
    stack = _as_stack(volumes)
    grid = _grid(stack)
    new_inputs = _inputs(stack)
    remote = isinstance(root, Remote)
    if remote:
        root.check_bucket()
    else:
        root.mkdir(parents=True, exist_ok=True)
    with LeaseLock(root / f".{name}.volnorm-lock", str(target)) if remote else _lock(target):
        if not remote:
            _recover(target)
        kind = _histogram_kind(target)
        if kind == "other":
            raise FileExistsError(f"{target}: exists and is not a volnorm per-voxel histogram; volnorm never replaces it (choose another name)")
        if remote and kind == FORMAT and not overwrite:
            raise ValueError(f"{target}: adding to a per-voxel histogram at a URL is not supported (nothing can be renamed there, "
                             "and the old counts must stay readable until the new ones are complete); pass overwrite=True to "
                             "replace it, or accumulate into a local store")
        old = open_voxel_histogram(root, name) if kind == FORMAT else None
        replaced = old is not None and overwrite
        if replaced:
            old = None
        if old is None:
            if stack.dtype.kind == "f" and range is None:
                raise ValueError("float data: pass `range=` when the histogram is created, so that later volumes share its bins")
            spec = bin_spec(stack, stack.dtype, bins, range, mask)
            inputs: list[dict] = []
            n_old = 0
        else:
            _check_append(old, stack, grid, new_inputs, bins, range, target)
            spec = _spec_of(old)
            inputs = list(old.attrs["inputs"])
            n_old = int(old.attrs["n_volumes"])
        new = histogram_with(stack, spec, "volume", mask)
        n = n_old + stack.sizes["volume"]
        dt = count_dtype(n)  # merge_histograms widens for any sum; n bounds this one
        extras = [f"n_{k}" for k in EXTRA_NAMES]
        total = new if old is None else merge_histograms([new, old]).chunk(old.chunksizes)
        total = _regular(total.astype(dt).assign_coords({c: total[c].astype(dt) for c in extras}))
        ds = xr.Dataset({"counts": total.drop_vars(extras)} | {c: total[c] for c in extras})
        ds.attrs = {
            "format": FORMAT,
            "grid": grid,
            "bin_kind": spec.kind,
            "bin_lo": int(spec.lo),
            "n_volumes": n,
            "inputs": inputs + new_inputs,
            "source_dtype": str(stack.dtype),
            "history": (list(old.attrs.get("history", [])) if old is not None else [])
            + [{"added": len(new_inputs), "time": now(), "versions": versions()}],
        }
        if remote:
            _write_in_place(target, ds, progress)
            return open_voxel_histogram(root, name)
        staging = root / f".{name}.partial-{uuid.uuid4().hex[:8]}"
        retired = root / f".{name}.old-{uuid.uuid4().hex[:8]}"
        ds.attrs["arrays"] = {}  # the inventory, below, once every chunk is on disk
        try:
            # every chunk stored (an all-zero count chunk too: a missing one is damage) with its checksum
            delayed = ds.to_zarr(staging, mode="w-", zarr_format=3, compute=False, consolidated=False,
                                 encoding=encoding(ds), write_empty_chunks=True)
            compute(delayed, progress=progress)
            # before the swap: no temporary inside, every chunk present, the inventory recorded
            zarr.open_group(staging, mode="r+", zarr_format=3).attrs["arrays"] = seal(staging)
            if old is not None or replaced:
                os.rename(target, retired)
            os.rename(staging, target)
        except BaseException:
            if retired.exists() and not target.exists():  # put the previous version back
                os.rename(retired, target)
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        if retired.exists():
            shutil.rmtree(retired)
    return open_voxel_histogram(root, name)


def _histogram_kind(target: Path | Remote) -> str | None:
    """What is at ``target``: None (nothing), :data:`FORMAT` (a complete volnorm histogram),
    :data:`WRITING` (one at a URL whose writer did not finish: replaced), or ``"other"``."""
    if isinstance(target, Remote):
        if not target.is_prefix():
            return None
        try:
            fmt = json.loads((target / "zarr.json").read_bytes()).get("attributes", {}).get("format")
        except (OSError, ValueError):
            fmt = None
        return fmt if fmt in (FORMAT, WRITING) else "other"
    if not (target.exists() or target.is_symlink()):
        return None
    return FORMAT if _is_voxel_histogram(target) else "other"


def _write_in_place(target: Remote, ds: xr.Dataset, progress: bool) -> None:
    """Write ``ds`` as the group at ``target`` (a URL): whatever volnorm histogram is there is
    deleted first; the group says :data:`WRITING` until every chunk is written and listed, then
    :data:`FORMAT` with the inventory (one PUT of its ``zarr.json``, the last)."""
    import zarr

    target.remove_tree()
    ds = ds.assign_attrs(format=WRITING)
    store = target.zarr_store(read_only=False)
    # "w": the prefix holds nothing of anyone else (checked under the lock); SeaweedFS still
    # lists the folders of the objects just deleted, which "w-" takes for data (and zarr warns
    # about, as members it does not recognize, while it clears them)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized as a component of a Zarr hierarchy")
        delayed = ds.to_zarr(store, mode="w", zarr_format=3, compute=False, consolidated=False, encoding=encoding(ds), write_empty_chunks=True)
    compute(delayed, progress=progress)
    inventory = seal(target)
    zarr.open_group(target.zarr_store(read_only=False), mode="r+", zarr_format=3).attrs.update({"arrays": inventory, "format": FORMAT})


def _is_voxel_histogram(path: Path) -> bool:
    """Whether ``path`` is a group volnorm's :func:`accumulate` wrote (its format marker)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        attrs = read_attributes(path)
    except ValueError:  # nested too deeply: not one volnorm wrote
        return False
    return attrs is not None and attrs.get("format") == FORMAT


def _recover(target: Path) -> None:
    """A process killed between the two renames of :func:`accumulate` left the previous
    version as ``.NAME.old-*`` and no ``NAME``: put it back (under the lock). Only volnorm's
    own histograms are moved or removed; a killed writer's ``.NAME.partial-*`` too."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        if _is_voxel_histogram(partial):
            shutil.rmtree(partial)
    olds = sorted((p for p in target.parent.glob(f".{target.name}.old-*") if _is_voxel_histogram(p)), key=lambda p: p.stat().st_mtime)
    if target.exists() or target.is_symlink():
        for stale in olds:
            shutil.rmtree(stale)
        return
    if olds:
        os.rename(olds[-1], target)


def _check_append(old: xr.DataArray, stack: xr.DataArray, grid: dict, new_inputs: list[dict], bins: Any, range: Any, where: Path) -> None:
    g = old.attrs["grid"]
    if grid["dims"] != g["dims"] or grid["shape"] != g["shape"]:
        raise ValueError(f"{where}: the new volumes' grid {dict(zip(grid['dims'], grid['shape']))} is not the histogram's "
                         f"{dict(zip(g['dims'], g['shape']))}: register them to its space first")
    if "affine" in g and "affine" in grid and not np.allclose(g["affine"], grid["affine"]):
        raise ValueError(f"{where}: the new volumes' affine differs from the histogram's: register them to its space first")
    kind = "int" if stack.dtype.kind in "iub" else "float"
    if kind != old.attrs["bin_kind"] and old.attrs["bin_kind"] == "int":
        raise ValueError(f"{where}: the histogram counts integer values one bin per value; the new volumes are {stack.dtype}")
    lower, upper = old["bin_lower"].values, old["bin_upper"].values
    if bins is not None and int(bins) != len(lower):
        raise ValueError(f"{where}: the histogram has {len(lower)} bins; got bins={bins} (omit bins= when appending)")
    if range is not None and old.attrs["bin_kind"] == "float" and not np.allclose([float(range[0]), float(range[1])], [lower[0], upper[-1]]):
        raise ValueError(f"{where}: the histogram's range is ({lower[0]}, {upper[-1]}); got range={tuple(range)} (omit range= when appending)")
    seen_paths = {i["path"] for i in old.attrs["inputs"] if i.get("path")}
    seen_names = {i["name"] for i in old.attrs["inputs"]}
    dup = [i["path"] or i["name"] for i in new_inputs if (i["path"] and i["path"] in seen_paths) or (not i["path"] and i["name"] in seen_names)]
    if dup:
        raise ValueError(f"{where}: already counted: {dup[:5]}{' ...' if len(dup) > 5 else ''} (adding an input twice would count it twice)")
    if math.prod(grid["shape"]) == 0:
        raise ValueError(f"{where}: the volumes are empty")

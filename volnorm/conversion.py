"""``convert``: a NIfTI cohort (or an image stack) into one volnorm Zarr store."""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zarr

from volnorm._utils import format_bytes, normalize_chunks
from volnorm.engine import check_address, check_scheduler, progress_bar, running
from volnorm.io.nifti import NiftiError, NiftiInfo, expand_paths, is_nifti_path, read_info
from volnorm.io.niftizarr import header_json, ingest_nifti
from volnorm.io.pyramid import auto_downsample, check_downsample, level_factors
from volnorm.io.readers import open_images, unique_names
from volnorm.io.location import is_url
from volnorm.io.objectstore import RemoteStaging, staging_for
from volnorm.io.store import DEFAULT_CODEC, IncompleteStoreError, Staging, read_manifest
from volnorm.io.writers import to_zarr

logger = logging.getLogger(__name__)


@dataclass
class ConvertResult:
    """What :func:`convert` did; ``print()`` it for a summary."""

    store: Path | Any  # a Path, or a volnorm.io.location.Remote for a URL
    volumes: list[dict] = field(default_factory=list)
    bytes_in: int = 0
    seconds: float = 0.0
    resumed: int = 0
    engine: str = ""

    def __str__(self) -> str:
        rate = self.bytes_in / self.seconds / 1e6 if self.seconds else float("nan")
        lines = [
            f"volnorm store: {self.store}",
            f"  {len(self.volumes)} volumes, {format_bytes(self.bytes_in)} of voxels in "
            f"{self.seconds:.1f} s ({rate:.0f} MB/s) on {self.engine}"
            + (f"; {self.resumed} already done by an interrupted run" if self.resumed else ""),
        ]
        width = max(len(v["name"]) for v in self.volumes) if self.volumes else 4
        lines.append(f"  {'volume':<{width}}  {'shape':<22} {'dtype':<8} {'min (raw)':>10} {'max (raw)':>10}  non-finite")
        for v in self.volumes[:20]:
            s = v.get("stats", {})
            bad = s.get("nan", 0) + s.get("posinf", 0) + s.get("neginf", 0)
            lines.append(
                f"  {v['name']:<{width}}  {str(tuple(v['shape'])):<22} {s.get('dtype', ''):<8} "
                f"{_num(s.get('min')):>10} {_num(s.get('max')):>10}  {bad if bad else '-'}"
            )
        if len(self.volumes) > 20:
            lines.append(f"  ... and {len(self.volumes) - 20} more")
        return "\n".join(lines)


def _num(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


#: errno values that mean the output cannot be written (disk full, quota, read-only file system)
_WRITE_ERRNOS = frozenset(
    e for e in (getattr(errno, n, None) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS")) if e is not None
)


class OutputWriteError(OSError):
    """The output could not be written (disk full, quota exceeded, read-only file system).

    ``errno`` is the cause's; the message names the path being written and
    what happened to the output (not created, or the existing store kept).
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def _is_write_error(e: BaseException, staging: Staging) -> bool:
    """Whether ``e`` is a failure to write the output rather than a problem of an input."""
    if isinstance(e, OutputWriteError):
        return True
    if not isinstance(e, OSError) or isinstance(e, NiftiError):
        return False
    if e.errno in _WRITE_ERRNOS:
        return True
    name = getattr(e, "filename", None)
    if name is None:
        return False
    try:
        p = Path(os.fsdecode(name)).absolute()
    except (TypeError, ValueError):
        return False
    return p == staging.path or staging.path in p.parents


def _describe_write_error(e: OSError, staging: Staging, source: Path | None = None) -> str:
    """``PATH: cannot write the new store: CAUSE (...)`` for an output write failure.

    An OSError from ``write()`` carries no file name (ENOSPC says only "No
    space left on device"), so the staging directory being written is named.

    >>> from volnorm.io.store import Staging
    >>> st = Staging(Path("/data/out.zarr"), {})
    >>> _describe_write_error(OSError(errno.ENOSPC, "No space left on device"), st)
    '/data/.out.zarr.volnorm-partial: cannot write the new store: no space left on device'
    """
    cause = os.strerror(e.errno).lower() if e.errno else (e.strerror or str(e))
    details = []
    if source is not None:
        details.append(f"converting {source}")
    name = getattr(e, "filename", None)
    if name is not None:
        details.append(f"writing {os.fsdecode(name)}")
    return f"{staging.path}: cannot write the new store: {cause}" + (f" ({'; '.join(details)})" if details else "")


def _output_fate(staging: Staging, store: Any, existed: bool) -> str:
    """What became of the output after a failed run, checked on disk, not assumed."""

    final = staging.final
    if isinstance(staging, RemoteStaging):  # written in place: say what the marker says now
        m = read_manifest(final)
        if m is None:
            return f"the output {store} was not created"
        if m.get("complete"):
            return f"the existing store {store} was kept unchanged"
        return f"the store {store} is incomplete (readers refuse it); nothing was committed"
    if existed:
        if read_manifest(final) is not None:
            return f"the existing store {store} was kept unchanged (it is replaced only once the new one is complete)"
        old = final.parent / f".{final.name}.volnorm-old"
        if read_manifest(old) is not None:
            return f"the existing store was moved to {old} and the new one not put in place; move it back to {final}"
        return f"the existing store {store} is gone"  # pragma: no cover - only if someone else removed it
    return f"the output {store} was not created"


def validate_inputs(paths: Sequence[Path]) -> list[NiftiInfo]:
    """Validate every file (in parallel threads); one error lists every bad file."""
    def check(p: Path) -> NiftiInfo | BaseException:
        try:
            return read_info(p)
        except (OSError, ValueError) as e:
            return e

    with ThreadPoolExecutor(max_workers=min(16, len(paths))) as ex:
        results = list(ex.map(check, paths))
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        if len(errors) == 1:
            raise errors[0]
        msg = "\n".join(f"  {e}" for e in errors)
        raise NiftiError(f"{len(errors)} of {len(paths)} inputs are invalid; nothing was written:\n{msg}")
    return results  # type: ignore[return-value]


def convert(
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    store: str | os.PathLike,
    *,
    chunks: int | str | Mapping[str, int] | Sequence[int] | None = None,
    overwrite: bool = False,
    codec: str | Any = DEFAULT_CODEC,
    scheduler: Any = None,
    progress: bool | None = None,
    steps: list | None = None,
    allow_insecure: bool = False,
    levels: int = 1,
    downsample: str | None = None,
    storage_options: dict | None = None,
) -> ConvertResult:
    """Convert NIfTI files (or image files) into one volnorm Zarr store.

    Every input is validated before anything is written (header sanity, byte
    count vs file size, gzip trailer). Each file is then read exactly once,
    sequentially, on the dask cluster: a .nii.gz is streamed through ISA-L's
    gzip with its CRC checked, the file's SHA-256 is taken on the way, and
    whole chunks are written as they fill. Work goes into a staging directory
    beside ``store``; the store appears only when every volume is verified.
    Re-running an interrupted conversion resumes it.

    Parameters
    ----------
    inputs : path, glob, directory or iterable of them
        ``.nii``/``.nii.gz`` files; or image files / ``.npy`` / multi-page
        TIFF for a 2-D image stack.
    store : path or URL
        Output directory or object-store URL (see :func:`to_zarr` for the overwrite rules and
        the commit protocol on object storage).
    chunks : None, int (MiB), mapping or tuple
        Chunking of each volume; default whole-plane slabs of ~64 MiB.
    overwrite : bool
        Replace an existing volnorm store once the new one is complete.
    codec : {"lz4", "zstd", "zarr-default", "none"} or a zarr codec
        Compression (default blosc-lz4 + shuffle, measured fastest to write).
    scheduler : None, "local", "threads", "sync", address or distributed.Client
        Where to run (:func:`volnorm.engine.running`'s words); default: the engine of an
        enclosing ``running`` block, else the active ``distributed`` client, else
        ``$VOLNORM_SCHEDULER``, else an embedded local cluster on 127.0.0.1.
    progress : bool, optional
        Progress bar; default: when stderr is a terminal.
    steps : list, optional
        Processing steps to record in the provenance.
    allow_insecure : bool
        Allow a plain ``tcp://`` scheduler on another machine (refused by default, before
        anything is read or written: :func:`volnorm.engine.check_address`).
    levels : int
        Resolution levels of each volume, level 0 included (default 1: no pyramid), as
        :func:`to_zarr`'s: OME-Zarr 0.5 multiscale levels for napari and neuroglancer. The
        conversion task of each file makes them from the level 0 it has just written (the
        file is still read once), before the volume is marked complete.
    downsample : {"mean", "mode"}, optional
        ``"mean"`` for images, ``"mode"`` for label and mask files. Default: ``"mode"`` for
        files whose NIfTI intent is a label image (``intent_code`` 1002/1003), else ``"mean"``.
    storage_options : dict, optional
        fsspec options for every URL among ``inputs`` and ``store`` (``s3://...``; by default
        the standard AWS variables and files, ``AWS_ENDPOINT_URL`` included). Inputs and output
        in stores with different credentials: give :class:`volnorm.io.location.Remote` objects,
        each with its own options.

    Returns
    -------
    ConvertResult
        Computes: one read of every input. ``print(result)`` gives a summary.

    Examples
    --------
    >>> import volnorm as vn, tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "cohort.zarr")
    >>> files = vn.datasets.nibabel_files()
    >>> res = vn.convert([files["anatomical.nii"], files["functional.nii"]], out, scheduler="sync")
    >>> len(res.volumes)
    2
    """
    t0 = time.perf_counter()
    if scheduler is not None:  # the one rule, before anything exists on disk
        check_scheduler(scheduler, "scheduler")
        check_address(scheduler, allow_insecure=allow_insecure)
    check_downsample(downsample, levels)
    files = expand_paths(inputs, suffixes=(".nii", ".nii.gz", ".png", ".tif", ".tiff", ".npy", ".jpg"), what="input",
                         storage_options=storage_options)
    if progress is None:
        progress = sys.stderr.isatty()
    if not all(is_nifti_path(f) for f in files):
        if any(is_nifti_path(f) for f in files):
            raise ValueError("inputs mix NIfTI and image files; convert them into separate stores")
        data = open_images(files, chunks=chunks)
        with running(scheduler, allow_insecure=allow_insecure) as eng:
            to_zarr(data, store, overwrite=overwrite, codec=codec, steps=steps, progress=progress, levels=levels,
                    storage_options=storage_options if is_url(store) else None)
        vol = {"name": "image", "shape": list(data.shape), "stats": {"dtype": data.dtype.name}}
        return ConvertResult(staging_for(store, {}, storage_options=storage_options if is_url(store) else None).final, [vol], int(data.nbytes), time.perf_counter() - t0, 0, eng.description)

    infos = validate_inputs(files)
    names = unique_names(infos)
    plan_chunks = {}
    for info, name in zip(infos, names):
        shape = tuple(reversed(info.shape))
        plan_chunks[name] = normalize_chunks(chunks, info.dims, shape, info.raw_dtype.itemsize)
    plan = {
        "kind": "cohort",
        "inputs": [str(i.path.absolute()) for i in infos],
        "names": names,
        "chunks": plan_chunks,
        "codec": str(codec),
    }
    if levels > 1:  # a plan without a pyramid keeps the digest it always had (its stagings resume)
        plan["pyramid"] = {"levels": levels, "downsample": downsample}
        for info, name in zip(infos, names):  # too many levels for a volume: refused before anything is written
            level_factors(tuple(reversed(info.shape)), info.dims, levels, where=str(info.path))
    staging = staging_for(store, plan, overwrite=overwrite, inputs=files, storage_options=storage_options if is_url(store) else None)
    existed = staging.final.exists()
    try:
        staging.prepare()
    except OSError as e:
        if not _is_write_error(e, staging):
            raise
        raise OutputWriteError(
            f"{_describe_write_error(e, staging)}; {_output_fate(staging, store, existed)}", e.errno
        ) from e
    try:
        return _run(infos, names, plan_chunks, staging, store, codec, scheduler, progress, steps, t0, existed, allow_insecure,
                    (levels, downsample))
    except OutputWriteError:
        raise
    except OSError as e:
        # e.g. the disk fills while the manifest is written in commit()
        if not _is_write_error(e, staging):
            raise
        raise OutputWriteError(
            f"{_describe_write_error(e, staging)}; {_output_fate(staging, store, existed)} "
            f"(fix that and re-run to finish; work done is kept in {staging.path})",
            e.errno,
        ) from e
    finally:
        staging.release()


def _run(
    infos: list[NiftiInfo],
    names: list[str],
    plan_chunks: dict,
    staging: Staging,
    store: Any,
    codec: Any,
    scheduler: Any,
    progress: bool,
    steps: list | None,
    t0: float,
    existed: bool = False,
    allow_insecure: bool = False,
    pyramid: tuple[int, str | None] = (1, None),
) -> ConvertResult:
    root = zarr.open_group(staging.store(read_only=True), mode="r", zarr_format=3)
    done: dict[str, dict] = {}
    for info, name in zip(infos, names):
        if name in root:
            v = root[name].attrs.get("volnorm", {})
            src = v.get("source", {})
            if v.get("complete") and src.get("size") == info.file_size and src.get("mtime_ns") == info.mtime_ns:
                done[name] = {"name": name, **{k: v[k] for k in ("blake3", "bytes_read", "stats") if k in v}}
    todo = [(i, n) for i, n in zip(infos, names) if n not in done]
    todo.sort(key=lambda x: -x[0].data_bytes)  # biggest first balances the workers
    total = sum(i.data_bytes for i, _ in todo)
    results: dict[str, dict] = dict(done)
    failures: list[tuple[NiftiInfo, BaseException]] = []
    with running(scheduler, allow_insecure=allow_insecure) as eng:
        ex = eng.executor
        logger.info("converting %d files (%s) on %s", len(todo), format_bytes(total), ex.description)
        futures = {}
        for info, name in todo:
            fut = ex.submit(
                _ingest, info, staging.path if isinstance(staging, RemoteStaging) else str(staging.path), name, plan_chunks[name], codec, header_json(info.header_bytes), pyramid[0],
                pyramid[1] or auto_downsample(info.raw_dtype, info.header_bytes),
                # unique per output and run: two converts of the same files must not share tasks
                key=f"ingest-{name}-{uuid.uuid4().hex[:12]}",
            )
            futures[fut] = (info, name)
        with progress_bar(total, f"convert {len(todo)} files", show=progress and bool(todo)) as bar:
            for fut in ex.as_completed(futures):
                info, name = futures[fut]
                try:
                    results[name] = fut.result()
                except (OSError, ValueError) as e:
                    failures.append((info, e))
                bar.update(info.data_bytes)
    if failures:
        lines, write_errno = [], None
        for info, e in failures:
            if _is_write_error(e, staging):
                write_errno = write_errno or getattr(e, "errno", None) or errno.EIO
                lines.append(f"  {_describe_write_error(e, staging, info.path)}")  # type: ignore[arg-type]
            else:
                lines.append(f"  {e}")
        if write_errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            fix = "free space and re-run to resume"
        else:
            fix = "fix the output location and re-run to resume" if write_errno else "re-run to resume"
        msg = (
            f"{len(failures)} of {len(infos)} inputs failed; {_output_fate(staging, store, existed)} "
            f"(finished volumes are kept in {staging.path}; {fix}):\n" + "\n".join(lines)
        )
        if write_errno:
            raise OutputWriteError(msg, write_errno)
        raise NiftiError(msg)
    # trust nothing the workers said: every volume must be complete in the staging store
    root = zarr.open_group(staging.store(read_only=True), mode="r", zarr_format=3)
    made = dict(root.members())  # one listing, the groups' metadata read at once
    missing = [n for n in names if n not in made or not made[n].attrs.get("volnorm", {}).get("complete")]
    if missing:
        raise IncompleteStoreError(
            f"{staging.path}: volumes {missing} are not complete after the run; nothing was committed. "
            "Another process may be writing the same output; re-run to finish."
        )
    volumes = []
    inputs_meta = []
    for info, name in zip(infos, names):
        r = results[name]
        volumes.append({"name": name, "shape": list(reversed(info.shape)), "stats": r.get("stats", {})})
        inputs_meta.append(
            {
                "name": name,
                "path": str(info.path.absolute()),
                "size": info.file_size,
                "mtime_ns": info.mtime_ns,
                "blake3": r.get("blake3"),
            }
        )
    staging.commit(
        {
            "kind": "cohort",
            "volumes": names,
            "inputs": inputs_meta,
            "codec": str(codec),
            "steps": steps or [],
            "stats": {v["name"]: v["stats"] for v in volumes},
        }
    )
    return ConvertResult(
        store=staging.final,
        volumes=volumes,
        bytes_in=sum(i.data_bytes for i in infos),
        seconds=time.perf_counter() - t0,
        resumed=len(done),
        engine=eng.description,
    )


def _ingest(info: NiftiInfo, store_path: Any, name: str, chunks: Sequence[int], codec: Any, hdr: dict,
            levels: int = 1, downsample: str = "mean") -> dict:
    return ingest_nifti(info, store_path, name, chunks, codec, hdr, levels, downsample)

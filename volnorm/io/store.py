"""volnorm's Zarr v3 stores: layout, commit protocol and readers.

Layout of a store (one Zarr v3 group)::

    cohort.zarr/                 root; attrs["volnorm"] = manifest (written last)
      sub-001/                   a NIfTI-Zarr group (OME-Zarr 0.5 multiscale)
        0/                       raw voxels (t, z, y, x), native byte order
        1/, 2/ ...               resolution levels (``levels=N``; volnorm.io.pyramid), same dtype
        nifti/                   the NIfTI header bytes, byte for byte; JSON form in attrs
      sub-002/ ...

or, for image stacks of one shape, an xarray-style group whose ``image``
array has dims ``(volume, y, x)``.

Commit protocol (DESIGN.md, Safety rules): everything is written into a
hidden staging directory beside the output (``.NAME.volnorm-partial``) with
``write_empty_chunks=True``; each volume is marked complete only after every
chunk is verified present; the manifest with ``complete: true`` is written
last and the staging directory is renamed into place. Readers refuse a store
without the marker, and volnorm never deletes a directory it did not create.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from volnorm.integrity import Crc32cCodec, remove_partial_files, seal

# the manifest's home is volnorm.io.manifest (integrity reads it too); its names stay importable
# from here, where callers have always found them
from volnorm.io.manifest import (  # noqa: F401 - re-exported
    FORMAT,
    FORMAT_VERSION,
    IncompleteStoreError,
    is_complete,
    read_attributes,
    read_manifest,
)

logger = logging.getLogger(__name__)

STAGING_SUFFIX = ".volnorm-partial"

Codec = Literal["lz4", "zstd", "zarr-default", "none"]
#: Measured by benchmarks/bench_convert.py (int16 MRI phantoms, one process): blosc-lz4 +
#: shuffle writes 839 MB/s at ratio 1.87; blosc-zstd(1) 400 MB/s at 2.29; zarr's default
#: zstd 78 MB/s at 1.84. Writing is the slow step of a conversion, so lz4 is the default.
DEFAULT_CODEC: Codec = "lz4"


def compressors(codec: Codec | Any = DEFAULT_CODEC, *, checksum: bool = True) -> tuple:
    """The zarr v3 ``compressors=`` value for a codec name (or a codec, or codecs), followed by
    a CRC-32C of each chunk (zarr v3's standard ``crc32c`` codec: any zarr v3 reader checks it,
    and volnorm's reads name the damaged chunk, see :mod:`volnorm.integrity`).

    >>> [type(c).__name__ for c in compressors("lz4")]
    ['BloscCodec', 'Crc32cCodec']
    >>> [type(c).__name__ for c in compressors("none")]
    ['Crc32cCodec']
    """
    from zarr.codecs import BloscCodec, ZstdCodec
    from zarr.codecs import Crc32cCodec as _ZarrCrc32c

    table = {
        "lz4": lambda: (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "zstd": lambda: (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
        "zarr-default": lambda: (ZstdCodec(level=0, checksum=False),),
        "none": lambda: (),
    }
    if isinstance(codec, str):
        if codec not in table:
            raise ValueError(f"`codec` must be one of {sorted(table)!r}; got {codec!r}.")
        chain: tuple = table[codec]()
    elif codec is None:
        chain = ()
    elif isinstance(codec, (list, tuple)):
        chain = tuple(codec)
    else:
        chain = (codec,)
    if checksum and not any(isinstance(c, _ZarrCrc32c) for c in chain):
        chain = (*chain, Crc32cCodec())
    return chain


def encoding(ds: Any, codec: Codec | Any = DEFAULT_CODEC, **per_var: dict) -> dict[str, dict]:
    """xarray ``to_zarr`` encoding giving every variable of ``ds`` (coordinates too) volnorm's
    compressors and chunk checksum; ``per_var`` adds settings (e.g. chunks) for some variables.

    >>> import xarray as xr, numpy as np
    >>> enc = encoding(xr.Dataset({"a": ("x", np.zeros(3))}, coords={"x": [1, 2, 3]}))
    >>> sorted(enc), type(enc["x"]["compressors"][-1]).__name__
    (['a', 'x'], 'Crc32cCodec')
    """
    names = [str(k) for k in ds.variables]
    return {k: {"compressors": compressors(codec), **per_var.get(k, {})} for k in names}


# ---------------------------------------------------------------------------
# manifest and provenance
# ---------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of volnorm and the libraries that shape its output."""
    import dask
    import nibabel
    import xarray
    import zarr

    try:  # the installed distribution's version, read without importing the package
        own = metadata.version("volnorm")
    except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
        own = "unknown"
    return {
        "volnorm": own,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
        "nibabel": nibabel.__version__,
        "numpy": np.__version__,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def digest(obj: Any) -> str:
    """A stable SHA-256 of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------
# staging
# ---------------------------------------------------------------------------


def staging_path(final: Path) -> Path:
    return final.parent / f".{final.name}{STAGING_SUFFIX}"


@dataclass
class Staging:
    """A staging directory for one output store.

    ``prepare()`` decides, before anything is written, whether the output may
    be (re)written: an existing complete store needs ``overwrite``; anything
    else that exists there, volnorm never touches. A staging directory left by
    an interrupted run with the same plan is resumed.
    """

    final: Path
    plan: dict
    overwrite: bool = False
    inputs: Sequence[Path] = ()

    def __post_init__(self) -> None:
        self.final = Path(self.final).absolute()
        self.path = staging_path(self.final)
        self.plan_digest = digest(self.plan)
        self.resumed = False

    def check_output(self) -> None:
        """Refuse outputs that would destroy data, with a message naming the path."""
        final = self.final
        for p in self.inputs:
            if hasattr(p, "zarr_store"):  # an object-store input cannot be inside a local output
                continue
            rp = Path(p).resolve()
            if rp == final.resolve() or final.resolve() in rp.parents:
                raise ValueError(f"{final}: the output would overwrite or contain the input {p}")
        if final.exists() or final.is_symlink():
            m = read_manifest(final)
            if m is None:
                kind = "file" if final.is_file() else "directory"
                raise FileExistsError(
                    f"{final}: exists and is a {kind} volnorm did not create; "
                    "volnorm never deletes it. Choose another output path."
                )
            if not self.overwrite:
                state = "complete" if m.get("complete") else "incomplete"
                raise FileExistsError(
                    f"{final}: a {state} volnorm store already exists; "
                    "pass overwrite=True (CLI: --overwrite) to replace it."
                )
        if not final.parent.is_dir():
            raise FileNotFoundError(f"{final.parent}: the output's parent directory does not exist")

    @property
    def lock_path(self) -> Path:
        return self.final.parent / f".{self.final.name}.volnorm-lock"

    def _acquire(self) -> None:
        """Take the output's lock file; a lock left by a dead process on this host is taken over."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now()}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.lock_path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not pid_alive(other.get("pid")):
                    logger.info("taking over the lock of a run that ended without releasing it: %s", other)
                    self.lock_path.unlink(missing_ok=True)
                    continue
                raise FileExistsError(
                    f"{self.final}: another volnorm run (pid {other.get('pid')} on {other.get('host')}, "
                    f"started {other.get('started')}) is writing this output; wait for it to finish, "
                    f"or delete {self.lock_path} if that run is dead."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._locked = True
            return
        raise FileExistsError(f"{self.lock_path}: could not take the lock")

    def release(self) -> None:
        """Give the output's lock back (after commit, or when the run fails)."""
        if getattr(self, "_locked", False):
            self.lock_path.unlink(missing_ok=True)
            self._locked = False

    def prepare(self, root_attrs: dict | None = None) -> "Staging":
        """Take the output's lock, then create or resume the staging group; returns self.

        Call :meth:`commit` or :meth:`release` afterwards.
        """
        self.check_output()
        self._acquire()
        try:
            return self._prepare(root_attrs)
        except BaseException:
            self.release()
            raise

    def _prepare(self, root_attrs: dict | None) -> "Staging":
        import zarr

        if self.path.exists():
            m = read_manifest(self.path)
            if m is None:
                raise FileExistsError(
                    f"{self.path}: exists but is not a volnorm staging directory; remove it by hand."
                )
            if m.get("plan_digest") == self.plan_digest:
                self.resumed = True
                n = remove_partial_files(self.path)  # temporaries of the killed writer
                logger.info("resuming the interrupted run staged at %s (%d temporary files removed)", self.path, n)
                return self
            # volnorm's own staging of an interrupted run with other inputs or options (the plan's
            # digest decides what is reused): never committed, derived from inputs; replaced
            logger.warning("%s: discarding an interrupted run with other inputs or options staged here", self.path)
            shutil.rmtree(self.path)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "plan_digest": self.plan_digest,
            "started": now(),
            "kind": self.plan.get("kind"),
        }
        if isinstance(self.plan.get("names"), list):
            manifest["volumes"] = list(self.plan["names"])
        attrs = dict(root_attrs or {})
        attrs["volnorm"] = manifest
        zarr.open_group(self.path, mode="w-", zarr_format=3, attributes=attrs)
        return self

    def named_errors(self) -> Any:
        """A context for the writes: here nothing (a local OSError names its file already);
        :class:`volnorm.io.objectstore.RemoteStaging` names the URL in a server's error."""
        return contextlib.nullcontext()

    def store(self, read_only: bool = False) -> Any:
        """What zarr opens the staging group from (here its directory; a URL's zarr store for
        :class:`volnorm.io.objectstore.RemoteStaging`)."""
        return self.path

    def manifest(self) -> dict:
        """The staging group's ``volnorm`` attributes (the manifest so far, e.g. progress marks)."""
        return read_manifest(self.path) or {}

    def update_manifest(self, **kv: Any) -> None:
        """Record ``kv`` in the staging manifest (progress a resumed run reads back)."""
        import zarr

        root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        m = dict(root.attrs.get("volnorm", {}))
        m.update(kv)
        root.attrs["volnorm"] = m

    def commit(self, manifest: dict) -> None:
        """Write the manifest with the completion marker last, then move into place."""
        import zarr

        # no temporary of a killed task survives into a committed store; every chunk of every
        # array (not only the volumes' voxels) is present; the inventory goes into the manifest
        arrays = seal(self.path)
        root = zarr.open_group(self.path, mode="r+", zarr_format=3)
        m = dict(root.attrs.get("volnorm", {}))
        m.update(manifest)
        m.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            plan_digest=self.plan_digest,
            finished=now(),
            versions=versions(),
            arrays=arrays,
            complete=True,
        )
        root.attrs["volnorm"] = m
        old = None
        if self.final.exists():  # overwrite=True of a volnorm store, checked in prepare()
            if read_manifest(self.final) is None:
                raise FileExistsError(f"{self.final}: appeared during the run and is not a volnorm store")
            old = self.final.parent / f".{self.final.name}.volnorm-old"
            if old.exists() or old.is_symlink():
                if old.is_symlink() or read_manifest(old) is None:
                    raise FileExistsError(f"{old}: exists and volnorm did not create it; move it away and run again")
                shutil.rmtree(old)
            os.replace(self.final, old)
        try:
            os.replace(self.path, self.final)
        except BaseException:
            if old is not None and not self.final.exists():  # put the previous store back in place
                os.replace(old, self.final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.release()
        logger.info("committed %s", self.final)


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a process running on this host (a lock's owner, a writer's marker).

    Not an int, or not positive, is False; a process of another user (no permission to
    signal it) is alive.

    >>> import os
    >>> pid_alive(os.getpid()), pid_alive(None), pid_alive(-1)
    (True, False, False)
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

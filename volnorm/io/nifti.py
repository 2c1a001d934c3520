"""Validate and lazily read NIfTI-1/NIfTI-2 files (.nii, .nii.gz).

Every file is checked before any voxel is read: that it exists and is a
single-file NIfTI, that its header is sane (dims, datatype, affine, voxel
sizes, scaling) and that the file holds all the bytes the header promises
(for .nii.gz, the size recorded in the gzip trailer). nibabel alone accepts
truncated and corrupt files silently; a corrupt .nii.gz is only caught by its
CRC, which every streaming read checks: the conversion's, and a lazy read of a
whole .nii.gz (what ``open_nifti`` does for volumes up to ``WHOLE_READ_MAX``);
the ranged reads of larger ones (``indexed_gzip``) do not check it.

A .nii.gz must decompress to exactly the bytes its header needs (``vox_offset``
plus the voxel data; extensions lie before ``vox_offset``). gzip's trailer
keeps the size modulo 4 GiB, so a stream that runs on by a multiple of 4 GiB
(a gzip bomb) passes the trailer check; every streaming read stops and fails
at the first byte past the needed size instead. Several gzip members in a row
(``bgzip``) are accepted, as gzip defines them; anything else after the last
member (trailing garbage, zero padding) is refused. A .nii may be longer than
its header needs (bytes after the data are ignored, as nibabel does).

Voxels are read through nibabel's ``ArrayProxy`` (so scaling is bit-identical
to nibabel's) behind a small picklable view that reverses the axes: NIfTI's
Fortran-order (i, j, k, t) becomes C-order (t, z, y, x).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volnorm._utils import native
from volnorm.io.gzipstream import GzipTooLongError, GzipTrailingDataError, Inflater, open_stream
from volnorm.io.location import Remote, is_url
from volnorm.io.location import glob as glob_urls

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: NIfTI datatype codes volnorm reads: ints, uints and IEEE floats.
SUPPORTED_DTYPES = {
    2: "uint8",
    4: "int16",
    8: "int32",
    16: "float32",
    64: "float64",
    256: "int8",
    512: "uint16",
    768: "uint32",
    1024: "int64",
    1280: "uint64",
}
_DTYPE_NAMES = {
    1: "binary (1 bit)",
    32: "complex64",
    128: "RGB24",
    1536: "float128",
    1792: "complex128",
    2048: "complex256",
    2304: "RGBA32",
}
#: Largest header+extension block we accept (vox_offset); real files use < 64 KiB.
_MAX_VOX_OFFSET = 2**26


class NiftiError(ValueError):
    """A NIfTI input is missing, unreadable, corrupt or unsupported.

    The message always starts with the file's path.
    """


def _fail(path: Path | str, problem: str) -> NiftiError:
    return NiftiError(f"{path}: {problem}")


def read_exact(f: Any, buf: memoryview, path: Path | str) -> None:
    """Fill ``buf`` from the stream ``f``; a stream that ends first raises NiftiError naming
    ``path`` and how many bytes were missing (the conversion's and a whole lazy read's)."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise _fail(path, f"truncated: the data ended {len(buf) - got} bytes early")
        got += n


@dataclass(frozen=True)
class NiftiInfo:
    """What volnorm knows about one validated NIfTI file (header only).

    ``shape`` is in NIfTI order (i, j, k[, t]); ``raw_dtype`` keeps the
    file's byte order. ``header_bytes`` are the file's bytes before the voxel
    data (header, extension flag and extensions), byte for byte.
    """

    path: Path | Remote
    version: int
    shape: tuple[int, ...]
    raw_dtype: np.dtype
    offset: int
    slope: float
    inter: float
    header_bytes: bytes
    affine: np.ndarray = field(repr=False)
    zooms: tuple[float, ...]
    units: tuple[str, str]
    compressed: bool
    file_size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        """File name without ``.nii``/``.nii.gz``."""
        n = self.path.name
        for s in (".nii.gz", ".nii"):
            if n.endswith(s):
                return n[: -len(s)]
        return n

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header describes."""
        return math.prod(self.shape) * self.raw_dtype.itemsize

    @property
    def needed_bytes(self) -> int:
        """Bytes the header needs: ``vox_offset`` (header and extensions) plus the voxel data.

        A .nii.gz decompresses to exactly this many bytes.
        """
        return self.offset + self.data_bytes

    @property
    def scaled(self) -> bool:
        """Whether the header asks for intensity scaling (slope, inter) != (1, 0)."""
        return (self.slope, self.inter) != (1.0, 0.0)

    @property
    def scaled_dtype(self) -> np.dtype:
        """Dtype nibabel gives the scaled data (``np.asarray(img.dataobj)``)."""
        return scaled_dtype(self.raw_dtype, self.slope, self.inter)

    @property
    def dims(self) -> tuple[str, ...]:
        """C-order dim names of the volume: ``("t", "z", "y", "x")`` or a suffix."""
        return ("t", "z", "y", "x")[4 - len(self.shape) :] if len(self.shape) <= 4 else ()


def scaled_dtype(raw_dtype: np.dtype, slope: float, inter: float) -> np.dtype:
    """The dtype nibabel's ``ArrayProxy`` returns for scaled data (no file access)."""
    from nibabel.arrayproxy import ArrayProxy

    raw = np.dtype(raw_dtype)
    proxy = ArrayProxy(io.BytesIO(bytes(raw.itemsize)), ((1,), raw, 0, slope, inter))
    return native(np.asarray(proxy).dtype)


def apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Scale raw voxels exactly as nibabel's ``ArrayProxy`` does (same dtype, same bits).

    These are the steps of ``ArrayProxy._get_scaled`` with ``dtype=None``.
    """
    from nibabel.volumeutils import apply_read_scaling

    if (slope, inter) == (1.0, 0.0):
        return raw
    scl_slope = np.asanyarray(slope)
    scl_inter = np.asanyarray(inter)
    use_dtype = scl_slope.dtype
    if np.can_cast(scl_slope, use_dtype):
        scl_slope = scl_slope.astype(use_dtype)
    if np.can_cast(scl_inter, use_dtype):
        scl_inter = scl_inter.astype(use_dtype)
    return apply_read_scaling(raw, scl_slope, scl_inter)


# ---------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------


def is_nifti_path(p: str | os.PathLike) -> bool:
    return str(p).endswith(NIFTI_SUFFIXES)


def _dangling(p: Path) -> str | None:
    """Why ``p`` is a symlink to nothing (naming its target), or None."""
    if isinstance(p, Remote):
        return None
    if p.is_symlink() and not p.exists():
        return f"{p}: is a symlink to {os.readlink(p)}, which does not exist"
    return None


def expand_paths(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    suffixes: Sequence[str] = NIFTI_SUFFIXES,
    what: str = "NIfTI",
    storage_options: dict | None = None,
) -> list[Path | Remote]:
    """Expand globs and directories into an ordered list of absolute file paths.

    Paths are made absolute here, on the client, so that tasks work on
    workers started in another folder (symlink names are kept as given).

    Parameters
    ----------
    paths : path, glob, directory or iterable of them
        Explicit files, glob patterns (``*``, ``?``, ``[...]``) or
        directories (their files ending with one of ``suffixes``, sorted).
    suffixes : sequence of str
        File name endings a directory's files must have to be inputs.
    what : str
        What the files are, for messages.
    storage_options : dict, optional
        fsspec options for URLs (``s3://bucket/cohort/*.nii.gz``: globs are expanded by listing).

    Returns
    -------
    list of pathlib.Path
        Absolute paths in the order given (each glob and directory sorted).

    Raises
    ------
    FileNotFoundError
        A glob matching nothing, a directory with no matching file, an
        explicit path that does not exist, or a symlink (given, matched or in
        a directory) to something that does not exist; one error lists every
        such path.
    ValueError
        No input at all, or the same file given twice.

    Examples
    --------
    >>> from volnorm import datasets
    >>> folder = datasets.nibabel_files()["anatomical.nii"].parent
    >>> files = expand_paths(folder)
    >>> all(p.is_absolute() for p in files), "anatomical.nii" in [p.name for p in files]
    (True, True)
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    problems: list[str] = []
    for p in paths:
        if is_url(p):
            out.extend(_expand_url(p, suffixes, what, storage_options))
            continue
        s = os.fspath(p)
        if glob.has_magic(s):
            matches = sorted(glob.glob(s))
            if not matches:
                raise FileNotFoundError(f"{s}: the pattern matches no file")
            out.extend(Path(m).absolute() for m in matches)
        elif os.path.isdir(s):
            entries = sorted(q for q in Path(s).absolute().iterdir() if q.name.endswith(tuple(suffixes)))
            dangling = [d for q in entries if (d := _dangling(q))]
            problems.extend(dangling)
            matches = [q for q in entries if q.is_file()]
            if not matches and not dangling:
                raise FileNotFoundError(f"{s}: the directory holds no {what} file ({', '.join(suffixes)})")
            out.extend(matches)
        elif os.path.lexists(s):
            out.append(Path(s).absolute())
        else:
            problems.append(f"{s}: no such file")
    problems.extend(d for q in out if (d := _dangling(q)))
    if problems:
        raise FileNotFoundError(
            problems[0] if len(problems) == 1 else "\n".join([f"{len(problems)} inputs are missing:", *(f"  {x}" for x in problems)])
        )
    if not out:
        raise ValueError(f"no {what} input given")
    seen: dict[Any, Any] = {}
    for p in out:
        key = p if isinstance(p, Remote) else p.resolve()
        if key in seen:
            raise ValueError(f"{p}: the same file is given twice (also as {seen[key]})")
        seen[key] = p
    return out


def _expand_url(url: Any, suffixes: Sequence[str], what: str, storage_options: dict | None) -> list[Remote]:
    """The objects of a URL input: a glob (by listing), a prefix (its objects ending with one
    of ``suffixes``) or one object."""
    r = url if isinstance(url, Remote) else Remote(url, dict(storage_options or {}))
    if glob.has_magic(r.url):
        found = glob_urls(r.url, r.storage_options)
        if not found:
            raise FileNotFoundError(f"{r}: the pattern matches no object")
        return found
    if r.fs.isdir(r.path):
        found = [q for q in glob_urls(r.url, r.storage_options) if q.name.endswith(tuple(suffixes))]
        if not found:
            raise FileNotFoundError(f"{r}: the prefix holds no {what} object ({', '.join(suffixes)})")
        return found
    if not r.exists():
        raise FileNotFoundError(f"{r}: no such object")
    return [r]


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _open_raw(path: Path | Remote, compressed: bool) -> Iterator[Any]:
    """The file's bytes, decompressed when ``compressed``; the file is closed afterwards (a
    ``GzipFile`` over a file object does not close it)."""
    with open_file(path, stream=compressed) as f:
        if not compressed:
            yield f
            return
        with gzip.open(f, "rb") as g:
            yield g


def open_file(path: str | os.PathLike | Remote, *, stream: bool = False) -> Any:
    """A binary file object for a local path or an object-store URL (:class:`Remote`).

    A URL is read with HTTP range requests: ``stream=False`` fetches exactly the bytes each
    read asks for (a chunk of a .nii), ``stream=True`` reads ahead 8 MiB blocks (a .nii.gz
    decompressed front to back, one block in flight); a local stream is unbuffered (its reader
    asks for large blocks: a buffer would only copy them)."""
    if isinstance(path, Remote):
        if stream:
            return path.fs.open(path.path, "rb", block_size=8 * 2**20, cache_type="readahead")
        return path.fs.open(path.path, "rb", cache_type="none")
    return open(path, "rb", buffering=0) if stream else open(path, "rb")


def file_stamp(path: str | os.PathLike | Remote) -> tuple[int, int]:
    """``(size, modification time in ns)`` of a local file or an object (its ``LastModified``)."""
    if isinstance(path, Remote):
        info = path.fs.info(path.path)
        when = info.get("LastModified") or info.get("mtime") or info.get("last_modified")
        ns = int(when.timestamp() * 1e9) if hasattr(when, "timestamp") else int(float(when or 0) * 1e9)
        return int(info["size"]), ns
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def read_info(path: str | os.PathLike | Remote) -> NiftiInfo:
    """Validate one NIfTI file's header and size, without reading voxels.

    Parameters
    ----------
    path : str, os.PathLike or Remote
        A single-file NIfTI-1 or NIfTI-2 image (``.nii`` or ``.nii.gz``); gzip is recognized by
        the file's first bytes. A :class:`~volnorm.io.location.Remote` (an object-store URL) is
        read by ranged requests (its header, the gzip trailer), as a file would be.

    Returns
    -------
    NiftiInfo
        The validated header: ``shape`` (NIfTI order, at least 3-D), ``raw_dtype``, the data's
        ``offset``, ``slope``/``inter`` scaling, ``affine``, ``zooms``, ``units``,
        ``header_bytes``, and the file's size and modification time.

    Raises
    ------
    FileNotFoundError, PermissionError
        Missing or unreadable file (message starts with the path).
    NiftiError
        Empty, not NIfTI, truncated, corrupt gzip trailer, absurd dims,
        unsupported datatype, invalid affine or voxel sizes, bad scaling.

    Examples
    --------
    >>> from volnorm import datasets
    >>> info = read_info(datasets.nibabel_files()["anatomical.nii"])
    >>> info.shape, str(info.raw_dtype)
    ((33, 41, 25), '>i2')
    """
    import nibabel as nib

    if isinstance(path, Remote):
        try:
            size, mtime_ns = file_stamp(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such object") from None
        except PermissionError as e:
            raise PermissionError(f"{path}: access denied ({e}); check the credentials") from None
        if path.fs.isdir(path.path):
            raise _fail(path, "is a prefix (a folder), not a NIfTI file")
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if path.is_dir():
            raise _fail(path, "is a directory, not a NIfTI file")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path}: permission denied (cannot read the file)")
        size, mtime_ns = file_stamp(path)
    if size == 0:
        raise _fail(path, "the file is empty (0 bytes)")
    with open_file(path) as f:
        magic2 = f.read(2)
    compressed = magic2 == b"\x1f\x8b"
    if path.name.endswith(".gz") and not compressed:
        raise _fail(path, "has a .gz name but is not gzip-compressed")
    try:
        with _open_raw(path, compressed) as f:
            head = f.read(540)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise _fail(path, f"cannot decompress the start of the file ({e})") from None
    if len(head) < 348:
        raise _fail(path, f"too short to be NIfTI ({len(head)} header bytes, need at least 348)")
    sizeof = {struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]}
    if 348 in sizeof:
        klass, version = nib.Nifti1Header, 1
    elif 540 in sizeof:
        if len(head) < 540:
            raise _fail(path, f"NIfTI-2 header is truncated ({len(head)} of 540 bytes)")
        klass, version = nib.Nifti2Header, 2
    else:
        raise _fail(path, "not a NIfTI file (the first 4 bytes are not sizeof_hdr 348 or 540)")
    hsize = 348 if version == 1 else 540
    try:
        hdr = klass.from_fileobj(io.BytesIO(head[:hsize] + b"\0" * 4), check=False)
    except Exception as e:  # nibabel raises several types for garbage
        raise _fail(path, f"unreadable NIfTI header ({e})") from None
    magic = bytes(hdr["magic"].tobytes()).rstrip(b"\0")
    if magic in (b"ni1", b"ni2"):
        raise _fail(path, "is the header of a .hdr/.img pair; only single-file NIfTI (.nii, .nii.gz) is supported")
    if magic not in (b"n+1", b"n+2"):
        raise _fail(path, f"not a NIfTI file (magic {magic!r}, expected b'n+1' or b'n+2')")

    dim = [int(d) for d in hdr["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise _fail(path, f"absurd number of dimensions dim[0]={ndim} (expected 1..7)")
    shape = dim[1 : 1 + ndim]
    if any(n <= 0 for n in shape):
        raise _fail(path, f"absurd dimensions {tuple(shape)} (every size must be >= 1)")
    # drop trailing singleton dims beyond 4 (e.g. (x, y, z, t, 1)); keep 2-D/3-D/4-D as stored
    while len(shape) > 4 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise _fail(path, f"{len(shape)}-D data {tuple(shape)} is not supported (volnorm reads 2-D, 3-D and 4-D NIfTI)")
    if len(shape) < 3:
        shape = shape + [1] * (3 - len(shape))

    code = int(hdr["datatype"])
    if code not in SUPPORTED_DTYPES:
        name = _DTYPE_NAMES.get(code, f"unknown code {code}")
        raise _fail(
            path,
            f"unsupported datatype {name}; volnorm reads int8..int64, uint8..uint64, float32 and float64",
        )
    raw_dtype = np.dtype(SUPPORTED_DTYPES[code]).newbyteorder(hdr.endianness)

    offset = int(hdr["vox_offset"])
    if offset < hsize or offset > _MAX_VOX_OFFSET:
        raise _fail(path, f"invalid vox_offset {offset} (must be between {hsize} and {_MAX_VOX_OFFSET})")
    expected = offset + math.prod(shape) * raw_dtype.itemsize

    # size: .nii against the file size, .nii.gz against the gzip trailer (ISIZE)
    if compressed:
        with open_file(path) as f:
            f.seek(size - 4)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize != expected % 2**32:
            # a multi-member gzip (bgzip, concatenated streams) records only its last
            # member's size: decompress once to tell it from a truncated or corrupt file
            # (stopping at the first byte past `expected`: a bomb costs nothing)
            _check_gzip_size(path, expected, size)
    elif size < expected:
        raise _fail(
            path,
            f"truncated: the header needs {expected} bytes (data {tuple(shape)} {raw_dtype.name} "
            f"at offset {offset}) but the file has {size}",
        )

    zooms = tuple(float(z) for z in hdr["pixdim"][1 : 1 + len(shape)])
    spatial = zooms[:3]
    if not all(math.isfinite(z) and z > 0 for z in spatial):
        raise _fail(path, f"invalid voxel sizes {spatial} (pixdim must be finite and > 0)")
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as e:
        raise _fail(path, f"invalid orientation (qform/sform): {e}") from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _fail(path, f"invalid affine (not finite or singular):\n{affine}")

    slope = float(hdr["scl_slope"])
    inter = float(hdr["scl_inter"])
    if slope == 0 or not math.isfinite(slope):
        slope, inter = 1.0, 0.0  # NIfTI: no scaling
    elif not math.isfinite(inter):
        raise _fail(path, f"scl_inter is {inter} while scl_slope is {slope}")
    units = tuple(str(u) for u in hdr.get_xyzt_units())

    # header bytes, byte for byte (extension flag and extensions included)
    with _open_raw(path, compressed) as f:
        header_bytes = f.read(offset)
    if len(header_bytes) != offset:
        raise _fail(path, f"truncated inside the header ({len(header_bytes)} of {offset} bytes)")
    return NiftiInfo(
        path=path,
        version=version,
        shape=tuple(shape),
        raw_dtype=raw_dtype,
        offset=offset,
        slope=slope,
        inter=inter,
        header_bytes=header_bytes,
        affine=affine,
        zooms=zooms,
        units=units,  # type: ignore[arg-type]
        compressed=compressed,
        file_size=size,
        mtime_ns=mtime_ns,
    )


def _check_gzip_size(path: Path, expected: int, file_size: int) -> None:
    """Decompress a gzip file to check it holds exactly ``expected`` bytes (CRCs checked too).

    Stops at the first 16 MiB block past ``expected``, so a gzip bomb is
    refused after decompressing at most ``expected`` + 16 MiB.

    Raises
    ------
    NiftiError
        Naming the file: fewer or more bytes than ``expected``, truncated or
        corrupt gzip data, or trailing bytes that are not a gzip member.
    """
    total = 0
    buf = bytearray(16 * 2**20)
    try:
        with open_file(path, stream=True) as f:
            inflater = Inflater(f, limit=expected)
            while n := inflater.readinto(buf):
                total += n
    except GzipTooLongError as e:
        raise _fail(
            path,
            f"the gzip data hold more than the {expected} uncompressed bytes the header needs "
            f"(stopped after {e.seen}): the file is corrupt or not what its header says",
        ) from None
    except GzipTrailingDataError as e:
        raise _fail(path, _trailing_data(e, file_size)) from None
    except (OSError, EOFError) as e:
        raise _fail(
            path,
            f"the gzip data hold {total} uncompressed bytes (then: {e}) but the header needs "
            f"{expected}: the file is truncated or corrupt",
        ) from None
    if total != expected:
        raise _fail(
            path,
            f"the gzip data hold {total} uncompressed bytes but the header needs "
            f"{expected}: the file is truncated or corrupt",
        )


def _trailing_data(e: GzipTrailingDataError, file_size: int) -> str:
    return (
        f"{file_size - e.offset} bytes of trailing data after the end of the gzip data (from offset "
        f"{e.offset}) that are not a gzip member: the file is truncated or corrupt, or padded; "
        "refused (re-compress the file)"
    )


def gzip_problem(info: NiftiInfo, e: BaseException) -> str:
    """What an error while streaming a validated .nii.gz means, as the end of a message naming it.

    Serves the conversion's single streaming read; :func:`read_info` says the same
    things about the bytes it decompresses to check the size.

    Examples
    --------
    >>> from volnorm import datasets
    >>> info = read_info(datasets.nibabel_files()["standard.nii.gz"])
    >>> gzip_problem(info, GzipTrailingDataError(info.file_size - 8))[:52]
    '8 bytes of trailing data after the end of the gzip d'
    """
    if isinstance(e, GzipTooLongError):
        return (
            f"the gzip data go on past the {e.limit} bytes the header needs (header and extensions "
            f"{info.offset} + voxel data {info.data_bytes}); stopped after decompressing {e.seen} bytes. "
            "The file is corrupt or not what its header says (gzip's size trailer counts modulo 4 GiB, "
            "so it cannot tell); refused"
        )
    if isinstance(e, GzipTrailingDataError):
        return _trailing_data(e, info.file_size)
    return f"corrupt compressed data ({e}); the file cannot be trusted"


def header_from_bytes(header_bytes: bytes):
    """A nibabel header (Nifti1Header or Nifti2Header) from stored header bytes."""
    import nibabel as nib

    n1 = {struct.unpack("<i", header_bytes[:4])[0], struct.unpack(">i", header_bytes[:4])[0]}
    klass = nib.Nifti1Header if 348 in n1 else nib.Nifti2Header
    hsize = 348 if klass is nib.Nifti1Header else 540
    data = header_bytes if len(header_bytes) > hsize else header_bytes + b"\0" * 4
    return klass.from_fileobj(io.BytesIO(data), check=False)


# ---------------------------------------------------------------------------
# lazy reading
# ---------------------------------------------------------------------------

_GZ_CACHE: OrderedDict[tuple, tuple[Any, threading.Lock]] = OrderedDict()
_GZ_CACHE_LOCK = threading.Lock()
_GZ_CACHE_SIZE = 8


def _gz_handle(path: str | Remote, size: int, mtime_ns: int):
    """A per-process cached ``IndexedGzipFile``: its seek index grows as slabs are read."""
    import indexed_gzip

    key = (path, size, mtime_ns)
    with _GZ_CACHE_LOCK:
        hit = _GZ_CACHE.get(key)
        if hit is not None:
            _GZ_CACHE.move_to_end(key)
            return hit
        if file_stamp(path) != (size, mtime_ns):
            raise _fail(path, "the file changed on disk since it was opened")
        gz = (indexed_gzip.IndexedGzipFile(fileobj=open_file(path), spacing=4 * 2**20) if isinstance(path, Remote)
              else indexed_gzip.IndexedGzipFile(path, spacing=4 * 2**20))
        handle = (gz, threading.Lock())
        _GZ_CACHE[key] = handle
        while len(_GZ_CACHE) > _GZ_CACHE_SIZE:
            _, (old, _) = _GZ_CACHE.popitem(last=False)
            old.close()
        return handle


#: Largest .nii.gz volume (bytes held while it is decompressed: the raw voxels, plus their
#: scaled copy when the dtype changes) that ``open_nifti`` decompresses whole, in one task.
WHOLE_READ_MAX = 2**30


class NiftiArray:
    """Picklable lazy view of one NIfTI file's voxels in C order (axes reversed).

    Slicing reads only the needed bytes of a .nii. A .nii.gz read whole (every
    index of every axis) is decompressed in one streaming pass through ISA-L
    (:func:`~volnorm.io.gzipstream.open_stream`: CRC, length and trailing bytes
    checked, as the conversion does); any smaller part is read through a
    per-process ``indexed_gzip`` handle, so slabs read in order cost one (zlib)
    decompression pass and memory stays O(slab).
    """

    def __init__(self, info: NiftiInfo, *, scaled: bool = True, dtype: Any = None) -> None:
        self.info = info
        self.path = info.path if isinstance(info.path, Remote) else str(info.path)  # a Remote pickles its options
        self.fshape = info.shape
        self.raw_dtype = info.raw_dtype
        self.offset = info.offset
        self.slope = info.slope if scaled else 1.0
        self.inter = info.inter if scaled else 0.0
        self.compressed = info.compressed
        self.stamp = (info.file_size, info.mtime_ns)
        self.shape = tuple(reversed(info.shape))
        self.ndim = len(self.shape)
        natural = scaled_dtype(self.raw_dtype, self.slope, self.inter)
        self.dtype = np.dtype(dtype) if dtype is not None else natural

    def __repr__(self) -> str:
        return f"NiftiArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    @property
    def whole_read_bytes(self) -> int:
        """Bytes a whole read holds at its peak: the raw voxels, plus their scaled (or
        byte-swapped, or cast) copy when the result is not the raw array itself."""
        raw = self.info.data_bytes
        same = (self.slope, self.inter) == (1.0, 0.0) and self.dtype == self.raw_dtype
        return raw if same else raw + math.prod(self.fshape) * self.dtype.itemsize

    def _read_whole_gz(self) -> np.ndarray:
        """The raw voxels of the .nii.gz (Fortran order, the file's dtype), decompressed in one
        streaming pass; CRC, length and trailing bytes checked. Raises NiftiError naming the file."""
        info, path = self.info, self.path
        if file_stamp(path) != self.stamp:
            raise _fail(path, "the file changed on disk since it was opened")
        raw = np.empty(math.prod(self.fshape), dtype=self.raw_dtype)
        buf = memoryview(raw.view(np.uint8))
        try:
            with open_file(path, stream=True) as f:
                stream = open_stream(f, True, limit=info.needed_bytes, block=4 * 2**20)
                if stream.read(info.offset) != info.header_bytes:
                    raise _fail(path, "the header changed on disk since it was opened")
                read_exact(stream, buf, path)
                # verifies the last member's CRC and ISIZE; the limit refuses any byte more
                while stream.read(2**20):
                    pass
        except NiftiError:
            raise
        except (OSError, EOFError, ValueError) as e:
            # isal/zlib raise OSError subclasses (BadGzipFile, IsalError) on corrupt data
            raise _fail(path, gzip_problem(info, e)) from None
        return raw.reshape(self.fshape, order="F")

    def _read_raw(self, fkey: tuple) -> np.ndarray:
        from nibabel.arrayproxy import ArrayProxy

        spec = (self.fshape, self.raw_dtype, self.offset, 1.0, 0.0)
        if self.compressed and all(k.indices(n) == (0, n, 1) for k, n in zip(fkey, self.fshape)):
            return self._read_whole_gz()
        if self.compressed:
            fobj, lock = _gz_handle(self.path, *self.stamp)
            with lock:
                return ArrayProxy(fobj, spec)[fkey]
        with open_file(self.path) as fobj:
            return ArrayProxy(fobj, spec)[fkey]

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (self.ndim - len(key))
        if any(not isinstance(k, slice) for k in key):
            raise TypeError("NiftiArray supports basic slices only")
        raw = self._read_raw(tuple(reversed(key)))
        out = apply_scaling(raw, self.slope, self.inter)
        # nibabel returns Fortran order; .T is the C-order view we want
        return np.asarray(out.T, dtype=self.dtype)

"""Private helpers shared by every layer: warnings, sizes, chunk rules."""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Default target size of one dask/zarr chunk. Measured (DESIGN.md, Scale rules):
#: chunks in the tens of MiB keep task overhead below 1% on ``distributed``.
DEFAULT_CHUNK_BYTES = 64 * 2**20


class VolnormWarning(UserWarning):
    """Warning about something a volnorm user can act on."""


class VolnormDeprecationWarning(VolnormWarning, FutureWarning):
    """A spelling or option volnorm still reads but will not forever; the message says what to write."""


def no_valid_voxels(what: str = "", *, some: bool = False, inf: bool = False) -> ValueError:
    """The one error for data with nothing left to compute on.

    Parameters
    ----------
    what : str
        What could not be done, e.g. ``"to take a quantile of"``.
    some : bool
        Only some index of the kept dims is empty (per volume, per slice ...).
    inf : bool
        ±Inf are left out too.

    Returns
    -------
    ValueError
        To raise.

    Examples
    --------
    >>> str(no_valid_voxels("to equalize", some=True))
    'no valid voxel to equalize (all NaN or masked out for some index)'
    """
    nan = "NaN/±Inf" if inf else "NaN"
    return ValueError(f"no valid voxel{' ' + what if what else ''} (all {nan} or masked out{' for some index' if some else ''})")


def format_bytes(n: float) -> str:
    """Return ``n`` bytes as a short human string (``'1.5 GiB'``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def slab_chunks(
    shape: Sequence[int],
    itemsize: int,
    target_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Chunk shape for a C-order array read as slabs along its slowest axes.

    The fastest axes are kept whole (a NIfTI file stores x fastest, so whole
    ``(y, x)`` planes are contiguous bytes); the slowest axes are split so that
    one chunk holds about ``target_bytes``.

    >>> slab_chunks((4, 256, 256, 256), 2, 64 * 2**20)
    (2, 256, 256, 256)
    >>> slab_chunks((512, 512, 512), 4, 64 * 2**20)
    (64, 512, 512)
    >>> slab_chunks((320, 384, 384), 2, 64 * 2**20)     # balanced, not (227, ...)
    (160, 384, 384)
    """
    chunks = list(shape)
    size = itemsize * math.prod(shape)
    for axis in range(len(shape)):
        if size <= target_bytes:
            break
        inner = size // max(shape[axis], 1)
        if inner >= target_bytes:
            chunks[axis] = 1
            size = inner
        else:
            c = max(1, target_bytes // max(inner, 1))
            # balance: 320 slices in chunks of 227 would leave a 93-slice chunk
            # that zarr pads to 227; two chunks of 160 store the same data
            chunks[axis] = -(-shape[axis] // -(-shape[axis] // c))
            break
    return tuple(int(c) for c in chunks)


def normalize_chunks(
    chunks: int | str | Mapping[str, int] | Sequence[int] | None,
    dims: Sequence[str],
    shape: Sequence[int],
    itemsize: int,
) -> tuple[int, ...]:
    """Turn a user's ``chunks=`` into one chunk shape (regular chunks).

    ``None`` or ``"auto"``: whole-plane slabs of about 64 MiB. An ``int`` is a
    target size in MiB. A mapping names dims (missing dims use the default,
    ``-1`` means whole). A sequence gives every dim.
    """
    if chunks is None or chunks == "auto":
        return slab_chunks(shape, itemsize)
    if isinstance(chunks, int) and not isinstance(chunks, bool):
        if chunks <= 0:
            raise ValueError(f"`chunks` as an int is a size in MiB and must be > 0; got {chunks}.")
        return slab_chunks(shape, itemsize, chunks * 2**20)
    default = slab_chunks(shape, itemsize)
    if isinstance(chunks, Mapping):
        unknown = set(chunks) - set(dims)
        if unknown:
            raise ValueError(
                f"`chunks` names dims {sorted(unknown)!r} that the data does not have; "
                f"its dims are {tuple(dims)!r}."
            )
        out = [chunks.get(d, c) for d, c in zip(dims, default)]
    elif isinstance(chunks, Sequence) and not isinstance(chunks, str):
        if len(chunks) != len(dims):
            raise ValueError(
                f"`chunks` has {len(chunks)} entries but the data has dims {tuple(dims)!r}."
            )
        out = list(chunks)
    else:
        raise TypeError(f"`chunks` must be None, 'auto', an int (MiB), a mapping or a tuple; got {chunks!r}.")
    result = []
    for d, c, n in zip(dims, out, shape):
        if c is None or c == -1:
            c = n
        if not isinstance(c, (int, np.integer)) or c <= 0:
            raise ValueError(f"chunk size for dim {d!r} must be a positive int or -1; got {c!r}.")
        result.append(int(min(c, max(n, 1))))
    return tuple(result)


def native(dtype: Any) -> np.dtype:
    """The same dtype in native byte order."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


def plain_name(name: Any, what: str = "name", *, taken: Sequence[str] = ()) -> str:
    """Check that ``name`` is a plain name for a node inside a store; return it.

    A plain name is a non-empty string without path separators, not ``.`` or ``..``,
    not hidden (no leading ``.``: volnorm's staging and lock files are hidden), without
    control characters, and not one of ``taken`` (e.g. the store's volumes). Everything
    volnorm creates or replaces inside a store is named this way, so that a name can
    never reach outside the output the user named.

    Parameters
    ----------
    name : str
        The candidate.
    what : str
        What the name is for, in the error message (e.g. ``"outputs.voxel_histogram.name"``).
    taken : sequence of str
        Names already used in the store that this one may not replace.

    Returns
    -------
    str
        ``name``, unchanged.

    Raises
    ------
    ValueError
        Naming the problem.

    Examples
    --------
    >>> plain_name("voxel_histogram")
    'voxel_histogram'
    >>> plain_name("../victim.zarr", "--name")
    Traceback (most recent call last):
    ...
    ValueError: --name '../victim.zarr': must be a plain name inside the store (no '/', '\\\\', '..', leading '.', or absolute path)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} {name!r}: must be a non-empty string")
    if (
        "/" in name or "\\" in name or name.startswith(".") or ":" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name) or len(name) > 255
    ):
        raise ValueError(
            f"{what} {name!r}: must be a plain name inside the store "
            "(no '/', '\\\\', '..', leading '.', or absolute path)"
        )
    if name in set(taken):
        raise ValueError(f"{what} {name!r}: the store already has a volume of that name; choose another name")
    return name


def cached_fraction(path: str | os.PathLike) -> float:
    """The share of a file's pages held in this host's page cache, 0.0 to 1.0 (``mincore``).

    0.0 where it cannot be told (no such file, an empty file, a system without ``mincore``).
    Only an ordering hint: a file read last by a previous pass is mostly still cached when a
    cohort is larger than the RAM.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...     _ = f.write(b"x" * 8192); f.flush()
    ...     0.0 <= cached_fraction(f.name) <= 1.0
    True
    >>> cached_fraction("/no/such/file")
    0.0
    """
    import ctypes

    try:
        libc = _libc()
        fd = os.open(path, os.O_RDONLY)
    except (OSError, AttributeError):
        return 0.0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0.0
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return 0.0
            return float(np.count_nonzero(np.frombuffer(vec, np.uint8) & 1)) / len(vec)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


@functools.cache
def _libc() -> Any:
    """libc with mmap, mincore and munmap typed (AttributeError where there is no mincore)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc

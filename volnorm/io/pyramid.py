"""Resolution pyramids: the levels ``1, 2, ...`` of a NIfTI-Zarr group, for viewers.

Each level halves the spatial axes (``x``, ``y``, ``z``; never ``volume`` or ``t``) of the
level above, lazily, block by block, so the levels are written from the same dask graph
as level 0:

- **images** (``downsample="mean"``): the mean of each 2×2×2 block, exactly as
  :func:`skimage.transform.downscale_local_mean` computes it: an odd axis is padded with
  zeros (``cval=0``) to an even length, so the last voxel of an odd axis is averaged with
  zeros. The mean is taken in float64 on the *stored* (raw, unscaled) values and cast
  back to the stored dtype: integers are rounded to the nearest (half to even, ``np.rint``);
  floats keep their dtype. So every level has the dtype of level 0 and the NIfTI header's
  datatype and ``scl_slope``/``scl_inter`` describe every level (readers apply the same
  scaling; ``nifti-zarr``'s ``zarr2nii(level=k)`` writes a valid file), and each level is
  an eighth of the bytes of the one above.
- **labels and masks** (``downsample="mode"``): the most frequent value of each block
  (ties: the smallest value), counting only the voxels inside the image (an odd edge is
  padded by repeating its last voxel, which counts each real voxel of the block equally
  often). A mean of labels is not a label.

An axis of length 1 is not halved (it would average its voxels with the zero padding);
a level that would halve no axis is refused. Geometry: level ``k``'s voxel ``i`` covers
the voxels ``f*i ... f*i + f - 1`` of level 0 along an axis halved ``log2(f)`` times
(padding included), so its centre is level-0 index ``f*i + (f - 1)/2``. The OME-Zarr
0.5 metadata say so (scale ``zoom * f``, translation ``zoom * (f - 1)/2``) and the
NIfTI affine of level ``k`` is the header's affine times that index map
(:func:`level_affine`), as ``nifti-zarr`` computes it from the OME metadata.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np

from volnorm.io.nifti import header_from_bytes

__all__ = [
    "DOWNSAMPLE", "LABEL_INTENTS", "SlabLevels", "auto_downsample", "check_downsample", "SPATIAL", "downsample", "level_affine", "level_chunks", "level_factors", "level_header",
    "level_shape",
    "multiscales", "pyramid",
]

#: The axes a level halves.
SPATIAL = ("z", "y", "x")
#: How a level is made from the one above: the words of ``downsample=`` (CLI ``--downsample``,
#: spec ``output.downsample``) and the OME-Zarr ``type`` they are recorded as.
DOWNSAMPLE = {"mean": "local_mean", "mode": "mode"}


def check_downsample(method: Any, levels: Any) -> None:
    """Refuse a wrong ``levels``/``downsample`` pair with a message naming the option.

    >>> check_downsample("mean", 3)
    >>> check_downsample("median", 2)
    Traceback (most recent call last):
    ...
    ValueError: `downsample` must be 'mean' (images) or 'mode' (labels, masks); got 'median'
    """
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"`levels` must be a positive integer (1: no pyramid); got {levels!r}")
    if method is not None and method not in DOWNSAMPLE:
        raise ValueError(f"`downsample` must be 'mean' (images) or 'mode' (labels, masks); got {method!r}")


#: NIfTI intent codes of label images (NIFTI_INTENT_LABEL, NIFTI_INTENT_NEURONAME): their levels take the mode.
LABEL_INTENTS = (1002, 1003)


def auto_downsample(dtype: Any, header_bytes: bytes | None = None) -> str:
    """``"mode"`` for what is known to be labels or a mask: boolean data, or a NIfTI header
    whose intent is a label image (``intent_code`` 1002 ``NIFTI_INTENT_LABEL`` or 1003
    ``NIFTI_INTENT_NEURONAME``); else ``"mean"``. An explicit ``downsample=`` wins.

    >>> auto_downsample(np.bool_), auto_downsample(np.int16)
    ('mode', 'mean')
    """
    if np.dtype(dtype) == np.bool_:
        return "mode"
    if header_bytes is not None and int(header_from_bytes(header_bytes)["intent_code"]) in LABEL_INTENTS:
        return "mode"
    return "mean"


def level_factors(shape: Sequence[int], dims: Sequence[str], levels: int, *, where: str = "") -> list[tuple[int, ...]]:
    """The factor of each axis from level 0 to each level (``1`` for level 0 itself).

    An axis is halved at a level when it is spatial and longer than 1 at the level above.

    Parameters
    ----------
    shape, dims : sequence
        Level 0's shape and dims (C order).
    levels : int
        How many levels, level 0 included.
    where : str
        Named in the error (the volume).

    Returns
    -------
    list of tuple of int
        ``levels`` tuples, one factor per axis.

    Raises
    ------
    ValueError
        When a level would halve no axis (every spatial axis is already 1).

    Examples
    --------
    >>> level_factors((20, 3, 8, 9), ("t", "z", "y", "x"), 3)
    [(1, 1, 1, 1), (1, 2, 2, 2), (1, 4, 4, 4)]
    >>> level_factors((1, 4, 4), ("z", "y", "x"), 3)
    [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    """
    out = [(1,) * len(shape)]
    cur = list(shape)
    for k in range(1, levels):
        halve = [d in SPATIAL and n > 1 for d, n in zip(dims, cur)]
        if not any(halve):
            raise ValueError(
                f"{where + ': ' if where else ''}levels={levels}: shape {tuple(shape)} has only {k} level(s) "
                "(each halves the spatial axes until they are 1)"
            )
        cur = [math.ceil(n / 2) if h else n for n, h in zip(cur, halve)]
        out.append(tuple(f * (2 if h else 1) for f, h in zip(out[-1], halve)))
    return out


def level_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """A level's shape from level 0's and its factors (each halving rounds up).

    >>> level_shape((25, 41, 33), (4, 4, 4))
    (7, 11, 9)
    """
    out = []
    for n, f in zip(shape, factors):
        while f > 1:
            n, f = math.ceil(n / 2), f // 2
        out.append(n)
    return tuple(out)


def level_chunks(chunks: Sequence[int], shape: Sequence[int], dims: Sequence[str]) -> tuple[int, ...]:
    """A level's zarr chunks: level 0's (an odd spatial length made even, so a chunk's
    blocks never straddle two chunks of the level above), at most the level's shape.

    >>> level_chunks((25, 41, 33), (13, 21, 17), ("z", "y", "x"))
    (13, 21, 17)
    >>> level_chunks((1, 8, 41, 33), (20, 4, 21, 17), ("t", "z", "y", "x"))
    (1, 4, 21, 17)
    """
    return tuple(min(n, c + c % 2 if d in SPATIAL else c) for c, n, d in zip(chunks, shape, dims))


def _views(x: np.ndarray, step: Sequence[int]) -> list[np.ndarray]:
    """The strided views of ``x`` (padded to multiples of ``step``), one per offset in a block."""
    return [x[tuple(slice(o, None, s) for o, s in zip(off, step))] for off in itertools.product(*(range(s) for s in step))]


def _mean_block(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """``downscale_local_mean(x, step)`` (zero padding) in float64, cast back to ``x``'s dtype."""
    pad = [(0, -n % s) for n, s in zip(x.shape, step)]
    if any(p for _, p in pad):
        x = np.pad(x, pad, mode="constant", constant_values=0)
    views = _views(x, step)
    acc = views[0].astype(np.float64)
    for v in views[1:]:
        acc += v
    acc /= len(views)
    if x.dtype.kind in "iu":
        return np.rint(acc).astype(x.dtype)
    return acc.astype(x.dtype)


def _mode_block(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """The most frequent value of each block (ties: the smallest), real voxels only."""
    pad = [(0, -n % s) for n, s in zip(x.shape, step)]
    if any(p for _, p in pad):
        x = np.pad(x, pad, mode="edge")  # repeats each real voxel of an edge block equally often
    views = _views(x, step)
    best = views[0].copy()
    best_n = np.zeros(best.shape, dtype=np.int8)
    for v in views:
        n = np.zeros(best.shape, dtype=np.int8)
        for w in views:
            n += v == w
        better = (n > best_n) | ((n == best_n) & (v < best))
        best[better] = v[better]
        best_n[better] = n[better]
    return best


def downsample(x: da.Array, dims: Sequence[str], method: str = "mean") -> da.Array:
    """One level down: halve the spatial axes longer than 1, lazily, block by block.

    Parameters
    ----------
    x : dask.array.Array
        The level above (the stored values), dims ``dims``.
    dims : sequence of str
        ``x``'s dims; only ``z``, ``y``, ``x`` are halved.
    method : {"mean", "mode"}
        ``mean``: :func:`skimage.transform.downscale_local_mean` (zero padding), cast back
        to ``x``'s dtype (integers rounded to nearest); ``mode``: the most frequent value.

    Returns
    -------
    dask.array.Array
        Lazy; nothing is computed. Same dtype as ``x``; chunks half of ``x``'s (``x`` is
        first rechunked where a chunk, not the last, has an odd length on a halved axis).

    Examples
    --------
    >>> x = da.from_array(np.arange(12, dtype=np.int16).reshape(1, 3, 4), chunks=2)
    >>> downsample(x, ("z", "y", "x")).compute()
    array([[[2, 4],
            [4, 5]]], dtype=int16)
    """
    check_downsample(method, 1)
    step = tuple(2 if d in SPATIAL and n > 1 else 1 for d, n in zip(dims, x.shape))
    even = tuple(
        c if s == 1 or all(b % 2 == 0 for b in c[:-1]) else _even_chunks(c)
        for c, s in zip(x.chunks, step)
    )
    if even != x.chunks:
        x = x.rechunk(even)
    out_chunks = tuple(tuple(math.ceil(b / s) for b in c) for c, s in zip(x.chunks, step))
    kernel = _mean_block if method == "mean" else _mode_block
    return x.map_blocks(functools.partial(kernel, step=step), chunks=out_chunks, dtype=x.dtype, meta=np.empty((0,) * x.ndim, dtype=x.dtype),
                        name=f"downsample-{method}-{da.core.tokenize(x, step)}")


def _even_chunks(c: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of even length (the last may be odd) covering ``sum(c)``, about ``c[0]`` long."""
    size, n = c[0] + c[0] % 2, sum(c)
    return tuple(min(size, n - s) for s in range(0, n, size))


def pyramid(x: da.Array, dims: Sequence[str], levels: int, method: str = "mean",
            chunks: Sequence[int] | None = None) -> list[da.Array]:
    """Levels ``1 .. levels-1`` of ``x`` (level 0), each from the one above, lazily.

    Parameters
    ----------
    x : dask.array.Array
        Level 0.
    dims : sequence of str
        Its dims.
    levels : int
        How many levels, level 0 included (1: none).
    method : {"mean", "mode"}
        See :func:`downsample`.
    chunks : sequence of int, optional
        Level 0's zarr chunks: each level is rechunked to :func:`level_chunks` of them
        (whole zarr chunks per block, so it can be written block by block).

    Returns
    -------
    list of dask.array.Array
        ``levels - 1`` arrays; nothing is computed.

    Examples
    --------
    >>> x = da.zeros((1, 9, 8), dtype=np.uint8, chunks=4)
    >>> [a.shape for a in pyramid(x, ("z", "y", "x"), 3)]
    [(1, 5, 4), (1, 3, 2)]
    """
    level_factors(x.shape, dims, levels)  # refuses too many levels, before any graph is made
    out: list[da.Array] = []
    cur = x
    for _ in range(1, levels):
        cur = downsample(cur, dims, method)
        if chunks is not None:
            cur = cur.rechunk(level_chunks(chunks, cur.shape, dims))
        out.append(cur)
    return out


# ---------------------------------------------------------------------------
# geometry: OME-Zarr metadata, NIfTI affine and header of a level
# ---------------------------------------------------------------------------


def multiscales(name: str, dims: Sequence[str], scale: Sequence[float], axes: list[dict],
                factors: Sequence[Sequence[int]], method: str = "mean") -> dict:
    """The OME-Zarr 0.5 ``multiscales`` entry of a group with levels ``"0", "1", ...``.

    Parameters
    ----------
    name : str
        The multiscale's name (the volume).
    dims : sequence of str
        Axis names, C order.
    scale : sequence of float
        Level 0's scale per axis (voxel size, or 1).
    axes : list of dict
        The OME ``axes`` entries (name, type, unit).
    factors : sequence of tuple of int
        Each level's factor per axis (:func:`level_factors`).
    method : {"mean", "mode"}
        Recorded as the multiscale's ``type`` (``local_mean`` or ``mode``).

    Returns
    -------
    dict
        One ``multiscales`` entry: level ``k``'s scale is ``scale * f`` and its translation
        ``scale * (f - 1) / 2``, so voxel centres stay where they are.

    Examples
    --------
    >>> ms = multiscales("a", ("z", "y", "x"), (2.0, 2.0, 2.0), [], [(1, 1, 1), (2, 2, 2)])
    >>> ms["datasets"][1]["coordinateTransformations"]
    [{'type': 'scale', 'scale': [4.0, 4.0, 4.0]}, {'type': 'translation', 'translation': [1.0, 1.0, 1.0]}]
    """
    datasets = []
    for k, f in enumerate(factors):
        datasets.append({
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [float(s * n) for s, n in zip(scale, f)]},
                {"type": "translation", "translation": [float(s * (n - 1) / 2) for s, n in zip(scale, f)]},
            ],
        })
    return {"name": name, "axes": axes, "datasets": datasets, "type": DOWNSAMPLE[method] if len(factors) > 1 else "none"}


def level_affine(affine: Any, factors: Sequence[int], dims: Sequence[str]) -> np.ndarray:
    """The affine of a level: level-``k`` voxel centres to the world positions of the same points.

    ``affine @ M``, ``M`` mapping a level-``k`` NIfTI index ``(i, j, k)`` to the level-0 index
    ``f * i + (f - 1) / 2`` along each axis (``f`` its factor).

    Parameters
    ----------
    affine : array-like
        Level 0's 4×4 affine (NIfTI axes i, j, k = x, y, z).
    factors : sequence of int
        The level's factor per dim (:func:`level_factors`).
    dims : sequence of str
        The dims, C order.

    Returns
    -------
    numpy.ndarray
        4×4, float64.

    Examples
    --------
    >>> level_affine(np.diag([2.0, 2.0, 2.0, 1.0]), (2, 2, 2), ("z", "y", "x"))[:3, 3].tolist()
    [1.0, 1.0, 1.0]
    """
    f = {d: n for d, n in zip(dims, factors)}
    m = np.eye(4)
    for i, d in enumerate("xyz"):
        n = f.get(d, 1)
        m[i, i] = n
        m[i, 3] = (n - 1) / 2
    return np.asarray(affine, dtype=np.float64) @ m


def level_header(header_bytes: bytes, shape: Sequence[int], factors: Sequence[int], dims: Sequence[str]) -> bytes:
    """The NIfTI header (bytes, extensions kept) of a level: its shape, voxel sizes and the
    qform/sform of :func:`level_affine`; datatype and scaling unchanged.

    Parameters
    ----------
    header_bytes : bytes
        Level 0's header bytes (as stored in the group's ``nifti`` array).
    shape : sequence of int
        The level's shape, C order.
    factors : sequence of int
        Its factor per dim.
    dims : sequence of str
        The dims, C order.

    Returns
    -------
    bytes
        Same length as ``header_bytes``; level 0's unchanged when every factor is 1.

    Examples
    --------
    >>> import nibabel as nib, io
    >>> h = nib.Nifti1Header(); h.set_data_shape((4, 4, 4)); h.set_zooms((2.0, 2.0, 2.0))
    >>> h.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    >>> b = io.BytesIO(); h.write_to(b)
    >>> header_from_bytes(level_header(b.getvalue(), (2, 2, 2), (2, 2, 2), "zyx")).get_zooms() == (4, 4, 4)
    True
    """
    if all(n == 1 for n in factors):
        return header_bytes
    hdr = header_from_bytes(header_bytes)
    qform, qcode = hdr.get_qform(coded=True)  # before the zooms change (the qform is made of them)
    sform, scode = hdr.get_sform(coded=True)
    nifti_shape = tuple(reversed(tuple(shape)))
    zooms = list(hdr.get_zooms())
    hdr.set_data_shape(nifti_shape)
    f = {d: n for d, n in zip(dims, factors)}
    for i, d in enumerate("xyz"):
        if i < len(zooms):
            zooms[i] = zooms[i] * f.get(d, 1)
    hdr.set_zooms(zooms[: len(nifti_shape)])
    if qcode:
        hdr.set_qform(level_affine(qform, factors, dims), int(qcode))
    if scode:
        hdr.set_sform(level_affine(sform, factors, dims), int(scode))
    block = hdr.binaryblock
    return block + header_bytes[len(block):]


# ---------------------------------------------------------------------------
# levels of a stream of slabs (conversion: the file is read once, in order)
# ---------------------------------------------------------------------------


class SlabLevels:
    """Make and write the levels ``1, 2, ...`` of a volume from its level-0 slabs, as a
    conversion reads them in file order (:func:`volnorm.io.niftizarr.stream_slabs`: regions
    over the leading axes, each whole along the later ones).

    Each slab is reduced as it comes (the same kernels, so the bytes equal :func:`pyramid`'s);
    a level's pieces are kept until they fill a whole chunk of that level along the slab axis,
    then written and passed on to the next level. Memory: about a quarter of a level-0 chunk.

    Parameters
    ----------
    targets : sequence of zarr.Array
        The levels ``1 .. N-1`` (empty: nothing to do).
    shape, dims, chunks : sequence
        Level 0's.
    method : {"mean", "mode"}
        See :func:`downsample`.

    Examples
    --------
    >>> import zarr
    >>> x = np.arange(64, dtype=np.int16).reshape(4, 4, 4)
    >>> z = zarr.create_array({}, shape=(2, 2, 2), chunks=(2, 2, 2), dtype="i2")
    >>> sl = SlabLevels([z], x.shape, "zyx", (2, 4, 4))
    >>> sl.streams
    True
    >>> for s in (0, 2):
    ...     sl.feed((slice(s, s + 2),), x[s:s + 2])
    >>> bool((z[:] == downsample(da.from_array(x), "zyx").compute()).all())
    True
    """

    def __init__(self, targets: Sequence[Any], shape: Sequence[int], dims: Sequence[str], chunks: Sequence[int],
                 method: str = "mean") -> None:
        self.targets, self.dims, self.method = list(targets), tuple(dims), method
        factors = level_factors(shape, dims, len(self.targets) + 1)
        self.shapes = [level_shape(shape, f) for f in factors]
        # the step of each level from the one above
        self.steps = [tuple(b // a for a, b in zip(factors[k - 1], factors[k])) for k in range(1, len(factors))]
        k = 0
        while k < len(shape) - 1 and chunks[k] == 1:
            k += 1
        self.axis = k  # the slab axis; the axes before it go one index at a time
        lead_halved = any(s[i] > 1 for s in self.steps for i in range(k))
        aligned = all(s[k] == 1 for s in self.steps) or chunks[k] % 2 == 0 or chunks[k] >= shape[k]
        #: whether the slabs can be reduced as they come (else the levels are made from the written level 0)
        self.streams = bool(self.targets) and not lead_halved and aligned
        self.pending: list[list[tuple[tuple[slice, ...], np.ndarray]]] = [[] for _ in self.targets]

    def feed(self, region: tuple[slice, ...], slab: np.ndarray, level: int = 0) -> None:
        """Take the slab ``region`` of level ``level`` (0: the file's); write what it completes."""
        if level >= len(self.targets):
            return
        k, step = self.axis, self.steps[level]
        kernel = _mean_block if self.method == "mean" else _mode_block
        out = kernel(slab, step)
        part = region[:k] + (slice(region[k].start // step[k], math.ceil(region[k].stop / step[k])),)
        pending = self.pending[level]
        pending.append((part, out))
        target = self.targets[level]
        start, stop = pending[0][0][k].start, part[k].stop
        if stop - start >= target.chunks[k] or stop == self.shapes[level + 1][k]:
            data = pending[0][1] if len(pending) == 1 else np.concatenate([p for _, p in pending], axis=k)
            whole = part[:k] + (slice(start, stop),)
            target[whole] = data
            pending.clear()
            self.feed(whole, data, level + 1)

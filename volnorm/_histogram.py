"""Exact, mergeable histograms over any ``dim`` of a stack (the statistics engine).

One map over the chunks (a GIL-free numba kernel per chunk) followed by a
dask tree reduction over the reduced dims: the histogram of the whole is the
sum of the histograms of its parts, whatever the chunking. NaN, ±Inf,
out-of-range and masked-out voxels are counted apart (coords ``n_nan``,
``n_posinf``, ``n_neginf``, ``n_below``, ``n_above``, ``n_masked_out``), never
dropped silently nor folded into the edge bins.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import dask
import dask.array as da
import numpy as np
import xarray as xr

from volnorm import _kernels
from volnorm._dims import split
from volnorm._eager import in_memory_dask, in_memory_rows, reduce_rows
from volnorm.engine import compute_small

logger = logging.getLogger(__name__)

_range = range  # `histogram` takes numpy's `range=` keyword, which hides the builtin

#: Integer data wider than this many distinct values need ``bins=`` (memory of the result).
MAX_INT_BINS = 2**20


def numba_ready(x: np.ndarray) -> np.ndarray:
    """What the kernels take: numba has no float16 (float32 holds every float16 value exactly)
    and no byte-swapped types (a big-endian array, as nibabel's ``dataobj`` of a big-endian
    file gives, in native order)."""
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x.astype(np.float32) if x.dtype == np.float16 else x


def rows_of(location: Sequence[tuple[int, int]], kshape: tuple) -> np.ndarray:
    """The flat row indices (over the kept dims of shape ``kshape``) of a block spanning
    ``location`` = ``[(start, stop), ...]`` along those dims; one row 0 when nothing is kept."""
    if not kshape:
        return np.zeros(1, dtype=np.int64)
    grids = np.meshgrid(*[np.arange(a, z) for a, z in location], indexing="ij")
    return np.ravel_multi_index(tuple(g.ravel() for g in grids), kshape)


def _block_hist(
    x: np.ndarray, m: np.ndarray | None, w: np.ndarray | None, *, nkept: int, spec: BinSpec
) -> np.ndarray:
    kshape = x.shape[:nkept]
    rows = math.prod(kshape)
    x = numba_ready(x)
    x2 = np.ascontiguousarray(x).reshape(rows, -1)
    m2 = None if m is None else np.ascontiguousarray(m, dtype=np.bool_).reshape(rows, -1)
    w2 = None if w is None else np.ascontiguousarray(w, dtype=np.float64).reshape(rows, -1)
    nbins = spec.nbins
    out = np.zeros((rows, nbins + _kernels.NEXTRA), dtype=np.int64 if w is None else np.float64)
    if spec.kind == "int" and x2.dtype.itemsize == 1 and m2 is None and w2 is None:
        _kernels.hist_byte(x2.view(np.uint8), x2.dtype.kind == "i", spec.lo, nbins, out)
    elif spec.kind == "int":
        _kernels.hist_int(x2, spec.lo, nbins, out, m2, w2)
    else:
        _kernels.hist_float(x2, spec.edges, out, m2, w2, spec.slack)
    return out.reshape(kshape + (1,) * (x.ndim - nkept) + (nbins + _kernels.NEXTRA,))


def _block_minmax(x: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    x = x.view(np.uint8) if x.dtype == np.bool_ else numba_ready(x)
    if x.dtype.kind == "f":
        out = np.array([np.inf, -np.inf], dtype=x.dtype)  # the data's dtype: the loop vectorizes
    else:
        info = np.iinfo(x.dtype)
        out = np.array([info.max, info.min], dtype=x.dtype)
    m1 = None if m is None else np.ascontiguousarray(m, dtype=np.bool_).reshape(-1)
    _kernels.minmax(np.ascontiguousarray(x).reshape(-1), out, m1)
    out = out.astype(np.float64 if x.dtype.kind == "f" else np.int64 if x.dtype.kind != "u" else np.uint64)
    return out.reshape((1,) * x.ndim + (2,))


def value_range(
    data: xr.DataArray | xr.DataTree, mask: xr.DataArray | xr.DataTree | None = None
) -> tuple[float, float]:
    """NaN/Inf-ignoring (min, max) of the (masked) voxels of ``data``. Computes: one pass.

    A collection (``DataTree``) gives the range over all its volumes. Raises
    ``ValueError`` when no voxel is finite (or none is inside the mask).

    >>> import xarray as xr, numpy as np
    >>> value_range(xr.DataArray(np.array([np.nan, 2.0, -1.0, np.inf])))
    (-1.0, 2.0)
    """
    pieces = []
    for _, img, m in parts_of(data, mask):
        _, args = prepare(img, (), tuple(img.dims), m)
        a0 = args[0]
        ind = tuple(range(a0.ndim))
        pairs: list[Any] = []
        for a in args:
            pairs += [a, ind]
        dt = np.float64 if a0.dtype.kind == "f" else np.int64 if a0.dtype.kind != "u" else np.uint64
        mm = da.blockwise(
            _block_minmax, ind + (a0.ndim,), *pairs, new_axes={a0.ndim: 2},
            adjust_chunks={i: 1 for i in ind}, dtype=dt, meta=np.empty((0,) * (a0.ndim + 1), dtype=dt),
        ).reshape(-1, 2)
        pieces += [mm[:, 0].min(), mm[:, 1].max()]
    vals = dask.compute(*pieces)
    lo, hi = min(vals[0::2]), max(vals[1::2])
    if lo > hi or not (math.isfinite(lo) and math.isfinite(hi)):
        what = "inside the mask" if mask is not None else "(all NaN or ±Inf)"
        raise ValueError(f"the data hold no finite value {what}: there is no range to histogram")
    if isinstance(lo, (np.integer, int)):
        return int(lo), int(hi)  # type: ignore[return-value]
    return float(lo), float(hi)


def _check_grid(data: xr.DataArray, other: xr.DataArray, what: str) -> None:
    a, b = data.attrs.get("affine"), other.attrs.get("affine")
    if a is not None and b is not None and not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4):
        raise ValueError(
            f"`{what}` is on another grid than the data (its affine differs: {np.asarray(b).tolist()} "
            f"vs {np.asarray(a).tolist()}); resample it onto the data first"
        )


def _align(data: xr.DataArray, x: xr.DataArray, other: Any, what: str) -> da.Array:
    if not isinstance(other, xr.DataArray):
        raise TypeError(f"`{what}` must be an xarray.DataArray; got {type(other).__name__}")
    extra = [d for d in other.dims if d not in data.dims]
    if extra:
        raise ValueError(f"`{what}` has dims {extra!r} that the data do not have (data dims {data.dims!r})")
    for d in other.dims:
        if other.sizes[d] != data.sizes[d]:
            raise ValueError(
                f"`{what}` has {other.sizes[d]} along {d!r} but the data have {data.sizes[d]} "
                f"({what} shape {dict(other.sizes)}, data shape {dict(data.sizes)})"
            )
    _check_grid(data, other, what)
    o = other.drop_vars(list(other.coords)).broadcast_like(x.drop_vars(list(x.coords))).transpose(*x.dims)
    return o.data if isinstance(o.data, da.Array) else da.from_array(np.asarray(o.data))


def prepare(
    data: xr.DataArray,
    kept: tuple,
    reduced: tuple,
    mask: xr.DataArray | None,
    weights: xr.DataArray | None = None,
) -> tuple[xr.DataArray, list[da.Array]]:
    """Transpose to (kept..., reduced...), check and align mask (and weights);
    dask arrays ``[x, mask?, weights?]`` with unified chunks."""
    x = data.transpose(*kept, *reduced)
    xa = x.data if isinstance(x.data, da.Array) else in_memory_dask(np.asarray(x.data))
    args = [xa]
    if mask is not None:
        if isinstance(mask, xr.DataArray) and mask.dtype != np.bool_:
            raise TypeError(f"`mask` must be boolean; got dtype {mask.dtype} (use `mask != 0`)")
        args.append(_align(data, x, mask, "mask"))
    if weights is not None:
        if isinstance(weights, xr.DataArray) and weights.dtype.kind not in "iuf":
            raise TypeError(f"`weights` must be numeric; got dtype {weights.dtype}")
        args.append(_align(data, x, weights, "weights"))
    if len(args) > 1:
        pairs: list[Any] = []
        for a in args:
            pairs += [a, tuple(range(a.ndim))]
        _, args = da.core.unify_chunks(*pairs)
    return x, list(args)


def per_block(func: Any, args: list[da.Array], nkept: int, width: int, dtype: Any, token: Any) -> da.Array:
    """Map ``func(x_block, *other_blocks)`` over the chunks; each result keeps the kept axes,
    shrinks every reduced axis to 1 and adds a last axis of ``width`` (one GIL-free call per chunk)."""
    ndim = args[0].ndim
    ind = tuple(range(ndim))
    pairs: list[Any] = []
    for a in args:
        pairs += [a, ind]
    return da.blockwise(
        func, ind + (ndim,), *pairs,
        new_axes={ndim: width},
        adjust_chunks={i: 1 for i in ind[nkept:]},
        dtype=dtype,
        meta=np.empty((0,) * (ndim + 1), dtype=dtype),
        name=f"{getattr(func, '__name__', 'block')}-{dask.base.tokenize(*args, nkept, width, token)}",
    )


# ---------------------------------------------------------------------------
# collections: a DataTree with one node per volume, each holding ``image``
# ---------------------------------------------------------------------------


def parts_of(
    data: xr.DataArray | xr.DataTree, mask: xr.DataArray | xr.DataTree | None = None
) -> list[tuple[str | None, xr.DataArray, xr.DataArray | None]]:
    """``[(node name, image, mask)]``: one entry for a DataArray, one per volume of a collection.

    A collection's mask is a DataTree with the same nodes, each holding one
    boolean variable (``mask``, or its only variable).
    """
    if isinstance(data, xr.DataArray):
        if isinstance(mask, xr.DataTree):
            raise TypeError("`mask` is a DataTree (a collection's masks) but the data are one DataArray")
        return [(None, data, mask)]
    if not isinstance(data, xr.DataTree):
        raise TypeError(f"`data` must be an xarray.DataArray or DataTree; got {type(data).__name__}")
    out: list[tuple[str | None, xr.DataArray, xr.DataArray | None]] = []
    for node in data.subtree:
        if "image" not in node.data_vars:
            continue
        name = node.relative_to(data) if node is not data else node.name or "/"
        m = None
        if mask is not None:
            if not isinstance(mask, xr.DataTree):
                raise TypeError(
                    "a collection's `mask` must be a DataTree with the same nodes (volumes differ in shape)"
                )
            try:
                mnode = mask[name]
            except KeyError:
                raise ValueError(f"`mask` has no node {name!r} (the collection's volume)") from None
            vars_ = list(mnode.data_vars)
            key = "mask" if "mask" in vars_ else vars_[0] if len(vars_) == 1 else None
            if key is None:
                raise ValueError(f"`mask` node {name!r} must hold a `mask` variable; it has {vars_!r}")
            m = mnode[key]
        out.append((str(name), node["image"], m))
    if not out:
        raise ValueError("the DataTree holds no `image` variable: not a volnorm collection")
    return out


def node_dims(img: xr.DataArray, dim: Hashable | Sequence[Hashable] | None, all_dims: set) -> tuple | None:
    """The dims of one collection volume that ``dim`` reduces (``None`` = all)."""
    if dim is None:
        return None
    wanted = (dim,) if isinstance(dim, str) or not isinstance(dim, Sequence) else tuple(dim)
    unknown = [d for d in wanted if d not in all_dims]
    if unknown:
        raise ValueError(f"`dim` names {unknown!r}, which no volume of the collection has; dims: {sorted(map(str, all_dims))}")
    own = tuple(d for d in wanted if d in img.dims)
    return own if own else None


def over_collection(
    func: Any,
    data: xr.DataTree,
    dim: Hashable | Sequence[Hashable] | None,
    mask: xr.DataTree | None,
    **kwargs: Any,
) -> xr.DataArray | xr.Dataset | xr.DataTree:
    """``func`` on each volume of a collection: stacked along ``volume`` when every volume is
    reduced whole (per-volume statistics), else a DataTree with one node per volume."""
    parts = parts_of(data, mask)
    all_dims = set().union(*(p[1].dims for p in parts))
    results = {}
    whole = True
    for name, img, m in parts:
        own = node_dims(img, dim, all_dims)
        whole &= own is None or set(own) == set(img.dims)
        results[name] = func(img, dim=own, mask=m, **kwargs)
    if whole:
        names = list(results)
        res = [r.drop_vars([c for c in r.coords if c not in r.dims and not str(c).startswith(("n_", "bin"))]) for r in results.values()]
        return xr.concat(res, dim=xr.DataArray(names, dims="volume", name="volume"), coords="different", compat="equals")
    return xr.DataTree.from_dict(
        {n: (r.to_dataset() if isinstance(r, xr.DataArray) else r) for n, r in results.items()}
    )


# ---------------------------------------------------------------------------
# the histogram
# ---------------------------------------------------------------------------


class BinSpec(NamedTuple):
    """Bin layout: ``int`` one bin per integer ``lo..lo+nbins-1``; ``float`` equal bins on ``edges``."""

    kind: str
    lo: int
    nbins: int
    edges: np.ndarray  # float64 values of the edges (in the data's float dtype, as numpy makes them)
    lower: np.ndarray
    upper: np.ndarray
    centers: np.ndarray
    slack: float = 0.5  # see _kernels.edge_slack

    def kernel(self) -> BinSpec:
        """What the kernels use (kind, lo, nbins, edges, slack), without the per-bin lower,
        upper and centre arrays: every task of a graph carries its own copy of what its
        function captures, and a 16-bit spec's arrays are 1.5 MiB."""
        none = np.empty(0)
        return self._replace(lower=none, upper=none, centers=none)


def bin_spec(
    data: xr.DataArray | xr.DataTree,
    dtype: np.dtype,
    bins: int | None,
    range: tuple[float, float] | None,  # noqa: A002
    mask: Any = None,
) -> BinSpec:
    """Choose the bins (numpy's rules for float data); runs the range pass when needed."""
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins <= 0):
        raise ValueError(f"`bins` must be a positive int; got {bins!r}.")
    if range is not None:
        try:
            lo_r, hi_r = (float(v) for v in range)
        except (TypeError, ValueError):
            raise ValueError(f"`range` must be (lo, hi); got {range!r}.") from None
        if not (math.isfinite(lo_r) and math.isfinite(hi_r)) or lo_r >= hi_r:
            raise ValueError(f"`range` must be finite (lo, hi) with lo < hi; got {range!r}.")
    kind_char = dtype.kind
    if kind_char not in "iufb":
        raise TypeError(f"cannot histogram dtype {dtype}")
    if kind_char in "iub" and bins is None:
        if range is not None:
            lo, hi = math.ceil(lo_r), math.floor(hi_r)
            if lo > hi:
                raise ValueError(f"`range` {range!r} holds no integer value of the integer data")
        elif dtype.itemsize == 1 or kind_char == "b":
            info = np.iinfo(np.uint8 if kind_char == "b" else dtype)
            lo, hi = int(info.min), int(info.max)
        else:
            lo, hi = (int(v) for v in value_range(data, mask))
        nbins = hi - lo + 1
        if nbins > MAX_INT_BINS:
            raise ValueError(
                f"the integer data span {nbins} values ({lo}..{hi}); pass bins= (and range=) for fewer bins"
            )
        centers = np.arange(lo, hi + 1, dtype=np.float64)
        return BinSpec("int", lo, nbins, np.empty(0), centers - 0.5, centers + 0.5, centers)
    nbins = int(bins) if bins is not None else 256
    if range is not None:
        flo, fhi = lo_r, hi_r
    else:
        flo, fhi = value_range(data, mask)
        if kind_char == "f":  # np.histogram takes a.min(), a.max() as scalars of the data's dtype
            flo, fhi = dtype.type(flo), dtype.type(fhi)
        if flo == fhi:  # np.histogram's rule for a constant image
            flo, fhi = flo - 0.5, fhi + 0.5
            if flo == fhi:  # ±0.5 is below the float type's step at this magnitude: the neighbouring values
                flo, fhi = np.nextafter(flo, -np.inf), np.nextafter(fhi, np.inf)
    # numpy's edges: in the data's float dtype (float32 data, float32 edges), so that
    # voxels next to an edge fall in the same bin as with np.histogram
    edge_dtype = np.result_type(dtype, np.float16) if kind_char == "f" else np.float64
    edges = np.linspace(flo, fhi, nbins + 1, dtype=edge_dtype)
    if np.any(edges[:-1] >= edges[1:]):
        raise ValueError(f"{nbins} bins over [{flo!r}, {fhi!r}] do not fit in {edge_dtype} (equal edges); use fewer bins")
    edges = edges.astype(np.float64)
    lower, upper = edges[:-1], edges[1:]
    slack = min(_kernels.edge_slack(edges), 0.5)
    return BinSpec("float", 0, nbins, edges, lower, upper, (lower + upper) / 2, slack)


def totals(
    data: xr.DataArray, spec: BinSpec, kept: tuple, reduced: tuple, mask: Any, weights: Any
) -> tuple[xr.DataArray, da.Array, da.Array]:
    """The transposed data, the ``(*kept, nbins)`` counts and the ``(*kept, NEXTRA)`` extra
    counters: lazy (dask), or numpy for in-memory data (counted now, at once)."""
    if weights is None and kept and tuple(data.dims[: len(reduced)]) == tuple(reduced):
        return _voxel_totals(data, spec, kept, reduced, mask)
    kspec = spec.kernel()  # what `block` captures
    at_once = in_memory_rows(data, kept, reduced, mask) if weights is None else None
    if at_once is not None:  # in memory: a share per thread, no graph; computed counts
        x, v, m = at_once
        t = reduce_rows(lambda a, b: _block_hist(a, b, None, nkept=1, spec=kspec), v, m, 0, np.add).reshape(*(x.sizes[d] for d in kept), -1)
        return x, t[..., : spec.nbins], t[..., spec.nbins :]
    x, args = prepare(data, kept, reduced, mask, weights)
    nk = len(kept)
    has_m, has_w = mask is not None, weights is not None

    def block(xb: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        mb = rest[0] if has_m else None
        wb = rest[-1] if has_w else None
        return _block_hist(xb, mb, wb, nkept=nk, spec=kspec)

    dtype = np.float64 if has_w else np.int64
    parts = per_block(block, args, nk, spec.nbins + _kernels.NEXTRA, dtype, token=(spec.kind, spec.lo, spec.edges, spec.nbins, spec.slack, has_m, has_w))
    total = add_up(parts, nk)
    return x, total[..., : spec.nbins], total[..., spec.nbins :]


def count_dtype(n: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every count up to ``n``.

    >>> count_dtype(255), count_dtype(256)
    (dtype('uint8'), dtype('uint16'))
    """
    for t in (np.uint8, np.uint16, np.uint32):
        if n <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


def _value_bins(dtype: np.dtype, spec: BinSpec) -> tuple[int, np.ndarray]:
    """Every value of an 8/16-bit integer dtype -> its bin on ``spec``'s float edges (numpy's rule:
    ``edges[k] <= v < edges[k + 1]``, the last bin closed) or its counter (below, above)."""
    info = np.iinfo(np.uint8 if dtype == np.bool_ else dtype)
    values = np.arange(info.min, info.max + 1, dtype=np.float64)
    edges, nb = spec.edges, spec.nbins
    k = np.searchsorted(edges, values, side="right") - 1
    k[values == edges[-1]] = nb - 1
    k = np.where(values < edges[0], nb + 3, np.where(values > edges[-1], nb + 4, k))
    return int(info.min), k.astype(np.int64)


def _voxel_rows(xb: np.ndarray, nred: int, dtype: np.dtype, split: bool) -> list[np.ndarray]:
    """A block (volumes first) as C-contiguous ``(volumes, voxels)`` pieces for the kernel: the
    whole block unless ``split``, else one ``(1, voxels)`` piece per volume, views of a block
    cut out of a stored chunk along its first voxel dim; a copy only where the voxels are not
    contiguous or the dtype differs."""
    x = numba_ready(xb)
    nv = math.prod(xb.shape[:nred])
    if not split:
        return [np.ascontiguousarray(x, dtype=dtype).reshape(nv, -1)]
    return [np.ascontiguousarray(v, dtype=dtype).reshape(1, -1) for v in x.reshape(nv, *xb.shape[nred:])]


def _voxel_leaf(blocks: list, mblocks: list | None, *, nred: int, spec: BinSpec, cdtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The counts and the extra counters of one group of volume blocks of one voxel tile: every
    block (volumes first, as stored) goes through the kernel into the same counts."""
    from numba.typed import List

    sshape = blocks[0].shape[nred:]
    nvox = math.prod(sshape)
    counts = np.empty((nvox, spec.nbins), dtype=cdtype)
    extra = np.empty((nvox, _kernels.NEXTRA), dtype=cdtype)
    edges = spec.edges if spec.kind == "float" else np.empty(0)
    ft = np.result_type(*(numba_ready(b[:0]).dtype for b in blocks))  # one dtype for the typed list
    lo, lut = spec.lo, np.empty(0, dtype=np.int64)
    if spec.kind == "float" and ft.kind in "iub" and ft.itemsize <= 2:  # small integers on float bins: a table
        lo, lut = _value_bins(ft, spec)
    xs, ms = List(), None if mblocks is None else List()
    for i, xb in enumerate(blocks):
        split = not (xb.flags.c_contiguous and (ms is None or mblocks[i].flags.c_contiguous))
        for piece in _voxel_rows(xb, nred, ft, split):
            xs.append(piece)
        if ms is not None:
            for piece in _voxel_rows(mblocks[i], nred, np.dtype(np.bool_), split):
                ms.append(piece)
    _kernels.voxel_hist(xs, lo, spec.nbins, edges, spec.slack, lut, counts, extra, ms)
    return counts.reshape((1, *sshape, spec.nbins)), extra.reshape((1, *sshape, _kernels.NEXTRA))


#: Per-voxel histograms: a task counts a group of volume blocks of one voxel tile into one count
#: array (voxels x bins, written out once whatever the number of volumes): about two volumes per bin per
#: group, at most VOXEL_IN_BYTES of values per group and VOXEL_OUT_BYTES of counts per tile
#: (a chunk of one whole 256^3 volume would otherwise give 1.7 GB of counts at 100 bins).
VOXEL_IN_BYTES = 64 * 2**20
VOXEL_OUT_BYTES = 32 * 2**20


def _voxel_split(data: xr.DataArray, kept: tuple, voxels: int) -> dict[Hashable, tuple[int, ...]]:
    """Smaller chunks along the kept (voxel) dims, outermost first, so that a block holds at
    most ``voxels`` voxels; empty when the chunks already do. Each chunk is cut into near-equal
    pieces (500 -> 250, 250, not 422, 78): every new block is a slice of one stored chunk, so
    nothing is copied or joined; volumes are not regrouped."""
    cur = {d: (max(data.chunksizes[d]) if data.chunks else data.sizes[d]) for d in kept}
    new: dict[Hashable, tuple[int, ...]] = {}
    for d in kept:
        rest = math.prod(v for k, v in cur.items() if k != d)
        if rest * cur[d] <= voxels:
            break
        size = max(1, voxels // rest)
        pieces = []
        for c in data.chunksizes[d] if data.chunks else (data.sizes[d],):
            n = -(-c // size)
            pieces += [c // n + (i < c % n) for i in _range(n)]
        new[d] = tuple(pieces)
        cur[d] = max(pieces)
    return new


def _voxel_totals(data: xr.DataArray, spec: BinSpec, kept: tuple, reduced: tuple, mask: Any) -> tuple[xr.DataArray, da.Array, da.Array]:
    """Per-voxel histograms across the leading (reduced) dims, e.g. ``dim="volume"``: blocks read
    as stored (volumes first, no transpose, no regrouping copy); counts in the smallest dtype that
    holds the number of volumes (it cannot overflow: no voxel is counted more often); groups of
    volume blocks counted together, then added with dask's tree reduction."""
    import functools
    import uuid

    from dask.highlevelgraph import HighLevelGraph

    cdtype = count_dtype(math.prod(data.sizes[d] for d in reduced))
    width = spec.nbins + _kernels.NEXTRA
    split = _voxel_split(data, kept, max(1, VOXEL_OUT_BYTES // (width * cdtype.itemsize)))
    if split:
        data = data.chunk(split)
        mask = mask.chunk({d: c for d, c in split.items() if d in mask.dims}) if isinstance(mask, xr.DataArray) else mask
    x, args = prepare(data, reduced, kept, mask)  # (reduced..., kept...): the data's own order
    xa = args[0]
    nred = len(reduced)
    rgrid = list(np.ndindex(*xa.numblocks[:nred]))  # the volume blocks, in order
    tiles = list(np.ndindex(*xa.numblocks[nred:]))
    vols_per_block = math.prod(max(c) for c in xa.chunks[:nred])
    tile_vox = math.prod(max(c) for c in xa.chunks[nred:])
    per_group = max(1, min(-(-2 * width // vols_per_block), VOXEL_IN_BYTES // max(1, vols_per_block * tile_vox * xa.dtype.itemsize)))
    groups = [rgrid[i : i + per_group] for i in _range(0, len(rgrid), per_group)]
    func = functools.partial(_voxel_leaf, nred=nred, spec=spec.kernel(), cdtype=cdtype)
    name = f"voxel-hist-{uuid.uuid4().hex}"
    dsk: dict = {}
    for g, members in enumerate(groups):
        for t in tiles:
            xs = [(xa.name, *r, *t) for r in members]
            ms = [(args[1].name, *r, *t) for r in members] if len(args) > 1 else None
            dsk[(name, g, *t)] = (func, xs, ms)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=args)
    out = []
    for i, n in enumerate((spec.nbins, _kernels.NEXTRA)):  # each leaf gives (counts, counters)
        part = f"{name}-{i}"
        layer = {(part, *k[1:], 0): (operator.getitem, k, i) for k in dsk}
        g2 = HighLevelGraph({**graph.layers, part: layer}, {**graph.dependencies, part: {name}})
        chunks = ((1,) * len(groups), *xa.chunks[nred:], (n,))
        leaves = da.Array(g2, part, chunks, meta=np.empty((0,) * len(chunks), dtype=cdtype))
        out.append(leaves[0] if len(groups) == 1 else leaves.sum(axis=0, dtype=cdtype))  # the tree reduction
    return x.transpose(*kept, *reduced), out[0], out[1]


def add_up(parts: da.Array, nkept: int) -> da.Array:
    """Sum :func:`per_block` results over the reduced axes with dask's tree reduction:
    ``(*kept, width)``. No reduction layer when each block already holds whole rows."""
    red_axes = tuple(_range(nkept, parts.ndim - 1))
    if all(parts.numblocks[a] == 1 for a in red_axes):
        return parts[(slice(None),) * nkept + (0,) * len(red_axes)]
    return parts.sum(axis=red_axes, dtype=parts.dtype)  # the tree reduction


def histogram_counts(
    data: xr.DataArray, dim: Hashable | Sequence[Hashable] | None, mask: xr.DataArray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer data: the computed counts ``(rows, nbins)`` (one row per index of the kept dims) and
    the bin values, as :func:`histogram` makes them; 1-byte data skip building the labelled
    result (its cost is most of the time on a few MB)."""
    if data.dtype.itemsize == 1 or data.dtype.kind == "b":
        kept, reduced = split(data, dim)
        spec = bin_spec(data, data.dtype, None, None, mask)
        counts = compute_small(totals(data, spec, kept, reduced, mask, None)[1])[0]
        return counts.reshape(-1, spec.nbins), spec.centers
    h = histogram(data, dim=dim, mask=mask)
    return h.values.reshape(-1, h.sizes["bin"]), h["bin"].values


def histogram_with(
    data: xr.DataArray,
    spec: BinSpec,
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | None = None,
    weights: xr.DataArray | None = None,
) -> xr.DataArray:
    """The lazy histogram of one DataArray on given bins (no range pass)."""
    kept, reduced = split(data, dim)
    x, counts, extras = totals(data, spec, kept, reduced, mask, weights)
    has_w = weights is not None
    coords: dict[Hashable, Any] = {k: v for k, v in x.coords.items() if set(v.dims) <= set(kept)}
    coords.update(bin=("bin", spec.centers), bin_lower=("bin", spec.lower), bin_upper=("bin", spec.upper))
    for i, name in enumerate(_kernels.EXTRA):
        extra = extras[..., i]
        coords[f"n_{name}"] = (kept, extra.astype(np.int64) if has_w else extra)
    return xr.DataArray(counts, dims=(*kept, "bin"), coords=coords, name="histogram")


def histogram(
    data: xr.DataArray | xr.DataTree,
    *,
    bins: int | None = None,
    range: tuple[float, float] | None = None,  # noqa: A002 - numpy's name
    dim: Hashable | Sequence[Hashable] | None = None,
    mask: xr.DataArray | xr.DataTree | None = None,
    weights: xr.DataArray | None = None,
) -> xr.DataArray | xr.DataTree:
    """Histogram ``data`` over ``dim``, exactly and lazily.

    Parameters
    ----------
    data : xarray.DataArray or xarray.DataTree
        A stack ``("volume", ...)``, any labelled array (numpy or dask backed),
        or a collection (a DataTree with an ``image`` per volume node).
    bins : int, optional
        Number of equal bins. Default: integer data get one bin per integer
        value (exact); float data get 256 bins.
    range : (lo, hi), optional
        Bin range (inclusive). Default: the range of the (masked) voxels, found
        with one NaN-aware pass (the only eager part; pass ``range=`` to skip
        it). 8-bit integers default to their whole dtype range without a pass;
        16-bit integers (when the result is at most 2**23 cells) are
        histogrammed over their whole dtype range in one pass, which is then
        trimmed to the occupied values: that one pass is computed, in place
        of a range pass, and the result comes back in memory.
        Float bins follow ``np.histogram`` exactly (edges in the data's dtype).
    dim : str, sequence of str or None
        Dims the histogram is computed **over**: ``None`` = the whole dataset;
        ``("z", "y", "x")`` = one histogram per volume; ``("y", "x")`` = per
        slice. For a collection, per-volume histograms are stacked along
        ``volume`` on common bins; finer ones come back as a DataTree.
    mask : xarray.DataArray of bool, optional
        Broadcastable to ``data`` (same sizes and, when both carry one, the
        same affine); only ``True`` voxels are counted. For a collection, a
        DataTree with one mask per volume node.
    weights : xarray.DataArray, optional
        Broadcastable to ``data``; each voxel adds its weight instead of 1
        (float64 counts, as ``np.histogram(weights=)``). The ``n_*`` coords
        still count voxels.

    Returns
    -------
    xarray.DataArray
        Lazy int64 counts named ``histogram`` with the kept dims plus ``bin``;
        coords ``bin`` (centre), ``bin_lower``, ``bin_upper``, and the voxels
        outside the bins ``n_nan``, ``n_posinf``, ``n_neginf``, ``n_below``,
        ``n_above``, ``n_masked_out`` over the kept dims. Per-voxel histograms
        (``dim`` = the leading dims, e.g. ``dim="volume"`` on a stack: one
        histogram per voxel across volumes) count in the smallest unsigned
        dtype that holds the number of volumes (uint8 up to 255 volumes,
        uint16, uint32), read the blocks as stored and add volume blocks with
        a tree reduction. Histograms on the same bins merge by addition:
        :func:`volnorm.merge_histograms` adds the ``n_*`` coords too and widens
        small count dtypes so that the sum cannot wrap. Computes: at most one
        range pass (none with ``range=`` or 8-bit data).

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([[0, 1, 1], [2, 2, 2]], dtype="uint8"), dims=("volume", "x"))
    >>> h = vn.histogram(x, dim="x")
    >>> h.sel(bin=[0, 1, 2]).values.tolist()
    [[1, 2, 0], [0, 0, 3]]
    """
    if isinstance(data, xr.DataTree):
        if weights is not None:
            raise NotImplementedError("`weights` with a collection: pass a stack, or weight each volume")
        parts = parts_of(data, mask)
        dtype = np.result_type(*(p[1].dtype for p in parts))
        spec = bin_spec(data, dtype, bins, range, mask)
        if dim is None:
            hs = [histogram_with(img, spec, None, m) for _, img, m in parts]
            return merge_histograms(hs)
        return over_collection(lambda img, dim, mask: histogram_with(img, spec, dim, mask), data, dim, mask)
    if not isinstance(data, xr.DataArray):
        raise TypeError(f"`data` must be an xarray.DataArray or DataTree; got {type(data).__name__}")
    kept, _ = split(data, dim)  # check `dim` before any pass
    rows = math.prod(data.sizes[d] for d in kept)
    if (
        bins is None and range is None and weights is None and data.dtype.kind in "iu" and data.dtype.itemsize == 2
        and rows * 2**16 <= ONE_PASS_INT_CELLS
    ):
        return _int16_one_pass(data, dim, mask, weights)
    spec = bin_spec(data, data.dtype, bins, range, mask)
    return histogram_with(data, spec, dim, mask, weights)


#: 16-bit integer histograms with at most this many cells (rows x 65536) are made in one pass.
ONE_PASS_INT_CELLS = 2**23


def _int16_one_pass(data: xr.DataArray, dim: Any, mask: Any, weights: Any) -> xr.DataArray:
    """16-bit integers: histogram the whole dtype range in the one pass (the range pass *is* the
    histogram pass), then keep the occupied range. Computes that pass; the result is in memory."""
    info = np.iinfo(data.dtype)
    centers = np.arange(info.min, info.max + 1, dtype=np.float64)
    full = BinSpec("int", int(info.min), 2**16, np.empty(0), centers - 0.5, centers + 0.5, centers)
    h = histogram_with(data, full, dim, mask, weights).compute()
    occupied = np.flatnonzero(h.values.reshape(-1, 2**16).any(axis=0))
    if not len(occupied):
        what = "inside the mask" if mask is not None else ""
        raise ValueError(f"the data hold no voxel {what}: there is no range to histogram")
    return h.isel(bin=slice(int(occupied[0]), int(occupied[-1]) + 1))


def merge_histograms(hists: Sequence[xr.DataArray]) -> xr.DataArray:
    """Add histograms on the same bins (from chunks, volumes, workers or separate runs).

    The counts and the ``n_*`` counters are added; bins must be identical.

    Parameters
    ----------
    hists : sequence of xarray.DataArray
        At least one histogram from :func:`volnorm.histogram`, all with the same shape and the
        same ``bin_lower`` and ``bin_upper``.

    Returns
    -------
    xarray.DataArray
        The summed counts, named ``histogram``, with the ``n_*`` coords summed; unsigned counts
        (per-voxel histograms) in a dtype wide enough for the sum. Lazy when the inputs are.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> a = xr.DataArray(np.array([1, 2, 2], dtype="uint8"), dims="x")
    >>> b = xr.DataArray(np.array([2, 3], dtype="uint8"), dims="x")
    >>> h = vn.merge_histograms([vn.histogram(a), vn.histogram(b)])
    >>> h.sel(bin=[1, 2, 3]).values.tolist()
    [1, 3, 1]
    """
    if not hists:
        raise ValueError("no histogram to merge")
    first = hists[0]
    for h in hists[1:]:
        if h.sizes != first.sizes or not (
            np.array_equal(h["bin_lower"].values, first["bin_lower"].values)
            and np.array_equal(h["bin_upper"].values, first["bin_upper"].values)
        ):
            raise ValueError("histograms on different bins (or shapes) cannot be merged; histogram them with one `range=` and `bins=`")
    extra = [c for c in first.coords if str(c).startswith("n_")]
    total = first.drop_vars(extra)
    sums = {c: first[c].data for c in extra}
    if all(h.dtype.kind == "u" for h in hists):  # small per-voxel counts: a dtype that holds the sum
        wide = count_dtype(sum(int(np.iinfo(h.dtype).max) for h in hists))
        total = total.astype(wide)
        sums = {c: v.astype(wide) for c, v in sums.items()}
    for h in hists[1:]:
        total = total + h.drop_vars(extra).data
        for c in extra:
            sums[c] = sums[c] + h[c].data
    total = total.assign_coords({c: (first[c].dims, v) for c, v in sums.items()})
    return total.rename("histogram")


def own_edges(dtype: np.dtype, lo: np.ndarray, hi: np.ndarray, nbins: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's own ``nbins`` equal bins over its ``lo..hi`` (the finite min and max of its
    voxels), as ``np.histogram(group, nbins)`` and scikit-image's ``histogram`` make them: edges
    ``np.linspace`` in the data's float dtype (a constant group widened by 0.5 each way), centres
    ``(e[:-1] + e[1:]) / 2`` in that dtype. Returns float64 values ``(rows, nbins + 1)`` of the
    edges and ``(rows, nbins)`` of the centres.

    >>> e, c = own_edges(np.dtype("float32"), np.array([0.0, 5.0]), np.array([1.0, 5.0]), 2)
    >>> e.tolist(), c.tolist()
    ([[0.0, 0.5, 1.0], [4.5, 5.0, 5.5]], [[0.25, 0.75], [4.75, 5.25]])
    """
    et = np.result_type(dtype, np.float16)
    edges = np.empty((len(lo), nbins + 1))
    for r, (a, b) in enumerate(zip(lo, hi)):
        a, b = dtype.type(a), dtype.type(b)  # numpy's rules, as np.histogram(group)
        if a == b:
            a, b = a - 0.5, b + 0.5
            if a == b:  # ±0.5 is below the float type's step here: the neighbouring values
                a, b = np.nextafter(a, -np.inf), np.nextafter(b, np.inf)
        edges[r] = np.linspace(a, b, nbins + 1, dtype=et)
        if np.any(edges[r, :-1] >= edges[r, 1:]):  # numpy refuses too ("Too many bins")
            raise ValueError(f"{nbins} bins over [{a!r}, {b!r}] do not fit in {et} (equal edges); use fewer bins")
    e = edges.astype(et)
    centers = ((e[:, :-1] + e[:, 1:]) / et.type(2)).astype(np.float64)  # scikit-image's centres
    return edges, centers


def histogram_rows(
    data: xr.DataArray, dim: Hashable | Sequence[Hashable] | None, edges: np.ndarray, mask: xr.DataArray | None = None
) -> np.ndarray:
    """Float histograms with **their own** equal bins per index of the kept dims (``edges`` is
    ``(rows, nbins + 1)``, float64 values of numpy's edges), e.g. one histogram per slice over the
    slice's own min..max as scikit-image makes it. Computes; returns ``(rows, nbins + NEXTRA)``."""
    kept, reduced = split(data, dim)
    x, args = prepare(data, kept, reduced, mask)
    nk = len(kept)
    kshape = tuple(x.sizes[d] for d in kept)
    nbins = edges.shape[1] - 1
    slack = np.array([min(_kernels.edge_slack(e), 0.5) for e in edges])
    width = nbins + _kernels.NEXTRA

    def block(xb: np.ndarray, *rest: np.ndarray, block_info: Any = None) -> np.ndarray:
        rows = rows_of(block_info[0]["array-location"][:nk], kshape)
        xb = numba_ready(xb)
        x2 = np.ascontiguousarray(xb).reshape(len(rows), -1)
        m2 = None if not rest else np.ascontiguousarray(rest[0], dtype=np.bool_).reshape(len(rows), -1)
        out = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            _kernels.hist_float(x2[i : i + 1], edges[r], out[i : i + 1], None if m2 is None else m2[i : i + 1], None, slack[r])
        return out.reshape(xb.shape[:nk] + (1,) * (xb.ndim - nk) + (width,))

    xa = args[0]
    chunks = xa.chunks[:nk] + tuple((1,) * len(c) for c in xa.chunks[nk:]) + ((width,),)
    parts = da.map_blocks(block, *args, chunks=chunks, new_axis=[xa.ndim], dtype=np.int64,
                          meta=np.empty((0,) * (xa.ndim + 1), dtype=np.int64))
    total = parts.sum(axis=tuple(_range(nk, xa.ndim)), dtype=np.int64).compute()
    return np.asarray(total).reshape(-1, width)

#!/usr/bin/env python
"""Benchmark volnorm's per-voxel histograms across volumes
(``vn.histogram(stack, dim="volume", bins=100, range=...)``) against the read
pass of the same zarr store, xhistogram, and the vectorized numpy and numba
ways of answering the same question.

Three cases, each written once (deterministically, numpy ``default_rng``) to a
zarr v3 store (Blosc lz4 clevel 5 byte-shuffle), chunked (volumes, spatial
tile) at ~32-64 MiB:

* A: (10000, 96, 96) float32, chunks (1000, 96, 96);
* B: (200, 1500, 1500) uint8, chunks (100, 500, 750);
* C: (500, 128, 128, 64) float32, chunks (100, 32, 64, 64) (2.1 GB, written
  100 volumes at a time).

Float data: a smooth per-voxel mean and spread plus Gaussian noise, with a
few NaN, +Inf and -Inf; 100 bins over range (-5, 5) (~1 value in 10^4 falls
outside, counted apart). uint8 data: a smooth image plus noise, clipped to
0..255; 100 float bins over range (0.0, 255.0) (so 255 lands in the closed last
bin). The bin edges are numpy's (``np.histogram_bin_edges``: float32 for
float32 data, float64 for uint8). ``--quick`` shrinks the cases to
(1000, 96, 96), (50, 500, 500) and (60, 128, 128, 64).

Rows per case (GB/s = uncompressed input bytes / wall; peak RSS = this process
and its children, sampled every 50 ms, absolute, so it carries the allocator's
history of the earlier rows):

a. the read pass: every chunk read and decompressed (threaded scheduler);
b. volnorm from the store, threaded scheduler with 2 threads: x read = wall /
   read-pass wall;
c. xhistogram (``xhistogram.xarray.histogram(x, bins=[edges], dim=["volume"])``)
   from the same lazy store: timed first on the leading ~10% of the chunks; if
   the whole store would then take more than ``--xh-budget`` s (default 60),
   the full time is extrapolated linearly (the row says so), else it is run on
   everything;
d. numpy ``np.add.at`` with a meshgrid fancy index, chunk by chunk (the
   store's chunk grid), on the first volumes held in memory (~256 MB;
   ``--quick``: ~64 MB);
e. numpy ``np.bincount`` of flat offsets (voxel * width + bin), chunk by chunk,
   same in-memory volumes;
f. a plain single-threaded numba kernel (loop over volumes, then voxels, into
   a (voxels, 100) uint16 array; bin = int((v - lo) * nbins / (hi - lo)),
   corrected against the edges, last bin closed), same in-memory volumes;
g. volnorm on the same in-memory volumes (dask array of the numpy array, the
   store's chunks), synchronous scheduler (1 thread): the kernel-to-kernel
   comparison with d, e, f. The ratio of b (2 threads, reading the store) to
   the best of d, e, f is printed too, for information.
d and e bin with np.histogram's own algorithm (position from the range, then
one step against the edges), in steps of 65536 values as np.histogram does
(uint8: a 256-entry table of those bins). d, e and f run on one thread; volnorm
runs on 2: the GB/s are reported raw, and the ratio also per thread.

Checks: volnorm's counts (and its NaN/±Inf/below/above counters) against a
reference over every voxel and volume: ``np.searchsorted(edges, v, "right") - 1``
with the last edge closed, counted with flat offsets and ``np.bincount`` chunk
by chunk (itself checked against ``np.histogram`` on a few voxels);
xhistogram's counts against the same reference on the volumes it ran on (and,
for float data, how many counts move with float64 edges ``np.linspace(lo, hi,
101)`` instead of numpy's float32 ones); d, e, f against volnorm on their
volumes. Memory: volnorm on the first half of the volumes (at least 256 when
there are more, so that the counts keep their dtype) and on all of them, case C
(or the last case run), each in a fresh process (imports and a warm-up first).

Targets (marked ok/MISS): volnorm >= 10x faster than xhistogram on every case;
>= 0.8x the throughput of the best single-process kernel (d, e, f) of the same
case, volnorm also in memory on one thread (g); <= 1.5x the read pass; counts exactly equal to the reference; peak RSS
flat in the number of volumes (all volumes <= 1.2x the first half + 64 MiB;
the output is the same size).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_voxel_hist.py            # ~3 GB of stores, a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/bench_voxel_hist.py --quick    # ~0.3 GB smoke run, < 1.5 min
    PYTHONPATH=. python benchmarks/bench_voxel_hist.py --keep --cases C --json /tmp/vh.json

The page cache is not dropped: the stores were just written (or are reused)
and fit in RAM, so these are decompression/CPU-bound numbers, not disk numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_histogram import RSSSampler, du, read_pass, say
from bench_transforms import Table, measure, okmiss, write_image_store
from bench_transforms import open_image as open_stack

GB = 1e9
MiB = 2**20
NBINS = 100
SEED = 2026
FLOAT_RANGE = (-5.0, 5.0)
U8_RANGE = (0.0, 255.0)
BLOCK = 65536  # values per step of the vectorized numpy binning (np.histogram's own step)
SUB_BYTES = 256e6  # in-memory volumes for the single-process kernels (d, e, f); --quick: 64 MB
XH_FRACTION = 0.1  # xhistogram first runs on about this share of the chunks
#: the reference's counters beside the bins, in volnorm's order (volnorm's n_masked_out is 0 here)
REF_EXTRA = ("nan", "posinf", "neginf", "below", "above")


@dataclass(frozen=True)
class Case:
    key: str
    label: str  # the table's first column
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    range: tuple[float, float]

    @property
    def nvol(self) -> int:
        return self.shape[0]

    @property
    def vol_bytes(self) -> int:
        return math.prod(self.shape[1:]) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.nvol * self.vol_bytes

    @property
    def edges(self) -> np.ndarray:
        """np.histogram's edges: float32 for float32 data, float64 for integers."""
        return np.histogram_bin_edges(np.zeros(1, dtype=self.dtype), bins=NBINS, range=self.range)


def make_cases(quick: bool) -> list[Case]:
    a, c = ("volume", "y", "x"), ("volume", "z", "y", "x")
    if quick:
        return [
            Case("A", "A f32", a, (1000, 96, 96), (250, 96, 96), "float32", FLOAT_RANGE),
            Case("B", "B u8", a, (50, 500, 500), (25, 250, 500), "uint8", U8_RANGE),
            Case("C", "C f32", c, (60, 128, 128, 64), (20, 32, 64, 64), "float32", FLOAT_RANGE),
        ]
    return [
        Case("A", "A f32", a, (10000, 96, 96), (1000, 96, 96), "float32", FLOAT_RANGE),
        Case("B", "B u8", a, (200, 1500, 1500), (100, 500, 750), "uint8", U8_RANGE),
        Case("C", "C f32", c, (500, 128, 128, 64), (100, 32, 64, 64), "float32", FLOAT_RANGE),
    ]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def smooth_field(spatial: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A smooth per-voxel pattern in [-1, 1] and a spread in [0.6, 1.4] over the spatial grid."""
    axes = np.meshgrid(*((np.arange(n, dtype=np.float32) + 0.5) / n for n in spatial), indexing="ij", sparse=True)
    pattern = np.ones(spatial, dtype=np.float32)
    for i, t in enumerate(axes):
        pattern = pattern * (np.sin if i % 2 == 0 else np.cos)(np.float32((i + 2) * np.pi) * t)
    spread = np.float32(0.6) + np.float32(0.8) * sum(axes) / len(axes) + np.zeros(spatial, dtype=np.float32)
    return pattern.astype(np.float32), spread.astype(np.float32)


def make_piece(case: Case, i0: int, i1: int, field: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Volumes ``i0:i1`` of a case (the same values for the same piece boundaries)."""
    rng = np.random.default_rng([SEED, ord(case.key), i0])
    pattern, spread = field
    v = rng.standard_normal((i1 - i0, *case.shape[1:]), dtype=np.float32)
    if case.dtype == "uint8":
        v *= np.float32(30.0)
        v += np.float32(128.0) + np.float32(90.0) * pattern
        np.clip(v, 0, 255, out=v)
        return np.rint(v).astype(np.uint8)
    v *= spread
    v += np.float32(1.5) * pattern
    flat = v.reshape(-1)
    at = rng.integers(0, flat.size, 24)
    flat[at[:12]], flat[at[12:18]], flat[at[18:]] = np.nan, np.inf, -np.inf
    return v


def make_store(case: Case, path: Path, keep_existing: bool) -> None:
    """Writes the case's store piece by piece (one volume chunk at a time, 2 threads)."""
    field = smooth_field(case.shape[1:])
    write_image_store(path, {"shape": case.shape, "chunks": case.chunks, "dtype": case.dtype, "seed": SEED, "v": 1},
                      case.dims, case.shape, case.chunks, case.dtype,
                      lambda i0, i1: make_piece(case, i0, i1, field), keep_existing, f"{case.label}: ")


# ---------------------------------------------------------------------------
# the single-process answers (d, e, f) and the reference
# ---------------------------------------------------------------------------


def np_codes(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram's bin of every value, by its own algorithm for equal bins (position from the
    range, then one step against the edges, last bin closed); ``nbins`` for the values it leaves
    out (outside the range, NaN, ±Inf). intp, shape of ``v``."""
    nb = len(edges) - 1
    lo, hi = edges[0], edges[-1]
    keep = (v >= lo) & (v <= hi)
    t = v - lo
    t *= edges.dtype.type(nb / (hi - lo))
    t[~keep] = 0
    k = t.astype(np.intp)
    k[k == nb] = nb - 1
    k -= v < edges[k]
    k += (v >= edges[k + 1]) & (k != nb - 1)
    k[~keep] = nb
    return k


def in_blocks(v: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn`` (values -> intp bins) over ``v`` in steps of ``BLOCK`` values, as np.histogram
    steps through its input (the temporaries stay in cache: ~2x faster here than one step)."""
    flat = np.ascontiguousarray(v).reshape(-1)
    out = np.empty(flat.size, dtype=np.intp)
    for i in range(0, flat.size, BLOCK):
        out[i : i + BLOCK] = fn(flat[i : i + BLOCK])
    return out.reshape(v.shape)


def codes_fn(case: Case, how: Callable[..., np.ndarray] = np_codes) -> Callable[[np.ndarray], np.ndarray]:
    """``how`` (:func:`np_codes` or :func:`ref_codes`) for the case, in blocks; uint8: the
    256 values' bins, looked up."""
    edges = case.edges
    if case.dtype == "uint8":
        lut = how(np.arange(256, dtype=np.uint8), edges)
        return lambda v: lut[v]
    return lambda v: in_blocks(v, functools.partial(how, edges=edges))


def ref_codes(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The reference bin of every value: ``searchsorted(edges, v, "right") - 1``, the last edge
    closed; values outside get ``nbins + i`` for counter ``REF_EXTRA[i]``."""
    nb = len(edges) - 1
    k = np.searchsorted(edges, v, side="right") - 1
    k[v == edges[-1]] = nb - 1
    below, above = k < 0, k >= nb  # NaN sorts last: "above" until set apart below
    k[below] = nb + 3
    k[above] = nb + 4
    if v.dtype.kind == "f":
        k[np.isnan(v)] = nb
        k[v == np.inf] = nb + 1
        k[v == -np.inf] = nb + 2
    return k


def tiles(spatial: tuple[int, ...], tile: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The spatial tiles of a chunk grid, as slices."""
    for start in itertools.product(*(range(0, n, c) for n, c in zip(spatial, tile))):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, tile, spatial))


def tile_shape(sl: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in sl)


def by_chunks(sub: np.ndarray, chunks: tuple[int, ...]) -> Iterator[tuple[tuple[slice, ...], Iterator[np.ndarray]]]:
    """Per spatial tile of the store's chunk grid: the tile and its blocks (volume chunk by volume chunk)."""
    for sl in tiles(sub.shape[1:], chunks[1:]):
        yield sl, (sub[(slice(v0, v0 + chunks[0]), *sl)] for v0 in range(0, sub.shape[0], chunks[0]))


def np_add_at(sub: np.ndarray, chunks: tuple[int, ...], codes: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """d: ``np.add.at(counts, (voxel, bin), 1)`` with a meshgrid of voxel indices, chunk by chunk."""
    width = NBINS + 1  # the last column takes what np.histogram leaves out
    out = np.zeros((*sub.shape[1:], NBINS), dtype=np.uint16)
    for sl, blocks in by_chunks(sub, chunks):
        nvox = math.prod(tile_shape(sl))
        acc = np.zeros((nvox, width), dtype=np.uint16)
        for b in blocks:
            vox, _ = np.meshgrid(np.arange(nvox), np.arange(b.shape[0]))
            np.add.at(acc, (vox, codes(b).reshape(b.shape[0], nvox)), 1)
        out[sl] = acc[:, :NBINS].reshape(*tile_shape(sl), NBINS)
    return out


def np_bincount(sub: np.ndarray, chunks: tuple[int, ...], codes: Callable[[np.ndarray], np.ndarray],
                width: int = NBINS + 1) -> np.ndarray:
    """e: ``np.bincount(voxel * width + bin)`` chunk by chunk; ``(*spatial, width)`` uint16
    (``codes`` gives every value a column below ``width``)."""
    out = np.zeros((*sub.shape[1:], width), dtype=np.uint16)
    for sl, blocks in by_chunks(sub, chunks):
        nvox = math.prod(tile_shape(sl))
        acc = np.zeros(nvox * width, dtype=np.int64)
        offsets = np.arange(nvox) * width
        for b in blocks:
            flat = codes(b).reshape(b.shape[0], nvox)
            flat += offsets
            acc += np.bincount(flat.ravel(), minlength=nvox * width)
        out[sl] = acc.reshape(*tile_shape(sl), width)
    return out


@functools.cache
def plain_kernel() -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """f: the plain single-threaded numba loop (compiled on first use)."""
    import numba

    @numba.njit(nogil=True)
    def kernel(x: np.ndarray, edges: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
        nb = edges.shape[0] - 1
        lo, hi = edges[0], edges[nb]
        scale = nb / (hi - lo)
        for v in range(x.shape[0]):
            for s in range(x.shape[1]):
                val = np.float64(x[v, s])
                if val >= lo and val <= hi:  # NaN fails
                    k = int((val - lo) * scale)
                    k = min(k, nb - 1)
                    if val < edges[k]:
                        k -= 1
                    elif k < nb - 1 and val >= edges[k + 1]:
                        k += 1
                    out[s, k] += 1

    return kernel


def numba_plain(sub: np.ndarray, edges: np.ndarray) -> np.ndarray:
    out = np.zeros((math.prod(sub.shape[1:]), NBINS), dtype=np.uint16)
    plain_kernel()(sub.reshape(sub.shape[0], -1), edges.astype(np.float64), out)
    return out.reshape(*sub.shape[1:], NBINS)


def reference(x: Any, case: Case, path: Path) -> np.ndarray:
    """The reference counts of ``x`` (a selection of the store), chunk by chunk from the store
    into a ``.npy`` memmap (kept out of the measured RSS): ``(*spatial, NBINS + 5)`` uint16,
    the bins then ``REF_EXTRA``. uint8: :func:`ref_codes` of the 256 values, looked up."""
    width = NBINS + len(REF_EXTRA)
    codes = codes_fn(case, ref_codes)
    ref = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(*x.shape[1:], width))
    a = x.data
    spatial_blocks = itertools.product(*(range(n) for n in a.numblocks[1:]))
    for sl, bidx in zip(tiles(x.shape[1:], tuple(c[0] for c in a.chunks[1:])), spatial_blocks):
        for iv in range(a.numblocks[0]):  # each block read from the store, counted, dropped
            b = np.asarray(a.blocks[(iv, *bidx)].compute(scheduler="sync"))
            ref[sl] += np_bincount(b, b.shape, codes, width)
    ref.flush()
    return ref


def spot_check(x: Any, case: Case, ref: np.ndarray, n: int = 8) -> bool:
    """The reference against ``np.histogram`` of a few voxels' columns (in the first tile)."""
    import xarray as xr

    rng = np.random.default_rng(SEED)
    tile = case.chunks[1:]
    idx = [rng.integers(0, min(t, s), n) for t, s in zip(tile, x.shape[1:])]
    cols = x.isel({d: xr.DataArray(i, dims="p") for d, i in zip(x.dims[1:], idx)}).values  # (volume, p)
    return all(
        np.array_equal(np.histogram(cols[:, p], bins=NBINS, range=case.range)[0], ref[tuple(i[p] for i in idx)][:NBINS])
        for p in range(n)
    )


def compare(counts: np.ndarray, ref: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> tuple[int, int, int]:
    """(cells whose count differs, counts moved = sum |diff| / 2, counter cells that differ)."""
    rc = ref[..., :NBINS]
    cells = int(np.count_nonzero(counts != rc))
    moved = int(np.abs(counts.astype(np.int64) - rc).sum()) // 2 if cells else 0
    bad_extra = 0
    for i, name in enumerate(REF_EXTRA):
        if extras is not None:
            bad_extra += int(np.count_nonzero(extras[name] != ref[..., NBINS + i]))
    return cells, moved, bad_extra


def leading_chunks(x: Any, fraction: float) -> tuple[Any, str]:
    """The leading whole chunks along the first dim split in several, about ``fraction`` of the data."""
    for d, ch in zip(x.dims, x.chunks):
        if len(ch) >= 2:
            k = max(1, math.ceil(fraction * len(ch)))
            return x.isel({d: slice(0, sum(ch[:k]))}), f"first {k} of {len(ch)} chunks along {d}"
    return x, "all of it (one chunk)"


# ---------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------


@dataclass
class Ctx:
    tab: Table
    sampler: RSSSampler
    repeat: int
    notes: list[str]
    workdir: Path
    xh_budget: float
    sub_bytes: float


def gbs(nbytes: float, wall: float) -> float:
    return nbytes / GB / wall


def vn_hist(x: Any, value_range: tuple[float, float]) -> Any:
    import volnorm as vn

    return vn.histogram(x, dim="volume", bins=NBINS, range=value_range).compute()


def run_case(ctx: Ctx, case: Case, path: Path) -> None:
    import xarray as xr
    from xhistogram.xarray import histogram as xhist

    tab, P = ctx.tab, case.label
    x = open_stack(path)
    a = x.data
    edges = case.edges
    spatial_dims = x.dims[1:]

    def rate(nbytes: float, wall: float) -> str:
        return f"{gbs(nbytes, wall):.2f} GB/s"

    # warm-up (untimed): numba load/compile for this count dtype (all volumes), zarr metadata
    vn_hist(x.isel({d: slice(0, 2) for d in spatial_dims}), case.range)
    numba_plain(np.zeros((2, 4), dtype=case.dtype), edges)

    w_read, pk, _ = measure(ctx.sampler, lambda: read_pass(a).compute(), ctx.repeat)
    tab.add(P, "a. read pass", w_read, rate(case.nbytes, w_read), "", pk, gbs=gbs(case.nbytes, w_read))

    # ---- b. volnorm, checked against the reference over every voxel and volume
    w_vn, pk, h = measure(ctx.sampler, lambda: vn_hist(x, case.range), ctx.repeat)
    vn_gbs = gbs(case.nbytes, w_vn)
    counts = h.values
    extras = {n: h[f"n_{n}"].values for n in REF_EXTRA}
    masked = int(h["n_masked_out"].values.sum())
    cdtype = counts.dtype
    del h
    t0 = time.perf_counter()
    ref = reference(x, case, ctx.workdir / f"ref-{case.key}.npy")
    t_ref = time.perf_counter() - t0
    spot = spot_check(x, case, ref)
    cells, moved, bad_extra = compare(counts, ref, extras)
    n_out = int(ref[..., NBINS:].sum(dtype=np.int64))
    del counts, extras
    same = cells == 0 and bad_extra == 0 and masked == 0
    check = "counts == reference: " + ("ok" if same else f"MISMATCH ({cells} cells, {moved} counts moved, "
                                       f"{bad_extra} counter cells, {masked} masked out)")
    tab.add(P, "b. vn.histogram from the store, 2 threads", w_vn, rate(case.nbytes, w_vn), f"{w_vn / w_read:.2f}x read",
            pk, f"target <=1.5x read: {okmiss(w_vn / w_read <= 1.5)}; {check}", gbs=vn_gbs, xread=w_vn / w_read,
            exact=same)
    ctx.notes.append(f"{P}: volnorm counts {cdtype}; reference (searchsorted + flat bincount, every voxel and volume, "
                     f"{t_ref:.0f} s) == np.histogram on 8 voxels: {spot}; {n_out} values outside the bins "
                     f"(NaN/Inf/out of range), {cells} bin cells and {bad_extra} counter cells differ from volnorm's")

    # ---- c. xhistogram: a leading share of the chunks first, then all (or extrapolated)
    def run_xh(sel: Any) -> np.ndarray:
        return xhist(sel, bins=[edges], dim=["volume"]).transpose(*spatial_dims, ...).values

    part, what = leading_chunks(x, XH_FRACTION)
    part_bytes = part.nbytes
    w_part, pk_part, xh = measure(ctx.sampler, lambda: run_xh(part), ctx.repeat)
    estimate = w_part * case.nbytes / part_bytes
    if part_bytes == case.nbytes:
        w_xh, pk, xh_ref, how = w_part, pk_part, ref, "all of it"
    elif estimate <= ctx.xh_budget:
        xh = None  # free the part's counts before the full run
        w_xh, pk, xh = measure(ctx.sampler, lambda: run_xh(x), ctx.repeat)
        xh_ref, how = ref, "all of it"
    else:
        w_xh, pk = estimate, pk_part
        xh_ref = reference(part, case, ctx.workdir / f"ref-{case.key}-part.npy")
        how = f"{part_bytes / case.nbytes:.0%} ({what}) timed, {w_part:.1f} s, EXTRAPOLATED"
    xcells, xmoved, _ = compare(xh, xh_ref)
    total = int(xh_ref[..., :NBINS].sum(dtype=np.int64))
    del xh, xh_ref, ref
    for f in ctx.workdir.glob(f"ref-{case.key}*.npy"):
        f.unlink()
    speedup = w_xh / w_vn
    tab.add(P, "c. xhistogram from the store, 2 threads", w_xh, rate(case.nbytes, w_xh), f"vn {speedup:.1f}x faster", pk,
            f"target >=10x: {okmiss(speedup >= 10)} (the read pass alone: {w_xh / w_read:.1f}x); on {how}; "
            f"differs from reference in {xcells} cells ({xmoved} of {total} counts moved)",
            gbs=gbs(case.nbytes, w_xh), speedup=speedup, extrapolated=how != "all of it")
    if case.dtype != "uint8":
        first = np.asarray(a.blocks[(0,) * a.ndim].compute())
        f64 = np.linspace(*case.range, NBINS + 1)
        h64 = xhist(xr.DataArray(first, dims=x.dims, name="image"), bins=[f64], dim=["volume"]).values
        r = np_bincount(first, first.shape, codes_fn(case, ref_codes), NBINS + len(REF_EXTRA))
        c64, m64, _ = compare(h64, r)
        ctx.notes.append(f"{P}: xhistogram with float64 edges np.linspace{case.range + (NBINS + 1,)} instead of "
                         f"numpy's float32 ones, on the first chunk: {c64} cells differ, {m64} of "
                         f"{int(r[..., :NBINS].sum())} counts moved ({m64 / max(1, int(r[..., :NBINS].sum())):.1e})")
        del first, h64, r

    run_kernels(ctx, case, x, vn_gbs)


def run_kernels(ctx: Ctx, case: Case, x: Any, vn_gbs: float) -> None:
    """d, e, f: the single-process kernels on the first volumes, held in memory."""
    tab, P, edges = ctx.tab, case.label, case.edges
    nsub = int(max(1, min(case.nvol, ctx.sub_bytes // case.vol_bytes)))
    xs = x.isel(volume=slice(0, nsub))
    sub = np.ascontiguousarray(xs.values)
    sub_bytes = sub.nbytes
    want = vn_hist(xs, case.range).values  # volnorm on the same volumes (untimed), to check d, e, f
    codes = codes_fn(case)
    on = f"{nsub} of {case.nvol} volumes in memory ({sub_bytes / 2**20:.0f} MiB), 1 thread"
    kernels: list[tuple[str, Callable[[], np.ndarray]]] = [
        ("d. np.add.at, meshgrid index, per chunk", lambda: np_add_at(sub, case.chunks, codes)),
        ("e. np.bincount flat offsets, per chunk", lambda: np_bincount(sub, case.chunks, codes)[..., :NBINS]),
        ("f. numba plain loop (njit, uint16)", lambda: numba_plain(sub, edges)),
    ]
    best = ("", 0.0)
    for name, fn in kernels:
        w, pk, got = measure(ctx.sampler, fn, ctx.repeat)
        g = gbs(sub_bytes, w)
        ok = np.array_equal(got, want)
        del got
        tab.add(P, name, w, f"{g:.2f} GB/s", f"vn {vn_gbs / g:.2f}x", pk, f"on {on}; == volnorm: {'ok' if ok else 'MISMATCH'}",
                gbs=g, nvol=nsub)
        if g > best[1]:
            best = (name[0], g)
    # g. volnorm on the same in-memory volumes, one thread: kernel against kernel
    import dask
    import dask.array as da
    import xarray as xr

    xm = xr.DataArray(da.from_array(sub, chunks=case.chunks), dims=x.dims)
    with dask.config.set(scheduler="synchronous"):
        vn_hist(xm, case.range)  # warm-up
        w, pk, got = measure(ctx.sampler, lambda: vn_hist(xm, case.range), ctx.repeat)
    g_mem = gbs(sub_bytes, w)
    ok = np.array_equal(got.values, want)
    del got
    r_mem = g_mem / best[1]
    tab.add(P, "g. vn.histogram, same volumes in memory", w, f"{g_mem:.2f} GB/s", f"vn {r_mem:.2f}x", pk,
            f"on {on}; == volnorm from the store: {'ok' if ok else 'MISMATCH'}", gbs=g_mem, nvol=nsub)
    tab.add(P, f"   vn in memory (g) vs best kernel ({best[0]})", None, "", f"vn {r_mem:.2f}x", None,
            f"target >=0.8x: {okmiss(r_mem >= 0.8)}; same volumes, both 1 thread", ratio=r_mem)
    r = vn_gbs / best[1]
    tab.add(P, f"   vn from the store (b, 2 thr) vs ({best[0]})", None, "", f"vn {r:.2f}x", None,
            f"(info) per thread vn {r / 2:.2f}x; vn reads and decompresses the store, the kernel does not", ratio_store=r)


def memory_worker(path: str, nvol: int, lo: float, hi: float) -> None:
    """Runs in a fresh process: volnorm on the first ``nvol`` volumes, its wall time and RSS
    (before, and the peak during the compute) as one JSON line."""
    import gc

    import dask

    x = open_stack(Path(path)).isel(volume=slice(0, nvol))
    with dask.config.set(scheduler="threads", num_workers=2):
        vn_hist(x.isel({d: slice(0, 2) for d in x.dims[1:]}), (lo, hi))  # warm-up: imports, numba load, same count dtype
        gc.collect()
        sampler = RSSSampler()
        sampler.reset()
        base = sampler.peak
        t0 = time.perf_counter()
        vn_hist(x, (lo, hi))
        wall = time.perf_counter() - t0
        time.sleep(0.1)
        sampler.stop()
    print(json.dumps({"wall": wall, "base": base, "peak": sampler.peak}))


def malloc_worker(path: str, lo: float, hi: float, repeat: int) -> None:
    """Runs in a fresh process with glibc's mmap threshold raised to 512 MiB (``mallopt``): the
    read pass and volnorm, best of ``repeat``, as one JSON line. glibc serves every allocation of
    32 MiB or more (a ~37 MB chunk, zarr's decoded copies of it) with a fresh ``mmap``, so each
    one is page-faulted in and zeroed by the kernel; a raised threshold reuses heap memory."""
    import ctypes

    import dask

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 512 * 2**20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1024 * 2**20)  # M_TRIM_THRESHOLD
    x = open_stack(Path(path))
    with dask.config.set(scheduler="threads", num_workers=2):
        vn_hist(x.isel({d: slice(0, 2) for d in x.dims[1:]}), (lo, hi))
        read_pass(x.data).compute()
        out = {"read": [], "vn": []}
        for _ in range(repeat):
            t0 = time.perf_counter()
            read_pass(x.data).compute()
            out["read"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            vn_hist(x, (lo, hi))
            out["vn"].append(time.perf_counter() - t0)
    print(json.dumps({k: min(v) for k, v in out.items()}))


def run_worker(args: list[str]) -> dict:
    """One of this script's ``--_...-worker`` modes in a fresh process: its last JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{args[0]} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return json.loads(lines[-1])


def run_memory_worker(path: Path, nvol: int, case: Case) -> dict:
    return run_worker(["--_memory-worker", str(path), str(nvol), *map(str, case.range)])


def malloc_check(ctx: Ctx, case: Case, path: Path) -> None:
    """(info) the read pass and volnorm in a fresh process with glibc's mmap threshold raised."""
    r = run_worker(["--_malloc-worker", str(path), *map(str, case.range), str(max(2, ctx.repeat))])
    P = case.label
    ctx.tab.add(P, "a'. read pass, glibc mmap threshold 512 MiB", r["read"], f"{gbs(case.nbytes, r['read']):.2f} GB/s", "", None,
                "(info) fresh process, mallopt(M_MMAP_THRESHOLD): chunks no longer page-faulted in", gbs=gbs(case.nbytes, r["read"]))
    ctx.tab.add(P, "b'. vn.histogram, same process", r["vn"], f"{gbs(case.nbytes, r['vn']):.2f} GB/s", f"{r['vn'] / r['read']:.2f}x read'",
                None, "(info) both faster; the ratio grows: the counting is now most of the time", gbs=gbs(case.nbytes, r["vn"]))


def memory_check(ctx: Ctx, case: Case, path: Path) -> None:
    """Peak RSS of volnorm on the first half of the volumes (at least 256 when there are more, so
    that the counts have the same dtype) and on all of them - the same output - each in a fresh
    process (in this one, the allocator's history of the earlier rows moves the baseline)."""
    half = case.nvol // 2
    if half <= 255 < case.nvol:  # keep volnorm's count dtype (uint16 above 255 volumes): the same output
        half = 256
    res = []
    for n in (half, case.nvol):
        runs = [run_memory_worker(path, n, case) for _ in range(ctx.repeat)]
        r = {"wall": min(q["wall"] for q in runs), "peak": max(q["peak"] for q in runs), "base": min(q["base"] for q in runs)}
        res.append(r)
        check = f"fresh process: {r['base'] / MiB:.0f} MiB before, +{(r['peak'] - r['base']) / MiB:.0f} MiB during"
        if n == case.nvol:
            flat = r["peak"] <= 1.2 * res[0]["peak"] + 64 * MiB
            check += (f"; target flat (<= 1.2x half + 64 MiB): {okmiss(flat)} "
                      f"({(r['peak'] - res[0]['peak']) / MiB:+.0f} MiB for {n / half:.1f}x the volumes)")
        ctx.tab.add(case.label, f"   memory: vn.histogram, {n} volumes", r["wall"], f"{gbs(n * case.vol_bytes, r['wall']):.2f} GB/s",
                    "", r["peak"], check, nvol=n, base=r["base"])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--_memory-worker":
        memory_worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
        return
    if len(sys.argv) == 6 and sys.argv[1] == "--_malloc-worker":
        malloc_worker(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-voxel-hist"))
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the stores")
    ap.add_argument("--quick", action="store_true", help="smoke run: smaller cases (~0.3 GB in all)")
    ap.add_argument("--repeat", type=int, default=1, help="time each measurement N times, report the best (default 1)")
    ap.add_argument("--cases", nargs="+", choices=("A", "B", "C"), default=["A", "B", "C"])
    ap.add_argument("--xh-budget", type=float, default=60.0,
                    help="run xhistogram on everything only if that should take at most this many s (default 60)")
    ap.add_argument("--json", type=Path, help="save the rows as JSON")
    args = ap.parse_args()

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    import dask
    import numba
    import psutil
    import xarray as xr
    import xhistogram
    import zarr

    import volnorm as vn

    cases = [c for c in make_cases(args.quick) if c.key in args.cases]
    paths = {c.key: args.workdir / f"{c.key}.zarr" for c in cases}
    sampler = RSSSampler()
    tab = Table()
    notes: list[str] = []
    ctx = Ctx(tab, sampler, args.repeat, notes, args.workdir, args.xh_budget, SUB_BYTES / 4 if args.quick else SUB_BYTES)
    env = [
        (f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
         f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}"),
        (f"volnorm {vn.__version__}, xhistogram {xhistogram.__version__}, dask {dask.__version__}, "
         f"xarray {xr.__version__}, zarr {zarr.__version__}, numba {numba.__version__}, numpy {np.__version__}"),
        (f"{NBINS} bins; codec zarr v3 BloscCodec(lz4, clevel 5, shuffle); threaded scheduler, 2 threads; "
         f"best of {args.repeat} run(s); page cache not dropped; GB = 1e9 bytes of uncompressed input"),
        "load average (1, 5, 15 min) at the start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
    ]
    t_all = time.perf_counter()
    t_setup = 0.0
    try:
        say(f"[stores in {args.workdir}]")
        t0 = time.perf_counter()
        for c in cases:
            make_store(c, paths[c.key], args.keep)
        t_setup = time.perf_counter() - t0
        for c in cases:
            env.append(f"{c.label}: {c.shape} {c.dtype}, chunks {c.chunks} "
                       f"({math.prod(c.chunks) * np.dtype(c.dtype).itemsize / MiB:.0f} MiB), {c.nbytes / GB:.2f} GB raw, "
                       f"{du(paths[c.key]) / GB:.2f} GB on disk; range {c.range}, edges {c.edges.dtype}")
        for line in env:
            say(line)
        with dask.config.set(scheduler="threads", num_workers=2):
            for c in cases:
                say(f"\n[{c.label}: {c.shape} {c.dtype}]")
                run_case(ctx, c, paths[c.key])
                malloc_check(ctx, c, paths[c.key])
            mem = next((c for c in cases if c.key == "C"), cases[-1])
            say(f"\n[memory: {mem.label}, first half vs all volumes]")
            memory_check(ctx, mem, paths[mem.key])
    finally:
        sampler.stop()
        for p in args.workdir.glob("ref-*.npy"):
            p.unlink()
        if not args.keep:
            for p in paths.values():
                shutil.rmtree(p, ignore_errors=True)
                p.with_suffix(".json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                args.workdir.rmdir()

    notes.append("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    tab.report("volnorm per-voxel histogram benchmark (vn.histogram(stack, dim='volume'))", env, notes, 160,
               (t_all, t_setup, "writing the stores"), args.json)


if __name__ == "__main__":
    main()

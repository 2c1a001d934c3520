#!/usr/bin/env python
"""Benchmark volnorm's colour functions (``volnorm.color``: palette fit and
quantization, greyscale, colormap and its inverse) on an RGB stack larger than
1 GB, against the read pass of the same zarr store, and against scikit-learn's
k-means and scikit-image's ``rgb2gray`` on a subset held in memory.

Data: a zarr v3 store of shape (1400, 512, 512, 3) uint8, dims (volume, y, x,
channel), 1.10 GB, chunks (56, 512, 512, 3) = 42 MiB (25 chunks, whole images:
every function here works image by image), Blosc lz4 clevel 5 (the same codec
as the other benchmarks; byte-shuffle is a no-op on uint8). The images are
photos: scikit-image's colour samples ``astronaut()`` (512x512), ``coffee()``
(400x600) and ``chelsea()`` (300x451), each rescaled (bilinear, scikit-image)
to 4 sizes that cover 512x512 (1x, 1.2x, 1.45x, 1.75x the smallest such);
image i (``default_rng([2026, i])``) is a random 512x512 crop of one of these
12 (a random shift), flipped left-right half the time, with sensor-like noise
(Gaussian, sigma 1.5 grey levels) and an exposure jitter through a per-channel
tone curve (gain 0.6-1.4, white balance 0.9-1.1 per channel, gamma 0.7-1.5).
So the stack has photo colours and compresses like noisy photos (lz4:
~1.05x, see the header), and the k-means has real work. ``--quick``: the
first 140 images (0.11 GB) in chunks of 14 images (10.5 MiB, 10 chunks), so
that the smoke run's per-chunk temporaries stay small. The store is written
once into ``--workdir`` (default /tmp/volnorm-bench-color) and reused while
its marker (shape, chunks, seed) matches; ``--fresh`` rewrites it, ``--clean`` deletes it at the end. The output
stores this script writes (copy, labels) are deleted after their rows.

It is opened with ``xarray.open_zarr(path)["image"]``: a dask-backed DataArray
with the dims above and the store's chunks. (``volnorm.open_zarr`` opens only
stores volnorm wrote - it needs volnorm's manifest in ``zarr.json`` and raises
ValueError "not a volnorm store" on this plain xarray-written one.)

Rows (threaded scheduler, 2 threads - the machine has 2 cores; GB/s = the
uncompressed RGB input, 1.10 GB, / wall, whatever the row's output; ``x read``
= wall / the read pass's wall):

a. the read pass: every chunk read and decompressed, nothing else
   (``bench_histogram.read_pass``: one value per chunk, summed) - the I/O limit;
a'. the copy: the stack read and written unchanged to a new store (same
   codec and chunks, xarray ``to_zarr``), for row c2;
b'. the sample pass alone (``volnorm.color._pixels_sample``, the pass that
   ``fit_quantize`` makes: ~200,000 pixels drawn block by block), so that
   b - b' is the k-means;
b. ``vn.color.fit_quantize(stack, 16, sample=200_000, seed=0)``: the sample
   pass + k-means (scipy k-means++ + Lloyd to a fixed point) on the sample;
c1. ``vn.color.quantize(stack, params=p, labels=True)`` computed fully (every
   block of labels made, then reduced to one value per block, as a);
c2. the same labels written to a zarr store (uint8, chunks (56, 512, 512),
   same codec);
d1. ``vn.color.to_grey(stack)`` (BT.601, float32) computed fully (as a);
d2. ``vn.color.apply_colormap(grey, "jet", vmin=0, vmax=255)`` (uint8 RGBA)
   computed fully (as a), grey made from the store in the same graph;
d3. the round trip ``vn.color.invert_colormap(rgba, "jet", vmin=0, vmax=255)``
   of d2's colours, computed fully and reduced to ``max |back - grey|`` (block by
   block in one task) and the largest ``distance``: d3 - d2 is roughly the
   inverse alone; its output (float64 value + float32 distance, 12 bytes a
   pixel, 4x the RGB input) is most of its memory traffic;
d4. d2's colours without alpha written to a store (untimed; the "rendering whose
   raw data was lost", 1.1 GB RGB uint8, same chunks and codec) and its read pass;
d5. ``vn.color.invert_colormap`` of that store computed fully (reduced to one
   value per block, as a, and the largest distance): the inverse against its
   own read pass (``x d4``). Check: volume 0's values within ``max_error`` of
   the grey they were made from.
c1, c2 and d3 were slow when this script was written (a nearest-colour search
per pixel: 0.01-0.03 GB/s; now a 24-bit table, ~1x the read pass), so they are first timed on the leading 2 chunks
(one per thread, 8% of the stack); if the whole stack would then take more
than ``--budget`` s (default 60, as bench_voxel_hist.py's ``--xh-budget``) the
full time is extrapolated linearly in bytes and the row says EXTRAPOLATED
(that script's convention for xhistogram), else the row is run again on
everything (``--budget 1e9``: always). The work is per chunk and independent,
so time is linear in the chunks.

Every row of the store is preceded by the same computation on the leading 2
chunks, untimed: a warm-up for the imports and for this VM's memory. Here the
first touch of fresh memory is a host page fault: ~0.06-0.5 GB/s when the
pages are cold, ~4-8 GB/s when they were freed a few seconds before (the
guest returns free pages to the host after ~10 s; see "first touch" in the
header and the notes). A function that makes GBs of temporaries per chunk
spends its first run in a process mostly in page faults (8 GB: ~100 s); the
warm-up pays that, not the row (the memory per chunk is the same for the
leading chunks and the whole stack).

e. Peers, on the first 20 images held in memory (15.7 MB, 5.2 M pixels):
   - scikit-learn ``KMeans(16, n_init=1, random_state=0).fit(sample)`` on
     200,000 pixels drawn without replacement (numpy ``default_rng(0)``, in the
     timing) and ``predict`` of every pixel, against volnorm's ``fit_quantize``
     (same sample size, seed 0) + ``quantize(labels=True)`` on the same images
     (a dask array of them, 2 chunks of 10 images, 2 threads; scikit-learn's
     OpenMP uses the same 2 cores). Check: the quantization error of each
     palette over all the pixels (mean squared RGB distance to the pixel's
     palette colour; what k-means minimizes). scikit-learn stops at its
     ``tol`` (1e-4), volnorm's fit at a fixed point. Skipped (and said so) when
     scikit-learn is not installed.
   - a per-image loop of ``skimage.color.rgb2gray`` (float64, 0-1) against
     ``vn.color.to_grey(method="rec709")`` (float32, 0-255) of a numpy-backed
     DataArray (eager: 1 thread each); rec709 because rgb2gray uses BT.709
     weights (its 0.2125, 0.7154, 0.0721 vs volnorm's 0.2126, 0.7152, 0.0722).
     Best of 3 at least (sub-second rows).

Checks (untimed, on volume 0 unless said): d1 == BT.601 in numpy; d2 ==
matplotlib ``jet(Normalize(0, 255)(grey), bytes=True)``; c2's labels against a
brute-force nearest palette colour (every pixel's chosen colour as near as the
nearest: ties can go either way) and the palette colours used in the written
labels; d3's max error <= ``attrs["max_error"]`` (from ``attrs["step"]``: jet
repeats its end colours, so 2 steps). No targets: nothing is marked ok/MISS
for speed.

Peak RSS: this process and its children, sampled every 50 ms, absolute (it
carries the allocator's history of the earlier rows). The check column of the
store rows starts with the CPU seconds of the timed run (``getrusage`` of this
process, user + system): system time here is mostly page faults, and where it
dominates, the wall time of the row varies several-fold from run to run. The header also gives
the speed of a first touch of fresh memory (a new 128 MiB buffer filled),
at the start and at the end, and the load average: other processes on the
2 cores slow every row.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_color.py                # 1.1 GB store, ~2-3 min on 2 cores (+~1 min the first time)
    PYTHONPATH=. python benchmarks/bench_color.py --quick        # 0.11 GB smoke run, < 1 min
    PYTHONPATH=. python benchmarks/bench_color.py --json /tmp/color.json --budget 1e9   # no extrapolation

The page cache is not dropped: the store was just written (or is reused) and
fits in RAM, so these are decompression/CPU-bound numbers, not disk numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_histogram import RSSSampler, du, read_pass, say
from bench_transforms import Table, codec, measure, okmiss, write_image_store
from bench_transforms import open_image as open_stack

GB = 1e9
MiB = 2**20
SEED = 2026
THREADS = 2
DIMS = ("volume", "y", "x", "channel")
IMG = (512, 512, 3)
N_FULL, N_QUICK = 1400, 140  # 1.10 GB, 0.11 GB
CHUNK = (56, *IMG)  # 42 MiB
CHUNK_QUICK = (14, *IMG)  # 10.5 MiB
N_COLORS = 16
SAMPLE = 200_000
CMAP = "jet"
SUB_IMAGES = 20  # the in-memory subset of part e
SOURCES = ("astronaut", "coffee", "chelsea")
SCALES = (1.0, 1.2, 1.45, 1.75)  # times the smallest scale that covers 512x512


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def photo_bases() -> list[np.ndarray]:
    """scikit-image's colour samples, each rescaled (bilinear) to the sizes in ``SCALES`` that
    cover a 512x512 crop: 12 uint8 photos."""
    import skimage.data
    import skimage.transform

    bases = []
    for name in SOURCES:
        src = getattr(skimage.data, name)()[..., :3]
        cover = max(IMG[0] / src.shape[0], IMG[1] / src.shape[1])
        for s in SCALES:
            f = cover * s
            out = (src if f == 1.0 else skimage.transform.rescale(
                src, f, order=1, channel_axis=-1, anti_aliasing=False, preserve_range=True))
            bases.append(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    return bases


def make_image(i: int, bases: list[np.ndarray]) -> np.ndarray:
    """Image ``i``: a random crop of a random base, maybe flipped, noise, exposure jitter."""
    rng = np.random.default_rng([SEED, i])
    src = bases[int(rng.integers(len(bases)))]
    y0 = int(rng.integers(0, src.shape[0] - IMG[0] + 1))
    x0 = int(rng.integers(0, src.shape[1] - IMG[1] + 1))
    img = src[y0 : y0 + IMG[0], x0 : x0 + IMG[1]]
    if rng.random() < 0.5:
        img = img[:, ::-1]
    noise = np.rint(rng.standard_normal(IMG, dtype=np.float32) * np.float32(1.5)).astype(np.int16)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    gain, gamma = rng.uniform(0.6, 1.4), rng.uniform(0.7, 1.5)
    wb = rng.uniform(0.9, 1.1, 3)
    v = np.arange(256) / 255.0
    out = np.empty(IMG, dtype=np.uint8)
    for c in range(3):
        lut = np.rint(255.0 * np.clip(gain * wb[c] * v, 0.0, 1.0) ** gamma).astype(np.uint8)
        out[..., c] = lut[img[..., c]]
    return out


def make_store(path: Path, n: int, chunks: tuple[int, ...], fresh: bool) -> None:
    """Writes the store chunk by chunk (2 threads), unless a matching one is there."""
    bases = photo_bases()
    write_image_store(path, {"shape": (n, *IMG), "chunks": chunks, "seed": SEED, "sources": SOURCES, "scales": SCALES, "v": 1},
                      DIMS, (n, *IMG), chunks, np.uint8,
                      lambda i0, i1: np.stack([make_image(i, bases) for i in range(i0, i1)]), not fresh)


def write_store(data: Any, dims: tuple[str, ...], out: Path, chunks: tuple[int, ...]) -> None:
    """A lazy dask array as one zarr v3 array ``image`` (the input store's codec), computed."""
    import xarray as xr

    xr.DataArray(data, dims=dims, name="image").to_dataset().to_zarr(
        out, mode="w", zarr_format=3, consolidated=False, compute=True,
        encoding={"image": {"chunks": chunks, "compressors": codec()}})


def touch_rate(nbytes: int = 128 * MiB) -> float:
    """GB/s of a first touch of fresh memory (a new buffer, filled): page faults."""
    t0 = time.perf_counter()
    b = np.ones(nbytes, dtype=np.uint8)
    dt = time.perf_counter() - t0
    del b
    return nbytes / GB / dt


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------


@dataclass
class Ctx:
    tab: Table
    sampler: RSSSampler
    repeat: int
    notes: list[str]
    workdir: Path
    budget: float
    chunks: tuple[int, ...] = CHUNK
    nbytes: int = 0
    w_read: float = 0.0
    cpu: tuple[float, float] = (0.0, 0.0)


def gbs(nbytes: float, wall: float) -> float:
    return nbytes / GB / wall


def rate(nbytes: float, wall: float) -> str:
    return f"{gbs(nbytes, wall):.2f} GB/s"


def rm(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def leading(x: Any) -> Any:
    """The leading chunks along ``volume``, one per thread (all of ``x`` if it has no more)."""
    ch = x.chunks[0]
    return x.isel(volume=slice(0, sum(ch[:THREADS])))


def timed(ctx: Ctx, x: Any, run: Callable[[Any], Any], before: Callable[[], None] | None = None,
          budget: bool = False) -> tuple[float, int, Any, str, bool]:
    """One row: ``run(leading(x))`` once untimed (the warm-up: imports, and this VM's memory, see
    the module docstring), then ``run(x)`` timed. With ``budget``: ``run(leading(x))`` timed
    first, and ``run(x)`` only if the whole should take at most ``ctx.budget`` s, else the full
    time extrapolated linearly in bytes. ``before`` runs untimed before every run.
    (wall, peak RSS, result, on what, extrapolated)."""
    part = leading(x)
    if before is not None:
        before()
    run(part)
    if budget and part.nbytes < x.nbytes:
        w_part, pk_part, out = cpu_measured(ctx, lambda: run(part), before)
        estimate = w_part * x.nbytes / part.nbytes
        if estimate > ctx.budget:
            how = (f"first {len(part.chunks[0])} of {len(x.chunks[0])} chunks ({part.nbytes / x.nbytes:.0%}) timed, "
                   f"{w_part:.1f} s = {gbs(part.nbytes, w_part):.3f} GB/s, EXTRAPOLATED")
            return estimate, pk_part, out, how, True
        out = None
    w, pk, out = cpu_measured(ctx, lambda: run(x), before)
    return w, pk, out, "all of it", False


def cpu_measured(ctx: Ctx, fn: Callable[[], Any], before: Callable[[], None] | None) -> tuple[float, int, Any]:
    """``measure``, and the process's CPU time (user, system) per run in ``ctx.cpu``."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w, pk, out = measure(ctx.sampler, fn, ctx.repeat, before)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ctx.cpu = ((r1.ru_utime - r0.ru_utime) / ctx.repeat, (r1.ru_stime - r0.ru_stime) / ctx.repeat)
    return w, pk, out


def cpu(ctx: Ctx) -> str:
    """The last timed run's CPU seconds, user + system (page faults are system time)."""
    return f"cpu {ctx.cpu[0]:.0f}+{ctx.cpu[1]:.0f} s sys"


def roundtrip(s: Any) -> tuple[float, float, dict]:
    """d3: grey -> jet RGBA -> back, all lazy from the store; max |back - grey| and the max
    distance, each reduced block by block in one task (``np.abs(d, out=d)``: the check adds
    one temporary per block, not xarray's three)."""
    import dask
    import dask.array as da

    import volnorm as vn

    grey = vn.color.to_grey(s)
    rgba = vn.color.apply_colormap(grey, CMAP, vmin=0, vmax=255)
    back = vn.color.invert_colormap(rgba, CMAP, vmin=0, vmax=255)

    def err(b: np.ndarray, g: np.ndarray) -> np.ndarray:
        d = b - g
        return np.abs(d, out=d).max(keepdims=True).reshape((1,) * b.ndim)

    per_block = da.map_blocks(err, back.data, grey.data, chunks=(1,) * back.ndim, dtype=np.float64)
    e, dist = dask.compute(per_block.max(), back["distance"].data.max())
    return float(e), float(dist), dict(back.attrs)


def run_store(ctx: Ctx, path: Path) -> Any:
    import dask
    import matplotlib

    import volnorm as vn
    from volnorm.color import _pixels_sample

    tab, P = ctx.tab, "store"
    x = open_stack(path)
    a = x.data
    nb = ctx.nbytes = x.nbytes

    def xread(w: float) -> str:
        return f"{w / ctx.w_read:.2f}x read"

    # warm-up (untimed): imports (scipy, matplotlib's colormaps), zarr metadata
    tiny = x.isel(volume=slice(0, 1), y=slice(0, 64), x=slice(0, 64))
    p0 = vn.color.fit_quantize(tiny, N_COLORS, sample=2000, seed=0)
    vn.color.quantize(tiny, params=p0, labels=True).compute()
    roundtrip(tiny)
    read_pass(a[:1]).compute()

    # ---- a. the read pass, a'. the copy
    w_read, pk, _, _, _ = timed(ctx, x, lambda s: read_pass(s.data).compute())
    ctx.w_read = w_read
    tab.add(P, "a. read pass (the I/O limit)", w_read, rate(nb, w_read), "", pk, cpu(ctx), gbs=gbs(nb, w_read),
            cpu=ctx.cpu)
    copy = ctx.workdir / "copy.zarr"
    w, pk, _, _, _ = timed(ctx, x, lambda s: write_store(s.data, DIMS, copy, ctx.chunks), lambda: rm(copy))
    disk = du(copy)
    rm(copy)
    w_copy = w
    tab.add(P, "a'. copy: read + write unchanged", w, rate(nb, w), xread(w), pk,
            f"{cpu(ctx)}; (info) {disk / GB:.2f} GB written", gbs=gbs(nb, w), xread=w / w_read, cpu=ctx.cpu)

    # ---- b. fit_quantize, and its sample pass alone
    w_s, pk, pts, _, _ = timed(ctx, x, lambda s: _pixels_sample(s, SAMPLE, 0, "channel"))
    tab.add(P, "b'. sample pass alone (_pixels_sample)", w_s, rate(nb, w_s), xread(w_s), pk,
            f"{cpu(ctx)}; (info) {len(pts):,} pixels drawn", gbs=gbs(nb, w_s), xread=w_s / w_read, cpu=ctx.cpu)
    del pts
    w_fit, pk, p, _, _ = timed(ctx, x, lambda s: vn.color.fit_quantize(s, N_COLORS, sample=SAMPLE, seed=0))
    pal = np.asarray(p.values["palette"].values)
    tab.add(P, f"b. fit_quantize({N_COLORS}, sample={SAMPLE:,})", w_fit, rate(nb, w_fit), xread(w_fit), pk,
            f"{cpu(ctx)}; palette {pal.shape} in [{pal.min():.0f}, {pal.max():.0f}], on {p.options['sample']:,} px; "
            f"k-means ~{w_fit - w_s:.1f} s (b - b')", gbs=gbs(nb, w_fit), xread=w_fit / w_read, cpu=ctx.cpu)

    # ---- c. quantize to labels: computed fully, then written
    def labels(s: Any) -> Any:
        return vn.color.quantize(s, params=p, labels=True).data

    w, pk, _, how, ext = timed(ctx, x, lambda s: read_pass(labels(s)).compute(), budget=True)
    tab.add(P, "c1. quantize(params=p, labels=True)", w, rate(nb, w), xread(w), pk, f"{cpu(ctx)}; on {how}",
            gbs=gbs(nb, w), xread=w / w_read, extrapolated=ext, cpu=ctx.cpu)
    out = ctx.workdir / "labels.zarr"
    w, pk, _, how, ext = timed(ctx, x, lambda s: write_store(labels(s), DIMS[:3], out, ctx.chunks[:3]), lambda: rm(out),
                               budget=True)
    c2_cpu = ctx.cpu
    lab = open_stack(out)
    used = np.zeros(N_COLORS, dtype=np.int64)
    for i in range(0, lab.sizes["volume"], ctx.chunks[0]):
        used += np.bincount(np.asarray(lab[i : i + ctx.chunks[0]].values).ravel(), minlength=N_COLORS)[:N_COLORS]
    px = np.asarray(x[0].values).reshape(-1, 3).astype(np.float64)
    d2 = ((px[:, None, :] - pal[None, :, :]) ** 2).sum(-1)
    l0 = np.asarray(lab[0].values).ravel().astype(np.intp)
    chosen = d2[np.arange(len(l0)), l0]
    best = d2.min(1)
    near = int(np.count_nonzero(chosen > best + 1e-6))
    exact = int(np.count_nonzero(l0 != d2.argmin(1)))
    del px, d2
    tab.add(P, "c2. the same + write labels to a store", w, rate(nb, w), xread(w), pk,
            f"cpu {c2_cpu[0]:.0f}+{c2_cpu[1]:.0f} s sys; {w / w_copy:.2f}x copy; vol 0 == nearest colour: {'ok' if near == 0 else f'MISMATCH ({near} px)'}"
            f" ({exact} ties); {int(np.count_nonzero(used))}/{N_COLORS} colours used; on {how}",
            gbs=gbs(nb, w), xread=w / w_read, extrapolated=ext, cpu=c2_cpu)
    rm(out)

    # ---- d. greyscale, colormap, and back
    grey0 = np.asarray(vn.color.to_grey(x[:1]).values[0])
    r, g, b = (np.asarray(x[0].values)[..., c].astype(np.float32) for c in range(3))
    ref0 = (np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b)
    d_grey = float(np.abs(grey0 - ref0).max())
    w, pk, _, _, _ = timed(ctx, x, lambda s: read_pass(vn.color.to_grey(s).data).compute())
    tab.add(P, "d1. to_grey (rec601, float32)", w, rate(nb, w), xread(w), pk,
            f"{cpu(ctx)}; vol 0 vs numpy 0.299R+0.587G+0.114B: max|diff| {d_grey:.2g}", gbs=gbs(nb, w),
            xread=w / w_read, cpu=ctx.cpu)

    def cmapped(s: Any) -> Any:
        return vn.color.apply_colormap(vn.color.to_grey(s), CMAP, vmin=0, vmax=255)

    got = np.asarray(cmapped(x[:1]).values[0])
    want = matplotlib.colormaps[CMAP](matplotlib.colors.Normalize(0, 255)(grey0), bytes=True)
    same = np.array_equal(got, want)
    w_cm, pk, _, _, _ = timed(ctx, x, lambda s: read_pass(cmapped(s).data).compute())
    tab.add(P, f"d2. apply_colormap(grey, {CMAP!r}, 0, 255)", w_cm, rate(nb, w_cm), xread(w_cm), pk,
            f"{cpu(ctx)}; uint8 RGBA; vol 0 == matplotlib {CMAP}(Normalize(0, 255)): "
            + ("ok" if same else f"MISMATCH ({int(np.count_nonzero(np.any(got != want, -1)))} px)"),
            gbs=gbs(nb, w_cm), xread=w_cm / w_read, cpu=ctx.cpu)
    del got, want

    w, pk, (err, dist, attrs), how, ext = timed(ctx, x, roundtrip, budget=True)
    ok = err <= attrs["max_error"]
    tab.add(P, "d3. invert_colormap(rgba) round trip", w, rate(nb, w), xread(w), pk,
            f"{cpu(ctx)}; max|back - grey| {err:.3f} <= attrs max_error {attrs['max_error']:.3f} (step {attrs['step']:.4f}): "
            f"{okmiss(ok)}; max distance {dist:.3g}; d3 - d2 ~{w - w_cm:.0f} s; on {how}",
            gbs=gbs(nb, w), xread=w / w_read, extrapolated=ext, cpu=ctx.cpu, max_abs_error=err, step=attrs["step"],
            max_error=attrs["max_error"], max_distance=dist)

    # ---- d4, d5: a rendering whose data were lost: jet RGB in a store, and its inverse from there
    rendering = ctx.workdir / "rendering.zarr"
    rm(rendering)
    write_store(cmapped(x).isel(channel=slice(0, 3)).data, DIMS, rendering, ctx.chunks)
    rx = open_stack(rendering)
    w_rr, pk, _, _, _ = timed(ctx, rx, lambda s: read_pass(s.data).compute())
    tab.add(P, f"d4. read pass of a {CMAP} rendering (RGB store)", w_rr, rate(nb, w_rr), xread(w_rr), pk,
            f"{cpu(ctx)}; (info) the inverse's I/O limit; {du(rendering) / GB:.2f} GB on disk, written from d2's colours",
            gbs=gbs(nb, w_rr), xread=w_rr / w_read, cpu=ctx.cpu)

    def inverse(s: Any) -> Any:
        back = vn.color.invert_colormap(s, CMAP, vmin=0, vmax=255)
        return dask.compute(read_pass(back.data), back["distance"].data.max())

    back0 = vn.color.invert_colormap(rx[:1], CMAP, vmin=0, vmax=255)
    err0 = float(np.abs(np.asarray(back0.values[0]) - grey0).max())
    ok = err0 <= back0.attrs["max_error"]
    w, pk, _, how, ext = timed(ctx, rx, inverse, budget=True)
    tab.add(P, "d5. invert_colormap from the rendering's store", w, rate(nb, w), f"{w / w_rr:.2f}x d4", pk,
            f"{cpu(ctx)}; {w / w_read:.2f}x a; float64 value + float32 distance; vol 0 max|back - grey| {err0:.3f} "
            f"<= max_error {back0.attrs['max_error']:.3f}: {okmiss(ok)}; on {how}",
            gbs=gbs(nb, w), xread=w / w_read, extrapolated=ext, cpu=ctx.cpu)
    rm(rendering)
    return x


def run_subset(ctx: Ctx, x: Any) -> None:
    """e: the peers on the first images, in memory."""
    import dask.array as da
    import skimage.color
    import xarray as xr

    import volnorm as vn

    tab, P = ctx.tab, "e"
    n = min(SUB_IMAGES, x.sizes["volume"])
    sub = np.ascontiguousarray(x.isel(volume=slice(0, n)).values)
    nb = sub.nbytes
    flat = sub.reshape(-1, 3)
    on = f"{n} images in memory ({nb / 2**20:.1f} MiB, {len(flat) / 1e6:.1f} M px)"
    say(f"  [{on}]")
    xs = xr.DataArray(da.from_array(sub, chunks=(max(1, n // THREADS), *IMG)), dims=DIMS)

    def mse(palette: np.ndarray, lab: np.ndarray) -> float:
        tot = 0.0
        for i in range(0, len(flat), 1 << 20):
            d = flat[i : i + (1 << 20)].astype(np.float64) - palette[lab[i : i + (1 << 20)]]
            tot += float((d * d).sum())
        return tot / len(flat)

    def vn_km() -> tuple[Any, np.ndarray]:
        p = vn.color.fit_quantize(xs, N_COLORS, sample=SAMPLE, seed=0)
        return p, np.asarray(vn.color.quantize(xs, params=p, labels=True).values)

    vn_km()  # warm-up
    w_vn, pk, (p, lab) = measure(ctx.sampler, vn_km, ctx.repeat)
    e_vn = mse(np.asarray(p.values["palette"].values), lab.ravel())
    tab.add(P, "e1. vn fit_quantize + quantize(labels), 2 thr", w_vn, rate(nb, w_vn), "", pk,
            f"on {on}; quantization MSE {e_vn:.2f}", gbs=gbs(nb, w_vn), mse=e_vn)
    try:
        import sklearn
        from sklearn.cluster import KMeans
    except ImportError as e:
        tab.add(P, "e2. sklearn KMeans fit(sample) + predict", None, "", "", None, f"SKIPPED: scikit-learn not installed ({e})")
    else:
        from threadpoolctl import threadpool_info

        def sk_km() -> tuple[Any, np.ndarray]:
            rng = np.random.default_rng(0)
            s = flat[rng.choice(len(flat), min(SAMPLE, len(flat)), replace=False)].astype(np.float64)
            km = KMeans(N_COLORS, n_init=1, random_state=0).fit(s)
            return km, km.predict(flat)

        sk_km()  # warm-up
        w_sk, pk, (km, lab_sk) = measure(ctx.sampler, sk_km, ctx.repeat)
        e_sk = mse(km.cluster_centers_, lab_sk)
        omp = [t["num_threads"] for t in threadpool_info() if t["user_api"] == "openmp"]
        tab.add(P, "e2. sklearn KMeans(16,n_init=1) fit+predict", w_sk, rate(nb, w_sk), f"vn {w_sk / w_vn:.2f}x", pk,
                f"scikit-learn {sklearn.__version__}, OpenMP threads {omp or '?'}; {km.n_iter_} iterations; "
                f"quantization MSE {e_sk:.2f} (vn/sklearn {e_vn / e_sk:.3f})", gbs=gbs(nb, w_sk), speedup=w_sk / w_vn, mse=e_sk)
        del lab_sk

    fast = max(ctx.repeat, 3)
    xn = xr.DataArray(sub, dims=DIMS)

    def sk_grey() -> np.ndarray:
        out = np.empty(sub.shape[:3])
        for i in range(n):
            out[i] = skimage.color.rgb2gray(sub[i])
        return out

    w_vg, pk_vg, gv = measure(ctx.sampler, lambda: np.asarray(vn.color.to_grey(xn, method="rec709").values), fast)
    w_sg, pk, gs = measure(ctx.sampler, sk_grey, fast)
    diff = float(np.abs(gv / np.float32(255) - gs).max())
    tab.add(P, "e3. vn.color.to_grey(rec709), eager, 1 thr", w_vg, rate(nb, w_vg), "", pk_vg,
            f"float32 0-255; max|vn/255 - skimage| {diff:.2g} (BT.709 weights rounded differently)", gbs=gbs(nb, w_vg))
    tab.add(P, "e4. skimage.color.rgb2gray loop, 1 thr", w_sg, rate(nb, w_sg), f"vn {w_sg / w_vg:.2f}x", pk,
            "float64 0-1, image by image", gbs=gbs(nb, w_sg), speedup=w_sg / w_vg)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-color"))
    ap.add_argument("--quick", action="store_true", help=f"smoke run: the first {N_QUICK} images (0.11 GB)")
    ap.add_argument("--fresh", action="store_true", help="rewrite the store even if a matching one is there")
    ap.add_argument("--clean", action="store_true", help="delete the store at the end (default: keep it for reuse)")
    ap.add_argument("--repeat", type=int, default=1, help="time each measurement N times, report the best (default 1)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="run the slow rows (c1, c2, d3) on everything only if that should take at most this many s "
                         "(default 60), else extrapolate from the leading chunks")
    ap.add_argument("--json", type=Path, help="save the rows as JSON")
    args = ap.parse_args()

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    import dask
    import matplotlib
    import psutil
    import scipy
    import skimage
    import xarray as xr
    import zarr

    import volnorm as vn

    try:
        import sklearn

        sk_version = sklearn.__version__
    except ImportError:
        sk_version = "not installed"

    n = N_QUICK if args.quick else N_FULL
    path = args.workdir / ("rgb-quick.zarr" if args.quick else "rgb.zarr")
    sampler = RSSSampler()
    tab = Table()
    notes: list[str] = []
    ctx = Ctx(tab, sampler, args.repeat, notes, args.workdir, args.budget, CHUNK_QUICK if args.quick else CHUNK)
    env = [
        (f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
         f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}"),
        (f"volnorm {vn.__version__}, dask {dask.__version__}, xarray {xr.__version__}, zarr {zarr.__version__}, "
         f"numpy {np.__version__}, scipy {scipy.__version__}, scikit-image {skimage.__version__}, "
         f"scikit-learn {sk_version}, matplotlib {matplotlib.__version__}"),
    ]
    t_all = time.perf_counter()
    t_setup = 0.0
    try:
        say(f"[store in {path}]")
        t0 = time.perf_counter()
        make_store(path, n, ctx.chunks, args.fresh)
        t_setup = time.perf_counter() - t0
        raw = n * math.prod(IMG)
        disk = du(path)
        env += [
            (f"data: ({n}, {', '.join(map(str, IMG))}) uint8 {DIMS}, chunks {ctx.chunks} "
             f"({math.prod(ctx.chunks) / MiB:.0f} MiB), {raw / GB:.2f} GB raw, {disk / GB:.2f} GB on disk "
             f"(ratio {raw / disk:.2f}); zarr v3 BloscCodec(lz4, clevel 5); crops of skimage.data "
             f"{'/'.join(SOURCES)} rescaled x{SCALES}, flips, noise, exposure jitter"),
            (f"method: xarray.open_zarr (dask), threaded scheduler, {THREADS} threads; best of {args.repeat} run(s) "
             f"(e3/e4: {max(args.repeat, 3)}); page cache not dropped; GB/s = GB (1e9 B) of RGB input / wall; "
             f"x read = wall / a; slow rows EXTRAPOLATED from 2 chunks above {args.budget:.0f} s"),
            ("load average (1, 5, 15 min) at the start: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
             + f"; first touch of fresh memory: {touch_rate():.2f} GB/s"),
        ]
        for line in env:
            say(line)
        with dask.config.set(scheduler="threads", num_workers=THREADS):
            say("\n[the store]")
            x = run_store(ctx, path)
            say("\n[peers, in memory]")
            run_subset(ctx, x)
    finally:
        sampler.stop()
        for p in ("copy.zarr", "labels.zarr"):
            rm(args.workdir / p)
        if args.clean:
            rm(path)
            path.with_suffix(".json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                args.workdir.rmdir()

    if any(r.get("extrapolated") for r in tab.rows):
        notes.append("EXTRAPOLATED rows: timed on the leading chunks (one per thread), scaled by bytes to the whole "
                     "stack; their peak RSS and cpu are the leading part's (the peak is per chunk, so the same for "
                     "the whole)")
    notes.append("cpu = this process's CPU seconds during the timed run, user + system; on this VM system time is "
                 "mostly page faults of fresh memory (large temporaries), and it varies from run to run")
    notes.append("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                 + f"; first touch of fresh memory: {touch_rate():.2f} GB/s")
    tab.report("volnorm colour benchmark (volnorm.color on an RGB uint8 stack)", env, notes, 170,
               (t_all, t_setup, "writing the store"), args.json)


if __name__ == "__main__":
    main()

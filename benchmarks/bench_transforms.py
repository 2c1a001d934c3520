#!/usr/bin/env python
"""Benchmark volnorm's intensity transforms (histogram equalization, Nyúl-Udupa
standardization) against the I/O limit of the same store, per-image loops and
the Nyúl peers (intensity-normalization, TorchIO).

Three parts, in one run:

1. Dataset-wide, on a zarr v3 store of uint16 MRI-like 256^3 phantoms
   (``bench_histogram.make_volume``), shape (N, 256, 256, 256), one 32 MiB
   chunk per volume, Blosc lz4 clevel 5 byte-shuffle, >= ``--size-gb`` GB
   (10^9 bytes) uncompressed:

   a. the read pass (every chunk read and decompressed);
   b. the copy: read the store and write it unchanged (same codec and chunks)
      to a new store with xarray's ``to_zarr``;
      I/O LIMIT = a + b: a two-pass transform has to read once for the fit and
      read + write once for the apply;
   c. ``vn.equalize(x)`` (dataset-wide CDF, fit pass included) written with
      xarray's ``to_zarr`` - the default float output is float64 for integer
      input (as scikit-image), 4x the input bytes;
   d. ``vn.equalize(x, out_range="uint16")`` + the same write: the output has
      the input's bytes, so this is the like-for-like row (target);
   e. the same through ``vn.to_zarr`` (volnorm's safe writer: staging, every
      chunk verified, per-volume NIfTI-Zarr groups for 4-D stacks);
   f. ``vn.nyul_fit`` + ``vn.nyul_apply`` (mask ``x > 100``: the Rician
      background is |N(0, 25)|) + xarray write (float32 output, 2x the bytes);
   plus the fits alone (``fit_equalize``, ``nyul_fit``) for reference.
   The results are checked against numpy on volume 0 (untimed).

2. Batch: equalize each of 1000 (and 10,000) uint8 96x96 images
   (``volnorm.datasets.make_image_stack``, seed 0), all in memory:
   ``vn.equalize(xr.DataArray(stack, dims=("volume", "y", "x")), dim=("y", "x"))``
   (threaded scheduler; float output and ``out_range="uint8"``) against the
   per-image numpy loop (``np.histogram`` + ``np.interp``), per-image
   ``skimage.exposure.equalize_hist`` and per-image ``cv2.equalizeHist``.
   volnorm's uint8 output is compared with ``cv2.equalizeHist`` and its float
   output with ``equalize_hist``.

3. Nyúl fit on 200 float32 64^3 phantoms (``volnorm.datasets.make_cohort``,
   NIfTI files), each fit in a fresh subprocess (imports and a 2-volume
   warm-up untimed): volnorm (``vn.open_nifti`` + ``vn.nyul_fit``, mask
   ``x > 0``, threaded scheduler) at 50, 100 and 200 volumes, and the peers at
   the same counts: intensity-normalization's ``NyulNormalizer.fit_population``
   (same landmarks, range and ``> 0`` mask as volnorm's defaults) and TorchIO's
   ``HistogramStandardization.train`` (its own landmarks, range (0, 100), all
   voxels; volnorm is also run once with those settings to compare landmarks).
   The peers run under ``--peer-python`` (default: this interpreter); a peer
   that cannot be imported there is reported as "peer not installed" and
   skipped. A throwaway peers venv (never the project's venv)::

       python -m venv /tmp/peers-venv
       /tmp/peers-venv/bin/pip install torch==2.13.0      # the local CPU wheel
       /tmp/peers-venv/bin/pip install intensity-normalization torchio

GB/s = uncompressed input GB / wall. Peak RSS: parts 1 and 2, the sum over
this process and its children sampled every 50 ms; part 3, the worker
process's own peak (``VmHWM``) and the fit's extra RSS: its peak during the
fit (sampled every 10 ms) minus its RSS just before (after imports and the
warm-up). volnorm uses the 2 threads; the peers run single-threaded numpy.

Targets (marked ok/MISS):
* dataset-wide equalization (like for like, uint16 out) <= 1.2 x the I/O limit;
* batch equalization >= 10 x faster than the per-image numpy loop (float
  output, as the loop's) and >= 0.5 x the throughput of the OpenCV loop
  (uint8 output, as OpenCV's);
* Nyúl fit: the fit's extra RSS at the largest count <= 1.2 x that at the
  smallest + 16 MiB (flat), and faster than each peer on the same files.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_transforms.py                 # 2 GB store, ~5 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_transforms.py --quick         # 0.3 GB, 1000 images, 40 volumes, ~1 min
    PYTHONPATH=. python benchmarks/bench_transforms.py --peer-python /tmp/peers-venv/bin/python

The page cache is not dropped: the stores were just written (or are reused)
and fit in RAM, so part 1 is decompression/CPU-bound, not disk-bound.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_histogram import RSSSampler, du, make_volume, read_pass, say

GB = 1e9
MiB = 2**20
SHAPE3 = (256, 256, 256)
CHUNKS = (1, 256, 256, 256)  # uint16: 32 MiB
NYUL_SHAPE = (64, 64, 64)
NYUL_MASK_THRESHOLD = 100  # part 1: above the |N(0, 25)| background
# TorchIO's HistogramStandardization landmarks with its default cutoff (0.01, 0.99)
TIO_PERCENTILES = (1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 99)
PEERS = ("intensity-normalization", "torchio")


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------


def measure(sampler: RSSSampler, fn: Callable[[], Any], repeat: int,
            before: Callable[[], None] | None = None) -> tuple[float, int, Any]:
    """Best wall time of ``repeat`` runs of ``fn`` (``before`` runs untimed first), the peak RSS."""
    best, peak, out = math.inf, 0, None
    for _ in range(repeat):
        if before is not None:
            before()
        out = None
        gc.collect()
        sampler.reset()
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        time.sleep(0.06)
        best = min(best, dt)
        peak = max(peak, sampler.peak)
    return best, peak, out


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, part: str, name: str, wall: float | None = None, rate: str = "", vs: str = "",
            peak: int | None = None, check: str = "", **extra: Any) -> dict:
        r = {"part": part, "name": name, "wall": wall, "rate": rate, "vs": vs, "peak": peak, "check": check, **extra}
        self.rows.append(r)
        say("  " + self.fmt(r))
        return r

    @staticmethod
    def fmt(r: dict) -> str:
        wall = f"{r['wall']:8.2f}" if r["wall"] is not None else " " * 8
        peak = f"{r['peak'] / 2**30:6.2f}Gi" if r["peak"] else " " * 8
        return f"{r['part']:<6} {r['name']:<46} {wall} {r['rate']:>12} {r['vs']:>20} {peak}  {r['check']}"

    def report(self, title: str, env: list[str], notes: list[str], width: int, timing: tuple[float, float, str],
               json_path: Path | None = None) -> None:
        """The whole table at the end of a run: title, environment lines, rows, notes, the time
        (``(t_all start, setup seconds, what the setup was)``); the rows as JSON when asked."""
        say("\n" + "=" * width)
        say(title)
        for line in env:
            say("  " + line)
        say("-" * width)
        say(self.header())
        for r in self.rows:
            say(self.fmt(r))
        say("-" * width)
        for n in notes:
            say("note: " + n)
        t_all, t_setup, setup = timing
        total = time.perf_counter() - t_all
        say(f"time: {total:.0f} s in all, {total - t_setup:.0f} s measuring (the rest: {setup})")
        if json_path:
            json_path.write_text(json.dumps({"env": env, "rows": self.rows, "notes": notes}, indent=1, default=str))

    @staticmethod
    def header() -> str:
        return f"{'part':<6} {'measurement':<46} {'wall s':>8} {'rate':>12} {'vs':>20} {'peak RSS':>8}  check"


def okmiss(ok: bool) -> str:
    return "ok" if ok else "MISS"


# ---------------------------------------------------------------------------
# part 1: dataset-wide transforms on a >= 2 GB store
# ---------------------------------------------------------------------------


def codec():
    import zarr

    return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def write_image_store(path: Path, want: dict, dims: tuple[str, ...], shape: tuple[int, ...], chunks: tuple[int, ...],
                      dtype: Any, piece: Callable[[int, int], np.ndarray], keep_existing: bool, label: str = "") -> None:
    """A zarr v3 store holding one array ``image`` (:func:`codec`), written ``chunks[0]`` volumes at
    a time on 2 threads (``piece(i0, i1)`` makes volumes ``i0:i1``), progress every 5 pieces.
    Reused as it is when ``keep_existing`` and its marker file (``path.json``) holds ``want``."""
    import dask.array as da
    import xarray as xr

    marker = path.with_suffix(".json")
    want = json.loads(json.dumps(want))
    if keep_existing and marker.exists() and path.exists():
        with contextlib.suppress(ValueError):
            if json.loads(marker.read_text()) == want:
                say(f"  reusing {path}")
                return
    marker.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpl = xr.Dataset({"image": (dims, da.zeros(shape, dtype=dtype, chunks=chunks))})
    tmpl.to_zarr(path, zarr_format=3, compute=False, consolidated=False,
                 encoding={"image": {"chunks": chunks, "compressors": codec()}})
    step, n = chunks[0], shape[0]
    starts = range(0, n, step)

    def write(i0: int) -> None:
        i1 = min(i0 + step, n)
        xr.Dataset({"image": (dims, piece(i0, i1))}).to_zarr(path, region={"volume": slice(i0, i1)}, consolidated=False)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(2) as pool:
        for k, fut in enumerate(cf.as_completed([pool.submit(write, i) for i in starts]), 1):
            fut.result()
            if k % 5 == 0 or k == len(starts):
                say(f"  {label}wrote {k}/{len(starts)} pieces of {step} volumes ({time.perf_counter() - t0:.0f} s)")
    marker.write_text(json.dumps(want))


def open_image(path: Path) -> Any:
    """The array ``image`` of a store written by :func:`write_image_store`, dask-backed."""
    import xarray as xr

    return xr.open_zarr(path, consolidated=False)["image"]


def make_store(path: Path, nvol: int, keep_existing: bool) -> None:
    write_image_store(path, {"nvol": nvol, "shape": SHAPE3, "chunks": list(CHUNKS), "version": 1},
                      ("volume", "z", "y", "x"), (nvol, *SHAPE3), CHUNKS, "uint16",
                      lambda i0, i1: np.stack([make_volume(i) for i in range(i0, i1)]), keep_existing)


def write_xarray(y: Any, out: Path) -> None:
    """Write a lazy DataArray as one zarr v3 array ``image``, the store's codec and chunk shape."""
    import xarray as xr

    ya = xr.DataArray(y.data, dims=y.dims, name="image")  # no inherited encoding
    ya.to_dataset().to_zarr(out, mode="w", zarr_format=3, consolidated=False, compute=True,
                            encoding={"image": {"chunks": CHUNKS, "compressors": codec()}})


def run_store(tab: Table, sampler: RSSSampler, path: Path, out_dir: Path, repeat: int, notes: list[str]) -> None:
    import zarr

    import volnorm as vn

    x = open_image(path)
    a = x.data
    nbytes = x.nbytes
    out = out_dir / "out.zarr"

    def clear() -> None:
        shutil.rmtree(out, ignore_errors=True)

    def gbs(w: float) -> str:
        return f"{nbytes / GB / w:.2f} GB/s"

    # warm-up (untimed): numba compile/load, zarr metadata
    x1 = x.isel(volume=slice(0, 1))
    vn.equalize(x1, out_range="uint16").isel(z=0).compute()
    vn.nyul_fit(x.isel(volume=slice(0, 2)), mask=x.isel(volume=slice(0, 2)) > NYUL_MASK_THRESHOLD)

    w_read, pk, _ = measure(sampler, lambda: read_pass(a).compute(), repeat)
    tab.add("store", "a. read pass", w_read, gbs(w_read), "", pk)
    w_copy, pk, _ = measure(sampler, lambda: write_xarray(x, out), repeat, clear)
    tab.add("store", "b. read + write unchanged (xarray to_zarr)", w_copy, gbs(w_copy), f"{w_copy / w_read:.2f}x read", pk)
    limit = w_read + w_copy
    tab.add("store", "I/O LIMIT = a + b", limit, gbs(limit), "", None)

    def vs(w: float) -> str:
        return f"{w / limit:.2f}x limit"

    w, pk, _ = measure(sampler, lambda: vn.fit_equalize(x), repeat)
    tab.add("store", "   vn.fit_equalize (fit pass only)", w, gbs(w), f"{w / w_read:.2f}x read", pk)

    w, pk, _ = measure(sampler, lambda: write_xarray(vn.equalize(x), out), repeat, clear)
    tab.add("store", "c. vn.equalize float64 out + write [xarray]", w, gbs(w), vs(w), pk,
            f"{okmiss(w / limit <= 1.2)} vs <=1.2x, but writes 4x the bytes", ratio=w / limit)

    y16 = None

    def eq16() -> None:
        nonlocal y16
        y16 = vn.equalize(x, out_range="uint16")
        write_xarray(y16, out)

    w, pk, _ = measure(sampler, eq16, repeat, clear)
    # check (untimed): the written volume 0 against numpy (global bincount, OpenCV's formula)
    counts = np.zeros(65536, dtype=np.int64)
    for i in range(x.sizes["volume"]):
        counts += np.bincount(np.asarray(a[i].compute()).ravel(), minlength=65536)
    cum = np.cumsum(counts)
    first = counts[np.argmax(counts > 0)]
    n = cum[-1]
    step = np.float32(65535) / np.float32(max(n - first, 1))  # OpenCV's float32 arithmetic, as documented
    lut = np.clip(np.rint(np.clip(cum - first, 0, None).astype(np.float32) * step), 0, 65535).astype(np.uint16)
    got = zarr.open_array(out / "image", mode="r")[0]
    v0 = np.asarray(a[0].compute())
    same = np.array_equal(got, lut[v0])
    ndiff = int(np.count_nonzero(got != lut[v0]))
    tab.add("store", "d. vn.equalize uint16 out + write [xarray]", w, gbs(w), vs(w), pk,
            f"target <=1.2x limit: {okmiss(w / limit <= 1.2)}; vol 0 == numpy: "
            + ("ok" if same else f"MISMATCH ({ndiff} voxels)"), ratio=w / limit)
    if not same:
        notes.append(f"equalize uint16: volume 0 differs from the numpy reference in {ndiff} voxels "
                     f"(max |diff| {int(np.abs(got.astype(np.int64) - lut[v0]).max())})")

    out_vn = out_dir / "out-vn.zarr"

    def clear_vn() -> None:
        shutil.rmtree(out_vn, ignore_errors=True)

    def eq16_vn() -> None:
        vn.to_zarr(vn.equalize(x, out_range="uint16"), out_vn)

    try:
        w, pk, _ = measure(sampler, eq16_vn, repeat, clear_vn)
        back = vn.open_zarr(out_vn)
        layout = "one array `image`" if (out_vn / "image").exists() else "one NIfTI-Zarr group per volume"
        same_vn = np.array_equal(np.asarray(back.isel(volume=0).values), got)
        tab.add("store", "e. vn.equalize uint16 out + vn.to_zarr", w, gbs(w), vs(w), pk,
                f"{okmiss(w / limit <= 1.2)} vs <=1.2x (writer verifies chunks); == d: {same_vn}", ratio=w / limit)
        notes.append(f"vn.to_zarr on this 4-D (volume, z, y, x) non-NIfTI stack wrote {layout} "
                     f"({', '.join(sorted(p.name for p in out_vn.iterdir())[:3])}, ...), not one array `image`")
    except Exception as e:  # report, do not hide
        tab.add("store", "e. vn.equalize uint16 out + vn.to_zarr", None, "", "", None, f"FAILED: {type(e).__name__}: {e}")
        notes.append(f"vn.to_zarr failed: {type(e).__name__}: {e}")
    finally:
        clear_vn()
    del got

    mask = x > NYUL_MASK_THRESHOLD
    w, pk, p = measure(sampler, lambda: vn.nyul_fit(x, mask=mask), repeat)
    tab.add("store", f"   vn.nyul_fit (mask x > {NYUL_MASK_THRESHOLD}) only", w, gbs(w), f"{w / w_read:.2f}x read", pk)

    def nyul() -> None:
        lm = vn.nyul_fit(x, mask=mask)
        write_xarray(vn.nyul_apply(x, lm, mask=mask), out)

    w, pk, _ = measure(sampler, nyul, repeat, clear)
    ps = p.values["percentiles"].values
    ref = np.percentile(v0[v0 > NYUL_MASK_THRESHOLD], ps)
    lm_vn = vn.quantile(x.isel(volume=slice(0, 1)), list(ps / 100), dim=("z", "y", "x"),
                        mask=mask.isel(volume=slice(0, 1))).values.ravel()
    ok = np.allclose(lm_vn, ref, rtol=0, atol=1e-9)
    tab.add("store", "f. vn.nyul_fit + nyul_apply + write [xarray]", w, gbs(w), vs(w), pk,
            f"float32 out (2x bytes); vol 0 landmarks == np.percentile: {'ok' if ok else 'MISMATCH'}", ratio=w / limit)
    clear()


# ---------------------------------------------------------------------------
# part 2: batch equalization of many small images
# ---------------------------------------------------------------------------


def numpy_loop(stack: np.ndarray) -> np.ndarray:
    out = np.empty(stack.shape, dtype=np.float64)
    for i, img in enumerate(stack):
        h, e = np.histogram(img, 256, range=(0, 256))
        cdf = h.cumsum() / h.sum()
        out[i] = np.interp(img, e[:-1], cdf)
    return out


def skimage_loop(stack: np.ndarray) -> np.ndarray:
    from skimage import exposure

    out = np.empty(stack.shape, dtype=np.float64)
    for i, img in enumerate(stack):
        out[i] = exposure.equalize_hist(img)
    return out


def cv2_loop(stack: np.ndarray) -> np.ndarray:
    import cv2

    out = np.empty_like(stack)
    for i, img in enumerate(stack):
        out[i] = cv2.equalizeHist(img)
    return out


def run_batch(tab: Table, sampler: RSSSampler, stack: np.ndarray, repeat: int, notes: list[str]) -> None:
    import dask
    import xarray as xr

    import volnorm as vn

    n = len(stack)
    part = f"b{n}"
    x = xr.DataArray(stack, dims=("volume", "y", "x"))
    fast = max(repeat, 3)  # short measurements: best of 3 at least

    def rate(w: float) -> str:
        return f"{n / w:,.0f} img/s"

    with dask.config.set(scheduler="threads"):
        vn.equalize(x[:4], dim=("y", "x"), out_range="uint8").compute()  # warm-up
        w_vf, pk, yf = measure(sampler, lambda: vn.equalize(x, dim=("y", "x")).compute(), fast)
        r_vf = tab.add(part, "vn.equalize per image, float out", w_vf, rate(w_vf), "", pk)
        w_v8, pk, y8 = measure(sampler, lambda: vn.equalize(x, dim=("y", "x"), out_range="uint8").compute(), fast)
        r_v8 = tab.add(part, "vn.equalize per image, out_range=uint8", w_v8, rate(w_v8), "", pk)
    w_np, pk, ynp = measure(sampler, lambda: numpy_loop(stack), repeat)
    tab.add(part, "numpy loop (np.histogram + np.interp)", w_np, rate(w_np), f"vn float {w_np / w_vf:.1f}x", pk,
            f"target vn >=10x faster: {okmiss(w_np / w_vf >= 10)}")
    w_sk, pk, ysk = measure(sampler, lambda: skimage_loop(stack), repeat)
    tab.add(part, "skimage.exposure.equalize_hist loop", w_sk, rate(w_sk), f"vn float {w_sk / w_vf:.1f}x", pk)
    try:
        import cv2  # noqa: F401
    except ImportError as e:
        tab.add(part, "cv2.equalizeHist loop", None, "", "", None, f"peer not installed: opencv ({e})")
        ycv = None
    else:
        w_cv, pk, ycv = measure(sampler, lambda: cv2_loop(stack), fast)
        tab.add(part, "cv2.equalizeHist loop", w_cv, rate(w_cv), f"vn uint8 {w_cv / w_v8:.2f}x", pk,
                f"target vn >=0.5x OpenCV throughput: {okmiss(w_cv / w_v8 >= 0.5)}")
    # checks (untimed)
    yf, y8 = np.asarray(yf.values), np.asarray(y8.values)
    d_sk = float(np.abs(yf - ysk).max())
    d_np = float(np.abs(yf - ynp).max())
    r_vf["check"] = f"max|diff| vs skimage {d_sk:.2g}, vs numpy loop {d_np:.2g}"
    if ycv is not None:
        bad = [i for i in range(n) if not np.array_equal(y8[i], ycv[i])]
        if not bad:
            r_v8["check"] = f"== cv2.equalizeHist: ok (all {n} images)"
        else:
            dmax = max(int(np.abs(y8[i].astype(int) - ycv[i]).max()) for i in bad)
            nvox = sum(int(np.count_nonzero(y8[i] != ycv[i])) for i in bad)
            r_v8["check"] = f"== cv2.equalizeHist: MISMATCH in {len(bad)}/{n} images (max |diff| {dmax})"
            notes.append(f"batch {n}: volnorm uint8 != cv2.equalizeHist in images {bad[:8]}{' ...' if len(bad) > 8 else ''} "
                         f"({nvox} pixels, max |diff| {dmax}): values whose exact (C - C_min) * 255 / (N - C_min) "
                         "ends in .5 - volnorm rounds the exact value half to even, OpenCV rounds its float32 "
                         "product sum * (255.f / (N - C_min)), which lands just above or below .5")
    if d_np > 1e-6:
        notes.append(f"batch {n}: the numpy loop interpolates on the bin *edges* e[:-1], scikit-image and volnorm "
                     f"on the bin centres: max |diff| {d_np:.3g} (expected; vs skimage {d_sk:.2g})")


# ---------------------------------------------------------------------------
# part 3: Nyúl fit on many small volumes, each run in a fresh process
# ---------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: on Linux that keeps the parent's high-water
    mark across fork + exec, so a worker started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def nyul_worker(tool: str, n: int, cohort: str, settings: str) -> None:
    """Runs in a subprocess (possibly under the peers' interpreter: only numpy + stdlib here)."""
    files = sorted(str(p) for p in Path(cohort).glob("*.nii"))[:n]
    t0 = time.perf_counter()
    try:
        if tool == "volnorm":
            import dask

            import volnorm as vn

            dask.config.set(scheduler="threads")
            version = vn.__version__

            def fit(fs: list[str]) -> np.ndarray:
                x = vn.open_nifti(fs)
                if settings == "torchio":
                    p = vn.nyul_fit(x, percentiles=TIO_PERCENTILES, standard_range=(0.0, 100.0))
                else:
                    p = vn.nyul_fit(x, mask=x > 0)
                return p.values["standard"].values

        elif tool == "intensity-normalization":
            import intensity_normalization as inorm

            version = inorm.__version__
            try:
                from intensity_normalization import NyulNormalizer
                from intensity_normalization.adapters.images import create_image
            except ImportError as e:
                raise RuntimeError(f"unsupported intensity-normalization API (version {version}): {e}") from None

            def fit(fs: list[str]) -> np.ndarray:
                nn = NyulNormalizer()  # defaults: percentiles 1, 10..90, 99; range (1, 100); mask data > 0
                nn.fit_population([create_image(f) for f in fs])
                return np.asarray(nn.standard_scale)

        elif tool == "torchio":
            import torch
            import torchio as tio

            version = f"{tio.__version__} (torch {torch.__version__})"

            def fit(fs: list[str]) -> np.ndarray:
                return np.asarray(tio.HistogramStandardization.train(fs, progress=False))

        else:
            raise ValueError(tool)
    except ImportError as e:
        print(json.dumps({"error": f"not installed: {type(e).__name__}: {e}"}))
        return
    except RuntimeError as e:
        print(json.dumps({"error": str(e)}))
        return
    t_import = time.perf_counter() - t0
    fit(files[:2])  # warm-up: lazy imports, numba load
    gc.collect()
    base = _rss()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    land = fit(files)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    maxrss = max(_hwm(), peak[0])
    print(json.dumps({"wall": wall, "import": t_import, "base": base, "peak_sampled": peak[0], "maxrss": maxrss,
                      "n": len(files), "version": version, "landmarks": [float(v) for v in land],
                      "python": sys.executable}))


def run_worker(python: str, tool: str, n: int, cohort: Path, settings: str = "default") -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--_nyul-worker", tool, str(n), str(cohort), settings]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"could not run {python}: {type(e).__name__}: {e}"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    return json.loads(lines[-1])


def best_worker(python: str, tool: str, n: int, cohort: Path, repeat: int, settings: str = "default") -> dict:
    """``run_worker`` ``repeat`` times (fresh processes): the fastest run, with the highest peak memory seen."""
    runs = [run_worker(python, tool, n, cohort, settings) for _ in range(max(1, repeat))]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["wall"]))
    best["maxrss"] = max(r["maxrss"] for r in ok)
    best["peak_sampled"] = max(r["peak_sampled"] for r in ok)
    best["base"] = min(r["base"] for r in ok)
    return best


def run_nyul(tab: Table, cohort: Path, counts: list[int], peer_python: str, notes: list[str], repeat: int = 1) -> None:
    n_max = counts[-1]
    res: dict[tuple[str, int], dict] = {}

    def mib(v: int) -> str:
        return f"{v / MiB:.0f} MiB"

    for n in counts:
        r = best_worker(sys.executable, "volnorm", n, cohort, repeat)
        res["volnorm", n] = r
        if "error" in r:
            tab.add("nyul", f"vn.nyul_fit, {n} volumes", None, "", "", None, f"FAILED: {r['error']}")
            continue
        tab.add("nyul", f"vn.nyul_fit, {n} volumes", r["wall"], f"{n / r['wall']:.0f} vol/s", "", r["maxrss"],
                f"fit +{mib(r['peak_sampled'] - r['base'])} over {mib(r['base'])} before", n=n, tool="volnorm")
    ok_v = [res["volnorm", n] for n in counts if "error" not in res["volnorm", n]]
    if len(ok_v) >= 2:
        g = ok_v[-1]["maxrss"] / ok_v[0]["maxrss"]
        d0, d1 = (r["peak_sampled"] - r["base"] for r in (ok_v[0], ok_v[-1]))
        flat = d1 <= 1.2 * d0 + 16 * MiB
        tab.add("nyul", f"   volnorm memory {counts[0]} -> {n_max} volumes", None, "", f"peak x{g:.2f}", None,
                f"fit's extra RSS {mib(d0)} -> {mib(d1)}: target flat (<=1.2x + 16 MiB): {okmiss(flat)}")

    for peer in PEERS:
        first = best_worker(peer_python, peer, counts[0], cohort, repeat)
        if "error" in first:
            msg = first["error"]
            if msg.startswith("not installed"):
                msg = f"peer not installed: {peer} ({msg.removeprefix('not installed: ')}; python {peer_python})"
            else:
                msg = f"peer failed: {peer}: {msg}"
            tab.add("nyul", f"{peer}", None, "", "", None, msg)
            continue
        for n in counts:
            r = first if n == counts[0] else best_worker(peer_python, peer, n, cohort, repeat)
            res[peer, n] = r
            if "error" in r:
                tab.add("nyul", f"{peer}, {n} volumes", None, "", "", None, f"FAILED: {r['error']}")
                continue
            vs = ""
            check = f"fit +{mib(r['peak_sampled'] - r['base'])} over {mib(r['base'])} before"
            v = res.get(("volnorm", n), {})
            if "wall" in v:
                sp = r["wall"] / v["wall"]
                vs = f"vn {sp:.2f}x"
                if n == n_max:
                    check += f"; target vn faster: {okmiss(sp > 1)}"
            tab.add("nyul", f"{peer} {r['version'].split(' ')[0]}, {n} volumes", r["wall"], f"{n / r['wall']:.0f} vol/s",
                    vs, r["maxrss"], check, n=n, tool=peer)
        if all("error" not in res[peer, n] for n in (counts[0], n_max)):
            r0, r1 = res[peer, counts[0]], res[peer, n_max]
            g = r1["maxrss"] / r0["maxrss"]
            tab.add("nyul", f"   {peer} memory {counts[0]} -> {n_max} volumes", None, "", f"peak x{g:.2f}", None,
                    f"fit's extra RSS {mib(r0['peak_sampled'] - r0['base'])} -> {mib(r1['peak_sampled'] - r1['base'])}")
        notes.append(f"{peer}: {res.get((peer, n_max), first).get('version', '?')} under {peer_python}")

    # do the fitted standard landmarks agree? (same files, same definitions)
    v = res.get(("volnorm", n_max), {})
    inorm = res.get(("intensity-normalization", n_max), {})
    if "landmarks" in v and "landmarks" in inorm:
        d = np.abs(np.array(v["landmarks"]) - np.array(inorm["landmarks"])).max()
        notes.append(f"standard landmarks, {n_max} volumes: volnorm vs intensity-normalization max |diff| {d:.3g}")
    tio_r = res.get(("torchio", n_max), {})
    if "landmarks" in tio_r:
        vt = run_worker(sys.executable, "volnorm", n_max, cohort, "torchio")
        if "landmarks" in vt:
            d = np.abs(np.array(vt["landmarks"]) - np.array(tio_r["landmarks"])).max()
            notes.append(f"standard landmarks, {n_max} volumes: volnorm with TorchIO's settings (its 13 landmarks, "
                         f"range (0, 100), no mask; {vt['wall']:.2f} s) vs TorchIO max |diff| {d:.3g}")
        else:
            notes.append(f"volnorm with TorchIO's settings failed: {vt.get('error')}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--_nyul-worker":
        nyul_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="uncompressed GB (1e9) of the store, at least (default 2.0)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-transforms"))
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the store and the NIfTI cohort")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.3 GB store, 1000 images, 40 volumes")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each measurement N times, report the best (default 1; sub-second batch rows: at least 3)")
    ap.add_argument("--images", type=int, nargs="+", help="batch sizes (default 1000 10000; --quick: 1000)")
    ap.add_argument("--volumes", type=int, nargs="+", help="Nyúl volume counts (default 50 100 200; --quick: 10 20 40)")
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter that has intensity-normalization / torchio (default: this one)")
    ap.add_argument("--skip-store", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--skip-nyul", action="store_true")
    ap.add_argument("--json", type=Path, help="save the rows as JSON")
    args = ap.parse_args()
    size = 0.3 if args.quick else args.size_gb
    nvol = max(1, math.ceil(size * GB / (math.prod(SHAPE3) * 2)))
    images = args.images or ([1000] if args.quick else [1000, 10000])
    counts = sorted(args.volumes or ([10, 20, 40] if args.quick else [50, 100, 200]))

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    import dask
    import numba
    import psutil
    import skimage
    import xarray as xr
    import zarr

    import volnorm as vn

    try:
        import cv2

        cv_version = cv2.__version__
    except ImportError:
        cv_version = "not installed"

    sampler = RSSSampler()
    tab = Table()
    notes: list[str] = []
    args.workdir.mkdir(parents=True, exist_ok=True)
    store = args.workdir / "u16.zarr"
    cohort = args.workdir / f"cohort-{counts[-1]}"
    env = [
        (f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
         f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}"),
        (f"volnorm {vn.__version__}, dask {dask.__version__}, xarray {xr.__version__}, zarr {zarr.__version__}, "
         f"numba {numba.__version__}, numpy {np.__version__}, scikit-image {skimage.__version__}, opencv {cv_version}"),
        f"peers' python: {args.peer_python}",
        (f"best of {args.repeat} run(s) per measurement (batch volnorm/OpenCV rows: best of {max(args.repeat, 3)}; Nyúl: fresh processes); "
         "threaded scheduler; page cache not dropped"),
    ]
    t_all = time.perf_counter()
    t_setup = 0.0
    try:
        if not args.skip_store:
            say(f"\n[part 1: store of {nvol} volumes of {SHAPE3} uint16 in {store}]")
            t0 = time.perf_counter()
            make_store(store, nvol, args.keep)
            t_setup += time.perf_counter() - t0
            raw = nvol * math.prod(SHAPE3) * 2
            env.append(f"store: shape ({nvol}, {', '.join(map(str, SHAPE3))}) uint16, chunks {CHUNKS} "
                       f"({math.prod(CHUNKS) * 2 / MiB:.0f} MiB), {raw / GB:.2f} GB raw, {du(store) / GB:.2f} GB on disk; "
                       "codec zarr v3 BloscCodec(lz4, clevel 5, shuffle)")
            with dask.config.set(scheduler="threads"):
                run_store(tab, sampler, store, args.workdir, args.repeat, notes)
        if not args.skip_batch:
            say(f"\n[part 2: batch equalization of {images} uint8 96x96 images]")
            t0 = time.perf_counter()
            full = vn.datasets.make_image_stack(max(images), (96, 96), seed=0)
            t_setup += time.perf_counter() - t0
            env.append(f"images: volnorm.datasets.make_image_stack({max(images)}, (96, 96), seed=0), first n used")
            for n in images:
                run_batch(tab, sampler, np.ascontiguousarray(full[:n]), args.repeat, notes)
            del full
        if not args.skip_nyul:
            say(f"\n[part 3: Nyúl fit on {counts} float32 {NYUL_SHAPE} NIfTI volumes]")
            t0 = time.perf_counter()
            if not (args.keep and cohort.exists() and len(list(cohort.glob("*.nii"))) == counts[-1]):
                shutil.rmtree(cohort, ignore_errors=True)
                vn.datasets.make_cohort(cohort, counts[-1], shape=NYUL_SHAPE, dtype="float32", seed=0)
            t_setup += time.perf_counter() - t0
            env.append(f"cohort: volnorm.datasets.make_cohort({counts[-1]}, shape={NYUL_SHAPE}, dtype=float32), "
                       f"{counts[-1] * math.prod(NYUL_SHAPE) * 4 / MiB:.0f} MiB of .nii; first n files used")
            run_nyul(tab, cohort, counts, args.peer_python, notes, args.repeat)
    finally:
        sampler.stop()
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
            store.with_suffix(".json").unlink(missing_ok=True)
            shutil.rmtree(cohort, ignore_errors=True)
            with contextlib.suppress(OSError):
                args.workdir.rmdir()

    tab.report("volnorm transforms benchmark", env, notes, 150, (t_all, t_setup, "making the data"), args.json)


if __name__ == "__main__":
    main()

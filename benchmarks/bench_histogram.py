#!/usr/bin/env python
"""Benchmark volnorm's statistics passes (histogram, moments, exact quantiles)
against a plain read of the same zarr v3 stores and against dask.array's own
``histogram`` / ``percentile``.

Two stores of shape (N, 256, 256, 256), chunked 32 MiB, Blosc lz4 clevel 5
byte-shuffle (zarr v3), written volume by volume:

* ``u16``: uint16 MRI-like phantoms (smooth blobs + noise, mostly < 4096,
  a few bright spots above it), one 256^3 volume per chunk;
* ``f32``: the same values * 0.25 + Gaussian noise, float32, a few NaNs per
  volume, chunks (1, 128, 256, 256); same volume shape, half as many volumes
  (the first ones of ``u16``), so that both stores hold the same bytes.

Each store holds >= ``--size-gb`` GB (10^9 bytes) of uncompressed voxels.

For each store, with the threaded scheduler and then on a local cluster of 2
single-threaded worker processes (``volnorm.engine.local_cluster``, started
before timing), it times:

a. the read pass: every chunk read and decompressed, ~nothing else;
b. ``volnorm.histogram(x)`` (incl. its range pass), and with ``range=`` given;
   the range pass alone (``value_range``);
c. ``dask.array.histogram`` with the same bins and range (the peer);
d. ``volnorm.summarize(x, quantiles=())`` (moments pass);
e. ``volnorm.quantile(x, [.02, .5, .98])`` (exact) vs ``dask.array.percentile``
   of the raveled data (NaNs dropped first for float data: with them dask's
   answer is NaN), with dask's absolute error.

Checksums (``--skip-checksums`` to leave out, ``--checksums-only`` for just these): each
store is also written twice with ``volnorm.to_zarr`` (a NIfTI-Zarr cohort, one group per
volume, blosc-lz4): once as volnorm writes now (a CRC-32C after the compressor, zarr v3's
``crc32c`` codec) and once without it (``volnorm.io.niftizarr.compressors`` swapped for
``compressors(..., checksum=False)`` while writing: no public argument turns the CRC off).
The read pass and the histogram pass are timed, interleaved round by round, on four reads
of the same voxels:

k1. no CRC, read directly: ``dask.array.from_zarr(zarr.open_array(<path>))`` per volume,
    stacked as ``vn.open_zarr`` does (the baseline);
k2. no CRC, ``vn.open_zarr`` (its ``CheckedStore``: a missing-chunk check only);
k3. CRC, read directly (zarr's ``Crc32cCodec`` verifies it on decode);
k4. CRC, ``vn.open_zarr`` (``CheckedStore`` checks the CRC, then zarr's codec again).

Target: k4 <= 1.05 x k1 for both passes.

.nii.gz (``--skip-nifti-gz`` to leave out, ``--nifti-gz-only`` for just these): ``--gz-files``
(default 6) int16 brain phantoms of 256x256x192 (``volnorm.datasets.make_cohort``, nibabel's
gzip level), on each scheduler:

f. ``vn.histogram(vn.open_nifti("<dir>/*.nii.gz"))`` computed (opening included: it reads the
   headers and checks the gzip trailers), against ``isal.igzip`` decompression of the same files
   in a pool of 2 processes (started before timing), interleaved round by round. Target: the
   lazy histogram's throughput >= 0.7 x ISA-L's (best of the rounds; the median of the
   same-round ratios is shown too). The counts are checked against numpy's on the voxels
   nibabel decompresses. For information, the same with ``range=`` given (the int16
   default histograms the whole dtype range, then trims it: heavier on a cluster).

GB/s = uncompressed GB / wall. ``x read`` = wall / read-pass wall of the same
store and scheduler. Peak RSS is the sum over this process and all its
children (the workers), sampled every 50 ms during the measurement.

Targets (marked ok/MISS):
* integer histogram, one pass (``range=`` given) <= 1.2 x read;
* float histogram, default (range pass + histogram) <= 2.2 x read;
* integer histogram >= 3 x faster than dask.array.histogram (like for like:
  both with the range given); float32 is reported without a target (volnorm's
  default incl. its range pass against dask with the range known).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_histogram.py            # 2 GB uint16 + 4 GB float32
    PYTHONPATH=. python benchmarks/bench_histogram.py --quick    # ~0.3 GB smoke run
    PYTHONPATH=. python benchmarks/bench_histogram.py --keep --workdir /data/bench-hist

The page cache is not dropped: the stores were just written (or are reused)
and fit in RAM, so these are decompression/CPU-bound numbers, not disk numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

GB = 1e9
MiB = 2**20
SHAPE3 = (256, 256, 256)
QS = (0.02, 0.5, 0.98)
CHUNKS = {"uint16": (1, 256, 256, 256), "float32": (1, 128, 256, 256)}


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------
# peak RSS of the process tree
# ---------------------------------------------------------------------------


class RSSSampler:
    """Samples RSS(this process + all children) every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            v = self._sample()
            if v > self.peak:
                self.peak = v
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self._sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def _gauss(n: int, c: float, s: float) -> np.ndarray:
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    return np.exp(-0.5 * ((t - c) / s) ** 2).astype(np.float32)


def make_volume(i: int, seed: int = 1234) -> np.ndarray:
    """A smooth MRI-like uint16 volume: a head-sized blob, tissue blobs, a few bright spots, noise."""
    rng = np.random.default_rng(seed + i)
    nz, ny, nx = SHAPE3
    v = np.zeros(SHAPE3, dtype=np.float32)
    # (amplitude, sigma) of the blobs: head, white/grey matter, ventricles-ish, small bright spots
    specs = [(900.0, 0.22), (700.0, 0.12), (1200.0, 0.06), (1500.0, 0.035), (4200.0, 0.012)]
    for amp, s in specs:
        c = rng.uniform(0.35, 0.65, 3) if s > 0.1 else rng.uniform(0.2, 0.8, 3)
        ss = s * rng.uniform(0.8, 1.25, 3)
        a = np.float32(amp * rng.uniform(0.85, 1.15))
        gz, gy, gx = _gauss(nz, c[0], ss[0]), _gauss(ny, c[1], ss[1]) * a, _gauss(nx, c[2], ss[2])
        v += gz[:, None, None] * gy[None, :, None] * gx[None, None, :]
    noise = rng.standard_normal(SHAPE3, dtype=np.float32)
    noise *= np.float32(25.0)
    v += noise
    np.abs(v, out=v)  # magnitude images: Rician-like background
    np.clip(v, 0, 65535, out=v)
    return np.rint(v).astype(np.uint16)


def to_float(u: np.ndarray, i: int, seed: int = 4321) -> np.ndarray:
    rng = np.random.default_rng(seed + i)
    f = u.astype(np.float32)
    f *= np.float32(0.25)
    f += rng.standard_normal(u.shape, dtype=np.float32) * np.float32(0.5)
    flat = f.reshape(-1)
    flat[rng.integers(0, flat.size, 50)] = np.nan
    return f


def make_stores(workdir: Path, nvols: dict[str, int], keep_existing: bool) -> dict[str, Path]:
    import dask.array as da
    import xarray as xr
    import zarr

    paths = {"uint16": workdir / "u16.zarr", "float32": workdir / "f32.zarr"}
    marker = workdir / "stores.json"
    want = {"nvol": nvols, "shape": SHAPE3, "chunks": {k: list(v) for k, v in CHUNKS.items()}, "version": 1}
    if keep_existing and marker.exists():
        try:
            if json.loads(marker.read_text()) == json.loads(json.dumps(want)) and all(p.exists() for p in paths.values()):
                say(f"reusing stores in {workdir}")
                return paths
        except ValueError:
            pass
    workdir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    codec = zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    nvol = max(nvols.values())
    for dt, p in paths.items():
        shape = (nvols[dt], *SHAPE3)
        shutil.rmtree(p, ignore_errors=True)
        tmpl = xr.Dataset({"image": (("volume", "z", "y", "x"), da.zeros(shape, dtype=dt, chunks=CHUNKS[dt]))})
        tmpl.to_zarr(p, zarr_format=3, compute=False, consolidated=False,
                     encoding={"image": {"chunks": CHUNKS[dt], "compressors": codec}})

    def write(i: int) -> None:
        u = make_volume(i)
        todo = [("uint16", u)] if i < nvols["uint16"] else []
        if i < nvols["float32"]:
            todo.append(("float32", to_float(u, i)))
        for dt, arr in todo:
            ds = xr.Dataset({"image": (("volume", "z", "y", "x"), arr[None])})
            ds.to_zarr(paths[dt], region={"volume": slice(i, i + 1)}, consolidated=False)

    write_volumes(write, nvol)
    marker.write_text(json.dumps(want))
    return paths


def write_volumes(write: Callable[[int], None], nvol: int) -> None:
    """Call ``write(i)`` for every volume on 2 threads, reporting progress every 10 volumes."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(2) as pool:
        for k, fut in enumerate(cf.as_completed([pool.submit(write, i) for i in range(nvol)])):
            fut.result()
            if (k + 1) % 10 == 0 or k + 1 == nvol:
                say(f"  wrote {k + 1}/{nvol} volumes ({time.perf_counter() - t0:.0f} s)")


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------


def read_pass(a: Any) -> Any:
    """Reads and decompresses every chunk; returns one number (touches one voxel per chunk)."""

    def first(b: np.ndarray) -> np.ndarray:
        return np.full((1,) * b.ndim, float(b.flat[0]) if b.size else 0.0)

    return a.map_blocks(first, chunks=tuple((1,) * len(c) for c in a.chunks), dtype=np.float64).sum()


class Bench:
    def __init__(self, sampler: RSSSampler, repeat: int) -> None:
        self.sampler = sampler
        self.repeat = repeat
        self.rows: list[dict] = []
        self.crc_rows: list[dict] = []

    def time(self, fn: Callable[[], Any]) -> tuple[float, int, Any]:
        best, peak, out = math.inf, 0, None
        for _ in range(self.repeat):
            self.sampler.reset()
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
            time.sleep(0.06)
            best = min(best, dt)
            peak = max(peak, self.sampler.peak)
        return best, peak, out


def _set_chunk_checksums(on: bool) -> None:
    """Benchmark-only switch: volnorm's NIfTI-Zarr writer with or without the chunk CRC-32C
    (``vn.to_zarr(codec=...)`` always appends it: ``compressors`` re-adds ``Crc32cCodec``)."""
    import functools

    from volnorm.io import niftizarr, store

    niftizarr.compressors = store.compressors if on else functools.partial(store.compressors, checksum=False)


def make_checksum_stores(workdir: Path, paths: dict[str, Path], keep_existing: bool) -> dict[str, dict[str, Path]]:
    """For each plain store, two volnorm stores of its voxels (``vn.to_zarr``): ``crc`` (the
    default, CRC-32C per chunk) and ``nocrc`` (written with the checksum switched off)."""
    import dask
    import xarray as xr

    import volnorm
    from volnorm.integrity import quick_check

    out = {dt: {kind: workdir / f"{p.stem}-{kind}.zarr" for kind in ("crc", "nocrc")} for dt, p in paths.items()}
    marker = workdir / "checksum-stores.json"
    want = {"from": json.loads((workdir / "stores.json").read_text()), "version": 1}
    if keep_existing and marker.exists():
        try:
            if json.loads(marker.read_text()) == want and all(q.exists() for d in out.values() for q in d.values()):
                say(f"reusing checksum stores in {workdir}")
                return out
        except ValueError:
            pass
    marker.unlink(missing_ok=True)
    for dt, p in paths.items():
        src = xr.open_zarr(p, consolidated=False)["image"]
        for kind, q in out[dt].items():
            shutil.rmtree(q, ignore_errors=True)
            t0 = time.perf_counter()
            _set_chunk_checksums(kind == "crc")
            try:
                with dask.config.set(scheduler="threads", num_workers=2):
                    volnorm.to_zarr(src, q)
            finally:
                _set_chunk_checksums(True)
            got = quick_check(q)["checksums"]
            want_crc = "all" if kind == "crc" else "none"
            if got != want_crc:
                raise RuntimeError(f"{q}: chunk checksums {got!r}, expected {want_crc!r}")
            say(f"  wrote {q.name} with vn.to_zarr ({'CRC-32C per chunk' if kind == 'crc' else 'no checksum'}) "
                f"in {time.perf_counter() - t0:.0f} s")
    marker.write_text(json.dumps(want))
    return out


def open_direct(path: Path) -> Any:
    """The stack ``vn.open_zarr(path)`` gives, read without volnorm's ``CheckedStore``: each
    volume's array opened with plain ``zarr.open_array`` (a ``LocalStore``), stacked the same way."""
    import dask.array as da
    import xarray as xr
    import zarr

    from volnorm.io.store import read_manifest

    names = read_manifest(path)["volumes"]
    arrays = [da.from_zarr(zarr.open_array(str(path / n / "0"), mode="r")) for n in names]
    first = zarr.open_array(str(path / names[0] / "0"), mode="r")
    return xr.DataArray(da.stack(arrays), dims=("volume", *first.metadata.dimension_names),
                        coords={"volume": names}, name="image")


CRC_VARIANTS = (
    ("k1", "nocrc", False, "no CRC, zarr direct (baseline)"),
    ("k2", "nocrc", True, "no CRC, vn.open_zarr (presence)"),
    ("k3", "crc", False, "CRC, zarr direct (zarr decode)"),
    ("k4", "crc", True, "CRC, vn.open_zarr (checked)"),
)


def run_checksums(b: Bench, sched: str, dt: str, stores: dict[str, Path], repeat: int) -> None:
    """The read pass and the histogram pass over k1-k4 (see the module docstring), interleaved:
    each round times every variant once, in an order rotated from round to round."""
    import volnorm

    xs = {}
    for tag, kind, checked, _ in CRC_VARIANTS:
        xs[tag] = volnorm.open_zarr(stores[kind]) if checked else open_direct(stores[kind])
    nbytes = xs["k1"].nbytes
    for tag, x in xs.items():  # same voxels, same chunks in every variant
        assert x.shape == xs["k1"].shape and x.data.chunks == xs["k1"].data.chunks, (tag, x.data.chunks)
    # warm-up (untimed): numba, zarr metadata, the range of the uint16 data
    for x in xs.values():
        volnorm.histogram(x.isel(volume=slice(0, 1))).compute()
    from volnorm._histogram import value_range as vr

    lo, hi = vr(xs["k1"])
    if dt == "uint16":
        passes = {"read pass": lambda x: read_pass(x.data).compute(),
                  "histogram (range= given)": lambda x: volnorm.histogram(x, range=(lo, hi)).compute()}
    else:
        passes = {"read pass": lambda x: read_pass(x.data).compute(),
                  "histogram (range pass + hist)": lambda x: volnorm.histogram(x).compute()}
    times: dict[tuple[str, str], list[float]] = {(p, t): [] for p in passes for t in xs}
    peaks: dict[tuple[str, str], int] = {k: 0 for k in times}
    results: dict[tuple[str, str], Any] = {}
    tags = list(xs)
    for r in range(repeat):
        order = tags[r % len(tags):] + tags[: r % len(tags)]
        for pname, fn in passes.items():
            for tag in order:
                b.sampler.reset()
                t0 = time.perf_counter()
                out = fn(xs[tag])
                dt_s = time.perf_counter() - t0
                time.sleep(0.06)
                times[(pname, tag)].append(dt_s)
                peaks[(pname, tag)] = max(peaks[(pname, tag)], b.sampler.peak)
                if pname != "read pass":
                    results[(pname, tag)] = np.asarray(out.values)
        say(f"  {sched:<7} {dt:<7} round {r + 1}/{repeat}: " + "; ".join(
            f"{p[:4]} {t} {times[(p, t)][-1]:.2f} s" for p in passes for t in tags))
    for pname in passes:
        base = times[(pname, "k1")]
        for tag, kind, checked, label in CRC_VARIANTS:
            ts = times[(pname, tag)]
            best = min(ts)
            ratio = best / min(base)
            med = statistics.median(t / u for t, u in zip(ts, base))
            check = ""
            if pname != "read pass":
                same = np.array_equal(results[(pname, tag)], results[(pname, "k1")])
                check = f"counts == k1: {same}"
            if tag == "k4":
                ok = ratio <= 1.05
                check = (check + "; " if check else "") + f"target <=1.05x k1: {'ok' if ok else 'MISS'}"
            if tag in ("k3", "k4"):
                prev = "k1" if tag == "k3" else "k3"
                check = (check + "; " if check else "") + f"{best / min(times[(pname, prev)]):.3f}x {prev}"
            b.crc_rows.append({"sched": sched, "dtype": dt, "pass": pname, "tag": tag, "variant": label,
                               "wall": best, "walls": ts, "gbs": nbytes / GB / best, "x_base": ratio,
                               "x_base_median": med, "peak": peaks[(pname, tag)], "check": check})


def run_store(b: Bench, sched: str, dt: str, path: Path, notes: list[str]) -> None:
    import dask.array as da
    import xarray as xr

    import volnorm

    from volnorm._histogram import value_range as vr
    x = xr.open_zarr(path, consolidated=False)["image"]
    a = x.data
    nbytes = x.nbytes
    tag = f"{sched:<7} {dt:<7}"

    def row(name: str, wall: float, peak: int, check: str = "", ratio: bool = True) -> None:
        r = {"sched": sched, "dtype": dt, "name": name, "wall": wall, "gbs": nbytes / GB / wall,
             "peak": peak, "check": check}
        r["xread"] = wall / b_read if ratio and b_read else None
        b.rows.append(r)
        xr_s = f"{r['xread']:5.2f}x" if r["xread"] else "      "
        say(f"  {tag} {name:<34} {wall:7.2f} s {r['gbs']:6.2f} GB/s {xr_s} {peak / 2**30:6.2f} GiB  {check}")

    # warm-up (untimed): numba load/compile in every process, zarr metadata
    x0 = x.isel(volume=slice(0, 1))
    volnorm.histogram(x0).compute()
    volnorm.histogram(x0, bins=16).compute() if dt == "float32" else None
    volnorm.summarize(x0, quantiles=())

    b_read = None
    w, pk, _ = b.time(lambda: read_pass(a).compute())
    b_read = w
    row("a. read pass", w, pk, ratio=False)

    w_rng, pk, (lo, hi) = b.time(lambda: vr(x))
    row("   value_range (range pass)", w_rng, pk)

    w_def, pk, h_def = b.time(lambda: volnorm.histogram(x).compute())
    if dt == "uint16":
        row("b. volnorm.histogram (incl. range)", w_def, pk)
        w_rg, pk, h_rg = b.time(lambda: volnorm.histogram(x, range=(lo, hi)).compute())
        ok = w_rg / b_read <= 1.2
        row("b. volnorm.histogram range= given", w_rg, pk, f"target <=1.2x read: {'ok' if ok else 'MISS'}")
        nb = int(hi - lo + 1)
        drange = (lo - 0.5, hi + 0.5)
        mine, mine_w = h_rg, w_rg
    else:
        ok = w_def / b_read <= 2.2
        row("b. volnorm.histogram (range+hist)", w_def, pk, f"target <=2.2x read: {'ok' if ok else 'MISS'}")
        nb = 256
        drange = (lo, hi)
        mine, mine_w = h_def, w_def

    w_dh, pk, dcounts = b.time(lambda: da.histogram(a, bins=nb, range=drange)[0].compute())
    same = np.array_equal(np.asarray(dcounts), mine.values)
    sp = w_dh / mine_w
    target = f", target >=3x: {'ok' if sp >= 3 else 'MISS'}" if dt == "uint16" else " (float: no speed target)"
    row(f"c. dask.array.histogram ({nb} bins)", w_dh, pk, f"volnorm {sp:.1f}x faster{target}; counts equal: {same}")
    if not same:
        diff = np.asarray(dcounts) - mine.values
        notes.append(f"{sched}/{dt}: dask vs volnorm histogram counts differ in {np.count_nonzero(diff)} bins "
                     f"(sum diff {int(diff.sum())}): dask bins float32 data on float64 edges from range=, "
                     "volnorm on the float32 edges np.histogram(whole array) makes - volnorm equals numpy")

    w, pk, s = b.time(lambda: volnorm.summarize(x, quantiles=()))
    row("d. volnorm.summarize(quantiles=())", w, pk, f"mean={float(s['mean']):.4g} n_nan={int(s['n_nan'])}")

    w_q, pk, qv = b.time(lambda: volnorm.quantile(x, list(QS)))
    ours = np.asarray(qv.values, dtype=np.float64)
    row("e. volnorm.quantile (exact)", w_q, pk, "q=" + ", ".join(f"{v:.6g}" for v in ours))

    flat = a.ravel()
    if dt == "float32":
        flat = flat[~da.isnan(flat)]
    w_p, pk, dq = b.time(lambda: np.asarray(da.percentile(flat, [100 * q for q in QS]).compute(), dtype=np.float64))
    err = np.abs(dq - ours)
    row("e. dask.array.percentile" + (" (NaN dropped)" if dt == "float32" else ""), w_p, pk,
        "abs err vs exact: " + ", ".join(f"{e:.3g}" for e in err) + f"; volnorm {w_p / w_q:.1f}x faster")

    if dt == "uint16" and sched == "threads":  # sanity check, not timed
        v0 = x.isel(volume=0).values
        ref = np.quantile(v0, QS)
        got = volnorm.quantile(x.isel(volume=slice(0, 1)), list(QS)).values
        ok = np.array_equal(ref, got)
        notes.append(f"sanity: volnorm.quantile(volume 0) == np.quantile: {ok} (ours {got.tolist()}, numpy {ref.tolist()})")


# ---------------------------------------------------------------------------
# a .nii.gz cohort read lazily, against ISA-L decompression of the same files
# ---------------------------------------------------------------------------

GZ_SHAPE = (256, 256, 192)  # NIfTI order (x, y, z): int16, 24 MiB of voxels per file


def make_gz_cohort(workdir: Path, n: int, keep_existing: bool) -> list[Path]:
    """``n`` int16 brain phantoms of ``GZ_SHAPE`` as .nii.gz (``volnorm.datasets.make_cohort``)."""
    from volnorm.datasets import make_cohort

    d = workdir / "niigz"
    marker = workdir / "niigz.json"
    want = {"n": n, "shape": list(GZ_SHAPE), "version": 1}
    files = sorted(d.glob("sub-*.nii.gz"))
    if keep_existing and marker.exists() and len(files) == n:
        with contextlib.suppress(ValueError):
            if json.loads(marker.read_text()) == want:
                say(f"reusing {n} .nii.gz phantoms in {d}")
                return files
    marker.unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    files = make_cohort(d, n, shape=GZ_SHAPE, compressed=True, dtype="int16", seed=11)
    say(f"  wrote {n} .nii.gz phantoms of {GZ_SHAPE} int16 in {time.perf_counter() - t0:.0f} s")
    marker.write_text(json.dumps(want))
    return files


def gunzip_isal(path: str) -> int:
    """Decompress one file with ``isal.igzip`` (8 MiB reads); the number of bytes it holds."""
    from isal import igzip

    buf = bytearray(8 * MiB)
    n = 0
    with igzip.open(path, "rb") as f:
        while k := f.readinto(buf):
            n += k
    return n


def run_nifti_gz(b: Bench, sched: str, files: list[Path], pool: cf.ProcessPoolExecutor, repeat: int) -> None:
    """``vn.histogram(vn.open_nifti(<dir>/*.nii.gz))`` (opening included) against ISA-L decompression
    of the same files in 2 processes, interleaved round by round; the counts checked against numpy's."""
    import nibabel as nib

    import volnorm

    pattern = str(files[0].parent / "*.nii.gz")
    names = [str(p) for p in files]
    nbytes = sum(volnorm.read_info(p).data_bytes for p in files)
    tag = f"{sched:<7} {'int16':<7}"

    def isal() -> int:
        return sum(pool.map(gunzip_isal, names))

    def lazy(**kw: Any) -> Any:
        return volnorm.histogram(volnorm.open_nifti(pattern), **kw).compute()

    # warm-up (untimed): the pool's processes, numba in every worker, the page cache; the range
    isal()
    h0 = lazy()
    rng = (int(h0["bin"].values[0]), int(h0["bin"].values[-1]))
    runs = {"isal": isal, "lazy": lazy, "range": lambda: lazy(range=rng)}
    walls: dict[str, list[float]] = {k: [] for k in runs}
    peaks = dict.fromkeys(runs, 0)
    h = h_rg = None
    for r in range(repeat):
        for k in list(runs)[r % 3:] + list(runs)[: r % 3]:
            b.sampler.reset()
            t0 = time.perf_counter()
            out = runs[k]()
            walls[k].append(time.perf_counter() - t0)
            time.sleep(0.06)
            peaks[k] = max(peaks[k], b.sampler.peak)
            if k == "lazy":
                h = out
            elif k == "range":
                h_rg = out
        say(f"  {tag} .nii.gz round {r + 1}/{repeat}: isal {walls['isal'][-1]:.2f} s, lazy histogram "
            f"{walls['lazy'][-1]:.2f} s, with range= {walls['range'][-1]:.2f} s")
    # numpy on the decompressed voxels (untimed)
    ref = np.zeros(h.sizes["bin"], dtype=np.int64)
    lo = int(h["bin"].values[0])
    for p in files:
        v = np.asarray(nib.load(p).dataobj).astype(np.int64).ravel() - lo
        ref += np.bincount(v, minlength=ref.size)[: ref.size]
    best = {k: min(v) for k, v in walls.items()}

    def vs_isal(k: str) -> str:  # throughput against ISA-L's: best against best, and the median same-round ratio
        med = statistics.median(i / w for i, w in zip(walls["isal"], walls[k]))
        return f"{best['isal'] / best[k]:.2f}x isal throughput (median {med:.2f}x)"

    ok = best["isal"] / best["lazy"] >= 0.7
    for k, name, check in (
        ("isal", "f. isal.igzip gunzip (2 processes)", ""),
        ("lazy", "f. histogram(open_nifti(*.nii.gz))",
         f"{vs_isal('lazy')}, target >=0.7x: {'ok' if ok else 'MISS'}; counts == numpy: {np.array_equal(ref, h.values)}"),
        ("range", "   the same, range= given", f"{vs_isal('range')} (info); counts == numpy: {np.array_equal(ref, h_rg.values)}"),
    ):
        r = {"sched": sched, "dtype": "int16", "name": name, "wall": best[k], "walls": walls[k],
             "gbs": nbytes / GB / best[k], "peak": peaks[k], "check": check, "xread": None}
        b.rows.append(r)
        say(f"  {tag} {name:<34} {best[k]:7.2f} s {r['gbs']:6.2f} GB/s {'':6} {peaks[k] / 2**30:6.2f} GiB  {check}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="uncompressed GB (1e9) per store, at least (default 2.0)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-hist"))
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the stores")
    ap.add_argument("--quick", action="store_true", help="~0.3 GB per store smoke run")
    ap.add_argument("--repeat", type=int, default=1, help="time each measurement N times, report the best (default 1)")
    ap.add_argument("--skip-distributed", action="store_true")
    ap.add_argument("--skip-threads", action="store_true")
    ap.add_argument("--skip-checksums", action="store_true", help="leave out the checksum rows (k1-k4)")
    ap.add_argument("--checksums-only", action="store_true", help="only the checksum rows (k1-k4)")
    ap.add_argument("--checksum-repeat", type=int, default=None,
                    help="rounds of the checksum rows (default max(3, --repeat); 1 with --quick)")
    ap.add_argument("--skip-nifti-gz", action="store_true", help="leave out the .nii.gz rows (f)")
    ap.add_argument("--nifti-gz-only", action="store_true", help="only the .nii.gz rows (f)")
    ap.add_argument("--gz-files", type=int, default=6, help="phantoms of 256x256x192 int16 in the .nii.gz cohort (default 6)")
    ap.add_argument("--gz-repeat", type=int, default=None,
                    help="interleaved rounds of the .nii.gz rows (default max(3, --repeat))")
    ap.add_argument("--json", type=Path, help="save the rows as JSON")
    args = ap.parse_args()
    size = 0.3 if args.quick else args.size_gb
    if args.checksum_repeat is None:
        args.checksum_repeat = 1 if args.quick else max(3, args.repeat)
    if args.skip_checksums and args.checksums_only:
        ap.error("--skip-checksums and --checksums-only exclude each other")
    if args.nifti_gz_only and (args.skip_nifti_gz or args.checksums_only):
        ap.error("--nifti-gz-only excludes --skip-nifti-gz and --checksums-only")
    if args.gz_repeat is None:
        args.gz_repeat = max(3, args.repeat)
    nvols = {dt: max(1, math.ceil(size * GB / (math.prod(SHAPE3) * np.dtype(dt).itemsize))) for dt in CHUNKS}

    warnings.filterwarnings("ignore", category=RuntimeWarning)  # dask/numpy all-NaN-slice noise
    import dask
    import numba
    import psutil
    import xarray as xr
    import zarr

    import volnorm
    from volnorm.engine import local_cluster

    sampler = RSSSampler()
    b = Bench(sampler, args.repeat)
    notes: list[str] = []

    say(f"making stores: {nvols} volumes of {SHAPE3} in {args.workdir}")
    t0 = time.perf_counter()
    paths = {} if args.nifti_gz_only else make_stores(args.workdir, nvols, keep_existing=args.keep)
    crc_stores: dict[str, dict[str, Path]] = {}
    if not args.skip_checksums and not args.nifti_gz_only:
        crc_stores = make_checksum_stores(args.workdir, paths, keep_existing=args.keep)
    gz_files: list[Path] = []
    if not args.skip_nifti_gz and not args.checksums_only:
        gz_files = make_gz_cohort(args.workdir, args.gz_files, keep_existing=args.keep)
    t_make = time.perf_counter() - t0
    sizes = {dt: (nvols[dt] * math.prod(SHAPE3) * np.dtype(dt).itemsize, du(p)) for dt, p in paths.items()}

    env = [
        f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, python {platform.python_version()}",
        f"volnorm {volnorm.__version__}, dask {dask.__version__}, distributed "
        f"{__import__('distributed').__version__}, xarray {xr.__version__}, zarr {zarr.__version__}, "
        f"numba {numba.__version__}, numpy {np.__version__}",
        "codec: zarr v3 BloscCodec(cname=lz4, clevel=5, shuffle=shuffle)",
    ]
    for dt, (raw, disk) in sizes.items():
        env.append(f"store {dt}: shape ({nvols[dt]}, {', '.join(map(str, SHAPE3))}), chunks {CHUNKS[dt]} "
                   f"({math.prod(CHUNKS[dt]) * np.dtype(dt).itemsize / MiB:.0f} MiB), {raw / GB:.2f} GB raw, "
                   f"{disk / GB:.2f} GB on disk (ratio {raw / disk:.2f})")
    for dt, kinds in crc_stores.items():
        import zarr as _z

        from volnorm.io.store import read_manifest

        v0 = read_manifest(kinds["crc"])["volumes"][0]
        a0 = _z.open_array(str(kinds["crc"] / v0 / "0"), mode="r")
        sz = {k: du(q) for k, q in kinds.items()}
        env.append(f"checksum stores {dt} (vn.to_zarr, {len(read_manifest(kinds['crc'])['volumes'])} volume groups, chunks "
                   f"{a0.chunks}): {sz['crc'] / GB:.3f} GB on disk with CRC, {sz['nocrc'] / GB:.3f} GB without; "
                   f"codecs {' + '.join(c.to_dict()['name'] for c in a0.metadata.codecs)}")
    if gz_files:
        gz_disk = sum(p.stat().st_size for p in gz_files)
        env.append(f".nii.gz cohort: {len(gz_files)} phantoms (volnorm.datasets.make_cohort) of {GZ_SHAPE} (x,y,z) int16, "
                   f"{len(gz_files) * math.prod(GZ_SHAPE) * 2 / GB:.3f} GB of voxels, {gz_disk / GB:.3f} GB on disk; "
                   f"rows f: best of {args.gz_repeat} interleaved rounds, ISA-L in a pool of 2 processes started before timing")
    env.append(f"stores made/reused in {t_make:.0f} s; page cache not dropped (stores fit in RAM); "
               f"best of {args.repeat} run(s) per measurement"
               + (f"; checksum rows: best of {args.checksum_repeat} interleaved rounds" if crc_stores else ""))
    env.append(f"load average at the start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for line in env:
        say(line)

    t_all = time.perf_counter()
    gz_pool = cf.ProcessPoolExecutor(2) if gz_files else None
    try:
        if not args.skip_threads:
            say("\n[threaded scheduler]")
            with dask.config.set(scheduler="threads"):
                for dt, p in paths.items():
                    if not args.checksums_only:
                        run_store(b, "threads", dt, p, notes)
                    if crc_stores:
                        run_checksums(b, "threads", dt, crc_stores[dt], args.checksum_repeat)
                if gz_pool is not None:
                    run_nifti_gz(b, "threads", gz_files, gz_pool, args.gz_repeat)
        if not args.skip_distributed:
            say("\n[local cluster: 2 workers x 1 thread]")
            t0 = time.perf_counter()
            client = local_cluster(2)
            notes.append(f"local cluster start-up (not timed in rows): {time.perf_counter() - t0:.1f} s")
            try:
                with dask.config.set(scheduler=client):
                    for dt, p in paths.items():
                        if not args.checksums_only:
                            run_store(b, "dist", dt, p, notes)
                        if crc_stores:
                            run_checksums(b, "dist", dt, crc_stores[dt], args.checksum_repeat)
                    if gz_pool is not None:
                        run_nifti_gz(b, "dist", gz_files, gz_pool, args.gz_repeat)
            finally:
                client.close()
                client.cluster.close()
    finally:
        sampler.stop()
        if gz_pool is not None:
            gz_pool.shutdown()
        if not args.keep:
            for p in [*paths.values(), *(q for d in crc_stores.values() for q in d.values())]:
                shutil.rmtree(p, ignore_errors=True)
            (args.workdir / "stores.json").unlink(missing_ok=True)
            (args.workdir / "checksum-stores.json").unlink(missing_ok=True)
            shutil.rmtree(args.workdir / "niigz", ignore_errors=True)
            (args.workdir / "niigz.json").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                args.workdir.rmdir()

    # ---- the table
    say("\n" + "=" * 130)
    say("volnorm statistics benchmark")
    for line in env:
        say("  " + line)
    say("-" * 130)
    say(f"{'sched':<7} {'dtype':<7} {'measurement':<36} {'wall s':>7} {'GB/s':>6} {'x read':>7} {'peak RSS':>9}  check")
    for r in b.rows:
        xr_s = f"{r['xread']:6.2f}x" if r["xread"] else ""
        say(f"{r['sched']:<7} {r['dtype']:<7} {r['name']:<36} {r['wall']:7.2f} {r['gbs']:6.2f} {xr_s:>7} "
            f"{r['peak'] / 2**30:7.2f}Gi  {r['check']}")
    say("-" * 130)
    if b.crc_rows:
        say("checksums: the same voxels written by vn.to_zarr with a CRC-32C per chunk (crc32c codec after blosc-lz4) "
            "and without; x k1 = best wall / best wall of k1 (no CRC, zarr direct) for the same pass")
        say(f"{'sched':<7} {'dtype':<7} {'pass':<29} {'read':<35} {'wall s':>7} {'GB/s':>6} {'x k1':>6} {'median':>7} "
            f"{'peak RSS':>9}  check")
        for r in b.crc_rows:
            say(f"{r['sched']:<7} {r['dtype']:<7} {r['pass']:<29} {r['tag'] + ' ' + r['variant']:<35} {r['wall']:7.2f} "
                f"{r['gbs']:6.2f} {r['x_base']:5.3f}x {r['x_base_median']:6.3f}x {r['peak'] / 2**30:7.2f}Gi  {r['check']}")
        say("  median = median over rounds of the same-round ratio to k1")
        say("-" * 130)
    for n in notes:
        say("note: " + n)
    say(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    say(f"measurements took {time.perf_counter() - t_all:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": b.rows, "checksum_rows": b.crc_rows, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()

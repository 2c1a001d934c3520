#!/usr/bin/env python
"""Benchmark ``volnorm.convert`` against the I/O limits of this machine.

Measures, in one run and on the same files:

* the I/O limits, each as MB/s of uncompressed voxel data with 2 parallel
  processes (one per core): raw read of the .nii files, nibabel whole-file
  reads (.nii and .nii.gz), gzip decompression (zlib ``gzip`` and ISA-L
  ``isal.igzip``), and the compressed zarr v3 write of in-memory voxels with
  volnorm's codec and chunking; plus the combined "read + write" limit;
* a codec table (write MB/s and compression ratio of each ``codec=``);
* ``volnorm.convert`` of the .nii set and of the .nii.gz set on a local
  cluster of 2 single-threaded workers (started once, not timed; and once
  more including start-up), with wall time and peak memory (RSS of the whole
  process tree, sampled every 50 ms);
* a peak-memory scaling check with files 2x larger;
* the effect of dask's worker ``MALLOC_TRIM_THRESHOLD_=65536`` (which volnorm
  leaves unset) on convert throughput;
* what the per-chunk CRC-32C costs (zarr v3's ``crc32c`` codec after the
  compressor, volnorm's default): convert with checksums (the default) and the
  same convert without them, in the same round; ``volnorm.integrity.verify``
  of the converted store against a read pass of it; and, in one process, the
  CRC-32C and the copy zarr's ``Crc32cCodec`` encode makes against the lz4
  compression of the same chunk.

No public argument writes a store without checksums: ``convert(codec=...)``
goes through ``volnorm.io.store.compressors(codec)`` with ``checksum=True``,
which appends ``Crc32cCodec`` to any codec or tuple of codecs that lacks one
(``compressors("lz4", checksum=False)`` passed as ``codec=`` comes back with
the CRC). The "without" runs therefore swap ``volnorm.io.niftizarr.compressors``
for ``compressors(..., checksum=False)`` in this process and in the workers for
the duration of those runs (:func:`_set_chunk_checksums`), and check that the
store they wrote has no checksum.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_convert.py            # ~2.2 GB, < 15 min
    PYTHONPATH=. python benchmarks/bench_convert.py --quick    # ~0.3 GB smoke run
    PYTHONPATH=. python benchmarks/bench_convert.py --keep --workdir /data/bench

MB are 10^6 bytes, MiB/GiB are 2^20/2^30 bytes. The page cache is dropped
(``sync; echo 3 > /proc/sys/vm/drop_caches``) before every measurement when
that file is writable (root), so reads come from the disk; otherwise the
freshly written files are likely in the page cache and the read "limits" are
memory/CPU limits. The output says which.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gzip
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

MB = 1e6
MiB = 2**20
GiB = 2**30
BLOCK = 8 * MiB
N_PROCS = 2

#: (x, y, z) NIfTI shape of the main cohort: 384*384*384 int16 = 108 MiB per
#: file, more than one ~64 MiB chunk. z=384 and 768 get the same chunk shape
#: (192 whole planes, 54 MiB) under volnorm's balanced slab rule (and 227 planes
#: under a plain floor(64 MiB / plane) rule), so the scaling check changes only
#: the file size, not the chunk size.
BASE_SHAPE = (384, 384, 384)
#: Twice the bytes per file, for the peak-memory scaling check.
BIG_SHAPE = (384, 384, 768)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")

log = logging.getLogger("bench_convert")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def fmt_mem(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------------------
# page cache
# ---------------------------------------------------------------------------


def drop_caches_works() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


class Cache:
    """Drops the page cache before each measurement when enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def drop(self) -> None:
        os.sync()  # flush dirty pages (drop_caches only drops clean ones)
        if self.enabled:
            DROP_CACHES.write_text("3\n")
            time.sleep(0.2)


# ---------------------------------------------------------------------------
# cohort generation (volnorm.datasets.make_cohort, or a numpy fallback)
# ---------------------------------------------------------------------------


def _fallback_phantom(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random blobs in an ellipsoidal head, with noise (int16)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal(tuple(max(4, s // 16) for s in shape)).astype(np.float32)
    field = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)[
        : shape[0], : shape[1], : shape[2]
    ]
    axes = [np.linspace(-1, 1, s, dtype=np.float32) for s in shape]
    r2 = axes[0][:, None, None] ** 2 / 0.8**2 + axes[1][None, :, None] ** 2 / 0.9**2
    r2 = r2 + axes[2][None, None, :] ** 2 / 0.85**2
    img = np.where(r2 < 1.0, 700.0 + 250.0 * field, 0.0).astype(np.float32)
    img += rng.standard_normal(shape, dtype=np.float32) * 30.0
    np.abs(img, out=img)
    data = np.rint(img).astype(np.int16)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    return data, affine


def _make_one(path: str, shape: tuple[int, int, int], seed: int, use_volnorm: bool) -> tuple[str, str]:
    """Write one phantom .nii file at ``path`` (atomically); returns (path, generator)."""
    import nibabel as nib

    path_ = Path(path)
    tmp = path_.parent / f".tmp-{path_.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if use_volnorm:
            try:
                from volnorm.datasets import make_cohort

                (made,) = make_cohort(tmp, 1, shape=shape, compressed=False, dtype="int16", seed=seed)
                os.replace(made, path_)
                return path, "volnorm.datasets.make_cohort"
            except (ImportError, TypeError, AttributeError) as e:
                log.warning("volnorm.datasets.make_cohort unusable (%s); using the numpy fallback", e)
        data, affine = _fallback_phantom(shape, seed)
        img = nib.Nifti1Image(data, affine)
        img.header.set_data_dtype(np.int16)
        nib.save(img, tmp / "x.nii")
        os.replace(tmp / "x.nii", path_)
        return path, "numpy fallback phantom"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gzip_one(src: str, dst: str) -> str:
    """Re-save a .nii as .nii.gz with nibabel (its default gzip level)."""
    import nibabel as nib

    img = nib.load(src, mmap=False)
    tmp = Path(dst).parent / f".tmp-{Path(dst).name}"
    nib.save(img, tmp)
    os.replace(tmp, dst)
    return dst


def _set_ok(directory: Path, spec: dict) -> list[Path] | None:
    marker = directory / "cohort.json"
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if {k: saved.get(k) for k in spec} != spec:
        return None
    paths = [directory / name for name, _ in saved["files"]]
    if all(p.is_file() and p.stat().st_size == size for p, (_, size) in zip(paths, saved["files"])):
        return paths
    return None


def _write_marker(directory: Path, spec: dict, paths: list[Path], generator: str) -> None:
    files = [[p.name, p.stat().st_size] for p in paths]
    (directory / "cohort.json").write_text(json.dumps({**spec, "files": files, "generator": generator}, indent=1))


def make_sets(workdir: Path, shape: tuple[int, int, int], n: int, pool: cf.Executor, *, gz: bool) -> tuple[list[Path], list[Path], str]:
    """Generate (or reuse) ``n`` .nii phantoms of ``shape`` and, if ``gz``, their .nii.gz copies."""
    use_volnorm = True
    try:
        import volnorm.datasets  # noqa: F401
    except ImportError:
        use_volnorm = False
    tag = "x".join(map(str, shape))
    nii_dir = workdir / f"cohort-{tag}-nii"
    gz_dir = workdir / f"cohort-{tag}-niigz"
    spec = {"shape": list(shape), "n": n, "dtype": "int16", "format": "nii"}
    generator = "reused"
    nii = _set_ok(nii_dir, spec)
    if nii is None:
        shutil.rmtree(nii_dir, ignore_errors=True)
        nii_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        jobs = [pool.submit(_make_one, str(nii_dir / f"sub-{i + 1:03d}.nii"), shape, 1000 + i, use_volnorm) for i in range(n)]
        gens = {f.result()[1] for f in jobs}
        generator = ", ".join(sorted(gens))
        nii = sorted(nii_dir.glob("*.nii"))
        _write_marker(nii_dir, spec, nii, generator)
        say(f"  generated {n} x {tag} .nii with {generator} in {time.perf_counter() - t0:.0f} s")
    else:
        generator = json.loads((nii_dir / "cohort.json").read_text()).get("generator", "?")
        say(f"  reusing {n} x {tag} .nii in {nii_dir} ({generator})")
    gzs: list[Path] = []
    if gz:
        gspec = dict(spec, format="nii.gz")
        got = _set_ok(gz_dir, gspec)
        if got is None:
            shutil.rmtree(gz_dir, ignore_errors=True)
            gz_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            jobs = [pool.submit(_gzip_one, str(p), str(gz_dir / (p.name + ".gz"))) for p in nii]
            for f in jobs:
                f.result()
            gzs = sorted(gz_dir.glob("*.nii.gz"))
            _write_marker(gz_dir, gspec, gzs, "nibabel re-save of the .nii set")
            say(f"  gzipped them with nibabel (default level) in {time.perf_counter() - t0:.0f} s")
        else:
            gzs = got
            say(f"  reusing {n} x {tag} .nii.gz in {gz_dir}")
    return nii, gzs, generator


def voxel_bytes(path: Path) -> int:
    import nibabel as nib

    img = nib.load(path)
    return int(math.prod(img.shape) * img.get_data_dtype().itemsize)


# ---------------------------------------------------------------------------
# I/O limit tasks (run in a pool of 2 spawned processes)
# ---------------------------------------------------------------------------


def _pool_init() -> None:
    import isal.igzip  # noqa: F401
    import nibabel  # noqa: F401
    import zarr  # noqa: F401

    import volnorm.io.store  # noqa: F401


def _warm_worker() -> int:
    """Import what ingest_nifti needs (part of cluster start-up, kept out of the timed runs)."""
    import hashlib  # noqa: F401

    import isal.igzip  # noqa: F401
    import niizarr  # noqa: F401
    import zarr  # noqa: F401

    import volnorm.io.niftizarr  # noqa: F401

    return os.getpid()


def _set_chunk_checksums(on: bool) -> str:
    """Benchmark-only switch: make volnorm's NIfTI writer use ``compressors(codec, checksum=on)``.

    ``convert(codec=...)`` cannot turn the CRC-32C off (``compressors`` re-appends it), so the
    "without checksums" runs swap the name ``compressors`` that ``volnorm.io.niftizarr`` imported.
    Run in the client and in every worker (``client.run``); ``on=True`` restores the original.
    """
    import functools

    from volnorm.io import niftizarr, store

    niftizarr.compressors = store.compressors if on else functools.partial(store.compressors, checksum=False)
    return "crc32c" if on else "none"


def codec_name(codec: str) -> str:
    from volnorm.io.store import compressors

    c = compressors(codec)
    if not c:
        return "no compressor"
    out = []
    for x in c:
        d = x.to_dict()
        cfg = {k: getattr(v, "value", v) for k, v in d.get("configuration", {}).items() if k != "typesize"}
        out.append(f"{d['name']}({', '.join(f'{k}={v}' for k, v in cfg.items())})")
    return " + ".join(out)


def _noop(t: float) -> int:
    time.sleep(t)
    return os.getpid()


def task_raw_read(path: str) -> int:
    buf = bytearray(BLOCK)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def digest_name() -> str:
    """The digest volnorm's reader takes (its ``_HashingReader``), e.g. 'blake3' or 'sha256'."""
    import io

    try:
        from volnorm.io.niftizarr import _HashingReader

        h = _HashingReader(io.BytesIO(b"")).h
        return str(getattr(h, "name", type(h).__name__))
    except Exception:  # noqa: BLE001 - private API moved
        return "sha256"


def task_digest(path: str) -> int:
    """Read a file through volnorm's own hashing reader (8 MiB blocks): read + digest limit."""
    try:
        from volnorm.io.niftizarr import _HashingReader
    except ImportError:
        _HashingReader = None
    buf = bytearray(BLOCK)
    n = 0
    with open(path, "rb", buffering=0) as f:
        if _HashingReader is not None:
            r = _HashingReader(f)
            while k := r.readinto(buf):
                n += k
            r.h.hexdigest()
            return n
        import hashlib

        h = hashlib.sha256()
        mv = memoryview(buf)
        while k := f.readinto(buf):
            h.update(mv[:k])
            n += k
        h.hexdigest()
        return n


def task_nibabel(path: str) -> int:
    import nibabel as nib

    # mmap=False: with nibabel's default mmap=True, np.asarray of an unscaled
    # .nii is a lazy memmap and reads nothing.
    a = np.asarray(nib.load(path, mmap=False).dataobj)
    return int(a.nbytes)


def _gunzip(opener: Callable[[str], Any], path: str) -> int:
    buf = bytearray(BLOCK)
    n = 0
    with opener(path) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def task_gunzip_zlib(path: str) -> int:
    return _gunzip(lambda p: gzip.open(p, "rb"), path)


def task_gunzip_isal(path: str) -> int:
    from isal import igzip

    return _gunzip(lambda p: igzip.open(p, "rb"), path)


def zarr_array(path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: Any, codec: str) -> Any:
    """A zarr v3 array created like volnorm's volume array ``0``."""
    import zarr

    from volnorm.io.store import compressors

    return zarr.create_array(
        store=path,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=compressors(codec),
        fill_value=0,
        config={"write_empty_chunks": True},
        zarr_format=3,
        overwrite=True,
    )


def write_like_volnorm(arr: Any, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    """Whole-chunk slabs in file order, one ``arr[region] = slab`` each, as ingest_nifti does."""
    from volnorm.io.niftizarr import stream_slabs

    for region in stream_slabs(data.shape, chunks):
        arr[region] = data[region]


def load_c_order(path: str) -> np.ndarray:
    """Voxels of a .nii as volnorm stores them: C-order (z, y, x)."""
    import nibabel as nib

    return np.asarray(nib.load(path, mmap=False).dataobj).T  # F-order (x,y,z) -> C-order view


def task_write_limit(path: str, outdir: str, repeats: int, codec: str, barrier: Any) -> tuple[float, float, int]:
    """Write one file's in-memory voxels ``repeats`` times; returns (start, end, bytes)."""
    from volnorm._utils import slab_chunks

    data = load_c_order(path)
    chunks = slab_chunks(data.shape, data.itemsize)
    barrier.wait()
    t0, t1 = timed_writes(data, outdir, repeats, codec, chunks)
    return t0, t1, repeats * int(data.nbytes)


def timed_writes(data: np.ndarray, outdir: str, repeats: int, codec: str, chunks: tuple[int, ...]) -> tuple[float, float]:
    """Write ``data`` to ``repeats`` new zarr arrays in ``outdir`` as volnorm does; (start, end) times."""
    t0 = time.time()
    for r in range(repeats):
        arr = zarr_array(os.path.join(outdir, f"r{r}.zarr"), data.shape, chunks, data.dtype, codec)
        write_like_volnorm(arr, data, chunks)
    return t0, time.time()


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def task_codec_table(path: str, outdir: str, codecs: list[str], repeats: int) -> list[dict]:
    """Single process: write one volume with each codec; MB/s, ratio, read-back MB/s."""
    from volnorm._utils import slab_chunks

    data = load_c_order(path)
    chunks = slab_chunks(data.shape, data.itemsize)
    rows = []
    for codec in codecs:
        best = math.inf
        stored = 0
        for r in range(repeats):
            p = os.path.join(outdir, f"{codec}-{r}.zarr")
            shutil.rmtree(p, ignore_errors=True)
            t0 = time.perf_counter()
            arr = zarr_array(p, data.shape, chunks, data.dtype, codec)
            write_like_volnorm(arr, data, chunks)
            best = min(best, time.perf_counter() - t0)
            stored = dir_bytes(Path(p) / "c")
        t0 = time.perf_counter()
        back = arr[...]
        t_read = time.perf_counter() - t0
        assert np.array_equal(back, data)
        for r in range(repeats):
            shutil.rmtree(os.path.join(outdir, f"{codec}-{r}.zarr"), ignore_errors=True)
        rows.append(
            {
                "codec": codec,
                "write_mbps": data.nbytes / best / MB,
                "ratio": data.nbytes / stored if stored else float("nan"),
                "read_mbps": data.nbytes / t_read / MB,
                "stored": stored,
            }
        )
    return rows


def crc_costs(path: str, codec: str, repeats: int = 5) -> dict:
    """One process, one thread, one chunk of ``path`` as volnorm writes it: seconds of the codec's
    encode (compressors(codec, checksum=False)), of the CRC-32C of the encoded bytes
    (google_crc32c, what zarr's Crc32cCodec calls) and of ``np.append(encoded, crc)``, the copy
    Crc32cCodec's encode makes. Best of ``repeats``."""
    import asyncio

    import google_crc32c
    from zarr.core.array_spec import ArrayConfig, ArraySpec
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.buffer.cpu import NDBuffer

    from volnorm._utils import slab_chunks
    from volnorm.io.store import compressors

    data = load_c_order(path)
    chunks = slab_chunks(data.shape, data.itemsize)
    chunk = np.ascontiguousarray(data[tuple(slice(0, c) for c in chunks)])
    spec = ArraySpec(shape=chunk.shape, dtype=zarr_dtype(chunk.dtype), fill_value=0,
                     config=ArrayConfig.from_dict({}), prototype=default_buffer_prototype())
    from zarr.codecs import BytesCodec

    chain = compressors(codec, checksum=False)
    raw_buf = asyncio.run(BytesCodec().encode([(NDBuffer.from_numpy_array(chunk), spec)]))
    raw_buf = list(raw_buf)[0]

    def encode() -> Any:
        b = raw_buf
        for c in chain:
            c2 = c.evolve_from_array_spec(spec)
            b = c2._encode_sync(b, spec)
        return b

    def best(fn: Callable[[], Any]) -> tuple[float, Any]:
        t, out = math.inf, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            t = min(t, time.perf_counter() - t0)
        return t, out

    t_enc, enc = best(encode)
    enc_np = enc.as_numpy_array()
    t_crc, crc = best(lambda: google_crc32c.value(enc_np))
    tail = np.array([crc], dtype=np.uint32).view("B")
    t_app, _ = best(lambda: np.append(enc_np, tail))
    return {"chunk_bytes": int(chunk.nbytes), "encoded_bytes": int(enc_np.nbytes), "t_encode": t_enc,
            "t_crc": t_crc, "t_append": t_app, "crc_impl": str(google_crc32c.implementation)}


def zarr_dtype(dtype: np.dtype) -> Any:
    """zarr 3's dtype object for a numpy dtype (ArraySpec wants it)."""
    from zarr.core.dtype import parse_dtype

    return parse_dtype(dtype, zarr_format=3)


# ---------------------------------------------------------------------------
# memory sampling of the process tree
# ---------------------------------------------------------------------------


class TreeSampler(threading.Thread):
    """Samples RSS of this process and all its descendants every ``interval`` s."""

    def __init__(self, interval: float = 0.05, exclude: set[int] | None = None) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.interval = interval
        self.exclude = exclude or set()
        self.stop_event = threading.Event()
        self.peak = 0
        self.first: int | None = None
        self.per_pid: dict[int, int] = defaultdict(int)
        self.kind: dict[int, str] = {}
        self.samples = 0
        self.root = psutil.Process()

    def _kind(self, p: Any) -> str:
        if p.pid == self.root.pid:
            return "client"
        try:
            cmd = " ".join(p.cmdline())
        except self.psutil.Error:
            return "?"
        if "resource_tracker" in cmd:
            return "resource_tracker"
        if "spawn_main" in cmd or "forkserver" in cmd:
            return "worker"
        if "py-spy" in cmd:
            return "py-spy"
        return "other"

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        total = 0
        for p in procs:
            if p.pid in self.exclude:
                continue
            try:
                rss = p.memory_info().rss
            except ps.Error:
                continue
            if p.pid not in self.kind:
                self.kind[p.pid] = self._kind(p)
            if self.kind[p.pid] == "py-spy":
                continue
            total += rss
            if rss > self.per_pid[p.pid]:
                self.per_pid[p.pid] = rss
        if self.first is None:
            self.first = total
        self.peak = max(self.peak, total)
        self.samples += 1

    def run(self) -> None:
        while True:
            self.sample()
            if self.stop_event.wait(self.interval):
                break

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()

    def worker_peaks(self, pids: set[int] | None = None) -> list[int]:
        if pids is None:
            pids = {p for p, k in self.kind.items() if k == "worker"}
        return sorted((self.per_pid[p] for p in pids if p in self.per_pid), reverse=True)


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, cache: Cache, workdir: Path) -> None:
        self.args = args
        self.cache = cache
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        self.runs: dict[str, list] = defaultdict(list)

    # -- helpers ------------------------------------------------------------

    def limit_once(self, pool: cf.Executor, fn: Callable, paths: list[Path], nbytes: int) -> float:
        """Aggregate MB/s (``nbytes`` of voxels / wall) of ``fn`` mapped over ``paths`` on the pool."""
        self.cache.drop()
        t0 = time.perf_counter()
        list(pool.map(fn, [str(p) for p in paths]))
        return nbytes / (time.perf_counter() - t0) / MB

    def write_limit_once(self, pool: cf.Executor, manager: Any, paths: list[Path], codec: str, repeats: int) -> float:
        """Each process writes one file's in-memory voxels ``repeats`` times; aggregate MB/s."""
        self.cache.drop()
        barrier = manager.Barrier(N_PROCS)
        outs = [self.workdir / "wlimit" / f"p{k}" for k in range(N_PROCS)]
        for o in outs:
            shutil.rmtree(o, ignore_errors=True)
            o.mkdir(parents=True)
        futs = [pool.submit(task_write_limit, str(paths[k % len(paths)]), str(outs[k]), repeats, codec, barrier) for k in range(N_PROCS)]
        res = [f.result() for f in futs]
        shutil.rmtree(self.workdir / "wlimit", ignore_errors=True)
        return sum(r[2] for r in res) / (max(r[1] for r in res) - min(r[0] for r in res)) / MB

    def convert_once(self, files: list[Path], label: str, scheduler: Any, worker_pids: set[int] | None, exclude: set[int] | None = None,
                     *, keep: bool = False, checksums: str | None = None) -> dict:
        """One timed convert. ``keep``: leave the output store (``r["out"]``) for the caller to
        measure and remove. ``checksums``: what ``quick_check`` must say of the output
        ("all" or "none"), else the run is refused (the no-checksum switch did not take)."""
        import volnorm
        import zarr
        from volnorm.integrity import quick_check

        out = self.workdir / "out" / f"{label.replace(' ', '_').replace('/', '_')}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.volnorm-partial", ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.cache.drop()
        sampler = TreeSampler(0.05, exclude=exclude)
        sampler.start()
        time.sleep(0.1)
        t0 = time.perf_counter()
        res = volnorm.convert([str(p) for p in files], out, codec=self.args.codec, scheduler=scheduler, progress=False)
        wall = time.perf_counter() - t0
        sampler.stop()
        stored = dir_bytes(out)
        # sanity: every volume present and every chunk written
        root = zarr.open_group(out, mode="r")
        missing = [v["name"] for v in res.volumes if v["name"] not in root or root[v["name"]]["0"].nchunks_initialized != root[v["name"]]["0"].nchunks]
        if len(res.volumes) != len(files) or missing:
            raise RuntimeError(f"{label}: incomplete output ({len(res.volumes)} volumes; missing/incomplete: {missing})")
        crc = quick_check(out)["checksums"]
        if checksums is not None and crc != checksums:
            raise RuntimeError(f"{label}: the output's chunk checksums are {crc!r}, expected {checksums!r}")
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        wp = sampler.worker_peaks(worker_pids)
        r = {
            "mbps": res.bytes_in / wall / MB,
            "wall": wall,
            "result_seconds": res.seconds,
            "bytes_in": res.bytes_in,
            "stored_ratio": res.bytes_in / stored,
            "peak": sampler.peak,
            "baseline": sampler.first or 0,
            "client_peak": sampler.per_pid.get(os.getpid(), 0),
            "worker_peaks": wp,
            "worker_peak": max(wp, default=0),
            "samples": sampler.samples,
            "engine": res.engine,
            "checksums": crc,
            "out": str(out) if keep else None,
        }
        say(
            f"  {label:<46} {r['mbps']:7.0f} MB/s  peak tree {fmt_mem(r['peak'])} (idle {fmt_mem(r['baseline'])}), "
            f"workers {', '.join(fmt_mem(w) for w in wp)}; stored ratio {r['stored_ratio']:.2f}"
        )
        return r

    def read_store_once(self, out: str, nbytes: int) -> float:
        """MB/s (voxels) of a read pass of a converted store through ``vn.open_zarr`` (checked
        reads: every chunk's presence and CRC-32C, then zarr's decode) on 2 threads."""
        import dask

        import volnorm

        x = volnorm.open_zarr(out)
        a = x.data

        def first(b: np.ndarray) -> np.ndarray:
            return np.full((1,) * b.ndim, float(b.flat[0]) if b.size else 0.0)

        lazy = a.map_blocks(first, chunks=tuple((1,) * len(c) for c in a.chunks), dtype=np.float64).sum()
        self.cache.drop()
        t0 = time.perf_counter()
        with dask.config.set(scheduler="threads", num_workers=N_PROCS):
            lazy.compute()
        return nbytes / (time.perf_counter() - t0) / MB

    def verify_once(self, out: str, nbytes: int, sources: bool) -> float:
        """MB/s (voxels) of ``volnorm.integrity.verify(out, sources=...)``; it must say ok with
        every chunk's checksum matching."""
        from volnorm.integrity import verify

        self.cache.drop()
        t0 = time.perf_counter()
        rep = verify(out, progress=False, sources=sources)
        wall = time.perf_counter() - t0
        if not rep.ok or rep.checksums != rep.chunks:
            raise RuntimeError(f"verify({out}) did not pass: {rep}")
        if sources and not all(v == "matches" for v in rep.sources.values()):
            raise RuntimeError(f"verify({out}): sources {rep.sources}")
        return nbytes / wall / MB

    def record(self, key: str, value: Any) -> Any:
        self.runs[key].append(value)
        return value

    def med(self, key: str) -> float:
        vals = [v["mbps"] if isinstance(v, dict) else v for v in self.runs[key]]
        return statistics.median(vals)

    def agg(self, key: str) -> dict:
        """Median MB/s and max peaks over the rounds of one convert measurement."""
        runs = self.runs[key]
        return {
            "mbps": statistics.median(x["mbps"] for x in runs),
            "runs": [x["mbps"] for x in runs],
            "peak": max(x["peak"] for x in runs),
            "baseline": min(x["baseline"] for x in runs),
            "client_peak": max(x["client_peak"] for x in runs),
            "worker_peak": max(x["worker_peak"] for x in runs),
            "stored_ratio": runs[-1]["stored_ratio"],
        }

    def round_ratio(self, keys: list[str], fn: Callable[[int], float]) -> float:
        """Median over rounds of fn(i), a ratio of measurements of the same round (robust to machine drift)."""
        n = min(len(self.runs[k]) for k in keys)
        return statistics.median(fn(i) for i in range(n))

    # -- profiling ----------------------------------------------------------

    def profile(self, files: list[Path], label: str, client: Any, exclude: set[int] | None = None) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(exe).exists():
            say("  py-spy not found; skipping --profile")
            return
        pids = list(client.run(os.getpid).values())
        outs = []
        procs = []
        for pid in pids:
            o = self.workdir / f"pyspy-{label}-{pid}.txt"
            outs.append(o)
            procs.append(
                subprocess.Popen(
                    [exe, "record", "--pid", str(pid), "--rate", "100", "--native", "--format", "raw", "--output", str(o)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        time.sleep(1.0)
        self.convert_once(files, f"profile-{label} (py-spy attached)", client, set(pids), exclude)
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                _, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                err = b""
            if p.returncode not in (0, -2, 130) and err:
                say(f"  py-spy: {err.decode(errors='replace').strip()[-300:]}")
        stacks: list[tuple[list[str], int]] = []
        for o in outs:
            if not o.exists():
                continue
            for line in o.read_text().splitlines():
                stack, _, n = line.rpartition(" ")
                if n.isdigit():
                    stacks.append(([_short(f) for f in stack.split(";")], int(n)))
            if not self.args.keep:
                o.unlink()

        def has(frames: list[str], subs: tuple[str, ...]) -> bool:
            return any(sub in f for f in frames for sub in subs)

        # --native samples idle (blocked) threads too, which gives a wall-clock breakdown per
        # thread: volnorm's task thread (ingest_nifti), its prefetching reader thread (if any),
        # and zarr/numcodecs codec threads (where blosc runs when zarr offloads it).
        groups = {
            "task thread (ingest_nifti)": lambda f: has(f, ("ingest_nifti",)),
            "reader thread (_produce_slabs)": lambda f: has(f, ("_produce_slabs",)) and not has(f, ("ingest_nifti",)),
            "zarr codec threads (busy samples)": lambda f: not has(f, ("ingest_nifti", "_produce_slabs")) and has(f, ("numcodecs", "blosc", "lz4", "zstd")),
        }
        parts = {
            "file read (libc read)": ("read (libc", "readinto' of '_io.FileIO"),
            "isal inflate": ("isal_zlib",),
            "digest (blake3 / sha256)": ("blake3", "libcrypto", "_hashlib"),
            "_summarize (min/max)": ("_summarize",),
            "waiting on the other thread (queue get/put)": ("Queue.get (queue", "Queue.put (queue"),
            "arr[region] = slab (encode + store; waits)": ("__setitem__",),
            "blosc / lz4 / zstd compress": ("blosc", "lz4", "zstd", "numcodecs"),
            "create/finish group, attrs, metadata": ("create_volume_group", "finish_volume", "update_attributes", "open_group"),
        }
        other = "other (np.empty, copies, python)"
        if not any(groups["task thread (ingest_nifti)"](f) for f, _ in stacks):
            say(f"  py-spy {label}: no samples in ingest_nifti")
            return
        say(f"  py-spy {label} (100 Hz, both workers; wall-time share per thread; a sample goes to its innermost matching frame):")
        out: dict[str, dict] = {}
        for gname, pred in groups.items():
            sel = [(f, n) for f, n in stacks if pred(f)]
            total = sum(n for _, n in sel)
            if not total:
                continue
            share: Counter = Counter()
            for f, n in sel:
                what = other
                for frame in reversed(f):
                    hit = next((w for w, subs in parts.items() if any(sub in frame for sub in subs)), None)
                    if hit:
                        what = hit
                        break
                share[what] += n
            say(f"    {gname}: {total} samples")
            for what, k in share.most_common():
                if k / total >= 0.01:
                    say(f"      {100 * k / total:5.1f}%  {what}")
            out[gname] = {"samples": total, **{k: v / total for k, v in share.items()}}
        self.results[f"profile_{label}"] = out

    # -- main ---------------------------------------------------------------

    def run(self) -> None:
        import dask
        import distributed

        import volnorm
        from volnorm._utils import slab_chunks
        from volnorm.engine import WORKER_ENV, local_cluster

        args = self.args
        ctx = mp.get_context("spawn")
        file_bytes = math.prod(BASE_SHAPE) * 2
        n = max(N_PROCS, math.ceil(args.size_gb * 1e9 / 2 / file_bytes))
        n = N_PROCS * math.ceil(n / N_PROCS)  # a multiple of the process count balances the load
        chunks = slab_chunks(tuple(reversed(BASE_SHAPE)), 2)
        big_chunks = slab_chunks(tuple(reversed(BIG_SHAPE)), 2)
        self.results["setup"] = {"n_files": n, "shape": BASE_SHAPE, "chunks": chunks, "big_chunks": big_chunks}
        t_start = time.perf_counter()
        clients: list[Any] = []
        with cf.ProcessPoolExecutor(N_PROCS, mp_context=ctx, initializer=_pool_init) as pool, ctx.Manager() as manager:
            say("== cohorts")
            nii, gzs, generator = make_sets(self.workdir, BASE_SHAPE, n, pool, gz=True)
            big: list[Path] = []
            if not args.skip_scaling:
                big, _, _ = make_sets(self.workdir, BIG_SHAPE, n, pool, gz=False)
            nbytes = sum(voxel_bytes(p) for p in nii)
            big_bytes = sum(voxel_bytes(p) for p in big)
            gz_size = sum(p.stat().st_size for p in gzs)
            self.results["setup"].update(generator=generator, nii_voxel_bytes=nbytes, gz_file_bytes=gz_size, big_voxel_bytes=big_bytes)
            say(
                f"  .nii set: {n} files x {fmt_mem(file_bytes)} = {nbytes / 1e9:.2f} GB of voxels; "
                f".nii.gz set: same voxels, {gz_size / 1e9:.2f} GB on disk (gzip ratio {nbytes / gz_size:.2f}); "
                f"chunks (z,y,x) {chunks}"
            )
            t_gen = time.perf_counter()
            list(pool.map(_noop, [0.5] * N_PROCS))  # both processes up and imported
            pool_pids = set(pool._processes)  # type: ignore[attr-defined]
            helpers = pool_pids | {manager._process.pid}  # type: ignore[attr-defined]

            say("== codec table (one volume in memory, 1 process, volnorm's chunking, best of 2)")
            cdir = self.workdir / "codecs"
            cdir.mkdir(exist_ok=True)
            self.results["codecs"] = pool.submit(task_codec_table, str(nii[0]), str(cdir), ["lz4", "zstd", "zarr-default", "none"], 2).result()
            shutil.rmtree(cdir, ignore_errors=True)
            if not args.skip_checksums:
                self.results["crc_costs"] = pool.submit(crc_costs, str(nii[0]), args.codec).result()
            for row in self.results["codecs"]:
                say(f"  {row['codec']:<13} write {row['write_mbps']:6.0f} MB/s  ratio {row['ratio']:5.2f}  read-back {row['read_mbps']:6.0f} MB/s")

            say("== convert including cluster start-up (scheduler=None: volnorm starts and closes its local cluster)")
            self.results["nii_startup"] = self.convert_once(nii, "convert .nii incl. cluster start-up", None, None, exclude=helpers)

            try:
                client = local_cluster(N_PROCS)
                clients.append(client)
                pids = set(client.run(_warm_worker).values())
                env = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
                self.results["worker_env_volnorm"] = sorted(set(map(str, env.values())))
                tclient, tpids = None, set()
                if not args.skip_malloc:
                    from distributed import Client, LocalCluster

                    env_trim = dict(WORKER_ENV, MALLOC_TRIM_THRESHOLD_="65536")
                    with dask.config.set({"distributed.nanny.pre-spawn-environ": env_trim}):
                        cluster = LocalCluster(
                            n_workers=N_PROCS, threads_per_worker=1, processes=True, host="127.0.0.1",
                            dashboard_address=None, silence_logs=logging.WARNING,
                        )
                    tclient = Client(cluster, set_as_default=False)
                    clients.append(tclient)
                    tpids = set(tclient.run(_warm_worker).values())
                    env = tclient.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
                    self.results["worker_env_trim"] = sorted(set(map(str, env.values())))
                limits = [
                    ("raw_read", task_raw_read, nii, "a raw read .nii (8 MiB blocks)"),
                    ("nib_nii", task_nibabel, nii, "b nibabel whole file .nii (mmap=False)"),
                    ("nib_gz", task_nibabel, gzs, "b nibabel whole file .nii.gz"),
                    ("zlib", task_gunzip_zlib, gzs, "c gzip (zlib) decompress .nii.gz"),
                    ("isal", task_gunzip_isal, gzs, "c isal.igzip decompress .nii.gz"),
                    ("digest", task_digest, nii, f"  (info) read + {digest_name()} digest .nii"),
                ]
                wrep = max(1, math.ceil(len(nii) / N_PROCS))
                for rnd in range(args.repeat):
                    say(f"== round {rnd + 1}/{args.repeat}: I/O limits ({N_PROCS} processes over files, MB/s of voxels), then convert")
                    for key, fn, paths, label in limits:
                        v = self.record(key, self.limit_once(pool, fn, paths, nbytes))
                        say(f"  {label:<46} {v:7.0f} MB/s")
                    v = self.record("write", self.write_limit_once(pool, manager, nii, args.codec, wrep))
                    say(f"  {f'd compressed write ({args.codec}), {N_PROCS} procs x {wrep}':<46} {v:7.0f} MB/s")
                    ex = helpers | tpids

                    def crc_pair(key: str, files: list[Path], label: str, keep: bool = False) -> None:
                        """The convert with checksums (volnorm's default) and without, in alternating
                        order from round to round (drift does not favour either)."""
                        runs = [(key, label, True), (f"{key}_nocrc", f"{label}, no chunk checksums", False)]
                        if args.skip_checksums:
                            runs = runs[:1]
                        for k, lab, on in runs if rnd % 2 == 0 else runs[::-1]:
                            if not on:
                                client.run(_set_chunk_checksums, False)
                                _set_chunk_checksums(False)
                            try:
                                self.record(k, self.convert_once(files, lab, client, pids, ex, keep=keep and on,
                                                                 checksums="all" if on else "none"))
                            finally:
                                if not on:
                                    client.run(_set_chunk_checksums, True)
                                    _set_chunk_checksums(True)

                    crc_pair("c_nii", nii, "convert .nii", keep=not args.skip_checksums)
                    if not args.skip_checksums:
                        out = self.runs["c_nii"][-1]["out"]
                        v = self.record("read_store", self.read_store_once(out, nbytes))
                        say(f"  {'read pass of that store (vn.open_zarr, 2 thr)':<46} {v:7.0f} MB/s")
                        v = self.record("verify", self.verify_once(out, nbytes, sources=False))
                        say(f"  {'verify(store, sources=False)':<46} {v:7.0f} MB/s")
                        v = self.record("verify_src", self.verify_once(out, nbytes, sources=True))
                        say(f"  {'verify(store) (+ BLAKE3 of the sources)':<46} {v:7.0f} MB/s")
                        shutil.rmtree(out, ignore_errors=True)
                    if big:
                        self.record("c_big", self.convert_once(big, "convert .nii, 2x larger files", client, pids, ex))
                    crc_pair("c_gz", gzs, "convert .nii.gz")
                    if tclient is not None:
                        ex = helpers | pids
                        self.record("t_nii", self.convert_once(nii, "convert .nii, MALLOC_TRIM_THRESHOLD_=65536", tclient, tpids, ex))
                        self.record("t_gz", self.convert_once(gzs, "convert .nii.gz, MALLOC_TRIM_THRESHOLD_=65536", tclient, tpids, ex))
                if args.profile:
                    say("== py-spy profiles of the workers (extra untimed runs)")
                    self.profile(nii, "nii", client, helpers | tpids)
                    self.profile(gzs, "niigz", client, helpers | tpids)
            finally:
                for c in clients:
                    cluster = c.cluster
                    c.close()
                    cluster.close()
        self.results["runs"] = dict(self.runs)
        self.results["seconds_measuring"] = time.perf_counter() - t_gen
        self.results["seconds_total"] = time.perf_counter() - t_start
        self.report(volnorm, dask, distributed)

    # -- report -------------------------------------------------------------

    def report(self, volnorm: Any, dask: Any, distributed: Any) -> None:
        import isal
        import nibabel
        import numcodecs
        import psutil
        import zarr

        from volnorm.io.store import DEFAULT_CODEC

        R, S, runs = self.results, self.results["setup"], self.runs
        med = self.med

        def comb(*rates: float) -> float:
            return 1 / sum(1 / r for r in rates)

        def rr(keys: list[str], fn: Callable[[int], float]) -> float:
            return self.round_ratio(keys, fn)

        def m(key: str, i: int) -> float:
            v = runs[key][i]
            return v["mbps"] if isinstance(v, dict) else v

        read, write = med("raw_read"), med("write")
        combined = comb(read, write)
        R["limits"] = {k: med(k) for k in ("raw_read", "nib_nii", "nib_gz", "zlib", "isal", "digest", "write")}
        R["limits"]["combined"] = combined

        cpu = platform.processor() or "?"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        W = 120
        say()
        say("=" * W)
        say("volnorm convert benchmark")
        say(
            f"machine   : {os.cpu_count()} cores ({cpu}), RAM {psutil.virtual_memory().total / GiB:.1f} GiB, "
            f"Linux {platform.release()}, Python {platform.python_version()}"
        )
        say(
            f"versions  : volnorm {volnorm.__version__}, zarr {zarr.__version__}, dask {dask.__version__}, "
            f"distributed {distributed.__version__}, numcodecs {numcodecs.__version__}, nibabel {nibabel.__version__}, "
            f"numpy {np.__version__}, isal {isal.__version__}"
        )
        say(f"codec     : {self.args.codec} = {codec_name(self.args.codec)} (volnorm default: {DEFAULT_CODEC})")
        say(
            f"data      : {S['n_files']} int16 files of {S['shape']} (x,y,z) = {fmt_mem(math.prod(S['shape']) * 2)} each, "
            f"{S['nii_voxel_bytes'] / 1e9:.2f} GB of voxels per set; chunks (z,y,x) {tuple(S['chunks'])}; "
            f".nii.gz {S['gz_file_bytes'] / 1e9:.2f} GB on disk; phantoms: {S['generator']}"
        )
        if self.cache.enabled:
            say("page cache: DROPPED before every measurement (sync; echo 3 > /proc/sys/vm/drop_caches): reads come from disk")
        else:
            say(
                "page cache: NOT dropped. The files were just written, so they are most likely in the page cache:\n"
                "            read limits measure memory/CPU speed, not the disk (run as root or pass --drop-caches)."
            )
        say(
            f"method    : {N_PROCS} processes (limits: ProcessPoolExecutor over files; convert: local cluster of {N_PROCS} "
            f"single-threaded workers, started before timing). MB = 1e6 bytes of uncompressed voxels.\n"
            f"            {self.args.repeat} rounds, each measuring every limit and every convert once; MB/s = median over rounds;\n"
            f"            ratio = median over rounds of the same-round ratio. Peak = max over rounds of the RSS sum of\n"
            f"            this process (client, scheduler, nannies) + its worker processes, sampled every 50 ms.\n"
            f"            worker MALLOC_TRIM_THRESHOLD_: volnorm cluster {R.get('worker_env_volnorm')}, "
            f"dask-default cluster {R.get('worker_env_trim', '-')}"
        )
        say("-" * W)
        say(f"{'operation':<50} {'MB/s':>7}  {'vs':<30} {'ratio':>6} {'target':>9}  {'peak tree':>10} {'peak/worker':>11}")
        say("-" * W)

        def row(op: str, mbps: float | None, vs: str = "", ratio: float | None = None, target: str = "", peak: Any = None, wpeak: Any = None) -> None:
            ok = ""
            if ratio is not None and target:
                bound = float(target.lstrip("<>="))
                ok = " ok" if (ratio <= bound if target.startswith("<=") else ratio >= bound) else " MISS"
            say(
                f"{op:<50} {'' if mbps is None else f'{mbps:7.0f}':>7}  {vs:<30} {'' if ratio is None else f'{ratio:6.2f}':>6} "
                f"{target + ok:>9}  {fmt_mem(peak) if peak else '':>10} {fmt_mem(wpeak) if wpeak else '':>11}"
            )

        row("a raw read .nii (8 MiB blocks)", read)
        row("b nibabel whole-file read .nii (mmap=False)", med("nib_nii"), "raw read", rr(["nib_nii", "raw_read"], lambda i: m("nib_nii", i) / m("raw_read", i)))
        row("b nibabel whole-file read .nii.gz", med("nib_gz"), "isal decompress", rr(["nib_gz", "isal"], lambda i: m("nib_gz", i) / m("isal", i)))
        row("c gzip (zlib) decompress .nii.gz", med("zlib"))
        row("c isal.igzip decompress .nii.gz", med("isal"), "zlib decompress", rr(["isal", "zlib"], lambda i: m("isal", i) / m("zlib", i)))
        row(f"d compressed write ({self.args.codec}) from memory", write)
        row("d LIMIT .nii: raw read + compressed write", combined)
        dn = digest_name()
        row(f"  (info) read + {dn} (volnorm's reader) .nii", med("digest"))
        row(f"  (info) (read + {dn}) + compressed write", comb(med("digest"), write))
        row("  (info) isal decompress + compressed write", comb(med("isal"), write), "isal decompress",
            rr(["isal", "write"], lambda i: comb(m("isal", i), m("write", i)) / m("isal", i)))
        say("-" * W)
        c = self.agg("c_nii")
        row("convert .nii (cluster running)", c["mbps"], "raw read + compressed write",
            rr(["c_nii", "raw_read", "write"], lambda i: m("c_nii", i) / comb(m("raw_read", i), m("write", i))), ">=0.70", c["peak"], c["worker_peak"])
        row("", None, f"(read + {dn}) + write", rr(["c_nii", "digest", "write"], lambda i: m("c_nii", i) / comb(m("digest", i), m("write", i))))
        c0 = R["nii_startup"]
        row("convert .nii incl. cluster start-up (1 run)", c0["mbps"], "raw read + compressed write", c0["mbps"] / combined, "", c0["peak"], c0["worker_peak"])
        g = self.agg("c_gz")
        row("convert .nii.gz (cluster running)", g["mbps"], "isal decompress", rr(["c_gz", "isal"], lambda i: m("c_gz", i) / m("isal", i)), ">=0.77", g["peak"], g["worker_peak"])
        row("", None, "zlib decompress", rr(["c_gz", "zlib"], lambda i: m("c_gz", i) / m("zlib", i)))
        row("", None, "isal decompress + write", rr(["c_gz", "isal", "write"], lambda i: m("c_gz", i) / comb(m("isal", i), m("write", i))))
        if runs.get("t_nii"):
            t = self.agg("t_nii")
            row("convert .nii, MALLOC_TRIM_THRESHOLD_=65536", t["mbps"], "convert .nii (unset: volnorm)", rr(["t_nii", "c_nii"], lambda i: m("t_nii", i) / m("c_nii", i)), "", t["peak"], t["worker_peak"])
            t = self.agg("t_gz")
            row("convert .nii.gz, MALLOC_TRIM_THRESHOLD_=65536", t["mbps"], "convert .nii.gz (unset)", rr(["t_gz", "c_gz"], lambda i: m("t_gz", i) / m("c_gz", i)), "", t["peak"], t["worker_peak"])
        if runs.get("c_big"):
            b = self.agg("c_big")
            row(f"convert .nii, files 2x larger {BIG_SHAPE}", b["mbps"], "raw read + compressed write",
                rr(["c_big", "raw_read", "write"], lambda i: m("c_big", i) / comb(m("raw_read", i), m("write", i))), "", b["peak"], b["worker_peak"])
        say("-" * W)
        if runs.get("c_nii_nocrc"):
            say("checksums: a CRC-32C per chunk (zarr v3 crc32c codec after the compressor; volnorm's default).")
            say("  cost = time with / time without, same round (median over rounds); the 'without' store has no crc32c codec")
            for key, what in (("c_nii", ".nii"), ("c_gz", ".nii.gz")):
                c, n = self.agg(key), self.agg(f"{key}_nocrc")
                row(f"convert {what}, with checksums (default)", c["mbps"], "", None, "", c["peak"], c["worker_peak"])
                row(f"convert {what}, no checksums", n["mbps"], "", None, "", n["peak"], n["worker_peak"])
                cost = rr([key, f"{key}_nocrc"], lambda i, k=key: m(f"{k}_nocrc", i) / m(k, i))
                row(f"  checksum cost {what} (time with / without)", None, "convert without checksums", cost, "<=1.05")
                R[f"checksum_cost_{key}"] = cost
            rd = med("read_store")
            row("read pass of the converted .nii store", rd, "(vn.open_zarr: checked, 2 threads)")
            row("verify(store, sources=False): chunks + CRC", med("verify"), "read pass (speed ratio)",
                rr(["verify", "read_store"], lambda i: m("verify", i) / m("read_store", i)))
            row(f"verify(store) (+ BLAKE3 of the {S['n_files']} sources)", med("verify_src"), "read pass (speed ratio)",
                rr(["verify_src", "read_store"], lambda i: m("verify_src", i) / m("read_store", i)))
            cc = R.get("crc_costs")
            if cc:
                extra = cc["t_crc"] + cc["t_append"]
                say(
                    f"  one chunk, 1 thread ({fmt_mem(cc['chunk_bytes'])} of int16 -> {cc['encoded_bytes'] / MB:.0f} MB encoded): "
                    f"encode {1e3 * cc['t_encode']:.1f} ms, CRC-32C {1e3 * cc['t_crc']:.1f} ms "
                    f"({cc['encoded_bytes'] / cc['t_crc'] / 1e9:.1f} GB/s, google_crc32c '{cc['crc_impl']}'), "
                    f"np.append copy {1e3 * cc['t_append']:.1f} ms"
                )
                say(f"  -> zarr's Crc32cCodec encode adds {100 * extra / cc['t_encode']:.1f}% to the chunk's encode "
                    f"({100 * cc['t_crc'] / cc['t_encode']:.1f}% CRC, {100 * cc['t_append'] / cc['t_encode']:.1f}% copy), best of 5")
            say("-" * W)
        if runs.get("c_big"):
            b = self.agg("c_big")
            say(
                f"peak memory scaling (same {S['n_files']} files, 2x bytes each): whole tree {fmt_mem(c['peak'])} -> "
                f"{fmt_mem(b['peak'])} (x{b['peak'] / c['peak']:.2f}); per worker {fmt_mem(c['worker_peak'])} -> "
                f"{fmt_mem(b['worker_peak'])} (x{b['worker_peak'] / c['worker_peak']:.2f}); client process "
                f"{fmt_mem(c['client_peak'])} -> {fmt_mem(b['client_peak'])}"
            )
            if tuple(S["big_chunks"]) != tuple(S["chunks"]):
                say(f"  WARNING: the chunk shapes differ ({tuple(S['chunks'])} vs {tuple(S['big_chunks'])}): memory follows the chunk size")
            else:
                say(f"  (both cohorts get chunks {tuple(S['chunks'])}: only the file size differs)")
        say(f"idle tree before convert (client + scheduler + 2 workers): {fmt_mem(c['baseline'])}; "
            f"compression ratio of the converted .nii store {c['stored_ratio']:.2f}")
        say("codec table (one volume, 1 process; the default codec should be the fastest writer at a useful ratio):")
        say(f"  {'codec':<13} {'write MB/s':>10} {'ratio':>6} {'read-back MB/s':>15}  zarr codec")
        for r in R["codecs"]:
            mark = "  <- default" if r["codec"] == DEFAULT_CODEC else ""
            say(f"  {r['codec']:<13} {r['write_mbps']:10.0f} {r['ratio']:6.2f} {r['read_mbps']:15.0f}  {codec_name(r['codec'])}{mark}")
        say("  ratio = voxel bytes / stored chunk bytes.")
        if BASE_SHAPE[2] % S["chunks"][0]:
            say("  zarr stores the partial last z-chunk padded to a full chunk, so 'none' stores more than the voxels")
            say("  (ratio < 1) and the compressors get the zero padding almost free.")
        say(f"time: {R['seconds_total']:.0f} s in all, {R['seconds_measuring']:.0f} s measuring (the rest: generating or checking the cohorts)")
        say("=" * W)


def _short(frame: str) -> str:
    # py-spy raw frames look like "func (file.py:123)"; drop the line number
    f = frame.strip()
    if f.startswith("0x") and " (" in f:  # unsymbolized native frame: keep the library
        return "[native] " + f[f.index(" (") + 1 :]
    if f.endswith(")") and ":" in f:
        f = f[: f.rfind(":")] + ")"
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.2, help="voxel data of the .nii + .nii.gz sets together, GB (default 2.2)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench"), help="where cohorts and outputs go (default /tmp/volnorm-bench)")
    ap.add_argument("--keep", action="store_true", help="keep the generated cohorts (reused by the next run) and profiles")
    ap.add_argument("--quick", action="store_true", help="~0.3 GB smoke run, 1 repeat")
    ap.add_argument(
        "--drop-caches", action=argparse.BooleanOptionalAction, default=None,
        help="sync and write 3 to /proc/sys/vm/drop_caches before each measurement (default: if writable)",
    )
    ap.add_argument("--repeat", type=int, default=None, help="repeats per measurement, median reported (default 3; 1 with --quick)")
    ap.add_argument("--codec", default="lz4", choices=["lz4", "zstd", "zarr-default", "none"])
    ap.add_argument("--profile", action="store_true", help="py-spy the workers in extra untimed convert runs")
    ap.add_argument("--skip-scaling", action="store_true", help="skip the 2x-larger-files memory check")
    ap.add_argument("--skip-malloc", action="store_true", help="skip the MALLOC_TRIM_THRESHOLD_ comparison")
    ap.add_argument("--skip-checksums", action="store_true", help="skip the checksum rows (convert without CRC-32C, verify)")
    ap.add_argument("--json", type=Path, help="also write all results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size_gb = 0.3
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    can_drop = drop_caches_works()
    if args.drop_caches and not can_drop:
        ap.error(f"--drop-caches: cannot write {DROP_CACHES} (need root)")
    cache = Cache(can_drop if args.drop_caches is None else args.drop_caches)
    if not cache.enabled:
        say(
            "NOTE: the page cache is not dropped: files just written are likely in the page cache, "
            "so read limits are memory/CPU limits, not disk limits."
        )
    workdir = args.workdir.absolute()
    created_workdir = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args, cache, workdir)
    try:
        bench.run()
        if args.json:
            args.json.write_text(json.dumps(bench.results, indent=1, default=str))
    finally:
        for sub in ("out", "wlimit", "codecs"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
        if not args.keep:
            for d in workdir.glob("cohort-*"):
                shutil.rmtree(d, ignore_errors=True)
            if created_workdir:
                try:
                    workdir.rmdir()
                except OSError:
                    pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark the normalize workflow (``vn.pipeline.run``) at two data sizes, with
worker memory limits far below the data size: per-pass time, throughput against
this machine's I/O limit, and peak RSS per worker.

Data: uncompressed ``.nii`` int16 brain phantoms (``volnorm.datasets.make_cohort``,
one file per subject, generated in 2 processes through ``bench_convert``'s cohort
helper, reused with ``--keep``) of 256x256x192 voxels (x, y, z; 1 mm isotropic
T1-like, 24 MiB each). Two cohorts of >= ``--small-gb`` and >= ``--large-gb`` GB
(10^9 bytes) of voxels, default 1 and 8 (40 and 318 files); the small cohort is the
first files of the large one (hard links into a directory of its own, so each
cohort is one glob). ``--quick``: 0.1 and 0.4 GB (4 and 16 files), a smoke run.

The workflow, a spec dict like ``workflows/examples/normalize-cohort.yaml`` without
its mask::

    input:   {nifti: <cohort>/*.nii}
    steps:   [{rescale: {percentiles: [1, 99], out_range: uint16}}]
    output:  {store: <out>.zarr, codec: lz4}            # volnorm's default codec
    outputs: {images: true, statistics: {path: <out>.csv}}
    engine:  {n_workers: 2, memory_limit: <--memory-limit>, stall_timeout: <--stall-timeout>}

``out_range: uint16`` (not float32): the output has the input's bytes, so "one
write" of the I/O limit is the same number of bytes as the input, and the
statistics are taken on integers (one exact-quantile pass). The memory limit is in
the spec too, because the pipeline sizes its input chunks from it (a sixteenth of
the limit, 8-64 MiB: 64 MiB at 1 GiB, so one 24 MiB volume per chunk). No mask: the
1-99 % window is taken over every voxel of the cohort.

It runs on a client this script makes: ``volnorm.engine.local_cluster(2,
memory_limit=--memory-limit)`` (default 1GiB per worker, against 1 and 8 GB of
data), a fresh cluster per size, started and warmed (the same spec on 2 files,
untimed: imports and numba compilation) before timing. The run's passes are timed
from the lines it echoes (``echo=`` records each with a time stamp): plan (headers,
digests), open inputs + staging, ``fit rescale`` (pass 1: read everything, exact
percentiles), ``write`` (pass 2: read again, rescale, compress, write, verify),
``statistics`` (per-volume moments and quantiles of the written store: two passes
over the output, moments then quantiles); end-to-end is the wall time of
``vn.pipeline.run`` (the cluster already running).

The I/O limit, measured in the same run on the same files, just before each
size's pipeline run, with 2 processes (``ProcessPoolExecutor``, one per core;
``bench_convert``'s tasks):

* raw read of the .nii files in 8 MiB blocks, page cache dropped (cold); and again
  at once (warm: from the page cache; for information);
* the compressed zarr v3 write of in-memory voxels with volnorm's default codec and
  chunking (each process writes one file's voxels repeatedly, as many bytes in all
  as the cohort);
* I/O LIMIT "1 read + 1 write" = B/read + B/write seconds (B = the cohort's voxel
  bytes), and "2 reads + 1 write" = 2 B/read + B/write: a fit-then-apply run must
  read the input twice (the fit pass and the write pass) and write once. The
  target uses "2 reads + 1 write" (cold reads): that is the honest floor for this
  workflow. The run's second read mostly comes from the page cache here (the
  cohorts fit in RAM); "cold read + warm read + write" is printed for that too;
* the read of the written store (2 processes over its volumes, not dropped: the
  statistics pass reads it just after it was written), for the statistics pass:
  "limit incl. statistics" adds two such reads;
* (f, for information) the write pass's I/O as it runs: each process reads its
  files from disk and writes the output's bytes (its first file's rescaled voxels,
  untimed: the same size and compressibility) for each, both processes at once on
  the same disk, page cache dropped. The separate rows a, b and d each have the disk
  to themselves; a pass that reads and writes at once shares it (measured: 28 GB
  read + written at once in 67 s, against 27 s + 32 s apart). "a + f" is the
  floor of the two passes' I/O as they run.

Page cache: when ``/proc/sys/vm/drop_caches`` is writable (root), the script runs
``sync; echo 3 >`` it before the cold read, the write limit and the pipeline run,
so the fit pass reads from disk (``--no-drop-caches`` to skip). Otherwise the
files are most likely cached and the read limit is a memory/CPU limit; the output
says which.

Peak RSS: every 50 ms, the RSS of each process of this process tree (``bench_convert``'s
sampler): the 2 workers (their pids from ``client.run(os.getpid)``) and the whole
tree (this process, which holds the client, the scheduler and the nannies, plus the
workers; the limit pool and its manager are left out). Per worker = the largest
worker peak (a worker the nanny restarts above 95% of its limit is replaced by a new
process: those are counted too). The pause threshold is dask's
``distributed.worker.memory.pause`` (0.8) x the memory limit; pauses are counted from
the scheduler's ``worker-status-change`` events, restarts from the new worker processes.

A run that fails (e.g. ``RunStalledError`` from the pipeline's no-progress watchdog,
``engine.stall_timeout``, here ``--stall-timeout``, default 120 s instead of the
pipeline's 600 s) is a result: its passes so far, its memory and the error are
reported, and its targets are MISS.

Targets (marked ok/MISS):

* peak RSS per worker of the large run <= 1.2x that of the small run (memory does
  not grow with the data), and below the pause threshold in both runs;
* end-to-end <= 1.5x the "2 reads + 1 write" I/O limit (time), at both sizes (the
  statistics pass is part of the end-to-end time but not of that limit; it is shown
  apart).

One run of each measurement (the full default takes 10-20 minutes): numbers from a
shared machine are noisy, and the load average at the start and the end is printed.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_scale.py              # 1 GB + 8 GB, 10-20 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_scale.py --quick      # 0.1 GB + 0.4 GB smoke run, ~2 min
    PYTHONPATH=. python benchmarks/bench_scale.py --keep --memory-limit 512MiB --json /tmp/scale.json

GB are 10^9 bytes of uncompressed voxels, MiB/GiB 2^20/2^30 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import Bench as ConvertBench
from bench_convert import (
    Cache,
    TreeSampler,
    _pool_init,
    _set_ok,
    dir_bytes,
    drop_caches_works,
    fmt_mem,
    make_sets,
    say,
    task_raw_read,
)
from bench_transforms import Table, okmiss

GB = 1e9
MiB = 2**20
N_PROCS = 2
#: (x, y, z) of every phantom: 1 mm T1-like, int16, 24 MiB; one chunk per volume at 64 MiB chunks
SHAPE = (256, 256, 192)
FILE_BYTES = math.prod(SHAPE) * 2
PERCENTILES = [1, 99]
OUT_RANGE = "uint16"
#: targets
PEAK_GROWTH = 1.2
E2E_LIMIT = 1.5


# ---------------------------------------------------------------------------
# the table: Table of bench_transforms with a per-worker and a tree peak
# ---------------------------------------------------------------------------


class ScaleTable(Table):
    """``bench_transforms.Table`` with two peak columns: per worker (``peak``) and tree (``tree``)."""

    def add(self, part: str, name: str, wall: float | None = None, rate: str = "", vs: str = "",
            peak: int | None = None, check: str = "", **extra: Any) -> dict:
        """As ``Table.add``, without printing the row (the rows are made at the end, all at once)."""
        r = {"part": part, "name": name, "wall": wall, "rate": rate, "vs": vs, "peak": peak, "check": check, **extra}
        self.rows.append(r)
        return r

    @staticmethod
    def fmt(r: dict) -> str:
        wall = f"{r['wall']:8.2f}" if r["wall"] is not None else " " * 8
        peak = f"{r['peak'] / MiB:6.0f}Mi" if r["peak"] else " " * 8
        tree = f"{r['tree'] / MiB:6.0f}Mi" if r.get("tree") else " " * 8
        return f"{r['part']:<7} {r['name']:<44} {wall} {r['rate']:>10} {r['vs']:>18} {peak} {tree}  {r['check']}"

    @staticmethod
    def header() -> str:
        return f"{'size':<7} {'measurement':<44} {'wall s':>8} {'rate':>10} {'vs':>18} {'pk/wkr':>8} {'pk tree':>8}  check"


# ---------------------------------------------------------------------------
# I/O limit tasks (run in the pool of 2 spawned processes)
# ---------------------------------------------------------------------------


def rescale_like_volnorm(x: Any, lo: float, hi: float) -> Any:
    """``vn.rescale(x, out_range="uint16")``'s arithmetic on a numpy int16 array with the window
    (lo, hi): float32, shift, scale, clip, round half to even, cast (one numpy op each, as
    volnorm's graph has them)."""
    import numpy as np

    f = np.float32
    y = (x.astype(f) - f(lo)) * f(65535.0 / (hi - lo)) + f(0.0)
    y = np.clip(y, f(0.0), f(65535.0))
    return np.rint(y).astype(np.uint16)


def task_output_limit(path: str, outdir: str, repeats: int, n_time: int, codec: str, barrier: Any) -> dict:
    """One process: time ``n_time`` numpy rescales of one file's in-memory voxels, then write the
    rescaled (uint16) voxels ``repeats`` times with volnorm's codec and chunking. The barrier lines
    up the 2 processes before each phase; returns each phase's (start, end, bytes)."""
    import numpy as np
    from bench_convert import load_c_order, timed_writes

    from volnorm._utils import slab_chunks

    data = np.ascontiguousarray(load_c_order(path))
    lo, hi = (float(v) for v in np.percentile(data, PERCENTILES))
    chunks = slab_chunks(data.shape, data.itemsize)
    y = rescale_like_volnorm(data, lo, hi)  # untimed: the first one faults its pages in
    barrier.wait()
    t0 = time.time()
    for _ in range(n_time):
        y = rescale_like_volnorm(data, lo, hi)
    t1 = time.time()
    barrier.wait()
    t2, t3 = timed_writes(y, outdir, repeats, codec, chunks)
    return {"rescale": (t0, t1, n_time * data.nbytes), "write": (t2, t3, repeats * y.nbytes)}


def task_io_at_once(paths: list[str], outdir: str, codec: str, barrier: Any) -> tuple[float, float, int]:
    """One process, the write pass's I/O without its arithmetic: for each of its files, read the
    voxels from disk (8 MiB reads, as limit a) and write a volume of the output's bytes (the
    rescaled voxels of its first file, made untimed: the same size and compressibility) with
    volnorm's codec and chunking (as limit d), the other process doing the same at the same
    time on the same disk. Returns (start, end, bytes read)."""
    import numpy as np
    from bench_convert import load_c_order, task_raw_read, write_like_volnorm, zarr_array

    from volnorm._utils import slab_chunks

    data = np.ascontiguousarray(load_c_order(paths[0]))
    lo, hi = (float(v) for v in np.percentile(data, PERCENTILES))
    y = rescale_like_volnorm(data, lo, hi)
    chunks = slab_chunks(y.shape, y.itemsize)
    barrier.wait()
    t0, n = time.time(), 0
    for k, p in enumerate(paths):
        n += task_raw_read(p)
        write_like_volnorm(zarr_array(os.path.join(outdir, f"r{k}.zarr"), y.shape, chunks, y.dtype, codec), y, chunks)
    return t0, time.time(), n


def io_at_once_limit(pool: Any, manager: Any, cache: Cache, files: list[Path], codec: str, workdir: Path) -> float:
    """Bytes/s of :func:`task_io_at_once` over the files in 2 processes (page cache dropped)."""
    outs = [workdir / "iolimit-out" / f"p{k}" for k in range(N_PROCS)]
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(parents=True)
    cache.drop()
    barrier = manager.Barrier(N_PROCS)
    futs = [pool.submit(task_io_at_once, [str(p) for p in files[k::N_PROCS]], str(outs[k]), codec, barrier) for k in range(N_PROCS)]
    res = [f.result() for f in futs]
    shutil.rmtree(workdir / "iolimit-out", ignore_errors=True)
    return sum(r[2] for r in res) / (max(r[1] for r in res) - min(r[0] for r in res))


def task_store_read(path: str) -> int:
    """Read and decompress one zarr array of the written store; bytes of voxels."""
    import zarr

    a = zarr.open_array(path, mode="r")
    return int(a[...].nbytes)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


class Echo:
    """``echo=`` for ``vn.pipeline.run``: keeps every line with its time stamp."""

    def __init__(self, live: bool = False) -> None:
        self.lines: list[tuple[float, str]] = []
        self.live = live

    def __call__(self, text: str) -> None:
        self.lines.append((time.perf_counter(), text))
        if self.live:
            for line in text.splitlines():
                say(f"  | {line}")

    def find(self, pattern: str) -> tuple[float, re.Match] | None:
        for t, text in self.lines:
            for line in text.splitlines():
                m = re.match(pattern, line)
                if m:
                    return t, m
        return None


def passes_from(echo: Echo, t0: float, t1: float) -> tuple[list[tuple[str, float]], list[str]]:
    """The run's passes (name, seconds) from its echoed lines: ``fit NAME: X s`` and
    ``write: X s`` as printed (0.1 s resolution), the rest from the lines' time stamps;
    the last row is what is left of the wall time (between passes, params, result)."""
    problems: list[str] = []
    fits = [(t, m) for t, text in echo.lines for line in text.splitlines() if (m := re.match(r"\s+fit (\S+): ([\d.]+) s", line))]
    write = echo.find(r"\s+write: ([\d.]+) s -> ")
    stats = echo.find(r"\s+statistics -> ")
    if not fits or write is None or stats is None:
        problems.append("not every pass finished (no 'fit', 'write' or 'statistics' line)")
    out: list[tuple[str, float]] = []
    if fits:
        out.append(("plan, open inputs, staging", max(0.0, fits[0][0] - float(fits[0][1].group(2)) - t0)))
        out += [(f"pass 1: fit {m.group(1)} (exact percentiles)", float(m.group(2))) for _, m in fits]
    if write is not None:
        out.append(("pass 2: write (read, rescale, compress)", float(write[1].group(1))))
        if stats is not None:
            out.append(("passes 3-4: statistics of the output", stats[0] - write[0]))
        else:
            out.append(("passes 3-4: statistics of the output FAILED", t1 - write[0]))
    out.append(("other (between passes, params, result)", (t1 - t0) - sum(sec for _, sec in out)))
    return out, problems


@dataclass
class Size:
    label: str
    gb: float
    n: int
    files: list[Path] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.n * FILE_BYTES


def phantoms(workdir: Path, n: int, pool: Any) -> tuple[list[Path], str]:
    """``n`` phantoms: the first ``n`` of a kept set of at least ``n`` (``--keep``), else a new
    set made by ``bench_convert.make_sets`` (which replaces a set of another size)."""
    d = workdir / f"cohort-{'x'.join(map(str, SHAPE))}-nii"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads((d / "cohort.json").read_text())
        if tuple(saved["shape"]) == SHAPE and saved["n"] >= n:
            got = _set_ok(d, {k: saved[k] for k in ("shape", "n", "dtype", "format")})
            if got is not None:
                say(f"  reusing the first {n} of {saved['n']} x {'x'.join(map(str, SHAPE))} .nii in {d} ({saved.get('generator')})")
                return sorted(got)[:n], str(saved.get("generator", "?"))
    nii, _, generator = make_sets(workdir, SHAPE, n, pool, gz=False)
    return sorted(nii), generator


def link_cohort(size: Size, src: list[Path], workdir: Path) -> Path:
    """A directory holding hard links to the first ``size.n`` phantoms (one glob per cohort)."""
    d = workdir / f"input-{size.n}files"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for p in src[: size.n]:
        try:
            os.link(p, d / p.name)
        except OSError:  # another file system: a symlink reads the same file
            os.symlink(p, d / p.name)
    size.files = sorted(d.glob("*.nii"))
    return d


def spec_for(cohort: Path, out: Path, memory_limit: str, codec: str, name: str, stall_timeout: int = 600) -> dict:
    return {
        "version": 1,
        "name": name,
        "input": {"nifti": str(cohort / "*.nii")},
        "steps": [{"rescale": {"percentiles": PERCENTILES, "out_range": OUT_RANGE}}],
        "output": {"store": str(out), "codec": codec},
        "outputs": {"images": True, "statistics": {"path": str(out.with_suffix(".csv"))}},
        "engine": {"scheduler": "local", "n_workers": N_PROCS, "memory_limit": memory_limit, "stall_timeout": stall_timeout},
    }


def clear_output(out: Path) -> None:
    """Remove an output store, its staging directory and its statistics CSV (the pipeline never overwrites)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.volnorm-partial", ignore_errors=True)
    for p in out.parent.glob(f".{out.name}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    out.with_suffix(".csv").unlink(missing_ok=True)


def worker_pauses(client: Any, since: float) -> int:
    """How many times a worker paused (memory above the pause threshold) since ``since``
    (``time.time()``): the scheduler's ``worker-status-change`` events, which outlive a
    restarted worker (its own logs do not)."""
    n = 0
    with contextlib.suppress(Exception):
        for events in client.get_events().values():
            for t, msg in events:
                if (isinstance(msg, dict) and msg.get("action") == "worker-status-change"
                        and msg.get("status") == "paused" and t >= since):
                    n += 1
    return n


def output_limits(pool: Any, manager: Any, cache: Cache, files: list[Path], repeats: int, codec: str, workdir: Path) -> dict:
    """The numpy rescale of in-memory voxels and the compressed write of the rescaled voxels
    (2 processes, aggregate bytes/s over the span of both); the output's compression ratio."""
    cache.drop()
    barrier = manager.Barrier(N_PROCS)
    outs = [workdir / "wlimit-out" / f"p{k}" for k in range(N_PROCS)]
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
        o.mkdir(parents=True)
    n_time = min(repeats, 8)
    futs = [pool.submit(task_output_limit, str(files[k % len(files)]), str(outs[k]), repeats, n_time, codec, barrier)
            for k in range(N_PROCS)]
    res = [f.result() for f in futs]
    stored = dir_bytes(outs[0] / "r0.zarr")
    shutil.rmtree(workdir / "wlimit-out", ignore_errors=True)

    def rate(key: str) -> float:
        return sum(r[key][2] for r in res) / (max(r[key][1] for r in res) - min(r[key][0] for r in res))

    return {"rescale": rate("rescale"), "write_out": rate("write"), "out_ratio": FILE_BYTES / stored if stored else math.nan}


def run_size(size: Size, args: argparse.Namespace, cache: Cache, pool: Any, manager: Any,
             exclude: set[int], workdir: Path) -> None:
    import dask
    import psutil
    import zarr
    from dask.utils import parse_bytes

    import volnorm as vn
    from volnorm.engine import local_cluster
    from volnorm.io.store import DEFAULT_CODEC

    R = size.results
    cohort = link_cohort(size, args.phantoms, workdir)
    say(f"\n== {size.label}: {size.n} files x {fmt_mem(FILE_BYTES)} = {size.nbytes / GB:.2f} GB of voxels ({cohort})")
    B = size.nbytes
    files = size.files

    # -- the I/O limits (2 processes over the files) --------------------------
    cold = ConvertBench(argparse.Namespace(), cache, workdir)
    warm = ConvertBench(argparse.Namespace(), Cache(False), workdir)
    read = cold.limit_once(pool, task_raw_read, files, B) * 1e6  # bytes/s
    say(f"  raw read, cold (dropped)       {read / GB:6.2f} GB/s")
    read_warm = warm.limit_once(pool, task_raw_read, files, B) * 1e6
    say(f"  raw read, warm (again)         {read_warm / GB:6.2f} GB/s")
    repeats = max(1, math.ceil(size.n / N_PROCS))
    write = cold.write_limit_once(pool, manager, files, DEFAULT_CODEC, repeats) * 1e6
    say(f"  compressed write ({DEFAULT_CODEC})        {write / GB:6.2f} GB/s  ({N_PROCS} processes x {repeats} volumes)")
    R["limits"] = {"read_cold": read, "read_warm": read_warm, "write": write, "write_bytes": N_PROCS * repeats * FILE_BYTES}
    R["limits"].update(output_limits(pool, manager, cache, files, repeats, DEFAULT_CODEC, workdir))
    say(f"  numpy rescale (same ops)       {R['limits']['rescale'] / GB:6.2f} GB/s")
    say(f"  write of the rescaled voxels   {R['limits']['write_out'] / GB:6.2f} GB/s  (stored ratio {R['limits']['out_ratio']:.2f})")
    R["limits"]["io_at_once"] = io_at_once_limit(pool, manager, cache, files, DEFAULT_CODEC, workdir)
    say(f"  read + write at once (a and d) {R['limits']['io_at_once'] / GB:6.2f} GB/s  (the write pass's I/O, one disk)")

    # -- the cluster, warmed on 2 files --------------------------------------
    out_dir = workdir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    client = local_cluster(N_PROCS, memory_limit=args.memory_limit)
    try:
        pids = set(client.run(os.getpid).values())
        limits = {w["memory_limit"] for w in client.scheduler_info()["workers"].values()}
        limit = min(limits) if limits else parse_bytes(args.memory_limit)
        pause = float(dask.config.get("distributed.worker.memory.pause")) * limit
        R["cluster_start"] = time.perf_counter() - t0
        warm_dir = workdir / "warmup-input"
        shutil.rmtree(warm_dir, ignore_errors=True)
        warm_dir.mkdir()
        for p in files[:2]:
            os.symlink(p, warm_dir / p.name)
        wout = out_dir / "warmup.zarr"
        clear_output(wout)
        t0 = time.perf_counter()
        try:
            vn.pipeline.run(spec_for(warm_dir, wout, args.memory_limit, DEFAULT_CODEC, "warm-up", args.stall_timeout),
                            client=client, echo=None)
        except Exception as e:  # noqa: BLE001 - the timed run will show it too
            say(f"  the warm-up run failed: {type(e).__name__}: {e}")
        R["warmup"] = time.perf_counter() - t0
        clear_output(wout)
        shutil.rmtree(warm_dir, ignore_errors=True)
        say(f"  cluster: {N_PROCS} workers x 1 thread, memory limit {fmt_mem(limit)} each (pause at {fmt_mem(pause)}); "
            f"started in {R['cluster_start']:.1f} s, warm-up run on 2 files {R['warmup']:.1f} s")
        idle = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                idle[pid] = psutil.Process(pid).memory_info().rss
        run_started = time.time()

        # -- the timed run ----------------------------------------------------
        out = out_dir / f"normalized-{size.n}.zarr"
        clear_output(out)
        spec = spec_for(cohort, out, args.memory_limit, DEFAULT_CODEC, f"bench-scale-{size.n}", args.stall_timeout)
        echo = Echo(live=True)
        cache.drop()
        sampler = TreeSampler(0.05, exclude=exclude)
        sampler.start()
        time.sleep(0.1)
        error = None
        status = "failed"
        t0 = time.perf_counter()
        try:
            status = vn.pipeline.run(spec, client=client, echo=echo).status
        except Exception as e:  # noqa: BLE001 - a failed run is a result: reported, not raised
            error = f"{type(e).__name__}: {e}"
        t1 = time.perf_counter()
        sampler.stop()
        wall = t1 - t0
        pauses = worker_pauses(client, run_started)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    passes, problems = passes_from(echo, t0, t1)
    if error:
        problems.insert(0, f"the run FAILED after {wall:.0f} s: {error}")

    # -- checks on the output -------------------------------------------------
    vols: list[str] = []
    dtypes: set[str] = set()
    stored = 0
    if (out / "zarr.json").exists():
        root = zarr.open_group(out, mode="r")
        vols = sorted(k for k, _ in root.groups())
        dtypes = {str(root[v]["0"].dtype) for v in vols}
        stored = dir_bytes(out)
    csv = out.with_suffix(".csv")
    csv_rows = [ln for ln in csv.read_text().splitlines() if ln and not ln.startswith(("#", "volume,"))] if csv.exists() else []
    if status != "done" or len(vols) != size.n or len(csv_rows) != size.n:
        problems.append(f"incomplete output: status {status}, {len(vols)} volumes in the store, {len(csv_rows)} statistics rows; "
                        f"expected {size.n}")
    restarted = sorted(set(sampler.kind) - pids - exclude - {os.getpid()})
    restarted = [p for p in restarted if sampler.kind.get(p) == "worker"]
    if restarted:
        problems.append(f"{len(restarted)} worker process(es) started during the run: the nanny restarted a worker "
                        "(above 95% of the memory limit)")

    # -- the written store's read (the statistics pass's input) ---------------
    store_read = math.nan
    if len(vols) == size.n:
        store_read = warm.limit_once(pool, task_store_read, [out / v / "0" for v in vols], B) * 1e6
        say(f"  read of the written store      {store_read / GB:6.2f} GB/s  (not dropped)")
    clear_output(out)
    shutil.rmtree(cohort, ignore_errors=True)

    wpeaks = {pid: sampler.per_pid.get(pid, 0) for pid in sorted(pids) + restarted}
    R.update(
        wall=wall, passes=passes, status=status, error=error, problems=problems,
        worker_peaks=sorted(wpeaks.values(), reverse=True), worker_peak=max(wpeaks.values(), default=0),
        worker_idle=sorted(idle.values(), reverse=True), tree_peak=sampler.peak, tree_first=sampler.first or 0,
        client_peak=sampler.per_pid.get(os.getpid(), 0), memory_limit=limit, pause=pause, pauses=pauses,
        restarts=len(restarted), store_read=store_read, stored_bytes=stored, out_dtypes=sorted(dtypes), volumes=len(vols),
        samples=sampler.samples, echo=[text for _, text in echo.lines],
    )
    say(f"  end-to-end {wall:.1f} s ({status}); peak RSS per worker {', '.join(fmt_mem(w) for w in R['worker_peaks'])} "
        f"(idle before {', '.join(fmt_mem(w) for w in R['worker_idle'])}); tree {fmt_mem(sampler.peak)}; "
        f"pauses {pauses}, restarts {len(restarted)}")
    for p in problems:
        say(f"  PROBLEM: {p}")


# ---------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------


def report_rows(tab: ScaleTable, sizes: list[Size]) -> None:
    """The table's rows: per size the limits, the run's passes, end-to-end and the targets;
    then the peak-memory growth from the small to the large run."""

    def gbs(nbytes: float, sec: float) -> str:
        return f"{nbytes / sec / GB:.2f} GB/s" if sec > 0 else ""

    for s in sizes:
        R, L, B = s.results, s.results["limits"], s.nbytes
        part = s.label
        t_read, t_warm, t_write = B / L["read_cold"], B / L["read_warm"], B / L["write"]
        t_resc, t_wout = B / L["rescale"], B / L["write_out"]
        t_store = B / R["store_read"]  # NaN when the run wrote no complete store
        done = R["status"] == "done"
        lim1 = t_read + t_write
        lim2 = 2 * t_read + t_write
        lims = {
            "1r1w": lim1, "2r1w": lim2, "cold+warm+w": t_read + t_warm + t_write,
            "2r+rescale+wout": 2 * t_read + t_resc + t_wout, "2r1w+2store": lim2 + 2 * t_store,
        }
        R["limit_seconds"] = lims
        tab.add(part, "a raw read, cold (page cache dropped)", t_read, gbs(B, t_read))
        tab.add(part, "  raw read, warm (again, from the cache)", t_warm, gbs(B, t_warm), check="(info)")
        tab.add(part, f"b compressed write ({R['codec']}) of the input voxels", t_write, gbs(B, t_write))
        tab.add(part, "LIMIT 1 read + 1 write (a + b)", lim1, gbs(B, lim1))
        tab.add(part, "LIMIT 2 reads + 1 write (2a + b)", lim2, gbs(B, lim2), check="the target's limit: fit + apply read twice")
        tab.add(part, "  c numpy rescale, same ops (in memory)", t_resc, gbs(B, t_resc), check="(info) CPU only")
        stored = f" (the run's store: {B / R['stored_bytes']:.2f})" if R["stored_bytes"] else ""
        tab.add(part, "  d compressed write of the rescaled voxels", t_wout, gbs(B, t_wout),
                check=f"(info) stored ratio {L['out_ratio']:.2f}{stored}")
        if not math.isnan(t_store):
            tab.add(part, "  e zarr read of the written store", t_store, gbs(B, t_store), check="(info) the statistics' input, just written")
        tab.add(part, "  limit 2a + c + d (with the output's cost)", lims["2r+rescale+wout"], gbs(B, lims["2r+rescale+wout"]),
                check="(info) 2 reads, the arithmetic, the output's write")
        t_once = B / L["io_at_once"] if L.get("io_at_once") else math.nan
        if not math.isnan(t_once):
            lims["a+f"] = t_read + t_once
            tab.add(part, "  f read + write at once (a and d together)", t_once, gbs(B, t_once),
                    check="(info) the write pass's I/O on one disk, without its arithmetic")
            tab.add(part, "  limit a + f (the passes' I/O as they run)", lims["a+f"], gbs(B, lims["a+f"]),
                    check="(info) the fit's read, then the write pass's read and write at once")
        if not math.isnan(t_store):
            tab.add(part, "  limit 2a + b + 2e (with the statistics)", lims["2r1w+2store"], gbs(B, lims["2r1w+2store"]),
                    check="(info) + the statistics' 2 reads of the output")
        t_fit = t_w = 0.0
        for name, sec in R["passes"]:
            vs = ""
            if name.startswith("pass 1"):
                t_fit += sec
                vs = f"{sec / t_read:.2f}x a"
            elif name.startswith("pass 2"):
                t_w = sec
                vs = f"{sec / lim1:.2f}x a+b" + (f", {sec / t_once:.2f}x f" if not math.isnan(t_once) else "")
            elif name.startswith("passes 3-4") and not math.isnan(t_store):
                vs = f"{sec / (2 * t_store):.2f}x 2e"
            tab.add(part, name, sec, gbs(B, sec) if name.startswith("pass") and sec > 0.5 else "", vs)
        wp, tree = R["worker_peak"], R["tree_peak"]
        ratio = R["wall"] / lim2
        R["ratios"] = {f"e2e/{k}": R["wall"] / v for k, v in lims.items()}
        R["ratios"]["fit+write/2r1w"] = (t_fit + t_w) / lim2
        R["ratios"]["fit+write/2r+rescale+wout"] = (t_fit + t_w) / lims["2r+rescale+wout"]
        if done:
            tab.add(part, "END-TO-END vn.pipeline.run", R["wall"], gbs(B, R["wall"]), f"{ratio:.2f}x 2a+b",
                    peak=wp, tree=tree, check=f"target <={E2E_LIMIT}x 2 reads + 1 write: {okmiss(ratio <= E2E_LIMIT)}")
            tab.add(part, "  the same against the other limits", None, "", f"{R['wall'] / lim1:.2f}x a+b",
                    check=(f"(info) {R['ratios']['e2e/2r+rescale+wout']:.2f}x 2a+c+d; {R['ratios']['e2e/2r1w+2store']:.2f}x "
                           f"2a+b+2e; {R['ratios']['e2e/cold+warm+w']:.2f}x cold+warm read+b"
                           + (f"; {R['ratios']['e2e/a+f']:.2f}x a+f" if "e2e/a+f" in R["ratios"] else "")))
        else:
            err = (R.get("error") or R["status"]).split(";")[0]
            tab.add(part, "END-TO-END vn.pipeline.run: FAILED", R["wall"], "", "", peak=wp, tree=tree,
                    check=f"target <={E2E_LIMIT}x 2 reads + 1 write: MISS (no result); {err}")
        tab.add(part, "  fit + write passes alone", t_fit + t_w, gbs(B, t_fit + t_w), f"{R['ratios']['fit+write/2r1w']:.2f}x 2a+b",
                check=f"(info) {R['ratios']['fit+write/2r+rescale+wout']:.2f}x 2a+c+d")
        tab.add(part, "  peak RSS per worker vs pause threshold", None, "", f"{wp / R['pause']:.2f}x pause", peak=wp, tree=tree,
                check=(f"target < pause ({fmt_mem(R['pause'])} = 0.8 x {fmt_mem(R['memory_limit'])}): {okmiss(wp < R['pause'])}; "
                       f"workers {', '.join(fmt_mem(w) for w in R['worker_peaks'])} (idle before "
                       f"{', '.join(fmt_mem(w) for w in R['worker_idle'])}); pauses logged: {R['pauses']}; "
                       f"restarts (> 95%): {R.get('restarts', 0)}"))
    if len(sizes) >= 2:
        a, b = sizes[0].results, sizes[-1].results
        g = b["worker_peak"] / a["worker_peak"] if a["worker_peak"] else math.inf
        gt = b["tree_peak"] / a["tree_peak"] if a["tree_peak"] else math.inf
        tab.add(sizes[-1].label, f"peak per worker vs {sizes[0].label} ({sizes[-1].nbytes / sizes[0].nbytes:.1f}x the data)", None, "",
                f"{g:.2f}x", peak=b["worker_peak"], tree=b["tree_peak"],
                check=f"target <={PEAK_GROWTH}x: {okmiss(g <= PEAK_GROWTH)}; whole tree {gt:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-gb", type=float, default=1.0, help="voxel GB (1e9 bytes) of the small cohort (default 1)")
    ap.add_argument("--large-gb", type=float, default=8.0, help="voxel GB of the large cohort (default 8)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 and 0.4 GB")
    ap.add_argument("--memory-limit", default="1GiB", help="per worker, dask syntax (default 1GiB)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-scale"), help="phantoms and outputs (default /tmp/volnorm-bench-scale)")
    ap.add_argument("--keep", action="store_true", help="keep the generated phantoms (reused by the next run)")
    ap.add_argument(
        "--drop-caches", action=argparse.BooleanOptionalAction, default=None,
        help="sync and write 3 to /proc/sys/vm/drop_caches before the cold read, the write limit and each run (default: if writable)",
    )
    ap.add_argument("--stall-timeout", type=int, default=120,
                    help="engine.stall_timeout of the spec: a run with no task finishing for this long stops (default 120 s)")
    ap.add_argument("--json", type=Path, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.small_gb, args.large_gb = 0.1, 0.4

    import dask
    import distributed
    import nibabel
    import numpy as np
    import psutil
    import zarr
    from dask.utils import parse_bytes

    import volnorm as vn
    from volnorm.io.store import DEFAULT_CODEC

    parse_bytes(args.memory_limit)  # fail early on a bad size
    can_drop = drop_caches_works()
    if args.drop_caches and not can_drop:
        ap.error("--drop-caches: cannot write /proc/sys/vm/drop_caches (need root)")
    cache = Cache(can_drop if args.drop_caches is None else args.drop_caches)

    def n_files(gb: float) -> int:
        n = max(N_PROCS, math.ceil(gb * GB / FILE_BYTES))
        return N_PROCS * math.ceil(n / N_PROCS)  # a multiple of the workers balances the load

    sizes = [Size(f"{gb:g} GB", gb, n_files(gb)) for gb in (args.small_gb, args.large_gb)]
    workdir = args.workdir.absolute()
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    notes: list[str] = []
    ctx = mp.get_context("spawn")
    import concurrent.futures as cf

    try:
        with cf.ProcessPoolExecutor(N_PROCS, mp_context=ctx, initializer=_pool_init) as pool, ctx.Manager() as manager:
            say("== phantoms")
            t0 = time.perf_counter()
            nmax = max(s.n for s in sizes)
            args.phantoms, generator = phantoms(workdir, nmax, pool)
            t_setup = time.perf_counter() - t0
            list(pool.map(time.sleep, [0.2] * N_PROCS))  # both processes up
            exclude = set(pool._processes) | {manager._process.pid}  # type: ignore[attr-defined]
            for s in sizes:
                s.results["codec"] = DEFAULT_CODEC
                run_size(s, args, cache, pool, manager, exclude, workdir)
    finally:
        shutil.rmtree(workdir / "out", ignore_errors=True)
        shutil.rmtree(workdir / "wlimit", ignore_errors=True)
        shutil.rmtree(workdir / "wlimit-out", ignore_errors=True)
        shutil.rmtree(workdir / "warmup-input", ignore_errors=True)
        for d in workdir.glob("input-*files"):
            shutil.rmtree(d, ignore_errors=True)
        if not args.keep:
            for d in workdir.glob("cohort-*"):
                shutil.rmtree(d, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    workdir.rmdir()
    load1 = os.getloadavg()

    tab = ScaleTable()
    report_rows(tab, sizes)
    small = sizes[0].results
    env = [
        (f"host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
         f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, Linux {platform.release()}, python {platform.python_version()}"),
        (f"volnorm {vn.__version__}, dask {dask.__version__}, distributed {distributed.__version__}, zarr {zarr.__version__}, "
         f"nibabel {nibabel.__version__}, numpy {np.__version__}"),
        (f"data: int16 .nii phantoms {SHAPE} (x,y,z), {fmt_mem(FILE_BYTES)} each ({generator}); "
         + "; ".join(f"{s.label}: {s.n} files, {s.nbytes / GB:.2f} GB" for s in sizes)
         + " (the small cohort = the first files of the large)"),
        (f"workflow: vn.pipeline.run: rescale percentiles {PERCENTILES} -> {OUT_RANGE} (no mask), output store codec "
         f"{DEFAULT_CODEC} + statistics CSV; output dtype {', '.join(small.get('out_dtypes', []))}, stored ratio "
         + ", ".join(f"{s.nbytes / s.results['stored_bytes']:.2f}" if s.results["stored_bytes"] else "-" for s in sizes)),
        (f"cluster: volnorm.engine.local_cluster({N_PROCS}, memory_limit={args.memory_limit!r}), 1 thread per worker, "
         "a fresh one per size, started and warmed (same spec on 2 files) before timing; pause threshold = "
         f"{dask.config.get('distributed.worker.memory.pause')} x limit"),
        ("page cache: DROPPED (sync; echo 3 > /proc/sys/vm/drop_caches) before the cold read, the write limit and the run: "
         "the fit pass reads from disk" if cache.enabled else
         "page cache: NOT dropped: the files are most likely cached; read limits are memory/CPU limits, not the disk's"),
        (f"limits: {N_PROCS} processes over the files (a: 8 MiB reads; b: in-memory input voxels -> zarr v3 with volnorm's "
         "codec and chunking; c, d: the same for vn.rescale's numpy ops and their uint16 result; e: the run's store; f: a and d at once, "
         "each process reading its files and writing the output's bytes); "
         "seconds = the cohort's bytes / rate; one run of everything"),
        (f"load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in load0)}; at the end: "
         f"{', '.join(f'{x:.2f}' for x in load1)} (a shared 2-core machine: expect +-20% noise)"),
    ]
    notes.append("pk/wkr = the larger of the 2 workers' peak RSS during the run; pk tree = peak of the sum over this process "
                 "(client, scheduler, nannies) and the workers; sampled every 50 ms")
    notes.append("the run's passes: 'fit NAME: X s' and 'write: X s' as the run prints them (0.1 s resolution: 'other' "
                 "can be slightly negative), the other rows from the time stamps of its lines; end-to-end = wall time of "
                 "vn.pipeline.run with the cluster running; GB/s = input voxel bytes / seconds")
    for s in sizes:
        for p in s.results.get("problems", []):
            notes.append(f"PROBLEM {s.label}: {p}")
    tab.report("volnorm scale benchmark (normalize workflow: vn.pipeline.run)", env, notes, 150,
               (t_all, t_setup, "generating or checking the phantoms"))
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": tab.rows, "notes": notes,
                                         "sizes": [{"label": s.label, "gb": s.gb, "n": s.n, "bytes": s.nbytes, **s.results} for s in sizes]},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

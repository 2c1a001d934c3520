#!/usr/bin/env python
"""Benchmark ``vn.convert`` and ``vn.histogram`` from and to a local S3 server (SeaweedFS,
``volnorm.testing.S3Server``) against the same work on local disk and against the server's
own raw GET and PUT throughput, measured in the same run on the same bytes. Target: the S3
runs within 1.5x of the raw time for the bytes they move.

Data: ``--files`` (default 20) uncompressed ``.nii`` int16 phantoms of ``--shape`` (default
256x256x192: 24 MiB each, 0.503 GB of voxels in all; ``--quick``: 8 files of 128x128x192,
6 MiB each, 50 MB) made once with ``volnorm.datasets.make_cohort(compressed=False, seed=0)``
in ``<workdir>/cohort-<shape>-<n>`` (kept and reused). A fresh ``S3Server`` is started with its
data folder in ``<workdir>/s3`` (local disk, the same disk as the local runs), bucket
``bench``; the files are uploaded (``fs.put``, untimed) to ``s3://bench/cohort/``.

Scheduler: ``scheduler="threads"`` for every volnorm run (dask's thread pool, as many threads
as usable CPUs: 2 here). The default local cluster is what users get, but its worker processes
take ~2 s to start on this VM, which on a 0.5 GB run would be noise of the same size as the
effect; the threads pool has no start-up cost and the S3 client (s3fs/aiobotocore) is the same
in both. So the concurrency is 2 requests in flight: convert runs one task per file, each a
sequential read (8 MiB read-ahead blocks from S3) and whole-chunk writes; histograms run one
task per chunk. The raw measures use the same concurrency (``--concurrency``, default: the
usable CPUs), plus one raw GET at ``--wide`` (default 8) requests in flight to show whether the
server gives more with more requests (information, not a limit).

Raw server throughput (best of ``--repeat``):

* GET: ``fs.cat_file`` of every input object in full, ``--concurrency`` threads of a
  ``ThreadPoolExecutor`` on one ``s3fs.S3FileSystem`` (how volnorm's tasks call it);
* PUT: ``fs.pipe_file`` of every input file's bytes (read into memory before the clock starts)
  to ``s3://bench/raw-put/<i>``: objects of the input's size, which is also volnorm's chunk
  size here (default chunks: whole-plane slabs up to 64 MiB, i.e. one chunk per 24 MiB
  volume); deleted afterwards.

volnorm runs (each best of ``--repeat``, default 2; each repeat writes to a new URL or folder
(``-1.zarr``, ...) and the previous one is deleted, untimed: SeaweedFS keeps the empty
"directories" of deleted objects, which volnorm then takes for foreign objects; the default
codec, blosc-lz4; after an untimed warm-up: one file converted on disk, and histograms of that
store and of one S3 object, so imports, numba kernels and the S3 client's session are ready):

* convert disk->disk (the local baseline), disk->s3, s3->disk, s3->s3;
* histogram of ``vn.open_zarr`` of the disk->disk store and of the s3->s3 store;
* histogram of ``vn.open_nifti`` of the local files and of the S3 objects.
  ``vn.histogram(data)`` on int16 data computes its one pass (whole int16 range, trimmed).

Columns: MB = voxel bytes (10^6); S3 MB = the bytes the run GETs plus PUTs (below); MB/s =
voxel bytes / seconds; ``x raw`` = seconds / the raw time for the bytes the run moves: GET bytes / raw GET rate + PUT
bytes / raw PUT rate, where a run's GET bytes are the input files' (s3 inputs) or the stored
chunks' (s3 zarr reads), and its PUT bytes are the s3 store's bytes after the run (``fs.du``:
lz4 chunks, smaller than the voxels, plus metadata); ``x disk`` = seconds / the matching
disk run's; check: the S3 run's result equals the disk run's (every volume's voxels with
``numpy.array_equal``, the histogram's counts and bins with ``numpy.array_equal``).

zarr's two S3 storage layers (after the volnorm runs, same server, same data): zarr v3's
``FsspecStore`` over s3fs (what volnorm uses: ``Remote.zarr_store``) against its
``ObjectStore`` over ``obstore.store.S3Store`` (endpoint, key/secret of the server, region
us-east-1, ``client_options={"allow_http": True}`` for the plain-http endpoint). The rows, each
measured once per round for ``--repeat`` rounds (the two rows of a pair back to back, s3fs's
first in even rounds and obstore's first in odd ones), report the **median** over rounds (the
rows above keep the best of N):

* ``s3fs raw GET`` / ``obstore raw GET``: every input object in full, ``fs.cat_file`` against
  ``obstore.get(store, key).bytes()``, ``--concurrency`` threads (as the raw rows above);
* ``s3fs raw PUT`` / ``obstore raw PUT``: the input files' bytes (in memory) as new objects,
  ``fs.pipe_file`` against ``obstore.put(..., use_multipart=False)``: one PUT request per
  object on both, ``--concurrency`` in flight; these four set each layer's raw rates;
* ``obstore raw PUT multipart (info)``: ``obstore.put`` with its defaults, which zarr's
  ``ObjectStore.set`` uses: objects over 5 MiB go as a multipart upload of 5 MiB parts, up to 12
  parts in flight per object (s3fs's ``pipe_file`` stays one PUT below 100 MiB);
* ``zarr read FsspecStore`` / ``zarr read ObjectStore``: ``zarr.open_group(store=...,
  mode="r")`` on the s3->s3 convert's store, its members listed, every array read in full
  (every chunk fetched and decoded), ``--concurrency`` threads reading one array each at a time
  (volnorm's arrays here: one volume chunk and one 352-byte header per subject), zarr's
  ``async.concurrency`` set to ``--zarr-concurrency`` (default: ``--concurrency``) for the
  chunks of an array. The time includes opening the group and listing its members (``open`` in
  the check column: its median);
* ``zarr write FsspecStore`` / ``zarr write ObjectStore``: the same groups and arrays (shape,
  chunks, codecs, fill value, dimension names, attributes from the source store's metadata;
  the voxels in memory) written to a new prefix ``s3://bench/layers/<layer>-<round>.zarr``,
  the same threads and ``async.concurrency``; the time includes creating the groups and arrays.

Each timed run builds its store as a user would: ``FsspecStore.from_url`` (the s3fs instance
is cached by fsspec, its session opened during an untimed warm-up read) or a new ``S3Store``.
Columns: MB = bytes delivered or taken (the objects' bytes; the arrays' decoded bytes for the
zarr rows); S3 MB = the stored bytes the row GETs or PUTs (zarr rows: every object under the
store's prefix, ``fs.du``); ``x raw`` = seconds / (GET bytes / GET rate + PUT bytes / PUT
rate) at the raw rates of the row's own layer, ``x s3fs`` the same at s3fs's raw rates (the
raw rates: median bytes per second of the four raw rows). Checks (untimed): every object read
equals the local file's bytes, every object put read back (s3fs) equals them, every array read
equals the one in the disk->disk store (``numpy.array_equal``), every array written, read back
through the same layer, equals it and its metadata equals the source's. A conclusion line per
pair names the faster layer, the ratio of the medians and the range of the same-round ratios.
Without obstore (not a volnorm dependency) its rows are skipped with the reason printed.

The page cache is warm for every run (inputs just written or read; the server's volume files
just written): this measures the S3 protocol path and the client, not the disk. Host, versions
(``weed version``) and load average at start and end are printed; the machine may be shared.
If a volnorm run raises, its row says ERROR, the traceback's tail is printed and put in the
JSON, and the other runs go on.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_object_store.py --quick      # ~50 MB smoke run
    PYTHONPATH=. python benchmarks/bench_object_store.py              # 20 x 24 MiB, 0.5 GB
    PYTHONPATH=. python benchmarks/bench_object_store.py --repeat 3 --json /tmp/s3.json
    PYTHONPATH=. python benchmarks/bench_object_store.py --zarr-concurrency 10   # zarr's default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slurm import say, sh  # noqa: E402

MB = 1e6
BUCKET = "bench"


class Row:
    """One table row: its timings (``samples``) and ``seconds``, their ``stat`` (best of N for the
    volnorm rows, the median for the storage layers' rows)."""

    def __init__(self, run: str, nbytes: int, get: int = 0, put: int = 0, disk: str | None = None, layer: str = "",
                 stat: Callable[[list[float]], float] = min) -> None:
        self.run, self.nbytes, self.get, self.put, self.disk, self.layer, self.stat = run, nbytes, get, put, disk, layer, stat
        self.samples: list[float] = []
        self.seconds: float | None = None
        self.check = ""
        self.note = ""
        self.error = ""
        self.result: Any = None

    def once(self, fn: Callable[[int], Any], k: int, before: Callable[[int], None] = lambda k: None) -> bool:
        """Time ``fn(k)`` once (``before(k)`` untimed); False if either raised (reported)."""
        try:
            before(k)
            t = time.perf_counter()
            self.result = fn(k)
            self.samples.append(time.perf_counter() - t)
            self.seconds = self.stat(self.samples)
            return True
        except Exception as e:  # noqa: BLE001 - reported, the other runs go on
            tail = traceback.format_exc().strip().splitlines()[-12:]
            self.error = f"{type(e).__name__}: {e}"
            self.check = "ERROR"
            say(f"  {self.run}: ERROR {self.error}\n    " + "\n    ".join(tail))
            self.tail = tail
            return False

    def timed(self, fn: Callable[[int], Any], repeat: int, before: Callable[[int], None] = lambda k: None) -> None:
        for k in range(repeat):
            if not self.once(fn, k, before):
                return

    def failed(self) -> bool:
        return self.check.startswith(("FAIL", "ERROR"))


def cohort(workdir: Path, n: int, shape: tuple[int, ...]) -> list[Path]:
    import volnorm as vn

    folder = workdir / f"cohort-{'x'.join(map(str, shape))}-{n}"
    done = folder / ".complete"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        vn.datasets.make_cohort(folder, n_subjects=n, shape=shape, compressed=False, seed=0)
        done.write_text("ok")
        say(f"made {n} phantoms in {time.perf_counter() - t:.1f} s: {folder}")
    return sorted(folder.glob("*.nii"))


def in_parallel(fn: Callable[[Any], Any], items: list, workers: int) -> list:
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, items))


def raw_get(fs: Any, keys: list[str], workers: int, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        in_parallel(lambda k: len(fs.cat_file(k)), keys, workers)
        best = min(best, time.perf_counter() - t)
    return best


def raw_put(fs: Any, payloads: list[bytes], workers: int, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        fs.rm(f"{BUCKET}/raw-put", recursive=True) if fs.exists(f"{BUCKET}/raw-put") else None
        t = time.perf_counter()
        in_parallel(lambda ip: fs.pipe_file(f"{BUCKET}/raw-put/{ip[0]:04d}", ip[1]), list(enumerate(payloads)), workers)
        best = min(best, time.perf_counter() - t)
    fs.rm(f"{BUCKET}/raw-put", recursive=True)
    return best


def nth(out: str, k: int) -> str:
    """The k-th repeat's output: a new URL each time, because SeaweedFS keeps the empty
    "directories" of deleted objects and volnorm then refuses the prefix (README)."""
    return out if k <= 0 else out.replace(".zarr", f"-{k}.zarr")


def remove(fs: Any, out: str) -> None:
    """Delete a run's output (local folder or s3 prefix) and anything volnorm left beside it."""
    if out.startswith("s3://"):
        fs.invalidate_cache()
        for key in fs.ls(f"{BUCKET}/out", refresh=True) if fs.exists(f"{BUCKET}/out") else []:
            if Path(key).name.lstrip(".").startswith(Path(out).name):
                fs.rm(key, recursive=True)
        fs.invalidate_cache()
    else:
        for p in Path(out).parent.glob(f"*{Path(out).name}*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def same_stores(a: Any, b: Any) -> str:
    """ok when two opened stores hold the same volumes with the same voxels."""
    names_a, names_b = list(a.coords.get("volume", [])), list(b.coords.get("volume", []))
    if a.shape != b.shape or [str(x) for x in names_a] != [str(x) for x in names_b]:
        return f"FAIL shape {a.shape} != {b.shape}"
    for i in range(a.sizes.get("volume", 1)):
        pa, pb = (x.isel(volume=i) if "volume" in x.dims else x for x in (a, b))
        if not np.array_equal(pa.values, pb.values):
            return f"FAIL volume {i}"
    return "ok"


def same_hist(a: Any, b: Any) -> str:
    if a is None or b is None:
        return ""
    ok = np.array_equal(a.values, b.values) and np.array_equal(a["bin"].values, b["bin"].values)
    return "ok" if ok else "FAIL counts"


def table(rows: list[Row], rates: dict[str, float]) -> list[str]:
    by = {r.run: r for r in rows}
    lines = [f"{'run':<24}{'MB':>8}{'S3 MB':>8}{'s':>8}{'MB/s':>8}{'x raw':>8}{'x disk':>8}  check"]
    for r in rows:
        if r.seconds is None:
            lines.append(f"{r.run:<24}{r.nbytes / MB:>8.0f}{'':>8}{'-':>8}{'-':>8}{'':>8}{'':>8}  {r.check}")
            continue
        limit = r.get / rates["get"] + r.put / rates["put"] if (r.get or r.put) else 0
        r.x_raw = r.seconds / limit if limit else None
        d = by.get(r.disk) if r.disk else None
        r.x_disk = r.seconds / d.seconds if d is not None and d.seconds else None
        xr_ = f"{r.x_raw:.2f}x" if r.x_raw else ""
        xd = f"{r.x_disk:.2f}x" if r.x_disk else ""
        moved = f"{(r.get + r.put) / MB:.0f}" if (r.get or r.put) else ""
        lines.append(f"{r.run:<24}{r.nbytes / MB:>8.0f}{moved:>8}{r.seconds:>8.2f}{r.nbytes / MB / r.seconds:>8.0f}{xr_:>8}{xd:>8}  {r.check}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/volnorm-bench-s3"))
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--shape", default="256,256,192")
    ap.add_argument("--quick", action="store_true", help="8 files of 128x128x192 (50 MB)")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for every timing")
    ap.add_argument("--concurrency", type=int, default=0, help="raw requests in flight (default: usable CPUs)")
    ap.add_argument("--wide", type=int, default=8, help="one more raw GET at this concurrency (0: skip)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import fsspec
    import psutil
    import s3fs
    import zarr

    import volnorm as vn
    from volnorm.engine import usable_cpus
    from volnorm.testing import S3Server

    shape = (128, 128, 192) if args.quick else tuple(int(s) for s in args.shape.split(","))
    n = 8 if args.quick else args.files
    conc = args.concurrency or usable_cpus()
    s3dir = args.workdir / "s3"
    server = S3Server(s3dir)
    load0 = os.getloadavg()
    host = {"cores": os.cpu_count(), "ram": psutil.virtual_memory().total, "platform": platform.platform()}
    versions = {"volnorm": vn.__version__, "zarr": zarr.__version__, "s3fs": s3fs.__version__,
                "fsspec": fsspec.__version__, "weed": (sh(server.weed, "version").splitlines() or ["?"])[0],
                "python": platform.python_version()}
    src = Path(vn.__file__).resolve().parent.parent
    head = sh("git", "-C", str(src), "rev-parse", "--short", "HEAD")
    dirty = head and sh("git", "-C", str(src), "status", "--porcelain", "volnorm")
    commit = f"{src}: " + (f"{head}{' (volnorm/ modified)' if dirty else ''}" if head else "not a git checkout")
    say(f"host    : {host['cores']} cores, {host['ram'] / 2**30:.1f} GiB RAM, {host['platform']}")
    say(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; volnorm at {commit}")
    say(f"load    : {' '.join(f'{x:.2f}' for x in load0)} (1, 5, 15 min) at start")

    args.workdir.mkdir(parents=True, exist_ok=True)
    files = cohort(args.workdir, n, shape)
    vox = sum(f.stat().st_size for f in files) - 352 * n  # .nii: a 352-byte header before the voxels
    fbytes = sum(f.stat().st_size for f in files)
    outdir = args.workdir / "out"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir()
    shutil.rmtree(s3dir, ignore_errors=True)
    s3dir.mkdir()
    rows: list[Row] = []
    with server:
        def opts(*paths: str) -> dict | None:  # volnorm refuses storage_options for local paths alone
            return server.storage_options if any(p.startswith("s3://") for p in paths) else None

        fs = server.filesystem()
        server.make_bucket(BUCKET)
        t = time.perf_counter()
        fs.put([str(f) for f in files], f"{BUCKET}/cohort/")
        say(f"data    : {n} files of {'x'.join(map(str, shape))} int16, {vox / MB:.0f} MB of voxels; "
            f"uploaded to {server.endpoint}/{BUCKET}/cohort/ in {time.perf_counter() - t:.1f} s (fs.put, untimed)")
        keys = sorted(fs.ls(f"{BUCKET}/cohort/", refresh=True))
        assert len(keys) == n, keys

        get_s = raw_get(fs, keys, conc, args.repeat)
        payloads = [f.read_bytes() for f in files]
        put_s = raw_put(fs, payloads, conc, args.repeat)
        del payloads
        rates = {"get": fbytes / get_s, "put": fbytes / put_s}
        for name, s in ((f"raw GET x{conc}", get_s), (f"raw PUT x{conc}", put_s)):
            r = Row(name, fbytes)
            r.seconds, r.check = s, "-"
            rows.append(r)
        if args.wide:
            r = Row(f"raw GET x{args.wide} (info)", fbytes)
            r.seconds, r.check = raw_get(fs, keys, args.wide, args.repeat), "-"
            rows.append(r)

        warm = outdir / "warm-up.zarr"  # imports, numba kernels, the s3 client's session: untimed
        vn.convert(str(files[0]), str(warm), scheduler="threads")
        with vn.engine.running("threads"):
            vn.histogram(vn.open_zarr(str(warm))).compute()
            vn.histogram(vn.open_nifti(f"s3://{keys[0]}", storage_options=opts("s3://"))).compute()
        shutil.rmtree(warm)

        local_in, s3_in = str(files[0].parent / "*.nii"), f"s3://{BUCKET}/cohort/*.nii"
        stores = {"disk": str(outdir / "disk.zarr"), "s3": f"s3://{BUCKET}/out/s3.zarr"}
        runs = {"convert disk->disk": (local_in, stores["disk"]), "convert disk->s3": (local_in, f"s3://{BUCKET}/out/ls.zarr"),
                "convert s3->disk": (s3_in, str(outdir / "sl.zarr")), "convert s3->s3": (s3_in, stores["s3"])}
        opened: dict[str, Any] = {}
        for name, (src, dst) in runs.items():
            r = Row(name, vox, get=fbytes if src.startswith("s3") else 0, disk=None if name.endswith("disk->disk") else "convert disk->disk")
            say(f"  {name} ...")
            r.timed(lambda k: vn.convert(src, nth(dst, k), scheduler="threads", storage_options=opts(src, dst)), args.repeat,
                    before=lambda k: remove(fs, nth(dst, k - 1)) if k else None)
            rows.append(r)
            if r.error:
                continue
            base, dst = dst, nth(dst, args.repeat - 1)
            stores = {w: dst if s == base else s for w, s in stores.items()}
            if dst.startswith("s3://"):
                fs.invalidate_cache()
                r.put = fs.du(dst[5:])
            try:
                data = vn.open_zarr(dst, storage_options=opts(dst))
                if name == "convert disk->disk":
                    opened["disk"], r.check = data, "-"
                else:
                    r.check = same_stores(opened["disk"], data) if "disk" in opened else "no disk run"
            except Exception as e:  # noqa: BLE001
                r.check = f"FAIL open: {type(e).__name__}: {e}"
            if not name.endswith(("disk->disk", "s3->s3")):
                remove(fs, dst)

        with vn.engine.running("threads"):
            hists: dict[str, Any] = {}
            for what, opener in (("zarr", lambda p: vn.open_zarr(p, storage_options=opts(p))),
                                 ("nifti", lambda p: vn.open_nifti(p, storage_options=opts(p)))):
                for where, path in (("disk", stores["disk"] if what == "zarr" else local_in),
                                    ("s3", stores["s3"] if what == "zarr" else s3_in)):
                    name = f"histogram {what} {where}"
                    get = (fs.du(stores["s3"][5:]) if what == "zarr" and fs.exists(stores["s3"][5:]) else fbytes) if where == "s3" else 0
                    r = Row(name, vox, get=get, disk=f"histogram {what} disk" if where == "s3" else None)
                    say(f"  {name} ...")
                    r.timed(lambda k: vn.histogram(opener(path)).compute(), args.repeat)
                    rows.append(r)
                    if not r.error:
                        hists[name] = r.result
                        r.check = same_hist(hists.get(f"histogram {what} disk"), r.result) if where == "s3" else "-"
        remove(fs, stores["s3"])
        remove(fs, stores["disk"])
    shutil.rmtree(s3dir, ignore_errors=True)  # the server's data; the cohort is kept for the next run

    load1 = os.getloadavg()
    say()
    say(f"host    : {host['cores']} cores, {host['ram'] / 2**30:.1f} GiB RAM; {', '.join(f'{k} {v}' for k, v in versions.items())}")
    say(f"data    : {n} files, {vox / MB:.0f} MB of voxels ({fbytes / n / 2**20:.1f} MiB objects); scheduler threads "
        f"({usable_cpus()}); raw requests in flight: {conc}; load {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    say(f"raw     : GET {rates['get'] / MB:.0f} MB/s, PUT {rates['put'] / MB:.0f} MB/s (x{conc}); "
        f"x raw = s / (GET bytes / GET rate + PUT bytes / PUT rate)")
    for line in table(rows, rates):
        say(line)
    errors = [r for r in rows if r.error]
    for r in errors:
        say(f"\n{r.run}: {r.error}\n  " + "\n  ".join(getattr(r, "tail", [])))
    if args.json:
        out = {"host": host, "versions": versions, "commit": commit, "files": n, "shape": shape, "voxel_bytes": vox,
               "file_bytes": fbytes, "concurrency": conc, "threads": usable_cpus(), "load_start": load0, "load_end": load1,
               "rates": rates, "rows": [{"run": r.run, "bytes": r.nbytes, "seconds": r.seconds, "get_bytes": r.get,
                                         "put_bytes": r.put, "x_raw": getattr(r, "x_raw", None),
                                         "x_disk": getattr(r, "x_disk", None), "check": r.check, "error": r.error,
                                         "traceback": getattr(r, "tail", None)} for r in rows]}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 1 if errors or any(r.check.startswith("FAIL") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

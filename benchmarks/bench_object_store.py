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
  ``obstore.get(store, key).bytes()``, ``--concurrency`` threads (as the raw rows above); each
  object is compared with the local file's bytes as it arrives (a memcmp, in the time of both
  layers) and dropped;
* ``s3fs raw PUT`` / ``obstore raw PUT``: the input files' bytes (in memory) as new objects,
  ``fs.pipe_file`` against ``obstore.put(..., use_multipart=False)``: one PUT request per
  object on both, ``--concurrency`` in flight; these four set each layer's raw rates;
* ``obstore raw PUT multipart (info)``: ``obstore.put`` with its defaults, which zarr's
  ``ObjectStore.set`` uses: objects over 5 MiB go as a multipart upload of 5 MiB parts, up to 12
  parts in flight per object (s3fs's ``pipe_file`` stays one PUT below 100 MiB);
* ``zarr read FsspecStore`` / ``zarr read ObjectStore``: ``zarr.open_group(store=...,
  mode="r")`` on the s3->s3 convert's store, its members listed, every array read in full
  (every chunk fetched and decoded, ``get_basic_selection(..., out=)`` into arrays allocated
  once before the rounds), ``--concurrency`` threads reading one array each at a time
  (volnorm's arrays here: one volume chunk and one 352-byte header per subject), zarr's
  ``async.concurrency`` set to ``--zarr-concurrency`` (default: ``--concurrency``) for the
  chunks of an array. The time includes opening the group and listing its members (``open`` in
  the check column: its median);
* ``zarr write FsspecStore`` / ``zarr write ObjectStore``: the same groups and arrays (shape,
  chunks, codecs, fill value, dimension names, attributes from the source store's metadata;
  the voxels in memory) written to a new prefix ``s3://bench/layers/<layer>-<round>.zarr``,
  the same threads and ``async.concurrency``; the time includes creating the groups and arrays.

Why ``out=``: on this VM, new memory is expensive and erratic to touch: ``np.ones`` of 503 MB
took 4.1 and 5.3 s (3.6 and 4.9 s of CPU) the first two times in a fresh process, 0.1 s the
next two; reads into new arrays took 0.9 to 5 s for the same 503 MB and either layer, which hid
the layers' difference. Before every read each element of those arrays is set to differ from
the expected value, so the check sees every element written.

Each timed run builds its store as a user would: ``FsspecStore.from_url`` (the s3fs instance
is cached by fsspec, its session opened during an untimed warm-up read) or a new ``S3Store``.
Columns: MB = bytes delivered or taken (the objects' bytes; the arrays' decoded bytes for the
zarr rows); S3 MB = the stored bytes the row GETs or PUTs (zarr rows: every object under the
store's prefix, ``fs.du``); ``x raw`` = seconds / (GET bytes / GET rate + PUT bytes / PUT
rate) at the raw rates of the row's own layer, ``x s3fs`` the same at s3fs's raw rates (the
raw rates: median bytes per second of the four raw rows); CPU s = the median CPU seconds
(user + system) of this process (the client: every thread, HTTP, decoding) + of the weed server
during the timed run (where the time went; it varies too: touching new memory, above, is CPU
time). Checks (untimed but for raw GET's): every object read equals the local file's bytes,
every object put, read back with s3fs, equals them, every array read equals the one in the
disk->disk store (``numpy.array_equal``), every array written, read back through the same
layer, equals it and its metadata equals the source's. A conclusion line per pair names the
faster layer, the ratio of the medians and the range of the same-round ratios. Without obstore
(not a volnorm dependency) its rows are skipped with the reason printed.

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
from typing import Any, Callable, NamedTuple

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
        self.rate_of = ""  # a raw row that sets its layer's raw rate: "get" or "put"
        self.cpu: list[tuple[float, float]] = []  # storage layers' rows: (this process, the server) CPU seconds per run
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


LAYERS = {"s3fs": "FsspecStore", "obstore": "ObjectStore"}


def obstore_s3(server: Any, prefix: str | None = None) -> Any:
    """obstore's S3Store on the local server's bucket (plain http: ``allow_http``)."""
    from obstore.store import S3Store

    return S3Store(BUCKET, prefix=prefix, endpoint=server.endpoint, access_key_id=server.key,
                   secret_access_key=server.secret, region="us-east-1", client_options={"allow_http": True})


def zarr_store(layer: str, server: Any, prefix: str, read_only: bool) -> Any:
    """zarr's store for ``s3://bench/<prefix>`` through one layer: the FsspecStore volnorm makes
    (``Remote.zarr_store``), or an ObjectStore over a new S3Store."""
    if layer == "s3fs":
        from volnorm.io.location import Remote

        return Remote(f"s3://{BUCKET}/{prefix}", server.storage_options).zarr_store(read_only=read_only)
    from zarr.storage import ObjectStore

    return ObjectStore(obstore_s3(server, prefix), read_only=read_only)


def zarr_nodes(group: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A group's subgroups and arrays at every depth, by path."""
    import zarr

    members = dict(group.members(max_depth=None))
    return ({p: m for p, m in members.items() if not isinstance(m, zarr.Array)},
            {p: m for p, m in members.items() if isinstance(m, zarr.Array)})


def read_arrays(store: Any, workers: int) -> dict[str, np.ndarray]:
    """Every array of the group at ``store`` in full, as new arrays (untimed uses)."""
    import zarr

    arrays = zarr_nodes(zarr.open_group(store=store, mode="r"))[1]
    return dict(zip(arrays, in_parallel(lambda a: a[...], list(arrays.values()), workers)))


def read_into(store: Any, dest: dict[str, np.ndarray], workers: int) -> tuple[set[str], float]:
    """Open the group at ``store``, list its members and read every array in full (every chunk
    fetched and decoded) into ``dest``'s array of its path, ``workers`` arrays at a time; the
    paths read and the seconds the open and the listing took."""
    import zarr
    from zarr.core.buffer.cpu import NDBuffer

    t = time.perf_counter()
    arrays = zarr_nodes(zarr.open_group(store=store, mode="r"))[1]
    opened = time.perf_counter() - t
    in_parallel(lambda p: arrays[p].get_basic_selection(..., out=NDBuffer.from_numpy_array(dest[p])), list(arrays), workers)
    return set(arrays), opened


def poison(dest: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Make every element of ``dest`` differ from ``want``'s (NaN for floats): a read that
    leaves any element unwritten fails its check."""
    for p, d in dest.items():
        if d.dtype.kind in "biu":
            np.invert(want[p], out=d)
        else:
            d.fill(np.nan)


def write_arrays(store: Any, groups: dict[str, dict], arrays: dict[str, dict], values: dict[str, np.ndarray], workers: int) -> None:
    """A new group at ``store`` with ``groups`` (path: attributes) and ``arrays`` (path:
    ``create_array`` arguments) holding ``values``, ``workers`` arrays at a time."""
    import zarr

    root = zarr.open_group(store=store, mode="w-")
    for path in sorted(groups, key=lambda p: p.count("/")):
        root.create_group(path, attributes=groups[path])

    def write(path: str) -> None:
        root.create_array(path, **arrays[path])[...] = values[path]

    in_parallel(write, list(arrays), workers)


def array_spec(a: Any) -> dict:
    """``create_array`` arguments that remake array ``a`` (from its metadata)."""
    m = a.metadata
    return {"shape": a.shape, "dtype": a.dtype, "chunks": a.chunks, "shards": a.shards, "filters": a.filters,
            "compressors": a.compressors, "serializer": a.serializer, "fill_value": m.fill_value,
            "chunk_key_encoding": m.chunk_key_encoding, "dimension_names": m.dimension_names,
            "attributes": a.attrs.asdict()}


def same_arrays(paths: set[str], got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> str:
    """ok when the arrays read (``paths``, into ``got``) are ``want``'s, element for element."""
    if paths != want.keys():
        return f"FAIL arrays {sorted(paths ^ want.keys())[:3]}"
    bad = [p for p in want if not np.array_equal(got[p], want[p], equal_nan=want[p].dtype.kind in "fc")]
    return f"FAIL {len(bad)} arrays differ, e.g. {bad[0]}" if bad else "ok"


class Step(NamedTuple):
    """One storage layers' row: its timed ``run(k)``, ``check(k, result)`` -> ok / FAIL
    (untimed, after), and ``before(k)`` (untimed)."""

    row: Row
    run: Callable[[int], Any]
    check: Callable[[int, Any], str]
    before: Callable[[int], None] = lambda k: None


def measure_layers(server: Any, fs: Any, keys: list[str], payloads: list[bytes], src: str, disk_store: str,
                   conc: int, zconc: int, repeat: int, with_obstore: bool) -> tuple[list[Row], list[str]]:
    """The storage layers' rows (module docstring) and a conclusion line per pair."""
    import psutil
    import zarr

    weed = psutil.Process(server.proc.pid)

    def metered(r: Row, fn: Callable[[int], Any]) -> Callable[[int], Any]:
        """``fn`` recording the CPU seconds this process and the server spent in it."""
        def run(k: int) -> Any:
            c0, s0 = time.process_time(), sum(weed.cpu_times()[:2])
            out = fn(k)
            r.cpu.append((time.process_time() - c0, sum(weed.cpu_times()[:2]) - s0))
            return out
        return run

    layers = ["s3fs", "obstore"] if with_obstore else ["s3fs"]
    nbytes = sum(map(len, payloads))
    want = dict(zip(keys, payloads))
    src_prefix = src.removeprefix(f"s3://{BUCKET}/")
    fs.invalidate_cache()
    stored = fs.du(src[5:])
    groups, arrays = zarr_nodes(zarr.open_group(store=zarr_store("s3fs", server, src_prefix, True), mode="r"))
    group_attrs = {p: g.attrs.asdict() for p, g in groups.items()}
    specs = {p: array_spec(a) for p, a in arrays.items()}
    metadata = {p: a.metadata.to_dict() for p, a in arrays.items()}
    ref = read_arrays(disk_store, conc)  # the disk->disk store: what every read must equal
    voxels = sum(v.nbytes for v in ref.values())
    # every read decodes into these arrays, made once: on this VM, touching new memory cost
    # ~8 ms per MB (module docstring), more than the reads themselves
    dest = {p: np.empty_like(v) for p, v in ref.items()}

    getters: dict[str, Callable[[str], Any]] = {"s3fs": fs.cat_file}
    putters: dict[str, Callable[[str, bytes], Any]] = {"s3fs": lambda key, b: fs.pipe_file(f"{BUCKET}/{key}", b)}
    if with_obstore:
        import obstore

        ostore = obstore_s3(server)
        getters["obstore"] = lambda key: obstore.get(ostore, key.split("/", 1)[1]).bytes()
        putters["obstore"] = lambda key, b: obstore.put(ostore, key, b, use_multipart=False)
        putters["obstore-mp"] = lambda key, b: obstore.put(ostore, key, b)
    for layer in layers:  # untimed warm-up: imports, the s3fs session on zarr's loop, obstore's client, dest's pages
        poison(dest, ref)
        read_into(zarr_store(layer, server, src_prefix, True), dest, conc)
        getters[layer](keys[0])

    def row(run: str, layer: str, size: int, get: int = 0, put: int = 0, rate_of: str = "") -> Row:
        r = Row(run, size, get=get, put=put, layer=layer, stat=statistics.median)
        r.rate_of = rate_of
        return r

    def raw_get(layer: str) -> Step:  # each object compared as it arrives (in the time: memcmp), none kept
        return Step(row(f"{layer} raw GET x{conc}", layer, nbytes, get=nbytes, rate_of="get"),
                    lambda k: in_parallel(lambda key: getters[layer](key) == want[key], keys, conc),
                    lambda k, same: "ok" if all(same) else f"FAIL {same.count(False)} objects differ")

    def raw_put(layer: str, putter: str, run: str) -> Step:
        prefix = lambda k: f"layers/raw-put-{putter}-{k}"  # noqa: E731

        def check(k: int, _: Any) -> str:
            bad = sum(fs.cat_file(f"{BUCKET}/{prefix(k)}/{i:04d}") != b for i, b in enumerate(payloads))
            fs.rm(f"{BUCKET}/{prefix(k)}", recursive=True)
            return f"FAIL {bad} objects differ" if bad else "ok"

        def run_k(k: int) -> list:
            return in_parallel(lambda ib: putters[putter](f"{prefix(k)}/{ib[0]:04d}", ib[1]), list(enumerate(payloads)), conc)

        return Step(row(run, layer, nbytes, put=nbytes, rate_of="put" if putter == layer else ""), run_k, check)

    def read(layer: str) -> Step:
        r = row(f"zarr read {LAYERS[layer]}", layer, voxels, get=stored)
        opens: list[float] = []

        def check(k: int, result: tuple[set[str], float]) -> str:
            opens.append(result[1])
            r.note = f" (open {statistics.median(opens):.2f} s)"
            return same_arrays(result[0], dest, ref)

        return Step(r, lambda k: read_into(zarr_store(layer, server, src_prefix, True), dest, conc), check,
                    lambda k: poison(dest, ref))

    def write(layer: str) -> Step:
        r = row(f"zarr write {LAYERS[layer]}", layer, voxels)
        prefix = lambda k: f"layers/{layer}-{k}.zarr"  # noqa: E731

        def check(k: int, _: Any) -> str:
            fs.invalidate_cache()
            r.put = fs.du(f"{BUCKET}/{prefix(k)}")
            back = zarr_store(layer, server, prefix(k), True)
            written = zarr_nodes(zarr.open_group(store=back, mode="r"))[1]
            bad = [p for p in metadata if p not in written or written[p].metadata.to_dict() != metadata[p]]
            poison(dest, ref)
            out = f"FAIL metadata of {bad[0]}" if bad else same_arrays(read_into(back, dest, conc)[0], dest, ref)
            fs.rm(f"{BUCKET}/{prefix(k)}", recursive=True)
            fs.invalidate_cache()
            return out

        return Step(r, lambda k: write_arrays(zarr_store(layer, server, prefix(k), False), group_attrs, specs, ref, conc), check)

    pairs = [("raw GET", [raw_get(x) for x in layers]), ("raw PUT", [raw_put(x, x, f"{x} raw PUT x{conc}") for x in layers])]
    if with_obstore:
        pairs.append(("(info)", [raw_put("obstore", "obstore-mp", f"obstore raw PUT x{conc} multipart (info)")]))
    pairs += [("zarr read", [read(x) for x in layers]), ("zarr write", [write(x) for x in layers])]
    with zarr.config.set({"async.concurrency": zconc}):
        for k in range(repeat):
            say(f"  storage layers, round {k + 1} of {repeat} ...")
            for _, steps in pairs:
                for step in (steps if k % 2 == 0 else steps[::-1]):
                    r = step.row
                    if r.error or not r.once(metered(r, step.run), k, step.before):
                        continue
                    try:
                        verdict = step.check(k, r.result)
                    except Exception as e:  # noqa: BLE001 - the check's own failure is a failed check
                        verdict = f"FAIL check: {type(e).__name__}: {e}"
                    r.result = None
                    if not r.failed():
                        r.check = verdict
    rows = [s.row for _, steps in pairs for s in steps]
    return rows, [conclude(name, *(s.row for s in steps)) for name, steps in pairs if len(steps) == 2]


def conclude(what: str, a: Row, b: Row) -> str:
    """Which of two layers' rows is faster: the ratio of the medians and of each round's times."""
    if a.seconds is None or b.seconds is None:
        return f"{what:<10}: no comparison ({a.run}: {a.check or '-'}, {b.run}: {b.check or '-'})"
    fast, slow = sorted((a, b), key=lambda r: r.seconds)
    per_round = [s / f for f, s in zip(fast.samples, slow.samples)]
    label = (lambda r: f"{LAYERS[r.layer]} ({r.layer})") if what.startswith("zarr") else (lambda r: r.layer)
    return (f"{what:<10}: {label(fast)} {slow.seconds / fast.seconds:.2f}x faster than {label(slow)} (median "
            f"{fast.seconds:.2f} s vs {slow.seconds:.2f} s; per round {min(per_round):.2f}-{max(per_round):.2f}x)")


def layer_rates(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Each layer's raw GET and PUT rates (bytes/s of the median times) from its raw rows."""
    rates: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.rate_of and r.seconds:
            rates.setdefault(r.layer, {})[r.rate_of] = r.nbytes / r.seconds
    return rates


def x_raw(r: Row, rate: dict[str, float]) -> float | None:
    """seconds / (GET bytes / GET rate + PUT bytes / PUT rate); None without the rates needed."""
    moved = {"get": r.get, "put": r.put}
    if r.seconds is None or any(n and kind not in rate for kind, n in moved.items()):
        return None
    return r.seconds / sum(n / rate[kind] for kind, n in moved.items() if n)


def layer_table(rows: list[Row], rates: dict[str, dict[str, float]]) -> list[str]:
    """The storage layers' rows; a raw row that sets its layer's rate has no ``x raw`` (1 by
    definition), s3fs's none against s3fs either."""
    lines = [f"{'run':<38}{'MB':>8}{'S3 MB':>8}{'s':>8}{'MB/s':>8}{'x raw':>8}{'x s3fs':>8}{'CPU s':>12}  check"]
    for r in rows:
        if r.seconds is None:
            lines.append(f"{r.run:<38}{r.nbytes / MB:>8.0f}{'':>8}{'-':>8}{'-':>8}{'':>8}{'':>8}{'':>12}  {r.check}")
            continue
        cpu = "+".join(f"{statistics.median(c):.2f}" for c in zip(*r.cpu))
        r.x_raw = None if r.rate_of else x_raw(r, rates.get(r.layer, {}))
        r.x_s3fs = None if r.rate_of and r.layer == "s3fs" else x_raw(r, rates.get("s3fs", {}))
        cells = "".join(f"{x:>7.2f}x" if x else f"{'':>8}" for x in (r.x_raw, r.x_s3fs))
        moved = f"{(r.get + r.put) / MB:.0f}" if r.run.startswith("zarr") else ""
        lines.append(f"{r.run:<38}{r.nbytes / MB:>8.0f}{moved:>8}{r.seconds:>8.2f}{r.nbytes / MB / r.seconds:>8.0f}{cells}"
                     f"{cpu:>12}  {r.check}{r.note}")
    return lines


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
    ap.add_argument("--repeat", type=int, default=2, help="best of N for the volnorm rows, median of N rounds for the storage layers'")
    ap.add_argument("--concurrency", type=int, default=0, help="raw requests in flight (default: usable CPUs)")
    ap.add_argument("--wide", type=int, default=8, help="one more raw GET at this concurrency (0: skip)")
    ap.add_argument("--zarr-concurrency", type=int, default=0,
                    help="zarr's async.concurrency for the storage layers' rows (default: --concurrency)")
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
    zconc = args.zarr_concurrency or conc
    try:
        import obstore
        no_obstore = ""
    except ImportError as e:
        obstore, no_obstore = None, f"obstore rows skipped: obstore is not importable ({e}); pip install obstore"
    s3dir = args.workdir / "s3"
    server = S3Server(s3dir)
    load0 = os.getloadavg()
    host = {"cores": os.cpu_count(), "ram": psutil.virtual_memory().total, "platform": platform.platform()}
    versions = {"volnorm": vn.__version__, "zarr": zarr.__version__, "s3fs": s3fs.__version__,
                "fsspec": fsspec.__version__, "obstore": obstore.__version__ if obstore else None,
                "weed": (sh(server.weed, "version").splitlines() or ["?"])[0], "python": platform.python_version()}
    src = Path(vn.__file__).resolve().parent.parent
    head = sh("git", "-C", str(src), "rev-parse", "--short", "HEAD")
    dirty = head and sh("git", "-C", str(src), "status", "--porcelain", "volnorm")
    commit = f"{src}: " + (f"{head}{' (volnorm/ modified)' if dirty else ''}" if head else "not a git checkout")
    say(f"host    : {host['cores']} cores, {host['ram'] / 2**30:.1f} GiB RAM, {host['platform']}")
    say(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}; volnorm at {commit}")
    say(f"load    : {' '.join(f'{x:.2f}' for x in load0)} (1, 5, 15 min) at start")
    if no_obstore:
        say(no_obstore)

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
        by_name = {f.name: f for f in files}
        payloads = [by_name[Path(k).name].read_bytes() for k in keys]  # kept for the storage layers' rows
        put_s = raw_put(fs, payloads, conc, args.repeat)
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
        converted = {r.run: r for r in rows if r.run in ("convert disk->disk", "convert s3->s3")}
        if len(converted) == 2 and not any(r.error for r in converted.values()):
            layer_rows, conclusions = measure_layers(server, fs, keys, payloads, stores["s3"], stores["disk"], conc, zconc,
                                                     args.repeat, obstore is not None)
        else:
            layer_rows, conclusions = [], ["storage layers skipped: they read the convert s3->s3 store and compare with disk->disk's"]
        del payloads
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
    say()
    layer_rate = layer_rates(layer_rows)
    say(f"layers  : zarr {versions['zarr']} FsspecStore (s3fs {versions['s3fs']}) against ObjectStore ("
        f"{'obstore ' + versions['obstore'] if obstore else 'skipped'}); {conc} threads, one array each at a time; "
        f"zarr async.concurrency {zconc}; median of {args.repeat} rounds, the two layers of a pair back to back")
    say("raw     : " + "; ".join(f"{layer} GET {rate.get('get', math.nan) / MB:.0f} MB/s, PUT {rate.get('put', math.nan) / MB:.0f} MB/s"
                                  for layer, rate in layer_rate.items()) + f" (x{conc}, medians)")
    for line in layer_table(layer_rows, layer_rate) + conclusions + ([no_obstore] if no_obstore else []):
        say(line)
    rows_all = rows + layer_rows
    errors = [r for r in rows_all if r.error]
    for r in errors:
        say(f"\n{r.run}: {r.error}\n  " + "\n  ".join(getattr(r, "tail", [])))
    if args.json:
        out = {"host": host, "versions": versions, "commit": commit, "files": n, "shape": shape, "voxel_bytes": vox,
               "file_bytes": fbytes, "concurrency": conc, "threads": usable_cpus(), "load_start": load0, "load_end": load1,
               "rates": rates, "zarr_concurrency": zconc, "layer_rates": layer_rate, "conclusions": conclusions,
               "rows": [{"run": r.run, "layer": r.layer, "bytes": r.nbytes, "seconds": r.seconds, "samples": r.samples, "cpu": r.cpu,
                         "get_bytes": r.get, "put_bytes": r.put, "x_raw": getattr(r, "x_raw", None),
                         "x_s3fs": getattr(r, "x_s3fs", None), "x_disk": getattr(r, "x_disk", None),
                         "check": r.check + r.note, "error": r.error, "traceback": getattr(r, "tail", None)} for r in rows_all]}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 1 if errors or any(r.check.startswith("FAIL") for r in rows_all) else 0


if __name__ == "__main__":
    sys.exit(main())

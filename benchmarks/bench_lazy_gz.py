"""Lazy reads of a .nii.gz: which random-access gzip reader volnorm should use.

Compares indexed_gzip (what ``open_nifti`` uses for the ranged reads of a .nii.gz over
its whole-read bound), a streaming reader whose backward seeks rewind (ISA-L, Python's
gzip) in file order, reverse order, and through ``open_nifti(...).max()`` in the order
dask's scheduler picks, with peak RSS growth; and ``open_nifti``'s default for volumes up
to the bound (1 GiB): one task that decompresses the whole file through ISA-L, the
chunks cut from it. One core, page cache as it is (the file was just written). Result on
2026-11-22: a checkpointed zlib reader of our own was 1.7x faster in file order but 15%
slower in dask's order than indexed_gzip, so it was not kept. Since 2026-12: the whole-file
task (see ``bench_histogram.py`` rows f for it against ISA-L's decompression).

    PYTHONPATH=. python benchmarks/bench_lazy_gz.py [--shape 384 384 384] [--chunk-mib 8]
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import threading
import time
from pathlib import Path



def _peak_rss_during(fn):
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, (peak[0] - base) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[384, 384, 384])
    ap.add_argument("--chunk-mib", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import volnorm as vn
    from volnorm.io import readers

    work = Path(args.workdir or tempfile.mkdtemp(prefix="volnorm-lazygz-"))
    files = sorted(work.glob("sub-*.nii.gz")) or vn.datasets.make_cohort(
        work, 1, shape=tuple(args.shape), compressed=True, seed=0
    )
    path = files[0]
    whole = vn.open_nifti(path, chunks=args.chunk_mib)
    bound = readers.WHOLE_READ_MAX
    readers.WHOLE_READ_MAX = 0  # the ranged reads, through the readers below
    try:
        stack = vn.open_nifti(path, chunks=args.chunk_mib)
    finally:
        readers.WHOLE_READ_MAX = bound
    info = vn.read_info(path)
    total = info.data_bytes
    nslab = len(stack.chunks[1])
    slab = total // nslab

    def readers():
        import indexed_gzip
        from isal import igzip

        yield "indexed_gzip (over the bound)", lambda: indexed_gzip.IndexedGzipFile(str(path), spacing=4 * 2**20)
        yield "isal stream (seek = rewind)", lambda: igzip.open(path, "rb")
        yield "python gzip (seek = rewind)", lambda: gzip.open(path, "rb")

    orders = {
        "file order": list(range(nslab)),
        "reverse order": list(reversed(range(nslab))),
    }
    print(f"file {path.name}: {total / 2**20:.0f} MiB of voxels, {path.stat().st_size / 2**20:.0f} MiB gzip, {nslab} slabs of ~{slab / 2**20:.1f} MiB")
    print(f"{'reader':<30} {'order':<15} {'MB/s':>8}")
    for name, make in readers():
        for oname, order in orders.items():
            f = make()
            t0 = time.perf_counter()
            for i in order:
                f.seek(info.offset + i * slab)
                f.read(slab)
            dt = time.perf_counter() - t0
            f.close()
            print(f"{name:<30} {oname:<15} {total / dt / 1e6:8.0f}")
    # the dask reduction through open_nifti, with each seekable reader behind volnorm's view
    import volnorm.io.nifti as nifti

    ours = nifti._gz_handle
    for name, make in readers():
        if name.startswith("python gzip"):
            continue
        cache: dict = {}

        def handle(p, size, mtime, _make=make, _cache=cache):
            if p not in _cache:
                _cache[p] = (_make(), threading.Lock())
            return _cache[p]

        nifti._gz_handle = handle
        try:
            (m, grow) = _peak_rss_during(lambda: (time.perf_counter(), stack.max().compute(scheduler="sync"), time.perf_counter()))
        finally:
            nifti._gz_handle = ours
        print(f"{name:<30} {'dask x.max()':<15} {total / (m[2] - m[0]) / 1e6:8.0f}   peak RSS growth {grow:.0f} MiB")
    (m, grow) = _peak_rss_during(lambda: (time.perf_counter(), whole.max().compute(scheduler="sync"), time.perf_counter()))
    print(f"{'whole-file task (default)':<30} {'dask x.max()':<15} {total / (m[2] - m[0]) / 1e6:8.0f}   peak RSS growth {grow:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

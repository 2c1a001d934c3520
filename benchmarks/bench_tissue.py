#!/usr/bin/env python
"""Benchmark volnorm's WhiteStripe and KDE fits against intensity-normalization 3.x's.

The case: a cohort of T1 phantoms (``volnorm.datasets.make_cohort``: int16 brain phantoms with
tissue classes, ``--shape``, ``--n`` subjects, uncompressed .nii), each fitted with WhiteStripe
and the KDE tissue mode, modality T1, no mask (foreground = voxels > 0), the references'
defaults. Timed in the same run:

- volnorm: ``vn.fit_whitestripe(stack)`` and ``vn.fit_kde(stack)`` on ``vn.open_nifti(files)``
  (lazy, one exact per-volume histogram pass each), on dask's threaded scheduler in this
  process, after an untimed fit of the first volume (imports, numba's kernels); the files are
  in the page cache for both (made just before);
- the reference: for each file, ``nibabel.load(f).get_fdata()`` and
  ``WhiteStripeNormalizer().fit`` / ``KDENormalizer().fit`` (one volume in memory at a time, as
  its command line does).

Each row checks volnorm's fitted values against the reference's (mean, std, mode: the largest
relative difference over the volumes). Peak memory: this process's RSS above its level before
the row, sampled every 20 ms.

    PYTHONPATH=. python benchmarks/bench_tissue.py              # 12 phantoms of 128x128x96
    PYTHONPATH=. python benchmarks/bench_tissue.py --n 40 --shape 192 192 144
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil


class Peak:
    """This process's RSS above its level at entry, sampled every 20 ms."""

    def __enter__(self) -> Peak:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12, help="phantoms (default 12)")
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), help="x y z (default 128 128 96)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the phantoms go (default: a temporary folder)")
    args = ap.parse_args()

    import dask
    import intensity_normalization
    import nibabel as nib
    from intensity_normalization.adapters.images import NumpyImageAdapter
    from intensity_normalization.normalizers.individual.kde import KDENormalizer
    from intensity_normalization.normalizers.individual.whitestripe import WhiteStripeNormalizer

    import volnorm as vn
    from volnorm.transforms.tissue import fit_kde, fit_whitestripe

    work = Path(args.workdir or tempfile.mkdtemp(prefix="volnorm-bench-tissue-"))
    try:
        t0 = time.perf_counter()
        files = vn.datasets.make_cohort(work, n_subjects=args.n, shape=tuple(args.shape), seed=3)
        t_make = time.perf_counter() - t0
        nbytes = sum(int(np.prod(args.shape)) * 2 for _ in files)
        stack = vn.open_nifti(files)
        rows = []
        with dask.config.set(scheduler="threads"):
            fit_whitestripe(stack.isel(volume=[0]))  # untimed: numba's kernels loaded, imports done
            for name, fit in (("whitestripe", fit_whitestripe), ("kde", fit_kde)):
                with Peak() as pk:
                    t = time.perf_counter()
                    p = fit(stack, modality="t1")
                    wall = time.perf_counter() - t
                rows.append((name, "volnorm", wall, pk.mib, p))
        ref = {"whitestripe": [], "kde": []}
        for name, cls in (("whitestripe", WhiteStripeNormalizer), ("kde", KDENormalizer)):
            with Peak() as pk:
                t = time.perf_counter()
                for f in files:
                    img = NumpyImageAdapter(np.asarray(nib.load(f).get_fdata(), dtype=np.float64))
                    ref[name].append(cls().fit(img))
                wall = time.perf_counter() - t
            rows.append((name, "intensity-normalization", wall, pk.mib, None))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def worst(name: str, p) -> str:
        if name == "whitestripe":
            d = max(max(abs(float(p.values["mean"][i]) - r.mean) / abs(r.mean), abs(float(p.values["std"][i]) - r.std) / r.std)
                    for i, r in enumerate(ref[name]))
            what = "mean, std"
        else:
            d = max(abs(float(p.values["mode"][i]) - r.tissue_mode) / abs(r.tissue_mode) for i, r in enumerate(ref[name]))
            what = "mode"
        return f"{what} max rel diff {d:.1e} ({'ok' if d < 1e-6 else 'MISS'}: <= 1e-6)"

    print("=" * 118)
    print("volnorm tissue-based normalization fits against intensity-normalization (same run, same files)")
    print(f"  host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
          f"python {platform.python_version()}")
    print(f"  volnorm {vn.__version__}, intensity-normalization {getattr(intensity_normalization, '__version__', '?')}, numpy {np.__version__}, "
          f"dask {dask.__version__}")
    print(f"  data: {args.n} int16 T1 phantoms {tuple(args.shape)} (make_cohort, made in {t_make:.1f} s), {nbytes / 1e9:.2f} GB of voxels; "
          f"modality t1, no mask; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("-" * 118)
    print(f"{'method':12} {'who':26} {'wall s':>8} {'vol/s':>8} {'GB/s':>7} {'vs ref':>8} {'peak MiB':>9}  check")
    walls = {(n, w): wall for n, w, wall, _, _ in rows}
    for name, who, wall, mib, p in rows:
        vs = walls[(name, "intensity-normalization")] / wall if who == "volnorm" else 1.0
        check = worst(name, p) if p is not None else "(reference)"
        print(f"{name:12} {who:26} {wall:8.2f} {args.n / wall:8.2f} {nbytes / 1e9 / wall:7.2f} {vs:7.1f}x {mib:9.0f}  {check}")
    print("-" * 118)
    print("note: vs ref = how many times faster than the reference's per-file loop; peak = RSS above the level before the row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

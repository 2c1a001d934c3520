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

FCM and LSQ need a brain mask: each volume's Otsu threshold (``vn.threshold(stack, "otsu",
dim=("z", "y", "x"))``, computed once, untimed) gives both sides the same masks. FCM: volnorm's
``vn.fit_fcm(stack, mask=m)`` against ``FCMNormalizer().fit(img, mask)`` per file; LSQ:
``vn.fit_lsq(stack, mask=m)`` against ``LSQNormalizer().fit_population`` and, per file, its
tissue means and least-squares scale (the reference's ``transform`` computes them with
``float()`` of a 1x1 array, which NumPy 2 refuses: the same formula with ``.item()``).

Each row checks volnorm's fitted values against the reference's (mean, std, mode, the FCM
white-matter mean, the LSQ scale: the largest relative difference over the volumes). The
reference's fuzzy c-means starts from unseeded random memberships and stops at 50 steps, before
full convergence on some volumes: run to run, its white-matter mean moves by 1e-5 to 6e-4
relative on these phantoms, its LSQ scales more. So the reference runs here started as volnorm
starts (skfuzzy's ``cmeans`` given ``init=``: each voxel its value's column of
``volnorm.transforms.tissue.initial_memberships``, which costs it one ``np.unique`` of the
masked voxels per clustering, under 1 % of its time), and FCM and LSQ are checked to 1e-6. Peak
memory: this process's RSS above its level before the row, sampled every 20 ms.

The population rows (``--population 50 200``): LSQ on that many small phantoms (``--pop-shape``,
default 64^3, brain masks written as NIfTI files beside them), each size and side in a fresh
process (so one row's freed memory cannot hide the next one's), fit and apply of every volume:

- volnorm: ``vn.fit_lsq(stack, mask=masks)`` then ``vn.lsq(stack, params=p)``, every output
  voxel computed (reduced to each volume's mean, none kept), threaded scheduler;
- the reference, as its command line runs a population method: every image and mask loaded
  (``load_image``), ``fit_population``, then each image normalized, the outputs kept in a list
  until they are saved (not saved here).

    PYTHONPATH=. python benchmarks/bench_tissue.py              # 12 phantoms of 128x128x96; LSQ on 50 and 200 of 64^3
    PYTHONPATH=. python benchmarks/bench_tissue.py --n 40 --shape 192 192 144 --population 100 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
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


def _fixed_scale(self, t: np.ndarray) -> float:
    """intensity-normalization 3.0.1's ``_calculate_scaling_factor`` with ``.item()`` for its
    ``float()`` of 1x1 arrays (NumPy 2 refuses those)."""
    return (t.T @ t).item() / (t.T @ self._standard_tissue_means).item()


def seed_reference() -> None:
    """intensity-normalization's FCM and LSQ normalizers started as volnorm starts (their own
    start is unseeded random), and LSQ's scale with ``.item()`` (:func:`_fixed_scale`)."""
    import skfuzzy
    from intensity_normalization.normalizers.individual import fcm
    from intensity_normalization.normalizers.population import lsq

    from volnorm.transforms.tissue import initial_memberships

    def cmeans(data, c, m, error, maxiter):
        values, inverse = np.unique(data.ravel(), return_inverse=True)
        return skfuzzy.cmeans(data, c, m, error=error, maxiter=maxiter, init=initial_memberships(len(values), 0)[:, inverse])

    fcm.cmeans = lsq.cmeans = cmeans
    lsq.LSQNormalizer._calculate_scaling_factor = _fixed_scale


def population_child(who: str, n: int, folder: Path) -> dict:
    """One population row in this (fresh) process: LSQ fit and apply on the first ``n`` phantoms
    of ``folder`` (``img-*.nii`` and their ``mask-*.nii``)."""
    files = sorted(folder.glob("img-*.nii"))[:n]
    mask_files = [f.with_name(f.name.replace("img-", "mask-")) for f in files]
    if who == "volnorm":
        import dask

        import volnorm as vn

        stack, masks = vn.open_nifti(files), vn.open_nifti(mask_files) > 0
        with dask.config.set(scheduler="threads"):
            vn.fit_lsq(stack.isel(volume=[0]), mask=masks.isel(volume=[0]))  # untimed: imports, numba's kernels
            with Peak() as pk:
                t = time.perf_counter()
                p = vn.fit_lsq(stack, mask=masks)
                t_fit = time.perf_counter() - t
                means = vn.lsq(stack, params=p).mean(("z", "y", "x")).values
                wall = time.perf_counter() - t
        scales = p.values["scale"].values.tolist()
    else:
        from intensity_normalization.adapters.io import load_image
        from intensity_normalization.normalizers.population.lsq import LSQNormalizer

        seed_reference()
        with Peak() as pk:
            t = time.perf_counter()
            images, masks = [load_image(f) for f in files], [load_image(f) for f in mask_files]
            ref = LSQNormalizer().fit_population(images, masks)
            t_fit = time.perf_counter() - t
            outputs, scales = [], []
            for img, m in zip(images, masks):
                outputs.append(ref.transform(img, m).get_data())  # kept until saved, as its command line does
                scales.append(float(img.get_data().sum() / outputs[-1].sum()))  # what it divided by
            means = [float(o.mean()) for o in outputs]
            wall = time.perf_counter() - t
    return {"who": who, "n": n, "wall": wall, "fit": t_fit, "peak_mib": pk.mib, "maxrss_mib": pk.peak / 2**20,
            "scales": scales, "means": [float(m) for m in means]}


def population(sizes: list[int], shape: tuple[int, int, int], work: Path) -> list[dict]:
    """Make ``max(sizes)`` phantoms and their Otsu brain masks, then run each row in a child."""
    import nibabel as nib

    import volnorm as vn

    folder = work / "population"
    folder.mkdir()
    files = vn.datasets.make_cohort(folder, n_subjects=max(sizes), shape=shape, seed=5, prefix="img-")
    stack = vn.open_nifti(files)
    thr = vn.threshold(stack, "otsu", dim=("z", "y", "x")).values
    for f, t in zip(files, thr):
        img = nib.load(f)
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > t).astype(np.uint8), img.affine), f.with_name(f.name.replace("img-", "mask-")))
    rows = []
    for who in ("volnorm", "intensity-normalization"):
        for n in sizes:
            out = subprocess.run([sys.executable, __file__, "--child", who, str(n), str(folder)], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=12, help="phantoms (default 12)")
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 128, 96), help="x y z (default 128 128 96)")
    ap.add_argument("--population", type=int, nargs="*", default=[50, 200], help="LSQ cohort sizes (default 50 200; none: skip)")
    ap.add_argument("--pop-shape", type=int, nargs=3, default=(64, 64, 64), help="their phantoms' shape (default 64 64 64)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the phantoms go (default: a temporary folder)")
    ap.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(population_child(args.child[0], int(args.child[1]), Path(args.child[2]))))
        return 0

    import dask
    import intensity_normalization
    import nibabel as nib
    from intensity_normalization.adapters.images import NumpyImageAdapter
    from intensity_normalization.normalizers.individual.fcm import FCMNormalizer
    from intensity_normalization.normalizers.individual.kde import KDENormalizer
    from intensity_normalization.normalizers.individual.whitestripe import WhiteStripeNormalizer
    from intensity_normalization.normalizers.population.lsq import LSQNormalizer

    import volnorm as vn
    from volnorm.transforms.tissue import fit_kde, fit_whitestripe

    seed_reference()

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
            thr = vn.threshold(stack, "otsu", dim=("z", "y", "x"))  # untimed: the brain masks of FCM and LSQ
            masks = stack > thr
            for name, fit in (("fcm", vn.fit_fcm), ("lsq", vn.fit_lsq)):
                with Peak() as pk:
                    t = time.perf_counter()
                    p = fit(stack, mask=masks)
                    wall = time.perf_counter() - t
                rows.append((name, "volnorm", wall, pk.mib, p))
        ref: dict[str, list] = {"whitestripe": [], "kde": [], "fcm": [], "lsq": []}
        for name, cls in (("whitestripe", WhiteStripeNormalizer), ("kde", KDENormalizer)):
            with Peak() as pk:
                t = time.perf_counter()
                for f in files:
                    img = NumpyImageAdapter(np.asarray(nib.load(f).get_fdata(), dtype=np.float64))
                    ref[name].append(cls().fit(img))
                wall = time.perf_counter() - t
            rows.append((name, "intensity-normalization", wall, pk.mib, None))
        with Peak() as pk:
            t = time.perf_counter()
            for f, th in zip(files, thr.values):
                data = np.asarray(nib.load(f).get_fdata(), dtype=np.float64)
                n = FCMNormalizer().fit(NumpyImageAdapter(data), NumpyImageAdapter(data > th))
                ref["fcm"].append(float(np.average(data, weights=n.tissue_membership)))  # what it divides by
            wall = time.perf_counter() - t
        rows.append(("fcm", "intensity-normalization", wall, pk.mib, None))
        with Peak() as pk:  # its fit_population takes every image (its command line loads them all)
            t = time.perf_counter()
            images = [NumpyImageAdapter(np.asarray(nib.load(f).get_fdata(), dtype=np.float64)) for f in files]
            mimages = [NumpyImageAdapter(i.get_data() > th) for i, th in zip(images, thr.values)]
            lsq = LSQNormalizer().fit_population(images, mimages)
            for img, m in zip(images, mimages):
                ref["lsq"].append(_fixed_scale(lsq, lsq._get_tissue_means(img.get_data(), lsq._get_tissue_membership(img, m))))
            wall = time.perf_counter() - t
        rows.append(("lsq", "intensity-normalization", wall, pk.mib, None))
        pop = population(args.population, tuple(args.pop_shape), work) if args.population else []
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    def worst(name: str, p) -> str:
        target = 1e-6
        if name == "whitestripe":
            d = max(max(abs(float(p.values["mean"][i]) - r.mean) / abs(r.mean), abs(float(p.values["std"][i]) - r.std) / r.std)
                    for i, r in enumerate(ref[name]))
            what = "mean, std"
        elif name == "kde":
            d = max(abs(float(p.values["mode"][i]) - r.tissue_mode) / abs(r.tissue_mode) for i, r in enumerate(ref[name]))
            what = "mode"
        else:
            key, what = ("mean", "WM mean") if name == "fcm" else ("scale", "scale")
            d = max(abs(float(p.values[key][i]) - r) / abs(r) for i, r in enumerate(ref[name]))
        return f"{what} max rel diff {d:.1e} ({'ok' if d < target else 'MISS'}: <= {target:g})"

    print("=" * 118)
    print("volnorm tissue-based normalization fits against intensity-normalization (same run, same files)")
    print(f"  host: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
          f"python {platform.python_version()}")
    print(f"  volnorm {vn.__version__}, intensity-normalization {getattr(intensity_normalization, '__version__', '?')}, numpy {np.__version__}, "
          f"dask {dask.__version__}")
    print(f"  data: {args.n} int16 T1 phantoms {tuple(args.shape)} (make_cohort, made in {t_make:.1f} s), {nbytes / 1e9:.2f} GB of voxels; "
          f"modality t1; whitestripe/kde without a mask, fcm/lsq inside each volume's Otsu mask; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("-" * 118)
    print(f"{'method':12} {'who':26} {'wall s':>8} {'vol/s':>8} {'GB/s':>7} {'vs ref':>8} {'peak MiB':>9}  check")
    walls = {(n, w): wall for n, w, wall, _, _ in rows}
    for name, who, wall, mib, p in rows:
        vs = walls[(name, "intensity-normalization")] / wall if who == "volnorm" else 1.0
        check = worst(name, p) if p is not None else "(reference)"
        print(f"{name:12} {who:26} {wall:8.2f} {args.n / wall:8.2f} {nbytes / 1e9 / wall:7.2f} {vs:7.1f}x {mib:9.0f}  {check}")
    print("-" * 118)
    print("note: vs ref = how many times faster than the reference's per-file loop; peak = RSS above the level before the row")
    if pop:
        print("=" * 118)
        print(f"LSQ over a population: {'/'.join(map(str, args.population))} int16 phantoms {tuple(args.pop_shape)} with Otsu brain masks "
              "(NIfTI files), fit + apply of every volume, each row in a fresh process")
        print("-" * 118)
        print(f"{'volumes':>7} {'who':26} {'fit s':>7} {'wall s':>8} {'vol/s':>7} {'vs ref':>7} {'peak MiB':>9} {'max RSS':>8}  check")
        refs = {r["n"]: r for r in pop if r["who"] != "volnorm"}
        for r in pop:
            vs = refs[r["n"]]["wall"] / r["wall"]
            if r["who"] == "volnorm":
                d = max(abs(a - b) / abs(b) for a, b in zip(r["scales"], refs[r["n"]]["scales"]))
                check = f"scale max rel diff {d:.1e} ({'ok' if d < 1e-6 else 'MISS'}: <= 1e-6)"
            else:
                check = "(reference)"
            print(f"{r['n']:7d} {r['who']:26} {r['fit']:7.2f} {r['wall']:8.2f} {r['n'] / r['wall']:7.2f} {vs:6.1f}x {r['peak_mib']:9.0f} "
                  f"{r['maxrss_mib']:8.0f}  {check}")
        print("-" * 118)
        for who in ("volnorm", "intensity-normalization"):
            mine = sorted((r for r in pop if r["who"] == who), key=lambda r: r["n"])
            if len(mine) > 1:
                print(f"{who}: peak {mine[-1]['peak_mib']:.0f} MiB for {mine[-1]['n']} volumes vs {mine[0]['peak_mib']:.0f} MiB for {mine[0]['n']} "
                      f"({mine[-1]['peak_mib'] / max(mine[0]['peak_mib'], 1):.2f}x for {mine[-1]['n'] / mine[0]['n']:.0f}x the volumes)")
        print("note: peak = the child's RSS above its level before the row (after imports and, for volnorm, a warm-up fit of one volume); "
              "max RSS = the child's RSS at that peak")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

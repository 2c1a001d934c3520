#!/usr/bin/env python
"""Benchmark volnorm on small in-memory image stacks against the per-image loops a user writes
today with OpenCV, Pillow and scikit-image.

The case: a few hundred MB or less already in memory (no store, no cluster), where the
alternative to ``vn.<name>(stack, dim=("y", "x"))`` is ``for im in stack: cv2.<f>(im)``. Every
row times volnorm's call and each peer's loop in the same run, on the same arrays, and checks
volnorm's result against every peer's.

Data (built once, untimed, fixed seeds):

- grey: ``--n`` (default 100) uint8 images of 512x512 (26 MB at 100). Sources: scikit-image's
  ``camera``, ``moon``, ``coins``, ``brick``, ``gravel`` and ``clock``, each resized (bilinear)
  to 4 sizes that cover 512x512 and given 3 identical channels; image i is
  ``bench_color.make_image(GREY_OFFSET + i, those bases)[..., 0]``: bench_color's random crop,
  left-right flip half the time, sensor noise (sigma 1.5 grey levels) and an exposure jitter
  (gain 0.6-1.4, gamma 0.7-1.5), so images differ in content, minimum, maximum and histogram.
- RGB: ``--n`` uint8 images of 512x512x3 (79 MB at 100): ``bench_color.make_image(i)`` on
  bench_color's bases (``astronaut``, ``coffee``, ``chelsea``, resized to 4 sizes), i.e. the
  first ``--n`` images of bench_color.py's store.

volnorm gets the data two ways, each its own column:

- ``np``: the numpy stack itself (``vn.<name>`` takes numpy and returns numpy, dims
  ``("volume", "y", "x")`` by convention);
- ``xr``: ``xr.DataArray(stack, dims=("volume", "y", "x"))`` (RGB: ``(..., "channel")``),
  numpy-backed, the result's ``.values`` taken.

The ``vn.color`` functions take a DataArray only: their ``np`` column tries the numpy stack and
says ``n/a`` when volnorm refuses it (a TypeError), so the column fills in on its own once they
accept numpy. Any other error is printed as ERROR with its message, not hidden.

Rows (the volnorm call; peers; what the check requires - the pairings and tolerances of
tests/test_intensity_references.py, tests/test_color_references.py and the docstrings, where
they give one):

1a. ``vn.equalize(s, dim=("y","x"), out_range="uint8")`` (OpenCV's rule); ``cv2.equalizeHist``
    loop; equal, image for image.
1b. ``vn.equalize(s, dim=("y","x"))`` (float32, scikit-image's rule);
    ``skimage.exposure.equalize_hist`` loop (float64); volnorm == scikit-image's values
    rounded to float32 (its docstring), exactly.
2.  ``vn.rescale(s, dim=("y","x"), out_range="uint8")``; ``cv2.normalize(im, None, 0, 255,
    cv2.NORM_MINMAX)`` loop: equal except where the exact map is a half (OpenCV's float
    arithmetic rounds those up, volnorm half to even), 1 apart at most (the hypothesis test);
    ``skimage.exposure.rescale_intensity(im, out_range=np.uint8)`` loop: scikit-image
    truncates (``astype``) where volnorm rounds, so 0 <= volnorm - scikit-image <= 1.
3.  ``vn.gamma(s, 0.6)`` (uint8, scikit-image's look-up table); ``adjust_gamma`` loop,
    ``cv2.LUT`` loop with that table, numpy ``table[stack]`` (one call, no loop); all equal.
4.  ``vn.log(s)`` (uint8); ``adjust_log`` loop, ``cv2.LUT`` loop with ``adjust_log``'s
    table of 0..255; both equal.
5.  ``vn.color.desaturate(rgb, 0.5)`` (HSV saturation x 0.5 on RGB / 255, hue and value kept,
    rounded to uint8; no test pairs it with a peer); the OpenCV HSV recipe in uint8
    (``cvtColor`` RGB2HSV, S x 0.5 rounded, HSV2RGB) within ``DESAT_TOL_U8`` = 4 levels: its
    hue is stored in 2-degree steps (up to 1 degree off: 255 x 0.5 / 60 = 2.1 levels at
    S = 0.5), S twice rounded to 1/255 (0.75 level), the output rounded (0.5), plus our own
    rounding (0.5); the same recipe in float32 (RGB / 255, H in degrees), rounded at the end,
    within 1 level; ``PIL.ImageEnhance.Color(im).enhance(0.5)`` blends RGB with PIL's grey image, a
    different operation (volnorm's docstring: "not a blend"), so its max difference is shown,
    not checked.
6.  ``vn.color.exposure(rgb)``; a Pillow loop: ``convert("L")`` + ``ImageStat`` (mean,
    stddev), the L histogram (under = L <= 25, over = L >= 230 for volnorm's luma < 0.1 and
    > 0.9) and the perceived brightness from ``ImageStat(rgb).rms``. Pillow's L is luma
    rounded to an integer, so mean and rms_contrast are within 0.5/255 (+1e-6), the
    fractions within the share of pixels whose exact luma is within 0.51 of a cut. Pillow
    cannot give the mean of the per-pixel HSP brightness: its RMS form is
    ``sqrt(mean(P^2)) >= mean(P)``; volnorm's brightness is checked against the per-pixel
    numpy formula (rtol 1e-5, tests/test_color.py) and against <= Pillow's.
7a. ``vn.color.to_grey(rgb)`` (BT.601, float32 0-255); ``cv2.cvtColor(RGB2GRAY)`` loop and
    Pillow ``convert("L")`` loop, both uint8 from fixed-point sums: within 1 level of volnorm
    rounded, and equal for > 99 % of pixels (test_bgr_labelled_channels_equal_opencv; the same
    bound is applied to Pillow).
7c. ``vn.color.to_grey(rgb, dtype="uint8")`` (BT.601 rounded to uint8 in one pass, the
    output cv2 and Pillow give); the same peers and the same check as 7a.
7b. ``vn.color.to_grey(rgb, method=(0.2125, 0.7154, 0.0721))`` (scikit-image's weights;
    volnorm's "rec709" is 0.2126, 0.7152, 0.0722); ``skimage.color.rgb2gray`` loop (float64
    0-1); volnorm / 255 within rtol 1e-6, atol 1e-3 / 255 (the custom-weights test).
8.  ``vn.threshold(s, "otsu", dim=("y","x"))``; ``skimage.filters.threshold_otsu`` loop:
    equal (tests/test_threshold_references.py); ``cv2.threshold(im, 0, 255,
    THRESH_BINARY + THRESH_OTSU)`` loop (its returned threshold): equal.
9.  ``vn.binarize(s, dim=("y","x"))`` (bool); ``im > threshold_otsu(im)`` loop: equal;
    the cv2 Otsu binarization loop (uint8 0/255): ``!= 0`` equal.

Timing: every call runs once untimed first on the first 2 images (imports, numba compilation,
caches), then ``--repeat`` times (default 5) on the whole stack, stopping early once a
measurement has used ``--budget`` s (default 20; at least 1 run): the table shows the **best**
run (the JSON keeps every run). Peers run as users run them: OpenCV with its default threads
(``cv2.getNumThreads()`` in the header), Pillow and scikit-image single-threaded. volnorm runs
with its default engine (no cluster, no ``vn.engine.running`` block). ``vn / best peer``:
volnorm's best time over the fastest peer's (per column); the target is <= 2x (ok / MISS).
img/s = ``--n`` / best time.

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_small.py                # ~2 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_small.py --n 20 --repeat 2 --json /tmp/small.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_color import SCALES, make_image, photo_bases
from bench_histogram import say
from bench_transforms import okmiss

SIDE = 512
GREY_SOURCES = ("camera", "moon", "coins", "brick", "gravel", "clock")
GREY_OFFSET = 100_000  # grey image i uses bench_color's stream GREY_OFFSET + i: not the RGB crops
PER_IMAGE = ("y", "x")
GAMMA = 0.6
DESAT = 0.5
DESAT_TOL_U8 = 4
TARGET = 2.0  # volnorm's time <= 2x the fastest peer's


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def grey_stack(n: int) -> np.ndarray:
    """``n`` uint8 512x512 grey images: bench_color's variations of scikit-image's grey samples."""
    import skimage.data
    import skimage.transform

    bases = []
    for name in GREY_SOURCES:
        src = getattr(skimage.data, name)()
        cover = SIDE / min(src.shape)
        sizes = [(round(src.shape[0] * cover * s), round(src.shape[1] * cover * s)) for s in SCALES]
        resized = [skimage.transform.resize(src, hw, order=1, preserve_range=True, anti_aliasing=False) for hw in sizes]
        bases += [np.repeat(np.clip(np.rint(r), 0, 255).astype(np.uint8)[..., None], 3, axis=-1) for r in resized]
    return np.stack([make_image(GREY_OFFSET + i, bases)[..., 0] for i in range(n)])


def rgb_stack(n: int) -> np.ndarray:
    """The first ``n`` images of bench_color.py's stack (uint8 512x512x3)."""
    bases = photo_bases()
    return np.stack([make_image(i, bases) for i in range(n)])


# ---------------------------------------------------------------------------
# peers: per-image loops as users write them
# ---------------------------------------------------------------------------


def loop(f: Callable[[np.ndarray], Any], stack: np.ndarray) -> list[Any]:
    return [f(im) for im in stack]


def stacked(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A per-image function as a loop over the stack, the results stacked."""
    return lambda stack: np.stack(loop(f, stack))


def gamma_table() -> np.ndarray:
    """scikit-image's uint8 table of ``adjust_gamma`` (``exposure._adjust_gamma_u8``)."""
    return np.minimum(np.rint(255 * np.linspace(0, 1, 256) ** GAMMA), 255).astype(np.uint8)


def log_table() -> np.ndarray:
    from skimage import exposure

    return exposure.adjust_log(np.arange(256, dtype=np.uint8))


def cv2_desaturate_u8(im: np.ndarray) -> np.ndarray:
    import cv2

    hsv = cv2.cvtColor(im, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = np.rint(hsv[..., 1] * DESAT).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def cv2_desaturate_f32(im: np.ndarray) -> np.ndarray:
    import cv2

    hsv = cv2.cvtColor(im.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)
    hsv[..., 1] *= np.float32(DESAT)
    return np.clip(np.rint(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255), 0, 255).astype(np.uint8)


def pil_color(im: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageEnhance

    return np.asarray(ImageEnhance.Color(Image.fromarray(im)).enhance(DESAT))


EXPOSURE_KEYS = ("mean", "rms_contrast", "brightness", "underexposed", "overexposed")


def pil_exposure(im: np.ndarray) -> tuple[float, ...]:
    """volnorm's exposure statistics from Pillow: ImageStat of the L image and its histogram;
    the brightness from the RGB channels' RMS (Pillow has no per-pixel HSP)."""
    from PIL import Image, ImageStat

    rgb = Image.fromarray(im)
    grey = rgb.convert("L")
    st = ImageStat.Stat(grey)
    h = grey.histogram()
    npx = im.shape[0] * im.shape[1]
    r, g, b = ImageStat.Stat(rgb).rms
    bright = np.sqrt(0.241 * r * r + 0.691 * g * g + 0.068 * b * b) / 255
    return st.mean[0] / 255, st.stddev[0] / 255, bright, sum(h[:26]) / npx, sum(h[230:]) / npx


def cv2_otsu_value(im: np.ndarray) -> float:
    import cv2

    return cv2.threshold(im, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]


def cv2_otsu_mask(im: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.threshold(im, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def peers() -> dict[str, dict[str, Callable[[np.ndarray], Any]]]:
    """Each row's peers: name -> a function of the whole stack."""
    import cv2
    from PIL import Image
    from skimage import color, exposure, filters

    glut, llut = gamma_table(), log_table()
    return {
        "1a": {"cv2.equalizeHist": stacked(cv2.equalizeHist)},
        "1b": {"skimage equalize_hist": stacked(exposure.equalize_hist)},
        "2": {"cv2.normalize": stacked(lambda im: cv2.normalize(im, None, 0, 255, cv2.NORM_MINMAX)),
              "skimage rescale_intensity": stacked(lambda im: exposure.rescale_intensity(im, out_range=np.uint8))},
        "3": {"skimage adjust_gamma": stacked(lambda im: exposure.adjust_gamma(im, GAMMA)),
              "cv2.LUT": stacked(lambda im: cv2.LUT(im, glut)),
              "numpy table[stack]": lambda s: glut[s]},
        "4": {"skimage adjust_log": stacked(exposure.adjust_log),
              "cv2.LUT": stacked(lambda im: cv2.LUT(im, llut))},
        "5": {"cv2 HSV uint8": stacked(cv2_desaturate_u8), "cv2 HSV float32": stacked(cv2_desaturate_f32),
              "PIL Enhance.Color": stacked(pil_color)},
        "6": {"PIL ImageStat": lambda s: np.array(loop(pil_exposure, s))},
        "7a": {"cv2.cvtColor": stacked(lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)),
               "PIL convert(L)": stacked(lambda im: np.asarray(Image.fromarray(im).convert("L")))},
        "7c": {"cv2.cvtColor": stacked(lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)),
               "PIL convert(L)": stacked(lambda im: np.asarray(Image.fromarray(im).convert("L")))},
        "7b": {"skimage rgb2gray": stacked(color.rgb2gray)},
        "8": {"cv2.threshold OTSU": lambda s: np.array(loop(cv2_otsu_value, s)),
              "skimage threshold_otsu": lambda s: np.array(loop(filters.threshold_otsu, s))},
        "9": {"cv2 OTSU binarize": stacked(cv2_otsu_mask),
              "skimage im > otsu": stacked(lambda im: im > filters.threshold_otsu(im))},
    }


# ---------------------------------------------------------------------------
# volnorm's calls
# ---------------------------------------------------------------------------


def values(r: Any) -> Any:
    """A result as numpy (a DataArray's ``.values``; exposure's Dataset as (n, 5) columns)."""
    import xarray as xr

    if isinstance(r, xr.Dataset):
        return np.stack([np.asarray(r[k].values, dtype=np.float64) for k in EXPOSURE_KEYS], axis=-1)
    return r.values if isinstance(r, xr.DataArray) else np.asarray(r)


def volnorm_calls() -> dict[str, tuple[str, str, Callable[[Any], Any]]]:
    """Each row: (title, the call as a user writes it, a function of the stack or DataArray)."""
    import volnorm as vn

    c = vn.color
    return {
        "1a": ("equalize -> uint8", 'vn.equalize(s, dim=("y","x"), out_range="uint8")',
               lambda s: vn.equalize(s, dim=PER_IMAGE, out_range="uint8")),
        "1b": ("equalize -> float", 'vn.equalize(s, dim=("y","x"))', lambda s: vn.equalize(s, dim=PER_IMAGE)),
        "2": ("rescale min-max -> uint8", 'vn.rescale(s, dim=("y","x"), out_range="uint8")',
              lambda s: vn.rescale(s, dim=PER_IMAGE, out_range="uint8")),
        "3": ("gamma 0.6 (uint8)", f"vn.gamma(s, {GAMMA})", lambda s: vn.gamma(s, GAMMA)),
        "4": ("log (uint8)", "vn.log(s)", lambda s: vn.log(s)),
        "5": ("desaturate 0.5 (RGB)", f"vn.color.desaturate(rgb, {DESAT})", lambda s: c.desaturate(s, DESAT)),
        "6": ("exposure report (RGB)", "vn.color.exposure(rgb)", lambda s: c.exposure(s)),
        "7a": ("to_grey BT.601 (RGB)", "vn.color.to_grey(rgb)", lambda s: c.to_grey(s)),
        "7c": ("to_grey BT.601 -> uint8 (RGB)", 'vn.color.to_grey(rgb, dtype="uint8")', lambda s: c.to_grey(s, dtype="uint8")),
        "7b": ("to_grey skimage weights", "vn.color.to_grey(rgb, method=(0.2125, 0.7154, 0.0721))",
               lambda s: c.to_grey(s, method=(0.2125, 0.7154, 0.0721))),
        "8": ("threshold otsu per image", 'vn.threshold(s, "otsu", dim=("y","x"))',
              lambda s: vn.threshold(s, "otsu", dim=PER_IMAGE)),
        "9": ("binarize otsu per image", 'vn.binarize(s, dim=("y","x"))', lambda s: vn.binarize(s, dim=PER_IMAGE)),
    }


RGB_ROWS = ("5", "6", "7a", "7c", "7b")


# ---------------------------------------------------------------------------
# checks: volnorm's result against each peer's (untimed)
# ---------------------------------------------------------------------------


def maxdiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max(initial=0))


def exact(v: np.ndarray, p: np.ndarray, what: str = "") -> tuple[bool, str]:
    if v.shape == p.shape and np.array_equal(v, p):
        return True, f"equal{what} ({v.dtype} vs {p.dtype})"
    if v.shape != p.shape:
        return False, f"shapes differ {v.shape} vs {p.shape}"
    per = np.asarray(v != p).reshape(len(v), -1).any(axis=1)
    return False, f"differ in {int(per.sum())}/{len(v)} images, {int(np.count_nonzero(v != p))} values, max |diff| {maxdiff(v, p):.4g}"


def within(v: np.ndarray, p: np.ndarray, tol: float, what: str) -> tuple[bool, str]:
    d = maxdiff(v, p)
    return d <= tol, f"max |diff| {d:.3g} (<= {what}); equal {np.mean(np.asarray(v) == np.asarray(p)):.2%}"


def luma(rgb: np.ndarray) -> np.ndarray:
    f = rgb.astype(np.float64)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]


def check_rescale_cv2(v: np.ndarray, p: np.ndarray, grey: np.ndarray) -> tuple[bool, str]:
    g = grey.astype(np.float64)
    lo, hi = g.min(axis=(1, 2), keepdims=True), g.max(axis=(1, 2), keepdims=True)
    ex = (g - lo) * 255 / np.where(hi > lo, hi - lo, 1)
    tie = np.abs(ex - np.floor(ex) - 0.5) < 1e-9
    off = v != p
    ok = maxdiff(v, p) <= 1 and not (off & ~tie).any()
    if not off.any():
        return True, f"equal ({int(tie.sum())} exact halves, none rounded apart)"
    return ok, (f"equal but {int(off.sum())} values, all at exact halves (of {int(tie.sum())} halves), max |diff| "
                f"{maxdiff(v, p):.0f} (<= 1 at halves only)" if ok else
                f"{int((off & ~tie).sum())} values differ off the halves, max |diff| {maxdiff(v, p):.0f}")


def check_rescale_skimage(v: np.ndarray, p: np.ndarray) -> tuple[bool, str]:
    d = v.astype(np.int64) - p
    return bool(d.min() >= 0 and d.max() <= 1), f"vn - skimage in [{d.min()}, {d.max()}] (<= [0, 1]: truncation), equal {np.mean(d == 0):.1%}"


def check_grey_u8(v: np.ndarray, p: np.ndarray) -> tuple[bool, str]:
    d = np.abs(np.rint(v).astype(np.int64) - p)
    eq = float(np.mean(d == 0))
    return bool(d.max() <= 1 and eq > 0.99), f"|round(vn) - peer| max {d.max()} (<= 1), equal {eq:.2%} (> 99%)"


def check_exposure(v: np.ndarray, p: np.ndarray, rgb: np.ndarray) -> tuple[bool, str]:
    """v, p: (n, 5) in EXPOSURE_KEYS order."""
    y = luma(rgb)
    band = np.maximum((np.abs(y - 25.5) <= 0.51).mean(axis=(1, 2)), (np.abs(y - 229.5) <= 0.51).mean(axis=(1, 2)))
    f = rgb.astype(np.float64) / 255
    hsp = np.sqrt(0.241 * f[..., 0] ** 2 + 0.691 * f[..., 1] ** 2 + 0.068 * f[..., 2] ** 2).mean(axis=(1, 2))
    d = np.abs(v - p)
    ok_mean = bool((d[:, :2] <= 0.5 / 255 + 1e-6).all())
    ok_frac = bool((d[:, 3:] <= band[:, None] + 1e-9).all())
    ok_bright = bool(np.allclose(v[:, 2], hsp, rtol=1e-5, atol=0)) and bool((v[:, 2] <= p[:, 2] + 1e-9).all())
    return ok_mean and ok_frac and ok_bright, (
        f"mean/rms_contrast max |diff| {d[:, :2].max():.2g} (<= 0.5/255: {okmiss(ok_mean)}); "
        f"under/over max |diff| {d[:, 3:].max():.2g} (<= pixels within 0.51 of the cut: {okmiss(ok_frac)}); "
        f"brightness == numpy HSP mean (rtol 1e-5) and <= PIL's RMS form (max gap {(p[:, 2] - v[:, 2]).max():.3g}): {okmiss(ok_bright)}")


def checks(grey: np.ndarray, rgb: np.ndarray) -> dict[str, Callable[[str, np.ndarray, np.ndarray], tuple[bool | None, str]]]:
    """Each row: (peer name, volnorm's values, the peer's) -> (passed, text); None = not checked."""

    def row5(name: str, v: np.ndarray, p: np.ndarray) -> tuple[bool | None, str]:
        if name == "cv2 HSV uint8":
            return within(v, p, DESAT_TOL_U8, f"{DESAT_TOL_U8}: uint8 H in 2-degree steps, S and V in 1/255")
        if name == "cv2 HSV float32":
            return within(v, p, 1, "1: float32 vs float64 HSV, rounded")
        return None, f"not checked (a blend with grey, not HSV): max |diff| {maxdiff(v, p):.0f}, mean |diff| {np.abs(v.astype(float) - p).mean():.2f}"

    return {
        "1a": lambda n, v, p: exact(v, p),
        "1b": lambda n, v, p: exact(v, p.astype(np.float32), " to scikit-image's float64 rounded to float32"),
        "2": lambda n, v, p: check_rescale_cv2(v, p, grey) if n.startswith("cv2") else check_rescale_skimage(v, p),
        "3": lambda n, v, p: exact(v, p),
        "4": lambda n, v, p: exact(v, p),
        "5": row5,
        "6": lambda n, v, p: check_exposure(v, p, rgb),
        "7a": lambda n, v, p: check_grey_u8(v, p),
        "7c": lambda n, v, p: check_grey_u8(v, p),
        "7b": lambda n, v, p: within(v / np.float32(255), p, 1e-3 / 255 + 1e-6 * np.abs(p).max(), "1e-3/255 + rtol 1e-6"),
        "8": lambda n, v, p: exact(v.astype(np.float64), p.astype(np.float64)),
        "9": lambda n, v, p: exact(v, p != 0, " (cv2's 0/255 as != 0)") if p.dtype == np.uint8 else exact(v, p),
    }


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------


@dataclass
class Timing:
    best: float | None = None
    runs: list[float] = field(default_factory=list)
    error: str = ""
    result: Any = None


def measure(fn: Callable[[Any], Any], data: Any, warm: Any, repeat: int, budget: float) -> Timing:
    """``fn(warm)`` untimed, then up to ``repeat`` timed runs of ``fn(data)`` (fewer once
    ``budget`` s are used); the last result kept. Errors are kept as text, not raised."""
    t = Timing()
    try:
        fn(warm)
        for _ in range(repeat):
            t.result = None
            gc.collect()
            t0 = time.perf_counter()
            t.result = fn(data)
            t.runs.append(time.perf_counter() - t0)
            if sum(t.runs) >= budget:
                break
        t.best = min(t.runs)
    except TypeError as e:
        t.error = f"n/a: {e}"
    except Exception as e:  # noqa: BLE001 - a failing call is a row's finding, printed as ERROR
        t.error = f"ERROR {type(e).__name__}: {e}"
        traceback.print_exc()
    return t


def ms(t: Timing) -> str:
    if t.best is not None:
        return f"{t.best * 1e3:9.1f}"
    return f"{'n/a' if t.error.startswith('n/a') else 'ERROR':>9}"


def run_row(key: str, title: str, call: Callable[[Any], Any], peer_fns: dict[str, Callable], check: Callable,
            stack: np.ndarray, dims: tuple[str, ...], repeat: int, budget: float) -> dict:
    import xarray as xr

    x = xr.DataArray(stack, dims=dims)
    n = len(stack)
    say(f"[{key}] {title}")
    vn_np = measure(lambda s: values(call(s)), stack, stack[:2], repeat, budget)
    vn_xr = measure(lambda s: values(call(s)), x, x[:2], repeat, budget)
    pt = {name: measure(f, stack, stack[:2], repeat, budget) for name, f in peer_fns.items()}
    ref = vn_xr.result if vn_xr.result is not None else vn_np.result
    found: dict[str, tuple[bool | None, str]] = {}
    if vn_np.result is not None and vn_xr.result is not None:
        found["vn np == vn xr"] = exact(vn_np.result, vn_xr.result)
    for name, t in pt.items():
        if ref is not None and t.result is not None:
            found[name] = check(name, ref, t.result)
    timed = {k: t.best for k, t in pt.items() if t.best is not None}
    fastest = min(timed, key=timed.get) if timed else None
    row = {"row": key, "title": title, "n": n,
           "volnorm": {c: {"best_s": t.best, "runs_s": t.runs, "error": t.error} for c, t in (("np", vn_np), ("xr", vn_xr))},
           "peers": {k: {"best_s": t.best, "runs_s": t.runs, "error": t.error} for k, t in pt.items()},
           "fastest_peer": fastest,
           "checks": {k: {"passed": ok, "detail": txt} for k, (ok, txt) in found.items()}}
    for c, t in (("np", vn_np), ("xr", vn_xr)):
        row[f"ratio_{c}"] = t.best / timed[fastest] if fastest and t.best is not None else None
    say(f"     vn np {ms(vn_np)} ms, vn xr {ms(vn_xr)} ms; " + "; ".join(f"{k} {ms(t).strip()} ms" for k, t in pt.items()))
    return row


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------

WIDTH = 196


def fmt_ms(s: float | None) -> str:
    return f"{s * 1e3:.1f}" if s is not None else "-"


def ratio_cell(r: float | None) -> str:
    return f"{r:5.2f}x {okmiss(r <= TARGET):<4}" if r is not None else f"{'-':>6} {'':<4}"


def check_cell(row: dict) -> str:
    res = [c["passed"] for c in row["checks"].values()]
    errors = [v["error"] for v in (*row["volnorm"].values(), *row["peers"].values()) if v["error"].startswith("ERROR")]
    txt = "FAIL" if False in res else ("ok" if res else "none")
    if None in res:
        txt += " (+1 unchecked)" if res.count(None) == 1 else f" (+{res.count(None)} unchecked)"
    return txt + (" ERROR" if errors else "")


def table_lines(rows: list[dict]) -> list[str]:
    head = (f"{'row':<30} {'vn np ms':>9} {'vn xr ms':>9}  {'peers ms':<74} {'vn/fastest np':>13} {'vn/fastest xr':>13} "
            f"{'img/s np':>8} {'img/s xr':>8} {'img/s peer':>10}  check")
    out = [head, "-" * WIDTH]
    for r in rows:
        v = r["volnorm"]
        peers_txt = "; ".join(f"{k} {fmt_ms(p['best_s'])}" for k, p in r["peers"].items())
        best = r["peers"][r["fastest_peer"]]["best_s"] if r["fastest_peer"] else None

        def rate(s: float | None, n: int = r["n"]) -> str:
            return f"{n / s:,.0f}" if s else "-"

        np_cell = fmt_ms(v["np"]["best_s"]) if v["np"]["best_s"] is not None else ("n/a" if v["np"]["error"].startswith("n/a") else "ERROR")
        out.append(f"{r['row'] + ' ' + r['title']:<30} {np_cell:>9} {fmt_ms(v['xr']['best_s']):>9}  {peers_txt:<74} "
                   f"{ratio_cell(r['ratio_np']):>13} {ratio_cell(r['ratio_xr']):>13} {rate(v['np']['best_s']):>8} "
                   f"{rate(v['xr']['best_s']):>8} {rate(best):>10}  {check_cell(r)}")
    return out


def env_lines(n: int, repeat: int, budget: float) -> list[str]:
    import cv2
    import dask
    import numba
    import PIL
    import skimage
    import xarray as xr

    import volnorm as vn

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        (f"machine : {os.cpu_count()} cores ({cpu}), RAM {ram:.1f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, load average {' '.join(f'{a:.2f}' for a in os.getloadavg())}"),
        (f"versions: volnorm {vn.__version__}, opencv {cv2.__version__}, Pillow {PIL.__version__}, scikit-image "
        f"{skimage.__version__}, numpy {np.__version__}, dask {dask.__version__}, xarray {xr.__version__}, numba {numba.__version__}"),
        (f"threads : OpenCV uses threads: getNumThreads() = {cv2.getNumThreads()} (its default, as users run it); "
        "Pillow and scikit-image loops single-threaded; volnorm: its default engine (no cluster), "
        f"VOLNORM_SCHEDULER={os.environ.get('VOLNORM_SCHEDULER', 'unset')}"),
        (f"data    : grey ({n}, 512, 512) uint8 {n * SIDE * SIDE / 1e6:.0f} MB from skimage {', '.join(GREY_SOURCES)}; "
        f"RGB ({n}, 512, 512, 3) uint8 {n * SIDE * SIDE * 3 / 1e6:.0f} MB = bench_color.py's first {n} images"),
        (f"timing  : best of up to {repeat} runs per measurement (fewer once {budget:.0f} s are used; runs in the JSON), "
        "after one untimed warm-up on 2 images; vn np = numpy in/out, vn xr = numpy-backed DataArray, .values; "
        f"target vn <= {TARGET:.0f}x the fastest peer"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="images per stack (default 100)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per measurement, the best reported (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="stop repeating a measurement once it has used this many seconds (default 20; at least 1 run)")
    ap.add_argument("--rows", nargs="+", help="only these rows (e.g. 1a 3 7b)")
    ap.add_argument("--json", type=Path, help="save every number as JSON")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)

    t_all = time.perf_counter()
    say(f"[data: {args.n} grey and {args.n} RGB 512x512 uint8 images]")
    grey, rgb = grey_stack(args.n), rgb_stack(args.n)
    t_data = time.perf_counter() - t_all
    calls, peer_fns, check_fns = volnorm_calls(), peers(), checks(grey, rgb)
    rows = []
    for key, (title, _, call) in calls.items():
        if args.rows and key not in args.rows:
            continue
        colour = key in RGB_ROWS
        rows.append(run_row(key, title, call, peer_fns[key], check_fns[key], rgb if colour else grey,
                            ("volume", "y", "x", "channel") if colour else ("volume", "y", "x"), args.repeat, args.budget))

    env = env_lines(args.n, args.repeat, args.budget)
    say("\n" + "=" * WIDTH)
    say("volnorm small in-memory stacks benchmark")
    for line in env:
        say(line)
    say("-" * WIDTH)
    for line in table_lines(rows):
        say(line)
    say("-" * WIDTH)
    say("calls and checks (volnorm's result against each peer's):")
    for r in rows:
        say(f"  {r['row']:<3} {calls[r['row']][1]}")
        for c, v in (*r["volnorm"].items(), *r["peers"].items()):
            if v["error"]:
                say(f"        {c}: {v['error'][:160]}")
        for name, c in r["checks"].items():
            mark = {True: "ok  ", False: "FAIL", None: "info"}[c["passed"]]
            say(f"        {mark} {name}: {c['detail']}")
    total = time.perf_counter() - t_all
    say(f"time: {total:.0f} s in all, {total - t_data:.0f} s measuring (the rest: making the data)")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()

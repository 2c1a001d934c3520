"""Synthetic images generated in memory: brain phantoms and 2-D image stacks.

:func:`brain_phantom` draws a realistic T1-weighted head volume (scalp, skull,
CSF, folded cortex, white matter, ventricles and deep grey matter, with a bias
field, Rician noise and per-subject variation of size and global intensity
scale); :func:`make_image_stack` makes a stack of varied 2-D grayscale images.
Both are deterministic for a given seed.

The argument checks, the default voxel size and affine and the slab size are
public names here because :mod:`volnorm.datasets.cohort` (phantoms written as
NIfTI files) uses them too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

logger = logging.getLogger(__name__)

__all__ = ["brain_phantom", "make_image_stack"]

# --------------------------------------------------------------------------
# Brain phantom
# --------------------------------------------------------------------------

#: Field of view (mm) that a default affine gives a phantom: the head fills it.
_DEFAULT_FOV_MM = (180.0, 224.0, 180.0)
#: Head semi-axes (mm) of an average subject, along x (L-R), y (P-A), z (I-S).
_HEAD_SEMI_MM = np.array([76.0, 94.0, 82.0])
#: Reference white-matter intensity for 16-bit and wider dtypes (before the
#: per-subject scale and ``intensity_scale``).
_WM_REFERENCE = 1000.0
#: Slab size (voxels) of the float32 working buffers.
SLAB_VOXELS = 2**20

# Tissue intensities relative to white matter (T1-weighted, MPRAGE-like).
_T1 = {
    "fat": 1.2,  # scalp / subcutaneous fat: bright
    "skull": 0.08,  # cortical bone: dark
    "diploe": 0.4,  # marrow between the bone tables
    "csf": 0.22,
    "gm": 0.62,
    "deep_gm": 0.78,
    "wm": 1.0,
}

#: Label codes of the private ground-truth segmentation.
_LABELS = {"background": 0, "scalp": 1, "skull": 2, "csf": 3, "gm": 4, "wm": 5}


def check_shape(shape: Sequence[int], ndim: int, what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of ``ndim`` positive ints; TypeError or ValueError if it is not."""
    try:
        out = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"`{what}` must be a sequence of {ndim} ints; got {shape!r}.") from None
    if len(out) != ndim or any(s < 1 for s in out) or any(
        int(s) != s for s in shape  # reject 2.5
    ):
        raise ValueError(f"`{what}` must be {ndim} positive ints; got {tuple(shape)!r}.")
    return out


def check_seed(seed: int) -> int:
    """``seed`` as an int; ValueError unless it is a non-negative int."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int; got {seed!r}.")
    return int(seed)


def default_voxel_size(shape: Sequence[int]) -> float:
    """Isotropic voxel size (mm) that makes ``shape`` cover about 180x220x180 mm."""
    raw = max(f / n for f, n in zip(_DEFAULT_FOV_MM, shape))
    return round(raw / 0.05) * 0.05 if raw >= 0.1 else raw


def centred_affine(shape: Sequence[int], voxel: Sequence[float]) -> np.ndarray:
    """RAS affine with voxel sizes ``voxel`` whose array centre is at (0, 0, 0)."""
    affine = np.diag([*map(float, voxel), 1.0])
    affine[:3, 3] = [-v * (n - 1) / 2.0 for v, n in zip(voxel, shape)]
    return affine


def check_dtype(dtype: DTypeLike) -> np.dtype:
    """``dtype`` as a numpy dtype; ValueError unless it is an integer or float dtype."""
    dt = np.dtype(dtype)
    if dt.kind not in "iuf":
        raise ValueError(f"`dtype` must be an integer or float dtype; got {dt}.")
    return dt


def float32_clip_bounds(
    dt: np.dtype, ftype: type[np.floating] = np.float32
) -> tuple[np.floating, np.floating]:
    """Float bounds inside the range of integer ``dt`` (so a cast cannot wrap)."""
    info = np.iinfo(dt)
    lo, hi = ftype(info.min), ftype(info.max)
    if int(hi) > info.max:  # the float rounded int32/int64 max up: step back
        hi = np.nextafter(hi, ftype(0))
    if int(lo) < info.min:  # pragma: no cover - powers of two are exact
        lo = np.nextafter(lo, ftype(0))
    return lo, hi


def _coarse_index(n: int, k: int = 24) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.intp))


class _SmoothField:
    """Smooth random 3-D field, separable in its basis, evaluated slab by slab.

    A sum of Gaussian bumps on a regular knot grid with i.i.d. normal weights:
    ``f(x, y, z) = sum_abc w_abc g_a(x) g_b(y) g_c(z)``. Only the knots within
    ``extent_mm`` of the centre are used (the field fades to 0 beyond), so the
    cost does not grow with the field of view. Contracting the ``y`` and ``z``
    basis up front leaves one small matrix product per slab: far cheaper than
    interpolating a low-resolution grid with ``scipy.ndimage.zoom`` and never
    needs a full-size temporary.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        coords: Sequence[np.ndarray],
        spacing_mm: float,
        extent_mm: Sequence[float],
        normalize: Literal["std", "maxabs"],
    ) -> None:
        bases = []
        sigmas: list[float] = []
        for c, ext in zip(coords, extent_mm):
            lo = max(float(c.min()), -ext) - spacing_mm
            hi = min(float(c.max()), ext) + spacing_mm
            m = max(2, int(math.ceil((hi - lo) / spacing_mm)) + 1)
            knots = np.linspace(lo, hi, m)
            sigma = 0.75 * (knots[1] - knots[0])
            sigmas.append(sigma)
            bases.append(
                np.exp(-0.5 * ((c[:, None] - knots[None, :]) / sigma) ** 2).astype(np.float32)
            )
        w0, w1, w2 = bases
        coef = rng.standard_normal((w0.shape[1], w1.shape[1], w2.shape[1])).astype(np.float32)
        tmp = coef @ w2.T  # (m0, m1, n2)
        self._t = np.matmul(w1[None], tmp)  # (m0, n1, n2)
        self._w0 = w0
        self._cache_key: object = None
        self._cache: tuple[np.ndarray, tuple[int, ...]] = (self._t, self._t.shape[1:])
        #: Approximate distance (mm) per unit of the std-normalized field near
        #: its zero set: 1 / E|grad f| = sigma / 1.13 for a Gaussian-bump field.
        self.mm_per_unit = float(np.mean(sigmas)) / 1.13
        i0, i1, i2 = (_coarse_index(len(c)) for c in coords)
        sample = np.einsum("ia,ajk->ijk", w0[i0], self._t[:, i1][:, :, i2])
        if normalize == "std":
            scale = float(sample.std())
        else:
            scale = float(np.abs(sample).max())
        self._scale = np.float32(1.0 / scale) if scale > 0 else np.float32(0.0)

    def box(self, box: Sequence[slice]) -> np.ndarray:
        """The field on ``data[box]`` (three slices with unit steps), float32."""
        b0, b1, b2 = box
        key = (b1.indices(self._t.shape[1]), b2.indices(self._t.shape[2]))
        if self._cache_key != key:  # the (y, z) extent rarely changes: cache it
            t = self._t[:, b1, b2]
            self._cache = (t.reshape(t.shape[0], -1), t.shape[1:])
            self._cache_key = key
        flat, shape12 = self._cache
        out = self._w0[b0] @ flat
        out *= self._scale
        return out.reshape(out.shape[0], *shape12)


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume weight of a boundary at d = 0 (inside where d > 0)."""
    w = d * np.float32(1.0 / width)
    w += np.float32(0.5)
    np.clip(w, 0.0, 1.0, out=w)
    return w


def _blend(img: np.ndarray, value: float | np.ndarray, weight: np.ndarray) -> None:
    """In place: img = img + (value - img) * weight."""
    tmp = np.subtract(value, img, dtype=np.float32)
    tmp *= weight
    img += tmp


def _rotation(angles: np.ndarray) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_weight(
    q: Sequence[np.ndarray],
    centre: Sequence[float],
    semi: Sequence[float],
    width: float,
    bend: float = 0.0,
) -> np.ndarray:
    """Soft mask of an ellipsoid in template coordinates ``q`` (mm).

    ``bend`` lowers the ellipsoid's z centre quadratically along y (the arch of
    the lateral ventricles).
    """
    acc = None
    for axis in range(3):
        u = q[axis] - np.float32(centre[axis])
        if axis == 2 and bend:
            v = q[1] - np.float32(centre[1])
            v *= v
            v *= np.float32(bend)
            u += v
        u *= np.float32(1.0 / semi[axis])
        u *= u
        acc = u if acc is None else np.add(acc, u, out=acc)
    assert acc is not None
    np.sqrt(acc, out=acc)
    # depth below the surface (mm), radial approximation
    np.subtract(1.0, acc, out=acc)
    acc *= np.float32(min(semi))
    return _ramp(acc, width)


def _index_box(
    centre_mm: np.ndarray, half_mm: np.ndarray, coords: Sequence[np.ndarray]
) -> tuple[slice, slice, slice]:
    """Index slices of the voxels whose coordinates lie within ``centre ± half``."""
    out = []
    for c, lo, hi in zip(coords, centre_mm - half_mm, centre_mm + half_mm):
        out.append(slice(int(np.searchsorted(c, lo, "left")), int(np.searchsorted(c, hi, "right"))))
    return out[0], out[1], out[2]


def _intersect(
    a: Sequence[slice], b: Sequence[slice], shape: Sequence[int]
) -> tuple[slice, slice, slice] | None:
    """Intersection of two boxes of unit-step slices, None if empty."""
    out = []
    for sa, sb, n in zip(a, b, shape):
        a0, a1, _ = sa.indices(n)
        b0, b1, _ = sb.indices(n)
        lo, hi = max(a0, b0), min(a1, b1)
        if hi <= lo:
            return None
        out.append(slice(lo, hi))
    return out[0], out[1], out[2]


class _Anatomy:
    """Tissue intensities (relative to white matter) of one subject, per box."""

    def __init__(
        self,
        *,
        rot: np.ndarray,
        coords: Sequence[np.ndarray],
        inv_semi: np.ndarray,
        to_template: np.ndarray,
        width: float,
        scalp: float,
        skull: float,
        t_inner: float,
        tscale: float,
        contrast: dict[str, float],
        deep: Sequence[tuple[Sequence[float], Sequence[float], float]],
        ventricles: Sequence[tuple[Sequence[float], Sequence[float], float]],
        folds: _SmoothField,
        sulci: _SmoothField,
    ) -> None:
        self.rot = rot
        self.coords = coords
        self.inv_semi = inv_semi
        self.to_template = to_template
        self.width = width
        self.scalp = scalp
        self.skull = skull
        self.t_inner = t_inner
        self.tscale = tscale
        self.contrast = contrast
        self.deep = deep
        self.ventricles = ventricles
        self.folds = folds
        self.sulci = sulci

    def draw(
        self,
        box: tuple[slice, slice, slice],
        deep_box: tuple[slice, slice, slice] | None,
        labels: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Relative intensity (float32) and, if asked, labels of ``data[box]``."""
        width, tscale, contrast = self.width, self.tscale, self.contrast
        rot, inv_semi = self.rot, self.inv_semi
        x = self.coords[0][box[0], None, None]
        y = self.coords[1][None, box[1], None]
        z = self.coords[2][None, None, box[2]]
        p = [rot[k, 0] * x + rot[k, 1] * y + rot[k, 2] * z for k in range(3)]
        # normalized ellipsoidal radius and radial depth below the scalp surface
        rho = np.square(p[0] * inv_semi[0])
        rho += np.square(p[1] * inv_semi[1])
        rho += np.square(p[2] * inv_semi[2])
        np.sqrt(rho, out=rho)
        np.maximum(rho, np.float32(1e-6), out=rho)
        r = np.square(p[0])
        r += np.square(p[1])
        r += np.square(p[2])
        np.sqrt(r, out=r)
        depth = r / rho
        depth -= r  # distance from the head surface along the ray, > 0 inside
        del r, rho

        img = np.zeros(depth.shape, dtype=np.float32)
        w_head = _ramp(depth, width)
        _blend(img, contrast["fat"], w_head)
        w_skull = _ramp(depth - np.float32(self.scalp), width)
        _blend(img, contrast["skull"], w_skull)
        w = _ramp(depth - np.float32(self.scalp + 0.35 * self.skull), width)
        w *= _ramp(np.float32(self.scalp + 0.7 * self.skull) - depth, width)
        _blend(img, contrast["diploe"], w)
        w_csf = _ramp(depth - np.float32(self.scalp + self.skull), width)
        _blend(img, contrast["csf"], w_csf)
        # brain: wavy outer surface, cortical ribbon of varying thickness
        f = self.folds.box(box)
        d_brain = depth - np.float32(self.t_inner)
        del depth
        d_brain += np.float32(1.2 * tscale) * f
        w_gm = _ramp(d_brain, width)
        _blend(img, contrast["gm"], w_gm)
        # Sulci: CSF sheets along the zero set of the sulcal field, down to a
        # depth that varies with the fold field; distance to the sheet from
        # the field value (|g| / mean |grad g|).
        s_depth = np.clip(f * np.float32(0.3) + np.float32(0.5), 0.0, 1.0)
        s_depth *= np.float32(12.0 * tscale)
        s_depth += np.float32(7.0 * tscale)
        thick = f * np.float32(0.3 * tscale)  # cortical thickness 2.6 ± 0.3 mm
        thick += np.float32(2.6 * tscale)
        del f
        h = np.abs(self.sulci.box(box))
        h *= np.float32(self.sulci.mm_per_unit)
        g = _ramp(np.float32(0.6 * tscale) - h, width)
        g *= _ramp(s_depth - d_brain, width)
        g *= w_gm
        _blend(img, contrast["csf"], g)
        # white matter: farther than the cortical thickness from any CSF (the
        # brain surface or a sulcus, including below its fundus)
        below = d_brain - s_depth
        np.maximum(below, 0.0, out=below)
        below *= below
        h *= h
        below += h
        del h, s_depth
        np.sqrt(below, out=below)
        np.minimum(below, d_brain, out=below)
        below -= thick
        below -= np.float32(0.6 * tscale)
        w_wm = _ramp(below, width)
        del below, thick
        _blend(img, contrast["wm"], w_wm)
        del d_brain

        # deep grey matter and ventricles, in template coordinates, only in
        # their own (smaller) box
        w_deep = w_vent = None
        if deep_box is not None:
            local = tuple(
                slice(d.start - b.start, d.stop - b.start) for d, b in zip(deep_box, box)
            )
            q = [p[k][local] * self.to_template[k] for k in range(3)]
            del p
            for centre, axes, bend in self.deep:
                w = _ellipsoid_weight(q, centre, axes, width, bend)
                w_deep = w if w_deep is None else np.maximum(w_deep, w, out=w_deep)
            assert w_deep is not None
            sub = img[local]
            _blend(sub, contrast["deep_gm"], w_deep)
            for centre, axes, bend in self.ventricles:
                w = _ellipsoid_weight(q, centre, axes, width, bend)
                w_vent = w if w_vent is None else np.maximum(w_vent, w, out=w_vent)
            assert w_vent is not None
            w_vent *= w_wm[local]  # the ventricles sit inside the white matter
            _blend(sub, contrast["csf"], w_vent)
            del q

        lab = None
        if labels:
            lab = np.zeros(img.shape, dtype=np.uint8)
            lab[w_head > 0.5] = _LABELS["scalp"]
            lab[w_skull > 0.5] = _LABELS["skull"]
            lab[w_csf > 0.5] = _LABELS["csf"]
            lab[(w_gm > 0.5) & (g <= 0.5)] = _LABELS["gm"]
            lab[w_wm > 0.5] = _LABELS["wm"]
            if w_deep is not None and w_vent is not None:
                sub_lab = lab[local]
                sub_lab[(w_deep > 0.5) & (w_wm[local] > 0.5)] = _LABELS["gm"]
                sub_lab[w_vent > 0.5] = _LABELS["csf"]
        return img, lab


def _phantom(
    shape: Sequence[int],
    *,
    seed: int,
    dtype: DTypeLike,
    bias_strength: float,
    noise: float,
    intensity_scale: float,
    affine: ArrayLike | None,
    labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Brain phantom plus (optionally) its ground-truth label map.

    See :func:`brain_phantom`. Labels (``uint8``) follow :data:`_LABELS`;
    deep grey matter counts as GM and ventricles as CSF.
    """
    shape = check_shape(shape, 3)
    seed = check_seed(seed)
    dt = check_dtype(dtype)
    for name, val in (("bias_strength", bias_strength), ("noise", noise)):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"`{name}` must be a finite number >= 0; got {val!r}.")
    if not (math.isfinite(intensity_scale) and intensity_scale > 0):
        raise ValueError(f"`intensity_scale` must be a finite number > 0; got {intensity_scale!r}.")
    if affine is None:
        voxel = np.full(3, default_voxel_size(shape))
        affine_out = centred_affine(shape, voxel)
    else:
        affine_out = np.array(affine, dtype=np.float64, copy=True)
        if affine_out.shape != (4, 4) or not np.all(np.isfinite(affine_out)):
            raise ValueError(f"`affine` must be a finite 4x4 array; got shape {affine_out.shape}.")
        voxel = np.linalg.norm(affine_out[:3, :3], axis=0)
        if np.any(voxel <= 0):
            raise ValueError("`affine` has a zero voxel size.")
    nx, ny, nz = shape

    # Independent streams: geometry/contrast, smooth fields, bias field, noise.
    # The bias coefficients never depend on bias_strength and the noise never
    # on the geometry, so e.g. bias_strength=0 vs 0.3 differ only by the bias.
    geo_ss, fold_ss, bias_ss, noise_ss = np.random.SeedSequence(seed).spawn(4)
    geo = np.random.default_rng(geo_ss)

    # --- per-subject anatomy and contrast -----------------------------------
    size = 1.0 + np.clip(geo.normal(0.0, 0.035), -0.08, 0.08)
    aspect = 1.0 + np.clip(geo.normal(0.0, 0.025, 3), -0.05, 0.05)
    semi = _HEAD_SEMI_MM * size * aspect
    offset = np.clip(geo.normal(0.0, 2.0, 3), -5.0, 5.0)  # mm
    angles = np.deg2rad(np.clip(geo.normal(0.0, 3.0, 3), -8.0, 8.0))
    fov_half = voxel * np.array(shape) / 2.0
    fit = min(1.0, float(np.min((fov_half - np.abs(offset)) / semi)))
    if fit < 1.0:
        fit = max(fit, 0.05)
        semi = semi * fit
        offset = offset * fit
    template = semi / _HEAD_SEMI_MM  # mm of this head per template mm
    tscale = float(np.mean(template))
    scalp = 4.0 * tscale * (1.0 + np.clip(geo.normal(0.0, 0.1), -0.25, 0.25))
    skull = 6.0 * tscale * (1.0 + np.clip(geo.normal(0.0, 0.1), -0.25, 0.25))
    csf = 2.5 * tscale * (1.0 + np.clip(geo.normal(0.2, 0.3), -0.3, 1.0))  # atrophy
    vent = float(np.clip(geo.lognormal(0.0, 0.25), 0.65, 1.8))
    contrast = {k: v * (1.0 + np.clip(geo.normal(0.0, s), -2 * s, 2 * s)) for k, v, s in (
        ("fat", _T1["fat"], 0.05),
        ("skull", _T1["skull"], 0.2),
        ("diploe", _T1["diploe"], 0.1),
        ("csf", _T1["csf"], 0.1),
        ("gm", _T1["gm"], 0.03),
        ("deep_gm", _T1["deep_gm"], 0.03),
        ("wm", _T1["wm"], 0.0),
    )}
    if dt.kind in "iu" and dt.itemsize == 1:
        wm_ref = 0.4 * float(np.iinfo(dt).max)
        lo_s, hi_s = 0.75, 1.33
    else:
        wm_ref = _WM_REFERENCE
        lo_s, hi_s = 0.5, 2.0
    subject_scale = float(np.exp(geo.uniform(math.log(lo_s), math.log(hi_s))))
    wm_level = np.float32(wm_ref * subject_scale * intensity_scale)
    sigma = np.float32(noise * wm_level)
    logger.debug(
        "phantom seed=%d shape=%s voxel=%s semi=%s fit=%.3f wm=%.1f sigma=%.2f",
        seed, shape, np.round(voxel, 3), np.round(semi, 1), fit, wm_level, sigma,
    )

    # --- coordinates (mm, along the voxel axes, head centre at origin) --------
    coords = [
        ((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * v - o)
        for n, v, o in zip(shape, voxel, offset)
    ]
    rot = _rotation(angles).T.astype(np.float32)  # array frame -> head frame
    cx, cy, cz = (c.astype(np.float32) for c in coords)
    extent = semi * 1.1 + 15.0
    folds = _SmoothField(
        np.random.default_rng(fold_ss), coords, 14.0 * tscale, extent, "std"
    )
    sulci = _SmoothField(
        np.random.default_rng(fold_ss.spawn(1)[0]), coords, 6.5 * tscale, extent, "std"
    )
    bias = _SmoothField(
        np.random.default_rng(bias_ss), coords, 75.0 * tscale, extent, "maxabs"
    )
    noise_rng = np.random.default_rng(noise_ss)

    width = float(np.mean(voxel))  # partial-volume blur: one voxel
    inv_semi = (1.0 / semi).astype(np.float32)
    to_template = (1.0 / template).astype(np.float32)
    t_inner = scalp + skull + csf  # depth of the brain surface below the scalp
    lr = 1.0 if geo.random() < 0.5 else -1.0  # which hemisphere's ventricle is larger
    deep = [  # (centre, semi, bend) in template mm: thalami, then striata
        ((10.0, -10.0, 4.0), (8.0, 12.0, 8.0), 0.0),
        ((-10.0, -10.0, 4.0), (8.0, 12.0, 8.0), 0.0),
        ((22.0, 6.0, 4.0), (5.0, 13.0, 9.0), 0.0),
        ((-22.0, 6.0, 4.0), (5.0, 13.0, 9.0), 0.0),
    ]
    ventricles = [
        ((7.0 * lr, 4.0, 14.0), (5.0 * vent * 1.1, 22.0 * vent**0.5, 7.0 * vent), 0.012),
        ((-7.0 * lr, 4.0, 14.0), (5.0 * vent, 21.0 * vent**0.5, 6.5 * vent), 0.012),
    ]

    # Bounding boxes (voxel index ranges) of the head and of the deep
    # structures: anatomy is only computed inside the head's box, the deep
    # structures only inside theirs; elsewhere is background (noise only).
    to_array = rot.T.astype(np.float64)  # head frame -> array-axis mm
    margin = 2.0 * width
    head_half = np.sqrt(((to_array * semi[None, :]) ** 2).sum(axis=1)) + margin
    head_box = _index_box(np.zeros(3), head_half, coords)
    deep_centre = to_array @ (np.array([0.0, 0.0, 8.0]) * template)
    deep_half = np.full(3, 48.0 * float(template.max()) + margin)
    deep_box = _index_box(deep_centre, deep_half, coords)

    out = np.empty(shape, dtype=dt)
    label_map = np.zeros(shape, dtype=np.uint8) if labels else None
    step = max(1, SLAB_VOXELS // (ny * nz))
    if dt.kind in "iu":
        clip_lo, clip_hi = float32_clip_bounds(dt)
    elif dt != np.float32:
        info = np.finfo(dt)
        clip_lo = np.float32(max(float(info.min), -3e38))
        clip_hi = np.float32(min(float(info.max), 3e38))

    anatomy = _Anatomy(
        rot=rot,
        coords=(cx, cy, cz),
        inv_semi=inv_semi,
        to_template=to_template,
        width=width,
        scalp=scalp,
        skull=skull,
        t_inner=t_inner,
        tscale=tscale,
        contrast=contrast,
        deep=deep,
        ventricles=ventricles,
        folds=folds,
        sulci=sulci,
    )
    for i0 in range(0, nx, step):
        i1 = min(nx, i0 + step)
        img = np.zeros((i1 - i0, ny, nz), dtype=np.float32)
        box = _intersect((slice(i0, i1), slice(None), slice(None)), head_box, shape)
        if box is not None:
            local = (slice(box[0].start - i0, box[0].stop - i0), box[1], box[2])
            dbox = _intersect(box, deep_box, shape)
            sub, lab = anatomy.draw(box, dbox, labels)
            sub *= wm_level
            if bias_strength > 0:
                b = bias.box(box)
                b *= np.float32(bias_strength)
                b += np.float32(1.0)
                np.maximum(b, np.float32(0.05), out=b)
                sub *= b
                del b
            img[local] = sub
            if label_map is not None and lab is not None:
                label_map[box] = lab
            del sub, lab
        if sigma > 0:  # Rician noise: magnitude of a complex signal
            n1 = noise_rng.standard_normal(img.shape, dtype=np.float32)
            n1 *= sigma
            img += n1
            n2 = noise_rng.standard_normal(img.shape, dtype=np.float32, out=n1)
            n2 *= sigma
            np.hypot(img, n2, out=img)
            del n1, n2
        if dt.kind in "iu":
            np.rint(img, out=img)
            np.clip(img, clip_lo, clip_hi, out=img)
        elif dt != np.float32:
            np.clip(img, clip_lo, clip_hi, out=img)
        out[i0:i1] = img
    return out, affine_out, label_map


def brain_phantom(
    shape: Sequence[int] = (96, 112, 96),
    *,
    seed: int = 0,
    dtype: DTypeLike = "int16",
    bias_strength: float = 0.3,
    noise: float = 0.03,
    intensity_scale: float = 1.0,
    affine: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A realistic synthetic T1-weighted head volume.

    An ellipsoidal head, slightly rotated and off-centre, with a bright scalp
    (fat), a dark skull with a diploe layer, CSF, a cortical grey-matter
    ribbon whose surface and white-matter boundary are folded by smooth
    random fields (with thin CSF-filled sulci), white matter, deep grey
    matter nuclei and lateral ventricles. Boundaries have one voxel of
    partial-volume blur. The signal is multiplied by a smooth bias field and
    gets Rician noise (background is Rayleigh-distributed, not 0).

    Everything that would differ between real subjects and scanners depends
    on ``seed``: head size (about ±8 %) and shape, position and rotation,
    scalp/skull/CSF thickness, ventricle size, cortical folding, tissue
    contrast (a few %), the bias field, the noise, and the global intensity
    scale (white matter at 500-2000 for 16-bit and wider dtypes and floats;
    at 0.3-0.53 of the dtype's maximum for 8-bit dtypes).

    Parameters
    ----------
    shape : sequence of 3 ints, default (96, 112, 96)
        Array shape, in NIfTI voxel order (i, j, k), i.e. x (left to right),
        y (posterior to anterior), z (inferior to superior).
    seed : int, default 0
        Non-negative seed; the same seed (and arguments) gives the same array.
    dtype : dtype-like, default "int16"
        Output dtype: any integer dtype (values are rounded and clipped to
        the dtype's range, never wrapped) or float dtype (computed in
        float32).
    bias_strength : float, default 0.3
        The multiplicative bias field spans about ``1 ± bias_strength`` over
        the head (0 disables it; it is floored at 0.05).
    noise : float, default 0.03
        Standard deviation of the Gaussian noise in each of the two
        quadrature channels of the Rician noise, relative to the subject's
        white-matter intensity (0 disables it).
    intensity_scale : float, default 1.0
        Extra factor on the whole intensity scale (on top of the per-seed
        scale).
    affine : (4, 4) array_like, optional
        Voxel-to-world affine to return. The head is drawn centred on the
        array with the affine's voxel sizes (its rotation is not applied to
        the anatomy) and shrunk if it would not fit. By default: isotropic
        RAS, voxel size chosen so the array covers about 180 x 220 x 180 mm
        (rounded to 0.05 mm: 2 mm for the default shape), array centre at
        world (0, 0, 0).

    Returns
    -------
    data : numpy.ndarray
        The volume, of shape ``shape`` and dtype ``dtype``.
    affine : numpy.ndarray
        (4, 4) float64 voxel-to-world (RAS+, mm) affine.

    Notes
    -----
    Computed in float32 slabs of about 1 Mi voxels, so the memory used is
    the output array plus a few tens of MiB; a 256^3 volume takes about
    2-3 s on 2 cores (about a third of it for the noise). Only the head's
    bounding box gets anatomy; smooth random fields are separable sums of
    Gaussian bumps evaluated per slab, not upsampled full-size arrays.

    Examples
    --------
    >>> data, affine = brain_phantom((64, 72, 64), seed=1)
    >>> data.shape, data.dtype
    ((64, 72, 64), dtype('int16'))
    >>> affine.shape
    (4, 4)
    >>> bool((brain_phantom((64, 72, 64), seed=1)[0] == data).all())
    True
    """
    data, aff, _ = _phantom(
        shape,
        seed=seed,
        dtype=dtype,
        bias_strength=bias_strength,
        noise=noise,
        intensity_scale=intensity_scale,
        affine=affine,
    )
    return data, aff



# --------------------------------------------------------------------------
# 2-D image stacks
# --------------------------------------------------------------------------


def make_image_stack(
    n: int = 16,
    shape: Sequence[int] = (96, 96),
    *,
    seed: int = 0,
    dtype: DTypeLike = "uint8",
) -> np.ndarray:
    """A stack of varied, realistic 2-D grayscale images.

    Each image is a random crop of scikit-image's ``camera`` photograph
    (random size, position, possible left-right flip), resized to ``shape``
    with anti-aliasing, then given a random gamma, contrast and brightness,
    a mild illumination gradient and Gaussian noise.

    Parameters
    ----------
    n : int, default 16
        Number of images (>= 1).
    shape : sequence of 2 ints, default (96, 96)
        Image shape (y, x).
    seed : int, default 0
        Non-negative seed; the same seed gives the same stack.
    dtype : dtype-like, default "uint8"
        Integer dtypes use 0 to the dtype's maximum (rounded, clipped);
        float dtypes use [0, 1] (clipped).

    Returns
    -------
    numpy.ndarray
        Array of shape ``(n, *shape)`` and dtype ``dtype``.

    Examples
    --------
    >>> stack = make_image_stack(4, (32, 48), seed=3)
    >>> stack.shape, stack.dtype
    ((4, 32, 48), dtype('uint8'))
    """
    from skimage.transform import resize

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`n` must be an int >= 1; got {n!r}.")
    ny, nx = check_shape(shape, 2)
    seed = check_seed(seed)
    dt = check_dtype(dtype)
    import skimage.data as skdata

    source = skdata.camera().astype(np.float32) / np.float32(255.0)
    h, w = source.shape
    rng = np.random.default_rng([seed, 0x57AC])
    top = float(float32_clip_bounds(dt)[1]) if dt.kind in "iu" else 1.0
    out = np.empty((int(n), ny, nx), dtype=dt)
    yy = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[:, None]
    xx = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :]
    for k in range(int(n)):
        frac = rng.uniform(0.45, 0.9)
        # crop with the output's aspect ratio, inside the source image
        ch = frac * min(h, w * ny / nx)
        cw = ch * nx / ny
        ch, cw = max(2, int(round(ch))), max(2, int(round(cw)))
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        crop = source[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = resize(crop, (ny, nx), order=1, anti_aliasing=True, preserve_range=True)
        img = img.astype(np.float32)
        np.clip(img, 0.0, 1.0, out=img)
        img **= np.float32(rng.uniform(0.7, 1.4))  # gamma
        gain = np.float32(rng.uniform(0.6, 1.1))
        bias = np.float32(rng.uniform(-0.05, 0.2))
        gy, gx = rng.uniform(-0.15, 0.15, 2).astype(np.float32)
        img = img * gain * (np.float32(1.0) + gy * yy + gx * xx) + bias
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(
            rng.uniform(0.005, 0.03)
        )
        np.clip(img, 0.0, 1.0, out=img)
        if dt.kind in "iu":
            out[k] = np.rint(img * np.float32(top))
        else:
            out[k] = img
    return out

"""Cohorts of brain phantoms written as NIfTI files.

:func:`make_cohort` writes one :func:`~volnorm.datasets.brain_phantom` per
subject, each with its own seed derived from the cohort's seed; the files are
byte-identical for the same arguments.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike

from volnorm.datasets.phantom import (
    SLAB_VOXELS,
    brain_phantom,
    centred_affine,
    check_dtype,
    check_seed,
    check_shape,
    default_voxel_size,
    float32_clip_bounds,
)

logger = logging.getLogger(__name__)

__all__ = ["make_cohort"]


def _subject_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def _scale_to_int(
    data: np.ndarray, dt: np.dtype
) -> tuple[np.ndarray, float, float]:
    """Store float ``data`` as integers ``raw`` with ``data ~ raw * slope + inter``.

    The raw values span 90 % of the dtype's range; slope and intercept are
    float32-representable (as NIfTI-1 stores them) and non-trivial.
    """
    info = np.iinfo(dt)
    span = float(info.max) - float(info.min)
    t0 = float(info.min) + 0.05 * span
    t1 = float(info.max) - 0.05 * span
    vmin = min(float(data.min()), 0.0)
    vmax = float(data.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    slope = float(np.float32((vmax - vmin) / (t1 - t0)))
    inter = float(np.float32(vmin - t0 * slope))
    lo, hi = float32_clip_bounds(dt, np.float64)
    raw = np.empty(data.shape, dtype=dt)
    step = max(1, SLAB_VOXELS // max(1, math.prod(data.shape[1:])))
    for i0 in range(0, data.shape[0], step):
        sl = data[i0 : i0 + step].astype(np.float64)
        sl -= inter
        sl /= slope
        np.rint(sl, out=sl)
        np.clip(sl, lo, hi, out=sl)
        raw[i0 : i0 + step] = sl
    return raw, slope, inter


def make_cohort(
    directory: str | os.PathLike[str],
    n_subjects: int = 4,
    *,
    shape: Sequence[int] = (96, 112, 96),
    vary_shape: bool = False,
    compressed: bool | Literal["mixed"] = False,
    dtype: DTypeLike = "int16",
    seed: int = 0,
    prefix: str = "sub-",
    scaled: bool = False,
    nifti2: bool = False,
) -> list[Path]:
    """Write a cohort of brain phantoms as NIfTI files.

    Subject ``i`` (from 1) is ``brain_phantom`` with its own seed derived
    from ``(seed, i)``, written to ``{prefix}{i:03d}.nii`` or ``.nii.gz``.
    Subjects are generated and written one at a time. Files are
    byte-identical for the same arguments (gzip streams carry no time stamp
    or file name).

    Parameters
    ----------
    directory : str or os.PathLike
        Output directory; created (with parents) if missing.
    n_subjects : int, default 4
        Number of subjects (>= 1).
    shape : sequence of 3 ints, default (96, 112, 96)
        Shape of every volume, or the base shape if ``vary_shape``.
    vary_shape : bool, default False
        Give each subject its own shape, within ±10 % of ``shape`` per axis
        (seeded). The voxel size stays that of ``shape``, so the field of
        view varies.
    compressed : bool or "mixed", default False
        Write ``.nii.gz`` (True), ``.nii`` (False), or alternate ``.nii``
        and ``.nii.gz`` starting with ``.nii`` ("mixed").
    dtype : dtype-like, default "int16"
        On-disk data type. With ``scaled``, it must be an integer type.
    seed : int, default 0
        Non-negative cohort seed.
    prefix : str, default "sub-"
        File name prefix.
    scaled : bool, default False
        Store integers with a non-trivial ``scl_slope`` / ``scl_inter``, so
        that the (nibabel-)scaled data are floats.
    nifti2 : bool, default False
        Write NIfTI-2 instead of NIfTI-1.

    Returns
    -------
    list of pathlib.Path
        The written files, sorted.

    Raises
    ------
    FileExistsError
        If any target file already exists (checked before anything is
        written; nothing is overwritten).

    Notes
    -----
    Headers: RAS affine as both qform and sform with code 1 (scanner),
    units mm and s, ``descrip`` ``"volnorm brain phantom seed=N ..."`` with
    the subject's seed ``N``: ``brain_phantom(shape, seed=N, dtype=dtype)``
    reproduces an unscaled subject of a cohort without ``vary_shape``.

    Examples
    --------
    >>> import tempfile, nibabel as nib
    >>> with tempfile.TemporaryDirectory() as d:
    ...     paths = make_cohort(d, 2, shape=(32, 40, 32), compressed="mixed")
    ...     [p.name for p in paths], nib.load(paths[1]).shape
    (['sub-001.nii', 'sub-002.nii.gz'], (32, 40, 32))
    """
    import nibabel as nib

    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)):
        raise TypeError(f"`n_subjects` must be an int; got {n_subjects!r}.")
    if n_subjects < 1:
        raise ValueError(f"`n_subjects` must be >= 1; got {n_subjects}.")
    if compressed not in (True, False, "mixed"):
        raise ValueError(f'`compressed` must be True, False or "mixed"; got {compressed!r}.')
    if os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"`prefix` must not contain a path separator; got {prefix!r}.")
    base_shape = check_shape(shape, 3)
    seed = check_seed(seed)
    dt = check_dtype(dtype)
    if scaled and dt.kind not in "iu":
        raise ValueError(f"`scaled=True` needs an integer `dtype`; got {dt}.")

    directory = Path(directory)
    width = max(3, len(str(int(n_subjects))))
    paths = []
    for i in range(int(n_subjects)):
        gz = compressed is True or (compressed == "mixed" and i % 2 == 1)
        paths.append(directory / f"{prefix}{i + 1:0{width}d}.nii{'.gz' if gz else ''}")
    for path in paths:
        if path.exists():
            raise FileExistsError(f"Refusing to overwrite existing file {str(path)!r}.")

    voxel = default_voxel_size(base_shape)
    shape_rng = np.random.default_rng([seed, 0x5EA9E])
    directory.mkdir(parents=True, exist_ok=True)
    image_cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    for i, path in enumerate(paths):
        sub_seed = _subject_seed(seed, i + 1)
        if vary_shape:
            factors = shape_rng.uniform(0.9, 1.1, 3)
            sub_shape = tuple(max(1, round(n * f)) for n, f in zip(base_shape, factors))
        else:
            sub_shape = base_shape
        affine = centred_affine(sub_shape, (voxel,) * 3)
        data, affine = brain_phantom(
            sub_shape,
            seed=sub_seed,
            dtype=np.float32 if scaled else dt,
            affine=affine,
        )
        slope = inter = None
        if scaled:
            data, slope, inter = _scale_to_int(data, dt)
        header = image_cls.header_class()
        header.set_data_dtype(dt)
        img = image_cls(data, affine, header)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        img.header["descrip"] = (
            f"volnorm brain phantom seed={sub_seed} cohort_seed={seed} subject={i + 1}"
        )[:80].encode("ascii")
        if scaled:
            img.header.set_slope_inter(slope, inter)
        try:
            nib.save(img, path)
        except BaseException:
            path.unlink(missing_ok=True)  # no truncated file left behind
            raise
        logger.debug("Wrote %s %s %s (seed %d).", path, sub_shape, dt, sub_seed)
        del data, img
    logger.info("Wrote %d phantom(s) to %s.", len(paths), directory)
    return sorted(paths)

"""The sample images that ship inside nibabel and scikit-image.

:func:`nibabel_files` lists the NIfTI files in nibabel's test data and
:func:`skimage_images` loads scikit-image's grayscale sample images. Both work
offline: no download is ever attempted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["nibabel_files", "skimage_images"]


def nibabel_files() -> dict[str, Path]:
    """NIfTI files shipped in nibabel's test data.

    Every ``*.nii`` / ``*.nii.gz`` file in nibabel's test data (``nibabel/tests/data``)
    that nibabel loads as a 3-D or 4-D ``Nifti1Image`` or ``Nifti2Image``.
    Other images stored with a ``.nii`` suffix (such as the CIFTI-2 file
    ``row_major.dconn.nii``) are left out. Only headers are read.

    Returns
    -------
    dict of str to pathlib.Path
        File name (e.g. ``"anatomical.nii"``) to absolute path, sorted by
        name. Empty if nibabel's test data are not installed.

    Examples
    --------
    >>> files = nibabel_files()
    >>> files["anatomical.nii"].name
    'anatomical.nii'
    >>> "row_major.dconn.nii" in files
    False
    """
    import nibabel as nib

    # nibabel.testing.data_path is this folder, but importing nibabel.testing needs pytest
    root = Path(nib.__file__).parent / "tests" / "data"
    if not root.is_dir():  # pragma: no cover
        logger.warning("nibabel test data directory %s does not exist.", root)
        return {}
    candidates = sorted(
        p for p in root.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
    )
    out: dict[str, Path] = {}
    for path in candidates:
        try:
            img = nib.load(path)
        except Exception as exc:  # a file nibabel cannot read is simply skipped
            logger.debug("Skipping %s: nibabel cannot load it (%s).", path.name, exc)
            continue
        if type(img) not in (nib.Nifti1Image, nib.Nifti2Image):
            logger.debug("Skipping %s: it is a %s.", path.name, type(img).__name__)
            continue
        if len(img.shape) not in (3, 4):
            logger.debug("Skipping %s: %d-D.", path.name, len(img.shape))
            continue
        out[path.name] = path.resolve()
    return out


#: Grayscale images that scikit-image ships in its distribution, by loader
#: name, with the file each loader reads.
_SKIMAGE_GRAY = {
    "camera": "data/camera.png",
    "coins": "data/coins.png",
    "moon": "data/moon.png",
    "page": "data/page.png",
    "text": "data/text.png",
    "clock": "data/clock_motion.png",
    "cell": "data/cell.png",
    "brick": "data/brick.png",
    "grass": "data/grass.png",
    "gravel": "data/gravel.png",
    "microaneurysms": "data/microaneurysms.png",
    # 3-D (10, 256, 256) uint16 stack; not in the wheel: needs pooch and a
    # download unless it is already in the local cache.
    "brain": "data/brain.tiff",
}


#: Of those, the ones scikit-image downloads (with pooch) when not cached.
_SKIMAGE_DOWNLOAD = frozenset({"brain"})


def _skimage_file_is_local(filename: str) -> bool | None:
    """Whether scikit-image can load ``filename`` without any download.

    Mirrors the two local cases of ``skimage.data._fetchers._fetch`` (the
    pooch cache and the distribution directory, hash-checked) without calling
    it: for a missing file ``_fetch`` would try the network, or under pytest
    call ``pytest.skip`` (a ``BaseException``). None if that private API is
    not as expected.
    """
    try:
        from skimage.data import _fetchers

        expected = _fetchers.registry[filename]
        fetcher = _fetchers._image_fetcher
        if fetcher is None:
            cache_dir = os.path.dirname(_fetchers.data_dir)
        else:
            cache_dir = str(fetcher.abspath)
        places = (
            os.path.join(cache_dir, filename),
            os.path.join(_fetchers._DISTRIBUTION_DIR, filename),
        )
        return any(_fetchers._has_hash(p, expected) for p in places)
    except Exception as exc:  # private API moved
        logger.debug("Cannot tell whether skimage file %s is local: %s", filename, exc)
        return None


def skimage_images() -> dict[str, np.ndarray]:
    """Grayscale sample images shipped inside scikit-image.

    Only images that load offline are returned: ``camera``, ``coins``,
    ``moon``, ``page``, ``text``, ``clock``, ``cell``, ``brick``, ``grass``,
    ``gravel`` and ``microaneurysms`` (2-D ``uint8``), plus the 3-D
    ``brain`` stack (``(10, 256, 256)`` ``uint16``) if it is already in
    scikit-image's local data cache. No download is attempted; an image
    that is missing or fails to load is skipped (logged at DEBUG level).

    Returns
    -------
    dict of str to numpy.ndarray
        Loader name (as in :mod:`skimage.data`) to image array.

    Examples
    --------
    >>> images = skimage_images()
    >>> images["camera"].shape, images["camera"].dtype
    ((512, 512), dtype('uint8'))
    """
    try:
        import skimage.data as skdata
    except ImportError:  # pragma: no cover - scikit-image is a dependency
        logger.warning("scikit-image is not installed; no sample images.")
        return {}
    out: dict[str, np.ndarray] = {}
    for name, filename in _SKIMAGE_GRAY.items():
        local = _skimage_file_is_local(filename)
        # Unknown (private API changed): try the images that ship in the wheel,
        # never one that may start a download.
        if local is False or (local is None and name in _SKIMAGE_DOWNLOAD):
            logger.debug("skimage.data.%s needs a download; skipped.", name)
            continue
        try:
            image = np.asarray(getattr(skdata, name)())
        except Exception as exc:
            logger.debug("skimage.data.%s failed to load (%s); skipped.", name, exc)
            continue
        if image.ndim == 3 and image.shape[-1] in (3, 4) and name != "brain":
            logger.debug("skimage.data.%s is not grayscale; skipped.", name)
            continue
        out[name] = image
    return out

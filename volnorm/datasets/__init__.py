"""Sample data: nibabel's and scikit-image's shipped files, and synthetic phantoms.

Everything here works offline. :func:`nibabel_files` and :func:`skimage_images`
return the small real images that ship inside nibabel and scikit-image (no
download is ever attempted). :func:`brain_phantom` draws a realistic
T1-weighted head volume (scalp, skull, CSF, folded cortex, white matter,
ventricles and deep grey matter, with a bias field, Rician noise and
per-subject variation of size and global intensity scale);
:func:`make_cohort` writes a cohort of such phantoms as NIfTI files, and
:func:`make_image_stack` makes a stack of varied 2-D grayscale images.

All generators are deterministic for a given seed.

The code lives in three modules, one concern each: :mod:`volnorm.datasets.samples`
(the shipped files), :mod:`volnorm.datasets.phantom` (phantoms and image stacks
generated in memory) and :mod:`volnorm.datasets.cohort` (phantoms written as NIfTI
files). The functions are public here, as ``volnorm.datasets.<name>``.
"""

from __future__ import annotations

from volnorm.datasets.cohort import make_cohort
from volnorm.datasets.phantom import brain_phantom, make_image_stack
from volnorm.datasets.samples import nibabel_files, skimage_images

__all__ = [
    "brain_phantom",
    "make_cohort",
    "make_image_stack",
    "nibabel_files",
    "skimage_images",
]

# Their public home, for help(), the docs and pickling.
for _function in (brain_phantom, make_cohort, make_image_stack, nibabel_files, skimage_images):
    _function.__module__ = __name__
del _function

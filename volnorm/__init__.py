"""volnorm: exact dataset-wide intensity statistics and normalization, out of core.

>>> import volnorm as vn
>>> stack = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])   # lazy
"""

from __future__ import annotations

__version__ = "0.1.0"

from volnorm import arrays, color, datasets, fsl, integrity, pipeline, plot, transforms
from volnorm._histogram import histogram, merge_histograms
from volnorm._utils import VolnormDeprecationWarning, VolnormWarning
from volnorm.color import apply_colormap, invert_colormap
from volnorm.conversion import convert
from volnorm.integrity import DamagedStoreError, verify
from volnorm.io.nifti import NiftiError, read_info
from volnorm.io.readers import open_images, open_nifti, open_zarr
from volnorm.io.store import IncompleteStoreError
from volnorm.io.writers import to_nifti, to_zarr
from volnorm.normative import normative_score, voxel_cdf, voxel_quantile, voxel_stats
from volnorm.params import Params
from volnorm.stats import Summary, quantile, summarize
from volnorm.transforms import (
    auto_gamma,
    binarize,
    dither,
    equalize,
    equalize_adaptive,
    fcm,
    fit_equalize,
    fit_fcm,
    fit_kde,
    fit_lsq,
    fit_mean_scale,
    fit_rescale,
    fit_whitestripe,
    fit_zscore,
    gamma,
    kde,
    log,
    lsq,
    match_histogram,
    mean_scale,
    n4,
    nyul_apply,
    nyul_fit,
    rescale,
    threshold,
    whitestripe,
    zscore,
)
from volnorm.voxel import accumulate, open_voxel_histogram

__all__ = [
    "Params",
    "params",
    "transforms",
    *transforms.__all__,
    "arrays",
    "IncompleteStoreError",
    "DamagedStoreError",
    "integrity",
    "verify",
    "NiftiError",
    "VolnormWarning",
    "VolnormDeprecationWarning",
    "convert",
    "datasets",
    "color",
    "apply_colormap",
    "invert_colormap",
    "fsl",
    "plot",
    "histogram",
    "merge_histograms",
    "quantile",
    "summarize",
    "Summary",
    "open_images",
    "open_nifti",
    "open_zarr",
    "read_info",
    "to_nifti",
    "to_zarr",
    "accumulate",
    "open_voxel_histogram",
    "pipeline",
    "normative_score",
    "voxel_cdf",
    "voxel_quantile",
    "voxel_stats",
]


#: Functions that take data first: here they also take numpy and dask arrays (volnorm.arrays);
#: their submodules keep the strict DataArray functions (``volnorm.transforms.zscore``).
_ARRAY_FUNCTIONS = (
    "histogram", "quantile", "summarize", "threshold", *transforms.__all__,
    "apply_colormap", "invert_colormap", "normative_score",
)
for _name in _ARRAY_FUNCTIONS:
    globals()[_name] = arrays.array_api(
        globals()[_name],
        rgb=True if _name == "invert_colormap" else None,
        like="histograms" if _name == "normative_score" else None,
    )
del _name


def _public_home() -> None:
    """Name ``volnorm`` as the module of every function and class of ``__all__`` that is
    ``volnorm.<its name>`` (reprs, help and pickles show the public home, not the defining
    submodule). Submodules keep their names, and so do the error classes: a traceback prints
    an error's module (``volnorm.integrity.DamagedStoreError: ...``), and doctests and logs
    match that text. Warnings print without their module, so they move too."""
    import inspect  # here: no `volnorm.inspect`

    for name in __all__:
        obj = globals()[name]
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__module__.startswith("volnorm."):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException) and not issubclass(obj, Warning):
            continue
        if globals().get(obj.__qualname__) is obj:
            obj.__module__ = "volnorm"


_public_home()

from volnorm import accessor as _accessor  # noqa: E402 - needs the functions above

_accessor.register(globals())

"""Transforms, one module per family as users see them; every name is re-exported here and as
``volnorm.<name>``.

=====================  ==============================================================
module                 functions
=====================  ==============================================================
``intensity``          rescale, zscore, mean_scale, gamma, log, auto_gamma, fit_*
``equalization``       equalize, fit_equalize, equalize_adaptive (CLAHE), match_histogram
``nyul``               nyul_fit, nyul_apply
``thresholds``         threshold
``binary``             binarize, dither
``tissue``             whitestripe, kde, fcm, fit_* (per-volume tissue modes and fuzzy c-means, as intensity-normalization)
``harmonize``          lsq, fit_lsq (population least-squares tissue-means harmonization)
``bias``               n4 (N4 bias-field correction per volume, by SimpleITK)
``common``             what the families share (data check, float type, out_range, map_rows)
=====================  ==============================================================

Fitted parameters (:class:`~volnorm.params.Params`) and the one check of ``params=`` live in
:mod:`volnorm.params`.
"""

from __future__ import annotations

from volnorm.transforms.binary import binarize, dither
from volnorm.transforms.equalization import equalize, equalize_adaptive, fit_equalize, match_histogram
from volnorm.transforms.intensity import (
    auto_gamma,
    fit_mean_scale,
    fit_rescale,
    fit_zscore,
    gamma,
    log,
    mean_scale,
    rescale,
    zscore,
)
from volnorm.transforms.bias import n4
from volnorm.transforms.nyul import nyul_apply, nyul_fit
from volnorm.transforms.thresholds import threshold
from volnorm.transforms.harmonize import fit_lsq, lsq
from volnorm.transforms.tissue import fcm, fit_fcm, fit_kde, fit_whitestripe, kde, whitestripe

__all__ = [
    "auto_gamma",
    "binarize",
    "dither",
    "equalize",
    "equalize_adaptive",
    "fcm",
    "fit_equalize",
    "fit_fcm",
    "fit_kde",
    "fit_lsq",
    "fit_mean_scale",
    "fit_rescale",
    "fit_whitestripe",
    "fit_zscore",
    "gamma",
    "kde",
    "log",
    "lsq",
    "match_histogram",
    "mean_scale",
    "n4",
    "nyul_apply",
    "nyul_fit",
    "rescale",
    "threshold",
    "whitestripe",
    "zscore",
]

"""Transforms: re-exported here and as ``volnorm.<name>``."""

from __future__ import annotations

from volnorm.transforms.intensity import (
    Params,
    auto_gamma,
    binarize,
    dither,
    equalize,
    equalize_adaptive,
    fit_equalize,
    fit_mean_scale,
    fit_rescale,
    fit_zscore,
    gamma,
    log,
    match_histogram,
    mean_scale,
    nyul_apply,
    nyul_fit,
    rescale,
    zscore,
)
from volnorm.transforms.thresholds import threshold

__all__ = [
    "Params",
    "auto_gamma",
    "binarize",
    "dither",
    "equalize",
    "equalize_adaptive",
    "fit_equalize",
    "fit_mean_scale",
    "fit_rescale",
    "fit_zscore",
    "gamma",
    "log",
    "match_histogram",
    "mean_scale",
    "nyul_apply",
    "nyul_fit",
    "rescale",
    "threshold",
    "zscore",
]

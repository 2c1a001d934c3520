"""``data.volnorm.<name>(...)``: every public statistic and transform as an xarray accessor.

The accessor method *is* the function with the data as its first argument
(``x.volnorm.equalize(dim=("y", "x"))`` is ``vn.equalize(x, dim=("y", "x"))``), so
pipelines chain in the xarray style. Collections (``DataTree``) get the statistics.

Examples
--------
>>> import numpy as np, xarray as xr, volnorm as vn
>>> x = xr.DataArray(np.array([0, 10, 20, 30], dtype="uint8"), dims="x")
>>> round(x.volnorm.rescale().volnorm.quantile(0.5).item(), 6)
0.5
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import xarray as xr

#: Functions offered on DataArrays (statistics, transforms, writers).
DATAARRAY_METHODS = (
    "histogram", "quantile", "summarize", "threshold",
    "rescale", "zscore", "mean_scale", "gamma", "log", "auto_gamma",
    "equalize", "equalize_adaptive", "match_histogram", "nyul_fit", "nyul_apply", "binarize", "dither",
    "fit_rescale", "fit_zscore", "fit_mean_scale", "fit_equalize",
    "whitestripe", "fit_whitestripe", "kde", "fit_kde", "fcm", "fit_fcm", "lsq", "fit_lsq", "n4",
    "to_zarr", "to_nifti",
)
#: Functions offered on collections (DataTree).
DATATREE_METHODS = ("histogram", "quantile", "summarize", "threshold")


def _bind(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def method(self: _Accessor, *args: Any, **kwargs: Any) -> Any:
        return func(self._obj, *args, **kwargs)

    return method


class _Accessor:
    def __init__(self, obj: Any) -> None:
        self._obj = obj


class DataArrayAccessor(_Accessor):
    """volnorm's functions on a DataArray (see :mod:`volnorm.accessor`)."""


class DataTreeAccessor(_Accessor):
    """volnorm's statistics on a collection (see :mod:`volnorm.accessor`)."""


def register(api: Mapping[str, Callable[..., Any]]) -> None:
    """Attach the methods and register ``.volnorm`` (done on ``import volnorm``, which passes its
    own namespace: the accessor offers exactly the public functions).

    Parameters
    ----------
    api : mapping of str to callable
        The functions by name (``volnorm``'s namespace).

    Returns
    -------
    None

    Examples
    --------
    >>> import volnorm as vn
    >>> register(vars(vn))   # again: a no-op for the accessors already registered
    """
    for name in DATAARRAY_METHODS:
        setattr(DataArrayAccessor, name, _bind(api[name]))
    for name in DATATREE_METHODS:
        setattr(DataTreeAccessor, name, _bind(api[name]))
    if not hasattr(xr.DataArray, "volnorm"):
        xr.register_dataarray_accessor("volnorm")(DataArrayAccessor)
    if not hasattr(xr.DataTree, "volnorm"):
        xr.register_datatree_accessor("volnorm")(DataTreeAccessor)

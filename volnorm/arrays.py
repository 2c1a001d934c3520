"""Numpy and dask arrays wherever a DataArray goes: dims by convention, results of the same kind.

``volnorm.<name>`` (``vn.zscore``, ``vn.threshold``, ...) accepts a numpy array, a dask array,
or a DataArray made by ``xr.DataArray(arr)`` (dims ``dim_0, dim_1, ...``) wherever it accepts a
DataArray. The functions of :mod:`volnorm.transforms` and the other submodules stay strict
(DataArray only); :func:`array_api` is the one place that adds this, applied in ``volnorm``.

Dims by convention (numpy's C order, as volnorm stores data):

=========  ==============================================================
ndim       dims
=========  ==============================================================
1          ``("x",)``
2          ``("y", "x")``
3          ``("volume", "y", "x")`` (a stack of images); ``("z", "y", "x")``
           inside ``with convention(three_d=("z", "y", "x")):``
4          ``("volume", "z", "y", "x")``
5          ``("volume", "t", "z", "y", "x")``
=========  ==============================================================

A trailing RGB(A) axis (size 3 or 4) is named ``channel`` only when the caller says the data
are colour: :func:`volnorm.invert_colormap` always does, every other function inside
``with convention(rgb=True):``; the other axes then follow the table. A ``mask=`` (and
``weights=``, and an array ``threshold``) given as an array lines up with the data's *trailing*
dims, as numpy broadcasts (a 2-D mask for a 3-D stack applies to every image); its size-1
axes broadcast. ``reference=`` (``match_histogram``) gets its own convention, and
``reference_mask=`` lines up with it. ``normative_score``'s volume takes the dims of the
histograms' voxels.

``dim=`` (and ``dims=``) speak the convention's names (``dim=("y", "x")`` per image of a
stack), or numpy's axis numbers: ``dim=0`` is the first axis, ``dim=(-2, -1)`` the last two.
For ``xr.DataArray(arr)`` input ``dim="dim_0"`` works too.

What comes back:

- numpy in, numpy out, computed (numpy users expect results, not graphs): a DataArray result
  becomes its values (``result.values``) in the result's dim order (transforms: the input's
  shape; a statistic over ``dim``: the kept axes, in order; a histogram: ``bin`` last; several
  quantiles: ``quantile`` first; a colour map: ``channel`` last). A 0-d result (one threshold,
  one quantile) is a numpy scalar.
- dask in, dask out: ``result.data``, lazy where the function is lazy (transforms given
  ``params``, histograms); what the function computes anyway (a fit, a threshold) comes back
  as numpy, a 0-d one as a numpy scalar.
- ``xr.DataArray(arr)`` in: a DataArray out, with the ``dim_N`` names restored.
- Everything else comes back as it is: fitted :class:`~volnorm.params.Params` (over the
  convention's dims, so ``vn.zscore(other_arr, params=p)`` applies them), a ``Summary`` table,
  the ``Dataset`` of ``normative_score`` (computed for numpy input).

Examples
--------
>>> import numpy as np, volnorm as vn
>>> img = np.array([[0, 64], [128, 255]], dtype="uint8")
>>> vn.rescale(img).round(3)
array([[0.   , 0.251],
       [0.502, 1.   ]], dtype=float32)
>>> float(vn.threshold(img, "mean"))
111.75
>>> stack = np.stack([img, img // 2])               # 3-D: ("volume", "y", "x")
>>> vn.quantile(stack, 0.5, dim=("y", "x")).tolist()  # one median per image
[96.0, 48.0]
>>> with vn.arrays.convention(three_d=("z", "y", "x")):   # 3-D: one volume
...     vn.quantile(stack, 0.5, dim="z").shape
(2, 2)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import dask
import dask.array as da
import dask.local
import dask.threaded
import numpy as np
import xarray as xr

__all__ = ["array_api", "as_dataarray", "convention", "convention_dims"]

#: The 3-D conventions a caller may choose.
THREE_D = (("volume", "y", "x"), ("z", "y", "x"))
#: Dims by number of axes (3-D: the default; see :func:`convention`).
DIMS = {1: ("x",), 2: ("y", "x"), 3: THREE_D[0], 4: ("volume", "z", "y", "x"), 5: ("volume", "t", "z", "y", "x")}
#: Arguments that line up with the data's trailing dims (numpy broadcasting).
BROADCAST_ARGS = ("mask", "weights", "threshold")
#: Arguments named after the dims they speak about.
DIM_ARGS = ("dim", "dims")
_DIM_N = re.compile(r"dim_(\d+)")

Kind = Literal["numpy", "dask", "dim_n"]


@dataclass(frozen=True)
class _Convention:
    three_d: tuple[str, ...] = THREE_D[0]
    rgb: bool = False


_CURRENT: contextvars.ContextVar[_Convention] = contextvars.ContextVar("volnorm_array_convention", default=_Convention())


@contextlib.contextmanager
def convention(*, three_d: tuple[str, str, str] | None = None, rgb: bool | None = None) -> Iterator[None]:
    """Read bare arrays with another convention inside a ``with`` block.

    The setting lives in a :mod:`contextvars` variable: it applies to this thread (or task)
    only, and is restored when the block ends, also on errors.

    Parameters
    ----------
    three_d : tuple of str, optional
        Dims of 3-D arrays: ``("volume", "y", "x")`` (default: a stack of images) or
        ``("z", "y", "x")`` (one volume).
    rgb : bool, optional
        The last axis (size 3 or 4) is colour, named ``channel``. Default False (except for
        :func:`volnorm.invert_colormap`, whose input is always colour).

    Returns
    -------
    contextlib.AbstractContextManager
        A context manager; nothing is yielded.

    Examples
    --------
    >>> import numpy as np, volnorm as vn
    >>> vol = np.arange(24, dtype="float32").reshape(2, 3, 4)
    >>> with vn.arrays.convention(three_d=("z", "y", "x")):
    ...     vn.arrays.convention_dims(vol.ndim)
    ('z', 'y', 'x')
    >>> vn.arrays.convention_dims(vol.ndim)
    ('volume', 'y', 'x')
    """
    current = _CURRENT.get()
    if three_d is not None:
        three_d = tuple(three_d)
        if three_d not in THREE_D:
            raise ValueError(f"`three_d` must be one of {THREE_D[0]!r} or {THREE_D[1]!r}; got {three_d!r}")
        current = replace(current, three_d=three_d)
    if rgb is not None:
        current = replace(current, rgb=bool(rgb))
    token = _CURRENT.set(current)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def convention_dims(ndim: int, *, rgb: bool | None = None) -> tuple[str, ...]:
    """Dims a bare array of ``ndim`` axes gets under the current convention.

    Parameters
    ----------
    ndim : int
        Number of axes.
    rgb : bool, optional
        The last axis is colour (``channel``); default: the current :func:`convention`.

    Returns
    -------
    tuple of str
        The dim names, in axis order.

    Examples
    --------
    >>> convention_dims(2), convention_dims(4)
    (('y', 'x'), ('volume', 'z', 'y', 'x'))
    >>> convention_dims(3, rgb=True)
    ('y', 'x', 'channel')
    """
    current = _CURRENT.get()
    rgb = current.rgb if rgb is None else rgb
    n = ndim - 1 if rgb else ndim
    table = {**DIMS, 3: current.three_d}
    if n not in table:
        what = f"{ndim}-D colour" if rgb else f"{ndim}-D"
        raise ValueError(f"volnorm has no dim convention for a {what} array (it names 1- to 5-D, plus a colour axis); "
                         "wrap it as xr.DataArray(arr, dims=(...)) with the dims it has")
    return table[n] + (("channel",) if rgb else ())


def _kind(x: Any) -> Kind | None:
    if isinstance(x, np.ndarray):
        return "numpy"
    if isinstance(x, da.Array):
        return "dask"
    if isinstance(x, xr.DataArray) and x.ndim and x.dims == tuple(f"dim_{i}" for i in range(x.ndim)):
        return "dim_n"
    return None


def as_dataarray(data: Any, *, dims: tuple[Hashable, ...] | None = None, rgb: bool | None = None) -> xr.DataArray:
    """Wrap a numpy or dask array (or rename a ``dim_N`` DataArray) with the convention's dims.

    A DataArray with dims of its own comes back as it is; nothing is computed or copied.

    Parameters
    ----------
    data : numpy.ndarray, dask.array.Array or xarray.DataArray
        The array.
    dims : tuple, optional
        Dims to give instead of the convention's (as in ``xr.DataArray(data, dims=dims)``).
    rgb : bool, optional
        The last axis is colour, named ``channel`` (size 3 or 4); default: the current
        :func:`convention`.

    Returns
    -------
    xarray.DataArray
        Backed by the same array (numpy stays numpy, dask stays lazy).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> as_dataarray(np.zeros((2, 3, 4))).dims
    ('volume', 'y', 'x')
    >>> as_dataarray(xr.DataArray(np.zeros((5, 5, 3))), rgb=True).dims
    ('y', 'x', 'channel')
    """
    kind = _kind(data)
    if kind is None:
        return data
    names = tuple(dims) if dims is not None else convention_dims(data.ndim, rgb=rgb)
    if names and names[-1] == "channel" and data.shape[-1] not in (3, 4):
        raise ValueError(f"a colour array ends with an axis of 3 (RGB) or 4 (RGBA) channels; got shape {data.shape}")
    if kind == "dim_n":
        return data.rename(dict(zip(data.dims, names, strict=True)))
    return xr.DataArray(data, dims=names)


def _broadcast_operand(value: Any, like: xr.DataArray) -> Any:
    """A bare array lined up with ``like``'s trailing dims; size-1 axes broadcast (numpy's rule)."""
    kind = _kind(value)
    if kind is None or value.ndim == 0:
        return value
    if value.ndim > like.ndim:
        raise ValueError(f"an array of shape {value.shape} does not broadcast to the data's shape {like.shape}")
    names = like.dims[like.ndim - value.ndim:]
    out = value.rename(dict(zip(value.dims, names, strict=True))) if kind == "dim_n" else xr.DataArray(value, dims=names)
    ones = [d for d in names if out.sizes[d] == 1 and like.sizes[d] != 1]
    return out.isel({d: 0 for d in ones}, drop=True) if ones else out


def _axis_name(value: Any, names: tuple[Hashable, ...], kind: Kind) -> Any:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not -len(names) <= value < len(names):
            raise ValueError(f"`dim` axis {value} is out of range for a {len(names)}-D array (dims {names})")
        return names[value]
    if kind == "dim_n" and isinstance(value, str) and (m := _DIM_N.fullmatch(value)) and int(m[1]) < len(names):
        return names[int(m[1])]
    return value


def _dim_names(value: Any, names: tuple[Hashable, ...], kind: Kind) -> Any:
    if isinstance(value, list):
        return [_axis_name(v, names, kind) for v in value]
    if isinstance(value, tuple):
        return tuple(_axis_name(v, names, kind) for v in value)
    return _axis_name(value, names, kind)


def _computed(data: Any) -> np.ndarray:
    """A result's values as numpy: a dask result computed on a local scheduler straight into
    one array (each block stored in place: no concatenated copy, 2 ms per 26 MB); elsewhere
    (a cluster) the usual way."""
    if not isinstance(data, da.Array):
        return np.asarray(data)
    if data.ndim and data.nbytes >= 2**20 and dask.base.get_scheduler(collections=[data]) in (dask.threaded.get, dask.local.get_sync):
        out = np.empty(data.shape, dtype=data.dtype)
        da.store(data, out, lock=False)
        return out
    return np.asarray(data)


def _back(result: Any, kind: Kind, renames: dict[Hashable, Hashable]) -> Any:
    if kind == "dim_n":
        if isinstance(result, (xr.DataArray, xr.Dataset)):
            back = {k: v for k, v in renames.items() if k in result.dims}
            return result.rename(back) if back else result
        return result
    if isinstance(result, xr.DataArray):
        if kind == "numpy":
            values = _computed(result.data)
        else:
            values = result.data
            if not isinstance(values, da.Array):
                values = np.asarray(values)
        return values[()] if isinstance(values, np.ndarray) and values.ndim == 0 else values
    if kind == "numpy" and type(result) is xr.Dataset:
        return result.compute()
    return result


def array_api(func: Callable[..., Any], *, rgb: bool | None = None, like: str | None = None) -> Callable[..., Any]:
    """Make a DataArray function accept numpy and dask arrays (see :mod:`volnorm.arrays`).

    The wrapper has the function's name, docstring and signature; DataArrays with dims of
    their own (and collections) go to the function untouched.

    Parameters
    ----------
    func : callable
        A function whose first argument is the data (a DataArray).
    rgb : bool, optional
        The data's last axis is always colour (``invert_colormap``); default: the current
        :func:`convention`.
    like : str, optional
        Name of the argument whose dims (``bin`` left out) the data takes instead of the
        convention's (``normative_score``'s volume takes its histograms' voxel dims).

    Returns
    -------
    callable
        The wrapped function.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> def total(data: xr.DataArray, *, dim=None) -> xr.DataArray:
    ...     return data.sum(dim)
    >>> array_api(total)(np.ones((2, 3)), dim="x")
    array([3., 3.])
    """
    sig = inspect.signature(func)
    first = next(iter(sig.parameters))

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return func(*args, **kwargs)  # the function's own message
        arguments = bound.arguments
        data = arguments.get(first)
        kind = _kind(data)
        renames: dict[Hashable, Hashable] = {}
        if kind is not None:
            template = arguments.get(like) if like else None
            if isinstance(template, xr.DataArray):
                data = as_dataarray(data, dims=tuple(d for d in template.dims if d != "bin"))
            else:
                data = as_dataarray(data, rgb=rgb)
            renames = {new: old for old, new in zip(arguments[first].dims, data.dims, strict=True)} if kind == "dim_n" else {}
            arguments[first] = data
            for name in DIM_ARGS:
                if name in arguments:
                    arguments[name] = _dim_names(arguments[name], data.dims, kind)
        if isinstance(data, xr.DataArray):
            for name in BROADCAST_ARGS:
                if name in arguments:
                    arguments[name] = _broadcast_operand(arguments[name], data)
        if "reference" in arguments:
            reference = arguments["reference"] = as_dataarray(arguments["reference"])
            if "reference_mask" in arguments and isinstance(reference, xr.DataArray):
                arguments["reference_mask"] = _broadcast_operand(arguments["reference_mask"], reference)
        result = func(*bound.args, **bound.kwargs)
        return result if kind is None else _back(result, kind, renames)

    return wrapper

"""Fitted parameters: what a fit returns, how a result records it, and the one check of ``params=``.

A dataset-wide transform fits first (DESIGN.md, "Fit, then apply"): ``fit_*`` returns
:class:`Params` (small, JSON-serializable, one value per index of the kept dims), and the
transform applies them lazily. Every result records the parameters it was made with in
``attrs["volnorm_params"]`` (:func:`attach`), so a store written from it carries them in its
provenance and ``volnorm apply`` can replay them on new data.

Every function that takes ``params=`` (or ``landmarks=``) checks them with :func:`check`, and
nowhere else:

- the parameters must come from a method the function can use (:data:`ACCEPTS`);
- a ``dim=`` given with them must be the ``dim`` they were fitted over;
- an option of the fit given with them (a value other than the function's default) must be
  the value they were fitted with (:data:`FIT_OPTIONS`);
- parameters fitted per part (per volume, per slice) apply only to data with the same parts:
  the same sizes, and the same coordinate labels where both have them.
"""

from __future__ import annotations

import html
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from volnorm._dims import Dim, split

__all__ = ["ACCEPTS", "FIT_OPTIONS", "MAX_RECORDED_VALUES", "TABLE_DIMS", "Params", "attach", "check", "jsonable", "record"]


@dataclass
class Params:
    """Fitted parameters of a transform: per-index values over the kept dims, and options.

    Parameters
    ----------
    method : str
        The method that fitted them (``"rescale"``, ``"zscore"``, ``"equalize"``, ...).
    values : xarray.Dataset
        The fitted values, over the kept dims of the fit (plus table dims such as ``bin``).
    options : dict
        How they were fitted (``dim``, percentiles, ...), JSON-serializable.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.array([0.0, 5.0, 10.0]), dims="x")
    >>> p = vn.fit_rescale(x)
    >>> p.method, float(p.values["in_lo"]), float(p.values["in_hi"])
    ('rescale', 0.0, 10.0)
    >>> vn.Params.from_json(p.to_json()) == p
    True
    """

    method: str
    values: xr.Dataset
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "values": self.values.to_dict(data="list")}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=jsonable)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Params:
        return cls(d["method"], xr.Dataset.from_dict(d["values"]), dict(d.get("options", {})))

    @classmethod
    def from_json(cls, s: str) -> Params:
        return cls.from_dict(json.loads(s))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Params)
            and self.method == other.method
            and _plain(self.options) == _plain(other.options)
            and self.values.identical(other.values)
        )

    def __repr__(self) -> str:
        vals = ", ".join(f"{k}={_short(v)}" for k, v in self.values.data_vars.items())
        return f"Params({self.method}: {vals}; {self.options})"

    def _repr_html_(self) -> str:
        """Jupyter: the method, its options and every fitted value (long arrays shortened)."""

        def cell(v: xr.DataArray) -> str:
            flat = np.asarray(v.values).ravel()
            shown = ", ".join(f"{x:.6g}" if isinstance(x, (float, np.floating)) else str(x) for x in flat[:12])
            return html.escape(f"[{shown}{', ...' if flat.size > 12 else ''}]" if v.ndim else shown) + (
                f" <small>over {html.escape(str(v.dims))}</small>" if v.ndim else "")

        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td style='text-align:left'>{cell(v)}</td></tr>"
                       for k, v in self.values.data_vars.items())
        opts = html.escape(json.dumps(self.options, default=jsonable))
        return (f"<div><b>volnorm Params: {html.escape(self.method)}</b> <small>options {opts}</small>"
                f"<table>{rows}</table></div>")


def _short(v: xr.DataArray) -> str:
    return f"{float(v):.6g}" if v.ndim == 0 else f"<{v.size} values over {v.dims}>"


def jsonable(o: Any) -> Any:
    """``json.dumps``'s ``default=`` for fitted options: numpy scalars and dtypes as plain values.

    Parameters
    ----------
    o : Any
        What ``json`` could not serialize.

    Returns
    -------
    Any
        A JSON-serializable stand-in.

    Raises
    ------
    TypeError
        For anything else, as ``json`` does.

    Examples
    --------
    >>> import json, numpy as np
    >>> json.dumps({"n": np.int64(3), "dtype": np.dtype("uint8")}, default=jsonable)
    '{"n": 3, "dtype": "uint8"}'
    """
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.dtype):
        return o.name
    if isinstance(o, type) and issubclass(o, np.generic):
        return np.dtype(o).name
    raise TypeError(f"not JSON-serializable: {o!r}")


def _plain(v: Any) -> Any:
    """``v`` as JSON has it (tuples as lists, numpy scalars as numbers): for comparing options."""
    return json.loads(json.dumps(v, default=jsonable))


#: Fitted values larger than this (numbers) are summarized, not copied, in ``attrs`` and
#: provenance: per-slice tables of a large stack would dwarf the metadata (and take longer to
#: serialize than the transform takes to run). Such steps are fitted per part and are fitted
#: again on new data anyway (``volnorm apply``); ``fit_*`` returns them whole.
MAX_RECORDED_VALUES = 100_000


def record(params: Params) -> dict[str, Any]:
    """The provenance entry of ``params``: :meth:`Params.to_dict`, or only the method, options
    and the values' shapes when there are more than :data:`MAX_RECORDED_VALUES` numbers.

    Parameters
    ----------
    params : Params

    Returns
    -------
    dict
        JSON-serializable (with ``default=jsonable``).

    Examples
    --------
    >>> import xarray as xr
    >>> record(Params("zscore", xr.Dataset({"mean": 1.0, "std": 2.0}), {"dim": None}))["values"]["data_vars"]["mean"]["data"]
    1.0
    """
    n = sum(int(v.size) for v in params.values.data_vars.values())
    if n <= MAX_RECORDED_VALUES:
        return params.to_dict()
    shapes = {k: dict(v.sizes) for k, v in params.values.data_vars.items()}
    return {"method": params.method, "options": params.options, "values": None, "values_shapes": shapes}


def attach(y: xr.DataArray, data: xr.DataArray, params: Params) -> xr.DataArray:
    """``y`` with the attrs and name of ``data``, and ``params`` appended to its
    ``attrs["volnorm_params"]`` (a JSON list: the steps that made it, in order).

    Parameters
    ----------
    y : xarray.DataArray
        The transform's result.
    data : xarray.DataArray
        The transform's input.
    params : Params
        What the transform applied.

    Returns
    -------
    xarray.DataArray

    Examples
    --------
    >>> import json, numpy as np, xarray as xr
    >>> x = xr.DataArray(np.zeros(2), dims="x", name="t1", attrs={"units": "a.u."})
    >>> y = attach(x + 1, x, Params("zscore", xr.Dataset({"mean": 0.0, "std": 1.0})))
    >>> y.name, y.attrs["units"], [s["method"] for s in json.loads(y.attrs["volnorm_params"])]
    ('t1', 'a.u.', ['zscore'])
    """
    y.attrs = {k: v for k, v in data.attrs.items() if k not in ("volnorm_params",)}
    history = json.loads(data.attrs.get("volnorm_params", "[]"))
    y.attrs["volnorm_params"] = json.dumps(history + [record(params)], default=jsonable)
    return y.rename(data.name)


# ---------------------------------------------------------------------------
# the one check of params=
# ---------------------------------------------------------------------------

#: For each function that takes fitted parameters, the methods whose parameters it can use:
#: its own, and those that hold the same values (gamma, log and auto_gamma with
#: ``scale="data"`` all fit the maximum and the mean over ``dim``; with ``scale="dtype"``
#: gamma and log fit nothing and auto_gamma the mean; gamma takes its exponent from its own
#: argument). Parameters recorded before ``scale=`` existed are ``scale="data"``.
ACCEPTS: dict[str, tuple[str, ...]] = {
    "rescale": ("rescale",),
    "zscore": ("zscore",),
    "mean_scale": ("mean_scale",),
    "gamma": ("gamma", "log", "auto_gamma"),
    "log": ("log", "gamma", "auto_gamma"),
    "auto_gamma": ("auto_gamma", "gamma", "log"),
    "equalize": ("equalize",),
    "nyul_apply": ("nyul",),
    "quantize": ("quantize",),
    "whitestripe": ("whitestripe",),
    "kde": ("kde",),
    "fcm": ("fcm",),
    "lsq": ("lsq",),
}

#: For each method, the options its record holds that decide the result (``dim`` aside): the
#: fit's, and for gamma, log and auto_gamma the map's too (``scale``: the dtype's full scale or
#: the data's max; ``gain``, ``inv``, ``out_range``). Given again with the parameters (a value
#: other than the function's default), they must agree with the record; left at the default,
#: the record decides. gamma, log and auto_gamma compare only ``scale`` with each other's
#: parameters (each keeps its own map options).
FIT_OPTIONS: dict[str, tuple[str, ...]] = {
    "rescale": ("in_range", "percentiles"),
    "zscore": (),
    "mean_scale": ("target", "per_volume"),
    "gamma": ("gamma", "scale", "gain", "out_range"),
    "log": ("scale", "gain", "inv", "out_range"),
    "auto_gamma": ("scale", "out_range"),
    "equalize": ("nbins",),
    "nyul": (),
    "quantize": ("n_colors", "seed"),
    "whitestripe": ("width_l", "width_u", "modality"),
    "kde": ("modality",),
    "fcm": ("tissue", "fuzziness", "error", "max_iter", "seed"),
    "lsq": ("norm_value", "standard", "fuzziness", "error", "max_iter", "seed"),
}

#: For each method, the dims of its values that are tables (bins, landmarks, a palette), not
#: parts of the data; ``None``: the values are one table for all the data. Every other dim of
#: the values is a kept dim of the fit (per volume, per slice): the data must have the same.
TABLE_DIMS: dict[str, tuple[str, ...] | None] = {
    "equalize": ("bin",),
    "nyul": ("landmark", "volume"),  # volume_landmarks records the fitted volumes' own; not applied
    "match_histogram": ("value",),
    "quantize": None,
    "fcm": ("tissue",),  # per volume: the three classes' centres and means
    "lsq": ("tissue",),  # the standard tissue means, and per volume each class's mean
}

_NO_DEFAULT = inspect.Parameter.empty


def check(
    params: Any, fn: Callable[..., Any], data: xr.DataArray, *, dim: Dim = None, arg: str = "params", **options: Any
) -> Params:
    """Check fitted parameters given to ``fn`` against the data and the other arguments.

    The rules (see the module's docstring): the parameters' method is one ``fn`` accepts
    (:data:`ACCEPTS`); a ``dim`` given (not ``None``) reduces over the same dims as the fit's;
    each of ``options`` that differs from ``fn``'s default for it and is a fit option of the
    parameters' method (:data:`FIT_OPTIONS`) equals the recorded value; per-part parameters
    have the data's parts (sizes, and coordinate labels where both have them).

    Parameters
    ----------
    params : Params
        What the caller gave.
    fn : callable
        The function that was given them (its name and defaults are used).
    data : xarray.DataArray
        The data they are to be applied to.
    dim : hashable, sequence of hashable or None
        The ``dim=`` the caller gave.
    arg : str
        The name of ``fn``'s argument that holds the parameters, for messages.
    **options
        The caller's other arguments, as given.

    Returns
    -------
    Params
        ``params``, unchanged.

    Raises
    ------
    TypeError
        If ``params`` is not a :class:`Params`.
    ValueError
        Naming what the parameters were fitted with and what was given.

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.arange(6.0).reshape(2, 3), dims=("volume", "x"))
    >>> p = vn.fit_zscore(x)
    >>> check(p, vn.zscore, x) is p
    True
    >>> check(p, vn.gamma, x, gamma=2.0)
    Traceback (most recent call last):
    ...
    ValueError: gamma(params=...): these parameters were fitted by 'zscore', not gamma; gamma takes parameters fitted by gamma / log / auto_gamma
    >>> check(p, vn.zscore, x, dim="x")
    Traceback (most recent call last):
    ...
    ValueError: zscore(params=...): dim='x' was given, but these parameters were fitted over dim=None (the whole dataset); give the same dim, or none (the parameters decide)
    """
    name = fn.__name__
    where = f"{name}({arg}=...)"
    if not isinstance(params, Params):
        raise TypeError(f"{where}: expected volnorm.Params (from a fit_* function or Params.from_dict); got {type(params).__name__}")
    accepted = ACCEPTS[name]
    if params.method not in accepted:
        raise ValueError(
            f"{where}: these parameters were fitted by {params.method!r}, not {name}; "
            f"{name} takes parameters fitted by {' / '.join(accepted)}"
        )
    if dim is not None:
        fitted = params.options.get("dim")
        over = {str(d) for d in data.dims} if fitted is None else {str(d) for d in fitted}
        if {str(d) for d in split(data, dim)[1]} != over:
            raise ValueError(
                f"{where}: dim={dim!r} was given, but these parameters were fitted over dim={fitted!r}"
                + (" (the whole dataset)" if fitted is None else "")
                + "; give the same dim, or none (the parameters decide)"
            )
    defaults = inspect.signature(fn).parameters
    for key, value in options.items():
        default = defaults[key].default if key in defaults else _NO_DEFAULT
        if key not in FIT_OPTIONS.get(params.method, ()) or (default is not _NO_DEFAULT and _plain(value) == _plain(default)):
            continue
        recorded = params.options.get(key)
        if _plain(value) != _plain(recorded):
            raise ValueError(
                f"{where}: {key}={value!r} was given, but these parameters were fitted with {key}={recorded!r}; "
                "leave it out (the parameters decide) or fit again"
            )
    _check_parts(params, data, where)
    return params


def _check_parts(params: Params, data: xr.DataArray, where: str) -> None:
    """Per-part values (over kept dims of the fit) belong to data with the same parts."""
    table = TABLE_DIMS.get(params.method, ())
    if table is None:
        return
    for v in params.values.data_vars.values():
        for d in v.dims:
            if d in table:
                continue
            n = v.sizes[d]
            if d not in data.dims or data.sizes[d] != n:
                raise ValueError(
                    f"{where}: these {params.method} parameters were fitted per {d!r} on {n} of them; the data have "
                    f"{data.sizes.get(d, 0)}: fit again (per-part parameters belong to the data they were fitted on)"
                )
            ours, theirs = params.values.indexes.get(d), data.indexes.get(d)
            if ours is not None and theirs is not None and not ours.equals(theirs):
                raise ValueError(
                    f"{where}: these {params.method} parameters were fitted per {d!r} on {_few(ours)}; the data's "
                    f"{d!r} are {_few(theirs)}: fit again, or select the same {d!r} (per-part parameters belong "
                    "to the data they were fitted on)"
                )


def _few(labels: Any, n: int = 6) -> str:
    """Coordinate labels for a message: all of a few, the first ``n`` of many."""
    shown = [str(v) for v in list(labels[:n])]
    return "[" + ", ".join(shown) + (f", ... ({len(labels)} in all)" if len(labels) > n else "") + "]"

"""What ``dim`` means, in Python and in words: the one split and the one translator.

In Python, ``dim=`` names the dims a statistic is computed **over**, exactly as
xarray's reductions do. The command line and specs say the same thing with one
word, ``per``, resolved here and nowhere else:

==============  ================================  =====================================
``per``         Python ``dim=``                   one statistic (threshold, fit) per
==============  ================================  =====================================
``dataset``     ``None``                          the whole stack or collection (default)
``volume``      every dim but ``volume``          volume (``("z", "y", "x")``)
``slice``       ``("y", "x")``                    slice of each volume
``voxel``       ``"volume"``                      voxel, across the volumes
==============  ================================  =====================================

A spec or ``--step`` may also give ``dim:`` as a list of dim names (``dim: [y, x]``):
it means what it means in Python. Earlier spellings are still read, with a
:class:`~volnorm._utils.VolnormDeprecationWarning` naming the new one:
``dim: volume`` and ``dim: per-volume`` (they meant one per volume in specs and on
the command line, which is ``per: volume``; in Python ``dim="volume"`` is per
voxel, so the bare word was two things) and ``dim: slice`` (``per: slice``).

>>> split(("volume", "z", "y", "x"), dim_for("volume", ("volume", "z", "y", "x")))
(('volume',), ('z', 'y', 'x'))
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import xarray as xr

from volnorm._utils import VolnormDeprecationWarning

#: What ``dim=`` takes: a dim name, several, or ``None`` for all of them.
Dim = Union[Hashable, Sequence[Hashable], None]

#: The ``per`` words of the command line and specs, and what each means.
PER: dict[str, str] = {
    "dataset": "one over the whole dataset (dim=None)",
    "volume": "one per volume (dim = every dim but volume)",
    "slice": "one per slice (dim=('y', 'x'))",
    "voxel": "one per voxel, across the volumes (dim='volume')",
}

#: Earlier ``dim`` words of specs and ``--step`` and the ``per`` word each stands for.
LEGACY_DIM_WORDS: dict[str, str] = {"volume": "volume", "per-volume": "volume", "slice": "slice"}


def dims_of(data: Any) -> tuple[Hashable, ...]:
    """The dims of a DataArray, or of every image of a collection (``DataTree``), in order.

    Parameters
    ----------
    data : xarray.DataArray, xarray.DataTree or sequence of dim names

    Returns
    -------
    tuple
        The dim names.

    Examples
    --------
    >>> dims_of(("volume", "y", "x"))
    ('volume', 'y', 'x')
    """
    if isinstance(data, xr.DataTree):
        seen: dict[Hashable, None] = {}
        for node in data.subtree:
            for name in node.data_vars:
                seen.update(dict.fromkeys(node[name].dims))
        return tuple(seen)
    if isinstance(data, (xr.DataArray, xr.Dataset)):
        return tuple(data.dims)
    return tuple(data)


def split(data: Any, dim: Dim) -> tuple[tuple, tuple]:
    """Split the dims of ``data`` into the kept and the reduced ones for ``dim=``.

    Parameters
    ----------
    data : xarray.DataArray or sequence of dim names
    dim : hashable, sequence of hashable or None
        The dims to reduce over; ``None``: all of them.

    Returns
    -------
    (kept, reduced) : tuple, tuple
        Both in the data's dim order for ``kept``; ``reduced`` in the order given.

    Raises
    ------
    ValueError
        If ``dim`` names a dim the data lack, or is empty.

    Examples
    --------
    >>> split(("volume", "y", "x"), "volume")
    (('y', 'x'), ('volume',))
    >>> split(("volume", "y", "x"), None)
    ((), ('volume', 'y', 'x'))
    """
    dims = dims_of(data)
    if dim is None:
        reduced = dims
    elif isinstance(dim, str) or not isinstance(dim, Sequence):
        reduced = (dim,)
    else:
        reduced = tuple(dim)
    unknown = [d for d in reduced if d not in dims]
    if unknown:
        raise ValueError(f"`dim` names {unknown!r}, which the data do not have; its dims are {dims!r}.")
    if not reduced:
        raise ValueError("`dim` must name at least one dim (or be None for the whole dataset).")
    return tuple(d for d in dims if d not in reduced), reduced


def reduced_names(data: Any, dim: Dim) -> list[str] | None:
    """``dim`` as provenance records it: the reduced dims' names, or ``None`` for all.

    Parameters
    ----------
    data : xarray.DataArray or sequence of dim names
    dim : hashable, sequence of hashable or None

    Returns
    -------
    list of str or None

    Examples
    --------
    >>> reduced_names(("volume", "y", "x"), ("y", "x"))
    ['y', 'x']
    """
    if dim is None:
        return None
    return [str(d) for d in split(data, dim)[1]]


def volume_dims(data: Any, what: str = "this") -> tuple[Hashable, ...]:
    """The dims of one volume (every dim but ``volume``) of a stack: ``per volume``.

    Parameters
    ----------
    data : xarray.DataArray or sequence of dim names
        A stack (with a ``volume`` dim).
    what : str
        What needs them, for the error message.

    Returns
    -------
    tuple

    Raises
    ------
    ValueError
        If the data have no ``volume`` dim.

    Examples
    --------
    >>> volume_dims(("volume", "z", "y", "x"))
    ('z', 'y', 'x')
    """
    dims = dims_of(data)
    if "volume" not in dims:
        raise ValueError(f"{what} works per volume: the data need a `volume` dim (a stack); its dims are {dims!r}")
    return tuple(d for d in dims if d != "volume")


def dim_for(per: str | None, data: Any) -> Dim:
    """The Python ``dim=`` for a ``per`` word (see the table above), given the data's dims.

    Parameters
    ----------
    per : {"dataset", "volume", "slice", "voxel"} or None
        ``None`` is ``"dataset"``.
    data : xarray.DataArray, xarray.DataTree or sequence of dim names

    Returns
    -------
    hashable, tuple or None

    Raises
    ------
    ValueError
        For another word, or data without the dims the word needs.

    Examples
    --------
    >>> dim_for("slice", ("volume", "z", "y", "x")), dim_for("voxel", ("volume", "y", "x"))
    (('y', 'x'), 'volume')
    >>> dim_for("volume", ("z", "y", "x"))   # one volume: over all of it
    ('z', 'y', 'x')
    """
    dims = dims_of(data)
    if per is None or per == "dataset":
        return None
    if per == "volume":
        return tuple(d for d in dims if d != "volume")
    if per == "slice":
        if "y" not in dims or "x" not in dims:
            raise ValueError(f"per slice needs dims y and x; the data's are {dims!r}")
        return ("y", "x")
    if per == "voxel":
        if "volume" not in dims:
            raise ValueError(f"per voxel is across the volumes: the data need a `volume` dim; theirs are {dims!r}")
        return "volume"
    raise ValueError(f"per must be one of {', '.join(PER)}; got {per!r}")


def words(options: Mapping[str, Any], what: str, *, allowed: Sequence[str] = tuple(PER), warn: bool = True) -> dict[str, Any]:
    """Check the ``per`` / ``dim`` words of a spec's or the command line's options.

    ``per`` must be one of ``allowed``. An earlier ``dim`` word (:data:`LEGACY_DIM_WORDS`)
    becomes its ``per`` word with a :class:`~volnorm._utils.VolnormDeprecationWarning`.
    ``dim`` as dim names is left as it is (it means what it means in Python). Both ``per``
    and ``dim`` is an error.

    Parameters
    ----------
    options : mapping
        The options (not changed).
    what : str
        Where they come from, for messages (e.g. ``"step 'zscore'"``).
    allowed : sequence of str
        The ``per`` words this consumer takes.
    warn : bool
        Warn about a legacy word (once, where the options are read; not again when they run).

    Returns
    -------
    dict
        The options with ``per`` in place of a legacy ``dim`` word.

    Raises
    ------
    ValueError
        For an unknown or not allowed ``per`` word, or ``per`` with ``dim``.

    Examples
    --------
    >>> words({"per": "volume", "percentiles": [1, 99]}, "step 'rescale'")
    {'per': 'volume', 'percentiles': [1, 99]}
    """
    out = dict(options)
    dim = out.get("dim")
    if isinstance(dim, str) and dim in LEGACY_DIM_WORDS:
        if "per" in out:
            raise ValueError(f"{what}: give `per` or `dim`, not both")
        per = LEGACY_DIM_WORDS[dim]
        if warn:
            warnings.warn(
                f"{what}: `dim: {dim}` is deprecated; write `per: {per}` ({PER[per]}). In Python, dim='volume' "
                "means across the volumes (per: voxel), so the bare word meant two things.",
                VolnormDeprecationWarning, stacklevel=3,
            )
        del out["dim"]
        out = {"per": per, **out}
    if "per" in out:
        if "dim" in out:
            raise ValueError(f"{what}: give `per` or `dim`, not both (per {out['per']!r}, dim {out['dim']!r})")
        if out["per"] not in allowed:
            raise ValueError(f"{what}: per must be one of {', '.join(allowed)}; got {out['per']!r}")
    return out


def resolve(options: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """Options checked by :func:`words`, with ``per`` turned into Python's ``dim=`` for ``data``.

    Parameters
    ----------
    options : mapping
    data : xarray.DataArray, xarray.DataTree or sequence of dim names

    Returns
    -------
    dict

    Examples
    --------
    >>> resolve({"per": "volume", "clip": True}, ("volume", "y", "x"))
    {'clip': True, 'dim': ('y', 'x')}
    """
    out = dict(options)
    if "per" in out:
        dim = dim_for(out.pop("per"), data)
        if dim is not None:
            out["dim"] = dim
    return out

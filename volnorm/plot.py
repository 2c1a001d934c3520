"""Pictures of histograms (matplotlib, the ``volnorm[plot]`` extra; no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt  # headless machines fall back to Agg by themselves
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("plots need matplotlib: pip install 'volnorm[plot]'") from e
    return plt


def plot_histogram(
    hist: xr.DataArray,
    *,
    ax: Any = None,
    log: bool = False,
    thresholds: Mapping[str, float] | None = None,
    density: bool | None = None,
    title: str | None = None,
) -> Any:
    """Draw a histogram from :func:`volnorm.histogram`; one line per index of its other dims.

    Parameters
    ----------
    hist : xarray.DataArray
        Counts with a ``bin`` dim (``bin_lower``/``bin_upper`` coords); any
        other dim (e.g. ``volume``) gives overlaid lines.
    ax : matplotlib Axes, optional
        Drawn into; a new figure otherwise.
    log : bool
        Logarithmic count axis.
    thresholds : mapping name -> value, optional
        Vertical lines with labels (e.g. ``{"otsu": 412.0}``).
    density : bool, optional
        Divide each line by its total (default: when several lines are drawn,
        so volumes of different sizes compare).
    title : str, optional

    Returns
    -------
    matplotlib Axes

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.random.default_rng(0).normal(size=(3, 500)), dims=("volume", "x"))
    >>> ax = vn.plot.plot_histogram(vn.histogram(x, dim="x", bins=40), thresholds={"otsu": 0.0})
    >>> len(ax.patches), len(ax.lines)   # three volumes, one threshold
    (3, 1)
    """
    plt = _pyplot()
    if "bin" not in hist.dims:
        raise ValueError("`hist` must have a `bin` dim (a result of volnorm.histogram)")
    h = hist.compute()
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    others = [d for d in h.dims if d != "bin"]
    rows = h.transpose(*others, "bin").values.reshape(-1, h.sizes["bin"]).astype(np.float64)
    labels: list[str] = ["all"] if not others else [
        "/".join(str(h[d].values[i]) if d in h.coords else str(i) for d, i in zip(others, idx))
        for idx in np.ndindex(*(h.sizes[d] for d in others))
    ]
    if density is None:
        density = len(rows) > 1
    edges = np.concatenate([h["bin_lower"].values, h["bin_upper"].values[-1:]])
    many = len(rows) > 12
    for row, label in zip(rows, labels):
        y = row / max(row.sum(), 1) if density else row
        ax.stairs(y, edges, label=None if many else label, alpha=0.35 if many else 0.9, linewidth=1)
    for i, (name, value) in enumerate((thresholds or {}).items()):
        ax.axvline(float(value), color=f"C{(i + 3) % 10}", linestyle="--", linewidth=1.2, label=f"{name} = {float(value):.4g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(str(h.attrs.get("long_name", "intensity")))
    ax.set_ylabel("fraction of voxels" if density else "voxels")
    extra = {k: int(np.sum(h[k].values)) for k in h.coords if str(k).startswith("n_") and np.sum(h[k].values)}
    note = ", ".join(f"{k[2:]}: {v}" for k, v in extra.items())
    ax.set_title((title or "histogram") + (f"  (not in bins: {note})" if note else ""), fontsize=10)
    if not many or thresholds:
        ax.legend(fontsize=8, loc="best")
    return ax

"""Pictures of histograms (matplotlib, the ``volnorm[plot]`` extra; no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from volnorm._histogram import histogram, parts_of
from volnorm.io.readers import open_images, open_nifti, open_zarr
from volnorm.io.store import read_manifest

__all__ = ["plot_exposure", "plot_histogram", "plot_map", "plot_mask_overlay", "plot_montage", "preview"]

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


# ---------------------------------------------------------------------------
# slices: montages before/after, mask overlays, per-voxel maps, a store's preview
# ---------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure not attached to pyplot (no GUI, nothing left open) that Jupyter
    shows as a PNG (``_repr_png_``)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("plots need matplotlib: pip install 'volnorm[plot]'") from e

    class PictureFigure(Figure):
        def _repr_png_(self) -> bytes:
            import io

            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=90)
            return buf.getvalue()

    return PictureFigure(figsize=(width, height), layout="constrained")


def _volume_names(data: xr.DataArray) -> list[str]:
    if "volume" not in data.dims:
        return [str(data["volume"].values) if "volume" in data.coords else "volume"]
    if "volume" in data.coords:
        return [str(v) for v in data["volume"].values]
    return [str(i) for i in range(data.sizes["volume"])]


def _panels(vol: xr.DataArray, axis: str, n: int) -> list[tuple[str, np.ndarray]]:
    """``n`` 2-D slices of one volume (evenly between 25% and 75% along ``axis``), or the
    image itself when the volume is 2-D; (label, array) with rows = the first remaining dim."""
    vol = vol.squeeze(drop=True) if vol.ndim > 2 else vol
    if vol.ndim == 2:
        return [("", np.asarray(vol.values, dtype=np.float64))]
    if axis not in vol.dims:
        raise ValueError(f"`axis` {axis!r} is not a dim of the data {tuple(vol.dims)}")
    size = vol.sizes[axis]
    idx = sorted({int(round(f * (size - 1))) for f in np.linspace(0.25, 0.75, n)}) if n > 1 else [size // 2]
    out = []
    for i in idx:
        sl = vol.isel({axis: i})
        while sl.ndim > 2:  # e.g. a time dim: its first frame
            sl = sl.isel({sl.dims[0]: 0})
        out.append((f"{axis}={i}", np.asarray(sl.values, dtype=np.float64)))
    return out


def _origin(data: xr.DataArray) -> str:
    """Slices of volumes (a ``z`` dim): y up, as scanners' viewers show them; 2-D images: row 0 on top."""
    return "lower" if "z" in data.dims else "upper"


def _show(ax: Any, img: np.ndarray, title: str, cmap: str = "gray", vrange: tuple[float, float] | None = None, origin: str = "lower") -> Any:
    finite = img[np.isfinite(img)]
    if vrange is None:
        vrange = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99))) if finite.size else (0.0, 1.0)
    if vrange[0] == vrange[1]:
        vrange = (vrange[0] - 0.5, vrange[1] + 0.5)
    im = ax.imshow(img, cmap=cmap, vmin=vrange[0], vmax=vrange[1], origin=origin, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _pick(data: xr.DataArray, volumes: int | list[int] | None) -> list[int]:
    n = data.sizes.get("volume", 1)
    if volumes is None:
        volumes = min(n, 3)
    idx = list(range(min(int(volumes), n))) if isinstance(volumes, (int, np.integer)) else [int(v) for v in volumes]
    if not idx or any(i < 0 or i >= n for i in idx):
        raise ValueError(f"`volumes` must pick among {n} volumes; got {volumes!r}")
    return idx


def _one(data: xr.DataArray, i: int) -> xr.DataArray:
    return data.isel(volume=i) if "volume" in data.dims else data


def plot_montage(
    data: xr.DataArray,
    after: xr.DataArray | None = None,
    *,
    volumes: int | list[int] | None = None,
    slices: int = 3,
    axis: str = "z",
    cmap: str = "gray",
    titles: tuple[str, str] = ("before", "after"),
) -> Any:
    """Slices of a few volumes, and the same slices after a transform, side by side.

    Each volume gets a row of ``slices`` slices along ``axis`` (2-D image stacks: the image
    itself); with ``after``, the transformed row follows. Each panel is displayed over its
    own 1-99 % range (a linear rescale looks the same; equalization or a Nyúl map shows).

    Parameters
    ----------
    data : xarray.DataArray
        A stack ``(volume, z, y, x)`` or ``(volume, y, x)``, or one volume.
    after : xarray.DataArray, optional
        The same volumes transformed (e.g. ``equalize(data)``).
    volumes : int or list of int, optional
        How many of the first volumes (default 3), or which.
    slices : int
        Slices per volume (default 3, between 25% and 75% of ``axis``).
    axis : str
        The dim slices are taken across (default ``"z"``).
    cmap : str
    titles : (str, str)
        Labels of the two rows.

    Returns
    -------
    matplotlib.figure.Figure
        Save it with ``fig.savefig("montage.png")``; Jupyter shows it.

    Examples
    --------
    >>> import volnorm as vn
    >>> x = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> fig = vn.plot.plot_montage(x, vn.rescale(x, percentiles=(1, 99)), slices=2)
    >>> len(fig.axes)   # 1 volume x 2 rows x 2 slices
    4
    """
    idx = _pick(data, volumes)
    rows = []
    for i in idx:
        name = _volume_names(data)[i] if "volume" in data.dims else _volume_names(data)[0]
        rows.append((f"{name} {titles[0]}" if after is not None else name, _panels(_one(data, i), axis, slices), None))
        if after is not None:
            rows.append((f"{name} {titles[1]}", _panels(_one(after, i), axis, slices), "after"))
    ncol = max(len(r[1]) for r in rows)
    if ncol == 1:  # 2-D images: one column per image, before and after in rows
        per = 2 if after is not None else 1
        fig = _figure(2.4 * len(idx), 2.4 * per)
        axes = fig.subplots(per, len(idx), squeeze=False)
        for k, (label, panels, _) in enumerate(rows):
            _show(axes[k % per, k // per], panels[0][1], label, cmap, origin=_origin(data))
        return fig
    fig = _figure(2.4 * ncol, 2.4 * len(rows))
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (label, panels, _) in enumerate(rows):
        for c in range(ncol):
            ax = axes[r, c]
            if c >= len(panels):
                ax.set_axis_off()
                continue
            where, img = panels[c]
            _show(ax, img, f"{label} {where}".strip(), cmap, origin=_origin(data))
    return fig


def plot_mask_overlay(
    data: xr.DataArray,
    mask: xr.DataArray,
    *,
    volume: int = 0,
    slices: int = 3,
    axis: str = "z",
    color: str = "tab:red",
    alpha: float = 0.35,
) -> Any:
    """A mask (e.g. an Otsu brain mask) drawn in colour over the anatomy of one volume.

    Parameters
    ----------
    data : xarray.DataArray
        A stack or one volume.
    mask : xarray.DataArray of bool
        On the data's grid, with or without the ``volume`` dim (e.g.
        ``data > threshold(data, "otsu")``).
    volume : int
        Which volume (default the first).
    slices : int
        Slices per volume, as in :func:`plot_montage`.
    axis : str
        The dim slices are taken across, as in :func:`plot_montage`.
    color : str
        The mask's colour.
    alpha : float
        The mask's opacity.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import volnorm as vn
    >>> x = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> fig = vn.plot.plot_mask_overlay(x, x > vn.threshold(x, "otsu"))
    >>> len(fig.axes)
    3
    """
    from matplotlib.colors import ListedColormap

    img_panels = _panels(_one(data, volume), axis, slices)
    m = mask.isel(volume=volume) if "volume" in mask.dims else mask
    mask_panels = _panels(m.astype(np.float64), axis, slices)
    if len(mask_panels) != len(img_panels):
        raise ValueError("`mask` is not on the data's grid")
    name = _volume_names(data)[volume] if "volume" in data.dims else _volume_names(data)[0]
    fig = _figure(2.8 * len(img_panels), 3.0)
    axes = fig.subplots(1, len(img_panels), squeeze=False)[0]
    overlay = ListedColormap([(0, 0, 0, 0), color])
    for ax, (where, img), (_, mk) in zip(axes, img_panels, mask_panels):
        if mk.shape != img.shape:
            raise ValueError(f"`mask` slices are {mk.shape}, the data's {img.shape}: not on the data's grid")
        _show(ax, img, f"{name} {where}  mask {100 * float(np.mean(mk > 0)):.0f}%".strip(), origin=_origin(data))
        ax.imshow(mk > 0, cmap=overlay, alpha=alpha, vmin=0, vmax=1, origin=_origin(data), interpolation="nearest")
    return fig


def plot_map(
    stat: xr.DataArray,
    *,
    slices: int = 3,
    axis: str = "z",
    cmap: str = "magma",
    label: str | None = None,
    vrange: tuple[float, float] | None = None,
) -> Any:
    """A per-voxel statistic map (e.g. ``voxel_stats(h)["mean"]`` or a normative score)
    as slices with a shared colour bar.

    Parameters
    ----------
    stat : xarray.DataArray
        One value per voxel: ``(z, y, x)`` or ``(y, x)``.
    slices : int
        Slices per volume, as in :func:`plot_montage`.
    axis : str
        The dim slices are taken across, as in :func:`plot_montage`.
    cmap : str
    label : str, optional
        The colour bar's label (default: the array's name).
    vrange : (lo, hi), optional
        Colour range (default: 1-99 % of the finite values).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> m = xr.DataArray(np.random.default_rng(0).random((8, 16, 16)), dims=("z", "y", "x"), name="p")
    >>> len(vn.plot.plot_map(m).axes)   # 3 slices + the colour bar
    4
    """
    panels = _panels(stat, axis, slices)
    values = np.concatenate([p.ravel() for _, p in panels])
    finite = values[np.isfinite(values)]
    if vrange is None:
        vrange = (float(np.percentile(finite, 1)), float(np.percentile(finite, 99))) if finite.size else (0.0, 1.0)
    fig = _figure(2.8 * len(panels) + 0.8, 3.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (where, img) in zip(axes, panels):
        im = _show(ax, img, where, cmap, vrange, origin=_origin(stat))
    fig.colorbar(im, ax=list(axes), shrink=0.85, label=label or str(stat.name or "value"))
    return fig


def preview(
    store: Any,
    out: Any = None,
    *,
    volumes: int = 3,
    slices: int = 3,
    bins: int = 128,
    overwrite: bool = False,
) -> Any:
    """A one-page summary of a volnorm store: slices of a few volumes before and after its
    steps, and their histograms before and after (volumes overlaid).

    "Before" is the store's sources (the NIfTI files or images its manifest names), when
    they are still there and the store holds transformed data; otherwise only the store
    is shown.

    Parameters
    ----------
    store : path
        A volnorm store (``volnorm convert``, ``volnorm run``, ``to_zarr``).
    out : path, optional
        Write the page there (PNG, SVG or PDF by its suffix).
    volumes : int
        How many volumes (the first ones).
    slices : int
        Slices per volume.
    bins : int
        Histogram bins.
    overwrite : bool
        Replace an existing ``out`` (refused otherwise).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import tempfile, os, volnorm as vn
    >>> d = tempfile.mkdtemp()
    >>> x = vn.open_nifti(vn.datasets.nibabel_files()["anatomical.nii"])
    >>> vn.to_zarr(vn.rescale(x, percentiles=(1, 99)), os.path.join(d, "s.zarr"))
    >>> fig = vn.plot.preview(os.path.join(d, "s.zarr"), os.path.join(d, "preview.png"))
    >>> os.path.getsize(os.path.join(d, "preview.png")) > 10_000
    True
    """
    from pathlib import Path

    store = Path(store)
    m = read_manifest(store)
    if m is None:
        raise ValueError(f"{store}: not a volnorm store (no volnorm manifest)")
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out}: exists; pass overwrite=True (CLI: --overwrite) to replace it")
    after = open_zarr(store)
    steps = ", ".join(st.get("method", "?") for st in m.get("steps", [])) or "none"
    if isinstance(after, xr.DataTree):  # volumes of different shapes: each on its own

        parts = parts_of(after)
        chosen = [(str(name).strip("/"), img) for name, img, _ in parts[: max(1, int(volumes))]]
        befores: list | None = None
        about = f"{len(parts)} volumes of different shapes"
    else:
        idx = _pick(after, volumes)
        before = _sources(m, after, idx) if m.get("steps") else None
        after_sel = after.isel(volume=idx) if "volume" in after.dims else after
        chosen = list(zip(_volume_names(after_sel), [_one(after_sel, k) for k in range(len(idx))]))
        befores = None if before is None else [_one(before, k) for k in range(len(idx))]
        spatial = tuple(d for d in after.dims if d != "volume")
        about = f"{after.sizes.get('volume', 1)} volume(s) {dict((d, after.sizes[d]) for d in spatial)} {after.dtype}"
    rows = len(chosen) * (2 if befores is not None else 1)
    ncol = max(slices, 2)
    fig = _figure(2.4 * ncol, 2.4 * rows + 3.2)
    grid = fig.add_gridspec(rows + 1, ncol, height_ratios=[1] * rows + [1.3])
    r = 0
    for k, (name, vol) in enumerate(chosen):
        pairs = [("before", befores[k]), ("after", vol)] if befores is not None else [("", vol)]
        for tag, v in pairs:
            axis = "z" if "z" in v.dims else [d for d in v.dims if d != "volume"][0]
            for c, (where, img) in enumerate(_panels(v, axis, slices)[:ncol]):
                _show(fig.add_subplot(grid[r, c]), img, f"{name} {tag} {where}".replace("  ", " ").strip(), origin=_origin(v))
            r += 1
    if befores is not None:
        _histograms(fig.add_subplot(grid[rows, : ncol // 2]), [(n, b) for (n, _), b in zip(chosen, befores)], bins, "before")
        _histograms(fig.add_subplot(grid[rows, ncol // 2 :]), chosen, bins, f"after ({steps})")
    else:
        _histograms(fig.add_subplot(grid[rows, :]), chosen, bins, f"{store.name} (steps: {steps})")
    fig.suptitle(f"{store.name}: {about}; steps: {steps}", fontsize=10)
    if out is not None:
        fig.savefig(out, dpi=110)
    return fig


def _histograms(ax: Any, vols: list[tuple[str, xr.DataArray]], bins: int, title: str) -> Any:
    """One line per volume (fraction of its voxels per bin), each on its own bins."""
    for name, v in vols:
        h = histogram(v.astype(np.float64), bins=bins).compute()
        counts = h.values.astype(np.float64)
        edges = np.concatenate([h["bin_lower"].values, h["bin_upper"].values[-1:]])
        ax.stairs(counts / max(counts.sum(), 1), edges, label=name, linewidth=1)
    ax.set_yscale("log")  # a background peak would flatten the rest
    ax.set_xlabel("intensity")
    ax.set_ylabel("fraction of voxels (log)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return ax


def _sources(m: dict, after: xr.DataArray, idx: list[int]) -> xr.DataArray | None:
    """The store's source volumes ``idx`` (files its manifest names), if they are still there."""
    from pathlib import Path

    paths = list(m.get("pipeline", {}).get("inputs", [])) or [s.get("path") for s in m.get("inputs", []) if isinstance(s, dict)]
    if len(paths) != after.sizes.get("volume", 1) or not all(p and Path(p).is_file() for p in paths):
        return None
    chosen = [paths[i] for i in idx]
    try:
        src = open_nifti(chosen) if m.get("kind") != "images" else open_images(chosen)
    except (OSError, ValueError):
        return None
    return src if src.shape[1:] == after.shape[1:] else None


def plot_exposure(report: xr.Dataset, *, title: str | None = None) -> Any:
    """Draw :func:`volnorm.color.exposure`'s report: brightness and mean luma per image with
    the 0-10 levels, and the under- and over-exposed fractions below.

    Parameters
    ----------
    report : xarray.Dataset
        The report (one row per ``volume``).
    title : str, optional
        Above the chart (default "exposure").

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np, xarray as xr, volnorm as vn
    >>> x = xr.DataArray(np.random.default_rng(0).integers(0, 255, (5, 8, 8), dtype=np.uint8), dims=("volume", "y", "x"))
    >>> len(vn.plot.plot_exposure(vn.color.exposure(x)).axes)
    2
    """
    n = report.sizes.get("volume", 1)
    x = np.arange(n)
    fig = _figure(max(6.0, min(16.0, 0.25 * n + 4)), 5.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.plot(x, np.atleast_1d(report["brightness"].values), "o-", ms=3, label="perceived brightness")
    top.plot(x, np.atleast_1d(report["mean"].values), "s-", ms=3, alpha=0.6, label="mean luma")
    top.fill_between(x, np.atleast_1d(report["mean"] - report["rms_contrast"]), np.atleast_1d(report["mean"] + report["rms_contrast"]),
                     alpha=0.15, label="± RMS contrast")
    top.set_ylim(0, 1)
    top.set_ylabel("0 = black, 1 = white")
    sec = top.secondary_yaxis("right", functions=(lambda v: 10 * v, lambda v: v / 10))
    sec.set_ylabel("level (0-10)")
    top.legend(fontsize=8, loc="best")
    bottom.bar(x - 0.2, np.atleast_1d(report["underexposed"].values), 0.4, label=f"under (< {report.attrs.get('dark', 0.1):g})")
    bottom.bar(x + 0.2, np.atleast_1d(report["overexposed"].values), 0.4, label=f"over (> {report.attrs.get('bright', 0.9):g})")
    bottom.set_ylabel("fraction of pixels")
    bottom.legend(fontsize=8, loc="best")
    if "volume" in report.coords and n <= 40:
        bottom.set_xticks(x, [str(v) for v in np.atleast_1d(report["volume"].values)], rotation=60, fontsize=7)
    else:
        bottom.set_xlabel("image")
    top.set_title(title or "exposure", fontsize=10)
    return fig

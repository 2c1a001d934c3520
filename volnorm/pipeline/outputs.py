"""The outputs beside the images: per-voxel histograms, statistics, fitted parameters."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from volnorm.io.location import Remote, zarr_target
from volnorm.io.store import read_manifest
from volnorm.stats import summarize, summary_graph
from volnorm.voxel import accumulate


def write_voxel_histogram(store: Path | Remote, data: xr.DataArray, opts: Mapping[str, Any], mask: Any, p: dict, show: bool, say: Callable[[str], None]) -> None:

    t0 = time.perf_counter()
    name = opts["name"]
    # a histogram of an earlier run of another spec is replaced (only a volnorm per-voxel
    # histogram, and only once the new one is complete: accumulate's overwrite rule)
    accumulate(store, data, bins=opts["bins"], range=tuple(opts["range"]), mask=mask, name=name, progress=show, overwrite=True)
    g = zarr.open_group(zarr_target(store / name, read_only=False), mode="r+", zarr_format=3)
    g.attrs["pipeline_digest"] = p["digests"]["voxel_histogram"]
    say(f"  voxel histogram: {time.perf_counter() - t0:.1f} s -> {store / name}")


def _statistic_rows(s: Any, names: Sequence[str], qs: Sequence[float], digest_: str) -> list[dict[str, Any]]:
    """One dict per volume of a per-volume :class:`volnorm.stats.Summary`."""
    cols = ["count", "mean", "std", "min", "max", *(f"q{q:g}" for q in qs)]
    values = {c: np.atleast_1d(s[c].values) for c in cols}
    return [
        {"volume": str(name), **{c: (int if c == "count" else float)(values[c][i]) for c in cols}, "digest": digest_}
        for i, name in enumerate(names)
    ]


def _names(data: xr.DataArray) -> list[str]:
    return [str(v) for v in np.atleast_1d(data["volume"].values)] if "volume" in data.coords else [str(i) for i in range(data.sizes.get("volume", 1))]


def statistics_alongside(data: xr.DataArray, opts: Mapping[str, Any], mask: Any, digest_: str) -> Any:
    """The statistics output computed with the write, batch by batch (the output is made once
    and not read back): for 8/16-bit integer outputs, whose quantiles need no other pass.
    None otherwise (float outputs: the statistics pass reads the written store)."""
    if not (data.dtype.kind in "iub" and data.dtype.itemsize <= 2):
        return None
    qs = list(opts["quantiles"])
    spatial = tuple(d for d in data.dims if d != "volume")

    def along(batch: xr.DataArray, index: Any) -> tuple[list, Callable[[Sequence[Any]], list[dict]]]:
        m = mask.isel(volume=index) if isinstance(mask, xr.DataArray) and "volume" in mask.dims else mask
        lazy, finish = summary_graph(batch, dim=spatial, mask=m, quantiles=qs)
        return lazy, lambda values: _statistic_rows(finish(values), _names(batch), qs, digest_)

    return along


def written_statistics(store: Path, digest_: str) -> list[dict[str, Any]] | None:
    """The per-volume statistics a write kept with the volumes (this spec's, every volume's),
    else None."""

    m = read_manifest(store) or {}
    if m.get("kind") == "images":
        rows = list(m.get("volume_statistics", []))
        if len(rows) != len(m.get("volumes", [])):
            return None
    else:
        root = zarr.open_group(zarr_target(store), mode="r", zarr_format=3)
        rows = [root[name].attrs.get("volnorm", {}).get("statistics") for name in m.get("volumes", [])]
    if not rows or any(not r or r.get("digest") != digest_ for r in rows):
        return None
    return rows


def write_statistics(output: Callable[[], xr.DataArray] | None, opts: Mapping[str, Any], mask: Any, digest_: str, rows: list[dict] | None = None) -> Path:
    """Per-volume count, mean, std, min, max and quantiles (inside the mask), as JSON or CSV:
    the ``rows`` computed with the write, else :func:`volnorm.summarize` of ``output()`` (memory
    bounded by the chunks, not the number of volumes)."""
    qs = list(opts["quantiles"])
    if rows is None:
        data = output()
        spatial = tuple(d for d in data.dims if d != "volume")
        rows = _statistic_rows(summarize(data, dim=spatial, mask=mask, quantiles=qs), _names(data), qs, digest_)
    rows = [{k: v for k, v in r.items() if k != "digest"} for r in rows]
    path = Path(opts["path"])
    if path.suffix == ".csv":
        cols = list(rows[0])
        text = f"# volnorm statistics {digest_}\n" + ",".join(cols) + "\n" + "\n".join(",".join(repr(r[c]) if isinstance(r[c], float) else str(r[c]) for c in cols) for r in rows) + "\n"
    else:
        text = json.dumps({"volnorm_statistics": digest_, "volumes": rows}, indent=1)
    atomic_write(path, text)
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: the output's parent directory does not exist")
    tmp = path.with_name(f".{path.name}.volnorm-tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
